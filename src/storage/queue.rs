// SPDX-License-Identifier: Apache-2.0

//! A queue of direct requests ([`super::aio`]) kept in flight together.
//!
//! An [`AsyncQueue`] belongs to one thread (a virtio queue's worker, or a test). It
//! takes reads and writes on [`IoTarget`]s, keeps up to `depth` of them in flight,
//! and hands them back in the order they were started.
//!
//! * **File descriptors** go through the queue's io_uring as readv/writev, straight
//!   into or out of the caller's buffers (guest memory), and the queue blocks in
//!   `io_uring_enter` only when the caller has nothing else to do. This is what
//!   keeps 32 requests in flight per queue on an `O_DIRECT` destination, where one
//!   blocking system call per queue would serialise the queue.
//! * **Emulated targets** (the simulated device) are transferred by the queue
//!   itself, with the device's own calls, when the caller waits: one request at a
//!   time, picked at random (seeded) among those in flight, so completions come in
//!   any order, as the kernel's do. The crash suite drives the engine's direct
//!   path through this, with power cuts and process deaths while requests are in
//!   flight.
//!
//! Rules the queue keeps:
//! - **In-order retirement** by default: [`AsyncQueue::next_retired`] yields requests
//!   in the order they were started, even when they complete in another order. The
//!   virtio front relies on it when the frontend keeps no in-flight area
//!   (INFLIGHT_SHMFD): the used index then always equals the number of chains popped
//!   before the oldest request still in flight, which is where QEMU restarts a
//!   backend that crashed or reconnected (it replays from the used index).
//!   Out-of-order retirement would make such a restart skip a request that was never
//!   completed; [`AsyncQueue::set_in_order`] allows it for a caller whose restarts
//!   resubmit from an in-flight area instead.
//! - **No abandoned I/O.** Dropping a queue waits for the kernel to finish what it
//!   has: the buffers may be reused the moment the queue is gone. (Emulated
//!   requests not yet performed simply never happen, like I/O lost with a process.)
//! - **A bounded ring.** Only readv and writev can be submitted (`restrict`), since
//!   the ring's submissions bypass seccomp.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use tracing::warn;

use super::aio::IoTarget;
use super::BlockDevice;

/// Most iovecs one request may use (the kernel's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Most requests in flight per queue.
pub const MAX_DEPTH: usize = 1024;

/// A request that finished, in the order it was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// The caller's tag, given to [`AsyncQueue::start`].
    pub tag: u64,
    /// A write (as opposed to a read).
    pub write: bool,
    /// Bytes requested.
    pub len: u64,
    /// Offset of the first byte.
    pub offset: u64,
    /// `Ok` when every byte was transferred; else the errno (0: unexpected end of file).
    pub result: Result<(), i32>,
}

/// What a slot's request is issued on.
enum SlotTarget {
    Fd(RawFd),
    Emulated(Arc<dyn BlockDevice>),
}

/// One request's state. Slots are reused; their iovec buffers keep their capacity.
struct Slot {
    tag: u64,
    write: bool,
    target: SlotTarget,
    /// Bytes requested.
    len: u64,
    /// Bytes transferred so far (short transfers are resubmitted for the rest).
    done: u64,
    /// Offset of the request's first byte.
    offset: u64,
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully transferred.
    iov_pos: usize,
    /// `None` while in flight.
    result: Option<Result<(), i32>>,
    /// The write that follows this transfer once it moved every byte (a request in two
    /// steps, [`AsyncQueue::start_read_then_write`]).
    then: Option<Then>,
    /// The iovecs of `then`'s write (kept for their capacity when there is none).
    then_iov: Vec<libc::iovec>,
}

