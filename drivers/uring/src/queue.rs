//! One reactor's io_uring ring on one file or block device.
//!
//! - The engine's whole DMA pool is registered as fixed buffers (in pieces of at most
//!   1 GiB, the kernel's limit per buffer), so no page is pinned per I/O; the file is a
//!   fixed file.
//! - With SQPOLL a kernel thread takes entries off the submission ring, so a steady
//!   stream of chunks needs no system call: [`FileQueue::ring`] enters the kernel only to
//!   wake that thread once it has gone idle. All rings attach to one anchor ring's
//!   thread (IORING_SETUP_ATTACH_WQ), so there is one poller however many rings there
//!   are. Where SQPOLL is not allowed, each ring enters once per batch.
//! - Completions are reaped from the CQ ring in [`FileQueue::poll`], without a syscall.
//!
//! A command's pages need not be contiguous in memory: it becomes one SQE per run of
//! contiguous pages (a fixed-buffer read or write takes one address range), and its
//! tracker completes when every piece has. Like an NVMe queue's trackers, a tracker is
//! indexed by the CQE's user data, which is bounds-checked.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use nvcopy_vfio::{DmaPool, Iova, PAGE_SIZE};

use crate::error::{Error, Result};

/// Largest fixed buffer the kernel registers (io_uring_register(2): 1 GiB).
const BUF_MAX: usize = 1 << 30;
/// The code of a read or write that moved fewer bytes than asked: past the end of a file
/// that shrank, or a full filesystem.
pub const SHORT_TRANSFER: u32 = 1 << 16;
/// The code of a command failed by [`FileQueue::abort_all`].
pub const ABORTED: u32 = (1 << 16) + 1;
/// How long the SQPOLL thread spins without work before it sleeps.
const SQ_IDLE_MS: u32 = 1000;

/// Why a command was not posted.
#[derive(Debug)]
pub enum SubmitError {
    /// No room in the ring now.
    Full,
    /// Never: the reason.
    Invalid(String),
}

/// A completed command: the caller's token, and 0 or an errno (or [`SHORT_TRANSFER`],
/// [`ABORTED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileCompletion {
    /// Token.
    pub token: u64,
    /// 0 on success.
    pub code: u32,
}

/// What a command was, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// A read.
    Read,
    /// A write.
    Write,
    /// fallocate ZERO_RANGE.
    WriteZeroes,
    /// fallocate PUNCH_HOLE.
    Deallocate,
    /// fdatasync.
    Flush,
}

impl FileOp {
    /// The operation's name.
    pub fn name(self) -> &'static str {
        match self {
            FileOp::Read => "read",
            FileOp::Write => "write",
            FileOp::WriteZeroes => "fallocate(ZERO_RANGE)",
            FileOp::Deallocate => "fallocate(PUNCH_HOLE)",
            FileOp::Flush => "fdatasync",
        }
    }
}

/// A command past its deadline.
#[derive(Clone, Copy, Debug)]
pub struct Late {
    /// What it was.
    pub op: FileOp,
    /// Its byte offset.
    pub offset: u64,
    /// How long it has been outstanding.
    pub waited: Duration,
}

/// The ring whose SQPOLL thread every other ring shares.
pub struct Anchor {
    ring: Option<IoUring>,
}

impl std::fmt::Debug for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anchor")
            .field("sqpoll", &self.sqpoll())
            .finish()
    }
}

impl Anchor {
    /// Sets up the shared SQPOLL thread, or (where SQPOLL is not allowed) nothing, in
    /// which case rings fall back to one enter per batch.
    pub fn new(want_sqpoll: bool) -> Anchor {
        let ring = want_sqpoll
            .then(|| IoUring::builder().setup_sqpoll(SQ_IDLE_MS).build(2).ok())
            .flatten();
        Anchor { ring }
    }

    /// Whether rings get a shared SQPOLL thread.
    pub fn sqpoll(&self) -> bool {
        self.ring.is_some()
    }

    fn fd(&self) -> Option<RawFd> {
        self.ring.as_ref().map(|r| r.as_raw_fd())
    }
}

#[derive(Clone, Copy, Debug)]
struct Tracker {
    token: u64,
    /// SQEs of the command not yet completed.
    pieces: u16,
    /// First failure among its pieces.
    code: u32,
    op: FileOp,
    offset: u64,
    /// When it was handed to the kernel; None until the ring.
    since: Option<Instant>,
    busy: bool,
}

const IDLE: Tracker = Tracker {
    token: 0,
    pieces: 0,
    code: 0,
    op: FileOp::Read,
    offset: 0,
    since: None,
    busy: false,
};

/// One piece of a read or write: where in the pool, how long, which fixed buffer.
#[derive(Clone, Copy, Debug)]
struct Piece {
    host_off: usize,
    len: usize,
}

