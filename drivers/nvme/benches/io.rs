//! Driver cost per I/O against the software controller (nvcopy-nvme-sim): submit, ring and
//! complete a 4 KiB read, one at a time (QD1) and in batches of 32 with one doorbell per
//! batch. The time includes the software controller's own work, which runs inside the
//! doorbell store; `scripts/callgrind-io.sh` counts the driver's instructions alone.
//!
//!     cargo bench -p nvcopy-nvme --bench io
//!
//! The copier's per-chunk overhead (engine, reactors) gets its own bench once the engine
//! lands (issue 3); this one measures only the driver layer.

mod rig;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rig::Rig;

fn read_4k(c: &mut Criterion) {
    let mut g = c.benchmark_group("sim_read_4k");
    g.throughput(Throughput::Elements(1));
    let mut rig = Rig::new(1);
    g.bench_function("qd1_submit_ring_poll", |b| {
        b.iter(|| {
            rig.submit(0);
            rig.q.ring();
            black_box(rig.reap(1))
        })
    });
    drop(rig);

    const BATCH: usize = 32;
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut rig = Rig::new(BATCH);
    g.bench_function("qd32_batch_one_doorbell", |b| {
        b.iter(|| {
            for slot in 0..BATCH {
                rig.submit(slot);
            }
            rig.q.ring();
            black_box(rig.reap(BATCH))
        })
    });
    g.finish();
}

criterion_group!(benches, read_4k);
criterion_main!(benches);
