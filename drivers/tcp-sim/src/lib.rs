//! A software NVMe/TCP target for host tests: the controller side of the NVMe/TCP
//! transport over loopback TCP, one thread per connection, with namespaces kept in memory
//! and faults a test injects and changes while it runs.
//!
//! It answers ICReq (honouring the digests asked for), Fabrics Connect (admin: a new
//! controller id per association; I/O: only for a live controller id), Property Get/Set
//! (CAP, VS, CC, CSTS with RDY following CC.EN and the shutdown status following CC.SHN),
//! Identify (controller, namespace, active namespace list), Set Features Number of
//! Queues, Keep Alive, and Read (C2H Data), Write (in-capsule data, or R2T and H2C Data),
//! Write Zeroes and Flush.
//!
//! It checks what the host sends: every PDU's type, header length, flags, PDU data
//! offset, PDU length and digests, the data pointer of every command against its length,
//! and H2C Data against the R2T it answers. A PDU that breaks a rule ends the connection
//! with a C2H Terminate Connection Request; every such finding is kept
//! ([`TcpSim::host_errors`]) so that a test can assert the host made none.
//!
//! Faults ([`Faults`]) are counted in I/O commands received since they were set, so a
//! schedule is deterministic whatever the timing.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod conn;

/// One namespace.
#[derive(Clone, Copy, Debug)]
pub struct NsConfig {
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Blocks.
    pub blocks: u64,
}

/// The controller the target models.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespaces, ids 1, 2, ... in order.
    pub namespaces: Vec<NsConfig>,
    /// MDTS: the largest transfer is 2^mdts 4 KiB pages (0: no limit).
    pub mdts: u8,
    /// Bytes of in-capsule data an I/O command may carry (IOCCSZ less the SQE; a multiple
    /// of 16).
    pub in_capsule: usize,
    /// MAXH2CDATA offered in ICResp.
    pub max_h2c_data: u32,
    /// The largest transfer one R2T asks for (a write longer than that takes several).
    pub max_r2t: u32,
    /// The largest C2H Data PDU payload (a read longer than that takes several).
    pub max_c2h_data: u32,
    /// CPDA offered in ICResp (alignment of the host's data, 0's based dwords).
    pub cpda: u8,
    /// CAP.MQES (0's based).
    pub mqes: u16,
    /// CAP.TO, in 500 ms units.
    pub cap_to: u8,
    /// I/O queues granted at most.
    pub io_queues: u16,
    /// Complete reads with the C2H Data SUCCESS flag instead of a Response Capsule.
    pub c2h_success: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nqn: "nqn.2026-12.io.nvcopy:tcp-sim".into(),
            namespaces: vec![NsConfig {
                block_size: 512,
                blocks: 16384,
            }],
            mdts: 5,
            in_capsule: 8192,
            max_h2c_data: 32768,
            max_r2t: 1 << 20,
            max_c2h_data: 1 << 20,
            cpda: 0,
            mqes: 127,
            cap_to: 10,
            io_queues: 8,
            c2h_success: false,
        }
    }
}

/// A malformed reply the target sends for one I/O command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PduFault {
    /// The Response Capsule's type is 0x42, which no controller sends.
    BadType,
    /// The Response Capsule's PDU length is 4 bytes too long.
    BadLength,
    /// The Response Capsule's header digest is wrong (header digests on only).
    BadHeaderDigest,
    /// A read's C2H Data carries a wrong data digest (data digests on, reads only).
    BadDataDigest,
    /// The Response Capsule names a command id that is not outstanding.
    UnknownCccid,
    /// A C2H Terminate Connection Request instead of the response.
    Terminate,
}

/// Faults, counted in I/O commands (Read, Write, Write Zeroes, Flush) received since
/// [`TcpSim::set_faults`], from 1.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// On receiving each of these I/O commands (left unanswered), close every connection.
    pub drop_at: Vec<u64>,
    /// After each such drop, refuse connections (nothing listens) for this long;
    /// [`Duration::MAX`]: for good.
    pub refuse_for: Option<Duration>,
    /// Never answer this I/O command (nor ask for its data).
    pub stall: Option<u64>,
    /// After a drop, accept connections but never answer on them (a peer that a
    /// firewall or a hung target blackholes: connect works, ICResp never comes).
    pub silent_after_drop: bool,
    /// The first I/O command from this one on that the fault applies to gets this
    /// malformed reply.
    pub corrupt: Option<(u64, PduFault)>,
}

