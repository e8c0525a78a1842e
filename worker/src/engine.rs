#![forbid(unsafe_code)]
//! The batch engine: continuous batching of many sequences, prefill and decode in one step.
//!
//! ```text
//! let id = engine.add_request(Request::new(prompt, 16))?;
//! while engine.has_work() { for ev in engine.step()? { ... } }
//! ```

use crate::attention::KvCache;
use crate::error::Result;
use crate::backend::Backend;
use crate::model::{LogitsMode, Model, SeqInput};
use crate::moe::{ExpertExecutor, LocalExperts, Routing};
use crate::sampling::{Sampler, SamplingParams, TokenLogprobs};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

pub type RequestId = u64;

/// A generation request.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (the stop token is reported).
    pub stop_tokens: Vec<u32>,
    /// Report each generated token's log-probability and this many top alternatives.
    pub logprobs: Option<usize>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Request { prompt, max_tokens, sampling: SamplingParams::default(), stop_tokens: vec![], logprobs: None }
    }
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context (`max_position_embeddings`) is full.
    ContextFull,
    /// Aborted by the caller.
    Aborted,
}

/// One generated token (or a finish notice).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: RequestId,
    /// `None` only for aborted requests.
    pub token: Option<u32>,
    /// Index of the token among the generated ones.
    pub index: usize,
    pub finished: Option<FinishReason>,
    /// When the request asked for them.
    pub logprobs: Option<TokenLogprobs>,
}

/// Engine limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Running sequences at most.
    pub max_seqs: usize,
    /// New tokens (prefill + decode) per step at most (at least 1). Decoding sequences come
    /// first; prompts fill what is left in chunks (chunked prefill), so a long prompt is spread
    /// over several steps instead of making one step long for every sequence in the batch.
    pub max_batch_tokens: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { max_seqs: 256, max_batch_tokens: 8192 }
    }
}

struct Seq {
    req: Request,
    cache: KvCache,
    generated: Vec<u32>,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    prompt_done: usize,
}

impl Seq {
    fn prefilled(&self) -> bool {
        self.prompt_done >= self.req.prompt.len()
    }
}

/// Statistics of routed-expert load, per MoE layer and expert.
#[derive(Debug, Clone, Default)]
pub struct RoutingStats {
    /// `counts[moe_layer][expert]` = tokens routed.
    pub counts: Vec<Vec<u64>>,
    /// `transitions[moe_layer][e * E + e2]` = tokens whose primary (highest-weight) expert is `e`
    /// at this MoE layer and `e2` at the next one (`moe_layers - 1` rows): the cross-layer affinity
    /// the placement engine and the scheduler use.
    pub transitions: Vec<Vec<u64>>,
    pub tokens: u64,
}

impl RoutingStats {
    fn new(moe_layers: usize, experts: usize) -> Self {
        RoutingStats {
            counts: vec![vec![0; experts]; moe_layers],
            transitions: vec![vec![0; experts * experts]; moe_layers.saturating_sub(1)],
            tokens: 0,
        }
    }

    fn record(&mut self, routing: &[Routing], experts: usize) {
        for (l, r) in routing.iter().enumerate() {
            if let Some(c) = self.counts.get_mut(l) {
                for &e in &r.ids {
                    if let Some(x) = c.get_mut(e as usize) {
                        *x += 1;
                    }
                }
            }
        }
        for (l, pair) in routing.windows(2).enumerate() {
            let (a, b) = (&pair[0], &pair[1]);
            let Some(row) = self.transitions.get_mut(l) else { break };
            let tokens = if a.top_k == 0 || b.top_k == 0 { 0 } else { (a.ids.len() / a.top_k).min(b.ids.len() / b.top_k) };
            for t in 0..tokens {
                let (e, e2) = (a.ids[t * a.top_k] as usize, b.ids[t * b.top_k] as usize);
                if e < experts && e2 < experts {
                    row[e * experts + e2] += 1;
                }
            }
        }
    }
}

