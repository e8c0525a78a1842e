use placement::eval::{
    HardwareProfile, evaluate, evaluate_stats, format_layers, format_simulation, format_table, local_dispatch, rank_loads, same_node_hops,
    same_rank_hops,
};
use placement::placement::LayerPlacement;
use placement::{Placement, PlacementError, RoutingStats, RoutingTrace, Topology};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9 * (1.0 + b.abs())
}

macro_rules! assert_close {
    ($a:expr, $b:expr) => {{
        let (a, b): (f64, f64) = ($a, $b);
        assert!(close(a, b), "{} = {a}, expected {b}", stringify!($a));
    }};
}

fn layers(ls: &[&[&[usize]]]) -> Vec<LayerPlacement> {
    ls.iter().map(|l| LayerPlacement { ranks: l.iter().map(|r| r.to_vec()).collect() }).collect()
}

/// 4 tokens, 2 layers, k = 2, 4 experts; token t is sequence t (home rank t mod ranks).
fn trace() -> RoutingTrace {
    RoutingTrace {
        num_experts: 4,
        num_layers: 2,
        top_k: 2,
        #[rustfmt::skip]
        topk_ids: vec![
            0, 1,  0, 2, // t0: L0 [0,1], L1 [0,2]
            0, 2,  1, 0, // t1
            3, 2,  3, 1, // t2
            1, 0,  2, 3, // t3
        ],
        topk_weights: None,
        seq_ids: Some(vec![0, 1, 2, 3]),
    }
}

/// 2 ranks, each its own node; L0: r0 {0,1} r1 {2,3}; L1: r0 {0,2} r1 {1,3}.
fn two_nodes() -> Placement {
    let topo = Topology { nodes: vec![vec![0], vec![1]] };
    Placement::new(4, topo, layers(&[&[&[0, 1], &[2, 3]], &[&[0, 2], &[1, 3]]]))
}

/// Unit hardware: 1 µs per token-expert assignment, 1 µs per byte intra-node, 2 µs inter-node.
fn unit_hw() -> HardwareProfile {
    HardwareProfile {
        name: "unit".into(),
        flops_per_s: 6e6,
        intra_node_gbps: 1e-3,
        inter_node_gbps: 0.5e-3,
        hidden_size: 1,
        expert_intermediate_size: 1,
        bytes_per_activation: 1.0,
    }
}

#[test]
fn hand_worked_example() {
    // Layer 0 loads: e0 = 3, e1 = 2, e2 = 2, e3 = 1 → r0 = 5, r1 = 3: mean 4, max 5.
    // Layer 1 loads: all 2 → r0 = 4, r1 = 4.
    // Cross-node (home = token id mod 2, one rank per node):
    //   L0: t0 local 2; t1 e0 remote; t2 both remote; t3 both remote → 5 / 8.
    //   L1: t0 local; t1 e0 remote; t2 both remote; t3 e2 remote → 4 / 8.
    // Primary hops 0→0 (r0 both), 0→1 (no), 3→3 (r1), 1→2 (r0) → 3 / 4.
    let ev = evaluate(&two_nodes(), &trace(), &unit_hw()).unwrap();
    assert_eq!(ev.tokens, Some(4));
    assert_eq!((ev.ranks, ev.nodes), (2, 2));
    assert_close!(ev.dispatches, 16.0);
    assert_close!(ev.layers[0].max_load, 5.0);
    assert_close!(ev.layers[0].mean_load, 4.0);
    assert_close!(ev.layers[0].balancedness, 0.8);
    assert_close!(ev.layers[1].balancedness, 1.0);
    assert_close!(ev.balancedness, 8.0 / 9.0);
    assert_close!(ev.layers[0].cross_node_fraction, 5.0 / 8.0);
    assert_close!(ev.layers[1].cross_node_fraction, 4.0 / 8.0);
    assert_close!(ev.cross_node_fraction, 9.0 / 16.0);
    assert_close!(ev.layers[0].same_rank_hop_share.unwrap(), 0.75);
    assert_eq!(ev.layers[1].same_rank_hop_share, None);
    assert_close!(ev.hops, 4.0);
    assert_close!(ev.same_rank_hop_share, 0.75);
    assert_close!(ev.same_node_hop_share, 0.75);
    // Step time (trace, IB de-duplicated per token and node):
    //   L0: compute r0 5, r1 3; IB bytes sent r0: t1 combine + t2 dispatch (2 experts on node 1,
    //       once) + t3 combine = 3, r1: 3 → r0 = 5 + 3·2 = 11 µs.
    //   L1: compute 4 / 4; IB r0: t1 combine, t2 dispatch (once), t3 combine = 3 → 4 + 6 = 10 µs.
    assert!(ev.dedup_inter_node);
    assert_close!(ev.layers[0].simulated_us, 11.0);
    assert_close!(ev.layers[1].simulated_us, 10.0);
    assert_close!(ev.simulated_step_us, 21.0);
    // bytes sent over IB: L0 3 + 3, L1 3 + 3; nothing over NVLink (one rank per node)
    assert_close!(ev.layers[0].inter_node_bytes, 6.0);
    assert_close!(ev.inter_node_bytes, 12.0);
    assert_close!(ev.intra_node_bytes, 0.0);

    // Statistics path: same metrics; step time without de-duplication:
    //   L0 IB r0 = 1 + 2 + 2 = 5 → 5 + 10 = 15; L1 r0 = 1 + 2 + 1 = 4 → 4 + 8 = 12.
    let stats = RoutingStats::from_trace(&trace(), Some(2));
    let es = evaluate_stats(&two_nodes(), &stats, &unit_hw()).unwrap();
    assert_eq!(es.tokens, None);
    assert!(!es.dedup_inter_node);
    assert_close!(es.balancedness, ev.balancedness);
    assert_close!(es.cross_node_fraction, ev.cross_node_fraction);
    assert_eq!(es.same_rank_hop_share, ev.same_rank_hop_share);
    assert_close!(es.layers[0].simulated_us, 15.0);
    assert_close!(es.layers[1].simulated_us, 12.0);
    assert_close!(es.simulated_step_us, 27.0);
    assert_close!(es.inter_node_bytes, 10.0 + 8.0);
}