/// The second step of a two-step request: a write.
struct Then {
    target: SlotTarget,
    offset: u64,
    len: u64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            tag: 0,
            write: false,
            target: SlotTarget::Fd(-1),
            len: 0,
            done: 0,
            offset: 0,
            iov: Vec::new(),
            iov_pos: 0,
            result: None,
            then: None,
            then_iov: Vec::new(),
        }
    }

    /// The first step of a two-step request moved every byte: makes its write the
    /// slot's transfer. Returns whether there was one.
    fn next_step(&mut self) -> bool {
        let Some(then) = self.then.take() else {
            return false;
        };
        self.write = true;
        self.target = then.target;
        self.offset = then.offset;
        self.len = then.len;
        self.done = 0;
        self.iov_pos = 0;
        std::mem::swap(&mut self.iov, &mut self.then_iov);
        true
    }

    /// Accounts for `n` more bytes transferred: drops the iovecs (or the part of one)
    /// they filled.
    fn advance(&mut self, mut n: usize) {
        self.done += n as u64;
        while n > 0 && self.iov_pos < self.iov.len() {
            let v = &mut self.iov[self.iov_pos];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.iov_pos += 1;
            } else {
                // SAFETY: only pointer arithmetic inside the buffer the iovec describes
                // (n < iov_len); the pointer is not dereferenced here.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Performs an emulated request's whole transfer with the device's own calls,
    /// through a bounce buffer: the iovecs may overlap (a guest's may), so no Rust
    /// reference to the caller's memory is formed; bytes are copied with raw
    /// pointers, in list order (a later iovec's bytes win, as with readv).
    fn transfer_emulated(&mut self, dev: &dyn BlockDevice) -> Result<(), i32> {
        let iov = &self.iov[self.iov_pos..];
        let offset = self.offset + self.done;
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut bounce = vec![0u8; total];
        let r = if self.write {
            let mut at = 0;
            for v in iov {
                // SAFETY: `start`'s caller keeps the iovecs' memory mapped and
                // readable until the request is retired; `bounce` is ours and has
                // room for every iovec.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.iov_base.cast::<u8>(),
                        bounce.as_mut_ptr().add(at),
                        v.iov_len,
                    )
                };
                at += v.iov_len;
            }
            dev.write_at(&bounce, offset)
        } else {
            dev.read_at(&mut bounce, offset).inspect(|()| {
                let mut at = 0;
                for v in iov {
                    // SAFETY: as above, and the caller forms no reference to this
                    // memory while the request is in flight (it is the kernel's or,
                    // here, the queue's to write).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            bounce.as_ptr().add(at),
                            v.iov_base.cast::<u8>(),
                            v.iov_len,
                        )
                    };
                    at += v.iov_len;
                }
            })
        };
        r.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// A queue's io_uring and its requests in flight.
pub struct AsyncQueue {
    /// `None` for a queue built for emulated targets only.
    ring: Option<IoUring>,
    slots: Vec<Slot>,
    /// Indices of unused slots.
    free: Vec<u16>,
    /// Started requests, oldest first, until retired.
    order: VecDeque<u16>,
    /// Emulated requests started and not yet performed.
    emulated: Vec<u16>,
    /// State of the generator that picks which emulated request completes next.
    pick: u64,
    /// Most requests started and not retired.
    depth: usize,
    /// Completions that asked for a resubmission (scratch, kept for its capacity).
    again: Vec<u16>,
    /// Unexpected `io_uring_enter` errors seen (logged once).
    enter_errors: u64,
    /// Retire in start order (the default), or as requests finish.
    in_order: bool,
}

// SAFETY: the raw pointers in the slots' iovecs point into buffers that `start`'s caller
// keeps valid for any thread (guest memory mappings, or a test's buffers); the queue is
// used by one thread at a time (the virtio front keeps it in its queue's `Mutex`).
unsafe impl Send for AsyncQueue {}

impl fmt::Debug for AsyncQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncQueue")
            .field("depth", &self.depth)
            .field("started", &self.order.len())
            .field("ring", &self.ring.is_some())
            .finish()
    }
}

/// Bounds what the ring can do, since its submissions bypass seccomp: only readv and
/// writev ([`AsyncQueue::ALLOWED_OPCODES`]) on the fds the daemon passes, no SQE flags
/// (no fixed files, links or buffer selection), and no `io_uring_register` operation
/// after this one; then enables the ring (created with `IORING_SETUP_R_DISABLED`).
fn restrict(ring: &IoUring) -> io::Result<()> {
    use io_uring::register::Restriction;
    let mut res: Vec<Restriction> = AsyncQueue::ALLOWED_OPCODES
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    res.push(Restriction::sqe_flags_allowed(0));
    let sub = ring.submitter();
    sub.register_restrictions(&mut res)?;
    sub.register_enable_rings()
}

fn slot_target(target: &IoTarget) -> SlotTarget {
    match target {
        IoTarget::Fd(f) => SlotTarget::Fd(f.fd),
        IoTarget::Emulated(d) => SlotTarget::Emulated(d.clone()),
    }
}

impl AsyncQueue {
    /// A queue with an io_uring that keeps up to `depth` (1..=[`MAX_DEPTH`]) requests
    /// in flight.
    pub fn new(depth: usize) -> io::Result<AsyncQueue> {
        let depth = depth.clamp(1, MAX_DEPTH);
        // One submission entry per slot at most is outstanding, so neither ring can
        // overflow (the completion ring is twice the submission ring).
        let entries = u32::try_from(depth.next_power_of_two()).unwrap_or(1024);
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_r_disabled()
            .build(entries)?;
        restrict(&ring)?;
        Ok(Self::with_ring(Some(ring), depth, 0))
    }

