//! End-to-end tests of the copier: the real `nvcopy` binary copying and zeroing between
//! emulated NVMe drives in a QEMU guest, checked byte for byte on the host afterwards.
//!
//! `scripts/test.sh` prepares the images with `scripts/vm-copy-suite.sh prepare DIR`, then
//! `scripts/vm-copy-suite.sh run DIR` boots one guest with the suite's layout (every drive
//! file-backed, the emulated VT-d IOMMU on) and runs
//! `/tests/nvcopy-vm_copy --ignored guest_ --test-threads=1` in it. The layout (which
//! controller gets which image, its size, block size and MDTS) lives in that script only;
//! [`DRIVES`] mirrors it, the plain test `layout_matches_the_suite_script` checks the two
//! agree, and `guest_layout_matches_the_table` checks the booted controllers against
//! [`DRIVES`]. In short: 0000:00:10.0 holds 512 MiB of random data, the source of every
//! copy; 11.0, 12.0, 13.0 and 17.0 are whole-drive destinations; 14.0 is the sentinel that
//! every bad-input case aims at and nothing writes; 15.0 and 16.0 take the region copies
//! and zeroes; 18.0 is zeroed whole.
//!
//! After the guest exits, `cargo test --test vm_copy -- --ignored host_` with
//! NVCOPY_COPY_IMAGES=DIR compares the whole-drive destinations with source.img, and the
//! 64 MiB drives with their pristine copies (NAME.orig) patched with exactly the writes in
//! [`ops`]: a byte that changed anywhere else is a stray write, and every bad-input case must
//! leave sentinel.img as it was (nvcopy refuses bad input before any I/O). The bad-input
//! cases that need no device at all are host tests of the binary, in tests/cli_refusals.rs.
//!
//! By hand, from the repository root (as root):
//!
//! ```sh
//! scripts/vm-copy-suite.sh prepare vm-work/copy-images
//! scripts/vm-copy-suite.sh run vm-work/copy-images --timeout 1200
//! NVCOPY_COPY_IMAGES=vm-work/copy-images cargo test --test vm_copy -- --ignored host_
//! ```
//!
//! Names: guest tests start with `guest_` and host tests with `host_`, and neither contains
//! the other's prefix, since libtest filters by substring. A test that found an nvcopy bug
//! is renamed `bug_*` and ignored with the reason, so the suite does not run it until the
//! bug is fixed (`--ignored` would otherwise run it); run it by name to reproduce.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod vm_common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vm_common::{driver_of, nvcopy_for, ok, strings, OnKernelDriver, Run};

const MIB: u64 = 1 << 20;
const BIG: u64 = 512 * MIB;
const SMALL: u64 = 64 * MIB;

const SRC: &str = "0000:00:10.0";
const ONE: &str = "0000:00:11.0";
const WIDE_4K: &str = "0000:00:12.0";
const WIDE_MDTS1: &str = "0000:00:13.0";
const SENTINEL: &str = "0000:00:14.0";
const R4K: &str = "0000:00:15.0";
const R512: &str = "0000:00:16.0";
const WIDE_512: &str = "0000:00:17.0";
const ZERO_WHOLE: &str = "0000:00:18.0";

/// One emulated drive of the layout: a row of LAYOUT in scripts/vm-copy-suite.sh.
struct Drive {
    bdf: &'static str,
    image: &'static str,
    bytes: u64,
    lba: u64,
    mdts: u8,
}

const DRIVES: [Drive; 9] = [
    Drive {
        bdf: SRC,
        image: "source.img",
        bytes: BIG,
        lba: 512,
        mdts: 7,
    },
    Drive {
        bdf: ONE,
        image: "one.img",
        bytes: BIG,
        lba: 512,
        mdts: 7,
    },
    Drive {
        bdf: WIDE_4K,
        image: "wide-4k.img",
        bytes: BIG,
        lba: 4096,
        mdts: 7,
    },
    Drive {
        bdf: WIDE_MDTS1,
        image: "wide-mdts1.img",
        bytes: BIG,
        lba: 512,
        mdts: 1,
    },
    Drive {
        bdf: SENTINEL,
        image: "sentinel.img",
        bytes: SMALL,
        lba: 512,
        mdts: 7,
    },
    Drive {
        bdf: R4K,
        image: "regions-4k.img",
        bytes: SMALL,
        lba: 4096,
        mdts: 7,
    },
    Drive {
        bdf: R512,
        image: "regions-512.img",
        bytes: SMALL,
        lba: 512,
        mdts: 7,
    },
    Drive {
        bdf: WIDE_512,
        image: "wide-512.img",
        bytes: BIG,
        lba: 512,
        mdts: 7,
    },
    Drive {
        bdf: ZERO_WHOLE,
        image: "zero-whole.img",
        bytes: 8 * MIB,
        lba: 4096,
        mdts: 7,
    },
];

fn drive(bdf: &str) -> &'static Drive {
    DRIVES
        .iter()
        .find(|d| d.bdf == bdf)
        .unwrap_or_else(|| panic!("{bdf} is not in the layout"))
}

