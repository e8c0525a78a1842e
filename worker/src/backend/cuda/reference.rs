#![forbid(unsafe_code)]
//! [`Ops`] on the host, in plain Rust with the CPU backend's numerics: the reference a device
//! backend's step is checked against on machines without a GPU.
//!
//! Memory is a map of regions at byte addresses (so the step's address arithmetic is exercised
//! as on the GPU); every kernel reads its inputs, computes as the CPU backend does (the same
//! `kernels`, `Rope` and router functions) and writes its outputs, after checking its launch
//! shape ([`Kernel::geometry`]) as the GPU does. GEMMs round their activations to a 16-bit
//! weight's dtype first, as the GPU's cast does, so a bf16 checkpoint shows here the rounding it
//! meets on the GPU.

use super::dtype::{self, WeightDtype};
use super::kernel_src::expert_grouping::{ERROR_BAD_ID, ERROR_NO_WEIGHTS, EXPERT_TILE_M, WEIGHTS_IN_OTHER_LAUNCH};
use super::ops::{Addr, AttentionArgs, ExpertGemmArgs, Kernel, Mat, Ops, RouteRule, R};
use crate::backend::{Device, DeviceError};
use crate::config::{GroupLimit, GroupScore, RouterConfig, Scoring};
use crate::kernels::{self, Rope};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone)]
enum Region {
    F32(Vec<f32>),
    U16(Vec<u16>, WeightDtype),
    I32(Vec<i32>),
    U32(Vec<u32>),
    U64(Vec<u64>),
}

impl Region {
    fn bytes(&self) -> usize {
        match self {
            Region::F32(v) => v.len() * 4,
            Region::U16(v, _) => v.len() * 2,
            Region::I32(v) => v.len() * 4,
            Region::U32(v) => v.len() * 4,
            Region::U64(v) => v.len() * 8,
        }
    }
}

/// The host reference device.
#[derive(Debug)]
pub struct HostOps {
    capacity: u64,
    used: u64,
    next: Addr,
    regions: BTreeMap<Addr, Region>,
    scratch: HashMap<&'static str, (Addr, usize)>,
    step: Vec<Addr>,
}

impl HostOps {
    /// A device of `capacity` bytes.
    pub fn new(capacity: u64) -> Self {
        HostOps { capacity, used: 0, next: 1 << 20, regions: BTreeMap::new(), scratch: HashMap::new(), step: Vec::new() }
    }

    fn err(&self, msg: String) -> DeviceError {
        DeviceError::Unsupported { device: Device::Cpu, msg: format!("host reference: {msg}") }
    }

    fn put(&mut self, r: Region) -> R<Addr> {
        let b = r.bytes() as u64;
        if self.used + b > self.capacity {
            return Err(self.err(format!("out of memory: {b} bytes asked, {} of {} used", self.used, self.capacity)));
        }
        let a = self.next;
        self.next += b.max(1).div_ceil(256) * 256;
        self.used += b;
        self.regions.insert(a, r);
        Ok(a)
    }

    fn free(&mut self, a: Addr) {
        if let Some(r) = self.regions.remove(&a) {
            self.used -= r.bytes() as u64;
        }
    }

    /// The region holding `a`, and `a`'s element index in it.
    fn find(&self, a: Addr, elem: u64) -> R<(Addr, usize)> {
        let (&base, r) = self.regions.range(..=a).next_back().ok_or_else(|| self.err(format!("address {a:#x} is not allocated")))?;
        let off = a - base;
        if !off.is_multiple_of(elem) || off >= r.bytes().max(1) as u64 {
            return Err(self.err(format!("address {a:#x} is not an element of the buffer at {base:#x}")));
        }
        Ok((base, (off / elem) as usize))
    }

    fn f32s(&self, a: Addr, n: usize) -> R<Vec<f32>> {
        let (base, i) = self.find(a, 4)?;
        match &self.regions[&base] {
            Region::F32(v) if i + n <= v.len() => Ok(v[i..i + n].to_vec()),
            _ => Err(self.err(format!("{n} f32 at {a:#x}: out of bounds or not f32"))),
        }
    }

    fn set_f32s(&mut self, a: Addr, x: &[f32]) -> R<()> {
        let (base, i) = self.find(a, 4)?;
        match self.regions.get_mut(&base) {
            Some(Region::F32(v)) if i + x.len() <= v.len() => {
                v[i..i + x.len()].copy_from_slice(x);
                Ok(())
            }
            _ => Err(self.err(format!("{} f32 to {a:#x}: out of bounds or not f32", x.len()))),
        }
    }

