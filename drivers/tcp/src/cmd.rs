//! Submission queue entries for NVMe over Fabrics on TCP: Fabrics commands (Connect,
//! Property Get/Set; NVMe over Fabrics spec 6.3-6.5), the admin commands bring-up needs
//! and the NVM I/O commands, with the data pointer as an SGL descriptor (base spec
//! 4.3.2): in-capsule data is an offset Data Block, data moved by R2T/H2C Data or C2H Data
//! is a Transport SGL Data Block.

/// A submission queue entry.
pub type Sqe = [u8; 64];

/// Opcodes.
pub mod op {
    /// Fabrics command (the FCTYPE says which).
    pub const FABRICS: u8 = 0x7f;
    /// Admin: Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Admin: Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Admin: Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Admin: Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// NVM: Flush.
    pub const FLUSH: u8 = 0x00;
    /// NVM: Write.
    pub const WRITE: u8 = 0x01;
    /// NVM: Read.
    pub const READ: u8 = 0x02;
    /// NVM: Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
}

/// Fabrics command types.
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
}

/// Controller properties (register offsets, base spec 3.1.4).
pub mod prop {
    /// Controller Capabilities, 8 bytes.
    pub const CAP: u32 = 0x00;
    /// Version.
    pub const VS: u32 = 0x08;
    /// Controller Configuration.
    pub const CC: u32 = 0x14;
    /// Controller Status.
    pub const CSTS: u32 = 0x1c;
}

/// Bytes of the Connect command's data (Fabrics spec figure 20).
pub const CONNECT_DATA_LEN: usize = 1024;

/// PSDT = 01b: SGLs for data, metadata pointer contiguous.
const SGL_FLAGS: u8 = 0x40;
/// SGL identifier: Data Block, address is an offset in the capsule.
const SGL_INCAPSULE: u8 = 0x01;
/// SGL identifier: Transport SGL Data Block, transport specific (NVMe/TCP).
const SGL_TRANSPORT: u8 = 0x5a;

/// Where a command's data travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sgl {
    /// No data (a null Transport SGL descriptor).
    None,
    /// `len` bytes right after the command, in its capsule.
    InCapsule(u32),
    /// `len` bytes by R2T and H2C Data (writes) or C2H Data (reads).
    Transport(u32),
}

fn put(s: &mut Sqe, at: usize, v: &[u8]) {
    s[at..at + v.len()].copy_from_slice(v);
}

/// An SQE of `opcode` with its data pointer; the caller stamps the command id.
pub fn sqe(opcode: u8, nsid: u32, sgl: Sgl) -> Sqe {
    let mut s = [0u8; 64];
    s[0] = opcode;
    s[1] = SGL_FLAGS;
    put(&mut s, 4, &nsid.to_le_bytes());
    let (len, id) = match sgl {
        Sgl::None => (0, SGL_TRANSPORT),
        Sgl::InCapsule(l) => (l, SGL_INCAPSULE),
        Sgl::Transport(l) => (l, SGL_TRANSPORT),
    };
    put(&mut s, 32, &len.to_le_bytes());
    s[39] = id;
    s
}

/// Writes the command id.
pub fn set_cid(s: &mut Sqe, cid: u16) {
    put(s, 2, &cid.to_le_bytes());
}

/// The command id.
pub fn cid_of(s: &Sqe) -> u16 {
    u16::from_le_bytes([s[2], s[3]])
}

/// Writes command dword `n` (10 to 15).
pub fn set_cdw(s: &mut Sqe, n: usize, v: u32) {
    put(s, n * 4, &v.to_le_bytes());
}

fn fabrics(fctype: u8, sgl: Sgl) -> Sqe {
    let mut s = sqe(op::FABRICS, 0, sgl);
    // Byte 4 is FCTYPE, not NSID, in a Fabrics command.
    s[4] = fctype;
    s
}

/// Connect (Fabrics spec 6.3): queue `qid` of `sqsize` entries (0's based), keep-alive
/// timeout `kato_ms` (admin queue only); its 1024 bytes of data go in the capsule.
pub fn connect(qid: u16, sqsize: u16, kato_ms: u32) -> Sqe {
    let mut s = fabrics(fctype::CONNECT, Sgl::InCapsule(CONNECT_DATA_LEN as u32));
    put(&mut s, 40, &0u16.to_le_bytes()); // RECFMT 0
    put(&mut s, 42, &qid.to_le_bytes());
    put(&mut s, 44, &sqsize.to_le_bytes());
    s[46] = 0; // CATTR: priority class 0, SQ flow control on
    put(&mut s, 48, &kato_ms.to_le_bytes());
    s
}

