//! `switchyard model check|info|bench` and `switchyard generate`, as real processes.
use std::process::Command;
use switchyard_tests::{fixtures_dir, switchyard_bin};

fn fixture_dirs() -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    let mut stack = vec![fixtures_dir()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("fixtures").flatten() {
            let p = e.path();
            if p.join("expected.safetensors").exists() {
                v.push(p);
            } else if p.is_dir() {
                stack.push(p);
            }
        }
    }
    v.sort();
    v
}

#[test]
fn model_check_passes_on_every_fixture() {
    let dirs = fixture_dirs();
    assert!(dirs.len() >= 4);
    for d in dirs {
        let out = Command::new(switchyard_bin())
            .args(["model", "check", "--model"])
            .arg(&d)
            .arg("--expected")
            .arg(d.join("expected.safetensors"))
            .output()
            .expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {stdout}{}", d.display(), String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("all match"), "{stdout}");
        assert!(stdout.lines().filter(|l| l.starts_with("prompt ")).count() >= 3, "{stdout}");
    }
}

#[test]
fn model_check_exits_1_on_mismatch() {
    // Qwen3-MoE weights against Mixtral's expected outputs: a mismatch, not an error.
    let f = fixtures_dir();
    let out = Command::new(switchyard_bin())
        .args(["model", "check", "--model"])
        .arg(f.join("qwen3_moe"))
        .arg("--expected")
        .arg(f.join("mixtral/expected.safetensors"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("MISMATCH"));
}

#[test]
fn model_info_and_generate() {
    let f = fixtures_dir();
    let out = Command::new(switchyard_bin()).args(["model", "info", "--model"]).arg(f.join("deepseek_v3")).output().expect("run");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && s.contains("deepseek_v3") && s.contains("group limit"), "{s}");

    let expected = "66,67,31,226,111,163,112,208"; // greedy_0 of deepseek_v3
    let prompt = "245,197,137,133,193"; // prompt_0
    let out = Command::new(switchyard_bin())
        .args(["generate", "--model"])
        .arg(f.join("deepseek_v3"))
        .args(["--prompt-ids", prompt, "--max-tokens", "8"])
        .output()
        .expect("run");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.contains(&format!("ids: {expected}")), "{s}");

    let out = Command::new(switchyard_bin())
        .args(["generate", "--model"])
        .arg(f.join("mixtral"))
        .args(["--prompt", "hello", "--max-tokens", "4", "--temperature", "0.7", "--seed", "1"])
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Bad input: exit 2 with the cause.
    let out = Command::new(switchyard_bin())
        .args(["generate", "--model"])
        .arg(f.join("mixtral"))
        .args(["--prompt-ids", "1,999"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of range"));
}

#[test]
fn model_bench_smoke() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(switchyard_bin())
        .args(["model", "bench", "--tiny", "--batches", "1,4", "--prompt-len", "8", "--decode-steps", "2", "--out"])
        .arg(dir.path().join("ck"))
        .output()
        .expect("run");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}{}", String::from_utf8_lossy(&out.stderr));
    assert!(s.contains("decode tok/s") && s.contains("VmHWM") && s.contains("read bandwidth"), "{s}");
    assert!(dir.path().join("ck/model.safetensors.index.json").exists());
    // --json: one object on stdout, the checkpoint reused.
    let out = Command::new(switchyard_bin())
        .args(["model", "bench", "--tiny", "--batches", "1,4", "--prompt-len", "8", "--decode-steps", "2", "--json", "--out"])
        .arg(dir.path().join("ck"))
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.iter().map(|r| r["batch"].as_u64().unwrap_or(0)).collect::<Vec<_>>(), vec![1, 4]);
    assert!(rows.iter().all(|r| r["decode_tok_s"].as_f64().is_some_and(|x| x > 0.0)));
    assert!(v["read_bandwidth_gb_s"].as_f64().is_some_and(|x| x > 0.0) && v["decode_step_bytes"].as_f64().is_some_and(|x| x > 0.0));
    // A step reads less than everything held: top-2 of the tiny shape's 8 experts per layer.
    assert!(v["decode_step_bytes"].as_f64().unwrap_or(0.0) < v["weight_bytes"].as_f64().unwrap_or(0.0));
}

#[test]
fn model_check_on_a_device_it_cannot_use_says_why() {
    let f = fixtures_dir();
    let check = |device: &str| {
        Command::new(switchyard_bin())
            .args(["model", "check", "--device", device, "--model"])
            .arg(f.join("mixtral"))
            .arg("--expected")
            .arg(f.join("mixtral/expected.safetensors"))
            .output()
            .expect("run")
    };
    let out = check("cuda:0");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        // A cuda build on a machine with a GPU: the check ran there.
        assert!(stdout.contains("on cuda:0") && stdout.contains("all match"), "{stdout}");
    } else {
        assert!(
            stderr.contains("built without the `cuda` feature") || stderr.contains("no CUDA driver found") || stderr.contains("CUDA device(s) visible"),
            "{stderr}"
        );
        assert!(!stdout.contains("prompt 0"), "nothing runs on a device that is not there: {stdout}");
    }
    let out = check("tpu:0");
    assert_eq!(out.status.code(), Some(2), "a bad --device is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device \"tpu:0\""), "{}", String::from_utf8_lossy(&out.stderr));
}
