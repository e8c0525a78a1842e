use std::path::PathBuf;

/// Errors reading, converting or validating routing traces and statistics.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("{path}:{line}: {reason}")]
    BadLine { path: PathBuf, line: usize, reason: String },
    #[error("invalid trace: {0}")]
    Invalid(String),
}

/// Errors building, reading or validating a placement, or solving for one.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a placement file: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid placement: {0}")]
    Invalid(String),
    #[error("invalid topology: {0}")]
    Topology(String),
    #[error("placement and statistics disagree: {0}")]
    Mismatch(String),
    #[error("solver failed: {0}")]
    Solver(String),
    /// Some experts get no slot at all: `ranks × slots_per_rank` is less than the experts of a layer
    /// (e.g. an expert-parallel group shrank below what the memory budget can hold).
    #[error(
        "{} (layer, expert) pairs get no slot on {ranks} ranks x {slots_per_rank} slots: {}",
        .missing.len(),
        preview(.missing)
    )]
    Unplaceable {
        /// `(layer, expert)` pairs without a slot, ascending.
        missing: Vec<(usize, usize)>,
        ranks: usize,
        slots_per_rank: usize,
    },
    /// `min_replicas` replicas of every expert need more slots than the ranks have.
    #[error(
        "{min_replicas} replicas of each of {experts} experts need {needed} slots per layer, \
         {ranks} ranks x {slots_per_rank} slots give {}",
        .ranks * .slots_per_rank
    )]
    TooFewSlots { experts: usize, min_replicas: usize, needed: usize, ranks: usize, slots_per_rank: usize },
}

/// The first few `layer/expert` pairs of a list, for messages.
fn preview(pairs: &[(usize, usize)]) -> String {
    const SHOWN: usize = 8;
    let mut out: Vec<String> = pairs.iter().take(SHOWN).map(|(l, e)| format!("{l}/{e}")).collect();
    if pairs.len() > SHOWN {
        out.push(format!("... ({} more)", pairs.len() - SHOWN));
    }
    out.join(", ")
}
