//! What the controller has seen: doorbell stores per queue and commands per opcode, for
//! tests (doorbell batching, shadow doorbells) and benchmarks (cost per command). Doorbell
//! counts are MMIO stores only; a shadow doorbell write is not one.

/// A snapshot of the controller's counters, from [`super::SimController::counters`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    sq_doorbells: Vec<u64>,
    cq_doorbells: Vec<u64>,
    admin: Vec<u64>,
    io: Vec<u64>,
    invalid_doorbells: u64,
    completions: u64,
    swallowed: u64,
    held: u64,
    dropped: u64,
    shadow_pickups: u64,
}

impl Counters {
    pub(super) fn new(queues: usize) -> Self {
        Counters {
            sq_doorbells: vec![0; queues],
            cq_doorbells: vec![0; queues],
            admin: vec![0; 256],
            io: vec![0; 256],
            invalid_doorbells: 0,
            completions: 0,
            swallowed: 0,
            held: 0,
            dropped: 0,
            shadow_pickups: 0,
        }
    }

    pub(super) fn note_doorbell(&mut self, qid: u16, completion: bool) {
        let v = if completion {
            &mut self.cq_doorbells
        } else {
            &mut self.sq_doorbells
        };
        if let Some(n) = v.get_mut(qid as usize) {
            *n += 1;
        }
    }

    pub(super) fn note_invalid_doorbell(&mut self) {
        self.invalid_doorbells += 1;
    }

    pub(super) fn note_command(&mut self, admin: bool, opcode: u8) {
        let v = if admin { &mut self.admin } else { &mut self.io };
        v[opcode as usize] += 1;
    }

    pub(super) fn note_completion(&mut self) {
        self.completions += 1;
    }

    pub(super) fn note_swallowed(&mut self) {
        self.swallowed += 1;
    }

    pub(super) fn note_held(&mut self) {
        self.held += 1;
    }

    pub(super) fn note_shadow_pickup(&mut self) {
        self.shadow_pickups += 1;
    }

    pub(super) fn note_dropped(&mut self, n: usize) {
        self.dropped += n as u64;
    }

    /// Stores to queue `qid`'s SQ tail doorbell.
    pub fn sq_doorbell_writes(&self, qid: u16) -> u64 {
        self.sq_doorbells.get(qid as usize).copied().unwrap_or(0)
    }

    /// Stores to queue `qid`'s CQ head doorbell.
    pub fn cq_doorbell_writes(&self, qid: u16) -> u64 {
        self.cq_doorbells.get(qid as usize).copied().unwrap_or(0)
    }

    /// Doorbell stores the controller ignored: no such queue, a value outside the queue,
    /// a CQ head past the entries posted, or the controller not ready.
    pub fn invalid_doorbell_writes(&self) -> u64 {
        self.invalid_doorbells
    }

    /// Admin commands fetched with this opcode.
    pub fn admin_commands(&self, opcode: u8) -> u64 {
        self.admin[opcode as usize]
    }

    /// I/O commands fetched with this opcode.
    pub fn io_commands(&self, opcode: u8) -> u64 {
        self.io[opcode as usize]
    }

    /// I/O commands fetched, all opcodes.
    pub fn total_io_commands(&self) -> u64 {
        self.io.iter().sum()
    }

    /// Completion entries produced (posted or held while the CQ was full), bogus ones
    /// included.
    pub fn completions(&self) -> u64 {
        self.completions
    }

    /// Commands swallowed by a fault.
    pub fn swallowed(&self) -> u64 {
        self.swallowed
    }

    /// Commands held back by a `late` or `delay` fault, to run later.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Times a polling device ([`super::ThreadedSim::start_polling`], or the threaded
    /// controller's own look at the shadow doorbells) found a shadow SQ tail moved that no
    /// doorbell store had announced yet.
    pub fn shadow_pickups(&self) -> u64 {
        self.shadow_pickups
    }

    /// Held commands that never ran: a reset or a quiesce dropped them.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}
