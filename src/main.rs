//! The nvcopy command-line tool. Its modules (the job runner, reports, the read bench)
//! are private to the binary; the library is the copier.
#![forbid(unsafe_code)]

mod cli;
mod readbench;
mod report;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use cli::JobRequest;
use nvcopy::platform::{Platform, PlatformOptions};
use nvcopy::region::{parse_size, Region, RegionSpec};
use nvcopy::trace;
use nvcopy::{EngineOptions, Error, Flags, Result};
use nvcopy_vfio::{IommuMode, PageKind, PciAddress, Sysfs, NVME_CLASS};
use report::{
    human_bytes, list_text, ControllerReport, DiscoveryReport, ListEntry, TcpControllerReport,
};

/// Polled userspace NVMe copier (SPDK-style driver, kcopyd-style jobs).
#[derive(Parser)]
#[command(name = "nvcopy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the NVMe functions on the PCI bus with their driver and IOMMU group, or with
    /// --discover, the subsystems an NVMe/TCP target offers.
    List {
        /// Read the Discovery log of the NVMe/TCP discovery controller at HOST[:PORT]
        /// (IPv6 as [ADDR][:PORT]; the port defaults to 8009, the well-known discovery
        /// port; Linux nvmet also answers on its I/O ports, e.g. 4420) and list its
        /// entries, with the region URL of each NVM subsystem.
        #[arg(long, value_name = "HOST[:PORT]", value_parser = parse_discover)]
        discover: Option<(String, u16)>,
        /// With --discover: NVMe/TCP digests (CRC32C) to ask for: both, header, data or
        /// none.
        #[arg(long, default_value = "both", value_parser = parse_digests, requires = "discover")]
        tcp_digests: (bool, bool),
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show a controller's identity, limits, optional commands and namespaces.
    Identify {
        /// A PCI address of a controller bound to vfio-pci (0000:00:10.0), or an NVMe/TCP
        /// controller (nvme+tcp://HOST[:PORT]/SUBSYSTEM-NQN).
        #[arg(value_name = "DEVICE", value_parser = parse_identify_target)]
        device: IdentifyTarget,
        /// NVMe/TCP digests (CRC32C) to ask for: both, header, data or none.
        #[arg(long, default_value = "both", value_parser = parse_digests)]
        tcp_digests: (bool, bool),
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        hw: HwArgs,
    },
    /// Copy a region to up to 64 destinations: each chunk is read once and written to all.
    Copy {
        /// Source region: BDF[/NSID][@OFFSET][+LENGTH]; by default the whole namespace.
        #[arg(long, value_parser = parse_region)]
        from: RegionSpec,
        /// Destination region (repeat for more); its length defaults to the source's.
        #[arg(long, required = true, value_parser = parse_region)]
        to: Vec<RegionSpec>,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Write zeroes to regions (Write Zeroes where supported).
    Zero {
        /// Region to zero (repeat for more); each defaults to its whole namespace.
        #[arg(long, required = true, value_parser = parse_region)]
        to: Vec<RegionSpec>,
        #[command(flatten)]
        job: JobArgs,
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

/// How a copy or zero job runs.
#[derive(Args)]
struct JobArgs {
    /// Bytes per chunk (K, M suffixes); capped at the controllers' maximum transfer.
    #[arg(long, default_value = "512K", value_parser = parse_chunk)]
    chunk: usize,
    /// Chunks in flight per reactor, at most.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1024))]
    qd: u16,
    /// Bytes in flight per reactor, at most (K, M suffixes; 0: only --qd limits). With
    /// the default 512K chunks, 8 are in flight; where a controller caps chunks at 128K,
    /// 32.
    #[arg(long, default_value = "4M", value_parser = parse_inflight)]
    inflight: usize,
    /// Reactor threads (one per core, pinned).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    cores: u16,
    /// 4 KiB DMA pages the client reserves (default: enough for every chunk in flight).
    #[arg(long, default_value_t = 0)]
    num_pages: usize,
    /// Keep going past failed chunks and report them at the end.
    #[arg(long)]
    ignore_errors: bool,
    /// Write each destination in LBA order, one chunk at a time (zoned drives).
    #[arg(long)]
    sequential: bool,
    /// Move the data even where the Copy or Write Zeroes commands could do the work.
    #[arg(long)]
    no_offload: bool,
    /// Controller resets one job tolerates per controller (after a command timeout or a
    /// fatal status) before that controller's destinations fail.
    #[arg(long, default_value_t = 2)]
    max_resets: u32,
    /// How long one command may take before its controller is reset, and how long a lost
    /// NVMe/TCP connection may take to be made again (seconds, or with an ms suffix).
    #[arg(long, default_value = "30", value_parser = parse_timeout)]
    io_timeout: std::time::Duration,
    /// NVMe/TCP digests (CRC32C) to ask the target for: both, header, data or none. TCP's
    /// own checksum is 16 bits; the Linux initiator asks for none unless told (-g, -G).
    #[arg(long, default_value = "both", value_parser = parse_digests)]
    tcp_digests: (bool, bool),
    /// Keep progress in this ddrescue-format map file: created if missing; if present,
    /// only what it does not record as copied is copied (resume).
    #[arg(long)]
    map: Option<std::path::PathBuf>,
    /// With --map: copy the areas the map records as failed again too.
    #[arg(long, requires = "map")]
    retry_failed: bool,
    /// After the copy, read every destination back and compare each chunk with a hash
    /// of the source taken when it was read.
    #[arg(long)]
    verify: bool,
    /// Copy nothing: read the source and every destination and compare them.
    #[arg(long)]
    verify_only: bool,
    /// Print this digest of the source region: sha256 or blake3 (as sha256sum or b3sum).
    #[arg(long = "hash", value_name = "ALGORITHM", value_parser = parse_digest)]
    digest: Option<nvcopy::digest::DigestKind>,
    /// Run the reactors without their seccomp filter (for debugging: with it, a reactor
    /// that makes an unexpected syscall ends the process with SIGSYS).
    #[arg(long)]
    no_seccomp: bool,
    /// File destinations: leave holes (punch them) where a chunk is all zeroes, as
    /// `cp --sparse=always` does; their space is not reserved up front.
    #[arg(long)]
    sparse: bool,
    /// Files and block devices: go through the page cache instead of O_DIRECT (for
    /// filesystems without direct I/O, or files of any length); the closing Flush
    /// (fdatasync) still makes the copy durable.
    #[arg(long)]
    buffered: bool,
    /// Files and block devices: no kernel polling thread (SQPOLL) for the io_uring
    /// rings; each reactor enters the kernel once per batch instead (fewer busy cores).
    #[arg(long)]
    no_sqpoll: bool,
    /// Machine-readable summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hw: HwArgs,
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
    /// Ring every doorbell by MMIO even where the controller offers shadow doorbells
    /// (Doorbell Buffer Config): for a controller whose implementation misbehaves, or to
    /// measure the difference.
    #[arg(long)]
    no_shadow_doorbells: bool,
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
            controller: nvcopy_nvme::ControllerOptions {
                shadow_doorbells: !self.no_shadow_doorbells,
                ..Default::default()
            },
        }
    }
}

/// What `nvcopy identify` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum IdentifyTarget {
    /// A controller on the PCI bus, through VFIO.
    Pci(PciAddress),
    /// An NVMe/TCP controller.
    Tcp(nvcopy_tcp::Target),
}

