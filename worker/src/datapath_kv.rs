//! The affinity path's KV exchange: once per step, every rank sends its coherence group the keys
//! and values it computed for tokens that may move, the positions of its own sequences its peers
//! lack, the sequences that ended, and the final hidden states of peers' tokens it holds.

use super::{FollowState, Held, Reader, Shape, Wire};
use crate::attention::{KvCache, SeqSpan};
use crate::error::Result;
use crate::expert_parallel::{EpExecutor, proto_err};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

impl EpExecutor {
    /// The step's KV exchange within the coherence group: the entries this rank computed for
    /// tokens that may move (`ran_here`), every movable layer of the positions of its own
    /// sequences that its peers lack (pinned ones), and the sequences that ended. Applies what
    /// the peers send.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn exchange_kv(
        &self,
        spans: &[SeqSpan],
        own: &mut [&mut KvCache],
        own_index: &HashMap<u64, usize>,
        ran_here: &[Vec<Held>],
        state: &mut FollowState,
        shape: &Shape,
        finals: Vec<Vec<u8>>,
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        let me = self.rank as u32;
        let (kr, vr) = (shape.k_row, shape.v_row);
        let movable = shape.first_movable..shape.n_layers;
        let mut w = Wire::default();
        w.u32(state.ended.len() as u32);
        for &id in &state.ended {
            w.u64(id);
        }
        // Single entries: home, cache, layer, pos, k, v.
        let singles: Vec<(usize, &Held)> = ran_here.iter().enumerate().flat_map(|(l, ts)| ts.iter().map(move |t| (l, t))).collect();
        w.u32(singles.len() as u32);
        for &(l, t) in &singles {
            let cache: &KvCache = if t.home == me {
                let i = own_index.get(&t.cache).copied().ok_or_else(|| proto_err(format!("rank {me}: own sequence {} left the batch", t.cache)))?;
                &*own[i]
            } else {
                state.mirrors.get(&(t.home, t.cache)).ok_or_else(|| proto_err(format!("rank {me}: no copy of sequence {}", t.cache)))?
            };
            let p = t.pos as usize;
            let lk = &cache.layers[l];
            w.u32(t.home);
            w.u64(t.cache);
            w.u32(l as u32);
            w.u32(t.pos);
            w.f32s(&lk.k[p * kr..(p + 1) * kr]);
            w.f32s(&lk.v[p * vr..(p + 1) * vr]);
        }
        // Blocks: own sequences whose peers lack positions (from what they hold to the end).
        let blocks: Vec<(usize, usize, usize)> = spans
            .iter()
            .enumerate()
            .filter_map(|(i, sp)| {
                // The same test as the one that pinned the sequence's tokens this step.
                let published = state.published.get(&own[i].id()).copied();
                let moved = published == Some(sp.start) && sp.n == 1;
                (!moved).then_some((i, published.unwrap_or(0), sp.start + sp.n))
            })
            .collect();
        w.u32(blocks.len() as u32);
        for &(i, from, to) in &blocks {
            w.u64(own[i].id());
            w.u32(from as u32);
            w.u32((to - from) as u32);
            for l in movable.clone() {
                let lk = &own[i].layers[l];
                w.f32s(&lk.k[from * kr..to * kr]);
                w.f32s(&lk.v[from * vr..to * vr]);
            }
        }
        let group = self.coherence_group();
        let msg = w.0;
        // To every peer of the group: its tokens' final hidden states, then the common part.
        let peers = group.clone().filter(|&r| r != self.rank).count() as u64;
        let send: Vec<Vec<u8>> = finals
            .into_iter()
            .enumerate()
            .map(|(r, mut b)| {
                if group.contains(&r) && r != self.rank {
                    b.extend_from_slice(&msg);
                    b
                } else {
                    Vec::new()
                }
            })
            .collect();
        let recv = self.a2a(send)?;
        self.timers.kv_gather_bytes.fetch_add(msg.len() as u64 * peers, Ordering::Relaxed);
        let mut came_home = Vec::new();
        state.ended.clear();
        let n_layers = shape.n_layers;
        for (src, b) in recv.iter().enumerate() {
            if b.is_empty() {
                continue;
            }
            let mut r = Reader::new(b, src, "KV exchange");
            for _ in 0..r.count()? {
                let slot = r.u32()? as usize;
                came_home.push((slot, r.f32s(shape.hidden)?));
            }
            for _ in 0..r.count()? {
                let id = r.u64()?;
                state.mirrors.remove(&(src as u32, id));
            }
            for _ in 0..r.count()? {
                let (home, cache, l, pos) = (r.u32()?, r.u64()?, r.u32()? as usize, r.u32()? as usize);
                let (k, v) = (r.f32s(kr)?, r.f32s(vr)?);
                if !movable.contains(&l) {
                    return Err(proto_err(format!("rank {me}: KV entry of layer {l} from rank {src}")));
                }
                let target: &mut KvCache = if home == me {
                    let i = own_index.get(&cache).copied().ok_or_else(|| proto_err(format!("rank {me}: KV entry for a sequence not in the batch ({cache})")))?;
                    &mut *own[i]
                } else {
                    state.mirrors.get_mut(&(home, cache)).ok_or_else(|| proto_err(format!("rank {me}: KV entry for sequence {cache} of rank {home}, of which it holds no copy")))?
                };
                append_at(target, l, pos, &k, &v, kr)?;
            }
            for _ in 0..r.count()? {
                let (id, from, n) = (r.u64()?, r.u32()? as usize, r.u32()? as usize);
                let key = (src as u32, id);
                if from == 0 {
                    let (kvh, kd, vd) = (1, kr, vr);
                    state.mirrors.insert(key, KvCache::with_id(id, n_layers, kvh, kd, vd));
                }
                let mirror = state.mirrors.get_mut(&key).ok_or_else(|| proto_err(format!("rank {me}: KV from position {from} of sequence {id} of rank {src}, of which it holds no copy")))?;
                for l in movable.clone() {
                    let (k, v) = (r.f32s(n * kr)?, r.f32s(n * vr)?);
                    append_at(mirror, l, from, &k, &v, kr)?;
                }
            }
            r.done()?;
        }
        // Every copy this step touched now holds the same positions in every movable layer.
        for m in state.mirrors.values_mut() {
            let n = m.layers.get(shape.first_movable).map_or(0, |l| l.k.len() / kr.max(1));
            if movable.clone().any(|l| m.layers[l].k.len() != n * kr || m.layers[l].v.len() != n * vr) {
                return Err(proto_err(format!("rank {me}: copy of sequence {} is uneven across layers", m.id())));
            }
            m.set_len(n);
        }
        Ok(came_home)
    }
}

/// Append keys/values of positions from `pos` on to layer `l` of `cache`, which must hold exactly
/// `pos` positions there.
fn append_at(cache: &mut KvCache, l: usize, pos: usize, k: &[f32], v: &[f32], kr: usize) -> Result<()> {
    let lk = &mut cache.layers[l];
    if lk.k.len() != pos * kr {
        return Err(proto_err(format!("KV entry at position {pos} of layer {l}, the copy holds {}", lk.k.len() / kr.max(1))));
    }
    lk.k.extend_from_slice(k);
    lk.v.extend_from_slice(v);
    Ok(())
}
