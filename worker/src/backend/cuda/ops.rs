#![forbid(unsafe_code)]
//! What a forward step asks of a device: memory, the kernels of [`super::kernel_src`] and GEMMs.
//!
//! The step itself ([`super::step`]) is written once against [`Ops`]. The GPU implements it with
//! the driver, NVRTC and cuBLAS (`runtime`, feature `cuda`); [`super::reference`] implements it
//! on the host in plain Rust with the CPU backend's numerics, so the step's orchestration —
//! buffer sizes, batch layout, page tables, MLA assembly, expert row grouping, the combine — is
//! tested on every machine against the CPU backend, and only the kernels themselves need a GPU
//! (they have their own CPU check: the emulator test of the generated source).
//!
//! Addresses are byte addresses in the device's memory ([`Addr`]); offsets into a buffer are
//! address arithmetic, as on the GPU.

use super::dtype::WeightDtype;
use super::geometry::{self, GeometryError, LaunchDims};
use crate::backend::{Device, DeviceError};
use crate::error::{ModelError, Result};
use crate::moe::DeviceDispatch;

/// A byte address in a device's memory.
pub type Addr = u64;

pub type R<T> = std::result::Result<T, DeviceError>;

/// A weight matrix `[n × k]`, row-major, in `dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mat {
    pub addr: Addr,
    pub dtype: WeightDtype,
    pub n: usize,
    pub k: usize,
}

/// Address of the `i`-th f32 after `a`.
pub fn f32_at(a: Addr, i: usize) -> Addr {
    a + 4 * i as u64
}

/// The router's rule, as `route_topk` takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteRule {
    pub n_experts: usize,
    pub top_k: usize,
    pub sigmoid: bool,
    /// `(n_group, topk_group, sum_top2, masked_value)`.
    pub group_limit: Option<(usize, usize, bool, f32)>,
    pub norm_topk: bool,
    pub norm_eps: f32,
    pub scaling: f32,
}

/// One launch of a kernel of [`super::kernel_src`] (same names, parameters in the same order).
#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    EmbedRows { table: Mat, ids: Addr, out: Addr, rows: usize },
    Cast { x: Addr, y: Addr, n: usize, dtype: WeightDtype },
    Rmsnorm { x: Addr, w: Addr, y: Addr, rows: usize, n: usize, eps: f32 },
    AddInplace { x: Addr, y: Addr, n: usize },
    AddBias { x: Addr, b: Addr, rows: usize, n: usize },
    Clamp { x: Addr, n: usize, c: f32 },
    Rope { x: Addr, pos: Addr, inv_freq: Addr, rows: usize, n_heads: usize, head_stride: usize, offset: usize, half: usize, factor: f32, interleaved: bool },
    SiluMul { gate_up: Addr, out: Addr, rows: usize, inter: usize },
    KvWrite { src: Addr, pool: Addr, slots: Addr, rows: usize, row_len: usize },
    Attention(AttentionArgs),
    RouteTopk { logits: Addr, bias: Option<Addr>, scratch: Addr, ids: Addr, weights: Addr, rows: usize, rule: RouteRule },
    GatherRows { x: Addr, idx: Addr, out: Addr, rows: usize, hidden: usize },
    CombineRows { y: Addr, src_row: Addr, w: Addr, out: Addr, tokens: usize, k: usize, hidden: usize },
    SharedGate { x: Addr, g: Addr, y: Addr, rows: usize, hidden: usize },
    SplitCols { src: Addr, a: Addr, b: Addr, rows: usize, a_cols: usize, b_cols: usize },
    MlaAssemble { kv: Addr, k_pe: Addr, k: Addr, v: Addr, rows: usize, n_heads: usize, nope: usize, rope_dim: usize, vd: usize },
    /// Group `choices` router ids by expert on the device (see `kernel_src::expert_grouping`).
    MoeAlign { ids: Addr, choices: usize, n_experts: usize, max_tiles: usize, sorted: Addr, tile_expert: Addr, src_row: Addr, error: Addr },
    /// The grouped expert GEMM over `tiles` tiles: `weights` is a table of one [`Addr`] per
    /// expert (0: not here) of `[n × k]` matrices in `dtype`.
    ExpertGemm(ExpertGemmArgs),
}

/// `expert_gemm_*`'s arguments (see `kernel_src::expert_grouping`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertGemmArgs {
    pub x: Addr,
    pub sorted: Addr,
    /// Input row of grouped row `p`: `sorted[p] / row_div` (the router's top-k), or `p` when 0.
    pub row_div: usize,
    pub weights: Addr,
    pub dtype: WeightDtype,
    pub tile_expert: Addr,
    pub out: Addr,
    pub tiles: usize,
    pub n: usize,
    pub k: usize,
    pub error: Addr,
}

