//! PCI addresses and what sysfs says about a function: its driver, its IOMMU group and
//! its class. nvcopy reads sysfs before touching /dev/vfio so that a wrongly prepared
//! device gets an error that names the fix rather than a bare errno.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

/// PCI class code of an NVMe controller: mass storage (01), NVM (08), NVMe I/O (02).
pub const NVME_CLASS: u32 = 0x01_08_02;

/// A PCI function address, `DDDD:BB:DD.F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI segment (domain).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0 to 31.
    pub device: u8,
    /// Function number, 0 to 7.
    pub function: u8,
}

impl FromStr for PciAddress {
    type Err = Error;

    /// Accepts `0000:00:10.0` and the short form `00:10.0` (segment 0).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadPciAddress {
            input: s.to_string(),
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (*d, *b, *df),
            [b, df] => ("0000", *b, *df),
            _ => return Err(bad()),
        };
        let (dev, func) = devfn.split_once('.').ok_or_else(bad)?;
        let hex = |t: &str, max_len: usize| -> Result<u32> {
            if t.is_empty() || t.len() > max_len || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(t, 16).map_err(|_| bad())
        };
        let domain = hex(domain, 4)?;
        let bus = hex(bus, 2)?;
        let device = hex(dev, 2)?;
        let function = hex(func, 1)?;
        if device > 31 || function > 7 {
            return Err(bad());
        }
        Ok(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// Where sysfs is. Tests point this at a fake tree.
#[derive(Clone, Debug)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
        }
    }
}

/// What sysfs says about one PCI function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Its address.
    pub addr: PciAddress,
    /// Class code (24 bits).
    pub class: u32,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// The bound driver's name, if any.
    pub driver: Option<String>,
    /// The IOMMU group number, if the function has one.
    pub iommu_group: Option<u32>,
}

