//! Reactors under their production seccomp filter (`EngineOptions::seccomp`, on in the
//! CLI): a copy works, and a syscall the filter does not allow, made on a reactor, kills
//! the process with SIGSYS. The second check runs this test binary again as a child, since
//! the kill takes the whole process down.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::Duration;

use common::{ctrl, data, ok, opts, Rig, MIB};
use nvcopy::{Client, EngineOptions, Flags};

const CHILD: &str = "NVCOPY_SECCOMP_CHILD";

fn confined(init: Option<nvcopy::engine::ReactorInit>) -> EngineOptions {
    EngineOptions {
        seccomp: true,
        reactor_init: init,
        ..opts()
    }
}

#[test]
fn a_copy_runs_under_the_reactor_filter() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB); 3])], confined(None));
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dests = [rig.region(0, 2, 0, 2 * MIB), rig.region(0, 3, 0, 2 * MIB)];
    let bytes = data(41, src.len);
    rig.put(&src, &bytes);
    let o = client.copy_blocking(&src, &dests, Flags::NONE).unwrap();
    assert!(ok(&o), "{o:?}");
    for d in &dests {
        assert!(rig.get(d) == bytes);
    }
}

/// A reactor whose malloc arena must grow (glibc mprotects more of a thread arena's heap)
/// survives its filter: the error paths allocate messages on reactors. Executable memory
/// stays forbidden (checked in a child, like the test below).
#[test]
fn a_reactor_may_grow_its_heap_but_not_make_memory_executable() {
    if std::env::var_os(CHILD).is_some_and(|v| v == "exec") {
        let init: nvcopy::engine::ReactorInit = Arc::new(|_| {
            let page = vec![0u8; 1 << 16];
            let at = (page.as_ptr() as usize + 4095) & !4095;
            // SAFETY: a page inside `page`, made executable: the filter must kill first.
            unsafe {
                libc::mprotect(
                    at as *mut libc::c_void,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                )
            };
        });
        let _rig = Rig::new(vec![ctrl(&[(512, MIB)])], confined(Some(init)));
        std::thread::sleep(Duration::from_secs(5));
        println!("PROT_EXEC was allowed");
        return;
    }
    // Many small live allocations on a confined reactor: its arena grows well past the
    // first heap's committed part.
    let init: nvcopy::engine::ReactorInit = Arc::new(|_| {
        let keep: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 8192]).collect();
        assert_eq!(keep.iter().map(|v| v.len()).sum::<usize>(), 4096 * 8192);
    });
    let rig = Rig::new(vec![ctrl(&[(512, MIB); 2])], confined(Some(init)));
    let client = Client::new(&rig.engine, 64).unwrap();
    let (src, dst) = (rig.region(0, 1, 0, MIB), rig.region(0, 2, 0, MIB));
    let o = client.copy_blocking(&src, &[dst], Flags::NONE).unwrap();
    assert!(ok(&o), "{o:?}");
    let me = std::env::current_exe().unwrap();
    let out = std::process::Command::new(me)
        .args([
            "--exact",
            "a_reactor_may_grow_its_heap_but_not_make_memory_executable",
            "--nocapture",
        ])
        .env(CHILD, "exec")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "PROT_EXEC on a reactor: {out:?}"
    );
}

#[test]
fn a_forbidden_syscall_on_a_reactor_kills_the_process() {
    if std::env::var_os(CHILD).is_some() {
        // The child: a reactor that opens a file after its filter is on.
        let init: nvcopy::engine::ReactorInit = Arc::new(|_| {
            let _ = std::fs::metadata("/");
        });
        let _rig = Rig::new(vec![ctrl(&[(512, MIB)])], confined(Some(init)));
        std::thread::sleep(Duration::from_secs(5));
        println!("the forbidden syscall was allowed");
        return;
    }
    let me = std::env::current_exe().unwrap();
    let out = std::process::Command::new(me)
        .args([
            "--exact",
            "a_forbidden_syscall_on_a_reactor_kills_the_process",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "the child should die of SIGSYS: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Socket calls are an NVMe/TCP endpoint's: a reactor of an engine without one dies of
/// SIGSYS on the first (shutdown of no socket, which would otherwise fail with EBADF).
#[test]
fn a_reactor_without_nvme_tcp_may_not_use_sockets() {
    if std::env::var_os(CHILD).is_some_and(|v| v == "socket") {
        let init: nvcopy::engine::ReactorInit = Arc::new(|_| {
            // SAFETY: shutdown on a descriptor that does not exist touches no memory.
            // (Printing here would itself be killed: a reactor writes only to stderr.)
            let _ = unsafe { libc::shutdown(-1, libc::SHUT_RDWR) };
        });
        let _rig = Rig::new(vec![ctrl(&[(512, MIB)])], confined(Some(init)));
        std::thread::sleep(Duration::from_secs(5));
        println!("the socket call was allowed");
        return;
    }
    let me = std::env::current_exe().unwrap();
    let out = std::process::Command::new(me)
        .args([
            "--exact",
            "a_reactor_without_nvme_tcp_may_not_use_sockets",
            "--nocapture",
        ])
        .env(CHILD, "socket")
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "a socket call on a reactor without NVMe/TCP: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}
