//! The CUDA backend: weights, activations, KV cache and routing on one GPU.
//!
//! Everything that decides *what* to launch is plain Rust that compiles and is unit-tested
//! without a GPU (and without the `cuda` feature): [`kernel_src`] generates the CUDA C that NVRTC
//! compiles at start-up, [`geometry`] the launch shapes, [`paged_kv`] the KV page tables,
//! [`moe_plan`] the host-side row grouping a rank of an expert-parallel group plans its
//! all-to-all with (one process running every expert groups on the device instead), [`dtype`] the upload dtype of each
//! weight. The forward step ([`step`]) is written once against [`ops::Ops`]: `runtime` (feature
//! `cuda`, the only code that touches the driver, cuBLAS and NVRTC through `cudarc`) implements it
//! on a GPU, [`reference`] on the host with the CPU backend's numerics, so the step is tested
//! against the CPU backend on every machine.
pub mod dtype;
pub mod geometry;
pub mod kernel_src;
mod moe_layer;
pub mod moe_plan;
pub mod ops;
pub mod paged_kv;
pub mod reference;
pub mod step;
#[cfg(feature = "cuda")]
mod runtime;

use super::Backend;
use crate::model::Model;
use std::sync::Arc;

/// Capacity of a grow-only buffer that holds `current` values and must hold `needed`: at least
/// 1.5× the old one and rounded up to 256 values, so a batch that grows a little at a time
/// reallocates O(log n) times, not every step.
pub fn grown_capacity(current: usize, needed: usize) -> usize {
    if needed <= current {
        return current;
    }
    let target = needed.max(current + current / 2);
    target.div_ceil(256) * 256
}

/// Whether GPU `ordinal` can be used (the libraries load and the device exists), without
/// creating a context: a worker checks its `--device` at start and exits with the reason.
pub fn probe(ordinal: usize) -> Result<(), super::DeviceError> {
    #[cfg(feature = "cuda")]
    {
        runtime::probe(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(super::DeviceError::NotBuilt { device: super::Device::Cuda(ordinal) })
    }
}

/// Open `model` on GPU `ordinal`: weights uploaded once, kernels compiled by NVRTC.
pub fn open(ordinal: usize, model: Arc<Model>, opts: &super::OpenOptions) -> crate::error::Result<Arc<dyn Backend>> {
    #[cfg(feature = "cuda")]
    {
        Ok(Arc::new(runtime::open(ordinal, model, opts)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        drop((model, opts));
        Err(super::DeviceError::NotBuilt { device: super::Device::Cuda(ordinal) }.into())
    }
}

/// splitmix64 for the tests of this module's parts: small, deterministic, no dependency.
#[cfg(test)]
pub(crate) struct TestRng(pub u64);

#[cfg(test)]
impl TestRng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_geometrically_and_never_shrink() {
        assert_eq!(grown_capacity(0, 1), 256);
        assert_eq!(grown_capacity(1024, 100), 1024);
        assert_eq!(grown_capacity(1024, 1025), 1536);
        assert_eq!(grown_capacity(1024, 4000), 4096);
        let (mut cap, mut reallocs) = (0, 0);
        for n in 1..100_000 {
            let c = grown_capacity(cap, n);
            assert!(c >= n && c.is_multiple_of(256));
            if c != cap {
                reallocs += 1;
                cap = c;
            }
        }
        assert!(reallocs < 30, "{reallocs} reallocations for a batch growing one value at a time");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_build_without_cuda_says_so() {
        let dir = std::env::temp_dir().join(format!("sy-cuda-notbuilt-{}", std::process::id()));
        crate::synth::write_checkpoint(&dir, &crate::synth::SynthSpec::tiny()).expect("checkpoint");
        let m = std::sync::Arc::new(Model::load(&dir, &Default::default()).expect("load"));
        let _ = std::fs::remove_dir_all(&dir);
        let e = open(0, m, &Default::default()).expect_err("no cuda feature");
        assert!(matches!(e, crate::error::ModelError::Device(crate::backend::DeviceError::NotBuilt { device: crate::backend::Device::Cuda(0) })), "{e}");
    }
}
