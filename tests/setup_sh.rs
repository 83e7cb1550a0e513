//! scripts/setup.sh on the host, against a fake sysfs tree (NVCOPY_SETUP_SYSFS), so that no
//! real device is ever touched: `bind` and `reset` act only on what they are told, and a
//! FORCE variable inherited from the environment forces nothing.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NIC: &str = "0000:00:01.0";
const NVME: &str = "0000:00:10.0";

/// A fake /sys with a network card and an NVMe function.
fn fake_sysfs(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("nvcopy-setup-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for (bdf, class) in [(NIC, "0x020000"), (NVME, "0x010802")] {
        let dev = root.join("bus/pci/devices").join(bdf);
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("class"), format!("{class}\n")).unwrap();
    }
    for driver in ["nvme", "vfio-pci"] {
        std::fs::create_dir_all(root.join("bus/pci/drivers").join(driver)).unwrap();
    }
    root
}

fn setup_sh(sys: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup.sh");
    let mut c = Command::new("sh");
    c.arg(script).args(args).env("NVCOPY_SETUP_SYSFS", sys);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bind_and_reset_without_an_address_change_nothing_and_ask_for_all() {
    let sys = fake_sysfs("noaddr");
    for cmd in ["bind", "reset"] {
        let o = setup_sh(&sys, &[], &[cmd]);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("--all") && e.contains("nothing was changed"),
            "{cmd}: {e}"
        );
        assert!(!sys
            .join("bus/pci/devices")
            .join(NVME)
            .join("driver_override")
            .exists());
    }
    let o = setup_sh(&sys, &[], &["bind", "--all", NVME]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("either BDFs or --all"),
        "{}",
        stderr(&o)
    );
    let _ = std::fs::remove_dir_all(&sys);
}

#[test]
fn an_inherited_force_variable_forces_nothing() {
    let sys = fake_sysfs("force");
    for cmd in ["bind", "reset"] {
        let o = setup_sh(&sys, &[("FORCE", "1")], &[cmd, NIC]);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("use --force to handle it anyway") && !e.contains("going ahead"),
            "{cmd} was forced: {e}"
        );
        let nic = sys.join("bus/pci/devices").join(NIC);
        assert!(
            !nic.join("driver_override").exists(),
            "{cmd} touched the NIC"
        );
    }
    let _ = std::fs::remove_dir_all(&sys);
}

/// `fake_sysfs` with the NVMe function bound to the kernel nvme driver and one namespace,
/// nvme9n1 (a name no host here has, so the real /proc/mounts and /proc/*/fd never name
/// it), plus a PATH directory whose `blkid` prints `blkid_type` as the namespace's
/// signature and whose `modprobe` does nothing (nothing is loaded on the host).
fn kernel_bound_sysfs(name: &str, blkid_type: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let sys = fake_sysfs(name);
    let dev = sys.join("bus/pci/devices").join(NVME);
    symlink(sys.join("bus/pci/drivers/nvme"), dev.join("driver")).unwrap();
    std::fs::create_dir_all(dev.join("nvme/nvme9/nvme9n1")).unwrap();
    std::fs::create_dir_all(sys.join("block/nvme9n1")).unwrap();
    // Empty, as the kernel's is when no override is set.
    std::fs::write(dev.join("driver_override"), "").unwrap();
    let bin = sys.join("stub-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (tool, body) in [
        (
            "blkid",
            format!("echo \"$1: UUID=\\\"1234\\\" TYPE=\\\"{blkid_type}\\\"\""),
        ),
        ("modprobe", "exit 0".to_string()),
    ] {
        let path = bin.join(tool);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (sys, bin)
}

#[test]
fn bind_refuses_lvm_zfs_and_btrfs_members_and_names_the_fix() {
    let cases = [
        ("LVM2_member", "an LVM physical volume", "pvremove"),
        ("zfs_member", "a ZFS pool member", "zpool export"),
        (
            "btrfs",
            "a device of btrfs filesystem 5f1e-btrfs",
            "btrfs device remove",
        ),
    ];
    for (ty, what, fix) in cases {
        let (sys, bin) = kernel_bound_sysfs(&format!("member-{ty}"), ty);
        if ty == "btrfs" {
            // A mounted filesystem of two devices, this namespace one of them.
            for d in ["nvme9n1", "sdb"] {
                std::fs::create_dir_all(sys.join("fs/btrfs/5f1e-btrfs/devices").join(d)).unwrap();
            }
        }
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let o = setup_sh(&sys, &[("PATH", &path)], &["bind", NVME]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{ty}: {e}");
        assert!(
            e.contains(&format!(
                "refusing to unbind {NVME} from nvme: /dev/nvme9n1 is {what}"
            )) && e.contains(fix)
                && e.contains("--force"),
            "{ty}: {e}"
        );
        let over = sys
            .join("bus/pci/devices")
            .join(NVME)
            .join("driver_override");
        assert_eq!(
            std::fs::read_to_string(&over).unwrap(),
            "",
            "{ty}: bind went ahead"
        );
        let _ = std::fs::remove_dir_all(&sys);
    }
}

#[test]
fn bind_lets_a_single_device_btrfs_and_a_plain_filesystem_through_the_member_check() {
    // A btrfs of this device alone, and ext4, are no members of anything: the member
    // check says nothing (mounts are checked apart).
    for ty in ["btrfs", "ext4"] {
        let (sys, bin) = kernel_bound_sysfs(&format!("plain-{ty}"), ty);
        std::fs::create_dir_all(sys.join("fs/btrfs/77aa-single/devices/nvme9n1")).unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let o = setup_sh(&sys, &[("PATH", &path)], &["bind", NVME]);
        let e = stderr(&o);
        assert!(!e.contains("refusing"), "{ty}: {e}");
        // It went on to rebind: the fake driver_override was written.
        let over = sys
            .join("bus/pci/devices")
            .join(NVME)
            .join("driver_override");
        assert_eq!(
            std::fs::read_to_string(&over).ok().as_deref(),
            Some("vfio-pci\n"),
            "{ty}: {e}"
        );
        let _ = std::fs::remove_dir_all(&sys);
    }
}
