//! Direct I/O permits ([`crate::storage::aio`]): which reads and writes the
//! engine lets a caller (the virtio front's io_uring engine) issue itself, and
//! their accounting.
//!
//! Invariants:
//! - a permit is granted only for a range whose data lives on one device and that
//!   nothing but the guest writes; a direct write that may have landed counts as a
//!   destination write before its requester is told, so the next flush flushes the
//!   destination;
//! - a [`RegionCopy`] (a guest write into an unhydrated region, copied by the caller's
//!   queue) holds the region's lock from grant to end, and sets the region's bit only
//!   when it ends with the destination write done, before its requester is told: the
//!   order of [`Engine::write`]'s copies, in steps.
use std::sync::atomic::Ordering;

use super::counters::bump;
use super::locks::RegionGuard;
use super::{Engine, EngineError, Result};
use crate::metadata::Mode;
use crate::storage::aio::{DirectIo, DirectIoAccount, IoTarget};
use crate::storage::AlignedBuf;

impl Engine {
    /// A permit to read or write `[offset, offset + len)` directly (the io_uring
    /// path of the virtio front), instead of calling [`Engine::read`] /
    /// [`Engine::write`], on the permit's target at the same offset.
    ///
    /// - A write whose regions are all hydrated goes to the destination: such a
    ///   region's data lives there, it is never locked, and nothing but the guest
    ///   writes it again (a set bit is never cleared).
    /// - A read whose regions are all hydrated reads the destination; a read whose
    ///   regions are all unhydrated reads the source, as [`Engine::read`] does
    ///   (reads never copy or wait, and the source never changes: a region that
    ///   becomes hydrated meanwhile holds the same data on both).
    ///
    /// Everything else returns `None` and goes through the engine: writes to
    /// unhydrated regions (which copy, lock and mark), reads over both kinds,
    /// invalid ranges, fail mode, devices that take no direct requests.
    ///
    /// The permit counts the request as in flight until it ends; its
    /// [`DirectIo::finish`] counts it, and a write (finished, failed or dropped)
    /// counts as a destination write, so the next flush flushes the destination.
    pub fn direct_io(&self, write: bool, offset: u64, len: u64) -> Option<DirectIo<'_>> {
        if len == 0 || self.check(offset, len).is_err() || self.check_mode().is_err() {
            return None;
        }
        let dev = if self.md.all_hydrated() {
            &self.dest
        } else {
            // Written sub-blocks of a partly written region are the destination's
            // as a hydrated region is: nothing but the guest writes them again.
            match (self.one_device(offset, offset + len)?, write) {
                (true, _) => &self.dest,
                (false, false) => self.source.as_ref()?,
                (false, true) => return None,
            }
        };
        let target = IoTarget::of(dev)?;
        Some(DirectIo::grant(self, target, write, len))
    }

    /// A copy of the one unhydrated region that `[offset, offset + len)` (a guest
    /// write) falls in, for the caller to perform on its own queue: read the region
    /// from [`RegionCopy::source`] into [`RegionCopy::buffer`] (unless the write covers
    /// it all), then write to [`RegionCopy::dest`] at [`RegionCopy::start`] the buffer's
    /// bytes before [`RegionCopy::covered`], the guest's data, and the buffer's bytes
    /// after it; then [`RegionCopy::finish`] before the guest is told. What
    /// [`Engine::write`] does in one call, without blocking the caller's queue.
    ///
    /// In a version 2 store the "region" copied is only the sub-blocks the write
    /// touches (read from the source only for an edge sub-block it covers in part
    /// and the guest never wrote), and `finish` marks them written.
    ///
    /// `None` (the caller goes through [`Engine::write`]): a write over more than one
    /// region, into a hydrated region, not aligned to the devices' alignment, a
    /// region being copied or locked by someone else, fail or read-only mode,
    /// devices that take no direct requests.
    pub fn region_copy(&self, offset: u64, len: u64) -> Option<RegionCopy<'_>> {
        if len == 0
            || self.md.all_hydrated()
            || self.check(offset, len).is_err()
            || self.md.mode() != Mode::Rw
        {
            return None;
        }
        let r = self.geo.region_of(offset);
        if self.geo.region_of(offset + len - 1) != r || self.md.is_hydrated(r) {
            return None;
        }
        let source = IoTarget::of(self.source.as_ref()?)?;
        let dest = IoTarget::of(&self.dest)?;
        let (rs, re) = (self.geo.region_start(r), self.geo.region_end(r));
        let a = (source.align() as u64).max(dest.align() as u64).max(1);
        if [offset, len, rs, re].iter().any(|v| v % a != 0) {
            return None;
        }
        let guard = self.locks.try_lock(r)?;
        if self.md.is_hydrated(r) || self.md.mode() != Mode::Rw {
            // Hydrated, or the metadata failed, between the look and the lock.
            return None;
        }
        let whole = offset == rs && len == re - rs;
        let plan = if whole {
            None
        } else {
            self.sub_block_plan(r, offset, offset + len)
        };
        let (start, end) = plan.map_or((rs, re), |p| (p.start, p.end));
        if start % a != 0 || end % a != 0 {
            return None;
        }
        let buf = if whole || plan.is_some_and(|p| !p.fills(offset, offset + len)) {
            None
        } else {
            // No memory for the buffer: the synchronous path's scratch buffer will do.
            Some(AlignedBuf::try_zeroed((end - start) as usize)?)
        };
        #[cfg(feature = "test-hooks")]
        if self.early_copy_bits.load(Ordering::SeqCst) {
            // The mutation: the bits before the data.
            match plan {
                Some(p) => {
                    self.md.mark_written(r, p.bits).ok()?;
                }
                None => {
                    self.md.set_hydrated(r).ok()?;
                }
            }
        }
        Some(RegionCopy {
            engine: self,
            region: r,
            start,
            covered: ((offset - start) as usize, (offset + len - start) as usize),
            buf,
            sub_blocks: plan.map(|p| (p.mask, p.bits)),
            source,
            permit: DirectIo::grant(self, dest, true, len),
            _guard: guard,
        })
    }

    /// Test-only mutation: a [`RegionCopy`] marks its region hydrated when it is
    /// granted, before its destination write, instead of when it ends. Exists so
    /// that the crash suite's copy workloads can fail.
    #[cfg(feature = "test-hooks")]
    pub fn set_early_copy_bits(&self, on: bool) {
        self.early_copy_bits.store(on, Ordering::SeqCst);
    }

    /// Test-only mutation: direct writes are not counted as destination writes,
    /// so a flush after them may skip the destination. Exists so the crash
    /// suite's direct-I/O workloads can fail.
    #[cfg(feature = "test-hooks")]
    pub fn set_uncounted_direct_writes(&self, on: bool) {
        self.uncounted_direct_writes.store(on, Ordering::SeqCst);
    }
}

