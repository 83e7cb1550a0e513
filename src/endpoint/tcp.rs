//! NVMe over TCP behind the endpoint interface (`nvcopy-tcp`): a controller reached at
//! `nvme+tcp://HOST:PORT/NQN` is a [`Device`], and each reactor's I/O queue (a TCP
//! connection of its own) an [`Endpoint`]. Reads land in the chunk's pages and writes
//! leave from them, through non-blocking sockets the reactor polls.
//!
//! A connection that ends (the target closed or reset it, or sent a PDU that does not
//! parse or names a command not outstanding), a Keep Alive that fails, and a command past
//! its deadline all take the path a PCIe controller's reset takes: the endpoint turns
//! stale, [`Endpoint::recover`] hands back every outstanding command as aborted, and the
//! controller's service thread connects the queue again, under a new association
//! ([`Controller::reopen_queue`]), trying for the I/O timeout. The reactor then reissues
//! the commands within the job's `--max-resets`, or fails them with the reason. A TCP
//! queue writes into a command's pages only inside its own recvmsg, so once its socket is
//! shut down the aborted commands' pages are quiet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_nvme::Status;
use nvcopy_tcp::{cmd, Controller, Counters, Data, Dir, Outcome, Queue, SubmitError};
use nvcopy_vfio::DmaPool;

use super::{
    Caps, Command, Device, Done, Endpoint, Generation, MediaId, Recovery, Refused, Volume,
    MAX_CHUNK,
};
use crate::error::{Refusal, Result};

/// A completion code for a command the connection's end aborted (above every 15-bit NVMe
/// status).
const ABORTED: u32 = 1 << 16;

/// Connects every NVMe/TCP controller `from` and `to` name (each once) and adds it to
/// `devices`, with one I/O queue per reactor asked for.
pub fn open_targets(
    devices: &mut super::Devices,
    from: Option<&crate::region::RegionSpec>,
    to: &[crate::region::RegionSpec],
    io_timeout: Duration,
    reactors: usize,
) -> Result<()> {
    let mut targets: Vec<&nvcopy_tcp::Target> =
        from.into_iter().chain(to).filter_map(|r| r.tcp()).collect();
    targets.sort();
    targets.dedup();
    for t in targets {
        let opts = nvcopy_tcp::Options {
            io_timeout,
            queues: reactors.clamp(1, 64) as u16,
            reconnect_for: io_timeout,
            header_digest: std::env::var_os("NVCOPY_TCP_NO_DIGESTS").is_none(),
            data_digest: std::env::var_os("NVCOPY_TCP_NO_DIGESTS").is_none(),
            ..Default::default()
        };
        devices.push(TcpDevice::shared(Controller::connect(t, opts)?));
    }
    Ok(())
}

/// An NVMe/TCP controller, shared by the reactors.
pub struct TcpDevice {
    ctrl: Arc<Controller>,
    stats: Arc<Stats>,
    generation: Arc<Generation>,
}

/// What the reactors' queues did, summed.
#[derive(Debug, Default)]
struct Stats {
    sends: AtomicU64,
    recvs: AtomicU64,
    would_block: AtomicU64,
    commands: AtomicU64,
    bytes: AtomicU64,
}

impl TcpDevice {
    /// Wraps a connected controller.
    pub fn shared(ctrl: Arc<Controller>) -> Arc<dyn Device> {
        Arc::new(TcpDevice {
            ctrl,
            stats: Arc::default(),
            generation: Arc::default(),
        })
    }

    fn namespace(&self, v: &Volume) -> Option<&nvcopy_nvme::Namespace> {
        self.ctrl.namespaces().get(v.index as usize)
    }
}

impl Device for TcpDevice {
    fn name(&self) -> &str {
        self.ctrl.name()
    }

    fn volume(&self, id: u32) -> Result<Volume> {
        let found = self
            .ctrl
            .namespaces()
            .iter()
            .enumerate()
            .find(|(_, n)| n.nsid == id);
        let Some((index, ns)) = found else {
            return Err(nvcopy_tcp::Error::NoNamespace {
                target: self.ctrl.target().to_string(),
                nsid: id,
                active: self.ctrl.namespaces().iter().map(|n| n.nsid).collect(),
            }
            .into());
        };
        if ns.metadata != 0 {
            return Err(Refusal::BadNamespaceId {
                text: format!(
                    "{id} (its format has {} metadata bytes per block)",
                    ns.metadata
                ),
                region: self.ctrl.name().to_string(),
            }
            .into());
        }
        Ok(Volume {
            index: index as u32,
            id,
            block_size: ns.lba_size,
            blocks: ns.blocks,
            zone_blocks: None,
        })
    }

