//! The life of one chunk (a kcopyd sub-job) as a type, and the one place its transitions
//! live. A chunk is read once from the source, then written to every destination; some
//! destinations need no data (an NVMe Copy inside the source's namespace, or zeroes) and
//! are issued at once.
//!
//! ```text
//!            begin                 read ok / no read           turn (sequential only)
//!   Free ──────────────▶ Reading ─────────────────▶ AwaitingTurn ───────────▶ Writing
//!                           │  read failed                 ▲                      │
//!                           └──────────────────────────────┘ (waits its turn      │
//!                                                             even with nothing   │
//!                                                             to write)           ▼
//!                                                                    every command settled
//!                                                                          ──▶ Free
//! ```
//!
//! Each command of a chunk is a [`Cmd`]: idle, in flight, waiting for a retry at a time,
//! or done with an [`Outcome`]. The functions here are pure: they take the time as an
//! argument and return [`Effects`], the commands the reactor must post and whether the
//! chunk ended, so that they are unit-tested as a table without a controller.
//!
//! Under WRITE_SEQUENTIAL (kcopyd's DM_KCOPYD_WRITE_SEQ) every chunk takes its turn, even
//! one whose read failed and that has nothing to write: the turn passes strictly in offset
//! order, so no chunk can be skipped over while an earlier one is still writing.

use std::time::{Duration, Instant};

use crate::job::DestMask;
use crate::region::MAX_DESTS;

/// One command of a chunk, as it rides in a command's token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read the chunk from the source into its pages.
    Read,
    /// Write the chunk's pages to destination `d`.
    Write(u8),
    /// NVMe Copy inside the source's namespace to destination `d`; needs no pages.
    Copy(u8),
    /// Zero destination `d`'s part of the chunk.
    Zero(u8),
    /// Flush destination `d` (a job's last command to it; see [`Token::Flush`]).
    Flush(u8),
}

impl Op {
    /// The destination the op writes, if any.
    pub fn dest(self) -> Option<usize> {
        match self {
            Op::Read => None,
            Op::Write(d) | Op::Copy(d) | Op::Zero(d) | Op::Flush(d) => Some(d as usize),
        }
    }
}

/// What a command token names: a command of the chunk in a reactor's slot, or the Flush of
/// one destination of a job in the reactor's job table. Encoded in one place,
/// [`Token::encode`] and [`Token::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// A chunk's command.
    Chunk {
        /// Reactor slot.
        slot: u16,
        /// The command.
        op: Op,
    },
    /// The Flush a job sends to a destination after its last write.
    Flush {
        /// Index in the reactor's job table.
        job: u16,
        /// Destination.
        dest: u8,
    },
}

const KIND_READ: u64 = 0;
const KIND_WRITE: u64 = 1;
const KIND_COPY: u64 = 2;
const KIND_ZERO: u64 = 3;
const KIND_FLUSH: u64 = 4;

impl Token {
    /// Bits 0-7 the destination, 8-15 the kind, 16-31 the slot or job index.
    pub fn encode(self) -> u64 {
        let (index, kind, dest) = match self {
            Token::Chunk { slot, op } => match op {
                Op::Read => (slot, KIND_READ, 0),
                Op::Write(d) => (slot, KIND_WRITE, d),
                Op::Copy(d) => (slot, KIND_COPY, d),
                Op::Zero(d) => (slot, KIND_ZERO, d),
                Op::Flush(d) => (slot, KIND_FLUSH, d),
            },
            Token::Flush { job, dest } => (job, KIND_FLUSH, dest),
        };
        (index as u64) << 16 | kind << 8 | dest as u64
    }

