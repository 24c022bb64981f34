//! Opening a store: reading and validating everything on it, in recovery
//! steps ([`load`]):
//!
//! 1. the two superblock slots, and which one is current ([`current_superblock`]);
//! 2. the geometry and the size the layout needs;
//! 3. the journal record of the current commit, whose blocks replace their
//!    in-place copies (which the crash may have torn) ([`read_journal`]);
//! 4. every bitmap block, from the journal or in place ([`read_bitmap`]);
//! 5. the counts the superblock records against the bitmap ([`check_counts`]);
//! 6. version 2: every table block, likewise, and each entry against the bitmap
//!    ([`read_table`]).
//!
//! Invariant: `load` changes nothing on the device and accepts only states a
//! crash at any point of the commit order can leave; anything else is an error
//! that names what is wrong.

use bitvec::prelude::*;

use super::format::{
    decode_block, Layout, Superblock, BITS_PER_BLOCK, BLOCK_SIZE, ENTRIES_PER_BLOCK, FLAG_HYDRATED,
    KIND_BITMAP, KIND_JOURNAL, KIND_TABLE, SUPERBLOCK_BYTES, WORDS_PER_BLOCK,
};
use super::partial::full_mask;
use super::{Geometry, MetadataError, Result};
use crate::storage::BlockDevice;

/// The state of a store as loaded from disk.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The current superblock.
    pub superblock: Superblock,
    /// The committed bitmap.
    pub bits: BitVec<u64, Lsb0>,
    /// Notes about benign findings (e.g. a journal replayed).
    pub notes: Vec<String>,
    /// Logical blocks (bitmap, then table) the current journal record replaced
    /// (their in-place copies may be stale or torn until rewritten).
    pub journaled: Vec<u64>,
    /// The committed table of partly written regions: two words a slot, the
    /// region plus one (0: free) and its written mask; empty in version 1.
    pub table: Vec<u64>,
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

/// Refuses a store too small for the two superblock slots (blank, or too small).
fn check_superblock_room(dev: &dyn BlockDevice) -> Result<()> {
    if dev.size() >= 2 * BLOCK_SIZE {
        return Ok(());
    }
    if is_blank(dev)? {
        return Err(MetadataError::Blank);
    }
    Err(MetadataError::TooSmall {
        size: dev.size(),
        need: 2 * BLOCK_SIZE,
    })
}

/// How often [`peek_superblock`] reads the two slots before it gives up.
const PEEK_TRIES: u32 = 5;

/// The superblock of a store that another process may be committing to, read
/// without its lock, for `serve --standby`, which must answer a frontend before
/// it may lock the store: the newest slot that validates. What the standby uses
/// of it is fixed at formatting (uuid, geometry) or only grows (hydration), so
/// an older slot tells the same; the write-cache choice is a guess until the
/// store is locked and loaded. A slot torn by a concurrent commit fails its
/// checksum and is skipped; when both fail, both are read again (a commit
/// rewrites one slot at a time). Changes nothing.
pub fn peek_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    check_superblock_room(dev)?;
    let mut last = MetadataError::Blank;
    for attempt in 0..PEEK_TRIES {
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut newest: Option<Superblock> = None;
        let mut blank = true;
        for slot in 0..2u64 {
            let mut b = [0u8; SUPERBLOCK_BYTES];
            dev.read_at(&mut b, slot * BLOCK_SIZE)?;
            match Superblock::decode(slot, &b) {
                Ok(Some(sb)) if newest.as_ref().is_none_or(|n| sb.seq > n.seq) => newest = Some(sb),
                Ok(None) => continue,
                Ok(Some(_)) => {}
                Err(e) => last = e,
            }
            blank = false;
        }
        if let Some(sb) = newest {
            return Ok(sb);
        }
        if blank {
            return Err(MetadataError::Blank);
        }
    }
    Err(last)
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
    check_superblock_room(dev)?;
    // Step 1.
    let sb = current_superblock(dev)?;
    // Step 2.
    let geo = sb.geometry;
    if let Some(want) = expected {
        check_geometry(&geo, want)?;
    }
    let layout = sb.layout();
    if dev.size() < layout.required_size() {
        return Err(MetadataError::TooSmall {
            size: dev.size(),
            need: layout.required_size(),
        });
    }
    // Step 3.
    let (mut replaced, journaled) = read_journal(dev, &sb, &layout)?;
    if sb.journal_count > 0 {
        notes.push(format!(
            "journal of commit {} ({} blocks) applied",
            sb.seq, sb.journal_count
        ));
    }
    // Steps 4 and 5.
    let bits = read_bitmap(dev, &sb, &layout, &mut replaced)?;
    check_counts(&sb, &bits)?;
    // Step 6.
    let table = read_table(dev, &sb, &layout, &mut replaced, &bits)?;
    Ok(Loaded {
        superblock: sb,
        bits,
        notes,
        journaled,
        table,
    })
}

