//! Tensor kernels of the CPU backend. Every numeric hot path of the model goes through this
//! module, so that another backend (CUDA) can replace it; the `unsafe` FFI sits in [`ffi`].
//!
//! Conventions: matrices are row-major `f32` slices; a linear layer's weight is `[out, in]`
//! as in PyTorch, so `y = x · Wᵀ`.

mod ffi;
mod huge_pages;
mod packed;
mod panel_simd;

pub use ffi::{mmap_file, process_cpu_time_us, release_mapped_pages, release_mapped_range, set_current_thread_idle_priority, thread_cpu_time_us};
pub use huge_pages::{collapse_resident_memory, HugePageReport};
pub use packed::PackedWeight;
use rayon::prelude::*;
use std::sync::Once;

static INIT: Once = Once::new();

/// One-time backend set-up: OpenBLAS runs single-threaded and we parallelise with rayon on
/// top (one pool, no oversubscription). `SWITCHYARD_BLAS_THREADS` overrides.
pub fn init() {
    INIT.call_once(|| {
        let n = std::env::var("SWITCHYARD_BLAS_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
        ffi::set_blas_threads(n);
        if std::env::var_os("SWITCHYARD_DEFAULT_MALLOC").is_none() {
            ffi::tune_allocator();
        }
    });
}

/// While alive, large allocations (≥ 16 MiB) are mapped on their own and go back to the system when
/// freed: a model load's transients (a tensor converted to f32 before it is packed; the lm head
/// alone is 131 MB at vocabulary 32000) then do not stay in the heap's high-water mark, which
/// serving keeps high on purpose ([`init`]). Restores the serving setting on drop.
pub struct LoadAllocScope(());

impl LoadAllocScope {
    pub fn enter() -> Self {
        init();
        if std::env::var_os("SWITCHYARD_DEFAULT_MALLOC").is_none() {
            ffi::set_mmap_threshold(16 << 20);
        }
        LoadAllocScope(())
    }
}

impl Drop for LoadAllocScope {
    fn drop(&mut self) {
        if std::env::var_os("SWITCHYARD_DEFAULT_MALLOC").is_none() {
            ffi::tune_allocator();
        }
    }
}

/// The machine's memory read bandwidth in GB/s as the compute pool sees it: the best of `rounds`
/// parallel sums over `bytes` of f32 (written first, so every page is resident). What bounds
/// batch-1 decode, which streams its weights once per token.
pub fn read_bandwidth_gbs(bytes: usize, rounds: usize) -> f64 {
    let data = vec![1.0f32; (bytes / 4).max(1 << 16)];
    // On huge pages, as the model's weights are after a load: the limit is then the same reads'.
    huge_pages::collapse_resident_memory();
    let chunk = data.len().div_ceil(rayon::current_num_threads() * 4).max(1 << 14);
    let mut best = 0.0f64;
    for _ in 0..rounds.max(1) {
        let t0 = std::time::Instant::now();
        // 32 independent lanes: a single running sum would be bound by the add latency, not memory.
        let lanes = |c: &[f32]| -> f32 {
            let mut acc = [0.0f32; 32];
            for x in c.chunks_exact(32) {
                for (a, v) in acc.iter_mut().zip(x) {
                    *a += v;
                }
            }
            acc.iter().sum()
        };
        let s: f32 = data.par_chunks(chunk).map(lanes).sum();
        let secs = t0.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((data.len() * 4) as f64 / secs.max(1e-9) / 1e9);
    }
    best
}

/// Work (m·n·k) under which a matmul is not worth splitting across threads.
const PAR_MIN_WORK: usize = 1 << 18;

/// `out[m×n] = x[m×k] · w[n×k]ᵀ`, parallel over rows (large m) or column blocks (small m).
pub fn matmul_bt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    matmul_bt_impl(x, m, k, w, n, out, false)
}

/// `out[m×n] += x[m×k] · w[n×k]ᵀ`.
pub fn matmul_bt_acc(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    matmul_bt_impl(x, m, k, w, n, out, true)
}

/// The single-threaded matmul (for callers that already run in parallel).
pub fn matmul_bt_serial(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    ffi::sgemm_bt(x, m, k, w, n, out, n, false)
}

