//! `switchyard bench elastic`: what a membership change costs a serving cluster. For a cluster
//! without and with `--min-replicas 2`, clients generate in a loop while one worker is killed
//! (kill -9) and later a fresh one joins; measured: how long until the group serves again over
//! the survivors, until the placement is balanced again, until the joined worker serves; the
//! requests completed, retried and failed; the expert bytes loaded; and whether every completed
//! request produced the same greedy tokens as an uninterrupted run (it must).
use anyhow::Context;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::admin_client::AdminClient;
use super::admin::BearerToken;
use super::local_cluster::{LocalCluster, relay_child_output_to_stderr, start_local_cluster, threads_per_local_worker};

#[derive(clap::Args)]
pub struct ElasticArgs {
    /// Model directory (default: tests/fixtures/qwen3_moe when present, else tests/fixtures/mixtral).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Workers each cluster starts with (one is killed, then one joins).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Clients generating back to back throughout.
    #[arg(long, default_value_t = 6)]
    pub clients: usize,
    #[arg(long, default_value_t = 24)]
    pub max_tokens: u32,
    /// Seconds each phase (serving again, balanced, join) may take before it is reported as "-".
    #[arg(long, default_value_t = 60.0)]
    pub window_s: f64,
    /// Retries of one client request (a retry continues where the failed attempt stopped).
    #[arg(long, default_value_t = 20)]
    pub retries: u32,
    /// One JSON object on stdout instead of the table (the clusters' output goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Admin token of the benchmark's own coordinators.
    #[arg(long, hide = true, default_value = "switchyard-bench-elastic")]
    pub admin_token: String,
}

/// Balancedness (mean / max rank load) from which the placement counts as balanced again.
const BALANCED: f64 = 0.9;

/// One configuration's measurements. `None`: not reached within the window.
#[derive(serde::Serialize, Default)]
struct Row {
    min_replicas: u32,
    max_slots_per_rank: usize,
    generation_before: u64,
    generation_after_kill: Option<u64>,
    world_after_kill: Option<u32>,
    generation_after_join: Option<u64>,
    world_after_join: Option<u32>,
    /// Kill → ClusterStatus serving with a higher generation and a fresh request completed.
    serving_again_ms: Option<u64>,
    /// Kill → GetStats balancedness ≥ BALANCED.
    balanced_ms: Option<u64>,
    /// Join started → the worker is a rank of the current generation, stepping, a request served.
    join_serving_ms: Option<u64>,
    completed: usize,
    retried: usize,
    failed: usize,
    mismatches: usize,
    /// Growth of the workers' loaded_expert_bytes: until serving resumed after the kill, until
    /// the join started, and from the join until the joined worker served.
    bytes_loaded_before_serving: Option<u64>,
    bytes_loaded_after_kill: u64,
    bytes_loaded_on_join: u64,
    bytes_loaded: u64,
    /// The first failed request's error, for the reader.
    first_failure: Option<String>,
    /// Why the fresh worker did not start or register, if it did not.
    join_error: Option<String>,
}

type Admin = AdminClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>>;

async fn admin_client(addr: &str, token: &str) -> anyhow::Result<Admin> {
    let ch = super::cluster::connect_channel(addr).await.with_context(|| format!("admin API at {addr}"))?;
    let header = format!("Bearer {token}").parse().map_err(|_| anyhow::anyhow!("the admin token must be printable ASCII"))?;
    Ok(AdminClient::with_interceptor(ch, BearerToken(header)).max_decoding_message_size(1 << 30))
}

/// ClusterStatus, or `None` while the coordinator does not answer (within 5 s).
async fn cluster_status(c: &mut Admin) -> Option<pb::ClusterStatusResponse> {
    match tokio::time::timeout(Duration::from_secs(5), c.cluster_status(pb::ClusterStatusRequest {})).await {
        Ok(Ok(r)) => Some(r.into_inner()),
        _ => None,
    }
}

/// A worker's key across generations: its id (ranks are renumbered), else its address.
fn worker_key(w: &pb::WorkerStatus) -> String {
    if w.worker_id.is_empty() { w.grpc_address.clone() } else { w.worker_id.clone() }
}

fn bytes_by_worker(s: &pb::ClusterStatusResponse) -> HashMap<String, u64> {
    s.workers.iter().filter(|w| w.alive).map(|w| (worker_key(w), w.loaded_expert_bytes)).collect()
}

/// Expert bytes the live workers of `now` gained over `before` (a worker new since holds all of
/// its bytes as gained; what a worker dropped does not offset what another loaded).
fn bytes_gained(before: &HashMap<String, u64>, now: &pb::ClusterStatusResponse) -> u64 {
    bytes_by_worker(now).iter().map(|(k, &b)| b.saturating_sub(before.get(k).copied().unwrap_or(0))).sum()
}

