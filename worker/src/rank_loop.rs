#![forbid(unsafe_code)]
//! The engine loop of a rank: steps the [`Engine`] together with every other rank of the
//! expert-parallel group (one [`EpExecutor`] per group generation).
//!
//! Each step starts with the step header exchange ([`EpExecutor::exchange_step`]); when no rank
//! has work, every rank waits on its own inbox for a short while and asks again, otherwise every
//! rank runs one forward (or, with nothing of its own, joins each MoE layer's collectives with
//! zero tokens).
//!
//! When a collective fails (a peer died, or the coordinator regroups and interrupted the mesh)
//! the failed step changes nothing ([`Engine::step`] rolls the KV caches back) and the loop
//! *pauses*: no steps, new jobs queue, until the executor of a newer generation arrives
//! ([`RankLoop::regroup`]). It then continues with the same sequences and KV caches. A loop that
//! waits longer than [`RankLoopConfig::regroup_timeout`] fails its requests as retryable.

use crate::engine::{Engine, EngineConfig, FinishReason, Request, RequestId};
use crate::error::{ModelError, Result};
use crate::expert_parallel::{EpExecutor, RecentSteps};
use crate::backend::Backend;
use crate::model::{LogitsMode, SeqInput};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Why a request failed, typed so that callers map it to their own codes without reading text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request itself is bad (prompt, sampling parameters): retrying cannot help.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// This rank cannot serve it now (the group broke up and no regroup came, the worker stops):
    /// retry, elsewhere or later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The model failed on this rank for another reason (a bug, not the input).
    #[error("internal error: {0}")]
    Internal(String),
}

impl RequestError {
    /// Whether the same request may succeed when sent again.
    pub fn retryable(&self) -> bool {
        matches!(self, RequestError::Unavailable(_))
    }
}

/// What a rank loop reports for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum RankEvent {
    /// Logits of every prompt position `[len × vocab]` (when asked for), before the first token.
    PromptLogits(Vec<f32>),
    Token { token: u32, index: usize, finished: Option<FinishReason>, logprobs: Option<crate::sampling::TokenLogprobs> },
    /// The request failed.
    Error(RequestError),
}

/// Receives a request's events; returns `false` when nobody listens any more (the request is
/// then aborted).
pub type EventSink = Box<dyn FnMut(RankEvent) -> bool + Send>;

/// Whether the request's client went away (checked before every step).
pub type GoneProbe = Box<dyn Fn() -> bool + Send>;

/// A request handed to a rank loop.
pub struct Job {
    pub request: Request,
    pub prompt_logits: bool,
    pub sink: EventSink,
    /// Without one, a cancelled request is noticed at its next token (the sink returns false).
    pub gone: Option<GoneProbe>,
}

/// Live counters of a rank loop.
#[derive(Debug, Default)]
pub struct RankStats {
    pub steps: AtomicU64,
    pub busy_steps: AtomicU64,
    pub active: AtomicU64,
    pub outstanding_tokens: AtomicU64,
    pub forward_us: AtomicU64,
    /// The last collective failure of this rank's group.
    pub transport_error: Mutex<Option<String>>,
    /// Waiting for a regroup after a failed collective.
    pub paused: AtomicBool,
    /// Generation of the executor the loop steps with.
    pub generation: AtomicU64,
    /// Sequences that continued across a regroup with their KV cache, since start.
    pub kept_sequences: AtomicU64,
    pub expert_load: Mutex<Vec<u64>>,
    /// Busy step durations (µs) not yet taken.
    pub recent_steps: RecentSteps<4096>,
    pub stop: AtomicBool,
}

/// Settings of [`RankLoop::spawn`].
#[derive(Clone)]
pub struct RankLoopConfig {
    pub engine: EngineConfig,
    /// How long an idle rank waits for work before asking the group again.
    pub idle_poll: Duration,
    /// How long a paused loop (its group failed) waits for a newer generation before failing its
    /// requests as retryable.
    pub regroup_timeout: Duration,
    /// Hears the duration of every busy step (metrics).
    pub on_step: Option<Arc<dyn Fn(Duration) + Send + Sync>>,
}

impl std::fmt::Debug for RankLoopConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankLoopConfig")
            .field("engine", &self.engine)
            .field("idle_poll", &self.idle_poll)
            .field("regroup_timeout", &self.regroup_timeout)
            .finish()
    }
}

