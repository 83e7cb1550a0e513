//! The controller's side of Doorbell Buffer Config (base spec 1.3 section 5.7): where the
//! host's shadow doorbells and the controller's EventIdx entries live, and the two things
//! the controller does with them, modelled on QEMU's hw/nvme.
//!
//! - SQ: whenever it processes an I/O queue it takes the tail from the shadow entry; after
//!   each command it writes the tail it has consumed to EventIdx, fences, and reads the
//!   shadow tail again ([`sq_consumed`]).
//! - CQ: before posting a completion it writes the head it knows to EventIdx, fences, and
//!   reads the shadow head ([`sync_cq_head`]), so that room the host made without an
//!   MMIO write is found.
//!
//! EventIdx written before the shadow entry is read again, with a full fence between, is
//! the device's half of the protocol whose host half is "shadow write, full fence,
//! EventIdx read": whichever side stores last sees the other's store, so a host that skips
//! the MMIO doorbell is always seen. A polling device ([`EventIdx::Polling`], the threaded
//! controller's polling mode) keeps EventIdx one behind what it consumed, so that the host
//! never needs an MMIO write after the first, and finds new work by reading the shadow
//! entries on its own.

use std::sync::atomic::{fence, Ordering};

use nvcopy_vfio::{DmaPool, VolatileMemory};

use super::dma::host;
use super::engine::State;
use super::queues::Unreachable;

/// What the controller writes to EventIdx.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventIdx {
    /// QEMU's rule: the tail it consumed (SQ), the head it knows (CQ). The host writes an
    /// MMIO doorbell whenever the controller had caught up.
    #[default]
    Consumed,
    /// One behind that, in ring order: the host never needs to write an MMIO doorbell,
    /// because the device polls the shadow entries.
    Polling,
}

/// The two buffers the host gave with Doorbell Buffer Config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoorbellBuffers {
    doorbells: u64,
    eventidx: u64,
    stride: usize,
}

impl DoorbellBuffers {
    pub fn new(doorbells: u64, eventidx: u64, stride: usize) -> Self {
        DoorbellBuffers {
            doorbells,
            eventidx,
            stride,
        }
    }

    /// Byte offset of a queue's entry: laid out like the doorbell registers.
    fn offset(&self, qid: u16, completion: bool) -> u64 {
        ((2 * qid as usize + completion as usize) * self.stride) as u64
    }

    fn load(pool: &DmaPool, at: u64) -> Result<u32, Unreachable> {
        let v = host(pool, at, 4)
            .ok()
            .and_then(|s| s.get_ref::<u32>(0).ok().map(|r| r.load()))
            .ok_or(Unreachable)?;
        Ok(v)
    }

    fn store(pool: &DmaPool, at: u64, v: u32) -> Result<(), Unreachable> {
        let slot = host(pool, at, 4).map_err(|_| Unreachable)?;
        slot.get_ref::<u32>(0).map_err(|_| Unreachable)?.store(v);
        Ok(())
    }

    /// The host's shadow tail (SQ) or head (CQ) of queue `qid`. An acquire fence follows
    /// the load: entries the host wrote before the shadow doorbell are visible after it.
    pub fn read_doorbell(&self, pool: &DmaPool, qid: u16, cq: bool) -> Result<u32, Unreachable> {
        let v = Self::load(pool, self.doorbells + self.offset(qid, cq))?;
        fence(Ordering::Acquire);
        Ok(v)
    }

    /// Writes a shadow doorbell entry (at configuration, and for the admin queue, whose
    /// MMIO doorbells the controller mirrors there as QEMU does).
    pub fn write_doorbell(
        &self,
        pool: &DmaPool,
        qid: u16,
        cq: bool,
        v: u32,
    ) -> Result<(), Unreachable> {
        Self::store(pool, self.doorbells + self.offset(qid, cq), v)
    }

    /// Writes queue `qid`'s EventIdx entry.
    fn write_eventidx(
        &self,
        pool: &DmaPool,
        qid: u16,
        cq: bool,
        v: u32,
    ) -> Result<(), Unreachable> {
        Self::store(pool, self.eventidx + self.offset(qid, cq), v)
    }
}

/// What to publish as EventIdx for a queue of `size` entries whose controller-side index
/// is `index`.
fn event_value(policy: EventIdx, index: u32, size: u32) -> u32 {
    match policy {
        EventIdx::Consumed => index,
        EventIdx::Polling => (index + size - 1) % size,
    }
}

