//! The copier's recovery paths against the software NVMe controller on its own device
//! thread ([`ThreadedSim`]): read errors under WRITE_SEQUENTIAL, a device that stops
//! answering while queues are full, timeouts that recover and ones that exhaust the reset
//! budget, a fatal controller, the final Flush, late DMA after a reset, and a seeded
//! randomized mix of faults. Every test bounds the job's finish time.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::sync::atomic::{AtomicBool, Ordering};

use common::{ctrl, data, ok, opts, Rig, MIB};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy::{Client, DestMask, EngineOptions, Flags, JobHandle, JobOutcome, Region};
use nvcopy_nvme::spec::io;
use nvcopy_nvme::Status;
use nvcopy_nvme_sim::{CommandFilter, MediaError};

const KIB: u64 = 1 << 10;
/// How long any job here may take; far more than any of them needs.
const BOUND: Duration = Duration::from_secs(20);

fn finish(h: &JobHandle) -> JobOutcome {
    h.wait_timeout(BOUND)
        .unwrap_or_else(|| panic!("the job did not finish within {BOUND:?}"))
}

/// Checks that every `chunk`-sized piece of `got` is either exactly `want` (copied) or
/// exactly `fill` (never written), and returns how many bytes were copied.
fn chunks_whole(got: &[u8], want: &[u8], fill: u8, chunk: usize) -> u64 {
    assert_eq!(got.len(), want.len());
    let mut copied = 0;
    for (i, (g, w)) in got.chunks(chunk).zip(want.chunks(chunk)).enumerate() {
        if g == w {
            copied += g.len() as u64;
        } else {
            assert!(
                g.iter().all(|&b| b == fill),
                "chunk {i} is neither the source nor untouched"
            );
        }
    }
    copied
}

#[test]
fn write_sequential_with_a_read_error_finishes_in_lba_order() {
    let mut o = opts();
    o.reactors = 1;
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], o);
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dst = rig.region(0, 2, 0, 2 * MIB);
    let bytes = data(101, src.len);
    rig.put(&src, &bytes);
    rig.put(&dst, &vec![0xaa; dst.len as usize]);
    // Chunk 16 of 32 (64 KiB chunks of 512-byte blocks).
    rig.sim(0)
        .faults()
        .media_error(MediaError::read(1, 2048..2056).dnr(true));
    rig.sim(0).record_writes(true);
    let h = client
        .copy(
            &src,
            &[dst],
            Flags::IGNORE_ERRORS | Flags::WRITE_SEQUENTIAL,
            |_, _| {},
        )
        .unwrap();
    let out = finish(&h);
    assert!(out.read_err, "{out:?}");
    assert_eq!(out.write_err, DestMask(0), "{out:?}");
    assert_eq!(out.failed_chunks, 1, "{out:?}");
    assert_eq!(out.bytes_ok, src.len - 64 * KIB);
    let got = rig.get(&dst);
    let bad = MIB as usize..(MIB + 64 * KIB) as usize;
    assert!(
        got[..bad.start] == bytes[..bad.start],
        "chunks before the bad one"
    );
    assert!(
        got[bad.end..] == bytes[bad.end..],
        "chunks after the bad one"
    );
    assert!(
        got[bad].iter().all(|&b| b == 0xaa),
        "the bad chunk is not written"
    );
    let lbas: Vec<u64> = rig
        .sim(0)
        .write_log()
        .into_iter()
        .filter(|w| w.0 == 2)
        .map(|w| w.1)
        .collect();
    assert_eq!(lbas.len(), 31, "{lbas:?}");
    assert!(lbas.windows(2).all(|w| w[0] < w[1]), "{lbas:?}");
}