    /// The token's meaning, or None for bits no [`Token::encode`] produced.
    pub fn decode(bits: u64) -> Option<Token> {
        let index = (bits >> 16) as u16;
        let dest = bits as u8;
        if bits >> 32 != 0 || dest as usize >= MAX_DESTS {
            return None;
        }
        let chunk = |op| Some(Token::Chunk { slot: index, op });
        match bits >> 8 & 0xff {
            KIND_READ if dest == 0 => chunk(Op::Read),
            KIND_WRITE => chunk(Op::Write(dest)),
            KIND_COPY => chunk(Op::Copy(dest)),
            KIND_ZERO => chunk(Op::Zero(dest)),
            KIND_FLUSH => Some(Token::Flush { job: index, dest }),
            _ => None,
        }
    }
}

/// How a command ended for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// It failed and will not be retried.
    Failed,
}

/// One command's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    /// Not issued: not needed, or waiting for the data or the turn.
    Idle,
    /// Posted. `since` is when it was first issued; retries count against the deadline
    /// from there.
    InFlight {
        /// First issue.
        since: Instant,
    },
    /// Waiting to be issued again at `at` (a retry, or a queue that was full).
    RetryAt {
        /// When to issue it again.
        at: Instant,
        /// First issue.
        since: Instant,
    },
    /// Finished.
    Done(Outcome),
}

impl Cmd {
    fn pending(self) -> bool {
        matches!(self, Cmd::InFlight { .. } | Cmd::RetryAt { .. })
    }
}

/// Where the chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not in use.
    Free,
    /// The source read is in flight (commands that need no data may be too).
    Reading,
    /// The data is ready (or the read failed) and the chunk waits for its WRITE_SEQUENTIAL
    /// turn.
    AwaitingTurn,
    /// The writes are in flight.
    Writing,
}

/// How a chunk starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// It reads the source.
    pub read: bool,
    /// Destinations issued at once, needing no data (Copy offload, Write Zeroes).
    pub now: DestMask,
    /// Destinations written once the data is ready and the turn has come.
    pub after: DestMask,
    /// WRITE_SEQUENTIAL: writes wait for the chunk's turn.
    pub sequential: bool,
}

/// How a posted command came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completed {
    /// Success.
    Ok,
    /// Failure the device allows to retry after this long.
    Retryable(Duration),
    /// Failure that must not be retried (DNR, a host-side refusal).
    Failed,
    /// The queue had no room: issue again on a later pass. Costs no retry, and has no
    /// deadline of its own (the commands in the queue have theirs).
    QueueFull,
}

/// Limits on retrying one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries of a command that failed without Do Not Retry.
    pub max_tries: u8,
    /// How long a command may take from its first issue, retries and waits included.
    pub deadline: Duration,
}

/// What the reactor must do after a transition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Post the source read.
    pub read: bool,
    /// Post these destinations' commands.
    pub dests: DestMask,
    /// Put this command on the retry queue for this time.
    pub retry_at: Option<Instant>,
    /// The chunk has ended: report it and free the slot.
    pub finished: bool,
}

/// The state of the chunk in one reactor slot.
///
/// Room for [`MAX_DESTS`] destinations, of which a chunk usually has one or two: what
/// runs per command looks only at the destinations the chunk has (`used`, `pending`),
/// never at the whole array.
#[derive(Clone, Debug)]
pub struct Chunk {
    phase: Phase,
    has_turn: bool,
    read: Cmd,
    /// Meaningful only for the destinations in `used`; the others are left from earlier
    /// chunks and read as [`Cmd::Idle`] (see [`Chunk::cmd`]).
    dests: [Cmd; MAX_DESTS],
    /// The destinations this chunk has a command for, set by [`Chunk::begin`].
    used: DestMask,
    /// The destinations whose command is pending (in flight or waiting for a retry):
    /// kept with every change of `dests` ([`Chunk::set`]), so that the end of the chunk
    /// is found without a scan.
    pending: DestMask,
    after: DestMask,
    /// Meaningful for the destinations in `used` and the read (the last entry).
    tries: [u8; MAX_DESTS + 1],
    read_failed: bool,
    failed: DestMask,
}

