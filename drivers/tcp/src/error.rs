//! The NVMe/TCP transport's one error type. Every variant names the target (host, port,
//! subsystem NQN) and, where there is one, the queue and command.

use nvcopy_nvme::Status;

use crate::pdu::PduError;

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong reaching or driving an NVMe/TCP controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host name did not resolve.
    #[error("nvme+tcp://{target}: cannot resolve the host: {source}")]
    Resolve {
        /// host:port/nqn.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TCP connection was refused or timed out.
    #[error("nvme+tcp://{target}: cannot connect queue {qid}: {source}{hint}")]
    Connect {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// Why.
        source: std::io::Error,
        /// What to check.
        hint: &'static str,
    },
    /// A socket call failed on an established connection.
    #[error("nvme+tcp://{target}: queue {qid}: {what}: {source}")]
    Io {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The controller closed the connection.
    #[error("nvme+tcp://{target}: queue {qid}: the controller closed the connection{during}")]
    Closed {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// What was outstanding.
        during: String,
    },
    /// A malformed or unexpected PDU.
    #[error(
        "nvme+tcp://{target}: queue {qid}: bad PDU from the controller: {source}; connection ended"
    )]
    Pdu {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// What was wrong.
        source: PduError,
    },
    /// A PDU naming a command that is not outstanding, or not of the right kind.
    #[error("nvme+tcp://{target}: queue {qid}: {what} names command {cid}, which {why}; connection ended")]
    UnknownCommand {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// "Response Capsule", "C2H Data", "R2T".
        what: &'static str,
        /// Command id.
        cid: u16,
        /// Why it does not fit.
        why: &'static str,
    },
    /// A data PDU out of the command's range or order.
    #[error("nvme+tcp://{target}: queue {qid}: {what} for command {cid} covers bytes {offset}..{end}, but {why}; connection ended")]
    DataRange {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// "C2H Data", "R2T".
        what: &'static str,
        /// Command id.
        cid: u16,
        /// First byte.
        offset: u64,
        /// End.
        end: u64,
        /// What was expected.
        why: String,
    },
    /// The controller sent a Terminate Connection Request.
    #[error("nvme+tcp://{target}: queue {qid}: the controller terminated the connection (fatal error status {fes:#x}, information {fei:#x})")]
    Terminated {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// Connect was refused: wrong subsystem NQN, host not allowed, queue refused.
    #[error("nvme+tcp://{target}: Connect of queue {qid} refused: {status}{hint}")]
    ConnectRefused {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// The status.
        status: Status,
        /// What to check.
        hint: &'static str,
    },
    /// An admin or Fabrics command failed.
    #[error("nvme+tcp://{target}: {what} (command {cid}) failed: {status}")]
    Command {
        /// host:port/nqn.
        target: String,
        /// Which command.
        what: &'static str,
        /// Command id.
        cid: u16,
        /// The status.
        status: Status,
    },
    /// A wait on the controller ran out.
    #[error("nvme+tcp://{target}: queue {qid}: {what} did not happen within {waited:?}")]
    Timeout {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// What was waited for.
        what: &'static str,
        /// How long.
        waited: std::time::Duration,
    },
    /// The controller reported a fatal status (CSTS.CFS) or refuses what nvcopy needs.
    /// A lost connection could not be made again in time.
    #[error("nvme+tcp://{target}: queue {qid}: the connection was lost and could not be made again within {waited:.1?} ({attempts} attempts; last: {last}): check that the target and its port are up (nvmet: /sys/kernel/config/nvmet/ports), or give a longer --io-timeout")]
    ReconnectFailed {
        /// host:port/nqn.
        target: String,
        /// Queue id.
        qid: u16,
        /// Connection attempts made.
        attempts: u32,
        /// Time spent.
        waited: std::time::Duration,
        /// The last attempt's error.
        last: String,
    },
    /// After a reconnect the subsystem serves other namespaces than before.
    #[error("nvme+tcp://{target}: after reconnecting, the namespaces differ from those the job started on (then: {was}; now: {now}): it does not go on against other media")]
    Changed {
        /// host:port/nqn.
        target: String,
        /// The namespaces at the first bring-up.
        was: String,
        /// The namespaces now.
        now: String,
    },
    #[error("nvme+tcp://{target}: {why}")]
    Controller {
        /// host:port/nqn.
        target: String,
        /// What.
        why: String,
    },
    /// The namespace is not active on the controller.
    #[error("nvme+tcp://{target}: namespace {nsid} is not active (active: {active:?})")]
    NoNamespace {
        /// host:port/nqn.
        target: String,
        /// Namespace id asked for.
        nsid: u32,
        /// Active namespace ids.
        active: Vec<u32>,
    },
    /// A Discovery log that could not be read consistently, or is in a format nvcopy
    /// does not know.
    #[error("nvme+tcp://{target}: Discovery log: {problem}")]
    DiscoveryLog {
        /// host:port/nqn of the discovery controller.
        target: String,
        /// What was wrong.
        problem: crate::discovery::LogProblem,
    },
    /// Every I/O queue the controller granted is in use.
    #[error("nvme+tcp://{target}: the controller granted {granted} I/O queues, all in use; use fewer --cores")]
    NoQueue {
        /// host:port/nqn.
        target: String,
        /// Granted.
        granted: u16,
    },
}

impl Error {
    /// Whether the connection that reported this is unusable from now on.
    pub fn ends_connection(&self) -> bool {
        !matches!(self, Error::Command { .. } | Error::ConnectRefused { .. })
    }
}
