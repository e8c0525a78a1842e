//! The scheduler's rebalance policy: when to re-solve, and an incremental solve that moves few
//! experts.
//!
//! The live coordinator keeps a [`crate::live::LoadWindow`] of recent per-layer expert load and asks
//! [`Rebalancer::poll`] (timing: minimum interval, periodic re-check) or [`propose`] (one decision)
//! whether a new placement epoch is worth its migration. The simulator ([`sim`]) replays routing
//! traces through the same code.
//!
//! # Decision
//!
//! [`propose`] returns `None` when the window has no traffic (all zero: nothing changes), when the
//! current placement's windowed balancedness `Σ_l mean / Σ_l max` rank load is at or above
//! `threshold`, or when the best placement found within the move budget gains less than `margin`.
//! A current placement with an expert below [`RebalanceConfig::min_replicas`] replicas is always
//! raised to it first, and that proposal is made whatever the balance.
//!
//! # Incremental solve (warm start from the current placement)
//!
//! A **move** is one expert newly loaded on one rank (what a worker must fetch); the budget per
//! epoch is [`RebalanceConfig::move_budget`]. Every layer keeps its slot count per rank and every
//! validity rule of [`Placement`]. Two kinds of change, both aimed at the layer's most loaded rank
//! `m`:
//! - **replace** (1 move): a slot on some rank takes expert `y` instead of `z`, where `z` keeps at
//!   least one other replica (at least [`RebalanceConfig::min_replicas`]) — either a replica of an expert hosted on `m` is added on one of the
//!   [`DESTINATIONS`] least loaded ranks (splitting its load), or a slot on `m` trades a redundant
//!   replica for another expert (one of few candidates, see [`HEAVY`]);
//! - **swap** (2 moves): `m` and one of the [`DESTINATIONS`] least loaded ranks exchange one expert
//!   each.
//!
//! Per layer, a greedy picks the change with the largest reduction of the layer's max rank load per
//! move (ties: the larger reduction of Σ rank load², then the lowest rank / slot / expert index), and
//! never one that raises the layer's max. A change that only lowers Σ load² (several ranks tie at the
//! max) is kept only together with the following changes, up to [`LOOKAHEAD`], that do lower the
//! max ("bundles"). Across layers the budget goes bundle by bundle to the largest reduction of
//! `Σ_l max` per move — the denominator of the total balancedness, so this is the gain per migrated
//! expert — ties to the layer with the worse balancedness, then the lower index; spending stops at
//! the budget, when nothing pays any more, or once the predicted balancedness reaches `target`
//! (fewest moves that reach the target). The objective is compute balance only; cross-node traffic
//! is not part of it. Deterministic: same inputs, same proposal.
use serde::{Deserialize, Serialize};

use crate::eval::{HardwareProfile, rank_loads};
use crate::live::{LoadWindow, RECENT_HALF_LIFE_FRACTION, balancedness};
use crate::placement::LayerPlacement;
use crate::{Placement, PlacementError};

pub mod sim;

pub use sim::{Phase, Policy, SimConfig, SimReport, SimSummary, Start, StepRecord, simulate};

/// Changes that only even out load (Σ load²) without lowering a layer's max, tried before a bundle is
/// given up.
pub const LOOKAHEAD: usize = 8;

/// A new replica of an expert on the most loaded rank goes to, and a swap partner is, one of this
/// many least loaded ranks (all ranks on clusters up to this size); keeps the search for one change
/// independent of the rank count.
pub const DESTINATIONS: usize = 32;

/// A redundant replica on the most loaded rank may give its slot to an expert hosted on one of this
/// many next most loaded ranks (or to one of [`DESTINATIONS`] experts whose share grows least).
pub const HEAVY: usize = 8;

/// Bytes of one DeepSeek-V3 routed expert in fp8: 3 matrices × 7168 × 2048 × 1 byte.
pub const DEEPSEEK_V3_FP8_EXPERT_BYTES: u64 = 3 * 7168 * 2048;

