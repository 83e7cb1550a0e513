//! Bringing up the hardware for a run: open every named controller through VFIO, map one
//! DMA pool shared by all of them, and initialise each controller on it. The pool is
//! mapped into the IOMMU after the devices are opened because the IOMMU's usable IOVA
//! ranges are known only once a group is attached to the container; its memory is taken
//! meanwhile. And the way down: shut the controllers down and close them.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Instant;

use nvcopy_nvme::{Bar, Controller, ControllerOptions};
use nvcopy_vfio::{DmaPool, HostMemory, IommuMode, PageKind, PciAddress, Vfio};

use crate::endpoint::nvme::NvmeDevice;
use crate::endpoint::Devices;
use crate::error::Result;
use crate::trace;

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

/// Joins a scoped thread, turning a panic into an error that names `what`.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>, what: impl Display) -> Result<T> {
    h.join().map_err(|_| crate::Error::Panicked {
        what: what.to_string(),
    })?
}

impl Platform {
    /// Opens and initialises the controllers at `addrs` (duplicates are opened once).
    ///
    /// Opening a device waits for vfio-pci's function reset (100 ms or more), so the
    /// devices are opened at once, in one thread each, while another thread takes the
    /// pool's memory; the memory is mapped into the IOMMU once the devices are open
    /// (its usable ranges are known only then), and the controllers are brought up at
    /// once too. Errors come in that order: devices, pool, controllers.
    pub fn open(addrs: &[PciAddress], opts: &PlatformOptions) -> Result<Platform> {
        // Options that can never work are refused before any device is touched.
        opts.page_kind.check_mode(opts.mode)?;
        // Sysfs first: "no such device" and "not bound to vfio-pci" are the likelier
        // mistakes, and they say more than a missing /dev/vfio would.
        let sysfs = nvcopy_vfio::Sysfs::default();
        for &a in addrs {
            sysfs.vfio_group_of(a)?;
        }
        trace::step("sysfs checks");
        let vfio = Vfio::new(opts.mode)?;
        trace::step("VFIO container opened");
        let mut unique: Vec<PciAddress> = Vec::new();
        for a in addrs {
            if !unique.contains(a) {
                unique.push(*a);
            }
        }
        let (pool, opened) = std::thread::scope(|s| -> Result<(DmaPool, Vec<Arc<Controller>>)> {
            let vfio = &vfio;
            let opens: Vec<_> = unique
                .iter()
                .map(|&a| {
                    s.spawn(move || {
                        let t = Instant::now();
                        let d = vfio.open(a);
                        trace::span(
                            t,
                            format_args!(
                                "{a}: VFIO device opened (reset by vfio-pci), BAR0 mapped"
                            ),
                        );
                        Ok(d?)
                    })
                })
                .collect();
            // Spawned after the opens: while it populates the memory it holds the
            // process's mmap lock, which spawning a thread (its stack) waits for.
            let memory = s.spawn(|| {
                let t = Instant::now();
                let m = HostMemory::new(opts.pool_bytes, opts.page_kind);
                trace::span(
                    t,
                    format_args!(
                        "DMA pool: {} MiB of memory taken and populated",
                        opts.pool_bytes.div_ceil(1 << 20)
                    ),
                );
                Ok(m?)
            });
            let mut devices = Vec::with_capacity(unique.len());
            for (a, h) in unique.iter().zip(opens) {
                devices.push(join(h, format_args!("{a}: opening the device"))?);
            }
            trace::step(format_args!("{} VFIO device(s) opened", devices.len()));
            let memory = join(memory, "taking the DMA pool's memory")?;
            trace::step("DMA pool's memory ready");
            let pool = DmaPool::map(vfio, memory)?;
            trace::step("DMA pool mapped into the IOMMU");
            let ups: Vec<_> = devices
                .into_iter()
                .map(|dev| {
                    let pool = pool.clone();
                    s.spawn(move || {
                        let t = Instant::now();
                        let name = dev.addr().to_string();
                        let bar: Arc<dyn Bar> = Arc::new(dev);
                        let c = Controller::new(&name, bar, pool, opts.controller.clone());
                        trace::span(t, format_args!("{name}: controller enabled and identified"));
                        Ok(c?)
                    })
                })
                .collect();
            let mut opened = Vec::with_capacity(unique.len());
            for (a, h) in unique.iter().zip(ups) {
                opened.push(join(h, format_args!("{a}: bringing the controller up"))?);
            }
            trace::step(format_args!("{} controller(s) ready", opened.len()));
            Ok((pool, opened))
        })?;
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

    /// Shuts the controllers down and closes them, all at once (see
    /// [`close_devices`]); the pool is unmapped when its last user goes. Dropping a
    /// platform does the same one controller after another.
    pub fn close(self) {
        let mut unique: Vec<Arc<Controller>> = Vec::new();
        for c in self.controllers {
            if !unique.iter().any(|u| Arc::ptr_eq(u, &c)) {
                unique.push(c);
            }
        }
        close_devices(unique.into_iter().map(NvmeDevice::shared).collect());
        drop(self.pool);
        trace::step("DMA pool unmapped");
    }
}

/// Shuts every device down (NVMe: CC.SHN) and closes it, in one thread each: closing a
/// VFIO device makes vfio-pci reset it, 100 ms or more each. A device something else
/// still holds is only shut down here and closed when its last holder lets go.
pub(crate) fn close_devices(devices: Devices) {
    std::thread::scope(|s| {
        for d in devices {
            s.spawn(move || {
                let name = d.name().to_string();
                let t = Instant::now();
                d.shutdown();
                trace::span(t, format_args!("{name}: shut down"));
                let t = Instant::now();
                drop(d);
                trace::span(t, format_args!("{name}: closed (reset by vfio-pci)"));
            });
        }
    });
    trace::step("devices shut down and closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noiommu_with_small_pages_is_refused_before_any_device_is_opened() {
        let opts = PlatformOptions {
            mode: IommuMode::NoIommu,
            page_kind: PageKind::Small,
            ..Default::default()
        };
        // No such function exists: had it looked for the device first, this would be a
        // "no PCI function" error.
        let addr: PciAddress = "0000:ff:1f.7".parse().unwrap();
        let e = match Platform::open(&[addr], &opts) {
            Ok(_) => panic!("no-IOMMU mode with 4 KiB pages was accepted"),
            Err(e) => e,
        };
        assert!(
            matches!(
                e,
                crate::Error::Platform(nvcopy_vfio::Error::NoIommuSmallPages)
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("migrate") && msg.contains("hugepages"),
            "{msg}"
        );
    }
}
