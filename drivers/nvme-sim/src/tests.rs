//! The controller model on its own, driven through raw register stores and hand-built
//! queue entries: what the driver never does (full CQs, bad queue ids, chained PRP lists,
//! size limits) is checked here.

use std::sync::Arc;

use nvcopy_vfio::{Bytes, DmaBuf, DmaPool, Iova, PAGE_SIZE};

use super::dma::{prp_segments, Segment};
use super::*;
use crate::{CQE_SIZE, SQE_SIZE};
use nvcopy_nvme::spec::{admin, cc, csts, doorbell_offset, io, reg, Cap, Cqe, Sqe};
use nvcopy_nvme::{Status, StatusKind};

/// One queue pair as a minimal host keeps it.
struct RawQueue {
    qid: u16,
    sq: DmaBuf,
    cq: DmaBuf,
    size: u32,
    cq_size: u32,
    tail: u32,
    head: u32,
    phase: u16,
    stride: usize,
    next_cid: u16,
}

impl RawQueue {
    fn new(pool: &DmaPool, qid: u16, sq_size: u32, cq_size: u32, stride: usize) -> Self {
        RawQueue {
            qid,
            sq: pool.alloc_zeroed(sq_size as usize * SQE_SIZE).unwrap(),
            cq: pool.alloc_zeroed(cq_size as usize * CQE_SIZE).unwrap(),
            size: sq_size,
            cq_size,
            tail: 0,
            head: 0,
            phase: 1,
            stride,
            next_cid: 0,
        }
    }

    /// Writes an entry (with a fresh command id) without ringing; returns the id.
    fn post(&mut self, mut sqe: Sqe) -> u16 {
        let cid = self.next_cid;
        self.next_cid += 1;
        sqe.set_cid(cid);
        self.sq
            .slice()
            .write_obj(sqe, self.tail as usize * SQE_SIZE)
            .unwrap();
        self.tail = (self.tail + 1) % self.size;
        cid
    }

    fn ring(&self, sim: &SimController) {
        sim.write32(doorbell_offset(self.qid, false, self.stride), self.tail);
    }

    /// The next completion, if the controller posted one.
    fn reap(&mut self) -> Option<Cqe> {
        let cqe: Cqe = self
            .cq
            .slice()
            .read_obj(self.head as usize * CQE_SIZE)
            .unwrap();
        if cqe.status & 1 != self.phase {
            return None;
        }
        self.head += 1;
        if self.head == self.cq_size {
            self.head = 0;
            self.phase ^= 1;
        }
        Some(cqe)
    }

    fn release(&self, sim: &SimController) {
        sim.write32(doorbell_offset(self.qid, true, self.stride), self.head);
    }

    /// Runs one command to completion.
    fn cmd(&mut self, sim: &SimController, sqe: Sqe) -> Cqe {
        let cid = self.post(sqe);
        self.ring(sim);
        let cqe = self.reap().expect("the controller completes synchronously");
        self.release(sim);
        assert_eq!(cqe.cid, cid);
        cqe
    }
}

fn status(cqe: &Cqe) -> Status {
    Status::from_cqe_word(cqe.status)
}

struct Host {
    sim: Arc<SimController>,
    pool: DmaPool,
    admin: RawQueue,
    stride: usize,
}

impl Host {
    fn new(config: SimConfig) -> Host {
        Self::with_admin(config, 8, 8)
    }

    fn with_admin(config: SimConfig, sq: u32, cq: u32) -> Host {
        let pool = DmaPool::unmapped(8 << 20).unwrap();
        let sim = SimController::new(config, pool.clone());
        let stride = Cap(sim.read64(reg::CAP)).doorbell_stride();
        let admin = RawQueue::new(&pool, 0, sq, cq, stride);
        sim.write32(reg::AQA, (sq - 1) | (cq - 1) << 16);
        sim.write64(reg::ASQ, admin.sq.iova().0);
        sim.write64(reg::ACQ, admin.cq.iova().0);
        sim.write32(reg::CC, cc::EN | cc::IOSQES_64 | cc::IOCQES_16);
        assert!(sim.is_ready());
        Host {
            sim,
            pool,
            admin,
            stride,
        }
    }

    fn admin(&mut self, sqe: Sqe) -> Cqe {
        self.admin.cmd(&self.sim, sqe)
    }

    fn create_cq(&mut self, qid: u16, size: u32, base: Iova) -> Status {
        let mut s = Sqe::new(admin::CREATE_CQ, 0);
        s.prp1 = base.0;
        s.cdw10 = qid as u32 | (size - 1) << 16;
        s.cdw11 = 1;
        status(&self.admin(s))
    }

    fn create_sq(&mut self, qid: u16, size: u32, base: Iova, cqid: u16) -> Status {
        let mut s = Sqe::new(admin::CREATE_SQ, 0);
        s.prp1 = base.0;
        s.cdw10 = qid as u32 | (size - 1) << 16;
        s.cdw11 = 1 | (cqid as u32) << 16;
        status(&self.admin(s))
    }