/// An io_uring ring on one file, owned by one reactor.
pub struct FileQueue {
    ring: IoUring,
    // Keeps the registered memory mapped, and the file open, while the ring lives.
    pool: DmaPool,
    _file: Arc<File>,
    base: *mut u8,
    fixed_buffers: bool,
    sqpoll: bool,
    trackers: Vec<Tracker>,
    free: Vec<u16>,
    /// Trackers posted since the last ring: their deadlines start there.
    posted: Vec<u16>,
    pieces: Vec<Piece>,
    /// SQEs handed to the kernel or queued, not yet completed (bounded by the CQ ring).
    sqes_out: usize,
    cq_entries: usize,
    outstanding: usize,
    timeout: Duration,
    enters: u64,
    /// Commands and SQEs submitted, for the pieces-per-command figure.
    commands: u64,
    sqes: u64,
    /// Set by [`FileQueue::abort_all`] when a command could not be proven finished: the
    /// ring takes no more work and its pages must never be reused.
    quarantined: bool,
}

// SAFETY: `base` points into `pool`'s mapping, which this queue keeps alive; it is only
// used to form addresses for the kernel, never dereferenced here. The ring is owned by
// one thread at a time.
unsafe impl Send for FileQueue {}

impl std::fmt::Debug for FileQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileQueue")
            .field("sqpoll", &self.sqpoll)
            .field("fixed_buffers", &self.fixed_buffers)
            .field("outstanding", &self.outstanding)
            .finish_non_exhaustive()
    }
}

impl FileQueue {
    /// A ring of `entries` commands on `file`, with `pool` registered.
    pub fn new(
        file: Arc<File>,
        pool: &DmaPool,
        entries: u16,
        anchor: &Anchor,
        timeout: Duration,
    ) -> Result<FileQueue> {
        let entries = u32::from(entries.max(2)).next_power_of_two();
        let ring_err = |what| move |source| Error::Ring { what, source };
        let mut builder = IoUring::builder();
        if let Some(fd) = anchor.fd() {
            builder.setup_sqpoll(SQ_IDLE_MS).setup_attach_wq(fd);
        }
        let ring = match builder.build(entries) {
            Ok(r) => r,
            // The anchor's thread could not be shared: a ring of its own, entered per batch.
            Err(_) if anchor.fd().is_some() => IoUring::builder()
                .build(entries)
                .map_err(ring_err("creating a ring"))?,
            Err(e) => return Err(ring_err("creating a ring")(e)),
        };
        let sqpoll = ring.params().is_setup_sqpoll();
        ring.submitter()
            .register_files(&[file.as_raw_fd()])
            .map_err(ring_err("registering the file"))?;
        let (base, size) = pool.host_region();
        let iovecs: Vec<libc::iovec> = (0..size.div_ceil(BUF_MAX))
            .map(|i| libc::iovec {
                iov_base: base.wrapping_add(i * BUF_MAX).cast(),
                iov_len: BUF_MAX.min(size - i * BUF_MAX),
            })
            .collect();
        // SAFETY: the iovecs cover exactly the pool's mapping, which `pool` (cloned into
        // the queue) keeps mapped for the ring's life; the kernel pins those pages.
        let fixed_buffers = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        let n = entries as usize;
        Ok(FileQueue {
            cq_entries: ring.params().cq_entries() as usize,
            ring,
            pool: pool.clone(),
            _file: file,
            base,
            fixed_buffers,
            sqpoll,
            trackers: vec![IDLE; n],
            free: (0..n as u16).rev().collect(),
            posted: Vec::with_capacity(n),
            pieces: Vec::with_capacity(nvcopy_vfio::HUGEPAGE_SIZE / PAGE_SIZE),
            sqes_out: 0,
            outstanding: 0,
            timeout,
            enters: 0,
            commands: 0,
            sqes: 0,
            quarantined: false,
        })
    }

    /// Whether a kernel thread polls the submission ring.
    pub fn sqpoll(&self) -> bool {
        self.sqpoll
    }
    /// Whether the pool is registered (else reads and writes pin pages per I/O).
    pub fn fixed_buffers(&self) -> bool {
        self.fixed_buffers
    }
    /// io_uring_enter calls made.
    pub fn enters(&self) -> u64 {
        self.enters
    }
    /// Commands submitted so far, and the SQEs they took.
    pub fn submitted(&self) -> (u64, u64) {
        (self.commands, self.sqes)
    }
    /// Commands outstanding.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }
    /// Whether the ring refuses work for good.
    pub fn is_quarantined(&self) -> bool {
        self.quarantined
    }

