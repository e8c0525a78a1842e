#![forbid(unsafe_code)]
//! One model structure for every supported architecture: loading from a checkpoint and the
//! batched forward pass (many sequences of different lengths in one step).

use crate::attention::{Attention, KvCache, MlaQuery, SeqSpan};
use crate::checkpoint::Checkpoint;
use crate::config::{Arch, AttnConfig, FfnKind, ModelConfig, QkNorm};
use crate::error::{ModelError, Result};
use crate::kernels::{self, DenseWeight, Linear, Rope};
use crate::moe::{ExpertExecutor, ExpertFfn, LocalExperts, MoeLayer, Router, Routing, SharedExpert};
use rayon::prelude::*;
use std::path::Path;

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Routed experts to load, per MoE layer (indexed like [`ModelConfig::moe_layers`]).
    /// `None`: all experts. Experts not listed are never read from the checkpoint.
    pub experts: Option<Vec<Vec<usize>>>,
}

/// The feed-forward part of a decoder layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(ExpertFfn),
    Moe(MoeLayer),
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub input_norm: Vec<f32>,
    pub post_norm: Vec<f32>,
    pub attn: Attention,
    pub ffn: Ffn,
}

/// A loaded model (dense parts plus the routed experts of this rank).
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    /// `[vocab, hidden]`, bf16 when the checkpoint's values are.
    pub embed: DenseWeight,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None` when tied to the embeddings.
    pub lm_head: Option<DenseWeight>,
    pub rope: Rope,
    pub attn_scale: f32,
}

/// One sequence's part of a batched forward.
pub struct SeqInput<'a> {
    /// New tokens (appended after what `cache` holds).
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Which logits to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Only the last new token of each sequence (generation).
    Last,
    /// Every new token.
    All,
}

/// Result of a forward pass.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// Per sequence: `[rows × vocab]` (rows = 1 for `Last`, the new tokens for `All`).
    pub logits: Vec<Vec<f32>>,
    /// Routing decisions per MoE layer, tokens in batch order (sequence after sequence).
    pub routing: Vec<Routing>,
}

struct Loader<'a> {
    ck: &'a Checkpoint,
}

impl Loader<'_> {
    fn t(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.ck.load(name, shape)
    }
    fn linear(&self, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
        let weight = self.t(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias { Some(self.t(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        Ok(Linear::new(weight, bias, in_dim, out_dim))
    }
    /// A SwiGLU block from three separate projections.
    fn ffn(&self, gate: &str, up: &str, down: &str, hidden: usize, inter: usize) -> Result<ExpertFfn> {
        let mut gate_up = self.t(gate, &[inter, hidden])?;
        gate_up.extend(self.t(up, &[inter, hidden])?);
        let down = self.t(down, &[hidden, inter])?;
        Ok(ExpertFfn::from_rows(&gate_up, &down, hidden, inter))
    }
}

impl Model {
    /// Load `dir` (config.json + safetensors).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Model> {
        let config = ModelConfig::from_dir(dir)?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &ck, opts)
    }

    pub fn from_checkpoint(config: ModelConfig, ck: &Checkpoint, opts: &LoadOptions) -> Result<Model> {
        let _transients_go_back = kernels::LoadAllocScope::enter();
        let c = &config;
        let ld = Loader { ck };
        let h = c.hidden_size;
        let moe_layers = c.moe_layers();
        if let Some(sel) = &opts.experts {
            if sel.len() != moe_layers.len() {
                return Err(ModelError::ExpertSubset(format!(
                    "{} entries given for {} MoE layers",
                    sel.len(),
                    moe_layers.len()
                )));
            }
            for (l, s) in sel.iter().enumerate() {
                if let Some(&e) = s.iter().find(|&&e| e >= c.router.n_experts) {
                    return Err(ModelError::ExpertSubset(format!(
                        "MoE layer {l}: expert {e} out of range ({} experts)",
                        c.router.n_experts
                    )));
                }
            }
        }
        let embed = DenseWeight::new(ld.t("model.embed_tokens.weight", &[c.vocab_size, h])?, c.vocab_size, h);
        let lm_head = if c.tie_word_embeddings && !ck.contains("lm_head.weight") {
            None
        } else {
            Some(DenseWeight::new(ld.t("lm_head.weight", &[c.vocab_size, h])?, c.vocab_size, h))
        };
        let norm = ld.t("model.norm.weight", &[h])?;
        // MoE layer index of every decoder layer.
        let mut moe_of = vec![None; c.n_layers];
        for (i, &l) in moe_layers.iter().enumerate() {
            moe_of[l] = Some(i);
        }
        // Layers are read and converted in parallel.
        let layers: Vec<Layer> = (0..c.n_layers)
            .into_par_iter()
            .map(|li| -> Result<Layer> {
                let p = format!("model.layers.{li}");
                let attn = Self::load_attention(&ld, c, &p)?;
                let ffn = match (c.layer_kinds[li], moe_of[li]) {
                    (FfnKind::Moe, Some(moe_i)) => {
                        let sel = opts.experts.as_ref().map(|s| &s[moe_i]);
                        Ffn::Moe(Self::load_moe(&ld, c, &p, moe_i, sel)?)
                    }
                    _ => Ffn::Dense(ld.ffn(
                        &format!("{p}.mlp.gate_proj.weight"),
                        &format!("{p}.mlp.up_proj.weight"),
                        &format!("{p}.mlp.down_proj.weight"),
                        h,
                        c.intermediate_size,
                    )?),
                };
                Ok(Layer {
                    input_norm: ld.t(&format!("{p}.input_layernorm.weight"), &[h])?,
                    post_norm: ld.t(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    attn,
                    ffn,
                })
            })
            .collect::<Result<Vec<Layer>>>()?;
        // Everything the model holds is copied out of the map: let its pages go.
        ck.release_pages();
        // Decode streams the weights: on 2 MiB pages, fewer TLB misses and prefetcher restarts.
        let huge = kernels::collapse_resident_memory();
        tracing::debug!(collapsed_mib = huge.collapsed_bytes >> 20, refused_blocks = huge.refused_blocks, skipped = huge.skipped, "weights on huge pages");
        Ok(Model {
            rope: c.rope_tables(),
            attn_scale: c.attention_scale(),
            config,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    fn load_attention(ld: &Loader, c: &ModelConfig, p: &str) -> Result<Attention> {
        let h = c.hidden_size;
        Ok(match &c.attn {
            AttnConfig::Standard { n_heads, n_kv_heads, head_dim, qkv_bias, o_bias, qk_norm, clip_qkv } => {
                let (nh, nkv, hd) = (*n_heads, *n_kv_heads, *head_dim);
                let (q_norm, k_norm) = match qk_norm {
                    QkNorm::None => (None, None),
                    QkNorm::PerHead => (
                        Some(ld.t(&format!("{p}.self_attn.q_norm.weight"), &[hd])?),
                        Some(ld.t(&format!("{p}.self_attn.k_norm.weight"), &[hd])?),
                    ),
                    QkNorm::Full => (
                        Some(ld.t(&format!("{p}.self_attn.q_norm.weight"), &[nh * hd])?),
                        Some(ld.t(&format!("{p}.self_attn.k_norm.weight"), &[nkv * hd])?),
                    ),
                };
                Attention::Standard {
                    q: ld.linear(&format!("{p}.self_attn.q_proj"), nh * hd, h, *qkv_bias)?,
                    k: ld.linear(&format!("{p}.self_attn.k_proj"), nkv * hd, h, *qkv_bias)?,
                    v: ld.linear(&format!("{p}.self_attn.v_proj"), nkv * hd, h, *qkv_bias)?,
                    o: ld.linear(&format!("{p}.self_attn.o_proj"), h, nh * hd, *o_bias)?,
                    qk_norm: *qk_norm,
                    q_norm,
                    k_norm,
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: hd,
                    clip_qkv: *clip_qkv,
                }
            }
            AttnConfig::Mla { n_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, bias } => {
                let nh = *n_heads;
                let qk = qk_nope_head_dim + qk_rope_head_dim;
                let q = match q_lora_rank {
                    None => MlaQuery::Direct(ld.linear(&format!("{p}.self_attn.q_proj"), nh * qk, h, false)?),
                    Some(r) => MlaQuery::LowRank {
                        a: ld.linear(&format!("{p}.self_attn.q_a_proj"), *r, h, *bias)?,
                        norm: ld.t(&format!("{p}.self_attn.q_a_layernorm.weight"), &[*r])?,
                        b: ld.linear(&format!("{p}.self_attn.q_b_proj"), nh * qk, *r, false)?,
                    },
                };
                Attention::Mla {
                    q,
                    kv_a: ld.linear(&format!("{p}.self_attn.kv_a_proj_with_mqa"), kv_lora_rank + qk_rope_head_dim, h, *bias)?,
                    kv_a_norm: ld.t(&format!("{p}.self_attn.kv_a_layernorm.weight"), &[*kv_lora_rank])?,
                    kv_b: ld.linear(
                        &format!("{p}.self_attn.kv_b_proj"),
                        nh * (qk_nope_head_dim + v_head_dim),
                        *kv_lora_rank,
                        false,
                    )?,
                    o: ld.linear(&format!("{p}.self_attn.o_proj"), h, nh * v_head_dim, *bias)?,
                    n_heads: nh,
                    kv_lora_rank: *kv_lora_rank,
                    nope: *qk_nope_head_dim,
                    rope_dim: *qk_rope_head_dim,
                    v_dim: *v_head_dim,
                }
            }
        })
    }

    fn load_moe(ld: &Loader, c: &ModelConfig, p: &str, moe_index: usize, sel: Option<&Vec<usize>>) -> Result<MoeLayer> {
        let h = c.hidden_size;
        let e = c.router.n_experts;
        let mp = Self::moe_prefix(c, p);
        let router = Router {
            weight: ld.t(&format!("{mp}.gate.weight"), &[e, h])?,
            correction_bias: if c.router.correction_bias {
                Some(ld.t(&format!("{mp}.gate.e_score_correction_bias"), &[e])?)
            } else {
                None
            },
            cfg: c.router.clone(),
            hidden: h,
        };
        let mut wanted = vec![sel.is_none(); e];
        if let Some(s) = sel {
            for &x in s {
                wanted[x] = true;
            }
        }
        let mut experts = Vec::with_capacity(e);
        for (x, want) in wanted.iter().enumerate() {
            experts.push(if *want { Some(Self::load_expert(ld, c, &mp, x)?) } else { None });
        }
        let shared = match &c.shared_expert {
            None => None,
            Some(sc) => {
                let sp = if c.arch == Arch::Qwen2Moe { format!("{mp}.shared_expert") } else { format!("{mp}.shared_experts") };
                let ffn = ld.ffn(
                    &format!("{sp}.gate_proj.weight"),
                    &format!("{sp}.up_proj.weight"),
                    &format!("{sp}.down_proj.weight"),
                    h,
                    sc.intermediate,
                )?;
                let gate =
                    if sc.sigmoid_gate { Some(ld.t(&format!("{mp}.shared_expert_gate.weight"), &[1, h])?) } else { None };
                Some(SharedExpert { ffn, gate })
            }
        };
        Ok(MoeLayer { moe_index, router, experts, shared, hidden: h })
    }

    /// The tensor prefix of decoder layer `p`'s MoE block.
    fn moe_prefix(c: &ModelConfig, p: &str) -> String {
        if c.arch == Arch::Mixtral { format!("{p}.block_sparse_moe") } else { format!("{p}.mlp") }
    }

    /// Routed expert `x` of the MoE block at tensor prefix `mp`.
    fn load_expert(ld: &Loader, c: &ModelConfig, mp: &str, x: usize) -> Result<ExpertFfn> {
        let (h, e, inter) = (c.hidden_size, c.router.n_experts, c.moe_intermediate_size);
        let (g, u, d) = if c.arch == Arch::Mixtral { ("w1", "w3", "w2") } else { ("gate_proj", "up_proj", "down_proj") };
        let fused_gu = format!("{mp}.experts.gate_up_proj");
        let fused_d = format!("{mp}.experts.down_proj");
        let per_expert = ld.ck.contains(&format!("{mp}.experts.0.{g}.weight")) || !ld.ck.contains(&fused_gu);
        if per_expert {
            ld.ffn(
                &format!("{mp}.experts.{x}.{g}.weight"),
                &format!("{mp}.experts.{x}.{u}.weight"),
                &format!("{mp}.experts.{x}.{d}.weight"),
                h,
                inter,
            )
        } else {
            // transformers 5 fused layout: gate_up_proj [E, 2I, H], down_proj [E, H, I].
            Ok(ExpertFfn::from_rows(&ld.ck.load_slice(&fused_gu, &[e, 2 * inter, h], x)?, &ld.ck.load_slice(&fused_d, &[e, h, inter], x)?, h, inter))
        }
    }

    /// Bytes one routed expert of the checkpoint in `dir` holds once loaded (packed panels, bf16
    /// or f32 as [`kernels::PackedWeight`] keeps them): what one migration move loads. Loads
    /// expert 0 of the first MoE layer to ask, so it is the loader's own answer.
    pub fn routed_expert_bytes(dir: &Path) -> Result<u64> {
        let layers = ModelConfig::from_dir(dir)?.moe_layers().len();
        let wanted: Vec<Vec<usize>> = (0..layers).map(|l| if l == 0 { vec![0] } else { vec![] }).collect();
        let loaded = Self::load_routed_experts(dir, &wanted, || {})?;
        Ok(loaded.first().and_then(|l| l.first()).map_or(0, |(_, e)| e.bytes() as u64))
    }

    /// Load only the routed experts `wanted[moe_layer]` of the checkpoint in `dir` (a placement
    /// change loads the slots a rank gains beside the ones it keeps; nothing else is read).
    /// Returns `(expert, weights)` per MoE layer, in the order asked. Runs on the calling thread
    /// only: it loads beside serving, whose steps must not wait behind it on the rayon pool.
    /// `after_each` runs after every expert (e.g. to account the loader's CPU time as it goes).
    pub fn load_routed_experts(dir: &Path, wanted: &[Vec<usize>], mut after_each: impl FnMut()) -> Result<Vec<Vec<(usize, ExpertFfn)>>> {
        kernels::init();
        let c = ModelConfig::from_dir(dir)?;
        let moe_layers = c.moe_layers();
        if wanted.len() != moe_layers.len() {
            return Err(ModelError::ExpertSubset(format!("{} entries given for {} MoE layers", wanted.len(), moe_layers.len())));
        }
        let ck = Checkpoint::open(dir)?;
        let ld = Loader { ck: &ck };
        wanted
            .iter()
            .enumerate()
            .map(|(moe_i, es)| {
                let mp = Self::moe_prefix(&c, &format!("model.layers.{}", moe_layers[moe_i]));
                es.iter()
                    .map(|&x| {
                        if x >= c.router.n_experts {
                            return Err(ModelError::ExpertSubset(format!(
                                "MoE layer {moe_i}: expert {x} out of range ({} experts)",
                                c.router.n_experts
                            )));
                        }
                        let w = Self::load_expert(&ld, &c, &mp, x)?;
                        after_each();
                        Ok((x, w))
                    })
                    .collect()
            })
            .collect()
    }

    /// Move the routed experts out of the model (`[moe_layer][expert]`, `None` where not loaded),
    /// for an executor that owns and swaps its slots itself.
    pub fn take_routed_experts(&mut self) -> Vec<Vec<Option<ExpertFfn>>> {
        self.layers
            .iter_mut()
            .filter_map(|l| match &mut l.ffn {
                Ffn::Moe(m) => Some(m.experts.iter_mut().map(Option::take).collect()),
                Ffn::Dense(_) => None,
            })
            .collect()
    }

    /// A fresh, empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        let (kvh, kd, vd) = self.config.attn.kv_layout();
        KvCache::new(self.config.n_layers, kvh, kd, vd)
    }

    /// The MoE layers (in order).
    pub fn moe_layers(&self) -> impl Iterator<Item = &MoeLayer> {
        self.layers.iter().filter_map(|l| match &l.ffn {
            Ffn::Moe(m) => Some(m),
            Ffn::Dense(_) => None,
        })
    }

    /// Check new tokens for a sequence whose cache holds `cached` tokens.
    pub fn validate(&self, tokens: &[u32], cached: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let v = self.config.vocab_size;
        if let Some((i, &tok)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= v) {
            return Err(ModelError::TokenOutOfRange { token: tok, position: cached + i, vocab_size: v });
        }
        let max = self.config.max_position_embeddings;
        if cached + tokens.len() > max {
            return Err(ModelError::PromptTooLong { len: cached + tokens.len(), max });
        }
        Ok(())
    }

    /// Forward with the routed experts run in this process.
    pub fn forward(&self, seqs: &mut [SeqInput], mode: LogitsMode) -> Result<ForwardOutput> {
        self.forward_with(seqs, mode, &LocalExperts)
    }

    /// One forward step through `exec`: the executor's own forward where it runs one (tokens that
    /// leave their rank between layers), else [`Model::forward_with`].
    pub fn forward_step(&self, seqs: &mut [SeqInput], mode: LogitsMode, exec: &dyn ExpertExecutor) -> Result<ForwardOutput> {
        match exec.forward_step(self, seqs, mode) {
            Some(out) => out,
            None => self.forward_with(seqs, mode, exec),
        }
    }

    /// One forward over the concatenation of every sequence's new tokens; attention is per
    /// sequence (against its own cache), the rest runs on the whole batch. Appends to the caches.
    pub fn forward_with(&self, seqs: &mut [SeqInput], mode: LogitsMode, exec: &dyn ExpertExecutor) -> Result<ForwardOutput> {
        let c = &self.config;
        let h = c.hidden_size;
        let mut spans = Vec::with_capacity(seqs.len());
        let mut tokens: Vec<u32> = Vec::new();
        for s in seqs.iter() {
            self.validate(s.tokens, s.cache.len())?;
            spans.push(SeqSpan { offset: tokens.len(), n: s.tokens.len(), start: s.cache.len() });
            tokens.extend_from_slice(s.tokens);
        }
        let t = tokens.len();
        let mut x = Vec::with_capacity(t * h);
        for &tok in &tokens {
            self.embed.push_row(tok as usize, &mut x);
        }
        let mut cos_sin = Vec::with_capacity(t);
        for sp in &spans {
            for j in 0..sp.n {
                cos_sin.push(self.rope.cos_sin(sp.start + j));
            }
        }
        let mut caches: Vec<&mut KvCache> = seqs.iter_mut().map(|s| &mut *s.cache).collect();
        let mut routing = Vec::new();
        let result: Result<()> = (|| {
            for (li, layer) in self.layers.iter().enumerate() {
                let xn = kernels::rmsnorm(&x, &layer.input_norm, c.rms_norm_eps);
                let a = layer.attn.forward(
                    li,
                    &xn,
                    t,
                    &spans,
                    &mut caches,
                    &self.rope,
                    &cos_sin,
                    c.rms_norm_eps,
                    self.attn_scale,
                    c.sliding_windows[li],
                );
                for (xv, av) in x.iter_mut().zip(&a) {
                    *xv += av;
                }
                let xn = kernels::rmsnorm(&x, &layer.post_norm, c.rms_norm_eps);
                let f = match &layer.ffn {
                    Ffn::Dense(m) => m.forward(&xn, t),
                    Ffn::Moe(m) => {
                        let (y, r) = m.forward(&xn, t, exec)?;
                        routing.push(r);
                        y
                    }
                };
                for (xv, fv) in x.iter_mut().zip(&f) {
                    *xv += fv;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Roll the caches back so a failed step leaves no half-written state.
            for (sp, cache) in spans.iter().zip(caches.iter_mut()) {
                for l in cache.layers.iter_mut() {
                    let (kvh, kd, vd) = c.attn.kv_layout();
                    l.k.truncate(sp.start * kvh * kd);
                    l.v.truncate(sp.start * kvh * vd);
                }
            }
            return Err(e);
        }
        for (sp, cache) in spans.iter().zip(caches.iter_mut()) {
            cache.set_len(sp.start + sp.n);
        }
        Ok(ForwardOutput { logits: self.head(&x, &spans, mode), routing })
    }

    /// Final norm and lm head over the last hidden states `x` of a batch made of `spans`: per
    /// sequence `[rows × vocab]` (the last token, or every token).
    pub(crate) fn head(&self, x: &[f32], spans: &[SeqSpan], mode: LogitsMode) -> Vec<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden_size;
        let t = x.len() / h.max(1);
        // Only the rows asked for.
        let rows: Vec<usize> = match mode {
            LogitsMode::Last => spans.iter().map(|s| s.offset + s.n - 1).collect(),
            LogitsMode::All => (0..t).collect(),
        };
        let mut sel = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            sel.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        kernels::rmsnorm_inplace(&mut sel, &self.norm, c.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let v = c.vocab_size;
        let mut logits = vec![0.0; rows.len() * v];
        head.matmul(&sel, rows.len(), &mut logits, true);
        let mut per_seq = Vec::with_capacity(spans.len());
        match mode {
            LogitsMode::Last => {
                for i in 0..spans.len() {
                    per_seq.push(logits[i * v..(i + 1) * v].to_vec());
                }
            }
            LogitsMode::All => {
                for sp in spans {
                    per_seq.push(logits[sp.offset * v..(sp.offset + sp.n) * v].to_vec());
                }
            }
        }
        per_seq
    }

    /// Bytes of weights one decode step of a single sequence reads: every weight it multiplies
    /// (attention, router, shared experts, dense FFNs, the lm head) plus `top_k` routed experts of
    /// every MoE layer (their mean size), and one embedding row. The floor of batch-1 decode time
    /// is this over the machine's memory bandwidth.
    pub fn decode_step_bytes(&self) -> usize {
        // An untied embedding is read one row a token; a tied one is the lm head, read whole.
        let embed_unread = match self.lm_head {
            Some(_) => self.embed.bytes() - self.embed.bytes() / self.config.vocab_size.max(1),
            None => 0,
        };
        let routed_unread: usize = self
            .layers
            .iter()
            .map(|l| match &l.ffn {
                Ffn::Moe(m) => {
                    let held: Vec<usize> = m.experts.iter().flatten().map(|e| e.bytes()).collect();
                    let mean = held.iter().sum::<usize>() / held.len().max(1);
                    held.iter().sum::<usize>() - mean * self.config.router.top_k.min(held.len())
                }
                Ffn::Dense(_) => 0,
            })
            .sum();
        self.weight_bytes() - embed_unread - routed_unread
    }

    /// Bytes of weights held (as stored: bf16 panels count 2 bytes a value).
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Linear| l.bytes();
        let mut b = self.embed.bytes() + self.norm.len() * 4 + self.lm_head.as_ref().map_or(0, DenseWeight::bytes);
        for l in &self.layers {
            b += (l.input_norm.len() + l.post_norm.len()) * 4;
            b += match &l.attn {
                Attention::Standard { q, k, v, o, .. } => lin(q) + lin(k) + lin(v) + lin(o),
                Attention::Mla { q, kv_a, kv_b, o, .. } => {
                    let qb = match q {
                        MlaQuery::Direct(l) => lin(l),
                        MlaQuery::LowRank { a, b, .. } => lin(a) + lin(b),
                    };
                    qb + lin(kv_a) + lin(kv_b) + lin(o)
                }
            };
            b += match &l.ffn {
                Ffn::Dense(f) => f.bytes(),
                Ffn::Moe(m) => {
                    m.experts.iter().flatten().map(|e| e.bytes()).sum::<usize>()
                        + m.shared.as_ref().map_or(0, |s| s.ffn.bytes())
                        + m.router.weight.len() * 4
                }
            };
        }
        b
    }
}
