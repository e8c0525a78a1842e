#!/usr/bin/env python3
"""PyTorch (transformers eager, CPU) throughput on a checkpoint, the same measurement as
`switchyard model bench`: for each batch size B, one prefill of B prompts of --prompt-len tokens,
then --decode-steps greedy decode steps of B tokens with the KV cache.

Weights are loaded as float32 (what Switchyard computes in; bf16 matmuls on CPUs without
AVX512-BF16 are slower in PyTorch). Threads: torch.set_num_threads(os.cpu_count()).

Usage: python deploy/bench_torch.py --model DIR [--batches 1,16,64] [--prompt-len 64] [--decode-steps 16] [--json]
Needs: pip install torch transformers safetensors  (CPU wheels: --index-url https://download.pytorch.org/whl/cpu)
Run both side by side: switchyard model bench --compare-torch
"""
import argparse, json, os, sys, time


def vm_hwm():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return "%.2f GiB" % (int(line.split()[1]) / (1 << 20))
    except OSError:
        pass
    return "n/a"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch, transformers
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, a.dtype)
    t0 = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="eager").eval()
    print(f"torch: loaded in {time.time() - t0:.1f} s, {torch.get_num_threads()} threads", file=sys.stderr)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(12345)
    rows = []
    with torch.inference_mode():
        for b in [int(x) for x in a.batches.split(",")]:
            ids = torch.randint(0, vocab, (b, a.prompt_len), generator=gen)
            t0 = time.time()
            out = model(input_ids=ids, use_cache=True)
            prefill = time.time() - t0
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            t0 = time.time()
            for _ in range(a.decode_steps):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            decode = time.time() - t0
            r = dict(batch=b, prefill_tps=b * a.prompt_len / prefill, decode_tps=b * a.decode_steps / max(decode, 1e-9))
            print(f"torch batch {b}: prefill {r['prefill_tps']:.1f} tok/s, decode {r['decode_tps']:.1f} tok/s", file=sys.stderr)
            rows.append(r)
    res = dict(rows=rows, vm_hwm=vm_hwm(), version=f"torch {torch.__version__}, transformers {transformers.__version__}, {a.dtype}, eager")
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{'batch':>6} {'prefill tok/s':>15} {'decode tok/s':>15}")
        for r in rows:
            print(f"{r['batch']:>6} {r['prefill_tps']:>15.1f} {r['decode_tps']:>15.1f}")
        print("peak resident memory (VmHWM):", res["vm_hwm"])


if __name__ == "__main__":
    main()
