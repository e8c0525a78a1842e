#![forbid(unsafe_code)]
//! Launch shapes of the CUDA kernels, checked against the limits the kernels and CUDA impose.
//!
//! Each function here matches one launch shape of the kernel ABI (see [`super::kernel_src`]):
//! [`per_row`] (one block per row), [`grid_stride`] (a capped grid looping over the elements),
//! [`rope`], [`attention`] and [`route`]. They are plain arithmetic so they are unit-tested
//! without a GPU, and they use the same constants the kernel source is generated from, so a
//! kernel and its launch cannot disagree about block size or shared memory.
//!
//! A shape a kernel cannot run correctly is an error here rather than a silent wrong result (the
//! kernels return early on shapes they do not support). An empty launch is an error too
//! ([`GeometryError::Empty`]): CUDA rejects zero-sized grids, so callers skip empty work instead
//! of launching it.

use super::kernel_src::expert_grouping::{ALIGN_BLOCK, EXPERT_GEMM_BLOCK, EXPERT_TILE_M, EXPERT_TILE_N, MAX_ALIGN_EXPERTS};
use super::kernel_src::{ATTENTION_BLOCK, MAX_ATTENTION_VD, MAX_ROPE_HALF, ROPE_BLOCK, ROUTE_BLOCK, ROW_BLOCK};

/// CUDA's limit on `gridDim.x` (compute capability 3.0 and later).
pub const MAX_GRID_X: u64 = (1 << 31) - 1;
/// CUDA's limit on `gridDim.y` and `gridDim.z`.
pub const MAX_GRID_YZ: u64 = 65_535;
/// Dynamic shared memory a launch may use without opting in to more per kernel.
pub const MAX_SHARED_BYTES: u64 = 48 * 1024;
/// Blocks of a grid-stride launch at most: enough to fill any current GPU several times over,
/// while each thread loops over the rest.
pub const MAX_GRID_STRIDE_BLOCKS: u32 = 65_535 * 4;
/// The largest value a kernel's `int` parameter carries.
const MAX_INT: u64 = i32::MAX as u64;

/// Grid, block and dynamic shared memory of one kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