    fn i32s(&self, a: Addr, n: usize) -> R<Vec<i32>> {
        let (base, i) = self.find(a, 4)?;
        match &self.regions[&base] {
            Region::I32(v) if i + n <= v.len() => Ok(v[i..i + n].to_vec()),
            Region::U32(v) if i + n <= v.len() => Ok(v[i..i + n].iter().map(|&u| u as i32).collect()),
            Region::F32(v) if i + n <= v.len() => Ok(v[i..i + n].iter().map(|f| f.to_bits() as i32).collect()),
            _ => Err(self.err(format!("{n} i32 at {a:#x}: out of bounds or not 32-bit"))),
        }
    }

    /// `n` 32-bit words at `a`, whatever the buffer holds (ids are written as bits into f32
    /// buffers, as on the GPU).
    fn words(&self, a: Addr, n: usize) -> R<Vec<u32>> {
        let (base, i) = self.find(a, 4)?;
        match &self.regions[&base] {
            Region::F32(v) if i + n <= v.len() => Ok(v[i..i + n].iter().map(|f| f.to_bits()).collect()),
            Region::I32(v) if i + n <= v.len() => Ok(v[i..i + n].iter().map(|&x| x as u32).collect()),
            Region::U32(v) if i + n <= v.len() => Ok(v[i..i + n].to_vec()),
            _ => Err(self.err(format!("{n} words at {a:#x}: out of bounds or not 32-bit"))),
        }
    }

    fn set_i32s(&mut self, a: Addr, x: &[i32]) -> R<()> {
        let (base, i) = self.find(a, 4)?;
        match self.regions.get_mut(&base) {
            Some(Region::I32(v)) if i + x.len() <= v.len() => {
                v[i..i + x.len()].copy_from_slice(x);
                Ok(())
            }
            // A zeroed step buffer holds integers as bits, as device memory does.
            Some(Region::F32(v)) if i + x.len() <= v.len() => {
                v[i..i + x.len()].iter_mut().zip(x).for_each(|(d, &s)| *d = f32::from_bits(s as u32));
                Ok(())
            }
            _ => Err(self.err(format!("{} i32 to {a:#x}: out of bounds or not 32-bit", x.len()))),
        }
    }

    fn addrs(&self, a: Addr, n: usize) -> R<Vec<Addr>> {
        let (base, i) = self.find(a, 8)?;
        match &self.regions[&base] {
            Region::U64(v) if i + n <= v.len() => Ok(v[i..i + n].to_vec()),
            _ => Err(self.err(format!("{n} addresses at {a:#x}: out of bounds or not an address table"))),
        }
    }

    /// A weight matrix widened to f32.
    fn matrix(&self, w: &Mat) -> R<Vec<f32>> {
        let n = w.n * w.k;
        let (base, i) = self.find(w.addr, w.dtype.bytes() as u64)?;
        match &self.regions[&base] {
            Region::F32(v) if w.dtype == WeightDtype::F32 && i + n <= v.len() => Ok(v[i..i + n].to_vec()),
            Region::U16(v, d) if *d == w.dtype && i + n <= v.len() => Ok(v[i..i + n]
                .iter()
                .map(|&b| if *d == WeightDtype::Bf16 { dtype::bf16_bits_to_f32(b) } else { dtype::f16_bits_to_f32(b) })
                .collect()),
            _ => Err(self.err(format!("matrix at {:#x}: not a {} [{}×{}]", w.addr, w.dtype, w.n, w.k))),
        }
    }
}

/// `x` rounded to `d` and back (what the GPU's cast before a 16-bit GEMM does).
fn round_to(x: &mut [f32], d: WeightDtype) {
    match d {
        WeightDtype::F32 => {}
        WeightDtype::Bf16 => {
            let bits = dtype::to_bf16_bits(x);
            x.iter_mut().zip(bits).for_each(|(v, b)| *v = dtype::bf16_bits_to_f32(b));
        }
        WeightDtype::F16 => {
            let bits = dtype::to_f16_bits(x);
            x.iter_mut().zip(bits).for_each(|(v, b)| *v = dtype::f16_bits_to_f32(b));
        }
    }
}

