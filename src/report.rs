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

/// One namespace of an NVMe/TCP controller.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TcpNamespaceReport {
    /// Namespace id.
    pub nsid: u32,
    /// Logical block size, bytes.
    pub lba_size: u32,
    /// Size in blocks.
    pub blocks: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// The region URL of the whole namespace.
    pub url: String,
}

/// An NVMe/TCP controller, as `nvcopy identify nvme+tcp://...` shows it: what Identify
/// Controller says, and what the connection negotiated.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TcpControllerReport {
    /// `nvme+tcp://HOST:PORT/NQN`.
    pub target: String,
    /// The subsystem NQN Identify Controller reports.
    pub subnqn: String,
    /// The controller id Connect gave.
    pub cntlid: u16,
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
    /// Largest transfer, bytes, when MDTS limits it.
    pub max_transfer_bytes: Option<usize>,
    /// Largest write sent inside its command capsule, bytes (IOCCSZ less the command).
    pub in_capsule_bytes: usize,
    /// I/O Queue Command Capsule Supported Size, 16-byte units.
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size, 16-byte units.
    pub iorcsz: u32,
    /// Keep Alive Support: the Keep Alive Timeout's granularity, 100 ms units.
    pub kas: u16,
    /// Header digests (CRC32C) on the admin connection.
    pub header_digest: bool,
    /// Data digests (CRC32C) on the admin connection.
    pub data_digest: bool,
    /// I/O queues granted.
    pub io_queues: u16,
    /// Maximum queue entries (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// Write Zeroes supported (nvcopy uses it for `zero`).
    pub write_zeroes: bool,
    /// Active namespaces.
    pub namespaces: Vec<TcpNamespaceReport>,
}

impl TcpControllerReport {
    /// Gathers the report from a connected controller.
    pub fn new(c: &nvcopy_tcp::Controller) -> Self {
        let info = c.info();
        let n = c.negotiated();
        TcpControllerReport {
            target: c.name().to_string(),
            subnqn: info.subnqn.clone(),
            cntlid: c.cntlid(),
            model: info.model.clone(),
            serial: info.serial.clone(),
            firmware: info.firmware.clone(),
            version: info.version_string(),
            mdts: info.mdts,
            max_transfer_bytes: c.max_transfer(),
            in_capsule_bytes: c.in_capsule(),
            ioccsz: info.ioccsz,
            iorcsz: info.iorcsz,
            kas: info.kas,
            header_digest: n.header_digest,
            data_digest: n.data_digest,
            io_queues: c.io_queues(),
            max_queue_entries: (c.cap() & 0xffff) as u32 + 1,
            write_zeroes: info.supports_write_zeroes(),
            namespaces: c
                .namespaces()
                .iter()
                .map(|ns| TcpNamespaceReport {
                    nsid: ns.nsid,
                    lba_size: ns.lba_size,
                    blocks: ns.blocks,
                    bytes: ns.bytes(),
                    url: format!("{}/{}", c.name(), ns.nsid),
                })
                .collect(),
        }
    }

    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let on = |b: bool| if b { "on" } else { "off" };
        let _ = writeln!(
            s,
            "{}  {} (serial {}, firmware {}, NVMe {})",
            self.target, self.model, self.serial, self.firmware, self.version
        );
        let _ = writeln!(
            s,
            "  subsystem {}, controller id {}",
            self.subnqn, self.cntlid
        );
        let mdts = match self.max_transfer_bytes {
            Some(b) => format!("{} ({} KiB)", self.mdts, b / 1024),
            None => "no limit".to_string(),
        };
        let _ = writeln!(
            s,
            "  MDTS: {mdts}; in-capsule data: {} bytes (IOCCSZ {}, IORCSZ {}); KAS: {} ms",
            self.in_capsule_bytes,
            self.ioccsz,
            self.iorcsz,
            self.kas as u32 * 100
        );
        let _ = writeln!(
            s,
            "  digests: header {}, data {}; I/O queues: {}; max queue entries: {}; Write Zeroes {}",
            on(self.header_digest),
            on(self.data_digest),
            self.io_queues,
            self.max_queue_entries,
            if self.write_zeroes { "yes" } else { "no" }
        );
        for ns in &self.namespaces {
            let _ = writeln!(
                s,
                "  namespace {}: {} blocks of {} bytes ({})  {}",
                ns.nsid,
                ns.blocks,
                ns.lba_size,
                human_bytes(ns.bytes),
                ns.url
            );
        }
        if self.namespaces.is_empty() {
            s += "  no active namespace: check the subsystem's namespaces (nvmet: namespaces/N/enable)\n";
        }
        s
    }
}

