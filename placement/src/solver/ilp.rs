//! The ILP solver: good_lp + HiGHS, decomposed so that DeepSeek-V3 scale takes seconds.
//!
//! One monolithic model of every layer, rank and token is hopeless at 58 layers × 256 experts × 32
//! ranks. Instead the solver starts from the `eplb` placement and improves one layer at a time with
//! its neighbour layers fixed, in two levels that mirror the hardware:
//!
//! 1. **node level** (only with several nodes): how many replicas of each expert every node holds,
//!    maximising the traffic kept inside a node (home mode: dispatches from tokens whose home rank is
//!    on that node; affinity mode: primary-expert hops to or from the neighbour layers' experts on
//!    that node) while no node carries more load than the heaviest node of the current layer;
//! 2. **rank level**, per node: which rank holds which of the node's replicas. First the minimum
//!    max-rank load is solved (its proven gap is reported), then traffic kept on one rank is
//!    maximised with the rank load capped at that optimum plus `balance_slack`, and never above the
//!    warm start's max rank load of the layer (both in the two views below).
//!
//! **Balance in two views.** A trace predicts tomorrow's traffic only so well: another prompt domain
//! moves expert loads by factors of 2 and more (see [`crate::robust::DEFAULT_DRIFT`]), and a
//! placement fitted exactly to the sampled loads is no better than chance under such a shift (on
//! the trained model's prose → code routing the in-sample optimum scored 0.66–0.68 against
//! EPLB's 0.70). So every layer's balance is measured twice: the max rank load under the sampled
//! loads, and under `load_drift` — each expert's load times its own mean-one log-normal factor,
//! where the heaviest rank expects `max_r (μ_r + c·sd_r)`; linearised (see
//! `Ctx::drifted_weights`) that is a rank load in which heavy replicas weigh more than their load.
//! The balance phase minimises the mean of the two views, the traffic phase and every acceptance
//! keep both within the warm start's (EPLB's) and within the optimum plus `balance_slack`, and the
//! load spread the traffic phase may not exceed is measured under drift, since under drift any rank
//! may become the heaviest. The drift term is linear, so it costs the MIP nothing at DeepSeek-V3
//! scale (a scenario-average formulation was tried: 8–32 sampled load scenarios per layer made the
//! MIPs too slow at that scale and their answers depended on the scenario draws).
//!
//! Replica counts stay those of the warm start (EPLB's replicate-the-heaviest is what minimises the
//! per-replica load; it honours `min_replicas`, and the counts are a hard constraint of every
//! subproblem, locality counts included, so no layer drops below that floor). A candidate layer is accepted only when the exact evaluator says it keeps more
//! traffic without exceeding the layer's load cap, so the result never scores worse than its warm
//! start. Home mode layers are independent and solved once each; affinity mode sweeps odd layers, then
//! even layers (each half in parallel, neighbours fixed) until a sweep gains nothing or time runs out.
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use good_lp::{Expression, ProblemVariables, Variable, variable};
use highs::HighsModelStatus;

use super::{Mode, Progress, SolveOptions};
use crate::eval::{local_dispatch, same_rank_hops};
use crate::placement::LayerPlacement;
use crate::{Placement, PlacementError, RoutingStats};

pub(crate) struct IlpRun {
    pub balance_gap: Option<f64>,
    pub traffic_gap: Option<f64>,
    pub sweeps: usize,
    pub subproblems: usize,
    pub hit_time_limit: usize,
    pub layers_improved: usize,
    pub layer_errors: Option<String>,
}

/// Replicas of items to spread over bins (nodes, or the ranks of one node).
struct BinProblem {
    /// Load of one replica of each item.
    weights: Vec<f64>,
    /// The same inflated for drift ([`Ctx::drifted_weights`]); empty: no drift planned for, the
    /// robust view is the nominal one.
    drifted: Vec<f64>,
    /// Added to every bin's drifted load (the part of the drift term the same on every bin).
    drift_offset: f64,
    copies: Vec<usize>,
    /// Slots of each bin.
    capacity: Vec<usize>,
    /// Most replicas of one item a bin may hold.
    max_per_bin: Vec<usize>,
    /// `gain[item][bin]`: traffic kept when the item is present on the bin (counted once).
    gain: Vec<Vec<f64>>,
    /// A feasible assignment `[item][bin]` to start from.
    initial: Vec<Vec<usize>>,
    /// Cap on Σ_bins max(0, load − mean load) in the traffic phase: a solution may not spread load
    /// more unevenly than the reference, only its maximum is capped otherwise. Keeps the balance that
    /// held on the solved trace from degrading on the next one.
    spread_cap: Option<f64>,
}

fn bin_loads_under(weights: &[f64], assign: &[Vec<usize>], bins: usize) -> Vec<f64> {
    let mut loads = vec![0.0; bins];
    for (i, row) in assign.iter().enumerate() {
        for (b, &n) in row.iter().enumerate() {
            loads[b] += weights[i] * n as f64;
        }
    }
    loads
}

/// Weight of the load spread against the max load in the balance phase: small enough that a lower
/// maximum always wins, large enough to break ties between equal maxima.
const SPREAD_TIEBREAK: f64 = 1e-3;

/// How balanced an assignment is, in the problem's load units: its max bin load under the sampled
/// loads, and under drift (the max over bins of mean + spread, see [`Ctx::drifted_weights`]; the
/// same as `nominal` when no drift is planned for).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Balance {
    nominal: f64,
    robust: f64,
}

impl Balance {
    /// What the balance phase minimises: the sampled loads and the drift count alike, so a
    /// placement neither fits the sample alone nor gives it up for drift it may never see.
    fn score(&self) -> f64 {
        (self.nominal + self.robust) / 2.0
    }

