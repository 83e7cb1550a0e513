//! How a software controller is built: controller-wide limits and optional features, and
//! one [`NamespaceConfig`] per namespace.

use std::path::PathBuf;

use nvcopy_nvme::spec::{oncs, reg};

/// PCI vendor id the software controller reports. Not a registered vendor: it only has to
/// be recognisable in `nvcopy identify` output.
pub const SIM_VID: u16 = 0x5e1f;

/// A namespace of the software controller.
#[derive(Clone, Debug)]
pub struct NamespaceConfig {
    pub(super) lba_size: u32,
    pub(super) blocks: u64,
    pub(super) metadata: u16,
    pub(super) mssrl: u16,
    pub(super) mcl: u32,
    /// MSRC as the spec encodes it: 0-based.
    pub(super) msrc: u8,
    pub(super) file: Option<PathBuf>,
    pub(super) nguid: [u8; 16],
    pub(super) eui64: [u8; 8],
}

impl NamespaceConfig {
    /// A memory-backed namespace of `blocks` blocks of `lba_size` bytes. Memory is sparse:
    /// only 4 KiB pages that were written take space. `lba_size` must be a power of two
    /// from 512 to 65536 (sizes above 4096 exist to test the driver's refusal).
    pub fn new(lba_size: u32, blocks: u64) -> Self {
        NamespaceConfig {
            lba_size,
            blocks,
            metadata: 0,
            mssrl: 256,
            mcl: 4096,
            msrc: 127,
            file: None,
            nguid: [0; 16],
            eui64: [0; 8],
        }
    }

    /// The NGUID Identify Namespace reports (all zeroes, the default, reports none). Two
    /// controllers reporting the same NGUID expose one namespace, as far as the driver
    /// can tell; their data stays separate here.
    pub fn nguid(mut self, nguid: [u8; 16]) -> Self {
        self.nguid = nguid;
        self
    }

    /// The EUI64 Identify Namespace reports (all zeroes, the default, reports none).
    pub fn eui64(mut self, eui64: [u8; 8]) -> Self {
        self.eui64 = eui64;
        self
    }

    /// Backs the namespace with a (sparse) file at `path`, created or extended to the
    /// namespace's size. Its existing contents are the namespace's data.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// Uses an LBA format that carries `bytes` of metadata per block (separate buffer, no
    /// protection information). The driver must refuse such a namespace.
    pub fn metadata(mut self, bytes: u16) -> Self {
        self.metadata = bytes;
        self
    }

    /// Copy command limits: MSSRL (blocks per source range), MCL (blocks per command) and
    /// the number of source ranges per command (1 to 256; MSRC is that minus one).
    pub fn copy_limits(mut self, mssrl: u16, mcl: u32, max_ranges: u16) -> Self {
        self.mssrl = mssrl;
        self.mcl = mcl;
        self.msrc = (max_ranges.clamp(1, 256) - 1) as u8;
        self
    }
}

/// Configuration of a [`super::SimController`], built with chained setters.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub(super) namespaces: Vec<NamespaceConfig>,
    pub(super) mdts: u8,
    pub(super) max_queue_entries: u32,
    pub(super) io_queues: u16,
    pub(super) dstrd: u8,
    pub(super) oncs: u16,
    pub(super) ocfs: u16,
    pub(super) cap_timeout: u8,
    pub(super) vwc: bool,
    pub(super) doorbell_buffer: bool,
    pub(super) serial: String,
    pub(super) model: String,
    pub(super) firmware: String,
    pub(super) subnqn: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            namespaces: Vec::new(),
            mdts: 5,
            max_queue_entries: 1024,
            io_queues: 4,
            dstrd: 0,
            oncs: oncs::COPY | oncs::WRITE_ZEROES | oncs::DSM,
            ocfs: 1,
            cap_timeout: 2,
            vwc: true,
            doorbell_buffer: true,
            serial: "SIM0001".into(),
            model: "nvcopy software NVMe controller".into(),
            firmware: "1.0".into(),
            subnqn: None,
        }
    }
}

impl SimConfig {
    /// A controller with no namespaces, MDTS 5 (128 KiB), 1024-entry queues, 4 I/O queue
    /// pairs, doorbell stride 4, Copy (format 0), Write Zeroes and Dataset Management,
    /// Doorbell Buffer Config (shadow doorbells, as QEMU offers them), a volatile write
    /// cache and CAP.TO of 1 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a namespace; namespace ids are given in order from 1.
    pub fn namespace(mut self, ns: NamespaceConfig) -> Self {
        self.namespaces.push(ns);
        self
    }

    /// MDTS: the largest transfer is 2^mdts * 4 KiB; 0 means no limit.
    pub fn mdts(mut self, mdts: u8) -> Self {
        self.mdts = mdts;
        self
    }

    /// CAP.MQES as a count of entries (1 to 65536). The specification's minimum is 2; 1
    /// (MQES = 0) exists to test the driver's refusal of such a controller.
    pub fn max_queue_entries(mut self, entries: u32) -> Self {
        self.max_queue_entries = entries.clamp(1, 1 << 16);
        self
    }

    /// I/O submission/completion queue pairs granted by Set Features (1 to 65535).
    pub fn io_queues(mut self, n: u16) -> Self {
        self.io_queues = n.max(1);
        self
    }

    /// CAP.DSTRD: doorbells are `4 << dstrd` bytes apart (0 to 15).
    pub fn doorbell_stride(mut self, dstrd: u8) -> Self {
        self.dstrd = dstrd.min(15);
        self
    }

