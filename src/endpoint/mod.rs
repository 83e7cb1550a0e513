//! The endpoint interface: what a reactor drives, whatever the transport.
//!
//! A [`Device`] is shared by every reactor: an NVMe controller, a file, a kernel block
//! device. Each reactor opens its own [`Endpoint`] on it (an NVMe I/O queue pair, an
//! io_uring ring), so no endpoint is ever shared or locked. The reactor submits commands
//! with a token, rings once a pass, and polls completions into a buffer; it asks the
//! endpoint whether a failed command may be retried and how to describe the failure, and
//! never reads transport status bits itself.
//!
//! Implementations: [`nvme`] (a PCIe controller through VFIO) and [`file`] (files and
//! kernel block devices through io_uring), and [`tcp`] (an NVMe/TCP controller).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_vfio::{DmaBuf, DmaPool, Iova};

use crate::error::Result;

pub mod file;
pub mod nvme;
pub mod tcp;

/// The largest chunk a job moves in one command: 2 MiB, what one NVMe PRP list page
/// describes (512 entries of 4 KiB pages), and what every endpoint accepts.
pub const MAX_CHUNK: usize = 2 << 20;

/// A volume of a device: an NVMe namespace, or the whole file or block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Volume {
    /// The device's own index for it (an endpoint looks it up in O(1)).
    pub index: u32,
    /// Its id as users write it: the namespace id, or 1 for a file.
    pub id: u32,
    /// Bytes per block (a power of two).
    pub block_size: u32,
    /// Capacity in blocks.
    pub blocks: u64,
    /// A zoned volume's zone size in blocks: written only in order from a zone's start,
    /// after a reset ([`Device::prepare_writes`]).
    pub zone_blocks: Option<u64>,
}

/// What a device can do, asked once when a job is planned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    /// Largest transfer one command may carry, bytes.
    pub max_transfer: usize,
    /// Zeroes a range without data (NVMe Write Zeroes, fallocate ZERO_RANGE).
    pub write_zeroes: bool,
    /// Deallocates a range so that it reads back as zeroes (Dataset Management
    /// deallocate, a punched hole, a discard).
    pub deallocate: bool,
    /// Copies within a volume without data movement (NVMe Copy).
    pub copy: bool,
    /// Writes must arrive in order (a zoned volume).
    pub sequential_writes: bool,
}

/// What identifies the media behind a volume, to find two regions that share bytes
/// although they are reached through different devices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MediaId {
    /// NVMe namespace NGUID, when reported.
    pub nguid: Option<[u8; 16]>,
    /// NVMe namespace EUI64, when reported.
    pub eui64: Option<[u8; 8]>,
    /// NVM subsystem NQN and namespace id, when the NQN is reported.
    pub subsystem: Option<(String, u32)>,
    /// A file (device and inode) or a block device (its device number, inode 0).
    pub inode: Option<(u64, u64)>,
}

impl MediaId {
    /// An NVMe namespace's identity, from its Identify data and its subsystem's NQN
    /// (all-zero identifiers and an empty NQN are "not reported").
    pub fn of_nvme_namespace(nguid: [u8; 16], eui64: [u8; 8], nqn: &str, nsid: u32) -> MediaId {
        let reported = |id: &[u8]| id.iter().any(|&x| x != 0);
        MediaId {
            nguid: reported(&nguid).then_some(nguid),
            eui64: reported(&eui64).then_some(eui64),
            subsystem: (!nqn.is_empty()).then(|| (nqn.to_string(), nsid)),
            inode: None,
        }
    }

    /// Whether two volumes are one media: the first identifier both report decides, in
    /// the order NGUID, EUI64, subsystem and namespace id, inode (NVMe base spec 4.7.1:
    /// NGUID and EUI64 are globally unique, nsids are unique within a subsystem). Nothing
    /// in common means "not known to be the same".
    pub fn same(&self, other: &MediaId) -> bool {
        fn pick<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> Option<bool> {
            match (a, b) {
                (Some(a), Some(b)) => Some(a == b),
                _ => None,
            }
        }
        pick(&self.nguid, &other.nguid)
            .or_else(|| pick(&self.eui64, &other.eui64))
            .or_else(|| pick(&self.subsystem, &other.subsystem))
            .or_else(|| pick(&self.inode, &other.inode))
            .unwrap_or(false)
    }
}

/// The generation of a device that cannot be reset (a file, a connection not yet
/// re-established): each recovery moves it on, once for all reactors that saw the same
/// one, so that a job's reset budget counts recoveries as it counts controller resets.
#[derive(Debug, Default)]
pub struct Generation(std::sync::atomic::AtomicU64);

