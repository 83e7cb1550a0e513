//! Admin commands (base spec 5): Identify (namespace, controller, active namespace list),
//! Set Features (Number of Queues, Volatile Write Cache), creating and deleting I/O
//! queues, and Doorbell Buffer Config when offered. Every other opcode is an Invalid
//! Command Opcode.

use nvcopy_vfio::DmaPool;

use super::config::{Params, SIM_VID};
use super::dma::{prp_segments, to_host};
use super::engine::{completion, post, State};
use super::queues::{CompQueue, SubQueue};
use super::regs::VERSION;
use super::shadow::DoorbellBuffers;
use super::status::{
    finish, Done, Exec, ABORTED_SQ_DELETED, COMPLETION_QUEUE_INVALID, INVALID_FIELD,
    INVALID_NAMESPACE, INVALID_OPCODE, INVALID_QUEUE_DELETION, INVALID_QUEUE_ID,
    INVALID_QUEUE_SIZE,
};
use crate::{CQE_SIZE, SQE_SIZE};
use nvcopy_nvme::spec::{admin, Sqe};

/// Identify data structures are one 4 KiB page.
const IDENTIFY_LEN: usize = 4096;
/// Feature: Volatile Write Cache.
const FEAT_VWC: u32 = 0x06;

/// Runs one admin command.
pub fn execute(p: &Params, pool: &DmaPool, st: &mut State, sqe: &Sqe) -> Done {
    finish(match sqe.opcode() {
        admin::IDENTIFY => identify(p, pool, st, sqe),
        admin::SET_FEATURES => set_features(p, sqe),
        admin::CREATE_CQ => create_cq(p, pool, st, sqe),
        admin::CREATE_SQ => create_sq(p, pool, st, sqe),
        admin::DELETE_SQ => delete_sq(pool, st, sqe),
        admin::DELETE_CQ => delete_cq(st, sqe),
        admin::DOORBELL_BUFFER_CONFIG if p.doorbell_buffer => {
            doorbell_buffer_config(p, pool, st, sqe)
        }
        _ => Err(INVALID_OPCODE.into()),
    })
}

fn identify(p: &Params, pool: &DmaPool, st: &mut State, sqe: &Sqe) -> Exec {
    let nn = st.namespaces.len() as u32;
    let data = match sqe.cdw10 & 0xff {
        admin::CNS_NAMESPACE => match sqe.nsid {
            n if n >= 1 && n <= nn => st.namespaces[n as usize - 1].identify(),
            _ => return Err(INVALID_NAMESPACE.into()),
        },
        admin::CNS_CONTROLLER => identify_controller(p, nn, st.faults.crdt),
        admin::CNS_ACTIVE_NS_LIST => {
            if sqe.nsid >= 0xffff_fffe {
                return Err(INVALID_NAMESPACE.into());
            }
            let mut b = vec![0u8; IDENTIFY_LEN];
            let ids = (sqe.nsid.saturating_add(1)..=nn).take(IDENTIFY_LEN / 4);
            for (slot, id) in b.chunks_exact_mut(4).zip(ids) {
                slot.copy_from_slice(&id.to_le_bytes());
            }
            b
        }
        _ => return Err(INVALID_FIELD.into()),
    };
    let segs = prp_segments(pool, sqe.prp1, sqe.prp2, IDENTIFY_LEN, st.regs.page_size())?;
    to_host(pool, &segs, &data)?;
    Ok(0)
}

/// Identify Controller (base spec 5.17.2.1); `crdt` is CRDT1-3 (100 ms units).
fn identify_controller(p: &Params, nn: u32, crdt: [u16; 3]) -> Vec<u8> {
    let mut b = vec![0u8; IDENTIFY_LEN];
    let text = |b: &mut [u8], at: usize, len: usize, s: &str| {
        let field = &mut b[at..at + len];
        field.fill(b' ');
        let n = s.len().min(len);
        field[..n].copy_from_slice(&s.as_bytes()[..n]);
    };
    b[0..2].copy_from_slice(&SIM_VID.to_le_bytes()); // VID
    b[2..4].copy_from_slice(&SIM_VID.to_le_bytes()); // SSVID
    text(&mut b, 4, 20, &p.serial); // SN
    text(&mut b, 24, 40, &p.model); // MN
    text(&mut b, 64, 8, &p.firmware); // FR
    b[72] = 6; // RAB
    b[77] = p.mdts; // MDTS
    b[78..80].copy_from_slice(&1u16.to_le_bytes()); // CNTLID
    b[80..84].copy_from_slice(&VERSION.to_le_bytes()); // VER
    b[111] = 1; // CNTRLTYPE: I/O controller
    let oacs: u16 = if p.doorbell_buffer { 1 << 8 } else { 0 };
    b[256..258].copy_from_slice(&oacs.to_le_bytes()); // OACS: Doorbell Buffer Config
    for (i, t) in crdt.iter().enumerate() {
        b[134 + 2 * i..136 + 2 * i].copy_from_slice(&t.to_le_bytes()); // CRDT1-3
    }
    b[512] = 0x66; // SQES: 64 bytes
    b[513] = 0x44; // CQES: 16 bytes
    let maxcmd = p.mqes.min(u16::MAX as u32) as u16;
    b[514..516].copy_from_slice(&maxcmd.to_le_bytes()); // MAXCMD
    b[516..520].copy_from_slice(&nn.to_le_bytes()); // NN
    b[520..522].copy_from_slice(&p.oncs.to_le_bytes()); // ONCS
    b[525] = p.vwc as u8; // VWC
    b[534..536].copy_from_slice(&p.ocfs.to_le_bytes()); // OCFS
    let n = p.subnqn.len().min(255);
    b[768..768 + n].copy_from_slice(&p.subnqn.as_bytes()[..n]); // SUBNQN, NUL padded
    b
}

