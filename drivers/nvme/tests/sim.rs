//! The real driver (controller bring-up, queue pairs, PRPs, I/O commands, error paths)
//! against the software controller. Data is checked byte for byte through the
//! controller's backdoor, independently of the driver.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_nvme::spec::{admin, csts, io, reg, Sqe};
use nvcopy_nvme::{
    Bar, Completion, Controller, ControllerOptions, DataPtr, Error, Health, IoQpair, Namespace,
    Recovery, StatusCodeType, StatusKind,
};
use nvcopy_nvme_sim::{
    CommandFilter, MediaError, NamespaceConfig, SimConfig, SimController, SIM_VID,
};
use nvcopy_testkit::{pattern, quick, Rig};
use nvcopy_vfio::{DmaBuf, DmaPool, Iova, PAGE_SIZE};

fn read_buf(buf: &DmaBuf, off: usize, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    buf.read_at(off, &mut v);
    v
}

/// Rings and polls until `n` completions have come back.
fn reap(q: &mut IoQpair, n: usize) -> Vec<Completion> {
    q.ring();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut done = Vec::new();
    while done.len() < n {
        q.poll(64, |c| done.push(c)).expect("poll");
        assert!(Instant::now() < deadline, "completions did not arrive");
    }
    done
}

fn cfg_512() -> SimConfig {
    SimConfig::new().namespace(NamespaceConfig::new(512, 8192))
}

/// The namespace, first LBA and status of a command error.
fn command_error(e: &Error) -> (u32, u64, nvcopy_nvme::Status) {
    match e {
        Error::Command {
            nsid, lba, status, ..
        } => (*nsid, *lba, *status),
        other => panic!("expected a command error, got {other}"),
    }
}

#[test]
fn init_reads_identify_fields() {
    let cfg = SimConfig::new()
        .serial("SIM-TEST-0042")
        .model("Model Under Test")
        .mdts(6)
        .max_queue_entries(512)
        .io_queues(3)
        .namespace(NamespaceConfig::new(512, 4096))
        .namespace(NamespaceConfig::new(4096, 1000).copy_limits(64, 512, 16));
    let rig = Rig::new(cfg);
    let info = rig.ctrl.info();
    assert_eq!(info.vid, SIM_VID);
    assert_eq!(info.serial, "SIM-TEST-0042");
    assert_eq!(info.model, "Model Under Test");
    assert_eq!(info.firmware, "1.0");
    assert_eq!(info.mdts, 6);
    assert_eq!(info.cntlid, 1);
    assert_eq!(info.version_string(), "2.0.0");
    assert_eq!(info.nn, 2);
    assert!(info.supports_copy() && info.supports_write_zeroes() && info.supports_dsm());
    assert!(info.vwc);
    assert!(info.supports_doorbell_buffer());
    assert!(
        rig.ctrl.shadow_doorbells(),
        "the controller took the doorbell buffers"
    );
    assert!(rig.sim.doorbell_buffers_configured());
    assert_eq!(rig.ctrl.max_transfer(), 256 << 10);
    assert_eq!(rig.ctrl.cap().mqes(), 512);
    assert_eq!(rig.ctrl.io_queues(), 3, "asked for 64, granted 3");
    let ns = rig.ctrl.namespaces();
    assert_eq!(ns.len(), 2);
    assert_eq!((ns[0].nsid, ns[0].blocks, ns[0].lba_size), (1, 4096, 512));
    assert_eq!((ns[1].nsid, ns[1].blocks, ns[1].lba_size), (2, 1000, 4096));
    assert_eq!(ns[1].bytes(), 4096 * 1000);
    assert_eq!((ns[1].mssrl, ns[1].mcl, ns[1].msrc), (64, 512, 16));
    assert_eq!((ns[0].metadata, ns[1].metadata), (0, 0));
    assert!(rig.sim.is_ready());
    let c = rig.sim.counters();
    // Identify Controller, one active namespace list, one Identify Namespace each.
    assert_eq!(c.admin_commands(admin::IDENTIFY), 4);
    assert_eq!(c.admin_commands(admin::SET_FEATURES), 1);
}

#[test]
fn init_reads_namespace_identifiers_and_the_subsystem_nqn() {
    let nguid = [0x11; 16];
    let cfg = |nqn: Option<&str>| {
        let c = SimConfig::new()
            .namespace(NamespaceConfig::new(512, 4096).nguid(nguid))
            .namespace(NamespaceConfig::new(512, 4096).eui64([0x22; 8]))
            .namespace(NamespaceConfig::new(512, 4096));
        match nqn {
            Some(n) => c.subsystem_nqn(n),
            None => c,
        }
    };
    let a = Rig::new(cfg(Some("nqn.2024-01.dev.nvcopy:shared")));
    assert_eq!(a.ctrl.info().subnqn, "nqn.2024-01.dev.nvcopy:shared");
    let ns = a.ctrl.namespaces();
    assert_eq!((ns[0].nguid, ns[0].eui64), (nguid, [0; 8]));
    assert_eq!((ns[1].nguid, ns[1].eui64), ([0; 16], [0x22; 8]));
    assert_eq!((ns[2].nguid, ns[2].eui64), ([0; 16], [0; 8]));
    // Default NQNs differ between controllers, even with the same serial number.
    let (b, c) = (Rig::new(cfg(None)), Rig::new(cfg(None)));
    let (bi, ci) = (b.ctrl.info(), c.ctrl.info());
    assert!(bi.subnqn.starts_with("nqn.") && bi.subnqn != ci.subnqn);
    let (b3, c3) = (&b.ctrl.namespaces()[2], &c.ctrl.namespaces()[2]);
    assert!(!b3.same_media(bi, c3, ci), "separate subsystems");
    assert!(b.ctrl.namespaces()[0].same_media(bi, &c.ctrl.namespaces()[0], ci));
    let shared = Rig::new(cfg(Some("nqn.2024-01.dev.nvcopy:shared")));
    assert!(ns[2].same_media(
        a.ctrl.info(),
        &shared.ctrl.namespaces()[2],
        shared.ctrl.info()
    ));
}