    fn caps(&self) -> Caps {
        Caps {
            max_transfer: self
                .ctrl
                .max_transfer()
                .map_or(MAX_CHUNK, |m| m.min(MAX_CHUNK)),
            write_zeroes: self.ctrl.info().supports_write_zeroes(),
            deallocate: false,
            copy: false,
            sequential_writes: false,
        }
    }

    fn media(&self, v: &Volume) -> MediaId {
        match self.namespace(v) {
            Some(ns) => {
                MediaId::of_nvme_namespace(ns.nguid, ns.eui64, &self.ctrl.info().subnqn, ns.nsid)
            }
            None => MediaId::default(),
        }
    }

    fn io_timeout(&self) -> Duration {
        self.ctrl.options().io_timeout
    }

    fn generation(&self) -> u64 {
        self.generation.get()
    }

    fn reset(&self, seen: u64) {
        // No reconnection yet: the generation moves so that the job's budget counts it.
        self.generation.bump(seen);
    }

    fn max_endpoints(&self) -> usize {
        self.ctrl.io_queues() as usize
    }

    fn open_endpoint(&self, pool: &DmaPool, entries: u16) -> Result<Box<dyn Endpoint>> {
        let (mut q, epoch) = self.ctrl.open_queue(entries, pool)?;
        // Everything a command needs on the data path is allocated here, before the
        // reactor's first pass, so that the data path does not allocate.
        let max_transfer = self.caps().max_transfer;
        q.reserve(max_transfer);
        Ok(Box::new(TcpEndpoint {
            q,
            ctrl: self.ctrl.clone(),
            epoch,
            entries,
            pool: pool.clone(),
            max_transfer,
            held: Vec::with_capacity(entries as usize),
            lost: None,
            namespaces: self.ctrl.namespaces().iter().map(|n| n.nsid).collect(),
            stats: self.stats.clone(),
            seen: Counters::default(),
            mine: self.generation(),
            generation: self.generation.clone(),
        }))
    }

    fn endpoint_dma_bytes(&self, _entries: u16) -> usize {
        0
    }

    fn facts(&self) -> Vec<(&'static str, String)> {
        let s = &self.stats;
        let commands = s.commands.load(Ordering::Relaxed);
        let calls = s.sends.load(Ordering::Relaxed) + s.recvs.load(Ordering::Relaxed);
        let n = self.ctrl.negotiated();
        let mut f = vec![
            ("kind", "nvme-tcp".to_string()),
            ("subsystem", self.ctrl.info().subnqn.clone()),
            ("cntlid", self.ctrl.cntlid().to_string()),
            ("io_queues", self.ctrl.io_queues().to_string()),
            ("header_digest", n.header_digest.to_string()),
            ("data_digest", n.data_digest.to_string()),
            ("max_h2c_data", n.max_h2c_data.to_string()),
            ("in_capsule_bytes", self.ctrl.in_capsule().to_string()),
            ("commands", commands.to_string()),
            ("sendmsg_calls", s.sends.load(Ordering::Relaxed).to_string()),
            ("recvmsg_calls", s.recvs.load(Ordering::Relaxed).to_string()),
            (
                "would_block",
                s.would_block.load(Ordering::Relaxed).to_string(),
            ),
            ("bytes", s.bytes.load(Ordering::Relaxed).to_string()),
            ("reconnects", self.ctrl.reconnects().to_string()),
            (
                "syscalls_per_command",
                if commands == 0 {
                    "0".to_string()
                } else {
                    format!("{:.1}", calls as f64 / commands as f64)
                },
            ),
        ];
        if let Some(k) = self.ctrl.keep_alive_failure() {
            f.push(("keep_alive_failed", k));
        }
        f
    }
}

