//! Shared helpers of the cluster tests: a `switchyard up` child killed on drop, placements.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use switchyard_tests::{fixtures_dir, switchyard_bin};

pub const FIXTURES: [&str; 4] = ["mixtral", "qwen3_moe", "qwen3_moe_bf16", "deepseek_v3"];

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// (MoE layers, experts) from `switchyard model info`.
pub fn moe_shape(model: &Path) -> (usize, usize) {
    let out = Command::new(switchyard_bin()).args(["model", "info", "--model"]).arg(model).output().expect("info");
    let s = String::from_utf8_lossy(&out.stdout);
    let experts = s
        .lines()
        .find(|l| l.starts_with("experts "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|x| x.parse().ok())
        .expect("experts line");
    let layers = s.lines().find(|l| l.starts_with("moe layers")).map(|l| l.matches(|c: char| c == ',').count() + 1).expect("moe layers");
    (layers, experts)
}

/// A placement with replicas and uneven spreads: contiguous base plus one extra slot per rank
/// holding a replica of a different expert per layer (some experts end up on 1 rank, some on 2-3).
pub fn replica_placement(layers: usize, experts: usize, ranks: usize) -> String {
    let base = experts.div_ceil(ranks);
    let slots = base + 1;
    let mut ls = Vec::new();
    for l in 0..layers {
        let mut rs: Vec<Vec<usize>> = Vec::new();
        for r in 0..ranks {
            let mut v: Vec<usize> = (0..base).map(|j| (r * base + j) % experts).collect();
            v.dedup();
            let mut x = (l * 5 + r * 3 + 1) % experts;
            while v.len() < slots {
                if !v.contains(&x) {
                    v.push(x);
                }
                x = (x + 1) % experts;
            }
            rs.push(v);
        }
        ls.push(serde_json::json!({ "ranks": rs }));
    }
    let nodes: Vec<usize> = (0..ranks).collect();
    serde_json::json!({
        "format": "switchyard.placement.v1", "num_layers": layers, "num_experts": experts,
        "topology": {"nodes": [nodes]}, "layers": ls
    })
    .to_string()
}

/// A running `switchyard up` (coordinator + workers), killed on drop (its children exit when
/// its pipes close).
pub struct Cluster {
    child: Child,
    pub addr: String,
    /// The OpenAI-compatible HTTP API (`http listening on ADDR`).
    pub http_addr: String,
    pub worker_pids: Vec<u32>,
}

impl Cluster {
    pub fn up(model: &Path, workers: usize, placement: Option<&Path>) -> Cluster {
        let extra: Vec<std::ffi::OsString> = match placement {
            Some(p) => vec!["--placement".into(), p.into()],
            None => vec![],
        };
        Cluster::up_with(model, workers, &extra)
    }

    /// `switchyard up` with extra arguments (e.g. `--routing-trace`).
    pub fn up_with(model: &Path, workers: usize, extra: &[std::ffi::OsString]) -> Cluster {
        Cluster::up_with_env(model, workers, extra, &[])
    }

    /// `switchyard up` with extra arguments and environment variables (inherited by its
    /// coordinator and workers, e.g. `SWITCHYARD_FAILPOINTS`).
    pub fn up_with_env(model: &Path, workers: usize, extra: &[std::ffi::OsString], env: &[(&str, &str)]) -> Cluster {
        let mut cmd = Command::new(switchyard_bin());
        cmd.envs(env.iter().copied());
        // Port 0 for both APIs: tests run side by side.
        cmd.args(["up", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--workers", &workers.to_string(), "--model"]).arg(model);
        cmd.args(extra);
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // keep draining
                }
            }
        });
        let mut cl = Cluster { child, addr: String::new(), http_addr: String::new(), worker_pids: vec![] };
        loop {
            let line = rx.recv_timeout(Duration::from_secs(120)).expect("switchyard up did not become ready");
            if let Some(a) = line.strip_prefix("listening on ") {
                cl.addr = a.trim().to_string();
            }
            if let Some(a) = line.strip_prefix("http listening on ") {
                cl.http_addr = a.trim().to_string();
            }
            if line.starts_with("worker ")
                && line.contains(" listening on ")
                && let Some(pid) = line.rsplit("pid ").next().and_then(|p| p.trim().parse().ok())
            {
                cl.worker_pids.push(pid);
            }
            if line.starts_with("switchyard is serving") {
                break;
            }
        }
        cl
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `switchyard generate --endpoint` with extra args.
    pub fn generate(&self, args: &[&str]) -> Output {
        generate_at(&self.endpoint(), args)
    }
}

