//! Controller bring-up, admin commands and shutdown.
//!
//! Initialisation follows base spec 3.5.1: disable and wait for CSTS.RDY = 0, program the
//! admin queue (AQA, ASQ, ACQ), enable with 4 KiB pages and 64/16-byte entries, wait for
//! CSTS.RDY = 1, then Identify, Set Features (Number of Queues) and namespace discovery.
//! Every register wait is bounded by CAP.TO. Dropping the controller requests a normal
//! shutdown (CC.SHN, 3.6.1) and waits for CSTS.SHST to report it complete.
//!
//! Where Identify Controller offers Doorbell Buffer Config (OACS bit 8), bring-up gives
//! the controller a Shadow Doorbell buffer and an EventIdx buffer, and I/O queue pairs
//! ring through them (see `queue.rs`); the admin queue always uses its MMIO doorbells, as
//! Linux and SPDK do. A reset forgets the configuration, so [`Controller::reset`] gives it
//! again, and each queue's entries are zeroed before the queue is created on the
//! controller. When the command is missing or fails, every queue uses plain MMIO
//! doorbells ([`Controller::shadow_doorbells`] says which).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nvcopy_vfio::{DmaBuf, DmaPool, PAGE_SIZE};

use crate::error::{Error, Result};
use crate::identify::{parse_ns_list, ControllerInfo, Namespace};
use crate::io::IoQpair;
use crate::prp::{DataPtr, MAX_TRANSFER};
use crate::queue::{Completion, QueuePair, ShadowSlots};
use crate::regs::Bar;
use crate::spec::{admin, cc, csts, doorbell_buffer, doorbell_offset, opcode_name, reg, Cap, Sqe};
use crate::zns;

/// How a controller is brought up.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Admin queue entries.
    pub admin_entries: u16,
    /// Timeout of one admin command.
    pub admin_timeout: Duration,
    /// Timeout of one I/O command.
    pub io_timeout: Duration,
    /// I/O queue pairs to ask for with Set Features (Number of Queues).
    pub io_queues: u16,
    /// Use shadow doorbells (Doorbell Buffer Config) where the controller offers them.
    pub shadow_doorbells: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            admin_entries: 32,
            admin_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(30),
            io_queues: 64,
            shadow_doorbells: true,
        }
    }
}

/// What a controller can still do, as far as the host knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Enabled and ready for commands.
    Ready,
    /// Given up on. `quiet` says whether it was proven to do no more DMA (CC.EN = 0 seen
    /// with CSTS.RDY = 0, or bus mastering cleared): only then may the memory of commands
    /// that never completed be reused.
    Failed {
        /// Proven to do no more DMA.
        quiet: bool,
    },
}

const HEALTH_READY: u8 = 0;
const HEALTH_FAILED_QUIET: u8 = 1;
const HEALTH_FAILED_LOUD: u8 = 2;

impl Health {
    fn encode(self) -> u8 {
        match self {
            Health::Ready => HEALTH_READY,
            Health::Failed { quiet: true } => HEALTH_FAILED_QUIET,
            Health::Failed { quiet: false } => HEALTH_FAILED_LOUD,
        }
    }
    fn decode(v: u8) -> Health {
        match v {
            HEALTH_READY => Health::Ready,
            HEALTH_FAILED_QUIET => Health::Failed { quiet: true },
            _ => Health::Failed { quiet: false },
        }
    }
}

/// An initialised NVMe controller.
pub struct Controller {
    name: String,
    bar: Arc<dyn Bar>,
    pool: DmaPool,
    cap: Cap,
    opts: ControllerOptions,
    admin: Mutex<QueuePair>,
    info: ControllerInfo,
    namespaces: Vec<Namespace>,
    /// I/O queue ids in use, index qid - 1.
    qids: Mutex<Vec<bool>>,
    /// A [`Health`], encoded.
    health: AtomicU8,
    /// Bumped at the end of every reset: queue pairs made under an older generation no
    /// longer exist on the controller and must be recovered.
    generation: AtomicU64,
    /// The Shadow Doorbell and EventIdx buffers, when the controller offered Doorbell
    /// Buffer Config and they could be had.
    shadow: Option<ShadowBuffers>,
    /// Whether the controller took the buffers since its last reset: queues created now
    /// ring through them. Changed only under the admin queue's lock.
    shadow_on: AtomicBool,
    /// Set once the shutdown notification was given ([`Controller::shutdown`]): the
    /// controller then takes no more commands.
    shut_down: AtomicBool,
}

