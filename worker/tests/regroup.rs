//! Generations of the expert-parallel group, through the worker's gRPC service in one process
//! (real TCP meshes over 127.0.0.1, the fixture model): a dead peer, a frozen peer, a joining
//! rank, stale and superseded regroups, and the engine's rollback of a failed step.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::worker_server::Worker;
use tokio_stream::StreamExt;
use tonic::Request;
use worker::moe::{ExpertExecutor, LocalExperts, MoeLayer, Routing};
use worker::service::{WorkerConfig, WorkerMetrics, WorkerService};
use worker::transport::tcp::TcpTransport;
use worker::{Engine, EngineConfig, LoadOptions, Model, ModelError};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

const MODEL: &str = "qwen3_moe";
const TOKENS: u32 = 200;

/// One worker of the test: its service and the address its transport listener is bound to.
struct Node {
    svc: WorkerService,
    addr: String,
}

fn node(transport_timeout: Duration) -> Node {
    let l = TcpTransport::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let cfg = WorkerConfig {
        transport_timeout,
        connect_timeout: Duration::from_secs(30),
        regroup_timeout: Duration::from_secs(30),
        ..WorkerConfig::new(l)
    };
    Node { svc: WorkerService::new(cfg, Arc::new(WorkerMetrics::new().expect("metrics"))), addr }
}

/// A placement over `world` ranks covering every expert: rank r holds the experts e with
/// e % world == r, padded with replicas to the same slot count on every rank.
fn placement_json(world: usize) -> String {
    let c = worker::ModelConfig::from_dir(&fixture(MODEL)).expect("config");
    let (n_l, n_e) = (c.moe_layers().len(), c.router.n_experts);
    let slots = n_e.div_ceil(world);
    let layers = (0..n_l)
        .map(|_| {
            let ranks = (0..world)
                .map(|r| {
                    let mut v: Vec<usize> = (0..n_e).filter(|e| e % world == r).collect();
                    let mut extra = (0..n_e).filter(|e| e % world != r);
                    while v.len() < slots {
                        v.push(extra.next().expect("enough experts to pad"));
                    }
                    v
                })
                .collect();
            placement::placement::LayerPlacement { ranks }
        })
        .collect();
    let topo = placement::topology::Topology::uniform(world, 1).expect("topology");
    serde_json::to_string(&placement::placement::Placement::new(n_e, topo, layers)).expect("json")
}

fn regroup_req(generation: u64, rank: usize, peers: &[String]) -> Request<pb::RegroupRequest> {
    let world = peers.len();
    Request::new(pb::RegroupRequest {
        generation,
        assignment: Some(pb::Assignment {
            rank: rank as u32,
            world_size: world as u32,
            peer_addresses: peers.to_vec(),
            peer_nodes: vec![0; world],
            placement_json: placement_json(world),
            model_path: fixture(MODEL).display().to_string(),
            epoch: 1,
            transport: "tcp".into(),
            ..Default::default()
        }),
    })
}

/// Regroup every node (rank = index) into `generation` at once.
async fn regroup_all(nodes: &[&Node], generation: u64) -> Vec<pb::RegroupResponse> {
    let peers: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let calls = nodes.iter().enumerate().map(|(r, n)| {
        let (svc, req) = (n.svc.clone(), regroup_req(generation, r, &peers));
        tokio::spawn(async move { svc.regroup(req).await })
    });
    let mut out = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        out.push(c.await.expect("join").expect("regroup").into_inner());
    }
    out
}

fn prompt(i: usize) -> Vec<u32> {
    (0..6).map(|j| ((i * 37 + j * 11) % 200 + 1) as u32).collect()
}

/// The tokens of a single-process greedy run.
fn expected(prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let model = Arc::new(Model::load(&fixture(MODEL), &LoadOptions::default()).expect("load"));
    let mut e = Engine::new(model, EngineConfig::default());
    let ids: Vec<u64> = prompts.iter().map(|p| e.add_request(worker::Request::new(p.clone(), TOKENS as usize)).expect("add")).collect();
    let out = e.run_to_completion().expect("run");
    ids.iter().map(|id| out[id].0.clone()).collect()
}

/// A request's stream, collected on a task: its tokens so far are visible through `seen`.
struct Stream {
    seen: Arc<std::sync::atomic::AtomicUsize>,
    done: tokio::task::JoinHandle<Result<Vec<u32>, tonic::Status>>,
}

async fn start(svc: &WorkerService, ids: Vec<u32>) -> Stream {
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        max_tokens: TOKENS,
        ..Default::default()
    };
    let mut s = svc.generate(Request::new(req)).await.expect("generate").into_inner();
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    let done = tokio::spawn(async move {
        let mut toks = Vec::new();
        while let Some(m) = s.next().await {
            let m = m?;
            toks.push(m.token_id);
            count.store(toks.len(), std::sync::atomic::Ordering::SeqCst);
            if m.finish_reason != 0 {
                break;
            }
        }
        Ok(toks)
    });
    Stream { seen, done }
}

