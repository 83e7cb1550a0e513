//! A mapped PCI BAR. Register access is one volatile load or store of the register's
//! width, which is what a device needs to see; nothing hands out references to it.

use vm_memory::mmap::MmapRegion;
use vm_memory::VolatileMemory;

/// A memory-mapped BAR.
#[derive(Debug)]
pub struct Mmio {
    region: MmapRegion,
}

impl Mmio {
    pub(crate) fn new(region: MmapRegion) -> Self {
        Mmio { region }
    }

    /// Size of the BAR in bytes.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// Whether the BAR is empty (never, for a mapped device).
    pub fn is_empty(&self) -> bool {
        self.region.len() == 0
    }

    /// Whether a 32-bit register at `offset` lies inside the BAR. Drivers check offsets they
    /// compute from device-reported values (doorbell stride) with this before using them.
    pub fn contains32(&self, offset: usize) -> bool {
        offset % 4 == 0 && offset.checked_add(4).is_some_and(|end| end <= self.len())
    }

    /// Volatile 32-bit load. Offsets are the driver's own register offsets, checked against
    /// the BAR size when the controller is opened, so a bad one is a driver bug.
    #[inline]
    pub fn read32(&self, offset: usize) -> u32 {
        match self.region.get_ref::<u32>(offset) {
            Ok(r) => r.load(),
            Err(e) => panic!(
                "MMIO read at {offset:#x} outside the {:#x}-byte BAR: {e}",
                self.len()
            ),
        }
    }

    /// Volatile 32-bit store.
    #[inline]
    pub fn write32(&self, offset: usize, value: u32) {
        match self.region.get_ref::<u32>(offset) {
            Ok(r) => r.store(value),
            Err(e) => panic!(
                "MMIO write at {offset:#x} outside the {:#x}-byte BAR: {e}",
                self.len()
            ),
        }
    }

    /// A 64-bit register read as two 32-bit halves, low first, which every NVMe
    /// controller accepts (NVMe base spec 3.1.2: registers may be accessed in 32-bit units).
    pub fn read64(&self, offset: usize) -> u64 {
        let lo = self.read32(offset) as u64;
        let hi = self.read32(offset + 4) as u64;
        lo | (hi << 32)
    }

    /// A 64-bit register written as two 32-bit halves, low first.
    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}
