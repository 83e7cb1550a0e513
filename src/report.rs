//! What `nvcopy identify` and `nvcopy list` print, as plain data so that the text and the
//! `--json` forms say the same thing.

use std::fmt::Write as _;
use std::sync::Arc;

use nvcopy_nvme::Controller;
use nvcopy_vfio::PciFunction;
use serde::Serialize;

/// Limits of the Copy command on one namespace.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CopyLimits {
    /// Maximum Single Source Range Length, blocks.
    pub mssrl: u16,
    /// Maximum Copy Length, blocks.
    pub mcl: u32,
    /// Maximum Source Range Count.
    pub msrc: u16,
}

/// One namespace.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct NamespaceReport {
    /// Namespace id.
    pub nsid: u32,
    /// Logical block size, bytes.
    pub lba_size: u32,
    /// Size in blocks.
    pub blocks: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// Current LBA format index.
    pub lba_format: u8,
    /// Metadata bytes per block.
    pub metadata: u16,
    /// Whether nvcopy can do I/O on it, and if not, why.
    pub usable: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unusable_reason: Option<String>,
    /// Copy limits, when the controller supports Copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_limits: Option<CopyLimits>,
    /// Zones, for a zoned namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zones: Option<ZonesReport>,
}

/// A zoned namespace's zones.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ZonesReport {
    /// Zone size, bytes.
    pub zone_bytes: u64,
    /// Zones in the namespace.
    pub zones: u64,
    /// Most zones open at once; None: no limit.
    pub max_open: Option<u32>,
    /// Most zones active at once; None: no limit.
    pub max_active: Option<u32>,
    /// Zone Append Size Limit, bytes; None: MDTS.
    pub append_limit_bytes: Option<usize>,
    /// The zones the device reported (the first page of the report), as
    /// (first block, capacity in blocks, write pointer, state).
    pub reported: Vec<(u64, u64, u64, String)>,
}

