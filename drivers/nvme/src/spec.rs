//! NVMe structures and constants as the base specification (2.0) lays them out: the
//! controller registers (section 3.1), submission and completion queue entries (4.2, 4.6),
//! opcodes (5, 7) and the admin data structures nvcopy reads (Identify, 5.17).

use nvcopy_vfio::ByteValued;

/// Controller register offsets in BAR0 (base spec 3.1.4).
pub mod reg {
    /// Controller Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: usize = 0x0c;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue base (64-bit).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue base (64-bit).
    pub const ACQ: usize = 0x30;
    /// First doorbell (SQ 0 tail).
    pub const DOORBELL_BASE: usize = 0x1000;
}

/// CAP: what the controller can do (base spec 3.1.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Maximum Queue Entries Supported, as a count (the field is 0-based).
    pub fn mqes(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }
    /// Contiguous Queues Required.
    pub fn cqr(self) -> bool {
        self.0 >> 16 & 1 == 1
    }
    /// Worst-case time to become ready or not ready, in milliseconds (field is in 500 ms units).
    pub fn timeout_ms(self) -> u64 {
        (self.0 >> 24 & 0xff) * 500
    }
    /// Doorbell stride in bytes: 4 << DSTRD.
    pub fn doorbell_stride(self) -> usize {
        4 << (self.0 >> 32 & 0xf)
    }
    /// Command Sets Supported bit 0: the NVM command set.
    pub fn supports_nvm(self) -> bool {
        self.0 >> 37 & 1 == 1
    }
    /// Command Sets Supported bit 6: one or more I/O command sets, selected with
    /// CC.CSS = 110b (base spec 3.1.4.1), the way to reach a zoned namespace's commands.
    pub fn supports_io_command_sets(self) -> bool {
        self.0 >> 43 & 1 == 1
    }
    /// Memory Page Size Minimum, in bytes.
    pub fn mps_min(self) -> usize {
        4096 << (self.0 >> 48 & 0xf)
    }
    /// Memory Page Size Maximum, in bytes.
    pub fn mps_max(self) -> usize {
        4096 << (self.0 >> 52 & 0xf)
    }
}

/// CC fields (base spec 3.1.4.5).
pub mod cc {
    /// Enable.
    pub const EN: u32 = 1;
    /// I/O Submission Queue Entry Size: 2^6 = 64 bytes.
    pub const IOSQES_64: u32 = 6 << 16;
    /// I/O Completion Queue Entry Size: 2^4 = 16 bytes.
    pub const IOCQES_16: u32 = 4 << 20;
    /// Shutdown Notification: normal shutdown.
    pub const SHN_NORMAL: u32 = 1 << 14;
    /// Shutdown Notification field mask.
    pub const SHN_MASK: u32 = 3 << 14;
    /// I/O Command Set Selected: all supported I/O command sets (110b in bits 6:4).
    pub const CSS_ALL: u32 = 6 << 4;
}

/// CSTS fields (base spec 3.1.4.6).
pub mod csts {
    /// Ready.
    pub const RDY: u32 = 1;
    /// Controller Fatal Status.
    pub const CFS: u32 = 1 << 1;
    /// Shutdown Status mask.
    pub const SHST_MASK: u32 = 3 << 2;
    /// Shutdown processing complete.
    pub const SHST_COMPLETE: u32 = 2 << 2;
}

/// Offset of a queue's doorbell: SQ tail is 2y, CQ head is 2y + 1 (base spec 3.1.4.21-22).
pub fn doorbell_offset(qid: u16, completion: bool, stride: usize) -> usize {
    reg::DOORBELL_BASE + (2 * qid as usize + completion as usize) * stride
}

/// A Submission Queue Entry (base spec 4.2): 64 bytes, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    /// Opcode (bits 0-7), fused (8-9), PSDT (14-15), command id (16-31).
    pub cdw0: u32,
    /// Namespace id.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (or PRP list pointer).
    pub prp2: u64,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

