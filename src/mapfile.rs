//! Progress maps in GNU ddrescue's mapfile format, so that an interrupted copy can
//! resume where it stopped and so that ddrescue's own tools (`ddrescuelog -t`, `-l`,
//! `-D`) can inspect a copy's progress.
//!
//! The format is the one documented in the GNU ddrescue manual, chapter "Mapfile
//! structure": a text file of heading comments, one status line
//! `current_pos current_status [current_pass]`, then block lines `pos size status`
//! listing contiguous, ascending, non-overlapping byte ranges. `#` starts a comment
//! that runs to the end of the line. Numbers may be written as C++ integer constants:
//! decimal, hexadecimal with `0x`, or octal with a leading `0`; `current_pass` is
//! decimal and may be absent (ddrescue before 1.20 did not write it).
//!
//! nvcopy adds its own heading comments (see [`MapHeader`]) that name the copy the
//! map belongs to. ddrescue ignores them like any other comment; nvcopy reads them to
//! refuse resuming a copy from another copy's map ([`Map::check_identity`]).
//!
//! All positions in a map are byte offsets relative to the start of the copy's
//! source region (ddrescue's "position in the input file"), not absolute namespace
//! offsets: the same map then applies to every destination, whatever its offset.
//!
//! Where ddrescue's `scanf`-based reader is looser than its manual (signs before
//! numbers, text after the last field), this parser follows the manual and refuses
//! such lines: in a file nvcopy wrote they mean damage, and resuming from a damaged
//! map would skip data.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::num::NonZeroU64;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Version of nvcopy's heading comments, written as `# nvcopy-map v1`.
pub const FORMAT_VERSION: u32 = 1;

/// Largest position or block end ddrescue can represent: it reads numbers into a
/// `long long`, so anything beyond this makes ddrescue reject the whole file.
pub const MAX_OFFSET: u64 = i64::MAX as u64;

/// The comment word that marks nvcopy's header.
const MARKER: &str = "nvcopy-map";

/// The status of a block of data (ddrescue manual, "Mapfile structure", second table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockStatus {
    /// `?`: not read yet.
    NonTried,
    /// `*`: a read failed and the block has not been trimmed.
    NonTrimmed,
    /// `/`: a read failed and the block has not been scraped.
    NonScraped,
    /// `-`: the block holds bad sector(s); nvcopy marks failed chunks this way.
    BadSector,
    /// `+`: copied to every destination.
    Finished,
}

impl BlockStatus {
    /// Every status, in ddrescue's order of the manual's table.
    pub const ALL: [BlockStatus; 5] = [
        BlockStatus::NonTried,
        BlockStatus::NonTrimmed,
        BlockStatus::NonScraped,
        BlockStatus::BadSector,
        BlockStatus::Finished,
    ];

    /// The mapfile character for this status.
    pub const fn as_char(self) -> char {
        match self {
            BlockStatus::NonTried => '?',
            BlockStatus::NonTrimmed => '*',
            BlockStatus::NonScraped => '/',
            BlockStatus::BadSector => '-',
            BlockStatus::Finished => '+',
        }
    }

    /// The status a mapfile character stands for, if it is one.
    pub const fn from_char(c: char) -> Option<Self> {
        Some(match c {
            '?' => BlockStatus::NonTried,
            '*' => BlockStatus::NonTrimmed,
            '/' => BlockStatus::NonScraped,
            '-' => BlockStatus::BadSector,
            '+' => BlockStatus::Finished,
            _ => return None,
        })
    }

    /// Whether bytes with this status still have to be copied. Bad sectors are
    /// retried only when asked: by default a resumed copy does not hammer the same
    /// failing LBAs again.
    pub const fn needs_copy(self, retry_failed: bool) -> bool {
        match self {
            BlockStatus::Finished => false,
            BlockStatus::BadSector => retry_failed,
            BlockStatus::NonTried | BlockStatus::NonTrimmed | BlockStatus::NonScraped => true,
        }
    }
}

impl fmt::Display for BlockStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// The phase a rescue was in when the map was saved: the status line's
/// `current_status` (ddrescue manual, "Mapfile structure", first table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `?`: copying non-tried blocks.
    Copying,
    /// `*`: trimming non-trimmed blocks.
    Trimming,
    /// `/`: scraping non-scraped blocks.
    Scraping,
    /// `-`: retrying bad sectors.
    Retrying,
    /// `F`: filling the blocks specified.
    Filling,
    /// `G`: generating an approximate mapfile.
    Generating,
    /// `+`: finished.
    Finished,
}

impl Phase {
    /// Every phase, in the order of the manual's table.
    pub const ALL: [Phase; 7] = [
        Phase::Copying,
        Phase::Trimming,
        Phase::Scraping,
        Phase::Retrying,
        Phase::Filling,
        Phase::Generating,
        Phase::Finished,
    ];

    /// The mapfile character for this phase.
    pub const fn as_char(self) -> char {
        match self {
            Phase::Copying => '?',
            Phase::Trimming => '*',
            Phase::Scraping => '/',
            Phase::Retrying => '-',
            Phase::Filling => 'F',
            Phase::Generating => 'G',
            Phase::Finished => '+',
        }
    }

    /// The phase a status-line character stands for, if it is one.
    pub const fn from_char(c: char) -> Option<Self> {
        Some(match c {
            '?' => Phase::Copying,
            '*' => Phase::Trimming,
            '/' => Phase::Scraping,
            '-' => Phase::Retrying,
            'F' => Phase::Filling,
            'G' => Phase::Generating,
            '+' => Phase::Finished,
            _ => return None,
        })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// One block line: `size` bytes from `pos` (relative to the source region's start),
/// all with the same status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// First byte.
    pub pos: u64,
    /// Length in bytes, never 0 (ddrescue rejects empty blocks).
    pub size: u64,
    /// Status of every byte in the block.
    pub status: BlockStatus,
}

impl Block {
    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.pos + self.size
    }
}

/// Which copy a map belongs to, written as `#` comment lines that ddrescue ignores.
///
/// Region strings are kept as the user's `--from`/`--to` text (in canonical form,
/// as the caller chooses) so that a mismatch can be reported in the user's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapHeader {
    source: String,
    destinations: Vec<String>,
    length: u64,
    chunk: u64,
}

impl MapHeader {
    /// Checks that every field can be written on one comment line and read back
    /// unchanged: region strings must be non-empty, without control characters and
    /// without leading or trailing white space; the length must fit ddrescue's
    /// positions and the chunk must not be 0.
    pub fn new(
        source: impl Into<String>,
        destinations: Vec<String>,
        length: u64,
        chunk: u64,
    ) -> Result<Self, MapError> {
        let source = source.into();
        check_region_text("source", &source)?;
        for d in &destinations {
            check_region_text("destination", d)?;
        }
        if length > MAX_OFFSET {
            return Err(MapError::InvalidHeader {
                field: "length",
                reason: format!("{length} is larger than ddrescue's limit {MAX_OFFSET}"),
            });
        }
        if chunk == 0 {
            return Err(MapError::InvalidHeader {
                field: "chunk",
                reason: "the chunk size must not be 0".into(),
            });
        }
        Ok(Self {
            source,
            destinations,
            length,
            chunk,
        })
    }

    /// The source region.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The destination regions, in the order the copy writes them.
    pub fn destinations(&self) -> &[String] {
        &self.destinations
    }

    /// The copy's length in bytes: the map must cover exactly `[0, length)`.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The chunk size the map was written with. Informational only: cells are
    /// recomputed from byte ranges, so a resume may use another chunk size.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }
}

fn check_region_text(field: &'static str, text: &str) -> Result<(), MapError> {
    let reason = if text.is_empty() {
        "it is empty"
    } else if text.chars().any(char::is_control) {
        "it contains a control character"
    } else if text.trim() != text {
        "it starts or ends with white space"
    } else {
        return Ok(());
    };
    Err(MapError::InvalidHeader {
        field,
        reason: format!("{text:?} cannot be written in a map file: {reason}"),
    })
}

