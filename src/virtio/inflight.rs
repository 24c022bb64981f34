// SPDX-License-Identifier: Apache-2.0

//! In-flight tracking across daemon restarts (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`).
//!
//! QEMU keeps a shared memory area for the backend (GET_INFLIGHT_FD creates it, the
//! backend's restarts get it back with SET_INFLIGHT_FD) in which the backend records, per
//! queue, which descriptor heads it popped and has not completed yet. A restarted daemon
//! resubmits exactly those, in the order they were popped, and continues from the avail
//! index after them. Without it, QEMU rewinds each queue to its used index, which is exact
//! only if every queue completes in order.
//!
//! The area's layout is the one of the vhost-user specification ("Inflight I/O tracking",
//! split rings), so that any backend that follows it could take over from this one:
//! per queue, 64-byte aligned, a header `{features: u64, version: u16, desc_num: u16,
//! last_batch_head: u16, used_idx: u16}` and `desc_num` entries `{inflight: u8,
//! padding: [u8; 5], next: u16, counter: u64}`.
//!
//! Invariant kept here, in this order for every request (the [`QueueLog`] methods):
//! 1. when it is popped: its entry's counter is set, then `inflight = 1`;
//! 2. before its used entry is published: `last_batch_head = head`;
//! 3. after the used index moved: `inflight = 0`, then `used_idx` = the new used index.
//!
//! So after a death anywhere, the entries with `inflight = 1` are the requests popped and
//! not completed, except the one whose completion was published between steps 2 and 3,
//! which [`QueueLog::recover`] recognises by `used_idx` lagging the ring's used index.
//! Everything in the area comes from the frontend and is validated: a bad area is
//! refused, never trusted into an out-of-bounds access.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestRegionMmap, VolatileMemory,
    VolatileSlice,
};

use super::dirty::DirtyLog;
use super::request::{GuestMemory, ParseLimits, ParsedChain};

/// The area's format version (the specification's).
pub const VERSION: u16 = 1;
/// Each queue's part starts at a multiple of this.
const ALIGNMENT: u64 = 64;
/// Bytes of a queue's header.
const HEADER_LEN: u64 = 16;
/// Bytes of one descriptor's entry.
const ENTRY_LEN: u64 = 16;

/// Errors of the in-flight area.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend's description of the area is impossible for this device.
    #[error("bad in-flight area from the frontend: {0}")]
    BadArea(String),
    /// Creating or mapping the area failed.
    #[error("cannot set up the in-flight area")]
    Map(#[source] io::Error),
}

/// Bytes of one queue's part of the area, for rings of `queue_size` descriptors.
pub fn queue_region_len(queue_size: u16) -> u64 {
    (HEADER_LEN + ENTRY_LEN * u64::from(queue_size)).div_ceil(ALIGNMENT) * ALIGNMENT
}

/// One connection's in-flight area, mapped.
#[derive(Debug)]
pub struct InflightArea {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightArea {
    /// A new, zeroed area for `num_queues` rings of `queue_size` (GET_INFLIGHT_FD): the
    /// area and the file the frontend keeps.
    pub fn create(
        (num_queues, queue_size): (u16, u16),
        limits: (u16, u16),
    ) -> Result<(InflightArea, File), InflightError> {
        check_shape(num_queues, queue_size, limits)?;
        let len = u64::from(num_queues) * queue_region_len(queue_size);
        let file = memfd(len).map_err(InflightError::Map)?;
        let dup = file.try_clone().map_err(InflightError::Map)?;
        let area = Self::map(dup, 0, len, num_queues, queue_size)?;
        Ok((area, file))
    }