#[test]
fn one_node_is_all_local_and_uses_nvlink() {
    let mut p = two_nodes();
    p.topology = Topology { nodes: vec![vec![0, 1]] };
    let ev = evaluate(&p, &trace(), &unit_hw()).unwrap();
    assert_close!(ev.cross_node_fraction, 0.0);
    assert_close!(ev.same_node_hop_share, 1.0);
    assert_close!(ev.same_rank_hop_share, 0.75);
    // Intra-node bytes are not de-duplicated: L0 r0 sends t1 combine 1, t2 dispatch 2, t3 combine 2
    // → 5 + 5 = 10; L1 r0: 1 + 2 + 1 → 4 + 4 = 8.
    assert_close!(ev.simulated_step_us, 18.0);
    assert_close!(ev.inter_node_bytes, 0.0);
    assert_close!(ev.intra_node_bytes, 10.0 + 8.0);
}

#[test]
fn replicas_split_load_evenly() {
    // rank 0 {0, 1}, rank 1 {0, 2}; e0 replicated.
    let ranks = vec![vec![0, 1], vec![0, 2]];
    assert_eq!(rank_loads(&ranks, &[4.0, 1.0, 3.0]), vec![3.0, 5.0]);
    // three replicas
    assert_eq!(rank_loads(&[vec![0], vec![0], vec![0, 1]], &[3.0, 2.0]), vec![1.0, 1.0, 3.0]);

    // Through evaluate: 1 layer, e0 on both ranks (separate nodes): tokens of home 0 and 1 both pick
    // e0 → load 1 per replica, all dispatches local, no communication.
    let topo = Topology { nodes: vec![vec![0], vec![1]] };
    let p = Placement::new(3, topo, layers(&[&[&[0, 1], &[0, 2]]]));
    let t = RoutingTrace {
        num_experts: 3,
        num_layers: 1,
        top_k: 1,
        topk_ids: vec![0, 0, 1, 2],
        topk_weights: None,
        seq_ids: Some(vec![0, 1, 2, 3]), // homes 0, 1, 0, 1
    };
    let ev = evaluate(&p, &t, &unit_hw()).unwrap();
    assert_close!(ev.layers[0].max_load, 2.0); // r0: 1 + 1, r1: 1 + 1
    assert_close!(ev.balancedness, 1.0);
    assert_close!(ev.cross_node_fraction, 0.0);
    assert_close!(ev.hops, 0.0);
    assert_close!(ev.simulated_step_us, 2.0);
    // t3 (home 1) now picks e1 (only on r0, other node): 1 remote dispatch of 4.
    let t2 = RoutingTrace { topk_ids: vec![0, 0, 1, 1], ..t };
    let ev = evaluate(&p, &t2, &unit_hw()).unwrap();
    assert_close!(ev.cross_node_fraction, 0.25);
    // r0: compute 1 (e0 from t0) + 2 (e1) = 3, sends combine 1 byte over IB → 3 + 2 = 5.
    assert_close!(ev.simulated_step_us, 5.0);
}

