//! The expert-parallel cluster: `switchyard coordinator`, `switchyard worker`, `switchyard up`,
//! `switchyard generate --endpoint` and `switchyard model check --workers N`.
//!
//! The coordinator serves the client API (`switchyard.v1.Inference`, gRPC health, reflection) and
//! the `Control` service workers register with. Once every expected worker has registered it
//! calls `Worker.Start` on each with its assignment (rank, world, peers' transport addresses,
//! placement JSON, model path); workers load the dense parts and their slots, build the TCP mesh
//! and start stepping. Requests go to the rank with the least outstanding tokens and are streamed
//! back; a worker that fails mid-request fails its requests with `UNAVAILABLE`.
use anyhow::{Context, bail};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use switchyard_proto::v1 as pb;
use coordinator::tls::{ServerTls, endpoint};
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;
use tonic::Status;
use worker::ModelConfig;

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Exit when stdin closes (the parent `switchyard up` is gone, even if it was killed).
pub(super) fn exit_on_stdin_eof() {
    std::thread::spawn(|| {
        let mut buf = String::new();
        let stdin = std::io::stdin();
        loop {
            buf.clear();
            match stdin.lock().read_line(&mut buf) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------------------------

/// Where the cluster's placement comes from: a file, a solve on routing statistics, or contiguous.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PlacementArgs {
    /// Placement JSON (switchyard.placement.v1), validated against the model.
    #[arg(long, conflicts_with = "routing_trace")]
    pub placement: Option<PathBuf>,
    /// Solve the placement with the placement engine from this routing trace (`.safetensors`),
    /// token log (`.jsonl`) or SGLang `logical_count` (`.json`). Default without either: contiguous.
    #[arg(long)]
    pub routing_trace: Option<PathBuf>,
    /// Solver for --routing-trace.
    #[arg(long, default_value = "eplb", requires = "routing_trace")]
    pub solver: placement::solver::SolverKind,
    /// Traffic model of the ILP (home or affinity).
    #[arg(long, default_value = "home", requires = "routing_trace")]
    pub mode: placement::solver::Mode,
    /// Expert slots per worker (default: experts / workers, rounded up).
    #[arg(long)]
    pub slots_per_rank: Option<usize>,
    /// Seconds the ILP may spend.
    #[arg(long, default_value_t = 30.0, requires = "routing_trace")]
    pub solve_time_limit: f64,
}

impl PlacementArgs {
    /// The placement for `workers` ranks of this model.
    pub fn resolve(&self, cfg: &ModelConfig, workers: usize) -> anyhow::Result<placement::Placement> {
        self.resolve_with(cfg, workers, 1)
    }

    /// The placement for `workers` ranks with every expert on at least `min_replicas` of them
    /// (a file must already satisfy it).
    pub fn resolve_with(&self, cfg: &ModelConfig, workers: usize, min_replicas: usize) -> anyhow::Result<placement::Placement> {
        anyhow::ensure!(min_replicas >= 1, "--min-replicas must be at least 1");
        let n_l = cfg.moe_layers().len();
        let n_e = cfg.router.n_experts;
        let floor = placement::solver::effective_min(min_replicas, workers);
        let slots = self.slots_per_rank.unwrap_or((n_e * floor).div_ceil(workers));
        let topo = placement::Topology::uniform(workers, 1)?;
        let (p, origin) = if let Some(f) = &self.placement {
            (placement::Placement::read(f)?, format!("placement {}", f.display()))
        } else if let Some(trace) = &self.routing_trace {
            let routing = super::routing::read_routing(trace, Some(n_e))?;
            let mut stats = routing.stats(workers)?;
            if stats.num_layers != n_l || stats.num_experts != n_e {
                bail!(
                    "routing trace {} has {} MoE layers x {} experts, the model has {n_l} x {n_e}",
                    trace.display(),
                    stats.num_layers,
                    stats.num_experts
                );
            }
            let mut opts = placement::solver::SolveOptions::new(topo, slots);
            opts.mode = self.mode;
            opts.min_replicas = min_replicas;
            anyhow::ensure!(self.solve_time_limit > 0.0 && self.solve_time_limit.is_finite(), "--solve-time-limit must be positive");
            opts.time_limit = std::time::Duration::from_secs_f64(self.solve_time_limit);
            // As `place solve` does: the ILP plans for a sample's luck and for shifts of the traffic.
            if let (placement::RoutingFile::Trace(t), placement::solver::SolverKind::Ilp) = (&routing, self.solver) {
                stats = placement::robust::shrink_loads(&stats, t, placement::robust::RESAMPLES, 0).0;
                opts.plan_for_trace(t);
            }
            let (p, report) = placement::solver::solve(self.solver, &stats, &opts, &|_| {})
                .with_context(|| format!("solving a placement from {}", trace.display()))?;
            tracing::info!(objective = ?report.objective, "placement solved from {}", trace.display());
            (p, format!("the placement solved from {}", trace.display()))
        } else {
            let mut p = placement::solver::contiguous::solve(n_l, n_e, &topo, slots)?;
            placement::solver::ensure_min_replicas(&mut p, min_replicas, &[])?;
            (p, "the contiguous placement".into())
        };
        check_placement(&p, cfg, workers, &origin)?;
        let have = placement::solver::min_replica_count(&p);
        anyhow::ensure!(have >= floor, "{origin} has an expert on {have} rank(s); --min-replicas asks for {floor}");
        Ok(p)
    }
}

/// The placement for `workers` ranks from a file (validated against the model), or contiguous.
pub fn load_placement(cfg: &ModelConfig, workers: usize, file: Option<&Path>) -> anyhow::Result<placement::Placement> {
    PlacementArgs { placement: file.map(Path::to_path_buf), ..Default::default() }.resolve(cfg, workers)
}


/// What every long-running server process (coordinator, worker) takes besides its own settings.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServeArgs {
    /// Prometheus `/metrics` listen address (e.g. 0.0.0.0:9090); none: no metrics endpoint.
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// OpenTelemetry collector (OTLP/gRPC) to export trace spans to.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub tls: ServerTls,
}




pub use super::coordinator_cmd::SchedulerArgs;
pub use coordinator::server::{check_placement, continuation};

// ---------------------------------------------------------------------------------------------
// Client side: generate --endpoint, model check --workers
// ---------------------------------------------------------------------------------------------

/// What `generate_remote` returns.
pub struct RemoteResult {
    pub ids: Vec<u32>,
    pub text: String,
    pub prompt_logits: Vec<f32>,
    pub finish: i32,
}

pub async fn generate_remote(endpoint: &str, req: pb::GenerateRequest, print: bool) -> Result<RemoteResult, Status> {
    let mut out = RemoteResult { ids: vec![], text: String::new(), prompt_logits: vec![], finish: 0 };
    generate_remote_into(endpoint, req, print, &mut out).await?;
    Ok(out)
}

/// Streams one request, appending what arrives to `out` (kept when the stream fails midway).
async fn generate_remote_into(endpoint: &str, req: pb::GenerateRequest, print: bool, out: &mut RemoteResult) -> Result<(), Status> {
    let mut c = InferenceClient::new(connect(endpoint).await?).max_decoding_message_size(1 << 30);
    let mut s = c.generate(req).await.map_err(connection_lost)?.into_inner();
    while let Some(m) = s.message().await.map_err(connection_lost)? {
        if !m.prompt_logits.is_empty() {
            out.prompt_logits = m.prompt_logits;
            continue;
        }
        out.ids.push(m.token_id);
        out.text.push_str(&m.text);
        if print {
            use std::io::Write;
            print!("{}", m.text);
            let _ = std::io::stdout().flush();
        }
        if m.finish_reason != 0 {
            out.finish = m.finish_reason;
            return Ok(());
        }
    }
    // The stream ended without a finish reason: the coordinator went away mid-request.
    Err(Status::unavailable(format!("the stream from {endpoint} ended before the request finished")))
}

/// A connected channel to `addr` (with the process's client TLS).
pub(super) async fn connect_channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    endpoint(addr)?.connect_timeout(Duration::from_secs(10)).connect().await
}

/// Streams `req` from one of `endpoints`, retrying retryable failures (`UNAVAILABLE`: a
/// coordinator that died or is a standby, a worker that died) on the next endpoint up to
/// `retries` times. A retry continues the generation: the tokens received so far are appended to
/// the prompt and `max_tokens` shrinks by as many, so the stream the caller sees is one sequence.
pub async fn generate_with_retries(
    endpoints: &[String],
    req: pb::GenerateRequest,
    retries: u32,
    print: bool,
) -> Result<(RemoteResult, u32), Status> {
    let mut got = RemoteResult { ids: vec![], text: String::new(), prompt_logits: vec![], finish: 0 };
    let mut last = Status::unavailable("no endpoint given");
    for attempt in 0..=retries {
        if attempt > 0 {
            tokio::time::sleep(retry_backoff(attempt)).await;
        }
        let ep = &endpoints[attempt as usize % endpoints.len().max(1)];
        let mut this = req.clone();
        if !got.ids.is_empty() {
            // Continue after what arrived: the original prompt's ids + the generated ids.
            let ids = match &req.prompt {
                Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.clone(),
                Some(pb::generate_request::Prompt::Text(t)) => match tokenize_at(ep, t).await {
                    Ok(ids) => ids,
                    Err(e) => {
                        last = e;
                        continue;
                    }
                },
                None => vec![],
            };
            this = continuation(&req, ids, &got.ids);
        }
        let before = got.ids.len();
        match generate_remote_into(ep, this, print, &mut got).await {
            Ok(()) => return Ok((got, attempt)),
            Err(st) if st.code() == tonic::Code::Unavailable => {
                tracing::warn!("attempt {} at {ep} failed after {} tokens: {}", attempt + 1, got.ids.len() - before, st.message());
                last = st;
            }
            Err(st) => return Err(st),
        }
    }
    Err(last)
}


/// A call that broke because the connection did (the coordinator died mid-stream: h2 or hyper
/// errors, surfaced as `UNKNOWN` with a source) is retryable like `UNAVAILABLE`; statuses the
/// server sent keep their code.
fn connection_lost(st: Status) -> Status {
    if matches!(st.code(), tonic::Code::Unknown | tonic::Code::Cancelled) && std::error::Error::source(&st).is_some() {
        let why = std::error::Error::source(&st).map(error_chain).unwrap_or_default();
        let hint = if coordinator::tls::client_enabled() { "" } else { " (if the server speaks TLS, pass --tls-ca)" };
        return Status::unavailable(format!("connection lost: {}: {why}{hint}", st.message()));
    }
    if st.code() == tonic::Code::Internal && std::error::Error::source(&st).is_some() && !coordinator::tls::client_enabled() {
        // A protocol error of the connection itself (a status the server sent has no source):
        // what a plaintext client gets from a TLS server.
        return Status::internal(format!("{} (if the server speaks TLS, pass --tls-ca)", st.message()));
    }
    st
}

fn retry_backoff(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(5)).min(2000))
}

