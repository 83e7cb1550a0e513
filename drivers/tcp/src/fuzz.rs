//! The PDU parsers under arbitrary input, with the invariants they promise checked: the
//! body of the `pdu` cargo-fuzz target (`fuzz/`), and of an ordinary test that runs it
//! over a seeded corpus so that every CI run checks the same invariants without a fuzzer.
//!
//! It lives in the crate, not in `fuzz/`, so that it is built, linted and tested with the
//! rest: a harness that only a nightly-style build compiles would rot unseen.
//!
//! An input is two bytes of negotiation and then what a controller sent:
//!
//! | byte | meaning |
//! |---|---|
//! | 0, bit 0 / 1 | header / data digests negotiated |
//! | 0, bit 2 / 3 | recompute every header / data digest before parsing, so that the fuzzer reaches the checks behind them |
//! | 0, bit 4 / 5 | header / data digests the host's ICReq asked for (for the ICResp check) |
//! | 1, bits 0-4 | HPDA, the alignment the host asked for (0-31, as ICReq allows) |
//! | 2.. | the wire |
//!
//! The wire goes through three parsers: as a stream of C2H PDUs framed as the queue's
//! receive path frames them (header, padding, data, data digest, next header), and its
//! first 128 bytes (zero-filled) as an ICResp and as an ICReq.

use crate::pdu::{
    self, encode_c2h, flag, kind, parse_c2h, C2h, IcReq, IcResp, Negotiated, PduError, CH_LEN,
    IC_LEN, SHORT_HLEN,
};

/// What one input came to, so that a test can tell that its seeds reached past the
/// first checks (a harness whose every input is refused early checks little).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Controller PDUs whose header parsed, in the order of the stream.
    pub parsed: usize,
    /// Of those, C2H Data PDUs whose data (and digest, when on) was all there and right.
    pub data_ok: usize,
    /// Bytes of the wire the stream walk consumed as whole PDUs.
    pub consumed: usize,
    /// The wire's length.
    pub wire_len: usize,
    /// How the stream walk ended.
    pub end: End,
    /// The ICResp parse accepted the first 128 bytes.
    pub ic_resp: bool,
    /// The ICReq parse accepted them.
    pub ic_req: bool,
}

/// How the walk over a stream of C2H PDUs ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum End {
    /// Every byte belonged to a whole PDU.
    #[default]
    Clean,
    /// The last PDU was cut short (the receive path would wait for more).
    Truncated,
    /// A header the parser refused.
    Refused,
    /// A data digest that did not match.
    DataDigest,
    /// A Terminate Connection Request (the receive path stops there).
    Terminated,
}

/// Runs `input` (laid out as the module documentation says) through the PDU parsers and
/// checks what they promise beyond not panicking: a PDU that parses re-encodes, with the
/// crate's encoder, to bytes that parse to the same value and carry the same common
/// header; the lengths it reports (padding, data, PLEN) add up and never take the walk
/// past the input; the parser reads nothing past the header it is given; a truncated
/// header never parses; and each refusal's fields are consistent with each other.
///
/// # Panics
///
/// When an invariant does not hold: that is how the fuzzer and the corpus test see it.
pub fn parse_any(input: &[u8]) -> Report {
    let (neg, rest) = match input {
        [a, b, rest @ ..] => ((*a, *b), rest),
        _ => ((0, 0), &[][..]),
    };
    let n = Negotiated {
        header_digest: neg.0 & 1 != 0,
        data_digest: neg.0 & 2 != 0,
        cpda: 0,
        hpda: neg.1 & 31,
        max_h2c_data: 1 << 20,
    };
    let fix_hd = neg.0 & 4 != 0;
    let fix_dd = neg.0 & 8 != 0;
    let mut report = walk(rest, &n, fix_hd, fix_dd);
    let mut ic = [0u8; IC_LEN];
    let k = rest.len().min(IC_LEN);
    ic[..k].copy_from_slice(&rest[..k]);
    let req = IcReq {
        hpda: n.hpda,
        header_digest: neg.0 & 16 != 0,
        data_digest: neg.0 & 32 != 0,
        maxr2t: 0,
    };
    report.ic_resp = check_ic_resp(&ic, &req);
    report.ic_req = check_ic_req(&ic);
    report
}

