#![allow(unsafe_code)]
//! The SIMD bodies of [`super::PackedWeight`]'s row tiles: `R` (≤ [`MR`]) rows of `x` × one
//! panel of [`NR`] = 16 output rows, summed over the whole inner dimension in registers.
//!
//! Two instruction sets, picked once at run time ([`Isa::detect`]): AVX2+FMA (a panel row is two
//! 8-lane registers) and AVX-512F (one 16-lane register, so half the loads, widenings and FMAs
//! per panel row, and 32 registers for more independent accumulators). bf16 panels are widened
//! exactly in registers (zero-extend, shift by 16) on both, so a product is the same sum of f32
//! terms whichever the panel's storage; the two instruction sets differ only in summation order
//! (the number of accumulator sets), i.e. within f32 rounding of each other.
//!
//! Why not AVX512-BF16's `vdpbf16ps`: it rounds `x` to bf16 too, a precision loss the fixtures'
//! tolerances were not set for, and decode is bound by reading the weights, not by FMAs.
//!
//! `SWITCHYARD_CPU_ISA=avx2` (or `scalar`) caps the choice, to measure one against the other in
//! the same run on the same machine.

use super::packed::{MR, NR};

/// The widest row-tile body this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// Detected once; `SWITCHYARD_CPU_ISA` may only lower it (an unknown value is ignored with a
    /// warning: a tuning knob must not stop a worker).
    pub(crate) fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::available().into_iter().max().unwrap_or(Isa::Scalar);
            match std::env::var("SWITCHYARD_CPU_ISA").ok().as_deref() {
                None => best,
                Some("scalar") => Isa::Scalar,
                Some("avx2") => best.min(Isa::Avx2),
                Some("avx512") => best,
                Some(other) => {
                    tracing::warn!(value = other, "SWITCHYARD_CPU_ISA: expected scalar, avx2 or avx512; ignored");
                    best
                }
            }
        })
    }

    /// Every instruction set this CPU can run the row tiles with.
    pub(crate) fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if super::ffi::have_avx2_fma() {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }
}

/// One panel's values as stored: `k·NR` f32 values, or their bf16 upper halves.
#[derive(Clone, Copy)]
pub(crate) enum PanelRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl PanelRef<'_> {
    fn k(&self) -> usize {
        match self {
            PanelRef::F32(d) => d.len() / NR,
            PanelRef::Bf16(d) => d.len() / NR,
        }
    }

    #[inline]
    fn value(&self, i: usize) -> f32 {
        match self {
            PanelRef::F32(d) => d[i],
            PanelRef::Bf16(d) => f32::from_bits((d[i] as u32) << 16),
        }
    }
}