/// When and how much to rebalance. See the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RebalanceConfig {
    /// Re-solve only when the windowed total balancedness (Σmean/Σmax) of the current placement is
    /// below this (0 < threshold ≤ 1). Default 0.9.
    pub threshold: f64,
    /// Commit only when the predicted balancedness gain (after − before) is at least this. Default
    /// 0.02.
    pub margin: f64,
    /// Stop spending moves once the predicted balancedness reaches this (threshold ≤ target ≤ 1); the
    /// gap to `threshold` is the hysteresis that keeps noise from re-triggering at once. Default 0.95.
    pub target: f64,
    /// Most moves (an expert newly loaded on a rank counts 1) per epoch, over the whole cluster.
    /// Default 1024, i.e. 32 per rank on 32 ranks ([`RebalanceConfig::for_ranks`] scales it with
    /// the cluster, [`RebalanceConfig::for_layers`] sets 16 per MoE layer): on
    /// DeepSeek-V3 about 18 per layer (6 % of the 16 704 slots of 32 ranks × 9), ≈ 45 GB of fp8
    /// weights per epoch, ≈ 1.4 GB per GPU on average — the memory the two-phase switch holds beside
    /// the old slots. It is a cap, not a quota: spending stops at `target`, so small drifts move few
    /// experts; a full reshuffle of the hot experts takes a few epochs. (The cap is on the total; one
    /// rank may receive more than the average.)
    pub max_moves: usize,
    /// Migration bandwidth budget in bytes per second: an epoch loads at most
    /// `max_bytes_per_s × min_interval_s` bytes. `None`: only `max_moves` limits.
    pub max_bytes_per_s: Option<f64>,
    /// Bytes of one expert's weights (what one move loads). Default: DeepSeek-V3 in fp8
    /// ([`DEEPSEEK_V3_FP8_EXPERT_BYTES`]); see [`RebalanceConfig::expert_bytes_for`].
    pub expert_bytes: u64,
    /// No two epochs closer than this many seconds. Default 5.
    pub min_interval_s: f64,
    /// Also re-check this often even above the threshold (still subject to `margin`). Default
    /// `None`.
    pub period_s: Option<f64>,
    /// When the recent window's routing is at least this far from the long window's
    /// ([`crate::live::LoadWindow::shift_distance`], 0–1), the workload is shifting: decide (gate,
    /// solve, check the margin) on where the load is heading ([`Rebalancer::poll_window`]) instead
    /// of on the long window, a blend of before and after that a placement solved on would fit
    /// neither. Default 0.05 (steady traffic of a few thousand assignments per layer and window
    /// stays near 0.01); never below three times the distance sampling alone gives
    /// ([`crate::live::LoadWindow::shift_distance_noise`]); above 1: never.
    pub shift_distance: f64,
    /// Every expert stays on at least `min(min_replicas, ranks)` ranks: a replace never takes a slot
    /// from an expert at that floor, and a current placement below it is first raised to it
    /// ([`crate::solver::ensure_min_replicas`], its moves counted and taken from the budget; the
    /// threshold and margin do not hold such a proposal back). Default 1 (no replicas required).
    pub min_replicas: usize,
    /// Log-normal drift of expert loads the incremental solve plans for, as the ILP does
    /// ([`crate::solver::SolveOptions::load_drift`]): a move is judged on replica weights inflated
    /// for drift ([`crate::robust::drift_inflation`]), so heavy experts are split and spread rather
    /// than paired to fit the window exactly; the gate, margin and target stay on the window's own
    /// loads, and no layer leaves with a higher max under them. `None` (default): the drift the
    /// live window shows ([`LoadWindow::observed_drift`], about 0 on steady traffic, what a shift
    /// moves while it is under way) in [`Rebalancer::poll_window`], none in [`propose`]; 0: fit
    /// the window.
    pub load_drift: Option<f64>,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            threshold: 0.9,
            margin: 0.02,
            target: 0.95,
            max_moves: 1024,
            max_bytes_per_s: None,
            expert_bytes: DEEPSEEK_V3_FP8_EXPERT_BYTES,
            min_interval_s: 5.0,
            period_s: None,
            shift_distance: 0.05,
            min_replicas: 1,
            load_drift: None,
        }
    }
}

impl RebalanceConfig {
    /// The defaults with `max_moves` = 16 × `num_layers` (at least 1).
    pub fn for_layers(num_layers: usize) -> Self {
        Self { max_moves: num_layers.saturating_mul(16).max(1), ..Self::default() }
    }

    /// The defaults with `max_moves` = 32 × `num_ranks` (at least 1): the same per-GPU migration
    /// volume as the default on 32 ranks, since every rank loads its own new slots.
    pub fn for_ranks(num_ranks: usize) -> Self {
        Self { max_moves: num_ranks.saturating_mul(32).max(1), ..Self::default() }
    }

    /// Bytes of one routed expert (gate, up and down projections) of the model `hw` describes, at
    /// `bytes_per_weight` (1 = fp8, 2 = bf16).
    pub fn expert_bytes_for(hw: &HardwareProfile, bytes_per_weight: f64) -> u64 {
        let b = 3.0 * hw.hidden_size as f64 * hw.expert_intermediate_size as f64 * bytes_per_weight;
        if b.is_finite() && b > 0.0 { b.round() as u64 } else { 0 }
    }