/// Client `c`'s greedy prompt: a few token ids, different per client, inside the vocabulary.
fn prompt(c: usize, vocab: usize) -> Vec<u32> {
    let v = vocab.max(2) - 1;
    (0..4 + c % 3).map(|j| (1 + (c * 13 + j * 7) % v) as u32).collect()
}

fn request(ids: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        max_tokens,
        ignore_eos: true, // every request generates max_tokens: comparable runs
        ..Default::default()
    }
}

/// One fresh request, no retries: does the cluster serve right now?
async fn probe(addr: &str, max_tokens: u32) -> bool {
    let req = request(vec![1, 2, 3], max_tokens.clamp(1, 2));
    let r = tokio::time::timeout(Duration::from_secs(10), super::cluster::generate_with_retries(&[addr.to_string()], req, 0, false)).await;
    matches!(r, Ok(Ok(_)))
}

/// What one client request came to: its tokens and retries, or the error.
struct Outcome {
    client: usize,
    result: Result<(Vec<u32>, u32), String>,
}

/// Clients generating back to back until stopped.
struct Clients {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn start(rt: &tokio::runtime::Runtime, addr: &str, prompts: &[Vec<u32>], a: &ElasticArgs) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let timeout = Duration::from_secs_f64(a.window_s.max(1.0));
        let handles = prompts
            .iter()
            .enumerate()
            .map(|(c, p)| {
                let (stop, outcomes, addr, req, retries) = (stop.clone(), outcomes.clone(), addr.to_string(), request(p.clone(), a.max_tokens), a.retries);
                rt.spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let r = tokio::time::timeout(timeout, super::cluster::generate_with_retries(&[addr.clone()], req.clone(), retries, false)).await;
                        let result = match r {
                            Ok(Ok((got, retries))) => Ok((got.ids, retries)),
                            Ok(Err(st)) => Err(format!("{:?}: {}", st.code(), st.message())),
                            Err(_) => Err(format!("no answer within {timeout:?}")),
                        };
                        let failed = result.is_err();
                        if let Ok(mut o) = outcomes.lock() {
                            o.push(Outcome { client: c, result });
                        }
                        if failed {
                            // A cluster that refuses: do not spin.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                })
            })
            .collect();
        Clients { stop, outcomes, handles }
    }

    fn completed(&self) -> usize {
        self.outcomes.lock().map(|o| o.iter().filter(|x| x.result.is_ok()).count()).unwrap_or(0)
    }

    /// Stops the clients, letting running requests finish (at most `grace`); a request still
    /// running then counts as failed.
    fn finish(self, rt: &tokio::runtime::Runtime, grace: Duration) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        let unfinished = rt.block_on(async {
            let deadline = tokio::time::Instant::now() + grace;
            let mut unfinished = 0;
            for mut h in self.handles {
                if tokio::time::timeout_at(deadline, &mut h).await.is_err() {
                    h.abort();
                    unfinished += 1;
                }
            }
            unfinished
        });
        let mut out = std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|e| e.into_inner()));
        out.extend((0..unfinished).map(|_| Outcome { client: usize::MAX, result: Err("still running when the clients stopped".into()) }));
        out
    }
}

/// The default model: the qwen3_moe fixture (16 experts: room for the solver), else mixtral.
fn default_model() -> PathBuf {
    let q = PathBuf::from("tests/fixtures/qwen3_moe");
    if q.join("config.json").exists() { q } else { PathBuf::from("tests/fixtures/mixtral") }
}

