//! The `nvcopy` binary on the host, refusing command lines that are wrong whatever the
//! devices are: bad regions, sizes and counts, conflicting options, too many destinations.
//! None of these may get as far as opening a device, so they need no root, no VFIO and no
//! VM (they used to be guest tests in tests/vm_copy.rs, which keeps the refusals that do
//! need a device: regions beyond a namespace, misalignment, overlaps, unbound drives...).
//!
//! Every region names PCI domain ffff, which no machine has: should a refusal ever be
//! lost, nvcopy fails to find the function instead of touching a real one, and
//! [`a_well_formed_job_gets_as_far_as_the_devices`] shows what that failure looks like, so
//! that [`refused`] can tell a refusal from a device error.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DST: &str = "ffff:ff:1f.7";

/// clap's status for a command line it cannot parse.
const USAGE: i32 = 2;
/// nvcopy's status for a job it refuses after parsing.
const REFUSED: i32 = 1;

/// What nvcopy says once it looks for, opens or maps a device; a refusal says none of it.
const DEVICE_WORDS: &[&str] = &[
    "PCI function",
    "nvcopy list",
    "vfio",
    "VFIO",
    "IOMMU",
    "/dev/",
    "/sys/",
    "hugepage",
    "bound to",
    "Permission denied",
];

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the built binary with `args` (killed after 30 s: a refusal is immediate).
fn nvcopy(args: &[&str]) -> Output {
    let dir = std::env::temp_dir();
    let tag = format!("{}-{:?}", std::process::id(), std::thread::current().id());
    let (out, err) = (
        dir.join(format!("cli-refusals-{tag}.out")),
        dir.join(format!("cli-refusals-{tag}.err")),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_nvcopy"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`nvcopy {}` still running after 30 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let o = Output {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    };
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(err);
    o
}

/// `args` must exit with `code` and a stderr holding every phrase of `phrases`, saying
/// nothing about devices and printing no progress or summary.
fn refused(args: &[&str], code: i32, phrases: &[&str]) {
    let o = nvcopy(args);
    let shown = format!(
        "`nvcopy {}` -> {:?}\n--- stdout:\n{}--- stderr:\n{}---",
        args.join(" "),
        o.code,
        o.stdout,
        o.stderr
    );
    assert_eq!(o.code, Some(code), "exit status: {shown}");
    assert!(!o.stderr.contains("panicked"), "a panic: {shown}");
    for p in phrases {
        assert!(o.stderr.contains(p), "stderr lacks {p:?}: {shown}");
    }
    for w in DEVICE_WORDS {
        assert!(
            !o.stderr.contains(w),
            "stderr mentions {w:?}: the refusal came after a device was looked at: {shown}"
        );
    }
    assert!(
        !o.stdout.contains("copied") && !o.stdout.contains("zeroed"),
        "a summary: {shown}"
    );
}

/// `copy --from ffff:ff:1f.6+1M --to DST` and `more`.
fn copy_with<'a>(more: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["copy", "--from", "ffff:ff:1f.6+1M", "--to", DST];
    v.extend_from_slice(more);
    v
}

#[test]
fn a_well_formed_job_gets_as_far_as_the_devices() {
    // The control for every test below: with nothing wrong on the command line, nvcopy
    // goes looking for the functions and fails in words that DEVICE_WORDS catches.
    for args in [copy_with(&[]), vec!["zero", "--to", "ffff:ff:1f.7+1M"]] {
        let o = nvcopy(&args);
        assert_eq!(o.code, Some(REFUSED), "{args:?}: {}", o.stderr);
        assert!(
            DEVICE_WORDS.iter().any(|w| o.stderr.contains(w)),
            "{args:?}: the device error is not recognised: {}",
            o.stderr
        );
    }
}

#[test]
fn unparsable_regions_are_refused() {
    let cases: [(&str, &[&str]); 5] = [
        // A size suffix nvcopy does not know, in an offset and in a length.
        ("ffff:ff:1f.6@1Q", &["invalid size", "1Q"]),
        ("ffff:ff:1f.6+1X", &["invalid size", "1X"]),
        ("ffff:ff:1f.6/0+1M", &["namespace", "\"0\""]),
        ("ffff:ff:1f.6+0", &["zero length"]),
        ("ff:1f.9+1M", &["PCI address", "ff:1f.9"]),
    ];
    for (region, phrases) in cases {
        let mut p = vec!["--from", region];
        p.extend_from_slice(phrases);
        refused(&["copy", "--from", region, "--to", DST], USAGE, &p);
        // The same region as a destination.
        refused(
            &["copy", "--from", "ffff:ff:1f.6+4K", "--to", region],
            USAGE,
            &[&["--to"], phrases].concat(),
        );
    }
    refused(
        &["zero", "--to", "ffff:ff:1f.7@4Z"],
        USAGE,
        &["invalid size"],
    );
}

