//! Physical Region Page entries (base spec 4.3.1). The first entry may start anywhere in a
//! page (dword aligned); every later entry is a whole page. Two pages fit in PRP1/PRP2;
//! more need a PRP list, which nvcopy keeps to one 4 KiB page per command by capping a
//! command at [`MAX_TRANSFER`] bytes.

use nvcopy_vfio::{Iova, PAGE_SIZE};

/// Entries in one PRP list page.
pub const LIST_ENTRIES: usize = PAGE_SIZE / 8;
/// The largest transfer one command carries: PRP1 plus one full list page.
pub const MAX_TRANSFER: usize = LIST_ENTRIES * PAGE_SIZE;

/// Where a command's data lives, in device addresses.
#[derive(Clone, Copy, Debug)]
pub enum DataPtr<'a> {
    /// `len` bytes contiguous from `iova`.
    Contig {
        /// Start.
        iova: Iova,
        /// Length in bytes.
        len: usize,
    },
    /// `len` bytes spread over whole pages, each given by its IOVA (kcopyd's page lists);
    /// the transfer starts at the beginning of the first page.
    Pages {
        /// Page addresses, each page aligned.
        pages: &'a [Iova],
        /// Length in bytes.
        len: usize,
    },
}

impl DataPtr<'_> {
    /// Bytes to transfer.
    pub fn len(&self) -> usize {
        match *self {
            DataPtr::Contig { len, .. } | DataPtr::Pages { len, .. } => len,
        }
    }
    /// Whether there is nothing to transfer.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// PRP1, PRP2 and how many entries of the list page are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prps {
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2: second page, or the list page's address, or 0.
    pub prp2: u64,
    /// Entries written to the list (0 when no list is needed).
    pub list_len: usize,
}

/// Why a buffer cannot be described.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrpError {
    /// Nothing to transfer.
    Empty,
    /// More than [`MAX_TRANSFER`] bytes, or more than one list page of entries.
    TooLong(usize),
    /// Start not dword aligned, or a page list entry not page aligned.
    Misaligned(u64),
    /// The page list is shorter than the length.
    ShortPageList {
        /// Pages needed.
        needed: usize,
        /// Pages given.
        given: usize,
    },
}

impl std::fmt::Display for PrpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrpError::Empty => write!(f, "empty transfer"),
            PrpError::TooLong(n) => write!(
                f,
                "{n} bytes is more than one command carries ({MAX_TRANSFER})"
            ),
            PrpError::Misaligned(a) => write!(f, "address {a:#x} is not aligned as PRPs require"),
            PrpError::ShortPageList { needed, given } => {
                write!(f, "{given} pages given for a transfer of {needed} pages")
            }
        }
    }
}

