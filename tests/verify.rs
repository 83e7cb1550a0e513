//! `--verify`, `--verify-only` and `--hash` against the software controller: the source's
//! chunk hashes taken during the copy catch a destination changed behind nvcopy's back,
//! naming it and the bytes, and the digest equals what sha256sum / b3sum print.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::{ctrl, data, ok, opts, Rig, MIB};
use nvcopy::digest::DigestKind;
use nvcopy::{Client, DestMask, Flags, JobOptions};
use nvcopy_nvme_sim::MediaError;
use sha2::Digest as _;

const BOUND: Duration = Duration::from_secs(20);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_copy_digests_its_source_and_its_hashes_verify_the_destinations() {
    let rig = Rig::new(vec![ctrl(&[(512, 8 * MIB); 3])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 4096, 3 * MIB + 512 * 3);
    let dests = [
        rig.region(0, 2, 0, src.len),
        rig.region(0, 3, 8192, src.len),
    ];
    let bytes = data(31, src.len);
    rig.put(&src, &bytes);
    for kind in [DigestKind::Sha256, DigestKind::Blake3] {
        let options = JobOptions {
            hash_chunks: true,
            digest: Some(kind),
            ..JobOptions::default()
        };
        let h = client
            .copy_with(&src, &dests, Flags::NONE, &options, |_, _| {})
            .unwrap();
        let o = h.wait_timeout(BOUND).unwrap();
        assert!(ok(&o), "{o:?}");
        let want = match kind {
            DigestKind::Sha256 => hex(&sha2::Sha256::digest(&bytes)),
            DigestKind::Blake3 => blake3::hash(&bytes).to_hex().to_string(),
        };
        assert_eq!(o.digest.as_deref(), Some(want.as_str()), "{kind}");

        // Nothing changed: the destinations verify.
        let hashes = h.hashes().unwrap();
        let v = client
            .verify(&dests, hashes.clone(), |_, _| {})
            .unwrap()
            .wait_timeout(BOUND)
            .unwrap();
        assert!(ok(&v) && v.mismatches.is_empty(), "{v:?}");

        // One byte changed behind nvcopy's back, on destination 1 only.
        let at = 1_500_000u64;
        let mut b = [0u8; 1];
        rig.sim(0).read_ns(3, dests[1].offset + at, &mut b).unwrap();
        rig.sim(0)
            .write_ns(3, dests[1].offset + at, &[b[0] ^ 0x40])
            .unwrap();
        let v = client
            .verify(&dests, hashes, |_, _| {})
            .unwrap()
            .wait_timeout(BOUND)
            .unwrap();
        assert_eq!(v.write_err, DestMask(0b10), "{v:?}");
        assert!(!v.read_err);
        assert_eq!(v.mismatches.len(), 1, "{v:?}");
        let m = v.mismatches[0];
        assert_eq!(m.destination, 1);
        assert!(m.offset <= at && at < m.offset + m.len, "{m:?}");
        let msg = v.first_error.unwrap();
        assert!(
            msg.contains("destination 1") && msg.contains(&m.offset.to_string()),
            "{msg}"
        );
        // Put it back for the next round.
        rig.sim(0).write_ns(3, dests[1].offset + at, &b).unwrap();
    }
}

#[test]
fn verify_only_reads_the_source_and_compares_without_writing() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB); 2])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 0, 2 * MIB);
    let dst = rig.region(0, 2, 0, 2 * MIB);
    let bytes = data(32, src.len);
    rig.put(&src, &bytes);
    let mut other = bytes.clone();
    other[2 * MIB as usize - 1] ^= 1;
    rig.put(&dst, &other);
    let writes = rig.io(0, nvcopy_nvme::spec::io::WRITE);
    let options = JobOptions {
        hash_chunks: true,
        digest: Some(DigestKind::Sha256),
        ..JobOptions::default()
    };
    let h = client.read(&src, Flags::NONE, &options, |_, _| {}).unwrap();
    let o = h.wait_timeout(BOUND).unwrap();
    assert!(ok(&o), "{o:?}");
    assert_eq!(o.digest.unwrap(), hex(&sha2::Sha256::digest(&bytes)));
    let v = client
        .verify(&[dst], h.hashes().unwrap(), |_, _| {})
        .unwrap()
        .wait_timeout(BOUND)
        .unwrap();
    assert_eq!(v.write_err, DestMask(1), "{v:?}");
    assert_eq!(v.mismatches.len(), 1);
    assert_eq!(v.mismatches[0].offset + v.mismatches[0].len, 2 * MIB);
    assert_eq!(
        rig.io(0, nvcopy_nvme::spec::io::WRITE),
        writes,
        "verify-only wrote"
    );
    assert!(rig.get(&dst) == other);
}

#[test]
fn no_digest_when_part_of_the_source_could_not_be_read() {
    let rig = Rig::new(vec![ctrl(&[(512, 4 * MIB); 2])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 0, MIB);
    let dst = rig.region(0, 2, 0, MIB);
    rig.put(&src, &data(33, MIB));
    rig.sim(0)
        .faults()
        .media_error(MediaError::read(1, 700..701).dnr(true));
    let options = JobOptions {
        hash_chunks: true,
        digest: Some(DigestKind::Blake3),
        ..JobOptions::default()
    };
    let h = client
        .copy_with(&src, &[dst], Flags::IGNORE_ERRORS, &options, |_, _| {})
        .unwrap();
    let o = h.wait_timeout(BOUND).unwrap();
    assert!(o.read_err && o.digest.is_none(), "{o:?}");
    // The chunk that could not be read has no hash, so verify skips it, and the rest match.
    let v = client
        .verify(&[dst], h.hashes().unwrap(), |_, _| {})
        .unwrap()
        .wait_timeout(BOUND)
        .unwrap();
    assert!(ok(&v), "{v:?}");
    assert!(v.bytes_ok > 0 && v.bytes_ok < MIB, "{v:?}");
}
