//! What `nvcopy copy` and `nvcopy zero` do between parsing and printing: open the engine,
//! resolve and check every region before any I/O, run the job with a progress display,
//! and summarise it.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_vfio::PciAddress;
use serde::Serialize;

use crate::report::human_bytes;
use nvcopy::client::{Client, JobHandle, JobOptions};
use nvcopy::engine::{Engine, EngineOptions};
use nvcopy::error::{Error, OptionConflict, Refusal, Result};
use nvcopy::job::{Flags, JobOutcome};
use nvcopy::mapfile::MapHeader;
use nvcopy::open::{open_job, remove_created, FileOptions};
use nvcopy::platform::PlatformOptions;
use nvcopy::progress::MapKeeper;
use nvcopy::region::{self, Region, RegionSpec, Role};
use nvcopy::trace;

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
    /// A ddrescue-format progress map: created if missing, resumed from if present.
    pub map: Option<PathBuf>,
    /// With a map: copy its failed (`-`) areas again too.
    pub retry_failed: bool,
    /// After the copy, read every destination back and compare it with the source.
    pub verify: bool,
    /// Write nothing: read the source and every destination and compare them.
    pub verify_only: bool,
    /// Print this digest of the source region.
    pub digest: Option<nvcopy::digest::DigestKind>,
    /// How files and block devices are opened.
    pub files: FileOptions,
}

/// How often the progress map is checkpointed.
pub const MAP_INTERVAL: Duration = Duration::from_secs(5);

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
    /// Controllers that had to be reset, with how many times.
    pub controller_resets: Vec<(String, u64)>,
    /// The signal that interrupted the job, if one did.
    pub interrupted_by: Option<i32>,
    /// Bytes this run set out to copy (less than `bytes_total` when resuming a map).
    pub bytes_todo: u64,
    /// The progress map, and what it records as copied and as failed.
    pub map: Option<MapSummary>,
    /// The digest of the source region (`--hash`), as `(algorithm, hex)`; the outcome's
    /// `digest` is the same hex.
    pub hash: Option<(String, String)>,
    /// What reading the destinations back found (`--verify`, `--verify-only`).
    pub verify: Option<VerifySummary>,
    /// Per device of the job, what its endpoints report: for files and block devices
    /// whether the rings had an SQPOLL thread and how many io_uring_enter calls they
    /// made (the job's only data-path syscalls).
    pub devices: Vec<DeviceSummary>,
    /// What the callback got, and the counts.
    #[serde(flatten)]
    pub outcome: JobOutcome,
}

/// One device's facts.
#[derive(Debug, Serialize)]
pub struct DeviceSummary {
    /// Its name: a PCI address or a path.
    pub name: String,
    /// Facts, by name.
    pub facts: std::collections::BTreeMap<&'static str, String>,
}

/// What reading the destinations back found.
#[derive(Debug, Serialize)]
pub struct VerifySummary {
    /// Bytes compared, over all destinations.
    pub bytes_compared: u64,
    /// Destinations that differ from the source, or could not be read back.
    pub failed_destinations: Vec<String>,
    /// The chunks that differ.
    pub mismatches: Vec<nvcopy::job::Mismatch>,
    /// The first error, in words.
    pub first_error: Option<String>,
}

/// What the progress map says at the end.
#[derive(Debug, Serialize)]
pub struct MapSummary {
    /// The map file.
    pub path: String,
    /// Bytes recorded as copied and flushed on every destination: a rerun skips them.
    pub finished_bytes: u64,
    /// Bytes recorded as failed (`-`): a rerun copies them only with `--retry-failed`.
    pub bad_bytes: u64,
}

