//! Elastic expert parallelism: re-solving a placement when the expert-parallel group changes
//! membership (a rank died, was drained, or a new one joined).
//!
//! [`regroup`] maps the current placement onto the new group (`survivors[new_rank]` = the old rank it
//! was, or `None` for a joiner) and repairs it layer by layer, moving as few experts as it can. The
//! priorities, in order: a valid placement; every expert at least once; every expert on
//! `m = min(min_replicas, ranks)` ranks; few loads (experts a rank must fetch); balance.
//!
//! # Slots
//!
//! Every rank of the new group gets `S = min(budget, max(current slots, ⌈E·m / n⌉))` slots (and never
//! more than the `E` experts), where `n` is the new rank count and `budget` the memory limit
//! [`RegroupOptions::max_slots_per_rank`]. When `n · S < E` some experts get no slot at all:
//! [`PlacementError::Unplaceable`] lists them — per layer the least loaded ones (ties: the higher
//! id). When every expert fits once but not `m` times, what fits is filled and
//! [`Regrouped::under_replicated`] counts the `(layer, expert)` pairs left short; that is a
//! warning, not an error.
//!
//! # Repair, per layer
//!
//! 1. **keep**: a survivor starts with what its old rank held. When `S` shrank, it drops its
//!    least-needed experts first: the most replicated, then the least loaded, then the higher id.
//! 2. **cover**: experts no rank holds any more (orphans, held only by dead ranks), heaviest first,
//!    each go to the least loaded rank with a free slot (ties: a node that does not hold the expert
//!    yet, then the lower rank). Without a free slot, the least-needed surplus replica (an expert
//!    above `m` first, then the one whose per-replica load grows least, `load / (c (c − 1))`) on a
//!    rank without the orphan gives up its slot. When the only free slots are on ranks that hold
//!    the expert already, an expert of a full rank without it moves to such a rank to make room
//!    (one the repair placed itself first, which costs no kept expert).
//! 3. **replicate**: level by level (every expert to 2 replicas before any to 3), heaviest first,
//!    every expert below `m` gets one more copy the same way; an eviction never takes an expert down
//!    to the level being filled.
//! 4. **fill**: every free slot left (a joiner's, or a survivor's when `S` grew), least loaded rank
//!    first, takes the replica of an expert it lacks that lowers the layer's max rank load most
//!    (ties: the larger load per replica, then the lower id) — joiners take over share of the hottest
//!    experts of the heaviest ranks.
//!
//! 5. **polish** (only when ranks joined: a join is not urgent, a death recovery loads only what it
//!    must): the rebalancer's incremental solve ([`crate::rebalance`], warm-started from the
//!    repair) with a budget of as many moves as the joiners have slots, never taking an expert
//!    below `m`, stopping once the balancedness is back at the old placement's. It may trade
//!    survivors' experts (a load each) for balance.
//!
//! Rank load is `Σ load / replicas` of a rank's experts under [`RegroupOptions::load`] (uniform when
//! `None`). Everything is deterministic: same input, same result.
use serde::Serialize;

use crate::placement::LayerPlacement;
use crate::solver::effective_min;
use crate::{Placement, PlacementError, Topology};

/// How to re-solve for a new expert-parallel group.
#[derive(Debug, Clone, PartialEq)]
pub struct RegroupOptions {
    /// The new group's topology (ranks per node), over the new rank numbering.
    pub topology: Topology,
    /// Memory budget: most expert slots any rank may hold per MoE layer (None: no limit).
    pub max_slots_per_rank: Option<usize>,
    /// Every expert on at least this many ranks (capped at the number of ranks). 1 = no replicas
    /// required.
    pub min_replicas: usize,
    /// Per-layer per-expert load (layers × experts), e.g. the live window; None: uniform.
    pub load: Option<Vec<Vec<f64>>>,
}

impl RegroupOptions {
    /// No budget, no replicas required, uniform load.
    pub fn new(topology: Topology) -> Self {
        Self { topology, max_slots_per_rank: None, min_replicas: 1, load: None }
    }
}

