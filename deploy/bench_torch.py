#!/usr/bin/env python3
"""PyTorch (transformers eager, CPU or --device cuda:N) throughput on a checkpoint, the same measurement as
`switchyard model bench`: for each batch size B, one prefill of B prompts of --prompt-len tokens,
then --decode-steps greedy decode steps of B tokens with the KV cache.

Every experts implementation of transformers given by --experts-impl is measured (attention is
always eager) and the best one per batch size is reported. Weights are loaded as float32 (what Switchyard computes in; bf16 matmuls on CPUs without
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
    ap.add_argument("--experts-impl", default="eager,grouped_mm",
                    help="transformers experts implementations to try (comma separated); the best per batch size is reported")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (the timings then synchronize the device)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch, transformers
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = getattr(torch, a.dtype)
    t0 = time.time()
    dev = torch.device(a.device)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="eager").to(dev).eval()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    print(f"torch: loaded in {time.time() - t0:.1f} s, {torch.get_num_threads()} threads", file=sys.stderr)
    vocab = model.config.vocab_size
    if dev.type == "cuda":
        # cuBLAS handles and kernel caches start on the first call: keep them out of batch 1.
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 8), dtype=torch.long, device=dev), use_cache=True)
        sync()
    gen = torch.Generator().manual_seed(12345)
    best = {}
    impls = [x for x in a.experts_impl.split(",") if x]
    for impl in impls:
        try:
            model.set_experts_implementation(impl)
        except Exception as e:  # older transformers, or not applicable
            print(f"torch: experts implementation {impl}: {e}", file=sys.stderr)
            continue
        with torch.inference_mode():
            for b in [int(x) for x in a.batches.split(",")]:
                ids = torch.randint(0, vocab, (b, a.prompt_len), generator=gen).to(dev)
                sync()
                t0 = time.time()
                out = model(input_ids=ids, use_cache=True)
                sync()
                prefill = time.time() - t0
                past = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                t0 = time.time()
                for _ in range(a.decode_steps):
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                sync()
                decode = time.time() - t0
                p_tps, d_tps = b * a.prompt_len / prefill, b * a.decode_steps / max(decode, 1e-9)
                print(f"torch [{impl}] batch {b}: prefill {p_tps:.1f} tok/s, decode {d_tps:.1f} tok/s", file=sys.stderr)
                r = best.setdefault(b, dict(batch=b, prefill_tps=0.0, decode_tps=0.0, prefill_impl="", decode_impl=""))
                if p_tps > r["prefill_tps"]:
                    r["prefill_tps"], r["prefill_impl"] = p_tps, impl
                if d_tps > r["decode_tps"]:
                    r["decode_tps"], r["decode_impl"] = d_tps, impl
    rows = [best[b] for b in sorted(best)]
    res = dict(rows=rows, vm_hwm=vm_hwm(), version=f"torch {torch.__version__}, transformers {transformers.__version__}, {a.dtype}, eager, {a.device}")
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{'batch':>6} {'prefill tok/s':>15} {'decode tok/s':>15}")
        for r in rows:
            print(f"{r['batch']:>6} {r['prefill_tps']:>15.1f} {r['decode_tps']:>15.1f}  ({r['prefill_impl']} / {r['decode_impl']})")
        print("peak resident memory (VmHWM):", res["vm_hwm"])


if __name__ == "__main__":
    main()
