//! Regions: what a copy reads from and writes to. A region is a namespace of a controller,
//! a byte offset and a length, written `BDF[/NSID][@OFFSET][+LENGTH]` on the command line
//! (sizes take K, M, G, T suffixes in powers of 1024, as dd does with its iB forms).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use std::sync::Arc;

use nvcopy_vfio::PciAddress;

use crate::endpoint::{Device, Volume};

use crate::error::{Error, Refusal, Result};

/// Most destinations one job may have (kcopyd allows 8; nvcopy's mask is 64 bits).
pub const MAX_DESTS: usize = 64;

/// What a region lies on, as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Place {
    /// A namespace of the NVMe controller at this PCI address.
    Pci(PciAddress),
    /// A file or kernel block device.
    Path(PathBuf),
    /// A namespace of an NVMe/TCP controller: `nvme+tcp://HOST:PORT/NQN`.
    Tcp(nvcopy_tcp::Target),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Pci(a) => write!(f, "{a}"),
            Place::Path(p) => write!(f, "{}", p.display()),
            Place::Tcp(t) => write!(f, "{TCP_SCHEME}{t}"),
        }
    }
}

/// How a region on an NVMe/TCP controller starts.
pub const TCP_SCHEME: &str = "nvme+tcp://";

/// The NVMe/TCP port when none is written (IANA's NVMe-oF port).
pub const TCP_DEFAULT_PORT: u16 = 4420;

/// Parses `HOST[:PORT]/NQN[/NSID]` (after the scheme; `[ADDR]` for IPv6).
fn parse_tcp(region: &str, s: &str) -> Result<(nvcopy_tcp::Target, Option<u32>)> {
    let bad = |why: &str| {
        Error::from(Refusal::BadTcpAddress {
            region: region.to_string(),
            why: why.to_string(),
        })
    };
    let (hostport, rest) = s
        .split_once('/')
        .ok_or_else(|| bad("no subsystem NQN after HOST:PORT/"))?;
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| bad("an unclosed [ in the host"))?;
        (h, p.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None => TCP_DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
    };
    let (nqn, nsid) = match rest.rsplit_once('/') {
        Some((n, id)) => {
            let id = id.parse::<u32>().ok().filter(|&i| i > 0).ok_or_else(|| {
                Error::from(Refusal::BadNamespaceId {
                    text: id.to_string(),
                    region: region.to_string(),
                })
            })?;
            (n, Some(id))
        }
        None => (rest, None),
    };
    if nqn.is_empty() || nqn.len() > 223 || nqn.contains('/') {
        return Err(bad(
            "the subsystem NQN is empty, longer than 223 bytes, or holds a /",
        ));
    }
    Ok((
        nvcopy_tcp::Target {
            host: host.to_string(),
            port,
            nqn: nqn.to_string(),
        },
        nsid,
    ))
}

/// Parses `nvme+tcp://HOST[:PORT]/NQN[/NSID]` naming a controller, as `nvcopy identify`
/// takes it: the target, and the namespace id when one was written.
pub fn parse_tcp_controller(s: &str) -> Result<(nvcopy_tcp::Target, Option<u32>)> {
    let rest = s.strip_prefix(TCP_SCHEME).ok_or_else(|| {
        Error::from(Refusal::BadTcpAddress {
            region: s.to_string(),
            why: format!("it does not start with {TCP_SCHEME}"),
        })
    })?;
    parse_tcp(s, rest)
}

/// A region as the user wrote it, before it is checked against a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionSpec {
    /// Controller, or path.
    pub place: Place,
    /// Namespace (default 1; always 1 for a path).
    pub nsid: u32,
    /// Byte offset (default 0).
    pub offset: u64,
    /// Byte length (default: to the end of the namespace, or the source's length).
    pub len: Option<u64>,
}

impl RegionSpec {
    /// The controller's PCI address, for a region on one.
    pub fn pci(&self) -> Option<PciAddress> {
        match self.place {
            Place::Pci(a) => Some(a),
            Place::Path(_) | Place::Tcp(_) => None,
        }
    }

