//! The copier over NVMe/TCP against the software target (`nvcopy-tcp-sim`), through the
//! `nvcopy` binary: files to `nvme+tcp://` and back, byte for byte; connections dropped at
//! seeded random points and refused for a while (the copy reconnects and ends `ok`); a
//! target that never comes back (the copy fails in bounded time, saying so); a command
//! never answered (reconnected and reissued); more drops than `--max-resets` allows.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nvcopy_tcp_sim::{Faults, Rng, SimConfig, TcpSim};
use nvcopy_testkit::pattern;

const MIB: usize = 1 << 20;
/// The copy's chunk: the target's MDTS (5: 128 KiB) caps it.
const CHUNK: usize = 128 << 10;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvcopy-tcpsim-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Run {
    code: Option<i32>,
    /// The signal that ended it, if one did.
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs nvcopy with `envs`, killing it if it runs past a minute (a hang is a failure,
/// not a test that never ends).
fn nvcopy_env(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nvcopy"))
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).map(|_| v)
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).map(|_| v)
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nvcopy {args:?} still ran after a minute");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let o = std::process::Output {
        status,
        stdout: out.join().unwrap().unwrap(),
        stderr: err.join().unwrap().unwrap(),
    };
    Run {
        code: o.status.code(),
        signal: std::os::unix::process::ExitStatusExt::signal(&o.status),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        took: start.elapsed(),
    }
}

fn nvcopy(args: &[&str]) -> Run {
    nvcopy_env(args, &[])
}

fn ok(args: &[&str]) -> Run {
    let r = nvcopy(args);
    assert_eq!(
        r.code,
        Some(0),
        "nvcopy {args:?} (signal {:?})\nstdout:\n{}\nstderr:\n{}",
        r.signal,
        r.stdout,
        r.stderr
    );
    r
}

fn failed(args: &[&str]) -> Run {
    let r = nvcopy(args);
    assert_eq!(
        r.code,
        Some(1),
        "nvcopy {args:?} (signal {:?})\nstdout:\n{}\nstderr:\n{}",
        r.signal,
        r.stdout,
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r
}

/// The NVMe/TCP device's facts in `--json` output.
fn tcp_facts(stdout: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(stdout).unwrap();
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["facts"]["kind"] == "nvme-tcp")
        .unwrap_or_else(|| panic!("no nvme-tcp device in {stdout}"))["facts"]
        .clone()
}

fn fact(f: &serde_json::Value, key: &str) -> u64 {
    f[key]
        .as_str()
        .unwrap_or_else(|| panic!("no fact {key} in {f}"))
        .parse()
        .unwrap()
}

/// An 8 MiB namespace of 512-byte blocks.
/// A scratch folder `name` holding `src.img`, `len` bytes of pattern `seed`.
fn source(name: &str, seed: u64, len: usize) -> (PathBuf, Vec<u8>, PathBuf) {
    let d = scratch(name);
    let data = pattern(seed, len);
    let src = d.join("src.img");
    std::fs::write(&src, &data).unwrap();
    (d, data, src)
}

fn sim() -> TcpSim {
    TcpSim::start(SimConfig::default()).unwrap()
}

