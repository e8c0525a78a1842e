#![forbid(unsafe_code)]
//! Writes synthetic checkpoints (random weights) laid out exactly like published ones:
//! `config.json` + sharded `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`.
//! Used by `switchyard model bench` and by tests.
//!
//! With [`SynthSpec::skew`] set, the routing of the checkpoint is skewed and depends on the
//! prompt: tokens fall into [`RoutingSkew::groups`] groups (`token % groups`), and at every MoE
//! layer a token of group `g` is routed mostly to the head of a Zipf ranking of the experts
//! specific to `(g, layer)` ([`SynthSpec::expert_ranking`]). [`skewed_prompts`] draws prompts of
//! one group, so a benchmark can shift its workload from one hot set of experts to another.
//!
//! How: hidden dimensions `0..groups` are reserved as group channels. The embedding of a group-`g`
//! token holds a constant in channel `g` and zero in the other channels; no attention or expert
//! projection reads or writes the channels (their columns / rows are zero), so the residual stream
//! carries the group signal unchanged to every layer. Router row `e` holds, in channel `g`, a
//! logit offset proportional to `-zipf · ln(1 + rank_g(e))` (scaled by `strength`), on top of the
//! random rows that give every token its own noise; `lm_head` favours tokens of the same group, so
//! generated tokens mostly stay in the prompt's group.

use serde_json::json;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Shape of a synthetic Qwen3-MoE or Mixtral checkpoint.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// "qwen3_moe" or "mixtral"
    pub arch: String,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_inter: usize,
    pub vocab: usize,
    pub max_pos: usize,
    /// "BF16" or "F32"
    pub dtype: String,
    /// Number of shard files.
    pub shards: usize,
    pub seed: u64,
    /// Prompt-dependent, skewed routing (see the module docs); `None`: plain random weights
    /// (the bytes written are then exactly those of a spec without the setting).
    pub skew: Option<RoutingSkew>,
}

/// Skewed, token-group dependent routing of a synthetic checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSkew {
    /// Zipf exponent of the expert popularity within a group (e.g. 1.2).
    pub zipf: f64,
    /// How strongly the router follows the token's group: the Zipf log-popularity offset, in
    /// units of the per-token router-logit noise (0: no skew; on `skewed_bench()`, 0.75 puts
    /// ~70% of a layer's assignments on its top-4 of 16 experts, 1.5 ~93%).
    pub strength: f64,
    /// Token groups (`token % groups`), at least 2 and at most `min(hidden / 4, experts)`.
    /// Group `g`'s ranking is the layer's base ranking rotated by `g · experts / groups`, so the
    /// hot sets of different groups are disjoint.
    pub groups: usize,
    /// Where a group's hot experts sit (see [`HotLayout`]).
    pub layout: HotLayout,
}

/// Where the experts a token group favours sit among the expert ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotLayout {
    /// Anywhere: each layer's ranking is a seeded permutation of all experts.
    Scattered,
    /// Together: group g's favourites are the ids of block g (`g·E/G .. (g+1)·E/G`) in a seeded
    /// order per layer, then the other experts. A contiguous placement then puts a phase's hot
    /// experts on few ranks — the straggler an unplanned placement of a real model meets when its
    /// traffic turns to experts that happen to share ranks.
    Clustered,
}

/// Magnitude of a token's group channel, relative to `sqrt(hidden)` (the embedding's norm).
const GROUP_CHANNEL: f32 = 0.5;
/// `lm_head` logit offset for tokens of the hidden state's own group, in units of logit noise.
const LM_GROUP_BIAS: f32 = 8.0;
/// Per-dimension RMS of the uniform `±1.7` init (the residual noise at layer 0).
const INIT_RMS: f32 = 0.98;

