//! End-to-end tests of what nvcopy promises about a job's end and its interruption: a
//! copy killed with `kill -9` or stopped with SIGINT resumes from its `--map` and ends
//! byte-identical, a source read error lands in the map as a `-` area where ddrescuelog
//! sees it, and every destination gets a Flush after its last write.
//!
//! `scripts/test.sh` prepares the images with `scripts/vm-trust-suite.sh prepare DIR` and
//! boots one guest with `scripts/vm-trust-suite.sh run DIR` (which owns the layout below;
//! the emulated VT-d IOMMU is on), running `/tests/nvcopy-vm_trust --ignored guest_
//! --test-threads=1` in it:
//!
//! | address      | image (in DIR)   | size    | notes                                        |
//! |--------------|------------------|---------|----------------------------------------------|
//! | 0000:00:10.0 | source.img       | 512 MiB | random data: source of the kill, SIGINT and flush copies |
//! | 0000:00:11.0 | kill.img         | 512 MiB | sparse: `kill -9`, then resumed              |
//! | 0000:00:12.0 | sigint.img       | 512 MiB | sparse: SIGINT, then resumed                 |
//! | 0000:00:13.0 | bad-source.img   | 64 MiB  | random; reads of sector [`BAD_SECTOR`] fail (QEMU blkdebug, EIO) |
//! | 0000:00:14.0 | bad-dest.img     | 64 MiB  | sparse: the `--ignore-errors` copy's destination |
//! | 0000:00:15.0 | (fresh)          | 64 MiB  | 2 namespaces: flush destination A is nsid 2  |
//! | 0000:00:16.0 | (fresh)          | 64 MiB  | 3 namespaces: flush destination B is nsid 3  |
//! | 0000:00:17.0 | scratch.img      | 4 MiB   | zeroes; the guest writes its maps here through the kernel nvme driver |
//!
//! Every drive has 512-byte LBAs. QEMU traces each NVMe I/O command it receives
//! (`-trace pci_nvme_io_cmd`) into DIR/trace.log. That event names the namespace but not
//! the controller, which is why the two flush destinations are namespaces 2 and 3: no
//! other controller has a namespace with either number, so the nsid in a trace line names
//! the controller too.
//!
//! The maps leave the guest through the scratch drive: a guest test hands it to the kernel
//! driver (`setup.sh reset`), writes the map file's bytes into its slot ([`MapSlot`], 1 MiB
//! each) with a NUL after them, fsyncs, and binds it back to vfio-pci. Going through the
//! kernel, not nvcopy, keeps the evidence independent of the program under test.
//!
//! After the guest exits, `cargo test --test vm_trust -- --ignored host_` with
//! NVCOPY_TRUST_IMAGES=DIR compares the destinations with the source byte for byte, runs
//! Debian's `ddrescuelog` on the maps and counts the Flush commands in the trace.
//!
//! By hand, from the repository root (as root):
//!
//! ```sh
//! D=vm-work/trust-images
//! scripts/vm-trust-suite.sh prepare $D && scripts/vm-trust-suite.sh run $D --timeout 600
//! NVCOPY_TRUST_IMAGES=$D cargo test --test vm_trust -- --ignored host_
//! ```
//!
//! Names: guest tests start with `guest_` and host tests with `host_`; a test that found an
//! nvcopy bug is renamed `bug_*` and ignored with the reason.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod vm_common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vm_common::{first_difference, json, read_at, setup_sh, strings, Proc, Run};

const MIB: u64 = 1 << 20;
const BIG: u64 = 512 * MIB;

const SRC: &str = "0000:00:10.0";
const KILL: &str = "0000:00:11.0";
const SIGINT: &str = "0000:00:12.0";
const BAD_SRC: &str = "0000:00:13.0";
const BAD_DST: &str = "0000:00:14.0";
const FLUSH_A: &str = "0000:00:15.0";
const FLUSH_B: &str = "0000:00:16.0";
const SCRATCH: &str = "0000:00:17.0";

