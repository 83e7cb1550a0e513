//! The test rig shared by the copier's tests against the software NVMe controller: a DMA
//! pool, software controllers on device threads ([`ThreadedSim`]), the real driver and an
//! engine over them, one rig on the machine at a time.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a part; a panic is the failure report

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nvcopy::{Engine, EngineOptions, Region};
use nvcopy_nvme::ControllerOptions;
use nvcopy_nvme_sim::{NamespaceConfig, SimConfig, SimController, ThreadedSim};
use nvcopy_testkit::bring_up;

pub const MIB: u64 = 1 << 20;

/// Reactors poll without yielding while they have I/O in flight, as SPDK's do; many rigs
/// at once on a 2-core machine would starve each other's device threads. One at a time.
pub static RIG_IN_USE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A turn on the machine; the next rig starts when it drops.
pub struct Turn;

impl Turn {
    pub fn take() -> Turn {
        while RIG_IN_USE.swap(true, Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(2));
        }
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        RIG_IN_USE.store(false, Ordering::Release);
    }
}

pub struct Rig {
    pub engine: Engine,
    pub devs: Vec<Arc<ThreadedSim>>,
    _turn: Turn,
}

impl Rig {
    pub fn new(cfgs: Vec<SimConfig>, opts: EngineOptions) -> Rig {
        Rig::with_timeout(cfgs, opts, Duration::from_millis(300))
    }

    pub fn with_timeout(cfgs: Vec<SimConfig>, opts: EngineOptions, io_timeout: Duration) -> Rig {
        let turn = Turn::take();
        let pool = nvcopy_testkit::pool(96 << 20);
        let mut devs = Vec::new();
        let mut ctrls = Vec::new();
        for (i, cfg) in cfgs.into_iter().enumerate() {
            let dev = ThreadedSim::start(SimController::new(cfg, pool.clone()));
            let copts = ControllerOptions {
                io_timeout,
                admin_timeout: Duration::from_secs(5),
                ..Default::default()
            };
            ctrls.push(bring_up(&format!("sim{i}"), &dev, &pool, copts));
            devs.push(dev);
        }
        Rig {
            engine: Engine::new(ctrls, pool, opts).unwrap(),
            devs,
            _turn: turn,
        }
    }

    pub fn sim(&self, ctrl: usize) -> &Arc<SimController> {
        self.devs[ctrl].sim()
    }

    pub fn region(&self, ctrl: usize, nsid: u32, offset: u64, len: u64) -> Region {
        let v = self.engine.devices()[ctrl].volume(nsid).unwrap();
        Region {
            ctrl,
            nsid,
            offset,
            len,
            lba_size: v.block_size,
        }
    }

    pub fn put(&self, r: &Region, data: &[u8]) {
        self.sim(r.ctrl).write_ns(r.nsid, r.offset, data).unwrap();
    }

    pub fn get(&self, r: &Region) -> Vec<u8> {
        let mut v = vec![0u8; r.len as usize];
        self.sim(r.ctrl).read_ns(r.nsid, r.offset, &mut v).unwrap();
        v
    }

    pub fn io(&self, ctrl: usize, opcode: u8) -> u64 {
        self.sim(ctrl).counters().io_commands(opcode)
    }

    /// Makes every software controller check its DMA writes against `client`'s page
    /// ownership: a write into a page that left its chunk since the command was submitted
    /// is recorded as a violation (see [`Rig::no_violations`]).
    pub fn guard_pages(&self, client: &nvcopy::Client) {
        for d in &self.devs {
            d.sim().set_page_guard(client.page_guard());
        }
    }

    pub fn no_violations(&self) {
        for (i, d) in self.devs.iter().enumerate() {
            let v = d.sim().page_violations();
            assert!(v.is_empty(), "sim{i}: page guard violations: {v:?}");
        }
    }
}

pub fn opts() -> EngineOptions {
    EngineOptions {
        reactors: 2,
        pin: false,
        qd: 8,
        chunk: 64 << 10,
        ..Default::default()
    }
}

pub fn ctrl(namespaces: &[(u32, u64)]) -> SimConfig {
    namespaces
        .iter()
        .fold(SimConfig::new(), |c, &(lbs, bytes)| {
            c.namespace(NamespaceConfig::new(lbs, bytes / lbs as u64))
        })
}

/// [`nvcopy_testkit::pattern`] for a length in bytes as the copier counts them.
pub fn data(seed: u64, len: u64) -> Vec<u8> {
    nvcopy_testkit::pattern(seed, len as usize)
}

pub fn ok(o: &nvcopy::JobOutcome) -> bool {
    !o.read_err && !o.write_err.any() && o.failed_chunks == 0 && o.first_error.is_none()
}