    /// The area the frontend gives back (SET_INFLIGHT_FD), as a previous backend left it.
    /// `max_queues` and `max_queue_size` are this device's limits.
    pub fn open(
        file: File,
        (mmap_offset, mmap_size): (u64, u64),
        (num_queues, queue_size): (u16, u16),
        limits: (u16, u16),
    ) -> Result<InflightArea, InflightError> {
        check_shape(num_queues, queue_size, limits)?;
        let need = u64::from(num_queues) * queue_region_len(queue_size);
        if mmap_size < need {
            return Err(InflightError::BadArea(format!(
                "{mmap_size} bytes for {num_queues} queues of {queue_size}, which need {need}"
            )));
        }
        let file_len = file.metadata().map_err(InflightError::Map)?.len();
        if mmap_offset
            .checked_add(need)
            .is_none_or(|end| end > file_len)
        {
            return Err(InflightError::BadArea(format!(
                "{need} bytes at offset {mmap_offset} of a file of {file_len}"
            )));
        }
        Self::map(file, mmap_offset, need, num_queues, queue_size)
    }

    fn map(
        file: File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<InflightArea, InflightError> {
        let len = usize::try_from(len).map_err(|_| InflightError::BadArea("too large".into()))?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), len)
            .map_err(|e| InflightError::Map(io::Error::other(e)))?;
        Ok(InflightArea {
            map,
            num_queues,
            queue_size,
        })
    }

    /// The area's length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.map.size() as u64
    }

    /// Queue `index`'s log, if the area has one for it.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueLog> {
        if index >= self.num_queues {
            return None;
        }
        let len = queue_region_len(self.queue_size);
        Some(QueueLog {
            area: Arc::clone(self),
            base: usize::try_from(u64::from(index) * len).ok()?,
            len: usize::try_from(len).ok()?,
            desc_num: self.queue_size,
            counter: 0,
        })
    }
}

/// Refuses an area for more queues than the device has, or for rings it cannot have.
fn check_shape(
    num_queues: u16,
    queue_size: u16,
    (max_queues, max_queue_size): (u16, u16),
) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > max_queues {
        return Err(InflightError::BadArea(format!(
            "{num_queues} queues (this device has {max_queues})"
        )));
    }
    if !queue_size.is_power_of_two() || queue_size > max_queue_size {
        return Err(InflightError::BadArea(format!(
            "queue size {queue_size} (a power of two up to {max_queue_size})"
        )));
    }
    Ok(())
}

/// The memfd flags of an area: close-on-exec, and seals allowed.
pub const MEMFD_FLAGS: libc::c_uint = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;

/// A memfd of `len` zero bytes, sealed against shrinking (and against new seals): the
/// frontend keeps it, and a shorter file would turn our stores into SIGBUS.
fn memfd(len: u64) -> io::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use std::os::fd::FromRawFd;
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"vhost-clone-inflight".as_ptr(), MEMFD_FLAGS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL),
    )?;
    Ok(file)
}

/// What a queue does first after a (re)start: the heads to run again, oldest first, and
/// how many chains of the avail ring were popped before (the queue's next avail index
/// is the used index plus this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads popped by a previous backend (or before a stop) and never completed, in the
    /// order they were popped.
    pub resubmit: Vec<u16>,
}

/// One queue's part of the in-flight area.
#[derive(Debug)]
pub struct QueueLog {
    area: Arc<InflightArea>,
    base: usize,
    len: usize,
    desc_num: u16,
    /// The next pop's counter.
    counter: u64,
}

// Offsets in a queue's header.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
// Offsets in an entry.
const INFLIGHT_AT: usize = 0;
const COUNTER_AT: usize = 8;

