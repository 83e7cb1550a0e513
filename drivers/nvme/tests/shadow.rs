//! Shadow doorbells (Doorbell Buffer Config) between the real driver and the software
//! controller: data integrity, fewer MMIO doorbell stores, the fallback to MMIO doorbells
//! when the command is missing or refused, and behaviour across a controller reset, on
//! the synchronous controller and on one served by a device thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_nvme::spec::admin;
use nvcopy_nvme::{
    Bar, Completion, ControllerOptions, DataPtr, Health, IoQpair, Namespace, Recovery, Status,
    StatusKind,
};
use nvcopy_nvme_sim::{CommandFilter, NamespaceConfig, SimConfig, SimController, ThreadedSim};
use nvcopy_testkit::{bring_up, pattern, pool, quick, Rig};
use nvcopy_vfio::DmaBuf;

fn cfg() -> SimConfig {
    SimConfig::new().namespace(NamespaceConfig::new(512, 1 << 16))
}

/// Polls until `n` completions have come back (the caller rang).
fn reap(q: &mut IoQpair, n: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    while done.len() < n {
        q.poll(64, |c| done.push(c)).expect("poll");
        assert!(Instant::now() < deadline, "completions did not arrive");
        std::hint::spin_loop();
    }
    assert!(done.iter().all(|c| c.status.is_success()), "{done:?}");
    done
}

/// Writes `count` 4 KiB chunks of a pattern at LBAs `8 * i`, `depth` at a time, each
/// command rung on its own when `ring_each`, else one doorbell per batch; then reads them
/// all back through the driver and checks them against the pattern. Returns the number of
/// rings that moved the SQ tail.
fn write_then_read(
    q: &mut IoQpair,
    ns: &Namespace,
    bufs: &[DmaBuf],
    count: u64,
    seed: u64,
    ring_each: bool,
) -> u64 {
    let depth = bufs.len() as u64;
    let mut rings = 0;
    for write in [true, false] {
        let mut i = 0;
        while i < count {
            let batch = depth.min(count - i);
            for k in 0..batch {
                let buf = &bufs[k as usize];
                let data = DataPtr::Contig {
                    iova: buf.iova(),
                    len: 4096,
                };
                let lba = (i + k) * 8;
                if write {
                    buf.write_at(0, &pattern(seed + i + k, 4096));
                    q.submit_write(ns, lba, data, k).expect("write");
                } else {
                    buf.write_at(0, &[0u8; 4096]);
                    q.submit_read(ns, lba, data, k).expect("read");
                }
                if ring_each {
                    q.ring();
                    rings += 1;
                }
            }
            if !ring_each {
                q.ring();
                rings += 1;
            }
            reap(q, batch as usize);
            if !write {
                for k in 0..batch {
                    let mut got = vec![0u8; 4096];
                    bufs[k as usize].read_at(0, &mut got);
                    assert_eq!(got, pattern(seed + i + k, 4096), "chunk {}", i + k);
                }
            }
            i += batch;
        }
    }
    rings
}

fn bufs(rig: &Rig, n: usize) -> Vec<DmaBuf> {
    (0..n).map(|_| rig.buf(4096)).collect()
}

#[test]
fn data_moves_intact_through_shadow_doorbells() {
    let rig = Rig::new(cfg());
    assert!(rig.ctrl.shadow_doorbells());
    assert_eq!(
        rig.sim
            .counters()
            .admin_commands(admin::DOORBELL_BUFFER_CONFIG),
        1
    );
    let ns = rig.ns(1);
    let mut q = rig.qpair_of(16);
    assert!(q.shadow_doorbells());
    let b = bufs(&rig, 15);
    // More commands than the ring holds, so the indexes wrap several times.
    write_then_read(&mut q, &ns, &b, 100, 7, false);
    write_then_read(&mut q, &ns, &b, 100, 9, true);
    for i in 0..100u64 {
        assert_eq!(
            rig.backdoor(1, i * 4096, 4096),
            pattern(9 + i, 4096),
            "chunk {i}"
        );
    }
    assert_eq!(rig.sim.counters().invalid_doorbell_writes(), 0);
}

/// While the controller is busy (here: paused, so it has not consumed what it was told
/// of), its EventIdx stays behind the host's tail and every further ring is a shadow
/// write alone. Without shadow doorbells each ring is an MMIO store.
#[test]
fn mmio_doorbell_stores_drop_while_the_controller_is_busy() {
    let run = |cfg: SimConfig| {
        let rig = Rig::new(cfg);
        let ns = rig.ns(1);
        let mut q = rig.qpair_of(16);
        let b = bufs(&rig, 8);
        rig.sim.faults().pause_io();
        for (k, buf) in b.iter().enumerate() {
            buf.write_at(0, &pattern(k as u64, 4096));
            let data = DataPtr::Contig {
                iova: buf.iova(),
                len: 4096,
            };
            q.submit_write(&ns, k as u64 * 8, data, k as u64).unwrap();
            q.ring();
        }
        let before_resume = rig.sim.counters().sq_doorbell_writes(1);
        rig.sim.faults().resume_io();
        reap(&mut q, 8);
        for k in 0..8u64 {
            assert_eq!(rig.backdoor(1, k * 4096, 4096), pattern(k, 4096));
        }
        (q.shadow_doorbells(), before_resume)
    };
    assert_eq!(run(cfg()), (true, 1), "one MMIO store for eight rings");
    assert_eq!(run(cfg().doorbell_buffer(false)), (false, 8));
}

