//! End-to-end tests of files and kernel block devices as endpoints, next to VFIO NVMe
//! drives: a namespace left on the kernel nvme driver, a virtio-blk disk and a file on a
//! mounted ext4 as sources and destinations, one job fanning out to a VFIO drive and a
//! file, and mounted block devices refused as destinations. Everything is checked byte for
//! byte on the host afterwards.
//!
//! `scripts/test.sh` prepares the images with `scripts/vm-files-suite.sh prepare DIR` and
//! boots one guest with `scripts/vm-files-suite.sh run DIR` (which owns the layout below;
//! the emulated VT-d IOMMU is on), running `/tests/nvcopy-vm_files --ignored guest_
//! --test-threads=1 --nocapture` in it:
//!
//! | device               | image (in DIR) | size    | notes                                  |
//! |----------------------|----------------|---------|----------------------------------------|
//! | 0000:00:10.0, vfio   | source.img     | 64 MiB  | random: the source of every copy out of VFIO |
//! | 0000:00:11.0, vfio   | dest.img       | 64 MiB  | sparse: four 16 MiB slices, one per copy into VFIO |
//! | 0000:00:12.0, kernel | kernel.img     | 64 MiB  | random (+ kernel.orig): handed to the kernel nvme driver |
//! | 0000:00:13.0, vfio   | zoned.img      | 32 MiB  | sparse; a zoned namespace (ZNS) of 4 MiB zones, copied onto twice |
//! | virtio-blk nvcopy-fs | fs.img         | 128 MiB | ext4 made from DIR/fs: `/src.bin` (16 MiB random), `/out/` |
//! | virtio-blk nvcopy-raw | raw.img       | 64 MiB  | random (+ raw.orig)                    |
//! | virtio-blk nvcopy-mounted | mounted.img | 16 MiB | empty ext4 (+ mounted.orig), mounted read-only |
//!
//! The guest finds the virtio disks by serial (`/sys/block/vdX/serial`), the kernel
//! namespace through `setup.sh reset` and `setup.sh blockdev`. Every successful copy runs
//! with `--json`, and the `devices` facts (`kind`, `direct_io`, `sqpoll`,
//! `io_uring_enters`) are printed as `facts:` lines; the guest runs as root, where SQPOLL
//! must be granted, so `sqpoll` must be `true` for every file and block device.
//!
//! After the guest exits, `cargo test --test vm_files -- --ignored host_` with
//! NVCOPY_FILES_IMAGES=DIR compares the images with the source and with their pristine
//! copies, runs `e2fsck -fn` on fs.img and reads its files back with `debugfs`.
//!
//! By hand, from the repository root (as root):
//!
//! ```sh
//! D=vm-work/files-images
//! scripts/vm-files-suite.sh prepare $D && scripts/vm-files-suite.sh run $D --timeout 600
//! NVCOPY_FILES_IMAGES=$D cargo test --test vm_files -- --ignored host_
//! ```
//!
//! Names: guest tests start with `guest_` and host tests with `host_`; a test that found an
//! nvcopy bug is renamed `bug_*` and ignored with the reason.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod vm_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vm_common::{first_difference, json, nvcopy_for, ok, read_at, strings, OnKernelDriver, Run};

const MIB: u64 = 1 << 20;
/// Every copy moves one slice.
const SLICE: u64 = 16 * MIB;
const DRIVE: u64 = 64 * MIB;

const SRC: &str = "0000:00:10.0";
const DEST: &str = "0000:00:11.0";
const KERNEL: &str = "0000:00:12.0";
/// A zoned namespace (QEMU nvme-ns zoned=true) of 8 zones of 4 MiB.
const ZONED: &str = "0000:00:13.0";
const ZONED_BYTES: u64 = 32 * MIB;
/// The second copy onto it: source.img from this offset, onto its first half.
const ZONED_SECOND: u64 = 40 * MIB;

/// Where the guest mounts the ext4 disk, and the files the tests write there.
const FS_MNT: &str = "/mnt/fs";
const FROM_NVME: &str = "out/from-nvme.raw";
const FANOUT: &str = "out/fanout.raw";
const BUFFERED: &str = "out/buffered.raw";
/// Named in a refused job before the refused device: it must not be left behind.
const NEVER: &str = "out/never.raw";

/// Where each slice of dest.img comes from: (offset in dest.img, image, offset there).
/// The source file `fs/src.bin` is 16 MiB, copied whole.
const DEST_SLICES: [(u64, &str, u64); 4] = [
    (0, "kernel.orig", 0),
    (16 * MIB, "fs/src.bin", 0),
    (32 * MIB, "source.img", 32 * MIB),
    (48 * MIB, "raw.orig", 0),
];
/// Where the copies from the source land on the kernel namespace and the virtio disk:
/// (image, offset there, offset in source.img).
const KERNEL_WRITE: (&str, u64, u64) = ("kernel", 32 * MIB, 0);
const RAW_WRITE: (&str, u64, u64) = ("raw", 32 * MIB, 16 * MIB);

