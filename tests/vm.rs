//! End-to-end tests on real (emulated) NVMe controllers in a QEMU guest, through VFIO.
//!
//! Every `guest_*` test is ignored on the host; `scripts/test.sh` boots one guest per
//! suite and runs them there with `--ignored guest_`. The main suite boots this layout
//! (see `scripts/test.sh`), with the emulated VT-d IOMMU:
//!
//! | address      | namespaces                 | notes                        |
//! |--------------|----------------------------|------------------------------|
//! | 0000:00:10.0 | 1 × 64 MiB, 512-byte LBAs  |                              |
//! | 0000:00:11.0 | 2 × 64 MiB, 4096-byte LBAs |                              |
//! | 0000:00:12.0 | 1 × 64 MiB, 512-byte LBAs  | mdts=1 (8 KiB transfers)     |
//! | 0000:00:13.0 | 1 × 64 MiB, 4096-byte LBAs | file-backed image on the host|
//!
//! `host_*` tests run on the host after the guest exits and read that image file, an
//! independent check that the guest's writes reached the device.
//! The no-IOMMU suite sets NVCOPY_NOIOMMU=1 and boots only 0000:00:10.0.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;
use std::sync::Arc;

use nvcopy::platform::{Platform, PlatformOptions};
use nvcopy_nvme::{Controller, Error as NvmeError, IoQpair, Namespace, StatusKind};
use nvcopy_vfio::{DmaBuf, IommuMode, PciAddress, PAGE_SIZE};

const NS_BYTES: u64 = 64 << 20;
const FILE_DEV: &str = "0000:00:13.0";
/// Where the file-backed test writes, and how much.
const FILE_OFFSETS: [u64; 3] = [0, 8 << 20, NS_BYTES - (1 << 20)];
const FILE_LEN: usize = 1 << 20;

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap()
}

fn noiommu() -> bool {
    std::env::var("NVCOPY_NOIOMMU").is_ok_and(|v| v == "1")
}

fn devices() -> Vec<PciAddress> {
    let devs =
        std::env::var("NVCOPY_DEVS").expect("NVCOPY_DEVS is set by scripts/vm.sh in the guest");
    devs.split_whitespace().map(addr).collect()
}

fn open(addrs: &[PciAddress]) -> Platform {
    let opts = PlatformOptions {
        mode: if noiommu() {
            IommuMode::NoIommu
        } else {
            IommuMode::Type1
        },
        pool_bytes: 16 << 20,
        ..Default::default()
    };
    Platform::open(addrs, &opts).unwrap_or_else(|e| panic!("opening {addrs:?}: {e}"))
}

