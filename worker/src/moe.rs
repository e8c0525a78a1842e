#![forbid(unsafe_code)]
//! The MoE layer, split into the steps an expert-parallel engine needs to separate:
//!
//! 1. [`Router::route`]: router logits → top-k expert ids and weights per token ([`Routing`]);
//! 2. [`Routing::group_by_expert`]: the (token, expert, weight) assignments grouped per expert
//!    ([`ExpertBatch`]) — the unit an all-to-all dispatch sends;
//! 3. [`ExpertFfn::forward`]: one call runs one expert over its batch of tokens;
//! 4. [`combine_into`]: weighted sum of the expert outputs back into token order, then the shared
//!    expert(s) are added by [`MoeLayer::forward`].
//!
//! Step 2-4 for routed experts go through an [`ExpertExecutor`]; [`LocalExperts`] runs them in
//! this process, an expert-parallel executor sends batches to the ranks holding the experts.

use crate::config::{GroupScore, RouterConfig, Scoring};
use crate::error::{ModelError, Result};
use crate::kernels;
use rayon::prelude::*;
use std::sync::Arc;

/// A SwiGLU feed-forward block `down(silu(gate(x)) * up(x))` (a routed expert, a shared expert,
/// or a dense MLP). `gate_up` stacks the gate rows on top of the up rows: `[2·inter, hidden]`.
/// Weights are packed at load time ([`kernels::PackedWeight`]): each is used once per layer and
/// step by the tokens routed to it, too few for a BLAS's per-call packing to pay.
#[derive(Debug, Clone)]
pub struct ExpertFfn {
    pub gate_up: kernels::PackedWeight,
    pub down: kernels::PackedWeight,
    pub hidden: usize,
    pub inter: usize,
}

impl ExpertFfn {
    /// From row-major `gate_up[2·inter × hidden]` and `down[hidden × inter]`.
    pub fn from_rows(gate_up: &[f32], down: &[f32], hidden: usize, inter: usize) -> ExpertFfn {
        ExpertFfn {
            gate_up: kernels::PackedWeight::from_rows(gate_up, 2 * inter, hidden),
            down: kernels::PackedWeight::from_rows(down, hidden, inter),
            hidden,
            inter,
        }
    }

    /// `x[n×hidden] → [n×hidden]`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut gu = vec![0.0; n * 2 * self.inter];
        self.gate_up.matmul(x, n, &mut gu, true);
        let h = kernels::silu_mul_fused(&gu, n, self.inter);
        let mut y = vec![0.0; n * self.hidden];
        self.down.matmul(&h, n, &mut y, true);
        y
    }

    /// Bytes of weights as held (packed; bf16 or f32, see [`kernels::PackedWeight`]).
    pub fn bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }
}

/// Routing decisions of one MoE layer for a batch of tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `[tokens × top_k]` expert ids, highest weight first.
    pub ids: Vec<u32>,
    /// `[tokens × top_k]` combine weights (after normalisation and scaling).
    pub weights: Vec<f32>,
    /// Next-best experts kept per token beyond the top-k (0 unless the executor asks for them,
    /// see [`ExpertExecutor::routing_alternates`]).
    pub alternates: usize,
    /// `[tokens × alternates]` the router's next choices after the top-k, best first.
    pub alt_ids: Vec<u32>,
    /// `[tokens × alternates]` their weights had they been chosen: the router's score for them
    /// under the same normalisation (the top-k's sum) and scaling, so that a substitute for one
    /// of the top-k leaves the other choices' weights as they were.
    pub alt_weights: Vec<f32>,
}

/// One routed token of an expert batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignment {
    pub token: usize,
    pub expert: usize,
    pub weight: f32,
}

