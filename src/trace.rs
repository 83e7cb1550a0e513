//! `NVCOPY_TRACE=1`: how long each step of a run took, from `main` to the exit, on
//! stderr. Start-up and teardown are most of a short copy's wall time, and this says
//! which step to blame.
//!
//! Each line gives the time since the process called [`start`] (or first traced), and
//! either the time since the previous line (`+`, for steps that run one after another)
//! or how long a step that ran beside others took (`=`, for the per-device steps that
//! run in parallel threads).

use std::fmt::Display;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

struct Trace {
    on: bool,
    start: Instant,
    last: Mutex<Instant>,
}

static TRACE: OnceLock<Trace> = OnceLock::new();

fn trace() -> &'static Trace {
    TRACE.get_or_init(|| {
        let now = Instant::now();
        Trace {
            on: std::env::var_os("NVCOPY_TRACE").is_some_and(|v| v == "1"),
            start: now,
            last: Mutex::new(now),
        }
    })
}

/// Sets the time every line is measured from; call it first thing in `main`.
pub fn start() {
    trace();
}

/// Whether NVCOPY_TRACE=1.
pub fn on() -> bool {
    trace().on
}

/// A step that followed the previous one: prints the time since it.
pub fn step(what: impl Display) {
    let t = trace();
    if t.on {
        let now = Instant::now();
        let mut last = t.last.lock().unwrap_or_else(PoisonError::into_inner);
        eprintln!(
            "nvcopy: trace: {:>8.2} ms  (+{:.2} ms) {what}",
            ms(now - t.start),
            ms(now - *last)
        );
        *last = now;
    }
}

/// A step that began at `since`, beside others: prints how long it took.
pub fn span(since: Instant, what: impl Display) {
    let t = trace();
    if t.on {
        let now = Instant::now();
        eprintln!(
            "nvcopy: trace: {:>8.2} ms  (={:.2} ms) {what}",
            ms(now - t.start),
            ms(now - since)
        );
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
