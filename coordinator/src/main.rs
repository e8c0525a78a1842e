//! `switchyard`: the operator CLI.
use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Expert-parallel MoE serving: placement, models, cluster")]
struct Cli {
    /// CA certificate (PEM) that signed the gRPC servers' certificates: every gRPC client of this
    /// command (clients, workers, the coordinator calling workers) then speaks TLS.
    #[arg(long, global = true, env = "SWITCHYARD_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Expert placement: solve, evaluate, compare, simulate, export, benchmark.
    #[command(subcommand)]
    Place(cli::place::PlaceCommand),
    /// Routing traces: synthesise, convert, summarise.
    #[command(subcommand)]
    Trace(cli::trace::TraceCommand),
    /// Model checkpoints: check against reference outputs, show info, benchmark.
    #[command(subcommand)]
    Model(cli::model::ModelCommand),
    /// Generate tokens from a model in this process (--model) or from a cluster (--endpoint).
    Generate(cli::model::GenerateArgs),
    /// Start a whole cluster on this machine (coordinator + N CPU workers) and serve until Ctrl-C.
    Up(cli::local_cluster::UpArgs),
    /// Run the coordinator (client API + worker control plane).
    Coordinator(cli::coordinator_cmd::CoordinatorArgs),
    /// Run one worker (a rank) that registers with a coordinator.
    Worker(cli::worker_cmd::WorkerArgs),
    /// The cluster as the leading coordinator sees it (admin API).
    Status {
        #[command(flatten)]
        endpoint: cli::admin::AdminEndpoint,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Live expert load of a cluster: balancedness of the active placement, hottest experts,
    /// per-rank load, migrations (admin API).
    Stats {
        #[command(flatten)]
        endpoint: cli::admin::AdminEndpoint,
        /// How many of the hottest experts to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// Take a rank out of the expert-parallel group without failing a request (admin API): its
    /// requests finish (or move after --deadline), then the group re-forms without it.
    Drain {
        #[command(flatten)]
        endpoint: cli::admin::AdminEndpoint,
        #[arg(long)]
        rank: u32,
        /// Seconds the rank's requests may take to finish before they move to other ranks.
        #[arg(long, default_value_t = 30.0)]
        deadline: f64,
    },
    /// Cluster benchmarks: all-to-all transport, end-to-end decode.
    #[command(subcommand)]
    Bench(cli::bench_cluster::BenchCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Servers log at info and may export spans; one-shot commands only warn.
    let (service, otlp, default_filter) = match &cli.command {
        Command::Coordinator(a) => ("switchyard-coordinator", a.serve.otlp_endpoint.clone(), "info,highs=error"),
        Command::Worker(a) => ("switchyard-worker", a.serve.otlp_endpoint.clone(), "info,highs=error"),
        _ => ("switchyard", None, "warn,highs=error"),
    };
    let _tracing = match telemetry::init_tracing(service, otlp.as_deref(), default_filter) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("error: tracing: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Err(e) = coordinator::tls::init_client(cli.tls_ca.as_deref()) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Place(c) => cli::place::run(c),
        Command::Trace(c) => cli::trace::run(c),
        Command::Model(c) => cli::model::run(c),
        Command::Generate(a) => cli::model::generate(a),
        Command::Up(a) => cli::local_cluster::up(a),
        Command::Coordinator(a) => cli::coordinator_cmd::coordinator(a),
        Command::Worker(a) => cli::worker_cmd::worker(a),
        Command::Status { endpoint, json } => cli::admin::status(endpoint, json),
        Command::Stats { endpoint, top, json } => cli::admin::stats(endpoint, top, json),
        Command::Drain { endpoint, rank, deadline } => cli::admin::drain(endpoint, rank, deadline),
        Command::Bench(c) => cli::bench_cluster::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