impl Summary {
    /// Whether every byte reached every destination, durably.
    pub fn ok(&self) -> bool {
        !self.outcome.read_err
            && !self.outcome.write_err.any()
            && self.outcome.failed_chunks == 0
            && !self.outcome.cancelled
            && self
                .verify
                .as_ref()
                .is_none_or(|v| v.failed_destinations.is_empty())
    }

    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut t = format!(
            "{} {} to {} destination(s) in {:.2} s, {:.0} MB/s ({} reactor(s))\n",
            match self.operation {
                "copy" => "copied",
                "verify" => "read",
                _ => "zeroed",
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
        if let Some((alg, hex)) = &self.hash {
            t += &format!("{alg}: {hex}  {}\n", self.source.as_deref().unwrap_or(""));
        }
        if let Some(v) = &self.verify {
            if v.failed_destinations.is_empty() {
                t += &format!(
                    "verify: every destination matches the source ({} compared)\n",
                    human_bytes(v.bytes_compared)
                );
            }
            for m in &v.mismatches {
                t += &format!(
                    "verify: destination {} differs from the source in bytes {}..{}\n",
                    self.destinations
                        .get(m.destination)
                        .map_or("?", |s| s.as_str()),
                    m.offset,
                    m.offset + m.len
                );
            }
            for f in &v.failed_destinations {
                t += &format!("verify FAILED on destination {f}\n");
            }
            if let (Some(e), false) = (&v.first_error, v.failed_destinations.is_empty()) {
                t += &format!("verify: first error: {e}\n");
            }
        }
        for (c, n) in &self.controller_resets {
            // Only a job that ended well can say that what was in flight went again: a
            // reset that failed left its chunks failed.
            let then = if self.ok() {
                "; the chunks in flight were issued again"
            } else {
                ""
            };
            t += &format!("controller {c} was reset {n} time(s){then}\n");
        }
        if self.bytes_todo < self.bytes_total {
            t += &format!(
                "resumed: {} of {} were still to copy\n",
                human_bytes(self.bytes_todo),
                human_bytes(self.bytes_total)
            );
        }
        if let Some(m) = &self.map {
            t += &format!(
                "map {}: {} copied and flushed (a rerun with the same command skips them), {} failed\n",
                m.path,
                human_bytes(m.finished_bytes),
                human_bytes(m.bad_bytes)
            );
        }
        if let Some(sig) = self.interrupted_by {
            let done = self
                .map
                .as_ref()
                .map_or(self.outcome.bytes_ok, |m| m.finished_bytes);
            t += &format!(
                "interrupted by signal {sig} after {} of {}: in-flight chunks finished and every destination was flushed\n",
                human_bytes(done),
                human_bytes(self.bytes_total)
            );
            t += &match &self.map {
                Some(_) => format!("resume with: {}\n", resume_command()),
                None => {
                    "progress was not saved: give --map FILE to make a copy resumable\n".to_string()
                }
            };
        }
        t += if self.interrupted_by.is_some() {
            "result: INTERRUPTED\n"
        } else if self.ok() {
            "result: ok\n"
        } else {
            "result: FAILED\n"
        };
        t
    }
}

/// This process's command line, quoted for a shell: rerunning it with the same map
/// resumes the copy.
fn resume_command() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:@+=,".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// SIGINT and SIGTERM, as the copy sees them: the first one asks the job to stop (in
/// flight chunks finish, destinations are flushed, the map is saved); a second one ends
/// the process at once with 130 or 143.
pub struct Signals {
    got: Arc<AtomicUsize>,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> Result<Signals> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let got = Arc::new(AtomicUsize::new(0));
        let again = Arc::new(AtomicBool::new(false));
        for (sig, code) in [(SIGINT, 130), (SIGTERM, 143)] {
            // Registered first, so that it sees `again` before this signal sets it.
            signal_hook::flag::register_conditional_shutdown(sig, code, again.clone())
                .and_then(|_| signal_hook::flag::register(sig, again.clone()))
                .and_then(|_| signal_hook::flag::register_usize(sig, got.clone(), sig as usize))
                .map_err(Error::Output)?;
        }
        Ok(Signals { got })
    }

