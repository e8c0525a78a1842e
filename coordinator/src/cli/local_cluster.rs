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
use super::coordinator_cmd::HttpArgs;


#[derive(clap::Args, Clone)]
pub struct UpArgs {
    /// Model directory; default: the trained models/tiny-moe (prose and Python, with a chat
    /// template), else tests/fixtures/mixtral, else a small generated checkpoint.
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
    /// Where every worker computes: `cpu`, or `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = worker::Device::parse)]
    pub device: worker::Device,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// The OpenAI-compatible HTTP API's address (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http_listen: String,
    /// The model name HTTP clients give (default: the model directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests held at once at most (gRPC and HTTP); more are refused (429 over HTTP).
    #[arg(long, default_value_t = 256)]
    pub max_queued_requests: usize,
}

/// Worker arguments for `device`: workers of one machine on one GPU split its KV memory.
pub fn device_args(device: worker::Device, workers: usize) -> Vec<String> {
    let mut v = vec![format!("--device={device}")];
    if device != worker::Device::Cpu && workers > 1 {
        v.push(format!("--kv-memory-share={}", 0.8 / workers as f64));
    }
    v
}

/// Compute threads per worker when `workers` share this machine: its cores split evenly.
pub fn threads_per_local_worker(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / workers.max(1)).max(1)
}

/// Child processes of a local cluster; killed on drop. Workers can be added and killed while it
/// runs (the elastic tests and `bench elastic`); a killed worker keeps its index, address and pid.
pub struct LocalCluster {
    pub addr: String,
    /// The coordinator's HTTP API (`--http-listen` among the coordinator's arguments).
    pub http_addr: Option<String>,
    coordinator: Child,
    /// One entry per worker ever started, in start order; `None` once killed.
    workers: Vec<Option<Child>>,
    pub worker_pids: Vec<u32>,
    /// The workers' gRPC addresses, in start order.
    pub worker_addrs: Vec<String>,
    /// The workers' all-to-all addresses and ids (stable across generations), in start order.
    pub worker_transport_addrs: Vec<String>,
    pub worker_ids: Vec<String>,
    /// Arguments every worker gets (`start_local_cluster`'s `worker_args`).
    worker_args: Vec<String>,
    /// Compute threads of every worker and whether each is pinned to cores of its own.
    cores: Option<WorkerCores>,
    /// Holds the ready files; removed on drop.
    dir: tempfile::TempDir,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in self.workers.iter_mut().rev().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

/// Where local-cluster children's output is relayed: stdout (default, `switchyard up`), or stderr
/// for commands whose stdout is for machines (`bench ... --json`).
static CHILD_OUTPUT_TO_STDERR: AtomicBool = AtomicBool::new(false);

pub fn relay_child_output_to_stderr() {
    CHILD_OUTPUT_TO_STDERR.store(true, Ordering::Relaxed);
}

/// How long a child may take to write its ready file.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a coordinator writes to its `--ready-file` once listening.
#[derive(serde::Deserialize)]
struct CoordinatorReady {
    grpc_address: String,
    /// The OpenAI-compatible HTTP API's address, when it was asked for.
    #[serde(default)]
    http_address: Option<String>,
}

/// What a worker writes to its `--ready-file` once registered.
#[derive(serde::Deserialize)]
struct WorkerReady {
    grpc_address: String,
    #[serde(default)]
    transport_address: String,
    #[serde(default)]
    worker_id: String,
    #[serde(default)]
    pid: u32,
}

/// Spawns `cmd --ready-file ready` and waits for the file. Its stdout lines are relayed (they are
/// for humans; machines read the ready file, which does not depend on the wording of a log line).
fn spawn_ready<T: serde::de::DeserializeOwned>(mut cmd: std::process::Command, ready: &Path, what: &str) -> anyhow::Result<(Child, T)> {
    cmd.arg("--ready-file").arg(ready);
    // stdin stays open (held in the Child): the children run with --exit-on-stdin-eof, so they
    // also exit when this process dies without running Drop.
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().with_context(|| format!("spawning the {what}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if CHILD_OUTPUT_TO_STDERR.load(Ordering::Relaxed) {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
    });
    match wait_ready_file(&mut child, ready, READY_TIMEOUT) {
        Ok(v) => Ok((child, v)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e.context(format!("the {what} did not become ready")))
        }
    }
}

