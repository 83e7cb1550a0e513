//! A job, as kcopyd has them: one source region (or none, for `zero`) copied to up to 64
//! destinations, cut into chunks that reactors pull from a shared cursor (kcopyd's pull
//! model). The chunk grid is fixed: cell `i` covers bytes `[i * chunk, (i + 1) * chunk)` of
//! the job, and a job may be limited to a set of cells (a resumed copy). When the cursor is
//! spent (or an error or a cancel stopped it) and no chunk is in flight, one reactor sends
//! a Flush to every destination; when every Flush has completed the callback runs once,
//! on that reactor, with `read_err` and a `write_err` bit per destination (dm-kcopyd's
//! `fn(read_err, write_err, context)`). A destination whose Flush failed has its bit set.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::endpoint::Volume;

use crate::client::ClientShared;
use crate::digest::{DigestKind, Digester};
use crate::region::Region;

/// One bit per destination, bit i for `to[i]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct DestMask(pub u64);

impl DestMask {
    /// Marks destination `i`.
    pub fn set(&mut self, i: usize) {
        self.0 |= 1 << i;
    }
    /// Whether destination `i` is marked.
    pub fn contains(self, i: usize) -> bool {
        self.0 >> i & 1 == 1
    }
    /// Whether any destination is marked.
    pub fn any(self) -> bool {
        self.0 != 0
    }
    /// Destinations marked.
    pub fn count(self) -> u32 {
        self.0.count_ones()
    }
    /// The first `n` destinations.
    pub fn first(n: usize) -> DestMask {
        DestMask(if n >= 64 { u64::MAX } else { (1u64 << n) - 1 })
    }
    /// Destinations in `self` but not in `other`.
    pub fn without(self, other: DestMask) -> DestMask {
        DestMask(self.0 & !other.0)
    }
}

/// Job flags, as kcopyd's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(u32);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Keep going past failed chunks and report at the end (DM_KCOPYD_IGNORE_ERROR).
    /// Without it, the first error stops new chunks from being dispatched.
    pub const IGNORE_ERRORS: Flags = Flags(1);
    /// Each destination receives its writes in LBA order, one chunk at a time
    /// (DM_KCOPYD_WRITE_SEQ, for zoned drives).
    ///
    /// With IGNORE_ERRORS as well, both hold. dm-kcopyd drops IGNORE_ERROR under
    /// WRITE_SEQ, because a skipped write would leave a hole that a zone's write pointer
    /// cannot jump. nvcopy keeps going instead: a chunk that failed still takes its turn,
    /// so every later write still lands in offset order, and the failed chunk's
    /// destinations are reported in `write_err` (tests/engine_recovery.rs,
    /// `write_sequential_with_a_read_error_finishes_in_lba_order`). On a zoned
    /// destination the writes after the hole then fail, and are reported too.
    pub const WRITE_SEQUENTIAL: Flags = Flags(2);

    /// Whether every flag of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

/// How a job ended: what the callback was told, plus counts for reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobOutcome {
    /// Some chunk could not be read from the source.
    pub read_err: bool,
    /// Destinations where some write, or the final Flush, failed.
    pub write_err: DestMask,
    /// Bytes of the job whose chunks ended without any error (in this run).
    pub bytes_ok: u64,
    /// Chunks that had an error.
    pub failed_chunks: u64,
    /// The first error, in words.
    pub first_error: Option<String>,
    /// The job was cancelled ([`crate::JobHandle::cancel`]) before every chunk was
    /// dispatched; the flushes still ran.
    pub cancelled: bool,
    /// Controller resets during the job, as `(engine controller index, resets)`, for the
    /// controllers that needed any.
    pub resets: Vec<(usize, u64)>,
    /// The digest of the source region, when asked for and every chunk was read.
    pub digest: Option<String>,
    /// A verify job's findings: chunks of a destination that differ from the source.
    pub mismatches: Vec<Mismatch>,
}

/// A chunk of a destination that differs from the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// Index of the destination.
    pub destination: usize,
    /// Byte offset of the chunk within the job's regions.
    pub offset: u64,
    /// Bytes in the chunk.
    pub len: u64,
}

