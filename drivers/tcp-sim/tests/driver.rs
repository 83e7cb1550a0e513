//! The NVMe/TCP host driver (`nvcopy-tcp`) against the software target: bring-up, I/O
//! through a queue with and without digests, in-capsule and R2T/H2C writes, malformed
//! replies ending the queue with the right typed error, Connect refused for a controller
//! that is gone, and a queue reconnected under a new association.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_tcp::cmd::{self, op, Sgl};
use nvcopy_tcp::pdu::PduError;
use nvcopy_tcp::{Completion, Controller, Dir, Error, Options, Outcome, Queue};
use nvcopy_tcp_sim::{Faults, NsConfig, PduFault, SimConfig, TcpSim};
use nvcopy_vfio::{DmaBuf, DmaPool, Iova};

const PAGE: usize = 4096;

fn opts(digests: bool) -> Options {
    Options {
        header_digest: digests,
        data_digest: digests,
        kato: Duration::from_secs(30),
        admin_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
        queues: 2,
        hostnqn: None,
        reconnect_for: Duration::from_secs(2),
    }
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

struct Io {
    pool: DmaPool,
    buf: DmaBuf,
}

impl Io {
    fn new() -> Io {
        let pool = DmaPool::unmapped(4 << 20).unwrap();
        let buf = pool.alloc(1 << 20).unwrap();
        Io { pool, buf }
    }

    fn iovas(&self, len: usize) -> Vec<Iova> {
        (0..len.div_ceil(PAGE))
            .map(|i| Iova(self.buf.iova().0 + (i * PAGE) as u64))
            .collect()
    }

    fn put(&self, data: &[u8]) {
        self.buf
            .slice()
            .subslice(0, data.len())
            .unwrap()
            .copy_from(data);
    }

    fn get(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.buf
            .slice()
            .subslice(0, len)
            .unwrap()
            .copy_to(&mut v[..]);
        v
    }
}

/// Polls `q` until `n` completions arrived (or 10 s passed).
fn wait(q: &mut Queue, n: usize) -> Vec<Completion> {
    let mut done = Vec::new();
    let start = Instant::now();
    while done.len() < n && start.elapsed() < Duration::from_secs(10) {
        q.flush();
        q.poll(16, |c| done.push(c));
    }
    assert_eq!(done.len(), n, "completions; queue error: {:?}", q.error());
    done
}

fn rw(q: &mut Queue, io: &Io, write: bool, lba: u64, len: usize, token: u64) -> Outcome {
    let (opc, dir) = if write {
        (op::WRITE, Dir::ToController)
    } else {
        (op::READ, Dir::ToHost)
    };
    let sqe = cmd::rw(opc, 1, lba, (len / 512) as u32, Sgl::None);
    q.submit_pages(sqe, dir, &io.iovas(len), len, token)
        .unwrap();
    let c = wait(q, 1);
    assert_eq!(c[0].token, token);
    c[0].outcome
}

fn io_roundtrip(cfg: SimConfig, digests: bool) -> TcpSim {
    let sim = TcpSim::start(cfg.clone()).unwrap();
    let ctrl = Controller::connect(&sim.target(), opts(digests)).unwrap();
    let n = ctrl.negotiated();
    assert_eq!((n.header_digest, n.data_digest), (digests, digests));
    assert_eq!(ctrl.in_capsule(), 8192, "IOCCSZ of the target");
    assert_eq!(ctrl.max_transfer(), Some(128 << 10), "MDTS 5");
    assert_eq!(ctrl.namespaces().len(), 1);
    assert_eq!(
        (ctrl.namespaces()[0].lba_size, ctrl.namespaces()[0].blocks),
        (512, 16384)
    );
    assert_eq!(ctrl.info().subnqn, sim.nqn());
    assert_eq!(sim.counters().associations, 1);
    let io = Io::new();
    let (mut q, _) = ctrl.open_queue(16, &io.pool).unwrap();
    q.reserve(128 << 10);
    // 4 KiB: in the capsule.
    let small = pattern(1, 4096);
    io.put(&small);
    assert_eq!(rw(&mut q, &io, true, 8, 4096, 1), Outcome::Success);
    assert!(sim.media(1)[8 * 512..8 * 512 + 4096] == small[..]);
    let c = sim.counters();
    assert_eq!((c.writes_in_capsule, c.writes_r2t, c.h2c_pdus), (1, 0, 0));
    // 128 KiB: past the in-capsule limit, by R2T and H2C Data of at most MAXH2CDATA.
    let big = pattern(2, 128 << 10);
    io.put(&big);
    assert_eq!(rw(&mut q, &io, true, 100, 128 << 10, 2), Outcome::Success);
    assert!(sim.media(1)[100 * 512..100 * 512 + (128 << 10)] == big[..]);
    let c = sim.counters();
    assert_eq!(c.writes_r2t, 1);
    assert!(c.r2ts >= 1);
    let per_pdu = cfg.max_h2c_data.min(cfg.max_r2t) as u64;
    assert_eq!(
        c.h2c_pdus,
        (128 << 10) / per_pdu,
        "H2C Data PDUs of MAXH2CDATA"
    );
    // Read both back into cleared pages.
    io.put(&vec![0u8; 128 << 10]);
    assert_eq!(rw(&mut q, &io, false, 100, 128 << 10, 3), Outcome::Success);
    assert!(io.get(128 << 10) == big, "read data");
    assert_eq!(rw(&mut q, &io, false, 8, 4096, 4), Outcome::Success);
    assert!(io.get(4096) == small, "read data");
    // Write Zeroes and Flush.
    let sqe = cmd::rw(op::WRITE_ZEROES, 1, 100, 8, Sgl::None);
    q.submit(sqe, Dir::None, 0, Default::default(), 5, false)
        .unwrap();
    let sqe = cmd::sqe(op::FLUSH, 1, Sgl::None);
    q.submit(sqe, Dir::None, 0, Default::default(), 6, false)
        .unwrap();
    let done = wait(&mut q, 2);
    assert!(done.iter().all(|c| c.outcome == Outcome::Success));
    assert!(sim.media(1)[100 * 512..108 * 512].iter().all(|&b| b == 0));
    assert!(sim.media(1)[108 * 512..109 * 512] == big[8 * 512..9 * 512]);
    // Out of range: the target's status, not a broken connection.
    let out = rw(&mut q, &io, false, 16384 - 4, 4096, 7);
    assert!(
        matches!(out, Outcome::Status(s) if s.sc() == 0x80),
        "{out:?}"
    );
    assert!(q.is_usable());
    assert_eq!(sim.counters().flushes, 1);
    assert_eq!(sim.host_errors(), Vec::<String>::new());
    drop(q);
    drop(ctrl);
    sim
}

#[test]
fn io_without_digests() {
    io_roundtrip(SimConfig::default(), false);
}

#[test]
fn io_with_header_and_data_digests() {
    io_roundtrip(SimConfig::default(), true);
}

#[test]
fn reads_in_several_c2h_pdus_writes_in_several_r2ts_and_the_success_flag() {
    let cfg = SimConfig {
        max_r2t: 16384,
        max_c2h_data: 8192,
        c2h_success: true,
        cpda: 3,
        ..SimConfig::default()
    };
    let sim = io_roundtrip(cfg, true);
    let c = sim.counters();
    // 128 KiB in R2Ts of 16 KiB; each answered by one H2C Data PDU.
    assert_eq!(c.r2ts, 8);
    assert_eq!(c.h2c_pdus, 8);
    // 128 KiB and 4 KiB read in 8 KiB PDUs, and three Identify (controller, namespace
    // list, namespace) in one 4 KiB PDU each.
    assert_eq!(c.c2h_pdus, 16 + 1 + 3, "{c:?}");
}

#[test]
fn a_4096_byte_block_namespace() {
    let sim = TcpSim::start(SimConfig {
        namespaces: vec![
            NsConfig {
                block_size: 4096,
                blocks: 256,
            },
            NsConfig {
                block_size: 512,
                blocks: 64,
            },
        ],
        ..SimConfig::default()
    })
    .unwrap();
    let ctrl = Controller::connect(&sim.target(), opts(true)).unwrap();
    let ns: Vec<(u32, u32, u64)> = ctrl
        .namespaces()
        .iter()
        .map(|n| (n.nsid, n.lba_size, n.blocks))
        .collect();
    assert_eq!(ns, [(1, 4096, 256), (2, 512, 64)]);
    let io = Io::new();
    let (mut q, _) = ctrl.open_queue(4, &io.pool).unwrap();
    q.reserve(65536);
    let data = pattern(9, 65536);
    io.put(&data);
    let sqe = cmd::rw(op::WRITE, 1, 3, 16, Sgl::None);
    q.submit_pages(sqe, Dir::ToController, &io.iovas(65536), 65536, 1)
        .unwrap();
    assert_eq!(wait(&mut q, 1)[0].outcome, Outcome::Success);
    assert!(sim.media(1)[3 * 4096..3 * 4096 + 65536] == data[..]);
}

/// A malformed reply to the second of two outstanding reads (the first is never
/// answered): the queue ends with `check`'s error and both complete as aborted.
fn bad_peer(fault: PduFault, check: fn(&Error) -> bool) {
    let sim = TcpSim::start(SimConfig::default()).unwrap();
    let ctrl = Controller::connect(&sim.target(), opts(true)).unwrap();
    let io = Io::new();
    let (mut q, _) = ctrl.open_queue(8, &io.pool).unwrap();
    q.reserve(8192);
    sim.set_faults(Faults {
        stall: Some(1),
        corrupt: Some((2, fault)),
        ..Faults::default()
    });
    for token in [1, 2] {
        let sqe = cmd::rw(op::READ, 1, token * 16, 8, Sgl::None);
        let iovas = io.iovas(8192);
        q.submit_pages(sqe, Dir::ToHost, &iovas[token as usize - 1..], 4096, token)
            .unwrap();
    }
    let mut done = wait(&mut q, 2);
    done.sort_by_key(|c| c.token);
    let got: Vec<(u64, Outcome)> = done.iter().map(|c| (c.token, c.outcome)).collect();
    assert_eq!(
        got,
        [(1, Outcome::Aborted), (2, Outcome::Aborted)],
        "{fault:?}"
    );
    let e = q.error().unwrap();
    assert!(check(e), "{fault:?}: {e:?}");
    assert!(e.ends_connection());
    assert!(!q.is_usable());
    assert_eq!(q.outstanding(), 0);
    assert_eq!(sim.counters().corrupted, 1);
    assert_eq!(sim.counters().stalled, 1);
    assert_eq!(sim.host_errors(), Vec::<String>::new());
}

#[test]
fn bad_type() {
    bad_peer(PduFault::BadType, |e| {
        matches!(
            e,
            Error::Pdu {
                source: PduError::UnexpectedType(0x42),
                ..
            }
        )
    });
}

#[test]
fn bad_length() {
    bad_peer(PduFault::BadLength, |e| {
        matches!(
            e,
            Error::Pdu {
                source: PduError::PduLength { .. },
                ..
            }
        )
    });
}

#[test]
fn bad_header_digest() {
    bad_peer(PduFault::BadHeaderDigest, |e| {
        matches!(
            e,
            Error::Pdu {
                source: PduError::HeaderDigest { .. },
                ..
            }
        )
    });
}

#[test]
fn bad_data_digest() {
    bad_peer(PduFault::BadDataDigest, |e| {
        matches!(
            e,
            Error::Pdu {
                source: PduError::DataDigest { .. },
                ..
            }
        )
    });
}

#[test]
fn unknown_cccid() {
    bad_peer(PduFault::UnknownCccid, |e| {
        matches!(e, Error::UnknownCommand { cid: 0xbeef, .. })
    });
}

#[test]
fn terminate() {
    bad_peer(PduFault::Terminate, |e| {
        matches!(e, Error::Terminated { fes: 6, .. })
    });
}

#[test]
fn an_io_queue_of_a_controller_that_is_gone_is_refused_then_reconnected() {
    let sim = TcpSim::start(SimConfig::default()).unwrap();
    let ctrl: Arc<Controller> = Controller::connect(&sim.target(), opts(true)).unwrap();
    let first = ctrl.cntlid();
    let io = Io::new();
    let (mut q, epoch) = ctrl.open_queue(8, &io.pool).unwrap();
    q.reserve(8192);
    let data = pattern(3, 8192);
    io.put(&data);
    assert_eq!(rw(&mut q, &io, true, 0, 8192, 1), Outcome::Success);
    // Every connection ends: the controller is gone, and a queue naming it is refused.
    sim.close_all();
    let Err(e) = ctrl.open_queue(8, &io.pool) else {
        panic!("a queue of a controller that is gone was connected")
    };
    assert!(matches!(e, Error::ConnectRefused { qid: 2, .. }), "{e:?}");
    assert_eq!(sim.counters().connects_refused, 1);
    // The old queue's next command finds the connection closed.
    let sqe = cmd::rw(op::READ, 1, 0, 16, Sgl::None);
    let _ = q.submit_pages(sqe, Dir::ToHost, &io.iovas(8192), 8192, 2);
    let done = wait(&mut q, 1);
    assert_eq!(done[0].outcome, Outcome::Aborted);
    assert!(
        matches!(q.error(), Some(Error::Closed { .. } | Error::Io { .. })),
        "{:?}",
        q.error()
    );
    // Reconnected: a new association, a new controller id, and the data is there.
    let (mut q, now) = ctrl.reopen_queue(q.qid(), 8, &io.pool, epoch).unwrap();
    assert_ne!(now, epoch);
    assert_eq!(ctrl.reconnects(), 1);
    assert_eq!(sim.counters().associations, 2);
    assert_ne!(ctrl.cntlid(), first);
    assert_eq!(sim.live_controllers(), 1, "the old controller is gone");
    q.reserve(8192);
    io.put(&[0u8; 8192]);
    assert_eq!(rw(&mut q, &io, false, 0, 8192, 3), Outcome::Success);
    assert!(io.get(8192) == data);
    // Refused for good: the reconnect gives up within its window, with the typed error.
    sim.close_all();
    sim.stop_listening();
    let start = Instant::now();
    let Err(e) = ctrl.reopen_queue(q.qid(), 8, &io.pool, now) else {
        panic!("reconnected to a target that refuses connections")
    };
    assert!(matches!(e, Error::ReconnectFailed { .. }), "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    // And listening again, it comes back.
    sim.listen_again();
    let (mut q, _) = ctrl.reopen_queue(q.qid(), 8, &io.pool, now).unwrap();
    q.reserve(8192);
    assert_eq!(rw(&mut q, &io, false, 0, 8192, 4), Outcome::Success);
    assert_eq!(sim.counters().associations, 3);
    assert_eq!(
        sim.host_errors(),
        vec![format!(
            "Connect refused: queue 2: controller {first} is not live"
        )]
    );
}

#[test]
fn keep_alive_is_sent_and_its_failure_marks_the_association_lost() {
    let sim = TcpSim::start(SimConfig::default()).unwrap();
    let o = Options {
        kato: Duration::from_millis(200),
        ..opts(false)
    };
    let ctrl = Controller::connect(&sim.target(), o).unwrap();
    let e0 = ctrl.epoch();
    std::thread::sleep(Duration::from_millis(450));
    assert!(sim.counters().keep_alives >= 2, "{:?}", sim.counters());
    assert!(ctrl.keep_alive_failure().is_none());
    sim.close_all();
    let start = Instant::now();
    while ctrl.keep_alive_failure().is_none() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ctrl.keep_alive_failure().is_some());
    assert_ne!(ctrl.epoch(), e0, "the association is marked lost");
}

#[test]
fn a_queue_behind_two_losses_reconnects_under_a_third_association() {
    // Two queues lose their connections; one reconnects (a second association), and
    // that association is lost too before the other asks: the other must not keep
    // connecting to the controller of the second, which is gone.
    let sim = TcpSim::start(SimConfig::default()).unwrap();
    let ctrl = Controller::connect(&sim.target(), opts(true)).unwrap();
    let io = Io::new();
    let (q1, e1) = ctrl.open_queue(8, &io.pool).unwrap();
    let (q2, _) = ctrl.open_queue(8, &io.pool).unwrap();
    sim.close_all();
    let (q2, e2) = ctrl.reopen_queue(q2.qid(), 8, &io.pool, e1).unwrap();
    assert_eq!(sim.counters().associations, 2);
    sim.close_all();
    let start = Instant::now();
    let (mut q1, e3) = ctrl
        .reopen_queue(q1.qid(), 8, &io.pool, e1)
        .unwrap_or_else(|e| panic!("after {:?}: {e}", start.elapsed()));
    assert!(e3 > e2, "a new association: {e3} after {e2}");
    assert_eq!(sim.counters().associations, 3);
    q1.reserve(4096);
    let data = pattern(4, 4096);
    io.put(&data);
    assert_eq!(rw(&mut q1, &io, true, 0, 4096, 1), Outcome::Success);
    assert!(sim.media(1)[..4096] == data[..]);
    // The other queue, on the lost second association, is stale and reconnects too.
    assert_ne!(ctrl.epoch(), e2);
    let (mut q2, _) = ctrl.reopen_queue(q2.qid(), 8, &io.pool, e2).unwrap();
    q2.reserve(4096);
    assert_eq!(rw(&mut q2, &io, false, 0, 4096, 2), Outcome::Success);
    assert_eq!(sim.counters().associations, 3, "no fourth");
}
