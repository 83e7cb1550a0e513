//! An NVMe/TCP controller: the admin queue's connection and bring-up (ICReq, Fabrics
//! Connect, Property Get CAP, Property Set CC.EN, Property Get CSTS until RDY, Identify,
//! Set Features Number of Queues), Keep Alive at half the negotiated timeout from a thread
//! of its own, I/O queues connected on demand, and a normal shutdown (CC.SHN) when the
//! last user lets go.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU16, Ordering};
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
        }
    }
}

/// Admin queue entries (SQSIZE 31).
const ADMIN_ENTRIES: u16 = 32;

struct KeepAlive {
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A connected, enabled controller.
pub struct Controller {
    target: Target,
    name: String,
    opts: Options,
    admin: Arc<Mutex<Queue>>,
    cntlid: u16,
    cap: u64,
    cc: u32,
    info: ControllerInfo,
    namespaces: Vec<Namespace>,
    granted: u16,
    next_qid: AtomicU16,
    in_capsule: usize,
    hostid: [u8; 16],
    hostnqn: String,
    negotiated: Negotiated,
    ka: Arc<KeepAlive>,
    ka_thread: Mutex<Option<JoinHandle<()>>>,
    ka_failed: Arc<Mutex<Option<String>>>,
}

fn host_identity() -> [u8; 16] {
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

fn uuid_text(id: &[u8; 16]) -> String {
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

/// Opens a TCP connection to `t` and runs ICReq/ICResp on it.
fn connect_socket(t: &Target, qid: u16, o: &Options) -> Result<(TcpStream, Negotiated)> {
    let target = t.to_string();
    let addrs: Vec<_> = (t.host.as_str(), t.port)
        .to_socket_addrs()
        .map_err(|source| Error::Resolve {
            target: target.clone(),
            source,
        })?
        .collect();
    let mut last = None;
    let mut sock = None;
    for a in &addrs {
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

impl Controller {
    /// Connects the admin queue of `t` and brings the controller up.
    pub fn connect(t: &Target, opts: Options) -> Result<Arc<Controller>> {
        let target = t.to_string();
        let (sock, n) = connect_socket(t, 0, &opts)?;
        let mut q = Queue::new(
            sock,
            target.clone(),
            0,
            n,
            ADMIN_ENTRIES - 1,
            None,
            opts.admin_timeout,
        )?;
        let hostid = host_identity();
        let hostnqn = opts
            .hostnqn
            .clone()
            .unwrap_or_else(|| format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid_text(&hostid)));
        let kato_ms = opts.kato.as_millis().min(u32::MAX as u128) as u32;
        let cntlid = fabrics_connect(
            &mut q,
            0,
            ADMIN_ENTRIES - 1,
            kato_ms,
            0xffff,
            &t.nqn,
            (&hostid, &hostnqn),
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
        let cc_value = cc::EN | cc::QUEUE_ENTRY_SIZES;
        q.run(
            "Property Set CC.EN",
            cmd::property_set(prop::CC, cc_value),
            Dir::None,
            Vec::new(),
            false,
        )?;
        wait_csts(&mut q, 1)?;
        let identify = |q: &mut Queue, what, cns, nsid| -> Result<Vec<u8>> {
            let (_, b) = q.run(
                what,
                cmd::identify(cns, nsid),
                Dir::ToHost,
                vec![0; 4096],
                false,
            )?;
            Ok(b.unwrap_or_else(|| vec![0; 4096]))
        };
        let id = identify(&mut q, "Identify Controller", 1, 0)?;
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
        let list = identify(&mut q, "Identify Active Namespace List", 2, 0)?;
        let mut namespaces = Vec::new();
        let active = list
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .take_while(|&n| n != 0);
        for nsid in active {
            let b = identify(&mut q, "Identify Namespace", 0, nsid)?;
            let ns = Namespace::parse(nsid, &b);
            if ns.blocks > 0 && ns.lba_size >= 512 {
                namespaces.push(ns);
            }
        }
        let admin = Arc::new(Mutex::new(q));
        let ka = Arc::new(KeepAlive {
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let ka_failed = Arc::new(Mutex::new(None));
        let ctrl = Arc::new(Controller {
            name: format!("nvme+tcp://{t}"),
            target: t.clone(),
            opts,
            admin: admin.clone(),
            cntlid,
            cap,
            cc: cc_value,
            info,
            namespaces,
            granted,
            next_qid: AtomicU16::new(1),
            in_capsule,
            hostid,
            hostnqn,
            negotiated: n,
            ka: ka.clone(),
            ka_thread: Mutex::new(None),
            ka_failed: ka_failed.clone(),
        });
        if kato_ms > 0 {
            let period = Duration::from_millis(kato_ms as u64 / 2).max(Duration::from_millis(100));
            let h = std::thread::Builder::new()
                .name("nvme-tcp-keepalive".into())
                .spawn(move || keep_alive(admin, ka, period, ka_failed))
                .map_err(|e| Error::Controller {
                    target: t.to_string(),
                    why: format!("starting the Keep Alive thread: {e}"),
                })?;
            if let Ok(mut g) = ctrl.ka_thread.lock() {
                *g = Some(h);
            }
        }
        Ok(ctrl)
    }

    /// `nvme+tcp://host:port/nqn`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it is.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Identify Controller.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// Active namespaces.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }

    /// The controller id Connect gave.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
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
        &self.opts
    }

    /// Why Keep Alive failed, if it did.
    pub fn keep_alive_failure(&self) -> Option<String> {
        self.ka_failed.lock().ok().and_then(|g| g.clone())
    }

    /// Connects a new I/O queue of `entries` entries whose data is pages of `pool`.
    pub fn open_queue(&self, entries: u16, pool: &DmaPool) -> Result<Queue> {
        let qid = self.next_qid.fetch_add(1, Ordering::Relaxed);
        if qid > self.granted {
            return Err(Error::NoQueue {
                target: self.target.to_string(),
                granted: self.granted,
            });
        }
        let mqes = (self.cap & 0xffff) as u16;
        let size = entries.clamp(2, mqes.saturating_add(1).max(2));
        let (sock, n) = connect_socket(&self.target, qid, &self.opts)?;
        let mut q = Queue::new(
            sock,
            self.target.to_string(),
            qid,
            n,
            size - 1,
            Some(pool.clone()),
            self.opts.admin_timeout,
        )?;
        fabrics_connect(
            &mut q,
            qid,
            size - 1,
            0,
            self.cntlid,
            &self.target.nqn,
            (&self.hostid, &self.hostnqn),
        )?;
        q.set_in_capsule_max(self.in_capsule);
        q.set_timeout(self.opts.io_timeout);
        Ok(q)
    }
}

fn keep_alive(
    admin: Arc<Mutex<Queue>>,
    ka: Arc<KeepAlive>,
    period: Duration,
    failed: Arc<Mutex<Option<String>>>,
) {
    loop {
        let Ok(g) = ka.stop.lock() else { return };
        let Ok((g, _)) = ka.wake.wait_timeout_while(g, period, |stop| !*stop) else {
            return;
        };
        if *g {
            return;
        }
        drop(g);
        let Ok(mut q) = admin.lock() else { return };
        if let Err(e) = q.run(
            "Keep Alive",
            cmd::keep_alive(),
            Dir::None,
            Vec::new(),
            false,
        ) {
            if let Ok(mut f) = failed.lock() {
                *f = Some(e.to_string());
            }
            return;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Ok(mut s) = self.ka.stop.lock() {
            *s = true;
        }
        self.ka.wake.notify_all();
        if let Some(h) = self.ka_thread.lock().ok().and_then(|mut g| g.take()) {
            let _ = h.join();
        }
        // A normal shutdown: CC.SHN, then CSTS.SHST until complete (bounded).
        let Ok(mut q) = self.admin.lock() else { return };
        if !q.is_usable() {
            return;
        }
        let set = cmd::property_set(prop::CC, self.cc | cc::SHN_NORMAL);
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
                Ok((v, _)) if v as u32 & cc::SHST_MASK == cc::SHST_DONE => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break,
            }
        }
    }
}
