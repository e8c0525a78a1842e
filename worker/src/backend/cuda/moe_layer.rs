#![forbid(unsafe_code)]
//! A MoE layer of the device step ([`super::step`]): routing, the routed experts, the shared
//! expert.
//!
//! Where one process runs every routed expert (the layer's own, or a one-rank group's slots),
//! the layer never leaves the device: `route_topk` writes the choices into the step's
//! [`RoutingSink`], `moe_align` groups them by expert, two `expert_gemm` launches (gate/up, down)
//! run all experts of the layer over their rows, `combine_rows` sums them per token. The sink is
//! read once, after the step's logits, for the engine's load statistics, with each layer's error
//! word (an expert routed to but not on the device fails the step there).
//!
//! A rank of a larger group needs the counts on the host anyway (they size the all-to-all of
//! its rows), so it reads the choices back, plans with the executor ([`DeviceDispatch`]) and
//! runs its experts with one grouped cuBLAS GEMM per projection over host-planned groups
//! ([`moe_plan`]). Anything else hands the layer input to the executor on the host.

use super::kernel_src::expert_grouping::{max_tiles, ERROR_NO_WEIGHTS, EXPERT_TILE_M, WEIGHTS_IN_OTHER_LAUNCH};
use super::moe_plan;
use super::ops::{f32_at, Addr, ExpertGemmArgs, Kernel, Ops, RouteRule, R};
use super::step::{dense_ffn, ffn, DevFfn, DevMoe, SlotExpert};
use crate::backend::{Device, DeviceError};
use crate::config::{GroupScore, Scoring};
use crate::error::Result;
use crate::moe::{DeviceDispatch, ExpertExecutor, ExpertFfn, LocalExpertSet, MoeLayer, Routing};
use super::dtype::WeightDtype;
use std::sync::Arc;

/// Where the layers that route on the device leave their choices during a step: ids (as u32
/// bits), weights and one error word per MoE layer, in buffers allocated at the first such
/// layer and read back once, by [`RoutingSink::finish`].
pub(super) struct RoutingSink {
    n_moe: usize,
    t: usize,
    k: usize,
    bufs: Option<(Addr, Addr, Addr)>,
}

/// A MoE layer's routing during a step: on the host already, or in the sink.
pub(super) enum LayerRouting {
    Host(Routing),
    Device { moe_index: usize },
}

impl RoutingSink {
    pub(super) fn new(n_moe: usize, t: usize, k: usize) -> Self {
        RoutingSink { n_moe, t, k, bufs: None }
    }

    /// Ids, weights and error word of MoE layer `moe_index`.
    fn slot(&mut self, o: &mut dyn Ops, moe_index: usize) -> R<(Addr, Addr, Addr)> {
        if moe_index >= self.n_moe {
            return Err(plan_err(o.device(), format!("MoE layer {moe_index} of {}", self.n_moe)));
        }
        let (ids, w, err) = match self.bufs {
            Some(b) => b,
            None => {
                let n = self.n_moe * self.t * self.k;
                *self.bufs.insert((o.step_zeros(n)?, o.step_zeros(n)?, o.step_zeros(self.n_moe)?))
            }
        };
        let at = moe_index * self.t * self.k;
        Ok((f32_at(ids, at), f32_at(w, at), f32_at(err, moe_index)))
    }