fn router_config(r: &RouteRule) -> RouterConfig {
    RouterConfig {
        n_experts: r.n_experts,
        top_k: r.top_k,
        scoring: if r.sigmoid { Scoring::Sigmoid } else { Scoring::Softmax },
        norm_topk_prob: r.norm_topk,
        norm_eps: r.norm_eps,
        routed_scaling_factor: r.scaling,
        correction_bias: false,
        group_limit: r.group_limit.map(|(n_group, topk_group, sum2, masked_value)| GroupLimit {
            n_group,
            topk_group,
            score: if sum2 { GroupScore::SumTop2 } else { GroupScore::Max },
            masked_value,
        }),
    }
}

impl Ops for HostOps {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn upload_matrix(&mut self, rows: &[f32], n: usize, k: usize) -> R<Mat> {
        let dtype = dtype::narrowest_exact(rows);
        let addr = match dtype {
            WeightDtype::F32 => self.put(Region::F32(rows.to_vec()))?,
            WeightDtype::Bf16 => self.put(Region::U16(dtype::to_bf16_bits(rows), dtype))?,
            WeightDtype::F16 => self.put(Region::U16(dtype::to_f16_bits(rows), dtype))?,
        };
        Ok(Mat { addr, dtype, n, k })
    }

    fn upload_f32(&mut self, v: &[f32]) -> R<Addr> {
        self.put(Region::F32(v.to_vec()))
    }

    fn alloc_kept(&mut self, n: usize) -> R<Addr> {
        self.put(Region::F32(vec![0.0; n]))
    }

    fn free_kept(&mut self, a: Addr) {
        self.free(a);
    }

    fn free_bytes(&self) -> R<u64> {
        Ok(self.capacity - self.used)
    }

    fn scratch(&mut self, name: &'static str, n: usize) -> R<Addr> {
        if let Some(&(a, cap)) = self.scratch.get(name) {
            if cap >= n {
                return Ok(a);
            }
            self.free(a);
        }
        let cap = super::grown_capacity(0, n);
        let a = self.put(Region::F32(vec![f32::NAN; cap]))?; // NaN: a read before a write shows
        self.scratch.insert(name, (a, cap));
        Ok(a)
    }

    fn step_i32(&mut self, v: &[i32]) -> R<Addr> {
        let a = self.put(Region::I32(v.to_vec()))?;
        self.step.push(a);
        Ok(a)
    }

    fn step_u32(&mut self, v: &[u32]) -> R<Addr> {
        let a = self.put(Region::U32(v.to_vec()))?;
        self.step.push(a);
        Ok(a)
    }

    fn step_f32(&mut self, v: &[f32]) -> R<Addr> {
        let a = self.put(Region::F32(v.to_vec()))?;
        self.step.push(a);
        Ok(a)
    }

    fn step_zeros(&mut self, n: usize) -> R<Addr> {
        self.step_f32(&vec![0.0; n])
    }

    fn write_f32(&mut self, a: Addr, v: &[f32]) -> R<()> {
        self.set_f32s(a, v)
    }

    fn read_f32(&mut self, a: Addr, n: usize) -> R<Vec<f32>> {
        self.f32s(a, n)
    }

    fn read_u32(&mut self, a: Addr, n: usize) -> R<Vec<u32>> {
        self.words(a, n)
    }

    fn step_addrs(&mut self, v: &[Addr]) -> R<Addr> {
        let a = self.put(Region::U64(v.to_vec()))?;
        self.step.push(a);
        Ok(a)
    }

    fn end_step(&mut self) {
        for a in std::mem::take(&mut self.step) {
            self.free(a);
        }
    }