/// Writes a pattern at the first and last LBA (and the last four), checks it through the
/// backdoor, and reads it back through the driver.
fn first_and_last_lba(lba_size: u32, blocks: u64) {
    let rig = Rig::new(SimConfig::new().namespace(NamespaceConfig::new(lba_size, blocks)));
    let ns = rig.ns(1);
    assert_eq!((ns.lba_size, ns.blocks), (lba_size, blocks));
    let mut q = rig.qpair();
    let bs = lba_size as usize;
    for (seed, lba, n) in [(1u64, 0u64, 1usize), (2, blocks - 1, 1), (3, blocks - 4, 4)] {
        let data = pattern(seed, bs * n);
        let buf = rig.buf(data.len());
        buf.write_at(0, &data);
        q.write_sync(&ns, lba, &buf, data.len()).expect("write");
        assert_eq!(rig.backdoor(1, lba * bs as u64, data.len()), data);
        let back = rig.buf(data.len());
        q.read_sync(&ns, lba, &back, data.len()).expect("read");
        assert_eq!(read_buf(&back, 0, data.len()), data);
    }
    // Data placed through the backdoor reads back through the driver.
    let data = pattern(9, bs);
    rig.sim
        .write_ns(1, 7 * bs as u64, &data)
        .expect("backdoor write");
    let back = rig.buf(bs);
    q.read_sync(&ns, 7, &back, bs).expect("read");
    assert_eq!(read_buf(&back, 0, bs), data);
}

#[test]
fn first_and_last_lba_512() {
    first_and_last_lba(512, 10_000);
}

#[test]
fn first_and_last_lba_4096() {
    first_and_last_lba(4096, 777);
}

#[test]
fn two_namespaces_keep_their_own_data() {
    let cfg = SimConfig::new()
        .namespace(NamespaceConfig::new(512, 2048))
        .namespace(NamespaceConfig::new(4096, 256));
    let rig = Rig::new(cfg);
    let (ns1, ns2) = (rig.ns(1), rig.ns(2));
    let mut q = rig.qpair();
    let a = pattern(11, 8192);
    let b = pattern(12, 8192);
    let buf = rig.buf(8192);
    buf.write_at(0, &a);
    q.write_sync(&ns1, 0, &buf, 8192).expect("write ns1");
    buf.write_at(0, &b);
    q.write_sync(&ns2, 0, &buf, 8192).expect("write ns2");
    assert_eq!(rig.backdoor(1, 0, 8192), a);
    assert_eq!(rig.backdoor(2, 0, 8192), b);
    q.read_sync(&ns1, 0, &buf, 8192).expect("read ns1");
    assert_eq!(read_buf(&buf, 0, 8192), a);
    // The last 4 KiB block of ns2 lies beyond ns1's end.
    buf.write_at(0, &b[..4096]);
    q.write_sync(&ns2, 255, &buf, 4096).expect("write ns2 end");
    assert_eq!(rig.backdoor(2, 255 * 4096, 4096), b[..4096]);
}

#[test]
fn transfers_through_prp2_and_prp_lists() {
    // MDTS 0: no limit, so one command can carry the driver's largest transfer.
    let rig = Rig::new(
        SimConfig::new()
            .mdts(0)
            .namespace(NamespaceConfig::new(512, 32768)),
    );
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let max = rig.ctrl.max_transfer();
    assert_eq!(max, 2 << 20);
    let buf = rig.buf(max + 2 * PAGE_SIZE);
    let back = rig.buf(max + 2 * PAGE_SIZE);
    // (offset in the buffer, length): inside one page; crossing one page boundary (PRP2
    // is a page); exactly two pages; a list from an offset; a longer list; the largest
    // transfer from an offset, whose 513 pages fill the list page exactly.
    let cases = [
        (0usize, 512usize),
        (3584, 1024),
        (0, 8192),
        (512, 12 * 1024),
        (1024, 5 * PAGE_SIZE + 512),
        (512, max),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let lba = (i * 4096) as u64;
        let data = pattern(100 + i as u64, len);
        buf.write_at(off, &data);
        let at = |b: &DmaBuf| DataPtr::Contig {
            iova: b.iova().add(off as u64),
            len,
        };
        q.submit_write(&ns, lba, at(&buf), 1).expect("submit write");
        let w = reap(&mut q, 1);
        assert!(
            w[0].status.is_success(),
            "write {off}+{len}: {}",
            w[0].status
        );
        assert_eq!(rig.backdoor(1, lba * 512, len), data, "{off}+{len}");
        q.submit_read(&ns, lba, at(&back), 2).expect("submit read");
        let r = reap(&mut q, 1);
        assert!(
            r[0].status.is_success(),
            "read {off}+{len}: {}",
            r[0].status
        );
        assert_eq!(read_buf(&back, off, len), data, "{off}+{len}");
    }
}

#[test]
fn sync_transfers_split_at_mdts() {
    let rig = Rig::new(
        SimConfig::new()
            .mdts(1)
            .namespace(NamespaceConfig::new(512, 4096)),
    );
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    assert_eq!(rig.ctrl.max_transfer(), 8192);
    let len = 100 * 1024;
    let data = pattern(5, len);
    let buf = rig.buf(len);
    buf.write_at(0, &data);
    rig.sim.reset_counters();
    q.write_sync(&ns, 10, &buf, len).expect("write");
    assert_eq!(
        rig.sim.counters().io_commands(io::WRITE),
        13,
        "100 KiB in 8 KiB"
    );
    assert_eq!(rig.backdoor(1, 10 * 512, len), data);
    let back = rig.buf(len);
    q.read_sync(&ns, 10, &back, len).expect("read");
    assert_eq!(read_buf(&back, 0, len), data);
    assert_eq!(rig.sim.counters().io_commands(io::READ), 13);
    // One command above MDTS is refused before it reaches the device.
    let err = q
        .submit_read(
            &ns,
            0,
            DataPtr::Contig {
                iova: buf.iova(),
                len: 16384,
            },
            0,
        )
        .unwrap_err();
    assert!(matches!(err, Error::BadBuffer { .. }), "{err}");
}

