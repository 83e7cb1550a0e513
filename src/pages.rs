//! A client's reservation of DMA pages (kcopyd's `num_pages`). Pages are 4 KiB; the engine's
//! pool is whole 2 MiB hugepages, so the reservation is taken in device-contiguous runs
//! and handed out page by page. The free list is lock-free, so reactors take and return
//! pages without a syscall or a lock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;
use nvcopy_vfio::{DmaBuf, DmaPool, Iova, PAGE_SIZE};

use crate::error::Result;

/// A fixed set of DMA pages and their free list.
pub(crate) struct PageReserve {
    // Kept only so the memory stays reserved; pages are reached through `iovas`.
    _runs: Vec<DmaBuf>,
    iovas: Vec<Iova>,
    free: ArrayQueue<u32>,
    /// Pages a device may still write (its controller could not be proven quiet): never
    /// handed out again.
    quarantined: AtomicUsize,
    /// Per page, bumped each time it leaves a chunk: a device write into a page whose
    /// generation changed since the command was submitted is a write into memory that
    /// belongs to someone else (the software controller checks this, see
    /// [`PageReserve::generation`]).
    generations: Vec<AtomicU64>,
    /// (IOVA, page index), sorted by IOVA, to find a page from a device address.
    by_iova: Vec<(u64, u32)>,
}

impl PageReserve {
    /// Reserves `count` pages from `pool`.
    pub fn new(pool: &DmaPool, count: usize) -> Result<PageReserve> {
        let count = count.max(1);
        let run_pages = pool.max_contiguous() / PAGE_SIZE;
        let mut runs = Vec::new();
        let mut iovas = Vec::with_capacity(count);
        while iovas.len() < count {
            let n = run_pages.min(count - iovas.len());
            let run = pool.alloc(n * PAGE_SIZE)?;
            iovas.extend((0..n).map(|i| run.iova().add((i * PAGE_SIZE) as u64)));
            runs.push(run);
        }
        let free = ArrayQueue::new(count);
        for i in 0..count as u32 {
            // Cannot fail: the queue holds exactly `count` entries.
            let _ = free.push(i);
        }
        let mut by_iova: Vec<(u64, u32)> = iovas
            .iter()
            .enumerate()
            .map(|(i, v)| (v.0, i as u32))
            .collect();
        by_iova.sort_unstable();
        Ok(PageReserve {
            _runs: runs,
            generations: (0..count).map(|_| AtomicU64::new(0)).collect(),
            by_iova,
            iovas,
            free,
            quarantined: AtomicUsize::new(0),
        })
    }

    /// Pages in the reservation.
    pub fn capacity(&self) -> usize {
        self.iovas.len()
    }

    /// Pages free now.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Pages that can ever be handed out again: all but the quarantined ones.
    pub fn usable(&self) -> usize {
        self.capacity() - self.quarantined.load(Ordering::Acquire)
    }

    /// Takes `pages` out of circulation for good (a device may still write them).
    pub fn quarantine(&self, pages: &mut Vec<u32>) {
        self.quarantined.fetch_add(pages.len(), Ordering::AcqRel);
        pages.clear();
    }

    /// The owner generation of the reserved page holding `iova`, or None if it is not one
    /// of this reservation's pages.
    pub fn generation(&self, iova: Iova) -> Option<u64> {
        let page = iova.0 - iova.0 % PAGE_SIZE as u64;
        let i = self.by_iova.binary_search_by_key(&page, |&(v, _)| v).ok()?;
        let index = self.by_iova[i].1 as usize;
        Some(self.generations[index].load(Ordering::Acquire))
    }

    /// Takes `n` pages into `out` (cleared first) with their IOVAs in `iovas`, or none at
    /// all when fewer are free: a chunk never holds half its pages while it waits.
    pub fn take(&self, n: usize, out: &mut Vec<u32>, iovas: &mut Vec<Iova>) -> bool {
        out.clear();
        iovas.clear();
        while out.len() < n {
            match self.free.pop() {
                Some(p) => {
                    out.push(p);
                    iovas.push(self.iovas[p as usize]);
                }
                None => {
                    self.give(out);
                    iovas.clear();
                    return false;
                }
            }
        }
        true
    }

    /// Returns pages to the free list.
    pub fn give(&self, pages: &mut Vec<u32>) {
        for &p in pages.iter() {
            if let Some(g) = self.generations.get(p as usize) {
                g.fetch_add(1, Ordering::AcqRel);
            }
            // Cannot fail: only pages taken from this queue come back to it.
            let _ = self.free.push(p);
        }
        pages.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_all_or_nothing() {
        let pool = DmaPool::unmapped(64 * PAGE_SIZE).unwrap();
        let r = PageReserve::new(&pool, 10).unwrap();
        let (mut a, mut ai) = (Vec::with_capacity(10), Vec::with_capacity(10));
        assert!(r.take(8, &mut a, &mut ai));
        assert_eq!(ai.len(), 8);
        let (mut b, mut bi) = (Vec::with_capacity(10), Vec::with_capacity(10));
        assert!(!r.take(3, &mut b, &mut bi));
        assert!(b.is_empty() && r.available() == 2);
        r.give(&mut a);
        assert_eq!(r.available(), 10);
        assert!(r.take(10, &mut b, &mut bi));
        let mut sorted = bi.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 10, "distinct pages");
    }

    #[test]
    fn a_page_changes_generation_each_time_it_leaves_a_chunk() {
        let pool = DmaPool::unmapped(64 * PAGE_SIZE).unwrap();
        let r = PageReserve::new(&pool, 4).unwrap();
        let (mut a, mut ai) = (Vec::new(), Vec::new());
        assert!(r.take(1, &mut a, &mut ai));
        let iova = ai[0];
        let g = r.generation(iova.add(100)).unwrap();
        assert_eq!(r.generation(iova), Some(g), "any byte of the page");
        r.give(&mut a);
        assert_eq!(r.generation(iova), Some(g + 1));
        assert_eq!(
            r.generation(Iova(u64::MAX - 4095)),
            None,
            "not a reserved page"
        );
    }
}
