//! The Zoned Namespace Command Set (NVMe ZNS Command Set Specification 1.1; CSI 02h).
//!
//! A zoned namespace is written only at each zone's write pointer, in order, up to the
//! zone's capacity, and a zone is made writable again by resetting it (Zone Management
//! Send, Reset Zone). nvcopy recognises one through the Namespace Identification
//! Descriptor list (base spec 5.17.2.3, descriptor type 04h: Command Set Identifier),
//! reads its geometry from the I/O Command Set specific Identify Namespace (CNS 05h,
//! CSI 02h: ZNS spec 4.1.5.1) and the zone append limit from Identify Controller
//! (CNS 06h, CSI 02h: ZNS spec 4.1.5.2). The controller is enabled with CC.CSS = 110b
//! (all supported I/O command sets) where CAP.CSS offers it, since a controller enabled
//! for the NVM command set only serves a zoned namespace without its zone commands.

use crate::spec::le;

/// Command Set Identifier of the Zoned Namespace Command Set.
pub const CSI_ZNS: u8 = 0x02;

/// Identify CNS values this module uses.
pub mod cns {
    /// Namespace Identification Descriptor list.
    pub const NS_DESCRIPTORS: u32 = 0x03;
    /// I/O Command Set specific Identify Namespace.
    pub const CSI_NAMESPACE: u32 = 0x05;
    /// I/O Command Set specific Identify Controller.
    pub const CSI_CONTROLLER: u32 = 0x06;
}

/// ZNS I/O opcodes (ZNS spec 3.3, figure "Opcodes for Zoned Namespace Commands").
pub mod op {
    /// Zone Management Send.
    pub const ZONE_MGMT_SEND: u8 = 0x79;
    /// Zone Management Receive.
    pub const ZONE_MGMT_RECV: u8 = 0x7a;
    /// Zone Append.
    pub const ZONE_APPEND: u8 = 0x7d;
}

/// Zone Send Action: Reset Zone (CDW13 bits 7:0; ZNS spec 3.4.3).
pub const ZSA_RESET: u32 = 0x04;
/// CDW13 bit 8: Select All zones (the SLBA is ignored).
pub const SELECT_ALL: u32 = 1 << 8;
/// Zone Receive Action: Report Zones (CDW13 bits 7:0), reporting all zones (bits 15:8 =
/// 0), with the Partial Report bit (16) clear so that the header counts every zone from
/// the SLBA on.
pub const ZRA_REPORT_ZONES: u32 = 0x00;
/// Bytes of the Report Zones header and of each zone descriptor.
pub const REPORT_HEADER: usize = 64;
/// Bytes of one zone descriptor.
pub const ZONE_DESCRIPTOR: usize = 64;

/// A zoned namespace's geometry, from Identify.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Zoned {
    /// Zone size in blocks (ZSZE of the current LBA format).
    pub zone_blocks: u64,
    /// Most zones open at once (MOR + 1), None for no limit.
    pub max_open: Option<u32>,
    /// Most zones active at once (MAR + 1), None for no limit.
    pub max_active: Option<u32>,
    /// Zones may change capacity (ZOC bit 0, Variable Zone Capacity).
    pub variable_capacity: bool,
    /// The Zone Append Size Limit in bytes, None where the MDTS applies.
    pub append_limit: Option<usize>,
}

/// The Command Set Identifier in a Namespace Identification Descriptor list, if it has
/// one. Each descriptor is NIDT (1 byte), NIDL (1 byte), 2 reserved bytes, then NIDL
/// bytes; a NIDT of 0 ends the list.
pub fn parse_csi(list: &[u8]) -> Option<u8> {
    let mut at = 0usize;
    while at + 4 <= list.len() {
        let (kind, len) = (list[at], list[at + 1] as usize);
        if kind == 0 || len == 0 {
            return None;
        }
        if kind == 0x04 && len == 1 {
            return list.get(at + 4).copied();
        }
        at += 4 + len;
    }
    None
}

/// A limit field that counts from 0, where all ones means "no limit".
fn limit(v: u32) -> Option<u32> {
    (v != u32::MAX).then(|| v.saturating_add(1))
}

/// Parses the ZNS Identify Namespace data (4096 bytes) for LBA format `lba_format`:
/// ZOC (bytes 0-1), MAR (4-7), MOR (8-11), and the LBA Format Extension at byte 2816, 16
/// bytes each, ZSZE being its first 8. None when the zone size is 0 (no zones).
pub fn parse_namespace(b: &[u8], lba_format: u8) -> Option<Zoned> {
    let ext = 2816 + 16 * lba_format as usize;
    if b.len() < ext + 16 {
        return None;
    }
    let zone_blocks = le::u64(b, ext);
    (zone_blocks != 0).then(|| Zoned {
        zone_blocks,
        max_active: limit(le::u32(b, 4)),
        max_open: limit(le::u32(b, 8)),
        variable_capacity: le::u16(b, 0) & 1 == 1,
        append_limit: None,
    })
}

/// The Zone Append Size Limit from the ZNS Identify Controller data (byte 0), in bytes
/// for a controller whose smallest page is `mps_min` bytes; None: the MDTS applies.
pub fn parse_append_limit(b: &[u8], mps_min: usize) -> Option<usize> {
    let zasl = *b.first()?;
    (zasl != 0)
        .then(|| mps_min.checked_shl(zasl as u32))
        .flatten()
}

/// A zone's state (ZNS spec 4.4.1, the Zone State field's upper nibble).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZoneState {
    /// ZSE: no data, writable from its start.
    Empty,
    /// ZSIO.
    ImplicitlyOpen,
    /// ZSEO.
    ExplicitlyOpen,
    /// ZSC.
    Closed,
    /// ZSRO.
    ReadOnly,
    /// ZSF: written to its capacity.
    Full,
    /// ZSO.
    Offline,
    /// A reserved value.
    Reserved(u8),
}

