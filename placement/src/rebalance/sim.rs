//! Replaying routing traces through the rebalance policy, in simulated time.
//!
//! The token stream is a sequence of **phases**, each a routing trace replayed cyclically for a
//! number of engine steps (step `i` of a phase takes the trace's tokens `i·N .. (i+1)·N` modulo its
//! length, `N` = tokens per step); the **shift** is the first step of the second phase. Every step:
//!
//! 1. a migration whose delay has passed is applied (the new placement serves from this step on;
//!    delay = proposal bytes / `migration_bytes_per_s`, loading beside the old slots as the two-phase
//!    commit does, so serving does not stop and is not slowed in this model);
//! 2. the step's simulated time is the evaluator's hardware model on the step's load
//!    ([`crate::eval::simulate_load`]: per layer the straggler rank's compute + communication, every
//!    rank home to an equal share of the step's tokens — data-parallel attention with balanced
//!    batches); simulated time advances by it;
//! 3. the [`LoadWindow`] decays by the step time and adds the step's counts;
//! 4. under a rebalancing policy, at most once per `report_interval_s` and only while no migration is
//!    in flight, the coordinator's [`Rebalancer::poll`] is asked for a proposal on the window.
//!
//! Per step it records the step time, the step's own balancedness, the windowed balancedness and the
//! migrations applied. The summary: tokens/s over the run, p50/p99 step time, balancedness after
//! the shift (Σmean/Σmax over all post-shift steps; every step has the same tokens, so this is the
//! harmonic mean of the per-step values), recovery time (simulated seconds from the shift until the
//! windowed balancedness is at or above the threshold for good, through the end of the run; 0 when
//! it never fell below; `None` when it is below at the end), epochs, moves and bytes migrated.
use std::collections::HashMap;
use std::rc::Rc;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{Proposal, RebalanceConfig, Rebalancer};
use crate::eval::{HardwareProfile, simulate_load};
use crate::live::{LoadWindow, balancedness};
use crate::solver::eplb;
use crate::{Placement, PlacementError, RoutingTrace};

/// One routing phase: `trace` replayed cyclically for `steps` engine steps.
#[derive(Debug, Clone, Copy)]
pub struct Phase<'a> {
    pub trace: &'a RoutingTrace,
    pub steps: usize,
}

/// The placement a rebalancing policy starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Start {
    /// The initial placement given to [`simulate`] (e.g. contiguous).
    Initial,
    /// EPLB solved on the whole first phase's load.
    EplbFirstPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The initial placement throughout (`static`).
    Static,
    /// EPLB solved on the first phase, never changed (`static-eplb`).
    StaticEplb,
    /// [`Rebalancer`] from the given start (`rebalance` from the initial placement,
    /// `rebalance-eplb` from EPLB on the first phase).
    Rebalance(Start),
}

impl Policy {
    pub const ALL: [Policy; 4] =
        [Policy::Static, Policy::StaticEplb, Policy::Rebalance(Start::Initial), Policy::Rebalance(Start::EplbFirstPhase)];

    pub fn name(&self) -> &'static str {
        match self {
            Policy::Static => "static",
            Policy::StaticEplb => "static-eplb",
            Policy::Rebalance(Start::Initial) => "rebalance",
            Policy::Rebalance(Start::EplbFirstPhase) => "rebalance-eplb",
        }
    }

    pub fn start(&self) -> Start {
        match self {
            Policy::Static | Policy::Rebalance(Start::Initial) => Start::Initial,
            Policy::StaticEplb | Policy::Rebalance(Start::EplbFirstPhase) => Start::EplbFirstPhase,
        }
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown policy {s:?} (expected static, static-eplb, rebalance or rebalance-eplb)"))
    }
}