    /// Checks every field is in range; the error names the first that is not.
    pub fn validate(&self) -> Result<(), PlacementError> {
        let bad = |m: String| Err(PlacementError::Invalid(format!("rebalance config: {m}")));
        if !(self.threshold.is_finite() && self.threshold > 0.0 && self.threshold <= 1.0) {
            return bad(format!("threshold {} is not in (0, 1]", self.threshold));
        }
        if !(self.margin.is_finite() && (0.0..1.0).contains(&self.margin)) {
            return bad(format!("margin {} is not in [0, 1)", self.margin));
        }
        if !(self.target.is_finite() && self.target >= self.threshold && self.target <= 1.0) {
            return bad(format!("target {} is not in [threshold {}, 1]", self.target, self.threshold));
        }
        if self.max_moves == 0 {
            return bad("max_moves must be at least 1".into());
        }
        if !(self.min_interval_s.is_finite() && self.min_interval_s >= 0.0) {
            return bad(format!("min_interval_s {} is not a finite non-negative number of seconds", self.min_interval_s));
        }
        if !(self.shift_distance.is_finite() && self.shift_distance > 0.0) {
            return bad(format!("shift_distance {} is not a positive number", self.shift_distance));
        }
        if self.min_replicas == 0 {
            return bad("min_replicas must be at least 1".into());
        }
        if let Some(d) = self.load_drift.filter(|d| !(d.is_finite() && *d >= 0.0)) {
            return bad(format!("load_drift {d} is not a finite non-negative number"));
        }
        if let Some(p) = self.period_s.filter(|p| !(p.is_finite() && *p > 0.0)) {
            return bad(format!("period_s {p} is not a positive number of seconds"));
        }
        if let Some(b) = self.max_bytes_per_s {
            if !(b.is_finite() && b > 0.0) {
                return bad(format!("max_bytes_per_s {b} is not a positive number"));
            }
            if self.expert_bytes == 0 {
                return bad("expert_bytes must be positive when max_bytes_per_s is set".into());
            }
            let per_epoch = b * self.min_interval_s;
            if per_epoch < self.expert_bytes as f64 {
                return bad(format!(
                    "max_bytes_per_s {b} x min_interval_s {} = {per_epoch:.0} bytes per epoch is less than one expert ({} bytes)",
                    self.min_interval_s, self.expert_bytes
                ));
            }
        }
        Ok(())
    }

    /// Moves one epoch may spend: `max_moves`, capped by the bandwidth budget when there is one.
    pub fn move_budget(&self) -> usize {
        self.move_budget_over(self.min_interval_s)
    }

    /// Moves an epoch may spend when epochs are `interval_s` apart: `max_moves`, capped by the
    /// bandwidth budget over `interval_s` when there is one.
    pub fn move_budget_over(&self, interval_s: f64) -> usize {
        match self.max_bytes_per_s {
            Some(b) if self.expert_bytes > 0 => {
                let by_bytes = (b * interval_s / self.expert_bytes as f64).floor();
                if by_bytes.is_finite() && by_bytes >= 0.0 {
                    self.max_moves.min(by_bytes.min(usize::MAX as f64) as usize)
                } else {
                    self.max_moves
                }
            }
            _ => self.max_moves,
        }
    }
}

/// A new placement worth committing.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Proposal {
    pub placement: Placement,
    /// Windowed total balancedness of the current placement.
    pub before: f64,
    /// Predicted total balancedness of `placement` under the same window.
    pub after: f64,
    /// Experts newly loaded on some rank (Σ over layers and ranks of [`diff`]).
    pub moves: usize,
    /// `moves × expert_bytes`.
    pub bytes: u64,
    /// Moves per layer.
    pub per_layer_moves: Vec<usize>,
    /// Decided during a workload shift, on where the load is heading ([`Rebalancer::poll_window`]);
    /// `before` and `after` are under that load then.
    pub during_shift: bool,
}

/// Experts every rank gains from `a` to `b`, per layer: `out[layer][rank]` = experts in `b`'s slots
/// of that rank that `a`'s do not hold, in `b`'s slot order — what the workers must load for epoch
/// `b`. Layers or ranks `a` lacks count as empty there (everything is gained).
pub fn diff(a: &Placement, b: &Placement) -> Vec<Vec<Vec<usize>>> {
    b.layers
        .iter()
        .enumerate()
        .map(|(l, lb)| {
            lb.ranks
                .iter()
                .enumerate()
                .map(|(r, slots)| {
                    let old = a.layers.get(l).and_then(|la| la.ranks.get(r));
                    let mut gained: Vec<usize> = Vec::new();
                    for &e in slots {
                        if !old.is_some_and(|o| o.contains(&e)) && !gained.contains(&e) {
                            gained.push(e);
                        }
                    }
                    gained
                })
                .collect()
        })
        .collect()
}

