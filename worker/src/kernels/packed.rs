#![allow(unsafe_code)]
//! Weights packed once at load time for `y = x · Wᵀ` (the expert FFNs).
//!
//! Why: a BLAS sgemm packs its operands on every call. An expert's weight is used once per layer
//! and step by a few dozen to a few hundred tokens, so OpenBLAS re-packed every expert's weights
//! every step — measured at a quarter of prefill time on the benchmark model at batch 16 (perf:
//! `sgemm_incopy`). Packed here once, the multiply streams the panels as they lie.
//!
//! Layout: the `n` output rows of `W[n×k]` in panels of [`NR`] = 16 rows (the last one
//! zero-padded); panel `j` holds, for every `p` in `0..k`, the 16 values `W[16j + r][p]` side by
//! side. The kernel takes [`MR`] = 6 rows of `x` × one panel at a time, over blocks of [`KC`] of
//! the inner dimension so that `x`'s block stays in L2 and the panel's block in L1 while it is
//! reused for every row tile. The row tiles' SIMD bodies (AVX2, AVX-512, picked at run time) are
//! in [`super::panel_simd`].
//!
//! Panels are kept as bf16 when every weight is exactly a bf16 value (a bf16 checkpoint, as most
//! MoE checkpoints are): half the bytes to stream per step, the bottleneck of an expert with a few
//! tokens, and half the memory. Products of few rows (up to [`STREAM_ROWS_MAX`]: decode) widen
//! bf16 in registers as they stream a panel; more rows widen each panel block once into an L1
//! buffer that all their row tiles read. Either way the products are bit-for-bit those of f32
//! panels (bf16 → f32 is exact).

use super::panel_simd::{stream_tile, Isa, PanelRef};
use rayon::prelude::*;

/// Output rows per panel.
pub const NR: usize = 16;
/// Rows of `x` per micro-tile.
pub const MR: usize = 6;
/// Inner-dimension block.
pub const KC: usize = 256;

/// `W[n×k]` packed for [`PackedWeight::matmul`].
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    data: Panels,
    n: usize,
    k: usize,
}

/// Panel values, stored as narrow as they can be without changing one.
#[derive(Debug, Clone, PartialEq)]
enum Panels {
    F32(Vec<f32>),
    /// Upper halves of f32 values whose lower halves are all zero.
    Bf16(Vec<u16>),
}