/// The 512-byte sector of bad-source.img that blkdebug fails every read of; the same
/// number as BAD_SECTOR in scripts/vm-trust-suite.sh.
const BAD_SECTOR: u64 = 40000;
/// The bad-source copy reads this region: the bad sector lies 3,702,784 bytes into it, so
/// a map whose positions were device offsets instead of region offsets is caught.
const BAD_FROM_OFFSET: u64 = 16 * MIB;
const BAD_LEN: u64 = 32 * MIB;
const FLUSH_LEN: u64 = 64 * MIB;

/// Small chunks, few in flight: slow enough under TCG (about 15 s for 512 MiB, where the
/// defaults take 1 s) that a checkpoint (every 5 s) lands well before the copy ends.
const SLOW: [&str; 4] = ["--chunk", "4K", "--qd", "2"];

/// Where on the scratch drive each map goes.
#[derive(Clone, Copy, Debug)]
enum MapSlot {
    BadSource = 0,
    Kill = 1,
    Sigint = 2,
}

const SLOT_BYTES: u64 = MIB;

// ---------------------------------------------------------------------------------------
// Progress maps, parsed by the test itself (GNU ddrescue's format)
// ---------------------------------------------------------------------------------------

/// A map's block lines: (position, size, status character).
#[derive(Debug)]
struct Blocks(Vec<(u64, u64, char)>);

fn number(s: &str) -> u64 {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .unwrap_or_else(|_| panic!("map number {s:?}"))
}

impl Blocks {
    fn parse(text: &str) -> Blocks {
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        // The first non-comment line is the status line (current_pos, status, pass).
        lines
            .next()
            .unwrap_or_else(|| panic!("no status line in {text}"));
        Blocks(
            lines
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    assert_eq!(f.len(), 3, "block line {l:?} in\n{text}");
                    let status = f[2].chars().next().unwrap();
                    (number(f[0]), number(f[1]), status)
                })
                .collect(),
        )
    }

    fn bytes_with(&self, status: char) -> u64 {
        self.0.iter().filter(|b| b.2 == status).map(|b| b.1).sum()
    }

    /// The blocks tile 0..len without gaps.
    fn assert_covers(&self, len: u64) {
        let mut at = 0;
        for &(pos, size, _) in &self.0 {
            assert_eq!(pos, at, "a gap or overlap at {pos}: {self:?}");
            at += size;
        }
        assert_eq!(at, len, "the map ends at {at}, not {len}: {self:?}");
    }
}

fn read_map(path: &Path) -> Option<Blocks> {
    // A missing file, or one caught mid-write by a reader: nvcopy renames a complete file
    // into place, so the name always holds a whole map once it exists.
    std::fs::read_to_string(path)
        .ok()
        .map(|t| Blocks::parse(&t))
}

// ---------------------------------------------------------------------------------------
// Running nvcopy in the guest
// ---------------------------------------------------------------------------------------

impl Proc {
    /// Waits until the map at `map` records some bytes as copied (`+`) while the copy is
    /// still running: the moment is mid-copy, and there is progress to resume from.
    /// Returns the `+` bytes seen.
    fn wait_for_checkpoint(&mut self, map: &Path, limit: Duration) -> u64 {
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "nvcopy ended before its map recorded any progress, so nothing could be \
                     interrupted mid-copy (make SLOW slower): {}",
                    self.run(st)
                );
            }
            if let Some(done) = read_map(map).map(|b| b.bytes_with('+')) {
                if done > 0 {
                    return done;
                }
            }
            assert!(
                self.started.elapsed() < limit,
                "no checkpoint within {limit:?}: {}",
                self.so_far()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn nvcopy(args: &[String], limit: Duration) -> Run {
    Proc::spawn(args, "run").wait(limit)
}

fn field(v: &serde_json::Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {name} in {v:#}"))
}

/// A fresh map path (a map left from an earlier attempt would change the test).
fn fresh_map(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(name);
    let _ = std::fs::remove_file(&p);
    p
}

// ---------------------------------------------------------------------------------------
// The scratch drive: maps out to the host, through the kernel driver
// ---------------------------------------------------------------------------------------

/// Writes the file at `map` into `slot` of the scratch drive, through the kernel nvme
/// driver, and gives the drive back to vfio-pci.
fn save_map(map: &Path, slot: MapSlot) {
    let mut bytes = std::fs::read(map).unwrap();
    assert!(
        bytes.len() < SLOT_BYTES as usize,
        "{} is too big",
        map.display()
    );
    assert!(!bytes.contains(&0), "{} has a NUL byte", map.display());
    bytes.push(0);
    setup_sh(&["reset", SCRATCH]);
    let dev = setup_sh(&["blockdev", SCRATCH]).trim().to_string();
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev)?;
        f.seek(SeekFrom::Start(slot as u64 * SLOT_BYTES))?;
        f.write_all(&bytes)?;
        f.sync_all()
    };
    let written = write();
    // Back to vfio-pci whatever happened, so the next test finds the layout as booted.
    setup_sh(&["bind", SCRATCH]);
    written.unwrap_or_else(|e| panic!("writing {} to {dev}: {e}", map.display()));
}

