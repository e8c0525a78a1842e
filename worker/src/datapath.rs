//! The affinity data path: tokens follow their experts between layers (ExFlow's idea, for top-k).
//!
//! On the home path ([`DataPath::Home`]) every MoE layer sends a token's rows to the ranks of its
//! experts and combines the outputs back on the token's home rank: two all-to-all legs per remote
//! expert and layer, even when consecutive layers' experts sit on one rank. On the affinity path
//! the combine of a token lands on the rank of its **primary** (highest-weight) expert of the
//! layer — the replica on the rank that holds the token when there is one, else one in the
//! token's coherence group — and that rank runs the token's next attention and router. Why the
//! primary of layer l and not of l+1: layer l+1's router reads the output of layer l's combine,
//! so where the token goes must be decided before l+1's experts are known; an affinity placement
//! (`place solve --mode affinity`) puts the experts tokens use in consecutive layers on one rank,
//! so the rank of the layer-l primary is where its layer-l+1 primary most likely is. A token whose
//! consecutive primaries share a rank then crosses the network only for its other experts.
//!
//! What moves is the token's residual stream (its hidden state before the MoE layer), once, to
//! the destination; the destination normalises it itself and runs the shared experts and the
//! combine there, so a remote primary costs one row instead of two.
//!
//! # Coherence groups and the KV cache
//!
//! Attention on a rank needs the sequence's keys and values there. Ranks form coherence groups
//! (`coherence_group` consecutive ranks, e.g. one node's; default all): every rank keeps a copy
//! of the KV cache of every sequence of its group, from the first layer a token can reach away
//! from home (the one after the first MoE layer) on. After the last layer of every step the group
//! exchanges the new entries (one all-to-all): the rank that ran a token's attention in a layer
//! sends that entry to the others. A token only moves within its group.
//!
//! A sequence moves only once every rank of its group holds all its positions (*synced*); until
//! then — a prompt being prefilled, or the first step after a regroup, when the new generation
//! starts without copies — its tokens stay home for the whole step and home sends the missing
//! positions of every layer in that step's exchange. Prompt chunks (several tokens of one
//! sequence in a step) always stay home: their tokens attend to each other within the step.
//! Sequences stay owned by their home rank for scheduling, sampling, streaming and failure
//! handling: after the last layer, a token away from home sends its final hidden state home with
//! the step's KV exchange (one row), and the logits are computed there.
//! A failed collective leaves the copies as the last completed step left them (the home's engine
//! rolls its own caches back; this module truncates its copies), and a new group generation
//! starts without copies and rebuilds them from the homes' caches.
//!
//! Outputs are the home path's: the same kernels run on the same rows, and each token's expert
//! outputs are summed in increasing expert order as the home path does.

use super::{EpExecutor, EpSlots, ModelError, Result, proto_err};
use crate::attention::{KvCache, SeqSpan};
use crate::kernels;
use crate::model::{Ffn, ForwardOutput, LogitsMode, Model, SeqInput};
use crate::moe::{MoeLayer, Routing};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

#[path = "datapath_kv.rs"]
mod kv;

/// Where a token's MoE outputs are combined (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPath {
    /// On the token's home rank: every layer's attention runs at home.
    #[default]
    Home,
    /// On the rank of its primary expert, within coherence groups of `group` consecutive ranks (0:
    /// the whole group of ranks).
    Affinity { group: usize },
}

impl DataPath {
    /// `home`, `affinity` (coherence group: every rank) or `affinity:N` (groups of N ranks).
    pub fn parse(s: &str) -> std::result::Result<DataPath, String> {
        match s.split_once(':') {
            None if s == "home" => Ok(DataPath::Home),
            None if s == "affinity" => Ok(DataPath::Affinity { group: 0 }),
            Some(("affinity", n)) => match n.parse::<usize>() {
                Ok(g) if g > 0 => Ok(DataPath::Affinity { group: g }),
                _ => Err(format!("coherence group {n:?} is not a positive number of ranks")),
            },
            _ => Err(format!("unknown data path {s:?} (home, affinity or affinity:N)")),
        }
    }