    /// Offers the Copy command (ONCS bit 8, OCFS format 0) or not.
    pub fn copy(mut self, on: bool) -> Self {
        self.oncs = flag(self.oncs, oncs::COPY, on);
        self.ocfs = flag(self.ocfs, 1, on);
        self
    }

    /// Offers Write Zeroes (ONCS bit 3) or not.
    pub fn write_zeroes(mut self, on: bool) -> Self {
        self.oncs = flag(self.oncs, oncs::WRITE_ZEROES, on);
        self
    }

    /// Offers Dataset Management (ONCS bit 2) or not.
    pub fn dsm(mut self, on: bool) -> Self {
        self.oncs = flag(self.oncs, oncs::DSM, on);
        self
    }

    /// Raw ONCS. Only the Copy, Write Zeroes and DSM bits change what the controller does.
    pub fn oncs(mut self, oncs: u16) -> Self {
        self.oncs = oncs;
        self
    }

    /// Raw OCFS. Only bit 0 (format 0) is implemented.
    pub fn ocfs(mut self, ocfs: u16) -> Self {
        self.ocfs = ocfs;
        self
    }

    /// CAP.TO in 500 ms units.
    pub fn cap_timeout(mut self, units_500ms: u8) -> Self {
        self.cap_timeout = units_500ms;
        self
    }

    /// Offers Doorbell Buffer Config (OACS bit 8, admin opcode 7Ch) or not. Without it the
    /// command is an Invalid Command Opcode and every doorbell is an MMIO write.
    ///
    /// With it the controller behaves as QEMU's does: once configured, it takes an I/O
    /// queue's SQ tail from the Shadow Doorbell buffer whenever it processes the queue, and
    /// after each command it writes the tail it has consumed to the queue's EventIdx and
    /// reads the shadow tail again; before each completion it writes the CQ head it knows
    /// to the CQ's EventIdx and reads the shadow head. The admin queue goes by its MMIO
    /// doorbells, which the controller copies into its shadow entries. A reset forgets
    /// the configuration.
    pub fn doorbell_buffer(mut self, on: bool) -> Self {
        self.doorbell_buffer = on;
        self
    }

    /// Whether Identify reports a volatile write cache.
    pub fn volatile_write_cache(mut self, on: bool) -> Self {
        self.vwc = on;
        self
    }

    /// Serial number (Identify SN, up to 20 ASCII characters).
    pub fn serial(mut self, sn: &str) -> Self {
        self.serial = sn.into();
        self
    }

    /// Model number (Identify MN, up to 40 ASCII characters).
    pub fn model(mut self, mn: &str) -> Self {
        self.model = mn.into();
        self
    }

    /// Subsystem NQN (Identify SUBNQN, up to 255 bytes). Controllers given the same NQN
    /// claim to be one subsystem, so equal namespace ids name one namespace. By default
    /// each controller built is a subsystem of its own, with an NQN no other one has.
    pub fn subsystem_nqn(mut self, nqn: &str) -> Self {
        self.subnqn = Some(nqn.into());
        self
    }
}

fn flag(bits: u16, bit: u16, on: bool) -> u16 {
    if on {
        bits | bit
    } else {
        bits & !bit
    }
}

/// What the controller derives from its configuration once, at creation.
#[derive(Debug)]
pub(super) struct Params {
    pub cap: u64,
    pub bar_len: usize,
    pub stride: usize,
    pub mdts: u8,
    pub io_queues: u16,
    pub mqes: u32,
    pub oncs: u16,
    pub ocfs: u16,
    pub vwc: bool,
    pub doorbell_buffer: bool,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub subnqn: String,
}

/// Tells apart the default subsystem NQNs of controllers built in one process.
static SUBSYSTEMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// CAP.MPSMAX the controller reports: 64 KiB pages.
const MPSMAX: u64 = 4;

impl Params {
    pub fn new(c: &SimConfig) -> Self {
        let stride = 4usize << c.dstrd;
        let cap = (c.max_queue_entries as u64 - 1)
            | 1 << 16 // CQR: queues must be physically contiguous
            | (c.cap_timeout as u64) << 24
            | (c.dstrd as u64) << 32
            | 1 << 37 // CSS: NVM command set
            | MPSMAX << 52; // MPSMIN is 0: 4 KiB
        let doorbells = 2 * (c.io_queues as usize + 1) * stride;
        Params {
            cap,
            bar_len: (reg::DOORBELL_BASE + doorbells).next_multiple_of(0x1000),
            stride,
            mdts: c.mdts,
            io_queues: c.io_queues,
            mqes: c.max_queue_entries,
            oncs: c.oncs,
            ocfs: c.ocfs,
            vwc: c.vwc,
            doorbell_buffer: c.doorbell_buffer,
            serial: c.serial.clone(),
            model: c.model.clone(),
            firmware: c.firmware.clone(),
            subnqn: c.subnqn.clone().unwrap_or_else(|| {
                let n = SUBSYSTEMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("nqn.2024-01.dev.nvcopy:sim:{}:{n}", c.serial)
            }),
        }
    }

    /// Largest data transfer of one command, if limited.
    pub fn max_transfer(&self) -> Option<usize> {
        (self.mdts != 0).then(|| 4096usize << self.mdts.min(20))
    }

    pub fn has(&self, bit: u16) -> bool {
        self.oncs & bit != 0
    }

    pub fn page_size_ok(&self, mps: u32) -> bool {
        (mps as u64) <= MPSMAX
    }
}