/// Why a launch shape is invalid.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GeometryError {
    #[error("empty launch: {what} is 0 (skip empty work instead of launching it)")]
    Empty { what: &'static str },
    #[error("grid {axis} of {value} blocks exceeds the CUDA limit of {limit}")]
    GridTooLarge { axis: char, value: u64, limit: u64 },
    #[error("{what} = {value} does not fit the kernel's 32-bit int parameter (max {limit})")]
    IntOverflow { what: &'static str, value: u64, limit: u64 },
    #[error("attention value head dim {vd} exceeds MAX_ATTENTION_VD = {max}")]
    AttentionDimTooLarge { vd: usize, max: usize },
    #[error("rope half dim {half} exceeds MAX_ROPE_HALF = {max}")]
    RopeHalfTooLarge { half: usize, max: usize },
    #[error("{bytes} bytes of shared memory exceed the {limit}-byte default limit")]
    SharedMemoryTooLarge { bytes: u64, limit: u64 },
    #[error("n_heads = {n_heads} is not a multiple of n_kv = {n_kv}")]
    HeadsNotMultipleOfKv { n_heads: usize, n_kv: usize },
    #[error("{n_experts} experts exceed MAX_ALIGN_EXPERTS = {max} of the device grouping")]
    TooManyExperts { n_experts: usize, max: usize },
}

/// One block of [`ROW_BLOCK`] threads per row (embed_rows, rmsnorm, kv_write, gather_rows,
/// combine_rows, shared_gate).
pub fn per_row(rows: usize) -> Result<LaunchDims, GeometryError> {
    nonzero("rows", rows)?;
    Ok(LaunchDims { grid: (grid_x(rows)?, 1, 1), block: (ROW_BLOCK, 1, 1), shared_bytes: 0 })
}

/// A grid-stride launch over `n` elements: blocks of [`ROW_BLOCK`] threads, one element per
/// thread up to [`MAX_GRID_STRIDE_BLOCKS`] blocks, beyond which the kernels' loops take over.
pub fn grid_stride(n: usize) -> Result<LaunchDims, GeometryError> {
    nonzero("n", n)?;
    let blocks = (n as u64).div_ceil(ROW_BLOCK as u64).clamp(1, MAX_GRID_STRIDE_BLOCKS as u64);
    // The clamp keeps blocks within u32.
    Ok(LaunchDims { grid: (blocks as u32, 1, 1), block: (ROW_BLOCK, 1, 1), shared_bytes: 0 })
}

/// `rope`: one block of [`ROPE_BLOCK`] threads per (row, head); `half` is bounded by the kernel's
/// static de-interleave buffer.
pub fn rope(rows: usize, n_heads: usize, half: usize) -> Result<LaunchDims, GeometryError> {
    nonzero("rows", rows)?;
    nonzero("n_heads", n_heads)?;
    nonzero("half", half)?;
    if half > MAX_ROPE_HALF {
        return Err(GeometryError::RopeHalfTooLarge { half, max: MAX_ROPE_HALF });
    }
    Ok(LaunchDims { grid: (grid_x(rows)?, grid_yz('y', n_heads)?, 1), block: (ROPE_BLOCK, 1, 1), shared_bytes: 0 })
}

/// `attention`: one block of [`ATTENTION_BLOCK`] threads per (query row, head), with dynamic shared
/// memory for the query head (`qd` floats) and one chunk of scores (`ATTENTION_BLOCK` floats).
pub fn attention(rows: usize, n_heads: usize, n_kv: usize, qd: usize, vd: usize) -> Result<LaunchDims, GeometryError> {
    nonzero("rows", rows)?;
    nonzero("n_heads", n_heads)?;
    nonzero("n_kv", n_kv)?;
    nonzero("qd", qd)?;
    nonzero("vd", vd)?;
    if !n_heads.is_multiple_of(n_kv) {
        return Err(GeometryError::HeadsNotMultipleOfKv { n_heads, n_kv });
    }
    if vd > MAX_ATTENTION_VD {
        return Err(GeometryError::AttentionDimTooLarge { vd, max: MAX_ATTENTION_VD });
    }
    // Saturating: a qd near usize::MAX must report its size, not wrap to a small one.
    let bytes = (qd as u64).saturating_add(ATTENTION_BLOCK as u64).saturating_mul(4);
    if bytes > MAX_SHARED_BYTES {
        return Err(GeometryError::SharedMemoryTooLarge { bytes, limit: MAX_SHARED_BYTES });
    }
    Ok(LaunchDims {
        grid: (grid_x(rows)?, grid_yz('y', n_heads)?, 1),
        block: (ATTENTION_BLOCK, 1, 1),
        // At most MAX_SHARED_BYTES, so it fits u32.
        shared_bytes: bytes as u32,
    })
}

/// `route_topk`: one thread per row, in blocks of [`ROUTE_BLOCK`].
pub fn route(rows: usize) -> Result<LaunchDims, GeometryError> {
    nonzero("rows", rows)?;
    // The kernel takes `int rows`; beyond that the grid would be fine but the row count would wrap.
    if rows as u64 > MAX_INT {
        return Err(GeometryError::IntOverflow { what: "rows", value: rows as u64, limit: MAX_INT });
    }
    let blocks = (rows as u64).div_ceil(ROUTE_BLOCK as u64);
    Ok(LaunchDims { grid: (blocks as u32, 1, 1), block: (ROUTE_BLOCK, 1, 1), shared_bytes: 0 })
}

/// `moe_align`: one block of [`ALIGN_BLOCK`] threads; `n_experts` bounded by its shared arrays,
/// the grouped buffer's rows (`max_tiles * EXPERT_TILE_M`) by its `int` row numbers.
pub fn moe_align(choices: usize, n_experts: usize, max_tiles: usize) -> Result<LaunchDims, GeometryError> {
    nonzero("choices", choices)?;
    nonzero("n_experts", n_experts)?;
    if n_experts > MAX_ALIGN_EXPERTS {
        return Err(GeometryError::TooManyExperts { n_experts, max: MAX_ALIGN_EXPERTS });
    }
    let rows = (max_tiles as u64).saturating_mul(EXPERT_TILE_M as u64);
    if rows > MAX_INT {
        return Err(GeometryError::IntOverflow { what: "grouped rows", value: rows, limit: MAX_INT });
    }
    Ok(LaunchDims { grid: (1, 1, 1), block: (ALIGN_BLOCK, 1, 1), shared_bytes: 0 })
}

/// `expert_gemm_*`: one block of [`EXPERT_GEMM_BLOCK`] threads per (tile, [`EXPERT_TILE_N`]
/// output columns).
pub fn expert_gemm(tiles: usize, n: usize, k: usize) -> Result<LaunchDims, GeometryError> {
    nonzero("tiles", tiles)?;
    nonzero("n", n)?;
    nonzero("k", k)?;
    for (what, v) in [("n", n), ("k", k)] {
        if v as u64 > MAX_INT {
            return Err(GeometryError::IntOverflow { what, value: v as u64, limit: MAX_INT });
        }
    }
    Ok(LaunchDims { grid: (grid_x(tiles)?, grid_yz('y', n.div_ceil(EXPERT_TILE_N))?, 1), block: (EXPERT_GEMM_BLOCK, 1, 1), shared_bytes: 0 })
}

fn nonzero(what: &'static str, value: usize) -> Result<(), GeometryError> {
    if value == 0 {
        return Err(GeometryError::Empty { what });
    }
    Ok(())
}

/// `value` blocks along x, within CUDA's limit (which also keeps a row index within `int`).
fn grid_x(value: usize) -> Result<u32, GeometryError> {
    let value = value as u64;
    if value > MAX_GRID_X {
        return Err(GeometryError::GridTooLarge { axis: 'x', value, limit: MAX_GRID_X });
    }
    Ok(value as u32)
}

/// `value` blocks along y or z, within CUDA's limit.
fn grid_yz(axis: char, value: usize) -> Result<u32, GeometryError> {
    let value = value as u64;
    if value > MAX_GRID_YZ {
        return Err(GeometryError::GridTooLarge { axis, value, limit: MAX_GRID_YZ });
    }
    Ok(value as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_row_launches_one_block_per_row() {
        let d = per_row(7).unwrap();
        assert_eq!(d, LaunchDims { grid: (7, 1, 1), block: (256, 1, 1), shared_bytes: 0 });
        assert_eq!(per_row(MAX_GRID_X as usize).unwrap().grid.0, i32::MAX as u32);
    }

    #[test]
    fn per_row_rejects_empty_and_oversized_grids() {
        assert_eq!(per_row(0), Err(GeometryError::Empty { what: "rows" }));
        assert_eq!(
            per_row(1 << 31),
            Err(GeometryError::GridTooLarge { axis: 'x', value: 1 << 31, limit: MAX_GRID_X })
        );
    }

    #[test]
    fn grid_stride_rounds_up_and_caps() {
        assert_eq!(grid_stride(1).unwrap().grid, (1, 1, 1));
        assert_eq!(grid_stride(256).unwrap().grid, (1, 1, 1));
        assert_eq!(grid_stride(257).unwrap().grid, (2, 1, 1));
        assert_eq!(grid_stride(256 * 1000 + 1).unwrap().grid, (1001, 1, 1));
        let cap = MAX_GRID_STRIDE_BLOCKS as usize;
        assert_eq!(grid_stride(cap * 256).unwrap().grid.0, MAX_GRID_STRIDE_BLOCKS);
        assert_eq!(grid_stride(cap * 256 + 1).unwrap().grid.0, MAX_GRID_STRIDE_BLOCKS);
        // Past 2^32 elements (the kernels index with long long): still capped, no wrap.
        assert_eq!(grid_stride(usize::MAX).unwrap().grid.0, 65_535 * 4);
        assert_eq!(grid_stride(3).unwrap().block, (256, 1, 1));
        assert_eq!(grid_stride(0), Err(GeometryError::Empty { what: "n" }));
    }

    #[test]
    fn rope_is_rows_by_heads_and_bounds_half() {
        let d = rope(5, 32, 64).unwrap();
        assert_eq!(d, LaunchDims { grid: (5, 32, 1), block: (64, 1, 1), shared_bytes: 0 });
        assert!(rope(1, 1, MAX_ROPE_HALF).is_ok());
        assert_eq!(rope(1, 1, 513), Err(GeometryError::RopeHalfTooLarge { half: 513, max: 512 }));
        assert_eq!(rope(1, 65_536, 8), Err(GeometryError::GridTooLarge { axis: 'y', value: 65_536, limit: 65_535 }));
        assert!(rope(1, 65_535, 8).is_ok());
        assert_eq!(rope(0, 1, 8), Err(GeometryError::Empty { what: "rows" }));
        assert_eq!(rope(1, 0, 8), Err(GeometryError::Empty { what: "n_heads" }));
        assert_eq!(rope(1, 1, 0), Err(GeometryError::Empty { what: "half" }));
    }

    #[test]
    fn attention_shared_memory_holds_query_and_one_chunk() {
        let d = attention(3, 16, 4, 192, 128).unwrap();
        assert_eq!(d.grid, (3, 16, 1));
        assert_eq!(d.block, (128, 1, 1));
        assert_eq!(d.shared_bytes, (192 + 128) * 4);
        // Exactly 48 KiB is allowed; one float more is not.
        let qd_max = (MAX_SHARED_BYTES / 4) as usize - ATTENTION_BLOCK as usize;
        assert_eq!(attention(1, 1, 1, qd_max, 64).unwrap().shared_bytes, 48 * 1024);
        assert_eq!(
            attention(1, 1, 1, qd_max + 1, 64),
            Err(GeometryError::SharedMemoryTooLarge { bytes: 48 * 1024 + 4, limit: 48 * 1024 })
        );
        assert_eq!(
            attention(1, 1, 1, usize::MAX, 64),
            Err(GeometryError::SharedMemoryTooLarge { bytes: u64::MAX, limit: 48 * 1024 })
        );
    }

    #[test]
    fn attention_bounds_value_dim_and_head_grouping() {
        assert!(attention(1, 8, 8, 64, MAX_ATTENTION_VD).is_ok());
        assert_eq!(attention(1, 8, 8, 64, 513), Err(GeometryError::AttentionDimTooLarge { vd: 513, max: 512 }));
        assert_eq!(attention(1, 6, 4, 64, 64), Err(GeometryError::HeadsNotMultipleOfKv { n_heads: 6, n_kv: 4 }));
        assert!(attention(1, 8, 2, 64, 64).is_ok());
        assert_eq!(attention(1, 8, 0, 64, 64), Err(GeometryError::Empty { what: "n_kv" }));
        assert_eq!(attention(0, 8, 8, 64, 64), Err(GeometryError::Empty { what: "rows" }));
        assert_eq!(attention(1, 8, 8, 0, 64), Err(GeometryError::Empty { what: "qd" }));
        assert_eq!(attention(1, 8, 8, 64, 0), Err(GeometryError::Empty { what: "vd" }));
        assert_eq!(
            attention(1, 70_000, 70_000, 64, 64),
            Err(GeometryError::GridTooLarge { axis: 'y', value: 70_000, limit: 65_535 })
        );
    }

    #[test]
    fn route_is_one_thread_per_row() {
        assert_eq!(route(1).unwrap(), LaunchDims { grid: (1, 1, 1), block: (64, 1, 1), shared_bytes: 0 });
        assert_eq!(route(64).unwrap().grid.0, 1);
        assert_eq!(route(65).unwrap().grid.0, 2);
        assert_eq!(route(i32::MAX as usize).unwrap().grid.0, (i32::MAX as u32).div_ceil(64));
        assert_eq!(
            route(1 << 31),
            Err(GeometryError::IntOverflow { what: "rows", value: 1 << 31, limit: i32::MAX as u64 })
        );
        assert_eq!(route(0), Err(GeometryError::Empty { what: "rows" }));
    }

    #[test]
    fn errors_name_the_numbers() {
        let msg = |e: GeometryError| e.to_string();
        assert!(msg(attention(1, 6, 4, 64, 64).unwrap_err()).contains("n_heads = 6 is not a multiple of n_kv = 4"));
        assert!(msg(attention(1, 8, 8, 64, 600).unwrap_err()).contains("600"));
        assert!(msg(rope(1, 1, 1000).unwrap_err()).contains("1000"));
        let shared = msg(attention(1, 1, 1, 20_000, 64).unwrap_err());
        assert!(shared.contains(&((20_000 + 128) * 4).to_string()) && shared.contains("49152"), "{shared}");
        let grid = msg(per_row(1 << 32).unwrap_err());
        assert!(grid.contains("4294967296") && grid.contains("2147483647"), "{grid}");
        assert!(msg(per_row(0).unwrap_err()).contains("rows is 0"));
    }

    #[test]
    fn expert_grouping_shapes() {
        assert_eq!(moe_align(8, 64, 9).unwrap(), LaunchDims { grid: (1, 1, 1), block: (ALIGN_BLOCK, 1, 1), shared_bytes: 0 });
        assert_eq!(moe_align(8, 1025, 9), Err(GeometryError::TooManyExperts { n_experts: 1025, max: 1024 }));
        assert!(matches!(moe_align(8, 8, 1 << 28), Err(GeometryError::IntOverflow { what: "grouped rows", .. })));
        assert_eq!(moe_align(0, 8, 0), Err(GeometryError::Empty { what: "choices" }));
        let d = expert_gemm(9, 2 * 1408, 2048).unwrap();
        assert_eq!(d.grid, (9, 44, 1));
        assert_eq!(d.block.0, EXPERT_GEMM_BLOCK);
        assert_eq!(expert_gemm(1, 65, 8).unwrap().grid.1, 2);
        assert_eq!(expert_gemm(0, 8, 8), Err(GeometryError::Empty { what: "tiles" }));
    }

    #[test]
    fn blocks_match_the_kernel_constants() {
        assert_eq!(per_row(1).unwrap().block.0, ROW_BLOCK);
        assert_eq!(grid_stride(1).unwrap().block.0, ROW_BLOCK);
        assert_eq!(rope(1, 1, 1).unwrap().block.0, ROPE_BLOCK);
        assert_eq!(attention(1, 1, 1, 1, 1).unwrap().block.0, ATTENTION_BLOCK);
        assert_eq!(route(1).unwrap().block.0, ROUTE_BLOCK);
    }
}
