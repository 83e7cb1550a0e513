//! Thread placement and confinement for polling threads: pinning to a core (one reactor
//! per core, as SPDK does), and a per-thread seccomp filter that tests use to prove the
//! data path makes no syscalls.

use std::io;
use std::mem::size_of;

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * size_of::<libc::cpu_set_t>() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: `cpu` was checked to lie inside the set just above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Number of CPUs this process may run on.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Syscalls a polling thread may make while idle or exiting: sleeping and waking
/// (futex, sched_yield, nanosleep), reading the clock when the vDSO cannot, and thread
/// teardown.
pub const IDLE_SYSCALLS: &[libc::c_long] = &[
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

/// Kills the whole process if the calling thread makes any syscall outside `allowed`.
/// Other threads are not affected. Irreversible for this thread.
pub fn restrict_current_thread_syscalls(allowed: &[libc::c_long]) -> io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    // seccomp_data: nr at offset 0, arch at offset 4.
    let mut prog = vec![
        stmt(load, 4),
        jump(AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(load, 0),
    ];
    for &nr in allowed {
        prog.push(jump(nr as u32, 0, 1));
        prog.push(stmt(ret, libc::SECCOMP_RET_ALLOW));
    }
    prog.push(stmt(ret, libc::SECCOMP_RET_KILL_PROCESS));
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `prog`, a live, well-formed BPF program; the kernel copies it.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restricted_thread_still_sleeps_and_pins() {
        // A forbidden syscall would kill the test process, so only allowed ones are made.
        std::thread::spawn(|| {
            pin_current_thread(0).unwrap();
            restrict_current_thread_syscalls(IDLE_SYSCALLS).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
            std::thread::yield_now();
        })
        .join()
        .unwrap();
        assert!(available_cpus() >= 1);
        assert!(pin_current_thread(1 << 20).is_err());
    }
}
