//! `switchyard place ...`: solve, evaluate, compare, simulate, export and benchmark placements.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use placement::eval::{Evaluation, HardwareProfile};
use placement::solver::{self, Mode, SolveOptions, SolveReport, SolverKind};
use placement::synth::{SynthConfig, synthesize};
use placement::synth_latent::{LatentConfig, synthesize_latent};
use placement::{Placement, RoutingTrace, Topology};

use placement::RoutingFile;
use super::routing::read_trace;

#[derive(clap::Subcommand)]
pub enum PlaceCommand {
    /// Solve a placement from routing statistics and write it as `switchyard.placement.v1` JSON.
    Solve(SolveArgs),
    /// Score a placement on a trace: balancedness, cross-node dispatch, same-rank hops, step time.
    Eval {
        #[command(flatten)]
        score: ScoreArgs,
        /// Write an SVG heat map of rank load per layer here.
        #[arg(long)]
        plot: Option<PathBuf>,
        #[command(flatten)]
        data_paths: DataPathArgs,
    },
    /// Score several placements on one trace, one table.
    Compare {
        #[arg(long)]
        trace: PathBuf,
        /// Placement files.
        #[arg(required = true)]
        placements: Vec<PathBuf>,
        #[command(flatten)]
        hw: HardwareArgs,
        #[arg(long)]
        json: bool,
    },
    /// Per-layer simulated step time of a placement on a trace: compute and communication of the
    /// straggler rank, layer by layer. With `--rebalance`: replay a workload shift (two routing
    /// phases) through the static and rebalancing policies in simulated time.
    Simulate(SimulateArgs),
    /// Convert a placement to another system's format.
    Export {
        #[arg(long)]
        placement: PathBuf,
        /// Target format: `sglang` (`{"physical_to_logical_map": [[...]]}` for --init-expert-location).
        #[arg(long, default_value = "sglang")]
        format: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmark contiguous / eplb / ilp side by side on synthetic DeepSeek-V3-like and Mixtral-like
    /// traces, solving on one sample and scoring on another.
    Bench(BenchArgs),
    /// Apply a placement to a running cluster as a new epoch (two-phase: every worker loads the
    /// slots it gains beside the old ones, then all switch at the same engine step).
    Apply {
        /// Placement JSON (switchyard.placement.v1); validated here and by the coordinator.
        placement: PathBuf,
        #[command(flatten)]
        endpoint: super::admin::AdminEndpoint,
    },
}

#[derive(clap::Args)]
pub struct SolveArgs {
    /// Routing input: trace `.safetensors`, token log `.jsonl`, or SGLang `logical_count` `.json`.
    #[arg(long)]
    trace: PathBuf,
    /// Experts per layer when a `.jsonl` log cannot tell (default: largest id + 1).
    #[arg(long)]
    num_experts: Option<usize>,
    #[arg(long)]
    ranks: usize,
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    #[arg(long)]
    slots_per_rank: usize,
    #[arg(long, default_value = "ilp")]
    solver: SolverKind,
    #[arg(long, default_value = "home")]
    mode: Mode,
    /// Expert groups (DeepSeek's n_group) for hierarchical EPLB.
    #[arg(long, requires = "rebalance")]
    groups: Option<usize>,
    /// Seconds the ILP may spend.
    #[arg(long, default_value_t = 60.0)]
    time_limit: f64,
    /// Share of a layer's optimal max rank load the ILP may give up for traffic (never above EPLB's,
    /// neither on the sampled loads nor under drift).
    #[arg(long, default_value_t = placement::solver::DEFAULT_BALANCE_SLACK)]
    balance_slack: f64,
    /// ILP subproblems solved in parallel (default: available cores).
    #[arg(long, env = "SWITCHYARD_SOLVER_THREADS")]
    threads: Option<usize>,
    #[arg(long)]
    out: PathBuf,
    /// Print the solve report as JSON.
    #[arg(long)]
    json: bool,
    /// Write an SVG heat map of rank load per layer here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Solve on the loads as sampled: no shrinkage toward the layer mean (by default the ILP
    /// plans for the uncertainty of the sample, see `placement::robust`).
    #[arg(long)]
    no_shrink: bool,
    /// Drift of expert loads the ILP plans for: the spread of a log-normal factor on every expert's
    /// load between the trace and the traffic the placement will serve (1.0: about 0.37–2.7x; 0:
    /// fit the sample). The ILP never does worse than EPLB on the sampled loads nor under drift.
    #[arg(long, default_value_t = placement::robust::DEFAULT_DRIFT)]
    load_drift: f64,
}

/// `place eval --data-path-model`: the trace served by that model as requests on both data paths.
#[derive(clap::Args)]
pub struct DataPathArgs {
    /// Also score the runtime's data paths (`placement::datapath`: bytes per token and layer,
    /// rows kept local, tokens moved, KV exchanged) for this model's sizes.
    #[arg(long)]
    data_path_model: Option<PathBuf>,
    /// Data paths scored (`home`, `affinity`, `affinity:N`).
    #[arg(long, value_delimiter = ',', default_value = "home,affinity", requires = "data_path_model")]
    data_paths: Vec<String>,
    /// Every trace sequence served as requests of this many prompt tokens ...
    #[arg(long, default_value_t = 16, requires = "data_path_model")]
    prompt_tokens: usize,
    /// ... and this many generated ones.
    #[arg(long, default_value_t = 48, requires = "data_path_model")]
    new_tokens: usize,
}

impl DataPathArgs {
    /// `(path, score)` per data path asked for, or nothing without a model.
    fn score(&self, p: &Placement, t: &RoutingTrace) -> anyhow::Result<Vec<(String, placement::datapath::PathScore)>> {
        let Some(dir) = &self.data_path_model else { return Ok(Vec::new()) };
        let cfg = worker::ModelConfig::from_dir(dir).with_context(|| format!("model {}", dir.display()))?;
        let shape = cfg.data_path_shape(self.prompt_tokens, self.new_tokens);
        self.data_paths
            .iter()
            .map(|name| {
                let kind = worker::expert_parallel::DataPath::parse(name).map_err(anyhow::Error::msg)?.kind();
                Ok((name.clone(), placement::datapath::score(t, p, kind, &shape)?))
            })
            .collect()
    }
}

/// One placement scored on one trace.
#[derive(clap::Args)]
pub struct ScoreArgs {
    #[arg(long)]
    placement: PathBuf,
    #[arg(long)]
    trace: PathBuf,
    #[command(flatten)]
    hw: HardwareArgs,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

impl ScoreArgs {
    fn evaluate(&self) -> anyhow::Result<(Placement, RoutingTrace, Evaluation)> {
        let p = Placement::read(&self.placement)?;
        let t = read_trace(&self.trace)?;
        let ev = placement::eval::evaluate(&p, &t, &self.hw.profile()?)?;
        Ok((p, t, ev))
    }
}


#[derive(clap::Args)]
pub struct HardwareArgs {
    /// Hardware profile for the simulated step time: `h100` (H100 + NVLink + 400 Gb/s IB) or a JSON file.
    #[arg(long, default_value = "h100")]
    hardware: String,
}

impl HardwareArgs {
    fn profile(&self) -> anyhow::Result<HardwareProfile> {
        if self.hardware == "h100" {
            return Ok(HardwareProfile::h100());
        }
        let text = std::fs::read_to_string(&self.hardware)
            .with_context(|| format!("hardware profile {} (not `h100`, not a readable file)", self.hardware))?;
        serde_json::from_str(&text).with_context(|| format!("hardware profile {}", self.hardware))
    }
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Time limit of every ILP solve, seconds.
    #[arg(long, default_value_t = 60.0)]
    time_limit: f64,
    /// Tokens in each synthetic sample (solve sample and held-out sample).
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Only the Mixtral-like scenarios (fast).
    #[arg(long)]
    mixtral_only: bool,
    /// Override the presets' cross-layer transition strength (0 = none, 1 = fully determined).
    #[arg(long)]
    transition_strength: Option<f64>,
    /// Override the presets' Zipf exponent of expert popularity.
    #[arg(long)]
    zipf: Option<f64>,
    /// The ILP's balance slack (see `place solve --balance-slack`).
    #[arg(long, default_value_t = placement::solver::DEFAULT_BALANCE_SLACK)]
    balance_slack: f64,
    /// Folders of real routing traces (`prose.safetensors`, `code.safetensors`, captured from a
    /// trained model with `trace capture`; repeat the flag for several models): cross-domain
    /// scenarios, solved on one domain and scored on the other. A folder without them is skipped.
    #[arg(long, default_values = ["models/tiny-moe/routing", "models/routing/tiny-moe-e8"])]
    real_routing: Vec<PathBuf>,
    /// Only the scenarios whose name contains this text.
    #[arg(long)]
    only: Option<String>,
    /// Drift of expert loads the ILP plans for (see `place solve --load-drift`).
    #[arg(long, default_value_t = placement::robust::DEFAULT_DRIFT)]
    load_drift: f64,
    /// The ILP solves on the loads as sampled (no shrinkage, see `place solve --no-shrink`).
    #[arg(long)]
    no_shrink: bool,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: PlaceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PlaceCommand::Solve(a) => solve_cmd(a),
        PlaceCommand::Eval { score, plot, data_paths } => {
            let (p, t, ev) = score.evaluate()?;
            let paths = data_paths.score(&p, &t)?;
            if let Some(path) = plot {
                let stats = placement::RoutingStats::from_trace(&t, None);
                write_plot(&path, &p, &stats.load, &format!("rank load / layer mean: {}", score.placement.display()))?;
            }
            if score.json {
                let mut v = serde_json::to_value(&ev)?;
                if !paths.is_empty() {
                    let scored: serde_json::Map<String, serde_json::Value> = paths
                        .iter()
                        .map(|(n, s)| {
                            let row = serde_json::json!({
                                "bytes_per_token_layer": s.bytes_per_token_layer(),
                                "kv_bytes_per_token_layer": s.kv_bytes_per_token_layer(),
                                "local_row_share": s.local_share(),
                                "moved_per_token_layer": s.moved_per_token_layer(),
                            });
                            (n.clone(), row)
                        })
                        .collect();
                    v["data_paths"] = serde_json::Value::Object(scored);
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", placement::eval::format_layers(&ev));
                print!("{}", placement::eval::format_table(&[(score.placement.display().to_string(), ev)]));
                if !paths.is_empty() {
                    println!("\n{:>12} {:>12} {:>10} {:>8} {:>9}", "data path", "B/tok/layer", "KV B", "local %", "moved");
                    for (n, s) in &paths {
                        println!(
                            "{:>12} {:>12.0} {:>10.0} {:>7.1}% {:>9.3}",
                            n,
                            s.bytes_per_token_layer(),
                            s.kv_bytes_per_token_layer(),
                            100.0 * s.local_share(),
                            s.moved_per_token_layer()
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PlaceCommand::Compare { trace, placements, hw, json } => {
            let t = read_trace(&trace)?;
            let hw = hw.profile()?;
            let rows = placements
                .iter()
                .map(|path| {
                    let p = Placement::read(path)?;
                    let ev = placement::eval::evaluate(&p, &t, &hw)
                        .with_context(|| format!("evaluating {}", path.display()))?;
                    Ok((path.display().to_string(), ev))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if json {
                let v: Vec<_> = rows.iter().map(|(n, e)| serde_json::json!({"placement": n, "evaluation": e})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", placement::eval::format_table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        PlaceCommand::Simulate(a) => simulate_cmd(a),
        PlaceCommand::Export { placement, format, out } => {
            let p = Placement::read(&placement)?;
            let value = match format.as_str() {
                "sglang" => p.to_sglang(),
                other => anyhow::bail!("unknown export format {other:?} (supported: sglang)"),
            };
            std::fs::write(&out, serde_json::to_string(&value)?).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        PlaceCommand::Bench(a) => bench(a),
        PlaceCommand::Apply { placement, endpoint } => super::admin::apply(placement, endpoint),
    }
}

fn write_plot(path: &Path, p: &Placement, load: &[Vec<f64>], title: &str) -> anyhow::Result<()> {
    let svg = placement::plot::rank_load_heatmap_svg(p, load, title);
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn progress_bar(kind: SolverKind) -> indicatif::ProgressBar {
    if kind != SolverKind::Ilp {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} ilp sweep {prefix} [{bar:30}] {pos}/{len} layers {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

fn solve_cmd(a: SolveArgs) -> anyhow::Result<ExitCode> {
    let routing = super::routing::read_routing(&a.trace, a.num_experts)?;
    let mut stats = routing.stats(a.ranks)?;
    // The loads as sampled, for the in-sample and drifted figures below (`stats` may be shrunk).
    let sampled_load = stats.load.clone();
    // The ILP plans for the uncertainty of the sample (`placement::robust`), unless told not to.
    let shrinkage = match (&routing, a.solver, a.no_shrink) {
        (RoutingFile::Trace(t), SolverKind::Ilp, false) => {
            let (shrunk, s) = placement::robust::shrink_loads(&stats, t, placement::robust::RESAMPLES, 0);
            stats = shrunk;
            Some(s)
        }
        _ => None,
    };
    let topology = Topology::uniform(a.ranks, a.nodes)?;
    let mut opts = SolveOptions::new(topology, a.slots_per_rank);
    opts.mode = a.mode;
    opts.groups = a.groups;
    anyhow::ensure!(a.time_limit.is_finite() && a.time_limit > 0.0, "--time-limit must be positive");
    opts.time_limit = Duration::from_secs_f64(a.time_limit);
    opts.balance_slack = a.balance_slack;
    opts.load_drift = a.load_drift;
    if let (RoutingFile::Trace(t), SolverKind::Ilp) = (&routing, a.solver) {
        opts.plan_for_trace(t);
    }
    if let Some(t) = a.threads {
        opts.threads = t.max(1);
    }
    let bar = progress_bar(a.solver);
    let (p, report) = solver::solve(a.solver, &stats, &opts, &|pr| {
        bar.set_prefix(pr.sweep.to_string());
        bar.set_length(pr.total as u64);
        bar.set_position(pr.done as u64);
    })?;
    bar.finish_and_clear();
    p.write(&a.out)?;
    // In-sample balancedness, on resamples of the trace (what the sample's luck is worth) and under
    // the planned drift (what a shift of the traffic may cost).
    let in_sample = placement::robust::balancedness(&p, &sampled_load);
    let resampled = match &routing {
        RoutingFile::Trace(t) => Some(placement::robust::balancedness_interval(&p, t, placement::robust::RESAMPLES, 1)),
        RoutingFile::Counts(_) => None,
    };
    let drift_for_interval = if a.load_drift > 0.0 { a.load_drift } else { placement::robust::DEFAULT_DRIFT };
    let drifted = placement::robust::drift_balancedness_interval(&p, &sampled_load, drift_for_interval, placement::robust::RESAMPLES, 2);
    if let Some(path) = &a.plot {
        write_plot(path, &p, &stats.load, &format!("{:?} placement, rank load / layer mean", a.solver))?;
    }
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["balancedness_in_sample"] = in_sample.into();
        if let Some((lo, mid, hi)) = resampled {
            v["balancedness_resampled"] = serde_json::json!({"p5": lo, "p50": mid, "p95": hi});
        }
        let (lo, mid, hi) = drifted;
        v["balancedness_drifted"] = serde_json::json!({"drift": drift_for_interval, "p5": lo, "p50": mid, "p95": hi});
        if let Some(s) = &shrinkage {
            v["load_shrinkage_per_layer"] = s.per_layer.clone().into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_report(&report);
        if let Some(s) = &shrinkage {
            let mean = s.per_layer.iter().sum::<f64>() / s.per_layer.len().max(1) as f64;
            println!("shrinkage   loads toward the layer mean by {mean:.3} on average (sequence bootstrap; --no-shrink: off)");
        }
        println!("balance     {in_sample:.4} in sample");
        if let Some((lo, mid, hi)) = resampled {
            println!("            {mid:.4} [{lo:.4}, {hi:.4}] on {} resamples of the trace (5-95%)", placement::robust::RESAMPLES);
        }
        let (lo, mid, hi) = drifted;
        println!(
            "            {mid:.4} [{lo:.4}, {hi:.4}] on {} drifts of the loads by {drift_for_interval} (5-95%; unseen traffic of another kind)",
            placement::robust::RESAMPLES
        );
        println!("wrote {}", a.out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &SolveReport) {
    let obj = |o: &solver::Objective| {
        format!("{:.4} (imbalance {:.4}, traffic {:.4})", o.value, o.imbalance, o.traffic)
    };
    println!("solver      {:?}, mode {:?}", r.solver, r.mode);
    if let Some(w) = &r.warm_start {
        println!("warm start  {}", obj(w));
    }
    println!("objective   {}", obj(&r.objective));
    if let Some(g) = r.balance_gap {
        println!("gap         balance {:.2e}, traffic {}", g, r.traffic_gap.map_or("-".into(), |g| format!("{g:.2e}")));
        println!(
            "search      {} sweeps, {} subproblems ({} hit the time limit), {} layers improved",
            r.sweeps, r.subproblems, r.subproblems_hit_time_limit, r.layers_improved
        );
    }
    if r.mode == Mode::Affinity && r.solver == SolverKind::Ilp {
        println!(
            "swaps       {} expert swaps kept more hops at no loss of expected balance, {} undone (they broke a cap on independent check draws); {} layers differ from EPLB's",
            r.search_swaps, r.search_swaps_rolled_back, r.search_layers_changed
        );
    }
    println!("time        {:.2} s", r.solve_seconds);
}

/// One row of the benchmark table.
#[derive(serde::Serialize)]
struct BenchRow {
    scenario: String,
    solver: String,
    balancedness: f64,
    cross_node_fraction: f64,
    same_rank_hop_share: f64,
    same_node_hop_share: f64,
    simulated_step_us: f64,
    solve_seconds: f64,
}

/// Where a scenario's solve and score traces come from.
enum Source {
    /// Two samples of one synthetic routing model.
    Synth(SynthConfig),
    /// Two samples of one residual-stream routing model (`placement::synth_latent`), the second
    /// with the domain mix reversed: another day's traffic of the same model.
    Latent(LatentConfig),
    /// Two real traces (solve on the first, score on the second).
    Real(RoutingTrace, RoutingTrace),
}

struct Scenario {
    name: String,
    source: Source,
    ranks: usize,
    nodes: usize,
    slots: usize,
    groups: Option<usize>,
}

/// The real cross-domain scenarios, when the traces are there: both directions, 4 ranks with one
/// spare slot each, 4 ranks with a quarter of the experts each and half as many ranks as experts
/// with two experts each (no replica: Mixtral's 8 experts on 4 ranks × 2 slots is that shape; for
/// an 8-expert model the last two are the same and it runs once).
fn real_scenarios(dir: &Path) -> anyhow::Result<Vec<Scenario>> {
    let (prose, code) = (dir.join("prose.safetensors"), dir.join("code.safetensors"));
    if !prose.exists() || !code.exists() {
        return Ok(Vec::new());
    }
    let (p, c) = (read_trace(&prose)?, read_trace(&code)?);
    // `models/tiny-moe/routing` is named by its model, `models/routing/tiny-moe-e8` by itself.
    let named = if dir.file_name().is_some_and(|n| n == "routing") { dir.parent().unwrap_or(dir) } else { dir };
    let model = named.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let shape = format!("{}x{} top-{}", p.num_layers, p.num_experts, p.top_k);
    let mut out = Vec::new();
    let mut shapes = vec![(4, p.num_experts / 4 + 1), (4, p.num_experts / 4), (p.num_experts / 2, 2)];
    shapes.dedup();
    // An expert count these do not divide leaves shapes too small to hold every expert: skipped.
    shapes.retain(|&(ranks, slots)| slots >= 1 && ranks * slots >= p.num_experts);
    for (ranks, slots) in shapes {
        for (from, to, solve, score) in [("prose", "code", &p, &c), ("code", "prose", &c, &p)] {
            let name = format!("real: {model} {from}->{to} ({shape}, {ranks} ranks, {slots} slots)");
            out.push(Scenario { name, source: Source::Real(solve.clone(), score.clone()), ranks, nodes: 1, slots, groups: None });
        }
    }
    Ok(out)
}

fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let mut scenarios = Vec::new();
    for dir in &a.real_routing {
        scenarios.extend(real_scenarios(dir)?);
    }
    let per_seq = 64;
    let seqs = a.tokens.div_ceil(per_seq).max(1);
    let tuned = |mut s: SynthConfig| {
        s.num_sequences = seqs;
        s.tokens_per_sequence = per_seq;
        if let Some(t) = a.transition_strength {
            s.transition_strength = t;
        }
        if let Some(z) = a.zipf {
            s.zipf_exponent = z;
        }
        Source::Synth(s)
    };
    if !a.mixtral_only {
        let name = "deepseek-v3 (58x256 top-8, 32 ranks / 4 nodes, 9 slots)".to_string();
        scenarios.push(Scenario { name, source: tuned(SynthConfig::deepseek_v3()), ranks: 32, nodes: 4, slots: 9, groups: Some(8) });
    }
    for slots in [2, 3] {
        let name = format!("mixtral (32x8 top-2, 4 ranks, {slots} slots)");
        scenarios.push(Scenario { name, source: tuned(SynthConfig::mixtral()), ranks: 4, nodes: 1, slots, groups: None });
    }
    // The residual-stream generator: solved on one domain mix, scored on the reversed mix.
    let latent = |l: LatentConfig| Source::Latent(LatentConfig { num_sequences: seqs, tokens_per_sequence: per_seq, domain_weights: vec![4.0, 3.0, 2.0, 1.0], ..l });
    if !a.mixtral_only {
        let name = "latent deepseek-v3 (58x256 top-8, 32 ranks / 4 nodes, 9 slots)".to_string();
        scenarios.push(Scenario { name, source: latent(LatentConfig::deepseek_v3()), ranks: 32, nodes: 4, slots: 9, groups: Some(8) });
    }
    let name = "latent mixtral (32x8 top-2, 4 ranks, 2 slots)".to_string();
    scenarios.push(Scenario { name, source: latent(LatentConfig::mixtral()), ranks: 4, nodes: 1, slots: 2, groups: None });
    if let Some(only) = &a.only {
        scenarios.retain(|s| s.name.contains(only.as_str()));
        anyhow::ensure!(!scenarios.is_empty(), "no place bench scenario's name contains {only:?}");
    }
    let hw = HardwareProfile::h100();
    let mut rows = Vec::new();
    for sc in &scenarios {
        let (solve_trace, held_out) = match &sc.source {
            // Same routing model (model_seed), two independent samples: solve on one, score on the other.
            Source::Synth(s) => (synthesize(&SynthConfig { seed: s.seed, ..s.clone() })?, synthesize(&SynthConfig { seed: s.seed.wrapping_add(1_000_003), ..s.clone() })?),
            Source::Latent(l) => {
                let reversed: Vec<f64> = l.domain_weights.iter().rev().copied().collect();
                (synthesize_latent(l)?, synthesize_latent(&LatentConfig { seed: l.seed.wrapping_add(1_000_003), domain_weights: reversed, ..l.clone() })?)
            }
            Source::Real(a, b) => (a.clone(), b.clone()),
        };
        let stats = placement::RoutingStats::from_trace(&solve_trace, Some(sc.ranks));
        let shrunk = placement::robust::shrink_loads(&stats, &solve_trace, placement::robust::RESAMPLES, 0).0;
        let topology = Topology::uniform(sc.ranks, sc.nodes)?;
        // The ILP's scenarios, drawn once per trace for both of its modes.
        let mut ilp_opts = SolveOptions::new(topology.clone(), sc.slots);
        ilp_opts.load_drift = a.load_drift;
        ilp_opts.plan_for_trace(&solve_trace);
        let runs: [(&str, SolverKind, Mode); 4] = [
            ("contiguous", SolverKind::Contiguous, Mode::Home),
            ("eplb", SolverKind::Eplb, Mode::Home),
            ("ilp home", SolverKind::Ilp, Mode::Home),
            ("ilp affinity", SolverKind::Ilp, Mode::Affinity),
        ];
        for (label, kind, mode) in runs {
            let mut opts = if kind == SolverKind::Ilp { ilp_opts.clone() } else { SolveOptions::new(topology.clone(), sc.slots) };
            opts.mode = mode;
            opts.groups = sc.groups;
            opts.time_limit = Duration::from_secs_f64(a.time_limit);
            opts.balance_slack = a.balance_slack;
            let started = Instant::now();
            let planned = if kind == SolverKind::Ilp && !a.no_shrink { &shrunk } else { &stats };
            opts.load_drift = a.load_drift;
            let (p, _) = solver::solve(kind, planned, &opts, &|_| {})?;
            let secs = started.elapsed().as_secs_f64();
            let ev: Evaluation = placement::eval::evaluate(&p, &held_out, &hw)?;
            rows.push(BenchRow {
                scenario: sc.name.clone(),
                solver: label.to_string(),
                balancedness: ev.balancedness,
                cross_node_fraction: ev.cross_node_fraction,
                same_rank_hop_share: ev.same_rank_hop_share,
                same_node_hop_share: ev.same_node_hop_share,
                simulated_step_us: ev.simulated_step_us,
                solve_seconds: secs,
            });
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    let dirs: Vec<String> = a.real_routing.iter().map(|d| d.display().to_string()).collect();
    println!("real: solved on a trained model's routing of one domain, scored on the other's ({})", dirs.join(", "));
    println!("synthetic: solved on one sample, scored on a held-out sample of the same routing model ({} tokens each)", seqs * per_seq);
    for sc in &scenarios {
        if let Source::Synth(s) = &sc.source {
            println!("  {}: zipf {}, transition strength {} (fanout {}), {} domains", sc.name, s.zipf_exponent, s.transition_strength, s.transition_fanout, s.domains);
        }
        if let Source::Latent(l) = &sc.source {
            println!(
                "  {}: residual-stream router (placement::synth_latent), persistence {}, topic share {}, {} domains mixed {:?}, scored on the reversed mix",
                sc.name, l.persistence, l.topic_share, l.domains, l.domain_weights
            );
        }
    }
    println!();
    println!(
        "{:<64} {:<13} {:>8} {:>10} {:>10} {:>10} {:>12} {:>9}",
        "scenario", "solver", "balance", "x-node %", "rank-hop %", "node-hop %", "step µs", "solve s"
    );
    for r in &rows {
        println!(
            "{:<64} {:<13} {:>8.4} {:>10.2} {:>10.2} {:>10.2} {:>12.1} {:>9.2}",
            r.scenario,
            r.solver,
            r.balancedness,
            100.0 * r.cross_node_fraction,
            100.0 * r.same_rank_hop_share,
            100.0 * r.same_node_hop_share,
            r.simulated_step_us,
            r.solve_seconds
        );
    }
    println!();
    for sc in &scenarios {
        let get = |s: &str| rows.iter().find(|r| r.scenario == sc.name && r.solver == s).expect("row exists");
        let (e, h, f) = (get("eplb"), get("ilp home"), get("ilp affinity"));
        let xnode = if e.cross_node_fraction > 0.0 {
            format!("home {:.2}x affinity {:.2}x", h.cross_node_fraction / e.cross_node_fraction, f.cross_node_fraction / e.cross_node_fraction)
        } else {
            "n/a (one node)".into()
        };
        println!(
            "{}: ilp/eplb balancedness home {:.3}x affinity {:.3}x; same-rank hops (affinity) {:.2}x; cross-node {}",
            sc.name,
            h.balancedness / e.balancedness,
            f.balancedness / e.balancedness,
            f.same_rank_hop_share / e.same_rank_hop_share.max(f64::MIN_POSITIVE),
            xnode
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `place simulate`: one placement on one trace, or (`--rebalance`) a replay of a workload shift.
#[derive(clap::Args)]
pub struct SimulateArgs {
    /// Placement file. With --rebalance: the start of `static` and `rebalance` (default contiguous).
    #[arg(long, required_unless_present = "rebalance")]
    placement: Option<PathBuf>,
    /// Routing trace `.safetensors`. With --rebalance: the first phase (needs --shift-trace).
    #[arg(long, required_unless_present = "rebalance")]
    trace: Option<PathBuf>,
    #[command(flatten)]
    hw: HardwareArgs,
    /// Machine-readable output (with --rebalance: one object per policy).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    replay: ReplayArgs,
}

/// Synthetic two-phase workloads for `place simulate --rebalance`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReplayPreset {
    /// 58 MoE layers x 256 experts, top-8; 32 ranks / 4 nodes / 9 slots, 8 expert groups.
    DeepseekV3,
    /// 32 MoE layers x 8 experts, top-2; 4 ranks / 1 node / 3 slots.
    Mixtral,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Replay a routing shift through the policies static (the --placement or contiguous),
    /// static-eplb (EPLB on phase 1), rebalance (from the static start) and rebalance-eplb (from
    /// EPLB on phase 1). Without --trace, both phases are synthetic (--preset).
    #[arg(long)]
    rebalance: bool,
    /// Routing trace of the second phase (the shift).
    #[arg(long, requires = "trace", requires = "rebalance")]
    shift_trace: Option<PathBuf>,
    /// Synthetic workload when no --trace is given: phase 2 is another routing model (other hot
    /// experts in every layer). Default deepseek-v3.
    #[arg(long, value_enum, conflicts_with = "trace", requires = "rebalance")]
    preset: Option<ReplayPreset>,
    /// Tokens of each synthetic phase trace (replayed cyclically).
    #[arg(long, default_value_t = 16384)]
    trace_tokens: usize,
    /// Seed of the synthetic phases.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Ranks, nodes, slots per rank (default: the --placement's, else the preset's).
    #[arg(long, requires = "rebalance")]
    ranks: Option<usize>,
    #[arg(long, requires = "rebalance")]
    nodes: Option<usize>,
    #[arg(long, requires = "rebalance")]
    slots_per_rank: Option<usize>,
    /// Expert groups for hierarchical EPLB (default: 8 for deepseek-v3, else none).
    #[arg(long, requires = "rebalance")]
    groups: Option<usize>,
    #[arg(long, default_value_t = 4096)]
    tokens_per_step: usize,
    /// Engine steps before and after the shift.
    #[arg(long, default_value_t = 400)]
    steps_before: usize,
    #[arg(long, default_value_t = 1200)]
    steps_after: usize,
    /// Re-solve when windowed balancedness falls below this.
    #[arg(long, default_value_t = 0.9)]
    threshold: f64,
    /// Commit only when the predicted balancedness gain is at least this.
    #[arg(long, default_value_t = 0.02)]
    margin: f64,
    /// Stop migrating once the predicted balancedness reaches this.
    #[arg(long, default_value_t = 0.95)]
    target: f64,
    /// Most experts loaded per epoch, all ranks together (default 32 per rank).
    #[arg(long)]
    max_moves: Option<usize>,
    /// Seconds between epochs at least.
    #[arg(long, default_value_t = 5.0)]
    min_interval: f64,
    /// Also re-check every this many seconds above the threshold.
    #[arg(long, requires = "rebalance")]
    period: Option<f64>,
    /// While the recent window's routing is at least this far (total variation) from the long
    /// window's, a shift is under way: decide on the trend the two windows show.
    #[arg(long, default_value_t = placement::rebalance::RebalanceConfig::default().shift_distance)]
    shift_distance: f64,
    /// Log-normal drift of expert loads the rebalancer's moves plan for (default: what the live
    /// window shows; 0: fit the window).
    #[arg(long)]
    rebalance_drift: Option<f64>,
    /// Migration bandwidth budget (GB/s): an epoch loads at most this x --min-interval.
    #[arg(long, requires = "rebalance")]
    max_migration_gbps: Option<f64>,
    /// Rate the cluster loads migrated experts at (GB/s, all ranks): migration delay = bytes / rate.
    #[arg(long, default_value_t = 100.0)]
    migration_gbps: f64,
    /// Bytes of one expert's weights (default: from the hardware profile's shapes, fp8).
    #[arg(long, requires = "rebalance")]
    expert_bytes: Option<u64>,
    /// Load window half-life, seconds.
    #[arg(long, default_value_t = 2.0)]
    half_life: f64,
    /// Seconds between load reports (rebalancer polls).
    #[arg(long, default_value_t = 1.0)]
    report_interval: f64,
}

fn simulate_cmd(a: SimulateArgs) -> anyhow::Result<ExitCode> {
    if a.replay.rebalance {
        return replay_cmd(a);
    }
    let (Some(placement), Some(trace)) = (a.placement, a.trace) else {
        anyhow::bail!("place simulate needs --placement and --trace (or --rebalance)");
    };
    let score = ScoreArgs { placement, trace, hw: a.hw, json: a.json };
    let (_, _, ev) = score.evaluate()?;
    if score.json {
        println!("{}", serde_json::to_string_pretty(&ev.layers)?);
    } else {
        print!("{}", placement::eval::format_simulation(&ev));
    }
    Ok(ExitCode::SUCCESS)
}

fn replay_cmd(a: SimulateArgs) -> anyhow::Result<ExitCode> {
    use placement::rebalance::{self, Phase, Policy, RebalanceConfig, SimConfig};
    let r = &a.replay;
    let hw = a.hw.profile()?;
    let (phase1, phase2, described, preset) = match (&a.trace, &r.shift_trace) {
        (Some(t1), Some(t2)) => {
            let d = format!("{} then {}", t1.display(), t2.display());
            (read_trace(t1)?, read_trace(t2)?, d, None)
        }
        (Some(_), None) => anyhow::bail!("--rebalance with --trace needs --shift-trace (the second phase)"),
        _ => {
            let preset = r.preset.unwrap_or(ReplayPreset::DeepseekV3);
            let mut s = match preset {
                ReplayPreset::DeepseekV3 => SynthConfig::deepseek_v3(),
                ReplayPreset::Mixtral => SynthConfig::mixtral(),
            };
            anyhow::ensure!(r.trace_tokens > 0, "--trace-tokens must be positive");
            s.tokens_per_sequence = 64;
            s.num_sequences = r.trace_tokens.div_ceil(64);
            s.model_seed = r.seed;
            s.seed = r.seed.wrapping_add(1);
            let shifted = SynthConfig { model_seed: r.seed.wrapping_add(1), seed: r.seed.wrapping_add(2), ..s.clone() };
            let name = if preset == ReplayPreset::DeepseekV3 { "deepseek-v3" } else { "mixtral" };
            let d = format!(
                "synthetic {name} ({} layers x {} experts, top-{}, zipf {}), phase 2 = another routing model (other hot experts)",
                s.num_layers, s.num_experts, s.top_k, s.zipf_exponent
            );
            (synthesize(&s)?, synthesize(&shifted)?, d, Some(preset))
        }
    };
    let initial = match &a.placement {
        Some(path) => Placement::read(path)?,
        None => {
            let (dr, dn, ds) = match preset {
                Some(ReplayPreset::Mixtral) => (4, 1, 3),
                Some(ReplayPreset::DeepseekV3) => (32, 4, 9),
                None => (0, 1, 0),
            };
            let ranks = r.ranks.unwrap_or(dr);
            let slots = r.slots_per_rank.unwrap_or(ds);
            anyhow::ensure!(ranks > 0 && slots > 0, "--rebalance with --trace needs --ranks and --slots-per-rank (or --placement)");
            let topology = Topology::uniform(ranks, r.nodes.unwrap_or(dn))?;
            solver::contiguous::solve(phase1.num_layers, phase1.num_experts, &topology, slots)?
        }
    };
    if a.placement.is_some() {
        anyhow::ensure!(
            r.ranks.is_none() && r.nodes.is_none() && r.slots_per_rank.is_none(),
            "--ranks/--nodes/--slots-per-rank come from --placement when it is given"
        );
    }
    let groups = r.groups.or((preset == Some(ReplayPreset::DeepseekV3)).then_some(8));
    let rebalance = RebalanceConfig {
        threshold: r.threshold,
        margin: r.margin,
        target: r.target,
        max_moves: r.max_moves.unwrap_or_else(|| RebalanceConfig::for_ranks(initial.num_ranks()).max_moves),
        max_bytes_per_s: r.max_migration_gbps.map(|g| g * 1e9),
        expert_bytes: r.expert_bytes.unwrap_or_else(|| RebalanceConfig::expert_bytes_for(&hw, 1.0)),
        min_interval_s: r.min_interval,
        period_s: r.period,
        shift_distance: r.shift_distance,
        min_replicas: 1,
        load_drift: r.rebalance_drift,
    };
    let cfg = SimConfig {
        tokens_per_step: r.tokens_per_step,
        report_interval_s: r.report_interval,
        window_half_life_s: r.half_life,
        migration_bytes_per_s: r.migration_gbps * 1e9,
        groups,
        hardware: hw,
        rebalance,
    };
    let phases = [Phase { trace: &phase1, steps: r.steps_before }, Phase { trace: &phase2, steps: r.steps_after }];
    let started = Instant::now();
    let reports = rebalance::sim::simulate_all(&phases, &initial, &Policy::ALL, &cfg)?;
    let summaries: Vec<_> = reports.into_iter().map(|r| r.summary).collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("workload: {described}");
    println!(
        "cluster: {} ranks / {} nodes / {} slots per rank; {} tokens per step, {} steps then {} after the shift; {}",
        initial.num_ranks(),
        initial.topology.num_nodes(),
        initial.slots_per_rank(),
        cfg.tokens_per_step,
        r.steps_before,
        r.steps_after,
        if a.placement.is_some() { "static start = --placement" } else { "static start = contiguous" }
    );
    println!(
        "rebalance: threshold {}, margin {}, target {}, <= {} moves per epoch, >= {} s apart; expert {} MB, migration {} GB/s, window half-life {} s",
        cfg.rebalance.threshold,
        cfg.rebalance.margin,
        cfg.rebalance.target,
        cfg.rebalance.move_budget(),
        cfg.rebalance.min_interval_s,
        cfg.rebalance.expert_bytes as f64 / 1e6,
        r.migration_gbps,
        cfg.window_half_life_s
    );
    println!();
    print!("{}", rebalance::sim::format_summaries(&summaries));
    eprintln!("simulated in {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}
