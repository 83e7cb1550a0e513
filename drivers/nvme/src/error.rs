//! The NVMe driver's one error type. Each variant carries the controller (its PCI
//! address), and where there is one the command, namespace and LBA.

use std::time::Duration;

use crate::status::Status;

/// What went wrong talking to an NVMe controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The platform layer (VFIO, DMA memory) failed.
    #[error(transparent)]
    Platform(#[from] nvcopy_vfio::Error),

    /// The controller does not offer what nvcopy needs.
    #[error("{ctrl}: unsupported controller: {reason}")]
    Unsupported {
        /// Controller.
        ctrl: String,
        /// What is missing.
        reason: String,
    },

    /// A register wait ran past the deadline the spec allows.
    #[error("{ctrl}: timed out after {waited:?} waiting for {what}; the controller may be wedged: reset it with `scripts/setup.sh reset` and bind it again")]
    ReadyTimeout {
        /// Controller.
        ctrl: String,
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },

    /// CSTS.CFS: the controller hit a fatal error and must be reset.
    #[error("{ctrl}: controller fatal status (CSTS.CFS) set; it must be reset before further use")]
    ControllerFatal {
        /// Controller.
        ctrl: String,
    },

    /// A command completed with an error status.
    #[error("{ctrl}: {cmd} failed on namespace {nsid} at LBA {lba}: {status}")]
    Command {
        /// Controller.
        ctrl: String,
        /// Command name.
        cmd: &'static str,
        /// Namespace (0 for admin commands).
        nsid: u32,
        /// First LBA of the command (0 where none).
        lba: u64,
        /// The typed NVMe status.
        status: Status,
    },

    /// A command did not complete within its timeout. Its queue pair has been disabled so
    /// its buffers can no longer be written by the device.
    #[error("{ctrl}: {cmd} on namespace {nsid} at LBA {lba} did not complete within {waited:?}; the controller was disabled and must be reset")]
    CommandTimeout {
        /// Controller.
        ctrl: String,
        /// Command name.
        cmd: &'static str,
        /// Namespace.
        nsid: u32,
        /// First LBA.
        lba: u64,
        /// How long.
        waited: Duration,
    },

    /// The controller completed a command id that is not outstanding.
    #[error("{ctrl}: queue {qid} returned a completion for command id {cid}, which is not outstanding (device bug)")]
    BadCommandId {
        /// Controller.
        ctrl: String,
        /// Queue.
        qid: u16,
        /// The untrusted command id.
        cid: u16,
    },

    /// The submission queue is full.
    #[error("{ctrl}: submission queue {qid} is full")]
    QueueFull {
        /// Controller.
        ctrl: String,
        /// Queue.
        qid: u16,
    },

    /// A namespace whose LBA format nvcopy cannot use.
    #[error("{ctrl}: namespace {nsid} uses an LBA format with {metadata} bytes of metadata per block; nvcopy supports formats without metadata: reformat it (for example `nvme format --lbaf=N`) or pick another namespace")]
    MetadataFormat {
        /// Controller.
        ctrl: String,
        /// Namespace.
        nsid: u32,
        /// Metadata bytes per LBA.
        metadata: u16,
    },

    /// A namespace with an LBA size outside 512..=4096 or not a power of two.
    #[error("{ctrl}: namespace {nsid} has a {lba_size}-byte LBA size; nvcopy supports 512 to 4096 bytes")]
    LbaSize {
        /// Controller.
        ctrl: String,
        /// Namespace.
        nsid: u32,
        /// Its LBA size.
        lba_size: u64,
    },

    /// A namespace whose size in bytes (NSZE times the block size) does not fit in 64 bits:
    /// the Identify data cannot be right.
    #[error("{ctrl}: namespace {nsid} reports {blocks} blocks of {lba_size} bytes, more than 2^64 bytes; its Identify Namespace data is not believable: check the device's firmware, or pick another namespace")]
    NamespaceTooLarge {
        /// Controller.
        ctrl: String,
        /// Namespace.
        nsid: u32,
        /// NSZE as reported.
        blocks: u64,
        /// Its LBA size.
        lba_size: u32,
    },

    /// No such active namespace.
    #[error("{ctrl}: no active namespace {nsid} (active: {active})")]
    NoNamespace {
        /// Controller.
        ctrl: String,
        /// Asked for.
        nsid: u32,
        /// Those that exist.
        active: String,
    },

    /// A buffer description that PRPs cannot express, or too small for the transfer.
    #[error("{ctrl}: bad data buffer: {reason}")]
    BadBuffer {
        /// Controller.
        ctrl: String,
        /// Why.
        reason: String,
    },

    /// The queue pair was disabled by an earlier timeout or fatal error.
    #[error("{ctrl}: queue {qid} is disabled after an earlier timeout or fatal error; reset the controller")]
    QueueDisabled {
        /// Controller.
        ctrl: String,
        /// Queue.
        qid: u16,
    },
}

/// The driver's result type.
pub type Result<T> = std::result::Result<T, Error>;
