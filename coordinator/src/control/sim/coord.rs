//! The simulated coordinator: the production leader rules over simulated messages and the
//! embedded store on the simulated clock. What it runs from production, unchanged:
//! [`campaign_round`] (election), [`succession::succeed`] (what a new leader takes over),
//! [`record::reserve_generation`] and [`record::record_generation`] (the store records),
//! [`Formation`] (a generation's outcome), [`EpochChange`] (a placement epoch's two phases), [`HealthWatch`] (which members count), [`Group`]
//! (membership and generations) and the router's rules. What is its own: the plumbing that the
//! tokio server does with gRPC and timers — sending messages, waiting `ADOPT_WAIT` for probes and
//! `REGROUP_WAIT` for regroup replies, polling health every `HEALTH_EVERY` — and the model of a
//! lost rank failing the requests of its generation.

use rand::Rng;

use super::worker::{address, index};
use super::{COORD_TTL, EXPERTS, Ev, FAULT_END, LAYERS, Msg, RState, To, WORKER_TTL, World, ready};
use crate::control::election::{Campaign, campaign_round};
use crate::control::epoch_change::{EpochChange, EpochFailure, Step, SwitchReport};
use crate::control::formation::{Formation, Formed, RegroupReply};
use crate::control::group::{Generation, Group, Serving, WorkerId, WorkerInfo};
use crate::control::health::{HealthReport, HealthWatch, Verdict};
use crate::control::record::{self, GenerationRecord, Recorded};
use crate::control::router::{AttemptFailure, Next, WAIT_FOR_SERVING, after_failure, least_outstanding};
use crate::control::succession::{self, RankProbe};
use crate::store::typed;
use crate::store::{LeaseId, StateStore, StoreError};

/// How long a new leader waits for the recorded ranks to answer before it adopts.
const ADOPT_WAIT: u64 = 400;
/// How long a generation's ranks have to accept it.
const REGROUP_WAIT: u64 = 1000;
const HEALTH_EVERY: u64 = 500;
/// A dead rank is noticed by its failed health polls (three rounds) or its lease (its TTL after
/// its last keep-alive lands, which may be delayed up to 2.5 s), plus a tick.
const DETECTION_BOUND: u64 = WORKER_TTL + 2500 + 300;

pub struct Coord {
    pub inc: u64,
    pub up: bool,
    pub lease: LeaseId,
    /// Its own view of its lease: the send time of the last acknowledged keep-alive plus the TTL
    /// (never later than the store's expiry).
    pub deadline: u64,
    pub frozen_until: u64,
    pub role: Role,
    next_campaign: u64,
}

impl Coord {
    pub fn new(lease: LeaseId, ttl: u64) -> Self {
        Coord { inc: 0, up: true, lease, deadline: ttl, frozen_until: 0, role: Role::Standby, next_campaign: 0 }
    }
}

/// The address coordinator `c` writes to the leader key in incarnation `inc`.
pub fn coord_address(c: usize, inc: u64) -> String {
    format!("sim://c{c}#{inc}")
}

/// The coordinator (index, incarnation) a leader key names.
pub fn parse_coord(addr: &str) -> Option<(usize, u64)> {
    let (c, inc) = addr.strip_prefix("sim://c")?.split_once('#')?;
    Some((c.parse().ok()?, inc.parse().ok()?))
}

pub enum Role {
    Standby,
    Adopting(Box<Adopting>),
    Leader(Box<Lead>),
}

pub struct Adopting {
    until: u64,
    record: Option<Generation>,
    probes: Vec<RankProbe>,
}

