//! The device backend's forward step (`backend::cuda::step`, the code the GPU runs) over the host
//! reference device (`backend::cuda::reference::HostOps`): on every fixture against the CPU
//! backend and transformers, batched decode of concurrent sequences, KV pages given back and
//! exhausted, the host-staged MoE path of an executor that is not local.

mod common;
use std::sync::Arc;
use worker::backend::cuda::reference::HostOps;
use worker::backend::cuda::step::DeviceBackend;
use worker::backend::{Backend, DeviceError, OpenOptions};
use worker::engine::{Engine, EngineConfig, Request};
use worker::error::ModelError;
use worker::model::{LoadOptions, LogitsMode, Model, SeqInput};
use worker::moe::{ExpertExecutor, ExpertFfn, LocalExpertSet, LocalExperts, MoeLayer, Routing};
use worker::reference::{check_case, read_expected, rel_max_diff};

/// f32 checkpoints: the step must reproduce the CPU backend.
const TOL_F32: f32 = 1e-4;
/// 16-bit checkpoints: activations are rounded to the weights' dtype before every GEMM (as the
/// GPU's cast does), which the CPU backend does not do. Measured against transformers (greedy
/// tokens equal): f16 fixture ≤ 3.8e-4, bf16 fixture ≤ 1.6e-2 (bf16 keeps 8 bits of mantissa;
/// transformers' reference here ran in f32).
const TOL_16BIT: f32 = 3e-2;

fn device(model: Arc<Model>, kv_tokens: usize) -> DeviceBackend<HostOps> {
    DeviceBackend::new(HostOps::new(1 << 30), model, &OpenOptions { max_kv_tokens: Some(kv_tokens), ..Default::default() }).expect("device backend")
}

fn load(name: &str) -> Arc<Model> {
    let dir = common::fixtures_root().join(name);
    Arc::new(Model::load(&dir, &LoadOptions::default()).expect("load"))
}

#[test]
fn device_step_matches_the_cpu_and_transformers_on_every_fixture() {
    for dir in common::fixture_dirs() {
        let cpu = Arc::new(Model::load(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display())));
        let dev = device(cpu.clone(), 4096);
        let dtypes = worker::checkpoint::Checkpoint::open(&dir).expect("checkpoint").dtypes();
        let tol = if dtypes.iter().all(|d| d == "F32") { TOL_F32 } else { TOL_16BIT };
        for c in read_expected(&dir.join("expected.safetensors")).expect("expected") {
            let r = check_case(&dev, &c).expect("check");
            let vs_cpu = rel_max_diff(&dev.logits(&c.prompt).expect("device logits"), &cpu.logits(&c.prompt).expect("cpu logits"));
            eprintln!("{} prompt {}: vs transformers {:.2e}, vs cpu {:.2e}, greedy {}", dir.display(), c.index, r.logits_rel_diff, vs_cpu, r.greedy_ok);
            assert!(vs_cpu < tol, "{}: prompt {} device vs cpu {vs_cpu:.3e}", dir.display(), c.index);
            assert!(r.logits_rel_diff < tol, "{}: prompt {} vs transformers {:.3e}", dir.display(), c.index, r.logits_rel_diff);
            assert!(r.greedy_ok, "{}: prompt {} greedy {:?} != {:?}", dir.display(), c.index, r.greedy, c.greedy);
        }
        assert_eq!(dev.free_kv_pages(), 4096 / 16, "{}: every page back after the checks", dir.display());
    }
}

fn prompts() -> Vec<Vec<u32>> {
    (0..6u32).map(|i| (0..3 + 5 * i).map(|j| (7 * i + 3 * j + 1) % 64).collect()).collect()
}

fn run(b: Arc<dyn Backend>) -> Vec<Vec<u32>> {
    // Chunked prefill (9 tokens a step) beside decoding sequences, more requests than slots.
    let mut e = Engine::new(b, EngineConfig { max_seqs: 4, max_batch_tokens: 9 });
    let ids: Vec<u64> = prompts().iter().map(|p| e.add_request(Request::new(p.clone(), 12)).expect("add")).collect();
    let out = e.run_to_completion().expect("run");
    ids.iter().map(|id| out[id].0.clone()).collect()
}

#[test]
fn concurrent_sequences_decode_the_cpu_tokens_and_give_their_pages_back() {
    for name in ["mixtral", "qwen3_moe", "deepseek_v3"] {
        let cpu = load(name);
        let dev = Arc::new(device(cpu.clone(), 1024));
        assert_eq!(run(dev.clone()), run(cpu), "{name}");
        assert_eq!(dev.free_kv_pages(), 1024 / 16, "{name}: pages of finished sequences come back");
    }
}

