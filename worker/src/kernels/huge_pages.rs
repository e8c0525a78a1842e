#![allow(unsafe_code)]
//! Backing a loaded model's weights with transparent huge pages (Linux `MADV_COLLAPSE`).
//!
//! Why: a decode step streams every weight it uses once, so it is bound by memory reads, and
//! with 4 KiB pages every 4 KiB of a stream costs a TLB miss and a hardware-prefetcher restart
//! (prefetchers do not cross pages). Measured on the benchmark model (2 threads, Xeon, this
//! collapse on against `SWITCHYARD_HUGE_PAGES=0`): decode 35 → 42 tok/s at batch 1, 93 → 108
//! at batch 16. Most distributions set THP to
//! `madvise`, and the weights are allocated by malloc in many pieces (an expert's down
//! projection is 1 MiB), so asking for huge pages per allocation would cover little of them.
//!
//! What: after a model load, every 2 MiB-aligned block of the process's private anonymous
//! memory whose pages are *all* resident (`mincore`) is collapsed in place. Only fully resident
//! blocks are touched, so resident memory does not grow; blocks the kernel cannot collapse
//! (no free 2 MiB page, an old kernel) stay as they are. The result is reported, never an error:
//! huge pages are a speed-up, not something a worker may fail over.

/// What [`collapse_resident_memory`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HugePageReport {
    /// Bytes now backed by huge pages (fully resident blocks collapsed).
    pub collapsed_bytes: usize,
    /// Fully resident blocks the kernel refused (no free huge page, memory pressure).
    pub refused_blocks: usize,
    /// Why nothing was attempted, when nothing was (not Linux, the kernel lacks `MADV_COLLAPSE`,
    /// `SWITCHYARD_HUGE_PAGES=0`).
    pub skipped: Option<&'static str>,
}

const HUGE: usize = 2 << 20;

/// Collapse the fully resident 2 MiB blocks of this process's private anonymous memory into
/// huge pages. `SWITCHYARD_HUGE_PAGES=0` turns it off (to measure one against the other).
pub fn collapse_resident_memory() -> HugePageReport {
    if std::env::var("SWITCHYARD_HUGE_PAGES").is_ok_and(|v| v == "0") {
        return HugePageReport { skipped: Some("SWITCHYARD_HUGE_PAGES=0"), ..Default::default() };
    }
    imp::collapse()
}

/// `[start, end)` of the private anonymous read-write mappings in a `/proc/PID/maps` text (the
/// heap included; file mappings, stacks and kernel pages left out).
pub(crate) fn anonymous_regions(maps: &str) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let _offset = f.next()?;
            let _dev = f.next()?;
            let inode = f.next()?;
            let path = f.next();
            if perms != "rw-p" || inode != "0" || !matches!(path, None | Some("[heap]")) {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?))
        })
        .collect()
}

/// The 2 MiB-aligned blocks lying wholly inside `[start, end)`.
pub(crate) fn aligned_blocks(start: usize, end: usize) -> impl Iterator<Item = usize> {
    let first = start.div_ceil(HUGE) * HUGE;
    (first..end.saturating_sub(HUGE - 1)).step_by(HUGE)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::{aligned_blocks, anonymous_regions, HugePageReport, HUGE};

    pub(super) fn collapse() -> HugePageReport {
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return HugePageReport { skipped: Some("/proc/self/maps unreadable"), ..Default::default() };
        };
        let page = 4096;
        let mut resident = vec![0u8; HUGE / page];
        let mut report = HugePageReport::default();
        for (start, end) in anonymous_regions(&maps) {
            for block in aligned_blocks(start, end) {
                // SAFETY: the block lies inside a mapping of this process (read just now; a
                // mapping removed meanwhile makes mincore fail with ENOMEM, handled); the vector
                // holds one byte per page of the block.
                let rc = unsafe { libc::mincore(block as *mut libc::c_void, HUGE, resident.as_mut_ptr()) };
                if rc != 0 || resident.iter().any(|&r| r & 1 == 0) {
                    continue;
                }
                // SAFETY: MADV_COLLAPSE only changes how the block's (resident) pages are backed;
                // contents and the mapping stay as they are.
                let rc = unsafe { libc::madvise(block as *mut libc::c_void, HUGE, libc::MADV_COLLAPSE) };
                if rc == 0 {
                    report.collapsed_bytes += HUGE;
                    continue;
                }
                match std::io::Error::last_os_error().raw_os_error() {
                    // A kernel before 6.1, or THP set to `never`: no block will collapse.
                    Some(libc::EINVAL) if report.collapsed_bytes == 0 && report.refused_blocks == 0 => {
                        return HugePageReport { skipped: Some("MADV_COLLAPSE refused (kernel before 6.1, or THP set to never)"), ..Default::default() };
                    }
                    _ => report.refused_blocks += 1,
                }
            }
        }
        report
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    use super::HugePageReport;

    pub(super) fn collapse() -> HugePageReport {
        HugePageReport { skipped: Some("not Linux"), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_private_anonymous_writable_mappings_count() {
        let maps = "\
55d0c0000000-55d0c0400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000800000 rw-p 00000000 00:00 0 
7f0000800000-7f0000a00000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
7f0000a00000-7f0000c00000 rw-p 00001000 08:01 1234                       /usr/lib/libc.so.6
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7f0001000000-7f0001200000 rw-s 00000000 00:05 77                         /dev/shm/x
garbage line
";
        assert_eq!(anonymous_regions(maps), vec![(0x55d0c0000000, 0x55d0c0400000), (0x7f0000000000, 0x7f0000800000)]);
    }

    #[test]
    fn blocks_lie_wholly_inside_the_region() {
        assert_eq!(aligned_blocks(0, 4 * HUGE).collect::<Vec<_>>(), vec![0, HUGE, 2 * HUGE, 3 * HUGE]);
        assert_eq!(aligned_blocks(1, 4 * HUGE - 1).collect::<Vec<_>>(), vec![HUGE, 2 * HUGE]);
        assert_eq!(aligned_blocks(HUGE + 4096, 2 * HUGE + 4096).count(), 0);
        assert_eq!(aligned_blocks(0, 0).count(), 0);
    }

    /// A fully written 8 MiB buffer ends up (at least partly) on huge pages, where the kernel
    /// offers them; contents unchanged either way.
    #[test]
    fn collapsing_keeps_contents() {
        let data: Vec<u64> = (0..(8 << 20) / 8).map(|i| i as u64 * 2_654_435_761).collect();
        let report = collapse_resident_memory();
        if report.skipped.is_none() && report.refused_blocks == 0 {
            assert!(report.collapsed_bytes >= 2 * HUGE, "{report:?}");
        }
        assert!(data.iter().enumerate().all(|(i, &v)| v == i as u64 * 2_654_435_761));
    }
}
