//! An NVMe/TCP controller: the admin queue's connection and bring-up (ICReq, Fabrics
//! Connect, Property Get CAP, Property Set CC.EN, Property Get CSTS until RDY, Identify,
//! Set Features Number of Queues), Keep Alive at half the negotiated timeout from a thread
//! of its own, I/O queues connected on demand, and a normal shutdown (CC.SHN) when the
//! last user lets go.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvcopy_nvme::{ControllerInfo, Namespace, Status};
use nvcopy_vfio::DmaPool;

use crate::cmd::{self, cc, prop};
use crate::error::{Error, Result};
use crate::pdu::{IcReq, IcResp, Negotiated, IC_LEN};
use crate::queue::{Dir, Queue};

/// Where a controller is: host, port and subsystem NQN.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Target {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Subsystem NQN.
    pub nqn: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}/{}", self.host, self.port, self.nqn)
        } else {
            write!(f, "{}:{}/{}", self.host, self.port, self.nqn)
        }
    }
}

/// How to reach a controller.
#[derive(Clone, Debug)]
pub struct Options {
    /// Ask for header digests.
    pub header_digest: bool,
    /// Ask for data digests.
    pub data_digest: bool,
    /// Keep Alive Timeout asked for in Connect (rounded to whole seconds by Linux nvmet).
    pub kato: Duration,
    /// How long one admin command or connection step may take.
    pub admin_timeout: Duration,
    /// How long one I/O command may take.
    pub io_timeout: Duration,
    /// I/O queues asked for.
    pub queues: u16,
    /// Host NQN (default: one made from the host identifier).
    pub hostnqn: Option<String>,
    /// How long a lost connection may take to be made again before its queue's commands
    /// fail (the kernel initiator's ctrl_loss_tmo, much shorter).
    pub reconnect_for: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            header_digest: true,
            data_digest: true,
            kato: Duration::from_secs(30),
            admin_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            queues: 8,
            hostnqn: None,
            reconnect_for: Duration::from_secs(30),
        }
    }
}

pub(crate) fn host_identity() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let hex: Vec<u8> = text
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|c| (c as char).to_digit(16).unwrap_or(0) as u8)
        .collect();
    let mut id = [0u8; 16];
    if hex.len() == 32 {
        for (i, b) in id.iter_mut().enumerate() {
            *b = hex[2 * i] << 4 | hex[2 * i + 1];
        }
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id[..16].copy_from_slice(&(t ^ (std::process::id() as u128) << 64).to_le_bytes());
    }
    id
}

