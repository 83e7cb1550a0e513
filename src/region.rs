//! Regions: what a copy reads from and writes to. A region is a namespace of a controller,
//! a byte offset and a length, written `BDF[/NSID][@OFFSET][+LENGTH]` on the command line
//! (sizes take K, M, G, T suffixes in powers of 1024, as dd does with its iB forms).

use std::fmt;
use std::str::FromStr;

use std::sync::Arc;

use nvcopy_nvme::Controller;
use nvcopy_vfio::PciAddress;

use crate::error::{Error, Result};

/// Most destinations one job may have (kcopyd allows 8; nvcopy's mask is 64 bits).
pub const MAX_DESTS: usize = 64;

/// A region as the user wrote it, before it is checked against a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Controller.
    pub addr: PciAddress,
    /// Namespace (default 1).
    pub nsid: u32,
    /// Byte offset (default 0).
    pub offset: u64,
    /// Byte length (default: to the end of the namespace, or the source's length).
    pub len: Option<u64>,
}

/// Parses `4096`, `64K`, `1M`, `2G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::Usage(format!(
            "invalid size {s:?}: use a number with an optional K, M, G or T suffix"
        ))
    };
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

impl FromStr for RegionSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (rest, len) = match s.split_once('+') {
            Some((r, l)) => (r, Some(parse_size(l)?)),
            None => (s, None),
        };
        let (rest, offset) = match rest.split_once('@') {
            Some((r, o)) => (r, parse_size(o)?),
            None => (rest, 0),
        };
        let (bdf, nsid) = match rest.split_once('/') {
            Some((b, n)) => (
                b,
                n.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Error::Usage(format!(
                        "invalid namespace id {n:?} in {s:?}: use 1 or more"
                    ))
                })?,
            ),
            None => (rest, 1),
        };
        let addr = bdf
            .parse()
            .map_err(|e: nvcopy_vfio::Error| Error::Usage(format!("in region {s:?}: {e}")))?;
        if len == Some(0) {
            return Err(Error::Usage(format!("region {s:?} has zero length")));
        }
        Ok(RegionSpec {
            addr,
            nsid,
            offset,
            len,
        })
    }
}

impl fmt::Display for RegionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.addr, self.nsid, self.offset)?;
        if let Some(l) = self.len {
            write!(f, "+{l}")?;
        }
        Ok(())
    }
}

/// A region checked against its namespace: in range and aligned to its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Index of the controller in the platform's list.
    pub ctrl: usize,
    /// Namespace id.
    pub nsid: u32,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// The namespace's block size.
    pub lba_size: u32,
}

impl Region {
    /// Checks `spec` against a namespace of `blocks` blocks of `lba_size` bytes; `default_len`
    /// is used when the spec gives none.
    pub fn check(
        spec: &RegionSpec,
        ctrl: usize,
        lba_size: u32,
        blocks: u64,
        default_len: Option<u64>,
    ) -> Result<Region> {
        let capacity = blocks.checked_mul(lba_size as u64).ok_or_else(|| {
            Error::Usage(format!(
                "{}/{}: {blocks} blocks of {lba_size} bytes is more than 2^64 bytes; the device's Identify data is not believable",
                spec.addr, spec.nsid
            ))
        })?;
        let len = spec
            .len
            .or(default_len)
            .unwrap_or(capacity.saturating_sub(spec.offset));
        let bs = lba_size as u64;
        if spec.offset % bs != 0 || len % bs != 0 {
            return Err(Error::Usage(format!(
                "region {spec}: offset {} and length {len} must be multiples of the namespace's {bs}-byte block size",
                spec.offset
            )));
        }
        if len == 0
            || spec
                .offset
                .checked_add(len)
                .is_none_or(|end| end > capacity)
        {
            return Err(Error::Usage(format!(
                "region {spec} (length {len}) does not fit in {}/{}, which holds {capacity} bytes",
                spec.addr, spec.nsid
            )));
        }
        Ok(Region {
            ctrl,
            nsid: spec.nsid,
            offset: spec.offset,
            len,
            lba_size,
        })
    }

