#![forbid(unsafe_code)]
//! Expert parallelism across ranks: the [`EpExecutor`] (route → replica choice → all-to-all
//! dispatch → local expert FFNs → all-to-all combine → weighted sum) and the [`RankLoop`] that
//! steps every rank together.
//!
//! Every rank holds the dense parts and its own expert slots (see [`experts_of_rank`]). Requests
//! live on one rank (data-parallel attention). Each engine step starts with a one-byte "have work"
//! exchange; when no rank has work, every rank waits on its own inbox for a short while and asks
//! again (no busy spinning), otherwise every rank runs one forward (or, with nothing of its own,
//! joins each MoE layer's dispatch and combine with zero tokens).
//!
//! When a collective fails (a peer died), the rank loads the experts it lacks and carries on alone
//! with local experts, so requests that live on surviving ranks still finish.

use crate::engine::{Engine, EngineConfig, FinishReason, Request, RequestId};
use crate::error::{ModelError, Result};
use crate::model::{LoadOptions, LogitsMode, Model, SeqInput};
use crate::moe::{ExpertExecutor, MoeLayer, Routing, gather_rows};
use crate::transport::{Transport, TransportError};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// `placement[moe_layer][rank]` → the experts of `rank` in that layer, as loader input.
pub fn experts_of_rank(placement: &[Vec<Vec<usize>>], rank: usize) -> Vec<Vec<usize>> {
    placement.iter().map(|l| l.get(rank).cloned().unwrap_or_default()).collect()
}

/// Time spent in the parts of MoE layers (microseconds, accumulated) and traffic counters.
#[derive(Debug, Default)]
pub struct EpTimers {
    pub dispatch_us: AtomicU64,
    pub expert_us: AtomicU64,
    pub combine_us: AtomicU64,
    pub remote_rows: AtomicU64,
    pub local_rows: AtomicU64,
}

/// Runs routed experts across ranks. One collective pair (dispatch, combine) per MoE layer call.
pub struct EpExecutor {
    rank: usize,
    world: usize,
    node_of_rank: Vec<usize>,
    /// `replicas[moe_layer][expert]` = ranks holding it.
    replicas: Vec<Vec<Vec<usize>>>,
    transport: Mutex<Box<dyn Transport>>,
    pub timers: EpTimers,
}

impl std::fmt::Debug for EpExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpExecutor").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

fn ep_err(e: TransportError) -> ModelError {
    ModelError::ExpertParallel(e.to_string())
}

fn proto_err(m: String) -> ModelError {
    ModelError::ExpertParallel(m)
}

impl EpExecutor {
    /// `placement[moe_layer][rank]` lists the experts each rank holds; `node_of_rank` groups ranks
    /// into machines (replica choice prefers the own node).
    pub fn new(
        transport: Box<dyn Transport>,
        placement: &[Vec<Vec<usize>>],
        n_experts: usize,
        node_of_rank: Vec<usize>,
    ) -> Result<Self> {
        let rank = transport.rank();
        let world = transport.world();
        let mut replicas = Vec::with_capacity(placement.len());
        for (l, ranks) in placement.iter().enumerate() {
            if ranks.len() != world {
                return Err(proto_err(format!("placement layer {l} has {} ranks, the group has {world}", ranks.len())));
            }
            let mut by = vec![Vec::new(); n_experts];
            for (r, es) in ranks.iter().enumerate() {
                for &e in es {
                    if e >= n_experts {
                        return Err(proto_err(format!("placement layer {l}: expert {e} out of range ({n_experts})")));
                    }
                    by[e].push(r);
                }
            }
            if let Some(e) = by.iter().position(|v| v.is_empty()) {
                return Err(proto_err(format!("placement layer {l}: expert {e} has no slot")));
            }
            replicas.push(by);
        }
        let node_of_rank = if node_of_rank.len() == world { node_of_rank } else { vec![0; world] };
        Ok(EpExecutor { rank, world, node_of_rank, replicas, transport: Mutex::new(transport), timers: EpTimers::default() })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }

    /// A plain all-to-all of one byte per rank: every rank's flag (the "have work" exchange).
    pub fn exchange_flags(&self, flag: u8) -> Result<Vec<u8>> {
        let mut t = self.transport.lock().map_err(|_| proto_err("transport lock poisoned".into()))?;
        let recv = t.all_to_all_v(vec![vec![flag]; self.world]).map_err(ep_err)?;
        Ok(recv.iter().map(|b| b.first().copied().unwrap_or(0)).collect())
    }

