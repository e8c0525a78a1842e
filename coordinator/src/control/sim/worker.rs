//! Worker-side rules: a lease kept alive in the store; registration with whoever holds the leader
//! key, then the membership key under that lease, and registration again after a silence or a
//! lapsed lease, by the production rules ([`Membership`], as `switchyard worker` runs them); a
//! generation accepted only above its own, steps only when every rank of its generation has
//! joined it, and sequences that fail back to their coordinator when the generation changes.

use super::coord::parse_coord;
use super::{Ev, Msg, RState, To, WORKER_TTL, World, ready};
use crate::control::group::WorkerInfo;
use crate::control::membership::Membership;
use crate::store::typed::{self, LEADER, Member};
use crate::store::{LeaseId, StateStore};

/// Worker `w`'s gRPC address in the simulation.
pub fn address(w: usize) -> String {
    format!("sim://w{w}")
}

/// The simulated worker behind a group member.
pub fn index(info: &WorkerInfo) -> usize {
    info.grpc.strip_prefix("sim://w").and_then(|n| n.parse().ok()).expect("a simulated worker address")
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub dead: bool,
    pub dead_at: u64,
    pub frozen_until: u64,
    pub lease: LeaseId,
    pub membership: Membership,
    /// The generation it joined, its epoch and its ranks (simulated worker indices).
    pub gnum: u64,
    pub epoch: u64,
    pub members: Vec<usize>,
    /// A placement epoch prepared and not yet committed, and one committed and not yet switched to.
    pub prepared: Option<u64>,
    pub committed: Option<u64>,
    /// Highest generation and epoch seen by the invariant check.
    pub max_gnum: u64,
    pub max_epoch: u64,
    /// Sequences it runs: (request, attempt).
    pub seqs: Vec<(usize, usize)>,
}

impl Worker {
    pub fn new(lease: LeaseId) -> Self {
        Worker {
            dead: false,
            dead_at: 0,
            frozen_until: 0,
            lease,
            membership: Membership::new(HEALTH_SILENCE, REGISTER_WAIT),
            gnum: 0,
            epoch: 0,
            members: Vec::new(),
            prepared: None,
            committed: None,
            max_gnum: 0,
            max_epoch: 0,
            seqs: Vec::new(),
        }
    }
}

/// How long a worker goes without health checks before it registers again (it may have been
/// dropped from the group), and how long it waits for an answer to a registration.
const HEALTH_SILENCE: u64 = 2500;
const REGISTER_WAIT: u64 = 500;

impl World {
    pub fn worker_tick(&mut self, w: usize) {
        if self.workers[w].dead {
            return;
        }
        self.after(300, Ev::WorkerTick(w));
        let lease = self.workers[w].lease;
        self.send(To::Store, Msg::KeepAlive { lease, sent_at: self.now, from: To::Worker(w) });
        if self.workers[w].membership.due(self.now).is_none() {
            return;
        }
        // The coordinator that leads now (a worker tries its coordinators until one accepts).
        let leader = match ready(self.store.get(LEADER)) {
            Ok(kv) => kv.and_then(|kv| parse_coord(&String::from_utf8_lossy(&kv.value))),
            Err(e) => return self.violation = Some(format!("the leader key cannot be read: {e}")),
        };
        let Some((c, inc)) = leader else { return };
        let k = &mut self.workers[w];
        let previous = k.membership.id().map(String::from);
        k.membership.attempted(self.now);
        self.send(To::Coord(c, inc), Msg::Register { w, previous });
    }

    /// Registered as `id`: its membership key goes into the store under its lease (so a later
    /// leader finds it), as `switchyard worker` does after registering.
    fn registered(&mut self, w: usize, id: String) {
        let m = Member { id: id.clone(), rank: 0, node: format!("node{w}"), addr: address(w), transport_addr: format!("tx{w}"), gpus: 0 };
        let k = &mut self.workers[w];
        let lease = k.lease;
        if let Some(old) = k.membership.registered(id, self.now)
            && let Err(e) = ready(typed::remove_member(&self.store, &old))
        {
            return self.violation = Some(format!("the old membership key cannot be removed: {e}"));
        }
        if ready(typed::put_member(&self.store, &m, Some(lease))).is_err() {
            // The lease lapsed meanwhile: a new one, and register again.
            self.renew_lease(w);
        }
    }

    fn renew_lease(&mut self, w: usize) {
        match ready(self.store.grant_lease(std::time::Duration::from_millis(WORKER_TTL))) {
            Ok(l) => {
                self.workers[w].lease = l;
                self.workers[w].membership.lease_lapsed();
            }
            Err(e) => self.violation = Some(format!("the store refused a lease: {e}")),
        }
    }

