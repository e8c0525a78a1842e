//! `switchyard worker`: the worker process's gRPC service (`switchyard.v1.Worker`) over its rank
//! loop, registration with the coordinator and the membership lease.
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_proto::v1 as pb;
use super::cluster::{BoxStream, ServeArgs, connect_channel, exit_on_stdin_eof, health_and_reflection, placement_ranks, runtime};
use super::metrics::WorkerMetrics;
use coordinator::store::typed::{self, Member};
use coordinator::store::{AnyStore, StateStore};
use switchyard_proto::v1::control_client::ControlClient;
use switchyard_proto::v1::worker_server::{Worker, WorkerServer};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};
use worker::engine::FinishReason;
use worker::expert_parallel::{EpExecutor, Job, RankEvent, RankLoop, RankLoopConfig, experts_of_rank};
use worker::model::{LoadOptions, Model};
use worker::sampling::SamplingParams;
use worker::transport::tcp::TcpTransport;

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// Coordinator address (host:port or http://host:port); several, comma separated, are tried
    /// in turn until the leader accepts the registration.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    pub coordinator: String,
    /// State store to hold this worker's membership lease in (`etcd://HOST:PORT/PREFIX`, the
    /// coordinators' store): when the worker dies, its lease expires and the leader stops
    /// routing to it. Without one the leader notices through failed health checks.
    #[arg(long, env = "SWITCHYARD_STORE")]
    pub store: Option<String>,
    /// Seconds of the membership lease.
    #[arg(long, env = "SWITCHYARD_LEASE_TTL", default_value_t = 3)]
    pub lease_ttl: u64,
    /// gRPC address registered with the coordinator (default: the bound --listen address; on
    /// Kubernetes the pod's DNS name).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    pub advertise: Option<String>,
    /// All-to-all address the peers connect to (default: the bound --transport-listen address).
    #[arg(long, env = "SWITCHYARD_TRANSPORT_ADVERTISE")]
    pub transport_advertise: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// gRPC listen address of this worker.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// All-to-all transport listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub transport_listen: String,
    /// Node (machine) name, for replica choice.
    #[arg(long, default_value = "local")]
    pub node: String,
    /// Seconds a collective may wait for a peer.
    #[arg(long, default_value_t = 300)]
    pub transport_timeout: u64,
    /// GPU this worker's NCCL communicator uses (when the coordinator picks the NCCL transport).
    #[arg(long, env = "SWITCHYARD_GPU", default_value_t = 0)]
    pub gpu: usize,
    /// Compute threads of this worker (its rayon pool; default: one per core). Ranks that share
    /// a machine should split its cores between them instead of each taking all of them.
    #[arg(long, env = "SWITCHYARD_THREADS")]
    pub threads: Option<usize>,
    /// Exit when stdin closes (used by `switchyard up`).
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
}

struct WorkerState {
    transport_listener: Mutex<Option<std::net::TcpListener>>,
    rank_loop: Mutex<Option<RankLoop>>,
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    rank: AtomicU64,
    draining: AtomicBool,
    transport_timeout: Duration,
    gpu: usize,
    /// Model directory of the assignment (placement changes read new slots from it).
    model_dir: Mutex<Option<PathBuf>>,
    /// Placement epoch of a single-rank group (no expert-parallel executor: it holds every
    /// expert, so a placement change only moves the epoch).
    solo_epoch: AtomicU64,
    metrics: Arc<WorkerMetrics>,
}

#[derive(Clone)]
struct WorkerSvc(Arc<WorkerState>);

impl WorkerState {
    /// The expert-parallel executor of a started multi-rank group (`None` for a single rank);
    /// an error once the group broke up (placement changes need every rank).
    fn executor(&self) -> Result<Option<Arc<EpExecutor>>, Status> {
        let g = self.rank_loop.lock().map_err(|e| Status::internal(e.to_string()))?;
        let Some(rl) = g.as_ref() else { return Err(Status::unavailable("worker not started")) };
        if rl.stats.degraded.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition("the expert-parallel group broke up; this rank serves alone"));
        }
        Ok(rl.executor.clone())
    }
}