/// What is wrong with one line of a map file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseProblem {
    /// A field is not an integer constant.
    #[error("{field} {text:?} is not a number (write decimal, 0x hexadecimal or 0 octal)")]
    BadNumber {
        /// Which field.
        field: &'static str,
        /// What the line holds there.
        text: String,
    },
    /// A number is beyond what ddrescue can read.
    #[error("{field} {text} is larger than ddrescue's limit {MAX_OFFSET:#X}")]
    NumberTooLarge {
        /// Which field.
        field: &'static str,
        /// What the line holds there.
        text: String,
    },
    /// A block line's status is not one of `? * / - +`.
    #[error("unknown block status {text:?}: expected one of ? * / - +")]
    UnknownStatus {
        /// What the line holds there.
        text: String,
    },
    /// The status line's status is not one of `? * / - F G +`.
    #[error("unknown current_status {text:?}: expected one of ? * / - F G +")]
    UnknownPhase {
        /// What the line holds there.
        text: String,
    },
    /// `current_pass` is not a positive decimal integer.
    #[error("current_pass {text:?} is not a positive decimal integer")]
    BadPass {
        /// What the line holds there.
        text: String,
    },
    /// The line ends before a required field.
    #[error("missing {field}")]
    MissingField {
        /// Which field.
        field: &'static str,
    },
    /// The line has text after its last field.
    #[error("unexpected {text:?} after the last field")]
    ExtraField {
        /// The first extra word.
        text: String,
    },
    /// A block of 0 bytes, which ddrescue rejects.
    #[error("block of size 0")]
    ZeroSize,
    /// A block starts after the previous one ended.
    #[error("gap: the block starts at {found:#X} but the previous one ends at {expected:#X}; blocks must be contiguous")]
    Gap {
        /// Where the previous block ended.
        expected: u64,
        /// Where this block starts.
        found: u64,
    },
    /// A block starts inside the previous one.
    #[error("overlap: the block starts at {found:#X}, inside the previous one, which ends at {expected:#X}")]
    Overlap {
        /// Where the previous block ended.
        expected: u64,
        /// Where this block starts.
        found: u64,
    },
    /// A block starts before the previous one.
    #[error("the block at {found:#X} comes after the block at {previous:#X}; blocks must be in ascending order")]
    NotAscending {
        /// Where the previous block started.
        previous: u64,
        /// Where this block starts.
        found: u64,
    },
    /// `pos + size` is beyond what ddrescue can read.
    #[error("the block {pos:#X} + {size:#X} ends past ddrescue's limit {MAX_OFFSET:#X}")]
    EndTooLarge {
        /// The block's start.
        pos: u64,
        /// The block's size.
        size: u64,
    },
    /// nvcopy's header comments are incomplete or malformed.
    #[error("nvcopy header: {reason}")]
    Header {
        /// What is wrong.
        reason: String,
    },
    /// The header is of a format this nvcopy does not know.
    #[error("nvcopy header version {found:?} is not v{FORMAT_VERSION}: the map was written by another nvcopy version; use that version or another --map file")]
    UnsupportedVersion {
        /// The version word found.
        found: String,
    },
}

/// Errors reading, writing or checking a map.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// One line of a map is malformed.
    #[error("{}line {line}: {problem}", at(.path))]
    Parse {
        /// The file, if the map came from one.
        path: Option<PathBuf>,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: ParseProblem,
    },
    /// The text has no status line at all.
    #[error("{}no status line: the file is empty or holds only comments, so it is not a ddrescue mapfile", at(.path))]
    NoStatusLine {
        /// The file, if the map came from one.
        path: Option<PathBuf>,
    },
    /// A header field cannot be written.
    #[error("map header {field}: {reason}")]
    InvalidHeader {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The map has no nvcopy header, so it cannot be matched to this copy.
    #[error("the map was not written by nvcopy (it has no '# {MARKER} v{FORMAT_VERSION}' header), so nvcopy cannot tell which copy it belongs to: give another --map file")]
    NotNvcopy,
    /// The map is for another source.
    #[error("the map is for source {map}, this copy reads {this}: give the same --from, or another --map file")]
    SourceMismatch {
        /// The map's source.
        map: String,
        /// This copy's source.
        this: String,
    },
    /// The map is for another destination list.
    #[error("{}", destination_message(*.index, .map, .this, *.map_count, *.this_count))]
    DestinationMismatch {
        /// The first position at which the lists differ.
        index: usize,
        /// The map's destination there, if it has one.
        map: Option<String>,
        /// This copy's destination there, if it has one.
        this: Option<String>,
        /// How many destinations the map lists.
        map_count: usize,
        /// How many destinations this copy writes.
        this_count: usize,
    },
    /// The map is for a copy of another length.
    #[error("the map is for a copy of {map} bytes, this copy is {this} bytes: give the same length, or another --map file")]
    LengthMismatch {
        /// The map's length.
        map: u64,
        /// This copy's length.
        this: u64,
    },
    /// The blocks do not cover exactly `[0, len)`.
    #[error("the map's blocks cover bytes [{start:#X}, {end:#X}) but this copy is [0, {len:#X}): the map is damaged or edited; give another --map file")]
    Coverage {
        /// First byte the blocks cover.
        start: u64,
        /// One past the last byte they cover.
        end: u64,
        /// This copy's length.
        len: u64,
    },
    /// A paint outside the bytes the map covers.
    #[error("cannot mark {size:#X} bytes at {pos:#X}: the map covers [{start:#X}, {end:#X})")]
    OutOfRange {
        /// Start of the range.
        pos: u64,
        /// Length of the range.
        size: u64,
        /// First byte the map covers.
        start: u64,
        /// One past the last byte it covers.
        end: u64,
    },
    /// A cell index past the end of the map.
    #[error("cell {index} is past the end of the map ({cells} cells of {chunk} bytes)")]
    CellOutOfRange {
        /// The cell index.
        index: u64,
        /// How many cells the map has at this chunk size.
        cells: u64,
        /// The chunk size.
        chunk: u64,
    },
    /// One flag per cell would not fit in memory.
    #[error(
        "{cells} cells of {chunk} bytes are too many to hold in memory: use a larger chunk size"
    )]
    TooManyCells {
        /// How many cells the map has at this chunk size.
        cells: u64,
        /// The chunk size.
        chunk: u64,
    },
    /// Reading or writing a map file failed.
    #[error("{action} {}: {source}{hint}", .path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
        /// How to fix it, with a leading separator, or empty.
        hint: &'static str,
    },
}

impl MapError {
    /// Whether this is a load of a map file that does not exist, which a caller may
    /// take as "start a new copy".
    pub fn is_not_found(&self) -> bool {
        matches!(self, MapError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    fn with_path(self, p: &Path) -> Self {
        match self {
            MapError::Parse {
                line,
                problem,
                path: None,
            } => MapError::Parse {
                path: Some(p.to_path_buf()),
                line,
                problem,
            },
            MapError::NoStatusLine { path: None } => MapError::NoStatusLine {
                path: Some(p.to_path_buf()),
            },
            other => other,
        }
    }
}

fn at(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!("{}: ", p.display()),
        None => String::new(),
    }
}

fn destination_message(
    index: usize,
    map: &Option<String>,
    this: &Option<String>,
    map_count: usize,
    this_count: usize,
) -> String {
    let fix = "give the same --to list in the same order, or another --map file";
    match (map, this) {
        (Some(m), Some(t)) => {
            format!("the map is for destination {index} {m}, this copy writes {t} there: {fix}")
        }
        (None, Some(t)) => format!(
            "the map lists {map_count} destination(s), this copy writes {this_count} (destination {index} {t} is not in the map): {fix}"
        ),
        (Some(m), None) => format!(
            "the map lists {map_count} destination(s), this copy writes {this_count} (the map's destination {index} {m} is missing): {fix}"
        ),
        (None, None) => format!("the destination lists differ at {index}: {fix}"),
    }
}

fn io_hint(kind: io::ErrorKind, writing: bool) -> &'static str {
    match (kind, writing) {
        (io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem, true) => {
            " (nvcopy writes a temporary file beside the map and renames it, so the directory must be writable: fix its permissions or give --map a path in a writable directory)"
        }
        (io::ErrorKind::PermissionDenied, false) => {
            " (make the map file readable by this user, or give another --map file)"
        }
        (io::ErrorKind::NotFound, true) => {
            " (the directory does not exist: create it, or give --map a path in an existing directory)"
        }
        (io::ErrorKind::StorageFull, _) => {
            " (the file system is full: free some space, or give --map a path on another file system)"
        }
        _ => "",
    }
}

/// A block as stored: its end and status, keyed by its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    end: u64,
    status: BlockStatus,
}

