//! Fault injection: media errors on chosen LBAs, commands that never complete or complete
//! late, controller fatal status, completions with a command id the host never issued, a
//! paused controller that lets submission queues fill, a controller that will not stop
//! and one whose bus mastering cannot be turned off. Faults can be changed at any time through
//! [`Faults`], the handle [`super::SimController::faults`] returns.

use std::ops::Range;
use std::time::Duration;

use super::status::{unrecovered_read_error, write_fault};
use super::SimController;
use nvcopy_nvme::spec::io;
use nvcopy_nvme::spec::Sqe;
use nvcopy_nvme::Status;

/// Names an injected fault, to remove it or read its hit count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultId(u64);

/// Media errors on a range of LBAs of one namespace: reads fail with Unrecovered Read
/// Error (SCT 2h, SC 81h), writes with Write Fault (SCT 2h, SC 80h). Any command whose
/// blocks overlap the range fails (Copy: a source range for reads, the destination for
/// writes; Write Zeroes counts as a write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediaError {
    nsid: u32,
    lbas: Range<u64>,
    reads: bool,
    writes: bool,
    dnr: bool,
    times: Option<u32>,
}

impl MediaError {
    /// Reads of `lbas` on `nsid` fail, without DNR, every time.
    pub fn read(nsid: u32, lbas: Range<u64>) -> Self {
        MediaError {
            nsid,
            lbas,
            reads: true,
            writes: false,
            dnr: false,
            times: None,
        }
    }

    /// Writes to `lbas` on `nsid` fail, without DNR, every time.
    pub fn write(nsid: u32, lbas: Range<u64>) -> Self {
        MediaError {
            reads: false,
            writes: true,
            ..Self::read(nsid, lbas)
        }
    }

    /// Both reads and writes of `lbas` fail.
    pub fn read_write(nsid: u32, lbas: Range<u64>) -> Self {
        MediaError {
            writes: true,
            ..Self::read(nsid, lbas)
        }
    }

    /// Sets Do Not Retry in the status.
    pub fn dnr(mut self, dnr: bool) -> Self {
        self.dnr = dnr;
        self
    }

    /// Fails only the first `n` commands that hit the range; later ones succeed.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }
}

/// Which commands a fault applies to. Every condition set must match; `any()` matches
/// every command on every queue, including admin commands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommandFilter {
    admin: Option<bool>,
    qid: Option<u16>,
    opcode: Option<u8>,
    nsid: Option<u32>,
    lbas: Option<Range<u64>>,
    times: Option<u32>,
}

impl CommandFilter {
    /// Every command.
    pub fn any() -> Self {
        Self::default()
    }
    /// Commands on I/O queues only.
    pub fn io() -> Self {
        CommandFilter {
            admin: Some(false),
            ..Self::default()
        }
    }
    /// Commands on the admin queue only.
    pub fn admin() -> Self {
        CommandFilter {
            admin: Some(true),
            ..Self::default()
        }
    }
    /// Only on queue `qid`.
    pub fn qid(mut self, qid: u16) -> Self {
        self.qid = Some(qid);
        self
    }
    /// Only this opcode.
    pub fn opcode(mut self, opcode: u8) -> Self {
        self.opcode = Some(opcode);
        self
    }
    /// Only commands for this namespace.
    pub fn nsid(mut self, nsid: u32) -> Self {
        self.nsid = Some(nsid);
        self
    }
    /// Only Read, Write, Write Zeroes or Copy commands whose blocks (Copy: destination)
    /// overlap `lbas`.
    pub fn lbas(mut self, lbas: Range<u64>) -> Self {
        self.lbas = Some(lbas);
        self
    }
    /// Only the first `n` matching commands.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, qid: u16, sqe: &Sqe) -> bool {
        if self.times == Some(0) {
            return false;
        }
        let admin = qid == 0;
        let lbas_match = match &self.lbas {
            None => true,
            Some(r) => lba_span(admin, sqe).is_some_and(|s| overlaps(&s, r)),
        };
        unset_or(self.admin, admin)
            && unset_or(self.qid, qid)
            && unset_or(self.opcode, sqe.opcode())
            && unset_or(self.nsid, sqe.nsid)
            && lbas_match
    }
}

/// A filter condition: met when not set, or set to `got`.
fn unset_or<T: PartialEq>(want: Option<T>, got: T) -> bool {
    match want {
        None => true,
        Some(w) => w == got,
    }
}

