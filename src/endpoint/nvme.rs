//! NVMe over PCIe behind the endpoint interface: a controller is a [`Device`], an I/O
//! queue pair an [`Endpoint`]. Byte offsets become LBAs here, and NVMe status codes stay
//! here: the reactor sees a code it hands back for interpretation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvcopy_nvme::{Completion, Controller, DataPtr, Error as NvmeError, IoQpair, Namespace};
use nvcopy_vfio::DmaPool;

use super::{Caps, Command, Device, Done, Endpoint, MediaId, Recovery, Refused, Volume};
use crate::error::{Refusal, Result};

/// An NVMe controller, shared by the reactors.
pub struct NvmeDevice {
    ctrl: Arc<Controller>,
}

impl NvmeDevice {
    /// Wraps an initialised controller.
    pub fn shared(ctrl: Arc<Controller>) -> Arc<dyn Device> {
        Arc::new(NvmeDevice { ctrl })
    }

    fn namespace_of(&self, v: &Volume) -> Option<&Namespace> {
        self.ctrl.namespaces().get(v.index as usize)
    }
}

impl Device for NvmeDevice {
    fn name(&self) -> &str {
        self.ctrl.name()
    }

    fn volume(&self, id: u32) -> Result<Volume> {
        let ns = self.ctrl.namespace(id)?;
        let index = self
            .ctrl
            .namespaces()
            .iter()
            .position(|n| n.nsid == id)
            .unwrap_or(0);
        Ok(Volume {
            index: index as u32,
            id,
            block_size: ns.lba_size,
            blocks: ns.blocks,
            zone_blocks: ns.zoned.map(|z| z.zone_blocks),
        })
    }

    fn caps(&self) -> Caps {
        let info = self.ctrl.info();
        Caps {
            max_transfer: self.ctrl.max_transfer(),
            write_zeroes: info.supports_write_zeroes(),
            deallocate: false,
            copy: info.supports_copy(),
            sequential_writes: false,
        }
    }

    fn media(&self, v: &Volume) -> MediaId {
        match self.namespace_of(v) {
            Some(ns) => {
                MediaId::of_nvme_namespace(ns.nguid, ns.eui64, &self.ctrl.info().subnqn, ns.nsid)
            }
            None => MediaId::default(),
        }
    }

    fn copy_fits(&self, v: &Volume, blocks: u64) -> bool {
        self.namespace_of(v)
            .is_some_and(|ns| self.ctrl.copy_fits(ns, blocks))
    }

    fn io_timeout(&self) -> Duration {
        self.ctrl.options().io_timeout
    }

    fn generation(&self) -> u64 {
        self.ctrl.generation()
    }

    fn reset(&self, seen: u64) {
        self.ctrl.reset(seen);
    }

    fn fatal_status(&self) -> bool {
        self.ctrl.fatal_status()
    }

    fn shutdown(&self) {
        self.ctrl.shutdown();
    }

    fn max_endpoints(&self) -> usize {
        self.ctrl.io_queues()
    }

    fn open_endpoint(&self, _pool: &DmaPool, entries: u16) -> Result<Box<dyn Endpoint>> {
        let q = self.ctrl.create_io_qpair(entries)?;
        Ok(Box::new(NvmeEndpoint {
            namespaces: self.ctrl.namespaces().to_vec(),
            failed: Vec::with_capacity(entries as usize),
            q,
        }))
    }

    fn endpoint_dma_bytes(&self, entries: u16) -> usize {
        Controller::io_qpair_dma_bytes(entries)
    }

