#![forbid(unsafe_code)]
//! `config.json` of a Hugging Face MoE checkpoint, read into one model description.
//!
//! Key names of published checkpoints (transformers 4.x: top-level `rope_theta`, `rope_scaling`,
//! Qwen3-MoE `num_experts`) and of transformers 5 (`rope_parameters`, `num_local_experts`) are
//! both accepted.

use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

/// The supported architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    DeepseekV2,
    DeepseekV3,
    Olmoe,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Mixtral => "mixtral",
            Arch::Qwen2Moe => "qwen2_moe",
            Arch::Qwen3Moe => "qwen3_moe",
            Arch::DeepseekV2 => "deepseek_v2",
            Arch::DeepseekV3 => "deepseek_v3",
            Arch::Olmoe => "olmoe",
        }
    }

    fn from_model_type(t: &str) -> Option<Arch> {
        Some(match t {
            "mixtral" => Arch::Mixtral,
            "qwen2_moe" => Arch::Qwen2Moe,
            "qwen3_moe" => Arch::Qwen3Moe,
            "deepseek_v2" => Arch::DeepseekV2,
            "deepseek_v3" => Arch::DeepseekV3,
            "olmoe" => Arch::Olmoe,
            _ => return None,
        })
    }

    fn from_class(c: &str) -> Option<Arch> {
        Some(match c {
            "MixtralForCausalLM" => Arch::Mixtral,
            "Qwen2MoeForCausalLM" => Arch::Qwen2Moe,
            "Qwen3MoeForCausalLM" => Arch::Qwen3Moe,
            "DeepseekV2ForCausalLM" => Arch::DeepseekV2,
            "DeepseekV3ForCausalLM" => Arch::DeepseekV3,
            "OlmoeForCausalLM" => Arch::Olmoe,
            _ => return None,
        })
    }
}

/// How per-head query/key normalisation is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head (`head_dim`), Qwen3-MoE.
    PerHead,
    /// RMSNorm over the whole projection (`heads × head_dim`), OLMoE.
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttnConfig {
    /// Multi-head / grouped-query attention.
    Standard {
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: QkNorm,
        clip_qkv: Option<f32>,
    },
    /// DeepSeek multi-head latent attention.
    Mla {
        n_heads: usize,
        q_lora_rank: Option<usize>,
        kv_lora_rank: usize,
        qk_nope_head_dim: usize,
        qk_rope_head_dim: usize,
        v_head_dim: usize,
        /// `attention_bias`: bias on q_a_proj, kv_a_proj_with_mqa, o_proj.
        bias: bool,
    },
}

impl AttnConfig {
    pub fn n_heads(&self) -> usize {
        match self {
            AttnConfig::Standard { n_heads, .. } | AttnConfig::Mla { n_heads, .. } => *n_heads,
        }
    }
    /// (heads in the KV cache, key dim per head, value dim per head)
    pub fn kv_layout(&self) -> (usize, usize, usize) {
        match self {
            AttnConfig::Standard { n_kv_heads, head_dim, .. } => (*n_kv_heads, *head_dim, *head_dim),
            AttnConfig::Mla { n_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, .. } => {
                (*n_heads, qk_nope_head_dim + qk_rope_head_dim, *v_head_dim)
            }
        }
    }
}

/// Expert scoring function of the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

/// Group-limited top-k: how a group is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// DeepSeek-V3: sum of the top-2 (biased) scores in the group.
    SumTop2,
    /// DeepSeek-V2 `group_limited_greedy`: the max score in the group.
    Max,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupLimit {
    pub n_group: usize,
    pub topk_group: usize,
    pub score: GroupScore,
    /// Value given to the experts of dropped groups before the top-k (V3: -inf, V2: 0).
    pub masked_value: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    pub n_experts: usize,
    pub top_k: usize,
    pub scoring: Scoring,
    pub norm_topk_prob: bool,
    /// Epsilon added to the normaliser (DeepSeek-V3: 1e-20).
    pub norm_eps: f32,
    pub routed_scaling_factor: f32,
    /// `e_score_correction_bias` exists (used for selection only).
    pub correction_bias: bool,
    pub group_limit: Option<GroupLimit>,
}

/// The shared expert(s) of a MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedExpertConfig {
    pub intermediate: usize,
    /// Qwen2-MoE: output scaled by `sigmoid(shared_expert_gate(x))`.
    pub sigmoid_gate: bool,
}