impl PackedWeight {
    /// Pack row-major `w[n×k]` (PyTorch's `[out, in]`).
    ///
    /// # Panics
    /// If `w.len() != n * k` (a caller's bug: loaders check shapes against the config first).
    pub fn from_rows(w: &[f32], n: usize, k: usize) -> PackedWeight {
        assert_eq!(w.len(), n * k, "PackedWeight::from_rows: {} values for [{n}×{k}]", w.len());
        let panels = n.div_ceil(NR);
        let mut data = vec![0.0f32; panels * k * NR];
        for (j, panel) in data.chunks_mut((k * NR).max(1)).enumerate() {
            for r in 0..NR.min(n - j * NR) {
                let row = &w[(j * NR + r) * k..(j * NR + r + 1) * k];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * NR + r] = v;
                }
            }
        }
        let data = if data.iter().all(|v| v.to_bits() & 0xffff == 0) {
            Panels::Bf16(data.iter().map(|v| (v.to_bits() >> 16) as u16).collect())
        } else {
            Panels::F32(data)
        };
        PackedWeight { data, n, k }
    }

    /// Whether the panels are stored as bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.data, Panels::Bf16(_))
    }

    /// Output rows n of `W[n×k]`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inner dimension k of `W[n×k]`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The original row-major `W[n×k]` in f32.
    pub fn to_rows(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.n * self.k);
        for i in 0..self.n {
            self.push_row(i, &mut w);
        }
        w
    }

    /// Row `i` of the original `W`.
    #[cfg(test)]
    fn row(&self, i: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.k);
        self.push_row(i, &mut v);
        v
    }

    /// Row `i` of the original `W`, appended to `out` (an embedding lookup: one strided read).
    ///
    /// # Panics
    /// If `i >= n`.
    pub fn push_row(&self, i: usize, out: &mut Vec<f32>) {
        assert!(i < self.n, "PackedWeight::push_row: row {i} of {}", self.n);
        let (j, r) = (i / NR, i % NR);
        let at = |p: usize| j * self.k * NR + p * NR + r;
        match &self.data {
            Panels::F32(d) => out.extend((0..self.k).map(|p| d[at(p)])),
            Panels::Bf16(d) => out.extend((0..self.k).map(|p| f32::from_bits((d[at(p)] as u32) << 16))),
        }
    }

    /// Bytes held (padding included).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Panels::F32(d) => d.len() * 4,
            Panels::Bf16(d) => d.len() * 2,
        }
    }

    /// `out[m×n] = x[m×k] · Wᵀ`, parallel over panels when the product is large enough and
    /// `parallel` is set.
    ///
    /// # Panics
    /// If `x` or `out` is shorter than `m×k` / `m×n`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], parallel: bool) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k && out.len() >= m * n, "PackedWeight::matmul: short slice");
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            out[..m * n].fill(0.0);
            return;
        }
        let panels = n.div_ceil(NR);
        let threads = rayon::current_num_threads();
        if parallel && threads > 1 && m * n * k >= super::PAR_MIN_WORK && panels > 1 {
            let per = panels.div_ceil(threads * 2).max(1);
            let shared = SharedOut { ptr: out.as_mut_ptr() };
            (0..panels).step_by(per).collect::<Vec<_>>().into_par_iter().for_each(|p0| {
                #[allow(clippy::redundant_locals)]
                let shared = shared;
                // SAFETY: panel ranges are disjoint, so are the output columns they write;
                // `out` holds m×n values (checked above) and outlives the parallel loop.
                unsafe { self.panels_into(x, m, p0, (p0 + per).min(panels), shared.ptr) }
            });
        } else {
            // SAFETY: as above, one range covering every panel.
            unsafe { self.panels_into(x, m, 0, panels, out.as_mut_ptr()) }
        }
    }

    /// Panels `[p0, p1)` of the product into `c` (row stride `n`).
    ///
    /// # Safety
    /// `x` holds `m×k` values; `c` points at `m×n` writable values that nothing else writes in
    /// the columns of these panels meanwhile.
    unsafe fn panels_into(&self, x: &[f32], m: usize, p0: usize, p1: usize, c: *mut f32) {
        let (n, k) = (self.n, self.k);
        if m <= STREAM_ROWS_MAX {
            // SAFETY: as the caller's contract.
            return unsafe { self.stream_panels_into(x, m, p0, p1, c) };
        }
        // The f32 view of a bf16 panel block: 16 KiB, stays in L1 while the row tiles reuse it.
        let mut widened = [0.0f32; KC * NR];
        let mut pc = 0;
        while pc < k {
            let kc = KC.min(k - pc);
            for j in p0..p1 {
                let block = j * k * NR + pc * NR..j * k * NR + (pc + kc) * NR;
                let panel: &[f32] = match &self.data {
                    Panels::F32(d) => &d[block],
                    Panels::Bf16(d) => {
                        widen_bf16(&d[block], &mut widened[..kc * NR]);
                        &widened[..kc * NR]
                    }
                };
                let cols = NR.min(n - j * NR);
                let mut i = 0;
                while i < m {
                    let mr = MR.min(m - i);
                    let tile = Tile { x: &x[i * k + pc..], ldx: k, panel, kc, rows: mr, cols, accumulate: pc > 0 };
                    // SAFETY: rows i..i+mr < m and columns j·NR..j·NR+cols ≤ n lie inside c.
                    unsafe { tile.run(c.add(i * n + j * NR), n) };
                    i += mr;
                }
            }
            pc += kc;
        }
    }
}

impl PackedWeight {
    /// Panels `[p0, p1)` for at most [`STREAM_ROWS_MAX`] rows of `x` (decode): each panel is
    /// streamed whole (its bytes lie contiguous, and so do consecutive panels: one sequential
    /// read per thread, what the hardware prefetcher follows best), bf16 values are widened in
    /// registers, and the sums stay in registers over the whole inner dimension; the row tiles
    /// after the first find the panel in L1. Widening a block into a buffer first would only
    /// add a pass over L1.
    ///
    /// # Safety
    /// As [`PackedWeight::panels_into`], with `m <= STREAM_ROWS_MAX`.
    unsafe fn stream_panels_into(&self, x: &[f32], m: usize, p0: usize, p1: usize, c: *mut f32) {
        let (n, k) = (self.n, self.k);
        let isa = Isa::detect();
        // Row tiles of balanced sizes (8 rows: 4 + 4, not 6 + 2: a tile of few rows has fewer
        // independent sums per panel value read).
        let tiles = m.div_ceil(MR);
        let per = m.div_ceil(tiles.max(1));
        for j in p0..p1 {
            let whole = j * k * NR..(j + 1) * k * NR;
            let panel = match &self.data {
                Panels::F32(d) => PanelRef::F32(&d[whole]),
                Panels::Bf16(d) => PanelRef::Bf16(&d[whole]),
            };
            let cols = NR.min(n - j * NR);
            let mut i = 0;
            while i < m {
                let rows = per.min(m - i);
                let mut acc = [[0.0f32; NR]; MR];
                stream_tile(isa, panel, &x[i * k..], k, rows, &mut acc);
                for (r, a) in acc.iter().enumerate().take(rows) {
                    // SAFETY (caller): row i + r < m, columns j·NR..j·NR+cols ≤ n.
                    let row = unsafe { std::slice::from_raw_parts_mut(c.add((i + r) * n + j * NR), cols) };
                    row.copy_from_slice(&a[..cols]);
                }
                i += rows;
            }
        }
    }
}