/// The tokens routed to one expert: `tokens[i]` has combine weight `weights[i]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBatch {
    pub expert: usize,
    pub tokens: Vec<usize>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn n_tokens(&self) -> usize {
        self.ids.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Expert ids of token `t`.
    pub fn token_ids(&self, t: usize) -> &[u32] {
        &self.ids[t * self.top_k..(t + 1) * self.top_k]
    }

    /// Every (token, expert, weight), token-major.
    pub fn assignments(&self) -> Vec<Assignment> {
        self.ids
            .iter()
            .zip(&self.weights)
            .enumerate()
            .map(|(i, (&e, &w))| Assignment { token: i / self.top_k, expert: e as usize, weight: w })
            .collect()
    }

    /// Assignments grouped per expert, in increasing expert order; empty experts are left out.
    pub fn group_by_expert(&self, n_experts: usize) -> Vec<ExpertBatch> {
        let mut by: Vec<ExpertBatch> =
            (0..n_experts).map(|e| ExpertBatch { expert: e, tokens: vec![], weights: vec![] }).collect();
        for a in self.assignments() {
            if let Some(b) = by.get_mut(a.expert) {
                b.tokens.push(a.token);
                b.weights.push(a.weight);
            }
        }
        by.retain(|b| !b.tokens.is_empty());
        by
    }

    /// Keep only tokens `range` (used to split a batch's routing per sequence).
    pub fn slice_tokens(&self, range: std::ops::Range<usize>) -> Routing {
        let (k, m) = (self.top_k, self.alternates);
        Routing {
            top_k: k,
            ids: self.ids[range.start * k..range.end * k].to_vec(),
            weights: self.weights[range.start * k..range.end * k].to_vec(),
            alternates: m,
            alt_ids: self.alt_ids[range.start * m..range.end * m].to_vec(),
            alt_weights: self.alt_weights[range.start * m..range.end * m].to_vec(),
        }
    }

    /// A routing of no tokens.
    pub fn empty(top_k: usize) -> Routing {
        Routing { top_k, ids: vec![], weights: vec![], alternates: 0, alt_ids: vec![], alt_weights: vec![] }
    }
}

/// The router (gate) of a MoE layer.
#[derive(Debug, Clone)]
pub struct Router {
    /// `[n_experts × hidden]`
    pub weight: Vec<f32>,
    /// DeepSeek-V3 `e_score_correction_bias` (selection only).
    pub correction_bias: Option<Vec<f32>>,
    pub cfg: RouterConfig,
    pub hidden: usize,
}

impl Router {
    /// Route `x[t×hidden]`.
    pub fn route(&self, x: &[f32], t: usize) -> Routing {
        self.route_with_alternates(x, t, 0)
    }

    /// Route `x[t×hidden]` and keep each token's next `alternates` choices after the top-k
    /// (fewer when the layer has fewer experts). The top-k are exactly those of [`Router::route`].
    pub fn route_with_alternates(&self, x: &[f32], t: usize, alternates: usize) -> Routing {
        let e = self.cfg.n_experts;
        let k = self.cfg.top_k;
        let m = alternates.min(e.saturating_sub(k));
        let mut logits = vec![0.0; t * e];
        kernels::matmul_bt(x, t, self.hidden, &self.weight, e, &mut logits);
        // Per token: k chosen then m alternates.
        let mut ids = vec![0u32; t * (k + m)];
        let mut weights = vec![0.0f32; t * (k + m)];
        let per_token = |(row, (ids, ws)): (&mut [f32], (&mut [u32], &mut [f32]))| {
            self.route_one(row, ids, ws);
        };
        let km = k + m;
        if t >= 64 {
            logits.par_chunks_mut(e).zip(ids.par_chunks_mut(km).zip(weights.par_chunks_mut(km))).for_each(per_token);
        } else {
            logits.chunks_mut(e).zip(ids.chunks_mut(km).zip(weights.chunks_mut(km))).for_each(per_token);
        }
        if m == 0 {
            return Routing { top_k: k, ids, weights, alternates: 0, alt_ids: vec![], alt_weights: vec![] };
        }
        let (top_ids, alt_ids) = split_rows(&ids, k, m);
        let (top_w, alt_w) = split_rows(&weights, k, m);
        Routing { top_k: k, ids: top_ids, weights: top_w, alternates: m, alt_ids, alt_weights: alt_w }
    }

    /// One token: `ids`/`ws` hold `top_k` choices followed by any alternates.
    fn route_one(&self, scores: &mut [f32], ids: &mut [u32], ws: &mut [f32]) {
        route_scores(&self.cfg, self.correction_bias.as_deref(), scores, ids, ws);
    }
}

