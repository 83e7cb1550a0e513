//! A reactor: one polling loop on one core, with one queue pair per controller.
//!
//! Each pass follows kcopyd's order: completions first (they free pages and chunk
//! slots), then chunks that were waiting (a retry whose delay has passed, or a
//! WRITE_SEQUENTIAL chunk whose turn has come), then new chunks pulled from the jobs'
//! cursors, then one doorbell per queue. Everything the loop touches is allocated before
//! it starts, and it makes no syscalls while it has work; it sleeps only when idle.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_nvme::{Completion, DataPtr, Error as NvmeError, IoQpair};
use nvcopy_vfio::{DmaBuf, Iova, PAGE_SIZE};

use crate::engine::EngineShared;
use crate::error::Result;
use crate::job::{Flags, Job, JobKind};

/// The read of a chunk; write ops are the destination's index.
const OP_READ: u8 = 64;
/// Completions reaped per queue per pass.
const CQ_BATCH: usize = 64;
/// Idle passes with commands in flight between looks at their deadlines.
const TIMEOUT_CHECK_PASSES: u32 = 1 << 14;

struct Slot {
    job: Option<Arc<Job>>,
    offset: u64,
    len: usize,
    pages: Vec<u32>,
    iovas: Vec<Iova>,
    /// Copy-command source ranges; the same for every offloaded destination of the chunk.
    descs: DmaBuf,
    reading: bool,
    /// Destinations whose write is in flight or waiting for a retry.
    pending: u64,
    ok: bool,
    awaiting_turn: bool,
    retry_at: Option<Instant>,
    retry_ops: Vec<u8>,
    tries: [u8; 65],
}

/// How one command of a chunk ended.
enum OpEnd {
    Ok,
    Retry(Duration),
    Failed(String),
}

pub(crate) struct Reactor {
    id: usize,
    shared: Arc<EngineShared>,
    queues: Vec<Option<IoQpair>>,
    jobs: Vec<Arc<Job>>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    events: Vec<(usize, Completion)>,
    zero_iovas: Vec<Iova>,
    // Keeps the shared zero page alive for `zero_iovas`.
    _zero_page: DmaBuf,
    /// Slots with a retry or a write turn outstanding.
    waiting: usize,
    rr: usize,
}

