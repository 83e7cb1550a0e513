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
        while let Some((&k, &span)) = self.blocks.range(cursor..end).next() {
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

    /// Which cells of `chunk` bytes must be (re)copied: those with any byte that is
    /// not finished, where bad-sector bytes count only if `retry_failed`. Bytes
    /// before the map's start (a map that does not begin at 0) count as to do.
    /// One entry per cell ([`cell_count`](Self::cell_count)); call it after
    /// [`check_identity`](Self::check_identity), which bounds the length.
    pub fn todo_cells(&self, chunk: NonZeroU64, retry_failed: bool) -> Vec<bool> {
        let c = chunk.get();
        let cells = usize::try_from(self.cell_count(chunk)).unwrap_or(usize::MAX);
        let mut todo = vec![false; cells];
        let mut mark = |pos: u64, end: u64| {
            let first = usize::try_from(pos / c).unwrap_or(usize::MAX);
            let last = usize::try_from((end - 1) / c).unwrap_or(usize::MAX);
            if let Some(s) = todo.get_mut(first..=last.min(cells.saturating_sub(1))) {
                s.fill(true);
            }
        };
        let (start, _) = self.extent();
        if start > 0 {
            mark(0, start);
        }
        for b in self.blocks() {
            if b.status.needs_copy(retry_failed) {
                mark(b.pos, b.end());
            }
        }
        todo
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
        if let Some(rest) = text.strip_prefix(MARKER) {
            let version = rest.trim();
            if self.marker_line.is_some() {
                return Err(header_err(format!("a second '{MARKER}' line")));
            }
            if version != format!("v{FORMAT_VERSION}") {
                return Err(ParseProblem::UnsupportedVersion {
                    found: version.into(),
                });
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