#[test]
fn a_full_queue_on_a_device_that_stops_answering_still_times_out() {
    let mut o = opts();
    o.queue_entries = 4;
    o.qd = 64;
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB); 4])], o);
    let client = Client::new(&rig.engine, 2048).unwrap();
    rig.guard_pages(&client);
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dests = [
        rig.region(0, 2, 0, 2 * MIB),
        rig.region(0, 3, 0, 2 * MIB),
        rig.region(0, 4, 0, 2 * MIB),
    ];
    rig.put(&src, &data(102, src.len));
    rig.sim(0).faults().pause_io();
    let start = Instant::now();
    let h = client.copy(&src, &dests, Flags::NONE, |_, _| {}).unwrap();
    let out = finish(&h);
    let took = start.elapsed();
    assert!(out.read_err, "nothing could be read: {out:?}");
    // The final Flushes go to the same controller, past its reset budget: they fail.
    assert_eq!(out.write_err, DestMask(0b111), "{out:?}");
    assert_eq!(out.bytes_ok, 0, "{out:?}");
    let max = EngineOptions::default().max_resets as u64;
    assert_eq!(out.resets, vec![(0, max + 1)], "{out:?}");
    assert!(out.first_error.is_some(), "{out:?}");
    assert!(
        took >= Duration::from_millis(300) * (max as u32 + 1),
        "every reset waited for a timeout: {took:?}"
    );
    rig.no_violations();
}

/// The rig of the full-queue tests: queues of 4 entries, 64 chunks in flight per
/// reactor, three destinations on the source's controller.
fn full_queue_rig() -> (Rig, Region, [Region; 3], Vec<u8>) {
    let mut o = opts();
    o.queue_entries = 4;
    o.qd = 64;
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB); 4])], o);
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dests = [
        rig.region(0, 2, 0, 2 * MIB),
        rig.region(0, 3, 0, 2 * MIB),
        rig.region(0, 4, 0, 2 * MIB),
    ];
    let bytes = data(111, src.len);
    rig.put(&src, &bytes);
    (rig, src, dests, bytes)
}

#[test]
fn a_job_that_fails_on_a_stopped_device_says_why() {
    let (rig, src, dests, _) = full_queue_rig();
    let client = Client::new(&rig.engine, 2048).unwrap();
    rig.guard_pages(&client);
    rig.sim(0).faults().pause_io();
    let out = finish(&client.copy(&src, &dests, Flags::NONE, |_, _| {}).unwrap());
    assert!(out.read_err, "{out:?}");
    let err = out.first_error.as_deref().unwrap();
    assert!(err.contains("did not complete"), "{out:?}");
}

#[test]
fn a_pause_longer_than_the_timeout_is_recovered_by_one_reset() {
    let (rig, src, dests, bytes) = full_queue_rig();
    let client = Client::new(&rig.engine, 2048).unwrap();
    rig.guard_pages(&client);
    rig.sim(0).faults().pause_io();
    let h = client.copy(&src, &dests, Flags::NONE, |_, _| {}).unwrap();
    // The first timeout (300 ms after the doorbell) resets the controller; the pause,
    // which a reset does not end, ends before the reissued commands time out.
    std::thread::sleep(Duration::from_millis(450));
    rig.sim(0).faults().resume_io();
    let out = finish(&h);
    assert!(ok(&out), "{out:?}");
    assert_eq!(out.resets, vec![(0, 1)], "{out:?}");
    for d in &dests {
        assert!(rig.get(d) == bytes, "nsid {}", d.nsid);
    }
}

#[test]
fn one_swallowed_read_is_recovered_by_one_reset() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    let src = rig.region(0, 1, 0, MIB);
    let dst = rig.region(0, 2, 0, MIB);
    let bytes = data(103, src.len);
    rig.put(&src, &bytes);
    rig.sim(0).faults().swallow(
        CommandFilter::io()
            .opcode(io::READ)
            .lbas(1024..1025)
            .times(1),
    );
    let out = finish(&client.copy(&src, &[dst], Flags::NONE, |_, _| {}).unwrap());
    assert!(ok(&out), "{out:?}");
    assert_eq!(out.bytes_ok, src.len);
    assert_eq!(out.resets, vec![(0, 1)], "{out:?}");
    assert!(rig.get(&dst) == bytes);
    assert_eq!(rig.sim(0).counters().swallowed(), 1);

    // The engine goes on working after the reset, and the next job owes it nothing.
    let src2 = rig.region(0, 1, 2 * MIB, MIB);
    let dst2 = rig.region(0, 2, 2 * MIB, MIB);
    let bytes2 = data(104, src2.len);
    rig.put(&src2, &bytes2);
    let again = finish(&client.copy(&src2, &[dst2], Flags::NONE, |_, _| {}).unwrap());
    assert!(ok(&again) && again.resets.is_empty(), "{again:?}");
    assert!(rig.get(&dst2) == bytes2);
    rig.no_violations();
}

