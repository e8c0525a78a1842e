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
use std::pin::Pin;
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_proto::v1 as pb;
use super::admin::AdminAuth;
use super::tls::{ServerTls, endpoint};
use super::ha::{Role, Seat, with_store_retries};
use super::metrics::CoordMetrics;
use coordinator::store::typed::{self, ClusterRecord, EpochState, Member, PlacementEpoch};
use coordinator::store::{AnyStore, EventKind, StateStore};
use switchyard_proto::v1::admin_server::AdminServer;
use switchyard_proto::v1::control_server::{Control, ControlServer};
use switchyard_proto::v1::inference_client::InferenceClient;
use switchyard_proto::v1::inference_server::{Inference, InferenceServer};
use switchyard_proto::v1::worker_client::WorkerClient;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use worker::ModelConfig;
use worker::expert_parallel::RecentSteps;
use worker::model::Model;
use worker::sampling::SamplingParams;
use worker::tokenizer::Tokenizer;

pub(super) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

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
        let n_l = cfg.moe_layers().len();
        let n_e = cfg.router.n_experts;
        let slots = self.slots_per_rank.unwrap_or(n_e.div_ceil(workers));
        let topo = placement::Topology::uniform(workers, 1)?;
        let (p, origin) = if let Some(f) = &self.placement {
            (placement::Placement::read(f)?, format!("placement {}", f.display()))
        } else if let Some(trace) = &self.routing_trace {
            let routing = super::routing::Routing::read(trace, Some(n_e))?;
            let stats = routing.stats(workers)?;
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
            anyhow::ensure!(self.solve_time_limit > 0.0 && self.solve_time_limit.is_finite(), "--solve-time-limit must be positive");
            opts.time_limit = std::time::Duration::from_secs_f64(self.solve_time_limit);
            let (p, report) = placement::solver::solve(self.solver, &stats, &opts, &|_| {})
                .with_context(|| format!("solving a placement from {}", trace.display()))?;
            tracing::info!(objective = ?report.objective, "placement solved from {}", trace.display());
            (p, format!("the placement solved from {}", trace.display()))
        } else {
            (placement::solver::contiguous::solve(n_l, n_e, &topo, slots)?, "the contiguous placement".into())
        };
        check_placement(&p, cfg, workers, &origin)?;
        Ok(p)
    }
}

/// The placement for `workers` ranks from a file (validated against the model), or contiguous.
pub fn load_placement(cfg: &ModelConfig, workers: usize, file: Option<&Path>) -> anyhow::Result<placement::Placement> {
    PlacementArgs { placement: file.map(Path::to_path_buf), ..Default::default() }.resolve(cfg, workers)
}

pub(super) fn placement_ranks(p: &placement::Placement) -> Vec<Vec<Vec<usize>>> {
    p.layers.iter().map(|l| l.ranks.clone()).collect()
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

/// What the coordinator hands every worker to build its all-to-all: the kind, and for NCCL a unique
/// id made once here (so every rank joins the same communicator).
fn transport_setup(kind: &str) -> anyhow::Result<(String, Vec<u8>)> {
    match kind {
        "tcp" => Ok(("tcp".into(), Vec::new())),
        #[cfg(feature = "cuda")]
        "nccl" => Ok(("nccl".into(), worker::transport::nccl::new_unique_id()?)),
        #[cfg(not(feature = "cuda"))]
        "nccl" => bail!("--transport nccl needs a build with the `cuda` feature (cargo build --features cuda)"),
        other => bail!("unknown transport {other:?} (tcp or nccl)"),
    }
}

pub(super) async fn health_and_reflection() -> anyhow::Result<(
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_health::server::HealthReporter,
)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok((health, reflection, reporter))
}


// ---------------------------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------------------------

#[derive(clap::Args, Clone)]
pub struct CoordinatorArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Workers to wait for.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Placement JSON (switchyard.placement.v1); default: contiguous.
    #[arg(long)]
    pub placement: Option<PathBuf>,
    /// Client API listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// All-to-all between workers: `tcp`, or `nccl` (GPUs; needs the `cuda` feature).
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// Bearer token of the admin API (placement changes, status); without one the admin API
    /// refuses every call.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// State store: `embedded:///PREFIX` (in this process: one coordinator) or
    /// `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` (several coordinators elect a leader; a standby
    /// takes over the running workers when the leader dies).
    #[arg(long, env = "SWITCHYARD_STORE", default_value = "embedded:///switchyard")]
    pub store: String,
    /// Seconds of the coordinator's lease (a dead leader is replaced after about this long).
    #[arg(long, env = "SWITCHYARD_LEASE_TTL", default_value_t = 3)]
    pub lease_ttl: u64,
    /// Address clients and standbys reach this coordinator at (default: the bound listen address).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Seconds after which a live expert-load observation weighs half (statistics window).
    #[arg(long, default_value_t = 30.0)]
    pub stats_half_life: f64,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Exit when stdin closes (used by `switchyard up`).
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
}

/// The scheduler's settings: online rebalancing of the placement from the live load, replica
/// choice, the capacity option and each step's token budget.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SchedulerArgs {
    /// Rebalance the placement online from the live expert load (placement epochs; serving goes on).
    #[arg(long)]
    pub rebalance: bool,
    /// Re-solve when the windowed balancedness (Σmean/Σmax rank load) falls below this.
    #[arg(long, default_value_t = 0.9)]
    pub rebalance_threshold: f64,
    /// Commit only when the predicted balancedness gain is at least this.
    #[arg(long, default_value_t = 0.02)]
    pub rebalance_margin: f64,
    /// Stop spending moves once the predicted balancedness reaches this.
    #[arg(long, default_value_t = 0.95)]
    pub rebalance_target: f64,
    /// Seconds between two placement epochs at least.
    #[arg(long, default_value_t = 5.0)]
    pub rebalance_min_interval: f64,
    /// Also re-check every this many seconds even above the threshold.
    #[arg(long)]
    pub rebalance_period: Option<f64>,
    /// While the recent window's routing (a quarter of the half-life) is at least this far (total
    /// variation, 0-1) from the statistics window's, a shift is under way: decide on the trend the
    /// two windows show, with epochs at a quarter of the minimum interval.
    #[arg(long, default_value_t = placement::rebalance::RebalanceConfig::default().shift_distance)]
    pub rebalance_shift_distance: f64,
    /// Most expert slots moved per epoch (default 16 per MoE layer).
    #[arg(long)]
    pub rebalance_max_moves: Option<usize>,
    /// Migration bandwidth budget, bytes per second of expert weights loaded.
    #[arg(long)]
    pub rebalance_max_bytes_per_s: Option<f64>,
    /// Split the tokens of replicated experts over their replicas by load in every step (one
    /// extra small all-to-all per MoE layer with replicas); default: every sender evens out its own
    /// sends over the replicas (own rank, then own node, preferred when close), without an exchange.
    #[arg(long)]
    pub load_aware_replicas: bool,
    /// Capacity option (off by default): no rank gets more than this factor x the mean routed
    /// assignments per layer and step; overflow goes to another replica with room or is dropped
    /// (changes outputs; see the README).
    #[arg(long)]
    pub capacity_factor: Option<f64>,
    /// New tokens per engine step and worker at most (default 8192): decodes first, prompts fill
    /// the rest in chunks (chunked prefill), which bounds how long one step can take.
    #[arg(long)]
    pub max_batch_tokens: Option<u32>,
}