fn small_m_min() -> usize {
    static L: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L.get_or_init(|| std::env::var("SWITCHYARD_SMALL_M_MIN").ok().and_then(|v| v.parse().ok()).unwrap_or(2))
}

fn small_m_limit() -> usize {
    static L: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L.get_or_init(|| std::env::var("SWITCHYARD_SMALL_M").ok().and_then(|v| v.parse().ok()).unwrap_or(16))
}

fn matmul_bt_impl(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32], acc: bool) {
    init();
    let threads = rayon::current_num_threads();
    let work = m * n * k;
    if m >= small_m_min() && m <= small_m_limit() && ffi::small_m_matmul(x, m, k, w, n, out, acc, threads > 1 && work >= PAR_MIN_WORK) {
        return;
    }
    if threads <= 1 || work < PAR_MIN_WORK || m == 0 || n == 0 {
        ffi::sgemm_bt(x, m, k, w, n, out, n, acc);
        return;
    }
    if m >= 16 * threads {
        // Row split: contiguous row chunks.
        let rows = m.div_ceil(threads * 2).max(8);
        out[..m * n].par_chunks_mut(rows * n).enumerate().for_each(|(i, chunk)| {
            let r0 = i * rows;
            let mr = chunk.len() / n;
            ffi::sgemm_bt(&x[r0 * k..(r0 + mr) * k], mr, k, w, n, chunk, n, acc);
        });
    } else {
        // Column split over the weight's rows (decode-sized m): each thread streams its part of w.
        let nblocks = threads * 2;
        let step = n.div_ceil(nblocks).div_ceil(16) * 16;
        let blocks: Vec<(usize, usize)> =
            (0..n).step_by(step.max(16)).map(|s| (s, (s + step.max(16)).min(n))).collect();
        ffi::sgemm_bt_col_blocks(x, m, k, w, n, out, &blocks, acc);
    }
}

/// A dense weight `W[n×k]` (PyTorch's `[out, in]`) for `y = x·Wᵀ`, stored as narrow as its values
/// allow. A bf16 checkpoint's weights are exactly bf16 values: they stay bf16, in the packed
/// panels of [`PackedWeight`] (widened to f32 in L1-sized blocks inside the kernel, so products
/// are those of the f32 weights), which halves the bytes a decode step streams — the bound of
/// batch-1 decode — and the memory. Other weights (f32 checkpoints, f16 values that are not bf16)
/// stay a row-major f32 matrix for OpenBLAS.
#[derive(Debug, Clone)]
pub enum DenseWeight {
    Rows { w: Vec<f32>, n: usize, k: usize },
    Packed(PackedWeight),
}

impl DenseWeight {
    /// `w[n×k]` row-major; packed as bf16 when every value is a bf16 value.
    ///
    /// # Panics
    /// If `w.len() != n * k` (loaders check shapes first).
    pub fn new(w: Vec<f32>, n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "DenseWeight::new: {} values for [{n}×{k}]", w.len());
        if !w.is_empty() && w.iter().all(|v| v.to_bits() & 0xffff == 0) {
            return DenseWeight::Packed(PackedWeight::from_rows(&w, n, k));
        }
        DenseWeight::Rows { w, n, k }
    }

    /// Output rows n.
    pub fn rows(&self) -> usize {
        match self {
            DenseWeight::Rows { n, .. } => *n,
            DenseWeight::Packed(p) => p.n(),
        }
    }

    /// `out[m×n] = x[m×k] · Wᵀ`; `parallel`: may use the rayon pool.
    ///
    /// Packed weights multiply in place up to [`PACKED_MAX_ROWS`] rows of `x` (decode, short
    /// prefills: the weight's bytes bound the time); for more, they are widened to f32 rows and
    /// OpenBLAS multiplies — widening costs `n·k`, the product `m·n·k`, and at that size
    /// OpenBLAS's blocking beats the panel kernel (measured: prefill at 16 × 64 tokens 11 % slower
    /// on panels).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], parallel: bool) {
        match self {
            DenseWeight::Rows { w, n, k } if parallel => matmul_bt(x, m, *k, w, *n, out),
            DenseWeight::Rows { w, n, k } => matmul_bt_serial(x, m, *k, w, *n, out),
            DenseWeight::Packed(p) if m > PACKED_MAX_ROWS => {
                let w = p.to_rows();
                if parallel { matmul_bt(x, m, p.k(), &w, p.n(), out) } else { matmul_bt_serial(x, m, p.k(), &w, p.n(), out) }
            }
            DenseWeight::Packed(p) => {
                init();
                p.matmul(x, m, out, parallel)
            }
        }
    }

    /// The whole matrix as row-major f32 `[n×k]` (to upload it elsewhere).
    pub fn to_rows(&self) -> Vec<f32> {
        match self {
            DenseWeight::Rows { w, .. } => w.clone(),
            DenseWeight::Packed(p) => p.to_rows(),
        }
    }

    /// Row `i` of `W` appended to `out` (an embedding lookup).
    pub fn push_row(&self, i: usize, out: &mut Vec<f32>) {
        match self {
            DenseWeight::Rows { w, k, .. } => out.extend_from_slice(&w[i * k..(i + 1) * k]),
            DenseWeight::Packed(p) => p.push_row(i, out),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            DenseWeight::Rows { w, .. } => w.len() * 4,
            DenseWeight::Packed(p) => p.bytes(),
        }
    }
}