/// One entry of a Discovery log.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DiscoveryEntryReport {
    /// Position in the log, from 0.
    pub index: u64,
    /// Transport: tcp, rdma, fc, loop, unknown.
    pub transport: &'static str,
    /// TRTYPE as sent.
    pub trtype: u8,
    /// Address family: ipv4, ipv6, ib, fc, loop, unknown.
    pub address_family: &'static str,
    /// Subsystem type: nvm, referral, current discovery, unknown.
    pub subtype: &'static str,
    /// TREQ as sent.
    pub treq: u8,
    /// What TREQ says about a secure channel.
    pub secure_channel: &'static str,
    /// Port id.
    pub portid: u16,
    /// Controller id (65535: dynamic).
    pub cntlid: u16,
    /// Largest admin queue.
    pub asqsz: u16,
    /// Transport address.
    pub traddr: String,
    /// Transport service id (the TCP port).
    pub trsvcid: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// TCP: TSAS security type (0 none, 1 TLS 1.2, 2 TLS 1.3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_sectype: Option<u8>,
    /// The region URL nvcopy takes for it, when it is an NVMe/TCP NVM subsystem.
    pub url: Option<String>,
    /// Why there is no URL, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_a_region: Option<String>,
}

/// An entry left out, and why.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SkippedReport {
    /// Position in the log.
    pub index: u64,
    /// What was wrong with it.
    pub problem: String,
}

/// `nvcopy list --discover`: a discovery controller's log.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DiscoveryReport {
    /// HOST:PORT asked.
    pub discovery_controller: String,
    /// Generation counter of the log read.
    pub generation: u64,
    /// Records the controller reported.
    pub records: u64,
    /// Whether only the first records were read (the log was larger than nvcopy reads).
    pub capped: bool,
    /// Entries.
    pub entries: Vec<DiscoveryEntryReport>,
    /// Entries left out because their fields are malformed.
    pub skipped: Vec<SkippedReport>,
}

impl DiscoveryReport {
    /// The report of `log` read from `controller` (HOST:PORT).
    pub fn new(controller: String, log: &nvcopy_tcp::discovery::DiscoveryLog) -> Self {
        use nvcopy_tcp::discovery as d;
        DiscoveryReport {
            discovery_controller: controller,
            generation: log.header.genctr,
            records: log.header.numrec,
            capped: log.capped,
            entries: log
                .entries
                .iter()
                .map(|e| {
                    let url = e.region_url();
                    DiscoveryEntryReport {
                        index: e.index,
                        transport: d::transport_name(e.trtype),
                        trtype: e.trtype,
                        address_family: d::family_name(e.adrfam),
                        subtype: d::subtype_name(e.subtype),
                        treq: e.treq,
                        secure_channel: d::secure_channel_name(e.treq),
                        portid: e.portid,
                        cntlid: e.cntlid,
                        asqsz: e.asqsz,
                        traddr: e.traddr.clone(),
                        trsvcid: e.trsvcid.clone(),
                        subnqn: e.subnqn.clone(),
                        tcp_sectype: e.tcp_sectype,
                        not_a_region: url.as_ref().err().map(|w| w.to_string()),
                        url: url.ok(),
                    }
                })
                .collect(),
            skipped: log
                .skipped
                .iter()
                .map(|s| SkippedReport {
                    index: s.index,
                    problem: s.problem.to_string(),
                })
                .collect(),
        }
    }