#[test]
fn without_doorbell_buffer_config_every_doorbell_is_mmio() {
    let rig = Rig::new(cfg().doorbell_buffer(false));
    assert!(!rig.ctrl.info().supports_doorbell_buffer());
    assert!(!rig.ctrl.shadow_doorbells());
    assert_eq!(
        rig.sim
            .counters()
            .admin_commands(admin::DOORBELL_BUFFER_CONFIG),
        0
    );
    let ns = rig.ns(1);
    let mut q = rig.qpair_of(16);
    assert!(!q.shadow_doorbells());
    let b = bufs(&rig, 4);
    let rings = write_then_read(&mut q, &ns, &b, 20, 3, false);
    let c = rig.sim.counters();
    assert_eq!(c.sq_doorbell_writes(1), rings);
    // The CQ head is reported lazily, when the controller's view of the CQ would pass
    // half the ring: fewer CQ doorbells than rings, but some.
    let cq = c.cq_doorbell_writes(1);
    assert!(
        0 < cq && cq < rings,
        "{cq} CQ head writes for {rings} rings"
    );
}

#[test]
fn the_driver_can_be_told_not_to_use_shadow_doorbells() {
    let opts = ControllerOptions {
        shadow_doorbells: false,
        ..quick()
    };
    let rig = Rig::with(cfg(), 32 << 20, opts);
    assert!(rig.ctrl.info().supports_doorbell_buffer());
    assert!(!rig.ctrl.shadow_doorbells());
    assert_eq!(
        rig.sim
            .counters()
            .admin_commands(admin::DOORBELL_BUFFER_CONFIG),
        0
    );
    assert!(!rig.sim.doorbell_buffers_configured());
}

/// A controller that offers the command and then refuses it: the driver carries on with
/// MMIO doorbells, and gives the buffers back to the pool.
#[test]
fn a_refused_doorbell_buffer_config_falls_back_to_mmio_doorbells() {
    let p = pool(32 << 20);
    let sim = SimController::new(cfg(), p.clone());
    let refuse = sim.faults().fail(
        CommandFilter::admin().opcode(admin::DOORBELL_BUFFER_CONFIG),
        Status::of(StatusKind::InvalidField, true),
    );
    let free_before = p.free_pages();
    let ctrl = bring_up("sim0", &sim, &p, quick());
    assert_eq!(sim.faults().hits(refuse), 1);
    assert!(ctrl.info().supports_doorbell_buffer());
    assert!(!ctrl.shadow_doorbells());
    assert!(!sim.doorbell_buffers_configured());
    // Only the admin queue stays allocated: no doorbell buffers were kept.
    let admin_bytes = nvcopy_nvme::Controller::dma_bytes(&ControllerOptions {
        shadow_doorbells: false,
        ..quick()
    }) - 4096;
    assert_eq!((free_before - p.free_pages()) * 4096, admin_bytes);
    let ns = ctrl.namespace(1).unwrap().clone();
    let mut q = ctrl.create_io_qpair(16).unwrap();
    assert!(!q.shadow_doorbells());
    let b: Vec<DmaBuf> = (0..4).map(|_| p.alloc_zeroed(4096).unwrap()).collect();
    let rings = write_then_read(&mut q, &ns, &b, 12, 5, true);
    assert_eq!(sim.counters().sq_doorbell_writes(1), rings);
}

/// Reset and recovery: the controller forgets the buffers, the driver gives them again
/// and the re-created queue starts from tail and head 0 in them. The queue's shadow tail
/// was not 0 before the reset, so a stale entry would make the controller fetch entries
/// that were never posted.
#[test]
fn shadow_doorbells_are_configured_again_after_a_reset() {
    let rig = Rig::new(cfg());
    let ns = rig.ns(1);
    let mut q = rig.qpair_of(16);
    let b = bufs(&rig, 5);
    write_then_read(&mut q, &ns, &b, 13, 1, false);
    assert_ne!(rig.sim.queue_status(1).unwrap().sq_unfetched, 99);
    assert_eq!(rig.ctrl.reset(q.generation()), Health::Ready);
    assert!(rig.ctrl.shadow_doorbells());
    assert!(rig.sim.doorbell_buffers_configured());
    assert_eq!(
        rig.sim
            .counters()
            .admin_commands(admin::DOORBELL_BUFFER_CONFIG),
        2
    );
    assert!(q.is_stale());
    assert_eq!(q.recover(|_| {}), Recovery::Reissue);
    assert!(q.shadow_doorbells());
    let before = rig.sim.counters();
    write_then_read(&mut q, &ns, &b, 23, 100, false);
    write_then_read(&mut q, &ns, &b, 23, 200, true);
    let after = rig.sim.counters();
    assert_eq!(
        after.invalid_doorbell_writes(),
        before.invalid_doorbell_writes()
    );
    assert_eq!(
        after.total_io_commands() - before.total_io_commands(),
        4 * 23,
        "the controller fetched exactly what was posted"
    );
    for i in 0..23u64 {
        assert_eq!(rig.backdoor(1, i * 4096, 4096), pattern(200 + i, 4096));
    }
}