/// Polls for `path` until it holds a complete JSON document, the child exits, or `timeout`. A file
/// that does not parse yet is being written: polled again.
fn wait_ready_file<T: serde::de::DeserializeOwned>(child: &mut Child, path: &Path, timeout: Duration) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            match serde_json::from_str(&text) {
                Ok(v) => return Ok(v),
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(st) = child.try_wait()? {
            bail!("it exited ({st}) before writing {}", path.display());
        }
        if std::time::Instant::now() > deadline {
            match last_err {
                Some(e) => bail!("{} is not the expected JSON after {timeout:?}: {e}", path.display()),
                None => bail!("no {} within {timeout:?}", path.display()),
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl LocalCluster {
    /// Starts one more worker against the coordinator (`start_local_cluster`'s worker arguments,
    /// then `extra_args`); returns its index once it registered. With an elastic coordinator it
    /// joins the group as a new rank of a new generation.
    pub fn add_worker(&mut self, extra_args: &[String]) -> anyhow::Result<usize> {
        let i = self.workers.len();
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["worker", "--exit-on-stdin-eof", "--coordinator", &self.addr]).args(&self.worker_args).args(extra_args);
        if let Some(c) = &self.cores {
            cmd.args(c.args(i));
        }
        let ready = self.dir.path().join(format!("worker-{i}.json"));
        let (child, r): (Child, WorkerReady) = spawn_ready(cmd, &ready, &format!("worker {i}"))?;
        self.worker_pids.push(if r.pid != 0 { r.pid } else { child.id() });
        self.worker_addrs.push(r.grpc_address);
        self.worker_transport_addrs.push(r.transport_address);
        self.worker_ids.push(r.worker_id);
        self.workers.push(Some(child));
        Ok(i)
    }

    /// SIGKILLs worker `i` (as `kill -9`: no clean shutdown, no goodbye to the coordinator) and
    /// reaps it. Its address and pid stay listed; a second kill, or an unknown index, does nothing.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(Some(mut c)) = self.workers.get_mut(i).map(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Compute threads of local workers, and the cores each one owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerCores {
    pub threads: usize,
    /// Whether worker i is pinned to cores `i·threads ..` (modulo the machine's cores, for workers
    /// started later): only when every worker of the cluster fits on cores of its own.
    pub pinned: bool,
}

impl WorkerCores {
    /// `threads` per worker (default: the cores split evenly), pinned when `workers × threads`
    /// cores exist.
    pub fn for_cluster(workers: usize, threads: Option<usize>) -> Self {
        let threads = threads.unwrap_or_else(|| threads_per_local_worker(workers)).max(1);
        WorkerCores { threads, pinned: workers.max(1) * threads <= available_cores() }
    }

    /// The worker arguments of the i-th worker started.
    fn args(&self, i: usize) -> Vec<String> {
        let mut v = vec![format!("--threads={}", self.threads)];
        if self.pinned {
            let slots = (available_cores() / self.threads).max(1);
            let cpus = worker::affinity::CpuList::range((i % slots) * self.threads, self.threads);
            v.push(format!("--cpu-affinity={cpus}"));
        }
        v
    }

    /// How the benchmarks' headers say it.
    pub fn describe(&self) -> String {
        format!("{} threads per worker, {}", self.threads, if self.pinned { "each worker pinned to cores of its own" } else { "not pinned (too few cores)" })
    }
}

/// Niceness of a local coordinator whose workers are pinned (and of a benchmark's load generator):
/// the lowest, so that on a machine with a core per rank it runs in the ranks' waits and a rank's
/// step is not cut into by it (at 10 the scheduler still gives it ~10 % of a contended core, at 19
/// ~1.5 %).
pub const COORDINATOR_NICE: i32 = 19;

fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Start a coordinator and `workers` worker processes of this binary; returns once serving.
/// `cores`: the workers' compute threads and pinning (`None`: whatever `worker_args` say).
#[allow(clippy::too_many_arguments)]
pub fn start_local_cluster(
    model: &Path,
    workers: usize,
    placement: Option<&Path>,
    listen: &str,
    admin_token: Option<&str>,
    coordinator_args: &[String],
    worker_args: &[String],
    cores: Option<WorkerCores>,
) -> anyhow::Result<LocalCluster> {
    let exe = std::env::current_exe()?;
    // Validate here first, for a clear error before any process starts.
    let cfg = ModelConfig::from_dir(model).with_context(|| format!("model {}", model.display()))?;
    load_placement(&cfg, workers, placement)?;
    let dir = tempfile::Builder::new().prefix("switchyard-local-").tempdir()?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["coordinator", "--exit-on-stdin-eof", "--workers", &workers.to_string(), "--listen", listen, "--model"]).arg(model);
    if let Some(p) = placement {
        cmd.arg("--placement").arg(p);
    }
    if let Some(t) = admin_token {
        cmd.env("SWITCHYARD_ADMIN_TOKEN", t); // not on the command line, where `ps` shows it
    }
    cmd.args(coordinator_args);
    if cores.is_some_and(|c| c.pinned) {
        // The ranks own their cores; the coordinator takes what they leave.
        cmd.arg(format!("--nice={COORDINATOR_NICE}"));
    }
    let (coord, ready): (Child, CoordinatorReady) = spawn_ready(cmd, &dir.path().join("coordinator.json"), "coordinator")?;
    let addr = ready.grpc_address;
    let mut cl = LocalCluster {
        addr: addr.clone(),
        http_addr: ready.http_address,
        coordinator: coord,
        workers: vec![],
        worker_pids: vec![],
        worker_addrs: vec![],
        worker_transport_addrs: vec![],
        worker_ids: vec![],
        worker_args: worker_args.to_vec(),
        cores,
        dir,
    };
    for _ in 0..workers {
        cl.add_worker(&[])?;
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

/// The default model of `switchyard up`: the trained `models/tiny-moe` of the repository (looked
/// up from the working directory, then beside the binary's `target/<profile>/`), else the Mixtral
/// test fixture, else a small generated checkpoint.
fn default_model() -> anyhow::Result<PathBuf> {
    let mut candidates = vec![PathBuf::from("models/tiny-moe")];
    if let Some(repo) = std::env::current_exe().ok().and_then(|e| e.parent()?.parent()?.parent().map(PathBuf::from)) {
        candidates.push(repo.join("models/tiny-moe"));
    }
    candidates.push(PathBuf::from("tests/fixtures/mixtral"));
    if let Some(dir) = candidates.iter().find(|d| d.join("config.json").exists()) {
        return Ok(std::fs::canonicalize(dir)?);
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
        &[
            a.scheduler.to_args(),
            HttpArgs { http_listen: Some(a.http_listen.clone()), served_model_name: a.served_model_name.clone(), max_queued_requests: a.max_queued_requests }.to_args(),
        ]
        .concat(),
        &device_args(a.device, a.workers),
        Some(WorkerCores::for_cluster(a.workers, a.threads_per_worker)),
    )?;
    println!("switchyard is serving {} on {} workers; connect to http://{}", model.display(), a.workers, cl.addr);
    println!("  switchyard generate --endpoint http://{} --prompt \"hello\" --max-tokens 16", cl.addr);
    if let Some(h) = &cl.http_addr {
        println!("OpenAI-compatible API on http://{h}/v1 (model {:?}):", served_name(&model, a.served_model_name.as_deref()));
        println!(
            "  curl -N http://{h}/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": {:?}, \"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}], \"max_tokens\": 16, \"stream\": true}}'",
            served_name(&model, a.served_model_name.as_deref())
        );
    }
    println!("press Ctrl-C to stop");
    runtime()?.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    drop(cl);
    Ok(ExitCode::SUCCESS)
}


/// The name HTTP clients give for `model` (the coordinator's default: the directory's name).
fn served_name(model: &Path, asked: Option<&str>) -> String {
    asked.map(String::from).unwrap_or_else(|| {
        let m = std::fs::canonicalize(model).unwrap_or_else(|_| model.to_path_buf());
        m.file_name().map_or_else(|| m.display().to_string(), |n| n.to_string_lossy().into_owned())
    })
}
