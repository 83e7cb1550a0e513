//! The copier's own cost per chunk, for `scripts/callgrind-copier.sh`: one engine with one
//! reactor copies N chunks 1 -> 1 against the synchronous software controller (which does
//! a command's work inside the doorbell store, so completions are ready at the next poll
//! and the reactor seldom spins idle). Run under callgrind with collection only inside the
//! reactor loop and not inside the controller, the reactor thread's instructions split
//! into the driver's (submit, poll) and the copier's (everything else in the loop).
#![allow(clippy::unwrap_used)] // a measurement harness: a panic is the report

use nvcopy::{Client, Engine, EngineOptions, Flags, Region};
use nvcopy_nvme::ControllerOptions;
use nvcopy_nvme_sim::{NamespaceConfig, SimConfig, SimController};
use nvcopy_testkit::bring_up;

fn main() {
    let chunks: u64 = std::env::var("NVCOPY_CHUNKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let chunk: u64 = 4096;
    let len = chunks * chunk;
    let blocks = len / 512 + 8;
    let pool = nvcopy_testkit::pool(64 << 20);
    let cfg = SimConfig::new()
        .namespace(NamespaceConfig::new(512, blocks))
        .namespace(NamespaceConfig::new(512, blocks));
    let sim = SimController::new(cfg, pool.clone());
    // Touch every page once so that the controller's sparse store does not grow mid-run.
    sim.write_ns(1, 0, &vec![1u8; len as usize]).unwrap();
    sim.write_ns(2, 0, &vec![2u8; len as usize]).unwrap();
    let ctrl = bring_up("sim0", &sim, &pool, ControllerOptions::default());
    let opts = EngineOptions {
        reactors: 1,
        pin: false,
        qd: 16,
        chunk: chunk as usize,
        ..Default::default()
    };
    let engine = Engine::new(vec![ctrl], pool, opts).unwrap();
    let client = Client::new(&engine, 64).unwrap();
    let region = |nsid| Region {
        ctrl: 0,
        nsid,
        offset: 0,
        len,
        lba_size: 512,
    };
    let o = client
        .copy_blocking(&region(1), &[region(2)], Flags::NONE)
        .unwrap();
    assert!(
        !o.read_err && !o.write_err.any() && o.bytes_ok == len,
        "{o:?}"
    );
    println!("chunks={chunks} chunk_bytes={chunk}");
}