/// The placement for the new group and what it costs to get there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Regrouped {
    /// Over the new ranks.
    pub placement: Placement,
    /// Experts each new rank must load (layer, expert) that it did not hold before; joiners load
    /// all of theirs.
    pub loads_per_rank: Vec<usize>,
    /// `(layer, expert)` slots each new rank keeps from its old rank (0 for joiners).
    pub kept_per_rank: Vec<usize>,
    /// `(layer, expert)` pairs with fewer than `min(min_replicas, ranks)` replicas because the
    /// slots (the budget) do not hold more; 0 when the minimum is met everywhere.
    pub under_replicated: usize,
}

/// Re-solves `current` for a new expert-parallel group. `survivors[new_rank]` = `Some(old rank)` for
/// a rank that stays (it keeps what it holds where it can), `None` for a joiner. See the module
/// documentation.
///
/// Errors: `current` invalid; `survivors` empty, naming an old rank twice or one out of range
/// (`Invalid`); the topology invalid or not of `survivors.len()` ranks (`Topology`); a budget of 0 or
/// `min_replicas` 0 (`Invalid`); `load` not layers × experts of finite non-negative values
/// (`Mismatch`); too few slots for every expert once (`Unplaceable`).
pub fn regroup(current: &Placement, survivors: &[Option<usize>], opts: &RegroupOptions) -> Result<Regrouped, PlacementError> {
    check_inputs(current, survivors, opts)?;
    let n = survivors.len();
    let ne = current.num_experts;
    let m = effective_min(opts.min_replicas, n);
    let wanted = current.slots_per_rank().max((ne * m).div_ceil(n));
    let slots = opts.max_slots_per_rank.map_or(wanted, |b| b.min(wanted)).min(ne);
    let uniform = vec![1.0; ne];
    let weights = |l: usize| opts.load.as_ref().and_then(|ld| ld.get(l)).unwrap_or(&uniform);
    if n * slots < ne {
        let mut missing: Vec<(usize, usize)> = Vec::new();
        for l in 0..current.num_layers {
            let w = weights(l);
            let mut order: Vec<usize> = (0..ne).collect();
            // Least loaded first; among equals the higher id goes missing first.
            order.sort_by(|&a, &b| w[a].total_cmp(&w[b]).then(b.cmp(&a)));
            missing.extend(order.into_iter().take(ne - n * slots).map(|e| (l, e)));
        }
        missing.sort_unstable();
        return Err(PlacementError::Unplaceable { missing, ranks: n, slots_per_rank: slots });
    }
    let node_of = opts.topology.node_of_rank();
    let mut layers = Vec::with_capacity(current.num_layers);
    for (l, old) in current.layers.iter().enumerate() {
        let start: Vec<Vec<usize>> =
            survivors.iter().map(|s| s.map_or_else(Vec::new, |o| old.ranks[o].clone())).collect();
        let mut work = Work::new(start, weights(l), slots, m, &node_of);
        work.repair()?;
        layers.push(LayerPlacement { ranks: work.ranks });
    }
    let mut placement = Placement::new(ne, opts.topology.clone(), layers);
    let joiners = survivors.iter().filter(|s| s.is_none()).count();
    if joiners > 0 {
        let load: Vec<Vec<f64>> = (0..current.num_layers).map(|l| weights(l).to_vec()).collect();
        polish(&mut placement, current, &load, joiners * current.num_layers * slots, m);
    }
    placement
        .validate()
        .map_err(|e| PlacementError::Solver(format!("regroup produced an invalid placement: {e}")))?;
    let mut kept_per_rank = vec![0usize; n];
    let mut under_replicated = 0;
    for (l, (old, new)) in current.layers.iter().zip(&placement.layers).enumerate() {
        let count = placement.replicas(l);
        under_replicated += count.iter().filter(|h| h.len() < m).count();
        for (r, s) in survivors.iter().enumerate() {
            if let Some(o) = *s {
                kept_per_rank[r] += new.ranks[r].iter().filter(|e| old.ranks[o].contains(e)).count();
            }
        }
    }
    let total = current.num_layers * slots;
    let loads_per_rank = kept_per_rank.iter().map(|&k| total - k).collect();
    Ok(Regrouped { placement, loads_per_rank, kept_per_rank, under_replicated })
}

