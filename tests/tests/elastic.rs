//! Elastic expert parallelism with real processes: a worker killed (kill -9) or drained makes a
//! new generation of the group over the survivors, a joining worker gets a rank of the next one,
//! survivors without room refuse clearly, replicas make a death need no loading; a standby
//! coordinator reports NOT_SERVING. Processes: `switchyard coordinator`, `switchyard worker`,
//! `switchyard generate` / `drain`, etcd where the test needs leases.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchyard_tests::etcd::Etcd;

const TOKEN: &str = ADMIN_TOKEN;
const INFERENCE: &str = "switchyard.v1.Inference";
/// Tokens per client request: short, the machine has 2 cores.
const TOKENS: usize = 12;

/// The model of these tests: qwen3_moe (16 experts, top-4: room for replicas), else mixtral.
fn model() -> PathBuf {
    let q = fixture("qwen3_moe");
    if q.join("config.json").exists() { q } else { fixture("mixtral") }
}

/// Two coordinators (leader first) and the workers of one test.
struct Ha {
    leader: Proc,
    leader_addr: String,
    standby: Proc,
    standby_addr: String,
    /// Both addresses, for clients that fail over.
    both: String,
    workers: Vec<(Proc, String)>,
}

/// Processes of one test; their ready files live in `dir`.
struct Group {
    dir: tempfile::TempDir,
    started: usize,
}

impl Group {
    fn new() -> Group {
        Group { dir: tempfile::tempdir().expect("tmp"), started: 0 }
    }

    fn ready_path(&mut self, what: &str) -> PathBuf {
        self.started += 1;
        self.dir.path().join(format!("{what}-{}.json", self.started))
    }

    /// A coordinator waiting for `workers`; its address from its ready file.
    fn coordinator(&mut self, model: &Path, workers: usize, store: Option<&str>, extra: &[&str]) -> (Proc, String) {
        let ready = self.ready_path("coordinator");
        let (m, r) = (model.to_str().expect("path"), ready.to_str().expect("path"));
        let n = workers.to_string();
        let mut args = vec!["coordinator", "--model", m, "--workers", &n, "--listen", "127.0.0.1:0", "--ready-file", r];
        if let Some(s) = store {
            args.extend(["--store", s, "--lease-ttl", "2"]);
        }
        args.extend(extra);
        let p = Proc::spawn(&args);
        let v = wait_ready_file(&p, &ready, Duration::from_secs(60));
        let addr = v["grpc_address"].as_str().expect("grpc_address").to_string();
        (p, addr)
    }

    /// A worker registered with `coordinators`; its worker id from its ready file.
    /// A leader and a standby on `store` (both with `extra`), and `workers` workers registered
    /// through both addresses; returns once the cluster serves.
    fn leader_standby_and_workers(&mut self, model: &Path, store: &str, workers: usize, extra: &[&str]) -> Ha {
        let (leader, leader_addr) = self.coordinator(model, workers, Some(store), extra);
        leader.wait_line("leading", Duration::from_secs(30));
        let (standby, standby_addr) = self.coordinator(model, workers, Some(store), extra);
        standby.wait_line("standby", Duration::from_secs(30));
        let both = format!("{leader_addr},{standby_addr}");
        let workers = (0..workers).map(|_| self.worker(&both, Some(store))).collect();
        until_served(&both, Duration::from_secs(60));
        Ha { leader, leader_addr, standby, standby_addr, both, workers }
    }

    fn worker(&mut self, coordinators: &str, store: Option<&str>) -> (Proc, String) {
        self.worker_with_env(coordinators, store, &[])
    }

    fn worker_with_env(&mut self, coordinators: &str, store: Option<&str>, env: &[(&str, &str)]) -> (Proc, String) {
        let ready = self.ready_path("worker");
        let r = ready.to_str().expect("path");
        // One compute thread each: several workers share 2 cores.
        let mut args = vec!["worker", "--coordinator", coordinators, "--threads", "1", "--transport-timeout", "3", "--ready-file", r];
        if let Some(s) = store {
            args.extend(["--store", s, "--lease-ttl", "2"]);
        }
        let p = Proc::spawn_with_env(&args, env);
        let v = wait_ready_file(&p, &ready, Duration::from_secs(60));
        let id = v["worker_id"].as_str().expect("worker_id").to_string();
        assert!(!id.is_empty() && v["grpc_address"].as_str().is_some() && v["transport_address"].as_str().is_some(), "ready file {v}");
        (p, id)
    }
}

/// kill -9 and reap.
fn kill(p: &mut Proc) {
    let _ = p.child.kill();
    let _ = p.child.wait();
}

