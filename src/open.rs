//! Opening the devices of one job from the regions a user wrote: NVMe controllers through
//! VFIO, files and kernel block devices through io_uring, NVMe/TCP controllers
//! ([`crate::endpoint::tcp`]), in one engine.
//!
//! Order, so that a refused job does as little as possible: the controllers and the
//! source first (their sizes give the job's length), then each destination file, which
//! is created with the source's length if it does not exist, grown if it is short (never
//! truncated) and has its range reserved, so that a filesystem too small for it is found
//! before any data moves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nvcopy_uring::{Access, Anchor, BlockFile};
use nvcopy_vfio::DmaPool;

use crate::endpoint::file::FileDevice;
use crate::endpoint::nvme::NvmeDevice;
use crate::endpoint::{Device, Devices};
use crate::engine::{Engine, EngineOptions};
use crate::error::Result;
use crate::platform::{Platform, PlatformOptions};
use crate::region::{Region, RegionSpec};
use crate::trace;

/// How files and block devices are opened.
#[derive(Clone, Copy, Debug)]
pub struct FileOptions {
    /// Through the page cache instead of O_DIRECT (`--buffered`).
    pub buffered: bool,
    /// Leave holes for all-zero chunks in file destinations (`--sparse`): their space is
    /// not reserved up front either.
    pub sparse: bool,
    /// Use an SQPOLL thread (falls back to one enter per batch where not allowed).
    pub sqpoll: bool,
    /// How long one file command may take.
    pub io_timeout: Duration,
    /// NVMe/TCP digests asked for: (header, data) (`--tcp-digests`).
    pub tcp_digests: (bool, bool),
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            buffered: false,
            sparse: false,
            sqpoll: true,
            io_timeout: Duration::from_secs(30),
            tcp_digests: (true, true),
        }
    }
}

/// A job's engine and its resolved regions.
pub struct OpenedJob {
    /// The engine over every device of the job.
    pub engine: Engine,
    /// The source.
    pub from: Option<Region>,
    /// The destinations.
    pub to: Vec<Region>,
    /// Destination files this open created (the caller removes them if it gives up
    /// before any I/O).
    pub created: Vec<PathBuf>,
}

/// Opens every device `from` and `to` name and resolves the regions. `pool_bytes` sizes
/// the DMA pool (a pool of ordinary memory when no NVMe controller is involved).
pub fn open_job(
    from: Option<&RegionSpec>,
    to: &[RegionSpec],
    platform: &PlatformOptions,
    files: &FileOptions,
    opts: EngineOptions,
) -> Result<OpenedJob> {
    check_paths(from, to)?;
    let mut addrs: Vec<_> = from.into_iter().chain(to).filter_map(|r| r.pci()).collect();
    addrs.sort();
    addrs.dedup();
    let (mut devices, pool): (Devices, DmaPool) = if addrs.is_empty() {
        (Vec::new(), DmaPool::unmapped(platform.pool_bytes)?)
    } else {
        let p = Platform::open(&addrs, platform)?;
        let mut unique: Vec<Arc<nvcopy_nvme::Controller>> = Vec::new();
        for c in p.controllers {
            if !unique.iter().any(|u| Arc::ptr_eq(u, &c)) {
                unique.push(c);
            }
        }
        (unique.into_iter().map(NvmeDevice::shared).collect(), p.pool)
    };
    crate::endpoint::tcp::open_targets(&mut devices, from, to, files, opts.reactors)?;
    // The anchor ring's SQPOLL thread is a kernel thread that polls a core: only for
    // jobs that have a file or a block device.
    let any_file = from.into_iter().chain(to).any(|r| r.path().is_some());
    let anchor = Arc::new(Anchor::new(files.sqpoll && any_file));
    let mut created = Vec::new();
    let result = (|| -> Result<(Option<Region>, Vec<Region>)> {
        // The source first: its length is the job's.
        let from = match from {
            Some(spec) => {
                if let Some(path) = spec.path() {
                    let access = Access {
                        write: false,
                        create_len: None,
                        buffered: files.buffered,
                    };
                    add_file(
                        &mut devices,
                        path,
                        access,
                        &anchor,
                        files,
                        spec.len.is_none(),
                    )?;
                }
                Some(region_of(&devices, spec, None)?)
            }
            None => None,
        };
        let default_len = from.map(|f| f.len);
        let mut out = Vec::with_capacity(to.len());
        for spec in to {
            if let Some(path) = spec.path() {
                if !devices
                    .iter()
                    .any(|d| d.name() == path.display().to_string())
                {
                    let len = spec.len.or(default_len);
                    let access = Access {
                        write: true,
                        create_len: len.map(|l| spec.offset.saturating_add(l)),
                        buffered: files.buffered,
                    };
                    let mut f = BlockFile::open(path, access)?;
                    if f.created() {
                        created.push(path.to_path_buf());
                    }
                    if let Some(len) = len {
                        f.reserve(spec.offset, len, files.sparse)?;
                    }
                    devices.push(FileDevice::new(f, anchor.clone(), files.io_timeout));
                }
            }
            out.push(region_of(&devices, spec, default_len)?);
        }
        Ok((from, out))
    })();
    let (from, to) = match result {
        Ok(r) => r,
        Err(e) => {
            remove_created(&created);
            return Err(e);
        }
    };
    trace::step("files opened, regions resolved");
    let engine = match Engine::with_devices(devices, pool, opts) {
        Ok(e) => e,
        Err(e) => {
            remove_created(&created);
            return Err(e);
        }
    };
    Ok(OpenedJob {
        engine,
        from,
        to,
        created,
    })
}

