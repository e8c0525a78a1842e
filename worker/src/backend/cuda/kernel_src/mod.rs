#![forbid(unsafe_code)]
//! The CUDA C source of every kernel the CUDA backend launches, generated at run time.
//!
//! # Why generate the source
//!
//! The backend compiles this text with NVRTC when it starts, for the exact GPU it finds. That keeps
//! the build free of `nvcc` and of the CUDA toolkit (the crate builds and tests on machines with no
//! GPU at all), and one binary serves every architecture the driver supports.
//!
//! The source is one self-contained translation unit: it includes no header (NVRTC has no system
//! include path to rely on), so 16-bit values are `unsigned short` and are converted with bit
//! operations (bf16) or one PTX instruction (f16). Kernels that read weights of any upload dtype
//! are written once as a Rust template taking the dtype's C type, name suffix and load expression,
//! and emitted once per dtype (`_f32`, `_bf16`, `_f16`), so the three variants cannot diverge.
//! The launch constants below are substituted into the text with `format!`, and
//! [`super::geometry`] builds its launch shapes from the same constants, so the kernels and their
//! launches cannot drift apart.
//!
//! # Numerics
//!
//! The kernels mirror the CPU reference (`crate::kernels`, `crate::moe`) operation by operation:
//! `expf`/`sinf`/`cosf`/`sqrtf` and `1.0f / sqrtf(..)` rather than fast-math intrinsics, the same
//! summation order where it is sequential on the CPU (softmax, router weights, MoE combine), and
//! the router's selection rules (ties to the lower index, NaN as minus infinity) exactly.
//! Block-wide reductions necessarily sum in a different order than the CPU, so results agree to
//! rounding, not bit for bit.
//!
//! The ABI (names, parameter order and types, launch geometry) is fixed by the kernel table in the
//! backend's design notes; the unit tests below check every entry point's parameter list against it.

pub mod expert_grouping;

/// Threads per block of `attention`; also the chunk of context positions scored at a time.
pub const ATTENTION_BLOCK: u32 = 128;
/// Threads per block of `rope`.
pub const ROPE_BLOCK: u32 = 64;
/// Threads per block of `route_topk` (one thread per row).
pub const ROUTE_BLOCK: u32 = 64;
/// Threads per block of the per-row and grid-stride kernels.
pub const ROW_BLOCK: u32 = 256;
/// Largest value head dim `attention` supports: each thread keeps
/// `MAX_ATTENTION_VD / ATTENTION_BLOCK` accumulators in registers.
pub const MAX_ATTENTION_VD: usize = 512;
/// Largest `half` (rotary dim / 2) `rope` supports: its shared de-interleave buffer holds
/// `2 * MAX_ROPE_HALF` floats.
pub const MAX_ROPE_HALF: usize = 512;

/// Accumulators per attention thread: value dims `threadIdx.x + ATTENTION_BLOCK * i`.
const ATTENTION_ACC: usize = MAX_ATTENTION_VD / ATTENTION_BLOCK as usize;

// The block reduction works on whole warps and its scratch holds one slot per warp of the
// largest CUDA block; the attention accumulators must cover MAX_ATTENTION_VD exactly.
const _: () = assert!(ROW_BLOCK.is_multiple_of(32) && ROW_BLOCK <= 1024);
const _: () = assert!(MAX_ATTENTION_VD.is_multiple_of(ATTENTION_BLOCK as usize));
const _: () = assert!(ATTENTION_BLOCK <= 1024 && ROPE_BLOCK <= 1024 && ROUTE_BLOCK <= 1024);

/// Every entry point in [`source`], dtype suffixes expanded.
pub const KERNELS: &[&str] = &[
    "embed_rows_f32",
    "embed_rows_bf16",
    "embed_rows_f16",
    "cast_f32_bf16",
    "cast_f32_f16",
    "rmsnorm",
    "add_inplace",
    "add_bias",
    "clamp_inplace",
    "rope",
    "silu_mul",
    "kv_write",
    "attention",
    "route_topk",
    "gather_rows",
    "combine_rows",
    "shared_gate",
    "split_cols",
    "mla_assemble",
    "moe_align",
    "expert_gemm_f32",
    "expert_gemm_bf16",
    "expert_gemm_f16",
];