#[test]
fn a_read_that_never_completes_exhausts_the_reset_budget() {
    // Source and destination on different controllers: only the source's budget runs out.
    let mut o = opts();
    o.max_resets = 2;
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB)]), ctrl(&[(512, 4 * MIB)])], o);
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    let src = rig.region(0, 1, 0, MIB);
    let dst = rig.region(1, 1, 0, MIB);
    let bytes = data(105, src.len);
    rig.put(&src, &bytes);
    rig.put(&dst, &vec![0xaa; dst.len as usize]);
    rig.sim(0)
        .faults()
        .swallow(CommandFilter::io().opcode(io::READ).lbas(512..513));
    let out = finish(
        &client
            .copy(&src, &[dst], Flags::IGNORE_ERRORS, |_, _| {})
            .unwrap(),
    );
    assert!(out.read_err, "{out:?}");
    assert_eq!(out.write_err, DestMask(0), "{out:?}");
    // Resets 1 and 2 are within the budget and reissue; the third is more than
    // --max-resets 2 and fails the controller's commands of the job (reactor::recover,
    // `used <= max`).
    assert_eq!(out.resets, vec![(0, 3)], "{out:?}");
    let err = out.first_error.as_deref().unwrap();
    assert!(err.contains("--max-resets 2"), "{err}");
    assert!(err.contains("did not complete"), "{err}");
    let got = rig.get(&dst);
    let copied = chunks_whole(&got, &bytes, 0xaa, 64 * KIB as usize);
    assert_eq!(copied, out.bytes_ok, "{out:?}");
    assert!(
        got[256 * 1024..320 * 1024].iter().all(|&b| b == 0xaa),
        "the swallowed chunk was never written"
    );
    assert!(out.failed_chunks >= 1, "{out:?}");
    rig.no_violations();
}

#[test]
fn a_controller_fatal_status_during_a_copy_fails_its_commands() {
    // The sim's reset does not clear an injected CFS: `enable` returns without becoming
    // ready while `faults.fatal` is set, so the reset fails and the controller's commands
    // fail; a recovery from CFS cannot be tested with it.
    let rig = Rig::new(
        vec![ctrl(&[(512, 4 * MIB)]), ctrl(&[(512, 4 * MIB)])],
        opts(),
    );
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dst = rig.region(1, 1, 0, 2 * MIB);
    let bytes = data(106, src.len);
    rig.put(&src, &bytes);
    rig.put(&dst, &vec![0xaa; dst.len as usize]);
    // Keep the copy in flight until the fatal status is raised.
    rig.sim(0).faults().delay(
        CommandFilter::io().opcode(io::READ).lbas(2048..2049),
        Duration::from_millis(250),
    );
    let h = client.copy(&src, &[dst], Flags::NONE, |_, _| {}).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    rig.sim(0).faults().set_fatal(true);
    let out = finish(&h);
    assert!(out.read_err, "{out:?}");
    assert_eq!(out.write_err, DestMask(0), "{out:?}");
    let err = out.first_error.as_deref().unwrap();
    assert!(err.contains("fatal"), "{err}");
    assert_eq!(out.resets, vec![(0, 1)], "{out:?}");
    let copied = chunks_whole(&rig.get(&dst), &bytes, 0xaa, 64 * KIB as usize);
    assert_eq!(copied, out.bytes_ok, "{out:?}");
    assert!(copied < src.len);
    rig.no_violations();
}

/// Source on controller 0 nsid 1; destinations on controller 0 nsid 2 and controller 1
/// nsid 1.
fn two_controller_rig(io_timeout: Duration) -> (Rig, Region, [Region; 2], Vec<u8>) {
    let rig = Rig::with_timeout(
        vec![
            ctrl(&[(512, 4 * MIB), (512, 4 * MIB)]),
            ctrl(&[(512, 4 * MIB)]),
        ],
        opts(),
        io_timeout,
    );
    let src = rig.region(0, 1, 0, MIB);
    let dests = [rig.region(0, 2, 0, MIB), rig.region(1, 1, 0, MIB)];
    let bytes = data(107, src.len);
    rig.put(&src, &bytes);
    (rig, src, dests, bytes)
}

