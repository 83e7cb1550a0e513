//! One NVMe/TCP queue: a connection after ICReq/ICResp, driven without blocking. Commands
//! are posted with a token; [`Queue::progress`] sends what it can (capsules, H2C Data
//! answering R2Ts) and receives what has arrived (Response Capsules, C2H Data straight
//! into the command's pages, R2Ts); [`Queue::poll`] hands out completions.
//!
//! Everything the controller sends is checked: a PDU that does not parse, names a command
//! that is not outstanding, or moves data outside a command's transfer or out of order
//! ends the connection with a typed [`Error`], and every outstanding command then
//! completes as [`Outcome::Aborted`].

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nvcopy_nvme::Status;
use nvcopy_vfio::{DmaPool, Iova};

use crate::cmd::{self, Sgl, Sqe};
use crate::error::{Error, Result};
use crate::pdu::{self, C2h, Negotiated, TxHeader, DIGEST_LEN};
use crate::sock::{self, Seg, MAX_SEGS};

/// Bytes of a memory page of the pool.
const PAGE: usize = 4096;

/// After a receive finds nothing (EAGAIN), the next waits this long, doubling each time
/// it finds nothing again up to [`RX_BACKOFF_MAX`]: a reactor spinning on a connection
/// whose controller has not answered yet does not make a recvmsg every pass.
const RX_BACKOFF_MIN: Duration = Duration::from_micros(2);
/// The longest wait between two receives that found nothing: small against a
/// command's round trip over TCP.
const RX_BACKOFF_MAX: Duration = Duration::from_micros(50);

/// At most [`MAX_SEGS`] segments, on the stack: the gather/scatter list of one socket
/// call, built without allocating. The first `skip` bytes pushed are dropped (what an
/// earlier short send already sent).
struct SegList<'a> {
    segs: [Seg<'a>; MAX_SEGS],
    n: usize,
    skip: usize,
}

impl<'a> SegList<'a> {
    fn new(skip: usize) -> SegList<'a> {
        SegList {
            segs: [Seg::of(&[]); MAX_SEGS],
            n: 0,
            skip,
        }
    }

    fn len(&self) -> usize {
        self.n
    }

    fn is_full(&self) -> bool {
        self.n >= MAX_SEGS
    }

    /// Appends `s` less what is left to skip; false when the list is full.
    fn push(&mut self, s: Seg<'a>) -> bool {
        if self.skip >= s.len() {
            self.skip -= s.len();
            return true;
        }
        if self.is_full() {
            return false;
        }
        self.segs[self.n] = s.skip(self.skip);
        self.skip = 0;
        self.n += 1;
        true
    }

    fn as_slice(&self) -> &[Seg<'a>] {
        &self.segs[..self.n]
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success.
    Success,
    /// The controller's status.
    Status(Status),
    /// The connection ended before the command completed ([`Queue::error`] says why), or
    /// it was aborted after a timeout.
    Aborted,
}

/// A completed command.
#[derive(Debug)]
pub struct Completion {
    /// Token given at submission.
    pub token: u64,
    /// Command id.
    pub cid: u16,
    /// Opcode.
    pub opcode: u8,
    /// How it ended.
    pub outcome: Outcome,
    /// Dwords 0 and 1 of the completion.
    pub result: u64,
    /// The owned buffer given at submission, back.
    pub owned: Option<Vec<u8>>,
}

/// A command's data.
#[derive(Debug, Default)]
pub enum Data {
    /// None.
    #[default]
    None,
    /// Pages of the queue's pool: runs of (offset in the pool's memory, bytes).
    Pages(Vec<(usize, usize)>),
    /// A buffer the queue owns until completion (admin commands).
    Owned(Vec<u8>),
}

/// Which way a command's data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// No data.
    None,
    /// Host to controller (write).
    ToController,
    /// Controller to host (read).
    ToHost,
}

/// Why a command could not be posted.
#[derive(Debug)]
pub enum SubmitError {
    /// Every command slot is in use.
    Full,
    /// Never: the reason.
    Invalid(String),
}

/// Counters: the system calls the queue made and what they did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// sendmsg calls.
    pub sends: u64,
    /// recvmsg calls.
    pub recvs: u64,
    /// Calls that found nothing to do (EAGAIN).
    pub would_block: u64,
    /// Commands submitted.
    pub commands: u64,
    /// Bytes of data sent and received.
    pub data_bytes: u64,
}

#[derive(Debug)]
struct Slot {
    busy: bool,
    token: u64,
    opcode: u8,
    dir: Dir,
    len: u32,
    /// Data sent in the capsule.
    in_capsule: bool,
    /// Bytes received (reads) or asked for by R2Ts (writes) so far.
    moved: u32,
    data: Data,
    deadline: Instant,
    submitted: Instant,
}

#[derive(Debug)]
struct TxPdu {
    hdr: TxHeader,
    cid: u16,
    data_off: u32,
    data_len: u32,
    ddgst: Option<[u8; 4]>,
}

impl TxPdu {
    fn len(&self) -> usize {
        self.hdr.len + self.data_len as usize + self.ddgst.map_or(0, |_| DIGEST_LEN)
    }
}

