//! `nvcopy bench read`: sequential read throughput of one region, chunk by chunk with
//! `qd` reads in flight on one polled queue pair. It is what `dd of=/dev/null
//! iflag=direct` measures through the kernel, so the two can be set side by side.

use std::time::{Duration, Instant};

use nvcopy_nvme::DataPtr;
use serde::Serialize;

use nvcopy::error::Result;
use nvcopy::platform::Platform;
use nvcopy::region::Region;

/// What a read run measured.
#[derive(Clone, Debug, Serialize)]
pub struct ReadOutcome {
    /// Bytes read.
    pub bytes: u64,
    /// Chunk size used.
    pub chunk: usize,
    /// Reads in flight.
    pub qd: usize,
    /// From the first read's submission to the last completion.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Reads `region` sequentially with up to `qd` reads of `chunk` bytes in flight.
pub fn read(p: &Platform, region: &Region, chunk: usize, qd: usize) -> Result<ReadOutcome> {
    let ctrl = &p.controllers[region.ctrl];
    let ns = ctrl.namespace(region.nsid)?.clone();
    let bs = ns.lba_size as usize;
    let chunk = (chunk.min(ctrl.max_transfer()) / bs * bs).max(bs);
    let qd = qd.max(1);
    let mut q = ctrl.create_io_qpair((qd + 1).min(u16::MAX as usize) as u16)?;
    let bufs = (0..qd)
        .map(|_| p.pool.alloc(chunk))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut free: Vec<usize> = (0..qd).collect();
    let mut cursor = 0u64;
    let mut done = 0u64;
    let mut first_err = None;
    let start = Instant::now();
    while done < region.len && first_err.is_none() {
        while let Some(&i) = free.last() {
            if cursor >= region.len {
                break;
            }
            let len = chunk.min((region.len - cursor) as usize);
            let lba = (region.offset + cursor) / bs as u64;
            q.submit_read(
                &ns,
                lba,
                DataPtr::Contig {
                    iova: bufs[i].iova(),
                    len,
                },
                i as u64 | (len as u64) << 32,
            )?;
            free.pop();
            cursor += len as u64;
        }
        q.ring();
        let n = q.poll(64, |c| {
            free.push((c.token & 0xffff_ffff) as usize);
            done += c.token >> 32;
            if !c.status.is_success() && first_err.is_none() {
                first_err = Some(c);
            }
        })?;
        if n == 0 {
            if let Some(late) = q.expired(std::time::Instant::now()) {
                // Reset the controller so that no buffer of this loop is written after it
                // returns, then report the timeout.
                q.controller().reset(q.generation());
                q.recover(|_| {});
                return Err(nvcopy_nvme::Error::CommandTimeout {
                    ctrl: q.controller().name().to_string(),
                    cmd: nvcopy_nvme::spec::opcode_name(false, late.opcode),
                    nsid: late.nsid,
                    lba: late.slba,
                    waited: late.waited,
                }
                .into());
            }
        }
    }
    if let Some(c) = first_err {
        q.check(&c)?;
    }
    Ok(ReadOutcome {
        bytes: done,
        chunk,
        qd,
        elapsed: start.elapsed(),
    })
}
