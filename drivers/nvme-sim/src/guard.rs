//! The page guard: a check that the controller never writes a host page that was handed
//! to another user after the command writing it was submitted. Tests give the controller
//! a function that tells each guarded 4 KiB page's owner generation; the controller notes
//! the generation of every page a command will write when it fetches the command, asks
//! again when it writes them, and reports the pages whose generation changed in between.
//! Queue memory is never checked (the host does not hand ring pages on while queues
//! exist, and the guard is meant to answer `None` for them anyway).

use std::sync::Arc;

use nvcopy_vfio::{DmaPool, Iova};

use super::dma::prp_segments;
use super::engine::State;
use nvcopy_nvme::spec::{admin, io, Sqe};

/// Size of the pages the guard tells generations of.
const GUARD_PAGE: u64 = 4096;

/// What the test gives the controller: the current owner generation of the 4 KiB page
/// holding an IOVA, or `None` for a page that is not guarded.
pub type PageGuardFn = dyn Fn(Iova) -> Option<u64> + Send + Sync;

/// A page a command will write and its generation when the command was fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watched {
    page: u64,
    generation: u64,
}

/// The guard function, if any, and the violations seen.
#[derive(Default)]
pub struct Guard {
    guard: Option<Arc<PageGuardFn>>,
    violations: Vec<String>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("on", &self.guard.is_some())
            .field("violations", &self.violations.len())
            .finish()
    }
}

impl Guard {
    pub fn set(&mut self, guard: Arc<PageGuardFn>) {
        self.guard = Some(guard);
    }

    pub fn is_on(&self) -> bool {
        self.guard.is_some()
    }

    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// The guarded pages among `pages`, with their generations now.
    fn watch(&self, pages: Vec<u64>) -> Vec<Watched> {
        let Some(g) = &self.guard else {
            return Vec::new();
        };
        pages
            .into_iter()
            .filter_map(|page| g(Iova(page)).map(|generation| Watched { page, generation }))
            .collect()
    }

    /// The command `cid` on `qid` wrote `pages`: records each one whose generation is not
    /// the one noted at fetch time.
    pub fn check(&mut self, qid: u16, cid: u16, pages: &[Watched]) {
        let Some(g) = &self.guard else {
            return;
        };
        for w in pages {
            let now = g(Iova(w.page));
            if now != Some(w.generation) {
                let now = now.map_or_else(|| "unguarded".to_string(), |n| n.to_string());
                self.violations.push(format!(
                    "qid {qid} cid {cid} wrote iova {:#x}, a page handed on since the command \
                     was fetched (generation {} then, {now} now)",
                    w.page, w.generation
                ));
            }
        }
    }
}

/// The guarded host pages the command will write, with their generations now. Only Read
/// data and Identify data are written to host memory (besides completion entries); every
/// other command only reads it. A command whose data pointer is bad writes nothing.
pub fn pages_written(pool: &DmaPool, st: &State, qid: u16, sqe: &Sqe) -> Vec<Watched> {
    let len = match (qid == 0, sqe.opcode()) {
        (true, admin::IDENTIFY) => 4096,
        (false, io::READ) => {
            let Some(ns) = (sqe.nsid as usize)
                .checked_sub(1)
                .and_then(|i| st.namespaces.get(i))
            else {
                return Vec::new();
            };
            ((sqe.cdw12 & 0xffff) as usize + 1) * ns.lba_size as usize
        }
        _ => return Vec::new(),
    };
    let Ok(segs) = prp_segments(pool, sqe.prp1, sqe.prp2, len, st.regs.page_size()) else {
        return Vec::new();
    };
    let mut pages = Vec::new();
    for s in segs {
        let mut page = s.iova / GUARD_PAGE * GUARD_PAGE;
        while page < s.iova + s.len as u64 {
            pages.push(page);
            page += GUARD_PAGE;
        }
    }
    st.guard.watch(pages)
}