impl SchedulerArgs {
    /// The policy for a model with `layers` MoE layers and experts of `expert_bytes` bytes.
    pub fn policy(&self, layers: usize, expert_bytes: u64) -> anyhow::Result<Option<placement::rebalance::Rebalancer>> {
        if !self.rebalance {
            return Ok(None);
        }
        let mut cfg = placement::rebalance::RebalanceConfig::for_layers(layers);
        cfg.threshold = self.rebalance_threshold;
        cfg.margin = self.rebalance_margin;
        cfg.target = self.rebalance_target;
        cfg.min_interval_s = self.rebalance_min_interval;
        cfg.period_s = self.rebalance_period;
        cfg.shift_distance = self.rebalance_shift_distance;
        if let Some(m) = self.rebalance_max_moves {
            cfg.max_moves = m;
        }
        cfg.max_bytes_per_s = self.rebalance_max_bytes_per_s;
        cfg.expert_bytes = expert_bytes;
        Ok(Some(placement::rebalance::Rebalancer::new(cfg)?))
    }

    /// The same settings as command-line arguments (for the coordinator `switchyard up` starts).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.load_aware_replicas {
            a.push("--load-aware-replicas".to_string());
        }
        if let Some(c) = self.capacity_factor {
            a.push(format!("--capacity-factor={c}"));
        }
        if let Some(t) = self.max_batch_tokens {
            a.push(format!("--max-batch-tokens={t}"));
        }
        if !self.rebalance {
            return a;
        }
        a.extend([
            "--rebalance".to_string(),
            format!("--rebalance-threshold={}", self.rebalance_threshold),
            format!("--rebalance-margin={}", self.rebalance_margin),
            format!("--rebalance-target={}", self.rebalance_target),
            format!("--rebalance-min-interval={}", self.rebalance_min_interval),
            format!("--rebalance-shift-distance={}", self.rebalance_shift_distance),
        ]);
        if let Some(p) = self.rebalance_period {
            a.push(format!("--rebalance-period={p}"));
        }
        if let Some(m) = self.rebalance_max_moves {
            a.push(format!("--rebalance-max-moves={m}"));
        }
        if let Some(b) = self.rebalance_max_bytes_per_s {
            a.push(format!("--rebalance-max-bytes-per-s={b}"));
        }
        a
    }
}

/// Where the coordinator is in watching a placement change's step lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MigrationWatch {
    Idle,
    Running,
    /// Done; the next membership poll still counts (its steps ran partly during the change).
    Ending,
}

struct WorkerEntry {
    grpc: String,
    transport: String,
    node: String,
    client: Option<WorkerClient<Channel>>,
    outstanding: Arc<AtomicU64>,
    alive: Arc<AtomicBool>,
}

struct CoordState {
    model_dir: PathBuf,
    cfg: ModelConfig,
    tok: Option<Arc<Tokenizer>>,
    /// The active placement epoch and its switchyard.placement.v1 JSON.
    placement: Mutex<(u64, String)>,
    /// Placement changes run one at a time.
    apply_lock: tokio::sync::Mutex<()>,
    /// Client API address this coordinator listens on.
    listen: Mutex<String>,
    /// Leader or standby (only the leader serves requests and drives workers).
    role: tokio::sync::watch::Sender<Role>,
    /// This coordinator's lease and store.
    seat: std::sync::OnceLock<Arc<Seat>>,
    metrics: CoordMetrics,
    /// Windowed live expert load reported by the workers (statistics, scheduler, metrics).
    window: Mutex<placement::live::LoadWindow>,
    /// Signalled after every load report reaches `window` (wakes the rebalance loop).
    load_observed: tokio::sync::Notify,
    load_aware_replicas: bool,
    capacity_factor: Option<f64>,
    max_batch_tokens: Option<u32>,
    /// The rebalance policy, taken by the scheduler task when this coordinator starts leading.
    policy: Mutex<Option<placement::rebalance::Rebalancer>>,
    /// The longest step (µs) seen during the running or last placement change.
    migration_steps: Mutex<(MigrationWatch, u64)>,
    /// Rank 0's busy step durations (µs) not yet handed out by `GetStats`.
    recent_steps: RecentSteps<65536>,
    /// Rank 0's projected step lengths (dedicated cores), µs, not yet read by GetStats.
    recent_projected_steps: RecentSteps<65536>,
    /// Transport kind and NCCL unique id handed to every worker.
    transport: (String, Vec<u8>),
    n_workers: usize,
    workers: Mutex<Vec<WorkerEntry>>,
    ready: tokio::sync::watch::Sender<bool>,
    start_error: Mutex<Option<String>>,
}

#[derive(Clone)]
pub(super) struct CoordSvc(Arc<CoordState>);

/// Checks a placement against the model and the number of workers (`origin` names it in errors).
pub(super) fn check_placement(p: &placement::Placement, cfg: &ModelConfig, workers: usize, origin: &str) -> anyhow::Result<()> {
    let (n_l, n_e) = (cfg.moe_layers().len(), cfg.router.n_experts);
    if p.num_layers != n_l || p.num_experts != n_e {
        bail!("{origin} has {} MoE layers x {} experts, the model has {n_l} x {n_e}", p.num_layers, p.num_experts);
    }
    if p.num_ranks() != workers {
        bail!("{origin} is for {} ranks, the cluster has {workers} workers", p.num_ranks());
    }
    Ok(())
}

