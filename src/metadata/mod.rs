//! The hydration bitmap and its crash-safe on-disk form.
//!
//! This module owns:
//! * [`Geometry`] (`geometry.rs`): device size, region size and region
//!   arithmetic (u64, checked).
//! * The on-disk format ([`mod@format`], documented in `docs/metadata-format.md`):
//!   two superblock slots, the bitmap in place, and a two-slot journal.
//! * Opening a store ([`load`], `recovery.rs`): its recovery steps, which
//!   validate everything and change nothing.
//! * [`Metadata`]: the in-core region map (lock-free reads), exact per-transaction
//!   tracking of the bits set since the last commit, and **the commit order**,
//!   written once, in [`Metadata::commit`] (`commit.rs`, one function per step):
//!
//!   1. pre-commit: swap out the set of bits changed in this transaction (bits
//!      set from now on belong to the next one);
//!   2. flush the destination device (rule 1: no bit before its data);
//!   3. write the changed bitmap blocks (old committed bits | this transaction's
//!      bits) into the journal slot of the new sequence number, flush metadata;
//!   4. write the new superblock (one sector: atomic), flush metadata: committed;
//!   5. write the same blocks in place (made durable by the next commit's step 3
//!      flush, and recoverable from the journal until then).
//!
//! * Metadata modes (rw / ro / fail) as dm-clone has them: a failed commit aborts
//!   the transaction, reloads the last committed state and drops to read-only; if
//!   the reload fails too, fail mode, for good. No bit set in core is dropped
//!   (their writes completed); read-only mode never commits them, a restart
//!   adopts them after flushing the destination.
//! * The in-core map lives in a [`live::LiveMap`], memory that survives a process
//!   death on the same boot. Bits a dead process set but never committed are
//!   adopted when the store is opened ([`Metadata::from_loaded`]): they join the
//!   first transaction, whose commit flushes the destination before recording
//!   them (design rule 7).
//! * The table of partly written regions ([`mod@partial`], version 2 stores): a
//!   region whose written mask says which of its sub-blocks the guest wrote
//!   reads those from the destination and the rest from the source. Masks live
//!   in the live map beside the bitmap, are tracked per transaction by table
//!   block, snapshotted at pre-commit (so that a commit records only masks whose
//!   data the destination flush covers) and journaled with the bitmap blocks.

mod commit;
pub mod format;
mod geometry;
pub mod live;
pub mod partial;
mod recovery;

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bitvec::prelude::*;
use serde::Serialize;

use crate::storage::{BlockDevice, StorageError};
use format::{
    encode_block, Layout, PartialSpec, Superblock, BLOCK_SIZE, ENTRIES_PER_BLOCK, KIND_BITMAP,
    KIND_TABLE, SUPERBLOCK_BYTES, WORDS_PER_BLOCK,
};
use live::LiveMap;
use partial::{full_mask, Added, Partial};

pub use geometry::{Geometry, DEFAULT_REGION_SIZE, MAX_REGIONS, MAX_REGION_SIZE, MIN_REGION_SIZE};
pub use recovery::{check_geometry, is_blank, load, peek_superblock, Loaded};

