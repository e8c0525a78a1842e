#![forbid(unsafe_code)]
//! A device backend's forward step, written once against [`Ops`]: weights uploaded from the host
//! model, the batch layout over paged KV, embedding, decoder layers (GQA or MLA attention; dense
//! or MoE FFN), head.
//!
//! Per step the device keeps the residual stream, attention inputs, KV and routing between
//! layers; the host waits for the device once, for the logits, and then reads the step's routing
//! (for load statistics) in one go. MoE layers are in [`super::moe_layer`]: a rank of a larger
//! expert-parallel group brings each layer's choices to the host, where they size its
//! all-to-all.

use super::moe_layer::{self, plan_err, RoutingSink};
use super::ops::{Addr, AttentionArgs, Kernel, Mat, Ops, R};
use super::paged_kv::PagedKv;
use crate::attention::{Attention, KvCache, MlaQuery, SeqSpan};
use crate::backend::{Backend, Device, DeviceError};
use crate::config::QkNorm;
use crate::error::Result;
use crate::kernels::Linear;
use crate::model::{Ffn, ForwardOutput, LogitsMode, Model, SeqInput};
use crate::moe::{ExpertExecutor, ExpertFfn, MoeLayer, Routing};
use std::sync::{Arc, Mutex};

/// Tokens per KV page.
pub const PAGE_SIZE: usize = 16;
/// Share of the device memory left after the weights that the KV cache takes, by default.
pub const KV_MEMORY_SHARE: f64 = 0.80;

struct Lin {
    w: Mat,
    bias: Option<Addr>,
}

#[derive(Clone, Copy)]
pub(super) struct DevFfn {
    pub(super) gate_up: Mat,
    pub(super) down: Mat,
    pub(super) inter: usize,
}

// One per layer, built once: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum DevAttn {
    Standard { q: Lin, k: Lin, v: Lin, o: Lin, norms: Option<(Addr, usize, Addr, usize)>, n_heads: usize, n_kv: usize, head_dim: usize, clip: Option<f32> },
    Mla { q: MlaQ, kv_a: Lin, kv_a_norm: Addr, kv_b: Lin, o: Lin, n_heads: usize, lora: usize, nope: usize, rope_dim: usize, v_dim: usize },
}

enum MlaQ {
    Direct(Lin),
    LowRank { a: Lin, norm: Addr, b: Lin },
}

pub(super) struct DevMoe {
    pub(super) router: Mat,
    pub(super) bias: Option<Addr>,
    /// Every routed expert, when the host model holds them all (one process runs the layer).
    pub(super) experts: Option<Vec<DevFfn>>,
    pub(super) shared: Option<(DevFfn, Option<Addr>)>,
}

enum DevFfnKind {
    Dense(DevFfn),
    Moe(DevMoe),
}

struct DevLayer {
    input_norm: Addr,
    post_norm: Addr,
    attn: DevAttn,
    ffn: DevFfnKind,
}

struct Weights {
    embed: Mat,
    lm_head: Option<Mat>,
    norm: Addr,
    inv_freq: Addr,
    layers: Vec<DevLayer>,
}

fn lin(o: &mut dyn Ops, l: &Linear) -> R<Lin> {
    let bias = l.bias.as_ref().map(|b| o.upload_f32(b)).transpose()?;
    Ok(Lin { w: o.upload_matrix(&l.weight.to_rows(), l.out_dim, l.in_dim)?, bias })
}

pub(super) fn ffn(o: &mut dyn Ops, f: &ExpertFfn) -> R<DevFfn> {
    Ok(DevFfn { gate_up: o.upload_matrix(&f.gate_up.to_rows(), 2 * f.inter, f.hidden)?, down: o.upload_matrix(&f.down.to_rows(), f.hidden, f.inter)?, inter: f.inter })
}