/// The accounting of [`Engine::direct_io`]'s permits: what [`Engine::read`] and
/// [`Engine::write`] count for themselves.
impl DirectIoAccount for Engine {
    fn started(&self) {
        self.stats().in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn finished(&self, write: bool, len: u64, outcome: Option<bool>, maybe_written: bool) {
        let st = self.stats();
        #[cfg(feature = "test-hooks")]
        let maybe_written = maybe_written && !self.uncounted_direct_writes.load(Ordering::SeqCst);
        if maybe_written {
            // Before the requester is told: the next flush covers this write.
            self.dest_written();
        }
        if let Some(ok) = outcome {
            if write {
                bump(&st.writes, 1);
                bump(&st.bytes_written, len);
            } else {
                bump(&st.reads, 1);
                bump(&st.bytes_read, len);
            }
            if !ok {
                bump(&st.errors, 1);
                bump(
                    if write {
                        &st.write_errors
                    } else {
                        &st.read_errors
                    },
                    1,
                );
            }
        }
        st.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A guest write into an unhydrated region, copied by the caller: see
/// [`Engine::region_copy`]. Holds the region locked until it is dropped; dropped
/// without [`RegionCopy::finish`], the region stays unhydrated.
#[must_use = "a region copy's outcome must be reported with `finish`"]
pub struct RegionCopy<'e> {
    engine: &'e Engine,
    region: u64,
    start: u64,
    covered: (usize, usize),
    /// The region (or the sub-blocks) as the source has it, with the guest's data
    /// written over it by the destination write's iovecs; `None` when nothing is
    /// read.
    buf: Option<AlignedBuf>,
    /// Sub-blocks only: the region's written mask before, and the sub-blocks
    /// written; `None`: the whole region, hydrated at the end.
    sub_blocks: Option<(u64, u64)>,
    source: IoTarget,
    /// The destination write's accounting (in flight, and a destination write).
    permit: DirectIo<'e>,
    _guard: RegionGuard<'e>,
}

impl RegionCopy<'_> {
    /// Where the region is read from.
    pub fn source(&self) -> &IoTarget {
        &self.source
    }

    /// Where the region is written.
    pub fn dest(&self) -> &IoTarget {
        self.permit.target()
    }

    /// The first byte written (on both devices): the region's, or its first
    /// sub-block's the write touches.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The guest's bytes within what is written, as offsets from its start.
    pub fn covered(&self) -> (usize, usize) {
        self.covered
    }

    /// The length read first from [`RegionCopy::start`], if any (the write covers
    /// part of the region, or of an unwritten edge sub-block).
    pub fn read_len(&self) -> Option<u64> {
        self.buf.as_ref().map(|b| b.len() as u64)
    }

    /// The buffer the region is read into, [`RegionCopy::read_len`] long, aligned
    /// for `O_DIRECT`; null when nothing is read. It lives as long as the copy: the caller's queue may
    /// read into it and write from it until the copy ends.
    pub fn buffer(&mut self) -> *mut u8 {
        self.buf
            .as_mut()
            .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr())
    }

