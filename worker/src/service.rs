#![forbid(unsafe_code)]
//! The worker's gRPC service (`switchyard.v1.Worker`) over its [`RankLoop`], and its metrics.
//!
//! Every membership change of the expert-parallel group is a new *generation*, driven by the
//! coordinator through `Regroup`: the rank keeps the expert weights it holds, loads only the
//! ones it gains, builds the generation's mesh from its one transport listener, and hands the new
//! executor to the rank loop, which continues with its sequences and KV caches. The first
//! generation is a `Regroup` on a worker without a rank loop: it loads the model.

use crate::engine::FinishReason;
use crate::expert_parallel::{DataPath, EpExecutor, assemble_experts, experts_of_rank};
use crate::model::{LoadOptions, Model};
use crate::moe::ExpertFfn;
use crate::rank_loop::{Job, RankEvent, RankLoop, RankLoopConfig, RequestError};
use crate::sampling::SamplingParams;
use crate::transport::tcp::TcpTransport;
use crate::transport::{LocalTransport, Transport, TransportError};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_server::{Worker, WorkerServer};
use telemetry::{Counter, Gauge, Histogram, Registry, TelemetryError};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

const STEP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const ROWS_HELP: &str = "(token, expert) rows of this group generation whose dispatch and combine stayed on this rank (local) or crossed to another (remote)";
const A2A_BUCKETS: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];

/// A worker's metrics (all prefixed `switchyard_`): `step_seconds` (histogram of busy engine
/// steps), `projected_step_seconds`, `alltoall_seconds` (histogram of dispatch/combine
/// collectives), `alltoall_bytes_total`, `placement_epoch`, `group_generation`,
/// `active_requests`, `engine_steps`, `tokens_total`; the data path's counters of the current
/// group generation: `moe_rows{where="local"|"remote"}` ((token, expert) rows whose dispatch and
/// combine stayed on the rank / crossed), `moe_layer_calls`, `tokens_moved`, `kv_exchange_bytes`,
/// `kv_copy_bytes` (copies of coherence group peers' KV caches held).
pub struct WorkerMetrics {
    pub registry: Registry,
    pub step_seconds: Histogram,
    pub projected_step_seconds: Histogram,
    pub alltoall_seconds: Histogram,
    pub alltoall_bytes: Counter,
    pub epoch: Gauge,
    pub generation: Gauge,
    pub active: Gauge,
    pub steps: Gauge,
    pub tokens: Counter,
    pub rows_local: Gauge,
    pub rows_remote: Gauge,
    pub moe_layer_calls: Gauge,
    pub tokens_moved: Gauge,
    pub kv_exchange_bytes: Gauge,
    pub kv_copy_bytes: Gauge,
}

impl WorkerMetrics {
    pub fn new() -> Result<Self, TelemetryError> {
        let r = Registry::new();
        Ok(WorkerMetrics {
            step_seconds: r.histogram("switchyard_step_seconds", "Busy engine steps (forward over the batch)", &[], STEP_BUCKETS)?,
            projected_step_seconds: r.histogram(
                "switchyard_projected_step_seconds",
                "Busy steps of the expert-parallel group projected onto ranks with cores of their own (slowest rank per compute segment)",
                &[],
                STEP_BUCKETS,
            )?,
            alltoall_seconds: r.histogram("switchyard_alltoall_seconds", "Dispatch and combine all-to-all collectives", &[], A2A_BUCKETS)?,
            alltoall_bytes: r.counter("switchyard_alltoall_bytes_total", "Bytes sent to other ranks by dispatch and combine", &[])?,
            epoch: r.gauge("switchyard_placement_epoch", "Placement epoch this rank serves with", &[])?,
            generation: r.gauge("switchyard_group_generation", "Generation of the expert-parallel group this rank steps with", &[])?,
            active: r.gauge("switchyard_active_requests", "Running and waiting sequences on this rank", &[])?,
            steps: r.gauge("switchyard_engine_steps", "Engine steps since start (busy and idle)", &[])?,
            tokens: r.counter("switchyard_tokens_total", "Tokens generated on this rank", &[])?,
            rows_local: r.gauge("switchyard_moe_rows", ROWS_HELP, &[("where", "local")])?,
            rows_remote: r.gauge("switchyard_moe_rows", ROWS_HELP, &[("where", "remote")])?,
            moe_layer_calls: r.gauge("switchyard_moe_layer_calls", "MoE layers run in this group generation", &[])?,
            tokens_moved: r.gauge(
                "switchyard_tokens_moved",
                "Tokens whose MoE combine landed on another rank, this generation (affinity data path)",
                &[],
            )?,
            kv_exchange_bytes: r.gauge("switchyard_kv_exchange_bytes", "Bytes of keys and values sent to the coherence group, this generation", &[])?,
            kv_copy_bytes: r.gauge("switchyard_kv_copy_bytes", "Bytes of copies of coherence group peers' KV caches held", &[])?,
            registry: r,
        })
    }
}

