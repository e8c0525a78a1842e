//! Elastic regrouping (`placement::elastic::regroup`) and `min_replicas` in the solvers and the
//! rebalancer.
use std::time::Duration;

use placement::live::balancedness;
use placement::placement::LayerPlacement;
use placement::rebalance::{RebalanceConfig, Rebalancer, propose, propose_ungated};
use placement::solver::{self, Mode, SolveOptions, SolverKind, contiguous, eplb};
use placement::synth::{SynthConfig, synthesize};
use placement::{Placement, PlacementError, RegroupOptions, RoutingStats, Topology, min_replica_count, regroup};

fn synth_stats(layers: usize, experts: usize, seed: u64, zipf: f64) -> RoutingStats {
    let cfg = SynthConfig {
        num_layers: layers,
        num_experts: experts,
        top_k: 2,
        num_sequences: 16,
        tokens_per_sequence: 32,
        zipf_exponent: zipf,
        model_seed: seed,
        seed: seed + 100,
        ..SynthConfig::default()
    };
    RoutingStats::from_trace(&synthesize(&cfg).unwrap(), None)
}

fn topo(ranks: usize) -> Topology {
    Topology::uniform(ranks, 1).unwrap()
}

/// `(layer, expert)` pairs of new rank `r` that its old rank `o` held.
fn held(p: &Placement, o: usize) -> Vec<(usize, usize)> {
    p.layers.iter().enumerate().flat_map(|(l, lp)| lp.ranks[o].iter().map(move |&e| (l, e))).collect()
}

#[test]
fn a_death_keeps_survivors_experts_and_covers_the_orphans() {
    // 4 ranks x 4 slots, 16 experts, no replicas: rank 2 dies.
    let stats = synth_stats(3, 16, 1, 0.8);
    let current = eplb::solve(&stats, &topo(4), 4, None).unwrap();
    let survivors = [Some(0), Some(1), Some(3)];
    let mut opts = RegroupOptions::new(topo(3));
    opts.load = Some(stats.load.clone());
    opts.max_slots_per_rank = Some(6);
    let r = regroup(&current, &survivors, &opts).unwrap();
    r.placement.validate().unwrap();
    assert_eq!(r.placement.num_ranks(), 3);
    assert_eq!(r.placement.slots_per_rank(), 6, "ceil(16 / 3) = 6 slots, within the budget");
    assert_eq!(min_replica_count(&r.placement), 1, "every expert placed");
    assert_eq!(r.under_replicated, 0);
    for (new, &old) in survivors.iter().enumerate() {
        let old = old.unwrap();
        for (l, e) in held(&current, old) {
            assert!(r.placement.layers[l].ranks[new].contains(&e), "new rank {new} lost expert {e} of layer {l}");
        }
        assert_eq!(r.kept_per_rank[new], 3 * 4, "everything kept");
    }
    // Loads: the orphans (16 experts x 3 layers held by rank 2: 12 pairs) plus the replicas that fill
    // the 2 spare slots per layer.
    assert_eq!(r.loads_per_rank.iter().sum::<usize>(), 3 * (3 * 6 - 16) + 12);
    // Deterministic.
    assert_eq!(regroup(&current, &survivors, &opts).unwrap(), r);

    // With a budget of the current 4 slots the survivors are full: orphans displace replicas, and
    // 3 x 4 = 12 slots cannot hold 16 experts.
    opts.max_slots_per_rank = Some(4);
    match regroup(&current, &survivors, &opts) {
        Err(PlacementError::Unplaceable { missing, ranks: 3, slots_per_rank: 4 }) => {
            assert_eq!(missing.len(), 3 * 4, "4 experts per layer go missing");
            // The least loaded of every layer.
            for l in 0..3 {
                let gone: Vec<usize> = missing.iter().filter(|m| m.0 == l).map(|m| m.1).collect();
                let worst_kept = (0..16).filter(|e| !gone.contains(e)).map(|e| stats.load[l][e]).fold(f64::INFINITY, f64::min);
                assert!(gone.iter().all(|&e| stats.load[l][e] <= worst_kept), "layer {l}: {gone:?}");
            }
            let msg = PlacementError::Unplaceable { missing, ranks: 3, slots_per_rank: 4 }.to_string();
            assert!(msg.starts_with("12 (layer, expert) pairs get no slot"), "{msg}");
            assert!(msg.contains("0/") && msg.contains("more"), "{msg}");
        }
        other => panic!("expected Unplaceable, got {other:?}"),
    }
}