impl Sysfs {
    /// A sysfs rooted somewhere other than /sys.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    fn device_dir(&self, addr: PciAddress) -> PathBuf {
        self.root.join("bus/pci/devices").join(addr.to_string())
    }

    /// The sysfs directory of a function, which is also what VFIO calls the device's path.
    pub fn device_path(&self, addr: PciAddress) -> Result<PathBuf> {
        let dir = self.device_dir(addr);
        if dir.exists() {
            Ok(dir)
        } else {
            Err(Error::DeviceNotFound { addr })
        }
    }

    /// Reads one function's identity, driver and group.
    pub fn function(&self, addr: PciAddress) -> Result<PciFunction> {
        let dir = self.device_path(addr)?;
        let read_hex = |name: &str| -> u32 {
            fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
                .unwrap_or(0)
        };
        Ok(PciFunction {
            addr,
            class: read_hex("class"),
            vendor: read_hex("vendor") as u16,
            device: read_hex("device") as u16,
            driver: link_name(&dir.join("driver")),
            iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
        })
    }

    /// Every function of the given class, sorted by address.
    pub fn functions_of_class(&self, class: u32) -> Result<Vec<PciFunction>> {
        let dir = self.root.join("bus/pci/devices");
        let entries =
            fs::read_dir(&dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Some(addr) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let f = self.function(addr)?;
            if f.class == class {
                found.push(f);
            }
        }
        found.sort_by_key(|f| f.addr);
        Ok(found)
    }

    /// The members of an IOMMU group with their drivers, for error messages.
    pub fn group_members(&self, group: u32) -> String {
        let dir = self
            .root
            .join("kernel/iommu_groups")
            .join(group.to_string())
            .join("devices");
        let mut members: Vec<String> = fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.parse::<PciAddress>().ok())
                    })
                    .map(|a| {
                        let drv = self.function(a).ok().and_then(|f| f.driver);
                        format!("{a} ({})", drv.as_deref().unwrap_or("no driver"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        members.sort();
        members.join(", ")
    }

    /// Checks that `addr` exists, is bound to vfio-pci and has an IOMMU group, and returns
    /// that group. These are the three things a user most often forgets.
    pub fn vfio_group_of(&self, addr: PciAddress) -> Result<u32> {
        let f = self.function(addr)?;
        match f.driver.as_deref() {
            Some("vfio-pci") => {}
            other => {
                return Err(Error::NotBoundToVfio {
                    addr,
                    driver: other.unwrap_or("no driver").to_string(),
                })
            }
        }
        f.iommu_group.ok_or(Error::NoIommuGroup { addr })
    }
}

/// The last component of a symlink's target (`driver -> ../../bus/pci/drivers/nvme`).
fn link_name(link: &Path) -> Option<String> {
    fs::read_link(link)
        .ok()
        .and_then(|t| t.file_name().and_then(|n| n.to_str()).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn parses_and_prints_addresses() {
        let a: PciAddress = "0000:00:10.0".parse().unwrap();
        assert_eq!(
            a,
            PciAddress {
                domain: 0,
                bus: 0,
                device: 0x10,
                function: 0
            }
        );
        assert_eq!(a.to_string(), "0000:00:10.0");
        let b: PciAddress = "3a:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:3a:1f.7");
        for bad in [
            "",
            "00:10",
            "0000:00:20.0",
            "0000:00:10.8",
            "zz:00.0",
            "0:0:0:0.0",
            "00000:00:10.0",
        ] {
            assert!(
                matches!(bad.parse::<PciAddress>(), Err(Error::BadPciAddress { .. })),
                "{bad}"
            );
        }
    }

    /// Builds a fake sysfs with one NVMe function bound to `driver`.
    fn fake_sysfs(driver: Option<&str>, group: Option<u32>) -> (PathBuf, PciAddress) {
        let root = std::env::temp_dir().join(format!(
            "nvcopy-sysfs-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let addr: PciAddress = "0000:00:10.0".parse().unwrap();
        let dev = root.join("devices/pci0000:00").join(addr.to_string());
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("class"), "0x010802\n").unwrap();
        fs::write(dev.join("vendor"), "0x1b36\n").unwrap();
        fs::write(dev.join("device"), "0x0010\n").unwrap();
        if let Some(d) = driver {
            let ddir = root.join("bus/pci/drivers").join(d);
            fs::create_dir_all(&ddir).unwrap();
            symlink(&ddir, dev.join("driver")).unwrap();
        }
        if let Some(g) = group {
            let gdir = root.join("kernel/iommu_groups").join(g.to_string());
            fs::create_dir_all(gdir.join("devices")).unwrap();
            symlink(&dev, gdir.join("devices").join(addr.to_string())).unwrap();
            symlink(&gdir, dev.join("iommu_group")).unwrap();
        }
        fs::create_dir_all(root.join("bus/pci/devices")).unwrap();
        symlink(&dev, root.join("bus/pci/devices").join(addr.to_string())).unwrap();
        (root, addr)
    }

    #[test]
    fn reads_function_and_lists_nvme() {
        let (root, addr) = fake_sysfs(Some("vfio-pci"), Some(7));
        let sysfs = Sysfs::at(&root);
        let f = sysfs.function(addr).unwrap();
        assert_eq!((f.class, f.vendor, f.device), (NVME_CLASS, 0x1b36, 0x0010));
        assert_eq!(f.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(f.iommu_group, Some(7));
        assert_eq!(sysfs.functions_of_class(NVME_CLASS).unwrap(), vec![f]);
        assert_eq!(sysfs.vfio_group_of(addr).unwrap(), 7);
        assert_eq!(sysfs.group_members(7), "0000:00:10.0 (vfio-pci)");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn explains_unbound_and_groupless_devices() {
        let (root, addr) = fake_sysfs(Some("nvme"), Some(3));
        let err = Sysfs::at(&root).vfio_group_of(addr).unwrap_err();
        assert!(matches!(&err, Error::NotBoundToVfio { driver, .. } if driver == "nvme"));
        assert!(
            err.to_string()
                .contains("scripts/setup.sh bind 0000:00:10.0"),
            "{err}"
        );
        fs::remove_dir_all(root).unwrap();

        let (root, addr) = fake_sysfs(None, None);
        let err = Sysfs::at(&root).vfio_group_of(addr).unwrap_err();
        assert!(matches!(&err, Error::NotBoundToVfio { driver, .. } if driver == "no driver"));
        fs::remove_dir_all(root).unwrap();

        let (root, addr) = fake_sysfs(Some("vfio-pci"), None);
        let err = Sysfs::at(&root).vfio_group_of(addr).unwrap_err();
        assert!(matches!(err, Error::NoIommuGroup { .. }));
        assert!(err.to_string().contains("intel_iommu=on"));
        fs::remove_dir_all(root).unwrap();

        let missing: PciAddress = "0000:00:1f.0".parse().unwrap();
        let err = Sysfs::at("/nonexistent")
            .vfio_group_of(missing)
            .unwrap_err();
        assert!(matches!(err, Error::DeviceNotFound { .. }));
    }
}