/// Errors of the metadata layer.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The metadata device failed an I/O.
    #[error("metadata device I/O failed")]
    Storage(#[from] StorageError),
    /// The store has never been formatted (its superblocks are all zeroes).
    #[error("the metadata store is blank (never formatted)")]
    Blank,
    /// The store is smaller than its layout needs.
    #[error("the metadata store has {size} bytes but this geometry needs {need}")]
    TooSmall {
        /// Actual size.
        size: u64,
        /// Needed size.
        need: u64,
    },
    /// A superblock slot failed validation.
    #[error("superblock slot {slot}: {reason}")]
    BadSuperblock {
        /// Slot 0 or 1.
        slot: u64,
        /// What is wrong.
        reason: String,
    },
    /// A bitmap or journal block failed validation.
    #[error("{what}: {reason}")]
    BadBlock {
        /// Which block.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The store is self-inconsistent in a way no crash can produce.
    #[error("inconsistent metadata: {0}")]
    Inconsistent(String),
    /// The store describes another device than the one given.
    #[error("{what} mismatch: the metadata says {stored}, but {given} was given")]
    Mismatch {
        /// Which parameter.
        what: &'static str,
        /// The stored value.
        stored: u64,
        /// The given value.
        given: u64,
    },
    /// Device size / region size combination is unusable.
    #[error("invalid geometry: {0}")]
    InvalidGeometry(String),
    /// A region number past the end of the device.
    #[error("region {region} is out of range ({nr} regions)")]
    OutOfRange {
        /// The region asked for.
        region: u64,
        /// The number of regions.
        nr: u64,
    },
    /// The metadata is in read-only mode: no bit can be set or committed.
    #[error("metadata is read-only after an earlier failure")]
    ReadOnly,
    /// The metadata is in fail mode.
    #[error("metadata has failed; restart on healthy devices")]
    Failed,
}

/// Result type of the metadata layer.
pub type Result<T> = std::result::Result<T, MetadataError>;

/// Metadata mode, as dm-clone's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Normal operation.
    Rw,
    /// After a failed commit: no new bits, no commits.
    Ro,
    /// After a failed reload: nothing works.
    Fail,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::Rw,
            1 => Mode::Ro,
            _ => Mode::Fail,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Rw => "rw",
            Mode::Ro => "ro",
            Mode::Fail => "fail",
        })
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Nothing changed; nothing was written (the destination may have been flushed).
    Nothing,
    /// A new state was committed.
    Committed {
        /// Its sequence number.
        seq: u64,
        /// Regions newly recorded.
        regions: u64,
        /// Bitmap blocks written.
        blocks: u64,
    },
}

/// Counters of commits.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CommitStats {
    /// Commits that wrote a new state.
    pub commits: u64,
    /// Commit attempts that failed.
    pub failures: u64,
    /// Duration of the last commit that wrote a new state, in microseconds.
    pub last_commit_us: u64,
    /// Current sequence number.
    pub seq: u64,
}

/// The part of a transaction that is swapped out at pre-commit.
#[derive(Debug)]
struct Txn {
    dirty: BitVec<u64, Lsb0>,
    count: u64,
    /// The write-cache choice, if it changed in this transaction.
    wce: Option<bool>,
    /// Table blocks with a slot changed in this transaction.
    table_dirty: BitVec<u64, Lsb0>,
    /// Swapped out only: the images of the table blocks this commit writes, as
    /// the table was at pre-commit (logical block index, words).
    table_images: Vec<(u64, Vec<u64>)>,
}

/// Where a region's data is, in core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionState {
    /// On the destination.
    Hydrated,
    /// On the source.
    Unhydrated,
    /// The sub-blocks of this written mask on the destination, the rest on the
    /// source.
    Partial(u64),
}

/// What [`Metadata::mark_written`] recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// The region's mask now has these bits.
    Partial(u64),
    /// Every sub-block is written (or the region was hydrated already): the
    /// region is hydrated.
    Hydrated,
    /// The region has no slot and the table is full: nothing was recorded; the
    /// caller must hydrate the region (copy what the mask lacks, then
    /// [`Metadata::set_hydrated`]).
    NoRoom,
}

/// The committed state, guarded by the commit lock.
#[derive(Debug)]
struct DiskState {
    sb: Superblock,
    committed: BitVec<u64, Lsb0>,
    /// A cleared dirty set, swapped in at the next pre-commit.
    spare: BitVec<u64, Lsb0>,
    /// Bitmap blocks whose in-place copy could not be written after their commit
    /// was durable: the current journal record still covers them, and the next
    /// commit journals and rewrites them again.
    unsynced: Vec<u64>,
}