pub(crate) fn uuid_text(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Admin queue entries (SQSIZE 31).
const ADMIN_ENTRIES: u16 = 32;

/// Set in [`Shared::epoch`] once the live association is known to be lost (a Keep Alive
/// failed), so that every queue of it reconnects.
const BROKEN: u64 = 1 << 63;

/// One association (NVMe over Fabrics 1.1, 3.3): the admin queue's connection and the
/// controller Connect created on it. A reconnect makes a new one, with a new controller
/// id, and every I/O queue is connected to that again.
pub(crate) struct Assoc {
    pub(crate) admin: Queue,
    pub(crate) cntlid: u16,
}

/// A reactor's request to the service thread: connect I/O queue `qid` again, under a new
/// association if the one it had (`seen`) is still the live one.
struct Want {
    qid: u16,
    entries: u16,
    pool: DmaPool,
    seen: u64,
}

/// The service thread's mailbox.
#[derive(Default)]
struct Service {
    stop: bool,
    want: Vec<Want>,
    done: Vec<(u16, Result<(Queue, u64)>)>,
}

/// What the controller's users and its service thread share.
struct Shared {
    target: Target,
    /// Resolved once at connect: a reconnect runs no name lookup.
    addrs: Vec<SocketAddr>,
    opts: Options,
    hostid: [u8; 16],
    hostnqn: String,
    /// What the first bring-up found, which a reconnect must find again.
    namespaces: Vec<Namespace>,
    /// CAP.MQES: the largest I/O queue, zero-based.
    mqes: u16,
    /// Largest write sent in its command capsule (IOCCSZ).
    in_capsule: usize,
    /// I/O queues the first association granted (Set Features Number of Queues), which
    /// every later one must grant again.
    granted: u16,
    assoc: Mutex<Assoc>,
    /// The live association's number, with [`BROKEN`] set once it is known lost.
    epoch: AtomicU64,
    reconnects: AtomicU64,
    svc: Mutex<Service>,
    wake: Condvar,
    answered: Condvar,
    ka_failed: Mutex<Option<String>>,
}

/// A connected, enabled controller.
///
/// Its service thread sends Keep Alive at half the negotiated timeout and makes every
/// connection after the first: the reactors' seccomp filters allow no socket or connect,
/// so a reactor whose queue lost its connection asks the thread ([`Controller::reopen_queue`])
/// and waits, as a reactor waits out a PCIe controller's reset.
pub struct Controller {
    shared: Arc<Shared>,
    name: String,
    cap: u64,
    cc: u32,
    info: ControllerInfo,
    granted: u16,
    next_qid: AtomicU16,
    in_capsule: usize,
    negotiated: Negotiated,
    service: Mutex<Option<JoinHandle<()>>>,
}

/// Opens a TCP connection to `t` and runs ICReq/ICResp on it.
fn connect_socket(
    t: &Target,
    addrs: &[SocketAddr],
    qid: u16,
    o: &Options,
) -> Result<(TcpStream, Negotiated)> {
    let target = t.to_string();
    let mut last = None;
    let mut sock = None;
    for a in addrs {
        match TcpStream::connect_timeout(a, o.admin_timeout) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(mut sock) = sock else {
        let source = last.unwrap_or_else(|| std::io::Error::other("no address"));
        let hint = match source.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "; nothing listens there: is the NVMe/TCP target's port set up (nvmet: /sys/kernel/config/nvmet/ports)?"
            }
            std::io::ErrorKind::TimedOut => "; the host did not answer: check the address and firewalls",
            _ => "",
        };
        return Err(Error::Connect {
            target,
            qid,
            source,
            hint,
        });
    };
    let io = |what: &'static str| {
        let target = target.clone();
        move |source: std::io::Error| Error::Io {
            target,
            qid,
            what,
            source,
        }
    };
    sock.set_nodelay(true).map_err(io("setting TCP_NODELAY"))?;
    sock.set_read_timeout(Some(o.admin_timeout))
        .map_err(io("setting a read timeout"))?;
    let req = IcReq {
        hpda: 0,
        header_digest: o.header_digest,
        data_digest: o.data_digest,
        maxr2t: 0,
    };
    sock.write_all(&req.encode()).map_err(io("sending ICReq"))?;
    let mut b = [0u8; IC_LEN];
    sock.read_exact(&mut b).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Closed {
                target: target.clone(),
                qid,
                during: " instead of answering ICReq".into(),
            }
        } else {
            io("receiving ICResp")(e)
        }
    })?;
    let n = IcResp::parse(&b, &req).map_err(|source| Error::Pdu {
        target: target.clone(),
        qid,
        source,
    })?;
    sock.set_read_timeout(None)
        .map_err(io("clearing the read timeout"))?;
    Ok((sock, n))
}

fn connect_hint(s: Status) -> &'static str {
    match (s.sct_raw(), s.sc()) {
        (1, 0x82) => "; the target offers no subsystem of that NQN (or refused a parameter): check the NQN (`nvme discover`, or /sys/kernel/config/nvmet/subsystems)",
        (1, 0x84) => "; the subsystem does not allow this host: set allow_any_host or add the host NQN",
        (1, 0x81) => "; the controller is busy: try again",
        _ => "",
    }
}