/// Simulation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// Tokens every engine step routes (all ranks together). Default 4096.
    pub tokens_per_step: usize,
    /// How often workers report load and the coordinator polls the rebalancer, simulated seconds.
    /// Default 1.
    pub report_interval_s: f64,
    /// Half-life of the load window, simulated seconds. Default 2.
    pub window_half_life_s: f64,
    /// Rate at which the cluster loads migrated experts (all ranks together, e.g. from host memory
    /// or peers while serving), bytes per second. Default 100 GB/s (≈ 3 GB/s per GPU on 32).
    pub migration_bytes_per_s: f64,
    /// Expert groups for hierarchical EPLB (the `static-eplb` / `rebalance-eplb` starts).
    pub groups: Option<usize>,
    pub hardware: HardwareProfile,
    pub rebalance: RebalanceConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            tokens_per_step: 4096,
            report_interval_s: 1.0,
            window_half_life_s: 2.0,
            migration_bytes_per_s: 100e9,
            groups: None,
            hardware: HardwareProfile::h100(),
            rebalance: RebalanceConfig::default(),
        }
    }
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), PlacementError> {
        let bad = |m: String| Err(PlacementError::Invalid(format!("simulation config: {m}")));
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if self.tokens_per_step == 0 {
            return bad("tokens_per_step must be at least 1".into());
        }
        if !pos(self.report_interval_s) {
            return bad(format!("report_interval_s {} is not a positive number of seconds", self.report_interval_s));
        }
        if !pos(self.window_half_life_s) {
            return bad(format!("window_half_life_s {} is not a positive number of seconds", self.window_half_life_s));
        }
        if !pos(self.migration_bytes_per_s) {
            return bad(format!("migration_bytes_per_s {} is not a positive rate", self.migration_bytes_per_s));
        }
        self.hardware.validate()?;
        self.rebalance.validate()
    }
}

/// One simulated engine step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub phase: usize,
    /// Simulated time at the start of the step, seconds.
    pub start_s: f64,
    pub step_ms: f64,
    /// Balancedness of the serving placement under this step's own load.
    pub balancedness: f64,
    /// Balancedness of the serving placement under the load window, after this step.
    pub windowed_balancedness: f64,
    /// Placement epochs applied so far (0 = the starting placement).
    pub epoch: usize,
    /// Moves and bytes of a migration applied at the start of this step.
    pub moves_applied: usize,
    pub bytes_applied: u64,
}

/// What a policy achieved over the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimSummary {
    pub policy: String,
    pub start: Start,
    pub steps: usize,
    pub tokens: u64,
    pub simulated_s: f64,
    pub tokens_per_s: f64,
    pub mean_step_ms: f64,
    pub p50_step_ms: f64,
    pub p99_step_ms: f64,
    /// Simulated time of the shift (first step of the second phase); `None` with one phase.
    pub shift_s: Option<f64>,
    /// Σmean/Σmax over the steps before / after the shift.
    pub balancedness_before_shift: Option<f64>,
    pub balancedness_after_shift: Option<f64>,
    pub tokens_per_s_after_shift: Option<f64>,
    /// Seconds from the shift until the windowed balancedness stays ≥ threshold (see module docs).
    pub recovery_s: Option<f64>,
    pub final_windowed_balancedness: f64,
    /// Placement epochs applied.
    pub epochs: usize,
    /// Experts loaded on some rank by those epochs (moves).
    pub migrations: usize,
    pub bytes_moved: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    pub summary: SimSummary,
    pub steps: Vec<StepRecord>,
}

/// Distinct step batches kept in memory at most (beyond, batches are recounted).
const BATCH_CACHE: usize = 256;

/// Per-layer, per-expert counts of the step batches, shared by all policies.
struct Batches<'a> {
    phases: &'a [Phase<'a>],
    n: usize,
    cache: HashMap<(usize, usize), Rc<Vec<Vec<f64>>>>,
}

impl<'a> Batches<'a> {
    fn get(&mut self, phase: usize, offset: usize) -> Rc<Vec<Vec<f64>>> {
        if let Some(b) = self.cache.get(&(phase, offset)) {
            return b.clone();
        }
        let trace = self.phases[phase].trace;
        let (nl, ne, tokens) = (trace.num_layers, trace.num_experts, trace.num_tokens());
        let mut load = vec![vec![0.0; ne]; nl];
        for j in 0..self.n {
            let t = (offset + j) % tokens;
            for (l, row) in load.iter_mut().enumerate() {
                for &e in trace.experts(t, l) {
                    row[e as usize] += 1.0;
                }
            }
        }
        let b = Rc::new(load);
        if self.cache.len() < BATCH_CACHE {
            self.cache.insert((phase, offset), b.clone());
        }
        b
    }
}

/// Whole-trace load `[layer][expert]`.
fn trace_load(trace: &RoutingTrace) -> Vec<Vec<f64>> {
    let mut load = vec![vec![0.0; trace.num_experts]; trace.num_layers];
    for t in 0..trace.num_tokens() {
        for (l, row) in load.iter_mut().enumerate() {
            for &e in trace.experts(t, l) {
                row[e as usize] += 1.0;
            }
        }
    }
    load
}

/// EPLB on `load` with `like`'s topology and slots per rank.
pub fn eplb_placement(like: &Placement, load: &[Vec<f64>], groups: Option<usize>) -> Result<Placement, PlacementError> {
    let slots = like.slots_per_rank();
    let layers = load
        .iter()
        .map(|row| eplb::solve_layer(row, &like.topology, slots, groups))
        .collect::<Result<Vec<_>, _>>()?;
    let p = Placement::new(like.num_experts, like.topology.clone(), layers);
    p.validate()?;
    Ok(p)
}

