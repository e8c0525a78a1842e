//! Routing traces: which experts every token chose at every MoE layer.
//!
//! On disk a trace is a safetensors file with `topk_ids` (I32 `[tokens, moe_layers, k]`), optional
//! `topk_weights` (F32, same shape), optional `seq_ids` (I64 `[tokens]`) and metadata `num_experts`.
use crate::TraceError;

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTrace {
    pub num_experts: usize,
    pub num_layers: usize,
    pub top_k: usize,
    /// `[tokens][layers][k]`, flattened; `[t, l, 0]` is the primary (highest-weight) expert.
    pub topk_ids: Vec<u32>,
    pub topk_weights: Option<Vec<f32>>,
    /// Sequence of every token. Absent: every token is its own sequence.
    pub seq_ids: Option<Vec<i64>>,
}

impl RoutingTrace {
    pub fn num_tokens(&self) -> usize {
        if self.num_layers == 0 || self.top_k == 0 { 0 } else { self.topk_ids.len() / (self.num_layers * self.top_k) }
    }

    /// The k experts of token `t` at layer `l`.
    pub fn experts(&self, t: usize, l: usize) -> &[u32] {
        let s = (t * self.num_layers + l) * self.top_k;
        &self.topk_ids[s..s + self.top_k]
    }

    pub fn seq_id(&self, t: usize) -> i64 {
        self.seq_ids.as_ref().map_or(t as i64, |s| s[t])
    }

    /// The rank a token's sequence lives on in home mode: `seq_id mod ranks`.
    pub fn home_rank(&self, t: usize, ranks: usize) -> usize {
        self.seq_id(t).rem_euclid(ranks as i64) as usize
    }
}
