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

/// The same proof with an io_uring endpoint in the job: the software controller's
/// namespace copied to a file and to a second namespace. The reactors may make one
/// syscall besides idling, io_uring_enter (to wake the SQPOLL thread after it slept,
/// or once per batch where SQPOLL is not allowed), and it is counted.
#[test]
fn reactors_copy_to_a_file_without_allocations_and_with_counted_ring_enters() {
    use nvcopy::endpoint::file::FileDevice;
    use nvcopy::endpoint::nvme::NvmeDevice;
    use nvcopy_uring::{Access, Anchor, BlockFile};

    let pool = nvcopy_testkit::pool(64 << 20);
    let cfg = SimConfig::new()
        .namespace(NamespaceConfig::new(512, 65536))
        .namespace(NamespaceConfig::new(512, 65536));
    let dev = ThreadedSim::start(SimController::new(cfg, pool.clone()));
    let ctrl = bring_up("sim0", &dev, &pool, ControllerOptions::default());
    let path = std::env::temp_dir().join(format!("nvcopy-confined-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let access = Access {
        write: true,
        create_len: Some(16 << 20),
        buffered: false,
    };
    let file = FileDevice::new(
        BlockFile::open(&path, access).unwrap(),
        Arc::new(Anchor::new(true)),
        Duration::from_secs(10),
    );
    let opts = EngineOptions {
        reactors: 2,
        pin: false,
        qd: 8,
        chunk: 64 << 10,
        reactor_init: Some(Arc::new(|_| {
            drop(vec![0u8; 4096]);
            CountingAllocator::count_this_thread();
            confine_current_thread(Profile::DataPathRing).unwrap();
        })),
        ..Default::default()
    };
    let devices: Vec<Arc<dyn nvcopy::endpoint::Device>> =
        vec![NvmeDevice::shared(ctrl), file.clone()];
    let engine = Engine::with_devices(devices, pool, opts).unwrap();
    let client = Client::new(&engine, 256).unwrap();
    let data = pattern(2, 16 << 20);
    dev.sim().write_ns(1, 0, &data).unwrap();
    let region = |ctrl: usize, nsid: u32, lba_size: u32| Region {
        ctrl,
        nsid,
        offset: 0,
        len: 16 << 20,
        lba_size,
    };
    let bs = engine.devices()[1].volume(1).unwrap().block_size;
    let copy = || {
        let o = client
            .copy_blocking(
                &region(0, 1, 512),
                &[region(1, 1, bs), region(0, 2, 512)],
                Flags::NONE,
            )
            .unwrap();
        assert!(
            !o.read_err && !o.write_err.any() && o.bytes_ok == 16 << 20,
            "{o:?}"
        );
    };
    copy();
    std::thread::sleep(Duration::from_millis(20));
    let (allocs, enters) = (CountingAllocator::allocations(), file.enters());
    for _ in 0..4 {
        copy();
    }
    let per_run = (CountingAllocator::allocations() - allocs) as f64 / 4.0;
    let chunks = 4 * 256;
    let enters = file.enters() - enters;
    eprintln!(
        "io_uring endpoint: {per_run} allocations per 256-chunk job; {enters} io_uring_enter over {chunks} chunks (sqpoll: {})",
        file.sqpoll()
    );
    assert!(
        per_run < 1.0,
        "reactors allocated {per_run} times per 256-chunk job"
    );
    if file.sqpoll() {
        // The poller thread sleeps only after a second without work.
        assert!(
            enters <= 8,
            "{enters} enters over {chunks} chunks with SQPOLL"
        );
    } else {
        // One per batch: never more than one per chunk written.
        assert!(enters <= chunks, "{enters} enters over {chunks} chunks");
    }
    assert!(std::fs::read(&path).unwrap() == data, "the file");
    drop(client);
    drop(engine);
    let _ = std::fs::remove_file(&path);
}