    /// Join every MoE layer's collectives with zero tokens (a rank without work in a busy step).
    pub fn idle_forward(&self, model: &Model) -> Result<()> {
        let empty = Routing { top_k: model.config.router.top_k, ids: vec![], weights: vec![] };
        for layer in model.moe_layers() {
            self.run(layer, &[], 0, &empty)?;
        }
        Ok(())
    }

    /// Pick the rank that runs (token, expert): own rank, then own node, then least loaded.
    fn choose(&self, layer: usize, expert: usize, load: &mut [u64]) -> usize {
        let reps = &self.replicas[layer][expert];
        let r = if reps.contains(&self.rank) {
            self.rank
        } else {
            let my_node = self.node_of_rank[self.rank];
            let same_node = reps.iter().copied().filter(|&r| self.node_of_rank[r] == my_node);
            let pick = |it: &mut dyn Iterator<Item = usize>| it.min_by_key(|&r| (load[r], r));
            pick(&mut same_node.into_iter()).or_else(|| pick(&mut reps.iter().copied())).unwrap_or(reps[0])
        };
        load[r] += 1;
        r
    }

    fn a2a(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let mut t = self.transport.lock().map_err(|_| proto_err("transport lock poisoned".into()))?;
        t.all_to_all_v(send).map_err(ep_err)
    }
}