/// The two buffers of Doorbell Buffer Config, each covering every queue the controller
/// granted.
#[derive(Debug)]
struct ShadowBuffers {
    doorbells: DmaBuf,
    eventidx: DmaBuf,
}

impl ShadowBuffers {
    /// Zeroed buffers for the admin queue and `io_queues` I/O queue pairs.
    fn alloc(pool: &DmaPool, io_queues: usize, stride: usize) -> Result<Self> {
        let len = doorbell_buffer::len(io_queues, stride);
        Ok(ShadowBuffers {
            doorbells: pool.alloc_zeroed(len)?,
            eventidx: pool.alloc_zeroed(len)?,
        })
    }

    /// Queue `qid`'s four entries, if the buffers reach that far.
    fn slots(&self, qid: u16, stride: usize) -> Option<ShadowSlots> {
        let cq = doorbell_buffer::offset(qid, true, stride);
        if cq + 4 > self.doorbells.len() || cq + 4 > self.eventidx.len() {
            return None;
        }
        let sq = doorbell_buffer::offset(qid, false, stride);
        // wrapping_add forms addresses inside the buffers (checked above) without unsafe.
        let at = |b: &DmaBuf, off: usize| b.as_mut_ptr().wrapping_add(off).cast::<u32>();
        Some(ShadowSlots {
            sq_db: at(&self.doorbells, sq),
            sq_ei: at(&self.eventidx, sq),
            cq_db: at(&self.doorbells, cq),
            cq_ei: at(&self.eventidx, cq),
        })
    }
}

