// SPDX-License-Identifier: Apache-2.0

//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL`, protocol feature
//! `LOG_SHMFD`).
//!
//! While a guest migrates, its VMM copies guest RAM page by page and copies again the
//! pages written after it copied them. The pages this daemon writes (read data, status
//! bytes, the used ring) are invisible to the VMM, so the backend marks them in a log
//! the frontend shares with `VHOST_USER_SET_LOG_BASE`: one bit per 4 KiB guest page.
//!
//! This module owns that marking, and keeps one rule: **a page the daemon wrote is marked
//! after the write and before the request is retired.** The VMM stops the device
//! (GET_VRING_BASE, which waits for every popped request, see [`super::device`]) before
//! its last pass over the log, so a mark made before retirement is never missed; a mark
//! made before the data landed could be read and cleared by a pass that then copies the
//! old page.
//!
//! - [`DirtyLog`] is the vm-memory bitmap of every guest memory region. vm-memory marks
//!   through it on its own writes (`write_obj` of status bytes and used-ring entries by
//!   virtio-queue). It wraps vhost-user-backend's [`BitmapMmapRegion`] (which maps the
//!   shared log; vhost-user-backend installs it on SET_LOG_BASE) with an on/off switch,
//!   because vhost-user-backend 0.24 keeps marking after the frontend clears `LOG_ALL`
//!   (its TODO in `set_log_base`) and takes a read lock on every marked access even when
//!   no log was ever set.
//! - [`mark_written`] marks guest buffers the daemon wrote behind vm-memory's back: data
//!   read through `IoSliceMut`s and by io_uring.
//! - [`set_logging`] is the switch, thrown when the frontend's SET_FEATURES sets or
//!   clears `LOG_ALL`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::request::{GuestMemory, GuestSegment};

/// The dirty-page bitmap of one guest memory region (or a slice of one): marks go to the
/// frontend's shared log while logging is on, and nowhere otherwise.
#[derive(Clone, Debug, Default)]
pub struct DirtyLog {
    /// The shared log, once the frontend sent one (vhost-user-backend installs it).
    log: BitmapMmapRegion,
    /// Whether `LOG_ALL` is acked: one switch per region, shared by its slices.
    on: Arc<AtomicBool>,
}

impl DirtyLog {
    fn logging(&self) -> bool {
        // Acquire pairs with the Release of `set_logging`: the switch is thrown before
        // SET_FEATURES is answered, and the frontend starts its first copy pass after that.
        self.on.load(Ordering::Acquire)
    }
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.logging() {
            self.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.logging() && self.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> DirtyLogSlice<'_> {
        DirtyLogSlice { log: self, offset }
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = DirtyLogSlice<'a>;
}

/// A part of a region's [`DirtyLog`], from `offset` on. It borrows the region's log:
/// vm-memory slices the bitmap on every guest memory access (ring entries, descriptors,
/// headers, status bytes), and a slice that cloned the log's two `Arc`s cost four atomic
/// operations each time (4 KiB reads took 6.9 CPU-µs each with such slices and 4.1
/// without, docs/benchmarks.md, issue 16).
#[derive(Clone, Copy, Debug)]
pub struct DirtyLogSlice<'a> {
    log: &'a DirtyLog,
    offset: usize,
}

impl Bitmap for DirtyLogSlice<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // As vm-memory's own slices: an overflow only marks some other page.
        self.log.mark_dirty(self.offset.wrapping_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(self.offset.wrapping_add(offset))
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtyLogSlice {
            log: self.log,
            offset: self.offset.wrapping_add(offset),
        }
    }
}

impl<'b> WithBitmapSlice<'b> for DirtyLogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for DirtyLogSlice<'_> {}

impl NewBitmap for DirtyLog {
    fn with_len(len: usize) -> Self {
        DirtyLog {
            log: BitmapMmapRegion::with_len(len),
            on: Arc::default(),
        }
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.log.replace(bitmap);
    }
}

/// Turns marking on or off in every region of `mem`. Returns whether it changed anything.
pub fn set_logging(mem: &GuestMemory, on: bool) -> bool {
    let mut changed = false;
    for region in mem.iter() {
        changed |= region.bitmap().log.on.swap(on, Ordering::AcqRel) != on;
    }
    changed
}

/// Marks the guest buffers `segs` as written by the daemon (a no-op unless logging is on).
/// Segments outside guest memory are skipped: the request that named them was refused.
pub fn mark_written(mem: &GuestMemory, segs: &[GuestSegment]) {
    for seg in segs {
        for vs in mem.get_slices(seg.addr, seg.len as usize).flatten() {
            vs.bitmap().mark_dirty(0, vs.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    // Marks reaching the shared log need vhost-user-backend's SET_LOG_BASE (it alone can
    // map a log): tests/front/dirty_log.rs drives that through a frontend.

    #[test]
    fn the_switch_covers_every_region_and_slice() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(1 << 20), 64 << 10),
        ])
        .unwrap();
        let region = mem.find_region(GuestAddress(1 << 20)).unwrap().bitmap();
        let slice = region.slice_at(4096);
        assert!(!slice.log.logging());
        assert!(set_logging(&mem, true));
        assert!(
            !set_logging(&mem, true),
            "a second switch changed something"
        );
        assert!(
            slice.log.logging(),
            "a slice does not follow its region's switch"
        );
        assert!(set_logging(&mem, false));
        assert!(!slice.log.logging());
        // Off and without a log, marking is a no-op, outside memory too.
        mark_written(
            &mem,
            &[GuestSegment {
                addr: GuestAddress(0x80_0000),
                len: 4096,
            }],
        );
    }
}
