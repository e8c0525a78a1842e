//! The coordinator's gRPC server: a tokio adapter over the control plane ([`crate::control`]).
//!
//! It serves the client API (`switchyard.v1.Inference`, gRPC health, reflection), the `Control`
//! service workers register with, and the admin API ([`admin`]). Registrations, lease expiries
//! and failed health checks feed the [`Group`]; the generation driver ([`generations`]) carries
//! out every generation it plans (`Worker.Regroup` on every rank, in parallel) and records it in
//! the store in order. Requests ([`requests`]) go to the routable rank with the least outstanding
//! tokens and continue on another rank from where they stopped when theirs fails. [`serve`] runs
//! it all; `switchyard coordinator` only parses flags and calls it.
use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_client::WorkerClient;
use tokio_stream::Stream;
use tonic::Status;
use tonic::transport::Channel;
use worker::ModelConfig;
use worker::expert_parallel::RecentSteps;
use worker::tokenizer::Tokenizer;

use crate::control::record::{self, GenerationRecord, Recorded};
use crate::control::{ControlError, Generation, Group, Serving, WorkerId};
use crate::store::{AnyStore, StoreError};
use crate::tls::endpoint;
use ha::{Role, Seat, with_store_retries};
use metrics::CoordMetrics;

pub mod admin;
mod admission;
mod generations;
pub mod ha;
pub mod metrics;
mod output;
mod requests;
mod serve;
mod start;

pub use admin::AdminAuth;
pub use requests::continuation;
pub use serve::{CoordinatorConfig, serve};

/// A server stream of gRPC responses.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Why the coordinator's server stopped or could not start. Each has a stable [`code`](Self::code).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid settings: {0}")]
    Config(String),
    #[error("state store {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("metrics: {0}")]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("the NCCL transport: {0}")]
    Transport(String),
    #[error("lost the coordinator lease ({0}); exiting so that a single leader acts")]
    LeaseLost(String),
}

impl ServerError {
    pub fn code(&self) -> &'static str {
        match self {
            ServerError::Config(_) => "SERVER_CONFIG",
            ServerError::Store { source, .. } => source.code(),
            ServerError::Control(e) => e.code(),
            ServerError::Telemetry(_) => "SERVER_TELEMETRY",
            ServerError::Grpc(_) => "SERVER_GRPC",
            ServerError::Reflection(_) => "SERVER_REFLECTION",
            ServerError::Tls(_) => "SERVER_TLS",
            ServerError::Transport(_) => "SERVER_TRANSPORT",
            ServerError::LeaseLost(_) => "SERVER_LEASE_LOST",
        }
    }
}

/// What the coordinator hands every worker to build its all-to-all: the kind, and for NCCL a
/// unique id made here (every rank of a generation joins the same communicator).
pub fn transport_setup(kind: &str) -> Result<(String, Vec<u8>), ServerError> {
    match kind {
        "tcp" => Ok(("tcp".into(), Vec::new())),
        #[cfg(feature = "cuda")]
        "nccl" => Ok(("nccl".into(), worker::transport::nccl::new_unique_id().map_err(|e| ServerError::Transport(e.to_string()))?)),
        #[cfg(not(feature = "cuda"))]
        "nccl" => Err(ServerError::Config("--transport nccl needs a build with the `cuda` feature (cargo build --features cuda)".into())),
        other => Err(ServerError::Config(format!("unknown transport {other:?} (tcp or nccl)"))),
    }
}

/// gRPC health and reflection services for a server of this binary.
pub struct HealthAndReflection<H, R1, R0> {
    pub health: tonic_health::pb::health_server::HealthServer<H>,
    /// `grpc.reflection.v1` (grpcurl, Postman, tonic clients).
    pub reflection_v1: tonic_reflection::server::v1::ServerReflectionServer<R1>,
    /// `grpc.reflection.v1alpha`: the only one Python's `grpcio-reflection` (1.85) and the
    /// clients built on it speak.
    pub reflection_v1alpha: tonic_reflection::server::v1alpha::ServerReflectionServer<R0>,
    pub reporter: tonic_health::server::HealthReporter,
}

/// gRPC health and reflection (`v1` and `v1alpha`) services for a server of this binary.
pub fn health_and_reflection() -> Result<
    HealthAndReflection<
        impl tonic_health::pb::health_server::Health,
        impl tonic_reflection::server::v1::ServerReflection,
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    ServerError,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(HealthAndReflection { health, reflection_v1: builder().build_v1()?, reflection_v1alpha: builder().build_v1alpha()?, reporter })
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
pub(crate) struct WorkerLink {
    client: WorkerClient<Channel>,
    /// Tokens requested and not yet streamed from this worker (request routing).
    outstanding: Arc<AtomicU64>,
}

