//! Deterministic simulation of the control plane under faults, running the production code:
//! the leader's rules ([`election`](super::election), [`succession`](super::succession),
//! [`formation`](super::formation), [`health`](super::health), [`Group`](super::group::Group)),
//! the store records ([`record`](super::record): the generation record and the reservation, by
//! their production functions) and the request rules ([`router`](super::router)), over the
//! production embedded store ([`EmbeddedStore::simulated`]) whose leases expire on the simulated
//! clock.
//!
//! One seed fixes everything: a simulated clock (ms) and one event queue ordered by (time,
//! sequence number), no threads, no wall clock. The store's functions are `async`; over the
//! embedded store they never wait, so [`ready`] runs them to completion in place. The world: two
//! coordinators that campaign for the leader key under their lease and stop acting when they see
//! it lost (fail-stop); workers that die, freeze (a process pause: their lease lapses, what is
//! sent to them waits or is lost) and come back; new workers that join; messages delayed by
//! random amounts (so reordered) and some dropped; clients whose requests the leader routes and
//! retries. What the tokio server does with gRPC and timers around the rules is in [`coord`]
//! (its module doc lists what is the simulator's own), the worker-side rules in [`worker`].
//!
//! Invariants are checked after every event; a violation reports the seed, the event index and
//! the last events. Reproduce one seed with its trace:
//! `SWITCHYARD_SIM_SEED=N cargo test --release -p coordinator --lib control::sim -- --nocapture`.

mod coord;
mod worker;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use placement::Topology;
use placement::solver::contiguous;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::election::holds_leader_key;
use super::group::{Generation, GroupSettings, Serving};
use super::record::{self, GenerationRecord};
use crate::store::embedded::SimClock;
use crate::store::typed::decode;
use crate::store::{EmbeddedStore, LeaseId, StateStore};
use coord::{Coord, Role, coord_address};
use worker::Worker;

const LAYERS: usize = 2;
const EXPERTS: usize = 8;
const MIN_WORKERS: usize = 4;
const COORD_TTL: u64 = 2000;
const WORKER_TTL: u64 = 1500;
/// Faults and new requests stop here; then the cluster must settle.
const FAULT_END: u64 = 30_000;
/// Longest settling time after the faults (requests may wait `WAIT_FOR_SERVING` per attempt).
const SETTLE: u64 = 300_000;

/// Runs a store call to completion at once: over the embedded store nothing waits.
pub fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("a store call over the simulated embedded store waited"),
    }
}

/// Deliberate bugs, to show the invariant checks catch them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flags {
    /// The generation record write skips `supersedes` (writes whatever it holds).
    pub ignore_supersedes: bool,
    /// Leaders carry generations out without reserving their numbers first.
    pub skip_reservation: bool,
}

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    Coord(usize, u64),
    Worker(usize),
    Store,
}

#[derive(Debug, Clone)]
pub enum Msg {
    // To the store.
    KeepAlive { lease: LeaseId, sent_at: u64, from: To },
    // From the store.
    KeepAliveAck { lease: LeaseId, sent_at: u64, ok: bool },
    // Worker -> coordinator.
    Register { w: usize, previous: Option<String> },
    RegroupReply { w: usize, number: u64, ok: bool },
    HealthReply { w: usize, gnum: u64, epoch: u64 },
    PingReply { w: usize, gnum: u64, epoch: u64 },
    SeqDone { req: usize, attempt: usize },
    SeqFailed { req: usize, attempt: usize },
    // Coordinator -> worker.
    Registered { id: String },
    Regroup { c: usize, inc: u64, number: u64, epoch: u64, members: Vec<usize> },
    Health { c: usize, inc: u64 },
    Ping { c: usize, inc: u64 },
    StartSeq { req: usize, attempt: usize, gnum: u64 },
    // A placement epoch within a generation (two-phase).
    Prepare { c: usize, inc: u64, epoch: u64, gnum: u64 },
    Commit { c: usize, inc: u64, epoch: u64 },
    Abort { epoch: u64 },
    PrepareReply { w: usize, epoch: u64, ok: bool },
    CommitReply { w: usize, epoch: u64, ok: bool },
}