    fn delete(&mut self, opcode: u8, qid: u16) -> Status {
        let mut s = Sqe::new(opcode, 0);
        s.cdw10 = qid as u32;
        status(&self.admin(s))
    }

    /// Controller reset (CC.EN 1 -> 0, if still enabled), then a new admin queue pair and
    /// CC.EN 0 -> 1, the way a host recovers a controller.
    fn reenable(&mut self, sq: u32, cq: u32) {
        if self.sim.read32(reg::CC) & cc::EN != 0 {
            self.sim.write32(reg::CC, 0);
        }
        assert_eq!(self.sim.read32(reg::CSTS) & csts::RDY, 0);
        self.admin = RawQueue::new(&self.pool, 0, sq, cq, self.stride);
        self.sim.write32(reg::AQA, (sq - 1) | (cq - 1) << 16);
        self.sim.write64(reg::ASQ, self.admin.sq.iova().0);
        self.sim.write64(reg::ACQ, self.admin.cq.iova().0);
        self.sim
            .write32(reg::CC, cc::EN | cc::IOSQES_64 | cc::IOCQES_16);
        assert!(self.sim.is_ready());
    }

    fn io_queue(&mut self, qid: u16, size: u32) -> RawQueue {
        let q = RawQueue::new(&self.pool, qid, size, size, self.stride);
        assert!(self.create_cq(qid, size, q.cq.iova()).is_success());
        assert!(self.create_sq(qid, size, q.sq.iova(), qid).is_success());
        q
    }
}

fn read_buf(buf: &DmaBuf) -> Vec<u8> {
    let mut v = vec![0u8; buf.len()];
    buf.read_at(0, &mut v);
    v
}

fn one_ns() -> SimConfig {
    SimConfig::new().namespace(NamespaceConfig::new(512, 1024))
}

fn rw(opcode: u8, nsid: u32, slba: u64, blocks: u32, buf: &DmaBuf) -> Sqe {
    let mut s = Sqe::new(opcode, nsid);
    s.set_slba(slba);
    s.cdw12 = blocks - 1;
    s.prp1 = buf.iova().0;
    if blocks as usize * 512 > PAGE_SIZE {
        assert!(blocks as usize * 512 <= 2 * PAGE_SIZE);
        s.prp2 = buf.iova().0 + PAGE_SIZE as u64;
    }
    s
}

#[test]
fn registers_reset_and_shutdown() {
    let pool = DmaPool::unmapped(1 << 20).unwrap();
    let cfg = one_ns()
        .max_queue_entries(256)
        .doorbell_stride(2)
        .cap_timeout(7)
        .io_queues(3);
    let sim = SimController::new(cfg, pool.clone());
    let cap = Cap(sim.read64(reg::CAP));
    assert_eq!(cap.mqes(), 256);
    assert!(cap.cqr() && cap.supports_nvm());
    assert_eq!(cap.timeout_ms(), 3500);
    assert_eq!(cap.doorbell_stride(), 16);
    assert_eq!(cap.mps_min(), 4096);
    assert_eq!(sim.read32(reg::VS), 0x0002_0000);
    assert!(sim.len() >= doorbell_offset(3, true, 16) + 4);
    assert_eq!(sim.read32(reg::CSTS), 0);

    // Enabling with an admin queue outside host memory is fatal, not ready.
    sim.write32(reg::AQA, 3 | 3 << 16);
    sim.write64(reg::ASQ, 0x1000);
    sim.write64(reg::ACQ, 0x2000);
    sim.write32(reg::CC, cc::EN);
    assert_eq!(sim.read32(reg::CSTS) & (csts::CFS | csts::RDY), csts::CFS);
    // A reset clears the controller's own fatal status.
    sim.write32(reg::CC, 0);
    assert_eq!(sim.read32(reg::CSTS), 0);

    let q = pool.alloc_zeroed(2 * PAGE_SIZE).unwrap();
    sim.write64(reg::ASQ, q.iova().0);
    sim.write64(reg::ACQ, q.iova().0 + PAGE_SIZE as u64);
    assert_eq!(sim.read64(reg::ASQ), q.iova().0);
    sim.write32(reg::CC, cc::EN | cc::IOSQES_64 | cc::IOCQES_16);
    assert_eq!(sim.read32(reg::CSTS), csts::RDY);
    assert!(sim.queue_status(0).is_some());
    sim.write32(reg::CC, sim.read32(reg::CC) | cc::SHN_NORMAL);
    assert_eq!(sim.read32(reg::CSTS) & csts::SHST_MASK, csts::SHST_COMPLETE);
    sim.write32(reg::CC, 0);
    assert_eq!(sim.read32(reg::CSTS), 0);
    assert!(sim.queue_status(0).is_none(), "reset deletes the queues");

    // An injected fatal status shows in CSTS and keeps the controller from becoming ready.
    sim.faults().set_fatal(true);
    sim.write32(reg::CC, cc::EN);
    assert_eq!(sim.read32(reg::CSTS), csts::CFS);
    sim.faults().set_fatal(false);
    sim.write32(reg::CC, 0);
    sim.write32(reg::CC, cc::EN);
    assert!(sim.is_ready());
}