/// Most rows of `x` a packed dense weight multiplies in place (see [`DenseWeight::matmul`]).
pub const PACKED_MAX_ROWS: usize = 128;

/// A linear layer `y = x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: DenseWeight,
    pub bias: Option<Vec<f32>>,
    pub in_dim: usize,
    pub out_dim: usize,
}

impl Linear {
    pub fn new(weight: Vec<f32>, bias: Option<Vec<f32>>, in_dim: usize, out_dim: usize) -> Self {
        Linear { weight: DenseWeight::new(weight, out_dim, in_dim), bias, in_dim, out_dim }
    }

    /// `y[m×out] = x[m×in]·Wᵀ + b`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * self.out_dim];
        self.forward_into(x, m, &mut y);
        y
    }

    pub fn forward_into(&self, x: &[f32], m: usize, y: &mut [f32]) {
        self.weight.matmul(x, m, y, true);
        self.add_bias(y, m);
    }

    /// Single-threaded variant for callers already inside a parallel region.
    pub fn forward_serial(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0.0; m * self.out_dim];
        self.weight.matmul(x, m, &mut y, false);
        self.add_bias(&mut y, m);
        y
    }

    /// Bytes held (weight and bias).
    pub fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    fn add_bias(&self, y: &mut [f32], m: usize) {
        if let Some(b) = &self.bias {
            for row in y[..m * self.out_dim].chunks_mut(self.out_dim) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
    }
}

/// RMSNorm over each row of length `w.len()`: `x / sqrt(mean(x²) + eps) * w` (in place).
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for row in x.chunks_mut(d) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// RMSNorm into a new buffer.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut y = x.to_vec();
    rmsnorm_inplace(&mut y, w, eps);
    y
}

#[inline]
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// `gate_up` rows are `[gate (i) | up (i)]`; returns `silu(gate) * up`, `[m×i]`.
pub fn silu_mul_fused(gate_up: &[f32], m: usize, i: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * i];
    for (o, gu) in out.chunks_mut(i).zip(gate_up.chunks(2 * i)) {
        let (g, u) = gu.split_at(i);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = silu(*g) * u;
        }
    }
    out
}

/// Numerically stable softmax in place.
pub fn softmax_inplace(x: &mut [f32]) {
    let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - mx).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