/// A weight element type as the kernels see it.
struct WeightType {
    /// Entry-point suffix, e.g. `bf16`.
    suffix: &'static str,
    /// C element type.
    c_type: &'static str,
    /// C expression converting one element to `float`; `$` stands for the element (an lvalue).
    load: &'static str,
    /// C expression rounding the f32 `$` to this type and back (what a GEMM's input cast does).
    round: &'static str,
}

/// The weight dtypes, in the order their variants appear in [`KERNELS`].
const WEIGHT_TYPES: [WeightType; 3] = [
    WeightType { suffix: "f32", c_type: "float", load: "$", round: "$" },
    WeightType { suffix: "bf16", c_type: "unsigned short", load: "bf16_to_f32($)", round: "bf16_to_f32(f32_to_bf16($))" },
    WeightType { suffix: "f16", c_type: "unsigned short", load: "f16_to_f32($)", round: "f16_to_f32(f32_to_f16($))" },
];

/// The 16-bit output types of `cast_f32_*`: suffix and the device function that rounds to it.
const HALF_TYPES: [(&str, &str); 2] = [("bf16", "f32_to_bf16"), ("f16", "f32_to_f16")];

/// The whole CUDA C translation unit: the shared helpers, then every kernel in [`KERNELS`].
pub fn source() -> String {
    let mut s = String::with_capacity(24 * 1024);
    s.push_str(PRELUDE);
    for w in &WEIGHT_TYPES {
        s.push_str(&embed_rows(w.c_type, w.suffix, w.load));
    }
    for (suffix, store) in HALF_TYPES {
        s.push_str(&cast_f32(suffix, store));
    }
    s.push_str(&elementwise());
    s.push_str(&rope());
    s.push_str(&kv_write());
    s.push_str(&attention());
    s.push_str(ROUTE_HELPERS);
    s.push_str(&route_topk());
    s.push_str(&moe_rows());
    s.push_str(&reshapes());
    s.push_str(&expert_grouping::source());
    s
}

/// Header of a grid-stride loop of `long long var` over `0..n`: correct for any grid size and for
/// element counts past 2^31.
fn grid_stride(var: &str, n: &str) -> String {
    format!(
        "for (long long {var} = (long long)blockIdx.x * blockDim.x + threadIdx.x; {var} < ({n}); \
         {var} += (long long)blockDim.x * gridDim.x)"
    )
}

/// Helpers shared by the kernels. `static` keeps them out of the module's symbol table, so only
/// the entry points are visible to `cuModuleGetFunction`.
const PRELUDE: &str = r#"// Generated by worker/src/backend/cuda/kernel_src.rs and compiled by NVRTC at start-up.
// Self-contained on purpose: 16-bit values are unsigned short, converted below.

static __device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
static __device__ __forceinline__ int min_int(int a, int b) { return a < b ? a : b; }
static __device__ __forceinline__ int max_int(int a, int b) { return a > b ? a : b; }

static __device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

static __device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest, ties to even; a NaN stays a quiet NaN. Same bits as half::bf16::from_f32.
static __device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    const unsigned int x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x0040u);
    const unsigned int round_bit = 0x00008000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) return (unsigned short)((x >> 16) + 1u);
    return (unsigned short)(x >> 16);
}

static __device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

static __device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sum of v over the block; every thread gets the total. blockDim.x must be a multiple of 32 and
// every thread of the block must call it (it holds barriers). red is __shared__ float[33]; the
// trailing barrier lets the caller reuse red (or call again) as soon as this returns.
static __device__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < n_warps ? red[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) red[32] = t;
    }
    __syncthreads();
    const float total = red[32];
    __syncthreads();
    return total;
}

