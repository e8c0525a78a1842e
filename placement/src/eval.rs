//! The evaluator: how a placement serves a routing trace or routing statistics.
//!
//! (in progress: the primitives below are final; `evaluate` follows.)

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
    let nodes = node_demand.len();
    let ne = node_demand.iter().map(Vec::len).max().unwrap_or(0);
    let mut seen = vec![false; nodes * ne];
    let mut sum = 0.0;
    for (r, slots) in ranks.iter().enumerate() {
        let Some(&n) = node_of_rank.get(r) else { continue };
        if n >= nodes {
            continue;
        }
        for &e in slots {
            if e < ne && !std::mem::replace(&mut seen[n * ne + e], true) {
                sum += node_demand[n].get(e).copied().unwrap_or(0.0);
            }
        }
    }
    sum
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
    // ranks hosting each expert in `a`
    let mut hosts: Vec<Vec<usize>> = vec![Vec::new(); ne];
    for (r, slots) in a.iter().enumerate() {
        for &e in slots {
            if e < ne {
                hosts[e].push(r);
            }
        }
    }
    let mut stamp = vec![usize::MAX; ne];
    let mut sum = 0.0;
    for (e, rs) in hosts.iter().enumerate() {
        for &r in rs {
            let Some(slots) = b.get(r) else { continue };
            for &e2 in slots {
                if e2 < ne && stamp[e2] != e {
                    stamp[e2] = e;
                    sum += transitions[e * ne + e2];
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
    // distinct experts of `b` on every node
    let mut node_b: Vec<Vec<usize>> = vec![Vec::new(); nodes];
    let mut seen = vec![false; nodes * ne];
    for (r, slots) in b.iter().enumerate() {
        let Some(&n) = node_of_rank.get(r) else { continue };
        if n >= nodes {
            continue;
        }
        for &e2 in slots {
            if e2 < ne && !std::mem::replace(&mut seen[n * ne + e2], true) {
                node_b[n].push(e2);
            }
        }
    }
    // distinct nodes hosting every expert of `a`
    let mut hosts: Vec<Vec<usize>> = vec![Vec::new(); ne];
    for (r, slots) in a.iter().enumerate() {
        let Some(&n) = node_of_rank.get(r) else { continue };
        if n >= nodes {
            continue;
        }
        for &e in slots {
            if e < ne && !hosts[e].contains(&n) {
                hosts[e].push(n);
            }
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