#[test]
fn remote_replicas_are_split_and_ib_deduplicated() {
    // 3 ranks on 2 nodes: node 0 = {0}, node 1 = {1, 2}. e0, e1 on r1 and r2; e2, e3 on r0.
    let topo = Topology { nodes: vec![vec![0], vec![1, 2]] };
    let p = Placement::new(4, topo, layers(&[&[&[2, 3], &[0, 1], &[0, 1]]]));
    // one token, home rank 0, choosing e0 and e1: each split ½ / ½ over r1 and r2.
    let t = RoutingTrace {
        num_experts: 4,
        num_layers: 1,
        top_k: 2,
        topk_ids: vec![0, 1],
        topk_weights: None,
        seq_ids: Some(vec![0]),
    };
    let ev = evaluate(&p, &t, &unit_hw()).unwrap();
    // node 1 is reached with probability 1 → 1 byte over IB from r0 (2 µs); combine 1 byte split
    // ½ / ½ over r1, r2 (1 µs each) + compute 1 each. Slowest: r0 = 2 µs, r1 = 1 + 1 = 2 µs.
    assert_close!(ev.simulated_step_us, 2.0);
    assert_close!(ev.cross_node_fraction, 1.0);
    assert_close!(ev.layers[0].max_load, 1.0); // r1 = ½ + ½
    assert_close!(ev.layers[0].mean_load, 2.0 / 3.0);
}

#[test]
fn primitives() {
    // local_dispatch: node 0 = ranks {0, 1}, node 1 = {2}; expert 0 on r0 and r1 (counted once).
    let ranks = vec![vec![0, 1], vec![0, 2], vec![3, 1]];
    let node_of_rank = [0, 0, 1];
    let demand = vec![vec![10.0, 20.0, 30.0, 40.0], vec![1.0, 2.0, 3.0, 4.0]];
    assert_close!(local_dispatch(&ranks, &node_of_rank, &demand), 10.0 + 20.0 + 30.0 + 4.0 + 2.0);

    // hops: a r0 {0,1}, r1 {0,2}; b r0 {1,0}, r1 {0,2}; T = all ones (3x3). Co-hosted pairs:
    // r0 (0,1)(0,0)(1,1)(1,0), r1 (0,0)(0,2)(2,0)(2,2) → 7 distinct.
    let a = vec![vec![0, 1], vec![0, 2]];
    let b = vec![vec![1, 0], vec![0, 2]];
    let t = vec![1.0; 9];
    assert_close!(same_rank_hops(&a, &b, &t, 3), 7.0);
    // one node holds everything → all 9 pairs
    assert_close!(same_node_hops(&a, &b, &[0, 0], &t, 3), 9.0);
    // two nodes: same as ranks
    assert_close!(same_node_hops(&a, &b, &[0, 1], &t, 3), 7.0);
    // weighted: T[e][e2] = 3e + e2
    let tw: Vec<f64> = (0..9).map(|i| i as f64).collect();
    // pairs (0,0)=0 (0,1)=1 (1,0)=3 (1,1)=4 (0,2)=2 (2,0)=6 (2,2)=8 → 24
    assert_close!(same_rank_hops(&a, &b, &tw, 3), 24.0);
}

#[test]
fn statistics_only_input() {
    // SGLang-style load only: no transitions → no hop shares; cross-node from load spread evenly.
    let stats = RoutingStats::from_load(vec![vec![3.0, 2.0, 2.0, 1.0], vec![2.0; 4]]).unwrap();
    let ev = evaluate_stats(&two_nodes(), &stats, &HardwareProfile::h100()).unwrap();
    assert_close!(ev.hops, 0.0);
    assert_eq!(ev.layers[0].same_rank_hop_share, None);
    assert_eq!(ev.layers[0].same_node_hop_share, None);
    assert_close!(ev.balancedness, 8.0 / 9.0);
    // every expert lives on one of two nodes; half of each expert's tokens are homed elsewhere
    assert_close!(ev.cross_node_fraction, 0.5);
    assert!(ev.simulated_step_us > 0.0);
}