// ---------------------------------------------------------------------------------------
// The jobs that write the small drives: run by the guest tests, checked by the host tests
// ---------------------------------------------------------------------------------------

/// A job a guest test runs: a copy (`from` set) or a zero, as CLI region strings.
struct Op {
    /// The guest test that runs it.
    test: &'static str,
    from: Option<String>,
    to: Vec<String>,
    /// More CLI arguments.
    extra: Vec<&'static str>,
}

fn copy_op(test: &'static str, from: &str, to: &[&str], extra: &[&'static str]) -> Op {
    Op {
        test,
        from: Some(from.to_string()),
        to: to.iter().map(|s| s.to_string()).collect(),
        extra: extra.to_vec(),
    }
}

fn zero_op(test: &'static str, to: &[&str], extra: &[&'static str]) -> Op {
    Op {
        test,
        from: None,
        to: to.iter().map(|s| s.to_string()).collect(),
        extra: extra.to_vec(),
    }
}

impl Op {
    fn args(&self) -> Vec<String> {
        let mut a = vec![if self.from.is_some() { "copy" } else { "zero" }.to_string()];
        if let Some(f) = &self.from {
            a.extend(["--from".to_string(), f.clone()]);
        }
        for t in &self.to {
            a.extend(["--to".to_string(), t.clone()]);
        }
        a.extend(self.extra.iter().map(|s| s.to_string()));
        a
    }

    /// What the job writes, resolved the way the CLI documents it (independently of
    /// nvcopy's own parser): a copy's source defaults to the rest of its namespace, and
    /// each destination's length to the source's.
    fn writes(&self) -> Vec<Write> {
        match &self.from {
            Some(f) => {
                let src = Spec::parse(f);
                let len = src.len.unwrap_or(drive(src.bdf).bytes - src.offset);
                self.to
                    .iter()
                    .map(|t| {
                        let d = Spec::parse(t);
                        Write {
                            bdf: d.bdf,
                            offset: d.offset,
                            len: d.len.unwrap_or(len),
                            data: Data::From(src.bdf, src.offset),
                        }
                    })
                    .collect()
            }
            None => self
                .to
                .iter()
                .map(|t| {
                    let d = Spec::parse(t);
                    Write {
                        bdf: d.bdf,
                        offset: d.offset,
                        len: d.len.expect("zero ops give explicit lengths"),
                        data: Data::Zero,
                    }
                })
                .collect(),
        }
    }
}

/// 64 regions of 64 KiB on 0000:00:16.0 from `base_mib`: a 64-destination copy.
fn sixty_four_regions(base_mib: u64) -> Vec<String> {
    (0..64u64)
        .map(|i| format!("{R512}@{}K", base_mib * 1024 + i * 64))
        .collect()
}

