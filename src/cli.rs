//! What `nvcopy copy` and `nvcopy zero` do between parsing and printing: open the engine,
//! resolve and check every region before any I/O, run the job with a progress display,
//! and summarise it.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use nvcopy_vfio::PciAddress;
use serde::Serialize;

use crate::client::{Client, JobHandle};
use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::job::{Flags, JobOutcome};
use crate::platform::PlatformOptions;
use crate::region::{Region, RegionSpec, MAX_DESTS};
use crate::report::human_bytes;

/// A copy or zero as the command line asked for it.
#[derive(Clone, Debug)]
pub struct JobRequest {
    /// Source, or None for `zero`.
    pub from: Option<RegionSpec>,
    /// Destinations.
    pub to: Vec<RegionSpec>,
    /// Job flags.
    pub flags: Flags,
    /// Pages the client reserves (0: enough for every chunk in flight).
    pub num_pages: usize,
}

/// The summary printed at the end (`--json` prints it as is).
#[derive(Debug, Serialize)]
pub struct Summary {
    /// "copy" or "zero".
    pub operation: &'static str,
    /// The source, for copies.
    pub source: Option<String>,
    /// The destinations, in order (bit i of `write_err` is `destinations[i]`).
    pub destinations: Vec<String>,
    /// Bytes the job covers.
    pub bytes_total: u64,
    /// From submission to the callback, seconds.
    pub elapsed: f64,
    /// bytes_total / elapsed, in MB/s (10^6).
    pub rate_mb_s: f64,
    /// Reactors used.
    pub reactors: usize,
    /// Destinations that had a failed write.
    pub failed_destinations: Vec<String>,
    /// What the callback got, and the counts.
    #[serde(flatten)]
    pub outcome: JobOutcome,
}

impl Summary {
    /// Whether every byte reached every destination.
    pub fn ok(&self) -> bool {
        !self.outcome.read_err && !self.outcome.write_err.any() && self.outcome.failed_chunks == 0
    }

    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut t = format!(
            "{} {} to {} destination(s) in {:.2} s, {:.0} MB/s ({} reactor(s))\n",
            if self.operation == "copy" {
                "copied"
            } else {
                "zeroed"
            },
            human_bytes(self.outcome.bytes_ok),
            self.destinations.len(),
            self.elapsed,
            self.rate_mb_s,
            self.reactors
        );
        if self.outcome.read_err {
            t += "read errors on the source: the chunks that could not be read were not written\n";
        }
        for f in &self.failed_destinations {
            t += &format!("write errors on destination {f}\n");
        }
        if let Some(e) = &self.outcome.first_error {
            t += &format!("first error: {e}\n");
        }
        t += if self.ok() {
            "result: ok\n"
        } else {
            "result: FAILED\n"
        };
        t
    }
}

/// Most 4 KiB pages a client may reserve (`--num-pages`): page indices are 32-bit, and
/// that is already 16 TiB of pinned DMA memory.
pub const MAX_NUM_PAGES: usize = u32::MAX as usize;

fn check_num_pages(num_pages: usize) -> Result<()> {
    if num_pages > MAX_NUM_PAGES {
        return Err(Error::Usage(format!(
            "--num-pages {num_pages} is too many: a client reserves at most {MAX_NUM_PAGES} 4 KiB pages (16 TiB), and they must fit in memory; give fewer, or leave --num-pages out for enough for every chunk in flight"
        )));
    }
    Ok(())
}

/// Refuses requests that are wrong whatever the devices say.
pub fn precheck(req: &JobRequest) -> Result<()> {
    check_num_pages(req.num_pages)?;
    if req.to.is_empty() {
        return Err(Error::Usage(
            "give at least one destination with --to".into(),
        ));
    }
    if req.to.len() > MAX_DESTS {
        return Err(Error::Usage(format!(
            "{} destinations given; a job takes at most {MAX_DESTS}",
            req.to.len()
        )));
    }
    Ok(())
}

/// Resolves every region, refusing bad ones, before the job is submitted.
pub fn resolve(engine: &Engine, req: &JobRequest) -> Result<(Option<Region>, Vec<Region>)> {
    let from = req
        .from
        .as_ref()
        .map(|s| engine.region(s, None))
        .transpose()?;
    let default_len = from.map(|f| f.len);
    let mut to = Vec::with_capacity(req.to.len());
    for spec in &req.to {
        let d = engine.region(spec, default_len)?;
        if let (Some(f), Some(src)) = (&from, &req.from) {
            if d.len != f.len {
                return Err(Error::Usage(format!(
                    "destination {spec} is {} bytes but the source {src} is {}: give them the same length",
                    d.len, f.len
                )));
            }
            if d.overlaps_in(f, engine.controllers()) {
                return Err(Error::Usage(format!("destination {spec} overlaps the source {src}: nvcopy never writes over the data it reads")));
            }
        } else if let Some(first) = to.first().map(|r: &Region| r.len) {
            if d.len != first {
                return Err(Error::Usage(format!("destination {spec} is {} bytes but the first is {first}: give them the same length", d.len)));
            }
        }
        if let Some(j) = to
            .iter()
            .position(|o: &Region| o.overlaps_in(&d, engine.controllers()))
        {
            return Err(Error::Usage(format!(
                "destinations {} and {spec} overlap",
                req.to[j]
            )));
        }
        to.push(d);
    }
    Ok((from, to))
}