// ---------------------------------------------------------------------------------------
// Guest tests
// ---------------------------------------------------------------------------------------

/// The whole 512 MiB source to `dest`, slowly, with a map.
fn slow_copy_args(dest: &str, map: &Path, more: &[&str]) -> Vec<String> {
    let mut a = strings(&["copy", "--from", SRC, "--to", dest, "--map"]);
    a.push(map.display().to_string());
    a.extend(strings(&SLOW));
    a.extend(strings(more));
    a
}

#[test]
#[ignore = "needs the VM"]
fn guest_kill_9_mid_copy_then_the_rerun_copies_only_the_rest() {
    let map = fresh_map("kill.map");
    let args = slow_copy_args(KILL, &map, &["--json"]);
    let mut p = Proc::spawn(&args, "kill");
    let seen = p.wait_for_checkpoint(&map, Duration::from_secs(120));
    p.child.kill().unwrap(); // SIGKILL: no handler runs, nothing is saved at the end
    let st = p.child.wait().unwrap();
    let killed = p.run(st);
    assert_eq!(killed.status.signal(), Some(9), "{killed}");
    assert!(
        !killed.stdout.contains("result:") && !killed.stdout.contains("bytes_total"),
        "the killed run printed a summary, so it ended before the kill: {killed}"
    );
    // What the rerun must skip: the map as the killed process left it.
    let left = read_map(&map).unwrap();
    left.assert_covers(BIG);
    let done = left.bytes_with('+');
    assert!(done >= seen && done < BIG, "map after the kill: {left:?}");

    let rerun = nvcopy(&args, Duration::from_secs(300));
    assert!(rerun.status.success(), "the rerun failed: {rerun}");
    let s = json(&rerun);
    assert_eq!(field(&s, "bytes_total"), BIG, "{rerun}");
    let todo = field(&s, "bytes_todo");
    assert!(todo < BIG, "the rerun copied everything again: {rerun}");
    assert_eq!(
        todo,
        BIG - done,
        "the rerun should copy exactly what the map did not record as copied: {rerun}"
    );
    assert_eq!(s["read_err"], false, "{rerun}");
    assert_eq!(s["write_err"], 0, "{rerun}");
    assert_eq!(s["failed_chunks"], 0, "{rerun}");
    assert_eq!(field(&s["map"], "finished_bytes"), BIG, "{rerun}");
    let end = read_map(&map).unwrap();
    end.assert_covers(BIG);
    assert_eq!(end.bytes_with('+'), BIG, "map after the rerun: {end:?}");
    save_map(&map, MapSlot::Kill);
}