/// Every weight of `model` on the device (routed experts only where the model holds them all).
fn upload(o: &mut dyn Ops, model: &Model) -> R<Weights> {
    let c = &model.config;
    let embed = o.upload_matrix(&model.embed.to_rows(), c.vocab_size, c.hidden_size)?;
    let lm_head = model.lm_head.as_ref().map(|w| o.upload_matrix(&w.to_rows(), c.vocab_size, c.hidden_size)).transpose()?;
    let mut layers = Vec::with_capacity(model.layers.len());
    for l in &model.layers {
        let attn = match &l.attn {
            Attention::Standard { q, k, v, o: out, qk_norm, q_norm, k_norm, n_heads, n_kv_heads, head_dim, clip_qkv } => {
                let norms = match (qk_norm, q_norm, k_norm) {
                    (QkNorm::None, ..) => None,
                    (_, Some(qn), Some(kn)) => Some((o.upload_f32(qn)?, qn.len(), o.upload_f32(kn)?, kn.len())),
                    _ => None,
                };
                DevAttn::Standard { q: lin(o, q)?, k: lin(o, k)?, v: lin(o, v)?, o: lin(o, out)?, norms, n_heads: *n_heads, n_kv: *n_kv_heads, head_dim: *head_dim, clip: *clip_qkv }
            }
            Attention::Mla { q, kv_a, kv_a_norm, kv_b, o: out, n_heads, kv_lora_rank, nope, rope_dim, v_dim } => DevAttn::Mla {
                q: match q {
                    MlaQuery::Direct(l) => MlaQ::Direct(lin(o, l)?),
                    MlaQuery::LowRank { a, norm, b } => MlaQ::LowRank { a: lin(o, a)?, norm: o.upload_f32(norm)?, b: lin(o, b)? },
                },
                kv_a: lin(o, kv_a)?,
                kv_a_norm: o.upload_f32(kv_a_norm)?,
                kv_b: lin(o, kv_b)?,
                o: lin(o, out)?,
                n_heads: *n_heads,
                lora: *kv_lora_rank,
                nope: *nope,
                rope_dim: *rope_dim,
                v_dim: *v_dim,
            },
        };
        let ffn_kind = match &l.ffn {
            Ffn::Dense(f) => DevFfnKind::Dense(ffn(o, f)?),
            Ffn::Moe(m) => DevFfnKind::Moe(upload_moe(o, m)?),
        };
        layers.push(DevLayer { input_norm: o.upload_f32(&l.input_norm)?, post_norm: o.upload_f32(&l.post_norm)?, attn, ffn: ffn_kind });
    }
    Ok(Weights { embed, lm_head, norm: o.upload_f32(&model.norm)?, inv_freq: o.upload_f32(&model.rope.inv_freq)?, layers })
}

fn upload_moe(o: &mut dyn Ops, m: &MoeLayer) -> R<DevMoe> {
    let r = &m.router;
    let experts = if m.experts.iter().all(Option::is_some) { Some(m.experts.iter().flatten().map(|f| ffn(o, f)).collect::<R<Vec<_>>>()?) } else { None };
    let shared = match &m.shared {
        Some(s) => Some((ffn(o, &s.ffn)?, s.gate.as_ref().map(|g| o.upload_f32(g)).transpose()?)),
        None => None,
    };
    Ok(DevMoe { router: o.upload_matrix(&r.weight, r.cfg.n_experts, r.hidden)?, bias: r.correction_bias.as_ref().map(|b| o.upload_f32(b)).transpose()?, experts, shared })
}

/// A model on a device: weights uploaded once, KV in device pages.
pub struct DeviceBackend<O: Ops> {
    device: Device,
    model: Arc<Model>,
    peak_bandwidth_gbs: Option<f64>,
    state: Mutex<State<O>>,
}

struct State<O> {
    ops: O,
    weights: Weights,
    kv: PagedKv,
    /// Per layer: `[slots × kv_heads × key dim]` and `[slots × kv_heads × value dim]`, f32.
    k_pool: Vec<Addr>,
    v_pool: Vec<Addr>,
    /// Per MoE layer and expert: the placement-slot weights an executor handed over (a rank's
    /// slots, in a group of one or more) and their device copy; the `Arc` keeps the host weights
    /// alive so that identity tells whether an epoch changed them.
    slot_experts: Vec<Vec<SlotExpert>>,
}

/// One placement slot's weights on the device, with the host weights they were made from.
pub(super) type SlotExpert = Option<(Arc<ExpertFfn>, DevFfn)>;

impl<O: Ops> std::fmt::Debug for DeviceBackend<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBackend").field("device", &self.device).finish()
    }
}