"#;

/// `embed_rows_{suffix}`: gather embedding rows of a `c_type` table into f32 activations.
fn embed_rows(c_type: &str, suffix: &str, load: &str) -> String {
    let value = load.replace('$', "src[i]");
    format!(
        r#"extern "C" __global__ void embed_rows_{suffix}(const {c_type}* table, const unsigned int* ids, float* out, int rows, int hidden) {{
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {{
        const {c_type}* src = table + (long long)ids[r] * hidden;
        float* dst = out + (long long)r * hidden;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = {value};
    }}
}}

"#
    )
}

/// `cast_f32_{suffix}`: round f32 to a 16-bit type with the device function `store`.
fn cast_f32(suffix: &str, store: &str) -> String {
    let each = grid_stride("i", "n");
    format!(
        r#"extern "C" __global__ void cast_f32_{suffix}(const float* x, unsigned short* y, long long n) {{
    {each} y[i] = {store}(x[i]);
}}

"#
    )
}

/// rmsnorm, add_inplace, add_bias, clamp_inplace, silu_mul.
fn elementwise() -> String {
    let all_n = grid_stride("i", "n");
    let all_rn = grid_stride("i", "total");
    format!(
        r#"// y may equal x: each thread rewrites only the elements it read, after the reduction barrier.
extern "C" __global__ void rmsnorm(const float* x, const float* w, float* y, int rows, int n, float eps) {{
    __shared__ float red[33];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {{
        const float* xr = x + (long long)r * n;
        float* yr = y + (long long)r * n;
        float ss = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
        ss = block_sum(ss, red) / (float)n;
        const float inv = 1.0f / sqrtf(ss + eps);
        for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = xr[i] * inv * w[i];
    }}
}}

extern "C" __global__ void add_inplace(float* x, const float* y, long long n) {{
    {all_n} x[i] += y[i];
}}

extern "C" __global__ void add_bias(float* x, const float* b, int rows, int n) {{
    const long long total = (long long)rows * n;
    {all_rn} x[i] += b[i % n];
}}

// fmaxf/fminf return the other operand for a NaN, as f32::max/min do on the CPU.
extern "C" __global__ void clamp_inplace(float* x, long long n, float c) {{
    {all_n} x[i] = fminf(fmaxf(x[i], -c), c);
}}

extern "C" __global__ void silu_mul(const float* gate_up, float* out, int rows, int inter) {{
    const long long total = (long long)rows * inter;
    {all_rn} {{
        const long long r = i / inter;
        const long long c = i - r * inter;
        const float g = gate_up[r * 2 * inter + c];
        const float u = gate_up[r * 2 * inter + inter + c];
        out[i] = g / (1.0f + expf(-g)) * u;
    }}
}}

"#
    )
}

/// `rope`: rotary embedding of one head slice per (row, head) block.
fn rope() -> String {
    let max_half = MAX_ROPE_HALF;
    let buf_len = 2 * MAX_ROPE_HALF;
    format!(
        r#"static __device__ __forceinline__ void rope_pair(float* v, int i, int half, float a, float b, float p, const float* inv_freq, float attn_factor) {{
    const float ang = p * inv_freq[i];
    const float c = cosf(ang) * attn_factor;
    const float s = sinf(ang) * attn_factor;
    v[i] = a * c - b * s;
    v[half + i] = b * c + a * s;
}}