    /// A queue without an io_uring, for emulated targets only (file descriptors
    /// fail with `ENOSYS`); `seed` decides the order in which requests complete.
    pub fn emulated(depth: usize, seed: u64) -> AsyncQueue {
        Self::with_ring(None, depth.clamp(1, MAX_DEPTH), seed)
    }

    fn with_ring(ring: Option<IoUring>, depth: usize, seed: u64) -> AsyncQueue {
        AsyncQueue {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            emulated: Vec::new(),
            // xorshift64 needs a non-zero state.
            pick: seed | 1,
            depth,
            again: Vec::new(),
            enter_errors: 0,
            in_order: true,
        }
    }

    /// The submission opcodes the ring accepts (`restrict`).
    pub const ALLOWED_OPCODES: [u8; 2] = [opcode::Readv::CODE, opcode::Writev::CODE];

    /// Retire requests in the order they were started (`true`, the default), or in the
    /// order they finish: only for a caller whose restarts do not depend on the order
    /// (the virtio front with in-flight tracking, see `virtio::inflight`).
    pub fn set_in_order(&mut self, in_order: bool) {
        self.in_order = in_order;
    }

    /// Whether another request may be started.
    pub fn has_room(&self) -> bool {
        self.order.len() < self.depth
    }

    /// No request is started and not yet retired.
    pub fn is_idle(&self) -> bool {
        self.order.is_empty()
    }

    /// The (emptied) iovec list of the slot the next [`AsyncQueue::start`] uses, to fill
    /// with the request's buffers.
    pub fn next_iov(&mut self) -> &mut Vec<libc::iovec> {
        let idx = self.next_slot();
        let iov = &mut self.slots[idx].iov;
        iov.clear();
        iov
    }

    fn next_slot(&mut self) -> usize {
        if let Some(&i) = self.free.last() {
            return usize::from(i);
        }
        // At most `depth` <= MAX_DEPTH slots exist, so the index fits in a u16.
        self.slots.push(Slot::new());
        let i = self.slots.len() - 1;
        self.free.push(i as u16);
        i
    }

    /// Starts a request over the iovecs just put into [`AsyncQueue::next_iov`]: a
    /// read (or write with `write`) of `len` bytes at `offset` on `target`, known to
    /// the caller by `tag`. Requires [`AsyncQueue::has_room`].
    ///
    /// # Safety
    ///
    /// Until the request is retired ([`AsyncQueue::next_retired`] returned it) or the
    /// queue is dropped: the target's file descriptor stays open, and the memory the
    /// iovecs describe stays mapped and is not accessed through Rust references (the
    /// kernel, or the queue for an emulated target, reads or writes it at any time
    /// meanwhile).
    pub unsafe fn start(
        &mut self,
        tag: u64,
        target: &IoTarget,
        write: bool,
        offset: u64,
        len: u64,
    ) {
        self.launch(tag, target, write, offset, len, None);
    }