/// A progress map: nvcopy's header (if the file had one), the status line, and the
/// blocks.
///
/// Invariants, kept by every method: blocks are non-empty, contiguous and
/// ascending, and no two adjacent blocks share a status (so the map is as short as
/// it can be, and two maps of the same bytes compare equal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Map {
    /// Which copy the map belongs to; `None` for a map not written by nvcopy.
    pub header: Option<MapHeader>,
    /// The status line's `current_pos`: where the copy was working.
    pub current_pos: u64,
    /// The status line's `current_status`.
    pub current_status: Phase,
    /// The status line's `current_pass` (1 when the file did not give one).
    pub current_pass: u32,
    /// Blocks keyed by start, so that painting anywhere is O(log n).
    blocks: BTreeMap<u64, Span>,
}

impl Map {
    /// A map for a new copy: the whole length non-tried.
    pub fn new(header: MapHeader) -> Self {
        let mut blocks = BTreeMap::new();
        if header.length > 0 {
            blocks.insert(
                0,
                Span {
                    end: header.length,
                    status: BlockStatus::NonTried,
                },
            );
        }
        Self {
            header: Some(header),
            current_pos: 0,
            current_status: Phase::Copying,
            current_pass: 1,
            blocks,
        }
    }

    /// The bytes the blocks cover, `[start, end)`; `(0, 0)` for a map without blocks.
    pub fn extent(&self) -> (u64, u64) {
        match (self.blocks.first_key_value(), self.blocks.last_key_value()) {
            (Some((&start, _)), Some((_, last))) => (start, last.end),
            _ => (0, 0),
        }
    }

    /// The blocks in ascending order.
    pub fn blocks(&self) -> impl DoubleEndedIterator<Item = Block> + ExactSizeIterator + '_ {
        self.blocks.iter().map(|(&pos, s)| Block {
            pos,
            size: s.end - pos,
            status: s.status,
        })
    }

    /// How many blocks (block lines) the map has.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The status of the byte at `pos`, if the map covers it.
    pub fn status_at(&self, pos: u64) -> Option<BlockStatus> {
        match self.blocks.range(..=pos).next_back() {
            Some((_, s)) if pos < s.end => Some(s.status),
            _ => None,
        }
    }

    /// Sets the status of `size` bytes from `pos`, splitting the blocks at the ends
    /// of the range and merging with neighbours of the same status. O(log n) plus
    /// O(log n) for each block the range swallows, so painting a copy's chunks in
    /// ascending order costs O(log n) each. The range must lie within
    /// [`extent`](Self::extent); painting 0 bytes does nothing.
    pub fn paint(&mut self, pos: u64, size: u64, status: BlockStatus) -> Result<(), MapError> {
        if size == 0 {
            return Ok(());
        }
        let (start, end_all) = self.extent();
        let out_of_range = MapError::OutOfRange {
            pos,
            size,
            start,
            end: end_all,
        };
        let Some(end) = pos.checked_add(size) else {
            return Err(out_of_range);
        };
        if pos < start || end > end_all {
            return Err(out_of_range);
        }
        let Some((&first, &first_span)) = self.blocks.range(..=pos).next_back() else {
            return Err(out_of_range);
        };
        if first_span.status == status && first_span.end >= end {
            return Ok(());
        }

        // Remove every block that overlaps [pos, end), remembering the pieces of the
        // first and last that stick out on either side.
        let mut left: Option<(u64, BlockStatus)> = None; // [k, pos)
        let mut right: Option<(u64, BlockStatus)> = None; // [end, e)
        let mut cursor = first;
        while cursor < end {
            let Some((&k, &span)) = self.blocks.range(cursor..end).next() else {
                break;
            };
            self.blocks.remove(&k);
            if k < pos {
                left = Some((k, span.status));
            }
            if span.end > end {
                right = Some((span.end, span.status));
            }
            cursor = span.end;
        }

        let mut new_start = pos;
        match left {
            Some((k, s)) if s == status => new_start = k,
            Some((k, s)) => {
                self.blocks.insert(
                    k,
                    Span {
                        end: pos,
                        status: s,
                    },
                );
            }
            None => {
                if let Some((&k, &prev)) = self.blocks.range(..pos).next_back() {
                    if prev.end == pos && prev.status == status {
                        self.blocks.remove(&k);
                        new_start = k;
                    }
                }
            }
        }
        let mut new_end = end;
        match right {
            Some((e, s)) if s == status => new_end = e,
            Some((e, s)) => {
                self.blocks.insert(end, Span { end: e, status: s });
            }
            None => {
                if let Some(&next) = self.blocks.get(&end) {
                    if next.status == status {
                        self.blocks.remove(&end);
                        new_end = next.end;
                    }
                }
            }
        }
        self.blocks.insert(
            new_start,
            Span {
                end: new_end,
                status,
            },
        );
        Ok(())
    }

    /// How many cells of `chunk` bytes the map has: cell `i` covers
    /// `[i*chunk, min((i+1)*chunk, end))`, where `end` is the end of the extent.
    pub fn cell_count(&self, chunk: NonZeroU64) -> u64 {
        self.extent().1.div_ceil(chunk.get())
    }

    /// Sets cell statuses, as the copier reports chunks done or failed. Runs of
    /// consecutive cells with the same status are painted as one range, so a
    /// sorted batch costs one paint per run. Cells not listed keep their status.
    pub fn paint_cells(
        &mut self,
        chunk: NonZeroU64,
        cells: impl IntoIterator<Item = (u64, BlockStatus)>,
    ) -> Result<(), MapError> {
        let cell_count = self.cell_count(chunk);
        let mut run: Option<(u64, u64, BlockStatus)> = None; // [first, last] cells
        for (index, status) in cells {
            if index >= cell_count {
                return Err(MapError::CellOutOfRange {
                    index,
                    cells: cell_count,
                    chunk: chunk.get(),
                });
            }
            match &mut run {
                Some((_, last, s)) if *s == status && index == *last + 1 => *last = index,
                _ => {
                    if let Some(r) = run.take() {
                        self.paint_run(chunk, r)?;
                    }
                    run = Some((index, index, status));
                }
            }
        }
        if let Some(r) = run {
            self.paint_run(chunk, r)?;
        }
        Ok(())
    }

    fn paint_run(
        &mut self,
        chunk: NonZeroU64,
        (first, last, status): (u64, u64, BlockStatus),
    ) -> Result<(), MapError> {
        // Both cells are below cell_count, so these products do not exceed the
        // extent's end rounded up to a chunk; saturate anyway rather than trust it.
        let c = chunk.get();
        let pos = first.saturating_mul(c);
        let end = last
            .saturating_add(1)
            .saturating_mul(c)
            .min(self.extent().1);
        self.paint(pos, end.saturating_sub(pos), status)
    }

    /// Which cells of `chunk` bytes must be (re)copied, as ascending, merged ranges
    /// of cell indices: cells with any byte that is not finished, where bad-sector
    /// bytes count only if `retry_failed`. Bytes before the map's start (a map that
    /// does not begin at 0) count as to do. O(blocks) time and memory, whatever
    /// the number of cells.
    pub fn todo_ranges(&self, chunk: NonZeroU64, retry_failed: bool) -> Vec<Range<u64>> {
        let c = chunk.get();
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut add = |pos: u64, end: u64| {
            // end > pos >= 0 for every caller, so end - 1 does not wrap.
            let cells = pos / c..(end - 1) / c + 1;
            match out.last_mut() {
                Some(last) if cells.start <= last.end => last.end = last.end.max(cells.end),
                _ => out.push(cells),
            }
        };
        let (start, _) = self.extent();
        if start > 0 {
            add(0, start);
        }
        for b in self.blocks() {
            if b.status.needs_copy(retry_failed) {
                add(b.pos, b.end());
            }
        }
        out
    }

    /// [`todo_ranges`](Self::todo_ranges) as one flag per cell
    /// ([`cell_count`](Self::cell_count) of them). Fails rather than aborting when
    /// the flags do not fit in memory, which only a map far longer than any device
    /// would need: call it after [`check_identity`](Self::check_identity).
    pub fn todo_cells(&self, chunk: NonZeroU64, retry_failed: bool) -> Result<Vec<bool>, MapError> {
        let count = self.cell_count(chunk);
        let too_many = MapError::TooManyCells {
            cells: count,
            chunk: chunk.get(),
        };
        let Ok(cells) = usize::try_from(count) else {
            return Err(too_many);
        };
        let mut todo = Vec::new();
        if todo.try_reserve_exact(cells).is_err() {
            return Err(too_many);
        }
        todo.resize(cells, false);
        for r in self.todo_ranges(chunk, retry_failed) {
            // Ranges lie within [0, count), and count fits in usize.
            let a = usize::try_from(r.start).unwrap_or(cells);
            let b = usize::try_from(r.end).unwrap_or(cells).min(cells);
            if let Some(flags) = todo.get_mut(a..b) {
                flags.fill(true);
            }
        }
        Ok(todo)
    }

    /// How many bytes have `status`.
    pub fn bytes_with(&self, status: BlockStatus) -> u64 {
        self.blocks()
            .filter(|b| b.status == status)
            .map(|b| b.size)
            .sum()
    }

    /// How many bytes are finished (`+`).
    pub fn finished_bytes(&self) -> u64 {
        self.bytes_with(BlockStatus::Finished)
    }

    /// Refuses a map that belongs to another copy: another source, destination list
    /// or length, or blocks that do not cover exactly `[0, length)`. Another chunk
    /// size is fine, since cells are recomputed from byte ranges.
    pub fn check_identity(&self, expected: &MapHeader) -> Result<(), MapError> {
        let Some(h) = &self.header else {
            return Err(MapError::NotNvcopy);
        };
        if h.source != expected.source {
            return Err(MapError::SourceMismatch {
                map: h.source.clone(),
                this: expected.source.clone(),
            });
        }
        let n = h.destinations.len().max(expected.destinations.len());
        for index in 0..n {
            let (m, t) = (h.destinations.get(index), expected.destinations.get(index));
            if m != t {
                return Err(MapError::DestinationMismatch {
                    index,
                    map: m.cloned(),
                    this: t.cloned(),
                    map_count: h.destinations.len(),
                    this_count: expected.destinations.len(),
                });
            }
        }
        if h.length != expected.length {
            return Err(MapError::LengthMismatch {
                map: h.length,
                this: expected.length,
            });
        }
        let (start, end) = self.extent();
        if start != 0 || end != expected.length {
            return Err(MapError::Coverage {
                start,
                end,
                len: expected.length,
            });
        }
        Ok(())
    }

    /// Writes the map in ddrescue's format, with nvcopy's header comments first.
    pub fn write_to(&self, mut w: impl Write) -> io::Result<()> {
        writeln!(
            w,
            "# Mapfile. Written by nvcopy {} (GNU ddrescue's mapfile format; not written by ddrescue)",
            env!("CARGO_PKG_VERSION")
        )?;
        if let Some(h) = &self.header {
            writeln!(w, "# {MARKER} v{FORMAT_VERSION}")?;
            writeln!(w, "# source: {}", h.source)?;
            for (i, d) in h.destinations.iter().enumerate() {
                writeln!(w, "# destination {i}: {d}")?;
            }
            writeln!(w, "# length: {}", h.length)?;
            writeln!(w, "# chunk: {}", h.chunk)?;
        }
        writeln!(w, "# current_pos  current_status  current_pass")?;
        writeln!(
            w,
            "{:#010X}     {}               {}",
            self.current_pos, self.current_status, self.current_pass
        )?;
        writeln!(w, "#      pos        size  status")?;
        for b in self.blocks() {
            writeln!(w, "{:#010X}  {:#010X}  {}", b.pos, b.size, b.status)?;
        }
        Ok(())
    }

    /// Parses a map. Accepts any ddrescue mapfile that follows the manual; a file
    /// without nvcopy's header parses with `header: None`. Adjacent blocks of the
    /// same status are merged, as ddrescue does.
    pub fn parse(text: &str) -> Result<Map, MapError> {
        let mut header = HeaderReader::default();
        let mut status: Option<(u64, Phase, u32)> = None;
        let mut blocks: BTreeMap<u64, Span> = BTreeMap::new();
        let mut last: Option<(u64, Span)> = None;
        let err = |line: usize, problem: ParseProblem| MapError::Parse {
            path: None,
            line,
            problem,
        };

        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = match raw.find('#') {
                Some(hash) => {
                    let before = &raw[..hash];
                    if status.is_none() && before.trim_ascii().is_empty() {
                        header
                            .comment(line, &raw[hash + 1..])
                            .map_err(|p| err(line, p))?;
                    }
                    before
                }
                None => raw,
            };
            let mut words = content.split_ascii_whitespace();
            let Some(first) = words.next() else {
                continue;
            };
            if status.is_none() {
                let pos = parse_number("current_pos", first).map_err(|p| err(line, p))?;
                let phase_text = words.next().ok_or(err(
                    line,
                    ParseProblem::MissingField {
                        field: "current_status",
                    },
                ))?;
                let phase = single_char(phase_text)
                    .and_then(Phase::from_char)
                    .ok_or_else(|| {
                        err(
                            line,
                            ParseProblem::UnknownPhase {
                                text: phase_text.into(),
                            },
                        )
                    })?;
                let pass = match words.next() {
                    None => 1,
                    Some(t) => parse_pass(t).map_err(|p| err(line, p))?,
                };
                no_more(words).map_err(|p| err(line, p))?;
                status = Some((pos, phase, pass));
                continue;
            }

            let pos = parse_number("pos", first).map_err(|p| err(line, p))?;
            let size_text = words
                .next()
                .ok_or(err(line, ParseProblem::MissingField { field: "size" }))?;
            let size = parse_number("size", size_text).map_err(|p| err(line, p))?;
            let st_text = words
                .next()
                .ok_or(err(line, ParseProblem::MissingField { field: "status" }))?;
            let st = single_char(st_text)
                .and_then(BlockStatus::from_char)
                .ok_or_else(|| {
                    err(
                        line,
                        ParseProblem::UnknownStatus {
                            text: st_text.into(),
                        },
                    )
                })?;
            no_more(words).map_err(|p| err(line, p))?;
            if size == 0 {
                return Err(err(line, ParseProblem::ZeroSize));
            }
            let end = match pos.checked_add(size) {
                Some(e) if e <= MAX_OFFSET => e,
                _ => return Err(err(line, ParseProblem::EndTooLarge { pos, size })),
            };
            if let Some((prev_pos, prev)) = last {
                if pos < prev_pos {
                    return Err(err(
                        line,
                        ParseProblem::NotAscending {
                            previous: prev_pos,
                            found: pos,
                        },
                    ));
                }
                if pos < prev.end {
                    return Err(err(
                        line,
                        ParseProblem::Overlap {
                            expected: prev.end,
                            found: pos,
                        },
                    ));
                }
                if pos > prev.end {
                    return Err(err(
                        line,
                        ParseProblem::Gap {
                            expected: prev.end,
                            found: pos,
                        },
                    ));
                }
            }
            match last {
                Some((prev_pos, prev)) if prev.status == st => {
                    let merged = Span { end, status: st };
                    blocks.insert(prev_pos, merged);
                    last = Some((prev_pos, merged));
                }
                _ => {
                    let span = Span { end, status: st };
                    blocks.insert(pos, span);
                    last = Some((pos, span));
                }
            }
        }

        let Some((current_pos, current_status, current_pass)) = status else {
            return Err(MapError::NoStatusLine { path: None });
        };
        Ok(Map {
            header: header.finish().map_err(|(line, p)| err(line, p))?,
            current_pos,
            current_status,
            current_pass,
            blocks,
        })
    }
}