    /// Every layer's routing on the host (one read of the sink, after the step's work), or the
    /// first layer whose error word is set.
    pub(super) fn finish(self, o: &mut dyn Ops, layers: Vec<LayerRouting>) -> Result<Vec<Routing>> {
        let Some((ids, w, err)) = self.bufs else {
            return layers.into_iter().map(|l| match l {
                LayerRouting::Host(r) => Ok(r),
                LayerRouting::Device { moe_index } => Err(plan_err(o.device(), format!("MoE layer {moe_index}: routing was never written")).into()),
            }).collect();
        };
        let n = self.n_moe * self.t * self.k;
        let (ids, w, errors) = (o.read_u32(ids, n)?, o.read_f32(w, n)?, o.read_u32(err, self.n_moe)?);
        if let Some((layer, &code)) = errors.iter().enumerate().find(|(_, c)| **c != 0) {
            let why = if code as i32 == ERROR_NO_WEIGHTS { "a routed expert has no weights on this device" } else { "the router chose an expert id out of range" };
            return Err(plan_err(o.device(), format!("MoE layer {layer}: {why}")).into());
        }
        let per = self.t * self.k;
        Ok(layers
            .into_iter()
            .map(|l| match l {
                LayerRouting::Host(r) => r,
                LayerRouting::Device { moe_index: i } => Routing { top_k: self.k, ids: ids[i * per..(i + 1) * per].to_vec(), weights: w[i * per..(i + 1) * per].to_vec(), alternates: 0, alt_ids: vec![], alt_weights: vec![] },
            })
            .collect())
    }
}

fn route_rule(host: &MoeLayer) -> RouteRule {
    let cfg = &host.router.cfg;
    RouteRule {
        n_experts: cfg.n_experts,
        top_k: cfg.top_k,
        sigmoid: cfg.scoring == Scoring::Sigmoid,
        group_limit: cfg.group_limit.as_ref().map(|g| (g.n_group, g.topk_group, g.score == GroupScore::SumTop2, g.masked_value)),
        norm_topk: cfg.norm_topk_prob,
        norm_eps: cfg.norm_eps,
        scaling: cfg.routed_scaling_factor,
    }
}

/// Device copies of placement-slot weights `ws` (per expert; `None`: no slot here), kept in
/// `held` across steps: uploaded when first seen, replaced when an epoch hands over other weights
/// (the old copies freed), dropped where the slot went.
fn sync_slots(o: &mut dyn Ops, held: &mut Vec<SlotExpert>, ws: &[Option<Arc<ExpertFfn>>]) -> R<Vec<Option<DevFfn>>> {
    held.resize(ws.len(), None);
    for (slot, w) in held.iter_mut().zip(ws) {
        let same = match (slot.as_ref(), w) {
            (Some((h, _)), Some(w)) => Arc::ptr_eq(h, w),
            (None, None) => true,
            _ => false,
        };
        if same {
            continue;
        }
        if let Some((_, old)) = slot.take() {
            o.free_kept(old.gate_up.addr);
            o.free_kept(old.down.addr);
        }
        if let Some(w) = w {
            *slot = Some((w.clone(), ffn(o, w)?));
        }
    }
    Ok(held.iter().map(|s| s.as_ref().map(|(_, d)| *d)).collect())
}

/// The routed experts of a layer on the device, where the executor runs them all in-process:
/// the layer's own (uploaded at open) or a one-rank group's slots.
fn device_experts(o: &mut dyn Ops, host: &MoeLayer, m: &DevMoe, held: &mut Vec<SlotExpert>, exec: &dyn ExpertExecutor) -> R<Option<Vec<Option<DevFfn>>>> {
    match exec.local_experts(host) {
        Some(LocalExpertSet::InLayer) => Ok(m.experts.as_ref().map(|v| v.iter().copied().map(Some).collect())),
        Some(LocalExpertSet::Slots(ws)) => sync_slots(o, held, &ws).map(Some),
        None => Ok(None),
    }
}

/// The router's GEMM and `route_topk` over `t` rows of `xn`, choices to `ids` / `weights`.
fn route_on_device(o: &mut dyn Ops, host: &MoeLayer, m: &DevMoe, xn: Addr, t: usize, ids: Addr, weights: Addr) -> R<()> {
    let rule = route_rule(host);
    let logits = o.scratch("router_logits", t * rule.n_experts)?;
    o.gemm(xn, &m.router, logits, t)?;
    let scratch = o.scratch("route_scratch", t * 2 * rule.n_experts)?;
    o.launch(&Kernel::RouteTopk { logits, bias: m.bias, scratch, ids, weights, rows: t, rule })
}

