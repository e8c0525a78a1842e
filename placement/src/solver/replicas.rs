//! Minimum replica counts: every expert on at least `min(min_replicas, ranks)` ranks, so that losing
//! any `min_replicas − 1` ranks leaves every expert hosted somewhere.
//!
//! [`ensure_min_replicas`] is the shared post-pass: while some expert of a layer has fewer replicas
//! than required, one slot holding the least-needed surplus replica (an expert above the minimum
//! whose per-replica load grows least when it loses one, `load / (c (c − 1))`) on a rank without the
//! short expert takes that expert instead. Short experts are served heaviest first; ties go to the
//! lower rank, slot and expert index, so the pass is deterministic. Such a slot always exists when
//! `ranks × slots ≥ experts × min`: an expert above the minimum sits on more ranks than the short
//! one, so at least one of its ranks lacks the short expert.
use crate::{Placement, PlacementError};

/// The smallest replica count over every layer and expert of `p` (0 when some expert has no slot,
/// or `p` has no layers or experts).
pub fn min_replica_count(p: &Placement) -> usize {
    let mut least: Option<usize> = None;
    for layer in &p.layers {
        let mut count = vec![0usize; p.num_experts];
        for slots in &layer.ranks {
            for &e in slots {
                if let Some(c) = count.get_mut(e) {
                    *c += 1;
                }
            }
        }
        let m = count.iter().copied().min().unwrap_or(0);
        least = Some(least.map_or(m, |l| l.min(m)));
    }
    least.unwrap_or(0)
}

/// The replica count `min_replicas` asks for on `ranks` ranks: capped at the rank count (a rank holds
/// an expert at most once), at least 1.
pub fn effective_min(min_replicas: usize, ranks: usize) -> usize {
    min_replicas.min(ranks).max(1)
}

/// `TooFewSlots` unless `ranks × slots_per_rank` slots hold `effective_min(min_replicas, ranks)`
/// replicas of each of `experts` experts.
pub fn check_min_capacity(experts: usize, ranks: usize, slots_per_rank: usize, min_replicas: usize) -> Result<(), PlacementError> {
    let min = effective_min(min_replicas, ranks);
    let needed = experts.saturating_mul(min);
    if ranks.saturating_mul(slots_per_rank) < needed {
        return Err(PlacementError::TooFewSlots { experts, min_replicas: min, needed, ranks, slots_per_rank });
    }
    Ok(())
}

/// Raises every expert of `p` to at least `min(min, ranks)` replicas by giving least-needed surplus
/// replica slots to short experts (see the module documentation). `load[layer][expert]` ranks the
/// experts; an empty `load` means uniform. Returns the slots changed (each one an expert newly loaded
/// on a rank). `p` keeps its shape and stays valid.
///
/// Errors: `min` is 0 (`Invalid`), `load` does not fit `p` (`Mismatch`), or the slots cannot hold the
/// replicas (`TooFewSlots`); `p` is unchanged then.
pub fn ensure_min_replicas(p: &mut Placement, min: usize, load: &[Vec<f64>]) -> Result<usize, PlacementError> {
    if min == 0 {
        return Err(PlacementError::Invalid("min_replicas must be at least 1".into()));
    }
    if !load.is_empty() {
        p.check_shape(load.len(), load.first().map_or(0, Vec::len))?;
        if load.iter().any(|row| row.len() != p.num_experts) {
            return Err(PlacementError::Mismatch("load rows differ in length".into()));
        }
    }
    let ranks = p.num_ranks();
    let want = effective_min(min, ranks);
    if want <= 1 || min_replica_count(p) >= want {
        return Ok(0);
    }
    check_min_capacity(p.num_experts, ranks, p.slots_per_rank(), min)?;
    let uniform = vec![1.0; p.num_experts];
    let mut changed = 0;
    for (l, layer) in p.layers.iter_mut().enumerate() {
        let w = load.get(l).unwrap_or(&uniform);
        changed += raise_layer(&mut layer.ranks, w, want);
    }
    Ok(changed)
}

/// [`ensure_min_replicas`] on one layer's slots (`ranks[r]` = experts of rank r). Returns the slots
/// changed. Experts out of range of `w` are left alone.
pub(crate) fn raise_layer(ranks: &mut [Vec<usize>], w: &[f64], want: usize) -> usize {
    let ne = w.len();
    let mut count = vec![0usize; ne];
    for &e in ranks.iter().flatten() {
        if e < ne {
            count[e] += 1;
        }
    }
    // Heaviest short expert first (ties: lower id).
    let mut order: Vec<usize> = (0..ne).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    let mut changed = 0;
    for level in 1..=want {
        for &e in &order {
            if count[e] >= level {
                continue;
            }
            // Least-needed replica above the level (and above `want` first) on a rank without `e`.
            let mut best: Option<((bool, f64, usize, usize), usize, usize)> = None;
            for (r, slots) in ranks.iter().enumerate() {
                if slots.contains(&e) {
                    continue;
                }
                for (s, &z) in slots.iter().enumerate() {
                    if z >= ne || count[z] <= level {
                        continue;
                    }
                    let c = count[z] as f64;
                    let hurt = w[z] / (c * (c - 1.0));
                    let key = (count[z] <= want, hurt, r, s);
                    let better = best.as_ref().is_none_or(|(k, _, _)| {
                        (key.0, key.1).partial_cmp(&(k.0, k.1)).is_some_and(|o| o.is_lt())
                    });
                    if better {
                        best = Some((key, r, s));
                    }
                }
            }
            let Some((_, r, s)) = best else { return changed };
            count[ranks[r][s]] -= 1;
            ranks[r][s] = e;
            count[e] += 1;
            changed += 1;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topology;
    use crate::placement::LayerPlacement;

    #[test]
    fn raises_short_experts_from_surplus_replicas() {
        // 4 experts on 3 ranks x 3 slots: expert 0 three times, 1 twice, 2 and 3 once.
        let mut p = Placement::new(
            4,
            Topology::uniform(3, 1).unwrap(),
            vec![LayerPlacement { ranks: vec![vec![0, 1, 2], vec![0, 1, 3], vec![0, 3, 2]] }],
        );
        // Counts 3, 2, 2, 2: nothing to do.
        assert_eq!(min_replica_count(&p), 2);
        assert_eq!(ensure_min_replicas(&mut p, 2, &[]).unwrap(), 0);
        let mut q = Placement::new(
            4,
            Topology::uniform(3, 1).unwrap(),
            vec![LayerPlacement { ranks: vec![vec![0, 1, 2], vec![0, 1, 3], vec![0, 1, 2]] }],
        );
        assert_eq!(min_replica_count(&q), 1);
        let load = vec![vec![10.0, 1.0, 5.0, 8.0]];
        assert_eq!(ensure_min_replicas(&mut q, 2, &load).unwrap(), 1);
        q.validate().unwrap();
        assert_eq!(min_replica_count(&q), 2);
        // min above the rank count is capped: 3 replicas of 3 experts need all 9 slots.
        assert!(matches!(ensure_min_replicas(&mut q, 5, &load), Err(PlacementError::TooFewSlots { needed: 12, .. })));
        assert!(matches!(ensure_min_replicas(&mut q, 0, &load), Err(PlacementError::Invalid(_))));
        assert!(matches!(ensure_min_replicas(&mut q, 2, &[vec![1.0; 3]]), Err(PlacementError::Mismatch(_))));
    }
}
