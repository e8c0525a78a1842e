//! What several of the worker's integration tests share: where the fixtures are.
#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

/// `SWITCHYARD_FIXTURES_DIR` (a test binary carried to another machine, see
/// scripts/gpu-check.sh), else the checkout's `tests/fixtures`.
pub fn fixtures_root() -> PathBuf {
    std::env::var_os("SWITCHYARD_FIXTURES_DIR").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"))
}

/// Every fixture (a directory with `config.json` and `expected.safetensors`) under the root and
/// under the extra trees of `SWITCHYARD_EXTRA_FIXTURES` (`:`-separated, e.g. generated holdout
/// sets), sorted.
pub fn fixture_dirs() -> Vec<PathBuf> {
    let mut v = Vec::new();
    let mut stack = vec![fixtures_root()];
    if let Ok(extra) = std::env::var("SWITCHYARD_EXTRA_FIXTURES") {
        stack.extend(extra.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("fixtures dir {}: {e}", d.display())).flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.join("config.json").exists() && p.join("expected.safetensors").exists() {
                    v.push(p);
                } else {
                    stack.push(p);
                }
            }
        }
    }
    v.sort();
    assert!(!v.is_empty(), "no fixtures found");
    v
}
