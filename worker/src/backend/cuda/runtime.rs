//! The CUDA backend's runtime (feature `cuda`): the driver, NVRTC and cuBLAS through `cudarc`.
//!
//! At open: the kernels of [`super::kernel_src`] are compiled by NVRTC for the GPU's compute
//! capability, every weight of the host model is uploaded once in the narrowest dtype that holds
//! it exactly ([`super::dtype::narrowest_exact`]: the checkpoint's stored bf16 / f16 / f32), and
//! the rest of the device memory (less a reserve) becomes the paged KV cache.
//!
//! A forward step keeps the residual stream, the attention inputs, the KV cache and the routing on
//! the device; GEMMs run in cuBLAS (`cublasGemmEx`, 16-bit weights × 16-bit activations with f32
//! accumulation and f32 output, or all f32); a MoE layer's routed experts run as one grouped GEMM
//! per projection (`cublasGemmGroupedBatchedEx`) over rows grouped by expert ([`super::moe_plan`]).
//! Two things cross to the host each step: the routing ids of each MoE layer (the row grouping is
//! planned on the host; a device-side sort would remove this sync) and the logits.
//!
//! Expert parallelism: where the executor is not local (a rank of a group), a MoE layer's input
//! rows are staged through the host and the executor's all-to-all runs as on CPU workers, the
//! routed experts computed by the executor's host weights; the affinity data path (an executor
//! that runs whole forwards itself) is refused.
//!
//! All device pointers are raw `u64`s into buffers this struct owns until the step's last
//! synchronisation; there is one stream, so no cross-stream event tracking is needed (it is
//! switched off).
#![allow(unsafe_code)]

use super::dtype::{self, WeightDtype};
use super::geometry::{self, LaunchDims};
use super::kernel_src;
use super::moe_plan;
use super::paged_kv::PagedKv;
use crate::attention::{Attention, KvCache, MlaQuery, SeqSpan};
use crate::backend::{Backend, Device, DeviceError};
use crate::config::QkNorm;
use crate::error::Result;
use crate::kernels::{DenseWeight, Linear};
use crate::model::{Ffn, ForwardOutput, LogitsMode, Model, SeqInput};
use crate::moe::{ExpertExecutor, ExpertFfn, MoeLayer, Routing};
use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Tokens per KV page.
const PAGE_SIZE: usize = 16;
/// Share of the device memory left free after the weights that the KV cache takes.
const KV_MEMORY_SHARE: f64 = 0.80;

type R<T> = std::result::Result<T, DeviceError>;

/// A model on one GPU.
pub struct CudaBackend {
    device: Device,
    model: Arc<Model>,
    /// `2 × memory clock × bus width` (double data rate), from the driver's attributes.
    peak_bandwidth_gbs: Option<f64>,
    state: Mutex<State>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("device", &self.device).finish()
    }
}

struct State {
    weights: Weights,
    run: Run,
}

/// What a step changes: the scratch buffers and the KV cache (the weights stay as uploaded).
struct Run {
    gpu: Gpu,
    kv: PagedKv,
    /// Per layer: `[slots × kv_heads × key dim]` and `[slots × kv_heads × value dim]`, f32.
    k_pool: Vec<CudaSlice<f32>>,
    v_pool: Vec<CudaSlice<f32>>,
    scratch: Scratch,
}

/// The context, its stream, cuBLAS and the compiled kernels.
struct Gpu {
    device: Device,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    /// `cublasGemmGroupedBatchedEx` answered NOT_SUPPORTED for these operand types once: the
    /// experts of a layer run one GEMM each from then on.
    grouped_unsupported: std::sync::atomic::AtomicBool,
}

/// A weight matrix `[n × k]` (row-major) on the device.
struct DevMat {
    buf: DevBuf,
    n: usize,
    k: usize,
}

enum DevBuf {
    F32(CudaSlice<f32>),
    Half(CudaSlice<u16>, WeightDtype),
}

