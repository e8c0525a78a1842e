//! The `switchyard place` / `trace` commands as an operator runs them: real binary, real files.
use std::path::Path;
use std::process::{Command, Output};

use switchyard_tests::switchyard_bin;

fn run(args: &[&str]) -> Output {
    let out = Command::new(switchyard_bin()).args(args).output().expect("switchyard runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "switchyard {args:?} panicked: {stderr}");
    out
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "switchyard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail with exit code 2 and an error mentioning `needle`.
fn fails(args: &[&str], needle: &str) {
    let out = run(args);
    assert_eq!(out.status.code(), Some(2), "switchyard {args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(needle), "switchyard {args:?}: expected {needle:?} in {stderr}");
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn synth_solve_eval_compare_export() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (p(dir.path(), "train.safetensors"), p(dir.path(), "test.safetensors"));
    ok(&["trace", "synth", "--preset", "mixtral", "--sequences", "16", "--seed", "1", "--out", &train]);
    ok(&["trace", "synth", "--preset", "mixtral", "--sequences", "16", "--seed", "2", "--out", &test]);
    let stats: serde_json::Value = serde_json::from_str(&ok(&["trace", "stats", "--trace", &train, "--json"])).unwrap();
    assert_eq!(stats["layers"], 32);
    assert_eq!(stats["experts"], 8);

    let mut files = Vec::new();
    for solver in ["contiguous", "eplb", "ilp"] {
        for mode in ["home", "affinity"] {
            let out = p(dir.path(), &format!("{solver}-{mode}.json"));
            let report: serde_json::Value = serde_json::from_str(&ok(&[
                "place", "solve", "--trace", &train, "--ranks", "4", "--slots-per-rank", "3", "--solver", solver,
                "--mode", mode, "--time-limit", "10", "--out", &out, "--json",
            ]))
            .unwrap();
            assert!(report["objective"]["value"].as_f64().unwrap() >= 1.0);
            let placement: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
            assert_eq!(placement["format"], "switchyard.placement.v1");
            assert_eq!(placement["layers"].as_array().unwrap().len(), 32);
            files.push(out);
        }
    }
    let ev: serde_json::Value =
        serde_json::from_str(&ok(&["place", "eval", "--placement", &files[5], "--trace", &test, "--json"])).unwrap();
    let b = ev["balancedness"].as_f64().unwrap();
    assert!(b > 0.0 && b <= 1.0, "balancedness {b}");
    let table = ok(&["place", "compare", "--trace", &test, &files[0], &files[2], &files[5]]);
    assert_eq!(table.lines().filter(|l| l.contains(".json")).count(), 3, "{table}");

    let sglang = p(dir.path(), "sglang.json");
    ok(&["place", "export", "--placement", &files[3], "--format", "sglang", "--out", &sglang]);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sglang).unwrap()).unwrap();
    let map = v["physical_to_logical_map"].as_array().unwrap();
    assert_eq!(map.len(), 32);
    assert_eq!(map[0].as_array().unwrap().len(), 12);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let trace = p(dir.path(), "t.safetensors");
    ok(&["trace", "synth", "--preset", "mixtral", "--sequences", "4", "--out", &trace]);
    let good = p(dir.path(), "good.json");
    ok(&["place", "solve", "--trace", &trace, "--ranks", "4", "--slots-per-rank", "2", "--solver", "eplb", "--out", &good]);

    // A truncated trace.
    let bytes = std::fs::read(&trace).unwrap();
    let truncated = p(dir.path(), "truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fails(&["place", "solve", "--trace", &truncated, "--ranks", "4", "--slots-per-rank", "2", "--out", &p(dir.path(), "x.json")], "truncated");

    // Placements: an expert id out of range, a missing expert, unequal slots, wrong shape for the trace.
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&good).unwrap()).unwrap();
    let write = |name: &str, v: &serde_json::Value| {
        let f = p(dir.path(), name);
        std::fs::write(&f, v.to_string()).unwrap();
        f
    };
    let orig = v.clone();
    v["layers"][3]["ranks"][1][0] = serde_json::json!(99);
    fails(&["place", "eval", "--placement", &write("range.json", &v), "--trace", &trace], "out of range");
    let mut v = orig.clone();
    v["layers"][0]["ranks"][0] = v["layers"][0]["ranks"][1].clone();
    fails(&["place", "eval", "--placement", &write("missing.json", &v), "--trace", &trace], "has no slot");
    let mut v = orig.clone();
    v["layers"][0]["ranks"][2].as_array_mut().unwrap().pop();
    fails(&["place", "eval", "--placement", &write("slots.json", &v), "--trace", &trace], "slots");
    let mut v = orig.clone();
    v["layers"].as_array_mut().unwrap().pop();
    v["num_layers"] = serde_json::json!(31);
    fails(&["place", "eval", "--placement", &write("short.json", &v), "--trace", &trace], "layers");
    fails(&["place", "eval", "--placement", &p(dir.path(), "nope.json"), "--trace", &trace], "nope.json");
    std::fs::write(p(dir.path(), "garbage.json"), "{\"format\": ").unwrap();
    fails(&["place", "eval", "--placement", &p(dir.path(), "garbage.json"), "--trace", &trace], "garbage.json");

    // Impossible solve requests.
    fails(&["place", "solve", "--trace", &trace, "--ranks", "2", "--slots-per-rank", "2", "--out", &p(dir.path(), "y.json")], "cannot hold");
    fails(&["place", "solve", "--trace", &trace, "--ranks", "6", "--nodes", "4", "--slots-per-rank", "2", "--out", &p(dir.path(), "y.json")], "equal size");
    fails(&["place", "export", "--placement", &good, "--format", "vllm", "--out", &p(dir.path(), "z.json")], "unknown export format");
}