#[test]
fn one_flush_per_destination_after_its_last_write_and_before_the_callback() {
    let (rig, src, dests, bytes) = two_controller_rig(Duration::from_secs(2));
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    for c in 0..2 {
        rig.sim(c).faults().delay(
            CommandFilter::io().opcode(io::FLUSH),
            Duration::from_millis(300),
        );
    }
    let called = Arc::new(AtomicBool::new(false));
    let seen = called.clone();
    let start = Instant::now();
    let h = client
        .copy(&src, &dests, Flags::NONE, move |r, w| {
            assert!(!r && !w.any());
            seen.store(true, Ordering::SeqCst);
        })
        .unwrap();
    // Wait until both Flushes are held by the controllers.
    while (rig.sim(0).held_commands() == 0 || rig.sim(1).held_commands() == 0)
        && start.elapsed() < BOUND
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rig.sim(0).held_commands(), 1);
    assert_eq!(rig.sim(1).held_commands(), 1);
    // Every write ran before the Flush was fetched.
    assert_eq!(rig.io(0, io::WRITE), 16);
    assert_eq!(rig.io(1, io::WRITE), 16);
    assert!(rig.get(&dests[0]) == bytes && rig.get(&dests[1]) == bytes);
    assert!(!h.is_finished(), "finished before its Flushes completed");
    assert!(
        !called.load(Ordering::SeqCst),
        "called back before its Flushes completed"
    );
    let out = finish(&h);
    assert!(ok(&out) && out.resets.is_empty(), "{out:?}");
    assert!(called.load(Ordering::SeqCst));
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(rig.io(0, io::FLUSH), 1);
    assert_eq!(rig.io(1, io::FLUSH), 1);
    assert_eq!(
        rig.io(0, io::WRITE) + rig.io(1, io::WRITE),
        32,
        "no extra writes"
    );
    rig.no_violations();
}

#[test]
fn a_failed_flush_marks_only_its_destination() {
    let (rig, src, dests, bytes) = two_controller_rig(Duration::from_millis(300));
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    rig.sim(1).faults().fail(
        CommandFilter::io().opcode(io::FLUSH),
        Status::new(0, 0x06).with_dnr(true),
    );
    let out = finish(&client.copy(&src, &dests, Flags::NONE, |_, _| {}).unwrap());
    assert!(!out.read_err, "{out:?}");
    assert_eq!(out.write_err, DestMask(0b10), "{out:?}");
    assert!(out.first_error.is_some(), "{out:?}");
    assert!(rig.get(&dests[0]) == bytes, "the healthy destination");
    assert_eq!(rig.io(0, io::FLUSH), 1);
    assert_eq!(rig.io(1, io::FLUSH), 1, "DNR: not retried");
    assert!(out.resets.is_empty(), "{out:?}");
}

#[test]
fn an_idle_gap_longer_than_the_timeout_is_not_a_timeout() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    for round in 0..2u64 {
        if round == 1 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let src = rig.region(0, 1, round * MIB, MIB);
        let dst = rig.region(0, 2, round * MIB, MIB);
        let bytes = data(108 + round, src.len);
        rig.put(&src, &bytes);
        let out = finish(&client.copy(&src, &[dst], Flags::NONE, |_, _| {}).unwrap());
        assert!(ok(&out) && out.resets.is_empty(), "round {round}: {out:?}");
        assert!(rig.get(&dst) == bytes, "round {round}");
    }
}

