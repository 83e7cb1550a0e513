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

/// Prints how long each bring-up step took when NVCOPY_TRACE=1: start-up is most of a
/// short copy's wall time, and this says which step to blame.
pub(crate) struct StartupTrace {
    on: bool,
    start: std::time::Instant,
    last: std::time::Instant,
}

impl StartupTrace {
    pub(crate) fn new() -> Self {
        let now = std::time::Instant::now();
        StartupTrace {
            on: std::env::var_os("NVCOPY_TRACE").is_some_and(|v| v == "1"),
            start: now,
            last: now,
        }
    }

    pub(crate) fn step(&mut self, what: impl std::fmt::Display) {
        if self.on {
            let now = std::time::Instant::now();
            eprintln!(
                "nvcopy: trace: {:>8.2} ms  (+{:.2} ms) {what}",
                (now - self.start).as_secs_f64() * 1e3,
                (now - self.last).as_secs_f64() * 1e3
            );
            self.last = now;
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
        // Options that can never work are refused before any device is touched.
        opts.page_kind.check_mode(opts.mode)?;
        // Sysfs first: "no such device" and "not bound to vfio-pci" are the likelier
        // mistakes, and they say more than a missing /dev/vfio would.
        let mut trace = StartupTrace::new();
        let sysfs = nvcopy_vfio::Sysfs::default();
        for &a in addrs {
            sysfs.vfio_group_of(a)?;
        }
        trace.step("sysfs checks");
        let vfio = Vfio::new(opts.mode)?;
        trace.step("VFIO container");
        let mut unique: Vec<PciAddress> = Vec::new();
        for a in addrs {
            if !unique.contains(a) {
                unique.push(*a);
            }
        }
        // Opening a device waits for the kernel's function reset (100 ms or more): open
        // them all at once so that the waits overlap.
        let results: Vec<_> = std::thread::scope(|s| {
            let vfio = &vfio;
            let handles: Vec<_> = unique
                .iter()
                .map(|&a| s.spawn(move || vfio.open(a)))
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let mut devices = Vec::with_capacity(unique.len());
        for (a, r) in unique.iter().zip(results) {
            match r {
                Ok(dev) => devices.push(dev?),
                Err(_) => {
                    return Err(crate::Error::Panicked {
                        what: format!("{a}: opening the device"),
                    })
                }
            }
        }
        trace.step(format_args!(
            "{} VFIO device(s) opened (reset by vfio-pci), BAR0 mapped",
            devices.len()
        ));
        let pool = DmaPool::new(&vfio, opts.pool_bytes, opts.page_kind)?;
        trace.step(format_args!(
            "DMA pool of {} MiB mapped",
            opts.pool_bytes >> 20
        ));
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
            trace.step(format_args!("{name}: controller enabled and identified"));
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