struct DevLinear {
    w: DevMat,
    bias: Option<CudaSlice<f32>>,
}

struct DevFfn {
    gate_up: DevMat,
    down: DevMat,
    inter: usize,
}

// One per layer, built once: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum DevAttn {
    Standard {
        q: DevLinear,
        k: DevLinear,
        v: DevLinear,
        o: DevLinear,
        q_norm: Option<CudaSlice<f32>>,
        k_norm: Option<CudaSlice<f32>>,
        q_norm_len: usize,
        k_norm_len: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
        clip: Option<f32>,
    },
    Mla {
        q_direct: Option<DevLinear>,
        q_a: Option<(DevLinear, CudaSlice<f32>, DevLinear)>,
        kv_a: DevLinear,
        kv_a_norm: CudaSlice<f32>,
        kv_b: DevLinear,
        o: DevLinear,
        n_heads: usize,
        lora: usize,
        nope: usize,
        rope_dim: usize,
        v_dim: usize,
    },
}

struct DevMoe {
    router: DevMat,
    bias: Option<CudaSlice<f32>>,
    /// Every routed expert, when the host model holds them all (one process runs the layer).
    experts: Option<Vec<DevFfn>>,
    shared: Option<(DevFfn, Option<CudaSlice<f32>>)>,
}

#[allow(clippy::large_enum_variant)]
enum DevFfnKind {
    Dense(DevFfn),
    Moe(DevMoe),
}

struct DevLayer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    attn: DevAttn,
    ffn: DevFfnKind,
}

struct Weights {
    embed: DevMat,
    lm_head: Option<DevMat>,
    norm: CudaSlice<f32>,
    inv_freq: CudaSlice<f32>,
    layers: Vec<DevLayer>,
}

/// Grow-only device buffers reused across steps, one per use.
#[derive(Default)]
struct Scratch {
    f32s: HashMap<&'static str, CudaSlice<f32>>,
    u16s: HashMap<&'static str, CudaSlice<u16>>,
}

fn i32_of(v: usize, what: &str, device: Device) -> R<i32> {
    i32::try_from(v).map_err(|_| DeviceError::Unsupported { device, msg: format!("{what} = {v} exceeds the kernels' 32-bit range") })
}

fn cfg(d: LaunchDims) -> LaunchConfig {
    LaunchConfig { grid_dim: d.grid, block_dim: d.block, shared_mem_bytes: d.shared_bytes }
}

impl Gpu {
    fn err(&self, what: &str, e: impl std::fmt::Debug) -> DeviceError {
        DeviceError::Driver { device: self.device, what: what.to_string(), msg: format!("{e:?}") }
    }

    fn geom(&self, r: std::result::Result<LaunchDims, geometry::GeometryError>) -> R<LaunchDims> {
        r.map_err(|e| DeviceError::Unsupported { device: self.device, msg: e.to_string() })
    }

