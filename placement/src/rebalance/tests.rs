use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::sim::{eplb_placement, simulate_all};
use super::*;
use crate::Topology;
use crate::eval::evaluate_stats;
use crate::solver::contiguous;
use crate::synth::{SynthConfig, synthesize};
use crate::{RoutingStats, RoutingTrace};

fn layer_max(ranks: &[Vec<usize>], load: &[f64]) -> f64 {
    max_of(&rank_loads(ranks, load))
}

fn two_rank(ranks: Vec<Vec<usize>>) -> Placement {
    Placement::new(4, Topology::uniform(2, 1).unwrap(), vec![LayerPlacement { ranks }])
}

/// A random valid placement: every expert once on a random rank with room, spare slots filled with
/// random experts the rank lacks.
fn random_placement(rng: &mut StdRng, layers: usize, experts: usize, topo: &Topology, slots: usize) -> Placement {
    let ranks = topo.num_ranks();
    let layers = (0..layers)
        .map(|_| {
            let mut out: Vec<Vec<usize>> = vec![Vec::new(); ranks];
            let mut order: Vec<usize> = (0..experts).collect();
            order.shuffle(rng);
            for e in order {
                let open: Vec<usize> = (0..ranks).filter(|&r| out[r].len() < slots).collect();
                out[open[rng.random_range(0..open.len())]].push(e);
            }
            for slots_of in out.iter_mut() {
                while slots_of.len() < slots {
                    let e = rng.random_range(0..experts);
                    if !slots_of.contains(&e) {
                        slots_of.push(e);
                    }
                }
                slots_of.shuffle(rng);
            }
            LayerPlacement { ranks: out }
        })
        .collect();
    let p = Placement::new(experts, topo.clone(), layers);
    p.validate().unwrap();
    p
}

fn random_load(rng: &mut StdRng, layers: usize, experts: usize) -> Vec<Vec<f64>> {
    (0..layers)
        .map(|_| {
            (0..experts)
                .map(|_| if rng.random_bool(0.15) { 0.0 } else { (rng.random::<f64>().powi(3) * 1000.0).round() })
                .collect()
        })
        .collect()
}

fn load_of(trace: &RoutingTrace) -> Vec<Vec<f64>> {
    RoutingStats::from_trace(trace, None).load
}

#[test]
fn config_defaults_validate_and_bad_fields_are_named() {
    let d = RebalanceConfig::default();
    d.validate().unwrap();
    assert_eq!((d.threshold, d.margin, d.min_interval_s, d.max_moves), (0.9, 0.02, 5.0, 1024));
    assert_eq!(RebalanceConfig::for_layers(58).max_moves, 58 * 16);
    assert_eq!(RebalanceConfig::for_ranks(320).max_moves, 320 * 32);
    assert_eq!(RebalanceConfig::expert_bytes_for(&HardwareProfile::h100(), 1.0), DEEPSEEK_V3_FP8_EXPERT_BYTES);
    let cases: Vec<(RebalanceConfig, &str)> = vec![
        (RebalanceConfig { threshold: 0.0, ..d.clone() }, "threshold"),
        (RebalanceConfig { threshold: f64::NAN, ..d.clone() }, "threshold"),
        (RebalanceConfig { margin: 1.0, ..d.clone() }, "margin"),
        (RebalanceConfig { margin: -0.1, ..d.clone() }, "margin"),
        (RebalanceConfig { target: 0.8, ..d.clone() }, "target"),
        (RebalanceConfig { max_moves: 0, ..d.clone() }, "max_moves"),
        (RebalanceConfig { min_interval_s: -1.0, ..d.clone() }, "min_interval_s"),
        (RebalanceConfig { period_s: Some(0.0), ..d.clone() }, "period_s"),
        (RebalanceConfig { max_bytes_per_s: Some(-5.0), ..d.clone() }, "max_bytes_per_s"),
        (RebalanceConfig { max_bytes_per_s: Some(1e9), expert_bytes: 0, ..d.clone() }, "expert_bytes"),
        // 1 MB/s x 5 s cannot load one 44 MB expert
        (RebalanceConfig { max_bytes_per_s: Some(1e6), ..d.clone() }, "less than one expert"),
    ];
    for (cfg, needle) in cases {
        match cfg.validate() {
            Err(PlacementError::Invalid(m)) => assert!(m.contains(needle), "{m:?} should name {needle}"),
            other => panic!("{cfg:?}: expected an Invalid error naming {needle}, got {other:?}"),
        }
        assert!(Rebalancer::new(cfg).is_err());
    }
}

