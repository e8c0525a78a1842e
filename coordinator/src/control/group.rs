//! Membership and generations of the expert-parallel group, as a pure state machine.
//!
//! [`Group`] holds what the leader knows: the registered live workers, the *active* generation
//! (ranks in order, placement, placement epoch) and the one being formed. Every membership change
//! — a worker lost (lease expired, health failed, a broken collective), a drain, a join — marks
//! the group dirty; [`Group::next_generation`] then plans the next generation over the live,
//! non-draining workers: survivors keep their relative order and what they hold, joiners come
//! last, and the placement is re-solved with [`placement::elastic::regroup`] (warm-started from
//! the active one, within every rank's budget, with the replica floor). The caller (the tokio
//! driver in production, the simulator in tests) carries the generation out on the workers and
//! reports back with [`Group::regroup_finished`].
//!
//! Nothing here does I/O or reads a clock: the same code runs under the deterministic simulator
//! (`control::sim`) and in the coordinator.
//!
//! Numbering: a generation's number is above every number this leader has seen anywhere — in the
//! store, in workers' health reports, in its own earlier plans ([`Group::observe_generation`]) —
//! so numbers never go backwards, even when a leader died mid-change. Every generation also starts
//! a new placement epoch, so epochs are monotonic across generations too.

use std::collections::BTreeMap;

use placement::elastic::{RegroupOptions, regroup};
use placement::{PlacementError, Placement, Topology};

use super::error::ControlError;

/// A worker's identity for its whole life (ranks change with every generation).
pub type WorkerId = String;

/// What a worker told the coordinator when it registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub id: WorkerId,
    /// gRPC address of its `Worker` service.
    pub grpc: String,
    /// Address of its all-to-all transport.
    pub transport: String,
    /// Node (machine) name: ranks of one node form one topology node.
    pub node: String,
    /// GPUs it computes on (0: CPU); one group computes on one kind ([`Group::admits`]).
    pub gpus: u32,
}

/// One generation of the expert-parallel group.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub number: u64,
    /// The placement epoch the generation starts at.
    pub epoch: u64,
    /// `ranks[r]` = the worker that is rank `r`.
    pub ranks: Vec<WorkerInfo>,
    pub placement: Placement,
}

impl Generation {
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    pub fn rank_of(&self, id: &str) -> Option<usize> {
        self.ranks.iter().position(|w| w.id == id)
    }

    /// Node index of every rank (ranks with the same node name share one).
    pub fn node_indices(&self) -> Vec<u32> {
        node_indices(&self.ranks)
    }
}

fn node_indices(ranks: &[WorkerInfo]) -> Vec<u32> {
    let mut names: Vec<&str> = Vec::new();
    ranks
        .iter()
        .map(|w| match names.iter().position(|n| *n == w.node) {
            Some(i) => i as u32,
            None => {
                names.push(&w.node);
                (names.len() - 1) as u32
            }
        })
        .collect()
}

fn topology_of(ranks: &[WorkerInfo]) -> Result<Topology, PlacementError> {
    let idx = node_indices(ranks);
    let n = idx.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut nodes = vec![Vec::new(); n];
    for (r, &i) in idx.iter().enumerate() {
        nodes[i as usize].push(r);
    }
    let t = Topology { nodes };
    t.validate()?;
    Ok(t)
}

/// The group's fixed settings.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// Workers to wait for before the first generation.
    pub min_workers: usize,
    /// Most expert slots a rank may hold per MoE layer (its memory budget); `None`: no limit.
    pub max_slots_per_rank: Option<usize>,
    /// Every expert on at least this many ranks (capped at the world size).
    pub min_replicas: usize,
    /// The first generation's placement, over `min_workers` ranks.
    pub initial: Placement,
}

/// Whether the cluster serves, and if not why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    Yes,
    /// Fewer workers than the first generation needs.
    WaitingForWorkers { have: usize, want: usize },
    /// A rank of the active generation is gone; the next generation is being formed.
    Regrouping { generation: u64 },
    /// The live workers cannot hold every expert within their budget: these (layer, expert)
    /// pairs have no slot. Resumes by itself when a worker joins.
    NoRoom { missing: Vec<(usize, usize)> },
}

impl Serving {
    pub fn is_serving(&self) -> bool {
        *self == Serving::Yes
    }