/// Route `t` rows of `xn` on the device and bring the choices to the host (a group's rank
/// plans its all-to-all from them). With `alternates` (the capacity option reroutes overflow
/// to next-best experts) the host router ranks them.
fn route_to_host(o: &mut dyn Ops, host: &MoeLayer, m: &DevMoe, xn: Addr, t: usize, alternates: usize) -> R<Routing> {
    let k = host.router.cfg.top_k;
    if t == 0 {
        return Ok(Routing::empty(k));
    }
    if alternates > 0 {
        let x = o.read_f32(xn, t * host.hidden)?;
        return Ok(host.router.route_with_alternates(&x, t, alternates));
    }
    let (ids, weights) = (o.step_zeros(t * k)?, o.step_zeros(t * k)?);
    route_on_device(o, host, m, xn, t, ids, weights)?;
    Ok(Routing { top_k: k, ids: o.read_u32(ids, t * k)?, weights: o.read_f32(weights, t * k)?, alternates: 0, alt_ids: vec![], alt_weights: vec![] })
}

/// A layer whose routed experts are all on this device, start to end there: route into the
/// sink, group by expert, both projections over every expert's rows (one launch each per
/// weight dtype present: one for any checkpoint stored in one dtype), the weighted sum per
/// token into `out`.
#[allow(clippy::too_many_arguments)]
fn local_layer(o: &mut dyn Ops, host: &MoeLayer, m: &DevMoe, experts: &[Option<DevFfn>], sink: &mut RoutingSink, xn: Addr, t: usize, h: usize, out: Addr) -> R<()> {
    let (e, k) = (host.router.cfg.n_experts, host.router.cfg.top_k);
    if t == 0 {
        return Ok(());
    }
    let (ids, weights, error) = sink.slot(o, host.moe_index)?;
    route_on_device(o, host, m, xn, t, ids, weights)?;
    let choices = t * k;
    let tiles = max_tiles(choices, e);
    let rows = tiles * EXPERT_TILE_M;
    let (sorted, tile_expert, src_row) = (o.step_zeros(rows)?, o.step_zeros(tiles)?, o.step_zeros(choices)?);
    o.launch(&Kernel::MoeAlign { ids, choices, n_experts: e, max_tiles: tiles, sorted, tile_expert, src_row, error })?;
    let Some(inter) = experts.iter().flatten().map(|f| f.inter).next() else {
        return Err(plan_err(o.device(), format!("MoE layer {}: no routed expert on the device", host.moe_index)));
    };
    let (gu, mid, y) = (o.scratch("moe_gate_up", rows * 2 * inter)?, o.scratch("moe_mid", rows * inter)?, o.scratch("moe_y", rows * h)?);
    let gemm = |x, row_div, weights, dtype, out, n, k| ExpertGemmArgs { x, sorted, row_div, weights, dtype, tile_expert, out, tiles, n, k, error };
    for dtype in dtypes_of(experts.iter().flatten().map(|f| f.gate_up.dtype)) {
        let table = weight_table(experts, |f| f.gate_up, dtype);
        let table = o.step_addrs(&table)?;
        o.launch(&Kernel::ExpertGemm(gemm(xn, k, table, dtype, gu, 2 * inter, h)))?;
    }
    o.launch(&Kernel::SiluMul { gate_up: gu, out: mid, rows, inter })?;
    for dtype in dtypes_of(experts.iter().flatten().map(|f| f.down.dtype)) {
        let table = weight_table(experts, |f| f.down, dtype);
        let table = o.step_addrs(&table)?;
        o.launch(&Kernel::ExpertGemm(gemm(mid, 0, table, dtype, y, h, inter)))?;
    }
    o.launch(&Kernel::CombineRows { y, src_row, w: weights, out, tokens: t, k, hidden: h })
}

