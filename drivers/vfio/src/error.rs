//! The platform layer's one error type. Every variant names the device or resource it
//! concerns and says how to fix the cause, because these errors end up in front of a user
//! who is setting up a machine.

use std::io;
use std::path::PathBuf;

use crate::pci::PciAddress;

/// Errors from opening VFIO devices, mapping BARs and handing out DMA memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user typed something that is not a PCI address.
    #[error("invalid PCI address {input:?}: expected DDDD:BB:DD.F, for example 0000:00:10.0")]
    BadPciAddress {
        /// What was given.
        input: String,
    },

    /// Nothing at that address in sysfs.
    #[error(
        "no PCI function at {addr}: run `nvcopy list` to see the NVMe functions on this machine"
    )]
    DeviceNotFound {
        /// The address asked for.
        addr: PciAddress,
    },

    /// The device is bound to a driver other than vfio-pci, or to none.
    #[error(
        "{addr} is bound to {driver}, not vfio-pci: hand it to nvcopy with `scripts/setup.sh bind {addr}` \
         (and give it back with `scripts/setup.sh reset {addr}`)"
    )]
    NotBoundToVfio {
        /// The device.
        addr: PciAddress,
        /// Its current driver, or "no driver".
        driver: String,
    },

    /// The device has no IOMMU group, so VFIO cannot isolate it.
    #[error(
        "{addr} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel \
         command line), or, on a machine without one, load vfio with enable_unsafe_noiommu_mode=1 \
         and ask for no-IOMMU mode by name (--noiommu)"
    )]
    NoIommuGroup {
        /// The device.
        addr: PciAddress,
    },

    /// The VFIO container node is missing: the modules are not loaded.
    #[error("VFIO is not available ({path} is missing): load it with `modprobe vfio-pci`")]
    VfioMissing {
        /// The node looked for.
        path: PathBuf,
    },

    /// Opening a VFIO node failed for lack of rights.
    #[error("permission denied opening {path} for {addr}: run nvcopy as root, or give your user that VFIO node")]
    Permission {
        /// The device.
        addr: PciAddress,
        /// The node that refused.
        path: PathBuf,
    },

    /// Another process (or another handle in this one) holds the group.
    #[error("{addr}: VFIO group node {path} is busy: another process is using the device; stop it first")]
    GroupBusy {
        /// The device.
        addr: PciAddress,
        /// The group node.
        path: PathBuf,
    },

    /// Some other device in the group is still bound to a host driver.
    #[error(
        "IOMMU group {group} of {addr} is not viable: every device in the group must be bound to \
         vfio-pci or to no driver (group members: {members}); bind them with `scripts/setup.sh bind`"
    )]
    GroupNotViable {
        /// The device.
        addr: PciAddress,
        /// Its IOMMU group.
        group: u32,
        /// The group's members with their drivers.
        members: String,
    },

    /// The device sits in a no-IOMMU group but the user did not ask for that mode.
    #[error(
        "{addr} is in no-IOMMU mode ({path}): pass --noiommu to use it anyway; without an IOMMU the \
         device can write anywhere in memory"
    )]
    NoIommuNotRequested {
        /// The device.
        addr: PciAddress,
        /// The no-IOMMU group node that exists.
        path: PathBuf,
    },

    /// The user asked for no-IOMMU mode but the device has a real IOMMU group.
    #[error("{addr}: no-IOMMU mode was asked for, but the device has a real IOMMU group ({path}); drop --noiommu")]
    NoIommuUnavailable {
        /// The device.
        addr: PciAddress,
        /// The type1 group node that exists.
        path: PathBuf,
    },

    /// A call into vfio-ioctls failed.
    #[error("{addr}: VFIO {op} failed: {source}")]
    Vfio {
        /// The device.
        addr: PciAddress,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: vfio_ioctls::VfioError,
    },

    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the resource it was done to.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// BAR0 cannot be mmapped, so the registers cannot be reached without syscalls.
    #[error("{addr}: BAR0 cannot be memory-mapped (region flags {flags:#x}, size {size:#x}); is this an NVMe controller?")]
    Bar0NotMappable {
        /// The device.
        addr: PciAddress,
        /// VFIO region flags.
        flags: u32,
        /// Region size.
        size: u64,
    },

    /// Not enough hugepages reserved for the DMA pool.
    #[error(
        "not enough free 2 MiB hugepages: nvcopy needs {needed} ({mib} MiB) and {free} are free; reserve \
         them with `echo {suggest} > /proc/sys/vm/nr_hugepages` or `HUGEMEM={suggest_mib} scripts/setup.sh hugepages`"
    )]
    NoHugepages {
        /// Hugepages the pool needs.
        needed: usize,
        /// Size of the pool in MiB.
        mib: usize,
        /// Hugepages free now.
        free: usize,
        /// A total reservation that would do.
        suggest: usize,
        /// The same in MiB.
        suggest_mib: usize,
    },

    /// The IOMMU's usable address ranges have no room left.
    #[error("no room for {size:#x} bytes in the IOMMU's usable IOVA ranges ({ranges}); use a smaller pool")]
    IovaExhausted {
        /// Bytes asked for.
        size: usize,
        /// The ranges the IOMMU reported.
        ranges: String,
    },

    /// No-IOMMU mode with 4 KiB pages: the device would be given physical addresses of
    /// pages the kernel may move.
    #[error(
        "no-IOMMU mode cannot use 4 KiB pages (--small-pages): the device is given the pages' physical \
         addresses, and the kernel may migrate locked 4 KiB pages (compaction, NUMA balancing), after which \
         the device would read and write memory that is no longer the pool's. Reserve 2 MiB hugepages \
         (`scripts/setup.sh hugepages`) and drop --small-pages"
    )]
    NoIommuSmallPages,

    /// DMA memory was asked for before any device was opened.
    #[error(
        "DMA memory was requested before any VFIO device was opened: open the controllers first"
    )]
    NoDeviceYet,

    /// The pool has no run of free pages that large.
    #[error("DMA pool exhausted: no {len} contiguous bytes free ({free_pages} of {total_pages} 4 KiB pages free); raise the pool size")]
    PoolExhausted {
        /// Bytes asked for.
        len: usize,
        /// Pages free.
        free_pages: usize,
        /// Pages in the pool.
        total_pages: usize,
    },

    /// A buffer larger than what the pool can keep contiguous.
    #[error("a {len}-byte DMA buffer cannot be contiguous in this pool (largest is {max} bytes)")]
    BufferTooLarge {
        /// Bytes asked for.
        len: usize,
        /// The largest contiguous buffer.
        max: usize,
    },

    /// Mapping memory into the IOMMU failed.
    #[error("mapping {size:#x} bytes at IOVA {iova} into the IOMMU failed: {source}")]
    DmaMap {
        /// Where.
        iova: crate::Iova,
        /// How much.
        size: usize,
        /// The underlying error.
        #[source]
        source: vfio_ioctls::VfioError,
    },

    /// The physical address of a page could not be found (no-IOMMU mode).
    #[error("cannot find the physical address of {vaddr:#x} in /proc/self/pagemap ({reason}); no-IOMMU mode needs root (CAP_SYS_ADMIN)")]
    Pagemap {
        /// The virtual address.
        vaddr: usize,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Wraps an `io::Error` with what was being done.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// The platform layer's result type.
pub type Result<T> = std::result::Result<T, Error>;