/// Every job that writes the 64 MiB drives. Written ranges never overlap one another, and
/// no job reads a range of those drives that any job writes, so the order the guest runs
/// them in does not matter and the host can rebuild the expected image from the pristine
/// copy (the `ops_table_is_consistent` test checks both).
fn ops() -> Vec<Op> {
    let t = "guest_copy_regions_with_offsets_and_lengths";
    let mut v = vec![
        // The destination length defaults to the source's; suffixes.
        copy_op(t, "0000:00:10.0@1M+3M", &["0000:00:15.0@20M"], &[]),
        // The source's last MiB (its length defaults to the rest of the namespace).
        copy_op(t, "0000:00:10.0@511M", &["0000:00:15.0@8M"], &[]),
        // Up to the destination's last byte.
        copy_op(t, "0000:00:10.0@300M+1M", &["0000:00:15.0@63M"], &[]),
        // The destination's first block; plain byte counts, explicit namespace.
        copy_op(t, "0000:00:10.0/1@0+4096", &["0000:00:15.0/1@0+4096"], &[]),
        // Short addresses; a length that is not a multiple of the chunk (257 x 4 KiB),
        // few chunks in flight.
        copy_op(
            t,
            "00:10.0@64M+1052K",
            &["00:16.0@10M"],
            &["--chunk", "64K", "--qd", "3"],
        ),
        // Two destinations on one namespace, the second given a length.
        copy_op(
            t,
            "0000:00:10.0@200M+2M",
            &["0000:00:15.0@30M", "0000:00:15.0@34M+2M"],
            &[],
        ),
    ];
    let t = "guest_copy_between_512_and_4096_byte_namespaces";
    v.extend([
        // A source offset that is a multiple of 512 but not of 4096, into 4096-byte blocks.
        copy_op(t, "0000:00:10.0@7680+1028K", &["0000:00:15.0@40M"], &[]),
        // From 4096-byte blocks into 512-byte ones, and to both at once.
        // A chunk bigger than any controller takes: capped at MDTS.
        copy_op(
            t,
            "0000:00:15.0@12M+2M",
            &["0000:00:16.0@20M"],
            &["--chunk", "2M"],
        ),
        copy_op(
            t,
            "0000:00:10.0@100M+512K",
            &["0000:00:15.0@36M", "0000:00:16.0@14M"],
            &["--chunk", "16K"],
        ),
    ]);
    let t = "guest_copy_within_one_namespace";
    v.extend([
        // Chunks small enough for QEMU's Copy limits (MCL 128 blocks): the Copy command.
        copy_op(
            t,
            "0000:00:16.0@0+2M",
            &["0000:00:16.0@24M"],
            &["--chunk", "64K"],
        ),
        copy_op(t, "0000:00:15.0@48M+1M", &["0000:00:15.0@50M"], &[]),
        // Adjacent regions share no byte: not an overlap. Forwards and backwards.
        copy_op(t, "0000:00:16.0@26M+1M", &["0000:00:16.0@27M"], &[]),
        copy_op(t, "0000:00:16.0@3M+1M", &["0000:00:16.0@2M"], &[]),
        // One destination by the Copy command, one by data movement, in one job.
        copy_op(
            t,
            "0000:00:16.0@30M+1M",
            &["0000:00:16.0@31M", "0000:00:15.0@24M"],
            &["--chunk", "64K"],
        ),
    ]);
    v.extend([
        Op {
            test: "guest_copy_to_64_destinations",
            from: Some("0000:00:10.0@64M+64K".into()),
            to: sixty_four_regions(32),
            extra: vec![],
        },
        Op {
            test: "guest_copy_to_64_destinations",
            from: Some("0000:00:10.0@128M+64K".into()),
            to: sixty_four_regions(15),
            extra: vec!["--cores", "2", "--chunk", "16K"],
        },
    ]);
    v.push(copy_op(
        "guest_no_hugepages_is_refused_and_small_pages_work",
        "0000:00:10.0@100M+1M",
        &["0000:00:16.0@40M"],
        &["--small-pages"],
    ));
    let t = "guest_copy_with_cores_and_num_pages";
    v.extend([
        copy_op(
            t,
            "0000:00:10.0@400M+8M",
            &["0000:00:16.0@44M", "0000:00:15.0@52M"],
            &["--cores", "2", "--num-pages", "64"],
        ),
        // One page: chunks shrink to 4 KiB.
        copy_op(
            t,
            "0000:00:10.0@430M+1M",
            &["0000:00:16.0@56M"],
            &["--num-pages", "1", "--qd", "4"],
        ),
        // Two reactors sharing one page, two destinations on one namespace.
        copy_op(
            t,
            "0000:00:10.0@450M+1M",
            &["0000:00:16.0@41M", "0000:00:16.0@57M"],
            &["--cores", "2", "--num-pages", "1"],
        ),
    ]);
    let t = "guest_copy_with_sequential_and_no_offload";
    v.extend([
        copy_op(
            t,
            "0000:00:10.0@420M+4M",
            &["0000:00:16.0@52M", "0000:00:15.0@44M"],
            &["--sequential"],
        ),
        copy_op(
            t,
            "0000:00:16.0@28M+1M",
            &["0000:00:16.0@29M"],
            &["--no-offload", "--chunk", "64K"],
        ),
    ]);
    let t = "guest_zero_regions";
    v.extend([
        zero_op(t, &["0000:00:16.0@4M+2M", "0000:00:15.0@10M+2M"], &[]),
        zero_op(t, &["0000:00:16.0@60M+4M"], &[]),
        zero_op(t, &["0000:00:16.0@7M+512"], &[]),
        zero_op(t, &["0000:00:15.0@14M+4K"], &["--json"]),
        // Writes from a zeroed page instead of Write Zeroes.
        zero_op(
            t,
            &["0000:00:16.0@8M+1M", "0000:00:15.0@16M+1M"],
            &["--no-offload"],
        ),
        zero_op(
            t,
            &["0000:00:16.0@36M+4M", "0000:00:15.0@25M+4M"],
            &["--cores", "2"],
        ),
    ]);
    v
}

/// A region as written on the command line, parsed by the test itself.
struct Spec {
    bdf: &'static str,
    offset: u64,
    len: Option<u64>,
}

fn size(s: &str) -> u64 {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().unwrap_or_else(|_| panic!("size {s:?}")) * mult
}

impl Spec {
    fn parse(s: &str) -> Spec {
        let (rest, len) = match s.split_once('+') {
            Some((r, l)) => (r, Some(size(l))),
            None => (s, None),
        };
        let (rest, offset) = match rest.split_once('@') {
            Some((r, o)) => (r, size(o)),
            None => (rest, 0),
        };
        let bdf = rest.strip_suffix("/1").unwrap_or(rest);
        let full = if bdf.len() == 7 {
            format!("0000:{bdf}")
        } else {
            bdf.to_string()
        };
        Spec {
            bdf: drive(&full).bdf,
            offset,
            len,
        }
    }
}

