#!/usr/bin/env bash
# Every check of the CUDA backend that needs a GPU, in one run (device time is short):
#   scripts/gpu-check.sh BUNDLE_DIR OUT_DIR
# BUNDLE_DIR from scripts/gpu-bundle.sh. Writes logs and JSON into OUT_DIR; one failing check
# does not stop the others (the summary at the end lists them).
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=$(realpath "${1:?bundle dir}")
out=$(realpath "${2:?out dir}")
mkdir -p "$out"
sy="$bundle/switchyard"
# The driver, NVRTC, cuBLAS and NCCL (cudarc dlopens them): the toolkit's and those of the
# Python wheels (nvidia-cublas, nvidia-cuda-nvrtc, nvidia-nccl-cu13), plus the carried OpenBLAS.
libdirs=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) \
  -maxdepth 6 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' -o -name 'libnccl.so*' -o -name 'libcuda.so*' \) -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="$bundle/lib:${libdirs}${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
export SWITCHYARD_FIXTURES_DIR="$PWD/tests/fixtures" RUST_LOG=info
failed=()
check() { # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then echo "ok ($((SECONDS - t0)) s)"; else echo "FAILED ($((SECONDS - t0)) s)"; failed+=("$name"); fi
  tail -n 15 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
check gpu-tests "$bundle/cuda_backend" --nocapture --test-threads=1
for d in $(find tests/fixtures -name expected.safetensors -printf '%h\n' | sort); do
  check "model-check-$(basename "$d")" "$sy" model check --device cuda:0 --model "$d" --expected "$d/expected.safetensors"
done
check cluster-check-1 "$sy" model check --workers 1 --device cuda:0 --model tests/fixtures/qwen3_moe --expected tests/fixtures/qwen3_moe/expected.safetensors
check cluster-check-1-nccl "$sy" model check --workers 1 --transport nccl --device cuda:0 --model tests/fixtures/deepseek_v3 --expected tests/fixtures/deepseek_v3/expected.safetensors
# Two workers on the one GPU over TCP: the device protocol (rows staged through the host).
check cluster-check-2 "$sy" model check --workers 2 --device cuda:0 --model tests/fixtures/mixtral --expected tests/fixtures/mixtral/expected.safetensors
# JSON on stdout, progress on stderr.
check bench sh -c "'$sy' model bench --device cuda:0 --batches 1,16,64,256 --decode-steps 16 --json > '$out/bench.json'"
check bench-large sh -c "'$sy' model bench --device cuda:0 --large --batches 1,16,64,256 --decode-steps 16 --json > '$out/bench-large.json'"
# PyTorch eager on the same GPU (needs transformers there; skipped checks show in the summary).
check bench-torch "$sy" model bench --device cuda:0 --batches 1,16,64,256 --decode-steps 16 --compare-torch
echo "=== summary: ${#failed[@]} failed: ${failed[*]:-none}"