/// A placement epoch being carried out (`server::admin::apply_epoch`'s plumbing).
struct EpochRun {
    change: EpochChange,
    placement: placement::Placement,
    /// The ranks' workers, in rank order.
    ranks: Vec<usize>,
    phase: EpochPhase,
    /// This phase's answers by rank.
    answers: Vec<Option<Result<(), String>>>,
    /// Health reports by rank while switching.
    health: Vec<Option<SwitchReport>>,
    until: u64,
    deadline: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum EpochPhase {
    Prepare,
    Commit,
    Switch,
}

pub struct Lead {
    pub group: Group,
    epoch_run: Option<EpochRun>,
    health: HealthWatch,
    /// Members asked for their health in the last round that have not answered.
    awaiting: Vec<WorkerId>,
    forming: Option<(Formation, u64)>,
    next_health: u64,
    no_room: bool,
}

impl World {
    /// Runs `f` on coordinator `c`'s leader state, if it leads (`f` must not fail-stop `c`).
    fn with_lead<R>(&mut self, c: usize, f: impl FnOnce(&mut World, &mut Lead) -> R) -> Option<R> {
        let role = std::mem::replace(&mut self.coords[c].role, Role::Standby);
        let Role::Leader(mut lead) = role else {
            self.coords[c].role = role;
            return None;
        };
        let r = f(self, &mut lead);
        self.coords[c].role = Role::Leader(lead);
        Some(r)
    }

    /// The process exits (its lease is lost, or it crashed) and restarts later as a standby; the
    /// requests it accepted end with an error status (their clients' connections break).
    pub fn fail_stop(&mut self, c: usize) {
        let owner = (c, self.coords[c].inc);
        for r in self.reqs.iter_mut().filter(|r| r.owner == owner && !matches!(r.state, RState::Done | RState::Failed)) {
            r.state = RState::Failed;
            self.stats.failed += 1;
            self.stats.leader_lost += 1;
        }
        let k = &mut self.coords[c];
        k.inc += 1;
        k.up = false;
        k.role = Role::Standby;
        let d = self.rng.random_range(300..1500);
        self.after(d, Ev::CoordRestart(c));
    }

    pub fn coord_restart(&mut self, c: usize) {
        let lease = match ready(self.store.grant_lease(std::time::Duration::from_millis(COORD_TTL))) {
            Ok(l) => l,
            Err(e) => return self.violation = Some(format!("the store refused a lease: {e}")),
        };
        let k = &mut self.coords[c];
        k.up = true;
        k.lease = lease;
        k.deadline = self.now + COORD_TTL;
        k.next_campaign = self.now;
        let inc = k.inc;
        self.after(1, Ev::CoordTick(c, inc));
        self.after(2, Ev::CoordKeepAlive(c, inc));
    }

    pub fn coord_keep_alive(&mut self, c: usize, inc: u64) {
        let k = &self.coords[c];
        if !k.up || k.inc != inc {
            return;
        }
        let lease = k.lease;
        self.send(To::Store, Msg::KeepAlive { lease, sent_at: self.now, from: To::Coord(c, inc) });
        self.after(COORD_TTL / 3, Ev::CoordKeepAlive(c, inc));
    }

    /// `false` (after fail-stopping) when `c` finds its lease lost.
    fn lease_held(&mut self, c: usize) -> bool {
        if self.coords[c].deadline <= self.now {
            self.fail_stop(c);
            return false;
        }
        true
    }

    pub fn coord_tick(&mut self, c: usize, inc: u64) {
        let k = &self.coords[c];
        if !k.up || k.inc != inc {
            return;
        }
        self.after(100, Ev::CoordTick(c, inc));
        if !self.lease_held(c) {
            return;
        }
        match &self.coords[c].role {
            Role::Standby if self.now >= self.coords[c].next_campaign => {
                self.coords[c].next_campaign = self.now + 200;
                self.campaign(c);
            }
            Role::Adopting(a) if self.now >= a.until => self.finish_adopt(c),
            Role::Leader(_) => self.leader_tick(c),
            _ => {}
        }
    }