    /// The signal received, if any.
    pub fn received(&self) -> Option<i32> {
        match self.got.load(Ordering::Acquire) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// Most 4 KiB pages a client may reserve (`--num-pages`): page indices are 32-bit, and
/// that is already 16 TiB of pinned DMA memory.
pub const MAX_NUM_PAGES: usize = u32::MAX as usize;

fn check_num_pages(num_pages: usize) -> Result<()> {
    if num_pages > MAX_NUM_PAGES {
        return Err(Refusal::TooManyPages {
            given: num_pages,
            max: MAX_NUM_PAGES,
        }
        .into());
    }
    Ok(())
}

/// Refuses requests that are wrong whatever the devices say.
pub fn precheck(req: &JobRequest) -> Result<()> {
    check_num_pages(req.num_pages)?;
    if req.from.is_none() && (req.verify || req.verify_only || req.digest.is_some()) {
        return Err(Refusal::BadOptions(OptionConflict::CheckNeedsSource).into());
    }
    if req.verify_only && (req.map.is_some() || req.verify) {
        return Err(Refusal::BadOptions(OptionConflict::VerifyOnlyCopiesNothing).into());
    }
    region::check_destination_count(req.to.len(), false)?;
    Ok(())
}

/// The job's cross-region checks ([`region::check_destination`], which [`Client`]
/// applies too) on regions already resolved against their devices, naming regions as
/// the command line wrote them.
pub fn cross_check(
    engine: &Engine,
    req: &JobRequest,
    from: Option<&Region>,
    to: &[Region],
) -> Result<()> {
    let name = |role: Role| {
        match role {
            Role::Source => req.from.as_ref().map(|s| s.to_string()),
            Role::Destination(i) => req.to.get(i).map(|s| s.to_string()),
        }
        .unwrap_or_default()
    };
    for (i, d) in to.iter().enumerate() {
        region::check_destination(from, &to[..i], d, engine.devices(), &name)?;
    }
    Ok(())
}

/// Room for what the pool loses to layout: no allocation spans a 2 MiB hugepage.
pub const POOL_SLACK: usize = 4 << 20;

/// Pool bytes for an engine: the client's pages, plus what the driver says each
/// controller and each I/O queue pair takes, plus each reactor's chunk-slot pages
/// ([`EngineOptions::dma_bytes`]). Refuses sizes that do not fit in the address space
/// rather than wrapping.
pub fn pool_bytes(num_pages: usize, eo: &EngineOptions, controllers: usize) -> Result<usize> {
    check_num_pages(num_pages)?;
    let ctrl = nvcopy_nvme::Controller::dma_bytes(&nvcopy_nvme::ControllerOptions::default());
    num_pages
        .checked_mul(nvcopy_vfio::PAGE_SIZE)
        .zip(eo.dma_bytes(controllers))
        .and_then(|(pages, engine)| pages.checked_add(engine))
        .zip(ctrl.checked_mul(controllers))
        .and_then(|(b, c)| b.checked_add(c))
        .and_then(|b| b.checked_add(POOL_SLACK))
        .ok_or_else(|| {
            Error::from(Refusal::PoolTooLarge {
                num_pages,
                reactors: eo.reactors,
                qd: eo.qd,
                controllers,
            })
        })
}

/// Runs a copy or zero job end to end, and hands back its summary with the engine, which
/// is still open: the caller prints the summary before it closes the engine
/// ([`Engine::close`]), since every destination was already flushed when the job's
/// callback ran, and closing takes the devices' resets.
pub fn run(
    req: &JobRequest,
    platform: &PlatformOptions,
    eo: &EngineOptions,
    show_progress: bool,
) -> Result<(Summary, Engine)> {
    precheck(req)?;
    let mut addrs: Vec<PciAddress> = req
        .from
        .iter()
        .chain(req.to.iter())
        .filter_map(|r| r.pci())
        .collect();
    addrs.sort();
    addrs.dedup();
    let num_pages = if req.num_pages > 0 {
        req.num_pages
    } else {
        // Enough for what each reactor may have in flight: qd chunks, or the in-flight
        // bytes when they are fewer (one chunk at least).
        let slots = eo.qd * eo.chunk;
        let per_reactor = match eo.inflight {
            0 => slots,
            b => slots.min(b.max(eo.chunk)),
        };
        eo.reactors * (per_reactor / 4096).max(1)
    };
    let mut po = platform.clone();
    po.pool_bytes = pool_bytes(num_pages, eo, addrs.len())?;
    let opened = open_job(req.from.as_ref(), &req.to, &po, &req.files, eo.clone())?;
    let (engine, from, to) = (opened.engine, opened.from, opened.to);
    if let Err(e) = cross_check(&engine, req, from.as_ref(), &to) {
        drop(engine);
        remove_created(&opened.created);
        return Err(e);
    }
    let client = Client::new(&engine, num_pages)?;
    let mut keeper = None;
    let mut options = JobOptions::default();
    if let Some(path) = &req.map {
        let header = MapHeader::new(
            req.from
                .as_ref()
                .map_or_else(|| "zero".to_string(), |s| s.to_string()),
            req.to.iter().map(|r| r.to_string()).collect(),
            to.first().map_or(0, |r| r.len),
            eo.chunk as u64,
        )?;
        let (k, todo) = MapKeeper::open(path, header, req.retry_failed)?;
        options.track_cells = true;
        options.only = todo;
        keeper = Some(k);
    }
    options.hash_chunks = req.verify || req.verify_only;
    options.digest = req.digest;
    options.sparse = req.files.sparse;
    if req.digest.is_some() && options.only.is_some() {
        return Err(Refusal::BadOptions(OptionConflict::HashNeedsWholeSource).into());
    }
    let signals = Signals::install()?;
    trace::step("client, map and signal handlers set up");
    let start = Instant::now();
    let handle = match &from {
        Some(f) if req.verify_only => client.read(f, req.flags, &options, |_, _| {})?,
        Some(f) => client.copy_with(f, &to, req.flags, &options, |_, _| {})?,
        None => client.zero(&to, req.flags, |_, _| {})?,
    };
    let outcome = std::thread::scope(|s| -> Result<JobOutcome> {
        let saver = keeper.as_mut().map(|k| {
            let (handle, client, to) = (&handle, &client, &to);
            s.spawn(move || -> Result<()> {
                let mut last = Instant::now();
                while !handle.is_finished() {
                    std::thread::sleep(Duration::from_millis(50));
                    if last.elapsed() >= MAP_INTERVAL && !handle.is_finished() {
                        k.checkpoint(handle, client, to)?;
                        last = Instant::now();
                    }
                }
                Ok(())
            })
        });
        let outcome = watch(&handle, show_progress, &signals);
        if let Some(t) = saver {
            t.join().map_err(|_| Error::Panicked {
                what: "the map-saving thread".into(),
            })??;
        }
        Ok(outcome)
    })?;
    trace::step("job done (every destination flushed)");
    if let Some(k) = keeper.as_mut() {
        k.finish(&handle, !outcome.write_err.any())?;
    }
    let verify = match handle.hashes() {
        Some(hashes) if signals.received().is_none() => {
            let v = client.verify(&to, hashes, |_, _| {})?;
            let o = watch(&v, show_progress, &signals);
            Some(VerifySummary {
                bytes_compared: o.bytes_ok,
                failed_destinations: req
                    .to
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| o.write_err.contains(*i))
                    .map(|(_, r)| r.to_string())
                    .collect(),
                mismatches: o.mismatches,
                first_error: o.first_error,
            })
        }
        _ => None,
    };
    let elapsed = start.elapsed().as_secs_f64();
    let controller_resets = outcome
        .resets
        .iter()
        .map(|&(c, n)| (engine.devices()[c].name().to_string(), n))
        .collect();
    let hash = outcome
        .digest
        .clone()
        .zip(req.digest)
        .map(|(hex, kind)| (kind.name().to_string(), hex));
    let devices = engine
        .devices()
        .iter()
        .map(|d| DeviceSummary {
            name: d.name().to_string(),
            facts: d.facts().into_iter().collect(),
        })
        .collect();
    let summary = Summary {
        devices,
        hash,
        verify,
        controller_resets,
        interrupted_by: signals.received(),
        bytes_todo: handle.bytes_todo(),
        map: keeper.as_ref().map(|k| MapSummary {
            path: k.path().display().to_string(),
            finished_bytes: k.finished_bytes(),
            bad_bytes: k.bad_bytes(),
        }),
        operation: match (&from, req.verify_only) {
            (Some(_), true) => "verify",
            (Some(_), false) => "copy",
            (None, _) => "zero",
        },
        source: req.from.as_ref().map(|s| s.to_string()),
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
    };
    drop(handle);
    drop(client);
    Ok((summary, engine))
}

/// Waits for the job: a progress bar on a terminal, a plain line every few seconds
/// otherwise, nothing when not asked.
fn watch(handle: &JobHandle, show_progress: bool, signals: &Signals) -> JobOutcome {
    let mut cancelled = false;
    let mut interrupted = || {
        if !cancelled && signals.received().is_some() {
            handle.cancel();
            cancelled = true;
        }
    };
    if !show_progress {
        loop {
            interrupted();
            if let Some(o) = handle.wait_timeout(Duration::from_millis(50)) {
                return o;
            }
        }
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
            interrupted();
            if let Some(o) = handle.wait_timeout(Duration::from_millis(100)) {
                bar.finish_and_clear();
                return o;
            }
            bar.set_position(handle.bytes_done());
        }
    }
    let start = Instant::now();
    let mut last = Instant::now();
    loop {
        interrupted();
        if let Some(o) = handle.wait_timeout(Duration::from_millis(100)) {
            return o;
        }
        if last.elapsed() < Duration::from_secs(2) {
            continue;
        }
        last = Instant::now();
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
            map: None,
            retry_failed: false,
            verify: false,
            verify_only: false,
            digest: None,
            files: FileOptions::default(),
        }
    }

    #[test]
    fn num_pages_that_would_overflow_the_pool_size_are_refused() {
        let eo = EngineOptions::default();
        let huge = 1usize << 52;
        for n in [huge, usize::MAX, MAX_NUM_PAGES + 1] {
            let e = pool_bytes(n, &eo, 2).unwrap_err();
            assert!(
                matches!(e, Error::Refused(Refusal::TooManyPages { given, max: MAX_NUM_PAGES }) if given == n)
                    || matches!(e, Error::Refused(Refusal::PoolTooLarge { num_pages, .. }) if num_pages == n),
                "{e}"
            );
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
        assert!(matches!(
            pool_bytes(16, &wild, 2),
            Err(Error::Refused(Refusal::PoolTooLarge { num_pages: 16, .. }))
        ));
    }
}