    fn f(&self, name: &str) -> R<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| DeviceError::Unsupported { device: self.device, msg: format!("kernel {name} was not compiled") })
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _record) = s.device_ptr(&self.stream);
        p
    }

    fn upload_f32(&self, v: &[f32]) -> R<CudaSlice<f32>> {
        self.stream.clone_htod(v).map_err(|e| self.err("upload", e))
    }

    fn upload_i32(&self, v: &[i32]) -> R<CudaSlice<i32>> {
        self.stream.clone_htod(v).map_err(|e| self.err("upload", e))
    }

    fn alloc(&self, n: usize) -> R<CudaSlice<f32>> {
        self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| self.err("alloc", e))
    }

    fn mat(&self, rows: &[f32], n: usize, k: usize) -> R<DevMat> {
        let d = dtype::narrowest_exact(rows);
        let buf = match d {
            WeightDtype::F32 => DevBuf::F32(self.upload_f32(rows)?),
            WeightDtype::Bf16 => DevBuf::Half(self.stream.clone_htod(&dtype::to_bf16_bits(rows)).map_err(|e| self.err("upload", e))?, d),
            WeightDtype::F16 => DevBuf::Half(self.stream.clone_htod(&dtype::to_f16_bits(rows)).map_err(|e| self.err("upload", e))?, d),
        };
        Ok(DevMat { buf, n, k })
    }

    fn dense(&self, w: &DenseWeight, n: usize, k: usize) -> R<DevMat> {
        self.mat(&w.to_rows(), n, k)
    }

    fn linear(&self, l: &Linear) -> R<DevLinear> {
        let bias = match &l.bias {
            Some(b) => Some(self.upload_f32(b)?),
            None => None,
        };
        Ok(DevLinear { w: self.dense(&l.weight, l.out_dim, l.in_dim)?, bias })
    }

    fn ffn(&self, f: &ExpertFfn) -> R<DevFfn> {
        Ok(DevFfn {
            gate_up: self.mat(&f.gate_up.to_rows(), 2 * f.inter, f.hidden)?,
            down: self.mat(&f.down.to_rows(), f.hidden, f.inter)?,
            inter: f.inter,
        })
    }

    fn launch<'a>(&'a self, name: &str, dims: LaunchDims, push: impl FnOnce(&mut cudarc::driver::LaunchArgs<'a>)) -> R<()> {
        let f = self.f(name)?;
        let mut b = self.stream.launch_builder(f);
        push(&mut b);
        // SAFETY: each caller pushes exactly the parameters of `name` in kernel_src's ABI (its
        // tests check the parameter lists), and every pointer is into a live buffer of at least
        // the size the launch covers (sized by the caller from the same dimensions).
        unsafe { b.launch(cfg(dims)) }.map_err(|e| self.err(name, e))?;
        Ok(())
    }
}

macro_rules! args {
    ($b:ident; $($a:expr),* $(,)?) => {{
        $( $b.arg($a); )*
    }};
}

/// Kernel wrappers: scalars bound to locals that outlive the launch call.
impl Gpu {
    fn rmsnorm(&self, x: u64, w: &CudaSlice<f32>, y: u64, rows: usize, n: usize, eps: f32) -> R<()> {
        let d = self.geom(geometry::per_row(rows))?;
        let (w, rows, n) = (self.ptr(w), i32_of(rows, "rows", self.device)?, i32_of(n, "n", self.device)?);
        self.launch("rmsnorm", d, |b| args!(b; &x, &w, &y, &rows, &n, &eps))
    }

    fn add_inplace(&self, x: u64, y: u64, n: usize) -> R<()> {
        let d = self.geom(geometry::grid_stride(n))?;
        let n = n as i64;
        self.launch("add_inplace", d, |b| args!(b; &x, &y, &n))
    }

    fn add_bias(&self, x: u64, bias: &CudaSlice<f32>, rows: usize, n: usize) -> R<()> {
        let d = self.geom(geometry::grid_stride(rows * n))?;
        let (bias, rows, n) = (self.ptr(bias), rows as i32, n as i32);
        self.launch("add_bias", d, |b| args!(b; &x, &bias, &rows, &n))
    }

    fn clamp(&self, x: u64, n: usize, c: f32) -> R<()> {
        let d = self.geom(geometry::grid_stride(n))?;
        let n = n as i64;
        self.launch("clamp_inplace", d, |b| args!(b; &x, &n, &c))
    }

    #[allow(clippy::too_many_arguments)]
    fn rope(&self, x: u64, pos: u64, inv_freq: &CudaSlice<f32>, rows: usize, n_heads: usize, head_stride: usize, offset: usize, half: usize, factor: f32, interleaved: bool) -> R<()> {
        let d = self.geom(geometry::rope(rows, n_heads, half))?;
        let inv = self.ptr(inv_freq);
        let (rows, nh, hs, off, half, il) = (rows as i32, n_heads as i32, head_stride as i32, offset as i32, half as i32, interleaved as i32);
        self.launch("rope", d, |b| args!(b; &x, &pos, &inv, &rows, &nh, &hs, &off, &half, &factor, &il))
    }

