//! `switchyard bench datapath`: the home and the affinity data path side by side in one run, on
//! local CPU clusters of 2 and 4 workers serving a trained model (default `models/tiny-moe`), with
//! a contiguous placement and an ILP-affinity one (`place solve --mode affinity`, solved on a
//! trace of the served model's routing). Per run: bytes every rank sends per token and MoE layer
//! (dispatch, combine and the affinity path's KV exchange), the share of (token, expert) rows
//! whose dispatch and combine stayed on their rank, tokens that moved, p50/p99 busy step time
//! (wall clock, workers pinned to cores of their own where the machine has them) and tokens/s,
//! and the KV copies each rank holds.
//!
//! `--synthetic` serves a generated checkpoint with cross-layer affinity instead (four token
//! groups, each routed mostly to its own experts in every layer, scattered over the expert ids so
//! that only a placement solved on its routing co-locates a group's consecutive experts), its
//! trace recorded in this process: what the affinity path does where the affinity is strong.

use anyhow::Context;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use super::bench_common::percentile;
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::admin_client::AdminClient;
use switchyard_proto::v1::inference_client::InferenceClient;

const TOKEN: &str = "bench-datapath";

#[derive(clap::Args, Debug, Clone)]
pub struct DatapathArgs {
    /// The served model (default: the trained models/tiny-moe).
    #[arg(long, default_value = "models/tiny-moe")]
    pub model: PathBuf,
    /// Routing trace of the served model the ILP-affinity placement is solved on (default:
    /// MODEL/routing/prose.safetensors).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Text the prompts are cut from (default: MODEL/README.md, prose like the default trace).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub workers: Vec<usize>,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: u32,
    /// Seconds measured per run (after a one-second warm-up).
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Seconds the ILP may spend on the placement.
    #[arg(long, default_value_t = 20.0)]
    pub time_limit: f64,
    /// Data paths to compare (`affinity:N` for coherence groups of N ranks).
    #[arg(long, value_delimiter = ',', default_value = "home,affinity")]
    pub paths: Vec<String>,
    /// Serve a generated checkpoint with strong cross-layer affinity (see the module docs)
    /// instead of --model.
    #[arg(long, conflicts_with_all = ["trace", "prompts"])]
    pub synthetic: bool,
    /// Keep the placements solved (and the --synthetic checkpoint and trace) here instead of in a
    /// temporary directory.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// The `--synthetic` checkpoint: the scheduler benchmark's shape (mixtral, hidden 256, 4 layers,
/// 16 experts top-2) with 2 KV heads (keys and values half a hidden row per token and layer, as
/// Mixtral's and Qwen3-30B's), four token groups with their hot experts scattered.
fn synthetic_spec() -> worker::synth::SynthSpec {
    use worker::synth::{HotLayout, RoutingSkew, SynthSpec};
    SynthSpec {
        kv_heads: 2,
        skew: Some(RoutingSkew { zipf: 1.2, strength: 1.5, groups: 4, layout: HotLayout::Scattered }),
        ..SynthSpec::skewed_bench()
    }
}

/// Writes the synthetic checkpoint and its routing trace into `dir`; returns the prompts to
/// serve (every group in turn).
fn synthetic_model(dir: &Path, prompt_tokens: usize) -> anyhow::Result<(PathBuf, PathBuf, Vec<Vec<u32>>)> {
    let spec = synthetic_spec();
    let model = dir.join("synthetic-affinity");
    worker::synth::write_checkpoint(&model, &spec)?;
    let groups = spec.skew.as_ref().map_or(1, |s| s.groups);
    let per_group: Vec<Vec<Vec<u32>>> = (0..groups).map(|g| worker::synth::skewed_prompts(&spec, g, 64, prompt_tokens, 100 + g as u64)).collect();
    let prompts: Vec<Vec<u32>> = (0..64).flat_map(|i| per_group.iter().map(move |p| p[i].clone())).collect();
    // The trace: other prompts of the same groups, longer (prefill routing of whole sequences).
    let recorded: Vec<Vec<u32>> = (0..groups).flat_map(|g| worker::synth::skewed_prompts(&spec, g, 32, 64, 200 + g as u64)).collect();
    let m = worker::Model::load(&model, &worker::LoadOptions::default())?;
    let trace = worker::routing_capture::capture(&m, &recorded)?;
    let trace_path = dir.join("synthetic-affinity.safetensors");
    trace.write(&trace_path)?;
    Ok((model, trace_path, prompts))
}

#[derive(Debug, Clone, Serialize)]
struct Outcome {
    workers: usize,
    placement: String,
    data_path: String,
    pinned: bool,
    tokens_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Bytes all ranks sent to other ranks, per token and MoE layer.
    bytes_per_token_layer: f64,
    /// Of them, the KV exchange's.
    kv_bytes_per_token_layer: f64,
    /// (token, expert) rows whose dispatch and combine stayed on their rank.
    local_row_share: f64,
    /// Tokens whose combine landed on another rank, per token and MoE layer.
    moved_per_token_layer: f64,
    /// Largest KV copies of peers' sequences one rank held (MiB).
    kv_copy_mib_peak: f64,
    /// What `placement::datapath::score` predicts for the trace the ILP was solved on, served
    /// the same way (bytes per token and layer).
    predicted_bytes_per_token_layer: f64,
}

/// One client: requests back to back until `stop`, counting tokens received.
async fn client(addr: String, prompts: Vec<Vec<u32>>, stop: Arc<AtomicBool>, max_tokens: u32, tokens: Arc<AtomicU64>) {
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let prompt = prompts[i % prompts.len()].clone();
        i += 1;
        let Ok(ch) = super::cluster::connect_channel(&addr).await else { break };
        let req = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt })),
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let Ok(s) = InferenceClient::new(ch).generate(req).await else { continue };
        let mut s = s.into_inner();
        while let Ok(Some(m)) = s.message().await {
            tokens.fetch_add(1, Ordering::Relaxed);
            if m.finish_reason != 0 {
                break;
            }
        }
    }
}

