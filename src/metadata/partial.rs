//! The table of partly written regions, in core (version 2 stores).
//!
//! A guest write into an unhydrated region that covers whole sub-blocks need not
//! copy the region: its data goes to the destination, and the region's written
//! mask (one bit per sub-block) records that those sub-blocks now read from the
//! destination while the rest still read from the source. A region stays in the
//! table until its mask is full or it is hydrated otherwise (background
//! hydration copies only the sub-blocks the mask lacks); then its region bit is
//! set and its slot freed.
//!
//! The slots live in the [`LiveMap`] (two words each, see its docs), so that a
//! process death keeps them (design rule 7), and this module keeps the index
//! from region to slot and a bitset of the regions that have one, for lock-free
//! checks. Every change is made under [`super::Metadata`]'s transaction lock, in
//! an order that leaves the slot meaningful whatever store a death interrupts:
//!
//! * a new slot: the mask first, then the region (a slot whose region is still 0
//!   is free, whatever its mask says);
//! * more sub-blocks: one atomic OR of the mask;
//! * the region hydrated: its region bit first (by the caller), then the slot's
//!   region cleared, then its mask (a slot of a hydrated region is ignored).
//!
//! Invariant: a mask bit is set only after its sub-block's data write completed,
//! and is never cleared while the region is unhydrated; a region has at most
//! one slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::format::PartialSpec;
use super::live::LiveMap;
use super::Geometry;

/// The in-core index of the table.
#[derive(Debug)]
pub(super) struct Partial {
    spec: PartialSpec,
    index: RwLock<Index>,
    /// Bit `r % 64` of word `r / 64`: region `r` has a slot. Set after the slot
    /// is filled, cleared before it is freed.
    flags: Box<[AtomicU64]>,
}

#[derive(Debug, Default)]
struct Index {
    slots: HashMap<u64, u32>,
    free: Vec<u32>,
}

/// What [`Partial::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Added {
    /// The region's mask now has these bits; its slot is this one.
    Recorded { slot: u64, mask: u64 },
    /// The region had no slot and every slot is taken.
    NoRoom,
}

/// The mask of a region with `n` sub-blocks, all written.
pub fn full_mask(n: u64) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

impl Partial {
    /// The index of the slots in `live` (already cleaned by
    /// [`super::Metadata::from_loaded`]: at most one slot per region).
    pub(super) fn new(spec: PartialSpec, geo: &Geometry, live: &LiveMap) -> Partial {
        let flags: Box<[AtomicU64]> = if spec.slots == 0 {
            Box::new([])
        } else {
            (0..geo.nr_regions().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        };
        let mut index = Index::default();
        let t = live.table();
        for slot in (0..spec.slots as usize).rev() {
            let key = t[2 * slot].load(Ordering::Acquire);
            if key == 0 {
                index.free.push(slot as u32);
            } else {
                let r = key - 1;
                index.slots.insert(r, slot as u32);
                flags[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::Release);
            }
        }
        Partial {
            spec,
            index: RwLock::new(index),
            flags,
        }
    }

    pub(super) fn spec(&self) -> PartialSpec {
        self.spec
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether region `r` has a slot (lock-free; Acquire, so that a cleared flag
    /// is seen after the region bit set before it).
    pub(super) fn flagged(&self, r: u64) -> bool {
        self.flags
            .get((r / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (r % 64)) != 0)
    }

    /// Region `r`'s written mask, if it has a slot.
    pub(super) fn mask(&self, live: &LiveMap, r: u64) -> Option<u64> {
        if !self.flagged(r) {
            return None;
        }
        // Loaded under the read lock: `remove` (which zeroes the slot) and `add`
        // (which may reuse it for another region) take the write lock, so the
        // mask read is this region's, and not yet cleared.
        let ix = self.read();
        let slot = *ix.slots.get(&r)?;
        Some(live.table()[2 * slot as usize + 1].load(Ordering::Acquire))
    }

    /// Regions with a slot.
    pub(super) fn len(&self) -> u64 {
        self.read().slots.len() as u64
    }

    /// Adds `bits` to region `r`'s mask, taking a slot if it has none. The
    /// caller holds the transaction lock and has written the sub-blocks.
    pub(super) fn add(&self, live: &LiveMap, r: u64, bits: u64) -> Added {
        let t = live.table();
        let mut ix = self.write();
        if let Some(&slot) = ix.slots.get(&r) {
            let old = t[2 * slot as usize + 1].fetch_or(bits, Ordering::AcqRel);
            return Added::Recorded {
                slot: slot.into(),
                mask: old | bits,
            };
        }
        let Some(slot) = ix.free.pop() else {
            return Added::NoRoom;
        };
        // The mask, then the region: until the region is stored the slot is free.
        t[2 * slot as usize + 1].store(bits, Ordering::Release);
        t[2 * slot as usize].store(r + 1, Ordering::Release);
        ix.slots.insert(r, slot);
        self.flags[(r / 64) as usize].fetch_or(1 << (r % 64), Ordering::Release);
        Added::Recorded {
            slot: slot.into(),
            mask: bits,
        }
    }

    /// Frees region `r`'s slot, if it has one; returns it. The caller holds the
    /// transaction lock and has set the region's bit.
    pub(super) fn remove(&self, live: &LiveMap, r: u64) -> Option<u64> {
        if !self.flagged(r) {
            return None;
        }
        let t = live.table();
        let mut ix = self.write();
        let slot = ix.slots.remove(&r)?;
        self.flags[(r / 64) as usize].fetch_and(!(1 << (r % 64)), Ordering::Release);
        // The region, then the mask: a slot with a region is never half free.
        t[2 * slot as usize].store(0, Ordering::Release);
        t[2 * slot as usize + 1].store(0, Ordering::Release);
        ix.free.push(slot);
        Some(slot.into())
    }

    /// Every (region, mask), in region order.
    pub(super) fn entries(&self, live: &LiveMap) -> Vec<(u64, u64)> {
        let t = live.table();
        let mut v: Vec<(u64, u64)> = self
            .read()
            .slots
            .iter()
            .map(|(&r, &s)| (r, t[2 * s as usize + 1].load(Ordering::Acquire)))
            .collect();
        v.sort_unstable();
        v
    }
}
