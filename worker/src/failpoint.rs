#![forbid(unsafe_code)]
//! Failpoints for fault-injection tests (after TiKV's): named places in the code that fail or
//! stall on demand. `SWITCHYARD_FAILPOINTS=name[,name=sleep(MS)...]` (read once per process)
//! makes [`check`]`(name)` return [`ModelError::Failpoint`], or, with `=sleep(MS)`, wait that
//! many milliseconds and go on (to widen a window another fault must hit). Unset, every check is
//! a no-op.

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

/// Fails (or stalls, `name=sleep(MS)`) when the failpoint `name` is switched on for this process.
pub fn check(name: &str) -> Result<()> {
    for a in active() {
        if a == name {
            return Err(ModelError::Failpoint(name.to_string()));
        }
        if let Some(ms) = a.strip_prefix(name).and_then(|r| r.strip_prefix("=sleep(")).and_then(|r| r.strip_suffix(')')) {
            let ms: u64 = ms.parse().map_err(|_| ModelError::Failpoint(format!("{a}: sleep takes milliseconds")))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    Ok(())
}