impl CoordSvc {
    /// UNAVAILABLE (retryable: clients try the next coordinator) unless this one leads.
    pub(super) fn require_leader(&self) -> Result<(), Status> {
        match &*self.0.role.borrow() {
            Role::Leader => Ok(()),
            Role::Standby(Some(l)) => Err(Status::unavailable(format!("standby coordinator; the leader is at {l}"))),
            Role::Standby(None) => Err(Status::unavailable("standby coordinator; no leader elected yet")),
        }
    }

    /// Store writes of the leader go on in the background: serving never waits on the store.
    /// The write is retried while the store is unavailable.
    fn record<F, Fut>(&self, what: &'static str, write: F)
    where
        F: Fn(AnyStore) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<coordinator::store::Revision, coordinator::store::StoreError>> + Send,
    {
        let Some(seat) = self.0.seat.get().cloned() else { return };
        tokio::spawn(async move {
            if let Err(e) = with_store_retries(what, || write(seat.store.clone())).await {
                tracing::error!("recording {what} in the state store failed: {e}");
            }
        });
    }

    /// Records a placement epoch (and, committed, makes it current) in the store.
    pub(super) fn record_epoch(&self, epoch: u64, json: &str, state: EpochState) {
        let placement = serde_json::from_str(json).unwrap_or(serde_json::Value::Null);
        let rec = PlacementEpoch { epoch, state, placement, switch_step: None, acks: vec![] };
        self.record("placement epoch", move |store| {
            let rec = rec.clone();
            async move { typed::record_epoch(&store, &rec).await }
        });
    }

    /// This coordinator won the election: adopt the workers a previous leader recorded, or wait
    /// for registrations.
    async fn lead(self, seat: Arc<Seat>) {
        if let Some(policy) = self.0.policy.lock().ok().and_then(|mut p| p.take()) {
            tokio::spawn(self.clone().rebalance_loop(policy));
        }
        match seat.recorded_cluster().await {
            Ok(Some(rec)) if rec.world as usize == self.0.n_workers && rec.members.len() == self.0.n_workers => {
                if self.adopt(&seat, rec).await {
                    self.0.role.send_replace(Role::Leader);
                    tokio::spawn(self.clone().watch_membership(seat));
                    return;
                }
            }
            Ok(Some(rec)) => tracing::warn!("ignoring the recorded cluster of {} workers (this one expects {})", rec.world, self.0.n_workers),
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot read the recorded cluster: {e}; waiting for workers to register"),
        }
        self.0.role.send_replace(Role::Leader);
        println!("leading; waiting for {} workers", self.0.n_workers);
        tokio::spawn(self.clone().watch_membership(seat));
    }

    /// Takes over running workers. False when none of them answers (a stale record).
    async fn adopt(&self, seat: &Seat, rec: ClusterRecord) -> bool {
        let mut entries = Vec::with_capacity(rec.members.len());
        let mut alive_n = 0;
        for (rank, m) in rec.members.iter().enumerate() {
            let client = endpoint(&m.addr).ok().map(|e| {
                WorkerClient::new(e.connect_timeout(Duration::from_secs(2)).connect_lazy()).max_decoding_message_size(1 << 30)
            });
            let mut alive = false;
            if let Some(mut c) = client.clone()
                && let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(3), c.health(pb::WorkerHealthRequest::default())).await
            {
                alive = h.into_inner().rank as usize == rank;
            }
            alive_n += alive as usize;
            entries.push(WorkerEntry {
                grpc: m.addr.clone(),
                transport: m.transport_addr.clone(),
                node: m.node.clone(),
                client,
                outstanding: Arc::new(AtomicU64::new(0)),
                alive: Arc::new(AtomicBool::new(alive)),
            });
        }
        if alive_n == 0 {
            tracing::warn!("no worker of the recorded cluster answers; starting a new cluster");
            return false;
        }
        if let Ok((Some(e), _)) = typed::current_epoch(&seat.store).await
            && let Ok(Some(rec)) = typed::get_epoch(&seat.store, e).await
            && let Ok(json) = serde_json::to_string(&rec.value.placement)
            && placement::Placement::from_json(&json).is_ok()
        {
            self.set_placement(e, json);
        }
        let n = entries.len();
        if let Ok(mut ws) = self.0.workers.lock() {
            *ws = entries;
        }
        self.0.ready.send_replace(true);
        println!("leading; adopted {alive_n} of {n} running workers at placement epoch {}", self.placement().0);
        true
    }

    /// Adds the workers' cumulative expert counts to the live window and updates the gauges.
    fn observe_load(&self, reports: &[(usize, Vec<u64>)], dt_s: f64) {
        let (epoch, json) = self.placement();
        let Ok(p) = placement::Placement::from_json(&json) else { return };
        let Ok(mut w) = self.0.window.lock() else { return };
        w.decay(dt_s);
        for (rank, counts) in reports {
            w.observe_cumulative(*rank, counts);
        }
        let (per_layer, total) = w.balancedness(&p);
        let m = &self.0.metrics;
        m.set_balance(&per_layer, total, &w.rank_load(&p));
        m.epoch.set(epoch as f64);
        m.workers_alive.set(self.worker_entries().iter().filter(|e| e.2).count() as f64);
    }

    /// The live statistics (admin `GetStats`).
    pub(super) fn stats_snapshot(&self) -> pb::GetStatsResponse {
        let (epoch, placement_json) = self.placement();
        let (nl, ne) = (self.0.cfg.moe_layers().len(), self.0.cfg.router.n_experts);
        let m = &self.0.metrics;
        let mut r = pb::GetStatsResponse {
            epoch,
            num_layers: nl as u32,
            num_experts: ne as u32,
            migrations: m.migrations.get(),
            migrated_experts: m.migrated_experts.get(),
            abandoned_epochs: m.abandoned_epochs.get(),
            longest_step_during_migration_us: self.0.migration_steps.lock().map(|m| m.1).unwrap_or(0),
            step_us: self.0.recent_steps.take(),
            projected_step_us: self.0.recent_projected_steps.take(),
            ..Default::default()
        };
        if let Ok(w) = self.0.window.lock() {
            r.window_load = w.load().iter().flatten().copied().collect();
            r.cumulative_counts = w.cumulative();
            r.workload_shift = w.shift_distance();
            if let Ok(p) = placement::Placement::from_json(&placement_json) {
                (r.layer_balancedness, r.balancedness) = w.balancedness(&p);
                r.rank_load = w.rank_load(&p);
            }
        }
        r.placement_json = placement_json;
        r
    }

