//! A job, as kcopyd has them: one source region (or none, for `zero`) copied to up to 64
//! destinations, cut into chunks that reactors pull from a shared cursor. The job ends when
//! the cursor is spent (or an error stopped it) and no chunk is in flight; then its callback
//! runs once, on the reactor that finished the last chunk, with `read_err` and a
//! `write_err` bit per destination (dm-kcopyd's `fn(read_err, write_err, context)`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use nvcopy_nvme::Namespace;

use crate::client::ClientShared;
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
    /// Destinations where some write failed.
    pub write_err: DestMask,
    /// Bytes of the job whose chunks ended without any error.
    pub bytes_ok: u64,
    /// Chunks that had an error.
    pub failed_chunks: u64,
    /// The first error, in words.
    pub first_error: Option<String>,
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
}

/// Everything decided about a job before it starts.
#[derive(Debug)]
pub(crate) struct JobPlan {
    pub kind: JobKind,
    pub to: Vec<Region>,
    pub flags: Flags,
    pub chunk: usize,
    pub len: u64,
    pub offloaded: DestMask,
    pub write_zeroes: DestMask,
    pub src_ns: Option<Namespace>,
    pub dst_ns: Vec<Namespace>,
}

/// A job in flight. Shared by the client and every reactor working on it.
pub struct Job {
    pub(crate) kind: JobKind,
    pub(crate) src_ns: Option<Namespace>,
    pub(crate) dst_ns: Vec<Namespace>,
    pub(crate) to: Vec<Region>,
    pub(crate) flags: Flags,
    /// Bytes per chunk; a multiple of every block size involved, and of 4 KiB.
    pub(crate) chunk: usize,
    pub(crate) len: u64,
    /// Destinations served by the NVMe Copy command instead of data movement.
    pub(crate) offloaded: DestMask,
    /// Destinations zeroed with Write Zeroes rather than writes from the zero page.
    pub(crate) write_zeroes: DestMask,
    pub(crate) client: Arc<ClientShared>,
    /// Next byte to hand out.
    cursor: AtomicU64,
    /// Chunks claimed and not finished. Raised before the cursor moves, so that "cursor
    /// spent and nothing in flight" can only be seen once the last chunk really ended.
    in_flight: AtomicUsize,
    /// Set when an error ends dispatch (no IGNORE_ERRORS).
    stopped: AtomicBool,
    finished: AtomicBool,
    /// For WRITE_SEQUENTIAL: the offset whose chunk may write next.
    pub(crate) next_write: AtomicU64,
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
        Job {
            kind: plan.kind,
            src_ns: plan.src_ns,
            dst_ns: plan.dst_ns,
            to: plan.to,
            flags: plan.flags,
            chunk: plan.chunk,
            len: plan.len,
            offloaded: plan.offloaded,
            write_zeroes: plan.write_zeroes,
            client,
            cursor: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            next_write: AtomicU64::new(0),
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
    /// Whether the job is empty (never: empty jobs are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes whose chunks have ended, with or without error: the job's progress.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done.load(Ordering::Relaxed)
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

    /// Whether a chunk may still be claimed.
    pub(crate) fn has_more(&self) -> bool {
        !self.stopped.load(Ordering::Relaxed) && self.cursor.load(Ordering::Relaxed) < self.len
    }

    /// Claims the next chunk: `(offset, len)` within the job, or None when none is left.
    /// A None may finish the job, so the caller passes it on to `chunk_ended` semantics
    /// through [`Job::maybe_finish`].
    pub(crate) fn claim(&self) -> Option<(u64, usize)> {
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let off = self.cursor.fetch_add(self.chunk as u64, Ordering::AcqRel);
        if off >= self.len || self.stopped.load(Ordering::Relaxed) {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.maybe_finish();
            return None;
        }
        Some((off, self.chunk.min((self.len - off) as usize)))
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

    /// A chunk of `len` bytes has ended; `ok` when it had no error. Returns true when this
    /// ended the job (the callback has then run).
    pub(crate) fn chunk_ended(&self, len: usize, ok: bool) -> bool {
        if ok {
            self.bytes_ok.fetch_add(len as u64, Ordering::Relaxed);
        } else {
            self.failed_chunks.fetch_add(1, Ordering::Relaxed);
        }
        self.bytes_done.fetch_add(len as u64, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.maybe_finish()
    }

    /// Runs the callback if the job is over; true if this call did it.
    pub(crate) fn maybe_finish(&self) -> bool {
        let spent =
            self.stopped.load(Ordering::Acquire) || self.cursor.load(Ordering::Acquire) >= self.len;
        if !spent || self.in_flight.load(Ordering::Acquire) != 0 {
            return false;
        }
        if self.finished.swap(true, Ordering::AcqRel) {
            return false;
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
        self.client.job_finished();
        true
    }
}