    /// At most `cap` in both views (relative tolerance 1e-9).
    fn within(&self, cap: &Balance) -> bool {
        self.nominal <= cap.nominal * (1.0 + 1e-9) && self.robust <= cap.robust * (1.0 + 1e-9)
    }

    /// The smaller of two caps in each view.
    fn min(&self, other: &Balance) -> Balance {
        Balance { nominal: self.nominal.min(other.nominal), robust: self.robust.min(other.robust) }
    }

    fn scaled(&self, f: f64) -> Balance {
        Balance { nominal: self.nominal * f, robust: self.robust * f }
    }
}

enum Goal {
    /// Minimise [`Balance::score`].
    MinLoad,
    /// Maximise the traffic kept within `load_cap` in both views.
    MaxGain { load_cap: Balance },
}

struct BinSolution {
    assign: Vec<Vec<usize>>,
    balance: Balance,
    gap: f64,
    hit_time_limit: bool,
}

impl BinProblem {
    fn balance(&self, assign: &[Vec<usize>]) -> Balance {
        let bins = self.capacity.len();
        let max = |w: &[f64]| bin_loads_under(w, assign, bins).into_iter().fold(0.0, f64::max);
        let nominal = max(&self.weights);
        let robust = if self.drifted.is_empty() { nominal } else { self.drift_offset + max(&self.drifted) };
        Balance { nominal, robust }
    }

    /// Σ_bins max(0, load − mean) of an assignment.
    fn spread(&self, assign: &[Vec<usize>]) -> f64 {
        let loads = bin_loads_under(self.spread_weights(), assign, self.capacity.len());
        let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        loads.iter().map(|&x| (x - mean).max(0.0)).sum()
    }

    /// The weights the spread is measured in: drifted when drift is planned for (under drift every
    /// bin may become the heaviest, so the spread of all of them matters), else nominal.
    fn spread_weights(&self) -> &[f64] {
        if self.drifted.is_empty() { &self.weights } else { &self.drifted }
    }

    fn has_gain(&self) -> bool {
        self.gain.iter().flatten().any(|&g| g > 0.0)
    }

