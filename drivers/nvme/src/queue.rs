//! A submission/completion queue pair with its command trackers (base spec 4.1, 4.2, 4.6).
//!
//! Posting an entry and ringing the doorbell are separate steps, as in libvfn: callers
//! post a batch and ring once. Completions are found by the phase tag, read volatile,
//! with an acquire fence before the rest of the entry is trusted; the head doorbell is
//! written once per batch. Command ids index a slab of trackers (as in SPDK), and a
//! command id that comes back from the device is checked before it is used.
//!
//! With shadow doorbells (Doorbell Buffer Config) a new tail or head goes to the queue's
//! entry in the Shadow Doorbell buffer first, and the MMIO doorbell is written only when
//! the controller's EventIdx says it wants to hear of the move (see [`ShadowSlots`]).
//!
//! Every tracker owns its PRP-list page from the queue's creation: one DMA allocation for
//! all of them, carved one page per tracker (as libvfn and SPDK do), so that posting a
//! command takes no lock and allocates nothing.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use nvcopy_vfio::{DmaBuf, DmaPool, Iova, PAGE_SIZE};

use crate::error::{Error, Result};
use crate::prp::{self, DataPtr, LIST_ENTRIES};
use crate::regs::Bar;
use crate::spec::{doorbell_buffer, doorbell_offset, Cqe, Sqe};
use crate::status::Status;

/// Bytes per SQ entry (CC.IOSQES = 6).
pub const SQE_SIZE: usize = 64;
/// Bytes per CQ entry (CC.IOCQES = 4).
pub const CQE_SIZE: usize = 16;

/// A finished command, as the queue's user sees it.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The caller's token from submission.
    pub token: u64,
    /// Command id.
    pub cid: u16,
    /// Typed status.
    pub status: Status,
    /// Command-specific result (DW0).
    pub dw0: u32,
    /// Opcode of the command, for error context.
    pub opcode: u8,
    /// Namespace of the command.
    pub nsid: u32,
    /// First LBA of the command (CDW10-11), for error context.
    pub slba: u64,
}

#[derive(Debug)]
struct Tracker {
    busy: bool,
    token: u64,
    /// When the doorbell that handed this command to the device rang; its deadline counts
    /// from here, not from when it was written into the ring. None while posted but not
    /// yet rung: such a command cannot be late.
    submitted: Option<Instant>,
    opcode: u8,
    nsid: u32,
    slba: u64,
    /// This command's PRP-list page, carved out of the queue's list memory at creation:
    /// its device address and its first entry.
    prp_iova: Iova,
    prp_ptr: *mut u64,
}

/// The command a timed-out tracker held.
#[derive(Clone, Copy, Debug)]
pub struct Expired {
    /// Opcode.
    pub opcode: u8,
    /// Namespace.
    pub nsid: u32,
    /// First LBA.
    pub slba: u64,
    /// How long it has been outstanding.
    pub waited: Duration,
}

/// A queue pair's four entries in the controller's Shadow Doorbell and EventIdx buffers
/// (Doorbell Buffer Config, base spec 1.3 section 5.7): where the host writes its SQ tail
/// and CQ head, and where the controller says past which value it wants an MMIO doorbell
/// write as well.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShadowSlots {
    /// Shadow SQ tail doorbell (host writes).
    pub sq_db: *mut u32,
    /// SQ EventIdx (controller writes).
    pub sq_ei: *mut u32,
    /// Shadow CQ head doorbell (host writes).
    pub cq_db: *mut u32,
    /// CQ EventIdx (controller writes).
    pub cq_ei: *mut u32,
}

impl ShadowSlots {
    /// Publishes a doorbell move from `old` to `new` in the shadow entry `db` and says
    /// whether the MMIO doorbell must be written too, by the EventIdx rule (Linux's
    /// `nvme_dbbuf_update_and_check_event`).
    ///
    /// # Safety
    /// `db` and `ei` must be valid, 4-byte aligned entries of the Shadow Doorbell and
    /// EventIdx buffers, kept allocated while the call runs.
    #[inline]
    unsafe fn update(db: *mut u32, ei: *const u32, new: u16, old: u16) -> bool {
        // SAFETY: the caller vouches for `db`. Volatile: the controller reads it.
        unsafe { db.write_volatile(new as u32) };
        // A full fence, not a release one: the store above must be visible to the
        // controller before the EventIdx load below reads anything. That is store-load
        // ordering, which only a full barrier gives (x86 lets a later load pass an
        // earlier store through the store buffer; Linux uses mb() here). The controller
        // does the mirror image: it writes EventIdx, fences, then reads the shadow entry.
        // With both fences at least one side sees the other's store, so either we see an
        // EventIdx that makes us write the MMIO doorbell, or the controller sees our new
        // value; without ours, both could read stale values and the command would sit in
        // the ring until something else woke the controller.
        fence(Ordering::SeqCst);
        // SAFETY: the caller vouches for `ei`. Volatile: the controller writes it at any
        // time.
        let event = unsafe { ei.read_volatile() } as u16;
        doorbell_buffer::need_event(event, new, old)
    }
}

