//! nvcopy: a polled userspace NVMe bulk copier with the programming model of Linux's
//! dm-kcopyd. This crate holds the copier and the command-line tool; everything that
//! touches hardware lives in `drivers/` (`nvcopy-vfio`, `nvcopy-nvme`).
//!
//! ```no_run
//! use nvcopy::platform::PlatformOptions;
//! use nvcopy::{Client, Engine, EngineOptions, Flags, RegionSpec};
//!
//! # fn main() -> nvcopy::Result<()> {
//! let from: RegionSpec = "0000:00:10.0+1G".parse()?;
//! let to: Vec<RegionSpec> = vec!["0000:00:11.0".parse()?, "0000:00:12.0/2@4G".parse()?];
//! let addrs = [from.pci().unwrap(), to[0].pci().unwrap(), to[1].pci().unwrap()];
//! let platform = PlatformOptions { pool_bytes: 64 << 20, ..Default::default() };
//! let engine = Engine::open(&addrs, &platform, EngineOptions { reactors: 2, ..Default::default() })?;
//! let src = engine.region(&from, None)?;
//! let dests = to.iter().map(|r| engine.region(r, Some(src.len))).collect::<Result<Vec<_>, _>>()?;
//!
//! let client = Client::new(&engine, 1024)?; // kcopyd_client_create(num_pages)
//! let job = client.copy(&src, &dests, Flags::IGNORE_ERRORS, |read_err, write_err| {
//!     // kcopyd's callback: exactly once, on a reactor thread
//!     if read_err || write_err.any() {
//!         eprintln!("failed: read {read_err}, writes {write_err:?}");
//!     }
//! })?;
//! let outcome = job.wait(); // or client.copy_blocking(...)
//! assert!(!outcome.read_err);
//! client.zero(&dests, Flags::NONE, |_, _| {})?.wait(); // kcopyd_zero
//! drop(client); // waits for its jobs, like kcopyd_client_destroy
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod chunk;
pub mod client;
pub mod confine;
pub mod digest;
pub mod endpoint;
pub mod engine;
pub mod error;
pub mod job;
pub mod mapfile;
pub mod open;
mod pages;
pub mod platform;
pub mod progress;
mod reactor;
pub mod region;
pub mod trace;

pub use client::{Client, JobHandle, JobOptions};
pub use engine::{Engine, EngineOptions};
pub use error::{Error, OptionConflict, Refusal, Result};
pub use job::{CellState, DestMask, Flags, JobOutcome};
pub use region::{Region, RegionSpec};
