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
echo "== cluster: switchyard up (coordinator + 2 workers, expert-parallel over TCP, online rebalancer), 3 streamed requests"
SWITCHYARD_ADMIN_TOKEN=demo $bin up --model "$model" --workers 2 --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --rebalance > "$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 600); do grep -q "switchyard is serving" "$work/up.log" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$work/up.log" | head -1)
[ -n "$addr" ] || { cat "$work/up.log"; kill $up_pid; exit 1; }
for p in "Switchyard routes tokens" "Experts on every rank" "hello"; do
  $bin generate --endpoint "http://$addr" --prompt "$p" --max-tokens 12
done
sleep 1  # one statistics poll
echo "== live statistics and cluster status (admin API)"
$bin stats --endpoint "$addr" --token demo --top 5
$bin status --endpoint "$addr" --token demo
kill -INT $up_pid; wait $up_pid || true
echo "== placement: solve on one synthetic sample, score on another"
$bin trace synth --preset mixtral --sequences 64 --seed 1 --out "$work/solve.safetensors"
$bin trace synth --preset mixtral --sequences 64 --seed 2 --out "$work/heldout.safetensors"
for s in contiguous eplb ilp; do
  $bin place solve --trace "$work/solve.safetensors" --ranks 4 --slots-per-rank 2 --solver $s \
    --mode affinity --time-limit 10 --out "$work/$s.json" >/dev/null
done
$bin place compare --trace "$work/heldout.safetensors" "$work/contiguous.json" "$work/eplb.json" "$work/ilp.json"
