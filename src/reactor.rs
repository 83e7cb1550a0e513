//! A reactor: one polling loop on one core, with one queue pair per controller.
//!
//! Each pass follows kcopyd's order (dm-kcopyd's `do_work`: complete jobs, then jobs
//! waiting for pages, then new I/O):
//! 1. read the clock once (the vDSO: no syscall);
//! 2. take new jobs from the inbox;
//! 3. reap completions from every queue, and settle their commands (this frees pages and
//!    slots);
//! 4. issue the retries whose time has come (a time-ordered heap);
//! 5. pull new chunks from the jobs' cursors into free slots, round robin over the jobs;
//! 6. ring one doorbell per queue that has new entries;
//! 7. every millisecond of reactor time, whatever else is going on: look for commands
//!    past their deadline, for reset controllers, and (less often) for CSTS.CFS, and
//!    recover (reset the controller, fail every outstanding command through the normal
//!    completion path, reissue within the job's reset budget).
//!
//! A chunk's state is a [`Chunk`]; its transitions live in `chunk.rs`. A job's Flush
//! commands, after its last chunk, are a [`Chunk`] too, held by the job's entry in the
//! reactor's job table. Everything the loop touches is allocated before it starts, and it
//! makes no syscalls while it has work; it sleeps only when idle.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_vfio::{DmaBuf, Iova, PAGE_SIZE};

use crate::chunk::{bits, Chunk, Cmd, Completed, Effects, Op, Outcome, Plan, RetryPolicy, Token};
use crate::endpoint::{Command, Done, Endpoint, Pages, Recovery, Refused};
use crate::engine::EngineShared;
use crate::error::Result;
use crate::job::{Claim, DestMask, Flags, Job, JobKind};

/// Completions reaped per queue per pass.
const CQ_BATCH: usize = 64;
/// How often deadlines and reset controllers are looked for.
const HEALTH_INTERVAL: Duration = Duration::from_millis(1);
/// How often CSTS is read for a fatal status while commands are outstanding (an MMIO
/// read, which traps under emulation).
const FATAL_INTERVAL: Duration = Duration::from_millis(50);
/// Jobs one reactor works on at once.
const JOBS: usize = 1024;

/// Who a command belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    /// The chunk in this slot.
    Slot(u16),
    /// The flushes of the job at this index of the job table.
    Job(u16),
}

impl Owner {
    fn token(self, op: Op) -> u64 {
        match (self, op) {
            (Owner::Job(job), op) => Token::Flush {
                job,
                dest: op.dest().unwrap_or(0) as u8,
            },
            (Owner::Slot(slot), op) => Token::Chunk { slot, op },
        }
        .encode()
    }

    fn of(token: u64) -> Option<(Owner, Op)> {
        match Token::decode(token)? {
            Token::Chunk { slot, op } => Some((Owner::Slot(slot), op)),
            Token::Flush { job, dest } => Some((Owner::Job(job), Op::Flush(dest))),
        }
    }
}

/// A chunk slot: the chunk's state, where it lies, and its pages.
struct Slot {
    chunk: Chunk,
    job: u16,
    cell: u64,
    offset: u64,
    len: usize,
    pages: Vec<u32>,
    iovas: Vec<Iova>,
    /// Copy-command source ranges; the same for every offloaded destination of the chunk.
    descs: DmaBuf,
    /// A command of this chunk was outstanding on a controller that could not be proven
    /// quiet: its pages must never be reused.
    quarantine: bool,
    /// For a verify job: the destination this chunk reads.
    way: u8,
    /// The data did not match the source's hash (verify).
    mismatch: bool,
    /// Ended, but waits for the chunks before it to feed the job's digest in order.
    deferred: bool,
    /// The data read is all zeroes (looked at only for jobs with `--sparse` destinations).
    all_zero: bool,
    /// The job looks at the data once read ([`ActiveJob::looks`]).
    looks: bool,
}

/// A job this reactor works on.
struct ActiveJob {
    job: Arc<Job>,
    /// Slots holding chunks of the job.
    live: u32,
    /// WRITE_SEQUENTIAL: the job's slots in offset order; the first has the turn.
    order: VecDeque<u16>,
    /// Chunks may still be claimed.
    claimable: bool,
    /// This reactor flushes the job's destinations and then finishes it.
    flush: Option<Chunk>,
    /// The job looks at a chunk's data once it is read (hashes it, or looks for zeroes):
    /// decided once here rather than after every read.
    looks: bool,
    /// How each chunk of the job starts: the same for all of them ([`chunk_plan`]).
    plan: Plan,
    /// WRITE_SEQUENTIAL.
    sequential: bool,
    /// The job digests its source, in offset order ([`Job::wants_digest`]).
    digest: bool,
}