#[test]
fn move_budget_is_capped_by_bandwidth_and_respected() {
    // 60 B/s x 5 s = 300 B per epoch = 3 experts of 100 B.
    let cfg = RebalanceConfig {
        max_moves: 10,
        max_bytes_per_s: Some(60.0),
        expert_bytes: 100,
        threshold: 1.0,
        target: 1.0,
        margin: 0.0,
        ..RebalanceConfig::default()
    };
    cfg.validate().unwrap();
    assert_eq!(cfg.move_budget(), 3);
    let mut rng = StdRng::seed_from_u64(3);
    let topo = Topology::uniform(8, 2).unwrap();
    let current = random_placement(&mut rng, 3, 16, &topo, 4);
    let load = random_load(&mut rng, 3, 16);
    let p = propose(&cfg, &current, &load).unwrap().expect("a random placement is improvable");
    assert!(p.moves <= 3 && p.moves >= 1, "{} moves", p.moves);
    assert_eq!(p.bytes, p.moves as u64 * 100);
    assert!(p.bytes as f64 <= 60.0 * cfg.min_interval_s);
}

#[test]
fn no_proposal_without_traffic() {
    let p = two_rank(vec![vec![0, 1, 2], vec![3, 0, 1]]);
    let zero = vec![vec![0.0; 4]];
    let cfg = RebalanceConfig { threshold: 1.0, target: 1.0, margin: 0.0, ..RebalanceConfig::default() };
    assert_eq!(propose(&cfg, &p, &zero).unwrap(), None);
    assert_eq!(propose_ungated(&cfg, &p, &zero).unwrap(), None);
    let mut rb = Rebalancer::new(RebalanceConfig { period_s: Some(1.0), ..cfg }).unwrap();
    assert_eq!(rb.poll(0.0, &p, &zero).unwrap(), None);
    assert_eq!(rb.poll(100.0, &p, &zero).unwrap(), None);
    // A LoadWindow that saw nothing is all zero too.
    let w = crate::live::LoadWindow::new(1, 4, 10.0);
    assert_eq!(propose(&RebalanceConfig::default(), &p, w.load()).unwrap(), None);
}

#[test]
fn no_proposal_above_threshold_or_below_margin() {
    let mut rng = StdRng::seed_from_u64(11);
    let load = random_load(&mut rng, 4, 24);
    let topo = Topology::uniform(6, 2).unwrap();
    let like = contiguous::solve(4, 24, &topo, 5).unwrap();
    let balanced = eplb_placement(&like, &load, None).unwrap();
    let (_, b) = balancedness(&balanced, &load);
    assert!(b > 0.9, "EPLB balancedness {b}");
    assert_eq!(propose(&RebalanceConfig::default(), &balanced, &load).unwrap(), None, "above the threshold");
    // Below the threshold but nothing gains the margin: a margin of 0.99 can never be met.
    let cfg = RebalanceConfig { threshold: 1.0, target: 1.0, margin: 0.99, ..RebalanceConfig::default() };
    assert_eq!(propose(&cfg, &like, &load).unwrap(), None);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let p = two_rank(vec![vec![0, 1, 2], vec![3, 0, 1]]);
    let cfg = RebalanceConfig::default();
    let mismatch = |r: Result<Option<Proposal>, PlacementError>| matches!(r, Err(PlacementError::Mismatch(_)));
    assert!(mismatch(propose(&cfg, &p, &[])));
    assert!(mismatch(propose(&cfg, &p, &[vec![1.0; 4], vec![1.0; 4]])));
    assert!(mismatch(propose(&cfg, &p, &[vec![1.0; 3]])));
    assert!(mismatch(propose(&cfg, &p, &[vec![1.0, f64::NAN, 1.0, 1.0]])));
    assert!(mismatch(propose(&cfg, &p, &[vec![1.0, -1.0, 1.0, 1.0]])));
    let bad = two_rank(vec![vec![0, 0, 2], vec![3, 0, 1]]);
    assert!(matches!(propose(&cfg, &bad, &[vec![1.0; 4]]), Err(PlacementError::Invalid(_))));
    let bad_cfg = RebalanceConfig { max_moves: 0, ..cfg };
    assert!(matches!(propose(&bad_cfg, &p, &[vec![1.0; 4]]), Err(PlacementError::Invalid(_))));
    let mut rb = Rebalancer::new(RebalanceConfig::default()).unwrap();
    assert!(rb.poll(f64::NAN, &p, &[vec![1.0; 4]]).is_err());
}