/// Total moves from `a` to `b`: Σ of [`diff`].
pub fn moves(a: &Placement, b: &Placement) -> usize {
    diff(a, b).iter().flatten().map(Vec::len).sum()
}

/// One rebalance decision on the windowed `load[layer][expert]` (e.g.
/// [`crate::live::LoadWindow::load`]). See the module documentation.
///
/// Errors: an invalid `cfg` or `current`, `load` that does not fit `current` (layer or expert
/// count, or a negative / non-finite entry), or a `current` below [`RebalanceConfig::min_replicas`]
/// whose slots cannot hold that many replicas ([`PlacementError::TooFewSlots`]).
pub fn propose(cfg: &RebalanceConfig, current: &Placement, load: &[Vec<f64>]) -> Result<Option<Proposal>, PlacementError> {
    decide(cfg, current, load, true, cfg.move_budget(), cfg.load_drift.unwrap_or(0.0))
}

/// [`propose`] without the threshold gate (the margin still applies): the periodic re-check.
pub fn propose_ungated(cfg: &RebalanceConfig, current: &Placement, load: &[Vec<f64>]) -> Result<Option<Proposal>, PlacementError> {
    decide(cfg, current, load, false, cfg.move_budget(), cfg.load_drift.unwrap_or(0.0))
}

fn check_load(current: &Placement, load: &[Vec<f64>]) -> Result<(), PlacementError> {
    let mismatch = |m: String| Err(PlacementError::Mismatch(m));
    if load.len() != current.num_layers {
        return mismatch(format!("load lists {} layers, the placement has {}", load.len(), current.num_layers));
    }
    for (l, row) in load.iter().enumerate() {
        if row.len() != current.num_experts {
            return mismatch(format!("load layer {l} has {} experts, the placement has {}", row.len(), current.num_experts));
        }
        if let Some(e) = row.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return mismatch(format!("load[{l}][{e}] = {} is not a finite non-negative count", row[e]));
        }
    }
    Ok(())
}

fn decide(
    cfg: &RebalanceConfig,
    current: &Placement,
    load: &[Vec<f64>],
    gated: bool,
    budget: usize,
    drift: f64,
) -> Result<Option<Proposal>, PlacementError> {
    cfg.validate()?;
    current.validate()?;
    check_load(current, load)?;
    let floor = crate::solver::effective_min(cfg.min_replicas, current.num_ranks());
    // Below the replica floor: raise it first; that proposal is due whatever the balance says.
    let mut base = current.clone();
    let repair = if crate::solver::min_replica_count(current) < floor {
        crate::solver::ensure_min_replicas(&mut base, floor, load)?
    } else {
        0
    };
    if repair == 0 && load.iter().flatten().all(|&v| v == 0.0) {
        return Ok(None);
    }
    let (_, before) = balancedness(current, load);
    if repair == 0 && gated && before >= cfg.threshold {
        return Ok(None);
    }
    let layers = plan(&base, load, budget.saturating_sub(repair), cfg.target, floor, drift);
    let mut next = base.clone();
    for (l, ranks) in layers.into_iter().enumerate() {
        // Safety net: a layer never leaves worse than it came (the greedy guarantees it; floating
        // point should not be trusted to).
        let old_max = max_of(&rank_loads(&base.layers[l].ranks, &load[l]));
        if max_of(&rank_loads(&ranks, &load[l])) <= old_max {
            next.layers[l] = LayerPlacement { ranks };
        }
    }
    next.validate().map_err(|e| PlacementError::Solver(format!("rebalance produced an invalid placement: {e}")))?;
    if crate::solver::min_replica_count(&next) < floor {
        return Err(PlacementError::Solver(format!("rebalance left an expert with fewer than {floor} replicas")));
    }
    let (_, after) = balancedness(&next, load);
    let per_layer_moves: Vec<usize> =
        diff(current, &next).iter().map(|layer| layer.iter().map(Vec::len).sum()).collect();
    let moves: usize = per_layer_moves.iter().sum();
    // A migration must pay in the window's own balance (drift planning alone moves nothing).
    if moves == 0 || (repair == 0 && (after <= before || after - before < cfg.margin)) {
        return Ok(None);
    }
    Ok(Some(Proposal {
        placement: next,
        before,
        after,
        moves,
        bytes: (moves as u64).saturating_mul(cfg.expert_bytes),
        per_layer_moves,
        during_shift: false,
    }))
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Timing around [`propose`] for a long-running scheduler: no two epochs closer than
/// `min_interval_s`; below the threshold every poll re-solves; above it, one ungated re-check per
/// `period_s` (when set). Times are seconds on any monotonic clock.
///
/// The caller polls on every load report and must not poll while a proposal it got is still being
/// migrated (its placement is not current yet). The epoch time is taken when a proposal is returned.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    cfg: RebalanceConfig,
    last_epoch_s: Option<f64>,
    last_check_s: Option<f64>,
}