#[test]
fn mismatched_shapes_are_errors() {
    let hw = HardwareProfile::h100();
    // experts differ
    let t5 = RoutingTrace { num_experts: 5, ..trace() };
    match evaluate(&two_nodes(), &t5, &hw) {
        Err(PlacementError::Mismatch(m)) => assert!(m.contains("4 experts") && m.contains("5"), "{m}"),
        other => panic!("{other:?}"),
    }
    // layers differ
    let one = Placement::new(4, Topology { nodes: vec![vec![0], vec![1]] }, layers(&[&[&[0, 1], &[2, 3]]]));
    assert!(matches!(evaluate(&one, &trace(), &hw), Err(PlacementError::Mismatch(_))));
    let stats = RoutingStats::from_trace(&trace(), None);
    assert!(matches!(evaluate_stats(&one, &stats, &hw), Err(PlacementError::Mismatch(_))));
    // inconsistent statistics
    let mut bad = stats.clone();
    bad.load[1].pop();
    assert!(matches!(evaluate_stats(&two_nodes(), &bad, &hw), Err(PlacementError::Mismatch(_))));
    let mut bad = stats.clone();
    bad.transitions.clear();
    assert!(matches!(evaluate_stats(&two_nodes(), &bad, &hw), Err(PlacementError::Mismatch(_))));
    // invalid placement built in memory (expert out of range) → error, not a panic
    let broken = Placement::new(4, Topology { nodes: vec![vec![0], vec![1]] }, layers(&[&[&[0, 9], &[2, 3]], &[&[0, 2], &[1, 3]]]));
    assert!(matches!(evaluate(&broken, &trace(), &hw), Err(PlacementError::Invalid(_))));
    // invalid trace
    let mut tr = trace();
    tr.topk_ids[0] = 7;
    assert!(evaluate(&two_nodes(), &tr, &hw).is_err());
    // invalid hardware
    let zero = HardwareProfile { flops_per_s: 0.0, ..hw };
    assert!(evaluate(&two_nodes(), &trace(), &zero).is_err());
}

#[test]
fn table_and_serialisation() {
    let a = evaluate(&two_nodes(), &trace(), &unit_hw()).unwrap();
    let stats = RoutingStats::from_load(vec![vec![3.0, 2.0, 2.0, 1.0], vec![2.0; 4]]).unwrap();
    let b = evaluate_stats(&two_nodes(), &stats, &unit_hw()).unwrap();
    let table = format_table(&[("contiguous".into(), a.clone()), ("from-load".into(), b)]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].contains("balancedness") && lines[0].contains("sim step us"));
    assert!(lines[2].starts_with("contiguous") && lines[2].contains("0.8889") && lines[2].contains("56.2"));
    assert!(lines[2].contains("75.0") && lines[2].contains("21.0"), "{table}");
    assert!(lines[3].contains(" -"), "missing hop shares shown as '-': {table}");
    let per_layer = format_layers(&a);
    assert_eq!(per_layer.lines().count(), 4, "{per_layer}");
    assert!(per_layer.lines().nth(2).unwrap().starts_with("0 ") && per_layer.contains("0.8000"), "{per_layer}");
    let sim = format_simulation(&a);
    assert!(sim.contains("11.0") && sim.contains("52.4") && sim.contains("simulated step: 21.0 us on unit"), "{sim}");
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["tokens"], 4);
    assert!(json["layers"][1]["same_rank_hop_share"].is_null());
    assert!((json["balancedness"].as_f64().unwrap() - 8.0 / 9.0).abs() < 1e-12);
}

#[test]
fn h100_profile_is_sane() {
    let hw = HardwareProfile::h100();
    hw.validate().unwrap();
    assert_eq!(HardwareProfile::named("H100"), Some(hw.clone()));
    assert!(hw.flops_per_s < 989e12);
    assert_close!(hw.flops_per_assignment(), 6.0 * 7168.0 * 2048.0);
    assert_close!(hw.token_bytes(), 14336.0);
}

mod plots {
    use super::*;
    use placement::plot::{line_plot_svg, rank_load_heatmap_svg};
    use placement::synth::{SynthConfig, synthesize};

    fn count(hay: &str, needle: &str) -> usize {
        hay.matches(needle).count()
    }

