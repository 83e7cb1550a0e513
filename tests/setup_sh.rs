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
