//! nvcopy's NVMe/TCP transport: a userspace NVMe over Fabrics host (initiator) written
//! to the NVMe/TCP transport specification, for the Linux nvmet target or any other.
//!
//! - [`pdu`]: the PDU layouts (compile-time size checks), encoders for what a host sends,
//!   a parser for what a controller sends that refuses malformed headers with typed
//!   errors, and the CRC32C digests.
//! - [`fuzz`]: the PDU parsers under arbitrary input with their invariants checked, for
//!   the cargo-fuzz target in `fuzz/` and a corpus test that runs in every CI run.
//! - [`cmd`]: Fabrics (Connect, Property Get/Set), admin and NVM submission entries.
//! - [`Queue`]: one connection, driven without blocking from a polling loop: capsules
//!   and H2C Data are sent straight from DMA-pool pages, C2H Data received straight into
//!   them, with no copy through a temporary buffer.
//! - [`Controller`]: the admin queue, bring-up as the PCIe state machine (CC.EN, CSTS.RDY),
//!   Keep Alive, I/O queue connection, shutdown, and reconnection: a queue whose
//!   connection ended (or whose association's Keep Alive failed) is connected again by
//!   the controller's service thread, under a new association when its own is the one
//!   lost, for as long as [`Options::reconnect_for`] allows.
//! - [`discovery`]: a discovery controller's log (Get Log Page 70h): which subsystems a
//!   target offers, and on which addresses.
//!
//! All unsafe code is in `sock` (scatter/gather socket calls).

pub mod cmd;
mod ctrl;
pub mod discovery;
mod error;
pub mod fuzz;
pub mod pdu;
mod queue;
mod sock;

pub use ctrl::{Controller, Options, Target};
pub use error::{Error, Result};
pub use queue::{Completion, Counters, Data, Dir, Outcome, Queue, SubmitError};