impl Generation {
    /// The current generation.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Moves on from `seen`, unless another caller already did.
    pub fn bump(&self, seen: u64) {
        use std::sync::atomic::Ordering;
        let _ = self
            .0
            .compare_exchange(seen, seen + 1, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// A device every reactor reaches through its own endpoint.
pub trait Device: Send + Sync {
    /// How users and messages name it: a PCI address, a path.
    fn name(&self) -> &str;
    /// The volume users name `id` (a namespace id; 1 for a file).
    fn volume(&self, id: u32) -> Result<Volume>;
    /// What the device can do.
    fn caps(&self) -> Caps;
    /// What identifies the media of `volume`.
    fn media(&self, volume: &Volume) -> MediaId;
    /// Whether its endpoints make socket calls (sendmsg, recvmsg, shutdown), which the
    /// reactors' seccomp filter then allows.
    fn uses_sockets(&self) -> bool {
        false
    }
    /// Whether one Copy of `blocks` blocks fits the volume's limits.
    fn copy_fits(&self, _volume: &Volume, _blocks: u64) -> bool {
        false
    }
    /// How long one command may take, retries included, before the device is judged
    /// stuck.
    fn io_timeout(&self) -> Duration;
    /// Bumped by every reset or recovery: a job's reset budget counts these.
    fn generation(&self) -> u64;
    /// Resets the device after a command timed out under `seen` (the generation the
    /// caller's endpoint belongs to); a reset another caller did since is not repeated.
    fn reset(&self, seen: u64);
    /// Whether the device reports a fatal status (NVMe CSTS.CFS). Costly: an MMIO read.
    fn fatal_status(&self) -> bool {
        false
    }
    /// Tells the device the host is done with it, once every endpoint is closed (NVMe:
    /// the shutdown notification, CC.SHN), before it is closed. Nothing by default.
    fn shutdown(&self) {}
    /// How many endpoints it can give (the I/O queue pairs an NVMe controller granted):
    /// reactors past that many do not reach it.
    fn max_endpoints(&self) -> usize;
    /// Opens one endpoint, for one reactor, of `entries` commands at most, whose data
    /// pages come from `pool`.
    fn open_endpoint(&self, pool: &DmaPool, entries: u16) -> Result<Box<dyn Endpoint>>;
    /// DMA memory one endpoint takes from the pool, at most, for sizing it.
    fn endpoint_dma_bytes(&self, entries: u16) -> usize;
    /// Facts for `--json`, keyed by name.
    fn facts(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// Makes `len` bytes at `offset` of a zoned volume writable from their start, before
    /// a job writes them: checks that every zone there can take a linear copy, then
    /// resets them. Nothing to do for other volumes.
    fn prepare_writes(&self, _volume: &Volume, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
}

/// The data of a read or a write: whole 4 KiB pages of the DMA pool, of which the first
/// `len` bytes are used.
#[derive(Clone, Copy, Debug)]
pub struct Pages<'a> {
    /// Device addresses of the pages.
    pub iovas: &'a [Iova],
    /// Bytes.
    pub len: usize,
}

/// One command. Offsets and lengths are bytes, whole blocks of the volume.
#[derive(Clone, Copy, Debug)]
pub enum Command<'a> {
    /// Read `data.len` bytes at `at`.
    Read {
        /// Volume.
        volume: &'a Volume,
        /// Byte offset.
        at: u64,
        /// Where the data goes.
        data: Pages<'a>,
    },
    /// Write `data.len` bytes at `at`.
    Write {
        /// Volume.
        volume: &'a Volume,
        /// Byte offset.
        at: u64,
        /// The data.
        data: Pages<'a>,
    },
    /// Zero `len` bytes at `at` without data ([`Caps::write_zeroes`]).
    WriteZeroes {
        /// Volume.
        volume: &'a Volume,
        /// Byte offset.
        at: u64,
        /// Bytes.
        len: u64,
    },
    /// Deallocate `len` bytes at `at`; they read back as zeroes ([`Caps::deallocate`]).
    Deallocate {
        /// Volume.
        volume: &'a Volume,
        /// Byte offset.
        at: u64,
        /// Bytes.
        len: u64,
    },
    /// Copy `len` bytes from `from` to `to` within the volume ([`Caps::copy`]); the source
    /// ranges are written into `descs`, a page the caller keeps until completion.
    Copy {
        /// Volume.
        volume: &'a Volume,
        /// Source byte offset.
        from: u64,
        /// Destination byte offset.
        to: u64,
        /// Bytes.
        len: u64,
        /// Descriptor page.
        descs: &'a DmaBuf,
    },
    /// Make every completed write to the volume durable.
    Flush {
        /// Volume.
        volume: &'a Volume,
    },
}

/// A completed command: its token and the endpoint's status code, 0 for success. Only the
/// endpoint that produced it can interpret a non-zero code ([`Endpoint::retry_after`],
/// [`Endpoint::describe`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The token given at submission.
    pub token: u64,
    /// 0: success.
    pub code: u32,
}

impl Done {
    /// Whether the command succeeded.
    #[inline]
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

/// Why a command could not be submitted.
#[derive(Debug)]
pub enum Refused {
    /// No room now: try again after completions.
    Full,
    /// Never, with the reason.
    Invalid(String),
}

/// How an endpoint came out of [`Endpoint::recover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The device is usable again: the aborted commands may be issued again.
    Reissue,
    /// Failed. `quiet`: proven to do no more DMA into the aborted commands' memory.
    Failed {
        /// Proven quiet.
        quiet: bool,
    },
}

/// One reactor's endpoint on a device.
pub trait Endpoint: Send {
    /// Posts a command; it reaches the device at the next [`Endpoint::ring`].
    fn submit(&mut self, cmd: Command<'_>, token: u64) -> std::result::Result<(), Refused>;
    /// Hands everything posted since the last ring to the device.
    fn ring(&mut self);
    /// Appends at most `max` completions to `out`; returns how many.
    fn poll(&mut self, max: usize, out: &mut Vec<Done>) -> usize;
    /// Commands submitted and not yet completed.
    fn outstanding(&self) -> usize;
    /// Whether a failed completion may be retried, and after how long.
    fn retry_after(&self, done: &Done) -> Option<Duration>;
    /// A failed completion, for the user.
    fn describe(&self, done: &Done) -> String;
    /// The device generation this endpoint belongs to ([`Device::generation`]).
    fn generation(&self) -> u64;
    /// Whether the device was reset under this endpoint, so that [`Endpoint::recover`]
    /// must run before it is used again.
    fn is_stale(&self) -> bool;
    /// Whether commands can be posted.
    fn is_usable(&self) -> bool;
    /// What went wrong with the device, in words, where the endpoint knows better than
    /// the reactor (a lost connection, a failed reconnect).
    fn fault(&self) -> Option<String> {
        None
    }
    /// The oldest command past its deadline at `now`, described.
    fn expired(&self, now: Instant) -> Option<String>;
    /// After a reset (or a timeout on a device that cannot be reset): fails every
    /// outstanding command into `out` with a non-zero code, through the normal
    /// completion path, and makes the endpoint usable again if it can.
    fn recover(&mut self, out: &mut Vec<Done>) -> Recovery;
    /// Facts for `--json` (syscalls made, doorbells), keyed by name.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// The devices of an engine, in the order regions name them.
pub type Devices = Vec<Arc<dyn Device>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_identity_follows_the_first_identifier_both_report() {
        let id = |nguid: Option<u8>, eui: Option<u8>, nqn: Option<(&str, u32)>| MediaId {
            nguid: nguid.map(|b| [b; 16]),
            eui64: eui.map(|b| [b; 8]),
            subsystem: nqn.map(|(n, i)| (n.to_string(), i)),
            inode: None,
        };
        let rows = [
            // NGUID on both decides, whatever else differs.
            (id(Some(7), Some(1), None), id(Some(7), Some(2), None), true),
            (id(Some(7), None, None), id(Some(8), None, None), false),
            // NGUID on one side only: EUI64 decides.
            (id(Some(7), Some(3), None), id(None, Some(3), None), true),
            // Subsystem and nsid.
            (
                id(None, None, Some(("a", 1))),
                id(None, None, Some(("a", 1))),
                true,
            ),
            (
                id(None, None, Some(("a", 1))),
                id(None, None, Some(("a", 2))),
                false,
            ),
            // Nothing in common.
            (id(None, None, None), id(None, None, None), false),
        ];
        for (i, (a, b, same)) in rows.iter().enumerate() {
            assert_eq!(a.same(b), *same, "row {i}");
            assert_eq!(b.same(a), *same, "row {i} reversed");
        }
        let file = |dev, ino| MediaId {
            inode: Some((dev, ino)),
            ..Default::default()
        };
        assert!(file(1, 2).same(&file(1, 2)));
        assert!(!file(1, 2).same(&file(1, 3)));
    }
}
