//! End-to-end tests of NVMe/TCP as an endpoint: the guest exports an emulated NVMe drive
//! (left on the kernel nvme driver) through the Linux target, nvmet-tcp, on
//! 127.0.0.1:4420, and nvcopy copies a VFIO drive to that TCP namespace and to a second
//! VFIO drive in one job, then the TCP namespace back onto the second VFIO drive. A wrong
//! subsystem NQN and a refused port must fail with exit status 1 and a clear message.
//! The kernel's own initiator (nvme-tcp, through Debian's nvme-cli, which the suite puts
//! in the guest with `--deb nvme-cli`) cross-checks the same target both ways: it reads
//! back what nvcopy wrote, and nvcopy copies what it wrote.
//! `nvcopy list --discover` must find the export in nvmet's Discovery log, with its
//! region URL, and `nvcopy identify nvme+tcp://...` must show its 64 MiB namespace.
//! Faults: the target's port is taken away in the middle of a copy (nvmet then ends every
//! connection of it and stops listening) and given back 2 s later, and the copy must
//! reconnect and end `ok` with every byte right (the namespace is zeroed first, so the
//! host check sees a lost chunk); taken away for good, the copy must fail with exit
//! status 1 about `--io-timeout` later, naming the target and the fix.
//!
//! `scripts/test.sh` prepares the images with `scripts/vm-tcp-suite.sh prepare DIR` and
//! boots one guest with `scripts/vm-tcp-suite.sh run DIR` (which owns the layout):
//!
//! | device             | image (in DIR) | size   | notes                                     |
//! |--------------------|----------------|--------|-------------------------------------------|
//! | 0000:00:10.0, vfio | source.img     | 32 MiB | random: the source                         |
//! | 0000:00:11.0, vfio | dest.img       | 96 MiB | the fan-out copy at 0, the copy back at 32 MiB |
//! |                    |                |        | at 64 MiB: nvcopy's copy of what the kernel initiator wrote |
//! | 0000:00:12.0, kernel | tcp.img      | 64 MiB | exported by nvmet-tcp as namespace 1 of [`NQN`] |
//! |                    |                |        | at 0: the source (guest_a); at 32 MiB: [`kinit_pattern`], written by the kernel initiator |
//!
//! After the guest exits, `cargo test --test vm_tcp -- --ignored host_` with
//! NVCOPY_TCP_IMAGES=DIR compares the images with source.img byte for byte.
//!
//! By hand, from the repository root (as root):
//!
//! ```sh
//! D=vm-work/tcp-images
//! scripts/vm-tcp-suite.sh prepare $D && scripts/vm-tcp-suite.sh run $D --timeout 600
//! NVCOPY_TCP_IMAGES=$D cargo test --test vm_tcp -- --ignored host_
//! ```

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod vm_common;

use std::path::PathBuf;
use std::time::Duration;

use vm_common::{
    first_difference, json, nvcopy_for, nvmet, ok, read_at, setup_sh, strings, wait_for_driver, Run,
};

const MIB: u64 = 1 << 20;
const LEN: u64 = 32 * MIB;
/// The exported namespace: tcp.img's size (scripts/vm-tcp-suite.sh).
const TCP_NS_LEN: u64 = 64 * MIB;

const SRC: &str = "0000:00:10.0";
const DEST: &str = "0000:00:11.0";
const BACKING: &str = "0000:00:12.0";
const NQN: &str = "nqn.2026-12.io.nvcopy:vm-tcp";

fn tcp(nqn: &str, port: u16) -> String {
    format!("nvme+tcp://127.0.0.1:{port}/{nqn}")
}

