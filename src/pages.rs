//! A client's reservation of DMA pages (kcopyd's `num_pages`). Pages are 4 KiB; the engine's
//! pool is whole 2 MiB hugepages, so the reservation is taken in device-contiguous runs
//! and handed out page by page. The free list is lock-free, so reactors take and return
//! pages without a syscall or a lock.

use std::sync::atomic::{AtomicUsize, Ordering};

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
        Ok(PageReserve {
            _runs: runs,
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

    /// Takes `n` pages into `out` (cleared first) with their IOVAs in `iovas`, or none at
    /// all when fewer are free: a chunk never holds half its pages while it waits.
    pub fn take(&self, n: usize, out: &mut Vec<u32>, iovas: &mut Vec<Iova>) -> bool {
        out.clear();
        iovas.clear();
        while out.len() < n {
            match self.free.pop() {
                Some(p) => out.push(p),
                None => {
                    self.give(out);
                    return false;
                }
            }
        }
        iovas.extend(out.iter().map(|&p| self.iovas[p as usize]));
        true
    }

    /// Returns pages to the free list.
    pub fn give(&self, pages: &mut Vec<u32>) {
        for p in pages.drain(..) {
            // Cannot fail: only pages taken from this queue come back to it.
            let _ = self.free.push(p);
        }
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
}
