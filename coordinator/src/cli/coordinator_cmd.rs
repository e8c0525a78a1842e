//! `switchyard coordinator`: the tokio adapter over the control plane (`coordinator::control`).
//!
//! It serves the client API (`switchyard.v1.Inference`, gRPC health, reflection), the `Control`
//! service workers register with, and the admin API (`cli::admin`). Registrations, lease
//! expiries and failed health checks feed the [`Group`]; the generation driver carries out every
//! generation it plans (`Worker.Regroup` on every rank, in parallel) and records it in the store
//! in order. Requests go to the routable rank with the least outstanding tokens and continue on
//! another rank from where they stopped when theirs fails.
use anyhow::{Context, bail};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_proto::v1 as pb;
use super::admin::AdminAuth;
use super::cluster::{BoxStream, PlacementArgs, ServeArgs, continuation, exit_on_stdin_eof, health_and_reflection, runtime, transport_setup, write_ready_file};
use super::ha::{Role, Seat, with_store_retries};
use super::metrics::CoordMetrics;
use super::tls::endpoint;
use coordinator::control::record::{self, GenerationRecord, Recorded};
use coordinator::control::router::{self, AttemptFailure};
use coordinator::control::{ControlError, Generation, Group, GroupSettings, Serving, WorkerId, WorkerInfo};
use coordinator::store::typed;
use coordinator::store::{AnyStore, EventKind, StateStore};
use switchyard_proto::v1::admin_server::AdminServer;
use switchyard_proto::v1::control_server::{Control, ControlServer};
use switchyard_proto::v1::inference_server::{Inference, InferenceServer};
use switchyard_proto::v1::worker_client::WorkerClient;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use worker::ModelConfig;
use worker::expert_parallel::RecentSteps;
use worker::model::Model;
use worker::sampling::SamplingParams;
use worker::tokenizer::Tokenizer;

#[derive(clap::Args, Clone)]
pub struct CoordinatorArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Workers to wait for before the first generation; workers that register later join the
    /// group at a new generation (and replace lost ones).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Memory budget of a rank: most expert slots it may hold per MoE layer (no limit by
    /// default). When the live ranks cannot hold every expert within it, the cluster stops
    /// serving (UNAVAILABLE naming the missing experts) until a worker joins.
    #[arg(long)]
    pub max_slots_per_rank: Option<usize>,
    /// Every expert on at least this many ranks (placements and the rebalancer honour it), so
    /// a single death needs no weight loading before serving resumes.
    #[arg(long, default_value_t = 1)]
    pub min_replicas: usize,
    /// Write {"grpc_address","pid"} (JSON) to this file once listening.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
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
    pub fn policy(&self, layers: usize, expert_bytes: u64, min_replicas: usize) -> anyhow::Result<Option<placement::rebalance::Rebalancer>> {
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
        cfg.min_replicas = min_replicas;
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
/// Where the coordinator is in watching a placement change's step lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MigrationWatch {
    Idle,
    Running,
    /// Done; the next membership poll still counts (its steps ran partly during the change).
    Ending,
}

/// The coordinator's connection to one worker.
#[derive(Clone)]
struct WorkerLink {
    client: WorkerClient<Channel>,
    /// Tokens requested and not yet streamed from this worker (request routing).
    outstanding: Arc<AtomicU64>,
}

/// One rank of the active generation, as request routing sees it.
#[derive(Clone)]
pub(super) struct RankRoute {
    pub rank: usize,
    pub id: WorkerId,
    client: WorkerClient<Channel>,
    outstanding: Arc<AtomicU64>,
}

impl RankRoute {
    pub(super) fn client(&self) -> WorkerClient<Channel> {
        self.client.clone()
    }
}

struct CoordState {
    model_dir: PathBuf,
    cfg: ModelConfig,
    tok: Option<Arc<Tokenizer>>,
    /// The group's membership and generations: the one owner of who is which rank, the active
    /// placement (parsed) and whether the cluster serves. Changed only through its methods, under
    /// this lock, never held across an await.
    group: Mutex<Group>,
    /// Wakes the generation driver after a membership change.
    membership_changed: tokio::sync::Notify,
    /// Published after every change of the group: what requests wait on.
    serving: tokio::sync::watch::Sender<Serving>,
    links: Mutex<HashMap<WorkerId, WorkerLink>>,
    /// Generations and placement epochs change one at a time.
    apply_lock: tokio::sync::Mutex<()>,
    /// Client API address this coordinator listens on.
    listen: Mutex<String>,
    /// Leader or standby (only the leader serves requests and drives workers).
    role: tokio::sync::watch::Sender<Role>,
    /// This coordinator's lease and store.
    seat: std::sync::OnceLock<Arc<Seat>>,
    /// Store writes, in order, one at a time (see `RecordQueue`).
    records: std::sync::OnceLock<RecordQueue>,
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
    /// Transport kind handed to every worker ("tcp" or "nccl").
    transport: String,
}

