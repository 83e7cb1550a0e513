//! The NVMe completion status field (base spec 4.6.1), typed: status code type, status
//! code, Command Retry Delay index, More and Do Not Retry.

use std::fmt;

/// The 15-bit status field of a CQE (the CQE's status word shifted past the phase bit).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

/// Status Code Types (base spec 4.6.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusCodeType {
    /// Generic command status.
    Generic,
    /// Command-specific status.
    CommandSpecific,
    /// Media and data integrity errors.
    MediaError,
    /// Path-related status.
    Path,
    /// Vendor specific.
    Vendor,
    /// Reserved values.
    Reserved(u8),
}

/// The statuses nvcopy tells apart. Everything else is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusKind {
    /// Successful Completion.
    Success,
    /// Invalid Command Opcode.
    InvalidOpcode,
    /// Invalid Field in Command.
    InvalidField,
    /// Data Transfer Error.
    DataTransferError,
    /// Internal Error.
    InternalError,
    /// Command Abort Requested.
    AbortRequested,
    /// Command Aborted due to SQ Deletion.
    AbortedSqDeleted,
    /// Invalid Namespace or Format.
    InvalidNamespace,
    /// LBA Out of Range.
    LbaOutOfRange,
    /// Capacity Exceeded.
    CapacityExceeded,
    /// Namespace Not Ready.
    NamespaceNotReady,
    /// Write Fault.
    WriteFault,
    /// Unrecovered Read Error.
    UnrecoveredReadError,
    /// Access Denied.
    AccessDenied,
    /// Invalid Queue Identifier (Create queue commands).
    InvalidQueueId,
    /// Invalid Queue Size.
    InvalidQueueSize,
    /// PRP Offset Invalid.
    PrpOffsetInvalid,
    /// Completion Queue Invalid (Create I/O SQ).
    CompletionQueueInvalid,
    /// Invalid Queue Deletion.
    InvalidQueueDeletion,
    /// Command Size Limit Exceeded (Copy).
    CommandSizeLimitExceeded,
    /// Anything else.
    Other,
}

/// The one table of the statuses nvcopy tells apart: kind, (SCT, SC), and the spec's name
/// (base spec 4.6.1.2; NVM command set spec for LBA Out of Range and Command Size Limit
/// Exceeded). The driver decodes with it and the software controller encodes with it.
const TABLE: [(StatusKind, u8, u8, &str); 20] = {
    use StatusKind::*;
    [
        (Success, 0, 0x00, "Successful Completion"),
        (InvalidOpcode, 0, 0x01, "Invalid Command Opcode"),
        (InvalidField, 0, 0x02, "Invalid Field in Command"),
        (DataTransferError, 0, 0x04, "Data Transfer Error"),
        (InternalError, 0, 0x06, "Internal Error"),
        (AbortRequested, 0, 0x07, "Command Abort Requested"),
        (
            AbortedSqDeleted,
            0,
            0x08,
            "Command Aborted due to SQ Deletion",
        ),
        (InvalidNamespace, 0, 0x0b, "Invalid Namespace or Format"),
        (PrpOffsetInvalid, 0, 0x13, "PRP Offset Invalid"),
        (LbaOutOfRange, 0, 0x80, "LBA Out of Range"),
        (CapacityExceeded, 0, 0x81, "Capacity Exceeded"),
        (NamespaceNotReady, 0, 0x82, "Namespace Not Ready"),
        (CompletionQueueInvalid, 1, 0x00, "Completion Queue Invalid"),
        (InvalidQueueId, 1, 0x01, "Invalid Queue Identifier"),
        (InvalidQueueSize, 1, 0x02, "Invalid Queue Size"),
        (InvalidQueueDeletion, 1, 0x0c, "Invalid Queue Deletion"),
        (
            CommandSizeLimitExceeded,
            1,
            0x83,
            "Command Size Limit Exceeded",
        ),
        (WriteFault, 2, 0x80, "Write Fault"),
        (UnrecoveredReadError, 2, 0x81, "Unrecovered Read Error"),
        (AccessDenied, 2, 0x86, "Access Denied"),
    ]
};

impl StatusKind {
    /// The (SCT, SC) pair of this status; None for [`StatusKind::Other`].
    pub const fn code(self) -> Option<(u8, u8)> {
        let mut i = 0;
        while i < TABLE.len() {
            if TABLE[i].0 as u8 == self as u8 {
                return Some((TABLE[i].1, TABLE[i].2));
            }
            i += 1;
        }
        None
    }
    /// The spec's name for the status ("status" for anything else).
    pub fn name(self) -> &'static str {
        TABLE.iter().find(|e| e.0 == self).map_or("status", |e| e.3)
    }
}

impl Status {
    /// The status of `kind`, with or without Do Not Retry ([`StatusKind::Other`] gives a
    /// vendor-specific code, SCT 7h SC FFh).
    pub const fn of(kind: StatusKind, dnr: bool) -> Status {
        match kind.code() {
            Some((sct, sc)) => Status::new(sct, sc).with_dnr(dnr),
            None => Status::new(7, 0xff).with_dnr(dnr),
        }
    }

