//! One forward step on the device: embedding, decoder layers, head.
use super::*;

impl Run {
    fn dtoh(&self, name: &'static str, n: usize) -> R<Vec<f32>> {
        let b = &self.scratch.f32s[name];
        self.gpu.stream.clone_dtoh(&b.slice(0..n)).map_err(|e| self.gpu.err("download", e))
    }
}

/// The batch layout: positions and KV slots of the new rows, and the page tables.
fn layout(run: &mut Run, ids: &[u64], spans: &[SeqSpan]) -> R<StepLayout> {
    let device = run.gpu.device;
    let mut pos = Vec::new();
    let mut slots = Vec::new();
    let mut seq_of_row = Vec::new();
    for (i, (id, sp)) in ids.iter().zip(spans).enumerate() {
        run.kv.reserve(*id, sp.start + sp.n).map_err(|e| DeviceError::KvFull { device, msg: e.to_string() })?;
        slots.extend(run.kv.slots_of(*id, sp.start, sp.n).map_err(|e| DeviceError::KvFull { device, msg: e.to_string() })?);
        for j in 0..sp.n {
            pos.push(i32_of(sp.start + j, "position", device)?);
            seq_of_row.push(i as i32);
        }
    }
    let tables = run.kv.batch_tables(ids).map_err(|e| DeviceError::KvFull { device, msg: e.to_string() })?;
    let g = &run.gpu;
    Ok(StepLayout {
        t: pos.len(),
        pos: g.upload_i32(&pos)?,
        slots: g.upload_i32(&slots)?,
        seq_of_row: g.upload_i32(&seq_of_row)?,
        table: g.upload_i32(&tables.table)?,
        table_start: g.upload_i32(&tables.start)?,
    })
}

pub(super) fn forward(model: &Model, st: &mut State, seqs: &mut [SeqInput], mode: LogitsMode, exec: &dyn ExpertExecutor) -> Result<ForwardOutput> {
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
    let State { weights, run } = st;
    // cuBLAS calls need the context current on this thread (the rank loop's, not the opener's).
    run.gpu.ctx.bind_to_thread().map_err(|e| run.gpu.err("cuCtxSetCurrent", e))?;
    let lay = layout(run, &ids, &spans)?;
    let t = lay.t;
    let x = run.buf("x", t * h)?;
    let tok = run.gpu.stream.clone_htod(&tokens).map_err(|e| run.gpu.err("upload", e))?;
    {
        let g = &run.gpu;
        let d = g.geom(geometry::per_row(t))?;
        let name = format!("embed_rows_{}", weights.embed.dtype().kernel_suffix());
        let (table, tok, rows, hidden) = (weights.embed.ptr(g), g.ptr(&tok), t as i32, h as i32);
        g.launch(&name, d, |b| args!(b; &table, &tok, &x, &rows, &hidden))?;
    }
    let mut routing = Vec::new();
    for (li, (layer, dl)) in model.layers.iter().zip(&weights.layers).enumerate() {
        let xn = run.buf("xn", t * h)?;
        run.gpu.rmsnorm(x, &dl.input_norm, xn, t, h, c.rms_norm_eps)?;
        let a = attention(run, model, weights, li, dl, xn, &lay)?;
        run.gpu.add_inplace(x, a, t * h)?;
        run.gpu.rmsnorm(x, &dl.post_norm, xn, t, h, c.rms_norm_eps)?;
        let f = match (&layer.ffn, &dl.ffn) {
            (Ffn::Dense(_), DevFfnKind::Dense(f)) => dense_ffn(run, f, xn, t, h)?,
            (Ffn::Moe(host), DevFfnKind::Moe(m)) => {
                let (y, r) = moe(run, host, m, xn, t, h, exec)?;
                routing.push(r);
                y
            }
            _ => return Err(DeviceError::Unsupported { device: run.gpu.device, msg: format!("layer {li}: device and host FFN kinds differ") }.into()),
        };
        run.gpu.add_inplace(x, f, t * h)?;
    }
    let logits = head(run, model, weights, x, &spans, mode)?;
    for (sp, s) in spans.iter().zip(seqs.iter_mut()) {
        s.cache.set_len(sp.start + sp.n);
    }
    Ok(ForwardOutput { logits, routing })
}

