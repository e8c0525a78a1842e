use super::*;
use crate::Topology;
use crate::solver::contiguous;
use crate::synth::{SynthConfig, synthesize};

fn load_of(cfg: &SynthConfig) -> Vec<Vec<f64>> {
    sim::trace_load_for_tests(&synthesize(cfg).unwrap())
}

#[test]
#[ignore]
fn explore_deepseek() {
    let mut s = SynthConfig::deepseek_v3();
    s.num_sequences = 256;
    s.tokens_per_sequence = 64;
    let l1 = load_of(&s);
    let l2 = load_of(&SynthConfig { model_seed: 1, seed: 7, ..s.clone() });
    let topo = Topology::uniform(32, 4).unwrap();
    let cont = contiguous::solve(58, 256, &topo, 9).unwrap();
    let e1 = sim::eplb_placement(&cont, &l1, Some(8)).unwrap();
    let e2 = sim::eplb_placement(&cont, &l2, Some(8)).unwrap();
    let e2flat = sim::eplb_placement(&cont, &l2, None).unwrap();
    let b = |p: &Placement, l: &[Vec<f64>]| balancedness(p, l).1;
    println!("cont on l1 {:.4} l2 {:.4}; eplb1 on l1 {:.4} l2 {:.4}; eplb2 {:.4} flat {:.4}", b(&cont, &l1), b(&cont, &l2), b(&e1, &l1), b(&e1, &l2), b(&e2, &l2), b(&e2flat, &l2));
    println!("eplb moves e1->e2 {} e1->e2flat {} of {}", moves(&e1, &e2), moves(&e1, &e2flat), 58 * 32 * 9);
    for (name, cur) in [("eplb1", &e1), ("cont", &cont)] {
        for mm in [232, 1000, 4000, 20000] {
            let cfg = RebalanceConfig { max_moves: mm, target: 1.0, ..RebalanceConfig::default() };
            let t0 = std::time::Instant::now();
            let p = propose(&cfg, cur, &l2).unwrap().unwrap();
            println!("{name} budget {mm}: {:.4} -> {:.4} moves {} in {:.2}s", p.before, p.after, p.moves, t0.elapsed().as_secs_f64());
        }
        let cfg = RebalanceConfig { max_moves: 20000, target: b(&e2, &l2), ..RebalanceConfig::default() };
        let p = propose(&cfg, cur, &l2).unwrap().unwrap();
        println!("{name} to eplb target: {:.4} -> {:.4} moves {}", p.before, p.after, p.moves);
    }
}

#[test]
#[ignore]
fn explore_sim() {
    let mut s = SynthConfig::deepseek_v3();
    s.num_sequences = 256;
    s.tokens_per_sequence = 64;
    let t1 = synthesize(&s).unwrap();
    let t2 = synthesize(&SynthConfig { model_seed: 1, seed: 7, ..s.clone() }).unwrap();
    let topo = Topology::uniform(32, 4).unwrap();
    let cont = contiguous::solve(58, 256, &topo, 9).unwrap();
    let before: usize = std::env::var("BEFORE").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let after: usize = std::env::var("AFTER").ok().and_then(|v| v.parse().ok()).unwrap_or(1200);
    let mm: usize = std::env::var("MM").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let phases = [Phase { trace: &t1, steps: before }, Phase { trace: &t2, steps: after }];
    let mut cfg = SimConfig { groups: Some(8), ..SimConfig::default() };
    cfg.rebalance.max_moves = mm;
    let t0 = std::time::Instant::now();
    let reps = sim::simulate_all(&phases, &cont, &Policy::ALL, &cfg).unwrap();
    println!("{:.2}s", t0.elapsed().as_secs_f64());
    let rows: Vec<_> = reps.iter().map(|r| r.summary.clone()).collect();
    print!("{}", sim::format_summaries(&rows));
    for r in &reps {
        println!("{}: shift {:?} before {:?} final {:.4}", r.summary.policy, r.summary.shift_s, r.summary.balancedness_before_shift, r.summary.final_windowed_balancedness);
        let mut last = usize::MAX;
        for st in &r.steps {
            if st.epoch != last {
                println!("  step {} t {:.2} epoch {} moves {} bal {:.3} win {:.3} ms {:.1}", st.step, st.start_s, st.epoch, st.moves_applied, st.balancedness, st.windowed_balancedness, st.step_ms);
                last = st.epoch;
            }
        }
    }
}

#[test]
#[ignore]
fn explore_320() {
    let mut s = SynthConfig::deepseek_v3();
    s.num_sequences = 256;
    s.tokens_per_sequence = 64;
    let l1 = load_of(&s);
    let l2 = load_of(&SynthConfig { model_seed: 1, seed: 7, ..s.clone() });
    let topo = Topology::uniform(320, 40).unwrap();
    let cont = contiguous::solve(58, 256, &topo, 9).unwrap();
    let e1 = sim::eplb_placement(&cont, &l1, None).unwrap();
    for mm in [1024, 10240] {
        let cfg = RebalanceConfig { max_moves: mm, ..RebalanceConfig::default() };
        let t0 = std::time::Instant::now();
        let p = propose(&cfg, &e1, &l2).unwrap().unwrap();
        println!("budget {mm}: {:.4} -> {:.4} moves {} in {:.2}s", p.before, p.after, p.moves, t0.elapsed().as_secs_f64());
    }
    let t0 = std::time::Instant::now();
    for _ in 0..10 {
        let _ = balancedness(&e1, &l2);
    }
    println!("10 balancedness {:.3}s", t0.elapsed().as_secs_f64());
    let t0 = std::time::Instant::now();
    let _ = crate::eval::simulate_load(&e1, &l2, &HardwareProfile::h100()).unwrap();
    println!("simulate_load {:.3}s", t0.elapsed().as_secs_f64());
}
