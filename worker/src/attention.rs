#![forbid(unsafe_code)]
//! Attention (standard GQA and DeepSeek MLA) and the per-sequence KV cache.

use crate::config::QkNorm;
use crate::kernels::{self, Linear, Rope};
use rayon::prelude::*;

/// Keys and values of one layer of one sequence: `[len × kv_heads × dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The KV cache of one sequence (all layers).
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    len: usize,
    /// Unique in this process (a clone keeps it): names the sequence to the ranks that hold
    /// copies of its keys and values (the affinity data path).
    id: u64,
    /// per token: kv heads × key dim, kv heads × value dim
    k_row: usize,
    v_row: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_heads: usize, k_dim: usize, v_dim: usize) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        KvCache { layers: vec![LayerKv::default(); n_layers], len: 0, id, k_row: kv_heads * k_dim, v_row: kv_heads * v_dim }
    }

    /// A cache with the given id (this rank's copy of another rank's sequence).
    pub(crate) fn with_id(id: u64, n_layers: usize, kv_heads: usize, k_dim: usize, v_dim: usize) -> Self {
        KvCache { id, ..KvCache::new(n_layers, kv_heads, k_dim, v_dim) }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Floats of one token's keys and values in one layer.
    pub fn row_sizes(&self) -> (usize, usize) {
        (self.k_row, self.v_row)
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drop everything after the first `n` tokens.
    pub fn truncate(&mut self, n: usize) {
        if n < self.len {
            for l in &mut self.layers {
                l.k.truncate(n * self.k_row);
                l.v.truncate(n * self.v_row);
            }
            self.len = n;
        }
    }

    /// Drop keys and values appended after the last completed forward (`len` tokens): a forward
    /// that failed midway (a collective of a later layer failed) has already appended its tokens
    /// to the earlier layers. After this the cache is as the last completed forward left it.
    pub fn discard_uncommitted(&mut self) {
        let (n, k_row, v_row) = (self.len, self.k_row, self.v_row);
        for l in &mut self.layers {
            l.k.truncate(n * k_row);
            l.v.truncate(n * v_row);
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.len() + l.v.len()) * 4).sum()
    }

    pub(crate) fn set_len(&mut self, n: usize) {
        self.len = n;
    }
}

/// The query projection of MLA: direct, or through the low-rank `q_a → norm → q_b` path.
#[derive(Debug, Clone)]
pub enum MlaQuery {
    Direct(Linear),
    LowRank { a: Linear, norm: Vec<f32>, b: Linear },
}

#[derive(Debug, Clone)]
pub enum Attention {
    Standard {
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        qk_norm: QkNorm,
        q_norm: Option<Vec<f32>>,
        k_norm: Option<Vec<f32>>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        clip_qkv: Option<f32>,
    },
    Mla {
        q: MlaQuery,
        kv_a: Linear,
        kv_a_norm: Vec<f32>,
        kv_b: Linear,
        o: Linear,
        n_heads: usize,
        kv_lora_rank: usize,
        nope: usize,
        rope_dim: usize,
        v_dim: usize,
    },
}

/// Where each token of a batch belongs: sequence (index into the caches) and absolute position.
#[derive(Debug, Clone, Copy)]
pub struct TokenSlot {
    pub seq: usize,
    pub pos: usize,
}

/// Per-sequence slice of a batch: `tokens[offset..offset+n]` are positions `start..start+n`.
#[derive(Debug, Clone, Copy)]
pub struct SeqSpan {
    pub offset: usize,
    pub n: usize,
    pub start: usize,
}