/// The router's rule on one token's logits `scores` (overwritten with its scores): `ids`/`ws`
/// receive the top-k choices followed by any alternates. The device backends' `route_topk` kernel
/// implements this same rule.
pub fn route_scores(cfg: &RouterConfig, correction_bias: Option<&[f32]>, scores: &mut [f32], ids: &mut [u32], ws: &mut [f32]) {
    let e = cfg.n_experts;
    match cfg.scoring {
        Scoring::Softmax => kernels::softmax_inplace(scores),
        Scoring::Sigmoid => scores.iter_mut().for_each(|s| *s = kernels::sigmoid(*s)),
    }
    // Scores used for choosing (biased), scores used for weighting.
    let mut choice: Vec<f32> = match correction_bias {
        Some(b) => scores.iter().zip(b.iter()).map(|(s, b)| s + b).collect(),
        None => scores.to_vec(),
    };
    let mut weight_src: &[f32] = scores;
    let masked_scores;
    if let Some(g) = &cfg.group_limit {
        let per = e / g.n_group;
        let group_scores: Vec<f32> = choice
            .chunks(per)
            .map(|grp| match g.score {
                GroupScore::Max => grp.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                GroupScore::SumTop2 => {
                    let top = top_k_indices(grp, 2);
                    top.iter().map(|&i| grp[i]).sum()
                }
            })
            .collect();
        let keep = top_k_indices(&group_scores, g.topk_group);
        let mut mask = vec![false; g.n_group];
        for i in keep {
            mask[i] = true;
        }
        for (gi, grp) in choice.chunks_mut(per).enumerate() {
            if !mask[gi] {
                grp.iter_mut().for_each(|v| *v = g.masked_value);
            }
        }
        if correction_bias.is_none() {
            // V2: the weights are gathered from the masked scores.
            masked_scores = choice.clone();
            weight_src = &masked_scores;
        }
    }
    let top = top_k_indices(&choice, ids.len());
    let mut sum = 0.0f32;
    for (j, &i) in top.iter().enumerate() {
        ids[j] = i as u32;
        ws[j] = weight_src[i];
        if j < cfg.top_k {
            sum += ws[j];
        }
    }
    if cfg.norm_topk_prob {
        let d = sum + cfg.norm_eps;
        ws.iter_mut().for_each(|w| *w /= d);
    }
    if cfg.routed_scaling_factor != 1.0 {
        ws.iter_mut().for_each(|w| *w *= cfg.routed_scaling_factor);
    }
    choice.clear();
}

/// Rows of `k + m` values split into their first `k` and last `m` columns.
fn split_rows<T: Copy>(v: &[T], k: usize, m: usize) -> (Vec<T>, Vec<T>) {
    let rows = v.len() / (k + m).max(1);
    let (mut a, mut b) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * m));
    for c in v.chunks(k + m) {
        a.extend_from_slice(&c[..k]);
        b.extend_from_slice(&c[k..]);
    }
    (a, b)
}

/// Indices of the `k` largest values, largest first (ties: lower index first). NaN sorts last.
pub fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let key = |i: &usize| if v[*i].is_nan() { f32::NEG_INFINITY } else { v[*i] };
    let k = k.min(v.len());
    if k < v.len() {
        idx.select_nth_unstable_by(k, |a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
        idx.truncate(k);
    }
    idx.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b)));
    idx
}

/// A shared expert (always active), optionally with Qwen2-MoE's sigmoid gate.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub ffn: ExpertFfn,
    /// `[hidden]` weight of `shared_expert_gate` (Linear(hidden, 1)).
    pub gate: Option<Vec<f32>>,
}

/// A MoE layer on this rank: the router, the routed experts loaded here, the shared experts.
#[derive(Debug, Clone)]
pub struct MoeLayer {
    /// Index among the MoE layers.
    pub moe_index: usize,
    pub router: Router,
    /// `experts[e]` is `None` when expert `e` is not loaded on this rank.
    pub experts: Vec<Option<ExpertFfn>>,
    pub shared: Option<SharedExpert>,
    pub hidden: usize,
}

impl MoeLayer {
    pub fn n_experts(&self) -> usize {
        self.experts.len()
    }