/// Walks `wire` as the receive path does: a header of [`Negotiated::c2h_header_len`]
/// bytes, then for C2H Data its padding, data and data digest, then the next header.
fn walk(wire: &[u8], n: &Negotiated, fix_hd: bool, fix_dd: bool) -> Report {
    let mut w = wire.to_vec();
    let hlen = n.c2h_header_len();
    let mut r = Report {
        wire_len: w.len(),
        ..Report::default()
    };
    let mut at = 0usize;
    r.end = loop {
        assert!(at <= w.len(), "walk went past the wire: {at} > {}", w.len());
        if at == w.len() {
            break End::Clean;
        }
        if fix_hd && n.header_digest && w.len() - at >= hlen && w[at] != kind::C2H_TERM_REQ {
            let d = pdu::crc32c(&w[at..at + SHORT_HLEN]);
            w[at + SHORT_HLEN..at + hlen].copy_from_slice(&d.to_le_bytes());
        }
        let avail = &w[at..];
        let hdr = &avail[..avail.len().min(hlen)];
        let p = parse_c2h(hdr, n);
        check_header(hdr, avail, n, &p);
        let p = match p {
            Ok(p) => p,
            Err(_) if hdr.len() < hlen => break End::Truncated,
            Err(_) => break End::Refused,
        };
        r.parsed += 1;
        let plen = le32(hdr, 4) as usize;
        match p {
            C2h::Term { .. } => break End::Terminated,
            C2h::Resp(_) | C2h::R2t(_) => {
                assert_eq!(plen, hlen, "{p:?}: PLEN is not the header's length");
                at += hlen;
                r.consumed = at;
            }
            C2h::Data(d) => {
                let data = at + hlen + d.pad;
                let Some(end) = data.checked_add(d.datal as usize) else {
                    break End::Truncated;
                };
                let total = end + n.dd();
                assert_eq!(total - at, plen, "{d:?}: PLEN and the walk disagree");
                if total > w.len() {
                    break End::Truncated;
                }
                if n.data_digest {
                    let computed = pdu::crc32c(&w[data..end]);
                    if fix_dd {
                        w[end..total].copy_from_slice(&computed.to_le_bytes());
                    }
                    if le32(&w, end) != computed {
                        break End::DataDigest;
                    }
                }
                r.data_ok += 1;
                at = total;
                r.consumed = at;
            }
        }
    };
    assert!(r.consumed <= r.wire_len);
    if r.end == End::Clean {
        assert_eq!(r.consumed, r.wire_len);
    }
    r
}

/// The invariants of one [`parse_c2h`] call on `hdr`, the first bytes of `avail`.
fn check_header(hdr: &[u8], avail: &[u8], n: &Negotiated, got: &Result<C2h, PduError>) {
    let hlen = n.c2h_header_len();
    // Deterministic, and blind to what follows the header.
    assert_eq!(&parse_c2h(hdr, n), got);
    if avail.len() > hdr.len() {
        assert_eq!(&parse_c2h(avail, n), got, "the parser read past the header");
    }
    let p = match got {
        Ok(p) => *p,
        Err(e) => return check_refusal(hdr, e),
    };
    let need = if matches!(p, C2h::Term { .. }) {
        SHORT_HLEN
    } else {
        hlen
    };
    assert!(hdr.len() >= need, "{p:?} parsed from {} bytes", hdr.len());
    let want_type = match p {
        C2h::Resp(_) => kind::CAPSULE_RESP,
        C2h::R2t(_) => kind::R2T,
        C2h::Data(_) => kind::C2H_DATA,
        C2h::Term { .. } => kind::C2H_TERM_REQ,
    };
    assert_eq!(hdr[0], want_type);
    assert_eq!(hdr[2] as usize, SHORT_HLEN);
    if n.header_digest && need == hlen {
        let d = pdu::crc32c(&hdr[..SHORT_HLEN]);
        assert_eq!(
            le32(hdr, SHORT_HLEN),
            d,
            "{p:?} parsed with a wrong header digest"
        );
    }
    let plen = le32(hdr, 4) as u64;
    let again = encode_c2h(&p, n);
    match p {
        C2h::Term { .. } => {
            assert!(
                (SHORT_HLEN as u64..=152).contains(&plen),
                "{p:?}: PLEN {plen}"
            );
        }
        C2h::Resp(_) => assert_eq!(plen, hlen as u64),
        C2h::R2t(r) => {
            assert_eq!(plen, hlen as u64);
            assert!(r.r2tl > 0, "an R2T for nothing parsed");
        }
        C2h::Data(d) => {
            assert!(d.datal > 0, "C2H Data without data parsed");
            assert!(!d.success || d.last, "SUCCESS without LAST_PDU parsed");
            let align = (n.hpda as usize + 1) * 4;
            assert!(d.pad < align, "{d:?}: padding of a whole alignment unit");
            assert_eq!(hdr[3] as usize, hlen + d.pad, "{d:?}: PDO");
            assert_eq!((hlen + d.pad) % align, 0, "{d:?}: data not aligned to HPDA");
            let want = (hlen + d.pad) as u64 + d.datal as u64 + n.dd() as u64;
            assert_eq!(plen, want, "{d:?}: PLEN");
            assert_eq!(hdr[1] & flag::HDGSTF != 0, n.header_digest);
            assert_eq!(hdr[1] & flag::DDGSTF != 0, n.data_digest);
            // The encoder writes the header, its digest and the padding.
            assert_eq!(again.len(), hlen + d.pad);
        }
    }
    // What parses is what the encoder would have sent: the same value back, and (the
    // Terminate Connection Request's PLEN aside, which counts an offending header the
    // encoder does not carry) the same common header.
    let back = parse_c2h(&again[..again.len().min(hlen)], n);
    assert_eq!(back, Ok(p), "{p:?} does not survive re-encoding");
    if !matches!(p, C2h::Term { .. }) {
        assert_eq!(&again[..CH_LEN], &hdr[..CH_LEN], "{p:?}: common header");
    }
}