/// Step 1: reads both superblock slots and picks the current one: the only one
/// of a freshly formatted store, else the newer of two consecutive ones of the
/// same store.
fn current_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    let mut slots = Vec::new();
    for slot in 0..2u64 {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        dev.read_at(&mut b, slot * BLOCK_SIZE)?;
        slots.push(Superblock::decode(slot, &b)?);
    }
    match (&slots[0], &slots[1]) {
        (None, None) => Err(MetadataError::Blank),
        (Some(a), None) | (None, Some(a)) => {
            if a.seq != 1 {
                return Err(MetadataError::Inconsistent(format!(
                    "superblock slot {} is blank, but the other slot has sequence number {} (only a freshly formatted store has one blank slot)",
                    1 - a.seq % 2,
                    a.seq
                )));
            }
            Ok(a.clone())
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
            Ok(if a.seq > b.seq { a.clone() } else { b.clone() })
        }
    }
}

/// Step 3: the journal record of the current commit: the bitmap blocks it
/// replaces (by index), and which they are.
#[allow(clippy::type_complexity)]
fn read_journal(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    layout: &Layout,
) -> Result<(Vec<Option<Vec<u64>>>, Vec<u64>)> {
    let slot = sb.seq % 2;
    let mut journaled = Vec::new();
    let mut replaced: Vec<Option<Vec<u64>>> = vec![None; layout.logical_blocks() as usize];
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
        if blk.index >= layout.logical_blocks() {
            return Err(MetadataError::BadBlock {
                what,
                reason: format!(
                    "names block {} of {} (bitmap and table)",
                    blk.index,
                    layout.logical_blocks()
                ),
            });
        }
        journaled.push(blk.index);
        replaced[blk.index as usize] = Some(blk.words);
    }
    Ok((replaced, journaled))
}