impl<O: Ops> DeviceBackend<O> {
    /// Upload `model` through `ops` and give `opts.kv_memory_share` ([`KV_MEMORY_SHARE`] by
    /// default) of the memory left (less `opts.reserve_bytes`, at most `opts.max_kv_tokens`
    /// tokens) to KV pages.
    pub fn new(mut ops: O, model: Arc<Model>, opts: &crate::backend::OpenOptions) -> Result<Self> {
        let device = ops.device();
        let weights = upload(&mut ops, &model)?;
        let (kvh, kd, vd) = model.config.attn.kv_layout();
        let (k_row, v_row) = (kvh * kd, kvh * vd);
        let n_layers = model.config.n_layers;
        let per_slot = (n_layers * (k_row + v_row) * 4) as u64;
        let share = opts.kv_memory_share.unwrap_or(KV_MEMORY_SHARE);
        if !(share > 0.0 && share <= 1.0) {
            return Err(DeviceError::Unsupported { device, msg: format!("KV memory share {share} is not in (0, 1]") }.into());
        }
        let budget = (ops.free_bytes()?.saturating_sub(opts.reserve_bytes) as f64 * share) as u64;
        let mut pages = PagedKv::pages_for_budget(budget, PAGE_SIZE, per_slot).min(i32::MAX as usize / PAGE_SIZE);
        if let Some(t) = opts.max_kv_tokens {
            pages = pages.min(t.div_ceil(PAGE_SIZE));
        }
        let kv = PagedKv::new(PAGE_SIZE, pages).map_err(|e| DeviceError::KvFull { device, msg: format!("no room for a KV page after the weights: {e}") })?;
        let slots = kv.slots();
        let mut k_pool = Vec::with_capacity(n_layers);
        let mut v_pool = Vec::with_capacity(n_layers);
        for _ in 0..n_layers {
            k_pool.push(ops.alloc_kept(slots * k_row)?);
            v_pool.push(ops.alloc_kept(slots * v_row)?);
        }
        tracing::info!(%device, kv_pages = pages, kv_tokens = slots, "device backend ready");
        let slot_experts = vec![Vec::new(); model.moe_layers().count()];
        Ok(DeviceBackend { device, peak_bandwidth_gbs: ops.peak_bandwidth_gbs(), model, state: Mutex::new(State { ops, weights, kv, k_pool, v_pool, slot_experts }) })
    }

    /// Run `f` as one step on the device: the state locked, the step's buffers freed after.
    fn with_step<T>(&self, f: impl FnOnce(&mut State<O>) -> Result<T>) -> Result<T> {
        let mut st = self.state.lock().map_err(|_| DeviceError::Unsupported { device: self.device, msg: "an earlier step panicked".into() })?;
        st.ops.begin_step()?;
        let r = f(&mut st);
        st.ops.end_step();
        r
    }

    /// KV pages free now (all of them when no sequence holds any).
    pub fn free_kv_pages(&self) -> usize {
        self.state.lock().map_or(0, |s| s.kv.free_pages())
    }
}

impl<O: Ops> Backend for DeviceBackend<O> {
    fn device(&self) -> Device {
        self.device
    }

    fn host_model(&self) -> &Model {
        &self.model
    }

    /// The host side of a device-resident cache: its id and length (the keys and values live in
    /// device pages; the host layers stay empty).
    fn new_cache(&self) -> KvCache {
        let (kvh, kd, vd) = self.model.config.attn.kv_layout();
        KvCache::new(0, kvh, kd, vd)
    }

    fn forward_step(&self, seqs: &mut [SeqInput], mode: LogitsMode, exec: &dyn ExpertExecutor) -> Result<ForwardOutput> {
        if exec.runs_whole_forward(&self.model) {
            return Err(DeviceError::Unsupported { device: self.device, msg: "the affinity data path runs on CPU workers only (use --data-path home)".into() }.into());
        }
        self.with_step(|st| forward(&self.model, st, seqs, mode, exec))
    }

    fn release_sequence(&self, cache: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.kv.release(cache);
        }
    }

    fn peak_memory_bandwidth_gbs(&self) -> Option<f64> {
        self.peak_bandwidth_gbs
    }

    /// A group's rank on the device protocol joins each MoE layer's collectives with no rows;
    /// otherwise the executor's own idle step (the host protocol).
    fn idle_forward(&self, exec: &crate::expert_parallel::EpExecutor) -> Result<()> {
        let Some(dd) = exec.device_dispatch() else { return exec.idle_forward(&self.model) };
        let h = self.model.config.hidden_size;
        self.with_step(|st| {
            let State { ops, slot_experts, .. } = st;
            let (xn, out) = (ops.scratch("xn", 0)?, ops.scratch("moe_out", 0)?);
            let empty = Routing::empty(self.model.config.router.top_k);
            for layer in self.model.moe_layers() {
                let held = slot_experts.get_mut(layer.moe_index).ok_or_else(|| plan_err(self.device, format!("MoE layer {} has no slot table", layer.moe_index)))?;
                moe_layer::ep_layer(ops, layer, dd, held, xn, &empty, out, h)?;
            }
            Ok(())
        })
    }
}

