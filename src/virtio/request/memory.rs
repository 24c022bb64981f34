//! Request buffers in guest memory: gathering and scattering small buffers
//! (header, segments, serial), and turning data buffers into `IoSlice`s or
//! iovecs over guest memory with no copy.
//!
//! Invariant: every slice or iovec handed out lies inside one guest memory
//! region; anything else is a [`RequestError`], never a panic.

use std::io::{IoSlice, IoSliceMut};

use smallvec::SmallVec;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use super::{GuestMemory, GuestSegment, RequestError, Segments};

pub(super) fn total_len(segs: &[GuestSegment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The segments after the first `n` bytes.
pub(super) fn skip(segs: &[GuestSegment], mut n: u64) -> Segments {
    let mut out = Segments::new();
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        // n < len <= u32::MAX; the address was checked to be in memory with its length.
        let cut = u32::try_from(n).unwrap_or(s.len);
        out.push(GuestSegment {
            addr: s.addr.unchecked_add(u64::from(cut)),
            len: s.len - cut,
        });
        n = 0;
    }
    out
}

/// Copy the first `out.len()` bytes of `segs` out of guest memory (small metadata only).
pub(super) fn gather(
    mem: &GuestMemory,
    segs: &[GuestSegment],
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut pos = 0usize;
    for s in segs {
        if pos == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - pos);
        mem.read_slice(&mut out[pos..pos + n], s.addr)
            .map_err(|_| RequestError::MemoryAccess)?;
        pos += n;
    }
    if pos == out.len() {
        Ok(())
    } else {
        Err(RequestError::MemoryAccess)
    }
}

/// Copy `src` into the device-writable `segs` (GET_ID). Returns the bytes written.
pub fn scatter(mem: &GuestMemory, segs: &[GuestSegment], src: &[u8]) -> Result<u32, RequestError> {
    let mut pos = 0usize;
    for s in segs {
        if pos == src.len() {
            break;
        }
        let n = (s.len as usize).min(src.len() - pos);
        mem.write_slice(&src[pos..pos + n], s.addr)
            .map_err(|_| RequestError::MemoryAccess)?;
        pos += n;
    }
    u32::try_from(pos).map_err(|_| RequestError::MemoryAccess)
}

/// `IoSlice`s over the guest buffers of a write, without copying.
pub fn guest_io_slices<'m>(
    mem: &'m GuestMemory,
    segs: &[GuestSegment],
) -> Result<SmallVec<[IoSlice<'m>; 4]>, RequestError> {
    let mut out = SmallVec::new();
    for seg in segs {
        let mut covered = 0usize;
        for vs in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let vs = vs.map_err(|_| outside(seg))?;
            let guard = vs.ptr_guard();
            // SAFETY: `guard` points at `guard.len()` bytes of a guest memory region that
            // vm-memory mapped and checked to lie inside the region (get_slices). The
            // mapping lives as long as the `GuestMemoryMmap` borrowed for 'm (the caller
            // holds a load guard of the atomic memory for the whole request), and with the
            // mmap backend (no xen feature) the guard holds no mapping of its own, so
            // dropping it does not unmap anything. The bytes may be changed by the guest
            // at any time; they are only handed to the backend as raw data to copy or
            // write, never interpreted by Rust code.
            let s = unsafe { std::slice::from_raw_parts(guard.as_ptr(), guard.len()) };
            covered += s.len();
            out.push(IoSlice::new(s));
        }
        if covered != seg.len as usize {
            return Err(outside(seg));
        }
    }
    Ok(out)
}

/// `IoSliceMut`s over the guest buffers of a read, without copying. Refuses buffers that
/// overlap each other, so no two mutable slices alias.
pub fn guest_io_slices_mut<'m>(
    mem: &'m GuestMemory,
    segs: &[GuestSegment],
) -> Result<SmallVec<[IoSliceMut<'m>; 4]>, RequestError> {
    let mut out = SmallVec::new();
    let mut spans: SmallVec<[(usize, usize); 4]> = SmallVec::new();
    for seg in segs {
        let mut covered = 0usize;
        for vs in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let vs = vs.map_err(|_| outside(seg))?;
            let guard = vs.ptr_guard_mut();
            spans.push((guard.as_ptr() as usize, guard.len()));
            // SAFETY: as in `guest_io_slices`: the pointer and length come from vm-memory's
            // bounds-checked slice of a mapping that outlives 'm. The mapping is writable
            // (guest RAM is mapped read-write). Overlaps between the slices of this request
            // are refused below before any slice is used, so the mutable slices handed out
            // do not alias each other. The guest may access the same bytes concurrently;
            // the backend only stores raw bytes into them.
            let s = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), guard.len()) };
            covered += s.len();
            out.push(IoSliceMut::new(s));
        }
        if covered != seg.len as usize {
            return Err(outside(seg));
        }
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        // start + len cannot overflow: it is the end of a live mapping.
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(RequestError::OverlappingBuffers);
        }
    }
    Ok(out)
}

/// Appends `iovec`s over the guest buffers `segs` to `out` (for the io_uring path, which
/// hands raw addresses to the kernel). Fails like [`guest_io_slices`], and with
/// [`RequestError::TooManyDescriptors`] when more than `max` iovecs would be needed.
///
/// No Rust reference to guest memory is formed, so buffers that overlap each other are
/// harmless here: the kernel stores the data in the order of the list.
pub fn guest_iovecs(
    mem: &GuestMemory,
    segs: &[GuestSegment],
    out: &mut Vec<libc::iovec>,
    max: usize,
) -> Result<(), RequestError> {
    for seg in segs {
        let mut covered = 0usize;
        for vs in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let vs = vs.map_err(|_| outside(seg))?;
            if out.len() >= max {
                return Err(RequestError::TooManyDescriptors(max));
            }
            // The pointer is only passed on, never dereferenced here: see the caller's
            // SAFETY comment on how long the mapping lives.
            let guard = vs.ptr_guard_mut();
            covered += guard.len();
            out.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: guard.len(),
            });
        }
        if covered != seg.len as usize {
            return Err(outside(seg));
        }
    }
    Ok(())
}

pub(super) fn outside(seg: &GuestSegment) -> RequestError {
    RequestError::OutsideMemory {
        addr: seg.addr.raw_value(),
        len: seg.len,
    }
}
