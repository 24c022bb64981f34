//! Region copy: hydrating regions from the source, one on demand
//! ([`Engine::hydrate_region`]) or in background batches
//! ([`Engine::hydrate_batch`]), holes of a sparse source zeroed instead of read.
//!
//! Invariant: the caller holds the lock of every region copied, and a region's
//! bit is set only after its whole copy completed on the destination (and was
//! counted as a destination write, so the commit that records it flushes it
//! first). A partly written region's copy is only of the sub-blocks its mask
//! lacks: the written ones hold the guest's data.
use std::sync::atomic::Ordering;

use super::counters::bump;
use super::{Engine, EngineError, Result};
use crate::metadata::{MetadataError, Mode};
use crate::storage::copy_range;

/// The result of one background hydration step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HydrateStep {
    /// Regions `first..first + count` were hydrated.
    Hydrated {
        /// First region.
        first: u64,
        /// Number of regions.
        count: u64,
        /// Of which this many were holes of the source (zeroed, not read).
        holes: u64,
        /// Bytes read from the source for them (what a rate limit charges).
        bytes_read: u64,
    },
    /// Every unhydrated region looked at is busy (a guest request holds it).
    Busy,
    /// Every region is hydrated.
    Done,
}

impl Engine {
    /// Hydrates region `r` if it is not hydrated yet. Returns true when it copied.
    pub fn hydrate_region(&self, r: u64) -> Result<bool> {
        if r >= self.geo.nr_regions() {
            return Err(EngineError::Metadata(MetadataError::OutOfRange {
                region: r,
                nr: self.geo.nr_regions(),
            }));
        }
        let _guard = self.locks.lock(r);
        if self.md.is_hydrated(r) {
            return Ok(false);
        }
        self.copy_run(r, 1, false)?;
        Ok(true)
    }

    /// Copies regions `first..first + n` (all locked by the caller, all
    /// unhydrated) from the source, then marks them. Holes of a sparse source
    /// are zeroed on the destination instead of read; with `detect_zeroes`,
    /// all-zero data read is written as zeroes (a hole) too. Returns the
    /// number of hole regions and the bytes read from the source.
    fn copy_run(&self, first: u64, n: u64, detect_zeroes: bool) -> Result<(u64, u64)> {
        if self.md.mode() != Mode::Rw {
            return Err(EngineError::Metadata(MetadataError::ReadOnly));
        }
        let src = self.source_dev(first)?;
        let start = self.geo.region_start(first);
        let end = self.geo.region_end(first + n - 1);
        let extents = src
            .data_extents(start, end - start)
            .map_err(EngineError::Source)?;
        let has_data = |a: u64, b: u64| match &extents {
            None => true,
            Some(ext) => ext.iter().any(|&(x, y)| x < b && a < y),
        };
        let (mut holes, mut read) = (0, 0);
        let mut buf = Vec::new();
        let mut r = first;
        while r < first + n {
            if let Some(mask) = self.written_mask_to_keep(r) {
                let n = self.fill_missing(r, mask)?;
                bump(&self.hydration_bytes_read, n);
                read += n;
                r += 1;
                continue;
            }
            // A run of regions of one kind (data or hole), none partly written.
            let data = has_data(self.geo.region_start(r), self.geo.region_end(r));
            let mut e = r + 1;
            while e < first + n
                && has_data(self.geo.region_start(e), self.geo.region_end(e)) == data
                && self.written_mask_to_keep(e).is_none()
            {
                e += 1;
            }
            let (a, b) = (self.geo.region_start(r), self.geo.region_end(e - 1));
            if data && !detect_zeroes {
                self.copy_from_source(src.as_ref(), a, b - a, &mut buf)?;
                bump(&self.hydration_bytes_read, b - a);
                read += b - a;
            } else if data {
                // In bounded chunks, whatever the batch size.
                let mut pos = a;
                while pos < b {
                    let n = (b - pos).min(crate::storage::COPY_CHUNK);
                    buf.resize(n as usize, 0);
                    src.read_at(&mut buf, pos).map_err(EngineError::Source)?;
                    bump(&self.hydration_bytes_read, n);
                    read += n;
                    if buf.iter().all(|&x| x == 0) {
                        self.zero_dest(pos, n)?;
                    } else {
                        self.dest.write_at(&buf, pos).map_err(EngineError::Dest)?;
                        self.dest_written();
                    }
                    pos += n;
                }
            } else {
                self.zero_dest(a, b - a)?;
                holes += e - r;
            }
            r = e;
        }
        for r in first..first + n {
            self.md.set_hydrated(r).map_err(EngineError::Metadata)?;
        }
        Ok((holes, read))
    }

    /// Copies `[offset, offset + len)` from `src` to the destination (through
    /// `buf` if the kernel cannot copy between them), and counts the destination
    /// write.
    pub(super) fn copy_from_source(
        &self,
        src: &dyn crate::storage::BlockDevice,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        copy_range(src, self.dest.as_ref(), offset, len, buf).map_err(|(from_source, e)| {
            if from_source {
                EngineError::Source(e)
            } else {
                EngineError::Dest(e)
            }
        })?;
        self.dest_written();
        Ok(())
    }

    /// The written mask of region `r`, whose sub-blocks a copy must keep.
    fn written_mask_to_keep(&self, r: u64) -> Option<u64> {
        #[cfg(feature = "test-hooks")]
        if self.whole_copies.load(Ordering::SeqCst) {
            // The mutation: copies overwrite the guest's sub-blocks.
            return None;
        }
        self.md.written_mask(r)
    }

    /// Test-only mutation: hydration copies partly written regions whole, over
    /// the sub-blocks the guest wrote. Exists so that the crash suite can fail.
    #[cfg(feature = "test-hooks")]
    pub fn set_whole_copies(&self, on: bool) {
        self.whole_copies.store(on, Ordering::SeqCst);
    }

    /// One background hydration step: copies up to `max` adjacent unhydrated
    /// regions that no guest request is working on, starting at the cursor.
    pub fn hydrate_batch(&self, max: u64, detect_zeroes: bool) -> Result<HydrateStep> {
        let nr = self.geo.nr_regions();
        let mut from = self.hydration_cursor.load(Ordering::Relaxed) % nr;
        for _ in 0..64 {
            let Some(first) = self.md.next_unhydrated(from) else {
                return Ok(HydrateStep::Done);
            };
            let mut guards = Vec::new();
            let mut r = first;
            while r < nr && (r - first) < max.max(1) && !self.md.is_hydrated(r) {
                match self.locks.try_lock(r) {
                    // Re-check under the lock: it may have been hydrated meanwhile.
                    Some(g) if !self.md.is_hydrated(r) => guards.push(g),
                    _ => break,
                }
                r += 1;
            }
            if guards.is_empty() {
                from = (first + 1) % nr;
                continue;
            }
            let count = guards.len() as u64;
            let (holes, bytes_read) = self.copy_run(first, count, detect_zeroes)?;
            drop(guards);
            self.hydration_cursor
                .store((first + count) % nr, Ordering::Relaxed);
            bump(&self.stats().background_hydrations, count);
            return Ok(HydrateStep::Hydrated {
                first,
                count,
                holes,
                bytes_read,
            });
        }
        Ok(HydrateStep::Busy)
    }

    /// One background hydration step of a single region; returns it, or `None`
    /// when nothing is left (or everything left is busy).
    pub fn hydrate_next(&self) -> Result<Option<u64>> {
        match self.hydrate_batch(1, false)? {
            HydrateStep::Hydrated { first, .. } => Ok(Some(first)),
            _ => Ok(None),
        }
    }
}