impl fmt::Display for Map {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Vec::new();
        self.write_to(&mut buf).map_err(|_| fmt::Error)?;
        f.write_str(&String::from_utf8_lossy(&buf))
    }
}

fn single_char(text: &str) -> Option<char> {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Some(c),
        _ => None,
    }
}

fn no_more<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<(), ParseProblem> {
    match words.next() {
        Some(w) => Err(ParseProblem::ExtraField { text: w.into() }),
        None => Ok(()),
    }
}

/// A C++ integer constant, as the manual allows: `0x`/`0X` hexadecimal, a leading
/// `0` for octal, decimal otherwise. At most [`MAX_OFFSET`].
fn parse_number(field: &'static str, text: &str) -> Result<u64, ParseProblem> {
    let (digits, radix) =
        if let Some(h) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (h, 16)
        } else if text.len() > 1 && text.starts_with('0') {
            (&text[1..], 8)
        } else {
            (text, 10)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(ParseProblem::BadNumber {
            field,
            text: text.into(),
        });
    }
    match u64::from_str_radix(digits, radix) {
        Ok(v) if v <= MAX_OFFSET => Ok(v),
        _ => Err(ParseProblem::NumberTooLarge {
            field,
            text: text.into(),
        }),
    }
}

fn parse_pass(text: &str) -> Result<u32, ParseProblem> {
    let bad = || ParseProblem::BadPass { text: text.into() };
    if !text.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    match text.parse::<u32>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(bad()),
    }
}

