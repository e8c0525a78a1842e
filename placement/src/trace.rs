//! Routing traces: which experts every token chose at every MoE layer.
//!
//! On disk a trace is a safetensors file with `topk_ids` (I32 `[tokens, moe_layers, k]`; I64 is also
//! accepted on read), optional `topk_weights` (F32, same shape), optional `seq_ids` (I64 `[tokens]`;
//! I32 accepted on read) and metadata `num_experts`. Other tensors are ignored.
//!
//! Also here: import of per-token JSONL routing logs ([`RoutingTrace::import_jsonl`]), of SGLang's
//! expert-distribution statistics ([`read_logical_count`]) and a held-out split by sequence
//! ([`RoutingTrace::split_by_sequence`]).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::TraceError;

/// Largest expert count accepted (statistics allocate `E x E` per layer).
pub const MAX_EXPERTS: usize = 1 << 16;
/// Largest MoE layer count accepted from a JSONL import.
pub const MAX_LAYERS: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTrace {
    pub num_experts: usize,
    pub num_layers: usize,
    pub top_k: usize,
    /// `[tokens][layers][k]`, flattened; `[t, l, 0]` is the primary (highest-weight) expert.
    pub topk_ids: Vec<u32>,
    pub topk_weights: Option<Vec<f32>>,
    /// Sequence of every token. Absent: every token is its own sequence.
    pub seq_ids: Option<Vec<i64>>,
}

impl RoutingTrace {
    pub fn num_tokens(&self) -> usize {
        if self.num_layers == 0 || self.top_k == 0 { 0 } else { self.topk_ids.len() / (self.num_layers * self.top_k) }
    }

    /// The k experts of token `t` at layer `l`.
    pub fn experts(&self, t: usize, l: usize) -> &[u32] {
        let s = (t * self.num_layers + l) * self.top_k;
        &self.topk_ids[s..s + self.top_k]
    }

    pub fn seq_id(&self, t: usize) -> i64 {
        self.seq_ids.as_ref().map_or(t as i64, |s| s[t])
    }

    /// The rank a token's sequence lives on in home mode: `seq_id mod ranks`.
    pub fn home_rank(&self, t: usize, ranks: usize) -> usize {
        self.seq_id(t).rem_euclid(ranks as i64) as usize
    }

    /// Checks the invariants every consumer relies on (for traces built in memory; [`Self::read`]
    /// already guarantees them): at least one layer, expert, choice and token; `topk_ids` a whole
    /// number of tokens; ids in `0..num_experts`; weights (when present) of the same length, finite
    /// and non-negative; sequence ids (when present) one per token.
    pub fn validate(&self) -> Result<(), TraceError> {
        let bad = |m: String| Err(TraceError::Invalid(m));
        if self.num_layers == 0 {
            return bad("num_layers is 0".into());
        }
        if self.top_k == 0 {
            return bad("top_k is 0".into());
        }
        if self.num_experts == 0 {
            return bad("num_experts is 0".into());
        }
        if self.num_experts > MAX_EXPERTS {
            return bad(format!("num_experts {} exceeds the supported {MAX_EXPERTS}", self.num_experts));
        }
        if self.top_k > self.num_experts {
            return bad(format!("top_k {} exceeds num_experts {}", self.top_k, self.num_experts));
        }
        let per_token = self.num_layers * self.top_k;
        if !self.topk_ids.len().is_multiple_of(per_token) {
            return bad(format!(
                "topk_ids has {} entries, not a multiple of layers x k = {per_token}",
                self.topk_ids.len()
            ));
        }
        let tokens = self.num_tokens();
        if tokens == 0 {
            return bad("trace has no tokens".into());
        }
        if let Some(i) = self.topk_ids.iter().position(|&e| e as usize >= self.num_experts) {
            let (t, l, j) = self.index_of(i);
            return bad(format!(
                "topk_ids[{t}, {l}, {j}] = {} is out of range (num_experts {})",
                self.topk_ids[i], self.num_experts
            ));
        }
        if let Some(w) = &self.topk_weights {
            if w.len() != self.topk_ids.len() {
                return bad(format!(
                    "topk_weights has {} entries, topk_ids has {}",
                    w.len(),
                    self.topk_ids.len()
                ));
            }
            if let Some(i) = w.iter().position(|v| !v.is_finite() || *v < 0.0) {
                let (t, l, j) = self.index_of(i);
                return bad(format!("topk_weights[{t}, {l}, {j}] = {} is not a finite non-negative weight", w[i]));
            }
        }
        if let Some(s) = self.seq_ids.as_ref().filter(|s| s.len() != tokens) {
            return bad(format!("seq_ids has {} entries for {tokens} tokens", s.len()));
        }
        Ok(())
    }

