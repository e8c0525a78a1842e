//! [`Ops`] on a GPU (feature `cuda`): the driver, NVRTC and cuBLAS through `cudarc`.
//!
//! At open the kernels of [`super::kernel_src`] are compiled by NVRTC for the GPU's compute
//! capability; [`super::step::DeviceBackend`] then uploads the weights through
//! [`Ops::upload_matrix`] (the narrowest dtype that holds each exactly: the checkpoint's bf16 /
//! f16 / f32). GEMMs run in cuBLAS (`cublasGemmEx`: 16-bit weights × 16-bit activations, f32
//! accumulation and output, or f32 × f32 without TF32); a MoE layer's experts as one
//! `cublasGemmGroupedBatchedEx` per projection, falling back to one GEMM per expert where cuBLAS
//! answers NOT_SUPPORTED for the operand types.
//!
//! Addresses are raw device pointers into buffers this struct owns (kept, scratch, step); one
//! stream does all the work, so cross-stream event tracking is switched off, and a buffer freed
//! while kernels that read it are queued is freed in stream order.
#![allow(unsafe_code)]

use super::dtype::{self, WeightDtype};
use super::geometry::LaunchDims;
use super::kernel_src;
use super::ops::{f32_at, stage_rows, Addr, Kernel, Mat, Ops, R};
use super::step::DeviceBackend;
use crate::backend::{Device, DeviceError};
use crate::error::Result;
use crate::model::Model;
use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchArgs, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

/// The CUDA backend: the device step over [`CudaOps`].
pub type CudaBackend = DeviceBackend<CudaOps>;

/// Open GPU `ordinal`, compile the kernels and upload `model`.
pub fn open(ordinal: usize, model: Arc<Model>, opts: &crate::backend::OpenOptions) -> Result<CudaBackend> {
    let ops = CudaOps::new(ordinal)?;
    DeviceBackend::new(ops, model, opts)
}

enum Buf {
    F32(CudaSlice<f32>),
    U16(CudaSlice<u16>),
    I32(CudaSlice<i32>),
    U32(CudaSlice<u32>),
    U64(CudaSlice<u64>),
}

/// A GPU, its stream, cuBLAS and the compiled kernels.
pub struct CudaOps {
    device: Device,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    kept: Vec<Buf>,
    step: Vec<Buf>,
    scratch: HashMap<&'static str, CudaSlice<f32>>,
    scratch16: Option<CudaSlice<u16>>,
    /// `cublasGemmGroupedBatchedEx` refused these operand types once: one GEMM per expert now.
    grouped_unsupported: bool,
    peak_bandwidth_gbs: Option<f64>,
}

// SAFETY: the cuBLAS handle and the buffers are used only through `&mut self` (the device
// backend's mutex), i.e. from one thread at a time; cuBLAS handles may move between threads.
unsafe impl Send for CudaOps {}

fn cfg(d: LaunchDims) -> LaunchConfig {
    LaunchConfig { grid_dim: d.grid, block_dim: d.block, shared_mem_bytes: d.shared_bytes }
}

fn blas_type(d: WeightDtype) -> blas_sys::cudaDataType {
    match d {
        WeightDtype::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        WeightDtype::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
        WeightDtype::F16 => blas_sys::cudaDataType::CUDA_R_16F,
    }
}

/// The libraries load and GPU `ordinal` exists.
pub fn probe(ordinal: usize) -> R<()> {
    let device = Device::Cuda(ordinal);
    // SAFETY: only tries to dlopen the libraries (cudarc panics on a missing one otherwise).
    let present = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::cublas::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() };
    if !present {
        return Err(DeviceError::NoDriver { device });
    }
    let count = CudaContext::device_count().map_err(|e| DeviceError::Driver { device, what: "cuDeviceGetCount".into(), msg: format!("{e:?}") })?.max(0) as usize;
    if ordinal >= count {
        return Err(DeviceError::NoSuchDevice { device, found: count });
    }
    Ok(())
}