async fn tokenize_at(endpoint: &str, text: &str) -> Result<Vec<u32>, Status> {
    let mut c = InferenceClient::new(connect(endpoint).await?);
    Ok(c.tokenize(pb::TokenizeRequest { text: text.to_string() }).await?.into_inner().ids)
}

async fn connect(endpoint: &str) -> Result<Channel, Status> {
    connect_channel(endpoint).await.map_err(|e| Status::unavailable(format!("cannot connect to {endpoint}: {}", error_chain(&e))))
}

/// An error with its causes (tonic's transport errors keep the TLS reason in the source).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

pub fn generate_endpoint(endpoint: &str, a: &super::model::GenerateArgs) -> anyhow::Result<ExitCode> {
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(t), None) => pb::generate_request::Prompt::Text(t.clone()),
        (None, Some(ids)) => pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: ids.clone() }),
        _ => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let req = pb::GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(pb::SamplingParams { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k as u32, seed: a.seed }),
        stop_token_ids: a.stop_ids.clone().unwrap_or_default(),
        max_tokens: a.max_tokens as u32,
        ignore_eos: false,
        return_prompt_logits: false,
        ..Default::default()
    };
    let endpoints: Vec<String> = endpoint.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect();
    if endpoints.is_empty() {
        bail!("--endpoint names no address");
    }
    let t0 = std::time::Instant::now();
    let r = runtime()?.block_on(generate_with_retries(&endpoints, req, a.retries, true));
    match r {
        Ok((r, retried)) => {
            println!();
            println!("ids: {}", r.ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
            let fin = pb::FinishReason::try_from(r.finish).map(|f| f.as_str_name()).unwrap_or("?");
            eprintln!("{} generated, finish {fin}, {:.2} s, {retried} retries", r.ids.len(), t0.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => {
            eprintln!("error: status {:?}: {}", s.code(), s.message());
            Ok(ExitCode::from(3))
        }
    }
}

/// `model check --workers N`: every reference case through a real N-worker cluster.
pub fn check_cluster(
    dir: &Path,
    expected: &Path,
    tol: f32,
    workers: usize,
    placement: Option<&Path>,
    coordinator_args: &[String],
    worker_args: &[String],
) -> anyhow::Result<ExitCode> {
    let cases = worker::reference::read_expected(expected)?;
    if cases.is_empty() {
        bail!("{} holds no prompt_0", expected.display());
    }
    let cl = super::local_cluster::start_local_cluster(dir, workers, placement, "127.0.0.1:0", None, coordinator_args, worker_args, None)?;
    let rt = runtime()?;
    let mut ok_all = true;
    // All cases at once: concurrent requests exercise the least-outstanding routing too.
    let results: Vec<Result<RemoteResult, Status>> = rt.block_on(async {
        let mut handles = Vec::new();
        for c in &cases {
            let req = pb::GenerateRequest {
                prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: c.prompt.clone() })),
                sampling: None,
                stop_token_ids: vec![],
                max_tokens: c.greedy.len().max(1) as u32,
                ignore_eos: true,
                return_prompt_logits: true,
                ..Default::default()
            };
            let addr = cl.addr.clone();
            handles.push(tokio::spawn(async move { generate_remote(&addr, req, false).await }));
        }
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap_or_else(|e| Err(Status::internal(e.to_string()))));
        }
        out
    });
    let mut by: HashMap<usize, ()> = HashMap::new();
    for (c, r) in cases.iter().zip(results) {
        by.insert(c.index, ());
        let r = r.map_err(|s| anyhow::anyhow!("prompt {}: {:?}: {}", c.index, s.code(), s.message()))?;
        let d = worker::reference::rel_max_diff(&r.prompt_logits, &c.logits);
        let greedy = &r.ids[..c.greedy.len().min(r.ids.len())];
        let greedy_ok = greedy == c.greedy.as_slice();
        let ok = d < tol && greedy_ok;
        ok_all &= ok;
        println!(
            "prompt {} (len {}): logits max|Δ|/max|expected| = {:.3e} {}, greedy {} {:?}{}",
            c.index,
            c.prompt.len(),
            d,
            if d < tol { "ok" } else { "MISMATCH" },
            if greedy_ok { "ok" } else { "MISMATCH" },
            greedy,
            if greedy_ok { String::new() } else { format!(" expected {:?}", c.greedy) }
        );
    }
    if coordinator_args.iter().any(|a| a.starts_with("--capacity-factor")) {
        let t = rt.block_on(worker_totals(&cl.worker_addrs));
        println!("capacity option: {} assignments rerouted to a next-best expert, {} dropped", t.capacity_rerouted, t.capacity_dropped);
    }
    drop(cl);
    if ok_all {
        println!("all match ({workers} workers)");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("MISMATCH ({workers} workers)");
        Ok(ExitCode::from(1))
    }
}