impl Sqe {
    /// An entry with only the opcode and namespace set.
    pub fn new(opcode: u8, nsid: u32) -> Self {
        Sqe {
            cdw0: opcode as u32,
            nsid,
            ..Default::default()
        }
    }
    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }
    /// The command id.
    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }
    /// Sets the command id.
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xffff) | (cid as u32) << 16;
    }
    /// Starting LBA in CDW10-11, as Read, Write, Write Zeroes and Copy (destination) use it.
    pub fn set_slba(&mut self, lba: u64) {
        self.cdw10 = lba as u32;
        self.cdw11 = (lba >> 32) as u32;
    }
    /// The starting LBA of CDW10-11.
    pub fn slba(&self) -> u64 {
        self.cdw10 as u64 | (self.cdw11 as u64) << 32
    }
}

/// A Completion Queue Entry (base spec 4.6): 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    /// Command-specific result.
    pub dw0: u32,
    /// Reserved / command specific.
    pub dw1: u32,
    /// Where the controller's SQ head now is.
    pub sq_head: u16,
    /// Which SQ the command came from.
    pub sq_id: u16,
    /// The command id, as the controller reports it. Untrusted.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 1-15).
    pub status: u16,
}

/// Byte offset of the status word inside a CQE: the phase bit is read from here first.
pub const CQE_STATUS_OFFSET: usize = 14;

// SAFETY: Sqe is repr(C), made only of integers with no padding (asserted below), so every
// bit pattern is a valid value.
unsafe impl ByteValued for Sqe {}
// SAFETY: Cqe is repr(C), made only of integers with no padding, so every bit pattern is valid.
unsafe impl ByteValued for Cqe {}

const _: () = assert!(std::mem::size_of::<Sqe>() == 64);
const _: () = assert!(std::mem::offset_of!(Sqe, prp1) == 24);
const _: () = assert!(std::mem::offset_of!(Sqe, cdw10) == 40);
const _: () = assert!(std::mem::offset_of!(Sqe, cdw15) == 60);
const _: () = assert!(std::mem::size_of::<Cqe>() == 16);
const _: () = assert!(std::mem::offset_of!(Cqe, cid) == 12);
const _: () = assert!(std::mem::offset_of!(Cqe, status) == CQE_STATUS_OFFSET);
const _: () = assert!(reg::CC == 0x14 && reg::CSTS == 0x1c && reg::AQA == 0x24);
const _: () = assert!(reg::ASQ == 0x28 && reg::ACQ == 0x30 && reg::DOORBELL_BASE == 0x1000);

/// One Dataset Management range (NVM command set spec 3.2.3, figure "Dataset Management -
/// Range Definition"): 16 bytes, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsmRange {
    /// Context attributes (bytes 0-3).
    pub cattr: u32,
    /// Length in logical blocks (bytes 4-7; not 0-based, 0 is an empty range).
    pub nlb: u32,
    /// Starting LBA (bytes 8-15).
    pub slba: u64,
}

impl DsmRange {
    /// Bytes of one range.
    pub const SIZE: usize = 16;

    /// A range of `nlb` blocks from `slba`, without context attributes.
    pub fn new(slba: u64, nlb: u32) -> Self {
        DsmRange {
            cattr: 0,
            nlb,
            slba,
        }
    }

    /// The range as the controller reads it.
    pub fn to_le_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.cattr.to_le_bytes());
        b[4..8].copy_from_slice(&self.nlb.to_le_bytes());
        b[8..16].copy_from_slice(&self.slba.to_le_bytes());
        b
    }

    /// A range as the host wrote it.
    pub fn from_le_bytes(b: &[u8; Self::SIZE]) -> Self {
        DsmRange {
            cattr: le::u32(b, 0),
            nlb: le::u32(b, 4),
            slba: le::u64(b, 8),
        }
    }
}

