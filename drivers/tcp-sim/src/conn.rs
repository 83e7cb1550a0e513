//! One connection: ICReq/ICResp, then PDUs read whole and checked, and commands answered
//! in the order their capsules (or their last H2C Data) arrive.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;

use nvcopy_tcp::cmd::{cc, fctype, op, prop};
use nvcopy_tcp::pdu::{
    self, encode_c2h, fes, flag, kind, C2h, C2hData, Cqe, IcReq, IcResp, Negotiated, R2t, CH_LEN,
    CMD_HLEN, DIGEST_LEN, IC_LEN, SHORT_HLEN,
};

use crate::{bump, lock, Ctrl, Fate, PduFault, Shared};

/// Status codes (base spec 4.6.1.2; Fabrics spec for Connect).
mod sc {
    pub const INVALID_OPCODE: u16 = 0x01;
    pub const INVALID_FIELD: u16 = 0x02;
    pub const SEQUENCE_ERROR: u16 = 0x0c;
    pub const SGL_LENGTH_INVALID: u16 = 0x0f;
    pub const INVALID_NAMESPACE: u16 = 0x0b;
    pub const LBA_OUT_OF_RANGE: u16 = 0x80;
    /// SCT 1 (command specific), Connect Invalid Parameters.
    pub const CONNECT_INVALID_PARAM: u16 = 0x182;
    /// Do Not Retry.
    pub const DNR: u16 = 1 << 14;
}

/// SGL descriptor identifiers the host may use.
const SGL_INCAPSULE: u8 = 0x01;
const SGL_TRANSPORT: u8 = 0x5a;

/// A violation found in what the host sent: the fatal error status for the Terminate
/// Connection Request, and what it was.
struct Violation(u16, String);

/// A write waiting for its data.
struct PendingWrite {
    nsid: u32,
    at: usize,
    buf: Vec<u8>,
    /// Bytes received.
    got: u32,
    /// End of the transfer asked for by R2Ts so far.
    asked: u32,
    ttag: u16,
    fate: Fate,
}

struct Conn<'a> {
    sh: &'a Shared,
    s: TcpStream,
    id: u64,
    n: Negotiated,
    qid: Option<u16>,
    cntlid: Option<u16>,
    sqsize: u16,
    sqhd: u16,
    next_ttag: u16,
    pending: HashMap<u16, PendingWrite>,
}

fn align_up(n: usize, pda: u8) -> usize {
    let a = (pda as usize + 1) * 4;
    n.div_ceil(a) * a
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    (le32(b, at) as u64) | (le32(b, at + 4) as u64) << 32
}

fn nqn_at(d: &[u8], at: usize) -> String {
    let f = &d[at..at + 256];
    let end = f.iter().position(|&c| c == 0).unwrap_or(f.len());
    String::from_utf8_lossy(&f[..end]).into_owned()
}

/// Serves one accepted connection until it ends.
pub(crate) fn serve(sh: &Shared, s: TcpStream) {
    let Ok(id) = sh.register(&s) else { return };
    let _ = s.set_nodelay(true);
    let _ = s.set_nonblocking(false);
    let mut c = Conn {
        sh,
        s,
        id,
        n: Negotiated::default(),
        qid: None,
        cntlid: None,
        sqsize: 0,
        sqhd: 0,
        next_ttag: 1,
        pending: HashMap::new(),
    };
    match c.run() {
        Ok(()) => {}
        Err(Some(Violation(f, what))) => {
            sh.host_error(format!("connection {id} (queue {:?}): {what}", c.qid));
            let t = encode_c2h(&C2h::Term { fes: f, fei: 0 }, &c.n);
            let _ = c.s.write_all(&t);
        }
        Err(None) => {}
    }
    let _ = c.s.shutdown(Shutdown::Both);
    sh.unregister(id);
    if let (Some(0), Some(cntlid)) = (c.qid, c.cntlid) {
        sh.end_ctrl(cntlid);
    }
}

/// `Err(None)`: the connection ended (or was closed); `Err(Some)`: the host broke a rule.
type Step = Result<(), Option<Violation>>;

fn bad(f: u16, what: impl Into<String>) -> Option<Violation> {
    Some(Violation(f, what.into()))
}

