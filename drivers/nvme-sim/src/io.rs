//! NVM command set I/O commands (NVM command set spec 3): Read, Write, Write Zeroes,
//! Flush, Dataset Management (deallocate) and Copy with descriptor format 0. Optional
//! commands the configuration switched off are Invalid Command Opcode.

use std::ops::Range;

use nvcopy_vfio::DmaPool;

use super::config::Params;
use super::dma::{from_host, prp_segments, to_host};
use super::engine::State;
use super::faults::FaultState;
use super::namespace::SimNamespace;
use super::status::{
    finish, Done, Exec, COMMAND_SIZE_LIMIT_EXCEEDED, INTERNAL_ERROR, INVALID_FIELD,
    INVALID_NAMESPACE, INVALID_OPCODE,
};
use nvcopy_nvme::spec::{io, oncs, CopyRange, DsmRange, Sqe};
use nvcopy_nvme::Status;

/// Runs one I/O command.
pub fn execute(p: &Params, pool: &DmaPool, st: &mut State, sqe: &Sqe) -> Done {
    if sqe.opcode() == io::WRITE {
        if let Some(log) = st.write_log.as_mut() {
            log.push((sqe.nsid, sqe.slba()));
        }
    }
    let mut cx = Io {
        p,
        pool,
        page: st.regs.page_size(),
        ns: &mut st.namespaces,
        faults: &mut st.faults,
        buf: &mut st.buf,
    };
    finish(match sqe.opcode() {
        io::FLUSH => cx.flush(sqe),
        io::WRITE => cx.write(sqe),
        io::READ => cx.read(sqe),
        io::WRITE_ZEROES if p.has(oncs::WRITE_ZEROES) => cx.write_zeroes(sqe),
        io::DSM if p.has(oncs::DSM) => cx.dsm(sqe),
        io::COPY if p.has(oncs::COPY) && p.ocfs & 1 != 0 => cx.copy(sqe),
        _ => Err(INVALID_OPCODE.into()),
    })
}

/// What an I/O command needs of the controller.
struct Io<'a> {
    p: &'a Params,
    pool: &'a DmaPool,
    page: usize,
    ns: &'a mut [SimNamespace],
    faults: &'a mut FaultState,
    /// Reused staging buffer between host memory and the namespace.
    buf: &'a mut Vec<u8>,
}

/// Number of Logical Blocks of Read, Write and Write Zeroes (CDW12 bits 15:0, 0-based).
fn nlb(sqe: &Sqe) -> u64 {
    (sqe.cdw12 & 0xffff) as u64 + 1
}

fn io_error(_: std::io::Error) -> Status {
    INTERNAL_ERROR
}