    /// Whether every rank of the worker's generation has joined it (the collective can run).
    fn formed(&self, w: usize) -> bool {
        let k = &self.workers[w];
        k.gnum > 0
            && k.members.contains(&w)
            && k.members.iter().all(|&m| {
                let o = &self.workers[m];
                !o.dead && o.frozen_until <= self.now && o.gnum == k.gnum
            })
    }

    pub fn worker_step(&mut self, w: usize) {
        if self.workers[w].dead {
            return;
        }
        self.after(100, Ev::WorkerStep(w));
        if !self.formed(w) {
            return;
        }
        if let Some(e) = self.workers[w].committed
            && self.workers[w].members.iter().all(|&m| self.workers[m].committed == Some(e) || self.workers[m].epoch >= e)
        {
            let k = &mut self.workers[w];
            k.epoch = e;
            k.committed = None;
        }
        let seqs = std::mem::take(&mut self.workers[w].seqs);
        let mut keep = Vec::with_capacity(seqs.len());
        for (r, a) in seqs {
            let req = &mut self.reqs[r];
            if req.attempt != a || req.state != (RState::Running { w, gnum: self.workers[w].gnum }) {
                continue; // the request moved on (retried elsewhere, or its leader is gone)
            }
            req.streamed += 1;
            if req.streamed >= req.needed {
                let (c, inc) = req.owner;
                self.send(To::Coord(c, inc), Msg::SeqDone { req: r, attempt: a });
            } else {
                keep.push((r, a));
            }
        }
        self.workers[w].seqs = keep;
    }

    pub fn worker_msg(&mut self, w: usize, m: Msg) {
        if self.workers[w].dead {
            return;
        }
        match m {
            Msg::KeepAliveAck { lease, ok, .. } => {
                if !ok && lease == self.workers[w].lease {
                    // The lease lapsed (a pause): a new one, and register again.
                    self.renew_lease(w);
                }
            }
            Msg::Registered { id, .. } => self.registered(w, id),
            Msg::Regroup { c, inc, number, epoch, members } => self.worker_regroup(w, (c, inc), number, epoch, members),
            Msg::Health { c, inc } => {
                let k = &mut self.workers[w];
                k.membership.heard(self.now);
                let (gnum, epoch) = (k.gnum, k.epoch);
                self.send(To::Coord(c, inc), Msg::HealthReply { w, gnum, epoch });
            }
            Msg::Ping { c, inc } => {
                let k = &self.workers[w];
                let reply = Msg::PingReply { w, gnum: k.gnum, epoch: k.epoch };
                self.send(To::Coord(c, inc), reply);
            }
            Msg::Prepare { c, inc, epoch, gnum } => {
                let k = &mut self.workers[w];
                let ok = gnum == k.gnum && epoch > k.epoch;
                if ok {
                    k.prepared = Some(epoch);
                }
                self.send(To::Coord(c, inc), Msg::PrepareReply { w, epoch, ok });
            }
            Msg::Commit { c, inc, epoch } => {
                let k = &mut self.workers[w];
                let ok = k.prepared == Some(epoch);
                if ok {
                    // It switches at a step where every rank of its generation has committed.
                    k.committed = Some(epoch);
                    k.prepared = None;
                }
                self.send(To::Coord(c, inc), Msg::CommitReply { w, epoch, ok });
            }
            Msg::Abort { epoch } => {
                let k = &mut self.workers[w];
                if k.prepared == Some(epoch) {
                    k.prepared = None;
                }
                if k.committed == Some(epoch) {
                    k.committed = None;
                }
            }
            Msg::StartSeq { req, attempt, gnum } => {
                if gnum == self.workers[w].gnum {
                    self.workers[w].seqs.push((req, attempt));
                } else {
                    let (c, inc) = self.reqs[req].owner;
                    self.send(To::Coord(c, inc), Msg::SeqFailed { req, attempt });
                }
            }
            _ => {}
        }
    }

    /// The worker-side fence: only a generation above its own; joining it ends the sequences of
    /// the old one (their coordinator continues them elsewhere).
    fn worker_regroup(&mut self, w: usize, from: (usize, u64), number: u64, epoch: u64, members: Vec<usize>) {
        let ok = number > self.workers[w].gnum;
        if ok {
            let k = &mut self.workers[w];
            k.gnum = number;
            k.epoch = epoch;
            k.members = members;
            k.prepared = None;
            k.committed = None;
            let seqs = std::mem::take(&mut k.seqs);
            for (req, attempt) in seqs {
                let (c, inc) = self.reqs[req].owner;
                self.send(To::Coord(c, inc), Msg::SeqFailed { req, attempt });
            }
        }
        self.send(To::Coord(from.0, from.1), Msg::RegroupReply { w, number, ok });
    }
}