pub struct Engine {
    backend: Arc<dyn Backend>,
    cfg: EngineConfig,
    next_id: RequestId,
    waiting: VecDeque<(RequestId, Seq)>,
    running: BTreeMap<RequestId, Seq>,
    executor: Arc<dyn ExpertExecutor + Send>,
    stats: RoutingStats,
    last_routing: Vec<Routing>,
    record_routing: bool,
}

impl Engine {
    /// An engine over `backend` (an `Arc<Model>` is the CPU backend).
    pub fn new(backend: Arc<dyn Backend>, cfg: EngineConfig) -> Self {
        let n_moe = backend.host_model().moe_layers().count();
        let e = backend.host_model().config.router.n_experts;
        Engine {
            backend,
            cfg,
            next_id: 0,
            waiting: VecDeque::new(),
            running: BTreeMap::new(),
            executor: Arc::new(LocalExperts),
            stats: RoutingStats::new(n_moe, e),
            last_routing: vec![],
            record_routing: true,
        }
    }

    /// Replace the routed-expert executor (expert parallelism).
    pub fn set_executor(&mut self, exec: Arc<dyn ExpertExecutor + Send>) {
        self.executor = exec;
    }

    /// Keep the last step's per-layer routing ([`Engine::last_routing`]); on by default.
    pub fn set_record_routing(&mut self, on: bool) {
        self.record_routing = on;
    }