#[test]
fn a_step_beyond_the_kv_pages_fails_cleanly_and_the_next_one_runs() {
    let cpu = load("mixtral");
    let dev = device(cpu.clone(), 32);
    let long: Vec<u32> = (0..40).map(|i| i % 60 + 1).collect();
    let mut cache = dev.new_cache();
    let err = dev.forward_step(&mut [SeqInput { tokens: &long, cache: &mut cache }], LogitsMode::Last, &LocalExperts).expect_err("40 tokens in 32 slots");
    assert!(matches!(err, ModelError::Device(DeviceError::KvFull { .. })), "{err}");
    assert_eq!(cache.len(), 0, "a failed step commits nothing");
    dev.release_sequence(cache.id());
    let short = [1u32, 2, 3];
    let got = dev.logits(&short).expect("a step that fits");
    assert!(rel_max_diff(&got, &cpu.logits(&short).expect("cpu")) < TOL_F32);
}

/// Runs the routed experts on the host like a rank of a group would (not local).
struct HostExecutor;

impl ExpertExecutor for HostExecutor {
    fn run(&self, layer: &MoeLayer, x: &[f32], t: usize, routing: &Routing) -> worker::error::Result<Vec<f32>> {
        LocalExperts.run(layer, x, t, routing)
    }
}

#[test]
fn an_executor_that_is_not_local_gets_the_moe_input_on_the_host() {
    for name in ["qwen3_moe", "deepseek_v3"] {
        let cpu = load(name);
        let dev = device(cpu.clone(), 1024);
        let p: Vec<u32> = (1..12).collect();
        let staged = {
            let mut cache = dev.new_cache();
            dev.forward_step(&mut [SeqInput { tokens: &p, cache: &mut cache }], LogitsMode::All, &HostExecutor).expect("staged").logits.remove(0)
        };
        let d = rel_max_diff(&staged, &cpu.logits(&p).expect("cpu"));
        assert!(d < TOL_F32, "{name}: staged MoE {d:.3e}");
    }
}

#[test]
fn a_one_rank_group_runs_its_slots_experts_on_the_device() {
    use worker::expert_parallel::EpExecutor;
    use worker::transport::LocalTransport;
    for name in ["mixtral", "deepseek_v3"] {
        let cpu = load(name);
        // The rank's model without its routed experts: they live in the executor's slots.
        let mut rank_model = (*cpu).clone();
        let experts = rank_model.take_routed_experts();
        let n_e = cpu.config.router.n_experts;
        let placement: Vec<Vec<Vec<usize>>> = experts.iter().map(|_| vec![(0..n_e).collect()]).collect();
        let ex = Arc::new(EpExecutor::new(Box::new(LocalTransport), &placement, n_e, vec![0], experts).expect("executor"));
        let dev = Arc::new(device(Arc::new(rank_model), 1024));
        let mut e = Engine::new(dev.clone(), EngineConfig { max_seqs: 4, max_batch_tokens: 9 });
        e.set_executor(ex.clone());
        let ids: Vec<u64> = prompts().iter().map(|p| e.add_request(Request::new(p.clone(), 12)).expect("add")).collect();
        let out = e.run_to_completion().expect("run");
        let got: Vec<Vec<u32>> = ids.iter().map(|id| out[id].0.clone()).collect();
        assert_eq!(got, run(cpu), "{name}");
        assert_eq!(ex.timers.moe_layer_calls.load(std::sync::atomic::Ordering::Relaxed), 0, "{name}: the device ran the layers, not the executor");
    }
}

/// Rows rounded to bf16 (so the device stores them as bf16).
fn bf16_rows(v: &[f32]) -> Vec<f32> {
    use worker::backend::cuda::dtype::{bf16_bits_to_f32, to_bf16_bits};
    to_bf16_bits(v).into_iter().map(bf16_bits_to_f32).collect()
}