impl Reactor {
    pub(crate) fn new(
        id: usize,
        shared: Arc<EngineShared>,
        queues: Vec<Option<IoQpair>>,
    ) -> Result<Reactor> {
        let qd = shared.opts.qd.max(1);
        let max_pages = nvcopy_nvme::prp::MAX_TRANSFER / PAGE_SIZE;
        let zero_page = shared.pool.alloc_zeroed(PAGE_SIZE)?;
        let slots = (0..qd)
            .map(|_| {
                Ok(Slot {
                    job: None,
                    offset: 0,
                    len: 0,
                    pages: Vec::with_capacity(max_pages),
                    iovas: Vec::with_capacity(max_pages),
                    descs: shared.pool.alloc(PAGE_SIZE)?,
                    reading: false,
                    pending: 0,
                    ok: true,
                    awaiting_turn: false,
                    retry_at: None,
                    retry_ops: Vec::with_capacity(65),
                    tries: [0; 65],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Reactor {
            id,
            queues,
            jobs: Vec::with_capacity(1024),
            free: (0..qd).rev().collect(),
            events: Vec::with_capacity(CQ_BATCH * shared.controllers.len()),
            zero_iovas: vec![zero_page.iova(); max_pages],
            _zero_page: zero_page,
            slots,
            shared,
            waiting: 0,
            rr: 0,
        })
    }

    pub(crate) fn run(mut self) {
        if self.shared.opts.pin {
            let cpu = self.id % nvcopy_vfio::threads::available_cpus();
            // Pinning is a placement hint: an unpinned reactor still copies correctly.
            let _ = nvcopy_vfio::threads::pin_current_thread(cpu);
        }
        if let Some(init) = self.shared.opts.reactor_init.clone() {
            init(self.id);
        }
        let mut idle_passes: u32 = 0;
        loop {
            while let Some(job) = self.shared.inboxes[self.id].pop() {
                self.jobs.push(job);
            }
            let progressed = self.reap() | self.resume_waiting() | self.dispatch();
            for q in self.queues.iter_mut().flatten() {
                q.ring();
            }
            let busy = self.free.len() < self.slots.len();
            if progressed {
                idle_passes = 0;
                continue;
            }
            if busy {
                idle_passes = idle_passes.wrapping_add(1);
                if idle_passes % TIMEOUT_CHECK_PASSES == 0 {
                    self.check_timeouts();
                }
                std::hint::spin_loop();
            } else if !self.jobs.is_empty() {
                // Jobs waiting for pages that other reactors hold: let them run.
                std::thread::yield_now();
            } else if self.shared.stop.load(Ordering::Acquire)
                && self.shared.inboxes[self.id].is_empty()
            {
                return;
            } else {
                std::thread::park_timeout(Duration::from_millis(5));
            }
        }
    }

    /// Reaps completions from every queue and settles their commands.
    fn reap(&mut self) -> bool {
        self.events.clear();
        for (ci, q) in self.queues.iter_mut().enumerate() {
            if let Some(q) = q {
                if q.outstanding() == 0 {
                    continue;
                }
                // A completion naming a command that is not outstanding is dropped by the
                // driver; the command it should have named then times out.
                let events = &mut self.events;
                let _ = q.poll(CQ_BATCH, |c| events.push((ci, c)));
            }
        }
        for i in 0..self.events.len() {
            let (ci, c) = self.events[i];
            let si = (c.token >> 8) as usize;
            let op = c.token as u8;
            if self.slots.get(si).is_none_or(|s| s.job.is_none()) {
                continue;
            }
            let end = if c.status.is_success() {
                OpEnd::Ok
            } else {
                let slot = &mut self.slots[si];
                let tries = &mut slot.tries[op as usize];
                if !c.status.dnr() && *tries < self.shared.opts.retries {
                    *tries += 1;
                    OpEnd::Retry(
                        self.shared.controllers[ci]
                            .info()
                            .retry_delay(c.status.crd()),
                    )
                } else {
                    match self.queues[ci].as_ref().map(|q| q.check(&c)) {
                        Some(Err(e)) => OpEnd::Failed(e.to_string()),
                        _ => OpEnd::Failed(format!("command failed: {}", c.status)),
                    }
                }
            };
            self.settle(si, op, end);
        }
        !self.events.is_empty()
    }

    /// Starts retries whose delay has passed and sequential writes whose turn has come.
    fn resume_waiting(&mut self) -> bool {
        if self.waiting == 0 {
            return false;
        }
        let now = Instant::now();
        let mut progressed = false;
        for si in 0..self.slots.len() {
            let slot = &mut self.slots[si];
            let Some(job) = slot.job.clone() else {
                continue;
            };
            if slot.awaiting_turn && job.next_write.load(Ordering::Acquire) == slot.offset {
                slot.awaiting_turn = false;
                self.waiting -= 1;
                self.start_writes(si);
                progressed = true;
                continue;
            }
            let slot = &mut self.slots[si];
            if slot.retry_at.is_some_and(|at| at <= now) {
                slot.retry_at = None;
                self.waiting -= 1;
                // A retry that fails again (a queue still full) goes back on the list for a
                // later pass, so take only the ops that were waiting when the pass began.
                for _ in 0..self.slots[si].retry_ops.len() {
                    let op = self.slots[si].retry_ops.remove(0);
                    self.issue_or_settle(si, op);
                }
                progressed = true;
            }
        }
        progressed
    }

    /// Pulls new chunks from the jobs into free slots, round robin over the jobs.
    fn dispatch(&mut self) -> bool {
        let mut started = false;
        let n = self.jobs.len();
        for k in 0..n {
            let job = self.jobs[(self.rr + k) % n].clone();
            let needs_pages = match job.kind {
                JobKind::Copy { .. } => job.offloaded.count() < job.to.len() as u32,
                JobKind::Zero => false,
            };
            while let Some(&si) = self.free.last() {
                if !job.has_more() {
                    break;
                }
                let slot = &mut self.slots[si];
                if needs_pages
                    && !job.client.pages.take(
                        job.chunk.div_ceil(PAGE_SIZE),
                        &mut slot.pages,
                        &mut slot.iovas,
                    )
                {
                    break; // the job waits for pages; it is never failed for lack of them
                }
                let Some((offset, len)) = job.claim() else {
                    job.client.pages.give(&mut slot.pages);
                    break;
                };
                self.free.pop();
                slot.job = Some(job.clone());
                slot.offset = offset;
                slot.len = len;
                slot.ok = true;
                slot.tries = [0; 65];
                self.start_chunk(si);
                started = true;
            }
        }
        self.rr = self.rr.wrapping_add(1);
        self.jobs.retain(|j| j.has_more());
        started
    }

    fn start_chunk(&mut self, si: usize) {
        let Some(job) = self.slots[si].job.clone() else {
            return;
        };
        match job.kind {
            JobKind::Copy { .. } => {
                let slot = &mut self.slots[si];
                slot.pending = job.offloaded.0;
                slot.reading = job.offloaded.count() < job.to.len() as u32;
                let reading = slot.reading;
                for d in 0..job.to.len() {
                    if job.offloaded.contains(d) {
                        self.issue_or_settle(si, d as u8);
                    }
                }
                if reading {
                    self.issue_or_settle(si, OP_READ);
                }
            }
            JobKind::Zero => self.start_writes(si),
        }
    }

    /// Issues the data-moving writes of a chunk whose data is ready.
    fn start_writes(&mut self, si: usize) {
        let Some(job) = self.slots[si].job.clone() else {
            return;
        };
        let moved = !job.offloaded.0 & low_bits(job.to.len());
        self.slots[si].pending |= moved;
        for d in 0..job.to.len() {
            if moved >> d & 1 == 1 {
                self.issue_or_settle(si, d as u8);
            }
        }
    }

    fn issue_or_settle(&mut self, si: usize, op: u8) {
        match self.issue(si, op) {
            Ok(()) => {}
            Err(NvmeError::QueueFull { .. }) => self.settle(si, op, OpEnd::Retry(Duration::ZERO)),
            Err(e) => self.settle(si, op, OpEnd::Failed(e.to_string())),
        }
    }

    /// Posts one command of a chunk (the doorbell rings at the end of the pass).
    fn issue(&mut self, si: usize, op: u8) -> std::result::Result<(), NvmeError> {
        let slot = &self.slots[si];
        let Some(job) = slot.job.as_deref() else {
            return Ok(());
        };
        let token = (si as u64) << 8 | op as u64;
        let pages = slot.len.div_ceil(PAGE_SIZE);
        let no_queue = |ctrl: usize| NvmeError::Unsupported {
            ctrl: ctrl.to_string(),
            reason: "this reactor has no queue pair on the controller".into(),
        };
        match (&job.kind, op) {
            (JobKind::Copy { from }, OP_READ) => {
                let ns = job.src_ns.as_ref().ok_or_else(|| no_queue(from.ctrl))?;
                let q = self.queues[from.ctrl]
                    .as_mut()
                    .ok_or_else(|| no_queue(from.ctrl))?;
                let data = DataPtr::Pages {
                    pages: &slot.iovas[..pages],
                    len: slot.len,
                };
                q.submit_read(
                    ns,
                    (from.offset + slot.offset) / from.lba_size as u64,
                    data,
                    token,
                )?;
            }
            (JobKind::Copy { from }, d) => {
                let d = d as usize;
                let to = &job.to[d];
                let q = self.queues[to.ctrl]
                    .as_mut()
                    .ok_or_else(|| no_queue(to.ctrl))?;
                let lba = (to.offset + slot.offset) / to.lba_size as u64;
                if job.offloaded.contains(d) {
                    let src = (from.offset + slot.offset) / from.lba_size as u64;
                    let blocks = slot.len as u64 / to.lba_size as u64;
                    q.submit_copy(&job.dst_ns[d], src, blocks, lba, &slot.descs, token)?;
                } else {
                    let data = DataPtr::Pages {
                        pages: &slot.iovas[..pages],
                        len: slot.len,
                    };
                    q.submit_write(&job.dst_ns[d], lba, data, token)?;
                }
            }
            (JobKind::Zero, d) => {
                let d = d as usize;
                let to = &job.to[d];
                let q = self.queues[to.ctrl]
                    .as_mut()
                    .ok_or_else(|| no_queue(to.ctrl))?;
                let lba = (to.offset + slot.offset) / to.lba_size as u64;
                if job.write_zeroes.contains(d) {
                    q.submit_write_zeroes(
                        &job.dst_ns[d],
                        lba,
                        (slot.len / to.lba_size as usize) as u32,
                        token,
                    )?;
                } else {
                    let data = DataPtr::Pages {
                        pages: &self.zero_iovas[..pages],
                        len: slot.len,
                    };
                    q.submit_write(&job.dst_ns[d], lba, data, token)?;
                }
            }
        }
        Ok(())
    }

    /// Records how one command of a chunk ended and moves the chunk on.
    fn settle(&mut self, si: usize, op: u8, end: OpEnd) {
        let Some(job) = self.slots[si].job.clone() else {
            return;
        };
        let slot = &mut self.slots[si];
        match end {
            OpEnd::Retry(delay) => {
                if slot.retry_at.is_none() {
                    self.waiting += 1;
                }
                let at = Instant::now() + delay;
                slot.retry_at = Some(slot.retry_at.map_or(at, |t| t.max(at)));
                slot.retry_ops.push(op);
                return;
            }
            OpEnd::Failed(msg) => {
                slot.ok = false;
                if op == OP_READ {
                    job.note_error(true, None, || msg);
                } else {
                    job.note_error(false, Some(op as usize), || msg);
                }
            }
            OpEnd::Ok => {}
        }
        let slot = &mut self.slots[si];
        if op == OP_READ {
            slot.reading = false;
            if !slot.ok {
                // A chunk that could not be read is not written anywhere.
                slot.pending &= job.offloaded.0;
            } else if job.flags.contains(Flags::WRITE_SEQUENTIAL)
                && job.next_write.load(Ordering::Acquire) != slot.offset
            {
                slot.awaiting_turn = true;
                self.waiting += 1;
                return;
            } else {
                self.start_writes(si);
                return;
            }
        } else {
            slot.pending &= !(1u64 << op);
        }
        let slot = &self.slots[si];
        if !slot.reading && slot.pending == 0 && !slot.awaiting_turn {
            self.finish_chunk(si);
        }
    }

    fn finish_chunk(&mut self, si: usize) {
        let slot = &mut self.slots[si];
        let Some(job) = slot.job.take() else { return };
        if slot.retry_at.take().is_some() {
            self.waiting -= 1;
        }
        slot.retry_ops.clear();
        if job.flags.contains(Flags::WRITE_SEQUENTIAL) {
            // The next chunk's turn comes even when this one failed.
            job.next_write
                .store(slot.offset + slot.len as u64, Ordering::Release);
        }
        job.client.pages.give(&mut slot.pages);
        let (len, ok) = (slot.len, slot.ok);
        self.free.push(si);
        job.chunk_ended(len, ok);
    }

    /// Gives up on queues with a command past its timeout: the controller is disabled (so
    /// no buffer of ours is written after this), and every command of ours on it fails.
    fn check_timeouts(&mut self) {
        for ci in 0..self.queues.len() {
            let expired = self.queues[ci]
                .as_ref()
                .is_some_and(|q| q.expired().is_some());
            if !expired {
                continue;
            }
            let msg = match self.queues[ci].as_mut().map(|q| q.abandon()) {
                Some(Err(e)) => e.to_string(),
                _ => format!(
                    "{}: a command timed out",
                    self.shared.controllers[ci].name()
                ),
            };
            for si in 0..self.slots.len() {
                let Some(job) = self.slots[si].job.clone() else {
                    continue;
                };
                let waiting_ops = &self.slots[si].retry_ops;
                let read_here = matches!(job.kind, JobKind::Copy { from } if from.ctrl == ci);
                if self.slots[si].reading && read_here && !waiting_ops.contains(&OP_READ) {
                    self.settle(si, OP_READ, OpEnd::Failed(msg.clone()));
                }
                for d in 0..job.to.len() {
                    let slot = &self.slots[si];
                    if slot.job.is_some()
                        && slot.pending >> d & 1 == 1
                        && job.to[d].ctrl == ci
                        && !slot.retry_ops.contains(&(d as u8))
                    {
                        self.settle(si, d as u8, OpEnd::Failed(msg.clone()));
                    }
                }
            }
        }
    }
}

fn low_bits(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}
