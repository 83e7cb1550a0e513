//! The Discovery service over NVMe/TCP: connect to a target's discovery controller (the
//! well-known subsystem NQN `nqn.2014-08.org.nvmexpress.discovery`), read its Discovery
//! log page (Get Log Page, LID 70h) and say which of its entries nvcopy can use as a
//! region (`nvme+tcp://TRADDR:TRSVCID/SUBNQN`).
//!
//! The log's layout is in the NVMe Base Specification 2.0, Get Log Page, "Discovery
//! (Log Page Identifier 70h)" (before 2.0: NVMe over Fabrics 1.1, "Discovery Log Page"): a 1024-byte header (GENCTR, NUMREC, RECFMT) and then NUMREC
//! entries of 1024 bytes each. Everything in it comes from the peer, so:
//!
//! - NUMREC is believed only up to [`MAX_RECORDS`]: a larger count reads the first
//!   [`MAX_RECORDS`] entries and says the log was capped, rather than asking for (and
//!   allocating) gigabytes a broken or hostile target claims to have.
//! - Never more than the header announced is asked for. Linux nvmet (6.1) serves a Get
//!   Log Page at an offset past the end of its log from beyond its own buffer, so asking
//!   for more is not harmless to the target either.
//! - The log is read as the spec tells a host that reads it in more than one command:
//!   the header first, the entries in increasing offsets, then the header again; if the
//!   Generation Counter (or the record count) moved, the entries may be a mix of two
//!   versions and are thrown away, and the whole read is done again, up to
//!   [`MAX_ATTEMPTS`] times.
//! - An entry whose strings are not printable ASCII, or hold bytes after their
//!   terminating NUL, is skipped with a note ([`Skipped`]) instead of failing the whole
//!   listing: the other entries are still good, and the note names the field. (Trailing
//!   spaces are accepted and trimmed: some targets, SPDK's among them, pad TRADDR and
//!   TRSVCID with spaces rather than NULs.)
//! - Entries of transports other than TCP are listed as they are, and never turned into
//!   a region.
//!
//! Keep Alive: this client connects with a Keep Alive Timeout of 0, as a host that reads
//! the log once and disconnects may (only a persistent discovery connection needs Keep
//! Alive). Linux nvmet accepts 0 from a discovery host and arms a timer of its own
//! (120 s) to reap sessions that are left open; a listing takes well under a second.

use std::time::Duration;

use crate::cmd::{self, cc};
use crate::ctrl::{associate, reach, shutdown, Options, Target};
use crate::error::{Error, Result};
use crate::queue::Dir;

/// The well-known NQN of a discovery subsystem (base spec 2.0, "NVMe Qualified
/// Names").
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// The NVMe/TCP well-known discovery port (IANA: 8009, nvme-disc; the NVMe/TCP
/// transport specification), the default of `--discover` as of nvme-cli's. Linux nvmet
/// also answers discovery on every port it serves (4420 for I/O, usually), so a target
/// set up by `nvmet-setup.sh` is reached on 4420.
pub const DISCOVERY_PORT: u16 = 8009;

/// The Discovery log page's identifier.
pub const LID_DISCOVERY: u8 = 0x70;

/// Bytes of the log's header.
pub const HEADER_LEN: usize = 1024;

/// Bytes of one log entry.
pub const ENTRY_LEN: usize = 1024;

/// Most entries read from one log (1 MiB of entries). A target that reports more is
/// listed up to this many, with a note.
pub const MAX_RECORDS: u64 = 1024;

/// Reads of the whole log before giving up on a log whose Generation Counter keeps
/// changing.
pub const MAX_ATTEMPTS: u32 = 4;

/// Entries asked for per Get Log Page: 4 KiB, within any controller's MDTS (at least
/// one memory page), so the read needs no knowledge of the discovery controller's
/// limits.
const RECORDS_PER_READ: u64 = 4;

/// Transport types (TRTYPE; NVMe over Fabrics "Transport Type codes").
pub mod trtype {
    /// RDMA.
    pub const RDMA: u8 = 1;
    /// Fibre Channel.
    pub const FC: u8 = 2;
    /// TCP.
    pub const TCP: u8 = 3;
    /// Intra-host transport (Linux's loop).
    pub const LOOP: u8 = 254;
}

