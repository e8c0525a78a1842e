#![forbid(unsafe_code)]
//! Expert parallelism across ranks: the [`EpExecutor`] (route → replica choice → all-to-all
//! dispatch → local expert FFNs → all-to-all combine → weighted sum). The rank loop that steps
//! every rank together is in [`crate::rank_loop`].
//!
//! Every rank holds the dense parts and its own expert slots (see [`experts_of_rank`]). Requests
//! live on one rank (data-parallel attention). Each engine step starts with a one-byte "have work"
//! exchange; when no rank has work, every rank waits on its own inbox for a short while and asks
//! again (no busy spinning), otherwise every rank runs one forward (or, with nothing of its own,
//! joins each MoE layer's dispatch and combine with zero tokens).
//!
//! An executor belongs to one *generation* of the group (one membership, one mesh). When a
//! collective fails (a peer died) the executor is done: the coordinator regroups the survivors
//! into a new generation, whose executor keeps the weights this rank holds
//! ([`EpExecutor::expert_weights`]) and loads only the ones it gains ([`assemble_experts`]).

use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::moe::{DeviceDispatch, ExpertExecutor, ExpertFfn, MoeLayer, Routing};
use crate::transport::{InterruptHandle, Transport, TransportError};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "datapath.rs"]
mod datapath;
pub use datapath::DataPath;

/// `placement[moe_layer][rank]` → the experts of `rank` in that layer, as loader input.
pub fn experts_of_rank(placement: &[Vec<Vec<usize>>], rank: usize) -> Vec<Vec<usize>> {
    placement.iter().map(|l| l.get(rank).cloned().unwrap_or_default()).collect()
}

/// This rank's weights for the experts `mine[moe_layer]`: shared from `current`
/// (`[moe_layer][expert]`, what the rank holds now) where it holds them, the rest read from the
/// checkpoint in `dir`. Loading runs on a thread of its own at idle priority: it reads and converts the
/// weights only when the serving threads leave a core free (a rank waiting in its all-to-all
/// does), so the steps meanwhile are not stretched by the copy. Its CPU time is added to
/// `background_cpu_us` after every expert (projected step lengths leave it out).
pub fn assemble_experts(
    current: &[Vec<Option<Arc<ExpertFfn>>>],
    mine: &[Vec<usize>],
    n_experts: usize,
    dir: &Path,
    background_cpu_us: &AtomicU64,
) -> Result<Assembled> {
    let mut experts: Vec<Vec<Option<Arc<ExpertFfn>>>> = vec![vec![None; n_experts]; mine.len()];
    let mut missing: Vec<Vec<usize>> = vec![Vec::new(); mine.len()];
    let mut kept = 0;
    for (l, es) in mine.iter().enumerate() {
        for &e in es {
            if e >= n_experts {
                return Err(proto_err(format!("MoE layer {l}: expert {e} out of range ({n_experts})")));
            }
            match current.get(l).and_then(|v| v.get(e)).cloned().flatten() {
                Some(w) => {
                    experts[l][e] = Some(w);
                    kept += 1;
                }
                None => missing[l].push(e),
            }
        }
    }
    if missing.iter().all(Vec::is_empty) {
        return Ok(Assembled { experts, loaded: 0, kept, loaded_bytes: 0 });
    }
    let loaded_now = std::thread::scope(|s| {
        s.spawn(|| {
            crate::kernels::set_current_thread_idle_priority();
            let mut accounted = crate::kernels::thread_cpu_time_us();
            Model::load_routed_experts(dir, &missing, || {
                let now = crate::kernels::thread_cpu_time_us();
                background_cpu_us.fetch_add(now.saturating_sub(accounted), Ordering::Relaxed);
                accounted = now;
            })
        })
        .join()
    })
    .map_err(|_| proto_err("expert loader thread panicked".into()))??;
    let (mut loaded, mut loaded_bytes) = (0, 0u64);
    for (l, es) in loaded_now.into_iter().enumerate() {
        for (e, w) in es {
            loaded_bytes += w.bytes() as u64;
            experts[l][e] = Some(Arc::new(w));
            loaded += 1;
        }
    }
    Ok(Assembled { experts, loaded, kept, loaded_bytes })
}

/// What [`assemble_experts`] put together.
pub struct Assembled {
    /// `[moe_layer][expert]`: this rank's weights, `None` where it holds no slot.
    pub experts: Vec<Vec<Option<Arc<ExpertFfn>>>>,
    /// Read from the checkpoint.
    pub loaded: usize,
    /// Shared from what the rank held.
    pub kept: usize,
    pub loaded_bytes: u64,
}

