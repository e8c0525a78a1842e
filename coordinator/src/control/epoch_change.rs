//! A new placement epoch within one generation, in two phases (the rebalancer's and the admin
//! API's path): every rank *prepares* (loads the experts it gains beside the ones it serves),
//! then every rank *commits*, and the ranks switch together at the first step where all have
//! committed; the leader records the epoch once every rank serves it. The tokio coordinator
//! (`server::admin::apply_epoch`) feeds this the RPC results; the simulator feeds it simulated
//! replies; both follow its [`Step`]s.
//!
//! The rules: any rank that fails to prepare abandons the epoch (abort everywhere; the old epoch
//! keeps serving); any that fails to commit does too; a rank that reports another generation
//! while switching means the group re-formed under the change (which ends it: the new generation
//! has its own epoch); a lost rank ends it. The epoch number is above every epoch the group has
//! seen (the active one and what ranks report), so an epoch some ranks committed before an abort
//! is never handed out again with another placement.

use super::group::Group;

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask every rank to commit.
    Commit,
    /// Ask every rank for its health again (some do not serve the epoch yet).
    Poll,
    /// Every rank serves the epoch: record it ([`Group::epoch_committed`]).
    Active,
    /// Abort the epoch everywhere; the old one keeps serving.
    Abort(EpochFailure),
}

/// Why an epoch change ended without its epoch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochFailure {
    #[error("a rank could not prepare: {0}")]
    Prepare(String),
    #[error("a rank did not commit: {0}")]
    Commit(String),
    #[error("lost a worker while switching: {0}")]
    LostWorker(String),
    #[error("the group re-formed while switching")]
    Regrouped,
}

/// A rank's health while switching: the generation it serves and its placement epoch.
pub type SwitchReport = Result<(u64, u64), String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Preparing,
    Committing,
    Switching,
    Done,
}

/// One epoch change.
#[derive(Debug, Clone)]
pub struct EpochChange {
    epoch: u64,
    generation: u64,
    phase: Phase,
}

impl EpochChange {
    /// Starts the next epoch of `group`'s active generation; `None` without one.
    pub fn start(group: &Group) -> Option<EpochChange> {
        let a = group.active()?;
        Some(EpochChange { epoch: group.next_epoch(), generation: a.number, phase: Phase::Preparing })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every rank's answer to `Prepare`.
    pub fn prepared(&mut self, replies: &[Result<(), String>]) -> Step {
        debug_assert_eq!(self.phase, Phase::Preparing);
        self.advance(replies, EpochFailure::Prepare, Phase::Committing, Step::Commit)
    }

    /// Every rank's answer to `Commit`.
    pub fn committed(&mut self, replies: &[Result<(), String>]) -> Step {
        debug_assert_eq!(self.phase, Phase::Committing);
        self.advance(replies, EpochFailure::Commit, Phase::Switching, Step::Poll)
    }

    /// On to `next` (and `step`) when every rank answered yes; the first refusal fails the epoch.
    fn advance(&mut self, replies: &[Result<(), String>], failure: fn(String) -> EpochFailure, next: Phase, step: Step) -> Step {
        match replies.iter().find_map(|r| r.as_ref().err()) {
            Some(why) => self.fail(failure(why.clone())),
            None => {
                self.phase = next;
                step
            }
        }
    }

    /// Every rank's health after the commit.
    pub fn switched(&mut self, health: &[SwitchReport]) -> Step {
        debug_assert_eq!(self.phase, Phase::Switching);
        if let Some(why) = health.iter().find_map(|h| h.as_ref().err()) {
            return self.fail(EpochFailure::LostWorker(why.clone()));
        }
        let reports: Vec<(u64, u64)> = health.iter().filter_map(|h| h.as_ref().ok().copied()).collect();
        if reports.iter().any(|&(g, _)| g != self.generation) {
            return self.fail(EpochFailure::Regrouped);
        }
        if reports.iter().all(|&(_, e)| e >= self.epoch) {
            self.phase = Phase::Done;
            return Step::Active;
        }
        Step::Poll
    }

    fn fail(&mut self, why: EpochFailure) -> Step {
        self.phase = Phase::Done;
        Step::Abort(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::group::GroupSettings;

    fn serving_group() -> Group {
        let topo = placement::Topology::uniform(2, 1).expect("topology");
        let initial = placement::solver::contiguous::solve(1, 4, &topo, 2).expect("placement");
        let mut g = Group::new(GroupSettings { min_workers: 2, max_slots_per_rank: None, min_replicas: 1, initial }).expect("group");
        for i in 0..2 {
            g.register(format!("g{i}"), format!("t{i}"), "n".into(), 0, None);
        }
        let next = g.next_generation(None).expect("a generation");
        g.regroup_finished(next.number).expect("formed");
        g
    }

    #[test]
    fn prepare_commit_switch_then_active() {
        let mut g = serving_group();
        let mut c = EpochChange::start(&g).expect("active generation");
        let (number, e) = (c.generation(), c.epoch());
        assert_eq!(c.prepared(&[Ok(()), Ok(())]), Step::Commit);
        assert_eq!(c.committed(&[Ok(()), Ok(())]), Step::Poll);
        assert_eq!(c.switched(&[Ok((number, e)), Ok((number, e - 1))]), Step::Poll, "one rank not yet");
        assert_eq!(c.switched(&[Ok((number, e)), Ok((number, e))]), Step::Active);
        let p = g.active().expect("active").placement.clone();
        g.epoch_committed(e, p).expect("recorded");
        assert_eq!(EpochChange::start(&g).expect("next").epoch(), e + 1);
    }

    #[test]
    fn failures_abort_and_a_number_seen_on_a_rank_is_not_reused() {
        let mut g = serving_group();
        let mut c = EpochChange::start(&g).expect("active");
        assert!(matches!(c.prepared(&[Ok(()), Err("no room".into())]), Step::Abort(EpochFailure::Prepare(_))));
        let mut c = EpochChange::start(&g).expect("active");
        let e = c.epoch();
        c.prepared(&[Ok(()), Ok(())]);
        assert!(matches!(c.committed(&[Ok(()), Err("gone".into())]), Step::Abort(EpochFailure::Commit(_))));
        // One rank committed `e` before the abort and reports it: the next change plans above it.
        let number = g.active().expect("active").number;
        g.observe_generation(number, e);
        assert!(EpochChange::start(&g).expect("active").epoch() > e);
        let mut c = EpochChange::start(&g).expect("active");
        c.prepared(&[Ok(()), Ok(())]);
        c.committed(&[Ok(()), Ok(())]);
        assert_eq!(c.switched(&[Ok((number + 1, 0)), Ok((number, 0))]), Step::Abort(EpochFailure::Regrouped));
    }
}
