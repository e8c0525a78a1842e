//! Worker-side rules: a lease kept alive in the store, registration with whoever holds the leader
//! key, a generation accepted only above its own, steps only when every rank of its generation has
//! joined it, and sequences that fail back to their coordinator when the generation changes.

use super::{Ev, LEADER_KEY, Msg, RState, To, Val, WORKER_TTL, World};
use crate::control::group::WorkerInfo;

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
    pub lease: u64,
    /// The generation it joined, its epoch and its ranks (simulated worker indices).
    pub gnum: u64,
    pub epoch: u64,
    pub members: Vec<usize>,
    /// Highest generation seen by the invariant check.
    pub max_gnum: u64,
    /// The coordinator (index, incarnation) that registered it.
    pub registered: Option<(usize, u64)>,
    pub last_health: u64,
    /// Sequences it runs: (request, attempt).
    pub seqs: Vec<(usize, usize)>,
}

impl Worker {
    pub fn new(lease: u64) -> Self {
        Worker {
            dead: false,
            dead_at: 0,
            frozen_until: 0,
            lease,
            gnum: 0,
            epoch: 0,
            members: Vec::new(),
            max_gnum: 0,
            registered: None,
            last_health: 0,
            seqs: Vec::new(),
        }
    }
}

/// How long a worker goes without its leader's health checks before it registers again (it may
/// have been dropped from the group).
const HEALTH_SILENCE: u64 = 2500;

impl World {
    pub fn worker_tick(&mut self, w: usize) {
        if self.workers[w].dead {
            return;
        }
        self.after(300, Ev::WorkerTick(w));
        let lease = self.workers[w].lease;
        self.send(To::Store, Msg::KeepAlive { lease, sent_at: self.now, from: To::Worker(w) });
        let (leader, _) = self.store.get(LEADER_KEY);
        let Some(&Val::Leader(c, inc)) = leader else { return };
        let k = &self.workers[w];
        if k.registered != Some((c, inc)) || self.now.saturating_sub(k.last_health) > HEALTH_SILENCE {
            self.send(To::Coord(c, inc), Msg::Register { w, lease });
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
                    self.workers[w].lease = self.store.grant(self.now, WORKER_TTL);
                    self.workers[w].registered = None;
                }
            }
            Msg::Registered { c, inc } => {
                self.workers[w].registered = Some((c, inc));
                self.workers[w].last_health = self.now;
            }
            Msg::Regroup { c, inc, number, epoch, members } => self.worker_regroup(w, (c, inc), number, epoch, members),
            Msg::Health { c, inc } => {
                let k = &mut self.workers[w];
                if k.registered == Some((c, inc)) {
                    k.last_health = self.now;
                }
                let (gnum, epoch) = (k.gnum, k.epoch);
                self.send(To::Coord(c, inc), Msg::HealthReply { w, gnum, epoch });
            }
            Msg::Ping { c, inc } => {
                let k = &self.workers[w];
                let reply = Msg::PingReply { w, lease: k.lease, gnum: k.gnum, epoch: k.epoch };
                self.send(To::Coord(c, inc), reply);
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
            let seqs = std::mem::take(&mut k.seqs);
            for (req, attempt) in seqs {
                let (c, inc) = self.reqs[req].owner;
                self.send(To::Coord(c, inc), Msg::SeqFailed { req, attempt });
            }
        }
        self.send(To::Coord(from.0, from.1), Msg::RegroupReply { w, number, ok });
    }
}