#[test]
fn page_list_reads_land_in_each_page() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    // Five pages, used out of order so that the list is not contiguous memory.
    let pages: Vec<DmaBuf> = (0..5).map(|_| rig.buf(PAGE_SIZE)).collect();
    let order = [3usize, 0, 4, 1];
    let iovas: Vec<Iova> = order.iter().map(|&i| pages[i].iova()).collect();
    let len = 3 * PAGE_SIZE + 1024;
    let data = pattern(21, len);
    rig.sim
        .write_ns(1, 64 * 512, &data)
        .expect("backdoor write");
    q.read_pages_sync(&ns, 64, &iovas, len)
        .expect("read into pages");
    for (k, &i) in order.iter().enumerate() {
        let n = PAGE_SIZE.min(len - k * PAGE_SIZE);
        assert_eq!(
            read_buf(&pages[i], 0, n),
            data[k * PAGE_SIZE..k * PAGE_SIZE + n],
            "page {k}"
        );
    }
    assert_eq!(read_buf(&pages[2], 0, PAGE_SIZE), vec![0u8; PAGE_SIZE]);
}

#[test]
fn write_zeroes_clears_only_its_blocks() {
    let rig = Rig::new(SimConfig::new().namespace(NamespaceConfig::new(512, 200_000)));
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let data = pattern(31, 64 * 512);
    rig.sim.write_ns(1, 0, &data).expect("backdoor write");
    q.write_zeroes_sync(&ns, 8, 40).expect("write zeroes");
    let now = rig.backdoor(1, 0, data.len());
    assert_eq!(now[..8 * 512], data[..8 * 512]);
    assert!(now[8 * 512..48 * 512].iter().all(|&b| b == 0));
    assert_eq!(now[48 * 512..], data[48 * 512..]);
    // More blocks than one command's 65536: three commands, ending at LBA 150_110.
    let tail = 150_100 * 512;
    rig.sim.write_ns(1, tail, &data).expect("backdoor write");
    rig.sim
        .write_ns(1, 100 * 512, &data)
        .expect("backdoor write");
    rig.sim.reset_counters();
    q.write_zeroes_sync(&ns, 100, 150_010)
        .expect("long write zeroes");
    assert_eq!(rig.sim.counters().io_commands(io::WRITE_ZEROES), 3);
    assert!(rig
        .backdoor(1, 100 * 512, data.len())
        .iter()
        .all(|&b| b == 0));
    let now = rig.backdoor(1, tail, data.len());
    assert!(now[..10 * 512].iter().all(|&b| b == 0));
    assert_eq!(now[10 * 512..], data[10 * 512..]);
}

#[test]
fn deallocate_reads_back_zeroes() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let data = pattern(41, 32 * 512);
    rig.sim.write_ns(1, 0, &data).expect("backdoor write");
    q.deallocate_sync(&ns, 4, 20).expect("deallocate");
    assert_eq!(rig.sim.counters().io_commands(io::DSM), 1);
    let now = rig.backdoor(1, 0, data.len());
    assert_eq!(now[..4 * 512], data[..4 * 512]);
    assert!(now[4 * 512..24 * 512].iter().all(|&b| b == 0));
    assert_eq!(now[24 * 512..], data[24 * 512..]);
    let buf = rig.buf(20 * 512);
    buf.write_at(0, &[0xff; 512]);
    q.read_sync(&ns, 4, &buf, 20 * 512).expect("read");
    assert!(read_buf(&buf, 0, 20 * 512).iter().all(|&b| b == 0));
}

#[test]
fn copy_within_a_namespace() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let data = pattern(51, 100 * 512);
    rig.sim
        .write_ns(1, 1000 * 512, &data)
        .expect("backdoor write");
    q.copy_sync(&ns, 1000, 100, 5000).expect("copy");
    assert_eq!(rig.sim.counters().io_commands(io::COPY), 1);
    assert_eq!(rig.backdoor(1, 5000 * 512, data.len()), data);
    assert_eq!(rig.backdoor(1, 1000 * 512, data.len()), data, "source kept");
    // A media error on a source range fails the Copy, and nothing is written.
    rig.sim
        .faults()
        .media_error(MediaError::read(1, 1050..1051));
    let err = q.copy_sync(&ns, 1000, 100, 7000).unwrap_err();
    assert!(matches!(err, Error::Command { cmd: "Copy", .. }), "{err}");
    let (nsid, lba, st) = command_error(&err);
    assert_eq!((nsid, lba), (1, 7000), "a Copy's LBA is its destination");
    assert_eq!(st.kind(), StatusKind::UnrecoveredReadError);
    assert!(rig
        .backdoor(1, 7000 * 512, data.len())
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn copy_splits_to_respect_the_limits() {
    // 8 blocks per range, 2 ranges, 20 blocks per command: 16 blocks per command.
    let cfg = SimConfig::new().namespace(NamespaceConfig::new(4096, 1024).copy_limits(8, 20, 2));
    let rig = Rig::new(cfg);
    let ns = rig.ns(1);
    assert_eq!((ns.mssrl, ns.mcl, ns.msrc), (8, 20, 2));
    let mut q = rig.qpair();
    let data = pattern(61, 100 * 4096);
    rig.sim.write_ns(1, 0, &data).expect("backdoor write");
    q.copy_sync(&ns, 0, 100, 500).expect("copy");
    assert_eq!(
        rig.sim.counters().io_commands(io::COPY),
        7,
        "ceil(100 / 16)"
    );
    assert_eq!(rig.backdoor(1, 500 * 4096, data.len()), data);
}

#[test]
fn reading_past_the_end_is_lba_out_of_range() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let buf = rig.buf(1024);
    let err = q.read_sync(&ns, ns.blocks - 1, &buf, 1024).unwrap_err();
    assert!(matches!(err, Error::Command { cmd: "Read", .. }), "{err}");
    let (nsid, lba, st) = command_error(&err);
    assert_eq!((nsid, lba), (1, ns.blocks - 1));
    assert_eq!(st.kind(), StatusKind::LbaOutOfRange);
    assert!(st.dnr());
    // A failed command does not hurt the queue.
    q.read_sync(&ns, ns.blocks - 2, &buf, 1024)
        .expect("in range");
}

