//! What register stores make the controller do: CC enables, resets and shuts down; an SQ
//! tail doorbell fetches and runs every new entry of that queue, in order, and posts its
//! completion; a CQ head doorbell frees slots for completions held back while the CQ was
//! full. Everything runs synchronously inside the store, under the controller's lock,
//! except commands a `late` or `delay` fault holds back: those run once they are due, at
//! the first register access (or device thread turn) after that.

use std::time::{Duration, Instant};

use nvcopy_vfio::DmaPool;

use super::config::Params;
use super::counters::Counters;
use super::faults::FaultState;
use super::guard::{pages_written, Guard, Watched};
use super::namespace::SimNamespace;
use super::queues::{CompQueue, Queues, SubQueue};
use super::regs::Regs;
use super::shadow::{self, DoorbellBuffers, EventIdx};
use super::status::{Done, ABORTED_SQ_DELETED};
use super::{admin, io};
use crate::{CQE_SIZE, SQE_SIZE};
use nvcopy_nvme::spec::{admin as admin_op, cc, csts, reg, Cqe, Sqe};
use nvcopy_nvme::Status;

/// Everything about the controller that changes.
#[derive(Debug)]
pub struct State {
    pub regs: Regs,
    pub queues: Queues,
    pub namespaces: Vec<SimNamespace>,
    pub faults: FaultState,
    pub counters: Counters,
    /// Staging buffer for data between host memory and namespaces.
    pub buf: Vec<u8>,
    /// (nsid, starting LBA) of every Write in the order the device ran them, when on.
    pub write_log: Option<Vec<(u32, u64)>>,
    /// PCI Bus Master Enable as the device sees it: while false the controller reaches
    /// host memory in no way at all (see [`quiesce`]).
    pub bus_master: bool,
    /// Commands fetched and held back to run later, in the order they fall due.
    pub held: Vec<Held>,
    /// The page guard and what it caught.
    pub guard: Guard,
    /// Shadow Doorbell and EventIdx buffers, from Doorbell Buffer Config until a reset.
    pub doorbell_buffers: Option<DoorbellBuffers>,
    /// What the controller publishes as EventIdx.
    pub eventidx: EventIdx,
}

/// A command as the controller fetched it.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub qid: u16,
    pub cqid: u16,
    /// The SQ head just after the fetch.
    pub sq_head: u32,
    pub sqe: Sqe,
    /// Guarded host pages it will write, with their generations at fetch time.
    pub pages: Vec<Watched>,
    /// The status a `fail` fault completes it with, instead of running it.
    pub fail: Option<Status>,
}

/// A fetched command whose whole effect (data moved, namespace changed, completion
/// posted) waits until `due`.
#[derive(Debug)]
pub struct Held {
    pub due: Instant,
    pub cmd: Fetched,
}

impl State {
    pub fn new(p: &Params, namespaces: Vec<SimNamespace>) -> Self {
        State {
            regs: Regs::default(),
            queues: Queues::new(p.io_queues),
            namespaces,
            faults: FaultState::default(),
            counters: Counters::new(p.io_queues as usize + 1),
            buf: Vec::new(),
            write_log: None,
            bus_master: true,
            held: Vec::new(),
            guard: Guard::default(),
            doorbell_buffers: None,
            eventidx: EventIdx::default(),
        }
    }

    /// Whether the controller acts at all: ready, no fatal status, bus mastering on.
    fn running(&self) -> bool {
        self.regs.rdy && !self.regs.cfs && !self.faults.fatal && self.bus_master
    }

    /// Forgets every held command, as a reset or a quiesce does.
    fn drop_held(&mut self) {
        self.counters.note_dropped(self.held.len());
        self.held.clear();
    }

    /// Whether commands on `qid` may be fetched now.
    fn fetching(&self, qid: u16) -> bool {
        self.running() && (qid == 0 || !self.faults.io_paused)
    }
}