/// The blocks an I/O command names in CDW10-12 (Copy: its destination; the source ranges
/// are in its descriptors).
fn lba_span(admin: bool, sqe: &Sqe) -> Option<Range<u64>> {
    if admin {
        return None;
    }
    let nlb = match sqe.opcode() {
        io::READ | io::WRITE | io::WRITE_ZEROES => (sqe.cdw12 & 0xffff) as u64 + 1,
        // The destination length is only known from the descriptors; the first block is
        // enough to aim a filter at it.
        io::COPY => 1,
        _ => return None,
    };
    let slba = sqe.slba();
    Some(slba..slba.saturating_add(nlb))
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// A completion with a command id the host did not issue, for the next I/O command.
#[derive(Clone, Copy, Debug)]
struct BogusCid {
    cid: u16,
    keep_real: bool,
}

#[derive(Debug)]
struct Entry<T> {
    id: FaultId,
    fault: T,
    hits: u64,
}

/// Every fault in force, kept in the controller's state.
#[derive(Debug, Default)]
pub(super) struct FaultState {
    next: u64,
    media: Vec<Entry<MediaError>>,
    swallow: Vec<Entry<CommandFilter>>,
    /// `late` and `delay`: matching commands run this long after they were fetched.
    hold: Vec<Entry<(CommandFilter, Duration)>>,
    /// `fail`: matching commands complete with this status and do nothing else.
    fail: Vec<Entry<(CommandFilter, Status)>>,
    bogus: Option<BogusCid>,
    /// Raised CSTS.CFS: the controller stops processing commands.
    pub fatal: bool,
    /// I/O submission queues are not fetched from.
    pub io_paused: bool,
    /// [`Bar::quiesce`](nvcopy_nvme::Bar::quiesce) fails: returns false and DMA goes on.
    pub quiesce_fails: bool,
    /// Clearing CC.EN does not reset the controller: CSTS.RDY stays 1.
    pub stuck_ready: bool,
    /// CRDT1-3 that Identify Controller reports, in 100 ms units.
    pub crdt: [u16; 3],
    /// Hit counts of removed faults are kept so tests can read them afterwards.
    retired: Vec<(FaultId, u64)>,
}

impl FaultState {
    fn id(&mut self) -> FaultId {
        self.next += 1;
        FaultId(self.next)
    }

    /// Whether the command on `qid` is to be swallowed (fetched and never completed).
    pub fn swallows(&mut self, qid: u16, sqe: &Sqe) -> bool {
        first_match(&mut self.swallow, |f| f, qid, sqe).is_some()
    }

    /// The status to fail the command on `qid` with, if a fault says so.
    pub fn fails(&mut self, qid: u16, sqe: &Sqe) -> Option<Status> {
        first_match(&mut self.fail, |f| &mut f.0, qid, sqe).map(|e| e.fault.1)
    }

    /// How long to hold the command on `qid` before running it, if a fault says so.
    pub fn holds(&mut self, qid: u16, sqe: &Sqe) -> Option<Duration> {
        first_match(&mut self.hold, |f| &mut f.0, qid, sqe).map(|e| e.fault.1)
    }

    /// The media error status for an access to `lbas` of `nsid`, if a fault covers it.
    pub fn media(&mut self, nsid: u32, lbas: Range<u64>, write: bool) -> Option<Status> {
        for e in &mut self.media {
            let f = &mut e.fault;
            let applies = if write { f.writes } else { f.reads };
            if !applies || f.nsid != nsid || f.times == Some(0) || !overlaps(&f.lbas, &lbas) {
                continue;
            }
            e.hits += 1;
            if let Some(t) = &mut f.times {
                *t -= 1;
            }
            return Some(if write {
                write_fault(f.dnr)
            } else {
                unrecovered_read_error(f.dnr)
            });
        }
        None
    }

    /// Takes the armed bogus completion, if any: (bogus cid, whether to post the real one
    /// as well).
    pub fn take_bogus(&mut self) -> Option<(u16, bool)> {
        self.bogus.take().map(|b| (b.cid, b.keep_real))
    }

    /// (id, hits) of every fault in force.
    fn in_force(&self) -> Vec<(FaultId, u64)> {
        fn ids<T>(v: &[Entry<T>]) -> impl Iterator<Item = (FaultId, u64)> + '_ {
            v.iter().map(|e| (e.id, e.hits))
        }
        ids(&self.media)
            .chain(ids(&self.swallow))
            .chain(ids(&self.hold))
            .chain(ids(&self.fail))
            .collect()
    }

    fn hits(&self, id: FaultId) -> Option<u64> {
        self.in_force()
            .into_iter()
            .chain(self.retired.iter().copied())
            .find(|r| r.0 == id)
            .map(|r| r.1)
    }

    fn remove(&mut self, id: FaultId) -> bool {
        fn take<T>(v: &mut Vec<Entry<T>>, id: FaultId) -> Option<u64> {
            let i = v.iter().position(|e| e.id == id)?;
            Some(v.remove(i).hits)
        }
        let hits = take(&mut self.media, id)
            .or_else(|| take(&mut self.swallow, id))
            .or_else(|| take(&mut self.hold, id))
            .or_else(|| take(&mut self.fail, id));
        match hits {
            Some(h) => {
                self.retired.push((id, h));
                true
            }
            None => false,
        }
    }

    fn push<T>(&mut self, list: impl FnOnce(&mut Self) -> &mut Vec<Entry<T>>, fault: T) -> FaultId {
        let id = self.id();
        list(self).push(Entry { id, fault, hits: 0 });
        id
    }
}

