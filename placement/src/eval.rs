//! The evaluator: how well a placement serves a routing trace (or routing statistics).
//!
//! Definitions (one layer `l`; `R` ranks; every token chooses `k` experts):
//! - **rank load**: `Σ over experts e hosted on the rank of load[l][e] / replicas(e)` — a replicated
//!   expert's tokens split evenly over its replicas; all k choices count ([`rank_loads`]).
//!   Balancedness of a layer = mean / max rank load; overall = `Σ_l mean / Σ_l max`.
//! - **cross-node dispatch fraction**: a token's home rank is `seq_id mod R`; a dispatch
//!   (token, layer, chosen expert) is node-local when some replica of the expert sits on the home
//!   rank's node; fraction = non-local dispatches / all dispatches ([`local_dispatch`]).
//! - **hop shares**: primary expert of layer l → primary of l + 1; same-rank when some rank hosts a
//!   replica of both, same-node when some node does ([`same_rank_hops`], [`same_node_hops`]); shares
//!   are over all hops (absent when there are no transitions, e.g. SGLang `logical_count` input).
//! - **simulated step time** ([`HardwareProfile`]): a dispatch from home rank h to expert e goes to the
//!   replica on h if there is one, else is split evenly over the replicas on h's node, else evenly
//!   over all replicas (the same rule for compute and communication). Per rank: compute =
//!   assignments × 3 GEMMs × 2 × hidden × ffn / FLOP/s; communication = bytes it *sends*
//!   (dispatch from the home rank, combine back from the expert's rank; hidden × bytes_per_activation
//!   per token), intra-node at the NVLink rate and inter-node at the IB rate, with per-node
//!   de-duplication (a token reaching several experts on one remote node crosses IB once each way;
//!   with split replicas, the expected number of crossings under a uniform replica choice; the
//!   combine bytes are attributed to the remote node's ranks by their share of the token's work).
//!   Forwarding inside the remote node and compute/communication overlap are not modelled. Layer
//!   time = slowest rank's compute + communication; step time = Σ layers. The bytes sent over
//!   NVLink and over the inter-node network are reported per layer and per step.
//!   From statistics alone ([`evaluate_stats`]) there is no per-token information, so the IB
//!   de-duplication is not applied (an upper bound); [`evaluate`] applies it.
//!
//! [`evaluate`] is [`evaluate_stats`] on `RoutingStats::from_trace(trace, Some(ranks))` plus the
//! trace-only extras (token count, de-duplicated step time), so both share one definition.
use serde::{Deserialize, Serialize};

use crate::{Placement, PlacementError, RoutingStats, RoutingTrace};

/// Hardware the step-time simulation assumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    pub name: String,
    /// Achieved (not peak) dense FLOP/s of one rank.
    pub flops_per_s: f64,
    /// Intra-node (NVLink) bandwidth per rank and direction, in gigaBYTES per second.
    pub intra_node_gbps: f64,
    /// Inter-node (InfiniBand / RoCE) bandwidth per rank and direction, in gigaBYTES per second.
    pub inter_node_gbps: f64,
    pub hidden_size: usize,
    /// Intermediate size of one routed expert's FFN.
    pub expert_intermediate_size: usize,
    /// Bytes per activation element on the wire (2 = bf16, 1 = fp8).
    pub bytes_per_activation: f64,
}

impl HardwareProfile {
    /// H100 SXM serving DeepSeek-V3: 400 TFLOP/s achieved bf16 (989 peak), NVLink 450 GB/s per
    /// direction, 400 Gb/s InfiniBand = 50 GB/s per GPU, hidden 7168, expert FFN 2048, bf16.
    pub fn h100() -> Self {
        Self {
            name: "h100".into(),
            flops_per_s: 400e12,
            intra_node_gbps: 450.0,
            inter_node_gbps: 50.0,
            hidden_size: 7168,
            expert_intermediate_size: 2048,
            bytes_per_activation: 2.0,
        }
    }