fn start_rank(st: &WorkerState, a: pb::Assignment) -> Result<u32, String> {
    let p = placement::Placement::from_json(&a.placement_json).map_err(|e| format!("placement: {e}"))?;
    let ranks = placement_ranks(&p);
    let rank = a.rank as usize;
    let world = a.world_size as usize;
    if a.peer_addresses.len() != world || rank >= world {
        return Err(format!("assignment: rank {rank}, world {world}, {} peers", a.peer_addresses.len()));
    }
    let dir = PathBuf::from(&a.model_path);
    let mine = experts_of_rank(&ranks, rank);
    let slots = mine.first().map_or(0, |v| v.len()) as u32;
    let mut model = Model::load(&dir, &LoadOptions { experts: Some(mine) }).map_err(|e| format!("loading {}: {e}", dir.display()))?;
    let n_e = model.config.router.n_experts;
    let executor = if world > 1 {
        let t: Box<dyn worker::transport::Transport> = match a.transport.as_str() {
            "tcp" | "" => {
                let listener = st.transport_listener.lock().map_err(|e| e.to_string())?.take().ok_or("already started")?;
                Box::new(
                    TcpTransport::connect(rank, listener, &a.peer_addresses, Duration::from_secs(60), st.transport_timeout)
                        .map_err(|e| e.to_string())?,
                )
            }
            "nccl" => nccl_transport(st.gpu, rank, world, &a.nccl_unique_id)?,
            other => return Err(format!("unknown transport {other:?} (tcp or nccl)")),
        };
        let nodes: Vec<usize> = a.peer_nodes.iter().map(|&n| n as usize).collect();
        let experts = model.take_routed_experts();
        let ex = EpExecutor::new(t, &ranks, n_e, nodes, experts).map_err(|e| e.to_string())?;
        ex.set_load_aware(a.load_aware_replicas);
        ex.set_capacity_factor((a.capacity_factor > 0.0).then_some(a.capacity_factor));
        Some(Arc::new(ex))
    } else {
        None
    };
    *st.model_dir.lock().map_err(|e| e.to_string())? = Some(dir.clone());
    st.solo_epoch.store(a.epoch.max(1), Ordering::SeqCst);
    let metrics = st.metrics.clone();
    let on_step: Arc<dyn Fn(Duration) + Send + Sync> = Arc::new(move |d: Duration| metrics.step_seconds.observe(d.as_secs_f64()));
    if let Some(ex) = &executor {
        let metrics = st.metrics.clone();
        ex.set_observer(Arc::new(move |d: Duration, bytes: u64| {
            metrics.alltoall_seconds.observe(d.as_secs_f64());
            metrics.alltoall_bytes.inc_by(bytes);
        }));
        let metrics = st.metrics.clone();
        ex.set_projected_observer(Arc::new(move |d: Duration| metrics.projected_step_seconds.observe(d.as_secs_f64())));
    }
    let mut cfg = RankLoopConfig { model_dir: Some(dir), on_step: Some(on_step), ..Default::default() };
    if a.max_batch_tokens > 0 {
        cfg.engine.max_batch_tokens = a.max_batch_tokens as usize;
    }
    let rl = RankLoop::spawn(Arc::new(model), executor, cfg);
    *st.jobs.lock().map_err(|e| e.to_string())? = Some(rl.jobs.clone());
    *st.rank_loop.lock().map_err(|e| e.to_string())? = Some(rl);
    st.rank.store(rank as u64, Ordering::SeqCst);
    Ok(slots)
}

#[cfg(feature = "cuda")]
fn nccl_transport(gpu: usize, rank: usize, world: usize, id: &[u8]) -> Result<Box<dyn worker::transport::Transport>, String> {
    let t = worker::transport::nccl::NcclTransport::new(gpu, rank, world, id).map_err(|e| e.to_string())?;
    Ok(Box::new(t))
}

