//! The VFIO container: one IOMMU domain shared by every device nvcopy opens, so that one
//! DMA pool mapping serves all controllers. Type1 goes through vfio-ioctls; no-IOMMU
//! mode, which vfio-ioctls does not support, uses the raw ioctls in [`crate::ioctl`].

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};

use crate::device::{DeviceHandle, PciDevice};
use crate::error::{Error, Result};
use crate::ioctl;
use crate::iova::{Iova, IovaSpace};
use crate::pci::{PciAddress, Sysfs};

/// How devices reach memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuMode {
    /// Through the IOMMU (VFIO type1): the safe default.
    Type1,
    /// With physical addresses and no isolation (`/dev/vfio/noiommu-N`). Only when the
    /// user asks for it by name: a misprogrammed device can then overwrite any memory.
    NoIommu,
}

enum Backend {
    Type1(Arc<VfioContainer>),
    NoIommu {
        container: File,
        /// Open groups must stay open while their devices are in use.
        groups: Mutex<Vec<File>>,
    },
}

/// The platform: a VFIO container and the devices and DMA memory attached to it.
pub struct Vfio {
    mode: IommuMode,
    sysfs: Sysfs,
    dev_dir: PathBuf,
    backend: Backend,
    iova: Mutex<Option<IovaSpace>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Vfio {
    /// Opens the VFIO container in the given mode.
    pub fn new(mode: IommuMode) -> Result<Arc<Vfio>> {
        Self::with_paths(mode, Sysfs::default(), PathBuf::from("/dev/vfio"))
    }

    /// Like [`Vfio::new`] with sysfs and /dev/vfio elsewhere (for tests).
    pub fn with_paths(mode: IommuMode, sysfs: Sysfs, dev_dir: PathBuf) -> Result<Arc<Vfio>> {
        let node = dev_dir.join("vfio");
        if !node.exists() {
            return Err(Error::VfioMissing { path: node });
        }
        let backend = match mode {
            IommuMode::Type1 => {
                let c = VfioContainer::new(None).map_err(|e| match e {
                    VfioError::OpenContainer(io) => Error::io(format!("opening {}", node.display()), io),
                    other => Error::io(
                        format!("setting up a type1 VFIO container ({other}); is vfio_iommu_type1 loaded?"),
                        io::Error::other("no type1 IOMMU support"),
                    ),
                })?;
                Backend::Type1(Arc::new(c))
            }
            IommuMode::NoIommu => {
                let container = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&node)
                    .map_err(|e| Error::io(format!("opening {}", node.display()), e))?;
                let ok = ioctl::check_extension(&container, ioctl::VFIO_NOIOMMU_IOMMU)
                    .map_err(|e| Error::io("asking VFIO for no-IOMMU support", e))?;
                if !ok {
                    return Err(Error::io(
                        "no-IOMMU mode: this kernel's vfio has no no-IOMMU support; load vfio with \
                         enable_unsafe_noiommu_mode=1 (needs CONFIG_VFIO_NOIOMMU)",
                        io::Error::from(io::ErrorKind::Unsupported),
                    ));
                }
                Backend::NoIommu {
                    container,
                    groups: Mutex::new(Vec::new()),
                }
            }
        };
        Ok(Arc::new(Vfio {
            mode,
            sysfs,
            dev_dir,
            backend,
            iova: Mutex::new(None),
        }))
    }

    /// The IOMMU mode this container was opened in.
    pub fn mode(&self) -> IommuMode {
        self.mode
    }

    /// The sysfs this platform reads.
    pub fn sysfs(&self) -> &Sysfs {
        &self.sysfs
    }