#[derive(Clone, Copy, Debug)]
enum Rx {
    /// Reading a PDU header (`have` bytes of [`Negotiated::c2h_header_len`] so far).
    Header { have: usize },
    /// Skipping padding before data.
    Pad { left: usize, d: pdu::C2hData },
    /// Reading data into command `d.cccid`'s pages.
    Data {
        left: usize,
        d: pdu::C2hData,
        crc: u32,
    },
    /// Reading the data digest.
    Digest {
        have: usize,
        d: pdu::C2hData,
        crc: u32,
    },
}

/// One connection's queue.
pub struct Queue {
    sock: TcpStream,
    target: String,
    qid: u16,
    n: Negotiated,
    in_capsule_max: usize,
    pool: Option<DmaPool>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    outstanding: usize,
    tx: VecDeque<TxPdu>,
    tx_sent: usize,
    rx: Rx,
    hdr: [u8; 32],
    digest: [u8; 4],
    scratch: [u8; 128],
    ready: VecDeque<Completion>,
    error: Option<Error>,
    /// Set for good when the connection ends (the error may have been handed out).
    dead: bool,
    timeout: Duration,
    counters: Counters,
    /// No receive before this (after one found nothing).
    rx_not_before: Option<Instant>,
    rx_backoff: Duration,
}

impl Queue {
    /// A queue on a connection that has finished ICReq/ICResp (`n`), of `entries` command
    /// slots, each taking `timeout`. `pool`: where [`Data::Pages`] offsets point.
    pub fn new(
        sock: TcpStream,
        target: String,
        qid: u16,
        n: Negotiated,
        entries: u16,
        pool: Option<DmaPool>,
        timeout: Duration,
    ) -> Result<Queue> {
        sock.set_nonblocking(true).map_err(|source| Error::Io {
            target: target.clone(),
            qid,
            what: "making the socket non-blocking",
            source,
        })?;
        let now = Instant::now();
        let entries = entries.max(1);
        Ok(Queue {
            sock,
            target,
            qid,
            n,
            in_capsule_max: 0,
            pool,
            slots: (0..entries)
                .map(|_| Slot {
                    busy: false,
                    token: 0,
                    opcode: 0,
                    dir: Dir::None,
                    len: 0,
                    in_capsule: false,
                    moved: 0,
                    data: Data::None,
                    deadline: now,
                    submitted: now,
                })
                .collect(),
            free: (0..entries).rev().collect(),
            outstanding: 0,
            tx: VecDeque::with_capacity(entries as usize * 2),
            tx_sent: 0,
            rx: Rx::Header { have: 0 },
            hdr: [0; 32],
            digest: [0; 4],
            scratch: [0; 128],
            ready: VecDeque::with_capacity(entries as usize),
            error: None,
            dead: false,
            timeout,
            counters: Counters::default(),
            rx_not_before: None,
            rx_backoff: Duration::ZERO,
        })
    }

    /// Makes room, now, for everything a command of up to `max_bytes` of pool pages needs
    /// while it is outstanding (its runs of pages, its PDUs to send, its completion), so
    /// that [`Queue::submit_pages`], [`Queue::progress`] and [`Queue::poll`] never
    /// allocate: a reactor may not be able to ask the kernel for more memory.
    pub fn reserve(&mut self, max_bytes: usize) {
        let runs = max_bytes.div_ceil(PAGE).max(1);
        for s in &mut self.slots {
            match &mut s.data {
                Data::Pages(v) => v.reserve(runs.saturating_sub(v.len())),
                d @ Data::None => *d = Data::Pages(Vec::with_capacity(runs)),
                Data::Owned(_) => {}
            }
        }
        let entries = self.slots.len();
        // A capsule per command, and an H2C Data PDU per max_h2c_data bytes of each write.
        let h2c = max_bytes.div_ceil(self.n.max_h2c_data.max(4096) as usize);
        let tx = entries * (1 + h2c);
        self.tx.reserve(tx.saturating_sub(self.tx.len()));
        // Completions not yet handed out, and as many again posted on the slots they freed.
        self.ready
            .reserve((entries * 2).saturating_sub(self.ready.len()));
    }

    /// Sets the largest write sent in the command capsule (the controller's IOCCSZ less
    /// the SQE); larger ones wait for R2Ts.
    pub fn set_in_capsule_max(&mut self, bytes: usize) {
        self.in_capsule_max = bytes;
    }

    /// Sets how long each command may take from now on.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// host:port/nqn.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// What the connection negotiated.
    pub fn negotiated(&self) -> Negotiated {
        self.n
    }

    /// Why the connection ended, if it did.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Whether commands can be posted.
    pub fn is_usable(&self) -> bool {
        !self.dead
    }

    /// Commands outstanding: not completed, or completed and not yet handed out by
    /// [`Queue::poll`].
    pub fn outstanding(&self) -> usize {
        self.outstanding + self.ready.len()
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The pool pages `iovas` holding `len` bytes, as runs of the pool's memory.
    pub fn pages(
        &self,
        iovas: &[Iova],
        len: usize,
        out: &mut Vec<(usize, usize)>,
    ) -> std::result::Result<(), SubmitError> {
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| SubmitError::Invalid("this queue has no DMA pool".into()))?;
        out.clear();
        let mut left = len;
        for &iova in iovas {
            if left == 0 {
                break;
            }
            let n = left.min(PAGE);
            let off = pool.host_offset(iova, n).ok_or_else(|| {
                SubmitError::Invalid(format!("page at IOVA {:#x} is not in the pool", iova.0))
            })?;
            match out.last_mut() {
                Some(r) if r.0 + r.1 == off => r.1 += n,
                _ => out.push((off, n)),
            }
            left -= n;
        }
        if left != 0 {
            return Err(SubmitError::Invalid(format!(
                "{len} bytes do not fit in {} pages",
                iovas.len()
            )));
        }
        Ok(())
    }