    /// Starts a request in two steps: a read of `len` bytes at `offset` on `target`
    /// into the iovecs just put into [`AsyncQueue::next_iov`], then, once it moved every
    /// byte, a write of `then_len` bytes at `then_offset` on `then_target` from
    /// `then_iov` (which may include the read's buffers). It is retired once, when the
    /// write finished or the read failed (then the write is never issued), in its
    /// place in the start order: a copy of a region that also writes the caller's data,
    /// without a stop in between where the caller would have to run. Requires
    /// [`AsyncQueue::has_room`].
    ///
    /// # Safety
    ///
    /// As for [`AsyncQueue::start`], for both steps' targets and iovecs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn start_read_then_write(
        &mut self,
        tag: u64,
        target: &IoTarget,
        offset: u64,
        len: u64,
        then_target: &IoTarget,
        then_offset: u64,
        then_len: u64,
        then_iov: &[libc::iovec],
    ) {
        let idx = self.next_slot();
        let s = &mut self.slots[idx];
        s.then_iov.clear();
        s.then_iov.extend_from_slice(then_iov);
        let then = Then {
            target: slot_target(then_target),
            offset: then_offset,
            len: then_len,
        };
        self.launch(tag, target, false, offset, len, Some(then));
    }

    /// Fills the next slot with a request and issues it.
    fn launch(
        &mut self,
        tag: u64,
        target: &IoTarget,
        write: bool,
        offset: u64,
        len: u64,
        then: Option<Then>,
    ) {
        let idx = self.next_slot();
        self.free.pop();
        let s = &mut self.slots[idx];
        s.tag = tag;
        s.write = write;
        s.target = slot_target(target);
        s.len = len;
        s.done = 0;
        s.offset = offset;
        s.iov_pos = 0;
        s.result = None;
        s.then = then;
        self.order.push_back(idx as u16);
        self.issue(idx);
    }

    /// Hands slot `idx`'s (current step's) transfer to whoever performs it.
    fn issue(&mut self, idx: usize) {
        let s = &mut self.slots[idx];
        let emulated = matches!(s.target, SlotTarget::Emulated(_));
        if !emulated && self.ring.is_none() {
            s.result = Some(Err(libc::ENOSYS));
            return;
        }
        if emulated {
            self.emulated.push(idx as u16);
        } else {
            self.push(idx);
        }
    }

    /// Queues the submission entry for the rest of slot `idx`'s transfer.
    fn push(&mut self, idx: usize) {
        let s = &self.slots[idx];
        let SlotTarget::Fd(fd) = s.target else {
            return;
        };
        let iov = &s.iov[s.iov_pos..];
        let fd = types::Fd(fd);
        // iov.len() <= MAX_IOVECS.
        let n = iov.len() as u32;
        let offset = s.offset + s.done;
        let entry = if s.write {
            opcode::Writev::new(fd, iov.as_ptr(), n)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, iov.as_ptr(), n)
                .offset(offset)
                .build()
        }
        .user_data(idx as u64);
        loop {
            let Some(ring) = self.ring.as_mut() else {
                return;
            };
            // SAFETY: the entry points at `s.iov[iov_pos..]`, which is not touched again
            // until the entry's completion is reaped (a slot is reused only after it was
            // retired, and `advance` runs only after the completion), and at buffers and
            // an fd that `start`'s caller keeps valid until retirement.
            let pushed = unsafe { ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // Cannot happen (one entry per slot, ring >= depth); submit and retry.
            self.enter(0);
        }
    }

    /// Submits queued entries and waits for at least `want` completions, retrying on
    /// interruptions. Never gives up: requests in flight may still use the buffers.
    fn enter(&mut self, want: usize) {
        loop {
            let Some(ring) = self.ring.as_ref() else {
                return;
            };
            match ring.submit_and_wait(want) {
                Ok(_) => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Completion ring busy or no memory for now: reap, then retry.
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                        if self.reap() > 0 {
                            return;
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    _ => {
                        if self.enter_errors == 0 {
                            warn!("io_uring_enter failed (retrying): {e}");
                        }
                        self.enter_errors += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                },
            }
        }
    }

    /// Submits what was started and, unless the oldest request already finished (so
    /// that [`AsyncQueue::next_retired`] has something to give), makes progress:
    /// performs an emulated transfer, or blocks until the kernel completes one. A
    /// transfer that was the first step of a two-step request finishes nothing (its
    /// second step starts), so callers wait in a loop. Requires that the queue is not
    /// idle.
    pub fn wait(&mut self) {
        if self.retirable().is_some() || self.reap() > 0 || self.complete_emulated() {
            // Still submit what was queued since.
            self.submit();
            return;
        }
        if self.in_kernel() {
            self.enter(1);
            self.reap();
        }
    }

    /// Whether some request is in the kernel's hands.
    fn in_kernel(&self) -> bool {
        self.order.iter().any(|&i| {
            let s = &self.slots[usize::from(i)];
            s.result.is_none() && matches!(s.target, SlotTarget::Fd(_))
        })
    }

    /// Performs one emulated request, picked at random among those in flight.
    /// Returns whether there was one.
    fn complete_emulated(&mut self) -> bool {
        if self.emulated.is_empty() {
            return false;
        }
        // xorshift64: a deterministic order for a given seed, without a dependency.
        self.pick ^= self.pick << 13;
        self.pick ^= self.pick >> 7;
        self.pick ^= self.pick << 17;
        let k = (self.pick % self.emulated.len() as u64) as usize;
        let idx = usize::from(self.emulated.swap_remove(k));
        let s = &mut self.slots[idx];
        let SlotTarget::Emulated(dev) = &s.target else {
            return false;
        };
        let dev = dev.clone();
        let r = s.transfer_emulated(dev.as_ref());
        if r.is_ok() {
            let rest = (s.len - s.done) as usize;
            s.advance(rest);
            if s.next_step() {
                // The write is performed at a later pick, like any other request.
                self.issue(idx);
                return true;
            }
        }
        s.result = Some(r);
        true
    }

    /// Where in `order` the next request to retire is: the oldest if it finished, or,
    /// out of order, the oldest of those that finished.
    fn retirable(&self) -> Option<usize> {
        let finished = |&i: &u16| self.slots[usize::from(i)].result.is_some();
        if self.in_order {
            self.order.front().filter(|i| finished(i)).map(|_| 0)
        } else {
            self.order.iter().position(finished)
        }
    }

    /// Submits what was started without waiting.
    pub fn submit(&mut self) {
        if self
            .ring
            .as_mut()
            .is_some_and(|r| !r.submission().is_empty())
        {
            self.enter(0);
        }
    }

    /// Takes completions off the ring. Returns how many requests finished.
    fn reap(&mut self) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        let mut finished = 0;
        for cqe in ring.completion() {
            let Some(s) = usize::try_from(cqe.user_data())
                .ok()
                .and_then(|i| self.slots.get_mut(i))
            else {
                continue;
            };
            let res = cqe.result();
            if res > 0 {
                // res > 0 and at most the bytes asked for.
                s.advance(res as usize);
                if s.done >= s.len {
                    if s.next_step() {
                        // The read is in: issue the write (an emulated one is
                        // performed at a later pick).
                        self.again.push(cqe.user_data() as u16);
                        continue;
                    }
                    s.result = Some(Ok(()));
                    finished += 1;
                } else {
                    // A short transfer: go on with the rest.
                    self.again.push(cqe.user_data() as u16);
                }
            } else if res == -libc::EINTR || res == -libc::EAGAIN {
                self.again.push(cqe.user_data() as u16);
            } else {
                // 0 (end of file) or an error.
                s.result = Some(Err(-res));
                finished += 1;
            }
        }
        while let Some(i) = self.again.pop() {
            self.issue(usize::from(i));
        }
        finished
    }

    /// The oldest started request, if it finished (out of order: the oldest of those
    /// that finished).
    pub fn next_retired(&mut self) -> Option<Retired> {
        let pos = self.retirable()?;
        let idx = self.order[pos];
        let s = &mut self.slots[usize::from(idx)];
        let result = s.result?;
        let r = Retired {
            tag: s.tag,
            write: s.write,
            len: s.len,
            offset: s.offset,
            result,
        };
        // Do not keep the device alive through an idle slot.
        s.target = SlotTarget::Fd(-1);
        s.then = None;
        self.order.remove(pos);
        self.free.push(idx);
        Some(r)
    }
}