impl CudaOps {
    pub fn new(ordinal: usize) -> R<CudaOps> {
        let device = Device::Cuda(ordinal);
        probe(ordinal)?;
        let drv = |what: &'static str| move |e: cudarc::driver::DriverError| DeviceError::Driver { device, what: what.into(), msg: format!("{e:?}") };
        let ctx = CudaContext::new(ordinal).map_err(drv("cuCtxCreate"))?;
        // SAFETY: one stream does all the work, so cross-stream event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) = ctx.compute_capability().map_err(drv("compute capability"))?;
        // A virtual architecture: NVRTC emits PTX for it (a real `sm_XY` makes it emit a cubin,
        // and `compile_ptx` asks for PTX), which the driver compiles for this GPU at load.
        let opts = cudarc::nvrtc::CompileOptions { options: vec![format!("--gpu-architecture=compute_{major}{minor}")], ..Default::default() };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(kernel_src::source(), opts).map_err(|e| DeviceError::Compile { device, log: format!("{e:?}") })?;
        let module = ctx.load_module(ptx).map_err(drv("cuModuleLoad"))?;
        let mut functions = HashMap::new();
        for &name in kernel_src::KERNELS {
            functions.insert(name, module.load_function(name).map_err(drv("cuModuleGetFunction"))?);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| DeviceError::Driver { device, what: "cublasCreate".into(), msg: format!("{e:?}") })?;
        use cudarc::driver::sys::CUdevice_attribute as A;
        // Double data rate: two transfers per memory clock (kHz) over the bus (bits).
        let peak_bandwidth_gbs = match (ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE), ctx.attribute(A::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)) {
            (Ok(khz), Ok(bits)) if khz > 0 && bits > 0 => Some(2.0 * khz as f64 * 1e3 * bits as f64 / 8.0 / 1e9),
            _ => None,
        };
        tracing::info!(%device, sm = format!("{major}.{minor}"), ?peak_bandwidth_gbs, "CUDA kernels compiled");
        Ok(CudaOps {
            device,
            ctx,
            stream,
            blas,
            functions,
            kept: vec![],
            step: vec![],
            scratch: HashMap::new(),
            scratch16: None,
            grouped_unsupported: false,
            peak_bandwidth_gbs,
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Debug) -> DeviceError {
        DeviceError::Driver { device: self.device, what: what.to_string(), msg: format!("{e:?}") }
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> Addr {
        let (p, _record) = s.device_ptr(&self.stream);
        p
    }

    fn buf_ptr(&self, b: &Buf) -> Addr {
        match b {
            Buf::F32(s) => self.ptr(s),
            Buf::U16(s) => self.ptr(s),
            Buf::I32(s) => self.ptr(s),
            Buf::U32(s) => self.ptr(s),
            Buf::U64(s) => self.ptr(s),
        }
    }

    fn keep(&mut self, b: Buf) -> Addr {
        let a = self.buf_ptr(&b);
        self.kept.push(b);
        a
    }

    fn for_step(&mut self, b: Buf) -> Addr {
        let a = self.buf_ptr(&b);
        self.step.push(b);
        a
    }

    /// A 16-bit copy of `n` f32 values at `x`, in a grow-only buffer.
    fn cast16(&mut self, x: Addr, n: usize, d: WeightDtype) -> R<Addr> {
        let cur = self.scratch16.as_ref().map_or(0, |b| b.len());
        if cur < n {
            let b = self.stream.alloc_zeros::<u16>(super::grown_capacity(cur, n)).map_err(|e| self.err("alloc", e))?;
            self.scratch16 = Some(b);
        }
        let y = self.ptr(self.scratch16.as_ref().expect("allocated above"));
        self.launch(&Kernel::Cast { x, y, n, dtype: d })?;
        Ok(y)
    }

    fn run<'a>(&'a self, name: &str, dims: LaunchDims, push: impl FnOnce(&mut LaunchArgs<'a>)) -> R<()> {
        let f = self.functions.get(name).ok_or_else(|| DeviceError::Unsupported { device: self.device, msg: format!("kernel {name} was not compiled") })?;
        let mut b = self.stream.launch_builder(f);
        push(&mut b);
        // SAFETY: `launch` pushes exactly the parameters of `name` in kernel_src's ABI (its tests
        // check the parameter lists) and every address is into a live buffer of at least the
        // size the launch covers (the step sizes buffers from the same dimensions).
        unsafe { b.launch(cfg(dims)) }.map_err(|e| self.err(name, e))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn grouped_call(&mut self, groups: &[(Mat, usize, usize)], dt: WeightDtype, b: Addr, k: usize, out: Addr, n: usize) -> std::result::Result<(), blas_result::CublasError> {
        let g = groups.len();
        let esz = dt.bytes() as u64;
        let a_ptrs: Vec<u64> = groups.iter().map(|x| x.0.addr).collect();
        let b_ptrs: Vec<u64> = groups.iter().map(|x| b + (x.1 * k) as u64 * esz).collect();
        let c_ptrs: Vec<u64> = groups.iter().map(|x| f32_at(out, x.1 * n)).collect();
        let alloc_failed = |_| blas_result::CublasError(blas_sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED);
        let (da, db, dc) = (self.stream.clone_htod(&a_ptrs).map_err(alloc_failed)?, self.stream.clone_htod(&b_ptrs).map_err(alloc_failed)?, self.stream.clone_htod(&c_ptrs).map_err(alloc_failed)?);
        let ta = vec![blas_sys::cublasOperation_t::CUBLAS_OP_T; g];
        let tb = vec![blas_sys::cublasOperation_t::CUBLAS_OP_N; g];
        let ms = vec![n as i32; g];
        let ns: Vec<i32> = groups.iter().map(|x| x.2 as i32).collect();
        let ks = vec![k as i32; g];
        let (alphas, betas) = (vec![1.0f32; g], vec![0.0f32; g]);
        let (lds, ldcs, sizes) = (vec![k as i32; g], vec![n as i32; g], vec![1i32; g]);
        let (pa, pb, pc) = (self.ptr(&da), self.ptr(&db), self.ptr(&dc));
        // SAFETY: the pointer arrays are device copies of `g` pointers into live weight and
        // scratch buffers sized for these m/n/k; every host array holds `g` entries; cuBLAS reads
        // the host arrays during the call, and the device arrays are freed in stream order after.
        let status = unsafe {
            blas_sys::cublasGemmGroupedBatchedEx(
                *self.blas.handle(),
                ta.as_ptr(),
                tb.as_ptr(),
                ms.as_ptr(),
                ns.as_ptr(),
                ks.as_ptr(),
                alphas.as_ptr() as *const _,
                pa as *const *const _,
                blas_type(dt),
                lds.as_ptr(),
                pb as *const *const _,
                blas_type(dt),
                lds.as_ptr(),
                betas.as_ptr() as *const _,
                pc as *const *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                ldcs.as_ptr(),
                g as i32,
                sizes.as_ptr(),
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        };
        status.result()
    }
}

impl Ops for CudaOps {
    fn device(&self) -> Device {
        self.device
    }

    fn upload_matrix(&mut self, rows: &[f32], n: usize, k: usize) -> R<Mat> {
        let d = dtype::narrowest_exact(rows);
        let buf = match d {
            WeightDtype::F32 => Buf::F32(self.stream.clone_htod(rows).map_err(|e| self.err("upload", e))?),
            WeightDtype::Bf16 => Buf::U16(self.stream.clone_htod(&dtype::to_bf16_bits(rows)).map_err(|e| self.err("upload", e))?),
            WeightDtype::F16 => Buf::U16(self.stream.clone_htod(&dtype::to_f16_bits(rows)).map_err(|e| self.err("upload", e))?),
        };
        Ok(Mat { addr: self.keep(buf), dtype: d, n, k })
    }

    fn upload_f32(&mut self, v: &[f32]) -> R<Addr> {
        let b = self.stream.clone_htod(v).map_err(|e| self.err("upload", e))?;
        Ok(self.keep(Buf::F32(b)))
    }

    fn alloc_kept(&mut self, n: usize) -> R<Addr> {
        let b = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| self.err("alloc", e))?;
        Ok(self.keep(Buf::F32(b)))
    }

    fn free_kept(&mut self, a: Addr) {
        if let Some(i) = self.kept.iter().position(|b| self.buf_ptr(b) == a) {
            // Freed in stream order, after the kernels queued on it.
            self.kept.swap_remove(i);
        }
    }

    fn free_bytes(&self) -> R<u64> {
        self.stream.synchronize().map_err(|e| self.err("synchronize", e))?;
        let (free, _total) = self.ctx.mem_get_info().map_err(|e| self.err("cuMemGetInfo", e))?;
        Ok(free as u64)
    }

    fn scratch(&mut self, name: &'static str, n: usize) -> R<Addr> {
        let cur = self.scratch.get(name).map_or(0, |b| b.len());
        if cur < n {
            // The old buffer is freed in stream order, after the kernels queued on it.
            let b = self.stream.alloc_zeros::<f32>(super::grown_capacity(cur, n)).map_err(|e| self.err("alloc", e))?;
            self.scratch.insert(name, b);
        }
        Ok(self.ptr(&self.scratch[name]))
    }

    fn step_i32(&mut self, v: &[i32]) -> R<Addr> {
        let b = self.stream.clone_htod(if v.is_empty() { &[0][..] } else { v }).map_err(|e| self.err("upload", e))?;
        Ok(self.for_step(Buf::I32(b)))
    }

    fn step_u32(&mut self, v: &[u32]) -> R<Addr> {
        let b = self.stream.clone_htod(if v.is_empty() { &[0][..] } else { v }).map_err(|e| self.err("upload", e))?;
        Ok(self.for_step(Buf::U32(b)))
    }

    fn step_f32(&mut self, v: &[f32]) -> R<Addr> {
        let b = self.stream.clone_htod(if v.is_empty() { &[0.0][..] } else { v }).map_err(|e| self.err("upload", e))?;
        Ok(self.for_step(Buf::F32(b)))
    }

    fn step_addrs(&mut self, v: &[Addr]) -> R<Addr> {
        let b = self.stream.clone_htod(if v.is_empty() { &[0][..] } else { v }).map_err(|e| self.err("upload", e))?;
        Ok(self.for_step(Buf::U64(b)))
    }

    fn step_zeros(&mut self, n: usize) -> R<Addr> {
        let b = self.stream.alloc_zeros::<f32>(n.max(1)).map_err(|e| self.err("alloc", e))?;
        Ok(self.for_step(Buf::F32(b)))
    }

    fn write_f32(&mut self, a: Addr, v: &[f32]) -> R<()> {
        self.stream.synchronize().map_err(|e| self.err("synchronize", e))?;
        // SAFETY: `a` addresses at least `v.len()` f32 of a live buffer (the step sized it).
        unsafe { cudarc::driver::result::memcpy_htod_sync(a, v) }.map_err(|e| self.err("cuMemcpyHtoD", e))
    }

    fn read_f32(&mut self, a: Addr, n: usize) -> R<Vec<f32>> {
        self.stream.synchronize().map_err(|e| self.err("synchronize", e))?;
        let mut v = vec![0f32; n];
        // SAFETY: `a` addresses at least `n` f32 of a live buffer; the stream's work is done.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut v, a) }.map_err(|e| self.err("cuMemcpyDtoH", e))?;
        Ok(v)
    }

    fn read_u32(&mut self, a: Addr, n: usize) -> R<Vec<u32>> {
        self.stream.synchronize().map_err(|e| self.err("synchronize", e))?;
        let mut v = vec![0u32; n];
        // SAFETY: as in read_f32.
        unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut v, a) }.map_err(|e| self.err("cuMemcpyDtoH", e))?;
        Ok(v)
    }

    fn begin_step(&mut self) -> R<()> {
        // cuBLAS needs the context current on the stepping thread (the rank loop's).
        self.ctx.bind_to_thread().map_err(|e| self.err("cuCtxSetCurrent", e))
    }

    fn end_step(&mut self) {
        self.step.clear();
    }

    fn launch(&mut self, k: &Kernel) -> R<()> {
        let dims = k.geometry().map_err(|e| DeviceError::Unsupported { device: self.device, msg: e.to_string() })?;
        let name = k.name();
        let i = |v: usize| v as i32;
        match k {
            Kernel::EmbedRows { table, ids, out, rows } => {
                let (t, r, h) = (table.addr, i(*rows), i(table.k));
                self.run(name, dims, |b| {
                    b.arg(&t).arg(ids).arg(out).arg(&r).arg(&h);
                })
            }
            Kernel::Cast { x, y, n, .. } => {
                let n = *n as i64;
                self.run(name, dims, |b| {
                    b.arg(x).arg(y).arg(&n);
                })
            }
            Kernel::Rmsnorm { x, w, y, rows, n, eps } => {
                let (r, n) = (i(*rows), i(*n));
                self.run(name, dims, |b| {
                    b.arg(x).arg(w).arg(y).arg(&r).arg(&n).arg(eps);
                })
            }
            Kernel::AddInplace { x, y, n } => {
                let n = *n as i64;
                self.run(name, dims, |b| {
                    b.arg(x).arg(y).arg(&n);
                })
            }
            Kernel::AddBias { x, b: bias, rows, n } => {
                let (r, n) = (i(*rows), i(*n));
                self.run(name, dims, |b| {
                    b.arg(x).arg(bias).arg(&r).arg(&n);
                })
            }
            Kernel::Clamp { x, n, c } => {
                let n = *n as i64;
                self.run(name, dims, |b| {
                    b.arg(x).arg(&n).arg(c);
                })
            }
            Kernel::Rope { x, pos, inv_freq, rows, n_heads, head_stride, offset, half, factor, interleaved } => {
                let (r, nh, hs, off, hf, il) = (i(*rows), i(*n_heads), i(*head_stride), i(*offset), i(*half), *interleaved as i32);
                self.run(name, dims, |b| {
                    b.arg(x).arg(pos).arg(inv_freq).arg(&r).arg(&nh).arg(&hs).arg(&off).arg(&hf).arg(factor).arg(&il);
                })
            }
            Kernel::SiluMul { gate_up, out, rows, inter } => {
                let (r, n) = (i(*rows), i(*inter));
                self.run(name, dims, |b| {
                    b.arg(gate_up).arg(out).arg(&r).arg(&n);
                })
            }
            Kernel::KvWrite { src, pool, slots, rows, row_len } => {
                let (r, n) = (i(*rows), i(*row_len));
                self.run(name, dims, |b| {
                    b.arg(src).arg(pool).arg(slots).arg(&r).arg(&n);
                })
            }
            Kernel::Attention(a) => {
                let (nh, nk, qd, vd, ps, w) = (i(a.n_heads), i(a.n_kv), i(a.qd), i(a.vd), i(a.page_size), i(a.window.min(i32::MAX as usize)));
                self.run(name, dims, |b| {
                    b.arg(&a.q).arg(&a.k_pool).arg(&a.v_pool).arg(&a.table).arg(&a.table_start).arg(&a.seq_of_row).arg(&a.pos).arg(&a.out);
                    b.arg(&nh).arg(&nk).arg(&qd).arg(&vd).arg(&ps).arg(&a.scale).arg(&w);
                })
            }
            Kernel::RouteTopk { logits, bias, scratch, ids, weights, rows, rule } => {
                let (bias, has_bias) = (bias.unwrap_or(0), bias.is_some() as i32);
                let (ng, tg, gs, masked) = match rule.group_limit {
                    Some((n, t, sum2, m)) => (i(n), i(t), sum2 as i32, m),
                    None => (0, 0, 0, 0.0f32),
                };
                let (r, e, kk, sig, norm) = (i(*rows), i(rule.n_experts), i(rule.top_k), rule.sigmoid as i32, rule.norm_topk as i32);
                self.run(name, dims, |b| {
                    b.arg(logits).arg(&bias).arg(scratch).arg(ids).arg(weights).arg(&r).arg(&e).arg(&kk).arg(&sig).arg(&has_bias);
                    b.arg(&ng).arg(&tg).arg(&gs).arg(&masked).arg(&norm).arg(&rule.norm_eps).arg(&rule.scaling);
                })
            }
            Kernel::GatherRows { x, idx, out, rows, hidden } => {
                let (r, h) = (i(*rows), i(*hidden));
                self.run(name, dims, |b| {
                    b.arg(x).arg(idx).arg(out).arg(&r).arg(&h);
                })
            }
            Kernel::CombineRows { y, src_row, w, out, tokens, k, hidden } => {
                let (t, kk, h) = (i(*tokens), i(*k), i(*hidden));
                self.run(name, dims, |b| {
                    b.arg(y).arg(src_row).arg(w).arg(out).arg(&t).arg(&kk).arg(&h);
                })
            }
            Kernel::SharedGate { x, g, y, rows, hidden } => {
                let (r, h) = (i(*rows), i(*hidden));
                self.run(name, dims, |b| {
                    b.arg(x).arg(g).arg(y).arg(&r).arg(&h);
                })
            }
            Kernel::SplitCols { src, a, b: bb, rows, a_cols, b_cols } => {
                let (r, ac, bc) = (i(*rows), i(*a_cols), i(*b_cols));
                self.run(name, dims, |b| {
                    b.arg(src).arg(a).arg(bb).arg(&r).arg(&ac).arg(&bc);
                })
            }
            Kernel::MlaAssemble { kv, k_pe, k: kk, v, rows, n_heads, nope, rope_dim, vd } => {
                let (r, nh, np, rd, vdi) = (i(*rows), i(*n_heads), i(*nope), i(*rope_dim), i(*vd));
                self.run(name, dims, |b| {
                    b.arg(kv).arg(k_pe).arg(kk).arg(v).arg(&r).arg(&nh).arg(&np).arg(&rd).arg(&vdi);
                })
            }
            Kernel::MoeAlign { ids, choices, n_experts, max_tiles, sorted, tile_expert, src_row, error } => {
                let (c, e, mt) = (i(*choices), i(*n_experts), i(*max_tiles));
                self.run(name, dims, |b| {
                    b.arg(ids).arg(&c).arg(&e).arg(&mt).arg(sorted).arg(tile_expert).arg(src_row).arg(error);
                })
            }
            Kernel::ExpertGemm(g) => {
                let (div, n, k) = (i(g.row_div), i(g.n), i(g.k));
                self.run(name, dims, |b| {
                    b.arg(&g.x).arg(&g.sorted).arg(&div).arg(&g.weights).arg(&g.tile_expert).arg(&g.out).arg(&n).arg(&k).arg(&g.error);
                })
            }
        }
    }

    /// `out[m×n] = x[m×k]·Wᵀ`, cuBLAS column-major: `outᵀ = op(W)·xᵀ` with op(A) = Aᵀ of the
    /// column-major `[k×n]` W.
    fn gemm(&mut self, x: Addr, w: &Mat, out: Addr, m: usize) -> R<()> {
        if m == 0 {
            return Ok(());
        }
        let b = if w.dtype == WeightDtype::F32 { x } else { self.cast16(x, m * w.k, w.dtype)? };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let dims = [w.n, m, w.k].map(|v| i32::try_from(v).map_err(|_| DeviceError::Unsupported { device: self.device, msg: format!("GEMM dimension {v} exceeds i32") }));
        let [n, mm, k] = [dims[0].clone()?, dims[1].clone()?, dims[2].clone()?];
        // SAFETY: W holds n·k values of its dtype, b holds m·k, out m·n f32; the leading
        // dimensions are those of the row-major shapes.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                mm,
                k,
                &alpha as *const f32 as *const _,
                w.addr as *const _,
                blas_type(w.dtype),
                k,
                b as *const _,
                blas_type(w.dtype),
                k,
                &beta as *const f32 as *const _,
                out as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                n,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| self.err("cublasGemmEx", e))
    }

