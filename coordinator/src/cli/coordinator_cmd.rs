//! `switchyard coordinator`: parses the flags, resolves the first generation's placement and the
//! scheduler's policy, and runs the coordinator's server (`coordinator::server::serve`).
use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use super::cluster::{PlacementArgs, ServeArgs, exit_on_stdin_eof, runtime, write_ready_file};
use coordinator::control::{Group, GroupSettings};
use coordinator::http::HttpConfig;
use coordinator::server::{CoordinatorConfig, ServerError, serve, transport_setup};
use worker::ModelConfig;
use worker::model::Model;
use worker::tokenizer::Tokenizer;

#[derive(clap::Args, Clone)]
pub struct CoordinatorArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Run at this niceness (0–19) to yield the cores to workers pinned on the same machine.
    #[arg(long, default_value_t = 0)]
    pub nice: i32,
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
    #[command(flatten)]
    pub http: HttpArgs,
}

/// The OpenAI-compatible HTTP API and the bound on requests held at once.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct HttpArgs {
    /// Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /// /health) on this address (port 0: any free port; printed as `http listening on ADDR`).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// The model name HTTP clients give (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests held at once at most, over gRPC and HTTP together (waiting for the cluster,
    /// queued or streaming); more are refused at once (RESOURCE_EXHAUSTED, HTTP 429).
    #[arg(long, default_value_t = 256)]
    pub max_queued_requests: usize,
}

impl HttpArgs {
    /// The same settings as arguments of the coordinator `switchyard up` starts.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![format!("--max-queued-requests={}", self.max_queued_requests)];
        if let Some(h) = &self.http_listen {
            a.push(format!("--http-listen={h}"));
        }
        if let Some(n) = &self.served_model_name {
            a.push(format!("--served-model-name={n}"));
        }
        a
    }
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
    /// Log-normal drift of expert loads the rebalancer's moves plan for (as `place solve
    /// --load-drift`): heavy experts are split and spread, not paired to fit the window. Default:
    /// the drift the live window shows (about 0 on steady traffic); 0 fits the window.
    #[arg(long)]
    pub rebalance_load_drift: Option<f64>,
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
    /// Where a token's MoE outputs are combined: `home` (its own rank, every layer) or
    /// `affinity` (the rank of its primary expert, which runs its next attention; KV copied
    /// within coherence groups, `affinity:N` for groups of N consecutive ranks). See the README.
    #[arg(long, default_value = "home", value_parser = worker::expert_parallel::DataPath::parse)]
    pub data_path: worker::expert_parallel::DataPath,
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
        cfg.load_drift = self.rebalance_load_drift;
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
        if self.data_path != worker::expert_parallel::DataPath::Home {
            a.push(format!("--data-path={}", self.data_path.name()));
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
        if let Some(d) = self.rebalance_load_drift {
            a.push(format!("--rebalance-load-drift={d}"));
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

pub fn coordinator(a: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    if a.exit_on_stdin_eof {
        exit_on_stdin_eof();
    }
    if a.nice > 0 {
        worker::affinity::lower_priority(a.nice).context("--nice")?;
    }
    let cfg = ModelConfig::from_dir(&a.model).with_context(|| format!("model {}", a.model.display()))?;
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let p = PlacementArgs { placement: a.placement.clone(), ..Default::default() }.resolve_with(&cfg, a.workers, a.min_replicas)?;
    // Checked here, for a clear error at start (each generation makes its own NCCL id).
    let (transport, _) = transport_setup(&a.transport)?;
    let tokenizer = Tokenizer::from_dir(&a.model)?.map(Arc::new);
    let model_dir = std::fs::canonicalize(&a.model)?;
    let n_moe = cfg.moe_layers().len();
    // What one migration move loads (bf16 checkpoints' experts stay bf16 once loaded).
    let expert_bytes = if n_moe > 0 { Model::routed_expert_bytes(&a.model)? } else { 0 };
    let policy = a.scheduler.policy(n_moe, expert_bytes, a.min_replicas)?;
    if let Some(c) = a.scheduler.capacity_factor {
        anyhow::ensure!(c.is_finite() && c > 0.0, "--capacity-factor must be positive");
    }
    anyhow::ensure!(a.scheduler.max_batch_tokens != Some(0), "--max-batch-tokens must be at least 1");
    anyhow::ensure!(
        a.scheduler.data_path == worker::expert_parallel::DataPath::Home
            || (!a.scheduler.load_aware_replicas && a.scheduler.capacity_factor.is_none()),
        "--load-aware-replicas and --capacity-factor apply to --data-path home only"
    );
    anyhow::ensure!(a.stats_half_life > 0.0 && a.stats_half_life.is_finite(), "--stats-half-life must be positive");
    anyhow::ensure!(a.max_slots_per_rank != Some(0), "--max-slots-per-rank must be at least 1");
    anyhow::ensure!(a.lease_ttl >= 1, "--lease-ttl must be at least 1 second");
    anyhow::ensure!(a.http.max_queued_requests >= 1, "--max-queued-requests must be at least 1");
    let served_model_name = a.http.served_model_name.clone().unwrap_or_else(|| {
        model_dir.file_name().map_or_else(|| model_dir.display().to_string(), |n| n.to_string_lossy().into_owned())
    });
    let group = Group::new(GroupSettings { min_workers: a.workers, max_slots_per_rank: a.max_slots_per_rank, min_replicas: a.min_replicas, initial: p })?;
    let server = a.serve.tls.server()?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("bind {}", a.listen))?;
        let addr = listener.local_addr()?;
        let http = match &a.http.http_listen {
            Some(h) => {
                let l = tokio::net::TcpListener::bind(h).await.with_context(|| format!("bind --http-listen {h}"))?;
                Some((l, HttpConfig { served_model_name }))
            }
            None => None,
        };
        let http_addr = match &http {
            Some((l, _)) => Some(l.local_addr()?.to_string()),
            None => None,
        };
        let cfg = CoordinatorConfig {
            model_dir,
            model: cfg,
            tokenizer,
            group,
            stats_half_life: a.stats_half_life,
            policy,
            load_aware_replicas: a.scheduler.load_aware_replicas,
            capacity_factor: a.scheduler.capacity_factor,
            max_batch_tokens: a.scheduler.max_batch_tokens,
            data_path: a.scheduler.data_path,
            transport,
            admin_token: a.admin_token.clone(),
            store: a.store.clone(),
            lease_ttl: Duration::from_secs(a.lease_ttl),
            advertise: a.advertise.clone().unwrap_or_else(|| addr.to_string()),
            metrics_listen: a.serve.metrics_listen.clone(),
            max_queued_requests: a.http.max_queued_requests,
            http,
        };
        println!("listening on {addr}");
        if let Some(h) = &http_addr {
            println!("http listening on {h}");
        }
        if let Some(f) = &a.ready_file {
            let ready = serde_json::json!({"grpc_address": addr.to_string(), "http_address": http_addr, "pid": std::process::id()});
            write_ready_file(f, &ready)?;
        }
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match serve(cfg, listener, server, shutdown).await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e @ ServerError::LeaseLost(_)) => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(4))
            }
            Err(e) => Err(anyhow::Error::new(e)),
        }
    })
}
