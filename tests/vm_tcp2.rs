//! NVMe/TCP between two guests, closer to the real case than tests/vm_tcp.rs's single
//! guest on 127.0.0.1: one guest is the target (nvmet-tcp exports its drive on
//! 10.77.0.1:4420), the other runs nvcopy (10.77.0.2) and copies a VFIO drive to that
//! namespace and back. The guests' virtio-net NICs are joined by a QEMU socket network
//! on the host's loopback (`scripts/vm.sh --net`).
//!
//! `scripts/test.sh` prepares the images with `scripts/vm-tcp2-suite.sh prepare DIR` and
//! boots both guests with `scripts/vm-tcp2-suite.sh run DIR` (which owns the layout):
//!
//! | guest  | device               | image (in DIR) | size   | notes                        |
//! |--------|----------------------|----------------|--------|------------------------------|
//! | target | 0000:00:10.0, kernel | target.img     | 64 MiB | exported as namespace 1 of [`NQN`]; the source at 0 |
//! | nvcopy | 0000:00:10.0, vfio   | source.img     | 32 MiB | random: the source           |
//! | nvcopy | 0000:00:11.0, vfio   | back.img       | 32 MiB | the copy back from the target |
//!
//! The target guest runs `target_` (exports, then waits for the nvcopy guest's "done" on
//! 10.77.0.1:5555), the nvcopy guest the `guest_` tests, in order; its last one sends
//! "done" whatever the others did, so the target never waits out its deadline when the
//! copier failed. After both guests exited, `cargo test --test vm_tcp2 -- --ignored host_`
//! with NVCOPY_TCP2_IMAGES=DIR compares the images with source.img byte for byte.
//!
//! By hand, from the repository root (as root):
//!
//! ```sh
//! D=vm-work/tcp2-images
//! scripts/vm-tcp2-suite.sh prepare $D && scripts/vm-tcp2-suite.sh run $D --timeout 600
//! NVCOPY_TCP2_IMAGES=$D cargo test --test vm_tcp2 -- --ignored host_
//! ```

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod vm_common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_common::{first_difference, json, nvcopy_for, nvmet, ok, read_at, setup_sh, strings, Run};

const MIB: u64 = 1 << 20;
const LEN: u64 = 32 * MIB;
/// target.img's size (scripts/vm-tcp2-suite.sh).
const TARGET_LEN: u64 = 64 * MIB;

const NQN: &str = "nqn.2026-12.io.nvcopy:vm-tcp2";
/// The target guest's address and NVMe/TCP port (`--net ...,ip=10.77.0.1/24`).
const TARGET_ADDR: &str = "10.77.0.1";
const TARGET_PORT: &str = "4420";
/// Where the target guest waits for the nvcopy guest's "done".
const DONE_PORT: u16 = 5555;

/// In the nvcopy guest.
const SRC: &str = "0000:00:10.0";
const BACK: &str = "0000:00:11.0";
/// In the target guest (on the kernel nvme driver: the suite boots it with --no-bind).
const BACKING: &str = "0000:00:10.0";

fn url() -> String {
    format!("nvme+tcp://{TARGET_ADDR}:{TARGET_PORT}/{NQN}")
}

/// Seconds from the environment variable `name`, or `default`.
fn secs_from_env(name: &str, default: u64) -> Duration {
    let s = std::env::var(name).ok();
    Duration::from_secs(s.and_then(|s| s.parse().ok()).unwrap_or(default))
}

// ---------------------------------------------------------------------------------------
// The target guest
// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs the target guest of scripts/vm-tcp2-suite.sh"]
fn target_exports_until_done() {
    let dev = setup_sh(&["blockdev", BACKING]).trim().to_string();
    // By hand, `run DIR --env NVCOPY_TCP2_EXPORT_DELAY_SECS=20` makes the nvcopy guest
    // wait for the export (guest_a's retries); the suite leaves it at 0.
    let delay = secs_from_env("NVCOPY_TCP2_EXPORT_DELAY_SECS", 0);
    if !delay.is_zero() {
        println!("target: exporting in {delay:?}");
        std::thread::sleep(delay);
    }
    print!("{}", nvmet(&["up", &dev, NQN, TARGET_ADDR, TARGET_PORT]));
    let listener = TcpListener::bind((TARGET_ADDR, DONE_PORT)).unwrap();
    listener.set_nonblocking(true).unwrap();
    println!("target: waiting for \"done\" on {TARGET_ADDR}:{DONE_PORT}");
    let limit = secs_from_env("NVCOPY_TCP2_WAIT_SECS", 480);
    let t = Instant::now();
    let (stream, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    t.elapsed() < limit,
                    "no \"done\" from the nvcopy guest within {limit:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("accept on port {DONE_PORT}: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    println!(
        "target: {peer} said {:?} after {:.1} s",
        line.trim(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(line.trim(), "done", "from {peer}");
    // Taking the export down must work with the copier's sessions gone.
    print!("{}", nvmet(&["down", NQN]));
    (&stream).write_all(b"bye\n").unwrap();
    std::process::Command::new("sync").status().unwrap();
}

// ---------------------------------------------------------------------------------------
// The nvcopy guest
// ---------------------------------------------------------------------------------------

/// A successful copy with `--json`: the whole source moved, the TCP device listed.
fn copy(args: &[&str]) -> Run {
    let mut a = strings(&["copy", "--json"]);
    a.extend(strings(args));
    let run = nvcopy_for(&a, Duration::from_secs(400));
    assert!(run.status.success(), "expected success: {run}");
    let v = json(&run);
    let names: Vec<&str> = v["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices: {run}"))
        .iter()
        .map(|d| d["name"].as_str().unwrap_or_default())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("nvme+tcp://")),
        "no NVMe/TCP device in the summary: {run}"
    );
    assert_eq!(v["bytes_ok"], LEN, "{run}");
    println!(
        "copied {LEN} bytes in {:.1} s: {}",
        run.secs,
        run.stderr.trim()
    );
    run
}