    /// A built-in profile by name (`h100`).
    pub fn named(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "h100" => Some(Self::h100()),
            _ => None,
        }
    }

    /// FLOPs of one token on one expert: 3 GEMMs (gate, up, down) × 2 × hidden × ffn.
    pub fn flops_per_assignment(&self) -> f64 {
        3.0 * 2.0 * self.hidden_size as f64 * self.expert_intermediate_size as f64
    }

    /// Bytes of one token's activation on the wire.
    pub fn token_bytes(&self) -> f64 {
        self.hidden_size as f64 * self.bytes_per_activation
    }

    pub fn validate(&self) -> Result<(), PlacementError> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if !pos(self.flops_per_s) || !pos(self.intra_node_gbps) || !pos(self.inter_node_gbps) {
            return Err(PlacementError::Invalid(format!(
                "hardware profile {}: FLOP/s and bandwidths must be finite and positive",
                self.name
            )));
        }
        if self.hidden_size == 0 || self.expert_intermediate_size == 0 || !pos(self.bytes_per_activation) {
            return Err(PlacementError::Invalid(format!(
                "hardware profile {}: hidden size, expert size and bytes per activation must be positive",
                self.name
            )));
        }
        Ok(())
    }
}

/// One MoE layer's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEvaluation {
    pub layer: usize,
    pub max_load: f64,
    pub mean_load: f64,
    /// mean / max rank load (1 when the layer has no load).
    pub balancedness: f64,
    pub cross_node_fraction: f64,
    /// Hops from this layer to the next; `None` on the last layer or without transitions.
    pub same_rank_hop_share: Option<f64>,
    pub same_node_hop_share: Option<f64>,
    pub simulated_us: f64,
    /// Bytes sent over NVLink in the layer (dispatch + combine, all ranks).
    pub intra_node_bytes: f64,
    /// Bytes sent over the inter-node network in the layer (dispatch + combine, all ranks).
    pub inter_node_bytes: f64,
}

/// A placement's evaluation against a trace or statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub hardware: String,
    pub ranks: usize,
    pub nodes: usize,
    /// Tokens of the trace; `None` when evaluated from statistics.
    pub tokens: Option<usize>,
    /// Token-expert dispatches summed over layers.
    pub dispatches: f64,
    /// `Σ_l mean / Σ_l max` rank load.
    pub balancedness: f64,
    pub cross_node_fraction: f64,
    /// Primary-expert hops counted (Σ transitions); 0 without transitions (statistics from load
    /// only), and then the hop shares below are 0 and meaningless.
    pub hops: f64,
    /// Share of hops that stay on one rank (0 when `hops` is 0).
    pub same_rank_hop_share: f64,
    /// Share of hops that stay on one node (0 when `hops` is 0).
    pub same_node_hop_share: f64,
    pub simulated_step_us: f64,
    /// Bytes sent over NVLink per step (Σ layers, dispatch + combine).
    pub intra_node_bytes: f64,
    /// Bytes sent over the inter-node network per step (Σ layers, dispatch + combine).
    pub inter_node_bytes: f64,
    /// `false` when evaluated from statistics: the step time has no per-node IB de-duplication.
    pub dedup_inter_node: bool,
    pub layers: Vec<LayerEvaluation>,
}


/// Load of every rank of one layer: `Σ over experts e hosted on the rank of load[e] / replicas(e)`
/// (a replicated expert's tokens split evenly over its replicas). `ranks[r]` = experts in rank r's
/// slots; experts out of range of `load` count as zero. O(slots + E).
pub fn rank_loads(ranks: &[Vec<usize>], load: &[f64]) -> Vec<f64> {
    let mut replicas = vec![0u32; load.len()];
    for slots in ranks {
        for &e in slots {
            if let Some(c) = replicas.get_mut(e) {
                *c += 1;
            }
        }
    }
    ranks
        .iter()
        .map(|slots| {
            slots.iter().filter(|&&e| e < load.len()).map(|&e| load[e] / replicas[e] as f64).sum()
        })
        .collect()
}

