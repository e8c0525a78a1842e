//! Starting the coordinator: its lease and campaign in the store, the gRPC services, health.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::v1::admin_server::AdminServer;
use switchyard_proto::v1::control_server::ControlServer;
use switchyard_proto::v1::inference_server::InferenceServer;
use tonic::transport::server::TcpIncoming;
use worker::ModelConfig;
use worker::expert_parallel::RecentSteps;
use worker::tokenizer::Tokenizer;

use super::ha::{Role, Seat};
use super::metrics::CoordMetrics;
use super::{AdminAuth, CoordState, CoordSvc, MigrationWatch, ServerError, health_and_reflection};
use crate::control::Group;
use crate::store::AnyStore;

/// Everything [`serve`] needs; the CLI builds it from flags.
pub struct CoordinatorConfig {
    /// Model directory as the workers see it (canonical).
    pub model_dir: PathBuf,
    pub model: ModelConfig,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The group with its settings (first generation's placement, budget, replica floor).
    pub group: Group,
    /// Seconds after which a live expert-load observation weighs half.
    pub stats_half_life: f64,
    /// The scheduler's rebalance policy (`None`: off).
    pub policy: Option<placement::rebalance::Rebalancer>,
    pub load_aware_replicas: bool,
    pub capacity_factor: Option<f64>,
    pub max_batch_tokens: Option<u32>,
    /// Handed to every worker ([`worker::expert_parallel::DataPath`]).
    pub data_path: worker::expert_parallel::DataPath,
    /// All-to-all kind handed to workers ("tcp" or "nccl").
    pub transport: String,
    /// Bearer token of the admin API (`None`: the admin API refuses every call).
    pub admin_token: Option<String>,
    /// State store URL (`embedded:///…` or `etcd://…`) and this coordinator's lease TTL.
    pub store: String,
    pub lease_ttl: Duration,
    /// Address clients and standbys reach this coordinator at.
    pub advertise: String,
    /// Prometheus `/metrics` listen address.
    pub metrics_listen: Option<String>,
    /// Requests held at once at most (waiting, queued or streaming); past it they are refused.
    pub max_queued_requests: usize,
    /// The OpenAI-compatible HTTP API, on this listener (`None`: off).
    pub http: Option<(tokio::net::TcpListener, crate::http::HttpConfig)>,
}

/// Runs the coordinator on `listener` until `shutdown` completes (Ok), or this coordinator loses
/// its lease (`ServerError::LeaseLost`: exit, a successor may already lead — fail-stop).
pub async fn serve(
    cfg: CoordinatorConfig,
    listener: tokio::net::TcpListener,
    mut server: tonic::transport::Server,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    if cfg.lease_ttl < Duration::from_secs(1) {
        return Err(ServerError::Config("--lease-ttl must be at least 1 second".into()));
    }
    let (n_moe, n_experts) = (cfg.model.moe_layers().len(), cfg.model.router.n_experts);
    let svc = CoordSvc(Arc::new(CoordState {
        model_dir: cfg.model_dir,
        cfg: cfg.model,
        tok: cfg.tokenizer,
        serving: tokio::sync::watch::channel(cfg.group.serving()).0,
        group: Mutex::new(cfg.group),
        membership_changed: tokio::sync::Notify::new(),
        links: Mutex::new(HashMap::new()),
        apply_lock: tokio::sync::Mutex::new(()),
        listen: Mutex::new(cfg.advertise.clone()),
        role: tokio::sync::watch::channel(Role::Standby(None)).0,
        seat: std::sync::OnceLock::new(),
        records: std::sync::OnceLock::new(),
        metrics: CoordMetrics::new()?,
        window: Mutex::new(placement::live::LoadWindow::new(n_moe, n_experts, cfg.stats_half_life)),
        load_observed: tokio::sync::Notify::new(),
        policy: Mutex::new(cfg.policy),
        load_aware_replicas: cfg.load_aware_replicas,
        capacity_factor: cfg.capacity_factor,
        max_batch_tokens: cfg.max_batch_tokens,
        data_path: cfg.data_path,
        migration_steps: Mutex::new((MigrationWatch::Idle, 0)),
        recent_steps: RecentSteps::default(),
        recent_projected_steps: RecentSteps::default(),
        transport: cfg.transport,
        admission: super::admission::Admission::new(cfg.max_queued_requests),
    }));
    let store_err = |source| ServerError::Store { url: cfg.store.clone(), source };
    let store = AnyStore::open(&cfg.store).await.map_err(store_err)?;
    let seat = Arc::new(Seat::take(store, cfg.advertise, cfg.lease_ttl).await.map_err(store_err)?);
    let _ = svc.0.seat.set(seat.clone());
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(campaign_then_lead(svc.clone(), seat, lost_tx));
    if let Some(m) = &cfg.metrics_listen {
        let (maddr, _) = telemetry::serve_metrics(m, svc.0.metrics.registry.clone()).await?;
        println!("metrics on http://{maddr}/metrics");
    }
    if let Some((listener, http)) = cfg.http {
        tokio::spawn(crate::http::serve(listener, svc.clone(), http));
    }
    let hr = health_and_reflection()?;
    tokio::spawn(follow_health(svc.clone(), hr.reporter));
    let grpc = server
        .add_service(hr.health)
        .add_service(hr.reflection_v1)
        .add_service(hr.reflection_v1alpha)
        .add_service(InferenceServer::new(svc.clone()).max_encoding_message_size(1 << 30))
        .add_service(AdminServer::with_interceptor(svc.clone(), AdminAuth::new(cfg.admin_token)))
        .add_service(ControlServer::new(svc))
        // TCP_NODELAY: a streamed token is one small write; Nagle would hold it for the ACK of the
        // previous one (tens of ms of time to first token).
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown);
    tokio::select! {
        r = grpc => Ok(r?),
        Ok(why) = lost_rx => Err(ServerError::LeaseLost(why)),
    }
}

/// Campaigns for the leader key; once won, leads until the lease is lost (then reports it).
async fn campaign_then_lead(svc: CoordSvc, seat: Arc<Seat>, lost: tokio::sync::oneshot::Sender<String>) {
    let role = svc.0.role.clone();
    let won = seat
        .campaign(|leader| {
            if let Some(l) = &leader {
                println!("standby; the leader is at {l}");
            }
            role.send_replace(Role::Standby(leader));
        })
        .await;
    if let Err(e) = won {
        let _ = lost.send(format!("while campaigning: {e}"));
        return;
    }
    svc.clone().lead(seat.clone()).await;
    // Fail-stop: a leader whose lease is gone may already have a successor.
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if seat.keep_alive.is_lost() {
            let _ = lost.send("it expired".into());
            return;
        }
    }
}

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
