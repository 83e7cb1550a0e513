//! Zoned destinations through the endpoint interface, against a model of a zoned
//! namespace that enforces the ZNS write rule (every write at its zone's write pointer,
//! never across a zone boundary) and counts zone resets; the source is a real file
//! through io_uring. QEMU's zoned NVMe namespace is the end-to-end check (VM suite).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvcopy::client::JobOptions;
use nvcopy::endpoint::file::FileDevice;
use nvcopy::endpoint::{
    Caps, Command, Device, Done, Endpoint, MediaId, Recovery, Refused, Volume, MAX_CHUNK,
};
use nvcopy::error::{Error, Refusal};
use nvcopy::{Client, Engine, EngineOptions, Flags, Region};
use nvcopy_testkit::pattern;
use nvcopy_uring::{Access, Anchor, BlockFile};
use nvcopy_vfio::{DmaPool, PAGE_SIZE};

const BLOCK: u64 = 512;
const ZONE_BLOCKS: u64 = 2048; // 1 MiB zones
const ZONES: u64 = 16;
/// NVMe's Zone Invalid Write status, as the model's failure code.
const ZONE_INVALID_WRITE: u32 = 0x1bc;

struct Media {
    data: Vec<u8>,
    /// Per zone, the write pointer in blocks.
    wp: Vec<u64>,
}

struct ZonedModel {
    media: Mutex<Media>,
    resets: AtomicU64,
    writes: AtomicU64,
    bad_writes: AtomicU64,
}

struct ZonedDevice(Arc<ZonedModel>);