fn attention(run: &mut Run, model: &Model, w: &Weights, li: usize, dl: &DevLayer, xn: u64, lay: &StepLayout) -> R<u64> {
    let c = &model.config;
    let (t, eps) = (lay.t, c.rms_norm_eps);
    let rope = &model.rope;
    let half = rope.inv_freq.len();
    let pos = run.gpu.ptr(&lay.pos);
    let (n_heads, n_kv, qd, vd, q, k, v, o) = match &dl.attn {
        DevAttn::Standard { q: ql, k: kl, v: vl, o, q_norm, k_norm, q_norm_len, k_norm_len, n_heads, n_kv, head_dim, clip } => {
            let hd = *head_dim;
            let (q, k, v) = (run.buf("q", t * n_heads * hd)?, run.buf("k", t * n_kv * hd)?, run.buf("v", t * n_kv * hd)?);
            run.linear(xn, ql, q, t)?;
            run.linear(xn, kl, k, t)?;
            run.linear(xn, vl, v, t)?;
            if let (Some(qn), Some(kn)) = (q_norm, k_norm) {
                run.gpu.rmsnorm(q, qn, q, t * n_heads * hd / q_norm_len, *q_norm_len, eps)?;
                run.gpu.rmsnorm(k, kn, k, t * n_kv * hd / k_norm_len, *k_norm_len, eps)?;
            }
            if let Some(cl) = clip {
                run.gpu.clamp(q, t * n_heads * hd, *cl)?;
                run.gpu.clamp(k, t * n_kv * hd, *cl)?;
                run.gpu.clamp(v, t * n_kv * hd, *cl)?;
            }
            run.gpu.rope(q, pos, &w.inv_freq, t, *n_heads, hd, 0, half, rope.attention_factor, rope.interleaved)?;
            run.gpu.rope(k, pos, &w.inv_freq, t, *n_kv, hd, 0, half, rope.attention_factor, rope.interleaved)?;
            (*n_heads, *n_kv, hd, hd, q, k, v, o)
        }
        DevAttn::Mla { q_direct, q_a, kv_a, kv_a_norm, kv_b, o, n_heads, lora, nope, rope_dim, v_dim } => {
            let (nh, qk) = (*n_heads, nope + rope_dim);
            let q = run.buf("q", t * nh * qk)?;
            match (q_direct, q_a) {
                (Some(l), _) => run.linear(xn, l, q, t)?,
                (None, Some((a, norm, b))) => {
                    let qa_n = a.w.n;
                    let qa = run.buf("q_a", t * qa_n)?;
                    run.linear(xn, a, qa, t)?;
                    run.gpu.rmsnorm(qa, norm, qa, t, qa_n, eps)?;
                    run.linear(qa, b, q, t)?;
                }
                (None, None) => return Err(DeviceError::Unsupported { device: run.gpu.device, msg: "MLA layer without a query projection".into() }),
            }
            let ckv = run.buf("ckv", t * (lora + rope_dim))?;
            run.linear(xn, kv_a, ckv, t)?;
            let (latent, k_pe) = (run.buf("latent", t * lora)?, run.buf("k_pe", t * rope_dim)?);
            {
                let g = &run.gpu;
                let d = g.geom(geometry::grid_stride(t * (lora + rope_dim)))?;
                let (rows, ac, bc) = (t as i32, *lora as i32, *rope_dim as i32);
                g.launch("split_cols", d, |b| args!(b; &ckv, &latent, &k_pe, &rows, &ac, &bc))?;
            }
            run.gpu.rmsnorm(latent, kv_a_norm, latent, t, *lora, eps)?;
            let kv = run.buf("kv", t * nh * (nope + v_dim))?;
            run.linear(latent, kv_b, kv, t)?;
            run.gpu.rope(k_pe, pos, &w.inv_freq, t, 1, *rope_dim, 0, half, rope.attention_factor, rope.interleaved)?;
            let (k, v) = (run.buf("k", t * nh * qk)?, run.buf("v", t * nh * v_dim)?);
            {
                let g = &run.gpu;
                let d = g.geom(geometry::grid_stride(t * nh * qk.max(*v_dim)))?;
                let (rows, nhi, np, rd, vdi) = (t as i32, nh as i32, *nope as i32, *rope_dim as i32, *v_dim as i32);
                g.launch("mla_assemble", d, |b| args!(b; &kv, &k_pe, &k, &v, &rows, &nhi, &np, &rd, &vdi))?;
            }
            run.gpu.rope(q, pos, &w.inv_freq, t, nh, qk, *nope, half, rope.attention_factor, rope.interleaved)?;
            (nh, nh, qk, *v_dim, q, k, v, o)
        }
    };
    let (kp, vp) = (run.gpu.ptr(&run.k_pool[li]), run.gpu.ptr(&run.v_pool[li]));
    let slots = run.gpu.ptr(&lay.slots);
    run.gpu.kv_write(k, kp, slots, t, n_kv * qd)?;
    run.gpu.kv_write(v, vp, slots, t, n_kv * vd)?;
    let heads = run.buf("attn_heads", t * n_heads * vd)?;
    {
        let g = &run.gpu;
        let d = g.geom(geometry::attention(t, n_heads, n_kv, qd, vd))?;
        let (table, start, seq) = (g.ptr(&lay.table), g.ptr(&lay.table_start), g.ptr(&lay.seq_of_row));
        let (nh, nk, qdi, vdi, ps) = (n_heads as i32, n_kv as i32, qd as i32, vd as i32, PAGE_SIZE as i32);
        let (scale, window) = (model.attn_scale, c.sliding_windows[li].map_or(0, |w| w.min(i32::MAX as usize) as i32));
        g.launch("attention", d, |b| args!(b; &q, &kp, &vp, &table, &start, &seq, &pos, &heads, &nh, &nk, &qdi, &vdi, &ps, &scale, &window))?;
    }
    let out = run.buf("attn_out", t * model.config.hidden_size)?;
    run.linear(heads, o, out, t)?;
    Ok(out)
}

