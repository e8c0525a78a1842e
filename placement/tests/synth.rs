use placement::RoutingStats;
use placement::synth::{SynthConfig, SynthModel, synthesize};

fn small() -> SynthConfig {
    SynthConfig { num_layers: 6, num_experts: 32, top_k: 4, num_sequences: 64, tokens_per_sequence: 64, ..SynthConfig::default() }
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// Share of all dispatches that go to the single most loaded expert, averaged over layers.
fn top_share(cfg: &SynthConfig) -> f64 {
    let t = synthesize(cfg).unwrap();
    let s = RoutingStats::from_trace(&t, None);
    s.load.iter().map(|row| row.iter().cloned().fold(0.0, f64::max) / row.iter().sum::<f64>()).sum::<f64>()
        / s.num_layers as f64
}

#[test]
fn deterministic_per_seed() {
    let a = synthesize(&small()).unwrap();
    let b = synthesize(&small()).unwrap();
    assert_eq!(a, b);
    let c = synthesize(&SynthConfig { seed: 99, ..small() }).unwrap();
    assert_ne!(a.topk_ids, c.topk_ids);
    let d = synthesize(&SynthConfig { model_seed: 99, ..small() }).unwrap();
    assert_ne!(a.topk_ids, d.topk_ids);
}

#[test]
fn shape_ids_weights_and_sequences() {
    let cfg = small();
    let t = synthesize(&cfg).unwrap();
    t.validate().unwrap();
    assert_eq!(t.num_tokens(), 64 * 64);
    assert_eq!((t.num_layers, t.num_experts, t.top_k), (6, 32, 4));
    let w = t.topk_weights.as_ref().unwrap();
    for tok in 0..t.num_tokens() {
        assert_eq!(t.seq_id(tok), (tok / 64) as i64);
        for l in 0..t.num_layers {
            let ex = t.experts(tok, l);
            for i in 0..ex.len() {
                assert!(!ex[..i].contains(&ex[i]), "duplicate expert in token {tok} layer {l}: {ex:?}");
            }
            let s = (tok * t.num_layers + l) * t.top_k;
            let ws = &w[s..s + t.top_k];
            assert!(ws.windows(2).all(|p| p[0] >= p[1]), "weights not descending: {ws:?}");
            assert!((ws.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            assert!(ws.iter().all(|&x| x > 0.0));
        }
    }
}

#[test]
fn k_equal_to_experts_and_heavy_skew_terminate() {
    let cfg = SynthConfig { num_experts: 8, top_k: 8, zipf_exponent: 3.0, num_sequences: 4, tokens_per_sequence: 16, ..small() };
    let t = synthesize(&cfg).unwrap();
    for tok in 0..t.num_tokens() {
        let mut ex = t.experts(tok, 0).to_vec();
        ex.sort();
        assert_eq!(ex, (0..8).collect::<Vec<u32>>());
    }
}

#[test]
fn held_out_sample_has_similar_popularity() {
    let cfg = SynthConfig { num_sequences: 128, tokens_per_sequence: 64, ..small() };
    let a = RoutingStats::from_trace(&synthesize(&cfg).unwrap(), None);
    let b = RoutingStats::from_trace(&synthesize(&SynthConfig { seed: 12345, ..cfg.clone() }).unwrap(), None);
    assert_ne!(a.transitions, b.transitions, "different seeds must give different tokens");
    for l in 0..a.num_layers {
        let r = pearson(&a.load[l], &b.load[l]);
        assert!(r > 0.9, "layer {l}: held-out popularity correlation {r}");
    }
    // a different model is a different popularity
    let c = RoutingStats::from_trace(&synthesize(&SynthConfig { model_seed: 777, ..cfg }).unwrap(), None);
    let r = pearson(&a.load[0], &c.load[0]);
    assert!(r < 0.8, "different model_seed should reshuffle popularity, correlation {r}");
}

#[test]
fn popularity_differs_by_layer() {
    let s = RoutingStats::from_trace(&synthesize(&small()).unwrap(), None);
    let argmax = |row: &Vec<f64>| row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let hot: std::collections::HashSet<usize> = s.load.iter().map(argmax).collect();
    assert!(hot.len() > 1, "every layer has the same hottest expert");
}

#[test]
fn zipf_exponent_controls_skew() {
    let lo = top_share(&SynthConfig { zipf_exponent: 0.3, transition_strength: 0.0, ..small() });
    let hi = top_share(&SynthConfig { zipf_exponent: 1.5, transition_strength: 0.0, ..small() });
    assert!(hi > lo * 1.5, "top-expert share: zipf 1.5 → {hi}, zipf 0.3 → {lo}");
    let uniform = top_share(&SynthConfig { zipf_exponent: 0.0, transition_strength: 0.0, ..small() });
    assert!(uniform < 0.05, "uniform popularity top share {uniform}"); // 1/32 = 0.031
}

#[test]
fn transition_strength_controls_successor_frequency() {
    let freq = |strength: f64| {
        let cfg = SynthConfig { transition_strength: strength, zipf_exponent: 0.5, ..small() };
        let model = SynthModel::new(&cfg).unwrap();
        let t = model.sample(&cfg).unwrap();
        let (mut hit, mut all) = (0usize, 0usize);
        for tok in 0..t.num_tokens() {
            for l in 0..t.num_layers - 1 {
                let a = t.experts(tok, l)[0] as usize;
                let b = t.experts(tok, l + 1)[0];
                hit += model.successors(l, a).contains(&b) as usize;
                all += 1;
            }
        }
        hit as f64 / all as f64
    };
    let (f0, f1) = (freq(0.0), freq(1.0));
    assert!(f1 > 0.99, "strength 1: primary follows a successor {f1}");
    assert!(f0 < 0.4, "strength 0: successor frequency {f0} should be near popularity level");
    let f_half = freq(0.5);
    assert!(f0 < f_half && f_half < f1, "{f0} < {f_half} < {f1}");
}

#[test]
fn presets_have_their_shapes() {
    let cfg = SynthConfig::deepseek_v3();
    assert_eq!((cfg.num_layers, cfg.num_experts, cfg.top_k), (58, 256, 8));
    let m = SynthConfig::mixtral();
    assert_eq!((m.num_layers, m.num_experts, m.top_k), (32, 8, 2));
    synthesize(&m).unwrap().validate().unwrap();
    let t = synthesize(&cfg).unwrap();
    assert_eq!(t.num_tokens(), 4096);
}

#[test]
fn bad_configs_are_errors() {
    for cfg in [
        SynthConfig { num_layers: 0, ..small() },
        SynthConfig { num_experts: 0, ..small() },
        SynthConfig { top_k: 33, ..small() },
        SynthConfig { top_k: 0, ..small() },
        SynthConfig { num_sequences: 0, ..small() },
        SynthConfig { zipf_exponent: f64::NAN, ..small() },
        SynthConfig { transition_strength: 1.5, ..small() },
        SynthConfig { transition_fanout: 0, ..small() },
        SynthConfig { domains: 0, ..small() },
        SynthConfig { domain_shift: -0.1, ..small() },
    ] {
        let err = synthesize(&cfg).unwrap_err();
        assert!(err.to_string().contains("synth config"), "{err}");
    }
}
