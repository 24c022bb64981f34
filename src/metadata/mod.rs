//! The hydration bitmap and its crash-safe on-disk form.
//!
//! This module owns:
//! * [`Geometry`]: device size, region size and region arithmetic (u64, checked).
//! * The on-disk format ([`format`], documented in `docs/metadata-format.md`):
//!   two superblock slots, the bitmap in place, and a two-slot journal.
//! * [`Metadata`]: the in-core region map (lock-free reads), exact per-transaction
//!   tracking of the bits set since the last commit, and **the commit order**,
//!   written once, in [`Metadata::commit`]:
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

pub mod format;
pub mod live;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bitvec::prelude::*;
use serde::Serialize;

use crate::storage::{BlockDevice, StorageError, SECTOR_SIZE};
use format::{
    decode_block, encode_block, Layout, Superblock, BITS_PER_BLOCK, BLOCK_SIZE, FLAG_HYDRATED,
    FLAG_WCE_SET, FLAG_WRITEBACK, KIND_BITMAP, KIND_JOURNAL, SUPERBLOCK_BYTES, WORDS_PER_BLOCK,
};
use live::LiveMap;

/// Smallest region size (8 sectors), as dm-clone.
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest region size (1 GiB), as dm-clone.
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Largest number of regions, as dm-clone.
pub const MAX_REGIONS: u64 = 1 << 31;
/// Default region size.
pub const DEFAULT_REGION_SIZE: u64 = 64 * 1024;

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

/// Device and region sizes, and the arithmetic between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    device_size: u64,
    region_size: u64,
    nr_regions: u64,
}

impl Geometry {
    /// Validates and builds a geometry: `device_size` a positive multiple of 512,
    /// `region_size` a power of two in 4 KiB..=1 GiB, at most 2^31 regions.
    pub fn new(device_size: u64, region_size: u64) -> Result<Geometry> {
        if !region_size.is_power_of_two() {
            return Err(MetadataError::InvalidGeometry(format!(
                "region size {region_size} is not a power of two"
            )));
        }
        if !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size) {
            return Err(MetadataError::InvalidGeometry(format!(
                "region size {region_size} is outside {MIN_REGION_SIZE}..={MAX_REGION_SIZE} bytes"
            )));
        }
        if device_size == 0 || device_size % SECTOR_SIZE != 0 {
            return Err(MetadataError::InvalidGeometry(format!(
                "device size {device_size} is not a positive multiple of {SECTOR_SIZE} bytes"
            )));
        }
        let nr_regions = device_size.div_ceil(region_size);
        if nr_regions > MAX_REGIONS {
            return Err(MetadataError::InvalidGeometry(format!(
                "{nr_regions} regions is more than {MAX_REGIONS}; use a larger region size"
            )));
        }
        Ok(Geometry {
            device_size,
            region_size,
            nr_regions,
        })
    }

    /// Device size in bytes.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// Region size in bytes.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Number of regions (the last one may be short).
    pub fn nr_regions(&self) -> u64 {
        self.nr_regions
    }

    /// The region holding byte `offset` (`offset` < device size).
    pub fn region_of(&self, offset: u64) -> u64 {
        offset / self.region_size
    }

    /// First byte of region `r`.
    pub fn region_start(&self, r: u64) -> u64 {
        r * self.region_size
    }

    /// One past the last byte of region `r` (short for the last region).
    pub fn region_end(&self, r: u64) -> u64 {
        (r.saturating_add(1))
            .saturating_mul(self.region_size)
            .min(self.device_size)
    }

    /// Length of region `r` in bytes.
    pub fn region_len(&self, r: u64) -> u64 {
        self.region_end(r) - self.region_start(r)
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes in {} regions of {} bytes",
            self.device_size, self.nr_regions, self.region_size
        )
    }
}

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