/// One queue pair and its trackers.
#[derive(Debug)]
pub struct QueuePair {
    qid: u16,
    ctrl: String,
    entries: u16,
    sq: DmaBuf,
    cq: DmaBuf,
    /// `sq` and `cq` as raw pointers, taken once: the hot path indexes them by slot.
    sq_base: *mut Sqe,
    cq_base: *mut Cqe,
    /// The command id written into each SQ slot, so that a doorbell can stamp the
    /// commands it hands over with the time it rang (one clock read per batch).
    slot_cid: Vec<u16>,
    sq_tail: u16,
    sq_rung: u16,
    cq_head: u16,
    /// The CQ head the controller was last told of (see [`QueuePair::poll`]).
    cq_rung: u16,
    /// Completions reaped since `cq_rung` was reported (kept, not computed, for the hot
    /// path).
    cq_unreported: usize,
    phase: u16,
    sq_doorbell: usize,
    cq_doorbell: usize,
    /// The queue's shadow doorbell entries, when the controller took a Doorbell Buffer
    /// Config for the queue's current incarnation.
    shadow: Option<ShadowSlots>,
    trackers: Vec<Tracker>,
    /// Free command ids, a stack of fixed capacity (one per tracker): `free[..nfree]`.
    free: FreeIds,
    scratch: Box<[u64; LIST_ENTRIES]>,
    /// The memory the trackers' PRP-list pages are carved from (one buffer, unless the
    /// pool could only give smaller pieces).
    prp_lists: Vec<DmaBuf>,
    timeout: Duration,
    disabled: bool,
}

