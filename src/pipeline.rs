//! One polling loop that copies a region to up to 64 destinations: each chunk is read
//! once into DMA memory and written from there to every destination (kcopyd's model:
//! `read_err` for the source, one `write_err` bit per destination). Up to `qd` chunks are
//! in flight. Each pass handles completions first, because they free chunk buffers, then
//! starts new reads, then rings each queue's doorbell once.
//!
//! This is the single-reactor core; it makes no syscalls and no allocations per chunk.

use std::time::{Duration, Instant};

use nvcopy_nvme::{Completion, DataPtr, IoQpair, Namespace};
use nvcopy_vfio::DmaBuf;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::platform::Platform;
use crate::region::{Region, MAX_DESTS};

/// One bit per destination, bit i for `to[i]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
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
}

/// Tuning and error policy of a copy.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Bytes per chunk (capped at every controller's maximum transfer).
    pub chunk: usize,
    /// Chunks in flight.
    pub qd: usize,
    /// Keep going past failed chunks and report at the end (kcopyd's DM_KCOPYD_IGNORE_ERROR).
    pub ignore_errors: bool,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            chunk: 128 << 10,
            qd: 32,
            ignore_errors: false,
        }
    }
}

/// How a copy ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyOutcome {
    /// A chunk could not be read.
    pub read_err: bool,
    /// Destinations that had a failed write.
    pub write_err: DestMask,
    /// Bytes read and written to every destination.
    pub bytes: u64,
    /// Chunks that failed.
    pub failed_chunks: u64,
    /// The first error, in words.
    pub first_error: Option<String>,
    /// Time from the first I/O to the last completion.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

const READ: u64 = 0xff;

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Idle,
    Reading,
    Writing { pending: usize },
}

struct Slot {
    buf: DmaBuf,
    state: SlotState,
    offset: u64,
    len: usize,
    failed: bool,
}

/// The chunk size a copy between these regions uses: at most `want`, at most what every
/// controller takes in one command, a multiple of every block size.
pub fn chunk_size(p: &Platform, regions: &[&Region], want: usize) -> usize {
    let block = regions
        .iter()
        .map(|r| r.lba_size as usize)
        .max()
        .unwrap_or(512);
    let limit = regions
        .iter()
        .map(|r| p.controllers[r.ctrl].max_transfer())
        .min()
        .unwrap_or(want)
        .min(want);
    (limit / block * block).max(block)
}

