#![allow(unsafe_code)]
//! `unsafe` lives here (OpenBLAS (CBLAS) calls, memory-mapping checkpoint files, thread
//! scheduling) and in the packed-weight micro-kernel (`packed.rs`).
//!
//! Every function here checks the slice lengths it hands to C before the call, so the safe
//! wrappers cannot be made to read or write out of bounds.

use std::os::raw::c_int;

// The system OpenBLAS (Debian `libopenblas-dev`) provides CBLAS; `cblas-sys` only declares it.
// (`openblas-src` 0.10.16 with `system` still builds its downloader, which needs a TLS feature.)
#[link(name = "openblas")]
unsafe extern "C" {
    fn openblas_set_num_threads(n: c_int);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn mallopt(param: c_int, value: c_int) -> c_int;
}

/// Keep large freed blocks in the heap (glibc): the forward pass allocates and frees
/// multi-megabyte activations every layer; by default each is a fresh mmap whose pages fault
/// in zeroed (measured: a large share of step time as system time).
pub fn tune_allocator() {
    set_mmap_threshold(1 << 30);
}

/// glibc's `M_MMAP_THRESHOLD` and `M_TRIM_THRESHOLD` (bytes): blocks at least this large are
/// mapped on their own and returned to the system when freed.
pub fn set_mmap_threshold(bytes: c_int) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        // SAFETY: glibc tunables; plain integers.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, bytes);
            mallopt(M_TRIM_THRESHOLD, bytes);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

#[cfg(target_os = "linux")]
#[repr(C)]
struct SchedParam {
    sched_priority: c_int,
}

#[cfg(target_os = "linux")]
unsafe extern "C" {
    fn sched_setscheduler(pid: c_int, policy: c_int, param: *const SchedParam) -> c_int;
}

