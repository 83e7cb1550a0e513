//! Depth as bytes in flight (EngineOptions::inflight): a reactor keeps at most
//! inflight / chunk chunks of a job in flight, whatever its slot count, counted at the
//! endpoint by a device that holds every command until the next poll.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvcopy::endpoint::{
    Caps, Command, Device, Done, Endpoint, MediaId, Recovery, Refused, Volume, MAX_CHUNK,
};
use nvcopy::{Client, Engine, EngineOptions, Flags, Region};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 4096; // 16 MiB

/// A device of no storage that counts its commands in flight.
struct Counting {
    name: &'static str,
    now: AtomicUsize,
    most: AtomicUsize,
}

impl Device for Counting {
    fn name(&self) -> &str {
        self.name
    }
    fn volume(&self, _id: u32) -> nvcopy::Result<Volume> {
        Ok(Volume {
            index: 0,
            id: 1,
            block_size: BLOCK as u32,
            blocks: BLOCKS,
            zone_blocks: None,
        })
    }
    fn caps(&self) -> Caps {
        Caps {
            max_transfer: MAX_CHUNK,
            ..Default::default()
        }
    }
    fn media(&self, _v: &Volume) -> MediaId {
        MediaId::default()
    }
    fn io_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
    fn generation(&self) -> u64 {
        0
    }
    fn reset(&self, _seen: u64) {}
    fn max_endpoints(&self) -> usize {
        usize::MAX
    }
    fn open_endpoint(
        &self,
        _pool: &nvcopy_vfio::DmaPool,
        _entries: u16,
    ) -> nvcopy::Result<Box<dyn Endpoint>> {
        Err(nvcopy::error::Refusal::NoControllers.into())
    }
    fn endpoint_dma_bytes(&self, _entries: u16) -> usize {
        0
    }
}

/// One of the two devices of a job, both counting into one `Counting`.
struct Shared(&'static str, Arc<Counting>);

impl Device for Shared {
    fn name(&self) -> &str {
        self.0
    }
    fn volume(&self, id: u32) -> nvcopy::Result<Volume> {
        self.1.volume(id)
    }
    fn caps(&self) -> Caps {
        self.1.caps()
    }
    fn media(&self, v: &Volume) -> MediaId {
        MediaId {
            inode: Some((self.0.len() as u64, 0)),
            ..self.1.media(v)
        }
    }
    fn io_timeout(&self) -> Duration {
        self.1.io_timeout()
    }
    fn generation(&self) -> u64 {
        0
    }
    fn reset(&self, _seen: u64) {}
    fn max_endpoints(&self) -> usize {
        usize::MAX
    }
    fn open_endpoint(
        &self,
        _pool: &nvcopy_vfio::DmaPool,
        _entries: u16,
    ) -> nvcopy::Result<Box<dyn Endpoint>> {
        Ok(Box::new(Held {
            dev: self.1.clone(),
            held: Mutex::new(Vec::new()),
        }))
    }
    fn endpoint_dma_bytes(&self, _entries: u16) -> usize {
        0
    }
}

/// Completes each command at the poll after the one that saw it submitted.
struct Held {
    dev: Arc<Counting>,
    held: Mutex<Vec<Done>>,
}

impl Endpoint for Held {
    fn submit(&mut self, cmd: Command<'_>, token: u64) -> Result<(), Refused> {
        if !matches!(cmd, Command::Flush { .. }) {
            let n = self.dev.now.fetch_add(1, Ordering::Relaxed) + 1;
            self.dev.most.fetch_max(n, Ordering::Relaxed);
        }
        self.held.lock().unwrap().push(Done { token, code: 0 });
        Ok(())
    }
    fn ring(&mut self) {}
    fn poll(&mut self, _max: usize, out: &mut Vec<Done>) -> usize {
        let mut h = self.held.lock().unwrap();
        let n = h.len();
        self.dev.now.fetch_sub(
            n.min(self.dev.now.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        out.append(&mut h);
        n
    }
    fn outstanding(&self) -> usize {
        self.held.lock().unwrap().len()
    }
    fn retry_after(&self, _done: &Done) -> Option<Duration> {
        None
    }
    fn describe(&self, _done: &Done) -> String {
        String::new()
    }
    fn generation(&self) -> u64 {
        0
    }
    fn is_stale(&self) -> bool {
        false
    }
    fn is_usable(&self) -> bool {
        true
    }
    fn expired(&self, _now: Instant) -> Option<String> {
        None
    }
    fn recover(&mut self, out: &mut Vec<Done>) -> Recovery {
        out.append(&mut self.held.lock().unwrap());
        Recovery::Reissue
    }
}

fn most_in_flight(inflight: usize, qd: usize, chunk: usize) -> usize {
    let count = Arc::new(Counting {
        name: "both",
        now: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
    });
    let devices: Vec<Arc<dyn Device>> = vec![
        Arc::new(Shared("src", count.clone())),
        Arc::new(Shared("dst-device", count.clone())),
    ];
    let opts = EngineOptions {
        reactors: 1,
        pin: false,
        qd,
        chunk,
        inflight,
        ..Default::default()
    };
    let engine = Engine::with_devices(devices, nvcopy_testkit::pool(32 << 20), opts).unwrap();
    let client = Client::new(&engine, 4096).unwrap();
    let r = |ctrl| Region {
        ctrl,
        nsid: 1,
        offset: 0,
        len: BLOCK * BLOCKS,
        lba_size: BLOCK as u32,
    };
    let o = client.copy_blocking(&r(0), &[r(1)], Flags::NONE).unwrap();
    assert!(
        !o.read_err && !o.write_err.any() && o.bytes_ok == BLOCK * BLOCKS,
        "{o:?}"
    );
    count.most.load(Ordering::Relaxed)
}

#[test]
fn bytes_in_flight_bound_the_chunks_in_flight_below_the_slot_count() {
    // 32 slots of 128 KiB chunks; 1 MiB in flight allows 8 (reads and writes together).
    let limited = most_in_flight(1 << 20, 32, 128 << 10);
    assert!(
        (2..=8).contains(&limited),
        "{limited} commands in flight for 8 chunks"
    );
    // No byte limit: the slots are the limit, and more than 8 are reached.
    let slots = most_in_flight(0, 32, 128 << 10);
    assert!(
        slots > 8 && slots <= 64,
        "{slots} commands in flight with 32 slots"
    );
    // A limit smaller than one chunk still moves one at a time.
    let one = most_in_flight(4096, 32, 128 << 10);
    assert!(
        (1..=2).contains(&one),
        "{one} commands in flight at a one-chunk limit"
    );
}
