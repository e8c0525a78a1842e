//! What a new leader takes over from its predecessor, decided from what it read: the recorded
//! generation (`record`), which of that generation's ranks answered its probes and the newest
//! generation each was asked to join, the workers whose membership leases name them in the store,
//! and the reserved generation floor. The tokio coordinator (`server::generations::lead`) gathers
//! these over gRPC and the store; the simulator gathers them from simulated workers and the
//! embedded store; both call [`succeed`].
//!
//! Why each input matters: ranks that answer keep their KV caches and expert slots (nothing
//! restarts); a rank's newest generation and the reservation floor make the new leader plan above
//! any number its predecessor handed out but did not record (numbers are never reused); members
//! registered with the predecessor but not ranks yet (a join it did not finish) are taken over
//! instead of waiting for them to notice and register again.

use super::group::{Generation, Group, WorkerId, WorkerInfo};
use super::record::GenerationRecord;

/// One rank of the recorded generation, as the new leader's probe found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankProbe {
    pub id: WorkerId,
    /// `None`: it did not answer. Otherwise the newest generation it serves or was asked to join,
    /// and its placement epoch.
    pub answered: Option<(u64, u64)>,
}

/// What [`succeed`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Succession {
    /// The adopted generation's number, how many of its ranks answered, and its world size.
    pub adopted: Option<(u64, usize, usize)>,
    /// Members registered with the predecessor, now members of this leader's group.
    pub taken_over: Vec<WorkerId>,
}

/// Why a recorded generation is not adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IgnoredRecord {
    #[error("the recorded generation does not parse: {0}")]
    Unreadable(String),
    #[error("the recorded generation is for another model ({layers} MoE layers x {experts} experts)")]
    OtherModel { layers: usize, experts: usize },
}

/// The recorded generation if it is for this model (`layers` MoE layers of `experts` experts).
pub fn usable_record(rec: &GenerationRecord, layers: usize, experts: usize) -> Result<Generation, IgnoredRecord> {
    let g = rec.generation().map_err(|e| IgnoredRecord::Unreadable(e.to_string()))?;
    if g.placement.num_layers != layers || g.placement.num_experts != experts {
        return Err(IgnoredRecord::OtherModel { layers: g.placement.num_layers, experts: g.placement.num_experts });
    }
    Ok(g)
}

/// Builds the new leader's group from what it read (see the module doc).
pub fn succeed(
    group: &mut Group,
    recorded: Option<Generation>,
    probes: &[RankProbe],
    members: impl IntoIterator<Item = WorkerInfo>,
    reserved: Option<(u64, u64)>,
) -> Succession {
    let mut s = Succession::default();
    if let Some((n, e)) = reserved {
        group.observe_generation(n, e);
    }
    let mut ranks: Vec<WorkerId> = Vec::new();
    if let Some(g) = recorded {
        ranks = g.ranks.iter().map(|w| w.id.clone()).collect();
        let alive: Vec<WorkerId> = probes.iter().filter(|p| p.answered.is_some() && ranks.contains(&p.id)).map(|p| p.id.clone()).collect();
        for (n, e) in probes.iter().filter_map(|p| p.answered) {
            group.observe_generation(n, e);
        }
        s.adopted = Some((g.number, alive.len(), g.world()));
        group.adopt(g, &alive);
    }
    // Ranks of the recorded generation were probed: one that did not answer stays out even while
    // its membership lease still runs.
    for m in members.into_iter().filter(|m| !ranks.contains(&m.id)) {
        let id = m.id.clone();
        if group.take_over(m) {
            s.taken_over.push(id);
        }
    }
    s
}