/// A 32-bit register store.
pub fn write_register(p: &Params, pool: &DmaPool, st: &mut State, offset: usize, value: u32) {
    if offset >= reg::DOORBELL_BASE {
        doorbell(p, pool, st, offset - reg::DOORBELL_BASE, value);
    } else if offset == reg::CC {
        write_cc(p, pool, st, value);
    } else {
        st.regs.write(offset, value);
    }
}

fn write_cc(p: &Params, pool: &DmaPool, st: &mut State, value: u32) {
    let was = st.regs.cc & cc::EN != 0;
    let now = value & cc::EN != 0;
    st.regs.cc = value;
    if was && !now {
        if !st.faults.stuck_ready {
            reset(st);
        }
    } else if !was && now && st.regs.rdy {
        // Under `stuck_ready` the controller never finished the reset asked for: it is
        // still running with its old queues, and setting CC.EN again changes nothing.
    } else if !was && now {
        // The sim has no PCI configuration space: the host re-initialising the function
        // after a quiesce (a function reset turns bus mastering back on, as
        // `PciDevice::reset` does, before the controller is enabled again) is modelled
        // as this enable.
        st.bus_master = true;
        enable(p, pool, st);
    }
    if value & cc::SHN_MASK != 0 {
        // Nothing is cached anywhere but in the namespaces: shutdown completes at once.
        st.regs.shst = csts::SHST_COMPLETE;
    }
}

/// Controller reset (CC.EN 1 -> 0, base spec 3.7.2): every queue is gone, CSTS clears.
/// CSTS.RDY = 0 is the controller's word that it has stopped: nothing it was doing
/// reaches host memory afterwards.
///
/// Commands held by a `late` or `delay` fault are dropped: a controller that reports
/// itself reset has abandoned what it had in progress, and writes nothing for it later.
pub fn reset(st: &mut State) {
    st.drop_held();
    st.queues.clear();
    st.doorbell_buffers = None;
    st.regs.rdy = false;
    st.regs.shst = 0;
    st.regs.cfs = false;
}

/// Completes a reset the host asked for (CC.EN is 0) that `stuck_ready` held back.
pub fn finish_pending_reset(st: &mut State) {
    if st.regs.cc & cc::EN == 0 && st.regs.rdy {
        reset(st);
    }
}

/// CC.EN 0 -> 1: take the admin queues from AQA, ASQ and ACQ and become ready. A setup
/// the controller cannot use raises CFS instead; an injected fatal status keeps it from
/// becoming ready.
fn enable(p: &Params, pool: &DmaPool, st: &mut State) {
    if st.faults.fatal {
        return;
    }
    let r = &st.regs;
    let page = r.page_size() as u64;
    let sq_entries = (r.aqa & 0xfff) + 1;
    let cq_entries = (r.aqa >> 16 & 0xfff) + 1;
    let reachable = |base: u64, bytes: usize| {
        base % page == 0 && pool.slice_at(nvcopy_vfio::Iova(base), bytes).is_some()
    };
    let usable = p.page_size_ok(r.cc >> 7 & 0xf)
        && r.cc >> 4 & 7 == 0 // CSS: NVM command set
        && sq_entries >= 2
        && cq_entries >= 2
        && reachable(r.asq, sq_entries as usize * SQE_SIZE)
        && reachable(r.acq, cq_entries as usize * CQE_SIZE);
    if !usable {
        st.regs.cfs = true;
        return;
    }
    let (asq, acq) = (r.asq, r.acq);
    st.queues.add_cq(0, CompQueue::new(acq, cq_entries));
    st.queues.add_sq(0, SubQueue::new(asq, sq_entries, 0));
    st.regs.rdy = true;
}