    fn launch(&mut self, k: &Kernel) -> R<()> {
        k.geometry().map_err(|e| self.err(e.to_string()))?;
        match k {
            Kernel::EmbedRows { table, ids, out, rows } => {
                let t = self.matrix(table)?;
                let ids = self.i32s(*ids, *rows)?;
                let mut y = Vec::with_capacity(rows * table.k);
                for &i in &ids {
                    let i = i as usize;
                    if i >= table.n {
                        return Err(self.err(format!("embedding row {i} of {}", table.n)));
                    }
                    y.extend_from_slice(&t[i * table.k..(i + 1) * table.k]);
                }
                self.set_f32s(*out, &y)
            }
            Kernel::Cast { .. } => Err(self.err("casts happen inside the reference GEMM".into())),
            Kernel::Rmsnorm { x, w, y, rows, n, eps } => {
                let mut v = self.f32s(*x, rows * n)?;
                kernels::rmsnorm_inplace(&mut v, &self.f32s(*w, *n)?, *eps);
                self.set_f32s(*y, &v)
            }
            Kernel::AddInplace { x, y, n } => {
                let mut v = self.f32s(*x, *n)?;
                v.iter_mut().zip(self.f32s(*y, *n)?).for_each(|(a, b)| *a += b);
                self.set_f32s(*x, &v)
            }
            Kernel::AddBias { x, b, rows, n } => {
                let mut v = self.f32s(*x, rows * n)?;
                let b = self.f32s(*b, *n)?;
                v.chunks_mut(*n).for_each(|r| r.iter_mut().zip(&b).for_each(|(a, b)| *a += b));
                self.set_f32s(*x, &v)
            }
            Kernel::Clamp { x, n, c } => {
                let v: Vec<f32> = self.f32s(*x, *n)?.into_iter().map(|v| v.clamp(-c, *c)).collect();
                self.set_f32s(*x, &v)
            }
            Kernel::Rope { x, pos, inv_freq, rows, n_heads, head_stride, offset, half, factor, interleaved } => {
                let rope = Rope { inv_freq: self.f32s(*inv_freq, *half)?, attention_factor: *factor, interleaved: *interleaved };
                let pos = self.i32s(*pos, *rows)?;
                let mut v = self.f32s(*x, rows * n_heads * head_stride)?;
                for (r, p) in pos.iter().enumerate() {
                    let (c, s) = rope.cos_sin(*p as usize);
                    for h in 0..*n_heads {
                        let at = (r * n_heads + h) * head_stride + offset;
                        rope.apply(&mut v[at..at + 2 * half], &c, &s);
                    }
                }
                self.set_f32s(*x, &v)
            }
            Kernel::SiluMul { gate_up, out, rows, inter } => {
                let v = kernels::silu_mul_fused(&self.f32s(*gate_up, rows * 2 * inter)?, *rows, *inter);
                self.set_f32s(*out, &v)
            }
            Kernel::KvWrite { src, pool, slots, rows, row_len } => {
                let v = self.f32s(*src, rows * row_len)?;
                for (r, s) in self.i32s(*slots, *rows)?.into_iter().enumerate() {
                    self.set_f32s(pool + 4 * (s as u64) * *row_len as u64, &v[r * row_len..(r + 1) * row_len])?;
                }
                Ok(())
            }
            Kernel::Attention(a) => self.attention(a),
            Kernel::RouteTopk { logits, bias, scratch: _, ids, weights, rows, rule } => {
                let (e, k) = (rule.n_experts, rule.top_k);
                let mut scores = self.f32s(*logits, rows * e)?;
                let bias = bias.map(|b| self.f32s(b, e)).transpose()?;
                let cfg = router_config(rule);
                let (mut id, mut w) = (vec![0u32; rows * k], vec![0f32; rows * k]);
                for r in 0..*rows {
                    crate::moe::route_scores(&cfg, bias.as_deref(), &mut scores[r * e..(r + 1) * e], &mut id[r * k..(r + 1) * k], &mut w[r * k..(r + 1) * k]);
                }
                self.set_f32s(*ids, &id.iter().map(|&i| f32::from_bits(i)).collect::<Vec<_>>())?;
                self.set_f32s(*weights, &w)
            }
            Kernel::GatherRows { x, idx, out, rows, hidden } => {
                let mut y = Vec::with_capacity(rows * hidden);
                for i in self.i32s(*idx, *rows)? {
                    y.extend(self.f32s(x + 4 * (i as u64) * *hidden as u64, *hidden)?);
                }
                self.set_f32s(*out, &y)
            }
            Kernel::CombineRows { y, src_row, w, out, tokens, k, hidden } => {
                let (rows, ws) = (self.i32s(*src_row, tokens * k)?, self.f32s(*w, tokens * k)?);
                let mut o = vec![0f32; tokens * hidden];
                for t in 0..*tokens {
                    for j in 0..*k {
                        let r = rows[t * k + j];
                        if r >= 0 {
                            let yr = self.f32s(y + 4 * (r as u64) * *hidden as u64, *hidden)?;
                            kernels::axpy(ws[t * k + j], &yr, &mut o[t * hidden..(t + 1) * hidden]);
                        }
                    }
                }
                self.set_f32s(*out, &o)
            }
            Kernel::SharedGate { x, g, y, rows, hidden } => {
                let (xv, g, mut yv) = (self.f32s(*x, rows * hidden)?, self.f32s(*g, *hidden)?, self.f32s(*y, rows * hidden)?);
                for (yr, xr) in yv.chunks_mut(*hidden).zip(xv.chunks(*hidden)) {
                    let s = kernels::sigmoid(kernels::dot(xr, &g));
                    yr.iter_mut().for_each(|v| *v *= s);
                }
                self.set_f32s(*y, &yv)
            }
            Kernel::SplitCols { src, a, b, rows, a_cols, b_cols } => {
                let v = self.f32s(*src, rows * (a_cols + b_cols))?;
                let (mut av, mut bv) = (Vec::new(), Vec::new());
                for r in v.chunks(a_cols + b_cols) {
                    av.extend_from_slice(&r[..*a_cols]);
                    bv.extend_from_slice(&r[*a_cols..]);
                }
                self.set_f32s(*a, &av)?;
                self.set_f32s(*b, &bv)
            }
            Kernel::MlaAssemble { kv, k_pe, k, v, rows, n_heads, nope, rope_dim, vd } => {
                let (kvv, pe) = (self.f32s(*kv, rows * n_heads * (nope + vd))?, self.f32s(*k_pe, rows * rope_dim)?);
                let (mut kk, mut vv) = (Vec::new(), Vec::new());
                for r in 0..*rows {
                    for h in 0..*n_heads {
                        let src = &kvv[(r * n_heads + h) * (nope + vd)..(r * n_heads + h + 1) * (nope + vd)];
                        kk.extend_from_slice(&src[..*nope]);
                        kk.extend_from_slice(&pe[r * rope_dim..(r + 1) * rope_dim]);
                        vv.extend_from_slice(&src[*nope..]);
                    }
                }
                self.set_f32s(*k, &kk)?;
                self.set_f32s(*v, &vv)
            }
            Kernel::MoeAlign { ids, choices, n_experts, max_tiles, sorted, tile_expert, src_row, error } => {
                let ids = self.words(*ids, *choices)?;
                let g = group_by_expert(&ids, *n_experts, *max_tiles);
                self.set_i32s(*sorted, &g.sorted)?;
                self.set_i32s(*tile_expert, &g.tile_expert)?;
                self.set_i32s(*src_row, &g.src_row)?;
                if g.bad_id {
                    self.set_i32s(*error, &[ERROR_BAD_ID])?;
                }
                Ok(())
            }
            Kernel::ExpertGemm(g) => self.expert_gemm(g),
        }
    }

