//! Interrupting a copy and resuming it from its ddrescue-format progress map, against the
//! software controller: what the map records as copied is on the destinations, a rerun
//! copies only the rest, and the map is refused for another job.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::{ctrl, data, ok, opts, Rig, MIB};
use nvcopy::mapfile::MapHeader;
use nvcopy::progress::MapKeeper;
use nvcopy::{Client, Flags, JobOptions};
use nvcopy_nvme::spec::io;
use nvcopy_nvme_sim::CommandFilter;

fn header(len: u64) -> MapHeader {
    MapHeader::new("src", vec!["d0".into(), "d1".into()], len, 64 << 10).unwrap()
}

#[test]
fn a_cancelled_copy_resumes_from_its_map_and_copies_only_the_rest() {
    let rig = Rig::new(vec![ctrl(&[(512, 8 * MIB); 3])], opts());
    let client = Client::new(&rig.engine, 256).unwrap();
    let src = rig.region(0, 1, 0, 4 * MIB);
    let dests = [rig.region(0, 2, 0, 4 * MIB), rig.region(0, 3, 0, 4 * MIB)];
    let bytes = data(21, src.len);
    rig.put(&src, &bytes);
    let dir = std::env::temp_dir().join(format!("nvcopy-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("copy.map");
    let _ = std::fs::remove_file(&path);

    // Slow every write down so that the cancel lands in the middle.
    let slow = rig.sim(0).faults().delay(
        CommandFilter::io().opcode(io::WRITE),
        Duration::from_millis(60),
    );
    let (mut keeper, todo) = MapKeeper::open(&path, header(src.len), false).unwrap();
    assert!(todo.is_none(), "a new map");
    let options = JobOptions {
        track_cells: true,
        ..JobOptions::default()
    };
    let h = client
        .copy_with(&src, &dests, Flags::NONE, &options, |_, _| {})
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let flushes = rig.io(0, io::FLUSH);
    keeper.checkpoint(&h, &client, &dests).unwrap();
    assert_eq!(
        rig.io(0, io::FLUSH),
        flushes + 2,
        "a checkpoint flushes every destination"
    );
    h.cancel();
    let o = h.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(o.cancelled && !o.read_err && !o.write_err.any(), "{o:?}");
    keeper.finish(&h, true).unwrap();
    rig.sim(0).faults().remove(slow);
    let copied = keeper.finished_bytes();
    assert!(
        copied > 0 && copied < src.len,
        "copied {copied} of {}",
        src.len
    );

    // Whatever the map says is copied is on both destinations.
    let (keeper, todo) = MapKeeper::open(&path, header(src.len), false).unwrap();
    assert_eq!(keeper.finished_bytes(), copied);
    let todo = todo.unwrap();
    let mut covered = vec![false; src.len as usize];
    for r in &todo {
        covered[r.start as usize..r.end as usize].fill(true);
    }
    for d in &dests {
        let got = rig.get(d);
        for (i, (g, b)) in got.iter().zip(&bytes).enumerate() {
            if !covered[i] {
                assert_eq!(g, b, "byte {i} is recorded as copied but differs");
            }
        }
    }

    // A rerun with the map copies only the rest.
    let reads = rig.io(0, io::READ);
    let options = JobOptions {
        track_cells: true,
        only: Some(todo),
        ..JobOptions::default()
    };
    let h = client
        .copy_with(&src, &dests, Flags::NONE, &options, |_, _| {})
        .unwrap();
    assert_eq!(h.bytes_todo(), src.len - copied);
    let o = h.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(ok(&o), "{o:?}");
    let reread = (rig.io(0, io::READ) - reads) * (64 << 10);
    assert!(reread <= src.len - copied, "the resume read {reread} bytes");
    for d in &dests {
        assert!(rig.get(d) == bytes);
    }

    // A map written for another job is refused, naming the difference.
    let other = MapHeader::new("elsewhere", vec!["d0".into(), "d1".into()], src.len, 4096).unwrap();
    let err = MapKeeper::open(&path, other, false).err().unwrap();
    assert!(err.to_string().contains("elsewhere"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