/// Tokens whose dispatch stays on their home node: `Σ_node Σ_{e hosted on the node} node_demand[node][e]`
/// (each expert counted once per node however many replicas the node has). `node_of_rank[r]` is the
/// node of rank r; `node_demand[node][e]` the tokens of the layer whose home is on that node
/// ([`crate::RoutingStats::node_demand`]). O(slots + nodes x E).
pub fn local_dispatch(ranks: &[Vec<usize>], node_of_rank: &[usize], node_demand: &[Vec<f64>]) -> f64 {
    let ne = node_demand.iter().map(Vec::len).max().unwrap_or(0);
    experts_per_node(ranks, node_of_rank, node_demand.len(), ne)
        .iter()
        .zip(node_demand)
        .map(|(experts, demand)| experts.iter().map(|&e| demand.get(e).copied().unwrap_or(0.0)).sum::<f64>())
        .sum()
}

/// The distinct experts (`< num_experts`) every node hosts, in first-seen order; ranks without a
/// node below `nodes` are skipped.
fn experts_per_node(ranks: &[Vec<usize>], node_of_rank: &[usize], nodes: usize, num_experts: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); nodes];
    let mut seen = vec![false; nodes * num_experts];
    for (r, slots) in ranks.iter().enumerate() {
        let Some(&n) = node_of_rank.get(r) else { continue };
        if n >= nodes {
            continue;
        }
        for &e in slots {
            if e < num_experts && !std::mem::replace(&mut seen[n * num_experts + e], true) {
                out[n].push(e);
            }
        }
    }
    out
}

/// Primary-expert hops between layer placements `a` (layer l) and `b` (layer l + 1) that stay on one
/// rank: `Σ T[e][e2]` over pairs `(e, e2)` such that some rank hosts `e` in `a` and `e2` in `b` (each
/// pair counted once). `transitions` is row-major `E x E` as in
/// [`crate::RoutingStats::transitions`]. O(slots of a x slots per rank).
pub fn same_rank_hops(a: &[Vec<usize>], b: &[Vec<usize>], transitions: &[f64], num_experts: usize) -> f64 {
    let ne = num_experts;
    if transitions.len() < ne * ne {
        return 0.0;
    }
    // ranks hosting each expert in `a`, as CSR (offsets into `host_ranks`)
    let mut offsets = vec![0usize; ne + 1];
    for slots in a {
        for &e in slots {
            if e < ne {
                offsets[e + 1] += 1;
            }
        }
    }
    for e in 0..ne {
        offsets[e + 1] += offsets[e];
    }
    let mut fill = offsets.clone();
    let mut host_ranks = vec![0usize; offsets[ne]];
    for (r, slots) in a.iter().enumerate() {
        for &e in slots {
            if e < ne {
                host_ranks[fill[e]] = r;
                fill[e] += 1;
            }
        }
    }
    let mut stamp = vec![usize::MAX; ne];
    let mut sum = 0.0;
    for e in 0..ne {
        let row = &transitions[e * ne..(e + 1) * ne];
        for &r in &host_ranks[offsets[e]..offsets[e + 1]] {
            let Some(slots) = b.get(r) else { continue };
            for &e2 in slots {
                if e2 < ne && stamp[e2] != e {
                    stamp[e2] = e;
                    sum += row[e2];
                }
            }
        }
    }
    sum
}

