//! The io_uring transport's one error type. Every variant names the path.

use std::path::PathBuf;

/// What went wrong opening or driving a file or block device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The path does not exist (and is not to be created).
    #[error("{path}: no such file, directory or block device (nor a PCI address such as 0000:00:10.0); check the path")]
    NotFound {
        /// Path.
        path: PathBuf,
    },

    /// The path is a directory.
    #[error(
        "{path}: is a directory; name a file in it (for example {path}/disk.img) or a block device"
    )]
    IsDirectory {
        /// Path.
        path: PathBuf,
    },

    /// Neither a regular file nor a block device.
    #[error("{path}: not a regular file or a block device (a {kind}); nvcopy copies files and block devices")]
    NotBlockOrFile {
        /// Path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },

    /// A block device that a filesystem, device mapper, md, or another program holds.
    #[error("{path}: the block device is in use (mounted, part of LVM, md or a swap area, or held open by another program): unmount or release it first (`findmnt {path}`, `lsblk {path}`, `fuser -v {path}`)")]
    Busy {
        /// Path.
        path: PathBuf,
    },

    /// A block device another program has open.
    #[error("{path}: the block device is open in process {pid} (see /proc/{pid}/cmdline); stop that program first, so that nothing else reads or writes it during the copy")]
    OpenElsewhere {
        /// Path.
        path: PathBuf,
        /// A process that has it open.
        pid: u32,
    },

    /// The filesystem refuses O_DIRECT.
    #[error("{path}: the filesystem does not support direct I/O (O_DIRECT); add --buffered to go through the page cache (a Flush still makes the copy durable)")]
    NoDirectIo {
        /// Path.
        path: PathBuf,
    },

    /// Not enough space for a destination.
    #[error("{path}: the filesystem cannot hold {needed} bytes at offset {offset} (reserving the space failed: {source}); free space there, or choose another destination")]
    NoSpace {
        /// Path.
        path: PathBuf,
        /// Offset of the region.
        offset: u64,
        /// Bytes of the region.
        needed: u64,
        /// The reservation's failure.
        source: std::io::Error,
    },

    /// A system call failed.
    #[error("{path}: {what}: {source}")]
    Io {
        /// Path (or the ring).
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },

    /// io_uring could not be set up.
    #[error("io_uring: {what}: {source}; nvcopy needs Linux 5.19 or later with io_uring enabled (sysctl kernel.io_uring_disabled=0)")]
    Ring {
        /// What failed.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// The crate's result.
pub type Result<T> = std::result::Result<T, Error>;