impl Io<'_> {
    /// Index of the active namespace `nsid`.
    fn index(&self, nsid: u32) -> Result<usize, Status> {
        match nsid {
            n if n >= 1 && n as usize <= self.ns.len() => Ok(n as usize - 1),
            _ => Err(INVALID_NAMESPACE),
        }
    }

    fn media(&mut self, nsid: u32, lbas: Range<u64>, write: bool) -> Result<(), Status> {
        match self.faults.media(nsid, lbas, write) {
            Some(s) => Err(s),
            None => Ok(()),
        }
    }

    fn flush(&mut self, sqe: &Sqe) -> Exec {
        if sqe.nsid != u32::MAX {
            self.index(sqe.nsid)?;
        }
        Ok(0)
    }

    /// Checks a Read or Write and returns the namespace index, byte offset and length.
    fn transfer(&self, sqe: &Sqe) -> Result<(usize, u64, usize), Status> {
        let i = self.index(sqe.nsid)?;
        let ns = &self.ns[i];
        let bytes = nlb(sqe) * ns.lba_size as u64;
        if self.p.max_transfer().is_some_and(|m| bytes > m as u64) {
            return Err(INVALID_FIELD);
        }
        let (off, len) = ns.span(sqe.slba(), nlb(sqe))?;
        Ok((i, off, len as usize))
    }

    fn read(&mut self, sqe: &Sqe) -> Exec {
        let (i, off, len) = self.transfer(sqe)?;
        let segs = prp_segments(self.pool, sqe.prp1, sqe.prp2, len, self.page)?;
        self.media(sqe.nsid, sqe.slba()..sqe.slba() + nlb(sqe), false)?;
        self.buf.resize(len, 0);
        self.ns[i].read(off, self.buf).map_err(io_error)?;
        to_host(self.pool, &segs, self.buf)?;
        Ok(0)
    }

    fn write(&mut self, sqe: &Sqe) -> Exec {
        let (i, off, len) = self.transfer(sqe)?;
        let segs = prp_segments(self.pool, sqe.prp1, sqe.prp2, len, self.page)?;
        self.buf.resize(len, 0);
        from_host(self.pool, &segs, self.buf)?;
        self.media(sqe.nsid, sqe.slba()..sqe.slba() + nlb(sqe), true)?;
        self.ns[i].write(off, self.buf).map_err(io_error)?;
        Ok(0)
    }

    fn write_zeroes(&mut self, sqe: &Sqe) -> Exec {
        let i = self.index(sqe.nsid)?;
        let (off, len) = self.ns[i].span(sqe.slba(), nlb(sqe))?;
        self.media(sqe.nsid, sqe.slba()..sqe.slba() + nlb(sqe), true)?;
        self.ns[i].zero(off, len).map_err(io_error)?;
        Ok(0)
    }

    /// Reads `count` descriptors of `size` bytes from the command's data pointer into the
    /// staging buffer.
    fn descriptors(&mut self, sqe: &Sqe, count: usize, size: usize) -> Result<(), Status> {
        let len = count * size;
        let segs = prp_segments(self.pool, sqe.prp1, sqe.prp2, len, self.page)?;
        self.buf.resize(len, 0);
        from_host(self.pool, &segs, self.buf)
    }

    /// Dataset Management: with the Deallocate attribute the ranges read back as zeroes
    /// afterwards; without it the command is a hint and does nothing.
    fn dsm(&mut self, sqe: &Sqe) -> Exec {
        let i = self.index(sqe.nsid)?;
        let nr = (sqe.cdw10 & 0xff) as usize + 1;
        self.descriptors(sqe, nr, DsmRange::SIZE)?;
        if sqe.cdw11 & io::DSM_DEALLOCATE == 0 {
            return Ok(0);
        }
        let mut spans = Vec::with_capacity(nr);
        for d in entries(self.buf).map(|b| DsmRange::from_le_bytes(&b)) {
            if d.nlb > 0 {
                spans.push(self.ns[i].span(d.slba, d.nlb as u64)?);
            }
        }
        for (off, len) in spans {
            self.ns[i].zero(off, len).map_err(io_error)?;
        }
        Ok(0)
    }

    /// Copy, descriptor format 0: source ranges of this namespace to consecutive blocks
    /// from SDLBA. On failure DW0 holds the lowest source range not copied.
    fn copy(&mut self, sqe: &Sqe) -> Exec {
        let i = self.index(sqe.nsid)?;
        if sqe.cdw12 >> 8 & 0xf != 0 {
            return Err(INVALID_FIELD.into());
        }
        let nr = (sqe.cdw12 & 0xff) as usize + 1;
        let (mssrl, mcl, msrc) = {
            let ns = &self.ns[i];
            (ns.mssrl as u64, ns.mcl as u64, ns.msrc as usize + 1)
        };
        if nr > msrc {
            return Err(COMMAND_SIZE_LIMIT_EXCEEDED.into());
        }
        self.descriptors(sqe, nr, CopyRange::SIZE)?;
        let mut ranges = Vec::with_capacity(nr);
        let mut total = 0u64;
        for (r, d) in entries(self.buf)
            .map(|b| CopyRange::from_le_bytes(&b))
            .enumerate()
        {
            let fail = |s: Status| Done::with_dw0(s, r as u32);
            let (slba, n) = (d.slba, d.blocks());
            total += n;
            if (mssrl != 0 && n > mssrl) || (mcl != 0 && total > mcl) {
                return Err(fail(COMMAND_SIZE_LIMIT_EXCEEDED));
            }
            self.ns[i].span(slba, n).map_err(fail)?;
            ranges.push(slba..slba + n);
        }
        let sdlba = sqe.slba();
        let (dst, _) = self.ns[i]
            .span(sdlba, total)
            .map_err(|s| Done::with_dw0(s, 0))?;
        for (r, lbas) in ranges.iter().enumerate() {
            self.media(sqe.nsid, lbas.clone(), false)
                .map_err(|s| Done::with_dw0(s, r as u32))?;
        }
        self.media(sqe.nsid, sdlba..sdlba + total, true)
            .map_err(|s| Done::with_dw0(s, 0))?;
        // Read every source before writing, so overlapping ranges copy what was there.
        let bs = self.ns[i].lba_size as u64;
        self.buf.resize((total * bs) as usize, 0);
        let mut at = 0usize;
        for lbas in &ranges {
            let len = ((lbas.end - lbas.start) * bs) as usize;
            self.ns[i]
                .read(lbas.start * bs, &mut self.buf[at..at + len])
                .map_err(io_error)?;
            at += len;
        }
        self.ns[i].write(dst, self.buf).map_err(io_error)?;
        Ok(0)
    }
}

/// The `N`-byte entries of a descriptor list, in order (a short tail is ignored).
fn entries<const N: usize>(buf: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    buf.chunks_exact(N).map(|c| {
        let mut e = [0u8; N];
        e.copy_from_slice(c);
        e
    })
}
