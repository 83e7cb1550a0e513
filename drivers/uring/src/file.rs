//! Opening a file or a kernel block device for a copy, and what it is: its size, the
//! alignment direct I/O needs, its identity, and whether space could be reserved.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What is behind the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A kernel block device.
    BlockDevice,
}

/// How to open.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    /// Open for writing too.
    pub write: bool,
    /// Create a regular file of this length if the path does not exist.
    pub create_len: Option<u64>,
    /// Through the page cache instead of O_DIRECT.
    pub buffered: bool,
}

/// An open file or block device.
#[derive(Debug)]
pub struct BlockFile {
    file: File,
    path: PathBuf,
    kind: FileKind,
    len: u64,
    block_size: u32,
    direct: bool,
    /// (st_dev, st_ino) of a file; (st_rdev, 0) of a block device.
    identity: (u64, u64),
    created: bool,
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

impl BlockFile {
    /// Opens `path`. A block device is opened exclusively (O_EXCL), so one that is
    /// mounted or held is refused; a file is never truncated.
    pub fn open(path: &Path, access: Access) -> Result<BlockFile> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(path, "stat")(e)),
        };
        let (kind, created) = match &meta {
            None if access.create_len.is_some() => (FileKind::Regular, true),
            None => {
                return Err(Error::NotFound {
                    path: path.to_path_buf(),
                })
            }
            Some(m) if m.is_dir() => {
                return Err(Error::IsDirectory {
                    path: path.to_path_buf(),
                })
            }
            Some(m) if m.is_file() => (FileKind::Regular, false),
            Some(m) if m.file_type().is_block_device() => (FileKind::BlockDevice, false),
            Some(m) => {
                let ft = m.file_type();
                let what = if ft.is_char_device() {
                    "character device"
                } else if ft.is_fifo() {
                    "FIFO"
                } else if ft.is_socket() {
                    "socket"
                } else {
                    "special file"
                };
                return Err(Error::NotBlockOrFile {
                    path: path.to_path_buf(),
                    kind: what,
                });
            }
        };
        let mut flags = 0;
        if !access.buffered {
            flags |= libc::O_DIRECT;
        }
        if kind == FileKind::BlockDevice {
            // Without O_CREAT, O_EXCL on a block device means "fail with EBUSY if it is
            // mounted or claimed" (open(2)).
            flags |= libc::O_EXCL;
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(access.write).custom_flags(flags);
        if created {
            oo.create_new(true);
        }
        let file = oo.open(path).inspect_err(|_| {
            // open(2) may create the file and then refuse O_DIRECT on it.
            if created {
                let _ = std::fs::remove_file(path);
            }
        });
        let file = file.map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => Error::Busy {
                path: path.to_path_buf(),
            },
            Some(libc::EINVAL) if !access.buffered => Error::NoDirectIo {
                path: path.to_path_buf(),
            },
            _ => io(path, "open")(e),
        })?;
        if let (true, Some(len)) = (created, access.create_len) {
            if let Err(e) = file.set_len(len) {
                let _ = std::fs::remove_file(path);
                return Err(io(path, "setting the new file's length")(e));
            }
        }
        let meta = file.metadata().map_err(io(path, "stat"))?;
        let (len, block_size, identity) = match kind {
            FileKind::Regular => (
                meta.len(),
                if access.buffered {
                    // The page cache takes any offset and length.
                    1
                } else {
                    dio_alignment(&file).unwrap_or(4096)
                },
                (meta.dev(), meta.ino()),
            ),
            FileKind::BlockDevice => {
                // O_EXCL sees the kernel's holders (mounts, device mapper, md, swap) and
                // other exclusive openers; a program that opened it plainly shows only in
                // /proc.
                if let Some(pid) = other_opener(meta.rdev()) {
                    return Err(Error::OpenElsewhere {
                        path: path.to_path_buf(),
                        pid,
                    });
                }
                let mut f = &file;
                let len = f.seek(SeekFrom::End(0)).map_err(io(path, "size"))?;
                (len, logical_block_size(&file, path)?, (meta.rdev(), 0))
            }
        };
        Ok(BlockFile {
            file,
            path: path.to_path_buf(),
            kind,
            len,
            block_size,
            direct: !access.buffered,
            identity,
            created,
        })
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// File or block device.
    pub fn kind(&self) -> FileKind {
        self.kind
    }
    /// Bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The alignment of offsets, lengths and buffers for its I/O.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
    /// (st_dev, st_ino) of a file; (st_rdev, 0) of a block device.
    pub fn identity(&self) -> (u64, u64) {
        self.identity
    }
    /// Whether this open created the file.
    pub fn created(&self) -> bool {
        self.created
    }
    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// The open file, for the rings to register.
    pub fn into_file(self) -> File {
        self.file
    }

    /// Makes sure a destination can hold `len` bytes at `offset` before any data moves:
    /// a regular file grows to at least `offset + len` (it is never shortened) and the
    /// range is allocated (fallocate), so that a full filesystem is found now rather than
    /// in the middle of the copy. A block device must already be large enough (the
    /// caller checks its size). `sparse`: leave holes unallocated.
    pub fn reserve(&mut self, offset: u64, len: u64, sparse: bool) -> Result<()> {
        if self.kind != FileKind::Regular {
            return Ok(());
        }
        let end = offset.saturating_add(len);
        let no_space = |source| Error::NoSpace {
            path: self.path.clone(),
            offset,
            needed: len,
            source,
        };
        if !sparse {
            let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
                return Err(no_space(std::io::Error::from_raw_os_error(libc::EFBIG)));
            };
            // SAFETY: fallocate on a descriptor this struct owns; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, off, n) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                // A filesystem that cannot preallocate still gets the copy; one that is
                // full is refused now.
                if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(no_space(e));
                }
            }
        }
        if end > self.len {
            self.file.set_len(end).map_err(|e| Error::NoSpace {
                path: self.path.clone(),
                offset,
                needed: len,
                source: e,
            })?;
            self.len = end;
        }
        Ok(())
    }
}

/// A process other than this one with the block device `rdev` open, from the
/// descriptors listed in /proc/PID/fd (those this process may read: all, as root).
fn other_opener(rdev: u64) -> Option<u32> {
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if !target.starts_with("/dev") {
                continue;
            }
            let same = std::fs::metadata(&target)
                .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev);
            if same {
                return Some(pid);
            }
        }
    }
    None
}

/// The offset alignment the filesystem asks of direct I/O to this file (statx
/// STATX_DIOALIGN, Linux 6.1), if it says.
fn dio_alignment(file: &File) -> Option<u32> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names the descriptor; `sx` is a valid,
    // writable statx buffer for the call's duration.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut sx,
        )
    };
    if r != 0 || sx.stx_mask & libc::STATX_DIOALIGN == 0 || sx.stx_dio_offset_align == 0 {
        return None;
    }
    // Buffers are 4 KiB pages, so only the offset alignment constrains a region.
    Some(sx.stx_dio_offset_align.max(512))
}

/// A block device's logical block size (BLKSSZGET).
fn logical_block_size(file: &File, path: &Path) -> Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for it.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if r != 0 {
        return Err(io(path, "BLKSSZGET")(std::io::Error::last_os_error()));
    }
    Ok(u32::try_from(size).unwrap_or(512).max(512))
}