    /// The host model (configuration; the weights where the backend is the CPU).
    pub fn model(&self) -> &Model {
        self.backend.host_model()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Validate and queue a request.
    pub fn add_request(&mut self, req: Request) -> Result<RequestId> {
        self.model().validate(&req.prompt, 0)?;
        req.sampling.validate()?;
        let id = self.next_id;
        self.next_id += 1;
        let sampler = Sampler::new(req.sampling.clone(), id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5DEE_CE66);
        let seq = Seq { cache: self.backend.new_cache(), generated: vec![], sampler, prompt_done: 0, req };
        self.waiting.push_back((id, seq));
        Ok(id)
    }

    /// Remove a request; `Ok(true)` if it existed.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if let Some(s) = self.running.remove(&id) {
            self.release(&s);
            return true;
        }
        let before = self.waiting.len();
        self.waiting.retain(|(i, _)| *i != id);
        before != self.waiting.len()
    }

    /// A sequence ended: its KV memory on the device and its copies on other ranks can go.
    fn release(&self, s: &Seq) {
        self.executor.release_sequence(s.cache.id());
        self.backend.release_sequence(s.cache.id());
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Routed-expert load accumulated since the start (or the last reset).
    pub fn routing_stats(&self) -> &RoutingStats {
        &self.stats
    }

    pub fn reset_routing_stats(&mut self) {
        for c in self.stats.counts.iter_mut().chain(self.stats.transitions.iter_mut()) {
            c.fill(0);
        }
        self.stats.tokens = 0;
    }

    /// Per-MoE-layer routing of the last step (tokens in the step's batch order).
    pub fn last_routing(&self) -> &[Routing] {
        &self.last_routing
    }

    /// One engine step: every decoding sequence decodes one token, and the rest of the token
    /// budget goes to prompts in arrival order (running ones first, then newly admitted), a
    /// chunk each; one forward runs over all of them. A sequence samples its first token in the
    /// step that completes its prompt.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        let decoding = self.running.values().filter(|s| s.prefilled()).count();
        let mut budget = self.cfg.max_batch_tokens.max(1).saturating_sub(decoding);
        // Prompt chunk per sequence this step.
        let mut chunks: BTreeMap<RequestId, usize> = BTreeMap::new();
        for (id, s) in &self.running {
            if !s.prefilled() && budget > 0 {
                let take = (s.req.prompt.len() - s.prompt_done).min(budget);
                budget -= take;
                chunks.insert(*id, take);
            }
        }
        while budget > 0 && self.running.len() < self.cfg.max_seqs {
            let Some((id, s)) = self.waiting.pop_front() else { break };
            let take = s.req.prompt.len().min(budget);
            budget -= take;
            chunks.insert(id, take);
            self.running.insert(id, s);
        }
        let mut events = Vec::new();
        let ids: Vec<RequestId> =
            self.running.iter().filter(|(id, s)| s.prefilled() || chunks.contains_key(id)).map(|(id, _)| *id).collect();
        if ids.is_empty() {
            return Ok(events);
        }
        let inputs: Vec<Vec<u32>> = ids
            .iter()
            .filter_map(|id| {
                let s = self.running.get(id)?;
                Some(match chunks.get(id) {
                    Some(&n) => s.req.prompt[s.prompt_done..s.prompt_done + n].to_vec(),
                    None => vec![*s.generated.last().unwrap_or(&0)],
                })
            })
            .collect();
        let out = {
            let mut seqs: Vec<SeqInput> = self
                .running
                .iter_mut()
                .filter(|(id, _)| ids.binary_search(id).is_ok())
                .zip(&inputs)
                .map(|((_, s), toks)| SeqInput { tokens: toks, cache: &mut s.cache })
                .collect();
            self.backend.forward_step(&mut seqs, LogitsMode::Last, self.executor.as_ref())
        };
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                // A failed step changes nothing: the forward may have appended this step's tokens
                // to some layers' caches; prompt progress, samplers and statistics are only
                // updated below, after a forward that completed. The step can be run again.
                for s in self.running.values_mut() {
                    s.cache.discard_uncommitted();
                }
                return Err(e);
            }
        };
        self.stats.record(&out.routing, self.model().config.router.n_experts);
        self.stats.tokens += inputs.iter().map(|t| t.len() as u64).sum::<u64>();
        if self.record_routing {
            self.last_routing = out.routing;
        }
        let max_pos = self.model().config.max_position_embeddings;
        let mut done = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let Some(s) = self.running.get_mut(id) else { continue };
            if let Some(&n) = chunks.get(id) {
                s.prompt_done += n;
                if !s.prefilled() {
                    continue; // the rest of the prompt comes in later steps
                }
            }
            let tok = s.sampler.sample(&out.logits[i]);
            let logprobs = s.req.logprobs.map(|n| crate::sampling::logprobs(&out.logits[i], tok, n));
            s.generated.push(tok);
            let finished = if s.req.stop_tokens.contains(&tok) {
                Some(FinishReason::Stop)
            } else if s.generated.len() >= s.req.max_tokens {
                Some(FinishReason::Length)
            } else if s.cache.len() + 1 > max_pos {
                Some(FinishReason::ContextFull)
            } else {
                None
            };
            events.push(TokenEvent { id: *id, token: Some(tok), index: s.generated.len() - 1, finished, logprobs });
            if finished.is_some() {
                done.push(*id);
            }
        }
        for id in done {
            if let Some(s) = self.running.remove(&id) {
                self.release(&s);
            }
        }
        Ok(events)
    }

    /// Tokens held in the KV caches of the running sequences (what a failed step must leave as
    /// it was).
    pub fn cached_tokens(&self) -> Vec<(RequestId, usize, usize)> {
        self.running.iter().map(|(id, s)| (*id, s.cache.len(), s.cache.bytes())).collect()
    }

    /// Running and waiting sequences.
    pub fn n_sequences(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// Run until every request is finished; returns generated tokens per request id.
    pub fn run_to_completion(&mut self) -> Result<BTreeMap<RequestId, (Vec<u32>, FinishReason)>> {
        let mut res: BTreeMap<RequestId, (Vec<u32>, FinishReason)> = BTreeMap::new();
        let mut acc: BTreeMap<RequestId, Vec<u32>> = BTreeMap::new();
        while self.has_work() {
            for ev in self.step()? {
                if let Some(t) = ev.token {
                    acc.entry(ev.id).or_default().push(t);
                }
                if let Some(f) = ev.finished {
                    res.insert(ev.id, (acc.remove(&ev.id).unwrap_or_default(), f));
                }
            }
        }
        Ok(res)
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("running", &self.running.len()).field("waiting", &self.waiting.len()).finish()
    }
}