pub fn generate_at(endpoint: &str, args: &[&str]) -> Output {
    let child = Command::new(switchyard_bin())
        .args(["generate", "--endpoint", endpoint])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn generate");
    wait_bounded(child, "generate", Duration::from_secs(120))
}

/// The child's output, killing it (and failing the test) if it runs longer than `limit`.
pub fn wait_bounded(mut child: Child, what: &str, limit: Duration) -> Output {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One client per prompt, each streaming `switchyard generate --endpoint EP --prompt-ids P
/// --max-tokens N [extra]` back to back, at least twice, until [`LoopingClients::finish`].
pub struct LoopingClients {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<Output>>>,
}

impl LoopingClients {
    pub fn start(endpoint: &str, prompts: &[&str], max_tokens: usize, extra: &[&str]) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handles = prompts
            .iter()
            .map(|p| {
                let (ep, stop) = (endpoint.to_string(), stop.clone());
                let mut args: Vec<String> = vec!["--prompt-ids".into(), p.to_string(), "--max-tokens".into(), max_tokens.to_string()];
                args.extend(extra.iter().map(|a| a.to_string()));
                std::thread::spawn(move || {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let mut outs = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) || outs.len() < 2 {
                        outs.push(generate_at(&ep, &args));
                    }
                    outs
                })
            })
            .collect();
        LoopingClients { stop, handles }
    }

    /// Stops the clients; every client's outputs, in prompt order.
    pub fn finish(self) -> Vec<Vec<Output>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handles.into_iter().map(|h| h.join().expect("client")).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command's stdout and stderr, for assertions and messages.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Generates until it works (the cluster is starting, failing over or re-forming); the time it
/// took.
pub fn until_served(endpoints: &str, timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let o = generate_at(endpoints, &["--prompt-ids", "1,2,3", "--max-tokens", "2", "--retries", "0"]);
        if o.status.success() {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < timeout, "not served within {timeout:?}: {}", text(&o));
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn ids_line(out: &Output) -> Option<String> {
    String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with("ids: ")).map(|l| l.to_string())
}

/// `switchyard <args>` with a bounded wait.
pub fn switchyard(args: &[&str]) -> Output {
    let child = Command::new(switchyard_bin())
        .args(args)
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchyard");
    wait_bounded(child, &format!("switchyard {args:?}"), Duration::from_secs(180))
}

/// Greedy token ids of `prompt` generated in this process (no cluster), as `ids: ...`.
pub fn local_ids(model: &Path, prompt: &str, max_tokens: usize) -> String {
    let o = Command::new(switchyard_bin())
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt-ids", prompt, "--max-tokens", &max_tokens.to_string()])
        .output()
        .expect("local generate");
    ids_line(&o).unwrap_or_else(|| panic!("local generate: {}", String::from_utf8_lossy(&o.stderr)))
}

