//! The engine: devices, the DMA pool, and one pinned polling reactor per chosen core.
//! Each reactor owns one endpoint per device (an NVMe I/O queue pair, an io_uring ring),
//! so no endpoint is shared or locked; jobs reach reactors through bounded lock-free
//! inboxes. A controller that granted fewer queue pairs than there are reactors is served
//! by the reactors that got one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};

use crossbeam_queue::ArrayQueue;
use nvcopy_nvme::Controller;
use nvcopy_vfio::{DmaPool, PciAddress};

use crate::endpoint::nvme::NvmeDevice;
use crate::endpoint::{Device, Devices, Endpoint};
use crate::error::{Error, Refusal, Result};
use crate::job::{Flags, Job, JobKind};
use crate::platform::{Platform, PlatformOptions};
use crate::reactor::Reactor;
use crate::region::{Region, RegionSpec};
use crate::trace;

/// Jobs waiting in one reactor's inbox at most.
const INBOX: usize = 1024;

/// Runs a hook on each reactor thread as it starts (its index is passed), before any I/O.
pub type ReactorInit = Arc<dyn Fn(usize) + Send + Sync>;

/// How the engine runs.
#[derive(Clone)]
pub struct EngineOptions {
    /// Reactor threads.
    pub reactors: usize,
    /// Pin reactor i to CPU i (modulo the CPUs available).
    pub pin: bool,
    /// Chunks in flight per reactor, at most (the reactor's chunk slots).
    pub qd: usize,
    /// Bytes of one job in flight per reactor, at most (0: only `qd` limits): with larger
    /// chunks fewer are in flight, so that depth follows what the drives take rather than
    /// a count of commands. Reads stay ahead of writes within it.
    pub inflight: usize,
    /// Largest chunk, bytes (also capped by MDTS and the client's pages).
    pub chunk: usize,
    /// Entries per I/O queue.
    pub queue_entries: u16,
    /// Retries of a command that failed without Do Not Retry.
    pub retries: u8,
    /// Controller resets one job tolerates per controller before that controller's
    /// commands of the job fail.
    pub max_resets: u32,
    /// Use the Copy and Write Zeroes commands where the controllers support them.
    pub offload: bool,
    /// Run each reactor under a seccomp filter ([`crate::confine::Profile::Reactor`]):
    /// a syscall outside it kills the process. Off by default for the library, since job
    /// callbacks run on reactors; the CLI turns it on (`--no-seccomp` to turn it off).
    pub seccomp: bool,
    /// Hook run on each reactor before it starts polling (after the seccomp filter).
    pub reactor_init: Option<ReactorInit>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            reactors: 1,
            pin: true,
            qd: 32,
            inflight: 0,
            chunk: 128 << 10,
            queue_entries: 1024,
            retries: 3,
            max_resets: 2,
            offload: true,
            seccomp: false,
            reactor_init: None,
        }
    }
}

impl EngineOptions {
    /// DMA memory the engine's reactors take from the pool over `controllers`
    /// controllers, at most: per reactor, one I/O queue pair per controller (the driver's
    /// figure), a Copy-descriptor page per chunk slot and the shared zero page. The
    /// clients' pages come on top. None if it does not fit in a usize.
    pub fn dma_bytes(&self, controllers: usize) -> Option<usize> {
        let queues = Controller::io_qpair_dma_bytes(self.queue_entries).checked_mul(controllers)?;
        let slots = self
            .qd
            .max(1)
            .checked_add(1)?
            .checked_mul(nvcopy_vfio::PAGE_SIZE)?;
        queues.checked_add(slots)?.checked_mul(self.reactors.max(1))
    }
}

impl std::fmt::Debug for EngineOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineOptions")
            .field("reactors", &self.reactors)
            .field("qd", &self.qd)
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