/// Step 4: the committed bitmap: each block from the journal (`replaced`) or
/// read in place and validated (label, age, no bit past the last region).
fn read_bitmap(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    layout: &Layout,
    replaced: &mut [Option<Vec<u64>>],
) -> Result<BitVec<u64, Lsb0>> {
    let geo = sb.geometry;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut bits: BitVec<u64, Lsb0> = BitVec::repeat(false, geo.nr_regions() as usize);
    for index in 0..layout.bitmap_blocks {
        let words = match replaced[index as usize].take() {
            Some(w) => w,
            None => read_in_place(
                dev,
                sb,
                layout,
                index,
                KIND_BITMAP,
                &format!("bitmap block {index}"),
                &mut buf,
            )?,
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
    Ok(bits)
}

/// Logical block `index`, read in place and validated: its kind, label and age.
fn read_in_place(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    layout: &Layout,
    index: u64,
    kind: u32,
    what: &str,
    buf: &mut [u8],
) -> Result<Vec<u64>> {
    dev.read_at(buf, layout.bitmap_offset(index))?;
    let blk = decode_block(what, buf, kind, &sb.uuid)?;
    let bad = |reason: String| MetadataError::BadBlock {
        what: what.to_string(),
        reason,
    };
    if blk.index != index {
        return Err(bad(format!("is labelled as block {}", blk.index)));
    }
    if blk.seq > sb.seq {
        return Err(bad(format!(
            "was written by commit {}, newer than the superblock's {}: the newest superblock is lost or damaged",
            blk.seq, sb.seq
        )));
    }
    Ok(blk.words)
}

/// Step 6: the committed table of partly written regions, each block from the
/// journal (`replaced`) or in place, and every entry checked: a region of the
/// device, not hydrated, in one slot only, with a mask of its own sub-blocks,
/// neither empty nor full (a full mask is recorded as a hydrated region).
fn read_table(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    layout: &Layout,
    replaced: &mut [Option<Vec<u64>>],
    bits: &BitSlice<u64, Lsb0>,
) -> Result<Vec<u64>> {
    let geo = sb.geometry;
    let slots = sb.partial.slots;
    let mut table = vec![0u64; 2 * slots as usize];
    let mut seen: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for t in 0..layout.table_blocks {
        let index = layout.bitmap_blocks + t;
        let what = format!("table block {t}");
        let words = match replaced[index as usize].take() {
            Some(w) => w,
            None => read_in_place(dev, sb, layout, index, KIND_TABLE, &what, &mut buf)?,
        };
        let bad = |reason: String| MetadataError::BadBlock {
            what: what.clone(),
            reason,
        };
        for e in 0..ENTRIES_PER_BLOCK {
            let slot = t * ENTRIES_PER_BLOCK + e;
            let (key, mask) = (words[2 * e as usize], words[2 * e as usize + 1]);
            if slot >= slots || key == 0 {
                if key != 0 || mask != 0 {
                    return Err(bad(format!("free slot {slot} is not zero")));
                }
                continue;
            }
            let r = key - 1;
            if r >= geo.nr_regions() {
                return Err(bad(format!(
                    "slot {slot} names region {r}, past the last region"
                )));
            }
            if bits[r as usize] {
                return Err(bad(format!(
                    "slot {slot} names region {r}, which is hydrated"
                )));
            }
            let full = full_mask(geo.region_len(r).div_ceil(sb.partial.sub_block));
            if mask == 0 || mask & !full != 0 || mask == full {
                return Err(bad(format!(
                    "slot {slot} has written mask {mask:#x} for region {r} (its sub-blocks: {full:#x}; neither none nor all may be recorded)"
                )));
            }
            if let Some(other) = seen.insert(r, slot) {
                return Err(bad(format!(
                    "slot {slot} names region {r}, as slot {other} does"
                )));
            }
            table[2 * slot as usize] = key;
            table[2 * slot as usize + 1] = mask;
        }
    }
    debug_assert!(2 * ENTRIES_PER_BLOCK as usize <= WORDS_PER_BLOCK);
    Ok(table)
}

impl Loaded {
    /// The payload of logical block `index` (bitmap, then table) in this state,
    /// and its in-place kind.
    pub fn block_words(&self, index: u64) -> (u32, Vec<u64>) {
        let layout = self.superblock.layout();
        let (kind, raw) = if index < layout.bitmap_blocks {
            (KIND_BITMAP, self.bits.as_raw_slice())
        } else {
            (KIND_TABLE, &self.table[..])
        };
        let first = if index < layout.bitmap_blocks {
            index
        } else {
            index - layout.bitmap_blocks
        };
        let a = (first as usize * WORDS_PER_BLOCK).min(raw.len());
        let b = (a + WORDS_PER_BLOCK).min(raw.len());
        (kind, raw[a..b].to_vec())
    }

    /// Entries of the committed table: (region, written mask), in slot order.
    pub fn partial_regions(&self) -> Vec<(u64, u64)> {
        self.table
            .chunks(2)
            .filter(|e| e[0] != 0)
            .map(|e| (e[0] - 1, e[1]))
            .collect()
    }
}

/// Step 5: the superblock's hydrated count and hydration-complete flag agree
/// with the bitmap.
fn check_counts(sb: &Superblock, bits: &BitSlice<u64, Lsb0>) -> Result<()> {
    let nr = sb.geometry.nr_regions();
    let count = bits.count_ones() as u64;
    if count != sb.hydrated {
        return Err(MetadataError::Inconsistent(format!(
            "the bitmap has {count} hydrated regions but the superblock records {}",
            sb.hydrated
        )));
    }
    let full = count == nr;
    if full != (sb.flags & FLAG_HYDRATED != 0) {
        return Err(MetadataError::Inconsistent(format!(
            "the hydration-complete flag is {} but {count} of {nr} regions are hydrated",
            sb.flags & FLAG_HYDRATED != 0,
        )));
    }
    Ok(())
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