/// Where the bytes of a write come from.
#[derive(Clone, Copy, Debug)]
enum Data {
    Zero,
    /// That drive's original image, from that byte offset.
    From(&'static str, u64),
}

/// A range a job writes.
#[derive(Debug)]
struct Write {
    bdf: &'static str,
    offset: u64,
    len: u64,
    data: Data,
}

impl Write {
    fn end(&self) -> u64 {
        self.offset + self.len
    }
}

// ---------------------------------------------------------------------------------------
// Running nvcopy in the guest
// ---------------------------------------------------------------------------------------

/// Runs every job of `test` from [`ops`].
fn run_ops(test: &str) -> Vec<Run> {
    let mine: Vec<Op> = ops().into_iter().filter(|o| o.test == test).collect();
    assert!(!mine.is_empty(), "no jobs for {test}");
    mine.iter()
        .map(|o| ok(&o.args(), Duration::from_secs(300)))
        .collect()
}

/// Bad-input cases of one test: each is run, and every problem is reported at the end.
#[derive(Default)]
struct Refusals {
    problems: Vec<String>,
    cases: usize,
}

impl Refusals {
    /// Runs nvcopy with `args`, which must be refused: a non-zero exit (not a crash), and
    /// a stderr that has, for each group of `words`, at least one of them. Nothing may
    /// have been copied: no summary, no progress.
    fn case(&mut self, args: &[&str], words: &[&[&str]]) -> Run {
        self.cases += 1;
        let run = nvcopy_for(&strings(args), Duration::from_secs(120));
        let mut bad = Vec::new();
        match run.status.code() {
            Some(0) => bad.push("exited with status 0".to_string()),
            None => bad.push("killed by a signal".to_string()),
            Some(101) => bad.push("panicked (status 101)".to_string()),
            Some(_) => {}
        }
        if run.stderr.contains("panicked") {
            bad.push("stderr shows a panic".to_string());
        }
        if run.stderr.trim().is_empty() {
            bad.push("stderr is empty".to_string());
        }
        for group in words {
            if !group.iter().any(|w| run.stderr.contains(w)) {
                bad.push(format!("stderr has none of {group:?}"));
            }
        }
        if run.stdout.contains("copied")
            || run.stdout.contains("zeroed")
            || run.stderr.contains("MB/s")
        {
            bad.push("a progress line or summary: I/O happened".to_string());
        }
        if !bad.is_empty() {
            self.problems
                .push(format!("{run}\n  problems: {}", bad.join("; ")));
        }
        run
    }