#[derive(Clone)]
pub(super) struct CoordSvc(Arc<CoordState>);

/// Checks a placement against the model and the number of ranks (`origin` names it in errors).
pub fn check_placement(p: &placement::Placement, cfg: &ModelConfig, ranks: usize, origin: &str) -> anyhow::Result<()> {
    let (n_l, n_e) = (cfg.moe_layers().len(), cfg.router.n_experts);
    if p.num_layers != n_l || p.num_experts != n_e {
        bail!("{origin} has {} MoE layers x {} experts, the model has {n_l} x {n_e}", p.num_layers, p.num_experts);
    }
    if p.num_ranks() != ranks {
        bail!("{origin} is for {} ranks, the group has {ranks}", p.num_ranks());
    }
    Ok(())
}

/// Store writes of the leader, carried out in order by one task: serving never waits on the
/// store, and a later write can never land before an earlier one (each is a compare-and-swap
/// that refuses to go backwards, see `control::record`).
struct RecordQueue(tokio::sync::mpsc::UnboundedSender<GenerationRecord>);

impl RecordQueue {
    fn spawn(store: AnyStore) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<GenerationRecord>();
        tokio::spawn(async move {
            while let Some(rec) = rx.recv().await {
                match with_store_retries("generation record", || record::record_generation(&store, &rec)).await {
                    Ok(Recorded::Written) => {}
                    Ok(Recorded::Superseded { number, epoch }) => {
                        tracing::warn!(number = rec.number, epoch = rec.epoch, "the store holds a later generation ({number}, epoch {epoch}); not recorded")
                    }
                    Err(e) => tracing::error!("recording generation {} failed [{}]: {e}", rec.number, e.code()),
                }
            }
        });
        RecordQueue(tx)
    }
}

impl CoordSvc {
    /// UNAVAILABLE (retryable: clients try the next coordinator) unless this one leads.
    pub(super) fn require_leader(&self) -> Result<(), Status> {
        match &*self.0.role.borrow() {
            Role::Leader => Ok(()),
            Role::Standby(l) => Err(ControlError::NotLeader { leader: l.clone() }.into()),
        }
    }

    fn group<T>(&self, f: impl FnOnce(&mut Group) -> T) -> T {
        let mut g = match self.0.group.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let out = f(&mut g);
        let serving = g.serving();
        let m = &self.0.metrics;
        if let Some(a) = g.active() {
            m.generation.set(a.number as f64);
            m.epoch.set(a.epoch as f64);
            m.world_size.set(a.world() as f64);
        }
        m.serving.set(serving.is_serving() as u8 as f64);
        m.missing_experts.set(match &serving {
            Serving::NoRoom { missing } => missing.len() as f64,
            _ => 0.0,
        });
        m.workers_alive.set(g.routable().len() as f64);
        drop(g);
        self.0.serving.send_if_modified(|s| {
            let changed = *s != serving;
            *s = serving;
            changed
        });
        out
    }

    /// Records the active generation (in order, in the background).
    fn record_active(&self) {
        let Some(rec) = self.group(|g| g.active().map(|a| GenerationRecord::of(a, &self.0.model_dir.display().to_string(), &self.0.transport)))
        else {
            return;
        };
        if let Some(q) = self.0.records.get() {
            let _ = q.0.send(rec);
        }
    }

