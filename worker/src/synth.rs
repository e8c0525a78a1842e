#![forbid(unsafe_code)]
//! Writes synthetic checkpoints (random weights) laid out exactly like published ones:
//! `config.json` + sharded `model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`.
//! Used by `switchyard model bench` and by tests.

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
}

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
}

/// Write the checkpoint into `dir` (created if needed).
pub fn write_checkpoint(dir: &Path, spec: &SynthSpec) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&spec.config())?)?;
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
        for (_, shape, scale) in g {
            let count: usize = shape.iter().product();
            buf.clear();
            buf.reserve(count * esize);
            for _ in 0..count {
                // scale 0 marks norm weights: ones.
                let x = if *scale == 0.0 { 1.0 } else { fill.next() * scale * 1.7 };
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