    // Index loops over the item x bin matrix read better than zipped iterators here.
    #[allow(clippy::needless_range_loop)]
    fn solve(&self, goal: &Goal, time_limit: f64) -> Result<BinSolution, PlacementError> {
        let (items, bins) = (self.copies.len(), self.capacity.len());
        // Scale loads and gains to O(1) so HiGHS tolerances mean the same at every trace size.
        let w_scale = self.weights.iter().copied().fold(0.0, f64::max).max(f64::MIN_POSITIVE);
        let g_scale = self.gain.iter().flatten().copied().fold(0.0, f64::max).max(f64::MIN_POSITIVE);
        let mut vars = ProblemVariables::new();
        let mut start: Vec<f64> = Vec::new();
        let mut a: Vec<Vec<Option<Variable>>> = vec![vec![None; bins]; items];
        for i in 0..items {
            for b in 0..bins {
                let ub = self.copies[i].min(self.max_per_bin[b]);
                if ub == 0 {
                    continue;
                }
                let def = if ub == 1 { variable().binary() } else { variable().integer().min(0).max(ub as f64) };
                a[i][b] = Some(vars.add(def));
                start.push(self.initial[i][b] as f64);
            }
        }
        let mut objective = Expression::default();
        let mut presence: Vec<(Variable, Variable)> = Vec::new();
        // Max-load variables: `z[0]` under the sampled loads, `z[1]` (if any) under drift, without
        // its offset; each is at least the load of every bin under its weights.
        let weight_sets: Vec<&[f64]> =
            std::iter::once(&self.weights[..]).chain((!self.drifted.is_empty()).then_some(&self.drifted[..])).collect();
        let z: Vec<Variable> = weight_sets
            .iter()
            .map(|w| {
                let init_max = bin_loads_under(w, &self.initial, bins).into_iter().fold(0.0, f64::max);
                start.push(init_max / w_scale);
                vars.add(variable().min(0.0))
            })
            .collect();
        let nominal_z = Expression::from(z[0]);
        let (robust_z, robust_offset) = match z.get(1) {
            Some(&zr) => (Expression::from(zr), self.drift_offset),
            None => (nominal_z.clone(), 0.0),
        };
        match goal {
            Goal::MinLoad => {
                objective += 0.5 * nominal_z.clone() + 0.5 * robust_z.clone();
            }
            Goal::MaxGain { .. } => {
                for i in 0..items {
                    for b in 0..bins {
                        let (Some(ab), g) = (a[i][b], self.gain[i][b]) else { continue };
                        if g <= 0.0 {
                            continue;
                        }
                        if self.copies[i].min(self.max_per_bin[b]) == 1 {
                            objective += (g / g_scale) * ab;
                        } else {
                            let y = vars.add(variable().binary());
                            start.push(if self.initial[i][b] > 0 { 1.0 } else { 0.0 });
                            objective += (g / g_scale) * y;
                            presence.push((y, ab));
                        }
                    }
                }
            }
        }
        // Load above the mean per bin: minimised lightly in the balance phase (among equal maxima,
        // prefer the evener spread), capped in the traffic phase.
        let excess: Option<Vec<Variable>> = match (goal, self.spread_cap) {
            (Goal::MinLoad, _) | (Goal::MaxGain { .. }, Some(_)) => {
                let loads = bin_loads_under(self.spread_weights(), &self.initial, bins);
                let mean = loads.iter().sum::<f64>() / bins as f64;
                let xs: Vec<Variable> = loads
                    .iter()
                    .map(|&l| {
                        start.push((l - mean).max(0.0) / w_scale);
                        vars.add(variable().min(0.0))
                    })
                    .collect();
                if matches!(goal, Goal::MinLoad) {
                    for &x in &xs {
                        objective += (SPREAD_TIEBREAK / bins as f64) * x;
                    }
                }
                Some(xs)
            }
            _ => None,
        };
        let unsolved = match goal {
            Goal::MinLoad => vars.minimise(objective),
            Goal::MaxGain { .. } => vars.maximise(objective),
        };
        let mut problem = unsolved.using(good_lp::highs);
        use good_lp::SolverModel;
        for i in 0..items {
            let row: Expression = a[i].iter().flatten().map(|&v| Expression::from(v)).sum();
            problem.add_constraint(row.eq(self.copies[i] as f64));
        }
        for b in 0..bins {
            let col: Expression = (0..items).filter_map(|i| a[i][b]).map(Expression::from).sum();
            problem.add_constraint(col.eq(self.capacity[b] as f64));
            for (w, &zk) in weight_sets.iter().zip(&z) {
                let load: Expression = (0..items).filter_map(|i| a[i][b].map(|v| (w[i] / w_scale) * v)).sum();
                problem.add_constraint((load - zk).leq(0.0));
            }
        }
        if let Goal::MaxGain { load_cap } = goal {
            problem.add_constraint(nominal_z.leq(load_cap.nominal / w_scale));
            problem.add_constraint(robust_z.leq((load_cap.robust - robust_offset) / w_scale));
        }
        for (y, ab) in presence {
            problem.add_constraint((Expression::from(y) - ab).leq(0.0));
        }
        if let Some(excess) = &excess {
            // excess_b >= load_b - mean (excess_b >= 0 by its bound); in the traffic phase Σ excess_b <= cap.
            let sw = self.spread_weights();
            let mean = sw.iter().zip(&self.copies).map(|(w, &c)| w * c as f64).sum::<f64>() / bins as f64;
            for (b, &x) in excess.iter().enumerate() {
                let load: Expression = (0..items).filter_map(|i| a[i][b].map(|v| (sw[i] / w_scale) * v)).sum();
                problem.add_constraint((load - x).leq(mean / w_scale));
            }
            if let (Goal::MaxGain { .. }, Some(cap)) = (goal, self.spread_cap) {
                let total: Expression = excess.iter().map(|&x| Expression::from(x)).sum();
                problem.add_constraint(total.leq(cap / w_scale * (1.0 + 1e-9) + 1e-12));
            }
        }
        let mut model = problem
            .try_into_inner()
            .map_err(|e| PlacementError::Solver(format!("building the HiGHS model: {e}")))?;
        model.set_option("output_flag", false);
        model.set_option("threads", 1i32);
        model.set_option("time_limit", time_limit.max(0.01));
        model.set_option("mip_rel_gap", 1e-6);
        if model.try_set_solution(Some(&start), None, None, None).is_err() {
            return Err(PlacementError::Solver("HiGHS refused the warm start".into()));
        }
        let solved = model.try_solve().map_err(|e| PlacementError::Solver(format!("HiGHS: {e:?}")))?;
        let status = solved.status();
        let hit_time_limit = matches!(status, HighsModelStatus::ReachedTimeLimit);
        match status {
            HighsModelStatus::Optimal | HighsModelStatus::ReachedTimeLimit => {}
            HighsModelStatus::Infeasible => {
                return Err(PlacementError::Solver("subproblem infeasible".into()));
            }
            other => return Err(PlacementError::Solver(format!("HiGHS ended with {other:?}"))),
        }
        let sol = solved.get_solution();
        let cols = sol.columns();
        let mut assign = vec![vec![0usize; bins]; items];
        let mut k = 0;
        for i in 0..items {
            for b in 0..bins {
                if a[i][b].is_some() {
                    assign[i][b] = cols[k].round().max(0.0) as usize;
                    k += 1;
                }
            }
        }
        let gap = if solved.mip_gap().is_finite() { solved.mip_gap().max(0.0) } else { 1.0 };
        let balance = self.balance(&assign);
        // Defensive: HiGHS returned something that breaks a constraint (tolerances): keep the start.
        let feasible = (0..items).all(|i| assign[i].iter().sum::<usize>() == self.copies[i])
            && (0..bins).all(|b| (0..items).map(|i| assign[i][b]).sum::<usize>() == self.capacity[b]);
        if !feasible {
            return Err(PlacementError::Solver("HiGHS returned an infeasible assignment".into()));
        }
        Ok(BinSolution { assign, balance, gap, hit_time_limit })
    }
}

/// Everything a layer solve reads; shared by the worker threads.
struct Ctx<'a> {
    stats: &'a RoutingStats,
    opts: &'a SolveOptions,
    node_of_rank: Vec<usize>,
    /// `demand[l][node][e]` (home mode).
    demand: Vec<Vec<Vec<f64>>>,
    /// E[max of `ranks` standard normals], the spread factor of the drift term.
    max_normal: f64,
    /// Balance of each layer in the warm start ([`Ctx::layer_balance`]): no subproblem exceeds it.
    load_cap: Vec<Balance>,
    /// `drift_factors[l][k][e]`: the k-th of [`DRIFT_DRAWS`] mean-one log-normal factors on expert
    /// e's load of layer l (empty without drift), fixed for the whole solve.
    drift_factors: Vec<Vec<Vec<f64>>>,
    /// Balance of each layer in the warm start as a candidate layer is judged
    /// ([`Ctx::judged_balance`]): no accepted layer exceeds it.
    accept_cap: Vec<Balance>,
}

/// Drifts drawn per layer to judge candidate layers by ([`Ctx::judged_balance`]), and their seed:
/// fixed, so a solve is deterministic.
const DRIFT_DRAWS: usize = 256;
const DRIFT_SEED: u64 = 0xd81f7;

/// Per-replica load growth tried for locality-driven replica counts (home mode), in order.
const LOCALITY_STRETCH: [f64; 2] = [1.5, 1.0];