    /// This coordinator won the election: adopt the generation a previous leader recorded (the
    /// workers keep their KV caches and experts), or wait for registrations.
    async fn lead(self, seat: Arc<Seat>) {
        let _ = self.0.records.set(RecordQueue::spawn(seat.store.clone()));
        if let Some(policy) = self.0.policy.lock().ok().and_then(|mut p| p.take()) {
            tokio::spawn(self.clone().rebalance_loop(policy));
        }
        match record::recorded_generation(&seat.store).await {
            Ok(Some(rec)) => match rec.generation() {
                Ok(g) if g.placement.num_layers == self.0.cfg.moe_layers().len() && g.placement.num_experts == self.0.cfg.router.n_experts => {
                    self.adopt(g).await
                }
                Ok(_) => tracing::warn!("ignoring the recorded generation: it is for another model"),
                Err(e) => tracing::warn!("ignoring the recorded generation: {e}"),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot read the recorded generation [{}]: {e}; waiting for workers to register", e.code()),
        }
        self.0.role.send_replace(Role::Leader);
        match self.group(|g| g.active().map(|a| (a.number, a.world()))) {
            Some((n, w)) => println!("leading; adopted generation {n} of {w} ranks"),
            None => println!("leading; waiting for {} workers", self.group(|g| g.settings().min_workers)),
        }
        tokio::spawn(self.clone().drive_generations());
        tokio::spawn(self.clone().watch_membership(seat));
    }

    /// Takes over the workers of a recorded generation that still answer.
    async fn adopt(&self, g: Generation) {
        let mut alive = Vec::new();
        let mut seen = (0u64, 0u64);
        for w in &g.ranks {
            let Ok(link) = link_to(&w.grpc) else { continue };
            let mut c = link.client.clone();
            if let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(3), c.health(pb::WorkerHealthRequest::default())).await {
                let h = h.into_inner();
                seen = seen.max((h.generation, h.epoch));
                alive.push(w.id.clone());
                if let Ok(mut l) = self.0.links.lock() {
                    l.insert(w.id.clone(), link);
                }
            }
        }
        let (n, world) = (g.number, g.world());
        let adopted = alive.len();
        self.group(|grp| {
            grp.adopt(g, &alive);
            // A leader that died mid-change may have handed out a later generation.
            grp.observe_generation(seen.0, seen.1);
        });
        println!("adopted {adopted} of {world} running workers of generation {n}");
    }