impl Rebalancer {
    pub fn new(cfg: RebalanceConfig) -> Result<Self, PlacementError> {
        cfg.validate()?;
        Ok(Self { cfg, last_epoch_s: None, last_check_s: None })
    }

    pub fn config(&self) -> &RebalanceConfig {
        &self.cfg
    }

    /// When the last proposal was handed out.
    pub fn last_epoch_s(&self) -> Option<f64> {
        self.last_epoch_s
    }

    /// The decision at time `now_s` for `current` under the windowed `load`.
    pub fn poll(&mut self, now_s: f64, current: &Placement, load: &[Vec<f64>]) -> Result<Option<Proposal>, PlacementError> {
        self.poll_spaced(now_s, current, load, self.cfg.min_interval_s, self.cfg.load_drift.unwrap_or(0.0))
    }

    /// [`Rebalancer::poll`] with epochs at least `min_interval_s` apart.
    fn poll_spaced(
        &mut self,
        now_s: f64,
        current: &Placement,
        load: &[Vec<f64>],
        min_interval_s: f64,
        drift: f64,
    ) -> Result<Option<Proposal>, PlacementError> {
        if !now_s.is_finite() {
            return Err(PlacementError::Invalid(format!("rebalance poll at time {now_s}")));
        }
        if self.last_epoch_s.is_some_and(|t| now_s - t < min_interval_s) {
            return Ok(None);
        }
        let periodic = self.cfg.period_s.is_some_and(|p| self.last_check_s.is_none_or(|t| now_s - t >= p));
        let proposal = decide(&self.cfg, current, load, !periodic, self.cfg.move_budget_over(min_interval_s), drift)?;
        if periodic || proposal.is_some() {
            self.last_check_s = Some(now_s);
        }
        if proposal.is_some() {
            self.last_epoch_s = Some(now_s);
        }
        Ok(proposal)
    }

    /// [`Rebalancer::poll`] on a live window: on its long load, or, while the workload is
    /// shifting (see [`RebalanceConfig::shift_distance`]), on where the load is heading (the
    /// recent load moved on along the windows' trend by one epoch spacing,
    /// [`LoadWindow::trend_load`]) with epochs allowed at the recent window's pace
    /// (`min_interval_s` × [`RECENT_HALF_LIFE_FRACTION`]): the first epoch of a shift sees only
    /// its start, and the load goes on moving. The proposal says which.
    pub fn poll_window(&mut self, now_s: f64, current: &Placement, window: &LoadWindow) -> Result<Option<Proposal>, PlacementError> {
        // Below three times what sampling alone gives, a distance tells nothing (little traffic).
        let drift = self.cfg.load_drift.unwrap_or_else(|| window.observed_drift());
        if window.shift_distance() < self.cfg.shift_distance.max(3.0 * window.shift_distance_noise()) {
            return self.poll_spaced(now_s, current, window.load(), self.cfg.min_interval_s, drift);
        }
        let spacing = self.cfg.min_interval_s * RECENT_HALF_LIFE_FRACTION;
        let ahead = window.trend_load(spacing);
        Ok(self.poll_spaced(now_s, current, &ahead, spacing, drift)?.map(|p| Proposal { during_shift: true, ..p }))
    }
}

// ---------------------------------------------------------------------------------------------
// The incremental solve.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Move {
    /// `rank`'s slot `slot` takes `expert` (its old expert keeps another replica).
    Replace { rank: usize, slot: usize, expert: usize },
    /// Ranks `a` and `b` exchange the experts in slots `sa` and `sb`.
    Swap { a: usize, sa: usize, b: usize, sb: usize },
}

impl Move {
    fn cost(&self) -> usize {
        match self {
            Move::Replace { .. } => 1,
            Move::Swap { .. } => 2,
        }
    }
}