    /// One election round; on a win, the succession starts: probe the recorded ranks (as
    /// `server::generations::lead`), or take over at once when nothing is recorded.
    fn campaign(&mut self, c: usize) {
        let (lease, inc) = (self.coords[c].lease, self.coords[c].inc);
        match ready(campaign_round(&self.store, lease, &coord_address(c, inc))) {
            Ok(Campaign::Won) => {}
            Ok(Campaign::Standby(_)) => return,
            // As `Seat::campaign`: a lost lease ends the process.
            Err(StoreError::LeaseNotFound(_)) => return self.fail_stop(c),
            Err(e) => return self.violation = Some(format!("campaign: the embedded store failed: {e}")),
        }
        let recorded = match ready(record::recorded_generation(&self.store)) {
            Ok(r) => r,
            Err(e) => return self.violation = Some(format!("the recorded generation cannot be read: {e}")),
        };
        let Some(rec) = recorded else {
            self.coords[c].role = Role::Adopting(Box::new(Adopting { until: self.now, record: None, probes: Vec::new() }));
            return self.finish_adopt(c);
        };
        let record = match succession::usable_record(&rec, LAYERS, EXPERTS) {
            Ok(g) => g,
            Err(e) => return self.violation = Some(format!("{e}")),
        };
        for w in &record.ranks {
            self.send(To::Worker(index(w)), Msg::Ping { c, inc });
        }
        let probes = record.ranks.iter().map(|w| RankProbe { id: w.id.clone(), answered: None }).collect();
        let until = self.now + ADOPT_WAIT;
        self.coords[c].role = Role::Adopting(Box::new(Adopting { until, record: Some(record), probes }));
    }

    fn finish_adopt(&mut self, c: usize) {
        let Role::Adopting(a) = std::mem::replace(&mut self.coords[c].role, Role::Standby) else { return };
        let mut group = Group::new(self.settings.clone()).expect("valid sim settings");
        let members = match ready(typed::list_members(&self.store)) {
            Ok((m, _)) => m.into_iter().map(|m| WorkerInfo { id: m.id, grpc: m.addr, transport: m.transport_addr, node: m.node, gpus: m.gpus }),
            Err(e) => return self.violation = Some(format!("members cannot be listed: {e}")),
        };
        let reserved = match ready(record::reserved_generation(&self.store)) {
            Ok(r) => r,
            Err(e) => return self.violation = Some(format!("the reservation cannot be read: {e}")),
        };
        succession::succeed(&mut group, a.record, &a.probes, members, reserved);
        let lead = Lead { group, epoch_run: None, health: HealthWatch::default(), awaiting: Vec::new(), forming: None, next_health: 0, no_room: false };
        self.coords[c].role = Role::Leader(Box::new(lead));
    }

    fn leader_tick(&mut self, c: usize) {
        let inc = self.coords[c].inc;
        self.with_lead(c, |world, lead| {
            let now = world.now;
            // Membership leases, as the production leader lists them every poll.
            let listed: Vec<WorkerId> = match ready(typed::list_members(&world.store)) {
                Ok((m, _)) => m.into_iter().map(|m| m.id).collect(),
                Err(e) => return world.violation = Some(format!("members cannot be listed: {e}")),
            };
            for id in lead.health.lapsed(&lead.group, &listed) {
                world.lose_worker(c, lead, &id);
            }
            if lead.forming.as_ref().is_some_and(|(f, until)| f.decided() || now >= *until) {
                world.finish_forming(c, lead);
            }
            if lead.epoch_run.is_some() {
                world.epoch_tick(c, inc, lead);
            }
            // Generations and placement epochs change one at a time (the server's apply lock).
            if lead.forming.is_none()
                && lead.epoch_run.is_none()
                && let Some(g) = lead.group.next_generation(None)
            {
                world.start_generation(c, inc, lead, g);
            }
            if lead.forming.is_none() && lead.epoch_run.is_none() && now < FAULT_END && lead.group.serving() == Serving::Yes && world.rng.random_bool(0.03) {
                world.start_epoch(c, inc, lead);
            }
            let serving = lead.group.serving();
            let no_room = matches!(serving, Serving::NoRoom { .. });
            if no_room && !lead.no_room {
                world.stats.no_room += 1;
            }
            lead.no_room = no_room;
            if now >= lead.next_health {
                lead.next_health = now + HEALTH_EVERY;
                world.health_round(c, inc, lead);
            }
            if serving == Serving::Yes
                && let Some(a) = lead.group.active()
                && let Some(w) = a.ranks.iter().map(index).find(|&w| world.workers[w].dead && now - world.workers[w].dead_at > DETECTION_BOUND)
            {
                world.violation = Some(format!("leader {c} serves generation {} with worker {w} dead since {}", a.number, world.workers[w].dead_at));
            }
        });
    }