#[test]
fn completions_carry_phase_head_queue_and_id_across_wraps() {
    let mut h = Host::with_admin(one_ns(), 4, 4);
    let page = h.pool.alloc(PAGE_SIZE).unwrap();
    for i in 0..11u32 {
        let mut s = Sqe::new(admin::IDENTIFY, 0);
        s.cdw10 = admin::CNS_CONTROLLER;
        s.prp1 = page.iova().0;
        let phase = h.admin.phase;
        let cqe = h.admin(s);
        assert!(status(&cqe).is_success());
        assert_eq!(cqe.status & 1, phase);
        assert_eq!(cqe.sq_head as u32, (i + 1) % 4);
        assert_eq!(cqe.sq_id, 0);
        assert_eq!(cqe.cid as u32, i);
    }
    let mut sn = [0u8; 20];
    page.read_at(4, &mut sn);
    assert_eq!(&sn[..7], b"SIM0001");
    assert_eq!(h.sim.counters().admin_commands(admin::IDENTIFY), 11);
}

#[test]
fn a_full_completion_queue_holds_completions_in_order() {
    // A 2-entry CQ holds one completion; three commands are submitted at once.
    let mut h = Host::with_admin(one_ns(), 8, 2);
    let mut s = Sqe::new(admin::SET_FEATURES, 0);
    s.cdw10 = admin::FEAT_NUM_QUEUES;
    let cids: Vec<u16> = (0..3).map(|_| h.admin.post(s)).collect();
    h.admin.ring(&h.sim);
    let st = h.sim.queue_status(0).unwrap();
    assert_eq!((st.sq_unfetched, st.cq_unconsumed, st.cq_held), (0, 1, 2));
    let mut seen = vec![];
    for _ in 0..3 {
        let cqe = h.admin.reap().expect("one completion is visible");
        assert!(
            h.admin.reap().is_none(),
            "the slot after it was not overwritten"
        );
        assert_eq!(cqe.dw0, 3 | 3 << 16, "four I/O queues granted, 0-based");
        seen.push(cqe.cid);
        h.admin.release(&h.sim);
    }
    assert_eq!(seen, cids);
    assert_eq!(h.sim.queue_status(0).unwrap().cq_held, 0);
    // A head doorbell beyond what was posted is ignored.
    let before = h.sim.counters().invalid_doorbell_writes();
    let ahead = (h.admin.head + 1) % 2;
    h.sim.write32(doorbell_offset(0, true, h.stride), ahead);
    assert_eq!(h.sim.counters().invalid_doorbell_writes(), before + 1);
}

#[test]
fn queue_management_statuses() {
    let mut h = Host::new(one_ns().io_queues(2).max_queue_entries(64));
    let mem = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    let base = mem.iova();
    let kind = |s: Status| s.kind();
    assert_eq!(kind(h.create_cq(0, 4, base)), StatusKind::InvalidQueueId);
    assert_eq!(kind(h.create_cq(3, 4, base)), StatusKind::InvalidQueueId);
    assert_eq!(kind(h.create_cq(1, 65, base)), StatusKind::InvalidQueueSize);
    assert_eq!(kind(h.create_cq(1, 1, base)), StatusKind::InvalidQueueSize);
    assert_eq!(
        kind(h.create_cq(1, 4, Iova(1 << 50))),
        StatusKind::InvalidField
    );
    assert_eq!(
        kind(h.create_cq(1, 4, base.add(512))),
        StatusKind::InvalidField
    );
    // No CQ 1 yet: Completion Queue Invalid (SCT 1h, SC 00h).
    let s = h.create_sq(1, 4, base, 1);
    assert_eq!((s.sct_raw(), s.sc()), (1, 0x00));
    assert!(h.create_cq(1, 4, base).is_success());
    assert_eq!(kind(h.create_cq(1, 4, base)), StatusKind::InvalidQueueId);
    let sq = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    assert!(h.create_sq(1, 4, sq.iova(), 1).is_success());
    assert_eq!(
        kind(h.create_sq(1, 4, sq.iova(), 1)),
        StatusKind::InvalidQueueId
    );
    // The CQ still has an SQ: Invalid Queue Deletion (SCT 1h, SC 0Ch).
    let s = h.delete(admin::DELETE_CQ, 1);
    assert_eq!((s.sct_raw(), s.sc(), s.dnr()), (1, 0x0c, true));
    assert_eq!(
        kind(h.delete(admin::DELETE_SQ, 2)),
        StatusKind::InvalidQueueId
    );
    assert_eq!(
        kind(h.delete(admin::DELETE_SQ, 0)),
        StatusKind::InvalidQueueId
    );
    assert!(h.delete(admin::DELETE_SQ, 1).is_success());
    assert!(h.delete(admin::DELETE_CQ, 1).is_success());
    assert_eq!(
        kind(h.delete(admin::DELETE_CQ, 1)),
        StatusKind::InvalidQueueId
    );
    let s = status(&h.admin(Sqe::new(0xc0, 0)));
    assert_eq!((s.kind(), s.dnr()), (StatusKind::InvalidOpcode, true));
    let mut id = Sqe::new(admin::IDENTIFY, 9);
    id.prp1 = mem.iova().0;
    assert_eq!(kind(status(&h.admin(id))), StatusKind::InvalidNamespace);
}