/// Time spent in the parts of MoE layers (microseconds, accumulated) and traffic counters.
#[derive(Debug, Default)]
pub struct EpTimers {
    pub dispatch_us: AtomicU64,
    pub expert_us: AtomicU64,
    pub combine_us: AtomicU64,
    pub remote_rows: AtomicU64,
    pub local_rows: AtomicU64,
    /// Payload bytes sent to other ranks by dispatch and combine.
    pub alltoall_bytes: AtomicU64,
    /// Dispatch and combine collectives run.
    pub alltoalls: AtomicU64,
    /// (token, expert) assignments the capacity option dropped.
    pub dropped_rows: AtomicU64,
    /// (token, expert) assignments the capacity option sent to the token's next-best expert.
    pub rerouted_rows: AtomicU64,
    /// Bytes of keys and values sent to the coherence group (affinity data path; also counted in
    /// `alltoall_bytes`).
    pub kv_gather_bytes: AtomicU64,
    /// Bytes of the copies of group peers' KV caches held now (affinity data path).
    pub kv_mirror_bytes: AtomicU64,
    /// Tokens whose MoE combine landed on another rank than the one that held them (affinity
    /// data path).
    pub tokens_moved: AtomicU64,
    /// MoE layers run (both paths): per layer and step counters are the totals over this.
    pub moe_layer_calls: AtomicU64,
}

/// Hears the duration and bytes sent of every dispatch/combine all-to-all (metrics).
pub type AllToAllObserver = Arc<dyn Fn(Duration, u64) + Send + Sync>;

/// One placement epoch as this rank runs it: the ranks holding every expert, and this rank's
/// expert weights. A placement change builds the next one beside it (sharing the weights it
/// keeps) and all ranks switch at the same engine step.
pub struct EpSlots {
    epoch: u64,
    /// `replicas[moe_layer][expert]` = ranks holding it.
    replicas: Vec<Vec<Vec<usize>>>,
    /// `experts[moe_layer][expert]`: this rank's weights, `None` where it holds no slot.
    experts: Vec<Vec<Option<Arc<ExpertFfn>>>>,
    /// Whether any expert of the layer has several replicas (load-aware choice applies).
    replicated: Vec<bool>,
}

impl EpSlots {
    /// Checks `placement[moe_layer][rank]` against the group and the weights this rank holds.
    fn new(
        epoch: u64,
        placement: &[Vec<Vec<usize>>],
        rank: usize,
        world: usize,
        n_experts: usize,
        experts: Vec<Vec<Option<Arc<ExpertFfn>>>>,
    ) -> Result<Self> {
        let replicas = replicas_of(placement, world, n_experts)?;
        if experts.len() != placement.len() {
            return Err(proto_err(format!("{} MoE layers of weights for {} in the placement", experts.len(), placement.len())));
        }
        for (l, ranks) in placement.iter().enumerate() {
            if let Some(&e) = ranks[rank].iter().find(|&&e| experts[l].get(e).is_none_or(|w| w.is_none())) {
                return Err(proto_err(format!("rank {rank}: MoE layer {l}: expert {e} of the placement is not loaded")));
            }
        }
        let replicated = replicas.iter().map(|l| l.iter().any(|r| r.len() > 1)).collect();
        Ok(EpSlots { epoch, replicas, experts, replicated })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// `placement[moe_layer][rank]` → `[moe_layer][expert]` = ranks, every expert with a slot.
fn replicas_of(placement: &[Vec<Vec<usize>>], world: usize, n_experts: usize) -> Result<Vec<Vec<Vec<usize>>>> {
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
                if by[e].contains(&r) {
                    return Err(proto_err(format!("placement layer {l}: rank {r} holds expert {e} twice")));
                }
                by[e].push(r);
            }
        }
        if let Some(e) = by.iter().position(|v| v.is_empty()) {
            return Err(proto_err(format!("placement layer {l}: expert {e} has no slot")));
        }
        replicas.push(by);
    }
    Ok(replicas)
}

/// What [`EpExecutor::prepare`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    pub epoch: u64,
    /// Expert weights read from the checkpoint (slots this rank gains).
    pub loaded: usize,
    /// Expert weights kept from the current epoch.
    pub kept: usize,
}

/// Runs routed experts across ranks. One collective pair (dispatch, combine) per MoE layer call.
pub struct EpExecutor {
    rank: usize,
    world: usize,
    /// Group generation (membership) this executor's mesh belongs to.
    generation: u64,
    /// Shuts the mesh down from another thread (a regroup away from a dead or frozen peer).
    interrupt: Option<InterruptHandle>,
    n_experts: usize,
    node_of_rank: Vec<usize>,
    /// The epoch every forward uses; swapped only by the rank loop between steps.
    active: Mutex<Arc<EpSlots>>,
    /// The next epoch, loaded beside the active one.
    prepared: Mutex<Option<Arc<EpSlots>>>,
    /// The epoch the coordinator told this rank to switch to (0: none). Exchanged every step; the
    /// group switches at the first step where every rank reports it.
    committed: AtomicU64,
    transport: Mutex<Box<dyn Transport>>,
    pub timers: EpTimers,
    observer: Mutex<Option<AllToAllObserver>>,
    load_aware: AtomicBool,
    /// f64 bits of the capacity factor; 0: the capacity option is off.
    capacity_bits: AtomicU64,
    critical: Mutex<CriticalPath>,
    /// CPU time (µs) of background work in this process (loading a placement's experts), left
    /// out of the compute segments.
    background_cpu_us: AtomicU64,
    /// Hears every projected step length (metrics).
    projected_observer: Mutex<Option<Arc<dyn Fn(Duration) + Send + Sync>>>,
    /// Projected step times (µs) not yet taken ([`EpExecutor::take_projected_steps`]).
    projected_steps: RecentSteps<4096>,
    /// Where MoE outputs are combined; every rank of a group must set the same.
    data_path: Mutex<DataPath>,
    /// The affinity path's KV copies of group peers' sequences.
    follow: Mutex<datapath::FollowState>,
}