/// The batch layout of one step on the device.
struct Layout {
    t: usize,
    /// Absolute position of each row.
    pos: Addr,
    /// KV slot of each new row.
    slots: Addr,
    seq_of_row: Addr,
    table: Addr,
    table_start: Addr,
}

fn kv_full(device: Device, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::KvFull { device, msg: e.to_string() }
}

fn layout<O: Ops>(st: &mut State<O>, ids: &[u64], spans: &[SeqSpan]) -> R<Layout> {
    let device = st.ops.device();
    let (mut pos, mut slots, mut seq_of_row) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (id, sp)) in ids.iter().zip(spans).enumerate() {
        st.kv.reserve(*id, sp.start + sp.n).map_err(|e| kv_full(device, e))?;
        slots.extend(st.kv.slots_of(*id, sp.start, sp.n).map_err(|e| kv_full(device, e))?);
        for j in 0..sp.n {
            pos.push(i32::try_from(sp.start + j).map_err(|_| kv_full(device, "position beyond i32"))?);
            seq_of_row.push(i as i32);
        }
    }
    let tables = st.kv.batch_tables(ids).map_err(|e| kv_full(device, e))?;
    let o = &mut st.ops;
    Ok(Layout { t: pos.len(), pos: o.step_i32(&pos)?, slots: o.step_i32(&slots)?, seq_of_row: o.step_i32(&seq_of_row)?, table: o.step_i32(&tables.table)?, table_start: o.step_i32(&tables.start)? })
}

fn forward<O: Ops>(model: &Model, st: &mut State<O>, seqs: &mut [SeqInput], mode: LogitsMode, exec: &dyn ExpertExecutor) -> Result<ForwardOutput> {
    let c = &model.config;
    let h = c.hidden_size;
    let mut spans = Vec::with_capacity(seqs.len());
    let mut tokens: Vec<u32> = Vec::new();
    for s in seqs.iter() {
        model.validate(s.tokens, s.cache.len())?;
        spans.push(SeqSpan { offset: tokens.len(), n: s.tokens.len(), start: s.cache.len() });
        tokens.extend_from_slice(s.tokens);
    }
    let ids: Vec<u64> = seqs.iter().map(|s| s.cache.id()).collect();
    let lay = layout(st, &ids, &spans)?;
    let t = lay.t;
    let State { ops, weights, k_pool, v_pool, slot_experts, .. } = st;
    let o: &mut dyn Ops = ops;
    let x = o.scratch("x", t * h)?;
    let tok = o.step_u32(&tokens)?;
    o.launch(&Kernel::EmbedRows { table: weights.embed, ids: tok, out: x, rows: t })?;
    let mut routing = Vec::new();
    let mut sink = RoutingSink::new(model.moe_layers().count(), t, c.router.top_k);
    for (li, (layer, dl)) in model.layers.iter().zip(&weights.layers).enumerate() {
        let xn = o.scratch("xn", t * h)?;
        o.launch(&Kernel::Rmsnorm { x, w: dl.input_norm, y: xn, rows: t, n: h, eps: c.rms_norm_eps })?;
        let a = attention(o, model, weights, li, dl, xn, &lay, (k_pool[li], v_pool[li]))?;
        o.launch(&Kernel::AddInplace { x, y: a, n: t * h })?;
        o.launch(&Kernel::Rmsnorm { x, w: dl.post_norm, y: xn, rows: t, n: h, eps: c.rms_norm_eps })?;
        let f = match (&layer.ffn, &dl.ffn) {
            (Ffn::Dense(_), DevFfnKind::Dense(f)) => dense_ffn(o, f, xn, t, h)?,
            (Ffn::Moe(host), DevFfnKind::Moe(m)) => {
                let (y, r) = moe_layer::moe(o, host, m, slot_experts, &mut sink, xn, t, h, exec)?;
                routing.push(r);
                y
            }
            _ => return Err(DeviceError::Unsupported { device: o.device(), msg: format!("layer {li}: device and host FFN kinds differ") }.into()),
        };
        o.launch(&Kernel::AddInplace { x, y: f, n: t * h })?;
    }
    let logits = head(o, model, weights, x, &spans, mode)?;
    let routing = sink.finish(o, routing)?;
    for (sp, s) in spans.iter().zip(seqs.iter_mut()) {
        s.cache.set_len(sp.start + sp.n);
    }
    Ok(ForwardOutput { logits, routing })
}