impl Default for Chunk {
    fn default() -> Self {
        Chunk {
            phase: Phase::Free,
            has_turn: false,
            read: Cmd::Idle,
            dests: [Cmd::Idle; MAX_DESTS],
            used: DestMask::default(),
            pending: DestMask::default(),
            after: DestMask::default(),
            tries: [0; MAX_DESTS + 1],
            read_failed: false,
            failed: DestMask::default(),
        }
    }
}

fn tries_index(op: Option<usize>) -> usize {
    op.unwrap_or(MAX_DESTS)
}

impl Chunk {
    /// Where the chunk is.
    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// Whether the source read failed.
    pub fn read_failed(&self) -> bool {
        self.read_failed
    }
    /// Destinations whose command failed.
    pub fn failed(&self) -> DestMask {
        self.failed
    }
    /// One command's state (`None`: the read).
    pub fn cmd(&self, dest: Option<usize>) -> Cmd {
        match dest {
            None => self.read,
            Some(d) if self.used.contains(d) => self.dests[d],
            Some(_) => Cmd::Idle,
        }
    }

    /// Changes one command's state: the only place `read` and `dests` are written after
    /// [`Chunk::begin`], so that `pending` always agrees with them.
    fn set(&mut self, dest: Option<usize>, cmd: Cmd) {
        match dest {
            None => self.read = cmd,
            Some(d) => {
                debug_assert!(self.used.contains(d), "destination {d} is not the chunk's");
                self.dests[d] = cmd;
                if cmd.pending() {
                    self.pending.set(d);
                } else {
                    self.pending = self.pending.without(DestMask(1 << d));
                }
            }
        }
    }

    /// Starts a free slot's chunk. `turn`: under WRITE_SEQUENTIAL, whether it is the first
    /// chunk in line.
    #[inline(always)]
    pub fn begin(&mut self, plan: Plan, turn: bool, now: Instant) -> Effects {
        debug_assert_eq!(self.phase, Phase::Free);
        // Field by field rather than from Chunk::default(): the array of every possible
        // destination is reset only where this chunk uses it.
        let used = DestMask(plan.now.0 | plan.after.0);
        for d in bits(used) {
            self.dests[d] = Cmd::Idle;
            self.tries[d] = 0;
        }
        self.tries[tries_index(None)] = 0;
        self.used = used;
        self.pending = DestMask::default();
        self.has_turn = turn || !plan.sequential;
        self.after = plan.after;
        self.read = Cmd::Idle;
        self.read_failed = false;
        self.failed = DestMask::default();
        let mut fx = Effects {
            dests: plan.now,
            ..Effects::default()
        };
        for d in bits(plan.now) {
            self.set(Some(d), Cmd::InFlight { since: now });
        }
        if plan.read {
            self.phase = Phase::Reading;
            self.set(None, Cmd::InFlight { since: now });
            fx.read = true;
        } else {
            self.data_ready(now, &mut fx);
        }
        self.check_end(&mut fx);
        fx
    }

    /// The chunk's WRITE_SEQUENTIAL turn has come.
    pub fn turn(&mut self, now: Instant) -> Effects {
        let mut fx = Effects::default();
        self.has_turn = true;
        if self.phase == Phase::AwaitingTurn {
            self.start_writes(now, &mut fx);
        }
        self.check_end(&mut fx);
        fx
    }