/// A doorbell store; `rel` is the offset from the first doorbell.
fn doorbell(p: &Params, pool: &DmaPool, st: &mut State, rel: usize, value: u32) {
    let index = rel / p.stride;
    let qid = index / 2;
    if rel % p.stride != 0 || qid > p.io_queues as usize {
        st.counters.note_invalid_doorbell();
        return;
    }
    let qid = qid as u16;
    let completion = index % 2 == 1;
    st.counters.note_doorbell(qid, completion);
    if !st.regs.rdy {
        st.counters.note_invalid_doorbell();
        return;
    }
    if completion {
        let drain = st.bus_master;
        match st
            .queues
            .cq_mut(qid)
            .map(|cq| cq.set_head(pool, value, drain))
        {
            Some(Ok(true)) => {}
            Some(Err(_)) => {
                st.regs.cfs = true;
                return;
            }
            Some(Ok(false)) | None => {
                st.counters.note_invalid_doorbell();
                return;
            }
        }
        mirror_admin_doorbell(pool, st, qid, true, value);
        // Publish the new head as EventIdx, so that the host tells of its next move if
        // completions are still held back.
        if shadow::sync_cq_head(pool, st, qid).is_err() {
            st.regs.cfs = true;
        }
    } else {
        match st.queues.sq_mut(qid) {
            Some(sq) if value < sq.size => sq.tail = value,
            _ => {
                st.counters.note_invalid_doorbell();
                return;
            }
        }
        mirror_admin_doorbell(pool, st, qid, false, value);
        process(p, pool, st, qid);
    }
}

/// With doorbell buffers configured, the admin queue's MMIO doorbells are copied into
/// its shadow entries, as QEMU does: hosts (Linux among them) do not update the admin
/// queue's shadow entries, so the register is the truth for it.
fn mirror_admin_doorbell(pool: &DmaPool, st: &mut State, qid: u16, cq: bool, value: u32) {
    if let (0, Some(bufs)) = (qid, st.doorbell_buffers) {
        if bufs.write_doorbell(pool, 0, cq, value).is_err() {
            st.regs.cfs = true;
        }
    }
}

/// Fetches and runs every entry of SQ `qid` between its head and tail.
pub fn process(p: &Params, pool: &DmaPool, st: &mut State, qid: u16) {
    // With shadow doorbells the tail is the shadow entry's, whatever the register said.
    if !shadow::refresh_sq_tail(pool, st, qid) {
        return;
    }
    while st.fetching(qid) {
        let Some(sq) = st.queues.sq_mut(qid) else {
            return;
        };
        let sqe = match sq.fetch(pool) {
            Ok(Some(sqe)) => sqe,
            Ok(None) => return,
            Err(_) => {
                st.regs.cfs = true;
                return;
            }
        };
        let (cqid, sq_head) = (sq.cqid, sq.head);
        let pages = if st.guard.is_on() {
            pages_written(pool, st, qid, &sqe)
        } else {
            Vec::new()
        };
        st.counters.note_command(qid == 0, sqe.opcode());
        if st.faults.swallows(qid, &sqe) {
            st.counters.note_swallowed();
        } else {
            let cmd = Fetched {
                qid,
                cqid,
                sq_head,
                sqe,
                pages,
                fail: st.faults.fails(qid, &sqe),
            };
            match st.faults.holds(qid, &sqe) {
                Some(delay) => hold(st, cmd, delay),
                None => run(p, pool, st, cmd),
            }
        }
        // Tell the host how far it has been read, and look for more it wrote meanwhile.
        if !shadow::sq_consumed(pool, st, qid) {
            return;
        }
    }
}

/// Keeps `cmd` to run `delay` from now, after anything due earlier.
fn hold(st: &mut State, cmd: Fetched, delay: Duration) {
    let due = Instant::now() + delay;
    let at = st.held.partition_point(|h| h.due <= due);
    st.held.insert(at, Held { due, cmd });
    st.counters.note_held();
}