/// A successful copy with `--json`, printing each device's facts.
fn copy(args: &[&str]) -> Run {
    // The reactors run under their seccomp filter, as a user's would.
    let mut a = strings(&["copy", "--json"]);
    a.extend(strings(args));
    let run = nvcopy_for(&a, Duration::from_secs(400));
    if !run.status.success() {
        // A syscall the filter refused is in the kernel's audit line (type=1326 ...
        // syscall=N).
        let k = std::process::Command::new("dmesg").output();
        let lines: Vec<String> = k
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("type=1326") || l.to_lowercase().contains("seccomp"))
            .map(str::to_string)
            .collect();
        panic!(
            "expected success: {run}\nseccomp in dmesg:\n{}",
            lines.join("\n")
        );
    }
    let v = json(&run);
    let mut tcp_seen = false;
    for d in v["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices: {run}"))
    {
        let name = d["name"].as_str().unwrap_or_default();
        let facts = d["facts"].as_object().unwrap();
        let line: Vec<String> = facts
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect();
        println!("facts: {name} {}", line.join(" "));
        if name.starts_with("nvme+tcp://") {
            tcp_seen = true;
            assert!(facts.contains_key("syscalls_per_command"), "{run}");
        }
    }
    assert!(tcp_seen, "no NVMe/TCP device in the summary: {run}");
    assert_eq!(v["bytes_ok"], LEN, "{run}");
    println!("{}", run.stderr);
    run
}

/// A job that must fail with exit status 1 and every one of `words` on stderr.
fn refused(args: &[&str], words: &[&str]) {
    let mut a = strings(&["copy"]);
    a.extend(strings(args));
    let run = nvcopy_for(&a, Duration::from_secs(120));
    assert_eq!(run.status.code(), Some(1), "{run}");
    for w in words {
        assert!(run.stderr.contains(w), "stderr lacks {w:?}: {run}");
    }
    println!("refused as expected: {}", run.stderr.trim());
}

/// Exports the backing drive through nvmet-tcp once per guest boot; every guest test
/// calls it, so each one runs alone as well as in the suite's order.
fn ensure_target() {
    static UP: std::sync::Once = std::sync::Once::new();
    UP.call_once(|| {
        // The backing drive goes to the kernel nvme driver, and nvmet exports it.
        setup_sh(&["reset", BACKING]);
        wait_for_driver(BACKING, "nvme");
        let dev = setup_sh(&["blockdev", BACKING]).trim().to_string();
        nvmet(&["up", &dev, NQN]);
    });
}

#[test]
#[ignore = "needs the VM"]
fn guest_a_fan_out_to_tcp_and_back() {
    ensure_target();
    let t = tcp(NQN, 4420);
    // One job: a VFIO drive to the TCP namespace and to a second VFIO drive.
    copy(&["--from", SRC, "--to", &t, "--to", &format!("{DEST}@0+32M")]);
    // And back: the TCP namespace (namespace 1 named, its first 32 MiB) onto the VFIO drive.
    copy(&[
        "--from",
        &format!("{t}/1+32M"),
        "--to",
        &format!("{DEST}@32M"),
    ]);
    std::process::Command::new("sync").status().unwrap();
}

#[test]
#[ignore = "needs the VM"]
fn guest_b_wrong_nqn_and_refused_port() {
    ensure_target();
    refused(
        &[
            "--from",
            SRC,
            "--to",
            &tcp("nqn.2026-12.io.nvcopy:nope", 4420),
        ],
        &["Connect", "NQN"],
    );
    refused(
        &["--from", SRC, "--to", &tcp(NQN, 4421)],
        &["cannot connect", "4421"],
    );
}

