//! Helpers for the integration tests: locate the `switchyard` binary and the fixtures.
use std::path::PathBuf;

pub mod etcd;

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The fixtures copied from `shared/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// The `switchyard` binary of the same build profile as the running test. `.ci/run` builds it first.
pub fn switchyard_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SWITCHYARD_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/switchyard
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let bin = profile_dir.join("switchyard");
    assert!(bin.exists(), "{} not built: run `cargo build --release --bins` first", bin.display());
    bin
}
