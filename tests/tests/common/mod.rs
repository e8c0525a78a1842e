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
        cmd.args(["up", "--listen", "127.0.0.1:0", "--workers", &workers.to_string(), "--model"]).arg(model);
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
        let mut cl = Cluster { child, addr: String::new(), worker_pids: vec![] };
        loop {
            let line = rx.recv_timeout(Duration::from_secs(120)).expect("switchyard up did not become ready");
            if let Some(a) = line.strip_prefix("listening on ") {
                cl.addr = a.trim().to_string();
            }
            if line.starts_with("worker rank")
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
        let mut child = Command::new(switchyard_bin())
            .args(args)
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

