//! I/O virtual addresses and the allocator that places DMA pools inside the IOMMU's
//! usable ranges. QEMU's emulated VT-d rejects IOVA = virtual address (its guest address
//! width is 39 bits), so pools go where `VFIO_IOMMU_GET_INFO` says there is room.

use std::fmt;

/// An address as the device sees it: an IOVA under an IOMMU, a physical address without.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Iova(pub u64);

impl Iova {
    /// This address plus `bytes`.
    #[inline]
    pub const fn add(self, bytes: u64) -> Iova {
        Iova(self.0 + bytes)
    }
}

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Granularity and alignment of pool placement: one 2 MiB hugepage.
const ALIGN: u64 = 2 << 20;

/// A bump allocator over the IOMMU's usable ranges. Pools live as long as the process's
/// engine, so freed space is not reused.
#[derive(Debug)]
pub struct IovaSpace {
    ranges: Vec<(u64, u64)>,
    next: u64,
}

impl IovaSpace {
    /// Ranges are inclusive `(start, end)`. With none reported, assume the 39-bit space of
    /// the most limited common IOMMU.
    pub fn new(mut ranges: Vec<(u64, u64)>) -> Self {
        if ranges.is_empty() {
            ranges.push((0, (1u64 << 39) - 1));
        }
        ranges.sort_unstable();
        // Start above zero so that a zeroed pointer in a command never names valid memory.
        IovaSpace {
            ranges,
            next: ALIGN,
        }
    }

    /// Reserves `size` bytes, 2 MiB aligned, or returns None when no range has room.
    pub fn alloc(&mut self, size: usize) -> Option<Iova> {
        let size = (size as u64).checked_next_multiple_of(ALIGN)?;
        for &(start, end) in &self.ranges {
            let base = start.max(self.next).checked_next_multiple_of(ALIGN)?;
            let last = base.checked_add(size - 1)?;
            if last <= end {
                self.next = last + 1;
                return Some(Iova(base));
            }
        }
        None
    }

    /// The ranges, for error messages.
    pub fn describe(&self) -> String {
        self.ranges
            .iter()
            .map(|(s, e)| format!("{s:#x}-{e:#x}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_pools_inside_the_reported_ranges() {
        // QEMU's emulated VT-d: a hole for the interrupt window below 4 GiB.
        let mut s = IovaSpace::new(vec![(0xfef0_0000, 0x7f_ffff_ffff), (0, 0xfedf_ffff)]);
        assert_eq!(s.alloc(4 << 20), Some(Iova(2 << 20)));
        assert_eq!(s.alloc(1), Some(Iova(6 << 20)));
        // Too large for the first range: skips past the hole, aligned.
        let big = s.alloc(0xff00_0000).unwrap();
        assert!(big.0 >= 0xfef0_0000 && big.0 % ALIGN == 0, "{big}");
        assert_eq!(s.alloc(1 << 40), None);
    }
}
