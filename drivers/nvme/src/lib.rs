//! nvcopy's NVMe driver: the specification's structures, typed registers, polled queue
//! pairs with command trackers, controller bring-up and shutdown, admin commands and the
//! NVM command set's I/O commands, over the memory and registers that `nvcopy-vfio`
//! provides. It knows nothing about copying.

mod controller;
mod error;
mod identify;
mod io;
pub mod prp;
mod queue;
mod regs;
pub mod spec;
mod status;
mod sync;
pub mod zns;

pub use controller::{Controller, ControllerOptions, Health};
pub use error::{Error, Result};
pub use identify::{ControllerInfo, Namespace};
pub use io::{IoQpair, Recovery, MAX_NLB, MAX_RETRY_DELAY};
pub use prp::DataPtr;
pub use queue::{Completion, Expired};
pub use regs::Bar;
pub use status::{Status, StatusCodeType, StatusKind};
