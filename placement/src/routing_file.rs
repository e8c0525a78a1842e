//! Routing statistics from whatever file a user has, told apart by content, not by name: a
//! routing trace (safetensors: an 8-byte little-endian header length, then a JSON header), a
//! per-token JSONL log, or SGLang's aggregated `logical_count` JSON (an array, or an object with
//! a `logical_count` key).

use std::path::Path;

use crate::error::TraceError;
use crate::stats::RoutingStats;
use crate::trace::{RoutingTrace, parse_logical_count};

/// The kinds of routing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingFormat {
    Safetensors,
    Jsonl,
    LogicalCount,
}

/// What a routing file holds.
#[derive(Debug, Clone)]
pub enum RoutingFile {
    /// Per-token routing (a trace or a JSONL log).
    Trace(RoutingTrace),
    /// Per-layer expert counts only (`logical_count`).
    Counts(Vec<Vec<f64>>),
}

/// The format of a routing file from its bytes; `None` when it is none of them.
pub fn detect(bytes: &[u8]) -> Option<RoutingFormat> {
    if let Some(head) = bytes.get(..8) {
        let n = u64::from_le_bytes(head.try_into().ok()?);
        if n >= 2 && n <= (bytes.len() - 8) as u64 && bytes.get(8) == Some(&b'{') {
            return Some(RoutingFormat::Safetensors);
        }
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let body = text.trim_start();
    match body.as_bytes().first()? {
        b'[' => Some(RoutingFormat::LogicalCount),
        b'{' => {
            // One JSON object with `logical_count` is the aggregate; anything else that starts
            // with an object is a log of one object per line (a one-line log parses whole too).
            let whole: Option<serde_json::Value> = serde_json::from_str(body).ok();
            if whole.as_ref().is_some_and(|v| v.get("logical_count").is_some()) {
                Some(RoutingFormat::LogicalCount)
            } else {
                Some(RoutingFormat::Jsonl)
            }
        }
        _ => None,
    }
}

impl RoutingFile {
    /// Reads `path`, whatever it is called. `num_experts` is for JSONL logs (default: the largest
    /// expert id + 1).
    pub fn read(path: &Path, num_experts: Option<usize>) -> Result<Self, TraceError> {
        let bytes = std::fs::read(path).map_err(|source| TraceError::Io { path: path.into(), source })?;
        Self::from_bytes(&bytes, path, num_experts)
    }

    /// [`Self::read`] from bytes; `path` only names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path, num_experts: Option<usize>) -> Result<Self, TraceError> {
        let text = || std::str::from_utf8(bytes).map_err(|e| TraceError::Invalid(format!("{}: not UTF-8 text: {e}", path.display())));
        match detect(bytes) {
            Some(RoutingFormat::Safetensors) => Ok(RoutingFile::Trace(RoutingTrace::from_bytes(bytes, path)?)),
            Some(RoutingFormat::Jsonl) => Ok(RoutingFile::Trace(RoutingTrace::parse_jsonl(text()?, path, num_experts)?)),
            Some(RoutingFormat::LogicalCount) => Ok(RoutingFile::Counts(parse_logical_count(text()?, path)?)),
            None => Err(TraceError::Invalid(format!(
                "{}: not a routing file: neither a safetensors trace, a JSONL token log nor a logical_count JSON ({} bytes{})",
                path.display(),
                bytes.len(),
                if bytes.is_empty() { "" } else { ", starting with something else" }
            ))),
        }
    }

    /// Its statistics, load split by home rank for `ranks` ranks when it has tokens.
    pub fn stats(&self, ranks: usize) -> Result<RoutingStats, TraceError> {
        match self {
            RoutingFile::Trace(t) => Ok(RoutingStats::from_trace(t, Some(ranks))),
            RoutingFile::Counts(c) => RoutingStats::from_load(c.clone()),
        }
    }

    /// The per-token trace; an error naming the file when it holds only counts.
    pub fn into_trace(self, path: &Path) -> Result<RoutingTrace, TraceError> {
        match self {
            RoutingFile::Trace(t) => Ok(t),
            RoutingFile::Counts(_) => Err(TraceError::Invalid(format!(
                "{}: holds only per-layer expert counts (logical_count); this needs per-token routing (a trace or a JSONL log)",
                path.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_by_content() {
        let mut st = 10u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{\"a\":1}   ");
        assert_eq!(detect(&st), Some(RoutingFormat::Safetensors));
        assert_eq!(detect(b"  [[1,2],[3,4]]"), Some(RoutingFormat::LogicalCount));
        assert_eq!(detect(b"{\"logical_count\": [[1]]}"), Some(RoutingFormat::LogicalCount));
        assert_eq!(detect(b"{\"problem_id\":0,\"token_idx\":0,\"layer\":0,\"experts\":[1]}\n{\"problem_id\":0}"), Some(RoutingFormat::Jsonl));
        assert_eq!(detect(b"{\"problem_id\":0,\"token_idx\":0,\"layer\":0,\"experts\":[1]}"), Some(RoutingFormat::Jsonl));
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"hello"), None);
        assert_eq!(detect(&[0xff, 0xfe, 0, 1]), None);
        // A length that runs past the end is not a safetensors header.
        let mut short = 1000u64.to_le_bytes().to_vec();
        short.extend_from_slice(b"{}");
        assert_eq!(detect(&short), None);
    }

    #[test]
    fn a_logical_count_is_not_a_trace() {
        let p = Path::new("counts.st");
        let f = RoutingFile::from_bytes(b"[[1,2],[3,4]]", p, None).expect("counts");
        assert!(matches!(f, RoutingFile::Counts(ref c) if c.len() == 2));
        let e = f.into_trace(p).expect_err("only counts");
        assert!(e.to_string().contains("per-token routing"), "{e}");
        let e = RoutingFile::from_bytes(b"garbage", p, None).expect_err("not routing");
        assert!(e.to_string().contains("not a routing file"), "{e}");
    }
}