/// As [`same_rank_hops`] with nodes instead of ranks: `Σ T[e][e2]` over pairs such that some node
/// hosts `e` in `a` and `e2` in `b`. O(slots + Σ_e nodes(e) x experts per node).
pub fn same_node_hops(
    a: &[Vec<usize>],
    b: &[Vec<usize>],
    node_of_rank: &[usize],
    transitions: &[f64],
    num_experts: usize,
) -> f64 {
    let ne = num_experts;
    if transitions.len() < ne * ne {
        return 0.0;
    }
    let nodes = node_of_rank.iter().filter(|&&n| n != usize::MAX).map(|&n| n + 1).max().unwrap_or(0);
    let node_b = experts_per_node(b, node_of_rank, nodes, ne);
    // distinct nodes hosting every expert of `a`
    let mut hosts: Vec<Vec<usize>> = vec![Vec::new(); ne];
    for (n, experts) in experts_per_node(a, node_of_rank, nodes, ne).iter().enumerate() {
        for &e in experts {
            hosts[e].push(n);
        }
    }
    let mut stamp = vec![usize::MAX; ne];
    let mut sum = 0.0;
    for (e, ns) in hosts.iter().enumerate() {
        for &n in ns {
            for &e2 in &node_b[n] {
                if stamp[e2] != e {
                    stamp[e2] = e;
                    sum += transitions[e * ne + e2];
                }
            }
        }
    }
    sum
}

fn mismatch(m: String) -> PlacementError {
    PlacementError::Mismatch(m)
}

/// Checks `stats` is internally consistent and fits `placement`.
fn check_stats(placement: &Placement, stats: &RoutingStats) -> Result<(), PlacementError> {
    placement.validate()?;
    placement.check_shape(stats.num_layers, stats.num_experts)?;
    let (nl, ne) = (stats.num_layers, stats.num_experts);
    if stats.load.len() != nl {
        return Err(mismatch(format!("statistics list load for {} layers, not {nl}", stats.load.len())));
    }
    for (l, row) in stats.load.iter().enumerate() {
        if row.len() != ne {
            return Err(mismatch(format!("statistics layer {l} has load for {} experts, not {ne}", row.len())));
        }
        if let Some(e) = row.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(mismatch(format!("statistics load[{l}][{e}] = {} is not a finite count", row[e])));
        }
    }
    if stats.transitions.len() != nl.saturating_sub(1) {
        return Err(mismatch(format!(
            "statistics list transitions for {} layer pairs, expected {}",
            stats.transitions.len(),
            nl.saturating_sub(1)
        )));
    }
    if let Some(l) = stats.transitions.iter().position(|t| t.len() != ne * ne) {
        return Err(mismatch(format!("statistics transitions[{l}] is not {ne} x {ne}")));
    }
    if let Some(h) = &stats.home_load {
        if h.len() != nl {
            return Err(mismatch(format!("statistics home_load lists {} layers, not {nl}", h.len())));
        }
        for (l, per_rank) in h.iter().enumerate() {
            if let Some(r) = per_rank.iter().position(|row| row.len() != ne) {
                return Err(mismatch(format!("statistics home_load[{l}][{r}] is not {ne} experts long")));
            }
        }
    }
    Ok(())
}

/// One simulated layer: straggler time and bytes sent.
#[derive(Debug, Clone, Copy)]
struct SimResult {
    us: f64,
    intra_bytes: f64,
    inter_bytes: f64,
}

/// Per-rank accumulators of one simulated layer.
struct LayerSim {
    /// token-expert assignments
    compute: Vec<f64>,
    intra_bytes: Vec<f64>,
    inter_bytes: Vec<f64>,
}

impl LayerSim {
    fn new(ranks: usize) -> Self {
        Self { compute: vec![0.0; ranks], intra_bytes: vec![0.0; ranks], inter_bytes: vec![0.0; ranks] }
    }

    fn result(&self, hw: &HardwareProfile) -> SimResult {
        SimResult {
            us: self.time_us(hw),
            intra_bytes: self.intra_bytes.iter().sum(),
            inter_bytes: self.inter_bytes.iter().sum(),
        }
    }