pub fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Dot product with several accumulators (vectorises well).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Rotary position embedding tables: `inv_freq[d/2]` and a scale on cos/sin (yarn's attention factor).
#[derive(Debug, Clone)]
pub struct Rope {
    pub inv_freq: Vec<f32>,
    pub attention_factor: f32,
    /// Pairs are adjacent (GPT-J / DeepSeek `rope_interleave`) instead of split halves.
    pub interleaved: bool,
}

impl Rope {
    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// cos/sin for one position, each `[d/2]`.
    pub fn cos_sin(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        let p = pos as f32;
        let mut c = Vec::with_capacity(self.inv_freq.len());
        let mut s = Vec::with_capacity(self.inv_freq.len());
        for &f in &self.inv_freq {
            let a = p * f;
            c.push(a.cos() * self.attention_factor);
            s.push(a.sin() * self.attention_factor);
        }
        (c, s)
    }

    /// Rotate one head vector `x[d]` in place.
    ///
    /// Split-halves form: `x' = x·cos + rotate_half(x)·sin` with `rotate_half([a, b]) = [-b, a]`.
    /// Interleaved form (DeepSeek): first de-interleave (evens then odds), then the same; the result
    /// stays in de-interleaved order, as in the reference implementation.
    pub fn apply(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let h = self.inv_freq.len();
        if self.interleaved {
            let tmp: Vec<f32> = x[..2 * h].to_vec();
            for i in 0..h {
                x[i] = tmp[2 * i];
                x[h + i] = tmp[2 * i + 1];
            }
        }
        for i in 0..h {
            let a = x[i];
            let b = x[h + i];
            x[i] = a * cos[i] - b * sin[i];
            x[h + i] = b * cos[i] + a * sin[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut o = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum::<f64>() as f32;
            }
        }
        o
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn matmul_paths_agree_with_naive() {
        // Shapes cover the sgemv, small-m, column-split and row-split paths and odd tails.
        for &(m, k, n) in &[(1, 37, 13), (2, 64, 96), (3, 37, 13), (7, 129, 301), (16, 1024, 640), (17, 33, 5), (40, 512, 1024), (300, 96, 130)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let want = naive(&x, m, k, &w, n);
            let mut got = vec![0.0; m * n];
            matmul_bt(&x, m, k, &w, n, &mut got);
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-3, "{m}x{k}x{n}: {err}");
            matmul_bt_acc(&x, m, k, &w, n, &mut got);
            let err = got.iter().zip(&want).map(|(a, b)| (a - 2.0 * b).abs()).fold(0.0f32, f32::max);
            assert!(err < 2e-3, "acc {m}x{k}x{n}: {err}");
        }
    }

    #[test]
    fn bf16_dense_weights_stay_bf16_and_multiply_like_their_f32_values() {
        let (n, k) = (37, 70);
        // bf16 values: the upper halves of f32s.
        let bf: Vec<f32> = data(n * k, 3).iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000)).collect();
        let packed = DenseWeight::new(bf.clone(), n, k);
        assert!(matches!(&packed, DenseWeight::Packed(p) if p.is_bf16()), "a bf16 weight stays bf16");
        assert_eq!(packed.bytes(), n.div_ceil(16) * 16 * k * 2, "2 bytes a value (rows padded to panels of 16)");
        let rows = DenseWeight::new(data(n * k, 4), n, k);
        assert!(matches!(rows, DenseWeight::Rows { .. }), "other values stay f32 rows");
        for m in [1, 3, 17] {
            let x = data(m * k, 5);
            let want = naive(&x, m, k, &bf, n);
            for parallel in [false, true] {
                let mut got = vec![0.0; m * n];
                packed.matmul(&x, m, &mut got, parallel);
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-4, "m {m}: {err}");
            }
        }
        let mut row = Vec::new();
        packed.push_row(36, &mut row);
        assert_eq!(row, bf[36 * k..37 * k].to_vec(), "an embedding row reads back exactly");
        let lin = Linear::new(bf.clone(), Some(vec![1.0; n]), k, n);
        let y = lin.forward(&data(k, 6), 1);
        let want = naive(&data(k, 6), 1, k, &bf, n);
        assert!(y.iter().zip(&want).all(|(a, b)| (a - b - 1.0).abs() < 1e-4));
    }

    #[test]
    fn rope_interleaved_is_a_permutation_of_split_halves() {
        let r = Rope { inv_freq: vec![1.0, 0.1], attention_factor: 1.0, interleaved: true };
        let (c, s) = r.cos_sin(3);
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        r.apply(&mut x, &c, &s);
        // Pairs (1,2) and (3,4) rotated by 3 and 0.3 rad, output de-interleaved.
        let a = 3.0f32;
        let b = 0.3f32;
        let want = [1.0 * a.cos() - 2.0 * a.sin(), 3.0 * b.cos() - 4.0 * b.sin(), 2.0 * a.cos() + 1.0 * a.sin(), 4.0 * b.cos() + 3.0 * b.sin()];
        for (g, w) in x.iter().zip(want) {
            assert!((g - w).abs() < 1e-5);
        }
    }
}