/// `@OFFSET+LENGTH` of one slice at `at` bytes, for region arguments.
fn slice(dev: &str, at: u64) -> String {
    format!("{dev}@{}M+16M", at / MIB)
}

fn at(dev: &str, at: u64) -> String {
    format!("{dev}@{}M", at / MIB)
}

// ---------------------------------------------------------------------------------------
// Guest helpers
// ---------------------------------------------------------------------------------------

/// The /dev/vdX whose virtio serial is `nvcopy-NAME`.
fn virtio_disk(name: &str) -> String {
    let want = format!("nvcopy-{name}");
    let mut seen = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap() {
        let e = e.unwrap();
        let dev = e.file_name().to_string_lossy().into_owned();
        if let Ok(serial) = std::fs::read_to_string(e.path().join("serial")) {
            if serial.trim() == want {
                return format!("/dev/{dev}");
            }
            seen.push(format!("{dev}={}", serial.trim()));
        }
    }
    panic!("no virtio disk has serial {want} (seen: {seen:?})");
}

/// A file system mounted for as long as it lives (busybox mount; ext4 is a module the
/// suite loads at boot).
struct Mount(PathBuf);

impl Mount {
    fn new(dev: &str, dir: &str, read_only: bool) -> Mount {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "ext4"]);
        if read_only {
            cmd.args(["-o", "ro"]);
        }
        let out = cmd.arg(dev).arg(dir).output().unwrap();
        assert!(
            out.status.success(),
            "mount {dev} {dir}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount(dir.into())
    }

    fn path(&self, rel: &str) -> String {
        self.0.join(rel).display().to_string()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // A clean unmount: the host reads the image with debugfs, which replays no journal.
        let out = Command::new("umount").arg(&self.0).output();
        let done = out.as_ref().is_ok_and(|o| o.status.success());
        if !std::thread::panicking() {
            assert!(done, "umount {}: {out:?}", self.0.display());
        }
    }
}

/// A successful copy with `--json`; prints each device's facts and requires SQPOLL for
/// every file and block device (the guest runs as root), and O_DIRECT unless `--buffered`.
fn copy(args: &[String]) -> Run {
    let direct = if args.iter().any(|a| a == "--buffered") {
        "false"
    } else {
        "true"
    };
    let mut a = strings(&["copy", "--json"]);
    a.extend_from_slice(args);
    let run = ok(&a, Duration::from_secs(300));
    let v = json(&run);
    let devices = v["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices list: {run}"));
    let mut io_uring = 0;
    for d in devices {
        let name = d["name"].as_str().unwrap();
        let facts = d["facts"].as_object().unwrap();
        let line: Vec<String> = facts
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        println!("facts: {name} {}", line.join(" "));
        if let Some(sqpoll) = facts.get("sqpoll") {
            io_uring += 1;
            assert_eq!(
                sqpoll, "true",
                "{name}: no SQPOLL thread as root on this kernel: {run}"
            );
            assert!(
                facts.contains_key("io_uring_enters"),
                "{name}: no io_uring_enters: {run}"
            );
            assert_eq!(facts["direct_io"], direct, "{name}: direct_io: {run}");
        }
    }
    assert!(
        io_uring > 0,
        "no file or block device among the devices: {run}"
    );
    assert_eq!(v["bytes_ok"], SLICE, "{run}");
    run
}

fn from_to(from: &str, to: &[String]) -> Vec<String> {
    let mut a = strings(&["--from", from]);
    for t in to {
        a.push("--to".into());
        a.push(t.clone());
    }
    a
}

/// A job that must be refused with exit status 1 and `words` on stderr, before any I/O.
fn refused(args: &[String], words: &str) {
    let mut a = strings(&["copy"]);
    a.extend_from_slice(args);
    let run = nvcopy_for(&a, Duration::from_secs(120));
    assert_eq!(run.status.code(), Some(1), "{run}");
    assert!(run.stderr.contains(words), "stderr lacks {words:?}: {run}");
    assert!(
        !run.stdout.contains("copied") && !run.stderr.contains("MB/s"),
        "I/O happened: {run}"
    );
}

// ---------------------------------------------------------------------------------------
// Guest tests
// ---------------------------------------------------------------------------------------