pub fn run(a: ElasticArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.workers >= 2, "--workers must be at least 2 (one of them is killed)");
    anyhow::ensure!(a.clients >= 1 && a.max_tokens >= 1, "--clients and --max-tokens must be positive");
    anyhow::ensure!(a.window_s.is_finite() && a.window_s > 0.0, "--window-s must be positive");
    if a.json {
        relay_child_output_to_stderr();
    }
    let model = a.model.clone().unwrap_or_else(default_model);
    let cfg = worker::ModelConfig::from_dir(&model).with_context(|| format!("model {}", model.display()))?;
    let experts = cfg.router.n_experts;
    let prompts: Vec<Vec<u32>> = (0..a.clients).map(|c| prompt(c, cfg.vocab_size)).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut reference: Option<Vec<Vec<u32>>> = None;
    let mut rows = Vec::new();
    for min_replicas in [1u32, 2] {
        eprintln!("bench elastic: {} workers, --min-replicas {min_replicas}", a.workers);
        rows.push(run_row(&a, &rt, &model, experts, min_replicas, &prompts, &mut reference)?);
    }
    let mismatches: usize = rows.iter().map(|r| r.mismatches).sum();
    if a.json {
        let v = serde_json::json!({"model": model.display().to_string(), "workers": a.workers, "clients": a.clients,
            "max_tokens": a.max_tokens, "window_s": a.window_s, "balanced_at": BALANCED, "rows": rows});
        println!("{}", serde_json::to_string(&v)?);
    } else {
        print_table(&rows, &a, &model);
    }
    if mismatches > 0 {
        eprintln!("error: {mismatches} completed requests produced other tokens than an uninterrupted run");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// One configuration: start, warm up, kill, recover, join, tally.
fn run_row(
    a: &ElasticArgs,
    rt: &tokio::runtime::Runtime,
    model: &std::path::Path,
    experts: usize,
    min_replicas: u32,
    prompts: &[Vec<u32>],
    reference: &mut Option<Vec<Vec<u32>>>,
) -> anyhow::Result<Row> {
    // Every rank may hold every expert: the survivors of a death always have room, what they
    // load is the solver's choice.
    let slots = experts;
    let coord_args: Vec<String> =
        vec![format!("--max-slots-per-rank={slots}"), format!("--min-replicas={min_replicas}"), "--stats-half-life=5".into()];
    // Collectives with a dead peer fail within seconds rather than the default 300 s.
    let worker_args = vec![format!("--threads={}", threads_per_local_worker(a.workers)), "--transport-timeout=10".into()];
    let mut cl = start_local_cluster(model, a.workers, None, "127.0.0.1:0", Some(&a.admin_token), &coord_args, &worker_args, None)?;
    let window = Duration::from_secs_f64(a.window_s);
    let mut row = Row { min_replicas, max_slots_per_rank: slots, ..Default::default() };
    // The uninterrupted run every completed request is compared with: each prompt once, alone,
    // on the first cluster before anything happened to it.
    if reference.is_none() {
        let mut want = Vec::with_capacity(prompts.len());
        for p in prompts {
            let req = request(p.clone(), a.max_tokens);
            let (got, _) = rt
                .block_on(super::cluster::generate_with_retries(&[cl.addr.clone()], req, 0, false))
                .map_err(|s| anyhow::anyhow!("reference run: {:?}: {}", s.code(), s.message()))?;
            want.push(got.ids);
        }
        *reference = Some(want);
    }
    let mut adm = rt.block_on(admin_client(&cl.addr, &a.admin_token))?;
    let clients = Clients::start(rt, &cl.addr, prompts, a);
    // Warm up: every client through at least one request.
    let warm = Instant::now();
    while clients.completed() < prompts.len() && warm.elapsed() < window {
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = rt.block_on(cluster_status(&mut adm)).context("ClusterStatus before the kill")?;
    row.generation_before = before.generation;
    let bytes_before = bytes_by_worker(&before);
    // Kill a middle worker: the ranks after it are renumbered in the new generation.
    let victim = 1;
    let killed = Instant::now();
    cl.kill_worker(victim);
    rt.block_on(after_kill(&mut adm, &cl.addr, &mut row, &bytes_before, killed, window));
    let pre_join = rt.block_on(cluster_status(&mut adm));
    row.bytes_loaded_after_kill = pre_join.as_ref().map_or(0, |s| bytes_gained(&bytes_before, s));
    // A worker that cannot join (refused, crashed) is a result of this row, not the end of the
    // benchmark.
    if let Err(e) = join(rt, &mut adm, &mut cl, &mut row, pre_join, window) {
        row.join_error = Some(format!("{e:#}"));
    }
    // A little more load on the grown group before the tally.
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = clients.finish(rt, window);
    tally(&mut row, &outcomes, reference.as_deref().unwrap_or_default());
    row.bytes_loaded = row.bytes_loaded_after_kill + row.bytes_loaded_on_join;
    drop(cl);
    Ok(row)
}

/// After the kill: serving again (a higher generation that serves a fresh request), then
/// balanced again.
async fn after_kill(adm: &mut Admin, addr: &str, row: &mut Row, bytes_before: &HashMap<String, u64>, killed: Instant, window: Duration) {
    let deadline = killed + window;
    while Instant::now() < deadline {
        if let Some(s) = cluster_status(adm).await
            && s.serving
            && s.generation > row.generation_before
        {
            // Bytes as the group started serving, before the probe lets the solver go on.
            let gained = bytes_gained(bytes_before, &s);
            if probe(addr, 2).await {
                row.serving_again_ms = Some(killed.elapsed().as_millis() as u64);
                row.generation_after_kill = Some(s.generation);
                row.world_after_kill = Some(s.world_size);
                row.bytes_loaded_before_serving = Some(gained);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if row.serving_again_ms.is_none() {
        return;
    }
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(5), adm.get_stats(pb::GetStatsRequest {})).await
            && st.into_inner().balancedness >= BALANCED
        {
            row.balanced_ms = Some(killed.elapsed().as_millis() as u64);
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A fresh worker joins: until ClusterStatus lists it as a rank of the current generation that
/// steps, and a request was served since.
fn join(
    rt: &tokio::runtime::Runtime,
    adm: &mut Admin,
    cl: &mut LocalCluster,
    row: &mut Row,
    pre_join: Option<pb::ClusterStatusResponse>,
    window: Duration,
) -> anyhow::Result<()> {
    let bytes_pre = pre_join.as_ref().map(bytes_by_worker).unwrap_or_default();
    let gen_pre = pre_join.as_ref().map_or(row.generation_before, |s| s.generation);
    let started = Instant::now();
    let i = cl.add_worker(&[])?;
    let (id, addr) = (cl.worker_ids[i].clone(), cl.worker_addrs[i].clone());
    rt.block_on(async {
        let deadline = started + window;
        // Its steps when first seen as a rank, and whether a request was served since.
        let mut first_steps: Option<u64> = None;
        let mut served = false;
        while Instant::now() < deadline {
            if let Some(s) = cluster_status(adm).await {
                let me = s.workers.iter().find(|w| (!id.is_empty() && w.worker_id == id) || w.grpc_address == addr);
                let rank = me.filter(|w| w.alive && w.generation == s.generation && w.rank < s.world_size);
                if let (true, true, Some(w)) = (s.serving, s.generation > gen_pre, rank) {
                    match first_steps {
                        None => first_steps = Some(w.steps),
                        Some(f) if served && w.steps > f => {
                            row.join_serving_ms = Some(started.elapsed().as_millis() as u64);
                            row.generation_after_join = Some(s.generation);
                            row.world_after_join = Some(s.world_size);
                            row.bytes_loaded_on_join = bytes_gained(&bytes_pre, &s);
                            return;
                        }
                        Some(_) => {}
                    }
                    if !served {
                        served = probe(&cl.addr, 2).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    Ok(())
}

/// Counts the outcomes and compares every completed request's tokens with the reference.
fn tally(row: &mut Row, outcomes: &[Outcome], reference: &[Vec<u32>]) {
    for o in outcomes {
        match &o.result {
            Ok((ids, retries)) => {
                row.completed += 1;
                row.retried += (*retries > 0) as usize;
                if reference.get(o.client) != Some(ids) {
                    row.mismatches += 1;
                }
            }
            Err(e) => {
                row.failed += 1;
                row.first_failure.get_or_insert_with(|| e.clone());
            }
        }
    }
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |x| x.to_string())
}

fn bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print_table(rows: &[Row], a: &ElasticArgs, model: &std::path::Path) {
    println!(
        "{:<14} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6} {:>10} {:>14} {:>12} {:>12}",
        "configuration", "slots", "gen", "serving", "balanced", "join", "completed", "retried", "failed", "mismatches", "loaded→serving", "loaded kill", "loaded join"
    );
    for r in rows {
        let generations = format!("{}→{}→{}", r.generation_before, ms(r.generation_after_kill), ms(r.generation_after_join));
        println!(
            "{:<14} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6} {:>10} {:>14} {:>12} {:>12}",
            format!("min-replicas {}", r.min_replicas),
            r.max_slots_per_rank,
            generations,
            ms(r.serving_again_ms),
            ms(r.balanced_ms),
            ms(r.join_serving_ms),
            r.completed,
            r.retried,
            r.failed,
            r.mismatches,
            r.bytes_loaded_before_serving.map_or_else(|| "-".into(), bytes),
            bytes(r.bytes_loaded_after_kill),
            bytes(r.bytes_loaded_on_join),
        );
    }
    println!(
        "{} on {} workers, {} clients x {} tokens; kill -9 of one worker, then one joins; serving = ms from the kill until a higher generation serves a fresh request; balanced = ms from the kill until balancedness >= {BALANCED}; join = ms from starting the worker until it steps as a rank and a request was served; - = not within {} s",
        model.display(),
        a.workers,
        a.clients,
        a.max_tokens,
        a.window_s
    );
    for r in rows {
        if let Some(f) = &r.first_failure {
            println!("min-replicas {}: first failed request: {f}", r.min_replicas);
        }
        if let Some(e) = &r.join_error {
            println!("min-replicas {}: join: {e}", r.min_replicas);
        }
    }
}