    /// Expert ids loaded here.
    pub fn loaded_experts(&self) -> Vec<usize> {
        self.experts.iter().enumerate().filter(|(_, e)| e.is_some()).map(|(i, _)| i).collect()
    }

    /// Run one loaded expert over rows `x[n×hidden]`.
    pub fn expert_forward(&self, expert: usize, x: &[f32], n: usize) -> Result<Vec<f32>> {
        match self.experts.get(expert) {
            Some(Some(f)) => Ok(f.forward(x, n)),
            _ => Err(ModelError::ExpertNotLoaded { layer: self.moe_index, expert }),
        }
    }

    /// The full layer: route, run routed experts through `exec`, combine, add shared experts.
    /// Returns the output `[t×hidden]` and the routing decisions.
    pub fn forward(&self, x: &[f32], t: usize, exec: &dyn ExpertExecutor) -> Result<(Vec<f32>, Routing)> {
        let routing = self.router.route_with_alternates(x, t, exec.routing_alternates(self));
        // The executor may block in collectives (expert parallelism), so it runs on the calling
        // thread: a rayon worker blocked on a peer would starve the pool that the peer ranks of
        // this process (tests, benchmarks) or its own expert FFNs need. The shared experts run
        // on the pool meanwhile.
        let mut shared = None;
        let routed = rayon::in_place_scope(|s| {
            s.spawn(|_| shared = self.shared_forward(x, t));
            exec.run(self, x, t, &routing)
        });
        let mut out = routed?;
        if let Some(s) = shared {
            for (o, s) in out.iter_mut().zip(s) {
                *o += s;
            }
        }
        Ok((out, routing))
    }

    /// Shared-expert output (already gated), if the layer has one.
    pub fn shared_forward(&self, x: &[f32], t: usize) -> Option<Vec<f32>> {
        let s = self.shared.as_ref()?;
        let mut y = s.ffn.forward(x, t);
        if let Some(g) = &s.gate {
            for (row, xr) in y.chunks_mut(self.hidden).zip(x.chunks(self.hidden)) {
                let gv = kernels::sigmoid(kernels::dot(xr, g));
                row.iter_mut().for_each(|v| *v *= gv);
            }
        }
        Some(y)
    }
}

/// Copy rows `tokens` of `x` (row length `hidden`) into one contiguous block.
pub fn gather_rows(x: &[f32], hidden: usize, tokens: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(tokens.len() * hidden);
    for &t in tokens {
        out.extend_from_slice(&x[t * hidden..(t + 1) * hidden]);
    }
    out
}

/// `out[batch.tokens[i]] += batch.weights[i] * y[i]` for every row `i` of an expert's output.
pub fn combine_into(out: &mut [f32], hidden: usize, batch: &ExpertBatch, y: &[f32]) {
    for (i, (&t, &w)) in batch.tokens.iter().zip(&batch.weights).enumerate() {
        kernels::axpy(w, &y[i * hidden..(i + 1) * hidden], &mut out[t * hidden..(t + 1) * hidden]);
    }
}

/// Runs the routed experts of a MoE layer: the seam where expert parallelism plugs in.
pub trait ExpertExecutor: Sync {
    /// Given the layer input `x[t×hidden]` and its routing, return `Σ_k weight_k · expert_k(x)`
    /// per token (`[t×hidden]`, shared experts not included).
    fn run(&self, layer: &MoeLayer, x: &[f32], t: usize, routing: &Routing) -> Result<Vec<f32>>;

    /// Next-best experts per token the router should keep for `layer` beyond the top-k (an
    /// executor that may reroute tokens, e.g. under a capacity limit). Default none.
    fn routing_alternates(&self, _layer: &MoeLayer) -> usize {
        0
    }

    /// A whole forward of `seqs` when this executor runs it itself (tokens that leave their rank
    /// between layers, see [`crate::expert_parallel::DataPath::Affinity`]); `None` (default): the
    /// caller runs [`crate::model::Model::forward_with`] with this executor for the routed experts.
    fn forward_step(
        &self,
        _model: &crate::model::Model,
        _seqs: &mut [crate::model::SeqInput],
        _mode: crate::model::LogitsMode,
    ) -> Option<Result<crate::model::ForwardOutput>> {
        None
    }