/// What the feed-forward part of a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnKind {
    Dense,
    Moe,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotary dims (the whole head, or DeepSeek's `qk_rope_head_dim`).
    pub dim: usize,
    pub interleaved: bool,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attn: AttnConfig,
    pub rope: RopeConfig,
    /// Intermediate size of dense (non-MoE) MLP layers.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub router: RouterConfig,
    pub shared_expert: Option<SharedExpertConfig>,
    /// FFN kind of every layer.
    pub layer_kinds: Vec<FfnKind>,
    /// Sliding attention window of every layer (`None`: full causal attention).
    pub sliding_windows: Vec<Option<usize>>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    /// The config file as read.
    pub raw: Value,
}

struct Cfg<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl<'a> Cfg<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Config { path: self.path.to_path_buf(), msg: msg.into() }
    }
    fn usize_opt(&self, keys: &[&str]) -> Result<Option<usize>> {
        for k in keys {
            if let Some(v) = self.get(k) {
                return v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| self.err(format!("{k} is not a non-negative integer")));
            }
        }
        Ok(None)
    }
    fn usize(&self, keys: &[&str]) -> Result<usize> {
        self.usize_opt(keys)?.ok_or_else(|| self.err(format!("missing {}", keys.join(" / "))))
    }
    fn usize_or(&self, keys: &[&str], d: usize) -> Result<usize> {
        Ok(self.usize_opt(keys)?.unwrap_or(d))
    }
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(format!("{key} is not a number"))),
            None => Ok(None),
        }
    }
    fn f64_or(&self, key: &str, d: f64) -> Result<f64> {
        Ok(self.f64_opt(key)?.unwrap_or(d))
    }
    fn bool_or(&self, key: &str, d: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => v.as_bool().ok_or_else(|| self.err(format!("{key} is not a boolean"))),
            None => Ok(d),
        }
    }
    fn str_opt(&self, key: &str) -> Option<&'a str> {
        self.get(key).and_then(|v| v.as_str())
    }
    fn token_ids(&self, key: &str) -> Vec<u32> {
        match self.get(key) {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
            _ => vec![],
        }
    }
}