/// A controller that takes the buffers at bring-up and refuses them after a reset: the
/// recovered queue pair rings MMIO doorbells.
#[test]
fn a_refusal_after_a_reset_moves_recovered_queues_to_mmio_doorbells() {
    let rig = Rig::new(cfg());
    let ns = rig.ns(1);
    let mut q = rig.qpair_of(16);
    assert!(q.shadow_doorbells());
    let b = bufs(&rig, 4);
    write_then_read(&mut q, &ns, &b, 6, 1, false);
    rig.sim.faults().fail(
        CommandFilter::admin().opcode(admin::DOORBELL_BUFFER_CONFIG),
        Status::of(StatusKind::InternalError, false),
    );
    assert_eq!(rig.ctrl.reset(q.generation()), Health::Ready);
    assert!(!rig.ctrl.shadow_doorbells());
    assert_eq!(q.recover(|_| {}), Recovery::Reissue);
    assert!(!q.shadow_doorbells());
    let before = rig.sim.counters().sq_doorbell_writes(1);
    let rings = write_then_read(&mut q, &ns, &b, 10, 50, true);
    assert_eq!(rig.sim.counters().sq_doorbell_writes(1) - before, rings);
    for i in 0..10u64 {
        assert_eq!(rig.backdoor(1, i * 4096, 4096), pattern(50 + i, 4096));
    }
}

fn threaded(
    polling: bool,
) -> (
    Arc<ThreadedSim>,
    Arc<nvcopy_nvme::Controller>,
    nvcopy_vfio::DmaPool,
) {
    let p = pool(32 << 20);
    let sim = SimController::new(cfg(), p.clone());
    let dev = if polling {
        ThreadedSim::start_polling(sim)
    } else {
        ThreadedSim::start(sim)
    };
    let ctrl = bring_up("sim0", &dev, &p, quick());
    (dev, ctrl, p)
}

/// The controller on a device thread, QEMU's EventIdx rule: data intact at depth, and
/// never more MMIO stores than rings (fewer whenever the device was still busy).
#[test]
fn a_threaded_controller_moves_data_intact_through_shadow_doorbells() {
    let (dev, ctrl, p) = threaded(false);
    assert!(ctrl.shadow_doorbells());
    let ns = ctrl.namespace(1).unwrap().clone();
    let mut q = ctrl.create_io_qpair(64).unwrap();
    assert!(q.shadow_doorbells());
    let b: Vec<DmaBuf> = (0..32).map(|_| p.alloc_zeroed(4096).unwrap()).collect();
    let rings = write_then_read(&mut q, &ns, &b, 512, 11, true);
    let c = dev.sim().counters();
    assert!(
        c.sq_doorbell_writes(1) <= rings,
        "{} > {rings}",
        c.sq_doorbell_writes(1)
    );
    assert_eq!(c.total_io_commands(), 1024);
    assert_eq!(c.invalid_doorbell_writes(), 0);
    for i in (0..512u64).step_by(37) {
        let mut got = vec![0u8; 4096];
        dev.sim().read_ns(1, i * 4096, &mut got).unwrap();
        assert_eq!(got, pattern(11 + i, 4096), "chunk {i}");
    }
}

/// A polling device never asks for an MMIO doorbell after a queue's first: the device
/// thread finds every later command by reading the shadow tail, and room in the CQ by
/// reading the shadow head.
#[test]
fn a_polling_device_finds_work_with_no_mmio_doorbell() {
    let (dev, ctrl, p) = threaded(true);
    let ns = ctrl.namespace(1).unwrap().clone();
    let mut q = ctrl.create_io_qpair(16).unwrap();
    let b: Vec<DmaBuf> = (0..15).map(|_| p.alloc_zeroed(4096).unwrap()).collect();
    let rings = write_then_read(&mut q, &ns, &b, 200, 21, true);
    let c = dev.sim().counters();
    assert_eq!(rings, 400);
    assert_eq!(
        c.sq_doorbell_writes(1),
        1,
        "only the first ring reached the register"
    );
    assert!(c.cq_doorbell_writes(1) <= 1, "{}", c.cq_doorbell_writes(1));
    assert!(c.shadow_pickups() > 0);
    assert_eq!(c.total_io_commands(), 400);
    for i in 0..200u64 {
        let mut got = vec![0u8; 4096];
        dev.sim().read_ns(1, i * 4096, &mut got).unwrap();
        assert_eq!(got, pattern(21 + i, 4096), "chunk {i}");
    }
    // The admin queue still rings its register: a queue pair can be deleted and made.
    drop(q);
    let q2 = ctrl.create_io_qpair(16).unwrap();
    assert!(q2.shadow_doorbells());
    let _ = dev.len();
}