#[test]
fn deleting_a_submission_queue_aborts_what_it_holds() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc(PAGE_SIZE).unwrap();
    h.sim.faults().pause_io();
    let a = q.post(rw(io::READ, 1, 0, 1, &buf));
    let b = q.post(rw(io::READ, 1, 1, 1, &buf));
    q.ring(&h.sim);
    assert!(q.reap().is_none());
    assert_eq!(h.sim.queue_status(1).unwrap().sq_unfetched, 2);
    assert!(h.delete(admin::DELETE_SQ, 1).is_success());
    for cid in [a, b] {
        let cqe = q.reap().expect("aborted command completes");
        assert_eq!(cqe.cid, cid);
        assert_eq!(status(&cqe).kind(), StatusKind::AbortedSqDeleted);
    }
}

#[test]
fn io_commands_check_what_a_device_checks() {
    let cfg = SimConfig::new()
        .mdts(1)
        .namespace(NamespaceConfig::new(512, 1024).copy_limits(8, 12, 2));
    let mut h = Host::new(cfg);
    let mut q = h.io_queue(1, 16);
    let buf = h.pool.alloc_zeroed(4 * PAGE_SIZE).unwrap();
    let run = |q: &mut RawQueue, s: Sqe| q.cmd(&h.sim, s);

    let st = status(&run(&mut q, rw(io::READ, 2, 0, 1, &buf)));
    assert_eq!((st.kind(), st.dnr()), (StatusKind::InvalidNamespace, true));
    let st = status(&run(&mut q, rw(io::READ, 1, 1020, 8, &buf)));
    assert_eq!((st.kind(), st.dnr()), (StatusKind::LbaOutOfRange, true));
    let st = status(&run(&mut q, rw(io::WRITE, 1, u64::MAX, 1, &buf)));
    assert_eq!(st.kind(), StatusKind::LbaOutOfRange);
    // MDTS 1: 8 KiB. Seventeen blocks is one too many.
    let mut big = rw(io::READ, 1, 0, 16, &buf);
    assert!(status(&run(&mut q, big)).is_success());
    big.cdw12 = 16;
    assert_eq!(status(&run(&mut q, big)).kind(), StatusKind::InvalidField);
    // PRP1 not dword aligned; PRP2 with an offset.
    let mut s = rw(io::READ, 1, 0, 1, &buf);
    s.prp1 += 2;
    assert_eq!(status(&run(&mut q, s)).sc(), 0x13);
    let mut s = rw(io::READ, 1, 0, 2, &buf);
    s.prp1 += PAGE_SIZE as u64 - 512;
    s.prp2 = buf.iova().0 + PAGE_SIZE as u64 + 8;
    assert_eq!(status(&run(&mut q, s)).sc(), 0x13);
    // Memory outside the pool.
    let mut s = rw(io::READ, 1, 0, 1, &buf);
    s.prp1 = 1 << 50;
    assert_eq!(
        status(&run(&mut q, s)).kind(),
        StatusKind::DataTransferError
    );
    assert_eq!(
        status(&run(&mut q, Sqe::new(0x7f, 1))).kind(),
        StatusKind::InvalidOpcode
    );
    assert!(status(&run(&mut q, Sqe::new(io::FLUSH, u32::MAX))).is_success());

    // Copy: descriptors at `buf`, limits MSSRL 8, MCL 12, two ranges.
    let copy = |ranges: &[(u64, u16)], dst: u64| {
        for (i, &(slba, n)) in ranges.iter().enumerate() {
            let mut d = [0u8; 32];
            d[8..16].copy_from_slice(&slba.to_le_bytes());
            d[16..18].copy_from_slice(&(n - 1).to_le_bytes());
            buf.write_at(i * 32, &d);
        }
        let mut s = Sqe::new(io::COPY, 1);
        s.set_slba(dst);
        s.cdw12 = ranges.len() as u32 - 1;
        s.prp1 = buf.iova().0;
        s
    };
    let limit = |c: &Cqe| {
        let s = status(c);
        ((s.sct_raw(), s.sc()), c.dw0)
    };
    assert_eq!(
        limit(&run(&mut q, copy(&[(0, 4), (8, 4), (16, 1)], 100))),
        ((1, 0x83), 0),
        "three ranges, MSRC allows two"
    );
    assert_eq!(
        limit(&run(&mut q, copy(&[(0, 4), (8, 9)], 100))),
        ((1, 0x83), 1),
        "range 1 above MSSRL"
    );
    assert_eq!(
        limit(&run(&mut q, copy(&[(0, 8), (8, 5)], 100))),
        ((1, 0x83), 1),
        "13 blocks above MCL"
    );
    assert_eq!(
        limit(&run(&mut q, copy(&[(0, 8), (1021, 4)], 100))),
        ((0, 0x80), 1),
        "range 1 past the end"
    );
    let mut bad_format = copy(&[(0, 1)], 100);
    bad_format.cdw12 |= 1 << 8;
    assert_eq!(
        status(&run(&mut q, bad_format)).kind(),
        StatusKind::InvalidField
    );
    h.sim.write_ns(1, 0, &[0xab; 512 * 12]).unwrap();
    assert!(status(&run(&mut q, copy(&[(0, 8), (8, 4)], 100))).is_success());
    let mut out = vec![0u8; 512 * 12];
    h.sim.read_ns(1, 100 * 512, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0xab));

    // DSM without the deallocate attribute is a hint and changes nothing.
    let mut r = [0u8; 16];
    r[4..8].copy_from_slice(&4u32.to_le_bytes());
    r[8..16].copy_from_slice(&100u64.to_le_bytes());
    buf.write_at(0, &r);
    let mut dsm = Sqe::new(io::DSM, 1);
    dsm.prp1 = buf.iova().0;
    assert!(status(&run(&mut q, dsm)).is_success());
    h.sim.read_ns(1, 100 * 512, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0xab));
    dsm.cdw11 = 1 << 2;
    assert!(status(&run(&mut q, dsm)).is_success());
    h.sim.read_ns(1, 100 * 512, &mut out).unwrap();
    assert!(out[..4 * 512].iter().all(|&b| b == 0));
    assert!(out[4 * 512..].iter().all(|&b| b == 0xab));
}

