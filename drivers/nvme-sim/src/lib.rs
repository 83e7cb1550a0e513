//! A software NVMe controller, for testing and benchmarking the driver without hardware.
//!
//! A crate of its own, apart from the driver (`nvcopy-nvme`): it is a device model, built
//! only on the driver's public specification items ([`nvcopy_nvme::spec`], [`nvcopy_nvme::Status`],
//! the [`Bar`] trait it implements) and on `nvcopy-vfio`'s [`DmaPool`], never on the
//! driver's internals, so that a misread specification field cannot be wrong on both
//! sides of the interface at once.
//!
//! [`SimController`] implements [`Bar`], so the real driver brings it up, creates queues
//! and runs commands exactly as it does on a device. The controller reads submission
//! entries and writes completion entries in the driver's DMA memory (an
//! [`DmaPool::unmapped`] pool, reached through [`DmaPool::slice_at`] with volatile
//! accesses only), walks PRPs and PRP lists, and keeps namespace data in sparse memory or
//! sparse files. It is synchronous: a doorbell store runs the new commands before it
//! returns, so completions are waiting by the time the driver polls. (Commands a
//! [`Faults::late`] or [`Faults::delay`] fault holds back run at the first register
//! access after they fall due, or at [`SimController::run_due`].)
//!
//! Beyond the commands nvcopy uses (Identify, Set Features, queue creation and deletion;
//! Read, Write, Write Zeroes, Flush, Dataset Management, Copy format 0) it checks what a
//! device checks, with the specification's status codes, and injects faults on request
//! ([`SimController::faults`]). [`SimController::counters`] tells what it has seen, and
//! [`SimController::read_ns`] / [`SimController::write_ns`] reach namespace data
//! directly, to set up and verify tests independently of the driver.
//!
//! For recovery tests it models what makes buffer reuse after a timeout dangerous:
//! commands that land after the host gave up ([`Faults::late`]), a controller that never
//! reports itself stopped ([`Faults::stuck_ready`]), bus mastering off through
//! [`Bar::quiesce`] (and a quiesce that fails), and a page guard
//! ([`SimController::set_page_guard`]) that reports any write into a host page handed
//! to a new owner after the command was submitted.
//!
//! ```no_run
//! # use nvcopy_nvme_sim::{NamespaceConfig, SimConfig, SimController};
//! # use nvcopy_nvme::{Bar, Controller, ControllerOptions};
//! # use nvcopy_vfio::DmaPool;
//! # use std::sync::Arc;
//! let pool = DmaPool::unmapped(16 << 20).unwrap();
//! let sim = SimController::new(
//!     SimConfig::new().namespace(NamespaceConfig::new(512, 1 << 20)),
//!     pool.clone(),
//! );
//! let ctrl = Controller::new("sim", sim.clone() as Arc<dyn Bar>, pool, ControllerOptions::default())
//!     .unwrap();
//! ```

mod admin;
mod config;
mod counters;
mod dma;
mod engine;
mod faults;
mod guard;
mod io;
mod namespace;
mod queues;
mod regs;
mod shadow;
mod status;
#[cfg(test)]
mod tests;
mod threaded;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nvcopy_vfio::DmaPool;

pub use config::{NamespaceConfig, SimConfig, SIM_VID};
pub use counters::Counters;
pub use faults::{CommandFilter, FaultId, Faults, MediaError};
pub use guard::PageGuardFn;
pub use threaded::ThreadedSim;

use config::Params;
use engine::State;
use namespace::SimNamespace;

use nvcopy_nvme::spec::{Cqe, Sqe};
use nvcopy_nvme::Bar;

/// Bytes of a submission queue entry, as the specification's layout has it.
const SQE_SIZE: usize = std::mem::size_of::<Sqe>();
/// Bytes of a completion queue entry, as the specification's layout has it.
const CQE_SIZE: usize = std::mem::size_of::<Cqe>();

/// The software NVMe controller. Shared between the driver (as `Arc<dyn Bar>`) and the
/// test that drives faults and checks data.
pub struct SimController {
    pool: DmaPool,
    params: Params,
    state: Mutex<State>,
    /// Whether commands are held for later, so that register accesses and the device
    /// thread look at the clock only then.
    holding: AtomicBool,
}

