//! Files as sources and destinations, on the host's own kernel (io_uring works here):
//! copies between files and from the software NVMe controller to files, checked byte for
//! byte; the refusals a path can earn; `--sparse`; a source shorter than asked for; a
//! destination on a filesystem too small for it.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nvcopy::endpoint::file::FileDevice;
use nvcopy::endpoint::nvme::NvmeDevice;
use nvcopy::{Client, Engine, EngineOptions, Flags, Region};
use nvcopy_nvme::ControllerOptions;
use nvcopy_nvme_sim::{NamespaceConfig, SimConfig, SimController, ThreadedSim};
use nvcopy_testkit::{bring_up, pattern};
use nvcopy_uring::{Access, Anchor, BlockFile};

const MIB: usize = 1 << 20;

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvcopy-files-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn nvcopy(args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_nvcopy"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn ok(args: &[&str]) -> Run {
    let r = nvcopy(args);
    assert_eq!(
        r.code,
        Some(0),
        "nvcopy {args:?}\nstdout:\n{}\nstderr:\n{}",
        r.stdout,
        r.stderr
    );
    r
}

fn refused(args: &[&str], phrases: &[&str]) -> Run {
    let r = nvcopy(args);
    assert_eq!(r.code, Some(1), "nvcopy {args:?}: {}{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    for p in phrases {
        assert!(r.stderr.contains(p), "stderr lacks {p:?}: {}", r.stderr);
    }
    r
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json_field(out: &str, key: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(out).unwrap();
    v[key].clone()
}

#[test]
fn a_file_is_copied_to_two_files_byte_for_byte_and_a_missing_one_is_created() {
    let d = scratch("fanout");
    let (src, a, b) = (d.join("src.img"), d.join("a.img"), d.join("b.img"));
    let data = pattern(7, 9 * MIB + 4096 * 3);
    std::fs::write(&src, &data).unwrap();
    // `b` exists, longer than the copy, with other data: it is written, never truncated.
    let old = pattern(8, 12 * MIB);
    std::fs::write(&b, &old).unwrap();
    let r = ok(&[
        "copy",
        "--from",
        s(&src),
        "--to",
        s(&a),
        "--to",
        s(&b),
        "--json",
    ]);
    assert_eq!(json_field(&r.stdout, "bytes_ok"), data.len() as u64);
    // Each destination took one write per chunk (512K by default) and then its Flush
    // (fdatasync): what `ok` promises.
    let chunks = (data.len() as u64).div_ceil(512 << 10);
    let devices = json_field(&r.stdout, "devices");
    for dest in [&a, &b] {
        let d = devices
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == s(dest))
            .unwrap();
        let commands: u64 = d["facts"]["commands"].as_str().unwrap().parse().unwrap();
        assert_eq!(commands, chunks + 1, "{}: writes and one flush", s(dest));
    }
    assert_eq!(std::fs::read(&a).unwrap(), data, "created destination");
    let got = std::fs::read(&b).unwrap();
    assert_eq!(got.len(), old.len(), "an existing file is never truncated");
    assert!(got[..data.len()] == data[..], "existing destination");
    assert!(
        got[data.len()..] == old[data.len()..],
        "bytes past the copy kept"
    );
    // With an offset and a length on both sides, through several reactors.
    let c = d.join("c.img");
    ok(&[
        "copy",
        "--from",
        &format!("{}@1M+4M", s(&src)),
        "--to",
        &format!("{}@64K", s(&c)),
        "--cores",
        "2",
        "--chunk",
        "64K",
    ]);
    let got = std::fs::read(&c).unwrap();
    assert_eq!(
        got.len(),
        (64 << 10) + 4 * MIB,
        "created with offset plus length"
    );
    assert!(got[64 << 10..] == data[MIB..5 * MIB]);
    assert!(got[..64 << 10].iter().all(|&x| x == 0));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn verify_and_zero_work_on_files() {
    let d = scratch("verify");
    let (src, dst) = (d.join("src.img"), d.join("dst.img"));
    let data = pattern(3, 4 * MIB);
    std::fs::write(&src, &data).unwrap();
    let r = ok(&[
        "copy",
        "--from",
        s(&src),
        "--to",
        s(&dst),
        "--verify",
        "--hash",
        "sha256",
    ]);
    assert!(
        r.stdout.contains("every destination matches"),
        "{}",
        r.stdout
    );
    // A later change to the destination is found by --verify-only.
    let mut bad = data.clone();
    bad[3 * MIB + 17] ^= 0xff;
    std::fs::write(&dst, &bad).unwrap();
    let r = nvcopy(&["copy", "--from", s(&src), "--to", s(&dst), "--verify-only"]);
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("differs from the source in bytes 3145728.."),
        "{}",
        r.stdout
    );
    // zero: fallocate ZERO_RANGE, then the data path (--no-offload) on the other half.
    ok(&["zero", "--to", &format!("{}+2M", s(&dst))]);
    ok(&["zero", "--to", &format!("{}@2M", s(&dst)), "--no-offload"]);
    let got = std::fs::read(&dst).unwrap();
    assert_eq!(got.len(), 4 * MIB);
    assert!(got.iter().all(|&x| x == 0));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn sparse_destinations_get_holes_for_zero_chunks_and_read_back_exactly() {
    let d = scratch("sparse");
    let (src, dst) = (d.join("src.img"), d.join("dst.img"));
    // 1 MiB of data, 6 MiB of zeroes, 1 MiB of data.
    let mut data = vec![0u8; 8 * MIB];
    data[..MIB].copy_from_slice(&pattern(1, MIB));
    data[7 * MIB..].copy_from_slice(&pattern(2, MIB));
    std::fs::write(&src, &data).unwrap();
    // The destination held other data where the source has zeroes: holes must read back
    // as zeroes, not as what was there.
    std::fs::write(&dst, pattern(9, 8 * MIB)).unwrap();
    ok(&[
        "copy",
        "--from",
        s(&src),
        "--to",
        s(&dst),
        "--sparse",
        "--chunk",
        "1M",
    ]);
    assert!(std::fs::read(&dst).unwrap() == data);
    let used = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(
        used <= 3 * MIB as u64,
        "{used} bytes allocated for 2 MiB of data: the zero chunks were written, not punched"
    );
    // Without --sparse every byte is allocated.
    let full = d.join("full.img");
    ok(&["copy", "--from", s(&src), "--to", s(&full)]);
    assert!(std::fs::metadata(&full).unwrap().blocks() * 512 >= 8 * MIB as u64);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_short_source_and_misaligned_regions_are_refused_before_any_io() {
    let d = scratch("short");
    let (src, dst) = (d.join("src.img"), d.join("dst.img"));
    let data = pattern(4, MIB + 1000);
    std::fs::write(&src, &data).unwrap();
    // Not whole blocks for O_DIRECT: refused, nothing created; --buffered copies it all.
    refused(
        &["copy", "--from", s(&src), "--to", s(&dst)],
        &["not a whole number", "--buffered"],
    );
    assert!(!dst.exists(), "a refused job created its destination");
    ok(&["copy", "--from", s(&src), "--to", s(&dst), "--buffered"]);
    assert!(std::fs::read(&dst).unwrap() == data);
    std::fs::remove_file(&dst).unwrap();
    // Asking for more than the source holds; an offset that O_DIRECT cannot take.
    for (from, phrase) in [("+2M", "does not fit"), ("@1+4K", "multiples")] {
        let from = format!("{}{from}", s(&src));
        refused(&["copy", "--from", &from, "--to", s(&dst)], &[phrase]);
        assert!(
            !dst.exists(),
            "{from}: a refused job created its destination"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A tmpfs of `size` bytes mounted at `dir`, unmounted on drop; None where this process
/// may not mount (not root): the test then says so and checks the rest.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(dir: &Path, size: &str) -> Option<TinyFs> {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                s(dir),
            ])
            .status()
            .ok()?;
        st.success().then(|| TinyFs(dir.to_path_buf()))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        // The kernel releases an exited process's io_uring rings (and the files they
        // hold) asynchronously: the mount can stay busy for a moment.
        for _ in 0..40 {
            if Command::new("umount")
                .arg(&self.0)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_destination_filesystem_too_small_is_found_before_the_copy_and_the_others_stay_intact() {
    let d = scratch("tiny");
    let Some(_fs) = TinyFs::mount(&d.join("tiny"), "2m") else {
        // CI runs as root; a developer's unprivileged `cargo test` cannot mount.
        assert_ne!(effective_uid(), 0, "root could not mount a tmpfs");
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let (src, big, small) = (d.join("src.img"), d.join("big.img"), d.join("tiny/out.img"));
    let data = pattern(5, 8 * MIB);
    std::fs::write(&src, &data).unwrap();
    let before = pattern(6, 8 * MIB);
    std::fs::write(&big, &before).unwrap();
    // Reserved up front: refused before any data moves, the other destination untouched.
    refused(
        &[
            "copy",
            "--from",
            s(&src),
            "--to",
            s(&big),
            "--to",
            s(&small),
        ],
        &["out.img", "cannot hold", "free space"],
    );
    assert!(
        std::fs::read(&big).unwrap() == before,
        "the other destination changed"
    );
    assert!(!small.exists(), "the refused destination was left behind");
    // --sparse reserves nothing: the filesystem fills up during the copy, that
    // destination fails with a clear error, and the other one gets every byte.
    let r = nvcopy(&[
        "copy",
        "--from",
        s(&src),
        "--to",
        s(&big),
        "--to",
        s(&small),
        "--sparse",
        "--ignore-errors",
        "--json",
    ]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert_eq!(json_field(&r.stdout, "write_err"), 2, "{}", r.stdout);
    let first = json_field(&r.stdout, "first_error").to_string();
    assert!(
        first.contains("No space left") || first.contains("full"),
        "{first}"
    );
    assert!(
        std::fs::read(&big).unwrap() == data,
        "the healthy destination"
    );
    drop(_fs);
    let _ = std::fs::remove_dir_all(&d);
}

fn effective_uid() -> u32 {
    // /proc/self/status: "Uid: real effective saved fs".
    let st = std::fs::read_to_string("/proc/self/status").unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// The software NVMe controller as source, a file and a second namespace as
/// destinations, in one engine; then the file back to the controller.
#[test]
fn nvme_and_files_mix_in_one_job_both_ways() {
    let _turn = common::Turn::take();
    let d = scratch("mixed");
    let pool = nvcopy_testkit::pool(64 << 20);
    let cfg = SimConfig::new()
        .namespace(NamespaceConfig::new(512, 32768))
        .namespace(NamespaceConfig::new(4096, 4096));
    let dev = ThreadedSim::start(SimController::new(cfg, pool.clone()));
    let ctrl = bring_up("sim0", &dev, &pool, ControllerOptions::default());
    let data = pattern(11, 16 * MIB);
    dev.sim().write_ns(1, 0, &data).unwrap();
    let img = d.join("image.raw");
    let access = Access {
        write: true,
        create_len: Some(16 * MIB as u64),
        buffered: false,
    };
    let file = BlockFile::open(&img, access).unwrap();
    let anchor = Arc::new(Anchor::new(true));
    let devices: Vec<Arc<dyn nvcopy::endpoint::Device>> = vec![
        NvmeDevice::shared(ctrl),
        FileDevice::new(file, anchor, Duration::from_secs(10)),
    ];
    let opts = EngineOptions {
        reactors: 2,
        pin: false,
        qd: 8,
        chunk: 256 << 10,
        ..Default::default()
    };
    let engine = Engine::with_devices(devices, pool, opts).unwrap();
    let client = Client::new(&engine, 1024).unwrap();
    let region = |ctrl, nsid, lba_size| Region {
        ctrl,
        nsid,
        offset: 0,
        len: 16 * MIB as u64,
        lba_size,
    };
    let file_bs = engine.devices()[1].volume(1).unwrap().block_size;
    let o = client
        .copy_blocking(
            &region(0, 1, 512),
            &[region(1, 1, file_bs), region(0, 2, 4096)],
            Flags::NONE,
        )
        .unwrap();
    assert!(
        !o.read_err && !o.write_err.any() && o.bytes_ok == 16 * MIB as u64,
        "{o:?}"
    );
    assert!(std::fs::read(&img).unwrap() == data, "the file");
    let mut got = vec![0u8; 16 * MIB];
    dev.sim().read_ns(2, 0, &mut got).unwrap();
    assert!(got == data, "the second namespace");
    // Back: the file, changed, restored onto namespace 1.
    let back = pattern(12, 16 * MIB);
    std::fs::write(&img, &back).unwrap();
    let o = client
        .copy_blocking(&region(1, 1, file_bs), &[region(0, 1, 512)], Flags::NONE)
        .unwrap();
    assert!(!o.read_err && !o.write_err.any(), "{o:?}");
    dev.sim().read_ns(1, 0, &mut got).unwrap();
    assert!(got == back, "namespace 1 after the restore");
    drop(client);
    drop(engine);
    let _ = std::fs::remove_dir_all(&d);
}

/// A loop device over a file in `dir`, detached on drop; None where this process cannot
/// make one (not root, no loop driver): the test then says so.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", s(image)])
            .output()
            .ok()?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && dev.starts_with("/dev/loop")).then_some(Loop(dev))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_kernel_block_device_is_a_source_and_a_destination_unless_someone_holds_it() {
    let d = scratch("loop");
    let (img, src, back) = (d.join("disk.img"), d.join("src.img"), d.join("back.img"));
    std::fs::write(&img, vec![0u8; 16 * MIB]).unwrap();
    let data = pattern(31, 8 * MIB);
    std::fs::write(&src, &data).unwrap();
    let Some(dev) = Loop::attach(&img) else {
        assert_ne!(effective_uid(), 0, "root could not attach a loop device");
        eprintln!("skipped: attaching a loop device needs root");
        return;
    };
    let at = format!("{}@4M", dev.0);
    ok(&["copy", "--from", s(&src), "--to", &at, "--json"]);
    let got = std::fs::read(&img).unwrap();
    assert!(
        got[4 * MIB..12 * MIB] == data[..],
        "the loop device's backing file"
    );
    assert!(
        got[..4 * MIB].iter().all(|&b| b == 0),
        "bytes before the region"
    );
    // Back out of it, into a file.
    ok(&["copy", "--from", &format!("{at}+8M"), "--to", s(&back)]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "read back from the block device"
    );
    // Another program holding it open: refused, named, nothing written.
    let mut holder = Command::new("sleep")
        .arg("30")
        .stdin(std::fs::File::open(&dev.0).unwrap())
        .spawn()
        .unwrap();
    let before = std::fs::read(&img).unwrap();
    let r = refused(
        &["copy", "--from", s(&back), "--to", &dev.0],
        &["is open in process", &holder.id().to_string()],
    );
    drop(r);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a refused job wrote"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// A restore: one image file read once and written to eight namespaces of the software
/// controller in one job.
#[test]
fn a_file_is_restored_to_eight_nvme_namespaces_in_one_job() {
    let _turn = common::Turn::take();
    let d = scratch("restore8");
    let img = d.join("golden.img");
    let data = pattern(41, 4 * MIB);
    std::fs::write(&img, &data).unwrap();
    let pool = nvcopy_testkit::pool(64 << 20);
    let mut cfg = SimConfig::new();
    for _ in 0..8 {
        cfg = cfg.namespace(NamespaceConfig::new(512, 8192));
    }
    let dev = ThreadedSim::start(SimController::new(cfg, pool.clone()));
    let ctrl = bring_up("sim0", &dev, &pool, ControllerOptions::default());
    let file = BlockFile::open(&img, Access::default()).unwrap();
    let devices: Vec<Arc<dyn nvcopy::endpoint::Device>> = vec![
        FileDevice::new(file, Arc::new(Anchor::new(true)), Duration::from_secs(10)),
        NvmeDevice::shared(ctrl),
    ];
    let opts = EngineOptions {
        reactors: 2,
        pin: false,
        ..Default::default()
    };
    let engine = Engine::with_devices(devices, pool, opts).unwrap();
    let client = Client::new(&engine, 1024).unwrap();
    let bs = engine.devices()[0].volume(1).unwrap().block_size;
    let src = Region {
        ctrl: 0,
        nsid: 1,
        offset: 0,
        len: 4 * MIB as u64,
        lba_size: bs,
    };
    let to: Vec<Region> = (1..=8)
        .map(|nsid| Region {
            ctrl: 1,
            nsid,
            lba_size: 512,
            ..src
        })
        .collect();
    let o = client.copy_blocking(&src, &to, Flags::NONE).unwrap();
    assert!(
        !o.read_err && !o.write_err.any() && o.bytes_ok == 4 * MIB as u64,
        "{o:?}"
    );
    let (commands, _) = match engine.devices()[0]
        .facts()
        .iter()
        .find(|(k, _)| *k == "commands")
    {
        Some((_, v)) => (v.parse::<u64>().unwrap(), ()),
        None => panic!("no commands fact"),
    };
    // Read once: one read per chunk, not one per destination.
    assert!(
        commands <= (4 * MIB as u64).div_ceil(128 << 10),
        "{commands} reads"
    );
    for nsid in 1..=8u32 {
        let mut got = vec![0u8; 4 * MIB];
        dev.sim().read_ns(nsid, 0, &mut got).unwrap();
        assert!(got == data, "namespace {nsid}");
    }
    drop(client);
    drop(engine);
    let _ = std::fs::remove_dir_all(&d);
}