/// The zones of `ns`, reading the first page of its zone report through a queue pair of
/// its own (none is read when the controller has no queue pair to spare).
fn zones_of(c: &Arc<Controller>, ns: &nvcopy_nvme::Namespace) -> Option<ZonesReport> {
    let z = ns.zoned?;
    let reported = c
        .create_io_qpair(8)
        .and_then(|mut q| q.report_zones_sync(ns, 0))
        .map(|(_, zones)| {
            zones
                .iter()
                .map(|z| {
                    (
                        z.start,
                        z.capacity,
                        z.write_pointer,
                        z.state.name().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Some(ZonesReport {
        zone_bytes: z.zone_blocks * ns.lba_size as u64,
        zones: ns.blocks.div_ceil(z.zone_blocks),
        max_open: z.max_open,
        max_active: z.max_active,
        append_limit_bytes: z.append_limit,
        reported,
    })
}

/// Optional commands.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct OptionalCommands {
    /// Copy (format 0).
    pub copy: bool,
    /// Write Zeroes.
    pub write_zeroes: bool,
    /// Dataset Management.
    pub dataset_management: bool,
    /// Doorbell Buffer Config.
    pub doorbell_buffer_config: bool,
}

/// One controller.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ControllerReport {
    /// PCI address.
    pub pci_address: String,
    /// Model number.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Firmware revision.
    pub firmware: String,
    /// NVMe version.
    pub version: String,
    /// MDTS as reported (0: no limit).
    pub mdts: u8,
    /// Largest transfer nvcopy issues, bytes.
    pub max_transfer_bytes: usize,
    /// I/O queue pairs granted.
    pub io_queues: usize,
    /// Maximum queue entries.
    pub max_queue_entries: u32,
    /// Optional commands.
    pub optional_commands: OptionalCommands,
    /// Active namespaces.
    pub namespaces: Vec<NamespaceReport>,
}

impl ControllerReport {
    /// Gathers the report from an initialised controller.
    pub fn new(c: &Arc<Controller>) -> Self {
        let info = c.info();
        ControllerReport {
            pci_address: c.name().to_string(),
            model: info.model.clone(),
            serial: info.serial.clone(),
            firmware: info.firmware.clone(),
            version: info.version_string(),
            mdts: info.mdts,
            max_transfer_bytes: c.max_transfer(),
            io_queues: c.io_queues(),
            max_queue_entries: c.cap().mqes(),
            optional_commands: OptionalCommands {
                copy: info.supports_copy(),
                write_zeroes: info.supports_write_zeroes(),
                dataset_management: info.supports_dsm(),
                doorbell_buffer_config: info.supports_doorbell_buffer(),
            },
            namespaces: c
                .namespaces()
                .iter()
                .map(|ns| {
                    let problem = c.namespace(ns.nsid).err().map(|e| e.to_string());
                    NamespaceReport {
                        nsid: ns.nsid,
                        lba_size: ns.lba_size,
                        blocks: ns.blocks,
                        bytes: ns.bytes(),
                        lba_format: ns.lba_format,
                        metadata: ns.metadata,
                        usable: problem.is_none(),
                        unusable_reason: problem,
                        copy_limits: info.supports_copy().then_some(CopyLimits {
                            mssrl: ns.mssrl,
                            mcl: ns.mcl,
                            msrc: ns.msrc,
                        }),
                        zones: zones_of(c, ns),
                    }
                })
                .collect(),
        }
    }

    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let yes = |b: bool| if b { "yes" } else { "no" };
        let _ = writeln!(
            s,
            "{}  {} (serial {}, firmware {}, NVMe {})",
            self.pci_address, self.model, self.serial, self.firmware, self.version
        );
        let mdts = if self.mdts == 0 {
            "no limit".to_string()
        } else {
            format!("{} ({} KiB)", self.mdts, self.max_transfer_bytes / 1024)
        };
        let _ = writeln!(
            s,
            "  MDTS: {mdts}; I/O queue pairs: {}; max queue entries: {}",
            self.io_queues, self.max_queue_entries
        );
        let o = &self.optional_commands;
        let _ = writeln!(
            s,
            "  optional commands: Copy {}, Write Zeroes {}, Dataset Management {}, Doorbell Buffer Config {}",
            yes(o.copy),
            yes(o.write_zeroes),
            yes(o.dataset_management),
            yes(o.doorbell_buffer_config)
        );
        for ns in &self.namespaces {
            let _ = write!(
                s,
                "  namespace {}: {} blocks of {} bytes ({}), LBA format {}, metadata {}",
                ns.nsid,
                ns.blocks,
                ns.lba_size,
                human_bytes(ns.bytes),
                ns.lba_format,
                ns.metadata
            );
            if let Some(c) = &ns.copy_limits {
                let _ = write!(
                    s,
                    "; Copy limits MSSRL {} MCL {} MSRC {}",
                    c.mssrl, c.mcl, c.msrc
                );
            }
            if let Some(z) = &ns.zones {
                let limit = |l: Option<u32>| l.map_or("no limit".to_string(), |n| n.to_string());
                let _ = write!(
                    s,
                    "\n    zoned: {} zones of {}, max open {}, max active {}, zone append limit {}",
                    z.zones,
                    human_bytes(z.zone_bytes),
                    limit(z.max_open),
                    limit(z.max_active),
                    z.append_limit_bytes
                        .map_or("MDTS".to_string(), |b| human_bytes(b as u64))
                );
                for (start, cap, wp, state) in z.reported.iter().take(8) {
                    let _ = write!(
                        s,
                        "\n    zone at block {start}: capacity {cap} blocks, write pointer {wp}, {state}"
                    );
                }
                if z.reported.len() > 8 {
                    let _ = write!(s, "\n    ... {} more zones reported", z.reported.len() - 8);
                }
            }
            if let Some(r) = &ns.unusable_reason {
                let _ = write!(s, "\n    not usable: {r}");
            }
            s.push('\n');
        }
        s
    }
}

/// One line of `nvcopy list`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ListEntry {
    /// PCI address.
    pub pci_address: String,
    /// Vendor id.
    pub vendor: String,
    /// Device id.
    pub device: String,
    /// Bound driver.
    pub driver: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
}

impl From<&PciFunction> for ListEntry {
    fn from(f: &PciFunction) -> Self {
        ListEntry {
            pci_address: f.addr.to_string(),
            vendor: format!("{:04x}", f.vendor),
            device: format!("{:04x}", f.device),
            driver: f.driver.clone(),
            iommu_group: f.iommu_group,
        }
    }
}

/// The `nvcopy list` table, or a line saying there is nothing to list and what to check.
pub fn list_text(entries: &[ListEntry]) -> String {
    if entries.is_empty() {
        return "no NVMe controllers found (no PCI function of class 0x010802): check `lspci -d ::0108`, or, in a VM, that the NVMe devices are attached\n".to_string();
    }
    let mut s = format!(
        "{:<14} {:<11} {:<10} {}\n",
        "PCI ADDRESS", "VENDOR:DEV", "DRIVER", "IOMMU GROUP"
    );
    for e in entries {
        let _ = writeln!(
            s,
            "{:<14} {:<11} {:<10} {}",
            e.pci_address,
            format!("{}:{}", e.vendor, e.device),
            e.driver.as_deref().unwrap_or("-"),
            e.iommu_group.map_or("-".to_string(), |g| g.to_string())
        );
    }
    s
}

/// Bytes in binary units, e.g. "256.0 MiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_and_lists() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(256 << 20), "256.0 MiB");
        let e = ListEntry {
            pci_address: "0000:00:10.0".into(),
            vendor: "1b36".into(),
            device: "0010".into(),
            driver: Some("vfio-pci".into()),
            iommu_group: Some(4),
        };
        let t = list_text(&[e]);
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .starts_with("0000:00:10.0   1b36:0010   vfio-pci   4"),
            "{t}"
        );
        let none = list_text(&[]);
        assert!(
            none.starts_with("no NVMe controllers found") && none.lines().count() == 1,
            "{none}"
        );
    }
}
