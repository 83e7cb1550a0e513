//! Where a reactor runs and what it may ask of the kernel. A reactor is pinned to one core
//! (one reactor per core, as SPDK's are), and in production it runs under a seccomp filter
//! built with rust-vmm's `seccompiler`, as Firecracker confines its vCPU threads: the
//! data path makes no syscalls at all, so the filter allows only what a reactor does
//! when it is idle, recovering a controller, or exiting. Anything else kills the process
//! with SIGSYS (`--no-seccomp` turns the filter off, for debugging).
//!
//! mprotect is allowed only without PROT_EXEC: glibc grows a thread's own heap (a
//! non-main arena, reserved PROT_NONE) with mprotect, and a reactor's error paths
//! allocate, but memory never becomes executable. Endpoints still allocate what their
//! commands need when they are opened, so that the data path does not allocate at all.
//!
//! Socket calls (sendmsg, recvmsg, shutdown) are allowed only on reactors of an engine
//! with an NVMe/TCP device ([`Profile::ReactorTcp`]); no reactor may create or connect a
//! socket: the NVMe/TCP controller's own thread makes every connection.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which set of syscalls a thread keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Only sleeping, waking, the clock and thread exit: what the steady-state data path
    /// needs (none at all while it has work) plus idling. Used by the test that proves it.
    DataPath,
    /// [`Profile::DataPath`] plus io_uring_enter, which an io_uring endpoint makes when
    /// the ring has no SQPOLL thread (once per batch) or when that thread went to sleep
    /// after an idle second (once to wake it), and close, for the rings at exit; and the
    /// socket calls of an NVMe/TCP endpoint (sendmsg, recvmsg, and shutdown when a
    /// connection ends).
    DataPathRing,
    /// [`Profile::DataPath`] plus the io_uring calls of [`Profile::DataPathRing`], plus
    /// what recovery and teardown need: memory for error messages, PCI config space reads
    /// and writes (bus mastering off), closing a device, and writing a panic message to
    /// stderr. No socket calls.
    Reactor,
    /// [`Profile::Reactor`] plus an NVMe/TCP endpoint's socket calls.
    ReactorTcp,
}

impl Profile {
    /// The production profile of a reactor: [`Profile::ReactorTcp`] when `sockets`.
    pub fn reactor(sockets: bool) -> Profile {
        if sockets {
            Profile::ReactorTcp
        } else {
            Profile::Reactor
        }
    }

    fn is_reactor(self) -> bool {
        matches!(self, Profile::Reactor | Profile::ReactorTcp)
    }
}

/// Syscalls a polling thread may make while idle or exiting: sleeping and waking (futex,
/// sched_yield, nanosleep), reading the clock when the vDSO cannot, and thread teardown.
const IDLE: &[libc::c_long] = &[
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What a reactor needs beyond [`IDLE`], off the data path.
const RECOVERY: &[libc::c_long] = &[
    libc::SYS_mmap,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
];

/// The filter of `profile`, compiled for this machine's architecture.
pub fn filter(profile: Profile) -> Result<BpfProgram, seccompiler::Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        IDLE.iter().map(|&nr| (nr, Vec::new())).collect();
    if profile != Profile::DataPath {
        rules.insert(libc::SYS_io_uring_enter, Vec::new());
        // A ring is a descriptor: the reactor unregisters its file and buffers, then
        // closes it, when it exits.
        rules.insert(libc::SYS_close, Vec::new());
        rules.insert(libc::SYS_io_uring_register, Vec::new());
        // Dropping an owned descriptor (an NVMe/TCP queue's socket, replaced on a
        // reconnect or closed at exit) runs std's fcntl(fd, F_GETFD) check that it is
        // still open, in builds with debug assertions: that query only.
        let getfd = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::F_GETFD as u64,
        )?;
        rules.insert(libc::SYS_fcntl, vec![SeccompRule::new(vec![getfd])?]);
    }
    if matches!(profile, Profile::DataPathRing | Profile::ReactorTcp) {
        // An NVMe/TCP endpoint's non-blocking socket calls (crate::endpoint::tcp).
        rules.insert(libc::SYS_sendmsg, Vec::new());
        rules.insert(libc::SYS_recvmsg, Vec::new());
        rules.insert(libc::SYS_shutdown, Vec::new());
    }
    if profile.is_reactor() {
        rules.extend(RECOVERY.iter().map(|&nr| (nr, Vec::new())));
        // glibc grows a thread's malloc arena by mprotect-ing more of its reserved heap
        // read-write (an error message on a failing drive may be the allocation that
        // needs it): allowed, but never to make memory executable.
        let no_exec = SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?;
        rules.insert(libc::SYS_mprotect, vec![SeccompRule::new(vec![no_exec])?]);
        // Let through here, and answered with EACCES by `open_refusal` stacked on top:
        // glibc's malloc reads /proc/sys/vm/overcommit_memory the first time it shrinks a
        // thread's heap, and copes when it cannot. A reactor opens nothing else.
        rules.insert(libc::SYS_openat, Vec::new());
        // A panic message, and nothing else, may be written: to stderr.
        let stderr = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, 2)?;
        rules.insert(libc::SYS_write, vec![SeccompRule::new(vec![stderr])?]);
    }
    let arch: TargetArch = std::env::consts::ARCH.try_into()?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    filter.try_into().map_err(seccompiler::Error::Backend)
}

/// A filter that fails openat with EACCES and allows everything else, stacked over the
/// reactor filter (which lets openat through): of two filters the kernel takes the
/// stricter answer, so openat fails instead of killing the process.
fn open_refusal() -> Result<BpfProgram, seccompiler::Error> {
    let arch: TargetArch = std::env::consts::ARCH.try_into()?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_openat, Vec::new())].into();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )?;
    filter.try_into().map_err(seccompiler::Error::Backend)
}

/// Confines the calling thread to `profile` for the rest of its life (other threads are
/// not affected).
pub fn confine_current_thread(profile: Profile) -> Result<(), seccompiler::Error> {
    if profile.is_reactor() {
        // Installed first: the reactor filter allows no seccomp or prctl calls, so
        // nothing can be installed after it. Both are in place before any work.
        seccompiler::apply_filter(&open_refusal()?)?;
    }
    seccompiler::apply_filter(&filter(profile)?)
}

/// Pins the calling thread to the `i`th CPU this process may run on (modulo their
/// number). A placement hint: false when it could not be done.
pub fn pin_current_thread(i: usize) -> bool {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => core_affinity::set_for_current(ids[i % ids.len()]),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_compile_and_the_reactor_one_is_a_superset() {
        let small = filter(Profile::DataPath).map(|p| p.len());
        let big = filter(Profile::Reactor).map(|p| p.len());
        let tcp = filter(Profile::ReactorTcp).map(|p| p.len());
        assert!(
            matches!((&small, &big, &tcp), (Ok(s), Ok(b), Ok(t)) if b > s && t > b),
            "{small:?} {big:?} {tcp:?}"
        );
    }

    #[test]
    fn a_confined_thread_still_sleeps_and_pins() {
        // A forbidden syscall would kill the test process: only allowed ones are made
        // (tests/engine_confined.rs proves that a forbidden one is caught).
        let pinned = std::thread::spawn(|| {
            let pinned = pin_current_thread(0);
            confine_current_thread(Profile::Reactor).map(|()| {
                std::thread::sleep(std::time::Duration::from_millis(1));
                std::thread::yield_now();
                pinned
            })
        })
        .join();
        assert!(matches!(pinned, Ok(Ok(_))), "{pinned:?}");
    }
}