// Interleaved (DeepSeek) heads are de-interleaved as they are rotated: the whole 2*half slice is
// staged in shared memory first, because element i is written while element 2i is still unread.
extern "C" __global__ void rope(float* x, const int* pos, const float* inv_freq, int rows, int n_heads, int head_stride, int offset, int half, float attn_factor, int interleaved) {{
    __shared__ float buf[{buf_len}];
    // Uniform over the block, so no thread is left waiting at a barrier.
    if (half <= 0 || half > {max_half}) return;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {{
        const float p = (float)pos[r];
        for (int h = blockIdx.y; h < n_heads; h += gridDim.y) {{
            float* v = x + ((long long)r * n_heads + h) * head_stride + offset;
            if (interleaved) {{
                for (int i = threadIdx.x; i < 2 * half; i += blockDim.x) buf[i] = v[i];
                __syncthreads();
                for (int i = threadIdx.x; i < half; i += blockDim.x)
                    rope_pair(v, i, half, buf[2 * i], buf[2 * i + 1], p, inv_freq, attn_factor);
                // buf is refilled for the next (r, h).
                __syncthreads();
            }} else {{
                for (int i = threadIdx.x; i < half; i += blockDim.x)
                    rope_pair(v, i, half, v[i], v[half + i], p, inv_freq, attn_factor);
            }}
        }}
    }}
}}

"#
    )
}

/// `kv_write`: scatter this step's K or V rows into their cache slots.
fn kv_write() -> String {
    r#"// A negative slot marks a row with no cache slot (padding): it is skipped.
extern "C" __global__ void kv_write(const float* src, float* pool, const int* slots, int rows, int row_len) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const int slot = slots[r];
        if (slot < 0) continue;
        const float* s = src + (long long)r * row_len;
        float* d = pool + (long long)slot * row_len;
        for (int i = threadIdx.x; i < row_len; i += blockDim.x) d[i] = s[i];
    }
}

"#
    .to_string()
}

/// `attention`: paged, causal (optionally windowed) attention of one query row and head per
/// block, with an online softmax over chunks of `ATTENTION_BLOCK` context positions.
fn attention() -> String {
    let b = ATTENTION_BLOCK;
    let max_vd = MAX_ATTENTION_VD;
    let n_acc = ATTENTION_ACC;
    format!(
        r#"static __device__ __forceinline__ long long kv_slot(const int* table, int j, int page_size) {{
    return (long long)table[j / page_size] * page_size + j % page_size;
}}

