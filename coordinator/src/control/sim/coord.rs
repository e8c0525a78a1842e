//! The coordinator driver around [`Group`]: what the tokio coordinator does with it, at simulated
//! time. Election by CAS of the leader key under its lease (every 200 ms, as `cli/ha.rs`), fail-stop
//! when it sees its lease lost, adoption of the recorded generation with the workers that answer,
//! worker losses by lease expiry, generations carried out on the workers and recorded with
//! `supersedes`, and client requests routed with `least_outstanding` and retried with
//! `after_failure`.

use std::collections::BTreeMap;

use rand::Rng;

use super::worker::{address, index};
use super::{COORD_TTL, Ev, GENERATION_KEY, LEADER_KEY, RESERVED_KEY, Msg, RState, To, Val, WORKER_TTL, World};
use crate::control::group::{Generation, Group, Serving, WorkerId};
use crate::control::record::{GenerationRecord, supersedes};
use crate::control::router::{AttemptFailure, Next, WAIT_FOR_SERVING, after_failure, least_outstanding};

/// How long a new leader waits for the recorded ranks to answer before it adopts.
const ADOPT_WAIT: u64 = 400;
/// How long a generation's ranks have to accept it.
const REGROUP_WAIT: u64 = 1000;
const HEALTH_EVERY: u64 = 500;
/// A dead rank is noticed within its lease TTL after its last keep-alive lands (which may be
/// delayed up to 2.5 s), plus a tick.
const DETECTION_BOUND: u64 = WORKER_TTL + 2500 + 300;

pub struct Coord {
    pub inc: u64,
    pub up: bool,
    pub lease: u64,
    /// Its own view of its lease: the send time of the last acknowledged keep-alive plus the TTL
    /// (never later than the store's expiry).
    pub deadline: u64,
    pub frozen_until: u64,
    pub role: Role,
    next_campaign: u64,
}

impl Coord {
    pub fn new(lease: u64, ttl: u64) -> Self {
        Coord { inc: 0, up: true, lease, deadline: ttl, frozen_until: 0, role: Role::Standby, next_campaign: 0 }
    }
}

pub enum Role {
    Standby,
    Adopting(Box<Adopting>),
    Leader(Box<Lead>),
}

pub struct Adopting {
    until: u64,
    record: Generation,
    /// (worker, lease, generation, epoch) of the ranks that answered.
    answered: Vec<(usize, u64, u64, u64)>,
}

pub struct Lead {
    pub group: Group,
    /// Every member's lease.
    leases: BTreeMap<WorkerId, u64>,
    pend: Option<Pend>,
    next_health: u64,
    no_room: bool,
}

struct Pend {
    number: u64,
    until: u64,
    members: Vec<(WorkerId, usize)>,
    ok: Vec<usize>,
    answered: Vec<usize>,
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