#[test]
fn metadata_and_odd_lba_sizes_are_refused() {
    let cfg = SimConfig::new()
        .namespace(NamespaceConfig::new(512, 100))
        .namespace(NamespaceConfig::new(4096, 100).metadata(8))
        .namespace(NamespaceConfig::new(8192, 100));
    let rig = Rig::new(cfg);
    assert!(rig.ctrl.namespace(1).is_ok());
    let err = rig.ctrl.namespace(2).unwrap_err();
    assert!(
        matches!(
            err,
            Error::MetadataFormat {
                nsid: 2,
                metadata: 8,
                ..
            }
        ),
        "{err}"
    );
    let err = rig.ctrl.namespace(3).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LbaSize {
                nsid: 3,
                lba_size: 8192,
                ..
            }
        ),
        "{err}"
    );
    let err = rig.ctrl.namespace(4).unwrap_err();
    assert!(matches!(err, Error::NoNamespace { nsid: 4, .. }), "{err}");
}

#[test]
fn media_errors_come_back_typed_with_namespace_and_lba() {
    // MDTS 1: 16 blocks per command, so the failing command starts at LBA 32.
    let cfg = SimConfig::new()
        .mdts(1)
        .namespace(NamespaceConfig::new(512, 4096))
        .namespace(NamespaceConfig::new(512, 4096));
    let rig = Rig::new(cfg);
    let ns2 = rig.ns(2);
    let mut q = rig.qpair();
    let f = rig
        .sim
        .faults()
        .media_error(MediaError::read(2, 40..41).dnr(true));
    let buf = rig.buf(64 * 512);
    let err = q.read_sync(&ns2, 0, &buf, 64 * 512).unwrap_err();
    let (nsid, lba, st) = command_error(&err);
    assert_eq!((nsid, lba), (2, 32));
    assert_eq!(st.kind(), StatusKind::UnrecoveredReadError);
    assert_eq!(st.sct(), StatusCodeType::MediaError);
    assert!(st.dnr());
    assert!(err.to_string().contains("Unrecovered Read Error"), "{err}");
    assert_eq!(rig.sim.faults().hits(f), 1);
    // Namespace 1 has no fault at the same LBAs.
    q.read_sync(&rig.ns(1), 0, &buf, 64 * 512)
        .expect("other namespace");

    let old = pattern(71, 16 * 512);
    rig.sim.write_ns(2, 96 * 512, &old).expect("backdoor write");
    rig.sim.faults().media_error(MediaError::write(2, 100..101));
    buf.write_at(0, &pattern(72, 64 * 512));
    let err = q.write_sync(&ns2, 64, &buf, 64 * 512).unwrap_err();
    let (nsid, lba, st) = command_error(&err);
    assert_eq!((nsid, lba), (2, 96));
    assert_eq!(st.kind(), StatusKind::WriteFault);
    assert!(!st.dnr());
    assert_eq!(
        rig.backdoor(2, 96 * 512, old.len()),
        old,
        "the failed write left the blocks alone"
    );
}

#[test]
fn media_error_for_the_first_hits_only_allows_a_retry() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let data = pattern(81, 4096);
    rig.sim.write_ns(1, 0, &data).expect("backdoor write");
    let f = rig
        .sim
        .faults()
        .media_error(MediaError::read(1, 0..8).times(2));
    let buf = rig.buf(4096);
    for attempt in 0..2 {
        let err = q.read_sync(&ns, 0, &buf, 4096).unwrap_err();
        let (_, _, st) = command_error(&err);
        assert_eq!(st.kind(), StatusKind::UnrecoveredReadError, "{attempt}");
        assert!(!st.dnr(), "retryable");
    }
    q.read_sync(&ns, 0, &buf, 4096).expect("third attempt");
    assert_eq!(read_buf(&buf, 0, 4096), data);
    assert_eq!(rig.sim.faults().hits(f), 2);
}

#[test]
fn swallowed_command_times_out_and_the_controller_refuses_io() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let buf = rig.buf(4096);
    q.read_sync(&ns, 0, &buf, 4096).expect("before the fault");
    let f = rig
        .sim
        .faults()
        .swallow(CommandFilter::io().opcode(io::READ).lbas(16..17).times(1));
    let start = Instant::now();
    let err = q.read_sync(&ns, 16, &buf, 512).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(
        matches!(
            err,
            Error::CommandTimeout {
                cmd: "Read",
                nsid: 1,
                lba: 16,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(rig.sim.faults().hits(f), 1);
    assert!(!rig.sim.is_ready(), "the driver disabled the controller");
    // Further I/O on the queue fails without reaching the device (which error it is,
    // is the subject of `io_on_a_timed_out_queue_is_refused_as_disabled`).
    let doorbells = rig.sim.counters().sq_doorbell_writes(1);
    assert!(q.read_sync(&ns, 0, &buf, 512).is_err());
    assert_eq!(rig.sim.counters().sq_doorbell_writes(1), doorbells);
    let err = rig.ctrl.create_io_qpair(8).unwrap_err();
    assert!(matches!(err, Error::QueueDisabled { .. }), "{err}");
    let err = rig
        .ctrl
        .admin(Sqe::new(admin::IDENTIFY, 0), None)
        .unwrap_err();
    assert!(matches!(err, Error::QueueDisabled { .. }), "{err}");
}

#[test]
fn controller_fatal_status_stops_io() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let buf = rig.buf(4096);
    rig.sim.faults().set_fatal(true);
    let err = q.read_sync(&ns, 0, &buf, 4096).unwrap_err();
    assert!(matches!(err, Error::ControllerFatal { .. }), "{err}");
    // The queue takes no more commands, and the controller no new queues.
    let doorbells = rig.sim.counters().sq_doorbell_writes(1);
    let err = q.read_sync(&ns, 0, &buf, 4096).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ControllerFatal { .. } | Error::QueueDisabled { .. }
        ),
        "{err}"
    );
    assert_eq!(rig.sim.counters().sq_doorbell_writes(1), doorbells);
    let err = rig.ctrl.create_io_qpair(8).unwrap_err();
    assert!(matches!(err, Error::QueueDisabled { .. }), "{err}");
}

