//! The nvcopy command-line tool.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nvcopy::pipeline::{self, CopyOptions, CopyOutcome};
use nvcopy::platform::{Platform, PlatformOptions};
use nvcopy::region::{parse_size, Region, RegionSpec, MAX_DESTS};
use nvcopy::report::{human_bytes, list_text, ControllerReport, ListEntry};
use nvcopy::{Error, Result};
use nvcopy_vfio::{IommuMode, PageKind, PciAddress, Sysfs, NVME_CLASS};

/// Polled userspace NVMe copier (SPDK-style driver, kcopyd-style jobs).
#[derive(Parser)]
#[command(name = "nvcopy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the NVMe functions on the PCI bus with their driver and IOMMU group.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show a controller's identity, limits, optional commands and namespaces.
    Identify {
        /// PCI address of a controller bound to vfio-pci, e.g. 0000:00:10.0.
        #[arg(value_parser = parse_bdf)]
        bdf: PciAddress,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hw: HwArgs,
    },
    /// Copy a region to one or more destinations: each chunk is read once and written to all.
    Copy {
        /// Source region: BDF[/NSID][@OFFSET][+LENGTH]; by default the whole namespace.
        #[arg(long, value_parser = parse_region)]
        from: RegionSpec,
        /// Destination region (repeat for up to 64); its length defaults to the source's.
        #[arg(long, required = true, value_parser = parse_region)]
        to: Vec<RegionSpec>,
        /// Bytes per chunk (K, M suffixes); capped at the controllers' maximum transfer.
        #[arg(long, default_value = "128K", value_parser = parse_chunk)]
        chunk: usize,
        /// Chunks in flight.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
        qd: u16,
        /// Keep copying past failed chunks and report them at the end.
        #[arg(long)]
        ignore_errors: bool,
        /// Machine-readable summary.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hw: HwArgs,
    },
    /// Measurements that set nvcopy beside other tools (see `scripts/vm.sh bench`).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Sequential read of a region into DMA memory, as `dd of=/dev/null iflag=direct` does.
    Read {
        /// Region to read: BDF[/NSID][@OFFSET][+LENGTH].
        #[arg(long, value_parser = parse_region)]
        from: RegionSpec,
        /// Bytes per read (capped at MDTS).
        #[arg(long, default_value = "128K", value_parser = parse_chunk)]
        chunk: usize,
        /// Reads in flight.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
        qd: u16,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hw: HwArgs,
    },
}