/// Address families (ADRFAM).
pub mod adrfam {
    /// IPv4.
    pub const IPV4: u8 = 1;
    /// IPv6.
    pub const IPV6: u8 = 2;
    /// InfiniBand.
    pub const IB: u8 = 3;
    /// Fibre Channel.
    pub const FC: u8 = 4;
    /// Intra-host.
    pub const LOOP: u8 = 254;
}

/// Subsystem types (SUBTYPE).
pub mod subtype {
    /// A discovery subsystem other than this one: a referral.
    pub const REFERRAL: u8 = 1;
    /// An NVM subsystem: namespaces to do I/O on.
    pub const NVM: u8 = 2;
    /// The discovery subsystem that returned the log (base spec 2.0).
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// The name of a transport type, as nvme-cli and nvmet's configfs spell them.
pub fn transport_name(t: u8) -> &'static str {
    match t {
        trtype::RDMA => "rdma",
        trtype::FC => "fc",
        trtype::TCP => "tcp",
        trtype::LOOP => "loop",
        _ => "unknown",
    }
}

/// The name of an address family.
pub fn family_name(a: u8) -> &'static str {
    match a {
        adrfam::IPV4 => "ipv4",
        adrfam::IPV6 => "ipv6",
        adrfam::IB => "ib",
        adrfam::FC => "fc",
        adrfam::LOOP => "loop",
        _ => "unknown",
    }
}

/// The name of a subsystem type.
pub fn subtype_name(s: u8) -> &'static str {
    match s {
        subtype::REFERRAL => "referral",
        subtype::NVM => "nvm",
        subtype::CURRENT_DISCOVERY => "current discovery",
        _ => "unknown",
    }
}

/// What TREQ bits 1:0 say about a secure channel.
pub fn secure_channel_name(treq: u8) -> &'static str {
    match treq & 3 {
        0 => "not specified",
        1 => "required",
        2 => "not required",
        _ => "reserved",
    }
}

/// Why a Discovery log could not be used as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogProblem {
    /// A Get Log Page returned less data than asked for.
    #[error("a Get Log Page returned {got} bytes of the {want} asked for at offset {offset}")]
    Short {
        /// Offset in the log.
        offset: u64,
        /// Bytes asked for.
        want: usize,
        /// Bytes returned.
        got: usize,
    },
    /// RECFMT is not 0, the only format defined.
    #[error("record format {0} is not 0, the only one the spec defines (base spec 2.0, Discovery log page); nvcopy cannot read this log")]
    RecordFormat(u16),
    /// The Generation Counter changed during every read.
    #[error("the log changed while it was read (generation counter {first} became {last}), on each of {attempts} tries; the target's configuration is changing: try again once it settles")]
    KeptChanging {
        /// GENCTR at the first read.
        first: u64,
        /// GENCTR at the last.
        last: u64,
        /// Reads tried.
        attempts: u32,
    },
}

/// Why one entry was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    /// A string field that is not NUL-padded printable ASCII.
    #[error("its {field} field {why}")]
    Field {
        /// TRSVCID, TRADDR or SUBNQN.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// The Discovery log's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    /// Generation Counter: changes whenever the log does.
    pub genctr: u64,
    /// Number of records the controller has.
    pub numrec: u64,
    /// Record format (0).
    pub recfmt: u16,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl LogHeader {
    /// Parses the header from the first [`HEADER_LEN`] bytes of the log (bytes 0-7
    /// GENCTR, 8-15 NUMREC, 16-17 RECFMT).
    pub fn parse(b: &[u8]) -> std::result::Result<LogHeader, LogProblem> {
        if b.len() < HEADER_LEN {
            return Err(LogProblem::Short {
                offset: 0,
                want: HEADER_LEN,
                got: b.len(),
            });
        }
        let h = LogHeader {
            genctr: le64(b, 0),
            numrec: le64(b, 8),
            recfmt: le16(b, 16),
        };
        if h.recfmt != 0 {
            return Err(LogProblem::RecordFormat(h.recfmt));
        }
        Ok(h)
    }
}

/// One Discovery log entry (base spec 2.0, Discovery Log Page Entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, from 0.
    pub index: u64,
    /// Transport type (byte 0).
    pub trtype: u8,
    /// Address family (byte 1).
    pub adrfam: u8,
    /// Subsystem type (byte 2).
    pub subtype: u8,
    /// Transport requirements (byte 3).
    pub treq: u8,
    /// Port id (bytes 4-5).
    pub portid: u16,
    /// Controller id (bytes 6-7; FFFFh: dynamic, any controller).
    pub cntlid: u16,
    /// Admin queue size the controller supports at most (bytes 8-9).
    pub asqsz: u16,
    /// Entry flags (bytes 10-11, base spec 2.0).
    pub eflags: u16,
    /// Transport service identifier (bytes 32-63): for TCP, the port.
    pub trsvcid: String,
    /// Subsystem NQN (bytes 256-511).
    pub subnqn: String,
    /// Transport address (bytes 512-767): for TCP, the IP address.
    pub traddr: String,
    /// For TCP: the security type of the transport specific address subtype (TSAS
    /// byte 0; 0 none, 1 TLS 1.2, 2 TLS 1.3).
    pub tcp_sectype: Option<u8>,
}

