//! Keeping a copy's progress in a ddrescue-format map (`--map FILE`), so that an
//! interrupted copy resumes where it stopped.
//!
//! The map only ever says `+` for bytes that are durable on every destination: a
//! checkpoint takes a snapshot of the cells that have ended, then sends a Flush to every
//! destination ([`Client::flush`]), and only when every Flush has completed paints the
//! snapshot into the map and saves it atomically (temporary file, fsync, rename). After a
//! `kill -9`, a rerun redoes at most what ended since the last checkpoint. Unlike a
//! single high-water mark, every finished cell is resumable, wherever it lies.

use std::num::NonZeroU64;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::client::{Client, JobHandle};
use crate::error::Result;
use crate::job::CellState;
use crate::mapfile::{self, BlockStatus, Map, MapHeader, Phase};
use crate::region::Region;

/// A job's progress map on disk.
pub struct MapKeeper {
    path: PathBuf,
    map: Map,
}

impl MapKeeper {
    /// Opens the map at `path` for a job described by `header`: an existing one must have
    /// been written for the same source, destinations and length; a missing one is
    /// started with every byte not tried. Returns the keeper and, for an existing map, the
    /// byte ranges still to copy (the `-` areas only with `retry_failed`).
    pub fn open(
        path: &Path,
        header: MapHeader,
        retry_failed: bool,
    ) -> Result<(MapKeeper, Option<Vec<Range<u64>>>)> {
        match mapfile::load(path) {
            Ok(map) => {
                map.check_identity(&header)?;
                let byte = NonZeroU64::MIN;
                let todo = map.todo_ranges(byte, retry_failed);
                let keeper = MapKeeper {
                    path: path.to_path_buf(),
                    map,
                };
                Ok((keeper, Some(todo)))
            }
            Err(e) if e.is_not_found() => {
                let keeper = MapKeeper {
                    path: path.to_path_buf(),
                    map: Map::new(header),
                };
                keeper.save()?;
                Ok((keeper, None))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Bytes the map records as copied.
    pub fn finished_bytes(&self) -> u64 {
        self.map.finished_bytes()
    }

    /// Bytes the map records as failed.
    pub fn bad_bytes(&self) -> u64 {
        self.map.bytes_with(BlockStatus::BadSector)
    }

    /// The map file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes what has ended so far durable (one Flush per destination) and records it.
    /// Runs on a thread of its own, never a reactor.
    pub fn checkpoint(&mut self, handle: &JobHandle, client: &Client, to: &[Region]) -> Result<()> {
        let snapshot = snapshot(handle);
        let flushed = client.flush(to, |_, _| {})?.wait();
        // A destination whose Flush failed is not durable: record nothing as copied.
        if flushed.write_err.any() {
            return Ok(());
        }
        self.record(handle, snapshot)
    }

    /// Records the job's final state (its own flushes have run: the callback came after
    /// them). A destination whose last Flush failed keeps the map from saying `+`.
    pub fn finish(&mut self, handle: &JobHandle, durable: bool) -> Result<()> {
        let snapshot = snapshot(handle);
        let snapshot = if durable {
            snapshot
        } else {
            snapshot
                .into_iter()
                .filter(|&(_, s)| s == BlockStatus::BadSector)
                .collect()
        };
        self.map.current_status = Phase::Finished;
        self.record(handle, snapshot)
    }

    fn record(&mut self, handle: &JobHandle, cells: Vec<(u64, BlockStatus)>) -> Result<()> {
        let Some(chunk) = NonZeroU64::new(handle.chunk() as u64) else {
            return Ok(());
        };
        if let Some(&(last, _)) = cells.last() {
            self.map.current_pos = (last + 1).saturating_mul(chunk.get()).min(handle.len());
        }
        self.map.paint_cells(chunk, cells)?;
        self.save()
    }

    fn save(&self) -> Result<()> {
        Ok(mapfile::save_atomic(&self.path, &self.map)?)
    }
}

/// The cells that have ended, with what the map should say of them.
fn snapshot(handle: &JobHandle) -> Vec<(u64, BlockStatus)> {
    (0..handle.cells())
        .filter_map(|i| match handle.cell_state(i)? {
            CellState::Done => Some((i, BlockStatus::Finished)),
            CellState::Failed => Some((i, BlockStatus::BadSector)),
            CellState::Untried => None,
        })
        .collect()
}