    /// A new placement epoch of the active generation: its layer 0 with the ranks' slots
    /// rotated (the content does not matter to the control logic; coverage and budget hold).
    fn start_epoch(&mut self, c: usize, inc: u64, lead: &mut Lead) {
        let Some(change) = EpochChange::start(&lead.group) else { return };
        let Some(a) = lead.group.active() else { return };
        let mut placement = a.placement.clone();
        placement.layers[0].ranks.rotate_left(1);
        let ranks: Vec<usize> = a.ranks.iter().map(index).collect();
        let (epoch, gnum) = (change.epoch(), change.generation());
        for &w in &ranks {
            self.send(To::Worker(w), Msg::Prepare { c, inc, epoch, gnum });
        }
        let n = ranks.len();
        lead.epoch_run = Some(EpochRun { change, placement, ranks, phase: EpochPhase::Prepare, answers: vec![None; n], health: vec![None; n], until: self.now + REGROUP_WAIT, deadline: self.now + 4 * REGROUP_WAIT });
    }

    /// Moves the epoch change on when its phase has every answer (a missing one, after the wait,
    /// counts as failed, as the server's RPC timeouts).
    fn epoch_tick(&mut self, c: usize, inc: u64, lead: &mut Lead) {
        let Some(mut run) = lead.epoch_run.take() else { return };
        let now = self.now;
        let complete = match run.phase {
            EpochPhase::Prepare | EpochPhase::Commit => run.answers.iter().all(Option::is_some),
            EpochPhase::Switch => run.health.iter().all(Option::is_some),
        };
        if !complete && now < run.until {
            lead.epoch_run = Some(run);
            return;
        }
        let answers: Vec<Result<(), String>> = run.answers.iter().map(|a| a.clone().unwrap_or_else(|| Err("no answer".into()))).collect();
        let step = match run.phase {
            EpochPhase::Prepare => run.change.prepared(&answers),
            EpochPhase::Commit => run.change.committed(&answers),
            EpochPhase::Switch => {
                let reports: Vec<SwitchReport> = run.health.iter().map(|h| h.clone().unwrap_or_else(|| Err("no answer".into()))).collect();
                match run.change.switched(&reports) {
                    Step::Poll if now >= run.deadline => Step::Abort(EpochFailure::LostWorker("not active in time".into())),
                    s => s,
                }
            }
        };
        let epoch = run.change.epoch();
        match step {
            Step::Commit => {
                for &w in &run.ranks {
                    self.send(To::Worker(w), Msg::Commit { c, inc, epoch });
                }
                run.phase = EpochPhase::Commit;
            }
            Step::Poll => {
                for &w in &run.ranks {
                    self.send(To::Worker(w), Msg::Health { c, inc });
                }
                run.phase = EpochPhase::Switch;
            }
            Step::Active => {
                match lead.group.epoch_committed(epoch, run.placement) {
                    Ok(()) => {
                        self.stats.epochs_active += 1;
                        let g = lead.group.active().expect("active");
                        let rec = Box::new(GenerationRecord::of(g, "sim-model", "sim"));
                        let d = self.rng.random_range(1..30);
                        self.after(d, Ev::RecordWrite(rec));
                    }
                    Err(e) => self.violation = Some(format!("the group refused placement epoch {epoch}: {e}")),
                }
                return;
            }
            Step::Abort(why) => {
                self.stats.epochs_abandoned += 1;
                if matches!(why, EpochFailure::Prepare(_) | EpochFailure::Commit(_)) {
                    for &w in &run.ranks {
                        self.send(To::Worker(w), Msg::Abort { epoch });
                    }
                }
                return;
            }
        }
        let n = run.ranks.len();
        run.answers = vec![None; n];
        run.health = vec![None; n];
        run.until = now + REGROUP_WAIT;
        lead.epoch_run = Some(run);
    }