    /// Slowest rank's compute + communication, in µs.
    fn time_us(&self, hw: &HardwareProfile) -> f64 {
        let per = hw.flops_per_assignment() / hw.flops_per_s;
        (0..self.compute.len())
            .map(|r| {
                self.compute[r] * per
                    + self.intra_bytes[r] / (hw.intra_node_gbps * 1e9)
                    + self.inter_bytes[r] / (hw.inter_node_gbps * 1e9)
            })
            .fold(0.0, f64::max)
            * 1e6
    }
}

/// Where a dispatch from `home` to an expert with replicas `reps` goes: the replica on `home`, else
/// those on home's node, else all replicas (split evenly over the returned ranks).
fn candidates<'a>(reps: &'a [usize], home: usize, node_of_rank: &[usize], buf: &'a mut Vec<usize>) -> &'a [usize] {
    if reps.contains(&home) {
        buf.clear();
        buf.push(home);
        return buf;
    }
    buf.clear();
    buf.extend(reps.iter().copied().filter(|&r| node_of_rank[r] == node_of_rank[home]));
    if buf.is_empty() { reps } else { buf }
}

/// Step time of one layer from per-(home rank, expert) demand, without IB de-duplication.
fn simulate_layer_stats(
    reps: &[Vec<usize>],
    node_of_rank: &[usize],
    demand: impl Fn(usize, usize) -> f64,
    hw: &HardwareProfile,
) -> SimResult {
    let ranks = node_of_rank.len();
    let bytes = hw.token_bytes();
    let mut sim = LayerSim::new(ranks);
    let mut buf = Vec::new();
    for h in 0..ranks {
        for (e, rs) in reps.iter().enumerate() {
            let n = demand(h, e);
            if n <= 0.0 || rs.is_empty() {
                continue;
            }
            let cands = candidates(rs, h, node_of_rank, &mut buf);
            let share = n / cands.len() as f64;
            for &c in cands {
                sim.compute[c] += share;
                if c == h {
                    continue;
                }
                let b = share * bytes;
                if node_of_rank[c] == node_of_rank[h] {
                    sim.intra_bytes[h] += b;
                    sim.intra_bytes[c] += b;
                } else {
                    sim.inter_bytes[h] += b;
                    sim.inter_bytes[c] += b;
                }
            }
        }
    }
    sim.result(hw)
}

/// Step time of one layer from the trace's tokens, with per-node IB de-duplication.
fn simulate_layer_trace(
    trace: &RoutingTrace,
    l: usize,
    reps: &[Vec<usize>],
    node_of_rank: &[usize],
    hw: &HardwareProfile,
) -> SimResult {
    let ranks = node_of_rank.len();
    let bytes = hw.token_bytes();
    let mut sim = LayerSim::new(ranks);
    let mut buf = Vec::new();
    // per token: remote node → probability the token does NOT reach it; remote rank → work share
    let mut not_reached: Vec<(usize, f64)> = Vec::new();
    let mut remote_work: Vec<(usize, f64)> = Vec::new();
    let mut per_expert: Vec<(usize, f64)> = Vec::new();
    for t in 0..trace.num_tokens() {
        let h = trace.home_rank(t, ranks);
        let home_node = node_of_rank[h];
        not_reached.clear();
        remote_work.clear();
        for &e in trace.experts(t, l) {
            let rs = &reps[e as usize];
            if rs.is_empty() {
                continue;
            }
            let cands = candidates(rs, h, node_of_rank, &mut buf);
            let share = 1.0 / cands.len() as f64;
            per_expert.clear();
            for &c in cands {
                sim.compute[c] += share;
                if c == h {
                    continue;
                }
                let n = node_of_rank[c];
                if n == home_node {
                    sim.intra_bytes[h] += share * bytes;
                    sim.intra_bytes[c] += share * bytes;
                } else {
                    match per_expert.iter_mut().find(|x| x.0 == n) {
                        Some(x) => x.1 += share,
                        None => per_expert.push((n, share)),
                    }
                    match remote_work.iter_mut().find(|x| x.0 == c) {
                        Some(x) => x.1 += share,
                        None => remote_work.push((c, share)),
                    }
                }
            }
            for &(n, p) in &per_expert {
                match not_reached.iter_mut().find(|x| x.0 == n) {
                    Some(x) => x.1 *= 1.0 - p,
                    None => not_reached.push((n, 1.0 - p)),
                }
            }
        }
        for &(n, miss) in &not_reached {
            let crossings = 1.0 - miss;
            sim.inter_bytes[h] += crossings * bytes; // dispatch
            let work: f64 = remote_work.iter().filter(|x| node_of_rank[x.0] == n).map(|x| x.1).sum();
            if work > 0.0 {
                for &(c, w) in remote_work.iter().filter(|x| node_of_rank[x.0] == n) {
                    sim.inter_bytes[c] += crossings * bytes * w / work; // combine
                }
            }
        }
    }
    sim.result(hw)
}

