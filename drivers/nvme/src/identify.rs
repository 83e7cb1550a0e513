//! What Identify says about a controller and its namespaces (base spec 5.17.2.1 Identify
//! Controller, NVM command set spec 4.1.5.1 Identify Namespace), reduced to what nvcopy
//! uses and shows.

use crate::spec::{le, oncs};

/// Identify Controller, the fields nvcopy uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControllerInfo {
    /// PCI vendor id.
    pub vid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// MDTS: largest transfer is 2^mdts minimum pages; 0 means no limit.
    pub mdts: u8,
    /// Controller id.
    pub cntlid: u16,
    /// Version, as reported (VER).
    pub version: u32,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Optional NVM Command Support.
    pub oncs: u16,
    /// Optional Copy Formats Supported.
    pub ocfs: u16,
    /// Volatile write cache present.
    pub vwc: bool,
    /// Number of namespaces (highest namespace id).
    pub nn: u32,
    /// Command Retry Delay Times 1-3, in 100 ms units (bytes 134-139).
    pub crdt: [u16; 3],
    /// NVM Subsystem NVMe Qualified Name (bytes 768-1023), empty when not reported.
    /// Controllers of one subsystem report the same NQN.
    pub subnqn: String,
    /// Keep Alive Support (KAS, bytes 320-321): the granularity of the Keep Alive
    /// Timeout in 100 ms units; 0 means the controller has no Keep Alive.
    pub kas: u16,
    /// I/O Queue Command Capsule Supported Size (IOCCSZ, bytes 1792-1795), in 16-byte
    /// units: how much of a command capsule over a fabric may be in-capsule data (base
    /// spec 2.0, Identify Controller, Fabrics attributes). 0 on PCIe.
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size (IORCSZ, bytes 1796-1799), in 16-byte
    /// units. 0 on PCIe.
    pub iorcsz: u32,
}

impl ControllerInfo {
    /// Parses a 4096-byte Identify Controller data structure.
    pub fn parse(b: &[u8]) -> Self {
        ControllerInfo {
            vid: le::u16(b, 0),
            serial: le::text(b, 4, 20),
            model: le::text(b, 24, 40),
            firmware: le::text(b, 64, 8),
            mdts: b[77],
            cntlid: le::u16(b, 78),
            version: le::u32(b, 80),
            oacs: le::u16(b, 256),
            nn: le::u32(b, 516),
            oncs: le::u16(b, 520),
            vwc: b[525] & 1 == 1,
            ocfs: le::u16(b, 534),
            crdt: [le::u16(b, 134), le::u16(b, 136), le::u16(b, 138)],
            subnqn: nul_terminated(&b[768..1024]),
            kas: le::u16(b, 320),
            ioccsz: le::u32(b, 1792),
            iorcsz: le::u32(b, 1796),
        }
    }

    /// How long to wait before retrying a command whose status carried this CRD index
    /// (base spec 4.6.1: 0 means at once, 1-3 select CRDT1-3).
    pub fn retry_delay(&self, crd: u8) -> std::time::Duration {
        let units = match crd {
            1..=3 => self.crdt[crd as usize - 1],
            _ => 0,
        };
        std::time::Duration::from_millis(units as u64 * 100)
    }

    /// Largest transfer in bytes for a 4 KiB memory page size, if the controller limits it.
    pub fn mdts_bytes(&self) -> Option<usize> {
        (self.mdts != 0).then(|| 4096usize << self.mdts.min(20))
    }
    /// Copy command, descriptor format 0.
    pub fn supports_copy(&self) -> bool {
        self.oncs & oncs::COPY != 0 && self.ocfs & 1 != 0
    }
    /// Write Zeroes.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & oncs::WRITE_ZEROES != 0
    }
    /// Dataset Management.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & oncs::DSM != 0
    }
    /// Doorbell Buffer Config (shadow doorbells).
    pub fn supports_doorbell_buffer(&self) -> bool {
        self.oacs & crate::spec::doorbell_buffer::OACS_BIT != 0
    }
    /// "major.minor.tertiary".
    pub fn version_string(&self) -> String {
        format!(
            "{}.{}.{}",
            self.version >> 16,
            self.version >> 8 & 0xff,
            self.version & 0xff
        )
    }
}

/// An active namespace, the fields nvcopy uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// Logical block size in bytes.
    pub lba_size: u32,
    /// Metadata bytes per block in the current format (nvcopy needs 0).
    pub metadata: u16,
    /// Index of the current LBA format.
    pub lba_format: u8,
    /// Maximum Single Source Range Length of Copy, in blocks.
    pub mssrl: u16,
    /// Maximum Copy Length, in blocks.
    pub mcl: u32,
    /// Maximum Source Range Count of Copy, as a count (the field is 0-based).
    pub msrc: u16,
    /// Namespace Globally Unique Identifier (bytes 104-119); all zeroes when not reported.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier (bytes 120-127); all zeroes when not reported.
    pub eui64: [u8; 8],
    /// The zone geometry of a zoned namespace (crate::zns), None for an NVM one.
    pub zoned: Option<crate::zns::Zoned>,
}