// Dynamic shared memory: qd floats (the query head) then {b} floats (one chunk's scores, then
// weights). Thread t owns value dims t + {b}*i, i < {n_acc}. A negative seq_of_row marks a padding
// row; it and an empty context (pos < first) produce zeros.
extern "C" __global__ void attention(const float* q, const float* k_pool, const float* v_pool, const int* block_table, const int* table_start, const int* seq_of_row, const int* pos_of_row, float* out, int n_heads, int n_kv, int qd, int vd, int page_size, float scale, int window) {{
    extern __shared__ float smem[];
    float* qs = smem;
    float* ps = smem + qd;
    const int r = blockIdx.x;
    const int h = blockIdx.y;
    const int tid = threadIdx.x;
    // Uniform over the block, so no thread is left waiting at a barrier; geometry.rs rejects
    // these shapes before launch.
    if (blockDim.x != {b} || h >= n_heads || n_kv <= 0 || n_heads % n_kv != 0) return;
    if (qd < 0 || vd < 0 || vd > {max_vd} || page_size <= 0) return;
    const int kvh = h / (n_heads / n_kv);
    const long long k_stride = (long long)n_kv * qd;
    const long long v_stride = (long long)n_kv * vd;
    const float* k_head = k_pool + (long long)kvh * qd;
    const float* v_head = v_pool + (long long)kvh * vd;
    const int seq = seq_of_row[r];
    const int p = pos_of_row[r];
    const int first = window > 0 ? max_int(0, p + 1 - window) : 0;
    const int last = seq < 0 ? first - 1 : p;
    const int* table = block_table + (seq < 0 ? 0 : table_start[seq]);
    const float* qrow = q + ((long long)r * n_heads + h) * qd;
    for (int d = tid; d < qd; d += {b}) qs[d] = qrow[d];
    __syncthreads();

    float m = neg_inf();
    float l = 0.0f;
    float acc[{n_acc}];
#pragma unroll
    for (int i = 0; i < {n_acc}; ++i) acc[i] = 0.0f;
    for (int base = first; base <= last; base += {b}) {{
        const int n = min_int({b}, last + 1 - base);
        if (tid < n) {{
            const float* kr = k_head + kv_slot(table, base + tid, page_size) * k_stride;
            float s = 0.0f;
            for (int d = 0; d < qd; ++d) s += qs[d] * kr[d];
            ps[tid] = s * scale;
        }}
        __syncthreads();
        float m_new = m;
        for (int j = 0; j < n; ++j) m_new = fmaxf(m_new, ps[j]);
        // While every score so far is -inf, exponentiate against 0: expf(-inf) = 0, not NaN.
        const float m_ref = m_new == neg_inf() ? 0.0f : m_new;
        const float corr = expf(m - m_ref);
        // Every thread has read the raw scores before they become weights.
        __syncthreads();
        if (tid < n) ps[tid] = expf(ps[tid] - m_ref);
        __syncthreads();
        float chunk_l = 0.0f;
#pragma unroll
        for (int i = 0; i < {n_acc}; ++i) acc[i] *= corr;
        for (int j = 0; j < n; ++j) {{
            const float pj = ps[j];
            chunk_l += pj;
            const float* vr = v_head + kv_slot(table, base + j, page_size) * v_stride;
#pragma unroll
            for (int i = 0; i < {n_acc}; ++i) {{
                const int d = tid + {b} * i;
                if (d < vd) acc[i] += pj * vr[d];
            }}
        }}
        l = l * corr + chunk_l;
        m = m_new;
        // ps is rewritten by the next chunk.
        __syncthreads();
    }}
    float* orow = out + ((long long)r * n_heads + h) * vd;
#pragma unroll
    for (int i = 0; i < {n_acc}; ++i) {{
        const int d = tid + {b} * i;
        if (d < vd) orow[d] = l == 0.0f ? 0.0f : acc[i] / l;
    }}
}}

"#
    )
}

/// Device helpers of `route_topk`: the CPU router's ordering and selection, with no per-row
/// storage beyond the scratch the ABI provides.
const ROUTE_HELPERS: &str = r#"// True when (a, ia) comes before (b, ib) in top_k_indices' order: larger first, NaN counted as
// -inf, ties to the lower index. f32::total_cmp also puts +0 before -0; that is kept too.
static __device__ __forceinline__ bool ranks_before(float a, int ia, float b, int ib) {
    if (a != a) a = neg_inf();
    if (b != b) b = neg_inf();
    if (a != b) return a > b;
    const unsigned int sa = __float_as_uint(a) >> 31;
    const unsigned int sb = __float_as_uint(b) >> 31;
    if (sa != sb) return sa < sb;
    return ia < ib;
}

// Repeated argmax without a "taken" array: the best element of v[0..n) ranking after the previous
// pick (prev_i < 0: nothing picked yet). The order is total, so successive calls enumerate
// top_k_indices(v, n) in order. -1 when nothing is left.
static __device__ int next_ranked(const float* v, int n, float prev_v, int prev_i) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
        if (prev_i >= 0 && !ranks_before(prev_v, prev_i, v[i], i)) continue;
        if (best < 0 || ranks_before(v[i], i, v[best], best)) best = i;
    }
    return best;
}

// Score of group g: max of its choice values, or (sum_top2) the sum of its two best values, which
// is its one value when the group has a single expert (top_k_indices returns min(k, len) items).
static __device__ float group_value(const float* ch, int g, int per, int sum_top2) {
    const float* grp = ch + (long long)g * per;
    if (!sum_top2) {
        float m = neg_inf();
        for (int i = 0; i < per; ++i) m = fmaxf(m, grp[i]);
        return m;
    }
    const int a = next_ranked(grp, per, 0.0f, -1);
    const int b = next_ranked(grp, per, grp[a], a);
    return b < 0 ? grp[a] : grp[a] + grp[b];
}

