//! Pinning a worker to CPU cores (`switchyard worker --cpu-affinity 0-3`).
//!
//! Ranks that share a machine should each own their cores: a rank that waits for a straggler at a
//! collective otherwise lends its cores to it, and wall-clock steps then hide the imbalance that
//! a machine of one accelerator per rank would show. The kernel's affinity is per thread and new
//! threads inherit their creator's, so [`pin_process`] sets it on every thread the process has
//! (`/proc/self/task`) — the compute pool, the runtime and library threads started so far — and
//! every thread started later inherits it. Call it before the compute pool starts.

use std::fmt;

/// Why a CPU list could not be parsed or applied.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error("CPU list {list:?}: {why}")]
    Parse { list: String, why: String },
    #[error("CPU {cpu} is beyond what this platform can pin (at most {max})")]
    OutOfRange { cpu: usize, max: usize },
    #[error("pinning thread {tid} to CPUs {cpus}: {source}")]
    Pin { tid: i32, cpus: CpuList, source: std::io::Error },
    #[error("listing this process's threads: {0}")]
    Threads(std::io::Error),
    #[error("CPU pinning is not supported on this platform")]
    Unsupported,
}

/// A set of CPU indices, sorted and without duplicates; written as `0-3,6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// Parses `0-3,6,8-9` (ranges inclusive). Empty lists, reversed ranges and junk are errors.
    pub fn parse(list: &str) -> Result<Self, AffinityError> {
        let bad = |why: String| AffinityError::Parse { list: list.to_string(), why };
        let mut cpus = Vec::new();
        for part in list.split(',').map(str::trim) {
            let num = |s: &str| s.trim().parse::<usize>().map_err(|_| bad(format!("{s:?} is not a CPU index")));
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(bad(format!("range {a}-{b} runs backwards")));
                    }
                    cpus.extend(a..=b);
                }
                None => cpus.push(num(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        if cpus.is_empty() {
            return Err(bad("no CPU".into()));
        }
        Ok(CpuList(cpus))
    }

    /// `count` consecutive CPUs from `first`.
    pub fn range(first: usize, count: usize) -> Self {
        CpuList((first..first + count.max(1)).collect())
    }

    pub fn cpus(&self) -> &[usize] {
        &self.0
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut i = 0;
        while i < self.0.len() {
            let mut j = i;
            while j + 1 < self.0.len() && self.0[j + 1] == self.0[j] + 1 {
                j += 1;
            }
            parts.push(if i == j { self.0[i].to_string() } else { format!("{}-{}", self.0[i], self.0[j]) });
            i = j + 1;
        }
        f.write_str(&parts.join(","))
    }
}

/// Pins every thread of this process to `cpus`; returns how many threads were pinned. Threads
/// that exit while this runs are skipped.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // two libc calls, each with its safety argument
pub fn pin_process(cpus: &CpuList) -> Result<usize, AffinityError> {
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    if let Some(&cpu) = cpus.cpus().iter().find(|&&c| c >= max) {
        return Err(AffinityError::OutOfRange { cpu, max: max - 1 });
    }
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.cpus() {
        // SAFETY: `c` is below the set's capacity (checked above).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let mut pinned = 0;
    for entry in std::fs::read_dir("/proc/self/task").map_err(AffinityError::Threads)? {
        let entry = entry.map_err(AffinityError::Threads)?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // SAFETY: `set` is a valid cpu_set_t of the size passed; the call only reads it.
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                continue; // the thread exited meanwhile
            }
            return Err(AffinityError::Pin { tid, cpus: cpus.clone(), source: err });
        }
        pinned += 1;
    }
    Ok(pinned)
}

#[cfg(not(target_os = "linux"))]
pub fn pin_process(_cpus: &CpuList) -> Result<usize, AffinityError> {
    Err(AffinityError::Unsupported)
}

/// Lowers the scheduling priority of the calling thread, and of the threads it starts later, to
/// `niceness` (0–19): a process that shares the cores of pinned ranks (a local coordinator, a
/// load generator) then yields them to the ranks, as it would run on cores of its own on a
/// machine of one accelerator per rank. Threads started before keep their priority.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // one libc call on plain integers
pub fn lower_priority(niceness: i32) -> Result<(), std::io::Error> {
    // SAFETY: setpriority reads its three integer arguments only; `who` 0 is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, niceness.clamp(0, 19)) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
pub fn lower_priority(_niceness: i32) -> Result<(), std::io::Error> {
    Ok(())
}

/// The CPUs this process may run on now (`/proc/self/status` `Cpus_allowed_list`); `None` where
/// that is not readable.
pub fn allowed_cpus() -> Option<CpuList> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    CpuList::parse(line.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_in_ranges() {
        let l = CpuList::parse("3, 0-1,1,6-8").unwrap();
        assert_eq!(l.cpus(), &[0, 1, 3, 6, 7, 8]);
        assert_eq!(l.to_string(), "0-1,3,6-8");
        assert_eq!(CpuList::range(2, 3).to_string(), "2-4");
        for bad in ["", "a", "3-1", "1,,2", "-1", "1-"] {
            assert!(matches!(CpuList::parse(bad), Err(AffinityError::Parse { .. })), "{bad:?}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pinning_restricts_every_thread_and_new_ones_inherit() {
        // Runs in a child process of its own: pinning the test harness would pin other tests.
        if std::env::var_os("SWITCHYARD_AFFINITY_CHILD").is_none() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args(["--exact", "affinity::tests::pinning_restricts_every_thread_and_new_ones_inherit", "--nocapture"])
                .env("SWITCHYARD_AFFINITY_CHILD", "1")
                .output()
                .unwrap();
            assert!(out.status.success(), "child: {}", String::from_utf8_lossy(&out.stderr));
            return;
        }
        let before = allowed_cpus().expect("readable on Linux");
        let first = CpuList(vec![before.cpus()[0]]);
        let n = pin_process(&first).unwrap();
        assert!(n >= 1);
        assert_eq!(allowed_cpus().unwrap(), first);
        let inherited = std::thread::spawn(allowed_cpus).join().unwrap().unwrap();
        assert_eq!(inherited, first, "a thread started later inherits the pinning");
        assert!(matches!(pin_process(&CpuList(vec![1 << 20])), Err(AffinityError::OutOfRange { .. })));
    }
}
