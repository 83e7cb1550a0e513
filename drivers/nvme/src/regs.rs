//! Register access as the driver sees it. A real controller's BAR0 and the software
//! controller both implement [`Bar`], so the same driver code runs against either.

use nvcopy_vfio::{Mmio, PciDevice};

/// 32-bit register access to a controller's BAR0.
pub trait Bar: Send + Sync {
    /// Volatile 32-bit load.
    fn read32(&self, offset: usize) -> u32;
    /// Volatile 32-bit store.
    fn write32(&self, offset: usize, value: u32);
    /// Size of the register space in bytes.
    fn len(&self) -> usize;
    /// Whether the register space is empty (never, for a controller).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A 64-bit register as two 32-bit loads, low half first (base spec 3.1: the host may
    /// access 64-bit registers as two 32-bit accesses).
    fn read64(&self, offset: usize) -> u64 {
        self.read32(offset) as u64 | (self.read32(offset + 4) as u64) << 32
    }
    /// A 64-bit register as two 32-bit stores, low half first.
    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// Stops the device from doing any more DMA by means other than its registers: PCI
    /// bus mastering off (PCI Local Bus spec 6.2.2, Bus Master Enable). This is the way
    /// to make a controller quiet when clearing CC.EN does not (CSTS.RDY stays 1), so
    /// that buffers of commands that never completed can be reused.
    ///
    /// True only when the device confirmed it; false when it cannot be done here or was
    /// not confirmed, in which case the device may still write host memory. The default
    /// is false: a bare register window has no such control.
    fn quiesce(&self) -> bool {
        false
    }
}

impl Bar for Mmio {
    fn read32(&self, offset: usize) -> u32 {
        Mmio::read32(self, offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        Mmio::write32(self, offset, value)
    }
    fn len(&self) -> usize {
        Mmio::len(self)
    }
}

impl Bar for PciDevice {
    fn read32(&self, offset: usize) -> u32 {
        self.bar0().read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        self.bar0().write32(offset, value)
    }
    fn len(&self) -> usize {
        self.bar0().len()
    }
    fn quiesce(&self) -> bool {
        self.disable_bus_master().unwrap_or(false)
    }
}
