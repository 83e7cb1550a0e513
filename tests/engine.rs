//! The copier against the software NVMe controller, running on its own device thread
//! ([`ThreadedSim`]), so that the real driver and the real reactors do the work and the
//! device's bytes can be checked through a backdoor.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{ctrl, data, ok, opts, Rig, MIB};
use nvcopy::{Client, DestMask, Error, Flags, Refusal, Region};
use nvcopy_nvme::spec::io;
use nvcopy_nvme_sim::{CommandFilter, MediaError, NamespaceConfig, SimConfig};

#[test]
fn copies_byte_exact_to_one_two_and_eight_destinations() {
    let rig = Rig::new(
        vec![ctrl(&[(512, 8 * MIB)]), ctrl(&[(512, 4 * MIB); 8])],
        opts(),
    );
    let client = Client::new(&rig.engine, 256).unwrap();
    for (round, n) in [1usize, 2, 8].into_iter().enumerate() {
        let src = rig.region(0, 1, round as u64 * MIB, 3 * MIB + 512 * 7);
        let bytes = data(round as u64, src.len);
        rig.put(&src, &bytes);
        let dests: Vec<Region> = (0..n)
            .map(|i| rig.region(1, i as u32 + 1, 4096 * i as u64, src.len))
            .collect();
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let h = client
            .copy(&src, &dests, Flags::NONE, move |read_err, write_err| {
                assert!(!read_err && !write_err.any());
                seen.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        let o = h.wait();
        assert!(ok(&o), "{o:?}");
        assert_eq!(o.bytes_ok, src.len);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "callback runs exactly once"
        );
        for d in &dests {
            assert!(
                rig.get(d) == bytes,
                "{n} destinations: nsid {} differs",
                d.nsid
            );
        }
    }
    assert!(rig.io(0, io::READ) > 0 && rig.io(1, io::WRITE) > 0);
}

#[test]
fn copies_across_lba_sizes_and_to_the_end_of_a_namespace() {
    let rig = Rig::new(
        vec![ctrl(&[(512, 4 * MIB)]), ctrl(&[(4096, 4 * MIB)])],
        opts(),
    );
    let client = Client::new(&rig.engine, 64).unwrap();
    // 512-byte source to a 4096-byte destination, ending at the last block of both.
    let len = MIB + 64 * 1024;
    let src = rig.region(0, 1, 4 * MIB - len, len);
    let dst = rig.region(1, 1, 4 * MIB - len, len);
    let bytes = data(7, len);
    rig.put(&src, &bytes);
    assert!(ok(&client
        .copy_blocking(&src, &[dst], Flags::NONE)
        .unwrap()));
    assert!(rig.get(&dst) == bytes);
    // And back, 4096 to 512, into a region that starts mid-namespace.
    let back = rig.region(0, 1, 8192, len);
    assert!(ok(&client
        .copy_blocking(&dst, &[back], Flags::NONE)
        .unwrap()));
    assert!(rig.get(&back) == bytes);
}

#[test]
fn a_chunk_size_that_does_not_divide_the_length() {
    let mut o = opts();
    o.chunk = 12 << 10;
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], o);
    let client = Client::new(&rig.engine, 16).unwrap();
    let src = rig.region(0, 1, 512, 5 * 12 * 1024 + 1536);
    let dst = rig.region(0, 2, 1024, src.len);
    let bytes = data(3, src.len);
    rig.put(&src, &bytes);
    let outcome = client.copy_blocking(&src, &[dst], Flags::NONE).unwrap();
    assert!(ok(&outcome) && outcome.bytes_ok == src.len, "{outcome:?}");
    assert!(rig.get(&dst) == bytes);
}