impl SynthSpec {
    /// The benchmark shape: hidden 1024, 16 layers, 64 experts top-8, expert FFN 512, vocab 32000, bf16.
    pub fn bench() -> Self {
        SynthSpec {
            arch: "qwen3_moe".into(),
            hidden: 1024,
            layers: 16,
            heads: 16,
            kv_heads: 4,
            head_dim: 64,
            experts: 64,
            top_k: 8,
            expert_inter: 512,
            vocab: 32000,
            max_pos: 4096,
            dtype: "BF16".into(),
            shards: 4,
            seed: 7,
            skew: None,
        }
    }

    /// The larger benchmark shape (GPU runs): hidden 2048, 4 layers, 64 experts top-8, expert
    /// FFN 768, vocab 32000, bf16 — a Qwen3-30B-A3B layer's proportions (with half its experts),
    /// four layers deep so that the checkpoint (2.5 GB) is written in seconds.
    pub fn bench_large() -> Self {
        SynthSpec { hidden: 2048, layers: 4, heads: 32, kv_heads: 4, head_dim: 64, experts: 64, expert_inter: 768, shards: 4, ..Self::bench() }
    }

    /// The scheduler-benchmark shape with skewed, prompt-dependent routing: mixtral, hidden 256,
    /// 4 layers, 16 experts top-2, expert FFN 512, vocab 4096, bf16, 2 token groups (draw phase
    /// prompts with [`skewed_prompts`] for group 0 and 1), each group's hot experts in one block
    /// of ids ([`HotLayout::Clustered`]). Small enough to run on a few CPU cores.
    pub fn skewed_bench() -> Self {
        SynthSpec {
            arch: "mixtral".into(),
            hidden: 256,
            layers: 4,
            heads: 8,
            kv_heads: 4,
            head_dim: 32,
            experts: 16,
            top_k: 2,
            expert_inter: 512,
            vocab: 4096,
            max_pos: 2048,
            dtype: "BF16".into(),
            shards: 2,
            seed: 11,
            skew: Some(RoutingSkew { zipf: 1.2, strength: 0.75, groups: 2, layout: HotLayout::Clustered }),
        }
    }

    /// Token group of `token` (`token % groups`); `None` without skew.
    pub fn token_group(&self, token: u32) -> Option<usize> {
        self.skew.as_ref().map(|s| token as usize % s.groups.max(1))
    }