/// An entry left out of the listing, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its position in the log.
    pub index: u64,
    /// What was wrong with it.
    pub problem: EntryProblem,
}

/// A string field: printable ASCII up to the first NUL and only NULs after it; trailing
/// spaces are padding too.
fn text(b: &[u8], field: &'static str) -> std::result::Result<String, EntryProblem> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    if b[end..].iter().any(|&c| c != 0) {
        return Err(EntryProblem::Field {
            field,
            why: "holds bytes after its terminating NUL (it must be NUL-padded)",
        });
    }
    let s = &b[..end];
    if s.iter().any(|c| !(0x20..=0x7e).contains(c)) {
        return Err(EntryProblem::Field {
            field,
            why: "holds bytes that are not printable ASCII",
        });
    }
    let s: String = s.iter().map(|&c| c as char).collect();
    Ok(s.trim_end_matches(' ').to_string())
}

/// Why an entry is not a region nvcopy can copy to or from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotARegion {
    /// Not NVMe/TCP.
    #[error("transport {0} ({name}): nvcopy reaches only NVMe/TCP", name = transport_name(*.0))]
    Transport(u8),
    /// A referral: another discovery subsystem, not an NVM subsystem.
    #[error("a referral to another discovery subsystem, not an NVM subsystem: list it with `nvcopy list --discover {0}`")]
    Referral(String),
    /// The discovery subsystem that returned the log.
    #[error("this discovery subsystem itself, not an NVM subsystem")]
    CurrentDiscovery,
    /// Some other subsystem type.
    #[error("subsystem type {0} is not an NVM subsystem")]
    Subtype(u8),
    /// TRSVCID is not a TCP port.
    #[error("TRSVCID {0:?} is not a TCP port number")]
    Port(String),
    /// No TRADDR.
    #[error("no transport address")]
    Address,
    /// A SUBNQN a region cannot name.
    #[error("the subsystem NQN is empty, longer than 223 bytes, or holds a /")]
    Nqn,
}

impl Entry {
    /// Parses the entry at position `index` from its [`ENTRY_LEN`] bytes.
    pub fn parse(index: u64, b: &[u8]) -> std::result::Result<Entry, EntryProblem> {
        if b.len() < ENTRY_LEN {
            return Err(EntryProblem::Field {
                field: "entry",
                why: "is shorter than 1024 bytes",
            });
        }
        let trtype = b[0];
        Ok(Entry {
            index,
            trtype,
            adrfam: b[1],
            subtype: b[2],
            treq: b[3],
            portid: le16(b, 4),
            cntlid: le16(b, 6),
            asqsz: le16(b, 8),
            eflags: le16(b, 10),
            trsvcid: text(&b[32..64], "TRSVCID")?,
            subnqn: text(&b[256..512], "SUBNQN")?,
            traddr: text(&b[512..768], "TRADDR")?,
            tcp_sectype: (trtype == trtype::TCP).then_some(b[768]),
        })
    }

    /// `HOST:PORT` of the entry, IPv6 addresses in brackets.
    pub fn host_port(&self) -> String {
        if self.adrfam == adrfam::IPV6 || self.traddr.contains(':') {
            format!("[{}]:{}", self.traddr, self.trsvcid)
        } else {
            format!("{}:{}", self.traddr, self.trsvcid)
        }
    }

