//! Routing statistics a placement is solved on: per-layer expert load, primary-expert transitions
//! between consecutive layers, intra-layer co-activation, and load split by the token's home rank.
use crate::{RoutingTrace, TraceError};

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingStats {
    pub num_layers: usize,
    pub num_experts: usize,
    /// `load[l][e]`: tokens routed to expert e at layer l (all k choices count).
    pub load: Vec<Vec<f64>>,
    /// `transitions[l][e * E + e2]`: tokens whose primary expert is e at layer l and e2 at l + 1
    /// (`num_layers - 1` entries).
    pub transitions: Vec<Vec<f64>>,
    /// `coactivation[l][e * E + e2]`: tokens choosing both e and e2 at layer l (symmetric, zero diagonal).
    pub coactivation: Vec<Vec<f64>>,
    /// `home_load[l][r][e]`: tokens of home rank r routed to expert e at layer l, for the rank count
    /// the statistics were built for; `None` when unknown (treated as spread evenly over ranks).
    pub home_load: Option<Vec<Vec<Vec<f64>>>>,
}

impl RoutingStats {
    /// Statistics of a trace; `home_ranks` (when given) splits load by `seq_id mod home_ranks`.
    pub fn from_trace(trace: &RoutingTrace, home_ranks: Option<usize>) -> Self {
        let (nl, ne, k) = (trace.num_layers, trace.num_experts, trace.top_k);
        let mut load = vec![vec![0.0; ne]; nl];
        let mut transitions = vec![vec![0.0; ne * ne]; nl.saturating_sub(1)];
        let mut coactivation = vec![vec![0.0; ne * ne]; nl];
        let mut home_load = home_ranks.map(|r| vec![vec![vec![0.0; ne]; r]; nl]);
        for t in 0..trace.num_tokens() {
            let home = home_ranks.map(|r| trace.home_rank(t, r));
            for l in 0..nl {
                let ex = trace.experts(t, l);
                for (i, &e) in ex.iter().enumerate() {
                    let e = e as usize;
                    load[l][e] += 1.0;
                    if let (Some(h), Some(hl)) = (home, home_load.as_mut()) {
                        hl[l][h][e] += 1.0;
                    }
                    for &e2 in &ex[i + 1..k] {
                        let e2 = e2 as usize;
                        coactivation[l][e * ne + e2] += 1.0;
                        coactivation[l][e2 * ne + e] += 1.0;
                    }
                }
                if l + 1 < nl {
                    let a = ex[0] as usize;
                    let b = trace.experts(t, l + 1)[0] as usize;
                    transitions[l][a * ne + b] += 1.0;
                }
            }
        }
        Self { num_layers: nl, num_experts: ne, load, transitions, coactivation, home_load }
    }

    /// Statistics from aggregated per-layer counts only (SGLang's `logical_count`): no transitions,
    /// no co-activation, no home split.
    pub fn from_load(load: Vec<Vec<f64>>) -> Result<Self, TraceError> {
        let nl = load.len();
        let ne = load.first().map_or(0, Vec::len);
        if nl == 0 || ne == 0 {
            return Err(TraceError::Invalid("logical_count is empty".into()));
        }
        for (l, row) in load.iter().enumerate() {
            if row.len() != ne {
                return Err(TraceError::Invalid(format!(
                    "logical_count layer {l} has {} experts, layer 0 has {ne}",
                    row.len()
                )));
            }
            if let Some(e) = row.iter().position(|v| !v.is_finite() || *v < 0.0) {
                return Err(TraceError::Invalid(format!(
                    "logical_count[{l}][{e}] = {} is not a finite non-negative count",
                    row[e]
                )));
            }
        }
        Ok(Self {
            num_layers: nl,
            num_experts: ne,
            load,
            transitions: vec![vec![0.0; ne * ne]; nl - 1],
            coactivation: vec![vec![0.0; ne * ne]; nl],
            home_load: None,
        })
    }

    /// Tokens of layer `l` whose home is on each node, per expert: `[node][e]`, as the trace split
    /// them. Without a home split, [`Self::expected_node_demand`].
    pub fn node_demand(&self, l: usize, nodes: &[Vec<usize>]) -> Vec<Vec<f64>> {
        let ranks: usize = nodes.iter().map(Vec::len).sum();
        match &self.home_load {
            Some(h) if h[l].len() == ranks => nodes
                .iter()
                .map(|members| (0..self.num_experts).map(|e| members.iter().map(|&r| h[l][r][e]).sum()).collect())
                .collect(),
            _ => self.expected_node_demand(l, nodes),
        }
    }

    /// Tokens of layer `l` per node and expert when requests land on ranks at random: the layer's
    /// load in proportion to each node's ranks. This is what a placement solved now meets later —
    /// the solved trace's own per-node split is noise that does not carry over — so the solvers
    /// plan and score home-mode traffic with it.
    pub fn expected_node_demand(&self, l: usize, nodes: &[Vec<usize>]) -> Vec<Vec<f64>> {
        let ranks: usize = nodes.iter().map(Vec::len).sum();
        nodes
            .iter()
            .map(|members| self.load[l].iter().map(|&n| n * members.len() as f64 / ranks as f64).collect())
            .collect()
    }
}