    /// [`Queue::submit`] for `len` bytes in the pool pages `iovas`: the runs go in the
    /// command slot's own list (made room for by [`Queue::reserve`]), so nothing is
    /// allocated per command.
    pub fn submit_pages(
        &mut self,
        sqe: Sqe,
        dir: Dir,
        iovas: &[Iova],
        len: usize,
        token: u64,
    ) -> std::result::Result<u16, SubmitError> {
        let Some(&cid) = self.free.last() else {
            return Err(SubmitError::Full);
        };
        let mut runs = match std::mem::take(&mut self.slots[cid as usize].data) {
            Data::Pages(v) => v,
            _ => Vec::new(),
        };
        if let Err(e) = self.pages(iovas, len, &mut runs) {
            self.slots[cid as usize].data = Data::Pages(runs);
            return Err(e);
        }
        // submit takes the same free slot (the last one).
        self.submit(sqe, dir, len as u32, Data::Pages(runs), token, false)
    }

    /// Posts `sqe` (its command id is stamped here) moving `len` bytes of `data` in `dir`.
    /// A write of at most the in-capsule limit goes in the capsule (`force_in_capsule`
    /// for Connect); a larger one waits for R2Ts; a read's data arrives by C2H Data. The
    /// SGL of `sqe` is set to match. Returns the command id.
    pub fn submit(
        &mut self,
        mut sqe: Sqe,
        dir: Dir,
        len: u32,
        data: Data,
        token: u64,
        force_in_capsule: bool,
    ) -> std::result::Result<u16, SubmitError> {
        if self.dead {
            return Err(SubmitError::Invalid(match &self.error {
                Some(e) => e.to_string(),
                None => "the connection has ended".to_string(),
            }));
        }
        let Some(cid) = self.free.pop() else {
            return Err(SubmitError::Full);
        };
        let in_capsule =
            dir == Dir::ToController && (force_in_capsule || len as usize <= self.in_capsule_max);
        let sgl = match dir {
            Dir::None => Sgl::None,
            _ if in_capsule => Sgl::InCapsule(len),
            _ => Sgl::Transport(len),
        };
        let with_sgl = cmd::sqe(sqe[0], 0, sgl);
        sqe[24..40].copy_from_slice(&with_sgl[24..40]);
        sqe[1] = with_sgl[1];
        cmd::set_cid(&mut sqe, cid);
        let now = Instant::now();
        let s = &mut self.slots[cid as usize];
        *s = Slot {
            busy: true,
            token,
            opcode: sqe[0],
            dir,
            len,
            in_capsule,
            moved: 0,
            data,
            deadline: now + self.timeout,
            submitted: now,
        };
        let data_len = if in_capsule { len } else { 0 };
        let hdr = pdu::capsule_cmd(&sqe, data_len as usize, &self.n);
        let ddgst = (data_len > 0 && self.n.data_digest).then(|| self.data_crc(cid, 0, data_len));
        self.tx.push_back(TxPdu {
            hdr,
            cid,
            data_off: 0,
            data_len,
            ddgst: ddgst.map(u32::to_le_bytes),
        });
        self.outstanding += 1;
        self.counters.commands += 1;
        Ok(cid)
    }