    /// The region URL that reaches the entry's subsystem, `nvme+tcp://TRADDR:TRSVCID/SUBNQN`,
    /// or why there is none.
    pub fn region_url(&self) -> std::result::Result<String, NotARegion> {
        if self.trtype != trtype::TCP {
            return Err(NotARegion::Transport(self.trtype));
        }
        match self.subtype {
            subtype::NVM => {}
            subtype::REFERRAL => return Err(NotARegion::Referral(self.host_port())),
            subtype::CURRENT_DISCOVERY => return Err(NotARegion::CurrentDiscovery),
            s => return Err(NotARegion::Subtype(s)),
        }
        if self.traddr.is_empty() {
            return Err(NotARegion::Address);
        }
        if !matches!(self.trsvcid.parse::<u16>(), Ok(p) if p > 0) {
            return Err(NotARegion::Port(self.trsvcid.clone()));
        }
        let nqn = &self.subnqn;
        if nqn.is_empty() || nqn.len() > 223 || nqn.contains('/') {
            return Err(NotARegion::Nqn);
        }
        Ok(format!("nvme+tcp://{}/{}", self.host_port(), nqn))
    }
}

/// A Discovery log as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryLog {
    /// The header (of the read that was kept).
    pub header: LogHeader,
    /// The entries that parsed, in log order.
    pub entries: Vec<Entry>,
    /// The entries that did not.
    pub skipped: Vec<Skipped>,
    /// Whether NUMREC was above [`MAX_RECORDS`] and only that many were read.
    pub capped: bool,
    /// Reads of the log it took (more than 1 when the log changed meanwhile).
    pub attempts: u32,
}

/// Reads a Discovery log through `get(offset, len)`, which returns `len` bytes of the
/// log from `offset` (one Get Log Page): the header, the entries in increasing offsets,
/// four entries (4 KiB) at a time, then the header again to check that the log did not
/// change meanwhile (base spec 2.0, Discovery log page: a host reading the log in several
/// commands compares GENCTR before and after, and reads it again when it differs).
/// `target` names the controller in errors.
pub fn read_log(
    target: &str,
    mut get: impl FnMut(u64, u32) -> Result<Vec<u8>>,
) -> Result<DiscoveryLog> {
    let problem = |problem| Error::DiscoveryLog {
        target: target.to_string(),
        problem,
    };
    let mut fetch = |offset: u64, want: usize| -> Result<Vec<u8>> {
        // `want` is at most RECORDS_PER_READ entries, so it fits a u32.
        let b = get(offset, want as u32)?;
        if b.len() < want {
            return Err(problem(LogProblem::Short {
                offset,
                want,
                got: b.len(),
            }));
        }
        Ok(b)
    };
    let header = |fetch: &mut dyn FnMut(u64, usize) -> Result<Vec<u8>>| -> Result<LogHeader> {
        LogHeader::parse(&fetch(0, HEADER_LEN)?).map_err(|p| Error::DiscoveryLog {
            target: target.to_string(),
            problem: p,
        })
    };
    let mut first = None;
    let mut last = 0;
    for attempt in 1..=MAX_ATTEMPTS {
        let h = header(&mut fetch)?;
        first.get_or_insert(h.genctr);
        let n = h.numrec.min(MAX_RECORDS);
        let mut raw = Vec::with_capacity(n as usize * ENTRY_LEN);
        let mut i = 0;
        while i < n {
            let count = (n - i).min(RECORDS_PER_READ);
            let offset = HEADER_LEN as u64 + i * ENTRY_LEN as u64;
            let want = count as usize * ENTRY_LEN;
            raw.extend_from_slice(&fetch(offset, want)?[..want]);
            i += count;
        }
        let again = header(&mut fetch)?;
        last = again.genctr;
        if again.genctr != h.genctr || again.numrec != h.numrec {
            continue;
        }
        let mut entries = Vec::new();
        let mut skipped = Vec::new();
        for (index, b) in (0u64..).zip(raw.chunks_exact(ENTRY_LEN)) {
            match Entry::parse(index, b) {
                Ok(e) => entries.push(e),
                Err(problem) => skipped.push(Skipped { index, problem }),
            }
        }
        return Ok(DiscoveryLog {
            header: h,
            entries,
            skipped,
            capped: h.numrec > MAX_RECORDS,
            attempts: attempt,
        });
    }
    Err(problem(LogProblem::KeptChanging {
        first: first.unwrap_or(last),
        last,
        attempts: MAX_ATTEMPTS,
    }))
}