    /// A poll round: members that did not answer the last one count a failed check (as the
    /// production poll's 1 s timeout), then every member is asked again.
    fn health_round(&mut self, c: usize, inc: u64, lead: &mut Lead) {
        for id in std::mem::take(&mut lead.awaiting) {
            if lead.group.worker(&id).is_none() {
                continue;
            }
            if let Verdict::Lost(_) = lead.health.observe(&mut lead.group, &id, None) {
                self.lose_worker(c, lead, &id);
            }
        }
        for w in lead.group.members() {
            self.send(To::Worker(index(&w)), Msg::Health { c, inc });
            lead.awaiting.push(w.id);
        }
    }

    fn lose_worker(&mut self, c: usize, lead: &mut Lead, id: &str) {
        let w = lead.group.worker(id).map(index);
        lead.health.forget(id);
        // A lost rank breaks its generation's collectives: every request of it continues
        // elsewhere ("its group is being re-formed"); a spare only had its own.
        let ranks: Option<Vec<usize>> = lead.group.active().filter(|a| a.rank_of(id).is_some()).map(|a| a.ranks.iter().map(index).collect());
        if !lead.group.lose(id) {
            return;
        }
        match ranks {
            Some(ranks) => ranks.into_iter().for_each(|w| self.fail_requests_on(c, w)),
            None => w.into_iter().for_each(|w| self.fail_requests_on(c, w)),
        }
    }

    fn fail_requests_on(&mut self, c: usize, w: usize) {
        let owner = (c, self.coords[c].inc);
        let hit: Vec<usize> = (0..self.reqs.len()).filter(|&r| self.reqs[r].owner == owner && matches!(self.reqs[r].state, RState::Running { w: x, .. } if x == w)).collect();
        for r in hit {
            self.attempt_failed(r, AttemptFailure::RankFailed);
        }
    }

    /// As `server::generations::form`: reserve the number, then ask every rank to join.
    fn start_generation(&mut self, c: usize, inc: u64, lead: &mut Lead, g: Generation) {
        let reserved = if self.flags.skip_reservation { Ok(Recorded::Written) } else { ready(record::reserve_generation(&self.store, g.number, g.epoch)) };
        match reserved {
            Ok(Recorded::Written) => {}
            Ok(Recorded::Superseded { number, epoch }) => {
                lead.group.observe_generation(number, epoch);
                let _ = lead.group.regroup_abandoned(g.number, &[]);
                return;
            }
            Err(e) => return self.violation = Some(format!("the reservation failed: {e}")),
        }
        let idx: Vec<usize> = g.ranks.iter().map(index).collect();
        match self.carried.get(&g.number) {
            Some(before) if *before != idx => {
                self.violation = Some(format!("generation {} carried out twice: with workers {before:?}, now by leader {c} with {idx:?}", g.number));
            }
            _ => {
                self.carried.insert(g.number, idx.clone());
            }
        }
        for &w in &idx {
            self.send(To::Worker(w), Msg::Regroup { c, inc, number: g.number, epoch: g.epoch, members: idx.clone() });
        }
        lead.forming = Some((Formation::new(&g), self.now + REGROUP_WAIT));
    }

    fn finish_forming(&mut self, c: usize, lead: &mut Lead) {
        let Some((formation, _)) = lead.forming.take() else { return };
        let number = formation.number();
        let lost_workers: Vec<(WorkerId, usize)> = lead.group.pending().map(|p| p.ranks.iter().map(|w| (w.id.clone(), index(w))).collect()).unwrap_or_default();
        match formation.finish(&mut lead.group) {
            Err(e) => self.violation = Some(format!("the group refused the outcome of generation {number}: {e}")),
            Ok(Formed::Abandoned { lost }) => {
                for (id, w) in lost_workers.into_iter().filter(|(id, _)| lost.contains(id)) {
                    lead.health.forget(&id);
                    self.fail_requests_on(c, w);
                }
            }
            Ok(Formed::Serving { .. }) => {
                self.stats.generations += 1;
                let g = lead.group.active().expect("just formed");
                let rec = Box::new(GenerationRecord::of(g, "sim-model", "sim"));
                // The record queue writes it in the background: usually soon, sometimes late.
                let d = if self.rng.random_bool(0.1) { self.rng.random_range(300..3000) } else { self.rng.random_range(1..30) };
                self.after(d, Ev::RecordWrite(rec));
            }
        }
    }