/// One Copy source range descriptor, format 0h (NVM command set spec 3.2.2, "Source Range
/// Entries Copy Descriptor Format 0h"): 32 bytes, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyRange {
    /// Reserved (bytes 0-7).
    pub rsvd0: u64,
    /// Starting LBA of the source range (bytes 8-15).
    pub slba: u64,
    /// Number of logical blocks, 0-based (bytes 16-17).
    pub nlb: u16,
    /// Command extension type, bits 3:0 (byte 18).
    pub cetype: u8,
    /// Reserved (byte 19).
    pub rsvd19: u8,
    /// Command extension value (bytes 20-21).
    pub cev: u16,
    /// Reserved (bytes 22-23).
    pub rsvd22: u16,
    /// Expected initial logical block reference tag / storage tag (bytes 24-27).
    pub elbt: u32,
    /// Expected logical block application tag (bytes 28-29).
    pub elbat: u16,
    /// Expected logical block application tag mask (bytes 30-31).
    pub elbatm: u16,
}

impl CopyRange {
    /// Bytes of one descriptor.
    pub const SIZE: usize = 32;

    /// A source range of `blocks` blocks (1 to 65536) from `slba`, no protection information.
    pub fn new(slba: u64, blocks: u32) -> Self {
        debug_assert!((1..=1 << 16).contains(&blocks));
        CopyRange {
            slba,
            nlb: (blocks - 1) as u16,
            ..Default::default()
        }
    }

    /// Number of logical blocks of the range (NLB is 0-based).
    pub fn blocks(&self) -> u64 {
        self.nlb as u64 + 1
    }

    /// The descriptor as the controller reads it.
    pub fn to_le_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.rsvd0.to_le_bytes());
        b[8..16].copy_from_slice(&self.slba.to_le_bytes());
        b[16..18].copy_from_slice(&self.nlb.to_le_bytes());
        b[18] = self.cetype;
        b[19] = self.rsvd19;
        b[20..22].copy_from_slice(&self.cev.to_le_bytes());
        b[22..24].copy_from_slice(&self.rsvd22.to_le_bytes());
        b[24..28].copy_from_slice(&self.elbt.to_le_bytes());
        b[28..30].copy_from_slice(&self.elbat.to_le_bytes());
        b[30..32].copy_from_slice(&self.elbatm.to_le_bytes());
        b
    }

    /// A descriptor as the host wrote it.
    pub fn from_le_bytes(b: &[u8; Self::SIZE]) -> Self {
        CopyRange {
            rsvd0: le::u64(b, 0),
            slba: le::u64(b, 8),
            nlb: le::u16(b, 16),
            cetype: b[18],
            rsvd19: b[19],
            cev: le::u16(b, 20),
            rsvd22: le::u16(b, 22),
            elbt: le::u32(b, 24),
            elbat: le::u16(b, 28),
            elbatm: le::u16(b, 30),
        }
    }
}

const _: () = assert!(std::mem::size_of::<DsmRange>() == DsmRange::SIZE);
const _: () = assert!(std::mem::offset_of!(DsmRange, nlb) == 4);
const _: () = assert!(std::mem::offset_of!(DsmRange, slba) == 8);
const _: () = assert!(std::mem::size_of::<CopyRange>() == CopyRange::SIZE);
const _: () = assert!(std::mem::offset_of!(CopyRange, slba) == 8);
const _: () = assert!(std::mem::offset_of!(CopyRange, nlb) == 16);
const _: () = assert!(std::mem::offset_of!(CopyRange, cev) == 20);
const _: () = assert!(std::mem::offset_of!(CopyRange, elbt) == 24);
const _: () = assert!(std::mem::offset_of!(CopyRange, elbatm) == 30);

/// Admin command opcodes (base spec 5).
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
    /// Identify CNS: namespace.
    pub const CNS_NAMESPACE: u32 = 0x00;
    /// Identify CNS: controller.
    pub const CNS_CONTROLLER: u32 = 0x01;
    /// Identify CNS: active namespace id list.
    pub const CNS_ACTIVE_NS_LIST: u32 = 0x02;
    /// Feature: Number of Queues.
    pub const FEAT_NUM_QUEUES: u32 = 0x07;
}

