//! The few VFIO ioctls that vfio-ioctls does not wrap: the type1 IOVA-range query, region
//! info and reset on a raw device fd, and the container/group calls of no-IOMMU mode
//! (vfio-ioctls insists on a type1v2 container). Layouts follow `include/uapi/linux/vfio.h`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd};

/// `VFIO_TYPE` (';') and `VFIO_BASE`: every VFIO ioctl is `_IO(VFIO_TYPE, VFIO_BASE + n)`.
const fn vfio_io(n: u64) -> u64 {
    ((b';' as u64) << 8) | (100 + n)
}

const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
const VFIO_SET_IOMMU: u64 = vfio_io(2);
const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
const VFIO_DEVICE_GET_INFO: u64 = vfio_io(7);
const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
const VFIO_DEVICE_RESET: u64 = vfio_io(11);
const VFIO_IOMMU_GET_INFO: u64 = vfio_io(12);

/// IOMMU type of a container whose devices do DMA with physical addresses.
pub const VFIO_NOIOMMU_IOMMU: u32 = 8;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_DEVICE_FLAGS_RESET: u32 = 1;
const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;

/// Region index of BAR0 in a vfio-pci device.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// Region index of PCI configuration space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// The region can be mmapped.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct DeviceInfo {
    argsz: u32,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
    cap_offset: u32,
    pad: u32,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct RegionInfo {
    argsz: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    index: u32,
    cap_offset: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd.
    pub offset: u64,
}

#[repr(C)]
struct Type1Info {
    argsz: u32,
    flags: u32,
    iova_pgsizes: u64,
    cap_offset: u32,
    pad: u32,
}

const _: () = assert!(size_of::<GroupStatus>() == 8);
const _: () = assert!(size_of::<DeviceInfo>() == 24);
const _: () = assert!(size_of::<RegionInfo>() == 32);
const _: () = assert!(size_of::<Type1Info>() == 24);

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Reads the usable IOVA ranges (inclusive) of a type1 container that has an IOMMU set.
/// Returns an empty list when the kernel does not report them.
pub fn iova_ranges(container: &impl AsRawFd) -> io::Result<Vec<(u64, u64)>> {
    let header = size_of::<Type1Info>();
    // u64 words keep the buffer 8-byte aligned for the structures inside it.
    let mut buf = vec![0u64; header.div_ceil(8)];
    for _ in 0..2 {
        let argsz = (buf.len() * 8) as u32;
        let bytes = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: `buf` is at least `argsz` bytes long and 8-byte aligned, which is what
        // VFIO_IOMMU_GET_INFO may write; the first word holds argsz as the kernel expects.
        unsafe { bytes.cast::<u32>().write(argsz) };
        // SAFETY: the ioctl writes at most `argsz` bytes into `buf`, which is live and owned.
        check(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_GET_INFO as _, bytes) })?;
        // SAFETY: `buf` holds at least a Type1Info and is aligned for it.
        let info = unsafe { bytes.cast::<Type1Info>().read() };
        if info.argsz as usize > buf.len() * 8 {
            buf = vec![0u64; (info.argsz as usize).div_ceil(8)];
            continue;
        }
        if info.flags & VFIO_IOMMU_INFO_CAPS == 0 || info.cap_offset == 0 {
            return Ok(Vec::new());
        }
        let raw: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        return Ok(parse_iova_caps(&raw, info.cap_offset as usize));
    }
    Ok(Vec::new())
}

/// Walks the capability chain of a `vfio_iommu_type1_info` reply for the IOVA-range one.
fn parse_iova_caps(raw: &[u8], mut off: usize) -> Vec<(u64, u64)> {
    let u16_at = |o: usize| raw.get(o..o + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        raw.get(o..o + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        raw.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let mut hops = 0;
    while off != 0 && hops < 64 {
        hops += 1;
        let (Some(id), Some(next)) = (u16_at(off), u32_at(off + 4)) else {
            break;
        };
        if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = u32_at(off + 8).unwrap_or(0) as usize;
            return (0..n)
                .map_while(|i| {
                    let at = off + 16 + i * 16;
                    Some((u64_at(at)?, u64_at(at + 8)?))
                })
                .collect();
        }
        off = next as usize;
    }
    Vec::new()
}

/// Reads region `index` of a device.
pub fn region_info(device: &File, index: u32) -> io::Result<RegionInfo> {
    let mut info = RegionInfo {
        argsz: size_of::<RegionInfo>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: `info` is a live, correctly sized vfio_region_info that the kernel fills.
    check(unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            VFIO_DEVICE_GET_REGION_INFO as _,
            &mut info,
        )
    })?;
    Ok(info)
}