impl Device for ZonedDevice {
    fn name(&self) -> &str {
        "zoned-model"
    }
    fn volume(&self, _id: u32) -> nvcopy::Result<Volume> {
        Ok(Volume {
            index: 0,
            id: 1,
            block_size: BLOCK as u32,
            blocks: ZONES * ZONE_BLOCKS,
            zone_blocks: Some(ZONE_BLOCKS),
        })
    }
    fn caps(&self) -> Caps {
        Caps {
            max_transfer: MAX_CHUNK,
            sequential_writes: true,
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
    fn open_endpoint(&self, pool: &DmaPool, _entries: u16) -> nvcopy::Result<Box<dyn Endpoint>> {
        Ok(Box::new(ZonedEndpoint {
            model: self.0.clone(),
            pool: pool.clone(),
            done: Vec::new(),
        }))
    }
    fn endpoint_dma_bytes(&self, _entries: u16) -> usize {
        0
    }
    fn prepare_writes(&self, _v: &Volume, offset: u64, len: u64) -> nvcopy::Result<()> {
        let mut m = self.0.media.lock().unwrap();
        let (first, end) = (offset / BLOCK / ZONE_BLOCKS, (offset + len) / BLOCK);
        for z in first..end.div_ceil(ZONE_BLOCKS) {
            m.wp[z as usize] = z * ZONE_BLOCKS;
            self.0.resets.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Completes every command at once, in submission order.
struct ZonedEndpoint {
    model: Arc<ZonedModel>,
    pool: DmaPool,
    done: Vec<Done>,
}

impl ZonedEndpoint {
    fn pages(
        &self,
        iovas: &[nvcopy_vfio::Iova],
        len: usize,
        mut each: impl FnMut(usize, nvcopy_vfio::VolatileSlice<'_>),
    ) {
        let mut off = 0;
        for &iova in iovas {
            if off >= len {
                break;
            }
            let n = PAGE_SIZE.min(len - off);
            each(off, self.pool.slice_at(iova, n).unwrap());
            off += n;
        }
    }
}

impl Endpoint for ZonedEndpoint {
    fn submit(&mut self, cmd: Command<'_>, token: u64) -> Result<(), Refused> {
        let code = match cmd {
            Command::Read { at, data, .. } => {
                let m = self.model.media.lock().unwrap();
                let base = at as usize;
                self.pages(data.iovas, data.len, |off, s| {
                    s.copy_from(&m.data[base + off..base + off + s.len()]);
                });
                0
            }
            Command::Write { at, data, .. } => {
                self.model.writes.fetch_add(1, Ordering::Relaxed);
                let mut m = self.model.media.lock().unwrap();
                let (lba, blocks) = (at / BLOCK, data.len as u64 / BLOCK);
                let zone = (lba / ZONE_BLOCKS) as usize;
                let zone_end = (zone as u64 + 1) * ZONE_BLOCKS;
                if m.wp[zone] != lba || lba + blocks > zone_end {
                    self.model.bad_writes.fetch_add(1, Ordering::Relaxed);
                    ZONE_INVALID_WRITE
                } else {
                    m.wp[zone] += blocks;
                    let base = at as usize;
                    let mut tmp = vec![0u8; data.len];
                    self.pages(data.iovas, data.len, |off, s| {
                        s.copy_to(&mut tmp[off..off + s.len()]);
                    });
                    m.data[base..base + data.len].copy_from_slice(&tmp);
                    0
                }
            }
            Command::Flush { .. } => 0,
            other => return Err(Refused::Invalid(format!("{other:?} on the zoned model"))),
        };
        self.done.push(Done { token, code });
        Ok(())
    }
    fn ring(&mut self) {}
    fn poll(&mut self, max: usize, out: &mut Vec<Done>) -> usize {
        let n = max.min(self.done.len());
        out.extend(self.done.drain(..n));
        n
    }
    fn outstanding(&self) -> usize {
        self.done.len()
    }
    fn retry_after(&self, _done: &Done) -> Option<Duration> {
        None
    }
    fn describe(&self, done: &Done) -> String {
        format!(
            "zoned model: code {:#x} (a write off the write pointer)",
            done.code
        )
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
        out.extend(self.done.drain(..).map(|d| Done { code: 1, ..d }));
        Recovery::Reissue
    }
}

struct Setup {
    engine: Engine,
    model: Arc<ZonedModel>,
    data: Vec<u8>,
    path: std::path::PathBuf,
}

fn setup(name: &str, opts: EngineOptions) -> Setup {
    let len = (ZONES * ZONE_BLOCKS * BLOCK) as usize;
    let path = std::env::temp_dir().join(format!("nvcopy-zoned-{}-{name}.img", std::process::id()));
    let data = pattern(21, len);
    std::fs::write(&path, &data).unwrap();
    let file = BlockFile::open(&path, Access::default()).unwrap();
    let model = Arc::new(ZonedModel {
        media: Mutex::new(Media {
            data: vec![0; len],
            // Every zone full: only a reset makes it writable.
            wp: (0..ZONES).map(|z| (z + 1) * ZONE_BLOCKS).collect(),
        }),
        resets: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        bad_writes: AtomicU64::new(0),
    });
    let devices: Vec<Arc<dyn Device>> = vec![
        FileDevice::new(file, Arc::new(Anchor::new(true)), Duration::from_secs(10)),
        Arc::new(ZonedDevice(model.clone())),
    ];
    let engine = Engine::with_devices(devices, nvcopy_testkit::pool(64 << 20), opts).unwrap();
    Setup {
        engine,
        model,
        data,
        path,
    }
}

fn regions(s: &Setup, offset: u64, len: u64) -> (Region, Region) {
    let bs = s.engine.devices()[0].volume(1).unwrap().block_size;
    let src = Region {
        ctrl: 0,
        nsid: 1,
        offset,
        len,
        lba_size: bs,
    };
    let dst = Region {
        ctrl: 1,
        lba_size: BLOCK as u32,
        ..src
    };
    (src, dst)
}

#[test]
fn a_zoned_destination_is_reset_then_written_in_order_twice_in_a_row() {
    let opts = EngineOptions {
        reactors: 2,
        pin: false,
        qd: 16,
        chunk: 128 << 10,
        ..Default::default()
    };
    let s = setup("twice", opts);
    let client = Client::new(&s.engine, 1024).unwrap();
    let len = ZONES * ZONE_BLOCKS * BLOCK;
    let (src, dst) = regions(&s, 0, len);
    for run in 0..2 {
        // No WRITE_SEQUENTIAL given: a zoned destination turns it on.
        let o = client.copy_blocking(&src, &[dst], Flags::NONE).unwrap();
        assert!(
            !o.read_err && !o.write_err.any() && o.bytes_ok == len,
            "run {run}: {o:?}"
        );
        assert_eq!(s.model.bad_writes.load(Ordering::Relaxed), 0, "run {run}");
        assert_eq!(s.model.resets.load(Ordering::Relaxed), ZONES * (run + 1));
        assert!(s.model.media.lock().unwrap().data == s.data, "run {run}");
    }
    // A chunk size that does not divide the zone is cut down to one that does.
    let client2 = Client::new(&s.engine, 1024).unwrap();
    drop(client);
    let (src, dst) = regions(&s, 4 << 20, 4 << 20);
    let writes = s.model.writes.load(Ordering::Relaxed);
    let o = client2.copy_blocking(&src, &[dst], Flags::NONE).unwrap();
    assert!(!o.write_err.any(), "{o:?}");
    assert_eq!(s.model.bad_writes.load(Ordering::Relaxed), 0);
    assert!(s.model.writes.load(Ordering::Relaxed) > writes);
    let _ = std::fs::remove_file(&s.path);
}

#[test]
fn jobs_a_zoned_destination_cannot_take_are_refused_before_any_io() {
    let opts = EngineOptions {
        reactors: 1,
        pin: false,
        qd: 4,
        chunk: 768 << 10,
        ..Default::default()
    };
    let s = setup("refused", opts);
    let client = Client::new(&s.engine, 1024).unwrap();
    let zone = ZONE_BLOCKS * BLOCK;
    let untouched = |what: &str| {
        assert_eq!(
            s.model.resets.load(Ordering::Relaxed),
            0,
            "{what}: a zone was reset"
        );
        assert_eq!(s.model.writes.load(Ordering::Relaxed), 0, "{what}: a write");
    };
    // Not starting at a zone boundary, and not ending at one.
    for (offset, len) in [(zone / 2, zone), (0, zone + zone / 2)] {
        let (src, dst) = regions(&s, offset, len);
        match client.copy(&src, &[dst], Flags::NONE, |_, _| {}) {
            Err(Error::Refused(Refusal::ZoneMisaligned { zone_bytes, .. })) => {
                assert_eq!(zone_bytes, zone)
            }
            other => panic!("{offset}+{len}: {:?}", other.map(|_| ())),
        }
        untouched("misaligned");
    }
    // Zeroing, and resuming from a map.
    let (src, dst) = regions(&s, 0, 2 * zone);
    let e = client
        .zero(&[dst], Flags::NONE, |_, _| {})
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("zone reset"), "{e}");
    let resume = JobOptions {
        only: Some(vec![zone..2 * zone, 0..0]),
        ..Default::default()
    };
    let e = client
        .copy_with(&src, &[dst], Flags::NONE, &resume, |_, _| {})
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("cannot resume"), "{e}");
    untouched("zero and resume");
    // A chunk of 768 KiB does not divide 1 MiB zones: cut to 512 KiB, and it works.
    let o = client.copy_blocking(&src, &[dst], Flags::NONE).unwrap();
    assert!(!o.write_err.any() && o.bytes_ok == 2 * zone, "{o:?}");
    assert_eq!(s.model.bad_writes.load(Ordering::Relaxed), 0);
    assert_eq!(
        s.model.writes.load(Ordering::Relaxed),
        4,
        "2 zones in 512 KiB writes"
    );
    let _ = std::fs::remove_file(&s.path);
}