#[test]
fn hand_worked_replica_move() {
    // Loads e0 2, e1 2, e2 12, e3 2. Rank 0 {0,1,2} = 1 + 1 + 12 = 14, rank 1 {3,0,1} = 2 + 1 + 1 = 4
    // (e0, e1 have two replicas). Best single move: a replica of e2 on rank 1 in place of a redundant
    // e0 (first such slot): both ranks 9, balancedness 1.
    let current = two_rank(vec![vec![0, 1, 2], vec![3, 0, 1]]);
    let load = vec![vec![2.0, 2.0, 12.0, 2.0]];
    let cfg = RebalanceConfig { max_moves: 1, ..RebalanceConfig::default() };
    let p = propose(&cfg, &current, &load).unwrap().expect("0.64 is below 0.9");
    assert_eq!(p.placement.layers[0].ranks, vec![vec![0, 1, 2], vec![3, 2, 1]]);
    assert!((p.before - 9.0 / 14.0).abs() < 1e-12 && (p.after - 1.0).abs() < 1e-12, "{p:?}");
    assert_eq!((p.moves, p.per_layer_moves.clone(), p.bytes), (1, vec![1], DEEPSEEK_V3_FP8_EXPERT_BYTES));
    assert_eq!(diff(&current, &p.placement), vec![vec![vec![], vec![2]]]);
    assert_eq!(moves(&current, &p.placement), 1);
    assert_eq!(propose(&cfg, &current, &load).unwrap(), Some(p), "deterministic");
}

/// Loads 6 6 4 4 3 3 1 1 on 2 ranks x 4 slots from {4,6,6,1} | {4,3,3,1} (17 | 11): swapping a 4
/// for a 1 ({6,6,1,1} | {4,4,3,3}, found first) and a 6 for a 3 ({6,4,3,1} twice) both balance the
/// window exactly; planning for drift takes the second, which still holds when the loads move.
#[test]
fn drift_planning_spreads_the_heavy_experts() {
    let load = vec![vec![6.0, 6.0, 4.0, 4.0, 3.0, 3.0, 1.0, 1.0]];
    let current = Placement::new(8, Topology::uniform(2, 1).unwrap(), vec![LayerPlacement { ranks: vec![vec![2, 0, 1, 6], vec![3, 4, 5, 7]] }]);
    let heavy_apart = |ranks: &[Vec<usize>]| ranks.iter().all(|r| r.contains(&0) != r.contains(&1));
    for drift in [0.0, 1.0] {
        let planned = plan(&current, &load, 2, 1.0, 1, drift);
        eprintln!("drift {drift}: {planned:?}");
        assert_eq!(layer_max(&planned[0], &load[0]), 14.0, "drift {drift}: balanced");
        assert_eq!(heavy_apart(&planned[0]), drift > 0.0, "drift {drift}: the two 6s apart only with drift: {planned:?}");
    }
    // The default (no drift outside a live window) and a drift asked for explicitly.
    let cfg = RebalanceConfig { max_moves: 2, margin: 0.0, ..RebalanceConfig::default() };
    let p = propose(&RebalanceConfig { load_drift: Some(1.0), ..cfg }, &current, &load).unwrap().expect("17 | 11 is unbalanced");
    assert!(heavy_apart(&p.placement.layers[0].ranks), "{:?}", p.placement.layers[0].ranks);
}

