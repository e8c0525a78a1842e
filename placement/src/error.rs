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
}