impl Drop for AsyncQueue {
    fn drop(&mut self) {
        // The device never drops a queue with requests in flight; if that ever happens,
        // wait for them rather than let the kernel write into memory that is reused,
        // and start no second step of a two-step request (its buffers may be the
        // caller's, going away: like emulated requests not yet performed, it never
        // happens).
        for s in &mut self.slots {
            s.then = None;
        }
        while self.in_kernel() {
            self.enter(1);
            self.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::IoFd;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    /// A queue, or `None` (the test is skipped, and says so) when this kernel refuses
    /// io_uring altogether: the daemon then runs its queues synchronously.
    fn queue(depth: usize) -> Option<AsyncQueue> {
        match AsyncQueue::new(depth) {
            Ok(q) => Some(q),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::EPERM | libc::EACCES)
                ) =>
            {
                eprintln!("skipped: io_uring is not available here ({e})");
                None
            }
            Err(e) => panic!("io_uring_setup: {e}"),
        }
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    /// The ring refuses what it was not restricted to: other opcodes (here openat, a
    /// path lookup seccomp never sees), SQE flags, and further registrations.
    #[test]
    fn ring_refuses_other_opcodes_flags_and_registrations() {
        let Some(mut q) = queue(4) else { return };
        let path = c"/etc/hostname";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(1);
        let mut buf = [0u8; 8];
        let f = tempfile::tempfile().unwrap();
        let read = opcode::Read::new(types::Fd(f.as_raw_fd()), buf.as_mut_ptr(), 8)
            .build()
            .user_data(2);
        let linked = opcode::Readv::new(types::Fd(f.as_raw_fd()), std::ptr::null(), 0)
            .build()
            .flags(io_uring::squeue::Flags::IO_LINK)
            .user_data(3);
        // A refused entry ends its submission batch: submit them one at a time.
        for e in [open, read, linked] {
            let id = e.get_user_data();
            let ring = q.ring.as_mut().unwrap();
            // SAFETY: the path and buffers outlive the completion reaped below.
            unsafe { ring.submission().push(&e).unwrap() };
            ring.submit_and_wait(1).unwrap();
            let c = ring.completion().next().unwrap();
            assert_eq!((c.user_data(), c.result()), (id, -libc::EACCES));
        }
        let e = q
            .ring
            .as_ref()
            .unwrap()
            .submitter()
            .register_files(&[f.as_raw_fd()])
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }

    #[test]
    fn retires_in_start_order_and_reports_errors() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let fd = IoTarget::Fd(IoFd {
            fd: f.as_raw_fd(),
            align: 1,
        });
        let Some(mut q) = queue(8) else { return };
        let mut bufs = vec![vec![0u8; 4096]; 6];
        for (i, b) in bufs.iter_mut().enumerate() {
            // Two iovecs per request, the second one 1 byte into the buffer's tail.
            let (a, rest) = b.split_at_mut(1000);
            let v = q.next_iov();
            v.push(iov(a));
            v.push(iov(rest));
            // Request 4 reads past the end of the file: end of file is an error.
            let off = if i == 4 { 65536 } else { i as u64 * 8192 };
            // SAFETY: `f` and `bufs` outlive `q` and are not touched until the loop
            // below retired every request.
            unsafe { q.start(i as u64 + 10, &fd, false, off, 4096) };
        }
        assert!(!q.is_idle());
        let mut seen = Vec::new();
        while seen.len() < 6 {
            q.wait();
            while let Some(r) = q.next_retired() {
                seen.push(r);
            }
        }
        assert!(q.is_idle());
        let heads: Vec<u64> = seen.iter().map(|r| r.tag).collect();
        assert_eq!(heads, vec![10, 11, 12, 13, 14, 15]);
        for (i, r) in seen.iter().enumerate() {
            if i == 4 {
                assert_eq!(r.result, Err(0), "end of file");
            } else {
                assert_eq!(r.result, Ok(()));
                let off = i * 8192;
                assert_eq!(bufs[i][..], data[off..off + 4096]);
            }
        }
    }

