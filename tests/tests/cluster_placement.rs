//! `switchyard up` solving its placement with the placement engine from a routing trace.
mod common;
use common::*;
use std::ffi::OsString;
use std::process::Command;

use switchyard_tests::switchyard_bin;

fn synth(dir: &std::path::Path, experts: usize) -> OsString {
    let out = dir.join(format!("routing-{experts}.safetensors"));
    let o = Command::new(switchyard_bin())
        .args(["trace", "synth", "--preset", "mixtral", "--layers", "3", "--experts", &experts.to_string(), "--sequences", "8", "--out"])
        .arg(&out)
        .output()
        .expect("synth");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.into_os_string()
}

#[test]
fn up_solves_its_placement_from_a_routing_trace_and_serves_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("mixtral"); // 3 MoE layers x 8 experts, top-2
    let trace = synth(dir.path(), 8);
    // 2 workers x 5 slots = 10 slots for 8 experts: the solver adds replicas of the hot experts.
    let args: Vec<OsString> = ["--routing-trace".into(), trace, "--solver".into(), "ilp".into(), "--mode".into(), "affinity".into(),
        "--slots-per-rank".into(), "5".into(), "--solve-time-limit".into(), "5".into()]
    .into_iter()
    .collect();
    let cl = Cluster::up_with(&model, 2, &args);
    let local = Command::new(switchyard_bin())
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt-ids", "5,6,7,8", "--max-tokens", "10"])
        .output()
        .expect("local generate");
    let remote = cl.generate(&["--prompt-ids", "5,6,7,8", "--max-tokens", "10"]);
    assert!(remote.status.success(), "{}", String::from_utf8_lossy(&remote.stderr));
    assert_eq!(ids_line(&remote), ids_line(&local));
    assert!(ids_line(&local).is_some());
}

#[test]
fn a_routing_trace_that_disagrees_with_the_model_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let trace = synth(dir.path(), 16);
    let o = Command::new(switchyard_bin())
        .args(["up", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--workers", "2", "--model"])
        .arg(fixture("mixtral"))
        .arg("--routing-trace")
        .arg(&trace)
        .output()
        .expect("up");
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("3 MoE layers x 16 experts") && e.contains("the model has 3 x 8"), "{e}");
}

/// `switchyard bench datapath --json` on the trained model, 2 workers, both data paths and both
/// placements: the evaluator's prediction (`placement::datapath::score` on the model's prose
/// trace) within 10% of the bytes the workers counted on other prose; home exchanges no KV and
/// moves no token, affinity does both.
#[test]
fn bench_datapath_measures_both_paths_and_matches_the_prediction() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-moe");
    let o = switchyard(&[
        "bench", "datapath", "--workers", "2", "--seconds", "2", "--clients", "4", "--time-limit", "5", "--json", "--model",
        model.to_str().expect("path"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "{v}");
    for r in rows {
        let (measured, predicted) = (r["bytes_per_token_layer"].as_f64().unwrap_or(0.0), r["predicted_bytes_per_token_layer"].as_f64().unwrap_or(0.0));
        assert!(measured > 0.0 && r["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        assert!((predicted - measured).abs() <= 0.1 * measured, "prediction {predicted} vs measured {measured}: {r}");
        let affinity = r["data_path"] == "affinity";
        assert_eq!(r["kv_bytes_per_token_layer"].as_f64().unwrap_or(0.0) > 0.0, affinity, "{r}");
        assert_eq!(r["moved_per_token_layer"].as_f64().unwrap_or(0.0) > 0.0, affinity, "{r}");
    }
}
