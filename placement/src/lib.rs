//! Expert placement for expert-parallel MoE serving.
//!
//! Pure library: routing traces and their statistics, synthetic traces, the placement file format,
//! solvers (`contiguous`, `eplb`, `ilp`) and the evaluator. No async, no I/O beyond files.
#![forbid(unsafe_code)]

pub mod error;
pub mod placement;
pub mod topology;
pub mod trace;
pub mod routing_file;
pub mod robust;
pub mod stats;
pub mod synth;
pub mod synth_latent;
pub mod eval;
pub mod plot;
pub mod solver;
pub mod live;
pub mod rebalance;
pub mod datapath;
pub mod elastic;

pub use elastic::{RegroupOptions, Regrouped, regroup};
pub use error::{PlacementError, TraceError};
pub use placement::Placement;
pub use solver::{ensure_min_replicas, min_replica_count};
pub use stats::RoutingStats;
pub use topology::Topology;
pub use routing_file::{RoutingFile, RoutingFormat};
pub use trace::RoutingTrace;