#[test]
#[ignore = "needs the nvcopy guest of scripts/vm-tcp2-suite.sh"]
fn guest_a_discovery_finds_the_export() {
    // The target guest boots next to this one; wait for its export (bounded).
    let limit = secs_from_env("NVCOPY_TCP2_WAIT_SECS", 480);
    let t = Instant::now();
    let args = strings(&[
        "list",
        "--discover",
        &format!("{TARGET_ADDR}:{TARGET_PORT}"),
        "--json",
    ]);
    let mut tries = 0;
    let run = loop {
        tries += 1;
        let run = nvcopy_for(&args, Duration::from_secs(60));
        if run.status.success() {
            break run;
        }
        assert!(
            t.elapsed() < limit,
            "the target did not answer within {limit:?} ({tries} tries); the last: {run}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    println!(
        "target answered after {:.1} s ({tries} tries): {}",
        t.elapsed().as_secs_f64(),
        run.stdout
    );
    let v = json(&run);
    let ours: Vec<&serde_json::Value> = v["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {run}"))
        .iter()
        .filter(|e| e["subnqn"] == NQN)
        .collect();
    assert_eq!(ours.len(), 1, "one entry for {NQN}: {run}");
    assert_eq!(
        (&ours[0]["traddr"], &ours[0]["trsvcid"], &ours[0]["url"]),
        (
            &serde_json::json!(TARGET_ADDR),
            &serde_json::json!(TARGET_PORT),
            &serde_json::json!(url())
        ),
        "{run}"
    );
    // And the namespace, through nvcopy's own host.
    let run = ok(
        &strings(&["identify", &url(), "--json"]),
        Duration::from_secs(60),
    );
    let v = json(&run);
    assert_eq!(v["subnqn"], NQN, "{run}");
    println!("identify: {}", run.stdout);
}

#[test]
#[ignore = "needs the nvcopy guest of scripts/vm-tcp2-suite.sh"]
fn guest_b_copy_over_the_network() {
    // --verify reads the TCP namespace back over the network and compares hashes.
    copy(&["--from", SRC, "--to", &url(), "--verify"]);
}

#[test]
#[ignore = "needs the nvcopy guest of scripts/vm-tcp2-suite.sh"]
fn guest_c_copy_back() {
    copy(&["--from", &format!("{}/1+32M", url()), "--to", BACK]);
    std::process::Command::new("sync").status().unwrap();
}

#[test]
#[ignore = "needs the nvcopy guest of scripts/vm-tcp2-suite.sh"]
fn guest_z_say_done() {
    // Runs after the others (libtest's order with --test-threads=1), failed or not.
    let mut s = TcpStream::connect_timeout(
        &format!("{TARGET_ADDR}:{DONE_PORT}").parse().unwrap(),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("cannot reach the target guest's {TARGET_ADDR}:{DONE_PORT}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"done\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "bye", "the target guest's answer to \"done\"");
}

// ---------------------------------------------------------------------------------------
// On the host, after both guests exited
// ---------------------------------------------------------------------------------------

fn image(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("NVCOPY_TCP2_IMAGES").expect("set NVCOPY_TCP2_IMAGES to the image folder");
    PathBuf::from(dir).join(name)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[test]
#[ignore = "needs the images of a finished scripts/vm-tcp2-suite.sh run"]
fn host_exported_image_holds_the_source_and_nothing_else() {
    let want = read_at(&image("source.img"), 0, LEN);
    assert_same(
        &read_at(&image("target.img"), 0, LEN),
        &want,
        "target.img at 0",
    );
    // The rest of the namespace was never written (the image is sparse, so zeroes).
    let rest = read_at(&image("target.img"), LEN, TARGET_LEN - LEN);
    assert_same(
        &rest,
        &vec![0u8; rest.len()],
        "target.img after 32 MiB (should be untouched)",
    );
}

#[test]
#[ignore = "needs the images of a finished scripts/vm-tcp2-suite.sh run"]
fn host_copy_back_holds_the_source() {
    let want = read_at(&image("source.img"), 0, LEN);
    assert_same(&read_at(&image("back.img"), 0, LEN), &want, "back.img");
}