// SAFETY: the raw ring and PRP-list pointers lead only into `sq`, `cq` and `prp_lists`,
// which the queue pair owns; moving the queue pair to another thread moves the only users
// of that memory with it. The shadow doorbell pointers lead to this queue's own entries of
// the controller's buffers (`set_shadow`), which no other queue pair writes. It is not
// Sync: one thread drives a queue pair, as each reactor owns its own.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// DMA memory a queue pair of `entries` slots takes: its two rings, each rounded up to
    /// whole pages, and one PRP-list page for each command slot, all taken at creation.
    pub fn dma_bytes(entries: u16) -> usize {
        let entries = entries.max(2) as usize;
        let ring = |entry: usize| (entries * entry).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        ring(SQE_SIZE) + ring(CQE_SIZE) + (entries - 1) * PAGE_SIZE
    }

    /// Allocates rings for a queue of `entries` slots (one stays empty, so `entries - 1`
    /// commands can be outstanding).
    pub fn new(
        ctrl: &str,
        qid: u16,
        entries: u16,
        stride: usize,
        pool: &DmaPool,
        timeout: Duration,
    ) -> Result<Self> {
        let entries = entries.max(2);
        let sq = pool.alloc_zeroed(entries as usize * SQE_SIZE)?;
        // A zeroed CQ has every phase tag clear, so the first pass looks for phase 1.
        let cq = pool.alloc_zeroed(entries as usize * CQE_SIZE)?;
        let slots = entries - 1;
        let slot_cid = vec![0; entries as usize];
        let (prp_lists, pages) = carve_prp_lists(pool, slots as usize)?;
        let trackers = pages
            .into_iter()
            .map(|(prp_iova, prp_ptr)| Tracker {
                busy: false,
                token: 0,
                submitted: None,
                opcode: 0,
                nsid: 0,
                slba: 0,
                prp_iova,
                prp_ptr,
            })
            .collect();
        Ok(QueuePair {
            qid,
            ctrl: ctrl.to_string(),
            entries,
            sq_base: sq.as_mut_ptr().cast(),
            cq_base: cq.as_mut_ptr().cast(),
            slot_cid,
            sq,
            cq,
            sq_tail: 0,
            sq_rung: 0,
            cq_head: 0,
            cq_rung: 0,
            cq_unreported: 0,
            phase: 1,
            sq_doorbell: doorbell_offset(qid, false, stride),
            cq_doorbell: doorbell_offset(qid, true, stride),
            shadow: None,
            trackers,
            // Popped from the end: hand out low command ids first.
            free: FreeIds::full(slots),
            scratch: Box::new([0; LIST_ENTRIES]),
            prp_lists,
            timeout,
            disabled: false,
        })
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }
    /// Ring size in entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }
    /// Device address of the SQ ring.
    pub fn sq_iova(&self) -> Iova {
        self.sq.iova()
    }
    /// Device address of the CQ ring.
    pub fn cq_iova(&self) -> Iova {
        self.cq.iova()
    }
    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.trackers.len() - self.free.len()
    }
    /// Commands that can still be submitted.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }
    /// Stops the queue from taking commands; used once the controller has been disabled
    /// after a timeout or fatal status.
    pub fn disable(&mut self) {
        self.disabled = true;
    }
    /// Whether the queue was disabled.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }
    /// Whether the queue's doorbells go through shadow doorbell entries.
    pub fn has_shadow(&self) -> bool {
        self.shadow.is_some()
    }

    /// Uses `slots` (or plain MMIO doorbells, for None) from now on, and sets the entries
    /// to what a new queue starts from: tail and head 0, and EventIdx 0 so that the first
    /// doorbell is written to MMIO as well. Called before the queue is created on the
    /// controller, while the controller does not use these entries.
    ///
    /// # Safety
    /// The four pointers must be valid, 4-byte aligned entries of the Shadow Doorbell and
    /// EventIdx buffers that belong to this queue alone, and stay allocated for as long as
    /// this queue pair is rung or polled.
    pub(crate) unsafe fn set_shadow(&mut self, slots: Option<ShadowSlots>) {
        if let Some(s) = slots {
            for p in [s.sq_db, s.sq_ei, s.cq_db, s.cq_ei] {
                // SAFETY: the caller vouches for the entries; the controller does not use
                // them while the queue does not exist on it.
                unsafe { p.write_volatile(0) };
            }
        }
        self.shadow = slots;
    }

    #[cold]
    fn disabled_error(&self) -> Error {
        Error::QueueDisabled {
            ctrl: self.ctrl.clone(),
            qid: self.qid,
        }
    }

    /// Writes a command into the next SQ slot without ringing the doorbell. Returns its
    /// command id.
    #[inline]
    pub fn post(&mut self, mut sqe: Sqe, data: Option<DataPtr<'_>>, token: u64) -> Result<u16> {
        if self.disabled {
            return Err(self.disabled_error());
        }
        let Some(cid) = self.free.peek() else {
            return Err(Error::QueueFull { qid: self.qid });
        };
        let tracker = &mut self.trackers[cid as usize];
        if let Some(data) = data {
            let prps = match prp::build(data, &mut self.scratch, tracker.prp_iova) {
                Ok(prps) => prps,
                Err(e) => return Err(bad_buffer(&self.ctrl, e)),
            };
            let list = &self.scratch[..prps.list_len.min(LIST_ENTRIES)];
            for (i, &entry) in list.iter().enumerate() {
                // SAFETY: `prp_ptr` is this tracker's own page of `prp_lists`, which the
                // queue keeps allocated, and i < LIST_ENTRIES keeps the store inside that
                // page. The page is not in use: its tracker is free, so the device has no
                // command that reads it. Volatile, because it is DMA memory; the release
                // fence in `ring` orders these stores before the doorbell.
                unsafe { tracker.prp_ptr.add(i).write_volatile(entry) };
            }
            sqe.prp1 = prps.prp1;
            sqe.prp2 = prps.prp2;
        }
        sqe.set_cid(cid);
        self.free.pop();
        tracker.busy = true;
        tracker.token = token;
        tracker.submitted = None;
        tracker.opcode = sqe.opcode();
        tracker.nsid = sqe.nsid;
        tracker.slba = sqe.slba();
        debug_assert!(self.sq_tail < self.entries);
        // SAFETY: sq_tail < entries, so the slot lies inside the SQ ring, which `self.sq`
        // keeps allocated and 64-byte aligned (page aligned); the device only reads the
        // ring, and a volatile store hands the whole entry to memory with no reference.
        unsafe { self.sq_base.add(self.sq_tail as usize).write_volatile(sqe) };
        self.slot_cid[self.sq_tail as usize] = cid;
        self.sq_tail += 1;
        if self.sq_tail == self.entries {
            self.sq_tail = 0;
        }
        Ok(cid)
    }

    /// Tells the controller about every posted entry: one doorbell store for the batch,
    /// none when nothing new was posted, and with shadow doorbells none either when the
    /// controller's EventIdx says it will look at the shadow entry by itself. The commands
    /// handed over are stamped with the time of this ring, which is when their deadlines
    /// start.
    #[inline]
    pub fn ring(&mut self, bar: &dyn Bar) {
        let (tail, old) = (self.sq_tail, self.sq_rung);
        if tail == old {
            return;
        }
        // Before the controller hears of more commands, it must have room for all their
        // completions: see `poll` on the CQ head.
        let unreported = self.cq_unreported;
        if unreported > 0 && unreported + self.outstanding() > self.cq_slack() {
            self.tell_cq_head(bar, false);
        }
        // The entries (and their PRP lists) must be visible in memory before the device
        // can see the new tail, in the shadow entry or in the register.
        fence(Ordering::Release);
        let mmio = match self.shadow {
            None => true,
            // SAFETY: set_shadow's caller vouched for the entries for the queue's life.
            Some(s) => unsafe { ShadowSlots::update(s.sq_db, s.sq_ei, tail, old) },
        };
        if mmio {
            bar.write32(self.sq_doorbell, tail as u32);
        }
        let now = Instant::now();
        let mut slot = old;
        while slot != tail {
            let cid = self.slot_cid[slot as usize];
            if let Some(t) = self.trackers.get_mut(cid as usize) {
                t.submitted = Some(now);
            }
            slot += 1;
            if slot == self.entries {
                slot = 0;
            }
        }
        self.sq_rung = tail;
    }

    /// Fails every outstanding command with a synthesized "Command Aborted due to SQ
    /// Deletion" completion, passed to `each` exactly as a device's would be (SPDK's
    /// `nvme_pcie_qpair_abort_trackers`), so that the caller settles commands one way.
    ///
    /// Only for a queue whose controller is known to do no more DMA for it: reset
    /// (CC.EN = 0 observed with CSTS.RDY = 0, base spec 3.7.2), bus mastering off, or
    /// about to be [`QueuePair::quarantine`]d. The queue is left empty, its indexes where
    /// they were; [`QueuePair::reinit`] makes it usable again after a reset.
    pub fn abort_all(&mut self, mut each: impl FnMut(Completion)) -> usize {
        let mut n = 0;
        for cid in 0..self.trackers.len() {
            let t = &mut self.trackers[cid];
            if !t.busy {
                continue;
            }
            t.busy = false;
            n += 1;
            let (token, opcode, nsid, slba) = (t.token, t.opcode, t.nsid, t.slba);
            self.free.push(cid as u16);
            each(Completion {
                token,
                cid: cid as u16,
                status: Status::ABORTED_SQ_DELETED,
                dw0: 0,
                opcode,
                nsid,
                slba,
            });
        }
        n
    }

    /// Makes the queue new again after its controller was reset (which deletes every
    /// queue, base spec 3.7.2): empty rings, indexes at zero, phase 1, every tracker free.
    /// The caller then creates it on the controller again with the same ids.
    pub fn reinit(&mut self) {
        debug_assert_eq!(self.outstanding(), 0, "abort_all before reinit");
        self.sq.zero();
        self.cq.zero();
        self.sq_tail = 0;
        self.sq_rung = 0;
        self.cq_head = 0;
        self.cq_rung = 0;
        self.cq_unreported = 0;
        self.phase = 1;
        self.free = FreeIds::full(self.trackers.len() as u16);
        for t in &mut self.trackers {
            t.busy = false;
        }
        self.disabled = false;
    }

    /// Gives up the queue's memory for good: its rings and PRP-list pages are never
    /// returned to the pool, because the controller could not be proven to have stopped
    /// using them. The queue is disabled.
    pub fn quarantine(&mut self) {
        self.disabled = true;
        self.sq.quarantine();
        self.cq.quarantine();
        for lists in &mut self.prp_lists {
            lists.quarantine();
        }
    }

    /// Reaps at most `max` completions, calling `each` for every one, then writes the CQ
    /// head doorbell once. A completion whose command id is not outstanding is consumed and
    /// reported as [`Error::BadCommandId`] after the rest of the batch is handled.
    #[inline]
    pub fn poll(
        &mut self,
        bar: &dyn Bar,
        max: usize,
        mut each: impl FnMut(Completion),
    ) -> Result<usize> {
        let mut reaped = 0;
        let mut bad = None;
        while reaped < max {
            debug_assert!(self.cq_head < self.entries);
            // SAFETY: cq_head < entries, so the entry lies inside the CQ ring that `self.cq`
            // keeps allocated and 16-byte aligned. The device writes it at any time, which
            // is why it is only ever read with volatile loads through the raw pointer.
            let entry = unsafe { self.cq_base.add(self.cq_head as usize) };
            // SAFETY: as above; `status` is a field of that in-bounds entry.
            let status_word = unsafe { std::ptr::addr_of!((*entry).status).read_volatile() };
            if status_word & 1 != self.phase {
                break;
            }
            // The phase tag says the entry is complete; nothing else in it may be read
            // before that load.
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let cqe = unsafe { entry.read_volatile() };
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase ^= 1;
            }
            reaped += 1;
            let cid = cqe.cid;
            match self.trackers.get_mut(cid as usize) {
                Some(t) if t.busy => {
                    t.busy = false;
                    self.free.push(cid);
                    each(Completion {
                        token: t.token,
                        cid,
                        status: Status::from_cqe_word(status_word),
                        dw0: cqe.dw0,
                        opcode: t.opcode,
                        nsid: t.nsid,
                        slba: t.slba,
                    });
                }
                _ => bad = Some(cid),
            }
        }
        // The CQ head doorbell only frees CQ slots for the controller, so it is written
        // lazily, as SPDK and Linux write the SQ tail: the controller's view of the ring
        // holds the completions reaped but not reported plus those of the commands still
        // outstanding, and while that sum stays within half the ring it can never find
        // the CQ full (base spec 4.1: full is head = tail + 1). Reaping moves completions
        // from one term to the other; only `ring` adds to the sum, and it reports the
        // head first when needed. At queue depths well below the ring size this is one
        // CQ doorbell per half a ring of completions instead of one per poll.
        self.cq_unreported += reaped;
        if reaped > 0 && self.cq_unreported + self.outstanding() > self.cq_slack() {
            self.tell_cq_head(bar, reaped >= self.entries as usize);
        }
        match bad {
            Some(cid) => Err(Error::BadCommandId {
                ctrl: self.ctrl.clone(),
                qid: self.qid,
                cid,
            }),
            None => Ok(reaped),
        }
    }

    /// How many completions the controller may hold in its view of the CQ before the
    /// head must be reported: half the ring.
    #[inline]
    fn cq_slack(&self) -> usize {
        self.entries as usize / 2
    }

    /// Writes the CQ head doorbell (or its shadow entry). `wrapped`: a whole ring was
    /// reaped since the last report, which leaves the head where it was, and which the
    /// EventIdx rule cannot tell from no move, so the register is written.
    #[cold]
    fn tell_cq_head(&mut self, bar: &dyn Bar, wrapped: bool) {
        let (head, old_head) = (self.cq_head, self.cq_rung);
        let mmio = match self.shadow {
            None => true,
            Some(_) if wrapped => true,
            Some(s) => {
                // The entries were read before the controller may reuse their slots.
                fence(Ordering::Release);
                // SAFETY: set_shadow's caller vouched for the entries.
                unsafe { ShadowSlots::update(s.cq_db, s.cq_ei, head, old_head) }
            }
        };
        if mmio {
            bar.write32(self.cq_doorbell, head as u32);
        }
        self.cq_rung = head;
        self.cq_unreported = 0;
    }

    /// The oldest outstanding command past its timeout, if any. Commands posted but not
    /// yet rung are not counted: their deadline has not started.
    pub fn expired(&self, now: Instant) -> Option<Expired> {
        self.trackers
            .iter()
            .filter(|t| t.busy)
            .filter_map(|t| Some((t, t.submitted?)))
            .filter(|&(_, at)| now.saturating_duration_since(at) > self.timeout)
            .min_by_key(|&(_, at)| at)
            .map(|(t, at)| Expired {
                opcode: t.opcode,
                nsid: t.nsid,
                slba: t.slba,
                waited: now.saturating_duration_since(at),
            })
    }
}