impl QueueLog {
    /// The queue's part of the area. Always `Some`: `InflightArea::open` mapped
    /// `num_queues` parts and `queue` only hands out queues below that; the accessors
    /// do nothing rather than panic if it were not so.
    fn slice(&self) -> Option<VolatileSlice<'_>> {
        self.area.map.get_slice(self.base, self.len).ok()
    }

    fn entry(head: u16) -> usize {
        (HEADER_LEN + ENTRY_LEN * u64::from(head)) as usize
    }

    fn load16(&self, at: usize) -> u16 {
        self.slice()
            .and_then(|s| s.load(at, Ordering::Acquire).ok())
            .unwrap_or(0)
    }

    fn store16(&self, at: usize, v: u16) {
        if let Some(s) = self.slice() {
            let _ = s.store(v, at, Ordering::Release);
        }
    }

    fn set_inflight(&self, head: u16, on: bool) {
        if let Some(s) = self.slice() {
            let _ = s.store(
                u8::from(on),
                Self::entry(head) + INFLIGHT_AT,
                Ordering::Release,
            );
        }
    }

    /// Descriptors this queue's part of the area can record (the rings it was made for).
    pub fn capacity(&self) -> u16 {
        self.desc_num
    }

    /// Starts the queue's part afresh: nothing in flight, the used index `used_idx`.
    /// `last_batch_head` is set out of range, so that a death before the first
    /// completion clears no entry (spdk#3766).
    pub fn reset(&mut self, used_idx: u16) {
        for head in 0..self.desc_num {
            self.set_inflight(head, false);
        }
        self.store16(DESC_NUM_AT, self.desc_num);
        self.store16(LAST_BATCH_HEAD_AT, u16::MAX);
        self.store16(USED_IDX_AT, used_idx);
        self.store16(VERSION_AT, VERSION);
        self.counter = 0;
    }

    /// Step 1: `head` was popped.
    pub fn popped(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        if let Some(s) = self.slice() {
            let _ = s.store(
                self.counter,
                Self::entry(head) + COUNTER_AT,
                Ordering::Relaxed,
            );
        }
        // A counter from the area may be anything: wrap rather than overflow.
        self.counter = self.counter.wrapping_add(1);
        self.set_inflight(head, true);
    }

    /// Step 2: `head`'s used entry is about to be published.
    pub fn completing(&self, head: u16) {
        self.store16(LAST_BATCH_HEAD_AT, head);
    }

    /// Step 3: `head`'s used entry was published and the used index is now `used_idx`.
    pub fn completed(&self, head: u16, used_idx: u16) {
        if head < self.desc_num {
            self.set_inflight(head, false);
        }
        self.store16(USED_IDX_AT, used_idx);
    }

    /// At a queue's (re)start, with `ring_used_idx` the used index in guest memory: the
    /// requests to run again. A fresh area (version 0) is initialised instead.
    pub fn recover(&mut self, ring_used_idx: u16) -> Result<Recovery, InflightError> {
        let version = self.load16(VERSION_AT);
        if version == 0 {
            // A fresh area: nothing was in flight.
            self.reset(ring_used_idx);
            return Ok(Recovery {
                resubmit: Vec::new(),
            });
        }
        if version != VERSION {
            return Err(InflightError::BadArea(format!("version {version}")));
        }
        let desc_num = self.load16(DESC_NUM_AT);
        if desc_num != self.desc_num {
            return Err(InflightError::BadArea(format!(
                "{desc_num} descriptors in a queue of {}",
                self.desc_num
            )));
        }
        if self.load16(USED_IDX_AT) != ring_used_idx {
            // The last completion reached the used ring, its entry was not cleared.
            let last = self.load16(LAST_BATCH_HEAD_AT);
            if last < self.desc_num {
                self.set_inflight(last, false);
            }
            self.store16(USED_IDX_AT, ring_used_idx);
        }
        let Some(s) = self.slice() else {
            return Err(InflightError::BadArea("not mapped".into()));
        };
        let mut pending: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.desc_num {
            let at = Self::entry(head);
            let inflight: u8 = s.load(at + INFLIGHT_AT, Ordering::Acquire).unwrap_or(0);
            if inflight != 0 {
                let counter: u64 = s.read_obj(at + COUNTER_AT).unwrap_or(0);
                pending.push((counter, head));
            }
        }
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Ok(Recovery {
            resubmit: pending.into_iter().map(|(_, h)| h).collect(),
        })
    }
}