    /// The designed popularity ranking of the experts of MoE layer `layer` for tokens of `group`
    /// (most popular first); `None` without skew or for a group / layer out of range.
    pub fn expert_ranking(&self, group: usize, layer: usize) -> Option<Vec<usize>> {
        let sk = self.skew.as_ref()?;
        if group >= sk.groups || layer >= self.layers {
            return None;
        }
        let e = self.experts;
        // Base ranking of the layer: a seeded permutation.
        let mut rng = Fill::seeded(self.seed ^ 0x5EED_0F5C_E300_0000, layer as u64);
        let mut shuffle = |v: &mut Vec<usize>| {
            for i in (1..v.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
        };
        match sk.layout {
            HotLayout::Scattered => {
                let mut base: Vec<usize> = (0..e).collect();
                shuffle(&mut base);
                let off = group * e / sk.groups;
                Some((0..e).map(|i| base[(i + off) % e]).collect())
            }
            HotLayout::Clustered => {
                let block = (group * e / sk.groups)..((group + 1) * e / sk.groups);
                let mut hot: Vec<usize> = block.clone().collect();
                let mut rest: Vec<usize> = (0..e).filter(|x| !block.contains(x)).collect();
                shuffle(&mut hot);
                shuffle(&mut rest);
                hot.extend(rest);
                Some(hot)
            }
        }
    }

    fn check_skew(&self, sk: &RoutingSkew) -> std::io::Result<()> {
        let bad = |m: String| Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, m));
        if sk.groups < 2 || sk.groups > self.hidden / 4 || sk.groups > self.experts {
            return bad(format!("skew groups {} must be in 2..=min(hidden/4, experts)", sk.groups));
        }
        if !(sk.zipf.is_finite() && sk.zipf >= 0.0 && sk.strength.is_finite() && sk.strength >= 0.0) {
            return bad(format!("skew zipf {} and strength {} must be finite and >= 0", sk.zipf, sk.strength));
        }
        Ok(())
    }

    /// Overwrite parts of a freshly filled tensor for skewed routing (see the module docs).
    fn apply_skew(&self, sk: &RoutingSkew, name: &str, shape: &[usize], vals: &mut [f32]) {
        let (h, ng) = (self.hidden, sk.groups);
        let a = GROUP_CHANNEL * (h as f32).sqrt();
        // Zero the group channels of the input (columns) of an `[out, h]` projection.
        let zero_cols = |vals: &mut [f32]| {
            for row in vals.chunks_mut(h) {
                row[..ng].iter_mut().for_each(|v| *v = 0.0);
            }
        };
        if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
            let lm = name == "lm_head.weight";
            for (t, row) in vals.chunks_mut(h).enumerate() {
                let g = t % ng;
                for (d, v) in row[..ng].iter_mut().enumerate() {
                    *v = if d != g {
                        0.0
                    } else if lm {
                        LM_GROUP_BIAS * INIT_RMS * depth_gain(self.layers) / a
                    } else {
                        a
                    };
                }
            }
            return;
        }
        let Some(rest) = name.strip_prefix("model.layers.") else { return };
        let Some((layer, suffix)) = rest.split_once('.') else { return };
        let Ok(layer) = layer.parse::<usize>() else { return };
        let reads = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"];
        if reads.contains(&suffix) {
            zero_cols(vals);
        } else if suffix == "self_attn.o_proj.weight" {
            // `[h, in]`: the rows writing the group channels.
            let inn = shape[1];
            vals[..ng * inn].iter_mut().for_each(|v| *v = 0.0);
        } else if suffix.ends_with(".gate.weight") {
            let e = self.experts;
            let scale = sk.strength as f32 * INIT_RMS * depth_gain(layer) / a;
            // Centred log-Zipf popularity of rank r.
            let bias: Vec<f32> = (0..e).map(|r| -(sk.zipf * ((r + 1) as f64).ln()) as f32).collect();
            let mean = bias.iter().sum::<f32>() / e as f32;
            for g in 0..ng {
                let Some(rank) = self.expert_ranking(g, layer) else { continue };
                for (r, &x) in rank.iter().enumerate() {
                    vals[x * h + g] = (bias[r] - mean) * scale;
                }
            }
        } else if suffix.contains(".experts.") {
            let part = suffix.rsplit('.').nth(1).unwrap_or("");
            match part {
                "w1" | "w3" | "gate_proj" | "up_proj" => zero_cols(vals),
                "w2" | "down_proj" => {
                    let inn = shape[1];
                    vals[..ng * inn].iter_mut().for_each(|v| *v = 0.0);
                }
                _ => {}
            }
        }
    }

    /// A tiny shape for smoke tests.
    pub fn tiny() -> Self {
        SynthSpec {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            experts: 8,
            top_k: 2,
            expert_inter: 32,
            vocab: 128,
            max_pos: 256,
            shards: 2,
            ..Self::bench()
        }
    }

    fn config(&self) -> serde_json::Value {
        let mixtral = self.arch == "mixtral";
        let mut c = json!({
            "architectures": [if mixtral { "MixtralForCausalLM" } else { "Qwen3MoeForCausalLM" }],
            "model_type": self.arch,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_pos,
            "num_experts_per_tok": self.top_k,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "torch_dtype": if self.dtype == "BF16" { "bfloat16" } else { "float32" },
            "bos_token_id": 1,
            "eos_token_id": 2,
            "attention_bias": false,
        });
        if mixtral {
            c["num_local_experts"] = json!(self.experts);
            c["intermediate_size"] = json!(self.expert_inter);
        } else {
            c["num_experts"] = json!(self.experts);
            c["moe_intermediate_size"] = json!(self.expert_inter);
            c["intermediate_size"] = json!(self.expert_inter * 4);
            c["norm_topk_prob"] = json!(true);
            c["decoder_sparse_step"] = json!(1);
            c["mlp_only_layers"] = json!([]);
        }
        c
    }

    /// (name, shape, init scale) of every tensor, in file order.
    fn tensors(&self) -> Vec<(String, Vec<usize>, f32)> {
        let (h, hd) = (self.hidden, self.head_dim);
        let mixtral = self.arch == "mixtral";
        let s_in = 1.0 / (h as f32).sqrt();
        let s_inter = 1.0 / (self.expert_inter as f32).sqrt();
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h], 1.0)];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.input_layernorm.weight"), vec![h], 0.0));
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h], 0.0));
            v.push((format!("{p}.self_attn.q_proj.weight"), vec![self.heads * hd, h], s_in));
            v.push((format!("{p}.self_attn.k_proj.weight"), vec![self.kv_heads * hd, h], s_in));
            v.push((format!("{p}.self_attn.v_proj.weight"), vec![self.kv_heads * hd, h], s_in));
            v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, self.heads * hd], 1.0 / ((self.heads * hd) as f32).sqrt()));
            if !mixtral {
                v.push((format!("{p}.self_attn.q_norm.weight"), vec![hd], 0.0));
                v.push((format!("{p}.self_attn.k_norm.weight"), vec![hd], 0.0));
            }
            let mp = if mixtral { format!("{p}.block_sparse_moe") } else { format!("{p}.mlp") };
            v.push((format!("{mp}.gate.weight"), vec![self.experts, h], s_in));
            let (g, u, d) = if mixtral { ("w1", "w3", "w2") } else { ("gate_proj", "up_proj", "down_proj") };
            for e in 0..self.experts {
                v.push((format!("{mp}.experts.{e}.{g}.weight"), vec![self.expert_inter, h], s_in));
                v.push((format!("{mp}.experts.{e}.{u}.weight"), vec![self.expert_inter, h], s_in));
                v.push((format!("{mp}.experts.{e}.{d}.weight"), vec![h, self.expert_inter], s_inter));
            }
        }
        v.push(("model.norm.weight".to_string(), vec![h], 0.0));
        v.push(("lm_head.weight".to_string(), vec![self.vocab, h], s_in));
        v
    }
}