    /// The same path for the evaluator (`placement::datapath`).
    pub fn kind(&self) -> placement::datapath::PathKind {
        match *self {
            DataPath::Home => placement::datapath::PathKind::Home,
            DataPath::Affinity { group } => placement::datapath::PathKind::Affinity { group },
        }
    }

    pub fn name(&self) -> String {
        match self {
            DataPath::Home => "home".into(),
            DataPath::Affinity { group: 0 } => "affinity".into(),
            DataPath::Affinity { group } => format!("affinity:{group}"),
        }
    }
}

/// This rank's side of the affinity path between steps.
#[derive(Debug, Default)]
pub(super) struct FollowState {
    /// `(home rank, cache id)` → this rank's copy of a group peer's sequence (layers from the
    /// first movable one on).
    mirrors: HashMap<(u32, u64), KvCache>,
    /// Own sequences (cache id) → positions every group peer holds a copy of.
    published: HashMap<u64, usize>,
    /// Own sequences that ended since the last exchange (their copies can go).
    ended: Vec<u64>,
}

impl FollowState {
    pub(super) fn release(&mut self, cache: u64) {
        if self.published.remove(&cache).is_some() {
            self.ended.push(cache);
        }
    }

    /// Bytes of the copies of peers' KV caches held here.
    pub(super) fn mirror_bytes(&self) -> u64 {
        self.mirrors.values().map(|c| c.bytes() as u64).sum()
    }
}

/// One token held by this rank at some layer.
#[derive(Debug, Clone, Copy)]
struct Held {
    home: u32,
    cache: u64,
    pos: u32,
    /// Index among its home's tokens of the step (where its logits row goes).
    slot: u32,
    /// Stays home this step (prompt chunk, or not synced).
    pinned: bool,
}

/// Little-endian message writer.
#[derive(Default)]
struct Wire(Vec<u8>);