/// One layer being improved.
#[derive(Debug, Clone)]
struct LayerState<'a> {
    load: &'a [f64],
    ranks: Vec<Vec<usize>>,
    count: Vec<usize>,
    /// Ranks hosting every expert, ascending.
    hosts: Vec<Vec<usize>>,
    rank_load: Vec<f64>,
    /// Ranks by load, heaviest first (ties: lower index first).
    order: Vec<usize>,
    /// Fewest replicas an expert may be left with (`min_replicas`, at least 1).
    floor: usize,
    /// `k` of the drift-inflated replica weight `w + k w²` ([`crate::robust::drift_curvature`]),
    /// fixed for the layer's whole plan; 0 without drift.
    curvature: f64,
}

/// Per-rank load changes of one candidate change.
#[derive(Debug, Default)]
struct Scratch {
    delta: Vec<f64>,
    mark: Vec<bool>,
    list: Vec<usize>,
}

impl Scratch {
    fn reset(&mut self, ranks: usize) {
        if self.mark.len() != ranks {
            self.delta = vec![0.0; ranks];
            self.mark = vec![false; ranks];
            self.list.clear();
        }
        for &r in &self.list {
            self.delta[r] = 0.0;
            self.mark[r] = false;
        }
        self.list.clear();
    }

    fn add(&mut self, r: usize, d: f64) {
        if !self.mark[r] {
            self.mark[r] = true;
            self.list.push(r);
        }
        self.delta[r] += d;
    }

    fn touched(&self, r: usize) -> bool {
        self.mark.get(r).copied().unwrap_or(false)
    }
}

/// The best change found so far: gain of the max and of Σ load², per move.
struct Best {
    mv: Move,
    gain: f64,
    sq: f64,
}

impl<'a> LayerState<'a> {
    fn new(ranks: Vec<Vec<usize>>, load: &'a [f64], floor: usize, drift: f64) -> Self {
        let mut s = Self {
            load,
            ranks,
            count: Vec::new(),
            hosts: Vec::new(),
            rank_load: Vec::new(),
            order: Vec::new(),
            floor: floor.max(1),
            curvature: 0.0,
        };
        s.refresh();
        let per_replica: Vec<f64> = (0..load.len()).map(|e| load[e] / s.count[e].max(1) as f64).collect();
        let max_normal = crate::robust::expected_max_normal(s.ranks.len());
        if let Some(k) = crate::robust::drift_curvature(&per_replica, &s.count, s.ranks.len(), drift, max_normal) {
            s.curvature = k;
            s.refresh();
        }
        s
    }

    /// What one of `copies` replicas of expert `e` weighs: its share of the load, inflated for
    /// drift.
    fn weigh(&self, e: usize, copies: f64) -> f64 {
        let w = self.load[e] / copies.max(1.0);
        w + self.curvature * w * w
    }

    /// The layer's max rank load under the sampled loads (no drift).
    fn nominal_max(&self) -> f64 {
        max_of(&rank_loads(&self.ranks, self.load))
    }

    fn refresh(&mut self) {
        let ne = self.load.len();
        self.count.clear();
        self.count.resize(ne, 0);
        self.hosts.resize_with(ne, Vec::new);
        for h in &mut self.hosts {
            h.clear();
        }
        for (r, slots) in self.ranks.iter().enumerate() {
            for &e in slots {
                if e < ne {
                    self.count[e] += 1;
                    self.hosts[e].push(r);
                }
            }
        }
        self.rank_load = self.ranks.iter().map(|slots| slots.iter().map(|&e| self.weigh(e, self.count[e] as f64)).sum()).collect();
        self.order = (0..self.ranks.len()).collect();
        let rl = &self.rank_load;
        self.order.sort_by(|&a, &b| rl[b].total_cmp(&rl[a]).then(a.cmp(&b)));
    }

    fn max(&self) -> f64 {
        self.order.first().map_or(0.0, |&r| self.rank_load[r])
    }

    fn share(&self, e: usize) -> f64 {
        self.weigh(e, self.count[e] as f64)
    }

    fn apply(&mut self, mv: Move) {
        match mv {
            Move::Replace { rank, slot, expert } => self.ranks[rank][slot] = expert,
            Move::Swap { a, sa, b, sb } => {
                let x = self.ranks[a][sa];
                self.ranks[a][sa] = self.ranks[b][sb];
                self.ranks[b][sb] = x;
            }
        }
        self.refresh();
    }

    /// Highest load among ranks `scratch` does not touch.
    fn max_unaffected(&self, scratch: &Scratch) -> f64 {
        self.order.iter().find(|&&r| !scratch.touched(r)).map_or(0.0, |&r| self.rank_load[r])
    }