/// Collects nvcopy's header from the comments before the status line.
#[derive(Default)]
struct HeaderReader {
    /// Line of the `# nvcopy-map v1` marker, once seen.
    marker_line: Option<usize>,
    source: Option<String>,
    destinations: Vec<String>,
    length: Option<u64>,
    chunk: Option<u64>,
}

impl HeaderReader {
    /// Takes the text after the `#` of a comment line.
    fn comment(&mut self, line: usize, text: &str) -> Result<(), ParseProblem> {
        let text = text.trim();
        let header_err = |reason: String| ParseProblem::Header { reason };
        let mut words = text.split_whitespace();
        if words.next() == Some(MARKER) {
            let version = words.collect::<Vec<_>>().join(" ");
            if self.marker_line.is_some() {
                return Err(header_err(format!("a second '{MARKER}' line")));
            }
            if version != format!("v{FORMAT_VERSION}") {
                return Err(ParseProblem::UnsupportedVersion { found: version });
            }
            self.marker_line = Some(line);
            return Ok(());
        }
        if self.marker_line.is_none() {
            return Ok(());
        }
        let Some((key, value)) = text.split_once(':') else {
            return Ok(());
        };
        let value = value.trim();
        let number = |name: &str| {
            value
                .parse::<u64>()
                .map_err(|_| header_err(format!("{name} {value:?} is not a decimal number")))
        };
        let duplicate = |name: &str| header_err(format!("a second '{name}:' line"));
        match key.trim() {
            "source" => {
                if self.source.is_some() {
                    return Err(duplicate("source"));
                }
                self.source = Some(value.into());
            }
            "length" => {
                if self.length.is_some() {
                    return Err(duplicate("length"));
                }
                self.length = Some(number("length")?);
            }
            "chunk" => {
                if self.chunk.is_some() {
                    return Err(duplicate("chunk"));
                }
                self.chunk = Some(number("chunk")?);
            }
            k => {
                if let Some(index) = k.strip_prefix("destination ") {
                    let expected = self.destinations.len();
                    if index.trim().parse::<usize>().ok() != Some(expected) {
                        return Err(header_err(format!(
                            "'destination {}:' where 'destination {expected}:' was expected",
                            index.trim()
                        )));
                    }
                    self.destinations.push(value.into());
                }
            }
        }
        Ok(())
    }

    /// The header, or `(line, problem)` naming the marker's line when it is incomplete.
    fn finish(self) -> Result<Option<MapHeader>, (usize, ParseProblem)> {
        let Some(marker) = self.marker_line else {
            return Ok(None);
        };
        let missing = |field: &str| ParseProblem::Header {
            reason: format!("no '{field}:' line after '{MARKER} v{FORMAT_VERSION}'"),
        };
        let source = self.source.ok_or_else(|| (marker, missing("source")))?;
        let length = self.length.ok_or_else(|| (marker, missing("length")))?;
        let chunk = self.chunk.ok_or_else(|| (marker, missing("chunk")))?;
        MapHeader::new(source, self.destinations, length, chunk)
            .map(Some)
            .map_err(|e| {
                (
                    marker,
                    ParseProblem::Header {
                        reason: e.to_string(),
                    },
                )
            })
    }
}

/// Distinguishes temporary files of concurrent saves within one process.
static SAVE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Saves `map` so that `path` always holds either the old map or the new one, even
/// across a crash or power loss: the map is written to a temporary file in the
/// same directory, fsynced, renamed over `path`, and the directory is fsynced so
/// that the rename itself is durable. On failure the temporary file is removed.
pub fn save_atomic(path: &Path, map: &Map) -> Result<(), MapError> {
    let io_err = |action: &'static str, p: &Path, e: io::Error| MapError::Io {
        action,
        path: p.to_path_buf(),
        hint: io_hint(e.kind(), true),
        source: e,
    };
    let Some(name) = path.file_name() else {
        return Err(io_err(
            "saving map to",
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        ));
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        SAVE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let write = || -> Result<(), MapError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err("creating temporary map file", &tmp, e))?;
        let mut w = BufWriter::new(&file);
        map.write_to(&mut w)
            .and_then(|()| w.flush())
            .map_err(|e| io_err("writing temporary map file", &tmp, e))?;
        drop(w);
        file.sync_all()
            .map_err(|e| io_err("syncing temporary map file", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io_err("renaming temporary map file over", path, e))
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing the map's directory", dir, e))
}

