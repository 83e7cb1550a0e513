//! The driver brought up against the software controller, for the benches: one
//! controller with a sparse 512-byte-LBA namespace, one I/O queue pair and a 4 KiB DMA
//! buffer per slot.

use nvcopy_nvme::{ControllerOptions, DataPtr, IoQpair, Namespace};
use nvcopy_nvme_sim::{NamespaceConfig, SimConfig};
use nvcopy_vfio::DmaBuf;

/// Bytes per I/O.
pub const IO_BYTES: usize = 4096;

pub struct Rig {
    // Kept alive for the queue pair; the benches never touch it directly.
    _dev: nvcopy_testkit::Rig,
    pub ns: Namespace,
    pub q: IoQpair,
    pub bufs: Vec<DmaBuf>,
    lbas: u64,
    next: u64,
}

impl Rig {
    /// A controller whose queue pair holds `depth` commands in flight.
    pub fn new(depth: usize) -> Rig {
        // 64 MiB namespace: reads of never-written LBAs return zeroes without a copy of
        // a backing store, so the controller's own work per read stays small and steady.
        // NVCOPY_IO_SHADOW=0: a controller without Doorbell Buffer Config, so that every
        // doorbell is an MMIO store (the default offers it, as QEMU does).
        let shadow = std::env::var("NVCOPY_IO_SHADOW").map_or(true, |v| v != "0");
        let dev = nvcopy_testkit::Rig::with(
            SimConfig::new()
                .doorbell_buffer(shadow)
                .namespace(NamespaceConfig::new(512, 1 << 17)),
            32 << 20,
            ControllerOptions::default(),
        );
        let ns = dev.ns(1);
        // A ring of the engine's default size (EngineOptions::queue_entries), as the
        // copier's queues are: costs that depend on the ring (the CQ head is reported
        // once per half ring) come out as they do in a copy.
        let q = dev.qpair_of((depth + 1).max(1024) as u16);
        let bufs = (0..depth).map(|_| dev.buf(IO_BYTES)).collect();
        let lbas = ns.blocks;
        Rig {
            _dev: dev,
            ns,
            q,
            bufs,
            lbas,
            next: 0,
        }
    }

    /// Posts a 4 KiB read into buffer `slot`, at the next LBA (sequential, wrapping).
    #[inline(always)]
    pub fn submit(&mut self, slot: usize) {
        let step = (IO_BYTES / 512) as u64;
        let lba = self.next;
        self.next = if lba + 2 * step > self.lbas {
            0
        } else {
            lba + step
        };
        let data = DataPtr::Contig {
            iova: self.bufs[slot].iova(),
            len: IO_BYTES,
        };
        self.q
            .submit_read(&self.ns, lba, data, slot as u64)
            .expect("submit_read");
    }

    /// Reaps completions until `n` have come back; returns the last token.
    #[inline(always)]
    pub fn reap(&mut self, n: usize) -> u64 {
        let mut got = 0;
        let mut token = 0;
        while got < n {
            got += self
                .q
                .poll(n - got, |c| {
                    debug_assert!(c.status.is_success());
                    token = c.token;
                })
                .expect("poll");
        }
        token
    }
}
