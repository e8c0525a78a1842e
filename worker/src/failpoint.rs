#![forbid(unsafe_code)]
//! Failpoints for fault-injection tests (after TiKV's): named places in the code that fail on
//! demand. `SWITCHYARD_FAILPOINTS=name[,name...]` (read once per process) makes
//! [`check`]`(name)` return [`ModelError::Failpoint`]. Unset, every check is a no-op.

use crate::error::{ModelError, Result};
use std::sync::OnceLock;

fn active() -> &'static [String] {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        std::env::var("SWITCHYARD_FAILPOINTS")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    })
}

/// Fails when the failpoint `name` is switched on for this process.
pub fn check(name: &str) -> Result<()> {
    if active().iter().any(|a| a == name) {
        return Err(ModelError::Failpoint(name.to_string()));
    }
    Ok(())
}