/// Every client request succeeded with the single-process tokens of its prompt; (completed, retried).
fn assert_all_served(outs: Vec<Vec<std::process::Output>>, want: &[String], during: &str) -> (usize, usize) {
    let (mut done, mut retried) = (0, 0);
    for (outs, w) in outs.into_iter().zip(want) {
        for o in outs {
            assert!(o.status.success(), "a request failed {during}: {}", text(&o));
            assert_eq!(ids_line(&o).as_deref(), Some(w.as_str()), "other tokens than a single process {during}: {}", text(&o));
            done += 1;
            retried += (!text(&o).contains(", 0 retries")) as usize;
        }
    }
    (done, retried)
}

/// The live ranks of the status's generation, by worker id.
fn ranks_of(s: &switchyard_proto::v1::ClusterStatusResponse) -> Vec<String> {
    s.workers.iter().filter(|w| w.alive && w.generation == s.generation && w.rank < s.world_size).map(|w| w.worker_id.clone()).collect()
}

/// The active placement has `world` ranks, places every expert of every layer, and gives no rank
/// more than `budget` slots of a layer (nor does ClusterStatus report more).
fn assert_placement_covers(addr: &str, s: &switchyard_proto::v1::ClusterStatusResponse, layers: usize, experts: usize, world: usize, budget: usize) {
    let p = grpc::placement(addr).expect("GetPlacement");
    let ranks = placement_ranks(&p.placement_json);
    assert_eq!(ranks.len(), layers, "MoE layers in {}", p.placement_json);
    for (l, rs) in ranks.iter().enumerate() {
        assert_eq!(rs.len(), world, "layer {l}: ranks of {}", p.placement_json);
        for e in 0..experts {
            assert!(rs.iter().any(|r| r.contains(&e)), "layer {l}: expert {e} on no rank: {}", p.placement_json);
        }
        for (r, held) in rs.iter().enumerate() {
            assert!(held.len() <= budget, "layer {l}: rank {r} holds {} slots, budget {budget}", held.len());
        }
    }
    for w in s.workers.iter().filter(|w| w.alive && w.generation == s.generation) {
        assert!(w.slots as usize <= budget, "worker {} reports {} slots, budget {budget}", w.worker_id, w.slots);
    }
    assert!(s.missing_experts.is_empty(), "serving with missing experts: {:?}", s.missing_experts);
}

#[test]
fn a_killed_worker_makes_a_new_generation_over_the_survivors() {
    let etcd = Etcd::start();
    let store = format!("etcd://127.0.0.1:{}/elastic-kill", etcd.client_port);
    let model = model();
    let (layers, experts) = moe_shape(&model);
    // Three survivors hold every expert with a slot to spare: the budget binds, but leaves room.
    let budget = experts.div_ceil(3) + 1;
    let b = budget.to_string();
    let mut g = Group::new();
    let Ha { leader: _leader, leader_addr: addr_a, standby: _standby, both, mut workers, .. } = g.leader_standby_and_workers(&model, &store, 4, &["--max-slots-per-rank", &b]);
    let before = wait_status(&addr_a, Duration::from_secs(10), "4 ranks serving", |s| s.serving && s.world_size == 4);
    assert_eq!(before.max_slots_per_rank as usize, budget);

    let prompts = ["1,2,3,4,5", "7,8,9", "11,12,13,14", "20,21"];
    let want: Vec<String> = prompts.iter().map(|p| local_ids(&model, p, TOKENS)).collect();
    let clients = LoopingClients::start(&both, &prompts, TOKENS, &["--retries", "20"]);
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    let victim = workers[1].1.clone();
    kill(&mut workers[1].0);
    let s = wait_status(&addr_a, Duration::from_secs(45), "a generation over the 3 survivors", |s| {
        s.generation > before.generation && s.world_size == 3 && s.serving
    });
    let regrouped = killed.elapsed();
    assert!(!ranks_of(&s).contains(&victim), "the killed worker {victim} is a rank of generation {}", s.generation);
    assert_eq!(ranks_of(&s).len(), 3, "{s:#?}");
    assert_placement_covers(&addr_a, &s, layers, experts, 3, budget);

    // A fresh worker joins under load: a rank of the next generation.
    let joined = Instant::now();
    let (_w4, id4) = g.worker(&both, Some(&store));
    let s4 = wait_status(&addr_a, Duration::from_secs(45), "the joined worker a rank of a 4-rank generation", |x| {
        x.generation > s.generation && x.world_size == 4 && x.serving && ranks_of(x).contains(&id4)
    });
    let join_s = joined.elapsed();
    assert_placement_covers(&addr_a, &s4, layers, experts, 4, budget);
    std::thread::sleep(Duration::from_millis(500));
    let (done, retried) = assert_all_served(clients.finish(), &want, "across the death and the join");
    eprintln!(
        "killed worker: generation {} -> {} over 3 survivors {:.2} s after the kill; joined worker a rank of generation {} after {:.2} s; {done} requests completed, {retried} retried, 0 failed",
        before.generation,
        s.generation,
        regrouped.as_secs_f64(),
        s4.generation,
        join_s.as_secs_f64()
    );
    drop(etcd);
}