/// What the target saw, since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// TCP connections accepted.
    pub connections: u64,
    /// Associations: admin Connects that made a controller.
    pub associations: u64,
    /// Connects refused.
    pub connects_refused: u64,
    /// Admin commands (Connect included).
    pub admin_commands: u64,
    /// I/O commands received (Connect not included).
    pub io_commands: u64,
    /// Reads.
    pub reads: u64,
    /// Writes with their data in the capsule.
    pub writes_in_capsule: u64,
    /// Writes whose data came by R2T and H2C Data.
    pub writes_r2t: u64,
    /// R2Ts sent.
    pub r2ts: u64,
    /// H2C Data PDUs received.
    pub h2c_pdus: u64,
    /// C2H Data PDUs sent.
    pub c2h_pdus: u64,
    /// Write Zeroes.
    pub write_zeroes: u64,
    /// Flushes.
    pub flushes: u64,
    /// Keep Alives.
    pub keep_alives: u64,
    /// Times every connection was closed (a fault or [`TcpSim::close_all`]).
    pub drops: u64,
    /// Commands left unanswered by [`Faults::stall`].
    pub stalled: u64,
    /// Malformed replies sent.
    pub corrupted: u64,
    /// H2C Terminate Connection Requests received.
    pub host_terminations: u64,
}

#[derive(Default)]
struct AtomicCounters {
    connections: AtomicU64,
    associations: AtomicU64,
    connects_refused: AtomicU64,
    admin_commands: AtomicU64,
    io_commands: AtomicU64,
    reads: AtomicU64,
    writes_in_capsule: AtomicU64,
    writes_r2t: AtomicU64,
    r2ts: AtomicU64,
    h2c_pdus: AtomicU64,
    c2h_pdus: AtomicU64,
    write_zeroes: AtomicU64,
    flushes: AtomicU64,
    keep_alives: AtomicU64,
    drops: AtomicU64,
    stalled: AtomicU64,
    corrupted: AtomicU64,
    host_terminations: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl AtomicCounters {
    fn snapshot(&self) -> Counters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            connections: g(&self.connections),
            associations: g(&self.associations),
            connects_refused: g(&self.connects_refused),
            admin_commands: g(&self.admin_commands),
            io_commands: g(&self.io_commands),
            reads: g(&self.reads),
            writes_in_capsule: g(&self.writes_in_capsule),
            writes_r2t: g(&self.writes_r2t),
            r2ts: g(&self.r2ts),
            h2c_pdus: g(&self.h2c_pdus),
            c2h_pdus: g(&self.c2h_pdus),
            write_zeroes: g(&self.write_zeroes),
            flushes: g(&self.flushes),
            keep_alives: g(&self.keep_alives),
            drops: g(&self.drops),
            stalled: g(&self.stalled),
            corrupted: g(&self.corrupted),
            host_terminations: g(&self.host_terminations),
        }
    }
}

/// A controller (one association).
#[derive(Clone, Debug, Default)]
struct Ctrl {
    cc: u32,
    csts: u32,
    /// I/O queues granted by Set Features (0 until then).
    granted: u16,
    /// I/O queue ids connected.
    queues: Vec<u16>,
}

struct ConnEntry {
    id: u64,
    stream: TcpStream,
    /// The controller the connection's queue belongs to, once connected.
    cntlid: Option<u16>,
}

struct Listen {
    listener: Option<TcpListener>,
    /// Listening wanted (false after [`TcpSim::stop_listening`] or a drop for good).
    want: bool,
    /// Refusing until then.
    refuse_until: Option<Instant>,
    /// Accepted and never answered ([`Faults::silent_after_drop`]), held open.
    silent: Option<Vec<TcpStream>>,
}

struct FaultState {
    f: Faults,
    /// I/O commands received since the faults were set.
    io_seen: u64,
    corrupt_done: bool,
}

/// What the target's threads share.
struct Shared {
    cfg: SimConfig,
    addr: SocketAddr,
    media: Vec<Mutex<Vec<u8>>>,
    ctrls: Mutex<HashMap<u16, Ctrl>>,
    next_cntlid: AtomicU16,
    next_conn: AtomicU64,
    conns: Mutex<Vec<ConnEntry>>,
    faults: Mutex<FaultState>,
    listen: Mutex<Listen>,
    stop: AtomicBool,
    counters: AtomicCounters,
    host_errors: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking connection thread must not take the target down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What an I/O command's arrival means under the faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Serve,
    Corrupt(PduFault),
    Stall,
    Drop,
}