/// `acc[r][c] = Σ_p x[r·ldx + p] · panel[p·NR + c]` for `rows ≤ MR` rows over the whole panel,
/// with the instruction set `isa` (one this CPU has: see [`Isa::available`]).
///
/// # Panics
/// If `rows > MR` or `x` is shorter than the rows it names.
pub(crate) fn stream_tile(isa: Isa, panel: PanelRef, x: &[f32], ldx: usize, rows: usize, acc: &mut [[f32; NR]; MR]) {
    let k = panel.k();
    assert!(rows <= MR && (rows == 0 || x.len() >= (rows - 1) * ldx + k), "stream_tile: short x");
    if rows == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (ptr, bf16) = match panel {
            PanelRef::F32(d) => (d.as_ptr() as *const u8, false),
            PanelRef::Bf16(d) => (d.as_ptr() as *const u8, true),
        };
        match isa {
            // SAFETY: the CPU has the instruction set (`Isa::available`); lengths checked above.
            Isa::Avx512 => return unsafe { x86::avx512_dispatch(ptr, bf16, x, ldx, k, rows, acc) },
            Isa::Avx2 => return unsafe { x86::avx2_dispatch(ptr, bf16, x, ldx, k, rows, acc) },
            Isa::Scalar => {}
        }
    }
    let _ = isa;
    for a in acc.iter_mut().take(rows) {
        *a = [0.0; NR];
    }
    for p in 0..k {
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let xv = x[r * ldx + p];
            for (col, o) in a.iter_mut().enumerate() {
                *o += xv * panel.value(p * NR + col);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// One body per row count, so the accumulators stay in registers; few rows get several
    /// accumulator sets over alternating `p` (with one set every FMA would wait on the previous
    /// one: latency-bound at 1–2 rows, i.e. decode).
    ///
    /// # Safety
    /// AVX2+FMA present; as [`avx2_rows`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_dispatch(panel: *const u8, bf16: bool, x: &[f32], ldx: usize, k: usize, rows: usize, acc: &mut [[f32; NR]; MR]) {
        macro_rules! go {
            ($r:literal, $u:literal) => {
                if bf16 { avx2_rows::<$r, $u, true>(panel, x, ldx, k, acc) } else { avx2_rows::<$r, $u, false>(panel, x, ldx, k, acc) }
            };
        }
        unsafe {
            match rows {
                6 => go!(6, 1),
                5 => go!(5, 1),
                4 => go!(4, 1),
                3 => go!(3, 2),
                2 => go!(2, 2),
                _ => go!(1, 4),
            }
        }
    }

    /// `R` rows with `U` accumulator sets; `BF16`: the panel holds bf16 bits (else f32).
    ///
    /// # Safety
    /// AVX2+FMA present; `x` holds `(R-1)·ldx + k` values; the panel `k·NR` values.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_rows<const R: usize, const U: usize, const BF16: bool>(panel: *const u8, x: &[f32], ldx: usize, k: usize, out: &mut [[f32; NR]; MR]) {
        let mut lo = [[_mm256_setzero_ps(); R]; U];
        let mut hi = [[_mm256_setzero_ps(); R]; U];
        let xp = x.as_ptr();
        // SAFETY (all loads): p < k; the panel holds k·NR values, x rows r < R hold k values.
        let load = |p: usize| -> (__m256, __m256) {
            if BF16 {
                unsafe {
                    let bits = (panel as *const u16).add(p * NR) as *const __m128i;
                    let w0 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(bits)), 16);
                    let w1 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(bits.add(1))), 16);
                    (_mm256_castsi256_ps(w0), _mm256_castsi256_ps(w1))
                }
            } else {
                let f = panel as *const f32;
                unsafe { (_mm256_loadu_ps(f.add(p * NR)), _mm256_loadu_ps(f.add(p * NR + 8))) }
            }
        };
        let step = |p: usize, lo: &mut [__m256; R], hi: &mut [__m256; R]| {
            let (b0, b1) = load(p);
            for r in 0..R {
                let a = unsafe { _mm256_broadcast_ss(&*xp.add(r * ldx + p)) };
                lo[r] = _mm256_fmadd_ps(a, b0, lo[r]);
                hi[r] = _mm256_fmadd_ps(a, b1, hi[r]);
            }
        };
        let main = k / U * U;
        let mut p = 0;
        while p < main {
            for u in 0..U {
                step(p + u, &mut lo[u], &mut hi[u]);
            }
            p += U;
        }
        while p < k {
            step(p, &mut lo[0], &mut hi[0]);
            p += 1;
        }
        for u in 1..U {
            for r in 0..R {
                lo[0][r] = _mm256_add_ps(lo[0][r], lo[u][r]);
                hi[0][r] = _mm256_add_ps(hi[0][r], hi[u][r]);
            }
        }
        for r in 0..R {
            // SAFETY: out rows hold NR = 16 values.
            unsafe {
                _mm256_storeu_ps(out[r].as_mut_ptr(), lo[0][r]);
                _mm256_storeu_ps(out[r].as_mut_ptr().add(8), hi[0][r]);
            }
        }
    }

    /// As [`avx2_dispatch`] with 16-lane registers: one per panel row, so every row count up to
    /// `MR` gets enough independent accumulators (`R·U` ≥ 8, two FMA ports × 4 cycles latency).
    /// (Tiles of up to 12 rows, which 32 registers would hold, measured slower at batch 64.)
    ///
    /// # Safety
    /// AVX-512F present; as [`avx512_rows`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512_dispatch(panel: *const u8, bf16: bool, x: &[f32], ldx: usize, k: usize, rows: usize, acc: &mut [[f32; NR]; MR]) {
        macro_rules! go {
            ($r:literal, $u:literal) => {
                if bf16 { avx512_rows::<$r, $u, true>(panel, x, ldx, k, acc) } else { avx512_rows::<$r, $u, false>(panel, x, ldx, k, acc) }
            };
        }
        unsafe {
            match rows {
                6 => go!(6, 2),
                5 => go!(5, 2),
                4 => go!(4, 2),
                3 => go!(3, 4),
                2 => go!(2, 4),
                _ => go!(1, 8),
            }
        }
    }

    /// Bytes ahead of the panel row being read that are prefetched: the panel streams are
    /// short (a thread's share of one expert's weight, ≈ 0.5 MiB), so the hardware prefetcher
    /// is still ramping up over much of each. Measured (bench checkpoint, 2 threads, huge pages
    /// on): 1 KiB ahead against none, decode batch 16 107 → 115–122 tok/s, batch 64 194–203 → 231;
    /// 2 KiB against 1 KiB, batch 1 and 16 another 3–6 %, 4 KiB no better.
    const PREFETCH_AHEAD: usize = 2048;

    /// `R` rows with `U` accumulator sets of one 16-lane register per row.
    ///
    /// # Safety
    /// AVX-512F present; `x` holds `(R-1)·ldx + k` values; the panel `k·NR` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_rows<const R: usize, const U: usize, const BF16: bool>(panel: *const u8, x: &[f32], ldx: usize, k: usize, out: &mut [[f32; NR]; MR]) {
        let mut acc = [[_mm512_setzero_ps(); R]; U];
        let xp = x.as_ptr();
        // SAFETY (all loads): p < k; the panel holds k·NR values, x rows r < R hold k values.
        let load = |p: usize| -> __m512 {
            if BF16 {
                unsafe {
                    let bits = _mm256_loadu_si256((panel as *const u16).add(p * NR) as *const __m256i);
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
                }
            } else {
                unsafe { _mm512_loadu_ps((panel as *const f32).add(p * NR)) }
            }
        };
        let step = |p: usize, acc: &mut [__m512; R]| {
            let b = load(p);
            for r in 0..R {
                let a = _mm512_set1_ps(unsafe { *xp.add(r * ldx + p) });
                acc[r] = _mm512_fmadd_ps(a, b, acc[r]);
            }
        };
        let main = k / U * U;
        let mut p = 0;
        let elem = if BF16 { 2 } else { 4 };
        while p < main {
            // A prefetch past the panel's end is harmless (prefetches never fault).
            let ahead = (panel as *const i8).wrapping_add(p * NR * elem + PREFETCH_AHEAD);
            let mut off = 0;
            while off < U * NR * elem {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off));
                off += 64;
            }
            for u in 0..U {
                step(p + u, &mut acc[u]);
            }
            p += U;
        }
        while p < k {
            step(p, &mut acc[0]);
            p += 1;
        }
        for u in 1..U {
            for r in 0..R {
                acc[0][r] = _mm512_add_ps(acc[0][r], acc[u][r]);
            }
        }
        for r in 0..R {
            // SAFETY: out rows hold NR = 16 values.
            unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[0][r]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values on the bf16 grid, so that a panel has an exact bf16 twin.
    fn fill(n: usize, seed: u32) -> Vec<f32> {
        super::super::packed::tests::fill(n, seed).into_iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000)).collect()
    }

    /// Every instruction set this CPU has gives the f64 reference's sums (within f32 rounding),
    /// for every row count, odd inner dimensions (the remainder loop), f32 and bf16 panels; and
    /// a bf16 panel gives bit-for-bit its f32 twin's sums.
    #[test]
    fn every_instruction_set_gives_the_reference_sums() {
        let isas = Isa::available();
        assert!(isas.contains(&Isa::Scalar));
        for k in [1, 7, 64, 301] {
            let wide = fill(k * NR, k as u32);
            let narrow: Vec<u16> = wide.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            for rows in 1..=MR {
                let ldx = k + 3;
                let x: Vec<f32> = fill(rows * ldx, 99 + rows as u32).iter().map(|v| v * 1.37).collect();
                for &isa in &isas {
                    let (mut a, mut b) = ([[f32::NAN; NR]; MR], [[f32::NAN; NR]; MR]);
                    stream_tile(isa, PanelRef::F32(&wide), &x, ldx, rows, &mut a);
                    stream_tile(isa, PanelRef::Bf16(&narrow), &x, ldx, rows, &mut b);
                    for r in 0..rows {
                        assert_eq!(a[r].map(f32::to_bits), b[r].map(f32::to_bits), "{isa:?} k {k} rows {rows}");
                        for c in 0..NR {
                            let want: f64 = (0..k).map(|p| x[r * ldx + p] as f64 * wide[p * NR + c] as f64).sum();
                            assert!((a[r][c] as f64 - want).abs() <= 1e-5 * (k as f64).sqrt() * 2.0, "{isa:?} k {k} rows {rows} r {r} c {c}: {} vs {want}", a[r][c]);
                        }
                    }
                }
            }
        }
    }
}