/// A source whose LBAs 2048..2056 (chunk 16 of 64 KiB chunks, 512-byte blocks) fail to read.
fn bad_source_rig(dnr: bool, times: u32, flags_qd: usize) -> (Rig, Region, Region, Vec<u8>) {
    let mut o = opts();
    o.qd = flags_qd;
    o.reactors = 1;
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], o);
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dst = rig.region(0, 2, 0, 2 * MIB);
    let bytes = data(11, src.len);
    rig.put(&src, &bytes);
    rig.put(&dst, &vec![0xaa; dst.len as usize]);
    rig.sim(0)
        .faults()
        .media_error(MediaError::read(1, 2048..2056).dnr(dnr).times(times));
    (rig, src, dst, bytes)
}

#[test]
fn ignore_errors_copies_every_other_chunk_and_reports_read_err() {
    let (rig, src, dst, bytes) = bad_source_rig(true, u32::MAX, 8);
    let client = Client::new(&rig.engine, 256).unwrap();
    let o = client
        .copy_blocking(&src, &[dst], Flags::IGNORE_ERRORS)
        .unwrap();
    assert!(o.read_err && !o.write_err.any(), "{o:?}");
    assert_eq!(o.failed_chunks, 1);
    assert_eq!(o.bytes_ok, src.len - 64 * 1024);
    assert!(
        o.first_error
            .as_deref()
            .unwrap()
            .contains("Unrecovered Read Error"),
        "{o:?}"
    );
    let got = rig.get(&dst);
    let bad = 1024 * 1024..1024 * 1024 + 64 * 1024;
    assert!(
        got[..bad.start] == bytes[..bad.start] && got[bad.end..] == bytes[bad.end..],
        "other chunks intact"
    );
    assert!(
        got[bad].iter().all(|&b| b == 0xaa),
        "a chunk that could not be read is not written"
    );
}

#[test]
fn without_ignore_errors_the_first_error_stops_dispatch() {
    let (rig, src, dst, bytes) = bad_source_rig(true, u32::MAX, 1);
    let client = Client::new(&rig.engine, 256).unwrap();
    let o = client.copy_blocking(&src, &[dst], Flags::NONE).unwrap();
    assert!(o.read_err && o.failed_chunks == 1, "{o:?}");
    assert_eq!(
        o.bytes_ok, MIB,
        "the 16 chunks before the bad one, none after"
    );
    let got = rig.get(&dst);
    assert!(got[..MIB as usize] == bytes[..MIB as usize]);
    assert!(
        got[MIB as usize..].iter().all(|&b| b == 0xaa),
        "nothing written after the stop"
    );
}

#[test]
fn errors_without_dnr_are_retried_and_with_dnr_are_not() {
    let (rig, src, dst, bytes) = bad_source_rig(false, 2, 8);
    let client = Client::new(&rig.engine, 256).unwrap();
    let o = client.copy_blocking(&src, &[dst], Flags::NONE).unwrap();
    assert!(
        ok(&o),
        "two transient failures, three retries allowed: {o:?}"
    );
    assert!(rig.get(&dst) == bytes);
    drop((client, rig));

    let (rig, src, dst, _) = bad_source_rig(true, 1, 8);
    let client = Client::new(&rig.engine, 256).unwrap();
    let o = client
        .copy_blocking(&src, &[dst], Flags::IGNORE_ERRORS)
        .unwrap();
    assert!(
        o.read_err,
        "a DNR error is final even if the next try would work: {o:?}"
    );
}

#[test]
fn a_write_error_marks_only_its_destination() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB); 3])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 0, MIB);
    let dests = [rig.region(0, 2, 0, MIB), rig.region(0, 3, 0, MIB)];
    let bytes = data(5, MIB);
    rig.put(&src, &bytes);
    rig.sim(0)
        .faults()
        .media_error(MediaError::write(3, 100..101).dnr(true));
    let o = client
        .copy_blocking(&src, &dests, Flags::IGNORE_ERRORS)
        .unwrap();
    assert!(!o.read_err);
    assert_eq!(o.write_err, DestMask(0b10), "{o:?}");
    assert!(
        rig.get(&dests[0]) == bytes,
        "the healthy destination got everything"
    );
    assert!(o.first_error.unwrap().contains("Write Fault"));
}

