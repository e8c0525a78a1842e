//! Switchyard worker: MoE model loading and execution.
#![deny(unsafe_code)]
//!
//! - [`config`]: `config.json` of the supported architectures.
//! - [`checkpoint`]: memory-mapped safetensors (single file or sharded), read on demand.
//! - [`model`]: one model structure for all architectures; batched forward.
//! - [`moe`]: router → (token, expert, weight) → per-expert FFN → combine; the
//!   [`moe::ExpertExecutor`] seam for expert parallelism.
//! - [`engine`]: continuous batching, KV caches, sampling, stop conditions.
//! - [`backend`]: where the model computes (`--device cpu|cuda:N`): the host model is the CPU
//!   backend, [`backend::cuda`] the GPU one.
//! - [`kernels`]: the CPU tensor kernels (OpenBLAS + rayon); with [`affinity`]'s two libc calls,
//!   the only `unsafe` code.
pub mod affinity;
pub mod attention;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod kernels;
pub mod model;
pub mod moe;
pub mod reference;
pub mod routing_capture;
pub mod sampling;
pub mod synth;
pub mod synth_tokenizer;
pub mod tokenizer;

pub use backend::{Backend, Device};
pub use config::{Arch, ModelConfig};
pub use engine::{Engine, EngineConfig, FinishReason, Request, RequestId, TokenEvent};
pub use error::ModelError;
pub use model::{LoadOptions, LogitsMode, Model, SeqInput};
pub use sampling::SamplingParams;
pub mod transport;
pub mod expert_parallel;
pub mod rank_loop;
pub mod service;