#[test]
fn only_swaps_when_nothing_is_redundant() {
    // 2 ranks x 2 slots, 4 experts, no spare slot: only swaps (2 moves) can help.
    let current = two_rank(vec![vec![0, 1], vec![2, 3]]);
    let load = vec![vec![10.0, 8.0, 1.0, 1.0]];
    let cfg = RebalanceConfig { max_moves: 1, ..RebalanceConfig::default() };
    assert_eq!(propose(&cfg, &current, &load).unwrap(), None, "one move cannot pay for a swap");
    let cfg = RebalanceConfig { max_moves: 2, ..cfg };
    let p = propose(&cfg, &current, &load).unwrap().unwrap();
    // swap e1 (8) for e2 or e3 (1): ranks 11 / 9
    assert_eq!(p.moves, 2);
    assert!((p.after - 10.0 / 11.0).abs() < 1e-12, "{}", p.after);
    p.placement.validate().unwrap();
}

#[test]
fn random_proposals_are_valid_within_budget_and_never_worse_per_layer() {
    let mut rng = StdRng::seed_from_u64(20250601);
    let mut proposed = 0;
    for case in 0..300 {
        let nodes = rng.random_range(1..=3);
        let ranks = nodes * rng.random_range(1..=4);
        let slots = rng.random_range(1..=6);
        let experts = rng.random_range(slots..=ranks * slots);
        let layers = rng.random_range(1..=4);
        let topo = Topology::uniform(ranks, nodes).unwrap();
        let current = random_placement(&mut rng, layers, experts, &topo, slots);
        let load = random_load(&mut rng, layers, experts);
        let cfg = RebalanceConfig {
            threshold: 1.0,
            target: 1.0,
            margin: 0.0,
            max_moves: rng.random_range(1..=40),
            ..RebalanceConfig::default()
        };
        let Some(p) = propose(&cfg, &current, &load).unwrap() else { continue };
        proposed += 1;
        let ctx = format!("case {case}: {ranks} ranks / {nodes} nodes x {slots} slots, {experts} experts");
        p.placement.validate().unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(p.placement.topology, current.topology, "{ctx}");
        assert_eq!(p.placement.slots_per_rank(), slots, "{ctx}");
        assert!(p.moves >= 1 && p.moves <= cfg.max_moves, "{ctx}: {} moves, budget {}", p.moves, cfg.max_moves);
        assert_eq!(p.moves, moves(&current, &p.placement), "{ctx}");
        assert_eq!(p.per_layer_moves.iter().sum::<usize>(), p.moves, "{ctx}");
        assert_eq!(p.bytes, p.moves as u64 * cfg.expert_bytes, "{ctx}");
        assert!(p.after > p.before, "{ctx}: {} -> {}", p.before, p.after);
        assert!((balancedness(&p.placement, &load).1 - p.after).abs() < 1e-12, "{ctx}");
        for (l, row) in load.iter().enumerate() {
            let (old, new) = (layer_max(&current.layers[l].ranks, row), layer_max(&p.placement.layers[l].ranks, row));
            assert!(new <= old, "{ctx}: layer {l} max {old} -> {new}");
            if p.per_layer_moves[l] == 0 {
                assert_eq!(p.placement.layers[l], current.layers[l], "{ctx}: layer {l} unchanged");
            }
        }
        assert_eq!(propose(&cfg, &current, &load).unwrap(), Some(p), "{ctx}: deterministic");
    }
    assert!(proposed > 150, "only {proposed} of 300 random cases produced a proposal");
}

/// Two routing phases with different hot experts (another routing model), small enough for a test.
fn shifted_phases(tokens: usize) -> (RoutingTrace, RoutingTrace) {
    let cfg = SynthConfig {
        num_layers: 6,
        num_experts: 64,
        top_k: 6,
        num_sequences: tokens / 64,
        tokens_per_sequence: 64,
        zipf_exponent: 0.9,
        ..SynthConfig::default()
    };
    let a = synthesize(&cfg).unwrap();
    let b = synthesize(&SynthConfig { model_seed: 7, seed: 8, ..cfg }).unwrap();
    (a, b)
}

