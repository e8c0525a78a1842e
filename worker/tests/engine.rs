//! The batch engine: continuous batching, sampling, stop conditions.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use worker::engine::{Engine, EngineConfig, FinishReason, Request};
use worker::model::{LoadOptions, Model};
use worker::reference::read_expected;
use worker::SamplingParams;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn load(name: &str) -> Arc<Model> {
    Arc::new(Model::load(&fixture(name), &LoadOptions::default()).expect("load"))
}

#[test]
fn continuous_batching_reproduces_reference_greedy() {
    for name in ["mixtral", "qwen3_moe", "deepseek_v3"] {
        let model = load(name);
        let cases = read_expected(&fixture(name).join("expected.safetensors")).expect("expected");
        let mut engine = Engine::new(model, EngineConfig::default());
        // Requests arrive at different steps, so prefill and decode mix in one batch.
        let mut ids = Vec::new();
        let mut got: std::collections::BTreeMap<u64, Vec<u32>> = Default::default();
        let mut finished = std::collections::BTreeMap::new();
        let mut pending: Vec<_> = cases.iter().collect();
        let mut step = 0;
        while engine.has_work() || !pending.is_empty() {
            if step % 2 == 0 && !pending.is_empty() {
                let c = pending.remove(0);
                ids.push(engine.add_request(Request::new(c.prompt.clone(), c.greedy.len())).expect("add"));
            }
            for ev in engine.step().expect("step") {
                got.entry(ev.id).or_default().push(ev.token.expect("token"));
                if let Some(f) = ev.finished {
                    finished.insert(ev.id, f);
                }
            }
            step += 1;
            assert!(step < 1000);
        }
        for (c, id) in cases.iter().zip(&ids) {
            assert_eq!(got[id], c.greedy, "{name}: prompt {}", c.index);
            assert_eq!(finished[id], FinishReason::Length);
        }
        let stats = engine.routing_stats();
        let k = engine.model().config.router.top_k as u64;
        for layer in &stats.counts {
            assert_eq!(layer.iter().sum::<u64>(), stats.tokens * k);
        }
        // Every token makes one primary-expert hop between consecutive MoE layers.
        assert_eq!(stats.transitions.len(), stats.counts.len() - 1);
        for layer in &stats.transitions {
            assert_eq!(layer.iter().sum::<u64>(), stats.tokens);
        }
    }
}

fn sampled(seed: u64) -> Request {
    let mut r = Request::new(vec![3, 1, 4, 1, 5, 9, 2, 6], 12);
    r.sampling = SamplingParams { temperature: 0.9, top_p: 0.95, top_k: 50, seed: Some(seed) };
    r
}

#[test]
fn sampling_is_deterministic_per_seed_and_independent_of_batching() {
    let model = load("qwen3_moe");
    let mut alone = Engine::new(model.clone(), EngineConfig::default());
    let a = alone.add_request(sampled(7)).expect("add");
    let alone_out = alone.run_to_completion().expect("run")[&a].0.clone();
    assert_eq!(alone_out.len(), 12);

    let mut batch = Engine::new(model.clone(), EngineConfig::default());
    let x = batch.add_request(Request::new(vec![10, 20, 30], 5)).expect("add");
    let b = batch.add_request(sampled(7)).expect("add");
    let c = batch.add_request(sampled(8)).expect("add");
    let res = batch.run_to_completion().expect("run");
    assert_eq!(res[&b].0, alone_out, "same seed, different batch");
    assert_ne!(res[&c].0, alone_out, "different seed");
    assert_eq!(res[&x].0.len(), 5);
}

#[test]
fn stop_tokens_and_limits() {
    let model = load("mixtral");
    let cases = read_expected(&fixture("mixtral").join("expected.safetensors")).expect("expected");
    let c = &cases[0];
    // Stop at the third greedy token.
    let stop = c.greedy[2];
    let first = c.greedy.iter().position(|t| *t == stop).expect("present");
    let mut e = Engine::new(model.clone(), EngineConfig::default());
    let mut r = Request::new(c.prompt.clone(), 8);
    r.stop_tokens = vec![stop];
    let id = e.add_request(r).expect("add");
    let res = e.run_to_completion().expect("run");
    assert_eq!(res[&id].0, c.greedy[..=first].to_vec());
    assert_eq!(res[&id].1, FinishReason::Stop);

    // Context full: 512 positions; a prompt of 510 leaves room for 3 generated tokens.
    let mut e = Engine::new(model.clone(), EngineConfig::default());
    let id = e.add_request(Request::new(vec![7; 510], 10)).expect("add");
    let res = e.run_to_completion().expect("run");
    assert_eq!(res[&id].0.len(), 3);
    assert_eq!(res[&id].1, FinishReason::ContextFull);

    // Abort.
    let mut e = Engine::new(model, EngineConfig { max_seqs: 1, max_batch_tokens: 64 });
    let a = e.add_request(Request::new(vec![1, 2, 3], 4)).expect("add");
    let b = e.add_request(Request::new(vec![4, 5, 6], 4)).expect("add");
    let ev = e.step().expect("step");
    assert!(ev.iter().all(|x| x.id == a), "max_seqs 1 admits one request");
    assert!(e.abort(b));
    assert!(!e.abort(b));
    let res = e.run_to_completion().expect("run");
    assert!(res.contains_key(&a) && !res.contains_key(&b));
}

/// Chunked prefill: with a budget of 3 tokens per step, prompts of 5–17 tokens are spread over
/// several steps beside running decodes, no step runs more than the budget, and every greedy
/// continuation is still the transformers reference.
#[test]
fn chunked_prefill_keeps_steps_within_the_budget_and_outputs_unchanged() {
    for name in ["mixtral", "deepseek_v3"] {
        let model = load(name);
        let cases = read_expected(&fixture(name).join("expected.safetensors")).expect("expected");
        let budget = 3;
        let mut engine = Engine::new(model, EngineConfig { max_batch_tokens: budget, ..EngineConfig::default() });
        let mut got: std::collections::BTreeMap<u64, Vec<u32>> = Default::default();
        let ids: Vec<u64> = cases.iter().map(|c| engine.add_request(Request::new(c.prompt.clone(), c.greedy.len())).expect("add")).collect();
        let (mut steps, mut max_tokens) = (0, 0);
        let mut first_token_step: std::collections::BTreeMap<u64, usize> = Default::default();
        while engine.has_work() {
            steps += 1;
            for ev in engine.step().expect("step") {
                got.entry(ev.id).or_default().push(ev.token.expect("token"));
                first_token_step.entry(ev.id).or_insert(steps);
            }
            let r = &engine.last_routing()[0];
            max_tokens = max_tokens.max(r.ids.len() / r.top_k);
        }
        assert!(max_tokens <= budget, "{name}: a step ran {max_tokens} tokens, budget {budget}");
        // A prompt's first token comes no earlier than the step that completes its last chunk.
        for (id, c) in ids.iter().zip(&cases) {
            let at = first_token_step.get(id).copied().unwrap_or(0);
            assert!(at >= c.prompt.len().div_ceil(budget), "{name} prompt {}: first token at step {at}", c.index);
        }
        for (id, c) in ids.iter().zip(&cases) {
            assert_eq!(got.get(id), Some(&c.greedy), "{name} prompt {}: chunked prefill changed the continuation", c.index);
        }
    }
}