/// Builds the PRPs for `data`, writing list entries into `list` (which the caller then
/// copies to the command's list page at `list_iova`).
#[inline]
pub fn build(
    data: DataPtr<'_>,
    list: &mut [u64; LIST_ENTRIES],
    list_iova: Iova,
) -> Result<Prps, PrpError> {
    // The common small case first: one dword-aligned piece inside one page needs PRP1 only.
    if let DataPtr::Contig { iova, len } = data {
        if len != 0 && iova.0 % 4 == 0 && (iova.0 as usize % PAGE_SIZE) + len <= PAGE_SIZE {
            return Ok(Prps {
                prp1: iova.0,
                prp2: 0,
                list_len: 0,
            });
        }
    }
    let len = data.len();
    if len == 0 {
        return Err(PrpError::Empty);
    }
    if len > MAX_TRANSFER {
        return Err(PrpError::TooLong(len));
    }
    let page = PAGE_SIZE as u64;
    // Page addresses of the transfer, by index: the first may carry an offset.
    let (first, npages) = match data {
        DataPtr::Contig { iova, .. } => {
            if iova.0 % 4 != 0 {
                return Err(PrpError::Misaligned(iova.0));
            }
            let off = (iova.0 % page) as usize;
            (iova.0, (off + len).div_ceil(PAGE_SIZE))
        }
        DataPtr::Pages { pages, .. } => {
            let needed = len.div_ceil(PAGE_SIZE);
            if pages.len() < needed {
                return Err(PrpError::ShortPageList {
                    needed,
                    given: pages.len(),
                });
            }
            if let Some(p) = pages[..needed].iter().find(|p| p.0 % page != 0) {
                return Err(PrpError::Misaligned(p.0));
            }
            (pages[0].0, needed)
        }
    };
    // An unaligned MAX_TRANSFER spans one page more than an aligned one: PRP1 plus a full
    // list page still covers it.
    debug_assert!(npages <= LIST_ENTRIES + 1);
    let page_at = |i: usize| -> u64 {
        match data {
            DataPtr::Contig { iova, .. } => (iova.0 & !(page - 1)) + i as u64 * page,
            DataPtr::Pages { pages, .. } => pages[i].0,
        }
    };
    Ok(match npages {
        1 => Prps {
            prp1: first,
            prp2: 0,
            list_len: 0,
        },
        2 => Prps {
            prp1: first,
            prp2: page_at(1),
            list_len: 0,
        },
        n => {
            for (i, slot) in list.iter_mut().take(n - 1).enumerate() {
                *slot = page_at(i + 1);
            }
            Prps {
                prp1: first,
                prp2: list_iova.0,
                list_len: n - 1,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    fn run(data: DataPtr<'_>) -> (Result<Prps, PrpError>, Vec<u64>) {
        let mut list = [0u64; LIST_ENTRIES];
        let r = build(data, &mut list, Iova(0xdead_0000));
        let used = r.as_ref().map(|p| p.list_len).unwrap_or(0);
        (r, list[..used].to_vec())
    }

    #[test]
    fn one_and_two_pages_need_no_list() {
        let (r, _) = run(DataPtr::Contig {
            iova: Iova(0x10_0000),
            len: 4096,
        });
        assert_eq!(
            r,
            Ok(Prps {
                prp1: 0x10_0000,
                prp2: 0,
                list_len: 0
            })
        );
        // 512 bytes starting 3.5 KiB into a page crosses into the next page.
        let (r, _) = run(DataPtr::Contig {
            iova: Iova(0x10_0e00),
            len: 1024,
        });
        assert_eq!(
            r,
            Ok(Prps {
                prp1: 0x10_0e00,
                prp2: 0x10_1000,
                list_len: 0
            })
        );
        let (r, _) = run(DataPtr::Contig {
            iova: Iova(0x10_0000),
            len: 8192,
        });
        assert_eq!(
            r,
            Ok(Prps {
                prp1: 0x10_0000,
                prp2: 0x10_1000,
                list_len: 0
            })
        );
    }

    #[test]
    fn lists_cover_the_rest_across_page_boundaries() {
        // 12 KiB from an offset spans four pages: PRP1 plus a list of three.
        let (r, list) = run(DataPtr::Contig {
            iova: Iova(0x20_0200),
            len: 12 * 1024,
        });
        let r = r.unwrap();
        assert_eq!((r.prp1, r.prp2, r.list_len), (0x20_0200, 0xdead_0000, 3));
        assert_eq!(list, vec![0x20_1000, 0x20_2000, 0x20_3000]);
        // The largest transfer fills the list exactly.
        let (r, list) = run(DataPtr::Contig {
            iova: Iova(0x40_0000),
            len: MAX_TRANSFER,
        });
        assert_eq!(r.unwrap().list_len, LIST_ENTRIES - 1);
        assert_eq!(
            *list.last().unwrap(),
            0x40_0000 + (LIST_ENTRIES as u64 - 1) * P
        );
        let (r, list) = run(DataPtr::Contig {
            iova: Iova(0x40_0008),
            len: MAX_TRANSFER - 8,
        });
        assert_eq!(r.unwrap().list_len, LIST_ENTRIES - 1);
        assert_eq!(list.len(), LIST_ENTRIES - 1);
    }

    #[test]
    fn page_lists_map_one_entry_per_page() {
        let pages = [Iova(0x9000), Iova(0x3000), Iova(0x7000)];
        let (r, list) = run(DataPtr::Pages {
            pages: &pages,
            len: 3 * PAGE_SIZE - 100,
        });
        assert_eq!(r.unwrap().prp1, 0x9000);
        assert_eq!(list, vec![0x3000, 0x7000]);
        let (r, _) = run(DataPtr::Pages {
            pages: &pages[..2],
            len: 8192,
        });
        assert_eq!(r.unwrap().prp2, 0x3000);
    }

    #[test]
    fn rejects_what_prps_cannot_express() {
        assert_eq!(
            run(DataPtr::Contig {
                iova: Iova(0),
                len: 0
            })
            .0,
            Err(PrpError::Empty)
        );
        assert_eq!(
            run(DataPtr::Contig {
                iova: Iova(2),
                len: 8
            })
            .0,
            Err(PrpError::Misaligned(2))
        );
        assert_eq!(
            run(DataPtr::Contig {
                iova: Iova(0x1000),
                len: MAX_TRANSFER + PAGE_SIZE
            })
            .0,
            Err(PrpError::TooLong(MAX_TRANSFER + PAGE_SIZE))
        );
        let pages = [Iova(0x1000), Iova(0x2200)];
        assert_eq!(
            run(DataPtr::Pages {
                pages: &pages,
                len: 8192
            })
            .0,
            Err(PrpError::Misaligned(0x2200))
        );
        assert_eq!(
            run(DataPtr::Pages {
                pages: &pages,
                len: 3 * PAGE_SIZE
            })
            .0,
            Err(PrpError::ShortPageList {
                needed: 3,
                given: 2
            })
        );
    }
}
