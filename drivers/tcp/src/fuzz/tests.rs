//! The fuzz harness over a seeded corpus, so that its invariants are checked in every
//! `cargo test` and not only where cargo-fuzz runs: the seeds themselves, then mutations
//! of them drawn from a fixed-seed generator (the same inputs every run, so a failure
//! reproduces).

#![allow(clippy::unwrap_used)]

use super::*;

/// SplitMix64: small, seedable, and good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Where each PDU of a seed's wire starts (its header), found by framing it with PLEN.
fn header_starts(seed: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 2;
    while at + 8 <= seed.len() {
        out.push(at);
        let plen = u32::from_le_bytes(seed[at + 4..at + 8].try_into().unwrap()) as usize;
        at += plen.max(1);
    }
    out
}

/// Fields of a header, as (offset, width): the common header's type, flags, HLEN, PDO and
/// PLEN; C2H Data's and R2T's CCCID, TTAG, offset and length; ICReq's and ICResp's
/// PFV, PDA, digests and MAXR2T/MAXH2CDATA (which share the same offsets).
const FIELDS: [(usize, usize); 11] = [
    (0, 1),
    (1, 1),
    (2, 1),
    (3, 1),
    (4, 4),
    (8, 2),
    (10, 1),
    (10, 2),
    (11, 1),
    (12, 4),
    (16, 4),
];

/// One to four edits of `b`: bit flips, byte writes, truncation, extension, edits of a
/// header's fields (nudged, set to a boundary value, or random), a C2H Data length with
/// PLEN changed to match (so that only the checks on DATAL itself can refuse it), and
/// edits of the negotiation bytes.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let starts = header_starts(seed);
    for _ in 0..1 + rng.below(4) {
        let h = starts.get(rng.below(starts.len())).copied().unwrap_or(2);
        match rng.below(10) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => b.truncate(rng.below(b.len() + 1)),
            3 => {
                let k = rng.below(40);
                b.extend((0..k).map(|_| rng.next() as u8));
            }
            4 | 5 => {
                let (off, width) = FIELDS[rng.below(FIELDS.len())];
                if let Some(old) = field(&b, h + off, width) {
                    let new = match rng.below(4) {
                        0 => old.wrapping_add(1 + rng.below(8) as u32),
                        1 => old.wrapping_sub(1 + rng.below(8) as u32),
                        2 => [0, 1, 3, 4, 24, 28, 32, 128, 152, 4096, u32::MAX][rng.below(11)],
                        _ => rng.next() as u32,
                    };
                    b[h + off..h + off + width].copy_from_slice(&new.to_le_bytes()[..width]);
                }
            }
            6 => {
                // DATAL and PLEN together.
                if let (Some(plen), Some(datal)) = (field(&b, h + 4, 4), field(&b, h + 16, 4)) {
                    let new = [0, 1, 4095, 4096, u32::MAX][rng.below(5)];
                    let plen = plen.wrapping_sub(datal).wrapping_add(new);
                    b[h + 4..h + 8].copy_from_slice(&plen.to_le_bytes());
                    b[h + 16..h + 20].copy_from_slice(&new.to_le_bytes());
                }
            }
            7 if b.len() >= 2 => b[0] ^= 1 << rng.below(6),
            8 if b.len() >= 2 => b[1] = rng.next() as u8,
            _ => {
                // The digest fix-ups on, so that edits behind a header digest are parsed.
                if !b.is_empty() {
                    b[0] |= 4 | 8;
                }
            }
        }
    }
    b
}

/// The little-endian field of `width` bytes at `at`, when `b` holds it.
fn field(b: &[u8], at: usize, width: usize) -> Option<u32> {
    let f = b.get(at..at + width)?;
    let mut v = [0u8; 4];
    v[..width].copy_from_slice(f);
    Some(u32::from_le_bytes(v))
}

#[test]
fn every_seed_parses_to_its_end() {
    let seeds = seeds();
    assert!(seeds.len() > 100);
    for (name, b) in &seeds {
        let r = parse_any(b);
        if name.starts_with("seed-icresp") {
            assert!(r.ic_resp, "{name}: {r:?}");
        } else if name.starts_with("seed-icreq") {
            assert!(r.ic_req, "{name}: {r:?}");
        } else if name.ends_with("-term") || name.ends_with("-stream") {
            assert_eq!(r.end, End::Terminated, "{name}: {r:?}");
        } else {
            assert_eq!(r.end, End::Clean, "{name}: {r:?}");
            assert_eq!((r.parsed, r.consumed), (1, r.wire_len), "{name}: {r:?}");
        }
        if name.ends_with("-stream") {
            // R2T, three C2H Data, a response, then the Terminate Connection Request.
            assert_eq!((r.parsed, r.data_ok), (6, 3), "{name}: {r:?}");
        }
    }
}

#[test]
fn seeded_mutations_keep_the_invariants() {
    let mut rng = Rng(0x6e76_636f_7079_0010);
    let mut ends = std::collections::HashMap::new();
    let mut parsed = 0;
    let mut runs = 0;
    for (_, seed) in seeds() {
        for _ in 0..1000 {
            let b = mutate(&mut rng, &seed);
            let r = parse_any(&b);
            *ends.entry(r.end).or_insert(0) += 1;
            parsed += r.parsed;
            runs += 1;
        }
    }
    // The mutations reach every way a walk can end, and most of them get some PDU past
    // the parser: a corpus refused at the first byte would check nothing.
    for e in [
        End::Clean,
        End::Truncated,
        End::Refused,
        End::DataDigest,
        End::Terminated,
    ] {
        assert!(ends.get(&e).copied().unwrap_or(0) > 100, "{e:?}: {ends:?}");
    }
    assert!(parsed > runs / 2, "{parsed} PDUs parsed in {runs} runs");
}

#[test]
fn short_and_empty_inputs() {
    assert_eq!(parse_any(&[]).end, End::Clean);
    assert_eq!(parse_any(&[3]).end, End::Clean);
    for k in 0..32 {
        let r = parse_any(&vec![0x05; k]);
        assert_eq!(r.parsed, 0, "{k}: {r:?}");
    }
}

/// The committed seed corpus is what [`seeds`] makes; `NVCOPY_WRITE_FUZZ_CORPUS=1`
/// rewrites it. Files not named `seed-*` are the fuzzer's own finds, and left alone.
#[test]
fn committed_corpus_is_the_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/pdu");
    let seeds: Vec<_> = seeds()
        .into_iter()
        .filter(|(n, _)| in_fuzz_corpus(n))
        .collect();
    assert!(seeds.len() >= 16 && seeds.len() < 32, "{}", seeds.len());
    if std::env::var_os("NVCOPY_WRITE_FUZZ_CORPUS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, b) in &seeds {
            std::fs::write(dir.join(name), b).unwrap();
        }
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seed-"))
        .collect();
    on_disk.sort();
    let mut names: Vec<String> = seeds.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(on_disk, names, "rerun with NVCOPY_WRITE_FUZZ_CORPUS=1");
    for (name, b) in &seeds {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), b, "{name}");
    }
}