/// A pattern no two offsets of any test share: a hash of (seed, byte offset / 8).
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let skip = (offset % 8) as usize;
    let mut out = Vec::with_capacity(len + skip);
    let mut word = offset / 8;
    while out.len() < len + skip {
        let mut x = (word ^ seed.rotate_left(17)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 31;
        out.extend_from_slice(&x.to_le_bytes());
        word += 1;
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

fn fill(buf: &DmaBuf, data: &[u8]) {
    buf.write_at(0, data);
}

fn contents(buf: &DmaBuf, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    buf.read_at(0, &mut v);
    v
}

/// Writes `data` at byte `offset` of `ns` and reads it back through a different buffer.
fn round_trip(q: &mut IoQpair, ns: &Namespace, offset: u64, data: &[u8]) {
    let pool = q.controller().pool().clone();
    let w = pool.alloc(data.len()).unwrap();
    let r = pool.alloc(data.len()).unwrap();
    fill(&w, data);
    r.zero();
    let lba = offset / ns.lba_size as u64;
    q.write_sync(ns, lba, &w, data.len())
        .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
    q.read_sync(ns, lba, &r, data.len())
        .unwrap_or_else(|e| panic!("read at {offset}: {e}"));
    assert!(
        contents(&r, data.len()) == data,
        "{}: nsid {} offset {offset}: data read back differs",
        q.controller().name(),
        ns.nsid
    );
}

/// Runs `f` on every usable namespace of every controller in the guest.
fn each_namespace(mut f: impl FnMut(&Arc<Controller>, &mut IoQpair, &Namespace)) -> usize {
    let p = open(&devices());
    let mut n = 0;
    for c in &p.controllers {
        let mut q = c.create_io_qpair(64).unwrap();
        for ns in c.namespaces().to_vec() {
            f(c, &mut q, &ns);
            n += 1;
        }
    }
    n
}

#[test]
#[ignore = "needs the VM"]
fn guest_identify_matches_the_booted_layout() {
    let p = open(&devices());
    let layout: Vec<(String, Vec<(u32, u32)>)> = p
        .controllers
        .iter()
        .map(|c| {
            (
                c.name().to_string(),
                c.namespaces()
                    .iter()
                    .map(|n| (n.nsid, n.lba_size))
                    .collect(),
            )
        })
        .collect();
    let expected: Vec<(String, Vec<(u32, u32)>)> = vec![
        ("0000:00:10.0".into(), vec![(1, 512)]),
        ("0000:00:11.0".into(), vec![(1, 4096), (2, 4096)]),
        ("0000:00:12.0".into(), vec![(1, 512)]),
        (FILE_DEV.into(), vec![(1, 4096)]),
    ];
    assert_eq!(layout, expected);
    for c in &p.controllers {
        assert!(
            c.info().model.contains("QEMU"),
            "{}: model {:?}",
            c.name(),
            c.info().model
        );
        assert!(
            c.info().serial.starts_with("NVCOPY"),
            "{}: serial {:?}",
            c.name(),
            c.info().serial
        );
        assert!(c.io_queues() >= 1);
        for ns in c.namespaces() {
            assert_eq!(ns.bytes(), NS_BYTES, "{} nsid {}", c.name(), ns.nsid);
            c.namespace(ns.nsid).unwrap();
        }
    }
    assert_eq!(
        p.controllers[2].max_transfer(),
        8192,
        "mdts=1 means 2 pages"
    );
    assert!(
        p.controllers[0].info().supports_copy() && p.controllers[0].info().supports_write_zeroes()
    );
}

#[test]
#[ignore = "needs the VM"]
fn guest_round_trip_at_first_and_last_lba_and_across_a_prp_list() {
    let n = each_namespace(|_, q, ns| {
        let bs = ns.lba_size as u64;
        round_trip(q, ns, 0, &pattern(1, 0, bs as usize));
        let last = ns.bytes() - bs;
        round_trip(q, ns, last, &pattern(2, last, bs as usize));
        // 12 pages from an offset of 3 pages: PRP1 plus a list, within MDTS where it allows.
        let len = (q.controller().max_transfer()).min(48 * 1024);
        round_trip(q, ns, 3 * PAGE_SIZE as u64, &pattern(3, 4096, len));
        // 1 MiB in one call: split at MDTS, many commands in flight, list pages crossed.
        round_trip(q, ns, 1 << 20, &pattern(4, 1 << 20, 1 << 20));
    });
    assert_eq!(n, 5);
}

#[test]
#[ignore = "needs the VM"]
fn guest_transfer_larger_than_mdts_is_split() {
    let p = open(&[addr("0000:00:12.0")]);
    let c = &p.controllers[0];
    assert_eq!(c.info().mdts, 1);
    let mut q = c.create_io_qpair(16).unwrap();
    let ns = c.namespace(1).unwrap().clone();
    let data = pattern(5, 0, 3 << 20);
    round_trip(&mut q, &ns, 5 << 20, &data);
    // A single command above MDTS is refused before it reaches the device.
    let buf = c.pool().alloc(16 * 1024).unwrap();
    let err = q
        .submit_read(
            &ns,
            0,
            nvcopy_nvme::DataPtr::Contig {
                iova: buf.iova(),
                len: 16 * 1024,
            },
            0,
        )
        .unwrap_err();
    assert!(err.to_string().contains("maximum transfer"), "{err}");
}

#[test]
#[ignore = "needs the VM"]
fn guest_write_zeroes_then_read_back() {
    each_namespace(|c, q, ns| {
        let bs = ns.lba_size as u64;
        let off = 2 << 20;
        let len = 256 * 1024;
        round_trip(q, ns, off, &pattern(6, off, len));
        let blocks = len as u64 / bs;
        q.write_zeroes_sync(ns, off / bs + 1, blocks - 2).unwrap();
        let r = c.pool().alloc(len).unwrap();
        q.read_sync(ns, off / bs, &r, len).unwrap();
        let got = contents(&r, len);
        let b = bs as usize;
        assert_eq!(
            got[..b],
            pattern(6, off, b)[..],
            "block before the zeroed range kept"
        );
        assert!(
            got[b..len - b].iter().all(|&x| x == 0),
            "zeroed range reads as zeroes"
        );
        assert_eq!(
            got[len - b..],
            pattern(6, off + (len - b) as u64, b)[..],
            "block after kept"
        );
    });
}

#[test]
#[ignore = "needs the VM"]
fn guest_copy_within_a_namespace_then_read_back() {
    each_namespace(|c, q, ns| {
        assert!(c.info().supports_copy());
        let bs = ns.lba_size as u64;
        let (src, dst, len) = (4u64 << 20, 12u64 << 20, 1usize << 20);
        round_trip(q, ns, src, &pattern(7, src, len));
        q.copy_sync(ns, src / bs, len as u64 / bs, dst / bs)
            .unwrap_or_else(|e| panic!("{}: {e}", c.name()));
        let r = c.pool().alloc(len).unwrap();
        q.read_sync(ns, dst / bs, &r, len).unwrap();
        assert!(
            contents(&r, len) == pattern(7, src, len),
            "{} nsid {}: copy destination differs",
            c.name(),
            ns.nsid
        );
    });
}

#[test]
#[ignore = "needs the VM"]
fn guest_deallocate_and_flush_complete() {
    each_namespace(|_, q, ns| {
        let bs = ns.lba_size as u64;
        q.deallocate_sync(ns, (20 << 20) / bs, (1 << 20) / bs)
            .unwrap();
        q.flush_sync(ns).unwrap();
    });
}

#[test]
#[ignore = "needs the VM"]
fn guest_read_past_the_end_is_lba_out_of_range() {
    each_namespace(|c, q, ns| {
        let buf = c.pool().alloc(2 * ns.lba_size as usize).unwrap();
        // Starts at the last block and runs one past it.
        let err = q
            .read_sync(ns, ns.blocks - 1, &buf, 2 * ns.lba_size as usize)
            .unwrap_err();
        match &err {
            NvmeError::Command {
                status, nsid, lba, ..
            } => {
                assert_eq!(status.kind(), StatusKind::LbaOutOfRange, "{err}");
                assert_eq!((*nsid, *lba), (ns.nsid, ns.blocks - 1));
            }
            other => panic!("expected LBA Out of Range, got {other}"),
        }
        assert!(
            err.to_string().contains(c.name()) && err.to_string().contains("LBA Out of Range"),
            "{err}"
        );
    });
}

fn sysfs_write(path: &str, value: &str) {
    std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {value:?} to {path}: {e}"));
}

/// Hands `dev` to `driver` the way scripts/setup.sh does.
fn rebind(dev: &str, driver: &str) {
    let base = format!("/sys/bus/pci/devices/{dev}");
    sysfs_write(&format!("{base}/driver_override"), driver);
    if std::path::Path::new(&format!("{base}/driver")).exists() {
        sysfs_write(&format!("{base}/driver/unbind"), dev);
    }
    sysfs_write("/sys/bus/pci/drivers_probe", dev);
}

#[test]
#[ignore = "needs the VM"]
fn guest_device_not_bound_to_vfio_gets_a_clear_error() {
    let dev = "0000:00:12.0";
    rebind(dev, "nvme");
    let err = Platform::open(&[addr(dev)], &PlatformOptions::default())
        .err()
        .expect("opening an nvme-bound device must fail");
    let cli = Command::new("nvcopy")
        .args(["identify", dev])
        .output()
        .unwrap();
    rebind(dev, "vfio-pci");
    let msg = err.to_string();
    assert!(
        matches!(&err, nvcopy::Error::Platform(nvcopy_vfio::Error::NotBoundToVfio { driver, .. }) if driver == "nvme"),
        "{msg}"
    );
    assert!(msg.contains("scripts/setup.sh bind 0000:00:12.0"), "{msg}");
    assert!(!cli.status.success());
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(
        stderr.contains("not vfio-pci") && stderr.contains("setup.sh bind"),
        "{stderr}"
    );
    // And it works again once bound back.
    open(&[addr(dev)]);
}

#[test]
#[ignore = "needs the VM"]
fn guest_no_hugepages_gets_a_clear_error_and_small_pages_work_when_asked() {
    let nr = "/proc/sys/vm/nr_hugepages";
    let before = std::fs::read_to_string(nr).unwrap();
    sysfs_write(nr, "0");
    let dev = addr("0000:00:10.0");
    let huge = Platform::open(&[dev], &PlatformOptions::default()).err();
    let small = Platform::open(
        &[dev],
        &PlatformOptions {
            page_kind: nvcopy_vfio::PageKind::Small,
            ..Default::default()
        },
    )
    .map(|p| {
        let c = &p.controllers[0];
        let mut q = c.create_io_qpair(16).unwrap();
        let ns = c.namespace(1).unwrap().clone();
        round_trip(&mut q, &ns, 3 << 20, &pattern(11, 3 << 20, 256 * 1024));
    });
    sysfs_write(nr, before.trim());
    let err = huge.expect("opening without hugepages must fail");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            nvcopy::Error::Platform(nvcopy_vfio::Error::NoHugepages { free: 0, .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains("/proc/sys/vm/nr_hugepages") && msg.contains("HUGEMEM="),
        "{msg}"
    );
    small.unwrap_or_else(|e| panic!("4 KiB pages, asked for by name: {e}"));
}

#[test]
#[ignore = "needs the VM"]
fn guest_cli_identify_json_lists_both_namespaces() {
    let out = Command::new("nvcopy")
        .args(["identify", "--json", "0000:00:11.0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ns = v["namespaces"].as_array().unwrap();
    assert_eq!(ns.len(), 2);
    for (i, n) in ns.iter().enumerate() {
        assert_eq!(n["nsid"], i as u64 + 1);
        assert_eq!(n["lba_size"], 4096);
        assert_eq!(n["bytes"], NS_BYTES);
    }
    assert_eq!(v["optional_commands"]["copy"], true);
    let list = Command::new("nvcopy")
        .args(["list", "--json"])
        .output()
        .unwrap();
    let l: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let drivers: Vec<&str> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["driver"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(drivers, vec!["vfio-pci"; 4]);
}

#[test]
#[ignore = "needs the VM"]
fn guest_writes_the_file_backed_image() {
    let p = open(&[addr(FILE_DEV)]);
    let c = &p.controllers[0];
    let mut q = c.create_io_qpair(32).unwrap();
    let ns = c.namespace(1).unwrap().clone();
    for (i, &off) in FILE_OFFSETS.iter().enumerate() {
        round_trip(&mut q, &ns, off, &pattern(100 + i as u64, off, FILE_LEN));
    }
    q.flush_sync(&ns).unwrap();
}

#[test]
#[ignore = "runs on the host after the VM suite"]
fn host_image_holds_the_data_written_in_the_vm() {
    let path =
        std::env::var("NVCOPY_HOST_IMAGE").expect("NVCOPY_HOST_IMAGE names the file-backed image");
    let image = std::fs::read(&path).unwrap();
    assert_eq!(image.len() as u64, NS_BYTES);
    for (i, &off) in FILE_OFFSETS.iter().enumerate() {
        let got = &image[off as usize..off as usize + FILE_LEN];
        assert!(
            got == pattern(100 + i as u64, off, FILE_LEN),
            "image bytes at {off} differ from what the guest wrote"
        );
    }
    // No test writes 32 MiB..60 MiB of any drive: a stray write would show up here.
    assert!(
        image[(32 << 20)..(60 << 20)].iter().all(|&b| b == 0),
        "bytes appeared where nothing was written"
    );
}

#[test]
#[ignore = "needs the VM (no-IOMMU suite)"]
fn guest_noiommu_identify_and_round_trip() {
    assert!(noiommu(), "the no-IOMMU suite sets NVCOPY_NOIOMMU=1");
    let p = open(&devices());
    let c = &p.controllers[0];
    assert!(c.info().model.contains("QEMU"));
    let mut q = c.create_io_qpair(32).unwrap();
    let ns = c.namespace(1).unwrap().clone();
    round_trip(&mut q, &ns, 0, &pattern(9, 0, 4096));
    // 4 MiB spans two hugepages, whose physical addresses differ: each command's PRPs
    // must stay inside one of them.
    round_trip(&mut q, &ns, 1 << 20, &pattern(10, 1 << 20, 1 << 20));
}

#[test]
fn pattern_is_offset_consistent() {
    // The host check relies on pattern(seed, off, len) agreeing with any sub-range.
    let whole = pattern(3, 8, 64);
    assert_eq!(pattern(3, 13, 20), whole[5..25].to_vec());
    assert_ne!(pattern(3, 8, 64), pattern(4, 8, 64));
}