    /// New max rank load and change of Σ load² when `rank`'s slot `slot` takes expert `y`.
    fn eval_replace(&self, rank: usize, slot: usize, y: usize, sc: &mut Scratch) -> (f64, f64) {
        let z = self.ranks[rank][slot];
        let (cz, cy) = (self.count[z] as f64, self.count[y] as f64);
        sc.reset(self.ranks.len());
        sc.add(rank, self.weigh(y, cy + 1.0) - self.weigh(z, cz));
        if cz > 1.0 {
            let dz = self.weigh(z, cz - 1.0) - self.weigh(z, cz);
            for &h in &self.hosts[z] {
                if h != rank {
                    sc.add(h, dz);
                }
            }
        }
        let dy = self.weigh(y, cy + 1.0) - self.weigh(y, cy);
        for &h in &self.hosts[y] {
            sc.add(h, dy);
        }
        let mut new_max = self.max_unaffected(sc);
        let mut dsq = 0.0;
        for &r in &sc.list {
            let (old, new) = (self.rank_load[r], self.rank_load[r] + sc.delta[r]);
            new_max = new_max.max(new);
            dsq += new * new - old * old;
        }
        (new_max, dsq)
    }

    /// The best change costing at most `max_cost` moves, if any makes progress.
    fn best_move(&self, max_cost: usize, sc: &mut Scratch) -> Option<Move> {
        let nr = self.ranks.len();
        let m = *self.order.first()?;
        let big = self.rank_load[m];
        if nr < 2 || big <= 0.0 || max_cost == 0 {
            return None;
        }
        let (tol, tol_sq) = (big * 1e-9, big * big * 1e-9);
        let mut best: Option<Best> = None;
        let mut consider = |mv: Move, new_max: f64, dsq: f64| {
            if new_max > big {
                return; // never make the layer worse
            }
            let (gain, sq) = (big - new_max, -dsq);
            if gain <= tol && sq <= tol_sq {
                return;
            }
            let c = mv.cost() as f64;
            let (gain, sq) = (gain / c, sq / c);
            let better = match &best {
                None => true,
                Some(b) => gain > b.gain + tol || (gain >= b.gain - tol && sq > b.sq + tol_sq),
            };
            if better {
                best = Some(Best { mv, gain, sq });
            }
        };
        let on_m = &self.ranks[m];
        // Replace elsewhere: a replica of an expert of `m` takes a redundant slot on one of the
        // [`DESTINATIONS`] least loaded other ranks.
        let mut light: Vec<usize> = self.order.iter().rev().copied().filter(|&r| r != m).take(DESTINATIONS).collect();
        light.sort_unstable();
        for &y in on_m {
            if self.load[y] <= 0.0 {
                continue;
            }
            for &r in &light {
                if self.hosts[y].binary_search(&r).is_ok() {
                    continue;
                }
                for (slot, &z) in self.ranks[r].iter().enumerate() {
                    if self.count[z] <= self.floor {
                        continue;
                    }
                    let (nm, dsq) = self.eval_replace(r, slot, y, sc);
                    consider(Move::Replace { rank: r, slot, expert: y }, nm, dsq);
                }
            }
        }
        // Replace on `m`: a redundant replica on `m` gives its slot to another expert — one of the
        // [`DESTINATIONS`] experts whose share grows least by a replica, or one hosted on the
        // [`HEAVY`] most loaded other ranks (whose load its new replica relieves).
        let mut ys: Vec<usize> = Vec::new();
        if on_m.iter().any(|&x| self.count[x] > self.floor) {
            let grown = |e: usize| self.weigh(e, (self.count[e] + 1) as f64);
            let mut by_share: Vec<usize> = (0..self.load.len()).collect();
            by_share.sort_by(|&a, &b| grown(a).total_cmp(&grown(b)).then(a.cmp(&b)));
            ys.extend(by_share.into_iter().take(DESTINATIONS));
            for &r in self.order.iter().filter(|&&r| r != m).take(HEAVY) {
                ys.extend_from_slice(&self.ranks[r]);
            }
            ys.sort_unstable();
            ys.dedup();
        }
        for (slot, &x) in on_m.iter().enumerate() {
            if self.count[x] <= self.floor {
                continue;
            }
            let sx = self.share(x);
            for &y in &ys {
                if on_m.contains(&y) || self.weigh(y, (self.count[y] + 1) as f64) > sx {
                    continue;
                }
                let (nm, dsq) = self.eval_replace(m, slot, y, sc);
                consider(Move::Replace { rank: m, slot, expert: y }, nm, dsq);
            }
        }
        // Swap: `m` and rank `b` exchange one expert each.
        if max_cost >= 2 {
            for (sa, &x) in on_m.iter().enumerate() {
                let sx = self.share(x);
                for &b in &light {
                    if self.hosts[x].binary_search(&b).is_ok() {
                        continue;
                    }
                    let others = self.order.iter().find(|&&r| r != m && r != b).map_or(0.0, |&r| self.rank_load[r]);
                    for (sb, &y) in self.ranks[b].iter().enumerate() {
                        let sy = self.share(y);
                        if sy >= sx || on_m.contains(&y) {
                            continue;
                        }
                        let (na, nb) = (big - sx + sy, self.rank_load[b] + sx - sy);
                        let dsq = na * na + nb * nb - big * big - self.rank_load[b] * self.rank_load[b];
                        consider(Move::Swap { a: m, sa, b, sb }, others.max(na).max(nb), dsq);
                    }
                }
            }
        }
        best.map(|b| b.mv)
    }
}