    fn silu_mul(&self, gate_up: u64, out: u64, rows: usize, inter: usize) -> R<()> {
        let d = self.geom(geometry::grid_stride(rows * inter))?;
        let (rows, inter) = (rows as i32, inter as i32);
        self.launch("silu_mul", d, |b| args!(b; &gate_up, &out, &rows, &inter))
    }

    fn kv_write(&self, src: u64, pool: u64, slots: u64, rows: usize, row_len: usize) -> R<()> {
        let d = self.geom(geometry::per_row(rows))?;
        let (rows, row_len) = (rows as i32, row_len as i32);
        self.launch("kv_write", d, |b| args!(b; &src, &pool, &slots, &rows, &row_len))
    }

    fn gather_rows(&self, x: u64, idx: u64, out: u64, rows: usize, hidden: usize) -> R<()> {
        let d = self.geom(geometry::per_row(rows))?;
        let (rows, hidden) = (rows as i32, hidden as i32);
        self.launch("gather_rows", d, |b| args!(b; &x, &idx, &out, &rows, &hidden))
    }

    fn cast16(&self, x: u64, y: u64, n: usize, d16: WeightDtype) -> R<()> {
        let d = self.geom(geometry::grid_stride(n))?;
        let n = n as i64;
        let name = if d16 == WeightDtype::F16 { "cast_f32_f16" } else { "cast_f32_bf16" };
        self.launch(name, d, |b| args!(b; &x, &y, &n))
    }
}

/// cuBLAS data type of a weight dtype.
fn blas_type(d: WeightDtype) -> blas_sys::cudaDataType {
    match d {
        WeightDtype::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        WeightDtype::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
        WeightDtype::F16 => blas_sys::cudaDataType::CUDA_R_16F,
    }
}

impl DevMat {
    fn dtype(&self) -> WeightDtype {
        match &self.buf {
            DevBuf::F32(_) => WeightDtype::F32,
            DevBuf::Half(_, d) => *d,
        }
    }
    fn ptr(&self, gpu: &Gpu) -> u64 {
        match &self.buf {
            DevBuf::F32(s) => gpu.ptr(s),
            DevBuf::Half(s, _) => gpu.ptr(s),
        }
    }
}

impl Run {
    /// A grow-only f32 scratch buffer of at least `n` values.
    fn buf(&mut self, name: &'static str, n: usize) -> R<u64> {
        let cur = self.scratch.f32s.get(name).map_or(0, |b| b.len());
        if cur < n {
            let cap = super::grown_capacity(cur, n);
            let b = self.gpu.alloc(cap)?;
            self.scratch.f32s.insert(name, b);
        }
        Ok(self.gpu.ptr(&self.scratch.f32s[name]))
    }

    fn buf16(&mut self, name: &'static str, n: usize) -> R<u64> {
        let cur = self.scratch.u16s.get(name).map_or(0, |b| b.len());
        if cur < n {
            let cap = super::grown_capacity(cur, n);
            let b = self.gpu.stream.alloc_zeros::<u16>(cap.max(1)).map_err(|e| self.gpu.err("alloc", e))?;
            self.scratch.u16s.insert(name, b);
        }
        Ok(self.gpu.ptr(&self.scratch.u16s[name]))
    }