/// The admin token of processes started with [`Proc::spawn`].
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A child process whose stdout and stderr lines are collected; killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_with_env(args, &[])
    }

    /// [`Proc::spawn`] with extra environment variables (failpoints, say).
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(switchyard_bin())
            .args(args)
            .envs(env.iter().copied())
            .env("SWITCHYARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchyard");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for r in [Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().expect("stderr"))] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(l);
                }
            });
        }
        Proc { child, lines }
    }

    /// The first line containing `what`, waiting at most `timeout`.
    pub fn wait_line(&self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().expect("lines").iter().find(|l| l.contains(what)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no line with {what:?} within {timeout:?}; got {:?}", self.lines.lock().expect("lines"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn has_line(&self, what: &str) -> bool {
        self.lines.lock().expect("lines").iter().any(|l| l.contains(what))
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([sig, &self.child.id().to_string()]).status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}


/// Polls `path` (a process's `--ready-file`) until it holds JSON; panics after `timeout` with the
/// process's output.
pub fn wait_ready_file(p: &Proc, path: &Path, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(t) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
        {
            return v;
        }
        assert!(Instant::now() < deadline, "no ready file {} within {timeout:?}; output {:?}", path.display(), p.lines.lock().expect("lines"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Calls the coordinator's admin API and gRPC health directly (tonic), for what the CLI does not
/// print. Every call is bounded (5 s) and `None` when it fails.
pub mod grpc {
    use super::ADMIN_TOKEN;
    use std::time::Duration;
    use switchyard_proto::v1 as pb;
    use switchyard_proto::v1::admin_client::AdminClient;

    const CALL: Duration = Duration::from_secs(5);

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    fn url(addr: &str) -> String {
        if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") }
    }

    async fn channel(addr: &str) -> Option<tonic::transport::Channel> {
        let ep = tonic::transport::Endpoint::from_shared(url(addr)).ok()?.connect_timeout(CALL).timeout(CALL);
        ep.connect().await.ok()
    }

    fn authorized<T>(msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().expect("ascii"));
        r
    }

    pub fn cluster_status(addr: &str) -> Option<pb::ClusterStatusResponse> {
        rt().block_on(async {
            let mut c = AdminClient::new(channel(addr).await?);
            let r = tokio::time::timeout(CALL, c.cluster_status(authorized(pb::ClusterStatusRequest {}))).await.ok()?.ok()?;
            Some(r.into_inner())
        })
    }

    pub fn placement(addr: &str) -> Option<pb::GetPlacementResponse> {
        rt().block_on(async {
            let mut c = AdminClient::new(channel(addr).await?).max_decoding_message_size(1 << 30);
            let r = tokio::time::timeout(CALL, c.get_placement(authorized(pb::GetPlacementRequest {}))).await.ok()?.ok()?;
            Some(r.into_inner())
        })
    }

    /// gRPC health of `service` at `addr`: `Some(true)` SERVING, `Some(false)` any other status
    /// (NOT_SERVING, SERVICE_UNKNOWN), `None` no answer.
    pub fn serving(addr: &str, service: &str) -> Option<bool> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        rt().block_on(async {
            let mut c = HealthClient::new(channel(addr).await?);
            let req = tonic_health::pb::HealthCheckRequest { service: service.to_string() };
            match tokio::time::timeout(CALL, c.check(req)).await.ok()? {
                Ok(r) => Some(r.into_inner().status == ServingStatus::Serving as i32),
                // An unknown service is NOT_FOUND: not serving it.
                Err(s) if s.code() == tonic::Code::NotFound => Some(false),
                Err(_) => None,
            }
        })
    }
}

/// Polls ClusterStatus at `addr` until `ok` holds; panics after `timeout` with the last status.
pub fn wait_status(addr: &str, timeout: Duration, what: &str, ok: impl Fn(&switchyard_proto::v1::ClusterStatusResponse) -> bool) -> switchyard_proto::v1::ClusterStatusResponse {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(s) = grpc::cluster_status(addr) {
            if ok(&s) {
                return s;
            }
            last = Some(s);
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}; last ClusterStatus {last:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every layer's expert list per rank of a `switchyard.placement.v1` JSON (`layers[].ranks`).
pub fn placement_ranks(json: &str) -> Vec<Vec<Vec<usize>>> {
    let v: serde_json::Value = serde_json::from_str(json).expect("placement JSON");
    v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            l["ranks"]
                .as_array()
                .expect("ranks")
                .iter()
                .map(|r| r.as_array().expect("rank").iter().map(|e| e.as_u64().expect("expert") as usize).collect())
                .collect()
        })
        .collect()
}