/// The chains of `heads` in `queue`'s descriptor table, parsed, in that order.
///
/// virtio-queue builds a chain only from an avail ring, so the heads are put in a
/// scratch avail ring of a scratch queue, in memory of ours mapped just past guest
/// memory, and popped from there. Only the descriptor table is read from guest memory;
/// a descriptor that points into the scratch memory is refused when the request runs
/// (it is outside guest memory then). Heads a broken area names past the ring are
/// skipped.
pub fn resubmit_chains(
    mem: &GuestMemory,
    queue: &Queue,
    heads: &[u16],
    limits: &ParseLimits,
) -> Result<Vec<ParsedChain>, InflightError> {
    let size = queue.size();
    let heads: Vec<u16> = heads.iter().copied().filter(|&h| h < size).collect();
    let bad = |what: &str| InflightError::BadArea(format!("cannot resubmit: {what}"));
    // avail ring: flags, idx, ring[size], used_event; the used ring after it (unused).
    let avail_len = 6 + 2 * u64::from(size);
    let used_at = avail_len.next_multiple_of(4096);
    let len = used_at + 6 + 8 * u64::from(size);
    let at = mem
        .last_addr()
        .checked_add(1)
        .and_then(|a| a.checked_align_up(4096))
        .ok_or_else(|| bad("no address after guest memory"))?;
    let scratch = GuestRegionMmap::<DirtyLog>::from_range(at, len as usize, None)
        .map_err(|e| InflightError::Map(io::Error::other(e)))?;
    let mem2 = mem
        .insert_region(Arc::new(scratch))
        .map_err(|e| InflightError::Map(io::Error::other(e)))?;
    let mut q = Queue::new(size).map_err(|e| bad(&e.to_string()))?;
    q.try_set_desc_table_address(GuestAddress(queue.desc_table()))
        .and_then(|()| q.try_set_avail_ring_address(at))
        .and_then(|()| q.try_set_used_ring_address(at.unchecked_add(used_at)))
        .map_err(|e| bad(&e.to_string()))?;
    q.set_ready(true);
    for (i, h) in heads.iter().enumerate() {
        mem2.write_obj(*h, at.unchecked_add(4 + 2 * i as u64))
            .map_err(|e| bad(&e.to_string()))?;
    }
    mem2.write_obj(heads.len() as u16, at.unchecked_add(2))
        .map_err(|e| bad(&e.to_string()))?;
    let mut out = Vec::with_capacity(heads.len());
    while let Some(chain) = q.pop_descriptor_chain(&mem2) {
        out.push(super::request::parse_chain(chain, limits));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(queues: u16, size: u16) -> (Arc<InflightArea>, File) {
        let (a, f) = InflightArea::create((queues, size), (8, 1024)).unwrap();
        (Arc::new(a), f)
    }

    /// The area as the next daemon maps it from the frontend's file.
    fn reopen(f: &File, queues: u16, size: u16) -> Arc<InflightArea> {
        let len = u64::from(queues) * queue_region_len(size);
        Arc::new(
            InflightArea::open(f.try_clone().unwrap(), (0, len), (queues, size), (8, 1024))
                .unwrap(),
        )
    }

    #[test]
    fn the_area_cannot_be_shrunk() {
        let (_a, f) = area(1, 16);
        let len = f.metadata().unwrap().len();
        assert!(f.set_len(len / 2).is_err(), "a sealed area was shrunk");
        assert_eq!(f.metadata().unwrap().len(), len);
    }

    #[test]
    fn the_layout_is_the_specifications() {
        assert_eq!(queue_region_len(128), 2112);
        assert_eq!(queue_region_len(256), 16 + 16 * 256 + 48);
        let (a, f) = area(2, 128);
        assert_eq!(f.metadata().unwrap().len(), 2 * 2112);
        let mut q1 = a.queue(1).unwrap();
        assert!(a.queue(2).is_none());
        q1.recover(7).unwrap();
        q1.popped(5);
        let mut raw = vec![0u8; 4224];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut raw, 0).unwrap();
        let h = &raw[2112..];
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), VERSION);
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 128);
        assert_eq!(u16::from_le_bytes([h[14], h[15]]), 7, "used_idx");
        let e = &h[16 + 5 * 16..];
        assert_eq!(e[0], 1, "inflight");
        assert!(raw[..2112].iter().all(|&b| b == 0), "queue 0 touched");
    }

    #[test]
    fn a_restart_resubmits_what_was_popped_and_not_completed_in_pop_order() {
        let (a, f) = area(1, 16);
        let mut q = a.queue(0).unwrap();
        assert_eq!(q.recover(100).unwrap().resubmit, Vec::<u16>::new());
        for head in [9, 3, 12, 0, 7] {
            q.popped(head);
        }
        // Completed out of order: 12, then 9.
        for (head, used) in [(12, 101), (9, 102)] {
            q.completing(head);
            q.completed(head, used);
        }
        drop(q);
        let mut q = reopen(&f, 1, 16).queue(0).unwrap();
        assert_eq!(q.recover(102).unwrap().resubmit, vec![3, 0, 7]);
        // New pops count after the old ones.
        q.popped(1);
        let mut q = reopen(&f, 1, 16).queue(0).unwrap();
        assert_eq!(q.recover(102).unwrap().resubmit, vec![3, 0, 7, 1]);
    }

    #[test]
    fn a_completion_published_but_not_recorded_is_not_run_again() {
        let (a, f) = area(1, 16);
        let mut q = a.queue(0).unwrap();
        q.recover(0).unwrap();
        q.popped(4);
        q.popped(6);
        q.completing(6);
        // The used entry and index reach the ring (used idx 1), then the process dies.
        drop(q);
        let mut q = reopen(&f, 1, 16).queue(0).unwrap();
        assert_eq!(q.recover(1).unwrap().resubmit, vec![4]);
    }

    #[test]
    fn a_death_before_the_first_completion_clears_nothing() {
        // spdk#3766: a last_batch_head of 0 left over would clear head 0.
        let (a, f) = area(1, 8);
        let mut q = a.queue(0).unwrap();
        q.recover(40).unwrap();
        q.popped(0);
        drop(q);
        let mut q = reopen(&f, 1, 8).queue(0).unwrap();
        assert_eq!(q.recover(40).unwrap().resubmit, vec![0]);
    }

    #[test]
    fn a_hostile_area_is_refused() {
        let (_a, f) = area(1, 16);
        let open = |off, size, q, qs| {
            InflightArea::open(f.try_clone().unwrap(), (off, size), (q, qs), (2, 256))
        };
        assert!(
            open(0, 1 << 20, 3, 16).is_err(),
            "more queues than the device"
        );
        assert!(open(0, 1 << 20, 1, 24).is_err(), "not a power of two");
        assert!(
            open(0, 1 << 20, 1, 512).is_err(),
            "larger than the device's rings"
        );
        assert!(open(0, 100, 1, 16).is_err(), "smaller than its queues need");
        assert!(
            open(4096, 1 << 20, 1, 16).is_err(),
            "past the end of the file"
        );
        assert!(open(0, 1 << 20, 1, 16).is_ok());
        // Garbage in the area itself.
        use std::os::unix::fs::FileExt;
        f.write_all_at(&7u16.to_le_bytes(), 8).unwrap();
        let mut q = reopen(&f, 1, 16).queue(0).unwrap();
        assert!(q.recover(0).is_err(), "unknown version");
        f.write_all_at(&1u16.to_le_bytes(), 8).unwrap();
        f.write_all_at(&99u16.to_le_bytes(), 10).unwrap();
        assert!(q.recover(0).is_err(), "desc_num other than the queue size");
        // An out-of-range last_batch_head is ignored.
        f.write_all_at(&16u16.to_le_bytes(), 10).unwrap();
        f.write_all_at(&999u16.to_le_bytes(), 12).unwrap();
        f.write_all_at(&5u16.to_le_bytes(), 14).unwrap();
        assert_eq!(q.recover(6).unwrap().resubmit, Vec::<u16>::new());
        // Counters near the end: the next pops wrap, they do not overflow.
        f.write_all_at(&[1], 16 + 16 * 3).unwrap();
        f.write_all_at(&(u64::MAX - 1).to_le_bytes(), 16 + 16 * 3 + 8)
            .unwrap();
        assert_eq!(q.recover(6).unwrap().resubmit, vec![3]);
        q.popped(4);
        q.popped(5);
    }
}