/// Settings of a [`WorkerService`].
#[derive(Debug)]
pub struct WorkerConfig {
    /// The all-to-all listener, kept for the worker's lifetime: every generation's mesh is built
    /// from it (peers keep connecting to the same address).
    pub transport_listener: std::net::TcpListener,
    /// How long a collective may wait for a peer.
    pub transport_timeout: Duration,
    /// How long a generation's mesh build waits for its peers.
    pub connect_timeout: Duration,
    /// How long a rank loop whose group failed waits for a newer generation before failing its
    /// requests as retryable.
    pub regroup_timeout: Duration,
    /// GPU of the NCCL communicator (when the coordinator picks the NCCL transport).
    pub gpu: usize,
    /// Where the model computes.
    pub device: crate::backend::Device,
    /// A device backend's KV share of the memory left after the weights (default 0.8).
    pub kv_memory_share: Option<f64>,
}

impl WorkerConfig {
    /// Defaults around a bound listener: transport timeout 300 s, connect 60 s, regroup 30 s.
    pub fn new(transport_listener: std::net::TcpListener) -> Self {
        WorkerConfig {
            transport_listener,
            transport_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(60),
            regroup_timeout: Duration::from_secs(30),
            gpu: 0,
            device: crate::backend::Device::Cpu,
            kv_memory_share: None,
        }
    }
}

struct Inner {
    cfg: WorkerConfig,
    rank_loop: Mutex<Option<Arc<RankLoop>>>,
    /// The model's dense parts (shared by every generation) and the directory it came from.
    model: Mutex<Option<(PathBuf, Arc<Model>)>>,
    rank: AtomicU64,
    draining: AtomicBool,
    /// The newest generation a Regroup asked for: an older build still running gives up.
    newest: AtomicU64,
    /// One regroup builds at a time (a newer one waits for the older one to give up).
    regrouping: Mutex<()>,
    /// Health polls answered: a leader that polls counts this worker as a member.
    health_polls: AtomicU64,
    metrics: Arc<WorkerMetrics>,
}

