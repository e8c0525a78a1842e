//! `switchyard bench straggler`: local CPU clusters serving a generated checkpoint whose routing is
//! skewed (Zipf-like hot experts per layer) and depends on the prompts, with the workload shifting
//! mid-run to prompts that prefer other experts — or (`--model DIR --phase-texts A,B`) a real model
//! with the real routing shift between two kinds of text (the trained models/tiny-moe on prose, then
//! code). Policies side by side in one run:
//! - `static-contiguous`: the contiguous placement, never changed;
//! - `static-eplb`: EPLB solved on the first phase's routing (measured in this process), never changed;
//! - `rebalance`: contiguous start, the scheduler rebalances online (placement epochs);
//! - `rebalance+load-aware`: the same, with load-aware replica choice in every step;
//! - `rebalance+capacity`: the rebalancer with the capacity option at 1.25 × mean (changes outputs).
//!
//! Per policy, after the shift: tokens/s, p50/p99 step latency (the group's busy engine steps, as
//! rank 0 reports them: the ranks step together, so the straggler sets every step's length) — once
//! settled (from `--settle-seconds` after the shift on) and over the whole second phase — the
//! same steps projected onto ranks with cores of their own (on a machine with fewer cores than
//! ranks, a straggler borrows the waiting ranks' cores and wall-clock steps hide it), windowed
//! balancedness over time (admin `GetStats`), migrations and experts moved, and the time from the
//! shift until balancedness is back to ≥ 0.9.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use super::bench_common::percentile;
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::admin_client::AdminClient;
use switchyard_proto::v1::inference_client::InferenceClient;
use worker::synth::{SynthSpec, skewed_prompts, write_checkpoint};

const TOKEN: &str = "bench-straggler";
const POLICIES: [&str; 5] = ["static-contiguous", "static-eplb", "rebalance", "rebalance+load-aware", "rebalance+capacity"];

#[derive(clap::Args, Debug, Clone)]
pub struct StragglerArgs {
    /// Cluster sizes to run (default: those of 2 and 4 whose workers each get a core of their own
    /// here, at least 2 — a straggler shows on a stopwatch only when ranks do not share cores).
    #[arg(long, value_delimiter = ',')]
    pub workers: Option<Vec<usize>>,
    /// Policies to compare (default: all).
    #[arg(long, value_delimiter = ',')]
    pub policies: Option<Vec<String>>,
    /// Seconds of each workload phase (the shift happens after the first). Long enough for ~150
    /// steps after the shift: a p99 of fewer is one or two steps.
    #[arg(long, default_value_t = 30.0)]
    pub phase_seconds: f64,
    /// The settled columns count the steps from this many seconds after the shift on, the same
    /// window for every policy: the steady state once a rebalancer has acted (the bar is
    /// balance back within 30 s; ours lands in ~3 s), without the transient before it does.
    #[arg(long, default_value_t = 5.0)]
    pub settle_seconds: f64,
    /// Concurrent client streams. Enough that a step routes hundreds of tokens per rank and layer:
    /// with fewer, per-step sampling noise (which no placement removes: a perfectly balanced
    /// placement still sees max/mean rank load ≈ 1 + 1/√(tokens per rank)) swamps the imbalance.
    /// More sequences than a step's token budget (`--max-batch-tokens` per worker) take turns, so
    /// a step mixes more prompts: clients on the same prompt route alike, and with 256 on 2
    /// workers the balanced placements' p99 step was 1.4× their p50 from that alone (1.2× at 512).
    #[arg(long, default_value_t = 512)]
    pub clients: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Where the generated checkpoint goes (reused when present and of the same shape).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Expert FFN width of the generated checkpoint. Wide experts make expert compute most of a
    /// step, as on a real MoE model (where the experts hold nearly all the weights); with narrow
    /// ones attention and the all-to-alls dominate and balance barely shows in step time.
    #[arg(long, default_value_t = 2048)]
    pub expert_inter: usize,
    /// Routing skew of the generated checkpoint (`RoutingSkew::strength`: how strongly a token's
    /// router follows its group's hot experts; 0.75 puts ~70 % of a layer's assignments on its
    /// top-4 of 16 experts, 1.5 ~93 %). At 1.0 the hot rank's expert work is what a step waits
    /// for under a placement that ignores the load, as on a real skewed MoE layer.
    #[arg(long, default_value_t = 1.0)]
    pub skew_strength: f64,
    /// New tokens per engine step and worker (chunked prefill; the same for every policy), so
    /// that arriving prompts do not make some steps several times the others.
    #[arg(long, default_value_t = 128)]
    pub max_batch_tokens: u32,
    /// Slots per rank beyond experts / workers (room for replicas; DeepSeek-V3 serves 256
    /// experts with 32 redundant slots).
    #[arg(long, default_value_t = 1)]
    pub spare_slots: usize,
    /// Compute threads of each worker (default: this machine's cores split between the workers,
    /// so that ranks do not share cores while there are enough of them).
    #[arg(long)]
    pub threads_per_worker: Option<usize>,
    /// Serve this model instead of the generated skewed checkpoint (e.g. the trained
    /// models/tiny-moe: real, learned routing), with the workload of `--phase-texts`.
    #[arg(long, requires = "phase_texts")]
    pub model: Option<PathBuf>,
    /// With `--model`: two text files, the prompts of the first phase and of the second (e.g.
    /// prose, then code: a real domain shift of the routing), cut into 24-token prompts.
    #[arg(long, value_delimiter = ',', requires = "model")]
    pub phase_texts: Option<Vec<PathBuf>>,
    /// Write an SVG of windowed balancedness over time per policy.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// One JSON object per (workers, policy) instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Outcome {
    workers: usize,
    policy: String,
    /// Tokens streamed to the clients after the shift, per second.
    tokens_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The same steps projected onto ranks with cores of their own (see `projected_step_us`).
    projected_p50_ms: f64,
    projected_p99_ms: f64,
    /// Wall-clock steps from `--settle-seconds` after the shift on.
    settled_p50_ms: f64,
    settled_p99_ms: f64,
    balancedness_after_shift: f64,
    recovery_s: Option<f64>,
    migrations: u64,
    experts_moved: u64,
    longest_migration_step_ms: f64,
    /// (seconds since start, windowed balancedness)
    timeline: Vec<(f64, f64)>,
    shift_s: f64,
}

