//! Which members the leader still counts, from its health polls and the membership leases in the
//! store. The tokio coordinator (`server::generations::watch_membership`) polls workers over gRPC
//! and lists `members/`; the simulator does the same against simulated workers and the embedded
//! store; both ask [`HealthWatch`].
//!
//! The rules: a member whose health check fails [`HEALTH_FAILURES`] times in a row is lost (a
//! frozen or partitioned process); a member whose membership key was once seen and is gone has
//! lost its lease (the process died or stalled past its TTL) and is lost; a rank of the active
//! generation that reports it is paused in it (its collectives broke) or serving a later one (it
//! joined a generation a predecessor started and never recorded) makes the group re-form as it
//! is. Every report raises the group's generation floor to what the member was asked to join, so
//! the next plan never reuses a number.

use std::collections::{BTreeMap, BTreeSet};

use super::group::{Group, WorkerId};

/// Consecutive failed health checks that lose a member.
pub const HEALTH_FAILURES: u32 = 3;

/// What a member's health answer says (the fields of `WorkerHealthResponse` that matter here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthReport {
    /// The generation it serves.
    pub generation: u64,
    /// The newest generation it was asked to join (serving or building).
    pub newest_generation: u64,
    pub epoch: u64,
    /// Its collectives failed and it waits for a new generation.
    pub paused: bool,
}

/// What to do about a member after one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// No answer this time; not lost yet.
    Silent,
    /// Lose it, for this reason.
    Lost(String),
    /// Re-form the group as it is (see the module doc).
    Reform,
}

/// Per-member health state of the leader.
#[derive(Debug, Default, Clone)]
pub struct HealthWatch {
    failures: BTreeMap<WorkerId, u32>,
    /// Members whose membership key was seen in the store.
    leased: BTreeSet<WorkerId>,
}

impl HealthWatch {
    /// Takes member `id`'s answer to one poll (`None`: no answer in time).
    pub fn observe(&mut self, group: &mut Group, id: &str, report: Option<HealthReport>) -> Verdict {
        let f = self.failures.entry(id.to_string()).or_default();
        let Some(h) = report else {
            *f += 1;
            return if *f >= HEALTH_FAILURES { Verdict::Lost(format!("{HEALTH_FAILURES} health checks failed")) } else { Verdict::Silent };
        };
        *f = 0;
        group.observe_generation(h.generation.max(h.newest_generation), h.epoch);
        let Some(active) = group.active().filter(|a| a.rank_of(id).is_some()) else { return Verdict::Healthy };
        let broken = h.paused && h.generation == active.number;
        let left = h.generation > active.number && group.pending().is_none_or(|p| p.number != h.generation);
        if broken || left { Verdict::Reform } else { Verdict::Healthy }
    }

    /// The members whose membership key was seen before and is not in `listed` (the ids under
    /// `members/` now): their leases expired. Members never seen there (a store without worker
    /// leases, like the embedded one) are left to the health checks.
    pub fn lapsed(&mut self, group: &Group, listed: &[WorkerId]) -> Vec<WorkerId> {
        let members: Vec<WorkerId> = group.members().into_iter().map(|w| w.id).collect();
        self.leased.retain(|id| members.contains(id));
        self.failures.retain(|id, _| members.contains(id));
        let gone: Vec<WorkerId> = self.leased.iter().filter(|id| !listed.contains(id)).cloned().collect();
        for id in &gone {
            self.leased.remove(id);
        }
        for id in listed.iter().filter(|id| members.contains(id)) {
            self.leased.insert(id.clone());
        }
        gone
    }

    /// Forgets a member (it was lost or left).
    pub fn forget(&mut self, id: &str) {
        self.failures.remove(id);
        self.leased.remove(id);
    }
}