#[test]
fn paths_that_cannot_be_used_are_refused_before_any_device() {
    let dir = std::env::temp_dir().join(format!("nvcopy-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display().to_string();
    let missing = format!("{d}/no-such-source.img");
    let orphan = format!("{d}/no-such-dir/out.img");
    // Anything that is not a PCI address is a path; one that is not there is named.
    refused(
        &["copy", "--from", &missing, "--to", DST],
        REFUSED,
        &["no-such-source.img", "no such file", "PCI address"],
    );
    refused(
        &["copy", "--from", "nonsense", "--to", DST],
        REFUSED,
        &["nonsense", "no such file"],
    );
    // A directory, as source or destination.
    refused(
        &["copy", "--from", &d, "--to", DST],
        REFUSED,
        &["is a directory", "name a file in it"],
    );
    refused(
        &["copy", "--from", DST, "--to", &d],
        REFUSED,
        &["is a directory"],
    );
    // A destination in a directory that does not exist.
    refused(
        &["copy", "--from", DST, "--to", &orphan],
        REFUSED,
        &["no-such-dir", "no such file"],
    );
    assert!(!std::path::Path::new(&orphan).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_sizes_and_counts_are_refused() {
    let cases: [(&[&str], &[&str]); 10] = [
        (&["--chunk", "100"], &["--chunk", "multiple of 4K"]),
        (&["--chunk", "4M"], &["--chunk", "multiple of 4K"]),
        (&["--chunk", "1Q"], &["--chunk", "invalid size"]),
        (&["--qd", "0"], &["--qd", "1..=1024"]),
        (&["--qd", "2000"], &["--qd", "1..=1024"]),
        (&["--cores", "0"], &["--cores", "1..=256"]),
        (&["--cores", "100000"], &["--cores", "1..=256"]),
        (&["--cores", "x"], &["--cores", "invalid digit"]),
        (&["--num-pages=-1"], &["--num-pages", "invalid digit"]),
        (&["--num-pages", "x"], &["--num-pages", "invalid digit"]),
    ];
    for (more, phrases) in cases {
        let args = copy_with(more);
        refused(&args, USAGE, phrases);
        // Refused for its value, not as an option nvcopy does not know.
        assert!(!nvcopy(&args).stderr.contains("unexpected argument"));
    }
    // Parses, but more pages than a client can index.
    refused(
        &copy_with(&["--num-pages", "99999999999"]),
        REFUSED,
        &["--num-pages 99999999999", "too many"],
    );
    refused(
        &["zero", "--to", "ffff:ff:1f.7+1M", "--qd", "0"],
        USAGE,
        &["--qd"],
    );
}

#[test]
fn more_than_64_destinations_are_refused() {
    let regions: Vec<String> = (0..65).map(|i| format!("{DST}@{}K+4K", i * 4)).collect();
    let mut copy = vec!["copy", "--from", "ffff:ff:1f.6+4K"];
    let mut zero = vec!["zero"];
    for r in &regions {
        copy.extend(["--to", r.as_str()]);
        zero.extend(["--to", r.as_str()]);
    }
    for args in [&copy, &zero] {
        refused(args, REFUSED, &["65 destinations", "at most 64"]);
    }
    // 64 are fine: the job goes on to look for the devices.
    copy.truncate(copy.len() - 2);
    let o = nvcopy(&copy);
    assert!(
        DEVICE_WORDS.iter().any(|w| o.stderr.contains(w)),
        "64 destinations: {}",
        o.stderr
    );
}

#[test]
fn conflicting_options_are_refused() {
    let map = std::env::temp_dir().join(format!("cli-refusals-{}.map", std::process::id()));
    let map_s = map.to_str().unwrap();
    let _ = std::fs::remove_file(&map);
    let verify_only = ["--verify-only", "copies nothing", "--map"];
    refused(
        &copy_with(&["--verify-only", "--map", map_s]),
        REFUSED,
        &verify_only,
    );
    assert!(!map.exists(), "the refused job created its map file");
    refused(
        &copy_with(&["--verify-only", "--verify"]),
        REFUSED,
        &verify_only,
    );
    refused(
        &copy_with(&["--hash", "md5"]),
        USAGE,
        &["--hash", "md5", "sha256"],
    );
    // --retry-failed is about a map.
    refused(&copy_with(&["--retry-failed"]), USAGE, &["--map"]);
    // Checks of a source, with no source.
    for more in [&["--verify"][..], &["--verify-only"], &["--hash", "sha256"]] {
        let mut args = vec!["zero", "--to", "ffff:ff:1f.7+1M"];
        args.extend_from_slice(more);
        refused(&args, REFUSED, &["need a source", "nvcopy copy"]);
    }
}

#[test]
fn missing_and_unknown_arguments_are_refused() {
    refused(&["copy", "--from", "ffff:ff:1f.6+1M"], USAGE, &["--to"]);
    refused(&["copy", "--to", DST], USAGE, &["--from"]);
    refused(&["zero"], USAGE, &["--to"]);
    refused(
        &copy_with(&["--bogus"]),
        USAGE,
        &["unexpected argument", "--bogus"],
    );
    refused(&["identify"], USAGE, &["<DEVICE>"]);
    refused(&["identify", "ff:zz.0"], USAGE, &["PCI address"]);
    refused(
        &["identify", "golden.img"],
        USAGE,
        &[
            "neither a PCI address",
            "nvme+tcp://HOST[:PORT]/SUBSYSTEM-NQN",
        ],
    );
    refused(
        &["identify", "nvme+tcp://127.0.0.1:4420/nqn.x/2"],
        USAGE,
        &["drop the /2"],
    );
    refused(
        &["list", "--discover", "127.0.0.1:http"],
        USAGE,
        &["127.0.0.1:http", "1 to 65535"],
    );
}

#[test]
fn discovery_where_nothing_listens_fails_naming_the_address() {
    // A port that was free a moment ago: the connection is refused at once.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let o = nvcopy(&["list", "--discover", &addr]);
    assert_eq!(o.code, Some(REFUSED), "{}", o.stderr);
    assert!(
        o.stderr.contains(&addr) && o.stderr.contains("cannot connect"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.is_empty(), "{}", o.stdout);
}