#[test]
fn with_two_replicas_a_death_loses_no_expert() {
    for seed in 0..4 {
        let stats = synth_stats(3, 16, seed, 1.0);
        let mut so = SolveOptions::new(topo(4), 8);
        so.min_replicas = 2;
        let (current, _) = solver::solve(SolverKind::Eplb, &stats, &so, &|_| {}).unwrap();
        assert!(min_replica_count(&current) >= 2);
        for dead in 0..4 {
            let survivors: Vec<Option<usize>> = (0..4).filter(|&r| r != dead).map(Some).collect();
            // Coverage without any load: what the survivors hold already has every expert.
            let mut left = current.clone();
            for l in &mut left.layers {
                l.ranks.remove(dead);
            }
            left.topology = topo(3);
            assert_eq!(min_replica_count(&left), 1, "seed {seed}, rank {dead}: a survivor still holds every expert");
            let mut opts = RegroupOptions::new(topo(3));
            opts.min_replicas = 2;
            opts.max_slots_per_rank = Some(11);
            opts.load = Some(stats.load.clone());
            let r = regroup(&current, &survivors, &opts).unwrap();
            r.placement.validate().unwrap();
            assert_eq!(r.under_replicated, 0);
            assert!(min_replica_count(&r.placement) >= 2, "replicas restored");
            // Loads only restore replicas (coverage needed none). EPLB pairs ranks with identical
            // expert sets, so the dead rank's 8 experts per layer may all sit on one survivor: the
            // other two have 2 x 3 free slots for them, and at most 2 kept experts per layer give
            // way (they keep a replica on the paired survivor and get their second one back).
            let kept: usize = r.kept_per_rank.iter().sum();
            assert!(kept >= 3 * 3 * 8 - 3 * 2, "seed {seed}, rank {dead}: kept {:?}", r.kept_per_rank);
            for k in 0..3 {
                assert_eq!(r.kept_per_rank[k] + r.loads_per_rank[k], 3 * 11);
            }
            // ceil(16 * 2 / 3) = 11 > 8 slots.
            assert_eq!(r.placement.slots_per_rank(), 11);
        }
    }
}

#[test]
fn a_joiner_takes_slots_and_balance_does_not_get_worse() {
    for seed in 0..4 {
        let stats = synth_stats(4, 24, seed, 1.2);
        let current = eplb::solve(&stats, &topo(3), 9, None).unwrap();
        let (_, before) = balancedness(&current, &stats.load);
        let mut opts = RegroupOptions::new(topo(4));
        opts.load = Some(stats.load.clone());
        let r = regroup(&current, &[Some(0), Some(1), Some(2), None], &opts).unwrap();
        r.placement.validate().unwrap();
        assert_eq!(r.placement.slots_per_rank(), 9);
        assert_eq!((r.kept_per_rank[3], r.loads_per_rank[3]), (0, 4 * 9), "the joiner loads all its slots");
        // The balance polish may trade survivors' experts, within as many moves as the joiner has slots.
        let survivor_loads: usize = r.loads_per_rank[..3].iter().sum();
        assert!(survivor_loads <= 4 * 9, "seed {seed}: survivors load {survivor_loads}");
        for k in 0..3 {
            assert_eq!(r.kept_per_rank[k] + r.loads_per_rank[k], 4 * 9);
        }
        let (_, after) = balancedness(&r.placement, &stats.load);
        assert!(after >= before - 1e-9, "seed {seed}: balancedness {before} -> {after}");
    }
}

#[test]
fn too_small_a_budget_is_unplaceable_and_a_tight_one_under_replicated() {
    let stats = synth_stats(2, 16, 3, 0.8);
    let current = contiguous::solve(2, 16, &topo(4), 4).unwrap();
    let mut opts = RegroupOptions::new(topo(2));
    opts.load = Some(stats.load.clone());
    opts.max_slots_per_rank = Some(5);
    let err = regroup(&current, &[Some(0), Some(1)], &opts).unwrap_err();
    assert!(matches!(&err, PlacementError::Unplaceable { missing, ranks: 2, slots_per_rank: 5 } if missing.len() == 2 * 6), "{err}");
    // Every expert fits once but not twice: filled as far as it goes, a warning count, not an error.
    opts.max_slots_per_rank = Some(10);
    opts.min_replicas = 2;
    let r = regroup(&current, &[Some(0), Some(1)], &opts).unwrap();
    r.placement.validate().unwrap();
    assert_eq!(r.under_replicated, 2 * (32 - 20), "20 slots: 4 of 16 experts get a second replica per layer");
    assert_eq!(min_replica_count(&r.placement), 1);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let current = contiguous::solve(2, 8, &topo(4), 2).unwrap();
    let opts = RegroupOptions::new(topo(3));
    let invalid = |s: &[Option<usize>], o: &RegroupOptions| matches!(regroup(&current, s, o), Err(PlacementError::Invalid(_)));
    assert!(invalid(&[Some(0), Some(0), Some(1)], &opts), "old rank twice");
    assert!(invalid(&[Some(0), Some(4), Some(1)], &opts), "old rank out of range");
    assert!(invalid(&[], &RegroupOptions::new(topo(1))), "empty survivors");
    assert!(matches!(regroup(&current, &[Some(0), Some(1)], &opts), Err(PlacementError::Topology(_))), "topology of 3 ranks, 2 survivors");
    assert!(invalid(&[Some(0), None, Some(1)], &RegroupOptions { min_replicas: 0, ..opts.clone() }));
    assert!(invalid(&[Some(0), None, Some(1)], &RegroupOptions { max_slots_per_rank: Some(0), ..opts.clone() }));
    let bad_load = RegroupOptions { load: Some(vec![vec![1.0; 8]]), ..opts.clone() };
    assert!(matches!(regroup(&current, &[Some(0), None, Some(1)], &bad_load), Err(PlacementError::Mismatch(_))));
    let nan = RegroupOptions { load: Some(vec![vec![f64::NAN; 8]; 2]), ..opts.clone() };
    assert!(matches!(regroup(&current, &[Some(0), None, Some(1)], &nan), Err(PlacementError::Mismatch(_))));
    let mut broken = current.clone();
    broken.layers[0] = LayerPlacement { ranks: vec![vec![0, 0]; 4] };
    assert!(matches!(regroup(&broken, &[Some(0), None, Some(1)], &opts), Err(PlacementError::Invalid(_))));
    // All joiners: a fresh placement.
    let r = regroup(&current, &[None, None, None], &opts).unwrap();
    r.placement.validate().unwrap();
    assert_eq!(r.kept_per_rank, vec![0, 0, 0]);
}

