//! Partly written regions ([`crate::metadata::partial`]): where a range's bytes
//! are when some regions are partly written ([`Engine::runs`]), what a guest
//! write into an unhydrated region writes when it needs no region copy
//! ([`Engine::sub_block_plan`]), and how the rest of such a region is copied
//! when it is hydrated ([`Engine::fill_missing`]).
//!
//! Invariants:
//! * a sub-block's mask bit is set only after the destination holds the whole
//!   sub-block: the guest's bytes, and the source's for the rest of it (a write
//!   that covers part of an unwritten sub-block brings that sub-block's other
//!   bytes from the source in the same destination write);
//! * a written sub-block is never copied from the source again: hydration
//!   copies only what the mask lacks.

use super::{Engine, EngineError, Payload, Result};
use crate::metadata::partial::full_mask;
use crate::metadata::{Marked, RegionState};

/// What a write into part of an unhydrated region writes, without copying the
/// region: `[start, end)` on the destination, made of the source's bytes
/// `[start, pos)` (`head`), the guest's `[pos, piece_end)` and the source's
/// `[piece_end, end)` (`tail`); then the sub-blocks `bits` are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SubBlockPlan {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) bits: u64,
    /// The region's mask before the write.
    pub(super) mask: u64,
}

impl SubBlockPlan {
    /// Whether the source is read for the edges.
    pub(super) fn fills(&self, pos: u64, piece_end: u64) -> bool {
        self.start < pos || piece_end < self.end
    }
}

/// A piece of a range starting at `at` lives on `dest` (or the source): ends the
/// run gathered so far if it is of the other device.
fn next_run(
    cur: &mut Option<(u64, bool)>,
    at: u64,
    dest: bool,
    f: &mut impl FnMut(u64, u64, bool) -> Result<()>,
) -> Result<()> {
    match *cur {
        Some((s, d)) if d != dest => {
            f(s, at, d)?;
            *cur = Some((at, dest));
        }
        Some(_) => {}
        None => *cur = Some((at, dest)),
    }
    Ok(())
}

