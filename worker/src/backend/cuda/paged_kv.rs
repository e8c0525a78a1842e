#![forbid(unsafe_code)]
//! Page tables of the paged KV cache that lives on the device.
//!
//! The device holds, per layer, one K and one V buffer of `n_pages * page_size` slots. Which
//! slots a sequence owns is decided here, on the host, so that many sequences of different and
//! growing lengths share that memory without fragmentation and without copying when they grow:
//! each sequence has one page table (shared by all layers), page `p` covers the KV slots
//! `p * page_size .. (p + 1) * page_size`, and position `pos` of a sequence lives in slot
//! `pages[pos / page_size] * page_size + pos % page_size`.
//!
//! The kernels only see `i32` slot indices and flattened block tables ([`BatchTables`]); the
//! constructor guarantees that every slot index fits in an `i32`. Nothing here touches the GPU,
//! so the bookkeeping is unit-tested on the CPU.

use std::collections::HashMap;

/// Why a page-table operation was refused. No operation that returns an error changes state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagedKvError {
    /// `reserve` would need `needed` more pages than the `free` ones left.
    #[error("KV cache full: sequence {seq} needs {needed} more page(s), {free} free")]
    OutOfPages { seq: u64, needed: usize, free: usize },
    /// The sequence has no page table (never reserved, or released).
    #[error("unknown sequence {0} in the KV page tables")]
    UnknownSequence(u64),
    /// Position `pos` is at or beyond the `reserved` positions (whole pages) of the sequence.
    #[error("position {pos} of sequence {seq} is beyond its {reserved} reserved KV slots")]
    PositionBeyondReserved { seq: u64, pos: usize, reserved: usize },
    /// The cache geometry (or a batch table) does not fit the kernel ABI.
    #[error("bad paged KV configuration: {0}")]
    BadConfig(String),
}

/// The page tables of one device's KV cache: a pool of free pages and, per sequence id, the
/// pages it owns in position order.
#[derive(Debug, Clone)]
pub struct PagedKv {
    page_size: usize,
    n_pages: usize,
    /// Freed page ids; popped from the back (LIFO), so recently freed pages are reused first.
    recycled: Vec<u32>,
    /// Pages `fresh..n_pages` were never handed out. Kept as a counter rather than listed, so a
    /// large pool costs no host memory up front.
    fresh: usize,
    tables: HashMap<u64, Vec<u32>>,
}

/// Flattened block tables of a batch of sequences, as the attention kernels take them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchTables {
    /// Concatenation of each sequence's page ids, in batch order.
    pub table: Vec<i32>,
    /// `start[i]`: offset in `table` of the first page of the i-th sequence of the batch.
    pub start: Vec<i32>,
}

impl PagedKv {
    /// A cache of `n_pages` pages of `page_size` slots, all free.
    ///
    /// `BadConfig` when either is 0 or when `n_pages * page_size` exceeds `i32::MAX` (slot
    /// indices are `i32` in the kernel ABI).
    pub fn new(page_size: usize, n_pages: usize) -> Result<Self, PagedKvError> {
        if page_size == 0 {
            return Err(PagedKvError::BadConfig("page_size is 0".into()));
        }
        if n_pages == 0 {
            return Err(PagedKvError::BadConfig("n_pages is 0 (no memory for the KV cache?)".into()));
        }
        match n_pages.checked_mul(page_size) {
            Some(slots) if slots <= i32::MAX as usize => {}
            _ => {
                return Err(PagedKvError::BadConfig(format!(
                    "{n_pages} pages of {page_size} slots exceed the i32 slot index of the kernels"
                )))
            }
        }
        // n_pages <= i32::MAX here, so every page id fits in u32 (and i32).
        Ok(Self { page_size, n_pages, recycled: Vec::new(), fresh: 0, tables: HashMap::new() })
    }