impl Namespace {
    /// Parses a 4096-byte Identify Namespace data structure.
    pub fn parse(nsid: u32, b: &[u8]) -> Self {
        let nlbaf = b[25] as usize + 1;
        let flbas = b[26];
        // FLBAS bits 3:0 give the low index bits, bits 6:5 the high ones (for > 16 formats).
        let mut index = (flbas & 0xf) as usize;
        if nlbaf > 16 {
            index |= ((flbas >> 5 & 3) as usize) << 4;
        }
        let lbaf = le::u32(b, 128 + 4 * index.min(63));
        let lbads = lbaf >> 16 & 0xff;
        Namespace {
            nsid,
            blocks: le::u64(b, 0),
            lba_size: if (9..=16).contains(&lbads) {
                1 << lbads
            } else {
                lbads
            },
            metadata: lbaf as u16,
            lba_format: index as u8,
            mssrl: le::u16(b, 74),
            mcl: le::u32(b, 76),
            msrc: b[80] as u16 + 1,
            nguid: array(b, 104),
            eui64: array(b, 120),
            zoned: None,
        }
    }

    /// Whether `self`, reached through a controller that identified as `self_ctrl`, and
    /// `other`, reached through `other_ctrl`, are one namespace: the same media seen
    /// through two controllers (of a multi-controller subsystem, or two functions of one
    /// device). The first identifier both report decides: NGUID, then EUI64. When they
    /// have none in common, the subsystem NQN and namespace id do, since namespace ids
    /// are unique within a subsystem. All-zero identifiers and an empty NQN mean "not
    /// reported"; with nothing to compare the answer is false, so callers must still
    /// treat one controller and one namespace id as the same media.
    pub fn same_media(
        &self,
        self_ctrl: &ControllerInfo,
        other: &Namespace,
        other_ctrl: &ControllerInfo,
    ) -> bool {
        let reported = |id: &[u8]| id.iter().any(|&x| x != 0);
        if reported(&self.nguid) && reported(&other.nguid) {
            return self.nguid == other.nguid;
        }
        if reported(&self.eui64) && reported(&other.eui64) {
            return self.eui64 == other.eui64;
        }
        !self_ctrl.subnqn.is_empty()
            && self_ctrl.subnqn == other_ctrl.subnqn
            && self.nsid == other.nsid
    }

    /// Capacity in bytes, or None when NSZE times the block size does not fit in a u64.
    /// No real namespace is that large (16 EiB); [`crate::Controller::namespace`] refuses
    /// one that claims to be.
    pub fn capacity(&self) -> Option<u64> {
        self.blocks.checked_mul(self.lba_size as u64)
    }

    /// Capacity in bytes, saturated at `u64::MAX` (see [`Namespace::capacity`]): for
    /// display. Namespaces nvcopy does I/O on never saturate.
    pub fn bytes(&self) -> u64 {
        self.capacity().unwrap_or(u64::MAX)
    }
}

/// `N` bytes of `b` from `at`, as they are (identifiers are compared, not interpreted).
fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// A UTF-8 string field padded with NULs (an NQN).
fn nul_terminated(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim().to_string()
}