/// The routing of `prompts` through `model`, measured in this process: `[layer][expert]` counts.
fn phase_routing(model: &Path, prompts: &[Vec<u32>], max_tokens: usize) -> anyhow::Result<Vec<Vec<f64>>> {
    let m = worker::Model::load(model, &worker::LoadOptions::default())?;
    let mut e = worker::Engine::new(Arc::new(m), worker::EngineConfig::default());
    for p in prompts {
        e.add_request(worker::Request::new(p.clone(), max_tokens))?;
    }
    e.run_to_completion()?;
    Ok(e.routing_stats().counts.iter().map(|l| l.iter().map(|&c| c as f64).collect()).collect())
}

/// One client: requests back to back from `prompts` (phase A until `shift`, then phase B) until
/// `stop`; returns the tokens received after the shift.
async fn client(addr: String, a: Vec<Vec<u32>>, b: Vec<Vec<u32>>, shift: Arc<AtomicBool>, stop: Arc<AtomicBool>, max_tokens: u32) -> u64 {
    let (mut tokens, mut i) = (0u64, 0usize);
    // One connection per client, kept across its requests (a new one per request spent the
    // shared cores on handshakes); made again after a failed request.
    let mut conn: Option<InferenceClient<tonic::transport::Channel>> = None;
    while !stop.load(Ordering::SeqCst) {
        let after = shift.load(Ordering::SeqCst);
        let set = if after { &b } else { &a };
        let prompt = set[i % set.len()].clone();
        i += 1;
        let mut c = match conn.take() {
            Some(c) => c,
            None => match super::cluster::connect_channel(&addr).await {
                Ok(ch) => InferenceClient::new(ch),
                Err(_) => break,
            },
        };
        let req = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt })),
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let Ok(s) = c.generate(req).await else { continue };
        let mut s = s.into_inner();
        let mut finished = false;
        while let Ok(Some(m)) = s.message().await {
            tokens += u64::from(shift.load(Ordering::Relaxed));
            if m.finish_reason != 0 {
                finished = true;
                break;
            }
        }
        if finished {
            conn = Some(c);
        }
    }
    tokens
}

