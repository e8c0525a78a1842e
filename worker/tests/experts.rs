//! Loading a subset of routed experts, and the expert-executor seam.
use std::path::{Path, PathBuf};
use worker::model::{Ffn, LoadOptions, LogitsMode, Model, SeqInput};
use worker::moe::{ExpertExecutor, MoeLayer, Routing, combine_into, gather_rows};
use worker::reference::{read_expected, rel_max_diff};
use worker::ModelError;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn is_routed_expert(name: &str, keep: &[Vec<usize>], moe_layers: &[usize]) -> Option<bool> {
    // model.layers.{l}.mlp.experts.{e}.*  (or block_sparse_moe)
    let parts: Vec<&str> = name.split('.').collect();
    let ei = parts.iter().position(|p| *p == "experts")?;
    let e: usize = parts.get(ei + 1)?.parse().ok()?;
    let l: usize = parts.get(2)?.parse().ok()?;
    let mi = moe_layers.iter().position(|x| *x == l)?;
    Some(keep[mi].contains(&e))
}

#[test]
fn subset_loads_only_listed_experts_even_when_others_are_deleted() {
    for name in ["qwen3_moe", "deepseek_v3", "mixtral"] {
        let src = fixture(name);
        let cfg = worker::ModelConfig::from_dir(&src).expect("cfg");
        let moe_layers = cfg.moe_layers();
        let keep: Vec<Vec<usize>> = (0..moe_layers.len()).map(|l| vec![l % 2, 2 + l, 5]).collect();
        // Copy the checkpoint without the experts we do not keep.
        let dst = tempfile::tempdir().expect("tmp");
        let bytes = std::fs::read(src.join("model.safetensors")).expect("read");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
        let kept: Vec<_> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| is_routed_expert(n, &keep, &moe_layers).unwrap_or(true))
            .collect();
        assert!(kept.len() < st.len());
        safetensors::serialize_to_file(kept, None, &dst.path().join("model.safetensors")).expect("write");
        std::fs::copy(src.join("config.json"), dst.path().join("config.json")).expect("cfg");
        // Full load fails (a deleted expert is missing) ...
        let e = Model::load(dst.path(), &LoadOptions::default()).expect_err("missing experts");
        assert!(matches!(e, ModelError::MissingTensor { .. }), "{e}");
        // ... the subset load succeeds and holds exactly the listed experts.
        let m = Model::load(dst.path(), &LoadOptions { experts: Some(keep.clone()) }).expect("subset load");
        for (i, layer) in m.moe_layers().enumerate() {
            let mut want = keep[i].clone();
            want.sort();
            want.dedup();
            assert_eq!(layer.loaded_experts(), want, "{name} moe layer {i}");
        }
        // Running an unloaded expert is a typed error.
        let layer = m.moe_layers().next().expect("moe layer");
        let missing = (0..layer.n_experts()).find(|e| !keep[0].contains(e)).expect("some missing");
        let r = layer.expert_forward(missing, &vec![0.0; cfg.hidden_size], 1);
        assert!(matches!(r, Err(ModelError::ExpertNotLoaded { layer: 0, expert }) if expert == missing));
    }
}

/// Two "ranks", each holding half of the experts; the executor sends each expert batch to the
/// rank that holds it. Output must equal the single-process model.
struct TwoRanks<'a> {
    ranks: [&'a Model; 2],
}

impl ExpertExecutor for TwoRanks<'_> {
    fn run(&self, layer: &MoeLayer, x: &[f32], t: usize, routing: &Routing) -> Result<Vec<f32>, ModelError> {
        let h = layer.hidden;
        let mut out = vec![0.0; t * h];
        for b in routing.group_by_expert(layer.n_experts()) {
            let rank = self.ranks[b.expert % 2];
            let remote = rank
                .layers
                .iter()
                .filter_map(|l| match &l.ffn {
                    Ffn::Moe(m) if m.moe_index == layer.moe_index => Some(m),
                    _ => None,
                })
                .next()
                .expect("layer");
            let y = remote.expert_forward(b.expert, &gather_rows(x, h, &b.tokens), b.tokens.len())?;
            combine_into(&mut out, h, &b, &y);
        }
        Ok(out)
    }
}