impl Wire {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.0.reserve(v.len() * 4);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// Bounds-checked reader of a [`Wire`] message from rank `src`.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    src: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], src: usize, what: &'static str) -> Self {
        Reader { b, at: 0, src, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(proto_err(format!("{} from rank {} is short ({} bytes)", self.what, self.src, self.b.len())));
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let s = self.take(n.checked_mul(4).ok_or_else(|| proto_err(format!("{}: row size overflows", self.what)))?)?;
        Ok(s.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn count(&mut self) -> Result<usize> {
        // A count can never exceed the bytes left: one entry takes at least one byte.
        let n = self.u32()? as usize;
        if n > self.b.len() - self.at {
            return Err(proto_err(format!("{} from rank {}: {n} entries in {} bytes", self.what, self.src, self.b.len())));
        }
        Ok(n)
    }
    fn done(&self) -> Result<()> {
        if self.at != self.b.len() {
            return Err(proto_err(format!("{} from rank {}: {} bytes left over", self.what, self.src, self.b.len() - self.at)));
        }
        Ok(())
    }
}

/// A token arriving at this rank in a MoE layer's dispatch, or staying here.
struct Arrival {
    held: Held,
    /// Rank it came from and its index there (how combine outputs name it).
    src: u32,
    key: u32,
    /// The hidden state before the MoE layer (the residual).
    residual: Vec<f32>,
    /// Its normalised MoE input.
    xn: Vec<f32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
}

/// Layer geometry the forward needs everywhere.
struct Shape {
    hidden: usize,
    k_row: usize,
    v_row: usize,
    /// Layers from which a token may be away from home (after the first MoE layer).
    first_movable: usize,
    n_layers: usize,
}

impl EpExecutor {
    /// Ranks of this rank's coherence group.
    fn coherence_group(&self) -> std::ops::Range<usize> {
        let g = match *self.data_path.lock().unwrap_or_else(|p| p.into_inner()) {
            DataPath::Affinity { group } => group,
            DataPath::Home => 0,
        };
        placement::datapath::coherence_group(self.rank, self.world, g)
    }

    /// One forward of this rank's `seqs` on the affinity path (see the module documentation);
    /// every rank of the group runs it in the same step, with or without sequences of its own.
    pub(super) fn forward_affinity(&self, model: &Model, seqs: &mut [SeqInput], mode: LogitsMode) -> Result<ForwardOutput> {
        let c = &model.config;
        let (kvh, kd, vd) = c.attn.kv_layout();
        let shape = Shape {
            hidden: c.hidden_size,
            k_row: kvh * kd,
            v_row: kvh * vd,
            first_movable: c.first_movable_layer(),
            n_layers: model.layers.len(),
        };
        let mut state = self.follow.lock().map_err(|_| proto_err("affinity state lock poisoned".into()))?;
        let out = self.forward_affinity_inner(model, seqs, mode, &shape, &mut state);
        if out.is_err() {
            // The copies go back to the last completed step (the engine does the same for the
            // home caches).
            for m in state.mirrors.values_mut() {
                m.discard_uncommitted();
            }
        }
        self.timers.kv_mirror_bytes.store(state.mirror_bytes(), Ordering::Relaxed);
        out
    }

    fn forward_affinity_inner(
        &self,
        model: &Model,
        seqs: &mut [SeqInput],
        mode: LogitsMode,
        shape: &Shape,
        state: &mut FollowState,
    ) -> Result<ForwardOutput> {
        let c = &model.config;
        let h = shape.hidden;
        let me = self.rank as u32;
        let slots = self.slots();
        // This rank's own tokens, embedded.
        let mut spans = Vec::with_capacity(seqs.len());
        let mut held = Vec::new();
        let mut x = Vec::new();
        for s in seqs.iter() {
            model.validate(s.tokens, s.cache.len())?;
            let start = s.cache.len();
            let synced = state.published.get(&s.cache.id()) == Some(&start);
            spans.push(SeqSpan { offset: held.len(), n: s.tokens.len(), start });
            for (j, &tok) in s.tokens.iter().enumerate() {
                held.push(Held {
                    home: me,
                    cache: s.cache.id(),
                    pos: (start + j) as u32,
                    slot: held.len() as u32,
                    pinned: !synced || s.tokens.len() > 1,
                });
                model.embed.push_row(tok as usize, &mut x);
            }
        }
        let n_own = held.len();
        let mut own: Vec<&mut KvCache> = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        let own_index: HashMap<u64, usize> = own.iter().enumerate().map(|(i, c)| (c.id(), i)).collect();
        // Per layer, the tokens that may move whose attention ran here: their KV entries are
        // this rank's to send.
        let mut ran_here: Vec<Vec<Held>> = vec![Vec::new(); shape.n_layers];
        let mut routing = Vec::new();
        for (li, layer) in model.layers.iter().enumerate() {
            sort_held(&mut held, &mut x, h, me, &own_index);
            let xn = kernels::rmsnorm(&x, &layer.input_norm, c.rms_norm_eps);
            let a = self.attend(model, li, &xn, &held, &mut own, &own_index, state, shape)?;
            for (xv, av) in x.iter_mut().zip(&a) {
                *xv += av;
            }
            if li >= shape.first_movable {
                ran_here[li].extend(held.iter().filter(|t| !t.pinned).copied());
            }
            let xn = kernels::rmsnorm(&x, &layer.post_norm, c.rms_norm_eps);
            match &layer.ffn {
                Ffn::Dense(m) => {
                    let f = m.forward(&xn, held.len());
                    for (xv, fv) in x.iter_mut().zip(&f) {
                        *xv += fv;
                    }
                }
                Ffn::Moe(m) => {
                    let (next_held, next_x, r) = self.moe_affinity(m, &layer.post_norm, c.rms_norm_eps, &slots, held, x, xn)?;
                    held = next_held;
                    x = next_x;
                    routing.push(r);
                }
            }
        }
        // Final hidden states: own tokens held here in place, the others' go home with the KV
        // exchange, this rank's come back with it; then in batch order.
        let mut final_x = vec![0.0f32; n_own * h];
        let mut placed = vec![false; n_own];
        let mut finals: Vec<Wire> = (0..self.world).map(|_| Wire::default()).collect();
        let mut finals_n = vec![0u32; self.world];
        for (t, row) in held.iter().zip(x.chunks_exact(h)) {
            if t.home == me {
                final_x[t.slot as usize * h..(t.slot as usize + 1) * h].copy_from_slice(row);
                placed[t.slot as usize] = true;
            } else {
                finals[t.home as usize].u32(t.slot);
                finals[t.home as usize].f32s(row);
                finals_n[t.home as usize] += 1;
            }
        }
        let finals: Vec<Vec<u8>> = finals
            .into_iter()
            .zip(finals_n)
            .map(|(w, n)| {
                let mut b = n.to_le_bytes().to_vec();
                b.extend_from_slice(&w.0);
                b
            })
            .collect();
        for (slot, row) in self.exchange_kv(&spans, &mut own, &own_index, &ran_here, state, shape, finals)? {
            match placed.get_mut(slot) {
                Some(p) if !*p => {
                    *p = true;
                    final_x[slot * h..(slot + 1) * h].copy_from_slice(&row);
                }
                _ => return Err(proto_err(format!("rank {me}: final hidden state for token {slot} twice or out of range"))),
            }
        }
        if let Some(slot) = placed.iter().position(|p| !p) {
            return Err(proto_err(format!("rank {me}: token {slot} of the batch did not come home")));
        }
        for (sp, cache) in spans.iter().zip(own.iter_mut()) {
            cache.set_len(sp.start + sp.n);
            state.published.insert(cache.id(), sp.start + sp.n);
        }
        Ok(ForwardOutput { logits: model.head(&final_x, &spans, mode), routing })
    }

    /// Attention of layer `li` over the held tokens (`held` sorted by [`sort_held`]): own
    /// sequences against their caches, peers' against this rank's copies. Appends the new keys
    /// and values to whichever it used.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        model: &Model,
        li: usize,
        xn: &[f32],
        held: &[Held],
        own: &mut [&mut KvCache],
        own_index: &HashMap<u64, usize>,
        state: &mut FollowState,
        shape: &Shape,
    ) -> Result<Vec<f32>> {
        let me = self.rank as u32;
        let mut spans: Vec<SeqSpan> = Vec::new();
        let mut keys: Vec<(u32, u64)> = Vec::new();
        for (i, t) in held.iter().enumerate() {
            match (spans.last_mut(), keys.last()) {
                (Some(sp), Some(&k)) if k == (t.home, t.cache) => sp.n += 1,
                _ => {
                    spans.push(SeqSpan { offset: i, n: 1, start: t.pos as usize });
                    keys.push((t.home, t.cache));
                }
            }
        }
        // The caches in span order: own ones first (sorted by batch index), then copies.
        let mut wanted_own: Vec<Option<usize>> = vec![None; own.len()];
        let mut wanted_mirror: HashMap<(u32, u64), usize> = HashMap::new();
        for (j, &(home, cache)) in keys.iter().enumerate() {
            if home == me {
                let i = own_index.get(&cache).copied().ok_or_else(|| proto_err(format!("rank {me}: own sequence {cache} is not in the batch")))?;
                wanted_own[i] = Some(j);
            } else {
                wanted_mirror.insert((home, cache), j);
            }
        }
        let mut caches: Vec<(usize, &mut KvCache)> = Vec::with_capacity(keys.len());
        for (i, c) in own.iter_mut().enumerate() {
            if let Some(j) = wanted_own[i] {
                caches.push((j, &mut **c));
            }
        }
        for (k, m) in state.mirrors.iter_mut() {
            if let Some(&j) = wanted_mirror.get(k) {
                caches.push((j, m));
            }
        }
        if caches.len() != keys.len() {
            return Err(proto_err(format!("rank {me}: layer {li}: a peer's token arrived without its KV copy here")));
        }
        caches.sort_by_key(|(j, _)| *j);
        for ((_, cache), sp) in caches.iter().zip(&spans) {
            let have = cache.layers[li].k.len() / shape.k_row.max(1);
            if have != sp.start {
                return Err(proto_err(format!("rank {me}: layer {li}: sequence {} holds {have} positions, its token is at {}", cache.id(), sp.start)));
            }
        }
        let mut caches: Vec<&mut KvCache> = caches.into_iter().map(|(_, c)| c).collect();
        let cos_sin: Vec<_> = held.iter().map(|t| model.rope.cos_sin(t.pos as usize)).collect();
        let c = &model.config;
        Ok(model.layers[li].attn.forward(
            li,
            xn,
            held.len(),
            &spans,
            &mut caches,
            &model.rope,
            &cos_sin,
            c.rms_norm_eps,
            model.attn_scale,
            c.sliding_windows[li],
        ))
    }

    /// One MoE layer on the affinity path: route the held tokens, send each token's residual to
    /// its destination and its rows to its experts, run the experts here, send their outputs to
    /// the tokens' destinations, and sum them there. Returns the tokens held here after the
    /// layer, their hidden states, and this rank's routing (of the tokens it held before).
    #[allow(clippy::too_many_arguments)]
    fn moe_affinity(
        &self,
        m: &MoeLayer,
        post_norm: &[f32],
        eps: f32,
        slots: &EpSlots,
        held: Vec<Held>,
        x: Vec<f32>,
        xn: Vec<f32>,
    ) -> Result<(Vec<Held>, Vec<f32>, Routing)> {
        let (h, li, world, me) = (m.hidden, m.moe_index, self.world, self.rank);
        if li >= slots.replicas.len() {
            return Err(proto_err(format!("MoE layer {li} is not in the placement")));
        }
        let started = std::time::Instant::now();
        self.timers.moe_layer_calls.fetch_add(1, Ordering::Relaxed);
        let t = held.len();
        let routing = m.router.route(&xn, t);
        let k = routing.top_k;
        if k > 64 {
            return Err(proto_err(format!("the affinity path takes at most 64 experts per token, not {k}")));
        }
        let plan = self.plan_destinations(&slots.replicas[li], &routing, &held);
        let dest = &plan.dest;
        let send = encode_dispatch(&plan, &held, &routing, &x, &xn, h, me, world);
        let recv = self.a2a(send)?;
        let t_dispatch = std::time::Instant::now();
        // Tokens held here after the layer: those that stay, then those that arrive.
        let mut arrivals: Vec<Arrival> = Vec::new();
        for tok in (0..t).filter(|&tok| dest[tok] == me) {
            arrivals.push(Arrival {
                held: held[tok],
                src: me as u32,
                key: tok as u32,
                residual: x[tok * h..(tok + 1) * h].to_vec(),
                xn: xn[tok * h..(tok + 1) * h].to_vec(),
                ids: routing.ids[tok * k..(tok + 1) * k].to_vec(),
                weights: routing.weights[tok * k..(tok + 1) * k].to_vec(),
            });
        }
        // Expert work: (expert, input row, where the output goes: destination, source, key, k).
        let mut work: Vec<ExpertRow> = Vec::new();
        for (src, b) in recv.iter().enumerate() {
            let mut r = Reader::new(b, src, "affinity dispatch");
            for _ in 0..r.count()? {
                let home = r.u32()?;
                let cache = r.u64()?;
                let pos = r.u32()?;
                let slot = r.u32()?;
                let key = r.u32()?;
                let mask = r.u64()?;
                let ids: Vec<u32> = (0..k).map(|_| r.u32()).collect::<Result<_>>()?;
                let weights = r.f32s(k)?;
                let residual = r.f32s(h)?;
                let xn_here = kernels::rmsnorm(&residual, post_norm, eps);
                for (j, &e) in ids.iter().enumerate() {
                    if mask & (1 << j) != 0 {
                        work.push((e, xn_here.clone(), (me, src as u32, key, j as u32)));
                    }
                }
                let held = Held { home, cache, pos, slot, pinned: false };
                arrivals.push(Arrival { held, src: src as u32, key, residual, xn: xn_here, ids, weights });
            }
            let n = r.count()?;
            let mut meta = Vec::with_capacity(n);
            for _ in 0..n {
                let (e, d, key, j) = (r.u32()?, r.u32()? as usize, r.u32()?, r.u32()?);
                if d >= world || e as usize >= self.n_experts {
                    return Err(proto_err(format!("rank {me}: dispatch row from rank {src} names rank {d} / expert {e}")));
                }
                meta.push((e, d, key, j));
            }
            for (e, d, key, j) in meta {
                work.push((e, r.f32s(h)?, (d, src as u32, key, j)));
            }
            r.done()?;
        }
        let send = self.run_rows(slots, li, &work, h)?;
        let t_expert = std::time::Instant::now();
        let recv = self.a2a(send)?;
        let index: HashMap<(u32, u32), usize> = arrivals.iter().enumerate().map(|(i, a)| ((a.src, a.key), i)).collect();
        let mut ys: Vec<Vec<Option<Vec<f32>>>> = arrivals.iter().map(|_| vec![None; k]).collect();
        for (src, b) in recv.iter().enumerate() {
            let mut r = Reader::new(b, src, "affinity combine");
            let n = r.count()?;
            let mut meta = Vec::with_capacity(n);
            for _ in 0..n {
                meta.push((r.u32()?, r.u32()?, r.u32()? as usize));
            }
            for (s, key, j) in meta {
                let y = r.f32s(h)?;
                match index.get(&(s, key)) {
                    Some(&i) if j < k => ys[i][j] = Some(y),
                    _ => return Err(proto_err(format!("rank {me}: combine from rank {src} names no token held here ({s}, {key}, {j})"))),
                }
            }
            r.done()?;
        }
        // Weighted sums in increasing expert order (as the home path), shared experts, residual.
        let n = arrivals.len();
        let mut xn_all = Vec::with_capacity(n * h);
        for a in &arrivals {
            xn_all.extend_from_slice(&a.xn);
        }
        let shared = m.shared_forward(&xn_all, n);
        let mut next_held = Vec::with_capacity(n);
        let mut next_x = Vec::with_capacity(n * h);
        for (i, a) in arrivals.iter().enumerate() {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by_key(|&j| a.ids[j]);
            let mut out = vec![0.0f32; h];
            for j in order {
                let y = ys[i][j].as_ref().ok_or_else(|| proto_err(format!("rank {me}: expert {} output missing", a.ids[j])))?;
                kernels::axpy(a.weights[j], y, &mut out);
            }
            if let Some(s) = &shared {
                for (o, s) in out.iter_mut().zip(&s[i * h..(i + 1) * h]) {
                    *o += s;
                }
            }
            next_x.extend(a.residual.iter().zip(&out).map(|(r, o)| r + o));
            next_held.push(a.held);
        }
        let done = std::time::Instant::now();
        let us = |a: std::time::Instant, b: std::time::Instant| b.duration_since(a).as_micros() as u64;
        self.timers.dispatch_us.fetch_add(us(started, t_dispatch), Ordering::Relaxed);
        self.timers.expert_us.fetch_add(us(t_dispatch, t_expert), Ordering::Relaxed);
        self.timers.combine_us.fetch_add(us(t_expert, done), Ordering::Relaxed);
        Ok((next_held, next_x, routing))
    }

    /// Every held token's destination ([`placement::datapath::destination`]), and per expert
    /// rank the (token, k) rows it runs (replica: on the destination, else here, else the least
    /// loaded); rows whose expert runs on a remote destination are marked in the token's mask
    /// instead (run there on the residual it gets). Counts rows kept local and tokens moved.
    fn plan_destinations(&self, reps: &[Vec<usize>], routing: &Routing, held: &[Held]) -> LayerPlan {
        let (world, me, k, t) = (self.world, self.rank, routing.top_k, held.len());
        let group = self.coherence_group();
        let slack = self.replica_slack((t * k) as u64);
        let mut load = vec![0u64; world];
        let mut dest = Vec::with_capacity(t);
        let mut rows: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world];
        let mut at_dest_mask = vec![0u64; t];
        let (mut local_rows, mut remote_rows) = (0u64, 0u64);
        for tok in 0..t {
            let home = held[tok].home as usize;
            let ids = &routing.ids[tok * k..(tok + 1) * k];
            let d = placement::datapath::destination(reps, ids, me, home, group.clone(), held[tok].pinned, |inside| {
                self.pick_replica(inside, &load, me, slack)
            });
            dest.push(d);
            for j in 0..k {
                let e = routing.ids[tok * k + j] as usize;
                let rs = &reps[e];
                let q = placement::datapath::expert_rank(rs, me, d, |rs| self.pick_replica(rs, &load, me, slack));
                load[q] += 1;
                if q == d && q == me {
                    local_rows += 1;
                } else {
                    remote_rows += 1;
                }
                if q == d && d != me {
                    at_dest_mask[tok] |= 1 << j; // run at the destination on the residual it gets
                } else {
                    rows[q].push((tok, j));
                }
            }
        }
        self.timers.tokens_moved.fetch_add(dest.iter().filter(|&&d| d != me).count() as u64, Ordering::Relaxed);
        self.timers.local_rows.fetch_add(local_rows, Ordering::Relaxed);
        self.timers.remote_rows.fetch_add(remote_rows, Ordering::Relaxed);
        LayerPlan { dest, rows, at_dest_mask }
    }