    /// Pages that fit a memory budget: `floor(budget_bytes / (page_size * bytes_per_slot_all_layers))`.
    ///
    /// `bytes_per_slot_all_layers` is what one position costs over all layers (K and V). A
    /// zero page size or slot cost gives 0 (no meaningful geometry), as does a page whose size
    /// overflows `u64`; a count beyond `usize` saturates.
    pub fn pages_for_budget(budget_bytes: u64, page_size: usize, bytes_per_slot_all_layers: u64) -> usize {
        let per_page = match (page_size as u64).checked_mul(bytes_per_slot_all_layers) {
            Some(0) | None => return 0,
            Some(b) => b,
        };
        usize::try_from(budget_bytes / per_page).unwrap_or(usize::MAX)
    }

    /// Slots per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the pool, free or not.
    pub fn n_pages(&self) -> usize {
        self.n_pages
    }

    /// Pages not owned by any sequence.
    pub fn free_pages(&self) -> usize {
        self.recycled.len() + (self.n_pages - self.fresh)
    }

    /// Slots in the cache: `n_pages * page_size` (at most `i32::MAX`).
    pub fn slots(&self) -> usize {
        self.n_pages * self.page_size
    }

    /// Positions the sequence can hold without another `reserve` (its pages times the page
    /// size); `None` for an unknown sequence.
    pub fn reserved(&self, seq: u64) -> Option<usize> {
        self.tables.get(&seq).map(|p| p.len() * self.page_size)
    }

    /// The page ids the sequence owns, in position order; `None` for an unknown sequence.
    pub fn pages_of(&self, seq: u64) -> Option<&[u32]> {
        self.tables.get(&seq).map(|p| p.as_slice())
    }

    /// Number of sequences that have a page table.
    pub fn sequences(&self) -> usize {
        self.tables.len()
    }

    /// Pages needed for `len` positions.
    fn pages_for_len(&self, len: usize) -> usize {
        len.div_ceil(self.page_size)
    }

    /// Make room for positions `0..len` of `seq`, creating its table if it is new (even for
    /// `len == 0`). Pages already owned are kept, so slots of earlier positions do not move.
    ///
    /// All or nothing: on `OutOfPages` (whose `needed` is the number of *additional* pages)
    /// nothing changes and a new sequence is not created.
    pub fn reserve(&mut self, seq: u64, len: usize) -> Result<(), PagedKvError> {
        let needed_total = self.pages_for_len(len);
        let have = self.tables.get(&seq).map_or(0, Vec::len);
        let extra = needed_total.saturating_sub(have);
        let free = self.free_pages();
        if extra > free {
            return Err(PagedKvError::OutOfPages { seq, needed: extra, free });
        }
        let pages = self.tables.entry(seq).or_default();
        pages.reserve(extra);
        for _ in 0..extra {
            // Recycled pages first (most recently freed first), then never-used ones.
            let page = match self.recycled.pop() {
                Some(p) => p,
                None => {
                    // fresh < n_pages <= i32::MAX: `extra <= free` was checked above.
                    let p = self.fresh as u32;
                    self.fresh += 1;
                    p
                }
            };
            pages.push(page);
        }
        Ok(())
    }

    /// Slots of positions `start..start + n` of `seq`, as `i32` (the kernel ABI).
    ///
    /// `UnknownSequence` if it has no table; `PositionBeyondReserved` (with the first position
    /// not reserved) if the range goes past its pages. `n == 0` gives an empty vector.
    pub fn slots_of(&self, seq: u64, start: usize, n: usize) -> Result<Vec<i32>, PagedKvError> {
        let pages = self.tables.get(&seq).ok_or(PagedKvError::UnknownSequence(seq))?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let reserved = pages.len() * self.page_size;
        match start.checked_add(n) {
            Some(end) if end <= reserved => {}
            _ => return Err(PagedKvError::PositionBeyondReserved { seq, pos: start.max(reserved), reserved }),
        }
        let ps = self.page_size;
        // Every slot is < n_pages * page_size <= i32::MAX (checked in `new`).
        Ok((start..start + n).map(|pos| (pages[pos / ps] as usize * ps + pos % ps) as i32).collect())
    }