    /// The sequence whose KV cache has id `cache` ended (finished or aborted): copies of it
    /// elsewhere can go. Default: nothing to do.
    fn release_sequence(&self, _cache: u64) {}

    /// Where every routed expert of `layer` runs in this process with no collective to join, the
    /// weights a device backend may run the layer with itself instead of calling
    /// [`ExpertExecutor::run`]; `None` (default): the layer must go through `run`.
    fn local_experts(&self, _layer: &MoeLayer) -> Option<LocalExpertSet> {
        None
    }

    /// Where this executor is a rank of a group whose MoE layers a device backend runs with the
    /// rows in device memory: the plan and the collectives ([`DeviceDispatch`]). Every rank of
    /// the group must then run its layers (idle ones too) through it. Default none.
    fn device_dispatch(&self) -> Option<&dyn DeviceDispatch> {
        None
    }

    /// Whether [`ExpertExecutor::forward_step`] runs whole forwards of `model` (a backend that
    /// cannot hand its forward over refuses such an executor).
    fn runs_whole_forward(&self, _model: &crate::model::Model) -> bool {
        false
    }
}

/// One MoE layer of a group's rank run by a device backend: per layer, [`DeviceDispatch::plan`]
/// (one collective: the expert ids of the rows each rank sends each other), then two exchanges of
/// rows ([`DeviceDispatch::exchange`]: rows to their experts, results back), in that order on
/// every rank.
pub trait DeviceDispatch: Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Replica choice for `routing` and the exchange of each row's expert id.
    fn plan(&self, layer: &MoeLayer, routing: &Routing) -> Result<DispatchPlan>;
    /// One all-to-all-v of host bytes (`send[r]` to rank r), for rows staged through the host.
    fn exchange(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;
    /// Whether the group's transport moves device memory ([`DeviceDispatch::exchange_device`]).
    fn moves_device_memory(&self) -> bool;
    /// One all-to-all-v of device memory (NCCL): `send[r]` to rank r, `recv[r]` from rank r,
    /// sizes agreed by the plan, the own slots skipped.
    fn exchange_device(&self, send: &[crate::transport::DeviceSpan], recv: &[crate::transport::DeviceSpan]) -> Result<()>;
}

/// What [`DeviceDispatch::plan`] decided for one layer.
#[derive(Debug, Clone, Default)]
pub struct DispatchPlan {
    /// Per destination rank: the (token, expert, weight) rows this rank sends, in send order.
    pub send: Vec<Vec<(usize, u32, f32)>>,
    /// Per source rank: the expert of each row it sends this rank, in its send order.
    pub recv_experts: Vec<Vec<u32>>,
    /// This rank's weights of the layer's experts (`None` where it holds no slot).
    pub experts: Vec<Option<Arc<ExpertFfn>>>,
}

/// The routed experts an executor runs in-process (see [`ExpertExecutor::local_experts`]).
#[derive(Debug, Clone)]
pub enum LocalExpertSet {
    /// The layer's own weights ([`MoeLayer::experts`]).
    InLayer,
    /// Weights held outside the layer: a one-rank group's placement slots, per expert.
    Slots(Vec<Option<Arc<ExpertFfn>>>),
}

/// Runs every routed expert in this process (all needed experts must be loaded).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalExperts;

impl ExpertExecutor for LocalExperts {
    fn local_experts(&self, _layer: &MoeLayer) -> Option<LocalExpertSet> {
        Some(LocalExpertSet::InLayer)
    }

    fn run(&self, layer: &MoeLayer, x: &[f32], t: usize, routing: &Routing) -> Result<Vec<f32>> {
        let h = layer.hidden;
        let batches = routing.group_by_expert(layer.n_experts());
        let outs: Vec<Result<Vec<f32>>> = batches
            .par_iter()
            .map(|b| {
                let rows = gather_rows(x, h, &b.tokens);
                layer.expert_forward(b.expert, &rows, b.tokens.len())
            })
            .collect();
        let mut out = vec![0.0; t * h];
        for (b, y) in batches.iter().zip(outs) {
            combine_into(&mut out, h, b, &y?);
        }
        Ok(out)
    }
}
