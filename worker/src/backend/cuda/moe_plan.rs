#![forbid(unsafe_code)]
//! Grouping of a MoE layer's routed rows by expert, so that all expert GEMMs of a layer run as
//! one grouped launch instead of one launch (or one host round trip) per expert.
//!
//! The router gives, per token, `top_k` expert ids and weights. The device gathers the hidden
//! states into a permuted buffer in which the rows of each expert are contiguous
//! ([`MoePlan::gather`]), runs one grouped GEMM over the [`MoePlan::groups`], and combines the
//! outputs back per token with [`MoePlan::src_row`] and [`MoePlan::weights`]. Under expert
//! parallelism, choices of experts this device does not hold are left out (`src_row == -1`)
//! and run on another rank. The plan is computed on the host from the router's output, which a
//! rank of a larger group has there anyway (the counts size its all-to-all); a device running
//! every expert of a layer groups on the device (`kernel_src::expert_grouping`).

/// Why routing could not be planned.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MoePlanError {
    /// `ids` and `weights` must both hold `tokens * top_k` entries.
    #[error("routing shape: {ids} ids and {weights} weights for {tokens} tokens x top-{top_k}")]
    Shape { ids: usize, weights: usize, tokens: usize, top_k: usize },
    /// The router chose an expert id the model does not have.
    #[error("token {token} routed to expert {expert} of {n_experts}")]
    ExpertOutOfRange { token: usize, expert: u32, n_experts: usize },
    /// A chosen expert is not loaded on this device and skipping was not allowed.
    #[error("expert {expert} is not loaded on this device")]
    NotLoaded { expert: usize },
}

/// The rows of one expert in the permuted buffer: `start .. start + rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGroup {
    pub expert: usize,
    pub start: usize,
    pub rows: usize,
}

/// How one MoE layer's routed rows are laid out for a grouped launch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MoePlan {
    /// Token index of each permuted row: rows grouped by expert (experts ascending), tokens
    /// ascending within an expert (a token routed twice to one expert gets two rows, in `j`
    /// order).
    pub gather: Vec<i32>,
    /// Non-empty groups only, in expert order; groups tile `0..gather.len()`.
    pub groups: Vec<ExpertGroup>,
    /// `[tokens * top_k]`: permuted row holding (token, j), -1 when that choice is not run here.
    pub src_row: Vec<i32>,
    /// `[tokens * top_k]`: the routing weights, with 0.0 where `src_row` is -1.
    pub weights: Vec<f32>,
}

impl MoePlan {
    /// Rows in the permuted buffer (choices run on this device).
    pub fn rows(&self) -> usize {
        self.gather.len()
    }

    /// Rows of the largest group (0 for an empty plan): sizes the grouped launch's grid.
    pub fn max_group_rows(&self) -> usize {
        self.groups.iter().map(|g| g.rows).max().unwrap_or(0)
    }
}