#[test]
fn switched_off_optional_commands_are_invalid_opcodes() {
    let cfg = one_ns().copy(false).write_zeroes(false).dsm(false);
    let mut h = Host::new(cfg);
    let mut q = h.io_queue(1, 4);
    for op in [io::COPY, io::WRITE_ZEROES, io::DSM] {
        let cqe = q.cmd(&h.sim, Sqe::new(op, 1));
        assert_eq!(status(&cqe).kind(), StatusKind::InvalidOpcode, "{op:#x}");
    }
}

#[test]
fn prp_lists_chain_to_the_next_list_page() {
    let pool = DmaPool::unmapped(64 * PAGE_SIZE).unwrap();
    // Every other page, so that no two data pages are adjacent.
    let (data, _gaps): (Vec<DmaBuf>, Vec<DmaBuf>) = (0..5)
        .map(|_| {
            (
                pool.alloc(PAGE_SIZE).unwrap(),
                pool.alloc(PAGE_SIZE).unwrap(),
            )
        })
        .unzip();
    let lists = pool.alloc(2 * PAGE_SIZE).unwrap();
    // The first list starts 16 bytes before the end of its page: one data entry, then a
    // pointer to the second list page, which holds the rest.
    let first_list = lists.iova().0 + PAGE_SIZE as u64 - 16;
    let second_list = lists.iova().0 + PAGE_SIZE as u64;
    let entry = |i: usize| data[i].iova().0.to_le_bytes();
    lists.write_at(PAGE_SIZE - 16, &entry(1));
    lists.write_at(PAGE_SIZE - 8, &second_list.to_le_bytes());
    for (slot, i) in (2..5).enumerate() {
        lists.write_at(PAGE_SIZE + slot * 8, &entry(i));
    }
    let prp1 = data[0].iova().0 + 1024;
    let len = 4 * PAGE_SIZE - 1024 + 100;
    let segs = prp_segments(&pool, prp1, first_list, len, PAGE_SIZE).unwrap();
    let total: usize = segs.iter().map(|s| s.len).sum();
    assert_eq!(total, len);
    assert_eq!(
        segs[0],
        Segment {
            iova: prp1,
            len: PAGE_SIZE - 1024
        }
    );
    let starts: Vec<u64> = segs.iter().map(|s| s.iova).collect();
    let pages: Vec<u64> = data.iter().map(|d| d.iova().0).collect();
    assert_eq!(starts[1..], pages[1..]);
    assert_eq!(segs[4].len, 100);
    // A list entry with an offset is refused.
    lists.write_at(PAGE_SIZE, &(data[2].iova().0 + 8).to_le_bytes());
    assert_eq!(
        prp_segments(&pool, prp1, first_list, len, PAGE_SIZE).unwrap_err(),
        super::status::PRP_OFFSET_INVALID
    );
    // A list that chains to itself ends instead of spinning.
    lists.write_at(PAGE_SIZE - 8, &first_list.to_le_bytes());
    assert!(prp_segments(&pool, prp1, first_list, len, PAGE_SIZE).is_err());
}

#[test]
fn doorbells_follow_the_stride_and_bad_ones_are_counted() {
    let mut h = Host::new(one_ns().doorbell_stride(1).io_queues(2));
    assert_eq!(h.stride, 8);
    let mut q = h.io_queue(2, 4);
    let buf = h.pool.alloc(PAGE_SIZE).unwrap();
    assert!(status(&q.cmd(&h.sim, rw(io::READ, 1, 0, 1, &buf))).is_success());
    let c = h.sim.counters();
    assert_eq!((c.sq_doorbell_writes(2), c.cq_doorbell_writes(2)), (1, 1));
    assert_eq!(c.io_commands(io::READ), 1);
    // Between doorbells; a queue that does not exist; a tail outside the queue.
    h.sim.write32(reg::DOORBELL_BASE + 4, 1);
    h.sim.write32(doorbell_offset(1, false, 8), 0);
    h.sim.write32(doorbell_offset(2, false, 8), 4);
    assert_eq!(h.sim.counters().invalid_doorbell_writes(), 3);
    assert_eq!(h.sim.queue_status(2).unwrap().sq_unfetched, 0);
}

