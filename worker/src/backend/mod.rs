#![deny(unsafe_code)]
//! Compute backends: where a worker's model runs (`--device cpu|cuda:N`).
//!
//! The engine loop, the expert-parallel executor and the transports see one interface,
//! [`Backend`]: a batched forward step over sequences with their KV caches, the caches
//! themselves, and the end of a sequence. The host [`Model`] *is* the CPU backend (packed AVX2
//! experts, OpenBLAS); [`cuda`] is the GPU one. Every backend keeps the host model: the
//! configuration and input validation live there, and a device backend uploads its weights from
//! it once, so the architecture-specific loading code exists once.
//!
//! Nothing outside this module and [`cuda`] knows which backend runs: there is no
//! `#[cfg(feature = "cuda")]` in the model, engine or executor code. A binary built without the
//! `cuda` feature still parses `--device cuda:0` and answers with [`DeviceError::NotBuilt`].

pub mod cuda;

use crate::attention::KvCache;
use crate::error::Result;
use crate::model::{ForwardOutput, LogitsMode, Model, SeqInput};
use crate::moe::{ExpertExecutor, LocalExperts};
use std::sync::Arc;

/// Where a worker computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The host CPU (the default).
    #[default]
    Cpu,
    /// GPU `N` as CUDA numbers them (`cuda:N`; `cuda` alone is `cuda:0`).
    Cuda(usize),
}

impl Device {
    /// Parse `cpu`, `cuda` or `cuda:N` (for clap's `value_parser`).
    pub fn parse(s: &str) -> std::result::Result<Device, DeviceError> {
        s.parse()
    }

    /// The flag's spelling: `cpu`, `cuda:N`.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = DeviceError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => return Ok(Device::Cpu),
            "cuda" | "gpu" => return Ok(Device::Cuda(0)),
            _ => {}
        }
        match t.strip_prefix("cuda:") {
            Some(n) => n.parse().map(Device::Cuda).map_err(|_| DeviceError::Parse(s.to_string())),
            None => Err(DeviceError::Parse(s.to_string())),
        }
    }
}

/// Why a backend could not be opened or failed on its device.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {0:?} (expected cpu, cuda or cuda:N)")]
    Parse(String),
    #[error("{device}: this binary was built without the `cuda` feature (cargo build --features cuda)")]
    NotBuilt { device: Device },
    #[error("{device}: no CUDA driver found (libcuda could not be loaded)")]
    NoDriver { device: Device },
    #[error("{device}: {found} CUDA device(s) visible")]
    NoSuchDevice { device: Device, found: usize },
    #[error("{device}: {what} failed: {msg}")]
    Driver { device: Device, what: String, msg: String },
    #[error("{device}: kernel compilation (NVRTC) failed: {log}")]
    Compile { device: Device, log: String },
    #[error("{device}: {msg}")]
    Unsupported { device: Device, msg: String },
    #[error("{device}: out of KV cache pages ({msg})")]
    KvFull { device: Device, msg: String },
}

/// A model that runs batched forward steps on one device.
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn device(&self) -> Device;

    /// The host model: configuration, input validation, and the weights (computed with on the
    /// CPU; uploaded from by a device backend).
    fn host_model(&self) -> &Model;

    /// A new, empty KV cache for one sequence (its id names the sequence to the backend).
    fn new_cache(&self) -> KvCache;

    /// One forward over the new tokens of `seqs`, routed experts through `exec`; appends to the
    /// caches (a failed step leaves each cache's committed length as it was).
    fn forward_step(&self, seqs: &mut [SeqInput], mode: LogitsMode, exec: &dyn ExpertExecutor) -> Result<ForwardOutput>;

    /// The sequence whose cache has id `cache` ended: its device memory can go.
    fn release_sequence(&self, _cache: u64) {}

    /// A step with no work on this rank while its group's others have some: join every
    /// collective of the step's MoE layers (each backend as its forward would).
    fn idle_forward(&self, exec: &crate::expert_parallel::EpExecutor) -> Result<()> {
        exec.idle_forward(self.host_model())
    }

    /// The device's peak memory bandwidth in GB/s where the device reports it (a GPU's memory
    /// clock and bus width); `None` for the CPU, whose bandwidth benchmarks measure.
    fn peak_memory_bandwidth_gbs(&self) -> Option<f64> {
        None
    }

    /// Logits of every position of `tokens` (a reference forward; no cache kept).
    fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut cache = self.new_cache();
        let out = self.forward_step(&mut [SeqInput { tokens, cache: &mut cache }], LogitsMode::All, &LocalExperts);
        self.release_sequence(cache.id());
        Ok(out?.logits.remove(0))
    }

    /// Greedy generation of `n` tokens with the KV cache (prefill, then one token per step).
    fn generate_greedy(&self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        let mut cache = self.new_cache();
        let mut out = Vec::with_capacity(n);
        let mut next: Vec<u32> = prompt.to_vec();
        let result = (|| {
            for _ in 0..n {
                let f = self.forward_step(&mut [SeqInput { tokens: &next, cache: &mut cache }], LogitsMode::Last, &LocalExperts)?;
                let tok = crate::sampling::argmax(&f.logits[0]) as u32;
                out.push(tok);
                next = vec![tok];
            }
            Ok(())
        })();
        self.release_sequence(cache.id());
        result.map(|()| out)
    }
}

/// The CPU backend is the host model itself.
impl Backend for Model {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn host_model(&self) -> &Model {
        self
    }
    fn new_cache(&self) -> KvCache {
        Model::new_cache(self)
    }
    fn forward_step(&self, seqs: &mut [SeqInput], mode: LogitsMode, exec: &dyn ExpertExecutor) -> Result<ForwardOutput> {
        Model::forward_step(self, seqs, mode, exec)
    }
}

/// How a device backend sizes its memory.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Bytes of weights that come later (a rank's placement slots, uploaded at their first
    /// step): kept free of the KV cache.
    pub reserve_bytes: u64,
    /// Most tokens the KV cache holds (default: what the memory allows).
    pub max_kv_tokens: Option<usize>,
    /// Share of the device memory left after the weights that the KV cache takes (default
    /// 0.8); workers sharing one GPU split it.
    pub kv_memory_share: Option<f64>,
}

/// Open `model` on `device`: the CPU (the model itself) or a GPU (its weights uploaded once).
pub fn open(device: Device, model: Arc<Model>) -> Result<Arc<dyn Backend>> {
    open_with(device, model, &OpenOptions::default())
}

/// Whether `device` can be used here (a worker checks its `--device` before it registers).
pub fn probe(device: Device) -> std::result::Result<(), DeviceError> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(ordinal) => cuda::probe(ordinal),
    }
}

/// [`open`] with memory options (ignored by the CPU backend).
pub fn open_with(device: Device, model: Arc<Model>, opts: &OpenOptions) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(model),
        Device::Cuda(ordinal) => cuda::open(ordinal, model, opts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for (s, d) in [("cpu", Device::Cpu), ("CPU", Device::Cpu), ("cuda", Device::Cuda(0)), ("cuda:3", Device::Cuda(3)), (" cuda:0 ", Device::Cuda(0))] {
            assert_eq!(Device::parse(s), Ok(d), "{s}");
        }
        assert_eq!(Device::Cuda(2).name(), "cuda:2");
        assert_eq!(Device::Cpu.name(), "cpu");
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "cuda0", "cuda:1:2"] {
            assert_eq!(Device::parse(bad), Err(DeviceError::Parse(bad.to_string())), "{bad}");
        }
    }
}
