#!/usr/bin/env bash
# Builds what the GPU checks run (scripts/gpu-check.sh) into gpu-bundle/: the `switchyard` binary
# and the CUDA backend's GPU test, with `--features cuda`, stripped. The GPU machine lent to
# sessions has no network and no Rust toolchain to spare minutes on: carry gpu-bundle/ there
# (it is git-ignored) and run `scripts/gpu-check.sh gpu-bundle $OUT`. cudarc loads the CUDA
# libraries at run time: the check script finds them there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked -p coordinator --features cuda --bins
cargo test --release --locked -p worker --features cuda --test cuda_backend --no-run
target_dir="${CARGO_TARGET_DIR:-target}"
rm -rf gpu-bundle && mkdir -p gpu-bundle
cp "$target_dir/release/switchyard" gpu-bundle/
# The newest cuda_backend test executable (cargo names it with a hash).
test_bin=$(ls -t "$target_dir"/release/deps/cuda_backend-* | grep -v '\.d$' | head -1)
cp "$test_bin" gpu-bundle/cuda_backend
strip gpu-bundle/switchyard gpu-bundle/cuda_backend
# OpenBLAS and its Fortran runtime may be missing on the GPU machine's image (the C++ runtime
# and glibc are there, and newer): carried beside the binaries, found through LD_LIBRARY_PATH.
mkdir -p gpu-bundle/lib
ldd gpu-bundle/switchyard | awk '/openblas|gfortran|quadmath/ {print $3}' | xargs -r cp -L -t gpu-bundle/lib
du -sh gpu-bundle/* gpu-bundle/lib/*