impl Conn<'_> {
    fn run(&mut self) -> Step {
        let mut b = [0u8; IC_LEN];
        self.s.read_exact(&mut b).map_err(|_| None)?;
        let req =
            IcReq::parse(&b).map_err(|e| bad(fes::INVALID_HEADER_FIELD, format!("ICReq: {e}")))?;
        if req.hpda > 31 {
            return Err(bad(fes::INVALID_HEADER_FIELD, "ICReq: HPDA above 31"));
        }
        let cfg = &self.sh.cfg;
        let resp = IcResp {
            cpda: cfg.cpda,
            header_digest: req.header_digest,
            data_digest: req.data_digest,
            max_h2c_data: cfg.max_h2c_data,
        };
        self.n = Negotiated {
            header_digest: req.header_digest,
            data_digest: req.data_digest,
            cpda: cfg.cpda,
            hpda: req.hpda,
            max_h2c_data: cfg.max_h2c_data,
        };
        self.s.write_all(&resp.encode()).map_err(|_| None)?;
        loop {
            self.one_pdu()?;
        }
    }

    /// Reads one PDU whole, checks it, and acts on it.
    fn one_pdu(&mut self) -> Step {
        let mut ch = [0u8; CH_LEN];
        self.s.read_exact(&mut ch).map_err(|_| None)?;
        let (t, flags, hlen, pdo) = (ch[0], ch[1], ch[2] as usize, ch[3] as usize);
        let plen = le32(&ch, 4) as usize;
        let cfg = &self.sh.cfg;
        let hd = self.n.hd();
        let (want_hlen, max_data) = match t {
            kind::CAPSULE_CMD => (CMD_HLEN, cfg.in_capsule.max(1024)),
            kind::H2C_DATA => (SHORT_HLEN, cfg.max_h2c_data as usize),
            kind::H2C_TERM_REQ => (SHORT_HLEN, 128),
            _ => {
                return Err(bad(
                    fes::INVALID_HEADER_FIELD,
                    format!("PDU type {t:#04x} is not one a host sends after ICReq"),
                ))
            }
        };
        if hlen != want_hlen {
            return Err(bad(
                fes::INVALID_HEADER_FIELD,
                format!("PDU type {t:#04x} with HLEN {hlen}, expected {want_hlen}"),
            ));
        }
        let most = want_hlen + hd + 128 + max_data + DIGEST_LEN;
        if plen < want_hlen || plen > most {
            return Err(bad(
                fes::LIMIT_EXCEEDED,
                format!("PDU type {t:#04x} with PLEN {plen} (at most {most})"),
            ));
        }
        let mut b = vec![0u8; plen];
        b[..CH_LEN].copy_from_slice(&ch);
        self.s.read_exact(&mut b[CH_LEN..]).map_err(|_| None)?;
        if t == kind::H2C_TERM_REQ {
            // No digests on a Terminate Connection Request; the host ends the connection.
            bump(&self.sh.counters.host_terminations);
            return Err(None);
        }
        let after = want_hlen + hd;
        let has_data = plen > after;
        let mut want_flags = 0;
        if self.n.header_digest {
            want_flags |= flag::HDGSTF;
        }
        if self.n.data_digest && has_data {
            want_flags |= flag::DDGSTF;
        }
        let extra = if t == kind::H2C_DATA {
            flag::LAST_PDU
        } else {
            0
        };
        if flags & !extra != want_flags {
            return Err(bad(
                fes::INVALID_HEADER_FIELD,
                format!("PDU type {t:#04x} with flags {flags:#04x}, expected {want_flags:#04x} (and LAST_PDU for H2C Data)"),
            ));
        }
        if self.n.header_digest {
            let got = le32(&b, want_hlen);
            let want = pdu::crc32c(&b[..want_hlen]);
            if got != want {
                return Err(bad(
                    fes::HEADER_DIGEST,
                    format!("PDU type {t:#04x}: header digest {got:#010x}, computed {want:#010x}"),
                ));
            }
        }
        let data = if has_data {
            let want_pdo = align_up(after, self.n.cpda);
            if pdo != want_pdo {
                return Err(bad(
                    fes::INVALID_HEADER_FIELD,
                    format!("PDU type {t:#04x}: PDO {pdo}, expected {want_pdo}"),
                ));
            }
            let end = plen
                .checked_sub(self.n.dd())
                .filter(|&e| e > pdo)
                .ok_or_else(|| {
                    bad(
                        fes::INVALID_HEADER_FIELD,
                        format!("PDU type {t:#04x}: PLEN {plen} leaves no data after PDO {pdo}"),
                    )
                })?;
            if self.n.data_digest {
                let got = le32(&b, end);
                let want = pdu::crc32c(&b[pdo..end]);
                if got != want {
                    return Err(bad(
                        fes::INVALID_HEADER_FIELD,
                        format!(
                            "PDU type {t:#04x}: data digest {got:#010x}, computed {want:#010x}"
                        ),
                    ));
                }
            }
            pdo..end
        } else {
            if pdo != 0 {
                return Err(bad(
                    fes::INVALID_HEADER_FIELD,
                    format!("PDU type {t:#04x} without data has PDO {pdo}"),
                ));
            }
            0..0
        };
        if t == kind::CAPSULE_CMD {
            let mut sqe = [0u8; 64];
            sqe.copy_from_slice(&b[CH_LEN..CMD_HLEN]);
            self.capsule(&sqe, &b[data])
        } else {
            self.h2c(&b[..SHORT_HLEN], flags & flag::LAST_PDU != 0, &b[data])
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Step {
        self.s.write_all(bytes).map_err(|_| None)
    }

    fn respond(&mut self, cid: u16, status: u16, result: u64, fate: Fate) -> Step {
        let cqe = Cqe {
            result,
            sqhd: self.sqhd,
            cid,
            status,
        };
        let mut b = encode_c2h(&C2h::Resp(cqe), &self.n);
        let redigest = |b: &mut Vec<u8>, n: &Negotiated| {
            if n.header_digest {
                let d = pdu::crc32c(&b[..SHORT_HLEN]);
                b[SHORT_HLEN..SHORT_HLEN + DIGEST_LEN].copy_from_slice(&d.to_le_bytes());
            }
        };
        match fate {
            Fate::Corrupt(PduFault::BadType) => {
                b[0] = 0x42;
                redigest(&mut b, &self.n);
            }
            Fate::Corrupt(PduFault::BadLength) => {
                let plen = le32(&b, 4) + 4;
                b[4..8].copy_from_slice(&plen.to_le_bytes());
                redigest(&mut b, &self.n);
            }
            Fate::Corrupt(PduFault::BadHeaderDigest) if self.n.header_digest => {
                b[SHORT_HLEN] ^= 0x5a;
            }
            Fate::Corrupt(PduFault::UnknownCccid) => {
                b[20..22].copy_from_slice(&0xbeefu16.to_le_bytes());
                redigest(&mut b, &self.n);
            }
            Fate::Corrupt(PduFault::Terminate) => {
                // The sender of a Terminate Connection Request closes the connection.
                let t = C2h::Term {
                    fes: fes::UNSUPPORTED,
                    fei: 0,
                };
                self.send(&encode_c2h(&t, &self.n))?;
                return Err(None);
            }
            _ => {}
        }
        self.send(&b)
    }

    /// Sends `data` as C2H Data for command `cid`, then its response (or the SUCCESS
    /// flag on the last PDU).
    fn send_read(&mut self, cid: u16, data: &[u8], fate: Fate) -> Step {
        let max = self.sh.cfg.max_c2h_data.max(1) as usize;
        let success = self.sh.cfg.c2h_success && fate == Fate::Serve;
        let mut off = 0;
        while off < data.len() {
            let l = (data.len() - off).min(max);
            let last = off + l == data.len();
            let d = C2hData {
                cccid: cid,
                datao: off as u32,
                datal: l as u32,
                pad: 0,
                last,
                success: last && success,
            };
            let mut wire = encode_c2h(&C2h::Data(d), &self.n);
            let part = &data[off..off + l];
            wire.extend_from_slice(part);
            if self.n.data_digest {
                let mut dg = pdu::crc32c(part);
                if last && fate == Fate::Corrupt(PduFault::BadDataDigest) {
                    dg ^= 1;
                }
                wire.extend_from_slice(&dg.to_le_bytes());
            }
            self.send(&wire)?;
            bump(&self.sh.counters.c2h_pdus);
            off += l;
        }
        if success {
            return Ok(());
        }
        self.respond(cid, 0, 0, fate)
    }

    fn capsule(&mut self, sqe: &[u8; 64], data: &[u8]) -> Step {
        self.sqhd = (self.sqhd + 1) % (self.sqsize.max(1) + 1);
        let opcode = sqe[0];
        let cid = le16(sqe, 2);
        if sqe[1] & 0xc0 != 0x40 {
            return Err(bad(
                fes::INVALID_HEADER_FIELD,
                format!("command {cid}: PSDT {:#x}, not SGLs", sqe[1] >> 6),
            ));
        }
        let sgl_len = le32(sqe, 32);
        let sgl_id = sqe[39];
        match (sgl_id, data.is_empty()) {
            (SGL_INCAPSULE, _) if le64(sqe, 24) != 0 => {
                return Err(bad(
                    fes::INVALID_HEADER_FIELD,
                    format!(
                        "command {cid}: in-capsule SGL with offset {}",
                        le64(sqe, 24)
                    ),
                ))
            }
            (SGL_INCAPSULE, _) if sgl_len as usize != data.len() => {
                return Err(bad(
                    fes::INVALID_HEADER_FIELD,
                    format!(
                    "command {cid}: in-capsule SGL of {sgl_len} bytes with {} bytes in the capsule",
                    data.len()
                ),
                ))
            }
            (SGL_TRANSPORT, true) => {}
            (SGL_TRANSPORT, false) => {
                return Err(bad(
                    fes::INVALID_HEADER_FIELD,
                    format!(
                        "command {cid}: transport SGL with {} bytes in the capsule",
                        data.len()
                    ),
                ))
            }
            (SGL_INCAPSULE, _) => {}
            (id, _) => {
                return Err(bad(
                    fes::INVALID_HEADER_FIELD,
                    format!("command {cid}: SGL identifier {id:#04x}"),
                ))
            }
        }
        let Some(qid) = self.qid else {
            if opcode == op::FABRICS && sqe[4] == fctype::CONNECT {
                bump(&self.sh.counters.admin_commands);
                return self.connect(sqe, data);
            }
            self.sh.host_error(format!(
                "command {cid} (opcode {opcode:#04x}) before Connect"
            ));
            return self.respond(cid, sc::SEQUENCE_ERROR | sc::DNR, 0, Fate::Serve);
        };
        if qid == 0 {
            bump(&self.sh.counters.admin_commands);
            self.admin(sqe, cid, data)
        } else {
            self.io(sqe, cid, sgl_id, sgl_len, data)
        }
    }

    fn refuse_connect(&mut self, cid: u16, why: String) -> Step {
        bump(&self.sh.counters.connects_refused);
        self.sh.host_error(format!("Connect refused: {why}"));
        self.respond(cid, sc::CONNECT_INVALID_PARAM | sc::DNR, 0, Fate::Serve)
    }

    fn connect(&mut self, sqe: &[u8; 64], data: &[u8]) -> Step {
        let cid = le16(sqe, 2);
        if data.len() != 1024 {
            return self.refuse_connect(cid, format!("{} bytes of data, not 1024", data.len()));
        }
        let qid = le16(sqe, 42);
        let sqsize = le16(sqe, 44);
        let cntlid = le16(data, 16);
        let subnqn = nqn_at(data, 256);
        let hostnqn = nqn_at(data, 512);
        let cfg = &self.sh.cfg;
        if subnqn != cfg.nqn {
            return self.refuse_connect(cid, format!("subsystem {subnqn:?} is not {:?}", cfg.nqn));
        }
        if hostnqn.is_empty() {
            return self.refuse_connect(cid, "no host NQN".into());
        }
        if sqsize == 0 || (qid > 0 && sqsize > cfg.mqes) {
            return self.refuse_connect(cid, format!("queue {qid}: SQSIZE {sqsize}"));
        }
        let cntlid = if qid == 0 {
            if cntlid != 0xffff {
                return self
                    .refuse_connect(cid, format!("admin Connect names controller {cntlid}"));
            }
            let id = self.sh.next_cntlid.fetch_add(1, Ordering::Relaxed);
            lock(&self.sh.ctrls).insert(id, Ctrl::default());
            bump(&self.sh.counters.associations);
            id
        } else {
            let mut ctrls = lock(&self.sh.ctrls);
            let why = match ctrls.get_mut(&cntlid) {
                None => Some(format!("queue {qid}: controller {cntlid} is not live")),
                Some(c) if c.csts & cc::RDY == 0 => {
                    Some(format!("queue {qid}: controller {cntlid} is not enabled"))
                }
                Some(c) if qid > c.granted => Some(format!(
                    "queue {qid}: controller {cntlid} granted {} I/O queues",
                    c.granted
                )),
                Some(c) if c.queues.contains(&qid) => Some(format!(
                    "queue {qid} of controller {cntlid} is connected already"
                )),
                Some(c) => {
                    c.queues.push(qid);
                    None
                }
            };
            drop(ctrls);
            if let Some(why) = why {
                return self.refuse_connect(cid, why);
            }
            cntlid
        };
        self.qid = Some(qid);
        self.cntlid = Some(cntlid);
        self.sqsize = sqsize;
        self.sh.set_conn_cntlid(self.id, cntlid);
        self.respond(cid, 0, cntlid as u64, Fate::Serve)
    }

    fn with_ctrl<R>(&self, f: impl FnOnce(&mut Ctrl) -> R) -> Option<R> {
        let id = self.cntlid?;
        lock(&self.sh.ctrls).get_mut(&id).map(f)
    }

    fn admin(&mut self, sqe: &[u8; 64], cid: u16, data: &[u8]) -> Step {
        if !data.is_empty() {
            self.sh
                .host_error(format!("admin command {cid} with in-capsule data"));
        }
        let cfg = &self.sh.cfg;
        match sqe[0] {
            op::FABRICS => match sqe[4] {
                fctype::PROPERTY_GET => {
                    let eight = sqe[40] & 1 != 0;
                    let off = le32(sqe, 44);
                    let cap = cfg.mqes as u64 | 1 << 16 | (cfg.cap_to as u64) << 24 | 1 << 37;
                    let v = match (off, eight) {
                        (prop::CAP, true) => Some(cap),
                        (prop::VS, false) => Some(0x0001_0400),
                        (prop::CC, false) => self.with_ctrl(|c| c.cc as u64),
                        (prop::CSTS, false) => self.with_ctrl(|c| c.csts as u64),
                        _ => None,
                    };
                    match v {
                        Some(v) => self.respond(cid, 0, v, Fate::Serve),
                        None => {
                            self.sh.host_error(format!(
                                "Property Get of {off:#x} ({} bytes)",
                                if eight { 8 } else { 4 }
                            ));
                            self.respond(cid, sc::INVALID_FIELD | sc::DNR, 0, Fate::Serve)
                        }
                    }
                }
                fctype::PROPERTY_SET => {
                    let off = le32(sqe, 44);
                    let v = le32(sqe, 48);
                    if off != prop::CC || sqe[40] & 1 != 0 {
                        self.sh.host_error(format!("Property Set of {off:#x}"));
                        return self.respond(cid, sc::INVALID_FIELD | sc::DNR, 0, Fate::Serve);
                    }
                    let sizes_ok = v & cc::EN == 0 || v & (0xff << 16) == cc::QUEUE_ENTRY_SIZES;
                    self.with_ctrl(|c| {
                        c.cc = v;
                        c.csts = if v & cc::EN != 0 && sizes_ok {
                            cc::RDY
                        } else {
                            0
                        };
                        if !sizes_ok {
                            c.csts |= cc::CFS;
                        }
                        if v & cc::SHN_NORMAL != 0 {
                            c.csts = (c.csts & !cc::SHST_MASK) | cc::SHST_DONE;
                        }
                    });
                    if !sizes_ok {
                        self.sh
                            .host_error(format!("CC {v:#x}: IOSQES/IOCQES are not 6/4"));
                    }
                    self.respond(cid, 0, 0, Fate::Serve)
                }
                f => {
                    self.sh
                        .host_error(format!("Fabrics command type {f:#04x} on the admin queue"));
                    self.respond(cid, sc::INVALID_OPCODE | sc::DNR, 0, Fate::Serve)
                }
            },
            op::IDENTIFY => {
                if le32(sqe, 32) != 4096 || sqe[39] != SGL_TRANSPORT {
                    self.sh.host_error(format!(
                        "Identify with an SGL of {} bytes, identifier {:#04x}",
                        le32(sqe, 32),
                        sqe[39]
                    ));
                    return self.respond(cid, sc::SGL_LENGTH_INVALID | sc::DNR, 0, Fate::Serve);
                }
                let cns = sqe[40];
                let nsid = le32(sqe, 4);
                let Some(b) = self.identify(cns, nsid) else {
                    return self.respond(cid, sc::INVALID_FIELD | sc::DNR, 0, Fate::Serve);
                };
                self.send_read(cid, &b, Fate::Serve)
            }
            op::SET_FEATURES => {
                if sqe[40] != 0x07 {
                    return self.respond(cid, sc::INVALID_FIELD | sc::DNR, 0, Fate::Serve);
                }
                let nsqr = le16(sqe, 44) as u32 + 1;
                let ncqr = le16(sqe, 46) as u32 + 1;
                let granted = nsqr.min(ncqr).min(cfg.io_queues as u32).max(1) as u16;
                self.with_ctrl(|c| c.granted = granted);
                let z = (granted - 1) as u64;
                self.respond(cid, 0, z | z << 16, Fate::Serve)
            }
            op::KEEP_ALIVE => {
                bump(&self.sh.counters.keep_alives);
                self.respond(cid, 0, 0, Fate::Serve)
            }
            o => {
                self.sh.host_error(format!("admin opcode {o:#04x}"));
                self.respond(cid, sc::INVALID_OPCODE | sc::DNR, 0, Fate::Serve)
            }
        }
    }

    fn identify(&self, cns: u8, nsid: u32) -> Option<Vec<u8>> {
        let cfg = &self.sh.cfg;
        let mut b = vec![0u8; 4096];
        let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        match cns {
            1 => {
                put(&mut b, 0, &0x1b36u16.to_le_bytes());
                put(&mut b, 4, format!("{:<20}", "TCPSIM0001").as_bytes());
                put(
                    &mut b,
                    24,
                    format!("{:<40}", "nvcopy software NVMe/TCP target").as_bytes(),
                );
                put(&mut b, 64, b"0.1     ");
                b[77] = cfg.mdts;
                put(&mut b, 78, &self.cntlid.unwrap_or(0).to_le_bytes());
                put(&mut b, 80, &0x0001_0400u32.to_le_bytes());
                put(&mut b, 514, &(cfg.mqes + 1).to_le_bytes()); // MAXCMD
                put(&mut b, 516, &(cfg.namespaces.len() as u32).to_le_bytes());
                put(&mut b, 520, &(1u16 << 3).to_le_bytes()); // ONCS: Write Zeroes
                b[525] = 1; // VWC: a volatile write cache, so Flush matters
                let n = cfg.nqn.len().min(255);
                put(&mut b, 768, &cfg.nqn.as_bytes()[..n]);
                let ioccsz = ((cfg.in_capsule + 64) / 16) as u32;
                put(&mut b, 1792, &ioccsz.to_le_bytes());
                put(&mut b, 1796, &1u32.to_le_bytes()); // IORCSZ
            }
            0 => {
                if let Some(ns) = (nsid as usize)
                    .checked_sub(1)
                    .and_then(|i| cfg.namespaces.get(i))
                {
                    put(&mut b, 0, &ns.blocks.to_le_bytes());
                    put(&mut b, 8, &ns.blocks.to_le_bytes());
                    put(&mut b, 16, &ns.blocks.to_le_bytes());
                    let lbads = ns.block_size.trailing_zeros();
                    put(&mut b, 128, &(lbads << 16).to_le_bytes());
                    // NGUID: the port and the namespace, so that media ids differ per target.
                    put(&mut b, 104, &(self.sh.addr.port() as u64).to_le_bytes());
                    put(
                        &mut b,
                        112,
                        &(nsid as u64 | 0x5349_4d00_0000_0000).to_le_bytes(),
                    );
                } else if nsid == 0 || nsid == u32::MAX {
                    return None;
                }
            }
            2 => {
                let ids = (1..=cfg.namespaces.len() as u32).filter(|&i| i > nsid);
                for (k, i) in ids.take(1024).enumerate() {
                    put(&mut b, 4 * k, &i.to_le_bytes());
                }
            }
            _ => return None,
        }
        Some(b)
    }

    /// Namespace `nsid`'s byte range for `blocks` blocks at `lba`, or a status.
    fn range(&self, nsid: u32, lba: u64, blocks: u64) -> Result<(usize, usize), u16> {
        let ns = (nsid as usize)
            .checked_sub(1)
            .and_then(|i| self.sh.cfg.namespaces.get(i))
            .ok_or(sc::INVALID_NAMESPACE | sc::DNR)?;
        if lba.checked_add(blocks).is_none_or(|e| e > ns.blocks) {
            return Err(sc::LBA_OUT_OF_RANGE | sc::DNR);
        }
        let bs = ns.block_size as usize;
        Ok((lba as usize * bs, blocks as usize * bs))
    }

    fn io(&mut self, sqe: &[u8; 64], cid: u16, sgl_id: u8, sgl_len: u32, data: &[u8]) -> Step {
        let opcode = sqe[0];
        if !matches!(opcode, op::READ | op::WRITE | op::WRITE_ZEROES | op::FLUSH) {
            self.sh.host_error(format!("I/O opcode {opcode:#04x}"));
            return self.respond(cid, sc::INVALID_OPCODE | sc::DNR, 0, Fate::Serve);
        }
        let fate = self.sh.fate(opcode == op::READ);
        match fate {
            Fate::Drop => {
                self.sh.close_all();
                return Err(None);
            }
            Fate::Stall => return Ok(()),
            _ => {}
        }
        let nsid = le32(sqe, 4);
        let lba = le64(sqe, 40);
        let blocks = (le32(sqe, 48) & 0xffff) as u64 + 1;
        let counters = &self.sh.counters;
        if opcode == op::FLUSH {
            bump(&counters.flushes);
            if nsid == 0 || nsid as usize > self.sh.cfg.namespaces.len() && nsid != u32::MAX {
                return self.respond(cid, sc::INVALID_NAMESPACE | sc::DNR, 0, fate);
            }
            return self.respond(cid, 0, 0, fate);
        }
        let (at, len) = match self.range(nsid, lba, blocks) {
            Ok(r) => r,
            Err(st) => return self.respond(cid, st, 0, fate),
        };
        let mdts = match self.sh.cfg.mdts {
            0 => usize::MAX,
            m => 4096usize << m,
        };
        match opcode {
            op::WRITE_ZEROES => {
                bump(&counters.write_zeroes);
                if sgl_len != 0 {
                    self.sh
                        .host_error(format!("Write Zeroes {cid} with an SGL of {sgl_len} bytes"));
                }
                lock(&self.sh.media[nsid as usize - 1])[at..at + len].fill(0);
                self.respond(cid, 0, 0, fate)
            }
            _ if sgl_len as usize != len || len > mdts => {
                self.sh.host_error(format!(
                    "command {cid} (opcode {opcode:#04x}): SGL of {sgl_len} bytes for {blocks} blocks ({len} bytes; MDTS {mdts})"
                ));
                self.respond(cid, sc::SGL_LENGTH_INVALID | sc::DNR, 0, fate)
            }
            op::READ => {
                bump(&counters.reads);
                if sgl_id != SGL_TRANSPORT {
                    self.sh
                        .host_error(format!("read {cid} with an in-capsule SGL"));
                    return self.respond(cid, sc::INVALID_FIELD | sc::DNR, 0, fate);
                }
                let b = lock(&self.sh.media[nsid as usize - 1])[at..at + len].to_vec();
                self.send_read(cid, &b, fate)
            }
            _ => {
                if sgl_id == SGL_INCAPSULE {
                    bump(&counters.writes_in_capsule);
                    if len > self.sh.cfg.in_capsule {
                        self.sh.host_error(format!(
                            "write {cid}: {len} bytes in the capsule, more than IOCCSZ allows ({})",
                            self.sh.cfg.in_capsule
                        ));
                        return self.respond(cid, sc::SGL_LENGTH_INVALID | sc::DNR, 0, fate);
                    }
                    lock(&self.sh.media[nsid as usize - 1])[at..at + len].copy_from_slice(data);
                    return self.respond(cid, 0, 0, fate);
                }
                bump(&counters.writes_r2t);
                if self.pending.contains_key(&cid) {
                    return Err(bad(
                        fes::SEQUENCE_ERROR,
                        format!("write {cid} posted while a write of that id waits for data"),
                    ));
                }
                let ttag = self.next_ttag;
                self.next_ttag = self.next_ttag.wrapping_add(1).max(1);
                self.pending.insert(
                    cid,
                    PendingWrite {
                        nsid,
                        at,
                        buf: vec![0; len],
                        got: 0,
                        asked: 0,
                        ttag,
                        fate,
                    },
                );
                self.r2t(cid)
            }
        }
    }

    /// Asks for the next part of write `cid`'s data.
    fn r2t(&mut self, cid: u16) -> Step {
        let max = self.sh.cfg.max_r2t.max(4096);
        let Some(w) = self.pending.get_mut(&cid) else {
            return Ok(());
        };
        let len = w.buf.len() as u32;
        let l = (len - w.asked).min(max);
        let r = R2t {
            cccid: cid,
            ttag: w.ttag,
            r2to: w.asked,
            r2tl: l,
        };
        w.asked += l;
        bump(&self.sh.counters.r2ts);
        let b = encode_c2h(&C2h::R2t(r), &self.n);
        self.send(&b)
    }

    fn h2c(&mut self, hdr: &[u8], last: bool, data: &[u8]) -> Step {
        bump(&self.sh.counters.h2c_pdus);
        let cccid = le16(hdr, 8);
        let ttag = le16(hdr, 10);
        let datao = le32(hdr, 12);
        let datal = le32(hdr, 16);
        let max = self.sh.cfg.max_h2c_data;
        let Some(w) = self.pending.get_mut(&cccid) else {
            return Err(bad(
                fes::INVALID_HEADER_FIELD,
                format!("H2C Data for command {cccid}, which waits for no data"),
            ));
        };
        let end = datao as u64 + datal as u64;
        let why = if ttag != w.ttag {
            Some((
                fes::INVALID_HEADER_FIELD,
                format!("transfer tag {ttag}, expected {}", w.ttag),
            ))
        } else if datal as usize != data.len() {
            Some((
                fes::INVALID_HEADER_FIELD,
                format!("DATAL {datal} with {} bytes of data", data.len()),
            ))
        } else if datal > max {
            Some((
                fes::LIMIT_EXCEEDED,
                format!("DATAL {datal} above MAXH2CDATA {max}"),
            ))
        } else if datao != w.got || end > w.asked as u64 {
            Some((
                fes::OUT_OF_RANGE,
                format!(
                    "bytes {datao}..{end}; {} received and {} asked for",
                    w.got, w.asked
                ),
            ))
        } else if last != (end == w.asked as u64) {
            Some((
                fes::INVALID_HEADER_FIELD,
                format!(
                    "LAST_PDU {last} on bytes {datao}..{end} of an R2T ending at {}",
                    w.asked
                ),
            ))
        } else {
            None
        };
        if let Some((f, why)) = why {
            return Err(bad(f, format!("H2C Data for command {cccid}: {why}")));
        }
        w.buf[datao as usize..end as usize].copy_from_slice(data);
        w.got = end as u32;
        if w.got < w.asked {
            return Ok(());
        }
        if (w.got as usize) < w.buf.len() {
            return self.r2t(cccid);
        }
        let Some(w) = self.pending.remove(&cccid) else {
            return Ok(());
        };
        lock(&self.sh.media[w.nsid as usize - 1])[w.at..w.at + w.buf.len()].copy_from_slice(&w.buf);
        self.respond(cccid, 0, 0, w.fate)
    }
}
