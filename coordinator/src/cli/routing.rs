//! Reading routing statistics from whatever the user has: a trace (safetensors), a per-token JSONL
//! log, or SGLang's aggregated `logical_count` JSON.
use std::path::Path;

use anyhow::Context;
use placement::{RoutingStats, RoutingTrace};

pub enum Routing {
    Trace(RoutingTrace),
    /// Per-layer expert counts only.
    Counts(Vec<Vec<f64>>),
}

impl Routing {
    pub fn read(path: &Path, num_experts: Option<usize>) -> anyhow::Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let read = || -> anyhow::Result<Self> {
            Ok(match ext {
                "safetensors" => Routing::Trace(RoutingTrace::read(path)?),
                "jsonl" => Routing::Trace(RoutingTrace::import_jsonl(path, num_experts)?),
                "json" => Routing::Counts(placement::trace::read_logical_count(path)?),
                _ => anyhow::bail!(
                    "{}: unknown routing file type (expected .safetensors trace, .jsonl token log or .json logical_count)",
                    path.display()
                ),
            })
        };
        read().with_context(|| format!("reading {}", path.display()))
    }

    /// Statistics with load split by home rank for `ranks` ranks (when the input has tokens).
    pub fn stats(&self, ranks: usize) -> anyhow::Result<RoutingStats> {
        Ok(match self {
            Routing::Trace(t) => RoutingStats::from_trace(t, Some(ranks)),
            Routing::Counts(c) => RoutingStats::from_load(c.clone())?,
        })
    }
}
