//! The CUDA backend on a GPU: every fixture's logits and greedy tokens against transformers and
//! against the CPU backend, and batched decode of concurrent sequences (paged KV on the device).
//!
//! Built with `--features cuda`. Without a CUDA driver or device each test prints why it
//! skipped (never a silent pass); CI on the CPU-only machine compiles and runs them that way.
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;
use worker::backend::{self, Backend, Device, DeviceError};
use worker::engine::{Engine, EngineConfig, Request};
use worker::error::ModelError;
use worker::model::{LoadOptions, Model};
use worker::reference::{check_case, read_expected, rel_max_diff};

/// f32 checkpoints; 16-bit ones are held to [`TOL_16BIT`].
const TOL_F32: f32 = 1e-4;
/// 16-bit weights × activations rounded to the weights' dtype, f32 accumulation: the host
/// reference of the same step (tests/device_step.rs) measures ≤ 1.6e-2 (bf16) and ≤ 3.8e-4 (f16)
/// against transformers, greedy tokens equal.
const TOL_16BIT: f32 = 3e-2;

/// The model on GPU 0, or `None` (with the reason printed) where there is none.
fn on_gpu(model: Arc<Model>) -> Option<Arc<dyn Backend>> {
    match backend::open(Device::Cuda(0), model) {
        Ok(b) => Some(b),
        Err(ModelError::Device(e @ (DeviceError::NoDriver { .. } | DeviceError::NoSuchDevice { .. }))) => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("opening cuda:0: {e}"),
    }
}

#[test]
fn fixtures_on_the_gpu_match_transformers_and_the_cpu() {
    for dir in common::fixture_dirs() {
        let cpu = Arc::new(Model::load(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e}", dir.display())));
        let Some(gpu) = on_gpu(cpu.clone()) else { return };
        let dtypes = worker::checkpoint::Checkpoint::open(&dir).expect("checkpoint").dtypes();
        let tol = if dtypes.iter().all(|d| d == "F32") { TOL_F32 } else { TOL_16BIT };
        for c in read_expected(&dir.join("expected.safetensors")).expect("expected") {
            let r = check_case(gpu.as_ref(), &c).expect("check on the gpu");
            let vs_cpu = rel_max_diff(&gpu.logits(&c.prompt).expect("gpu logits"), &cpu.logits(&c.prompt).expect("cpu logits"));
            println!("{} prompt {}: vs transformers {:.2e}, vs cpu {:.2e}, greedy {}", dir.display(), c.index, r.logits_rel_diff, vs_cpu, r.greedy_ok);
            assert!(r.logits_rel_diff < tol, "{}: prompt {} logits {:.3e} (tolerance {tol:.0e})", dir.display(), c.index, r.logits_rel_diff);
            assert!(vs_cpu < tol, "{}: prompt {} gpu vs cpu {:.3e}", dir.display(), c.index, vs_cpu);
            assert!(r.greedy_ok, "{}: prompt {} greedy {:?} != {:?}", dir.display(), c.index, r.greedy, c.greedy);
        }
    }
}

#[test]
fn concurrent_sequences_on_the_gpu_decode_the_cpu_tokens() {
    let dir = common::fixtures_root().join("mixtral");
    let cpu = Arc::new(Model::load(&dir, &LoadOptions::default()).expect("load"));
    let Some(gpu) = on_gpu(cpu.clone()) else { return };
    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| (0..3 + 5 * i).map(|j| (7 * i + 3 * j + 1) % 64).collect()).collect();
    let run = |b: Arc<dyn Backend>| {
        let mut e = Engine::new(b, EngineConfig { max_seqs: 4, max_batch_tokens: 9 });
        let ids: Vec<u64> = prompts.iter().map(|p| e.add_request(Request::new(p.clone(), 12)).expect("add")).collect();
        let out = e.run_to_completion().expect("run");
        ids.iter().map(|id| out[id].0.clone()).collect::<Vec<_>>()
    };
    assert_eq!(run(gpu), run(cpu));
}