#[derive(Default)]
struct LayerOutcome {
    candidate: Option<Vec<Vec<usize>>>,
    balance_gap: f64,
    /// Largest gap of a traffic subproblem; `None` when none was solved.
    traffic_gap: Option<f64>,
    subproblems: usize,
    hit_time_limit: usize,
}

impl LayerOutcome {
    /// Adds the work of another attempt at the same layer; its candidate wins if it has one.
    fn absorb(&mut self, other: LayerOutcome) {
        self.balance_gap = self.balance_gap.max(other.balance_gap);
        self.traffic_gap = match (self.traffic_gap, other.traffic_gap) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.subproblems += other.subproblems;
        self.hit_time_limit += other.hit_time_limit;
        if other.candidate.is_some() {
            self.candidate = other.candidate;
        }
    }
}

impl Ctx<'_> {
    fn num_experts(&self) -> usize {
        self.stats.num_experts
    }

    /// Per-replica weights of layer `l`'s experts (`copies` replicas each) inflated for drift, and
    /// the offset every rank adds; `None` when no drift is planned for.
    ///
    /// Under drift an expert's load is its sampled load times a mean-one factor of variance
    /// `s² = e^{drift²} − 1`, so rank r's load has mean μ_r and variance `V_r = s² Σ w_i²` over its
    /// replicas' loads w_i, and the heaviest rank expects about `max_r μ_r + c sqrt(V_r)`, with c
    /// the expected max of as many standard normals as ranks. `sqrt(V_r)` linearised at the mean
    /// rank variance V̄ is `sqrt(V̄)/2 + V_r / (2 sqrt(V̄))`: each replica weighs
    /// `w_i + c s² w_i² / (2 sqrt(V̄))`, and every rank adds `c sqrt(V̄) / 2`. Heavy replicas
    /// weigh more than their load, light ones about their load, so the balance that holds under
    /// drift spreads the heavy ones, which is what an exact fit of the sample need not do.
    fn drifted_weights(&self, l: usize, copies: &[usize]) -> Option<(Vec<f64>, f64)> {
        let per_replica: Vec<f64> = self.stats.load[l].iter().zip(copies).map(|(&x, &c)| x / c.max(1) as f64).collect();
        crate::robust::drift_inflation(&per_replica, copies, self.opts.topology.num_ranks(), self.opts.load_drift, self.max_normal)
    }

    /// Balance of layer `l` placed as `ranks` as a candidate is judged: under the sampled loads,
    /// and the mean over the drawn drifts ([`Ctx::drift_factors`]) of the max rank load — the
    /// exact expectation the linear drift term of the subproblems approximates, on draws common to
    /// every candidate so that comparisons between them are not luck of the draws.
    fn judged_balance(&self, l: usize, ranks: &[Vec<usize>]) -> Balance {
        let mut copies = vec![0usize; self.num_experts()];
        for &e in ranks.iter().flatten() {
            copies[e] += 1;
        }
        let load = &self.stats.load[l];
        let max = |factor: Option<&[f64]>| -> f64 {
            ranks
                .iter()
                .map(|s| s.iter().map(|&e| load[e] * factor.map_or(1.0, |f| f[e]) / copies[e] as f64).sum::<f64>())
                .fold(0.0, f64::max)
        };
        let nominal = max(None);
        let robust = match self.drift_factors.get(l) {
            Some(draws) if !draws.is_empty() => draws.iter().map(|f| max(Some(f))).sum::<f64>() / draws.len() as f64,
            _ => nominal,
        };
        Balance { nominal, robust }
    }

    /// Balance of layer `l` placed as `ranks`, in loads of the layer (rank loads, or node loads
    /// when `group_of_rank` maps ranks to nodes).
    fn layer_balance(&self, l: usize, ranks: &[Vec<usize>], group_of_rank: Option<&[usize]>) -> Balance {
        let mut copies = vec![0usize; self.num_experts()];
        for &e in ranks.iter().flatten() {
            copies[e] += 1;
        }
        let max = |per_replica: &[f64]| -> f64 {
            let per_rank: Vec<f64> = ranks.iter().map(|s| s.iter().map(|&e| per_replica[e]).sum()).collect();
            match group_of_rank {
                None => per_rank.into_iter().fold(0.0, f64::max),
                Some(g) => {
                    let mut per_group = vec![0.0; g.iter().copied().max().map_or(0, |m| m + 1)];
                    for (r, x) in per_rank.into_iter().enumerate() {
                        per_group[g[r]] += x;
                    }
                    per_group.into_iter().fold(0.0, f64::max)
                }
            }
        };
        let nominal_weights: Vec<f64> = self.stats.load[l].iter().zip(&copies).map(|(&x, &c)| x / c.max(1) as f64).collect();
        let nominal = max(&nominal_weights);
        let robust = match self.drifted_weights(l, &copies) {
            Some((w, offset)) => offset + max(&w),
            None => nominal,
        };
        Balance { nominal, robust }
    }

    /// Traffic layer `l` keeps (same node in home mode, same rank in affinity mode), exactly.
    fn kept(&self, l: usize, layer: &[Vec<usize>], layers: &[Vec<Vec<usize>>]) -> f64 {
        match self.opts.mode {
            Mode::Home => local_dispatch(layer, &self.node_of_rank, &self.demand[l]),
            Mode::Affinity => {
                let ne = self.num_experts();
                let mut k = 0.0;
                if l > 0 {
                    k += same_rank_hops(&layers[l - 1], layer, &self.stats.transitions[l - 1], ne);
                }
                if l + 1 < layers.len() {
                    k += same_rank_hops(layer, &layers[l + 1], &self.stats.transitions[l], ne);
                }
                k
            }
        }
    }

    /// `gain[e][g]` of hosting expert e of layer l on group g (a node, or a rank).
    fn affinity_gain(&self, l: usize, layers: &[Vec<Vec<usize>>], group_of_rank: &[usize], groups: usize) -> Vec<Vec<f64>> {
        let ne = self.num_experts();
        let presence = |layer: &[Vec<usize>]| {
            let mut p = vec![vec![false; groups]; ne];
            for (r, slots) in layer.iter().enumerate() {
                if group_of_rank[r] < groups {
                    for &e in slots {
                        p[e][group_of_rank[r]] = true;
                    }
                }
            }
            p
        };
        let mut gain = vec![vec![0.0; groups]; ne];
        // `incoming`: hops from the neighbour's expert a to this layer's expert b; otherwise hops from
        // this layer's a to the neighbour's b. Either way the gain goes to this layer's expert.
        let mut add = |neighbour: &[Vec<usize>], t: &[f64], incoming: bool| {
            let present = presence(neighbour);
            for a in 0..ne {
                for b in 0..ne {
                    let v = t[a * ne + b];
                    if v <= 0.0 {
                        continue;
                    }
                    let (mine, theirs) = if incoming { (b, a) } else { (a, b) };
                    for g in 0..groups {
                        if present[theirs][g] {
                            gain[mine][g] += v;
                        }
                    }
                }
            }
        };
        if l > 0 {
            add(&layers[l - 1], &self.stats.transitions[l - 1], true);
        }
        if l + 1 < layers.len() {
            add(&layers[l + 1], &self.stats.transitions[l], false);
        }
        gain
    }

    /// Improves layer `l`. Home mode with several nodes first tries replica counts chosen for
    /// locality (per-replica load allowed to grow by `LOCALITY_STRETCH`, then not at all) and falls
    /// back to the current counts when such a layer cannot be packed within its load cap.
    fn improve_layer(
        &self,
        l: usize,
        layers: &[Vec<Vec<usize>>],
        time_limit: f64,
        deadline: Instant,
    ) -> Result<LayerOutcome, PlacementError> {
        let ne = self.num_experts();
        let topo = &self.opts.topology;
        let mut current_copies = vec![0usize; ne];
        for s in &layers[l] {
            for &e in s {
                current_copies[e] += 1;
            }
        }
        let mut total = LayerOutcome::default();
        if self.opts.mode == Mode::Home && topo.num_nodes() > 1 {
            for stretch in LOCALITY_STRETCH {
                let min = super::effective_min(self.opts.min_replicas, topo.num_ranks());
                let copies = locality_counts(&self.stats.load[l], &current_copies, topo.num_nodes(), topo.num_ranks(), stretch, min);
                let out = self.improve_layer_with(l, layers, copies, time_limit, deadline)?;
                total.absorb(out);
                if total.candidate.is_some() || Instant::now() >= deadline {
                    return Ok(total);
                }
            }
        }
        let out = self.improve_layer_with(l, layers, current_copies.clone(), time_limit, deadline)?;
        total.absorb(out);
        Ok(total)
    }

    fn improve_layer_with(
        &self,
        l: usize,
        layers: &[Vec<Vec<usize>>],
        copies: Vec<usize>,
        time_limit: f64,
        deadline: Instant,
    ) -> Result<LayerOutcome, PlacementError> {
        // Every subproblem gets its share, but none runs past the overall deadline.
        let budget = || time_limit.min(deadline.saturating_duration_since(Instant::now()).as_secs_f64()).max(0.01);
        let ne = self.num_experts();
        let topo = &self.opts.topology;
        let slots = self.opts.slots_per_rank;
        let current = &layers[l];
        let load = &self.stats.load[l];
        let mut out = LayerOutcome::default();
        let nodes = topo.num_nodes();
        // Node loads of the layer as it is: the node level never exceeds them.
        let current_node_cap = self.layer_balance(l, current, Some(&self.node_of_rank));
        let weights: Vec<f64> = (0..ne).map(|e| load[e] / copies[e].max(1) as f64).collect();
        let (drifted, drift_offset) = self.drifted_weights(l, &copies).unwrap_or_default();

        // Level 1: replicas per node.
        let mut per_node = vec![vec![0usize; nodes]; ne];
        for (r, s) in current.iter().enumerate() {
            for &e in s {
                per_node[e][self.node_of_rank[r]] += 1;
            }
        }
        let current_per_node = per_node.clone();
        if per_node.iter().zip(&copies).any(|(row, &c)| row.iter().sum::<usize>() != c) {
            // Counts changed: start the node level from a spread that honours them (round-robin
            // over nodes by current node load), which the ILP then improves.
            per_node = spread_over_nodes(&copies, &weights, topo);
        }
        if nodes > 1 {
            let gain = match self.opts.mode {
                Mode::Home => (0..ne).map(|e| (0..nodes).map(|n| self.demand[l][n][e]).collect()).collect(),
                Mode::Affinity => self.affinity_gain(l, layers, &self.node_of_rank, nodes),
            };
            let problem = BinProblem {
                weights: weights.clone(),
                drifted: drifted.clone(),
                drift_offset,
                copies: copies.clone(),
                capacity: topo.nodes.iter().map(|n| n.len() * slots).collect(),
                max_per_bin: topo.nodes.iter().map(Vec::len).collect(),
                gain,
                initial: per_node.clone(),
                spread_cap: None,
            };
            if problem.has_gain() {
                let cap = current_node_cap.scaled(1.0 + 1e-9);
                let sol = problem.solve(&Goal::MaxGain { load_cap: cap }, budget())?;
                out.subproblems += 1;
                out.hit_time_limit += usize::from(sol.hit_time_limit);
                out.traffic_gap = Some(out.traffic_gap.unwrap_or(0.0).max(sol.gap));
                per_node = sol.assign;
            }
        }

        // Level 2: ranks within each node.
        // Home mode's traffic is decided at the node level; inside a node only balance matters.
        let rank_gain_all: Option<Vec<Vec<f64>>> = match self.opts.mode {
            Mode::Home => None,
            Mode::Affinity => {
                let identity: Vec<usize> = (0..topo.num_ranks()).collect();
                Some(self.affinity_gain(l, layers, &identity, topo.num_ranks()))
            }
        };
        let mut candidate = vec![Vec::with_capacity(slots); topo.num_ranks()];
        for (n, ranks) in topo.nodes.iter().enumerate() {
            let items: Vec<usize> = (0..ne).filter(|&e| per_node[e][n] > 0).collect();
            let unchanged = (0..ne).all(|e| per_node[e][n] == current_per_node[e][n]);
            let initial: Vec<Vec<usize>> = if unchanged {
                items.iter().map(|&e| ranks.iter().map(|&r| usize::from(current[r].contains(&e))).collect()).collect()
            } else {
                let packed_items: Vec<(usize, f64)> = items
                    .iter()
                    .flat_map(|&e| std::iter::repeat_n((e, weights[e]), per_node[e][n]))
                    .collect();
                let packed = super::eplb::balanced_packing(&packed_items, ranks.len(), slots)?;
                items.iter().map(|&e| packed.iter().map(|p| usize::from(p.contains(&e))).collect()).collect()
            };
            let problem = BinProblem {
                weights: items.iter().map(|&e| weights[e]).collect(),
                drifted: if drifted.is_empty() { Vec::new() } else { items.iter().map(|&e| drifted[e]).collect() },
                drift_offset,
                copies: items.iter().map(|&e| per_node[e][n]).collect(),
                capacity: vec![slots; ranks.len()],
                max_per_bin: vec![1; ranks.len()],
                gain: match &rank_gain_all {
                    Some(g) => items.iter().map(|&e| ranks.iter().map(|&r| g[e][r]).collect()).collect(),
                    None => vec![vec![0.0; ranks.len()]; items.len()],
                },
                initial,
                spread_cap: None,
            };
            let balanced = problem.solve(&Goal::MinLoad, budget())?;
            out.subproblems += 1;
            out.hit_time_limit += usize::from(balanced.hit_time_limit);
            out.balance_gap = out.balance_gap.max(balanced.gap);
            if !balanced.balance.within(&self.load_cap[l]) {
                // This node split cannot be packed within the layer's cap: keep the layer as it is.
                return Ok(out);
            }
            let mut assign = balanced.assign;
            if problem.has_gain() {
                let cap = balanced.balance.scaled(1.0 + self.opts.balance_slack).min(&self.load_cap[l]).scaled(1.0 + 1e-9);
                // No more uneven than the balance optimum (which already prefers an even spread).
                let spread_cap = Some(problem.spread(&assign));
                let start = BinProblem { initial: assign.clone(), spread_cap, ..problem };
                let sol = start.solve(&Goal::MaxGain { load_cap: cap }, budget())?;
                out.subproblems += 1;
                out.hit_time_limit += usize::from(sol.hit_time_limit);
                out.traffic_gap = Some(out.traffic_gap.unwrap_or(0.0).max(sol.gap));
                assign = sol.assign;
            }
            for (i, &e) in items.iter().enumerate() {
                for (b, &r) in ranks.iter().enumerate() {
                    if assign[i][b] > 0 {
                        candidate[r].push(e);
                    }
                }
            }
        }
        for s in &mut candidate {
            s.sort_unstable();
        }
        out.candidate = Some(candidate);
        Ok(out)
    }
}