#[test]
fn every_solver_honours_min_replicas() {
    for seed in 0..3 {
        let stats = synth_stats(3, 16, seed, 1.0);
        for (ranks, nodes, slots, min) in [(4, 1, 8, 2), (4, 2, 12, 3), (8, 2, 6, 3), (4, 2, 5, 1), (2, 1, 16, 4)] {
            for kind in [SolverKind::Contiguous, SolverKind::Eplb, SolverKind::Ilp] {
                let mut o = SolveOptions::new(Topology::uniform(ranks, nodes).unwrap(), slots);
                o.min_replicas = min;
                o.time_limit = Duration::from_secs(2);
                o.threads = 1;
                o.groups = Some(4);
                for mode in [Mode::Home, Mode::Affinity] {
                    o.mode = mode;
                    let (p, _) = solver::solve(kind, &stats, &o, &|_| {}).unwrap();
                    p.validate().unwrap();
                    assert!(min_replica_count(&p) >= min.min(ranks), "{kind:?} {mode:?} seed {seed} {ranks}x{slots} min {min}");
                }
            }
        }
        // Too few slots: a typed error naming the slots needed.
        let mut o = SolveOptions::new(topo(4), 6);
        o.min_replicas = 2;
        for kind in [SolverKind::Contiguous, SolverKind::Eplb, SolverKind::Ilp] {
            match solver::solve(kind, &stats, &o, &|_| {}) {
                Err(PlacementError::TooFewSlots { needed: 32, ranks: 4, slots_per_rank: 6, .. }) => {}
                other => panic!("{kind:?}: expected TooFewSlots, got {other:?}"),
            }
        }
        o.min_replicas = 0;
        assert!(matches!(solver::solve(SolverKind::Eplb, &stats, &o, &|_| {}), Err(PlacementError::Solver(_))));
    }
}

#[test]
fn the_rebalancer_keeps_min_replicas() {
    for seed in 0..4 {
        let stats = synth_stats(3, 16, seed, 1.3);
        let shifted = synth_stats(3, 16, seed + 50, 1.3);
        let mut so = SolveOptions::new(topo(4), 8);
        so.min_replicas = 2;
        let (current, _) = solver::solve(SolverKind::Eplb, &stats, &so, &|_| {}).unwrap();
        let cfg = RebalanceConfig { min_replicas: 2, threshold: 1.0, target: 1.0, margin: 0.0, ..RebalanceConfig::default() };
        for p in [propose(&cfg, &current, &shifted.load).unwrap(), propose_ungated(&cfg, &current, &shifted.load).unwrap()]
            .into_iter()
            .flatten()
        {
            p.placement.validate().unwrap();
            assert!(min_replica_count(&p.placement) >= 2, "seed {seed}");
        }
        let mut rb = Rebalancer::new(cfg.clone()).unwrap();
        if let Some(p) = rb.poll(0.0, &current, &shifted.load).unwrap() {
            assert!(min_replica_count(&p.placement) >= 2);
        }
        // A current placement below the floor is raised to it, even above the threshold.
        let plain = eplb::solve(&stats, &topo(4), 8, None).unwrap();
        assert_eq!(min_replica_count(&plain), 1);
        let lax = RebalanceConfig { min_replicas: 2, threshold: 0.01, target: 0.01, margin: 0.5, ..RebalanceConfig::default() };
        let p = propose(&lax, &plain, &stats.load).unwrap().expect("a repair is always proposed");
        assert!(min_replica_count(&p.placement) >= 2 && p.moves > 0);
    }
    let bad = RebalanceConfig { min_replicas: 0, ..RebalanceConfig::default() };
    assert!(matches!(bad.validate(), Err(PlacementError::Invalid(m)) if m.contains("min_replicas")));
    let from_json: RebalanceConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(from_json.min_replicas, 1, "serde default");
}