    /// Runs the expert rows received (grouped per expert, in parallel) and encodes the combine:
    /// every output to its token's destination, named by (source, key, k).
    fn run_rows(&self, slots: &EpSlots, li: usize, work: &[ExpertRow], h: usize) -> Result<Vec<Vec<u8>>> {
        let world = self.world;
        // Experts, grouped per expert.
        let mut by_expert: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, (e, _, _)) in work.iter().enumerate() {
            by_expert.entry(*e).or_default().push(i);
        }
        let mut groups: Vec<(u32, Vec<usize>)> = by_expert.into_iter().collect();
        groups.sort_by_key(|g| g.0);
        let outs: Vec<Result<Vec<f32>>> = groups
            .par_iter()
            .map(|(e, items)| {
                let mut xin = Vec::with_capacity(items.len() * h);
                for &i in items {
                    xin.extend_from_slice(&work[i].1);
                }
                match slots.experts[li].get(*e as usize) {
                    Some(Some(w)) => Ok(w.forward(&xin, items.len())),
                    _ => Err(ModelError::ExpertNotLoaded { layer: li, expert: *e as usize }),
                }
            })
            .collect();
        // Combine: every output to its token's destination, named by (source, key, k).
        let mut back: Vec<Wire> = (0..world).map(|_| Wire::default()).collect();
        let mut back_rows: Vec<Vec<f32>> = vec![Vec::new(); world];
        let mut back_n = vec![0u32; world];
        for ((_, items), y) in groups.iter().zip(outs) {
            let y = y?;
            for (row, &i) in items.iter().enumerate() {
                let (d, src, key, j) = work[i].2;
                back[d].u32(src);
                back[d].u32(key);
                back[d].u32(j);
                back_rows[d].extend_from_slice(&y[row * h..(row + 1) * h]);
                back_n[d] += 1;
            }
        }
        let send: Vec<Vec<u8>> = back
            .into_iter()
            .zip(back_rows)
            .zip(&back_n)
            .map(|((meta, ys), &n)| {
                let mut w = Wire::default();
                w.u32(n);
                w.0.extend_from_slice(&meta.0);
                w.f32s(&ys);
                w.0
            })
            .collect();
        Ok(send)
    }
}