/// Reads and parses a map file. Bytes that are not UTF-8 are tolerated in comments
/// (ddrescue copies its command line there); elsewhere they make the line malformed.
pub fn load(path: &Path) -> Result<Map, MapError> {
    let bytes = fs::read(path).map_err(|e| MapError::Io {
        action: "reading map file",
        path: path.to_path_buf(),
        hint: io_hint(e.kind(), false),
        source: e,
    })?;
    Map::parse(&String::from_utf8_lossy(&bytes)).map_err(|e| e.with_path(path))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use BlockStatus::{BadSector, Finished, NonScraped, NonTried, NonTrimmed};

    fn chunk(c: u64) -> NonZeroU64 {
        NonZeroU64::new(c).unwrap()
    }

    fn header(len: u64) -> MapHeader {
        MapHeader::new(
            "0000:00:10.0/1@0+512M",
            vec!["0000:00:11.0/1@0".into(), "0000:00:12.0/2@4096".into()],
            len,
            4096,
        )
        .unwrap()
    }

    fn triples(map: &Map) -> Vec<(u64, u64, BlockStatus)> {
        map.blocks().map(|b| (b.pos, b.size, b.status)).collect()
    }

    /// The invariants every method must keep.
    fn assert_canonical(map: &Map) {
        let blocks: Vec<Block> = map.blocks().collect();
        for b in &blocks {
            assert!(b.size > 0, "empty block {b:?}");
        }
        for w in blocks.windows(2) {
            assert_eq!(w[0].end(), w[1].pos, "not contiguous: {w:?}");
            assert_ne!(
                w[0].status, w[1].status,
                "adjacent blocks share a status: {w:?}"
            );
        }
    }

    fn parse_err(text: &str) -> (usize, ParseProblem) {
        match Map::parse(text) {
            Err(MapError::Parse {
                line,
                problem,
                path: None,
            }) => (line, problem),
            other => panic!("expected a parse error for {text:?}, got {other:?}"),
        }
    }

    /// A scratch directory, removed however the test ends.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "nvcopy-mapfile-{name}-{}-{}",
            std::process::id(),
            SAVE_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    #[test]
    fn status_characters_round_trip() {
        let chars: String = BlockStatus::ALL.iter().map(|s| s.as_char()).collect();
        assert_eq!(chars, "?*/-+");
        for s in BlockStatus::ALL {
            assert_eq!(BlockStatus::from_char(s.as_char()), Some(s));
        }
        let chars: String = Phase::ALL.iter().map(|s| s.as_char()).collect();
        assert_eq!(chars, "?*/-FG+");
        for p in Phase::ALL {
            assert_eq!(Phase::from_char(p.as_char()), Some(p));
        }
        assert_eq!(BlockStatus::from_char('F'), None);
        assert_eq!(Phase::from_char('x'), None);
    }

    #[test]
    fn new_map_is_one_non_tried_block() {
        let m = Map::new(header(1 << 20));
        assert_eq!(triples(&m), vec![(0, 1 << 20, NonTried)]);
        assert_eq!(m.current_status, Phase::Copying);
        assert_eq!(m.current_pass, 1);
        assert_eq!(Map::new(header(0)).block_count(), 0);
    }

    #[test]
    fn format_then_parse_round_trips_every_status() {
        let mut m = Map::new(header(0x10_0000));
        m.paint(0, 0x1000, Finished).unwrap();
        m.paint(0x1000, 0x200, BadSector).unwrap();
        m.paint(0x1200, 0x400, NonScraped).unwrap();
        m.paint(0x1600, 0x800, NonTrimmed).unwrap();
        m.paint(0x8000, 0x8000, Finished).unwrap();
        m.current_pos = 0x1600;
        m.current_pass = 3;
        assert_eq!(m.block_count(), 7);
        for phase in Phase::ALL {
            m.current_status = phase;
            let text = m.to_string();
            let back = Map::parse(&text).unwrap();
            assert_eq!(back, m, "{text}");
            assert_eq!(back.to_string(), text);
        }
        let text = m.to_string();
        assert!(text.contains("# nvcopy-map v1\n"), "{text}");
        assert!(text.contains("# source: 0000:00:10.0/1@0+512M\n"), "{text}");
        assert!(
            text.contains("# destination 1: 0000:00:12.0/2@4096\n"),
            "{text}"
        );
        assert!(
            text.contains("# length: 1048576\n# chunk: 4096\n"),
            "{text}"
        );
        assert!(text.contains("0x00001000  0x00000200  -\n"), "{text}");
        assert!(text.starts_with("# Mapfile. Written by nvcopy "), "{text}");
    }

    #[test]
    fn headerless_map_round_trips_without_header() {
        let mut m = Map::parse("0 ? 1\n0 0x800 ?\n").unwrap();
        m.paint(0, 0x200, Finished).unwrap();
        let back = Map::parse(&m.to_string()).unwrap();
        assert_eq!(back.header, None);
        assert_eq!(back, m);
    }

    #[test]
    fn parses_what_the_manual_allows() {
        // Decimal, octal and both hex prefixes; blank lines; comments at line start,
        // after fields and without a space; CRLF line ends; no current_pass (ddrescue
        // before 1.20); tabs; adjacent blocks of one status are merged.
        let text = "# made by hand\r\n\
                    \r\n\
                    0X200\t*   # status line\r\n\
                    \x20 # pos size status\r\n\
                    0 512 +\r\n\
                    512 01000 +#same status\r\n\
                    \t\r\n\
                    0x400 0x200 -\r\n\
                    0x600 10 /\r\n\
                    1546 0xF6 ?\r\n";
        let m = Map::parse(text).unwrap();
        assert_eq!(m.header, None);
        assert_eq!(m.current_pos, 0x200);
        assert_eq!(m.current_status, Phase::Trimming);
        assert_eq!(m.current_pass, 1);
        assert_eq!(
            triples(&m),
            vec![
                (0, 0x400, Finished),
                (0x400, 0x200, BadSector),
                (0x600, 10, NonScraped),
                (1546, 0xF6, NonTried),
            ]
        );
        assert_eq!(m.extent(), (0, 0x700));
        // A map of a rescue domain that does not start at 0 parses (ddrescue -i).
        let m = Map::parse("0 + 7\n0x200 0x200 +\n").unwrap();
        assert_eq!(m.extent(), (0x200, 0x400));
        assert_eq!(m.current_pass, 7);
        // Only a status line: no blocks.
        assert_eq!(Map::parse("0 ?\n").unwrap().block_count(), 0);
    }

    #[test]
    fn malformed_lines_name_line_and_problem() {
        use ParseProblem as P;
        let cases: Vec<(&str, usize, P)> = vec![
            (
                "0 ? 1\n0x0 0xG0 +\n",
                2,
                P::BadNumber {
                    field: "size",
                    text: "0xG0".into(),
                },
            ),
            (
                "0 ? 1\n0x 0x10 +\n",
                2,
                P::BadNumber {
                    field: "pos",
                    text: "0x".into(),
                },
            ),
            (
                "# c\nzz ? 1\n",
                2,
                P::BadNumber {
                    field: "current_pos",
                    text: "zz".into(),
                },
            ),
            (
                "0 ? 1\n09 1 +\n",
                2,
                P::BadNumber {
                    field: "pos",
                    text: "09".into(),
                },
            ),
            (
                "0 ? 1\n-1 1 +\n",
                2,
                P::BadNumber {
                    field: "pos",
                    text: "-1".into(),
                },
            ),
            (
                "0 ? 1\n0 0x100 X\n",
                2,
                P::UnknownStatus { text: "X".into() },
            ),
            (
                "0 ? 1\n0 0x100 F\n",
                2,
                P::UnknownStatus { text: "F".into() },
            ),
            (
                "0 ? 1\n0 0x100 ++\n",
                2,
                P::UnknownStatus { text: "++".into() },
            ),
            ("0 X 1\n", 1, P::UnknownPhase { text: "X".into() }),
            ("0 ? 0\n", 1, P::BadPass { text: "0".into() }),
            ("0 ? 0x1\n", 1, P::BadPass { text: "0x1".into() }),
            (
                "0\n",
                1,
                P::MissingField {
                    field: "current_status",
                },
            ),
            ("0 ? 1 9\n", 1, P::ExtraField { text: "9".into() }),
            ("0 ? 1\n0 0x100\n", 2, P::MissingField { field: "status" }),
            ("0 ? 1\n0\n", 2, P::MissingField { field: "size" }),
            (
                "0 ? 1\n0 0x100 + x\n",
                2,
                P::ExtraField { text: "x".into() },
            ),
            ("0 ? 1\n0 0x100 +\n0x100 0 ?\n", 3, P::ZeroSize),
            (
                "0 ? 1\n0 0x100 +\n\n0x200 0x100 ?\n",
                4,
                P::Gap {
                    expected: 0x100,
                    found: 0x200,
                },
            ),
            (
                "0 ? 1\n0 0x100 +\n0x80 0x100 ?\n",
                3,
                P::Overlap {
                    expected: 0x100,
                    found: 0x80,
                },
            ),
            (
                "0 ? 1\n0x100 0x100 +\n0x200 0x100 ?\n0x80 0x10 -\n",
                4,
                P::NotAscending {
                    previous: 0x200,
                    found: 0x80,
                },
            ),
            (
                "0 ? 1\n0 0x8000000000000000 +\n",
                2,
                P::NumberTooLarge {
                    field: "size",
                    text: "0x8000000000000000".into(),
                },
            ),
            (
                "0 ? 1\n0 99999999999999999999999 +\n",
                2,
                P::NumberTooLarge {
                    field: "size",
                    text: "99999999999999999999999".into(),
                },
            ),
            (
                "0 ? 1\n0x7FFFFFFFFFFFFFFF 2 +\n",
                2,
                P::EndTooLarge {
                    pos: 0x7FFF_FFFF_FFFF_FFFF,
                    size: 2,
                },
            ),
        ];
        for (text, line, problem) in cases {
            assert_eq!(parse_err(text), (line, problem), "{text:?}");
        }
        for text in ["", "\n\n", "# only\n# comments\n"] {
            assert!(
                matches!(Map::parse(text), Err(MapError::NoStatusLine { path: None })),
                "{text:?}"
            );
        }
    }

    #[test]
    fn parse_error_message_names_line() {
        let e = Map::parse("0 ? 1\n0 0x100 +\n0x80 0x100 ?\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("line 3: overlap"), "{msg}");
        assert!(msg.contains("0x80"), "{msg}");
    }

    #[test]
    fn malformed_nvcopy_header_is_refused() {
        let good = Map::new(header(0x1000)).to_string();
        let line_of = |text: &str, needle: &str| {
            text.lines().position(|l| l.starts_with(needle)).unwrap() + 1
        };
        let marker = line_of(&good, "# nvcopy-map");

        let v2 = good.replace("# nvcopy-map v1", "# nvcopy-map v2");
        assert_eq!(
            parse_err(&v2),
            (
                marker,
                ParseProblem::UnsupportedVersion { found: "v2".into() }
            )
        );

        let no_len = good.replace("# length: 4096\n", "");
        let (line, p) = parse_err(&no_len);
        assert_eq!(line, marker);
        assert!(p.to_string().contains("no 'length:' line"), "{p}");

        let bad_len = good.replace("# length: 4096", "# length: 4k");
        let (line, p) = parse_err(&bad_len);
        assert_eq!(line, line_of(&good, "# length"));
        assert!(
            p.to_string().contains("\"4k\" is not a decimal number"),
            "{p}"
        );

        let zero_chunk = good.replace("# chunk: 4096", "# chunk: 0");
        let (line, p) = parse_err(&zero_chunk);
        assert_eq!(line, marker);
        assert!(p.to_string().contains("must not be 0"), "{p}");

        let skipped = good.replace("# destination 1:", "# destination 2:");
        let (line, p) = parse_err(&skipped);
        assert_eq!(line, line_of(&good, "# destination 1"));
        assert!(
            p.to_string().contains("'destination 1:' was expected"),
            "{p}"
        );

        let twice = good.replace(
            "# length: 4096\n",
            "# length: 4096\n# source: 0000:00:13.0\n",
        );
        let (_, p) = parse_err(&twice);
        assert!(p.to_string().contains("a second 'source:' line"), "{p}");

        // A word that only starts like the marker is just a comment.
        let lookalike = good.replace("# nvcopy-map v1\n", "# nvcopy-mapping notes\n");
        assert_eq!(Map::parse(&lookalike).unwrap().header, None);

        // Header-like comments without the marker are only comments.
        let unmarked = good.replace("# nvcopy-map v1\n", "");
        assert_eq!(Map::parse(&unmarked).unwrap().header, None);
    }

    #[test]
    fn header_fields_are_checked() {
        for (src, dests) in [
            ("", vec![]),
            (" a", vec![]),
            ("a", vec!["b\nc".to_string()]),
            ("a", vec!["b\r".to_string()]),
        ] {
            assert!(
                matches!(
                    MapHeader::new(src, dests.clone(), 1, 1),
                    Err(MapError::InvalidHeader { .. })
                ),
                "{src:?} {dests:?}"
            );
        }
        assert!(MapHeader::new("a", vec![], MAX_OFFSET + 1, 1).is_err());
        assert!(MapHeader::new("a", vec![], 1, 0).is_err());
        // '#' and ':' in a region string survive the round trip.
        let h = MapHeader::new("a#b: c", vec!["d: #e".into()], 16, 8).unwrap();
        let back = Map::parse(&Map::new(h.clone()).to_string()).unwrap();
        assert_eq!(back.header, Some(h));
    }

    #[test]
    fn paint_splits_and_merges() {
        let mut m = Map::new(header(100));
        m.paint(40, 20, Finished).unwrap();
        assert_eq!(
            triples(&m),
            vec![(0, 40, NonTried), (40, 20, Finished), (60, 40, NonTried)]
        );
        // Same status inside a block: nothing changes.
        m.paint(45, 5, Finished).unwrap();
        assert_eq!(m.block_count(), 3);
        // Bridging both neighbours merges them into one.
        m.paint(0, 40, Finished).unwrap();
        m.paint(60, 40, Finished).unwrap();
        assert_eq!(triples(&m), vec![(0, 100, Finished)]);
        // Splitting at the very ends.
        m.paint(0, 1, BadSector).unwrap();
        m.paint(99, 1, NonTried).unwrap();
        assert_eq!(
            triples(&m),
            vec![(0, 1, BadSector), (1, 98, Finished), (99, 1, NonTried)]
        );
        // A range that swallows several blocks.
        m.paint(10, 10, NonScraped).unwrap();
        m.paint(30, 10, NonTrimmed).unwrap();
        m.paint(1, 54, BadSector).unwrap(); // and merges with the bad byte at 0
        assert_eq!(
            triples(&m),
            vec![(0, 55, BadSector), (55, 44, Finished), (99, 1, NonTried)]
        );
        assert_canonical(&m);
        m.paint(50, 0, Finished).unwrap();
        assert_eq!(m.block_count(), 3);
        assert_eq!(m.status_at(54), Some(BadSector));
        assert_eq!(m.status_at(100), None);
    }

    #[test]
    fn paint_outside_the_map_is_refused() {
        let mut m = Map::new(header(100));
        for (pos, size) in [(90, 11), (100, 1), (u64::MAX, 2), (1, u64::MAX)] {
            assert!(
                matches!(
                    m.paint(pos, size, Finished),
                    Err(MapError::OutOfRange {
                        start: 0,
                        end: 100,
                        ..
                    })
                ),
                "{pos} {size}"
            );
        }
        let mut shifted = Map::parse("0 ? 1\n0x10 0x10 ?\n").unwrap();
        assert!(shifted.paint(0, 0x11, Finished).is_err());
        assert_eq!(triples(&m), vec![(0, 100, NonTried)]);
    }

    #[test]
    fn ascending_paints_stay_cheap() {
        // The copier's pattern: chunks finish roughly in order, a few fail. With a
        // block per failure this builds ~20k blocks; every paint touches the tail
        // only, so this is fast even unoptimised.
        let c = 4096u64;
        let cells = 200_000u64;
        let mut m = Map::new(header(c * cells));
        for i in 0..cells {
            let s = if i % 10 == 7 { BadSector } else { Finished };
            m.paint(i * c, c, s).unwrap();
        }
        // 20,000 bad cells between 20,001 finished runs.
        assert_eq!(m.block_count(), 40_001);
        assert_eq!(m.bytes_with(BadSector), cells / 10 * c);
        assert_eq!(m.finished_bytes(), cells * c - cells / 10 * c);
        assert_canonical(&m);
    }

    #[test]
    fn paint_cells_covers_a_partial_last_cell() {
        let mut m = Map::new(header(10 * 4096 + 100));
        let ch = chunk(4096);
        assert_eq!(m.cell_count(ch), 11);
        m.paint_cells(
            ch,
            [(0, Finished), (1, Finished), (3, BadSector), (10, Finished)],
        )
        .unwrap();
        assert_eq!(
            triples(&m),
            vec![
                (0, 8192, Finished),
                (8192, 4096, NonTried),
                (12288, 4096, BadSector),
                (16384, 6 * 4096, NonTried),
                (40960, 100, Finished),
            ]
        );
        assert!(matches!(
            m.paint_cells(ch, [(11, Finished)]),
            Err(MapError::CellOutOfRange {
                index: 11,
                cells: 11,
                chunk: 4096
            })
        ));
        assert!(m.paint_cells(ch, [(u64::MAX, Finished)]).is_err());
    }

    #[test]
    fn todo_cells_with_and_without_retry() {
        let c = 4096u64;
        let len = 10 * c + 100;
        let mut m = Map::new(header(len));
        m.paint(0, len, Finished).unwrap();
        m.paint(c + 10, 1, BadSector).unwrap(); // cell 1
        m.paint(3 * c - 1, 2, NonTrimmed).unwrap(); // cells 2 and 3
        m.paint(5 * c, c, NonScraped).unwrap(); // cell 5 only
        m.paint(len - 1, 1, NonTried).unwrap(); // the partial last cell, 10
        let ch = chunk(c);
        let want = |cells: &[usize]| {
            let mut v = vec![false; 11];
            for &i in cells {
                v[i] = true;
            }
            v
        };
        assert_eq!(m.todo_cells(ch, false).unwrap(), want(&[2, 3, 5, 10]));
        assert_eq!(m.todo_cells(ch, true).unwrap(), want(&[1, 2, 3, 5, 10]));
        m.paint(len - 1, 1, Finished).unwrap();
        assert_eq!(m.todo_cells(ch, false).unwrap(), want(&[2, 3, 5]));
        // Another chunk size works from the same byte ranges.
        assert_eq!(
            m.todo_cells(chunk(3 * c), true).unwrap(),
            vec![true, true, false, false]
        );
        assert_eq!(m.bytes_with(BadSector), 1);
        assert_eq!(m.bytes_with(NonTrimmed), 2);
        assert_eq!(m.bytes_with(NonScraped), c);
        assert_eq!(m.bytes_with(NonTried), 0);
        assert_eq!(m.finished_bytes(), len - 3 - c);
        assert_eq!(m.todo_ranges(ch, true), vec![1..4, 5..6]);
        assert_eq!(m.todo_ranges(ch, false), vec![2..4, 5..6]);
        // Bytes before a map's start count as to do.
        let shifted = Map::parse("0 ? 1\n0x2000 0x1000 +\n").unwrap();
        assert_eq!(shifted.todo_ranges(ch, false), vec![0..2]);
        assert_eq!(
            shifted.todo_cells(ch, false).unwrap(),
            vec![true, true, false]
        );
    }

    #[test]
    fn todo_cells_refuses_rather_than_aborts_on_huge_maps() {
        let huge = Map::parse("0 ? 1\n0 0x7FFFFFFFFFFFFFFF ?\n").unwrap();
        assert_eq!(huge.todo_ranges(chunk(1), false), vec![0..MAX_OFFSET]);
        assert!(matches!(
            huge.todo_cells(chunk(1), false),
            Err(MapError::TooManyCells {
                cells: MAX_OFFSET,
                chunk: 1
            })
        ));
    }

    #[test]
    fn check_identity_names_each_difference() {
        let len = 1 << 20;
        let m = Map::new(header(len));
        m.check_identity(&header(len)).unwrap();

        // Another chunk size is fine.
        let h = header(len);
        let other_chunk =
            MapHeader::new(h.source(), h.destinations().to_vec(), len, 1 << 17).unwrap();
        m.check_identity(&other_chunk).unwrap();

        let src = MapHeader::new("0000:00:13.0/1@0", h.destinations().to_vec(), len, 4096).unwrap();
        let e = m.check_identity(&src).unwrap_err();
        assert!(matches!(e, MapError::SourceMismatch { .. }));
        assert_eq!(
            e.to_string(),
            "the map is for source 0000:00:10.0/1@0+512M, this copy reads 0000:00:13.0/1@0: \
             give the same --from, or another --map file"
        );

        let swapped = MapHeader::new(
            h.source(),
            vec![h.destinations()[1].clone(), h.destinations()[0].clone()],
            len,
            4096,
        )
        .unwrap();
        let e = m.check_identity(&swapped).unwrap_err();
        assert!(
            matches!(e, MapError::DestinationMismatch { index: 0, .. }),
            "{e}"
        );
        assert!(
            e.to_string().contains(
                "the map is for destination 0 0000:00:11.0/1@0, this copy writes 0000:00:12.0/2@4096 there"
            ),
            "{e}"
        );

        let mut more = h.destinations().to_vec();
        more.push("0000:00:14.0".into());
        let e = m
            .check_identity(&MapHeader::new(h.source(), more, len, 4096).unwrap())
            .unwrap_err();
        assert!(
            matches!(
                e,
                MapError::DestinationMismatch {
                    index: 2,
                    map: None,
                    map_count: 2,
                    this_count: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("0000:00:14.0 is not in the map"),
            "{e}"
        );

        let fewer = h.destinations()[..1].to_vec();
        let e = m
            .check_identity(&MapHeader::new(h.source(), fewer, len, 4096).unwrap())
            .unwrap_err();
        assert!(
            e.to_string().contains("0000:00:12.0/2@4096 is missing"),
            "{e}"
        );

        let e = m.check_identity(&header(len * 2)).unwrap_err();
        assert!(
            matches!(
                e,
                MapError::LengthMismatch {
                    map: 1048576,
                    this: 2097152
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("1048576 bytes, this copy is 2097152"),
            "{e}"
        );

        // Blocks that do not cover exactly [0, length).
        let text = Map::new(header(len)).to_string();
        for (from, to) in [
            ("0x00000000  0x00100000  ?", "0x00000000  0x00080000  ?"),
            ("0x00000000  0x00100000  ?", "0x00001000  0x000FF000  ?"),
            ("0x00000000  0x00100000  ?", "0x00000000  0x00200000  ?"),
        ] {
            assert!(text.contains(from), "{text}");
            let damaged = Map::parse(&text.replace(from, to)).unwrap();
            let e = damaged.check_identity(&header(len)).unwrap_err();
            assert!(matches!(e, MapError::Coverage { len: 1048576, .. }), "{e}");
            assert!(e.to_string().contains("this copy is [0, 0x100000)"), "{e}");
        }

        let plain = Map::parse("0 ? 1\n0 0x100000 ?\n").unwrap();
        let e = plain.check_identity(&header(len)).unwrap_err();
        assert!(matches!(e, MapError::NotNvcopy), "{e}");
        assert!(e.to_string().contains("not written by nvcopy"), "{e}");
    }

    #[test]
    fn save_atomic_then_load() {
        let tmp = temp_dir("save");
        let dir = &tmp.0;
        let path = dir.join("copy.map");
        let mut m = Map::new(header(1 << 20));
        m.paint(0, 0x3000, Finished).unwrap();
        m.paint(0x3000, 0x1000, BadSector).unwrap();
        save_atomic(&path, &m).unwrap();
        assert_eq!(load(&path).unwrap(), m);
        // Overwriting keeps one file and the new content.
        m.paint(0x4000, 0x1000, Finished).unwrap();
        save_atomic(&path, &m).unwrap();
        assert_eq!(load(&path).unwrap(), m);
        let names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["copy.map".to_string()]);
    }

    #[test]
    fn save_and_load_errors_carry_path_and_fix() {
        let tmp = temp_dir("errors");
        let dir = &tmp.0;
        let missing_dir = dir.join("nope").join("copy.map");
        let e = save_atomic(&missing_dir, &Map::new(header(16))).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.join("nope").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("the directory does not exist"), "{msg}");

        // Renaming over a directory fails; the temporary file must not remain.
        let target = dir.join("is-a-dir");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), "x").unwrap();
        let e = save_atomic(&target, &Map::new(header(16))).unwrap_err();
        assert!(
            e.to_string().contains("renaming temporary map file over"),
            "{e}"
        );
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["is-a-dir".to_string()]);

        let absent = dir.join("absent.map");
        let e = load(&absent).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(e.to_string().contains("absent.map"), "{e}");

        let bad = dir.join("bad.map");
        fs::write(&bad, "0 ? 1\n0 0x10 +\n0x20 0x10 ?\n").unwrap();
        let e = load(&bad).unwrap_err();
        assert!(!e.is_not_found());
        assert_eq!(
            e.to_string(),
            format!(
                "{}: line 3: gap: the block starts at 0x20 but the previous one ends at 0x10; blocks must be contiguous",
                bad.display()
            )
        );

        // Bytes that are not UTF-8 are fine in comments.
        let latin1 = dir.join("latin1.map");
        fs::write(
            &latin1,
            b"# Command line: ddrescue /dev/sdb caf\xe9.img\n0 ? 1\n0 0x10 +\n",
        )
        .unwrap();
        assert_eq!(load(&latin1).unwrap().finished_bytes(), 0x10);
    }

    /// A per-byte model of a map.
    fn model_paints(len: u64, paints: &[(u64, u64, BlockStatus)]) -> (Map, Vec<BlockStatus>) {
        let mut m = Map::new(header(len));
        let mut bytes = vec![NonTried; len as usize];
        for &(pos, size, s) in paints {
            let pos = pos % len;
            let size = size % (len - pos + 1);
            m.paint(pos, size, s).unwrap();
            bytes[pos as usize..(pos + size) as usize].fill(s);
        }
        (m, bytes)
    }

    fn expand(m: &Map) -> Vec<BlockStatus> {
        m.blocks()
            .flat_map(|b| std::iter::repeat_n(b.status, b.size as usize))
            .collect()
    }

    fn status() -> impl Strategy<Value = BlockStatus> {
        prop::sample::select(BlockStatus::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn paint_matches_a_per_byte_model(
            len in 1u64..80,
            paints in prop::collection::vec((0u64..80, 0u64..80, status()), 0..40),
        ) {
            let (m, bytes) = model_paints(len, &paints);
            assert_canonical(&m);
            prop_assert_eq!(expand(&m), bytes);
            prop_assert_eq!(m.extent(), (0, len));
            let back = Map::parse(&m.to_string()).unwrap();
            prop_assert_eq!(&back, &m);
        }

        #[test]
        fn paint_cells_and_todo_match_the_model(
            len in 1u64..120,
            c in 1u64..20,
            cells in prop::collection::vec((0u64..130, status()), 0..40),
            retry in any::<bool>(),
        ) {
            let ch = chunk(c);
            let mut m = Map::new(header(len));
            let mut bytes = vec![NonTried; len as usize];
            let ncells = len.div_ceil(c);
            let cells: Vec<_> = cells.into_iter().map(|(i, s)| (i % ncells, s)).collect();
            m.paint_cells(ch, cells.iter().copied()).unwrap();
            for &(i, s) in &cells {
                let end = ((i + 1) * c).min(len);
                bytes[(i * c) as usize..end as usize].fill(s);
            }
            assert_canonical(&m);
            prop_assert_eq!(expand(&m), bytes.clone());
            let want: Vec<bool> = bytes
                .chunks(c as usize)
                .map(|cell| cell.iter().any(|s| s.needs_copy(retry)))
                .collect();
            prop_assert_eq!(m.todo_cells(ch, retry).unwrap(), want);
            for s in BlockStatus::ALL {
                prop_assert_eq!(
                    m.bytes_with(s),
                    bytes.iter().filter(|&&b| b == s).count() as u64
                );
            }
        }

        #[test]
        fn parse_never_panics(text in "[0-9a-fxX?*/+FG# \t\r\n-]{0,200}") {
            if let Ok(m) = Map::parse(&text) {
                assert_canonical(&m);
                prop_assert_eq!(Map::parse(&m.to_string()).unwrap(), m);
            }
        }

        #[test]
        fn parse_never_panics_on_mutated_maps(
            cut in 0usize..400,
            insert in "[0-9xX?+# :\n-]{0,6}",
        ) {
            let mut text = Map::new(header(0x10000)).to_string();
            let at = cut.min(text.len());
            text.insert_str(at, &insert);
            if let Ok(m) = Map::parse(&text) {
                assert_canonical(&m);
                prop_assert_eq!(Map::parse(&m.to_string()).unwrap(), m);
            }
        }
    }
}
