//! The statuses the software controller completes commands with (base spec 4.6.1, NVM
//! command set spec 3.4), and the result type command handlers return.

use nvcopy_nvme::{Status, StatusKind};

/// A status from the driver's one table (`Status::of`), so that the model and the driver
/// cannot disagree on a code: the model only decides which status a command earns, and
/// whether Do Not Retry is set.
const fn status(kind: StatusKind, dnr: bool) -> Status {
    Status::of(kind, dnr)
}

pub const SUCCESS: Status = status(StatusKind::Success, false);
pub const INVALID_OPCODE: Status = status(StatusKind::InvalidOpcode, true);
pub const INVALID_FIELD: Status = status(StatusKind::InvalidField, true);
pub const DATA_TRANSFER_ERROR: Status = status(StatusKind::DataTransferError, false);
pub const INTERNAL_ERROR: Status = status(StatusKind::InternalError, false);
pub const ABORTED_SQ_DELETED: Status = status(StatusKind::AbortedSqDeleted, false);
pub const INVALID_NAMESPACE: Status = status(StatusKind::InvalidNamespace, true);
pub const PRP_OFFSET_INVALID: Status = status(StatusKind::PrpOffsetInvalid, true);
pub const LBA_OUT_OF_RANGE: Status = status(StatusKind::LbaOutOfRange, true);

pub const COMPLETION_QUEUE_INVALID: Status = status(StatusKind::CompletionQueueInvalid, true);
pub const INVALID_QUEUE_ID: Status = status(StatusKind::InvalidQueueId, true);
pub const INVALID_QUEUE_SIZE: Status = status(StatusKind::InvalidQueueSize, true);
pub const INVALID_QUEUE_DELETION: Status = status(StatusKind::InvalidQueueDeletion, true);
/// Copy: NR above MSRC, a range above MSSRL or a total above MCL.
pub const COMMAND_SIZE_LIMIT_EXCEEDED: Status = status(StatusKind::CommandSizeLimitExceeded, true);

/// Write Fault (media error), with or without DNR.
pub const fn write_fault(dnr: bool) -> Status {
    status(StatusKind::WriteFault, dnr)
}
/// Unrecovered Read Error (media error), with or without DNR.
pub const fn unrecovered_read_error(dnr: bool) -> Status {
    status(StatusKind::UnrecoveredReadError, dnr)
}

/// How a command ended: its status and Dword 0 of the completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub status: Status,
    pub dw0: u32,
}

impl Done {
    /// A failure whose completion carries `dw0` (Copy reports the failed range there).
    pub fn with_dw0(status: Status, dw0: u32) -> Done {
        Done { status, dw0 }
    }
}

impl From<Status> for Done {
    fn from(status: Status) -> Done {
        Done { status, dw0: 0 }
    }
}

/// What a command handler returns: Dword 0 on success.
pub type Exec = Result<u32, Done>;

/// Folds a handler's result into the completion to post.
pub fn finish(r: Exec) -> Done {
    match r {
        Ok(dw0) => Done {
            status: SUCCESS,
            dw0,
        },
        Err(d) => d,
    }
}