    /// The segments of command `cid`'s data from byte `off`, `len` bytes, into `out`.
    fn data_segs<'a>(
        slots: &'a [Slot],
        pool: Option<&'a DmaPool>,
        cid: u16,
        off: usize,
        len: usize,
        out: &mut SegList<'a>,
    ) {
        let Some(s) = slots.get(cid as usize) else {
            return;
        };
        let (mut skip, mut left) = (off, len);
        match &s.data {
            Data::None => {}
            Data::Owned(b) => {
                if let Some(b) = b.get(off..off + len) {
                    out.push(Seg::of(b));
                }
            }
            Data::Pages(runs) => {
                let Some(pool) = pool else { return };
                for &(o, n) in runs {
                    if left == 0 || out.is_full() {
                        break;
                    }
                    if skip >= n {
                        skip -= n;
                        continue;
                    }
                    let take = (n - skip).min(left);
                    if let Some(seg) = Seg::dma(pool, o + skip, take) {
                        out.push(seg);
                    }
                    left -= take;
                    skip = 0;
                }
            }
        }
    }

    /// [`Queue::data_segs`] for a receive: an owned buffer is lent writable.
    fn recv_segs<'a>(
        slots: &'a mut [Slot],
        pool: Option<&'a DmaPool>,
        cid: u16,
        off: usize,
        len: usize,
        out: &mut SegList<'a>,
    ) {
        let owned = matches!(
            slots.get(cid as usize),
            Some(Slot {
                data: Data::Owned(_),
                ..
            })
        );
        if !owned {
            return Self::data_segs(slots, pool, cid, off, len, out);
        }
        if let Some(Slot {
            data: Data::Owned(b),
            ..
        }) = slots.get_mut(cid as usize)
        {
            if let Some(b) = b.get_mut(off..off + len) {
                out.push(Seg::of_mut(b));
            }
        }
    }

    fn data_crc(&self, cid: u16, off: u32, len: u32) -> u32 {
        let mut segs = SegList::new(0);
        Self::data_segs(
            &self.slots,
            self.pool.as_ref(),
            cid,
            off as usize,
            len as usize,
            &mut segs,
        );
        let mut crc = 0;
        for s in segs.as_slice() {
            s.read_chunks(|b| crc = pdu::crc32c_append(crc, b));
        }
        crc
    }

    /// Sends and receives what can be, without blocking. Returns whether anything moved.
    /// The socket is read only while commands are outstanding: with none, the controller
    /// owes nothing, and a receive would only find EAGAIN.
    pub fn progress(&mut self) -> bool {
        if self.dead {
            return false;
        }
        let sent = self.flush_tx();
        let due = match self.rx_not_before {
            Some(t) => Instant::now() >= t,
            None => true,
        };
        let got = self.outstanding > 0 && due && self.receive(64);
        sent || got
    }

    /// Sends what can be (posted capsules, H2C Data), without blocking and without
    /// reading the socket: what a reactor does after posting, before it polls again.
    pub fn flush(&mut self) -> bool {
        !self.dead && self.flush_tx()
    }

    fn fail(&mut self, e: Error) {
        if self.dead {
            return;
        }
        self.dead = true;
        // A bad PDU is answered with a Terminate Connection Request, best effort.
        if let Error::Pdu { source, .. } = &e {
            let fes = match source {
                pdu::PduError::HeaderDigest { .. } => pdu::fes::HEADER_DIGEST,
                _ => pdu::fes::INVALID_HEADER_FIELD,
            };
            let t = pdu::h2c_term(fes, 0, &self.n);
            let _ = sock::send(&self.sock, &[Seg::of(t.as_slice())]);
        }
        let _ = self.sock.shutdown(Shutdown::Both);
        self.error = Some(e);
        self.tx.clear();
        self.abort_slots();
    }

    fn abort_slots(&mut self) {
        for cid in 0..self.slots.len() {
            if self.slots[cid].busy {
                self.complete(cid as u16, Outcome::Aborted, 0);
            }
        }
    }

    fn complete(&mut self, cid: u16, outcome: Outcome, result: u64) {
        let s = &mut self.slots[cid as usize];
        s.busy = false;
        let owned = match std::mem::take(&mut s.data) {
            Data::Owned(b) => Some(b),
            Data::Pages(mut runs) => {
                runs.clear();
                s.data = Data::Pages(runs);
                None
            }
            Data::None => None,
        };
        self.ready.push_back(Completion {
            token: s.token,
            cid,
            opcode: s.opcode,
            outcome,
            result,
            owned,
        });
        self.free.push(cid);
        self.outstanding -= 1;
    }

    fn io_error(&self, what: &'static str, source: std::io::Error) -> Error {
        Error::Io {
            target: self.target.clone(),
            qid: self.qid,
            what,
            source,
        }
    }

    fn flush_tx(&mut self) -> bool {
        let mut any = false;
        while !self.tx.is_empty() {
            // The PDUs in order, from the first byte not yet sent; a PDU that does not
            // fit whole goes in part (the send stops where the list ends).
            let mut segs = SegList::new(self.tx_sent);
            for p in &self.tx {
                if segs.len() + 3 > MAX_SEGS {
                    break;
                }
                segs.push(Seg::of(p.hdr.as_slice()));
                Self::data_segs(
                    &self.slots,
                    self.pool.as_ref(),
                    p.cid,
                    p.data_off as usize,
                    p.data_len as usize,
                    &mut segs,
                );
                if let Some(d) = &p.ddgst {
                    if !segs.push(Seg::of(d)) {
                        break;
                    }
                }
            }
            self.counters.sends += 1;
            let r = sock::send(&self.sock, segs.as_slice());
            match r {
                Ok(mut n) => {
                    any = true;
                    self.counters.data_bytes += n as u64;
                    n += self.tx_sent;
                    while let Some(p) = self.tx.front() {
                        let l = p.len();
                        if n < l {
                            break;
                        }
                        n -= l;
                        self.tx.pop_front();
                    }
                    self.tx_sent = n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.counters.would_block += 1;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = self.io_error("sending", e);
                    self.fail(e);
                    break;
                }
            }
        }
        any
    }

    fn closed(&self) -> Error {
        Error::Closed {
            target: self.target.clone(),
            qid: self.qid,
            during: if self.outstanding > 0 {
                format!(" with {} commands outstanding", self.outstanding)
            } else {
                String::new()
            },
        }
    }

    /// Receives at most `budget` times, and only while the socket keeps filling what is
    /// asked: a call that returns fewer bytes than asked drained the socket, so the next
    /// one would find nothing (EAGAIN) and is not made.
    fn receive(&mut self, budget: usize) -> bool {
        let mut any = false;
        for _ in 0..budget {
            // With nothing outstanding the controller owes nothing (a PDU half received
            // belongs to a command still outstanding).
            if self.dead || self.outstanding == 0 {
                break;
            }
            let hlen = self.n.c2h_header_len();
            self.counters.recvs += 1;
            let r = match self.rx {
                Rx::Header { have } => {
                    let r = sock::recv(&self.sock, &[Seg::of_mut(&mut self.hdr[have..hlen])]);
                    r.map(|n| (n, hlen - have))
                }
                Rx::Pad { left, .. } => {
                    let n = left.min(self.scratch.len());
                    let r = sock::recv(&self.sock, &[Seg::of_mut(&mut self.scratch[..n])]);
                    r.map(|got| (got, n))
                }
                Rx::Digest { have, .. } => {
                    let r = sock::recv(&self.sock, &[Seg::of_mut(&mut self.digest[have..])]);
                    r.map(|n| (n, DIGEST_LEN - have))
                }
                Rx::Data { left, d, crc } => {
                    let off = (d.datao + d.datal) as usize - left;
                    let mut segs = SegList::new(0);
                    Self::recv_segs(
                        &mut self.slots,
                        self.pool.as_ref(),
                        d.cccid,
                        off,
                        left,
                        &mut segs,
                    );
                    let data_segs = segs.len();
                    let covered: usize = segs.as_slice().iter().map(Seg::len).sum();
                    // The data's digest and the next PDU's header come in the same call
                    // when they are already there; only when the list holds all of the
                    // data, so that what follows it is really the digest and a header.
                    let mut asked = covered;
                    if covered == left && segs.len() + 2 <= MAX_SEGS {
                        if self.n.data_digest {
                            segs.push(Seg::of_mut(&mut self.digest));
                            asked += DIGEST_LEN;
                        }
                        segs.push(Seg::of_mut(&mut self.hdr[..hlen]));
                        asked += hlen;
                    }
                    let r = sock::recv(&self.sock, segs.as_slice());
                    let crc = match (&r, self.n.data_digest) {
                        (Ok(n), true) => {
                            let mut c = crc;
                            let mut want = (*n).min(left);
                            for s in &segs.as_slice()[..data_segs] {
                                if want == 0 {
                                    break;
                                }
                                let s = s.take(want);
                                want -= s.len();
                                s.read_chunks(|b| c = pdu::crc32c_append(c, b));
                            }
                            c
                        }
                        _ => crc,
                    };
                    if let Ok(n) = r {
                        self.counters.data_bytes += n.min(left) as u64;
                        // The CRC so far goes with the state; the bytes past the data
                        // are taken below.
                        self.rx = Rx::Data { left, d, crc };
                    }
                    r.map(|n| (n, asked))
                }
            };
            let (n, asked) = match r {
                Ok((0, _)) => {
                    let e = self.closed();
                    self.fail(e);
                    break;
                }
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.counters.would_block += 1;
                    self.rx_backoff = (self.rx_backoff * 2).clamp(RX_BACKOFF_MIN, RX_BACKOFF_MAX);
                    self.rx_not_before = Some(Instant::now() + self.rx_backoff);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    let e = self.io_error("receiving", e);
                    self.fail(e);
                    break;
                }
            };
            any = true;
            self.rx_backoff = Duration::ZERO;
            self.rx_not_before = None;
            if let Err(e) = self.took(n) {
                self.fail(e);
                break;
            }
            if n < asked {
                break;
            }
        }
        any
    }

    /// Moves the receive state past `n` bytes just received where it asked for them (a
    /// read's data, and then its digest and the next header, in place).
    fn took(&mut self, mut n: usize) -> Result<()> {
        let hlen = self.n.c2h_header_len();
        match self.rx {
            Rx::Header { have } => {
                self.rx = Rx::Header { have: have + n };
                return self.advance();
            }
            Rx::Pad { left, d } => {
                self.rx = Rx::Pad { left: left - n, d };
                return self.advance();
            }
            Rx::Digest { have, d, crc } => {
                self.rx = Rx::Digest {
                    have: have + n,
                    d,
                    crc,
                };
                return self.advance();
            }
            Rx::Data { left, d, crc } => {
                let k = n.min(left);
                n -= k;
                self.rx = Rx::Data {
                    left: left - k,
                    d,
                    crc,
                };
                self.advance()?;
            }
        }
        // Past the data: the digest (read into place from its first byte), then the next
        // header (likewise).
        if n == 0 {
            return Ok(());
        }
        if let Rx::Digest { have: 0, d, crc } = self.rx {
            let k = n.min(DIGEST_LEN);
            n -= k;
            self.rx = Rx::Digest { have: k, d, crc };
            self.advance()?;
        }
        if n == 0 {
            return Ok(());
        }
        match self.rx {
            Rx::Header { have: 0 } if n <= hlen => {
                self.rx = Rx::Header { have: n };
                self.advance()
            }
            _ => Err(Error::Controller {
                target: self.target.clone(),
                why: format!("queue {}: {n} bytes received past a PDU's data", self.qid),
            }),
        }
    }

    /// Acts on a receive state that is complete.
    fn advance(&mut self) -> Result<()> {
        let hlen = self.n.c2h_header_len();
        match self.rx {
            // A Terminate Connection Request has no header digest: with header digests on
            // it is complete 4 bytes short of every other header (and its sender may
            // close the connection right after it).
            Rx::Header { have }
                if have == hlen
                    || (have >= pdu::SHORT_HLEN && self.hdr[0] == pdu::kind::C2H_TERM_REQ) =>
            {
                let p =
                    pdu::parse_c2h(&self.hdr[..have], &self.n).map_err(|source| Error::Pdu {
                        target: self.target.clone(),
                        qid: self.qid,
                        source,
                    })?;
                self.rx = Rx::Header { have: 0 };
                self.on_pdu(p)
            }
            Rx::Pad { left: 0, d } => {
                self.rx = Rx::Data {
                    left: d.datal as usize,
                    d,
                    crc: 0,
                };
                Ok(())
            }
            Rx::Data { left: 0, d, crc } => {
                if self.n.data_digest {
                    self.rx = Rx::Digest { have: 0, d, crc };
                    Ok(())
                } else {
                    self.rx = Rx::Header { have: 0 };
                    self.data_done(d)
                }
            }
            Rx::Digest { have: 4, d, crc } => {
                let received = u32::from_le_bytes(self.digest);
                let computed = crc;
                if received != computed {
                    return Err(Error::Pdu {
                        target: self.target.clone(),
                        qid: self.qid,
                        source: pdu::PduError::DataDigest {
                            cid: d.cccid,
                            received,
                            computed,
                        },
                    });
                }
                self.rx = Rx::Header { have: 0 };
                self.data_done(d)
            }
            _ => Ok(()),
        }
    }

    fn unknown(&self, what: &'static str, cid: u16, why: &'static str) -> Error {
        Error::UnknownCommand {
            target: self.target.clone(),
            qid: self.qid,
            what,
            cid,
            why,
        }
    }

    fn slot(&self, what: &'static str, cid: u16, dir: Dir) -> Result<&Slot> {
        match self.slots.get(cid as usize) {
            Some(s) if s.busy && (dir == Dir::None || s.dir == dir) => Ok(s),
            Some(s) if s.busy => Err(self.unknown(
                what,
                cid,
                if dir == Dir::ToHost {
                    "reads no data"
                } else {
                    "writes no data"
                },
            )),
            _ => Err(self.unknown(what, cid, "is not outstanding")),
        }
    }

    fn on_pdu(&mut self, p: C2h) -> Result<()> {
        match p {
            C2h::Term { fes, fei } => Err(Error::Terminated {
                target: self.target.clone(),
                qid: self.qid,
                fes,
                fei,
            }),
            C2h::Resp(cqe) => {
                let s = self.slot("Response Capsule", cqe.cid, Dir::None)?;
                if self.tx.iter().any(|p| p.cid == cqe.cid && p.data_len > 0) {
                    return Err(self.unknown(
                        "Response Capsule",
                        cqe.cid,
                        "still has data waiting to be sent",
                    ));
                }
                let status = Status(cqe.status);
                if status.is_success() && s.dir == Dir::ToHost && s.moved != s.len {
                    return Err(Error::DataRange {
                        target: self.target.clone(),
                        qid: self.qid,
                        what: "Response Capsule",
                        cid: cqe.cid,
                        offset: s.moved as u64,
                        end: s.len as u64,
                        why: "reports success before the read's data arrived".into(),
                    });
                }
                let outcome = if status.is_success() {
                    Outcome::Success
                } else {
                    Outcome::Status(status)
                };
                self.complete(cqe.cid, outcome, cqe.result);
                Ok(())
            }
            C2h::Data(d) => {
                let s = self.slot("C2H Data", d.cccid, Dir::ToHost)?;
                let end = d.datao as u64 + d.datal as u64;
                let why = if d.datao != s.moved || end > s.len as u64 {
                    Some(format!(
                        "{} of the read's {} bytes arrived so far, in order",
                        s.moved, s.len
                    ))
                } else if d.last && end != s.len as u64 {
                    Some(format!("it is marked last and the read is {} bytes", s.len))
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(Error::DataRange {
                        target: self.target.clone(),
                        qid: self.qid,
                        what: "C2H Data",
                        cid: d.cccid,
                        offset: d.datao as u64,
                        end,
                        why,
                    });
                }
                self.rx = if d.pad > 0 {
                    Rx::Pad { left: d.pad, d }
                } else {
                    Rx::Data {
                        left: d.datal as usize,
                        d,
                        crc: 0,
                    }
                };
                Ok(())
            }
            C2h::R2t(r) => {
                let s = self.slot("R2T", r.cccid, Dir::ToController)?;
                let end = r.r2to as u64 + r.r2tl as u64;
                if s.in_capsule || r.r2to != s.moved || end > s.len as u64 {
                    return Err(Error::DataRange {
                        target: self.target.clone(),
                        qid: self.qid,
                        what: "R2T",
                        cid: r.cccid,
                        offset: r.r2to as u64,
                        end,
                        why: if s.in_capsule {
                            "the write's data went in its capsule".to_string()
                        } else {
                            format!(
                                "{} of the write's {} bytes were asked for so far, in order",
                                s.moved, s.len
                            )
                        },
                    });
                }
                self.slots[r.cccid as usize].moved = end as u32;
                let max = self.n.max_h2c_data.max(4096);
                let mut off = r.r2to;
                while off < end as u32 {
                    let l = (end as u32 - off).min(max);
                    let last = off + l == end as u32;
                    let hdr = pdu::h2c_data(r.cccid, r.ttag, off, l, last, &self.n);
                    let ddgst = self.n.data_digest.then(|| self.data_crc(r.cccid, off, l));
                    self.tx.push_back(TxPdu {
                        hdr,
                        cid: r.cccid,
                        data_off: off,
                        data_len: l,
                        ddgst: ddgst.map(u32::to_le_bytes),
                    });
                    off += l;
                }
                Ok(())
            }
        }
    }

    fn data_done(&mut self, d: pdu::C2hData) -> Result<()> {
        let s = self.slot("C2H Data", d.cccid, Dir::ToHost)?;
        let moved = s.moved + d.datal;
        self.slots[d.cccid as usize].moved = moved;
        if d.success {
            self.complete(d.cccid, Outcome::Success, 0);
        }
        Ok(())
    }

    /// Hands out at most `max` completions.
    pub fn poll(&mut self, max: usize, mut f: impl FnMut(Completion)) -> usize {
        self.progress();
        let mut n = 0;
        while n < max {
            let Some(c) = self.ready.pop_front() else {
                break;
            };
            f(c);
            n += 1;
        }
        n
    }

    /// The oldest outstanding command past its deadline at `now`: (opcode, cid, waited).
    pub fn expired(&self, now: Instant) -> Option<(u8, u16, Duration)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.busy && s.deadline <= now)
            .min_by_key(|(_, s)| s.submitted)
            .map(|(i, s)| (s.opcode, i as u16, now - s.submitted))
    }

    /// Ends the connection and fails every outstanding command as [`Outcome::Aborted`]
    /// into the ready list. Once the socket is shut down nothing writes into the
    /// commands' pages any more.
    pub fn abort_all(&mut self, why: Error) {
        self.fail(why);
        self.abort_slots();
    }

    /// Runs one command to completion, waiting for the socket in between (admin and
    /// bring-up only, never on a reactor): its result and owned buffer, or why not.
    pub fn run(
        &mut self,
        what: &'static str,
        sqe: Sqe,
        dir: Dir,
        data: Vec<u8>,
        force_in_capsule: bool,
    ) -> Result<(u64, Option<Vec<u8>>)> {
        let len = if dir == Dir::None {
            0
        } else {
            data.len() as u32
        };
        let token = u64::MAX - 1;
        let data = if dir == Dir::None {
            Data::None
        } else {
            Data::Owned(data)
        };
        let cid = match self.submit(sqe, dir, len, data, token, force_in_capsule) {
            Ok(c) => c,
            Err(SubmitError::Full) => {
                return Err(Error::Controller {
                    target: self.target.clone(),
                    why: format!("{what}: no free command slot on queue {}", self.qid),
                })
            }
            Err(SubmitError::Invalid(m)) => {
                return Err(match self.error.take() {
                    Some(e) => e,
                    None => Error::Controller {
                        target: self.target.clone(),
                        why: format!("{what}: {m}"),
                    },
                })
            }
        };
        let start = Instant::now();
        loop {
            self.progress();
            if let Some(i) = self
                .ready
                .iter()
                .position(|c| c.cid == cid && c.token == token)
            {
                let Some(c) = self.ready.remove(i) else {
                    continue;
                };
                return match c.outcome {
                    Outcome::Success => Ok((c.result, c.owned)),
                    Outcome::Status(status) => Err(Error::Command {
                        target: self.target.clone(),
                        what,
                        cid,
                        status,
                    }),
                    Outcome::Aborted => Err(self.error.take().unwrap_or_else(|| self.closed())),
                };
            }
            if self.dead {
                return Err(self.error.take().unwrap_or_else(|| self.closed()));
            }
            let waited = start.elapsed();
            if waited > self.timeout {
                let e = Error::Timeout {
                    target: self.target.clone(),
                    qid: self.qid,
                    what,
                    waited,
                };
                self.abort_all(Error::Timeout {
                    target: self.target.clone(),
                    qid: self.qid,
                    what,
                    waited,
                });
                return Err(e);
            }
            sock::wait(self.sock.as_raw_fd(), !self.tx.is_empty(), 10);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let host = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (target, _) = l.accept().unwrap();
        (host, target)
    }

    #[test]
    fn a_read_in_two_data_pdus_and_its_response_take_three_receives() {
        let n = Negotiated {
            header_digest: true,
            data_digest: true,
            cpda: 0,
            hpda: 0,
            max_h2c_data: 8192,
        };
        let (host, mut target) = pair();
        let mut q = Queue::new(host, "test".into(), 1, n, 4, None, Duration::from_secs(5)).unwrap();
        let sqe = cmd::rw(cmd::op::READ, 1, 0, 16, cmd::Sgl::None);
        let cid = q
            .submit(sqe, Dir::ToHost, 8192, Data::Owned(vec![0; 8192]), 7, false)
            .unwrap();
        assert!(q.flush());
        // The capsule: header, SQE, header digest.
        let mut capsule = [0u8; 8 + 64 + 4];
        target.read_exact(&mut capsule).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut wire = Vec::new();
        for (i, half) in data.chunks(4096).enumerate() {
            let d = pdu::C2hData {
                cccid: cid,
                datao: i as u32 * 4096,
                datal: 4096,
                pad: 0,
                last: i == 1,
                success: false,
            };
            wire.extend(pdu::encode_c2h(&C2h::Data(d), &n));
            wire.extend(half);
            wire.extend(pdu::crc32c(half).to_le_bytes());
        }
        let cqe = pdu::Cqe {
            result: 0,
            sqhd: 1,
            cid,
            status: 0,
        };
        wire.extend(pdu::encode_c2h(&C2h::Resp(cqe), &n));
        target.write_all(&wire).unwrap();
        let mut done = Vec::new();
        let start = Instant::now();
        while done.is_empty() && start.elapsed() < Duration::from_secs(5) {
            q.poll(8, |c| done.push(c));
        }
        assert_eq!(done.len(), 1, "{:?}", q.error());
        let c = &done[0];
        assert_eq!((c.token, c.outcome), (7, Outcome::Success));
        assert_eq!(c.owned.as_deref(), Some(&data[..]));
        // A header; the first data, its digest and the second header; the second data,
        // its digest and the response's header. Nothing is read after that.
        let k = q.counters();
        assert_eq!((k.recvs - k.would_block, k.would_block), (3, 0), "{k:?}");
        assert_eq!(q.outstanding(), 0);
    }

    #[test]
    fn a_write_and_a_read_through_pool_pages_allocate_nothing() {
        const LEN: usize = 32 * 1024;
        let n = Negotiated {
            header_digest: true,
            data_digest: true,
            cpda: 0,
            hpda: 0,
            max_h2c_data: 1 << 20,
        };
        let pool = DmaPool::unmapped(2 << 20).unwrap();
        let buf = pool.alloc(LEN).unwrap();
        let data: Vec<u8> = (0..LEN as u32).map(|i| (i * 13 + 1) as u8).collect();
        buf.slice().copy_from(&data[..]);
        let iovas: Vec<Iova> = (0..LEN / PAGE)
            .map(|i| Iova(buf.iova().0 + (i * PAGE) as u64))
            .collect();
        let (host, mut target) = pair();
        let mut q = Queue::new(
            host,
            "test".into(),
            1,
            n,
            4,
            Some(pool.clone()),
            Duration::from_secs(5),
        )
        .unwrap();
        q.reserve(LEN);
        // The target: takes the write's capsule, asks for its data with an R2T, checks
        // it, answers; then sends the same bytes back for the read.
        let want = data.clone();
        let t = std::thread::spawn(move || {
            let mut capsule = [0u8; 8 + 64 + 4];
            target.read_exact(&mut capsule).unwrap();
            let cid = u16::from_le_bytes([capsule[10], capsule[11]]);
            let r2t = pdu::R2t {
                cccid: cid,
                ttag: 1,
                r2to: 0,
                r2tl: LEN as u32,
            };
            target
                .write_all(&pdu::encode_c2h(&C2h::R2t(r2t), &n))
                .unwrap();
            let mut h2c = vec![0u8; 24 + 4 + LEN + 4];
            target.read_exact(&mut h2c).unwrap();
            assert!(h2c[28..28 + LEN] == want[..], "the H2C Data differs");
            let resp = |cid| pdu::Cqe {
                result: 0,
                sqhd: 1,
                cid,
                status: 0,
            };
            target
                .write_all(&pdu::encode_c2h(&C2h::Resp(resp(cid)), &n))
                .unwrap();
            target.read_exact(&mut capsule).unwrap();
            let cid = u16::from_le_bytes([capsule[10], capsule[11]]);
            let d = pdu::C2hData {
                cccid: cid,
                datao: 0,
                datal: LEN as u32,
                pad: 0,
                last: true,
                success: false,
            };
            let mut wire = pdu::encode_c2h(&C2h::Data(d), &n);
            wire.extend(&want);
            wire.extend(pdu::crc32c(&want).to_le_bytes());
            wire.extend(pdu::encode_c2h(&C2h::Resp(resp(cid)), &n));
            target.write_all(&wire).unwrap();
        });
        let mut done: Vec<(u64, Outcome)> = Vec::with_capacity(4);
        let probe = sock::counting::allocations();
        drop(std::hint::black_box(Vec::<u8>::with_capacity(8)));
        assert!(sock::counting::allocations() > probe, "the counter counts");
        let before = sock::counting::allocations();
        let write = cmd::rw(cmd::op::WRITE, 1, 0, (LEN / 512) as u32, cmd::Sgl::None);
        q.submit_pages(write, Dir::ToController, &iovas, LEN, 1)
            .unwrap();
        let start = Instant::now();
        while done.is_empty() && start.elapsed() < Duration::from_secs(5) {
            q.flush();
            q.poll(8, |c| done.push((c.token, c.outcome)));
        }
        // The read lands in the same pages, zeroed first.
        buf.slice().copy_from(&[0u8; LEN][..]);
        let read = cmd::rw(cmd::op::READ, 1, 0, (LEN / 512) as u32, cmd::Sgl::None);
        q.submit_pages(read, Dir::ToHost, &iovas, LEN, 2).unwrap();
        while done.len() < 2 && start.elapsed() < Duration::from_secs(5) {
            q.flush();
            q.poll(8, |c| done.push((c.token, c.outcome)));
        }
        let allocated = sock::counting::allocations() - before;
        t.join().unwrap();
        assert_eq!(
            done,
            [(1, Outcome::Success), (2, Outcome::Success)],
            "{:?}",
            q.error()
        );
        let mut got = vec![0u8; LEN];
        buf.slice().copy_to(&mut got[..]);
        assert!(got == data, "the read's data differs");
        assert_eq!(allocated, 0, "allocations on the data path");
    }
}
