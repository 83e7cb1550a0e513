//! Test support shared by the driver's and the copier's tests and benches (a
//! dev-dependency only): the real driver brought up against the software controller
//! ([`bring_up`], [`Rig`]), a deterministic data pattern ([`pattern`]) and a global
//! allocator that counts what chosen threads allocate ([`CountingAllocator`]).
//!
//! It stops at the driver: the copier's own rig (an engine over several threaded
//! software controllers) lives with the copier's tests, which build it from these parts,
//! so that nothing under `drivers/` depends on the copier.

mod alloc_count;

use std::sync::Arc;
use std::time::Duration;

use nvcopy_nvme::{Bar, Controller, ControllerOptions, IoQpair, Namespace};
use nvcopy_nvme_sim::{SimConfig, SimController};
use nvcopy_vfio::{DmaBuf, DmaPool};

pub use alloc_count::CountingAllocator;

/// Deterministic, position-dependent bytes (xorshift), different per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Timeouts short enough for tests that wait on them.
pub fn quick() -> ControllerOptions {
    ControllerOptions {
        admin_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_millis(200),
        ..ControllerOptions::default()
    }
}

/// An unmapped DMA pool of `bytes` (the software controller reaches it directly).
///
/// # Panics
/// If the memory cannot be had.
pub fn pool(bytes: usize) -> DmaPool {
    DmaPool::unmapped(bytes).expect("DMA pool")
}

/// Brings the real driver up over `dev` (a [`SimController`] or a
/// [`nvcopy_nvme_sim::ThreadedSim`]) with DMA memory from `pool`.
///
/// # Panics
/// If bring-up fails.
pub fn bring_up<D: Bar + 'static>(
    name: &str,
    dev: &Arc<D>,
    pool: &DmaPool,
    opts: ControllerOptions,
) -> Arc<Controller> {
    Controller::new(name, dev.clone() as Arc<dyn Bar>, pool.clone(), opts)
        .expect("controller comes up")
}

/// One synchronous software controller with the driver brought up over it.
pub struct Rig {
    pub sim: Arc<SimController>,
    pub ctrl: Arc<Controller>,
    pub pool: DmaPool,
}

impl Rig {
    /// A 32 MiB pool and [`quick`] timeouts.
    pub fn new(cfg: SimConfig) -> Rig {
        Rig::with(cfg, 32 << 20, quick())
    }

    /// A pool of `pool_bytes` and the given controller options.
    pub fn with(cfg: SimConfig, pool_bytes: usize, opts: ControllerOptions) -> Rig {
        let pool = pool(pool_bytes);
        let sim = SimController::new(cfg, pool.clone());
        let ctrl = bring_up("sim0", &sim, &pool, opts);
        Rig { sim, ctrl, pool }
    }

    /// Active namespace `nsid`, as the driver identified it.
    pub fn ns(&self, nsid: u32) -> Namespace {
        self.ctrl.namespace(nsid).expect("usable namespace").clone()
    }

    /// An I/O queue pair of 32 entries.
    pub fn qpair(&self) -> IoQpair {
        self.qpair_of(32)
    }

    /// An I/O queue pair of `entries` entries.
    pub fn qpair_of(&self, entries: u16) -> IoQpair {
        self.ctrl.create_io_qpair(entries).expect("I/O queue pair")
    }

    /// A zeroed DMA buffer.
    pub fn buf(&self, len: usize) -> DmaBuf {
        self.pool.alloc_zeroed(len).expect("DMA buffer")
    }

    /// Namespace bytes, read through the controller's backdoor.
    pub fn backdoor(&self, nsid: u32, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.sim.read_ns(nsid, off, &mut v).expect("backdoor read");
        v
    }
}

/// Asks the kernel to make one page of a fresh buffer executable (mprotect with
/// PROT_EXEC), for tests of seccomp filters that must refuse it. Returns mprotect's
/// result; under such a filter the process is killed first.
pub fn mprotect_exec_once() -> i32 {
    let page = vec![0u8; 2 * 4096];
    let at = (page.as_ptr() as usize).next_multiple_of(4096);
    // SAFETY: `at..at + 4096` lies inside `page`, which outlives both calls; nothing
    // touches the page while it is not writable, and its protection is restored below
    // before the buffer goes back to the allocator.
    let r = unsafe {
        libc::mprotect(
            at as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
        )
    };
    // SAFETY: as above; read-write again, as the allocator expects its memory.
    unsafe {
        libc::mprotect(
            at as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    drop(page);
    r
}