    /// The record queue's write (`record::record_generation`), whatever the writer's role now.
    pub fn record_write(&mut self, rec: &GenerationRecord) {
        let rule = if self.flags.ignore_supersedes { |_: Option<(u64, u64)>, _: (u64, u64)| true } else { record::supersedes };
        self.record_touched = true;
        match ready(record::record_generation_with(&self.store, rec, rule)) {
            Ok(Recorded::Written) => self.stats.record_writes += 1,
            Ok(Recorded::Superseded { .. }) => {}
            Err(e) => self.violation = Some(format!("the record write failed: {e}")),
        }
    }

    pub fn coord_msg(&mut self, c: usize, inc: u64, m: Msg) {
        let k = &self.coords[c];
        if !k.up || k.inc != inc {
            return;
        }
        if !matches!(k.role, Role::Standby) && !self.lease_held(c) {
            return;
        }
        match m {
            Msg::KeepAliveAck { lease, sent_at, ok } if lease == self.coords[c].lease => {
                if ok {
                    let k = &mut self.coords[c];
                    k.deadline = k.deadline.max(sent_at + COORD_TTL);
                } else {
                    self.fail_stop(c);
                }
            }
            Msg::PingReply { w, gnum, epoch } => {
                if let Role::Adopting(a) = &mut self.coords[c].role
                    && let Some(rank) = a.record.as_ref().and_then(|g| g.ranks.iter().find(|r| index(r) == w))
                    && let Some(p) = a.probes.iter_mut().find(|p| p.id == rank.id)
                {
                    p.answered = Some((gnum, epoch));
                }
            }
            Msg::SeqDone { req, attempt } => {
                let r = &mut self.reqs[req];
                if r.owner == (c, inc) && r.attempt == attempt && matches!(r.state, RState::Running { .. }) {
                    r.state = RState::Done;
                    self.stats.completed += 1;
                }
            }
            Msg::SeqFailed { req, attempt } => {
                let r = &self.reqs[req];
                if r.owner == (c, inc) && r.attempt == attempt && matches!(r.state, RState::Running { .. }) {
                    self.attempt_failed(req, AttemptFailure::RankFailed);
                }
            }
            m => {
                self.with_lead(c, |world, lead| world.leader_msg(c, lead, m));
            }
        }
    }

    /// The member that worker `w` is in `lead`'s group (by its address).
    fn member_of(lead: &Lead, w: usize) -> Option<WorkerId> {
        let addr = address(w);
        lead.group.members().into_iter().find(|i| i.grpc == addr).map(|i| i.id)
    }