/// Sends Connect for queue `qid` on `q` and returns the controller id.
fn fabrics_connect(
    q: &mut Queue,
    qid: u16,
    sqsize: u16,
    kato_ms: u32,
    cntlid: u16,
    subnqn: &str,
    (hostid, hostnqn): (&[u8; 16], &str),
) -> Result<u16> {
    let data = cmd::connect_data(hostid, cntlid, subnqn, hostnqn).to_vec();
    match q.run(
        "Connect",
        cmd::connect(qid, sqsize, kato_ms),
        Dir::ToController,
        data,
        true,
    ) {
        Ok((r, _)) => Ok(r as u16),
        Err(Error::Command { target, status, .. }) => Err(Error::ConnectRefused {
            target,
            qid,
            status,
            hint: connect_hint(status),
        }),
        Err(e) => Err(e),
    }
}

/// Connects the admin queue, creates a controller with Connect (dynamic controller id)
/// and enables it: Property Get CAP, CC.EN = 0 if it was set and CSTS.RDY = 0, then
/// CC.EN = 1 and CSTS.RDY = 1 within CAP.TO (NVMe over Fabrics 1.1, 3.5; the base
/// specification's 3.5.1 initialization, as on PCIe). Returns the association and CAP.
pub(crate) fn associate(
    t: &Target,
    addrs: &[SocketAddr],
    opts: &Options,
    (hostid, hostnqn): (&[u8; 16], &str),
    cc_value: u32,
) -> Result<(Assoc, u64)> {
    let target = t.to_string();
    let (sock, n) = connect_socket(t, addrs, 0, opts)?;
    let mut q = Queue::new(
        sock,
        target.clone(),
        0,
        n,
        ADMIN_ENTRIES - 1,
        None,
        opts.admin_timeout,
    )?;
    let kato_ms = opts.kato.as_millis().min(u32::MAX as u128) as u32;
    let cntlid = fabrics_connect(
        &mut q,
        0,
        ADMIN_ENTRIES - 1,
        kato_ms,
        0xffff,
        &t.nqn,
        (hostid, hostnqn),
    )?;
    let get = |q: &mut Queue, what, off, eight| {
        q.run(
            what,
            cmd::property_get(off, eight),
            Dir::None,
            Vec::new(),
            false,
        )
        .map(|r| r.0)
    };
    let cap = get(&mut q, "Property Get CAP", prop::CAP, true)?;
    let ready_wait = Duration::from_millis(((cap >> 24 & 0xff).max(1)) * 500);
    let wait_csts = |q: &mut Queue, want: u32| -> Result<()> {
        let start = Instant::now();
        loop {
            let csts = get(q, "Property Get CSTS", prop::CSTS, false)? as u32;
            if csts & cc::CFS != 0 {
                return Err(Error::Controller {
                    target: target.clone(),
                    why: format!("the controller reports a fatal status (CSTS {csts:#x})"),
                });
            }
            if csts & cc::RDY == want {
                return Ok(());
            }
            if start.elapsed() > ready_wait {
                return Err(Error::Timeout {
                    target: target.clone(),
                    qid: 0,
                    what: if want == 1 {
                        "CSTS.RDY = 1"
                    } else {
                        "CSTS.RDY = 0"
                    },
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let old = get(&mut q, "Property Get CC", prop::CC, false)? as u32;
    if old & cc::EN != 0 {
        q.run(
            "Property Set CC",
            cmd::property_set(prop::CC, 0),
            Dir::None,
            Vec::new(),
            false,
        )?;
        wait_csts(&mut q, 0)?;
    }
    q.run(
        "Property Set CC.EN",
        cmd::property_set(prop::CC, cc_value),
        Dir::None,
        Vec::new(),
        false,
    )?;
    wait_csts(&mut q, 1)?;
    Ok((Assoc { admin: q, cntlid }, cap))
}

/// Runs an Identify on the admin queue: its 4 KiB.
fn identify(q: &mut Queue, what: &'static str, cns: u8, nsid: u32) -> Result<Vec<u8>> {
    let (_, b) = q.run(
        what,
        cmd::identify(cns, nsid),
        Dir::ToHost,
        vec![0; 4096],
        false,
    )?;
    Ok(b.unwrap_or_else(|| vec![0; 4096]))
}

/// What connecting to `t` needs first: its addresses (resolved once: a reconnect makes no
/// name lookup) and who this host is (its identifier, and its NQN: `opts.hostnqn`, or one
/// made from the identifier).
pub(crate) fn reach(t: &Target, opts: &Options) -> Result<(Vec<SocketAddr>, [u8; 16], String)> {
    let addrs: Vec<SocketAddr> = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|source| Error::Resolve {
            target: t.to_string(),
            source,
        })?
        .collect();
    let hostid = host_identity();
    let hostnqn = opts
        .hostnqn
        .clone()
        .unwrap_or_else(|| format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid_text(&hostid)));
    Ok((addrs, hostid, hostnqn))
}

impl Controller {
    /// Connects the admin queue of `t` and brings the controller up.
    pub fn connect(t: &Target, opts: Options) -> Result<Arc<Controller>> {
        let (addrs, hostid, hostnqn) = reach(t, &opts)?;
        let cc_value = cc::EN | cc::QUEUE_ENTRY_SIZES;
        let (mut assoc, cap) = associate(t, &addrs, &opts, (&hostid, &hostnqn), cc_value)?;
        let q = &mut assoc.admin;
        let negotiated = q.negotiated();
        let id = identify(q, "Identify Controller", 1, 0)?;
        let info = ControllerInfo::parse(&id);
        let le32 =
            |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let ioccsz = le32(&id, 1792) as usize;
        let in_capsule = (ioccsz * 16).saturating_sub(64);
        let (r, _) = q.run(
            "Set Features Number of Queues",
            cmd::set_queue_count(opts.queues.max(1)),
            Dir::None,
            Vec::new(),
            false,
        )?;
        let granted = ((r as u16).min((r >> 16) as u16))
            .saturating_add(1)
            .min(opts.queues.max(1));
        let namespaces = active_namespaces(q)?;
        let kato_ms = opts.kato.as_millis().min(u32::MAX as u128) as u64;
        let shared = Arc::new(Shared {
            target: t.clone(),
            addrs,
            opts,
            hostid,
            hostnqn,
            namespaces,
            mqes: (cap & 0xffff) as u16,
            in_capsule,
            granted,
            assoc: Mutex::new(assoc),
            epoch: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
            svc: Mutex::new(Service::default()),
            wake: Condvar::new(),
            answered: Condvar::new(),
            ka_failed: Mutex::new(None),
        });
        let ctrl = Arc::new(Controller {
            shared: shared.clone(),
            name: format!("nvme+tcp://{t}"),
            cap,
            cc: cc_value,
            info,
            granted,
            next_qid: AtomicU16::new(1),
            in_capsule,
            negotiated,
            service: Mutex::new(None),
        });
        let period = (kato_ms > 0)
            .then(|| Duration::from_millis(kato_ms / 2).max(Duration::from_millis(100)));
        let h = std::thread::Builder::new()
            .name("nvme-tcp-service".into())
            .spawn(move || shared.serve(period))
            .map_err(|e| Error::Controller {
                target: t.to_string(),
                why: format!("starting the Keep Alive and reconnect thread: {e}"),
            })?;
        if let Ok(mut g) = ctrl.service.lock() {
            *g = Some(h);
        }
        Ok(ctrl)
    }

    /// `nvme+tcp://host:port/nqn`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it is.
    pub fn target(&self) -> &Target {
        &self.shared.target
    }

    /// Identify Controller.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// Active namespaces.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.shared.namespaces
    }

    /// The controller id Connect gave the live association.
    pub fn cntlid(&self) -> u16 {
        self.shared.assoc.lock().map_or(0, |a| a.cntlid)
    }

    /// CAP.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// I/O queues granted.
    pub fn io_queues(&self) -> u16 {
        self.granted
    }

    /// The admin connection's digests and alignment.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// Largest write sent in its command capsule.
    pub fn in_capsule(&self) -> usize {
        self.in_capsule
    }

    /// Largest transfer, bytes, if the controller limits it (MDTS).
    pub fn max_transfer(&self) -> Option<usize> {
        self.info.mdts_bytes()
    }

    /// The options it was reached with.
    pub fn options(&self) -> &Options {
        &self.shared.opts
    }

    /// Why Keep Alive failed, if it did.
    pub fn keep_alive_failure(&self) -> Option<String> {
        self.shared.ka_failed.lock().ok().and_then(|g| g.clone())
    }

    /// The live association's number: a queue connected under another one (or under
    /// this one once it is known lost) must reconnect.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// New associations made since the first.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Connects a new I/O queue of `entries` entries whose data is pages of `pool`, and
    /// the association it belongs to ([`Controller::epoch`]).
    pub fn open_queue(&self, entries: u16, pool: &DmaPool) -> Result<(Queue, u64)> {
        let qid = self.next_qid.fetch_add(1, Ordering::Relaxed);
        if qid > self.granted {
            return Err(Error::NoQueue {
                target: self.shared.target.to_string(),
                granted: self.granted,
            });
        }
        let a = self.shared.lock_assoc()?;
        let q = self
            .shared
            .open_io(a.cntlid, qid, entries, pool, &self.shared.opts)?;
        Ok((q, self.epoch()))
    }

    /// Connects I/O queue `qid` again after its connection ended or its association was
    /// lost (`seen`: the association it was on), through the service thread, which first
    /// makes a new association if `seen` is still the live one. It keeps trying for
    /// [`Options::reconnect_for`], then gives up with [`Error::ReconnectFailed`]. Blocks
    /// the caller meanwhile; makes no socket call of its own.
    pub fn reopen_queue(
        &self,
        qid: u16,
        entries: u16,
        pool: &DmaPool,
        seen: u64,
    ) -> Result<(Queue, u64)> {
        let s = &self.shared;
        let poisoned = || Error::Controller {
            target: s.target.to_string(),
            why: "the reconnect thread failed".into(),
        };
        let mut g = s.svc.lock().map_err(|_| poisoned())?;
        g.want.push(Want {
            qid,
            entries,
            pool: pool.clone(),
            seen,
        });
        s.wake.notify_all();
        // The thread always answers within its window plus one connection attempt; the
        // bound only guards against a thread that is gone.
        let limit = Instant::now() + s.opts.reconnect_for + 4 * s.opts.admin_timeout;
        loop {
            if let Some(i) = g.done.iter().position(|(q, _)| *q == qid) {
                return g.done.swap_remove(i).1;
            }
            let left = limit.saturating_duration_since(Instant::now());
            if left.is_zero() || g.stop {
                return Err(Error::Timeout {
                    target: s.target.to_string(),
                    qid,
                    what: "the reconnect thread's answer",
                    waited: s.opts.reconnect_for,
                });
            }
            g = s.answered.wait_timeout(g, left).map_err(|_| poisoned())?.0;
        }
    }
}

/// Identify Active Namespace List, then Identify Namespace for each: those with a usable
/// format.
fn active_namespaces(q: &mut Queue) -> Result<Vec<Namespace>> {
    let list = identify(q, "Identify Active Namespace List", 2, 0)?;
    let mut namespaces = Vec::new();
    let active = list
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&n| n != 0);
    for nsid in active {
        let b = identify(q, "Identify Namespace", 0, nsid)?;
        let ns = Namespace::parse(nsid, &b);
        if ns.blocks > 0 && ns.lba_size >= 512 {
            namespaces.push(ns);
        }
    }
    Ok(namespaces)
}

impl Shared {
    fn lock_assoc(&self) -> Result<std::sync::MutexGuard<'_, Assoc>> {
        self.assoc.lock().map_err(|_| Error::Controller {
            target: self.target.to_string(),
            why: "the admin queue's lock was poisoned by a panic".into(),
        })
    }

    fn stopping(&self) -> bool {
        self.svc.lock().map_or(true, |g| g.stop)
    }

    /// Connects I/O queue `qid` to controller `cntlid`, each step within `o.admin_timeout`.
    fn open_io(
        &self,
        cntlid: u16,
        qid: u16,
        entries: u16,
        pool: &DmaPool,
        o: &Options,
    ) -> Result<Queue> {
        let size = entries.clamp(2, self.mqes.saturating_add(1).max(2));
        let (sock, n) = connect_socket(&self.target, &self.addrs, qid, o)?;
        let mut q = Queue::new(
            sock,
            self.target.to_string(),
            qid,
            n,
            size - 1,
            Some(pool.clone()),
            o.admin_timeout,
        )?;
        fabrics_connect(
            &mut q,
            qid,
            size - 1,
            0,
            cntlid,
            &self.target.nqn,
            (&self.hostid, &self.hostnqn),
        )?;
        q.set_in_capsule_max(self.in_capsule);
        q.set_timeout(self.opts.io_timeout);
        Ok(q)
    }

    /// The thread's loop: answer reconnect requests at once, send Keep Alive every
    /// `period`, until the controller is dropped.
    fn serve(&self, period: Option<Duration>) {
        let mut next_ka = period.map(|p| Instant::now() + p);
        loop {
            let wants = {
                let Ok(mut g) = self.svc.lock() else { return };
                loop {
                    if g.stop {
                        return;
                    }
                    if !g.want.is_empty() {
                        break std::mem::take(&mut g.want);
                    }
                    let wait = next_ka.map_or(Duration::from_secs(3600), |t| {
                        t.saturating_duration_since(Instant::now())
                    });
                    if wait.is_zero() {
                        break Vec::new();
                    }
                    g = match self.wake.wait_timeout(g, wait) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                }
            };
            for w in wants {
                let r = self.reopen(&w);
                if let Ok(mut g) = self.svc.lock() {
                    g.done.push((w.qid, r));
                }
                self.answered.notify_all();
            }
            if let (Some(p), Some(t)) = (period, next_ka) {
                if Instant::now() >= t {
                    self.keep_alive();
                    next_ka = Some(Instant::now() + p);
                }
            }
        }
    }

    /// One Keep Alive on the live association; a failure marks it lost, so that every
    /// queue reconnects (NVMe base specification 3.9, Keep Alive: the host's side).
    fn keep_alive(&self) {
        let ep = self.epoch.load(Ordering::Acquire);
        if ep & BROKEN != 0 {
            return;
        }
        let Ok(mut a) = self.assoc.lock() else { return };
        if let Err(e) = a.admin.run(
            "Keep Alive",
            cmd::keep_alive(),
            Dir::None,
            Vec::new(),
            false,
        ) {
            if let Ok(mut f) = self.ka_failed.lock() {
                *f = Some(e.to_string());
            }
            let _ =
                self.epoch
                    .compare_exchange(ep, ep | BROKEN, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Tries [`Shared::try_reopen`] until it works or [`Options::reconnect_for`] has
    /// passed, waiting 50 ms after the first failure and doubling up to 1 s.
    fn reopen(&self, w: &Want) -> Result<(Queue, u64)> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            // No step of an attempt (a connect to a host that does not answer, an ICResp
            // that never comes) may outlast the window by more than a moment.
            let left = self
                .opts
                .reconnect_for
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(100));
            let mut o = self.opts.clone();
            o.admin_timeout = o.admin_timeout.min(left);
            let last = match self.try_reopen(w, &o) {
                Ok(x) => return Ok(x),
                Err(e @ Error::Changed { .. }) => return Err(e),
                Err(e) => e,
            };
            if start.elapsed() + delay > self.opts.reconnect_for || self.stopping() {
                return Err(Error::ReconnectFailed {
                    target: self.target.to_string(),
                    qid: w.qid,
                    attempts,
                    waited: start.elapsed(),
                    last: last.to_string(),
                });
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    /// One attempt: a new association if `w.seen` is still the live one (or the live one
    /// is lost), checked to serve the same namespaces, then the queue under it.
    fn try_reopen(&self, w: &Want, o: &Options) -> Result<(Queue, u64)> {
        let mut a = self.lock_assoc()?;
        let ep = self.epoch.load(Ordering::Acquire);
        let fresh = ep == w.seen || ep & BROKEN != 0;
        if fresh {
            let cc_value = cc::EN | cc::QUEUE_ENTRY_SIZES;
            let (mut new, _) = associate(
                &self.target,
                &self.addrs,
                o,
                (&self.hostid, &self.hostnqn),
                cc_value,
            )?;
            new.admin.set_timeout(self.opts.admin_timeout);
            self.check_same(&mut new.admin)?;
            // A new association is a new controller: it is initialized as the first was,
            // Number of Queues included (a controller may refuse I/O queues it was not
            // asked for), and must grant as many.
            let (r, _) = new.admin.run(
                "Set Features Number of Queues",
                cmd::set_queue_count(self.opts.queues.max(1)),
                Dir::None,
                Vec::new(),
                false,
            )?;
            let granted = ((r as u16).min((r >> 16) as u16)).saturating_add(1);
            if granted < self.granted {
                return Err(Error::Controller {
                    target: self.target.to_string(),
                    why: format!(
                        "after reconnecting, the controller grants {granted} I/O queues, fewer than the {} in use",
                        self.granted
                    ),
                });
            }
            // The old admin connection closes here; the target then ends the old
            // controller.
            *a = new;
            self.epoch.store((ep & !BROKEN) + 1, Ordering::Release);
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        match self.open_io(a.cntlid, w.qid, w.entries, &w.pool, o) {
            Ok(q) => Ok((q, self.epoch.load(Ordering::Acquire))),
            Err(e) => {
                // The live association, made by another queue's reconnect, may have been
                // lost since, with no Keep Alive due yet to notice: if its admin queue
                // does not answer one now, it is marked lost, so that the next attempt
                // makes a new one instead of connecting to a controller that is gone.
                if !fresh {
                    let ka = a.admin.run(
                        "Keep Alive",
                        cmd::keep_alive(),
                        Dir::None,
                        Vec::new(),
                        false,
                    );
                    if let Err(k) = ka {
                        if let Ok(mut f) = self.ka_failed.lock() {
                            *f = Some(k.to_string());
                        }
                        let _ = self.epoch.compare_exchange(
                            ep,
                            ep | BROKEN,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                }
                Err(e)
            }
        }
    }

    /// A copy may only go on against the media it started on: the namespaces must have
    /// the same ids, block sizes and sizes as at the first bring-up.
    fn check_same(&self, q: &mut Queue) -> Result<()> {
        let now = active_namespaces(q)?;
        let show = |v: &[Namespace]| {
            v.iter()
                .map(|n| format!("{}: {} x {} B", n.nsid, n.blocks, n.lba_size))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let same = now.len() == self.namespaces.len()
            && now
                .iter()
                .zip(&self.namespaces)
                .all(|(a, b)| a.nsid == b.nsid && a.blocks == b.blocks && a.lba_size == b.lba_size);
        if same {
            Ok(())
        } else {
            Err(Error::Changed {
                target: self.target.to_string(),
                was: show(&self.namespaces),
                now: show(&now),
            })
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let s = &self.shared;
        if let Ok(mut g) = s.svc.lock() {
            g.stop = true;
        }
        s.wake.notify_all();
        s.answered.notify_all();
        if let Some(h) = self.service.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
        // A normal shutdown: CC.SHN, then CSTS.SHST until complete (bounded).
        let Ok(mut a) = s.assoc.lock() else { return };
        shutdown(&mut a, self.cc);
    }
}

/// A normal shutdown (CC.SHN = 01b, then CSTS.SHST = 10b within 2 s), as a host does
/// before it disconnects (base spec 2.0, Controller Shutdown). Best effort: the target reaps the
/// controller when the connection closes anyway.
pub(crate) fn shutdown(assoc: &mut Assoc, cc_value: u32) {
    let q = &mut assoc.admin;
    if !q.is_usable() {
        return;
    }
    let set = cmd::property_set(prop::CC, cc_value | cc::SHN_NORMAL);
    if q.run("Property Set CC.SHN", set, Dir::None, Vec::new(), false)
        .is_err()
    {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        match q.run(
            "Property Get CSTS",
            cmd::property_get(prop::CSTS, false),
            Dir::None,
            Vec::new(),
            false,
        ) {
            Ok((v, _)) if v as u32 & cc::SHST_MASK == cc::SHST_DONE => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => return,
        }
    }
}