impl Attention {
    /// Attention over a batch `x[t×hidden]` made of `spans` (one per sequence, cache `caches[i]`);
    /// appends this layer's keys/values to the caches. Returns `[t×hidden]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        layer: usize,
        x: &[f32],
        t: usize,
        spans: &[SeqSpan],
        caches: &mut [&mut KvCache],
        rope: &Rope,
        cos_sin: &[(Vec<f32>, Vec<f32>)],
        eps: f32,
        scale: f32,
        window: Option<usize>,
    ) -> Vec<f32> {
        let (q, k, v, n_heads, n_kv, qd, vd, o) = match self {
            Attention::Standard { q, k, v, o, qk_norm, q_norm, k_norm, n_heads, n_kv_heads, head_dim, clip_qkv } => {
                let hd = *head_dim;
                let (mut qs, (mut ks, mut vs)) =
                    rayon::join(|| q.forward(x, t), || rayon::join(|| k.forward(x, t), || v.forward(x, t)));
                match qk_norm {
                    QkNorm::None => {}
                    QkNorm::PerHead => {
                        if let (Some(qn), Some(kn)) = (q_norm, k_norm) {
                            kernels::rmsnorm_inplace(&mut qs, qn, eps);
                            kernels::rmsnorm_inplace(&mut ks, kn, eps);
                        }
                    }
                    QkNorm::Full => {
                        if let (Some(qn), Some(kn)) = (q_norm, k_norm) {
                            kernels::rmsnorm_inplace(&mut qs, qn, eps);
                            kernels::rmsnorm_inplace(&mut ks, kn, eps);
                        }
                    }
                }
                if let Some(c) = clip_qkv {
                    for buf in [&mut qs, &mut ks, &mut vs] {
                        buf.iter_mut().for_each(|x| *x = x.clamp(-c, *c));
                    }
                }
                for (i, (qr, kr)) in qs.chunks_mut(n_heads * hd).zip(ks.chunks_mut(n_kv_heads * hd)).enumerate() {
                    let (c, s) = &cos_sin[i];
                    for h in qr.chunks_mut(hd) {
                        rope.apply(h, c, s);
                    }
                    for h in kr.chunks_mut(hd) {
                        rope.apply(h, c, s);
                    }
                }
                (qs, ks, vs, *n_heads, *n_kv_heads, hd, hd, o)
            }
            Attention::Mla { q, kv_a, kv_a_norm, kv_b, o, n_heads, kv_lora_rank, nope, rope_dim, v_dim } => {
                let nh = *n_heads;
                let qk = nope + rope_dim;
                let (mut qs, ckv) = rayon::join(
                    || match q {
                        MlaQuery::Direct(l) => l.forward(x, t),
                        MlaQuery::LowRank { a, norm, b } => {
                            let mut qa = a.forward(x, t);
                            kernels::rmsnorm_inplace(&mut qa, norm, eps);
                            b.forward(&qa, t)
                        }
                    },
                    || kv_a.forward(x, t),
                );
                // ckv rows: [kv_lora_rank | rope_dim]
                let r = kv_lora_rank + rope_dim;
                let mut latent = Vec::with_capacity(t * kv_lora_rank);
                let mut k_pe = Vec::with_capacity(t * rope_dim);
                for row in ckv.chunks(r) {
                    latent.extend_from_slice(&row[..*kv_lora_rank]);
                    k_pe.extend_from_slice(&row[*kv_lora_rank..]);
                }
                kernels::rmsnorm_inplace(&mut latent, kv_a_norm, eps);
                let kv = kv_b.forward(&latent, t); // [t × nh × (nope + v)]
                let mut ks = vec![0.0; t * nh * qk];
                let mut vs = vec![0.0; t * nh * v_dim];
                for i in 0..t {
                    let (c, s) = &cos_sin[i];
                    let pe = &mut k_pe[i * rope_dim..(i + 1) * rope_dim];
                    rope.apply(pe, c, s);
                    for h in 0..nh {
                        let src = &kv[(i * nh + h) * (nope + v_dim)..(i * nh + h + 1) * (nope + v_dim)];
                        let kd = &mut ks[(i * nh + h) * qk..(i * nh + h + 1) * qk];
                        kd[..*nope].copy_from_slice(&src[..*nope]);
                        kd[*nope..].copy_from_slice(pe);
                        vs[(i * nh + h) * v_dim..(i * nh + h + 1) * v_dim].copy_from_slice(&src[*nope..]);
                        let qh = &mut qs[(i * nh + h) * qk..(i * nh + h + 1) * qk];
                        rope.apply(&mut qh[*nope..], c, s);
                    }
                }
                (qs, ks, vs, nh, nh, qk, *v_dim, o)
            }
        };
        // Append to the caches.
        let (k_row, v_row) = (n_kv * qd, n_kv * vd);
        for (sp, cache) in spans.iter().zip(caches.iter_mut()) {
            let l = &mut cache.layers[layer];
            l.k.extend_from_slice(&k[sp.offset * k_row..(sp.offset + sp.n) * k_row]);
            l.v.extend_from_slice(&v[sp.offset * v_row..(sp.offset + sp.n) * v_row]);
        }
        // Per-token slots.
        let mut slots = Vec::with_capacity(t);
        for (si, sp) in spans.iter().enumerate() {
            for j in 0..sp.n {
                slots.push(TokenSlot { seq: si, pos: sp.start + j });
            }
        }
        let group = n_heads / n_kv;
        let mut out = vec![0.0; t * n_heads * vd];
        let caches_ro: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
        let work = |(i, orow): (usize, &mut [f32])| {
            let slot = slots[i];
            let l = &caches_ro[slot.seq].layers[layer];
            let n_ctx = slot.pos + 1;
            // Sliding window: the last `w` positions, this one included.
            let first = window.map_or(0, |w| n_ctx.saturating_sub(w));
            let mut scores = vec![0.0f32; n_ctx - first];
            for h in 0..n_heads {
                let kvh = h / group;
                let qh = &q[(i * n_heads + h) * qd..(i * n_heads + h + 1) * qd];
                for (jj, s) in scores.iter_mut().enumerate() {
                    let j = first + jj;
                    let kj = &l.k[j * k_row + kvh * qd..j * k_row + (kvh + 1) * qd];
                    *s = kernels::dot(qh, kj) * scale;
                }
                kernels::softmax_inplace(&mut scores);
                let oh = &mut orow[h * vd..(h + 1) * vd];
                for (jj, &p) in scores.iter().enumerate() {
                    let j = first + jj;
                    kernels::axpy(p, &l.v[j * v_row + kvh * vd..j * v_row + (kvh + 1) * vd], oh);
                }
            }
        };
        if t > 1 {
            out.par_chunks_mut(n_heads * vd).enumerate().for_each(work);
        } else {
            out.chunks_mut(n_heads * vd).enumerate().for_each(work);
        }
        o.forward(&out, t)
    }
}
