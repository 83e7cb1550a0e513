//! Hashes of the data a job moves: a fast hash per chunk, taken when the source chunk is
//! read, for `--verify`; and a digest of the whole source region, in order, for `--hash`
//! (what `sha256sum` or `b3sum` prints for the same bytes, as dcfldd and dc3dd report).

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::error::{Error, Refusal};

/// The per-chunk hash compared by `--verify`: xxh3, 64 bits. A mismatch between a
/// destination and the source is missed with probability 2^-64 per chunk; it is a check
/// for faults, not for an adversary.
pub fn chunk_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// Which digest `--hash` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestKind {
    /// SHA-256, as `sha256sum` prints it.
    Sha256,
    /// BLAKE3, as `b3sum` prints it.
    Blake3,
}

impl DigestKind {
    /// The name used on the command line and in summaries.
    pub fn name(self) -> &'static str {
        match self {
            DigestKind::Sha256 => "sha256",
            DigestKind::Blake3 => "blake3",
        }
    }
}

impl fmt::Display for DigestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DigestKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "sha256" => Ok(DigestKind::Sha256),
            "blake3" => Ok(DigestKind::Blake3),
            _ => Err(Refusal::UnknownDigest {
                text: s.to_string(),
            }
            .into()),
        }
    }
}

/// A digest being computed over the source, fed in order.
pub enum Digester {
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// BLAKE3.
    Blake3(Box<blake3::Hasher>),
}

impl fmt::Debug for Digester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Digester::Sha256(_) => "Digester(sha256)",
            Digester::Blake3(_) => "Digester(blake3)",
        })
    }
}

impl Digester {
    /// A fresh digest of `kind`.
    pub fn new(kind: DigestKind) -> Digester {
        match kind {
            DigestKind::Sha256 => Digester::Sha256(sha2::Sha256::new()),
            DigestKind::Blake3 => Digester::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// Feeds the next bytes of the source.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Digester::Sha256(h) => h.update(data),
            Digester::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The digest in lower-case hex.
    pub fn finish(self) -> String {
        let bytes: Vec<u8> = match self {
            Digester::Sha256(h) => h.finalize().to_vec(),
            Digester::Blake3(h) => h.finalize().as_bytes().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_the_published_test_vectors() {
        let mut d = Digester::new(DigestKind::Sha256);
        d.update(b"ab");
        d.update(b"c");
        assert_eq!(
            d.finish(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let d = Digester::new(DigestKind::Blake3);
        assert_eq!(
            d.finish(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_ne!(chunk_hash(b"a"), chunk_hash(b"b"));
        assert!("md5".parse::<DigestKind>().is_err());
        assert_eq!(
            "blake3".parse::<DigestKind>().ok(),
            Some(DigestKind::Blake3)
        );
    }
}