#[test]
fn a_drained_rank_leaves_without_failing_a_request() {
    let model = model();
    let mut g = Group::new();
    let (_c, addr) = g.coordinator(&model, 3, None, &[]);
    let _workers: Vec<(Proc, String)> = (0..3).map(|_| g.worker(&addr, None)).collect();
    until_served(&addr, Duration::from_secs(60));
    let before = wait_status(&addr, Duration::from_secs(10), "3 ranks serving", |s| s.serving && s.world_size == 3);
    let drained = before.workers.iter().find(|w| w.rank == 1).map(|w| w.worker_id.clone()).expect("a rank 1");

    let prompts = ["2,4,6,8", "3,5,7", "10,20,30"];
    let want: Vec<String> = prompts.iter().map(|p| local_ids(&model, p, TOKENS)).collect();
    // No retries: a drain must not fail a request, not even a retryable one.
    let clients = LoopingClients::start(&addr, &prompts, TOKENS, &["--retries", "0"]);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let o = switchyard(&["drain", "--rank", "1", "--endpoint", &addr, "--token", TOKEN]);
    assert!(o.status.success(), "drain: {}", text(&o));
    let s = wait_status(&addr, Duration::from_secs(45), "a 2-rank generation without the drained rank", |s| {
        s.generation > before.generation && s.world_size == 2 && s.serving
    });
    assert!(!ranks_of(&s).contains(&drained), "the drained worker {drained} is still a rank: {s:#?}");
    std::thread::sleep(Duration::from_millis(500));
    let (done, _) = assert_all_served(clients.finish(), &want, "during the drain");
    eprintln!("drain: rank 1 left after {:.2} s (generation {} -> {}); {done} requests, none failed", t0.elapsed().as_secs_f64(), before.generation, s.generation);
}

/// A worker that computes on GPUs asks to join a group of CPU workers (a real coordinator, its
/// Control API called as a worker would): refused with FAILED_PRECONDITION and a stable code,
/// and the group keeps serving as it was.
#[test]
fn a_worker_of_the_other_device_kind_is_refused_and_the_group_serves_on() {
    use switchyard_proto::v1 as pb;
    let model = model();
    let mut g = Group::new();
    let (_c, addr) = g.coordinator(&model, 1, None, &[]);
    let _w = g.worker(&addr, None);
    until_served(&addr, Duration::from_secs(60));
    let before = wait_status(&addr, Duration::from_secs(10), "1 rank serving", |s| s.serving && s.world_size == 1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let refused = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("url").connect().await.expect("connect");
        let req = pb::RegisterRequest { grpc_address: "127.0.0.1:1".into(), transport_address: "127.0.0.1:2".into(), rank_hint: -1, node: "gpu-node".into(), worker_id: String::new(), gpus: 1 };
        pb::control_client::ControlClient::new(ch).register(req).await.expect_err("a GPU worker beside a CPU one")
    });
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("CONTROL_MIXED_COMPUTE") && refused.message().contains("one kind of device"), "{}", refused.message());
    std::thread::sleep(Duration::from_millis(500));
    let after = wait_status(&addr, Duration::from_secs(10), "still serving", |s| s.serving);
    assert_eq!((after.generation, after.world_size, after.workers.len()), (before.generation, 1, before.workers.len()), "nothing changed: {after:#?}");
}