/// A refusal's fields agree with each other and with the bytes.
fn check_refusal(hdr: &[u8], e: &PduError) {
    assert!(!e.to_string().is_empty());
    match *e {
        PduError::UnexpectedType(t) => {
            assert!(!matches!(
                t,
                kind::CAPSULE_RESP | kind::C2H_DATA | kind::R2T | kind::C2H_TERM_REQ
            ));
        }
        PduError::HeaderLength { hlen, expected, .. } => {
            assert!(hlen as usize != expected || hdr.len() < expected, "{e}");
        }
        PduError::PduLength { plen, expected, .. } => assert_ne!(plen as u64, expected),
        PduError::DataOffset { pdo, expected, .. } => assert_ne!(pdo as usize, expected),
        PduError::HeaderDigest {
            received, computed, ..
        } => {
            assert_ne!(received, computed);
            assert_eq!(computed, pdu::crc32c(&hdr[..SHORT_HLEN]));
            assert_eq!(received, le32(hdr, SHORT_HLEN));
        }
        PduError::Flags { flags, .. } => assert_eq!(hdr.get(1), Some(&flags)),
        PduError::DataDigest { .. } => panic!("a header parse reported a data digest"),
        PduError::IcResp(_) | PduError::IcReq(_) => {
            panic!("a C2H header parse reported an initialize connection refusal: {e}")
        }
        PduError::Empty { .. } => assert_eq!(le32(hdr, 16), 0, "{e}"),
    }
}

/// The ICResp parse: what it accepts is within what the host asked for and the limits it
/// documents, and re-encodes to the same first 16 bytes (all that is not reserved).
fn check_ic_resp(b: &[u8; IC_LEN], req: &IcReq) -> bool {
    let Ok(neg) = IcResp::parse(b, req) else {
        return false;
    };
    assert!(!neg.header_digest || req.header_digest);
    assert!(!neg.data_digest || req.data_digest);
    assert!(neg.cpda <= 31);
    assert!(neg.max_h2c_data >= 4096 && neg.max_h2c_data % 4 == 0);
    assert_eq!(neg.hpda, req.hpda);
    let again = IcResp {
        cpda: neg.cpda,
        header_digest: neg.header_digest,
        data_digest: neg.data_digest,
        max_h2c_data: neg.max_h2c_data,
    }
    .encode();
    assert_eq!(
        &again[..16],
        &b[..16],
        "ICResp does not survive re-encoding"
    );
    assert_eq!(IcResp::parse(&again, req), Ok(neg));
    true
}