#[test]
#[ignore = "needs the VM"]
fn guest_c_discover_and_identify() {
    ensure_target();
    let url = tcp(NQN, 4420);
    // The Discovery log, from nvmet's discovery controller on the I/O port.
    let run = ok(
        &strings(&["list", "--discover", "127.0.0.1:4420", "--json"]),
        Duration::from_secs(120),
    );
    println!("discovery log: {}", run.stdout);
    let v = json(&run);
    let entries = v["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {run}"));
    let ours: Vec<&serde_json::Value> = entries.iter().filter(|e| e["subnqn"] == NQN).collect();
    assert_eq!(ours.len(), 1, "one entry for {NQN}: {run}");
    let e = ours[0];
    assert_eq!(
        (&e["transport"], &e["subtype"], &e["traddr"], &e["trsvcid"]),
        (
            &serde_json::json!("tcp"),
            &serde_json::json!("nvm"),
            &serde_json::json!("127.0.0.1"),
            &serde_json::json!("4420")
        ),
        "{run}"
    );
    assert_eq!(e["url"], url.as_str(), "{run}");
    assert_eq!(v["records"].as_u64(), Some(entries.len() as u64), "{run}");
    assert_eq!(v["skipped"].as_array().map(Vec::len), Some(0), "{run}");
    // Only NVM subsystems get a URL; discovery entries say why not.
    for e in entries {
        assert_eq!(e["url"].is_null(), e["subtype"] != "nvm", "{run}");
    }
    // The human form: a table, and the URL to copy to.
    let run = ok(
        &strings(&["list", "--discover", "127.0.0.1:4420"]),
        Duration::from_secs(120),
    );
    println!("{}", run.stdout);
    assert!(
        run.stdout.contains("TRADDR") && run.stdout.contains(NQN),
        "{run}"
    );
    assert!(run.stdout.contains(&format!("region: {url}")), "{run}");

    // The controller and its namespace, through nvcopy's own host.
    let run = ok(
        &strings(&["identify", &url, "--json"]),
        Duration::from_secs(120),
    );
    println!("identify: {}", run.stdout);
    let v = json(&run);
    assert_eq!(v["subnqn"], NQN, "{run}");
    assert_eq!(v["target"], url.as_str(), "{run}");
    assert!(v["ioccsz"].as_u64().unwrap_or(0) >= 4, "IOCCSZ: {run}");
    assert!(v["in_capsule_bytes"].is_u64() && v["kas"].is_u64(), "{run}");
    assert_eq!(
        (&v["header_digest"], &v["data_digest"]),
        (&serde_json::json!(true), &serde_json::json!(true)),
        "{run}"
    );
    let ns = v["namespaces"].as_array().unwrap();
    assert_eq!(ns.len(), 1, "{run}");
    assert_eq!(ns[0]["nsid"], 1, "{run}");
    assert_eq!(ns[0]["bytes"], TCP_NS_LEN, "{run}");
    let lba = ns[0]["lba_size"].as_u64().unwrap();
    assert_eq!(ns[0]["blocks"].as_u64().unwrap() * lba, TCP_NS_LEN, "{run}");
    let run = ok(&strings(&["identify", &url]), Duration::from_secs(120));
    println!("{}", run.stdout);
    assert!(
        run.stdout.contains("namespace 1:") && run.stdout.contains("64.0 MiB"),
        "{run}"
    );
    assert!(run.stdout.contains(&format!("{url}/1")), "{run}");

    // Nothing listens on 4421: exit status 1, and the message names the address.
    let run = nvcopy_for(
        &strings(&["list", "--discover", "127.0.0.1:4421"]),
        Duration::from_secs(120),
    );
    assert_eq!(run.status.code(), Some(1), "{run}");
    assert!(
        run.stderr.contains("127.0.0.1:4421") && run.stderr.contains("cannot connect"),
        "{run}"
    );
    println!("refused as expected: {}", run.stderr.trim());
}