/// Connect's data: host identifier, controller id (0xFFFF: any, for the admin queue),
/// subsystem NQN and host NQN, each NQN NUL-terminated in its 256 bytes.
pub fn connect_data(
    hostid: &[u8; 16],
    cntlid: u16,
    subnqn: &str,
    hostnqn: &str,
) -> [u8; CONNECT_DATA_LEN] {
    let mut d = [0u8; CONNECT_DATA_LEN];
    d[..16].copy_from_slice(hostid);
    d[16..18].copy_from_slice(&cntlid.to_le_bytes());
    let n = subnqn.len().min(255);
    d[256..256 + n].copy_from_slice(&subnqn.as_bytes()[..n]);
    let n = hostnqn.len().min(255);
    d[512..512 + n].copy_from_slice(&hostnqn.as_bytes()[..n]);
    d
}

/// Property Get of the 4- or 8-byte property at `offset`.
pub fn property_get(offset: u32, eight: bool) -> Sqe {
    let mut s = fabrics(fctype::PROPERTY_GET, Sgl::None);
    s[40] = eight as u8;
    put(&mut s, 44, &offset.to_le_bytes());
    s
}

/// Property Set of the 4-byte property at `offset`.
pub fn property_set(offset: u32, value: u32) -> Sqe {
    let mut s = fabrics(fctype::PROPERTY_SET, Sgl::None);
    s[40] = 0;
    put(&mut s, 44, &offset.to_le_bytes());
    put(&mut s, 48, &(value as u64).to_le_bytes());
    s
}

/// Identify of `cns` for `nsid`, 4096 bytes returned by C2H Data.
pub fn identify(cns: u8, nsid: u32) -> Sqe {
    let mut s = sqe(op::IDENTIFY, nsid, Sgl::Transport(4096));
    set_cdw(&mut s, 10, cns as u32);
    s
}

/// Get Log Page (base spec 2.0, the Get Log Page command) of log `lid`: `len` bytes (a whole number of
/// dwords, at least one) from byte `offset` (dword aligned) of the log, returned by C2H
/// Data. The dword count is split as the spec has it since 1.3: NUMDL in CDW10 bits
/// 31:16 and NUMDU in CDW11 bits 15:0, 0's based; the offset is LPOL (CDW12) and LPOU
/// (CDW13). LSP, RAE and the log specific identifier stay 0, which is what the
/// Discovery log (LID 70h) asks for.
pub fn get_log_page(lid: u8, offset: u64, len: u32) -> Sqe {
    let mut s = sqe(op::GET_LOG_PAGE, 0, Sgl::Transport(len & !3));
    let numd = (len / 4).saturating_sub(1);
    set_cdw(&mut s, 10, lid as u32 | (numd & 0xffff) << 16);
    set_cdw(&mut s, 11, numd >> 16);
    set_cdw(&mut s, 12, offset as u32);
    set_cdw(&mut s, 13, (offset >> 32) as u32);
    s
}

/// Set Features Number of Queues (FID 07h): `n` submission and completion queues.
pub fn set_queue_count(n: u16) -> Sqe {
    let mut s = sqe(op::SET_FEATURES, 0, Sgl::None);
    set_cdw(&mut s, 10, 0x07);
    let z = n.saturating_sub(1) as u32;
    set_cdw(&mut s, 11, z | z << 16);
    s
}

/// Keep Alive.
pub fn keep_alive() -> Sqe {
    sqe(op::KEEP_ALIVE, 0, Sgl::None)
}

/// Read, Write or Write Zeroes of `blocks` blocks at `lba`.
pub fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32, sgl: Sgl) -> Sqe {
    let mut s = sqe(opcode, nsid, sgl);
    set_cdw(&mut s, 10, lba as u32);
    set_cdw(&mut s, 11, (lba >> 32) as u32);
    set_cdw(&mut s, 12, blocks.saturating_sub(1) & 0xffff);
    s
}