impl ModelConfig {
    /// Read `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { path: path.clone(), msg: e.to_string() })?;
        Self::from_json(v, &path)
    }

    /// Parse a config value (`path` is used in error messages).
    pub fn from_json(v: Value, path: &Path) -> Result<Self> {
        let c = Cfg { v: &v, path };
        let arch = match c.str_opt("model_type").and_then(Arch::from_model_type) {
            Some(a) => a,
            None => {
                let class = c.get("architectures").and_then(|a| a.get(0)).and_then(|a| a.as_str());
                match class.and_then(Arch::from_class) {
                    Some(a) => a,
                    None => {
                        let name = c.str_opt("model_type").or(class).unwrap_or("<none>");
                        return Err(ModelError::UnknownArchitecture(name.to_string()));
                    }
                }
            }
        };
        if let Some(act) = c.str_opt("hidden_act")
            && act != "silu"
            && act != "swish"
        {
            return Err(ModelError::UnsupportedActivation(act.to_string()));
        }
        let hidden_size = c.usize(&["hidden_size"])?;
        let n_layers = c.usize(&["num_hidden_layers"])?;
        let n_heads = c.usize(&["num_attention_heads"])?;
        let vocab_size = c.usize(&["vocab_size"])?;
        if n_heads == 0 || hidden_size == 0 || vocab_size == 0 {
            return Err(c.err("hidden_size, num_attention_heads and vocab_size must be positive"));
        }
        let n_kv_heads = c.usize_or(&["num_key_value_heads"], n_heads)?;
        let is_ds = matches!(arch, Arch::DeepseekV2 | Arch::DeepseekV3);
        let default_eps = match arch {
            Arch::Mixtral | Arch::Olmoe => 1e-5,
            _ => 1e-6,
        };
        let rms_norm_eps = c.f64_or("rms_norm_eps", default_eps)? as f32;
        let max_position_embeddings = c.usize_or(&["max_position_embeddings"], 4096)?;
        let tie_word_embeddings = c.bool_or("tie_word_embeddings", false)?;
        let intermediate_size = c.usize(&["intermediate_size"])?;

        // Attention.
        let attention_bias = c.bool_or("attention_bias", false)?;
        let (attn, rope_dim) = if is_ds {
            let qk_rope_head_dim = c.usize(&["qk_rope_head_dim"])?;
            let a = AttnConfig::Mla {
                n_heads,
                q_lora_rank: c.usize_opt(&["q_lora_rank"])?,
                kv_lora_rank: c.usize(&["kv_lora_rank"])?,
                qk_nope_head_dim: c.usize(&["qk_nope_head_dim"])?,
                qk_rope_head_dim,
                v_head_dim: c.usize(&["v_head_dim"])?,
                bias: attention_bias,
            };
            (a, qk_rope_head_dim)
        } else {
            let head_dim = match arch {
                Arch::Olmoe => hidden_size / n_heads,
                _ => c.usize_or(&["head_dim"], hidden_size / n_heads)?,
            };
            if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
                return Err(c.err(format!("num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}")));
            }
            let (qkv_bias, o_bias) = match arch {
                Arch::Qwen2Moe => (c.bool_or("qkv_bias", true)?, false),
                Arch::Mixtral => (false, false),
                _ => (attention_bias, attention_bias),
            };
            let qk_norm = match arch {
                Arch::Qwen3Moe => QkNorm::PerHead,
                Arch::Olmoe => QkNorm::Full,
                _ => QkNorm::None,
            };
            let clip_qkv = if arch == Arch::Olmoe { c.f64_opt("clip_qkv")?.map(|x| x as f32) } else { None };
            (AttnConfig::Standard { n_heads, n_kv_heads, head_dim, qkv_bias, o_bias, qk_norm, clip_qkv }, head_dim)
        };

        // Rope: transformers 5 `rope_parameters`, or top-level `rope_theta` + legacy `rope_scaling`.
        let rp = c.get("rope_parameters").filter(|v| v.is_object()).or_else(|| c.get("rope_scaling").filter(|v| v.is_object()));
        let theta = rp
            .and_then(|r| r.get("rope_theta"))
            .and_then(|x| x.as_f64())
            .or(c.f64_opt("rope_theta")?)
            .unwrap_or(10000.0);
        let rope_type = rp
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(|x| x.as_str())
            .unwrap_or("default");
        let rnum = |k: &str| rp.and_then(|r| r.get(k)).and_then(|x| x.as_f64());
        let scaling = match rope_type {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: rnum("factor").ok_or_else(|| c.err("linear rope without factor"))? },
            "yarn" => RopeScaling::Yarn {
                factor: rnum("factor").ok_or_else(|| c.err("yarn rope without factor"))?,
                original_max_position_embeddings: rnum("original_max_position_embeddings")
                    .or(c.f64_opt("original_max_position_embeddings")?)
                    .unwrap_or(max_position_embeddings as f64),
                beta_fast: rnum("beta_fast").filter(|x| *x != 0.0).unwrap_or(32.0),
                beta_slow: rnum("beta_slow").filter(|x| *x != 0.0).unwrap_or(1.0),
                mscale: rnum("mscale"),
                mscale_all_dim: rnum("mscale_all_dim"),
                attention_factor: rnum("attention_factor"),
                truncate: rp.and_then(|r| r.get("truncate")).and_then(|x| x.as_bool()).unwrap_or(true),
            },
            other => return Err(ModelError::UnsupportedRope(other.to_string())),
        };
        if rope_dim % 2 != 0 {
            return Err(c.err(format!("rotary dimension {rope_dim} is odd")));
        }
        let interleaved = match arch {
            Arch::DeepseekV3 => c.bool_or("rope_interleave", true)?,
            // V2 uses complex (pairwise) rotation: the same as interleaved up to a permutation
            // applied to both q and k, so attention scores are identical.
            Arch::DeepseekV2 => true,
            _ => false,
        };
        let rope = RopeConfig { theta, dim: rope_dim, interleaved, scaling };

        // Router.
        let n_experts = c.usize(&["num_local_experts", "num_experts", "n_routed_experts"])?;
        let top_k = c.usize(&["num_experts_per_tok"])?;
        if n_experts == 0 || top_k == 0 || top_k > n_experts {
            return Err(c.err(format!("num_experts_per_tok {top_k} must be in 1..={n_experts}")));
        }
        let group_limit = match arch {
            Arch::DeepseekV3 => {
                let n_group = c.usize_or(&["n_group"], 1)?;
                let topk_group = c.usize_or(&["topk_group"], n_group)?;
                Some(GroupLimit { n_group, topk_group, score: GroupScore::SumTop2, masked_value: f32::NEG_INFINITY })
            }
            Arch::DeepseekV2 => match c.str_opt("topk_method").unwrap_or("greedy") {
                "greedy" => None,
                "group_limited_greedy" => {
                    let n_group = c.usize_or(&["n_group"], 1)?;
                    let topk_group = c.usize_or(&["topk_group"], n_group)?;
                    Some(GroupLimit { n_group, topk_group, score: GroupScore::Max, masked_value: 0.0 })
                }
                other => return Err(c.err(format!("unsupported topk_method {other:?}"))),
            },
            _ => None,
        };
        if let Some(g) = &group_limit {
            if g.n_group == 0 || n_experts % g.n_group != 0 || g.topk_group == 0 || g.topk_group > g.n_group {
                return Err(c.err(format!("n_group {} / topk_group {} do not fit {n_experts} experts", g.n_group, g.topk_group)));
            }
            if g.score == GroupScore::SumTop2 && n_experts / g.n_group < 2 {
                return Err(c.err("group-limited routing needs at least 2 experts per group"));
            }
            if g.masked_value.is_infinite() && g.topk_group * (n_experts / g.n_group) < top_k {
                return Err(c.err("topk_group × experts per group < num_experts_per_tok"));
            }
        }
        let router = RouterConfig {
            n_experts,
            top_k,
            scoring: if arch == Arch::DeepseekV3 { Scoring::Sigmoid } else { Scoring::Softmax },
            norm_topk_prob: match arch {
                Arch::Mixtral => true,
                Arch::DeepseekV2 => false,
                Arch::DeepseekV3 => c.bool_or("norm_topk_prob", true)?,
                _ => c.bool_or("norm_topk_prob", false)?,
            },
            norm_eps: if arch == Arch::DeepseekV3 { 1e-20 } else { 0.0 },
            routed_scaling_factor: if is_ds { c.f64_or("routed_scaling_factor", 1.0)? as f32 } else { 1.0 },
            correction_bias: arch == Arch::DeepseekV3,
            group_limit,
        };
        let moe_intermediate_size = match arch {
            Arch::Mixtral | Arch::Olmoe => intermediate_size,
            _ => c.usize(&["moe_intermediate_size"])?,
        };
        let shared_expert = match arch {
            Arch::Qwen2Moe => match c.usize_or(&["shared_expert_intermediate_size"], 0)? {
                0 => None,
                i => Some(SharedExpertConfig { intermediate: i, sigmoid_gate: true }),
            },
            Arch::DeepseekV2 | Arch::DeepseekV3 => match c.usize_or(&["n_shared_experts"], 0)? {
                0 => None,
                n => Some(SharedExpertConfig { intermediate: n * moe_intermediate_size, sigmoid_gate: false }),
            },
            _ => None,
        };

        // Which layers are MoE.
        let layer_kinds = match arch {
            Arch::Mixtral | Arch::Olmoe => vec![FfnKind::Moe; n_layers],
            Arch::Qwen2Moe | Arch::Qwen3Moe => {
                let step = c.usize_or(&["decoder_sparse_step"], 1)?.max(1);
                let mlp_only: Vec<usize> = c
                    .get("mlp_only_layers")
                    .and_then(|a| a.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as usize).collect())
                    .unwrap_or_default();
                (0..n_layers)
                    .map(|i| if !mlp_only.contains(&i) && (i + 1) % step == 0 { FfnKind::Moe } else { FfnKind::Dense })
                    .collect()
            }
            Arch::DeepseekV2 | Arch::DeepseekV3 => {
                let first_dense = c.usize_or(&["first_k_dense_replace"], 0)?;
                let freq = c.usize_or(&["moe_layer_freq"], 1)?.max(1);
                (0..n_layers)
                    .map(|i| if i >= first_dense && i % freq == 0 { FfnKind::Moe } else { FfnKind::Dense })
                    .collect()
            }
        };

        // Sliding-window attention: Mixtral's `sliding_window`; Qwen's when `use_sliding_window`
        // and `layer_types` marks the layer "sliding_attention".
        let window = c.usize_opt(&["sliding_window"])?.filter(|w| *w > 0);
        let layer_types: Option<Vec<String>> = c
            .get("layer_types")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().map(|x| x.as_str().unwrap_or("").to_string()).collect());
        let sliding_windows: Vec<Option<usize>> = (0..n_layers)
            .map(|i| -> Result<Option<usize>> {
                Ok(match arch {
                    Arch::Mixtral => window,
                    Arch::Qwen2Moe | Arch::Qwen3Moe if c.bool_or("use_sliding_window", false)? => {
                        match &layer_types {
                            Some(t) => window.filter(|_| t.get(i).is_some_and(|x| x == "sliding_attention")),
                            None => return Err(c.err("use_sliding_window without layer_types is not supported")),
                        }
                    }
                    _ => None,
                })
            })
            .collect::<Result<_>>()?;

        Ok(ModelConfig {
            arch,
            sliding_windows,
            vocab_size,
            hidden_size,
            n_layers,
            rms_norm_eps,
            max_position_embeddings,
            tie_word_embeddings,
            attn,
            rope,
            intermediate_size,
            moe_intermediate_size,
            router,
            shared_expert,
            layer_kinds,
            eos_token_ids: c.token_ids("eos_token_id"),
            bos_token_id: c.token_ids("bos_token_id").first().copied(),
            raw: v.clone(),
        })
    }

    /// Indices of the MoE layers, in order (MoE layer `i` is decoder layer `moe_layers()[i]`).
    pub fn moe_layers(&self) -> Vec<usize> {
        self.layer_kinds.iter().enumerate().filter(|(_, k)| **k == FfnKind::Moe).map(|(i, _)| i).collect()
    }

    /// The first layer a token can run away from home on the affinity data path: the one after
    /// the first MoE layer (the number of layers without one).
    pub fn first_movable_layer(&self) -> usize {
        self.moe_layers().first().map_or(self.n_layers, |&l| l + 1)
    }

    /// What the data path evaluator (`placement::datapath`) needs of this model, for requests of
    /// `prompt_tokens` prompt and `new_tokens` generated tokens: the hidden size, a token's keys
    /// and values per layer as this runtime keeps them, and the layers whose KV the affinity
    /// path exchanges (those after the first MoE layer).
    pub fn data_path_shape(&self, prompt_tokens: usize, new_tokens: usize) -> placement::datapath::PathShape {
        let (kvh, kd, vd) = self.attn.kv_layout();
        placement::datapath::PathShape {
            hidden: self.hidden_size,
            kv_floats: kvh * (kd + vd),
            kv_layers: self.n_layers.saturating_sub(self.first_movable_layer()),
            prompt_tokens,
            new_tokens,
        }
    }

    /// The softmax scale of attention: `head_dim^-0.5`, times DeepSeek's yarn `mscale²`.
    pub fn attention_scale(&self) -> f32 {
        match &self.attn {
            AttnConfig::Standard { head_dim, .. } => (*head_dim as f64).powf(-0.5) as f32,
            AttnConfig::Mla { qk_nope_head_dim, qk_rope_head_dim, .. } => {
                let mut s = ((qk_nope_head_dim + qk_rope_head_dim) as f64).powf(-0.5);
                if let RopeScaling::Yarn { factor, mscale_all_dim: Some(m), .. } = &self.rope.scaling
                    && *m != 0.0
                {
                    let ms = yarn_get_mscale(*factor, *m);
                    s *= ms * ms;
                }
                s as f32
            }
        }
    }

    /// Rotary inverse frequencies and the cos/sin scale ("attention factor").
    pub fn rope_tables(&self) -> crate::kernels::Rope {
        let d = self.rope.dim;
        let base = self.rope.theta;
        let pos_freqs: Vec<f64> = (0..d / 2).map(|i| base.powf((2 * i) as f64 / d as f64)).collect();
        let (inv_freq, attention_factor): (Vec<f64>, f64) = match &self.rope.scaling {
            RopeScaling::None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            RopeScaling::Linear { factor } => (pos_freqs.iter().map(|p| 1.0 / p / factor).collect(), 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let af = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                    (Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => yarn_get_mscale(*factor, *m) / yarn_get_mscale(*factor, *ma),
                    _ => yarn_get_mscale(*factor, 1.0),
                });
                let corr = |rot: f64| {
                    (d as f64 * (original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(d as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extra = 1.0 - ramp;
                        (1.0 / (factor * p)) * (1.0 - extra) + (1.0 / p) * extra
                    })
                    .collect();
                (inv, af)
            }
        };
        crate::kernels::Rope {
            inv_freq: inv_freq.into_iter().map(|x| x as f32).collect(),
            attention_factor: attention_factor as f32,
            interleaved: self.rope.interleaved,
        }
    }

}

fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}