/// NVM command set I/O opcodes (NVM command set spec 3).
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
    /// Copy.
    pub const COPY: u8 = 0x19;
    /// Dataset Management CDW11: Attribute - Deallocate (AD).
    pub const DSM_DEALLOCATE: u32 = 1 << 2;
}

/// A human name for an opcode, for errors.
pub fn opcode_name(admin_queue: bool, opcode: u8) -> &'static str {
    if admin_queue {
        match opcode {
            admin::DELETE_SQ => "Delete I/O SQ",
            admin::CREATE_SQ => "Create I/O SQ",
            admin::DELETE_CQ => "Delete I/O CQ",
            admin::CREATE_CQ => "Create I/O CQ",
            admin::IDENTIFY => "Identify",
            admin::SET_FEATURES => "Set Features",
            admin::DOORBELL_BUFFER_CONFIG => "Doorbell Buffer Config",
            _ => "admin command",
        }
    } else {
        match opcode {
            io::FLUSH => "Flush",
            io::WRITE => "Write",
            io::READ => "Read",
            io::WRITE_ZEROES => "Write Zeroes",
            io::DSM => "Dataset Management",
            io::COPY => "Copy",
            crate::zns::op::ZONE_MGMT_SEND => "Zone Management Send",
            crate::zns::op::ZONE_MGMT_RECV => "Zone Management Receive",
            crate::zns::op::ZONE_APPEND => "Zone Append",
            _ => "I/O command",
        }
    }
}

/// ONCS bits: optional NVM commands (Identify Controller bytes 520-521).
pub mod oncs {
    /// Dataset Management.
    pub const DSM: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Copy.
    pub const COPY: u16 = 1 << 8;
}