/// Takes the candidate of layer `l` when it is within the layer's balance cap and keeps more
/// traffic, or as much with better balance; returns the traffic gained. Adds the attempt's work to `run`.
fn accept_layer(
    ctx: &Ctx,
    l: usize,
    r: Result<LayerOutcome, PlacementError>,
    layers: &mut [Vec<Vec<usize>>],
    run: &mut IlpRun,
) -> f64 {
    let o = match r {
        Ok(o) => o,
        Err(e) => {
            // The layer keeps its current (valid) placement; say why in the report.
            run.layer_errors.get_or_insert_with(|| format!("layer {l}: {e}"));
            return 0.0;
        }
    };
    run.subproblems += o.subproblems;
    run.hit_time_limit += o.hit_time_limit;
    run.balance_gap = Some(run.balance_gap.unwrap_or(0.0).max(o.balance_gap));
    if let Some(g) = o.traffic_gap {
        run.traffic_gap = Some(run.traffic_gap.unwrap_or(0.0).max(g));
    }
    let Some(cand) = o.candidate else { return 0.0 };
    let z_new = ctx.judged_balance(l, &cand);
    let z_old = ctx.judged_balance(l, &layers[l]);
    if !z_new.within(&ctx.accept_cap[l]) {
        return 0.0;
    }
    let k_new = ctx.kept(l, &cand, layers);
    let k_old = ctx.kept(l, &layers[l], layers);
    let eps = 1e-9 * k_old.abs().max(1.0);
    let better = k_new > k_old + eps || (k_new >= k_old - eps && z_new.score() < z_old.score() * (1.0 - 1e-9));
    if !better {
        return 0.0;
    }
    layers[l] = cand;
    run.layers_improved += 1;
    (k_new - k_old).max(0.0)
}

