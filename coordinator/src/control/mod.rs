//! The control plane of the expert-parallel cluster, as a library: the group's membership and
//! generations ([`group`]), placement epochs within a generation ([`epoch_change`]), leader
//! election ([`election`]), what a new leader takes over
//! ([`succession`]), the outcome of carrying out a generation ([`formation`]), which members
//! count ([`health`]), request routing and retry rules ([`router`]), the ordered generation
//! record and reservation in the state store ([`record`]), typed errors with stable codes
//! ([`error`]), and the deterministic simulator that runs all of it under faults ([`sim`], tests).
//!
//! The coordinator server (`crate::server`) is a thin tokio adapter over these: it gathers what
//! they decide on (gRPC replies, store reads, timers) and carries out what they decide. The
//! simulator is another adapter: the same functions, over the embedded store on a simulated
//! clock and simulated workers.
pub mod election;
pub mod epoch_change;
pub mod error;
pub mod formation;
pub mod group;
pub mod health;
pub mod membership;
pub mod record;
pub mod router;
pub mod succession;
#[cfg(test)]
mod sim;

pub use error::ControlError;
pub use group::{Generation, Group, GroupSettings, Serving, WorkerId, WorkerInfo};
