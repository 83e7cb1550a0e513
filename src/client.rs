//! kcopyd's client: `kcopyd_client_create(num_pages)` becomes [`Client::new`], and
//! `kcopyd_copy` / `kcopyd_zero` become [`Client::copy`] and [`Client::zero`]. A client owns
//! a reservation of DMA pages that its jobs' chunks use; a chunk that finds too few free
//! pages waits for them, it is never failed for lack of memory. Dropping a client waits
//! for its jobs, as `kcopyd_client_destroy` does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use nvcopy_vfio::PAGE_SIZE;

use crate::endpoint::Volume;
use crate::engine::Engine;
use crate::error::{Refusal, Result};
use crate::job::{Callback, DestMask, Flags, Job, JobKind, JobOutcome, JobPlan};
use crate::pages::PageReserve;
use crate::region::{self, Region, Role};

/// What a client's jobs share with the reactors.
pub(crate) struct ClientShared {
    pub pages: PageReserve,
    outstanding: AtomicUsize,
    lock: Mutex<()>,
    changed: Condvar,
}

impl ClientShared {
    pub(crate) fn job_finished(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }

    fn wait_for(&self, mut done: impl FnMut() -> bool) {
        let mut guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !done() {
            // The timeout covers a notification that raced with the check.
            guard = self
                .changed
                .wait_timeout(guard, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A handle on a submitted job: progress, and a way to wait for it.
#[derive(Clone)]
pub struct JobHandle {
    job: Arc<Job>,
    client: Arc<ClientShared>,
}

impl JobHandle {
    /// Bytes of the job whose chunks have ended.
    pub fn bytes_done(&self) -> u64 {
        self.job.bytes_done()
    }
    /// Total bytes of the job.
    pub fn len(&self) -> u64 {
        self.job.len()
    }
    /// Never true: empty jobs are refused.
    pub fn is_empty(&self) -> bool {
        self.job.is_empty()
    }
    /// Whether the callback has run.
    pub fn is_finished(&self) -> bool {
        self.job.is_finished()
    }
    /// Waits for the job and returns its outcome.
    pub fn wait(&self) -> JobOutcome {
        self.client.wait_for(|| self.job.is_finished());
        self.job.outcome().unwrap_or_default()
    }
    /// Stops dispatching new chunks: those in flight finish, every destination is flushed,
    /// then the callback runs, with [`JobOutcome::cancelled`] set (an interrupted copy).
    pub fn cancel(&self) {
        self.job.cancel();
    }
    /// The job's chunk grid: bytes per cell.
    pub fn chunk(&self) -> usize {
        self.job.chunk()
    }
    /// The job's chunk grid: cells.
    pub fn cells(&self) -> u64 {
        self.job.cells()
    }
    /// Where cell `i` stands, when the job was asked to keep cell states
    /// ([`JobOptions::track_cells`]).
    pub fn cell_state(&self, i: u64) -> Option<crate::job::CellState> {
        self.job.cell_state(i)
    }
    /// The source chunks' hashes ([`JobOptions::hash_chunks`]), for [`Client::verify`].
    pub fn hashes(&self) -> Option<Arc<crate::job::ChunkHashes>> {
        self.job.hashes().cloned()
    }
    /// Bytes this job set out to copy (less than its length when it resumes a map).
    pub fn bytes_todo(&self) -> u64 {
        self.job.bytes_todo()
    }
    /// Waits at most `timeout`; the outcome if the job ended.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<JobOutcome> {
        let deadline = std::time::Instant::now() + timeout;
        self.client
            .wait_for(|| self.job.is_finished() || std::time::Instant::now() >= deadline);
        self.job.outcome()
    }
}

/// Per-job options beyond kcopyd's flags.
#[derive(Clone, Debug, Default)]
pub struct JobOptions {
    /// Keep a state per cell of the chunk grid, for a progress map
    /// ([`JobHandle::cell_state`]).
    pub track_cells: bool,
    /// Copy only the cells that meet one of these byte ranges of the job (a resumed
    /// copy); None: everything.
    pub only: Option<Vec<std::ops::Range<u64>>>,
    /// Keep a hash of every source chunk, for a verify job ([`JobHandle::hashes`]).
    pub hash_chunks: bool,
    /// Compute this digest of the source region, in order (the job then runs on one
    /// reactor). It is reported only when every chunk of the source was read.
    pub digest: Option<crate::digest::DigestKind>,
    /// Deallocate instead of writing all-zero chunks on destinations that can (files:
    /// holes), as `--sparse`.
    pub sparse: bool,
}

/// A kcopyd client.
pub struct Client {
    engine: Arc<crate::engine::EngineShared>,
    shared: Arc<ClientShared>,
}

impl Client {
    /// Reserves `num_pages` 4 KiB pages of the engine's DMA pool for this client's jobs.
    pub fn new(engine: &Engine, num_pages: usize) -> Result<Client> {
        let shared = engine.shared();
        let pages = PageReserve::new(&shared.pool, num_pages)?;
        Ok(Client {
            engine: shared.clone(),
            shared: Arc::new(ClientShared {
                pages,
                outstanding: AtomicUsize::new(0),
                lock: Mutex::new(()),
                changed: Condvar::new(),
            }),
        })
    }

    /// Pages reserved.
    pub fn num_pages(&self) -> usize {
        self.shared.pages.capacity()
    }

    /// Reserved pages not held by a chunk now.
    pub fn free_pages(&self) -> usize {
        self.shared.pages.available()
    }

    /// For tests against the software controller: a function from a device address to
    /// the owner generation of the client page holding it (None: not a client page). The
    /// generation changes every time a page leaves a chunk, so a device write whose page
    /// generation changed since its command was submitted went into memory that belonged
    /// to someone else by then.
    #[doc(hidden)]
    pub fn page_guard(&self) -> Arc<dyn Fn(nvcopy_vfio::Iova) -> Option<u64> + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move |iova| shared.pages.generation(iova))
    }

    /// Jobs submitted and not finished.
    pub fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Acquire)
    }

    /// Copies `from` to every region of `to` (1 to 64, each as long as `from`). Each chunk
    /// is read once and written to all destinations. `callback(read_err, write_err)` runs
    /// exactly once, on a reactor thread. Bad input is refused here, before any I/O.
    pub fn copy(
        &self,
        from: &Region,
        to: &[Region],
        flags: Flags,
        callback: impl FnOnce(bool, DestMask) + Send + 'static,
    ) -> Result<JobHandle> {
        self.copy_with(from, to, flags, &JobOptions::default(), callback)
    }

    /// [`Client::copy`] with [`JobOptions`].
    pub fn copy_with(
        &self,
        from: &Region,
        to: &[Region],
        flags: Flags,
        options: &JobOptions,
        callback: impl FnOnce(bool, DestMask) + Send + 'static,
    ) -> Result<JobHandle> {
        let plan = self.plan(Some(from), to, flags, false)?;
        self.prepare_zones(&plan, options)?;
        Ok(self.submit(with_options(plan, options), Box::new(callback)))
    }

    /// Resets the zones a copy will write on its zoned destinations. A resumed copy
    /// (`options.only`) cannot go on a zoned destination: its zones would have to be
    /// written from where they stopped, and a reset would lose what the last run copied.
    fn prepare_zones(&self, plan: &JobPlan, options: &JobOptions) -> Result<()> {
        for (d, v) in plan.to.iter().zip(&plan.dst_vol) {
            if v.zone_blocks.is_none() {
                continue;
            }
            let dev = &self.engine.devices[d.ctrl];
            if options.only.is_some() {
                return Err(Refusal::ZonedJob {
                    region: d.name_in(&self.engine.devices),
                    why: "a copy onto it cannot resume from a map; run it again without --map (or delete the map) to copy it whole",
                }
                .into());
            }
            dev.prepare_writes(v, d.offset, d.len)?;
        }
        Ok(())
    }

    /// Reads `from` without writing anything: to take its chunk hashes for
    /// [`Client::verify`] (`--verify-only`) or its digest.
    pub fn read(
        &self,
        from: &Region,
        flags: Flags,
        options: &JobOptions,
        callback: impl FnOnce(bool, DestMask) + Send + 'static,
    ) -> Result<JobHandle> {
        let plan = self.plan(Some(from), &[], flags, true)?;
        Ok(self.submit(with_options(plan, options), Box::new(callback)))
    }

    /// Reads every region of `to` back and compares each chunk with the source's hash in
    /// `hashes` (taken by a copy or read job with [`JobOptions::hash_chunks`]). A chunk
    /// that differs sets its destination's bit and is listed in
    /// [`JobOutcome::mismatches`]; chunks whose source could not be read are skipped.
    pub fn verify(
        &self,
        to: &[Region],
        hashes: Arc<crate::job::ChunkHashes>,
        callback: impl FnOnce(bool, DestMask) + Send + 'static,
    ) -> Result<JobHandle> {
        let mut plan = self.plan(None, to, Flags::IGNORE_ERRORS, false)?;
        let chunk = hashes.chunk();
        if chunk == 0 || plan.len.div_ceil(chunk as u64) != hashes.cells() {
            return Err(Refusal::HashesDoNotCover {
                cells: hashes.cells(),
                chunk,
                len: plan.len,
            }
            .into());
        }
        if chunk.div_ceil(PAGE_SIZE) > self.num_pages() {
            return Err(Refusal::TooFewPages {
                reserved: self.num_pages(),
                needed: chunk.div_ceil(PAGE_SIZE),
                verifying: true,
            }
            .into());
        }
        let ways = to.len() as u64;
        plan.todo = Some(
            (0..hashes.cells() * ways)
                .map(|v| hashes.get(v / ways).is_some())
                .collect(),
        );
        plan.chunk = chunk;
        plan.kind = JobKind::Verify { hashes };
        Ok(self.submit(plan, Box::new(callback)))
    }

    /// Sends a Flush to every region's namespace and calls back when all have completed:
    /// whatever was written there before the call is then durable. A failed Flush sets
    /// its destination's bit.
    pub fn flush(
        &self,
        to: &[Region],
        callback: impl FnOnce(bool, DestMask) + Send + 'static,
    ) -> Result<JobHandle> {
        let mut plan = self.plan(None, to, Flags::IGNORE_ERRORS, false)?;
        plan.kind = JobKind::Flush;
        plan.len = 0;
        Ok(self.submit(plan, Box::new(callback)))
    }

    /// Writes zeroes to every region of `to` (kcopyd_zero). Uses Write Zeroes where the
    /// controller supports it, writes from a shared zeroed page where it does not.
    pub fn zero(
        &self,
        to: &[Region],
        flags: Flags,
        callback: impl FnOnce(bool, DestMask) + Send + 'static,
    ) -> Result<JobHandle> {
        let plan = self.plan(None, to, flags, false)?;
        if let Some((d, _)) = plan
            .to
            .iter()
            .zip(&plan.dst_vol)
            .find(|(_, v)| v.zone_blocks.is_some())
        {
            return Err(Refusal::ZonedJob {
                region: d.name_in(&self.engine.devices),
                why: "zeroing it would write out of zone order; a zone reset empties it (`nvme zns reset-zone`)",
            }
            .into());
        }
        Ok(self.submit(plan, Box::new(callback)))
    }

    /// [`Client::copy`] and wait for it.
    pub fn copy_blocking(&self, from: &Region, to: &[Region], flags: Flags) -> Result<JobOutcome> {
        Ok(self.copy(from, to, flags, |_, _| {})?.wait())
    }

    /// [`Client::zero`] and wait for it.
    pub fn zero_blocking(&self, to: &[Region], flags: Flags) -> Result<JobOutcome> {
        Ok(self.zero(to, flags, |_, _| {})?.wait())
    }

    fn submit(&self, plan: JobPlan, callback: Callback) -> JobHandle {
        self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
        let job = Arc::new(Job::new(plan, self.shared.clone(), callback));
        self.engine.dispatch(&job);
        JobHandle {
            job,
            client: self.shared.clone(),
        }
    }

    /// Checks the regions and decides chunk size and offloads. `read_only`: a job that
    /// reads `from` and writes nowhere.
    fn plan(
        &self,
        from: Option<&Region>,
        to: &[Region],
        flags: Flags,
        read_only: bool,
    ) -> Result<JobPlan> {
        let e = &self.engine;
        region::check_destination_count(to.len(), read_only && from.is_some())?;
        let vol_of = |r: &Region| -> Result<Volume> {
            let c = e.devices.get(r.ctrl).ok_or_else(|| Refusal::NotInEngine {
                ctrl: format!("#{}", r.ctrl),
            })?;
            let v = c.volume(r.nsid)?;
            Region::check_against(r, &v, c.name())?;
            Ok(v)
        };
        let len = match from {
            Some(f) => f.len,
            None => to.first().map_or(0, |r| r.len),
        };
        let src_vol = from.map(vol_of).transpose()?;
        let dst_vol = to.iter().map(vol_of).collect::<Result<Vec<_>>>()?;
        let name = |role: Role| {
            match role {
                Role::Source => from.map(|f| f.name_in(&e.devices)),
                Role::Destination(i) => to.get(i).map(|d| d.name_in(&e.devices)),
            }
            .unwrap_or_default()
        };
        for (i, d) in to.iter().enumerate() {
            region::check_destination(from, &to[..i], d, &e.devices, &name)?;
        }
        let block = from
            .into_iter()
            .chain(to.iter())
            .map(|r| r.lba_size as usize)
            .max()
            .unwrap_or(512);
        let max_of = |r: &Region| e.devices[r.ctrl].caps().max_transfer;
        let mut offloaded = DestMask::default();
        let mut write_zeroes = DestMask::default();
        let sequential = flags.contains(Flags::WRITE_SEQUENTIAL)
            || dst_vol.iter().any(|v| v.zone_blocks.is_some());
        // Data moves through client pages: chunks must fit the reservation, every
        // controller's MDTS and whole pages and blocks.
        let mut chunk = e
            .opts
            .chunk
            .min(self.num_pages() * PAGE_SIZE)
            .min(crate::endpoint::MAX_CHUNK);
        match from {
            Some(f) => {
                chunk = chunk.min(max_of(f));
                let trial = (chunk / block * block).max(block);
                for (i, d) in to.iter().enumerate() {
                    let c = &e.devices[d.ctrl];
                    let same_ns = d.ctrl == f.ctrl && d.nsid == f.nsid;
                    let blocks = (trial / d.lba_size as usize) as u64;
                    if same_ns && !sequential && e.opts.offload && c.copy_fits(&dst_vol[i], blocks)
                    {
                        offloaded.set(i);
                    } else {
                        chunk = chunk.min(c.caps().max_transfer);
                    }
                }
            }
            None => {
                for (i, d) in to.iter().enumerate() {
                    let c = &e.devices[d.ctrl];
                    if e.opts.offload && c.caps().write_zeroes {
                        write_zeroes.set(i);
                    } else {
                        chunk = chunk.min(c.caps().max_transfer);
                    }
                }
            }
        }
        let unit = block.max(PAGE_SIZE);
        let mut chunk = (chunk / unit * unit).max(unit);
        // Zoned destinations: whole zones, written in order, by chunks that never cross a
        // zone boundary (a write across one fails: ZNS spec 3.4.1, Zone Boundary Error).
        for (d, v) in to.iter().zip(&dst_vol) {
            let Some(zb) = v.zone_blocks else {
                continue;
            };
            let zone_bytes = zb.saturating_mul(v.block_size as u64);
            let capacity = v.blocks.saturating_mul(v.block_size as u64);
            let end = d.offset + d.len;
            if d.offset % zone_bytes != 0 || (end % zone_bytes != 0 && end != capacity) {
                return Err(Refusal::ZoneMisaligned {
                    region: d.name_in(&e.devices),
                    zone_bytes,
                }
                .into());
            }
            while chunk > unit && zone_bytes % chunk as u64 != 0 {
                chunk -= unit;
            }
            if zone_bytes % chunk as u64 != 0 {
                return Err(Refusal::ZonedJob {
                    region: d.name_in(&e.devices),
                    why: "its zone size is not a multiple of the 4 KiB pages nvcopy moves data in",
                }
                .into());
            }
        }
        let flags = if dst_vol.iter().any(|v| v.zone_blocks.is_some()) && !read_only {
            flags | Flags::WRITE_SEQUENTIAL
        } else {
            flags
        };
        if from.is_some() && chunk / PAGE_SIZE > self.num_pages() {
            return Err(Refusal::TooFewPages {
                reserved: self.num_pages(),
                needed: chunk / PAGE_SIZE,
                verifying: false,
            }
            .into());
        }
        let base_gen = e.devices.iter().map(|c| c.generation()).collect();
        Ok(JobPlan {
            todo: None,
            track_cells: false,
            hash_chunks: false,
            digest: None,
            base_gen,
            kind: match from {
                Some(f) => JobKind::Copy { from: *f },
                None => JobKind::Zero,
            },
            to: to.to_vec(),
            flags,
            chunk,
            max_live: match e.opts.inflight {
                0 => u32::MAX,
                b => (b / chunk).clamp(1, u32::MAX as usize) as u32,
            },
            len,
            offloaded,
            write_zeroes,
            holes: DestMask(
                to.iter()
                    .enumerate()
                    .filter(|(_, d)| e.devices[d.ctrl].caps().deallocate)
                    .fold(0, |m, (i, _)| m | 1 << i),
            ),
            src_vol,
            dst_vol,
            sparse: DestMask::default(),
        })
    }
}

/// Applies per-job options to a plan: the set of cells to copy.
fn with_options(mut plan: JobPlan, options: &JobOptions) -> JobPlan {
    plan.track_cells = options.track_cells;
    plan.hash_chunks = options.hash_chunks;
    plan.digest = options.digest;
    plan.sparse = if options.sparse {
        plan.holes
    } else {
        DestMask::default()
    };
    if let Some(only) = &options.only {
        let chunk = plan.chunk.max(1) as u64;
        let cells = plan.len.div_ceil(chunk);
        let mut todo = vec![false; cells as usize];
        for r in only {
            let end = r.end.min(plan.len);
            if r.start >= end {
                continue;
            }
            for cell in todo
                .iter_mut()
                .take(end.div_ceil(chunk) as usize)
                .skip((r.start / chunk) as usize)
            {
                *cell = true;
            }
        }
        plan.todo = Some(todo);
    }
    plan
}

impl Drop for Client {
    fn drop(&mut self) {
        // kcopyd_client_destroy: jobs hold the client's pages, so wait for them to end.
        let shared = self.shared.clone();
        shared.wait_for(|| shared.outstanding.load(Ordering::Acquire) == 0);
    }
}