/// Parses an Active Namespace ID list: ascending ids, ended by the first zero.
pub fn parse_ns_list(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&id| id != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_identify_controller() {
        let mut b = vec![0u8; 4096];
        b[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        b[4..24].copy_from_slice(b"NVCOPY0             ");
        b[24..64].copy_from_slice(&[b' '; 40]);
        b[24..36].copy_from_slice(b"QEMU NVMe Ct");
        b[64..72].copy_from_slice(b"7.2.0   ");
        b[77] = 7;
        b[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
        b[256..258].copy_from_slice(&(1u16 << 8).to_le_bytes());
        b[516..520].copy_from_slice(&256u32.to_le_bytes());
        b[520..522].copy_from_slice(&(oncs::COPY | oncs::WRITE_ZEROES | oncs::DSM).to_le_bytes());
        b[534..536].copy_from_slice(&1u16.to_le_bytes());
        b[136..138].copy_from_slice(&5u16.to_le_bytes());
        let c = ControllerInfo::parse(&b);
        assert_eq!(c.retry_delay(2), std::time::Duration::from_millis(500));
        assert_eq!(c.retry_delay(0), std::time::Duration::ZERO);
        assert_eq!(
            (
                c.vid,
                c.serial.as_str(),
                c.model.as_str(),
                c.firmware.as_str()
            ),
            (0x1b36, "NVCOPY0", "QEMU NVMe Ct", "7.2.0")
        );
        assert_eq!(c.mdts_bytes(), Some(512 * 1024));
        assert_eq!(c.version_string(), "1.4.0");
        assert!(
            c.supports_copy()
                && c.supports_write_zeroes()
                && c.supports_dsm()
                && c.supports_doorbell_buffer()
        );
        assert_eq!(c.nn, 256);
        assert_eq!(c.subnqn, "");
        assert_eq!((c.kas, c.ioccsz, c.iorcsz), (0, 0, 0));
        // A fabrics controller's: KAS 1 (100 ms), IOCCSZ 516 (8 KiB of data in a capsule
        // after the 64-byte command), IORCSZ 1 (a bare 16-byte completion).
        b[320..322].copy_from_slice(&1u16.to_le_bytes());
        b[1792..1796].copy_from_slice(&516u32.to_le_bytes());
        b[1796..1800].copy_from_slice(&1u32.to_le_bytes());
        let c = ControllerInfo::parse(&b);
        assert_eq!((c.kas, c.ioccsz, c.iorcsz), (1, 516, 1));
        let nqn = b"nqn.2014-08.org.example:subsys-1";
        b[768..768 + nqn.len()].copy_from_slice(nqn);
        assert_eq!(
            ControllerInfo::parse(&b).subnqn,
            "nqn.2014-08.org.example:subsys-1"
        );
    }

    #[test]
    fn parses_namespace_identifiers() {
        let mut b = vec![0u8; 4096];
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        let none = Namespace::parse(1, &b);
        assert_eq!((none.nguid, none.eui64), ([0; 16], [0; 8]));
        let nguid: [u8; 16] = std::array::from_fn(|i| i as u8 + 1);
        b[104..120].copy_from_slice(&nguid);
        b[120..128].copy_from_slice(&[0xa0, 1, 2, 3, 4, 5, 6, 7]);
        let ns = Namespace::parse(1, &b);
        assert_eq!(ns.nguid, nguid);
        assert_eq!(ns.eui64, [0xa0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(
            ns.lba_size, 512,
            "the LBA formats that follow are unchanged"
        );
    }

    #[test]
    fn same_media_by_nguid_then_eui64_then_subsystem_and_nsid() {
        let ctrl = |nqn: &str| ControllerInfo {
            subnqn: nqn.into(),
            ..Default::default()
        };
        let ns = |nsid: u32, nguid: u8, eui64: u8| Namespace {
            nsid,
            nguid: [nguid; 16],
            eui64: [eui64; 8],
            ..Default::default()
        };
        let (a, b, none) = (ctrl("nqn.a"), ctrl("nqn.b"), ctrl(""));
        // NGUID reported by both decides, whatever the NQNs, nsids and EUI64s say.
        assert!(ns(1, 7, 0).same_media(&a, &ns(2, 7, 9), &b));
        assert!(!ns(1, 7, 0).same_media(&a, &ns(1, 8, 0), &a));
        // NGUID on one side only: EUI64 decides.
        assert!(ns(1, 7, 3).same_media(&a, &ns(1, 0, 3), &b));
        assert!(!ns(1, 7, 3).same_media(&a, &ns(1, 0, 4), &a));
        // No identifier in common: subsystem NQN and nsid.
        assert!(ns(1, 0, 0).same_media(&a, &ns(1, 0, 0), &a));
        assert!(ns(1, 7, 0).same_media(&a, &ns(1, 0, 3), &a));
        assert!(!ns(1, 0, 0).same_media(&a, &ns(2, 0, 0), &a));
        assert!(!ns(1, 0, 0).same_media(&a, &ns(1, 0, 0), &b));
        // Nothing reported at all: not known to be the same.
        assert!(!ns(1, 0, 0).same_media(&none, &ns(1, 0, 0), &none));
    }

    #[test]
    fn parses_identify_namespace_formats() {
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&(1u64 << 19).to_le_bytes());
        b[25] = 1; // two formats
        b[26] = 1; // using format 1
        b[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        b[132..136].copy_from_slice(&(12u32 << 16 | 8).to_le_bytes());
        b[74..76].copy_from_slice(&128u16.to_le_bytes());
        b[76..80].copy_from_slice(&128u32.to_le_bytes());
        b[80] = 127;
        let ns = Namespace::parse(2, &b);
        assert_eq!((ns.lba_size, ns.metadata, ns.lba_format), (4096, 8, 1));
        assert_eq!(ns.bytes(), (1u64 << 19) * 4096);
        assert_eq!((ns.mssrl, ns.mcl, ns.msrc), (128, 128, 128));
        assert_eq!(
            parse_ns_list(&[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0]),
            vec![1, 2]
        );
    }

    #[test]
    fn a_namespace_size_past_u64_bytes_does_not_overflow() {
        // NSZE is whatever the device says: u64::MAX blocks of 4096 bytes is not 2^76 bytes.
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        b[128..132].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let ns = Namespace::parse(1, &b);
        assert_eq!((ns.blocks, ns.lba_size), (u64::MAX, 4096));
        assert_eq!(ns.capacity(), None);
        assert_eq!(ns.bytes(), u64::MAX, "saturates");
        let fits = Namespace {
            blocks: u64::MAX / 4096,
            ..ns
        };
        assert_eq!(fits.capacity(), Some(u64::MAX / 4096 * 4096));
    }
}
