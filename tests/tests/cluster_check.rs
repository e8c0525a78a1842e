//! `switchyard model check --workers N`: every fixture through a real 1/2/4-worker cluster,
//! contiguous and with a replicated, uneven placement: logits within 1e-4, identical greedy tokens.
mod common;
use common::*;
use std::process::Command;
use switchyard_tests::{fixtures_dir, switchyard_bin};

fn check(model: &std::path::Path, workers: usize, placement: Option<&std::path::Path>) {
    check_on(model, workers, placement, "home")
}

fn check_on(model: &std::path::Path, workers: usize, placement: Option<&std::path::Path>, data_path: &str) {
    let mut cmd = Command::new(switchyard_bin());
    cmd.args(["model", "check", "--data-path", data_path, "--workers", &workers.to_string(), "--model"])
        .arg(model)
        .arg("--expected")
        .arg(model.join("expected.safetensors"));
    if let Some(p) = placement {
        cmd.arg("--placement").arg(p);
    }
    let out = cmd.output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all match"),
        "{} with {workers} workers ({placement:?}, {data_path}): {stdout}{}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.lines().filter(|l| l.starts_with("prompt ")).count() >= 3, "{stdout}");
}

#[test]
fn cluster_check_contiguous_1_2_4_workers_every_fixture() {
    for f in FIXTURES {
        for n in [1, 2, 4] {
            check(&fixture(f), n, None);
        }
    }
}

#[test]
fn cluster_check_replicated_uneven_placement_every_fixture() {
    let dir = tempfile::tempdir().expect("tmp");
    for f in FIXTURES {
        let model = fixture(f);
        let (layers, experts) = moe_shape(&model);
        for n in [2, 4] {
            let p = dir.path().join(format!("{f}_{n}.json"));
            std::fs::write(&p, replica_placement(layers, experts, n)).expect("write placement");
            check(&model, n, Some(&p));
        }
    }
}

/// The affinity data path (tokens follow their primary experts, KV copied within coherence
/// groups) on every fixture, shared and holdout, contiguous and replicated, whole-group and
/// 2-rank coherence groups: the same logits and greedy tokens as transformers.
#[test]
fn cluster_check_affinity_data_path_every_fixture_shared_and_holdout() {
    let dir = tempfile::tempdir().expect("tmp");
    let holdout = fixtures_dir().join("holdout");
    let mut models: Vec<std::path::PathBuf> = FIXTURES.iter().map(|f| fixture(f)).collect();
    let mut extra: Vec<_> = std::fs::read_dir(&holdout).expect("holdout fixtures").map(|e| e.expect("entry").path()).collect();
    extra.sort();
    assert!(extra.len() >= 8, "holdout fixtures: {extra:?}");
    models.extend(extra);
    for model in &models {
        let (layers, experts) = moe_shape(model);
        for n in [2, 4] {
            let p = dir.path().join(format!("{}_{n}.json", model.file_name().unwrap().to_string_lossy()));
            std::fs::write(&p, replica_placement(layers, experts, n)).expect("write placement");
            check_on(model, n, None, "affinity");
            check_on(model, n, Some(&p), if n == 4 { "affinity:2" } else { "affinity" });
        }
    }
}

#[test]
fn cluster_check_rejects_a_placement_that_disagrees_with_the_model() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = fixture("mixtral");
    let (layers, experts) = moe_shape(&model);
    let bad = [
        ("layers", replica_placement(layers + 1, experts, 2), "MoE layers"),
        ("experts", replica_placement(layers, experts * 2, 2), "experts"),
        ("ranks", replica_placement(layers, experts, 4), "ranks"),
    ];
    for (name, text, want) in bad {
        let p = dir.path().join(format!("{name}.json"));
        std::fs::write(&p, text).expect("write");
        let out = Command::new(switchyard_bin())
            .args(["model", "check", "--workers", "2", "--model"])
            .arg(&model)
            .arg("--expected")
            .arg(model.join("expected.safetensors"))
            .arg("--placement")
            .arg(&p)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert!(err.contains("placement") && err.contains(want), "{name}: {err}");
    }
}
