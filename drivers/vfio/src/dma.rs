//! DMA memory. A pool is one mapping of 2 MiB hugepages (or 4 KiB pages when asked for),
//! mapped once into the IOMMU and carved into page-aligned buffers. The device may write a
//! buffer at any time, so a buffer gives out only its IOVA and volatile access through
//! vm-memory's [`VolatileSlice`], never a Rust reference.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{VolatileMemory, VolatileSlice};

use crate::container::{IommuMode, Vfio};
use crate::error::{Error, Result};
use crate::iova::Iova;

/// The unit of allocation, and the memory page size nvcopy programs into NVMe (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;
/// The hugepage size pools are made of.
pub const HUGEPAGE_SIZE: usize = 2 << 20;

/// What a pool is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// 2 MiB hugepages: few IOMMU entries, and physically contiguous 2 MiB runs.
    Huge,
    /// Ordinary 4 KiB pages, only when the caller asks (no hugepages reserved).
    Small,
}

impl PageKind {
    /// Refuses a kind of page that cannot back DMA memory in `mode`. No-IOMMU mode hands
    /// the device physical addresses, so the pages must never move: locked 4 KiB pages
    /// still may (compaction, NUMA balancing), 2 MiB hugetlb pages do not.
    pub fn check_mode(self, mode: IommuMode) -> Result<()> {
        match (mode, self) {
            (IommuMode::NoIommu, PageKind::Small) => Err(Error::NoIommuSmallPages),
            _ => Ok(()),
        }
    }
}

impl PageKind {
    fn unit(self) -> usize {
        match self {
            PageKind::Huge => HUGEPAGE_SIZE,
            PageKind::Small => PAGE_SIZE,
        }
    }
}

/// Memory for a pool, allocated and populated (faulted in, zeroed by the kernel, locked)
/// but not yet reachable by any device. Taking it costs most of a pool's set-up time and
/// needs no device, so it can run while the devices are being opened; [`DmaPool::map`]
/// then maps it into the IOMMU.
#[derive(Debug)]
pub struct HostMemory {
    region: MmapRegion,
    kind: PageKind,
}

impl HostMemory {
    /// `bytes`, rounded up to whole pages of `kind`, populated.
    pub fn new(bytes: usize, kind: PageKind) -> Result<HostMemory> {
        let size = bytes.max(PAGE_SIZE).next_multiple_of(kind.unit());
        Ok(HostMemory {
            region: map_memory(size, kind)?,
            kind,
        })
    }

    /// Bytes allocated.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// Never true: at least one page is allocated.
    pub fn is_empty(&self) -> bool {
        self.region.len() == 0
    }
}

/// How a pool offset becomes a device address.
#[derive(Debug)]
enum Translation {
    /// One contiguous IOVA range for the whole pool (type1, or an unmapped test pool).
    Linear(Iova),
    /// No-IOMMU: physical addresses, contiguous only within each `1 << shift` unit.
    PerUnit { shift: u32, table: Vec<u64> },
}

/// Which pages are in use: one flag a page, and how many are free.
#[derive(Debug)]
struct FreeMap {
    used: Vec<bool>,
    free: usize,
}

#[derive(Debug)]
struct PoolInner {
    region: MmapRegion,
    translation: Translation,
    /// Buffers never straddle this many pages, so that each one is contiguous to the device.
    contig_pages: usize,
    free: Mutex<FreeMap>,
    mapping: Option<(Arc<Vfio>, Iova)>,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // Unmapping from the IOMMU comes before `region` is unmapped from the process.
        if let Some((vfio, iova)) = &self.mapping {
            vfio.dma_unmap(*iova, self.region.len());
        }
    }
}

/// A pool of DMA memory. Cheap to clone; buffers keep it alive.
#[derive(Clone, Debug)]
pub struct DmaPool {
    inner: Arc<PoolInner>,
}

/// Reads a `Key: value` number from /proc/meminfo.
fn meminfo(key: &str) -> Option<usize> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

impl DmaPool {
    /// Allocates `bytes` (rounded up to whole pages of `kind`) and maps them for every device
    /// of `vfio`. Open the devices first: the IOMMU's usable ranges are known only then.
    pub fn new(vfio: &Arc<Vfio>, bytes: usize, kind: PageKind) -> Result<DmaPool> {
        kind.check_mode(vfio.mode())?;
        DmaPool::map(vfio, HostMemory::new(bytes, kind)?)
    }