/// Simulates one policy. See the module documentation.
pub fn simulate(phases: &[Phase], initial: &Placement, policy: Policy, cfg: &SimConfig) -> Result<SimReport, PlacementError> {
    let mut out = simulate_all(phases, initial, &[policy], cfg)?;
    out.pop().ok_or_else(|| PlacementError::Invalid("no policy simulated".into()))
}

/// Simulates several policies on the same token stream (step batches counted once for all).
pub fn simulate_all(
    phases: &[Phase],
    initial: &Placement,
    policies: &[Policy],
    cfg: &SimConfig,
) -> Result<Vec<SimReport>, PlacementError> {
    cfg.validate()?;
    initial.validate()?;
    if phases.is_empty() {
        return Err(PlacementError::Invalid("simulation needs at least one phase".into()));
    }
    for (i, p) in phases.iter().enumerate() {
        p.trace
            .validate()
            .map_err(|e| PlacementError::Mismatch(format!("phase {i}: routing trace is invalid: {e}")))?;
        initial.check_shape(p.trace.num_layers, p.trace.num_experts)?;
    }
    if phases.iter().all(|p| p.steps == 0) {
        return Err(PlacementError::Invalid("simulation has no steps".into()));
    }
    let n = cfg.tokens_per_step;
    let mut schedule = Vec::new();
    for (i, p) in phases.iter().enumerate() {
        let tokens = p.trace.num_tokens();
        for s in 0..p.steps {
            schedule.push((i, ((s as u128 * n as u128) % tokens as u128) as usize));
        }
    }
    let shift = (phases.len() >= 2 && phases[1].steps > 0).then_some(phases[0].steps);
    let mut batches = Batches { phases, n, cache: HashMap::new() };
    let mut eplb_first: Option<Placement> = None;
    let mut reports = Vec::with_capacity(policies.len());
    for &policy in policies {
        let start = match policy.start() {
            Start::Initial => initial.clone(),
            Start::EplbFirstPhase => match &eplb_first {
                Some(p) => p.clone(),
                None => {
                    let p = eplb_placement(initial, &trace_load(phases[0].trace), cfg.groups)?;
                    eplb_first = Some(p.clone());
                    p
                }
            },
        };
        reports.push(run_policy(policy, start, &schedule, shift, &mut batches, cfg)?);
    }
    Ok(reports)
}