/// Plan one MoE layer.
///
/// `ids` / `weights`: `[tokens * top_k]` row-major as the router produces them. `loaded(e)`:
/// whether expert `e` runs on this device (called only with `e < n_experts`).
/// `skip_unloaded`: true -> choices of unloaded experts get `src_row` -1 and weight 0.0
/// (another rank runs them); false -> [`MoePlanError::NotLoaded`].
///
/// Errors are checked in row-major order of the choices and the first one is returned.
/// `Shape` also when `tokens * top_k` overflows or exceeds `i32::MAX` (rows and token indices
/// are `i32` in the kernel ABI).
pub fn plan(
    ids: &[u32],
    weights: &[f32],
    tokens: usize,
    top_k: usize,
    n_experts: usize,
    loaded: &dyn Fn(usize) -> bool,
    skip_unloaded: bool,
) -> Result<MoePlan, MoePlanError> {
    let shape = || MoePlanError::Shape { ids: ids.len(), weights: weights.len(), tokens, top_k };
    let n = tokens.checked_mul(top_k).ok_or_else(shape)?;
    if ids.len() != n || weights.len() != n || n > i32::MAX as usize {
        return Err(shape());
    }
    // (expert, choice index) of every choice run here; choice index = t * top_k + j, so
    // sorting by it orders tokens ascending (then j) within an expert.
    let mut run: Vec<(usize, usize)> = Vec::with_capacity(n);
    let mut src_row = vec![-1i32; n];
    let mut out_w = vec![0.0f32; n];
    for (c, &id) in ids.iter().enumerate() {
        let expert = id as usize;
        if expert >= n_experts {
            return Err(MoePlanError::ExpertOutOfRange { token: c / top_k, expert: id, n_experts });
        }
        if loaded(expert) {
            run.push((expert, c));
            out_w[c] = weights[c];
        } else if !skip_unloaded {
            return Err(MoePlanError::NotLoaded { expert });
        }
    }
    // Choice indices are already ascending, so a stable sort by expert suffices.
    run.sort_by_key(|&(e, _)| e);

    let mut gather = Vec::with_capacity(run.len());
    let mut groups: Vec<ExpertGroup> = Vec::new();
    for (row, &(expert, c)) in run.iter().enumerate() {
        // n <= i32::MAX, so rows and token indices fit.
        gather.push((c / top_k) as i32);
        src_row[c] = row as i32;
        match groups.last_mut() {
            Some(g) if g.expert == expert => g.rows += 1,
            _ => groups.push(ExpertGroup { expert, start: row, rows: 1 }),
        }
    }
    Ok(MoePlan { gather, groups, src_row, weights: out_w })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cuda::TestRng as Rng;

    fn all(_: usize) -> bool {
        true
    }

    /// Structural invariants every plan must satisfy.
    fn check_invariants(p: &MoePlan, tokens: usize, top_k: usize) {
        assert_eq!(p.src_row.len(), tokens * top_k);
        assert_eq!(p.weights.len(), tokens * top_k);
        let mut next = 0;
        for w in p.groups.windows(2) {
            assert!(w[0].expert < w[1].expert, "groups not in expert order: {:?}", p.groups);
        }
        for g in &p.groups {
            assert!(g.rows > 0, "empty group {g:?}");
            assert_eq!(g.start, next, "groups not contiguous: {:?}", p.groups);
            let toks = &p.gather[g.start..g.start + g.rows];
            assert!(toks.windows(2).all(|w| w[0] <= w[1]), "tokens not ascending in {g:?}");
            next += g.rows;
        }
        assert_eq!(next, p.rows());
        // Every permuted row is the target of exactly one choice.
        let mut hit = vec![0u32; p.rows()];
        for &r in &p.src_row {
            if r >= 0 {
                hit[r as usize] += 1;
            }
        }
        assert!(hit.iter().all(|&h| h == 1));
        assert!(p.gather.iter().all(|&t| t >= 0 && (t as usize) < tokens));
    }

    #[test]
    fn small_known_plan() {
        // 3 tokens, top-2, 4 experts.
        let ids = [2, 0, 0, 3, 2, 1];
        let w = [0.6, 0.4, 0.7, 0.3, 0.9, 0.1];
        let p = plan(&ids, &w, 3, 2, 4, &all, false).unwrap();
        assert_eq!(p.gather, vec![0, 1, 2, 0, 2, 1]);
        assert_eq!(p.groups, vec![
            ExpertGroup { expert: 0, start: 0, rows: 2 },
            ExpertGroup { expert: 1, start: 2, rows: 1 },
            ExpertGroup { expert: 2, start: 3, rows: 2 },
            ExpertGroup { expert: 3, start: 5, rows: 1 },
        ]);
        assert_eq!(p.src_row, vec![3, 0, 1, 5, 4, 2]);
        assert_eq!(p.weights, w.to_vec());
        assert_eq!(p.rows(), 6);
        assert_eq!(p.max_group_rows(), 2);
        check_invariants(&p, 3, 2);
    }

    #[test]
    fn unloaded_experts_are_skipped_or_rejected() {
        let ids = [2, 0, 0, 3, 2, 1];
        let w = [0.6, 0.4, 0.7, 0.3, 0.9, 0.1];
        let even = |e: usize| e.is_multiple_of(2);
        let p = plan(&ids, &w, 3, 2, 4, &even, true).unwrap();
        assert_eq!(p.gather, vec![0, 1, 0, 2]);
        assert_eq!(p.groups, vec![ExpertGroup { expert: 0, start: 0, rows: 2 }, ExpertGroup {
            expert: 2,
            start: 2,
            rows: 2
        }]);
        assert_eq!(p.src_row, vec![2, 0, 1, -1, 3, -1]);
        assert_eq!(p.weights, vec![0.6, 0.4, 0.7, 0.0, 0.9, 0.0]);
        check_invariants(&p, 3, 2);
        assert_eq!(plan(&ids, &w, 3, 2, 4, &even, false), Err(MoePlanError::NotLoaded { expert: 3 }));
        // Nothing loaded: an empty plan when skipping.
        let p = plan(&ids, &w, 3, 2, 4, &|_| false, true).unwrap();
        assert_eq!(p.rows(), 0);
        assert!(p.groups.is_empty());
        assert_eq!(p.src_row, vec![-1; 6]);
        assert_eq!(p.weights, vec![0.0; 6]);
        assert_eq!(p.max_group_rows(), 0);
    }

    #[test]
    fn errors() {
        let w = [0.5f32; 6];
        assert_eq!(plan(&[0; 5], &w, 3, 2, 4, &all, false), Err(MoePlanError::Shape {
            ids: 5,
            weights: 6,
            tokens: 3,
            top_k: 2
        }));
        assert_eq!(plan(&[0; 6], &w[..4], 3, 2, 4, &all, false), Err(MoePlanError::Shape {
            ids: 6,
            weights: 4,
            tokens: 3,
            top_k: 2
        }));
        assert!(matches!(plan(&[], &[], usize::MAX, 2, 4, &all, false), Err(MoePlanError::Shape { .. })));
        assert_eq!(plan(&[0, 1, 1, 4, 9, 0], &w, 3, 2, 4, &all, false), Err(MoePlanError::ExpertOutOfRange {
            token: 1,
            expert: 4,
            n_experts: 4
        }));
        assert_eq!(plan(&[u32::MAX], &[1.0], 1, 1, 0, &all, true), Err(MoePlanError::ExpertOutOfRange {
            token: 0,
            expert: u32::MAX,
            n_experts: 0
        }));
        // Out-of-range is checked before `loaded` is asked (never with a bad index).
        let strict = |e: usize| {
            assert!(e < 4);
            true
        };
        assert!(matches!(plan(&[7, 0], &[1.0, 1.0], 1, 2, 4, &strict, false), Err(MoePlanError::ExpertOutOfRange { .. })));
    }

    #[test]
    fn zero_tokens_give_an_empty_plan() {
        let p = plan(&[], &[], 0, 8, 64, &all, false).unwrap();
        assert_eq!(p, MoePlan::default());
        assert_eq!((p.rows(), p.max_group_rows()), (0, 0));
        let p = plan(&[], &[], 5, 0, 64, &all, false).unwrap();
        assert_eq!(p, MoePlan::default());
    }

    #[test]
    fn duplicate_choice_of_one_expert_gets_two_rows() {
        let p = plan(&[1, 1, 0, 1], &[0.5, 0.25, 0.125, 1.0], 2, 2, 2, &all, false).unwrap();
        assert_eq!(p.gather, vec![1, 0, 0, 1]);
        assert_eq!(p.src_row, vec![1, 2, 0, 3]);
        check_invariants(&p, 2, 2);
    }

    /// Random routings against the naive reference: every (token, j) run here maps to a row of
    /// that token inside the group of its expert, with its weight; the rest are -1 / 0.0.
    #[test]
    fn random_routings_match_naive_reference() {
        let mut rng = Rng(7);
        for case in 0..300 {
            let tokens = rng.below(40) as usize;
            let top_k = 1 + rng.below(8) as usize;
            let n_experts = 1 + rng.below(64) as usize;
            let mask = rng.next();
            let skip = case % 3 != 0;
            // Skipping cases hold a random subset of the experts; the others hold all of them.
            let loaded_mask = move |e: usize| (mask >> (e % 64)) & 1 == 1;
            let ids: Vec<u32> = (0..tokens * top_k).map(|_| rng.below(n_experts as u64) as u32).collect();
            let w: Vec<f32> = (0..tokens * top_k).map(|_| (rng.below(1000) as f32 + 1.0) / 1000.0).collect();
            let is_loaded: &dyn Fn(usize) -> bool = if skip { &loaded_mask } else { &all };
            let p = plan(&ids, &w, tokens, top_k, n_experts, is_loaded, skip).unwrap();
            check_invariants(&p, tokens, top_k);
            let mut expected_rows = 0;
            for t in 0..tokens {
                for j in 0..top_k {
                    let c = t * top_k + j;
                    let e = ids[c] as usize;
                    if is_loaded(e) {
                        expected_rows += 1;
                        let r = p.src_row[c];
                        assert!(r >= 0, "case {case}: choice ({t}, {j}) dropped");
                        let r = r as usize;
                        assert_eq!(p.gather[r] as usize, t);
                        let g = p.groups.iter().find(|g| g.expert == e).expect("group of a used expert");
                        assert!((g.start..g.start + g.rows).contains(&r), "case {case}: row {r} outside {g:?}");
                        assert_eq!(p.weights[c], w[c]);
                    } else {
                        assert_eq!(p.src_row[c], -1);
                        assert_eq!(p.weights[c], 0.0);
                    }
                }
            }
            assert_eq!(p.rows(), expected_rows);
            // Group sizes match a naive count per expert.
            for g in &p.groups {
                let count = ids.iter().filter(|&&i| i as usize == g.expert).count();
                assert_eq!(g.rows, count, "case {case}: {g:?}");
            }
        }
    }
}