/// A slice of block device `dev` to `dest_at` of the VFIO destination, then a slice of the
/// VFIO source onto `dev` as `write` says.
fn block_device_both_ways(dev: &str, dest_at: u64, (_, to, from): (&str, u64, u64)) {
    copy(&from_to(&slice(dev, 0), &[at(DEST, dest_at)]));
    copy(&from_to(&slice(SRC, from), &[at(dev, to)]));
}

#[test]
#[ignore = "needs the VM"]
fn guest_kernel_nvme_namespace_is_a_source_and_a_destination() {
    let kernel = OnKernelDriver::new(KERNEL);
    block_device_both_ways(&kernel.blockdev(), DEST_SLICES[0].0, KERNEL_WRITE);
}

#[test]
#[ignore = "needs the VM"]
fn guest_virtio_disk_is_a_source_and_a_destination() {
    block_device_both_ways(&virtio_disk("raw"), DEST_SLICES[3].0, RAW_WRITE);
}

#[test]
#[ignore = "needs the VM"]
fn guest_ext4_file_is_a_source_and_a_destination() {
    let fs = Mount::new(&virtio_disk("fs"), FS_MNT, false);
    copy(&from_to(&fs.path("src.bin"), &[at(DEST, DEST_SLICES[1].0)]));
    // A missing destination file is created with the source's length.
    copy(&from_to(&slice(SRC, 0), &[fs.path(FROM_NVME)]));
    let mut a = from_to(&slice(SRC, 48 * MIB), &[fs.path(BUFFERED)]);
    a.push("--buffered".into());
    copy(&a);
    for f in [FROM_NVME, BUFFERED] {
        assert_eq!(std::fs::metadata(fs.path(f)).unwrap().len(), SLICE, "{f}");
    }
}

#[test]
#[ignore = "needs the VM"]
fn guest_one_job_fans_out_to_a_vfio_drive_and_an_ext4_file() {
    let fs = Mount::new(&virtio_disk("fs"), FS_MNT, false);
    let (to, _, from) = DEST_SLICES[2];
    copy(&from_to(
        &slice(SRC, from),
        &[at(DEST, to), fs.path(FANOUT)],
    ));
}

#[test]
#[ignore = "needs the VM"]
fn guest_mounted_block_devices_are_refused_as_destinations() {
    let mounted = virtio_disk("mounted");
    let _ro = Mount::new(&mounted, "/mnt/ro", true);
    let fs_dev = virtio_disk("fs");
    let fs = Mount::new(&fs_dev, FS_MNT, false);
    let in_use = "the block device is in use";
    refused(
        &from_to(&slice(SRC, 0), std::slice::from_ref(&mounted)),
        in_use,
    );
    refused(&from_to(&slice(SRC, 0), &[fs_dev]), in_use);
    // A file destination named before the refused device: created, then removed again.
    refused(&from_to(&slice(SRC, 0), &[fs.path(NEVER), mounted]), in_use);
    assert!(
        !Path::new(&fs.path(NEVER)).exists(),
        "the refused job left {NEVER} behind"
    );
}

#[test]
#[ignore = "needs the VM"]
fn guest_zoned_namespace_is_reset_and_written_in_order_twice_in_a_row() {
    let id = ok(&strings(&["identify", ZONED]), Duration::from_secs(60));
    assert!(
        id.stdout.contains("zoned: 8 zones of 4.0 MiB"),
        "identify does not show the zones: {id}"
    );
    // Whole namespace, then its first half again from elsewhere in the source: the second
    // run only works if the zones it covers were reset first.
    let whole = format!("{SRC}+{ZONED_BYTES}");
    let half = format!("{SRC}@{ZONED_SECOND}+{}", ZONED_BYTES / 2);
    for (from, len) in [(whole, ZONED_BYTES), (half, ZONED_BYTES / 2)] {
        let a = strings(&["copy", "--json", "--from", &from, "--to", ZONED]);
        let run = ok(&a, Duration::from_secs(300));
        let v = json(&run);
        assert_eq!(v["bytes_ok"], len, "{run}");
        assert_eq!(v["write_err"], 0, "{run}");
    }
    // What a zoned namespace cannot take is refused before any I/O.
    refused(
        &strings(&[
            "--from",
            &format!("{SRC}+4M"),
            "--to",
            &format!("{ZONED}@1M"),
        ]),
        "zone boundary",
    );
    let zero = nvcopy_for(&strings(&["zero", "--to", ZONED]), Duration::from_secs(60));
    assert_eq!(zero.status.code(), Some(1), "{zero}");
    assert!(zero.stderr.contains("zoned namespace"), "{zero}");
}

