//! Bringing up the hardware for a run: open every named controller through VFIO, map one
//! DMA pool shared by all of them, and initialise each controller on it. The devices are
//! opened before the pool because the IOMMU's usable IOVA ranges are known only once a
//! group is attached to the container.

use std::sync::Arc;

use nvcopy_nvme::{Bar, Controller, ControllerOptions};
use nvcopy_vfio::{DmaPool, IommuMode, PageKind, PciAddress, Vfio};

use crate::error::Result;

/// How to bring the hardware up.
#[derive(Clone, Debug)]
pub struct PlatformOptions {
    /// Type1 (default) or no-IOMMU.
    pub mode: IommuMode,
    /// Bytes of DMA memory to map.
    pub pool_bytes: usize,
    /// Hugepages (default) or 4 KiB pages.
    pub page_kind: PageKind,
    /// Controller bring-up settings.
    pub controller: ControllerOptions,
}

impl Default for PlatformOptions {
    fn default() -> Self {
        PlatformOptions {
            mode: IommuMode::Type1,
            pool_bytes: 8 << 20,
            page_kind: PageKind::Huge,
            controller: ControllerOptions::default(),
        }
    }
}

/// Controllers ready for I/O and the memory they share.
pub struct Platform {
    /// The VFIO container.
    pub vfio: Arc<Vfio>,
    /// The shared DMA pool.
    pub pool: DmaPool,
    /// One per address given, in the same order.
    pub controllers: Vec<Arc<Controller>>,
}

impl Platform {
    /// Opens and initialises the controllers at `addrs` (duplicates are opened once).
    pub fn open(addrs: &[PciAddress], opts: &PlatformOptions) -> Result<Platform> {
        // Sysfs first: "no such device" and "not bound to vfio-pci" are the likelier
        // mistakes, and they say more than a missing /dev/vfio would.
        let sysfs = nvcopy_vfio::Sysfs::default();
        for &a in addrs {
            sysfs.vfio_group_of(a)?;
        }
        let vfio = Vfio::new(opts.mode)?;
        let mut unique: Vec<PciAddress> = Vec::new();
        for a in addrs {
            if !unique.contains(a) {
                unique.push(*a);
            }
        }
        let devices = unique
            .iter()
            .map(|&a| vfio.open(a))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let pool = DmaPool::new(&vfio, opts.pool_bytes, opts.page_kind)?;
        let mut opened = Vec::with_capacity(devices.len());
        for dev in devices {
            let name = dev.addr().to_string();
            let bar: Arc<dyn Bar> = Arc::new(dev);
            opened.push(Controller::new(
                &name,
                bar,
                pool.clone(),
                opts.controller.clone(),
            )?);
        }
        let controllers = addrs
            .iter()
            .filter_map(|a| {
                unique
                    .iter()
                    .position(|u| u == a)
                    .map(|i| opened[i].clone())
            })
            .collect();
        Ok(Platform {
            vfio,
            pool,
            controllers,
        })
    }
}