/// Changes to one layer that together lower its max: the resulting state, moves spent, gain.
struct Bundle<'a> {
    state: LayerState<'a>,
    cost: usize,
    gain: f64,
}

/// The next changes of `layer` that lower its max, within `budget` moves and [`LOOKAHEAD`] changes.
fn next_bundle<'a>(layer: &LayerState<'a>, budget: usize, sc: &mut Scratch) -> Option<Bundle<'a>> {
    let start = layer.max();
    if budget == 0 || start <= 0.0 {
        return None;
    }
    let tol = start * 1e-9;
    let mut state = layer.clone();
    let mut cost = 0;
    for _ in 0..LOOKAHEAD {
        let mv = state.best_move(budget - cost, sc)?;
        state.apply(mv);
        cost += mv.cost();
        let gain = start - state.max();
        if gain > tol {
            return Some(Bundle { state, cost, gain });
        }
        if cost >= budget {
            return None;
        }
    }
    None
}

/// The improved slots of every layer of `current` under `load`, spending at most `budget` moves.
/// No replace leaves an expert with fewer than `floor` replicas.
/// Moves are chosen on replica weights inflated for `drift` (see [`RebalanceConfig::load_drift`]);
/// `target` is checked on the sampled loads.
pub(crate) fn plan(current: &Placement, load: &[Vec<f64>], budget: usize, target: f64, floor: usize, drift: f64) -> Vec<Vec<Vec<usize>>> {
    let nr = current.num_ranks().max(1) as f64;
    let mut states: Vec<LayerState> =
        current.layers.iter().zip(load).map(|(l, row)| LayerState::new(l.ranks.clone(), row, floor, drift)).collect();
    let means: Vec<f64> = load.iter().map(|row| row.iter().sum::<f64>() / nr).collect();
    let sum_mean: f64 = means.iter().sum();
    let mut maxes: Vec<f64> = states.iter().map(LayerState::nominal_max).collect();
    let mut sc = Scratch::default();
    let mut remaining = budget;
    let mut bundles: Vec<Option<Bundle>> = states.iter().map(|s| next_bundle(s, remaining, &mut sc)).collect();
    loop {
        let sum_max: f64 = maxes.iter().sum();
        if remaining == 0 || sum_max <= 0.0 || sum_mean / sum_max >= target {
            break;
        }
        for (l, b) in bundles.iter_mut().enumerate() {
            if b.as_ref().is_some_and(|b| b.cost > remaining) {
                *b = next_bundle(&states[l], remaining, &mut sc);
            }
        }
        let bal = |l: usize| if maxes[l] > 0.0 { means[l] / maxes[l] } else { 1.0 };
        let mut pick: Option<(usize, f64)> = None;
        for (l, b) in bundles.iter().enumerate() {
            let Some(b) = b else { continue };
            let ratio = b.gain / b.cost as f64;
            let better = match pick {
                None => true,
                Some((p, pr)) => {
                    let tol = 1e-12 * pr.abs().max(ratio.abs());
                    ratio > pr + tol || (ratio >= pr - tol && bal(l) < bal(p))
                }
            };
            if better {
                pick = Some((l, ratio));
            }
        }
        let Some((l, _)) = pick else { break };
        let Some(b) = bundles[l].take() else { break };
        remaining -= b.cost;
        states[l] = b.state;
        maxes[l] = states[l].nominal_max();
        bundles[l] = next_bundle(&states[l], remaining, &mut sc);
    }
    states.into_iter().map(|s| s.ranks).collect()
}

#[cfg(test)]
mod tests;