fn linear(o: &mut dyn Ops, x: Addr, l: &Lin, out: Addr, m: usize) -> R<()> {
    o.gemm(x, &l.w, out, m)?;
    if let Some(b) = l.bias {
        o.launch(&Kernel::AddBias { x: out, b, rows: m, n: l.w.n })?;
    }
    Ok(())
}

/// Query, keys and values of one layer, the new keys and values written to the pages, attention
/// over them, the output projection. Returns `[t × hidden]`.
#[allow(clippy::too_many_arguments)]
fn attention(o: &mut dyn Ops, model: &Model, w: &Weights, li: usize, dl: &DevLayer, xn: Addr, lay: &Layout, pools: (Addr, Addr)) -> R<Addr> {
    let c = &model.config;
    let (t, eps) = (lay.t, c.rms_norm_eps);
    let rope = &model.rope;
    let rope_at = |x: Addr, n_heads: usize, head_stride: usize, offset: usize| Kernel::Rope {
        x,
        pos: lay.pos,
        inv_freq: w.inv_freq,
        rows: t,
        n_heads,
        head_stride,
        offset,
        half: rope.inv_freq.len(),
        factor: rope.attention_factor,
        interleaved: rope.interleaved,
    };
    let (n_heads, n_kv, qd, vd, q, k, v, out_proj) = match &dl.attn {
        DevAttn::Standard { q: ql, k: kl, v: vl, o: ol, norms, n_heads, n_kv, head_dim, clip } => {
            let hd = *head_dim;
            let (q, k, v) = (o.scratch("q", t * n_heads * hd)?, o.scratch("k", t * n_kv * hd)?, o.scratch("v", t * n_kv * hd)?);
            linear(o, xn, ql, q, t)?;
            linear(o, xn, kl, k, t)?;
            linear(o, xn, vl, v, t)?;
            if let Some((qn, qlen, kn, klen)) = *norms {
                // Per head (Qwen3) or over the whole projection (OLMoE): rows of the norm's length.
                o.launch(&Kernel::Rmsnorm { x: q, w: qn, y: q, rows: t * n_heads * hd / qlen, n: qlen, eps })?;
                o.launch(&Kernel::Rmsnorm { x: k, w: kn, y: k, rows: t * n_kv * hd / klen, n: klen, eps })?;
            }
            if let Some(cl) = *clip {
                o.launch(&Kernel::Clamp { x: q, n: t * n_heads * hd, c: cl })?;
                o.launch(&Kernel::Clamp { x: k, n: t * n_kv * hd, c: cl })?;
                o.launch(&Kernel::Clamp { x: v, n: t * n_kv * hd, c: cl })?;
            }
            o.launch(&rope_at(q, *n_heads, hd, 0))?;
            o.launch(&rope_at(k, *n_kv, hd, 0))?;
            (*n_heads, *n_kv, hd, hd, q, k, v, ol)
        }
        DevAttn::Mla { q: qp, kv_a, kv_a_norm, kv_b, o: ol, n_heads, lora, nope, rope_dim, v_dim } => {
            let (nh, qk, r) = (*n_heads, nope + rope_dim, *rope_dim);
            let q = o.scratch("q", t * nh * qk)?;
            match qp {
                MlaQ::Direct(l) => linear(o, xn, l, q, t)?,
                MlaQ::LowRank { a, norm, b } => {
                    let qa = o.scratch("q_a", t * a.w.n)?;
                    linear(o, xn, a, qa, t)?;
                    o.launch(&Kernel::Rmsnorm { x: qa, w: *norm, y: qa, rows: t, n: a.w.n, eps })?;
                    linear(o, qa, b, q, t)?;
                }
            }
            // Rows of kv_a: [latent (lora) | k_pe (rope_dim)].
            let ckv = o.scratch("ckv", t * (lora + r))?;
            linear(o, xn, kv_a, ckv, t)?;
            let (latent, k_pe) = (o.scratch("latent", t * lora)?, o.scratch("k_pe", t * r)?);
            o.launch(&Kernel::SplitCols { src: ckv, a: latent, b: k_pe, rows: t, a_cols: *lora, b_cols: r })?;
            o.launch(&Kernel::Rmsnorm { x: latent, w: *kv_a_norm, y: latent, rows: t, n: *lora, eps })?;
            let kv = o.scratch("kv", t * nh * (nope + v_dim))?;
            linear(o, latent, kv_b, kv, t)?;
            o.launch(&rope_at(k_pe, 1, r, 0))?;
            let (k, v) = (o.scratch("k", t * nh * qk)?, o.scratch("v", t * nh * v_dim)?);
            o.launch(&Kernel::MlaAssemble { kv, k_pe, k, v, rows: t, n_heads: nh, nope: *nope, rope_dim: r, vd: *v_dim })?;
            o.launch(&rope_at(q, nh, qk, *nope))?;
            (nh, nh, qk, *v_dim, q, k, v, ol)
        }
    };
    let (k_pool, v_pool) = pools;
    o.launch(&Kernel::KvWrite { src: k, pool: k_pool, slots: lay.slots, rows: t, row_len: n_kv * qd })?;
    o.launch(&Kernel::KvWrite { src: v, pool: v_pool, slots: lay.slots, rows: t, row_len: n_kv * vd })?;
    let heads = o.scratch("attn_heads", t * n_heads * vd)?;
    o.launch(&Kernel::Attention(AttentionArgs {
        q,
        k_pool,
        v_pool,
        table: lay.table,
        table_start: lay.table_start,
        seq_of_row: lay.seq_of_row,
        pos: lay.pos,
        out: heads,
        rows: t,
        n_heads,
        n_kv,
        qd,
        vd,
        page_size: PAGE_SIZE,
        scale: model.attn_scale,
        window: c.sliding_windows[li].unwrap_or(0),
    }))?;
    let out = o.scratch("attn_out", t * c.hidden_size)?;
    linear(o, heads, out_proj, out, t)?;
    Ok(out)
}