#[cold]
fn bad_buffer(ctrl: &str, e: prp::PrpError) -> Error {
    Error::BadBuffer {
        ctrl: ctrl.to_string(),
        reason: e.to_string(),
    }
}

/// The free command ids of a queue pair: a stack that can hold every id at once, so that
/// pushing never grows it (a command id is pushed only when its tracker was busy, which
/// happens at most once per pop).
#[derive(Debug)]
struct FreeIds {
    ids: Box<[u16]>,
    len: usize,
}

impl FreeIds {
    /// Every id of `count` trackers, the low ones on top.
    fn full(count: u16) -> Self {
        FreeIds {
            ids: (0..count).rev().collect(),
            len: count as usize,
        }
    }
    #[inline]
    fn len(&self) -> usize {
        self.len
    }
    #[inline]
    fn peek(&self) -> Option<u16> {
        self.len
            .checked_sub(1)
            .and_then(|i| self.ids.get(i).copied())
    }
    #[inline]
    fn pop(&mut self) {
        self.len = self.len.saturating_sub(1);
    }
    #[inline]
    fn push(&mut self, cid: u16) {
        // Never full here: see the type's comment. Were it, the id is dropped rather than
        // overwriting another.
        if let Some(slot) = self.ids.get_mut(self.len) {
            *slot = cid;
            self.len += 1;
        }
    }
}