fn f32s_from(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn put_f32s(buf: &mut Vec<u8>, v: &[f32]) {
    buf.reserve(v.len() * 4);
    for x in v {
        buf.extend_from_slice(&x.to_le_bytes());
    }
}

impl ExpertExecutor for EpExecutor {
    fn run(&self, layer: &MoeLayer, x: &[f32], t: usize, routing: &Routing) -> Result<Vec<f32>> {
        let h = layer.hidden;
        let li = layer.moe_index;
        if li >= self.replicas.len() {
            return Err(proto_err(format!("MoE layer {li} is not in the placement")));
        }
        let started = Instant::now();
        // 1. Replica choice; per destination the (token, expert, weight) items in send order.
        let mut load = vec![0u64; self.world];
        let mut items: Vec<Vec<(usize, u32, f32)>> = vec![Vec::new(); self.world];
        for tok in 0..t {
            for k in 0..routing.top_k {
                let e = routing.ids[tok * routing.top_k + k];
                let w = routing.weights[tok * routing.top_k + k];
                let r = self.choose(li, e as usize, &mut load);
                items[r].push((tok, e, w));
            }
        }
        // 2. Dispatch: [n u32][n expert ids u32][n rows f32].
        let send: Vec<Vec<u8>> = items
            .iter()
            .map(|its| {
                let mut b = Vec::with_capacity(4 + its.len() * (4 + 4 * h));
                b.extend_from_slice(&(its.len() as u32).to_le_bytes());
                for &(_, e, _) in its {
                    b.extend_from_slice(&e.to_le_bytes());
                }
                for &(tok, _, _) in its {
                    put_f32s(&mut b, &x[tok * h..(tok + 1) * h]);
                }
                b
            })
            .collect();
        let remote: u64 = items.iter().enumerate().filter(|(r, _)| *r != self.rank).map(|(_, v)| v.len() as u64).sum();
        self.timers.remote_rows.fetch_add(remote, Ordering::Relaxed);
        self.timers.local_rows.fetch_add(items[self.rank].len() as u64, Ordering::Relaxed);
        let recv = self.a2a(send)?;
        let t_dispatch = Instant::now();
        // 3. Expert FFNs over everything received, grouped per expert across sources.
        let mut srcs: Vec<(Vec<u32>, Vec<f32>)> = Vec::with_capacity(self.world);
        for (src, b) in recv.iter().enumerate() {
            if b.len() < 4 {
                return Err(proto_err(format!("rank {}: short dispatch from rank {src}", self.rank)));
            }
            let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
            if b.len() != 4 + n * 4 + n * h * 4 {
                return Err(proto_err(format!("rank {}: dispatch from rank {src} has {} bytes for {n} rows", self.rank, b.len())));
            }
            let ids: Vec<u32> =
                b[4..4 + 4 * n].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            srcs.push((ids, f32s_from(&b[4 + 4 * n..])));
        }
        // expert -> [(src, row)]
        let mut by_expert: HashMap<u32, Vec<(usize, usize)>> = HashMap::new();
        for (s, (ids, _)) in srcs.iter().enumerate() {
            for (i, &e) in ids.iter().enumerate() {
                by_expert.entry(e).or_default().push((s, i));
            }
        }
        let mut groups: Vec<(u32, Vec<(usize, usize)>)> = by_expert.into_iter().collect();
        groups.sort_by_key(|g| g.0);
        let outs: Vec<Result<Vec<f32>>> = groups
            .par_iter()
            .map(|(e, rows)| {
                let mut xin = Vec::with_capacity(rows.len() * h);
                for &(s, i) in rows {
                    xin.extend_from_slice(&srcs[s].1[i * h..(i + 1) * h]);
                }
                layer.expert_forward(*e as usize, &xin, rows.len())
            })
            .collect();
        let mut back: Vec<Vec<f32>> = srcs.iter().map(|(ids, _)| vec![0.0; ids.len() * h]).collect();
        for ((_, rows), y) in groups.iter().zip(outs) {
            let y = y?;
            for (j, &(s, i)) in rows.iter().enumerate() {
                back[s][i * h..(i + 1) * h].copy_from_slice(&y[j * h..(j + 1) * h]);
            }
        }
        let t_expert = Instant::now();
        // 4. Combine: outputs go back to the token's home rank, in the order they came.
        let send: Vec<Vec<u8>> = back
            .iter()
            .map(|v| {
                let mut b = Vec::with_capacity(v.len() * 4);
                put_f32s(&mut b, v);
                b
            })
            .collect();
        let recv = self.a2a(send)?;
        // 5. Weighted sum, experts in increasing id order (as the local executor does).
        let mut all: Vec<(u32, usize, f32, usize, usize)> = Vec::with_capacity(t * routing.top_k);
        let mut ys: Vec<Vec<f32>> = Vec::with_capacity(self.world);
        for (r, b) in recv.iter().enumerate() {
            if b.len() != items[r].len() * h * 4 {
                return Err(proto_err(format!("rank {}: combine from rank {r} has {} bytes", self.rank, b.len())));
            }
            ys.push(f32s_from(b));
            for (i, &(tok, e, w)) in items[r].iter().enumerate() {
                all.push((e, tok, w, r, i));
            }
        }
        all.sort_by_key(|a| (a.0, a.1));
        let mut out = vec![0.0f32; t * h];
        for (_, tok, w, r, i) in all {
            crate::kernels::axpy(w, &ys[r][i * h..(i + 1) * h], &mut out[tok * h..(tok + 1) * h]);
        }
        let done = Instant::now();
        let us = |a: Instant, b: Instant| b.duration_since(a).as_micros() as u64;
        self.timers.dispatch_us.fetch_add(us(started, t_dispatch), Ordering::Relaxed);
        self.timers.expert_us.fetch_add(us(t_dispatch, t_expert), Ordering::Relaxed);
        self.timers.combine_us.fetch_add(us(t_expert, done), Ordering::Relaxed);
        Ok(out)
    }
}

/// Runs routed experts from a fully loaded copy of the model (after the group broke up).
struct FallbackExperts {
    full: Arc<Model>,
}

impl ExpertExecutor for FallbackExperts {
    fn run(&self, layer: &MoeLayer, x: &[f32], t: usize, routing: &Routing) -> Result<Vec<f32>> {
        let full = self
            .full
            .moe_layers()
            .nth(layer.moe_index)
            .ok_or_else(|| proto_err(format!("MoE layer {} missing in the fallback model", layer.moe_index)))?;
        let h = layer.hidden;
        let batches = routing.group_by_expert(full.n_experts());
        let outs: Vec<Result<Vec<f32>>> = batches
            .par_iter()
            .map(|b| full.expert_forward(b.expert, &gather_rows(x, h, &b.tokens), b.tokens.len()))
            .collect();
        let mut out = vec![0.0; t * h];
        for (b, y) in batches.iter().zip(outs) {
            crate::moe::combine_into(&mut out, h, b, &y?);
        }
        Ok(out)
    }
}

/// What a rank loop reports for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum RankEvent {
    /// Logits of every prompt position `[len × vocab]` (when asked for), before the first token.
    PromptLogits(Vec<f32>),
    Token { token: u32, index: usize, finished: Option<FinishReason> },
    /// The request failed (the message says why).
    Error(String),
}

/// Receives a request's events; returns `false` when nobody listens any more (the request is
/// then aborted).
pub type EventSink = Box<dyn FnMut(RankEvent) -> bool + Send>;

/// A request handed to a rank loop.
pub struct Job {
    pub request: Request,
    pub prompt_logits: bool,
    pub sink: EventSink,
}

