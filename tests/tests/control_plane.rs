//! The control plane against a real etcd (started by the harness): coordinator failover under
//! load, worker lease expiry, etcd restarted under the cluster, a store that is down.
//! Real processes: `switchyard coordinator` ×2, `switchyard worker` ×2, `switchyard generate`.
mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use switchyard_tests::etcd::{Etcd, free_port};

const TOKEN: &str = ADMIN_TOKEN;

fn coordinator(store: &str, model: &std::path::Path) -> (Proc, String) {
    let m = model.to_str().expect("path");
    let p = Proc::spawn(&["coordinator", "--model", m, "--workers", "2", "--listen", "127.0.0.1:0", "--store", store, "--lease-ttl", "2"]);
    let addr = p.wait_line("listening on ", Duration::from_secs(60)).trim().trim_start_matches("listening on ").to_string();
    (p, addr)
}

fn worker(coordinators: &str, store: &str) -> Proc {
    let p = Proc::spawn(&["worker", "--coordinator", coordinators, "--store", store, "--lease-ttl", "2", "--transport-timeout", "3"]);
    p.wait_line(" listening on ", Duration::from_secs(60));
    p
}

#[test]
fn killing_the_leading_coordinator_hands_over_with_no_request_lost() {
    let etcd = Etcd::start();
    let store = format!("etcd://127.0.0.1:{}/failover", etcd.client_port);
    let model = fixture("mixtral");
    let (mut a, addr_a) = coordinator(&store, &model);
    a.wait_line("leading", Duration::from_secs(30));
    let (b, addr_b) = coordinator(&store, &model);
    b.wait_line("standby; the leader is at", Duration::from_secs(30));
    let both = format!("{addr_a},{addr_b}");
    let _w0 = worker(&both, &store);
    let _w1 = worker(&both, &store);
    until_served(&both, Duration::from_secs(60));
    // A standby refuses clients with a retryable status naming the leader.
    let o = generate_at(&addr_b, &["--prompt-ids", "1,2", "--max-tokens", "2", "--retries", "0"]);
    assert!(!o.status.success() && text(&o).contains("Unavailable") && text(&o).contains(&addr_a), "{}", text(&o));

    let prompts = ["1,2,3,4,5", "7,8,9", "11,12,13,14,15,16,17", "20,21", "30,31,32,33", "40,41,42"];
    let want: Vec<String> = prompts.iter().map(|p| local_ids(&model, p, 40)).collect();
    let clients = LoopingClients::start(&both, &prompts, 40, &["--retries", "20"]);
    std::thread::sleep(Duration::from_millis(400));
    let killed = Instant::now();
    let _ = a.child.kill();
    let _ = a.child.wait();
    b.wait_line("adopted 2 of 2 running workers", Duration::from_secs(30));
    until_served(&addr_b, Duration::from_secs(30));
    let recovered = killed.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (mut done, mut retried) = (0, 0);
    for (outs, w) in clients.finish().into_iter().zip(&want) {
        for o in outs {
            assert!(o.status.success(), "a request was lost in the failover: {}", text(&o));
            assert_eq!(ids_line(&o).as_deref(), Some(w.as_str()), "wrong tokens after failover: {}", text(&o));
            done += 1;
            retried += (!text(&o).contains(", 0 retries")) as usize;
        }
    }
    eprintln!("coordinator failover: service back {:.2} s after the kill; {done} requests completed, {retried} of them retried, 0 failed", recovered.as_secs_f64());
    // The new leader drives the workers: a placement change goes through it.
    let o = switchyard(&["status", "--endpoint", &addr_b, "--token", TOKEN, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    assert_eq!(s["leader"], addr_b.as_str());
    assert_eq!(s["workers"].as_array().map(|w| w.len()), Some(2));
    drop(etcd);
}

#[test]
fn an_expired_worker_lease_removes_it_the_cluster_keeps_serving_and_it_rejoins_when_thawed() {
    let etcd = Etcd::start();
    let store = format!("etcd://127.0.0.1:{}/lease", etcd.client_port);
    let model = fixture("qwen3_moe");
    let (c, addr) = coordinator(&store, &model);
    let w0 = worker(&addr, &store);
    let w1 = worker(&addr, &store);
    until_served(&addr, Duration::from_secs(60));
    let want = local_ids(&model, "9,8,7,6", 16);
    // Freeze the second worker to register (its process stays, its lease stops being refreshed).
    let stalled = if w1.has_line("worker w1 listening") { &w1 } else { &w0 };
    let frozen = Instant::now();
    stalled.signal("-STOP");
    c.wait_line("worker w1 lost: its lease expired", Duration::from_secs(20));
    let removed = frozen.elapsed();
    // A new generation over the survivor: its regroup interrupts the collective blocked on the
    // frozen peer, it loads the experts it lacks, and requests go only to it.
    until_served(&addr, Duration::from_secs(30));
    let back = frozen.elapsed();
    for _ in 0..3 {
        let o = generate_at(&addr, &["--prompt-ids", "9,8,7,6", "--max-tokens", "16"]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
    }
    // Thawed, the worker finds its lease gone and no health polls: it registers again under a new
    // lease (`coordinator::registration`) and the group grows back to two ranks.
    let thawed = Instant::now();
    stalled.signal("-CONT");
    stalled.wait_line("registered again", Duration::from_secs(30));
    wait_status(&addr, Duration::from_secs(30), "two ranks again after the thaw", |s| s.serving && s.world_size == 2);
    let rejoined = thawed.elapsed();
    for _ in 0..2 {
        let o = generate_at(&addr, &["--prompt-ids", "9,8,7,6", "--max-tokens", "16"]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
    }
    eprintln!(
        "worker lease expiry: removed {:.2} s after the stall, serving again {:.2} s after it; thawed, a rank again {:.2} s later",
        removed.as_secs_f64(),
        back.as_secs_f64(),
        rejoined.as_secs_f64()
    );
    drop(etcd);
}

#[test]
fn etcd_restarted_under_the_cluster_loses_nothing() {
    let mut etcd = Etcd::start();
    let store = format!("etcd://127.0.0.1:{}/restart", etcd.client_port);
    let model = fixture("mixtral");
    let (layers, experts) = moe_shape(&model);
    let (c, addr) = coordinator(&store, &model);
    let _w0 = worker(&addr, &store);
    let _w1 = worker(&addr, &store);
    until_served(&addr, Duration::from_secs(60));
    let want = local_ids(&model, "3,4,5", 12);
    etcd.kill();
    // Serving does not need the store.
    for _ in 0..3 {
        let o = generate_at(&addr, &["--prompt-ids", "3,4,5", "--max-tokens", "12"]);
        assert!(o.status.success(), "with etcd down: {}", text(&o));
        assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
    }
    std::thread::sleep(Duration::from_millis(1500));
    etcd.restart();
    // After the restart the leader still leads (its lease survived) and records a new epoch.
    let tmp = tempfile::tempdir().expect("tmp");
    let f = tmp.path().join("p.json");
    std::fs::write(&f, replica_placement(layers, experts, 2)).expect("write");
    let o = switchyard(&["place", "apply", f.to_str().expect("path"), "--endpoint", &addr, "--token", TOKEN]);
    assert!(o.status.success(), "apply after the etcd restart: {}", text(&o));
    let o = generate_at(&addr, &["--prompt-ids", "3,4,5", "--max-tokens", "12"]);
    assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
    assert!(!c.has_line("panicked"), "{:?}", c.lines.lock().expect("lines"));
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint(), "get", "/restart/placement/current", "--print-value-only"])
        .output()
        .expect("etcdctl");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut cur = String::from_utf8_lossy(&out.stdout).trim().to_string();
    while cur != "2" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.endpoint(), "get", "/restart/placement/current", "--print-value-only"])
            .output()
            .expect("etcdctl");
        cur = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    assert_eq!(cur, "2", "the new epoch is recorded in etcd");
}

#[test]
fn a_store_that_is_down_is_a_clear_error_not_a_crash() {
    let model = fixture("mixtral");
    let store = format!("etcd://127.0.0.1:{}/down", free_port());
    let o = switchyard(&["coordinator", "--model", model.to_str().expect("path"), "--workers", "1", "--store", &store]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("state store") && t.contains("unavailable") && !t.contains("panicked"), "{t}");
    let o = switchyard(&["coordinator", "--model", model.to_str().expect("path"), "--workers", "1", "--store", "zookeeper://x"]);
    assert!(!o.status.success() && text(&o).contains("expected etcd://"), "{}", text(&o));
}