    /// The NVMe/TCP controller, for a region on one.
    pub fn tcp(&self) -> Option<&nvcopy_tcp::Target> {
        match &self.place {
            Place::Tcp(t) => Some(t),
            _ => None,
        }
    }

    /// The path, for a region on a file or block device.
    pub fn path(&self) -> Option<&std::path::Path> {
        match &self.place {
            Place::Path(p) => Some(p),
            Place::Pci(_) | Place::Tcp(_) => None,
        }
    }
}

/// Parses `4096`, `64K`, `1M`, `2G`, `1T` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || {
        Error::from(Refusal::BadSize {
            text: s.to_string(),
        })
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

    /// `BDF[/NSID][@OFFSET][+LENGTH]`, or `PATH[@OFFSET][+LENGTH]` for anything that is
    /// not a PCI address (`/dev/sdb`, `./disk.raw`, `golden.img`).
    fn from_str(s: &str) -> Result<Self> {
        // `nvme+tcp://` holds a '+': the suffixes are looked for after the scheme.
        let (scheme, body) = match s.strip_prefix(TCP_SCHEME) {
            Some(b) => (true, b),
            None => (false, s),
        };
        let (rest, len) = match body.rsplit_once('+') {
            Some((r, l)) => (r, Some(parse_size(l)?)),
            None => (body, None),
        };
        let (rest, offset) = match rest.rsplit_once('@') {
            Some((r, o)) => (r, parse_size(o)?),
            None => (rest, 0),
        };
        if len == Some(0) {
            return Err(Refusal::ZeroLength {
                region: s.to_string(),
            }
            .into());
        }
        if scheme {
            let (target, nsid) = parse_tcp(s, rest)?;
            return Ok(RegionSpec {
                place: Place::Tcp(target),
                nsid: nsid.unwrap_or(1),
                offset,
                len,
            });
        }
        let (bdf, nsid) = match rest.split_once('/') {
            Some((b, n)) => (b, Some(n)),
            None => (rest, None),
        };
        let addr = match bdf.parse::<PciAddress>() {
            Ok(a) => a,
            Err(source) => {
                // A bus:device.function-looking name that does not parse is a typo, not a
                // file name; anything else is a path.
                if looks_like_pci(bdf) && nsid.is_none_or(|n| n.parse::<u32>().is_ok()) {
                    return Err(Refusal::BadAddress {
                        region: s.to_string(),
                        source,
                    }
                    .into());
                }
                if rest.is_empty() {
                    return Err(Refusal::BadAddress {
                        region: s.to_string(),
                        source,
                    }
                    .into());
                }
                return Ok(RegionSpec {
                    place: Place::Path(PathBuf::from(rest)),
                    nsid: 1,
                    offset,
                    len,
                });
            }
        };
        let nsid =
            match nsid {
                None => 1,
                Some(n) => n.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
                    Refusal::BadNamespaceId {
                        text: n.to_string(),
                        region: s.to_string(),
                    }
                })?,
            };
        Ok(RegionSpec {
            place: Place::Pci(addr),
            nsid,
            offset,
            len,
        })
    }
}

/// `DDDD:BB:DD.F` or `BB:DD.F` with hex digits: what a PCI address looks like.
fn looks_like_pci(s: &str) -> bool {
    let hex = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_hexdigit());
    let Some((head, func)) = s.rsplit_once('.') else {
        return false;
    };
    let parts: Vec<&str> = head.split(':').collect();
    (2..=3).contains(&parts.len()) && parts.iter().all(|p| hex(p)) && hex(func)
}