#[test]
#[ignore = "needs the VM"]
fn guest_sigint_mid_copy_exits_130_and_the_printed_command_resumes() {
    let map = fresh_map("sigint.map");
    let args = slow_copy_args(SIGINT, &map, &[]);
    let mut p = Proc::spawn(&args, "sigint");
    p.wait_for_checkpoint(&map, Duration::from_secs(120));
    let pid = p.child.id().to_string();
    let sent = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(sent.success(), "kill -INT {pid}");
    let stopped = p.wait(Duration::from_secs(120));
    assert_eq!(stopped.status.code(), Some(130), "{stopped}");
    let out = &stopped.stdout;
    assert!(out.contains("interrupted by signal 2"), "{stopped}");
    assert!(out.contains("result: INTERRUPTED"), "{stopped}");
    assert!(!out.contains("result: ok"), "{stopped}");
    let resume = out
        .lines()
        .find_map(|l| l.strip_prefix("resume with: "))
        .unwrap_or_else(|| panic!("no resume command: {stopped}"));
    let words: Vec<String> = resume.split_whitespace().map(str::to_string).collect();
    assert_eq!(words[0], "nvcopy", "{stopped}");
    assert_eq!(
        words[1..],
        args[..],
        "the resume command is not this command: {stopped}"
    );
    let left = read_map(&map).unwrap();
    left.assert_covers(BIG);
    let done = left.bytes_with('+');
    assert!(done > 0 && done < BIG, "map after SIGINT: {left:?}");
    assert_eq!(left.bytes_with('-'), 0, "{left:?}");

    let rerun = nvcopy(&words[1..], Duration::from_secs(300));
    assert!(rerun.status.success(), "the resume command failed: {rerun}");
    assert!(rerun.stdout.contains("result: ok"), "{rerun}");
    // Printed only when this run had less to copy than the whole.
    assert!(rerun.stdout.contains("resumed: "), "{rerun}");
    let end = read_map(&map).unwrap();
    end.assert_covers(BIG);
    assert_eq!(end.bytes_with('+'), BIG, "map after the resume: {end:?}");
    save_map(&map, MapSlot::Sigint);
}

/// Where the bad sector lies in the bad-source copy's map.
const BAD_MAP_POS: u64 = BAD_SECTOR * 512 - BAD_FROM_OFFSET;

