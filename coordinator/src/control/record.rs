//! The generation record in the state store, written in order: every write is a compare-and-swap
//! on the revision it was read at, and a record never replaces a newer one, so the recorded
//! generation and epoch never go backwards — even when two leaders overlap for a lease TTL or a
//! slow write of an old leader lands late — and a new leader adopts the latest.

use serde::{Deserialize, Serialize};

use super::group::{Generation, WorkerInfo};
use crate::store::typed::decode;
use crate::store::{StateStore, StoreError};

/// Key of the active generation.
pub const GENERATION: &str = "cluster/generation";

/// A rank of a recorded generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    pub id: String,
    pub grpc: String,
    pub transport: String,
    pub node: String,
    #[serde(default)]
    pub gpus: u32,
}

/// The active generation as the leader formed it: what a new leader adopts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub number: u64,
    pub epoch: u64,
    pub ranks: Vec<RankRecord>,
    /// switchyard.placement.v1 document.
    pub placement: serde_json::Value,
    pub model_path: String,
    pub transport: String,
}

impl GenerationRecord {
    pub fn of(g: &Generation, model_path: &str, transport: &str) -> Self {
        GenerationRecord {
            number: g.number,
            epoch: g.epoch,
            ranks: g.ranks.iter().map(|w| RankRecord { id: w.id.clone(), grpc: w.grpc.clone(), transport: w.transport.clone(), node: w.node.clone(), gpus: w.gpus }).collect(),
            placement: serde_json::to_value(&g.placement).unwrap_or(serde_json::Value::Null),
            model_path: model_path.to_string(),
            transport: transport.to_string(),
        }
    }

    /// The generation, with its placement parsed and checked.
    pub fn generation(&self) -> Result<Generation, placement::PlacementError> {
        let placement = placement::Placement::from_json(&self.placement.to_string())?;
        let ranks = self.ranks.iter().map(|r| WorkerInfo { id: r.id.clone(), grpc: r.grpc.clone(), transport: r.transport.clone(), node: r.node.clone(), gpus: r.gpus }).collect();
        Ok(Generation { number: self.number, epoch: self.epoch, ranks, placement })
    }
}

/// Whether `new` may replace `existing`: only a later (generation, epoch).
pub fn supersedes(existing: Option<(u64, u64)>, new: (u64, u64)) -> bool {
    existing.is_none_or(|e| new > e)
}

/// What [`record_generation`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Written,
    /// The store already holds this or a later generation/epoch: nothing written.
    Superseded { number: u64, epoch: u64 },
}

/// Writes `rec` unless the store holds a later one (CAS on the revision read; re-read on conflict).
pub async fn record_generation<S: StateStore>(s: &S, rec: &GenerationRecord) -> Result<Recorded, StoreError> {
    record_generation_with(s, rec, supersedes).await
}

/// [`record_generation`] with the ordering rule as a parameter: the simulator plants a broken
/// rule here to show that its checks catch a record that goes backwards.
pub(crate) async fn record_generation_with<S: StateStore>(
    s: &S,
    rec: &GenerationRecord,
    may_replace: fn(Option<(u64, u64)>, (u64, u64)) -> bool,
) -> Result<Recorded, StoreError> {
    let order = |r: &GenerationRecord| (r.number, r.epoch);
    let written = write_in_order(s, GENERATION, rec, order, may_replace).await?;
    if written == Recorded::Written {
        advance_current_epoch(s, rec.epoch).await?;
    }
    Ok(written)
}

/// Writes `value` at `key` in (generation, epoch) order: reads what the key holds, and unless
/// `may_replace(held, value's)` refuses (`Superseded`, naming what it holds) writes by a
/// compare-and-swap on the revision read, re-reading on a conflict.
async fn write_in_order<S: StateStore, T: Serialize + serde::de::DeserializeOwned>(
    s: &S,
    key: &str,
    value: &T,
    order: impl Fn(&T) -> (u64, u64),
    may_replace: fn(Option<(u64, u64)>, (u64, u64)) -> bool,
) -> Result<Recorded, StoreError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Internal(e.to_string()))?;
    loop {
        let (held, rev) = match s.get(key).await? {
            Some(kv) => (Some(order(&decode::<T>(&kv)?)), kv.mod_revision),
            None => (None, 0),
        };
        if !may_replace(held, order(value)) {
            let (number, epoch) = held.unwrap_or_default();
            return Ok(Recorded::Superseded { number, epoch });
        }
        match s.compare_and_swap(key, rev, bytes.clone(), None).await {
            Ok(_) => return Ok(Recorded::Written),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Moves `placement/current` to `epoch` unless it is already there or later (CAS, re-read on
/// conflict). Returns whether it moved.
pub async fn advance_current_epoch<S: StateStore>(s: &S, epoch: u64) -> Result<bool, StoreError> {
    loop {
        let (cur, rev) = crate::store::typed::current_epoch(s).await?;
        if cur.is_some_and(|c| c >= epoch) {
            return Ok(false);
        }
        match crate::store::typed::activate_epoch(s, epoch, rev).await {
            Ok(_) => return Ok(true),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The recorded generation, if any.
pub async fn recorded_generation<S: StateStore>(s: &S) -> Result<Option<GenerationRecord>, StoreError> {
    match s.get(GENERATION).await? {
        Some(kv) => Ok(Some(decode(&kv)?)),
        None => Ok(None),
    }
}

/// Key of the highest generation (and its epoch) a leader has started to carry out.
pub const RESERVED: &str = "cluster/generation_reserved";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Reservation {
    number: u64,
    epoch: u64,
}

/// Reserves generation `number` (with `epoch`) before it is carried out: a CAS that never lowers
/// the reservation. A new leader plans above it, so a number its predecessor handed to workers
/// but never recorded (it died while the generation formed) is never reused with other content.
/// `Superseded` names a later reservation: this leader is behind and must not carry it out.
pub async fn reserve_generation<S: StateStore>(s: &S, number: u64, epoch: u64) -> Result<Recorded, StoreError> {
    // The same reservation again (a retry after a store hiccup) is ours: written again.
    let not_lower = |held: Option<(u64, u64)>, new: (u64, u64)| held.is_none_or(|h| new >= h);
    write_in_order(s, RESERVED, &Reservation { number, epoch }, |r: &Reservation| (r.number, r.epoch), not_lower).await
}

/// The reservation floor: the highest (generation, epoch) any leader started.
pub async fn reserved_generation<S: StateStore>(s: &S) -> Result<Option<(u64, u64)>, StoreError> {
    match s.get(RESERVED).await? {
        Some(kv) => decode::<Reservation>(&kv).map(|r| Some((r.number, r.epoch))),
        None => Ok(None),
    }
}