impl Shared {
    fn host_error(&self, what: String) {
        lock(&self.host_errors).push(what);
    }

    fn register(&self, stream: &TcpStream) -> std::io::Result<u64> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let stream = stream.try_clone()?;
        lock(&self.conns).push(ConnEntry {
            id,
            stream,
            cntlid: None,
        });
        Ok(id)
    }

    fn set_conn_cntlid(&self, id: u64, cntlid: u16) {
        if let Some(e) = lock(&self.conns).iter_mut().find(|e| e.id == id) {
            e.cntlid = Some(cntlid);
        }
    }

    fn unregister(&self, id: u64) {
        lock(&self.conns).retain(|e| e.id != id);
    }

    /// The admin connection of `cntlid` ended: the controller goes, and with it the
    /// connections of its I/O queues.
    fn end_ctrl(&self, cntlid: u16) {
        lock(&self.ctrls).remove(&cntlid);
        for e in lock(&self.conns).iter() {
            if e.cntlid == Some(cntlid) {
                let _ = e.stream.shutdown(Shutdown::Both);
            }
        }
    }

    fn close_all(&self) {
        bump(&self.counters.drops);
        lock(&self.ctrls).clear();
        for e in lock(&self.conns).iter() {
            let _ = e.stream.shutdown(Shutdown::Both);
        }
    }

    /// Counts an I/O command and says what to do with it.
    fn fate(&self, read: bool) -> Fate {
        bump(&self.counters.io_commands);
        let mut g = lock(&self.faults);
        g.io_seen += 1;
        let k = g.io_seen;
        if g.f.drop_at.contains(&k) {
            let refuse = g.f.refuse_for;
            let silent = g.f.silent_after_drop;
            drop(g);
            if silent {
                lock(&self.listen).silent.get_or_insert_with(Vec::new);
            }
            if let Some(d) = refuse {
                let mut l = lock(&self.listen);
                if d == Duration::MAX {
                    l.want = false;
                } else {
                    l.refuse_until = Some(Instant::now() + d);
                }
                // Nothing listens from now on, before any host sees its connection end.
                l.listener = None;
            }
            return Fate::Drop;
        }
        if g.f.stall == Some(k) {
            bump(&self.counters.stalled);
            return Fate::Stall;
        }
        if let Some((from, f)) = g.f.corrupt {
            let applies = f != PduFault::BadDataDigest || read;
            if k >= from && applies && !g.corrupt_done {
                g.corrupt_done = true;
                bump(&self.counters.corrupted);
                return Fate::Corrupt(f);
            }
        }
        Fate::Serve
    }

    /// Opens or closes the listener as wanted; returns it open or not.
    fn reconcile(&self, l: &mut Listen) {
        let refusing = l.refuse_until.is_some_and(|t| Instant::now() < t);
        let open = l.want && !refusing;
        if !open {
            l.listener = None;
            return;
        }
        l.refuse_until = None;
        if l.listener.is_none() {
            // std sets SO_REUSEADDR on Unix listeners: the port binds again although
            // connections it accepted linger in TIME_WAIT.
            if let Ok(s) = TcpListener::bind(self.addr) {
                if s.set_nonblocking(true).is_ok() {
                    l.listener = Some(s);
                }
            }
        }
    }

    fn accept_loop(self: Arc<Self>) {
        while !self.stop.load(Ordering::Acquire) {
            let got = {
                let mut l = lock(&self.listen);
                self.reconcile(&mut l);
                l.listener.as_ref().map(|s| s.accept())
            };
            match got {
                Some(Ok((s, _))) if lock(&self.listen).silent.is_some() => {
                    bump(&self.counters.connections);
                    if let Some(v) = lock(&self.listen).silent.as_mut() {
                        v.push(s);
                    }
                }
                Some(Ok((s, _))) => {
                    bump(&self.counters.connections);
                    let sh = self.clone();
                    let _ = std::thread::Builder::new()
                        .name("tcp-sim-conn".into())
                        .spawn(move || conn::serve(&sh, s));
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }
}

/// Why the target could not start.
#[derive(Debug)]
pub struct StartError(pub std::io::Error);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the NVMe/TCP target could not listen on 127.0.0.1: {}",
            self.0
        )
    }
}