/// After a join: the rebalancer's incremental solve ([`crate::rebalance`]) from the repaired
/// placement, within `budget` moves, never below `floor` replicas, stopping once the balancedness
/// under `load` is back at the old placement's. No layer leaves with a higher max rank load.
fn polish(placement: &mut Placement, old: &Placement, load: &[Vec<f64>], budget: usize, floor: usize) {
    let (_, before) = crate::live::balancedness(old, load);
    let layers = crate::rebalance::plan(placement, load, budget, before, floor, 0.0);
    for ((lp, ranks), w) in placement.layers.iter_mut().zip(layers).zip(load) {
        let max = |r: &[Vec<usize>]| crate::eval::rank_loads(r, w).into_iter().fold(0.0, f64::max);
        if max(&ranks) <= max(&lp.ranks) {
            lp.ranks = ranks;
        }
    }
}

fn check_inputs(current: &Placement, survivors: &[Option<usize>], opts: &RegroupOptions) -> Result<(), PlacementError> {
    let bad = |m: String| Err(PlacementError::Invalid(format!("regroup: {m}")));
    current.validate()?;
    if survivors.is_empty() {
        return bad("the new group has no ranks".into());
    }
    let old = current.num_ranks();
    let mut seen = vec![false; old];
    for (r, s) in survivors.iter().enumerate() {
        let Some(o) = *s else { continue };
        if o >= old {
            return bad(format!("new rank {r} names old rank {o}, the placement has ranks 0..{old}"));
        }
        if std::mem::replace(&mut seen[o], true) {
            return bad(format!("old rank {o} is named twice (again by new rank {r})"));
        }
    }
    opts.topology.validate()?;
    if opts.topology.num_ranks() != survivors.len() {
        return Err(PlacementError::Topology(format!(
            "the new topology has {} ranks, survivors lists {}",
            opts.topology.num_ranks(),
            survivors.len()
        )));
    }
    if opts.max_slots_per_rank == Some(0) {
        return bad("max_slots_per_rank must be at least 1".into());
    }
    if opts.min_replicas == 0 {
        return bad("min_replicas must be at least 1".into());
    }
    if let Some(load) = &opts.load {
        let mismatch = |m: String| Err(PlacementError::Mismatch(format!("regroup load: {m}")));
        if load.len() != current.num_layers {
            return mismatch(format!("{} layers, the placement has {}", load.len(), current.num_layers));
        }
        for (l, row) in load.iter().enumerate() {
            if row.len() != current.num_experts {
                return mismatch(format!("layer {l} has {} experts, the placement has {}", row.len(), current.num_experts));
            }
            if let Some(e) = row.iter().position(|v| !v.is_finite() || *v < 0.0) {
                return mismatch(format!("load[{l}][{e}] = {} is not a finite non-negative number", row[e]));
            }
        }
    }
    Ok(())
}

/// One layer being repaired.
struct Work<'a> {
    w: &'a [f64],
    /// `ranks[r]` = experts of new rank r (at most `slots`, distinct).
    ranks: Vec<Vec<usize>>,
    count: Vec<usize>,
    slots: usize,
    /// Replicas wanted of every expert.
    m: usize,
    node_of: &'a [usize],
    /// `(rank, expert)` placed by this repair (loaded anyway): moved first when room is made.
    fresh: Vec<(usize, usize)>,
}

impl<'a> Work<'a> {
    fn new(ranks: Vec<Vec<usize>>, w: &'a [f64], slots: usize, m: usize, node_of: &'a [usize]) -> Self {
        let mut count = vec![0usize; w.len()];
        for &e in ranks.iter().flatten() {
            count[e] += 1;
        }
        Self { w, ranks, count, slots, m, node_of, fresh: Vec::new() }
    }

    fn rank_load(&self, r: usize) -> f64 {
        self.ranks[r].iter().map(|&e| self.w[e] / self.count[e].max(1) as f64).sum()
    }

