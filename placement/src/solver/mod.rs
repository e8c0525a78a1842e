//! Placement solvers: `contiguous` (baseline), `eplb` (DeepSeek's greedy) and `ilp` (good_lp + HiGHS,
//! decomposed layer by layer and node → rank, warm-started from `eplb`).
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::eval::{local_dispatch, rank_loads, same_rank_hops};
use crate::{Placement, PlacementError, RoutingStats, Topology};

pub mod contiguous;
pub mod eplb;
pub mod ilp;
pub mod replicas;
mod scenario_search;

pub use replicas::{check_min_capacity, effective_min, ensure_min_replicas, min_replica_count};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SolverKind {
    Contiguous,
    #[default]
    Eplb,
    Ilp,
}

impl FromStr for SolverKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "contiguous" => Ok(Self::Contiguous),
            "eplb" => Ok(Self::Eplb),
            "ilp" => Ok(Self::Ilp),
            _ => Err(format!("unknown solver {s:?} (expected contiguous, eplb or ilp)")),
        }
    }
}

/// Which data path the traffic term of the objective models (see DESIGN.md, Data path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Tokens return to their home rank after every layer: count dispatches that leave the home node.
    #[default]
    Home,
    /// Tokens follow their primary expert: count primary-expert hops that change rank between layers.
    Affinity,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "home" => Ok(Self::Home),
            "affinity" => Ok(Self::Affinity),
            _ => Err(format!("unknown mode {s:?} (expected home or affinity)")),
        }
    }
}

/// The ILP's default [`SolveOptions::balance_slack`]: 1 % of a layer's robust balance optimum may go
/// to traffic (affinity mode), never beyond EPLB's balance.
pub const DEFAULT_BALANCE_SLACK: f64 = 0.01;

#[derive(Debug, Clone)]
pub struct SolveOptions {
    pub topology: Topology,
    pub slots_per_rank: usize,
    /// Expert groups (DeepSeek's `n_group`) for hierarchical EPLB.
    pub groups: Option<usize>,
    pub mode: Mode,
    /// Wall-clock budget of the ILP as a whole.
    pub time_limit: Duration,
    /// How much the ILP may give up on a layer's rank-load optimum to gain traffic (0.01 = 1 %). It
    /// never exceeds the warm start's max rank load of that layer.
    pub balance_slack: f64,
    /// Weight of the traffic fraction against imbalance in the reported objective.
    pub traffic_weight: f64,
    /// Subproblems solved in parallel.
    pub threads: usize,
    /// Every expert on at least `min(min_replicas, ranks)` ranks (1: no replicas required). The
    /// slots must allow it (`ranks × slots_per_rank ≥ experts × that`), else the solve fails with
    /// [`PlacementError::TooFewSlots`].
    pub min_replicas: usize,
    /// Drift of expert loads the ILP plans for, as the spread of a log-normal factor on each
    /// expert's load (0.5: tomorrow an expert may carry about 0.6–1.65× its sampled load; 0: fit
    /// the sample). The ILP never does worse than its warm start on the sampled loads nor under
    /// drift, and minimises the two alike in its balance phase (see `ilp.rs`).
    pub load_drift: f64,
    /// Per-layer expert loads of bootstrap resamples of the solved trace, `[resample][layer][expert]`
    /// ([`crate::robust::bootstrap_loads`]); empty when the statistics came without a trace. The
    /// affinity-mode swap search (`scenario_search.rs`) measures balance on them.
    pub load_resamples: Vec<Vec<Vec<f64>>>,
    /// Per-layer expert loads of plausible shifts of the traffic mix, `[draw][layer][expert]`
    /// ([`crate::robust::shifted_loads`]); empty: the swap search draws independent per-expert
    /// drift instead.
    pub load_shifts: Vec<Vec<Vec<f64>>>,
    /// Draws like [`Self::load_resamples`] and [`Self::load_shifts`] but independent of them
    /// (other seeds): the swap search keeps a layer's swaps only as far as the layer stays within
    /// its caps on these too, which it never chose swaps on. Both empty: no check (nothing
    /// independent to check on); shifts alone empty: independent drift of another seed.
    pub check_resamples: Vec<Vec<Vec<f64>>>,
    pub check_shifts: Vec<Vec<Vec<f64>>>,
    /// Primary-expert transitions of bootstrap resamples of the solved trace,
    /// `[resample][layer][e · E + e2]` ([`crate::robust::bootstrap_transitions`]); empty: the swap
    /// search takes a swap on its in-sample hop gain alone.
    pub transition_resamples: Vec<Vec<Vec<f64>>>,
}