#[test]
fn a_command_that_never_completes_times_out_and_fails_the_job() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 0, MIB);
    let dst = rig.region(0, 2, 0, MIB);
    rig.sim(0)
        .faults()
        .swallow(CommandFilter::io().opcode(io::READ).lbas(512..513));
    let o = client
        .copy_blocking(&src, &[dst], Flags::IGNORE_ERRORS)
        .unwrap();
    assert!(o.read_err, "{o:?}");
    assert!(
        o.first_error
            .as_deref()
            .unwrap()
            .contains("did not complete"),
        "{o:?}"
    );
    // The controller was disabled: later jobs fail rather than reuse its queues.
    let again = client.copy_blocking(&src, &[dst], Flags::NONE).unwrap();
    assert!(again.read_err || again.write_err.any(), "{again:?}");
}

#[test]
fn controller_fatal_status_fails_the_job() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.sim(0).faults().set_fatal(true);
    let o = client
        .copy_blocking(
            &rig.region(0, 1, 0, MIB),
            &[rig.region(0, 2, 0, MIB)],
            Flags::NONE,
        )
        .unwrap();
    assert!(o.read_err, "{o:?}");
    assert!(o.first_error.unwrap().contains("fatal"));
}

#[test]
fn a_bogus_command_id_is_dropped_and_the_copy_completes() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 0, MIB);
    let dst = rig.region(0, 2, 0, MIB);
    let bytes = data(9, MIB);
    rig.put(&src, &bytes);
    rig.sim(0).faults().bogus_cid_next(0xffff, true);
    assert!(ok(&client
        .copy_blocking(&src, &[dst], Flags::NONE)
        .unwrap()));
    assert!(rig.get(&dst) == bytes);
}

#[test]
fn a_full_queue_makes_chunks_wait_not_fail() {
    let mut o = opts();
    o.queue_entries = 4;
    o.qd = 16;
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB); 4])], o);
    let client = Client::new(&rig.engine, 512).unwrap();
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dests = [
        rig.region(0, 2, 0, 2 * MIB),
        rig.region(0, 3, 0, 2 * MIB),
        rig.region(0, 4, 0, 2 * MIB),
    ];
    let bytes = data(13, src.len);
    rig.put(&src, &bytes);
    rig.sim(0).faults().pause_io();
    let h = client.copy(&src, &dests, Flags::NONE, |_, _| {}).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(!h.is_finished());
    rig.sim(0).faults().resume_io();
    let o = h.wait();
    assert!(ok(&o), "{o:?}");
    for d in &dests {
        assert!(rig.get(d) == bytes);
    }
}

#[test]
fn copy_offload_within_a_namespace_and_its_fallbacks() {
    // Offloaded: no reads, Copy commands only.
    let rig = Rig::new(vec![ctrl(&[(512, 8 * MIB)])], opts());
    let client = Client::new(&rig.engine, 64).unwrap();
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dst = rig.region(0, 1, 4 * MIB, 2 * MIB);
    let bytes = data(17, src.len);
    rig.put(&src, &bytes);
    assert!(ok(&client
        .copy_blocking(&src, &[dst], Flags::NONE)
        .unwrap()));
    assert!(rig.get(&dst) == bytes);
    assert!(rig.io(0, io::COPY) > 0 && rig.io(0, io::READ) == 0 && rig.io(0, io::WRITE) == 0);
    drop((client, rig));

    // No Copy support: the data is moved.
    let rig = Rig::new(vec![ctrl(&[(512, 8 * MIB)]).copy(false)], opts());
    let client = Client::new(&rig.engine, 64).unwrap();
    rig.put(&src, &bytes);
    assert!(ok(&client
        .copy_blocking(&src, &[dst], Flags::NONE)
        .unwrap()));
    assert!(rig.get(&dst) == bytes);
    assert!(rig.io(0, io::COPY) == 0 && rig.io(0, io::READ) > 0);
    drop((client, rig));

    // Limits too small for a chunk: moved too.
    let small = SimConfig::new().namespace(NamespaceConfig::new(512, 16384).copy_limits(4, 8, 2));
    let rig = Rig::new(vec![small], opts());
    let client = Client::new(&rig.engine, 64).unwrap();
    rig.put(&src, &bytes);
    assert!(ok(&client
        .copy_blocking(&src, &[dst], Flags::NONE)
        .unwrap()));
    assert!(rig.get(&dst) == bytes);
    assert!(rig.io(0, io::COPY) == 0 && rig.io(0, io::WRITE) > 0);
}