    #[test]
    fn writes_land_and_slots_are_reused() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let fd = IoTarget::Fd(IoFd {
            fd: f.as_raw_fd(),
            align: 1,
        });
        let Some(mut q) = queue(4) else { return };
        let mut bufs: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 512]).collect();
        let mut done = 0;
        let mut next = 0;
        while done < bufs.len() {
            while q.has_room() && next < bufs.len() {
                let v = iov(&mut bufs[next]);
                q.next_iov().push(v);
                // SAFETY: `f` and `bufs` outlive `q`; `bufs` is read only after every
                // write was retired.
                unsafe { q.start(next as u64, &fd, true, next as u64 * 512, 512) };
                next += 1;
            }
            q.wait();
            while let Some(r) = q.next_retired() {
                assert_eq!(r.result, Ok(()));
                assert_eq!(r.tag as usize, done);
                done += 1;
            }
        }
        assert!(q.slots.len() <= 4);
        let mut back = vec![0u8; 64 * 512];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        for (i, c) in back.chunks(512).enumerate() {
            assert!(c.iter().all(|&b| b == i as u8), "sector {i}");
        }
    }

    /// A barrier calls `wait` before retiring: with every request already finished
    /// and reaped, `wait` must return at once (it used to block forever).
    #[test]
    fn wait_returns_when_everything_finished() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 16).unwrap();
        let fd = IoTarget::Fd(IoFd {
            fd: f.as_raw_fd(),
            align: 1,
        });
        let Some(mut q) = queue(4) else { return };
        let mut bufs = vec![vec![0u8; 512]; 2];
        for (i, b) in bufs.iter_mut().enumerate() {
            let v = iov(b);
            q.next_iov().push(v);
            // SAFETY: `f` and `bufs` outlive `q` (moved into the thread, dropped
            // before `bufs`) and are not touched meanwhile.
            unsafe { q.start(i as u64, &fd, false, 0, 512) };
        }
        while q
            .order
            .iter()
            .any(|&i| q.slots[usize::from(i)].result.is_none())
        {
            q.wait();
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            q.wait();
            tx.send(()).unwrap();
            let mut n = 0;
            while q.next_retired().is_some() {
                n += 1;
            }
            n
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("wait blocked although every request had finished");
        assert_eq!(t.join().unwrap(), 2);
        drop(bufs);
    }

    /// Starts 8 writes of 512 bytes (request i writes i + 1 at i * 1024) on `q` and
    /// runs them to the end. Returns the tags in the order the requests were
    /// performed, and in the order they retired.
    fn eight_writes(q: &mut AsyncQueue, target: &IoTarget) -> (Vec<u64>, Vec<u64>) {
        let mut bufs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; 512]).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            let v = iov(b);
            q.next_iov().push(v);
            // SAFETY: `bufs` outlives `q`'s requests (all retired below) and is not
            // touched meanwhile.
            unsafe { q.start(i as u64, target, true, i as u64 * 1024, 512) };
        }
        let mut completed = Vec::new();
        let mut retired = Vec::new();
        while !q.is_idle() {
            q.wait();
            // Which requests have been performed so far, in the order they were.
            for (i, s) in q.slots.iter().enumerate() {
                if s.result.is_some()
                    && !completed.contains(&s.tag)
                    && q.order.contains(&(i as u16))
                {
                    completed.push(s.tag);
                }
            }
            while let Some(r) = q.next_retired() {
                assert_eq!(r.result, Ok(()));
                retired.push(r.tag);
            }
        }
        (completed, retired)
    }

    /// The emulated queue (the crash suite's): requests complete in a seeded order
    /// other than their start order, are still retired in start order, and their
    /// bytes land on (or come from) the simulated device; a file descriptor target
    /// fails with ENOSYS rather than being issued anywhere.
    #[test]
    fn emulated_requests_complete_out_of_order_and_retire_in_order() {
        use crate::storage::SimDevice;
        let dev: Arc<dyn BlockDevice> = Arc::new(SimDevice::new(64 * 512));
        let target = IoTarget::Emulated(dev.clone());
        let mut q = AsyncQueue::emulated(8, 7);
        let (completed, retired) = eight_writes(&mut q, &target);
        assert_eq!(retired, (0..8).collect::<Vec<u64>>());
        assert_ne!(
            completed, retired,
            "a seeded order other than the start order"
        );
        for i in 0..8u64 {
            let mut b = [0u8; 512];
            dev.read_at(&mut b, i * 1024).unwrap();
            assert!(b.iter().all(|&x| x == i as u8 + 1), "request {i}'s data");
        }
        // Reads come back from the device.
        let mut back = vec![0u8; 1024];
        let v = iov(&mut back);
        q.next_iov().push(v);
        // SAFETY: as above.
        unsafe { q.start(9, &target, false, 1024, 1024) };
        q.wait();
        assert_eq!(q.next_retired().unwrap().result, Ok(()));
        assert!(back[..512].iter().all(|&x| x == 2) && back[512..].iter().all(|&x| x == 0));
        // No ring: a file descriptor is refused, not issued.
        let fd = IoTarget::Fd(IoFd { fd: 0, align: 1 });
        q.next_iov().push(iov(&mut back));
        // SAFETY: nothing is issued on the fd.
        unsafe { q.start(10, &fd, false, 0, 512) };
        q.wait();
        assert_eq!(q.next_retired().unwrap().result, Err(libc::ENOSYS));
    }

    /// Out of order (`set_in_order(false)`, for a caller with an in-flight area):
    /// a request retires as soon as it finished, whatever is older, so the
    /// retirement order is the completion order; every request retires once.
    #[test]
    fn out_of_order_queues_retire_requests_as_they_finish() {
        use crate::storage::SimDevice;
        let dev: Arc<dyn BlockDevice> = Arc::new(SimDevice::new(64 * 512));
        let target = IoTarget::Emulated(dev.clone());
        let mut q = AsyncQueue::emulated(8, 7);
        q.set_in_order(false);
        let (completed, retired) = eight_writes(&mut q, &target);
        assert_eq!(retired, completed, "retired in completion order");
        assert_ne!(retired, (0..8).collect::<Vec<u64>>(), "not in start order");
        let mut sorted = retired.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<u64>>(), "each retired once");
    }

    /// Overlapping buffers (a guest may send them) on an emulated target: no
    /// reference is formed over them, and the later iovec's bytes win, as with
    /// readv.
    #[test]
    fn emulated_reads_into_overlapping_buffers() {
        use crate::storage::SimDevice;
        let dev: Arc<dyn BlockDevice> = Arc::new(SimDevice::new(4096));
        dev.write_at(
            &(0..1024u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        let target = IoTarget::Emulated(dev);
        let mut q = AsyncQueue::emulated(2, 1);
        let mut buf = vec![0u8; 768];
        let p = buf.as_mut_ptr();
        // SAFETY: 256 + 512 <= 768: inside `buf`.
        let second = unsafe { p.add(256) };
        let v = q.next_iov();
        v.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: 512,
        });
        v.push(libc::iovec {
            iov_base: second.cast(),
            iov_len: 512,
        });
        // SAFETY: `buf` outlives the request, retired below, and is not touched meanwhile.
        unsafe { q.start(1, &target, false, 0, 1024) };
        q.wait();
        assert_eq!(q.next_retired().unwrap().result, Ok(()));
        let want: Vec<u8> = (0..256u32)
            .map(|i| (i % 251) as u8)
            .chain((512..1024u32).map(|i| (i % 251) as u8))
            .collect();
        assert_eq!(buf, want);
    }

    /// Runs a two-step copy on `q`: region [4096, 12288) of `src` read into a buffer,
    /// then written to `dst` with `data` over its middle 4096 bytes; a second one whose
    /// read starts past the end of `src`; and a plain write started between them, at
    /// 65536 on `dst`. Returns the tags in retirement order with their results, and the
    /// copy's buffer.
    type Retirements = Vec<(u64, Result<(), i32>)>;

    fn copy_two_steps(
        q: &mut AsyncQueue,
        src: &IoTarget,
        src_size: u64,
        dst: &IoTarget,
    ) -> (Retirements, Vec<u8>) {
        let mut buf = vec![0u8; 8192];
        let mut bad = vec![0u8; 8192];
        let mut data = vec![0xAAu8; 4096];
        let mut plain = vec![0x55u8; 512];
        let p = buf.as_mut_ptr();
        let then = [
            libc::iovec {
                iov_base: p.cast(),
                iov_len: 2048,
            },
            iov(&mut data),
            libc::iovec {
                // SAFETY: 6144 + 2048 = the buffer's length.
                iov_base: unsafe { p.add(6144) }.cast(),
                iov_len: 2048,
            },
        ];
        q.next_iov().push(libc::iovec {
            iov_base: p.cast(),
            iov_len: 8192,
        });
        // SAFETY: every buffer outlives the requests, all retired below, and none is
        // touched meanwhile.
        unsafe { q.start_read_then_write(1, src, 4096, 8192, dst, 4096, 8192, &then) };
        q.next_iov().push(iov(&mut plain));
        // SAFETY: as above.
        unsafe { q.start(2, dst, true, 65536, 512) };
        let bad_then = [iov(&mut bad)];
        q.next_iov().push(iov(&mut bad));
        // SAFETY: as above.
        unsafe { q.start_read_then_write(3, src, src_size, 8192, dst, 0, 8192, &bad_then) };
        let mut seen = Vec::new();
        while !q.is_idle() {
            q.wait();
            while let Some(r) = q.next_retired() {
                seen.push((r.tag, r.result));
            }
        }
        (seen, buf)
    }

    /// What `copy_two_steps` must leave on the destination: the source's bytes around
    /// the data, nothing of the failed copy.
    fn expect_copied(src: &[u8], dst: &[u8]) {
        assert!(dst[4096..6144] == src[4096..6144], "head not copied");
        assert!(
            dst[6144..10240].iter().all(|&b| b == 0xAA),
            "data not written"
        );
        assert!(dst[10240..12288] == src[10240..12288], "tail not copied");
        assert!(dst[..4096].iter().all(|&b| b == 0), "the failed copy wrote");
        assert!(dst[65536..66048].iter().all(|&b| b == 0x55));
    }

    /// A copy in two steps writes only once its read moved every byte, is retired
    /// once, in its place in the start order, and a failed read ends it (the write is
    /// never issued).
    #[test]
    fn two_step_copies_read_then_write_and_retire_once_in_order() {
        let mut sf = tempfile::tempfile().unwrap();
        let src: Vec<u8> = (0..32768u32).map(|i| (i % 253) as u8 + 1).collect();
        sf.write_all(&src).unwrap();
        let df = tempfile::tempfile().unwrap();
        df.set_len(1 << 17).unwrap();
        let (s, d) = (
            IoTarget::Fd(IoFd {
                fd: sf.as_raw_fd(),
                align: 1,
            }),
            IoTarget::Fd(IoFd {
                fd: df.as_raw_fd(),
                align: 1,
            }),
        );
        let Some(mut q) = queue(4) else { return };
        let (seen, buf) = copy_two_steps(&mut q, &s, src.len() as u64, &d);
        assert_eq!(seen, [(1, Ok(())), (2, Ok(())), (3, Err(0))]);
        assert!(buf == src[4096..12288], "the read did not fill the buffer");
        let mut back = vec![0u8; 1 << 17];
        std::os::unix::fs::FileExt::read_exact_at(&df, &mut back, 0).unwrap();
        expect_copied(&src, &back);

        // The same on emulated devices, whatever order the picks take.
        use crate::storage::SimDevice;
        for seed in 0..16 {
            let sd = SimDevice::new(32768);
            sd.write_at(&src, 0).unwrap();
            let dd = Arc::new(SimDevice::new(1 << 17));
            let (s, d): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) = (Arc::new(sd), dd.clone());
            let mut q = AsyncQueue::emulated(4, seed);
            let (seen, _) = copy_two_steps(
                &mut q,
                &IoTarget::Emulated(s),
                32768,
                &IoTarget::Emulated(d),
            );
            assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3]);
            assert_eq!(seen[0].1, Ok(()));
            assert!(seen[2].1.is_err(), "seed {seed}: {seen:?}");
            let mut back = vec![0u8; 1 << 17];
            dd.read_at(&mut back, 0).unwrap();
            expect_copied(&src, &back);
        }
    }

    #[test]
    fn advance_moves_through_iovecs() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 20];
        let mut s = Slot::new();
        s.iov.push(iov(&mut a));
        s.iov.push(iov(&mut b));
        s.len = 30;
        s.advance(4);
        assert_eq!((s.iov_pos, s.iov[0].iov_len, s.done), (0, 6, 4));
        s.advance(16);
        assert_eq!((s.iov_pos, s.iov[1].iov_len, s.done), (1, 10, 20));
        s.advance(10);
        assert_eq!((s.iov_pos, s.done), (2, 30));
    }
}