/// A SwiGLU block: `down(silu(gate(x)) · up(x))`.
fn dense_ffn(run: &mut Run, f: &DevFfn, xn: u64, t: usize, h: usize) -> R<u64> {
    let gu = run.buf("ffn_gate_up", t * 2 * f.inter)?;
    let mid = run.buf("ffn_mid", t * f.inter)?;
    let out = run.buf("ffn_out", t * h)?;
    run.gemm(xn, &f.gate_up, gu, t)?;
    run.gpu.silu_mul(gu, mid, t, f.inter)?;
    run.gemm(mid, &f.down, out, t)?;
    Ok(out)
}

/// A MoE layer. Routed experts on the device when the executor is local and every expert was
/// uploaded; else the layer input goes to the host and the executor runs the layer as on CPU
/// workers (its collectives, its host expert weights).
fn moe(run: &mut Run, host: &MoeLayer, m: &DevMoe, xn: u64, t: usize, h: usize, exec: &dyn ExpertExecutor) -> Result<(u64, Routing)> {
    let out = run.buf("moe_out", t * h)?;
    let Some(experts) = m.experts.as_ref().filter(|_| exec.is_local()) else {
        let x_host = run.dtoh("xn", t * h)?;
        let (y, r) = host.forward(&x_host, t, exec)?;
        let Run { gpu, scratch, .. } = run;
        let dst = scratch.f32s.get_mut("moe_out").expect("allocated above");
        gpu.stream.memcpy_htod(&y, &mut dst.slice_mut(0..t * h)).map_err(|e| gpu.err("upload", e))?;
        return Ok((out, r));
    };
    let cfg = &host.router.cfg;
    let (e, k) = (cfg.n_experts, cfg.top_k);
    let logits = run.buf("router_logits", t * e)?;
    run.gemm(xn, &m.router, logits, t)?;
    let scratch = run.buf("route_scratch", t * 2 * e)?;
    let ids_dev = run.gpu.stream.alloc_zeros::<u32>(t * k).map_err(|er| run.gpu.err("alloc", er))?;
    let w_dev = run.gpu.alloc(t * k)?;
    {
        let g = &run.gpu;
        let d = g.geom(geometry::route(t))?;
        let (bias, has_bias) = match &m.bias {
            Some(b) => (g.ptr(b), 1i32),
            None => (0u64, 0i32),
        };
        let (ids_p, w_p) = (g.ptr(&ids_dev), g.ptr(&w_dev));
        let (rows, ne, ki) = (t as i32, e as i32, k as i32);
        let scoring = matches!(cfg.scoring, crate::config::Scoring::Sigmoid) as i32;
        let (n_group, topk_group, group_score, masked) = match &cfg.group_limit {
            Some(gl) => (gl.n_group as i32, gl.topk_group as i32, matches!(gl.score, crate::config::GroupScore::SumTop2) as i32, gl.masked_value),
            None => (0, 0, 0, 0.0f32),
        };
        let (norm, norm_eps, scaling) = (cfg.norm_topk_prob as i32, cfg.norm_eps, cfg.routed_scaling_factor);
        g.launch("route_topk", d, |b| {
            args!(b; &logits, &bias, &scratch, &ids_p, &w_p, &rows, &ne, &ki, &scoring, &has_bias, &n_group, &topk_group, &group_score, &masked, &norm, &norm_eps, &scaling)
        })?;
    }
    let ids = run.gpu.stream.clone_dtoh(&ids_dev).map_err(|er| run.gpu.err("download", er))?;
    let weights = run.gpu.stream.clone_dtoh(&w_dev).map_err(|er| run.gpu.err("download", er))?;
    let plan = moe_plan::plan(&ids, &weights, t, k, e, &|_| true, false)
        .map_err(|er| DeviceError::Unsupported { device: run.gpu.device, msg: er.to_string() })?;
    if plan.rows() > 0 {
        let gather = run.gpu.upload_i32(&plan.gather)?;
        let src_row = run.gpu.upload_i32(&plan.src_row)?;
        let pw = run.gpu.upload_f32(&plan.weights)?;
        let xg = run.buf("moe_xg", plan.rows() * h)?;
        let gp = run.gpu.ptr(&gather);
        run.gpu.gather_rows(xn, gp, xg, plan.rows(), h)?;
        let y = run.experts(experts, &plan, xg, h)?;
        let g = &run.gpu;
        let d = g.geom(geometry::per_row(t))?;
        let (sr, wp, tt, ki, hi) = (g.ptr(&src_row), g.ptr(&pw), t as i32, k as i32, h as i32);
        g.launch("combine_rows", d, |b| args!(b; &y, &sr, &wp, &out, &tt, &ki, &hi))?;
    }
    if let Some((f, gate)) = &m.shared {
        let s = dense_ffn(run, f, xn, t, h)?;
        if let Some(gw) = gate {
            let g = &run.gpu;
            let d = g.geom(geometry::per_row(t))?;
            let (gp, rows, hi) = (g.ptr(gw), t as i32, h as i32);
            g.launch("shared_gate", d, |b| args!(b; &xn, &gp, &s, &rows, &hi))?;
        }
        run.gpu.add_inplace(out, s, t * h)?;
    }
    let routing = Routing { top_k: k, ids, weights, alternates: 0, alt_ids: vec![], alt_weights: vec![] };
    Ok((out, routing))
}