/// Connects to the discovery controller at `host:port` (admin queue only, Keep Alive
/// Timeout 0 whatever `opts.kato` says), enables it as any controller is enabled (the
/// association bring-up [`Controller::connect`](crate::Controller::connect) uses), reads
/// its Discovery log ([`read_log`]) and shuts it down. No reconnection: a listing that
/// loses its connection fails, and running it again is the retry.
pub fn discover(host: &str, port: u16, opts: &Options) -> Result<DiscoveryLog> {
    let t = Target {
        host: host.to_string(),
        port,
        nqn: DISCOVERY_NQN.to_string(),
    };
    let (addrs, hostid, hostnqn) = reach(&t, opts)?;
    let opts = Options {
        kato: Duration::ZERO,
        ..opts.clone()
    };
    let cc_value = cc::EN | cc::QUEUE_ENTRY_SIZES;
    let (mut assoc, _cap) = associate(&t, &addrs, &opts, (&hostid, &hostnqn), cc_value)?;
    let log = read_log(&t.to_string(), |offset, len| {
        let (_, data) = assoc.admin.run(
            "Get Log Page (Discovery)",
            cmd::get_log_page(LID_DISCOVERY, offset, len),
            Dir::ToHost,
            vec![0; len as usize],
            false,
        )?;
        Ok(data.unwrap_or_default())
    });
    shutdown(&mut assoc, cc_value);
    log
}

/// Why a `--discover` address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No host.
    #[error("{0:?} names no host: give HOST[:PORT], e.g. 10.0.0.2 or 10.0.0.2:4420")]
    NoHost(String),
    /// A bad port.
    #[error("{0:?}: the port is not a number from 1 to 65535")]
    Port(String),
    /// An IPv6 address without brackets.
    #[error("{0:?}: write an IPv6 address in brackets, e.g. [::1] or [::1]:4420")]
    Ipv6(String),
    /// An unclosed bracket, or something after it that is not `:PORT`.
    #[error("{0:?}: an IPv6 address is [ADDR] or [ADDR]:PORT")]
    Brackets(String),
}