#[test]
fn quiesce_stops_all_dma_until_the_controller_is_enabled_again() {
    let mut h = Host::with_admin(one_ns(), 8, 2);
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    h.sim.write_ns(1, 0, &[0x5a; 512]).unwrap();

    // The admin CQ (2 entries) holds one completion; a second one waits for room.
    let mut sf = Sqe::new(admin::SET_FEATURES, 0);
    sf.cdw10 = admin::FEAT_NUM_QUEUES;
    h.admin.post(sf);
    h.admin.post(sf);
    h.admin.ring(&h.sim);
    assert_eq!(h.sim.queue_status(0).unwrap().cq_held, 1);

    assert!(h.sim.bus_master());
    assert!(h.sim.quiesce());
    assert!(!h.sim.bus_master());
    // A doorbell moves the tail, but nothing is fetched, read or completed.
    q.post(rw(io::READ, 1, 0, 1, &buf));
    q.ring(&h.sim);
    assert_eq!(h.sim.queue_status(1).unwrap().sq_unfetched, 1);
    assert!(q.reap().is_none());
    assert_eq!(read_buf(&buf), vec![0u8; PAGE_SIZE]);
    // Freeing CQ room does not post the held completion.
    assert!(h.admin.reap().is_some());
    h.admin.release(&h.sim);
    assert!(h.admin.reap().is_none());
    assert_eq!(h.sim.queue_status(0).unwrap().cq_held, 1);
    // Registers still work: CSTS reads, and the controller can be reset.
    assert_eq!(h.sim.read32(reg::CSTS), csts::RDY);
    h.sim.write32(reg::CC, 0);
    assert_eq!(h.sim.read32(reg::CSTS), 0);
    assert!(
        !h.sim.bus_master(),
        "a reset alone does not turn it back on"
    );

    // Enabling again models the host re-initialising the function.
    h.reenable(8, 8);
    assert!(h.sim.bus_master());
    let mut q = h.io_queue(1, 8);
    assert!(status(&q.cmd(&h.sim, rw(io::READ, 1, 0, 1, &buf))).is_success());
    assert_eq!(read_buf(&buf)[..512], [0x5a; 512]);
}

#[test]
fn a_failing_quiesce_leaves_dma_running() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    h.sim.faults().quiesce_fails(true);
    assert!(!h.sim.quiesce());
    assert!(h.sim.bus_master());
    assert!(status(&q.cmd(&h.sim, rw(io::READ, 1, 0, 1, &buf))).is_success());
    h.sim.faults().clear();
    assert!(h.sim.quiesce());
}

#[test]
fn threaded_sim_quiesces_the_model() {
    let pool = DmaPool::unmapped(1 << 20).unwrap();
    let sim = SimController::new(one_ns(), pool);
    let t = ThreadedSim::start(sim.clone());
    assert!(t.quiesce());
    assert!(!sim.bus_master());
    sim.faults().quiesce_fails(true);
    sim.write32(reg::CC, cc::EN);
    assert!(!t.quiesce());
}

#[test]
fn a_stuck_controller_stays_ready_and_keeps_running_commands() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    h.sim.faults().stuck_ready(true);
    h.sim.write32(reg::CC, 0);
    assert_eq!(h.sim.read32(reg::CSTS) & csts::RDY, csts::RDY);
    assert!(status(&q.cmd(&h.sim, rw(io::READ, 1, 0, 1, &buf))).is_success());
    // Setting CC.EN again does not take new admin queues: the old ones still run.
    h.sim
        .write32(reg::CC, cc::EN | cc::IOSQES_64 | cc::IOCQES_16);
    assert!(h.sim.queue_status(1).is_some());
    h.sim.write32(reg::CC, 0);
    // Lifting the fault completes the reset asked for.
    h.sim.faults().stuck_ready(false);
    assert_eq!(h.sim.read32(reg::CSTS), 0);
    assert!(h.sim.queue_status(1).is_none());
    h.reenable(8, 8);
    let mut q = h.io_queue(1, 8);
    assert!(status(&q.cmd(&h.sim, rw(io::READ, 1, 0, 1, &buf))).is_success());
}

const LATE: std::time::Duration = std::time::Duration::from_millis(30);

fn after_late() {
    std::thread::sleep(LATE + std::time::Duration::from_millis(10));
}