/// The prediction for one run: `placement::datapath::score` on the trace.
fn predict(trace: &placement::RoutingTrace, p: &placement::Placement, path: &str, shape: &placement::datapath::PathShape) -> anyhow::Result<f64> {
    let kind = worker::expert_parallel::DataPath::parse(path).map_err(anyhow::Error::msg)?.kind();
    Ok(placement::datapath::score(trace, p, kind, shape)?.bytes_per_token_layer())
}

fn run_one(a: &DatapathArgs, workers: usize, placement: (&str, Option<&Path>), path: &str, prompts: &[Vec<u32>], top_k: usize) -> anyhow::Result<Outcome> {
    let cores = super::local_cluster::WorkerCores::for_cluster(workers, None);
    let args = vec![format!("--data-path={path}")];
    let cl = super::local_cluster::start_local_cluster(&a.model, workers, placement.1, "127.0.0.1:0", Some(TOKEN), &args, &[], Some(cores))?;
    let pinned = cores.pinned;
    let rt = super::bench_common::load_generator_runtime(pinned)?;
    let out = rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let tokens = Arc::new(AtomicU64::new(0));
        let mut hs = Vec::new();
        for k in 0..a.clients {
            let rot: Vec<Vec<u32>> = prompts.iter().cycle().skip(k * 5).take(prompts.len()).cloned().collect();
            hs.push(tokio::spawn(client(cl.addr.clone(), rot, stop.clone(), a.max_tokens, tokens.clone())));
        }
        let ep = coordinator::tls::endpoint(&cl.addr)?.connect().await?;
        let header: tonic::metadata::MetadataValue<_> = format!("Bearer {TOKEN}").parse()?;
        let mut admin = AdminClient::with_interceptor(ep, super::admin::BearerToken(header));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = admin.get_stats(pb::GetStatsRequest {}).await; // drops the warm-up's steps
        let before = super::cluster::worker_totals(&cl.worker_addrs).await;
        let tokens_before = tokens.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let mut steps = Vec::new();
        let mut kv_peak = before.kv_copy_bytes_max;
        while t0.elapsed().as_secs_f64() < a.seconds {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if let Ok(s) = admin.get_stats(pb::GetStatsRequest {}).await {
                steps.extend(s.into_inner().step_us.iter().map(|&us| us as f64 / 1e3));
            }
            kv_peak = kv_peak.max(super::cluster::worker_totals(&cl.worker_addrs).await.kv_copy_bytes_max);
        }
        let wall = t0.elapsed().as_secs_f64();
        let after = super::cluster::worker_totals(&cl.worker_addrs).await;
        let generated = tokens.load(Ordering::Relaxed) - tokens_before;
        stop.store(true, Ordering::SeqCst);
        for h in hs {
            h.abort();
        }
        let rows = (after.local_rows + after.remote_rows).saturating_sub(before.local_rows + before.remote_rows) as f64;
        // (token, layer) pairs: every token through every MoE layer has top-k rows.
        let token_layers = rows / top_k.max(1) as f64;
        let per = |x: u64, y: u64| if token_layers > 0.0 { x.saturating_sub(y) as f64 / token_layers } else { 0.0 };
        anyhow::Ok(Outcome {
            workers,
            placement: placement.0.to_string(),
            data_path: path.to_string(),
            pinned,
            tokens_per_s: generated as f64 / wall,
            p50_ms: percentile(&mut steps.clone(), 0.5),
            p99_ms: percentile(&mut steps, 0.99),
            bytes_per_token_layer: per(after.alltoall_bytes, before.alltoall_bytes),
            kv_bytes_per_token_layer: per(after.kv_exchange_bytes, before.kv_exchange_bytes),
            local_row_share: if rows > 0.0 { after.local_rows.saturating_sub(before.local_rows) as f64 / rows } else { 0.0 },
            moved_per_token_layer: per(after.tokens_moved, before.tokens_moved),
            kv_copy_mib_peak: kv_peak as f64 / (1 << 20) as f64,
            predicted_bytes_per_token_layer: 0.0,
        })
    })?;
    drop(cl);
    Ok(out)
}