/// The `switchyard.v1.Worker` service of one worker process.
#[derive(Clone)]
pub struct WorkerService(Arc<Inner>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Why a regroup failed, with the gRPC code it answers with.
#[derive(Debug, thiserror::Error)]
enum RegroupError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Stale(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Failed(String),
}

impl From<RegroupError> for Status {
    fn from(e: RegroupError) -> Status {
        match e {
            RegroupError::Invalid(m) => Status::invalid_argument(m),
            RegroupError::Stale(m) | RegroupError::Failed(m) => Status::failed_precondition(m),
            RegroupError::Aborted(m) => Status::aborted(m),
        }
    }
}

fn status_of(e: &RequestError) -> Status {
    match e {
        RequestError::Invalid(m) => Status::invalid_argument(m.clone()),
        RequestError::Unavailable(m) => Status::unavailable(m.clone()),
        RequestError::Internal(m) => Status::internal(m.clone()),
    }
}

/// `placement[moe_layer][rank]` of a placement JSON.
fn placement_ranks(json: &str) -> Result<Vec<Vec<Vec<usize>>>, RegroupError> {
    let p = placement::Placement::from_json(json).map_err(|e| RegroupError::Invalid(format!("placement: {e}")))?;
    Ok(p.layers.iter().map(|l| l.ranks.clone()).collect())
}

impl WorkerService {
    pub fn new(cfg: WorkerConfig, metrics: Arc<WorkerMetrics>) -> Self {
        WorkerService(Arc::new(Inner {
            cfg,
            rank_loop: Mutex::new(None),
            model: Mutex::new(None),
            rank: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            newest: AtomicU64::new(0),
            regrouping: Mutex::new(()),
            health_polls: AtomicU64::new(0),
            metrics,
        }))
    }

    /// How many health polls this worker answered (its registration watches it for silence).
    pub fn health_polls(&self) -> u64 {
        self.0.health_polls.load(Ordering::Relaxed)
    }

    /// The tonic server of this service.
    pub fn into_server(self) -> WorkerServer<WorkerService> {
        WorkerServer::new(self).max_decoding_message_size(1 << 30).max_encoding_message_size(1 << 30)
    }

    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        &self.0.metrics
    }

    fn rank_loop(&self) -> Option<Arc<RankLoop>> {
        self.0.rank_loop.lock().ok().and_then(|g| g.clone())
    }

    /// Generation the rank loop steps with (0: no rank loop yet).
    pub fn generation(&self) -> u64 {
        self.rank_loop().map_or(0, |rl| rl.stats.generation.load(Ordering::SeqCst))
    }

    /// Stop the rank loop at once (its requests fail as retryable, the peers see its connections
    /// close): the worker process is going away.
    pub fn shutdown(&self) {
        let rl = self.0.rank_loop.lock().ok().and_then(|mut g| g.take());
        if let Some(rl) = rl {
            rl.shutdown();
        }
    }

    /// Mirror the rank loop's counters into the gauges (call it every second or so).
    pub fn refresh_gauges(&self) {
        let Some(rl) = self.rank_loop() else { return };
        let m = &self.0.metrics;
        m.active.set(rl.stats.active.load(Ordering::Relaxed) as f64);
        m.steps.set(rl.stats.steps.load(Ordering::Relaxed) as f64);
        m.generation.set(rl.stats.generation.load(Ordering::SeqCst) as f64);
        let ex = rl.executor();
        m.epoch.set(ex.epoch() as f64);
        let t = &ex.timers;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        m.rows_local.set(g(&t.local_rows));
        m.rows_remote.set(g(&t.remote_rows));
        m.moe_layer_calls.set(g(&t.moe_layer_calls));
        m.tokens_moved.set(g(&t.tokens_moved));
        m.kv_exchange_bytes.set(g(&t.kv_gather_bytes));
        m.kv_copy_bytes.set(g(&t.kv_mirror_bytes));
    }

    fn executor(&self) -> Result<Arc<EpExecutor>, Status> {
        self.rank_loop().map(|rl| rl.executor()).ok_or_else(|| Status::unavailable("worker not started (no generation yet)"))
    }

    /// Join generation `generation` (see the module docs). Blocking: call it off the async
    /// runtime's threads.
    fn regroup_blocking(&self, generation: u64, a: pb::Assignment) -> Result<pb::RegroupResponse, RegroupError> {
        let st = &self.0;
        let _one = st.regrouping.lock().map_err(|_| RegroupError::Failed("regroup lock poisoned".into()))?;
        let cancelled = || st.newest.load(Ordering::SeqCst) != generation;
        let superseded = || RegroupError::Aborted(format!("generation {generation} was superseded by {}", st.newest.load(Ordering::SeqCst)));
        if cancelled() {
            return Err(superseded());
        }
        let ranks = placement_ranks(&a.placement_json)?;
        let (rank, world) = (a.rank as usize, a.world_size as usize);
        if a.peer_addresses.len() != world || rank >= world {
            return Err(RegroupError::Invalid(format!("assignment: rank {rank}, world {world}, {} peers", a.peer_addresses.len())));
        }
        let dir = PathBuf::from(&a.model_path);
        let mine = experts_of_rank(&ranks, rank);
        let current = self.rank_loop();
        let (model, experts, loaded, kept, loaded_bytes) = match &current {
            Some(rl) => {
                let model = match st.model.lock().ok().and_then(|m| m.clone()) {
                    Some((d, m)) if d == dir => m,
                    Some((d, _)) => {
                        return Err(RegroupError::Invalid(format!("model {} is not the model {} this worker serves", dir.display(), d.display())));
                    }
                    None => return Err(RegroupError::Failed("rank loop without a model".into())),
                };
                let old = rl.executor();
                let n_e = model.config.router.n_experts;
                let got = assemble_experts(&old.expert_weights(), &mine, n_e, &dir, old.background_cpu())
                    .map_err(|e| RegroupError::Failed(format!("loading the experts of generation {generation}: {e}")))?;
                (model, got.experts, got.loaded, got.kept, got.loaded_bytes)
            }
            None => {
                let mut m = Model::load(&dir, &LoadOptions { experts: Some(mine) })
                    .map_err(|e| RegroupError::Failed(format!("loading {}: {e}", dir.display())))?;
                let experts: Vec<Vec<Option<Arc<ExpertFfn>>>> =
                    m.take_routed_experts().into_iter().map(|l| l.into_iter().map(|e| e.map(Arc::new)).collect()).collect();
                let n = experts.iter().flatten().flatten().count();
                let bytes = experts.iter().flatten().flatten().map(|w| w.bytes() as u64).sum();
                (Arc::new(m), experts, n, 0, bytes)
            }
        };
        crate::failpoint::check(&format!("worker.regroup.generation{generation}")).map_err(|e| RegroupError::Failed(e.to_string()))?;
        if cancelled() {
            return Err(superseded());
        }
        let transport = self.transport(generation, &a, &cancelled).map_err(|e| match e {
            TransportError::Cancelled { .. } => superseded(),
            e => RegroupError::Failed(format!("generation {generation}: {e}")),
        })?;
        let n_e = model.config.router.n_experts;
        let nodes: Vec<usize> = a.peer_nodes.iter().map(|&n| n as usize).collect();
        let ex = EpExecutor::with_weights(transport, &ranks, n_e, nodes, experts, a.epoch.max(1), generation)
            .map_err(|e| RegroupError::Invalid(e.to_string()))?;
        ex.set_load_aware(a.load_aware_replicas);
        ex.set_capacity_factor((a.capacity_factor > 0.0).then_some(a.capacity_factor));
        let path = if a.data_path.is_empty() { Ok(DataPath::Home) } else { DataPath::parse(&a.data_path) };
        ex.set_data_path(path.map_err(RegroupError::Invalid)?);
        self.observe(&ex);
        let ex = Arc::new(ex);
        if cancelled() {
            return Err(superseded());
        }
        let kept_sequences = match &current {
            Some(rl) => {
                let kept = rl.regroup(ex, Duration::from_secs(10)).map_err(|e| RegroupError::Stale(e.to_string()))?;
                kept.unwrap_or_else(|| rl.stats.active.load(Ordering::Relaxed) as u32)
            }
            None => {
                // The rank's slots go to a device at its first step (and with each epoch): room for them.
                let opts = crate::backend::OpenOptions { reserve_bytes: loaded_bytes, max_kv_tokens: None, kv_memory_share: self.0.cfg.kv_memory_share };
                let backend = crate::backend::open_with(self.0.cfg.device, model.clone(), &opts).map_err(|e| RegroupError::Failed(e.to_string()))?;
                let rl = RankLoop::spawn(backend, ex, self.loop_config(&a));
                *st.model.lock().map_err(|_| RegroupError::Failed("model lock poisoned".into()))? = Some((dir, model));
                *st.rank_loop.lock().map_err(|_| RegroupError::Failed("rank loop lock poisoned".into()))? = Some(Arc::new(rl));
                0
            }
        };
        st.rank.store(rank as u64, Ordering::SeqCst);
        tracing::info!(generation, rank, world, loaded, kept, kept_sequences, "regrouped");
        Ok(pb::RegroupResponse {
            generation,
            loaded_experts: loaded as u32,
            kept_experts: kept as u32,
            loaded_bytes,
            kept_sequences,
        })
    }

    /// The mesh of `generation`.
    fn transport(&self, generation: u64, a: &pb::Assignment, cancelled: &dyn Fn() -> bool) -> Result<Box<dyn Transport>, TransportError> {
        let (rank, world) = (a.rank as usize, a.world_size as usize);
        if world == 1 {
            return Ok(Box::new(LocalTransport));
        }
        match a.transport.as_str() {
            "tcp" | "" => {
                let l = self.0.cfg.transport_listener.try_clone().map_err(|e| TransportError::Setup(format!("transport listener: {e}")))?;
                let c = &self.0.cfg;
                let t = TcpTransport::connect_generation(rank, &l, &a.peer_addresses, generation, c.connect_timeout, c.transport_timeout, cancelled)?;
                Ok(Box::new(t))
            }
            "nccl" => nccl_transport(self.0.cfg.gpu, rank, world, &a.nccl_unique_id),
            other => Err(TransportError::Setup(format!("unknown transport {other:?} (tcp or nccl)"))),
        }
    }

    /// Metrics hear the executor's collectives and projected steps.
    fn observe(&self, ex: &EpExecutor) {
        let m = self.0.metrics.clone();
        ex.set_observer(Arc::new(move |d: Duration, bytes: u64| {
            m.alltoall_seconds.observe(d.as_secs_f64());
            m.alltoall_bytes.inc_by(bytes);
        }));
        let m = self.0.metrics.clone();
        ex.set_projected_observer(Arc::new(move |d: Duration| m.projected_step_seconds.observe(d.as_secs_f64())));
    }

    fn loop_config(&self, a: &pb::Assignment) -> RankLoopConfig {
        let m = self.0.metrics.clone();
        let mut cfg = RankLoopConfig {
            regroup_timeout: self.0.cfg.regroup_timeout,
            on_step: Some(Arc::new(move |d: Duration| m.step_seconds.observe(d.as_secs_f64()))),
            ..Default::default()
        };
        if a.max_batch_tokens > 0 {
            cfg.engine.max_batch_tokens = a.max_batch_tokens as usize;
        }
        cfg
    }
}

