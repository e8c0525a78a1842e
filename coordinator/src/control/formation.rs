//! The outcome of carrying out one generation, from its ranks' replies to `Regroup`. The tokio
//! coordinator (`server::generations::form`) feeds it the gRPC replies as they come; the
//! simulator feeds it simulated replies; both end it with [`Formation::finish`].
//!
//! The rule: the generation serves when every rank joined. The first rank that fails decides it:
//! the generation is abandoned at once (the other ranks would only wait for the failed peer until
//! their connect timeout, and the next generation's `Regroup` supersedes their builds), and the
//! failed rank is lost. A rank that answers "superseded" (it was already asked to join a later
//! generation, by this leader or a predecessor) abandons the generation without being lost: the
//! group plans again above the newest number its health reports show.

use std::collections::BTreeSet;

use super::error::ControlError;
use super::group::{Generation, Group, WorkerId};

/// One rank's answer to `Regroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegroupReply {
    Joined { loaded_experts: u64, kept_sequences: u64 },
    /// The rank already serves or builds a later generation (`ABORTED`).
    Superseded,
    /// Anything else: an error, no answer in time, no connection.
    Failed(String),
}

/// How a generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formed {
    Serving { loaded_experts: u64, kept_sequences: u64 },
    /// Abandoned; these ranks are lost.
    Abandoned { lost: Vec<WorkerId> },
}

/// One generation being carried out.
#[derive(Debug, Clone)]
pub struct Formation {
    number: u64,
    waiting: BTreeSet<WorkerId>,
    lost: Vec<WorkerId>,
    abandoned: bool,
    loaded_experts: u64,
    kept_sequences: u64,
}

impl Formation {
    pub fn new(g: &Generation) -> Self {
        Formation {
            number: g.number,
            waiting: g.ranks.iter().map(|w| w.id.clone()).collect(),
            lost: Vec::new(),
            abandoned: false,
            loaded_experts: 0,
            kept_sequences: 0,
        }
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    /// Whether `id` is a rank this formation still waits for.
    pub fn waits_for(&self, id: &str) -> bool {
        !self.decided() && self.waiting.contains(id)
    }

    /// Takes rank `id`'s reply; returns whether the outcome is decided (stop waiting then).
    /// Replies from ranks it does not wait for are ignored.
    pub fn reply(&mut self, id: &str, reply: RegroupReply) -> bool {
        if !self.waits_for(id) {
            return self.decided();
        }
        self.waiting.remove(id);
        match reply {
            RegroupReply::Joined { loaded_experts, kept_sequences } => {
                self.loaded_experts += loaded_experts;
                self.kept_sequences += kept_sequences;
            }
            RegroupReply::Superseded => self.abandoned = true,
            RegroupReply::Failed(_) => {
                self.lost.push(id.to_string());
                self.abandoned = true;
            }
        }
        self.decided()
    }

    /// No more replies will come (the wait ran out): the ranks that did not answer failed.
    pub fn give_up(&mut self) {
        let silent: Vec<WorkerId> = self.waiting.iter().cloned().collect();
        for id in silent {
            self.reply(&id, RegroupReply::Failed("no answer".into()));
        }
        self.waiting.clear();
    }

    pub fn decided(&self) -> bool {
        self.abandoned || self.waiting.is_empty()
    }

    /// Hands the outcome to the group: the pending generation becomes active, or is dropped and
    /// its failed ranks lost. An undecided formation counts as given up.
    pub fn finish(mut self, group: &mut Group) -> Result<Formed, ControlError> {
        if !self.decided() {
            self.give_up();
        }
        if self.abandoned {
            group.regroup_abandoned(self.number, &self.lost)?;
            Ok(Formed::Abandoned { lost: self.lost })
        } else {
            group.regroup_finished(self.number)?;
            Ok(Formed::Serving { loaded_experts: self.loaded_experts, kept_sequences: self.kept_sequences })
        }
    }
}