fn parse_region(s: &str) -> std::result::Result<RegionSpec, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_chunk(s: &str) -> std::result::Result<usize, String> {
    match parse_size(s) {
        Ok(n) if (512..=(2 << 20)).contains(&n) && n % 512 == 0 => Ok(n as usize),
        Ok(n) => Err(format!(
            "chunk size {n} must be a multiple of 512 from 512 to 2M"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// How to reach the hardware.
#[derive(Args)]
struct HwArgs {
    /// Use VFIO's no-IOMMU mode. UNSAFE: the device can then DMA anywhere in memory.
    #[arg(long)]
    noiommu: bool,
    /// Use ordinary 4 KiB pages for DMA memory when no hugepages are reserved.
    #[arg(long)]
    small_pages: bool,
}

impl HwArgs {
    fn options(&self) -> PlatformOptions {
        if self.noiommu {
            eprintln!("nvcopy: warning: no-IOMMU mode: the device is not isolated and can overwrite any memory");
        }
        PlatformOptions {
            mode: if self.noiommu {
                IommuMode::NoIommu
            } else {
                IommuMode::Type1
            },
            page_kind: if self.small_pages {
                PageKind::Small
            } else {
                PageKind::Huge
            },
            pool_bytes: 4 << 20,
            ..Default::default()
        }
    }
}

fn parse_bdf(s: &str) -> std::result::Result<PciAddress, String> {
    s.parse().map_err(|e: nvcopy_vfio::Error| e.to_string())
}

fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| Error::Output(std::io::Error::other(e)))
}

/// The machine-readable copy summary.
#[derive(serde::Serialize)]
struct CopySummary<'a> {
    source: String,
    destinations: Vec<String>,
    bytes_total: u64,
    rate_mb_s: f64,
    failed_destinations: Vec<String>,
    #[serde(flatten)]
    outcome: &'a CopyOutcome,
}

/// Resolves the regions against their namespaces and refuses bad input before any I/O.
fn resolve(p: &Platform, from: &RegionSpec, to: &[RegionSpec]) -> Result<(Region, Vec<Region>)> {
    let ns = |i: usize, spec: &RegionSpec| -> Result<(u32, u64)> {
        let n = p.controllers[i].namespace(spec.nsid)?;
        Ok((n.lba_size, n.blocks))
    };
    let (bs, blocks) = ns(0, from)?;
    let src = Region::check(from, 0, bs, blocks, None)?;
    let mut dests: Vec<Region> = Vec::with_capacity(to.len());
    for (i, spec) in to.iter().enumerate() {
        let (bs, blocks) = ns(i + 1, spec)?;
        let d = Region::check(spec, i + 1, bs, blocks, Some(src.len))?;
        if d.len != src.len {
            return Err(Error::Usage(format!(
                "destination {spec} is {} bytes but the source is {}: give them the same length",
                d.len, src.len
            )));
        }
        if d.overlaps(&src) {
            return Err(Error::Usage(format!("destination {spec} overlaps the source {from}: nvcopy never writes over the data it is reading")));
        }
        if let Some(j) = dests.iter().position(|o| o.overlaps(&d)) {
            return Err(Error::Usage(format!(
                "destinations {} and {spec} overlap",
                to[j]
            )));
        }
        dests.push(d);
    }
    Ok((src, dests))
}

fn copy_command(
    from: RegionSpec,
    to: Vec<RegionSpec>,
    opts: CopyOptions,
    as_json: bool,
    hw: &HwArgs,
) -> Result<bool> {
    if to.len() > MAX_DESTS {
        return Err(Error::Usage(format!(
            "{} destinations given; a copy takes at most {MAX_DESTS}",
            to.len()
        )));
    }
    // Controllers map to regions by position: index 0 is the source, i + 1 is to[i]. The
    // platform opens each address once and shares the controller between positions.
    let addrs: Vec<PciAddress> = std::iter::once(from.addr)
        .chain(to.iter().map(|r| r.addr))
        .collect();
    let mut po = hw.options();
    po.pool_bytes =
        opts.qd * opts.chunk + addrs.len() * (opts.qd * (to.len() + 1) + 1) * 4096 * 2 + (4 << 20);
    let platform = Platform::open(&addrs, &po)?;
    let (src, dests) = resolve(&platform, &from, &to)?;
    // Same controller at several positions: point the regions at its first position so
    // that they share one queue pair.
    let first = |i: usize| addrs.iter().position(|a| *a == addrs[i]).unwrap_or(i);
    let src = Region {
        ctrl: first(0),
        ..src
    };
    let dests: Vec<Region> = dests
        .into_iter()
        .map(|d| Region {
            ctrl: first(d.ctrl),
            ..d
        })
        .collect();

    let total = src.len;
    let mut last = std::time::Instant::now();
    let started = last;
    let outcome = pipeline::copy(&platform, &src, &dests, &opts, |done| {
        if last.elapsed().as_secs() >= 1 {
            last = std::time::Instant::now();
            let rate = done as f64 / started.elapsed().as_secs_f64() / 1e6;
            eprintln!(
                "nvcopy: {} of {} ({:.0}%), {rate:.0} MB/s",
                human_bytes(done),
                human_bytes(total),
                done as f64 * 100.0 / total as f64
            );
        }
    })?;
    let rate = outcome.bytes as f64 / outcome.elapsed.as_secs_f64().max(1e-9) / 1e6;
    let failed: Vec<String> = to
        .iter()
        .enumerate()
        .filter(|(i, _)| outcome.write_err.contains(*i))
        .map(|(_, r)| r.to_string())
        .collect();
    let ok = !outcome.read_err && failed.is_empty() && outcome.bytes == total;
    if as_json {
        let summary = CopySummary {
            source: from.to_string(),
            destinations: to.iter().map(|r| r.to_string()).collect(),
            bytes_total: total,
            rate_mb_s: rate,
            failed_destinations: failed,
            outcome: &outcome,
        };
        print(&json(&summary)?)?;
    } else {
        let mut text = format!(
            "copied {} of {} to {} destination(s) in {:.2} s, {rate:.0} MB/s\n",
            human_bytes(outcome.bytes),
            human_bytes(total),
            to.len(),
            outcome.elapsed.as_secs_f64()
        );
        if outcome.read_err {
            text += "read errors on the source\n";
        }
        for f in &failed {
            text += &format!("write errors on destination {f}\n");
        }
        if let Some(e) = &outcome.first_error {
            text += &format!("first error: {e}\n");
        }
        text += if ok {
            "result: ok\n"
        } else {
            "result: FAILED\n"
        };
        print(&text)?;
    }
    Ok(ok)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::List { json: as_json } => {
            let entries: Vec<ListEntry> = Sysfs::default()
                .functions_of_class(NVME_CLASS)?
                .iter()
                .map(ListEntry::from)
                .collect();
            print(&if as_json {
                json(&entries)?
            } else {
                list_text(&entries)
            })
        }
        Command::Identify {
            bdf,
            json: as_json,
            hw,
        } => {
            let platform = Platform::open(&[bdf], &hw.options())?;
            let report = ControllerReport::new(&platform.controllers[0]);
            print(&if as_json {
                json(&report)?
            } else {
                report.to_text()
            })
        }
        Command::Bench(BenchCommand::Read {
            from,
            chunk,
            qd,
            json: as_json,
            hw,
        }) => {
            let mut po = hw.options();
            po.pool_bytes = qd as usize * chunk + (qd as usize + 2) * 8192 + (4 << 20);
            let platform = Platform::open(&[from.addr], &po)?;
            let ns = platform.controllers[0].namespace(from.nsid)?;
            let region = Region::check(&from, 0, ns.lba_size, ns.blocks, None)?;
            let r = nvcopy::readbench::read(&platform, &region, chunk, qd as usize)?;
            let rate = r.bytes as f64 / r.elapsed.as_secs_f64().max(1e-9) / 1e6;
            print(&if as_json {
                json(
                    &serde_json::json!({ "bytes": r.bytes, "chunk": r.chunk, "qd": r.qd,
                    "elapsed": r.elapsed.as_secs_f64(), "rate_mb_s": rate }),
                )?
            } else {
                format!(
                    "read {} in {:.2} s, {rate:.0} MB/s (chunk {}, qd {})\n",
                    human_bytes(r.bytes),
                    r.elapsed.as_secs_f64(),
                    r.chunk,
                    r.qd
                )
            })
        }
        Command::Copy {
            from,
            to,
            chunk,
            qd,
            ignore_errors,
            json: as_json,
            hw,
        } => {
            let opts = CopyOptions {
                chunk,
                qd: qd as usize,
                ignore_errors,
            };
            if copy_command(from, to, opts, as_json, &hw)? {
                Ok(())
            } else {
                Err(Error::CopyFailed)
            }
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvcopy: error: {e}");
            ExitCode::FAILURE
        }
    }
}