#[test]
fn experts_stored_in_two_dtypes_run_in_one_layer() {
    // Every other expert of an f32 checkpoint made bf16-exact: the device keeps those in bf16,
    // so each projection of a layer takes one launch per dtype over the same grouped rows.
    let mut model = (*load("mixtral")).clone();
    for layer in &mut model.layers {
        if let worker::model::Ffn::Moe(m) = &mut layer.ffn {
            for f in m.experts.iter_mut().step_by(2).flatten() {
                *f = ExpertFfn::from_rows(&bf16_rows(&f.gate_up.to_rows()), &bf16_rows(&f.down.to_rows()), f.hidden, f.inter);
            }
        }
    }
    let cpu = Arc::new(model);
    let dev = device(cpu.clone(), 1024);
    let p: Vec<u32> = (1..20).collect();
    let d = rel_max_diff(&dev.logits(&p).expect("device"), &cpu.logits(&p).expect("cpu"));
    // Activations into the bf16 experts are rounded to bf16 on the device, not on the CPU.
    assert!(d < TOL_16BIT, "mixed-dtype experts vs cpu {d:.3e}");
    assert!(d > 0.0, "the bf16 experts were not run in bf16 (device equals CPU bit for bit)");
    assert_eq!(dev.generate_greedy(&p, 6).expect("device"), cpu.generate_greedy(&p, 6).expect("cpu"));
}

/// A one-rank group's slots with expert 0 of every layer missing.
struct MissingExpert(Vec<Vec<Option<Arc<ExpertFfn>>>>);

impl ExpertExecutor for MissingExpert {
    fn local_experts(&self, layer: &MoeLayer) -> Option<LocalExpertSet> {
        Some(LocalExpertSet::Slots(self.0[layer.moe_index].clone()))
    }

    fn run(&self, _: &MoeLayer, _: &[f32], _: usize, _: &Routing) -> worker::error::Result<Vec<f32>> {
        Err(ModelError::ExpertParallel("the device runs these layers".into()))
    }
}

#[test]
fn a_routed_expert_missing_from_the_device_fails_the_step() {
    let cpu = load("mixtral");
    let mut rank_model = (*cpu).clone();
    let experts = rank_model.take_routed_experts();
    let slots = experts.into_iter().map(|l| l.into_iter().enumerate().map(|(e, f)| f.filter(|_| e != 0).map(Arc::new)).collect()).collect();
    let dev = device(Arc::new(rank_model), 1024);
    let p: Vec<u32> = (1..30).collect();
    let mut cache = dev.new_cache();
    let err = dev.forward_step(&mut [SeqInput { tokens: &p, cache: &mut cache }], LogitsMode::Last, &MissingExpert(slots)).expect_err("expert 0 is routed to and missing");
    assert!(matches!(&err, ModelError::Device(DeviceError::Unsupported { msg, .. }) if msg.contains("no weights on this device")), "{err}");
}

#[test]
fn a_kv_memory_share_outside_0_to_1_is_refused() {
    for share in [0.0, -0.5, 1.5, f64::NAN] {
        let opts = OpenOptions { kv_memory_share: Some(share), ..Default::default() };
        let e = DeviceBackend::new(HostOps::new(64 << 20), load("mixtral"), &opts).expect_err("bad share");
        assert!(e.to_string().contains("KV memory share"), "{e}");
    }
    let half = OpenOptions { kv_memory_share: Some(0.5), ..Default::default() };
    let a = DeviceBackend::new(HostOps::new(64 << 20), load("mixtral"), &half).expect("half");
    let b = DeviceBackend::new(HostOps::new(64 << 20), load("mixtral"), &OpenOptions::default()).expect("default");
    assert!(a.free_kv_pages() * 3 < b.free_kv_pages() * 2, "half the share, fewer pages: {} vs {}", a.free_kv_pages(), b.free_kv_pages());
}

