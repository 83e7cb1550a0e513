//! The data path makes no syscalls and no per-chunk heap allocations: reactors run under a
//! seccomp filter that kills the process on any syscall but the few needed to sleep when
//! idle, and a counting allocator counts what they allocate. Its own test binary, since a
//! seccomp kill takes the whole process down.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::time::Duration;

use nvcopy::confine::{confine_current_thread, Profile};
use nvcopy::{Client, Engine, EngineOptions, Flags, Region};
use nvcopy_nvme::ControllerOptions;
use nvcopy_nvme_sim::{NamespaceConfig, SimConfig, SimController, ThreadedSim};
use nvcopy_testkit::{bring_up, pattern, CountingAllocator};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn reactors_copy_without_syscalls_or_allocations_per_chunk() {
    let pool = nvcopy_testkit::pool(64 << 20);
    let cfg = SimConfig::new()
        .namespace(NamespaceConfig::new(512, 65536))
        .namespace(NamespaceConfig::new(4096, 8192))
        .namespace(NamespaceConfig::new(512, 65536));
    let dev = ThreadedSim::start(SimController::new(cfg, pool.clone()));
    let ctrl = bring_up("sim0", &dev, &pool, ControllerOptions::default());
    let opts = EngineOptions {
        reactors: 2,
        pin: false,
        qd: 8,
        chunk: 64 << 10,
        reactor_init: Some(Arc::new(|_| {
            // Anything the thread allocates lazily (its malloc arena) comes before counting.
            drop(vec![0u8; 4096]);
            CountingAllocator::count_this_thread();
            confine_current_thread(Profile::DataPath).unwrap();
        })),
        ..Default::default()
    };
    let engine = Engine::new(vec![ctrl], pool, opts).unwrap();
    let client = Client::new(&engine, 256).unwrap();
    let region = |nsid: u32, lba_size: u32| Region {
        ctrl: 0,
        nsid,
        offset: 0,
        len: 16 << 20,
        lba_size,
    };
    let data = pattern(1, 16 << 20);
    dev.sim().write_ns(1, 0, &data).unwrap();

    let copy = || {
        let o = client
            .copy_blocking(
                &region(1, 512),
                &[region(2, 4096), region(3, 512)],
                Flags::NONE,
            )
            .unwrap();
        assert!(
            !o.read_err && !o.write_err.any() && o.bytes_ok == 16 << 20,
            "{o:?}"
        );
    };
    // Warm-up: queue trackers fetch their PRP list pages on first use.
    copy();
    std::thread::sleep(Duration::from_millis(20));

    let before = CountingAllocator::allocations();
    for _ in 0..4 {
        copy();
    }
    let per_run = (CountingAllocator::allocations() - before) as f64 / 4.0;
    // 256 chunks of 64 KiB per run, each read once and written twice.
    assert!(
        per_run < 1.0,
        "reactors allocated {per_run} times per 256-chunk job"
    );

    for nsid in [2u32, 3] {
        let mut got = vec![0u8; 16 << 20];
        dev.sim().read_ns(nsid, 0, &mut got).unwrap();
        assert!(got == data, "namespace {nsid} differs");
    }
    drop(client);
    drop(engine);
}