impl fmt::Display for RegionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.place {
            Place::Pci(a) => write!(f, "{a}/{}@{}", self.nsid, self.offset)?,
            Place::Tcp(_) => write!(f, "{}/{}@{}", self.place, self.nsid, self.offset)?,
            Place::Path(p) => write!(f, "{}@{}", p.display(), self.offset)?,
        }
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
        let namespace = || match &spec.place {
            Place::Pci(a) => format!("{a}/{}", spec.nsid),
            Place::Tcp(_) => format!("{}/{}", spec.place, spec.nsid),
            Place::Path(p) => p.display().to_string(),
        };
        let capacity =
            blocks
                .checked_mul(lba_size as u64)
                .ok_or_else(|| Refusal::NamespaceTooLarge {
                    namespace: namespace(),
                    blocks,
                    lba_size,
                })?;
        let len = spec
            .len
            .or(default_len)
            .unwrap_or(capacity.saturating_sub(spec.offset));
        check_extent(spec.offset, len, lba_size, capacity, || {
            (spec.to_string(), namespace())
        })?;
        Ok(Region {
            ctrl,
            nsid: spec.nsid,
            offset: spec.offset,
            len,
            lba_size,
        })
    }

    /// Checks a region built in code (not parsed) against its namespace, `ctrl` being its
    /// controller's name: the same bounds and alignment checks as [`Region::check`], and
    /// that the region's block size is the namespace's.
    pub fn check_against(r: &Region, v: &Volume, ctrl: &str) -> std::result::Result<(), Refusal> {
        if r.lba_size != v.block_size {
            return Err(Refusal::BlockSizeMismatch {
                region: r.name_on(ctrl),
                region_lba: r.lba_size,
                ns_lba: v.block_size,
            });
        }
        let capacity = v.blocks.saturating_mul(v.block_size as u64);
        check_extent(r.offset, r.len, v.block_size, capacity, || {
            (r.name_on(ctrl), format!("{ctrl}/{}", v.id))
        })
    }

    /// The region written `CONTROLLER/NSID@OFFSET+LENGTH`, `ctrl` being its controller's
    /// name: how refusals name regions built in code.
    pub fn name_on(&self, ctrl: &str) -> String {
        format!("{ctrl}/{}@{}+{}", self.nsid, self.offset, self.len)
    }

    /// [`Region::name_on`] its device in `devices` (or `#INDEX` if it is not there).
    pub fn name_in(&self, devices: &[Arc<dyn Device>]) -> String {
        match devices.get(self.ctrl) {
            Some(c) => self.name_on(c.name()),
            None => self.name_on(&format!("#{}", self.ctrl)),
        }
    }

    /// Whether two regions on the same namespace of the same controller share a byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        self.ctrl == other.ctrl && self.nsid == other.nsid && self.shares_bytes_with(other)
    }

    /// Whether two regions share a byte of the same media, `devices` being the list
    /// their `ctrl` indexes: on one device and volume, or on volumes that
    /// [`crate::endpoint::MediaId::same`] says are one (a namespace reached through two
    /// controllers, a file opened by two paths).
    pub fn overlaps_in(&self, other: &Region, devices: &[Arc<dyn Device>]) -> bool {
        if !self.shares_bytes_with(other) {
            return false;
        }
        if self.ctrl == other.ctrl && self.nsid == other.nsid {
            return true;
        }
        let media = |r: &Region| {
            let d = devices.get(r.ctrl)?;
            let v = d.volume(r.nsid).ok()?;
            Some(d.media(&v))
        };
        match (media(self), media(other)) {
            (Some(a), Some(b)) => a.same(&b),
            _ => false,
        }
    }

    /// Whether the byte ranges intersect, whatever namespace they are on.
    fn shares_bytes_with(&self, other: &Region) -> bool {
        self.offset < other.offset.saturating_add(other.len)
            && other.offset < self.offset.saturating_add(self.len)
    }
}

/// The one bounds and alignment check: `len` bytes at `offset` must be whole blocks of
/// `lba_size` bytes and lie, not empty, within `capacity` bytes. `names` gives the region
/// and namespace as refusals name them.
fn check_extent(
    offset: u64,
    len: u64,
    lba_size: u32,
    capacity: u64,
    names: impl Fn() -> (String, String),
) -> std::result::Result<(), Refusal> {
    let block = lba_size as u64;
    if offset % block != 0 || len % block != 0 {
        return Err(Refusal::Misaligned {
            region: names().0,
            offset,
            len,
            block,
        });
    }
    if len == 0 || offset.checked_add(len).is_none_or(|end| end > capacity) {
        let (region, namespace) = names();
        return Err(Refusal::OutOfRange {
            region,
            len,
            namespace,
            capacity,
        });
    }
    Ok(())
}