#[test]
#[ignore = "needs the VM"]
fn guest_read_error_with_ignore_errors_is_a_bad_area_in_the_map() {
    let map = fresh_map("bad.map");
    let from = format!("{BAD_SRC}@{BAD_FROM_OFFSET}+{BAD_LEN}");
    let mut args = strings(&["copy", "--from", &from, "--to", BAD_DST, "--map"]);
    args.push(map.display().to_string());
    args.extend(strings(&["--ignore-errors", "--json"]));
    let run = nvcopy(&args, Duration::from_secs(300));
    // The rest was copied, but the job did not copy everything: not `ok`.
    assert_eq!(run.status.code(), Some(1), "{run}");
    let s = json(&run);
    assert_eq!(s["read_err"], true, "{run}");
    assert_eq!(s["write_err"], 0, "{run}");
    assert!(field(&s, "failed_chunks") >= 1, "{run}");
    let err = s["first_error"].as_str().unwrap_or_default();
    assert!(err.contains(BAD_SRC) && err.contains("Read"), "{run}");
    let bad = field(&s["map"], "bad_bytes");
    let finished = field(&s["map"], "finished_bytes");
    assert!(bad > 0 && bad + finished == BAD_LEN, "{run}");
    assert_eq!(field(&s, "bytes_ok"), finished, "{run}");

    let blocks = read_map(&map).unwrap();
    blocks.assert_covers(BAD_LEN);
    assert_eq!(blocks.bytes_with('-'), bad, "{blocks:?}");
    assert_eq!(blocks.bytes_with('+'), finished, "{blocks:?}");
    assert!(
        blocks
            .0
            .iter()
            .any(|&(pos, size, st)| st == '-' && (pos..pos + size).contains(&BAD_MAP_POS)),
        "no `-` area covers map position {BAD_MAP_POS} (sector {BAD_SECTOR} of the drive): \
         {blocks:?}"
    );
    save_map(&map, MapSlot::BadSource);
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_to_two_destinations_ends_ok() {
    let from = format!("{SRC}+{FLUSH_LEN}");
    let (a, b) = (format!("{FLUSH_A}/2"), format!("{FLUSH_B}/3"));
    let run = nvcopy(
        &strings(&["copy", "--from", &from, "--to", &a, "--to", &b, "--json"]),
        Duration::from_secs(300),
    );
    assert!(run.status.success(), "{run}");
    let s = json(&run);
    assert_eq!(field(&s, "bytes_ok"), FLUSH_LEN, "{run}");
    assert_eq!(s["write_err"], 0, "{run}");
    assert_eq!(s["read_err"], false, "{run}");
    // The text summary would say `result: ok`: the same test as Summary::ok.
    assert_eq!(s["failed_chunks"], 0, "{run}");
    assert_eq!(s["cancelled"], false, "{run}");
}

/// Where on bad-dest.img the verify test copies (after the bad copy's 32 MiB), and which
/// byte of it is changed behind nvcopy's back.
const VERIFY_AT: u64 = 40 * MIB;
const VERIFY_LEN: u64 = 8 * MIB;
const VERIFY_CHANGED: u64 = 5 * MIB + 123;

#[test]
#[ignore = "needs the VM"]
fn guest_verify_passes_after_a_copy_and_catches_a_byte_changed_behind_nvcopys_back() {
    let from = format!("{SRC}+{VERIFY_LEN}");
    let to = format!("{BAD_DST}@{VERIFY_AT}+{VERIFY_LEN}");
    let copy = nvcopy(
        &strings(&[
            "copy", "--from", &from, "--to", &to, "--verify", "--hash", "sha256",
        ]),
        Duration::from_secs(300),
    );
    assert!(copy.status.success(), "{copy}");
    assert!(
        copy.stdout
            .contains("verify: every destination matches the source"),
        "{copy}"
    );
    assert!(copy.stdout.contains("sha256: "), "{copy}");

    // Change one byte of the destination through the kernel driver, not nvcopy.
    setup_sh(&["reset", BAD_DST]);
    let dev = setup_sh(&["blockdev", BAD_DST]).trim().to_string();
    let change = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)?;
        let at = VERIFY_AT + VERIFY_CHANGED;
        let mut b = [0u8; 512];
        let sector = at - at % 512;
        f.seek(SeekFrom::Start(sector))?;
        f.read_exact(&mut b)?;
        b[(at - sector) as usize] ^= 0x5a;
        f.seek(SeekFrom::Start(sector))?;
        f.write_all(&b)?;
        f.sync_all()
    };
    let changed = change();
    setup_sh(&["bind", BAD_DST]);
    changed.unwrap_or_else(|e| panic!("changing a byte of {dev}: {e}"));

    let check = nvcopy(
        &strings(&[
            "copy",
            "--from",
            &from,
            "--to",
            &to,
            "--verify-only",
            "--json",
        ]),
        Duration::from_secs(300),
    );
    assert_eq!(
        check.status.code(),
        Some(1),
        "a difference is a failure: {check}"
    );
    let s = json(&check);
    let v = &s["verify"];
    let failed = v["failed_destinations"][0].as_str().unwrap_or_default();
    assert!(
        failed.starts_with(BAD_DST) && failed.contains(&format!("@{VERIFY_AT}+")),
        "the failed destination is {failed:?}: {check}"
    );
    let m = &v["mismatches"];
    assert_eq!(
        m.as_array().map(|a| a.len()),
        Some(1),
        "one chunk differs: {check}"
    );
    let (off, len) = (field(&m[0], "offset"), field(&m[0], "len"));
    assert!(
        off <= VERIFY_CHANGED && VERIFY_CHANGED < off + len,
        "the mismatch {off}+{len} does not cover byte {VERIFY_CHANGED}: {check}"
    );
    assert_eq!(field(&m[0], "destination"), 0, "{check}");
    // --verify-only wrote nothing: the copy's data and the changed byte are still there.
    assert_eq!(
        s["bytes_ok"], VERIFY_LEN,
        "the source was read whole: {check}"
    );
}

// ---------------------------------------------------------------------------------------
// Host tests: the images, maps and trace, after the guest exited
// ---------------------------------------------------------------------------------------

fn image_dir() -> PathBuf {
    std::env::var_os("NVCOPY_TRUST_IMAGES")
        .expect("NVCOPY_TRUST_IMAGES names the directory of the suite's images")
        .into()
}

fn assert_whole_copy(image: &str) {
    let dir = image_dir();
    let (src, dst) = (dir.join("source.img"), dir.join(image));
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), BIG, "{image}");
    let step = 32 * MIB;
    for at in (0..BIG).step_by(step as usize) {
        let (want, got) = (read_at(&src, at, step), read_at(&dst, at, step));
        if let Some(i) = first_difference(&got, &want) {
            let off = at + i as u64;
            panic!(
                "{image} differs from source.img at byte {off} (LBA {})",
                off / 512
            );
        }
    }
}