/// Rank order of every layer, exactly, for small clusters: the layer-by-layer sweep can stall in a
/// local optimum of which rank gets which expert set, although balance does not depend on it. With
/// one node of at most `MAX_RELABEL_RANKS` ranks, a Viterbi pass over all rank permutations of
/// every layer finds the order that keeps the most primary hops on one rank.
fn relabel_ranks(layers: &mut [Vec<Vec<usize>>], stats: &RoutingStats, topo: &crate::Topology) {
    let ranks = topo.num_ranks();
    if topo.num_nodes() != 1 || ranks > MAX_RELABEL_RANKS || layers.len() < 2 {
        return;
    }
    let perms = permutations(ranks);
    let permuted = |layer: &[Vec<usize>], p: &[usize]| -> Vec<Vec<usize>> { p.iter().map(|&r| layer[r].clone()).collect() };
    let ne = stats.num_experts;
    // best[p]: most hops kept up to layer l with layer l in order p; back[l][p]: order of layer l-1.
    let mut best = vec![0.0f64; perms.len()];
    let mut back: Vec<Vec<usize>> = Vec::with_capacity(layers.len());
    back.push(Vec::new());
    for l in 1..layers.len() {
        let prev: Vec<Vec<Vec<usize>>> = perms.iter().map(|p| permuted(&layers[l - 1], p)).collect();
        let cur: Vec<Vec<Vec<usize>>> = perms.iter().map(|p| permuted(&layers[l], p)).collect();
        let mut next_best = vec![f64::NEG_INFINITY; perms.len()];
        let mut arg = vec![0usize; perms.len()];
        for (j, c) in cur.iter().enumerate() {
            for (i, pv) in prev.iter().enumerate() {
                let v = best[i] + same_rank_hops(pv, c, &stats.transitions[l - 1], ne);
                if v > next_best[j] {
                    next_best[j] = v;
                    arg[j] = i;
                }
            }
        }
        best = next_best;
        back.push(arg);
    }
    let mut p = (0..perms.len()).max_by(|&a, &b| best[a].total_cmp(&best[b])).unwrap_or(0);
    for l in (0..layers.len()).rev() {
        let order = perms[p].clone();
        if l > 0 {
            p = back[l][p];
        }
        layers[l] = permuted(&layers[l], &order);
    }
}