    fn gemm(&mut self, x: Addr, w: &Mat, out: Addr, m: usize) -> R<()> {
        if m == 0 {
            return Ok(());
        }
        let mut xv = self.f32s(x, m * w.k)?;
        round_to(&mut xv, w.dtype);
        let wv = self.matrix(w)?;
        let mut y = vec![0f32; m * w.n];
        kernels::matmul_bt(&xv, m, w.k, &wv, w.n, &mut y);
        self.set_f32s(out, &y)
    }
}

/// `moe_align`'s outputs, computed on the host: choices of each expert in ascending order (the
/// kernel's atomic order is any order; no value depends on it).
struct Grouping {
    sorted: Vec<i32>,
    tile_expert: Vec<i32>,
    src_row: Vec<i32>,
    bad_id: bool,
}

fn group_by_expert(ids: &[u32], n_experts: usize, max_tiles: usize) -> Grouping {
    let mut count = vec![0usize; n_experts];
    let bad_id = ids.iter().any(|&e| e as usize >= n_experts);
    for &e in ids.iter().filter(|&&e| (e as usize) < n_experts) {
        count[e as usize] += 1;
    }
    let (mut sorted, mut tile_expert) = (vec![-1i32; max_tiles * EXPERT_TILE_M], vec![-1i32; max_tiles]);
    let mut start = Vec::with_capacity(n_experts);
    let mut at = 0;
    for (e, &c) in count.iter().enumerate() {
        start.push(at);
        for t in at / EXPERT_TILE_M..(at + c).div_ceil(EXPERT_TILE_M) {
            if let Some(te) = tile_expert.get_mut(t) {
                *te = e as i32;
            }
        }
        at += c.div_ceil(EXPERT_TILE_M) * EXPERT_TILE_M;
    }
    let mut src_row = vec![-1i32; ids.len()];
    for (i, &e) in ids.iter().enumerate() {
        if let Some(p) = start.get_mut(e as usize) {
            if let Some(slot) = sorted.get_mut(*p) {
                *slot = i as i32;
                src_row[i] = *p as i32;
            }
            *p += 1;
        }
    }
    Grouping { sorted, tile_expert, src_row, bad_id }
}