/// The ILP-affinity placement for `workers` ranks, solved by `place solve` on `trace`.
fn solve_affinity(a: &DatapathArgs, trace: &Path, workers: usize, experts: usize, dir: &Path) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(experts.is_multiple_of(workers), "{experts} experts do not split evenly over {workers} workers");
    let out = dir.join(format!("ilp-affinity-{workers}.json"));
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["place", "solve", "--mode", "affinity", "--solver", "ilp", "--trace"])
        .arg(trace)
        .args(["--ranks", &workers.to_string(), "--slots-per-rank", &(experts / workers).to_string()])
        .args(["--time-limit", &a.time_limit.to_string(), "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "place solve for {workers} workers failed");
    Ok(out)
}

pub fn run(mut a: DatapathArgs) -> anyhow::Result<ExitCode> {
    // The table (or JSON) is this command's stdout; the clusters' lines go to stderr.
    super::local_cluster::relay_child_output_to_stderr();
    anyhow::ensure!(a.seconds > 0.0 && a.seconds.is_finite(), "--seconds must be positive");
    anyhow::ensure!(a.clients >= 1 && a.prompt_tokens >= 1 && a.max_tokens >= 1, "--clients, --prompt-tokens and --max-tokens must be at least 1");
    for p in &a.paths {
        worker::expert_parallel::DataPath::parse(p).map_err(anyhow::Error::msg)?;
    }
    let tmp = tempfile::tempdir()?;
    let dir = match &a.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    let (trace, text_file, prompts) = if a.synthetic {
        let (model, trace, prompts) = synthetic_model(&dir, a.prompt_tokens)?;
        a.model = model;
        (trace, PathBuf::from("(generated, every token group in turn)"), prompts)
    } else {
        let trace = a.trace.clone().unwrap_or_else(|| a.model.join("routing/prose.safetensors"));
        let text_file = a.prompts.clone().unwrap_or_else(|| a.model.join("README.md"));
        let tok = worker::tokenizer::Tokenizer::from_dir(&a.model)?.with_context(|| format!("{} has no tokenizer.json", a.model.display()))?;
        let text = std::fs::read_to_string(&text_file).with_context(|| format!("reading {}", text_file.display()))?;
        let prompts: Vec<Vec<u32>> = tok.encode(&text)?.chunks_exact(a.prompt_tokens).take(256).map(<[u32]>::to_vec).collect();
        anyhow::ensure!(prompts.len() >= 4, "{}: too little text for {}-token prompts", text_file.display(), a.prompt_tokens);
        (trace, text_file, prompts)
    };
    let cfg = worker::ModelConfig::from_dir(&a.model).with_context(|| format!("model {}", a.model.display()))?;
    let (experts, top_k) = (cfg.router.n_experts, cfg.router.top_k);
    let routing = placement::RoutingTrace::read(&trace).with_context(|| format!("trace {}", trace.display()))?;
    let shape = cfg.data_path_shape(a.prompt_tokens, a.max_tokens as usize);
    let mut rows = Vec::new();
    for &n in &a.workers {
        anyhow::ensure!(n >= 2, "--workers: a data path needs at least 2 workers, not {n}");
        let ilp = solve_affinity(&a, &trace, n, experts, &dir)?;
        let contiguous = placement::solver::contiguous::solve(routing.num_layers, experts, &placement::Topology::uniform(n, 1)?, experts / n)?;
        let ilp_placement = placement::Placement::read(&ilp)?;
        for (placement, p) in [(("contiguous", None), &contiguous), (("ilp-affinity", Some(ilp.as_path())), &ilp_placement)] {
            for path in &a.paths {
                let mut o = run_one(&a, n, placement, path, &prompts, top_k)?;
                o.predicted_bytes_per_token_layer = predict(&routing, p, path, &shape)?;
                if !a.json {
                    eprintln!("  {n} workers, {}, {path}: {:.1} tok/s", placement.0, o.tokens_per_s);
                }
                rows.push(o);
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "model": a.model, "trace": trace, "rows": rows }))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "model {} ({} experts, top-{top_k}); ILP-affinity solved on {}; {} clients, {}-token prompts from {}, {} new tokens each; {} s per run",
        a.model.display(),
        experts,
        trace.display(),
        a.clients,
        a.prompt_tokens,
        text_file.display(),
        a.max_tokens,
        a.seconds
    );
    println!(
        "{:>7} {:>13} {:>11} {:>7} {:>12} {:>10} {:>10} {:>8} {:>9} {:>8} {:>8} {:>9} {:>10}",
        "workers", "placement", "path", "pinned", "B/tok/layer", "predicted", "KV B", "local %", "moved", "p50 ms", "p99 ms", "tok/s", "KV copy MiB"
    );
    for o in &rows {
        println!(
            "{:>7} {:>13} {:>11} {:>7} {:>12.0} {:>10.0} {:>10.0} {:>7.1}% {:>9.3} {:>8.2} {:>8.2} {:>9.1} {:>10.2}",
            o.workers,
            o.placement,
            o.data_path,
            if o.pinned { "yes" } else { "no" },
            o.bytes_per_token_layer,
            o.predicted_bytes_per_token_layer,
            o.kv_bytes_per_token_layer,
            100.0 * o.local_row_share,
            o.moved_per_token_layer,
            o.p50_ms,
            o.p99_ms,
            o.tokens_per_s,
            o.kv_copy_mib_peak
        );
    }
    println!("predicted: placement::datapath::score on the trace the ILP was solved on, served as the same requests (same rules as the workers; another text than the prompts, so routing differs)");
    println!("B/tok/layer: bytes all ranks sent to other ranks per token and MoE layer (dispatch, combine, KV exchange; KV B: the exchange's part); local %: (token, expert) rows whose dispatch and combine stayed on their rank; moved: tokens whose combine landed on another rank, per token and layer");
    for o in rows.iter().filter(|o| o.data_path != "home") {
        if let Some(h) = rows.iter().find(|h| h.workers == o.workers && h.placement == o.placement && h.data_path == "home") {
            println!(
                "{} workers, {}: {} sends {:.2}x the bytes of home, {:.2}x the tokens/s, p99 {:.2}x",
                o.workers,
                o.placement,
                o.data_path,
                o.bytes_per_token_layer / h.bytes_per_token_layer.max(1e-9),
                o.tokens_per_s / h.tokens_per_s.max(1e-9),
                o.p99_ms / h.p99_ms.max(1e-9)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
