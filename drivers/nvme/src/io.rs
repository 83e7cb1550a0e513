//! I/O commands of the NVM command set on one queue pair: Read, Write, Write Zeroes,
//! Flush, Dataset Management (deallocate) and Copy (format 0).
//!
//! `submit_*` post a command without ringing; `ring` and `poll` move the queue, so a
//! reactor can post a batch and pay for one doorbell. The blocking `*_sync` helpers that
//! run a whole transfer are in `sync.rs`.

use std::sync::Arc;

use nvcopy_vfio::DmaBuf;

use crate::controller::{check, Controller, Health};
use crate::error::{Error, Result};
use crate::identify::Namespace;
use crate::prp::DataPtr;
use crate::queue::{Completion, Expired, QueuePair};
use crate::spec::{admin, io, CopyRange, Sqe};

/// Most blocks one Read/Write/Write Zeroes carries: NLB is a 16-bit, 0-based field.
pub const MAX_NLB: u32 = 1 << 16;

/// The longest a device may make the host wait before a retry. CRDT is in units of
/// 100 ms up to 6553.5 s (base spec 5.15.2.1, Identify Controller CRDT1-3); a copier
/// that honoured that would look hung.
pub const MAX_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(10);

/// How a queue pair came out of [`IoQpair::recover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The controller was reset and the queue pair exists on it again: the aborted
    /// commands may be issued again.
    Reissue,
    /// The controller is failed. `quiet`: it was proven to do no more DMA, so the memory
    /// of the aborted commands may be reused; otherwise it must never be.
    Failed {
        /// Proven to do no more DMA.
        quiet: bool,
    },
}

/// An I/O queue pair, owned by one thread. Dropping it deletes the queues.
#[derive(Debug)]
pub struct IoQpair {
    pub(crate) ctrl: Arc<Controller>,
    pub(crate) qp: QueuePair,
    /// The controller's maximum transfer, read once: it is checked on every command.
    max_transfer: usize,
    /// The controller generation the queues were created under (see
    /// [`Controller::generation`]).
    generation: u64,
}

impl IoQpair {
    pub(crate) fn new(ctrl: Arc<Controller>, qp: QueuePair, generation: u64) -> Self {
        IoQpair {
            max_transfer: ctrl.max_transfer(),
            ctrl,
            qp,
            generation,
        }
    }

    /// The controller generation this queue pair belongs to.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the controller was reset (or failed) since this queue pair was created, so
    /// that it no longer exists there: its commands will never complete, and
    /// [`IoQpair::recover`] must run before it is used again.
    #[inline]
    pub fn is_stale(&self) -> bool {
        self.ctrl.generation() != self.generation
    }

    /// Whether commands can be posted: not disabled, not stale.
    pub fn is_usable(&self) -> bool {
        !self.qp.is_disabled() && !self.is_stale()
    }

    /// After a reset of the controller (by this thread or another, see
    /// [`Controller::reset`]): fails every outstanding command through `each` with a
    /// synthesized abort status (the normal completion path), then re-creates the queue
    /// pair on the controller if it is ready again. A controller that failed leaves the
    /// queue disabled, and its memory quarantined unless the controller is quiet.
    pub fn recover(&mut self, each: impl FnMut(Completion)) -> Recovery {
        let gen = self.ctrl.generation();
        let health = self.ctrl.health();
        self.qp.abort_all(each);
        match health {
            Health::Ready => {
                self.qp.reinit();
                match self.ctrl.create_queues(&mut self.qp, gen) {
                    Ok(()) => {
                        self.generation = gen;
                        Recovery::Reissue
                    }
                    Err(_) => {
                        // The controller does not know this queue: nothing of it is
                        // reachable by the device, but it cannot be used either.
                        self.qp.disable();
                        Recovery::Failed { quiet: true }
                    }
                }
            }
            Health::Failed { quiet } => {
                if quiet {
                    self.qp.disable();
                } else {
                    self.qp.quarantine();
                }
                Recovery::Failed { quiet }
            }
        }
    }

