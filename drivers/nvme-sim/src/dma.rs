//! The controller's side of DMA: walking PRP entries and lists (base spec 4.3.1) into
//! segments of host memory, and copying between those segments and the controller's own
//! buffers. Host memory is reached only through [`DmaPool::slice_at`] and volatile copies.

use nvcopy_vfio::{Bytes, DmaPool, Iova, VolatileSlice};

use super::status::{DATA_TRANSFER_ERROR, PRP_OFFSET_INVALID};
use nvcopy_nvme::Status;

/// A run of host memory a transfer touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub iova: u64,
    pub len: usize,
}

/// Host memory behind `iova..iova + len`, or Data Transfer Error when the pool has none.
pub fn host(pool: &DmaPool, iova: u64, len: usize) -> Result<VolatileSlice<'_>, Status> {
    pool.slice_at(Iova(iova), len).ok_or(DATA_TRANSFER_ERROR)
}

/// The segments of a `len`-byte transfer described by PRP1 and PRP2 with memory pages of
/// `page` bytes: PRP1 may start anywhere dword aligned; the rest are whole pages, given by
/// PRP2 itself when one more page is enough, else by a PRP list at PRP2 whose last entry
/// chains to the next list page when the list does not fit.
pub fn prp_segments(
    pool: &DmaPool,
    prp1: u64,
    prp2: u64,
    len: usize,
    page: usize,
) -> Result<Vec<Segment>, Status> {
    let mut segs = Vec::new();
    if len == 0 {
        return Ok(segs);
    }
    let pg = page as u64;
    if prp1 & 3 != 0 {
        return Err(PRP_OFFSET_INVALID);
    }
    let first = len.min(page - (prp1 % pg) as usize);
    push(&mut segs, prp1, first);
    let mut left = len - first;
    if left == 0 {
        return Ok(segs);
    }
    if left <= page {
        if prp2 % pg != 0 {
            return Err(PRP_OFFSET_INVALID);
        }
        push(&mut segs, prp2, left);
        return Ok(segs);
    }
    let mut need = left.div_ceil(page);
    let mut list = prp2;
    // Each list page holds at least one data entry unless a list pointer sits in the last
    // slot of a page; bound the walk so that a list chaining to itself cannot spin.
    let mut hops = need + 1;
    let mut entries = Vec::new();
    while need > 0 {
        if list & 7 != 0 || hops == 0 {
            return Err(PRP_OFFSET_INVALID);
        }
        hops -= 1;
        let room = (page - (list % pg) as usize) / 8;
        let chain = need > room;
        let data = if chain { room - 1 } else { need };
        let count = data + chain as usize;
        entries.resize(count * 8, 0u8);
        host(pool, list, count * 8)?.copy_to(&mut entries[..]);
        let mut words = entries
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        for entry in words.by_ref().take(data) {
            if entry % pg != 0 {
                return Err(PRP_OFFSET_INVALID);
            }
            let n = left.min(page);
            push(&mut segs, entry, n);
            left -= n;
        }
        need -= data;
        if chain {
            list = words.next().unwrap_or(0);
        }
    }
    Ok(segs)
}

/// Appends a segment, merging it with the previous one when they are adjacent.
fn push(segs: &mut Vec<Segment>, iova: u64, len: usize) {
    if let Some(last) = segs.last_mut() {
        if last.iova + last.len as u64 == iova {
            last.len += len;
            return;
        }
    }
    segs.push(Segment { iova, len });
}

/// Copies host memory described by `segs` into `out` (whose length is the transfer's).
pub fn from_host(pool: &DmaPool, segs: &[Segment], out: &mut [u8]) -> Result<(), Status> {
    let mut at = 0;
    for s in segs {
        host(pool, s.iova, s.len)?
            .read_slice(&mut out[at..at + s.len], 0)
            .map_err(|_| DATA_TRANSFER_ERROR)?;
        at += s.len;
    }
    Ok(())
}

/// Copies `data` into host memory described by `segs`.
pub fn to_host(pool: &DmaPool, segs: &[Segment], data: &[u8]) -> Result<(), Status> {
    let mut at = 0;
    for s in segs {
        host(pool, s.iova, s.len)?
            .write_slice(&data[at..at + s.len], 0)
            .map_err(|_| DATA_TRANSFER_ERROR)?;
        at += s.len;
    }
    Ok(())
}