    fn index_of(&self, flat: usize) -> (usize, usize, usize) {
        let k = self.top_k.max(1);
        let l = self.num_layers.max(1);
        (flat / (k * l), (flat / k) % l, flat % k)
    }

    /// Reads and validates a trace file.
    ///
    /// `num_experts` comes from the `__metadata__` entry `num_experts`; when that entry is absent it
    /// is inferred as the largest expert id in the file + 1 (which undercounts when the highest
    /// experts were never chosen — write the metadata when the true count is known).
    ///
    /// Errors: unreadable file → `Io`; truncated or garbage bytes → `Safetensors`; no `topk_ids` →
    /// `MissingTensor`; wrong dtype, rank or shape, negative or out-of-range ids, NaN / infinite /
    /// negative weights → `BadTensor`; zero tokens, layers or choices → `Invalid`.
    pub fn read(path: &Path) -> Result<Self, TraceError> {
        let bytes = std::fs::read(path).map_err(|source| TraceError::Io { path: path.into(), source })?;
        Self::from_bytes(&bytes, path)
    }

    /// [`Self::read`] from bytes in memory; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, TraceError> {
        let st_err = |e: safetensors::SafeTensorError| TraceError::Safetensors {
            path: path.into(),
            reason: e.to_string(),
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(st_err)?;
        let st = SafeTensors::deserialize(bytes).map_err(st_err)?;

        let declared_experts = match meta.metadata().as_ref().and_then(|m| m.get("num_experts")) {
            None => None,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_EXPERTS).contains(&n) => Some(n),
                _ => {
                    return Err(TraceError::Invalid(format!(
                        "{}: metadata num_experts = {v:?} is not an integer in 1..={MAX_EXPERTS}",
                        path.display()
                    )));
                }
            },
        };

        let ids_view = st.tensor("topk_ids").map_err(|_| TraceError::MissingTensor {
            path: path.into(),
            name: "topk_ids".into(),
        })?;
        let shape = ids_view.shape().to_vec();
        if shape.len() != 3 {
            return Err(bad_tensor(
                "topk_ids",
                format!("expected rank 3 [tokens, moe_layers, k], got shape {shape:?}"),
            ));
        }
        let (tokens, layers, k) = (shape[0], shape[1], shape[2]);
        if tokens == 0 {
            return Err(TraceError::Invalid(format!("{}: topk_ids has zero tokens", path.display())));
        }
        if layers == 0 || k == 0 {
            return Err(bad_tensor("topk_ids", format!("shape {shape:?} has no layers or no choices")));
        }
        let raw_ids = read_ints(&ids_view, "topk_ids")?;
        let mut max_id = 0i64;
        for (i, &v) in raw_ids.iter().enumerate() {
            if v < 0 {
                let (t, l, j) = (i / (k * layers), (i / k) % layers, i % k);
                return Err(bad_tensor("topk_ids", format!("topk_ids[{t}, {l}, {j}] = {v} is negative")));
            }
            max_id = max_id.max(v);
        }
        let num_experts = match declared_experts {
            Some(n) => {
                if let Some(i) = raw_ids.iter().position(|&v| v as u64 >= n as u64) {
                    let (t, l, j) = (i / (k * layers), (i / k) % layers, i % k);
                    return Err(bad_tensor(
                        "topk_ids",
                        format!("topk_ids[{t}, {l}, {j}] = {} is out of range (num_experts {n})", raw_ids[i]),
                    ));
                }
                n
            }
            None => {
                if max_id as u64 >= MAX_EXPERTS as u64 {
                    return Err(bad_tensor(
                        "topk_ids",
                        format!("expert id {max_id} exceeds the supported {MAX_EXPERTS} experts"),
                    ));
                }
                max_id as usize + 1
            }
        };
        if k > num_experts {
            return Err(bad_tensor("topk_ids", format!("k = {k} exceeds num_experts {num_experts}")));
        }
        let topk_ids: Vec<u32> = raw_ids.iter().map(|&v| v as u32).collect();

        let topk_weights = match st.tensor("topk_weights") {
            Err(_) => None,
            Ok(w) => {
                if w.shape() != shape.as_slice() {
                    return Err(bad_tensor(
                        "topk_weights",
                        format!("shape {:?} does not match topk_ids {shape:?}", w.shape()),
                    ));
                }
                let vals = read_floats(&w, "topk_weights")?;
                if let Some(i) = vals.iter().position(|v| !v.is_finite() || *v < 0.0) {
                    let (t, l, j) = (i / (k * layers), (i / k) % layers, i % k);
                    return Err(bad_tensor(
                        "topk_weights",
                        format!("topk_weights[{t}, {l}, {j}] = {} is not a finite non-negative weight", vals[i]),
                    ));
                }
                Some(vals)
            }
        };

        let seq_ids = match st.tensor("seq_ids") {
            Err(_) => None,
            Ok(s) => {
                if s.shape() != [tokens] {
                    return Err(bad_tensor(
                        "seq_ids",
                        format!("expected shape [{tokens}] (one per token), got {:?}", s.shape()),
                    ));
                }
                Some(read_ints(&s, "seq_ids")?)
            }
        };

        let trace = Self { num_experts, num_layers: layers, top_k: k, topk_ids, topk_weights, seq_ids };
        trace.validate()?;
        Ok(trace)
    }

    /// Writes the trace (validated first) as safetensors: `topk_ids` I32, `topk_weights` F32 and
    /// `seq_ids` I64 when present, metadata `num_experts`. [`Self::read`] gives it back unchanged.
    pub fn write(&self, path: &Path) -> Result<(), TraceError> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| TraceError::Io { path: path.into(), source })
    }

    /// The safetensors bytes [`Self::write`] writes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, TraceError> {
        self.validate()?;
        let tokens = self.num_tokens();
        let shape = vec![tokens, self.num_layers, self.top_k];
        let ids: Vec<u8> = self.topk_ids.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect();
        let weights: Option<Vec<u8>> =
            self.topk_weights.as_ref().map(|w| w.iter().flat_map(|v| v.to_le_bytes()).collect());
        let seqs: Option<Vec<u8>> =
            self.seq_ids.as_ref().map(|s| s.iter().flat_map(|v| v.to_le_bytes()).collect());
        let ser = |e: safetensors::SafeTensorError| TraceError::Invalid(format!("cannot serialise trace: {e}"));
        let mut views = vec![("topk_ids".to_string(), TensorView::new(Dtype::I32, shape.clone(), &ids).map_err(ser)?)];
        if let Some(w) = &weights {
            views.push(("topk_weights".to_string(), TensorView::new(Dtype::F32, shape.clone(), w).map_err(ser)?));
        }
        if let Some(s) = &seqs {
            views.push(("seq_ids".to_string(), TensorView::new(Dtype::I64, vec![tokens], s).map_err(ser)?));
        }
        let meta = HashMap::from([("num_experts".to_string(), self.num_experts.to_string())]);
        safetensors::serialize(views, Some(meta)).map_err(ser)
    }

    /// Imports a JSONL routing log: one object per line,
    /// `{"problem_id": P, "layer": L, "experts": [e0, e1, ...], "token_idx": T}` (`problem_id` a
    /// string or an integer; `experts` primary first). Lines are grouped into tokens by
    /// `(problem_id, token_idx)` in order of first appearance; every problem becomes one sequence
    /// (sequence ids `0, 1, ...` in order of first appearance). Every token must list every layer
    /// `0..=max layer` exactly once, all lines with the same number of experts. Blank lines are
    /// skipped. `num_experts` defaults to the largest id + 1.
    pub fn import_jsonl(path: &Path, num_experts: Option<usize>) -> Result<Self, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.into(), source })?;
        Self::parse_jsonl(&text, path, num_experts)
    }

    /// [`Self::import_jsonl`] from text; `path` only names the source in errors.
    pub fn parse_jsonl(text: &str, path: &Path, num_experts: Option<usize>) -> Result<Self, TraceError> {
        if let Some(n) = num_experts.filter(|&n| n == 0 || n > MAX_EXPERTS) {
            return Err(TraceError::Invalid(format!("num_experts {n} is not in 1..={MAX_EXPERTS}")));
        }
        let bad_line = |line: usize, reason: String| TraceError::BadLine { path: path.into(), line, reason };

        #[derive(Clone, PartialEq, Eq, Hash)]
        enum Pid {
            Str(String),
            Int(i64),
        }
        impl std::fmt::Display for Pid {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self {
                    Pid::Str(s) => write!(f, "{s:?}"),
                    Pid::Int(i) => write!(f, "{i}"),
                }
            }
        }
        struct Tok {
            problem: usize,
            token_idx: i64,
            /// `layers[l]` = (line number, experts)
            layers: Vec<Option<(usize, Vec<u32>)>>,
        }

        let mut problems: Vec<Pid> = Vec::new();
        let mut problem_index: HashMap<Pid, usize> = HashMap::new();
        let mut tokens: Vec<Tok> = Vec::new();
        let mut token_index: HashMap<(usize, i64), usize> = HashMap::new();
        let mut k: Option<(usize, usize)> = None; // (k, line that set it)
        let mut max_layer = 0usize;
        let mut max_id = 0u32;

        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let s = raw.trim();
            if s.is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(s).map_err(|e| bad_line(line, format!("invalid JSON: {e}")))?;
            let obj = v.as_object().ok_or_else(|| bad_line(line, "expected a JSON object".into()))?;
            let field = |name: &str| obj.get(name).ok_or_else(|| bad_line(line, format!("missing field `{name}`")));
            let pid = match field("problem_id")? {
                serde_json::Value::String(s) => Pid::Str(s.clone()),
                n @ serde_json::Value::Number(_) => Pid::Int(
                    n.as_i64().ok_or_else(|| bad_line(line, format!("problem_id {n} is not an integer")))?,
                ),
                other => return Err(bad_line(line, format!("problem_id must be a string or integer, got {other}"))),
            };
            let layer_v = field("layer")?;
            let layer = layer_v
                .as_u64()
                .filter(|&l| (l as usize) < MAX_LAYERS)
                .ok_or_else(|| bad_line(line, format!("layer {layer_v} is not an integer in 0..{MAX_LAYERS}")))?
                as usize;
            let tok_v = field("token_idx")?;
            let token_idx = tok_v
                .as_i64()
                .ok_or_else(|| bad_line(line, format!("token_idx {tok_v} is not an integer")))?;
            let ex_v = field("experts")?;
            let arr = ex_v.as_array().ok_or_else(|| bad_line(line, format!("experts must be an array, got {ex_v}")))?;
            if arr.is_empty() {
                return Err(bad_line(line, "experts is empty".into()));
            }
            let mut experts = Vec::with_capacity(arr.len());
            for e in arr {
                let id = e
                    .as_u64()
                    .ok_or_else(|| bad_line(line, format!("expert id {e} is not a non-negative integer")))?;
                let limit = num_experts.unwrap_or(MAX_EXPERTS) as u64;
                if id >= limit {
                    return Err(bad_line(line, format!("expert id {id} is out of range (num_experts {limit})")));
                }
                experts.push(id as u32);
                max_id = max_id.max(id as u32);
            }
            match k {
                None => k = Some((experts.len(), line)),
                Some((k0, l0)) if k0 != experts.len() => {
                    return Err(bad_line(
                        line,
                        format!("{} experts, but line {l0} has {k0} (k must be the same everywhere)", experts.len()),
                    ));
                }
                _ => {}
            }
            let p = *problem_index.entry(pid.clone()).or_insert_with(|| {
                problems.push(pid.clone());
                problems.len() - 1
            });
            let t = *token_index.entry((p, token_idx)).or_insert_with(|| {
                tokens.push(Tok { problem: p, token_idx, layers: Vec::new() });
                tokens.len() - 1
            });
            let tok = &mut tokens[t];
            if tok.layers.len() <= layer {
                tok.layers.resize(layer + 1, None);
            }
            if let Some((first, _)) = &tok.layers[layer] {
                return Err(bad_line(
                    line,
                    format!("problem {pid} token {token_idx} layer {layer} appears twice (first on line {first})"),
                ));
            }
            tok.layers[layer] = Some((line, experts));
            max_layer = max_layer.max(layer);
        }

        let Some((k, _)) = k else {
            return Err(TraceError::Invalid(format!("{}: no routing records", path.display())));
        };
        let num_layers = max_layer + 1;
        let num_experts = num_experts.unwrap_or(max_id as usize + 1);
        if k > num_experts {
            return Err(TraceError::Invalid(format!("k = {k} exceeds num_experts {num_experts}")));
        }
        let mut topk_ids = Vec::with_capacity(tokens.len() * num_layers * k);
        let mut seq_ids = Vec::with_capacity(tokens.len());
        for tok in &tokens {
            for l in 0..num_layers {
                match tok.layers.get(l).and_then(Option::as_ref) {
                    Some((_, ex)) => topk_ids.extend_from_slice(ex),
                    None => {
                        return Err(TraceError::Invalid(format!(
                            "{}: problem {} token {} has no record for layer {l} (layers are 0..{num_layers})",
                            path.display(),
                            problems[tok.problem],
                            tok.token_idx
                        )));
                    }
                }
            }
            seq_ids.push(tok.problem as i64);
        }
        let trace =
            Self { num_experts, num_layers, top_k: k, topk_ids, topk_weights: None, seq_ids: Some(seq_ids) };
        trace.validate()?;
        Ok(trace)
    }

    /// Distinct sequence ids in order of first appearance.
    pub fn sequences(&self) -> Vec<i64> {
        let mut seen = std::collections::HashSet::new();
        (0..self.num_tokens()).map(|t| self.seq_id(t)).filter(|s| seen.insert(*s)).collect()
    }

    /// Splits whole sequences into `(kept, held_out)`: `round(holdout_fraction x sequences)` sequences,
    /// chosen by `seed`, go to the held-out side, the rest stay; token order is kept on both sides.
    /// With two or more sequences and `0 < holdout_fraction < 1` each side gets at least one sequence.
    /// A side with no sequences is a trace with zero tokens (same shape otherwise); `holdout_fraction`
    /// is clamped to `0..=1` (NaN counts as 0).
    pub fn split_by_sequence(&self, holdout_fraction: f64, seed: u64) -> (RoutingTrace, RoutingTrace) {
        let mut seqs = self.sequences();
        let n = seqs.len();
        let f = if holdout_fraction.is_nan() { 0.0 } else { holdout_fraction.clamp(0.0, 1.0) };
        let mut count = (f * n as f64).round() as usize;
        if n >= 2 && f > 0.0 && f < 1.0 {
            count = count.clamp(1, n - 1);
        }
        seqs.shuffle(&mut StdRng::seed_from_u64(seed));
        let held: std::collections::HashSet<i64> = seqs[..count.min(n)].iter().copied().collect();
        let per_token = self.num_layers * self.top_k;
        let empty = || RoutingTrace {
            num_experts: self.num_experts,
            num_layers: self.num_layers,
            top_k: self.top_k,
            topk_ids: Vec::new(),
            topk_weights: self.topk_weights.as_ref().map(|_| Vec::new()),
            seq_ids: Some(Vec::new()),
        };
        let (mut keep, mut out) = (empty(), empty());
        for t in 0..self.num_tokens() {
            let s = self.seq_id(t);
            let side = if held.contains(&s) { &mut out } else { &mut keep };
            side.topk_ids.extend_from_slice(&self.topk_ids[t * per_token..(t + 1) * per_token]);
            if let (Some(dst), Some(src)) = (side.topk_weights.as_mut(), self.topk_weights.as_ref()) {
                dst.extend_from_slice(&src[t * per_token..(t + 1) * per_token]);
            }
            if let Some(dst) = side.seq_ids.as_mut() {
                dst.push(s);
            }
        }
        (keep, out)
    }
}

