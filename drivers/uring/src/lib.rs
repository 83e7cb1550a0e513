//! nvcopy's io_uring transport: files and kernel block devices, opened with O_DIRECT
//! (or through the page cache when asked), read and written straight into the engine's
//! DMA pool registered as fixed buffers, through rings that a shared SQPOLL thread
//! drains, so that a steady copy makes no system call per chunk.
//!
//! - [`BlockFile`] opens and describes a path (size, direct-I/O alignment, identity) and
//!   reserves a destination's space before any data moves.
//! - [`FileQueue`] is one reactor's ring on one file: reads, writes, fallocate
//!   (ZERO_RANGE, PUNCH_HOLE) and fdatasync, with per-command trackers and deadlines.

mod error;
mod file;
mod queue;

pub use error::{Error, Result};
pub use file::{Access, BlockFile, FileKind};
pub use queue::{
    Anchor, FileCompletion, FileOp, FileQueue, Late, SubmitError, ABORTED, SHORT_TRANSFER,
};