/// Final norm and lm head over the rows asked for; per sequence `[rows × vocab]`.
fn head(run: &mut Run, model: &Model, w: &Weights, x: u64, spans: &[SeqSpan], mode: LogitsMode) -> R<Vec<Vec<f32>>> {
    let c = &model.config;
    let (h, v) = (c.hidden_size, c.vocab_size);
    let t: usize = spans.iter().map(|s| s.n).sum();
    let rows: Vec<i32> = match mode {
        LogitsMode::Last => spans.iter().map(|s| (s.offset + s.n - 1) as i32).collect(),
        LogitsMode::All => (0..t as i32).collect(),
    };
    let nr = rows.len();
    let idx = run.gpu.upload_i32(&rows)?;
    let sel = run.buf("head_x", nr * h)?;
    let ip = run.gpu.ptr(&idx);
    run.gpu.gather_rows(x, ip, sel, nr, h)?;
    run.gpu.rmsnorm(sel, &w.norm, sel, nr, h, c.rms_norm_eps)?;
    let logits = run.buf("logits", nr * v)?;
    run.gemm(sel, w.lm_head.as_ref().unwrap_or(&w.embed), logits, nr)?;
    let all = run.dtoh("logits", nr * v)?;
    Ok(match mode {
        LogitsMode::Last => all.chunks(v).map(<[f32]>::to_vec).collect(),
        LogitsMode::All => spans.iter().map(|sp| all[sp.offset * v..(sp.offset + sp.n) * v].to_vec()).collect(),
    })
}