fn run_policy(model: &Path, workers: usize, policy: &str, eplb: Option<&Path>, contiguous: &Path, a: &StragglerArgs) -> anyhow::Result<Outcome> {
    let mut args: Vec<String> = vec!["--stats-half-life=2".into(), format!("--max-batch-tokens={}", a.max_batch_tokens)];
    if policy.starts_with("rebalance") {
        args.extend(
            ["--rebalance", "--rebalance-threshold=0.9", "--rebalance-target=0.97", "--rebalance-margin=0.01", "--rebalance-min-interval=2"]
                .map(String::from),
        );
    }
    if policy.ends_with("load-aware") {
        args.push("--load-aware-replicas".into());
    }
    if policy.ends_with("capacity") {
        args.push("--capacity-factor=1.25".into());
    }
    let placement = if policy == "static-eplb" { eplb.context("EPLB placement")? } else { contiguous };
    let cores = super::local_cluster::WorkerCores::for_cluster(workers, a.threads_per_worker);
    let cl = super::local_cluster::start_local_cluster(model, workers, Some(placement), "127.0.0.1:0", Some(TOKEN), &args, &[], Some(cores))?;
    let (pa, pb_) = phase_prompts(model, a)?;
    let rt = super::bench_common::load_generator_runtime(cores.pinned)?;
    let out = rt.block_on(async {
        let shift = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let mut hs = Vec::new();
        for k in 0..a.clients {
            let rot = |v: &Vec<Vec<u32>>| v.iter().cycle().skip(k * 7).take(v.len()).cloned().collect::<Vec<_>>();
            hs.push(tokio::spawn(client(cl.addr.clone(), rot(&pa), rot(&pb_), shift.clone(), stop.clone(), a.max_tokens)));
        }
        // Poll the live statistics through the run.
        let ep = coordinator::tls::endpoint(&cl.addr)?.connect().await?;
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse()?;
        let mut admin = AdminClient::with_interceptor(ep, super::admin::BearerToken(header));
        let mut timeline = Vec::new();
        let total = 2.0 * a.phase_seconds;
        let mut shift_s = a.phase_seconds;
        let mut last_stats = None;
        let mut steps_after: Vec<f64> = Vec::new();
        let mut steps_settled: Vec<f64> = Vec::new();
        let mut projected_after: Vec<f64> = Vec::new();
        while t0.elapsed().as_secs_f64() < total {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = t0.elapsed().as_secs_f64();
            if !shift.load(Ordering::SeqCst) && now >= a.phase_seconds {
                shift.store(true, Ordering::SeqCst);
                shift_s = now;
            }
            if let Ok(s) = admin.get_stats(pb::GetStatsRequest {}).await {
                let s = s.into_inner();
                if shift.load(Ordering::SeqCst) {
                    steps_after.extend(s.step_us.iter().map(|&us| us as f64 / 1e3));
                    if now >= shift_s + a.settle_seconds {
                        steps_settled.extend(s.step_us.iter().map(|&us| us as f64 / 1e3));
                    }
                    projected_after.extend(s.projected_step_us.iter().map(|&us| us as f64 / 1e3));
                }
                timeline.push((now, s.balancedness));
                last_stats = Some(s);
            }
        }
        stop.store(true, Ordering::SeqCst);
        let wall = t0.elapsed().as_secs_f64();
        let mut tokens = 0u64;
        for h in hs {
            if let Ok(t) = h.await {
                tokens += t;
            }
        }
        let s = last_stats.unwrap_or_default();
        // Recovery: first time after the shift from which balancedness stays ≥ 0.9 (after having
        // dropped below it); 0 when it never dropped.
        let after: Vec<&(f64, f64)> = timeline.iter().filter(|(t, _)| *t >= shift_s).collect();
        let dropped = after.iter().any(|(_, b)| *b < 0.9);
        let recovery_s = if !dropped {
            Some(0.0)
        } else {
            let last_bad = after.iter().rposition(|(_, b)| *b < 0.9);
            match last_bad {
                Some(i) if i + 1 < after.len() => Some(after[i + 1].0 - shift_s),
                _ => None,
            }
        };
        let tail: Vec<f64> = after.iter().skip(after.len() / 2).map(|(_, b)| *b).collect();
        anyhow::Ok(Outcome {
            workers,
            policy: policy.to_string(),
            tokens_per_s: tokens as f64 / (wall - shift_s).max(1e-9),
            p50_ms: percentile(&mut steps_after.clone(), 0.5),
            p99_ms: percentile(&mut steps_after, 0.99),
            projected_p50_ms: percentile(&mut projected_after.clone(), 0.5),
            projected_p99_ms: percentile(&mut projected_after, 0.99),
            settled_p50_ms: percentile(&mut steps_settled.clone(), 0.5),
            settled_p99_ms: percentile(&mut steps_settled, 0.99),
            balancedness_after_shift: if tail.is_empty() { s.balancedness } else { tail.iter().sum::<f64>() / tail.len() as f64 },
            recovery_s,
            migrations: s.migrations,
            experts_moved: s.migrated_experts,
            longest_migration_step_ms: s.longest_step_during_migration_us as f64 / 1e3,
            timeline,
            shift_s,
        })
    })?;
    drop(cl);
    Ok(out)
}