impl SolveOptions {
    pub fn new(topology: Topology, slots_per_rank: usize) -> Self {
        Self {
            topology,
            slots_per_rank,
            groups: None,
            mode: Mode::Home,
            time_limit: Duration::from_secs(60),
            balance_slack: DEFAULT_BALANCE_SLACK,
            traffic_weight: 1.0,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            min_replicas: 1,
            load_drift: crate::robust::DEFAULT_DRIFT,
            load_resamples: Vec::new(),
            load_shifts: Vec::new(),
            check_resamples: Vec::new(),
            check_shifts: Vec::new(),
            transition_resamples: Vec::new(),
        }
    }

    /// The scenarios the swap search judges on, from the trace the statistics come from: bootstrap
    /// resamples of its loads and transitions, and shifts of its traffic mix sized by
    /// [`Self::load_drift`] (set that first). Without them the search trusts the sample.
    pub fn plan_for_trace(&mut self, trace: &crate::RoutingTrace) {
        use crate::robust::{RESAMPLES, bootstrap_loads, bootstrap_transitions, shifted_loads};
        self.load_resamples = bootstrap_loads(trace, RESAMPLES, 0);
        self.load_shifts = shifted_loads(trace, RESAMPLES, self.load_drift, 3);
        self.check_resamples = bootstrap_loads(trace, RESAMPLES, 7);
        self.check_shifts = shifted_loads(trace, RESAMPLES, self.load_drift, 9);
        self.transition_resamples = bootstrap_transitions(trace, RESAMPLES, 5);
    }
}

/// The objective every solver is scored on: `imbalance + traffic_weight * traffic`, where imbalance is
/// Σ_l max rank load / Σ_l mean rank load (1 / balancedness) and traffic is the cross-node dispatch
/// fraction (home mode, with requests spread over ranks at random:
/// [`RoutingStats::expected_node_demand`]) or the cross-rank primary-hop fraction (affinity mode).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Objective {
    pub imbalance: f64,
    pub traffic: f64,
    pub value: f64,
}

pub fn objective(placement: &Placement, stats: &RoutingStats, mode: Mode, traffic_weight: f64) -> Objective {
    let node_of_rank = placement.topology.node_of_rank();
    let ranks = placement.num_ranks() as f64;
    let (mut max_sum, mut mean_sum, mut kept, mut total) = (0.0, 0.0, 0.0, 0.0);
    for (l, layer) in placement.layers.iter().enumerate() {
        let loads = rank_loads(&layer.ranks, &stats.load[l]);
        max_sum += loads.iter().copied().fold(0.0, f64::max);
        mean_sum += loads.iter().sum::<f64>() / ranks;
        match mode {
            Mode::Home => {
                kept += local_dispatch(&layer.ranks, &node_of_rank, &stats.expected_node_demand(l, &placement.topology.nodes));
                total += stats.load[l].iter().sum::<f64>();
            }
            Mode::Affinity if l + 1 < placement.layers.len() => {
                let t = &stats.transitions[l];
                kept += same_rank_hops(&layer.ranks, &placement.layers[l + 1].ranks, t, stats.num_experts);
                total += t.iter().sum::<f64>();
            }
            Mode::Affinity => {}
        }
    }
    let imbalance = if mean_sum > 0.0 { max_sum / mean_sum } else { 1.0 };
    let traffic = if total > 0.0 { 1.0 - kept / total } else { 0.0 };
    Objective { imbalance, traffic, value: imbalance + traffic_weight * traffic }
}

/// What a solve did, for people and for machines.
#[derive(Debug, Clone, Serialize)]
pub struct SolveReport {
    pub solver: SolverKind,
    pub mode: Mode,
    /// The objective of the warm start (`eplb`) when the solver had one.
    pub warm_start: Option<Objective>,
    pub objective: Objective,
    /// Largest relative optimality gap HiGHS proved on a rank-load subproblem (0 = all optimal).
    pub balance_gap: Option<f64>,
    /// Largest relative optimality gap proved on a traffic subproblem.
    pub traffic_gap: Option<f64>,
    pub sweeps: usize,
    pub subproblems: usize,
    pub subproblems_hit_time_limit: usize,
    pub layers_improved: usize,
    /// Affinity mode: expert swaps the scenario search applied after the ILP, and the layers they
    /// changed (see `scenario_search.rs`).
    pub search_swaps: usize,
    pub search_layers_changed: usize,
    /// Swaps the search took on its scenarios and undid because the layer then broke its caps on
    /// the independent check draws.
    pub search_swaps_rolled_back: usize,
    /// The first subproblem failure, if any (that layer kept its warm-start placement).
    pub layer_error: Option<String>,
    pub solve_seconds: f64,
}

