//! The copier crate's error type: the drivers' errors, plus what the copier and CLI
//! themselves refuse.

/// Errors from nvcopy's library and command-line tool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// VFIO, sysfs or DMA memory.
    #[error(transparent)]
    Platform(#[from] nvcopy_vfio::Error),
    /// An NVMe controller or command.
    #[error(transparent)]
    Nvme(#[from] nvcopy_nvme::Error),
    /// Bad input from the user, found before any I/O.
    #[error("{0}")]
    Usage(String),
    /// The copy ran but some chunks failed; the summary says which destinations.
    #[error("the copy did not complete: see the summary above")]
    CopyFailed,
    /// The progress map.
    #[error(transparent)]
    Map(#[from] crate::mapfile::MapError),
    /// SIGINT or SIGTERM stopped the job; the summary says how far it got.
    #[error("interrupted by signal {signal}: see the summary above")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// A reactor could not install its seccomp filter.
    #[error("reactor {reactor} could not install its seccomp filter: {reason}; run with --no-seccomp to copy without it")]
    Seccomp {
        /// The reactor.
        reactor: usize,
        /// What seccompiler or the kernel said.
        reason: String,
    },
    /// Writing output failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// The copier crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
