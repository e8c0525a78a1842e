#![forbid(unsafe_code)]
//! Reference outputs (`expected.safetensors`) and the comparison metric used by
//! `switchyard model check` and the tests.

use crate::error::{ModelError, Result};
use crate::backend::Backend;
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// One reference case: a prompt, its full-sequence logits and its greedy continuation.
#[derive(Debug, Clone)]
pub struct RefCase {
    pub index: usize,
    pub prompt: Vec<u32>,
    /// `[len × vocab]`
    pub logits: Vec<f32>,
    pub greedy: Vec<u32>,
}

fn bad(path: &Path, msg: String) -> ModelError {
    ModelError::Safetensors { path: path.to_path_buf(), msg }
}

/// Read every `prompt_<i>` / `logits_<i>` / `greedy_<i>` of an expected-outputs file.
pub fn read_expected(path: &Path) -> Result<Vec<RefCase>> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
    let ints = |name: &str| -> Result<Vec<u32>> {
        let t = st.tensor(name).map_err(|e| bad(path, format!("{name}: {e}")))?;
        if t.dtype() != Dtype::I64 {
            return Err(bad(path, format!("{name} is {:?}, expected I64", t.dtype())));
        }
        t.data()
            .chunks_exact(8)
            .map(|b| {
                let v = i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                u32::try_from(v).map_err(|_| bad(path, format!("{name} holds {v}")))
            })
            .collect()
    };
    let mut out = Vec::new();
    for i in 0.. {
        let pn = format!("prompt_{i}");
        if st.tensor(&pn).is_err() {
            break;
        }
        let ln = format!("logits_{i}");
        let t = st.tensor(&ln).map_err(|e| bad(path, format!("{ln}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(path, format!("{ln} is {:?}, expected F32", t.dtype())));
        }
        let logits = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        out.push(RefCase { index: i, prompt: ints(&pn)?, logits, greedy: ints(&format!("greedy_{i}"))? });
    }
    Ok(out)
}

/// `max |a - b| / max |b|`.
pub fn rel_max_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    // A NaN on either side is an infinite difference (f32::max alone would drop it).
    let md = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) });
    let mx = b.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    if mx == 0.0 { md } else { md / mx }
}

/// Result of checking one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub index: usize,
    pub prompt_len: usize,
    pub logits_rel_diff: f32,
    pub greedy: Vec<u32>,
    pub greedy_ok: bool,
}

/// Run one case on `model` (any backend): full-sequence logits and greedy generation with the
/// KV cache.
pub fn check_case(model: &dyn Backend, case: &RefCase) -> Result<CaseResult> {
    let logits = model.logits(&case.prompt)?;
    let d = rel_max_diff(&logits, &case.logits);
    let greedy = model.generate_greedy(&case.prompt, case.greedy.len())?;
    Ok(CaseResult {
        index: case.index,
        prompt_len: case.prompt.len(),
        logits_rel_diff: d,
        greedy_ok: greedy == case.greedy,
        greedy,
    })
}

#[cfg(test)]
mod tests {
    use super::rel_max_diff;

    #[test]
    fn a_nan_is_an_infinite_difference() {
        assert_eq!(rel_max_diff(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_max_diff(&[1.0, 2.5], &[1.0, 2.0]) - 0.25).abs() < 1e-7);
        assert_eq!(rel_max_diff(&[f32::NAN, 2.0], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(rel_max_diff(&[1.0, 2.0], &[1.0, f32::NAN]), f32::INFINITY);
        assert_eq!(rel_max_diff(&[1.0], &[1.0, 2.0]), f32::INFINITY);
    }
}