/// The state of a store as loaded from disk.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The current superblock.
    pub superblock: Superblock,
    /// The committed bitmap.
    pub bits: BitVec<u64, Lsb0>,
    /// Notes about benign findings (e.g. a journal replayed).
    pub notes: Vec<String>,
    /// Bitmap blocks the current journal record replaced (their in-place
    /// copies may be stale or torn until rewritten).
    pub journaled: Vec<u64>,
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
    /// In-core region map (committed and uncommitted bits), in memory that
    /// outlives the process. Read without locks.
    live: LiveMap,
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
    skip_dest_flush: AtomicBool,
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

/// Reads the superblock slots and tells whether the store was ever formatted.
pub fn is_blank(dev: &dyn BlockDevice) -> Result<bool> {
    if dev.size() < 2 * BLOCK_SIZE {
        return Ok(dev.size() == 0 || {
            let mut b = vec![0u8; dev.size() as usize];
            dev.read_at(&mut b, 0)?;
            b.iter().all(|&x| x == 0)
        });
    }
    let mut b = [0u8; SUPERBLOCK_BYTES];
    for slot in 0..2 {
        dev.read_at(&mut b, slot * BLOCK_SIZE)?;
        if b.iter().any(|&x| x != 0) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks that a store of geometry `stored` is the one `given` describes.
pub fn check_geometry(stored: &Geometry, given: &Geometry) -> Result<()> {
    if given.device_size() != stored.device_size() {
        return Err(MetadataError::Mismatch {
            what: "device size",
            stored: stored.device_size(),
            given: given.device_size(),
        });
    }
    if given.region_size() != stored.region_size() {
        return Err(MetadataError::Mismatch {
            what: "region size",
            stored: stored.region_size(),
            given: given.region_size(),
        });
    }
    Ok(())
}

/// Loads and fully validates a store: both superblock slots, every bitmap block,
/// the current journal record. `expected` (if given) must match the stored geometry.
pub fn load(dev: &dyn BlockDevice, expected: Option<&Geometry>) -> Result<Loaded> {
    let mut notes = Vec::new();
    if dev.size() < 2 * BLOCK_SIZE {
        if is_blank(dev)? {
            return Err(MetadataError::Blank);
        }
        return Err(MetadataError::TooSmall {
            size: dev.size(),
            need: 2 * BLOCK_SIZE,
        });
    }
    let mut slots = Vec::new();
    for slot in 0..2u64 {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        dev.read_at(&mut b, slot * BLOCK_SIZE)?;
        slots.push(Superblock::decode(slot, &b)?);
    }
    let sb = match (&slots[0], &slots[1]) {
        (None, None) => return Err(MetadataError::Blank),
        (Some(a), None) | (None, Some(a)) => {
            if a.seq != 1 {
                return Err(MetadataError::Inconsistent(format!(
                    "superblock slot {} is blank, but the other slot has sequence number {} (only a freshly formatted store has one blank slot)",
                    1 - a.seq % 2,
                    a.seq
                )));
            }
            a.clone()
        }
        (Some(a), Some(b)) => {
            if a.uuid != b.uuid {
                return Err(MetadataError::Inconsistent(
                    "the two superblock slots carry different uuids".into(),
                ));
            }
            if a.geometry != b.geometry {
                return Err(MetadataError::Inconsistent(format!(
                    "the two superblock slots describe different geometries ({} / {})",
                    a.geometry, b.geometry
                )));
            }
            if a.seq.abs_diff(b.seq) != 1 {
                return Err(MetadataError::Inconsistent(format!(
                    "superblock sequence numbers {} and {} are not consecutive",
                    a.seq, b.seq
                )));
            }
            if a.seq > b.seq {
                a.clone()
            } else {
                b.clone()
            }
        }
    };
    let geo = sb.geometry;
    if let Some(want) = expected {
        check_geometry(&geo, want)?;
    }
    let layout = Layout::new(&geo);
    if dev.size() < layout.required_size() {
        return Err(MetadataError::TooSmall {
            size: dev.size(),
            need: layout.required_size(),
        });
    }

    // The journal record of the current commit replaces its blocks in place.
    let slot = sb.seq % 2;
    let mut journaled = Vec::new();
    let mut replaced: Vec<Option<Vec<u64>>> = vec![None; layout.bitmap_blocks as usize];
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for n in 0..sb.journal_count {
        dev.read_at(&mut buf, layout.journal_offset(slot, n))?;
        let what = format!("journal block {n} of commit {}", sb.seq);
        let blk = decode_block(&what, &buf, KIND_JOURNAL, &sb.uuid)?;
        if blk.seq != sb.seq {
            return Err(MetadataError::BadBlock {
                what,
                reason: format!("has sequence number {}, expected {}", blk.seq, sb.seq),
            });
        }
        if blk.index >= layout.bitmap_blocks {
            return Err(MetadataError::BadBlock {
                what,
                reason: format!(
                    "names bitmap block {} of {}",
                    blk.index, layout.bitmap_blocks
                ),
            });
        }
        journaled.push(blk.index);
        replaced[blk.index as usize] = Some(blk.words);
    }
    if sb.journal_count > 0 {
        notes.push(format!(
            "journal of commit {} ({} blocks) applied",
            sb.seq, sb.journal_count
        ));
    }

    let mut bits: BitVec<u64, Lsb0> = BitVec::repeat(false, geo.nr_regions() as usize);
    for index in 0..layout.bitmap_blocks {
        let words = match replaced[index as usize].take() {
            Some(w) => w,
            None => {
                dev.read_at(&mut buf, layout.bitmap_offset(index))?;
                let what = format!("bitmap block {index}");
                let blk = decode_block(&what, &buf, KIND_BITMAP, &sb.uuid)?;
                if blk.index != index {
                    return Err(MetadataError::BadBlock {
                        what,
                        reason: format!("is labelled as block {}", blk.index),
                    });
                }
                if blk.seq > sb.seq {
                    return Err(MetadataError::BadBlock {
                        what,
                        reason: format!(
                            "was written by commit {}, newer than the superblock's {}: the newest superblock is lost or damaged",
                            blk.seq, sb.seq
                        ),
                    });
                }
                blk.words
            }
        };
        let first = index * BITS_PER_BLOCK;
        for (wi, w) in words.iter().enumerate() {
            for bit in 0..64u64 {
                if w & (1 << bit) == 0 {
                    continue;
                }
                let r = first + wi as u64 * 64 + bit;
                if r >= geo.nr_regions() {
                    return Err(MetadataError::BadBlock {
                        what: format!("bitmap block {index}"),
                        reason: format!("sets bit for region {r}, past the last region"),
                    });
                }
                bits.set(r as usize, true);
            }
        }
    }
    let count = bits.count_ones() as u64;
    if count != sb.hydrated {
        return Err(MetadataError::Inconsistent(format!(
            "the bitmap has {count} hydrated regions but the superblock records {}",
            sb.hydrated
        )));
    }
    let full = count == geo.nr_regions();
    if full != (sb.flags & FLAG_HYDRATED != 0) {
        return Err(MetadataError::Inconsistent(format!(
            "the hydration-complete flag is {} but {count} of {} regions are hydrated",
            sb.flags & FLAG_HYDRATED != 0,
            geo.nr_regions()
        )));
    }
    Ok(Loaded {
        superblock: sb,
        bits,
        notes,
        journaled,
    })
}

impl Loaded {
    /// Runs of hydrated regions, as `(first, count)`.
    pub fn hydrated_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for r in self.bits.iter_ones() {
            let r = r as u64;
            match runs.last_mut() {
                Some((first, n)) if *first + *n == r => *n += 1,
                _ => runs.push((r, 1)),
            }
        }
        runs
    }
}

impl Metadata {
    /// Formats `dev` for `geo` (every region unhydrated) and opens it.
    pub fn format(dev: Arc<dyn BlockDevice>, geo: Geometry) -> Result<Metadata> {
        Self::format_store(dev.as_ref(), geo)?;
        Self::open(dev, Some(&geo))
    }

    /// Writes a new store for `geo` (every region unhydrated, a new uuid) on `dev`.
    pub fn format_store(dev: &dyn BlockDevice, geo: Geometry) -> Result<()> {
        let layout = Layout::new(&geo);
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
        for index in 0..layout.bitmap_blocks {
            let b = encode_block(KIND_BITMAP, index, 0, &uuid, &zero_words);
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
        };
        dev.write_at(&sb.encode(), BLOCK_SIZE)?;
        dev.flush()?;
        Ok(())
    }

    /// Opens a formatted store for use, validating everything (see [`load`]),
    /// with its in-core map in process memory (see [`Metadata::from_loaded`]).
    pub fn open(dev: Arc<dyn BlockDevice>, expected: Option<&Geometry>) -> Result<Metadata> {
        let loaded = load(dev.as_ref(), expected)?;
        let live = LiveMap::anonymous(loaded.superblock.geometry.nr_regions());
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
        if !loaded.journaled.is_empty() {
            let sb = &loaded.superblock;
            let layout = Layout::new(&geo);
            let raw = loaded.bits.as_raw_slice();
            for &index in &loaded.journaled {
                let a = (index as usize * WORDS_PER_BLOCK).min(raw.len());
                let b = (a + WORDS_PER_BLOCK).min(raw.len());
                let enc = encode_block(KIND_BITMAP, index, sb.seq, &sb.uuid, &raw[a..b]);
                dev.write_at(&enc, layout.bitmap_offset(index))?;
            }
            dev.flush()?;
        }
        let committed = loaded.bits.as_raw_slice();
        if live.words().len() != committed.len() {
            return Err(MetadataError::Inconsistent(format!(
                "the live region map has {} words, the bitmap {}",
                live.words().len(),
                committed.len()
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
        let adopted = dirty.count_ones() as u64;
        if adopted > 0 {
            tracing::warn!(
                regions = adopted,
                "adopting regions hydrated by a process of this boot that stopped before committing them; the next commit flushes the destination and records them"
            );
        }
        let wce = match (
            loaded.superblock.flags & FLAG_WCE_SET != 0,
            loaded.superblock.flags & FLAG_WRITEBACK != 0,
        ) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        };
        let hydrated = loaded.bits.count_ones() as u64 + adopted;
        Ok(Metadata {
            dev,
            geo,
            layout: Layout::new(&geo),
            uuid: loaded.superblock.uuid,
            live,
            adopted,
            hydrated: AtomicU64::new(hydrated),
            mode: AtomicU8::new(0),
            txn: Mutex::new(Txn {
                dirty,
                count: adopted,
                wce: None,
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
            skip_dest_flush: AtomicBool::new(false),
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
        let bit = 1u64 << (r % 64);
        let prev = self.map()[(r / 64) as usize].fetch_or(bit, Ordering::AcqRel);
        if prev & bit != 0 {
            return Ok(false);
        }
        txn.dirty.set(r as usize, true);
        txn.count += 1;
        self.hydrated.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// True when the current transaction has something to commit.
    pub fn changed(&self) -> bool {
        let t = lock(&self.txn);
        t.count > 0 || t.wce.is_some()
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

    /// Pre-commit: swaps out the current transaction's changes.
    fn pre_commit(&self, disk: &mut DiskState) -> Txn {
        let mut t = lock(&self.txn);
        let fresh = std::mem::take(&mut disk.spare);
        let dirty = std::mem::replace(&mut t.dirty, fresh);
        Txn {
            dirty,
            count: std::mem::take(&mut t.count),
            wce: t.wce.take(),
        }
    }

    /// The two-phase commit. `dest` is the destination device; it is flushed
    /// before anything is written to metadata (rule 1, whatever `flush_dest`
    /// says). With `flush_dest`, it is flushed even when there is nothing to
    /// record: the engine decided that a guest flush needs it
    /// ([`crate::engine::Engine::commit`] is the one place that decides).
    pub fn commit(&self, dest: &dyn BlockDevice, flush_dest: bool) -> Result<CommitOutcome> {
        let mut disk = lock(&self.disk);
        match self.mode() {
            Mode::Rw => {}
            Mode::Ro => return Err(MetadataError::ReadOnly),
            Mode::Fail => return Err(MetadataError::Failed),
        }
        let started = Instant::now();
        let mut txn = self.pre_commit(&mut disk);
        if txn.count == 0 && txn.wce.is_none() {
            disk.spare = txn.dirty;
            if flush_dest {
                if let Err(e) = dest.flush() {
                    self.abort_commit(&mut disk, "destination flush", None);
                    return Err(e.into());
                }
            }
            return Ok(CommitOutcome::Nothing);
        }
        let result = self.write_txn(&mut disk, dest, &txn);
        if let Err((step, _)) = &result {
            self.abort_commit(&mut disk, step, Some(&txn));
        }
        // Recycle the dirty set as the next spare (clearing only non-zero words).
        for w in txn.dirty.as_raw_mut_slice() {
            if *w != 0 {
                *w = 0;
            }
        }
        disk.spare = txn.dirty;
        let outcome = result.map_err(|(_, e)| e)?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.last_commit_us
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(outcome)
    }

    fn write_txn(
        &self,
        disk: &mut DiskState,
        dest: &dyn BlockDevice,
        txn: &Txn,
    ) -> std::result::Result<CommitOutcome, (&'static str, MetadataError)> {
        // Rule 1: the data of every region in this transaction is durable before
        // any metadata claims it.
        if !self.skip_dest_flush.load(Ordering::SeqCst) {
            dest.flush().map_err(|e| ("destination flush", e.into()))?;
        }
        // The changed blocks: those with a dirty word. Only they are read, merged
        // and written, so a commit costs O(changed blocks) plus a word scan.
        let dirty = txn.dirty.as_raw_slice();
        let mut blocks: Vec<u64> = Vec::new();
        for (wi, w) in dirty.iter().enumerate() {
            let b = (wi / WORDS_PER_BLOCK) as u64;
            if *w != 0 && blocks.last() != Some(&b) {
                blocks.push(b);
            }
        }
        // Blocks whose in-place copy failed after an earlier commit: only the
        // journal covers them, and this commit's journal replaces that one.
        if !disk.unsynced.is_empty() {
            blocks.extend_from_slice(&disk.unsynced);
            blocks.sort_unstable();
            blocks.dedup();
        }
        let committed = disk.committed.as_raw_slice();
        let merged = |index: u64| -> Vec<u64> {
            let a = (index as usize * WORDS_PER_BLOCK).min(committed.len());
            let b = (a + WORDS_PER_BLOCK).min(committed.len());
            committed[a..b]
                .iter()
                .zip(&dirty[a..b])
                .map(|(c, d)| c | d)
                .collect()
        };
        let seq = disk.sb.seq + 1;
        let slot = seq % 2;
        let io = |e: StorageError| MetadataError::from(e);
        let images: Vec<Vec<u64>> = blocks.iter().map(|&i| merged(i)).collect();
        for (n, (&index, words)) in blocks.iter().zip(&images).enumerate() {
            let b = encode_block(KIND_JOURNAL, index, seq, &self.uuid, words);
            self.dev
                .write_at(&b, self.layout.journal_offset(slot, n as u64))
                .map_err(|e| ("journal write", io(e)))?;
        }
        // Also makes the previous commit's in-place writes durable.
        self.dev.flush().map_err(|e| ("metadata flush", io(e)))?;
        // Dirty bits are exactly the bits newly set since the last commit.
        let hydrated = disk.sb.hydrated + txn.count;
        let mut flags = disk.sb.flags & !FLAG_HYDRATED;
        if hydrated == self.geo.nr_regions() {
            flags |= FLAG_HYDRATED;
        }
        if let Some(wb) = txn.wce {
            flags |= FLAG_WCE_SET;
            if wb {
                flags |= FLAG_WRITEBACK;
            } else {
                flags &= !FLAG_WRITEBACK;
            }
        }
        let sb = Superblock {
            flags,
            seq,
            journal_count: blocks.len() as u64,
            hydrated,
            ..disk.sb.clone()
        };
        self.dev
            .write_at(&sb.encode(), slot * BLOCK_SIZE)
            .map_err(|e| ("superblock write", io(e)))?;
        self.dev.flush().map_err(|e| ("metadata flush", io(e)))?;
        // Committed. Checkpoint in place; the journal covers these until the next commit.
        if flags & FLAG_HYDRATED != 0 && disk.sb.flags & FLAG_HYDRATED == 0 {
            tracing::info!("every region is hydrated; the source is no longer needed");
        }
        disk.sb = sb;
        {
            let raw = disk.committed.as_raw_mut_slice();
            for (&index, words) in blocks.iter().zip(&images) {
                let a = index as usize * WORDS_PER_BLOCK;
                raw[a..a + words.len()].copy_from_slice(words);
            }
        }
        // A failed in-place write does not undo the commit, which is durable: the
        // journal record covers the block until the next commit journals it again.
        disk.unsynced.clear();
        for (&index, words) in blocks.iter().zip(&images) {
            let enc = encode_block(KIND_BITMAP, index, seq, &self.uuid, words);
            if let Err(e) = self.dev.write_at(&enc, self.layout.bitmap_offset(index)) {
                tracing::warn!(
                    block = index,
                    error = %crate::error_chain(&e),
                    "in-place bitmap write failed after a durable commit; the journal covers it until the next commit"
                );
                disk.unsynced.push(index);
            }
        }
        Ok(CommitOutcome::Committed {
            seq,
            regions: txn.count,
            blocks: blocks.len() as u64,
        })
    }

    /// A commit step failed: abort the transaction, reload the last committed
    /// state from disk, and go read-only (or fail, if the reload fails too).
    ///
    /// No bit set in core is dropped. The aborted transaction's bits (`aborted`)
    /// and those set while it ran were set after their data writes completed,
    /// and the guest may have seen those writes completed: dropping the bits
    /// would serve the source's data over them, and the live map (the same
    /// memory) would forget them, so a restart could not adopt them either
    /// (design rule 7). They go back into the current transaction, which read-only
    /// mode never commits; a restart adopts them after flushing the destination
    /// (rule 1). The mode switches under the transaction lock, so no bit is set
    /// after it.
    fn abort_commit(&self, disk: &mut DiskState, step: &str, aborted: Option<&Txn>) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(step, "metadata commit failed; aborting the transaction");
        let mut t = lock(&self.txn);
        self.set_mode(Mode::Ro);
        if let Some(a) = aborted {
            for (d, x) in t
                .dirty
                .as_raw_mut_slice()
                .iter_mut()
                .zip(a.dirty.as_raw_slice())
            {
                *d |= *x;
            }
            t.count += a.count;
            if t.wce.is_none() {
                t.wce = a.wce;
            }
        }
        match load(self.dev.as_ref(), Some(&self.geo)) {
            Ok(loaded) if loaded.superblock.uuid == self.uuid => {
                disk.sb = loaded.superblock;
                disk.committed = loaded.bits;
                disk.unsynced.clear();
            }
            Ok(_) => {
                tracing::error!("reloaded metadata has another uuid");
                self.set_mode(Mode::Fail);
            }
            Err(e) => {
                tracing::error!(error = %e, "reloading the committed metadata failed");
                self.set_mode(Mode::Fail);
            }
        }
    }

    /// The committed superblock.
    pub fn superblock(&self) -> Superblock {
        lock(&self.disk).sb.clone()
    }
}

#[cfg(test)]
mod tests;
