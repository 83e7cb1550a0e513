//! Files and kernel block devices behind the endpoint interface, through io_uring
//! (`nvcopy-uring`): a path is a [`Device`] with one volume (id 1), and each reactor's
//! ring on it an [`Endpoint`].
//!
//! Write Zeroes is fallocate ZERO_RANGE and deallocate is PUNCH_HOLE (both with
//! KEEP_SIZE; on a block device the kernel turns them into BLKZEROOUT and a zeroing
//! discard), and Flush is fdatasync. A timed-out command is cancelled; a device that
//! cannot be reset counts each such recovery against the job's reset budget.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_uring::{Anchor, BlockFile, FileKind, FileQueue, SubmitError, ABORTED, SHORT_TRANSFER};
use nvcopy_vfio::DmaPool;

use super::{
    Caps, Command, Device, Done, Endpoint, Generation, MediaId, Recovery, Refused, Volume,
    MAX_CHUNK,
};
use crate::error::Result;

/// How long a recovery waits for cancelled commands to come back.
const CANCEL_WAIT: Duration = Duration::from_secs(1);

/// A file or block device, shared by the reactors.
pub struct FileDevice {
    name: String,
    file: Arc<std::fs::File>,
    kind: FileKind,
    len: u64,
    block_size: u32,
    direct: bool,
    identity: (u64, u64),
    anchor: Arc<Anchor>,
    timeout: Duration,
    /// Bumped by every recovery, for the jobs' reset budgets.
    generation: Arc<Generation>,
    /// What its rings did, summed over the reactors.
    stats: Arc<RingStats>,
}

/// What the rings of one device did, summed over the reactors.
#[derive(Debug, Default)]
struct RingStats {
    enters: AtomicU64,
    commands: AtomicU64,
    sqes: AtomicU64,
}

impl FileDevice {
    /// Wraps an open file. `anchor` is the engine's shared SQPOLL ring.
    pub fn new(file: BlockFile, anchor: Arc<Anchor>, timeout: Duration) -> Arc<FileDevice> {
        Arc::new(FileDevice {
            name: file.path().display().to_string(),
            kind: file.kind(),
            len: file.len(),
            block_size: file.block_size(),
            direct: file.is_direct(),
            identity: file.identity(),
            file: Arc::new(file.into_file()),
            anchor,
            timeout,
            generation: Arc::default(),
            stats: Arc::default(),
        })
    }

    /// io_uring_enter calls made by its rings so far, over every reactor.
    pub fn enters(&self) -> u64 {
        self.stats.enters.load(Ordering::Relaxed)
    }

    /// Commands its rings took, and the SQEs they became (a command whose pages are not
    /// contiguous in memory takes one SQE per run).
    pub fn submitted(&self) -> (u64, u64) {
        (
            self.stats.commands.load(Ordering::Relaxed),
            self.stats.sqes.load(Ordering::Relaxed),
        )
    }

    /// Whether its rings share an SQPOLL thread.
    pub fn sqpoll(&self) -> bool {
        self.anchor.sqpoll()
    }

    /// The path.
    pub fn path(&self) -> &Path {
        Path::new(&self.name)
    }
}

impl Device for FileDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn volume(&self, id: u32) -> Result<Volume> {
        if id != 1 {
            return Err(crate::error::Refusal::BadNamespaceId {
                text: id.to_string(),
                region: self.name.clone(),
            }
            .into());
        }
        Ok(Volume {
            index: 0,
            id: 1,
            block_size: self.block_size,
            blocks: self.len / self.block_size as u64,
            zone_blocks: None,
        })
    }

    fn caps(&self) -> Caps {
        Caps {
            max_transfer: MAX_CHUNK,
            write_zeroes: true,
            deallocate: true,
            copy: false,
            sequential_writes: false,
        }
    }

    fn media(&self, _v: &Volume) -> MediaId {
        MediaId {
            inode: Some(self.identity),
            ..Default::default()
        }
    }

    fn io_timeout(&self) -> Duration {
        self.timeout
    }

    fn generation(&self) -> u64 {
        self.generation.get()
    }

    fn reset(&self, seen: u64) {
        // Nothing to reset: the generation moves so that the job's budget counts it.
        self.generation.bump(seen);
    }

    fn max_endpoints(&self) -> usize {
        usize::MAX
    }

    fn open_endpoint(&self, pool: &DmaPool, entries: u16) -> Result<Box<dyn Endpoint>> {
        let q = FileQueue::new(self.file.clone(), pool, entries, &self.anchor, self.timeout)?;
        Ok(Box::new(FileEndpoint {
            q,
            name: self.name.clone(),
            generation: self.generation.clone(),
            stats: self.stats.clone(),
            seen: (0, 0, 0),
            mine: self.generation(),
        }))
    }

    fn endpoint_dma_bytes(&self, _entries: u16) -> usize {
        0
    }

    fn facts(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "kind",
                match self.kind {
                    FileKind::Regular => "file",
                    FileKind::BlockDevice => "block device",
                }
                .to_string(),
            ),
            ("direct_io", self.direct.to_string()),
            ("sqpoll", self.anchor.sqpoll().to_string()),
            ("io_uring_enters", self.enters().to_string()),
            ("commands", self.submitted().0.to_string()),
            ("sqes", self.submitted().1.to_string()),
        ]
    }
}