impl Msg {
    /// Request streams ride on connections that fail as a whole (handled by leases and
    /// generations); the rest are single RPCs that may be lost.
    fn droppable(&self) -> bool {
        !matches!(self, Msg::SeqDone { .. } | Msg::SeqFailed { .. } | Msg::StartSeq { .. })
    }
}

#[derive(Debug, Clone)]
pub enum Ev {
    CoordTick(usize, u64),
    CoordKeepAlive(usize, u64),
    CoordRestart(usize),
    ReqRetry { c: usize, inc: u64, req: usize, attempt: usize },
    WorkerTick(usize),
    WorkerStep(usize),
    /// A leader's record queue writes a generation record (`record::record_generation`).
    RecordWrite(Box<GenerationRecord>),
    Msg(To, Msg),
    Client,
    Fault,
}

/// A client request, as the coordinator that accepted it tracks it.
#[derive(Debug, Clone)]
pub struct Req {
    pub owner: (usize, u64),
    pub needed: u32,
    pub streamed: u32,
    pub attempt: usize,
    pub logits: bool,
    pub state: RState,
    /// Since when the current attempt waits for the cluster to serve.
    pub wait_since: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RState {
    Queued,
    Running { w: usize, gnum: u64 },
    Done,
    Failed,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub seeds: u64,
    pub events: u64,
    pub kills: u64,
    pub freezes: u64,
    pub coord_faults: u64,
    pub joins: u64,
    pub generations: u64,
    pub accepted: u64,
    pub completed: u64,
    pub retried: u64,
    pub failed: u64,
    pub leader_lost: u64,
    pub no_room: u64,
    pub record_writes: u64,
    pub epochs_active: u64,
    pub epochs_abandoned: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.events += o.events;
        self.kills += o.kills;
        self.freezes += o.freezes;
        self.coord_faults += o.coord_faults;
        self.joins += o.joins;
        self.generations += o.generations;
        self.accepted += o.accepted;
        self.completed += o.completed;
        self.retried += o.retried;
        self.failed += o.failed;
        self.leader_lost += o.leader_lost;
        self.no_room += o.no_room;
        self.record_writes += o.record_writes;
        self.epochs_active += o.epochs_active;
        self.epochs_abandoned += o.epochs_abandoned;
    }
}

pub struct World {
    pub now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    /// Events by slot (the heap holds indices, so events need no ordering).
    slots: Vec<Option<Ev>>,
    free: Vec<usize>,
    pub rng: StdRng,
    pub flags: Flags,
    pub clock: SimClock,
    pub store: EmbeddedStore,
    pub coords: Vec<Coord>,
    pub workers: Vec<Worker>,
    pub reqs: Vec<Req>,
    pub settings: GroupSettings,
    pub budget: usize,
    pub stats: Stats,
    /// Set by a handler that found a rule broken (checked after the event).
    pub violation: Option<String>,
    last_recorded: (u64, u64),
    /// Revision of the generation record when it was last checked.
    record_rev: i64,
    /// A record write ran since the last check (the only writer of the record).
    pub record_touched: bool,
    /// The ranks of every generation number any leader carried out.
    pub carried: std::collections::HashMap<u64, Vec<usize>>,
    trace: bool,
}