/// Wait until every stream has at least `n` tokens.
async fn until_tokens(streams: &[&Stream], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while streams.iter().any(|s| s.seen.load(std::sync::atomic::Ordering::SeqCst) < n) {
        assert!(Instant::now() < deadline, "no tokens within 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn health(svc: &WorkerService) -> pb::WorkerHealthResponse {
    svc.health(Request::new(pb::WorkerHealthRequest::default())).await.expect("health").into_inner()
}

/// Rank 2 of 3 dies mid-generation: ranks 0 and 1 pause, regroup into generation 2 (world 2),
/// and their sequences finish with the tokens of a single-process run, KV caches kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_peer_is_regrouped_away_and_sequences_continue() {
    let nodes: Vec<Node> = (0..3).map(|_| node(Duration::from_secs(60))).collect();
    let gen1 = regroup_all(&nodes.iter().collect::<Vec<_>>(), 1).await;
    assert!(gen1.iter().all(|r| r.generation == 1 && r.loaded_experts > 0 && r.kept_sequences == 0), "{gen1:?}");
    let prompts: Vec<Vec<u32>> = (0..6).map(prompt).collect();
    let want = expected(&prompts);
    let mut streams = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        streams.push(start(&nodes[i % 3].svc, p.clone()).await);
    }
    until_tokens(&streams.iter().collect::<Vec<_>>(), 3).await;
    nodes[2].svc.shutdown();
    // The survivors' collectives fail: they pause and wait for a regroup.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(health(&nodes[0].svc).await.paused && health(&nodes[1].svc).await.paused) {
        assert!(Instant::now() < deadline, "survivors did not pause");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gen2 = regroup_all(&[&nodes[0], &nodes[1]], 2).await;
    for (r, g) in gen2.iter().enumerate() {
        assert_eq!(g.generation, 2);
        assert!(g.kept_sequences > 0, "rank {r} kept no sequences: {g:?}");
        assert!(g.loaded_experts > 0 && g.kept_experts > 0 && g.loaded_bytes > 0, "rank {r}: {g:?}");
    }
    for (i, s) in streams.into_iter().enumerate() {
        let got = s.done.await.expect("join");
        if i % 3 == 2 {
            let e = got.expect_err("the dead rank's requests fail");
            assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        } else {
            assert_eq!(got.expect("tokens"), want[i], "request {i} on rank {}", i % 3);
        }
    }
    let h = health(&nodes[0].svc).await;
    assert_eq!((h.generation, h.world_size, h.paused, h.degraded), (2, 2, false, false));
    assert!(h.loaded_expert_bytes > 0);
}

/// A frozen peer (its sockets open, it never steps): ranks blocked in a collective with it are
/// interrupted by the regroup at once, not after the 120 s transport timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_peer_is_interrupted_by_the_regroup_promptly() {
    let nodes: Vec<Node> = (0..2).map(|_| node(Duration::from_secs(120))).collect();
    let frozen_l = TcpTransport::bind("127.0.0.1:0").expect("bind");
    let frozen_addr = frozen_l.local_addr().expect("addr").to_string();
    let peers = vec![nodes[0].addr.clone(), nodes[1].addr.clone(), frozen_addr];
    // Rank 2 joins the mesh of generation 1 and then does nothing.
    let p = peers.clone();
    let frozen = std::thread::spawn(move || {
        TcpTransport::connect_generation(2, &frozen_l, &p, 1, Duration::from_secs(30), Duration::from_secs(120), &|| false)
    });
    let calls: Vec<_> = (0..2)
        .map(|r| {
            let (svc, req) = (nodes[r].svc.clone(), regroup_req(1, r, &peers));
            tokio::spawn(async move { svc.regroup(req).await })
        })
        .collect();
    for c in calls {
        c.await.expect("join").expect("regroup 1");
    }
    let _frozen = frozen.join().expect("frozen thread").expect("frozen mesh");
    let prompts: Vec<Vec<u32>> = (0..2).map(prompt).collect();
    let want = expected(&prompts);
    let streams = vec![start(&nodes[0].svc, prompts[0].clone()).await, start(&nodes[1].svc, prompts[1].clone()).await];
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(streams.iter().all(|s| s.seen.load(std::sync::atomic::Ordering::SeqCst) == 0), "a step finished without rank 2");
    let t0 = Instant::now();
    regroup_all(&[&nodes[0], &nodes[1]], 2).await;
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(s.done.await.expect("join").expect("tokens"), want[i], "request {i}");
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(30), "regroup and finish took {took:?} (transport timeout 120 s)");
}