// next_ranked over the group values.
static __device__ int next_group(const float* ch, int n_group, int per, int sum_top2, float prev_v, int prev_i) {
    int best = -1;
    float best_v = 0.0f;
    for (int g = 0; g < n_group; ++g) {
        const float v = group_value(ch, g, per, sum_top2);
        if (prev_i >= 0 && !ranks_before(prev_v, prev_i, v, g)) continue;
        if (best < 0 || ranks_before(v, g, best_v, best)) {
            best = g;
            best_v = v;
        }
    }
    return best;
}

// Keep the topk_group best groups and set every expert of the others to masked_value. Groups are
// disjoint, so masking one never changes another's value: find the last kept group first, then
// decide and mask each group in turn, with no per-group storage.
static __device__ void mask_groups(float* ch, int n_group, int per, int sum_top2, int topk_group, float masked_value) {
    if (topk_group >= n_group) return;
    int last = -1;
    float last_v = 0.0f;
    for (int t = 0; t < topk_group; ++t) {
        last = next_group(ch, n_group, per, sum_top2, last_v, last);
        last_v = group_value(ch, last, per, sum_top2);
    }
    for (int g = 0; g < n_group; ++g) {
        const float v = group_value(ch, g, per, sum_top2);
        const bool keep = last >= 0 && (g == last || ranks_before(v, g, last_v, last));
        if (!keep)
            for (int i = 0; i < per; ++i) ch[(long long)g * per + i] = masked_value;
    }
}

// Softmax (max, exp, sequential sum in index order, multiply by 1/sum) or sigmoid, as on the CPU.
static __device__ void route_scores(const float* lg, float* sc, int n, int scoring) {
    if (scoring == 0) {
        float mx = neg_inf();
        for (int e = 0; e < n; ++e) mx = fmaxf(mx, lg[e]);
        float s = 0.0f;
        for (int e = 0; e < n; ++e) {
            sc[e] = expf(lg[e] - mx);
            s += sc[e];
        }
        const float inv = 1.0f / s;
        for (int e = 0; e < n; ++e) sc[e] *= inv;
    } else {
        for (int e = 0; e < n; ++e) sc[e] = 1.0f / (1.0f + expf(-lg[e]));
    }
}

"#;

/// `route_topk`: the CPU router (`crate::moe::Router::route_one`), one thread per row.
fn route_topk() -> String {
    let rows = grid_stride("row", "rows");
    format!(
        r#"// scratch + row*2*n_experts holds the row's scores, then its choice values. Slots past
// min(k, n_experts) get id 0 and weight 0, as the CPU leaves them.
extern "C" __global__ void route_topk(const float* logits, const float* bias, float* scratch, unsigned int* ids, float* weights, int rows, int n_experts, int k, int scoring, int has_bias, int n_group, int topk_group, int group_score, float masked_value, int norm_topk, float norm_eps, float scaling) {{
    if (n_experts <= 0 || k <= 0) return;
    {rows} {{
        const int e_n = n_experts;
        float* sc = scratch + row * 2 * e_n;
        float* ch = sc + e_n;
        route_scores(logits + row * e_n, sc, e_n, scoring);
        for (int e = 0; e < e_n; ++e) ch[e] = has_bias ? sc[e] + bias[e] : sc[e];
        const float* wsrc = sc;
        const int per = n_group > 0 ? e_n / n_group : 0;
        if (per > 0) {{
            mask_groups(ch, n_group, per, group_score, topk_group, masked_value);
            // DeepSeek-V2 (no correction bias): weights come from the masked scores.
            if (!has_bias) wsrc = ch;
        }}
        unsigned int* id = ids + row * k;
        float* w = weights + row * k;
        int prev = -1;
        float prev_v = 0.0f;
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) {{
            const int e = j < e_n ? next_ranked(ch, e_n, prev_v, prev) : -1;
            if (e >= 0) {{
                prev = e;
                prev_v = ch[e];
            }}
            id[j] = e >= 0 ? (unsigned int)e : 0u;
            w[j] = e >= 0 ? wsrc[e] : 0.0f;
            sum += w[j];
        }}
        if (norm_topk) {{
            const float d = sum + norm_eps;
            for (int j = 0; j < k; ++j) w[j] /= d;
        }}
        if (scaling != 1.0f)
            for (int j = 0; j < k; ++j) w[j] *= scaling;
    }}
}}

"#
    )
}