    fn new_lead(&self) -> Lead {
        let mut group = Group::new(self.settings.clone()).expect("valid sim settings");
        if let (Some(&Val::Reserved(n, e)), _) = self.store.get(RESERVED_KEY) {
            group.observe_generation(n, e);
        }
        Lead { group, leases: BTreeMap::new(), pend: None, next_health: 0, no_room: false }
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
        let lease = self.store.grant(self.now, COORD_TTL);
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

    fn campaign(&mut self, c: usize) {
        let me = Val::Leader(c, self.coords[c].inc);
        let won = match self.store.get(LEADER_KEY) {
            (None, _) => self.store.cas(LEADER_KEY, 0, me, Some(self.coords[c].lease), self.now).is_ok(),
            (Some(v), _) => *v == me,
        };
        if !won {
            return;
        }
        let recorded = match self.store.get(GENERATION_KEY) {
            (Some(Val::Gen(rec)), _) => Some(rec.generation()),
            _ => None,
        };
        match recorded {
            None => self.coords[c].role = Role::Leader(Box::new(self.new_lead())),
            Some(Err(e)) => self.violation = Some(format!("the recorded generation does not parse: {e}")),
            Some(Ok(record)) => {
                let inc = self.coords[c].inc;
                for w in &record.ranks {
                    self.send(To::Worker(index(w)), Msg::Ping { c, inc });
                }
                let until = self.now + ADOPT_WAIT;
                self.coords[c].role = Role::Adopting(Box::new(Adopting { until, record, answered: Vec::new() }));
            }
        }
    }

    fn finish_adopt(&mut self, c: usize) {
        let Role::Adopting(a) = std::mem::replace(&mut self.coords[c].role, Role::Standby) else { return };
        let mut lead = self.new_lead();
        let alive: Vec<WorkerId> = a.record.ranks.iter().filter(|w| a.answered.iter().any(|x| x.0 == index(w))).map(|w| w.id.clone()).collect();
        for &(w, lease, gnum, epoch) in &a.answered {
            lead.group.observe_generation(gnum, epoch);
            if let Some(info) = a.record.ranks.iter().find(|i| index(i) == w) {
                lead.leases.insert(info.id.clone(), lease);
            }
        }
        lead.group.adopt(a.record, &alive);
        self.coords[c].role = Role::Leader(Box::new(lead));
    }

    fn leader_tick(&mut self, c: usize) {
        let inc = self.coords[c].inc;
        self.with_lead(c, |world, lead| {
            let now = world.now;
            let gone: Vec<WorkerId> =
                lead.leases.iter().filter(|(id, l)| lead.group.worker(id).is_some() && !world.store.lease_valid(**l, now)).map(|(id, _)| id.clone()).collect();
            for id in gone {
                world.lose_worker(c, lead, &id);
            }
            let group = &lead.group;
            lead.leases.retain(|id, _| group.worker(id).is_some());
            if lead.pend.as_ref().is_some_and(|p| p.answered.len() == p.members.len() || now >= p.until) {
                world.finish_pending(c, lead);
            }
            if lead.pend.is_none()
                && let Some(g) = lead.group.next_generation(None)
            {
                world.start_generation(c, inc, lead, g);
            }
            let serving = lead.group.serving();
            let no_room = matches!(serving, Serving::NoRoom { .. });
            if no_room && !lead.no_room {
                world.stats.no_room += 1;
            }
            lead.no_room = no_room;
            if now >= lead.next_health {
                lead.next_health = now + HEALTH_EVERY;
                for id in lead.leases.keys() {
                    let w = lead.group.worker(id).map(index).expect("members have leases");
                    world.send(To::Worker(w), Msg::Health { c, inc });
                }
            }
            if serving == Serving::Yes
                && let Some(a) = lead.group.active()
                && let Some(w) = a.ranks.iter().map(index).find(|&w| world.workers[w].dead && now - world.workers[w].dead_at > DETECTION_BOUND)
            {
                world.violation = Some(format!("leader {c} serves generation {} with worker {w} dead since {}", a.number, world.workers[w].dead_at));
            }
        });
    }

    fn lose_worker(&mut self, c: usize, lead: &mut Lead, id: &str) {
        let w = lead.group.worker(id).map(index);
        lead.leases.remove(id);
        if !lead.group.lose(id) {
            return;
        }
        // A lost rank breaks its generation's collectives: every request of it continues
        // elsewhere ("its group is being re-formed"); a spare only had its own.
        match lead.group.active().filter(|a| a.rank_of(id).is_some()) {
            Some(a) => {
                for w in a.ranks.iter().map(index).collect::<Vec<_>>() {
                    self.fail_requests_on(c, w);
                }
            }
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

    fn start_generation(&mut self, c: usize, inc: u64, lead: &mut Lead, g: Generation) {
        if g.number <= self.last_planned {
            self.violation = Some(format!("leader {c} planned generation {} after {} was planned", g.number, self.last_planned));
        }
        self.last_planned = self.last_planned.max(g.number);
        // Reserve the number first (a CAS on the revision read, never lowering it).
        let (v, rev) = self.store.get(RESERVED_KEY);
        let existing = match v {
            Some(&Val::Reserved(n, e)) => Some((n, e)),
            _ => None,
        };
        if supersedes(existing, (g.number, g.epoch)) && self.store.cas(RESERVED_KEY, rev, Val::Reserved(g.number, g.epoch), None, self.now).is_err() {
            self.violation = Some("the reservation CAS failed under a single writer".into());
        }
        let members: Vec<(WorkerId, usize)> = g.ranks.iter().map(|w| (w.id.clone(), index(w))).collect();
        let idx: Vec<usize> = members.iter().map(|m| m.1).collect();
        for &w in &idx {
            self.send(To::Worker(w), Msg::Regroup { c, inc, number: g.number, epoch: g.epoch, members: idx.clone() });
        }
        lead.pend = Some(Pend { number: g.number, until: self.now + REGROUP_WAIT, members, ok: Vec::new(), answered: Vec::new() });
    }

    fn finish_pending(&mut self, c: usize, lead: &mut Lead) {
        let Some(p) = lead.pend.take() else { return };
        let failed: Vec<(WorkerId, usize)> = p.members.iter().filter(|m| !p.ok.contains(&m.1)).cloned().collect();
        let ids: Vec<WorkerId> = failed.iter().map(|f| f.0.clone()).collect();
        let done = if ids.is_empty() { lead.group.regroup_finished(p.number) } else { lead.group.regroup_abandoned(p.number, &ids) };
        if let Err(e) = done {
            self.violation = Some(format!("the group refused the outcome of generation {}: {e}", p.number));
            return;
        }
        for (id, w) in failed {
            lead.leases.remove(&id);
            self.fail_requests_on(c, w);
        }
        if ids.is_empty() {
            self.stats.generations += 1;
            let g = lead.group.active().expect("just formed");
            self.record_attempt(c, Box::new(GenerationRecord::of(g, "sim-model", "sim")));
        }
    }

    /// One round of `record::record_generation`: read, and CAS on the revision read unless the
    /// store holds this or a later generation.
    fn record_attempt(&mut self, c: usize, rec: Box<GenerationRecord>) {
        let (v, rev) = self.store.get(GENERATION_KEY);
        let existing = match v {
            Some(Val::Gen(r)) => Some((r.number, r.epoch)),
            _ => None,
        };
        if self.flags.ignore_supersedes || supersedes(existing, (rec.number, rec.epoch)) {
            let inc = self.coords[c].inc;
            self.send(To::Store, Msg::WriteRecord { c, inc, rec, rev });
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
            // The write task runs on whatever the role (as `record_generation` does).
            Msg::RecordConflict { rec } => self.record_attempt(c, rec),
            Msg::PingReply { w, lease, gnum, epoch } => {
                if let Role::Adopting(a) = &mut self.coords[c].role
                    && !a.answered.iter().any(|x| x.0 == w)
                {
                    a.answered.push((w, lease, gnum, epoch));
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
                self.with_lead(c, |world, lead| world.leader_msg(c, inc, lead, m));
            }
        }
    }

    fn leader_msg(&mut self, c: usize, inc: u64, lead: &mut Lead, m: Msg) {
        match m {
            Msg::Register { w, lease } => {
                let addr = address(w);
                let known = lead.leases.keys().find(|id| lead.group.worker(id).is_some_and(|i| i.grpc == addr)).cloned();
                let id = known.unwrap_or_else(|| lead.group.register(addr, format!("tx{w}"), format!("node{w}")).id);
                lead.leases.insert(id, lease);
                self.send(To::Worker(w), Msg::Registered { c, inc });
            }
            Msg::RegroupReply { w, number, ok } => {
                if let Some(p) = lead.pend.as_mut()
                    && p.number == number
                    && p.members.iter().any(|m| m.1 == w)
                    && !p.answered.contains(&w)
                {
                    p.answered.push(w);
                    if ok {
                        p.ok.push(w);
                    }
                }
            }
            Msg::HealthReply { w, gnum, epoch } => {
                lead.group.observe_generation(gnum, epoch);
                // A rank that joined a later generation than the active one (an old leader's
                // delayed regroup) has left it: its collectives broke.
                let addr = address(w);
                let member = lead.leases.keys().find(|id| lead.group.worker(id).is_some_and(|i| i.grpc == addr)).cloned();
                if let Some(id) = member
                    && lead.group.active().is_some_and(|a| a.rank_of(&id).is_some() && gnum > a.number)
                    && lead.pend.as_ref().is_none_or(|p| p.number != gnum)
                {
                    self.lose_worker(c, lead, &id);
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
