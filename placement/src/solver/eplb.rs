//! DeepSeek's expert-parallel load balancer (EPLB), written from its published description:
//!
//! 1. replicate: every expert gets one slot; each spare slot goes to the expert whose load per
//!    replica is currently highest;
//! 2. pack: physical experts (load split evenly over replicas) go heaviest first into the lightest
//!    pack that still has room, every pack receiving the same count;
//! 3. hierarchical when expert groups divide evenly over nodes: groups are packed onto nodes first,
//!    then replication and packing run inside each node, so replicas never leave their node.
//!
//! With `min_replicas` above 1 (see [`solve_with`]) step 1 starts every expert at that many replicas
//! instead of one (capped at the ranks it may use); the hierarchical policy is used only when every
//! node can hold that many replicas of each of its experts on distinct ranks.
//!
//! One deviation: a pack never receives two replicas of one expert (a rank holding the same expert
//! twice gains nothing), so the heaviest-first step skips packs already holding the expert.
use crate::placement::LayerPlacement;
use crate::{Placement, PlacementError, RoutingStats, Topology};

/// Replica count per expert for `num_slots` slots, at most `max_replicas` each.
pub fn replicate(load: &[f64], num_slots: usize, max_replicas: usize) -> Vec<usize> {
    replicate_min(load, num_slots, max_replicas, 1)
}

/// [`replicate`] starting every expert at `min(min_replicas, max_replicas)` replicas (at least 1):
/// the spare slots beyond those go to the highest load per replica. Callers size `num_slots` to hold
/// the starting replicas; when it does not, every expert keeps its starting count.
pub fn replicate_min(load: &[f64], num_slots: usize, max_replicas: usize, min_replicas: usize) -> Vec<usize> {
    let start = min_replicas.min(max_replicas).max(1);
    let mut counts = vec![start; load.len()];
    for _ in (load.len() * start)..num_slots {
        let mut best: Option<usize> = None;
        for e in 0..load.len() {
            if counts[e] >= max_replicas {
                continue;
            }
            let per = load[e] / counts[e] as f64;
            if best.is_none_or(|b| per > load[b] / counts[b] as f64) {
                best = Some(e);
            }
        }
        match best {
            Some(e) => counts[e] += 1,
            // Every expert is on every bin already; callers size slots so this cannot happen.
            None => break,
        }
    }
    counts
}