/// xorshift64* — fast deterministic filler.
struct Fill(u64);
impl Fill {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    /// A generator for stream `stream` of `seed` (splitmix64-mixed, never zero).
    fn seeded(seed: u64, stream: u64) -> Fill {
        let mut z = seed.wrapping_add(stream.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Fill((z ^ (z >> 31)) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Estimated growth of the residual stream's per-dimension RMS (outside the group channels)
/// before decoder layer `layer`, relative to the embedding: each layer adds attention and expert
/// outputs of roughly unit RMS. Scales the group offsets so the skew holds at every depth.
fn depth_gain(layer: usize) -> f32 {
    // Measured on `skewed_bench()`: with this the top-4 share stays flat across the layers.
    (1.0 + 0.25 * layer as f32).sqrt()
}

/// `n` prompts of `len` tokens drawn (deterministically from `seed`) from token group `group` of
/// a skewed spec ([`SynthSpec::token_group`]); ids 0..3 (special tokens) are never drawn.
///
/// # Panics
/// If `spec.skew` is `None`, `group` is out of range, or the vocabulary has no token of the group.
pub fn skewed_prompts(spec: &SynthSpec, group: usize, n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let sk = spec.skew.as_ref().expect("skewed_prompts needs a spec with skew");
    let ng = sk.groups;
    assert!(group < ng, "group {group} out of range ({ng} groups)");
    // Tokens of the group: group + ng·j, j in j0..j1.
    let j0 = (3usize.saturating_sub(group)).div_ceil(ng);
    let j1 = spec.vocab.saturating_sub(group).div_ceil(ng);
    assert!(j1 > j0, "vocabulary {} has no token of group {group}", spec.vocab);
    let mut rng = Fill::seeded(seed ^ 0xA5A5_5A5A_0F0F_F0F0, group as u64);
    (0..n)
        .map(|_| (0..len).map(|_| (group + ng * (j0 + (rng.next_u64() % (j1 - j0) as u64) as usize)) as u32).collect())
        .collect()
}

/// A generated tokenizer ([`crate::synth_tokenizer`]) for `spec`'s vocabulary, unless it is too
/// small for byte-level BPE (the tiny smoke-test shapes) or `dir` already has one.
pub fn write_tokenizer_if_room(dir: &Path, spec: &SynthSpec) -> std::io::Result<()> {
    if spec.vocab < crate::synth_tokenizer::MIN_VOCAB || dir.join("tokenizer.json").exists() {
        return Ok(());
    }
    crate::synth_tokenizer::write_tokenizer(dir, spec.vocab, spec.max_pos)
}

/// Write the checkpoint into `dir` (created if needed), with a tokenizer where the vocabulary
/// has room for one.
pub fn write_checkpoint(dir: &Path, spec: &SynthSpec) -> std::io::Result<()> {
    if let Some(sk) = &spec.skew {
        spec.check_skew(sk)?;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&spec.config())?)?;
    write_tokenizer_if_room(dir, spec)?;
    let tensors = spec.tensors();
    let esize = if spec.dtype == "BF16" { 2 } else { 4 };
    let total: usize = tensors.iter().map(|(_, s, _)| s.iter().product::<usize>() * esize).sum();
    let shards = spec.shards.max(1);
    let per_shard = total.div_ceil(shards);
    // Split tensors into shards by size.
    let mut groups: Vec<Vec<&(String, Vec<usize>, f32)>> = vec![vec![]];
    let mut acc = 0;
    for t in &tensors {
        let b = t.1.iter().product::<usize>() * esize;
        if acc + b > per_shard && !groups.last().is_some_and(|g| g.is_empty()) && groups.len() < shards {
            groups.push(vec![]);
            acc = 0;
        }
        acc += b;
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
    }
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    let mut fill = Fill(spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    for (i, g) in groups.iter().enumerate() {
        let fname = if n == 1 { "model.safetensors".to_string() } else { format!("model-{:05}-of-{:05}.safetensors", i + 1, n) };
        let mut header = serde_json::Map::new();
        let mut off = 0usize;
        for (name, shape, _) in g {
            let b = shape.iter().product::<usize>() * esize;
            header.insert(name.clone(), json!({"dtype": spec.dtype, "shape": shape, "data_offsets": [off, off + b]}));
            off += b;
            weight_map.insert(name.clone(), fname.clone());
        }
        let mut hs = serde_json::to_string(&serde_json::Value::Object(header))?;
        while hs.len() % 8 != 0 {
            hs.push(' ');
        }
        let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(dir.join(&fname))?);
        w.write_all(&(hs.len() as u64).to_le_bytes())?;
        w.write_all(hs.as_bytes())?;
        let mut buf: Vec<u8> = Vec::new();
        let mut vals: Vec<f32> = Vec::new();
        for (name, shape, scale) in g {
            let count: usize = shape.iter().product();
            // scale 0 marks norm weights: ones.
            vals.clear();
            vals.extend((0..count).map(|_| if *scale == 0.0 { 1.0 } else { fill.next() * scale * 1.7 }));
            if let Some(sk) = &spec.skew {
                spec.apply_skew(sk, name, shape, &mut vals);
            }
            buf.clear();
            buf.reserve(count * esize);
            for &x in &vals {
                if esize == 2 {
                    buf.extend_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes());
                } else {
                    buf.extend_from_slice(&x.to_le_bytes());
                }
            }
            w.write_all(&buf)?;
        }
        w.flush()?;
    }
    if n > 1 {
        let idx = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&idx)?)?;
    }
    Ok(())
}