/// Little-endian field readers over an Identify data buffer.
pub(crate) mod le {
    pub fn u16(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    pub fn u32(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }
    pub fn u64(b: &[u8], o: usize) -> u64 {
        u32(b, o) as u64 | (u32(b, o + 4) as u64) << 32
    }
    /// An ASCII field, space padded.
    pub fn text(b: &[u8], o: usize, len: usize) -> String {
        String::from_utf8_lossy(&b[o..o + len]).trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_decode() {
        // QEMU 7.2's CAP: MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMAX 64 KiB.
        let cap = Cap(0x0040_0020_0f01_07ff);
        assert_eq!(cap.mqes(), 2048);
        assert!(cap.cqr());
        assert_eq!(cap.timeout_ms(), 7500);
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(cap.supports_nvm());
        assert_eq!(cap.mps_min(), 4096);
        assert_eq!(cap.mps_max(), 4096 << 4);
        assert_eq!(Cap(2 << 32).doorbell_stride(), 16);
    }

    #[test]
    fn doorbells_follow_the_stride() {
        assert_eq!(doorbell_offset(0, false, 4), 0x1000);
        assert_eq!(doorbell_offset(0, true, 4), 0x1004);
        assert_eq!(doorbell_offset(3, true, 16), 0x1000 + 7 * 16);
    }

    #[test]
    fn sqe_fields_pack() {
        let mut s = Sqe::new(io::WRITE, 2);
        s.set_cid(0xbeef);
        s.set_slba(0x1_2345_6789);
        assert_eq!(
            (s.opcode(), s.cid(), s.slba()),
            (io::WRITE, 0xbeef, 0x1_2345_6789)
        );
        assert_eq!(s.as_slice()[0], io::WRITE);
        assert_eq!(&s.as_slice()[2..4], &0xbeefu16.to_le_bytes());
    }
}

/// Create I/O Completion Queue and Create I/O Submission Queue (base spec 5.4, 5.5):
/// the CDW11 flags and the builders. CDW10 of both is the queue id in bits 15:0 and the
/// queue size, 0-based, in bits 31:16; PRP1 is the queue's base when it is physically
/// contiguous.
pub mod create_queue {
    /// CDW11 bit 0 of both commands (PC): the queue is one physically contiguous buffer
    /// at PRP1, rather than described by a PRP list.
    pub const PHYSICALLY_CONTIGUOUS: u32 = 1 << 0;
    /// Create I/O CQ CDW11 bit 1 (IEN): the controller raises the interrupt vector of
    /// bits 31:16 on completions. nvcopy polls, so it never sets this.
    pub const INTERRUPTS_ENABLED: u32 = 1 << 1;
    /// Create I/O SQ CDW11 bits 31:16: the completion queue the SQ posts to.
    pub const SQ_CQID_SHIFT: u32 = 16;
    /// CDW10 bits 31:16 of both commands: the queue size, 0-based.
    pub const QSIZE_SHIFT: u32 = 16;

    /// CDW10 for queue `qid` of `entries` slots (at least 2, the spec's minimum).
    pub(crate) fn cdw10(qid: u16, entries: u16) -> u32 {
        qid as u32 | (entries.saturating_sub(1) as u32) << QSIZE_SHIFT
    }
}

impl Sqe {
    /// Create I/O Completion Queue `qid` of `entries` slots (at least 2) at `iova`:
    /// physically contiguous, interrupts disabled (polled).
    pub fn create_io_cq(qid: u16, entries: u16, iova: nvcopy_vfio::Iova) -> Sqe {
        let mut s = Sqe::new(admin::CREATE_CQ, 0);
        s.prp1 = iova.0;
        s.cdw10 = create_queue::cdw10(qid, entries);
        s.cdw11 = create_queue::PHYSICALLY_CONTIGUOUS;
        s
    }

    /// Create I/O Submission Queue `qid` of `entries` slots (at least 2) at `iova`,
    /// posting its completions to completion queue `cqid`: physically contiguous, priority
    /// class 0 (urgent; ignored under round-robin arbitration), NVM set 0.
    pub fn create_io_sq(qid: u16, entries: u16, iova: nvcopy_vfio::Iova, cqid: u16) -> Sqe {
        let mut s = Sqe::new(admin::CREATE_SQ, 0);
        s.prp1 = iova.0;
        s.cdw10 = create_queue::cdw10(qid, entries);
        s.cdw11 =
            create_queue::PHYSICALLY_CONTIGUOUS | (cqid as u32) << create_queue::SQ_CQID_SHIFT;
        s
    }
}

#[cfg(test)]
mod create_queue_tests {
    use super::*;

    #[test]
    fn create_io_cq_lays_out_cdw10_and_cdw11() {
        let s = Sqe::create_io_cq(3, 256, nvcopy_vfio::Iova(0x1234_5000));
        assert_eq!((s.opcode(), s.nsid, s.prp1), (0x05, 0, 0x1234_5000));
        // QID 3 in 15:0, QSIZE 255 (0-based) in 31:16.
        assert_eq!(s.cdw10, 0x00ff_0003);
        // PC set, IEN clear, vector 0.
        assert_eq!(s.cdw11, 0x0000_0001);
        assert_eq!(s.cdw11 & create_queue::INTERRUPTS_ENABLED, 0);
        assert_eq!((s.cdw12, s.prp2), (0, 0));
    }

    #[test]
    fn create_io_sq_lays_out_cdw10_and_cdw11() {
        let s = Sqe::create_io_sq(7, 4096, nvcopy_vfio::Iova(0x8_0000_0000), 2);
        assert_eq!((s.opcode(), s.nsid, s.prp1), (0x01, 0, 0x8_0000_0000));
        assert_eq!(s.cdw10, 0x0fff_0007);
        // PC set, QPRIO 0, CQID 2 in 31:16.
        assert_eq!(s.cdw11, 0x0002_0001);
        assert_eq!((s.cdw12, s.prp2), (0, 0));
        // The smallest queue: 2 entries is QSIZE 1.
        assert_eq!(
            Sqe::create_io_sq(1, 2, nvcopy_vfio::Iova(0), 1).cdw10,
            0x0001_0001
        );
    }
}

/// Doorbell Buffer Config (admin opcode 7Ch; base spec 1.3 section 5.7, 1.4 and later
/// 5.8), offered when Identify Controller OACS bit 8 is set. PRP1 is the Shadow Doorbell
/// buffer, PRP2 the EventIdx buffer, both memory-page aligned. Both are laid out like the
/// doorbell registers with the controller's doorbell stride: the entry of SQ y's tail is
/// at byte `2y * stride`, that of CQ y's head at `(2y + 1) * stride`
/// ([`doorbell_buffer::offset`]). The host writes new tails and heads to the Shadow
/// Doorbell buffer; the controller writes, in the EventIdx buffer, the value past which
/// it wants an MMIO doorbell write as well ([`doorbell_buffer::need_event`]). A
/// controller reset forgets the configuration.
pub mod doorbell_buffer {
    /// OACS bit 8: Doorbell Buffer Config is supported.
    pub const OACS_BIT: u16 = 1 << 8;

    /// Byte offset of a queue's entry in the Shadow Doorbell and EventIdx buffers: the
    /// doorbell register's offset from the first doorbell.
    pub fn offset(qid: u16, completion: bool, stride: usize) -> usize {
        super::doorbell_offset(qid, completion, stride) - super::reg::DOORBELL_BASE
    }

    /// Bytes each buffer needs for the admin queue and `io_queues` I/O queue pairs.
    pub fn len(io_queues: usize, stride: usize) -> usize {
        2 * (io_queues + 1) * stride
    }

    /// Whether moving a doorbell from `old` to `new` passed the controller's EventIdx
    /// `event_idx`, so that it wants the MMIO doorbell write too: `event_idx` lies in
    /// `[old, new)` (modulo 2^16; indexes below the queue size wrap consistently). The
    /// same rule as Linux's `nvme_dbbuf_need_event` and virtio's `vring_need_event`.
    #[inline]
    pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
        new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

impl Sqe {
    /// Doorbell Buffer Config with the Shadow Doorbell buffer at `shadow` (PRP1) and the
    /// EventIdx buffer at `eventidx` (PRP2).
    pub fn doorbell_buffer_config(shadow: nvcopy_vfio::Iova, eventidx: nvcopy_vfio::Iova) -> Sqe {
        let mut s = Sqe::new(admin::DOORBELL_BUFFER_CONFIG, 0);
        s.prp1 = shadow.0;
        s.prp2 = eventidx.0;
        s
    }
}

#[cfg(test)]
mod doorbell_buffer_tests {
    use super::doorbell_buffer::{len, need_event, offset};
    use super::*;

    #[test]
    fn entries_follow_the_doorbell_stride() {
        assert_eq!(offset(0, false, 4), 0);
        assert_eq!(offset(0, true, 4), 4);
        assert_eq!(offset(3, false, 4), 24);
        assert_eq!(offset(3, true, 16), 7 * 16);
        assert_eq!(len(64, 4), 520);
        let s = Sqe::doorbell_buffer_config(nvcopy_vfio::Iova(0x1000), nvcopy_vfio::Iova(0x2000));
        assert_eq!(
            (s.opcode(), s.nsid, s.prp1, s.prp2),
            (0x7c, 0, 0x1000, 0x2000)
        );
    }

    #[test]
    fn an_event_is_needed_only_when_the_move_passes_the_event_index() {
        // The controller caught up with tail 5 and asks to hear of anything after it.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 9, 5));
        // It has not yet caught up with 5 (it last saw 3): it will look again itself.
        assert!(!need_event(3, 6, 5));
        assert!(!need_event(4, 6, 5));
        // The move 5 -> 9 passes an event index of 7.
        assert!(need_event(7, 9, 5));
        assert!(!need_event(9, 9, 5), "9 itself is not passed");
        // Across the wrap of a 4-entry ring: 3 -> 1 passes 3 and 0, not 1 or 2.
        assert!(need_event(3, 1, 3));
        assert!(need_event(0, 1, 3));
        assert!(!need_event(1, 1, 3));
        assert!(!need_event(2, 1, 3));
        // Across 2^16.
        assert!(need_event(0xffff, 1, 0xffff));
        assert!(need_event(0, 1, 0xffff));
        assert!(!need_event(0xfffe, 1, 0xffff));
    }
}
