#!/usr/bin/env bash
# The main job on an embedded default, on this machine's CPU: builds `switchyard`, then
#  1. serves real generation requests from the repo's small trained Qwen3-MoE (models/tiny-moe:
#     prose and Python), checking it against the transformers reference first, through the
#     cluster's gRPC API and its OpenAI-compatible HTTP API, and
#  2. solves and compares expert placements on that model's real routing (prose vs code).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked --bin switchyard
bin=target/release/switchyard
model=models/tiny-moe
sample=(--temperature 0.5 --top-p 0.9 --seed 1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== model check: $model against transformers' logits and greedy tokens"
$bin model check --model "$model" --expected "$model/expected.safetensors"
echo "== generate"
$bin generate --model "$model" --prompt "The old man" --max-tokens 40 "${sample[@]}"
echo "== cluster: switchyard up (coordinator + 2 workers, expert-parallel over TCP, online rebalancer), streamed requests over gRPC and HTTP"
SWITCHYARD_ADMIN_TOKEN=demo $bin up --model "$model" --workers 2 --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --rebalance > "$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 1 600); do grep -q "switchyard is serving" "$work/up.log" && break; sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$work/up.log" | head -1)
[ -n "$addr" ] || { cat "$work/up.log"; kill $up_pid; exit 1; }
http=$(sed -n 's/^http listening on //p' "$work/up.log" | head -1)
for p in "The meaning of life is" "def read_config(path):" "Once upon a time"; do
  echo "-- gRPC: $p"
  $bin generate --endpoint "http://$addr" --prompt "$p" --max-tokens 40 "${sample[@]}"
done
echo "-- HTTP: curl -N http://$http/v1/chat/completions (streamed, server-sent events)"
curl -sS -N "http://$http/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny-moe", "messages": [{"role": "user", "content": "Tell me a fortune"}], "max_tokens": 48, "temperature": 0.5, "seed": 3, "stream": true}' > "$work/sse.txt"
grep '^data:' "$work/sse.txt" | head -3
echo "... $(grep -c '^data:' "$work/sse.txt") events in all, the last: $(grep '^data:' "$work/sse.txt" | tail -1)"
echo "-- HTTP: the whole answer"
curl -sS "http://$http/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "tiny-moe", "messages": [{"role": "user", "content": "Tell me a fortune"}], "max_tokens": 48, "temperature": 0.5, "seed": 3}'
echo
sleep 1  # one statistics poll
echo "== live statistics and cluster status (admin API)"
$bin stats --endpoint "$addr" --token demo --top 5
$bin status --endpoint "$addr" --token demo
kill -INT $up_pid; wait $up_pid || true
echo "== placement: solved on the model's routing of prose, scored on its routing of code"
routing=models/tiny-moe/routing
for s in contiguous eplb ilp; do
  $bin place solve --trace $routing/prose.safetensors --ranks 4 --slots-per-rank 5 --solver $s \
    --mode affinity --time-limit 10 --out "$work/$s.json" >/dev/null
done
$bin place compare --trace $routing/code.safetensors "$work/contiguous.json" "$work/eplb.json" "$work/ilp.json"