/// The ICReq parse (a target's side): likewise, and what it accepts is a request the
/// encoders can then serve (the controller aligns its data to the HPDA asked for).
fn check_ic_req(b: &[u8; IC_LEN]) -> bool {
    let Ok(req) = IcReq::parse(b) else {
        return false;
    };
    let again = req.encode();
    assert_eq!(&again[..16], &b[..16], "ICReq does not survive re-encoding");
    assert_eq!(IcReq::parse(&again), Ok(req));
    let n = Negotiated {
        header_digest: req.header_digest,
        data_digest: req.data_digest,
        cpda: 0,
        hpda: req.hpda,
        max_h2c_data: 4096,
    };
    let d = C2h::Data(pdu::C2hData {
        cccid: 0,
        datao: 0,
        datal: 1,
        pad: 0,
        last: true,
        success: false,
    });
    let hdr = encode_c2h(&d, &n);
    assert!(parse_c2h(&hdr[..n.c2h_header_len()], &n).is_ok());
    true
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Inputs that reach every C2H PDU type under every digest setting and a few alignments,
/// whole streams of them, and an ICResp and an ICReq: the seeds of the corpus test, and
/// (those that [`in_fuzz_corpus`] picks) of the fuzz corpus, `fuzz/corpus/pdu`, named as
/// here. Each is what a well-behaved controller (or host) sends, so [`parse_any`] takes
/// every one of them to its end.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for hd in [false, true] {
        for dd in [false, true] {
            for hpda in [0u8, 1, 7, 31] {
                let n = Negotiated {
                    header_digest: hd,
                    data_digest: dd,
                    cpda: 0,
                    hpda,
                    max_h2c_data: 1 << 20,
                };
                let neg = [hd as u8 | (dd as u8) << 1, hpda];
                let name = format!("h{}d{}a{hpda}", hd as u8, dd as u8);
                let pdus = sample_pdus();
                for (what, p) in &pdus {
                    let mut b = neg.to_vec();
                    b.extend(wire(p, &n));
                    out.push((format!("seed-{name}-{what}"), b));
                }
                let mut b = neg.to_vec();
                for (_, p) in &pdus {
                    b.extend(wire(p, &n));
                }
                out.push((format!("seed-{name}-stream"), b));
            }
        }
    }
    let req = IcReq {
        hpda: 0,
        header_digest: true,
        data_digest: true,
        maxr2t: 0,
    };
    let resp = IcResp {
        cpda: 0,
        header_digest: true,
        data_digest: false,
        max_h2c_data: 0x4_0000,
    };
    let mut b = vec![16 | 32, 0];
    b.extend(resp.encode());
    out.push(("seed-icresp".into(), b));
    let mut b = vec![0, 0];
    b.extend(req.encode());
    out.push(("seed-icreq".into(), b));
    out
}

/// Whether the seed `name` is committed to the fuzz corpus: the streams (which hold one
/// PDU of each type) and the ICResp and ICReq, so that the corpus stays a few small files
/// and the fuzzer's crossover has whole PDUs to splice.
pub fn in_fuzz_corpus(name: &str) -> bool {
    name.ends_with("-stream") || name.starts_with("seed-ic")
}

/// One of each controller PDU (and each kind of C2H Data), in an order a read and a
/// write could produce them; the Terminate Connection Request last, as it ends the walk.
fn sample_pdus() -> Vec<(&'static str, C2h)> {
    let data = |datao, datal, last, success| {
        C2h::Data(pdu::C2hData {
            cccid: 3,
            datao,
            datal,
            pad: 0,
            last,
            success,
        })
    };
    vec![
        (
            "r2t",
            C2h::R2t(pdu::R2t {
                cccid: 1,
                ttag: 7,
                r2to: 0,
                r2tl: 8192,
            }),
        ),
        ("data", data(0, 13, false, false)),
        ("data-last", data(13, 3, true, false)),
        ("data-success", data(0, 16, true, true)),
        (
            "resp",
            C2h::Resp(pdu::Cqe {
                result: 0x0102_0304_0506_0708,
                sqhd: 9,
                cid: 3,
                status: 0x2002,
            }),
        ),
        ("term", C2h::Term { fes: 1, fei: 4 }),
    ]
}

/// A whole PDU on the wire: header, padding, data (a pattern) and data digest.
fn wire(p: &C2h, n: &Negotiated) -> Vec<u8> {
    let mut b = encode_c2h(p, n);
    if let C2h::Data(d) = p {
        let data: Vec<u8> = (0..d.datal).map(|i| (i * 37 + 11) as u8).collect();
        b.extend(&data);
        if n.data_digest {
            b.extend(pdu::crc32c(&data).to_le_bytes());
        }
    }
    b
}

#[cfg(test)]
mod tests;
