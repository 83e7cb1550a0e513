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

    /// Registers read as all ones: the device is gone or not responding.
    #[error("{ctrl}: registers read as all ones: the device is not responding (surprise removal or a failed reset); check it is still there (`nvcopy list`), reset it with `scripts/setup.sh reset` and bind it again")]
    NotResponding {
        /// Controller.
        ctrl: String,
    },

    /// CAP.CSS does not offer the NVM command set.
    #[error("{ctrl}: unsupported controller: does not support the NVM command set (CAP.CSS); nvcopy copies NVM namespaces only")]
    NotNvm {
        /// Controller.
        ctrl: String,
    },

    /// CAP.MPSMIN is above the 4 KiB pages nvcopy uses.
    #[error(
        "{ctrl}: unsupported controller: smallest memory page is {min} bytes; nvcopy uses 4096"
    )]
    PageSizeUnsupported {
        /// Controller.
        ctrl: String,
        /// CAP.MPSMIN in bytes.
        min: usize,
    },

    /// CAP.MQES below the specification's minimum of two entries.
    #[error("{ctrl}: unsupported controller: CAP.MQES reports queues of at most {entries} entry; the NVMe specification requires at least 2. The device is out of spec: update its firmware or use another controller")]
    QueueTooSmall {
        /// Most entries per queue, as reported (MQES + 1).
        entries: u32,
        /// Controller.
        ctrl: String,
    },

    /// BAR0 is too small to hold a queue's doorbells.
    #[error("{ctrl}: unsupported controller: BAR0 ({bar_len:#x} bytes) has no room for the doorbells of queue {qid}")]
    BarTooSmall {
        /// Controller.
        ctrl: String,
        /// BAR0's length.
        bar_len: usize,
        /// The queue whose doorbells lie outside it.
        qid: u16,
    },

    /// Every I/O queue pair the controller granted is in use.
    #[error("{ctrl}: all {granted} I/O queue pairs the controller granted are in use: use fewer reactors (--cores) or close other queue pairs")]
    NoFreeQueue {
        /// Controller.
        ctrl: String,
        /// Queue pairs granted by Set Features (Number of Queues).
        granted: usize,
    },

    /// After a reset the controller granted fewer I/O queue pairs than before, so the
    /// queues in use cannot all be recreated.
    #[error("{ctrl}: granted {granted} I/O queue pairs after a reset, {before} before; the controller cannot carry on the job: reset it with `scripts/setup.sh reset` and run again")]
    QueuesShrank {
        /// Controller.
        ctrl: String,
        /// Granted now.
        granted: usize,
        /// In use before the reset.
        before: usize,
    },

    /// The controller broke the protocol in a way nvcopy cannot recover from.
    #[error("{ctrl}: protocol violation: {what} (device bug); reset the controller")]
    ProtocolViolation {
        /// Controller.
        ctrl: String,
        /// What it did.
        what: &'static str,
    },

    /// An optional command the controller does not offer (ONCS, or Copy without
    /// descriptor format 0).
    #[error("{ctrl}: {cmd} is not supported (ONCS)")]
    CommandUnsupported {
        /// Controller.
        ctrl: String,
        /// The command.
        cmd: &'static str,
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

    /// The submission queue is full: reap completions before posting more. Carries no
    /// controller name, so that returning it on the hot path allocates nothing.
    #[error("submission queue {qid} is full: reap completions before posting more")]
    QueueFull {
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