fn run_policy(
    policy: Policy,
    mut placement: Placement,
    schedule: &[(usize, usize)],
    shift: Option<usize>,
    batches: &mut Batches,
    cfg: &SimConfig,
) -> Result<SimReport, PlacementError> {
    let (nl, ne) = (placement.num_layers, placement.num_experts);
    let mut window = LoadWindow::new(nl, ne, cfg.window_half_life_s);
    let mut rebalancer = match policy {
        Policy::Rebalance(_) => Some(Rebalancer::new(cfg.rebalance.clone())?),
        _ => None,
    };
    // (step µs, step balancedness) of the serving placement per distinct batch
    let mut cache: HashMap<(usize, usize), (f64, f64)> = HashMap::new();
    let mut pending: Option<(f64, Proposal)> = None;
    let (mut t, mut next_poll) = (0.0f64, cfg.report_interval_s);
    let mut epoch = 0usize;
    let mut flat = vec![0u64; nl * ne];
    let mut steps = Vec::with_capacity(schedule.len());
    for (i, &(phase, offset)) in schedule.iter().enumerate() {
        let (mut moves_applied, mut bytes_applied) = (0, 0);
        if pending.as_ref().is_some_and(|(at, _)| t >= *at)
            && let Some((_, p)) = pending.take()
        {
            placement = p.placement;
            epoch += 1;
            (moves_applied, bytes_applied) = (p.moves, p.bytes);
            cache.clear();
        }
        let batch = batches.get(phase, offset);
        let (us, bal) = match cache.get(&(phase, offset)) {
            Some(&v) => v,
            None => {
                let us: f64 = simulate_load(&placement, &batch, &cfg.hardware)?.iter().sum();
                let v = (us, balancedness(&placement, &batch).1);
                if cache.len() < BATCH_CACHE {
                    cache.insert((phase, offset), v);
                }
                v
            }
        };
        let dt = us / 1e6;
        let start_s = t;
        t += dt;
        for (f, x) in flat.iter_mut().zip(batch.iter().flatten()) {
            *f = *x as u64;
        }
        window.decay(dt);
        window.add(&flat);
        let windowed = window.balancedness(&placement).1;
        steps.push(StepRecord {
            step: i,
            phase,
            start_s,
            step_ms: us / 1e3,
            balancedness: bal,
            windowed_balancedness: windowed,
            epoch,
            moves_applied,
            bytes_applied,
        });
        if let Some(rb) = rebalancer.as_mut()
            && pending.is_none()
            && t >= next_poll
        {
            next_poll = t + cfg.report_interval_s;
            if let Some(p) = rb.poll_window(t, &placement, &window)? {
                let delay = p.bytes as f64 / cfg.migration_bytes_per_s;
                pending = Some((t + delay, p));
            }
        }
    }
    Ok(SimReport { summary: summarize(policy, &steps, t, shift, cfg), steps })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Σmean/Σmax over steps of equal token count: the harmonic mean of the per-step balancedness.
fn aggregate_balancedness(steps: &[StepRecord]) -> Option<f64> {
    if steps.is_empty() {
        return None;
    }
    let inv: f64 = steps.iter().map(|s| 1.0 / s.balancedness.max(f64::MIN_POSITIVE)).sum();
    Some(steps.len() as f64 / inv)
}

fn summarize(policy: Policy, steps: &[StepRecord], end_s: f64, shift: Option<usize>, cfg: &SimConfig) -> SimSummary {
    let mut ms: Vec<f64> = steps.iter().map(|s| s.step_ms).collect();
    ms.sort_by(f64::total_cmp);
    let tokens = steps.len() as u64 * cfg.tokens_per_step as u64;
    let rate = |tokens: u64, secs: f64| if secs > 0.0 { tokens as f64 / secs } else { 0.0 };
    let shift = shift.filter(|&s| s < steps.len());
    let shift_s = shift.map(|s| steps[s].start_s);
    let (before, after) = match shift {
        Some(s) => (aggregate_balancedness(&steps[..s]), aggregate_balancedness(&steps[s..])),
        None => (aggregate_balancedness(steps), None),
    };
    let recovery_s = shift.and_then(|s| {
        let threshold = cfg.rebalance.threshold;
        match steps[s..].iter().rposition(|st| st.windowed_balancedness < threshold) {
            None => Some(0.0),
            Some(j) => {
                let j = s + j;
                // recovered at the end of step j + 1, when it exists
                steps.get(j + 1).map(|next| next.start_s + next.step_ms / 1e3 - steps[s].start_s)
            }
        }
    });
    let last = steps.last();
    SimSummary {
        policy: policy.name().to_string(),
        start: policy.start(),
        steps: steps.len(),
        tokens,
        simulated_s: end_s,
        tokens_per_s: rate(tokens, end_s),
        mean_step_ms: if ms.is_empty() { 0.0 } else { ms.iter().sum::<f64>() / ms.len() as f64 },
        p50_step_ms: percentile(&ms, 0.5),
        p99_step_ms: percentile(&ms, 0.99),
        shift_s,
        balancedness_before_shift: before,
        balancedness_after_shift: after,
        tokens_per_s_after_shift: shift_s
            .zip(shift)
            .map(|(s0, s)| rate((steps.len() - s) as u64 * cfg.tokens_per_step as u64, end_s - s0)),
        recovery_s,
        final_windowed_balancedness: last.map_or(1.0, |s| s.windowed_balancedness),
        epochs: last.map_or(0, |s| s.epoch),
        migrations: steps.iter().map(|s| s.moves_applied).sum(),
        bytes_moved: steps.iter().map(|s| s.bytes_applied).fold(0u64, u64::saturating_add),
    }
}

/// A plain-text table of simulation summaries, one row per policy.
pub fn format_summaries(rows: &[SimSummary]) -> String {
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |x| format!("{x:.digits$}"));
    let header = [
        "policy", "start", "tokens/s", "p50 ms", "p99 ms", "bal after shift", "recovery s", "epochs", "migrations", "bytes moved",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.policy.clone(),
                match r.start {
                    Start::Initial => "initial".into(),
                    Start::EplbFirstPhase => "eplb-phase-1".into(),
                },
                format!("{:.0}", r.tokens_per_s),
                format!("{:.2}", r.p50_step_ms),
                format!("{:.2}", r.p99_step_ms),
                opt(r.balancedness_after_shift, 4),
                opt(r.recovery_s, 1),
                r.epochs.to_string(),
                r.migrations.to_string(),
                format_bytes(r.bytes_moved),
            ]
        })
        .collect();
    crate::eval::render_table(&header, &body)
}

fn format_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{b:.0} B")
    }
}