const MAX_RELABEL_RANKS: usize = 5;

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

/// Replica counts for home mode: no expert's per-replica load may exceed `stretch` times the warm
/// start's largest (so balance stays reachable), and the slots this frees go, heaviest expert first, to experts not
/// yet on every node — each such replica turns `load / nodes` of cross-node dispatch local. No count
/// goes below `min` (the `min_replicas` floor); when the floor does not fit, the counts stay.
fn locality_counts(load: &[f64], counts: &[usize], nodes: usize, ranks: usize, stretch: f64, min: usize) -> Vec<usize> {
    let per_replica_max = stretch * load.iter().zip(counts).map(|(&n, &c)| n / c.max(1) as f64).fold(0.0, f64::max);
    if per_replica_max <= 0.0 {
        return counts.to_vec();
    }
    let mut out: Vec<usize> = load
        .iter()
        .map(|&n| (((n / per_replica_max) * (1.0 - 1e-12)).ceil().max(1.0) as usize).max(min))
        .collect();
    let total: usize = counts.iter().sum();
    if out.iter().sum::<usize>() > total {
        return counts.to_vec();
    }
    let mut spare = total.saturating_sub(out.iter().sum());
    while spare > 0 {
        let spread = (0..load.len())
            .filter(|&e| out[e] < nodes.min(ranks))
            .max_by(|&a, &b| load[a].total_cmp(&load[b]).then(b.cmp(&a)));
        let pick = spread.or_else(|| {
            (0..load.len())
                .filter(|&e| out[e] < ranks)
                .max_by(|&a, &b| (load[a] / out[a] as f64).total_cmp(&(load[b] / out[b] as f64)).then(b.cmp(&a)))
        });
        let Some(e) = pick else { break };
        out[e] += 1;
        spare -= 1;
    }
    out
}

/// A feasible replicas-per-node matrix for `copies`: replicas of the heaviest experts first, each to
/// the least loaded node with a free slot that holds fewer than its rank count of that expert.
fn spread_over_nodes(copies: &[usize], weights: &[f64], topo: &crate::Topology) -> Vec<Vec<usize>> {
    let nodes = topo.num_nodes();
    let slots_total: usize = copies.iter().sum();
    let capacity: Vec<usize> = {
        let ranks = topo.num_ranks();
        topo.nodes.iter().map(|n| slots_total * n.len() / ranks).collect()
    };
    let mut per_node = vec![vec![0usize; nodes]; copies.len()];
    let mut used = vec![0usize; nodes];
    let mut node_load = vec![0.0f64; nodes];
    let mut order: Vec<usize> = (0..copies.len()).collect();
    order.sort_by(|&a, &b| (weights[b] * copies[b] as f64).total_cmp(&(weights[a] * copies[a] as f64)));
    for e in order {
        for _ in 0..copies[e] {
            let n = (0..nodes)
                .filter(|&n| used[n] < capacity[n] && per_node[e][n] < topo.nodes[n].len())
                .min_by(|&a, &b| (per_node[e][a], node_load[a]).partial_cmp(&(per_node[e][b], node_load[b])).unwrap_or(std::cmp::Ordering::Equal))
                .unwrap_or(0);
            per_node[e][n] += 1;
            used[n] += 1;
            node_load[n] += weights[e];
        }
    }
    per_node
}

