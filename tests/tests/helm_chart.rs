//! The Helm chart: renders helm/switchyard with several value sets through the Helm Go library,
//! lints it strictly, validates every manifest against the Kubernetes 1.30 schemas, checks that
//! invalid values are refused, and checks every rendered `switchyard <sub>` container against the
//! built binary: each `--flag` must be in `switchyard <sub> --help`, each SWITCHYARD_*/OTEL_* env
//! var one it reads, its required flags present, each `$(VAR)` defined
//! (scripts/check-helm-chart.py, run with the pinned Python tools that scripts/install-deps.sh
//! puts in target/py).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn helm_chart_renders_lints_and_validates() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join("target/py/bin/python");
    assert!(
        python.exists(),
        "{} missing: run scripts/install-deps.sh (creates the venv with helm-python-sdk and kubernetes-validate)",
        python.display()
    );
    // The binary of this build profile: the chart may pass only the flags it has.
    let bin = switchyard_tests::switchyard_bin();
    // Output goes to a file, so a chatty run cannot fill a pipe while we wait.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(&python)
        .arg(root.join("scripts/check-helm-chart.py"))
        .arg("--switchyard-bin")
        .arg(&bin)
        .current_dir(&root)
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("start the chart check");
    // Bounded wait (the check takes a few seconds); kill it past the deadline.
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chart check did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(log.path()).unwrap();
    let missing: Vec<&str> = stdout.lines().filter(|l| l.starts_with("flags missing from")).collect();
    assert!(
        status.success(),
        "chart check failed ({status}) against {}:\n{stdout}\n{}",
        bin.display(),
        if missing.is_empty() { String::new() } else { format!("the chart passes flags the binary lacks:\n{}", missing.join("\n")) }
    );
    assert!(stdout.contains("all helm chart checks passed"), "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(missing.is_empty(), "{stdout}");
    assert!(stdout.contains("ok   flag check catches unknown flags"), "the flag check's self-test did not run:\n{stdout}");
    for set in ["defaults", "external-etcd", "servicemonitor", "tls", "tls-existing-secret", "large", "cpu"] {
        assert!(stdout.contains(&format!("ok   {set}: helm lint --strict")), "value set {set} not checked:\n{stdout}");
        for sub in ["coordinator", "worker"] {
            assert!(
                stdout.contains(&format!("ok   {set}: `switchyard {sub}` args and env are the binary's")),
                "value set {set}: {sub} flags not checked against the binary:\n{stdout}"
            );
        }
    }
}