#[cfg(not(feature = "cuda"))]
fn nccl_transport(_gpu: usize, _rank: usize, _world: usize, _id: &[u8]) -> Result<Box<dyn worker::transport::Transport>, String> {
    Err("the coordinator chose the NCCL transport, but this worker was built without the `cuda` feature".into())
}

#[tonic::async_trait]
impl Worker for WorkerSvc {
    type GenerateStream = BoxStream<pb::GenerateResponse>;

    async fn start(&self, req: Request<pb::StartRequest>) -> Result<Response<pb::StartResponse>, Status> {
        let a = req.into_inner().assignment.ok_or_else(|| Status::invalid_argument("no assignment"))?;
        let st = self.0.clone();
        let slots = tokio::task::spawn_blocking(move || start_rank(&st, a))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::StartResponse { loaded_slots: slots }))
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
        let request = worker::Request {
            prompt,
            max_tokens: r.max_tokens as usize,
            sampling: SamplingParams {
                temperature: s.temperature,
                top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
                top_k: s.top_k as usize,
                seed: s.seed,
            },
            stop_tokens: r.stop_token_ids,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let rank = self.0.rank.load(Ordering::SeqCst) as u32;
        let tokens = self.0.metrics.tokens.clone();
        let sink = Box::new(move |ev: RankEvent| {
            if matches!(ev, RankEvent::Token { .. }) {
                tokens.inc();
            }
            let msg = match ev {
                RankEvent::PromptLogits(l) => Ok(pb::GenerateResponse { prompt_logits: l, rank, ..Default::default() }),
                RankEvent::Token { token, index, finished } => Ok(pb::GenerateResponse {
                    token_id: token,
                    index: index as u32,
                    finish_reason: finish_code(finished) as i32,
                    rank,
                    ..Default::default()
                }),
                RankEvent::Error(m) => {
                    if m.contains("expert parallel") || m.contains("worker stopped") {
                        Err(Status::unavailable(m))
                    } else {
                        Err(Status::invalid_argument(m))
                    }
                }
            };
            tx.send(msg).is_ok()
        });
        let jobs = self.0.jobs.lock().map_err(|e| Status::internal(e.to_string()))?.clone();
        let Some(jobs) = jobs else { return Err(Status::unavailable("worker not started")) };
        jobs.send(Job { request, prompt_logits: r.return_prompt_logits, sink })
            .map_err(|_| Status::unavailable("worker loop stopped"))?;
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn prepare(&self, req: Request<pb::PrepareRequest>) -> Result<Response<pb::PrepareResponse>, Status> {
        let r = req.into_inner();
        let st = self.0.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<pb::PrepareResponse, Status> {
            let p = placement::Placement::from_json(&r.placement_json)
                .map_err(|e| Status::invalid_argument(format!("placement: {e}")))?;
            let ranks = placement_ranks(&p);
            match st.executor()? {
                Some(ex) => {
                    let dir = st.model_dir.lock().ok().and_then(|d| d.clone()).ok_or_else(|| Status::unavailable("worker not started"))?;
                    let done = ex.prepare(r.epoch, &ranks, &dir).map_err(|e| Status::failed_precondition(e.to_string()))?;
                    Ok(pb::PrepareResponse { epoch: done.epoch, loaded: done.loaded as u32, kept: done.kept as u32 })
                }
                None => {
                    if ranks.first().is_some_and(|l| l.len() != 1) {
                        return Err(Status::failed_precondition("a single-rank group takes one-rank placements"));
                    }
                    Ok(pb::PrepareResponse { epoch: r.epoch, loaded: 0, kept: 0 })
                }
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(done))
    }

    async fn commit(&self, req: Request<pb::CommitRequest>) -> Result<Response<pb::CommitResponse>, Status> {
        let epoch = req.into_inner().epoch;
        match self.0.executor()? {
            Some(ex) => ex.commit(epoch).map_err(|e| Status::failed_precondition(e.to_string()))?,
            None => self.0.solo_epoch.store(epoch, Ordering::SeqCst),
        }
        Ok(Response::new(pb::CommitResponse {}))
    }

    async fn abort(&self, req: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let epoch = req.into_inner().epoch;
        let dropped = match self.0.executor()? {
            Some(ex) => ex.abort(epoch).map_err(|e| Status::failed_precondition(e.to_string()))?,
            None => false,
        };
        Ok(Response::new(pb::AbortResponse { dropped }))
    }

    async fn drain(&self, _req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        self.0.draining.store(true, Ordering::SeqCst);
        let remaining = self.0.rank_loop.lock().ok().and_then(|g| g.as_ref().map(|r| r.stats.active.load(Ordering::Relaxed)));
        Ok(Response::new(pb::DrainResponse { remaining: remaining.unwrap_or(0) as u32 }))
    }

    async fn health(&self, req: Request<pb::WorkerHealthRequest>) -> Result<Response<pb::WorkerHealthResponse>, Status> {
        let take_steps = req.into_inner().take_steps;
        let g = self.0.rank_loop.lock().map_err(|e| Status::internal(e.to_string()))?;
        let mut h = pb::WorkerHealthResponse { rank: self.0.rank.load(Ordering::SeqCst) as u32, ..Default::default() };
        if let Some(rl) = g.as_ref() {
            let s = &rl.stats;
            h.serving = !self.0.draining.load(Ordering::SeqCst);
            h.active_requests = s.active.load(Ordering::Relaxed) as u32;
            h.steps = s.steps.load(Ordering::Relaxed);
            h.busy_steps = s.busy_steps.load(Ordering::Relaxed);
            h.forward_us = s.forward_us.load(Ordering::Relaxed);
            h.degraded = s.degraded.load(Ordering::Relaxed);
            if take_steps {
                h.recent_step_us = s.recent_steps.take();
            }
            h.expert_load = s.expert_load.lock().map(|v| v.clone()).unwrap_or_default();
            h.transport_error = s.transport_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
            h.epoch = self.0.solo_epoch.load(Ordering::SeqCst);
            if let Some(ex) = &rl.executor {
                h.epoch = ex.epoch();
                h.prepared_epoch = ex.prepared_epoch().unwrap_or(0);
                h.dispatch_us = ex.timers.dispatch_us.load(Ordering::Relaxed);
                h.expert_us = ex.timers.expert_us.load(Ordering::Relaxed);
                h.combine_us = ex.timers.combine_us.load(Ordering::Relaxed);
                h.capacity_rerouted = ex.timers.rerouted_rows.load(Ordering::Relaxed);
                h.capacity_dropped = ex.timers.dropped_rows.load(Ordering::Relaxed);
                if take_steps {
                    h.recent_projected_step_us = ex.take_projected_steps();
                }
            }
        }
        Ok(Response::new(h))
    }
}

fn finish_code(f: Option<FinishReason>) -> pb::FinishReason {
    match f {
        None | Some(FinishReason::Aborted) => pb::FinishReason::Unspecified,
        Some(FinishReason::Stop) => pb::FinishReason::Stop,
        Some(FinishReason::Length) => pb::FinishReason::Length,
        Some(FinishReason::ContextFull) => pb::FinishReason::ContextFull,
    }
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    if a.exit_on_stdin_eof {
        exit_on_stdin_eof();
    }
    if let Some(n) = a.threads {
        anyhow::ensure!(n >= 1, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("compute thread pool")?;
    }
    runtime()?.block_on(async move {
        let tl = TcpTransport::bind(&a.transport_listen)?;
        let transport_addr = a.transport_advertise.clone().unwrap_or(tl.local_addr()?.to_string());
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("bind {}", a.listen))?;
        let grpc_addr = a.advertise.clone().unwrap_or(listener.local_addr()?.to_string());
        let st = Arc::new(WorkerState {
            transport_listener: Mutex::new(Some(tl)),
            rank_loop: Mutex::new(None),
            jobs: Mutex::new(None),
            rank: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            transport_timeout: Duration::from_secs(a.transport_timeout),
            gpu: a.gpu,
            model_dir: Mutex::new(None),
            solo_epoch: AtomicU64::new(0),
            metrics: Arc::new(WorkerMetrics::new()?),
        });
        if let Some(m) = &a.serve.metrics_listen {
            let (maddr, _) = telemetry::serve_metrics(m, st.metrics.registry.clone()).await?;
            println!("metrics on http://{maddr}/metrics");
        }
        {
            // Gauges that mirror the rank loop's counters.
            let st = st.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let Ok(g) = st.rank_loop.lock() else { continue };
                    let Some(rl) = g.as_ref() else { continue };
                    let m = &st.metrics;
                    m.active.set(rl.stats.active.load(Ordering::Relaxed) as f64);
                    m.steps.set(rl.stats.steps.load(Ordering::Relaxed) as f64);
                    let epoch = rl.executor.as_ref().map_or(st.solo_epoch.load(Ordering::SeqCst), |e| e.epoch());
                    m.epoch.set(epoch as f64);
                }
            });
        }
        let (health, reflection, reporter) = health_and_reflection().await?;
        reporter.set_serving::<WorkerServer<WorkerSvc>>().await;
        let server = a.serve.tls.server()?
            .add_service(health)
            .add_service(reflection)
            .add_service(WorkerServer::new(WorkerSvc(st.clone())))
            .serve_with_incoming(TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        // Register with the leader (coordinators may still be starting or electing).
        let coordinators: Vec<String> = a.coordinator.split(',').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect();
        anyhow::ensure!(!coordinators.is_empty(), "--coordinator names no address");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let request = pb::RegisterRequest {
            grpc_address: grpc_addr.clone(),
            transport_address: transport_addr.clone(),
            rank_hint: -1,
            node: a.node.clone(),
        };
        let mut attempt = 0usize;
        let reg = loop {
            let c = &coordinators[attempt % coordinators.len()];
            attempt += 1;
            let why = match connect_channel(c).await {
                Ok(ch) => match ControlClient::new(ch).register(request.clone()).await {
                    Ok(r) => break r.into_inner(),
                    Err(s) if s.code() == tonic::Code::Unavailable => format!("{c}: {}", s.message()),
                    Err(s) => bail!("register at {c}: {:?}: {}", s.code(), s.message()),
                },
                Err(e) => format!("{c}: {e}"),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!("no coordinator accepted the registration within 60 s (last: {why})");
            }
            tracing::debug!("registration not accepted yet: {why}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Membership lease: the key vanishes when this process dies or stalls.
        let _membership = match &a.store {
            Some(u) if u.starts_with("embedded:") => {
                bail!("--store {u}: the embedded store lives inside the coordinator; workers take etcd://")
            }
            Some(u) => {
                let store = AnyStore::open(u).await.with_context(|| format!("state store {u}"))?;
                anyhow::ensure!(a.lease_ttl >= 1, "--lease-ttl must be at least 1 second");
                let ttl = Duration::from_secs(a.lease_ttl);
                let lease = store.grant_lease(ttl).await?;
                let m = Member {
                    id: format!("rank-{}", reg.rank),
                    rank: reg.rank,
                    node: a.node.clone(),
                    addr: grpc_addr.clone(),
                    transport_addr: transport_addr.clone(),
                    gpus: 0,
                };
                typed::put_member(&store, &m, Some(lease)).await?;
                Some(store.keep_alive(lease, ttl / 3))
            }
            None => None,
        };
        println!("worker rank {} of {} listening on {grpc_addr} (transport {transport_addr}) pid {}", reg.rank, reg.world_size, std::process::id());
        server.await??;
        Ok(ExitCode::SUCCESS)
    })
}