/// Progress of a long solve: `done` of `total` layer visits in the current sweep.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub sweep: usize,
    pub done: usize,
    pub total: usize,
}

pub fn solve(
    kind: SolverKind,
    stats: &RoutingStats,
    opts: &SolveOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<(Placement, SolveReport), PlacementError> {
    opts.topology.validate()?;
    check_capacity(stats.num_experts, &opts.topology, opts.slots_per_rank)?;
    if opts.min_replicas == 0 {
        return Err(PlacementError::Solver("min_replicas must be at least 1".into()));
    }
    check_min_capacity(stats.num_experts, opts.topology.num_ranks(), opts.slots_per_rank, opts.min_replicas)?;
    if !(0.0..=1.0).contains(&opts.balance_slack) {
        return Err(PlacementError::Solver(format!("balance slack {} is not in 0..=1", opts.balance_slack)));
    }
    if !(opts.load_drift.is_finite() && opts.load_drift >= 0.0) {
        return Err(PlacementError::Solver(format!("load drift {} must be finite and at least 0", opts.load_drift)));
    }
    let started = std::time::Instant::now();
    let report = |solver, placement: &Placement, warm_start| SolveReport {
        solver,
        mode: opts.mode,
        warm_start,
        objective: objective(placement, stats, opts.mode, opts.traffic_weight),
        balance_gap: None,
        traffic_gap: None,
        sweeps: 0,
        subproblems: 0,
        subproblems_hit_time_limit: 0,
        layers_improved: 0,
        search_swaps: 0,
        search_swaps_rolled_back: 0,
        search_layers_changed: 0,
        layer_error: None,
        solve_seconds: started.elapsed().as_secs_f64(),
    };
    match kind {
        SolverKind::Contiguous => {
            let mut p = contiguous::solve(stats.num_layers, stats.num_experts, &opts.topology, opts.slots_per_rank)?;
            // Contiguous repeats the id sequence, so it already spreads ⌊slots / experts⌋ replicas of
            // everything; the post-pass only matters when that is short of the minimum.
            ensure_min_replicas(&mut p, opts.min_replicas, &stats.load)?;
            let r = report(kind, &p, None);
            Ok((p, r))
        }
        SolverKind::Eplb => {
            let p = eplb::solve_with(stats, &opts.topology, opts.slots_per_rank, opts.groups, opts.min_replicas)?;
            let r = report(kind, &p, None);
            Ok((p, r))
        }
        SolverKind::Ilp => {
            let start = eplb::solve_with(stats, &opts.topology, opts.slots_per_rank, opts.groups, opts.min_replicas)?;
            let warm = objective(&start, stats, opts.mode, opts.traffic_weight);
            let (p, run) = ilp::solve(stats, opts, start.clone(), progress)?;
            let (p, search) = match opts.mode {
                Mode::Affinity => {
                    // The search gets what is left of the budget, and at least a quarter of it.
                    let deadline = (started + opts.time_limit).max(std::time::Instant::now() + opts.time_limit / 4);
                    scenario_search::improve(stats, opts, &start, p, deadline)
                }
                Mode::Home => (p, scenario_search::SearchRun::default()),
            };
            let mut r = report(kind, &p, Some(warm));
            r.search_swaps = search.swaps;
            r.search_swaps_rolled_back = search.swaps_rolled_back;
            r.search_layers_changed = search.layers_changed;
            r.balance_gap = run.balance_gap;
            r.traffic_gap = run.traffic_gap;
            r.sweeps = run.sweeps;
            r.subproblems = run.subproblems;
            r.subproblems_hit_time_limit = run.hit_time_limit;
            r.layers_improved = run.layers_improved;
            r.layer_error = run.layer_errors;
            Ok((p, r))
        }
    }
}

pub(crate) fn check_capacity(num_experts: usize, topology: &Topology, slots_per_rank: usize) -> Result<(), PlacementError> {
    let ranks = topology.num_ranks();
    if slots_per_rank == 0 {
        return Err(PlacementError::Solver("slots per rank must be at least 1".into()));
    }
    if slots_per_rank > num_experts {
        return Err(PlacementError::Solver(format!(
            "{slots_per_rank} slots per rank exceed the {num_experts} experts (a rank holds each expert at most once)"
        )));
    }
    if ranks * slots_per_rank < num_experts {
        return Err(PlacementError::Solver(format!(
            "{ranks} ranks x {slots_per_rank} slots cannot hold {num_experts} experts"
        )));
    }
    Ok(())
}