/// After a timeout the queue is disabled, so a new transfer is refused with
/// `QueueDisabled`, not with a second `CommandTimeout` about the old command (which
/// waiting on its leftover tracker again would report; fixed in 58e7044).
#[test]
fn io_on_a_timed_out_queue_is_refused_as_disabled() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let buf = rig.buf(4096);
    rig.sim.faults().swallow(CommandFilter::io().times(1));
    let err = q.read_sync(&ns, 16, &buf, 512).unwrap_err();
    assert!(
        matches!(err, Error::CommandTimeout { lba: 16, .. }),
        "{err}"
    );
    let err = q.read_sync(&ns, 0, &buf, 512).unwrap_err();
    assert!(matches!(err, Error::QueueDisabled { qid: 1, .. }), "{err}");
}

#[test]
fn a_controller_reporting_one_queue_entry_is_refused() {
    // CAP.MQES = 0 means queues of one entry, below the specification's minimum of 2.
    let pool = DmaPool::unmapped(4 << 20).expect("pool");
    let sim = SimController::new(cfg_512().max_queue_entries(1), pool.clone());
    assert_eq!(sim.read64(reg::CAP) & 0xffff, 0, "CAP.MQES is 0");
    let err = Controller::new("sim0", sim.clone() as Arc<dyn Bar>, pool, quick()).unwrap_err();
    assert!(
        matches!(err, Error::QueueTooSmall { entries: 1, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("sim0") && msg.contains("CAP.MQES"), "{msg}");
    assert!(!sim.is_ready(), "refused before the controller was enabled");
}

#[test]
fn controller_fatal_status_fails_bring_up() {
    let pool = DmaPool::unmapped(4 << 20).expect("pool");
    let sim = SimController::new(cfg_512(), pool.clone());
    sim.faults().set_fatal(true);
    let err = Controller::new("sim0", sim.clone() as Arc<dyn Bar>, pool, quick()).unwrap_err();
    assert!(matches!(err, Error::ControllerFatal { .. }), "{err}");
    assert_eq!(sim.read32(reg::CSTS) & csts::CFS, csts::CFS);
}

#[test]
fn bogus_command_id_is_reported() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let data = pattern(91, 512);
    rig.sim.write_ns(1, 0, &data).expect("backdoor write");
    let buf = rig.buf(4096);
    // An id outside the tracker slab, delivered before the real completion.
    rig.sim.faults().bogus_cid_next(0xffff, true);
    let err = q.read_sync(&ns, 0, &buf, 512).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BadCommandId {
                qid: 1,
                cid: 0xffff,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(q.outstanding(), 0, "the real completion was handled too");
    assert_eq!(read_buf(&buf, 0, 512), data);
    q.read_sync(&ns, 0, &buf, 512)
        .expect("the queue still works");

    // An id inside the slab that is not outstanding, instead of the real one.
    rig.sim.faults().bogus_cid_next(7, false);
    let err = q.read_sync(&ns, 0, &buf, 512).unwrap_err();
    assert!(matches!(err, Error::BadCommandId { cid: 7, .. }), "{err}");
    assert_eq!(q.outstanding(), 1, "the real command never completed");
}

#[test]
fn queue_full_then_recovers_after_completions() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.ctrl.create_io_qpair(4).expect("qpair");
    assert_eq!((q.depth(), q.free_slots()), (4, 3));
    let buf = rig.buf(4 * PAGE_SIZE);
    let at = |i: usize| DataPtr::Contig {
        iova: buf.iova().add((i * PAGE_SIZE) as u64),
        len: 512,
    };
    rig.sim.faults().pause_io();
    for i in 0..3 {
        q.submit_read(&ns, i as u64, at(i), i as u64).expect("room");
    }
    q.ring();
    let err = q.submit_read(&ns, 3, at(3), 3).unwrap_err();
    assert!(matches!(err, Error::QueueFull { qid: 1, .. }), "{err}");
    let st = rig.sim.queue_status(1).expect("queue 1");
    assert_eq!(
        (st.sq_entries, st.sq_unfetched),
        (4, 3),
        "the device sees a full SQ"
    );
    assert_eq!(q.poll(16, |_| {}).expect("poll"), 0);
    rig.sim.faults().resume_io();
    let done = reap(&mut q, 3);
    let mut tokens: Vec<u64> = done.iter().map(|c| c.token).collect();
    tokens.sort_unstable();
    assert_eq!(tokens, vec![0, 1, 2]);
    assert!(done.iter().all(|c| c.status.is_success()));
    q.submit_read(&ns, 3, at(3), 3).expect("room again");
    assert_eq!(reap(&mut q, 1)[0].token, 3);
}

#[test]
fn one_doorbell_per_batch() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let buf = rig.buf(8 * PAGE_SIZE);
    rig.sim.reset_counters();
    for i in 0..8 {
        let d = DataPtr::Contig {
            iova: buf.iova().add((i * PAGE_SIZE) as u64),
            len: PAGE_SIZE,
        };
        q.submit_read(&ns, i as u64 * 8, d, i as u64)
            .expect("submit");
    }
    assert_eq!(
        rig.sim.counters().total_io_commands(),
        0,
        "nothing rung yet"
    );
    q.ring();
    q.ring(); // nothing new: no store
    let c = rig.sim.counters();
    assert_eq!(c.sq_doorbell_writes(1), 1);
    assert_eq!(c.io_commands(io::READ), 8);
    let mut n = 0;
    assert_eq!(q.poll(64, |_| n += 1).expect("poll"), 8);
    assert_eq!(n, 8);
    // 8 completions, far from half the ring: the head is not reported yet...
    assert_eq!(rig.sim.counters().cq_doorbell_writes(1), 0);
    // ...until more commands would bring the controller's view of the CQ past it.
    let entries = q.depth() as usize;
    for i in 0..entries / 2 {
        let d = DataPtr::Contig {
            iova: buf.iova().add(((i % 8) * PAGE_SIZE) as u64),
            len: PAGE_SIZE,
        };
        q.submit_read(&ns, 0, d, 100 + i as u64).expect("submit");
    }
    q.ring();
    let c = rig.sim.counters();
    assert_eq!((c.cq_doorbell_writes(1), c.sq_doorbell_writes(1)), (1, 2));
    assert_eq!(reap(&mut q, entries / 2).len(), entries / 2);
}

