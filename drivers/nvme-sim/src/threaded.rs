//! The software controller on a thread of its own, the way hardware runs beside the host.
//!
//! [`SimController`] does a command's work inside the doorbell store, on the caller's
//! thread. That is simple and deterministic, but it puts the device model's allocations,
//! locks and file I/O on the driver's thread. [`ThreadedSim`] instead records doorbell
//! stores in atomics and lets a device thread act on them, so a test can confine the
//! driver's thread (seccomp, allocation counts) and measure only the driver.
//!
//! With shadow doorbells (Doorbell Buffer Config) the host writes an MMIO doorbell only
//! when the controller's EventIdx asks for one, so the device thread also reads the
//! shadow doorbells on every turn, as QEMU's device does when it processes a queue and on
//! its timer: work posted without a register store is found all the same.
//! [`ThreadedSim::start_polling`] goes further and models a polling device, whose
//! EventIdx never asks for an MMIO write after the first.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::SimController;
use nvcopy_nvme::spec::reg::DOORBELL_BASE;
use nvcopy_nvme::Bar;

struct Doorbells {
    values: Vec<AtomicU32>,
    /// Set by every store to the doorbell: a write is an event, even of the value the
    /// doorbell already had (a queue re-created after a reset rings the same tails again).
    written: Vec<AtomicBool>,
    pending: AtomicBool,
    stop: AtomicBool,
}

/// A [`SimController`] whose doorbells are served by a device thread.
pub struct ThreadedSim {
    sim: Arc<SimController>,
    doorbells: Arc<Doorbells>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ThreadedSim {
    /// Starts the device thread for `sim`.
    pub fn start(sim: Arc<SimController>) -> Arc<ThreadedSim> {
        Self::spawn(sim)
    }

    /// Starts the device thread for `sim` as a polling device: once the host configured
    /// shadow doorbells, the controller keeps each EventIdx one behind what it consumed,
    /// so the host never has to write an MMIO doorbell after a queue's first (every
    /// [`nvcopy_nvme::IoQpair::ring`] that moved the tail after that is a shadow write
    /// alone), and the device thread finds all work by reading the shadow doorbells.
    pub fn start_polling(sim: Arc<SimController>) -> Arc<ThreadedSim> {
        sim.set_polling_eventidx();
        Self::spawn(sim)
    }

    fn spawn(sim: Arc<SimController>) -> Arc<ThreadedSim> {
        let count = sim.len().saturating_sub(DOORBELL_BASE) / 4;
        let doorbells = Arc::new(Doorbells {
            values: (0..count).map(|_| AtomicU32::new(0)).collect(),
            written: (0..count).map(|_| AtomicBool::new(false)).collect(),
            pending: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let (dev, bells) = (sim.clone(), doorbells.clone());
        let thread = std::thread::Builder::new()
            .name("nvme-sim-device".into())
            .spawn(move || device_loop(&dev, &bells))
            .ok();
        Arc::new(ThreadedSim {
            sim,
            doorbells,
            thread: Mutex::new(thread),
        })
    }

    /// The device model, for fault injection, counters and backdoor access.
    pub fn sim(&self) -> &Arc<SimController> {
        &self.sim
    }
}

fn device_loop(sim: &SimController, bells: &Doorbells) {
    let mut idle = 0u32;
    while !bells.stop.load(Ordering::Acquire) {
        // Late and delayed commands land as soon as they are due, as on a device.
        sim.run_due();
        // Work posted through shadow doorbells alone.
        if sim.poll_shadow_doorbells() > 0 {
            idle = 0;
        }
        if !bells.pending.swap(false, Ordering::AcqRel) {
            idle = idle.saturating_add(1);
            if idle > 2000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::thread::yield_now();
            }
            continue;
        }
        idle = 0;
        for (i, v) in bells.values.iter().enumerate() {
            // Acquire pairs with the driver's store, so the entries it wrote before
            // ringing are visible to the model.
            if bells.written[i].swap(false, Ordering::AcqRel) {
                sim.write32(DOORBELL_BASE + i * 4, v.load(Ordering::Acquire));
            }
        }
    }
}

impl Bar for ThreadedSim {
    fn read32(&self, offset: usize) -> u32 {
        self.sim.read32(offset)
    }

    fn write32(&self, offset: usize, value: u32) {
        match offset.checked_sub(DOORBELL_BASE).map(|o| o / 4) {
            Some(i) if i < self.doorbells.values.len() && offset % 4 == 0 => {
                self.doorbells.values[i].store(value, Ordering::Release);
                self.doorbells.written[i].store(true, Ordering::Release);
                self.doorbells.pending.store(true, Ordering::Release);
            }
            _ => self.sim.write32(offset, value),
        }
    }

    fn len(&self) -> usize {
        self.sim.len()
    }

    /// Quiesces the model under its lock: once this returns the device thread can still
    /// deliver doorbells, but the controller acts on none of them.
    fn quiesce(&self) -> bool {
        self.sim.quiesce()
    }
}

impl Drop for ThreadedSim {
    fn drop(&mut self) {
        self.doorbells.stop.store(true, Ordering::Release);
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}