/// Evaluates a placement against routing statistics (e.g. SGLang `logical_count` via
/// [`RoutingStats::from_load`], or statistics of a trace). Balancedness from the load, cross-node
/// fraction from [`RoutingStats::node_demand`] (home split when the statistics have one for this
/// rank count, else load spread evenly over ranks), hop shares from the transitions when they are
/// non-zero, step time from the per-home-rank load without IB de-duplication.
pub fn evaluate_stats(
    placement: &Placement,
    stats: &RoutingStats,
    hw: &HardwareProfile,
) -> Result<Evaluation, PlacementError> {
    check_stats(placement, stats)?;
    hw.validate()?;
    let (nl, ne) = (stats.num_layers, stats.num_experts);
    let ranks = placement.num_ranks();
    let nodes = &placement.topology.nodes;
    let node_of_rank = placement.topology.node_of_rank();
    let mut layers = Vec::with_capacity(nl);
    let (mut sum_mean, mut sum_max, mut sum_total, mut sum_local) = (0.0, 0.0, 0.0, 0.0);
    let (mut hops, mut hops_rank, mut hops_node) = (0.0, 0.0, 0.0);
    let (mut step_us, mut intra_total, mut inter_total) = (0.0, 0.0, 0.0);
    for l in 0..nl {
        let slots = &placement.layers[l].ranks;
        let loads = rank_loads(slots, &stats.load[l]);
        let max = loads.iter().copied().fold(0.0, f64::max);
        let mean = loads.iter().sum::<f64>() / ranks as f64;
        sum_mean += mean;
        sum_max += max;
        let total: f64 = stats.load[l].iter().sum();
        let local = local_dispatch(slots, &node_of_rank, &stats.node_demand(l, nodes));
        sum_total += total;
        sum_local += local;
        let (mut rank_share, mut node_share) = (None, None);
        if l + 1 < nl {
            let tr = &stats.transitions[l];
            let all: f64 = tr.iter().sum();
            if all > 0.0 {
                let next = &placement.layers[l + 1].ranks;
                let r = same_rank_hops(slots, next, tr, ne);
                let n = same_node_hops(slots, next, &node_of_rank, tr, ne);
                rank_share = Some(r / all);
                node_share = Some(n / all);
                hops += all;
                hops_rank += r;
                hops_node += n;
            }
        }
        let reps = placement.replicas(l);
        let home = stats.home_load.as_ref().map(|h| &h[l]).filter(|h| h.len() == ranks);
        let sim = match home {
            Some(h) => simulate_layer_stats(&reps, &node_of_rank, |r, e| h[r][e], hw),
            None => simulate_layer_stats(&reps, &node_of_rank, |_, e| stats.load[l][e] / ranks as f64, hw),
        };
        step_us += sim.us;
        intra_total += sim.intra_bytes;
        inter_total += sim.inter_bytes;
        layers.push(LayerEvaluation {
            layer: l,
            max_load: max,
            mean_load: mean,
            balancedness: if max > 0.0 { mean / max } else { 1.0 },
            cross_node_fraction: if total > 0.0 { ((total - local) / total).max(0.0) } else { 0.0 },
            same_rank_hop_share: rank_share,
            same_node_hop_share: node_share,
            simulated_us: sim.us,
            intra_node_bytes: sim.intra_bytes,
            inter_node_bytes: sim.inter_bytes,
        });
    }
    Ok(Evaluation {
        hardware: hw.name.clone(),
        ranks,
        nodes: nodes.len(),
        tokens: None,
        dispatches: sum_total,
        balancedness: if sum_max > 0.0 { sum_mean / sum_max } else { 1.0 },
        cross_node_fraction: if sum_total > 0.0 { ((sum_total - sum_local) / sum_total).max(0.0) } else { 0.0 },
        hops,
        same_rank_hop_share: if hops > 0.0 { hops_rank / hops } else { 0.0 },
        same_node_hop_share: if hops > 0.0 { hops_node / hops } else { 0.0 },
        simulated_step_us: step_us,
        intra_node_bytes: intra_total,
        inter_node_bytes: inter_total,
        dedup_inter_node: false,
        layers,
    })
}

