//! Socket I/O with gather/scatter lists that point into owned buffers or into the DMA
//! pool's pages: the only unsafe code of the crate. Every call is non-blocking
//! (MSG_DONTWAIT) and never raises SIGPIPE (MSG_NOSIGNAL).

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};

use nvcopy_vfio::DmaPool;

/// Most segments one call takes.
pub const MAX_SEGS: usize = 64;

/// A run of memory a send reads from or a receive writes into, valid for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct Seg<'a> {
    ptr: *mut u8,
    len: usize,
    /// Made from something that may be written ([`Seg::of_mut`], [`Seg::dma`]).
    writable: bool,
    _life: PhantomData<&'a mut [u8]>,
}

impl<'a> Seg<'a> {
    /// Bytes a send reads. Only [`send`] may be given it (it is never written through).
    pub fn of(b: &'a [u8]) -> Seg<'a> {
        Seg {
            ptr: b.as_ptr().cast_mut(),
            len: b.len(),
            writable: false,
            _life: PhantomData,
        }
    }

    /// Bytes a receive writes.
    pub fn of_mut(b: &'a mut [u8]) -> Seg<'a> {
        Seg {
            ptr: b.as_mut_ptr(),
            len: b.len(),
            writable: true,
            _life: PhantomData,
        }
    }

    /// `len` bytes at byte `offset` of the pool's memory, if they lie in it. The pool's
    /// memory is only reached through raw pointers and copies (never `&`), so the kernel
    /// reading or writing it through this run aliases no reference.
    pub fn dma(pool: &'a DmaPool, offset: usize, len: usize) -> Option<Seg<'a>> {
        let (base, size) = pool.host_region();
        if offset.checked_add(len)? > size {
            return None;
        }
        Some(Seg {
            // SAFETY: offset + len <= size, so the pointer stays inside the pool's mapping,
            // which lives as long as `pool` ('a).
            ptr: unsafe { base.add(offset) },
            len,
            writable: true,
            _life: PhantomData,
        })
    }

    /// Bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The first `n` bytes dropped.
    pub fn skip(self, n: usize) -> Seg<'a> {
        let n = n.min(self.len);
        Seg {
            // SAFETY: n <= len: the pointer stays within (or one past) the same run.
            ptr: unsafe { self.ptr.add(n) },
            len: self.len - n,
            ..self
        }
    }

    /// Only the first `n` bytes.
    pub fn take(self, n: usize) -> Seg<'a> {
        Seg {
            len: self.len.min(n),
            ..self
        }
    }

    /// Copies the run's bytes out, `CHUNK` at a time, to `f` (for digests over pool memory,
    /// which is never borrowed as `&[u8]`).
    pub fn read_chunks(&self, mut f: impl FnMut(&[u8])) {
        let mut buf = [0u8; 4096];
        let mut at = 0;
        while at < self.len {
            let n = (self.len - at).min(buf.len());
            // SAFETY: at + n <= len: the source is inside the run, valid for reads for
            // 'a; the destination is a distinct local buffer of at least n bytes.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), buf.as_mut_ptr(), n) };
            f(&buf[..n]);
            at += n;
        }
    }
}

fn iovecs(segs: &[Seg<'_>]) -> ([libc::iovec; MAX_SEGS], usize) {
    let mut v = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_SEGS];
    let mut n = 0;
    for s in segs.iter().filter(|s| s.len > 0).take(MAX_SEGS) {
        v[n] = libc::iovec {
            iov_base: s.ptr.cast(),
            iov_len: s.len,
        };
        n += 1;
    }
    (v, n)
}

fn msghdr(v: &mut [libc::iovec; MAX_SEGS], n: usize) -> libc::msghdr {
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = v.as_mut_ptr();
    m.msg_iovlen = n as _;
    m
}

/// Sends what `segs` hold, in order, as far as the socket takes it now: the bytes sent
/// (`WouldBlock` when none could be).
pub fn send(fd: &impl AsRawFd, segs: &[Seg<'_>]) -> io::Result<usize> {
    let (mut v, n) = iovecs(segs);
    if n == 0 {
        return Ok(0);
    }
    let m = msghdr(&mut v, n);
    // SAFETY: every iovec describes memory valid for reads for the segments' lifetime,
    // which outlives this call; the kernel only reads it for sendmsg.
    let r = unsafe { libc::sendmsg(fd.as_raw_fd(), &m, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Receives into `segs`, in order, what the socket has now: the bytes received (0 when
/// the peer closed, `WouldBlock` when nothing is there). The segments must have been made
/// with [`Seg::of_mut`] or [`Seg::dma`]
/// (anything else is refused with `InvalidInput`).
pub fn recv(fd: &impl AsRawFd, segs: &[Seg<'_>]) -> io::Result<usize> {
    if segs.iter().any(|s| !s.writable) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a receive into a read-only segment",
        ));
    }
    let (mut v, n) = iovecs(segs);
    if n == 0 {
        return Ok(0);
    }
    let mut m = msghdr(&mut v, n);
    // SAFETY: every iovec describes memory valid for writes for the segments' lifetime
    // (a `&mut` buffer or pool pages the caller's command owns), which outlives this call.
    let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut m, libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Waits up to `ms` milliseconds for `fd` to be readable (or writable, when `out`).
pub fn wait(fd: RawFd, out: bool, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN | if out { libc::POLLOUT } else { 0 },
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let _ = unsafe { libc::poll(&mut p, 1, ms) };
}

/// For tests: a global allocator that counts the allocations each thread makes, so that
/// a test can prove a path allocates nothing.
#[cfg(test)]
pub(crate) mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    /// Allocations this thread made so far.
    pub(crate) fn allocations() -> u64 {
        ALLOCATIONS.with(Cell::get)
    }

    struct Counting;

    // SAFETY: every call is passed on unchanged to the system allocator; the counter is a
    // const-initialised thread local, which never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            ALLOCATIONS.with(|c| c.set(c.get() + 1));
            // SAFETY: the caller's contract for `alloc`, passed on.
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            // SAFETY: the caller's contract for `dealloc`, passed on.
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
            ALLOCATIONS.with(|c| c.set(c.get() + 1));
            // SAFETY: the caller's contract for `realloc`, passed on.
            unsafe { System.realloc(p, l, n) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;
}