fn parse_identify_target(s: &str) -> std::result::Result<IdentifyTarget, String> {
    if s.starts_with(nvcopy::region::TCP_SCHEME) {
        return match nvcopy::region::parse_tcp_controller(s) {
            Ok((t, None)) => Ok(IdentifyTarget::Tcp(t)),
            Ok((t, Some(nsid))) => Err(format!(
                "identify shows a whole controller and all its namespaces: drop the /{nsid} and write nvme+tcp://{t}"
            )),
            Err(e) => Err(e.to_string()),
        };
    }
    s.parse().map(IdentifyTarget::Pci).map_err(|_: nvcopy_vfio::Error| {
        format!(
            "{s:?} is neither a PCI address (DDDD:BB:DD.F, e.g. 0000:00:10.0) nor an NVMe/TCP controller (nvme+tcp://HOST[:PORT]/SUBSYSTEM-NQN)"
        )
    })
}

fn parse_discover(s: &str) -> std::result::Result<(String, u16), String> {
    nvcopy_tcp::discovery::parse_address(s).map_err(|e| e.to_string())
}

/// How nvcopy's NVMe/TCP host connects for `identify` and `list --discover`: with the
/// digests `--tcp-digests` asks for, one I/O queue.
fn tcp_options((header_digest, data_digest): (bool, bool)) -> nvcopy_tcp::Options {
    nvcopy_tcp::Options {
        header_digest,
        data_digest,
        queues: 1,
        ..Default::default()
    }
}