    fn grouped_gemm(&mut self, groups: &[(Mat, usize, usize)], x: Addr, k: usize, out: Addr, n: usize) -> R<()> {
        let Some(first) = groups.first() else { return Ok(()) };
        let dt = first.0.dtype;
        if groups.len() > 1 && !self.grouped_unsupported && groups.iter().all(|g| g.0.dtype == dt) {
            let rows: usize = groups.iter().map(|g| g.1 + g.2).max().unwrap_or(0);
            let b = if dt == WeightDtype::F32 { x } else { self.cast16(x, rows * k, dt)? };
            match self.grouped_call(groups, dt, b, k, out, n) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.0, blas_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED | blas_sys::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE) => {
                    tracing::warn!(device = %self.device, dtype = dt.name(), "cublasGemmGroupedBatchedEx does not take these operand types: one GEMM per expert from now on");
                    self.grouped_unsupported = true;
                }
                Err(e) => return Err(self.err("cublasGemmGroupedBatchedEx", e)),
            }
        }
        for &(w, start, rows) in groups {
            self.gemm(f32_at(x, start * k), &w, f32_at(out, start * n), rows)?;
        }
        Ok(())
    }

    fn peak_bandwidth_gbs(&self) -> Option<f64> {
        self.peak_bandwidth_gbs
    }

    /// Device to device where the transport moves device memory (NCCL), else through the host.
    fn exchange_rows(&mut self, dd: &dyn crate::moe::DeviceDispatch, send: Addr, send_rows: &[usize], recv_rows: &[usize], row_len: usize) -> Result<Addr> {
        use crate::transport::DeviceSpan;
        let spans = |rows: &[usize], base: Addr| -> Vec<DeviceSpan> {
            let mut at = 0;
            rows.iter()
                .map(|&n| {
                    let s = DeviceSpan { addr: f32_at(base, at * row_len), bytes: n * row_len * 4 };
                    at += n;
                    s
                })
                .collect()
        };
        if !dd.moves_device_memory() {
            return stage_rows(self, dd, send, send_rows, recv_rows, row_len);
        }
        let recv = self.step_zeros(recv_rows.iter().sum::<usize>() * row_len)?;
        let (s, r) = (spans(send_rows, send), spans(recv_rows, recv));
        // The rows must be written before another stream reads them.
        self.stream.synchronize().map_err(|e| self.err("synchronize", e))?;
        dd.exchange_device(&s, &r)?;
        // The own rows stay on this device (the transport skips them): one copy.
        let me = dd.rank();
        if let (Some(a), Some(b)) = (s.get(me), r.get(me))
            && a.bytes > 0
        {
            // SAFETY: both spans lie in live buffers of at least `bytes` (sized by the plan).
            unsafe { cudarc::driver::result::memcpy_dtod_async(b.addr, a.addr, a.bytes.min(b.bytes), self.stream.cu_stream()) }
                .map_err(|e| self.err("cuMemcpyDtoD", e))?;
        }
        Ok(recv)
    }
}