/// `attention`'s arguments (see the kernel table).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionArgs {
    pub q: Addr,
    pub k_pool: Addr,
    pub v_pool: Addr,
    pub table: Addr,
    pub table_start: Addr,
    pub seq_of_row: Addr,
    pub pos: Addr,
    pub out: Addr,
    pub rows: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub qd: usize,
    pub vd: usize,
    pub page_size: usize,
    pub scale: f32,
    /// 0: no sliding window.
    pub window: usize,
}

impl Kernel {
    /// The entry point's name in the generated source.
    pub fn name(&self) -> &'static str {
        match self {
            Kernel::EmbedRows { table, .. } => match table.dtype {
                WeightDtype::F32 => "embed_rows_f32",
                WeightDtype::Bf16 => "embed_rows_bf16",
                WeightDtype::F16 => "embed_rows_f16",
            },
            Kernel::Cast { dtype: WeightDtype::F16, .. } => "cast_f32_f16",
            Kernel::Cast { .. } => "cast_f32_bf16",
            Kernel::Rmsnorm { .. } => "rmsnorm",
            Kernel::AddInplace { .. } => "add_inplace",
            Kernel::AddBias { .. } => "add_bias",
            Kernel::Clamp { .. } => "clamp_inplace",
            Kernel::Rope { .. } => "rope",
            Kernel::SiluMul { .. } => "silu_mul",
            Kernel::KvWrite { .. } => "kv_write",
            Kernel::Attention(_) => "attention",
            Kernel::RouteTopk { .. } => "route_topk",
            Kernel::GatherRows { .. } => "gather_rows",
            Kernel::CombineRows { .. } => "combine_rows",
            Kernel::SharedGate { .. } => "shared_gate",
            Kernel::SplitCols { .. } => "split_cols",
            Kernel::MlaAssemble { .. } => "mla_assemble",
            Kernel::MoeAlign { .. } => "moe_align",
            Kernel::ExpertGemm(g) => match g.dtype {
                WeightDtype::F32 => "expert_gemm_f32",
                WeightDtype::Bf16 => "expert_gemm_bf16",
                WeightDtype::F16 => "expert_gemm_f16",
            },
        }
    }

    /// The launch shape (every implementation checks it, so shape limits fail alike everywhere).
    pub fn geometry(&self) -> Result<LaunchDims, GeometryError> {
        match self {
            Kernel::EmbedRows { rows, .. }
            | Kernel::Rmsnorm { rows, .. }
            | Kernel::KvWrite { rows, .. }
            | Kernel::GatherRows { rows, .. }
            | Kernel::SharedGate { rows, .. } => geometry::per_row(*rows),
            Kernel::CombineRows { tokens, .. } => geometry::per_row(*tokens),
            Kernel::Cast { n, .. } | Kernel::AddInplace { n, .. } | Kernel::Clamp { n, .. } => geometry::grid_stride(*n),
            Kernel::AddBias { rows, n, .. } => geometry::grid_stride(rows * n),
            Kernel::SiluMul { rows, inter, .. } => geometry::grid_stride(rows * inter),
            Kernel::SplitCols { rows, a_cols, b_cols, .. } => geometry::grid_stride(rows * (a_cols + b_cols)),
            Kernel::MlaAssemble { rows, n_heads, nope, rope_dim, vd, .. } => geometry::grid_stride(rows * n_heads * (nope + rope_dim).max(*vd)),
            Kernel::Rope { rows, n_heads, half, .. } => geometry::rope(*rows, *n_heads, *half),
            Kernel::Attention(a) => geometry::attention(a.rows, a.n_heads, a.n_kv, a.qd, a.vd),
            Kernel::RouteTopk { rows, .. } => geometry::route(*rows),
            Kernel::MoeAlign { choices, n_experts, max_tiles, .. } => geometry::moe_align(*choices, *n_experts, *max_tiles),
            Kernel::ExpertGemm(g) => geometry::expert_gemm(g.tiles, g.n, g.k),
        }
    }
}

/// A device as the forward step uses it. Buffers come in three lifetimes: kept (weights, the KV
/// pools), scratch (grow-only, reused across steps by name) and step (freed by
/// [`Ops::end_step`], after the step's last download).
pub trait Ops: Send {
    fn device(&self) -> Device;