/// The distinct dtypes among `ds`, in first-seen order.
fn dtypes_of(ds: impl Iterator<Item = WeightDtype>) -> Vec<WeightDtype> {
    let mut v = Vec::new();
    for d in ds {
        if !v.contains(&d) {
            v.push(d);
        }
    }
    v
}

/// Per expert: the address of its matrix `pick(f)` when stored in `dtype`, [`WEIGHTS_IN_OTHER_LAUNCH`] when
/// in another dtype, 0 when the expert is not on the device.
fn weight_table(experts: &[Option<DevFfn>], pick: impl Fn(&DevFfn) -> super::ops::Mat, dtype: WeightDtype) -> Vec<Addr> {
    experts
        .iter()
        .map(|f| match f {
            Some(f) if pick(f).dtype == dtype => pick(f).addr,
            Some(_) => WEIGHTS_IN_OTHER_LAUNCH,
            None => 0,
        })
        .collect()
}

/// A MoE layer. Routed experts on the device where the executor runs them all in-process
/// ([`device_experts`], [`local_layer`]), or through the device protocol of a group's rank
/// ([`ep_layer`]); else the layer input goes to the host and the executor runs the layer as on
/// CPU workers.
#[allow(clippy::too_many_arguments)]
pub(super) fn moe(o: &mut dyn Ops, host: &MoeLayer, m: &DevMoe, slots: &mut [Vec<SlotExpert>], sink: &mut RoutingSink, xn: Addr, t: usize, h: usize, exec: &dyn ExpertExecutor) -> Result<(Addr, LayerRouting)> {
    let out = o.scratch("moe_out", t * h)?;
    let held = slots.get_mut(host.moe_index).ok_or_else(|| plan_err(o.device(), format!("MoE layer {} has no slot table", host.moe_index)))?;
    let experts = device_experts(o, host, m, held, exec)?;
    let routing = match (experts, exec.device_dispatch()) {
        (Some(experts), _) => {
            local_layer(o, host, m, &experts, sink, xn, t, h, out)?;
            LayerRouting::Device { moe_index: host.moe_index }
        }
        (None, Some(dd)) => {
            let routing = route_to_host(o, host, m, xn, t, exec.routing_alternates(host))?;
            ep_layer(o, host, dd, held, xn, &routing, out, h)?;
            LayerRouting::Host(routing)
        }
        (None, None) => {
            let x_host = o.read_f32(xn, t * h)?;
            let (y, r) = host.forward(&x_host, t, exec)?;
            o.write_f32(out, &y)?;
            return Ok((out, LayerRouting::Host(r)));
        }
    };
    if let Some((f, gate)) = &m.shared {
        let s = dense_ffn(o, f, xn, t, h)?;
        if let Some(g) = *gate {
            o.launch(&Kernel::SharedGate { x: xn, g, y: s, rows: t, hidden: h })?;
        }
        o.launch(&Kernel::AddInplace { x: out, y: s, n: t * h })?;
    }
    Ok((out, routing))
}

/// The experts of `plan`'s groups over rows `src` (gathered by `plan.gather`): `y` in grouped
/// order, one grouped GEMM per projection.
fn grouped_experts(o: &mut dyn Ops, experts: &[Option<DevFfn>], plan: &moe_plan::MoePlan, src: Addr, h: usize) -> R<Addr> {
    let rows = plan.rows();
    let device = o.device();
    let ffn_of = |e: usize| experts.get(e).copied().flatten().ok_or_else(|| plan_err(device, format!("expert {e} is not on the device")));
    let first = ffn_of(plan.groups[0].expert)?;
    let inter = first.inter;
    let gather = o.step_i32(&plan.gather)?;
    let xg = o.scratch("moe_xg", rows * h)?;
    o.launch(&Kernel::GatherRows { x: src, idx: gather, out: xg, rows, hidden: h })?;
    let (gu, mid, y) = (o.scratch("moe_gate_up", rows * 2 * inter)?, o.scratch("moe_mid", rows * inter)?, o.scratch("moe_y", rows * h)?);
    let mut gate_up = Vec::with_capacity(plan.groups.len());
    let mut down = Vec::with_capacity(plan.groups.len());
    for g in &plan.groups {
        let f = ffn_of(g.expert)?;
        gate_up.push((f.gate_up, g.start, g.rows));
        down.push((f.down, g.start, g.rows));
    }
    o.grouped_gemm(&gate_up, xg, h, gu, 2 * inter)?;
    o.launch(&Kernel::SiluMul { gate_up: gu, out: mid, rows, inter })?;
    o.grouped_gemm(&down, mid, inter, y, h)?;
    Ok(y)
}

