//! Errors of the control plane, each with a stable code (as [`StoreError::code`] has), mapped to
//! one gRPC status code in one place.

use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Flags or settings that cannot work together.
    #[error("invalid settings: {0}")]
    InvalidSettings(String),
    /// A placement that does not fit the model or the group.
    #[error("invalid placement: {0}")]
    InvalidPlacement(String),
    /// The live workers cannot hold every expert within their budget.
    #[error("{}", crate::control::group::Serving::NoRoom { missing: missing.clone() }.reason())]
    NoRoom { missing: Vec<(usize, usize)> },
    /// The cluster does not serve right now (the reason says why); retryable.
    #[error("not serving: {0}")]
    NotServing(String),
    /// This coordinator is a standby; the leader's address when known.
    #[error("standby coordinator; {}", leader.as_ref().map(|l| format!("the leader is at {l}")).unwrap_or_else(|| "no leader elected yet".into()))]
    NotLeader { leader: Option<String> },
    /// A number from the past: a generation or epoch at or below the current one.
    #[error("stale {what} {got}: the current one is {have}")]
    Stale { what: &'static str, got: u64, have: u64 },
    /// A worker of the other kind of device than the group's (see `Group::admits`).
    #[error("a worker computing on {joining} cannot join a group computing on {members} (member {member}): one group, one kind of device")]
    MixedCompute { joining: &'static str, members: &'static str, member: String },
    #[error("no live worker {0}")]
    UnknownWorker(String),
    #[error("no rank {0} in the active generation")]
    UnknownRank(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ControlError {
    /// A stable machine-readable code, for logs, metrics and clients.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::InvalidSettings(_) => "CONTROL_INVALID_SETTINGS",
            ControlError::InvalidPlacement(_) => "CONTROL_INVALID_PLACEMENT",
            ControlError::NoRoom { .. } => "CONTROL_NO_ROOM",
            ControlError::NotServing(_) => "CONTROL_NOT_SERVING",
            ControlError::NotLeader { .. } => "CONTROL_NOT_LEADER",
            ControlError::Stale { .. } => "CONTROL_STALE",
            ControlError::MixedCompute { .. } => "CONTROL_MIXED_COMPUTE",
            ControlError::UnknownWorker(_) => "CONTROL_UNKNOWN_WORKER",
            ControlError::UnknownRank(_) => "CONTROL_UNKNOWN_RANK",
            ControlError::Store(e) => e.code(),
        }
    }

    /// Whether a client should retry (elsewhere or later).
    pub fn is_retryable(&self) -> bool {
        match self {
            ControlError::NoRoom { .. } | ControlError::NotServing(_) | ControlError::NotLeader { .. } => true,
            ControlError::Store(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The gRPC status this error answers with.
    pub fn to_status(&self) -> tonic::Status {
        let msg = format!("{} [{}]", self, self.code());
        match self {
            ControlError::InvalidSettings(_) | ControlError::InvalidPlacement(_) => tonic::Status::invalid_argument(msg),
            ControlError::NoRoom { .. } | ControlError::NotServing(_) | ControlError::NotLeader { .. } => tonic::Status::unavailable(msg),
            ControlError::Stale { .. } | ControlError::MixedCompute { .. } => tonic::Status::failed_precondition(msg),
            ControlError::UnknownWorker(_) | ControlError::UnknownRank(_) => tonic::Status::not_found(msg),
            ControlError::Store(e) if e.is_retryable() => tonic::Status::unavailable(msg),
            ControlError::Store(_) => tonic::Status::internal(msg),
        }
    }
}

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        e.to_status()
    }
}