/// Most mismatches a verify job lists (it counts them all as errors).
pub const MAX_MISMATCHES: usize = 1024;

/// One hash per cell of a job's grid, taken when the source chunk was read, for a verify
/// job to compare the destinations against.
#[derive(Debug)]
pub struct ChunkHashes {
    chunk: usize,
    hash: Vec<AtomicU64>,
    valid: Vec<AtomicBool>,
}

impl ChunkHashes {
    fn new(cells: u64, chunk: usize) -> ChunkHashes {
        ChunkHashes {
            chunk,
            hash: (0..cells).map(|_| AtomicU64::new(0)).collect(),
            valid: (0..cells).map(|_| AtomicBool::new(false)).collect(),
        }
    }
    /// Bytes per cell.
    pub fn chunk(&self) -> usize {
        self.chunk
    }
    /// Cells.
    pub fn cells(&self) -> u64 {
        self.hash.len() as u64
    }
    /// The hash of cell `i`, if its source chunk was read.
    pub fn get(&self, i: u64) -> Option<u64> {
        let i = i as usize;
        self.valid
            .get(i)?
            .load(Ordering::Acquire)
            .then(|| self.hash[i].load(Ordering::Relaxed))
    }
    pub(crate) fn set(&self, i: u64, h: u64) {
        if let (Some(v), Some(slot)) = (self.valid.get(i as usize), self.hash.get(i as usize)) {
            slot.store(h, Ordering::Relaxed);
            v.store(true, Ordering::Release);
        }
    }
}

/// The completion callback: `(read_err, write_err)`.
pub type Callback = Box<dyn FnOnce(bool, DestMask) + Send + 'static>;

/// What a job does.
#[derive(Debug)]
pub enum JobKind {
    /// Read `from` once per chunk and write it to every destination.
    Copy {
        /// The source.
        from: Region,
    },
    /// Write zeroes to every destination.
    Zero,
    /// No data: only the Flush of every destination (a checkpoint: what completed before
    /// it was submitted is durable when it ends).
    Flush,
    /// Read every destination back and compare each chunk's hash with the source's.
    Verify {
        /// The source's hashes.
        hashes: Arc<ChunkHashes>,
    },
}

/// Where one cell of the grid stands, for the progress map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellState {
    /// Not tried in this job (not dispatched yet, not in the job's set, or in flight).
    Untried,
    /// Copied to every destination.
    Done,
    /// Some command of it failed.
    Failed,
}

const CELL_UNTRIED: u8 = 0;
const CELL_DONE: u8 = 1;
const CELL_FAILED: u8 = 2;

/// Everything decided about a job before it starts.
#[derive(Debug)]
pub(crate) struct JobPlan {
    pub kind: JobKind,
    pub to: Vec<Region>,
    pub flags: Flags,
    pub chunk: usize,
    /// See [`Job::max_live`].
    pub max_live: u32,
    pub len: u64,
    pub offloaded: DestMask,
    pub write_zeroes: DestMask,
    pub src_vol: Option<Volume>,
    pub dst_vol: Vec<Volume>,
    /// Destinations where all-zero chunks become holes (`--sparse`).
    pub sparse: DestMask,
    /// Destinations that could (they deallocate to zeroes).
    pub holes: DestMask,
    /// Only these cells (None: all).
    pub todo: Option<Vec<bool>>,
    /// Keep a state per cell, for a progress map.
    pub track_cells: bool,
    /// Each controller's reset generation when the job was planned, by engine index.
    pub base_gen: Vec<u64>,
    /// Keep a hash of every source chunk read.
    pub hash_chunks: bool,
    /// Compute this digest of the source, in order.
    pub digest: Option<DigestKind>,
}

/// How a claim went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// A chunk: its cell of the grid, byte offset within the job, length, and for a
    /// verify job the destination it reads.
    Chunk {
        cell: u64,
        offset: u64,
        len: usize,
        way: u8,
    },
    /// Nothing left to claim. `flush`: this caller is the one that must now flush the
    /// destinations and finish the job.
    Spent { flush: bool },
}