#[test]
fn a_late_read_moves_its_data_and_completes_only_when_due() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    h.sim.write_ns(1, 0, &[0x11; 512]).unwrap();
    let f = h
        .sim
        .faults()
        .late(CommandFilter::io().opcode(io::READ).times(1), LATE);
    let cid = q.post(rw(io::READ, 1, 0, 1, &buf));
    q.ring(&h.sim);
    assert_eq!(h.sim.queue_status(1).unwrap().sq_unfetched, 0, "fetched");
    assert_eq!(h.sim.held_commands(), 1);
    // Other commands are not held up behind it.
    assert!(status(&q.cmd(&h.sim, Sqe::new(io::FLUSH, 1))).is_success());
    h.sim.write_ns(1, 0, &[0x22; 512]).unwrap();
    h.sim.run_due();
    assert!(q.reap().is_none());
    assert_eq!(read_buf(&buf), vec![0u8; PAGE_SIZE], "no data yet");
    after_late();
    // Any register access lets it land.
    h.sim.read32(reg::CSTS);
    let cqe = q.reap().expect("late completion");
    assert_eq!((cqe.cid, cqe.sq_id), (cid, 1));
    assert!(status(&cqe).is_success());
    assert_eq!(read_buf(&buf)[..512], [0x22; 512], "read when it ran");
    assert_eq!(h.sim.held_commands(), 0);
    assert_eq!(h.sim.faults().hits(f), 1);
    assert_eq!(h.sim.counters().held(), 1);
}

#[test]
fn a_late_write_changes_the_namespace_only_when_due() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    buf.write_at(0, &[0x33; 512]);
    h.sim.faults().delay(CommandFilter::io().lbas(5..6), LATE);
    q.post(rw(io::WRITE, 1, 5, 1, &buf));
    q.ring(&h.sim);
    let mut out = [0u8; 512];
    h.sim.read_ns(1, 5 * 512, &mut out).unwrap();
    assert_eq!(out, [0; 512]);
    after_late();
    h.sim.run_due();
    assert!(status(&q.reap().expect("completion")).is_success());
    h.sim.read_ns(1, 5 * 512, &mut out).unwrap();
    assert_eq!(out, [0x33; 512]);
}

#[test]
fn a_reset_or_a_quiesce_drops_late_commands() {
    let mut h = Host::new(one_ns());
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    h.sim.write_ns(1, 0, &[0x44; 512]).unwrap();
    h.sim.faults().late(CommandFilter::io(), LATE);
    for quiesce in [false, true] {
        let mut q = h.io_queue(1, 8);
        q.post(rw(io::READ, 1, 0, 1, &buf));
        q.post(rw(io::WRITE, 1, 9, 1, &buf));
        q.ring(&h.sim);
        assert_eq!(h.sim.held_commands(), 2);
        if quiesce {
            assert!(h.sim.quiesce());
        }
        h.sim.write32(reg::CC, 0);
        assert_eq!(h.sim.held_commands(), 0);
        // Queues with the same ids again, and the late commands' time passes.
        h.reenable(8, 8);
        let mut q = h.io_queue(1, 8);
        after_late();
        h.sim.run_due();
        assert!(q.reap().is_none());
        assert_eq!(read_buf(&buf), vec![0u8; PAGE_SIZE], "nothing written");
        let mut out = [0u8; 512];
        h.sim.read_ns(1, 9 * 512, &mut out).unwrap();
        assert_eq!(out, [0; 512]);
        h.sim.write32(reg::CC, 0);
        h.reenable(8, 8);
    }
    assert_eq!(h.sim.counters().dropped(), 4);
}

#[test]
fn deleting_the_queue_aborts_its_late_commands() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    h.sim.faults().late(CommandFilter::io(), LATE);
    let cid = q.post(rw(io::READ, 1, 0, 1, &buf));
    q.ring(&h.sim);
    assert!(h.delete(admin::DELETE_SQ, 1).is_success());
    let cqe = q.reap().expect("aborted");
    assert_eq!(cqe.cid, cid);
    assert_eq!(status(&cqe).kind(), StatusKind::AbortedSqDeleted);
    assert_eq!(h.sim.held_commands(), 0);
}

#[test]
fn a_stuck_controller_still_completes_late_commands() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    h.sim.write_ns(1, 0, &[0x55; 512]).unwrap();
    h.sim.faults().late(CommandFilter::io(), LATE);
    h.sim.faults().stuck_ready(true);
    q.post(rw(io::READ, 1, 0, 1, &buf));
    q.ring(&h.sim);
    h.sim.write32(reg::CC, 0);
    after_late();
    h.sim.read32(reg::CSTS);
    assert!(status(&q.reap().expect("late completion")).is_success());
    assert_eq!(read_buf(&buf)[..512], [0x55; 512]);
}

#[test]
fn the_device_thread_runs_late_commands_unprompted() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    let t = ThreadedSim::start(h.sim.clone());
    h.sim.faults().late(CommandFilter::io(), LATE);
    q.post(rw(io::READ, 1, 0, 1, &buf));
    t.write32(doorbell_offset(1, false, h.stride), q.tail);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let cqe = loop {
        if let Some(c) = q.reap() {
            break c;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    };
    assert!(status(&cqe).is_success());
    drop(t);
}

