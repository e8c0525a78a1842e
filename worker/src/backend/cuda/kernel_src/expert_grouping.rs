//! The kernels that run a MoE layer's routed experts with the routing left on the device.
//!
//! A grouped GEMM needs the rows of each expert together. Planning that grouping on the host
//! (`moe_plan`) costs a device-to-host copy of the router's ids and a wait for the whole layer
//! above it, every MoE layer of every step; these two kernels do it on the device instead, so a
//! step's only waits are for its logits and, once at its end, its routing (reported to the
//! engine for load statistics).
//!
//! * `moe_align` (one block): counts the choices of each expert, gives each expert a run of
//!   whole [`EXPERT_TILE_M`]-row tiles in a grouped buffer, and writes which choice sits in each
//!   row (`sorted`, -1 for padding), which expert owns each tile (`tile_expert`, -1 past the last
//!   used tile) and where each choice went (`src_row`, what `combine_rows` reads). The host sizes
//!   the buffers for the worst case, `ceil(choices / TILE_M) + min(experts, choices)` tiles, so
//!   no count has to come back to size a launch. Rows within an expert come in atomic order:
//!   each output row depends only on its own input row, so the order changes no value.
//! * `expert_gemm_{dtype}`: one block per (tile, [`EXPERT_TILE_N`] output columns); the tile's
//!   expert is read on the device, the weight pointer from a per-layer table of expert weights,
//!   and tiles past the used ones return at once. Its input rows are gathered on the fly (row
//!   `sorted[p] / row_div` of `x`, or row `p` itself when `row_div` is 0) and rounded to the
//!   weight's dtype first, as the cast before a cuBLAS GEMM does. Padding rows are written as
//!   zeros. A table entry of [`WEIGHTS_IN_OTHER_LAUNCH`] skips the tile (its expert's weights
//!   are in another dtype, run by that dtype's launch). A null weight pointer (a routed expert with no copy here) sets the layer's error word
//!   to [`ERROR_NO_WEIGHTS`] instead of computing; an id out of range, to [`ERROR_BAD_ID`]. The
//!   host reads the words with the routing at the end of the step and fails the step.
//!
//! The GEMM is shared-memory tiled SIMT code with f32 accumulation: memory-bound decode reads
//! each routed expert's weights once per [`EXPERT_TILE_M`] rows, which is what bounds it; a
//! tensor-core variant for large prefill batches would keep this interface.

use super::{WeightType, WEIGHT_TYPES};

/// Threads of `moe_align`'s single block. At most 256 like every block here: 256 threads × 255
/// registers fit any GPU's register file, so no launch can fail for lack of registers.
pub const ALIGN_BLOCK: u32 = 256;
/// Most experts `moe_align` groups (its shared count and offset arrays).
pub const MAX_ALIGN_EXPERTS: usize = 1024;
/// Rows per tile of `expert_gemm_*`: every expert's rows are padded to a multiple of it.
pub const EXPERT_TILE_M: usize = 16;
/// Output columns per block of `expert_gemm_*`.
pub const EXPERT_TILE_N: usize = 64;
/// Reduction depth staged in shared memory per iteration of `expert_gemm_*`.
pub const EXPERT_TILE_K: usize = 32;
/// Threads per block of `expert_gemm_*`: each owns one column of the tile and
/// `EXPERT_TILE_M * EXPERT_TILE_N / EXPERT_GEMM_BLOCK` of its rows.
pub const EXPERT_GEMM_BLOCK: u32 = 256;
/// A weight-table entry for an expert whose weights another launch (another dtype) covers: the
/// tile returns. 0 is an expert with no weights here: an error.
pub const WEIGHTS_IN_OTHER_LAUNCH: u64 = 1;
/// Error word values (0: none).
pub const ERROR_BAD_ID: i32 = 1;
pub const ERROR_NO_WEIGHTS: i32 = 2;

