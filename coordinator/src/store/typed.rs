//! Typed records on top of [`StateStore`]: members, placement epochs, model metadata.
//!
//! Key layout (relative to the store prefix):
//! - `members/<id>`: [`Member`], put with the worker's lease so it vanishes when the worker dies;
//! - `placement/epochs/<epoch, 20 digits>`: [`PlacementEpoch`] records;
//! - `placement/current`: the active epoch number (decimal), moved only by compare-and-swap;
//! - `models/<name>`: [`ModelMeta`];
//! - `coordinator/leader`: [`LEADER`]; `cluster/generation`: the active generation
//!   (`crate::control::record`).

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{KeyValue, LeaseId, Result, Revision, StateStore, StoreError};

pub const MEMBERS: &str = "members/";
pub const EPOCHS: &str = "placement/epochs/";
pub const CURRENT_EPOCH: &str = "placement/current";
pub const MODELS: &str = "models/";

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    /// Not a worker's rank any more (ranks change with every generation; the recorded
    /// generation holds them): 0 for workers, kept so older records decode.
    pub rank: u32,
    /// Node (host) name: topology for the placement.
    pub node: String,
    /// gRPC address of the worker service.
    pub addr: String,
    /// Address of the all-to-all transport (TCP) or empty for NCCL.
    #[serde(default)]
    pub transport_addr: String,
    /// GPUs it computes on (0: CPU).
    #[serde(default)]
    pub gpus: u32,
}

/// The lifecycle of a placement epoch (two-phase change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochState {
    /// Written; workers are preparing the new slots.
    Proposed,
    /// Every worker acked; switching at `switch_step`.
    Committed,
    /// Could not be prepared everywhere; workers drop the new slots.
    Abandoned,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementEpoch {
    pub epoch: u64,
    pub state: EpochState,
    /// The placement document (the `placement` crate's JSON form).
    pub placement: serde_json::Value,
    /// Engine step at which workers switch (set when committed).
    #[serde(default)]
    pub switch_step: Option<u64>,
    /// Worker ids that acked the prepare phase.
    #[serde(default)]
    pub acks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub name: String,
    /// Checkpoint location as seen by workers.
    pub path: String,
    pub architecture: String,
    pub num_layers: u32,
    pub num_experts: u32,
    pub top_k: u32,
    pub dtype: String,
}

/// A decoded record with its store versions.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: Revision,
}

pub fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Decode { key: kv.key.clone(), reason: e.to_string() })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

pub async fn get_json<S: StateStore, T: DeserializeOwned>(s: &S, key: &str) -> Result<Option<Versioned<T>>> {
    match s.get(key).await? {
        Some(kv) => Ok(Some(Versioned { value: decode(&kv)?, mod_revision: kv.mod_revision })),
        None => Ok(None),
    }
}

pub async fn put_member<S: StateStore>(s: &S, m: &Member, lease: Option<LeaseId>) -> Result<Revision> {
    if m.id.is_empty() || m.id.contains('/') {
        return Err(StoreError::InvalidArgument(format!("member id {:?}", m.id)));
    }
    s.put(&format!("{MEMBERS}{}", m.id), encode(m), lease).await
}

pub async fn remove_member<S: StateStore>(s: &S, id: &str) -> Result<bool> {
    s.delete(&format!("{MEMBERS}{id}")).await
}

/// All members (sorted by id) and the revision they were read at (watch from `rev + 1`).
pub async fn list_members<S: StateStore>(s: &S) -> Result<(Vec<Member>, Revision)> {
    let (kvs, rev) = s.list(MEMBERS).await?;
    Ok((kvs.iter().map(decode).collect::<Result<_>>()?, rev))
}

pub async fn put_model<S: StateStore>(s: &S, m: &ModelMeta) -> Result<Revision> {
    if m.name.is_empty() || m.name.contains('/') {
        return Err(StoreError::InvalidArgument(format!("model name {:?}", m.name)));
    }
    s.put(&format!("{MODELS}{}", m.name), encode(m), None).await
}

pub async fn get_model<S: StateStore>(s: &S, name: &str) -> Result<Option<ModelMeta>> {
    Ok(get_json(s, &format!("{MODELS}{name}")).await?.map(|v| v.value))
}

fn epoch_key(epoch: u64) -> String {
    format!("{EPOCHS}{epoch:020}")
}

/// The current epoch number and the mod revision of `placement/current` (0 if none yet).
pub async fn current_epoch<S: StateStore>(s: &S) -> Result<(Option<u64>, Revision)> {
    match s.get(CURRENT_EPOCH).await? {
        None => Ok((None, 0)),
        Some(kv) => {
            let n = std::str::from_utf8(&kv.value).ok().and_then(|t| t.trim().parse().ok()).ok_or_else(|| {
                StoreError::Decode { key: kv.key.clone(), reason: "not an epoch number".into() }
            })?;
            Ok((Some(n), kv.mod_revision))
        }
    }
}

pub async fn get_epoch<S: StateStore>(s: &S, epoch: u64) -> Result<Option<Versioned<PlacementEpoch>>> {
    get_json(s, &epoch_key(epoch)).await
}

/// Writes epoch `current + 1` as `Proposed` if no one else proposed it first (CAS on the epoch
/// key being absent). Returns the new epoch number.
pub async fn propose_epoch<S: StateStore>(s: &S, placement: serde_json::Value) -> Result<u64> {
    let (cur, _) = current_epoch(s).await?;
    let epoch = cur.map_or(1, |c| c + 1);
    let rec = PlacementEpoch { epoch, state: EpochState::Proposed, placement, switch_step: None, acks: vec![] };
    s.compare_and_swap(&epoch_key(epoch), 0, encode(&rec), None).await?;
    Ok(epoch)
}

/// Updates an epoch record with CAS on its revision (read-modify-write; `Conflict` if it changed).
pub async fn update_epoch<S: StateStore>(
    s: &S,
    epoch: u64,
    f: impl FnOnce(&mut PlacementEpoch),
) -> Result<PlacementEpoch> {
    let Some(mut v) = get_epoch(s, epoch).await? else {
        return Err(StoreError::InvalidArgument(format!("no placement epoch {epoch}")));
    };
    f(&mut v.value);
    s.compare_and_swap(&epoch_key(epoch), v.mod_revision, encode(&v.value), None).await?;
    Ok(v.value)
}

/// Makes `epoch` the current one if the current pointer is still at `expected_rev`.
pub async fn activate_epoch<S: StateStore>(s: &S, epoch: u64, expected_rev: Revision) -> Result<Revision> {
    s.compare_and_swap(CURRENT_EPOCH, expected_rev, epoch.to_string().into_bytes(), None).await
}

/// Where the leading coordinator is (its client API address), held with its lease.
pub const LEADER: &str = "coordinator/leader";