    #[test]
    fn heatmap_cells_colours_and_labels() {
        let stats = RoutingStats::from_trace(&trace(), None);
        let svg = rank_load_heatmap_svg(&two_nodes(), &stats.load, "tiny <example> & co");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("tiny &lt;example&gt; &amp; co"));
        // 2 layers x 2 ranks of cells, each with a tooltip
        assert_eq!(count(&svg, "<title>layer "), 4);
        // layer 0: r0 = 5 / 4 = 1.25 x mean (above mean, red side), r1 = 0.75 (blue side)
        assert!(svg.contains("layer 0, rank 0: 1.25 x mean"), "{svg}");
        assert!(svg.contains("layer 0, rank 1: 0.75 x mean"));
        assert!(svg.contains("layer 1, rank 1: 1 x mean"));
        assert!(svg.contains(">rank<") && svg.contains(">layer<") && svg.contains("linearGradient"));
        // missing layers are drawn as 'no data' rather than panicking
        let svg = rank_load_heatmap_svg(&two_nodes(), &stats.load[..1], "partial");
        assert_eq!(count(&svg, "no data"), 2);
    }

    #[test]
    fn heatmap_at_deepseek_scale() {
        let cfg = SynthConfig { num_sequences: 4, tokens_per_sequence: 64, ..SynthConfig::deepseek_v3() };
        let t = synthesize(&cfg).unwrap();
        let stats = RoutingStats::from_trace(&t, None);
        let topo = Topology::uniform(32, 4).unwrap();
        let ls: Vec<LayerPlacement> = (0..58)
            .map(|_| LayerPlacement { ranks: (0..32).map(|r| (r * 8..r * 8 + 8).collect()).collect() })
            .collect();
        let p = Placement::new(256, topo, ls);
        let svg = rank_load_heatmap_svg(&p, &stats.load, "DeepSeek-V3 contiguous");
        assert_eq!(count(&svg, "<title>layer "), 58 * 32);
        if let Ok(dir) = std::env::var("SWITCHYARD_PLOT_DIR") {
            std::fs::write(format!("{dir}/heatmap.svg"), &svg).unwrap();
        }
    }

    #[test]
    fn line_plot_series_legend_and_gaps() {
        let series = vec![
            ("eplb".to_string(), vec![(0.0, 0.8), (1.0, 0.85), (2.0, 0.9)]),
            ("ilp".to_string(), vec![(0.0, 0.9), (1.0, f64::NAN), (2.0, 0.95), (3.0, 0.97)]),
            ("empty".to_string(), vec![]),
        ];
        let svg = line_plot_svg("balancedness over time", "window", "balancedness", &series);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">window<") && svg.contains(">balancedness<"));
        assert!(svg.contains(">eplb<") && svg.contains(">ilp<") && svg.contains(">empty<"));
        // the NaN point splits ilp into two segments: 1 + 2 polylines
        assert_eq!(count(&svg, "<polyline"), 3);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        if let Ok(dir) = std::env::var("SWITCHYARD_PLOT_DIR") {
            std::fs::write(format!("{dir}/lines.svg"), &svg).unwrap();
        }
        // degenerate inputs still give a valid picture
        let flat = line_plot_svg("flat", "x", "y", &[("c".into(), vec![(1.0, 5.0), (1.0, 5.0)])]);
        assert!(!flat.contains("NaN"));
        let none = line_plot_svg("none", "x", "y", &[]);
        assert!(none.contains("</svg>") && !none.contains("NaN"));
    }
}

#[test]
fn deepseek_scale_evaluation_agrees_with_primitives() {
    use placement::synth::{SynthConfig, synthesize};
    let t = synthesize(&SynthConfig::deepseek_v3()).unwrap(); // 4096 tokens
    let topo = Topology::uniform(32, 4).unwrap();
    // contiguous, plus one replica of expert r on rank r (9 slots per rank)
    let ls: Vec<LayerPlacement> = (0..58)
        .map(|_| LayerPlacement { ranks: (0..32).map(|r| (r * 8..r * 8 + 8).chain([(r * 8 + 8) % 256]).collect()).collect() })
        .collect();
    let p = Placement::new(256, topo, ls);
    let ev = evaluate(&p, &t, &HardwareProfile::h100()).unwrap();
    assert!(ev.balancedness > 0.3 && ev.balancedness < 1.0);
    assert!(ev.cross_node_fraction > 0.5 && ev.cross_node_fraction < 0.9, "{}", ev.cross_node_fraction);
    assert!(ev.simulated_step_us > 0.0);
    // the hot primitives agree with the evaluation
    let stats = RoutingStats::from_trace(&t, Some(32));
    evaluate_stats(&p, &stats, &HardwareProfile::h100()).unwrap();
    let mut hops = 0.0;
    for l in 0..57 {
        hops += same_rank_hops(&p.layers[l].ranks, &p.layers[l + 1].ranks, &stats.transitions[l], 256);
    }
    assert!((hops / ev.hops - ev.same_rank_hop_share).abs() < 1e-12);
}