#[test]
#[ignore = "needs the VM"]
fn guest_c_discover_on_the_default_port() {
    ensure_target();
    // A second nvmet port on the well-known discovery port, 8009, offering the same
    // subsystem: `--discover 127.0.0.1` without a port must reach it there.
    let port = std::path::Path::new("/sys/kernel/config/nvmet/ports/2");
    std::fs::create_dir(port).unwrap();
    for (attr, value) in [
        ("addr_trtype", "tcp"),
        ("addr_adrfam", "ipv4"),
        ("addr_traddr", "127.0.0.1"),
        ("addr_trsvcid", "8009"),
    ] {
        std::fs::write(port.join(attr), value).unwrap();
    }
    let link = port.join("subsystems").join(NQN);
    std::os::unix::fs::symlink(format!("/sys/kernel/config/nvmet/subsystems/{NQN}"), &link)
        .unwrap();
    let run = nvcopy_for(
        &strings(&["list", "--discover", "127.0.0.1", "--json"]),
        Duration::from_secs(120),
    );
    std::fs::remove_file(&link).unwrap();
    std::fs::remove_dir(port).unwrap();
    assert!(run.status.success(), "{run}");
    println!("discovery log on 8009: {}", run.stdout);
    let v = json(&run);
    assert_eq!(v["discovery_controller"], "127.0.0.1:8009", "{run}");
    let ours: Vec<&serde_json::Value> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subnqn"] == NQN)
        .collect();
    assert_eq!(ours.len(), 1, "{run}");
    // The log is per port: this one names port 8009 and its port id.
    assert_eq!(ours[0]["trsvcid"], "8009", "{run}");
    assert_eq!(ours[0]["portid"], 2, "{run}");
    assert_eq!(ours[0]["url"], tcp(NQN, 8009).as_str(), "{run}");
}

/// Sectors written to the backing drive so far (/sys/block/NAME/stat, field 7): what
/// nvmet has written for the hosts.
fn backing_sectors_written() -> u64 {
    let dev = setup_sh(&["blockdev", BACKING]).trim().to_string();
    let name = dev.trim_start_matches("/dev/");
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    stat.split_whitespace().nth(6).unwrap().parse().unwrap()
}