/// A job in flight. Shared by the client and every reactor working on it.
pub struct Job {
    pub(crate) kind: JobKind,
    pub(crate) src_vol: Option<Volume>,
    pub(crate) dst_vol: Vec<Volume>,
    /// Destinations where all-zero chunks become holes (`--sparse`).
    pub(crate) sparse: DestMask,
    pub(crate) to: Vec<Region>,
    pub(crate) flags: Flags,
    /// Bytes per chunk; a multiple of every block size involved, and of 4 KiB.
    pub(crate) chunk: usize,
    /// Chunks of the job one reactor keeps in flight at most (EngineOptions::inflight).
    pub(crate) max_live: u32,
    pub(crate) len: u64,
    /// Destinations served by the NVMe Copy command instead of data movement.
    pub(crate) offloaded: DestMask,
    /// Destinations zeroed with Write Zeroes rather than writes from the zero page.
    pub(crate) write_zeroes: DestMask,
    pub(crate) client: Arc<ClientShared>,
    pub(crate) base_gen: Vec<u64>,
    /// Hashes of the source chunks read, when asked for.
    pub(crate) hashes: Option<Arc<ChunkHashes>>,
    /// The digest of the source, fed in order by the job's one reactor.
    digest: Option<Mutex<Option<Digester>>>,
    mismatches: Mutex<Vec<Mismatch>>,
    /// Claims per cell of the grid: the number of destinations for a verify job (each
    /// reads one), else 1.
    ways: u64,
    cells: u64,
    todo: Option<Vec<bool>>,
    cell_states: Option<Vec<AtomicU8>>,
    /// Next cell to consider.
    cursor: AtomicU64,
    /// Chunks claimed and not finished. Raised before the cursor moves, so that "cursor
    /// spent and nothing in flight" can only be seen once the last chunk really ended.
    in_flight: AtomicUsize,
    /// Set when an error ends dispatch (no IGNORE_ERRORS), or on cancel.
    stopped: AtomicBool,
    cancelled: AtomicBool,
    /// Set by the one caller that starts the flushes.
    flushing: AtomicBool,
    finished: AtomicBool,
    read_err: AtomicBool,
    write_err: AtomicU64,
    bytes_ok: AtomicU64,
    bytes_done: AtomicU64,
    failed_chunks: AtomicU64,
    first_error: Mutex<Option<String>>,
    callback: Mutex<Option<Callback>>,
    outcome: Mutex<Option<JobOutcome>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("kind", &self.kind)
            .field("to", &self.to)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Job {
    pub(crate) fn new(plan: JobPlan, client: Arc<ClientShared>, callback: Callback) -> Job {
        let grid = plan.len.div_ceil(plan.chunk.max(1) as u64);
        let ways = match plan.kind {
            JobKind::Verify { .. } => plan.to.len().max(1) as u64,
            _ => 1,
        };
        let cells = grid * ways;
        Job {
            hashes: plan
                .hash_chunks
                .then(|| Arc::new(ChunkHashes::new(grid, plan.chunk))),
            digest: plan.digest.map(|k| Mutex::new(Some(Digester::new(k)))),
            mismatches: Mutex::new(Vec::new()),
            ways,
            kind: plan.kind,
            src_vol: plan.src_vol,
            dst_vol: plan.dst_vol,
            sparse: plan.sparse,
            to: plan.to,
            flags: plan.flags,
            chunk: plan.chunk,
            max_live: plan.max_live,
            len: plan.len,
            offloaded: plan.offloaded,
            write_zeroes: plan.write_zeroes,
            client,
            base_gen: plan.base_gen,
            cells,
            todo: plan.todo,
            cell_states: plan
                .track_cells
                .then(|| (0..cells).map(|_| AtomicU8::new(CELL_UNTRIED)).collect()),
            cursor: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            flushing: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            read_err: AtomicBool::new(false),
            write_err: AtomicU64::new(0),
            bytes_ok: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            failed_chunks: AtomicU64::new(0),
            first_error: Mutex::new(None),
            callback: Mutex::new(Some(callback)),
            outcome: Mutex::new(None),
        }
    }

    /// Total bytes of the job.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether the job moves no data (a Flush job).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes whose chunks have ended, with or without error: the job's progress.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done.load(Ordering::Relaxed)
    }
    /// Bytes of this job's set of cells (all of them, unless it resumes a map).
    pub fn bytes_todo(&self) -> u64 {
        match &self.todo {
            None => self.len,
            Some(t) => (0..self.cells)
                .filter(|&c| t[c as usize])
                .map(|c| self.cell_len(c) as u64)
                .sum(),
        }
    }
    /// The source chunks' hashes, when the job was asked to keep them.
    pub fn hashes(&self) -> Option<&Arc<ChunkHashes>> {
        self.hashes.as_ref()
    }
    /// Whether the job computes an in-order digest of its source.
    pub(crate) fn wants_digest(&self) -> bool {
        self.digest.is_some()
    }
    /// Feeds the digest the next chunk of the source, in order; `None` when that chunk
    /// could not be read, which leaves the job without a digest.
    pub(crate) fn feed_digest(&self, data: Option<&[u8]>) {
        if let Some(d) = &self.digest {
            let mut d = d.lock().unwrap_or_else(PoisonError::into_inner);
            match data {
                Some(bytes) => {
                    if let Some(h) = d.as_mut() {
                        h.update(bytes);
                    }
                }
                None => *d = None,
            }
        }
    }
    /// Records a destination chunk that differs from the source.
    pub(crate) fn note_mismatch(&self, m: Mismatch, name: impl FnOnce() -> String) {
        let mut list = self
            .mismatches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if list.len() < MAX_MISMATCHES {
            list.push(m);
        }
        drop(list);
        self.note_error(false, Some(m.destination), || {
            format!(
                "{}: bytes {}..{} differ from the source",
                name(),
                m.offset,
                m.offset + m.len
            )
        });
    }
    /// Whether the callback has run.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
    /// The outcome, once finished.
    pub fn outcome(&self) -> Option<JobOutcome> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    /// Bytes per cell of the grid.
    pub fn chunk(&self) -> usize {
        self.chunk
    }
    /// Cells in the grid.
    pub fn cells(&self) -> u64 {
        self.cells
    }
    /// Where cell `i` stands, if the job keeps cell states.
    pub fn cell_state(&self, i: u64) -> Option<CellState> {
        let v = self
            .cell_states
            .as_ref()?
            .get(i as usize)?
            .load(Ordering::Acquire);
        Some(match v {
            CELL_DONE => CellState::Done,
            CELL_FAILED => CellState::Failed,
            _ => CellState::Untried,
        })
    }