/// CC and CSTS fields (base spec 3.1.4.5, 3.1.4.6).
pub mod cc {
    /// CC.EN.
    pub const EN: u32 = 1;
    /// CC.IOSQES = 6 (64-byte SQEs), CC.IOCQES = 4 (16-byte CQEs).
    pub const QUEUE_ENTRY_SIZES: u32 = 6 << 16 | 4 << 20;
    /// CC.SHN = 01b: normal shutdown.
    pub const SHN_NORMAL: u32 = 1 << 14;
    /// CSTS.RDY.
    pub const RDY: u32 = 1;
    /// CSTS.CFS.
    pub const CFS: u32 = 1 << 1;
    /// CSTS.SHST mask, and "shutdown complete".
    pub const SHST_MASK: u32 = 3 << 2;
    /// CSTS.SHST = 10b.
    pub const SHST_DONE: u32 = 2 << 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_layout() {
        let mut s = connect(3, 127, 0);
        set_cid(&mut s, 0x55);
        assert_eq!((s[0], s[1], s[4]), (0x7f, 0x40, 1));
        assert_eq!(cid_of(&s), 0x55);
        assert_eq!(u16::from_le_bytes([s[42], s[43]]), 3);
        assert_eq!(u16::from_le_bytes([s[44], s[45]]), 127);
        assert_eq!(u32::from_le_bytes([s[32], s[33], s[34], s[35]]), 1024);
        assert_eq!(s[39], 0x01);
        let d = connect_data(&[7; 16], 0xffff, "nqn.a", "nqn.h");
        assert_eq!(&d[16..18], &[0xff, 0xff]);
        assert_eq!(&d[256..262], b"nqn.a\0");
        assert_eq!(&d[512..518], b"nqn.h\0");
    }

    fn dword(s: &Sqe, n: usize) -> u32 {
        u32::from_le_bytes([s[4 * n], s[4 * n + 1], s[4 * n + 2], s[4 * n + 3]])
    }

    #[test]
    fn get_log_page_layout() {
        // The Discovery log's header: 1024 bytes = 256 dwords, NUMD 255.
        let s = get_log_page(0x70, 0, 1024);
        assert_eq!((s[0], s[1], s[39]), (0x02, 0x40, 0x5a));
        assert_eq!(dword(&s, 1), 0, "no namespace");
        assert_eq!(dword(&s, 8), 1024, "SGL length");
        assert_eq!(dword(&s, 10), 0x70 | 255 << 16);
        assert_eq!((dword(&s, 11), dword(&s, 12), dword(&s, 13)), (0, 0, 0));
        // 1 MiB + 4 KiB from byte 1024: NUMD 0x40400 - 1 spills into NUMDU.
        let s = get_log_page(0x70, 1024, (1 << 20) + 4096);
        let numd = ((1u32 << 20) + 4096) / 4 - 1;
        assert_eq!(dword(&s, 10), 0x70 | (numd & 0xffff) << 16);
        assert_eq!(dword(&s, 11), numd >> 16);
        assert_eq!(dword(&s, 11), 4);
        assert_eq!(dword(&s, 12), 1024);
        assert_eq!(dword(&s, 13), 0);
        // An offset past 4 GiB goes to LPOU.
        let s = get_log_page(0x70, 0x2_0000_0400, 4);
        assert_eq!(
            (dword(&s, 10), dword(&s, 12), dword(&s, 13)),
            (0x70, 0x400, 2)
        );
    }

    #[test]
    fn property_and_io_layouts() {
        let s = property_get(prop::CAP, true);
        assert_eq!((s[4], s[40], s[44]), (4, 1, 0));
        let s = property_set(prop::CC, 0x46_0001);
        assert_eq!((s[4], s[44]), (0, 0x14));
        assert_eq!(u32::from_le_bytes([s[48], s[49], s[50], s[51]]), 0x46_0001);
        let s = rw(op::READ, 1, 0x1_0000_0002, 8, Sgl::Transport(4096));
        assert_eq!(u32::from_le_bytes([s[4], s[5], s[6], s[7]]), 1);
        assert_eq!(u32::from_le_bytes([s[40], s[41], s[42], s[43]]), 2);
        assert_eq!(u32::from_le_bytes([s[44], s[45], s[46], s[47]]), 1);
        assert_eq!(u16::from_le_bytes([s[48], s[49]]), 7);
        assert_eq!(s[39], 0x5a);
        let s = set_queue_count(4);
        assert_eq!(
            u32::from_le_bytes([s[44], s[45], s[46], s[47]]),
            3 | 3 << 16
        );
    }
}