#[test]
fn a_late_read_after_a_reset_does_not_land_in_reused_pages() {
    // The copier's page ownership (PageReserve) is crate-private: no page guard backed by
    // it can be built from the public API. Instead few pages (two chunks' worth) make the
    // pages of the late read certain to be reused, so late DMA into them would corrupt
    // the destination.
    let mut o = opts();
    o.reactors = 1;
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB), (512, 4 * MIB)])], o);
    let client = Client::new(&rig.engine, 32).unwrap();
    rig.guard_pages(&client);
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dst = rig.region(0, 2, 0, 2 * MIB);
    let bytes = data(110, src.len);
    rig.put(&src, &bytes);
    rig.sim(0).faults().late(
        CommandFilter::io()
            .opcode(io::READ)
            .lbas(1024..1025)
            .times(1),
        Duration::from_millis(700),
    );
    let out = finish(&client.copy(&src, &[dst], Flags::NONE, |_, _| {}).unwrap());
    assert!(ok(&out), "{out:?}");
    assert_eq!(out.resets, vec![(0, 1)], "{out:?}");
    // Past the late command's due time: had it survived the reset it would have run now.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(rig.sim(0).held_commands(), 0);
    assert!(rig.sim(0).counters().dropped() >= 1, "the reset dropped it");
    assert!(rig.get(&dst) == bytes);
    rig.no_violations();
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// One randomized schedule from `seed`; every assertion message names the seed.
fn schedule(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let chunk = 4096usize << rng.below(6); // 4 KiB .. 128 KiB
    let mut o = opts();
    o.chunk = chunk;
    o.reactors = 1 + rng.below(2) as usize;
    let rig = Rig::new(
        vec![ctrl(&[(512, 2 * MIB); 3]), ctrl(&[(512, 2 * MIB); 2])],
        o,
    );
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    let len = (64 + rng.below(192)) * 4096; // 256 KiB .. 1 MiB
    let src = rig.region(0, 1, 0, len);
    let bytes = data(seed, len);
    rig.put(&src, &bytes);
    // Candidate destinations: (ctrl, nsid).
    let mut cands = vec![(0usize, 2u32), (0, 3), (1, 1), (1, 2)];
    let n = 1 + rng.below(3) as usize;
    let mut dests = Vec::new();
    for _ in 0..n {
        let (c, ns) = cands.remove(rng.below(cands.len() as u64) as usize);
        let off = rng.below(4) * 4096;
        dests.push(rig.region(c, ns, off, len));
    }
    for d in &dests {
        rig.put(d, &vec![0xaa; len as usize]);
    }
    let blocks = len / 512;
    let mut log = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let lba = rng.below(blocks);
        let lbas = lba..lba + 1 + rng.below(16);
        let dnr = rng.coin();
        let times = [None, Some(1), Some(2)][rng.below(3) as usize];
        let d = dests[rng.below(dests.len() as u64) as usize];
        let dlbas = d.offset / 512 + lbas.start..d.offset / 512 + lbas.end;
        match rng.below(7) {
            0 => {
                let mut e = MediaError::read(1, lbas.clone()).dnr(dnr);
                if let Some(t) = times {
                    e = e.times(t);
                }
                rig.sim(0).faults().media_error(e);
                log.push(format!("media read {lbas:?} dnr {dnr} times {times:?}"));
            }
            1 => {
                let mut e = MediaError::write(d.nsid, dlbas.clone()).dnr(dnr);
                if let Some(t) = times {
                    e = e.times(t);
                }
                rig.sim(d.ctrl).faults().media_error(e);
                log.push(format!(
                    "media write ctrl {} ns {} {dlbas:?} dnr {dnr} times {times:?}",
                    d.ctrl, d.nsid
                ));
            }
            2 => {
                rig.sim(0).faults().swallow(
                    CommandFilter::io()
                        .opcode(io::READ)
                        .nsid(1)
                        .lbas(lbas.clone())
                        .times(1),
                );
                log.push(format!("swallow read {lbas:?}"));
            }
            3 => {
                rig.sim(d.ctrl).faults().swallow(
                    CommandFilter::io()
                        .opcode(io::WRITE)
                        .nsid(d.nsid)
                        .lbas(dlbas.clone())
                        .times(1),
                );
                log.push(format!(
                    "swallow write ctrl {} ns {} {dlbas:?}",
                    d.ctrl, d.nsid
                ));
            }
            4 => {
                rig.sim(0).faults().late(
                    CommandFilter::io()
                        .opcode(io::READ)
                        .nsid(1)
                        .lbas(lbas.clone())
                        .times(1),
                    Duration::from_millis(500),
                );
                log.push(format!("late read {lbas:?}"));
            }
            5 => {
                let c = rng.below(2) as usize;
                rig.sim(c).faults().delay(
                    CommandFilter::io().times(1 + rng.below(4) as u32),
                    Duration::from_millis(30),
                );
                log.push(format!("delay io ctrl {c}"));
            }
            _ => {
                rig.sim(d.ctrl).faults().fail(
                    CommandFilter::io().opcode(io::FLUSH).nsid(d.nsid),
                    Status::new(0, 0x06).with_dnr(true),
                );
                log.push(format!("fail flush ctrl {} ns {}", d.ctrl, d.nsid));
            }
        }
    }
    let flags = if rng.coin() {
        Flags::IGNORE_ERRORS | Flags::WRITE_SEQUENTIAL
    } else {
        Flags::IGNORE_ERRORS
    };
    let what = format!(
        "seed {seed}: chunk {chunk}, len {len}, dests {:?}, sequential {}, faults {log:?}",
        dests.iter().map(|d| (d.ctrl, d.nsid)).collect::<Vec<_>>(),
        flags.contains(Flags::WRITE_SEQUENTIAL)
    );
    let h = client.copy(&src, &dests, flags, |_, _| {}).unwrap();
    let out = h
        .wait_timeout(BOUND)
        .unwrap_or_else(|| panic!("{what}: did not finish within {BOUND:?}"));
    for (i, d) in dests.iter().enumerate() {
        if !out.read_err && !out.write_err.contains(i) {
            assert!(
                rig.get(d) == bytes,
                "{what}: destination {i} differs; {out:?}"
            );
        }
    }
    if ok(&out) {
        assert_eq!(out.bytes_ok, len, "{what}: {out:?}");
    }
    for (c, dev) in rig.devs.iter().enumerate() {
        let v = dev.sim().page_violations();
        assert!(v.is_empty(), "{what}: sim{c}: {v:?}");
    }
}