impl World {
    fn new(seed: u64, flags: Flags, trace: bool) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let budget = rng.random_range(2..=4);
        let min_replicas = rng.random_range(1..=2);
        let topo = Topology::uniform(MIN_WORKERS, 1).expect("topology");
        let initial = contiguous::solve(LAYERS, EXPERTS, &topo, EXPERTS / MIN_WORKERS).expect("initial placement");
        let settings = GroupSettings { min_workers: MIN_WORKERS, max_slots_per_rank: Some(budget), min_replicas, initial };
        let clock = SimClock::default();
        let mut w = World {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            rng,
            flags,
            clock: clock.clone(),
            store: EmbeddedStore::simulated("/sim", clock),
            coords: Vec::new(),
            workers: Vec::new(),
            reqs: Vec::new(),
            settings,
            budget,
            stats: Stats { seeds: 1, ..Stats::default() },
            violation: None,
            last_recorded: (0, 0),
            record_rev: 0,
            record_touched: false,
            carried: Default::default(),
            trace,
        };
        for c in 0..2 {
            let lease = ready(w.store.grant_lease(std::time::Duration::from_millis(COORD_TTL))).expect("a lease");
            w.coords.push(Coord::new(lease, COORD_TTL));
            let t = w.rng.random_range(0..200);
            w.at(t, Ev::CoordTick(c, 0));
            w.at(t + 1, Ev::CoordKeepAlive(c, 0));
        }
        let n = w.rng.random_range(4..=6);
        for _ in 0..n {
            w.spawn_worker();
        }
        let t = w.rng.random_range(300..1000);
        w.at(t, Ev::Client);
        let t = w.rng.random_range(2000..4000);
        w.at(t, Ev::Fault);
        w
    }

    pub fn at(&mut self, t: u64, ev: Ev) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some(ev);
                s
            }
            None => {
                self.slots.push(Some(ev));
                self.slots.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((t.max(self.now), self.seq, slot)));
    }

    pub fn after(&mut self, d: u64, ev: Ev) {
        self.at(self.now + d, ev);
    }

    /// Sends a message: delayed (mostly short, sometimes long), so reordered; some lost.
    pub fn send(&mut self, to: To, msg: Msg) {
        if msg.droppable() && self.rng.random_bool(0.03) {
            return;
        }
        let p: f64 = self.rng.random();
        let d = if p < 0.9 {
            self.rng.random_range(1..30)
        } else if p < 0.98 {
            self.rng.random_range(50..500)
        } else {
            self.rng.random_range(500..2500)
        };
        self.after(d, Ev::Msg(to, msg));
    }

    pub fn spawn_worker(&mut self) {
        let lease = ready(self.store.grant_lease(std::time::Duration::from_millis(WORKER_TTL))).expect("a lease");
        self.workers.push(Worker::new(lease));
        let w = self.workers.len() - 1;
        let t = self.rng.random_range(0..500);
        self.after(t, Ev::WorkerTick(w));
        self.after(t + 7, Ev::WorkerStep(w));
    }

    /// The coordinator that may act as leader now: its own view of its lease is valid, it is not
    /// paused, and it has taken the leader role.
    pub fn acting_leader(&self) -> Option<usize> {
        (0..self.coords.len()).find(|&c| self.is_acting(c))
    }

    fn is_acting(&self, c: usize) -> bool {
        let k = &self.coords[c];
        k.up && k.frozen_until <= self.now && k.deadline > self.now && !matches!(k.role, Role::Standby)
    }

    /// When the event's owner is paused: the time it resumes.
    fn paused_until(&self, ev: &Ev) -> Option<u64> {
        let until = match ev {
            Ev::CoordTick(c, _) | Ev::CoordKeepAlive(c, _) | Ev::ReqRetry { c, .. } | Ev::Msg(To::Coord(c, _), _) => self.coords[*c].frozen_until,
            Ev::WorkerTick(w) | Ev::WorkerStep(w) | Ev::Msg(To::Worker(w), _) => self.workers[*w].frozen_until,
            _ => 0,
        };
        (until > self.now).then_some(until)
    }

    fn dispatch(&mut self, ev: Ev) {
        if let Some(until) = self.paused_until(&ev) {
            // A paused process handles what reached it when it resumes; messages may be lost.
            if let Ev::Msg(_, m) = &ev
                && m.droppable()
                && self.rng.random_bool(0.3)
            {
                return;
            }
            let d = self.rng.random_range(0..20);
            self.at(until + d, ev);
            return;
        }
        match ev {
            Ev::CoordTick(c, inc) => self.coord_tick(c, inc),
            Ev::CoordKeepAlive(c, inc) => self.coord_keep_alive(c, inc),
            Ev::CoordRestart(c) => self.coord_restart(c),
            Ev::ReqRetry { c, inc, req, attempt } => self.req_retry(c, inc, req, attempt),
            Ev::WorkerTick(w) => self.worker_tick(w),
            Ev::WorkerStep(w) => self.worker_step(w),
            Ev::RecordWrite(rec) => self.record_write(&rec),
            Ev::Msg(To::Store, m) => self.store_msg(m),
            Ev::Msg(To::Coord(c, inc), m) => self.coord_msg(c, inc, m),
            Ev::Msg(To::Worker(w), m) => self.worker_msg(w, m),
            Ev::Client => self.client(),
            Ev::Fault => self.fault(),
        }
    }

    fn store_msg(&mut self, m: Msg) {
        if let Msg::KeepAlive { lease, sent_at, from } = m {
            let ok = ready(self.store.keep_alive_once(lease)).is_ok();
            self.send(from, Msg::KeepAliveAck { lease, sent_at, ok });
        }
    }

    fn client(&mut self) {
        if self.now >= FAULT_END {
            return;
        }
        if let Some(c) = self.acting_leader()
            && matches!(self.coords[c].role, Role::Leader(_))
        {
            let needed = self.rng.random_range(3..40);
            let logits = self.rng.random_bool(0.1);
            let inc = self.coords[c].inc;
            self.reqs.push(Req { owner: (c, inc), needed, streamed: 0, attempt: 0, logits, state: RState::Queued, wait_since: None });
            self.stats.accepted += 1;
            let r = self.reqs.len() - 1;
            self.try_dispatch(r);
        }
        let d = self.rng.random_range(50..400);
        self.after(d, Ev::Client);
    }

    fn fault(&mut self) {
        if self.now >= FAULT_END {
            return;
        }
        let p: f64 = self.rng.random();
        let live: Vec<usize> = (0..self.workers.len()).filter(|&w| !self.workers[w].dead).collect();
        if p < 0.12 && !live.is_empty() && self.stats.kills < 3 {
            let w = live[self.rng.random_range(0..live.len())];
            self.workers[w].dead = true;
            self.workers[w].dead_at = self.now;
            self.stats.kills += 1;
        } else if p < 0.42 && !live.is_empty() {
            let w = live[self.rng.random_range(0..live.len())];
            let d = self.rng.random_range(200..5000);
            self.workers[w].frozen_until = self.workers[w].frozen_until.max(self.now + d);
            self.stats.freezes += 1;
        } else if p < 0.57 && self.workers.len() < 10 {
            self.spawn_worker();
            self.stats.joins += 1;
        } else if p < 0.72 {
            let c = self.rng.random_range(0..self.coords.len());
            let d = self.rng.random_range(300..4000);
            self.coords[c].frozen_until = self.coords[c].frozen_until.max(self.now + d);
            self.stats.coord_faults += 1;
        } else if p < 0.80 {
            let c = self.rng.random_range(0..self.coords.len());
            if self.coords[c].up && self.coords[c].frozen_until <= self.now {
                self.fail_stop(c);
                self.stats.coord_faults += 1;
            }
        }
        let d = self.rng.random_range(400..2500);
        self.after(d, Ev::Fault);
    }

    /// Invariants that hold after every event.
    fn check(&mut self) -> Result<(), String> {
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        let acting: Vec<usize> = (0..self.coords.len()).filter(|&c| self.is_acting(c)).collect();
        if acting.len() > 1 {
            return Err(format!("coordinators {acting:?} act as leader at once"));
        }
        for &c in &acting {
            // The key lives under the holder's lease: the store drops it when the lease expires.
            let holds = ready(holds_leader_key(&self.store, &coord_address(c, self.coords[c].inc))).map_err(|e| e.to_string())?;
            if !holds {
                return Err(format!("coordinator {c} acts as leader without holding the leader key under a live lease"));
            }
        }
        let kv = if std::mem::take(&mut self.record_touched) { ready(self.store.get(record::GENERATION)).map_err(|e| e.to_string())? } else { None };
        if let Some(kv) = kv.filter(|kv| kv.mod_revision != self.record_rev) {
            self.record_rev = kv.mod_revision;
            let rec: GenerationRecord = decode(&kv).map_err(|e| format!("the generation record does not decode: {e}"))?;
            let (n, e) = (rec.number, rec.epoch);
            if n < self.last_recorded.0 || e < self.last_recorded.1 {
                return Err(format!("recorded generation went backwards: {:?} -> {:?}", self.last_recorded, (n, e)));
            }
            self.last_recorded = (n, e);
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            if w.gnum < w.max_gnum || w.epoch < w.max_epoch {
                return Err(format!("worker {i}'s generation or epoch went backwards: {:?} -> {:?}", (w.max_gnum, w.max_epoch), (w.gnum, w.epoch)));
            }
            w.max_gnum = w.gnum;
            w.max_epoch = w.epoch;
        }
        for &c in &acting {
            if let Role::Leader(lead) = &self.coords[c].role {
                if let Some(a) = lead.group.active() {
                    self.check_budget(a)?;
                    if lead.group.serving() == Serving::Yes {
                        covered(a, |id| lead.group.worker(id).is_some())?;
                    }
                }
                if let Some(p) = lead.group.pending() {
                    self.check_budget(p)?;
                }
            }
        }
        Ok(())
    }

    fn check_budget(&self, g: &Generation) -> Result<(), String> {
        let mut addrs: Vec<&str> = g.ranks.iter().map(|w| w.grpc.as_str()).collect();
        addrs.sort_unstable();
        if let Some(d) = addrs.windows(2).find(|p| p[0] == p[1]) {
            return Err(format!("generation {}: worker {} is two of its ranks", g.number, d[0]));
        }
        for (l, layer) in g.placement.layers.iter().enumerate() {
            if let Some(r) = layer.ranks.iter().position(|s| s.len() > self.budget) {
                return Err(format!("generation {}: layer {l} rank {r} holds {} slots, over the budget {}", g.number, layer.ranks[r].len(), self.budget));
            }
        }
        if g.placement.num_ranks() != g.world() || g.placement.layers.iter().any(|l| l.ranks.len() != g.world()) {
            return Err(format!("generation {}: placement is not over its {} ranks", g.number, g.world()));
        }
        Ok(())
    }

    /// Whether the run reached its end state: every request ended, and the cluster serves when
    /// the live workers can hold every expert.
    fn settled(&self) -> Result<(), String> {
        if let Some(r) = self.reqs.iter().position(|r| !matches!(r.state, RState::Done | RState::Failed)) {
            let ws: Vec<String> = self.workers.iter().enumerate().map(|(i, w)| format!("w{i}: dead {} gen {} members {:?} id {:?}", w.dead, w.gnum, w.members, w.membership.id())).collect();
            let gs: Vec<String> = self.coords.iter().map(|k| match &k.role { Role::Leader(l) => format!("{:?} active {:?} serving {:?}", l.group.pending().map(|p| p.number), l.group.active().map(|a| (a.number, a.ranks.iter().map(|w| w.grpc.clone()).collect::<Vec<_>>())), l.group.serving()), _ => "not leader".into() }).collect();
            return Err(format!("request {r} never ended: {:?}\n{}\n{}", self.reqs[r], ws.join("\n"), gs.join("\n")));
        }
        let live = self.workers.iter().filter(|w| !w.dead).count();
        let ever_formed = self.last_recorded.0 > 0;
        if live * self.budget < EXPERTS || (!ever_formed && live < MIN_WORKERS) {
            return Ok(());
        }
        let Some(c) = self.acting_leader() else { return Err("no leader".into()) };
        let Role::Leader(lead) = &self.coords[c].role else { return Err(format!("coordinator {c} is still adopting")) };
        let serving = lead.group.serving();
        let Some(a) = lead.group.active().filter(|_| serving == Serving::Yes && lead.group.pending().is_none()) else {
            return Err(format!("{live} live workers can hold every expert but the cluster does not serve: {serving:?}\ngroup: {:#?}", lead.group));
        };
        for wi in &a.ranks {
            let w = &self.workers[worker::index(wi)];
            if w.dead || w.gnum != a.number {
                return Err(format!("generation {} is active but worker {} is at {} (dead: {})", a.number, wi.grpc, w.gnum, w.dead));
            }
        }
        Ok(())
    }
}