    /// Whether a failed completion may be retried, and after how long: never with Do Not
    /// Retry set; otherwise after the controller's Command Retry Delay for the CRD index
    /// in the status (base spec 4.6.1.2, 5.15.2.1), at most [`MAX_RETRY_DELAY`].
    pub fn retry_after(&self, c: &Completion) -> Option<std::time::Duration> {
        if c.status.is_success() || c.status.dnr() {
            return None;
        }
        Some(
            self.ctrl
                .info()
                .retry_delay(c.status.crd())
                .min(MAX_RETRY_DELAY),
        )
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }
    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qp.qid()
    }
    /// Ring size in entries (one fewer can be in flight).
    pub fn depth(&self) -> u16 {
        self.qp.entries()
    }
    /// Commands in flight.
    pub fn outstanding(&self) -> usize {
        self.qp.outstanding()
    }
    /// Commands that can be posted now.
    pub fn free_slots(&self) -> usize {
        self.qp.free_slots()
    }
    /// Whether this queue pair rings through shadow doorbells (see
    /// [`Controller::shadow_doorbells`]); decided when it was created or last recovered.
    pub fn shadow_doorbells(&self) -> bool {
        self.qp.has_shadow()
    }

    #[cold]
    fn bad_length(&self, ns: &Namespace, len: usize) -> Error {
        let bs = ns.lba_size as usize;
        if len == 0 || len % bs != 0 || len / bs > MAX_NLB as usize {
            return self.bad_buffer(format!(
                "{len} bytes is not 1 to {MAX_NLB} blocks of {bs} bytes"
            ));
        }
        self.bad_buffer(format!(
            "{len} bytes exceeds the controller's maximum transfer of {}",
            self.max_transfer
        ))
    }

    #[cold]
    pub(crate) fn bad_buffer(&self, reason: String) -> Error {
        Error::BadBuffer {
            ctrl: self.ctrl.name().to_string(),
            reason,
        }
    }

    #[inline]
    pub(crate) fn rw(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        lba: u64,
        data: DataPtr<'_>,
        token: u64,
    ) -> Result<u16> {
        let len = data.len();
        // Block sizes are powers of two (Controller::namespace refuses others): shifts,
        // not divisions, on this per-command path.
        let shift = ns.lba_size.trailing_zeros();
        let blocks = len >> shift;
        if len == 0
            || len & (ns.lba_size as usize - 1) != 0
            || blocks > MAX_NLB as usize
            || len > self.max_transfer
        {
            return Err(self.bad_length(ns, len));
        }
        let mut s = Sqe::new(opcode, ns.nsid);
        s.set_slba(lba);
        s.cdw12 = (blocks - 1) as u32;
        self.qp.post(s, Some(data), token)
    }

    /// Posts a Read of `data.len()` bytes from `lba`.
    #[inline]
    pub fn submit_read(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: DataPtr<'_>,
        token: u64,
    ) -> Result<u16> {
        self.rw(io::READ, ns, lba, data, token)
    }

    /// Posts a Write of `data.len()` bytes at `lba`.
    #[inline]
    pub fn submit_write(
        &mut self,
        ns: &Namespace,
        lba: u64,
        data: DataPtr<'_>,
        token: u64,
    ) -> Result<u16> {
        self.rw(io::WRITE, ns, lba, data, token)
    }

    /// Posts a Write Zeroes of `blocks` (1 to 65536) blocks at `lba`.
    pub fn submit_write_zeroes(
        &mut self,
        ns: &Namespace,
        lba: u64,
        blocks: u32,
        token: u64,
    ) -> Result<u16> {
        if !self.ctrl.info().supports_write_zeroes() {
            return Err(self.unsupported("Write Zeroes"));
        }
        if blocks == 0 || blocks > MAX_NLB {
            return Err(
                self.bad_buffer(format!("Write Zeroes of {blocks} blocks (1 to {MAX_NLB})"))
            );
        }
        let mut s = Sqe::new(io::WRITE_ZEROES, ns.nsid);
        s.set_slba(lba);
        s.cdw12 = blocks - 1;
        self.qp.post(s, None, token)
    }

    /// Posts a Flush of the namespace.
    pub fn submit_flush(&mut self, ns: &Namespace, token: u64) -> Result<u16> {
        self.qp.post(Sqe::new(io::FLUSH, ns.nsid), None, token)
    }

    pub(crate) fn unsupported(&self, cmd: &'static str) -> Error {
        Error::CommandUnsupported {
            ctrl: self.ctrl.name().to_string(),
            cmd,
        }
    }

    /// Posts the doorbell for everything posted since the last ring. A stale queue pair is
    /// not rung: its queue no longer exists on the controller.
    #[inline]
    pub fn ring(&mut self) {
        if !self.is_stale() {
            self.qp.ring(self.ctrl.bar());
        }
    }

    /// Reaps at most `max` completions.
    #[inline]
    pub fn poll(&mut self, max: usize, each: impl FnMut(Completion)) -> Result<usize> {
        self.qp.poll(self.ctrl.bar(), max, each)
    }

    /// The oldest command past its timeout at `now` (deadlines count from the doorbell
    /// that handed each command over). A caller that sees one must not reuse the buffers of
    /// any command in flight until the controller was reset ([`Controller::reset`]) and
    /// this queue pair recovered ([`IoQpair::recover`]).
    pub fn expired(&self, now: std::time::Instant) -> Option<Expired> {
        self.qp.expired(now)
    }

    /// The typed error for a failed completion, or Ok.
    pub fn check(&self, c: &Completion) -> Result<u32> {
        check(self.ctrl.name(), false, c)
    }

    /// Whether a Copy of `blocks` blocks fits the namespace's limits in one command; see
    /// [`Controller::copy_fits`].
    pub fn copy_fits(&self, ns: &Namespace, blocks: u64) -> bool {
        self.ctrl.copy_fits(ns, blocks)
    }

    /// Posts one Copy (descriptor format 0) of `blocks` blocks from `src` to `dst`, with
    /// the source ranges written into `descs` (one page, owned by the caller until the
    /// command completes). The caller checks [`IoQpair::copy_fits`] first.
    pub fn submit_copy(
        &mut self,
        ns: &Namespace,
        src: u64,
        blocks: u64,
        dst: u64,
        descs: &DmaBuf,
        token: u64,
    ) -> Result<u16> {
        if !self.copy_fits(ns, blocks) || blocks == 0 {
            return Err(self.unsupported_copy(ns, blocks));
        }
        let range_max = (ns.mssrl.max(1) as u64).min(MAX_NLB as u64);
        let mut nr = 0usize;
        let mut off = 0u64;
        while off < blocks {
            let n = (blocks - off).min(range_max);
            let d = CopyRange::new(src + off, n as u32);
            descs.write_at(nr * CopyRange::SIZE, &d.to_le_bytes());
            nr += 1;
            off += n;
        }
        let mut s = Sqe::new(io::COPY, ns.nsid);
        s.set_slba(dst);
        s.cdw12 = nr as u32 - 1; // number of ranges, 0-based; descriptor format 0
        let data = DataPtr::Contig {
            iova: descs.iova(),
            len: nr * CopyRange::SIZE,
        };
        self.qp.post(s, Some(data), token)
    }

    fn unsupported_copy(&self, ns: &Namespace, blocks: u64) -> Error {
        if !self.ctrl.info().supports_copy() {
            return self.unsupported("Copy");
        }
        self.bad_buffer(format!(
            "a Copy of {blocks} blocks exceeds namespace {}'s limits (MSSRL {}, MCL {}, MSRC {})",
            ns.nsid, ns.mssrl, ns.mcl, ns.msrc
        ))
    }
}

impl Drop for IoQpair {
    fn drop(&mut self) {
        if self.is_usable() && self.ctrl.check_alive().is_ok() {
            // Deleting the SQ aborts whatever is left in it; the CQ goes after its SQ.
            let _ = self.ctrl.wait_io(&mut self.qp, 0, |_| {});
            let _ = self.ctrl.delete_queue(admin::DELETE_SQ, self.qp.qid());
            let _ = self.ctrl.delete_queue(admin::DELETE_CQ, self.qp.qid());
        }
        self.ctrl.release_qid(self.qp.qid());
    }
}
