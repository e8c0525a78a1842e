//! `switchyard worker`: flag parsing; the gRPC service is `worker::service`, the registration
//! and membership lease `coordinator::registration`.
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use super::cluster::{ServeArgs, exit_on_stdin_eof, runtime, write_ready_file};
use coordinator::registration::{Registration, RegistrationConfig};
use coordinator::server::health_and_reflection;
use coordinator::store::AnyStore;
use switchyard_proto::v1::worker_server::WorkerServer;
use tonic::transport::server::TcpIncoming;
use worker::service::{WorkerConfig, WorkerMetrics, WorkerService};
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
    /// Where the model computes: `cpu`, or `cuda:N` (a build with `--features cuda`; the NCCL
    /// communicator then uses GPU N too).
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu", value_parser = worker::Device::parse)]
    pub device: worker::Device,
    /// With a GPU: share of its memory left after the weights that the KV cache takes (default
    /// 0.8; workers sharing one GPU split it, as `switchyard up` does).
    #[arg(long, env = "SWITCHYARD_KV_MEMORY_SHARE")]
    pub kv_memory_share: Option<f64>,
    /// Compute threads of this worker (its rayon pool; default: one per core). Ranks that share
    /// a machine should split its cores between them instead of each taking all of them.
    #[arg(long, env = "SWITCHYARD_THREADS")]
    pub threads: Option<usize>,
    /// Pin this worker to these CPU cores (`0-3,8`): every thread, before the compute pool starts.
    /// Ranks sharing a machine then own their cores, as ranks on accelerators own theirs.
    #[arg(long, env = "SWITCHYARD_CPU_AFFINITY", value_parser = parse_cpu_list)]
    pub cpu_affinity: Option<worker::affinity::CpuList>,
    /// Seconds a rank whose group failed waits for the coordinator to regroup it before failing
    /// its requests (as retryable).
    #[arg(long, default_value_t = 30)]
    pub regroup_timeout: u64,
    /// Once listening and registered, write {"grpc_address","transport_address","worker_id","pid"}
    /// to this file (atomically: a temporary file renamed into place).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Exit when stdin closes (used by `switchyard up`).
    #[arg(long)]
    pub exit_on_stdin_eof: bool,
}

fn parse_cpu_list(s: &str) -> Result<worker::affinity::CpuList, String> {
    worker::affinity::CpuList::parse(s).map_err(|e| e.to_string())
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<ExitCode> {
    if a.exit_on_stdin_eof {
        exit_on_stdin_eof();
    }
    // A device this worker cannot use: exit now, with the reason, instead of failing every regroup.
    worker::backend::probe(a.device)?;
    if let Some(cpus) = &a.cpu_affinity {
        let threads = worker::affinity::pin_process(cpus)?;
        tracing::info!(%cpus, threads, "pinned to CPUs");
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
        let cfg = WorkerConfig {
            transport_timeout: Duration::from_secs(a.transport_timeout),
            regroup_timeout: Duration::from_secs(a.regroup_timeout),
            gpu: match a.device {
                worker::Device::Cuda(n) => n,
                worker::Device::Cpu => a.gpu,
            },
            device: a.device,
            kv_memory_share: a.kv_memory_share,
            ..WorkerConfig::new(tl)
        };
        let svc = WorkerService::new(cfg, Arc::new(WorkerMetrics::new()?));
        if let Some(m) = &a.serve.metrics_listen {
            let (maddr, _) = telemetry::serve_metrics(m, svc.metrics().registry.clone()).await?;
            println!("metrics on http://{maddr}/metrics");
        }
        {
            // Gauges that mirror the rank loop's counters.
            let svc = svc.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    svc.refresh_gauges();
                }
            });
        }
        let hr = health_and_reflection()?;
        hr.reporter.set_serving::<WorkerServer<WorkerService>>().await;
        let server = a.serve.tls.server()?
            .add_service(hr.health)
            .add_service(hr.reflection_v1)
            .add_service(hr.reflection_v1alpha)
            .add_service(svc.clone().into_server())
            // TCP_NODELAY: tokens stream as small writes (see the coordinator's server).
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)));
        let server = tokio::spawn(server);
        // Register with the leader (coordinators may still be starting or electing), then keep
        // the membership (`coordinator::registration`).
        let coordinators: Vec<String> = a.coordinator.split(',').map(str::trim).filter(|c| !c.is_empty()).map(String::from).collect();
        anyhow::ensure!(!coordinators.is_empty(), "--coordinator names no address");
        let store = match &a.store {
            Some(u) if u.starts_with("embedded:") => {
                bail!("--store {u}: the embedded store lives inside the coordinator; workers take etcd://")
            }
            Some(u) => {
                anyhow::ensure!(a.lease_ttl >= 1, "--lease-ttl must be at least 1 second");
                Some(AnyStore::open(u).await.with_context(|| format!("state store {u}"))?)
            }
            None => None,
        };
        let cfg = RegistrationConfig {
            coordinators,
            grpc_address: grpc_addr.clone(),
            transport_address: transport_addr.clone(),
            node: a.node.clone(),
            gpus: u32::from(matches!(a.device, worker::Device::Cuda(_))),
            store,
            lease_ttl: Duration::from_secs(a.lease_ttl.max(1)),
        };
        let registration = Registration::start(cfg, Duration::from_secs(60)).await?;
        let worker_id = registration.worker_id().to_string();
        let polls = svc.clone();
        tokio::spawn(registration.keep(Arc::new(move || polls.health_polls())));
        let pid = std::process::id();
        if let Some(path) = &a.ready_file {
            let ready = serde_json::json!({
                "grpc_address": grpc_addr, "transport_address": transport_addr, "worker_id": worker_id, "pid": pid,
            });
            write_ready_file(path, &ready)?;
        }
        // Ranks come with each generation (Regroup), so the line names the worker id; for
        // people (processes learn addresses from --ready-file).
        println!("worker {worker_id} listening on {grpc_addr} (transport {transport_addr}) pid {pid}");
        server.await??;
        Ok(ExitCode::SUCCESS)
    })
}