    /// A posted command came back (or could not be posted).
    ///
    /// Inlined, as [`Chunk::begin`] is: the reactor calls each once per command on its
    /// hot path, and passing the arguments and the [`Effects`] through memory cost about
    /// as much as the transition (callgrind-copier.sh: ~45 Ir per completion).
    #[inline(always)]
    pub fn completed(
        &mut self,
        op: Op,
        how: Completed,
        policy: RetryPolicy,
        now: Instant,
    ) -> Effects {
        let mut fx = Effects::default();
        let dest = op.dest();
        let since = match self.cmd(dest) {
            Cmd::InFlight { since } => since,
            // Not in flight: a stale or duplicated completion. Ignore it.
            _ => return fx,
        };
        let tries = &mut self.tries[tries_index(dest)];
        let within = |at: Instant| at.saturating_duration_since(since) <= policy.deadline;
        let end = match how {
            Completed::Ok => Outcome::Ok,
            // No deadline of its own: the commands that fill the queue have theirs, and
            // their timeouts reset the controller, which empties it.
            Completed::QueueFull => {
                self.set(dest, Cmd::RetryAt { at: now, since });
                fx.retry_at = Some(now);
                return fx;
            }
            Completed::Retryable(wait) if *tries < policy.max_tries && within(now + wait) => {
                *tries += 1;
                let at = now + wait;
                self.set(dest, Cmd::RetryAt { at, since });
                fx.retry_at = Some(at);
                return fx;
            }
            _ => Outcome::Failed,
        };
        self.set(dest, Cmd::Done(end));
        match (dest, end) {
            (None, Outcome::Ok) => self.data_ready(now, &mut fx),
            (None, Outcome::Failed) => {
                // A chunk that could not be read is written nowhere.
                self.read_failed = true;
                self.after = DestMask::default();
                self.data_ready(now, &mut fx);
            }
            (Some(d), Outcome::Failed) => self.failed.set(d),
            (Some(_), Outcome::Ok) => {}
        }
        self.check_end(&mut fx);
        fx
    }

    /// A retry's time has come (or a stale entry of the retry queue: then nothing).
    pub fn retry_due(&mut self, op: Op, now: Instant) -> Effects {
        let mut fx = Effects::default();
        let dest = op.dest();
        if let Cmd::RetryAt { at, since } = self.cmd(dest) {
            if at <= now {
                self.set(dest, Cmd::InFlight { since });
                match dest {
                    None => fx.read = true,
                    Some(d) => fx.dests.set(d),
                }
            }
        }
        fx
    }

    /// The controller was reset under an in-flight command, which may be issued again: its
    /// deadline starts over, its retries do not.
    pub fn reissue(&mut self, op: Op, now: Instant) -> Effects {
        let mut fx = Effects::default();
        let dest = op.dest();
        if self.cmd(dest).pending() {
            self.set(dest, Cmd::InFlight { since: now });
            match dest {
                None => fx.read = true,
                Some(d) => fx.dests.set(d),
            }
        }
        fx
    }

    /// Fails a pending command for good (its controller was given up).
    pub fn abort(&mut self, op: Op, now: Instant) -> Effects {
        if !self.cmd(op.dest()).pending() {
            return Effects::default();
        }
        self.set(op.dest(), Cmd::InFlight { since: now });
        let never = RetryPolicy {
            max_tries: 0,
            deadline: Duration::ZERO,
        };
        self.completed(op, Completed::Failed, never, now)
    }

    fn data_ready(&mut self, now: Instant, fx: &mut Effects) {
        if self.has_turn {
            self.start_writes(now, fx);
        } else {
            self.phase = Phase::AwaitingTurn;
        }
    }

    fn start_writes(&mut self, now: Instant, fx: &mut Effects) {
        self.phase = Phase::Writing;
        for d in bits(self.after) {
            self.set(Some(d), Cmd::InFlight { since: now });
            fx.dests.set(d);
        }
        self.after = DestMask::default();
    }

    fn check_end(&mut self, fx: &mut Effects) {
        // Only a chunk whose writes were started can end, once nothing is pending.
        let done = self.phase == Phase::Writing && !self.read.pending() && !self.pending.any();
        if done {
            self.phase = Phase::Free;
            fx.finished = true;
        }
    }
}