/// Whether VFIO can reset the device (`VFIO_DEVICE_FLAGS_RESET`). vfio-pci sets it when
/// the function reset it tried while opening the device worked.
pub fn reset_supported(device: &File) -> io::Result<bool> {
    let mut info = DeviceInfo {
        argsz: size_of::<DeviceInfo>() as u32,
        ..Default::default()
    };
    // SAFETY: `info` is a live, correctly sized vfio_device_info that the kernel fills.
    check(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_GET_INFO as _, &mut info) })?;
    Ok(info.flags & VFIO_DEVICE_FLAGS_RESET != 0)
}

/// Resets the device (function-level reset or equivalent).
pub fn reset_device(device: &File) -> io::Result<()> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument.
    check(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_RESET as _) })?;
    Ok(())
}

/// Whether a container supports an IOMMU type.
pub fn check_extension(container: &File, ext: u32) -> io::Result<bool> {
    // SAFETY: VFIO_CHECK_EXTENSION takes its argument by value and writes nothing.
    Ok(check(unsafe {
        libc::ioctl(
            container.as_raw_fd(),
            VFIO_CHECK_EXTENSION as _,
            ext as libc::c_ulong,
        )
    })? > 0)
}

/// Whether a group's devices are all bound to vfio-pci or to nothing.
pub fn group_viable(group: &File) -> io::Result<bool> {
    let mut status = GroupStatus {
        argsz: size_of::<GroupStatus>() as u32,
        flags: 0,
    };
    // SAFETY: `status` is a live, correctly sized vfio_group_status that the kernel fills.
    check(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_STATUS as _, &mut status) })?;
    Ok(status.flags & VFIO_GROUP_FLAGS_VIABLE != 0)
}

/// Adds a group to a container.
pub fn group_set_container(group: &File, container: &File) -> io::Result<()> {
    let fd: libc::c_int = container.as_raw_fd();
    // SAFETY: the ioctl reads one int (the container fd) through the pointer, which is live.
    check(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_SET_CONTAINER as _, &fd) })?;
    Ok(())
}

/// Sets a container's IOMMU type; valid once a group is attached.
pub fn set_iommu(container: &File, kind: u32) -> io::Result<()> {
    // SAFETY: VFIO_SET_IOMMU takes its argument by value and writes nothing.
    check(unsafe {
        libc::ioctl(
            container.as_raw_fd(),
            VFIO_SET_IOMMU as _,
            kind as libc::c_ulong,
        )
    })?;
    Ok(())
}

/// Gets a device fd from its group by name (`0000:00:10.0`).
pub fn group_get_device(group: &File, name: &str) -> io::Result<File> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the ioctl reads a NUL-terminated string through the pointer, which is live.
    let fd = check(unsafe {
        libc::ioctl(
            group.as_raw_fd(),
            VFIO_GROUP_GET_DEVICE_FD as _,
            name.as_ptr(),
        )
    })?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
    }

    #[test]
    fn finds_the_iova_range_capability_in_a_chain() {
        // Header (24 bytes), then an unrelated capability (id 2) at 24, then the IOVA ranges at 40.
        let mut raw = vec![0u8; 24];
        let mut push = |bytes: &[u8]| raw.extend_from_slice(bytes);
        push(&2u16.to_ne_bytes());
        push(&1u16.to_ne_bytes());
        push(&40u32.to_ne_bytes());
        push(&[0u8; 8]);
        push(&1u16.to_ne_bytes());
        push(&1u16.to_ne_bytes());
        push(&0u32.to_ne_bytes());
        push(&2u32.to_ne_bytes());
        push(&0u32.to_ne_bytes());
        for (s, e) in [(0u64, 0xfedf_ffffu64), (0xfef0_0000, 0x7f_ffff_ffff)] {
            push(&s.to_ne_bytes());
            push(&e.to_ne_bytes());
        }
        assert_eq!(
            parse_iova_caps(&raw, 24),
            vec![(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]
        );
        // A truncated or looping chain ends quietly.
        assert!(parse_iova_caps(&raw[..30], 24).is_empty());
    }
}
