//! The scheduler on a real cluster: the rebalance policy drives placement epochs from the live
//! load while clients stream (tokens unchanged); a window without traffic changes nothing; live
//! statistics and `trace record` feed the placement commands.
mod common;
use common::*;
use std::time::{Duration, Instant};

const TOKEN: &str = "scheduler-test-token";

fn stats(ep: &str) -> serde_json::Value {
    let o = switchyard(&["stats", "--endpoint", ep, "--token", TOKEN, "--json"]);
    assert!(o.status.success(), "stats: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("stats JSON")
}

fn up_rebalancing(model: &std::path::Path) -> Cluster {
    up_rebalancing_env(model, &[])
}

fn up_rebalancing_env(model: &std::path::Path, env: &[(&str, &str)]) -> Cluster {
    let args: Vec<std::ffi::OsString> = [
        "--admin-token", TOKEN, "--rebalance", "--rebalance-threshold", "0.999", "--rebalance-target", "1.0",
        "--rebalance-margin", "0.0", "--rebalance-min-interval", "1",
    ]
    .iter()
    .map(Into::into)
    .collect();
    Cluster::up_with_env(model, 2, &args, env)
}

#[test]
fn a_migration_that_fails_to_load_on_one_worker_is_abandoned_and_serving_goes_on() {
    let model = fixture("qwen3_moe");
    let cl = up_rebalancing_env(&model, &[("SWITCHYARD_FAILPOINTS", "worker.prepare.rank1")]);
    let ep = cl.endpoint();
    let want = local_ids(&model, "1,2,3,4,5", 24);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = generate_at(&ep, &["--prompt-ids", "1,2,3,4,5", "--max-tokens", "24"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
        let s = stats(&ep);
        if s["abandoned_epochs"].as_u64().unwrap_or(0) >= 1 {
            assert_eq!(s["migrations"], 0, "{s}");
            assert_eq!(s["epoch"], 1, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "the policy never tried a migration: {s}");
    }
    let o = switchyard(&["status", "--endpoint", &ep, "--token", TOKEN, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status");
    assert!(v["workers"].as_array().expect("workers").iter().all(|w| w["epoch"] == 1), "{v}");
}

#[test]
fn the_policy_moves_experts_under_load_and_tokens_stay_the_same() {
    let model = fixture("qwen3_moe");
    let cl = up_rebalancing(&model);
    let ep = cl.endpoint();
    let prompts = ["1,2,3,4,5", "7,8,9", "11,12,13,14,15,16,17", "20,21"];
    let want: Vec<String> = prompts.iter().map(|p| local_ids(&model, p, 24)).collect();
    let clients = LoopingClients::start(&ep, &prompts, 24, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = stats(&ep);
        if s["migrations"].as_u64().unwrap_or(0) >= 1 {
            break s;
        }
        assert!(Instant::now() < deadline, "the policy never rebalanced: {s}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(s["longest_step_during_migration_us"].as_u64().is_some(), "{s}");
    std::thread::sleep(Duration::from_millis(500));
    for (outs, w) in clients.finish().into_iter().zip(&want) {
        for o in outs {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(ids_line(&o).as_deref(), Some(w.as_str()), "tokens changed across a scheduler migration");
        }
    }
    assert!(s["epoch"].as_u64().unwrap_or(0) >= 2, "{s}");
    assert!(s["migrated_experts"].as_u64().unwrap_or(0) >= 1, "{s}");
    eprintln!("scheduler: {s}");
}

#[test]
fn a_window_without_traffic_changes_nothing_and_trace_record_feeds_place_solve() {
    let model = fixture("mixtral");
    let (_, experts) = moe_shape(&model);
    let cl = up_rebalancing(&model);
    let ep = cl.endpoint();
    std::thread::sleep(Duration::from_secs(4));
    let s = stats(&ep);
    assert_eq!(s["migrations"], 0, "{s}");
    assert_eq!(s["epoch"], 1, "{s}");
    assert_eq!(s["workload_shift"], 0.0, "no traffic, no shift: {s}");
    // Record while serving, then solve a placement from the recording.
    let tmp = tempfile::tempdir().expect("tmp");
    let rec = tmp.path().join("live.json");
    let recorder = {
        let (ep, rec) = (ep.clone(), rec.clone());
        std::thread::spawn(move || switchyard(&["trace", "record", "--endpoint", &ep, "--token", TOKEN, "--seconds", "3", "--out", rec.to_str().expect("path")]))
    };
    std::thread::sleep(Duration::from_millis(300));
    for p in ["1,2,3", "4,5,6", "7,8,9"] {
        assert!(cl.generate(&["--prompt-ids", p, "--max-tokens", "16"]).status.success());
    }
    let o = recorder.join().expect("recorder");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).expect("recording")).expect("json");
    let total: u64 = v["logical_count"].as_array().expect("counts").iter().flat_map(|l| l.as_array().expect("layer").iter()).map(|x| x.as_u64().expect("count")).sum();
    assert!(total > 0, "nothing recorded: {v}");
    let shift = stats(&ep)["workload_shift"].as_f64().expect("workload_shift");
    assert!((0.0..=1.0).contains(&shift), "a total variation distance: {shift}");
    let out = tmp.path().join("p.json");
    let o = switchyard(&["place", "solve", "--trace", rec.to_str().expect("path"), "--ranks", "2", "--slots-per-rank", &experts.div_ceil(2).to_string(), "--solver", "eplb", "--out", out.to_str().expect("path")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn load_aware_replicas_on_a_cluster_keep_the_tokens() {
    let model = fixture("qwen3_moe");
    let (layers, experts) = moe_shape(&model);
    let tmp = tempfile::tempdir().expect("tmp");
    let p = tmp.path().join("replicas.json");
    std::fs::write(&p, replica_placement(layers, experts, 2)).expect("write");
    let cl = Cluster::up_with(&model, 2, &["--placement".into(), p.into_os_string(), "--load-aware-replicas".into()]);
    for prompt in ["1,2,3,4,5,6,7,8", "9,10"] {
        let want = local_ids(&model, prompt, 16);
        let o = cl.generate(&["--prompt-ids", prompt, "--max-tokens", "16"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(ids_line(&o).as_deref(), Some(want.as_str()));
    }
}

#[test]
fn bench_straggler_smoke_prints_one_json_object_per_policy() {
    let tmp = tempfile::tempdir().expect("tmp");
    let plot = tmp.path().join("b.svg");
    let model = tmp.path().join("model");
    let o = switchyard(&[
        "bench", "straggler", "--workers", "2", "--phase-seconds", "2", "--settle-seconds", "1", "--clients", "2", "--max-tokens", "8", "--json", "--expert-inter", "512",
        "--policies", "static-contiguous,rebalance", "--model-dir", model.to_str().expect("path"), "--plot", plot.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(rows.len(), 2);
    for (r, p) in rows.iter().zip(["static-contiguous", "rebalance"]) {
        assert_eq!(r["policy"], p);
        for k in [
            "tokens_per_s",
            "p50_step_ms",
            "p99_step_ms",
            "projected_p50_step_ms",
            "projected_p99_step_ms",
            "settled_p50_step_ms",
            "settled_p99_step_ms",
            "balancedness_after_shift",
            "recovery_s",
            "migrations",
        ] {
            assert!(r.get(k).is_some(), "{k} missing in {r}");
        }
        assert!(r["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        // Two ranks step together, so every busy step has a projection on dedicated cores.
        assert!(r["projected_p50_step_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        // The settled window is the tail of the second phase: its steps are a subset.
        assert!(r["settled_p50_step_ms"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    }
    // The checkpoint written for one skew is not served as another's.
    let o = switchyard(&["bench", "straggler", "--workers", "2", "--expert-inter", "512", "--skew-strength", "0.5", "--model-dir", model.to_str().expect("path")]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("skew strength 1"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = switchyard(&["bench", "straggler", "--phase-seconds", "2", "--settle-seconds", "2"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--settle-seconds"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rows[0]["migrations"], 0, "the static policy never migrates");
    assert!(std::fs::read_to_string(&plot).expect("plot").contains("<polyline"));
}

/// The straggler benchmark on the trained model with a real routing shift (prose, then code).
#[test]
fn bench_straggler_runs_the_trained_model_on_a_prose_then_code_workload() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (prose, code) = (tmp.path().join("prose.txt"), tmp.path().join("code.txt"));
    std::fs::write(&prose, "The old man walked down to the harbour in the evening and watched the boats come in. ".repeat(40)).expect("write");
    std::fs::write(&code, "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n\n".repeat(40)).expect("write");
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-moe");
    let texts = format!("{},{}", prose.display(), code.display());
    let o = switchyard(&[
        "bench", "straggler", "--workers", "2", "--phase-seconds", "2", "--settle-seconds", "1", "--clients", "2", "--max-tokens", "8", "--json",
        "--policies", "static-contiguous", "--model", model.to_str().expect("path"), "--phase-texts", &texts,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{}", rows[0]);
    let one = format!("{}", prose.display());
    let o = switchyard(&["bench", "straggler", "--model", model.to_str().expect("path"), "--phase-texts", &one]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("two files"), "{}", String::from_utf8_lossy(&o.stderr));
}