/// Copies `from` to every region of `to`. `progress` is called with the bytes done so far
/// after every finished chunk.
pub fn copy(
    p: &Platform,
    from: &Region,
    to: &[Region],
    opts: &CopyOptions,
    mut progress: impl FnMut(u64),
) -> Result<CopyOutcome> {
    if to.is_empty() || to.len() > MAX_DESTS {
        return Err(Error::Usage(format!(
            "a copy takes 1 to {MAX_DESTS} destinations, not {}",
            to.len()
        )));
    }
    if let Some(d) = to.iter().find(|d| d.len != from.len) {
        return Err(Error::Usage(format!(
            "destination length {} differs from the source's {}",
            d.len, from.len
        )));
    }
    let all: Vec<&Region> = std::iter::once(from).chain(to.iter()).collect();
    let chunk = chunk_size(p, &all, opts.chunk);
    let qd = opts.qd.max(1);
    let ns =
        |r: &Region| -> Result<Namespace> { Ok(p.controllers[r.ctrl].namespace(r.nsid)?.clone()) };
    let src_ns = ns(from)?;
    let dst_ns: Vec<Namespace> = to.iter().map(ns).collect::<Result<_>>()?;

    // One queue pair per controller involved, deep enough for every chunk's writes to it.
    let mut queues: Vec<Option<IoQpair>> = (0..p.controllers.len()).map(|_| None).collect();
    for (i, c) in p.controllers.iter().enumerate() {
        let users = to.iter().filter(|d| d.ctrl == i).count() + usize::from(from.ctrl == i);
        if users > 0 {
            let depth = (qd * users + 1).min(u16::MAX as usize) as u16;
            let q = c.create_io_qpair(depth)?;
            if q.depth() as usize <= qd * users {
                return Err(Error::Usage(format!(
                    "{}: queue depth {qd} needs {} queue entries but the controller allows {}; lower --qd",
                    c.name(),
                    qd * users + 1,
                    q.depth()
                )));
            }
            queues[i] = Some(q);
        }
    }
    let mut slots = (0..qd)
        .map(|_| {
            Ok(Slot {
                buf: p.pool.alloc(chunk)?,
                state: SlotState::Idle,
                offset: 0,
                len: 0,
                failed: false,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let mut out = CopyOutcome::default();
    let mut events: Vec<Completion> = Vec::with_capacity(64 * queues.len());
    let mut cursor = 0u64;
    let mut stop = false;
    let mut idle_passes = 0u32;
    let start = Instant::now();
    let record = |out: &mut CopyOutcome, msg: String| {
        out.failed_chunks += 1;
        out.first_error.get_or_insert(msg);
    };

    loop {
        // Completions first: they free chunk buffers.
        events.clear();
        for q in queues.iter_mut().flatten() {
            q.poll(64, |c| events.push(c))?;
        }
        idle_passes = if events.is_empty() {
            idle_passes + 1
        } else {
            0
        };
        for c in &events {
            let slot_i = (c.token >> 8) as usize;
            let kind = c.token & 0xff;
            let slot = &mut slots[slot_i];
            if kind == READ {
                if let Err(e) = queues[from.ctrl].as_ref().map_or(Ok(0), |q| q.check(c)) {
                    out.read_err = true;
                    record(&mut out, e.to_string());
                    stop |= !opts.ignore_errors;
                    slot.state = SlotState::Idle;
                    continue;
                }
                let first_lba_off = slot.offset;
                for (d, dest) in to.iter().enumerate() {
                    let lba = (dest.offset + first_lba_off) / dest.lba_size as u64;
                    let data = DataPtr::Contig {
                        iova: slot.buf.iova(),
                        len: slot.len,
                    };
                    if let Some(q) = queues[dest.ctrl].as_mut() {
                        q.submit_write(&dst_ns[d], lba, data, (slot_i as u64) << 8 | d as u64)?;
                    }
                }
                slot.failed = false;
                slot.state = SlotState::Writing { pending: to.len() };
            } else {
                let d = kind as usize;
                if let Err(e) = queues[to[d].ctrl].as_ref().map_or(Ok(0), |q| q.check(c)) {
                    out.write_err.set(d);
                    if !slot.failed {
                        slot.failed = true;
                        record(&mut out, e.to_string());
                    }
                    stop |= !opts.ignore_errors;
                }
                if let SlotState::Writing { pending } = &mut slot.state {
                    *pending -= 1;
                    if *pending == 0 {
                        slot.state = SlotState::Idle;
                        if !slot.failed {
                            out.bytes += slot.len as u64;
                            progress(out.bytes);
                        }
                    }
                }
            }
        }

        // Then new reads, into every free chunk buffer.
        if !stop {
            for (i, slot) in slots.iter_mut().enumerate() {
                if cursor >= from.len {
                    break;
                }
                if slot.state != SlotState::Idle {
                    continue;
                }
                let len = chunk.min((from.len - cursor) as usize);
                let lba = (from.offset + cursor) / from.lba_size as u64;
                let data = DataPtr::Contig {
                    iova: slot.buf.iova(),
                    len,
                };
                if let Some(q) = queues[from.ctrl].as_mut() {
                    q.submit_read(&src_ns, lba, data, (i as u64) << 8 | READ)?;
                }
                slot.state = SlotState::Reading;
                slot.offset = cursor;
                slot.len = len;
                cursor += len as u64;
            }
        }
        // One doorbell per queue per pass.
        for q in queues.iter_mut().flatten() {
            q.ring();
        }
        if (cursor >= from.len || stop) && slots.iter().all(|s| s.state == SlotState::Idle) {
            break;
        }
        if idle_passes > 0 && idle_passes % 4096 == 0 {
            for q in queues.iter_mut().flatten() {
                if q.expired().is_some() {
                    // The controller is disabled before the error returns, so no chunk
                    // buffer can be written after the slots are dropped.
                    q.abandon()?;
                }
            }
        }
    }
    out.elapsed = start.elapsed();
    Ok(out)
}
