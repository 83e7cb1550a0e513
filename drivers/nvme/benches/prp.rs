//! PRP construction (`nvcopy_nvme::prp::build`) for a 128 KiB chunk (nvcopy's default) and
//! an MDTS-sized 2 MiB chunk (the most one command carries: PRP1 plus one list page), from
//! a contiguous buffer and from a kcopyd-style list of 4 KiB pages.
//!
//!     cargo bench -p nvcopy-nvme --bench prp

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nvcopy_nvme::prp::{build, LIST_ENTRIES, MAX_TRANSFER};
use nvcopy_nvme::DataPtr;
use nvcopy_vfio::{Iova, PAGE_SIZE};

fn prp_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("prp_build");
    let mut list = [0u64; LIST_ENTRIES];
    let list_iova = Iova(0x7f00_0000);
    // Scattered pages, as a page pool hands them out: every other page, descending.
    let pages: Vec<Iova> = (0..MAX_TRANSFER / PAGE_SIZE)
        .map(|i| Iova(0x4000_0000 - 2 * (i as u64) * PAGE_SIZE as u64))
        .collect();
    for len in [128 << 10, MAX_TRANSFER] {
        // Per PRP entry (one per 4 KiB page of the transfer).
        g.throughput(Throughput::Elements((len / PAGE_SIZE) as u64));
        let label = format!("{}K", len >> 10);
        g.bench_with_input(BenchmarkId::new("contiguous", &label), &len, |b, &len| {
            b.iter(|| {
                let data = DataPtr::Contig {
                    iova: black_box(Iova(0x1000_0000)),
                    len: black_box(len),
                };
                black_box(build(data, &mut list, list_iova).expect("prps"))
            })
        });
        g.bench_with_input(BenchmarkId::new("page_list", &label), &len, |b, &len| {
            b.iter(|| {
                let data = DataPtr::Pages {
                    pages: black_box(&pages[..]),
                    len: black_box(len),
                };
                black_box(build(data, &mut list, list_iova).expect("prps"))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, prp_build);
criterion_main!(benches);
