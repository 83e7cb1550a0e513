//! nvcopy: a polled userspace NVMe bulk copier with the programming model of Linux's
//! dm-kcopyd. This crate holds the copier and the command-line tool; everything that
//! touches hardware lives in `drivers/` (`nvcopy-vfio`, `nvcopy-nvme`).
#![forbid(unsafe_code)]

pub mod error;
pub mod pipeline;
pub mod platform;
pub mod readbench;
pub mod region;
pub mod report;

pub use error::{Error, Result};