/// One reactor's ring on a file.
struct FileEndpoint {
    q: FileQueue,
    name: String,
    generation: Arc<Generation>,
    stats: Arc<RingStats>,
    /// The ring's enters, commands and SQEs last added to `stats`.
    seen: (u64, u64, u64),
    /// The generation this endpoint last recovered at.
    mine: u64,
}

impl Endpoint for FileEndpoint {
    fn submit(&mut self, cmd: Command<'_>, token: u64) -> std::result::Result<(), Refused> {
        let r = match cmd {
            Command::Read { at, data, .. } => {
                self.q.submit_rw(false, at, data.iovas, data.len, token)
            }
            Command::Write { at, data, .. } => {
                self.q.submit_rw(true, at, data.iovas, data.len, token)
            }
            Command::WriteZeroes { at, len, .. } => self.q.submit_fallocate(true, at, len, token),
            Command::Deallocate { at, len, .. } => self.q.submit_fallocate(false, at, len, token),
            Command::Flush { .. } => self.q.submit_flush(token),
            Command::Copy { .. } => {
                return Err(Refused::Invalid(format!(
                    "{}: a file has no Copy offload",
                    self.name
                )))
            }
        };
        r.map_err(|e| match e {
            SubmitError::Full => Refused::Full,
            SubmitError::Invalid(m) => Refused::Invalid(format!("{}: {m}", self.name)),
        })
    }

    #[inline]
    fn ring(&mut self) {
        self.q.ring();
        let (commands, sqes) = self.q.submitted();
        let now = (self.q.enters(), commands, sqes);
        if now != self.seen {
            let s = &self.stats;
            s.enters.fetch_add(now.0 - self.seen.0, Ordering::Relaxed);
            s.commands.fetch_add(now.1 - self.seen.1, Ordering::Relaxed);
            s.sqes.fetch_add(now.2 - self.seen.2, Ordering::Relaxed);
            self.seen = now;
        }
    }

    fn poll(&mut self, max: usize, out: &mut Vec<Done>) -> usize {
        self.q.poll(max, |c| {
            out.push(Done {
                token: c.token,
                code: c.code,
            })
        })
    }

    fn outstanding(&self) -> usize {
        self.q.outstanding()
    }

    fn retry_after(&self, done: &Done) -> Option<Duration> {
        // Transient errors only; a media error (EIO) is tried again as an NVMe media error
        // without Do Not Retry would be.
        let transient = [libc::EIO, libc::EAGAIN, libc::EINTR, libc::EBUSY];
        transient
            .contains(&(done.code as i32))
            .then_some(Duration::ZERO)
    }

    fn describe(&self, done: &Done) -> String {
        match done.code {
            SHORT_TRANSFER => format!(
                "{}: a read or write moved fewer bytes than asked (the file is shorter than the region, or its filesystem is full)",
                self.name
            ),
            ABORTED => format!("{}: cancelled after a command timed out", self.name),
            c => {
                let e = std::io::Error::from_raw_os_error(c as i32);
                let hint = match c as i32 {
                    libc::ENOSPC => ": the filesystem is full; free space or choose another destination",
                    libc::EOPNOTSUPP => ": the filesystem does not support this fallocate mode; add --no-offload",
                    libc::EINVAL => ": the kernel refused the I/O (alignment for O_DIRECT?)",
                    _ => "",
                };
                format!("{}: {e}{hint}", self.name)
            }
        }
    }

    fn generation(&self) -> u64 {
        self.mine
    }

    fn is_stale(&self) -> bool {
        // A recovery on another reactor's ring does not touch this one.
        false
    }

    fn is_usable(&self) -> bool {
        !self.q.is_quarantined()
    }

    fn expired(&self, now: Instant) -> Option<String> {
        let late = self.q.expired(now)?;
        Some(format!(
            "{} at byte {} did not complete within {:?}",
            late.op.name(),
            late.offset,
            late.waited
        ))
    }

    fn recover(&mut self, out: &mut Vec<Done>) -> Recovery {
        let quiet = self.q.abort_all(CANCEL_WAIT, |c| {
            out.push(Done {
                token: c.token,
                code: c.code.max(1),
            })
        });
        self.mine = self.generation.get();
        if quiet {
            Recovery::Reissue
        } else {
            Recovery::Failed { quiet: false }
        }
    }
}