/// 2 → 3: a new rank joins generation 2 under load; the running sequences keep their caches and
/// every request (the new rank's too) gets the tokens of a single-process run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_rank_under_load_keeps_tokens_identical() {
    let nodes: Vec<Node> = (0..3).map(|_| node(Duration::from_secs(60))).collect();
    regroup_all(&[&nodes[0], &nodes[1]], 1).await;
    let prompts: Vec<Vec<u32>> = (0..5).map(prompt).collect();
    let want = expected(&prompts);
    let mut streams = Vec::new();
    for (i, p) in prompts.iter().take(4).enumerate() {
        streams.push(start(&nodes[i % 2].svc, p.clone()).await);
    }
    until_tokens(&streams.iter().collect::<Vec<_>>(), 3).await;
    let gen2 = regroup_all(&nodes.iter().collect::<Vec<_>>(), 2).await;
    assert!(gen2[0].kept_sequences > 0 && gen2[1].kept_sequences > 0, "{gen2:?}");
    assert_eq!(gen2[2].kept_experts, 0, "the new rank had nothing to keep");
    assert!(gen2[0].kept_experts > 0 && gen2[1].kept_experts > 0, "{gen2:?}");
    streams.push(start(&nodes[2].svc, prompts[4].clone()).await);
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(s.done.await.expect("join").expect("tokens"), want[i], "request {i}");
    }
    for n in &nodes {
        let h = health(&n.svc).await;
        assert_eq!((h.generation, h.world_size), (2, 3));
    }
}

/// A generation not after the newest one is refused; a newer regroup makes an older one still
/// building its mesh give up at once; a world of 1 serves over the same executor path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_generations_are_refused_and_superseded_builds_abort() {
    let n = node(Duration::from_secs(60));
    // Generation 2 waits for a rank 1 that never comes.
    let silent = TcpTransport::bind("127.0.0.1:0").expect("bind");
    let peers = vec![n.addr.clone(), silent.local_addr().expect("addr").to_string()];
    let (svc, req) = (n.svc.clone(), regroup_req(2, 0, &peers));
    let pending = tokio::spawn(async move { svc.regroup(req).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    let solo = n.svc.regroup(regroup_req(3, 0, std::slice::from_ref(&n.addr))).await.expect("generation 3").into_inner();
    let e = pending.await.expect("join").expect_err("superseded");
    assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "the superseded build took {:?} to give up", t0.elapsed());
    assert_eq!(solo.generation, 3);
    for g in [1, 2, 3] {
        let e = n.svc.regroup(regroup_req(g, 0, std::slice::from_ref(&n.addr))).await.expect_err("stale");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "generation {g}: {e:?}");
    }
    let want = expected(&[prompt(7)]);
    let s = start(&n.svc, prompt(7)).await;
    assert_eq!(s.done.await.expect("join").expect("tokens"), want[0]);
    let h = health(&n.svc).await;
    assert_eq!((h.generation, h.world_size), (3, 1));
}

/// Fails on the second MoE layer: the first layers' caches have this step's tokens by then.
struct FailSecondLayer;

impl ExpertExecutor for FailSecondLayer {
    fn run(&self, layer: &MoeLayer, x: &[f32], t: usize, routing: &Routing) -> worker::error::Result<Vec<f32>> {
        if layer.moe_index >= 1 {
            return Err(ModelError::ExpertParallel("injected collective failure".into()));
        }
        LocalExperts.run(layer, x, t, routing)
    }
}

/// A step whose forward fails midway leaves every KV cache as it was, and the sequences then
/// finish with the tokens of an engine that never failed.
#[test]
fn a_failed_forward_leaves_the_caches_as_before() {
    let model = Arc::new(Model::load(&fixture(MODEL), &LoadOptions::default()).expect("load"));
    let prompts: Vec<Vec<u32>> = (0..3).map(prompt).collect();
    let want = expected(&prompts);
    let mut e = Engine::new(model, EngineConfig { max_batch_tokens: 8, ..Default::default() });
    for p in &prompts {
        e.add_request(worker::Request::new(p.clone(), TOKENS as usize)).expect("add");
    }
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut failures = 0;
    let mut step = 0;
    while e.has_work() {
        step += 1;
        // Every third step fails (prefill chunks and decodes alike).
        if step % 3 == 0 {
            let before = e.cached_tokens();
            e.set_executor(Arc::new(FailSecondLayer));
            assert!(e.step().is_err(), "the injected failure did not fail the step");
            // Sequences admitted by the failed step have empty caches; the others are unchanged.
            let (old, admitted): (Vec<_>, Vec<_>) = e.cached_tokens().into_iter().partition(|c| before.iter().any(|b| b.0 == c.0));
            assert_eq!(old, before, "step {step}: a failed step changed the caches");
            assert!(admitted.iter().all(|c| (c.1, c.2) == (0, 0)), "step {step}: {admitted:?}");
            e.set_executor(Arc::new(LocalExperts));
            failures += 1;
            continue;
        }
        for ev in e.step().expect("step") {
            if let Some(t) = ev.token {
                got[ev.id as usize].push(t);
            }
        }
    }
    assert!(failures > 10);
    assert_eq!(got, want);
}
