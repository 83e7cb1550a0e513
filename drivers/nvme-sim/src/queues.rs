//! The controller's view of submission and completion queues (base spec 4.1): head and
//! tail indexes, the CQ phase tag, and completions held back while a CQ is full.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};

use nvcopy_vfio::{ByteValued, Bytes, DmaPool, VolatileMemory};

use super::dma::host;
use crate::{CQE_SIZE, SQE_SIZE};
use nvcopy_nvme::spec::{Cqe, Sqe, CQE_STATUS_OFFSET};

/// Host memory behind a queue could not be reached: the controller can only report that
/// through CSTS.CFS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unreachable;

/// A submission queue.
#[derive(Debug)]
pub struct SubQueue {
    pub base: u64,
    pub size: u32,
    pub head: u32,
    pub tail: u32,
    pub cqid: u16,
}

impl SubQueue {
    pub fn new(base: u64, size: u32, cqid: u16) -> Self {
        SubQueue {
            base,
            size,
            head: 0,
            tail: 0,
            cqid,
        }
    }

    /// Entries posted and not yet fetched.
    pub fn unfetched(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Reads the entry at the head and advances the head past it.
    pub fn fetch(&mut self, pool: &DmaPool) -> Result<Option<Sqe>, Unreachable> {
        if self.head == self.tail {
            return Ok(None);
        }
        let at = self.base + self.head as u64 * SQE_SIZE as u64;
        let sqe = host(pool, at, SQE_SIZE)
            .ok()
            .and_then(|s| s.read_obj::<Sqe>(0).ok())
            .ok_or(Unreachable)?;
        self.head = (self.head + 1) % self.size;
        Ok(Some(sqe))
    }
}

/// A completion queue.
#[derive(Debug)]
pub struct CompQueue {
    pub base: u64,
    pub size: u32,
    head: u32,
    tail: u32,
    phase: u16,
    /// Completions produced while the queue was full, oldest first.
    held: VecDeque<Cqe>,
    /// Submission queues that post here.
    pub bound: u16,
}

impl CompQueue {
    pub fn new(base: u64, size: u32) -> Self {
        CompQueue {
            base,
            size,
            head: 0,
            tail: 0,
            phase: 1,
            held: VecDeque::new(),
            bound: 0,
        }
    }

    /// The head as the controller knows it.
    pub fn head(&self) -> u32 {
        self.head
    }

    /// Entries posted and not yet consumed by the host.
    pub fn unconsumed(&self) -> u32 {
        (self.tail + self.size - self.head) % self.size
    }

    /// Completions waiting for room.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Full when the tail is one behind the head (a queue of N entries holds N - 1).
    fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }

    /// Posts `cqe` (its status field already shifted past the phase bit), or holds it
    /// until the host frees a slot. Order is kept: nothing overtakes a held entry.
    pub fn post(&mut self, pool: &DmaPool, cqe: Cqe) -> Result<(), Unreachable> {
        if !self.held.is_empty() || self.full() {
            self.held.push_back(cqe);
            return Ok(());
        }
        self.write(pool, cqe)
    }

    /// Writes the entry at the tail: everything but the status word first, then the
    /// status word with the phase tag, so that a host polling the phase never sees a
    /// half-written entry.
    fn write(&mut self, pool: &DmaPool, mut cqe: Cqe) -> Result<(), Unreachable> {
        cqe.status = (cqe.status & !1) | self.phase;
        let at = self.base + self.tail as u64 * CQE_SIZE as u64;
        let slot = host(pool, at, CQE_SIZE).map_err(|_| Unreachable)?;
        let bytes = cqe.as_slice();
        slot.write_slice(&bytes[..CQE_STATUS_OFFSET], 0)
            .map_err(|_| Unreachable)?;
        fence(Ordering::Release);
        slot.get_ref::<u16>(CQE_STATUS_OFFSET)
            .map_err(|_| Unreachable)?
            .store(cqe.status);
        self.tail += 1;
        if self.tail == self.size {
            self.tail = 0;
            self.phase ^= 1;
        }
        Ok(())
    }

    /// The host consumed entries up to `head`. Returns false (and changes nothing) when
    /// `head` is outside the entries posted; otherwise posts held completions into the
    /// room made, if `drain` (the controller may write host memory).
    pub fn set_head(
        &mut self,
        pool: &DmaPool,
        head: u32,
        drain: bool,
    ) -> Result<bool, Unreachable> {
        if head >= self.size {
            return Ok(false);
        }
        let consumed = (head + self.size - self.head) % self.size;
        if consumed > self.unconsumed() {
            return Ok(false);
        }
        self.head = head;
        while drain && !self.full() {
            let Some(cqe) = self.held.pop_front() else {
                break;
            };
            self.write(pool, cqe)?;
        }
        Ok(true)
    }
}

/// Every queue of the controller, indexed by queue id (0 is the admin pair).
#[derive(Debug)]
pub struct Queues {
    sqs: Vec<Option<SubQueue>>,
    cqs: Vec<Option<CompQueue>>,
}

impl Queues {
    /// Room for the admin pair and `io` I/O pairs.
    pub fn new(io: u16) -> Self {
        let n = io as usize + 1;
        Queues {
            sqs: (0..n).map(|_| None).collect(),
            cqs: (0..n).map(|_| None).collect(),
        }
    }

    /// Deletes every queue (controller reset).
    pub fn clear(&mut self) {
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
    }

    pub fn sq(&self, qid: u16) -> Option<&SubQueue> {
        self.sqs.get(qid as usize)?.as_ref()
    }
    pub fn sq_mut(&mut self, qid: u16) -> Option<&mut SubQueue> {
        self.sqs.get_mut(qid as usize)?.as_mut()
    }
    pub fn cq(&self, qid: u16) -> Option<&CompQueue> {
        self.cqs.get(qid as usize)?.as_ref()
    }
    pub fn cq_mut(&mut self, qid: u16) -> Option<&mut CompQueue> {
        self.cqs.get_mut(qid as usize)?.as_mut()
    }

    /// Queue ids that have an SQ, in order.
    pub fn sq_ids(&self) -> Vec<u16> {
        (0..self.sqs.len())
            .filter(|&q| self.sqs[q].is_some())
            .map(|q| q as u16)
            .collect()
    }

    /// Adds a CQ; the caller validated `qid`.
    pub fn add_cq(&mut self, qid: u16, cq: CompQueue) {
        if let Some(slot) = self.cqs.get_mut(qid as usize) {
            *slot = Some(cq);
        }
    }

    /// Adds an SQ bound to an existing CQ; the caller validated both ids.
    pub fn add_sq(&mut self, qid: u16, sq: SubQueue) {
        if let Some(cq) = self.cq_mut(sq.cqid) {
            cq.bound += 1;
        }
        if let Some(slot) = self.sqs.get_mut(qid as usize) {
            *slot = Some(sq);
        }
    }

    pub fn remove_sq(&mut self, qid: u16) -> Option<SubQueue> {
        let sq = self.sqs.get_mut(qid as usize)?.take()?;
        if let Some(cq) = self.cq_mut(sq.cqid) {
            cq.bound -= 1;
        }
        Some(sq)
    }

    pub fn remove_cq(&mut self, qid: u16) -> Option<CompQueue> {
        self.cqs.get_mut(qid as usize)?.take()
    }
}