#[test]
fn jsonl_logs_and_sglang_counts_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let log = p(dir.path(), "log.jsonl");
    let mut text = String::new();
    for (problem, tokens) in [("HumanEval/0", 3), ("HumanEval/1", 2)] {
        for t in 0..tokens {
            for layer in 0..4 {
                let e = (t + layer) % 8;
                text += &format!("{{\"problem_id\": \"{problem}\", \"layer\": {layer}, \"experts\": [{e}, {}], \"token_idx\": {t}}}\n", (e + 3) % 8);
            }
        }
    }
    std::fs::write(&log, text).unwrap();
    let trace = p(dir.path(), "log.safetensors");
    let out = ok(&["trace", "convert", "--input", &log, "--num-experts", "8", "--out", &trace]);
    assert!(out.contains("5 tokens"), "{out}");
    ok(&["place", "solve", "--trace", &log, "--num-experts", "8", "--ranks", "4", "--slots-per-rank", "2", "--out", &p(dir.path(), "a.json")]);

    let counts = p(dir.path(), "counts.json");
    std::fs::write(&counts, serde_json::json!({"logical_count": [[5, 1, 1, 1], [1, 1, 1, 9]]}).to_string()).unwrap();
    let out = p(dir.path(), "b.json");
    ok(&["place", "solve", "--trace", &counts, "--ranks", "2", "--slots-per-rank", "3", "--solver", "eplb", "--out", &out]);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // The hottest expert of each layer got the spare slots.
    let layer0: Vec<u64> = v["layers"][0]["ranks"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap())).collect();
    assert_eq!(layer0.iter().filter(|&&e| e == 0).count(), 2);
    std::fs::write(&counts, "[[1, 2], [3]]").unwrap();
    fails(&["place", "solve", "--trace", &counts, "--ranks", "2", "--slots-per-rank", "1", "--out", &out], "ragged");
}