#[test]
fn zero_uses_write_zeroes_or_writes_from_the_zero_page() {
    for wz in [true, false] {
        let rig = Rig::new(
            vec![ctrl(&[(512, 4 * MIB), (4096, 4 * MIB)]).write_zeroes(wz)],
            opts(),
        );
        let client = Client::new(&rig.engine, 16).unwrap();
        let a = rig.region(0, 1, 512, MIB);
        let b = rig.region(0, 2, 8192, MIB);
        rig.put(&rig.region(0, 1, 0, 3 * MIB), &vec![0x55; 3 * MIB as usize]);
        rig.put(&rig.region(0, 2, 0, 3 * MIB), &vec![0x55; 3 * MIB as usize]);
        let o = client.zero_blocking(&[a, b], Flags::NONE).unwrap();
        assert!(ok(&o), "{o:?}");
        assert!(rig.get(&a).iter().all(|&x| x == 0) && rig.get(&b).iter().all(|&x| x == 0));
        assert!(
            rig.get(&rig.region(0, 1, 0, 512))
                .iter()
                .all(|&x| x == 0x55),
            "bytes before the region kept"
        );
        assert!(
            rig.get(&rig.region(0, 2, 8192 + MIB, 4096))
                .iter()
                .all(|&x| x == 0x55),
            "bytes after kept"
        );
        assert_eq!(rig.io(0, io::WRITE_ZEROES) > 0, wz);
        assert_eq!(rig.io(0, io::WRITE) > 0, !wz);
    }
}

#[test]
fn write_sequential_writes_each_destination_in_lba_order() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dst = rig.region(0, 2, 0, 2 * MIB);
    let bytes = data(19, src.len);
    rig.put(&src, &bytes);
    rig.sim(0).record_writes(true);
    assert!(ok(&client
        .copy_blocking(&src, &[dst], Flags::WRITE_SEQUENTIAL)
        .unwrap()));
    let lbas: Vec<u64> = rig
        .sim(0)
        .write_log()
        .into_iter()
        .filter(|w| w.0 == 2)
        .map(|w| w.1)
        .collect();
    assert_eq!(lbas.len(), 32);
    assert!(lbas.windows(2).all(|w| w[0] < w[1]), "{lbas:?}");
    assert!(rig.get(&dst) == bytes);
}

#[test]
fn many_concurrent_jobs_from_several_client_threads() {
    let rig = Arc::new(Rig::new(
        vec![ctrl(&[(512, 16 * MIB)]), ctrl(&[(512, 16 * MIB)])],
        opts(),
    ));
    let src = rig.region(0, 1, 0, 16 * MIB);
    rig.put(&src, &data(23, src.len));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let rig = rig.clone();
            std::thread::spawn(move || {
                let client = Client::new(&rig.engine, 64).unwrap();
                let handles: Vec<_> = (0..8u64)
                    .map(|j| {
                        let k = t * 8 + j;
                        let from = rig.region(0, 1, k * 512 * 1024, 512 * 1024);
                        let to = rig.region(1, 1, (31 - k) * 512 * 1024, 512 * 1024);
                        client.copy(&from, &[to], Flags::NONE, |_, _| {}).unwrap()
                    })
                    .collect();
                handles.into_iter().all(|h| ok(&h.wait()))
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap());
    }
    let s = rig.get(&src);
    let d = rig.get(&rig.region(1, 1, 0, 16 * MIB));
    for k in 0..32usize {
        let half = 512 * 1024;
        assert!(
            s[k * half..(k + 1) * half] == d[(31 - k) * half..(32 - k) * half],
            "job {k}"
        );
    }
}