    /// Keep only the pages needed for the first `len` positions, returning the rest to the pool.
    /// The sequence stays known (with no pages for `len == 0`). Unknown sequence: no-op.
    pub fn truncate(&mut self, seq: u64, len: usize) {
        let keep = self.pages_for_len(len);
        if let Some(pages) = self.tables.get_mut(&seq) {
            while pages.len() > keep {
                if let Some(p) = pages.pop() {
                    self.recycled.push(p);
                }
            }
        }
    }

    /// Free every page of `seq` and forget it; returns the pages freed (0 if unknown).
    pub fn release(&mut self, seq: u64) -> usize {
        match self.tables.remove(&seq) {
            Some(pages) => {
                let n = pages.len();
                // Push the tail first so the sequence's first page is the next one handed out.
                self.recycled.extend(pages.into_iter().rev());
                n
            }
            None => 0,
        }
    }

    /// Flattened block table for a batch: `table` is the concatenation of each sequence's
    /// pages, `start[i]` the offset of `seqs[i]`'s pages in it. A sequence may appear more than
    /// once (its pages then appear once per occurrence).
    ///
    /// `UnknownSequence` for a sequence without a table; `BadConfig` if the table would be
    /// longer than `i32::MAX` entries.
    pub fn batch_tables(&self, seqs: &[u64]) -> Result<BatchTables, PagedKvError> {
        let mut out = BatchTables { table: Vec::new(), start: Vec::with_capacity(seqs.len()) };
        for &seq in seqs {
            let pages = self.tables.get(&seq).ok_or(PagedKvError::UnknownSequence(seq))?;
            let offset = i32::try_from(out.table.len())
                .ok()
                .filter(|&o| (o as usize).checked_add(pages.len()).is_some_and(|e| e <= i32::MAX as usize))
                .ok_or_else(|| PagedKvError::BadConfig("batch block table exceeds i32 offsets".into()))?;
            out.start.push(offset);
            // Page ids are < n_pages <= i32::MAX.
            out.table.extend(pages.iter().map(|&p| p as i32));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::cuda::TestRng as Rng;

    #[test]
    fn new_rejects_bad_config() {
        assert!(matches!(PagedKv::new(0, 4), Err(PagedKvError::BadConfig(_))));
        assert!(matches!(PagedKv::new(16, 0), Err(PagedKvError::BadConfig(_))));
        assert!(matches!(PagedKv::new(16, usize::MAX), Err(PagedKvError::BadConfig(_))));
        assert!(matches!(PagedKv::new(1 << 16, 1 << 15), Err(PagedKvError::BadConfig(_))));
        // Exactly i32::MAX slots is allowed.
        // (and costs no host memory up front).
        let mut kv = PagedKv::new(1, i32::MAX as usize).unwrap();
        assert_eq!(kv.slots(), i32::MAX as usize);
        assert_eq!(kv.free_pages(), i32::MAX as usize);
        kv.reserve(5, 3).unwrap();
        assert_eq!(kv.slots_of(5, 0, 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(kv.free_pages(), i32::MAX as usize - 3);
        let kv = PagedKv::new(16, 8).unwrap();
        assert_eq!((kv.page_size(), kv.n_pages(), kv.free_pages(), kv.slots()), (16, 8, 8, 128));
    }

    #[test]
    fn pages_for_budget_floors_and_never_divides_by_zero() {
        assert_eq!(PagedKv::pages_for_budget(1000, 16, 2), 31);
        assert_eq!(PagedKv::pages_for_budget(1024, 16, 2), 32);
        assert_eq!(PagedKv::pages_for_budget(31, 16, 2), 0);
        assert_eq!(PagedKv::pages_for_budget(1 << 40, 0, 2), 0);
        assert_eq!(PagedKv::pages_for_budget(1 << 40, 16, 0), 0);
        assert_eq!(PagedKv::pages_for_budget(u64::MAX, usize::MAX, u64::MAX), 0);
        // 80 GiB, 16-slot pages, 61 layers * 2 * 8 heads * 128 dims * 2 bytes per slot.
        let per_slot = 61 * 2 * 8 * 128 * 2;
        assert_eq!(PagedKv::pages_for_budget(80 << 30, 16, per_slot), ((80u64 << 30) / (16 * per_slot)) as usize);
    }

    #[test]
    fn reserve_maps_slots_across_page_boundaries() {
        let mut kv = PagedKv::new(4, 8).unwrap();
        kv.reserve(1, 3).unwrap(); // page 0
        kv.reserve(2, 5).unwrap(); // pages 1, 2
        kv.reserve(1, 9).unwrap(); // + pages 3, 4
        assert_eq!(kv.pages_of(1).unwrap(), &[0, 3, 4]);
        assert_eq!(kv.pages_of(2).unwrap(), &[1, 2]);
        assert_eq!(kv.reserved(1), Some(12));
        assert_eq!(kv.free_pages(), 3);
        assert_eq!(kv.slots_of(1, 0, 12).unwrap(), vec![0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 18, 19]);
        assert_eq!(kv.slots_of(1, 3, 2).unwrap(), vec![3, 12]);
        assert_eq!(kv.slots_of(2, 2, 4).unwrap(), vec![6, 7, 8, 9]);
        // The slot formula, position by position.
        for pos in 0..12 {
            let pages = kv.pages_of(1).unwrap();
            assert_eq!(kv.slots_of(1, pos, 1).unwrap(), vec![(pages[pos / 4] as usize * 4 + pos % 4) as i32]);
        }
        // Reserving less than held changes nothing.
        kv.reserve(1, 1).unwrap();
        assert_eq!(kv.pages_of(1).unwrap(), &[0, 3, 4]);
        // Page-sized reservations take exactly len / page_size pages.
        kv.reserve(3, 0).unwrap();
        assert_eq!(kv.pages_of(3).unwrap(), &[] as &[u32]);
        kv.reserve(3, 8).unwrap();
        assert_eq!(kv.pages_of(3).unwrap().len(), 2);
    }

    #[test]
    fn slots_of_errors() {
        let mut kv = PagedKv::new(4, 8).unwrap();
        assert_eq!(kv.slots_of(9, 0, 1), Err(PagedKvError::UnknownSequence(9)));
        kv.reserve(1, 5).unwrap(); // 8 positions reserved
        assert_eq!(kv.slots_of(1, 6, 3), Err(PagedKvError::PositionBeyondReserved { seq: 1, pos: 8, reserved: 8 }));
        assert_eq!(kv.slots_of(1, 10, 1), Err(PagedKvError::PositionBeyondReserved { seq: 1, pos: 10, reserved: 8 }));
        assert!(matches!(kv.slots_of(1, usize::MAX, 2), Err(PagedKvError::PositionBeyondReserved { .. })));
        assert_eq!(kv.slots_of(1, 8, 0), Ok(vec![]));
        assert_eq!(kv.slots_of(1, 0, 8).unwrap().len(), 8);
        kv.reserve(2, 0).unwrap();
        assert_eq!(kv.slots_of(2, 0, 1), Err(PagedKvError::PositionBeyondReserved { seq: 2, pos: 0, reserved: 0 }));
    }

    #[test]
    fn reserve_is_all_or_nothing_when_exhausted() {
        let mut kv = PagedKv::new(4, 4).unwrap();
        kv.reserve(1, 6).unwrap(); // 2 pages
        let before = kv.pages_of(1).unwrap().to_vec();
        assert_eq!(kv.reserve(1, 17), Err(PagedKvError::OutOfPages { seq: 1, needed: 3, free: 2 }));
        assert_eq!(kv.pages_of(1).unwrap(), before.as_slice());
        assert_eq!(kv.free_pages(), 2);
        // A new sequence that does not fit is not created.
        assert_eq!(kv.reserve(2, 13), Err(PagedKvError::OutOfPages { seq: 2, needed: 4, free: 2 }));
        assert_eq!(kv.pages_of(2), None);
        assert_eq!(kv.sequences(), 1);
        // Exactly filling the pool works, then one more position does not.
        kv.reserve(2, 8).unwrap();
        assert_eq!(kv.free_pages(), 0);
        assert_eq!(kv.reserve(3, 1), Err(PagedKvError::OutOfPages { seq: 3, needed: 1, free: 0 }));
        kv.reserve(3, 0).unwrap(); // needs no page
        assert_eq!(kv.reserve(usize::MAX as u64, usize::MAX).unwrap_err(), PagedKvError::OutOfPages {
            seq: usize::MAX as u64,
            needed: usize::MAX.div_ceil(4),
            free: 0
        });
    }

    #[test]
    fn release_returns_pages_that_are_reused() {
        let mut kv = PagedKv::new(2, 6).unwrap();
        kv.reserve(1, 4).unwrap();
        kv.reserve(2, 4).unwrap();
        let freed_pages = kv.pages_of(1).unwrap().to_vec();
        assert_eq!(kv.free_pages(), 2);
        assert_eq!(kv.release(1), 2);
        assert_eq!(kv.release(1), 0);
        assert_eq!(kv.release(77), 0);
        assert_eq!(kv.free_pages(), 4);
        assert_eq!(kv.slots_of(1, 0, 1), Err(PagedKvError::UnknownSequence(1)));
        // The whole pool is usable again; the released pages come back first (LIFO).
        kv.reserve(3, 4).unwrap();
        assert_eq!(kv.pages_of(3).unwrap(), freed_pages.as_slice());
        kv.reserve(4, 4).unwrap();
        assert_eq!(kv.free_pages(), 0);
        let mut all: Vec<u32> = [2u64, 3, 4].iter().flat_map(|&s| kv.pages_of(s).unwrap().to_vec()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn truncate_frees_exactly_the_tail_pages() {
        let mut kv = PagedKv::new(4, 8).unwrap();
        kv.reserve(1, 16).unwrap(); // 4 pages
        kv.reserve(2, 4).unwrap();
        let pages = kv.pages_of(1).unwrap().to_vec();
        kv.truncate(1, 9); // keeps 3 pages
        assert_eq!(kv.pages_of(1).unwrap(), &pages[..3]);
        assert_eq!(kv.free_pages(), 4);
        kv.truncate(1, 12); // still 3 pages
        assert_eq!(kv.pages_of(1).unwrap(), &pages[..3]);
        kv.truncate(1, 100); // never grows
        assert_eq!(kv.pages_of(1).unwrap(), &pages[..3]);
        kv.truncate(1, 1);
        assert_eq!(kv.pages_of(1).unwrap(), &pages[..1]);
        assert_eq!(kv.free_pages(), 6);
        kv.truncate(1, 0);
        assert_eq!(kv.pages_of(1).unwrap(), &[] as &[u32]);
        assert_eq!(kv.free_pages(), 7);
        kv.truncate(42, 0); // unknown: no-op
        assert_eq!(kv.free_pages(), 7);
        assert_eq!(kv.pages_of(2).unwrap().len(), 1);
        // The truncated tail is reused by the next reservation.
        kv.reserve(3, 4).unwrap();
        assert_eq!(kv.pages_of(3).unwrap(), &pages[..1]);
    }

    #[test]
    fn batch_tables_offsets() {
        let mut kv = PagedKv::new(4, 16).unwrap();
        kv.reserve(10, 9).unwrap(); // 3 pages
        kv.reserve(20, 0).unwrap(); // 0 pages
        kv.reserve(30, 4).unwrap(); // 1 page
        let bt = kv.batch_tables(&[30, 10, 20, 30]).unwrap();
        let p = |s| kv.pages_of(s).unwrap().iter().map(|&x| x as i32).collect::<Vec<_>>();
        assert_eq!(bt.start, vec![0, 1, 4, 4]);
        assert_eq!(bt.table, [p(30), p(10), p(20), p(30)].concat());
        assert_eq!(kv.batch_tables(&[]).unwrap(), BatchTables::default());
        assert_eq!(kv.batch_tables(&[10, 99]), Err(PagedKvError::UnknownSequence(99)));
        // Table entries and offsets reproduce slots_of.
        for (i, &s) in [30u64, 10, 20, 30].iter().enumerate() {
            let n = kv.reserved(s).unwrap();
            let st = bt.start[i] as usize;
            let via_table: Vec<i32> = (0..n).map(|pos| bt.table[st + pos / 4] * 4 + (pos % 4) as i32).collect();
            assert_eq!(via_table, kv.slots_of(s, 0, n).unwrap());
        }
    }

    /// A few hundred random reserve / truncate / release operations against a model of the
    /// written positions: every slot of a sequence keeps the value the sequence wrote there (so
    /// no two sequences ever share a slot), and pages are conserved.
    #[test]
    fn random_ops_never_share_slots() {
        for seed in 0..4u64 {
            let mut rng = Rng(seed);
            let page_size = 1 + rng.below(5) as usize;
            let n_pages = 8 + rng.below(24) as usize;
            let mut kv = PagedKv::new(page_size, n_pages).unwrap();
            // Simulated device memory: which (seq, pos) was last written to each slot.
            let mut mem: Vec<Option<(u64, usize)>> = vec![None; kv.slots()];
            // Model: written length of each live sequence.
            let mut lens: HashMap<u64, usize> = HashMap::new();
            let max_len = n_pages * page_size / 2 + 3;
            for _ in 0..400 {
                let seq = rng.below(6);
                match rng.below(10) {
                    0..=5 => {
                        let len = rng.below(max_len as u64) as usize;
                        let have = kv.pages_of(seq).map_or(0, |p| p.len());
                        let extra = len.div_ceil(page_size).saturating_sub(have);
                        let free = kv.free_pages();
                        let before = kv.pages_of(seq).map(|p| p.to_vec());
                        match kv.reserve(seq, len) {
                            Ok(()) => {
                                assert!(extra <= free);
                                assert_eq!(kv.free_pages(), free - extra);
                                let old = lens.get(&seq).copied().unwrap_or(0);
                                let new = old.max(len);
                                for (pos, s) in kv.slots_of(seq, 0, new).unwrap().into_iter().enumerate() {
                                    mem[s as usize] = Some((seq, pos));
                                }
                                lens.insert(seq, new);
                            }
                            Err(e) => {
                                assert_eq!(e, PagedKvError::OutOfPages { seq, needed: extra, free });
                                assert_eq!(kv.free_pages(), free);
                                assert_eq!(kv.pages_of(seq).map(|p| p.to_vec()), before);
                            }
                        }
                    }
                    6..=7 => {
                        let len = rng.below(max_len as u64) as usize;
                        let before = kv.pages_of(seq).map(|p| p.to_vec());
                        let free = kv.free_pages();
                        kv.truncate(seq, len);
                        match before {
                            Some(before) => {
                                let keep = before.len().min(len.div_ceil(page_size));
                                assert_eq!(kv.pages_of(seq).unwrap(), &before[..keep]);
                                assert_eq!(kv.free_pages(), free + before.len() - keep);
                                let l = lens.get_mut(&seq).unwrap();
                                *l = (*l).min(len);
                            }
                            None => assert_eq!(kv.free_pages(), free),
                        }
                    }
                    _ => {
                        let held = kv.pages_of(seq).map_or(0, |p| p.len());
                        assert_eq!(kv.release(seq), held);
                        lens.remove(&seq);
                    }
                }
                // Every live sequence still reads back what it wrote.
                for (&seq, &len) in &lens {
                    for (pos, s) in kv.slots_of(seq, 0, len).unwrap().into_iter().enumerate() {
                        assert_eq!(mem[s as usize], Some((seq, pos)), "seed {seed}: slot {s} overwritten");
                    }
                }
                // Pages are conserved: owned + free == pool, each page exactly once.
                let mut seen = vec![0u8; n_pages];
                for &p in &kv.recycled {
                    seen[p as usize] += 1;
                }
                for c in &mut seen[kv.fresh..] {
                    *c += 1;
                }
                for pages in kv.tables.values() {
                    for &p in pages {
                        seen[p as usize] += 1;
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "seed {seed}: page owned twice or lost");
                assert_eq!(kv.sequences(), lens.len());
            }
        }
    }
}