/// What reactors and clients share.
pub(crate) struct EngineShared {
    pub devices: Devices,
    pub pool: DmaPool,
    pub opts: EngineOptions,
    pub inboxes: Vec<ArrayQueue<Arc<Job>>>,
    /// has_queue[r][c]: reactor r owns a queue pair on controller c.
    pub has_queue: Vec<Vec<bool>>,
    pub threads: OnceLock<Vec<Thread>>,
    pub stop: AtomicBool,
}

impl EngineShared {
    /// Hands a job to every reactor that can reach all its controllers (one reactor for
    /// WRITE_SEQUENTIAL jobs, whose writes must leave in order, and for jobs that digest
    /// their source, which must be fed in order).
    pub(crate) fn dispatch(&self, job: &Arc<Job>) {
        let mut ctrls: Vec<usize> = job.to.iter().map(|r| r.ctrl).collect();
        if let JobKind::Copy { from } = &job.kind {
            ctrls.push(from.ctrl);
        }
        let eligible =
            (0..self.inboxes.len()).filter(|&r| ctrls.iter().all(|&c| self.has_queue[r][c]));
        let take = if job.flags.contains(Flags::WRITE_SEQUENTIAL) || job.wants_digest() {
            1
        } else {
            usize::MAX
        };
        for r in eligible.take(take) {
            let mut item = job.clone();
            while let Err(back) = self.inboxes[r].push(item) {
                item = back;
                std::thread::yield_now();
            }
            if let Some(t) = self.threads.get().and_then(|t| t.get(r)) {
                t.unpark();
            }
        }
    }
}

/// The copy engine.
pub struct Engine {
    shared: Arc<EngineShared>,
    handles: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Starts reactors over initialised NVMe controllers sharing `pool`.
    pub fn new(
        controllers: Vec<Arc<Controller>>,
        pool: DmaPool,
        opts: EngineOptions,
    ) -> Result<Engine> {
        let devices = controllers.into_iter().map(NvmeDevice::shared).collect();
        Engine::with_devices(devices, pool, opts)
    }