/// Parses `HOST[:PORT]` (IPv6 as `[ADDR][:PORT]`) of a discovery controller; the port
/// defaults to [`DISCOVERY_PORT`], as nvme-cli's does.
pub fn parse_address(s: &str) -> std::result::Result<(String, u16), AddressError> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (h, rest) = v6
            .split_once(']')
            .ok_or_else(|| AddressError::Brackets(s.to_string()))?;
        match rest {
            "" => (h, None),
            r => (
                h,
                Some(
                    r.strip_prefix(':')
                        .ok_or_else(|| AddressError::Brackets(s.to_string()))?,
                ),
            ),
        }
    } else {
        match s.split_once(':') {
            Some((_, p)) if p.contains(':') => return Err(AddressError::Ipv6(s.to_string())),
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(AddressError::NoHost(s.to_string()));
    }
    let port = match port {
        None => DISCOVERY_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| AddressError::Port(s.to_string()))?,
    };
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn header(genctr: u64, numrec: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&genctr.to_le_bytes());
        b[8..16].copy_from_slice(&numrec.to_le_bytes());
        b
    }

    fn put(b: &mut [u8], at: usize, s: &str) {
        b[at..at + s.len()].copy_from_slice(s.as_bytes());
    }

    fn entry(trtype: u8, subtype: u8, traddr: &str, trsvcid: &str, nqn: &str) -> Vec<u8> {
        let mut b = vec![0u8; ENTRY_LEN];
        b[0] = trtype;
        b[1] = adrfam::IPV4;
        b[2] = subtype;
        b[3] = 2;
        b[4..6].copy_from_slice(&7u16.to_le_bytes());
        b[6..8].copy_from_slice(&0xffffu16.to_le_bytes());
        b[8..10].copy_from_slice(&32u16.to_le_bytes());
        put(&mut b, 32, trsvcid);
        put(&mut b, 256, nqn);
        put(&mut b, 512, traddr);
        b
    }

    /// A log as a target holds it: header then entries.
    fn log(genctr: u64, entries: &[Vec<u8>]) -> Vec<u8> {
        let mut b = header(genctr, entries.len() as u64);
        for e in entries {
            b.extend_from_slice(e);
        }
        b
    }

    /// `get` over a sequence of logs: each Get Log Page is served from the log that is
    /// current then; `reads` records (offset, len).
    struct Fake {
        logs: Vec<Vec<u8>>,
        /// After how many commands each log gives way to the next.
        change_after: Vec<usize>,
        reads: RefCell<Vec<(u64, u32)>>,
    }

    impl Fake {
        fn one(b: Vec<u8>) -> Fake {
            Fake {
                logs: vec![b],
                change_after: vec![],
                reads: RefCell::new(vec![]),
            }
        }

        fn get(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
            let n = self.reads.borrow().len();
            self.reads.borrow_mut().push((offset, len));
            let which = self.change_after.iter().filter(|&&c| n >= c).count();
            let b = &self.logs[which.min(self.logs.len() - 1)];
            // Like a target: the bytes it has, zeroes past its end.
            let mut out = vec![0u8; len as usize];
            let start = (offset as usize).min(b.len());
            let end = (offset as usize + len as usize).min(b.len());
            out[..end - start].copy_from_slice(&b[start..end]);
            Ok(out)
        }
    }

    const NQN: &str = "nqn.2026-12.io.nvcopy:vm-tcp";

    #[test]
    fn reads_header_then_entries_then_header_again() {
        let entries: Vec<Vec<u8>> = (0..6)
            .map(|i| {
                entry(
                    trtype::TCP,
                    subtype::NVM,
                    "10.0.0.2",
                    "4420",
                    &format!("{NQN}{i}"),
                )
            })
            .collect();
        let fake = Fake::one(log(9, &entries));
        let l = read_log("t", |o, n| fake.get(o, n)).unwrap();
        assert_eq!(
            l.header,
            LogHeader {
                genctr: 9,
                numrec: 6,
                recfmt: 0
            }
        );
        assert_eq!(
            (l.entries.len(), l.skipped.len(), l.capped, l.attempts),
            (6, 0, false, 1)
        );
        assert_eq!(l.entries[5].subnqn, format!("{NQN}5"));
        assert_eq!(l.entries[5].index, 5);
        // Header, entries 0-3 and 4-5 at increasing offsets, header again.
        assert_eq!(
            *fake.reads.borrow(),
            vec![(0, 1024), (1024, 4096), (5120, 2048), (0, 1024)]
        );
    }

    #[test]
    fn entry_fields_and_region_url() {
        let mut b = entry(trtype::TCP, subtype::NVM, "127.0.0.1", "4420", NQN);
        b[768] = 0;
        let e = Entry::parse(3, &b).unwrap();
        assert_eq!(
            (e.trtype, e.adrfam, e.subtype, e.treq, e.portid, e.cntlid, e.asqsz),
            (3, 1, 2, 2, 7, 0xffff, 32)
        );
        assert_eq!(
            (e.traddr.as_str(), e.trsvcid.as_str()),
            ("127.0.0.1", "4420")
        );
        assert_eq!(e.tcp_sectype, Some(0));
        assert_eq!(
            e.region_url().unwrap(),
            format!("nvme+tcp://127.0.0.1:4420/{NQN}")
        );
        // Space padding (SPDK's) is accepted and trimmed.
        let mut b = entry(trtype::TCP, subtype::NVM, "10.1.1.1", "4420", NQN);
        b[32 + 4..64].fill(b' ');
        b[512 + 8..768].fill(b' ');
        let e = Entry::parse(0, &b).unwrap();
        assert_eq!(
            e.region_url().unwrap(),
            format!("nvme+tcp://10.1.1.1:4420/{NQN}")
        );
        // IPv6 in brackets.
        let mut b = entry(trtype::TCP, subtype::NVM, "fd00::2", "4420", NQN);
        b[1] = adrfam::IPV6;
        let e = Entry::parse(0, &b).unwrap();
        assert_eq!(
            e.region_url().unwrap(),
            format!("nvme+tcp://[fd00::2]:4420/{NQN}")
        );
        // Other transports and discovery subsystems are listed, not used.
        let rdma = Entry::parse(
            0,
            &entry(trtype::RDMA, subtype::NVM, "10.0.0.3", "4420", NQN),
        )
        .unwrap();
        assert_eq!(rdma.region_url(), Err(NotARegion::Transport(1)));
        assert!(rdma.region_url().unwrap_err().to_string().contains("rdma"));
        assert_eq!(rdma.tcp_sectype, None);
        let odd = Entry::parse(0, &entry(77, subtype::NVM, "x", "1", NQN)).unwrap();
        assert_eq!(transport_name(odd.trtype), "unknown");
        assert!(odd.region_url().is_err());
        let disc = |subtype| {
            let b = entry(trtype::TCP, subtype, "10.0.0.2", "8009", DISCOVERY_NQN);
            Entry::parse(0, &b).unwrap()
        };
        assert_eq!(
            disc(subtype::CURRENT_DISCOVERY).region_url(),
            Err(NotARegion::CurrentDiscovery)
        );
        let why = disc(subtype::REFERRAL)
            .region_url()
            .unwrap_err()
            .to_string();
        assert!(
            why.contains("nvcopy list --discover 10.0.0.2:8009"),
            "{why}"
        );
        let bad_port =
            Entry::parse(0, &entry(trtype::TCP, subtype::NVM, "h", "none", NQN)).unwrap();
        assert_eq!(bad_port.region_url(), Err(NotARegion::Port("none".into())));
        let slash =
            Entry::parse(0, &entry(trtype::TCP, subtype::NVM, "h", "1", "nqn.a/b")).unwrap();
        assert_eq!(slash.region_url(), Err(NotARegion::Nqn));
    }

    #[test]
    fn malformed_entries_are_skipped_with_the_field_named() {
        let good = entry(trtype::TCP, subtype::NVM, "127.0.0.1", "4420", NQN);
        let mut garbage_after_nul = good.clone();
        garbage_after_nul[256 + NQN.len() + 3] = b'x';
        let mut not_ascii = good.clone();
        not_ascii[512] = 0xc3;
        let mut control = good.clone();
        control[33] = b'\n';
        let fake = Fake::one(log(
            1,
            &[good.clone(), garbage_after_nul, not_ascii, control, good],
        ));
        let l = read_log("t", |o, n| fake.get(o, n)).unwrap();
        assert_eq!(
            l.entries.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![0, 4]
        );
        let why: Vec<(u64, String)> = l
            .skipped
            .iter()
            .map(|s| (s.index, s.problem.to_string()))
            .collect();
        assert_eq!(why[0].0, 1);
        assert!(
            why[0].1.contains("SUBNQN") && why[0].1.contains("NUL-padded"),
            "{why:?}"
        );
        assert!(
            why[1].1.contains("TRADDR") && why[1].1.contains("ASCII"),
            "{why:?}"
        );
        assert!(why[2].1.contains("TRSVCID"), "{why:?}");
        assert!(Entry::parse(0, &[0u8; 100]).is_err());
    }

    #[test]
    fn a_log_that_changes_between_reads_is_read_again() {
        let a = log(4, &[entry(trtype::TCP, subtype::NVM, "h", "1", "nqn.old")]);
        let b = log(
            5,
            &[
                entry(trtype::TCP, subtype::NVM, "h", "1", "nqn.new"),
                entry(trtype::TCP, subtype::NVM, "h", "1", "nqn.new2"),
            ],
        );
        // The log changes after the first header and entry read: the second header
        // read sees generation 5, so the first read is thrown away.
        let fake = Fake {
            logs: vec![a, b],
            change_after: vec![2],
            reads: RefCell::new(vec![]),
        };
        let l = read_log("t", |o, n| fake.get(o, n)).unwrap();
        assert_eq!(l.attempts, 2);
        assert_eq!(l.header.genctr, 5);
        let nqns: Vec<&str> = l.entries.iter().map(|e| e.subnqn.as_str()).collect();
        assert_eq!(nqns, vec!["nqn.new", "nqn.new2"]);
        assert_eq!(fake.reads.borrow().len(), 3 + 3);
    }

    #[test]
    fn a_log_that_never_settles_is_refused_after_bounded_tries() {
        let logs: Vec<Vec<u8>> = (0..20)
            .map(|g| log(g, &[entry(trtype::TCP, subtype::NVM, "h", "1", "nqn.x")]))
            .collect();
        // A new generation on every command.
        let fake = Fake {
            logs,
            change_after: (1..20).collect(),
            reads: RefCell::new(vec![]),
        };
        let e = read_log("127.0.0.1:4420/disc", |o, n| fake.get(o, n)).unwrap_err();
        match &e {
            Error::DiscoveryLog {
                problem:
                    LogProblem::KeptChanging {
                        attempts,
                        first,
                        last,
                    },
                ..
            } => assert_eq!((*attempts, *first, *last), (MAX_ATTEMPTS, 0, 11)),
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("127.0.0.1:4420") && msg.contains("try again"),
            "{msg}"
        );
        assert_eq!(fake.reads.borrow().len(), 3 * MAX_ATTEMPTS as usize);
    }

    #[test]
    fn a_huge_numrec_is_capped_and_never_asked_for_whole() {
        // A peer claiming u64::MAX records but holding 2: nvcopy reads MAX_RECORDS,
        // in 4 KiB commands, and says it capped the log.
        let mut b = log(1, &[entry(trtype::TCP, subtype::NVM, "h", "1", "nqn.a")]);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let fake = Fake::one(b);
        let l = read_log("t", |o, n| fake.get(o, n)).unwrap();
        assert!(l.capped);
        assert_eq!(l.header.numrec, u64::MAX);
        let reads = fake.reads.borrow();
        assert!(reads.iter().all(|&(_, n)| n <= 4096), "{reads:?}");
        let last = reads[reads.len() - 2];
        assert_eq!(last.0 + last.1 as u64, (1 + MAX_RECORDS) * ENTRY_LEN as u64);
        // The zero-filled records parse (trtype 0) and are not usable.
        assert_eq!(l.entries.len() + l.skipped.len(), MAX_RECORDS as usize);
        assert_eq!(l.entries[0].subnqn, "nqn.a");
        assert!(l.entries[1].region_url().is_err());
    }

    #[test]
    fn short_answers_and_unknown_formats_are_typed_errors() {
        // A transport that hands back less than asked for.
        let e = read_log("t", |_, n| Ok(vec![0; n as usize / 2])).unwrap_err();
        assert!(matches!(
            e,
            Error::DiscoveryLog {
                problem: LogProblem::Short {
                    offset: 0,
                    want: 1024,
                    got: 512
                },
                ..
            }
        ));
        // Records announced but cut short.
        let fake = Fake::one(header(1, 3));
        let trunc = |o: u64, n: u32| {
            fake.get(o, n).map(|mut v| {
                if o > 0 {
                    v.truncate(1000);
                }
                v
            })
        };
        let e = read_log("t", trunc).unwrap_err();
        assert!(
            matches!(
                e,
                Error::DiscoveryLog {
                    problem: LogProblem::Short {
                        offset: 1024,
                        want: 3072,
                        got: 1000
                    },
                    ..
                }
            ),
            "{e}"
        );
        let mut h = header(1, 0);
        h[16] = 1;
        let fake = Fake::one(h);
        let e = read_log("t", |o, n| fake.get(o, n)).unwrap_err();
        assert!(matches!(
            e,
            Error::DiscoveryLog {
                problem: LogProblem::RecordFormat(1),
                ..
            }
        ));
        // An empty log is one header read, no entries, and the check.
        let fake = Fake::one(header(0, 0));
        let l = read_log("t", |o, n| fake.get(o, n)).unwrap();
        assert!(l.entries.is_empty() && !l.capped);
        assert_eq!(fake.reads.borrow().len(), 2);
    }

    #[test]
    fn parses_discovery_addresses() {
        assert_eq!(
            parse_address("127.0.0.1:4420"),
            Ok(("127.0.0.1".into(), 4420))
        );
        assert_eq!(
            parse_address("target.example"),
            Ok(("target.example".into(), 8009))
        );
        assert_eq!(parse_address("[::1]"), Ok(("::1".into(), 8009)));
        assert_eq!(
            parse_address("[fd00::2]:4420"),
            Ok(("fd00::2".into(), 4420))
        );
        assert!(matches!(parse_address(""), Err(AddressError::NoHost(_))));
        assert!(matches!(
            parse_address(":4420"),
            Err(AddressError::NoHost(_))
        ));
        assert!(matches!(parse_address("h:0"), Err(AddressError::Port(_))));
        assert!(matches!(parse_address("h:x"), Err(AddressError::Port(_))));
        assert!(matches!(
            parse_address("h:70000"),
            Err(AddressError::Port(_))
        ));
        assert!(matches!(
            parse_address("fd00::2"),
            Err(AddressError::Ipv6(_))
        ));
        assert!(matches!(
            parse_address("[fd00::2"),
            Err(AddressError::Brackets(_))
        ));
        assert!(matches!(
            parse_address("[fd00::2]4420"),
            Err(AddressError::Brackets(_))
        ));
        let msg = parse_address("h:x").unwrap_err().to_string();
        assert!(
            msg.contains("\"h:x\"") && msg.contains("1 to 65535"),
            "{msg}"
        );
    }
}