#[test]
fn survivors_without_room_refuse_clearly_then_recover_when_a_worker_joins() {
    let model = model();
    let (layers, experts) = moe_shape(&model);
    // Two ranks fill their budget: one alone cannot hold every expert.
    let budget = experts / 2;
    let b = budget.to_string();
    let mut g = Group::new();
    let (c, addr) = g.coordinator(&model, 2, None, &["--max-slots-per-rank", &b]);
    let mut workers: Vec<(Proc, String)> = (0..2).map(|_| g.worker(&addr, None)).collect();
    until_served(&addr, Duration::from_secs(60));
    let want = local_ids(&model, "5,6,7", TOKENS);
    kill(&mut workers[1].0);
    let s = wait_status(&addr, Duration::from_secs(45), "not serving, experts missing", |s| !s.serving && !s.missing_experts.is_empty());
    // The survivor keeps its own experts (its budget is full): the dead rank's are missing.
    assert_eq!(s.missing_experts.len(), layers * (experts - budget), "missing {:?}", s.missing_experts);
    assert!(!s.not_serving_reason.is_empty(), "{s:#?}");
    assert_eq!(grpc::serving(&addr, INFERENCE), Some(false), "gRPC health while experts are missing");
    // The leader stays ready (switchyard.v1.Control): the worker that brings the room registers
    // through the same Service.
    assert_eq!(grpc::serving(&addr, "switchyard.v1.Control"), Some(true), "the leader's readiness while experts are missing");
    let o = generate_at(&addr, &["--prompt-ids", "5,6,7", "--max-tokens", &TOKENS.to_string(), "--retries", "0"]);
    let t = text(&o).to_lowercase();
    assert!(!o.status.success() && t.contains("unavailable") && t.contains("missing") && t.contains("expert"), "{}", text(&o));

    let t0 = Instant::now();
    let (_w2, id2) = g.worker(&addr, None);
    let s2 = wait_status(&addr, Duration::from_secs(45), "serving again with the joined worker", |s| s.serving && ranks_of(s).contains(&id2));
    assert!(s2.missing_experts.is_empty() && s2.world_size == 2, "{s2:#?}");
    let o = generate_at(&addr, &["--prompt-ids", "5,6,7", "--max-tokens", &TOKENS.to_string(), "--retries", "0"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
    assert_eq!(grpc::serving(&addr, INFERENCE), Some(true), "gRPC health once serving again");
    assert!(!c.has_line("panicked"), "{:?}", c.lines.lock().expect("lines"));
    eprintln!("no room: {} experts missing after the death; serving again {:.2} s after a worker joined", s.missing_experts.len(), t0.elapsed().as_secs_f64());
}

/// The coordinator's first "generation N serving: WHAT" line with N above `after` (a generation
/// that could not form skips its number).
fn generation_line(c: &Proc, after: u64, what: &str, timeout: Duration) -> (u64, String) {
    let deadline = Instant::now() + timeout;
    loop {
        for n in after + 1..after + 16 {
            let want = format!("generation {n} serving: {what}");
            if c.has_line(&want) {
                return (n, c.wait_line(&want, Duration::ZERO));
            }
        }
        assert!(Instant::now() < deadline, "no generation above {after} serving {what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_min_replicas_a_death_needs_no_loading_before_serving() {
    let etcd = Etcd::start();
    let store = format!("etcd://127.0.0.1:{}/elastic-replicas", etcd.client_port);
    let model = model();
    let (_, experts) = moe_shape(&model);
    let b = experts.to_string();
    let mut g = Group::new();
    let (c, addr) = g.coordinator(&model, 3, Some(&store), &["--min-replicas", "2", "--max-slots-per-rank", &b]);
    let mut workers: Vec<(Proc, String)> = (0..3).map(|_| g.worker(&addr, Some(&store))).collect();
    until_served(&addr, Duration::from_secs(60));
    let before = wait_status(&addr, Duration::from_secs(10), "3 ranks serving", |s| s.serving && s.world_size == 3);
    assert_eq!(before.min_replicas, 2);
    // Every expert of every layer is on two ranks at least.
    let p = grpc::placement(&addr).expect("GetPlacement");
    for (l, rs) in placement_ranks(&p.placement_json).iter().enumerate() {
        for e in 0..experts {
            assert!(rs.iter().filter(|r| r.contains(&e)).count() >= 2, "layer {l}: expert {e} on fewer than 2 ranks: {}", p.placement_json);
        }
    }
    let bytes_before: std::collections::HashMap<String, u64> = before.workers.iter().map(|w| (w.worker_id.clone(), w.loaded_expert_bytes)).collect();
    let prompts = ["1,3,5", "2,4,6,8"];
    let want: Vec<String> = prompts.iter().map(|p| local_ids(&model, p, TOKENS)).collect();
    let clients = LoopingClients::start(&addr, &prompts, TOKENS, &["--retries", "20"]);
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    kill(&mut workers[2].0);
    // The first generation after the kill serves with what the survivors hold: nothing loaded.
    let (quick, line) = generation_line(&c, before.generation, "2 ranks", Duration::from_secs(30));
    assert!(line.contains(", 0 experts loaded"), "survivors loaded experts before serving: {line}");
    let s = wait_status(&addr, Duration::from_secs(30), "serving over the 2 survivors", |s| {
        s.generation >= quick && s.world_size == 2 && s.serving
    });
    for w in s.workers.iter().filter(|w| w.alive && w.generation == quick) {
        assert_eq!(Some(&w.loaded_expert_bytes), bytes_before.get(&w.worker_id), "survivor {} loaded experts before serving: {s:#?}", w.worker_id);
    }
    until_served(&addr, Duration::from_secs(10));
    let back = killed.elapsed();
    eprintln!("min-replicas 2: serving again {:.2} s after the kill, 0 bytes loaded", back.as_secs_f64());
    assert!(back < Duration::from_secs(5), "serving again took {back:?}");
    // Then, while serving, the next generation restores the floor: every expert on 2 ranks.
    generation_line(&c, quick, "2 ranks", Duration::from_secs(30));
    let p = grpc::placement(&addr).expect("GetPlacement");
    for (l, rs) in placement_ranks(&p.placement_json).iter().enumerate() {
        for e in 0..experts {
            assert!(rs.iter().filter(|r| r.contains(&e)).count() >= 2, "layer {l}: expert {e} not back on 2 ranks: {}", p.placement_json);
        }
    }
    let (done, retried) = assert_all_served(clients.finish(), &want, "across the death");
    eprintln!("{done} requests completed, {retried} retried, 0 failed");
    drop(etcd);
}

#[test]
fn a_standby_reports_not_serving_on_grpc_health() {
    let etcd = Etcd::start();
    let store = format!("etcd://127.0.0.1:{}/elastic-health", etcd.client_port);
    let model = model();
    let mut g = Group::new();
    let Ha { leader: mut a, leader_addr: addr_a, standby: _b, standby_addr: addr_b, both: _, workers: _w } =
        g.leader_standby_and_workers(&model, &store, 2, &[]);
    assert_eq!(grpc::serving(&addr_a, INFERENCE), Some(true), "the leader's gRPC health");
    assert_eq!(grpc::serving(&addr_b, INFERENCE), Some(false), "the standby's gRPC health");
    assert_eq!(grpc::serving(&addr_b, "switchyard.v1.Control"), Some(false), "the standby's readiness");
    assert_eq!(grpc::serving(&addr_a, "switchyard.v1.Control"), Some(true), "the leader's readiness");
    // The standby takes over: it reports SERVING once it leads and serves.
    kill(&mut a);
    until_served(&addr_b, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(10);
    while grpc::serving(&addr_b, INFERENCE) != Some(true) {
        assert!(Instant::now() < deadline, "the new leader still reports NOT_SERVING");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(etcd);
}

/// The leader dies while a join's generation is being formed (the joiner stalls in its regroup,
/// a failpoint): the standby takes over the joiner from its membership lease, plans above every
/// generation the workers were asked for, and finishes the join; no request is lost.
#[test]
fn the_leader_killed_during_a_generation_change_leaves_it_to_the_standby() {
    let etcd = Etcd::start();
    let store = format!("etcd://127.0.0.1:{}/elastic-leader-mid-change", etcd.client_port);
    let model = model();
    let mut g = Group::new();
    let Ha { leader: mut a, leader_addr: _, standby: b, standby_addr: addr_b, both, workers: _w } =
        g.leader_standby_and_workers(&model, &store, 2, &[]);
    let prompts = ["1,2,3", "4,5,6,7"];
    let want: Vec<String> = prompts.iter().map(|p| local_ids(&model, p, TOKENS)).collect();
    let clients = LoopingClients::start(&both, &prompts, TOKENS, &["--retries", "20"]);
    // The joiner takes 4 s in its regroup to generation 2: the leader dies meanwhile.
    let (_joiner, joiner_id) = g.worker_with_env(&both, Some(&store), &[("SWITCHYARD_FAILPOINTS", "worker.regroup.generation2=sleep(4000)")]);
    a.wait_line("registered", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!a.has_line("generation 2 serving"), "generation 2 formed before the kill: the failpoint did not hold it");
    kill(&mut a);
    b.wait_line(&format!("took over worker {joiner_id}"), Duration::from_secs(30));
    let s = wait_status(&addr_b, Duration::from_secs(60), "the standby finished the join", |s| s.serving && s.world_size == 3);
    assert!(s.generation > 2, "the new leader reused generation {}: workers had been asked for 2", s.generation);
    assert!(ranks_of(&s).contains(&joiner_id), "the joiner is not a rank: {s:#?}");
    let (done, retried) = assert_all_served(clients.finish(), &want, "across the leader's death mid-change");
    eprintln!("leader killed mid-change: generation {} over 3 ranks on the standby; {done} requests completed, {retried} retried, 0 failed", s.generation);
    drop(etcd);
}