fn set_features(p: &Params, sqe: &Sqe) -> Exec {
    match sqe.cdw10 & 0xff {
        admin::FEAT_NUM_QUEUES => {
            let (nsqr, ncqr) = (sqe.cdw11 & 0xffff, sqe.cdw11 >> 16);
            if nsqr == 0xffff || ncqr == 0xffff {
                return Err(INVALID_FIELD.into());
            }
            // The controller grants what it has, whatever was asked (0-based counts).
            let n = p.io_queues as u32 - 1;
            Ok(n | n << 16)
        }
        FEAT_VWC if p.vwc => Ok(0),
        _ => Err(INVALID_FIELD.into()),
    }
}

/// Queue id and size (entries) of a Create I/O queue command, checked against the
/// controller's limits.
fn new_queue(p: &Params, sqe: &Sqe) -> Result<(u16, u32), Done> {
    let qid = (sqe.cdw10 & 0xffff) as u16;
    let size = (sqe.cdw10 >> 16) + 1;
    if qid == 0 || qid > p.io_queues {
        return Err(INVALID_QUEUE_ID.into());
    }
    if size < 2 || size > p.mqes {
        return Err(INVALID_QUEUE_SIZE.into());
    }
    if sqe.cdw11 & 1 == 0 {
        // CAP.CQR: only physically contiguous queues.
        return Err(INVALID_FIELD.into());
    }
    Ok((qid, size))
}

/// The queue's memory must be page aligned and inside the host's DMA memory.
fn queue_memory(pool: &DmaPool, st: &State, base: u64, bytes: usize) -> Result<(), Done> {
    if base % st.regs.page_size() as u64 != 0
        || pool.slice_at(nvcopy_vfio::Iova(base), bytes).is_none()
    {
        return Err(INVALID_FIELD.into());
    }
    Ok(())
}

fn create_cq(p: &Params, pool: &DmaPool, st: &mut State, sqe: &Sqe) -> Exec {
    let (qid, size) = new_queue(p, sqe)?;
    if st.queues.cq(qid).is_some() {
        return Err(INVALID_QUEUE_ID.into());
    }
    queue_memory(pool, st, sqe.prp1, size as usize * CQE_SIZE)?;
    st.queues.add_cq(qid, CompQueue::new(sqe.prp1, size));
    Ok(0)
}

fn create_sq(p: &Params, pool: &DmaPool, st: &mut State, sqe: &Sqe) -> Exec {
    let (qid, size) = new_queue(p, sqe)?;
    if st.queues.sq(qid).is_some() {
        return Err(INVALID_QUEUE_ID.into());
    }
    let cqid = (sqe.cdw11 >> 16) as u16;
    if cqid == 0 || st.queues.cq(cqid).is_none() {
        return Err(COMPLETION_QUEUE_INVALID.into());
    }
    queue_memory(pool, st, sqe.prp1, size as usize * SQE_SIZE)?;
    st.queues.add_sq(qid, SubQueue::new(sqe.prp1, size, cqid));
    Ok(0)
}

/// Deletes an I/O SQ. Commands still in it are completed as aborted (base spec 5.6).
fn delete_sq(pool: &DmaPool, st: &mut State, sqe: &Sqe) -> Exec {
    let qid = (sqe.cdw10 & 0xffff) as u16;
    if qid == 0 {
        return Err(INVALID_QUEUE_ID.into());
    }
    let Some(mut sq) = st.queues.remove_sq(qid) else {
        return Err(INVALID_QUEUE_ID.into());
    };
    while let Ok(Some(cmd)) = sq.fetch(pool) {
        let cqe = completion(ABORTED_SQ_DELETED.into(), sq.head, qid, cmd.cid());
        post(pool, st, sq.cqid, cqe);
    }
    Ok(0)
}

fn delete_cq(st: &mut State, sqe: &Sqe) -> Exec {
    let qid = (sqe.cdw10 & 0xffff) as u16;
    match st.queues.cq(qid) {
        _ if qid == 0 => Err(INVALID_QUEUE_ID.into()),
        None => Err(INVALID_QUEUE_ID.into()),
        Some(cq) if cq.bound > 0 => Err(INVALID_QUEUE_DELETION.into()),
        Some(_) => {
            st.queues.remove_cq(qid);
            Ok(0)
        }
    }
}

/// Doorbell Buffer Config (base spec 1.3 5.7): PRP1 is the Shadow Doorbell buffer, PRP2
/// the EventIdx buffer, each memory-page aligned. As QEMU does, the queues that exist get
/// their current tail or head written to their shadow entries; queues created later start
/// from the host's entries (which a host zeroes before creating a queue).
fn doorbell_buffer_config(p: &Params, pool: &DmaPool, st: &mut State, sqe: &Sqe) -> Exec {
    let page = st.regs.page_size() as u64;
    let (doorbells, eventidx) = (sqe.prp1, sqe.prp2);
    if doorbells == 0 || eventidx == 0 || doorbells % page != 0 || eventidx % page != 0 {
        return Err(INVALID_FIELD.into());
    }
    let bufs = DoorbellBuffers::new(doorbells, eventidx, p.stride);
    for qid in 0..=p.io_queues {
        if let Some(sq) = st.queues.sq(qid) {
            bufs.write_doorbell(pool, qid, false, sq.tail)
                .map_err(|_| Done::from(INVALID_FIELD))?;
        }
        if let Some(cq) = st.queues.cq(qid) {
            bufs.write_doorbell(pool, qid, true, cq.head())
                .map_err(|_| Done::from(INVALID_FIELD))?;
        }
    }
    st.doorbell_buffers = Some(bufs);
    Ok(0)
}