/// The hydration bitmap: in-core map, transaction tracking and commits.
pub struct Metadata {
    dev: Arc<dyn BlockDevice>,
    geo: Geometry,
    layout: Layout,
    uuid: [u8; 16],
    /// In-core region map (committed and uncommitted bits) and the table's
    /// slots, in memory that outlives the process. Read without locks.
    live: LiveMap,
    /// The index of the table of partly written regions.
    partial: Partial,
    /// Regions a dead process hydrated but never committed, adopted at open.
    adopted: u64,
    hydrated: AtomicU64,
    mode: AtomicU8,
    txn: Mutex<Txn>,
    /// Held for the whole of a commit: commits are serialised.
    disk: Mutex<DiskState>,
    commits: AtomicU64,
    failures: AtomicU64,
    last_commit_us: AtomicU64,
    write_cache: AtomicU8,
    /// Test-only mutation: skip the destination flush in `commit`.
    #[cfg(feature = "test-hooks")]
    skip_dest_flush: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metadata")
            .field("geometry", &self.geo)
            .field("mode", &self.mode())
            .field("hydrated", &self.hydrated_count())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Metadata {
    /// Formats `dev` for `geo` (every region unhydrated, the default table of
    /// partly written regions) and opens it.
    pub fn format(dev: Arc<dyn BlockDevice>, geo: Geometry) -> Result<Metadata> {
        Self::format_with(dev, geo, PartialSpec::default_for(&geo))
    }

    /// [`Metadata::format`] with the table `spec`.
    pub fn format_with(
        dev: Arc<dyn BlockDevice>,
        geo: Geometry,
        spec: PartialSpec,
    ) -> Result<Metadata> {
        Self::format_store_with(dev.as_ref(), geo, spec)?;
        Self::open(dev, Some(&geo))
    }

    /// Writes a new store for `geo` (every region unhydrated, a new uuid, the
    /// default table) on `dev`.
    pub fn format_store(dev: &dyn BlockDevice, geo: Geometry) -> Result<()> {
        Self::format_store_with(dev, geo, PartialSpec::default_for(&geo))
    }

    /// [`Metadata::format_store`] with the table `spec`.
    pub fn format_store_with(
        dev: &dyn BlockDevice,
        geo: Geometry,
        spec: PartialSpec,
    ) -> Result<()> {
        spec.validate(&geo)
            .map_err(MetadataError::InvalidGeometry)?;
        let layout = Layout::with(&geo, &spec);
        if dev.size() < layout.required_size() {
            return Err(MetadataError::TooSmall {
                size: dev.size(),
                need: layout.required_size(),
            });
        }
        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let zero_words = vec![0u64; WORDS_PER_BLOCK];
        // Blank both superblock slots first: a crash during format leaves a blank store.
        dev.write_at(&[0u8; SUPERBLOCK_BYTES], 0)?;
        dev.write_at(&[0u8; SUPERBLOCK_BYTES], BLOCK_SIZE)?;
        dev.flush()?;
        for index in 0..layout.logical_blocks() {
            let kind = if index < layout.bitmap_blocks {
                KIND_BITMAP
            } else {
                KIND_TABLE
            };
            let b = encode_block(kind, index, 0, &uuid, &zero_words);
            dev.write_at(&b, layout.bitmap_offset(index))?;
        }
        dev.flush()?;
        let sb = Superblock {
            flags: 0,
            uuid,
            seq: 1,
            geometry: geo,
            journal_count: 0,
            hydrated: 0,
            created: now_secs(),
            partial: spec,
        };
        dev.write_at(&sb.encode(), BLOCK_SIZE)?;
        dev.flush()?;
        Ok(())
    }

    /// Opens a formatted store for use, validating everything (see [`load`]),
    /// with its in-core map in process memory (see [`Metadata::from_loaded`]).
    pub fn open(dev: Arc<dyn BlockDevice>, expected: Option<&Geometry>) -> Result<Metadata> {
        let loaded = load(dev.as_ref(), expected)?;
        let sb = &loaded.superblock;
        let live = LiveMap::anonymous(sb.geometry.nr_regions(), sb.partial.slots);
        Self::from_loaded(dev, loaded, live)
    }

    /// Opens `dev`, formatting it first if it is blank (all-zero superblocks).
    /// Returns the store and whether it was formatted now.
    pub fn open_or_format(dev: Arc<dyn BlockDevice>, geo: Geometry) -> Result<(Metadata, bool)> {
        if is_blank(dev.as_ref())? {
            Ok((Self::format(dev, geo)?, true))
        } else {
            Ok((Self::open(dev, Some(&geo))?, false))
        }
    }

    /// Opens a store [`load`] read from `dev`, with its in-core map in `live`.
    ///
    /// If the current commit's journal record replaced blocks, their in-place
    /// copies may be stale or torn (a crash after that commit's superblock but
    /// before its in-place writes were flushed). The next commit would stop
    /// covering them, so they are rewritten in place and flushed first. A crash
    /// during this rewrite is harmless: the journal record still covers them.
    ///
    /// Bits set in `live` but not committed were set by a process of this boot
    /// that died before committing them (design rule 7): their data writes
    /// completed, and live in the page cache or the disk's cache. They are
    /// adopted into the first transaction, whose commit flushes the destination
    /// before it records them ([`Metadata::commit`]); until then they are served
    /// like any bit set since the last commit.
    pub fn from_loaded(
        dev: Arc<dyn BlockDevice>,
        loaded: Loaded,
        live: LiveMap,
    ) -> Result<Metadata> {
        let geo = loaded.superblock.geometry;
        let nr = geo.nr_regions() as usize;
        let spec = loaded.superblock.partial;
        let layout = loaded.superblock.layout();
        if !loaded.journaled.is_empty() {
            let sb = &loaded.superblock;
            for &index in &loaded.journaled {
                let (kind, words) = loaded.block_words(index);
                let enc = encode_block(kind, index, sb.seq, &sb.uuid, &words);
                dev.write_at(&enc, layout.bitmap_offset(index))?;
            }
            dev.flush()?;
        }
        let committed = loaded.bits.as_raw_slice();
        if live.words().len() != committed.len() || live.table().len() != loaded.table.len() {
            return Err(MetadataError::Inconsistent(format!(
                "the live region map has {} words and {} table slots, the bitmap {} words and the table {} slots",
                live.words().len(),
                live.table_slots(),
                committed.len(),
                spec.slots
            )));
        }
        let mut dirty: BitVec<u64, Lsb0> = BitVec::repeat(false, nr);
        let tail = nr % 64;
        for (i, (w, &c)) in live.words().iter().zip(committed).enumerate() {
            let mut l = w.load(Ordering::Acquire);
            if i + 1 == committed.len() && tail != 0 {
                l &= (1u64 << tail) - 1;
            }
            dirty.as_raw_mut_slice()[i] = l & !c;
            w.store(l | c, Ordering::Release);
        }
        let (table_dirty, full) = adopt_table(&live, &loaded, &geo);
        for r in full {
            // Every sub-block was written: hydrated (see `adopt_table`).
            live.words()[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::AcqRel);
            dirty.set(r as usize, true);
        }
        let adopted = dirty.count_ones() as u64;
        if adopted > 0 {
            tracing::warn!(
                regions = adopted,
                "adopting regions hydrated by a process of this boot that stopped before committing them; the next commit flushes the destination and records them"
            );
        }
        let wce = match loaded.superblock.write_cache() {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        let hydrated = loaded.bits.count_ones() as u64 + adopted;
        let partial = Partial::new(spec, &geo, &live);
        Ok(Metadata {
            dev,
            geo,
            layout,
            uuid: loaded.superblock.uuid,
            partial,
            live,
            adopted,
            hydrated: AtomicU64::new(hydrated),
            mode: AtomicU8::new(0),
            txn: Mutex::new(Txn {
                dirty,
                count: adopted,
                wce: None,
                table_dirty,
                table_images: Vec::new(),
            }),
            disk: Mutex::new(DiskState {
                sb: loaded.superblock,
                committed: loaded.bits,
                spare: BitVec::repeat(false, nr),
                unsynced: Vec::new(),
            }),
            commits: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_commit_us: AtomicU64::new(0),
            write_cache: AtomicU8::new(wce),
            #[cfg(feature = "test-hooks")]
            skip_dest_flush: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Regions adopted at open from a process that died before committing them.
    pub fn adopted(&self) -> u64 {
        self.adopted
    }

    /// The in-core map's memory.
    pub fn live_map(&self) -> &LiveMap {
        &self.live
    }

    fn map(&self) -> &[AtomicU64] {
        self.live.words()
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Metadata blocks (of [`BLOCK_SIZE`] bytes) the format uses, and the
    /// blocks the metadata store holds (dm-clone's used/total metadata blocks).
    pub fn blocks(&self) -> (u64, u64) {
        (
            self.layout.required_size() / BLOCK_SIZE,
            self.dev.size() / BLOCK_SIZE,
        )
    }

    /// The clone's uuid.
    pub fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.uuid)
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    fn set_mode(&self, m: Mode) {
        let old = self.mode.swap(m as u8, Ordering::AcqRel);
        if old != m as u8 {
            tracing::error!(from = %Mode::from_u8(old), to = %m, "switching metadata mode");
        }
        // Never move out of fail mode.
        if old == Mode::Fail as u8 {
            self.mode.store(Mode::Fail as u8, Ordering::Release);
        }
    }

    /// True when region `r` is hydrated (in core; committed or not). Lock-free.
    pub fn is_hydrated(&self, r: u64) -> bool {
        match self.map().get((r / 64) as usize) {
            Some(w) => w.load(Ordering::Acquire) & (1 << (r % 64)) != 0,
            None => false,
        }
    }

    /// Number of hydrated regions (in core).
    pub fn hydrated_count(&self) -> u64 {
        self.hydrated.load(Ordering::Acquire)
    }

    /// True when every region is hydrated (in core).
    pub fn all_hydrated(&self) -> bool {
        self.hydrated_count() == self.geo.nr_regions()
    }

    /// The first unhydrated region at or after `from`, wrapping around; `None` when all are hydrated.
    pub fn next_unhydrated(&self, from: u64) -> Option<u64> {
        let nr = self.geo.nr_regions();
        if self.all_hydrated() {
            return None;
        }
        let words = self.map().len() as u64;
        let start = from.min(nr.saturating_sub(1));
        for step in 0..=words {
            let wi = (start / 64 + step) % words;
            let mut w = !self.map()[wi as usize].load(Ordering::Acquire);
            if step == 0 {
                w &= !0u64 << (start % 64);
            }
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                let r = wi * 64 + bit;
                if r < nr {
                    return Some(r);
                }
                w &= w - 1;
            }
        }
        // The bits below `start` in the first word were skipped above.
        (0..start).find(|&r| !self.is_hydrated(r))
    }

    /// Marks region `r` hydrated. Call only after its data is written on the
    /// destination. Returns true when the bit was newly set.
    pub fn set_hydrated(&self, r: u64) -> Result<bool> {
        let nr = self.geo.nr_regions();
        if r >= nr {
            return Err(MetadataError::OutOfRange { region: r, nr });
        }
        // The mode is checked under the transaction lock, which a failing commit
        // holds while it switches mode and reloads: a bit is either set before
        // the reload (and kept, see `abort_commit`) or refused.
        let mut txn = lock(&self.txn);
        match self.mode() {
            Mode::Rw => {}
            Mode::Ro => return Err(MetadataError::ReadOnly),
            Mode::Fail => return Err(MetadataError::Failed),
        }
        Ok(self.hydrate_locked(&mut txn, r))
    }

    /// Sets region `r`'s bit, then frees its slot in the table if it has one;
    /// the caller holds the transaction lock. True when the bit was newly set.
    fn hydrate_locked(&self, txn: &mut Txn, r: u64) -> bool {
        let bit = 1u64 << (r % 64);
        let prev = self.map()[(r / 64) as usize].fetch_or(bit, Ordering::AcqRel);
        if prev & bit != 0 {
            return false;
        }
        txn.dirty.set(r as usize, true);
        txn.count += 1;
        self.hydrated.fetch_add(1, Ordering::AcqRel);
        // The bit first: a reader that finds the slot gone finds the bit set.
        if let Some(slot) = self.partial.remove(&self.live, r) {
            txn.table_dirty
                .set((slot / ENTRIES_PER_BLOCK) as usize, true);
        }
        true
    }

    /// The table of partly written regions this store has.
    pub fn partial_spec(&self) -> PartialSpec {
        self.partial.spec()
    }

    /// The written mask of region `r`'s sub-blocks (bit `i`: bytes
    /// `i * sub_block..` of the region), when it is partly written.
    pub fn written_mask(&self, r: u64) -> Option<u64> {
        self.partial.mask(&self.live, r)
    }

    /// The mask of all of region `r`'s sub-blocks (the last region may have fewer).
    pub fn full_mask(&self, r: u64) -> u64 {
        full_mask(
            self.geo
                .region_len(r)
                .div_ceil(self.partial.spec().sub_block),
        )
    }

    /// Where region `r`'s data is. Lock-free but for a partly written region's
    /// mask. A region leaving the table has its bit set before its slot is freed,
    /// so the bit is looked at again after the table: a region is never seen
    /// unhydrated after a write that made it partial or hydrated completed.
    pub fn region_state(&self, r: u64) -> RegionState {
        if self.is_hydrated(r) {
            return RegionState::Hydrated;
        }
        if let Some(mask) = self.written_mask(r) {
            return RegionState::Partial(mask);
        }
        if self.is_hydrated(r) {
            RegionState::Hydrated
        } else {
            RegionState::Unhydrated
        }
    }

    /// Regions partly written now (in core).
    pub fn partial_count(&self) -> u64 {
        self.partial.len()
    }

    /// Every partly written region and its mask, in region order (in core).
    pub fn partial_regions(&self) -> Vec<(u64, u64)> {
        self.partial.entries(&self.live)
    }

    /// Records that the sub-blocks `bits` of region `r` hold the guest's data on
    /// the destination. Call only after their data write completed, holding the
    /// region's lock. A region whose every sub-block is then written is marked
    /// hydrated instead.
    pub fn mark_written(&self, r: u64, bits: u64) -> Result<Marked> {
        let nr = self.geo.nr_regions();
        if r >= nr {
            return Err(MetadataError::OutOfRange { region: r, nr });
        }
        let full = self.full_mask(r);
        let bits = bits & full;
        let mut txn = lock(&self.txn);
        match self.mode() {
            Mode::Rw => {}
            Mode::Ro => return Err(MetadataError::ReadOnly),
            Mode::Fail => return Err(MetadataError::Failed),
        }
        if self.is_hydrated(r) {
            return Ok(Marked::Hydrated);
        }
        let old = self.partial.mask(&self.live, r).unwrap_or(0);
        if old | bits == full {
            self.hydrate_locked(&mut txn, r);
            return Ok(Marked::Hydrated);
        }
        if bits & !old == 0 {
            return Ok(Marked::Partial(old));
        }
        match self.partial.add(&self.live, r, bits) {
            Added::Recorded { slot, mask } => {
                txn.table_dirty
                    .set((slot / ENTRIES_PER_BLOCK) as usize, true);
                Ok(Marked::Partial(mask))
            }
            Added::NoRoom => Ok(Marked::NoRoom),
        }
    }

    /// True when the current transaction has something to commit.
    pub fn changed(&self) -> bool {
        let t = lock(&self.txn);
        t.count > 0 || t.wce.is_some() || t.table_dirty.any()
    }

    /// The guest's stored write-cache choice (`None` if it never chose).
    pub fn write_cache(&self) -> Option<bool> {
        match self.write_cache.load(Ordering::Acquire) {
            0 => None,
            1 => Some(false),
            _ => Some(true),
        }
    }

    /// Records the guest's write-cache choice; it is persisted by the next commit.
    pub fn set_write_cache(&self, writeback: bool) {
        let mut t = lock(&self.txn);
        self.write_cache
            .store(if writeback { 2 } else { 1 }, Ordering::Release);
        t.wce = Some(writeback);
    }

    /// Commit counters.
    pub fn stats(&self) -> CommitStats {
        CommitStats {
            commits: self.commits.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_commit_us: self.last_commit_us.load(Ordering::Relaxed),
            seq: lock(&self.disk).sb.seq,
        }
    }

    /// Test-only mutation: when set, [`Metadata::commit`] skips the destination
    /// flush, breaking rule 1. Exists so the crash suite can prove it can fail.
    #[cfg(feature = "test-hooks")]
    pub fn set_skip_dest_flush(&self, skip: bool) {
        self.skip_dest_flush.store(skip, Ordering::SeqCst);
    }

    /// Whether that mutation is on: never in a build without `test-hooks`, where
    /// the commit does not even look.
    fn mutated_to_skip_dest_flush(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.skip_dest_flush.load(Ordering::SeqCst);
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    /// The committed superblock.
    pub fn superblock(&self) -> Superblock {
        lock(&self.disk).sb.clone()
    }
}

/// Merges the committed table into the live one (design rule 7: the live map
/// may hold slots a dead process filled or freed since the last commit, and it
/// is at least as new as the store on this boot) and cleans it: a free slot is
/// zeroed, a slot of a hydrated region or of no region of this device freed,
/// mask bits past a region's sub-blocks dropped, a second slot of one region
/// merged into the first. Returns the table blocks that now differ from the
/// committed ones (the first transaction records them) and the regions whose
/// masks are full (every sub-block written: hydrated, by the caller). Committed
/// slots that find no free slot cannot occur (a region leaves the table only
/// hydrated) and are kept out, logged.
fn adopt_table(live: &LiveMap, loaded: &Loaded, geo: &Geometry) -> (BitVec<u64, Lsb0>, Vec<u64>) {
    let spec = loaded.superblock.partial;
    let t = live.table();
    let nr = geo.nr_regions();
    let hydrated =
        |r: u64| live.words()[(r / 64) as usize].load(Ordering::Acquire) & (1 << (r % 64)) != 0;
    let full_of = |r: u64| full_mask(geo.region_len(r).div_ceil(spec.sub_block));
    let mut owner: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut full = Vec::new();
    let free = |slot: usize| {
        t[2 * slot].store(0, Ordering::Release);
        t[2 * slot + 1].store(0, Ordering::Release);
    };
    for slot in 0..spec.slots as usize {
        let key = t[2 * slot].load(Ordering::Acquire);
        let mask = t[2 * slot + 1].load(Ordering::Acquire);
        if key == 0 || key > nr || hydrated(key - 1) {
            if key > nr {
                tracing::warn!(slot, key, "live map: a table slot names no region; freed");
            }
            free(slot);
            continue;
        }
        let r = key - 1;
        let m = mask & full_of(r);
        if let Some(&first) = owner.get(&r) {
            tracing::warn!(
                slot,
                region = r,
                "live map: a second slot of one region; merged"
            );
            t[2 * first + 1].fetch_or(m, Ordering::AcqRel);
            free(slot);
        } else if m == 0 {
            free(slot);
        } else {
            t[2 * slot + 1].store(m, Ordering::Release);
            owner.insert(r, slot);
        }
    }
    for (slot, e) in loaded.table.chunks(2).enumerate() {
        if e[0] == 0 || hydrated(e[0] - 1) {
            continue;
        }
        let r = e[0] - 1;
        if let Some(&s) = owner.get(&r) {
            t[2 * s + 1].fetch_or(e[1], Ordering::AcqRel);
            continue;
        }
        let target = if t[2 * slot].load(Ordering::Acquire) == 0 {
            Some(slot)
        } else {
            (0..spec.slots as usize).find(|&s| t[2 * s].load(Ordering::Acquire) == 0)
        };
        match target {
            Some(s) => {
                t[2 * s + 1].store(e[1], Ordering::Release);
                t[2 * s].store(e[0], Ordering::Release);
                owner.insert(r, s);
            }
            None => tracing::error!(
                region = r,
                "the committed table names a region the live table has no room for"
            ),
        }
    }
    for (&r, &s) in &owner {
        if t[2 * s + 1].load(Ordering::Acquire) == full_of(r) {
            full.push(r);
            free(s);
        }
    }
    let blocks = spec.table_blocks() as usize;
    let mut dirty: BitVec<u64, Lsb0> = BitVec::repeat(false, blocks);
    for (i, (l, c)) in t.iter().zip(&loaded.table).enumerate() {
        if l.load(Ordering::Acquire) != *c {
            dirty.set(i / WORDS_PER_BLOCK, true);
        }
    }
    (dirty, full)
}

#[cfg(test)]
mod tests;