impl Default for RankLoopConfig {
    fn default() -> Self {
        RankLoopConfig {
            engine: EngineConfig::default(),
            idle_poll: Duration::from_millis(20),
            regroup_timeout: Duration::from_secs(30),
            on_step: None,
        }
    }
}

/// The executor of a newer generation, and where to say how many sequences it kept.
struct Handover {
    executor: Arc<EpExecutor>,
    kept: mpsc::Sender<u32>,
}

/// Handle of a running rank loop (a dedicated thread).
pub struct RankLoop {
    pub jobs: mpsc::Sender<Job>,
    pub stats: Arc<RankStats>,
    /// The newest executor (the one the loop steps with, or the one handed over to it).
    executor: Arc<Mutex<Arc<EpExecutor>>>,
    /// `Mutex`: the handle is shared (`Arc`) between the service's calls.
    handover: Mutex<mpsc::Sender<Handover>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl RankLoop {
    /// Start stepping `model` (any backend) with `executor` (a world of 1 too: an executor over
    /// `LocalTransport` whose one rank holds every expert).
    pub fn spawn(model: Arc<dyn Backend>, executor: Arc<EpExecutor>, cfg: RankLoopConfig) -> RankLoop {
        let (tx, rx) = mpsc::channel();
        let (htx, hrx) = mpsc::channel();
        let stats = Arc::new(RankStats::default());
        stats.generation.store(executor.generation(), Ordering::SeqCst);
        let st = stats.clone();
        let ex = executor.clone();
        let thread = std::thread::Builder::new()
            .name("rank-loop".into())
            .spawn(move || LoopState::new(model, ex, cfg, st).run(rx, hrx))
            .expect("spawn rank loop");
        RankLoop {
            jobs: tx,
            stats,
            executor: Arc::new(Mutex::new(executor)),
            handover: Mutex::new(htx),
            thread: Mutex::new(Some(thread)),
        }
    }

    /// The newest executor: the one the loop steps with, or the one just handed to it.
    pub fn executor(&self) -> Arc<EpExecutor> {
        match self.executor.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Switch to `executor`, of a newer generation: the current mesh is interrupted (a step
    /// blocked on a dead or frozen peer fails at once and changes nothing), and the loop goes on
    /// with the new one at its next step, keeping its sequences. Returns how many running
    /// sequences continued with their KV cache, once the loop took it (at most `wait`; `None`
    /// when it did not answer in time, e.g. a step still running).
    pub fn regroup(&self, executor: Arc<EpExecutor>, wait: Duration) -> std::result::Result<Option<u32>, RequestError> {
        let old = {
            let mut g = self.executor.lock().map_err(|_| RequestError::Internal("executor lock poisoned".into()))?;
            if executor.generation() <= g.generation() {
                return Err(RequestError::Invalid(format!(
                    "generation {} is not after {}",
                    executor.generation(),
                    g.generation()
                )));
            }
            std::mem::replace(&mut *g, executor.clone())
        };
        old.interrupt();
        let (ktx, krx) = mpsc::channel();
        let sent = match self.handover.lock() {
            Ok(h) => h.send(Handover { executor, kept: ktx }).is_ok(),
            Err(_) => false,
        };
        if !sent {
            return Err(RequestError::Unavailable("the rank loop stopped".into()));
        }
        Ok(krx.recv_timeout(wait).ok())
    }

    /// Ask the loop to stop and wait for it.
    pub fn stop(&self) {
        self.stats.stop.store(true, Ordering::SeqCst);
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// Stop at once: interrupt the mesh (a step in a collective fails), stop, and wait. The
    /// loop's requests fail as retryable; the peers see this rank's connections close.
    pub fn shutdown(&self) {
        self.stats.stop.store(true, Ordering::SeqCst);
        self.executor().interrupt();
        self.stop();
    }
}

impl Drop for RankLoop {
    fn drop(&mut self) {
        // Nobody can hand it work or a new generation any more.
        self.shutdown();
    }
}

struct Live {
    sink: EventSink,
    gone: Option<GoneProbe>,
    generated: u64,
    max_tokens: u64,
}

/// What the loop thread owns.
struct LoopState {
    model: Arc<dyn Backend>,
    executor: Arc<EpExecutor>,
    cfg: RankLoopConfig,
    stats: Arc<RankStats>,
    engine: Engine,
    live: HashMap<RequestId, Live>,
    /// Jobs that want prompt logits first (one throw-away forward each).
    scoring: Vec<Job>,
    /// Since when the loop waits for a regroup (its group failed).
    paused_since: Option<Instant>,
    /// The pause outlasted the regroup timeout: requests were failed, new ones fail at once.
    abandoned: bool,
    disconnected: bool,
}

impl LoopState {
    fn new(model: Arc<dyn Backend>, executor: Arc<EpExecutor>, cfg: RankLoopConfig, stats: Arc<RankStats>) -> Self {
        let mut engine = Engine::new(model.clone(), cfg.engine.clone());
        engine.set_executor(executor.clone());
        LoopState {
            model,
            executor,
            cfg,
            stats,
            engine,
            live: HashMap::new(),
            scoring: Vec::new(),
            paused_since: None,
            abandoned: false,
            disconnected: false,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>, handovers: mpsc::Receiver<Handover>) {
        while !self.stats.stop.load(Ordering::SeqCst) {
            while let Ok(h) = handovers.try_recv() {
                self.adopt(h);
            }
            self.take_jobs(&rx);
            if let Some(since) = self.paused_since {
                match handovers.recv_timeout(self.cfg.idle_poll) {
                    Ok(h) => self.adopt(h),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    // The handle is gone: nobody can regroup this loop any more.
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if !self.abandoned && since.elapsed() >= self.cfg.regroup_timeout {
                    let why = format!(
                        "the expert-parallel group failed and no new generation came within {:?}; retry",
                        self.cfg.regroup_timeout
                    );
                    tracing::warn!(generation = self.executor.generation(), "{why}");
                    self.fail_all(RequestError::Unavailable(why));
                    self.abandoned = true;
                }
                self.publish();
                continue;
            }
            if !self.step(&rx) {
                break;
            }
        }
        self.fail_all(RequestError::Unavailable("worker stopped".into()));
    }

    /// Take the jobs waiting in the inbox.
    fn take_jobs(&mut self, rx: &mpsc::Receiver<Job>) {
        loop {
            match rx.try_recv() {
                Ok(job) => self.add(job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    break;
                }
            }
        }
    }

    /// Switch to a newer generation's executor, keeping every sequence and its KV cache.
    fn adopt(&mut self, h: Handover) {
        if h.executor.generation() <= self.executor.generation() {
            let _ = h.kept.send(0);
            return;
        }
        let kept = self.engine.n_running() as u32;
        tracing::info!(
            from = self.executor.generation(),
            to = h.executor.generation(),
            world = h.executor.world(),
            kept,
            "joined a new generation of the expert-parallel group"
        );
        self.executor = h.executor;
        self.engine.set_executor(self.executor.clone());
        self.paused_since = None;
        self.abandoned = false;
        self.stats.paused.store(false, Ordering::SeqCst);
        self.stats.generation.store(self.executor.generation(), Ordering::SeqCst);
        self.stats.kept_sequences.fetch_add(kept as u64, Ordering::Relaxed);
        let _ = h.kept.send(kept);
    }

    /// The group failed: change nothing, wait for a regroup.
    fn pause(&mut self, why: &str) {
        if self.paused_since.is_none() {
            tracing::warn!(generation = self.executor.generation(), "expert-parallel group failed: {why}; waiting for a regroup");
            self.paused_since = Some(Instant::now());
        }
        if let Ok(mut e) = self.stats.transport_error.lock() {
            *e = Some(why.to_string());
        }
        self.stats.paused.store(true, Ordering::SeqCst);
    }

    fn fail_all(&mut self, err: RequestError) {
        for (id, mut l) in self.live.drain() {
            self.engine.abort(id);
            (l.sink)(RankEvent::Error(err.clone()));
        }
        for mut j in self.scoring.drain(..) {
            (j.sink)(RankEvent::Error(err.clone()));
        }
        self.publish();
    }

    fn add(&mut self, mut job: Job) {
        if self.abandoned {
            (job.sink)(RankEvent::Error(RequestError::Unavailable(
                "this rank's expert-parallel group failed and it was not regrouped; retry".into(),
            )));
            return;
        }
        if job.prompt_logits {
            self.scoring.push(job);
            return;
        }
        let Job { request, mut sink, gone, .. } = job;
        let max_tokens = request.max_tokens as u64;
        match self.engine.add_request(request) {
            Ok(id) => {
                self.live.insert(id, Live { sink, gone, generated: 0, max_tokens });
            }
            Err(e) => {
                sink(RankEvent::Error(RequestError::Invalid(e.to_string())));
            }
        }
    }

    /// One step of the group. Returns `false` when the loop should end.
    fn step(&mut self, rx: &mpsc::Receiver<Job>) -> bool {
        self.drop_gone();
        let mine = self.engine.has_work() || !self.scoring.is_empty();
        let any = match self.executor.exchange_step(mine) {
            Ok(any) => any,
            Err(e) => {
                self.pause(&e.to_string());
                return true;
            }
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if !any {
            // A single rank has nobody to join: it may end once nobody can send it work.
            if self.disconnected && self.executor.world() == 1 {
                return false;
            }
            match rx.recv_timeout(self.cfg.idle_poll) {
                Ok(job) => self.add(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => self.disconnected = true,
            }
            return true;
        }
        self.stats.busy_steps.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let result = if !self.scoring.is_empty() {
            self.score_one()
        } else if self.engine.has_work() {
            self.decode()
        } else {
            self.model.idle_forward(&self.executor)
        };
        let took = t0.elapsed();
        self.stats.forward_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.stats.recent_steps.extend([took.as_micros().min(u32::MAX as u128) as u32]);
        if let Some(f) = &self.cfg.on_step {
            f(took);
        }
        match result {
            Ok(()) => {}
            // A collective failed: the step changed nothing; wait for the next generation.
            Err(ModelError::ExpertParallel(m)) => self.pause(&m),
            Err(e) => {
                // Not the group: this rank's model failed (the input was validated on arrival).
                self.fail_all(RequestError::Internal(e.to_string()));
            }
        }
        self.publish();
        true
    }

    /// Prompt logits: one forward over the prompt with a throw-away cache.
    fn score_one(&mut self) -> Result<()> {
        let Some(mut job) = self.scoring.pop() else { return Ok(()) };
        let mut cache = self.model.new_cache();
        let r = self.model.forward_step(
            &mut [SeqInput { tokens: &job.request.prompt, cache: &mut cache }],
            LogitsMode::All,
            self.executor.as_ref(),
        );
        // The throw-away cache's copies on other ranks (affinity data path) can go.
        crate::moe::ExpertExecutor::release_sequence(self.executor.as_ref(), cache.id());
        self.model.release_sequence(cache.id());
        match r {
            Ok(mut out) => {
                let logits = out.logits.remove(0);
                if (job.sink)(RankEvent::PromptLogits(logits)) {
                    job.prompt_logits = false;
                    self.add(job);
                }
                Ok(())
            }
            Err(ModelError::ExpertParallel(m)) => {
                // Scored again in the next generation.
                self.scoring.push(job);
                Err(ModelError::ExpertParallel(m))
            }
            Err(e) => {
                (job.sink)(RankEvent::Error(RequestError::Invalid(e.to_string())));
                Ok(())
            }
        }
    }

    /// Sequences whose client went away end now, with their KV cache, also while they wait or
    /// prefill (their next token may be a long prefill away).
    fn drop_gone(&mut self) {
        let gone: Vec<RequestId> = self.live.iter().filter(|(_, l)| l.gone.as_ref().is_some_and(|g| g())).map(|(id, _)| *id).collect();
        if gone.is_empty() {
            return;
        }
        for id in gone {
            self.live.remove(&id);
            self.engine.abort(id);
        }
        self.publish();
    }

    /// One engine step; its tokens go to their sinks.
    fn decode(&mut self) -> Result<()> {
        // `worker.step=sleep(MS)` slows every step: tests of cancellation need long generations.
        crate::failpoint::check("worker.step")?;
        for ev in self.engine.step()? {
            let Some(l) = self.live.get_mut(&ev.id) else { continue };
            l.generated += 1;
            let keep = match ev.token {
                Some(token) => (l.sink)(RankEvent::Token { token, index: ev.index, finished: ev.finished, logprobs: ev.logprobs }),
                None => false,
            };
            if ev.finished.is_some() {
                self.live.remove(&ev.id);
            } else if !keep {
                self.live.remove(&ev.id);
                self.engine.abort(ev.id);
            }
        }
        Ok(())
    }

    /// Mirror the loop's state into its counters.
    fn publish(&self) {
        let s = &self.stats;
        s.active.store((self.live.len() + self.scoring.len()) as u64, Ordering::Relaxed);
        s.outstanding_tokens
            .store(self.live.values().map(|l| l.max_tokens.saturating_sub(l.generated)).sum(), Ordering::Relaxed);
        let r = self.engine.routing_stats();
        if let Ok(mut l) = s.expert_load.lock() {
            *l = r.counts.iter().flatten().copied().collect();
        }
    }
}