/// Takes I/O SQ `qid`'s tail from its shadow entry, if doorbell buffers are configured.
/// A value outside the queue is ignored (and counted as an invalid doorbell). Returns
/// false when the controller cannot reach the buffer (it then raises CSTS.CFS).
pub fn refresh_sq_tail(pool: &DmaPool, st: &mut State, qid: u16) -> bool {
    let Some(bufs) = st.doorbell_buffers else {
        return true;
    };
    if qid == 0 {
        // The admin queue goes by its MMIO doorbell, mirrored into the shadow entry.
        return true;
    }
    let Some(sq) = st.queues.sq_mut(qid) else {
        return true;
    };
    match bufs.read_doorbell(pool, qid, false) {
        Ok(v) if v < sq.size => sq.tail = v,
        Ok(_) => st.counters.note_invalid_doorbell(),
        Err(Unreachable) => {
            st.regs.cfs = true;
            return false;
        }
    }
    true
}

/// After a command of I/O SQ `qid`: publish the tail consumed as EventIdx, fence, and
/// read the shadow tail again (QEMU's `nvme_update_sq_eventidx` then
/// `nvme_update_sq_tail`).
pub fn sq_consumed(pool: &DmaPool, st: &mut State, qid: u16) -> bool {
    let Some(bufs) = st.doorbell_buffers else {
        return true;
    };
    let Some(sq) = st.queues.sq(qid) else {
        return true;
    };
    if qid == 0 {
        return true;
    }
    let ei = event_value(st.eventidx, sq.tail, sq.size);
    if bufs.write_eventidx(pool, qid, false, ei).is_err() {
        st.regs.cfs = true;
        return false;
    }
    // Store-load ordering against the host, which stores the shadow tail and then loads
    // EventIdx: see the module comment.
    fence(Ordering::SeqCst);
    refresh_sq_tail(pool, st, qid)
}

/// Before posting to I/O CQ `cqid` (and after the host moved its head): publish the head
/// known as EventIdx, fence, and take the shadow head, until the two agree. Completions
/// held while the CQ was full go out into the room found.
pub fn sync_cq_head(pool: &DmaPool, st: &mut State, cqid: u16) -> Result<(), Unreachable> {
    let Some(bufs) = st.doorbell_buffers else {
        return Ok(());
    };
    if cqid == 0 {
        return Ok(());
    }
    let drain = st.bus_master;
    let policy = st.eventidx;
    // Each turn the host moved its head; a host cannot do that more than the queue size
    // times while the controller looks, but a broken one must not hold it here forever.
    for _ in 0..=st.queues.cq(cqid).map_or(0, |cq| cq.size) {
        let Some(cq) = st.queues.cq_mut(cqid) else {
            return Ok(());
        };
        let head = cq.head();
        bufs.write_eventidx(pool, cqid, true, event_value(policy, head, cq.size))?;
        fence(Ordering::SeqCst);
        let v = bufs.read_doorbell(pool, cqid, true)?;
        if v == head {
            return Ok(());
        }
        if !cq.set_head(pool, v, drain)? {
            st.counters.note_invalid_doorbell();
            return Ok(());
        }
    }
    Ok(())
}

/// What a polling device does on its own: for every I/O queue, take new work from the
/// shadow tail, and room from the shadow head of a CQ holding completions back. Returns
/// how many queues had new work.
pub fn poll(p: &super::config::Params, pool: &DmaPool, st: &mut State) -> usize {
    if st.doorbell_buffers.is_none() {
        return 0;
    }
    let mut found = 0;
    for qid in 1..=p.io_queues {
        if st.queues.cq(qid).is_some_and(|cq| cq.held() > 0) && sync_cq_head(pool, st, qid).is_err()
        {
            st.regs.cfs = true;
            return found;
        }
        let Some(tail) = st.queues.sq(qid).map(|sq| sq.tail) else {
            continue;
        };
        if !refresh_sq_tail(pool, st, qid) {
            return found;
        }
        let Some(sq) = st.queues.sq(qid) else {
            continue;
        };
        if sq.tail != tail {
            found += 1;
            st.counters.note_shadow_pickup();
        }
        if sq.unfetched() > 0 {
            super::engine::process(p, pool, st, qid);
        }
    }
    found
}
