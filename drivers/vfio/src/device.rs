//! An open vfio-pci function: its BAR0 mapping and the PCI config-space bits a polled
//! driver needs (memory decoding and bus mastering on, legacy interrupts off).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::FileOffset;

use crate::container::Vfio;
use crate::error::{Error, Result};
use crate::ioctl;
use crate::mmio::Mmio;
use crate::pci::PciAddress;

/// PCI command register (PCI Local Bus spec 6.2.2) and the bits nvcopy sets in it.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// Keeps the device open the way its mode requires.
pub(crate) enum DeviceHandle {
    /// vfio-ioctls' device, which also holds the group in its container.
    Type1(#[allow(dead_code)] vfio_ioctls::VfioDevice),
    /// A raw device fd from a no-IOMMU group.
    NoIommu(#[allow(dead_code)] File),
}

/// An open PCI function.
pub struct PciDevice {
    addr: PciAddress,
    vfio: Arc<Vfio>,
    bar0: Mmio,
    file: File,
    config_offset: u64,
    can_reset: bool,
    // Dropped last: closing it returns the device to the group.
    _handle: DeviceHandle,
}

impl PciDevice {
    pub(crate) fn setup(
        vfio: Arc<Vfio>,
        addr: PciAddress,
        handle: DeviceHandle,
        file: File,
    ) -> Result<PciDevice> {
        // vfio-pci resets the function as it opens the device fd (when the function has a
        // reset method), so the controller starts clean without a second reset here: each
        // PCIe function-level reset costs at least 100 ms of waiting.
        let can_reset = ioctl::reset_supported(&file)
            .map_err(|e| Error::io(format!("{addr}: reading device info"), e))?;
        let config = ioctl::region_info(&file, ioctl::VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|e| Error::io(format!("{addr}: reading config-space region info"), e))?;
        let bar = ioctl::region_info(&file, ioctl::VFIO_PCI_BAR0_REGION_INDEX)
            .map_err(|e| Error::io(format!("{addr}: reading BAR0 region info"), e))?;
        if bar.flags & ioctl::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x1000 {
            return Err(Error::Bar0NotMappable {
                addr,
                flags: bar.flags,
                size: bar.size,
            });
        }
        let map_file = file
            .try_clone()
            .map_err(|e| Error::io(format!("{addr}: duplicating the device fd"), e))?;
        let region: MmapRegion = MmapRegionBuilder::new(bar.size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .with_file_offset(FileOffset::new(map_file, bar.offset))
            .build()
            .map_err(|e| {
                Error::io(
                    format!("{addr}: mapping BAR0"),
                    std::io::Error::other(e.to_string()),
                )
            })?;
        let dev = PciDevice {
            addr,
            vfio,
            bar0: Mmio::new(region),
            file,
            config_offset: config.offset,
            can_reset,
            _handle: handle,
        };
        let cmd = dev.config_read_u16(PCI_COMMAND)?;
        dev.config_write_u16(
            PCI_COMMAND,
            cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE,
        )?;
        Ok(dev)
    }

    /// The device's address.
    pub fn addr(&self) -> PciAddress {
        self.addr
    }

    /// The platform it was opened on.
    pub fn vfio(&self) -> &Arc<Vfio> {
        &self.vfio
    }

    /// BAR0, where NVMe keeps its registers and doorbells.
    pub fn bar0(&self) -> &Mmio {
        &self.bar0
    }

    /// Whether the function can be reset; if so, vfio-pci reset it when it was opened.
    pub fn can_reset(&self) -> bool {
        self.can_reset
    }

    /// Resets the function again (for recovery after a fatal device error), then turns
    /// memory decoding and bus mastering back on.
    pub fn reset(&self) -> Result<()> {
        let what = || format!("{}: resetting the device", self.addr);
        if !self.can_reset {
            return Err(Error::io(
                what(),
                std::io::Error::from(std::io::ErrorKind::Unsupported),
            ));
        }
        ioctl::reset_device(&self.file).map_err(|e| Error::io(what(), e))?;
        let cmd = self.config_read_u16(PCI_COMMAND)?;
        self.config_write_u16(
            PCI_COMMAND,
            cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE,
        )
    }

    /// Clears Bus Master Enable in the PCI command register (PCI Local Bus spec 6.2.2), so
    /// the function can start no more memory transactions, and reads the register back.
    /// `Ok(true)` only when the read-back shows the bit clear; a function that no longer
    /// answers reads all ones and is not confirmed. The read-back is a non-posted request
    /// whose completion cannot pass the function's earlier posted writes, so memory
    /// writes it issued before the bit cleared have landed when this returns.
    pub fn disable_bus_master(&self) -> Result<bool> {
        let cmd = self.config_read_u16(PCI_COMMAND)?;
        self.config_write_u16(PCI_COMMAND, cmd & !PCI_COMMAND_MASTER)?;
        let now = self.config_read_u16(PCI_COMMAND)?;
        Ok(now != u16::MAX && now & PCI_COMMAND_MASTER == 0)
    }

    /// Reads a 16-bit config-space register.
    pub fn config_read_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.file
            .read_exact_at(&mut b, self.config_offset + offset)
            .map_err(|e| {
                Error::io(
                    format!("{}: reading config space at {offset:#x}", self.addr),
                    e,
                )
            })?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a 16-bit config-space register.
    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.file
            .write_all_at(&value.to_le_bytes(), self.config_offset + offset)
            .map_err(|e| {
                Error::io(
                    format!("{}: writing config space at {offset:#x}", self.addr),
                    e,
                )
            })
    }
}

impl Drop for PciDevice {
    fn drop(&mut self) {
        // Stop the device from reaching memory once its driver is done with it.
        let _ = self.disable_bus_master();
    }
}