/// Live counters of a rank loop.
#[derive(Debug, Default)]
pub struct RankStats {
    pub steps: AtomicU64,
    pub busy_steps: AtomicU64,
    pub active: AtomicU64,
    pub outstanding_tokens: AtomicU64,
    pub forward_us: AtomicU64,
    pub transport_error: Mutex<Option<String>>,
    pub degraded: AtomicBool,
    pub expert_load: Mutex<Vec<u64>>,
    pub stop: AtomicBool,
}

/// Settings of [`RankLoop::spawn`].
#[derive(Debug, Clone)]
pub struct RankLoopConfig {
    pub engine: EngineConfig,
    /// How long an idle rank waits for work before asking the group again.
    pub idle_poll: Duration,
    /// Model directory, to load the missing experts when the group breaks up.
    pub model_dir: Option<PathBuf>,
}

impl Default for RankLoopConfig {
    fn default() -> Self {
        RankLoopConfig { engine: EngineConfig::default(), idle_poll: Duration::from_millis(20), model_dir: None }
    }
}

/// Handle of a running rank loop (a dedicated thread).
pub struct RankLoop {
    pub jobs: mpsc::Sender<Job>,
    pub stats: Arc<RankStats>,
    pub executor: Option<Arc<EpExecutor>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RankLoop {
    /// Start stepping `model` with `executor` (None: a single rank with every expert loaded).
    pub fn spawn(model: Arc<Model>, executor: Option<Arc<EpExecutor>>, cfg: RankLoopConfig) -> RankLoop {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(RankStats::default());
        let st = stats.clone();
        let ex = executor.clone();
        let thread = std::thread::Builder::new()
            .name("rank-loop".into())
            .spawn(move || run_loop(model, ex, cfg, rx, st))
            .expect("spawn rank loop");
        RankLoop { jobs: tx, stats, executor, thread: Some(thread) }
    }

    /// Ask the loop to stop and wait for it.
    pub fn stop(&mut self) {
        self.stats.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Live {
    sink: EventSink,
    generated: u64,
    max_tokens: u64,
}

fn run_loop(
    model: Arc<Model>,
    mut executor: Option<Arc<EpExecutor>>,
    cfg: RankLoopConfig,
    rx: mpsc::Receiver<Job>,
    stats: Arc<RankStats>,
) {
    let mut engine = Engine::new(model.clone(), cfg.engine.clone());
    if let Some(ex) = &executor {
        engine.set_executor(ex.clone());
    }
    let mut live: HashMap<RequestId, Live> = HashMap::new();
    let mut scoring: Vec<Job> = Vec::new();
    let mut disconnected = false;
    let fail_all = |live: &mut HashMap<RequestId, Live>, engine: &mut Engine, msg: &str| {
        for (id, mut l) in live.drain() {
            engine.abort(id);
            (l.sink)(RankEvent::Error(msg.to_string()));
        }
    };
    let add = |job: Job, engine: &mut Engine, live: &mut HashMap<RequestId, Live>, scoring: &mut Vec<Job>| {
        if job.prompt_logits {
            scoring.push(job);
            return;
        }
        let Job { request, mut sink, .. } = job;
        let max_tokens = request.max_tokens as u64;
        match engine.add_request(request) {
            Ok(id) => {
                live.insert(id, Live { sink, generated: 0, max_tokens });
            }
            Err(e) => {
                sink(RankEvent::Error(e.to_string()));
            }
        }
    };
    while !stats.stop.load(Ordering::SeqCst) {
        loop {
            match rx.try_recv() {
                Ok(job) => add(job, &mut engine, &mut live, &mut scoring),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        let mine = engine.has_work() || !scoring.is_empty();
        let any = match &executor {
            Some(ex) => match ex.exchange_flags(mine as u8) {
                Ok(f) => f.iter().any(|&x| x != 0),
                Err(e) => {
                    degrade(&mut engine, &mut executor, &cfg, &stats, &e.to_string());
                    if executor.is_some() {
                        fail_all(&mut live, &mut engine, &e.to_string());
                    }
                    continue;
                }
            },
            None => mine,
        };
        stats.steps.fetch_add(1, Ordering::Relaxed);
        if !any {
            if disconnected && executor.is_none() {
                break;
            }
            match rx.recv_timeout(cfg.idle_poll) {
                Ok(job) => add(job, &mut engine, &mut live, &mut scoring),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => disconnected = true,
            }
            continue;
        }
        stats.busy_steps.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let result: Result<()> = if let Some(mut job) = scoring.pop() {
            // Prompt logits: one forward over the prompt with a throw-away cache.
            let exec: &dyn ExpertExecutor = match &executor {
                Some(e) => e.as_ref(),
                None => &crate::moe::LocalExperts,
            };
            let mut cache = model.new_cache();
            let r = model.forward_with(
                &mut [SeqInput { tokens: &job.request.prompt, cache: &mut cache }],
                LogitsMode::All,
                exec,
            );
            match r {
                Ok(mut out) => {
                    let logits = out.logits.remove(0);
                    if (job.sink)(RankEvent::PromptLogits(logits)) {
                        job.prompt_logits = false;
                        add(job, &mut engine, &mut live, &mut scoring);
                    }
                    Ok(())
                }
                Err(ModelError::ExpertParallel(m)) => {
                    scoring.push(job);
                    Err(ModelError::ExpertParallel(m))
                }
                Err(e) => {
                    (job.sink)(RankEvent::Error(e.to_string()));
                    Ok(())
                }
            }
        } else if engine.has_work() {
            match engine.step() {
                Ok(events) => {
                    for ev in events {
                        let Some(l) = live.get_mut(&ev.id) else { continue };
                        l.generated += 1;
                        let keep = match ev.token {
                            Some(token) => (l.sink)(RankEvent::Token { token, index: ev.index, finished: ev.finished }),
                            None => false,
                        };
                        if ev.finished.is_some() {
                            live.remove(&ev.id);
                        } else if !keep {
                            live.remove(&ev.id);
                            engine.abort(ev.id);
                        }
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else if let Some(ex) = &executor {
            ex.idle_forward(&model)
        } else {
            Ok(())
        };
        stats.forward_us.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.active.store((live.len() + scoring.len()) as u64, Ordering::Relaxed);
        stats
            .outstanding_tokens
            .store(live.values().map(|l| l.max_tokens.saturating_sub(l.generated)).sum(), Ordering::Relaxed);
        match result {
            Ok(()) => {}
            Err(ModelError::ExpertParallel(m)) => {
                degrade(&mut engine, &mut executor, &cfg, &stats, &m);
                if executor.is_some() {
                    fail_all(&mut live, &mut engine, &m);
                }
            }
            Err(e) => {
                // Not a transport problem: fail what runs here; the group stays in step because
                // the other ranks finish this step's collectives... only if we did too, so treat
                // it as fatal for this rank's requests.
                fail_all(&mut live, &mut engine, &e.to_string());
            }
        }
        {
            let s = engine.routing_stats();
            if let Ok(mut l) = stats.expert_load.lock() {
                *l = s.counts.iter().flatten().copied().collect();
            }
        }
    }
    fail_all(&mut live, &mut engine, "worker stopped");
    for mut j in scoring.drain(..) {
        (j.sink)(RankEvent::Error("worker stopped".into()));
    }
}

/// The group broke up (a peer died): load every expert and go on alone.
fn degrade(engine: &mut Engine, executor: &mut Option<Arc<EpExecutor>>, cfg: &RankLoopConfig, stats: &RankStats, why: &str) {
    tracing::warn!("expert-parallel group failed: {why}; continuing with local experts");
    if let Ok(mut e) = stats.transport_error.lock() {
        *e = Some(why.to_string());
    }
    let Some(dir) = &cfg.model_dir else {
        return; // keep the executor: every request will fail with the transport error
    };
    match Model::load(dir, &LoadOptions::default()) {
        Ok(full) => {
            engine.set_executor(Arc::new(FallbackExperts { full: Arc::new(full) }));
            *executor = None;
            stats.degraded.store(true, Ordering::SeqCst);
        }
        Err(e) => tracing::error!("cannot load the full model for the fallback: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tcp::TcpTransport;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
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
            let mesh = TcpTransport::local_mesh(world, Duration::from_secs(30)).expect("mesh");
            let handles: Vec<_> = mesh
                .into_iter()
                .map(|t| {
                    let placement = placement.clone();
                    let dir = dir.clone();
                    let prompt = prompt.clone();
                    std::thread::spawn(move || {
                        let r = t.rank();
                        let opts = LoadOptions { experts: Some(experts_of_rank(&placement, r)) };
                        let m = Model::load(&dir, &opts).expect("load slots");
                        let ex = EpExecutor::new(Box::new(t), &placement, n_e, vec![0; world]).expect("ep");
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
            assert!(d < 1e-5, "world {world}: rel diff {d}");
        }
    }
}
