//! The statuses the software controller completes commands with (base spec 4.6.1, NVM
//! command set spec 3.4), and the result type command handlers return.

use nvcopy_nvme::Status;

/// Builds a status field: SC in bits 7:0, SCT in 10:8, DNR in 14.
const fn status(sct: u8, sc: u8, dnr: bool) -> Status {
    Status(sc as u16 | (sct as u16) << 8 | (dnr as u16) << 14)
}

pub const SUCCESS: Status = status(0, 0x00, false);
pub const INVALID_OPCODE: Status = status(0, 0x01, true);
pub const INVALID_FIELD: Status = status(0, 0x02, true);
pub const DATA_TRANSFER_ERROR: Status = status(0, 0x04, false);
pub const INTERNAL_ERROR: Status = status(0, 0x06, false);
pub const ABORTED_SQ_DELETED: Status = status(0, 0x08, false);
pub const INVALID_NAMESPACE: Status = status(0, 0x0b, true);
pub const PRP_OFFSET_INVALID: Status = status(0, 0x13, true);
pub const LBA_OUT_OF_RANGE: Status = status(0, 0x80, true);

pub const COMPLETION_QUEUE_INVALID: Status = status(1, 0x00, true);
pub const INVALID_QUEUE_ID: Status = status(1, 0x01, true);
pub const INVALID_QUEUE_SIZE: Status = status(1, 0x02, true);
pub const INVALID_QUEUE_DELETION: Status = status(1, 0x0c, true);
/// Copy: NR above MSRC, a range above MSSRL or a total above MCL.
pub const COMMAND_SIZE_LIMIT_EXCEEDED: Status = status(1, 0x83, true);

/// Write Fault (media error), with or without DNR.
pub const fn write_fault(dnr: bool) -> Status {
    status(2, 0x80, dnr)
}
/// Unrecovered Read Error (media error), with or without DNR.
pub const fn unrecovered_read_error(dnr: bool) -> Status {
    status(2, 0x81, dnr)
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