/// Refuses a job of `n` destinations: 1 to [`MAX_DESTS`], or none when `none_ok` (a job
/// that only reads its source).
pub fn check_destination_count(n: usize, none_ok: bool) -> std::result::Result<(), Refusal> {
    if n == 0 && !none_ok {
        return Err(Refusal::NoDestination);
    }
    if n > MAX_DESTS {
        return Err(Refusal::TooManyDestinations {
            given: n,
            max: MAX_DESTS,
        });
    }
    Ok(())
}

/// A region of a job, as [`check_destination`] asks for its name: the source, or
/// destination `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The source.
    Source,
    /// The destination at this index.
    Destination(usize),
}

/// The cross-region checks of one job, for destination `i` (`d`) against the source and
/// the destinations before it (`earlier`): the job's length (the source's, or the first
/// destination's), no byte shared with the source, none with another destination.
/// Regions on namespaces that are one media through two controllers overlap too
/// ([`Region::overlaps_in`]). `name` names a region for the refusal.
pub fn check_destination(
    from: Option<&Region>,
    earlier: &[Region],
    d: &Region,
    devices: &[Arc<dyn Device>],
    name: &dyn Fn(Role) -> String,
) -> std::result::Result<(), Refusal> {
    let i = earlier.len();
    let reference = match (from, earlier.first()) {
        (Some(f), _) => Some((f, format!("the source {}", name(Role::Source)))),
        (None, Some(first)) => Some((
            first,
            format!("destination 0 ({})", name(Role::Destination(0))),
        )),
        (None, None) => None,
    };
    if let Some((r, job)) = reference {
        if d.len != r.len {
            return Err(Refusal::LengthMismatch {
                dest: i,
                region: name(Role::Destination(i)),
                dest_len: d.len,
                job,
                job_len: r.len,
            });
        }
    }
    if let Some(f) = from {
        if d.overlaps_in(f, devices) {
            return Err(Refusal::OverlapsSource {
                dest: i,
                region: name(Role::Destination(i)),
                source: name(Role::Source),
            });
        }
    }
    if let Some(j) = earlier.iter().position(|o| o.overlaps_in(d, devices)) {
        return Err(Refusal::DestinationsOverlap {
            a: j,
            a_region: name(Role::Destination(j)),
            b: i,
            b_region: name(Role::Destination(i)),
        });
    }
    Ok(())
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
            (r.place.to_string().as_str(), r.nsid, r.offset, r.len),
            ("0000:00:11.0", 2, 1 << 20, Some(512 << 10))
        );
        assert_eq!(parse_size("3G").unwrap(), 3 << 30);
        let kind = |bad: &str| match bad.parse::<RegionSpec>() {
            Err(Error::Refused(r)) => r,
            other => panic!("{bad}: {other:?}"),
        };
        for bad in ["00:10.0/0", "00:10.0/x"] {
            assert!(
                matches!(kind(bad), Refusal::BadNamespaceId { ref region, .. } if region == bad),
                "{bad}"
            );
        }
        for bad in ["00:10.0@1Q", "00:10.0+99999999999T"] {
            assert!(matches!(kind(bad), Refusal::BadSize { .. }), "{bad}");
        }
        assert!(matches!(kind("00:10.0+0"), Refusal::ZeroLength { .. }));
        assert!(matches!(kind("00:1f.8"), Refusal::BadAddress { .. }));
        assert!(matches!(kind("0000:00:10.9"), Refusal::BadAddress { .. }));
        // Anything that is not a PCI address is a path, with the same suffixes.
        for (text, path, offset, len) in [
            ("/dev/nvme0n1", "/dev/nvme0n1", 0, None),
            ("img.raw", "img.raw", 0, None),
            ("./disk.raw@1M+4K", "./disk.raw", 1 << 20, Some(4096)),
            ("/srv/golden.img+2G", "/srv/golden.img", 0, Some(2 << 30)),
        ] {
            let r: RegionSpec = text.parse().unwrap();
            assert_eq!(r.path(), Some(std::path::Path::new(path)), "{text}");
            assert_eq!((r.offset, r.len, r.nsid), (offset, len, 1), "{text}");
            assert_eq!(r.pci(), None);
        }
    }

    #[test]
    fn parses_nvme_tcp_regions() {
        let r: RegionSpec = "nvme+tcp://127.0.0.1:4420/nqn.2026-01.io.nvcopy:t1/2@1M+64K"
            .parse()
            .unwrap();
        let t = r.tcp().unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.nqn.as_str()),
            ("127.0.0.1", 4420, "nqn.2026-01.io.nvcopy:t1")
        );
        assert_eq!((r.nsid, r.offset, r.len), (2, 1 << 20, Some(64 << 10)));
        assert_eq!(
            r.place.to_string(),
            "nvme+tcp://127.0.0.1:4420/nqn.2026-01.io.nvcopy:t1"
        );
        assert_eq!((r.pci(), r.path()), (None, None));
        let r: RegionSpec = "nvme+tcp://[::1]/nqn.x".parse().unwrap();
        let t = r.tcp().unwrap();
        assert_eq!((t.host.as_str(), t.port, r.nsid), ("::1", 4420, 1));
        assert_eq!(r.place.to_string(), "nvme+tcp://[::1]:4420/nqn.x");
        let kind = |bad: &str| match bad.parse::<RegionSpec>() {
            Err(Error::Refused(r)) => r,
            other => panic!("{bad}: {other:?}"),
        };
        for bad in [
            "nvme+tcp://host",
            "nvme+tcp://:4420/nqn",
            "nvme+tcp://h:0/nqn",
            "nvme+tcp://h:x/nqn",
            "nvme+tcp://h:1/",
        ] {
            assert!(matches!(kind(bad), Refusal::BadTcpAddress { .. }), "{bad}");
        }
        assert!(matches!(
            kind("nvme+tcp://h:1/nqn/0"),
            Refusal::BadNamespaceId { .. }
        ));
        assert!(matches!(
            kind("nvme+tcp://h:1/nqn+0"),
            Refusal::ZeroLength { .. }
        ));
    }

    #[test]
    fn parses_tcp_controllers_for_identify() {
        let (t, nsid) = parse_tcp_controller("nvme+tcp://127.0.0.1:4420/nqn.a:b").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.nqn.as_str(), nsid),
            ("127.0.0.1", 4420, "nqn.a:b", None)
        );
        let (t, nsid) = parse_tcp_controller("nvme+tcp://h/nqn.a/2").unwrap();
        assert_eq!((t.port, nsid), (TCP_DEFAULT_PORT, Some(2)));
        for bad in ["0000:00:10.0", "nvme+tcp://h", "tcp://h/nqn"] {
            let e = parse_tcp_controller(bad).unwrap_err();
            assert!(
                matches!(e, Error::Refused(Refusal::BadTcpAddress { .. })),
                "{bad}: {e}"
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
        assert!(
            matches!(
                e,
                Error::Refused(Refusal::Misaligned {
                    offset: 512,
                    len: 4096,
                    block: 4096,
                    ..
                })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("multiples"), "{e}");
        let e =
            Region::check(&"00:10.0@8192+12288".parse().unwrap(), 0, 4096, 4, None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Refused(Refusal::OutOfRange {
                    len: 12288,
                    capacity: 16384,
                    ..
                })
            ),
            "{e}"
        );
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
        assert!(
            matches!(e, Error::Refused(Refusal::NamespaceTooLarge { ref namespace, .. }) if namespace == "0000:00:10.0/1"),
            "{e}"
        );
        // The largest block count whose bytes fit is still usable.
        let r = Region::check(&spec, 0, 4096, u64::MAX / 4096, None).unwrap();
        assert_eq!(r.len, u64::MAX / 4096 * 4096);
    }
}
