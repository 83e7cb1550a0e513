//! A fixed number of 4 KiB read cycles (submit, ring, poll) against the software
//! controller, for `scripts/callgrind-io.sh`, which counts the instructions of the
//! driver's own submit and completion path under `valgrind --tool=callgrind`.
//!
//! Each phase is a separate never-inlined function so that callgrind can switch
//! collection on for exactly that phase (`--toggle-collect`); the software controller's
//! work happens inside `<SimController as Bar>::write32` (the doorbell stores), which the
//! script toggles off again. Not a criterion bench: run natively it only prints the time
//! per cycle.
//!
//!     NVCOPY_IO_COUNT=100000 target/release/deps/io_count-*     (or: cargo bench --bench io_count)

mod rig;

use std::hint::black_box;
use std::time::Instant;

use rig::Rig;

/// Posts one 4 KiB read (driver: command id, PRPs, tracker, SQ entry).
#[inline(never)]
fn io_submit(rig: &mut Rig) {
    rig.submit(0);
}

/// Rings the SQ tail doorbell (driver: release fence and one MMIO store; the software
/// controller runs the command inside the store).
#[inline(never)]
fn io_ring(rig: &mut Rig) {
    rig.q.ring();
}

/// Reaps the completion (driver: phase tag, acquire fence, CQE, tracker, CQ head doorbell).
#[inline(never)]
fn io_complete(rig: &mut Rig) -> u64 {
    rig.reap(1)
}

fn main() {
    let n: u64 = std::env::var("NVCOPY_IO_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let mut rig = Rig::new(1);
    let t = Instant::now();
    for _ in 0..n {
        io_submit(&mut rig);
        io_ring(&mut rig);
        black_box(io_complete(&mut rig));
    }
    let el = t.elapsed();
    // The script reads this line to know how many cycles ran.
    println!(
        "io_count: cycles={n} ns_per_cycle={:.0}",
        el.as_nanos() as f64 / n.max(1) as f64
    );
}