/// This rank's CPU time per compute segment of the current step: the work between consecutive
/// collectives (step header, dispatch, combine, load exchange). Every rank runs the same
/// sequence of collectives, so segment `i` of every rank is the same stretch of the step, and
/// the step on ranks with cores of their own would take `Σ_i max_rank segment_i` plus the
/// transfers. The step header carries the previous step's segments to every rank.
#[derive(Debug, Default)]
struct CriticalPath {
    /// Process CPU time (µs) at the end of the last collective, less background work.
    mark_us: u64,
    segments: Vec<u32>,
    /// Whether the step the segments belong to had work on some rank.
    busy: bool,
}

impl CriticalPath {
    /// End the running segment at compute CPU time `now_us`.
    fn close_segment(&mut self, now_us: u64) {
        self.segments.push(now_us.saturating_sub(self.mark_us).min(u32::MAX as u64) as u32);
    }
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
    /// `placement[moe_layer][rank]` lists the experts each rank holds (epoch 1); `experts` are this
    /// rank's weights (see [`Model::take_routed_experts`]); `node_of_rank` groups ranks into
    /// machines (replica choice prefers the own node).
    pub fn new(
        transport: Box<dyn Transport>,
        placement: &[Vec<Vec<usize>>],
        n_experts: usize,
        node_of_rank: Vec<usize>,
        experts: Vec<Vec<Option<ExpertFfn>>>,
    ) -> Result<Self> {
        let experts = experts.into_iter().map(|l| l.into_iter().map(|e| e.map(Arc::new)).collect()).collect();
        Self::with_weights(transport, placement, n_experts, node_of_rank, experts, 1, 0)
    }

    /// An executor of group generation `generation` starting at placement `epoch`, over weights
    /// that may be shared with the executor of the previous generation.
    pub fn with_weights(
        transport: Box<dyn Transport>,
        placement: &[Vec<Vec<usize>>],
        n_experts: usize,
        node_of_rank: Vec<usize>,
        experts: Vec<Vec<Option<Arc<ExpertFfn>>>>,
        epoch: u64,
        generation: u64,
    ) -> Result<Self> {
        let rank = transport.rank();
        let world = transport.world();
        let slots = EpSlots::new(epoch, placement, rank, world, n_experts, experts)?;
        let node_of_rank = if node_of_rank.len() == world { node_of_rank } else { vec![0; world] };
        let interrupt = transport.interrupt_handle();
        Ok(EpExecutor {
            rank,
            world,
            generation,
            interrupt,
            n_experts,
            node_of_rank,
            active: Mutex::new(Arc::new(slots)),
            prepared: Mutex::new(None),
            committed: AtomicU64::new(0),
            transport: Mutex::new(transport),
            timers: EpTimers::default(),
            observer: Mutex::new(None),
            load_aware: AtomicBool::new(false),
            capacity_bits: AtomicU64::new(0),
            critical: Mutex::new(CriticalPath::default()),
            background_cpu_us: AtomicU64::new(0),
            projected_observer: Mutex::new(None),
            projected_steps: RecentSteps::default(),
            data_path: Mutex::new(DataPath::Home),
            follow: Mutex::new(datapath::FollowState::default()),
        })
    }

    /// The group generation of this executor's mesh.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Make the collective in progress (and every later one) fail at once: the group is being
    /// rebuilt without some peer. No-op for transports that cannot be interrupted.
    pub fn interrupt(&self) {
        if let Some(h) = &self.interrupt {
            h.interrupt();
        }
    }

    /// This rank's expert weights of the active epoch (`[moe_layer][expert]`), shared: the next
    /// generation keeps them without a copy.
    pub fn expert_weights(&self) -> Vec<Vec<Option<Arc<ExpertFfn>>>> {
        self.slots().experts.clone()
    }

    /// Bytes of routed expert weights the active epoch holds on this rank.
    pub fn loaded_expert_bytes(&self) -> u64 {
        self.slots().experts.iter().flatten().flatten().map(|w| w.bytes() as u64).sum()
    }

    /// Whether load-aware replica choice is on, and the capacity factor (carried to the next
    /// generation's executor).
    pub fn options(&self) -> (bool, Option<f64>) {
        (self.load_aware.load(Ordering::Relaxed), self.capacity())
    }