const ROW_LANES: usize = EXPERT_GEMM_BLOCK as usize / EXPERT_TILE_N;
const ROWS_PER_THREAD: usize = EXPERT_TILE_M / ROW_LANES;
const _: () = assert!((EXPERT_GEMM_BLOCK as usize).is_multiple_of(EXPERT_TILE_N) && EXPERT_TILE_M.is_multiple_of(ROW_LANES));
const _: () = assert!(ALIGN_BLOCK <= 256 && EXPERT_GEMM_BLOCK <= 256 && MAX_ALIGN_EXPERTS >= 1);

/// Tiles the grouped buffer needs at most for `choices` routed rows over `n_experts` experts:
/// every expert's last tile may be partly padding.
pub fn max_tiles(choices: usize, n_experts: usize) -> usize {
    choices.div_ceil(EXPERT_TILE_M) + n_experts.min(choices)
}

/// The source of `moe_align` and every `expert_gemm_*`.
pub fn source() -> String {
    let mut s = moe_align();
    for w in &WEIGHT_TYPES {
        s.push_str(&expert_gemm(w));
    }
    s
}

fn moe_align() -> String {
    let (m, e_max) = (EXPERT_TILE_M, MAX_ALIGN_EXPERTS);
    let (bad_id, block) = (ERROR_BAD_ID, ALIGN_BLOCK);
    format!(
        r#"// Groups a layer's routed choices by expert; see expert_grouping.rs. One block of {block} threads.
extern "C" __global__ void moe_align(const unsigned int* ids, int n_choices, int n_experts, int max_tiles, int* sorted, int* tile_expert, int* src_row, int* error) {{
    __shared__ int count[{e_max}];
    __shared__ int start[{e_max}];
    if (n_experts < 1 || n_experts > {e_max} || blockDim.x != {block}) return;
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n_choices; i += blockDim.x) {{
        const unsigned int e = ids[i];
        if (e < (unsigned int)n_experts) atomicAdd(&count[e], 1);
        else error[0] = {bad_id};
    }}
    __syncthreads();
    if (threadIdx.x == 0) {{
        int at = 0;
        for (int e = 0; e < n_experts; ++e) {{
            start[e] = at;
            at += (count[e] + {m} - 1) / {m} * {m};
        }}
    }}
    __syncthreads();
    const int last = n_experts - 1;
    const int used = (start[last] + (count[last] + {m} - 1) / {m} * {m}) / {m};
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) {{
        const int first = start[e] / {m};
        const int tiles = (count[e] + {m} - 1) / {m};
        for (int t = 0; t < tiles && first + t < max_tiles; ++t) tile_expert[first + t] = e;
    }}
    for (int t = used + threadIdx.x; t < max_tiles; t += blockDim.x) tile_expert[t] = -1;
    for (long long p = threadIdx.x; p < (long long)max_tiles * {m}; p += blockDim.x) sorted[p] = -1;
    __syncthreads();
    for (int e = threadIdx.x; e < n_experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n_choices; i += blockDim.x) {{
        const unsigned int e = ids[i];
        int p = -1;
        if (e < (unsigned int)n_experts) {{
            p = start[e] + atomicAdd(&count[e], 1);
            if (p < max_tiles * {m}) sorted[p] = i;
            else p = -1;
        }}
        src_row[i] = p;
    }}
}}

"#
    )
}

