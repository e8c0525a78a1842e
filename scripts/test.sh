#!/usr/bin/env bash
# Runs every test of the workspace from one release build: unit tests, integration tests with real
# processes of the `switchyard` binary, model checks against the transformers fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# One build for everything: the binaries the integration tests start, and the test executables.
cargo build --release --workspace --bins --tests --locked
cargo test --release --workspace --locked "$@"
# The CUDA backend builds and lints without CUDA installed (cudarc loads the driver, cuBLAS, NVRTC
# and NCCL at run time). Its host-side tests and the GPU tests run from that feature build; the GPU
# tests print why they skip where no device is found.
cargo clippy --release --locked -p worker --features cuda --all-targets
cargo build --release --locked -p coordinator --features cuda --bins
cargo test --release --locked -p worker --features cuda --lib backend::
cargo test --release --locked -p worker --features cuda --test cuda_backend -- --nocapture