    fn leader_msg(&mut self, c: usize, lead: &mut Lead, m: Msg) {
        match m {
            Msg::Register { w, previous } => {
                // As the Control service's `register`.
                let id = lead.group.register(address(w), format!("tx{w}"), format!("node{w}"), 0, previous.as_deref()).id;
                self.send(To::Worker(w), Msg::Registered { id });
            }
            Msg::RegroupReply { w, number, ok } => {
                if let Some((f, _)) = lead.forming.as_mut()
                    && f.number() == number
                    && let Some(id) = lead.group.pending().and_then(|p| p.ranks.iter().find(|r| index(r) == w)).map(|r| r.id.clone())
                {
                    f.reply(&id, if ok { RegroupReply::Joined { loaded_experts: 0, kept_sequences: 0 } } else { RegroupReply::Superseded });
                }
            }
            Msg::PrepareReply { w, epoch, ok } | Msg::CommitReply { w, epoch, ok } => {
                if let Some(run) = lead.epoch_run.as_mut()
                    && run.change.epoch() == epoch
                    && let Some(r) = run.ranks.iter().position(|&x| x == w)
                {
                    run.answers[r] = Some(if ok { Ok(()) } else { Err(format!("worker {w} refused")) });
                }
            }
            Msg::HealthReply { w, gnum, epoch } => {
                if let Some(run) = lead.epoch_run.as_mut()
                    && run.phase == EpochPhase::Switch
                    && let Some(r) = run.ranks.iter().position(|&x| x == w)
                {
                    run.health[r] = Some(Ok((gnum, epoch)));
                }
                let Some(id) = Self::member_of(lead, w) else { return };
                lead.awaiting.retain(|a| *a != id);
                let report = HealthReport { generation: gnum, newest_generation: gnum, epoch, paused: false };
                match lead.health.observe(&mut lead.group, &id, Some(report)) {
                    Verdict::Reform => {
                        lead.group.reform();
                    }
                    Verdict::Lost(_) => self.lose_worker(c, lead, &id),
                    Verdict::Healthy | Verdict::Silent => {}
                }
            }
            _ => {}
        }
    }

    pub fn try_dispatch(&mut self, r: usize) {
        let (c, inc) = self.reqs[r].owner;
        if self.coords[c].inc != inc {
            return;
        }
        let pick = self.with_lead(c, |world, lead| {
            let gnum = lead.group.active().map_or(0, |a| a.number);
            let ranks: Vec<(usize, usize)> = lead.group.routable().into_iter().map(|(rank, i)| (rank, index(i))).collect();
            let outstanding = |w: usize| -> u64 {
                world.reqs.iter().filter(|q| q.owner == (c, inc) && matches!(q.state, RState::Running { w: x, .. } if x == w)).map(|q| u64::from(q.needed - q.streamed)).sum()
            };
            let rank = least_outstanding(ranks.iter().map(|&(rank, w)| (rank, outstanding(w))))?;
            let w = ranks.iter().find(|x| x.0 == rank).map(|x| x.1)?;
            Some((w, gnum))
        });
        match pick.flatten() {
            Some((w, gnum)) => {
                let req = &mut self.reqs[r];
                req.state = RState::Running { w, gnum };
                req.wait_since = None;
                let attempt = req.attempt;
                self.send(To::Worker(w), Msg::StartSeq { req: r, attempt, gnum });
            }
            None => {
                // Not serving: wait for it (up to WAIT_FOR_SERVING), then the attempt fails.
                let since = *self.reqs[r].wait_since.get_or_insert(self.now);
                if self.now - since >= WAIT_FOR_SERVING.as_millis() as u64 {
                    self.attempt_failed(r, AttemptFailure::NotServing);
                } else {
                    let attempt = self.reqs[r].attempt;
                    self.after(100, Ev::ReqRetry { c, inc, req: r, attempt });
                }
            }
        }
    }

    pub fn req_retry(&mut self, c: usize, inc: u64, r: usize, attempt: usize) {
        let q = &self.reqs[r];
        if q.owner != (c, inc) || q.attempt != attempt || q.state != RState::Queued || self.coords[c].inc != inc {
            return;
        }
        if !self.lease_held(c) {
            return;
        }
        self.try_dispatch(r);
    }

    /// The retry rule of the router, for an attempt that ended without the request finishing.
    pub fn attempt_failed(&mut self, r: usize, failure: AttemptFailure) {
        let q = &mut self.reqs[r];
        match after_failure(q.attempt, failure, q.streamed as usize, q.logits) {
            Next::Retry(d) => {
                q.attempt += 1;
                q.state = RState::Queued;
                q.wait_since = None;
                self.stats.retried += 1;
                let (c, inc, attempt) = (q.owner.0, q.owner.1, q.attempt);
                self.after(d.as_millis() as u64, Ev::ReqRetry { c, inc, req: r, attempt });
            }
            Next::Fail => {
                q.state = RState::Failed;
                self.stats.failed += 1;
            }
        }
    }
}
