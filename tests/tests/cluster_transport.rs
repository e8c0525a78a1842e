//! The coordinator picks the workers' all-to-all transport and hands out what they need for it.
mod common;
use common::*;
use std::process::Command;

use switchyard_tests::switchyard_bin;

fn coordinator_with(transport: &str) -> (Option<i32>, String) {
    let o = Command::new(switchyard_bin())
        .args(["coordinator", "--workers", "2", "--listen", "127.0.0.1:0", "--transport", transport, "--model"])
        .arg(fixture("mixtral"))
        .output()
        .expect("coordinator");
    (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn nccl_without_the_cuda_feature_and_unknown_transports_are_refused_at_start() {
    // Without CUDA (a build without the `cuda` feature, or no libcuda/libnccl on the machine)
    // asking for NCCL must fail at once and say why, not start and fail later.
    let (code, err) = coordinator_with("nccl");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cuda"), "{err}");
    let (code, err) = coordinator_with("carrier-pigeon");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown transport"), "{err}");
}