#[cfg(feature = "cuda")]
fn nccl_transport(gpu: usize, rank: usize, world: usize, id: &[u8]) -> Result<Box<dyn Transport>, TransportError> {
    Ok(Box::new(crate::transport::nccl::NcclTransport::new(gpu, rank, world, id)?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_transport(_gpu: usize, _rank: usize, _world: usize, _id: &[u8]) -> Result<Box<dyn Transport>, TransportError> {
    Err(TransportError::Setup("the coordinator chose the NCCL transport, but this worker was built without the `cuda` feature".into()))
}

/// The most alternatives a token's log-probabilities list (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

fn finish_code(f: Option<FinishReason>) -> pb::FinishReason {
    match f {
        None | Some(FinishReason::Aborted) => pb::FinishReason::Unspecified,
        Some(FinishReason::Stop) => pb::FinishReason::Stop,
        Some(FinishReason::Length) => pb::FinishReason::Length,
        Some(FinishReason::ContextFull) => pb::FinishReason::ContextFull,
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = BoxStream<pb::GenerateResponse>;

    async fn regroup(&self, req: Request<pb::RegroupRequest>) -> Result<Response<pb::RegroupResponse>, Status> {
        let r = req.into_inner();
        let a = r.assignment.ok_or_else(|| Status::invalid_argument("no assignment"))?;
        let g = r.generation;
        if g == 0 {
            return Err(Status::invalid_argument("generation 0 (generations start at 1)"));
        }
        // The newest generation asked for wins: an older build still waiting for its peers sees
        // this and gives up.
        let newest = self.0.newest.fetch_max(g, Ordering::SeqCst);
        if newest >= g {
            return Err(Status::failed_precondition(format!("stale generation {g}: this worker is at generation {newest}")));
        }
        let svc = self.clone();
        let done = tokio::task::spawn_blocking(move || svc.regroup_blocking(g, a)).await.map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(done))
    }

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        if self.0.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("worker is draining"));
        }
        let r = req.into_inner();
        let prompt = match r.prompt {
            Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids,
            _ => return Err(Status::invalid_argument("workers take token ids")),
        };
        let s = r.sampling.unwrap_or_default();
        let request = crate::Request {
            prompt,
            max_tokens: r.max_tokens as usize,
            sampling: SamplingParams {
                temperature: s.temperature,
                top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
                top_k: s.top_k as usize,
                seed: s.seed,
            },
            stop_tokens: r.stop_token_ids,
            logprobs: r.logprobs.then_some(r.top_logprobs.min(MAX_TOP_LOGPROBS) as usize),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // Closed once the response stream is dropped (the coordinator cancelled the request).
        let probe = tx.clone();
        let gone: crate::rank_loop::GoneProbe = Box::new(move || probe.is_closed());
        let rank = self.0.rank.load(Ordering::SeqCst) as u32;
        let tokens = self.0.metrics.tokens.clone();
        let sink = Box::new(move |ev: RankEvent| {
            let msg = match ev {
                RankEvent::PromptLogits(l) => Ok(pb::GenerateResponse { prompt_logits: l, rank, ..Default::default() }),
                RankEvent::Token { token, index, finished, logprobs } => {
                    tokens.inc();
                    let lp = logprobs.unwrap_or_default();
                    Ok(pb::GenerateResponse {
                        token_id: token,
                        index: index as u32,
                        finish_reason: finish_code(finished) as i32,
                        rank,
                        logprob: lp.logprob,
                        top_logprobs: lp.top.into_iter().map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob, text: String::new() }).collect(),
                        ..Default::default()
                    })
                }
                RankEvent::Error(e) => Err(status_of(&e)),
            };
            tx.send(msg).is_ok()
        });
        let Some(rl) = self.rank_loop() else { return Err(Status::unavailable("worker not started (no generation yet)")) };
        rl.jobs
            .send(Job { request, prompt_logits: r.return_prompt_logits, sink, gone: Some(gone) })
            .map_err(|_| Status::unavailable("worker loop stopped"))?;
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn prepare(&self, req: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
        let r = req.into_inner();
        let svc = self.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<pb::PrepareResponse, Status> {
            let ranks = placement_ranks(&r.placement_json)?;
            let ex = svc.executor()?;
            let dir = svc.0.model.lock().ok().and_then(|m| m.as_ref().map(|(d, _)| d.clone()));
            let dir = dir.ok_or_else(|| Status::unavailable("worker not started"))?;
            let done = ex.prepare(r.epoch, &ranks, &dir).map_err(|e| Status::failed_precondition(e.to_string()))?;
            Ok(pb::PrepareResponse { epoch: done.epoch, loaded: done.loaded as u32, kept: done.kept as u32 })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(done))
    }

    async fn commit(&self, req: Request<pb::CommitRequest>) -> Result<Response<pb::CommitResponse>, Status> {
        let epoch = req.into_inner().epoch;
        self.executor()?.commit(epoch).map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::CommitResponse {}))
    }

    async fn abort(&self, req: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let epoch = req.into_inner().epoch;
        let dropped = self.executor()?.abort(epoch).map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::AbortResponse { dropped }))
    }

    async fn drain(&self, _req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        self.0.draining.store(true, Ordering::SeqCst);
        let remaining = self.rank_loop().map_or(0, |rl| rl.stats.active.load(Ordering::Relaxed));
        Ok(Response::new(pb::DrainResponse { remaining: remaining as u32 }))
    }

    async fn health(&self, req: Request<pb::WorkerHealthRequest>) -> Result<Response<pb::WorkerHealthResponse>, Status> {
        let take_steps = req.into_inner().take_steps;
        self.0.health_polls.fetch_add(1, Ordering::Relaxed);
        let mut h = pb::WorkerHealthResponse {
            rank: self.0.rank.load(Ordering::SeqCst) as u32,
            newest_generation: self.0.newest.load(Ordering::SeqCst),
            ..Default::default()
        };
        let Some(rl) = self.rank_loop() else { return Ok(Response::new(h)) };
        let s = &rl.stats;
        h.serving = !self.0.draining.load(Ordering::SeqCst);
        h.active_requests = s.active.load(Ordering::Relaxed) as u32;
        h.steps = s.steps.load(Ordering::Relaxed);
        h.busy_steps = s.busy_steps.load(Ordering::Relaxed);
        h.forward_us = s.forward_us.load(Ordering::Relaxed);
        h.degraded = false;
        h.paused = s.paused.load(Ordering::SeqCst);
        h.generation = s.generation.load(Ordering::SeqCst);
        if take_steps {
            h.recent_step_us = s.recent_steps.take();
        }
        h.expert_load = s.expert_load.lock().map(|v| v.clone()).unwrap_or_default();
        h.transport_error = s.transport_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
        let ex = rl.executor();
        h.world_size = ex.world() as u32;
        h.loaded_expert_bytes = ex.loaded_expert_bytes();
        h.epoch = ex.epoch();
        h.prepared_epoch = ex.prepared_epoch().unwrap_or(0);
        h.dispatch_us = ex.timers.dispatch_us.load(Ordering::Relaxed);
        h.expert_us = ex.timers.expert_us.load(Ordering::Relaxed);
        h.combine_us = ex.timers.combine_us.load(Ordering::Relaxed);
        h.capacity_rerouted = ex.timers.rerouted_rows.load(Ordering::Relaxed);
        h.capacity_dropped = ex.timers.dropped_rows.load(Ordering::Relaxed);
        let t = &ex.timers;
        h.alltoall_bytes = t.alltoall_bytes.load(Ordering::Relaxed);
        h.kv_exchange_bytes = t.kv_gather_bytes.load(Ordering::Relaxed);
        h.local_rows = t.local_rows.load(Ordering::Relaxed);
        h.remote_rows = t.remote_rows.load(Ordering::Relaxed);
        h.moe_layer_calls = t.moe_layer_calls.load(Ordering::Relaxed);
        h.tokens_moved = t.tokens_moved.load(Ordering::Relaxed);
        h.kv_copy_bytes = t.kv_mirror_bytes.load(Ordering::Relaxed);
        h.data_path = ex.data_path().name();
        if take_steps {
            h.recent_projected_step_us = ex.take_projected_steps();
        }
        Ok(Response::new(h))
    }
}