/// Every expert of every layer has a slot on a rank that `live` accepts.
fn covered(g: &Generation, live: impl Fn(&str) -> bool) -> Result<(), String> {
    let all = (1u64 << g.placement.num_experts) - 1;
    for (l, layer) in g.placement.layers.iter().enumerate() {
        let mut mask = 0u64;
        for (r, slots) in layer.ranks.iter().enumerate() {
            if live(&g.ranks[r].id) {
                mask = slots.iter().fold(mask, |m, &e| m | (1 << e));
            }
        }
        if mask != all {
            return Err(format!("serving, but generation {} layer {l} has experts without a live slot (mask {mask:#x})", g.number));
        }
    }
    Ok(())
}

/// Runs one seed to its end; `Err` describes the first violation (with the seed, the event
/// index and the last events).
pub fn run_seed(seed: u64, flags: Flags, trace: bool) -> Result<Stats, String> {
    let mut w = World::new(seed, flags, trace);
    let mut recent: VecDeque<(u64, u64, Ev)> = VecDeque::with_capacity(31);
    let mut index = 0u64;
    let mut next_settle_check = FAULT_END + 5_000;
    let fail = |index: u64, why: String, recent: &VecDeque<(u64, u64, Ev)>| {
        let dump: Vec<String> = recent.iter().map(|(i, t, e)| format!("  #{i} t={t} {e:?}")).collect();
        format!("seed {seed}: event #{index}: {why}\nlast events:\n{}", dump.join("\n"))
    };
    while let Some(Reverse((t, _, slot))) = w.queue.pop() {
        let ev = w.slots[slot].take().expect("queued event");
        w.free.push(slot);
        w.now = t;
        w.clock.set_ms(t);
        index += 1;
        if w.trace {
            println!("#{index} t={t} {ev:?}");
        }
        if recent.len() == 30 {
            recent.pop_front();
        }
        recent.push_back((index, t, ev.clone()));
        w.dispatch(ev);
        if let Err(why) = w.check() {
            return Err(fail(index, why, &recent));
        }
        if t >= next_settle_check {
            next_settle_check = t + 1000;
            match w.settled() {
                Ok(()) => break,
                Err(why) if t >= FAULT_END + SETTLE => return Err(fail(index, format!("not settled: {why}"), &recent)),
                Err(_) => {}
            }
        }
    }
    w.stats.events = index;
    Ok(w.stats)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn thousand_seeds() {
    let start = std::time::Instant::now();
    let (seeds, trace): (Vec<u64>, bool) = match env_u64("SWITCHYARD_SIM_SEED") {
        Some(s) => (vec![s], true),
        None => ((0..env_u64("SWITCHYARD_SIM_SEEDS").unwrap_or(1000)).collect(), false),
    };
    let mut total = Stats::default();
    for &seed in &seeds {
        match run_seed(seed, Flags::default(), trace) {
            Ok(s) => total.add(&s),
            Err(e) => panic!("{e}\nreproduce: SWITCHYARD_SIM_SEED={seed} cargo test --release -p coordinator --lib control::sim -- --nocapture"),
        }
    }
    println!(
        "sim: {} seeds in {:.2?}: {} events, {} worker kills, {} worker freezes, {} coordinator faults, {} joins, {} generations formed, {} placement epochs active / {} abandoned, {} records written; requests {} accepted / {} completed / {} retried / {} failed terminal ({} with their leader); {} NoRoom episodes",
        total.seeds,
        start.elapsed(),
        total.events,
        total.kills,
        total.freezes,
        total.coord_faults,
        total.joins,
        total.generations,
        total.epochs_active,
        total.epochs_abandoned,
        total.record_writes,
        total.accepted,
        total.completed,
        total.retried,
        total.failed,
        total.leader_lost,
        total.no_room
    );
    assert!(total.generations > 0 && total.completed > 0 && total.epochs_active > 0);
}

/// The reservation is needed: leaders that carry generations out without reserving their numbers
/// reuse a number a predecessor handed to workers with other ranks, and some seed catches it.
#[test]
fn catches_leaders_that_skip_the_reservation() {
    let flags = Flags { skip_reservation: true, ..Flags::default() };
    let caught = (0..1000).find_map(|seed| run_seed(seed, flags, false).err());
    let e = caught.expect("no seed caught a reused generation number");
    assert!(e.contains("carried out twice"), "{e}");
    println!("caught: {}", e.lines().next().unwrap_or_default());
}

/// The checks are live: a record write that ignores `supersedes` lets the recorded generation go
/// backwards (a delayed write of an older generation lands after a newer one), and some seed
/// catches it.
#[test]
fn catches_a_record_write_that_ignores_supersedes() {
    let flags = Flags { ignore_supersedes: true, ..Flags::default() };
    let caught = (0..1000).find_map(|seed| run_seed(seed, flags, false).err());
    let e = caught.expect("no seed caught the broken record write");
    assert!(e.contains("recorded generation went backwards"), "{e}");
    println!("caught: {}", e.lines().next().unwrap_or_default());
}
