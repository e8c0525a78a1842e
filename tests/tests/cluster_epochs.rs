//! Placement epochs on a real cluster (`switchyard up`, worker processes, gRPC admin API):
//! a change under load keeps every token, a failed prepare abandons the epoch, bad input and bad
//! tokens are refused before any worker changes.
mod common;
use common::*;
use std::path::Path;

const TOKEN: &str = "s3cret-admin-token";

fn status_json(ep: &str) -> serde_json::Value {
    let o = switchyard(&["status", "--endpoint", ep, "--token", TOKEN, "--json"]);
    assert!(o.status.success(), "status: {}", text(&o));
    serde_json::from_slice(&o.stdout).expect("status JSON")
}

fn worker_epochs(v: &serde_json::Value) -> Vec<u64> {
    v["workers"].as_array().expect("workers").iter().map(|w| w["epoch"].as_u64().expect("epoch")).collect()
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write");
    p.display().to_string()
}

#[test]
fn placement_epochs_change_under_load_without_changing_tokens() {
    let model = fixture("mixtral");
    let (layers, experts) = moe_shape(&model);
    let cl = Cluster::up_with(&model, 2, &["--admin-token".into(), TOKEN.into()]);
    let ep = cl.endpoint();
    let tmp = tempfile::tempdir().expect("tmp");
    let replicas = write(tmp.path(), "replicas.json", &replica_placement(layers, experts, 2));
    let prompts = ["1,2,3,4,5", "7,8,9", "11,12,13,14,15,16,17", "20,21", "30,31,32,33", "40,41,42"];
    let want: Vec<String> = prompts.iter().map(|p| local_ids(&model, p, 24)).collect();
    // Clients stream, one request after another, until both placement changes went through.
    let clients = LoopingClients::start(&ep, &prompts, 24, &[]);
    let o = switchyard(&["place", "apply", &replicas, "--endpoint", &ep, "--token", TOKEN]);
    assert!(o.status.success(), "apply: {}", text(&o));
    assert!(text(&o).contains("placement epoch 2 active"), "{}", text(&o));
    let s = status_json(&ep);
    assert_eq!(s["epoch"], 2);
    assert_eq!(worker_epochs(&s), vec![2, 2]);
    // And back to contiguous (epoch 3): slots are dropped and re-read.
    let per = experts.div_ceil(2);
    let ranks: Vec<Vec<usize>> = (0..2).map(|r| (r * per..((r + 1) * per).min(experts)).collect()).collect();
    let contiguous = serde_json::json!({
        "format": "switchyard.placement.v1", "num_layers": layers, "num_experts": experts,
        "topology": {"nodes": [[0, 1]]}, "layers": (0..layers).map(|_| serde_json::json!({"ranks": ranks})).collect::<Vec<_>>()
    });
    let contiguous = write(tmp.path(), "contiguous.json", &contiguous.to_string());
    let o = switchyard(&["place", "apply", &contiguous, "--endpoint", &ep, "--token", TOKEN]);
    assert!(o.status.success(), "apply contiguous: {}", text(&o));
    assert_eq!(worker_epochs(&status_json(&ep)), vec![3, 3]);
    for (outs, w) in clients.finish().into_iter().zip(&want) {
        for o in outs {
            assert!(o.status.success(), "generate during the change: {}", text(&o));
            assert_eq!(ids_line(&o).as_deref(), Some(w.as_str()), "tokens changed across a placement epoch");
        }
    }
    // After the changes, still the reference tokens.
    let o = cl.generate(&["--prompt-ids", prompts[0], "--max-tokens", "24"]);
    assert_eq!(ids_line(&o).as_deref(), Some(want[0].as_str()));
}

#[test]
fn a_prepare_that_fails_on_one_worker_abandons_the_epoch() {
    let model = fixture("qwen3_moe");
    let (layers, experts) = moe_shape(&model);
    let cl = Cluster::up_with_env(
        &model,
        2,
        &["--admin-token".into(), TOKEN.into()],
        &[("SWITCHYARD_FAILPOINTS", "worker.prepare.rank1")],
    );
    let ep = cl.endpoint();
    let tmp = tempfile::tempdir().expect("tmp");
    let replicas = write(tmp.path(), "replicas.json", &replica_placement(layers, experts, 2));
    let o = switchyard(&["place", "apply", &replicas, "--endpoint", &ep, "--token", TOKEN]);
    assert!(!o.status.success(), "apply must fail: {}", text(&o));
    let t = text(&o);
    assert!(t.contains("abandoned") && t.contains("rank 1") && t.contains("worker.prepare.rank1"), "{t}");
    let s = status_json(&ep);
    assert_eq!(s["epoch"], 1);
    assert_eq!(worker_epochs(&s), vec![1, 1]);
    // Serving goes on with the old epoch, with the reference tokens.
    let want = local_ids(&model, "5,6,7,8", 12);
    let o = cl.generate(&["--prompt-ids", "5,6,7,8", "--max-tokens", "12"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
}

#[test]
fn admin_calls_need_the_token_and_bad_placements_never_reach_workers() {
    let model = fixture("mixtral");
    let (layers, experts) = moe_shape(&model);
    let cl = Cluster::up_with(&model, 2, &["--admin-token".into(), TOKEN.into()]);
    let ep = cl.endpoint();
    let tmp = tempfile::tempdir().expect("tmp");
    let good = write(tmp.path(), "good.json", &replica_placement(layers, experts, 2));
    // Wrong token, and no token at all (the flag is required; an empty one is sent as none).
    for args in [vec!["--token", "wrong"], vec!["--token", ""]] {
        let mut a = vec!["place", "apply", good.as_str(), "--endpoint", ep.as_str()];
        a.extend(args);
        let o = switchyard(&a);
        assert!(!o.status.success());
        assert!(text(&o).contains("Unauthenticated"), "{}", text(&o));
        let mut a = vec!["status", "--endpoint", ep.as_str()];
        a.extend(["--token", "wrong"]);
        assert!(text(&switchyard(&a)).contains("wrong admin token"));
    }
    // Malformed files are refused by the CLI; wrong shapes by the coordinator.
    let cases = [
        ("garbage.json", "{ not json".to_string(), "placement"),
        ("three_ranks.json", replica_placement(layers, experts, 3), "3 ranks, the group has 2"),
        ("wrong_layers.json", replica_placement(layers + 1, experts, 2), "MoE layers"),
    ];
    for (name, body, want) in cases {
        let f = write(tmp.path(), name, &body);
        let o = switchyard(&["place", "apply", &f, "--endpoint", &ep, "--token", TOKEN]);
        assert!(!o.status.success(), "{name} accepted");
        assert!(text(&o).contains(want), "{name}: {}", text(&o));
    }
    let s = status_json(&ep);
    assert_eq!(s["epoch"], 1);
    assert_eq!(worker_epochs(&s), vec![1, 1]);
    // A coordinator started without a token has its admin API off.
    let cl2 = Cluster::up(&model, 1, None);
    let o = switchyard(&["status", "--endpoint", &cl2.endpoint(), "--token", TOKEN]);
    assert!(!o.status.success());
    assert!(text(&o).contains("admin API is off"), "{}", text(&o));
}