    /// Opens a PCI function bound to vfio-pci, resets it where it supports reset, maps
    /// BAR0 and enables memory decoding and bus mastering.
    pub fn open(self: &Arc<Self>, addr: PciAddress) -> Result<PciDevice> {
        let group = self.sysfs.vfio_group_of(addr)?;
        let type1_node = self.dev_dir.join(group.to_string());
        let noiommu_node = self.dev_dir.join(format!("noiommu-{group}"));
        let (handle, file) = match &self.backend {
            Backend::Type1(container) => {
                if !type1_node.exists() && noiommu_node.exists() {
                    return Err(Error::NoIommuNotRequested {
                        addr,
                        path: noiommu_node,
                    });
                }
                let sysfs_path = self.sysfs.device_path(addr)?;
                let dev = VfioDevice::new(&sysfs_path, container.clone(), false)
                    .map_err(|e| self.open_error(addr, group, &type1_node, e))?;
                let file = dup_device_fd(&dev, addr)?;
                (DeviceHandle::Type1(dev), file)
            }
            Backend::NoIommu { container, groups } => {
                if !noiommu_node.exists() && type1_node.exists() {
                    return Err(Error::NoIommuUnavailable {
                        addr,
                        path: type1_node,
                    });
                }
                let group_file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&noiommu_node)
                    .map_err(|e| open_node_error(addr, &noiommu_node, e))?;
                let viable = ioctl::group_viable(&group_file).map_err(|e| {
                    Error::io(
                        format!("{addr}: reading the status of {}", noiommu_node.display()),
                        e,
                    )
                })?;
                if !viable {
                    return Err(Error::GroupNotViable {
                        addr,
                        group,
                        members: self.sysfs.group_members(group),
                    });
                }
                let mut groups = lock(groups);
                ioctl::group_set_container(&group_file, container).map_err(|e| {
                    Error::io(
                        format!("{addr}: adding {} to the container", noiommu_node.display()),
                        e,
                    )
                })?;
                if groups.is_empty() {
                    ioctl::set_iommu(container, ioctl::VFIO_NOIOMMU_IOMMU).map_err(|e| {
                        Error::io(format!("{addr}: selecting the no-IOMMU backend"), e)
                    })?;
                }
                let file =
                    ioctl::group_get_device(&group_file, &addr.to_string()).map_err(|e| {
                        Error::io(
                            format!("{addr}: getting the device from {}", noiommu_node.display()),
                            e,
                        )
                    })?;
                groups.push(group_file);
                let handle_file = file
                    .try_clone()
                    .map_err(|e| Error::io(format!("{addr}: duplicating the device fd"), e))?;
                (DeviceHandle::NoIommu(handle_file), file)
            }
        };
        PciDevice::setup(self.clone(), addr, handle, file)
    }

    /// Turns a vfio-ioctls open failure into the error that says what to do.
    fn open_error(&self, addr: PciAddress, group: u32, node: &Path, e: VfioError) -> Error {
        match e {
            VfioError::OpenGroup(io, _) => open_node_error(addr, node, io),
            VfioError::GroupViable => Error::GroupNotViable {
                addr,
                group,
                members: self.sysfs.group_members(group),
            },
            source => Error::Vfio {
                addr,
                op: "open device",
                source,
            },
        }
    }

    /// Reserves `size` bytes of IOVA space. Type1 only; available once a device is open,
    /// because the IOMMU's ranges are known only then.
    pub(crate) fn alloc_iova(&self, size: usize) -> Result<Iova> {
        let Backend::Type1(container) = &self.backend else {
            return Err(Error::NoDeviceYet);
        };
        let mut space = lock(&self.iova);
        if space.is_none() {
            let ranges =
                ioctl::iova_ranges(container.as_ref()).map_err(|e| match e.raw_os_error() {
                    Some(libc::EINVAL) => Error::NoDeviceYet,
                    _ => Error::io("reading the IOMMU's usable IOVA ranges", e),
                })?;
            *space = Some(IovaSpace::new(ranges));
        }
        let space = space.as_mut().ok_or(Error::NoDeviceYet)?;
        space.alloc(size).ok_or_else(|| Error::IovaExhausted {
            size,
            ranges: space.describe(),
        })
    }

    /// Maps `size` bytes at `vaddr` to `iova` in the container's IOMMU domain.
    ///
    /// # Safety
    /// Until [`Vfio::dma_unmap`] is called for the same range, the memory at
    /// `vaddr..vaddr + size` must stay mapped, and may only be accessed through raw pointers
    /// with volatile or atomic operations, because the device writes it at any time.
    pub(crate) unsafe fn dma_map(&self, iova: Iova, size: usize, vaddr: *mut u8) -> Result<()> {
        let Backend::Type1(container) = &self.backend else {
            return Ok(());
        };
        // SAFETY: the caller upholds the mapping contract stated above, which is the one
        // vfio-ioctls documents for `vfio_dma_map`.
        unsafe { container.vfio_dma_map(iova.0, size, vaddr) }.map_err(|source| Error::DmaMap {
            iova,
            size,
            source,
        })
    }

    /// Removes a mapping made by [`Vfio::dma_map`].
    pub(crate) fn dma_unmap(&self, iova: Iova, size: usize) {
        if let Backend::Type1(container) = &self.backend {
            // Nothing useful can be done if the kernel refuses at teardown; the memory stays
            // pinned until the container closes, which the kernel then cleans up.
            let _ = container.vfio_dma_unmap(iova.0, size);
        }
    }
}

fn open_node_error(addr: PciAddress, node: &Path, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => Error::Permission {
            addr,
            path: node.to_path_buf(),
        },
        Some(libc::EBUSY) => Error::GroupBusy {
            addr,
            path: node.to_path_buf(),
        },
        _ => Error::io(format!("{addr}: opening {}", node.display()), e),
    }
}

/// A second fd on the device, owned by us, for config-space access, BAR mmap and reset.
fn dup_device_fd(dev: &VfioDevice, addr: PciAddress) -> Result<File> {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: `dev` owns this fd and outlives the borrow, which ends in this function.
    let fd = unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) };
    fd.try_clone_to_owned()
        .map(File::from)
        .map_err(|e| Error::io(format!("{addr}: duplicating the device fd"), e))
}

impl std::fmt::Debug for Vfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vfio")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}