    /// Starts reactors over `devices` (NVMe controllers, files, block devices) whose data
    /// pages come from `pool`.
    pub fn with_devices(devices: Devices, pool: DmaPool, opts: EngineOptions) -> Result<Engine> {
        if devices.is_empty() {
            return Err(Refusal::NoControllers.into());
        }
        let n = opts.reactors.max(1);
        // Creating an I/O queue pair takes two admin commands: each device makes its
        // reactors' endpoints in a thread of its own, beside the others.
        let made = std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .map(|dev| {
                    let pool = &pool;
                    let entries = opts.queue_entries;
                    s.spawn(move || {
                        let t = std::time::Instant::now();
                        let eps = (0..n.min(dev.max_endpoints()))
                            .map(|_| dev.open_endpoint(pool, entries))
                            .collect::<Result<Vec<_>>>();
                        trace::span(t, format_args!("{}: endpoints opened", dev.name()));
                        eps
                    })
                })
                .collect();
            handles
                .into_iter()
                .zip(&devices)
                .map(|(h, dev)| {
                    h.join().map_err(|_| Error::Panicked {
                        what: format!("{}: opening endpoints", dev.name()),
                    })?
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut has_queue = vec![vec![false; devices.len()]; n];
        let mut reactor_queues: Vec<Vec<Option<Box<dyn Endpoint>>>> =
            (0..n).map(|_| Vec::with_capacity(devices.len())).collect();
        for (c, eps) in made.into_iter().enumerate() {
            let mut eps = eps.into_iter();
            for (r, queues) in reactor_queues.iter_mut().enumerate() {
                let ep = eps.next();
                has_queue[r][c] = ep.is_some();
                queues.push(ep);
            }
        }
        trace::step("endpoints opened");
        let shared = Arc::new(EngineShared {
            devices,
            pool,
            opts,
            inboxes: (0..n).map(|_| ArrayQueue::new(INBOX)).collect(),
            has_queue,
            threads: OnceLock::new(),
            stop: AtomicBool::new(false),
        });
        let mut handles = Vec::with_capacity(n);
        // Each reactor says whether it could confine itself before it takes any work.
        let (ready, started) = std::sync::mpsc::channel();
        for (id, queues) in reactor_queues.into_iter().enumerate() {
            let reactor = Reactor::new(id, shared.clone(), queues)?;
            let ready = ready.clone();
            let h = std::thread::Builder::new()
                .name(format!("nvcopy-reactor-{id}"))
                .spawn(move || reactor.run(ready))
                .map_err(|source| Error::Spawn {
                    what: format!("reactor {id}"),
                    source,
                })?;
            handles.push(h);
        }
        drop(ready);
        let _ = shared
            .threads
            .set(handles.iter().map(|h| h.thread().clone()).collect());
        for t in shared.threads.get().into_iter().flatten() {
            t.unpark();
        }
        let engine = Engine { shared, handles };
        trace::step("reactors spawned");
        for _ in 0..n {
            match started.recv() {
                Ok((_, Ok(()))) => {}
                // Dropping the engine stops and joins the reactors that did start.
                Ok((reactor, Err(reason))) => return Err(Error::Seccomp { reactor, reason }),
                Err(_) => {
                    return Err(Error::Panicked {
                        what: "a reactor, before it started polling".into(),
                    })
                }
            }
        }
        trace::step("reactors ready (pinned, seccomp filter on)");
        Ok(engine)
    }

    /// Opens the controllers at `addrs` through VFIO and starts the engine on them.
    pub fn open(
        addrs: &[PciAddress],
        platform: &PlatformOptions,
        opts: EngineOptions,
    ) -> Result<Engine> {
        let p = Platform::open(addrs, platform)?;
        let mut unique: Vec<Arc<Controller>> = Vec::new();
        for c in p.controllers {
            if !unique.iter().any(|u| Arc::ptr_eq(u, &c)) {
                unique.push(c);
            }
        }
        Engine::new(unique, p.pool, opts)
    }

    pub(crate) fn shared(&self) -> &Arc<EngineShared> {
        &self.shared
    }

    /// The devices, in the order regions name them.
    pub fn devices(&self) -> &[Arc<dyn Device>] {
        &self.shared.devices
    }

    /// The options the engine runs with.
    pub fn options(&self) -> &EngineOptions {
        &self.shared.opts
    }

    /// Resolves a region written by a user against this engine's controllers, checking
    /// bounds and alignment. `default_len` is used when the spec gives no length.
    pub fn region(&self, spec: &RegionSpec, default_len: Option<u64>) -> Result<Region> {
        let name = spec.place.to_string();
        let i = self
            .shared
            .devices
            .iter()
            .position(|c| c.name() == name)
            .ok_or(Refusal::NotInEngine { ctrl: name })?;
        let v = self.shared.devices[i].volume(spec.nsid)?;
        Region::check(spec, i, v.block_size, v.blocks, default_len)
    }
}

impl Engine {
    /// Stops the reactors (their endpoints close: NVMe I/O queues are deleted), then
    /// shuts every device down and closes it, all devices at once, and unmaps the pool.
    /// Dropping the engine does the same; this is the same with each step traced.
    /// Clients and their jobs must be gone for the devices to close here: a device
    /// still held elsewhere closes when its last holder lets go.
    pub fn close(mut self) {
        self.teardown();
        let shared = self.shared.clone();
        drop(self);
        if Arc::strong_count(&shared) == 1 {
            drop(shared);
            trace::step("DMA pool unmapped");
        }
    }

    fn teardown(&mut self) {
        if self.handles.is_empty() && self.shared.devices.is_empty() {
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        for t in self.shared.threads.get().into_iter().flatten() {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        trace::step("reactors stopped, their endpoints closed");
        // Closing a device makes vfio-pci reset it (100 ms or more each): when nothing else
        // holds the devices, shut them down and close them all at once.
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            crate::platform::close_devices(std::mem::take(&mut shared.devices));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.teardown();
    }
}