/// A MoE layer's dispatch, per rank: `[moves][rows]`. A move: home, cache, pos, slot, key, mask,
/// k ids, k weights, residual. A row: expert, destination, key, k index; then the rows' inputs.
#[allow(clippy::too_many_arguments)]
fn encode_dispatch(plan: &LayerPlan, held: &[Held], routing: &Routing, x: &[f32], xn: &[f32], h: usize, me: usize, world: usize) -> Vec<Vec<u8>> {
    let (dest, rows, at_dest_mask) = (&plan.dest, &plan.rows, &plan.at_dest_mask);
    let (k, t) = (routing.top_k, held.len());
    (0..world)
        .map(|q| {
            let mut w = Wire::default();
            let moves: Vec<usize> = (0..t).filter(|&tok| dest[tok] == q && q != me).collect();
            w.u32(moves.len() as u32);
            for &tok in &moves {
                let hd = held[tok];
                w.u32(hd.home);
                w.u64(hd.cache);
                w.u32(hd.pos);
                w.u32(hd.slot);
                w.u32(tok as u32);
                w.u64(at_dest_mask[tok]);
                for j in 0..k {
                    w.u32(routing.ids[tok * k + j]);
                }
                w.f32s(&routing.weights[tok * k..(tok + 1) * k]);
                w.f32s(&x[tok * h..(tok + 1) * h]);
            }
            w.u32(rows[q].len() as u32);
            for &(tok, j) in &rows[q] {
                w.u32(routing.ids[tok * k + j]);
                w.u32(dest[tok] as u32);
                w.u32(tok as u32);
                w.u32(j as u32);
            }
            for &(tok, _) in &rows[q] {
                w.f32s(&xn[tok * h..(tok + 1) * h]);
            }
            w.0
        })
        .collect()
}