/// Doorbell Buffer Config with `bufs`. Ok(false) when the controller refused it (any
/// command status): it then keeps using the MMIO doorbells alone. Other errors (a
/// timeout, a fatal status) are the controller failing, and are returned.
fn configure_shadow(
    name: &str,
    bar: &dyn Bar,
    cap: Cap,
    aq: &mut QueuePair,
    bufs: &ShadowBuffers,
) -> Result<bool> {
    let sqe = Sqe::doorbell_buffer_config(bufs.doorbells.iova(), bufs.eventidx.iova());
    match admin_sync(name, bar, cap, aq, sqe, None) {
        Ok(_) => Ok(true),
        Err(Error::Command { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.name)
            .field("model", &self.info.model)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls CSTS until RDY equals `ready`, within CAP.TO. A fatal status while waiting for
/// ready is reported as such rather than as a timeout.
fn wait_ready(name: &str, bar: &dyn Bar, cap: Cap, ready: bool, what: &'static str) -> Result<()> {
    let limit = Duration::from_millis(cap.timeout_ms().max(500));
    let start = Instant::now();
    loop {
        let s = bar.read32(reg::CSTS);
        if s == u32::MAX {
            return Err(Error::NotResponding {
                ctrl: name.to_string(),
            });
        }
        if ready && s & csts::CFS != 0 {
            return Err(Error::ControllerFatal {
                ctrl: name.to_string(),
            });
        }
        if (s & csts::RDY != 0) == ready {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(Error::ReadyTimeout {
                ctrl: name.to_string(),
                what,
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Clears CC.EN and waits for the controller to stop. After this the controller does no
/// more DMA, so buffers of commands that never completed may be reused.
fn disable(name: &str, bar: &dyn Bar, cap: Cap) -> Result<()> {
    let cfg = bar.read32(reg::CC);
    if cfg & cc::EN != 0 {
        bar.write32(reg::CC, cfg & !cc::EN);
    }
    wait_ready(name, bar, cap, false, "CSTS.RDY = 0 after clearing CC.EN")
}

/// Programs the admin queue and sets CC.EN, then waits for CSTS.RDY = 1 within CAP.TO
/// (base spec 3.5.1 steps 3 to 5). The controller must be disabled.
fn enable(name: &str, bar: &dyn Bar, cap: Cap, aq: &QueuePair) -> Result<()> {
    let n = aq.entries() as u32 - 1;
    bar.write32(reg::AQA, n | n << 16);
    bar.write64(reg::ASQ, aq.sq_iova().0);
    bar.write64(reg::ACQ, aq.cq_iova().0);
    // nvcopy polls: mask the pin/MSI interrupt vector the admin CQ would use.
    bar.write32(reg::INTMS, u32::MAX);
    // Every I/O command set the controller offers, so that a zoned namespace comes with
    // its zone commands (crate::zns); NVM namespaces are served alike either way.
    let css = if cap.supports_io_command_sets() {
        cc::CSS_ALL
    } else {
        0
    };
    bar.write32(reg::CC, cc::EN | css | cc::IOSQES_64 | cc::IOCQES_16);
    wait_ready(name, bar, cap, true, "CSTS.RDY = 1 after setting CC.EN")
}

/// Set Features, Number of Queues (base spec 5.27.1.5): asks for `want` I/O queue pairs
/// and returns how many the controller granted.
fn negotiate_queues(
    name: &str,
    bar: &dyn Bar,
    cap: Cap,
    aq: &mut QueuePair,
    want: u16,
) -> Result<usize> {
    let mut sf = Sqe::new(admin::SET_FEATURES, 0);
    sf.cdw10 = admin::FEAT_NUM_QUEUES;
    let want = want.max(1) as u32 - 1;
    sf.cdw11 = want | want << 16;
    let granted = admin_sync(name, bar, cap, aq, sf, None)?;
    Ok(((granted & 0xffff).min(granted >> 16) + 1).min(want + 1) as usize)
}

/// Polls `qp` until at most `target` commands are outstanding, passing each completion to
/// `each`. Checks for expired commands and controller fatal status while idle; either one
/// disables the controller (so no buffer is written after we give up on it) and the queue.
pub(crate) fn wait_until(
    name: &str,
    bar: &dyn Bar,
    cap: Cap,
    qp: &mut QueuePair,
    target: usize,
    mut each: impl FnMut(Completion),
) -> Result<()> {
    // A disabled queue's controller was already stopped; its leftover trackers will never
    // complete, and waiting on them again would re-report the old timeout.
    if qp.is_disabled() {
        return Err(Error::QueueDisabled {
            ctrl: name.to_string(),
            qid: qp.qid(),
        });
    }
    let mut idle: u32 = 0;
    while qp.outstanding() > target {
        if qp.poll(bar, 64, &mut each)? > 0 {
            idle = 0;
            continue;
        }
        idle = idle.wrapping_add(1);
        if idle % 1024 != 0 {
            std::hint::spin_loop();
            continue;
        }
        if bar.read32(reg::CSTS) & csts::CFS != 0 {
            qp.disable();
            return Err(Error::ControllerFatal {
                ctrl: name.to_string(),
            });
        }
        if let Some(late) = qp.expired(Instant::now()) {
            qp.disable();
            // Best effort: a controller that cannot even be disabled is reported by the
            // timeout below, which is the error that matters to the caller.
            let _ = disable(name, bar, cap);
            return Err(Error::CommandTimeout {
                ctrl: name.to_string(),
                cmd: opcode_name(qp.qid() == 0, late.opcode),
                nsid: late.nsid,
                lba: late.slba,
                waited: late.waited,
            });
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// Turns a completion into `Ok(dw0)` or the typed command error.
pub(crate) fn check(name: &str, admin_queue: bool, c: &Completion) -> Result<u32> {
    if c.status.is_success() {
        Ok(c.dw0)
    } else {
        Err(Error::Command {
            ctrl: name.to_string(),
            cmd: opcode_name(admin_queue, c.opcode),
            nsid: c.nsid,
            lba: if admin_queue { 0 } else { c.slba },
            status: c.status,
        })
    }
}

/// Runs one admin command to completion.
fn admin_sync(
    name: &str,
    bar: &dyn Bar,
    cap: Cap,
    qp: &mut QueuePair,
    sqe: Sqe,
    data: Option<DataPtr<'_>>,
) -> Result<u32> {
    qp.post(sqe, data, 0)?;
    qp.ring(bar);
    let mut done = None;
    wait_until(name, bar, cap, qp, 0, |c| done = Some(c))?;
    match done {
        Some(c) => check(name, true, &c),
        None => Err(Error::ProtocolViolation {
            ctrl: name.to_string(),
            what: "an admin command vanished without a completion",
        }),
    }
}

/// Refuses a controller nvcopy cannot drive, from CAP alone (base spec 3.1.1): not
/// responding, no NVM command set, a smallest page above 4 KiB, queues of one entry, or a
/// BAR with no room for the first I/O doorbells.
fn check_capabilities(name: &str, bar: &dyn Bar) -> Result<Cap> {
    let ctrl = || name.to_string();
    let cap = Cap(bar.read64(reg::CAP));
    if cap.0 == u64::MAX {
        return Err(Error::NotResponding { ctrl: ctrl() });
    }
    if !cap.supports_nvm() {
        return Err(Error::NotNvm { ctrl: ctrl() });
    }
    if cap.mps_min() > PAGE_SIZE {
        return Err(Error::PageSizeUnsupported {
            ctrl: ctrl(),
            min: cap.mps_min(),
        });
    }
    if cap.mqes() < 2 {
        // MQES is 0-based, so 0 means one-entry queues: the spec's minimum is 2, and a
        // queue of one entry could never hold a command (it is full when empty).
        return Err(Error::QueueTooSmall {
            ctrl: ctrl(),
            entries: cap.mqes(),
        });
    }
    if doorbell_offset(1, true, cap.doorbell_stride()) + 4 > bar.len() {
        return Err(Error::BarTooSmall {
            ctrl: ctrl(),
            bar_len: bar.len(),
            qid: 1,
        });
    }
    Ok(cap)
}

/// Base spec 3.5.1 steps 1 to 5: disable, create the admin queue pair, program it and
/// enable.
fn enable_admin_queue(
    name: &str,
    bar: &dyn Bar,
    cap: Cap,
    pool: &DmaPool,
    opts: &ControllerOptions,
) -> Result<QueuePair> {
    disable(name, bar, cap)?;
    let entries = opts.admin_entries.clamp(2, cap.mqes().min(4096) as u16);
    let stride = cap.doorbell_stride();
    let aq = QueuePair::new(name, 0, entries, stride, pool, opts.admin_timeout)?;
    enable(name, bar, cap, &aq)?;
    Ok(aq)
}

/// Runs Identify commands into one page of DMA memory, read back after each.
struct Identifier<'a> {
    name: &'a str,
    bar: &'a dyn Bar,
    cap: Cap,
    aq: &'a mut QueuePair,
    buf: DmaBuf,
    page: Vec<u8>,
}

impl<'a> Identifier<'a> {
    fn new(
        name: &'a str,
        bar: &'a dyn Bar,
        cap: Cap,
        aq: &'a mut QueuePair,
        pool: &DmaPool,
    ) -> Result<Self> {
        Ok(Identifier {
            name,
            bar,
            cap,
            aq,
            buf: pool.alloc(PAGE_SIZE)?,
            page: vec![0u8; PAGE_SIZE],
        })
    }

    /// Identify with this CNS (base spec 5.17) for `nsid`; the returned page is the data.
    fn run(&mut self, nsid: u32, cns: u32) -> Result<&[u8]> {
        self.run_csi(nsid, cns, 0)
    }

    /// Identify with a CNS that is specific to I/O command set `csi` (CDW11 bits 31:24).
    fn run_csi(&mut self, nsid: u32, cns: u32, csi: u8) -> Result<&[u8]> {
        let mut sqe = Sqe::new(admin::IDENTIFY, nsid);
        sqe.cdw10 = cns;
        sqe.cdw11 = (csi as u32) << 24;
        let data = Some(DataPtr::Contig {
            iova: self.buf.iova(),
            len: PAGE_SIZE,
        });
        admin_sync(self.name, self.bar, self.cap, self.aq, sqe, data)?;
        self.buf.read_at(0, &mut self.page);
        Ok(&self.page)
    }
}

/// The active namespace list (CNS 02h, 1024 ids a page, continued after the last id of a
/// full page), then Identify Namespace for each.
fn discover_namespaces(id: &mut Identifier<'_>) -> Result<Vec<Namespace>> {
    let mut nsids = Vec::new();
    let mut after = 0u32;
    loop {
        let ids = parse_ns_list(id.run(after, admin::CNS_ACTIVE_NS_LIST)?);
        let full = ids.len() == PAGE_SIZE / 4;
        // Ids must ascend past `after`; anything else would loop forever.
        let fresh: Vec<u32> = ids.into_iter().filter(|&i| i > after).collect();
        match fresh.last() {
            Some(&last) if full => {
                after = last;
                nsids.extend(fresh);
            }
            _ => {
                nsids.extend(fresh);
                break;
            }
        }
    }
    let mut out = nsids
        .into_iter()
        .map(|nsid| Ok(Namespace::parse(nsid, id.run(nsid, admin::CNS_NAMESPACE)?)))
        .collect::<Result<Vec<_>>>()?;
    if id.cap.supports_io_command_sets() {
        let mut append_limit = None;
        for ns in &mut out {
            ns.zoned = zoned_geometry(id, ns)?;
            if ns.zoned.is_some() && append_limit.is_none() {
                let mps_min = id.cap.mps_min();
                append_limit = zns::parse_append_limit(
                    id.run_csi(0, zns::cns::CSI_CONTROLLER, zns::CSI_ZNS)?,
                    mps_min,
                );
            }
            if let Some(z) = ns.zoned.as_mut() {
                z.append_limit = append_limit;
            }
        }
    }
    Ok(out)
}

/// A zoned namespace's geometry, or None for a namespace of another command set. A
/// controller that cannot list the namespace's identifiers (CNS 03h is mandatory only
/// from NVMe 1.3) has no zoned namespaces nvcopy could use.
fn zoned_geometry(id: &mut Identifier<'_>, ns: &Namespace) -> Result<Option<zns::Zoned>> {
    let csi = match id.run(ns.nsid, zns::cns::NS_DESCRIPTORS) {
        Ok(list) => zns::parse_csi(list),
        Err(Error::Command { .. }) => None,
        Err(e) => return Err(e),
    };
    if csi != Some(zns::CSI_ZNS) {
        return Ok(None);
    }
    let page = id.run_csi(ns.nsid, zns::cns::CSI_NAMESPACE, zns::CSI_ZNS)?;
    Ok(zns::parse_namespace(page, ns.lba_format))
}

impl Controller {
    /// DMA memory a controller brought up with `opts` takes from the pool before any I/O
    /// queue pair: the admin queue pair, the page Identify data lands in, and with
    /// `shadow_doorbells` the Shadow Doorbell and EventIdx buffers (sized for the usual
    /// doorbell stride of 4 bytes; a controller with a wider stride that finds no room for
    /// bigger ones uses MMIO doorbells).
    pub fn dma_bytes(opts: &ControllerOptions) -> usize {
        let shadow = if opts.shadow_doorbells {
            2 * doorbell_buffer::len(opts.io_queues.max(1) as usize, 4).next_multiple_of(PAGE_SIZE)
        } else {
            0
        };
        QueuePair::dma_bytes(opts.admin_entries) + PAGE_SIZE + shadow
    }

    /// DMA memory one I/O queue pair of `entries` slots takes at most (see
    /// [`Controller::create_io_qpair`]).
    pub fn io_qpair_dma_bytes(entries: u16) -> usize {
        QueuePair::dma_bytes(entries)
    }

    /// Brings up the controller behind `bar`. `name` (the PCI address) labels every error.
    pub fn new(
        name: &str,
        bar: Arc<dyn Bar>,
        pool: DmaPool,
        opts: ControllerOptions,
    ) -> Result<Arc<Controller>> {
        let name = name.to_string();
        let cap = check_capabilities(&name, bar.as_ref())?;
        let mut aq = enable_admin_queue(&name, bar.as_ref(), cap, &pool, &opts)?;
        let mut id = Identifier::new(&name, bar.as_ref(), cap, &mut aq, &pool)?;
        let info = ControllerInfo::parse(id.run(0, admin::CNS_CONTROLLER)?);
        let io_queues = negotiate_queues(&name, bar.as_ref(), cap, id.aq, opts.io_queues)?;
        let namespaces = discover_namespaces(&mut id)?;
        drop(id);
        let mut shadow = None;
        let mut shadow_on = false;
        if opts.shadow_doorbells && info.supports_doorbell_buffer() {
            // Without the memory the controller simply keeps its MMIO doorbells.
            if let Ok(bufs) = ShadowBuffers::alloc(&pool, io_queues, cap.doorbell_stride()) {
                shadow_on = configure_shadow(&name, bar.as_ref(), cap, &mut aq, &bufs)?;
                // Refused: the controller never used the buffers, which go back (as Linux
                // frees them). Taken: they stay for the controller's life.
                shadow = shadow_on.then_some(bufs);
            }
        }
        Ok(Arc::new(Controller {
            name,
            bar,
            pool,
            cap,
            opts,
            admin: Mutex::new(aq),
            info,
            namespaces,
            qids: Mutex::new(vec![false; io_queues]),
            health: AtomicU8::new(HEALTH_READY),
            generation: AtomicU64::new(0),
            shadow,
            shadow_on: AtomicBool::new(shadow_on),
            shut_down: AtomicBool::new(false),
        }))
    }

    /// The name errors use (the PCI address).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Identify Controller data.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }
    /// Controller capabilities.
    pub fn cap(&self) -> Cap {
        self.cap
    }
    /// The DMA pool the controller's queues come from.
    pub fn pool(&self) -> &DmaPool {
        &self.pool
    }
    /// Register access.
    pub fn bar(&self) -> &dyn Bar {
        self.bar.as_ref()
    }
    /// I/O queue pairs the controller granted.
    pub fn io_queues(&self) -> usize {
        lock(&self.qids).len()
    }
    /// Every active namespace, usable or not.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }
    /// The largest transfer one command may carry: MDTS, capped at what one PRP list page
    /// describes.
    pub fn max_transfer(&self) -> usize {
        self.info
            .mdts_bytes()
            .unwrap_or(MAX_TRANSFER)
            .min(MAX_TRANSFER)
    }
    /// Whether one Copy command (descriptor format 0) of `blocks` blocks fits the
    /// namespace's limits: MSSRL blocks per range, MSRC ranges, MCL blocks in all (NVM
    /// command set spec 3.2.2), and the descriptors in one page.
    pub fn copy_fits(&self, ns: &Namespace, blocks: u64) -> bool {
        let range_max = (ns.mssrl.max(1) as u64).min(crate::io::MAX_NLB as u64);
        let ranges = blocks.div_ceil(range_max);
        self.info.supports_copy()
            && blocks <= ns.mcl.max(1) as u64
            && ranges <= ns.msrc.max(1) as u64
            && ranges as usize * 32 <= PAGE_SIZE
    }

    /// The options it was brought up with.
    pub fn options(&self) -> &ControllerOptions {
        &self.opts
    }

    /// Whether the controller took the Shadow Doorbell and EventIdx buffers (Doorbell
    /// Buffer Config) at bring-up or its last reset, so that I/O queue pairs created or
    /// recovered now ring through them. False when the controller does not offer the
    /// command, refused it, or `shadow_doorbells` was off: every doorbell is then an MMIO
    /// write.
    pub fn shadow_doorbells(&self) -> bool {
        self.shadow_on.load(Ordering::Acquire)
    }

    /// An active namespace that nvcopy can do I/O on: no metadata, 512 to 4096-byte blocks.
    pub fn namespace(&self, nsid: u32) -> Result<&Namespace> {
        let ns = self
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .ok_or_else(|| Error::NoNamespace {
                ctrl: self.name.clone(),
                nsid,
                active: self
                    .namespaces
                    .iter()
                    .map(|n| n.nsid.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        if ns.metadata != 0 {
            return Err(Error::MetadataFormat {
                ctrl: self.name.clone(),
                nsid,
                metadata: ns.metadata,
            });
        }
        if !(512..=4096).contains(&ns.lba_size) || !ns.lba_size.is_power_of_two() {
            return Err(Error::LbaSize {
                ctrl: self.name.clone(),
                nsid,
                lba_size: ns.lba_size as u64,
            });
        }
        if ns.capacity().is_none() {
            return Err(Error::NamespaceTooLarge {
                ctrl: self.name.clone(),
                nsid,
                blocks: ns.blocks,
                lba_size: ns.lba_size,
            });
        }
        Ok(ns)
    }

    /// Runs an admin command to completion and returns its DW0.
    pub fn admin(&self, sqe: Sqe, data: Option<DataPtr<'_>>) -> Result<u32> {
        let mut aq = lock(&self.admin);
        self.admin_locked(&mut aq, sqe, data)
    }

    fn admin_locked(&self, aq: &mut QueuePair, sqe: Sqe, data: Option<DataPtr<'_>>) -> Result<u32> {
        self.check_alive()?;
        let r = admin_sync(&self.name, self.bar(), self.cap, aq, sqe, data);
        if aq.is_disabled() {
            // wait_until disabled the controller after a timeout or fatal status, but
            // did not prove it quiet.
            self.mark_failed(false);
        }
        r
    }

    pub(crate) fn check_alive(&self) -> Result<()> {
        if self.health() != Health::Ready || self.shut_down.load(Ordering::Acquire) {
            return Err(Error::QueueDisabled {
                ctrl: self.name.clone(),
                qid: 0,
            });
        }
        Ok(())
    }

    /// Marks the controller unusable; `quiet` when it was proven to do no more DMA.
    pub(crate) fn mark_failed(&self, quiet: bool) {
        let h = Health::Failed { quiet }.encode();
        // Never upgrade a loud failure to a quiet one.
        self.health.fetch_max(h, Ordering::AcqRel);
    }

    /// What the controller can still do.
    pub fn health(&self) -> Health {
        Health::decode(self.health.load(Ordering::Acquire))
    }

    /// How many resets have completed (successfully or not). Queue pairs created under an
    /// older generation are gone from the controller.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether CSTS says the controller hit a fatal error (CFS), or its registers read as
    /// all ones (the device is gone). One MMIO load.
    pub fn fatal_status(&self) -> bool {
        let s = self.bar.read32(reg::CSTS);
        s == u32::MAX || s & csts::CFS != 0
    }

    /// Resets the controller after a command timed out or it reported a fatal status
    /// (base spec 3.7.2, Controller Level Reset through CC.EN): clear CC.EN and wait for
    /// CSTS.RDY = 0 within CAP.TO, which proves it quiet; then bring the admin queue up
    /// again and renegotiate the queue count, so that I/O queue pairs can be re-created
    /// ([`IoQpair::recover`]). If RDY never clears, bus mastering is cleared instead
    /// ([`Bar::quiesce`]), and the controller is failed, quiet only if that was confirmed.
    ///
    /// `seen` is the generation under which the caller saw the fault: if another thread
    /// reset the controller since, nothing is done again. Returns the resulting health.
    pub fn reset(&self, seen: u64) -> Health {
        let mut aq = lock(&self.admin);
        if self.generation() != seen
            || self.health() != Health::Ready
            || self.shut_down.load(Ordering::Acquire)
        {
            return self.health();
        }
        let b = self.bar.as_ref();
        let health = if disable(&self.name, b, self.cap).is_err() {
            Health::Failed { quiet: b.quiesce() }
        } else {
            // The controller is quiet: no command of the old queues runs any more. The
            // reset also made it forget the doorbell buffers.
            aq.abort_all(|_| {});
            aq.reinit();
            self.shadow_on.store(false, Ordering::Release);
            let want = lock(&self.qids).len() as u16;
            let up = enable(&self.name, b, self.cap, &aq).and_then(|()| {
                negotiate_queues(&self.name, b, self.cap, &mut aq, want).and_then(|granted| {
                    if granted < want as usize {
                        Err(Error::QueuesShrank {
                            ctrl: self.name.clone(),
                            granted,
                            before: want as usize,
                        })
                    } else {
                        Ok(())
                    }
                })
            });
            let up = up.and_then(|()| match &self.shadow {
                Some(bufs) => {
                    // No queue but the admin queue exists now: start the buffers over
                    // from zero (the entries of each I/O queue are zeroed again when it
                    // is re-created), then hand them over again.
                    bufs.doorbells.zero();
                    bufs.eventidx.zero();
                    let on = configure_shadow(&self.name, b, self.cap, &mut aq, bufs)?;
                    self.shadow_on.store(on, Ordering::Release);
                    Ok(())
                }
                None => Ok(()),
            });
            match up {
                Ok(()) => Health::Ready,
                Err(_) => Health::Failed {
                    quiet: disable(&self.name, b, self.cap).is_ok() || b.quiesce(),
                },
            }
        };
        if let Health::Failed { quiet } = health {
            self.mark_failed(quiet);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.health()
    }

    /// Creates the CQ and then the SQ of an I/O queue pair on the controller (base spec
    /// 5.4, 5.5), polled, interrupts off, under the generation `gen`. Fails with
    /// [`Error::QueueDisabled`] when the controller was reset since, or failed.
    ///
    /// The queue pair rings through its shadow doorbell entries if the controller took
    /// the buffers since its last reset (the entries are zeroed first), else through MMIO.
    pub(crate) fn create_queues(&self, qp: &mut QueuePair, gen: u64) -> Result<()> {
        let mut aq = lock(&self.admin);
        if self.generation() != gen {
            return Err(Error::QueueDisabled {
                ctrl: self.name.clone(),
                qid: qp.qid(),
            });
        }
        let (qid, entries) = (qp.qid(), qp.entries());
        let slots = match &self.shadow {
            Some(bufs) if self.shadow_doorbells() => bufs.slots(qid, self.cap.doorbell_stride()),
            _ => None,
        };
        // SAFETY: the entries are queue `qid`'s own (qids are handed out once, under
        // `qids`), inside buffers this controller owns and never frees before it drops.
        // The queue pair is only rung and polled through an IoQpair, which holds an Arc of
        // this controller, so the buffers outlive every use.
        unsafe { qp.set_shadow(slots) };
        let cq = Sqe::create_io_cq(qid, entries, qp.cq_iova());
        self.admin_locked(&mut aq, cq, None)?;
        // Bound to the CQ of the same id.
        let sq = Sqe::create_io_sq(qid, entries, qp.sq_iova(), qid);
        if let Err(e) = self.admin_locked(&mut aq, sq, None) {
            let mut d = Sqe::new(admin::DELETE_CQ, 0);
            d.cdw10 = qid as u32;
            let _ = self.admin_locked(&mut aq, d, None);
            return Err(e);
        }
        Ok(())
    }

    /// Creates an I/O queue pair with up to `entries` slots: the CQ first, then the SQ bound
    /// to it (base spec 5.4, 5.5), polled, interrupts disabled.
    pub fn create_io_qpair(self: &Arc<Self>, entries: u16) -> Result<IoQpair> {
        self.check_alive()?;
        let qid = {
            let mut q = lock(&self.qids);
            let Some(i) = q.iter().position(|used| !used) else {
                return Err(Error::NoFreeQueue {
                    ctrl: self.name.clone(),
                    granted: q.len(),
                });
            };
            q[i] = true;
            i as u16 + 1
        };
        let stride = self.cap.doorbell_stride();
        let entries = entries.clamp(2, self.cap.mqes().clamp(2, u16::MAX as u32) as u16);
        let made = (|| {
            if doorbell_offset(qid, true, stride) + 4 > self.bar.len() {
                return Err(Error::BarTooSmall {
                    ctrl: self.name.clone(),
                    bar_len: self.bar.len(),
                    qid,
                });
            }
            let qp = QueuePair::new(
                &self.name,
                qid,
                entries,
                stride,
                &self.pool,
                self.opts.io_timeout,
            )?;
            let mut qp = qp;
            let gen = self.generation();
            self.create_queues(&mut qp, gen)?;
            Ok((qp, gen))
        })();
        match made {
            Ok((qp, gen)) => Ok(IoQpair::new(self.clone(), qp, gen)),
            Err(e) => {
                self.release_qid(qid);
                Err(e)
            }
        }
    }

    pub(crate) fn delete_queue(&self, opcode: u8, qid: u16) -> Result<u32> {
        let mut d = Sqe::new(opcode, 0);
        d.cdw10 = qid as u32;
        self.admin(d, None)
    }

    pub(crate) fn release_qid(&self, qid: u16) {
        if let Some(slot) = lock(&self.qids).get_mut(qid as usize - 1) {
            *slot = false;
        }
    }

    /// Waits on an I/O queue (see [`wait_until`]); marks the controller failed when the
    /// queue had to be given up.
    pub(crate) fn wait_io(
        &self,
        qp: &mut QueuePair,
        target: usize,
        each: impl FnMut(Completion),
    ) -> Result<()> {
        let r = wait_until(&self.name, self.bar(), self.cap, qp, target, each);
        if qp.is_disabled() {
            self.mark_failed(false);
        }
        r
    }
}

impl Controller {
    /// Normal shutdown (base spec 3.6.1): sets CC.SHN and waits for CSTS.SHST to say it is
    /// complete, so that the device saves its state before the host lets go of it (a real
    /// drive counts an unsafe shutdown otherwise). The wait is bounded by CAP.TO (between
    /// 0.5 and 10 s); an emulated controller completes at once.
    ///
    /// Done once: the controller takes no more commands after it (queue pairs dropped
    /// later are not deleted on it), and dropping it does not notify it again. A failed
    /// controller is not notified. The I/O queues should be deleted first (3.6.1.1):
    /// drop every [`IoQpair`] before calling this.
    pub fn shutdown(&self) {
        if self.health() != Health::Ready || self.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        // The admin queue's lock: no admin command is in flight while CC.SHN is set.
        let _aq = lock(&self.admin);
        let b = self.bar.as_ref();
        let cfg = b.read32(reg::CC);
        b.write32(reg::CC, (cfg & !cc::SHN_MASK) | cc::SHN_NORMAL);
        let limit = Duration::from_millis(self.cap.timeout_ms().clamp(500, 10_000));
        let start = Instant::now();
        loop {
            let s = b.read32(reg::CSTS);
            if s == u32::MAX
                || s & csts::SHST_MASK == csts::SHST_COMPLETE
                || start.elapsed() >= limit
            {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Health::Failed { quiet: false } = self.health() {
            // The controller may still write its admin queue and the EventIdx buffer:
            // that memory never goes back to the pool.
            lock(&self.admin).quarantine();
            if let Some(bufs) = &mut self.shadow {
                bufs.doorbells.quarantine();
                bufs.eventidx.quarantine();
            }
        }
        self.shutdown();
    }
}
