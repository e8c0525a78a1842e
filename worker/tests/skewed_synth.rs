//! Generated checkpoints with skewed, prompt-dependent routing (`SynthSpec::skew`).
use std::path::Path;
use std::sync::Arc;
use worker::engine::{Engine, EngineConfig, Request};
use worker::model::{LoadOptions, Model};
use worker::synth::{HotLayout, RoutingSkew, SynthSpec, skewed_prompts, write_checkpoint};

/// FNV-1a over the sorted file names and contents of `dir`.
fn fnv(dir: &Path) -> u64 {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for n in names {
        for b in n.to_string_lossy().bytes().chain(std::fs::read(dir.join(&n)).unwrap()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    h
}

struct Phase {
    counts: Vec<Vec<u64>>,
    /// Generated tokens in the prompts' group, and all generated tokens.
    in_group: (usize, usize),
}

fn run_phase(model: &Arc<Model>, spec: &SynthSpec, group: usize, seed: u64) -> Phase {
    let mut engine = Engine::new(model.clone(), EngineConfig::default());
    for p in skewed_prompts(spec, group, 32, 24, seed) {
        assert!(p.iter().all(|&t| spec.token_group(t) == Some(group) && (t as usize) < spec.vocab && t >= 3));
        let mut r = Request::new(p, 8);
        // Sampled, so generation is not confined to the greedy choice.
        r.sampling.temperature = 1.0;
        engine.add_request(r).unwrap();
    }
    let out = engine.run_to_completion().unwrap();
    let generated: Vec<u32> = out.values().flat_map(|(t, _)| t.iter().copied()).collect();
    let in_group = generated.iter().filter(|&&t| spec.token_group(t) == Some(group)).count();
    Phase { counts: engine.routing_stats().counts.clone(), in_group: (in_group, generated.len()) }
}

/// Experts of a layer by decreasing count (ties: lower id first).
fn ranked(c: &[u64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..c.len()).collect();
    idx.sort_by(|&a, &b| c[b].cmp(&c[a]).then(a.cmp(&b)));
    idx
}

fn top_share(c: &[u64], k: usize) -> f64 {
    let r = ranked(c);
    r[..k].iter().map(|&e| c[e]).sum::<u64>() as f64 / c.iter().sum::<u64>() as f64
}

fn overlap4(a: &[u64], b: &[u64]) -> usize {
    let (ra, rb) = (ranked(a), ranked(b));
    ra[..4].iter().filter(|e| rb[..4].contains(e)).count()
}

#[test]
fn skewed_bench_routing_is_skewed_and_shifts_with_the_prompts() {
    let spec = SynthSpec::skewed_bench();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &spec).unwrap();
    // A valid HF-style checkpoint: sharded with an index, read by the normal loader.
    assert!(dir.path().join("model.safetensors.index.json").exists());
    let model = Arc::new(Model::load(dir.path(), &LoadOptions::default()).expect("loads as a HF checkpoint"));
    assert_eq!(model.config.router.n_experts, spec.experts);
    assert_eq!(model.config.router.top_k, spec.top_k);
    assert_eq!(model.moe_layers().count(), spec.layers);

    let a = run_phase(&model, &spec, 0, 1);
    let b = run_phase(&model, &spec, 1, 2);
    let mut overlap_sum = 0;
    for l in 0..spec.layers {
        let (sa, sb) = (top_share(&a.counts[l], 4), top_share(&b.counts[l], 4));
        let overlap = overlap4(&a.counts[l], &b.counts[l]);
        println!(
            "layer {l}: top-4 share A {sa:.3} B {sb:.3}; hot A {:?} B {:?}; overlap {overlap}",
            &ranked(&a.counts[l])[..4],
            &ranked(&b.counts[l])[..4]
        );
        assert!(sa >= 0.5 && sb >= 0.5, "layer {l}: top-4 shares {sa:.3} / {sb:.3} below 0.5");
        // Not degenerate: the routing still spreads beyond the top two.
        assert!(sa <= 0.9 && sb <= 0.9, "layer {l}: top-4 shares {sa:.3} / {sb:.3} too extreme");
        // The measured hot experts are the designed ones.
        for (g, c) in [(0, &a.counts[l]), (1, &b.counts[l])] {
            let design = spec.expert_ranking(g, l).unwrap();
            let hot = ranked(c);
            assert!(
                hot[..4].iter().all(|e| design[..6].contains(e)),
                "layer {l} group {g}: hot {:?} vs design {:?}",
                &hot[..4],
                design
            );
            assert_eq!(hot[0], design[0], "layer {l} group {g}: hottest expert");
        }
        overlap_sum += overlap;
    }
    let mean_overlap = overlap_sum as f64 / spec.layers as f64;
    println!("mean top-4 overlap {mean_overlap}; generated in group: A {:?} B {:?}", a.in_group, b.in_group);
    assert!(mean_overlap <= 1.0, "hot sets of the phases overlap by {mean_overlap} experts per layer");
    // The hot experts differ between layers too (a ranking per layer, not one for the model).
    let firsts: std::collections::BTreeSet<usize> = (0..spec.layers).map(|l| spec.expert_ranking(0, l).unwrap()[0]).collect();
    assert!(firsts.len() > 1);
    // Generated tokens stay in the prompt's group, so decode keeps the phase's skew.
    for (g, (inn, all)) in [a.in_group, b.in_group].into_iter().enumerate() {
        assert!(all > 0 && inn as f64 >= 0.9 * all as f64, "group {g}: {inn} of {all} generated tokens in group");
    }
}

#[test]
fn without_skew_the_same_shape_routes_evenly() {
    let spec = SynthSpec::skewed_bench();
    let plain = SynthSpec { skew: None, ..spec.clone() };
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &plain).unwrap();
    let model = Arc::new(Model::load(dir.path(), &LoadOptions::default()).unwrap());
    let a = run_phase(&model, &spec, 0, 1);
    let b = run_phase(&model, &spec, 1, 2);
    for l in 0..spec.layers {
        let (sa, sb) = (top_share(&a.counts[l], 4), top_share(&b.counts[l], 4));
        println!("plain layer {l}: top-4 share A {sa:.3} B {sb:.3}; overlap {}", overlap4(&a.counts[l], &b.counts[l]));
        assert!(sa < 0.5 && sb < 0.5, "layer {l}: {sa:.3} / {sb:.3}");
    }
}

