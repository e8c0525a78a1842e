#![forbid(unsafe_code)]
//! Typed errors of model loading and execution.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Each variant names its cause.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unknown architecture {0:?} (supported: Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3, OLMoE)")]
    UnknownArchitecture(String),
    #[error("unsupported rope type {0:?} (supported: default, linear, yarn)")]
    UnsupportedRope(String),
    #[error("unsupported activation {0:?} (only silu)")]
    UnsupportedActivation(String),
    #[error("invalid safetensors file {path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("no checkpoint found in {0} (expected model.safetensors or model.safetensors.index.json)")]
    NoCheckpoint(PathBuf),
    #[error("missing tensor {name} in checkpoint")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {found:?} but the config implies {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor {name} has unsupported dtype {dtype} (supported: F32, BF16, F16)")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("expert {expert} of MoE layer {layer} is not loaded on this rank")]
    ExpertNotLoaded { layer: usize, expert: usize },
    #[error("expert subset: {0}")]
    ExpertSubset(String),
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("token id {token} at position {position} is out of range (vocab size {vocab_size})")]
    TokenOutOfRange { token: u32, position: usize, vocab_size: usize },
    #[error("prompt of {len} tokens is longer than max_position_embeddings ({max})")]
    PromptTooLong { len: usize, max: usize },
    #[error("sequence {0} is unknown")]
    UnknownSequence(u64),
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("expert parallel: {0}")]
    ExpertParallel(String),
    #[error("failpoint {0} is switched on (SWITCHYARD_FAILPOINTS)")]
    Failpoint(String),
    #[error("routing capture: {0}")]
    RoutingCapture(String),
    #[error(transparent)]
    Device(#[from] crate::backend::DeviceError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