/// Starts a copy of the source onto the TCP namespace, slowed down (small chunks, few in
/// flight) so that it is still running when the test takes the port away, and returns
/// once nvmet has written `MIN_WRITTEN` of it: the fault then lands mid-copy, which the
/// caller checks.
fn copy_in_flight(io_timeout: &str, tag: &str) -> vm_common::Proc {
    const MIN_WRITTEN: u64 = 2 * MIB;
    let start = backing_sectors_written();
    let args = strings(&[
        "copy",
        "--json",
        "--from",
        SRC,
        "--to",
        &tcp(NQN, 4420),
        "--chunk",
        "64K",
        "--qd",
        "2",
        "--io-timeout",
        io_timeout,
    ]);
    let p = vm_common::Proc::spawn(&args, tag);
    let t = std::time::Instant::now();
    loop {
        let done = (backing_sectors_written() - start) * 512;
        if done >= MIN_WRITTEN {
            assert!(
                done < LEN,
                "the copy wrote all {done} bytes before the fault: it must be slower for this test to mean anything"
            );
            println!("fault after {done} bytes written by the target");
            return p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the copy never got going: {}",
            p.so_far()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[ignore = "needs the VM"]
fn guest_e_port_removed_mid_copy_and_back_recovers() {
    ensure_target();
    // The namespace is zeroed first, so that a chunk the recovery lost shows on the host
    // (host_tcp_namespace_holds_the_source).
    let run = nvcopy_for(
        &strings(&["zero", "--to", &format!("{}@0+32M", tcp(NQN, 4420))]),
        Duration::from_secs(300),
    );
    assert!(run.status.success(), "{run}");
    let p = copy_in_flight("30", "port-back");
    nvmet(&["port-off", NQN]);
    // Long enough for the copy to find the connections gone and for a few refused
    // reconnects.
    std::thread::sleep(Duration::from_secs(2));
    nvmet(&["port-on", NQN]);
    let run = p.wait(Duration::from_secs(400));
    assert!(
        run.status.success(),
        "the copy did not survive the port's absence: {run}"
    );
    let v = json(&run);
    assert_eq!(v["bytes_ok"], LEN, "{run}");
    let dev = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| {
            d["name"]
                .as_str()
                .unwrap_or_default()
                .starts_with("nvme+tcp://")
        })
        .unwrap_or_else(|| panic!("no TCP device: {run}"))
        .clone();
    let reconnects: u64 = dev["facts"]["reconnects"]
        .as_str()
        .unwrap_or_else(|| panic!("no reconnects fact: {run}"))
        .parse()
        .unwrap();
    assert!(reconnects >= 1, "the copy never reconnected: {run}");
    println!("recovered with {reconnects} reconnect(s)");
    std::process::Command::new("sync").status().unwrap();
}

#[test]
#[ignore = "needs the VM"]
fn guest_f_port_removed_for_good_fails_clearly() {
    ensure_target();
    let p = copy_in_flight("3", "port-gone");
    nvmet(&["port-off", NQN]);
    let run = p.wait(Duration::from_secs(120));
    nvmet(&["port-on", NQN]);
    assert_eq!(run.status.code(), Some(1), "{run}");
    // With --json the job's first error is in the summary.
    let first = json(&run)["first_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for w in ["127.0.0.1:4420", "could not be made again", "--io-timeout"] {
        assert!(first.contains(w), "first_error lacks {w:?}: {run}");
    }
    // The copy gave up about --io-timeout after the port went: not at once, and not
    // after the 30 s default.
    assert!(run.secs < 60.0, "{run}");
    println!("failed as expected: {first}");
}

// ---------------------------------------------------------------------------------------
// The kernel's own NVMe/TCP initiator (nvme-tcp, driven by Debian's nvme-cli) on the same
// target, both ways: it reads what nvcopy wrote, and nvcopy reads what it wrote.
// ---------------------------------------------------------------------------------------

/// The host NQN the kernel initiator connects with (nvme-cli has no /etc/nvme/hostnqn in
/// the guest).
const KINIT_HOSTNQN: &str = "nqn.2026-12.io.nvcopy:vm-tcp-kernel-initiator";
/// Where the kernel initiator writes [`kinit_pattern`] on the TCP namespace ...
const KINIT_TCP_AT: u64 = 32 * MIB;
/// ... and where nvcopy copies it to on the VFIO destination.
const KINIT_DEST_AT: u64 = 64 * MIB;

/// `len` bytes that nothing else in the suite writes: a splitmix64 stream, made the same
/// way in the guest (to write) and on the host (to compare).
fn kinit_pattern(len: u64) -> Vec<u8> {
    let mut x: u64 = 0x6b69_6e69_745f_7463; // any fixed seed
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// Runs a guest command, which must succeed; its stdout and stderr.
fn must(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}: {text}",
        out.status
    );
    text
}

/// `nvme<N>n<M>`: a namespace's block device (a multipath head, or a namespace of a
/// controller without multipath), not a path device `nvme<N>c<C>n<M>`.
fn is_namespace_blockdev(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let Some((a, b)) = rest.split_once('n') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    digits(a) && digits(b)
}

fn sysfs(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The kernel's NVMe controllers and subsystems as sysfs shows them: name, NQN,
/// transport and entries, for failure messages.
fn nvme_sysfs_report() -> String {
    let mut r = String::new();
    for class in ["/sys/class/nvme", "/sys/class/nvme-subsystem"] {
        for e in std::fs::read_dir(class).into_iter().flatten().flatten() {
            let dir = e.path();
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|n| n.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nvme"))
                .collect();
            names.sort();
            r += &format!(
                "{} subsysnqn={} transport={} {names:?}\n",
                dir.display(),
                sysfs(&dir.join("subsysnqn")),
                sysfs(&dir.join("transport"))
            );
        }
    }
    r
}

/// The block device of the namespace that the kernel reaches through subsystem `nqn`:
/// found by the subsystem NQN in sysfs, because the local PCIe controllers are nvme0..
/// as well. None until exactly one is there.
fn kernel_blockdev_of(nqn: &str) -> Option<String> {
    let mut found = Vec::new();
    for class in ["/sys/class/nvme-subsystem", "/sys/class/nvme"] {
        for e in std::fs::read_dir(class).into_iter().flatten().flatten() {
            let dir = e.path();
            if sysfs(&dir.join("subsysnqn")) != nqn {
                continue;
            }
            for n in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = n.file_name().to_string_lossy().into_owned();
                if is_namespace_blockdev(&name)
                    && std::path::Path::new(&format!("/dev/{name}")).exists()
                {
                    found.push(format!("/dev/{name}"));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    (found.len() == 1).then(|| found.remove(0))
}

/// Names of the controllers the kernel has for `nqn` over TCP.
fn kernel_tcp_controllers(nqn: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/nvme")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            sysfs(&e.path().join("subsysnqn")) == nqn && sysfs(&e.path().join("transport")) == "tcp"
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A kernel initiator connection to [`NQN`], disconnected on drop if the test did not
/// do so itself (a failed assertion), so that later tests find no kernel host attached.
struct KernelInitiator {
    connected: bool,
}

impl KernelInitiator {
    fn connect() -> Self {
        let out = must(
            "nvme",
            &[
                "connect",
                "-t",
                "tcp",
                "-a",
                "127.0.0.1",
                "-s",
                "4420",
                "-n",
                NQN,
                "--hostnqn",
                KINIT_HOSTNQN,
            ],
        );
        println!("nvme connect: {}", out.trim());
        KernelInitiator { connected: true }
    }

    fn disconnect(&mut self) {
        self.connected = false;
        let out = must("nvme", &["disconnect", "-n", NQN]);
        println!("nvme disconnect: {}", out.trim());
        assert!(
            out.contains("disconnected 1 controller"),
            "nvme disconnect -n {NQN}: {out}"
        );
    }
}

impl Drop for KernelInitiator {
    fn drop(&mut self) {
        if self.connected {
            let _ = std::process::Command::new("nvme")
                .args(["disconnect", "-n", NQN])
                .status();
        }
    }
}

#[test]
#[ignore = "needs the VM"]
fn guest_d_kernel_initiator_cross_check() {
    ensure_target();
    let mut kernel = KernelInitiator::connect();
    let ctrls = kernel_tcp_controllers(NQN);
    assert_eq!(
        ctrls.len(),
        1,
        "one kernel TCP controller for {NQN} after nvme connect, got {ctrls:?}:\n{}",
        nvme_sysfs_report()
    );
    // The namespace's block device appears once the kernel has scanned it.
    let t0 = std::time::Instant::now();
    let dev = loop {
        if let Some(d) = kernel_blockdev_of(NQN) {
            break d;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no block device for {NQN} after 60 s:\n{}",
            nvme_sysfs_report()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let name = dev.trim_start_matches("/dev/");
    let sectors: u64 = sysfs(std::path::Path::new(&format!("/sys/block/{name}/size")))
        .parse()
        .unwrap_or(0);
    println!(
        "kernel initiator: {} = {dev}, {} MiB",
        ctrls[0],
        sectors * 512 / MIB
    );
    assert_eq!(
        sectors * 512,
        KINIT_TCP_AT + LEN,
        "{dev} is not the size of the exported tcp.img"
    );

    // nvcopy wrote the source to the TCP namespace's first 32 MiB (guest_a): the kernel
    // initiator reads it back, and the source itself comes through nvcopy into a file
    // (the guest's /tmp is ramfs: no O_DIRECT, hence --buffered).
    let mib = (LEN / MIB).to_string();
    must(
        "dd",
        &[
            &format!("if={dev}"),
            "of=/tmp/kinit-tcp-read.bin",
            "bs=1M",
            &format!("count={mib}"),
            "iflag=direct",
        ],
    );
    let src_copy = "/tmp/kinit-source.bin";
    let _ = std::fs::remove_file(src_copy);
    let run = nvcopy_for(
        &strings(&[
            "copy",
            "--from",
            &format!("{SRC}+{mib}M"),
            "--to",
            src_copy,
            "--buffered",
        ]),
        Duration::from_secs(300),
    );
    assert!(
        run.status.success(),
        "reading the source into {src_copy}: {run}"
    );
    let got = std::fs::read("/tmp/kinit-tcp-read.bin").unwrap();
    let want = std::fs::read(src_copy).unwrap();
    assert_eq!(want.len() as u64, LEN, "{src_copy}");
    if let Some(i) = first_difference(&got, &want) {
        panic!(
            "the kernel initiator reads {dev} (what nvcopy wrote in guest_a) differently from the source: first difference at byte {i}"
        );
    }
    println!("kernel initiator read {mib} MiB that nvcopy wrote: same as the source");
    let _ = std::fs::remove_file("/tmp/kinit-tcp-read.bin");
    let _ = std::fs::remove_file(src_copy);

    // The other way: the kernel initiator writes the pattern at 32 MiB with O_DIRECT and
    // disconnects; nvcopy copies that region to the VFIO destination (checked on the
    // host, with the TCP image itself).
    let pattern = "/tmp/kinit-pattern.bin";
    std::fs::write(pattern, kinit_pattern(LEN)).unwrap();
    must(
        "dd",
        &[
            &format!("if={pattern}"),
            &format!("of={dev}"),
            "bs=1M",
            &format!("seek={}", KINIT_TCP_AT / MIB),
            &format!("count={mib}"),
            "oflag=direct",
        ],
    );
    let _ = std::fs::remove_file(pattern);
    kernel.disconnect();
    let t0 = std::time::Instant::now();
    while !kernel_tcp_controllers(NQN).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the kernel still has a controller for {NQN} 30 s after nvme disconnect:\n{}",
            nvme_sysfs_report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    copy(&[
        "--from",
        &format!("{}/1@{}M+{mib}M", tcp(NQN, 4420), KINIT_TCP_AT / MIB),
        "--to",
        &format!("{DEST}@{}M", KINIT_DEST_AT / MIB),
    ]);
    std::process::Command::new("sync").status().unwrap();
}

// ---------------------------------------------------------------------------------------
// Host tests
// ---------------------------------------------------------------------------------------

fn image(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("NVCOPY_TCP_IMAGES").expect("set NVCOPY_TCP_IMAGES to the image folder");
    PathBuf::from(dir).join(name)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_tcp_namespace_holds_the_source() {
    let want = read_at(&image("source.img"), 0, LEN);
    assert_same(&read_at(&image("tcp.img"), 0, LEN), &want, "tcp.img");
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_vfio_destination_holds_the_fanout_and_the_copy_back() {
    let want = read_at(&image("source.img"), 0, LEN);
    assert_same(
        &read_at(&image("dest.img"), 0, LEN),
        &want,
        "dest.img at 0 (fan-out)",
    );
    assert_same(
        &read_at(&image("dest.img"), LEN, LEN),
        &want,
        "dest.img at 32 MiB (from the TCP namespace)",
    );
}

#[test]
#[ignore = "needs the images of a finished guest run"]
fn host_kernel_initiator_writes_reach_tcp_and_nvcopy_copies_them() {
    let want = kinit_pattern(LEN);
    assert_same(
        &read_at(&image("tcp.img"), KINIT_TCP_AT, LEN),
        &want,
        "tcp.img at 32 MiB (written by the kernel initiator)",
    );
    assert_same(
        &read_at(&image("dest.img"), KINIT_DEST_AT, LEN),
        &want,
        "dest.img at 64 MiB (nvcopy's copy from the TCP namespace at 32 MiB)",
    );
}