/// One reactor's I/O queue.
struct TcpEndpoint {
    q: Queue,
    ctrl: Arc<Controller>,
    /// The association `q` was connected under ([`Controller::epoch`]).
    epoch: u64,
    entries: u16,
    pool: DmaPool,
    max_transfer: usize,
    /// Commands a lost connection aborted, handed back by the next [`Endpoint::recover`]
    /// (reserved at open: the data path does not allocate).
    held: Vec<u64>,
    /// Set for good once a reconnect failed: why.
    lost: Option<String>,
    /// Namespace ids by [`Volume::index`].
    namespaces: Vec<u32>,
    stats: Arc<Stats>,
    seen: Counters,
    mine: u64,
    generation: Arc<Generation>,
}

impl TcpEndpoint {
    fn publish(&mut self) {
        let now = self.q.counters();
        if now == self.seen {
            return;
        }
        let s = &self.stats;
        s.sends
            .fetch_add(now.sends - self.seen.sends, Ordering::Relaxed);
        s.recvs
            .fetch_add(now.recvs - self.seen.recvs, Ordering::Relaxed);
        s.would_block
            .fetch_add(now.would_block - self.seen.would_block, Ordering::Relaxed);
        s.commands
            .fetch_add(now.commands - self.seen.commands, Ordering::Relaxed);
        s.bytes
            .fetch_add(now.data_bytes - self.seen.data_bytes, Ordering::Relaxed);
        self.seen = now;
    }
}

impl Endpoint for TcpEndpoint {
    fn submit(&mut self, c: Command<'_>, token: u64) -> std::result::Result<(), Refused> {
        let nsid = |v: &Volume| {
            self.namespaces
                .get(v.index as usize)
                .copied()
                .ok_or_else(|| Refused::Invalid(format!("no namespace {} here", v.id)))
        };
        let lba = |v: &Volume, at: u64| at >> v.block_size.trailing_zeros();
        let blocks = |v: &Volume, len: u64| -> std::result::Result<u32, Refused> {
            let b = len >> v.block_size.trailing_zeros();
            if b == 0 || b > 1 << 16 {
                return Err(Refused::Invalid(format!(
                    "{b} blocks do not fit one command"
                )));
            }
            Ok(b as u32)
        };
        if let Some(why) = &self.lost {
            return Err(Refused::Invalid(why.clone()));
        }
        // A queue whose connection just ended waits for its recovery (at most a
        // millisecond away): what is posted meanwhile goes out on the new connection.
        if !self.q.is_usable() {
            return Err(Refused::Full);
        }
        let refused = |e| match e {
            SubmitError::Full => Refused::Full,
            SubmitError::Invalid(m) => Refused::Invalid(m),
        };
        let (sqe, dir, len) = match c {
            Command::Read { volume, at, data } | Command::Write { volume, at, data } => {
                let write = matches!(c, Command::Write { .. });
                let op = if write { cmd::op::WRITE } else { cmd::op::READ };
                let sqe = cmd::rw(
                    op,
                    nsid(volume)?,
                    lba(volume, at),
                    blocks(volume, data.len as u64)?,
                    cmd::Sgl::None,
                );
                let dir = if write {
                    Dir::ToController
                } else {
                    Dir::ToHost
                };
                // The runs of pages go in the command slot's own list: no allocation.
                return self
                    .q
                    .submit_pages(sqe, dir, data.iovas, data.len, token)
                    .map(|_| ())
                    .map_err(refused);
            }
            Command::WriteZeroes { volume, at, len } => {
                let sqe = cmd::rw(
                    cmd::op::WRITE_ZEROES,
                    nsid(volume)?,
                    lba(volume, at),
                    blocks(volume, len)?,
                    cmd::Sgl::None,
                );
                (sqe, Dir::None, 0)
            }
            Command::Flush { volume } => (
                cmd::sqe(cmd::op::FLUSH, nsid(volume)?, cmd::Sgl::None),
                Dir::None,
                0,
            ),
            Command::Copy { .. } | Command::Deallocate { .. } => {
                return Err(Refused::Invalid(format!(
                    "{}: Copy and deallocate are not offered over NVMe/TCP",
                    self.q.target()
                )))
            }
        };
        self.q
            .submit(sqe, dir, len, Data::None, token, false)
            .map(|_| ())
            .map_err(refused)
    }

    fn ring(&mut self) {
        // Only sends: the socket is read when the reactor polls (Endpoint::poll), once a
        // pass, and only with commands outstanding.
        self.q.flush();
        self.publish();
    }