impl HostOps {
    /// `expert_gemm_*`: every used tile's rows through its expert's weights.
    fn expert_gemm(&mut self, g: &ExpertGemmArgs) -> R<()> {
        let rows = g.tiles * EXPERT_TILE_M;
        let sorted = self.i32s(g.sorted, rows)?;
        let tile_expert = self.i32s(g.tile_expert, g.tiles)?;
        let mut out = self.f32s(g.out, rows * g.n)?;
        for (tile, &e) in tile_expert.iter().enumerate() {
            if e < 0 {
                continue;
            }
            let addr = self.addrs(g.weights + 8 * e as u64, 1)?[0];
            if addr == 0 {
                return self.set_i32s(g.error, &[ERROR_NO_WEIGHTS]);
            }
            if addr == WEIGHTS_IN_OTHER_LAUNCH {
                continue;
            }
            let w = self.matrix(&Mat { addr, dtype: g.dtype, n: g.n, k: g.k })?;
            for p in tile * EXPERT_TILE_M..(tile + 1) * EXPERT_TILE_M {
                let y = &mut out[p * g.n..(p + 1) * g.n];
                if sorted[p] < 0 {
                    y.fill(0.0);
                    continue;
                }
                let row = (sorted[p] as usize).checked_div(g.row_div).unwrap_or(p);
                let mut xr = self.f32s(g.x + 4 * (row * g.k) as u64, g.k)?;
                round_to(&mut xr, g.dtype);
                kernels::matmul_bt(&xr, 1, g.k, &w, g.n, y);
            }
        }
        self.set_f32s(g.out, &out)
    }

    fn attention(&mut self, a: &AttentionArgs) -> R<()> {
        let (t, nh, nkv, qd, vd) = (a.rows, a.n_heads, a.n_kv, a.qd, a.vd);
        let q = self.f32s(a.q, t * nh * qd)?;
        let seq = self.i32s(a.seq_of_row, t)?;
        let pos = self.i32s(a.pos, t)?;
        let n_seqs = seq.iter().copied().max().map_or(0, |m| m as usize + 1);
        let start = self.i32s(a.table_start, n_seqs)?;
        let group = nh / nkv.max(1);
        let mut out = vec![0f32; t * nh * vd];
        for r in 0..t {
            let p = pos[r] as usize;
            let first = if a.window > 0 { (p + 1).saturating_sub(a.window) } else { 0 };
            let slots: Vec<u64> = (first..=p)
                .map(|j| -> R<u64> {
                    let page = self.i32s(a.table + 4 * (start[seq[r] as usize] as u64 + (j / a.page_size) as u64), 1)?[0];
                    Ok((page as usize * a.page_size + j % a.page_size) as u64)
                })
                .collect::<R<_>>()?;
            for h in 0..nh {
                let kvh = h / group;
                let qh = &q[(r * nh + h) * qd..(r * nh + h + 1) * qd];
                let mut scores = Vec::with_capacity(slots.len());
                for &s in &slots {
                    let kj = self.f32s(a.k_pool + 4 * (s * (nkv * qd) as u64 + (kvh * qd) as u64), qd)?;
                    scores.push(kernels::dot(qh, &kj) * a.scale);
                }
                kernels::softmax_inplace(&mut scores);
                let oh = &mut out[(r * nh + h) * vd..(r * nh + h + 1) * vd];
                for (&s, &pj) in slots.iter().zip(&scores) {
                    let vj = self.f32s(a.v_pool + 4 * (s * (nkv * vd) as u64 + (kvh * vd) as u64), vd)?;
                    kernels::axpy(pj, &vj, oh);
                }
            }
        }
        self.set_f32s(a.out, &out)
    }
}