    pub(super) fn note_abandoned_epoch(&self) {
        self.0.metrics.abandoned_epochs.inc();
    }

    /// Marks a placement change running or done. The steps the workers report at the first poll
    /// after it ends still count: they ran (partly) during it.
    pub(super) fn migration_running(&self, running: bool) {
        if let Ok(mut m) = self.0.migration_steps.lock() {
            m.0 = if running { MigrationWatch::Running } else { MigrationWatch::Ending };
            if running {
                m.1 = 0;
            }
        }
    }

    /// Step durations a worker reported: the longest counts while a placement change runs.
    fn note_steps_during_migration(&self, steps_us: &[u32]) {
        if let Ok(mut m) = self.0.migration_steps.lock()
            && m.0 != MigrationWatch::Idle
        {
            m.1 = m.1.max(steps_us.iter().copied().max().unwrap_or(0) as u64);
        }
    }

    /// Called after every membership poll: an ending migration has had its last poll.
    fn migration_poll_done(&self) {
        if let Ok(mut m) = self.0.migration_steps.lock()
            && m.0 == MigrationWatch::Ending
        {
            m.0 = MigrationWatch::Idle;
        }
    }

    /// The scheduler (leader only): after every load report, asks the rebalance policy whether the windowed
    /// load makes a new placement worth its migration, and applies it as a placement epoch.
    async fn rebalance_loop(self, mut policy: placement::rebalance::Rebalancer) {
        let t0 = std::time::Instant::now();
        loop {
            // Decide on every fresh load report (the membership loop observes one per 500 ms).
            self.0.load_observed.notified().await;
            if !self.is_ready() || self.require_leader().is_err() {
                continue;
            }
            let (_, json) = self.placement();
            let Ok(current) = placement::Placement::from_json(&json) else { continue };
            let window = match self.0.window.lock() {
                Ok(w) if !w.is_empty() => w.clone(),
                _ => continue,
            };
            // The solve is CPU work (about a millisecond per move): keep it off the async workers.
            let now = t0.elapsed().as_secs_f64();
            let proposal = match tokio::task::block_in_place(|| policy.poll_window(now, &current, &window)) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("rebalance policy: {e}");
                    continue;
                }
            };
            let Ok(next) = serde_json::to_string(&proposal.placement) else { continue };
            tracing::info!(before = proposal.before, after = proposal.after, moves = proposal.moves, during_shift = proposal.during_shift, "rebalancing");
            match self.apply_epoch(next).await {
                Ok(r) => {
                    let loaded: u64 = r.loaded_per_rank.iter().map(|&x| x as u64).sum();
                    self.0.metrics.migrations.inc();
                    self.0.metrics.migrated_experts.inc_by(loaded);
                    println!(
                        "rebalanced: epoch {} balancedness {:.3} -> {:.3} (predicted{}), {} experts loaded, {} ms",
                        r.epoch,
                        proposal.before,
                        proposal.after,
                        if proposal.during_shift { ", on the trend: shifting" } else { "" },
                        loaded,
                        r.switch_ms
                    );
                }
                Err(st) => tracing::warn!("rebalance not applied: {}", st.message()),
            }
        }
    }

    fn lose_worker(&self, rank: usize, why: &str) {
        let ws = self.0.workers.lock();
        if let Ok(ws) = ws
            && let Some(w) = ws.get(rank)
            && w.alive.swap(false, Ordering::SeqCst)
        {
            self.0.metrics.membership_changes.inc();
            tracing::warn!(rank, "worker lost: {why}");
            eprintln!("worker rank {rank} lost: {why}");
        }
    }

    /// Leader only: a worker whose lease expired (its `members/` key vanished) or whose health
    /// checks fail three times in a row is taken out of request routing.
    async fn watch_membership(self, seat: Arc<Seat>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut watch = match seat.store.watch(typed::MEMBERS, None).await {
                Ok(w) => w,
                Err(e) => return tracing::warn!("cannot watch members: {e}"),
            };
            while let Some(Ok(ev)) = watch.next().await {
                if ev.kind == EventKind::Delete
                    && let Some(rank) = ev.kv.key.strip_prefix(typed::MEMBERS).and_then(|k| k.strip_prefix("rank-")).and_then(|r| r.parse().ok())
                {
                    me.lose_worker(rank, "its lease expired");
                }
            }
        });
        let mut failures: HashMap<usize, u32> = HashMap::new();
        let mut last = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if !self.is_ready() {
                continue;
            }
            let mut reports = Vec::new();
            for (rank, (_, _, alive, client)) in self.worker_entries().into_iter().enumerate() {
                let (true, Some(mut c)) = (alive, client) else { continue };
                let h = match tokio::time::timeout(Duration::from_secs(1), c.health(pb::WorkerHealthRequest { take_steps: true })).await {
                    Ok(Ok(h)) => Some(h.into_inner()),
                    _ => None,
                };
                let f = failures.entry(rank).or_default();
                *f = if h.is_some() { 0 } else { *f + 1 };
                if *f >= 3 {
                    self.lose_worker(rank, "3 health checks failed");
                }
                if let Some(h) = h {
                    self.note_steps_during_migration(&h.recent_step_us);
                    if rank == 0 {
                        self.0.recent_steps.extend(h.recent_step_us.iter().copied());
                        self.0.recent_projected_steps.extend(h.recent_projected_step_us.iter().copied());
                    }
                    reports.push((rank, h.expert_load));
                }
            }
            self.observe_load(&reports, last.elapsed().as_secs_f64());
            self.0.load_observed.notify_one();
            self.migration_poll_done();
            last = std::time::Instant::now();
        }
    }

    /// The live rank with the least outstanding tokens.
    fn pick_rank(&self) -> Option<(usize, WorkerClient<Channel>, Arc<AtomicU64>, Arc<AtomicBool>)> {
        let ws = self.0.workers.lock().ok()?;
        let (i, w) = ws
            .iter()
            .enumerate()
            .filter(|(_, w)| w.alive.load(Ordering::SeqCst) && w.client.is_some())
            .min_by_key(|(i, w)| (w.outstanding.load(Ordering::SeqCst), *i))?;
        Some((i, w.client.clone()?, w.outstanding.clone(), w.alive.clone()))
    }

    /// Streams one accepted request from its home rank to `tx`. When the rank fails (it died, or
    /// its expert-parallel group broke), the request continues on a live rank from where it
    /// stopped (prompt + tokens streamed so far), so the client sees one sequence; only when no
    /// rank can take it does the client get a retryable `UNAVAILABLE`.
    async fn run_request(self, base: pb::GenerateRequest, tx: tokio::sync::mpsc::Sender<Result<pb::GenerateResponse, Status>>) {
        const ATTEMPTS: usize = 4;
        let m = &self.0.metrics;
        m.in_flight.add(1.0);
        let prompt = match &base.prompt {
            Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.clone(),
            _ => vec![],
        };
        let mut generated: Vec<u32> = Vec::new();
        let mut outcome = "failed";
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
            }
            let Some((rank, mut client, outstanding, alive)) = self.pick_rank() else {
                let _ = tx.send(Err(Status::unavailable("no live worker (retry)"))).await;
                break;
            };
            let req = if generated.is_empty() { base.clone() } else { continuation(&base, prompt.clone(), &generated) };
            let mut left = req.max_tokens as u64;
            outstanding.fetch_add(left, Ordering::SeqCst);
            let tokens = m.tokens(rank);
            let streamed: Result<(), Status> = async {
                let mut stream = client.generate(req).await?.into_inner();
                loop {
                    let Some(mut msg) = stream.message().await? else {
                        return Err(Status::unavailable("the worker's stream ended before the request finished"));
                    };
                    if msg.prompt_logits.is_empty() {
                        generated.push(msg.token_id);
                        msg.index = generated.len() as u32 - 1;
                        left = left.saturating_sub(1);
                        outstanding.fetch_sub(1, Ordering::SeqCst);
                        if let Some(t) = &tokens {
                            t.inc();
                        }
                        if let Some(t) = &self.0.tok {
                            msg.text = t.decode(&[msg.token_id]).unwrap_or_default();
                        }
                    }
                    let fin = msg.finish_reason != 0;
                    // A client that went away ends the request (the worker aborts it).
                    if tx.send(Ok(msg)).await.is_err() || fin {
                        return Ok(());
                    }
                }
            }
            .await;
            outstanding.fetch_sub(left.min(outstanding.load(Ordering::SeqCst)), Ordering::SeqCst);
            match streamed {
                Ok(()) => {
                    outcome = "completed";
                    break;
                }
                Err(st) => {
                    let st = worker_failure(rank, &alive, st);
                    let retry = st.code() == tonic::Code::Unavailable && !base.return_prompt_logits && attempt + 1 < ATTEMPTS;
                    if retry {
                        tracing::warn!(rank, attempt, generated = generated.len(), "request moves to another rank: {}", st.message());
                        continue;
                    }
                    outcome = if st.code() == tonic::Code::InvalidArgument { "invalid" } else { "failed" };
                    let _ = tx.send(Err(st)).await;
                    break;
                }
            }
        }
        m.in_flight.add(-1.0);
        m.request(outcome);
    }

    /// The active placement epoch and JSON.
    pub(super) fn placement(&self) -> (u64, String) {
        self.0.placement.lock().map(|p| p.clone()).unwrap_or_default()
    }

    pub(super) fn set_placement(&self, epoch: u64, json: String) {
        if let Ok(mut p) = self.0.placement.lock() {
            *p = (epoch, json);
        }
    }

    pub(super) fn apply_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.0.apply_lock
    }

    pub(super) fn model_config(&self) -> &ModelConfig {
        &self.0.cfg
    }

    pub(super) fn world_size(&self) -> usize {
        self.0.n_workers
    }

    pub(super) fn listen_addr(&self) -> String {
        self.0.listen.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub(super) fn is_ready(&self) -> bool {
        *self.0.ready.borrow()
    }

    /// Per rank: gRPC address, node, alive, client.
    pub(super) fn worker_entries(&self) -> Vec<(String, String, bool, Option<WorkerClient<Channel>>)> {
        self.0
            .workers
            .lock()
            .map(|ws| ws.iter().map(|w| (w.grpc.clone(), w.node.clone(), w.alive.load(Ordering::SeqCst), w.client.clone())).collect())
            .unwrap_or_default()
    }

    /// A client of every rank, or UNAVAILABLE when one is gone (placement changes need all).
    pub(super) fn live_clients(&self) -> Result<Vec<WorkerClient<Channel>>, Status> {
        self.worker_entries()
            .into_iter()
            .enumerate()
            .map(|(r, (_, _, alive, c))| match (alive, c) {
                (true, Some(c)) => Ok(c),
                _ => Err(Status::unavailable(format!("worker rank {r} is gone; placement changes need every worker"))),
            })
            .collect()
    }

    async fn start_all(self) {
        let (epoch, placement_json) = self.placement();
        let (assign, clients): (Vec<pb::Assignment>, Vec<(String, usize)>) = {
            let Ok(ws) = self.0.workers.lock() else { return };
            let peers: Vec<String> = ws.iter().map(|w| w.transport.clone()).collect();
            let mut names: Vec<String> = Vec::new();
            let nodes: Vec<u32> = ws
                .iter()
                .map(|w| {
                    if let Some(i) = names.iter().position(|n| *n == w.node) {
                        i as u32
                    } else {
                        names.push(w.node.clone());
                        (names.len() - 1) as u32
                    }
                })
                .collect();
            let a = (0..ws.len())
                .map(|r| pb::Assignment {
                    rank: r as u32,
                    world_size: ws.len() as u32,
                    peer_addresses: peers.clone(),
                    peer_nodes: nodes.clone(),
                    placement_json: placement_json.clone(),
                    model_path: self.0.model_dir.display().to_string(),
                    epoch,
                    transport: self.0.transport.0.clone(),
                    nccl_unique_id: self.0.transport.1.clone(),
                    load_aware_replicas: self.0.load_aware_replicas,
                    capacity_factor: self.0.capacity_factor.unwrap_or(0.0),
                    max_batch_tokens: self.0.max_batch_tokens.unwrap_or(0),
                })
                .collect();
            (a, ws.iter().enumerate().map(|(i, w)| (w.grpc.clone(), i)).collect())
        };
        let mut set = tokio::task::JoinSet::new();
        for ((addr, rank), a) in clients.into_iter().zip(assign) {
            set.spawn(async move {
                let ch = connect_channel(&addr).await.map_err(|e| format!("rank {rank} at {addr}: {}", error_chain(&e)))?;
                let mut c = WorkerClient::new(ch).max_decoding_message_size(1 << 30);
                c.regroup(pb::RegroupRequest { generation: 1, assignment: Some(a) })
                    .await
                    .map_err(|s| format!("rank {rank}: regroup: {}", s.message()))?;
                Ok::<_, String>((rank, c))
            });
        }
        let mut errors = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok((rank, c))) => {
                    if let Ok(mut ws) = self.0.workers.lock() {
                        ws[rank].client = Some(c);
                    }
                }
                Ok(Err(e)) => errors.push(e),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            println!("cluster ready: {} workers", self.0.n_workers);
            let members: Vec<Member> = self
                .0
                .workers
                .lock()
                .map(|ws| {
                    ws.iter()
                        .enumerate()
                        .map(|(r, w)| Member {
                            id: format!("rank-{r}"),
                            rank: r as u32,
                            node: w.node.clone(),
                            addr: w.grpc.clone(),
                            transport_addr: w.transport.clone(),
                            gpus: 0,
                        })
                        .collect()
                })
                .unwrap_or_default();
            let rec = ClusterRecord {
                world: self.0.n_workers as u32,
                model_path: self.0.model_dir.display().to_string(),
                transport: self.0.transport.0.clone(),
                members,
            };
            self.record("cluster", move |store| {
                let rec = rec.clone();
                async move { typed::put_cluster(&store, &rec).await }
            });
            let (epoch, json) = self.placement();
            self.record_epoch(epoch, &json, EpochState::Committed);
            self.0.ready.send_replace(true);
        } else {
            eprintln!("cluster start failed: {}", errors.join("; "));
            if let Ok(mut e) = self.0.start_error.lock() {
                *e = Some(errors.join("; "));
            }
        }
    }

    pub(super) async fn wait_ready(&self) -> Result<(), Status> {
        let mut rx = self.0.ready.subscribe();
        let r = tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|r| *r)).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            _ => {
                let e = self.0.start_error.lock().ok().and_then(|e| e.clone());
                Err(Status::unavailable(format!("cluster not ready{}", e.map(|e| format!(": {e}")).unwrap_or_default())))
            }
        }
    }
}

