//! Reading routing files for the commands: a trace (safetensors), a per-token JSONL log, or
//! SGLang's aggregated `logical_count` JSON, told apart by content (`placement::routing_file`),
//! with the file named in errors.
use std::path::Path;

use anyhow::Context;
use placement::{RoutingFile, RoutingTrace};

/// Whatever routing `path` holds.
pub fn read_routing(path: &Path, num_experts: Option<usize>) -> anyhow::Result<RoutingFile> {
    RoutingFile::read(path, num_experts).with_context(|| format!("reading {}", path.display()))
}

/// A per-token trace: a safetensors trace or a JSONL log (counts alone are refused).
pub fn read_trace(path: &Path) -> anyhow::Result<RoutingTrace> {
    Ok(read_routing(path, None)?.into_trace(path)?)
}