/// Simulated time of every layer of one step (µs, the straggler rank's compute + communication) when
/// the step routes `load[l][e]` tokens to expert e of layer l and every rank is home to an equal
/// share of them — the step-time model of [`evaluate_stats`] for statistics without a home split
/// (no IB de-duplication), without building [`RoutingStats`] (cheap enough to call every simulated
/// step). Errors when `placement` is invalid or `load` does not fit it.
pub fn simulate_load(placement: &Placement, load: &[Vec<f64>], hw: &HardwareProfile) -> Result<Vec<f64>, PlacementError> {
    placement.validate()?;
    hw.validate()?;
    if load.len() != placement.num_layers {
        return Err(mismatch(format!("load lists {} layers, the placement has {}", load.len(), placement.num_layers)));
    }
    if let Some(l) = load.iter().position(|row| row.len() != placement.num_experts) {
        return Err(mismatch(format!("load layer {l} has {} experts, not {}", load[l].len(), placement.num_experts)));
    }
    let ranks = placement.num_ranks() as f64;
    let node_of_rank = placement.topology.node_of_rank();
    Ok((0..placement.num_layers)
        .map(|l| {
            let reps = placement.replicas(l);
            let row = &load[l];
            simulate_layer_stats(&reps, &node_of_rank, |_, e| row[e] / ranks, hw).us
        })
        .collect())
}

/// Evaluates a placement against a routing trace: [`evaluate_stats`] on the trace's statistics
/// (home ranks = `seq_id mod ranks`), with the token count and the step time simulated token by
/// token (per-node IB de-duplication).
pub fn evaluate(placement: &Placement, trace: &RoutingTrace, hw: &HardwareProfile) -> Result<Evaluation, PlacementError> {
    placement.validate()?;
    placement.check_shape(trace.num_layers, trace.num_experts)?;
    trace.validate().map_err(|e| PlacementError::Mismatch(format!("routing trace is invalid: {e}")))?;
    let ranks = placement.num_ranks();
    let stats = RoutingStats::from_trace(trace, Some(ranks));
    let mut ev = evaluate_stats(placement, &stats, hw)?;
    let node_of_rank = placement.topology.node_of_rank();
    let (mut step_us, mut intra_total, mut inter_total) = (0.0, 0.0, 0.0);
    for (l, row) in ev.layers.iter_mut().enumerate() {
        let reps = placement.replicas(l);
        let sim = simulate_layer_trace(trace, l, &reps, &node_of_rank, hw);
        row.simulated_us = sim.us;
        row.intra_node_bytes = sim.intra_bytes;
        row.inter_node_bytes = sim.inter_bytes;
        step_us += sim.us;
        intra_total += sim.intra_bytes;
        inter_total += sim.inter_bytes;
    }
    ev.simulated_step_us = step_us;
    ev.intra_node_bytes = intra_total;
    ev.inter_node_bytes = inter_total;
    ev.tokens = Some(trace.num_tokens());
    ev.dedup_inter_node = true;
    Ok(ev)
}