    /// Checks a region built in code (not parsed) against its namespace.
    pub fn check_against(
        r: &Region,
        ns: &nvcopy_nvme::Namespace,
    ) -> std::result::Result<(), String> {
        let bs = ns.lba_size as u64;
        if r.lba_size != ns.lba_size {
            return Err(format!(
                "region says {}-byte blocks, namespace {} has {bs}",
                r.lba_size, ns.nsid
            ));
        }
        if r.offset % bs != 0 || r.len % bs != 0 || r.len == 0 {
            return Err(format!(
                "region {}+{} is not whole {bs}-byte blocks of namespace {}",
                r.offset, r.len, ns.nsid
            ));
        }
        if r.offset
            .checked_add(r.len)
            .is_none_or(|end| end > ns.bytes())
        {
            return Err(format!(
                "region {}+{} runs past the end of namespace {} ({} bytes)",
                r.offset,
                r.len,
                ns.nsid,
                ns.bytes()
            ));
        }
        Ok(())
    }

    /// Whether two regions on the same namespace of the same controller share a byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        self.ctrl == other.ctrl && self.nsid == other.nsid && self.shares_bytes_with(other)
    }

    /// Whether two regions share a byte of the same media, `controllers` being the list
    /// their `ctrl` indexes: on one controller and namespace id, or on namespaces that
    /// [`nvcopy_nvme::Namespace::same_media`] says are one (a namespace reached through
    /// two controllers).
    pub fn overlaps_in(&self, other: &Region, controllers: &[Arc<Controller>]) -> bool {
        if !self.shares_bytes_with(other) {
            return false;
        }
        if self.ctrl == other.ctrl && self.nsid == other.nsid {
            return true;
        }
        let find = |r: &Region| {
            let c = controllers.get(r.ctrl)?;
            let ns = c.namespaces().iter().find(|n| n.nsid == r.nsid)?;
            Some((ns, c.info()))
        };
        match (find(self), find(other)) {
            (Some((a, ai)), Some((b, bi))) => a.same_media(ai, b, bi),
            _ => false,
        }
    }

    /// Whether the byte ranges intersect, whatever namespace they are on.
    fn shares_bytes_with(&self, other: &Region) -> bool {
        self.offset < other.offset.saturating_add(other.len)
            && other.offset < self.offset.saturating_add(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_region_syntax() {
        let r: RegionSpec = "0000:00:10.0".parse().unwrap();
        assert_eq!((r.nsid, r.offset, r.len), (1, 0, None));
        let r: RegionSpec = "00:11.0/2@1M+512K".parse().unwrap();
        assert_eq!(
            (r.addr.to_string().as_str(), r.nsid, r.offset, r.len),
            ("0000:00:11.0", 2, 1 << 20, Some(512 << 10))
        );
        assert_eq!(parse_size("3G").unwrap(), 3 << 30);
        for bad in [
            "00:10.0/0",
            "00:10.0/x",
            "00:10.0@1Q",
            "00:10.0+0",
            "zz",
            "00:10.0+99999999999T",
        ] {
            assert!(
                matches!(bad.parse::<RegionSpec>(), Err(Error::Usage(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn checks_bounds_alignment_and_overlap() {
        let spec: RegionSpec = "00:10.0@4096+8192".parse().unwrap();
        let r = Region::check(&spec, 0, 4096, 4, None).unwrap();
        assert_eq!((r.offset, r.len), (4096, 8192));
        let whole = Region::check(&"00:10.0@4096".parse().unwrap(), 0, 512, 64, None).unwrap();
        assert_eq!(whole.len, 64 * 512 - 4096);
        let e = Region::check(&"00:10.0@512+4096".parse().unwrap(), 0, 4096, 4, None).unwrap_err();
        assert!(e.to_string().contains("multiples"), "{e}");
        let e =
            Region::check(&"00:10.0@8192+12288".parse().unwrap(), 0, 4096, 4, None).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        let a = Region::check(&"00:10.0+8192".parse().unwrap(), 0, 4096, 4, None).unwrap();
        assert!(r.overlaps(&a) && a.overlaps(&r));
        let b = Region::check(&"00:10.0@12288+4096".parse().unwrap(), 0, 4096, 4, None).unwrap();
        assert!(!b.overlaps(&a));
        assert!(!Region { ctrl: 1, ..a }.overlaps(&a));
    }

    #[test]
    fn a_namespace_too_large_for_u64_bytes_is_refused() {
        let spec: RegionSpec = "00:10.0".parse().unwrap();
        let e = Region::check(&spec, 0, 4096, u64::MAX, None).unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{e}");
        assert!(e.to_string().contains("00:10.0"), "{e}");
        // The largest block count whose bytes fit is still usable.
        let r = Region::check(&spec, 0, 4096, u64::MAX / 4096, None).unwrap();
        assert_eq!(r.len, u64::MAX / 4096 * 4096);
    }
}