#[test]
fn dropping_a_client_waits_for_its_jobs() {
    let rig = Rig::new(vec![ctrl(&[(512, 8 * MIB), (512, 8 * MIB)])], opts());
    let done = Arc::new(AtomicUsize::new(0));
    {
        let client = Client::new(&rig.engine, 32).unwrap();
        for i in 0..6u64 {
            let d = done.clone();
            let from = rig.region(0, 1, i * MIB, MIB);
            let to = rig.region(0, 2, i * MIB, MIB);
            client
                .copy(&from, &[to], Flags::NONE, move |_, _| {
                    d.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
        }
        assert!(client.outstanding() > 0 || done.load(Ordering::SeqCst) == 6);
    }
    assert_eq!(
        done.load(Ordering::SeqCst),
        6,
        "every callback ran before drop returned"
    );
}

#[test]
fn few_pages_and_few_queues_slow_jobs_down_but_never_fail_them() {
    // One chunk's worth of pages for two reactors and qd 8; the controller grants one queue pair.
    let rig = Rig::new(
        vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)]).io_queues(1)],
        opts(),
    );
    let client = Client::new(&rig.engine, 16).unwrap();
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dst = rig.region(0, 2, 0, 2 * MIB);
    let bytes = data(29, src.len);
    rig.put(&src, &bytes);
    assert!(ok(&client
        .copy_blocking(&src, &[dst], Flags::NONE)
        .unwrap()));
    assert!(rig.get(&dst) == bytes);
    assert_eq!(client.free_pages(), 16);
}

