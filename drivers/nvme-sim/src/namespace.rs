//! A namespace's data and what Identify Namespace says about it (NVM command set spec
//! 4.1.5.1). Data lives in sparse memory (4 KiB pages, allocated on first write) or in a
//! sparse file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use super::config::NamespaceConfig;
use super::status::LBA_OUT_OF_RANGE;
use nvcopy_nvme::Status;

const PAGE: usize = 4096;

/// Sparse memory: pages never written read as zeroes.
#[derive(Default)]
struct SparseMemory {
    pages: HashMap<u64, Box<[u8]>>,
}

impl std::fmt::Debug for SparseMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseMemory")
            .field("pages", &self.pages.len())
            .finish()
    }
}

impl SparseMemory {
    /// Calls `f(page index, offset in page, range of the caller's buffer)` for each piece
    /// of `off..off + len`.
    fn pieces(off: u64, len: usize, mut f: impl FnMut(u64, usize, std::ops::Range<usize>)) {
        let mut done = 0;
        while done < len {
            let at = off + done as u64;
            let in_page = (at % PAGE as u64) as usize;
            let n = (PAGE - in_page).min(len - done);
            f(at / PAGE as u64, in_page, done..done + n);
            done += n;
        }
    }

    fn read(&self, off: u64, buf: &mut [u8]) {
        Self::pieces(off, buf.len(), |page, at, r| {
            let n = r.len();
            match self.pages.get(&page) {
                Some(p) => buf[r].copy_from_slice(&p[at..at + n]),
                None => buf[r].fill(0),
            }
        });
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        Self::pieces(off, data.len(), |page, at, r| {
            let n = r.len();
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
            p[at..at + n].copy_from_slice(&data[r]);
        });
    }

    fn zero(&mut self, off: u64, len: u64) {
        let mut done = 0u64;
        while done < len {
            let at = off + done;
            let in_page = (at % PAGE as u64) as usize;
            let n = ((PAGE - in_page) as u64).min(len - done) as usize;
            let page = at / PAGE as u64;
            if n == PAGE {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                p[in_page..in_page + n].fill(0);
            }
            done += n as u64;
        }
    }
}

#[derive(Debug)]
enum Store {
    Memory(SparseMemory),
    File(File),
}

/// One active namespace.
#[derive(Debug)]
pub struct SimNamespace {
    pub lba_size: u32,
    pub blocks: u64,
    pub metadata: u16,
    pub mssrl: u16,
    pub mcl: u32,
    /// 0-based, as in Identify.
    pub msrc: u8,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    store: Store,
}

/// LBA formats every namespace lists (data size, metadata size); the configured one is
/// added when it is not among them.
const FORMATS: [(u32, u16); 4] = [(512, 0), (4096, 0), (512, 8), (4096, 8)];

