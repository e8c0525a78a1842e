#!/usr/bin/env python3
"""Small extra fixtures for shapes and options the shared set does not cover.

Same method as deploy/gen_fixtures.py (random seeded weights, transformers eager float32 reference),
but tiny (hidden 32) so they can be committed under tests/fixtures/holdout:
  qwen2_moe_small    Qwen2-MoE: shared expert with sigmoid gate, qkv bias, hub-style config
  olmoe_small        OLMoE: q/k norm over the full projection
  qwen3_moe_sparse   Qwen3-MoE f16 weights, decoder_sparse_step 2 + mlp_only_layers, sharded checkpoint
  deepseek_v2_lite   DeepSeek-V2: q without LoRA, softmax greedy top-k, no norm, routed scaling
  deepseek_v2_group  DeepSeek-V2: group_limited_greedy, q-LoRA
  deepseek_v3_yarn   DeepSeek-V3: yarn rope (mscale), q without LoRA, moe_layer_freq, legacy rope_scaling key
  mixtral_sliding    Mixtral with sliding_window 6 (prompts up to 23 tokens)
  mixtral_tied       Mixtral with tied embeddings

Usage: python bench/gen_extra_fixtures.py OUT_DIR [NAME ...]
"""
import importlib.util, json, os, sys
import torch, transformers
from safetensors.torch import save_file

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("gen_fixtures", os.path.join(here, "..", "deploy", "gen_fixtures.py"))
gf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gf)

common = dict(vocab_size=256, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=64, tie_word_embeddings=False)
yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}
CONFIGS = {
    "qwen2_moe_small": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, torch.float32, dict(
        common, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False), True),
    "olmoe_small": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, torch.float32, dict(
        common, intermediate_size=16, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True), True),
    "qwen3_moe_sparse": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, torch.float16, dict(
        common, num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=16, num_key_value_heads=2,
        head_dim=8, num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2,
        mlp_only_layers=[3]), False),
    "deepseek_v2_lite": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, torch.float32, dict(
        common, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, topk_method="greedy",
        routed_scaling_factor=1.5), True),
    "deepseek_v2_group": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, torch.float32, dict(
        common, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, first_k_dense_replace=0,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=1.0), False),
    "deepseek_v3_yarn": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, torch.float32, dict(
        common, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.0, norm_topk_prob=True, rope_parameters=yarn), "legacy"),
    "mixtral_sliding": (transformers.MixtralConfig, transformers.MixtralForCausalLM, torch.float32, dict(
        common, intermediate_size=24, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=6), True),
    "mixtral_tied": (transformers.MixtralConfig, transformers.MixtralForCausalLM, torch.float32, dict(
        common, tie_word_embeddings=True, intermediate_size=24, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2), True),
}

def legacy_rope(path):
    with open(path) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")
    c["rope_scaling"] = rp
    with open(path, "w") as f:
        json.dump(c, f, indent=2)

def main():
    out = sys.argv[1]
    seed = 20261123
    only = set(sys.argv[2:])
    for name, (Cfg, Model, dtype, kw, hub) in CONFIGS.items():
        if only and name not in only:
            continue
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        cfg = Cfg(**kw)
        cfg._attn_implementation = "eager"
        model = Model(cfg).eval()
        gf.perturb_biases(model, gen)
        with torch.no_grad():  # non-trivial norms and Qwen2-MoE shared gate
            for n, p in model.named_parameters():
                if n.endswith("norm.weight") or "shared_expert_gate" in n:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        model = model.to(dtype)
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, max_shard_size="60KB" if name == "qwen3_moe_sparse" else "50MB")
        gf.byte_tokenizer(os.path.join(d, "tokenizer.json"))
        if hub is True:
            gf.to_hub_style(os.path.join(d, "config.json"))
        elif hub == "legacy":
            legacy_rope(os.path.join(d, "config.json"))
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        res = {}
        with torch.no_grad():
            for i, n in enumerate((4, 11, 23)):
                ids = torch.randint(0, cfg.vocab_size, (1, n), generator=gen)
                logits = ref(ids, use_cache=False).logits[0].float()
                g = ref.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, eos_token_id=None,
                                 pad_token_id=0)[0, n:]
                res[f"prompt_{i}"] = ids[0].contiguous()
                res[f"logits_{i}"] = logits.contiguous()
                res[f"greedy_{i}"] = g.contiguous()
        save_file(res, os.path.join(d, "expected.safetensors"))
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(dict(architecture=Model.__name__, weights_dtype=str(dtype), transformers=transformers.__version__,
                           torch=torch.__version__, seed=seed), f, indent=1)
        print(name, "ok")

if __name__ == "__main__":
    main()