/// The first fault of `list` whose filter (`filter` of the fault) matches the command;
/// counts the hit and one of the filter's `times`.
fn first_match<'a, T>(
    list: &'a mut [Entry<T>],
    filter: impl Fn(&mut T) -> &mut CommandFilter,
    qid: u16,
    sqe: &Sqe,
) -> Option<&'a mut Entry<T>> {
    let i = list
        .iter_mut()
        .position(|e| filter(&mut e.fault).matches(qid, sqe))?;
    let e = &mut list[i];
    e.hits += 1;
    if let Some(t) = &mut filter(&mut e.fault).times {
        *t -= 1;
    }
    Some(e)
}

/// The fault-injection handle of a [`SimController`]. Every change takes effect for the
/// next command the controller fetches.
#[derive(Debug)]
pub struct Faults<'a> {
    pub(super) sim: &'a SimController,
}

impl Faults<'_> {
    /// Injects media errors.
    pub fn media_error(&self, e: MediaError) -> FaultId {
        self.sim.with_state(|st| {
            let id = st.faults.id();
            st.faults.media.push(Entry {
                id,
                fault: e,
                hits: 0,
            });
            id
        })
    }

    /// Swallows matching commands: the controller fetches them (the SQ head moves) and
    /// never completes them, so the host's timeout must fire.
    pub fn swallow(&self, filter: CommandFilter) -> FaultId {
        self.sim.with_state(|st| {
            let id = st.faults.id();
            st.faults.swallow.push(Entry {
                id,
                fault: filter,
                hits: 0,
            });
            id
        })
    }

    /// Holds matching commands back: the controller fetches them (the SQ head moves) and
    /// their whole effect (data moved into host memory for a Read, the namespace written
    /// for a Write, the completion) happens only once `delay` has passed, like a device
    /// that answers after the host gave up. A controller reset (CC.EN 1 -> 0 with
    /// CSTS.RDY reaching 0, base spec 3.7.2) or a successful quiesce in between drops
    /// them, as a real controller abandons what it had in progress; deleting their SQ
    /// completes them as aborted.
    ///
    /// They run at the first register access after they fall due (doorbells included)
    /// or at [`SimController::run_due`]; on a [`super::ThreadedSim`], on the device
    /// thread as soon as they are due.
    pub fn late(&self, filter: CommandFilter, delay: Duration) -> FaultId {
        self.sim
            .with_state(|st| st.faults.push(|f| &mut f.hold, (filter, delay)))
    }

    /// Slow commands: matching commands complete correctly, `delay` after they were
    /// fetched (a slow Flush). The same machinery as [`Faults::late`], and the same rules:
    /// a reset or quiesce meanwhile drops them. `late` says the host is expected to give
    /// up first; `delay` that it is expected to wait.
    pub fn delay(&self, filter: CommandFilter, delay: Duration) -> FaultId {
        self.late(filter, delay)
    }

    /// Fails matching commands with `status` (build one with [`Status::new`],
    /// [`Status::with_dnr`] and [`Status::with_crd`]): the command does nothing else (no
    /// data moved, no namespace change) and completes with that status, at once or,
    /// with a [`Faults::late`] or [`Faults::delay`] fault matching too, when that is due.
    /// This reaches what [`MediaError`] cannot, such as a failed Flush, and carries a
    /// Command Retry Delay index (base spec 4.6.1) for testing retry delays; see
    /// [`Faults::command_retry_delays`].
    pub fn fail(&self, filter: CommandFilter, status: Status) -> FaultId {
        self.sim
            .with_state(|st| st.faults.push(|f| &mut f.fail, (filter, status)))
    }

    /// CRDT1-3 in 100 ms units: how long a host should wait before retrying a command
    /// whose status has CRD 1, 2 or 3 (Identify Controller bytes 134-139, base spec
    /// 5.17.2.1). The driver reads them at bring-up, so set them before it. Zero (the
    /// default) means no delay.
    pub fn command_retry_delays(&self, crdt: [u16; 3]) {
        self.sim.with_state(|st| st.faults.crdt = crdt);
    }

    /// How many commands a media error, swallow, late, delay or fail fault has hit so
    /// far.
    pub fn hits(&self, id: FaultId) -> u64 {
        self.sim.with_state(|st| st.faults.hits(id).unwrap_or(0))
    }

    /// Removes one fault; false if it was not in force.
    pub fn remove(&self, id: FaultId) -> bool {
        self.sim.with_state(|st| st.faults.remove(id))
    }

    /// Sets or clears CSTS.CFS. While it is set the controller processes no commands and
    /// does not become ready.
    pub fn set_fatal(&self, on: bool) {
        self.sim.with_state(|st| st.faults.fatal = on);
    }

    /// Completes the next I/O command with command id `cid` (for example 0xffff, or an id
    /// that is not outstanding), and with its real command id as well if `keep_real`
    /// (the bogus entry comes first). Without `keep_real` the real command never
    /// completes.
    pub fn bogus_cid_next(&self, cid: u16, keep_real: bool) {
        self.sim
            .with_state(|st| st.faults.bogus = Some(BogusCid { cid, keep_real }));
    }

    /// Stops fetching from I/O submission queues: doorbells still move the tails, so the
    /// queues fill up and nothing completes.
    pub fn pause_io(&self) {
        self.sim.with_state(|st| st.faults.io_paused = true);
    }

    /// Undoes [`Faults::pause_io`] and processes everything submitted meanwhile.
    pub fn resume_io(&self) {
        self.sim.with_state(|st| st.faults.io_paused = false);
        self.sim.kick();
    }

    /// Makes [`Bar::quiesce`](nvcopy_nvme::Bar::quiesce) fail (or succeed again): it returns false and the
    /// controller keeps fetching commands, moving data and posting completions, like a
    /// device whose bus mastering cannot be confirmed off.
    pub fn quiesce_fails(&self, on: bool) {
        self.sim.with_state(|st| st.faults.quiesce_fails = on);
    }

    /// A controller that will not stop: clearing CC.EN leaves CSTS.RDY at 1, and the
    /// controller keeps its queues and goes on fetching and completing commands, so a
    /// host waiting for RDY = 0 (base spec 3.7.2) gives up after CAP.TO (make it short
    /// with [`super::SimConfig::cap_timeout`]). A CC.EN 0 -> 1 meanwhile changes nothing.
    /// Turning the fault off while CC.EN is 0 completes the reset that was asked for.
    pub fn stuck_ready(&self, on: bool) {
        self.sim.with_state(|st| {
            st.faults.stuck_ready = on;
            if !on {
                super::engine::finish_pending_reset(st);
            }
        });
    }

    /// Removes every fault (hit counts of removed faults stay readable), clears CFS and
    /// resumes I/O.
    pub fn clear(&self) {
        self.sim.with_state(|st| {
            let f = &mut st.faults;
            for (id, _) in f.in_force() {
                f.remove(id);
            }
            f.bogus = None;
            f.fatal = false;
            f.io_paused = false;
            f.quiesce_fails = false;
            f.stuck_ready = false;
            super::engine::finish_pending_reset(st);
        });
        self.sim.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_media_errors_count_down() {
        let mut f = FaultState::default();
        let mut s = Sqe::new(io::READ, 1);
        s.set_slba(100);
        s.cdw12 = 7; // blocks 100..108
        let flt = CommandFilter::io().opcode(io::READ).lbas(107..200).times(1);
        assert!(!flt.matches(0, &s), "admin queue excluded");
        assert!(flt.matches(1, &s));
        assert!(!CommandFilter::io().lbas(108..200).matches(1, &s));
        f.swallow.push(Entry {
            id: FaultId(1),
            fault: flt,
            hits: 0,
        });
        assert!(f.swallows(1, &s));
        assert!(!f.swallows(1, &s), "only once");
        f.media.push(Entry {
            id: FaultId(2),
            fault: MediaError::read(1, 5..6).times(2).dnr(true),
            hits: 0,
        });
        assert_eq!(f.media(1, 0..5, false), None);
        assert_eq!(f.media(1, 0..6, true), None, "reads only");
        assert_eq!(f.media(2, 0..6, false), None, "other namespace");
        let st = f.media(1, 5..9, false).unwrap();
        assert!(st.dnr() && st.sc() == 0x81 && st.sct_raw() == 2);
        assert!(f.media(1, 5..9, false).is_some());
        assert_eq!(f.media(1, 5..9, false), None, "two hits only");
        assert_eq!(f.hits(FaultId(2)), Some(2));
    }
}