#[test]
fn unsupported_optional_commands_are_refused_by_the_driver() {
    let cfg = cfg_512().copy(false).write_zeroes(false).dsm(false);
    let rig = Rig::new(cfg);
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let info = rig.ctrl.info();
    assert!(!info.supports_copy() && !info.supports_write_zeroes() && !info.supports_dsm());
    let err = q.copy_sync(&ns, 0, 8, 100).unwrap_err();
    assert!(
        matches!(err, Error::CommandUnsupported { cmd: "Copy", .. }),
        "{err}"
    );
    let err = q.write_zeroes_sync(&ns, 0, 8).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CommandUnsupported {
                cmd: "Write Zeroes",
                ..
            }
        ),
        "{err}"
    );
    let err = q.deallocate_sync(&ns, 0, 8).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CommandUnsupported {
                cmd: "Dataset Management",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        rig.sim.counters().total_io_commands(),
        0,
        "nothing was sent"
    );
}

#[test]
fn copy_offered_without_format_0_is_unsupported() {
    let rig = Rig::new(cfg_512().ocfs(0));
    let mut q = rig.qpair();
    let err = q.copy_sync(&rig.ns(1), 0, 8, 100).unwrap_err();
    assert!(
        matches!(err, Error::CommandUnsupported { cmd: "Copy", .. }),
        "{err}"
    );
}

#[test]
fn queue_pairs_use_the_doorbell_stride_and_the_granted_count() {
    let rig = Rig::new(cfg_512().doorbell_stride(3).io_queues(2));
    assert_eq!(rig.ctrl.cap().doorbell_stride(), 32);
    let ns = rig.ns(1);
    let mut a = rig.qpair();
    let mut b = rig.qpair();
    assert_eq!((a.qid(), b.qid()), (1, 2));
    let err = rig.ctrl.create_io_qpair(8).unwrap_err();
    assert!(
        matches!(err, Error::NoFreeQueue { granted: 2, .. }),
        "{err}"
    );
    let buf = rig.buf(4096);
    buf.write_at(0, &pattern(3, 4096));
    a.write_sync(&ns, 0, &buf, 4096).expect("write on 1");
    b.read_sync(&ns, 0, &buf, 4096).expect("read on 2");
    b.flush_sync(&ns).expect("flush on 2");
    let c = rig.sim.counters();
    assert_eq!((c.sq_doorbell_writes(1), c.sq_doorbell_writes(2)), (1, 2));
    assert_eq!(c.io_commands(io::FLUSH), 1);
    assert_eq!(c.invalid_doorbell_writes(), 0);
    drop(a);
    assert!(
        rig.sim.queue_status(1).is_none(),
        "dropping deletes the queues"
    );
    assert!(rig.sim.queue_status(2).is_some());
    let again = rig.qpair();
    assert_eq!(again.qid(), 1);
}

#[test]
fn admin_commands_the_controller_lacks_fail_with_their_status() {
    let rig = Rig::new(cfg_512());
    let err = rig.ctrl.admin(Sqe::new(0xc1, 0), None).unwrap_err();
    let (nsid, _, st) = command_error(&err);
    assert_eq!(nsid, 0);
    assert_eq!(st.kind(), StatusKind::InvalidOpcode);
}

#[test]
fn dropping_the_controller_shuts_it_down() {
    let rig = Rig::new(cfg_512());
    drop(rig.qpair());
    let Rig { sim, ctrl, .. } = rig;
    assert_eq!(sim.read32(reg::CSTS) & csts::SHST_MASK, 0);
    drop(ctrl);
    assert_eq!(sim.read32(reg::CSTS) & csts::SHST_MASK, csts::SHST_COMPLETE);
}