/// Runs a fetched command and posts its completion.
fn run(p: &Params, pool: &DmaPool, st: &mut State, cmd: Fetched) {
    let Fetched {
        qid,
        cqid,
        sqe,
        ref pages,
        fail,
        ..
    } = cmd;
    // The SQ head now, which a held command reports as any late completion would.
    let sq_head = st.queues.sq(qid).map_or(cmd.sq_head, |sq| sq.head);
    let admin_queue = qid == 0;
    let done = match fail {
        Some(status) => Done::from(status),
        None if admin_queue => admin::execute(p, pool, st, &sqe),
        None => io::execute(p, pool, st, &sqe),
    };
    if fail.is_none() && done.status.is_success() && !pages.is_empty() {
        // The data went to host memory just now: were its pages still the command's?
        st.guard.check(qid, sqe.cid(), pages);
    }
    if admin_queue && sqe.opcode() == admin_op::DELETE_SQ && done.status.is_success() {
        abort_held(pool, st, (sqe.cdw10 & 0xffff) as u16);
    }
    if !admin_queue {
        if let Some((cid, keep_real)) = st.faults.take_bogus() {
            post(pool, st, cqid, completion(done, sq_head, qid, cid));
            if !keep_real {
                return;
            }
        }
    }
    post(pool, st, cqid, completion(done, sq_head, qid, sqe.cid()));
}

/// Held commands of a deleted SQ complete as aborted before the deletion does (base spec
/// 5.6: the controller completes or aborts every command of the queue first).
fn abort_held(pool: &DmaPool, st: &mut State, qid: u16) {
    let (gone, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut st.held)
        .into_iter()
        .partition(|h| h.cmd.qid == qid);
    st.held = kept;
    for h in gone {
        let c = h.cmd;
        let cqe = completion(ABORTED_SQ_DELETED.into(), c.sq_head, qid, c.sqe.cid());
        post(pool, st, c.cqid, cqe);
    }
}

/// Runs every held command that is due, oldest first. Nothing runs while the controller
/// is not running (not ready, fatal status, bus mastering off); a reset drops them.
pub fn run_due(p: &Params, pool: &DmaPool, st: &mut State) {
    if st.held.is_empty() {
        return;
    }
    let now = Instant::now();
    while st.running() && st.held.first().is_some_and(|h| h.due <= now) {
        let h = st.held.remove(0);
        if st.queues.sq(h.cmd.qid).is_some() {
            run(p, pool, st, h.cmd);
        }
    }
}

/// Processes every SQ, after something that held processing back was lifted.
pub fn process_all(p: &Params, pool: &DmaPool, st: &mut State) {
    for qid in st.queues.sq_ids() {
        process(p, pool, st, qid);
    }
}

/// The completion entry for a command (status not yet carrying the phase tag).
pub fn completion(done: Done, sq_head: u32, qid: u16, cid: u16) -> Cqe {
    Cqe {
        dw0: done.dw0,
        dw1: 0,
        sq_head: sq_head as u16,
        sq_id: qid,
        cid,
        status: done.status.0 << 1,
    }
}

/// Bus mastering off (the device side of [`Bar::quiesce`](nvcopy_nvme::Bar::quiesce)): from now on the
/// controller fetches no command, moves no data and writes no completion, until the next
/// enable; held commands are dropped. Registers keep working, so the host can still
/// reset the controller. False,
/// changing nothing, under [`super::Faults::quiesce_fails`].
pub fn quiesce(st: &mut State) -> bool {
    if st.faults.quiesce_fails {
        return false;
    }
    st.bus_master = false;
    // Like a reset, a quiesce ends whatever the controller still had in progress.
    st.drop_held();
    true
}

/// Posts a completion to CQ `cqid` (or holds it while the CQ is full). Nothing is written
/// without bus mastering.
pub fn post(pool: &DmaPool, st: &mut State, cqid: u16, cqe: Cqe) {
    if !st.bus_master {
        return;
    }
    st.counters.note_completion();
    // Room the host made with a shadow head alone is room too.
    if shadow::sync_cq_head(pool, st, cqid).is_err() {
        st.regs.cfs = true;
        return;
    }
    if let Some(cq) = st.queues.cq_mut(cqid) {
        if cq.post(pool, cqe).is_err() {
            st.regs.cfs = true;
        }
    }
}