/// Greedy tokens of two ranks over TCP serving `prompts[rank]` concurrently, each rank a device
/// backend (the host reference: the device protocol) or the CPU backend (the host protocol),
/// with contiguous halves plus expert 0 replicated on both; per rank also whether the host
/// protocol ran, how many rows crossed ranks and how many the capacity option rerouted.
fn two_rank_group(cpu: &Arc<Model>, prompts: &[Vec<Vec<u32>>], max_tokens: usize, on_device: bool, capacity: Option<f64>, load_aware: bool) -> Vec<(Vec<Vec<u32>>, bool, u64, u64)> {
    use std::collections::HashMap;
    use std::time::Duration;
    use worker::expert_parallel::{experts_of_rank, EpExecutor};
    use worker::transport::tcp::TcpTransport;
    use worker::transport::Transport;
    let n_e = cpu.config.router.n_experts;
    let layers = cpu.moe_layers().count();
    let placement: Vec<Vec<Vec<usize>>> = (0..layers).map(|_| vec![(0..n_e / 2).collect(), std::iter::once(0).chain(n_e / 2..n_e).collect()]).collect();
    let mesh = TcpTransport::local_mesh(2, Duration::from_secs(30)).expect("mesh");
    let handles: Vec<_> = mesh
        .into_iter()
        .zip(prompts.to_vec())
        .map(|(t, prompts)| {
            let (placement, cpu) = (placement.clone(), cpu.clone());
            std::thread::spawn(move || {
                let r = t.rank();
                let mut m = (*cpu).clone();
                // This rank's slots: the executor holds them; the model keeps none.
                let all = m.take_routed_experts();
                let mine = experts_of_rank(&placement, r);
                let experts: Vec<Vec<Option<worker::moe::ExpertFfn>>> =
                    all.into_iter().zip(&mine).map(|(l, keep)| l.into_iter().enumerate().map(|(e, w)| w.filter(|_| keep.contains(&e))).collect()).collect();
                let ex = Arc::new(EpExecutor::new(Box::new(t), &placement, n_e, vec![0, 0], experts).expect("ep"));
                ex.set_capacity_factor(capacity);
                ex.set_load_aware(load_aware);
                let backend: Arc<dyn Backend> = if on_device { Arc::new(device(Arc::new(m), 1024)) } else { Arc::new(m) };
                let mut engine = Engine::new(backend.clone(), EngineConfig { max_seqs: 8, max_batch_tokens: 5 });
                engine.set_executor(ex.clone());
                let ids: Vec<_> = prompts.iter().map(|p| engine.add_request(Request::new(p.clone(), max_tokens)).expect("add")).collect();
                let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
                while ex.exchange_step(engine.has_work()).expect("header") {
                    if engine.has_work() {
                        for ev in engine.step().expect("step") {
                            out.entry(ev.id).or_default().extend(ev.token);
                        }
                    } else {
                        backend.idle_forward(&ex).expect("idle");
                    }
                }
                let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                // The host protocol (`run`) times its dispatch and combine; the device protocol does not.
                let host_protocol = ld(&ex.timers.dispatch_us) + ld(&ex.timers.combine_us) > 0 || ld(&ex.timers.expert_us) > 0;
                (ids.iter().map(|id| out.remove(id).unwrap_or_default()).collect::<Vec<_>>(), host_protocol, ld(&ex.timers.remote_rows), ld(&ex.timers.rerouted_rows))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank")).collect()
}

fn group_prompts(vocab: u32) -> Vec<Vec<Vec<u32>>> {
    // Rank 1 has more and longer streams: rank 0 goes idle while rank 1 still decodes.
    (0..2).map(|r| (0..2 + r).map(|i| (0..3 + 4 * i + r).map(|j| (7 * j as u32 + 11 * i as u32 + 5 * r as u32 + 1) % vocab).collect()).collect()).collect()
}

/// Two device ranks (rows to their experts' ranks and back through `Ops::exchange_rows`, idle
/// ranks joining with no rows) give the single-process tokens, without the host protocol.
#[test]
fn a_two_rank_group_of_device_backends_serves_the_single_process_tokens() {
    for name in ["mixtral", "qwen3_moe", "deepseek_v3"] {
        let cpu = load(name);
        let prompts = group_prompts(cpu.config.vocab_size as u32);
        for (r, (got, host_protocol, remote, _)) in two_rank_group(&cpu, &prompts, 5, true, None, false).into_iter().enumerate() {
            let want: Vec<Vec<u32>> = prompts[r].iter().map(|p| cpu.generate_greedy(p, 5).expect("greedy")).collect();
            assert_eq!(got, want, "{name}: rank {r}");
            assert!(!host_protocol, "{name}: rank {r} ran a layer through the host protocol");
            assert!(remote > 0, "{name}: rank {r} sent no rows to the other rank");
        }
    }
}

/// With the capacity option (overflow rerouted to next-best experts) and load-aware replicas,
/// the device protocol decides as the host protocol does: the same tokens as CPU ranks.
#[test]
fn device_and_cpu_groups_agree_under_capacity_and_load_aware_replicas() {
    for name in ["mixtral", "qwen3_moe"] {
        let cpu = load(name);
        let prompts = group_prompts(cpu.config.vocab_size as u32);
        let on_cpu = two_rank_group(&cpu, &prompts, 5, false, Some(0.6), true);
        let on_dev = two_rank_group(&cpu, &prompts, 5, true, Some(0.6), true);
        for (r, (d, c)) in on_dev.iter().zip(&on_cpu).enumerate() {
            assert_eq!(d.0, c.0, "{name}: rank {r}");
            assert!(!d.1 && c.1, "{name}: rank {r}: device ranks on the device protocol, CPU ranks on the host one");
            assert_eq!(d.3, c.3, "{name}: rank {r}: rows rerouted");
        }
        assert!(on_dev.iter().map(|x| x.3).sum::<u64>() > 0, "{name}: the capacity option rerouted nothing: the test does not test it");
    }
}