/// The indexes of the bits set in `m`, lowest first.
pub fn bits(m: DestMask) -> impl Iterator<Item = usize> {
    let mut v = m.0;
    std::iter::from_fn(move || {
        if v == 0 {
            return None;
        }
        let i = v.trailing_zeros() as usize;
        v &= v - 1;
        Some(i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_tries: 2,
        deadline: Duration::from_secs(30),
    };

    fn mask(ds: &[usize]) -> DestMask {
        let mut m = DestMask::default();
        for &d in ds {
            m.set(d);
        }
        m
    }

    fn copy(after: &[usize], now: &[usize], sequential: bool) -> Plan {
        Plan {
            read: true,
            now: mask(now),
            after: mask(after),
            sequential,
        }
    }

    #[test]
    fn tokens_round_trip_and_reject_foreign_bits() {
        let all = [
            Token::Chunk {
                slot: 0,
                op: Op::Read,
            },
            Token::Chunk {
                slot: 7,
                op: Op::Write(63),
            },
            Token::Chunk {
                slot: u16::MAX,
                op: Op::Copy(1),
            },
            Token::Chunk {
                slot: 3,
                op: Op::Zero(2),
            },
            Token::Flush { job: 9, dest: 5 },
        ];
        for t in all {
            assert_eq!(Token::decode(t.encode()), Some(t), "{t:?}");
        }
        assert_eq!(Token::decode(5 << 8), None, "unknown kind");
        assert_eq!(Token::decode(64), None, "destination out of range");
        assert_eq!(Token::decode(1 << 40), None, "high bits");
        assert_eq!(Token::decode(3), None, "a read names no destination");
    }

    /// The transition table: (name, plan, turn at start, steps, expected effects per step,
    /// expected phase after the last step).
    #[test]
    fn transition_table() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        enum Step {
            Done(Op, Completed, u64),
            Due(Op, u64),
            Turn(u64),
        }
        use Step::*;
        struct Row {
            name: &'static str,
            plan: Plan,
            turn: bool,
            begin: Effects,
            steps: Vec<(Step, Effects)>,
            read_failed: bool,
            failed: DestMask,
        }
        let fx = |read: bool, dests: &[usize], retry: Option<u64>, finished: bool| Effects {
            read,
            dests: mask(dests),
            retry_at: retry.map(ms),
            finished,
        };
        let none = Effects::default();
        let rows = vec![
            Row {
                name: "read then write two destinations",
                plan: copy(&[0, 1], &[], false),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (
                        Done(Op::Read, Completed::Ok, 1),
                        fx(false, &[0, 1], None, false),
                    ),
                    (Done(Op::Write(1), Completed::Ok, 2), none),
                    (
                        Done(Op::Write(0), Completed::Ok, 3),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: false,
                failed: mask(&[]),
            },
            Row {
                name: "a failed read writes nowhere but offloads finish",
                plan: copy(&[0], &[1], false),
                turn: false,
                begin: fx(true, &[1], None, false),
                steps: vec![
                    (Done(Op::Read, Completed::Failed, 1), none),
                    (
                        Done(Op::Copy(1), Completed::Ok, 2),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: true,
                failed: mask(&[]),
            },
            Row {
                name: "retry after the device's delay, then succeed",
                plan: copy(&[0], &[], false),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (
                        Done(Op::Read, Completed::Retryable(Duration::from_millis(5)), 1),
                        fx(false, &[], Some(6), false),
                    ),
                    (Due(Op::Read, 4), none),
                    (Due(Op::Read, 6), fx(true, &[], None, false)),
                    (
                        Done(Op::Read, Completed::Ok, 7),
                        fx(false, &[0], None, false),
                    ),
                    (
                        Done(Op::Write(0), Completed::Ok, 8),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: false,
                failed: mask(&[]),
            },
            Row {
                name: "retries run out",
                plan: copy(&[0], &[], false),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (
                        Done(Op::Read, Completed::Ok, 1),
                        fx(false, &[0], None, false),
                    ),
                    (
                        Done(Op::Write(0), Completed::Retryable(Duration::ZERO), 2),
                        fx(false, &[], Some(2), false),
                    ),
                    (Due(Op::Write(0), 2), fx(false, &[0], None, false)),
                    (
                        Done(Op::Write(0), Completed::Retryable(Duration::ZERO), 3),
                        fx(false, &[], Some(3), false),
                    ),
                    (Due(Op::Write(0), 3), fx(false, &[0], None, false)),
                    (
                        Done(Op::Write(0), Completed::Retryable(Duration::ZERO), 4),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: false,
                failed: mask(&[0]),
            },
            Row {
                name: "a retry delay past the deadline fails at once",
                plan: copy(&[0], &[], false),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![(
                    Done(Op::Read, Completed::Retryable(Duration::from_secs(31)), 1),
                    fx(false, &[], None, true),
                )],
                read_failed: true,
                failed: mask(&[]),
            },
            Row {
                name: "a full queue waits without using a retry",
                plan: copy(&[0], &[], false),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (
                        Done(Op::Read, Completed::QueueFull, 1),
                        fx(false, &[], Some(1), false),
                    ),
                    (Due(Op::Read, 1), fx(true, &[], None, false)),
                    (
                        Done(Op::Read, Completed::QueueFull, 2),
                        fx(false, &[], Some(2), false),
                    ),
                    (Due(Op::Read, 2), fx(true, &[], None, false)),
                    (
                        Done(Op::Read, Completed::Ok, 3),
                        fx(false, &[0], None, false),
                    ),
                    (
                        Done(Op::Write(0), Completed::Ok, 4),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: false,
                failed: mask(&[]),
            },
            Row {
                name: "a queue full for longer than the deadline still waits",
                plan: copy(&[0], &[], false),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (
                        Done(Op::Read, Completed::QueueFull, 31_000),
                        fx(false, &[], Some(31_000), false),
                    ),
                    (Due(Op::Read, 31_000), fx(true, &[], None, false)),
                    (
                        Done(Op::Read, Completed::Failed, 31_001),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: true,
                failed: mask(&[]),
            },
            Row {
                name: "sequential: data ready before the turn waits for it",
                plan: copy(&[0], &[], true),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (Done(Op::Read, Completed::Ok, 1), none),
                    (Turn(2), fx(false, &[0], None, false)),
                    (
                        Done(Op::Write(0), Completed::Ok, 3),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: false,
                failed: mask(&[]),
            },
            Row {
                name: "sequential: the turn before the data",
                plan: copy(&[0], &[], true),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (Turn(1), none),
                    (
                        Done(Op::Read, Completed::Ok, 2),
                        fx(false, &[0], None, false),
                    ),
                    (
                        Done(Op::Write(0), Completed::Ok, 3),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: false,
                failed: mask(&[]),
            },
            Row {
                name: "sequential: a failed read still waits for its turn",
                plan: copy(&[0], &[], true),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (Done(Op::Read, Completed::Failed, 1), none),
                    (Turn(2), fx(false, &[], None, true)),
                ],
                read_failed: true,
                failed: mask(&[]),
            },
            Row {
                name: "zero without a read, first in line",
                plan: Plan {
                    read: false,
                    now: mask(&[]),
                    after: mask(&[0, 2]),
                    sequential: true,
                },
                turn: true,
                begin: fx(false, &[0, 2], None, false),
                steps: vec![
                    (Done(Op::Zero(0), Completed::Failed, 1), none),
                    (
                        Done(Op::Zero(2), Completed::Ok, 2),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: false,
                failed: mask(&[0]),
            },
            Row {
                name: "a completion for a command not in flight is ignored",
                plan: copy(&[0], &[], false),
                turn: false,
                begin: fx(true, &[], None, false),
                steps: vec![
                    (Done(Op::Write(0), Completed::Ok, 1), none),
                    (Done(Op::Write(5), Completed::Failed, 1), none),
                    (
                        Done(Op::Read, Completed::Ok, 2),
                        fx(false, &[0], None, false),
                    ),
                    (Done(Op::Read, Completed::Ok, 3), none),
                    (
                        Done(Op::Write(0), Completed::Ok, 4),
                        fx(false, &[], None, true),
                    ),
                ],
                read_failed: false,
                failed: mask(&[]),
            },
        ];
        for row in rows {
            let mut c = Chunk::default();
            assert_eq!(
                c.begin(row.plan, row.turn, t0),
                row.begin,
                "{}: begin",
                row.name
            );
            for (i, (step, want)) in row.steps.into_iter().enumerate() {
                let got = match step {
                    Done(op, how, at) => c.completed(op, how, POLICY, ms(at)),
                    Due(op, at) => c.retry_due(op, ms(at)),
                    Turn(at) => c.turn(ms(at)),
                };
                assert_eq!(got, want, "{}: step {i}", row.name);
            }
            assert_eq!(c.phase(), Phase::Free, "{}: ends free", row.name);
            assert_eq!(c.read_failed(), row.read_failed, "{}", row.name);
            assert_eq!(c.failed(), row.failed, "{}", row.name);
        }
    }

    #[test]
    fn reset_reissues_pending_commands_with_a_fresh_deadline() {
        let t0 = Instant::now();
        let mut c = Chunk::default();
        c.begin(copy(&[0], &[], false), false, t0);
        let later = t0 + Duration::from_secs(29);
        let fx = c.reissue(Op::Read, later);
        assert!(fx.read);
        assert_eq!(c.cmd(None), Cmd::InFlight { since: later });
        // A reissued command gets its whole deadline again.
        let fx = c.completed(
            Op::Read,
            Completed::QueueFull,
            POLICY,
            later + Duration::from_secs(10),
        );
        assert!(fx.retry_at.is_some());
        // A command that is not pending is not reissued.
        assert_eq!(c.reissue(Op::Write(0), later), Effects::default());
    }

    #[test]
    fn abort_fails_a_pending_command_once() {
        let t0 = Instant::now();
        let mut c = Chunk::default();
        c.begin(copy(&[0, 1], &[], false), false, t0);
        c.completed(Op::Read, Completed::Ok, POLICY, t0);
        c.completed(
            Op::Write(0),
            Completed::Retryable(Duration::ZERO),
            POLICY,
            t0,
        );
        assert_eq!(c.abort(Op::Write(0), t0), Effects::default());
        let fx = c.abort(Op::Write(1), t0);
        assert!(fx.finished);
        assert_eq!(c.failed(), mask(&[0, 1]));
        assert_eq!(c.abort(Op::Write(1), t0), Effects::default());
    }

    #[test]
    fn a_reused_chunk_knows_only_its_own_destinations() {
        let t0 = Instant::now();
        let mut c = Chunk::default();
        // Three destinations, one of them left waiting for a retry when the chunk is
        // aborted: the slot's array keeps states for all three.
        c.begin(copy(&[0, 1, 2], &[], false), false, t0);
        c.completed(Op::Read, Completed::Ok, POLICY, t0);
        c.completed(Op::Write(0), Completed::Ok, POLICY, t0);
        c.completed(Op::Write(1), Completed::Failed, POLICY, t0);
        c.completed(Op::Write(2), Completed::QueueFull, POLICY, t0);
        assert!(c.abort(Op::Write(2), t0).finished);
        // The next chunk in the slot has one destination.
        c.begin(copy(&[0], &[], false), false, t0);
        assert_eq!(c.cmd(Some(1)), Cmd::Idle);
        assert_eq!(c.cmd(Some(2)), Cmd::Idle);
        assert_eq!(c.failed(), DestMask::default());
        assert_eq!(
            c.completed(Op::Write(2), Completed::Ok, POLICY, t0),
            Effects::default(),
            "not this chunk's destination"
        );
        assert_eq!(c.retry_due(Op::Write(2), t0), Effects::default());
        assert_eq!(c.reissue(Op::Write(1), t0), Effects::default());
        let fx = c.completed(Op::Read, Completed::Ok, POLICY, t0);
        assert_eq!(fx.dests, mask(&[0]));
        assert!(
            c.completed(Op::Write(0), Completed::Ok, POLICY, t0)
                .finished
        );
        assert_eq!(c.phase(), Phase::Free);
    }

    #[test]
    fn bits_lists_set_indexes() {
        assert_eq!(bits(mask(&[0, 5, 63])).collect::<Vec<_>>(), vec![0, 5, 63]);
        assert_eq!(bits(DestMask::default()).count(), 0);
    }
}