pub(super) fn plan_err(device: Device, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Unsupported { device, msg: e.to_string() }
}

/// One MoE layer of a group's rank with the rows in device memory: the plan (replica choice and
/// the expert ids, one collective), rows to the ranks of their experts, this rank's experts on
/// what came in, results back to the rows' home ranks, the weighted sum into `out`. Every rank
/// runs it for every layer, idle ones with no rows ([`Backend::idle_forward`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn ep_layer(o: &mut dyn Ops, host: &MoeLayer, dd: &dyn DeviceDispatch, held: &mut Vec<SlotExpert>, xn: Addr, routing: &Routing, out: Addr, h: usize) -> Result<()> {
    let (t, k) = (routing.n_tokens(), routing.top_k);
    let plan = dd.plan(host, routing)?;
    let send_rows: Vec<usize> = plan.send.iter().map(Vec::len).collect();
    let recv_rows: Vec<usize> = plan.recv_experts.iter().map(Vec::len).collect();
    let (n_send, n_recv) = (send_rows.iter().sum::<usize>(), recv_rows.iter().sum::<usize>());
    // 1. Rows to the ranks of their experts, in destination order.
    let xs = o.scratch("ep_send", n_send * h)?;
    if n_send > 0 {
        let tokens: Vec<i32> = plan.send.iter().flatten().map(|it| it.0 as i32).collect();
        let idx = o.step_i32(&tokens)?;
        o.launch(&Kernel::GatherRows { x: xn, idx, out: xs, rows: n_send, hidden: h })?;
    }
    let xr = o.exchange_rows(dd, xs, &send_rows, &recv_rows, h)?;
    // 2. This rank's experts over what came in; results in the order the rows came.
    let devs = sync_slots(o, held, &plan.experts)?;
    let yb = o.scratch("ep_back", n_recv * h)?;
    if n_recv > 0 {
        let ids = plan.recv_experts.concat();
        let eplan = moe_plan::plan(&ids, &vec![1.0; n_recv], n_recv, 1, host.n_experts(), &|e| devs.get(e).is_some_and(Option::is_some), false).map_err(|e| plan_err(o.device(), e))?;
        let y = grouped_experts(o, &devs, &eplan, xr, h)?;
        let back_idx = o.step_i32(&eplan.src_row)?;
        o.launch(&Kernel::GatherRows { x: y, idx: back_idx, out: yb, rows: n_recv, hidden: h })?;
    }
    // 3. Results back to their home ranks (in this rank's send order), then the weighted sum.
    let back = o.exchange_rows(dd, yb, &recv_rows, &send_rows, h)?;
    if t > 0 {
        let (mut src_row, mut w) = (vec![-1i32; t * k], vec![0f32; t * k]);
        let mut filled = vec![0usize; t];
        for (j, &(tok, _, weight)) in plan.send.iter().flatten().enumerate() {
            let slot = filled.get_mut(tok).filter(|f| **f < k).ok_or_else(|| plan_err(o.device(), format!("token {tok}: more than {k} routed rows")))?;
            src_row[tok * k + *slot] = j as i32;
            w[tok * k + *slot] = weight;
            *slot += 1;
        }
        let (src_row, w) = (o.step_i32(&src_row)?, o.step_f32(&w)?);
        o.launch(&Kernel::CombineRows { y: back, src_row, w, out, tokens: t, k, hidden: h })?;
    }
    Ok(())
}