/// gather_rows, combine_rows, shared_gate: the MoE row movement around the expert GEMMs.
fn moe_rows() -> String {
    r#"// A negative index marks a padding row: it is written as zeros so later GEMMs see no garbage.
extern "C" __global__ void gather_rows(const float* x, const int* idx, float* out, int rows, int hidden) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const int src = idx[r];
        float* dst = out + (long long)r * hidden;
        if (src < 0) {
            for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = 0.0f;
        } else {
            const float* s = x + (long long)src * hidden;
            for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = s[i];
        }
    }
}

// Sums in j order, as the CPU combine does; out is overwritten, never accumulated into.
extern "C" __global__ void combine_rows(const float* y, const int* src_row, const float* w, float* out, int tokens, int k, int hidden) {
    for (int t = blockIdx.x; t < tokens; t += gridDim.x) {
        const int* sr = src_row + (long long)t * k;
        const float* wt = w + (long long)t * k;
        float* dst = out + (long long)t * hidden;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            float s = 0.0f;
            for (int j = 0; j < k; ++j) {
                const int src = sr[j];
                if (src >= 0) s += wt[j] * y[(long long)src * hidden + i];
            }
            dst[i] = s;
        }
    }
}

// y may equal x: y is written only after the reduction barrier.
extern "C" __global__ void shared_gate(const float* x, const float* g, float* y, int rows, int hidden) {
    __shared__ float red[33];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + (long long)r * hidden;
        float* yr = y + (long long)r * hidden;
        float d = 0.0f;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) d += xr[i] * g[i];
        d = block_sum(d, red);
        const float s = 1.0f / (1.0f + expf(-d));
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) yr[i] *= s;
    }
}

"#
    .to_string()
}

/// split_cols, mla_assemble: column re-layouts, one grid-stride loop over every output element.
fn reshapes() -> String {
    let split = grid_stride("i", "(long long)rows * width");
    let mla = grid_stride("i", "(long long)rows * n_heads * width");
    format!(
        r#"extern "C" __global__ void split_cols(const float* src, float* a, float* b, int rows, int a_cols, int b_cols) {{
    const long long width = (long long)a_cols + b_cols;
    {split} {{
        const long long r = i / width;
        const long long c = i - r * width;
        if (c < a_cols) a[r * a_cols + c] = src[i];
        else b[r * b_cols + (c - a_cols)] = src[i];
    }}
}}

// One loop covers both outputs: column c < nope + rope_dim of (row, head) is a k element, the rest
// are v elements.
extern "C" __global__ void mla_assemble(const float* kv, const float* k_pe, float* k, float* v, int rows, int n_heads, int nope, int rope_dim, int vd) {{
    const long long kd = (long long)nope + rope_dim;
    const long long width = kd + vd;
    {mla} {{
        const long long rh = i / width;
        const long long c = i - rh * width;
        const float* kv_row = kv + rh * ((long long)nope + vd);
        if (c < kd) {{
            const long long r = rh / n_heads;
            k[rh * kd + c] = c < nope ? kv_row[c] : k_pe[r * rope_dim + (c - nope)];
        }} else {{
            const long long d = c - kd;
            v[rh * vd + d] = kv_row[nope + d];
        }}
    }}
}}
"#
    )
}

#[cfg(test)]
mod tests;