    /// The human-readable form: a table, each NVM subsystem's region URL under its row,
    /// and notes for what was left out.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "discovery log of {} (generation {}, {} record(s))\n",
            self.discovery_controller, self.generation, self.records
        );
        let head = [
            "ENTRY",
            "TRANSPORT",
            "FAMILY",
            "SUBTYPE",
            "PORTID",
            "TRADDR",
            "TRSVCID",
            "SUBNQN",
        ];
        let rows: Vec<[String; 8]> = self
            .entries
            .iter()
            .map(|e| {
                [
                    e.index.to_string(),
                    if e.transport == "unknown" {
                        format!("unknown ({})", e.trtype)
                    } else {
                        e.transport.to_string()
                    },
                    e.address_family.to_string(),
                    e.subtype.to_string(),
                    e.portid.to_string(),
                    e.traddr.clone(),
                    e.trsvcid.clone(),
                    e.subnqn.clone(),
                ]
            })
            .collect();
        let mut width = head.map(str::len);
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let line = |cells: &[&str]| -> String {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    l += c;
                } else {
                    let _ = write!(l, "{c:<w$}  ", w = width[i]);
                }
            }
            l + "\n"
        };
        s += &line(&head);
        for (r, e) in rows.iter().zip(&self.entries) {
            s += &line(&r.each_ref().map(String::as_str));
            if let Some(u) = &e.url {
                let _ = writeln!(s, "       region: {u}");
            }
        }
        if self.entries.is_empty() {
            s += "no entries: the target offers this host no subsystem on this port (nvmet: link a subsystem under ports/N/subsystems, and allow the host)\n";
        }
        for k in &self.skipped {
            let _ = writeln!(s, "note: entry {} was skipped: {}", k.index, k.problem);
        }
        if self.capped {
            let _ = writeln!(
                s,
                "note: the controller reports {} records; only the first {} were read",
                self.records,
                nvcopy_tcp::discovery::MAX_RECORDS
            );
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

    fn disc_entry(index: u64, trtype: u8, subtype: u8, nqn: &str) -> nvcopy_tcp::discovery::Entry {
        nvcopy_tcp::discovery::Entry {
            index,
            trtype,
            adrfam: 1,
            subtype,
            treq: 4,
            portid: 1,
            cntlid: 0xffff,
            asqsz: 32,
            eflags: 0,
            trsvcid: "4420".into(),
            subnqn: nqn.into(),
            traddr: "127.0.0.1".into(),
            tcp_sectype: (trtype == 3).then_some(0),
        }
    }

    #[test]
    fn discovery_report_lists_every_entry_and_the_urls() {
        use nvcopy_tcp::discovery::{DiscoveryLog, EntryProblem, LogHeader, Skipped};
        let log = DiscoveryLog {
            header: LogHeader {
                genctr: 7,
                numrec: 4,
                recfmt: 0,
            },
            entries: vec![
                disc_entry(0, 3, 3, "nqn.2014-08.org.nvmexpress.discovery"),
                disc_entry(1, 3, 2, "nqn.2026-12.io.nvcopy:a"),
                disc_entry(3, 1, 2, "nqn.2026-12.io.nvcopy:rdma"),
            ],
            skipped: vec![Skipped {
                index: 2,
                problem: EntryProblem::Field {
                    field: "TRADDR",
                    why: "holds bytes that are not printable ASCII",
                },
            }],
            capped: false,
            attempts: 1,
        };
        let r = DiscoveryReport::new("127.0.0.1:4420".into(), &log);
        assert_eq!(
            r.entries
                .iter()
                .map(|e| e.url.as_deref())
                .collect::<Vec<_>>(),
            vec![
                None,
                Some("nvme+tcp://127.0.0.1:4420/nqn.2026-12.io.nvcopy:a"),
                None
            ]
        );
        assert!(r.entries[2]
            .not_a_region
            .as_deref()
            .unwrap()
            .contains("rdma"));
        let t = r.to_text();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("generation 7, 4 record(s)"), "{t}");
        // The table's columns line up: SUBNQN starts at the same place on every row.
        let col = lines[1].find("SUBNQN").unwrap();
        assert_eq!(lines[2].find("nqn.2014-08").unwrap(), col, "{t}");
        assert_eq!(
            lines[3].find("nqn.2026-12.io.nvcopy:a").unwrap(),
            col,
            "{t}"
        );
        assert_eq!(
            lines[4].trim(),
            "region: nvme+tcp://127.0.0.1:4420/nqn.2026-12.io.nvcopy:a"
        );
        assert!(
            lines[5].starts_with("3 ") && lines[5].contains("rdma"),
            "{t}"
        );
        assert_eq!(t.matches("region:").count(), 1, "{t}");
        assert!(t.contains("note: entry 2 was skipped: its TRADDR field holds bytes that are not printable ASCII"), "{t}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["skipped"][0]["index"], 2);
        assert_eq!(json["entries"][1]["trsvcid"], "4420");
        let capped = DiscoveryReport {
            capped: true,
            records: u64::MAX,
            entries: vec![],
            skipped: vec![],
            ..r
        };
        let t = capped.to_text();
        assert!(
            t.contains("no entries") && t.contains("only the first 1024"),
            "{t}"
        );
    }
}