impl ZoneState {
    fn from_nibble(n: u8) -> ZoneState {
        match n {
            0x1 => ZoneState::Empty,
            0x2 => ZoneState::ImplicitlyOpen,
            0x3 => ZoneState::ExplicitlyOpen,
            0x4 => ZoneState::Closed,
            0xd => ZoneState::ReadOnly,
            0xe => ZoneState::Full,
            0xf => ZoneState::Offline,
            other => ZoneState::Reserved(other),
        }
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            ZoneState::Empty => "empty",
            ZoneState::ImplicitlyOpen => "implicitly open",
            ZoneState::ExplicitlyOpen => "explicitly open",
            ZoneState::Closed => "closed",
            ZoneState::ReadOnly => "read only",
            ZoneState::Full => "full",
            ZoneState::Offline => "offline",
            ZoneState::Reserved(_) => "reserved",
        }
    }
}

/// One zone, from a Report Zones descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Zone {
    /// First block (ZSLBA).
    pub start: u64,
    /// Writable blocks (ZCAP).
    pub capacity: u64,
    /// The write pointer (WP).
    pub write_pointer: u64,
    /// Its state.
    pub state: ZoneState,
}

/// Parses a Report Zones buffer: the header's zone count (bytes 0-7), then descriptors of
/// 64 bytes: ZT (byte 0), ZS (byte 1, state in bits 7:4), ZCAP (8-15), ZSLBA (16-23), WP
/// (24-31). Returns the count the device reported and the descriptors that fit.
pub fn parse_report(b: &[u8]) -> (u64, Vec<Zone>) {
    if b.len() < REPORT_HEADER {
        return (0, Vec::new());
    }
    let count = le::u64(b, 0);
    let fit = ((b.len() - REPORT_HEADER) / ZONE_DESCRIPTOR) as u64;
    let zones = (0..count.min(fit) as usize)
        .map(|i| {
            let d = &b[REPORT_HEADER + i * ZONE_DESCRIPTOR..][..ZONE_DESCRIPTOR];
            Zone {
                state: ZoneState::from_nibble(d[1] >> 4),
                capacity: le::u64(d, 8),
                start: le::u64(d, 16),
                write_pointer: le::u64(d, 24),
            }
        })
        .collect();
    (count, zones)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_command_set_identifier_among_the_descriptors() {
        let mut list = vec![0u8; 4096];
        // NGUID (type 2, 16 bytes), then CSI (type 4, 1 byte) = 2.
        list[0] = 2;
        list[1] = 16;
        list[20] = 4;
        list[21] = 1;
        list[24] = CSI_ZNS;
        assert_eq!(parse_csi(&list), Some(CSI_ZNS));
        // No CSI descriptor: the list ends at a zero type.
        list[20] = 0;
        assert_eq!(parse_csi(&list), None);
        // A length that runs off the page ends the walk.
        let mut bad = vec![0u8; 8];
        bad[0] = 1;
        bad[1] = 200;
        assert_eq!(parse_csi(&bad), None);
    }

    #[test]
    fn parses_zone_geometry_limits_and_the_append_limit() {
        let mut b = vec![0u8; 4096];
        b[0] = 1; // variable zone capacity
        b[4..8].copy_from_slice(&u32::MAX.to_le_bytes()); // MAR: no limit
        b[8..12].copy_from_slice(&13u32.to_le_bytes()); // MOR: 14 open zones
                                                        // LBA format 1's extension: 2048-block zones.
        b[2816 + 16..2816 + 24].copy_from_slice(&2048u64.to_le_bytes());
        let z = parse_namespace(&b, 1).unwrap();
        assert_eq!(
            z,
            Zoned {
                zone_blocks: 2048,
                max_open: Some(14),
                max_active: None,
                variable_capacity: true,
                append_limit: None,
            }
        );
        // Format 0 has no zone size: not zoned.
        assert_eq!(parse_namespace(&b, 0), None);
        assert_eq!(parse_append_limit(&[0], 4096), None);
        assert_eq!(parse_append_limit(&[5], 4096), Some(128 << 10));
        assert_eq!(parse_append_limit(&[], 4096), None);
    }

    #[test]
    fn parses_a_report_and_never_reads_past_the_buffer() {
        let mut b = vec![0u8; REPORT_HEADER + 2 * ZONE_DESCRIPTOR];
        b[0..8].copy_from_slice(&5u64.to_le_bytes()); // 5 zones, 2 fit
        for (i, (state, wp)) in [(0x1u8, 0u64), (0xe, 2048)].iter().enumerate() {
            let d = REPORT_HEADER + i * ZONE_DESCRIPTOR;
            b[d] = 0x2; // sequential write required
            b[d + 1] = state << 4;
            b[d + 8..d + 16].copy_from_slice(&2000u64.to_le_bytes());
            b[d + 16..d + 24].copy_from_slice(&(i as u64 * 2048).to_le_bytes());
            b[d + 24..d + 32].copy_from_slice(&(i as u64 * 2048 + wp).to_le_bytes());
        }
        let (count, zones) = parse_report(&b);
        assert_eq!(count, 5);
        assert_eq!(zones.len(), 2);
        assert_eq!(zones[0].state, ZoneState::Empty);
        assert_eq!(zones[1].state, ZoneState::Full);
        assert_eq!(
            (zones[1].start, zones[1].capacity, zones[1].write_pointer),
            (2048, 2000, 4096)
        );
        assert_eq!(parse_report(&b[..10]), (0, Vec::new()));
    }
}