    /// Fills `out` with the destination write's iovecs: the buffer's bytes before the
    /// guest's, then what `guest` appends (the guest's data, exactly the covered
    /// bytes), then the buffer's bytes after them. Returns `false`, with `out` unusable,
    /// when `guest` does (its buffers cannot be used).
    pub fn write_iovecs(
        &mut self,
        out: &mut Vec<libc::iovec>,
        guest: impl FnOnce(&mut Vec<libc::iovec>) -> bool,
    ) -> bool {
        let (head, tail) = self.covered;
        let buf = self.buffer();
        out.clear();
        if head > 0 {
            out.push(libc::iovec {
                iov_base: buf.cast(),
                iov_len: head,
            });
        }
        if !guest(out) {
            return false;
        }
        let rest = self.read_len().map_or(0, |len| len as usize - tail);
        if rest > 0 {
            out.push(libc::iovec {
                // SAFETY: `tail` < the buffer's length (the region's): pointer
                // arithmetic inside the copy's buffer, not dereferenced here.
                iov_base: unsafe { buf.add(tail) }.cast(),
                iov_len: rest,
            });
        }
        true
    }

    /// Gives the copy back without issuing any of it: the region stays as it was (the
    /// caller sends the write through [`Engine::write`]).
    pub fn cancel(self) {
        self.permit.cancel();
    }

    /// The copy ended: `ok` when the read (if any) and the destination write moved
    /// every byte. Counts the write as a destination write, then, on success, marks
    /// the region hydrated; the guest may be told only after this returns. Fails when
    /// the bit cannot be set (the metadata failed): the write's data is on the
    /// destination, but the region still reads from the source.
    pub fn finish(self, ok: bool) -> Result<()> {
        let RegionCopy {
            engine,
            region,
            permit,
            buf,
            sub_blocks,
            _guard,
            ..
        } = self;
        permit.finish(ok);
        if !ok {
            return Ok(());
        }
        #[cfg(feature = "test-hooks")]
        if engine.early_copy_bits.load(Ordering::SeqCst) {
            return Ok(());
        }
        if let Some((mask, bits)) = sub_blocks {
            bump(&engine.stats().partial_writes, 1);
            return engine.mark_sub_blocks(region, mask, bits);
        }
        if buf.is_some() {
            bump(&engine.stats().guest_hydrations, 1);
        } else {
            bump(&engine.stats().overwrites, 1);
        }
        engine
            .md
            .set_hydrated(region)
            .map(|_| ())
            .map_err(EngineError::Metadata)
    }
}

impl std::fmt::Debug for RegionCopy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionCopy")
            .field("region", &self.region)
            .field("covered", &self.covered)
            .field("read", &self.buf.is_some())
            .field("sub_blocks", &self.sub_blocks)
            .finish()
    }
}