#[test]
fn warm_start_beats_eplb_from_scratch_on_moves() {
    // DeepSeek-V3-like layers (256 experts, top-8, zipf 0.7) on 32 ranks / 4 nodes x 9 slots; phase 2
    // is another routing model, so every layer's hot experts change.
    let cfg = SynthConfig { num_layers: 8, num_sequences: 128, tokens_per_sequence: 64, ..SynthConfig::deepseek_v3() };
    let load1 = load_of(&synthesize(&cfg).unwrap());
    let load2 = load_of(&synthesize(&SynthConfig { model_seed: 7, seed: 8, ..cfg }).unwrap());
    let topo = Topology::uniform(32, 4).unwrap();
    let cont = contiguous::solve(8, 256, &topo, 9).unwrap();
    let slots = 8 * 32 * 9;
    let current = eplb_placement(&cont, &load1, None).unwrap();
    let scratch = eplb_placement(&cont, &load2, None).unwrap();
    let bal = |p: &Placement| balancedness(p, &load2).1;
    let (stale, eplb_bal, cont_bal) = (bal(&current), bal(&scratch), bal(&cont));
    let eplb_moves = moves(&current, &scratch);
    assert!(stale < 0.9, "the shift must unbalance the phase-1 placement ({stale})");
    assert!(eplb_moves * 10 >= slots * 9, "EPLB from scratch reshuffles nearly every slot ({eplb_moves} of {slots})");
    let unlimited = RebalanceConfig { max_moves: 100_000, ..RebalanceConfig::default() };
    // The policy's own target (0.95, above the threshold).
    let p = propose(&unlimited, &current, &load2).unwrap().expect("below threshold");
    // EPLB's balancedness as the target.
    let q = propose(&RebalanceConfig { target: eplb_bal.max(0.9), ..unlimited.clone() }, &current, &load2).unwrap().unwrap();
    eprintln!(
        "stale {stale:.4}, contiguous {cont_bal:.4}, EPLB from scratch {eplb_bal:.4} with {eplb_moves} moves; \
         warm start {:.4} with {} moves, {:.4} with {} moves (of {slots} slots)",
        p.after, p.moves, q.after, q.moves
    );
    for x in [&p, &q] {
        x.placement.validate().unwrap();
    }
    assert!(p.after >= unlimited.target, "{}", p.after);
    assert!(p.moves * 5 <= eplb_moves, "to {}: {} moves vs EPLB {eplb_moves}", unlimited.target, p.moves);
    assert!(q.after >= eplb_bal - 0.005, "warm start {} vs EPLB {eplb_bal}", q.after);
    assert!(q.moves * 2 <= eplb_moves, "to EPLB's {eplb_bal}: {} moves vs EPLB {eplb_moves}", q.moves);
    assert!(cont_bal < p.after - 0.2, "contiguous {cont_bal} should be clearly worse than {}", p.after);
    // A small budget is respected and still helps.
    let r = propose(&RebalanceConfig { max_moves: 20, ..RebalanceConfig::default() }, &current, &load2).unwrap().unwrap();
    assert!(r.moves <= 20 && r.after > stale);
}

#[test]
fn rebalancer_respects_min_interval_and_period() {
    let current = two_rank(vec![vec![0, 1, 2], vec![3, 0, 1]]);
    let load = vec![vec![2.0, 2.0, 12.0, 2.0]]; // balancedness 0.64, one move to 1.0
    let mut rb = Rebalancer::new(RebalanceConfig::default()).unwrap();
    assert!(rb.poll(0.0, &current, &load).unwrap().is_some());
    assert_eq!(rb.last_epoch_s(), Some(0.0));
    assert!(rb.poll(4.9, &current, &load).unwrap().is_none(), "within min_interval");
    assert!(rb.poll(5.0, &current, &load).unwrap().is_some());
    // Above the threshold only the periodic re-check proposes.
    let cfg = RebalanceConfig { threshold: 0.6, target: 1.0, period_s: Some(10.0), ..RebalanceConfig::default() };
    assert_eq!(propose(&cfg, &current, &load).unwrap(), None, "0.64 is above 0.6");
    let mut rb = Rebalancer::new(cfg).unwrap();
    let p = rb.poll(0.0, &current, &load).unwrap().expect("the first poll is a periodic check");
    assert!(p.after > 0.99);
    assert!(rb.poll(6.0, &current, &load).unwrap().is_none(), "period not due");
    assert!(rb.poll(10.0, &current, &load).unwrap().is_some(), "period due");
}