#[test]
fn randomized_fault_schedules_keep_the_invariants() {
    let base: u64 = std::env::var("NVCOPY_RECOVERY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    // Hundreds of schedules by default (about 45 s here); NVCOPY_RECOVERY_SCHEDULES to
    // run more or fewer.
    let count: u64 = std::env::var("NVCOPY_RECOVERY_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let start = Instant::now();
    for i in 0..count {
        let seed = base + i;
        eprintln!("schedule seed {seed}");
        schedule(seed);
    }
    eprintln!("{count} schedules in {:?}", start.elapsed());
}

#[test]
fn pages_of_a_controller_that_cannot_be_proven_quiet_are_never_reused() {
    let cfg = ctrl(&[(512, 4 * MIB), (512, 4 * MIB)]).cap_timeout(1);
    let rig = Rig::with_timeout(vec![cfg], opts(), Duration::from_millis(300));
    let client = Client::new(&rig.engine, 256).unwrap();
    rig.guard_pages(&client);
    let src = rig.region(0, 1, 0, MIB);
    let dst = rig.region(0, 2, 0, MIB);
    rig.put(&src, &data(77, MIB));
    // The read of the first chunk answers only after the host gave up on it, and the
    // controller can neither be disabled nor have its bus mastering turned off.
    let faults = rig.sim(0).faults();
    faults.late(
        CommandFilter::io().opcode(io::READ).lbas(0..1).times(1),
        Duration::from_millis(1200),
    );
    faults.stuck_ready(true);
    faults.quiesce_fails(true);
    let free_before = client.free_pages();
    let h = client
        .copy(&src, &[dst], Flags::IGNORE_ERRORS, |_, _| {})
        .unwrap();
    let o = h.wait_timeout(BOUND).unwrap();
    assert!(o.read_err, "{o:?}");
    let err = o.first_error.clone().unwrap();
    assert!(err.contains("quarantined"), "{err}");
    // Let the late read land: it must hit only pages nobody was given since.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rig.sim(0).held_commands(), 0, "the late read ran");
    rig.no_violations();
    assert!(
        client.free_pages() < free_before,
        "the pages of the command that never completed went back to the pool"
    );
}