    /// Cuts `len` bytes of `pages` into runs that are contiguous in memory and within one
    /// registered buffer.
    fn cut(&mut self, pages: &[Iova], len: usize) -> std::result::Result<(), SubmitError> {
        self.pieces.clear();
        let mut left = len;
        for &iova in pages {
            if left == 0 {
                break;
            }
            let n = left.min(PAGE_SIZE);
            let off = self.pool.host_offset(iova, n).ok_or_else(|| {
                SubmitError::Invalid(format!("page at IOVA {:#x} is not in the pool", iova.0))
            })?;
            match self.pieces.last_mut() {
                Some(p) if p.host_off + p.len == off && off % BUF_MAX != 0 => p.len += n,
                _ => self.pieces.push(Piece {
                    host_off: off,
                    len: n,
                }),
            }
            left -= n;
        }
        if left != 0 {
            return Err(SubmitError::Invalid(format!(
                "{len} bytes do not fit in {} pages",
                pages.len()
            )));
        }
        Ok(())
    }

    fn take_tracker(
        &mut self,
        pieces: usize,
        op: FileOp,
        offset: u64,
        token: u64,
    ) -> std::result::Result<u16, SubmitError> {
        if self.quarantined {
            return Err(SubmitError::Invalid(
                "the ring was abandoned after a command that did not complete".into(),
            ));
        }
        let room = {
            let sq = sq_room(&mut self.ring);
            sq >= pieces && self.sqes_out + pieces <= self.cq_entries
        };
        let Some(&t) = self.free.last() else {
            return Err(SubmitError::Full);
        };
        if !room {
            return Err(SubmitError::Full);
        }
        self.free.pop();
        self.trackers[t as usize] = Tracker {
            token,
            pieces: pieces as u16,
            code: 0,
            op,
            offset,
            since: None,
            busy: true,
        };
        self.posted.push(t);
        self.outstanding += 1;
        self.sqes_out += pieces;
        self.commands += 1;
        self.sqes += pieces as u64;
        Ok(t)
    }

    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every entry's memory (pool pages, registered buffers, the fixed file)
        // stays valid until its completion: the queue holds the pool and the file, and
        // trackers are not reused before their CQEs. Room was checked in take_tracker.
        let pushed = unsafe { self.ring.submission().push(&e) };
        debug_assert!(pushed.is_ok(), "room was checked");
    }

    /// Posts a read (`write` false) or write of `len` bytes at byte `offset`.
    pub fn submit_rw(
        &mut self,
        write: bool,
        offset: u64,
        pages: &[Iova],
        len: usize,
        token: u64,
    ) -> std::result::Result<(), SubmitError> {
        self.cut(pages, len)?;
        let op = if write { FileOp::Write } else { FileOp::Read };
        let t = self.take_tracker(self.pieces.len(), op, offset, token)?;
        let mut at = offset;
        for i in 0..self.pieces.len() {
            let p = self.pieces[i];
            let addr = self.base.wrapping_add(p.host_off);
            let fd = types::Fixed(0);
            let n = p.len as u32;
            let e = match (write, self.fixed_buffers) {
                (false, true) => opcode::ReadFixed::new(fd, addr, n, (p.host_off / BUF_MAX) as u16)
                    .offset(at)
                    .build(),
                (true, true) => opcode::WriteFixed::new(fd, addr, n, (p.host_off / BUF_MAX) as u16)
                    .offset(at)
                    .build(),
                (false, false) => opcode::Read::new(fd, addr, n).offset(at).build(),
                (true, false) => opcode::Write::new(fd, addr, n).offset(at).build(),
            };
            self.push(e.user_data(user_data(t, p.len)));
            at += p.len as u64;
        }
        Ok(())
    }

    /// Posts fallocate over `len` bytes at `offset`: ZERO_RANGE (`zero`) or PUNCH_HOLE,
    /// never changing the file's size.
    pub fn submit_fallocate(
        &mut self,
        zero: bool,
        offset: u64,
        len: u64,
        token: u64,
    ) -> std::result::Result<(), SubmitError> {
        let (op, mode) = if zero {
            (FileOp::WriteZeroes, libc::FALLOC_FL_ZERO_RANGE)
        } else {
            (FileOp::Deallocate, libc::FALLOC_FL_PUNCH_HOLE)
        };
        let t = self.take_tracker(1, op, offset, token)?;
        let e = opcode::Fallocate::new(types::Fixed(0), len)
            .offset(offset)
            .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
            .build();
        self.push(e.user_data(user_data(t, 0)));
        Ok(())
    }

    /// Posts an fdatasync: every write completed before it is durable when it completes.
    pub fn submit_flush(&mut self, token: u64) -> std::result::Result<(), SubmitError> {
        let t = self.take_tracker(1, FileOp::Flush, 0, token)?;
        let e = opcode::Fsync::new(types::Fixed(0))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.push(e.user_data(user_data(t, 0)));
        Ok(())
    }

    /// Hands what was posted to the kernel: with SQPOLL, a store the kernel thread sees
    /// (and a syscall only to wake it when it sleeps); without, one io_uring_enter.
    pub fn ring(&mut self) {
        if self.posted.is_empty() {
            return;
        }
        let now = Instant::now();
        for &t in &self.posted {
            self.trackers[t as usize].since = Some(now);
        }
        self.posted.clear();
        let enters = !self.sqpoll || self.ring.submission().need_wakeup();
        // An enter that fails (EINTR, EAGAIN) leaves the entries in the ring: the next
        // ring, or the SQPOLL thread, takes them; deadlines catch a ring that never does.
        let _ = self.ring.submit();
        if enters {
            self.enters += 1;
        }
    }

    /// Reaps at most `max` commands' completions.
    pub fn poll(&mut self, max: usize, mut each: impl FnMut(FileCompletion)) -> usize {
        let mut done = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        while done < max {
            let Some(cqe) = cq.next() else {
                break;
            };
            let (t, want) = split_user_data(cqe.user_data());
            // Untrusted in the sense of design.md: an index that names no busy tracker is
            // dropped (the command it should have named times out).
            let Some(tr) = self.trackers.get_mut(t as usize).filter(|tr| tr.busy) else {
                continue;
            };
            self.sqes_out = self.sqes_out.saturating_sub(1);
            let res = cqe.result();
            let code = if res < 0 {
                res.unsigned_abs()
            } else if want != 0 && res as usize != want {
                SHORT_TRANSFER
            } else {
                0
            };
            if tr.code == 0 {
                tr.code = code;
            }
            tr.pieces -= 1;
            if tr.pieces == 0 {
                let c = FileCompletion {
                    token: tr.token,
                    code: tr.code,
                };
                *tr = IDLE;
                self.free.push(t);
                self.outstanding -= 1;
                done += 1;
                each(c);
            }
        }
        done
    }

    /// The oldest command past the timeout at `now`.
    pub fn expired(&self, now: Instant) -> Option<Late> {
        self.trackers
            .iter()
            .filter(|t| t.busy)
            .filter_map(|t| Some((t, now.checked_duration_since(t.since?)?)))
            .filter(|(_, waited)| *waited > self.timeout)
            .max_by_key(|(_, waited)| *waited)
            .map(|(t, waited)| Late {
                op: t.op,
                offset: t.offset,
                waited,
            })
    }

    /// Cancels every outstanding command (IORING_OP_ASYNC_CANCEL, any), waits up to `wait`
    /// for their completions, and fails them all through `each` with [`ABORTED`]. Returns
    /// whether every one was seen to end: if not, the kernel may still write their pages,
    /// and the ring takes no more work.
    pub fn abort_all(&mut self, wait: Duration, mut each: impl FnMut(FileCompletion)) -> bool {
        if self.outstanding == 0 {
            return true;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(u64::MAX);
        let deadline = Instant::now() + wait;
        // SAFETY: a cancel request carries no memory.
        let _ = unsafe { self.ring.submission().push(&cancel) };
        let _ = self.ring.submit();
        self.enters += 1;
        let mut seen = Vec::new();
        while self.outstanding > 0 && Instant::now() < deadline {
            self.poll(usize::MAX, |c| seen.push(c));
            if self.outstanding > 0 {
                let _ = self.ring.submit_and_wait(1);
                self.enters += 1;
            }
        }
        // Whatever each command's own result, it is reported aborted: the caller reissues
        // or fails them all alike.
        for c in seen {
            each(FileCompletion {
                token: c.token,
                code: ABORTED,
            });
        }
        let quiet = self.outstanding == 0;
        if !quiet {
            for tr in self.trackers.iter_mut().filter(|t| t.busy) {
                each(FileCompletion {
                    token: tr.token,
                    code: ABORTED,
                });
                // Neither busy nor free: a late completion naming it is dropped, and the
                // tracker is never handed out again.
                *tr = IDLE;
            }
            self.outstanding = 0;
            self.posted.clear();
            self.quarantined = true;
        }
        quiet
    }
}

impl Drop for FileQueue {
    fn drop(&mut self) {
        // The kernel tears a ring down asynchronously after its descriptor closes, and the
        // ring's fixed-file table keeps the file open until then: a block device would
        // stay claimed (O_EXCL) for a moment after nvcopy exits, and the next run on it
        // would find it busy. Unregistering first lets the file go now.
        let s = self.ring.submitter();
        let _ = s.unregister_files();
        let _ = s.unregister_buffers();
    }
}

fn sq_room(ring: &mut IoUring) -> usize {
    let sq = ring.submission();
    sq.capacity() - sq.len()
}

/// A piece's user data: its tracker, and the bytes it must move (0: not a transfer).
fn user_data(tracker: u16, len: usize) -> u64 {
    (len as u64) << 16 | tracker as u64
}

fn split_user_data(d: u64) -> (u16, usize) {
    (d as u16, (d >> 16) as usize)
}
