//! The control plane of the expert-parallel cluster, as a library: the group's membership and
//! generations ([`group`]), request routing and retry rules ([`router`]), the ordered generation
//! record in the state store ([`record`]), typed errors with stable codes ([`error`]), and the
//! deterministic simulator that runs the same logic under node kills ([`sim`], tests).
//!
//! The coordinator process (`switchyard coordinator`) is a thin tokio adapter over these: it
//! feeds the group with registrations, lease expiries and health failures, and carries out the
//! generations it plans on the workers.
pub mod error;
pub mod group;
pub mod record;
pub mod router;
#[cfg(test)]
mod sim;

pub use error::ControlError;
pub use group::{Generation, Group, GroupSettings, Serving, WorkerId, WorkerInfo};