pub(crate) fn solve(
    stats: &RoutingStats,
    opts: &SolveOptions,
    start: Placement,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<(Placement, IlpRun), PlacementError> {
    let began = Instant::now();
    let deadline = began + opts.time_limit;
    let topo = &opts.topology;
    let nl = stats.num_layers;
    let ctx = Ctx {
        stats,
        opts,
        node_of_rank: topo.node_of_rank(),
        demand: match opts.mode {
            Mode::Home => (0..nl).map(|l| stats.expected_node_demand(l, &topo.nodes)).collect(),
            Mode::Affinity => Vec::new(),
        },
        max_normal: crate::robust::expected_max_normal(topo.num_ranks()),
        load_cap: Vec::new(),
        drift_factors: crate::robust::drift_factors(stats.num_layers, stats.num_experts, DRIFT_DRAWS, opts.load_drift, DRIFT_SEED),
        accept_cap: Vec::new(),
    };
    let ctx = Ctx {
        load_cap: start.layers.iter().enumerate().map(|(l, layer)| ctx.layer_balance(l, &layer.ranks, None)).collect(),
        accept_cap: start.layers.iter().enumerate().map(|(l, layer)| ctx.judged_balance(l, &layer.ranks)).collect(),
        ..ctx
    };
    let mut layers: Vec<Vec<Vec<usize>>> = start.layers.into_iter().map(|l| l.ranks).collect();
    let mut run = IlpRun {
        balance_gap: None,
        traffic_gap: None,
        sweeps: 0,
        subproblems: 0,
        hit_time_limit: 0,
        layers_improved: 0,
        layer_errors: None,
    };
    let batches: Vec<Vec<usize>> = match opts.mode {
        Mode::Home => vec![(0..nl).collect()],
        Mode::Affinity => vec![(1..nl).step_by(2).collect(), (0..nl).step_by(2).collect()],
    };
    let max_sweeps = if opts.mode == Mode::Home { 1 } else { 50 };
    // Budget: the time limit spread over the subproblems of the sweeps we expect (home: one sweep of
    // node level + rank balance per node; affinity: about three sweeps, each with node level + rank
    // balance + rank traffic per node).
    let nodes = topo.num_nodes();
    let (planned_sweeps, per_layer) = match opts.mode {
        Mode::Home => (1.0, usize::from(nodes > 1) + nodes),
        Mode::Affinity => (3.0, usize::from(nodes > 1) + 2 * nodes),
    };
    let threads = opts.threads.max(1);
    let per_sub = (0.9 * opts.time_limit.as_secs_f64() * threads as f64 / (planned_sweeps * (nl * per_layer) as f64))
        .clamp(0.02, 30.0);
    while run.sweeps < max_sweeps && Instant::now() < deadline {
        run.sweeps += 1;
        let mut gained = 0.0;
        let done = AtomicUsize::new(0);
        for batch in &batches {
            let next = AtomicUsize::new(0);
            let results: Mutex<Vec<(usize, Result<LayerOutcome, PlacementError>)>> = Mutex::new(Vec::new());
            let snapshot = &layers;
            std::thread::scope(|s| {
                for _ in 0..threads.min(batch.len()) {
                    s.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&l) = batch.get(i) else { break };
                        let left = deadline.saturating_duration_since(Instant::now()).as_secs_f64();
                        if left <= 0.0 {
                            break;
                        }
                        let r = ctx.improve_layer(l, snapshot, per_sub.min(left), deadline);
                        results.lock().expect("no panics while held").push((l, r));
                        let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                        progress(Progress { sweep: run.sweeps, done: d, total: nl });
                    });
                }
            });
            for (l, r) in results.into_inner().expect("threads joined") {
                gained += accept_layer(&ctx, l, r, &mut layers, &mut run);
            }
        }
        let total: f64 = match opts.mode {
            Mode::Home => stats.load.iter().flatten().sum(),
            Mode::Affinity => stats.transitions.iter().flatten().sum(),
        };
        if gained <= 1e-6 * total.max(1.0) {
            break;
        }
    }
    if opts.mode == Mode::Affinity {
        relabel_ranks(&mut layers, stats, topo);
    }
    let placement = Placement::new(
        stats.num_experts,
        topo.clone(),
        layers.into_iter().map(|ranks| LayerPlacement { ranks }).collect(),
    );
    placement.validate()?;
    // Replica counts are those of the warm start or `locality_counts`, both at or above the floor.
    let floor = super::effective_min(opts.min_replicas, topo.num_ranks());
    if super::min_replica_count(&placement) < floor {
        return Err(PlacementError::Solver(format!("the ILP left an expert with fewer than {floor} replicas")));
    }
    Ok((placement, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads 6 6 4 4 3 3 1 1 on 2 ranks x 4 slots: {6,6,1,1} | {4,4,3,3} and {6,4,3,1} | {6,4,3,1}
    /// both balance the sample exactly, but only the second holds when loads drift.
    #[test]
    fn the_drift_term_spreads_heavy_replicas_that_an_exact_fit_may_pair() {
        let weights = vec![6.0, 6.0, 4.0, 4.0, 3.0, 3.0, 1.0, 1.0];
        let copies = vec![1; 8];
        let fragile = vec![vec![1, 0], vec![1, 0], vec![0, 1], vec![0, 1], vec![0, 1], vec![0, 1], vec![1, 0], vec![1, 0]];
        let problem = |drifted: Vec<f64>, drift_offset: f64| BinProblem {
            weights: weights.clone(),
            drifted,
            drift_offset,
            copies: copies.clone(),
            capacity: vec![4, 4],
            max_per_bin: vec![1, 1],
            gain: vec![vec![0.0; 2]; 8],
            initial: fragile.clone(),
            spread_cap: None,
        };
        let (drifted, offset) = crate::robust::drift_inflation(&weights, &copies, 2, 1.0, crate::robust::expected_max_normal(2)).expect("drift planned");
        assert!(drifted[0] / weights[0] > drifted[7] / weights[7], "heavy replicas weigh more than their load");
        let robust = problem(drifted, offset).solve(&Goal::MinLoad, 5.0).expect("solves");
        assert_eq!(robust.balance.nominal, 14.0, "still an exact fit of the sample");
        for pair in robust.assign.chunks(2) {
            assert_ne!(pair[0], pair[1], "each rank holds one of every pair of equal experts: {:?}", robust.assign);
        }
        // Without drift, the fragile start is already optimal and stays.
        let fit = problem(Vec::new(), 0.0).solve(&Goal::MinLoad, 5.0).expect("solves");
        assert_eq!(fit.balance.nominal, 14.0);
        assert!(crate::robust::drift_inflation(&weights, &copies, 2, 0.0, 1.0).is_none());
    }
}