    /// Stops dispatching new chunks; those in flight finish, the destinations are flushed,
    /// and the callback runs with [`JobOutcome::cancelled`] set.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.stopped.store(true, Ordering::Release);
    }

    /// Fails the job because its client can no longer hold one chunk: pages were
    /// quarantined after a controller could not be proven quiet.
    pub(crate) fn fail_for_pages(&self, want: usize, usable: usize) {
        for d in 0..self.to.len() {
            self.note_error(false, Some(d), || {
                format!(
                    "a chunk needs {want} pages but only {usable} of the client's pages can still be used: the rest are quarantined because a controller could not be proven to have stopped writing them; restart nvcopy (a new process gets new memory)"
                )
            });
        }
        self.stopped.store(true, Ordering::Release);
    }

    fn cell_len(&self, cell: u64) -> usize {
        let off = (cell / self.ways) * self.chunk as u64;
        self.chunk.min((self.len - off) as usize)
    }

    /// Whether a chunk may still be claimed.
    pub(crate) fn has_more(&self) -> bool {
        !self.stopped.load(Ordering::Relaxed) && self.cursor.load(Ordering::Relaxed) < self.cells
    }

    fn next_todo(&self, from: u64) -> Option<u64> {
        match &self.todo {
            None => (from < self.cells).then_some(from),
            Some(t) => (from..self.cells).find(|&c| t[c as usize]),
        }
    }

    /// Claims the next chunk, or says that none is left (and whether this caller is to
    /// flush and finish the job).
    pub(crate) fn claim(&self) -> Claim {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let mut cur = self.cursor.load(Ordering::Acquire);
        let claimed = loop {
            if self.stopped.load(Ordering::Acquire) {
                break None;
            }
            let Some(cell) = self.next_todo(cur) else {
                self.cursor.fetch_max(self.cells, Ordering::AcqRel);
                break None;
            };
            match self.cursor.compare_exchange_weak(
                cur,
                cell + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break Some(cell),
                Err(now) => cur = now,
            }
        };
        match claimed {
            Some(cell) => Claim::Chunk {
                cell,
                offset: (cell / self.ways) * self.chunk as u64,
                len: self.cell_len(cell),
                way: (cell % self.ways) as u8,
            },
            None => {
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                Claim::Spent {
                    flush: self.begin_flush(),
                }
            }
        }
    }

    /// Records an error on a chunk; stops dispatch unless IGNORE_ERRORS.
    pub(crate) fn note_error(
        &self,
        read: bool,
        dest: Option<usize>,
        message: impl FnOnce() -> String,
    ) {
        if read {
            self.read_err.store(true, Ordering::Relaxed);
        }
        if let Some(d) = dest {
            self.write_err.fetch_or(1 << d, Ordering::Relaxed);
        }
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(message());
        }
        drop(first);
        if !self.flags.contains(Flags::IGNORE_ERRORS) {
            self.stopped.store(true, Ordering::Release);
        }
    }

    /// The chunk of `cell` has ended; `ok` when it had no error. Returns true when the
    /// caller must now flush the destinations and then [`Job::finish`].
    pub(crate) fn chunk_ended(&self, cell: u64, len: usize, ok: bool) -> bool {
        if ok {
            self.bytes_ok.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            self.failed_chunks.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = self.cell_states.as_ref().and_then(|s| s.get(cell as usize)) {
            c.store(if ok { CELL_DONE } else { CELL_FAILED }, Ordering::Release);
        }
        self.bytes_done.fetch_add(len as u64, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.begin_flush()
    }

    /// True for exactly one caller, once nothing is left to claim and nothing is in
    /// flight.
    fn begin_flush(&self) -> bool {
        let spent = self.stopped.load(Ordering::Acquire)
            || self.cursor.load(Ordering::Acquire) >= self.cells;
        spent
            && self.in_flight.load(Ordering::Acquire) == 0
            && !self.flushing.swap(true, Ordering::AcqRel)
    }

    /// After the flushes: records the outcome and runs the callback, once.
    pub(crate) fn finish(&self, resets: Vec<(usize, u64)>) {
        if self.finished.load(Ordering::Acquire) {
            return;
        }
        let outcome = JobOutcome {
            read_err: self.read_err.load(Ordering::Acquire),
            write_err: DestMask(self.write_err.load(Ordering::Acquire)),
            bytes_ok: self.bytes_ok.load(Ordering::Acquire),
            failed_chunks: self.failed_chunks.load(Ordering::Acquire),
            first_error: self
                .first_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            cancelled: self.cancelled.load(Ordering::Acquire),
            resets,
            digest: self.digest.as_ref().and_then(|d| {
                let d = d.lock().unwrap_or_else(PoisonError::into_inner).take()?;
                // A digest of part of the source names nothing: only whole reads count.
                let whole = !self.read_err.load(Ordering::Acquire)
                    && !self.cancelled.load(Ordering::Acquire);
                whole.then(|| d.finish())
            }),
            mismatches: std::mem::take(
                &mut *self
                    .mismatches
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            ),
        };
        let (read_err, write_err) = (outcome.read_err, outcome.write_err);
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        let cb = self
            .callback
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(cb) = cb {
            cb(read_err, write_err);
        }
        // After the callback, so that a waiter sees everything the callback did.
        self.finished.store(true, Ordering::Release);
        self.client.job_finished();
    }
}