#[test]
fn a_file_to_nvme_tcp_and_back() {
    let d = scratch("roundtrip");
    let sim = sim();
    let (src, back) = (d.join("src.img"), d.join("back.img"));
    // Not a whole number of chunks: the last write is short (and in the capsule).
    let data = pattern(21, 5 * MIB + 4096);
    std::fs::write(&src, &data).unwrap();
    let url = sim.url(1);
    let r = ok(&["copy", "--from", s(&src), "--to", &url, "--json"]);
    let media = sim.media(1);
    assert!(
        media[..data.len()] == data[..],
        "the namespace holds the file"
    );
    assert!(
        media[data.len()..].iter().all(|&b| b == 0),
        "nothing past it"
    );
    let f = tcp_facts(&r.stdout);
    assert_eq!(fact(&f, "reconnects"), 0);
    assert_eq!(f["header_digest"], "true");
    let c = sim.counters();
    let chunks = data.len().div_ceil(CHUNK) as u64;
    assert_eq!(c.writes_r2t + c.writes_in_capsule, chunks);
    assert_eq!(c.writes_in_capsule, 1, "the 4 KiB tail");
    assert_eq!(c.flushes, 1, "ok means flushed");
    assert!(
        c.h2c_pdus >= (chunks - 1) * 4,
        "128 KiB in 32 KiB H2C Data PDUs"
    );
    // And back, without digests this time.
    let from = format!("{url}+{}", data.len());
    let r = nvcopy_env(
        &[
            "copy",
            "--from",
            &from,
            "--to",
            s(&back),
            "--json",
            "--tcp-digests",
            "none",
        ],
        &[],
    );
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert_eq!(tcp_facts(&r.stdout)["data_digest"], "false");
    assert!(std::fs::read(&back).unwrap() == data, "read back");
    assert_eq!(sim.counters().reads, chunks);
    assert_eq!(sim.counters().associations, 2, "one per run");
    assert_eq!(sim.host_errors(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn dropped_connections_are_made_again_and_the_copy_ends_ok() {
    let d = scratch("drops");
    let data = pattern(5, 4 * MIB);
    let chunks = (data.len() / CHUNK) as u64;
    let src = d.join("src.img");
    std::fs::write(&src, &data).unwrap();
    let start = Instant::now();
    let mut took = Vec::new();
    for seed in 1..=5u64 {
        let mut rng = Rng::new(seed);
        let sim = sim();
        let write = seed % 2 == 1;
        // I/O commands the copy sends at least: a command per chunk, and the Flush of a
        // destination.
        let commands = chunks + write as u64;
        // One or two drops at random I/O commands, each followed by ~300 ms of refusal.
        // After a drop at `first`, at least every command not yet received and the
        // dropped one come (again), so a second drop that soon is sure to happen.
        let first = rng.range(1, commands);
        let mut at = vec![first];
        if rng.range(0, 1) == 1 {
            at.push(first + rng.range(1, (commands - first + 1).min(8)));
        }
        let cores = if seed > 3 { "2" } else { "1" };
        sim.set_faults(Faults {
            drop_at: at.clone(),
            refuse_for: Some(Duration::from_millis(300)),
            ..Faults::default()
        });
        // Odd seeds write the namespace, even ones read it (into a file).
        let url = sim.url(1);
        let out = d.join(format!("out-{seed}.img"));
        let from_tcp = format!("{url}+{}", data.len());
        let (from, to) = if write {
            (s(&src), url.as_str())
        } else {
            sim.fill(1, 0, &data);
            (from_tcp.as_str(), s(&out))
        };
        let r = ok(&[
            "copy",
            "--from",
            from,
            "--to",
            to,
            "--json",
            "--io-timeout",
            "5",
            "--max-resets",
            "3",
            "--cores",
            cores,
        ]);
        let why = format!(
            "seed {seed}, drops at {at:?}, {cores} reactor(s), {:?}",
            r.took
        );
        took.push(r.took);
        if write {
            assert!(sim.media(1)[..data.len()] == data[..], "{why}: media");
        } else {
            assert!(std::fs::read(&out).unwrap() == data, "{why}: file");
        }
        let f = tcp_facts(&r.stdout);
        assert!(fact(&f, "reconnects") >= 1, "{why}: {f}");
        assert_eq!(fact(&f, "io_queues").to_string(), cores, "{why}: {f}");
        let c = sim.counters();
        assert_eq!(c.drops, at.len() as u64, "{why}: {c:?}");
        assert!(c.associations >= 2, "{why}: {c:?}");
        assert!(c.connections > 2, "{why}: {c:?}");
        assert_eq!(sim.host_errors(), Vec::<String>::new(), "{why}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}: copies took {took:?}",
        start.elapsed()
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_target_that_never_comes_back_fails_the_copy_in_bounded_time() {
    let (d, data, src) = source("gone", 6, 4 * MIB);
    let sim = sim();
    sim.set_faults(Faults {
        drop_at: vec![5],
        refuse_for: Some(Duration::MAX),
        ..Faults::default()
    });
    let url = sim.url(1);
    let r = failed(&["copy", "--from", s(&src), "--to", &url, "--io-timeout", "2"]);
    assert!(r.took < Duration::from_secs(15), "took {:?}", r.took);
    // The summary (stdout) gives the first error; stderr says the copy did not complete.
    let target = format!("127.0.0.1:{}/{}", sim.port(), sim.nqn());
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains(&target), "names the target: {all}");
    assert!(all.contains("could not be made again"), "says why: {all}");
    assert!(r.stderr.contains("did not complete"), "{}", r.stderr);
    // The source is untouched; of the namespace, only the four writes before the drop
    // landed, each whole, and nothing else.
    assert!(std::fs::read(&src).unwrap() == data);
    let media = sim.media(1);
    let mut landed = 0;
    for (i, c) in media.chunks(CHUNK).enumerate() {
        if c.iter().all(|&b| b == 0) {
            continue;
        }
        landed += 1;
        assert!(c == &data[i * CHUNK..(i + 1) * CHUNK], "chunk {i} is torn");
    }
    assert!(landed <= 4, "{landed} chunks landed");
    assert_eq!(sim.counters().drops, 1);
    assert_eq!(sim.counters().associations, 1, "nothing was accepted again");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_command_never_answered_is_reissued_on_a_new_connection() {
    let (d, data, src) = source("stall", 7, 2 * MIB);
    let sim = sim();
    sim.set_faults(Faults {
        stall: Some(3),
        ..Faults::default()
    });
    let url = sim.url(1);
    let r = ok(&[
        "copy",
        "--from",
        s(&src),
        "--to",
        &url,
        "--json",
        "--io-timeout",
        "1",
    ]);
    assert!(r.took < Duration::from_secs(10), "took {:?}", r.took);
    assert!(sim.media(1)[..data.len()] == data[..], "media");
    let f = tcp_facts(&r.stdout);
    assert!(fact(&f, "reconnects") >= 1, "{f}");
    let c = sim.counters();
    assert_eq!(c.stalled, 1);
    assert!(c.associations >= 2, "{c:?}");
    assert!(
        c.io_commands > (data.len() / CHUNK) as u64 + 1,
        "the stuck write and those after it went again: {c:?}"
    );
    assert_eq!(sim.host_errors(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn more_drops_than_max_resets_allows_fail_the_copy() {
    let (d, data, src) = source("budget", 8, 4 * MIB);
    let sim = sim();
    // A drop every few commands: far more than one reset's worth.
    sim.set_faults(Faults {
        drop_at: (1..40).map(|i| i * 3).collect(),
        refuse_for: Some(Duration::from_millis(50)),
        ..Faults::default()
    });
    let url = sim.url(1);
    let r = failed(&[
        "copy",
        "--from",
        s(&src),
        "--to",
        &url,
        "--io-timeout",
        "5",
        "--max-resets",
        "1",
    ]);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("--max-resets 1"), "{all}");
    assert!(r.stderr.contains("did not complete"), "{}", r.stderr);
    assert!(r.took < Duration::from_secs(15), "took {:?}", r.took);
    let c = sim.counters();
    assert!(c.drops >= 2, "{c:?}");
    assert!(std::fs::read(&src).unwrap() == data);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_malformed_reply_ends_the_connection_and_the_copy_reconnects() {
    use nvcopy_tcp_sim::PduFault;
    let d = scratch("badpeer");
    let data = pattern(9, MIB);
    let faults = [
        PduFault::BadType,
        PduFault::BadLength,
        PduFault::BadHeaderDigest,
        PduFault::BadDataDigest,
        PduFault::UnknownCccid,
        PduFault::Terminate,
    ];
    for (i, fault) in faults.into_iter().enumerate() {
        let sim = sim();
        sim.fill(1, 0, &data);
        sim.set_faults(Faults {
            corrupt: Some((2 + i as u64, fault)),
            ..Faults::default()
        });
        // Reads, so that a data digest fault applies; checked against a hash of each
        // chunk by reading the file back.
        let out = d.join(format!("out-{i}.img"));
        let from = format!("{}+{}", sim.url(1), data.len());
        let r = ok(&["copy", "--from", &from, "--to", s(&out), "--json"]);
        assert!(std::fs::read(&out).unwrap() == data, "{fault:?}: data");
        let f = tcp_facts(&r.stdout);
        assert_eq!(fact(&f, "reconnects"), 1, "{fault:?}: {f}");
        let c = sim.counters();
        assert_eq!((c.corrupted, c.associations), (1, 2), "{fault:?}: {c:?}");
        assert_eq!(sim.host_errors(), Vec::<String>::new(), "{fault:?}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn two_reactors_one_command_stuck_and_the_destination_verified() {
    let (d, data, src) = source("stall2", 10, 4 * MIB);
    let sim = sim();
    sim.set_faults(Faults {
        stall: Some(7),
        ..Faults::default()
    });
    let url = sim.url(1);
    let r = ok(&[
        "copy",
        "--from",
        s(&src),
        "--to",
        &url,
        "--json",
        "--io-timeout",
        "1",
        "--cores",
        "2",
        "--verify",
    ]);
    assert!(sim.media(1)[..data.len()] == data[..], "media");
    let f = tcp_facts(&r.stdout);
    assert!(fact(&f, "reconnects") >= 1, "{f}");
    let c = sim.counters();
    assert_eq!(c.stalled, 1);
    assert!(c.reads >= (data.len() / CHUNK) as u64, "verified: {c:?}");
    assert_eq!(sim.host_errors(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn one_target_to_another_namespace_of_it_and_to_a_second_target_with_drops() {
    use nvcopy_tcp_sim::NsConfig;
    let two = SimConfig {
        namespaces: vec![
            NsConfig {
                block_size: 512,
                blocks: 8192,
            },
            NsConfig {
                block_size: 4096,
                blocks: 1024,
            },
        ],
        ..SimConfig::default()
    };
    let a = TcpSim::start(two).unwrap();
    let b = sim();
    let data = pattern(11, 4 * MIB);
    a.fill(1, 0, &data);
    // The source's target drops twice; the second target never does.
    a.set_faults(Faults {
        drop_at: vec![10, 30],
        refuse_for: Some(Duration::from_millis(200)),
        ..Faults::default()
    });
    let (to_a, to_b) = (a.url(2), b.url(1));
    let r = ok(&[
        "copy",
        "--from",
        &a.url(1),
        "--to",
        &to_a,
        "--to",
        &to_b,
        "--json",
        "--cores",
        "2",
        "--io-timeout",
        "5",
    ]);
    assert!(
        a.media(2) == data,
        "the other namespace of the dropping target"
    );
    assert!(b.media(1)[..data.len()] == data[..], "the second target");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let reconnects: Vec<(String, u64)> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["facts"]["reconnects"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    let of = |t: &TcpSim| {
        reconnects
            .iter()
            .find(|(n, _)| n.contains(&format!(":{}/", t.port())))
            .unwrap()
            .1
    };
    assert!(of(&a) >= 1, "{reconnects:?}");
    assert_eq!(of(&b), 0, "{reconnects:?}");
    assert_eq!(a.counters().drops, 2);
    assert_eq!(b.counters().drops, 0);
    assert_eq!(b.counters().associations, 1);
    assert_eq!(a.host_errors(), Vec::<String>::new());
    assert_eq!(b.host_errors(), Vec::<String>::new());
}

/// A target that accepts connections after the drop but never answers on them (a hung
/// target, or a blackholing firewall): each reconnect attempt is cut to what is left of
/// the window, so the copy still fails about `--io-timeout` after the drop, not after the
/// 10 s a connection step may otherwise take.
#[test]
fn a_target_that_accepts_and_never_answers_fails_the_copy_within_the_timeout() {
    let (d, data, src) = source("silent", 8, 4 * MIB);
    let sim = sim();
    sim.set_faults(Faults {
        drop_at: vec![5],
        silent_after_drop: true,
        ..Faults::default()
    });
    let url = sim.url(1);
    let r = failed(&["copy", "--from", s(&src), "--to", &url, "--io-timeout", "2"]);
    assert!(r.took < Duration::from_secs(7), "took {:?}", r.took);
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(all.contains("could not be made again"), "says why: {all}");
    assert!(
        sim.counters().connections >= 2,
        "the host tried again: {:?}",
        sim.counters()
    );
    assert!(
        std::fs::read(&src).unwrap() == data,
        "the source is untouched"
    );
    let _ = std::fs::remove_dir_all(&d);
}
