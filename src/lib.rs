//! nvcopy: a polled userspace NVMe bulk copier with the programming model of Linux's
//! dm-kcopyd. This crate holds the copier and the command-line tool; everything that
//! touches hardware lives in `drivers/` (`nvcopy-vfio`, `nvcopy-nvme`).
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod engine;
pub mod error;
pub mod job;
mod pages;
pub mod platform;
mod reactor;
pub mod readbench;
pub mod region;
pub mod report;

pub use client::{Client, JobHandle};
pub use engine::{Engine, EngineOptions};
pub use error::{Error, Result};
pub use job::{DestMask, Flags, JobOutcome};
pub use region::{Region, RegionSpec};