fn parse_region(s: &str) -> std::result::Result<RegionSpec, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn parse_inflight(s: &str) -> std::result::Result<usize, String> {
    match parse_size(s) {
        Ok(n) if n == 0 || (4096..=(1 << 30)).contains(&n) => Ok(n as usize),
        Ok(n) => Err(format!(
            "bytes in flight {n} must be 0 (no limit) or from 4K to 1G"
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_digests(s: &str) -> std::result::Result<(bool, bool), String> {
    match s {
        "both" => Ok((true, true)),
        "header" => Ok((true, false)),
        "data" => Ok((false, true)),
        "none" => Ok((false, false)),
        _ => Err(format!("{s}: give both, header, data or none")),
    }
}

fn parse_timeout(s: &str) -> std::result::Result<std::time::Duration, String> {
    let (num, unit) = match s.strip_suffix("ms") {
        Some(n) => (n, 1),
        None => (s.strip_suffix('s').unwrap_or(s), 1000),
    };
    match num.parse::<u64>().map(|n| n.saturating_mul(unit)) {
        Ok(ms) if (100..=3_600_000).contains(&ms) => Ok(std::time::Duration::from_millis(ms)),
        Ok(_) => Err(format!("{s}: give from 100ms to 3600 (seconds)")),
        Err(_) => Err(format!(
            "{s}: not a time: give seconds (30) or milliseconds (500ms)"
        )),
    }
}

fn parse_chunk(s: &str) -> std::result::Result<usize, String> {
    match parse_size(s) {
        Ok(n) if (4096..=(2 << 20)).contains(&n) && n % 4096 == 0 => Ok(n as usize),
        Ok(n) => Err(format!(
            "chunk size {n} must be a multiple of 4K from 4K to 2M"
        )),
        Err(e) => Err(e.to_string()),
    }
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

fn parse_digest(s: &str) -> std::result::Result<nvcopy::digest::DigestKind, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

fn run_job(from: Option<RegionSpec>, to: Vec<RegionSpec>, a: JobArgs) -> Result<()> {
    let mut flags = Flags::NONE;
    if a.ignore_errors {
        flags = flags | Flags::IGNORE_ERRORS;
    }
    if a.sequential {
        flags = flags | Flags::WRITE_SEQUENTIAL;
    }
    let req = JobRequest {
        from,
        to,
        flags,
        num_pages: a.num_pages,
        map: a.map,
        retry_failed: a.retry_failed,
        verify: a.verify,
        verify_only: a.verify_only,
        digest: a.digest,
        files: nvcopy::open::FileOptions {
            buffered: a.buffered,
            sparse: a.sparse,
            sqpoll: !a.no_sqpoll,
            io_timeout: a.io_timeout,
            tcp_digests: a.tcp_digests,
        },
    };
    let eo = EngineOptions {
        reactors: a.cores as usize,
        qd: a.qd as usize,
        inflight: a.inflight,
        chunk: a.chunk,
        offload: !a.no_offload,
        max_resets: a.max_resets,
        seccomp: !a.no_seccomp,
        ..Default::default()
    };
    let mut po = a.hw.options();
    po.controller.io_timeout = a.io_timeout;
    let (summary, engine) = cli::run(&req, &po, &eo, !a.json)?;
    // The summary goes out before the devices are closed: the job's callback ran after
    // every destination's Flush completed, so what it says is already durable.
    print(&if a.json {
        json(&summary)?
    } else {
        summary.to_text()
    })?;
    trace::step("summary printed");
    engine.close();
    if let Some(signal) = summary.interrupted_by {
        Err(Error::Interrupted { signal })
    } else if summary.ok() {
        Ok(())
    } else {
        Err(Error::CopyFailed)
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::List {
            discover: Some((host, port)),
            tcp_digests,
            json: as_json,
        } => {
            let log = nvcopy_tcp::discovery::discover(&host, port, &tcp_options(tcp_digests))?;
            let name = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let report = DiscoveryReport::new(name, &log);
            // The text form carries these notes itself; with --json they go to stderr
            // too, for whoever watches the terminal.
            for k in report.skipped.iter().filter(|_| as_json) {
                eprintln!(
                    "nvcopy: note: discovery log entry {} skipped: {}",
                    k.index, k.problem
                );
            }
            print(&if as_json {
                json(&report)?
            } else {
                report.to_text()
            })
        }
        Command::List {
            discover: None,
            json: as_json,
            ..
        } => {
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
            device: IdentifyTarget::Tcp(t),
            tcp_digests,
            json: as_json,
            hw: _,
        } => {
            let c = nvcopy_tcp::Controller::connect(&t, tcp_options(tcp_digests))?;
            let report = TcpControllerReport::new(&c);
            print(&if as_json {
                json(&report)?
            } else {
                report.to_text()
            })
        }
        Command::Identify {
            device: IdentifyTarget::Pci(bdf),
            json: as_json,
            hw,
            ..
        } => {
            let platform = Platform::open(&[bdf], &hw.options())?;
            let report = ControllerReport::new(&platform.controllers[0]);
            print(&if as_json {
                json(&report)?
            } else {
                report.to_text()
            })?;
            trace::step("report printed");
            platform.close();
            Ok(())
        }
        Command::Copy { from, to, job } => run_job(Some(from), to, job),
        Command::Zero { to, job } => run_job(None, to, job),
        Command::Bench(BenchCommand::Read {
            from,
            chunk,
            qd,
            json: as_json,
            hw,
        }) => {
            let mut po = hw.options();
            let qd = qd as usize;
            po.pool_bytes = qd * chunk.div_ceil(4096) * 4096
                + nvcopy_nvme::Controller::io_qpair_dma_bytes(
                    (qd + 1).min(u16::MAX as usize) as u16
                )
                + nvcopy_nvme::Controller::dma_bytes(&nvcopy_nvme::ControllerOptions::default())
                + cli::POOL_SLACK;
            let addr = from.pci().ok_or_else(|| {
                Error::from(nvcopy::error::Refusal::NotInEngine {
                    ctrl: format!(
                        "{} (bench read reads NVMe namespaces; time a file with dd)",
                        from.place
                    ),
                })
            })?;
            let platform = Platform::open(&[addr], &po)?;
            let ns = platform.controllers[0].namespace(from.nsid)?;
            let region = Region::check(&from, 0, ns.lba_size, ns.blocks, None)?;
            let r = readbench::read(&platform, &region, chunk, qd)?;
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
    }
}

fn main() -> ExitCode {
    trace::start();
    let cli = Cli::parse();
    trace::step("command line parsed");
    let result = run(cli);
    trace::step("exiting");
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The shell's convention for a process stopped by a signal: 128 + its number.
        Err(Error::Interrupted { signal }) => ExitCode::from((128 + signal.clamp(0, 127)) as u8),
        Err(e) => {
            eprintln!("nvcopy: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nvcopy").chain(args.iter().copied()))
    }

    fn list(args: &[&str]) -> (Option<(String, u16)>, bool) {
        match parse(args).unwrap().command {
            Command::List { discover, json, .. } => (discover, json),
            _ => panic!("not list: {args:?}"),
        }
    }

    #[test]
    fn list_discover_takes_host_and_optional_port() {
        assert_eq!(list(&["list"]), (None, false));
        assert_eq!(
            list(&["list", "--discover", "127.0.0.1:4420", "--json"]),
            (Some(("127.0.0.1".into(), 4420)), true)
        );
        // No port: the well-known discovery port.
        assert_eq!(
            list(&["list", "--discover=10.0.0.2"]),
            (Some(("10.0.0.2".into(), 8009)), false)
        );
        assert_eq!(
            list(&["list", "--discover", "[fd00::1]:4420"]),
            (Some(("fd00::1".into(), 4420)), false)
        );
        for bad in ["10.0.0.2:0", "10.0.0.2:x", ":4420", "fd00::1", "[fd00::1"] {
            let e = parse(&["list", "--discover", bad])
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(bad) && e.contains("--discover"), "{bad}: {e}");
        }
        assert!(parse(&["list", "--discover"]).is_err());
        // Digests: both by default, as for copies; --tcp-digests only with --discover.
        let digests = |args: &[&str]| match parse(args).unwrap().command {
            Command::List { tcp_digests, .. } => tcp_digests,
            _ => panic!("not list"),
        };
        assert_eq!(digests(&["list", "--discover", "h"]), (true, true));
        assert_eq!(
            digests(&["list", "--discover", "h", "--tcp-digests", "header"]),
            (true, false)
        );
        assert!(parse(&["list", "--tcp-digests", "none"]).is_err());
    }

    #[test]
    fn identify_takes_a_pci_address_or_an_nvme_tcp_controller() {
        let device = |args: &[&str]| match parse(args).map(|c| c.command) {
            Ok(Command::Identify { device, .. }) => Ok(device),
            Ok(_) => panic!("not identify"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            device(&["identify", "0000:00:10.0"]),
            Ok(IdentifyTarget::Pci("0000:00:10.0".parse().unwrap()))
        );
        assert_eq!(
            device(&["identify", "--json", "nvme+tcp://127.0.0.1:4420/nqn.a:b"]),
            Ok(IdentifyTarget::Tcp(nvcopy_tcp::Target {
                host: "127.0.0.1".into(),
                port: 4420,
                nqn: "nqn.a:b".into(),
            }))
        );
        let e = device(&["identify", "nvme+tcp://127.0.0.1:4420/nqn.a:b/1"]).unwrap_err();
        assert!(e.contains("drop the /1"), "{e}");
        let e = device(&["identify", "disk.img"]).unwrap_err();
        assert!(
            e.contains("neither a PCI address") && e.contains("nvme+tcp://"),
            "{e}"
        );
        let e = device(&["identify", "nvme+tcp://h"]).unwrap_err();
        assert!(e.contains("no subsystem NQN"), "{e}");
    }
}