/// Renders rows as an aligned plain-text table (first column left-aligned, others right-aligned).
pub(crate) fn render_table(header: &[&str], body: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in body {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.zip(&width).enumerate() {
            if i == 0 {
                s.push_str(&format!("{c:<w$}"));
            } else {
                s.push_str(&format!("  {c:>w$}"));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    let rule: Vec<String> = width.iter().map(|&w| "-".repeat(w)).collect();
    out.push_str(&line(&mut rule.iter().map(String::as_str)));
    for row in body {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// A plain-text per-layer table of one evaluation (load, balancedness, cross-node, hops, time).
pub fn format_layers(ev: &Evaluation) -> String {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.1}", x * 100.0));
    let body: Vec<Vec<String>> = ev
        .layers
        .iter()
        .map(|l| {
            vec![
                l.layer.to_string(),
                format!("{:.1}", l.max_load),
                format!("{:.1}", l.mean_load),
                format!("{:.4}", l.balancedness),
                pct(Some(l.cross_node_fraction)),
                pct(l.same_rank_hop_share),
                pct(l.same_node_hop_share),
                format!("{:.1}", l.simulated_us),
            ]
        })
        .collect();
    render_table(
        &["layer", "max load", "mean load", "balancedness", "cross-node %", "same-rank hop %", "same-node hop %", "sim us"],
        &body,
    )
}

/// A plain-text report of the simulated step time: per layer, the time and its share of the step,
/// then the total with the hardware assumptions.
pub fn format_simulation(ev: &Evaluation) -> String {
    let total = ev.simulated_step_us;
    let body: Vec<Vec<String>> = ev
        .layers
        .iter()
        .map(|l| {
            vec![
                l.layer.to_string(),
                format!("{:.1}", l.simulated_us),
                format!("{:.1}", if total > 0.0 { 100.0 * l.simulated_us / total } else { 0.0 }),
                format!("{:.4}", l.balancedness),
                format!("{:.1}", l.cross_node_fraction * 100.0),
            ]
        })
        .collect();
    let mut out = render_table(&["layer", "sim us", "% of step", "balancedness", "cross-node %"], &body);
    out.push_str(&format!(
        "simulated step: {total:.1} us on {} ({} ranks, {} nodes{}{})\n",
        ev.hardware,
        ev.ranks,
        ev.nodes,
        ev.tokens.map_or(String::new(), |t| format!(", {t} tokens")),
        if ev.dedup_inter_node { ", IB de-duplicated per token and node" } else { ", no IB de-duplication" }
    ));
    out
}

/// A plain-text comparison table, one row per named evaluation.
pub fn format_table(rows: &[(String, Evaluation)]) -> String {
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.1}", x * 100.0));
    let hop = |ev: &Evaluation, v: f64| (ev.hops > 0.0).then_some(v);
    let header = ["placement", "balancedness", "cross-node %", "same-rank hop %", "same-node hop %", "sim step us"];
    let body: Vec<[String; 6]> = rows
        .iter()
        .map(|(name, ev)| {
            [
                name.clone(),
                format!("{:.4}", ev.balancedness),
                pct(Some(ev.cross_node_fraction)),
                pct(hop(ev, ev.same_rank_hop_share)),
                pct(hop(ev, ev.same_node_hop_share)),
                format!("{:.1}", ev.simulated_step_us),
            ]
        })
        .collect();
    render_table(&header, &body.iter().map(|r| r.to_vec()).collect::<Vec<_>>())
}