fn expert_gemm(w: &WeightType) -> String {
    let (m, n_tile, k_tile) = (EXPERT_TILE_M, EXPERT_TILE_N, EXPERT_TILE_K);
    let (lanes, per, block) = (ROW_LANES, ROWS_PER_THREAD, EXPERT_GEMM_BLOCK);
    let (suffix, c_type) = (w.suffix, w.c_type);
    let load = w.load.replace('$', "wr[c]");
    let round = w.round.replace('$', "x[row * k + k0 + c]");
    let (no_weights, other) = (ERROR_NO_WEIGHTS, WEIGHTS_IN_OTHER_LAUNCH);
    format!(
        r#"// out[p, :] = W_e · x[row(p), :] for every row p of every used tile, e = tile_expert[tile].
extern "C" __global__ void expert_gemm_{suffix}(const float* x, const int* sorted, int row_div, const unsigned long long* weights, const int* tile_expert, float* out, int n, int k, int* error) {{
    __shared__ float a_tile[{m}][{k_tile} + 1];
    __shared__ float w_tile[{n_tile}][{k_tile} + 1];
    if (blockDim.x != {block}) return;
    const int tile = blockIdx.x;
    const int e = tile_expert[tile];
    if (e < 0) return;
    const unsigned long long wa = weights[e];
    if (wa == 0ull) {{
        if (threadIdx.x == 0) error[0] = {no_weights};
        return;
    }}
    if (wa == {other}ull) return;
    const {c_type}* wt = (const {c_type}*)wa;
    const int col0 = blockIdx.y * {n_tile};
    const int tn = threadIdx.x % {n_tile};
    const int tm = threadIdx.x / {n_tile};
    const long long row0 = (long long)tile * {m};
    float acc[{per}];
    for (int j = 0; j < {per}; ++j) acc[j] = 0.0f;
    for (int k0 = 0; k0 < k; k0 += {k_tile}) {{
        for (int i = threadIdx.x; i < {m} * {k_tile}; i += blockDim.x) {{
            const int r = i / {k_tile};
            const int c = i % {k_tile};
            const int src = sorted[row0 + r];
            float v = 0.0f;
            if (src >= 0 && k0 + c < k) {{
                const long long row = row_div > 0 ? (long long)(src / row_div) : row0 + r;
                v = {round};
            }}
            a_tile[r][c] = v;
        }}
        for (int i = threadIdx.x; i < {n_tile} * {k_tile}; i += blockDim.x) {{
            const int r = i / {k_tile};
            const int c = i % {k_tile};
            float v = 0.0f;
            if (col0 + r < n && k0 + c < k) {{
                const {c_type}* wr = wt + (long long)(col0 + r) * k + k0;
                v = {load};
            }}
            w_tile[r][c] = v;
        }}
        __syncthreads();
        for (int c = 0; c < {k_tile}; ++c) {{
            const float wv = w_tile[tn][c];
            for (int j = 0; j < {per}; ++j) acc[j] += a_tile[tm + j * {lanes}][c] * wv;
        }}
        __syncthreads();
    }}
    const int col = col0 + tn;
    if (col >= n) return;
    for (int j = 0; j < {per}; ++j) {{
        const long long p = row0 + tm + j * {lanes};
        out[p * n + col] = sorted[p] >= 0 ? acc[j] : 0.0f;
    }}
}}

"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiles a split of the choices over the experts takes.
    fn tiles(split: &[usize]) -> usize {
        split.iter().map(|c| c.div_ceil(EXPERT_TILE_M)).sum()
    }

    #[test]
    fn max_tiles_covers_every_split() {
        assert_eq!(max_tiles(8, 64), 1 + 8);
        assert_eq!(max_tiles(0, 8), 0);
        // Every split of up to 40 choices over three experts fits the bound.
        for a in 0..40usize {
            for b in 0..40 - a {
                for c in 0..40 - a - b {
                    assert!(tiles(&[a, b, c]) <= max_tiles(a + b + c, 3), "split {a}/{b}/{c}");
                }
            }
        }
        // Within one expert's padding of the most a split can take: one choice per expert.
        assert_eq!(tiles(&[1, 1, 1]), 3);
        assert!(max_tiles(3, 3) - tiles(&[1, 1, 1]) <= 1);
    }

    #[test]
    fn gemm_rounds_its_input_like_the_cast() {
        let s = source();
        assert!(s.contains("v = bf16_to_f32(f32_to_bf16(x[row * k + k0 + c]));"));
        assert!(s.contains("v = f16_to_f32(f32_to_f16(x[row * k + k0 + c]));"));
        assert!(s.contains("v = x[row * k + k0 + c];"));
        assert!(s.contains("v = bf16_to_f32(wr[c]);"));
        assert!(!s.contains('$'));
    }
}