/// One rank of the active generation, as request routing sees it.
#[derive(Clone)]
pub(crate) struct RankRoute {
    pub rank: usize,
    pub id: WorkerId,
    client: WorkerClient<Channel>,
    outstanding: Arc<AtomicU64>,
}

impl RankRoute {
    pub(crate) fn client(&self) -> WorkerClient<Channel> {
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
    data_path: worker::expert_parallel::DataPath,
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
    /// The bound on requests held at once (`--max-queued-requests`).
    admission: admission::Admission,
}

#[derive(Clone)]
pub struct CoordSvc(Arc<CoordState>);

/// Checks a placement against the model and the number of ranks (`origin` names it in errors).
pub fn check_placement(p: &placement::Placement, cfg: &ModelConfig, ranks: usize, origin: &str) -> Result<(), ControlError> {
    let (n_l, n_e) = (cfg.moe_layers().len(), cfg.router.n_experts);
    if p.num_layers != n_l || p.num_experts != n_e {
        return Err(ControlError::InvalidPlacement(format!(
            "{origin} has {} MoE layers x {} experts, the model has {n_l} x {n_e}",
            p.num_layers, p.num_experts
        )));
    }
    if p.num_ranks() != ranks {
        return Err(ControlError::InvalidPlacement(format!("{origin} is for {} ranks, the group has {ranks}", p.num_ranks())));
    }
    Ok(())
}

/// Store writes of the leader, carried out in order by one task: serving never waits on the
/// store, and a later write can never land before an earlier one (each is a compare-and-swap
/// that refuses to go backwards, see `control::record`).
struct RecordQueue(tokio::sync::mpsc::UnboundedSender<GenerationRecord>);

impl RecordQueue {
    pub(crate) fn spawn(store: AnyStore) -> Self {
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
    pub(crate) fn require_leader(&self) -> Result<(), Status> {
        match &*self.0.role.borrow() {
            Role::Leader => Ok(()),
            Role::Standby(l) => Err(ControlError::NotLeader { leader: l.clone() }.into()),
        }
    }

    pub(crate) fn group<T>(&self, f: impl FnOnce(&mut Group) -> T) -> T {
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
    pub(crate) fn record_active(&self) {
        let Some(rec) = self.group(|g| g.active().map(|a| GenerationRecord::of(a, &self.0.model_dir.display().to_string(), &self.0.transport)))
        else {
            return;
        };
        if let Some(q) = self.0.records.get() {
            let _ = q.0.send(rec);
        }
    }

}

impl CoordSvc {
    /// The active generation's placement epoch and placement.
    pub(crate) fn active_placement(&self) -> Option<(u64, placement::Placement)> {
        self.group(|g| g.active().map(|a| (a.epoch, a.placement.clone())))
    }

    /// A placement epoch committed within the active generation.
    pub(crate) fn epoch_committed(&self, epoch: u64, p: placement::Placement) -> Result<(), ControlError> {
        self.group(|g| g.epoch_committed(epoch, p))?;
        self.record_active();
        Ok(())
    }

    pub(crate) fn apply_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.0.apply_lock
    }

    pub(crate) fn model_config(&self) -> &ModelConfig {
        &self.0.cfg
    }

    pub(crate) fn tokenizer(&self) -> Option<&Tokenizer> {
        self.0.tok.as_deref()
    }

    pub(crate) fn model_dir(&self) -> &std::path::Path {
        &self.0.model_dir
    }

    /// Leads and serves: what new requests need.
    pub(crate) fn takes_requests(&self) -> Result<(), Status> {
        self.require_leader()?;
        match &*self.0.serving.borrow() {
            s if s.is_serving() => Ok(()),
            s => Err(ControlError::NotServing(s.reason()).into()),
        }
    }

    pub(crate) fn listen_addr(&self) -> String {
        self.0.listen.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.0.serving.borrow().is_serving()
    }

    /// A snapshot of the group for `ClusterStatus`.
    pub(crate) fn group_status(&self) -> GroupStatus {
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
    pub(crate) fn client_of(&self, id: &str, grpc: &str) -> Option<WorkerClient<Channel>> {
        self.link(id, grpc).ok().map(|l| l.client)
    }

    /// Clients of every rank of the active generation (placement changes need all of them).
    pub(crate) fn rank_clients(&self) -> Result<(u64, Vec<WorkerClient<Channel>>), Status> {
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
    pub(crate) async fn drain_rank(&self, rank: usize, deadline: Duration) -> Result<pb::DrainRankResponse, Status> {
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
pub(crate) struct GroupStatus {
    pub(crate) active: Option<Generation>,
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
/// Health polls of every member (how many failed polls lose one: `control::health`).
const HEALTH_PERIOD: Duration = Duration::from_millis(250);