impl std::error::Error for StartError {}

/// A running target, listening on 127.0.0.1 on a port of its own until dropped.
pub struct TcpSim {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl TcpSim {
    /// Starts a target of `cfg` on an ephemeral port.
    pub fn start(cfg: SimConfig) -> Result<TcpSim, StartError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(StartError)?;
        listener.set_nonblocking(true).map_err(StartError)?;
        let addr = listener.local_addr().map_err(StartError)?;
        let media = cfg
            .namespaces
            .iter()
            .map(|n| Mutex::new(vec![0u8; (n.blocks * n.block_size as u64) as usize]))
            .collect();
        let shared = Arc::new(Shared {
            cfg,
            addr,
            media,
            ctrls: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
            next_conn: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
            faults: Mutex::new(FaultState {
                f: Faults::default(),
                io_seen: 0,
                corrupt_done: false,
            }),
            listen: Mutex::new(Listen {
                listener: Some(listener),
                want: true,
                refuse_until: None,
                silent: None,
            }),
            stop: AtomicBool::new(false),
            counters: AtomicCounters::default(),
            host_errors: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("tcp-sim-accept".into())
            .spawn(move || sh.accept_loop())
            .map_err(StartError)?;
        Ok(TcpSim {
            shared,
            accept: Some(accept),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.shared.addr.port()
    }

    /// The subsystem NQN.
    pub fn nqn(&self) -> &str {
        &self.shared.cfg.nqn
    }

    /// The host crate's name for it.
    pub fn target(&self) -> nvcopy_tcp::Target {
        nvcopy_tcp::Target {
            host: "127.0.0.1".into(),
            port: self.port(),
            nqn: self.shared.cfg.nqn.clone(),
        }
    }

    /// nvcopy's region for namespace `nsid`: `nvme+tcp://127.0.0.1:PORT/NQN/NSID`.
    pub fn url(&self, nsid: u32) -> String {
        format!(
            "nvme+tcp://127.0.0.1:{}/{}/{nsid}",
            self.port(),
            self.shared.cfg.nqn
        )
    }

    /// Replaces the faults; their I/O command count starts again from 0.
    pub fn set_faults(&self, f: Faults) {
        let mut g = lock(&self.shared.faults);
        *g = FaultState {
            f,
            io_seen: 0,
            corrupt_done: false,
        };
    }

    /// Closes every connection now (every controller ends).
    pub fn close_all(&self) {
        self.shared.close_all();
    }

    /// Stops listening: connections are refused (nothing listens on the port).
    pub fn stop_listening(&self) {
        let mut l = lock(&self.shared.listen);
        l.want = false;
        l.listener = None;
    }

    /// Listens again on the same port.
    pub fn listen_again(&self) {
        let mut l = lock(&self.shared.listen);
        l.want = true;
        l.refuse_until = None;
        self.shared.reconcile(&mut l);
    }

    /// What it saw so far.
    pub fn counters(&self) -> Counters {
        self.shared.counters.snapshot()
    }

    /// Everything the host sent that broke a rule of the transport or the command set.
    pub fn host_errors(&self) -> Vec<String> {
        lock(&self.shared.host_errors).clone()
    }

    /// Controllers (associations) alive now.
    pub fn live_controllers(&self) -> usize {
        lock(&self.shared.ctrls).len()
    }

    /// A copy of namespace `nsid`'s media.
    ///
    /// # Panics
    /// If there is no such namespace.
    pub fn media(&self, nsid: u32) -> Vec<u8> {
        lock(&self.shared.media[nsid as usize - 1]).clone()
    }

    /// Writes `data` into namespace `nsid`'s media at byte `at`.
    ///
    /// # Panics
    /// If there is no such namespace or it does not fit.
    pub fn fill(&self, nsid: u32, at: usize, data: &[u8]) {
        lock(&self.shared.media[nsid as usize - 1])[at..at + data.len()].copy_from_slice(data);
    }
}

impl Drop for TcpSim {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        lock(&self.shared.listen).listener = None;
        for e in lock(&self.shared.conns).iter() {
            let _ = e.stream.shutdown(Shutdown::Both);
        }
    }
}

/// A small seedable generator (SplitMix64) for fault schedules.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}