/// Products of at most this many rows stream the bf16 panels directly, one row tile after the
/// other over a panel still in L1 (decode at any batch: an expert's few tokens). More rows take
/// the blocked path, which widens a panel block once for all its row tiles. Measured on the
/// bench checkpoint: batch-64 decode (≈ 8 rows an expert) 172 → 210 tok/s against `MR`.
const STREAM_ROWS_MAX: usize = 4 * MR;

/// `out[i] = f32 with upper half src[i]` (exact).
fn widen_bf16(src: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::ffi::have_avx2_fma() {
        // SAFETY: AVX2 present.
        return unsafe { widen_bf16_avx2(src, out) };
    }
    out.iter_mut().zip(src).for_each(|(o, &b)| *o = f32::from_bits((b as u32) << 16));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn widen_bf16_avx2(src: &[u16], out: &mut [f32]) {
    // Compiled with AVX2 enabled the loop becomes zero-extend + shift over 8 lanes at a time.
    out.iter_mut().zip(src).for_each(|(o, &b)| *o = f32::from_bits((b as u32) << 16));
}

#[derive(Clone, Copy)]
struct SharedOut {
    ptr: *mut f32,
}
// SAFETY: only used to hand disjoint column ranges of one output to parallel tasks.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// One micro-tile: `rows` (≤ MR) rows of `x` × one panel, over `kc` inner values.
struct Tile<'a> {
    x: &'a [f32],
    ldx: usize,
    panel: &'a [f32],
    kc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
}

impl Tile<'_> {
    /// # Safety
    /// `c` points at `rows` rows (stride `ldc`) of at least `cols` writable values.
    unsafe fn run(&self, c: *mut f32, ldc: usize) {
        let mut acc = [[0.0f32; NR]; MR];
        // An f32 panel block is a panel of `kc` values as the streaming kernel reads it.
        stream_tile(Isa::detect(), PanelRef::F32(&self.panel[..self.kc * NR]), self.x, self.ldx, self.rows, &mut acc);
        for (r, a) in acc.iter().enumerate().take(self.rows) {
            // SAFETY (caller): row r < rows, columns < cols.
            let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), self.cols) };
            if self.accumulate {
                row.iter_mut().zip(a).for_each(|(o, v)| *o += v);
            } else {
                row.copy_from_slice(&a[..self.cols]);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `n` pseudo-random values in [-1, 1] (xorshift).
    pub(in crate::kernels) fn fill(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    /// Every edge: rows not a multiple of MR, outputs not of NR, inner dims across KC blocks.
    #[test]
    fn packed_matmul_matches_a_plain_product() {
        for &(m, k, n) in &[(1, 1, 1), (1, 7, 3), (5, 33, 17), (6, 256, 16), (7, 257, 31), (13, 600, 40), (64, 1024, 96), (129, 300, 200)] {
            let x = fill(m * k, (m * 31 + k) as u32);
            let w = fill(n * k, (n * 17 + k) as u32);
            let pw = PackedWeight::from_rows(&w, n, k);
            assert_eq!(pw.row(n - 1), w[(n - 1) * k..].to_vec());
            let want = reference(&x, m, k, &w, n);
            for parallel in [false, true] {
                let mut got = vec![f32::NAN; m * n];
                pw.matmul(&x, m, &mut got, parallel);
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err <= 1e-4 * (k as f32).sqrt(), "m {m} k {k} n {n} parallel {parallel}: max error {err}");
            }
        }
    }

    /// Weights that are exactly bf16 values are stored as bf16 and multiply bit-for-bit as the
    /// same values stored as f32 (forced here by one value with low bits set, then restored).
    #[test]
    fn bf16_panels_give_the_f32_products_exactly() {
        for &(m, k, n) in &[(1, 5, 3), (3, 300, 40), (7, 257, 31), (64, 512, 96)] {
            let x = fill(m * k, (m * 7 + k) as u32);
            let w: Vec<f32> = fill(n * k, (n * 3 + k) as u32).iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000)).collect();
            let narrow = PackedWeight::from_rows(&w, n, k);
            assert!(narrow.is_bf16());
            assert_eq!(narrow.bytes() * 2, PackedWeight::from_rows(&fill(n * k, 1), n, k).bytes());
            assert_eq!(narrow.row(n - 1), w[(n - 1) * k..].to_vec());
            let mut wide = PackedWeight::from_rows(&w, n, k);
            let Panels::Bf16(bits) = &wide.data else { unreachable!() };
            wide.data = Panels::F32(bits.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect());
            for parallel in [false, true] {
                let (mut a, mut b) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                narrow.matmul(&x, m, &mut a, parallel);
                wide.matmul(&x, m, &mut b, parallel);
                assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "m {m} k {k} n {n}");
            }
            // One weight off the bf16 grid keeps the whole weight in f32.
            let mut w2 = w.clone();
            w2[0] = f32::from_bits(w2[0].to_bits() | 1);
            assert!(!PackedWeight::from_rows(&w2, n, k).is_bf16());
        }
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let pw = PackedWeight::from_rows(&[], 3, 0);
        let mut out = vec![1.0; 6];
        pw.matmul(&[], 2, &mut out, false);
        assert_eq!(out, vec![0.0; 6]);
    }
}