/// The map a guest test wrote into its slot of the scratch drive, saved as a file of its
/// own for ddrescuelog, named after `tag` (host tests run in parallel).
fn map_from_scratch(slot: MapSlot, tag: &str) -> PathBuf {
    let raw = read_at(
        &image_dir().join("scratch.img"),
        slot as u64 * SLOT_BYTES,
        SLOT_BYTES,
    );
    let end = raw.iter().position(|&b| b == 0).unwrap();
    assert!(
        end > 0,
        "slot {slot:?} of scratch.img is empty: its guest test did not get to save the map"
    );
    let path = image_dir().join(format!("{slot:?}-{tag}.map").to_lowercase());
    std::fs::write(&path, &raw[..end]).unwrap();
    path
}

fn ddrescuelog(args: &[&str], map: &Path) -> (Option<i32>, String) {
    let out = Command::new("ddrescuelog")
        .args(args)
        .arg(map)
        .output()
        .unwrap_or_else(|e| panic!("running ddrescuelog (Debian package gddrescue): {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_killed_copy_matches_the_source_after_the_rerun() {
    assert_whole_copy("kill.img");
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_interrupted_copy_matches_the_source_after_the_resume() {
    assert_whole_copy("sigint.img");
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_ddrescuelog_calls_the_resumed_maps_finished() {
    for slot in [MapSlot::Kill, MapSlot::Sigint] {
        let map = map_from_scratch(slot, "done");
        // --done-status: exit 0 only if every block is finished (`+`).
        let (code, text) = ddrescuelog(&["--done-status"], &map);
        assert_eq!(code, Some(0), "{slot:?}: ddrescuelog -D: {text}");
        let (code, text) = ddrescuelog(&["--list-blocks=?*/-", "--block-size=512"], &map);
        assert_eq!(code, Some(0), "{text}");
        assert!(
            text.trim().is_empty(),
            "{slot:?}: blocks not finished: {text}"
        );
    }
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_ddrescuelog_lists_the_bad_sector_as_bad() {
    let map = map_from_scratch(MapSlot::BadSource, "ddrescuelog");
    let (code, text) = ddrescuelog(&["--list-blocks=-", "--block-size=512"], &map);
    assert_eq!(code, Some(0), "ddrescuelog: {text}");
    let bad: Vec<u64> = text
        .lines()
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("ddrescuelog printed {l:?}"))
        })
        .collect();
    let want = BAD_MAP_POS / 512;
    assert!(
        bad.contains(&want),
        "ddrescuelog lists bad blocks {:?}..{:?} ({} blocks), not block {want} (sector \
         {BAD_SECTOR} of the drive, {BAD_FROM_OFFSET} bytes before the region's start)",
        bad.first(),
        bad.last(),
        bad.len()
    );
    // One failed chunk or a few, not half the map; and ddrescuelog agrees with the parser.
    assert!(
        bad.len() as u64 * 512 <= 4 * MIB,
        "{} bad blocks",
        bad.len()
    );
    let text_map = std::fs::read_to_string(&map).unwrap();
    assert_eq!(
        bad.len() as u64 * 512,
        Blocks::parse(&text_map).bytes_with('-')
    );
    let (code, status) = ddrescuelog(&["--show-status"], &map);
    assert_eq!(code, Some(0), "{status}");
    let line = status
        .lines()
        .find(|l| l.contains("bad-sector:"))
        .unwrap_or_else(|| panic!("no bad-sector line: {status}"));
    assert!(!line.contains("in      0 area(s)"), "{status}");
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_bad_source_copy_wrote_everything_but_the_bad_area() {
    let map = map_from_scratch(MapSlot::BadSource, "data");
    let blocks = Blocks::parse(&std::fs::read_to_string(map).unwrap());
    let dir = image_dir();
    let src = read_at(&dir.join("bad-source.img"), BAD_FROM_OFFSET, BAD_LEN);
    let dst = read_at(&dir.join("bad-dest.img"), 0, BAD_LEN);
    for &(pos, size, st) in &blocks.0 {
        let range = pos as usize..(pos + size) as usize;
        match st {
            '+' => {
                if let Some(i) = first_difference(&dst[range.clone()], &src[range]) {
                    panic!(
                        "bad-dest.img byte {} differs from the source, in a `+` area",
                        pos + i as u64
                    );
                }
            }
            // A chunk that could not be read is not written: the sparse image stays zero.
            '-' => assert!(
                dst[range].iter().all(|&b| b == 0),
                "bad-dest.img was written in the failed area {pos}+{size}"
            ),
            other => panic!("unexpected map status {other:?} at {pos}"),
        }
    }
}

/// Per NVMe namespace id, the trace's I/O commands: (line number, opname) in order.
fn trace_by_nsid(nsid: u32) -> Vec<(usize, String)> {
    let path = image_dir().join("trace.log");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let want = format!("nsid 0x{nsid:x} ");
    text.lines()
        .enumerate()
        // e.g. pci_nvme_io_cmd cid 0 nsid 0x2 sqid 1 opc 0x0 opname 'NVME_NVM_CMD_FLUSH'
        .filter(|(_, l)| l.starts_with("pci_nvme_io_cmd ") && l.contains(&want))
        .map(|(i, l)| {
            let op = l.rsplit("opname '").next().unwrap().trim_end_matches('\'');
            (i, op.to_string())
        })
        .collect()
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_every_destination_got_a_flush_after_its_last_write() {
    // Namespace 2 exists only on 0000:00:15.0 and namespace 3 only on 0000:00:16.0 (see
    // the header), so these nsids name the two destination controllers.
    for (bdf, nsid) in [(FLUSH_A, 2), (FLUSH_B, 3)] {
        let cmds = trace_by_nsid(nsid);
        let writes = cmds.iter().filter(|c| c.1 == "NVME_NVM_CMD_WRITE").count();
        let flushes: Vec<usize> = cmds
            .iter()
            .filter(|c| c.1 == "NVME_NVM_CMD_FLUSH")
            .map(|c| c.0)
            .collect();
        // 64 MiB in chunks of at most 512 KiB (the default chunk, and QEMU's MDTS): many
        // writes.
        assert!(
            writes >= (64 << 20) / (512 << 10),
            "{bdf} nsid {nsid}: only {writes} writes traced"
        );
        assert!(
            !flushes.is_empty(),
            "{bdf} nsid {nsid}: {writes} writes and no Flush"
        );
        let last_write = cmds
            .iter()
            .rev()
            .find(|c| c.1 != "NVME_NVM_CMD_FLUSH")
            .unwrap()
            .0;
        assert!(
            flushes.iter().any(|&f| f > last_write),
            "{bdf} nsid {nsid}: no Flush after the last write (trace line {})",
            last_write + 1
        );
        eprintln!(
            "{bdf} nsid {nsid}: {writes} writes, {} flush(es)",
            flushes.len()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Plain tests of the helpers (no VM)
// ---------------------------------------------------------------------------------------

#[test]
fn map_parser_reads_nvcopy_maps() {
    let text = "# Mapfile. Written by nvcopy\n# chunk: 131072\n0x02000000     +   1\n\
                #      pos        size  status\n0x00000000  0x00380000  +\n\
                0x00380000  0x00020000  -\n0x003A0000  0x01C60000  +\n";
    let b = Blocks::parse(text);
    b.assert_covers(32 * MIB);
    assert_eq!(b.bytes_with('-'), 0x20000);
    assert_eq!(b.bytes_with('+'), 32 * MIB - 0x20000);
    assert!((0x380000..0x3A0000).contains(&BAD_MAP_POS));
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_verify_copy_matches_the_source_but_for_the_changed_byte() {
    let dir = image_dir();
    let src = read_at(&dir.join("source.img"), 0, VERIFY_LEN);
    let mut dst = read_at(&dir.join("bad-dest.img"), VERIFY_AT, VERIFY_LEN);
    let i = VERIFY_CHANGED as usize;
    assert_eq!(dst[i], src[i] ^ 0x5a, "the guest changed exactly that byte");
    dst[i] = src[i];
    assert_eq!(
        first_difference(&dst, &src),
        None,
        "the verified copy differs elsewhere"
    );
}
