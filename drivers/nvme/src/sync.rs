//! Whole transfers on a queue pair, for tools and tests (`identify`, `bench read`, the
//! driver tests): they split a transfer at the controller's maximum, keep the queue full,
//! and return the first error once everything in flight has finished. The copier does
//! not use them; its reactors post and poll with [`IoQpair`]'s non-blocking calls.

use nvcopy_vfio::{DmaBuf, Iova, PAGE_SIZE};

use crate::controller::check;
use crate::error::{Error, Result};
use crate::identify::Namespace;
use crate::io::{IoQpair, MAX_NLB};
use crate::prp::DataPtr;
use crate::spec::{io, CopyRange, DsmRange, Sqe};
use crate::zns;

impl IoQpair {
    /// Posts commands from `next` until it runs dry, keeping the queue as full as it goes,
    /// then waits for all of them. Returns the first failure.
    fn run(&mut self, mut next: impl FnMut(&mut Self) -> Option<Result<u16>>) -> Result<()> {
        let mut first_err: Option<Error> = None;
        let name = self.ctrl.name().to_string();
        loop {
            if self.qp.free_slots() == 0 {
                self.qp.ring(self.ctrl.bar());
                let target = self.qp.outstanding() - 1;
                self.ctrl.wait_io(&mut self.qp, target, |c| {
                    if let (Err(e), None) = (check(&name, false, &c), &first_err) {
                        first_err = Some(e);
                    }
                })?;
            }
            if first_err.is_some() {
                break;
            }
            match next(self) {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    first_err = Some(e);
                    break;
                }
                None => break,
            }
        }
        self.qp.ring(self.ctrl.bar());
        self.ctrl.wait_io(&mut self.qp, 0, |c| {
            if let (Err(e), None) = (check(&name, false, &c), &first_err) {
                first_err = Some(e);
            }
        })?;
        first_err.map_or(Ok(()), Err)
    }

    fn transfer_sync(
        &mut self,
        opcode: u8,
        ns: &Namespace,
        lba: u64,
        buf: &DmaBuf,
        bytes: usize,
    ) -> Result<()> {
        let bs = ns.lba_size as usize;
        if bytes > buf.len() {
            return Err(self.bad_buffer(format!(
                "{bytes} bytes requested from a {}-byte buffer",
                buf.len()
            )));
        }
        if bytes % bs != 0 {
            return Err(self.bad_buffer(format!(
                "{bytes} bytes is not a multiple of the {bs}-byte block size"
            )));
        }
        let chunk = (self.ctrl.max_transfer() / bs * bs).min(MAX_NLB as usize * bs);
        let mut done = 0usize;
        self.run(|q| {
            if done >= bytes {
                return None;
            }
            let len = chunk.min(bytes - done);
            let data = DataPtr::Contig {
                iova: buf.iova().add(done as u64),
                len,
            };
            let r = q.rw(opcode, ns, lba + (done / bs) as u64, data, 0);
            done += len;
            Some(r)
        })
    }

    /// Reads `bytes` from `lba` into `buf`, in as many commands as it takes.
    pub fn read_sync(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaBuf,
        bytes: usize,
    ) -> Result<()> {
        self.transfer_sync(io::READ, ns, lba, buf, bytes)
    }

    /// Writes `bytes` of `buf` at `lba`, in as many commands as it takes.
    pub fn write_sync(
        &mut self,
        ns: &Namespace,
        lba: u64,
        buf: &DmaBuf,
        bytes: usize,
    ) -> Result<()> {
        self.transfer_sync(io::WRITE, ns, lba, buf, bytes)
    }

    /// Reads into a list of pages (kcopyd style) in one command.
    pub fn read_pages_sync(
        &mut self,
        ns: &Namespace,
        lba: u64,
        pages: &[Iova],
        bytes: usize,
    ) -> Result<()> {
        let mut once = Some(DataPtr::Pages { pages, len: bytes });
        self.run(|q| once.take().map(|d| q.rw(io::READ, ns, lba, d, 0)))
    }

    /// Writes `blocks` zeroed blocks from `lba` with Write Zeroes.
    pub fn write_zeroes_sync(&mut self, ns: &Namespace, lba: u64, blocks: u64) -> Result<()> {
        let mut done = 0u64;
        self.run(|q| {
            if done >= blocks {
                return None;
            }
            let n = (blocks - done).min(MAX_NLB as u64) as u32;
            let r = q.submit_write_zeroes(ns, lba + done, n, 0);
            done += n as u64;
            Some(r)
        })
    }

    /// Flushes the namespace's volatile write cache.
    pub fn flush_sync(&mut self, ns: &Namespace) -> Result<()> {
        let mut once = true;
        self.run(|q| std::mem::take(&mut once).then(|| q.submit_flush(ns, 0)))
    }

    /// Deallocates (trims) `blocks` blocks from `lba` with Dataset Management.
    pub fn deallocate_sync(&mut self, ns: &Namespace, lba: u64, blocks: u64) -> Result<()> {
        if !self.ctrl.info().supports_dsm() {
            return Err(self.unsupported("Dataset Management"));
        }
        let ranges = self.ctrl.pool().alloc(PAGE_SIZE)?;
        // One range of at most u32::MAX blocks per descriptor, 256 per command.
        let mut done = 0u64;
        while done < blocks {
            let mut nr = 0usize;
            while done < blocks && nr < 256 {
                let n = (blocks - done).min(u32::MAX as u64) as u32;
                let d = DsmRange::new(lba + done, n);
                ranges.write_at(nr * DsmRange::SIZE, &d.to_le_bytes());
                nr += 1;
                done += n as u64;
            }
            let mut s = Sqe::new(io::DSM, ns.nsid);
            s.cdw10 = nr as u32 - 1;
            s.cdw11 = io::DSM_DEALLOCATE;
            let data = DataPtr::Contig {
                iova: ranges.iova(),
                len: nr * DsmRange::SIZE,
            };
            let mut once = Some(data);
            self.run(|q| once.take().map(|d| q.qp.post(s, Some(d), 0)))?;
        }
        Ok(())
    }

    /// Copies `blocks` blocks from `src` to `dst` inside the namespace with the Copy
    /// command, as many commands as the limits require, one at a time.
    pub fn copy_sync(&mut self, ns: &Namespace, src: u64, blocks: u64, dst: u64) -> Result<()> {
        if !self.ctrl.info().supports_copy() {
            return Err(self.unsupported("Copy"));
        }
        let range_max = (ns.mssrl.max(1) as u64).min(MAX_NLB as u64);
        let max_ranges = (ns.msrc.max(1) as u64).min((PAGE_SIZE / CopyRange::SIZE) as u64);
        let per_cmd = (ns.mcl.max(1) as u64).min(range_max * max_ranges);
        let descs = self.ctrl.pool().alloc(PAGE_SIZE)?;
        let mut done = 0u64;
        while done < blocks {
            let n = (blocks - done).min(per_cmd);
            let mut once = true;
            self.run(|q| {
                std::mem::take(&mut once)
                    .then(|| q.submit_copy(ns, src + done, n, dst + done, &descs, 0))
            })?;
            done += n;
        }
        Ok(())
    }
}