    /// Experts heaviest first (ties: lower id).
    fn hot_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.w.len()).collect();
        order.sort_by(|&a, &b| self.w[b].total_cmp(&self.w[a]).then(a.cmp(&b)));
        order
    }

    fn repair(&mut self) -> Result<(), PlacementError> {
        self.shrink();
        let order = self.hot_order();
        for &e in &order {
            if self.count[e] == 0 && !self.add_copy(e, 1) {
                return Err(PlacementError::Solver(format!("regroup found no slot for expert {e}")));
            }
        }
        for level in 2..=self.m {
            for &e in &order {
                if self.count[e] < level {
                    // Without a slot to spare the expert stays short (counted as under-replicated).
                    self.add_copy(e, level);
                }
            }
        }
        self.fill();
        Ok(())
    }

    /// Survivors above `slots` drop their least-needed experts: most replicated, least loaded, higher id.
    fn shrink(&mut self) {
        for r in 0..self.ranks.len() {
            while self.ranks[r].len() > self.slots {
                let (count, w) = (&self.count, self.w);
                let Some(pos) = (0..self.ranks[r].len()).min_by(|&a, &b| {
                    let (x, y) = (self.ranks[r][a], self.ranks[r][b]);
                    count[y].cmp(&count[x]).then(w[x].total_cmp(&w[y])).then(y.cmp(&x))
                }) else {
                    break;
                };
                let e = self.ranks[r].remove(pos);
                self.count[e] -= 1;
            }
        }
    }

    /// One more copy of `e`: into a free slot of the least loaded rank without it (ties: a node
    /// without `e`, then the lower rank), else in place of the least-needed replica of an expert
    /// with more than `keep` replicas on a rank without `e`. False when neither exists.
    fn add_copy(&mut self, e: usize, keep: usize) -> bool {
        let nodes_with: Vec<usize> = (0..self.ranks.len()).filter(|&r| self.ranks[r].contains(&e)).map(|r| self.node_of[r]).collect();
        let mut free: Option<(f64, bool, usize)> = None;
        for r in 0..self.ranks.len() {
            if self.ranks[r].len() >= self.slots || self.ranks[r].contains(&e) {
                continue;
            }
            let key = (self.rank_load(r), nodes_with.contains(&self.node_of[r]), r);
            let better = free.is_none_or(|f| key.0.total_cmp(&f.0).then(key.1.cmp(&f.1)).then(key.2.cmp(&f.2)).is_lt());
            if better {
                free = Some(key);
            }
        }
        if let Some((_, _, r)) = free {
            self.ranks[r].push(e);
            self.count[e] += 1;
            self.fresh.push((r, e));
            return true;
        }
        if self.make_room(e) {
            return true;
        }
        let mut evict: Option<((bool, f64), usize, usize)> = None;
        for (r, slots) in self.ranks.iter().enumerate() {
            if slots.contains(&e) {
                continue;
            }
            for (s, &z) in slots.iter().enumerate() {
                if self.count[z] <= keep {
                    continue;
                }
                let c = self.count[z] as f64;
                let key = (self.count[z] <= self.m, self.w[z] / (c * (c - 1.0)));
                let better = evict.as_ref().is_none_or(|(k, _, _)| key.0.cmp(&k.0).then(key.1.total_cmp(&k.1)).is_lt());
                if better {
                    evict = Some((key, r, s));
                }
            }
        }
        let Some((_, r, s)) = evict else { return false };
        self.count[self.ranks[r][s]] -= 1;
        self.ranks[r][s] = e;
        self.count[e] += 1;
        self.fresh.push((r, e));
        true
    }

    /// Free slots remain only on ranks holding `e`: some expert `x` of a full rank `a` without `e`
    /// moves to such a rank `b` that lacks it, and `e` takes its slot on `a`. Prefers an `x` this
    /// repair placed (loaded anyway, so the move costs no kept expert), then the least loaded rank
    /// `b`, then lower indices. False when no such move exists.
    fn make_room(&mut self, e: usize) -> bool {
        let n = self.ranks.len();
        let mut best: Option<(bool, f64, usize, usize, usize)> = None;
        for b in (0..n).filter(|&b| self.ranks[b].len() < self.slots) {
            let load_b = self.rank_load(b);
            for a in (0..n).filter(|&a| a != b && !self.ranks[a].contains(&e)) {
                for (s, &x) in self.ranks[a].iter().enumerate() {
                    if self.ranks[b].contains(&x) {
                        continue;
                    }
                    let key = (!self.fresh.contains(&(a, x)), load_b, b, a, s);
                    let better = best.is_none_or(|k| key.0.cmp(&k.0).then(key.1.total_cmp(&k.1)).is_lt());
                    if better {
                        best = Some(key);
                    }
                }
            }
        }
        let Some((_, _, b, a, s)) = best else { return false };
        let x = std::mem::replace(&mut self.ranks[a][s], e);
        self.ranks[b].push(x);
        self.count[e] += 1;
        self.fresh.retain(|&f| f != (a, x));
        self.fresh.push((b, x));
        self.fresh.push((a, e));
        true
    }

    /// Free slots, least loaded rank first, take the replica that lowers the layer's max rank load
    /// most (ties: larger load per replica, then lower id).
    fn fill(&mut self) {
        loop {
            let loads: Vec<f64> = (0..self.ranks.len()).map(|r| self.rank_load(r)).collect();
            let Some(r) = (0..self.ranks.len())
                .filter(|&r| self.ranks[r].len() < self.slots)
                .min_by(|&a, &b| loads[a].total_cmp(&loads[b]).then(a.cmp(&b)))
            else {
                return;
            };
            let mut by_load: Vec<usize> = (0..self.ranks.len()).collect();
            by_load.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(a.cmp(&b)));
            let mut best: Option<(f64, f64, usize)> = None;
            for e in 0..self.w.len() {
                if self.ranks[r].contains(&e) {
                    continue;
                }
                let c = self.count[e].max(1) as f64;
                let (share, new_share) = (self.w[e] / c, self.w[e] / (c + 1.0));
                let hosts = |h: usize| self.ranks[h].contains(&e);
                let untouched = by_load.iter().find(|&&h| h != r && !hosts(h)).map_or(0.0, |&h| loads[h]);
                let mut new_max = untouched.max(loads[r] + new_share);
                for h in (0..self.ranks.len()).filter(|&h| hosts(h)) {
                    new_max = new_max.max(loads[h] - share + new_share);
                }
                let better = best.is_none_or(|b| new_max.total_cmp(&b.0).then(b.1.total_cmp(&share)).is_lt());
                if better {
                    best = Some((new_max, share, e));
                }
            }
            // A rank with a free slot lacks some expert (slots ≤ experts), so `best` is set.
            let Some((_, _, e)) = best else { return };
            self.ranks[r].push(e);
            self.count[e] += 1;
            self.fresh.push((r, e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(ranks: Vec<Vec<usize>>) -> LayerPlacement {
        LayerPlacement { ranks }
    }

    #[test]
    fn shrink_drops_the_most_replicated_least_loaded_first() {
        let node_of = vec![0, 0];
        let w = [5.0, 1.0, 3.0, 2.0];
        // Expert 0 twice, the rest once; rank 0 must drop one of {0, 1, 2}: 0 has the most replicas.
        let mut work = Work::new(vec![vec![0, 1, 2], vec![0, 3]], &w, 2, 1, &node_of);
        work.shrink();
        assert_eq!(work.ranks, vec![vec![1, 2], vec![0, 3]]);
    }

    #[test]
    fn orphans_evict_surplus_replicas_when_no_slot_is_free() {
        // 3 ranks x 2 slots, experts 0..4; the dead rank held expert 3 alone. Survivors are full.
        let p = Placement::new(4, Topology::uniform(3, 1).unwrap(), vec![layer(vec![vec![0, 1], vec![3, 2], vec![0, 2]])]);
        let mut opts = RegroupOptions::new(Topology::uniform(2, 1).unwrap());
        opts.max_slots_per_rank = Some(2);
        let r = regroup(&p, &[Some(0), Some(2)], &opts).unwrap();
        r.placement.validate().unwrap();
        // Rank 1 (old 2) holds {0, 2}; 0 also sits on rank 0: one of those replicas gives way to 3.
        assert_eq!(r.loads_per_rank.iter().sum::<usize>(), 1);
        assert_eq!(crate::min_replica_count(&r.placement), 1);
    }
}
