//! Reading routing statistics from whatever the user has: a trace (safetensors), a per-token JSONL
//! log, or SGLang's aggregated `logical_count` JSON, told apart by content.
use std::path::Path;

use anyhow::Context;
use placement::{RoutingFile, RoutingStats, RoutingTrace};

pub enum Routing {
    Trace(RoutingTrace),
    /// Per-layer expert counts only.
    Counts(Vec<Vec<f64>>),
}

impl Routing {
    /// Reads `path`, told by its content whatever it is called (`placement::routing_file`).
    pub fn read(path: &Path, num_experts: Option<usize>) -> anyhow::Result<Self> {
        let f = RoutingFile::read(path, num_experts).with_context(|| format!("reading {}", path.display()))?;
        Ok(match f {
            RoutingFile::Trace(t) => Routing::Trace(t),
            RoutingFile::Counts(c) => Routing::Counts(c),
        })
    }

    /// Statistics with load split by home rank for `ranks` ranks (when the input has tokens).
    pub fn stats(&self, ranks: usize) -> anyhow::Result<RoutingStats> {
        Ok(match self {
            Routing::Trace(t) => RoutingStats::from_trace(t, Some(ranks)),
            Routing::Counts(c) => RoutingStats::from_load(c.clone())?,
        })
    }
}