/// Packs weighted items (`(expert, weight)`) into `packs` packs of `per_pack` items each:
/// heaviest first, into the lightest pack with room that does not hold the same expert yet.
/// Returns the experts of every pack.
pub fn balanced_packing(
    items: &[(usize, f64)],
    packs: usize,
    per_pack: usize,
) -> Result<Vec<Vec<usize>>, PlacementError> {
    if items.len() != packs * per_pack {
        return Err(PlacementError::Solver(format!(
            "{} items do not fill {packs} packs of {per_pack}",
            items.len()
        )));
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    // Stable: equal weights keep expert order, so the result is deterministic.
    order.sort_by(|&a, &b| items[b].1.total_cmp(&items[a].1));
    let mut content: Vec<Vec<usize>> = vec![Vec::with_capacity(per_pack); packs];
    let mut weight = vec![0.0f64; packs];
    for i in order {
        let (e, w) = items[i];
        let pick = (0..packs)
            .filter(|&p| content[p].len() < per_pack && !content[p].contains(&e))
            .min_by(|&a, &b| weight[a].total_cmp(&weight[b]));
        let p = match pick {
            Some(p) => p,
            None => repair(&mut content, &mut weight, items, e, w, per_pack)?,
        };
        content[p].push(e);
        weight[p] += w;
    }
    Ok(content)
}

/// Every pack with room already holds `e`: move some other expert out of a full pack that lacks `e`
/// into a pack with room, freeing a place for `e`. Returns the pack that receives `e`.
fn repair(
    content: &mut [Vec<usize>],
    weight: &mut [f64],
    items: &[(usize, f64)],
    e: usize,
    _w: f64,
    per_pack: usize,
) -> Result<usize, PlacementError> {
    let weight_of = |x: usize| items.iter().find(|it| it.0 == x).map_or(0.0, |it| it.1);
    let room: Vec<usize> = (0..content.len()).filter(|&p| content[p].len() < per_pack).collect();
    for q in 0..content.len() {
        if content[q].contains(&e) {
            continue;
        }
        for &p in &room {
            if let Some(pos) = content[q].iter().position(|x| !content[p].contains(x)) {
                let x = content[q].remove(pos);
                let wx = weight_of(x);
                weight[q] -= wx;
                content[p].push(x);
                weight[p] += wx;
                return Ok(q);
            }
        }
    }
    Err(PlacementError::Solver(format!("cannot place a replica of expert {e} on a rank without it")))
}

/// EPLB for one layer. `groups`: expert groups (DeepSeek's `n_group`) for the hierarchical policy.
pub fn solve_layer(
    load: &[f64],
    topology: &Topology,
    slots_per_rank: usize,
    groups: Option<usize>,
) -> Result<LayerPlacement, PlacementError> {
    solve_layer_with(load, topology, slots_per_rank, groups, 1)
}

/// [`solve_layer`] with every expert on at least `min(min_replicas, ranks)` ranks.
pub fn solve_layer_with(
    load: &[f64],
    topology: &Topology,
    slots_per_rank: usize,
    groups: Option<usize>,
    min_replicas: usize,
) -> Result<LayerPlacement, PlacementError> {
    let min = super::effective_min(min_replicas, topology.num_ranks());
    let e_count = load.len();
    super::check_min_capacity(e_count, topology.num_ranks(), slots_per_rank, min)?;
    let nodes = topology.num_nodes();
    let ranks = topology.num_ranks();
    let ranks_per_node = ranks / nodes;
    let uniform_nodes = topology.nodes.iter().all(|n| n.len() == ranks_per_node);
    let hierarchical = match groups {
        Some(g) if nodes > 1 && uniform_nodes && g > 0 && g.is_multiple_of(nodes) && e_count.is_multiple_of(g) => {
            // Each node must fill its slots with distinct experts of its own groups.
            let per_node = e_count / nodes;
            per_node >= slots_per_rank
                && per_node * min <= ranks_per_node * slots_per_rank
                && min <= ranks_per_node
        }
        _ => false,
    };
    let mut out = vec![Vec::new(); ranks];
    if hierarchical {
        let g = groups.unwrap_or(1);
        let group_size = e_count / g;
        let group_items: Vec<(usize, f64)> =
            (0..g).map(|i| (i, load[i * group_size..(i + 1) * group_size].iter().sum())).collect();
        let node_groups = balanced_packing(&group_items, nodes, g / nodes)?;
        for (n, gs) in node_groups.iter().enumerate() {
            let experts: Vec<usize> =
                gs.iter().flat_map(|&gi| gi * group_size..(gi + 1) * group_size).collect();
            let local_load: Vec<f64> = experts.iter().map(|&e| load[e]).collect();
            pack_onto(&experts, &local_load, &topology.nodes[n], slots_per_rank, min, &mut out)?;
        }
    } else {
        let experts: Vec<usize> = (0..e_count).collect();
        let all_ranks: Vec<usize> = (0..ranks).collect();
        pack_onto(&experts, load, &all_ranks, slots_per_rank, min, &mut out)?;
    }
    Ok(LayerPlacement { ranks: out })
}

/// Replicates `experts` over the slots of `ranks` and packs them there.
fn pack_onto(
    experts: &[usize],
    load: &[f64],
    ranks: &[usize],
    slots_per_rank: usize,
    min_replicas: usize,
    out: &mut [Vec<usize>],
) -> Result<(), PlacementError> {
    let counts = replicate_min(load, ranks.len() * slots_per_rank, ranks.len(), min_replicas);
    let items: Vec<(usize, f64)> = experts
        .iter()
        .zip(&counts)
        .zip(load)
        .flat_map(|((&e, &c), &n)| std::iter::repeat_n((e, n / c as f64), c))
        .collect();
    let packed = balanced_packing(&items, ranks.len(), slots_per_rank)?;
    for (slots, &r) in packed.into_iter().zip(ranks) {
        out[r] = slots;
    }
    Ok(())
}

pub fn solve(
    stats: &RoutingStats,
    topology: &Topology,
    slots_per_rank: usize,
    groups: Option<usize>,
) -> Result<Placement, PlacementError> {
    solve_with(stats, topology, slots_per_rank, groups, 1)
}

/// [`solve`] with every expert on at least `min(min_replicas, ranks)` ranks.
///
/// Errors: as [`solve`], `min_replicas` 0 (`Solver`), or too few slots for the replicas
/// (`TooFewSlots`).
pub fn solve_with(
    stats: &RoutingStats,
    topology: &Topology,
    slots_per_rank: usize,
    groups: Option<usize>,
    min_replicas: usize,
) -> Result<Placement, PlacementError> {
    super::check_capacity(stats.num_experts, topology, slots_per_rank)?;
    if min_replicas == 0 {
        return Err(PlacementError::Solver("min_replicas must be at least 1".into()));
    }
    super::check_min_capacity(stats.num_experts, topology.num_ranks(), slots_per_rank, min_replicas)?;
    let layers = stats
        .load
        .iter()
        .map(|load| solve_layer_with(load, topology, slots_per_rank, groups, min_replicas))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Placement::new(stats.num_experts, topology.clone(), layers))
}
