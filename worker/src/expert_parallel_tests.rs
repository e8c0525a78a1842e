//! Tests of the expert-parallel executor: logits across ranks, epoch switches, replicas,
//! capacity, projected steps.
use super::*;
use crate::backend::Backend;
use crate::model::{LoadOptions, LogitsMode, SeqInput};
use std::path::PathBuf;
use crate::transport::tcp::TcpTransport;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// What one rank of [`run_group`] reports: rank 0's logits, and its rows kept local, sent
/// away and dropped.
struct RankRun {
    logits: Option<Vec<f32>>,
    local: u64,
    remote: u64,
    dropped: u64,
    rerouted: u64,
}

/// Every layer: rank r holds the r-th contiguous block of experts.
fn contiguous(layers: usize, experts: usize, world: usize) -> Vec<Vec<Vec<usize>>> {
    (0..layers).map(|_| (0..world).map(|r| (0..experts).filter(|e| e * world / experts == r).collect()).collect()).collect()
}

/// `world` ranks in this process over a loopback mesh, each holding its slots of
/// `placement`: rank 0 forwards `prompt`, the others join every collective with zero tokens.
/// `setup` configures every rank's executor before the forward.
fn run_group(
    dir: &Path,
    placement: &[Vec<Vec<usize>>],
    prompt: &[u32],
    setup: impl Fn(&EpExecutor) + Clone + Send + 'static,
) -> Vec<RankRun> {
    let world = placement[0].len();
    let n_e = crate::ModelConfig::from_dir(dir).expect("config").router.n_experts;
    let mesh = TcpTransport::local_mesh(world, Duration::from_secs(30)).expect("mesh");
    let handles: Vec<_> = mesh
        .into_iter()
        .map(|t| {
            let (placement, dir, prompt, setup) = (placement.to_vec(), dir.to_path_buf(), prompt.to_vec(), setup.clone());
            std::thread::spawn(move || {
                let r = t.rank();
                let mut m = Model::load(&dir, &LoadOptions { experts: Some(experts_of_rank(&placement, r)) }).expect("load slots");
                let experts = m.take_routed_experts();
                let ex = EpExecutor::new(Box::new(t), &placement, n_e, vec![0; world], experts).expect("ep");
                setup(&ex);
                let logits = if r == 0 {
                    let mut cache = m.new_cache();
                    let out = m
                        .forward_with(&mut [SeqInput { tokens: &prompt, cache: &mut cache }], LogitsMode::All, &ex)
                        .expect("ep forward");
                    Some(out.logits[0].clone())
                } else {
                    ex.idle_forward(&m).expect("idle");
                    None
                };
                let t = &ex.timers;
                RankRun {
                    logits,
                    local: t.local_rows.load(Ordering::Relaxed),
                    remote: t.remote_rows.load(Ordering::Relaxed),
                    dropped: t.dropped_rows.load(Ordering::Relaxed),
                    rerouted: t.rerouted_rows.load(Ordering::Relaxed),
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank")).collect()
}

/// Every rank in one process: logits through 1, 2, 3 ranks with replicas equal the local ones.
#[test]
fn ep_forward_matches_local_across_ranks() {
    let dir = fixture("mixtral");
    let full = Model::load(&dir, &LoadOptions::default()).expect("load");
    let prompt: Vec<u32> = vec![1, 5, 9, 13, 17, 21];
    let want = full.logits(&prompt).expect("local logits");
    let n_e = full.config.router.n_experts;
    let n_l = full.moe_layers().count();
    for world in [2usize, 3] {
        // Uneven, with replicas: rank r holds experts e where (e + r) % world != 1, plus expert 0.
        let placement: Vec<Vec<Vec<usize>>> = (0..n_l)
            .map(|l| {
                (0..world)
                    .map(|r| {
                        let mut v: Vec<usize> = (0..n_e).filter(|e| (e + r + l) % world == 0).collect();
                        if !v.contains(&0) {
                            v.push(0);
                        }
                        v
                    })
                    .collect()
            })
            .collect();
        let got = run_group(&dir, &placement, &prompt, |_| {}).remove(0).logits.expect("rank 0 logits");
        let d = crate::reference::rel_max_diff(&got, &want);
        assert!(d < 1e-5, "world {world}: rel diff {d}");
    }
}

/// A placement change across 2 ranks: prepare loads only the gained experts, nothing switches
/// until every rank committed, then all switch at the same step and logits stay those of the
/// single-process run.
#[test]
fn epoch_switch_is_simultaneous_and_keeps_logits() {
    let dir = fixture("mixtral");
    let full = Model::load(&dir, &LoadOptions::default()).expect("load");
    let prompt: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let want = full.logits(&prompt).expect("local logits");
    let n_e = full.config.router.n_experts;
    let n_l = full.moe_layers().count();
    let world = 2;
    // Epoch 1: contiguous halves. Epoch 2: interleaved, with expert 0 replicated on both.
    let first = contiguous(n_l, n_e, world);
    let second: Vec<Vec<Vec<usize>>> = (0..n_l)
        .map(|_| {
            (0..world)
                .map(|r| {
                    let mut v: Vec<usize> = (0..n_e).filter(|e| e % world == r).collect();
                    if !v.contains(&0) {
                        v.push(0);
                    }
                    v
                })
                .collect()
        })
        .collect();
    let mesh = TcpTransport::local_mesh(world, Duration::from_secs(30)).expect("mesh");
    let barrier = Arc::new(std::sync::Barrier::new(world));
    let handles: Vec<_> = mesh
        .into_iter()
        .map(|t| {
            let (first, second, dir, prompt, barrier) =
                (first.clone(), second.clone(), dir.clone(), prompt.clone(), barrier.clone());
            std::thread::spawn(move || {
                let r = t.rank();
                let mut m = Model::load(&dir, &LoadOptions { experts: Some(experts_of_rank(&first, r)) }).expect("load");
                let experts = m.take_routed_experts();
                let ex = EpExecutor::new(Box::new(t), &first, n_e, vec![0; world], experts).expect("ep");
                assert!(ex.commit(2).is_err(), "commit before prepare must fail");
                let p = ex.prepare(2, &second, &dir).expect("prepare");
                let gained: usize = (0..n_l)
                    .map(|l| second[l][r].iter().filter(|e| !first[l][r].contains(e)).count())
                    .sum();
                assert_eq!(p.loaded, gained, "rank {r} loads exactly the experts it gains");
                // Rank 0 commits first; one step later nobody may have switched.
                if r == 0 {
                    ex.commit(2).expect("commit");
                }
                ex.exchange_step(false).expect("step");
                assert_eq!(ex.epoch(), 1, "rank {r} switched before every rank committed");
                barrier.wait();
                if r == 1 {
                    ex.commit(2).expect("commit");
                }
                barrier.wait();
                ex.exchange_step(false).expect("step");
                assert_eq!(ex.epoch(), 2, "rank {r} did not switch");
                assert_eq!(ex.prepared_epoch(), None);
                if r == 0 {
                    let mut cache = m.new_cache();
                    let out = m
                        .forward_with(&mut [SeqInput { tokens: &prompt, cache: &mut cache }], LogitsMode::All, &ex)
                        .expect("ep forward");
                    Some(out.logits[0].clone())
                } else {
                    ex.idle_forward(&m).expect("idle");
                    None
                }
            })
        })
        .collect();
    let got = handles.into_iter().map(|h| h.join().expect("rank")).next().flatten().expect("rank 0 logits");
    let d = crate::reference::rel_max_diff(&got, &want);
    assert!(d < 1e-5, "rel diff {d} after the switch");
}

/// Every expert on both ranks and all tokens on rank 0: the exchange-free choice (rank 0 evens
/// out its own sends) and load-aware choice (even receipts) both split the rows over both
/// ranks — with the same logits as one process.
#[test]
fn load_aware_replicas_split_the_load_and_keep_logits() {
    let dir = fixture("qwen3_moe");
    let full = Model::load(&dir, &LoadOptions::default()).expect("load");
    let prompt: Vec<u32> = (1..40).collect();
    let want = full.logits(&prompt).expect("local logits");
    let n_e = full.config.router.n_experts;
    let n_l = full.moe_layers().count();
    let world = 2;
    let everything: Vec<Vec<Vec<usize>>> = (0..n_l).map(|_| vec![(0..n_e).collect(); world]).collect();
    for load_aware in [false, true] {
        let r0 = run_group(&dir, &everything, &prompt, move |ex| ex.set_load_aware(load_aware)).remove(0);
        let (got, remote, local) = (r0.logits.expect("logits"), r0.remote, r0.local);
        let d = crate::reference::rel_max_diff(&got, &want);
        assert!(d < 1e-4, "load_aware {load_aware}: rel diff {d}");
        assert!(remote > 0 && local > 0, "load_aware {load_aware} did not split: local {local}, remote {remote}");
        let share = remote as f64 / (remote + local) as f64;
        assert!((0.4..=0.6).contains(&share), "load_aware {load_aware}: uneven split {share}");
    }
}

/// Capacity 1.0 with every token on rank 0 and a contiguous placement: what rank 1 would get
/// beyond the cap is dropped; with the option off nothing is.
#[test]
fn capacity_caps_rows_per_rank_and_off_changes_nothing() {
    let dir = fixture("mixtral");
    let full = Model::load(&dir, &LoadOptions::default()).expect("load");
    let prompt: Vec<u32> = (1..33).collect();
    let want = full.logits(&prompt).expect("local logits");
    let n_e = full.config.router.n_experts;
    let n_l = full.moe_layers().count();
    let world = 2;
    let halves = contiguous(n_l, n_e, world);
    let assignments = (prompt.len() * full.config.router.top_k * n_l) as u64;
    for cap in [None, Some(0.6), Some(1.0)] {
        let r0 = run_group(&dir, &halves, &prompt, move |ex| ex.set_capacity_factor(cap)).remove(0);
        let (dropped, rerouted) = (r0.dropped, r0.rerouted);
        // Every assignment is sent somewhere or counted as dropped: nothing is lost silently.
        assert_eq!(r0.local + r0.remote + dropped, assignments, "cap {cap:?}: rows unaccounted for");
        let got = r0.logits.expect("logits");
        let d = crate::reference::rel_max_diff(&got, &want);
        match cap {
            None => {
                assert_eq!((dropped, rerouted), (0, 0));
                assert_eq!(got, want, "capacity off changed logits");
            }
            Some(f) => {
                assert!(got.iter().all(|x| x.is_finite()));
                assert!(d > 0.0, "capping rows left the logits unchanged");
                if f < 1.0 {
                    assert!(dropped > 0, "a cap of {f} x mean has room for fewer rows than there are");
                } else {
                    // Room for every row in total: overflow goes to next-best experts.
                    assert!(rerouted > 0, "a cap of 1.0 x mean over skewed halves reroutes nothing");
                }
            }
        }
    }
}

/// Projected step lengths: every rank learns every rank's compute segments through the next
/// step header, so all ranks record the same projection; a busy step gets one, an idle one
/// none.
#[test]
fn projected_steps_agree_across_ranks_and_count_only_busy_steps() {
    let dir = fixture("mixtral");
    let n_l = crate::ModelConfig::from_dir(&dir).expect("config").moe_layers().len();
    let n_e = crate::ModelConfig::from_dir(&dir).expect("config").router.n_experts;
    let world = 2;
    let halves = contiguous(n_l, n_e, world);
    let mesh = TcpTransport::local_mesh(world, Duration::from_secs(30)).expect("mesh");
    let prompt: Vec<u32> = (1..65).collect();
    let handles: Vec<_> = mesh
        .into_iter()
        .map(|t| {
            let (halves, dir, prompt) = (halves.clone(), dir.clone(), prompt.clone());
            std::thread::spawn(move || {
                let r = t.rank();
                let mut m = Model::load(&dir, &LoadOptions { experts: Some(experts_of_rank(&halves, r)) }).expect("load");
                let experts = m.take_routed_experts();
                let ex = EpExecutor::new(Box::new(t), &halves, n_e, vec![0; world], experts).expect("ep");
                // Step 1 busy (rank 0 forwards, rank 1 joins empty), step 2 idle, step 3 header.
                assert!(ex.exchange_step(r == 0).expect("header 1"));
                if r == 0 {
                    let mut cache = m.new_cache();
                    m.forward_with(&mut [SeqInput { tokens: &prompt, cache: &mut cache }], LogitsMode::Last, &ex).expect("forward");
                } else {
                    ex.idle_forward(&m).expect("idle");
                }
                assert!(!ex.exchange_step(false).expect("header 2"));
                assert!(!ex.exchange_step(false).expect("header 3"));
                ex.take_projected_steps()
            })
        })
        .collect();
    let got: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().expect("rank")).collect();
    assert_eq!(got[0].len(), 1, "one busy step, one projection: {got:?}");
    assert_eq!(got[0], got[1], "ranks disagree on the projection");
    assert!(got[0][0] > 0, "a 64-token forward projected at 0 µs");
}

/// `world` ranks in this process, each with an engine serving `prompts[r]` (several streams per
/// rank, prompts of different lengths, chunked prefill) stepped together as the rank loop does,
/// on `path`: the greedy tokens of every request, and every rank's timers.
fn serve_group(
    dir: &Path,
    placement: &[Vec<Vec<usize>>],
    prompts: Vec<Vec<Vec<u32>>>,
    max_tokens: usize,
    path: DataPath,
) -> Vec<(Vec<Vec<u32>>, u64, u64, u64, u64, u64)> {
    let world = placement[0].len();
    let n_e = crate::ModelConfig::from_dir(dir).expect("config").router.n_experts;
    let mesh = TcpTransport::local_mesh(world, Duration::from_secs(30)).expect("mesh");
    let handles: Vec<_> = mesh
        .into_iter()
        .zip(prompts)
        .map(|(t, prompts)| {
            let (placement, dir) = (placement.to_vec(), dir.to_path_buf());
            std::thread::spawn(move || {
                let r = t.rank();
                let mut m = Model::load(&dir, &LoadOptions { experts: Some(experts_of_rank(&placement, r)) }).expect("load slots");
                let experts = m.take_routed_experts();
                let m = Arc::new(m);
                let ex = Arc::new(EpExecutor::new(Box::new(t), &placement, n_e, vec![0; world], experts).expect("ep"));
                ex.set_data_path(path);
                let mut engine = crate::engine::Engine::new(m.clone(), crate::engine::EngineConfig { max_seqs: 8, max_batch_tokens: 5 });
                engine.set_executor(ex.clone());
                let ids: Vec<_> = prompts.iter().map(|p| engine.add_request(crate::engine::Request::new(p.clone(), max_tokens)).expect("add")).collect();
                let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
                while ex.exchange_step(engine.has_work()).expect("header") {
                    if engine.has_work() {
                        for ev in engine.step().expect("step") {
                            out.entry(ev.id).or_default().extend(ev.token);
                        }
                    } else {
                        ex.idle_forward(&m).expect("idle");
                    }
                }
                let t = &ex.timers;
                let tokens = ids.iter().map(|id| out.remove(id).unwrap_or_default()).collect();
                let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
                (tokens, ld(&t.local_rows), ld(&t.remote_rows), ld(&t.alltoall_bytes), ld(&t.kv_gather_bytes), ld(&t.tokens_moved))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank")).collect()
}

/// The affinity data path gives the single-process greedy tokens with concurrent streams on
/// every rank (prefill chunks stay home, decodes move), with contiguous and replicated
/// placements and coherence groups smaller than the world; the home path alike. With a
/// placement whose consecutive experts share ranks, rows stay local.
#[test]
fn affinity_data_path_serves_the_single_process_tokens() {
    for fixture_name in ["mixtral", "qwen3_moe", "deepseek_v3"] {
        let dir = fixture(fixture_name);
        let full = Model::load(&dir, &LoadOptions::default()).expect("load");
        let c = &full.config;
        let (layers, n_e, vocab) = (full.moe_layers().count(), c.router.n_experts, c.vocab_size as u32);
        let max_tokens = 6;
        let prompt = |r: usize, i: usize| -> Vec<u32> { (0..(3 + 2 * i + r)).map(|j| ((7 * j + 11 * i + 5 * r + 1) as u32) % vocab).collect() };
        let want = |p: &[u32]| full.generate_greedy(p, max_tokens).expect("greedy");
        for world in [2usize, 4] {
            let prompts: Vec<Vec<Vec<u32>>> = (0..world).map(|r| (0..3).map(|i| prompt(r, i)).collect()).collect();
            let contiguous = contiguous(layers, n_e, world);
            // Every expert on two ranks: replica choice applies.
            let replicated: Vec<Vec<Vec<usize>>> = contiguous
                .iter()
                .map(|l| (0..world).map(|r| l[r].iter().chain(&l[(r + 1) % world]).copied().collect()).collect())
                .collect();
            let cases = [
                ("home / contiguous", DataPath::Home, &contiguous),
                ("affinity / contiguous", DataPath::Affinity { group: 0 }, &contiguous),
                ("affinity / replicated", DataPath::Affinity { group: 0 }, &replicated),
                ("affinity:2 / replicated", DataPath::Affinity { group: 2 }, &replicated),
            ];
            for (name, path, placement) in cases {
                let runs = serve_group(&dir, placement, prompts.clone(), max_tokens, path);
                for (r, (tokens, ..)) in runs.iter().enumerate() {
                    for (i, got) in tokens.iter().enumerate() {
                        assert_eq!(got, &want(&prompts[r][i]), "{fixture_name} x{world} {name}: rank {r} request {i}");
                    }
                }
                let kv: u64 = runs.iter().map(|r| r.4).sum();
                let moved: u64 = runs.iter().map(|r| r.5).sum();
                let (local, remote): (u64, u64) = (runs.iter().map(|r| r.1).sum(), runs.iter().map(|r| r.2).sum());
                eprintln!("{fixture_name} x{world} {name}: {moved} tokens moved, {local} rows local, {remote} remote, {kv} KV bytes");
                assert_eq!(kv > 0, path != DataPath::Home, "{fixture_name} x{world} {name}: KV exchanged only on the affinity path");
                if path == DataPath::Home {
                    assert_eq!(moved, 0, "{fixture_name} x{world} {name}: tokens stay home");
                } else if std::ptr::eq(placement, &contiguous) {
                    assert!(moved > 0, "{fixture_name} x{world} {name}: tokens follow their primary experts");
                }
            }
        }
    }
}