/// A live window through a shift: steady balanced traffic proposes nothing; once the recent
/// window has moved, the proposal is decided on where the load is heading, and epochs may follow
/// at a quarter of `min_interval_s` while the shift lasts (the long window's poll may not).
#[test]
fn poll_window_decides_on_the_trend_while_the_load_shifts() {
    let current = two_rank(vec![vec![0, 1, 2], vec![3, 0, 1]]);
    let mut w = crate::live::LoadWindow::new(1, 4, 2.0);
    for _ in 0..40 {
        w.decay(0.5);
        w.add(&[200, 200, 400, 400]); // 6 + 6 per rank: balanced
    }
    let mut rb = Rebalancer::new(RebalanceConfig::default()).unwrap();
    assert_eq!(rb.poll_window(20.0, &current, &w).unwrap(), None, "steady and balanced");
    for _ in 0..2 {
        w.decay(0.5);
        w.add(&[200, 200, 1200, 200]); // expert 2 (rank 0 only) turns hot
    }
    assert!(w.shift_distance() > RebalanceConfig::default().shift_distance);
    let p = rb.poll_window(21.0, &current, &w).unwrap().expect("a shift under way");
    assert!(p.during_shift && p.after > p.before);
    assert!(p.before < balancedness(&current, w.load()).1, "judged on the trend, worse than the long window says");
    assert_eq!(rb.poll_window(22.0, &current, &w).unwrap(), None, "within min_interval / 4");
    assert!(rb.poll_window(22.3, &current, &w).unwrap().is_some(), "after min_interval / 4, still shifting");
    assert!(rb.poll(24.0, &current, w.recent_load()).unwrap().is_none(), "a plain poll keeps min_interval");
}

#[test]
fn simulate_load_matches_evaluate_stats() {
    let mut rng = StdRng::seed_from_u64(5);
    let topo = Topology::uniform(6, 2).unwrap();
    let p = random_placement(&mut rng, 3, 10, &topo, 3);
    let load = random_load(&mut rng, 3, 10);
    let hw = HardwareProfile::h100();
    let per_layer = crate::eval::simulate_load(&p, &load, &hw).unwrap();
    let ev = evaluate_stats(&p, &RoutingStats::from_load(load.clone()).unwrap(), &hw).unwrap();
    for (a, b) in per_layer.iter().zip(&ev.layers) {
        assert!((a - b.simulated_us).abs() < 1e-9 * b.simulated_us.max(1.0), "{a} vs {}", b.simulated_us);
    }
    assert!(matches!(crate::eval::simulate_load(&p, &load[..2], &hw), Err(PlacementError::Mismatch(_))));
}

#[test]
fn diff_lists_what_each_rank_must_load() {
    let a = two_rank(vec![vec![0, 1, 2], vec![3, 0, 1]]);
    let b = two_rank(vec![vec![2, 1, 3], vec![3, 0, 1]]);
    assert_eq!(diff(&a, &b), vec![vec![vec![3], vec![]]]);
    assert_eq!(diff(&a, &a), vec![vec![Vec::<usize>::new(), Vec::new()]]);
    assert_eq!(moves(&b, &a), 1);
}

#[test]
fn policy_names_round_trip() {
    for p in Policy::ALL {
        assert_eq!(p.name().parse::<Policy>().unwrap(), p);
    }
    assert!("dynamic".parse::<Policy>().is_err());
}

fn small_sim_config() -> SimConfig {
    // A small model steps in a few ms, so the control loop runs on a matching clock.
    let mut cfg = SimConfig {
        tokens_per_step: 1024,
        report_interval_s: 0.02,
        window_half_life_s: 0.05,
        migration_bytes_per_s: 100e9,
        ..SimConfig::default()
    };
    cfg.rebalance.min_interval_s = 0.1;
    cfg.rebalance.max_moves = 40;
    cfg
}