    /// Upload a row-major `[n × k]` weight in the narrowest dtype that holds it exactly.
    fn upload_matrix(&mut self, rows: &[f32], n: usize, k: usize) -> R<Mat>;
    /// A kept f32 buffer (norm weights, biases).
    fn upload_f32(&mut self, v: &[f32]) -> R<Addr>;
    /// A kept, zeroed f32 buffer of `n` values (the KV pools).
    fn alloc_kept(&mut self, n: usize) -> R<Addr>;
    /// Free the kept buffer at `a` (expert weights of an epoch that ended).
    fn free_kept(&mut self, a: Addr);
    /// Device memory free for the KV cache after the weights, in bytes.
    fn free_bytes(&self) -> R<u64>;

    /// A grow-only f32 scratch buffer of at least `n` values, by use.
    fn scratch(&mut self, name: &'static str, n: usize) -> R<Addr>;
    /// Step buffers.
    fn step_i32(&mut self, v: &[i32]) -> R<Addr>;
    fn step_u32(&mut self, v: &[u32]) -> R<Addr>;
    fn step_f32(&mut self, v: &[f32]) -> R<Addr>;
    fn step_zeros(&mut self, n: usize) -> R<Addr>;
    /// A step buffer of addresses (a table of expert weights for `expert_gemm_*`).
    fn step_addrs(&mut self, v: &[Addr]) -> R<Addr>;
    /// Copy `v` to `a` (f32 values).
    fn write_f32(&mut self, a: Addr, v: &[f32]) -> R<()>;
    /// Read `n` values at `a` (waits for the work queued before).
    fn read_f32(&mut self, a: Addr, n: usize) -> R<Vec<f32>>;
    /// Read `n` 32-bit words at `a` (ids, row numbers, error words), as unsigned.
    fn read_u32(&mut self, a: Addr, n: usize) -> R<Vec<u32>>;

    /// Before a step's first call (the thread that steps may change between steps).
    fn begin_step(&mut self) -> R<()> {
        Ok(())
    }
    /// After a step (its last read has waited for its work): frees the step buffers.
    fn end_step(&mut self);

    fn launch(&mut self, k: &Kernel) -> R<()>;
    /// `out[m×n] = x[m×k]·Wᵀ`: x and out f32, W in its dtype (x rounded to it first).
    fn gemm(&mut self, x: Addr, w: &Mat, out: Addr, m: usize) -> R<()>;
    /// For each `(W, start, rows)`: rows `start..start+rows` of `out` (`n` wide) from those of `x`
    /// (`k` wide). Default: one GEMM each.
    fn grouped_gemm(&mut self, groups: &[(Mat, usize, usize)], x: Addr, k: usize, out: Addr, n: usize) -> R<()> {
        for &(w, start, rows) in groups {
            self.gemm(f32_at(x, start * k), &w, f32_at(out, start * n), rows)?;
        }
        Ok(())
    }

    /// Rows exchanged with the ranks of a group: `send` holds `send_rows[r]` rows (`row_len` f32
    /// each) for every rank `r`, in rank order; returns a step buffer with the `recv_rows[r]`
    /// rows from every rank, in rank order. Default: staged through the host.
    fn exchange_rows(&mut self, dd: &dyn DeviceDispatch, send: Addr, send_rows: &[usize], recv_rows: &[usize], row_len: usize) -> Result<Addr> {
        stage_rows(self, dd, send, send_rows, recv_rows, row_len)
    }

    /// Peak memory bandwidth where the device reports it.
    fn peak_bandwidth_gbs(&self) -> Option<f64> {
        None
    }
}

/// [`Ops::exchange_rows`] through host memory: read the rows, one all-to-all of host bytes, write
/// what came back into a step buffer.
pub fn stage_rows<O: Ops + ?Sized>(o: &mut O, dd: &dyn DeviceDispatch, send: Addr, send_rows: &[usize], recv_rows: &[usize], row_len: usize) -> Result<Addr> {
    let total: usize = send_rows.iter().sum();
    let all = o.read_f32(send, total * row_len)?;
    let mut msgs = Vec::with_capacity(send_rows.len());
    let mut at = 0;
    for &n in send_rows {
        let mut b = Vec::with_capacity(n * row_len * 4);
        for v in &all[at * row_len..(at + n) * row_len] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        msgs.push(b);
        at += n;
    }
    let recv = dd.exchange(msgs)?;
    let mut flat = Vec::with_capacity(recv_rows.iter().sum::<usize>() * row_len);
    for (r, (b, &n)) in recv.iter().zip(recv_rows).enumerate() {
        if b.len() != n * row_len * 4 {
            return Err(ModelError::ExpertParallel(format!("rows from rank {r}: {} bytes, the plan says {n} rows of {row_len}", b.len())));
        }
        flat.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
    Ok(o.step_f32(&flat)?)
}