#[tonic::async_trait]
impl Control for CoordSvc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        self.require_leader()?;
        let r = req.into_inner();
        let (rank, full) = {
            let mut ws = self.0.workers.lock().map_err(|e| Status::internal(e.to_string()))?;
            if ws.len() >= self.0.n_workers {
                return Err(Status::failed_precondition(format!("cluster already has {} workers", self.0.n_workers)));
            }
            ws.push(WorkerEntry {
                grpc: r.grpc_address,
                transport: r.transport_address,
                node: r.node,
                client: None,
                outstanding: Arc::new(AtomicU64::new(0)),
                alive: Arc::new(AtomicBool::new(true)),
            });
            (ws.len() - 1, ws.len() == self.0.n_workers)
        };
        if full {
            tokio::spawn(self.clone().start_all());
        }
        Ok(Response::new(pb::RegisterResponse { rank: rank as u32, world_size: self.0.n_workers as u32, worker_id: format!("rank-{rank}") }))
    }
}

#[tonic::async_trait]
impl Inference for CoordSvc {
    type GenerateStream = BoxStream<pb::GenerateResponse>;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        self.require_leader()?;
        let r = req.into_inner();
        let cfg = &self.0.cfg;
        let prompt = match &r.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => match &self.0.tok {
                Some(tok) => tok.encode(t).map_err(|e| Status::invalid_argument(e.to_string()))?,
                None => return Err(Status::invalid_argument("the model has no tokenizer.json: send token_ids")),
            },
            Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.clone(),
            None => return Err(Status::invalid_argument("no prompt: set text or token_ids")),
        };
        if prompt.is_empty() {
            return Err(Status::invalid_argument("empty prompt"));
        }
        if let Some((i, t)) = prompt.iter().enumerate().find(|(_, t)| **t as usize >= cfg.vocab_size) {
            return Err(Status::invalid_argument(format!(
                "token id {t} at position {i} is out of range (vocab size {})",
                cfg.vocab_size
            )));
        }
        let max_pos = cfg.max_position_embeddings;
        if r.max_tokens == 0 {
            return Err(Status::invalid_argument("max_tokens must be at least 1"));
        }
        if prompt.len() + r.max_tokens as usize > max_pos {
            return Err(Status::invalid_argument(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context of {max_pos} tokens",
                prompt.len(),
                r.max_tokens
            )));
        }
        let s = r.sampling.unwrap_or_default();
        let sp = SamplingParams {
            temperature: s.temperature,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            top_k: s.top_k as usize,
            seed: s.seed,
        };
        sp.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut stop = r.stop_token_ids.clone();
        if stop.is_empty() && !r.ignore_eos {
            stop = cfg.eos_token_ids.clone();
        }
        self.wait_ready().await?;
        if self.pick_rank().is_none() {
            return Err(Status::unavailable("no live worker"));
        }
        let base = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt })),
            sampling: Some(pb::SamplingParams { temperature: sp.temperature, top_p: sp.top_p, top_k: sp.top_k as u32, seed: sp.seed }),
            stop_token_ids: stop,
            max_tokens: r.max_tokens,
            ignore_eos: r.ignore_eos,
            return_prompt_logits: r.return_prompt_logits,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(self.clone().run_request(base, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let Some(tok) = &self.0.tok else { return Err(Status::failed_precondition("the model has no tokenizer.json")) };
        let ids = tok.encode(&req.into_inner().text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn model_info(&self, _req: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let c = &self.0.cfg;
        Ok(Response::new(pb::ModelInfoResponse {
            architecture: format!("{:?}", c.arch),
            vocab_size: c.vocab_size as u32,
            hidden_size: c.hidden_size as u32,
            num_layers: c.n_layers as u32,
            num_moe_layers: c.moe_layers().len() as u32,
            num_experts: c.router.n_experts as u32,
            top_k: c.router.top_k as u32,
            max_position_embeddings: c.max_position_embeddings as u32,
            world_size: self.0.n_workers as u32,
            placement_json: self.placement().1,
            eos_token_ids: c.eos_token_ids.clone(),
            model_path: self.0.model_dir.display().to_string(),
            ready: *self.0.ready.borrow() && self.require_leader().is_ok(),
        }))
    }
}

/// A failed worker stream: transport and connection failures are retryable (`UNAVAILABLE`),
/// the worker's own verdicts on the request keep their code.
fn worker_failure(rank: usize, alive: &AtomicBool, st: Status) -> Status {
    match st.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange => st,
        _ => {
            if matches!(st.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled)
                && !st.message().contains("expert parallel")
            {
                alive.store(false, Ordering::SeqCst);
            }
            Status::unavailable(format!("worker rank {rank} failed: {} (retry)", st.message()))
        }
    }
}

pub fn coordinator(a: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    if a.exit_on_stdin_eof {
        exit_on_stdin_eof();
    }
    let cfg = ModelConfig::from_dir(&a.model).with_context(|| format!("model {}", a.model.display()))?;
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let p = load_placement(&cfg, a.workers, a.placement.as_deref())?;
    let transport = transport_setup(&a.transport)?;
    let placement_json = serde_json::to_string(&p)?;
    let tok = Tokenizer::from_dir(&a.model)?.map(Arc::new);
    let model_dir = std::fs::canonicalize(&a.model)?;
    let (n_moe, n_experts) = (cfg.moe_layers().len(), cfg.router.n_experts);
    // What one migration move loads (bf16 checkpoints' experts stay bf16 once loaded).
    let expert_bytes = if n_moe > 0 { Model::routed_expert_bytes(&a.model)? } else { 0 };
    let policy = a.scheduler.policy(n_moe, expert_bytes)?;
    if let Some(c) = a.scheduler.capacity_factor {
        anyhow::ensure!(c.is_finite() && c > 0.0, "--capacity-factor must be positive");
    }
    anyhow::ensure!(a.scheduler.max_batch_tokens != Some(0), "--max-batch-tokens must be at least 1");
    anyhow::ensure!(a.stats_half_life > 0.0 && a.stats_half_life.is_finite(), "--stats-half-life must be positive");
    runtime()?.block_on(async move {
        let (ready, _) = tokio::sync::watch::channel(false);
        let svc = CoordSvc(Arc::new(CoordState {
            model_dir,
            cfg,
            tok,
            placement: Mutex::new((1, placement_json)),
            apply_lock: tokio::sync::Mutex::new(()),
            listen: Mutex::new(String::new()),
            role: tokio::sync::watch::channel(Role::Standby(None)).0,
            seat: std::sync::OnceLock::new(),
            metrics: CoordMetrics::new()?,
            window: Mutex::new(placement::live::LoadWindow::new(n_moe, n_experts, a.stats_half_life)),
            load_observed: tokio::sync::Notify::new(),
            policy: Mutex::new(policy),
            load_aware_replicas: a.scheduler.load_aware_replicas,
            capacity_factor: a.scheduler.capacity_factor,
            max_batch_tokens: a.scheduler.max_batch_tokens,
            migration_steps: Mutex::new((MigrationWatch::Idle, 0)),
            recent_steps: RecentSteps::default(),
            recent_projected_steps: RecentSteps::default(),
            transport,
            n_workers: a.workers,
            workers: Mutex::new(Vec::new()),
            ready,
            start_error: Mutex::new(None),
        }));
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("bind {}", a.listen))?;
        let addr = listener.local_addr()?;
        let advertise = a.advertise.clone().unwrap_or_else(|| addr.to_string());
        if let Ok(mut l) = svc.0.listen.lock() {
            *l = advertise.clone();
        }
        anyhow::ensure!(a.lease_ttl >= 1, "--lease-ttl must be at least 1 second");
        let store = AnyStore::open(&a.store).await.with_context(|| format!("state store {}", a.store))?;
        let seat = Arc::new(
            Seat::take(store, advertise, Duration::from_secs(a.lease_ttl)).await.with_context(|| format!("lease in {}", a.store))?,
        );
        let _ = svc.0.seat.set(seat.clone());
        {
            let svc = svc.clone();
            tokio::spawn(async move {
                let role = svc.0.role.clone();
                match seat.campaign(|leader| {
                    if let Some(l) = &leader {
                        println!("standby; the leader is at {l}");
                    }
                    role.send_replace(Role::Standby(leader));
                })
                .await
                {
                    Ok(()) => svc.clone().lead(seat.clone()).await,
                    Err(e) => {
                        eprintln!("error: lost the coordinator lease while campaigning: {e}");
                        std::process::exit(4);
                    }
                }
                // Fail-stop: a leader whose lease is gone may already have a successor.
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if seat.keep_alive.is_lost() {
                        eprintln!("error: the coordinator lease expired; exiting so that a single leader acts");
                        std::process::exit(4);
                    }
                }
            });
        }
        if let Some(m) = &a.serve.metrics_listen {
            let (maddr, _) = telemetry::serve_metrics(m, svc.0.metrics.registry.clone()).await?;
            println!("metrics on http://{maddr}/metrics");
        }
        let (health, reflection, reporter) = health_and_reflection().await?;
        reporter.set_serving::<InferenceServer<CoordSvc>>().await;
        println!("listening on {addr}");
        a.serve.tls.server()?
            .add_service(health)
            .add_service(reflection)
            .add_service(InferenceServer::new(svc.clone()).max_encoding_message_size(1 << 30))
            .add_service(AdminServer::with_interceptor(svc.clone(), AdminAuth::new(a.admin_token.clone())))
            .add_service(ControlServer::new(svc))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

// ---------------------------------------------------------------------------------------------
// up: a whole cluster on this machine
// ---------------------------------------------------------------------------------------------

#[derive(clap::Args, Clone)]
pub struct UpArgs {
    /// Model directory; default: tests/fixtures/mixtral when present, else a small generated
    /// checkpoint.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// Client API listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Bearer token of the coordinator's admin API (`switchyard place apply`, `switchyard status`).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Compute threads of each worker (default: the machine's cores split evenly between the
    /// workers, at least one each).
    #[arg(long)]
    pub threads_per_worker: Option<usize>,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
}

/// Compute threads per worker when `workers` share this machine: its cores split evenly.
pub fn threads_per_local_worker(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / workers.max(1)).max(1)
}

/// Child processes of a local cluster; killed on drop.
pub struct LocalCluster {
    pub addr: String,
    children: Vec<Child>,
    pub worker_pids: Vec<u32>,
    /// The workers' gRPC addresses, in start order.
    pub worker_addrs: Vec<String>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where local-cluster children's output is relayed: stdout (default, `switchyard up`), or stderr
/// for commands whose stdout is for machines (`bench ... --json`).
static CHILD_OUTPUT_TO_STDERR: AtomicBool = AtomicBool::new(false);

pub fn relay_child_output_to_stderr() {
    CHILD_OUTPUT_TO_STDERR.store(true, Ordering::Relaxed);
}

fn spawn_reading(mut cmd: std::process::Command, want: &str, timeout: Duration) -> anyhow::Result<(Child, String)> {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let want_t = want.to_string();
    std::thread::spawn(move || {
        let want = want_t;
        let mut sent = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&want) {
                let _ = tx.send(line.clone());
                sent = true;
            }
            if CHILD_OUTPUT_TO_STDERR.load(Ordering::Relaxed) {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(line) => Ok((child, line)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("child did not print {want:?} within {timeout:?}")
        }
    }
}

/// Start a coordinator and `workers` worker processes of this binary; returns once serving.
pub fn start_local_cluster(
    model: &Path,
    workers: usize,
    placement: Option<&Path>,
    listen: &str,
    admin_token: Option<&str>,
    coordinator_args: &[String],
    worker_args: &[String],
) -> anyhow::Result<LocalCluster> {
    let exe = std::env::current_exe()?;
    // Validate here first, for a clear error before any process starts.
    let cfg = ModelConfig::from_dir(model).with_context(|| format!("model {}", model.display()))?;
    load_placement(&cfg, workers, placement)?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["coordinator", "--exit-on-stdin-eof", "--workers", &workers.to_string(), "--listen", listen, "--model"]).arg(model);
    if let Some(p) = placement {
        cmd.arg("--placement").arg(p);
    }
    if let Some(t) = admin_token {
        cmd.env("SWITCHYARD_ADMIN_TOKEN", t); // not on the command line, where `ps` shows it
    }
    cmd.args(coordinator_args);
    let (coord, line) = spawn_reading(cmd, "listening on ", Duration::from_secs(60))?;
    let addr = line.trim().trim_start_matches("listening on ").to_string();
    let mut cl = LocalCluster { addr: addr.clone(), children: vec![coord], worker_pids: vec![], worker_addrs: vec![] };
    for _ in 0..workers {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["worker", "--exit-on-stdin-eof", "--coordinator", &addr]).args(worker_args);
        let (w, line) = spawn_reading(cmd, "worker rank", Duration::from_secs(60))?;
        // "worker rank R of N ... pid P"
        if let Some(a) = line.split("listening on ").nth(1).and_then(|r| r.split_whitespace().next()) {
            cl.worker_addrs.push(a.to_string());
        }
        cl.worker_pids.push(w.id());
        cl.children.push(w);
    }
    // Wait until every worker started.
    let rt = runtime()?;
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            if let Ok(ch) = connect_channel(&addr).await
                && let mut c = InferenceClient::new(ch)
                && let Ok(i) = c.model_info(pb::ModelInfoRequest {}).await
                && i.into_inner().ready
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("cluster at {addr} not ready within 180 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })?;
    Ok(cl)
}

/// The default model of `switchyard up`.
fn default_model() -> anyhow::Result<PathBuf> {
    let fx = PathBuf::from("tests/fixtures/mixtral");
    if fx.join("config.json").exists() {
        return Ok(std::fs::canonicalize(fx)?);
    }
    let dir = std::env::temp_dir().join("switchyard-up-tiny-model");
    if !dir.join("config.json").exists() {
        let mut spec = worker::synth::SynthSpec::tiny();
        spec.arch = "mixtral".into();
        worker::synth::write_checkpoint(&dir, &spec)?;
    }
    Ok(dir)
}

pub fn up(a: UpArgs) -> anyhow::Result<ExitCode> {
    let model = match a.model {
        Some(m) => m,
        None => default_model()?,
    };
    // Resolve (and, from a routing trace, solve) the placement once, here; the coordinator reads
    // the result as a file.
    let cfg = ModelConfig::from_dir(&model).with_context(|| format!("model {}", model.display()))?;
    let resolved = a.placement.resolve(&cfg, a.workers)?;
    let dir = tempfile::tempdir()?;
    let placement_file = dir.path().join("placement.json");
    resolved.write(&placement_file)?;
    let cl = start_local_cluster(
        &model,
        a.workers,
        Some(&placement_file),
        &a.listen,
        a.admin_token.as_deref(),
        &a.scheduler.to_args(),
        &[format!("--threads={}", a.threads_per_worker.unwrap_or_else(|| threads_per_local_worker(a.workers)))],
    )?;
    println!("switchyard is serving {} on {} workers; connect to http://{}", model.display(), a.workers, cl.addr);
    println!("  switchyard generate --endpoint http://{} --prompt \"hello\" --max-tokens 16", cl.addr);
    println!("press Ctrl-C to stop");
    runtime()?.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    drop(cl);
    Ok(ExitCode::SUCCESS)
}

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

/// `req` continued after `generated` tokens: prompt `prompt ++ generated`, the token budget
/// shrunk by as many, no prompt logits (they were sent, or the request moved before any token).
fn continuation(req: &pb::GenerateRequest, mut prompt: Vec<u32>, generated: &[u32]) -> pb::GenerateRequest {
    prompt.extend_from_slice(generated);
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt })),
        max_tokens: req.max_tokens.saturating_sub(generated.len() as u32),
        return_prompt_logits: false,
        ..req.clone()
    }
}