    fn poll(&mut self, max: usize, out: &mut Vec<Done>) -> usize {
        if self.q.outstanding() == 0 {
            return 0;
        }
        let before = out.len();
        let held = &mut self.held;
        let reconnecting = self.lost.is_none();
        self.q.poll(max, |c| {
            let code = match c.outcome {
                Outcome::Success => 0,
                Outcome::Status(s) => (s.0 as u32).max(1),
                // Kept for Endpoint::recover, which the reactor runs once it sees the
                // endpoint stale.
                Outcome::Aborted if reconnecting => return held.push(c.token),
                Outcome::Aborted => ABORTED,
            };
            out.push(Done {
                token: c.token,
                code,
            });
        });
        self.publish();
        out.len() - before
    }

    fn outstanding(&self) -> usize {
        self.q.outstanding() + self.held.len()
    }

    fn retry_after(&self, done: &Done) -> Option<Duration> {
        if done.code == 0 || done.code >= ABORTED {
            return None;
        }
        let s = Status(done.code as u16);
        (!s.dnr()).then(|| self.q_retry_delay(s))
    }

    fn describe(&self, done: &Done) -> String {
        if done.code >= ABORTED {
            if let Some(why) = &self.lost {
                return why.clone();
            }
            return match self.q.error() {
                Some(e) => e.to_string(),
                None => format!(
                    "nvme+tcp://{}: queue {}: aborted",
                    self.q.target(),
                    self.q.qid()
                ),
            };
        }
        format!(
            "nvme+tcp://{}: queue {}: {}",
            self.q.target(),
            self.q.qid(),
            Status(done.code as u16)
        )
    }

    fn generation(&self) -> u64 {
        self.mine
    }

    fn is_stale(&self) -> bool {
        self.lost.is_none() && (!self.q.is_usable() || self.ctrl.epoch() != self.epoch)
    }

    fn fault(&self) -> Option<String> {
        self.lost
            .clone()
            .or_else(|| self.q.error().map(|e| e.to_string()))
    }

    fn is_usable(&self) -> bool {
        self.q.is_usable()
    }

    fn expired(&self, now: Instant) -> Option<String> {
        let (op, cid, waited) = self.q.expired(now)?;
        Some(format!(
            "nvme+tcp://{}: queue {}: {} (command {cid}) did not complete within {waited:?}",
            self.q.target(),
            self.q.qid(),
            nvcopy_nvme::spec::opcode_name(false, op),
        ))
    }

    fn recover(&mut self, out: &mut Vec<Done>) -> Recovery {
        let cause = match self.q.error() {
            Some(e) => e.to_string(),
            None if self.ctrl.epoch() != self.epoch => format!(
                "nvme+tcp://{}: the controller's association was lost (Keep Alive: {})",
                self.q.target(),
                self.ctrl
                    .keep_alive_failure()
                    .unwrap_or_else(|| "replaced by another queue's reconnect".into())
            ),
            None => format!(
                "nvme+tcp://{}: queue {}: a command did not complete in time",
                self.q.target(),
                self.q.qid()
            ),
        };
        // Shuts the socket down (nothing more lands in the commands' pages) and fails
        // what is outstanding through the normal completion path.
        self.q.abort_all(nvcopy_tcp::Error::Controller {
            target: self.q.target().to_string(),
            why: "the queue is being reconnected".into(),
        });
        let _ = self.q.poll(usize::MAX, |c| {
            out.push(Done {
                token: c.token,
                code: ABORTED,
            })
        });
        out.extend(self.held.drain(..).map(|token| Done {
            token,
            code: ABORTED,
        }));
        // One lost association counts once against each job's --max-resets, however
        // many queues it took down.
        self.generation.bump(self.mine);
        self.mine = self.generation.get();
        match self
            .ctrl
            .reopen_queue(self.q.qid(), self.entries, &self.pool, self.epoch)
        {
            Ok((mut q, epoch)) => {
                self.publish();
                q.reserve(self.max_transfer);
                self.q = q;
                self.epoch = epoch;
                self.seen = Counters::default();
                Recovery::Reissue
            }
            Err(e) => {
                self.lost = Some(format!("{cause}; {e}"));
                Recovery::Failed { quiet: true }
            }
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.q.counters();
        vec![
            ("sendmsg_calls", c.sends),
            ("recvmsg_calls", c.recvs),
            ("would_block", c.would_block),
            ("commands", c.commands),
        ]
    }
}

impl TcpEndpoint {
    fn q_retry_delay(&self, _s: Status) -> Duration {
        Duration::ZERO
    }
}