pub(crate) struct Reactor {
    id: usize,
    shared: Arc<EngineShared>,
    queues: Vec<Option<Box<dyn Endpoint>>>,
    jobs: Vec<Option<ActiveJob>>,
    free_jobs: Vec<u16>,
    /// Job table indexes with chunks left to claim, for round robin.
    claimable: Vec<u16>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    retries: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The completions of one pass, every endpoint's in turn, polled straight in.
    events: Vec<Done>,
    /// Which endpoint each run of `events` came from: (queue index, end of its run).
    runs: Vec<(usize, usize)>,
    aborted: Vec<Done>,
    zero_iovas: Vec<Iova>,
    // Keeps the shared zero page alive for `zero_iovas`.
    _zero_page: DmaBuf,
    /// Per controller: how often a command may be retried and how long it may take,
    /// retries included.
    policies: Vec<RetryPolicy>,
    /// Per controller: what last made this reactor reset it, for error messages.
    faults: Vec<String>,
    /// A chunk's data copied out of DMA memory, to hash it.
    scratch: Vec<u8>,
    now: Instant,
    next_health: Instant,
    next_fatal: Instant,
    rr: usize,
}

impl Reactor {
    pub(crate) fn new(
        id: usize,
        shared: Arc<EngineShared>,
        queues: Vec<Option<Box<dyn Endpoint>>>,
    ) -> Result<Reactor> {
        let qd = shared.opts.qd.clamp(1, u16::MAX as usize);
        let max_pages = crate::endpoint::MAX_CHUNK / PAGE_SIZE;
        let zero_page = shared.pool.alloc_zeroed(PAGE_SIZE)?;
        let slots = (0..qd)
            .map(|_| {
                Ok(Slot {
                    chunk: Chunk::default(),
                    job: 0,
                    cell: 0,
                    offset: 0,
                    len: 0,
                    pages: Vec::with_capacity(max_pages),
                    iovas: Vec::with_capacity(max_pages),
                    descs: shared.pool.alloc(PAGE_SIZE)?,
                    quarantine: false,
                    way: 0,
                    mismatch: false,
                    deferred: false,
                    all_zero: false,
                    looks: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let policies = shared
            .devices
            .iter()
            .map(|d| RetryPolicy {
                max_tries: shared.opts.retries,
                deadline: d.io_timeout(),
            })
            .collect();
        let now = Instant::now();
        Ok(Reactor {
            id,
            queues,
            jobs: (0..JOBS).map(|_| None).collect(),
            free_jobs: (0..JOBS as u16).rev().collect(),
            claimable: Vec::with_capacity(JOBS),
            free: (0..qd as u16).rev().collect(),
            retries: BinaryHeap::with_capacity(qd * 66 + JOBS),
            events: Vec::with_capacity(CQ_BATCH * shared.devices.len()),
            runs: Vec::with_capacity(shared.devices.len()),
            // One queue's trackers at most: recovery aborts one queue at a time.
            aborted: Vec::with_capacity(shared.opts.queue_entries as usize),
            zero_iovas: vec![zero_page.iova(); max_pages],
            _zero_page: zero_page,
            policies,
            faults: vec![String::new(); shared.devices.len()],
            scratch: vec![0; crate::endpoint::MAX_CHUNK],
            slots,
            shared,
            now,
            next_health: now,
            next_fatal: now,
            rr: 0,
        })
    }

    /// Polls until the engine stops. `ready` hears, once, whether the reactor could
    /// confine itself (seccomp) before it takes any work.
    pub(crate) fn run(
        mut self,
        ready: std::sync::mpsc::Sender<(usize, std::result::Result<(), String>)>,
    ) {
        if self.shared.opts.pin {
            // Pinning is a placement hint: an unpinned reactor still copies correctly.
            let _ = crate::confine::pin_current_thread(self.id);
        }
        let confined = if self.shared.opts.seccomp {
            let sockets = self.shared.devices.iter().any(|d| d.uses_sockets());
            crate::confine::confine_current_thread(crate::confine::Profile::reactor(sockets))
                .map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        let failed = confined.is_err();
        let _ = ready.send((self.id, confined));
        drop(ready);
        if failed {
            return;
        }
        if let Some(init) = self.shared.opts.reactor_init.clone() {
            init(self.id);
        }
        loop {
            self.now = Instant::now();
            self.take_inbox();
            let progressed = self.reap() | self.resume_retries() | self.dispatch();
            for q in self.queues.iter_mut().flatten() {
                q.ring();
            }
            if self.now >= self.next_health {
                self.next_health = self.now + HEALTH_INTERVAL;
                self.check_health();
            }
            if progressed {
                continue;
            }
            let busy = self.free.len() < self.slots.len() || !self.retries.is_empty();
            let jobs = self.free_jobs.len() < self.jobs.len();
            if busy {
                std::hint::spin_loop();
            } else if jobs {
                // Jobs waiting for pages that other reactors hold, or for their flushes.
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

    fn take_inbox(&mut self) {
        while !self.free_jobs.is_empty() {
            let Some(job) = self.shared.inboxes[self.id].pop() else {
                return;
            };
            let Some(ji) = self.free_jobs.pop() else {
                return;
            };
            let order = if job.flags.contains(Flags::WRITE_SEQUENTIAL) {
                VecDeque::with_capacity(self.slots.len())
            } else {
                VecDeque::new()
            };
            let looks = match &job.kind {
                JobKind::Copy { .. } => job.hashes().is_some() || job.sparse.any(),
                JobKind::Verify { .. } => true,
                JobKind::Zero | JobKind::Flush => false,
            };
            self.jobs[ji as usize] = Some(ActiveJob {
                plan: chunk_plan(&job),
                sequential: job.flags.contains(Flags::WRITE_SEQUENTIAL),
                digest: job.wants_digest(),
                job,
                live: 0,
                order,
                claimable: true,
                flush: None,
                looks,
            });
            self.claimable.push(ji);
        }
    }

    /// Reaps completions from every queue and settles their commands.
    fn reap(&mut self) -> bool {
        self.events.clear();
        self.runs.clear();
        // Every queue is reaped before any completion is settled: settling issues new
        // commands, which find the trackers these completions free.
        for (ci, q) in self.queues.iter_mut().enumerate() {
            if let Some(q) = q {
                if q.outstanding() == 0 {
                    continue;
                }
                let before = self.events.len();
                q.poll(CQ_BATCH, &mut self.events);
                if self.events.len() > before {
                    self.runs.push((ci, self.events.len()));
                }
            }
        }
        let mut start = 0;
        for r in 0..self.runs.len() {
            let (ci, end) = self.runs[r];
            for i in start..end {
                let d = self.events[i];
                let Some((owner, op)) = Owner::of(d.token) else {
                    continue;
                };
                let (how, msg) = if d.ok() {
                    (Completed::Ok, None)
                } else {
                    self.failure(ci, &d)
                };
                self.settle(owner, op, ci, how, || match msg {
                    Some(m) => m,
                    None => format!("command failed with code {:#x}", d.code),
                });
            }
            start = end;
        }
        !self.events.is_empty()
    }

    /// How a failed completion from endpoint `ci` is settled, and its description: the
    /// endpoint's to give, since only it can read its codes.
    #[cold]
    fn failure(&self, ci: usize, d: &Done) -> (Completed, Option<String>) {
        let Some(q) = self.queues[ci].as_ref() else {
            return (Completed::Failed, None);
        };
        let how = match q.retry_after(d) {
            Some(wait) => Completed::Retryable(wait),
            None => Completed::Failed,
        };
        (how, Some(q.describe(d)))
    }

    /// Issues the retries whose time has come. A retry that fails again (a queue still
    /// full) goes back on the heap for a later pass: only the entries there when the pass
    /// began are looked at.
    fn resume_retries(&mut self) -> bool {
        let mut progressed = false;
        let mut budget = self.retries.len();
        while let Some(&Reverse((at, token))) = self.retries.peek() {
            if at > self.now || budget == 0 {
                break;
            }
            budget -= 1;
            self.retries.pop();
            let Some((owner, op)) = Owner::of(token) else {
                continue;
            };
            let now = self.now;
            if let Some(chunk) = self.chunk_mut(owner) {
                let fx = chunk.retry_due(op, now);
                progressed |= fx.read || fx.dests.any();
                self.apply(owner, None, fx);
            }
        }
        progressed
    }

    /// Pulls new chunks from the jobs into free slots, round robin over the jobs.
    fn dispatch(&mut self) -> bool {
        let mut started = false;
        let n = self.claimable.len();
        let mut k = 0;
        while k < n && !self.free.is_empty() && !self.claimable.is_empty() {
            let pos = (self.rr + k) % self.claimable.len();
            let ji = self.claimable[pos];
            k += 1;
            started |= self.fill_from(ji);
        }
        self.rr = self.rr.wrapping_add(1);
        started
    }

    /// Claims chunks of job `ji` into free slots until either runs out.
    fn fill_from(&mut self, ji: u16) -> bool {
        let Some(entry) = self.jobs[ji as usize].as_ref() else {
            return false;
        };
        let job = entry.job.clone();
        let needs_pages = match job.kind {
            JobKind::Copy { .. } => {
                job.offloaded.count() < job.to.len() as u32 || job.to.is_empty()
            }
            JobKind::Verify { .. } => true,
            JobKind::Zero | JobKind::Flush => false,
        };
        let want = job.chunk.div_ceil(PAGE_SIZE);
        let mut started = false;
        while let Some(&si) = self.free.last() {
            // The job's bytes in flight on this reactor (EngineOptions::inflight).
            if self.jobs[ji as usize]
                .as_ref()
                .is_some_and(|e| e.live >= job.max_live)
            {
                break;
            }
            let slot = &mut self.slots[si as usize];
            if job.has_more() && needs_pages {
                if job.client.pages.usable() < want {
                    job.fail_for_pages(want, job.client.pages.usable());
                } else if !job
                    .client
                    .pages
                    .take(want, &mut slot.pages, &mut slot.iovas)
                {
                    // The job waits for pages; it is never failed for lack of them.
                    break;
                }
            }
            match job.claim() {
                Claim::Chunk {
                    cell,
                    offset,
                    len,
                    way,
                } => {
                    self.free.pop();
                    self.slots[si as usize].way = way;
                    self.start_chunk(si, ji, cell, offset, len);
                    started = true;
                }
                Claim::Spent { flush } => {
                    job.client.pages.give(&mut self.slots[si as usize].pages);
                    self.not_claimable(ji);
                    if flush {
                        self.start_flush(ji);
                    }
                    self.maybe_release(ji);
                    break;
                }
            }
        }
        started
    }

    fn start_chunk(&mut self, si: u16, ji: u16, cell: u64, offset: u64, len: usize) {
        let Some(entry) = self.jobs[ji as usize].as_mut() else {
            return;
        };
        let (plan, sequential) = (entry.plan, entry.sequential);
        entry.live += 1;
        let turn = if sequential || entry.digest {
            entry.order.push_back(si);
            entry.order.len() == 1
        } else {
            true
        };
        let looks = entry.looks;
        let slot = &mut self.slots[si as usize];
        slot.looks = looks;
        slot.job = ji;
        slot.cell = cell;
        slot.offset = offset;
        slot.len = len;
        slot.quarantine = false;
        slot.mismatch = false;
        slot.deferred = false;
        slot.all_zero = false;
        let fx = slot.chunk.begin(plan, turn || !sequential, self.now);
        self.apply(Owner::Slot(si), None, fx);
    }

    fn start_flush(&mut self, ji: u16) {
        let Some(entry) = self.jobs[ji as usize].as_mut() else {
            return;
        };
        let plan = Plan {
            read: false,
            now: DestMask::default(),
            after: DestMask::first(entry.job.to.len()),
            sequential: false,
        };
        let mut chunk = Chunk::default();
        let fx = chunk.begin(plan, true, self.now);
        entry.flush = Some(chunk);
        self.apply(Owner::Job(ji), None, fx);
    }

    fn not_claimable(&mut self, ji: u16) {
        if let Some(e) = self.jobs[ji as usize].as_mut() {
            e.claimable = false;
        }
        if let Some(pos) = self.claimable.iter().position(|&j| j == ji) {
            self.claimable.swap_remove(pos);
        }
    }

    /// Drops the job from the table once this reactor has nothing more to do for it.
    fn maybe_release(&mut self, ji: u16) {
        let done = self.jobs[ji as usize]
            .as_ref()
            .is_some_and(|e| !e.claimable && e.live == 0 && e.flush.is_none());
        if done {
            self.jobs[ji as usize] = None;
            self.free_jobs.push(ji);
        }
    }

    fn chunk_mut(&mut self, owner: Owner) -> Option<&mut Chunk> {
        match owner {
            Owner::Slot(si) => self
                .slots
                .get_mut(si as usize)
                .map(|s| &mut s.chunk)
                .filter(|c| c.phase() != crate::chunk::Phase::Free),
            Owner::Job(ji) => self.jobs.get_mut(ji as usize)?.as_mut()?.flush.as_mut(),
        }
    }

    fn job_of(&self, owner: Owner) -> Option<&Arc<Job>> {
        let ji = self.job_index(owner)?;
        Some(&self.jobs.get(ji as usize)?.as_ref()?.job)
    }

    /// The job-table index of the job a command belongs to.
    fn job_index(&self, owner: Owner) -> Option<u16> {
        match owner {
            Owner::Slot(si) => Some(self.slots.get(si as usize)?.job),
            Owner::Job(ji) => Some(ji),
        }
    }

    /// The controller a command of `job` goes to.
    fn ctrl_of(job: &Job, op: Op, way: u8) -> Option<usize> {
        match (op.dest(), &job.kind) {
            (Some(d), _) => job.to.get(d).map(|r| r.ctrl),
            (None, JobKind::Copy { from }) => Some(from.ctrl),
            (None, JobKind::Verify { .. }) => job.to.get(way as usize).map(|r| r.ctrl),
            (None, _) => None,
        }
    }

    fn way_of(&self, owner: Owner) -> u8 {
        match owner {
            Owner::Slot(si) => self.slots.get(si as usize).map_or(0, |s| s.way),
            Owner::Job(_) => 0,
        }
    }

    /// Records how one command ended and moves its chunk on.
    fn settle(
        &mut self,
        owner: Owner,
        op: Op,
        ci: usize,
        how: Completed,
        msg: impl FnOnce() -> String,
    ) {
        let policy = self.policies.get(ci).copied().unwrap_or(RetryPolicy {
            max_tries: self.shared.opts.retries,
            deadline: Duration::ZERO,
        });
        let now = self.now;
        let Some(chunk) = self.chunk_mut(owner) else {
            return;
        };
        // Only a command in flight moves (to a retry or to done); any other completion of
        // it is stale and changes nothing. Told by the variant, without comparing times.
        let moved = matches!(chunk.cmd(op.dest()), Cmd::InFlight { .. });
        let fx = chunk.completed(op, how, policy, now);
        if moved {
            match (chunk.cmd(op.dest()), owner) {
                (Cmd::Done(Outcome::Failed), _) => self.note_failure(owner, op, msg),
                (Cmd::Done(Outcome::Ok), Owner::Slot(si))
                    if op == Op::Read && self.slots[si as usize].looks =>
                {
                    self.read_done(si)
                }
                _ => {}
            }
        }
        self.apply(owner, Some(op), fx);
    }

    /// Records a command's failure on its job: a verify job's read is a destination's.
    fn note_failure(&self, owner: Owner, op: Op, msg: impl FnOnce() -> String) {
        let Some(job) = self.job_of(owner) else {
            return;
        };
        match (&job.kind, op) {
            (JobKind::Verify { .. }, Op::Read) => {
                job.note_error(false, Some(self.way_of(owner) as usize), msg)
            }
            _ => job.note_error(op == Op::Read, op.dest(), msg),
        }
    }

    /// A chunk's read completed, for a job that looks at the data ([`ActiveJob::looks`]):
    /// hash it where the job asks for it (the source's hash for a later verify, or a
    /// destination's to compare with it), or look for zeroes (`--sparse`).
    fn read_done(&mut self, si: u16) {
        let Some(job) = self.job_of(Owner::Slot(si)).cloned() else {
            return;
        };
        let (cell, offset, len, way) = {
            let s = &self.slots[si as usize];
            (s.cell, s.offset, s.len, s.way)
        };
        match &job.kind {
            JobKind::Copy { .. } => {
                if let Some(hashes) = job.hashes() {
                    let h = crate::digest::chunk_hash(self.chunk_data(si));
                    hashes.set(cell, h);
                }
                if job.sparse.any() {
                    let zero = self.chunk_data(si).iter().all(|&b| b == 0);
                    self.slots[si as usize].all_zero = zero;
                }
            }
            JobKind::Verify { hashes } => {
                let ways = job.to.len().max(1) as u64;
                let want = hashes.get(cell / ways);
                let got = crate::digest::chunk_hash(self.chunk_data(si));
                if want != Some(got) {
                    self.slots[si as usize].mismatch = true;
                    let name = job.to[way as usize].ctrl;
                    let name = self.shared.devices[name].name().to_string();
                    let m = crate::job::Mismatch {
                        destination: way as usize,
                        offset,
                        len: len as u64,
                    };
                    job.note_mismatch(m, || format!("destination {way} ({name})"));
                }
            }
            JobKind::Zero | JobKind::Flush => {}
        }
    }

    /// The chunk's data, copied out of its DMA pages (volatile copies; the device wrote
    /// them) into the reactor's scratch buffer.
    fn chunk_data(&mut self, si: u16) -> &[u8] {
        let s = &self.slots[si as usize];
        let len = s.len.min(self.scratch.len());
        let mut done = 0;
        for &iova in &s.iovas {
            if done >= len {
                break;
            }
            let n = PAGE_SIZE.min(len - done);
            match self.shared.pool.slice_at(iova, n) {
                Some(src) => {
                    src.copy_to(&mut self.scratch[done..done + n]);
                }
                None => self.scratch[done..done + n].fill(0),
            }
            done += n;
        }
        &self.scratch[..len]
    }

    /// Carries out what a transition asked for. `op` is the command the transition was
    /// about, for a retry it scheduled.
    ///
    /// Inlined into its callers: it runs after every transition, and a call passes the
    /// whole [`Effects`] through memory (callgrind-copier.sh: ~27 Ir per call).
    #[inline(always)]
    fn apply(&mut self, owner: Owner, op: Option<Op>, fx: Effects) {
        if let (Some(at), Some(op)) = (fx.retry_at, op) {
            self.retries.push(Reverse((at, owner.token(op))));
        }
        if fx.read {
            self.issue(owner, Op::Read);
        }
        for d in bits(fx.dests) {
            if let Some(op) = self.dest_op(owner, d) {
                self.issue(owner, op);
            }
        }
        if fx.finished {
            self.finished(owner);
        }
    }

    fn dest_op(&self, owner: Owner, d: usize) -> Option<Op> {
        let d8 = d as u8;
        Some(match owner {
            Owner::Job(_) => Op::Flush(d8),
            Owner::Slot(_) => match self.job_of(owner)? {
                job if !matches!(job.kind, JobKind::Copy { .. }) => Op::Zero(d8),
                job if job.offloaded.contains(d) => Op::Copy(d8),
                _ => Op::Write(d8),
            },
        })
    }

    /// Posts one command (the doorbell rings at the end of the pass); a command that could
    /// not be posted is settled at once.
    fn issue(&mut self, owner: Owner, op: Op) {
        // The slot and the job are looked up once, and the job is borrowed from the
        // table, not cloned out of its Arc: the borrows end before a refusal is settled
        // (out of line, with the messages: the posted command is the hot path).
        let (ji, slot) = match owner {
            Owner::Slot(si) => match self.slots.get(si as usize) {
                Some(s) => (s.job, Some(s)),
                None => return,
            },
            Owner::Job(ji) => (ji, None),
        };
        let Some(job) = self.jobs.get(ji as usize).and_then(|e| e.as_ref()) else {
            return;
        };
        let job = &*job.job;
        let Some(ci) = Self::ctrl_of(job, op, slot.map_or(0, |s| s.way)) else {
            return;
        };
        let used = self.shared.devices[ci].generation() - job.base_gen[ci];
        let refusal = if used > self.shared.opts.max_resets as u64 {
            self.given_up(ci, used)
        } else if let Some(q) = self.queues[ci].as_mut() {
            match command(job, slot, op, &self.zero_iovas) {
                Ok(cmd) => match q.submit(cmd, owner.token(op)) {
                    Ok(()) => return,
                    Err(Refused::Full) => IssueError::Full,
                    Err(Refused::Invalid(e)) => IssueError::Failed(e),
                },
                Err(e) => e,
            }
        } else {
            IssueError::Failed(format!(
                "{}: this reactor has no endpoint on the device",
                self.shared.devices[ci].name()
            ))
        };
        self.refused(owner, op, ci, refusal);
    }

    /// A command of a job that used up its resets of controller `ci`.
    #[cold]
    fn given_up(&self, ci: usize, used: u64) -> IssueError {
        IssueError::Failed(format!(
            "{}: given up for this job after {used} resets (--max-resets {}); last fault: {}",
            self.shared.devices[ci].name(),
            self.shared.opts.max_resets,
            self.faults[ci]
        ))
    }

    /// Settles a command that could not be posted.
    #[cold]
    fn refused(&mut self, owner: Owner, op: Op, ci: usize, why: IssueError) {
        match why {
            IssueError::Full => self.settle(owner, op, ci, Completed::QueueFull, String::new),
            IssueError::Failed(m) => self.settle(owner, op, ci, Completed::Failed, || m),
            IssueError::NoNamespace => self.settle(owner, op, ci, Completed::Failed, || {
                format!("{op:?} does not fit this job (a planning bug)")
            }),
        }
    }

    /// A chunk, or a job's flushes, ended.
    fn finished(&mut self, owner: Owner) {
        match owner {
            Owner::Slot(si) => self.chunk_finished(si),
            Owner::Job(ji) => {
                let Some(entry) = self.jobs[ji as usize].as_mut() else {
                    return;
                };
                entry.flush = None;
                let job = entry.job.clone();
                job.finish(self.resets_of(&job));
                self.maybe_release(ji);
            }
        }
    }

    /// A chunk ended. A job that digests its source takes its chunks' data in offset
    /// order: a chunk that ends before those ahead of it waits (keeping its pages) until
    /// they have been fed.
    fn chunk_finished(&mut self, si: u16) {
        let ji = self.slots[si as usize].job;
        let Some(entry) = self.jobs[ji as usize].as_ref() else {
            return;
        };
        if !entry.digest {
            self.release_chunk(si);
            return;
        }
        if entry.order.front() != Some(&si) {
            self.slots[si as usize].deferred = true;
            return;
        }
        let mut next = Some(si);
        while let Some(s) = next {
            let job = self.job_of(Owner::Slot(s)).cloned();
            if let Some(job) = job {
                if self.slots[s as usize].chunk.read_failed() {
                    job.feed_digest(None);
                } else {
                    job.feed_digest(Some(self.chunk_data(s)));
                }
            }
            next = self
                .release_chunk(s)
                .filter(|&n| self.slots[n as usize].deferred);
        }
    }

    /// Gives a finished chunk's pages back (or quarantines them), frees its slot, passes
    /// the WRITE_SEQUENTIAL turn on, and tells the job. Returns the slot now first in the
    /// job's line, if any.
    fn release_chunk(&mut self, si: u16) -> Option<u16> {
        let slot = &mut self.slots[si as usize];
        let ji = slot.job;
        let entry = self.jobs[ji as usize].as_mut()?;
        // Borrowed, not cloned: every use of the job is over before `apply` below.
        let job = &*entry.job;
        if slot.quarantine {
            job.client.pages.quarantine(&mut slot.pages);
        } else {
            job.client.pages.give(&mut slot.pages);
        }
        let ok = !slot.chunk.read_failed() && !slot.chunk.failed().any() && !slot.mismatch;
        let (cell, len) = (slot.cell, slot.len);
        slot.deferred = false;
        entry.live -= 1;
        let mut next = None;
        if entry.order.front() == Some(&si) {
            entry.order.pop_front();
            next = entry.order.front().copied();
        }
        self.free.push(si);
        // The job hears of this chunk before the turn passes on: the next chunk may end
        // at once (its writes refused), and its end must not be taken for the last one
        // while this one is still counted in flight.
        let flush = job.chunk_ended(cell, len, ok);
        let sequential = job.flags.contains(Flags::WRITE_SEQUENTIAL);
        if flush {
            self.start_flush(ji);
        }
        if let (Some(n), true) = (next, sequential) {
            let fx = self.slots[n as usize].chunk.turn(self.now);
            self.apply(Owner::Slot(n), None, fx);
        }
        self.maybe_release(ji);
        next
    }

    /// The resets each controller of the job needed during it (no allocation when none).
    fn resets_of(&self, job: &Job) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for (c, ctrl) in self.shared.devices.iter().enumerate() {
            let used = matches!(job.kind, JobKind::Copy { from } if from.ctrl == c)
                || job.to.iter().any(|r| r.ctrl == c);
            let n = ctrl.generation() - job.base_gen[c];
            if used && n > 0 {
                out.push((c, n));
            }
        }
        out
    }

    /// Every millisecond: recover queues of controllers another reactor reset, and reset
    /// controllers with a command past its deadline or a fatal status. Out of line: it runs
    /// once a millisecond, not per pass, and scripts/callgrind-copier.sh leaves it out of
    /// its per-chunk count by name.
    #[inline(never)]
    fn check_health(&mut self) {
        let fatal_due = self.now >= self.next_fatal;
        if fatal_due {
            self.next_fatal = self.now + FATAL_INTERVAL;
        }
        // A reset can keep this thread away from its other queues for up to CAP.TO; their
        // completions are reaped before their deadlines are judged again.
        let mut reset_done = false;
        for ci in 0..self.queues.len() {
            let Some(q) = self.queues[ci].as_ref() else {
                continue;
            };
            if q.is_stale() {
                if let Some(f) = q.fault() {
                    self.faults[ci] = f;
                }
                // A reconnect can take up to its I/O timeout: the other queues'
                // completions are reaped before their deadlines are judged again.
                self.recover(ci);
                self.now = Instant::now();
                reset_done = true;
                continue;
            }
            if reset_done || !q.is_usable() || q.outstanding() == 0 {
                continue;
            }
            let ctrl = &self.shared.devices[ci];
            let fault = if let Some(late) = q.expired(self.now) {
                Some(late)
            } else if fatal_due && ctrl.fatal_status() {
                Some("controller fatal status (CSTS.CFS)".to_string())
            } else {
                None
            };
            if let Some(f) = fault {
                let gen = q.generation();
                self.faults[ci] = f;
                ctrl.reset(gen);
                self.now = Instant::now();
                self.recover(ci);
                reset_done = true;
            }
        }
    }

    /// Fails every outstanding command of the queue on controller `ci` through the normal
    /// completion path, after the controller was reset, then reissues them within each
    /// job's reset budget, or fails them for good.
    fn recover(&mut self, ci: usize) {
        let mut aborted = std::mem::take(&mut self.aborted);
        aborted.clear();
        let Some(q) = self.queues[ci].as_mut() else {
            return;
        };
        let outcome = q.recover(&mut aborted);
        // An endpoint that says why its recovery failed (a reconnect that could not be
        // made) is taken at its word: the generic "could not be reset" would only repeat
        // it less clearly.
        let mut own_words = false;
        if let (Recovery::Failed { quiet }, Some(f)) = (outcome, q.fault()) {
            self.faults[ci] = f;
            own_words = quiet;
        }
        let name = self.shared.devices[ci].name().to_string();
        for c in &aborted {
            let Some((owner, op)) = Owner::of(c.token) else {
                continue;
            };
            let Some(job) = self.job_of(owner).cloned() else {
                continue;
            };
            let used = self.shared.devices[ci].generation() - job.base_gen[ci];
            let max = self.shared.opts.max_resets as u64;
            let why = match outcome {
                Recovery::Reissue if used <= max => None,
                Recovery::Reissue => Some(format!(
                    "reset {used} times during this job, more than --max-resets {max}"
                )),
                Recovery::Failed { quiet: true } => Some("could not be reset".to_string()),
                Recovery::Failed { quiet: false } => Some(
                    "could not be reset or proven quiet: the memory of its commands is quarantined for the engine's life"
                        .to_string(),
                ),
            };
            let now = self.now;
            match why {
                None => {
                    if let Some(chunk) = self.chunk_mut(owner) {
                        let fx = chunk.reissue(op, now);
                        self.apply(owner, None, fx);
                    }
                }
                Some(why) => {
                    if let (Recovery::Failed { quiet: false }, Owner::Slot(si)) = (outcome, owner) {
                        self.slots[si as usize].quarantine = true;
                    }
                    let fault = &self.faults[ci];
                    let msg = if own_words {
                        format!("{name}: {fault}")
                    } else {
                        format!("{name}: {fault}; the controller {why}")
                    };
                    let Some(chunk) = self.chunk_mut(owner) else {
                        continue;
                    };
                    let before = chunk.cmd(op.dest());
                    let fx = chunk.abort(op, now);
                    if chunk.cmd(op.dest()) != before {
                        job.note_error(op == Op::Read, op.dest(), || msg);
                    }
                    self.apply(owner, None, fx);
                }
            }
        }
        self.aborted = aborted;
    }
}

/// How every chunk of `job` starts.
fn chunk_plan(job: &Job) -> Plan {
    let all = DestMask::first(job.to.len());
    let sequential = job.flags.contains(Flags::WRITE_SEQUENTIAL);
    match job.kind {
        JobKind::Copy { .. } => Plan {
            read: job.offloaded != all || job.to.is_empty(),
            now: job.offloaded,
            after: all.without(job.offloaded),
            sequential,
        },
        JobKind::Zero | JobKind::Flush => Plan {
            read: false,
            now: DestMask::default(),
            after: all,
            sequential,
        },
        JobKind::Verify { .. } => Plan {
            read: true,
            now: DestMask::default(),
            after: DestMask::default(),
            sequential: false,
        },
    }
}

/// The command `op` is, built from the job and the chunk's slot (None for a job's
/// flushes): what to send, apart from sending it (which needs the endpoint, borrowed
/// beside these).
fn command<'a>(
    job: &'a Job,
    slot: Option<&'a Slot>,
    op: Op,
    zero_iovas: &'a [Iova],
) -> std::result::Result<Command<'a>, IssueError> {
    let (offset, len, iovas) = match slot {
        Some(s) => (
            s.offset,
            s.len,
            &s.iovas[..s.len.div_ceil(PAGE_SIZE).min(s.iovas.len())],
        ),
        None => (0, 0, &[][..]),
    };
    let at = |r: &crate::Region| r.offset + offset;
    let data = Pages { iovas, len };
    Ok(match (op, &job.kind) {
        (Op::Read, JobKind::Copy { from }) => Command::Read {
            volume: job.src_vol.as_ref().ok_or(IssueError::NoNamespace)?,
            at: at(from),
            data,
        },
        (Op::Read, JobKind::Verify { .. }) => {
            let Some(way) = slot.map(|s| s.way as usize) else {
                return Err(IssueError::NoNamespace);
            };
            Command::Read {
                volume: &job.dst_vol[way],
                at: at(&job.to[way]),
                data,
            }
        }
        (Op::Write(d), _) => {
            let (to, volume) = (&job.to[d as usize], &job.dst_vol[d as usize]);
            let hole = slot.is_some_and(|s| s.all_zero);
            if hole && job.sparse.contains(d as usize) {
                // --sparse: an all-zero chunk becomes a hole, which reads back as zeroes
                // whatever the destination held before.
                Command::Deallocate {
                    volume,
                    at: at(to),
                    len: len as u64,
                }
            } else {
                Command::Write {
                    volume,
                    at: at(to),
                    data,
                }
            }
        }
        (Op::Copy(d), JobKind::Copy { from }) => {
            let Some(s) = slot else {
                return Err(IssueError::NoNamespace);
            };
            Command::Copy {
                volume: &job.dst_vol[d as usize],
                from: at(from),
                to: at(&job.to[d as usize]),
                len: len as u64,
                descs: &s.descs,
            }
        }
        (Op::Zero(d), _) => {
            let (to, volume) = (&job.to[d as usize], &job.dst_vol[d as usize]);
            if job.write_zeroes.contains(d as usize) {
                Command::WriteZeroes {
                    volume,
                    at: at(to),
                    len: len as u64,
                }
            } else {
                let iovas = &zero_iovas[..len.div_ceil(PAGE_SIZE)];
                Command::Write {
                    volume,
                    at: at(to),
                    data: Pages { iovas, len },
                }
            }
        }
        (Op::Flush(d), _) => Command::Flush {
            volume: &job.dst_vol[d as usize],
        },
        (Op::Read | Op::Copy(_), _) => return Err(IssueError::NoNamespace),
    })
}

/// Why a command could not be posted.
enum IssueError {
    /// The queue is full: try again later.
    Full,
    /// For good, with the reason.
    Failed(String),
    /// The job has no namespace for the op (a bug in planning; fails the command).
    NoNamespace,
}