/// Where a queue pair stands, from the controller's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueStatus {
    /// SQ entries.
    pub sq_entries: u32,
    /// Entries the host posted (doorbell rung) that the controller has not fetched.
    pub sq_unfetched: u32,
    /// CQ entries.
    pub cq_entries: u32,
    /// Completions posted that the host has not released with the CQ head doorbell.
    pub cq_unconsumed: u32,
    /// Completions held back because the CQ was full.
    pub cq_held: usize,
}

impl SimController {
    /// Builds a controller over `pool`, the DMA memory the driver will use.
    ///
    /// # Panics
    /// If a namespace cannot be built (an LBA size that is not a power of two from 512 to
    /// 65536, or a backing file that cannot be opened); see [`SimController::try_new`].
    pub fn new(config: SimConfig, pool: DmaPool) -> Arc<SimController> {
        match Self::try_new(config, pool) {
            Ok(sim) => sim,
            Err(e) => panic!("software NVMe controller: {e}"),
        }
    }

    /// Like [`SimController::new`], returning namespace setup errors.
    pub fn try_new(config: SimConfig, pool: DmaPool) -> std::io::Result<Arc<SimController>> {
        let params = Params::new(&config);
        let namespaces = config
            .namespaces
            .iter()
            .map(SimNamespace::open)
            .collect::<std::io::Result<Vec<_>>>()?;
        let state = State::new(&params, namespaces);
        Ok(Arc::new(SimController {
            pool,
            params,
            state: Mutex::new(state),
            holding: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st);
        self.holding.store(!st.held.is_empty(), Ordering::Release);
        r
    }

    /// Whether the host's Doorbell Buffer Config is in force (since the last reset).
    pub fn doorbell_buffers_configured(&self) -> bool {
        self.lock().doorbell_buffers.is_some()
    }

    /// A polling device's turn: new work from shadow tails, room from shadow heads (see
    /// [`ThreadedSim`]). Returns how many queues had new work.
    pub(crate) fn poll_shadow_doorbells(&self) -> usize {
        self.with_state(|st| shadow::poll(&self.params, &self.pool, st))
    }

    /// Publish EventIdx as a polling device does (one behind what was consumed), so that
    /// the host never needs an MMIO doorbell after the first. Only for a controller whose
    /// shadow doorbells something polls: [`ThreadedSim::start_polling`].
    pub(crate) fn set_polling_eventidx(&self) {
        self.with_state(|st| st.eventidx = shadow::EventIdx::Polling);
    }

    /// Runs whatever was left waiting (after I/O was resumed or a fault cleared).
    fn kick(&self) {
        self.with_state(|st| {
            engine::run_due(&self.params, &self.pool, st);
            engine::process_all(&self.params, &self.pool, st);
        });
    }

    /// Runs the commands held by [`Faults::late`] or [`Faults::delay`] whose time has
    /// come. Every register access does this first; a test can call it to let late
    /// commands land without touching a register.
    pub fn run_due(&self) {
        if self.holding.load(Ordering::Acquire) {
            self.with_state(|st| engine::run_due(&self.params, &self.pool, st));
        }
    }

    /// Installs the page guard, which checks that the controller never writes a host
    /// page that was handed to another user since the command writing it was fetched.
    /// `guard` returns the current owner generation of the 4 KiB page holding an IOVA
    /// (`None`: not a guarded page; queue memory must be `None`). At fetch the controller
    /// notes the generation of each guarded page the command will write (Read data,
    /// Identify data); when it writes them, at once or later for a late command, it asks
    /// again and records a violation for each page whose answer changed. The data is
    /// written anyway, as a real device would. `guard` runs under the controller's lock:
    /// it must not call back into the controller.
    pub fn set_page_guard(&self, guard: Arc<PageGuardFn>) {
        self.lock().guard.set(guard);
    }

    /// One line per page-guard violation (queue, command id, IOVA, generation at fetch
    /// and at the write), oldest first; empty when there were none.
    pub fn page_violations(&self) -> Vec<String> {
        self.lock().guard.violations().to_vec()
    }

    /// Commands fetched and held back by [`Faults::late`] or [`Faults::delay`] that have
    /// neither run nor been dropped yet.
    pub fn held_commands(&self) -> usize {
        self.lock().held.len()
    }

    /// The fault-injection handle.
    pub fn faults(&self) -> Faults<'_> {
        Faults { sim: self }
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    /// Starts (or stops) recording the order in which Writes run, clearing the record.
    pub fn record_writes(&self, on: bool) {
        self.lock().write_log = on.then(Vec::new);
    }

    /// (nsid, starting LBA) of each Write run since [`SimController::record_writes`].
    pub fn write_log(&self) -> Vec<(u32, u64)> {
        self.lock().write_log.clone().unwrap_or_default()
    }

    /// Zeroes the counters.
    pub fn reset_counters(&self) {
        let mut st = self.lock();
        st.counters = Counters::new(self.params.io_queues as usize + 1);
    }

    /// The DMA pool the controller reaches host memory through.
    pub fn pool(&self) -> &DmaPool {
        &self.pool
    }

    /// Whether bus mastering is on: false from a successful [`Bar::quiesce`] until the
    /// next CC.EN 0 -> 1, which models the host re-initialising the function (a function
    /// reset turns bus mastering back on) before it enables the controller again.
    pub fn bus_master(&self) -> bool {
        self.lock().bus_master
    }

    /// Whether CSTS.RDY is set.
    pub fn is_ready(&self) -> bool {
        self.lock().regs.rdy
    }

    /// The state of queue pair `qid` (0 is the admin pair), if both its queues exist.
    pub fn queue_status(&self, qid: u16) -> Option<QueueStatus> {
        let st = self.lock();
        let sq = st.queues.sq(qid)?;
        let cq = st.queues.cq(sq.cqid)?;
        Some(QueueStatus {
            sq_entries: sq.size,
            sq_unfetched: sq.unfetched(),
            cq_entries: cq.size,
            cq_unconsumed: cq.unconsumed(),
            cq_held: cq.held(),
        })
    }

    /// Number of namespaces (all active, ids 1 to N).
    pub fn namespace_count(&self) -> u32 {
        self.lock().namespaces.len() as u32
    }

    /// LBA size and block count of namespace `nsid`.
    pub fn namespace_geometry(&self, nsid: u32) -> Option<(u32, u64)> {
        let st = self.lock();
        let ns = st.namespaces.get((nsid as usize).checked_sub(1)?)?;
        Some((ns.lba_size, ns.blocks))
    }

    /// Memory taken by namespace `nsid`'s data: sparse pages actually written.
    pub fn resident_bytes(&self, nsid: u32) -> Option<u64> {
        let st = self.lock();
        let ns = st.namespaces.get((nsid as usize).checked_sub(1)?)?;
        Some(ns.resident_bytes())
    }

    /// Reads namespace data directly, bypassing commands and faults.
    pub fn read_ns(&self, nsid: u32, byte_offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let st = self.lock();
        namespace_of(&st, nsid)?.read(byte_offset, buf)
    }

    /// Writes namespace data directly, bypassing commands and faults.
    pub fn write_ns(&self, nsid: u32, byte_offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut st = self.lock();
        let i = namespace_of(&st, nsid).map(|_| nsid as usize - 1)?;
        st.namespaces[i].write(byte_offset, data)
    }
}

impl std::fmt::Debug for SimController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("SimController");
        d.field("serial", &self.params.serial)
            .field("io_queues", &self.params.io_queues);
        // Never block (or deadlock) just to print.
        if let Ok(st) = self.state.try_lock() {
            d.field("namespaces", &st.namespaces.len())
                .field("ready", &st.regs.rdy)
                .field("fatal", &(st.regs.cfs || st.faults.fatal));
        }
        d.finish_non_exhaustive()
    }
}

fn namespace_of(st: &State, nsid: u32) -> std::io::Result<&SimNamespace> {
    (nsid as usize)
        .checked_sub(1)
        .and_then(|i| st.namespaces.get(i))
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no namespace {nsid}"))
        })
}

impl Bar for SimController {
    fn read32(&self, offset: usize) -> u32 {
        self.run_due();
        let st = self.lock();
        st.regs.read(self.params.cap, st.faults.fatal, offset)
    }

    fn write32(&self, offset: usize, value: u32) {
        self.with_state(|st| {
            engine::run_due(&self.params, &self.pool, st);
            engine::write_register(&self.params, &self.pool, st, offset, value);
        });
    }

    fn len(&self) -> usize {
        self.params.bar_len
    }

    /// Turns bus mastering off: afterwards the controller does no DMA at all (no SQ fetch,
    /// no data transfer, no CQE write) until CC.EN goes 0 -> 1 again; commands held by
    /// [`Faults::late`] are dropped. False, and nothing changes, under
    /// [`Faults::quiesce_fails`].
    fn quiesce(&self) -> bool {
        self.with_state(engine::quiesce)
    }
}

const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<SimController>();
};