#[test]
#[ignore = "needs the VM"]
fn guest_a_filesystem_without_direct_io_is_refused_and_buffered_works() {
    // The guest's /tmp is in its initramfs (ramfs), which has no O_DIRECT on Linux 6.1.
    let path = "/tmp/nodirect.img";
    refused(
        &strings(&["--from", &format!("{SRC}+1M"), "--to", path]),
        "--buffered",
    );
    assert!(
        !Path::new(path).exists(),
        "the refused destination was left behind"
    );
    let a = strings(&[
        "copy",
        "--json",
        "--buffered",
        "--from",
        &format!("{SRC}+1M"),
        "--to",
        path,
    ]);
    let run = ok(&a, Duration::from_secs(120));
    assert_eq!(json(&run)["bytes_ok"], MIB, "{run}");
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len() as u64, MIB, "{run}");
    let _ = std::fs::remove_file(path);
}

// ---------------------------------------------------------------------------------------
// Host tests: the images, after the guest exited
// ---------------------------------------------------------------------------------------

fn image(name: &str) -> PathBuf {
    let dir: PathBuf = std::env::var_os("NVCOPY_FILES_IMAGES")
        .expect("NVCOPY_FILES_IMAGES names the directory of the suite's images")
        .into();
    dir.join(name)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!("{what} differs at byte {i} of {}", got.len());
    }
}

/// `name.img` is `name.orig` with `SLICE` bytes of source.img from `from` at `to`, and
/// nothing else changed.
fn assert_one_write((name, to, from): (&str, u64, u64)) {
    let got = read_at(&image(&format!("{name}.img")), 0, DRIVE);
    let mut want = read_at(&image(&format!("{name}.orig")), 0, DRIVE);
    want[to as usize..(to + SLICE) as usize].copy_from_slice(&read_at(
        &image("source.img"),
        from,
        SLICE,
    ));
    assert_same(&got, &want, &format!("{name}.img"));
}

/// The file at `path` in fs.img, through debugfs.
fn ext4_file(path: &str) -> Vec<u8> {
    let out_path = std::env::temp_dir().join(format!(
        "vm-files-{}-{}",
        std::process::id(),
        path.replace('/', "-")
    ));
    let _ = std::fs::remove_file(&out_path);
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /{path} {}", out_path.display()))
        .arg(image("fs.img"))
        .output()
        .unwrap();
    let bytes = std::fs::read(&out_path).unwrap_or_else(|e| {
        panic!(
            "debugfs dump /{path}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let _ = std::fs::remove_file(&out_path);
    bytes
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_vfio_destination_holds_each_slice() {
    let got = read_at(&image("dest.img"), 0, DRIVE);
    for (to, from_image, from) in DEST_SLICES {
        let want = read_at(&image(from_image), from, SLICE);
        assert_same(
            &got[to as usize..(to + SLICE) as usize],
            &want,
            &format!("dest.img at {} MiB (from {from_image})", to / MIB),
        );
    }
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_kernel_namespace_got_exactly_its_copy() {
    assert_one_write(KERNEL_WRITE);
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_virtio_disk_got_exactly_its_copy() {
    assert_one_write(RAW_WRITE);
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_ext4_files_hold_the_copies_and_the_fs_is_clean() {
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(image("fs.img"))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn fs.img: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let source = image("source.img");
    for (file, from) in [(FROM_NVME, 0), (FANOUT, 32 * MIB), (BUFFERED, 48 * MIB)] {
        assert_same(&ext4_file(file), &read_at(&source, from, SLICE), file);
    }
    assert_same(
        &ext4_file("src.bin"),
        &std::fs::read(image("fs/src.bin")).unwrap(),
        "src.bin",
    );
    let ls = Command::new("debugfs")
        .args(["-R", "ls /out"])
        .arg(image("fs.img"))
        .output()
        .unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    let never = Path::new(NEVER).file_name().unwrap().to_str().unwrap();
    assert!(!ls.contains(never), "{NEVER} exists: {ls}");
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_refused_mounted_disk_is_unchanged() {
    let (got, want) = (image("mounted.img"), image("mounted.orig"));
    let len = std::fs::metadata(&want).unwrap().len();
    assert_same(
        &read_at(&got, 0, len),
        &read_at(&want, 0, len),
        "mounted.img",
    );
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_zoned_namespace_holds_the_second_copy_over_the_first() {
    let got = read_at(&image("zoned.img"), 0, ZONED_BYTES);
    let half = ZONED_BYTES / 2;
    let mut want = read_at(&image("source.img"), 0, ZONED_BYTES);
    want[..half as usize].copy_from_slice(&read_at(&image("source.img"), ZONED_SECOND, half));
    assert_same(&got, &want, "zoned.img");
}
