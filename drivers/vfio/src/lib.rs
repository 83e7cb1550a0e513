//! nvcopy's platform layer (what SPDK calls "env"): the only code that opens /dev/vfio,
//! maps device BARs and hands out DMA memory.
//!
//! - [`Vfio`] is a VFIO container, type1 through vfio-ioctls by default, or no-IOMMU mode
//!   when the user asks for it by name.
//! - [`PciDevice`] is an open vfio-pci function with BAR0 mapped ([`Mmio`]).
//! - [`DmaPool`] is hugepage memory mapped into the IOMMU at IOVAs from the ranges the
//!   kernel reports; [`DmaBuf`] is a piece of it, reached only by volatile access.
//! - [`Sysfs`] answers "which NVMe functions are there, and who drives them".

mod container;
mod device;
mod dma;
mod error;
mod ioctl;
mod iova;
mod mmio;
mod pci;

pub use container::{IommuMode, Vfio};
pub use device::PciDevice;
pub use dma::{DmaBuf, DmaPool, HostMemory, PageKind, HUGEPAGE_SIZE, PAGE_SIZE};
pub use error::{Error, Result};
pub use iova::Iova;
pub use mmio::Mmio;
pub use pci::{PciAddress, PciFunction, Sysfs, NVME_CLASS};
pub use vm_memory::{ByteValued, Bytes, VolatileMemory, VolatileSlice};