    /// `out[m×n] = x[m×k]·Wᵀ` (f32 x and out; W in its stored dtype), cuBLAS column-major:
    /// `outᵀ = W·xᵀ`, i.e. op(A) = Wᵀ of the column-major `[k×n]` W.
    fn gemm(&mut self, x: u64, w: &DevMat, out: u64, m: usize) -> R<()> {
        if m == 0 {
            return Ok(());
        }
        let dt = w.dtype();
        let b = if dt == WeightDtype::F32 {
            x
        } else {
            let x16 = self.buf16("gemm_x16", m * w.k)?;
            self.gpu.cast16(x, x16, m * w.k, dt)?;
            x16
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dev = self.gpu.device;
        // SAFETY: W holds n·k values of `dt`, b holds m·k, out m·n f32: the leading dimensions
        // below are those of the row-major shapes.
        unsafe {
            blas_result::gemm_ex(
                *self.gpu.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                i32_of(w.n, "n", dev)?,
                i32_of(m, "m", dev)?,
                i32_of(w.k, "k", dev)?,
                &alpha as *const f32 as *const _,
                w.ptr(&self.gpu) as *const _,
                blas_type(dt),
                w.k as i32,
                b as *const _,
                blas_type(dt),
                w.k as i32,
                &beta as *const f32 as *const _,
                out as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                w.n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| self.gpu.err("cublasGemmEx", e))
    }

    fn linear(&mut self, x: u64, l: &DevLinear, out: u64, m: usize) -> R<()> {
        self.gemm(x, &l.w, out, m)?;
        if let Some(bias) = &l.bias {
            self.gpu.add_bias(out, bias, m, l.w.n)?;
        }
        Ok(())
    }
}

impl Run {
    /// The routed experts of one layer on the rows `xg` grouped by expert: `y[R×h]`, one grouped
    /// GEMM per projection where cuBLAS takes the operand types, else one GEMM per expert.
    fn experts(&mut self, experts: &[DevFfn], plan: &moe_plan::MoePlan, xg: u64, hidden: usize) -> R<u64> {
        let rows = plan.rows();
        let inter = plan.groups.first().map_or(0, |g| experts[g.expert].inter);
        let gu = self.buf("moe_gate_up", rows * 2 * inter)?;
        let mid = self.buf("moe_mid", rows * inter)?;
        let y = self.buf("moe_y", rows * hidden)?;
        let gate_up: Vec<(&DevMat, usize, usize)> = plan.groups.iter().map(|g| (&experts[g.expert].gate_up, g.start, g.rows)).collect();
        self.grouped_gemm(&gate_up, xg, hidden, gu, 2 * inter)?;
        self.gpu.silu_mul(gu, mid, rows, inter)?;
        let down: Vec<(&DevMat, usize, usize)> = plan.groups.iter().map(|g| (&experts[g.expert].down, g.start, g.rows)).collect();
        self.grouped_gemm(&down, mid, inter, y, hidden)?;
        Ok(y)
    }

    /// For each `(W, start, rows)`: `out[start..start+rows] = x[start..start+rows]·Wᵀ` with rows of
    /// `k` inputs and `n` outputs.
    fn grouped_gemm(&mut self, groups: &[(&DevMat, usize, usize)], x: u64, k: usize, out: u64, n: usize) -> R<()> {
        let Some(first) = groups.first() else { return Ok(()) };
        let dt = first.0.dtype();
        let same_dtype = groups.iter().all(|g| g.0.dtype() == dt);
        let total: usize = groups.iter().map(|g| g.1 + g.2).max().unwrap_or(0);
        let grouped = same_dtype && groups.len() > 1 && !self.gpu.grouped_unsupported.load(std::sync::atomic::Ordering::Relaxed);
        if grouped {
            let b = if dt == WeightDtype::F32 {
                x
            } else {
                let x16 = self.buf16("grouped_x16", total * k)?;
                self.gpu.cast16(x, x16, total * k, dt)?;
                x16
            };
            let esz = dt.bytes() as u64;
            let a_ptrs: Vec<u64> = groups.iter().map(|g| g.0.ptr(&self.gpu)).collect();
            let b_ptrs: Vec<u64> = groups.iter().map(|g| b + (g.1 * k) as u64 * esz).collect();
            let c_ptrs: Vec<u64> = groups.iter().map(|g| out + (g.1 * n) as u64 * 4).collect();
            match self.grouped_call(groups, dt, &a_ptrs, &b_ptrs, &c_ptrs, k, n) {
                Ok(()) => return Ok(()),
                Err(e) if e.0 == blas_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED || e.0 == blas_sys::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE => {
                    tracing::warn!(device = %self.gpu.device, dtype = dt.name(), "cublasGemmGroupedBatchedEx does not take these operand types: one GEMM per expert from now on");
                    self.gpu.grouped_unsupported.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => return Err(self.gpu.err("cublasGemmGroupedBatchedEx", e)),
            }
        }
        for &(w, start, rows) in groups {
            self.gemm(x + (start * k * 4) as u64, w, out + (start * n * 4) as u64, rows)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn grouped_call(&mut self, groups: &[(&DevMat, usize, usize)], dt: WeightDtype, a: &[u64], b: &[u64], c: &[u64], k: usize, n: usize) -> std::result::Result<(), blas_result::CublasError> {
        let g = groups.len();
        let upload = |v: &[u64]| self.gpu.stream.clone_htod(v).map_err(|_| blas_result::CublasError(blas_sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED));
        let (da, db, dc) = (upload(a)?, upload(b)?, upload(c)?);
        let ta = vec![blas_sys::cublasOperation_t::CUBLAS_OP_T; g];
        let tb = vec![blas_sys::cublasOperation_t::CUBLAS_OP_N; g];
        let ms = vec![n as i32; g];
        let ns: Vec<i32> = groups.iter().map(|x| x.2 as i32).collect();
        let ks = vec![k as i32; g];
        let alphas = vec![1.0f32; g];
        let betas = vec![0.0f32; g];
        let ldas = vec![k as i32; g];
        let ldcs = vec![n as i32; g];
        let sizes = vec![1i32; g];
        let (pa, pb, pc) = (self.gpu.ptr(&da), self.gpu.ptr(&db), self.gpu.ptr(&dc));
        // SAFETY: the pointer arrays are device copies of `g` pointers into live weight and
        // scratch buffers sized for these m/n/k; the host arrays hold `g` entries each.
        let status = unsafe {
            blas_sys::cublasGemmGroupedBatchedEx(
                *self.gpu.blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                ms.as_ptr(),
                ns.as_ptr(),
                ks.as_ptr(),
                alphas.as_ptr() as *const _,
                pa as *const *const _,
                blas_type(dt),
                ldas.as_ptr(),
                pb as *const *const _,
                blas_type(dt),
                ldas.as_ptr(),
                betas.as_ptr() as *const _,
                pc as *const *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                ldcs.as_ptr(),
                g as i32,
                sizes.as_ptr(),
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        };
        // Dropping the pointer arrays frees them in stream order, after the GEMMs that read them;
        // cuBLAS reads the host arrays during the call.
        status.result()
    }
}

/// The batch layout of one step, uploaded once.
struct StepLayout {
    t: usize,
    /// Absolute position of each row.
    pos: CudaSlice<i32>,
    /// KV slot of each new row.
    slots: CudaSlice<i32>,
    seq_of_row: CudaSlice<i32>,
    table: CudaSlice<i32>,
    table_start: CudaSlice<i32>,
}

impl CudaBackend {
    /// Open GPU `ordinal`, compile the kernels, upload `model`'s weights and size the KV cache.
    pub fn open(ordinal: usize, model: Arc<Model>) -> Result<CudaBackend> {
        let device = Device::Cuda(ordinal);
        // SAFETY: only tries to dlopen the libraries (cudarc panics on a missing one otherwise).
        let present = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::cublas::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() };
        if !present {
            return Err(DeviceError::NoDriver { device }.into());
        }
        let drv = |what: &'static str| move |e: cudarc::driver::DriverError| DeviceError::Driver { device, what: what.into(), msg: format!("{e:?}") };
        let count = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))?.max(0) as usize;
        if ordinal >= count {
            return Err(DeviceError::NoSuchDevice { device, found: count }.into());
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuCtxCreate"))?;
        // SAFETY: one stream does all the work, so cross-stream event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability().map_err(drv("compute capability"))?;
        let opts = cudarc::nvrtc::CompileOptions { options: vec![format!("--gpu-architecture=sm_{major}{minor}")], ..Default::default() };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(kernel_src::source(), opts).map_err(|e| DeviceError::Compile { device, log: format!("{e:?}") })?;
        let module = ctx.load_module(ptx).map_err(drv("cuModuleLoad"))?;
        let mut functions = HashMap::new();
        for &name in kernel_src::KERNELS {
            functions.insert(name, module.load_function(name).map_err(drv("cuModuleGetFunction"))?);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| DeviceError::Driver { device, what: "cublasCreate".into(), msg: format!("{e:?}") })?;
        let gpu = Gpu { device, ctx: ctx.clone(), stream, blas, functions, grouped_unsupported: Default::default() };
        let weights = upload(&gpu, &model)?;
        gpu.stream.synchronize().map_err(|e| gpu.err("upload", e))?;
        let (kvh, kd, vd) = model.config.attn.kv_layout();
        let (k_row, v_row) = (kvh * kd, kvh * vd);
        let n_layers = model.config.n_layers;
        let (free, _total) = ctx.mem_get_info().map_err(drv("cuMemGetInfo"))?;
        let per_slot = (n_layers * (k_row + v_row) * 4) as u64;
        let budget = (free as f64 * KV_MEMORY_SHARE) as u64;
        let pages = PagedKv::pages_for_budget(budget, PAGE_SIZE, per_slot).min(i32::MAX as usize / PAGE_SIZE);
        let kv = PagedKv::new(PAGE_SIZE, pages).map_err(|e| DeviceError::KvFull { device, msg: e.to_string() })?;
        let slots = kv.slots();
        let mut k_pool = Vec::with_capacity(n_layers);
        let mut v_pool = Vec::with_capacity(n_layers);
        for _ in 0..n_layers {
            k_pool.push(gpu.alloc(slots * k_row)?);
            v_pool.push(gpu.alloc(slots * v_row)?);
        }
        use cudarc::driver::sys::CUdevice_attribute as A;
        let peak_bandwidth_gbs = match (ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE), ctx.attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)) {
            (Ok(khz), Ok(bits)) if khz > 0 && bits > 0 => Some(2.0 * khz as f64 * 1e3 * bits as f64 / 8.0 / 1e9),
            _ => None,
        };
        tracing::info!(%device, sm = format!("{major}.{minor}"), kv_pages = pages, kv_tokens = slots, ?peak_bandwidth_gbs, "CUDA backend ready");
        let run = Run { gpu, kv, k_pool, v_pool, scratch: Scratch::default() };
        Ok(CudaBackend { device, model, peak_bandwidth_gbs, state: Mutex::new(State { weights, run }) })
    }
}

/// Every weight of `model` on the device (routed experts only where the model holds them all).
fn upload(gpu: &Gpu, model: &Model) -> R<Weights> {
    let c = &model.config;
    let h = c.hidden_size;
    let embed = gpu.dense(&model.embed, c.vocab_size, h)?;
    let lm_head = match &model.lm_head {
        Some(w) => Some(gpu.dense(w, c.vocab_size, h)?),
        None => None,
    };
    let mut layers = Vec::with_capacity(model.layers.len());
    for l in &model.layers {
        let attn = match &l.attn {
            Attention::Standard { q, k, v, o, qk_norm, q_norm, k_norm, n_heads, n_kv_heads, head_dim, clip_qkv } => {
                let norms = !matches!(qk_norm, QkNorm::None);
                let up = |n: &Option<Vec<f32>>| -> R<Option<CudaSlice<f32>>> {
                    match n {
                        Some(v) if norms => Ok(Some(gpu.upload_f32(v)?)),
                        _ => Ok(None),
                    }
                };
                DevAttn::Standard {
                    q: gpu.linear(q)?,
                    k: gpu.linear(k)?,
                    v: gpu.linear(v)?,
                    o: gpu.linear(o)?,
                    q_norm: up(q_norm)?,
                    k_norm: up(k_norm)?,
                    q_norm_len: q_norm.as_ref().map_or(0, |v| v.len()),
                    k_norm_len: k_norm.as_ref().map_or(0, |v| v.len()),
                    n_heads: *n_heads,
                    n_kv: *n_kv_heads,
                    head_dim: *head_dim,
                    clip: *clip_qkv,
                }
            }
            Attention::Mla { q, kv_a, kv_a_norm, kv_b, o, n_heads, kv_lora_rank, nope, rope_dim, v_dim } => {
                let (q_direct, q_a) = match q {
                    MlaQuery::Direct(l) => (Some(gpu.linear(l)?), None),
                    MlaQuery::LowRank { a, norm, b } => (None, Some((gpu.linear(a)?, gpu.upload_f32(norm)?, gpu.linear(b)?))),
                };
                DevAttn::Mla {
                    q_direct,
                    q_a,
                    kv_a: gpu.linear(kv_a)?,
                    kv_a_norm: gpu.upload_f32(kv_a_norm)?,
                    kv_b: gpu.linear(kv_b)?,
                    o: gpu.linear(o)?,
                    n_heads: *n_heads,
                    lora: *kv_lora_rank,
                    nope: *nope,
                    rope_dim: *rope_dim,
                    v_dim: *v_dim,
                }
            }
        };
        let ffn = match &l.ffn {
            Ffn::Dense(f) => DevFfnKind::Dense(gpu.ffn(f)?),
            Ffn::Moe(m) => DevFfnKind::Moe(upload_moe(gpu, m)?),
        };
        layers.push(DevLayer { input_norm: gpu.upload_f32(&l.input_norm)?, post_norm: gpu.upload_f32(&l.post_norm)?, attn, ffn });
    }
    Ok(Weights { embed, lm_head, norm: gpu.upload_f32(&model.norm)?, inv_freq: gpu.upload_f32(&model.rope.inv_freq)?, layers })
}

fn upload_moe(gpu: &Gpu, m: &MoeLayer) -> R<DevMoe> {
    let r = &m.router;
    let experts = if m.experts.iter().all(Option::is_some) {
        Some(m.experts.iter().flatten().map(|f| gpu.ffn(f)).collect::<R<Vec<_>>>()?)
    } else {
        None
    };
    let shared = match &m.shared {
        Some(s) => Some((gpu.ffn(&s.ffn)?, s.gate.as_ref().map(|g| gpu.upload_f32(g)).transpose()?)),
        None => None,
    };
    Ok(DevMoe {
        router: gpu.mat(&r.weight, r.cfg.n_experts, r.hidden)?,
        bias: r.correction_bias.as_ref().map(|b| gpu.upload_f32(b)).transpose()?,
        experts,
        shared,
    })
}

mod step;

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        self.device
    }

    fn host_model(&self) -> &Model {
        &self.model
    }

    /// The host side of a device-resident cache: its id and length. The keys and values live in
    /// device pages (the host layers stay empty).
    fn new_cache(&self) -> KvCache {
        let (kvh, kd, vd) = self.model.config.attn.kv_layout();
        KvCache::new(0, kvh, kd, vd)
    }

    fn forward_step(&self, seqs: &mut [SeqInput], mode: LogitsMode, exec: &dyn ExpertExecutor) -> Result<ForwardOutput> {
        if exec.runs_whole_forward(&self.model) {
            return Err(DeviceError::Unsupported { device: self.device, msg: "the affinity data path runs on CPU workers only (use --data-path home)".into() }.into());
        }
        let mut st = self.state.lock().map_err(|_| DeviceError::Unsupported { device: self.device, msg: "an earlier step panicked".into() })?;
        step::forward(&self.model, &mut st, seqs, mode, exec)
    }

    fn release_sequence(&self, cache: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.run.kv.release(cache);
        }
    }

    fn peak_memory_bandwidth_gbs(&self) -> Option<f64> {
        self.peak_bandwidth_gbs
    }
}