    fn check(self) {
        assert!(
            self.problems.is_empty(),
            "{} of {} bad-input cases were handled wrongly:\n\n{}",
            self.problems.len(),
            self.cases,
            self.problems.join("\n\n")
        );
    }
}

const NOT_FOUND: &[&str] = &["no PCI function", "not found", "no such", "does not exist"];
const DOES_NOT_FIT: &[&str] = &[
    "does not fit",
    "beyond",
    "exceeds",
    "past the end",
    "out of range",
];
const ALIGN: &[&str] = &["multiple", "align"];
const OVERLAP: &[&str] = &["overlap"];
const SAME_LENGTH: &[&str] = &["same length", "length"];
const SMALL_BYTES: &[&str] = &["67108864", "64 MiB", "64.0 MiB"];
const BIG_BYTES: &[&str] = &["536870912", "512 MiB", "512.0 MiB"];

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Releases every hugepage for as long as it lives.
struct NoHugepages(String);

impl NoHugepages {
    fn new() -> Self {
        let before = std::fs::read_to_string(NR_HUGEPAGES).unwrap();
        std::fs::write(NR_HUGEPAGES, "0").unwrap();
        NoHugepages(before.trim().to_string())
    }
}

impl Drop for NoHugepages {
    fn drop(&mut self) {
        let restored = std::fs::write(NR_HUGEPAGES, &self.0).is_ok()
            && std::fs::read_to_string(NR_HUGEPAGES).is_ok_and(|now| now.trim() == self.0);
        // A second panic would abort the whole suite.
        if !std::thread::panicking() {
            assert!(restored, "could not restore {} hugepages", self.0);
        }
    }
}

/// The number in `text` right after `prefix`, if any.
fn number_after(text: &str, prefix: &str) -> Option<u64> {
    let at = text.find(prefix)? + prefix.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Guest tests
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the VM"]
fn guest_layout_matches_the_table() {
    for d in &DRIVES {
        let run = ok(
            &strings(&["identify", "--json", d.bdf]),
            Duration::from_secs(60),
        );
        let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        let ns = &v["namespaces"][0];
        assert_eq!(ns["lba_size"], d.lba, "{}: {run}", d.bdf);
        assert_eq!(ns["bytes"], d.bytes, "{}: {run}", d.bdf);
        assert_eq!(v["mdts"], d.mdts, "{}: {run}", d.bdf);
        assert_eq!(v["namespaces"].as_array().unwrap().len(), 1);
    }
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_whole_drive_to_one_destination() {
    let run = ok(
        &strings(&["copy", "--from", SRC, "--to", ONE, "--json"]),
        Duration::from_secs(600),
    );
    let v: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("--json output is not JSON ({e}): {run}"));
    assert_eq!(v["bytes_total"], BIG, "{run}");
    assert_eq!(v["destinations"].as_array().map(Vec::len), Some(1), "{run}");
    assert_eq!(v["failed_destinations"], serde_json::json!([]), "{run}");
    assert_eq!(v["read_err"], false, "{run}");
    assert_eq!(v["write_err"], 0, "{run}");
    assert_eq!(v["failed_chunks"], 0, "{run}");
    eprintln!("1 -> 1, 512 MiB: {:.1} s", run.secs);
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_whole_drive_to_three_destinations_in_one_job() {
    // 512-byte, 4096-byte and mdts=1 destinations in one job: every chunk is read once,
    // cut to what the mdts=1 controller takes.
    let run = ok(
        &strings(&[
            "copy", "--from", "00:10.0", "--to", "00:12.0", "--to", "00:13.0", "--to", "00:17.0",
        ]),
        Duration::from_secs(900),
    );
    assert!(!run.stdout.contains("FAILED"), "{run}");
    eprintln!("1 -> 3, 512 MiB: {:.1} s", run.secs);
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_regions_with_offsets_and_lengths() {
    run_ops("guest_copy_regions_with_offsets_and_lengths");
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_between_512_and_4096_byte_namespaces() {
    run_ops("guest_copy_between_512_and_4096_byte_namespaces");
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_within_one_namespace() {
    run_ops("guest_copy_within_one_namespace");
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_to_64_destinations() {
    let runs = run_ops("guest_copy_to_64_destinations");
    assert!(!runs[0].stdout.contains("FAILED"), "{}", runs[0]);
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_with_cores_and_num_pages() {
    run_ops("guest_copy_with_cores_and_num_pages");
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_with_sequential_and_no_offload() {
    run_ops("guest_copy_with_sequential_and_no_offload");
}

#[test]
#[ignore = "needs the VM"]
fn guest_zero_whole_namespace_by_default() {
    ok(
        &strings(&["zero", "--to", "00:18.0"]),
        Duration::from_secs(120),
    );
}

#[test]
#[ignore = "needs the VM"]
fn guest_zero_regions() {
    let runs = run_ops("guest_zero_regions");
    for r in runs.iter().filter(|r| r.args.iter().any(|a| a == "--json")) {
        let v: serde_json::Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("--json output is not JSON ({e}): {r}"));
        assert_eq!(v["operation"], "zero", "{r}");
        assert_eq!(v["bytes_total"], 4096, "{r}");
        assert_eq!(v["failed_destinations"], serde_json::json!([]), "{r}");
    }
}

#[test]
#[ignore = "needs the VM"]
fn guest_refuses_unknown_pci_addresses() {
    let mut r = Refusals::default();
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "copy",
                "--from",
                "00:10.0+1M",
                "--to",
                SENTINEL,
                "--to",
                "0000:00:1e.0",
            ],
            "0000:00:1e.0",
        ),
        (
            &["copy", "--from", "0000:00:1e.0+1M", "--to", SENTINEL],
            "0000:00:1e.0",
        ),
        (
            &[
                "copy",
                "--from",
                "00:10.0+1M",
                "--to",
                SENTINEL,
                "--to",
                "0001:00:10.0",
            ],
            "0001:00:10.0",
        ),
        (
            &[
                "copy",
                "--from",
                "00:10.0+1M",
                "--to",
                SENTINEL,
                "--to",
                "0000:3a:00.0",
            ],
            "0000:3a:00.0",
        ),
    ];
    for (args, addr) in cases {
        r.case(args, &[&[addr], NOT_FOUND, &["nvcopy list"]]);
    }
    r.check();
}

#[test]
#[ignore = "needs the VM"]
fn guest_refuses_a_device_not_bound_to_vfio() {
    let mut r = Refusals::default();
    {
        let _kernel = OnKernelDriver::new(R512);
        let words: &[&[&str]] = &[&[R512], &["vfio-pci"], &["setup.sh bind 0000:00:16.0"]];
        r.case(
            &[
                "copy",
                "--from",
                "00:10.0+1M",
                "--to",
                SENTINEL,
                "--to",
                "00:16.0@8M",
            ],
            words,
        );
        r.case(&["copy", "--from", "00:16.0+1M", "--to", SENTINEL], words);
    }
    // Bound back, the same controller works again.
    ok(&strings(&["identify", R512]), Duration::from_secs(60));
    r.check();
}

#[test]
#[ignore = "needs the VM"]
fn guest_setup_sh_bind_refuses_a_drive_held_open() {
    let kernel = OnKernelDriver::new(R512);
    let dev = kernel.blockdev();
    // A process that has the namespace open (as its stdin) and does nothing else.
    let mut holder = Command::new("sleep")
        .arg("600")
        .stdin(File::open(&dev).unwrap())
        .spawn()
        .unwrap();
    let pid = holder.id();
    let bind = Command::new("setup.sh")
        .args(["bind", R512])
        .output()
        .unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    let err = String::from_utf8_lossy(&bind.stderr);
    assert_eq!(bind.status.code(), Some(1), "setup.sh bind {R512}: {err}");
    assert!(
        err.contains(&format!(
            "refusing to unbind {R512} from nvme: {dev} is held open by pid {pid} (sleep)"
        )) && err.contains("stop that process")
            && err.contains("--force"),
        "setup.sh bind {R512} with {dev} open in pid {pid}: {err}"
    );
    assert_eq!(driver_of(R512).as_deref(), Some("nvme"), "{err}");
    // Nothing holds it now: the bind back to vfio-pci (which must work) happens here.
    drop(kernel);
}

#[test]
#[ignore = "needs the VM"]
fn guest_no_hugepages_is_refused_and_small_pages_work() {
    let mut r = Refusals::default();
    {
        let _none = NoHugepages::new();
        let run = r.case(
            &["copy", "--from", "00:10.0+1M", "--to", SENTINEL],
            &[&["hugepages"], &[NR_HUGEPAGES, "HUGEMEM="]],
        );
        let n = number_after(&run.stderr, "echo ")
            .or_else(|| number_after(&run.stderr, "HUGEMEM="))
            .unwrap_or(0);
        assert!(
            n > 0,
            "the message does not say how many hugepages to reserve: {run}"
        );
        // Asked for by name, 4 KiB pages do without.
        run_ops("guest_no_hugepages_is_refused_and_small_pages_work");
    }
    r.check();
}

#[test]
#[ignore = "needs the VM"]
fn guest_refuses_regions_beyond_the_namespace() {
    let mut r = Refusals::default();
    let dest_words: &[&[&str]] = &[&[SENTINEL], DOES_NOT_FIT, SMALL_BYTES];
    r.case(
        &["copy", "--from", "00:10.0+2M", "--to", "00:14.0@63M"],
        dest_words,
    );
    r.case(
        &["copy", "--from", "00:10.0+1M", "--to", "00:14.0@64M"],
        dest_words,
    );
    r.case(
        &["copy", "--from", "00:10.0+1M", "--to", "00:14.0@1T"],
        dest_words,
    );
    // The whole 512 MiB source into a 64 MiB drive.
    r.case(&["copy", "--from", SRC, "--to", SENTINEL], dest_words);
    r.case(
        &["copy", "--from", "00:10.0@511M+2M", "--to", SENTINEL],
        &[&[SRC], DOES_NOT_FIT, BIG_BYTES],
    );
    // Namespaces that do not exist.
    r.case(
        &["copy", "--from", "00:10.0+1M", "--to", "00:14.0/2"],
        &[&[SENTINEL], &["namespace"], &["2"]],
    );
    r.case(
        &["copy", "--from", "00:10.0/3+1M", "--to", SENTINEL],
        &[&[SRC], &["namespace"], &["3"]],
    );
    r.check();
}

#[test]
#[ignore = "needs the VM"]
fn guest_refuses_misaligned_regions() {
    let mut r = Refusals::default();
    r.case(
        &["copy", "--from", "00:10.0@100+4K", "--to", SENTINEL],
        &[&["100"], ALIGN, &["512"]],
    );
    r.case(
        &["copy", "--from", "00:10.0+1000", "--to", SENTINEL],
        &[&["1000"], ALIGN, &["512"]],
    );
    r.case(
        &["copy", "--from", "00:10.0+4K", "--to", "00:14.0@100"],
        &[&["100"], ALIGN, &["512"]],
    );
    // Fine for 512-byte blocks, not for 4096-byte ones.
    r.case(
        &[
            "copy",
            "--from",
            "00:10.0+4K",
            "--to",
            SENTINEL,
            "--to",
            "00:15.0@512",
        ],
        &[&[R4K], ALIGN, &["4096"]],
    );
    r.case(
        &[
            "copy",
            "--from",
            "00:10.0+512",
            "--to",
            SENTINEL,
            "--to",
            R4K,
        ],
        &[&[R4K], ALIGN, &["4096"]],
    );
    r.case(
        &["copy", "--from", "00:15.0@4K+512", "--to", SENTINEL],
        &[&[R4K], ALIGN, &["4096"]],
    );
    r.check();
}

#[test]
#[ignore = "needs the VM"]
fn guest_refuses_overlapping_regions() {
    let mut r = Refusals::default();
    // The destination overlaps the source on the same namespace.
    r.case(
        &["copy", "--from", "00:14.0+1M", "--to", "00:14.0@512K"],
        &[OVERLAP],
    );
    // The same, with the address written two ways.
    r.case(
        &[
            "copy",
            "--from",
            "0000:00:14.0@4M+1M",
            "--to",
            "00:14.0/1@4608K",
        ],
        &[OVERLAP],
    );
    // Two destinations overlap each other.
    r.case(
        &[
            "copy",
            "--from",
            "00:10.0+1M",
            "--to",
            SENTINEL,
            "--to",
            "00:14.0@512K",
        ],
        &[OVERLAP],
    );
    r.case(
        &[
            "copy",
            "--from",
            "00:10.0+1M",
            "--to",
            "00:14.0@8M",
            "--to",
            "00:14.0@8M",
        ],
        &[OVERLAP],
    );
    r.check();
}

#[test]
#[ignore = "needs the VM"]
fn guest_refuses_a_destination_equal_to_the_source() {
    let mut r = Refusals::default();
    let words: &[&[&str]] = &[&["overlap", "same", "equal"]];
    r.case(
        &["copy", "--from", "00:14.0@2M+1M", "--to", "00:14.0@2M"],
        words,
    );
    r.case(&["copy", "--from", SENTINEL, "--to", SENTINEL], words);
    r.case(
        &["copy", "--from", "00:14.0", "--to", "0000:00:14.0/1"],
        words,
    );
    r.check();
}

#[test]
#[ignore = "needs the VM"]
fn guest_refuses_lengths_larger_than_the_source() {
    let mut r = Refusals::default();
    // A destination explicitly longer (or shorter) than the source.
    r.case(
        &["copy", "--from", "00:10.0+1M", "--to", "00:14.0+2M"],
        &[
            SAME_LENGTH,
            &["1048576", "1 MiB", "1.0 MiB"],
            &["2097152", "2 MiB", "2.0 MiB"],
        ],
    );
    r.case(
        &["copy", "--from", "00:10.0+2M", "--to", "00:14.0+1M"],
        &[SAME_LENGTH],
    );
    // A source length beyond the source namespace.
    r.case(
        &["copy", "--from", "00:10.0+1T", "--to", SENTINEL],
        &[&[SRC], DOES_NOT_FIT, BIG_BYTES],
    );
    // An empty source: its offset is its namespace's end.
    r.case(
        &["copy", "--from", "00:10.0@512M", "--to", SENTINEL],
        &[&[SRC], &["does not fit", "empty", "zero", "length 0"]],
    );
    r.check();
}

#[test]
#[ignore = "needs the VM"]
fn guest_zero_refuses_bad_input() {
    let mut r = Refusals::default();
    r.case(
        &["zero", "--to", "00:14.0@63M+2M"],
        &[&[SENTINEL], DOES_NOT_FIT, SMALL_BYTES],
    );
    r.case(
        &["zero", "--to", "00:14.0@100+512"],
        &[&["100"], ALIGN, &["512"]],
    );
    r.case(
        &["zero", "--to", "00:14.0+1M", "--to", "00:15.0@512+4K"],
        &[&[R4K], ALIGN, &["4096"]],
    );
    r.case(
        &["zero", "--to", "00:14.0+1M", "--to", "00:14.0@512K+1M"],
        &[OVERLAP],
    );
    r.case(
        &["zero", "--to", "00:14.0+1M", "--to", "0000:00:1e.0+1M"],
        &[&["0000:00:1e.0"], NOT_FOUND],
    );
    r.case(
        &["zero", "--to", "00:14.0+1M", "--to", "00:14.0@8M+2M"],
        &[SAME_LENGTH],
    );
    // Without a length, the whole namespace: longer than the other.
    r.case(
        &["zero", "--to", "00:14.0+1M", "--to", "00:15.0"],
        &[SAME_LENGTH],
    );
    r.check();
}

// ---------------------------------------------------------------------------------------
// Host tests: the images, after the guest exited
// ---------------------------------------------------------------------------------------

fn image_dir() -> PathBuf {
    std::env::var_os("NVCOPY_COPY_IMAGES")
        .expect("NVCOPY_COPY_IMAGES names the directory of the suite's images")
        .into()
}

fn image_path(bdf: &str) -> PathBuf {
    image_dir().join(drive(bdf).image)
}

fn orig_path(bdf: &str) -> PathBuf {
    image_path(bdf).with_extension("orig")
}

/// Compares two files of the same size in 4 MiB chunks; the first differing offset if any.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            return Some(off + i as u64);
        }
        off += n as u64;
    }
    None
}

fn assert_whole_copy(bdf: &str) {
    let (src, dst) = (image_path(SRC), image_path(bdf));
    if let Some(at) = first_difference(&src, &dst) {
        panic!(
            "{bdf} ({}) differs from the source at byte {at} (LBA {} of 512 bytes)",
            dst.display(),
            at / 512
        );
    }
}

/// The bytes a small drive must hold: its pristine image with every write of [`ops`] on it.
fn expected_image(bdf: &str) -> (Vec<u8>, Vec<Write>) {
    let mut want = std::fs::read(orig_path(bdf)).unwrap();
    let writes: Vec<Write> = ops()
        .iter()
        .flat_map(Op::writes)
        .filter(|w| w.bdf == bdf)
        .collect();
    for w in &writes {
        let range = w.offset as usize..w.end() as usize;
        match w.data {
            Data::Zero => want[range].fill(0),
            Data::From(src, at) => {
                let path = if drive(src).bytes == BIG {
                    image_path(src)
                } else {
                    orig_path(src)
                };
                let mut f = File::open(&path).unwrap();
                f.seek(SeekFrom::Start(at)).unwrap();
                f.read_exact(&mut want[range]).unwrap();
            }
        }
    }
    (want, writes)
}

fn assert_small_drive(bdf: &str) {
    let (want, writes) = expected_image(bdf);
    let got = std::fs::read(image_path(bdf)).unwrap();
    assert_eq!(got.len(), want.len(), "{bdf}: image size");
    if got == want {
        return;
    }
    let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap() as u64;
    let lba = drive(bdf).lba;
    let what = match writes.iter().find(|w| (w.offset..w.end()).contains(&at)) {
        Some(w) => format!(
            "inside the write of {} bytes at {} from {:?}",
            w.len, w.offset, w.data
        ),
        None => "outside every write: a stray write, or a bad-input case that did I/O".into(),
    };
    // How far the difference runs, for the report.
    let mut end = at;
    while end < got.len() as u64 && got[end as usize] != want[end as usize] {
        end += 1;
    }
    panic!(
        "{bdf}: byte {at} (LBA {}) differs from what it should hold, {what}; the first run of \
         differing bytes ends at {end}",
        at / lba
    );
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_one_destination_matches_the_source() {
    assert_whole_copy(ONE);
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_three_destinations_match_the_source() {
    for bdf in [WIDE_4K, WIDE_MDTS1, WIDE_512] {
        assert_whole_copy(bdf);
    }
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_whole_namespace_zero_left_only_zeroes() {
    let got = std::fs::read(image_path(ZERO_WHOLE)).unwrap();
    assert_eq!(got.len() as u64, drive(ZERO_WHOLE).bytes);
    if let Some(at) = got.iter().position(|&b| b != 0) {
        panic!("{ZERO_WHOLE}: byte {at} is not zero after `nvcopy zero --to 00:18.0`");
    }
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_sentinel_drive_was_never_written() {
    assert_small_drive(SENTINEL);
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_region_drive_4k_holds_exactly_the_expected_bytes() {
    assert_small_drive(R4K);
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_region_drive_512_holds_exactly_the_expected_bytes() {
    assert_small_drive(R512);
}

// ---------------------------------------------------------------------------------------
// Plain tests of the tables above (no VM)
// ---------------------------------------------------------------------------------------

#[test]
fn ops_table_is_consistent() {
    let all: Vec<(&str, Write)> = ops()
        .iter()
        .flat_map(|o| o.writes().into_iter().map(move |w| (o.test, w)))
        .collect();
    for (test, w) in &all {
        let d = drive(w.bdf);
        assert_eq!(
            d.bytes, SMALL,
            "{test}: only the 64 MiB drives take region writes"
        );
        assert_ne!(
            w.bdf, SENTINEL,
            "{test}: nothing may write the sentinel drive"
        );
        assert!(
            w.len > 0 && w.end() <= d.bytes,
            "{test}: {w:?} out of range"
        );
        assert!(
            w.offset % d.lba == 0 && w.len % d.lba == 0,
            "{test}: {w:?} misaligned"
        );
        if let Data::From(src, at) = w.data {
            let s = drive(src);
            assert!(at + w.len <= s.bytes && at % s.lba == 0, "{test}: {w:?}");
            if s.bytes == SMALL {
                // Sources on the small drives are read from the pristine image, so no job
                // may write them.
                for (t2, o) in &all {
                    assert!(
                        o.bdf != src || o.end() <= at || at + w.len <= o.offset,
                        "{test} reads {src}@{at}+{} which {t2} writes",
                        w.len
                    );
                }
            }
        }
    }
    for (i, (t1, a)) in all.iter().enumerate() {
        for (t2, b) in &all[i + 1..] {
            assert!(
                a.bdf != b.bdf || a.end() <= b.offset || b.end() <= a.offset,
                "{t1} {a:?} and {t2} {b:?} overlap"
            );
        }
    }
    // Every job parses as the CLI's grammar says, and names a guest test.
    for o in ops() {
        assert!(o.test.starts_with("guest_"), "{}", o.test);
        for s in o.from.iter().chain(&o.to) {
            let parsed: nvcopy::region::RegionSpec = s.parse().unwrap();
            let mine = Spec::parse(s);
            assert_eq!(parsed.place.to_string(), mine.bdf, "{s}");
            assert_eq!((parsed.offset, parsed.len), (mine.offset, mine.len), "{s}");
        }
    }
    assert_eq!(sixty_four_regions(0).len(), 64);
}

#[test]
fn layout_matches_the_suite_script() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vm-copy-suite.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("layout")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} layout: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let want: Vec<String> = DRIVES
        .iter()
        .map(|d| format!("{} {} {} {} {}", d.bdf, d.image, d.bytes, d.lba, d.mdts))
        .collect();
    assert_eq!(
        rows, want,
        "scripts/vm-copy-suite.sh's LAYOUT and DRIVES differ"
    );
}

#[test]
fn number_after_finds_the_hugepage_count() {
    let msg = "reserve them with `echo 3 > /proc/sys/vm/nr_hugepages` or `HUGEMEM=6 ...`";
    assert_eq!(number_after(msg, "echo "), Some(3));
    assert_eq!(number_after(msg, "HUGEMEM="), Some(6));
    assert_eq!(number_after(msg, "nope"), None);
}