    fn prepare_writes(&self, v: &Volume, offset: u64, len: u64) -> Result<()> {
        let Some(ns) = self.namespace_of(v).filter(|ns| ns.zoned.is_some()) else {
            return Ok(());
        };
        let Some(zone) = ns.zoned else {
            return Ok(());
        };
        let shift = ns.lba_size.trailing_zeros();
        let (first, end) = (offset >> shift, (offset + len) >> shift);
        let zones = (end - first).div_ceil(zone.zone_blocks);
        let region = || format!("{}/{}@{offset}+{len}", self.ctrl.name(), ns.nsid);
        // A queue pair of its own, beside the reactors': the resets run before the job.
        let mut q = self
            .ctrl
            .create_io_qpair(8)
            .map_err(|e| Refusal::ZoneReset {
                region: region(),
                reason: format!("no I/O queue pair for the zone resets ({e}); use fewer --cores"),
            })?;
        // Every zone must take a linear copy: its whole size writable, and writable at all.
        let mut at = first;
        while at < end {
            let (_, zones) = q.report_zones_sync(ns, at)?;
            let before = at;
            for z in zones.iter().filter(|z| z.start >= before && z.start < end) {
                use nvcopy_nvme::zns::ZoneState;
                let why = if matches!(z.state, ZoneState::Offline | ZoneState::ReadOnly) {
                    Some(format!("the zone is {}", z.state.name()))
                } else if z.capacity < zone.zone_blocks {
                    Some(format!(
                        "its capacity is {} of its {} blocks: a linear copy would have to skip the rest",
                        z.capacity, zone.zone_blocks
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    let zone = z.start;
                    return Err(Refusal::ZoneUnusable {
                        region: region(),
                        zone,
                        why,
                    }
                    .into());
                }
                at = z.start + zone.zone_blocks;
            }
            // A report that does not move on (a device bug) ends the walk.
            if at <= before {
                break;
            }
        }
        q.reset_zones_sync(ns, first, zones)?;
        Ok(())
    }
}

/// One reactor's I/O queue pair.
struct NvmeEndpoint {
    q: IoQpair,
    /// The controller's namespaces, by [`Volume::index`].
    namespaces: Vec<Namespace>,
    /// The failed completions of the last poll, for [`Endpoint::describe`].
    failed: Vec<Completion>,
}

/// A command's pages as the PRP builder takes them.
fn prp_pages(data: super::Pages<'_>) -> DataPtr<'_> {
    DataPtr::Pages {
        pages: data.iovas,
        len: data.len,
    }
}

/// A failed completion's code: the opcode above the 15-bit status field, so that the
/// status can be rebuilt; 0 only for success.
fn code_of(c: &Completion) -> u32 {
    if c.status.is_success() {
        0
    } else {
        (c.opcode as u32) << 16 | c.status.0 as u32
    }
}

impl Endpoint for NvmeEndpoint {
    fn submit(&mut self, cmd: Command<'_>, token: u64) -> std::result::Result<(), Refused> {
        let lba = |v: &Volume, at: u64| at >> v.block_size.trailing_zeros();
        let NvmeEndpoint { q, namespaces, .. } = self;
        let find = |v: &Volume| {
            namespaces
                .get(v.index as usize)
                .ok_or_else(|| Refused::Invalid(format!("no namespace {} here", v.id)))
        };
        let r = match cmd {
            Command::Read { volume, at, data } => {
                q.submit_read(find(volume)?, lba(volume, at), prp_pages(data), token)
            }
            Command::Write { volume, at, data } => {
                q.submit_write(find(volume)?, lba(volume, at), prp_pages(data), token)
            }
            Command::WriteZeroes { volume, at, len } => {
                let ns = find(volume)?;
                let blocks = lba(volume, len) as u32;
                q.submit_write_zeroes(ns, lba(volume, at), blocks, token)
            }
            Command::Copy {
                volume,
                from,
                to,
                len,
                descs,
            } => {
                let ns = find(volume)?;
                let blocks = lba(volume, len);
                q.submit_copy(ns, lba(volume, from), blocks, lba(volume, to), descs, token)
            }
            Command::Flush { volume } => {
                let ns = find(volume)?;
                q.submit_flush(ns, token)
            }
            Command::Deallocate { .. } => {
                return Err(Refused::Invalid(format!(
                    "{}: deallocate is not offered by this endpoint",
                    q.controller().name()
                )))
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(NvmeError::QueueFull { .. }) => Err(Refused::Full),
            Err(e) => Err(Refused::Invalid(e.to_string())),
        }
    }

    #[inline]
    fn ring(&mut self) {
        self.q.ring();
    }

    fn poll(&mut self, max: usize, out: &mut Vec<Done>) -> usize {
        self.failed.clear();
        if self.q.outstanding() == 0 {
            return 0;
        }
        let mut got = std::mem::take(&mut self.failed);
        let before = out.len();
        // A completion naming a command that is not outstanding is dropped by the driver;
        // the command it should have named then times out.
        let _ = self.q.poll(max, |c| {
            let code = code_of(&c);
            if code != 0 && got.len() < got.capacity() {
                got.push(c);
            }
            out.push(Done {
                token: c.token,
                code,
            });
        });
        self.failed = got;
        out.len() - before
    }

    fn outstanding(&self) -> usize {
        self.q.outstanding()
    }

    fn retry_after(&self, done: &Done) -> Option<Duration> {
        let c = Completion {
            token: done.token,
            cid: 0,
            status: nvcopy_nvme::Status(done.code as u16),
            dw0: 0,
            opcode: (done.code >> 16) as u8,
            nsid: 0,
            slba: 0,
        };
        self.q.retry_after(&c)
    }

    fn describe(&self, done: &Done) -> String {
        match self.failed.iter().find(|c| c.token == done.token) {
            Some(c) => match self.q.check(c) {
                Err(e) => e.to_string(),
                Ok(_) => "succeeded".to_string(),
            },
            None => format!(
                "{}: {} failed: {}",
                self.q.controller().name(),
                nvcopy_nvme::spec::opcode_name(false, (done.code >> 16) as u8),
                nvcopy_nvme::Status(done.code as u16)
            ),
        }
    }

    fn generation(&self) -> u64 {
        self.q.generation()
    }

    fn is_stale(&self) -> bool {
        self.q.is_stale()
    }

    fn is_usable(&self) -> bool {
        self.q.is_usable()
    }

    fn expired(&self, now: Instant) -> Option<String> {
        let late = self.q.expired(now)?;
        Some(format!(
            "{} on namespace {} at LBA {} did not complete within {:?}",
            nvcopy_nvme::spec::opcode_name(false, late.opcode),
            late.nsid,
            late.slba,
            late.waited
        ))
    }

    fn recover(&mut self, out: &mut Vec<Done>) -> Recovery {
        self.failed.clear();
        let mut kept = std::mem::take(&mut self.failed);
        let r = self.q.recover(|c| {
            if kept.len() < kept.capacity() {
                kept.push(c);
            }
            out.push(Done {
                token: c.token,
                code: code_of(&c).max(1),
            });
        });
        self.failed = kept;
        match r {
            nvcopy_nvme::Recovery::Reissue => Recovery::Reissue,
            nvcopy_nvme::Recovery::Failed { quiet } => Recovery::Failed { quiet },
        }
    }
}
