//! The copier crate's error type: the drivers' errors, plus what the copier and CLI
//! themselves refuse ([`Refusal`]), each refusal a variant a caller can match.

use std::fmt;

/// Errors from nvcopy's library and command-line tool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// VFIO, sysfs or DMA memory.
    #[error(transparent)]
    Platform(#[from] nvcopy_vfio::Error),
    /// An NVMe controller or command.
    #[error(transparent)]
    Nvme(#[from] nvcopy_nvme::Error),
    /// A file or kernel block device, or io_uring.
    #[error(transparent)]
    File(#[from] nvcopy_uring::Error),
    /// An NVMe/TCP controller.
    #[error(transparent)]
    Tcp(#[from] nvcopy_tcp::Error),
    /// Bad input from the user or the calling code, found before any I/O.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The copy ran but some chunks failed; the summary says which destinations.
    #[error("the copy did not complete: see the summary above")]
    CopyFailed,
    /// The progress map.
    #[error(transparent)]
    Map(#[from] crate::mapfile::MapError),
    /// SIGINT or SIGTERM stopped the job; the summary says how far it got.
    #[error("interrupted by signal {signal}: see the summary above")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// A reactor could not install its seccomp filter.
    #[error("reactor {reactor} could not install its seccomp filter: {reason}; run with --no-seccomp to copy without it")]
    Seccomp {
        /// The reactor.
        reactor: usize,
        /// What seccompiler or the kernel said.
        reason: String,
    },
    /// A thread nvcopy needs could not be started.
    #[error("starting {what}: {source}; the system may be out of threads or memory: stop other work or lower --cores")]
    Spawn {
        /// The thread, e.g. "reactor 3".
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A helper thread panicked (a bug in nvcopy: please report it).
    #[error("{what} panicked; this is a bug in nvcopy")]
    Panicked {
        /// What the thread was doing, with its device where there is one.
        what: String,
    },
    /// Writing output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// Requests nvcopy refuses before any I/O. Regions are named as the caller gave them:
/// the command line's own text, or for regions built in code
/// `CONTROLLER/NSID@OFFSET+LENGTH`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Refusal {
    /// A region of a zoned namespace that does not start, or end, at a zone boundary.
    ZoneMisaligned {
        /// The region.
        region: String,
        /// Zone size in bytes.
        zone_bytes: u64,
    },
    /// A zone the job would write cannot take a linear copy.
    ZoneUnusable {
        /// The region.
        region: String,
        /// The zone's first block.
        zone: u64,
        /// Why.
        why: String,
    },
    /// The zones of a zoned destination could not be reset.
    ZoneReset {
        /// The region.
        region: String,
        /// Why.
        reason: String,
    },
    /// A job that a zoned destination cannot take.
    ZonedJob {
        /// The region.
        region: String,
        /// What the job wanted and what to do instead.
        why: &'static str,
    },
    /// A file whose length is not whole blocks of its direct-I/O alignment, used whole.
    PartialBlock {
        /// The path.
        path: String,
        /// Its length.
        len: u64,
        /// The alignment.
        block: u32,
    },
    /// A size that is not a number with an optional K, M, G or T suffix.
    BadSize {
        /// As written.
        text: String,
    },
    /// A region's namespace id is not a number of 1 or more.
    BadNamespaceId {
        /// The namespace id as written.
        text: String,
        /// The region as written.
        region: String,
    },
    /// A region's PCI address does not parse.
    BadAddress {
        /// The region as written.
        region: String,
        /// Why.
        source: nvcopy_vfio::Error,
    },
    /// An `nvme+tcp://` region that does not parse.
    BadTcpAddress {
        /// The region as written.
        region: String,
        /// What is wrong.
        why: String,
    },
    /// A region written with `+0`.
    ZeroLength {
        /// The region as written.
        region: String,
    },
    /// A namespace's size in bytes does not fit in 64 bits.
    NamespaceTooLarge {
        /// `CONTROLLER/NSID`.
        namespace: String,
        /// Its block count.
        blocks: u64,
        /// Its block size.
        lba_size: u32,
    },
    /// A region's offset or length is not whole blocks of its namespace.
    Misaligned {
        /// The region.
        region: String,
        /// Its byte offset.
        offset: u64,
        /// Its byte length.
        len: u64,
        /// The namespace's block size.
        block: u64,
    },
    /// A region is empty or runs past the end of its namespace.
    OutOfRange {
        /// The region.
        region: String,
        /// Its byte length.
        len: u64,
        /// `CONTROLLER/NSID`.
        namespace: String,
        /// The namespace's size in bytes.
        capacity: u64,
    },
    /// A region built in code says another block size than its namespace has.
    BlockSizeMismatch {
        /// The region.
        region: String,
        /// The block size the region says.
        region_lba: u32,
        /// The namespace's.
        ns_lba: u32,
    },
    /// A region names a controller the engine was not opened with.
    NotInEngine {
        /// The controller: its PCI address, or `#INDEX` for a region built in code.
        ctrl: String,
    },
    /// An engine was asked for with no controllers.
    NoControllers,
    /// A job with no destination.
    NoDestination,
    /// A job with more destinations than its 64-bit mask holds.
    TooManyDestinations {
        /// How many were given.
        given: usize,
        /// The limit ([`crate::region::MAX_DESTS`]).
        max: usize,
    },
    /// A destination whose length is not the job's.
    LengthMismatch {
        /// Its index in the job's destinations.
        dest: usize,
        /// The destination.
        region: String,
        /// Its length.
        dest_len: u64,
        /// The region the job's length comes from: "the source X" or "destination 0 (X)".
        job: String,
        /// The job's length.
        job_len: u64,
    },
    /// A destination that shares bytes with the source.
    OverlapsSource {
        /// Its index in the job's destinations.
        dest: usize,
        /// The destination.
        region: String,
        /// The source.
        source: String,
    },
    /// Two destinations that share bytes.
    DestinationsOverlap {
        /// The earlier one's index.
        a: usize,
        /// It.
        a_region: String,
        /// The later one's index.
        b: usize,
        /// It.
        b_region: String,
    },
    /// Chunk hashes to verify against that do not cover the job.
    HashesDoNotCover {
        /// Chunks the hashes cover.
        cells: u64,
        /// Their chunk size.
        chunk: usize,
        /// The job's length.
        len: u64,
    },
    /// A client with fewer pages than one chunk needs.
    TooFewPages {
        /// Pages the client reserved.
        reserved: usize,
        /// Pages one chunk needs.
        needed: usize,
        /// True when verifying (reading back), not copying.
        verifying: bool,
    },
    /// `--num-pages` above what a client may reserve.
    TooManyPages {
        /// As given.
        given: usize,
        /// The limit (`MAX_NUM_PAGES` of the CLI).
        max: usize,
    },
    /// A DMA pool whose size overflows the address space.
    PoolTooLarge {
        /// Client pages.
        num_pages: usize,
        /// Reactors.
        reactors: usize,
        /// Queue depth per reactor.
        qd: usize,
        /// Controllers.
        controllers: usize,
    },
    /// A digest name nvcopy does not know.
    UnknownDigest {
        /// As written.
        text: String,
    },
    /// Options that do not go together.
    BadOptions(OptionConflict),
}

/// Command-line options that do not go together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OptionConflict {
    /// `--verify`, `--verify-only` or `--hash` without a source (`nvcopy zero`).
    CheckNeedsSource,
    /// `--verify-only` with `--map` or `--verify`.
    VerifyOnlyCopiesNothing,
    /// `--hash` when the map says part of the source was copied already.
    HashNeedsWholeSource,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Refusal::*;
        match self {
            ZoneMisaligned { region, zone_bytes } => write!(
                f,
                "{region} is on a zoned namespace with zones of {zone_bytes} bytes: a copy must start at a zone boundary and end at one (or at the end of the namespace), since its zones are reset before they are written; give @OFFSET and +LENGTH in whole zones"
            ),
            ZoneUnusable { region, zone, why } => write!(
                f,
                "{region}: cannot copy onto the zone at block {zone}: {why}"
            ),
            ZoneReset { region, reason } => write!(f, "{region}: {reason}"),
            ZonedJob { region, why } => write!(f, "{region} is on a zoned namespace: {why}"),
            PartialBlock { path, len, block } => write!(
                f,
                "{path} is {len} bytes, not a whole number of its {block}-byte I/O blocks: name a region of whole blocks ({path}+{}), or add --buffered",
                len / *block as u64 * *block as u64
            ),
            BadSize { text } => write!(
                f,
                "invalid size {text:?}: use a number with an optional K, M, G or T suffix"
            ),
            BadNamespaceId { text, region } => write!(
                f,
                "invalid namespace id {text:?} in {region:?}: use 1 or more"
            ),
            BadAddress { region, source } => write!(f, "in region {region:?}: {source}"),
            BadTcpAddress { region, why } => write!(
                f,
                "in region {region:?}: {why}; write nvme+tcp://HOST:PORT/SUBSYSTEM-NQN[/NSID][@OFFSET][+LENGTH]"
            ),
            ZeroLength { region } => write!(f, "region {region:?} has zero length"),
            NamespaceTooLarge {
                namespace,
                blocks,
                lba_size,
            } => write!(
                f,
                "{namespace}: {blocks} blocks of {lba_size} bytes is more than 2^64 bytes; the device's Identify data is not believable"
            ),
            Misaligned {
                region,
                offset,
                len,
                block,
            } => write!(
                f,
                "region {region}: offset {offset} and length {len} must be multiples of the namespace's {block}-byte block size"
            ),
            OutOfRange {
                region,
                len,
                namespace,
                capacity,
            } => write!(
                f,
                "region {region} (length {len}) does not fit in {namespace}, which holds {capacity} bytes"
            ),
            BlockSizeMismatch {
                region,
                region_lba,
                ns_lba,
            } => write!(
                f,
                "region {region} says {region_lba}-byte blocks, but its namespace has {ns_lba}-byte blocks: build regions with Engine::region"
            ),
            NotInEngine { ctrl } => write!(
                f,
                "{ctrl} is not one of the engine's controllers: open the engine with it"
            ),
            NoControllers => write!(f, "an engine needs at least one controller"),
            NoDestination => write!(
                f,
                "a job needs at least one destination: give one with --to"
            ),
            TooManyDestinations { given, max } => write!(
                f,
                "{given} destinations given; a job takes at most {max}: split the job"
            ),
            LengthMismatch {
                dest,
                region,
                dest_len,
                job,
                job_len,
            } => write!(
                f,
                "destination {dest} ({region}) is {dest_len} bytes but {job} is {job_len}: give every region the same length"
            ),
            OverlapsSource {
                dest,
                region,
                source,
            } => write!(
                f,
                "destination {dest} ({region}) overlaps the source {source}: nvcopy never writes over the data it reads"
            ),
            DestinationsOverlap {
                a,
                a_region,
                b,
                b_region,
            } => write!(
                f,
                "destinations {a} ({a_region}) and {b} ({b_region}) overlap: give each destination its own bytes"
            ),
            HashesDoNotCover { cells, chunk, len } => write!(
                f,
                "the hashes cover {cells} chunks of {chunk} bytes, not the {len} bytes to verify"
            ),
            TooFewPages {
                reserved,
                needed,
                verifying,
            } => write!(
                f,
                "the client reserved {reserved} pages but {}one chunk needs {needed}; reserve more (--num-pages)",
                if *verifying { "verifying " } else { "" }
            ),
            TooManyPages { given, max } => write!(
                f,
                "--num-pages {given} is too many: a client reserves at most {max} 4 KiB pages (16 TiB), and they must fit in memory; give fewer, or leave --num-pages out for enough for every chunk in flight"
            ),
            PoolTooLarge {
                num_pages,
                reactors,
                qd,
                controllers,
            } => write!(
                f,
                "a DMA pool for {num_pages} pages, {reactors} reactor(s) of queue depth {qd} and {controllers} controller(s) does not fit in memory: lower --num-pages, --cores or --qd"
            ),
            UnknownDigest { text } => {
                write!(f, "unknown digest {text:?}: use sha256 or blake3")
            }
            BadOptions(c) => c.fmt(f),
        }
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Refusal::BadAddress { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl fmt::Display for OptionConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OptionConflict::CheckNeedsSource => {
                "--verify, --verify-only and --hash need a source: use them with `nvcopy copy`"
            }
            OptionConflict::VerifyOnlyCopiesNothing => {
                "--verify-only copies nothing: leave out --map and --verify"
            }
            OptionConflict::HashNeedsWholeSource => {
                "--hash needs the whole source read in one run, but the map says part of it was copied already: run without --hash, or with a new --map file"
            }
        })
    }
}

/// The copier crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