/// `--trace` is told by content: a safetensors trace named `x.st`, a JSONL log named `.txt` and a
/// `logical_count` JSON with no extension are read as what they are; anything else is a clear
/// error naming the file.
#[test]
fn traces_are_read_by_content_whatever_they_are_called() {
    let dir = tempfile::tempdir().unwrap();
    let st = p(dir.path(), "x.st");
    ok(&["trace", "synth", "--preset", "mixtral", "--sequences", "4", "--seed", "3", "--out", &st]);
    ok(&["place", "solve", "--trace", &st, "--ranks", "4", "--slots-per-rank", "2", "--out", &p(dir.path(), "a.json")]);
    ok(&["place", "eval", "--placement", &p(dir.path(), "a.json"), "--trace", &st]);

    let log = p(dir.path(), "routing.txt");
    let mut text = String::new();
    for t in 0..3 {
        for layer in 0..2 {
            text += &format!("{{\"problem_id\": 7, \"layer\": {layer}, \"experts\": [{}, {}], \"token_idx\": {t}}}\n", t % 4, (t + 1) % 4);
        }
    }
    std::fs::write(&log, text).unwrap();
    ok(&["place", "solve", "--trace", &log, "--num-experts", "4", "--ranks", "2", "--slots-per-rank", "2", "--out", &p(dir.path(), "b.json")]);

    let counts = p(dir.path(), "counts");
    std::fs::write(&counts, "[[5, 1, 1, 1], [1, 1, 1, 9]]").unwrap();
    ok(&["place", "solve", "--trace", &counts, "--ranks", "2", "--slots-per-rank", "3", "--solver", "eplb", "--out", &p(dir.path(), "c.json")]);
    // Counts are not per-token routing: commands that need tokens say so.
    fails(&["place", "eval", "--placement", &p(dir.path(), "c.json"), "--trace", &counts], "per-token routing");

    let junk = p(dir.path(), "junk.safetensors");
    std::fs::write(&junk, "not routing at all").unwrap();
    fails(&["place", "solve", "--trace", &junk, "--ranks", "2", "--slots-per-rank", "2", "--out", &p(dir.path(), "d.json")], "not a routing file");
}

/// `place bench` on a committed real routing folder: solved on one domain, scored on the other, the
/// four solvers side by side; `--only` that matches nothing is a clear error.
#[test]
fn place_bench_scores_real_routing_across_domains() {
    let routing = switchyard_tests::repo_root().join("models/routing/tiny-moe-e8");
    let routing = routing.to_str().expect("path");
    let out = ok(&["place", "bench", "--real-routing", routing, "--only", "prose->code (6x8 top-2, 4 ranks, 2 slots)", "--time-limit", "5", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let solvers: Vec<&str> = rows.iter().map(|r| r["solver"].as_str().unwrap()).collect();
    assert_eq!(solvers, ["contiguous", "eplb", "ilp home", "ilp affinity"]);
    for r in &rows {
        assert!(r["scenario"].as_str().unwrap().starts_with("real: tiny-moe-e8 prose->code"), "{r}");
        let b = r["balancedness"].as_f64().unwrap();
        assert!(b > 0.0 && b <= 1.0, "{r}");
    }
    fails(&["place", "bench", "--real-routing", routing, "--only", "no such scenario"], "no such scenario");
}

/// The residual-stream generator writes a trace another domain mix of which moves the loads; its
/// bad inputs are clear errors.
#[test]
fn the_latent_generator_writes_traces_and_refuses_bad_mixes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (p(dir.path(), "a.safetensors"), p(dir.path(), "b.safetensors"));
    let synth = |out: &str, weights: &str| {
        ok(&["trace", "synth", "--generator", "latent", "--preset", "mixtral", "--layers", "4", "--sequences", "64", "--domain-weights", weights, "--out", out])
    };
    assert!(synth(&a, "1,0,0,0").contains("latent generator"));
    synth(&b, "0,0,0,1");
    let hottest = |f: &str| -> Vec<u64> {
        let s: serde_json::Value = serde_json::from_str(&ok(&["trace", "stats", "--trace", f, "--json"])).unwrap();
        assert_eq!((s["layers"].as_u64(), s["experts"].as_u64(), s["sequences"].as_u64()), (Some(4), Some(8), Some(64)), "{s}");
        s["per_layer"].as_array().unwrap().iter().map(|l| l["hottest_expert"].as_u64().unwrap()).collect()
    };
    // Each domain has its own topic: another mix, other hot experts (the unit tests measure by how much).
    assert_ne!(hottest(&a), hottest(&b), "two domains route alike");
    let out = p(dir.path(), "bad.safetensors");
    fails(&["trace", "synth", "--generator", "latent", "--domain-weights", "1,2", "--out", &out], "domain_weights");
    fails(&["trace", "synth", "--generator", "latent", "--zipf", "0.5", "--out", &out], "--generator table");
    fails(&["trace", "synth", "--generator", "table", "--domain-weights", "1,1,1,1", "--out", &out], "--generator latent");
    fails(&["trace", "synth", "--generator", "tables", "--out", &out], "unknown generator");
    assert!(!Path::new(&out).exists(), "nothing written on bad input");
}