/// A call that broke because the connection did (the coordinator died mid-stream: h2 or hyper
/// errors, surfaced as `UNKNOWN` with a source) is retryable like `UNAVAILABLE`; statuses the
/// server sent keep their code.
fn connection_lost(st: Status) -> Status {
    if matches!(st.code(), tonic::Code::Unknown | tonic::Code::Cancelled) && std::error::Error::source(&st).is_some() {
        let why = std::error::Error::source(&st).map(error_chain).unwrap_or_default();
        let hint = if super::tls::client_enabled() { "" } else { " (if the server speaks TLS, pass --tls-ca)" };
        return Status::unavailable(format!("connection lost: {}: {why}{hint}", st.message()));
    }
    if st.code() == tonic::Code::Internal && st.message().contains("h2 protocol error") {
        // What a plaintext client gets from a TLS server.
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
) -> anyhow::Result<ExitCode> {
    let cases = worker::reference::read_expected(expected)?;
    if cases.is_empty() {
        bail!("{} holds no prompt_0", expected.display());
    }
    let cl = start_local_cluster(dir, workers, placement, "127.0.0.1:0", None, coordinator_args, &[])?;
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
            n += 1;
        }
    }
    let n = n.max(1);
    WorkerTotals { busy_steps: t.busy_steps / n, dispatch_us: t.dispatch_us / n, expert_us: t.expert_us / n, combine_us: t.combine_us / n, ..t }
}