/// Put the calling thread (only it: Linux schedules threads individually) in `SCHED_IDLE`, so
/// that it runs only on cores nothing else wants. For background work beside serving, such as
/// loading the experts of a placement change. Returns whether the scheduler accepted it; a no-op
/// returning false off Linux.
pub fn set_current_thread_idle_priority() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SCHED_IDLE: c_int = 5;
        let param = SchedParam { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` outlives the call and is only read.
        unsafe { sched_setscheduler(0, SCHED_IDLE, &param) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

#[cfg(target_os = "linux")]
#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

#[cfg(target_os = "linux")]
unsafe extern "C" {
    fn clock_gettime(clock: c_int, tp: *mut Timespec) -> c_int;
}

/// CPU time this process has used (all threads, user + system), microseconds; 0 off Linux.
pub fn process_cpu_time_us() -> u64 {
    cpu_clock_us(2) // CLOCK_PROCESS_CPUTIME_ID
}

/// CPU time the calling thread has used, microseconds; 0 off Linux.
pub fn thread_cpu_time_us() -> u64 {
    cpu_clock_us(3) // CLOCK_THREAD_CPUTIME_ID
}

fn cpu_clock_us(clock: c_int) -> u64 {
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    {
        let mut ts = Timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec (64-bit layout) for the duration of the call.
        if unsafe { clock_gettime(clock, &mut ts) } != 0 {
            return 0;
        }
        ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
    }
    #[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
    {
        let _ = clock;
        0
    }
}

/// Set the number of threads OpenBLAS uses internally (we parallelise with rayon on top).
pub fn set_blas_threads(n: usize) {
    let n = n.clamp(1, 1024) as c_int;
    // SAFETY: plain setter of a global in OpenBLAS; no pointers involved.
    unsafe { openblas_set_num_threads(n) }
}

/// `c[m×n] (row stride ldc) = a[m×k] · w[n×k]^T` (+ `c` if `accumulate`).
///
/// `c` must hold rows `0..m` with stride `ldc >= n`; only columns `0..n` of each row are written.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_bt(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, c: &mut [f32], ldc: usize, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= m * k, "sgemm: a too short");
    assert!(w.len() >= n * k, "sgemm: w too short");
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "sgemm: c too short");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * ldc..r * ldc + n].fill(0.0);
            }
        }
        return;
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    if m == 1 {
        // SAFETY: bounds checked above; row-major w is [n×k] with lda = k.
        unsafe {
            cblas_sys::cblas_sgemv(
                cblas_sys::CBLAS_LAYOUT::CblasRowMajor,
                cblas_sys::CBLAS_TRANSPOSE::CblasNoTrans,
                n as c_int,
                k as c_int,
                1.0,
                w.as_ptr(),
                k as c_int,
                a.as_ptr(),
                1,
                beta,
                c.as_mut_ptr(),
                1,
            )
        }
        return;
    }
    // SAFETY: bounds checked above.
    unsafe {
        cblas_sys::cblas_sgemm(
            cblas_sys::CBLAS_LAYOUT::CblasRowMajor,
            cblas_sys::CBLAS_TRANSPOSE::CblasNoTrans,
            cblas_sys::CBLAS_TRANSPOSE::CblasTrans,
            m as c_int,
            n as c_int,
            k as c_int,
            1.0,
            a.as_ptr(),
            k as c_int,
            w.as_ptr(),
            k as c_int,
            beta,
            c.as_mut_ptr(),
            ldc as c_int,
        )
    }
}

/// A raw view of an output matrix that several threads write in disjoint column blocks.
#[derive(Clone, Copy)]
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}
// SAFETY: used only by `sgemm_bt_col_blocks`, whose blocks write disjoint columns.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `c[m×n] = a[m×k] · w[n×k]^T`, splitting the `n` columns into `blocks` (given as ranges that
/// must be disjoint and inside `0..n`) computed in parallel by rayon.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_bt_col_blocks(
    a: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    c: &mut [f32],
    blocks: &[(usize, usize)],
    accumulate: bool,
) {
    use rayon::prelude::*;
    assert!(a.len() >= m * k && w.len() >= n * k && c.len() >= m * n);
    let mut prev_end = 0;
    for &(s, e) in blocks {
        assert!(s >= prev_end && s <= e && e <= n, "sgemm: overlapping blocks");
        prev_end = e;
    }
    let out = SharedOut { ptr: c.as_mut_ptr(), len: c.len() };
    let beta = if accumulate { 1.0 } else { 0.0 };
    blocks.par_iter().for_each(|&(s, e)| {
        // Capture the whole (Send) wrapper, not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let out = out;
        let nb = e - s;
        if nb == 0 || m == 0 {
            return;
        }
        debug_assert!((m - 1) * n + e <= out.len);
        // SAFETY: the column blocks are disjoint (checked above), so no two threads write the
        // same element; all indices stay inside `c` (m×n, checked above); `c` is borrowed
        // mutably for the whole call.
        unsafe {
            if m == 1 {
                cblas_sys::cblas_sgemv(
                    cblas_sys::CBLAS_LAYOUT::CblasRowMajor,
                    cblas_sys::CBLAS_TRANSPOSE::CblasNoTrans,
                    nb as c_int,
                    k as c_int,
                    1.0,
                    w.as_ptr().add(s * k),
                    k as c_int,
                    a.as_ptr(),
                    1,
                    beta,
                    out.ptr.add(s),
                    1,
                )
            } else {
                cblas_sys::cblas_sgemm(
                    cblas_sys::CBLAS_LAYOUT::CblasRowMajor,
                    cblas_sys::CBLAS_TRANSPOSE::CblasNoTrans,
                    cblas_sys::CBLAS_TRANSPOSE::CblasTrans,
                    m as c_int,
                    nb as c_int,
                    k as c_int,
                    1.0,
                    a.as_ptr(),
                    k as c_int,
                    w.as_ptr().add(s * k),
                    k as c_int,
                    beta,
                    out.ptr.add(s),
                    n as c_int,
                )
            }
        }
    });
}

/// Memory-map a file read-only.
pub fn mmap_file(file: &std::fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: checkpoint files are treated as immutable while the model is loaded; we copy
    // (and convert) every tensor we use out of the map at load time.
    unsafe { memmap2::Mmap::map(file) }
}

/// Drops the resident pages of a read-only file mapping from this process (`MADV_DONTNEED`): the
/// memory a loaded checkpoint held twice — once converted or packed, once mapped — is held once.
/// Later reads fault the pages back in from the file (or the page cache).
pub fn release_mapped_pages(map: &memmap2::Mmap) -> std::io::Result<()> {
    release_mapped_range(map, 0, map.len())
}

/// [`release_mapped_pages`] for bytes `[offset, offset + len)` of the map (widened to whole pages).
pub fn release_mapped_range(map: &memmap2::Mmap, offset: usize, len: usize) -> std::io::Result<()> {
    if len == 0 || offset >= map.len() {
        return Ok(());
    }
    // SAFETY: the mapping is private and read-only; its pages are file-backed and never written,
    // so dropping them loses nothing: a later (or concurrent) read faults the same bytes back in
    // from the file. Rust slices of the map stay valid: the mapping itself is unchanged.
    unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len.min(map.len() - offset)) }
}

/// Whether the AVX2+FMA small-m kernel can run on this CPU.
pub fn have_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static H: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *H.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m×n] (+)= a[m×k] · w[n×k]ᵀ` for small `m`, streaming each weight row once (no packing),
/// parallel over column blocks. Returns `false` (and does nothing) without AVX2+FMA.
#[allow(clippy::too_many_arguments)]
pub fn small_m_matmul(a: &[f32], m: usize, k: usize, w: &[f32], n: usize, c: &mut [f32], accumulate: bool, parallel: bool) -> bool {
    if !have_avx2_fma() {
        return false;
    }
    assert!(a.len() >= m * k && w.len() >= n * k && c.len() >= m * n, "small_m_matmul: short slice");
    #[cfg(target_arch = "x86_64")]
    {
        use rayon::prelude::*;
        let out = SharedOut { ptr: c.as_mut_ptr(), len: c.len() };
        let run = |n0: usize, n1: usize| {
            #[allow(clippy::redundant_locals)]
            let out = out;
            debug_assert!(m * n <= out.len);
            // SAFETY: AVX2+FMA checked above; every index is bounded by m, k, n (slices checked);
            // blocks [n0, n1) are disjoint, so parallel writes never overlap.
            unsafe { small_m_avx2(a.as_ptr(), m, k, w.as_ptr(), n0, n1, out.ptr, n, accumulate) }
        };
        if parallel {
            let nb = (rayon::current_num_threads() * 4).min(n.div_ceil(32)).max(1);
            let step = n.div_ceil(nb).div_ceil(4) * 4;
            let blocks: Vec<usize> = (0..n).step_by(step.max(4)).collect();
            blocks.par_iter().for_each(|&s| run(s, (s + step.max(4)).min(n)));
        } else {
            run(0, n);
        }
    }
    true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn small_m_avx2(a: *const f32, m: usize, k: usize, w: *const f32, n0: usize, n1: usize, c: *mut f32, ldc: usize, acc: bool) {
    use std::arch::x86_64::*;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
    let k8 = k / 8 * 8;
    let store = |i: usize, j: usize, v: f32| {
        // SAFETY (caller): i < m, j < n1 <= ldc.
        let p = unsafe { c.add(i * ldc + j) };
        unsafe {
            if acc {
                *p += v
            } else {
                *p = v
            }
        }
    };
    let mut j = n0;
    while j < n1 {
        let jn = (n1 - j).min(4);
        let wr: [*const f32; 4] = std::array::from_fn(|r| unsafe { w.add((j + r.min(jn - 1)) * k) });
        let mut i = 0;
        while i < m {
            let two = i + 1 < m;
            let x0 = unsafe { a.add(i * k) };
            let x1 = unsafe { a.add((i + two as usize) * k) };
            let mut s0 = [_mm256_setzero_ps(); 4];
            let mut s1 = [_mm256_setzero_ps(); 4];
            let mut p = 0;
            while p < k8 {
                let xa = unsafe { _mm256_loadu_ps(x0.add(p)) };
                let xb = unsafe { _mm256_loadu_ps(x1.add(p)) };
                for r in 0..4 {
                    let wv = unsafe { _mm256_loadu_ps(wr[r].add(p)) };
                    s0[r] = _mm256_fmadd_ps(wv, xa, s0[r]);
                    s1[r] = _mm256_fmadd_ps(wv, xb, s1[r]);
                }
                p += 8;
            }
            for r in 0..jn {
                let mut t0 = hsum(s0[r]);
                let mut t1 = hsum(s1[r]);
                for q in k8..k {
                    let wq = unsafe { *wr[r].add(q) };
                    t0 += wq * unsafe { *x0.add(q) };
                    t1 += wq * unsafe { *x1.add(q) };
                }
                store(i, j + r, t0);
                if two {
                    store(i + 1, j + r, t1);
                }
            }
            i += 2;
        }
        j += 4;
    }
}