fn bad_tensor(name: &str, reason: String) -> TraceError {
    TraceError::BadTensor { name: name.into(), reason }
}

fn read_ints(view: &TensorView<'_>, name: &str) -> Result<Vec<i64>, TraceError> {
    let data = view.data();
    match view.dtype() {
        Dtype::I32 => Ok(data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect()),
        Dtype::I64 => Ok(data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect()),
        d => Err(bad_tensor(name, format!("dtype {d:?} is not I32 or I64"))),
    }
}

fn read_floats(view: &TensorView<'_>, name: &str) -> Result<Vec<f32>, TraceError> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => Ok(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
        d => Err(bad_tensor(name, format!("dtype {d:?} is not F32"))),
    }
}

/// Reads SGLang's expert-distribution statistics (JSON): either a bare `[layers][experts]` array of
/// counts, or an object whose `logical_count` is `[layers][experts]` or `[steps][layers][experts]`
/// (summed over steps). Counts must be finite, non-negative numbers and every row the same length.
pub fn read_logical_count(path: &Path) -> Result<Vec<Vec<f64>>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.into(), source })?;
    parse_logical_count(&text, path)
}

/// [`read_logical_count`] from text; `path` only names the source in errors.
pub fn parse_logical_count(text: &str, path: &Path) -> Result<Vec<Vec<f64>>, TraceError> {
    let p: PathBuf = path.into();
    let err = |m: String| TraceError::Invalid(format!("{}: {m}", p.display()));
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let counts = match &v {
        serde_json::Value::Array(_) => &v,
        serde_json::Value::Object(o) => {
            o.get("logical_count").ok_or_else(|| err("object has no `logical_count` key".into()))?
        }
        _ => return Err(err("expected a JSON array or an object with `logical_count`".into())),
    };
    let outer = counts.as_array().ok_or_else(|| err("logical_count is not an array".into()))?;
    if outer.is_empty() {
        return Err(err("logical_count is empty".into()));
    }
    let depth3 = outer[0].as_array().and_then(|a| a.first()).is_some_and(|x| x.is_array());
    let steps: Vec<&serde_json::Value> = if depth3 { outer.iter().collect() } else { vec![counts] };
    let mut sum: Option<Vec<Vec<f64>>> = None;
    for (s, step) in steps.iter().enumerate() {
        let at = |l: usize, e: usize| if depth3 { format!("[{s}][{l}][{e}]") } else { format!("[{l}][{e}]") };
        let rows = step
            .as_array()
            .ok_or_else(|| err(format!("logical_count[{s}] is not an array of layers")))?;
        if rows.is_empty() {
            return Err(err(if depth3 { format!("logical_count[{s}] has no layers") } else { "no layers".into() }));
        }
        let mut m = Vec::with_capacity(rows.len());
        for (l, row) in rows.iter().enumerate() {
            let row = row.as_array().ok_or_else(|| {
                let which = if depth3 { format!("[{s}][{l}]") } else { format!("[{l}]") };
                err(format!("logical_count{which} is not an array of expert counts (ragged nesting)"))
            })?;
            let mut r = Vec::with_capacity(row.len());
            for (e, x) in row.iter().enumerate() {
                let val = x.as_f64().ok_or_else(|| err(format!("logical_count{} = {x} is not a number", at(l, e))))?;
                if !val.is_finite() || val < 0.0 {
                    return Err(err(format!("logical_count{} = {val} is negative", at(l, e))));
                }
                r.push(val);
            }
            m.push(r);
        }
        let experts = m[0].len();
        if experts == 0 {
            return Err(err("layer 0 has no experts".into()));
        }
        if let Some(l) = m.iter().position(|r| r.len() != experts) {
            return Err(err(format!("ragged: layer {l} has {} experts, layer 0 has {experts}", m[l].len())));
        }
        match &mut sum {
            None => sum = Some(m),
            Some(acc) => {
                if acc.len() != m.len() || acc[0].len() != experts {
                    return Err(err(format!(
                        "ragged: step {s} is {} x {experts}, step 0 is {} x {}",
                        m.len(),
                        acc.len(),
                        acc[0].len()
                    )));
                }
                for (a, b) in acc.iter_mut().zip(&m) {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                }
            }
        }
    }
    sum.ok_or_else(|| err("logical_count is empty".into()))
}