/// (busy steps, dispatch µs, expert µs, combine µs) summed over the workers of a local cluster,
/// averaged per worker.
/// What the workers of a local cluster report about their expert-parallel steps.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerTotals {
    /// Per worker, averaged over the workers that answered.
    pub busy_steps: u64,
    pub dispatch_us: u64,
    pub expert_us: u64,
    pub combine_us: u64,
    /// Summed over the workers: the capacity option's rerouted and dropped assignments.
    pub capacity_rerouted: u64,
    pub capacity_dropped: u64,
    /// Summed over the workers: the data path counters (see `WorkerHealthResponse`).
    pub alltoall_bytes: u64,
    pub kv_exchange_bytes: u64,
    pub local_rows: u64,
    pub remote_rows: u64,
    pub tokens_moved: u64,
    /// The most bytes of KV copies one worker holds.
    pub kv_copy_bytes_max: u64,
}

/// Ask every worker of `worker_addrs` for its health and total what they report.
pub async fn worker_totals(worker_addrs: &[String]) -> WorkerTotals {
    let (mut t, mut n) = (WorkerTotals::default(), 0u64);
    for a in worker_addrs {
        if let Ok(ch) = connect_channel(a).await
            && let mut w = WorkerClient::new(ch)
            && let Ok(h) = w.health(pb::WorkerHealthRequest::default()).await
        {
            let h = h.into_inner();
            t.busy_steps += h.busy_steps;
            t.dispatch_us += h.dispatch_us;
            t.expert_us += h.expert_us;
            t.combine_us += h.combine_us;
            t.capacity_rerouted += h.capacity_rerouted;
            t.capacity_dropped += h.capacity_dropped;
            t.alltoall_bytes += h.alltoall_bytes;
            t.kv_exchange_bytes += h.kv_exchange_bytes;
            t.local_rows += h.local_rows;
            t.remote_rows += h.remote_rows;
            t.tokens_moved += h.tokens_moved;
            t.kv_copy_bytes_max = t.kv_copy_bytes_max.max(h.kv_copy_bytes);
            n += 1;
        }
    }
    let n = n.max(1);
    WorkerTotals { busy_steps: t.busy_steps / n, dispatch_us: t.dispatch_us / n, expert_us: t.expert_us / n, combine_us: t.combine_us / n, ..t }
}

/// Writes `value` to `path` atomically (a temporary file renamed over it): a process waiting for
/// the file never reads half of it. How `switchyard up` and tests learn a started process's
/// addresses, instead of grepping its output.
pub(super) fn write_ready_file(path: &std::path::Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(value)?).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