impl IoQpair {
    /// Resets `zones` zones of a zoned namespace from the zone that starts at `lba`
    /// (Zone Management Send, Reset Zone: ZNS spec 3.4.3), or every zone with Select All
    /// when `zones` covers the namespace. Afterwards each zone is empty and writable from
    /// its start.
    pub fn reset_zones_sync(&mut self, ns: &Namespace, lba: u64, zones: u64) -> Result<()> {
        let Some(z) = ns.zoned else {
            return Err(self.unsupported("Zone Management Send (not a zoned namespace)"));
        };
        let all = lba == 0 && zones.saturating_mul(z.zone_blocks) >= ns.blocks;
        let mut next = 0u64;
        self.run(|q| {
            if next >= zones || (all && next > 0) {
                return None;
            }
            let mut s = Sqe::new(zns::op::ZONE_MGMT_SEND, ns.nsid);
            s.set_slba(lba + next * z.zone_blocks);
            s.cdw13 = zns::ZSA_RESET | if all { zns::SELECT_ALL } else { 0 };
            next += 1;
            Some(q.qp.post(s, None, 0))
        })
    }

    /// Reports the zones from the one holding `lba` on (Zone Management Receive, Report
    /// Zones: ZNS spec 3.4.2), as many as one page holds; also returns how many zones
    /// the device says there are from there.
    pub fn report_zones_sync(&mut self, ns: &Namespace, lba: u64) -> Result<(u64, Vec<zns::Zone>)> {
        if ns.zoned.is_none() {
            return Err(self.unsupported("Zone Management Receive (not a zoned namespace)"));
        }
        let buf = self.ctrl.pool().alloc_zeroed(PAGE_SIZE)?;
        let mut once = true;
        self.run(|q| {
            if !std::mem::take(&mut once) {
                return None;
            }
            let mut s = Sqe::new(zns::op::ZONE_MGMT_RECV, ns.nsid);
            s.set_slba(lba);
            s.cdw12 = (PAGE_SIZE / 4) as u32 - 1;
            s.cdw13 = zns::ZRA_REPORT_ZONES;
            let data = DataPtr::Contig {
                iova: buf.iova(),
                len: PAGE_SIZE,
            };
            Some(q.qp.post(s, Some(data), 0))
        })?;
        let mut page = vec![0u8; PAGE_SIZE];
        buf.read_at(0, &mut page);
        Ok(zns::parse_report(&page))
    }
}