    /// CPU time counter of background work (expert loading) on this rank (see `prepare`).
    pub fn background_cpu(&self) -> &AtomicU64 {
        &self.background_cpu_us
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }

    fn slots(&self) -> Arc<EpSlots> {
        match self.active.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The placement epoch forwards run with now.
    pub fn epoch(&self) -> u64 {
        self.slots().epoch
    }

    /// The prepared (loaded, not yet active) epoch, if any.
    pub fn prepared_epoch(&self) -> Option<u64> {
        self.prepared.lock().ok().and_then(|p| p.as_ref().map(|s| s.epoch))
    }

    /// Phase one of a placement change: build `epoch` for `placement` beside the active one,
    /// reading from the checkpoint in `dir` only the experts this rank gains. Serving goes on
    /// meanwhile (call it off the rank loop's thread).
    pub fn prepare(&self, epoch: u64, placement: &[Vec<Vec<usize>>], dir: &Path) -> Result<Prepared> {
        let cur = self.slots();
        if epoch <= cur.epoch {
            return Err(proto_err(format!("epoch {epoch} is not after the active epoch {}", cur.epoch)));
        }
        let c = self.committed.load(Ordering::SeqCst);
        if c > cur.epoch {
            return Err(proto_err(format!("epoch {c} is committed and not yet active; prepare after the switch")));
        }
        replicas_of(placement, self.world, self.n_experts)?;
        crate::failpoint::check("worker.prepare")?;
        crate::failpoint::check(&format!("worker.prepare.rank{}", self.rank))?;
        let mine = experts_of_rank(placement, self.rank);
        let a = assemble_experts(&cur.experts, &mine, self.n_experts, dir, &self.background_cpu_us)?;
        let (loaded, kept) = (a.loaded, a.kept);
        let next = EpSlots::new(epoch, placement, self.rank, self.world, self.n_experts, a.experts)?;
        let mut p = self.prepared.lock().map_err(|_| proto_err("prepared lock poisoned".into()))?;
        *p = Some(Arc::new(next));
        Ok(Prepared { epoch, loaded, kept })
    }

    /// Phase two: switch to the prepared `epoch` as soon as every rank has committed it.
    pub fn commit(&self, epoch: u64) -> Result<()> {
        if self.prepared_epoch() != Some(epoch) {
            return Err(proto_err(format!("epoch {epoch} is not prepared on rank {}", self.rank)));
        }
        self.committed.store(epoch, Ordering::SeqCst);
        Ok(())
    }

    /// Drop a prepared (or committed, not yet active) epoch. Safe while the group has not
    /// switched: a switch needs every rank to report the epoch, and this rank stops reporting it.
    pub fn abort(&self, epoch: u64) -> Result<bool> {
        let mut p = self.prepared.lock().map_err(|_| proto_err("prepared lock poisoned".into()))?;
        if self.epoch() >= epoch {
            return Err(proto_err(format!("epoch {epoch} is already active on rank {}", self.rank)));
        }
        let _ = self.committed.compare_exchange(epoch, 0, Ordering::SeqCst, Ordering::SeqCst);
        if p.as_ref().is_some_and(|s| s.epoch == epoch) {
            *p = None;
            return Ok(true);
        }
        Ok(false)
    }

    /// The step's all-to-all of every rank's "have work" flag and committed epoch. Returns whether
    /// any rank has work; switches to the committed epoch when every rank reports it (every rank
    /// sees the same reports, so all switch before the same step).
    pub fn exchange_step(&self, have_work: bool) -> Result<bool> {
        // Header: [have work u8][committed epoch u64][n u32][the previous step's n segments u32].
        let (prev_busy, segments) = {
            let now = self.compute_cpu_us();
            let mut c = self.critical.lock().map_err(|_| proto_err("critical-path lock poisoned".into()))?;
            c.close_segment(now);
            (c.busy, std::mem::take(&mut c.segments))
        };
        let mut msg = Vec::with_capacity(13 + 4 * segments.len());
        msg.push(have_work as u8);
        msg.extend_from_slice(&self.committed.load(Ordering::SeqCst).to_le_bytes());
        msg.extend_from_slice(&(segments.len() as u32).to_le_bytes());
        for s in &segments {
            msg.extend_from_slice(&s.to_le_bytes());
        }
        let recv = self.collective_after_segment(vec![msg; self.world])?;
        let mut any = false;
        let mut epochs = Vec::with_capacity(self.world);
        let mut peers_segments: Vec<Vec<u32>> = Vec::with_capacity(self.world);
        for (r, b) in recv.iter().enumerate() {
            let n = b.get(9..13).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize);
            let Some(n) = n.filter(|n| b.len() == 13 + 4 * n) else {
                return Err(proto_err(format!("rank {}: step header from rank {r} has {} bytes", self.rank, b.len())));
            };
            any |= b[0] != 0;
            epochs.push(u64::from_le_bytes(b[1..9].try_into().unwrap_or_default()));
            peers_segments.push(b[13..13 + 4 * n].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
        }
        if prev_busy {
            self.record_projected_step(&peers_segments);
        }
        if let Ok(mut c) = self.critical.lock() {
            c.busy = any;
        }
        let target = epochs[0];
        if target > self.epoch() && epochs.iter().all(|&e| e == target) {
            let next = self.prepared.lock().map_err(|_| proto_err("prepared lock poisoned".into()))?.take();
            match next {
                Some(n) if n.epoch == target => {
                    *self.active.lock().map_err(|_| proto_err("slots lock poisoned".into()))? = n;
                    tracing::info!(rank = self.rank, epoch = target, "switched placement epoch");
                }
                _ => return Err(proto_err(format!("rank {}: epoch {target} committed but not prepared", self.rank))),
            }
        }
        Ok(any)
    }

    /// Process CPU time less background work, µs.
    fn compute_cpu_us(&self) -> u64 {
        crate::kernels::process_cpu_time_us().saturating_sub(self.background_cpu_us.load(Ordering::Relaxed))
    }

    /// Close the current compute segment (called as a collective starts).
    fn end_segment(&self) {
        let now = self.compute_cpu_us();
        if let Ok(mut c) = self.critical.lock() {
            c.close_segment(now);
        }
    }

    /// An all-to-all that closes the compute segment before it and opens one after it: its own
    /// transfer and waiting are not compute.
    fn collective(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        self.end_segment();
        self.collective_after_segment(send)
    }

    /// An all-to-all whose preceding segment the caller closed; opens the next one.
    fn collective_after_segment(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let recv = {
            let mut t = self.transport.lock().map_err(|_| proto_err("transport lock poisoned".into()))?;
            t.all_to_all_v(send).map_err(ep_err)?
        };
        self.start_segment();
        Ok(recv)
    }

    /// Open the next compute segment (after a collective).
    fn start_segment(&self) {
        let now = self.compute_cpu_us();
        if let Ok(mut c) = self.critical.lock() {
            c.mark_us = now;
        }
    }

    /// The previous step's length on ranks with cores of their own: per segment the slowest
    /// rank's CPU time, over this worker's compute threads, summed (skipped unless every rank ran
    /// the same sequence of segments).
    fn record_projected_step(&self, peers: &[Vec<u32>]) {
        let n = peers.first().map_or(0, Vec::len);
        if n == 0 || peers.iter().any(|p| p.len() != n) {
            return;
        }
        let threads = rayon::current_num_threads().max(1) as u64;
        let cpu: u64 = (0..n).map(|i| peers.iter().map(|p| p[i] as u64).max().unwrap_or(0)).sum();
        let us = (cpu / threads).min(u32::MAX as u64) as u32;
        self.projected_steps.extend([us]);
        if let Some(o) = self.projected_observer.lock().ok().and_then(|o| o.clone()) {
            o(Duration::from_micros(us as u64));
        }
    }

    /// Hear every projected step length (see [`EpExecutor::take_projected_steps`]).
    pub fn set_projected_observer(&self, observer: Arc<dyn Fn(Duration) + Send + Sync>) {
        if let Ok(mut o) = self.projected_observer.lock() {
            *o = Some(observer);
        }
    }

    /// Busy steps' projected lengths (µs) since the last call: what each step would have taken
    /// had every rank its own cores (ranks sharing a machine's cores hide a straggler: while the
    /// others wait in a collective, the loaded rank gets their cores too).
    pub fn take_projected_steps(&self) -> Vec<u32> {
        self.projected_steps.take()
    }

    /// The data path every forward takes from the next step on (see [`DataPath`]); every rank of
    /// a group must set the same, between steps. Load-aware replica choice and the capacity
    /// option apply to the home path only.
    pub fn set_data_path(&self, path: DataPath) {
        if let Ok(mut p) = self.data_path.lock() {
            *p = path;
        }
    }

    pub fn data_path(&self) -> DataPath {
        *self.data_path.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Join a busy step without sequences of this rank: every MoE layer's collectives with zero
    /// tokens (home path), or a whole forward that may hold peers' tokens (affinity path).
    pub fn idle_forward(&self, model: &Model) -> Result<()> {
        if self.affinity_applies(model) {
            return self.forward_affinity(model, &mut [], crate::model::LogitsMode::Last).map(|_| ());
        }
        let empty = Routing::empty(model.config.router.top_k);
        for layer in model.moe_layers() {
            self.run(layer, &[], 0, &empty)?;
        }
        Ok(())
    }

    /// Replica choice without an exchange: this sender's assignments, per destination. Experts
    /// with one replica go where they must; the tokens of replicated experts (heaviest experts
    /// first) then go to the replica whose rank has received the fewest of this sender's
    /// assignments so far, the own rank (then node) preferred while within `slack` of the least.
    /// Why: when every sender evens out its own sends, what each rank receives is even too,
    /// up to what the replicas allow, in every step: the per-step sampling noise that a windowed
    /// placement cannot see is partly absorbed without the extra collective of load-aware replicas
    /// (which even out the sum itself).
    fn local_choice(&self, slots: &EpSlots, li: usize, routing: &Routing, t: usize) -> Vec<Vec<(usize, u32, f32)>> {
        let reps = &slots.replicas[li];
        let mut items: Vec<Vec<(usize, u32, f32)>> = vec![Vec::new(); self.world];
        let mut load = vec![0u64; self.world];
        let mut pending: Vec<Vec<(usize, u32, f32)>> = vec![Vec::new(); reps.len()];
        for tok in 0..t {
            for k in 0..routing.top_k {
                let e = routing.ids[tok * routing.top_k + k];
                let w = routing.weights[tok * routing.top_k + k];
                // Router ids are below the expert count, and the placement holds every expert.
                if let [only] = reps[e as usize][..] {
                    items[only].push((tok, e, w));
                    load[only] += 1;
                } else {
                    pending[e as usize].push((tok, e, w));
                }
            }
        }
        let slack = self.replica_slack(routing.ids.len() as u64);
        let mut multi: Vec<usize> = (0..reps.len()).filter(|&e| !pending[e].is_empty()).collect();
        multi.sort_by_key(|&e| (std::cmp::Reverse(pending[e].len()), e));
        for e in multi {
            let rs = &reps[e];
            for it in std::mem::take(&mut pending[e]) {
                let r = rs[self.pick_replica(rs, &load, self.rank, slack)];
                load[r] += 1;
                items[r].push(it);
            }
        }
        items
    }

    /// How far above the least loaded replica a preferred (own rank or node) one may be for
    /// `assignments` spread over the ranks: 1/20 of the mean per rank, at least 1.
    fn replica_slack(&self, assignments: u64) -> u64 {
        (assignments / (20 * self.world as u64).max(1)).max(1)
    }

    /// Index into `replicas` of the one to take the next token from `src`: the least loaded
    /// replica's rank (ties: lowest rank), except that `src`'s own rank, then a rank on its node,
    /// is preferred while within `slack` of the least loaded (tokens stay local when it costs
    /// little balance).
    fn pick_replica(&self, replicas: &[usize], load: &[u64], src: usize, slack: u64) -> usize {
        let least = replicas.iter().map(|&r| load[r]).min().unwrap_or(0);
        let near = |r: usize| load[r] <= least + slack;
        replicas
            .iter()
            .position(|&r| r == src && near(r))
            .or_else(|| replicas.iter().position(|&r| self.node_of_rank[r] == self.node_of_rank[src] && near(r)))
            .unwrap_or_else(|| (0..replicas.len()).min_by_key(|&j| (load[replicas[j]], replicas[j])).unwrap_or(0))
    }

    /// Every later dispatch/combine reports to `observer`.
    pub fn set_observer(&self, observer: AllToAllObserver) {
        if let Ok(mut o) = self.observer.lock() {
            *o = Some(observer);
        }
    }

    /// Load-aware replica choice for one layer of one step: every rank shares how many of its
    /// tokens chose each expert (one small all-to-all), then all compute the same split of each
    /// replicated expert's tokens over its replicas — heaviest experts first, each token to the
    /// replica whose rank is least loaded so far, the sender's own rank (then node) preferred
    /// while it is within `slack` tokens of the least loaded. Returns, for this rank, how many of
    /// its tokens of each expert go to each replica (`[expert][replica index]`).
    fn load_aware_plan(&self, slots: &EpSlots, li: usize, routing: &Routing) -> Result<Vec<Vec<u32>>> {
        let ne = self.n_experts;
        let mut mine = vec![0u32; ne];
        for &e in &routing.ids {
            if let Some(c) = mine.get_mut(e as usize) {
                *c += 1;
            }
        }
        let mut msg = Vec::with_capacity(ne * 4);
        for c in &mine {
            msg.extend_from_slice(&c.to_le_bytes());
        }
        let recv = self.collective(vec![msg; self.world])?;
        let mut counts = Vec::with_capacity(self.world); // counts[src][expert]
        for (src, b) in recv.iter().enumerate() {
            if b.len() != ne * 4 {
                return Err(proto_err(format!("rank {}: expert counts from rank {src} have {} bytes", self.rank, b.len())));
            }
            counts.push(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<u32>>());
        }
        let reps = &slots.replicas[li];
        let total = |e: usize| counts.iter().map(|c| c[e] as u64).sum::<u64>();
        // Load every rank gets for certain: experts with one replica.
        let mut load = vec![0u64; self.world];
        for (e, rs) in reps.iter().enumerate() {
            if rs.len() == 1 {
                load[rs[0]] += total(e);
            }
        }
        let slack = self.replica_slack((0..ne).map(total).sum());
        let mut multi: Vec<usize> = (0..ne).filter(|&e| reps[e].len() > 1).collect();
        multi.sort_by_key(|&e| (std::cmp::Reverse(total(e)), e));
        let mut plan = vec![Vec::new(); ne];
        for &e in &multi {
            let rs = &reps[e];
            for (src, c) in counts.iter().enumerate() {
                let mut quota = vec![0u32; rs.len()];
                for _ in 0..c[e] {
                    let j = self.pick_replica(rs, &load, src, slack);
                    load[rs[j]] += 1;
                    quota[j] += 1;
                }
                if src == self.rank {
                    plan[e] = quota;
                }
            }
        }
        Ok(plan)
    }

    /// The capacity factor, when the capacity option is on.
    fn capacity(&self) -> Option<f64> {
        let bits = self.capacity_bits.load(Ordering::Relaxed);
        (bits != 0).then(|| f64::from_bits(bits))
    }

    /// Capacity option (off by default): no rank receives more than `factor × mean` routed
    /// assignments per layer and step. Every sender keeps at most `ceil(factor × n / world)` of its
    /// `n` assignments per destination, which bounds what any rank receives by `factor` × the
    /// mean without a global exchange. Overflow (lowest router weights first) moves to another
    /// replica of the same expert with room; else to the token's next-best expert (after its
    /// top-k, best first, one it does not use yet) on a rank with room, weighted by the router's
    /// score for it; else it is dropped: that expert's contribution to the token is left out.
    pub fn set_capacity_factor(&self, factor: Option<f64>) {
        let bits = factor.filter(|f| f.is_finite() && *f > 0.0).map_or(0, f64::to_bits);
        self.capacity_bits.store(bits, Ordering::Relaxed);
    }

    fn cap_dispatch(&self, slots: &EpSlots, li: usize, items: &mut [Vec<(usize, u32, f32)>], routing: &Routing, factor: f64) {
        let n = routing.ids.len();
        let cap = ((factor * n as f64 / self.world as f64).ceil() as usize).max(1);
        let mut overflow = Vec::new();
        for its in items.iter_mut() {
            if its.len() > cap {
                // Keep the heaviest; the order inside a destination does not matter for outputs.
                its.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
                overflow.extend(its.drain(cap..));
            }
        }
        let (mut dropped, mut rerouted) = (0u64, 0u64);
        let room = |items: &[Vec<(usize, u32, f32)>], e: u32| {
            slots.replicas[li][e as usize].iter().copied().filter(|&r| items[r].len() < cap).min_by_key(|&r| (items[r].len(), r))
        };
        // Substitutes taken so far, per token (a token never uses one expert twice).
        let mut substitutes: HashMap<usize, Vec<u32>> = HashMap::new();
        let (k, m) = (routing.top_k, routing.alternates);
        for it in overflow {
            if let Some(r) = room(items, it.1) {
                items[r].push(it);
                continue;
            }
            let tok = it.0;
            let chosen = &routing.ids[tok * k..(tok + 1) * k];
            let used = substitutes.entry(tok).or_default();
            let next = (0..m).map(|j| tok * m + j).find_map(|a| {
                let e = routing.alt_ids[a];
                if chosen.contains(&e) || used.contains(&e) {
                    return None;
                }
                room(items, e).map(|r| (r, e, routing.alt_weights[a]))
            });
            match next {
                Some((r, e, w)) => {
                    used.push(e);
                    items[r].push((tok, e, w));
                    rerouted += 1;
                }
                None => dropped += 1,
            }
        }
        self.timers.dropped_rows.fetch_add(dropped, Ordering::Relaxed);
        self.timers.rerouted_rows.fetch_add(rerouted, Ordering::Relaxed);
    }

    /// Split the tokens of replicated experts by load across all ranks (see
    /// [`EpExecutor::load_aware_plan`]); every rank of a group must set the same.
    pub fn set_load_aware(&self, on: bool) {
        self.load_aware.store(on, Ordering::Relaxed);
    }

    /// Replica choice for one MoE layer's routing, the start of a layer in both protocols (host
    /// `run`, device `plan`): per destination rank the (token, expert, weight) rows to send, in
    /// send order (load-aware plans join their collective here; the capacity option drops or
    /// reroutes overflow). Counts the layer and its local and remote rows.
    fn dispatch_items(&self, slots: &EpSlots, li: usize, routing: &Routing, t: usize) -> Result<Vec<Vec<(usize, u32, f32)>>> {
        self.timers.moe_layer_calls.fetch_add(1, Ordering::Relaxed);
        let mut items: Vec<Vec<(usize, u32, f32)>> = vec![Vec::new(); self.world];
        if self.load_aware.load(Ordering::Relaxed) && slots.replicated[li] {
            let mut plan = self.load_aware_plan(slots, li, routing)?;
            for tok in 0..t {
                for k in 0..routing.top_k {
                    let e = routing.ids[tok * routing.top_k + k];
                    let w = routing.weights[tok * routing.top_k + k];
                    let reps = &slots.replicas[li][e as usize];
                    // The first replica with quota left (the plan covers every token of ours).
                    let j = plan[e as usize].iter().position(|&q| q > 0).unwrap_or(0);
                    if let Some(q) = plan[e as usize].get_mut(j) {
                        *q = q.saturating_sub(1);
                    }
                    items[reps[j]].push((tok, e, w));
                }
            }
        } else {
            items = self.local_choice(slots, li, routing, t);
        }
        if let Some(cf) = self.capacity() {
            self.cap_dispatch(slots, li, &mut items, routing, cf);
        }
        let remote: u64 = items.iter().enumerate().filter(|(r, _)| *r != self.rank).map(|(_, v)| v.len() as u64).sum();
        self.timers.remote_rows.fetch_add(remote, Ordering::Relaxed);
        self.timers.local_rows.fetch_add(items[self.rank].len() as u64, Ordering::Relaxed);
        Ok(items)
    }

    /// Whether forwards take the affinity path: it is set, and tokens have somewhere to go (a
    /// group of several ranks, a model with MoE layers).
    fn affinity_applies(&self, model: &Model) -> bool {
        matches!(self.data_path(), DataPath::Affinity { .. }) && self.world > 1 && model.moe_layers().next().is_some()
    }

    fn a2a(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let bytes: u64 = send.iter().enumerate().filter(|(r, _)| *r != self.rank).map(|(_, b)| b.len() as u64).sum();
        let t0 = Instant::now();
        let recv = self.collective(send)?;
        self.count_alltoall(bytes, t0);
        Ok(recv)
    }

    /// Counters and the observer of one data all-to-all that sent `bytes` to peers since `t0`.
    fn count_alltoall(&self, bytes: u64, t0: Instant) {
        self.timers.alltoall_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.timers.alltoalls.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = self.observer.lock().ok().and_then(|o| o.clone()) {
            o(t0.elapsed(), bytes);
        }
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
    /// Under the capacity option, as many next-best experts as the router chooses (top-k).
    fn routing_alternates(&self, layer: &MoeLayer) -> usize {
        if self.capacity().is_some() { layer.router.cfg.top_k } else { 0 }
    }

    fn forward_step(
        &self,
        model: &Model,
        seqs: &mut [crate::model::SeqInput],
        mode: crate::model::LogitsMode,
    ) -> Option<Result<crate::model::ForwardOutput>> {
        self.affinity_applies(model).then(|| self.forward_affinity(model, seqs, mode))
    }

    fn runs_whole_forward(&self, model: &Model) -> bool {
        self.affinity_applies(model)
    }

    /// Ranks of a larger group on device backends run their layers through [`DeviceDispatch`]
    /// (the home data path; the affinity one runs on CPU workers).
    fn device_dispatch(&self) -> Option<&dyn DeviceDispatch> {
        (self.world > 1 && !matches!(self.data_path(), DataPath::Affinity { .. })).then_some(self as &dyn DeviceDispatch)
    }

    /// A one-rank group without the capacity option runs every expert here, with no collective
    /// per layer: a device backend may run its layers itself, with this epoch's weights.
    fn local_experts(&self, layer: &MoeLayer) -> Option<crate::moe::LocalExpertSet> {
        if self.world != 1 || self.capacity().is_some() {
            return None;
        }
        // A one-rank placement gives the rank every expert.
        self.slots().experts.get(layer.moe_index).cloned().map(crate::moe::LocalExpertSet::Slots)
    }

    fn release_sequence(&self, cache: u64) {
        if let Ok(mut f) = self.follow.lock() {
            f.release(cache);
        }
    }

    fn run(&self, layer: &MoeLayer, x: &[f32], t: usize, routing: &Routing) -> Result<Vec<f32>> {
        let h = layer.hidden;
        let li = layer.moe_index;
        let slots = self.slots();
        if li >= slots.replicas.len() {
            return Err(proto_err(format!("MoE layer {li} is not in the placement")));
        }
        let started = Instant::now();
        // 1. Replica choice; per destination the (token, expert, weight) items in send order.
        let items = self.dispatch_items(&slots, li, routing, t)?;
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
                match slots.experts[li].get(*e as usize) {
                    Some(Some(w)) => Ok(w.forward(&xin, rows.len())),
                    _ => Err(ModelError::ExpertNotLoaded { layer: li, expert: *e as usize }),
                }
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

/// Step durations (µs) recorded and not yet taken, the last `CAP` of them (older ones are
/// dropped: whoever reads them reads often enough, or wants only the recent past).
#[derive(Debug, Default)]
pub struct RecentSteps<const CAP: usize>(Mutex<std::collections::VecDeque<u32>>);

impl<const CAP: usize> RecentSteps<CAP> {
    pub fn extend(&self, us: impl IntoIterator<Item = u32>) {
        if let Ok(mut q) = self.0.lock() {
            for x in us {
                if q.len() >= CAP {
                    q.pop_front();
                }
                q.push_back(x);
            }
        }
    }

    /// Everything recorded since the last call, oldest first.
    pub fn take(&self) -> Vec<u32> {
        self.0.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default()
    }
}

#[path = "expert_parallel_device.rs"]
mod device;

#[cfg(test)]
#[path = "expert_parallel_tests.rs"]
mod tests;