/// A SwiGLU block: `down(silu(gate(x)) · up(x))`.
pub(super) fn dense_ffn(o: &mut dyn Ops, f: &DevFfn, xn: Addr, t: usize, h: usize) -> R<Addr> {
    let (gu, mid, out) = (o.scratch("ffn_gate_up", t * 2 * f.inter)?, o.scratch("ffn_mid", t * f.inter)?, o.scratch("ffn_out", t * h)?);
    o.gemm(xn, &f.gate_up, gu, t)?;
    o.launch(&Kernel::SiluMul { gate_up: gu, out: mid, rows: t, inter: f.inter })?;
    o.gemm(mid, &f.down, out, t)?;
    Ok(out)
}

/// Final norm and lm head over the rows asked for; per sequence `[rows × vocab]`.
fn head(o: &mut dyn Ops, model: &Model, w: &Weights, x: Addr, spans: &[SeqSpan], mode: LogitsMode) -> R<Vec<Vec<f32>>> {
    let c = &model.config;
    let (h, v) = (c.hidden_size, c.vocab_size);
    let t: usize = spans.iter().map(|s| s.n).sum();
    let rows: Vec<i32> = match mode {
        LogitsMode::Last => spans.iter().map(|s| (s.offset + s.n - 1) as i32).collect(),
        LogitsMode::All => (0..t as i32).collect(),
    };
    let nr = rows.len();
    let idx = o.step_i32(&rows)?;
    let sel = o.scratch("head_x", nr * h)?;
    o.launch(&Kernel::GatherRows { x, idx, out: sel, rows: nr, hidden: h })?;
    o.launch(&Kernel::Rmsnorm { x: sel, w: w.norm, y: sel, rows: nr, n: h, eps: c.rms_norm_eps })?;
    let logits = o.scratch("logits", nr * v)?;
    o.gemm(sel, w.lm_head.as_ref().unwrap_or(&w.embed), logits, nr)?;
    let all = o.read_f32(logits, nr * v)?;
    Ok(match mode {
        LogitsMode::Last => all.chunks(v).map(<[f32]>::to_vec).collect(),
        LogitsMode::All => spans.iter().map(|sp| all[sp.offset * v..(sp.offset + sp.n) * v].to_vec()).collect(),
    })
}
