#!/usr/bin/env bash
# Runs every test of the workspace from one release build: unit tests, integration tests with real
# processes of the `switchyard` binary, model checks against the transformers fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# One build for everything: the binaries the integration tests start, and the test executables.
cargo build --release --workspace --bins --tests --locked
cargo test --release --workspace --locked "$@"