#[test]
fn file_backed_namespace_keeps_its_data() {
    let dir = std::env::temp_dir().join(format!("nvcopy-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("ns1.img");
    let _ = std::fs::remove_file(&path);
    let cfg = SimConfig::new().namespace(NamespaceConfig::new(512, 1 << 14).file(&path));
    let data = pattern(99, 64 * 1024);
    {
        let rig = Rig::new(cfg.clone());
        let ns = rig.ns(1);
        let mut q = rig.qpair();
        let buf = rig.buf(data.len());
        buf.write_at(0, &data);
        q.write_sync(&ns, 1000, &buf, data.len()).expect("write");
    }
    let file = std::fs::read(&path).expect("image");
    assert_eq!(file.len(), 512 << 14, "sized to the namespace");
    assert_eq!(file[1000 * 512..1000 * 512 + data.len()], data);
    let rig = Rig::new(cfg);
    let mut q = rig.qpair();
    let buf = rig.buf(data.len());
    q.read_sync(&rig.ns(1), 1000, &buf, data.len())
        .expect("read");
    assert_eq!(read_buf(&buf, 0, data.len()), data);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn active_namespace_list_is_paged_past_1024_ids() {
    let cfg = (0..1500).fold(SimConfig::new(), |c, _| {
        c.namespace(NamespaceConfig::new(512, 64))
    });
    let rig = Rig::new(cfg);
    let ids: Vec<u32> = rig.ctrl.namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(ids, (1..=1500).collect::<Vec<u32>>());
    assert_eq!(rig.ctrl.info().nn, 1500);
    // Identify Controller, two list pages, and one Identify Namespace each.
    assert_eq!(
        rig.sim.counters().admin_commands(admin::IDENTIFY),
        1 + 2 + 1500
    );
    let mut q = rig.qpair();
    let buf = rig.buf(512);
    buf.write_at(0, &pattern(7, 512));
    q.write_sync(&rig.ns(1500), 63, &buf, 512)
        .expect("write to the last namespace");
    assert_eq!(rig.backdoor(1500, 63 * 512, 512), pattern(7, 512));
}

#[test]
fn a_controller_left_enabled_is_reset_and_brought_up_again() {
    let pool = DmaPool::unmapped(8 << 20).expect("pool");
    let sim = SimController::new(cfg_512(), pool.clone());
    let bar = sim.clone() as Arc<dyn Bar>;
    let first = Controller::new("sim0", bar.clone(), pool.clone(), quick()).expect("first");
    let q = first.create_io_qpair(8).expect("qpair");
    // Leak the queue pair so its queues stay created, as a crashed process would leave them.
    std::mem::forget(q);
    assert!(sim.queue_status(1).is_some());
    let second = Controller::new("sim0", bar, pool, quick()).expect("second bring-up");
    assert!(
        sim.queue_status(1).is_none(),
        "the reset dropped the old queues"
    );
    let mut q = second
        .create_io_qpair(8)
        .expect("qpair on the new controller");
    let buf = second.pool().alloc(512).expect("buf");
    q.read_sync(&second.namespace(1).expect("ns").clone(), 0, &buf, 512)
        .expect("read");
}

#[test]
fn admin_timeout_during_bring_up_is_reported() {
    let pool = DmaPool::unmapped(4 << 20).expect("pool");
    let sim = SimController::new(cfg_512(), pool.clone());
    sim.faults()
        .swallow(CommandFilter::admin().opcode(admin::SET_FEATURES));
    let opts = ControllerOptions {
        admin_timeout: Duration::from_millis(200),
        ..quick()
    };
    let err = Controller::new("sim0", sim.clone() as Arc<dyn Bar>, pool, opts).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CommandTimeout {
                cmd: "Set Features",
                ..
            }
        ),
        "{err}"
    );
    assert!(!sim.is_ready(), "the driver disabled the controller");
}

/// Posts a 512-byte read of `lba` that the controller swallows, and waits until the
/// driver sees it expired.
fn swallowed_read(rig: &Rig, q: &mut IoQpair, ns: &Namespace, lba: u64, buf: &DmaBuf) {
    rig.sim
        .faults()
        .swallow(CommandFilter::io().lbas(lba..lba + 1).times(1));
    q.submit_read(
        ns,
        lba,
        DataPtr::Contig {
            iova: buf.iova(),
            len: 512,
        },
        77,
    )
    .expect("submit");
    q.ring();
    assert!(q.expired(std::time::Instant::now()).is_none());
    std::thread::sleep(Duration::from_millis(250));
    assert_eq!(q.poll(16, |_| {}).expect("poll"), 0);
    let late = q.expired(std::time::Instant::now()).expect("expired");
    assert_eq!((late.opcode, late.nsid, late.slba), (io::READ, 1, lba));
    assert!(late.waited >= Duration::from_millis(200));
}

#[test]
fn a_timed_out_command_is_aborted_by_a_reset_and_the_queue_recreated_in_place() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let buf = rig.buf(4096);
    swallowed_read(&rig, &mut q, &ns, 40, &buf);
    let gen = q.generation();
    assert_eq!(rig.ctrl.reset(gen), Health::Ready);
    assert!(
        q.is_stale(),
        "the reset deleted the queue pair on the controller"
    );
    // A second reset request for the same fault does nothing.
    assert_eq!(rig.ctrl.reset(gen), Health::Ready);
    assert_eq!(rig.ctrl.generation(), gen + 1);
    let mut aborted = vec![];
    assert_eq!(q.recover(|c| aborted.push(c)), Recovery::Reissue);
    assert_eq!(aborted.len(), 1);
    assert_eq!(aborted[0].token, 77);
    assert_eq!(aborted[0].status.kind(), StatusKind::AbortedSqDeleted);
    assert!(!q.is_stale() && q.outstanding() == 0);
    // The queue pair works again, with the same id, and so does the admin queue.
    rig.sim
        .write_ns(1, 41 * 512, &[0xab; 512])
        .expect("backdoor");
    q.read_sync(&ns, 41, &buf, 512)
        .expect("read after recovery");
    let mut got = [0u8; 512];
    buf.read_at(0, &mut got);
    assert_eq!(got, [0xab; 512]);
    let again = rig
        .ctrl
        .create_io_qpair(8)
        .expect("admin queue works after the reset");
    drop(again);
}

#[test]
fn a_controller_that_will_not_stop_is_quiesced_by_bus_master_off() {
    let rig = Rig::new(cfg_512().cap_timeout(1));
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let buf = rig.buf(4096);
    swallowed_read(&rig, &mut q, &ns, 40, &buf);
    rig.sim.faults().stuck_ready(true);
    assert_eq!(
        rig.ctrl.reset(q.generation()),
        Health::Failed { quiet: true }
    );
    assert!(!rig.sim.bus_master(), "bus mastering was turned off");
    let mut aborted = vec![];
    assert_eq!(
        q.recover(|c| aborted.push(c)),
        Recovery::Failed { quiet: true }
    );
    assert_eq!(aborted.len(), 1);
    let err = rig.ctrl.create_io_qpair(8).unwrap_err();
    assert!(matches!(err, Error::QueueDisabled { .. }), "{err}");
}

#[test]
fn a_controller_that_cannot_be_proven_quiet_quarantines_its_queue_memory() {
    let rig = Rig::new(cfg_512().cap_timeout(1));
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let buf = rig.buf(4096);
    swallowed_read(&rig, &mut q, &ns, 40, &buf);
    rig.sim.faults().stuck_ready(true);
    rig.sim.faults().quiesce_fails(true);
    let free_before = rig.pool.free_pages();
    assert_eq!(
        rig.ctrl.reset(q.generation()),
        Health::Failed { quiet: false }
    );
    assert_eq!(q.recover(|_| {}), Recovery::Failed { quiet: false });
    drop(q);
    // The rings (and any PRP-list pages) of the queue pair never went back to the pool.
    assert!(
        rig.pool.free_pages() <= free_before,
        "quarantined queue memory was returned: {} > {free_before}",
        rig.pool.free_pages()
    );
    assert_eq!(rig.ctrl.health(), Health::Failed { quiet: false });
}

