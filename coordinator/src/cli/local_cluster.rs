//! `switchyard up` and the local clusters benchmarks and `model check --workers` start: a
//! coordinator and worker processes of this binary on this machine.
use anyhow::{Context, bail};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;
use worker::ModelConfig;
use super::cluster::{PlacementArgs, SchedulerArgs, connect_channel, load_placement, runtime};


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