    /// Command Aborted due to SQ Deletion (generic, SC 08h): what the driver reports for a
    /// command it stopped waiting for because its queue was torn down by a reset.
    pub const ABORTED_SQ_DELETED: Status = Status::of(StatusKind::AbortedSqDeleted, false);

    /// A status from its Status Code Type and Status Code (base spec 4.6.1), with no CRD,
    /// More or DNR; add those with [`Status::with_dnr`] and [`Status::with_crd`].
    pub const fn new(sct: u8, sc: u8) -> Status {
        Status(sc as u16 | ((sct & 7) as u16) << 8)
    }
    /// The same status with Do Not Retry set or cleared.
    pub const fn with_dnr(self, dnr: bool) -> Status {
        Status(self.0 & !(1 << 14) | (dnr as u16) << 14)
    }
    /// The same status with Command Retry Delay `crd` (0 to 3; only the low two bits
    /// count): 0 asks for a retry at once, 1-3 for the delay in Identify Controller's
    /// CRDT1-3.
    pub const fn with_crd(self, crd: u8) -> Status {
        Status(self.0 & !(3 << 11) | ((crd & 3) as u16) << 11)
    }
    /// From the raw 16-bit CQE status word (bit 0 is the phase tag).
    pub fn from_cqe_word(word: u16) -> Status {
        Status(word >> 1)
    }
    /// Status Code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }
    /// Status Code Type, raw.
    pub fn sct_raw(self) -> u8 {
        (self.0 >> 8 & 7) as u8
    }
    /// Status Code Type.
    pub fn sct(self) -> StatusCodeType {
        match self.sct_raw() {
            0 => StatusCodeType::Generic,
            1 => StatusCodeType::CommandSpecific,
            2 => StatusCodeType::MediaError,
            3 => StatusCodeType::Path,
            7 => StatusCodeType::Vendor,
            r => StatusCodeType::Reserved(r),
        }
    }
    /// Command Retry Delay index into the controller's CRDT table (0: retry at once).
    pub fn crd(self) -> u8 {
        (self.0 >> 11 & 3) as u8
    }
    /// More status information in the Error Information log.
    pub fn more(self) -> bool {
        self.0 >> 13 & 1 == 1
    }
    /// Do Not Retry: the same command will fail again.
    pub fn dnr(self) -> bool {
        self.0 >> 14 & 1 == 1
    }
    /// Whether the command succeeded.
    pub fn is_success(self) -> bool {
        self.sct_raw() == 0 && self.sc() == 0
    }
    /// Which status this is.
    pub fn kind(self) -> StatusKind {
        let code = (self.sct_raw(), self.sc());
        TABLE
            .iter()
            .find(|e| (e.1, e.2) == code)
            .map_or(StatusKind::Other, |e| e.0)
    }
    /// The spec's name for the status.
    pub fn name(self) -> &'static str {
        self.kind().name()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (SCT {:x}h, SC {:02x}h",
            self.name(),
            self.sct_raw(),
            self.sc()
        )?;
        if self.dnr() {
            write!(f, ", DNR")?;
        }
        if self.more() {
            write!(f, ", More")?;
        }
        if self.crd() != 0 {
            write!(f, ", CRD {}", self.crd())?;
        }
        write!(f, ")")
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_table_round_trips_and_has_no_duplicate_codes() {
        let mut codes = std::collections::HashSet::new();
        for (kind, sct, sc, name) in TABLE {
            assert!(codes.insert((sct, sc)), "{name}: code listed twice");
            for dnr in [false, true] {
                let st = Status::of(kind, dnr);
                assert_eq!((st.kind(), st.dnr(), st.name()), (kind, dnr, name));
            }
            assert_eq!(kind.code(), Some((sct, sc)));
        }
        assert_eq!(StatusKind::Other.code(), None);
        assert_eq!(
            Status::of(StatusKind::Other, false).kind(),
            StatusKind::Other
        );
    }

    use super::*;

    #[test]
    fn decodes_the_status_word() {
        // Unrecovered Read Error with DNR, phase bit set: SCT 2, SC 0x81.
        let word = (1 << 15) | (2 << 9) | (0x81 << 1) | 1;
        let s = Status::from_cqe_word(word);
        assert_eq!(s.kind(), StatusKind::UnrecoveredReadError);
        assert_eq!(s.sct(), StatusCodeType::MediaError);
        assert!(s.dnr() && !s.more() && !s.is_success());
        assert_eq!(
            s.to_string(),
            "Unrecovered Read Error (SCT 2h, SC 81h, DNR)"
        );
        let lba = Status(0x80);
        assert_eq!(lba.kind(), StatusKind::LbaOutOfRange);
        assert_eq!(Status(2 << 11).crd(), 2);
        assert!(Status(0).is_success());
        let built = Status::new(2, 0x81).with_dnr(true).with_crd(3);
        assert_eq!(
            (built.sct_raw(), built.sc(), built.dnr(), built.crd()),
            (2, 0x81, true, 3)
        );
        assert_eq!(
            built.with_crd(1).with_dnr(false),
            Status::new(2, 0x81).with_crd(1)
        );
        assert_eq!(built.kind(), StatusKind::UnrecoveredReadError);
    }
}
