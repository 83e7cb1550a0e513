//! The nvcopy command-line tool.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nvcopy::platform::{Platform, PlatformOptions};
use nvcopy::report::{list_text, ControllerReport, ListEntry};
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