    /// Leader only: forms every generation the group plans, one at a time.
    async fn drive_generations(self) {
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(250), self.0.membership_changed.notified()).await;
            let _one_at_a_time = self.0.apply_lock.lock().await;
            let load = self.0.window.lock().ok().filter(|w| !w.is_empty()).map(|w| w.load().to_vec());
            let Some(next) = self.group(|g| g.next_generation(load.as_deref())) else { continue };
            self.form(next).await;
        }
    }

    /// Carries generation `g` out on its workers: every rank keeps what it holds, loads what it
    /// gains, and joins the new mesh; the group switches when all have.
    async fn form(&self, g: Generation) {
        let t0 = std::time::Instant::now();
        let json = match serde_json::to_string(&g.placement) {
            Ok(j) => j,
            Err(e) => return tracing::error!("placement of generation {}: {e}", g.number),
        };
        // Every generation is a new communicator: NCCL needs a unique id of its own for it.
        let (transport, nccl_unique_id) = match transport_setup(&self.0.transport) {
            Ok(t) => t,
            Err(e) => return tracing::error!("generation {}: transport setup: {e:#}", g.number),
        };
        let peers: Vec<String> = g.ranks.iter().map(|w| w.transport.clone()).collect();
        let nodes = g.node_indices();
        let mut set = tokio::task::JoinSet::new();
        for (rank, w) in g.ranks.iter().enumerate() {
            let link = match self.link(&w.id, &w.grpc) {
                Ok(l) => l,
                Err(e) => {
                    let id = w.id.clone();
                    set.spawn(async move { (id, Err((tonic::Code::Unavailable, e))) });
                    continue;
                }
            };
            let req = pb::RegroupRequest {
                generation: g.number,
                assignment: Some(pb::Assignment {
                    rank: rank as u32,
                    world_size: g.world() as u32,
                    peer_addresses: peers.clone(),
                    peer_nodes: nodes.clone(),
                    placement_json: json.clone(),
                    model_path: self.0.model_dir.display().to_string(),
                    epoch: g.epoch,
                    transport: transport.clone(),
                    nccl_unique_id: nccl_unique_id.clone(),
                    load_aware_replicas: self.0.load_aware_replicas,
                    capacity_factor: self.0.capacity_factor.unwrap_or(0.0),
                    max_batch_tokens: self.0.max_batch_tokens.unwrap_or(0),
                }),
            };
            let id = w.id.clone();
            let mut c = link.client;
            set.spawn(async move {
                let r = match tokio::time::timeout(REGROUP_TIMEOUT, c.regroup(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(s)) => Err((s.code(), format!("{:?}: {}", s.code(), s.message()))),
                    Err(_) => Err((tonic::Code::DeadlineExceeded, format!("no answer within {REGROUP_TIMEOUT:?}"))),
                };
                (id, r)
            });
        }
        let mut failed = Vec::new();
        let mut abandoned = false;
        let (mut loaded, mut kept_seqs) = (0u64, 0u64);
        while let Some(j) = set.join_next().await {
            match j {
                Ok((_, Ok(r))) => {
                    loaded += r.loaded_experts as u64;
                    kept_seqs += r.kept_sequences as u64;
                }
                Ok((id, Err((code, e)))) => {
                    eprintln!("worker {id} did not join generation {}: {e}", g.number);
                    // A worker superseded by a newer generation is fine; any other failure
                    // loses it. Either way this generation cannot form: stop waiting for the
                    // others (they would wait for the failed peer until their connect timeout;
                    // the next generation's Regroup supersedes their builds at once).
                    if code != tonic::Code::Aborted {
                        failed.push(id);
                    }
                    abandoned = true;
                    set.abort_all();
                    break;
                }
                Err(e) => tracing::error!("regroup task: {e}"),
            }
        }
        let done = if abandoned {
            self.group(|grp| grp.regroup_abandoned(g.number, &failed))
        } else {
            self.group(|grp| grp.regroup_finished(g.number))
        };
        if let Err(e) = done {
            return tracing::warn!("generation {}: {e}", g.number);
        }
        if !abandoned {
            self.0.metrics.membership_changes.inc();
            self.record_active();
            println!(
                "generation {} serving: {} ranks, epoch {}, {loaded} experts loaded, {kept_seqs} sequences kept, {} ms",
                g.number,
                g.world(),
                g.epoch,
                t0.elapsed().as_millis()
            );
        } else {
            self.0.membership_changed.notify_one();
        }
    }

    /// The connection to worker `id` (made once).
    fn link(&self, id: &str, grpc: &str) -> Result<WorkerLink, String> {
        let mut links = self.0.links.lock().map_err(|e| e.to_string())?;
        if let Some(l) = links.get(id) {
            return Ok(l.clone());
        }
        let l = link_to(grpc)?;
        links.insert(id.to_string(), l.clone());
        Ok(l)
    }

    /// Adds the workers' cumulative expert counts to the live window and updates the gauges.
    fn observe_load(&self, reports: &[(usize, Vec<u64>)], dt_s: f64) {
        let Some(p) = self.active_placement() else { return };
        let Ok(mut w) = self.0.window.lock() else { return };
        w.decay(dt_s);
        for (rank, counts) in reports {
            w.observe_cumulative(*rank, counts);
        }
        let (per_layer, total) = w.balancedness(&p.1);
        self.0.metrics.set_balance(&per_layer, total, &w.rank_load(&p.1));
    }

    /// The live statistics (admin `GetStats`).
    pub(super) fn stats_snapshot(&self) -> pb::GetStatsResponse {
        let (nl, ne) = (self.0.cfg.moe_layers().len(), self.0.cfg.router.n_experts);
        let m = &self.0.metrics;
        let active = self.active_placement();
        let mut r = pb::GetStatsResponse {
            epoch: active.as_ref().map_or(0, |a| a.0),
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
            if let Some((_, p)) = &active {
                (r.layer_balancedness, r.balancedness) = w.balancedness(p);
                r.rank_load = w.rank_load(p);
            }
        }
        r.placement_json = active.and_then(|a| serde_json::to_string(&a.1).ok()).unwrap_or_default();
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

    /// The scheduler (leader only): after every load report, asks the rebalance policy whether the
    /// windowed load makes a new placement worth its migration, and applies it as a placement epoch.
    async fn rebalance_loop(self, mut policy: placement::rebalance::Rebalancer) {
        let t0 = std::time::Instant::now();
        loop {
            // Decide on every fresh load report (the membership loop observes one per 500 ms).
            self.0.load_observed.notified().await;
            if !self.is_ready() || self.require_leader().is_err() {
                continue;
            }
            let Some((_, current)) = self.active_placement() else { continue };
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

    /// A worker is gone: out of routing, and the next generation forms without it.
    fn lose_worker(&self, id: &str, why: &str) {
        if self.group(|g| g.lose(id)) {
            tracing::warn!(worker = id, "worker lost: {why}");
            eprintln!("worker {id} lost: {why}");
            if let Ok(mut l) = self.0.links.lock() {
                l.remove(id);
            }
            self.0.membership_changed.notify_one();
        }
    }

    /// Leader only: a worker whose lease expired (its `members/` key vanished) or whose health
    /// checks fail three times in a row is lost; a rank whose collectives broke with every peer
    /// alive makes the group re-form as it is.
    async fn watch_membership(self, seat: Arc<Seat>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut watch = match seat.store.watch(typed::MEMBERS, None).await {
                Ok(w) => w,
                Err(e) => return tracing::warn!("cannot watch members [{}]: {e}", e.code()),
            };
            while let Some(Ok(ev)) = watch.next().await {
                if ev.kind == EventKind::Delete
                    && let Some(id) = ev.kv.key.strip_prefix(typed::MEMBERS)
                {
                    me.lose_worker(id, "its lease expired");
                }
            }
        });
        let mut failures: HashMap<WorkerId, u32> = HashMap::new();
        let mut last = std::time::Instant::now();
        loop {
            tokio::time::sleep(HEALTH_PERIOD).await;
            let (ranks, members) = self.group(|g| {
                let ranks: Vec<WorkerId> = g.active().map(|a| a.ranks.iter().map(|w| w.id.clone()).collect()).unwrap_or_default();
                (ranks, g.members())
            });
            let mut polls = tokio::task::JoinSet::new();
            for w in members {
                let Ok(link) = self.link(&w.id, &w.grpc) else { continue };
                let mut c = link.client;
                polls.spawn(async move {
                    let h = tokio::time::timeout(Duration::from_secs(1), c.health(pb::WorkerHealthRequest { take_steps: true })).await;
                    (w.id, h.ok().and_then(Result::ok).map(Response::into_inner))
                });
            }
            let mut reports = Vec::new();
            let mut broken = false;
            while let Some(Ok((id, h))) = polls.join_next().await {
                let f = failures.entry(id.clone()).or_default();
                *f = if h.is_some() { 0 } else { *f + 1 };
                if *f >= HEALTH_FAILURES {
                    self.lose_worker(&id, &format!("{HEALTH_FAILURES} health checks failed"));
                    continue;
                }
                let Some(h) = h else { continue };
                self.group(|g| g.observe_generation(h.generation, h.epoch));
                let Some(rank) = ranks.iter().position(|r| *r == id) else { continue };
                // A rank whose collectives failed waits for a new generation (see the worker's
                // rank loop); when no member is lost, re-form the group as it is.
                broken |= h.paused && h.generation == self.group(|g| g.active().map_or(0, |a| a.number));
                self.note_steps_during_migration(&h.recent_step_us);
                if rank == 0 {
                    self.0.recent_steps.extend(h.recent_step_us.iter().copied());
                    self.0.recent_projected_steps.extend(h.recent_projected_step_us.iter().copied());
                }
                reports.push((rank, h.expert_load));
            }
            if broken && self.group(|g| g.reform()) {
                eprintln!("a rank's collectives broke; re-forming the group");
                self.0.membership_changed.notify_one();
            }
            self.observe_load(&reports, last.elapsed().as_secs_f64());
            self.0.load_observed.notify_one();
            self.migration_poll_done();
            last = std::time::Instant::now();
        }
    }

    /// The routable rank with the least outstanding tokens.
    fn pick_rank(&self) -> Option<RankRoute> {
        let routes = self.routes();
        let r = router::least_outstanding(routes.iter().map(|r| (r.rank, r.outstanding.load(Ordering::SeqCst))))?;
        routes.into_iter().find(|x| x.rank == r)
    }

    /// The ranks of the active generation that take requests, with their links.
    pub(super) fn routes(&self) -> Vec<RankRoute> {
        let ranks: Vec<(usize, WorkerInfo)> = self.group(|g| g.routable().into_iter().map(|(r, w)| (r, w.clone())).collect());
        ranks
            .into_iter()
            .filter_map(|(rank, w)| {
                let l = self.link(&w.id, &w.grpc).ok()?;
                Some(RankRoute { rank, id: w.id, client: l.client, outstanding: l.outstanding })
            })
            .collect()
    }

    /// Waits until the cluster serves (at most `limit`); the reason it does not otherwise.
    async fn wait_serving(&self, limit: Duration) -> Result<(), Serving> {
        let mut rx = self.0.serving.subscribe();
        let r = tokio::time::timeout(limit, rx.wait_for(|s| s.is_serving())).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.0.serving.borrow().clone()),
        }
    }

    /// Streams one accepted request from its home rank to `tx`. When the rank fails (it died, or
    /// its group is re-forming), the request continues on a live rank from where it stopped
    /// (prompt + tokens streamed so far), so the client sees one sequence; it ends with its tokens
    /// or a terminal status (`router::after_failure`), never in silence.
    async fn run_request(self, base: pb::GenerateRequest, tx: tokio::sync::mpsc::Sender<Result<pb::GenerateResponse, Status>>) {
        let m = &self.0.metrics;
        m.in_flight.add(1.0);
        let prompt = match &base.prompt {
            Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.clone(),
            _ => vec![],
        };
        let mut generated: Vec<u32> = Vec::new();
        let outcome;
        let mut attempt = 0usize;
        loop {
            let (failure, st) = match self.attempt(&base, &prompt, &mut generated, &tx).await {
                Ok(()) => {
                    outcome = "completed";
                    break;
                }
                Err(f) => f,
            };
            match router::after_failure(attempt, failure, generated.len(), base.return_prompt_logits) {
                router::Next::Retry(pause) => {
                    tracing::warn!(attempt, generated = generated.len(), "request moves to another rank: {}", st.message());
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                router::Next::Fail => {
                    outcome = if failure == AttemptFailure::Rejected { "invalid" } else { "failed" };
                    let _ = tx.send(Err(st)).await;
                    break;
                }
            }
        }
        m.in_flight.add(-1.0);
        m.request(outcome);
    }

    /// One attempt of a request on one rank: `Ok` once it finished (or the client went away).
    async fn attempt(
        &self,
        base: &pb::GenerateRequest,
        prompt: &[u32],
        generated: &mut Vec<u32>,
        tx: &tokio::sync::mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<(), (AttemptFailure, Status)> {
        if let Err(s) = self.wait_serving(router::WAIT_FOR_SERVING).await {
            return Err((AttemptFailure::NotServing, ControlError::NotServing(s.reason()).into()));
        }
        let Some(route) = self.pick_rank() else {
            return Err((AttemptFailure::NotServing, Status::unavailable("no live worker (retry)")));
        };
        let req = if generated.is_empty() { base.clone() } else { continuation(base, prompt.to_vec(), generated) };
        let mut left = req.max_tokens as u64;
        route.outstanding.fetch_add(left, Ordering::SeqCst);
        let tokens = self.0.metrics.tokens(route.rank);
        let streamed: Result<(), Status> = async {
            let mut stream = route.client().generate(req).await?.into_inner();
            loop {
                let Some(mut msg) = stream.message().await? else {
                    return Err(Status::unavailable("the worker's stream ended before the request finished"));
                };
                if msg.prompt_logits.is_empty() {
                    generated.push(msg.token_id);
                    msg.index = generated.len() as u32 - 1;
                    left = left.saturating_sub(1);
                    route.outstanding.fetch_sub(1, Ordering::SeqCst);
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
        route.outstanding.fetch_sub(left.min(route.outstanding.load(Ordering::SeqCst)), Ordering::SeqCst);
        streamed.map_err(|st| match st.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange => (AttemptFailure::Rejected, st),
            _ => (AttemptFailure::RankFailed, Status::unavailable(format!("worker rank {} failed: {} (retry)", route.rank, st.message()))),
        })
    }

    /// The active generation's placement epoch and placement.
    pub(super) fn active_placement(&self) -> Option<(u64, placement::Placement)> {
        self.group(|g| g.active().map(|a| (a.epoch, a.placement.clone())))
    }

    /// A placement epoch committed within the active generation.
    pub(super) fn epoch_committed(&self, epoch: u64, p: placement::Placement) -> Result<(), ControlError> {
        self.group(|g| g.epoch_committed(epoch, p))?;
        self.record_active();
        Ok(())
    }

    pub(super) fn apply_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.0.apply_lock
    }

    pub(super) fn model_config(&self) -> &ModelConfig {
        &self.0.cfg
    }

    pub(super) fn listen_addr(&self) -> String {
        self.0.listen.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub(super) fn is_ready(&self) -> bool {
        self.0.serving.borrow().is_serving()
    }

    /// A snapshot of the group for `ClusterStatus`.
    pub(super) fn group_status(&self) -> GroupStatus {
        self.group(|g| GroupStatus {
            active: g.active().cloned(),
            serving: g.serving(),
            spare: g.spare_workers(),
            formed: g.generations_formed(),
            max_slots: g.settings().max_slots_per_rank,
            min_replicas: g.settings().min_replicas,
            draining: g.active().map(|a| a.ranks.iter().map(|w| g.is_draining(&w.id)).collect()).unwrap_or_default(),
        })
    }

    /// A client of worker `id`, if it can be made.
    pub(super) fn client_of(&self, id: &str, grpc: &str) -> Option<WorkerClient<Channel>> {
        self.link(id, grpc).ok().map(|l| l.client)
    }

    /// Clients of every rank of the active generation (placement changes need all of them).
    pub(super) fn rank_clients(&self) -> Result<(u64, Vec<WorkerClient<Channel>>), Status> {
        let Some(a) = self.group(|g| g.active().cloned()) else { return Err(ControlError::NotServing("no active generation".into()).into()) };
        let clients = a
            .ranks
            .iter()
            .map(|w| self.link(&w.id, &w.grpc).map(|l| l.client).map_err(|e| Status::unavailable(format!("worker {}: {e}", w.id))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((a.number, clients))
    }

    /// Drain: no new requests to `rank`, its requests finish (or move after `deadline`), then
    /// the group re-forms without it.
    pub(super) async fn drain_rank(&self, rank: usize, deadline: Duration) -> Result<pb::DrainRankResponse, Status> {
        let w = self.group(|g| g.active().and_then(|a| a.ranks.get(rank).cloned())).ok_or(ControlError::UnknownRank(rank))?;
        self.group(|g| g.drain(&w.id))?;
        let link = self.link(&w.id, &w.grpc).map_err(Status::unavailable)?;
        let mut c = link.client.clone();
        let t0 = std::time::Instant::now();
        let mut finished_at_start = None;
        loop {
            let active = match c.health(pb::WorkerHealthRequest::default()).await {
                Ok(h) => h.into_inner().active_requests,
                Err(_) => 0,
            };
            finished_at_start.get_or_insert(active);
            if active == 0 || t0.elapsed() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let moved = match c.health(pb::WorkerHealthRequest::default()).await {
            Ok(h) => h.into_inner().active_requests,
            Err(_) => 0,
        };
        self.0.membership_changed.notify_one();
        let limit = std::time::Instant::now() + REGROUP_TIMEOUT;
        loop {
            let (gone, number) = self.group(|g| (g.active().is_some_and(|a| a.rank_of(&w.id).is_none()), g.active().map_or(0, |a| a.number)));
            if gone {
                self.group(|g| g.lose(&w.id));
                let _ = c.drain(pb::DrainRequest {}).await;
                println!("worker {} (rank {rank}) drained: generation {number}", w.id);
                return Ok(pb::DrainRankResponse { generation: number, finished: finished_at_start.unwrap_or(0).saturating_sub(moved), moved });
            }
            if std::time::Instant::now() > limit {
                return Err(Status::deadline_exceeded(format!("no generation without rank {rank} within {REGROUP_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What `ClusterStatus` reports about the group.
pub(super) struct GroupStatus {
    pub active: Option<Generation>,
    pub serving: Serving,
    pub spare: usize,
    pub formed: u64,
    pub max_slots: Option<usize>,
    pub min_replicas: usize,
    pub draining: Vec<bool>,
}

fn link_to(grpc: &str) -> Result<WorkerLink, String> {
    let e = endpoint(grpc).map_err(|e| format!("{grpc}: {e}"))?;
    let client = WorkerClient::new(e.connect_timeout(Duration::from_secs(2)).connect_lazy()).max_decoding_message_size(1 << 30);
    Ok(WorkerLink { client, outstanding: Arc::new(AtomicU64::new(0)) })
}

/// How long a worker may take to join a generation (it may load experts first).
const REGROUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Health polls of every member, and how many failed polls in a row lose a worker.
const HEALTH_PERIOD: Duration = Duration::from_millis(250);
const HEALTH_FAILURES: u32 = 3;

#[tonic::async_trait]
impl Control for CoordSvc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        self.require_leader()?;
        let r = req.into_inner();
        let w = self.group(|g| g.register(r.grpc_address, r.transport_address, r.node));
        self.0.membership_changed.notify_one();
        println!("worker {} registered ({})", w.id, w.grpc);
        Ok(Response::new(pb::RegisterResponse { worker_id: w.id }))
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
        // No room for every expert: refuse at once, naming what is missing. Otherwise wait
        // for the cluster to come up (start, or a generation being formed).
        let now = self.0.serving.borrow().clone();
        let limit = if matches!(now, Serving::NoRoom { .. }) { Duration::ZERO } else { START_WAIT };
        if let Err(s) = self.wait_serving(limit).await {
            return Err(ControlError::NotServing(s.reason()).into());
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
        let active = self.active_placement();
        Ok(Response::new(pb::ModelInfoResponse {
            architecture: format!("{:?}", c.arch),
            vocab_size: c.vocab_size as u32,
            hidden_size: c.hidden_size as u32,
            num_layers: c.n_layers as u32,
            num_moe_layers: c.moe_layers().len() as u32,
            num_experts: c.router.n_experts as u32,
            top_k: c.router.top_k as u32,
            max_position_embeddings: c.max_position_embeddings as u32,
            world_size: active.as_ref().map_or(0, |a| a.1.num_ranks() as u32),
            placement_json: active.and_then(|a| serde_json::to_string(&a.1).ok()).unwrap_or_default(),
            eos_token_ids: c.eos_token_ids.clone(),
            model_path: self.0.model_dir.display().to_string(),
            ready: self.is_ready() && self.require_leader().is_ok(),
        }))
    }
}

/// How long a request waits for a cluster that is starting or re-forming before it is refused.
const START_WAIT: Duration = Duration::from_secs(120);

/// Keeps gRPC health in step with what this coordinator can do:
/// - `switchyard.v1.Control` (registration, the admin API's leader) is SERVING only on the
///   leader: the Helm chart's readiness probe checks it, so a Service in front of several
///   coordinators routes clients and registering workers to the leader only — also while the
///   cluster lacks room, so that the worker which brings the room can register;
/// - `switchyard.v1.Inference` is SERVING only on the leader while the cluster serves (every
///   expert on a live rank): NOT_SERVING on a standby, while waiting for workers, re-forming, or
///   without room;
/// - the overall "" stays SERVING while the process runs (liveness).
async fn follow_health(svc: CoordSvc, reporter: tonic_health::server::HealthReporter) {
    let mut role = svc.0.role.subscribe();
    let mut serving = svc.0.serving.subscribe();
    loop {
        let leads = *role.borrow_and_update() == Role::Leader;
        let serves = leads && serving.borrow_and_update().is_serving();
        if leads {
            reporter.set_serving::<ControlServer<CoordSvc>>().await;
        } else {
            reporter.set_not_serving::<ControlServer<CoordSvc>>().await;
        }
        if serves {
            reporter.set_serving::<InferenceServer<CoordSvc>>().await;
        } else {
            reporter.set_not_serving::<InferenceServer<CoordSvc>>().await;
        }
        tokio::select! {
            r = role.changed() => if r.is_err() { return },
            r = serving.changed() => if r.is_err() { return },
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
    let p = PlacementArgs { placement: a.placement.clone(), ..Default::default() }.resolve_with(&cfg, a.workers, a.min_replicas)?;
    // Checked here, for a clear error at start (each generation makes its own NCCL id).
    let (transport, _) = transport_setup(&a.transport)?;
    let tok = Tokenizer::from_dir(&a.model)?.map(Arc::new);
    let model_dir = std::fs::canonicalize(&a.model)?;
    let (n_moe, n_experts) = (cfg.moe_layers().len(), cfg.router.n_experts);
    // What one migration move loads (bf16 checkpoints' experts stay bf16 once loaded).
    let expert_bytes = if n_moe > 0 { Model::routed_expert_bytes(&a.model)? } else { 0 };
    let policy = a.scheduler.policy(n_moe, expert_bytes, a.min_replicas)?;
    if let Some(c) = a.scheduler.capacity_factor {
        anyhow::ensure!(c.is_finite() && c > 0.0, "--capacity-factor must be positive");
    }
    anyhow::ensure!(a.scheduler.max_batch_tokens != Some(0), "--max-batch-tokens must be at least 1");
    anyhow::ensure!(a.stats_half_life > 0.0 && a.stats_half_life.is_finite(), "--stats-half-life must be positive");
    anyhow::ensure!(a.max_slots_per_rank != Some(0), "--max-slots-per-rank must be at least 1");
    let group = Group::new(GroupSettings { min_workers: a.workers, max_slots_per_rank: a.max_slots_per_rank, min_replicas: a.min_replicas, initial: p })?;
    runtime()?.block_on(async move {
        let svc = CoordSvc(Arc::new(CoordState {
            model_dir,
            cfg,
            tok,
            serving: tokio::sync::watch::channel(group.serving()).0,
            group: Mutex::new(group),
            membership_changed: tokio::sync::Notify::new(),
            links: Mutex::new(HashMap::new()),
            apply_lock: tokio::sync::Mutex::new(()),
            listen: Mutex::new(String::new()),
            role: tokio::sync::watch::channel(Role::Standby(None)).0,
            seat: std::sync::OnceLock::new(),
            records: std::sync::OnceLock::new(),
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
        tokio::spawn(follow_health(svc.clone(), reporter));
        println!("listening on {addr}");
        if let Some(f) = &a.ready_file {
            write_ready_file(f, &serde_json::json!({"grpc_address": addr.to_string(), "pid": std::process::id()}))?;
        }
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