impl Engine {
    /// Calls `f(start, end, on_dest)` for the runs of `[offset, end)` that live
    /// on one device (the destination, or the source), in order, adjacent runs
    /// of one device merged.
    pub(super) fn runs(
        &self,
        offset: u64,
        end: u64,
        mut f: impl FnMut(u64, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let sub = self.md.partial_spec().sub_block;
        // The run being gathered: its start and device.
        let mut cur: Option<(u64, bool)> = None;
        let mut pos = offset;
        while pos < end {
            let r = self.geo.region_of(pos);
            let (rs, re) = (self.geo.region_start(r), self.geo.region_end(r).min(end));
            match self.md.region_state(r) {
                RegionState::Hydrated => next_run(&mut cur, pos, true, &mut f)?,
                RegionState::Unhydrated => next_run(&mut cur, pos, false, &mut f)?,
                RegionState::Partial(mask) => {
                    let mut p = pos;
                    while p < re {
                        let b = (p - rs) / sub;
                        next_run(&mut cur, p, mask & (1 << b) != 0, &mut f)?;
                        p = (rs + (b + 1) * sub).min(re);
                    }
                }
            }
            pos = re;
        }
        if let Some((s, d)) = cur {
            f(s, end, d)?;
        }
        Ok(())
    }

    /// Where all of `[offset, end)` lives: `Some(true)` the destination,
    /// `Some(false)` the source, `None` both.
    pub(super) fn one_device(&self, offset: u64, end: u64) -> Option<bool> {
        let sub = self.md.partial_spec().sub_block;
        let mut dev = None;
        let mut pos = offset;
        while pos < end {
            let r = self.geo.region_of(pos);
            let (rs, re) = (self.geo.region_start(r), self.geo.region_end(r).min(end));
            let here = match self.md.region_state(r) {
                RegionState::Hydrated => true,
                RegionState::Unhydrated => false,
                RegionState::Partial(mask) => {
                    let (b0, b1) = ((pos - rs) / sub, (re - rs).div_ceil(sub));
                    let bits = full_mask(b1 - b0) << b0;
                    match mask & bits {
                        m if m == bits => true,
                        0 => false,
                        _ => return None,
                    }
                }
            };
            if dev.replace(here).is_some_and(|d| d != here) {
                return None;
            }
            pos = re;
        }
        dev
    }

    /// The plan of a write of `[pos, piece_end)` into unhydrated region `r`
    /// (the caller holds its lock) that writes sub-blocks instead of copying the
    /// region; `None` when the store has no table, or when the region has no slot
    /// and the table is full (the region is copied whole then).
    pub(super) fn sub_block_plan(&self, r: u64, pos: u64, piece_end: u64) -> Option<SubBlockPlan> {
        let spec = self.md.partial_spec();
        if spec.slots == 0 {
            return None;
        }
        let mask = self.md.written_mask(r);
        if mask.is_none() && self.md.partial_count() >= spec.slots {
            return None;
        }
        let mask = mask.unwrap_or(0);
        let sub = spec.sub_block;
        let (rs, re) = (self.geo.region_start(r), self.geo.region_end(r));
        let (b0, b1) = ((pos - rs) / sub, (piece_end - rs).div_ceil(sub));
        let sub_start = |b: u64| rs + b * sub;
        let sub_end = |b: u64| (rs + (b + 1) * sub).min(re);
        let written = |b: u64| mask & (1 << b) != 0;
        // An edge sub-block the write covers in part is completed from the
        // source, unless the guest wrote it before (its other bytes are on the
        // destination already).
        let start = if written(b0) { pos } else { sub_start(b0) };
        let end = if written(b1 - 1) {
            piece_end
        } else {
            sub_end(b1 - 1)
        };
        let bits = full_mask(b1 - b0) << b0;
        Some(SubBlockPlan {
            start,
            end,
            bits,
            mask,
        })
    }

    /// The synchronous write of `plan` (region `r` locked by the caller): the
    /// destination write of the sub-blocks, then their mask bits.
    pub(super) fn write_sub_blocks(
        &self,
        r: u64,
        plan: SubBlockPlan,
        pos: u64,
        piece_end: u64,
        offset: u64,
        payload: Payload<'_, '_>,
    ) -> Result<()> {
        if plan.fills(pos, piece_end) {
            let src = self.source_dev(r)?;
            let (s, e) = (plan.start, plan.end);
            super::iov::with_scratch((e - s) as usize, |buf| {
                let (a, b) = ((pos - s) as usize, (piece_end - s) as usize);
                if a > 0 {
                    src.read_at(&mut buf[..a], s).map_err(EngineError::Source)?;
                }
                if piece_end < e {
                    src.read_at(&mut buf[b..], piece_end)
                        .map_err(EngineError::Source)?;
                }
                match payload {
                    Payload::Data(bufs) => {
                        super::iov::copy_from_iov(bufs, (pos - offset) as usize, &mut buf[a..b])
                    }
                    Payload::Zeroes => buf[a..b].fill(0),
                }
                self.dest.write_at(buf, s).map_err(EngineError::Dest)
            })?;
            self.dest_written();
        } else {
            self.dest_write(pos, piece_end - pos, offset, payload)?;
        }
        super::counters::bump(&self.stats().partial_writes, 1);
        self.mark_sub_blocks(r, plan.mask, plan.bits)
    }

    /// Records sub-blocks `bits` of region `r` (locked by the caller) as
    /// written, after their data write; when the table has no room left, copies
    /// what the region still lacks and marks it hydrated instead.
    pub(super) fn mark_sub_blocks(&self, r: u64, mask: u64, bits: u64) -> Result<()> {
        match self
            .md
            .mark_written(r, bits)
            .map_err(EngineError::Metadata)?
        {
            Marked::Partial(_) | Marked::Hydrated => Ok(()),
            Marked::NoRoom => {
                self.fill_missing(r, mask | bits)?;
                super::counters::bump(&self.stats().guest_hydrations, 1);
                self.md.set_hydrated(r).map_err(EngineError::Metadata)?;
                Ok(())
            }
        }
    }

    /// Copies from the source the sub-blocks of region `r` (locked by the caller)
    /// that `mask` lacks, in runs. Returns the bytes read.
    pub(super) fn fill_missing(&self, r: u64, mask: u64) -> Result<u64> {
        let sub = self.md.partial_spec().sub_block;
        let src = self.source_dev(r)?;
        let (rs, re) = (self.geo.region_start(r), self.geo.region_end(r));
        let n = (re - rs).div_ceil(sub);
        let mut buf = Vec::new();
        let mut read = 0;
        let mut b = 0;
        while b < n {
            if mask & (1 << b) != 0 {
                b += 1;
                continue;
            }
            let first = b;
            while b < n && mask & (1 << b) == 0 {
                b += 1;
            }
            let (a, e) = (rs + first * sub, (rs + b * sub).min(re));
            self.copy_from_source(src.as_ref(), a, e - a, &mut buf)?;
            read += e - a;
        }
        Ok(read)
    }
}