#[test]
fn queue_pairs_on_separate_threads() {
    let rig = Rig::new(
        SimConfig::new()
            .io_queues(4)
            .namespace(NamespaceConfig::new(512, 1 << 16)),
    );
    let ns = rig.ns(1);
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let mut q = rig.qpair();
            let ns = ns.clone();
            let pool = rig.pool.clone();
            std::thread::spawn(move || {
                let buf = pool.alloc(64 * 1024).expect("buf");
                for i in 0..20u64 {
                    let data = pattern(t * 100 + i, 64 * 1024);
                    buf.write_at(0, &data);
                    let lba = t * 10_000 + i * 128;
                    q.write_sync(&ns, lba, &buf, data.len()).expect("write");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    for t in 0..4u64 {
        for i in 0..20u64 {
            let lba = t * 10_000 + i * 128;
            assert_eq!(
                rig.backdoor(1, lba * 512, 64 * 1024),
                pattern(t * 100 + i, 64 * 1024),
                "thread {t} chunk {i}"
            );
        }
    }
    assert_eq!(rig.sim.counters().io_commands(io::WRITE), 4 * 20);
}

/// A controller whose CSTS.RDY never drops after CC.EN is cleared: the driver's disable
/// gives up after CAP.TO (here 500 ms, the driver's floor) with a typed error.
#[test]
fn a_controller_that_will_not_stop_fails_bring_up_after_cap_to() {
    let pool = DmaPool::unmapped(4 << 20).expect("pool");
    let sim = SimController::new(cfg_512().cap_timeout(1), pool.clone());
    // Left enabled by someone else.
    let q = pool.alloc_zeroed(2 * PAGE_SIZE).expect("admin queues");
    sim.write32(reg::AQA, 1 | 1 << 16);
    sim.write64(reg::ASQ, q.iova().0);
    sim.write64(reg::ACQ, q.iova().0 + PAGE_SIZE as u64);
    sim.write32(reg::CC, 1);
    assert!(sim.is_ready());
    sim.faults().stuck_ready(true);
    let start = Instant::now();
    let err = Controller::new("sim0", sim.clone() as Arc<dyn Bar>, pool, quick()).unwrap_err();
    let waited = start.elapsed();
    assert!(matches!(err, Error::ReadyTimeout { .. }), "{err}");
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(sim.is_ready(), "still running");
}

#[test]
fn a_slow_flush_completes_after_its_delay() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    let f = rig.sim.faults().delay(
        CommandFilter::io().opcode(io::FLUSH),
        Duration::from_millis(50),
    );
    let start = Instant::now();
    q.flush_sync(&ns).expect("slow flush succeeds");
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert_eq!(rig.sim.faults().hits(f), 1);
}

/// A read the device answers after the driver gave up on it: the driver's timeout
/// disables the controller, which drops the late read, so its buffer is never written.
#[test]
fn a_late_read_after_the_timeout_is_dropped_by_the_reset() {
    let rig = Rig::new(cfg_512());
    let ns = rig.ns(1);
    let mut q = rig.qpair();
    rig.sim
        .write_ns(1, 0, &pattern(3, 512))
        .expect("backdoor write");
    let buf = rig.buf(4096);
    rig.sim.faults().late(
        CommandFilter::io().opcode(io::READ),
        Duration::from_millis(400),
    );
    let err = q.read_sync(&ns, 0, &buf, 512).unwrap_err();
    assert!(matches!(err, Error::CommandTimeout { .. }), "{err}");
    assert!(!rig.sim.is_ready());
    std::thread::sleep(Duration::from_millis(450));
    rig.sim.run_due();
    assert_eq!(read_buf(&buf, 0, 512), vec![0u8; 512]);
    assert_eq!(rig.sim.counters().dropped(), 1);
}

/// A failed Flush carrying a Command Retry Delay, and the CRDT values the controller
/// reports, reach the driver intact.
#[test]
fn a_failed_flush_reports_its_retry_delay() {
    let pool = DmaPool::unmapped(8 << 20).expect("pool");
    let sim = SimController::new(cfg_512(), pool.clone());
    sim.faults().command_retry_delays([1, 5, 20]);
    let ctrl = Controller::new("sim0", sim.clone() as Arc<dyn Bar>, pool, quick())
        .expect("controller comes up");
    assert_eq!(ctrl.info().crdt, [1, 5, 20]);
    let ns = ctrl.namespace(1).expect("ns").clone();
    let mut q = ctrl.create_io_qpair(8).expect("qpair");
    let busy = nvcopy_nvme::Status::new(0, 0x06).with_crd(2);
    sim.faults()
        .fail(CommandFilter::io().opcode(io::FLUSH).times(1), busy);
    let err = q.flush_sync(&ns).unwrap_err();
    let (_, _, status) = command_error(&err);
    assert_eq!(
        (status.kind(), status.crd()),
        (StatusKind::InternalError, 2)
    );
    assert_eq!(
        ctrl.info().retry_delay(status.crd()),
        Duration::from_millis(500)
    );
    q.flush_sync(&ns).expect("the retry succeeds");
}

#[test]
fn a_device_retry_delay_is_capped_so_a_copier_never_looks_hung() {
    let pool = DmaPool::unmapped(32 << 20).expect("pool");
    let sim = SimController::new(cfg_512(), pool.clone());
    // CRDT1 at its largest: 65535 units of 100 ms, 1h49m.
    sim.faults().command_retry_delays([65535, 3, 0]);
    let ctrl = Controller::new("sim0", sim.clone() as Arc<dyn Bar>, pool.clone(), quick())
        .expect("controller comes up");
    let ns = ctrl.namespace(1).expect("ns").clone();
    let mut q = ctrl.create_io_qpair(8).expect("qpair");
    let buf = pool.alloc_zeroed(4096).expect("buf");
    let mut completions = vec![];
    for (crd, dnr) in [(1u8, false), (2, false), (0, false), (1, true)] {
        sim.faults().fail(
            CommandFilter::io().opcode(io::READ).times(1),
            nvcopy_nvme::Status::new(0, 0x06)
                .with_crd(crd)
                .with_dnr(dnr),
        );
        q.submit_read(
            &ns,
            0,
            DataPtr::Contig {
                iova: buf.iova(),
                len: 512,
            },
            0,
        )
        .expect("submit");
        q.ring();
        let mut got = None;
        while got.is_none() {
            q.poll(8, |c| got = Some(c)).expect("poll");
        }
        completions.push(got.expect("completion"));
    }
    let delays: Vec<_> = completions.iter().map(|c| q.retry_after(c)).collect();
    assert_eq!(
        delays,
        vec![
            Some(nvcopy_nvme::MAX_RETRY_DELAY),
            Some(Duration::from_millis(300)),
            Some(Duration::ZERO),
            None
        ]
    );
    assert_eq!(nvcopy_nvme::MAX_RETRY_DELAY, Duration::from_secs(10));
}
