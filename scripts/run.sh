#!/usr/bin/env bash
# The main job on an embedded default, on this machine's CPU: builds `switchyard`, then
#  1. serves real generation requests from a small Mixtral-architecture checkpoint (the repo's
#     fixture), checking it against the transformers reference first, and
#  2. solves and compares expert placements for a synthetic Mixtral-like routing trace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked --bin switchyard
bin=target/release/switchyard
model=tests/fixtures/mixtral
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== model check: $model against transformers' logits and greedy tokens"
$bin model check --model "$model" --expected "$model/expected.safetensors"
echo "== generate"
$bin generate --model "$model" --prompt "Switchyard routes tokens" --max-tokens 16
echo "== placement: solve on one synthetic sample, score on another"
$bin trace synth --preset mixtral --sequences 64 --seed 1 --out "$work/solve.safetensors"
$bin trace synth --preset mixtral --sequences 64 --seed 2 --out "$work/heldout.safetensors"
for s in contiguous eplb ilp; do
  $bin place solve --trace "$work/solve.safetensors" --ranks 4 --slots-per-rank 2 --solver $s \
    --mode affinity --time-limit 10 --out "$work/$s.json" >/dev/null
done
$bin place compare --trace "$work/heldout.safetensors" "$work/contiguous.json" "$work/eplb.json" "$work/ilp.json"