/// A page guard backed by a map from page IOVA to owner generation.
fn map_guard(h: &Host) -> Arc<std::sync::Mutex<std::collections::HashMap<u64, u64>>> {
    let map = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let m = map.clone();
    h.sim.set_page_guard(Arc::new(move |iova: Iova| {
        m.lock().unwrap().get(&(iova.0 & !0xfff)).copied()
    }));
    map
}

#[test]
fn the_page_guard_reports_a_late_write_into_a_page_handed_on() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let map = map_guard(&h);
    // Two data pages (the read crosses into the second through PRP2), both guarded.
    let buf = h.pool.alloc_zeroed(2 * PAGE_SIZE).unwrap();
    let (p0, p1) = (buf.iova().0, buf.iova().0 + PAGE_SIZE as u64);
    map.lock().unwrap().extend([(p0, 1), (p1, 1)]);

    // An immediate read and a late read whose pages keep their owner: nothing to report.
    assert!(status(&q.cmd(&h.sim, rw(io::READ, 1, 0, 16, &buf))).is_success());
    h.sim
        .faults()
        .late(CommandFilter::io().opcode(io::READ), LATE);
    q.post(rw(io::READ, 1, 0, 16, &buf));
    q.ring(&h.sim);
    after_late();
    h.sim.run_due();
    assert!(q.reap().is_some());
    assert!(h.sim.page_violations().is_empty());

    // The second page is handed to a new owner before the late read lands.
    let cid = q.post(rw(io::READ, 1, 0, 16, &buf));
    q.ring(&h.sim);
    map.lock().unwrap().insert(p1, 2);
    after_late();
    h.sim.run_due();
    assert!(q.reap().is_some());
    let v = h.sim.page_violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains(&format!("qid 1 cid {cid} ")), "{}", v[0]);
    assert!(v[0].contains(&format!("{p1:#x}")), "{}", v[0]);
    assert!(v[0].contains("generation 1 then, 2 now"), "{}", v[0]);

    // A late read dropped by a reset writes nothing and reports nothing, even though its
    // page changed hands.
    buf.zero();
    q.post(rw(io::READ, 1, 0, 16, &buf));
    q.ring(&h.sim);
    map.lock().unwrap().insert(p0, 3);
    h.sim.write32(reg::CC, 0);
    after_late();
    h.sim.run_due();
    assert_eq!(read_buf(&buf), vec![0u8; 2 * PAGE_SIZE]);
    assert_eq!(h.sim.page_violations().len(), 1);
}

#[test]
fn the_page_guard_covers_identify_data_but_not_queue_memory() {
    let mut h = Host::new(one_ns());
    let map = map_guard(&h);
    let page = h.pool.alloc(PAGE_SIZE).unwrap();
    map.lock().unwrap().insert(page.iova().0, 7);
    h.sim.faults().late(CommandFilter::admin(), LATE);
    let mut s = Sqe::new(admin::IDENTIFY, 0);
    s.cdw10 = admin::CNS_CONTROLLER;
    s.prp1 = page.iova().0;
    h.admin.post(s);
    h.admin.ring(&h.sim);
    // The page goes back to the pool: generation unknown now.
    map.lock().unwrap().remove(&page.iova().0);
    after_late();
    h.sim.run_due();
    assert!(h.admin.reap().is_some());
    let v = h.sim.page_violations();
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].contains("generation 7 then, unguarded now"),
        "{}",
        v[0]
    );
}

#[test]
fn injected_failures_carry_the_status_given_and_do_nothing_else() {
    let mut h = Host::new(one_ns());
    let mut q = h.io_queue(1, 8);
    let buf = h.pool.alloc_zeroed(PAGE_SIZE).unwrap();
    buf.write_at(0, &[0x66; 512]);
    let internal = Status::new(0, 0x06).with_crd(2);
    let f = h
        .sim
        .faults()
        .fail(CommandFilter::io().opcode(io::FLUSH).times(1), internal);
    let st = status(&q.cmd(&h.sim, Sqe::new(io::FLUSH, 1)));
    assert_eq!(
        (st.kind(), st.crd(), st.dnr()),
        (StatusKind::InternalError, 2, false)
    );
    assert!(
        status(&q.cmd(&h.sim, Sqe::new(io::FLUSH, 1))).is_success(),
        "once"
    );
    assert_eq!(h.sim.faults().hits(f), 1);
    // A failed write leaves the namespace alone; with a delay it fails late.
    let wf = Status::new(2, 0x80).with_dnr(true);
    h.sim
        .faults()
        .fail(CommandFilter::io().opcode(io::WRITE), wf);
    h.sim
        .faults()
        .delay(CommandFilter::io().opcode(io::WRITE), LATE);
    q.post(rw(io::WRITE, 1, 3, 1, &buf));
    q.ring(&h.sim);
    assert!(q.reap().is_none());
    after_late();
    h.sim.run_due();
    let st = status(&q.reap().expect("late failure"));
    assert_eq!((st.kind(), st.dnr()), (StatusKind::WriteFault, true));
    let mut out = [0u8; 512];
    h.sim.read_ns(1, 3 * 512, &mut out).unwrap();
    assert_eq!(out, [0; 512]);
}