    /// Maps memory from [`HostMemory::new`] for every device of `vfio` (see
    /// [`DmaPool::new`], which is both steps in one).
    pub fn map(vfio: &Arc<Vfio>, memory: HostMemory) -> Result<DmaPool> {
        let HostMemory { region, kind } = memory;
        kind.check_mode(vfio.mode())?;
        let unit = kind.unit();
        let size = region.len();
        let (translation, contig_pages, mapping) = match vfio.mode() {
            IommuMode::Type1 => {
                let iova = vfio.alloc_iova(size)?;
                // SAFETY: `region` stays mapped until PoolInner's Drop unmaps the IOVA range
                // first, and the pool only ever touches it through VolatileSlice.
                unsafe { vfio.dma_map(iova, size, region.as_ptr())? };
                (
                    Translation::Linear(iova),
                    size / PAGE_SIZE,
                    Some((vfio.clone(), iova)),
                )
            }
            IommuMode::NoIommu => {
                let table = physical_addresses(&region, unit)?;
                (
                    Translation::PerUnit {
                        shift: unit.trailing_zeros(),
                        table,
                    },
                    unit / PAGE_SIZE,
                    None,
                )
            }
        };
        Ok(Self::from_parts(region, translation, contig_pages, mapping))
    }

    /// A pool of ordinary memory that no device can reach, with made-up linear IOVAs. The
    /// software NVMe controller and unit tests use it: they resolve IOVAs with
    /// [`DmaPool::slice_at`].
    pub fn unmapped(bytes: usize) -> Result<DmaPool> {
        let size = bytes.max(PAGE_SIZE).next_multiple_of(PAGE_SIZE);
        let region = MmapRegion::new(size).map_err(|e| {
            Error::io(
                format!("mapping {size} bytes"),
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(Self::from_parts(
            region,
            Translation::Linear(Iova(0x1_0000_0000)),
            size / PAGE_SIZE,
            None,
        ))
    }

    fn from_parts(
        region: MmapRegion,
        translation: Translation,
        contig_pages: usize,
        mapping: Option<(Arc<Vfio>, Iova)>,
    ) -> DmaPool {
        let pages = region.len() / PAGE_SIZE;
        DmaPool {
            inner: Arc::new(PoolInner {
                region,
                translation,
                contig_pages,
                free: Mutex::new(FreeMap {
                    used: vec![false; pages],
                    free: pages,
                }),
                mapping,
            }),
        }
    }

    /// Pages in the pool.
    pub fn total_pages(&self) -> usize {
        self.inner.region.len() / PAGE_SIZE
    }

    /// Pages not handed out.
    pub fn free_pages(&self) -> usize {
        self.inner
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .free
    }

    /// The largest buffer that can be device-contiguous in this pool.
    pub fn max_contiguous(&self) -> usize {
        self.inner.contig_pages * PAGE_SIZE
    }

    /// A buffer of `len` bytes (rounded up to whole pages), page aligned and contiguous in
    /// device address space. Its previous contents are unspecified.
    pub fn alloc(&self, len: usize) -> Result<DmaBuf> {
        let pages = len.max(1).div_ceil(PAGE_SIZE);
        if pages > self.inner.contig_pages {
            return Err(Error::BufferTooLarge {
                len,
                max: self.max_contiguous(),
            });
        }
        let mut map = self
            .inner
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let first =
            find_run(&map.used, pages, self.inner.contig_pages).ok_or(Error::PoolExhausted {
                len,
                free_pages: map.free,
                total_pages: map.used.len(),
            })?;
        map.used[first..first + pages].fill(true);
        map.free -= pages;
        drop(map);
        let offset = first * PAGE_SIZE;
        Ok(DmaBuf {
            iova: self.inner.iova_of(offset),
            pool: self.inner.clone(),
            offset,
            len: pages * PAGE_SIZE,
            quarantined: false,
        })
    }

    /// Like [`DmaPool::alloc`], filled with zeroes.
    pub fn alloc_zeroed(&self, len: usize) -> Result<DmaBuf> {
        let buf = self.alloc(len)?;
        buf.zero();
        Ok(buf)
    }

    /// The pool memory behind `iova..iova + len`, if this pool has a linear IOVA range that
    /// holds it. This is how a device model in the same process reaches the memory a driver
    /// pointed it at.
    pub fn slice_at(&self, iova: Iova, len: usize) -> Option<VolatileSlice<'_>> {
        let Translation::Linear(base) = self.inner.translation else {
            return None;
        };
        let off = usize::try_from(iova.0.checked_sub(base.0)?).ok()?;
        self.inner.region.get_slice(off, len).ok()
    }

    /// The pool's memory as the process sees it: its first byte and length. For a kernel
    /// interface that takes host addresses rather than device ones (io_uring's registered
    /// buffers). The memory stays mapped while any clone of the pool lives; a device may
    /// write it at any time, so only volatile access through the pointer is sound.
    pub fn host_region(&self) -> (*mut u8, usize) {
        (self.inner.region.as_ptr(), self.inner.region.len())
    }

    /// Where `iova..iova + len` lies in [`DmaPool::host_region`], as a byte offset, if the
    /// whole range is in this pool.
    pub fn host_offset(&self, iova: Iova, len: usize) -> Option<usize> {
        let size = self.inner.region.len();
        let off = match &self.inner.translation {
            Translation::Linear(base) => usize::try_from(iova.0.checked_sub(base.0)?).ok()?,
            Translation::PerUnit { shift, table } => {
                let unit = 1u64 << shift;
                let i = table
                    .iter()
                    .position(|&pa| pa <= iova.0 && iova.0 - pa < unit)?;
                (i << shift) + usize::try_from(iova.0 - table[i]).ok()?
            }
        };
        (off.checked_add(len)? <= size).then_some(off)
    }
}

impl PoolInner {
    fn iova_of(&self, offset: usize) -> Iova {
        match &self.translation {
            Translation::Linear(base) => base.add(offset as u64),
            Translation::PerUnit { shift, table } => {
                let unit = offset >> shift;
                Iova(table[unit] + (offset - (unit << shift)) as u64)
            }
        }
    }
}

/// First-fit search for `n` free pages that do not cross a `unit`-page boundary.
fn find_run(used: &[bool], n: usize, unit: usize) -> Option<usize> {
    let mut start = 0;
    while start + n <= used.len() {
        let unit_end = (start / unit + 1) * unit;
        if start + n > unit_end {
            start = unit_end;
            continue;
        }
        match used[start..start + n].iter().rposition(|&u| u) {
            Some(busy) => start += busy + 1,
            None => return Some(start),
        }
    }
    None
}

/// Maps anonymous memory of `kind`, populated and locked so that it never moves.
fn map_memory(size: usize, kind: PageKind) -> Result<MmapRegion> {
    let base = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
    let flags = match kind {
        PageKind::Huge => base | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
        PageKind::Small => base,
    };
    let built = MmapRegionBuilder::new(size)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .with_hugetlbfs(kind == PageKind::Huge)
        .build();
    let region = match built {
        Ok(r) => r,
        Err(_) if kind == PageKind::Huge => {
            let needed = size / HUGEPAGE_SIZE;
            let free = meminfo("HugePages_Free").unwrap_or(0);
            let total = meminfo("HugePages_Total").unwrap_or(0);
            let suggest = total + needed.saturating_sub(free);
            return Err(Error::NoHugepages {
                needed,
                mib: size >> 20,
                free,
                suggest,
                suggest_mib: suggest * 2,
            });
        }
        Err(e) => {
            return Err(Error::io(
                format!("mapping {size} bytes of memory"),
                std::io::Error::other(e.to_string()),
            ))
        }
    };
    if kind == PageKind::Small {
        // SAFETY: the range is exactly the mapping `region` owns; mlock changes residency
        // only, not contents or validity.
        if unsafe { libc::mlock(region.as_ptr().cast(), size) } != 0 {
            return Err(Error::io(
                "locking DMA memory (raise RLIMIT_MEMLOCK)",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(region)
}

/// Physical address of the start of each `unit`-sized piece of `region`, from
/// /proc/self/pagemap (bits 0-54 PFN, bit 63 present; see Documentation/admin-guide/mm/pagemap.rst).
fn physical_addresses(region: &MmapRegion, unit: usize) -> Result<Vec<u64>> {
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| Error::io("opening /proc/self/pagemap", e))?;
    let base = region.as_ptr() as usize;
    (0..region.len() / unit)
        .map(|i| {
            let vaddr = base + i * unit;
            let mut entry = [0u8; 8];
            pagemap
                .read_exact_at(&mut entry, (vaddr / PAGE_SIZE * 8) as u64)
                .map_err(|e| Error::Pagemap {
                    vaddr,
                    reason: e.to_string(),
                })?;
            let entry = u64::from_ne_bytes(entry);
            let pfn = entry & ((1 << 55) - 1);
            if entry >> 63 == 0 || pfn == 0 {
                return Err(Error::Pagemap {
                    vaddr,
                    reason: "page not present or PFN hidden".into(),
                });
            }
            Ok(pfn * PAGE_SIZE as u64)
        })
        .collect()
}

/// A page-aligned, device-contiguous piece of a pool. Dropping it returns its pages.
#[derive(Debug)]
pub struct DmaBuf {
    pool: Arc<PoolInner>,
    offset: usize,
    len: usize,
    iova: Iova,
    /// Set by [`DmaBuf::quarantine`]: the pages stay allocated after the buffer drops.
    quarantined: bool,
}

impl DmaBuf {
    /// The device address of the first byte. The whole buffer is contiguous from there.
    #[inline]
    pub fn iova(&self) -> Iova {
        self.iova
    }

    /// Length in bytes (whole pages).
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never empty; here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's first byte, for drivers that do their own volatile access in a hot
    /// path (queue rings). Valid for `len()` bytes while this buffer lives; the device may
    /// write it at any time, so only volatile or atomic access through it is sound, and
    /// no reference may be made from it.
    #[inline]
    pub fn as_mut_ptr(&self) -> *mut u8 {
        // wrapping_add: no unsafe needed to form the address; `offset` lies inside the region.
        self.pool.region.as_ptr().wrapping_add(self.offset)
    }

    /// Volatile access to the whole buffer.
    #[inline]
    pub fn slice(&self) -> VolatileSlice<'_> {
        match self.pool.region.get_slice(self.offset, self.len) {
            Ok(s) => s,
            // The allocator only hands out ranges inside the region.
            Err(e) => unreachable!("DMA buffer outside its pool: {e}"),
        }
    }

    /// Copies `data` into the buffer at `offset`. Panics if it does not fit, like slice
    /// indexing: callers size their buffers.
    pub fn write_at(&self, offset: usize, data: &[u8]) {
        self.sub(offset, data.len()).copy_from(data);
    }

    /// Copies bytes out of the buffer at `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) {
        self.sub(offset, out.len()).copy_to(out);
    }

    /// Keeps the buffer's pages out of the pool for the pool's life, even after it drops.
    /// For memory that a device may still write because it could not be proven quiet: no
    /// later allocation may ever be handed those pages.
    pub fn quarantine(&mut self) {
        self.quarantined = true;
    }

    /// Fills the buffer with zeroes.
    pub fn zero(&self) {
        static ZEROES: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        for page in 0..self.len / PAGE_SIZE {
            self.write_at(page * PAGE_SIZE, &ZEROES);
        }
    }

    fn sub(&self, offset: usize, len: usize) -> VolatileSlice<'_> {
        match self.slice().subslice(offset, len) {
            Ok(s) => s,
            Err(e) => panic!(
                "access at {offset}+{len} outside a {}-byte DMA buffer: {e}",
                self.len
            ),
        }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        if self.quarantined {
            return;
        }
        let first = self.offset / PAGE_SIZE;
        let pages = self.len / PAGE_SIZE;
        let mut map = self
            .pool
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.used[first..first + pages].fill(false);
        map.free += pages;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noiommu_mode_needs_hugepages() {
        assert!(matches!(
            PageKind::Small.check_mode(IommuMode::NoIommu),
            Err(Error::NoIommuSmallPages)
        ));
        assert!(PageKind::Huge.check_mode(IommuMode::NoIommu).is_ok());
        assert!(PageKind::Small.check_mode(IommuMode::Type1).is_ok());
        assert!(PageKind::Huge.check_mode(IommuMode::Type1).is_ok());
    }

    #[test]
    fn first_fit_respects_contiguity_units() {
        let mut used = vec![false; 8];
        assert_eq!(find_run(&used, 3, 4), Some(0));
        used[1] = true;
        // 0 is free but 0..3 crosses a used page; 2..5 crosses the unit boundary at 4.
        assert_eq!(find_run(&used, 3, 4), Some(4));
        assert_eq!(find_run(&used, 2, 4), Some(2));
        assert_eq!(find_run(&used, 5, 4), None);
        assert_eq!(find_run(&used, 5, 8), Some(2));
    }

    #[test]
    fn buffers_come_back_and_translate_linearly() {
        let pool = DmaPool::unmapped(16 * PAGE_SIZE).unwrap();
        let a = pool.alloc(1).unwrap();
        let b = pool.alloc(PAGE_SIZE + 1).unwrap();
        assert_eq!((a.len(), b.len()), (PAGE_SIZE, 2 * PAGE_SIZE));
        assert_eq!(b.iova().0 - a.iova().0, PAGE_SIZE as u64);
        assert_eq!(pool.free_pages(), 13);
        b.write_at(PAGE_SIZE - 2, b"hello");
        let mut out = [0u8; 5];
        pool.slice_at(b.iova().add(PAGE_SIZE as u64 - 2), 5)
            .unwrap()
            .copy_to(&mut out[..]);
        assert_eq!(&out, b"hello");
        drop(b);
        assert_eq!(pool.free_pages(), 15);
        assert!(matches!(
            pool.alloc(16 * PAGE_SIZE),
            Err(Error::PoolExhausted { .. })
        ));
        assert!(matches!(
            pool.alloc(17 * PAGE_SIZE),
            Err(Error::BufferTooLarge { .. })
        ));
        let z = pool.alloc_zeroed(15 * PAGE_SIZE).unwrap();
        let mut all = vec![1u8; z.len()];
        z.read_at(0, &mut all);
        assert!(all.iter().all(|&x| x == 0));
        assert!(pool.slice_at(Iova(0), 1).is_none());
    }
}