/// Pool bytes for an engine: the client's pages plus each reactor's chunk descriptors,
/// zero page and queue memory (rings and one PRP list page per queue entry). Refuses
/// sizes that do not fit in the address space rather than wrapping.
pub fn pool_bytes(num_pages: usize, eo: &EngineOptions, controllers: usize) -> Result<usize> {
    check_num_pages(num_pages)?;
    let per_queue = (eo.queue_entries as usize).checked_mul(64 + 16 + 4096);
    let per_reactor = eo
        .qd
        .checked_add(1)
        .and_then(|n| n.checked_mul(4096))
        .zip(per_queue.and_then(|q| q.checked_mul(controllers)))
        .and_then(|(descs, queues)| descs.checked_add(queues));
    num_pages
        .checked_mul(4096)
        .zip(per_reactor.and_then(|r| r.checked_mul(eo.reactors)))
        .and_then(|(pages, reactors)| pages.checked_add(reactors))
        .and_then(|b| b.checked_add(4 << 20))
        .ok_or_else(|| {
            Error::Usage(format!(
                "a DMA pool for {num_pages} pages, {} reactor(s) of queue depth {} and {controllers} controller(s) does not fit in memory: lower --num-pages, --cores or --qd",
                eo.reactors, eo.qd
            ))
        })
}

/// Runs a copy or zero job end to end.
pub fn run(
    req: &JobRequest,
    platform: &PlatformOptions,
    eo: &EngineOptions,
    show_progress: bool,
) -> Result<Summary> {
    precheck(req)?;
    let mut addrs: Vec<PciAddress> = req
        .from
        .iter()
        .chain(req.to.iter())
        .map(|r| r.addr)
        .collect();
    addrs.sort();
    addrs.dedup();
    let num_pages = if req.num_pages > 0 {
        req.num_pages
    } else {
        eo.qd * eo.reactors * (eo.chunk / 4096).max(1)
    };
    let mut po = platform.clone();
    po.pool_bytes = pool_bytes(num_pages, eo, addrs.len())?;
    let engine = Engine::open(&addrs, &po, eo.clone())?;
    let (from, to) = resolve(&engine, req)?;
    let client = Client::new(&engine, num_pages)?;
    let start = Instant::now();
    let handle = match &from {
        Some(f) => client.copy(f, &to, req.flags, |_, _| {})?,
        None => client.zero(&to, req.flags, |_, _| {})?,
    };
    let outcome = watch(&handle, show_progress);
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Summary {
        operation: if from.is_some() { "copy" } else { "zero" },
        source: req.from.map(|s| s.to_string()),
        destinations: req.to.iter().map(|r| r.to_string()).collect(),
        bytes_total: handle.len(),
        elapsed,
        rate_mb_s: handle.len() as f64 / elapsed.max(1e-9) / 1e6,
        reactors: engine.options().reactors,
        failed_destinations: req
            .to
            .iter()
            .enumerate()
            .filter(|(i, _)| outcome.write_err.contains(*i))
            .map(|(_, r)| r.to_string())
            .collect(),
        outcome,
    })
}

/// Waits for the job: a progress bar on a terminal, a plain line every few seconds
/// otherwise, nothing when not asked.
fn watch(handle: &JobHandle, show_progress: bool) -> JobOutcome {
    if !show_progress {
        return handle.wait();
    }
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(handle.len());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        loop {
            if let Some(o) = handle.wait_timeout(Duration::from_millis(100)) {
                bar.finish_and_clear();
                return o;
            }
            bar.set_position(handle.bytes_done());
        }
    }
    let start = Instant::now();
    loop {
        if let Some(o) = handle.wait_timeout(Duration::from_secs(2)) {
            return o;
        }
        let done = handle.bytes_done();
        let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-9);
        let eta = (handle.len() - done) as f64 / rate.max(1.0);
        eprintln!(
            "nvcopy: {} of {} ({:.0}%), {:.0} MB/s, eta {eta:.0} s",
            human_bytes(done),
            human_bytes(handle.len()),
            done as f64 * 100.0 / handle.len() as f64,
            rate / 1e6
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(num_pages: usize) -> JobRequest {
        JobRequest {
            from: None,
            to: vec!["0000:00:10.0".parse().unwrap()],
            flags: Flags::NONE,
            num_pages,
        }
    }

    #[test]
    fn num_pages_that_would_overflow_the_pool_size_are_refused() {
        let eo = EngineOptions::default();
        let huge = 1usize << 52;
        for n in [huge, usize::MAX, MAX_NUM_PAGES + 1] {
            let e = pool_bytes(n, &eo, 2).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{e}");
            assert!(e.to_string().contains("--num-pages"), "{e}");
            let e = precheck(&request(n)).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&MAX_NUM_PAGES.to_string()) && msg.contains("give fewer"),
                "{msg}"
            );
        }
        let most = pool_bytes(MAX_NUM_PAGES, &eo, 2).unwrap();
        assert!(most > MAX_NUM_PAGES * 4096);
        assert!(precheck(&request(MAX_NUM_PAGES)).is_ok());
        assert!(precheck(&request(0)).is_ok());
        // The rest of the sizing is checked too, whatever the options.
        let wild = EngineOptions {
            reactors: usize::MAX,
            ..EngineOptions::default()
        };
        assert!(matches!(pool_bytes(16, &wild, 2), Err(Error::Usage(_))));
    }
}