/// Carves one PRP-list page for each of `count` trackers out of as few DMA buffers as the
/// pool allows: one buffer when it has a contiguous run of `count` pages (the usual case),
/// else pieces of half the size, and so on down to single pages, so that a fragmented
/// pool that still has the pages free does not fail queue creation. Returns the buffers
/// and each tracker's page (device address, first entry).
#[allow(clippy::type_complexity)]
fn carve_prp_lists(pool: &DmaPool, count: usize) -> Result<(Vec<DmaBuf>, Vec<(Iova, *mut u64)>)> {
    let mut bufs = Vec::new();
    let mut pages = Vec::with_capacity(count);
    let mut piece = count.min(pool.max_contiguous() / PAGE_SIZE).max(1);
    while pages.len() < count {
        let n = piece.min(count - pages.len());
        let buf = match pool.alloc(n * PAGE_SIZE) {
            Ok(buf) => buf,
            Err(nvcopy_vfio::Error::PoolExhausted { .. }) if piece > 1 => {
                piece = piece.div_ceil(2);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for i in 0..n {
            let at = i * PAGE_SIZE;
            // wrapping_add forms the address without unsafe; it lies inside `buf`.
            let ptr = buf.as_mut_ptr().wrapping_add(at).cast::<u64>();
            pages.push((buf.iova().add(at as u64), ptr));
        }
        bufs.push(buf);
    }
    Ok((bufs, pages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvcopy_vfio::Bytes;
    use std::sync::Mutex;

    /// Records doorbell stores.
    #[derive(Default)]
    struct FakeBar(Mutex<Vec<(usize, u32)>>);
    impl Bar for FakeBar {
        fn read32(&self, _: usize) -> u32 {
            0
        }
        fn write32(&self, off: usize, v: u32) {
            self.0.lock().unwrap().push((off, v));
        }
        fn len(&self) -> usize {
            0x2000
        }
    }

    /// Plays the device: writes a CQE with the given cid at slot `slot` and phase.
    fn complete(qp: &QueuePair, slot: u16, cid: u16, phase: u16, sc: u16) {
        let cqe = Cqe {
            cid,
            status: (sc << 1) | phase,
            ..Default::default()
        };
        qp.cq
            .slice()
            .write_obj(cqe, slot as usize * CQE_SIZE)
            .unwrap();
    }

    fn queue(entries: u16) -> (QueuePair, DmaPool) {
        let pool = DmaPool::unmapped(64 * PAGE_SIZE).unwrap();
        (
            QueuePair::new("test", 1, entries, 4, &pool, Duration::from_secs(5)).unwrap(),
            pool,
        )
    }

    #[test]
    fn rings_once_per_batch_and_wraps_with_the_phase() {
        let (mut qp, _pool) = queue(4);
        let bar = FakeBar::default();
        qp.ring(&bar);
        assert!(
            bar.0.lock().unwrap().is_empty(),
            "no doorbell when the tail did not move"
        );
        for round in 0..3u16 {
            let a = qp.post(Sqe::new(2, 1), None, 10).unwrap();
            let b = qp.post(Sqe::new(2, 1), None, 11).unwrap();
            let c = qp.post(Sqe::new(2, 1), None, 12).unwrap();
            assert!(matches!(
                qp.post(Sqe::new(2, 1), None, 13),
                Err(Error::QueueFull { .. })
            ));
            qp.ring(&bar);
            // The device completes them in reverse order; CQ slots and phase wrap.
            let base = round * 3;
            for (i, cid) in [c, b, a].into_iter().enumerate() {
                let slot = (base + i as u16) % 4;
                let phase = if (base + i as u16) / 4 % 2 == 0 { 1 } else { 0 };
                complete(&qp, slot, cid, phase, 0);
            }
            let mut tokens = vec![];
            assert_eq!(qp.poll(&bar, 16, |c| tokens.push(c.token)).unwrap(), 3);
            assert_eq!(tokens, vec![12, 11, 10]);
            assert_eq!(qp.outstanding(), 0);
        }
        let stores = bar.0.lock().unwrap().clone();
        // Per round: one SQ tail store (0x1008) and one CQ head store (0x100c).
        assert_eq!(stores.len(), 6);
        assert_eq!(stores[0], (0x1008, 3));
        assert_eq!(stores[1], (0x100c, 3));
        assert_eq!(stores[4], (0x1008, 1), "SQ tail wrapped: 9 % 4");
        assert_eq!(stores[5], (0x100c, 1));
    }

    /// The lazy CQ head never lets a controller that keeps to the spec find the CQ full
    /// while it has commands to complete: a device model that posts a completion only
    /// when its view of the ring has room (head as last reported by doorbell), under
    /// seeded random posts, rings, completions and polls of random sizes.
    #[test]
    fn a_lazily_reported_cq_head_never_leaves_the_controller_without_room() {
        for entries in [4u16, 8, 32] {
            let (mut qp, _pool) = queue(entries);
            let bar = FakeBar::default();
            let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ entries as u64;
            let mut rnd = |n: u64| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) % n.max(1)
            };
            let (mut posted, mut rung) = (Vec::new(), Vec::new());
            let (mut dev_tail, mut dev_phase) = (0u16, 1u16);
            let mut cq_writes = 0;
            for step in 0..5000 {
                match rnd(4) {
                    0 => {
                        for _ in 0..rnd(entries as u64) {
                            match qp.post(Sqe::new(2, 1), None, 0) {
                                Ok(cid) => posted.push(cid),
                                Err(_) => break,
                            }
                        }
                    }
                    1 => {
                        qp.ring(&bar);
                        rung.append(&mut posted);
                    }
                    2 => {
                        let reported = bar
                            .0
                            .lock()
                            .unwrap()
                            .iter()
                            .rev()
                            .find(|(off, _)| *off == 0x100c)
                            .map_or(0, |&(_, v)| v as u16);
                        let used = (dev_tail + entries - reported) % entries;
                        let room = entries - 1 - used;
                        assert!(
                            rung.is_empty() || room > 0,
                            "entries {entries}, step {step}: {} commands rung and a full CQ",
                            rung.len()
                        );
                        for _ in 0..rnd(room as u64 + 1).min(rung.len() as u64) {
                            let i = rnd(rung.len() as u64) as usize;
                            let cid = rung.swap_remove(i);
                            complete(&qp, dev_tail, cid, dev_phase, 0);
                            dev_tail += 1;
                            if dev_tail == entries {
                                dev_tail = 0;
                                dev_phase ^= 1;
                            }
                        }
                    }
                    _ => {
                        qp.poll(&bar, rnd(entries as u64) as usize + 1, |_| {})
                            .unwrap();
                    }
                }
                cq_writes = bar
                    .0
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(o, _)| *o == 0x100c)
                    .count();
            }
            assert!(
                cq_writes > 0,
                "entries {entries}: the head was never reported"
            );
        }
    }

    #[test]
    fn caps_the_batch() {
        let (mut qp, _pool) = queue(8);
        let bar = FakeBar::default();
        for slot in 0..5 {
            let cid = qp.post(Sqe::new(2, 1), None, slot as u64).unwrap();
            complete(&qp, slot, cid, 1, 0);
        }
        assert_eq!(qp.poll(&bar, 2, |_| {}).unwrap(), 2);
        assert_eq!(qp.poll(&bar, 16, |_| {}).unwrap(), 3);
        assert_eq!(qp.poll(&bar, 16, |_| {}).unwrap(), 0);
    }

    #[test]
    fn rejects_a_bad_command_id_and_keeps_going() {
        let (mut qp, _pool) = queue(8);
        let bar = FakeBar::default();
        let cid = qp.post(Sqe::new(2, 1), None, 7).unwrap();
        complete(&qp, 0, 999, 1, 0); // out of the slab
        complete(&qp, 1, 3, 1, 0); // in range but not outstanding
        complete(&qp, 2, cid, 1, 0x80);
        let mut seen = vec![];
        let err = qp
            .poll(&bar, 16, |c| seen.push((c.token, c.status)))
            .unwrap_err();
        assert!(matches!(err, Error::BadCommandId { cid: 3, .. }), "{err}");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].1.kind(), crate::status::StatusKind::LbaOutOfRange);
        assert_eq!(qp.outstanding(), 0);
    }

    #[test]
    fn a_queue_pair_takes_its_dma_memory_at_creation_and_none_in_post() {
        let pool = DmaPool::unmapped(256 * PAGE_SIZE).unwrap();
        let data = pool.alloc(16 * PAGE_SIZE).unwrap();
        let before = pool.free_pages();
        let mut qp = QueuePair::new("test", 1, 8, 4, &pool, Duration::from_secs(5)).unwrap();
        let used = (before - pool.free_pages()) * PAGE_SIZE;
        assert_eq!(
            used,
            QueuePair::dma_bytes(8),
            "rings plus one list page a slot, all at creation"
        );
        assert_eq!(qp.prp_lists.len(), 1, "one allocation for every list page");
        let after_creation = pool.free_pages();
        // Every slot carries a transfer that needs a PRP list page; a full queue refuses.
        let d = DataPtr::Contig {
            iova: data.iova(),
            len: 16 * PAGE_SIZE,
        };
        let mut lists = Vec::new();
        for _ in 0..7 {
            let cid = qp.post(Sqe::new(2, 1), Some(d), 0).unwrap();
            let sqe: Sqe = qp.sq.slice().read_obj(cid as usize * SQE_SIZE).unwrap();
            lists.push(sqe.prp2);
        }
        assert!(matches!(
            qp.post(Sqe::new(2, 1), Some(d), 0),
            Err(Error::QueueFull { qid: 1 })
        ));
        assert_eq!(pool.free_pages(), after_creation, "post allocates nothing");
        lists.sort_unstable();
        lists.dedup();
        assert_eq!(lists.len(), 7, "each tracker has a page of its own");
        let base = qp.prp_lists[0].iova().0;
        for (i, l) in lists.iter().enumerate() {
            assert_eq!(*l, base + (i * PAGE_SIZE) as u64, "carved in order");
        }
        assert_eq!(
            QueuePair::dma_bytes(1024),
            64 * 1024 + 16 * 1024 + 1023 * PAGE_SIZE
        );
    }

    #[test]
    fn a_fragmented_pool_still_gives_every_tracker_a_page() {
        let pool = DmaPool::unmapped(32 * PAGE_SIZE).unwrap();
        // Hold every other page: no two free pages are adjacent.
        let all: Vec<DmaBuf> = (0..32).map(|_| pool.alloc(PAGE_SIZE).unwrap()).collect();
        let kept: Vec<DmaBuf> = all
            .into_iter()
            .enumerate()
            .filter_map(|(i, b)| (i % 2 == 0).then_some(b))
            .collect();
        assert_eq!(pool.free_pages(), 16);
        // Rings of one page each and 7 list pages: 9 single pages.
        let qp = QueuePair::new("test", 1, 8, 4, &pool, Duration::from_secs(5)).unwrap();
        assert_eq!(qp.prp_lists.len(), 7);
        assert_eq!(pool.free_pages(), 16 - 9);
        drop(kept);
    }

    #[test]
    fn quarantine_keeps_the_prp_list_pages_out_of_the_pool() {
        let pool = DmaPool::unmapped(64 * PAGE_SIZE).unwrap();
        let before = pool.free_pages();
        let mut qp = QueuePair::new("test", 1, 8, 4, &pool, Duration::from_secs(5)).unwrap();
        qp.quarantine();
        assert!(qp.is_disabled());
        drop(qp);
        assert_eq!(
            (before - pool.free_pages()) * PAGE_SIZE,
            QueuePair::dma_bytes(8),
            "rings and list pages all stay out"
        );
        let qp = QueuePair::new("test", 1, 8, 4, &pool, Duration::from_secs(5)).unwrap();
        drop(qp);
        assert_eq!(
            (before - pool.free_pages()) * PAGE_SIZE,
            QueuePair::dma_bytes(8),
            "a queue that was not quarantined gives everything back"
        );
    }

    #[test]
    fn builds_prp_lists_in_the_trackers_page() {
        let (mut qp, pool) = queue(4);
        let data = pool.alloc(16 * PAGE_SIZE).unwrap();
        qp.post(
            Sqe::new(2, 1),
            Some(DataPtr::Contig {
                iova: data.iova(),
                len: 16 * PAGE_SIZE,
            }),
            0,
        )
        .unwrap();
        let sqe: Sqe = qp.sq.slice().read_obj(0).unwrap();
        assert_eq!(sqe.prp1, data.iova().0);
        let list = pool.slice_at(Iova(sqe.prp2), 15 * 8).unwrap();
        let mut entries = [0u64; 15];
        list.copy_to(&mut entries[..]);
        assert_eq!(entries[0], data.iova().0 + PAGE_SIZE as u64);
        assert_eq!(entries[14], data.iova().0 + 15 * PAGE_SIZE as u64);
    }

    #[test]
    fn reports_expired_commands_and_refuses_work_when_disabled() {
        let (mut qp, _pool) = queue(4);
        let mut s = Sqe::new(2, 3);
        s.set_slba(42);
        qp.post(s, None, 0).unwrap();
        let later = Instant::now() + Duration::from_secs(6);
        assert!(
            qp.expired(later).is_none(),
            "a command not yet rung has no deadline running"
        );
        qp.ring(&FakeBar::default());
        assert!(qp.expired(Instant::now()).is_none());
        let late = qp.expired(later).unwrap();
        assert_eq!((late.opcode, late.nsid, late.slba), (2, 3, 42));
        qp.disable();
        assert!(matches!(
            qp.post(Sqe::new(2, 1), None, 0),
            Err(Error::QueueDisabled { .. })
        ));
    }

    #[test]
    fn shadow_doorbells_write_mmio_only_when_the_event_index_is_passed() {
        let (mut qp, pool) = queue(8);
        let page = pool.alloc_zeroed(PAGE_SIZE).unwrap();
        let word = |i: usize| page.as_mut_ptr().wrapping_add(4 * i).cast::<u32>();
        let read = |i: usize| {
            let mut b = [0u8; 4];
            page.read_at(4 * i, &mut b);
            u32::from_le_bytes(b)
        };
        let set = |i: usize, v: u32| page.write_at(4 * i, &v.to_le_bytes());
        // Stale values from an earlier queue with this id, zeroed by set_shadow.
        (0..4).for_each(|i| set(i, 77));
        let slots = ShadowSlots {
            sq_db: word(0),
            sq_ei: word(1),
            cq_db: word(2),
            cq_ei: word(3),
        };
        // SAFETY: `page` outlives every ring and poll below.
        unsafe { qp.set_shadow(Some(slots)) };
        assert!(qp.has_shadow());
        assert_eq!((read(0), read(1), read(2), read(3)), (0, 0, 0, 0));
        let bar = FakeBar::default();
        // EventIdx 0 and tail 0 -> 1: the controller wants to hear of it.
        let a = qp.post(Sqe::new(2, 1), None, 1).unwrap();
        qp.ring(&bar);
        assert_eq!(read(0), 1);
        assert_eq!(bar.0.lock().unwrap().as_slice(), &[(0x1008, 1)]);
        // The controller has not caught up (EventIdx still 0): shadow write alone.
        let b = qp.post(Sqe::new(2, 1), None, 2).unwrap();
        qp.ring(&bar);
        assert_eq!(read(0), 2);
        assert_eq!(bar.0.lock().unwrap().len(), 1);
        // It consumed up to 2 and asks to hear of what comes after.
        set(1, 2);
        let c = qp.post(Sqe::new(2, 1), None, 3).unwrap();
        qp.ring(&bar);
        assert_eq!(bar.0.lock().unwrap().last(), Some(&(0x1008, 3)));
        // Completions are reported lazily: 3 reaped with nothing outstanding is within
        // half the ring (4), so neither the shadow entry nor the register is written.
        complete(&qp, 0, a, 1, 0);
        complete(&qp, 1, b, 1, 0);
        assert_eq!(qp.poll(&bar, 16, |_| {}).unwrap(), 2);
        complete(&qp, 2, c, 1, 0);
        assert_eq!(qp.poll(&bar, 16, |_| {}).unwrap(), 1);
        assert_eq!((read(2), bar.0.lock().unwrap().len()), (0, 2));
        // The controller's CQ EventIdx is ahead (it is not waiting for the head), and its
        // SQ EventIdx still 2. A fourth outstanding command fits (3 + 1 <= 4); a fifth
        // would not, so that ring reports head 3 first: in the shadow entry only.
        set(3, 7);
        qp.post(Sqe::new(2, 1), None, 4).unwrap();
        qp.ring(&bar);
        assert_eq!(read(2), 0);
        qp.post(Sqe::new(2, 1), None, 5).unwrap();
        qp.ring(&bar);
        assert_eq!((read(0), read(2)), (5, 3));
        assert_eq!(
            bar.0.lock().unwrap().len(),
            2,
            "no MMIO store: both EventIdx rules hold"
        );
        // Back to MMIO doorbells.
        // SAFETY: no entries.
        unsafe { qp.set_shadow(None) };
        qp.post(Sqe::new(2, 1), None, 6).unwrap();
        qp.ring(&bar);
        assert_eq!(bar.0.lock().unwrap().last(), Some(&(0x1008, 6)));
        assert_eq!(read(0), 5, "the shadow entry is no longer written");
    }
}