    /// A sentence for statuses and refusals.
    pub fn reason(&self) -> String {
        match self {
            Serving::Yes => String::new(),
            Serving::WaitingForWorkers { have, want } => format!("waiting for workers: {have} of {want} registered"),
            Serving::Regrouping { generation } => format!("a rank was lost; forming generation {generation}"),
            Serving::NoRoom { missing } => {
                let list: Vec<String> = missing.iter().take(8).map(|(l, e)| format!("{l}/{e}")).collect();
                format!(
                    "the live workers cannot hold every expert within --max-slots-per-rank: {} experts missing (layer/expert: {}{}); add a worker",
                    missing.len(),
                    list.join(", "),
                    if missing.len() > 8 { ", ..." } else { "" }
                )
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    info: WorkerInfo,
    draining: bool,
}

/// The leader's view of the group. See the module documentation.
#[derive(Debug, Clone)]
pub struct Group {
    settings: GroupSettings,
    /// Live registered workers, by registration order (ids are `w<seq>`, zero-padded order kept
    /// by `order`).
    workers: BTreeMap<WorkerId, Entry>,
    order: Vec<WorkerId>,
    active: Option<Generation>,
    pending: Option<Generation>,
    /// Highest generation number and placement epoch seen anywhere.
    generation_floor: u64,
    epoch_floor: u64,
    /// Set by every membership change; cleared once planned (or found unplaceable).
    dirty: bool,
    /// The active generation no longer serves as it is — a rank's collectives broke, or a
    /// generation carried out on its ranks failed (those that accepted it have left it) — so it
    /// is re-formed even with the same members.
    reform: bool,
    /// The active generation was formed without restoring `min_replicas` (survivors of a loss
    /// serve at once with what they hold); the next generation restores it, loading while the
    /// active one serves.
    restore_replicas: bool,
    no_room: Vec<(usize, usize)>,
    next_id: u64,
    formed: u64,
}

impl Group {
    pub fn new(settings: GroupSettings) -> Result<Self, ControlError> {
        if settings.min_workers == 0 {
            return Err(ControlError::InvalidSettings("--workers must be at least 1".into()));
        }
        if settings.min_replicas == 0 {
            return Err(ControlError::InvalidSettings("--min-replicas must be at least 1".into()));
        }
        if settings.initial.num_ranks() != settings.min_workers {
            return Err(ControlError::InvalidSettings(format!(
                "the initial placement is for {} ranks, --workers is {}",
                settings.initial.num_ranks(),
                settings.min_workers
            )));
        }
        if let Some(b) = settings.max_slots_per_rank
            && settings.initial.slots_per_rank() > b
        {
            return Err(ControlError::InvalidSettings(format!(
                "the initial placement has {} slots per rank, over --max-slots-per-rank {b}",
                settings.initial.slots_per_rank()
            )));
        }
        Ok(Group {
            settings,
            workers: BTreeMap::new(),
            order: Vec::new(),
            active: None,
            pending: None,
            generation_floor: 0,
            epoch_floor: 0,
            dirty: false,
            reform: false,
            restore_replicas: false,
            no_room: Vec::new(),
            next_id: 0,
            formed: 0,
        })
    }

    pub fn settings(&self) -> &GroupSettings {
        &self.settings
    }

    /// A worker registering: it gets an id and joins at the next generation. `previous` is the id
    /// a leader gave this process before (it registers again after a long silence): if this group
    /// still has it at the same address it stays what it is. Any other member at the same address
    /// was an earlier process there (it died and restarted, or an earlier registration's reply
    /// was lost): it is lost, since whatever it held is gone with it.
    /// Whether a worker computing on `gpus` GPUs (0: CPU) may join: the live members compute on
    /// the same kind of device (GPU ranks run each MoE layer by the device protocol, CPU ranks by
    /// the host protocol; the two do not meet in one collective). A member returning under its
    /// `previous` id is judged without itself.
    pub fn admits(&self, gpus: u32, previous: Option<&str>) -> Result<(), ControlError> {
        let kind = |g: u32| if g > 0 { "GPUs" } else { "the CPU" };
        match self.workers.values().find(|e| Some(e.info.id.as_str()) != previous && (e.info.gpus > 0) != (gpus > 0)) {
            Some(e) => Err(ControlError::MixedCompute { joining: kind(gpus), members: kind(e.info.gpus), member: e.info.id.clone() }),
            None => Ok(()),
        }
    }

    pub fn register(&mut self, grpc: String, transport: String, node: String, gpus: u32, previous: Option<&str>) -> WorkerInfo {
        if let Some(e) = previous.and_then(|id| self.workers.get(id)).filter(|e| e.info.grpc == grpc && e.info.transport == transport) {
            return e.info.clone();
        }
        let stale: Vec<WorkerId> = self.workers.values().filter(|e| e.info.grpc == grpc).map(|e| e.info.id.clone()).collect();
        for id in stale {
            self.lose(&id);
        }
        let id = format!("w{}", self.next_id);
        self.next_id += 1;
        let info = WorkerInfo { id: id.clone(), grpc, transport, node, gpus };
        self.workers.insert(id.clone(), Entry { info: info.clone(), draining: false });
        self.order.push(id);
        self.dirty = true;
        info
    }

    /// A worker a previous leader registered (a new leader finds it by its membership lease in
    /// the store): it keeps its id and joins at the next generation unless it is a rank already.
    /// `false` when it was known.
    pub fn take_over(&mut self, info: WorkerInfo) -> bool {
        // One process, one member: a second key at a member's address is a stale registration
        // of the same process (its old id, under the same lease).
        if self.workers.contains_key(&info.id) || self.workers.values().any(|e| e.info.grpc == info.grpc) {
            return false;
        }
        if let Some(n) = info.id.strip_prefix('w').and_then(|n| n.parse::<u64>().ok()) {
            self.next_id = self.next_id.max(n + 1);
        }
        self.order.push(info.id.clone());
        self.workers.insert(info.id.clone(), Entry { info, draining: false });
        self.dirty = true;
        true
    }

    /// A worker is gone (lease expired, health checks failed, its collectives broke). `false`
    /// when it was not a live member.
    pub fn lose(&mut self, id: &str) -> bool {
        if self.workers.remove(id).is_none() {
            return false;
        }
        self.order.retain(|w| w != id);
        self.dirty = true;
        true
    }

    /// Take a worker out at the next generation (its requests are moved off by the caller
    /// first). Refused when the others could not hold every expert.
    pub fn drain(&mut self, id: &str) -> Result<(), ControlError> {
        let Some(e) = self.workers.get(id) else { return Err(ControlError::UnknownWorker(id.to_string())) };
        if e.draining {
            return Ok(());
        }
        let mut trial = self.clone();
        if let Some(e) = trial.workers.get_mut(id) {
            e.draining = true;
        }
        trial.dirty = true;
        trial.pending = None;
        if let Err(ControlError::NoRoom { missing }) = trial.plan(None) {
            return Err(ControlError::NoRoom { missing });
        }
        if let Some(e) = self.workers.get_mut(id) {
            e.draining = true;
        }
        self.dirty = true;
        Ok(())
    }

    /// Every rank is alive but a rank's collectives broke (a connection dropped): form a new
    /// generation with the same members. `false` while one is being formed anyway.
    pub fn reform(&mut self) -> bool {
        if self.pending.is_some() || self.active.is_none() {
            return false;
        }
        self.reform = true;
        self.dirty = true;
        true
    }

    /// Every live registered worker, by registration.
    pub fn members(&self) -> Vec<WorkerInfo> {
        self.order.iter().filter_map(|id| self.workers.get(id).map(|e| e.info.clone())).collect()
    }

    pub fn is_draining(&self, id: &str) -> bool {
        self.workers.get(id).is_some_and(|e| e.draining)
    }

    /// A number some worker or the store reported: plans stay above it.
    pub fn observe_generation(&mut self, generation: u64, epoch: u64) {
        self.generation_floor = self.generation_floor.max(generation);
        self.epoch_floor = self.epoch_floor.max(epoch);
    }

    /// A placement epoch the scheduler committed within the active generation.
    pub fn epoch_committed(&mut self, epoch: u64, placement: Placement) -> Result<(), ControlError> {
        let Some(a) = self.active.as_mut() else { return Err(ControlError::NotServing("no active generation".into())) };
        if placement.num_ranks() != a.world() {
            return Err(ControlError::InvalidPlacement(format!(
                "the placement is for {} ranks, the group has {}",
                placement.num_ranks(),
                a.world()
            )));
        }
        if epoch <= a.epoch {
            return Err(ControlError::Stale { what: "placement epoch", got: epoch, have: a.epoch });
        }
        a.epoch = epoch;
        a.placement = placement;
        self.epoch_floor = self.epoch_floor.max(epoch);
        Ok(())
    }

    /// The number of the next placement epoch: above the active one and every epoch seen (a rank
    /// may have committed an epoch whose change was then abandoned).
    pub fn next_epoch(&self) -> u64 {
        self.active.as_ref().map_or(0, |a| a.epoch).max(self.epoch_floor) + 1
    }

    /// Adopt the generation a previous leader recorded (a new leader), with the workers of it
    /// that still answer; the others count as lost (a new generation follows at once).
    pub fn adopt(&mut self, recorded: Generation, alive: &[WorkerId]) {
        self.observe_generation(recorded.number, recorded.epoch);
        for w in &recorded.ranks {
            if let Some(n) = w.id.strip_prefix('w').and_then(|n| n.parse::<u64>().ok()) {
                self.next_id = self.next_id.max(n + 1);
            }
            if alive.contains(&w.id) && !self.workers.contains_key(&w.id) {
                self.workers.insert(w.id.clone(), Entry { info: w.clone(), draining: false });
                self.order.push(w.id.clone());
            }
        }
        // A leader that died between a quick regroup and the replica restore leaves the floor
        // unmet: restore it.
        let floor = placement::solver::effective_min(self.settings.min_replicas, recorded.world());
        self.restore_replicas = placement::solver::min_replica_count(&recorded.placement) < floor;
        self.dirty = self.restore_replicas || recorded.ranks.iter().any(|w| !alive.contains(&w.id)) || self.workers.len() > recorded.world();
        self.active = Some(recorded);
        self.reform = false;
        self.pending = None;
    }

    /// The next generation to form, if a membership change calls for one and none is being
    /// formed. `load` (layers × experts) balances the re-solve.
    pub fn next_generation(&mut self, load: Option<&[Vec<f64>]>) -> Option<Generation> {
        if self.pending.is_some() || !self.dirty {
            return None;
        }
        match self.plan(load) {
            Ok(Some((g, replicas_deferred))) => {
                self.no_room.clear();
                // A deferred replica floor keeps the group dirty: the follow-up generation is
                // planned once this one is active.
                self.dirty = replicas_deferred;
                self.restore_replicas = replicas_deferred;
                self.reform = false;
                self.generation_floor = g.number;
                self.epoch_floor = g.epoch;
                self.pending = Some(g.clone());
                Some(g)
            }
            Ok(None) => {
                self.no_room.clear();
                self.dirty = false;
                self.restore_replicas = false;
                None
            }
            Err(ControlError::NoRoom { missing }) => {
                self.no_room = missing;
                self.dirty = false;
                None
            }
            Err(e) => {
                // A planning failure other than room (should not happen on valid settings):
                // leave the group as it is; the next change tries again.
                tracing::error!("cannot plan the next generation: {e}");
                self.dirty = false;
                None
            }
        }
    }

    /// What the next generation would be (without taking it), and whether it defers the replica
    /// floor. `Ok(None)`: nothing to change or not enough workers yet.
    fn plan(&self, load: Option<&[Vec<f64>]>) -> Result<Option<(Generation, bool)>, ControlError> {
        let candidates: Vec<&WorkerInfo> = self.candidates();
        let number = self.generation_floor + 1;
        let epoch = self.epoch_floor + 1;
        let Some(active) = &self.active else {
            if candidates.len() < self.settings.min_workers {
                return Ok(None);
            }
            let ranks: Vec<WorkerInfo> = candidates[..self.settings.min_workers].iter().map(|w| (*w).clone()).collect();
            let mut placement = self.settings.initial.clone();
            placement.topology = topology_of(&ranks).map_err(|e| ControlError::InvalidPlacement(e.to_string()))?;
            return Ok(Some((Generation { number, epoch, ranks, placement }, false)));
        };
        let same = candidates.len() == active.world() && candidates.iter().zip(&active.ranks).all(|(c, a)| c.id == a.id);
        if same && !self.reform && !self.restore_replicas {
            return Ok(None);
        }
        if candidates.is_empty() {
            let missing = (0..active.placement.num_layers).flat_map(|l| (0..active.placement.num_experts).map(move |e| (l, e))).collect();
            return Err(ControlError::NoRoom { missing });
        }
        let ranks: Vec<WorkerInfo> = candidates.iter().map(|w| (*w).clone()).collect();
        let survivors: Vec<Option<usize>> = ranks.iter().map(|w| active.rank_of(&w.id)).collect();
        let opts = RegroupOptions {
            topology: topology_of(&ranks).map_err(|e| ControlError::InvalidPlacement(e.to_string()))?,
            max_slots_per_rank: self.settings.max_slots_per_rank,
            min_replicas: self.settings.min_replicas,
            load: load.map(<[Vec<f64>]>::to_vec),
        };
        // Ranks were lost and none joined: when the survivors already hold every expert, serve
        // again with exactly what they hold (no weight loading before serving) and restore the
        // replica floor in the next generation.
        let lost_only = ranks.len() < active.world() && survivors.iter().all(Option::is_some);
        if lost_only && opts.min_replicas > 1 {
            let quick = RegroupOptions { min_replicas: 1, ..opts.clone() };
            if let Ok(r) = regroup(&active.placement, &survivors, &quick)
                && r.loads_per_rank.iter().all(|&n| n == 0)
            {
                return Ok(Some((Generation { number, epoch, ranks, placement: r.placement }, true)));
            }
        }
        match regroup(&active.placement, &survivors, &opts) {
            Ok(r) if same && !self.reform && r.placement == active.placement => Ok(None),
            Ok(r) => Ok(Some((Generation { number, epoch, ranks, placement: r.placement }, false))),
            Err(PlacementError::Unplaceable { missing, .. }) => Err(ControlError::NoRoom { missing }),
            Err(e) => Err(ControlError::InvalidPlacement(e.to_string())),
        }
    }

    /// Live, non-draining workers in rank order for the next generation: the active ranks that
    /// remain, then the others by registration.
    fn candidates(&self) -> Vec<&WorkerInfo> {
        let ok = |id: &str| self.workers.get(id).is_some_and(|e| !e.draining);
        let mut out: Vec<&WorkerInfo> = Vec::new();
        if let Some(a) = &self.active {
            out.extend(a.ranks.iter().filter(|w| ok(&w.id)).filter_map(|w| self.workers.get(&w.id).map(|e| &e.info)));
        }
        for id in &self.order {
            if ok(id) && !out.iter().any(|w| w.id == *id) {
                out.extend(self.workers.get(id).map(|e| &e.info));
            }
        }
        out
    }

    /// The driver carried out generation `number` on every rank: it becomes the active one.
    /// Workers lost while it formed (already removed) leave `dirty` set: the next one follows.
    pub fn regroup_finished(&mut self, number: u64) -> Result<(), ControlError> {
        let p = self.take_pending(number)?;
        self.active = Some(p);
        self.reform = false;
        self.formed += 1;
        Ok(())
    }

    /// The driver gave generation `number` up (a rank could not join it, or was superseded):
    /// the workers in `lost` are lost, none of it becomes active, and the next generation is
    /// planned without them — with the same members too, since ranks that accepted `number`
    /// have left the active generation.
    pub fn regroup_abandoned(&mut self, number: u64, lost: &[WorkerId]) -> Result<(), ControlError> {
        self.take_pending(number)?;
        for id in lost {
            self.lose(id);
        }
        self.dirty = true;
        self.reform = true;
        Ok(())
    }

    /// The generation being formed, if it is `number`.
    fn take_pending(&mut self, number: u64) -> Result<Generation, ControlError> {
        match self.pending.take() {
            Some(p) if p.number == number => Ok(p),
            other => {
                let have = other.as_ref().map_or(self.active_number(), |p| p.number);
                self.pending = other;
                Err(ControlError::Stale { what: "generation", got: number, have })
            }
        }
    }

    pub fn active(&self) -> Option<&Generation> {
        self.active.as_ref()
    }

    pub fn pending(&self) -> Option<&Generation> {
        self.pending.as_ref()
    }

    fn active_number(&self) -> u64 {
        self.active.as_ref().map_or(0, |a| a.number)
    }

    /// Generations formed since this group (leader) started.
    pub fn generations_formed(&self) -> u64 {
        self.formed
    }

    pub fn worker(&self, id: &str) -> Option<&WorkerInfo> {
        self.workers.get(id).map(|e| &e.info)
    }

    /// Live registered workers that are not ranks of the active generation.
    pub fn spare_workers(&self) -> usize {
        self.workers.keys().filter(|id| self.active.as_ref().is_none_or(|a| a.rank_of(id).is_none())).count()
    }

    /// Whether the cluster serves now. Serving needs an active generation whose ranks are all
    /// live (a join being formed does not stop serving; a loss does).
    pub fn serving(&self) -> Serving {
        let Some(a) = &self.active else {
            return Serving::WaitingForWorkers { have: self.workers.len(), want: self.settings.min_workers };
        };
        let whole = !self.reform && a.ranks.iter().all(|w| self.workers.contains_key(&w.id));
        if whole {
            return Serving::Yes;
        }
        if !self.no_room.is_empty() && self.pending.is_none() {
            return Serving::NoRoom { missing: self.no_room.clone() };
        }
        Serving::Regrouping { generation: self.pending.as_ref().map_or(self.generation_floor + 1, |p| p.number) }
    }

    /// Ranks of the active generation that take new requests: live and not draining.
    pub fn routable(&self) -> Vec<(usize, &WorkerInfo)> {
        let Some(a) = &self.active else { return Vec::new() };
        if !self.serving().is_serving() {
            return Vec::new();
        }
        a.ranks.iter().enumerate().filter(|(_, w)| self.workers.get(&w.id).is_some_and(|e| !e.draining)).collect()
    }
}

#[cfg(test)]
mod tests;
