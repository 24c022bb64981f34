//! Direct I/O permits ([`crate::storage::aio`]): which reads and writes the
//! engine lets a caller (the virtio front's io_uring engine) issue itself, and
//! their accounting.
//!
//! Invariant: a permit is granted only for a range whose data lives on one
//! device and that nothing but the guest writes; a direct write that may have
//! landed counts as a destination write before its requester is told, so the
//! next flush flushes the destination.
use std::sync::atomic::Ordering;

use super::counters::bump;
use super::Engine;
use crate::storage::aio::{DirectIo, DirectIoAccount, IoTarget};

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
            let (first, last) = (
                self.geo.region_of(offset),
                self.geo.region_of(offset + len - 1),
            );
            let hydrated = self.md.is_hydrated(first);
            if !(first + 1..=last).all(|r| self.md.is_hydrated(r) == hydrated) {
                return None;
            }
            match (hydrated, write) {
                (true, _) => &self.dest,
                (false, false) => self.source.as_ref()?,
                (false, true) => return None,
            }
        };
        let target = IoTarget::of(dev)?;
        Some(DirectIo::grant(self, target, write, len))
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
