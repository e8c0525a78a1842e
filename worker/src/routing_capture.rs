//! The routing a model actually makes: every token's top-k experts (and their combine weights) at
//! every MoE layer, recorded while the model runs text in this process. Real routing traces, with
//! real domain shifts when the texts differ (prose, code), for the placement engine.

use placement::RoutingTrace;

use crate::error::{ModelError, Result};
use crate::model::{LogitsMode, Model, SeqInput};

/// Runs each sequence of `sequences` through `model` (one prefill each, sequence ids in order)
/// and returns the routing trace of all their tokens.
pub fn capture(model: &Model, sequences: &[Vec<u32>]) -> Result<RoutingTrace> {
    let num_layers = model.moe_layers().count();
    let first = model.moe_layers().next().ok_or_else(|| ModelError::RoutingCapture("the model has no MoE layer to record".into()))?;
    let (num_experts, top_k) = (first.n_experts(), first.router.cfg.top_k);
    let mut trace = RoutingTrace { num_experts, num_layers, top_k, topk_ids: Vec::new(), topk_weights: Some(Vec::new()), seq_ids: Some(Vec::new()) };
    for (s, tokens) in sequences.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
        let mut cache = model.new_cache();
        let out = model.forward(&mut [SeqInput { tokens, cache: &mut cache }], LogitsMode::Last)?;
        if out.routing.len() != num_layers || out.routing.iter().any(|r| r.top_k != top_k || r.ids.len() != tokens.len() * top_k) {
            return Err(ModelError::RoutingCapture("the forward returned routing of another shape than the model's".into()));
        }
        let weights = trace.topk_weights.get_or_insert_with(Vec::new);
        for t in 0..tokens.len() {
            for r in &out.routing {
                trace.topk_ids.extend_from_slice(&r.ids[t * top_k..(t + 1) * top_k]);
                weights.extend_from_slice(&r.weights[t * top_k..(t + 1) * top_k]);
            }
        }
        trace.seq_ids.get_or_insert_with(Vec::new).extend(std::iter::repeat_n(s as i64, tokens.len()));
    }
    trace.validate().map_err(|e| ModelError::RoutingCapture(format!("captured routing: {e}")))?;
    Ok(trace)
}