#[test]
fn bad_regions_are_refused_before_any_io() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (4096, 4 * MIB)])], opts());
    let client = Client::new(&rig.engine, 16).unwrap();
    let src = rig.region(0, 1, 0, MIB);
    type Kind = fn(&Refusal) -> bool;
    let cases: Vec<(Vec<Region>, &str, Kind)> = vec![
        (
            vec![rig.region(0, 1, MIB / 2, MIB)],
            "overlaps the source",
            |r| matches!(r, Refusal::OverlapsSource { dest: 0, .. }),
        ),
        (vec![rig.region(0, 1, 0, MIB)], "overlaps the source", |r| {
            matches!(r, Refusal::OverlapsSource { dest: 0, .. })
        }),
        (
            vec![rig.region(0, 2, 0, MIB), rig.region(0, 2, MIB / 2, MIB)],
            "overlap",
            |r| matches!(r, Refusal::DestinationsOverlap { a: 0, b: 1, .. }),
        ),
        (vec![rig.region(0, 2, 0, MIB / 2)], "same length", |r| {
            matches!(
                r,
                Refusal::LengthMismatch {
                    dest: 0,
                    dest_len,
                    job_len,
                    ..
                } if *dest_len == MIB / 2 && *job_len == MIB
            )
        }),
        (
            vec![Region {
                offset: 4 * MIB - 4096,
                ..rig.region(0, 2, 0, MIB)
            }],
            "does not fit",
            |r| matches!(r, Refusal::OutOfRange { capacity, .. } if *capacity == 4 * MIB),
        ),
        (
            vec![Region {
                offset: 512,
                ..rig.region(0, 2, 0, MIB)
            }],
            "4096-byte block size",
            |r| {
                matches!(
                    r,
                    Refusal::Misaligned {
                        offset: 512,
                        block: 4096,
                        ..
                    }
                )
            },
        ),
        (
            (0..65).map(|i| rig.region(0, 2, i * 4096, MIB)).collect(),
            "at most 64",
            |r| matches!(r, Refusal::TooManyDestinations { given: 65, max: 64 }),
        ),
        (vec![], "at least one destination", |r| {
            matches!(r, Refusal::NoDestination)
        }),
    ];
    for (to, why, kind) in cases {
        let err = client
            .copy(&src, &to, Flags::NONE, |_, _| {})
            .err()
            .expect(why);
        match &err {
            Error::Refused(r) => assert!(kind(r), "{why}: refused with {r:?}"),
            e => panic!("{why}: not a refusal: {e:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(why), "expected {why:?} in {msg:?}");
    }
    assert_eq!(
        rig.io(0, io::READ) + rig.io(0, io::WRITE),
        0,
        "no I/O was issued"
    );
}

#[test]
fn one_namespace_through_two_controllers_is_one_media_for_overlaps() {
    // Both controllers expose the same namespace as nsid 1 (same NGUID); nsid 2 is each
    // controller's own.
    let shared = |serial: &str| {
        SimConfig::new()
            .serial(serial)
            .namespace(NamespaceConfig::new(512, 8 * MIB / 512).nguid([0x5a; 16]))
            .namespace(NamespaceConfig::new(512, 8 * MIB / 512))
    };
    let rig = Rig::new(vec![shared("A"), shared("B")], opts());
    let client = Client::new(&rig.engine, 64).unwrap();
    let no_io = |rig: &Rig| {
        (0..2).all(|c| rig.io(c, io::READ) + rig.io(c, io::WRITE) + rig.io(c, io::COPY) == 0)
    };
    let src = rig.region(0, 1, 0, MIB);
    type Kind = fn(&Refusal) -> bool;
    let overlaps_source: Kind = |r| matches!(r, Refusal::OverlapsSource { dest: 0, .. });
    let dests_overlap: Kind = |r| matches!(r, Refusal::DestinationsOverlap { a: 0, b: 1, .. });
    let refused: Vec<(Region, Vec<Region>, Kind)> = vec![
        // Source and destination overlap on the shared media.
        (src, vec![rig.region(1, 1, MIB / 2, MIB)], overlaps_source),
        (src, vec![rig.region(1, 1, 0, MIB)], overlaps_source),
        // Two destinations overlap on it, through different controllers.
        (
            rig.region(0, 2, 0, MIB),
            vec![
                rig.region(0, 1, 4 * MIB, MIB),
                rig.region(1, 1, 4 * MIB + 4096, MIB),
            ],
            dests_overlap,
        ),
    ];
    for (from, to, kind) in refused {
        match client.copy(&from, &to, Flags::NONE, |_, _| {}) {
            Err(Error::Refused(r)) => assert!(kind(&r), "{r:?}"),
            Err(e) => panic!("not a refusal: {e:?}"),
            Ok(_) => panic!("{from:?} -> {to:?} was accepted"),
        }
    }
    let twice = [rig.region(1, 1, 0, MIB), rig.region(0, 1, 0, MIB)];
    match client.zero(&twice, Flags::NONE, |_, _| {}) {
        Err(Error::Refused(r)) => assert!(dests_overlap(&r), "{r:?}"),
        Err(e) => panic!("not a refusal: {e:?}"),
        Ok(_) => panic!("overlapping zero destinations were accepted"),
    }
    assert!(no_io(&rig), "nothing was read or written");

    // Disjoint ranges of the shared namespace, and the same range of the unshared nsid 2
    // on both controllers, are fine.
    let bytes = data(41, MIB);
    rig.put(&src, &bytes);
    let far = rig.region(1, 1, 2 * MIB, MIB);
    assert!(ok(&client
        .copy_blocking(&src, &[far], Flags::NONE)
        .unwrap()));
    assert!(rig.get(&far) == bytes);
    let own = [rig.region(0, 2, 0, MIB), rig.region(1, 2, 0, MIB)];
    assert!(ok(&client
        .copy_blocking(&own[0], &own[1..], Flags::NONE)
        .unwrap()));
}