/// The mistakes a path can show before any device is opened: a source that does not
/// exist, a directory, a destination whose directory does not exist.
fn check_paths(from: Option<&RegionSpec>, to: &[RegionSpec]) -> Result<()> {
    use nvcopy_uring::Error as E;
    let dir = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_dir());
    if let Some(p) = from.and_then(|f| f.path()) {
        if !p.exists() {
            return Err(E::NotFound { path: p.into() }.into());
        }
    }
    for p in from.into_iter().chain(to).filter_map(|r| r.path()) {
        if dir(p) {
            return Err(E::IsDirectory { path: p.into() }.into());
        }
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !p.exists() && !dir(parent) {
            return Err(E::NotFound {
                path: parent.into(),
            }
            .into());
        }
    }
    Ok(())
}

/// Removes files a refused job created.
pub fn remove_created(created: &[PathBuf]) {
    for p in created {
        let _ = std::fs::remove_file(p);
    }
}

fn add_file(
    devices: &mut Devices,
    path: &Path,
    access: Access,
    anchor: &Arc<Anchor>,
    files: &FileOptions,
    len_needed: bool,
) -> Result<()> {
    if devices
        .iter()
        .any(|d| d.name() == path.display().to_string())
    {
        return Ok(());
    }
    let f = BlockFile::open(path, access)?;
    if len_needed && f.len() % f.block_size() as u64 != 0 {
        return Err(crate::error::Refusal::PartialBlock {
            path: path.display().to_string(),
            len: f.len(),
            block: f.block_size(),
        }
        .into());
    }
    devices.push(FileDevice::new(f, anchor.clone(), files.io_timeout));
    Ok(())
}

/// Resolves `spec` against the device of that name.
fn region_of(
    devices: &[Arc<dyn Device>],
    spec: &RegionSpec,
    default_len: Option<u64>,
) -> Result<Region> {
    let name = spec.place.to_string();
    let (i, d) = devices
        .iter()
        .enumerate()
        .find(|(_, d)| d.name() == name)
        .ok_or(crate::error::Refusal::NotInEngine { ctrl: name })?;
    let v = d.volume(spec.nsid)?;
    Region::check(spec, i, v.block_size, v.blocks, default_len)
}