/// Where one MoE layer's tokens go (see [`EpExecutor::plan_destinations`]).
struct LayerPlan {
    dest: Vec<usize>,
    /// Per expert rank, the (token, k) rows it runs.
    rows: Vec<Vec<(usize, usize)>>,
    /// Per token, the k indices whose expert runs on its (remote) destination.
    at_dest_mask: Vec<u64>,
}

/// An expert row to run here: expert, input, and where the output goes (destination, source,
/// key, k).
type ExpertRow = (u32, Vec<f32>, (usize, u32, u32, u32));


/// Own tokens first in batch order, then peers' by (home, sequence, position): every
/// sequence's tokens contiguous and in order, as attention takes them.
fn sort_held(held: &mut Vec<Held>, x: &mut Vec<f32>, h: usize, me: u32, own_index: &HashMap<u64, usize>) {
    let key = |t: &Held| {
        if t.home == me { (0u8, own_index.get(&t.cache).copied().unwrap_or(usize::MAX) as u64, 0u64, t.pos) } else { (1u8, t.home as u64, t.cache, t.pos) }
    };
    if held.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        return;
    }
    let mut order: Vec<usize> = (0..held.len()).collect();
    order.sort_by_key(|&i| key(&held[i]));
    let mut nx = Vec::with_capacity(x.len());
    for &i in &order {
        nx.extend_from_slice(&x[i * h..(i + 1) * h]);
    }
    *held = order.iter().map(|&i| held[i]).collect();
    *x = nx;
}
