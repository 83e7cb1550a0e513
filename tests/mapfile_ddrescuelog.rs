//! The maps nvcopy writes must be ddrescue mapfiles in fact, not only in name: GNU
//! ddrescuelog (Debian package gddrescue) reads one and its totals must match the map.
//!
//! Without ddrescuelog on PATH this test fails, so that CI cannot pass by not
//! checking; set NVCOPY_SKIP_DDRESCUELOG=1 to skip it where gddrescue cannot be had.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nvcopy::mapfile::{self, BlockStatus, Map, MapHeader};

/// Sector size for `ddrescuelog -b`; every block below is a multiple of it.
const SECTOR: u64 = 512;

/// Runs ddrescuelog, or returns None when it is absent and skipping was asked for.
fn ddrescuelog(args: &[&str], map: &Path) -> Option<Output> {
    match Command::new("ddrescuelog").args(args).arg(map).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if std::env::var("NVCOPY_SKIP_DDRESCUELOG").as_deref() == Ok("1") {
                eprintln!("skipped: ddrescuelog is not installed (NVCOPY_SKIP_DDRESCUELOG=1)");
                return None;
            }
            panic!(
                "ddrescuelog is not on PATH: install GNU ddrescue's tools \
                 (apt-get install gddrescue), or set NVCOPY_SKIP_DDRESCUELOG=1 to skip this test"
            );
        }
        Err(e) => panic!("running ddrescuelog: {e}"),
    }
}

fn stdout(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "ddrescuelog {what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// From `ddrescuelog -t`, the bytes and area count on the line labelled `label`,
/// e.g. `       rescued:    99840 B,  in      1 area(s)  ( 80.91%)`. ddrescuelog
/// prints exact bytes (unit `B`) below 1,000,000, which is why the map is smaller.
fn total(report: &str, label: &str) -> (u64, usize) {
    let line = report
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in ddrescuelog -t output:\n{report}"));
    let rest = &line.trim_start()[label.len()..];
    let (size, areas) = rest.split_once(',').unwrap();
    let size: Vec<&str> = size.split_whitespace().collect();
    assert_eq!(size.len(), 2, "{line}");
    assert_eq!(size[1], "B", "expected exact bytes in {line:?}");
    let areas = areas
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no area count in {line:?}"));
    (size[0].parse().unwrap(), areas.parse().unwrap())
}

/// The sectors of `map` that have `status`.
fn sectors_with(map: &Map, status: BlockStatus) -> BTreeSet<u64> {
    map.blocks()
        .filter(|b| b.status == status)
        .flat_map(|b| b.pos / SECTOR..b.end() / SECTOR)
        .collect()
}

/// A scratch directory, removed however the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("nvcopy-ddrescuelog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ddrescuelog_reads_nvcopy_maps_with_the_same_totals() {
    let len = 768 * 1024;
    let header = MapHeader::new(
        "0000:00:10.0/1@0+768K",
        vec!["0000:00:11.0/1@0".into(), "0000:00:12.0/2@1M".into()],
        len,
        64 * 1024,
    )
    .unwrap();
    let mut map = Map::new(header);
    map.paint(0, 200 * 1024, BlockStatus::Finished).unwrap();
    map.paint(200 * 1024, 1536, BlockStatus::BadSector).unwrap();
    map.paint(300 * 1024, 100 * 1024, BlockStatus::Finished)
        .unwrap();
    map.paint(400 * 1024, 512, BlockStatus::BadSector).unwrap();
    map.paint(401 * 1024, 4096, BlockStatus::NonTrimmed)
        .unwrap();
    map.paint(500 * 1024, 2048, BlockStatus::NonScraped)
        .unwrap();
    map.paint(600 * 1024, 10 * 1024, BlockStatus::Finished)
        .unwrap();
    map.current_pos = 600 * 1024;
    let dir = TempDir::new();
    let path = dir.0.join("totals.map");
    mapfile::save_atomic(&path, &map).unwrap();

    let Some(out) = ddrescuelog(&["-t"], &path) else {
        return;
    };
    let report = stdout(&out, "-t");
    let labels = [
        ("non-tried:", BlockStatus::NonTried),
        ("rescued:", BlockStatus::Finished),
        ("non-trimmed:", BlockStatus::NonTrimmed),
        ("non-scraped:", BlockStatus::NonScraped),
        ("bad-sector:", BlockStatus::BadSector),
    ];
    for (label, status) in labels {
        let areas = map.blocks().filter(|b| b.status == status).count();
        assert!(areas > 0, "the map should hold some {status} bytes");
        assert_eq!(
            total(&report, label),
            (map.bytes_with(status), areas),
            "{label}\n{report}"
        );
    }
    assert_eq!(
        total(&report, "mapfile extent:"),
        (len, map.block_count()),
        "{report}"
    );
    assert!(report.contains("current status: copying"), "{report}");

    // Sector by sector, for the statuses nvcopy itself writes.
    for status in [
        BlockStatus::Finished,
        BlockStatus::BadSector,
        BlockStatus::NonTried,
    ] {
        let arg = format!("--list-blocks={status}");
        let out = ddrescuelog(&[&arg, "-b", "512"], &path).unwrap();
        let listed: BTreeSet<u64> = stdout(&out, &arg)
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert_eq!(listed, sectors_with(&map, status), "{arg}");
    }

    // -D: exit 0 only once everything is finished.
    let out = ddrescuelog(&["-D"], &path).unwrap();
    assert!(!out.status.success(), "an unfinished map passed -D");
    map.paint(0, len, BlockStatus::Finished).unwrap();
    map.current_status = nvcopy::mapfile::Phase::Finished;
    mapfile::save_atomic(&path, &map).unwrap();
    let out = ddrescuelog(&["-D"], &path).unwrap();
    assert!(
        out.status.success(),
        "a finished map failed -D: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = stdout(&ddrescuelog(&["-t"], &path).unwrap(), "-t");
    assert_eq!(total(&report, "rescued:"), (len, 1), "{report}");
    assert!(report.contains("current status: finished"), "{report}");

    // And what ddrescuelog itself writes, nvcopy reads: -C prints the map again in
    // its own layout (filling gaps, of which there are none here).
    let out = ddrescuelog(&["-C"], &path).unwrap();
    let written = stdout(&out, "-C");
    let back = Map::parse(&written).unwrap();
    assert_eq!(back.header, None, "ddrescuelog drops nvcopy's comments");
    assert_eq!(back.finished_bytes(), len);
}