fn svg(outcomes: &[Outcome]) -> String {
    let (w, h, pad) = (900.0, 420.0, 50.0);
    let tmax = outcomes.iter().flat_map(|o| o.timeline.iter().map(|p| p.0)).fold(1.0, f64::max);
    let colors = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
    let x = |t: f64| pad + t / tmax * (w - 2.0 * pad);
    let y = |b: f64| h - pad - b.clamp(0.0, 1.0) * (h - 2.0 * pad);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s.push_str(&format!("<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"));
    for b in [0.0, 0.25, 0.5, 0.75, 0.9, 1.0] {
        s.push_str(&format!("<line x1=\"{pad}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#ddd\"/><text x=\"5\" y=\"{:.1}\">{b}</text>\n", w - pad, y(b) + 4.0, y0 = y(b)));
    }
    if let Some(o) = outcomes.first() {
        s.push_str(&format!("<line x1=\"{x0:.1}\" x2=\"{x0:.1}\" y1=\"{pad}\" y2=\"{}\" stroke=\"#999\" stroke-dasharray=\"4\"/><text x=\"{:.1}\" y=\"{}\">shift</text>\n", h - pad, x(o.shift_s) + 3.0, pad - 5.0, x0 = x(o.shift_s)));
    }
    for (i, o) in outcomes.iter().enumerate() {
        let c = colors[i % colors.len()];
        let pts: Vec<String> = o.timeline.iter().map(|(t, b)| format!("{:.1},{:.1}", x(*t), y(*b))).collect();
        s.push_str(&format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>\n", pts.join(" ")));
        s.push_str(&format!("<text x=\"{}\" y=\"{}\" fill=\"{c}\">{} workers, {}</text>\n", w - pad - 220.0, h - pad - 10.0 - 16.0 * i as f64, o.workers, o.policy));
    }
    s.push_str(&format!("<text x=\"{}\" y=\"{}\">seconds</text><text x=\"{pad}\" y=\"20\">windowed balancedness (mean/max rank load)</text>\n</svg>\n", w / 2.0, h - 10.0));
    s
}

/// The generated checkpoint of the benchmark: `SynthSpec::skewed_bench` with `--expert-inter`.
/// The prompts of the two workload phases: the generated checkpoint's skewed prompt sets, or
/// 24-token pieces of the two `--phase-texts` tokenized by `--model`'s tokenizer.
fn phase_prompts(model: &Path, a: &StragglerArgs) -> anyhow::Result<(Vec<Vec<u32>>, Vec<Vec<u32>>)> {
    let Some(texts) = &a.phase_texts else {
        let spec = bench_spec(a);
        return Ok((skewed_prompts(&spec, 0, 64, 24, 1), skewed_prompts(&spec, 1, 64, 24, 2)));
    };
    anyhow::ensure!(texts.len() == 2, "--phase-texts takes two files (first phase, second phase), not {}", texts.len());
    let tok = worker::tokenizer::Tokenizer::from_dir(model)?.with_context(|| format!("{} has no tokenizer.json", model.display()))?;
    let mut phases = Vec::new();
    for f in texts {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let prompts: Vec<Vec<u32>> = tok.encode(&text)?.chunks_exact(24).take(256).map(<[u32]>::to_vec).collect();
        anyhow::ensure!(!prompts.is_empty(), "{}: fewer than 24 tokens", f.display());
        phases.push(prompts);
    }
    let b = phases.pop().unwrap_or_default();
    Ok((phases.pop().unwrap_or_default(), b))
}

/// `--workers`, or the default sizes (see its help).
fn cluster_sizes(a: &StragglerArgs) -> Vec<usize> {
    a.workers.clone().unwrap_or_else(|| {
        let fit: Vec<usize> = [2, 4].into_iter().filter(|&n| super::local_cluster::WorkerCores::for_cluster(n, a.threads_per_worker).pinned).collect();
        if fit.is_empty() { vec![2] } else { fit }
    })
}

fn bench_spec(a: &StragglerArgs) -> SynthSpec {
    let base = SynthSpec::skewed_bench();
    let skew = base.skew.clone().map(|sk| worker::synth::RoutingSkew { strength: a.skew_strength, ..sk });
    SynthSpec { expert_inter: a.expert_inter, skew, ..base }
}

pub fn run(a: StragglerArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.phase_seconds > 0.0 && a.phase_seconds.is_finite(), "--phase-seconds must be positive");
    anyhow::ensure!(
        a.settle_seconds >= 0.0 && a.settle_seconds < a.phase_seconds,
        "--settle-seconds must be at least 0 and below --phase-seconds ({})",
        a.phase_seconds
    );
    anyhow::ensure!(a.clients > 0 && a.max_tokens > 1, "--clients ≥ 1 and --max-tokens ≥ 2");
    let policies: Vec<String> = a.policies.clone().unwrap_or_else(|| POLICIES.iter().map(|p| p.to_string()).collect());
    if let Some(p) = policies.iter().find(|p| !POLICIES.contains(&p.as_str())) {
        anyhow::bail!("unknown policy {p:?} (known: {})", POLICIES.join(", "));
    }
    if a.json {
        super::local_cluster::relay_child_output_to_stderr();
    }
    anyhow::ensure!(a.expert_inter >= 1, "--expert-inter must be at least 1");
    anyhow::ensure!(a.max_batch_tokens >= 1, "--max-batch-tokens must be at least 1");
    let spec = bench_spec(&a);
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let model = a.model_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("switchyard-straggler-model-clustered-i{}-s{}", a.expert_inter, a.skew_strength)));
            // The routing skew is in the weights, not in config.json: a file beside them says which.
            let skew_file = model.join("switchyard-skew-strength");
            if !model.join("config.json").exists() {
                write_checkpoint(&model, &spec)?;
                std::fs::write(&skew_file, a.skew_strength.to_string()).with_context(|| format!("writing {}", skew_file.display()))?;
            }
            let written = std::fs::read_to_string(&skew_file).ok().and_then(|t| t.trim().parse::<f64>().ok());
            anyhow::ensure!(
                written == Some(a.skew_strength),
                "{} holds a checkpoint of skew strength {} (--skew-strength {}); remove it or pass another --model-dir",
                model.display(),
                written.map_or("unknown".to_string(), |w| w.to_string()),
                a.skew_strength
            );
            let cfg = worker::ModelConfig::from_dir(&model)?;
            anyhow::ensure!(
                cfg.moe_intermediate_size == spec.expert_inter && cfg.hidden_size == spec.hidden,
                "{} holds a checkpoint of another shape (expert FFN {}, hidden {}); remove it or pass another --model-dir",
                model.display(),
                cfg.moe_intermediate_size,
                cfg.hidden_size
            );
            model
        }
    };
    let cfg = worker::ModelConfig::from_dir(&model)?;
    let (nl, ne) = (cfg.moe_layers().len(), cfg.router.n_experts);
    // EPLB's statistics: the first phase's routing, measured in this process.
    let (phase_a, _) = phase_prompts(&model, &a)?;
    let first_phase = phase_routing(&model, &phase_a[..phase_a.len().min(64)], 8)?;
    let tmp = tempfile::tempdir()?;
    let mut outcomes = Vec::new();
    let sizes = cluster_sizes(&a);
    for &n in &sizes {
        anyhow::ensure!(n >= 2, "straggler runs need at least 2 workers");
        let slots = ne.div_ceil(n) + a.spare_slots;
        let topo = placement::Topology::uniform(n, 1)?;
        let contiguous = placement::solver::contiguous::solve(nl, ne, &topo, slots)?;
        let cpath = tmp.path().join(format!("contiguous-{n}.json"));
        contiguous.write(&cpath)?;
        let stats = placement::RoutingStats::from_load(first_phase.clone())?;
        let opts = placement::solver::SolveOptions::new(topo, slots);
        let (eplb, _) = placement::solver::solve(placement::solver::SolverKind::Eplb, &stats, &opts, &|_| {})?;
        let epath = tmp.path().join(format!("eplb-{n}.json"));
        eplb.write(&epath)?;
        for p in &policies {
            eprintln!("running {n} workers, {p} ({:.0} s)…", 2.0 * a.phase_seconds);
            outcomes.push(run_policy(&model, n, p, Some(&epath), &cpath, &a).with_context(|| format!("{n} workers, {p}"))?);
        }
    }
    if let Some(path) = &a.plot {
        std::fs::write(path, svg(&outcomes)).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        for o in &outcomes {
            let v = serde_json::json!({
                "workers": o.workers, "policy": o.policy, "tokens_per_s": o.tokens_per_s, "p50_step_ms": o.p50_ms,
                "p99_step_ms": o.p99_ms, "projected_p50_step_ms": o.projected_p50_ms, "projected_p99_step_ms": o.projected_p99_ms,
                "settled_p50_step_ms": o.settled_p50_ms, "settled_p99_step_ms": o.settled_p99_ms, "settle_s": a.settle_seconds,
                "balancedness_after_shift": o.balancedness_after_shift, "recovery_s": o.recovery_s,
                "migrations": o.migrations, "experts_moved": o.experts_moved, "longest_migration_step_ms": o.longest_migration_step_ms,
            });
            println!("{v}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let served = match (&a.model, &a.phase_texts) {
        (Some(m), Some(t)) => format!(
            "{} ({} MoE layers x {} experts top-{}, hidden {}, expert FFN {}; phases: {})",
            m.display(),
            nl,
            ne,
            cfg.router.top_k,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            t.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" then ")
        ),
        _ => format!("skewed {} ({nl} MoE layers x {ne} experts top-{}, hidden {}, expert FFN {})", spec.arch, spec.top_k, spec.hidden, spec.expert_inter),
    };
    println!(
        "{served}, {} clients, {:.0} s per phase, slots = experts/workers + {}, max batch tokens {}",
        a.clients, a.phase_seconds, a.spare_slots, a.max_batch_tokens
    );
    for &n in &sizes {
        println!("  {n} workers: {}", super::local_cluster::WorkerCores::for_cluster(n, a.threads_per_worker).describe());
    }
    println!(
        "{:>7} {:<22} {:>8} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>10} {:>10} {:>10} {:>7} {:>13}",
        "workers", "policy", "tok/s", "settl.p50", "settl.p99", "p50 ms", "p99 ms", "proj. p50", "proj. p99", "bal. after", "recovery s", "migrations", "experts", "max mig. step"
    );
    for o in &outcomes {
        println!(
            "{:>7} {:<22} {:>8.1} {:>9.2} {:>9.2} {:>7.2} {:>7.2} {:>9.2} {:>9.2} {:>10.3} {:>10} {:>10} {:>7} {:>10.1} ms",
            o.workers,
            o.policy,
            o.tokens_per_s,
            o.settled_p50_ms,
            o.settled_p99_ms,
            o.p50_ms,
            o.p99_ms,
            o.projected_p50_ms,
            o.projected_p99_ms,
            o.balancedness_after_shift,
            o.recovery_s.map_or("never".into(), |r| format!("{r:.1}")),
            o.migrations,
            o.experts_moved,
            o.longest_migration_step_ms
        );
    }
    println!(
        "settl. = wall-clock busy engine steps from {:.0} s after the shift on (the same window for every policy: after a rebalancer has acted)",
        a.settle_seconds
    );
    println!("tok/s = tokens streamed to the clients after the shift, per second");
    println!("p50/p99 = all busy steps after the shift, transient included (wall clock); proj. = the same steps had every rank cores of its own");
    println!("  (per compute segment between collectives the slowest rank's CPU time, summed; transfers left out)");
    println!("balancedness = windowed Σmean/Σmax rank load (half-life 2 s); max mig. step = longest step while a migration ran");
    Ok(ExitCode::SUCCESS)
}