impl SimNamespace {
    /// Builds the namespace, opening (and sizing) its file if it has one.
    pub fn open(cfg: &NamespaceConfig) -> io::Result<Self> {
        if !cfg.lba_size.is_power_of_two() || !(512..=65536).contains(&cfg.lba_size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "LBA size {} is not a power of two from 512 to 65536",
                    cfg.lba_size
                ),
            ));
        }
        let bytes = cfg.blocks.checked_mul(cfg.lba_size as u64).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "namespace size overflows")
        })?;
        let store = match &cfg.file {
            None => Store::Memory(SparseMemory::default()),
            Some(path) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)?;
                if f.metadata()?.len() < bytes {
                    f.set_len(bytes)?;
                }
                Store::File(f)
            }
        };
        Ok(SimNamespace {
            lba_size: cfg.lba_size,
            blocks: cfg.blocks,
            metadata: cfg.metadata,
            mssrl: cfg.mssrl,
            mcl: cfg.mcl,
            msrc: cfg.msrc,
            nguid: cfg.nguid,
            eui64: cfg.eui64,
            store,
        })
    }

    /// Capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * self.lba_size as u64
    }

    /// The byte range of `nlb` blocks from `slba`, or LBA Out of Range.
    pub fn span(&self, slba: u64, nlb: u64) -> Result<(u64, u64), Status> {
        match slba.checked_add(nlb) {
            Some(end) if end <= self.blocks => {
                Ok((slba * self.lba_size as u64, nlb * self.lba_size as u64))
            }
            _ => Err(LBA_OUT_OF_RANGE),
        }
    }

    /// Reads `buf.len()` bytes at byte offset `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(off, buf.len() as u64)?;
        match &self.store {
            Store::Memory(m) => {
                m.read(off, buf);
                Ok(())
            }
            Store::File(f) => f.read_exact_at(buf, off),
        }
    }

    /// Writes `data` at byte offset `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) -> io::Result<()> {
        self.check(off, data.len() as u64)?;
        match &mut self.store {
            Store::Memory(m) => {
                m.write(off, data);
                Ok(())
            }
            Store::File(f) => f.write_all_at(data, off),
        }
    }

    /// Zeroes `len` bytes at byte offset `off`.
    pub fn zero(&mut self, off: u64, len: u64) -> io::Result<()> {
        self.check(off, len)?;
        match &mut self.store {
            Store::Memory(m) => {
                m.zero(off, len);
                Ok(())
            }
            Store::File(f) => {
                let zeroes = vec![0u8; 64 << 10];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeroes.len() as u64) as usize;
                    f.write_all_at(&zeroes[..n], off + done)?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }

    /// Bytes of memory the namespace's data takes (0 for a file-backed namespace).
    pub fn resident_bytes(&self) -> u64 {
        match &self.store {
            Store::Memory(m) => (m.pages.len() * PAGE) as u64,
            Store::File(_) => 0,
        }
    }

    fn check(&self, off: u64, len: u64) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.bytes() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bytes {off}+{len} lie outside the {}-byte namespace",
                    self.bytes()
                ),
            )),
        }
    }

    /// The Identify Namespace data structure (4096 bytes).
    pub fn identify(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0..8].copy_from_slice(&self.blocks.to_le_bytes()); // NSZE
        b[8..16].copy_from_slice(&self.blocks.to_le_bytes()); // NCAP
        b[16..24].copy_from_slice(&self.blocks.to_le_bytes()); // NUSE
        let mut formats = FORMATS.to_vec();
        let current = (self.lba_size, self.metadata);
        let index = match formats.iter().position(|&f| f == current) {
            Some(i) => i,
            None => {
                formats.push(current);
                formats.len() - 1
            }
        };
        b[25] = (formats.len() - 1) as u8; // NLBAF, 0-based
        b[26] = index as u8; // FLBAS: format index, metadata in a separate buffer
        b[33] = 0x09; // DLFEAT: deallocated blocks read as zeroes; Write Zeroes may deallocate
        b[74..76].copy_from_slice(&self.mssrl.to_le_bytes()); // MSSRL
        b[76..80].copy_from_slice(&self.mcl.to_le_bytes()); // MCL
        b[80] = self.msrc; // MSRC, 0-based
        b[104..120].copy_from_slice(&self.nguid); // NGUID
        b[120..128].copy_from_slice(&self.eui64); // EUI64
        for (i, &(size, ms)) in formats.iter().enumerate() {
            let lbaf = ms as u32 | size.trailing_zeros() << 16;
            b[128 + 4 * i..132 + 4 * i].copy_from_slice(&lbaf.to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_memory_reads_zeroes_and_frees_whole_pages() {
        let mut m = SparseMemory::default();
        m.write(4090, &[7u8; 12]);
        assert_eq!(m.pages.len(), 2);
        let mut out = [1u8; 16];
        m.read(4088, &mut out);
        assert_eq!(out[..2], [0, 0]);
        assert!(out[2..14].iter().all(|&b| b == 7));
        assert_eq!(out[14..], [0, 0]);
        m.zero(4092, 4096 + 4);
        assert_eq!(m.pages.len(), 1, "the second page was zeroed whole");
        m.read(4088, &mut out);
        assert_eq!(out[2..4], [7, 7]);
        assert!(out[4..].iter().all(|&b| b == 0));
    }
}