#[test]
fn skew_none_writes_the_same_bytes_as_before() {
    // FNV-1a of the checkpoints written by `write_checkpoint` before `skew` existed.
    let mut mixtral = SynthSpec::tiny();
    mixtral.arch = "mixtral".into();
    let mut f32_single = SynthSpec::tiny();
    f32_single.dtype = "F32".into();
    f32_single.shards = 1;
    for (name, spec, want) in [
        ("tiny", SynthSpec::tiny(), 0xa16c_e66e_4d2a_c665u64),
        ("tiny mixtral", mixtral, 0x47e1_6877_f917_b1a9),
        ("tiny f32 single file", f32_single, 0xb865_062d_1445_26d0),
    ] {
        assert!(spec.skew.is_none());
        let d = tempfile::tempdir().unwrap();
        write_checkpoint(d.path(), &spec).unwrap();
        assert_eq!(fnv(d.path()), want, "{name}");
    }
    // And skew does change the weights (of the same shape and seed).
    let skewed = SynthSpec { skew: Some(RoutingSkew { zipf: 1.2, strength: 0.75, groups: 2, layout: HotLayout::Clustered }), ..SynthSpec::tiny() };
    let d = tempfile::tempdir().unwrap();
    write_checkpoint(d.path(), &skewed).unwrap();
    assert_ne!(fnv(d.path()), 0xa16c_e66e_4d2a_c665);
    Model::load(d.path(), &LoadOptions::default()).expect("skewed tiny loads");
}

#[test]
fn skewed_prompts_are_deterministic_and_in_group() {
    let spec = SynthSpec::skewed_bench();
    let p = skewed_prompts(&spec, 1, 5, 7, 42);
    assert_eq!(p, skewed_prompts(&spec, 1, 5, 7, 42));
    assert_ne!(p, skewed_prompts(&spec, 1, 5, 7, 43));
    assert_eq!(p.len(), 5);
    for q in &p {
        assert_eq!(q.len(), 7);
        assert!(q.iter().all(|&t| t >= 3 && (t as usize) < spec.vocab && spec.token_group(t) == Some(1)));
    }
    // Tokens are spread over the group, not a handful of ids.
    let distinct: std::collections::BTreeSet<u32> = p.iter().flatten().copied().collect();
    assert!(distinct.len() >= 30);
    assert_eq!(SynthSpec::tiny().token_group(5), None);
}

#[test]
fn invalid_skew_is_rejected() {
    for groups in [0, 1, 17] {
        let spec = SynthSpec { skew: Some(RoutingSkew { zipf: 1.2, strength: 1.0, groups, layout: HotLayout::Clustered }), ..SynthSpec::skewed_bench() };
        let d = tempfile::tempdir().unwrap();
        assert!(write_checkpoint(d.path(), &spec).is_err(), "groups {groups}");
    }
    let spec = SynthSpec { skew: Some(RoutingSkew { zipf: f64::NAN, strength: 1.0, groups: 2, layout: HotLayout::Clustered }), ..SynthSpec::skewed_bench() };
    assert!(write_checkpoint(tempfile::tempdir().unwrap().path(), &spec).is_err());
}
