//! A real etcd (Debian `etcd-server`) for tests: free 127.0.0.1 ports, a temp data dir, killed
//! on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// Starts etcd on fresh free ports; retries with other ports if it exits at start (a port
    /// taken between probing and binding).
    pub fn start() -> Etcd {
        let mut e = Etcd { child: None, dir: tempfile::tempdir().unwrap(), client_port: 0, peer_port: 0 };
        for attempt in 1..=3 {
            e.client_port = free_port();
            e.peer_port = free_port();
            match e.try_spawn() {
                Ok(()) => return e,
                Err(msg) if attempt < 3 => eprintln!("etcd start attempt {attempt} failed, retrying: {msg}"),
                Err(msg) => panic!("{msg}"),
            }
        }
        unreachable!()
    }

    pub fn spawn(&mut self) {
        if let Err(msg) = self.try_spawn() {
            panic!("{msg}");
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let data: PathBuf = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log")).unwrap();
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}"), "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd (install etcd-server: scripts/install-deps.sh)");
        self.child = Some(child);
        let r = self.wait_healthy();
        if r.is_err() {
            self.kill();
            let _ = std::fs::remove_dir_all(&data);
        }
        r
    }

    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("etcd exited with {st}: {}", self.log()));
            }
            let ok = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.endpoint(), "--command-timeout=1s", "endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("etcd not healthy within {WAIT:?}: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