#[test]
fn simulation_rebalance_recovers_after_the_shift() {
    let (a, b) = shifted_phases(4096);
    let topo = Topology::uniform(16, 2).unwrap();
    let cont = contiguous::solve(6, 64, &topo, 5).unwrap();
    let cfg = small_sim_config();
    let phases = [Phase { trace: &a, steps: 150 }, Phase { trace: &b, steps: 450 }];
    let reports = simulate_all(&phases, &cont, &Policy::ALL, &cfg).unwrap();
    let get = |name: &str| reports.iter().find(|r| r.summary.policy == name).unwrap();
    let (st, se, rb, re) = (get("static"), get("static-eplb"), get("rebalance"), get("rebalance-eplb"));
    for r in &reports {
        let s = &r.summary;
        eprintln!(
            "{:>15}: {:.0} tok/s, p50 {:.3} ms, p99 {:.3} ms, before {:?} after {:?}, recovery {:?}, {} epochs, {} moves",
            s.policy, s.tokens_per_s, s.p50_step_ms, s.p99_step_ms, s.balancedness_before_shift,
            s.balancedness_after_shift, s.recovery_s, s.epochs, s.migrations
        );
        assert_eq!(r.steps.len(), 600);
        assert_eq!(s.tokens, 600 * 1024);
        assert_eq!(s.migrations, r.steps.iter().map(|x| x.moves_applied).sum::<usize>());
        assert_eq!(s.bytes_moved, s.migrations as u64 * cfg.rebalance.expert_bytes);
        assert!(r.steps.windows(2).all(|w| w[1].epoch >= w[0].epoch && w[1].start_s > w[0].start_s));
        assert!(s.p50_step_ms <= s.p99_step_ms);
        // no epoch spends more than the budget
        assert!(r.steps.iter().all(|x| x.moves_applied <= cfg.rebalance.max_moves));
    }
    assert_eq!((st.summary.epochs, se.summary.epochs), (0, 0));
    // Static contiguous never recovers; static EPLB was good before the shift and is not after.
    assert_eq!(st.summary.recovery_s, None);
    assert_eq!(se.summary.recovery_s, None);
    assert!(se.summary.balancedness_before_shift > st.summary.balancedness_before_shift);
    for r in [rb, re] {
        let s = &r.summary;
        assert!(s.epochs >= 1 && s.migrations >= 1, "{}", s.policy);
        assert!(s.recovery_s.is_some(), "{} must recover", s.policy);
        assert!(s.final_windowed_balancedness >= cfg.rebalance.threshold, "{}", s.policy);
        assert!(
            s.balancedness_after_shift.unwrap() > st.summary.balancedness_after_shift.unwrap() + 0.1,
            "{} after the shift {:?} vs static {:?}",
            s.policy,
            s.balancedness_after_shift,
            st.summary.balancedness_after_shift
        );
        assert!(s.tokens_per_s_after_shift.unwrap() > st.summary.tokens_per_s_after_shift.unwrap(), "{}", s.policy);
        assert!(s.tokens_per_s > st.summary.tokens_per_s);
    }
    // One policy alone gives the same result as in the batch.
    let alone = simulate(&phases, &cont, Policy::Rebalance(Start::Initial), &cfg).unwrap();
    assert_eq!(alone.summary, rb.summary);
}

#[test]
fn simulation_rejects_bad_input() {
    let (a, _) = shifted_phases(1024);
    let topo = Topology::uniform(4, 1).unwrap();
    let cont = contiguous::solve(6, 64, &topo, 16).unwrap();
    let cfg = small_sim_config();
    assert!(simulate(&[], &cont, Policy::Static, &cfg).is_err());
    assert!(simulate(&[Phase { trace: &a, steps: 0 }], &cont, Policy::Static, &cfg).is_err());
    let other = contiguous::solve(5, 64, &topo, 16).unwrap();
    assert!(matches!(
        simulate(&[Phase { trace: &a, steps: 3 }], &other, Policy::Static, &cfg),
        Err(PlacementError::Mismatch(_))
    ));
    let bad = SimConfig { tokens_per_step: 0, ..cfg.clone() };
    assert!(matches!(simulate(&[Phase { trace: &a, steps: 3 }], &cont, Policy::Static, &bad), Err(PlacementError::Invalid(_))));
    // One phase: no shift, no recovery.
    let one = simulate(&[Phase { trace: &a, steps: 5 }], &cont, Policy::Static, &cfg).unwrap();
    assert_eq!((one.summary.shift_s, one.summary.balancedness_after_shift, one.summary.recovery_s), (None, None, None));
}