#[test]
fn split_experts_across_two_ranks_matches_reference() {
    for name in ["qwen3_moe", "deepseek_v3"] {
        let dir = fixture(name);
        let cfg = worker::ModelConfig::from_dir(&dir).expect("cfg");
        let n = cfg.router.n_experts;
        let nl = cfg.moe_layers().len();
        let half = |r: usize| LoadOptions { experts: Some(vec![(0..n).filter(|e| e % 2 == r).collect(); nl]) };
        let a = Model::load(&dir, &half(0)).expect("rank 0");
        let b = Model::load(&dir, &half(1)).expect("rank 1");
        let exec = TwoRanks { ranks: [&a, &b] };
        for c in read_expected(&dir.join("expected.safetensors")).expect("expected") {
            let mut cache = a.new_cache();
            let out = a
                .forward_with(&mut [SeqInput { tokens: &c.prompt, cache: &mut cache }], LogitsMode::All, &exec)
                .expect("forward");
            let d = rel_max_diff(&out.logits[0], &c.logits);
            assert!(d < 1e-4, "{name}: {d}");
            // Routing decisions are exposed per MoE layer, top-k per token.
            assert_eq!(out.routing.len(), nl);
            for r in &out.routing {
                assert_eq!(r.n_tokens(), c.prompt.len());
                assert_eq!(r.top_k, cfg.router.top_k);
            }
        }
    }
}

/// Next-best alternates (for the capacity option's rerouting): the top-k are exactly the plain
/// routing's, the alternates are the next experts by router score, none repeats a chosen one, and
/// their weights use the top-k's normalisation (so no alternate outweighs the last chosen expert
/// where weights follow the scores).
#[test]
fn router_alternates_follow_the_top_k_without_changing_it() {
    for name in ["mixtral", "qwen3_moe", "deepseek_v3", "holdout/deepseek_v2_group", "holdout/olmoe_small", "holdout/qwen2_moe_small"] {
        let dir = fixture(name);
        let m = Model::load(&dir, &LoadOptions::default()).expect("load");
        let layer = m.moe_layers().next().expect("a MoE layer");
        let (h, t) = (layer.hidden, 7);
        let x: Vec<f32> = (0..t * h).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5).collect();
        let plain = layer.router.route(&x, t);
        let k = plain.top_k;
        let e = layer.router.cfg.n_experts;
        let with = layer.router.route_with_alternates(&x, t, k);
        assert_eq!(with.ids, plain.ids, "{name}: alternates changed the top-k");
        assert_eq!(with.weights, plain.weights, "{name}: alternates changed the weights");
        assert_eq!(with.alternates, k.min(e - k));
        assert_eq!(plain.alternates, 0);
        let m_alt = with.alternates;
        for tok in 0..t {
            let chosen = &with.ids[tok * k..(tok + 1) * k];
            let alts = &with.alt_ids[tok * m_alt..(tok + 1) * m_alt];
            for a in alts {
                assert!(!chosen.contains(a), "{name}: alternate {a} is already chosen for token {tok}");
                assert!((*a as usize) < e);
            }
            let aw = &with.alt_weights[tok * m_alt..(tok + 1) * m_alt];
            assert!(aw.iter().all(|w| w.is_finite() && *w >= 0.0), "{name}: alternate weights {aw:?}");
            if !layer.router.cfg.correction_bias && layer.router.cfg.group_limit.is_none() {
                let last = with.weights[(tok + 1) * k - 1];
                assert!(aw.iter().all(|w| *w <= last), "{name}: an alternate outweighs a chosen expert");
                assert!(aw.windows(2).all(|p| p[0] >= p[1]), "{name}: alternates not best first");
            }
        }
        // Slicing keeps tokens and their alternates together.
        let s = with.slice_tokens(2..5);
        assert_eq!(s.alt_ids, with.alt_ids[2 * m_alt..5 * m_alt]);
        assert_eq!(s.ids, with.ids[2 * k..5 * k]);
    }
}

/// What one migration move loads: a bf16 checkpoint's expert is held as bf16 (2 bytes a weight),
/// an f32 one's as f32 — the same shapes in two dtypes, padding of the 16-row panels included.
#[test]
fn routed_expert_bytes_follow_the_checkpoint_dtype() {
    let c = worker::ModelConfig::from_dir(&fixture("qwen3_moe")).expect("config");
    let (h, inter) = (c.hidden_size, c.moe_intermediate_size);
    let padded = |n: usize, k: usize| n.div_ceil(16) * 16 * k;
    let weights = (padded(2 * inter, h) + padded(h, inter)) as u64;
    assert_eq!(Model::routed_expert_bytes(&fixture("qwen3_moe")).expect("f32"), 4 * weights);
    assert_eq!(Model::routed_expert_bytes(&fixture("qwen3_moe_bf16")).expect("bf16"), 2 * weights);
}
