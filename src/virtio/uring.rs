// SPDX-License-Identifier: Apache-2.0

//! Asynchronous reads and writes of one queue through io_uring ([`super::IoEngine::Uring`]).
//!
//! A [`UringQueue`] belongs to one queue's worker thread. The worker hands it reads and
//! writes the backend allows to issue directly ([`super::BlockBackend::direct_io`]) as
//! readv/writev on the backend's file descriptor, straight into or out of guest memory,
//! keeps up to `depth` of them in flight, and blocks in `io_uring_enter` only when it has
//! nothing else to do. This is what keeps 32 requests in flight per queue on an `O_DIRECT`
//! destination, where one blocking system call per queue would serialise the queue.
//!
//! Rules the device (`super::device`) keeps when it uses this type:
//! - **In-order retirement.** [`UringQueue::next_retired`] yields requests in the order
//!   they were started, even when the kernel completes them in another order, so used-ring
//!   entries appear in the order the chains were popped. The used index then always equals
//!   the number of chains popped before the oldest request still in flight, which is where
//!   QEMU restarts a backend that crashed or reconnected (it replays from the used index;
//!   vhost-user-backend 0.24 cannot offer INFLIGHT_SHMFD). Out-of-order retirement would
//!   make such a restart skip a request that was never completed.
//! - **Barriers.** Every other request (flush, discard, write-zeroes, GET_ID, anything
//!   touching an unhydrated region, buffers `O_DIRECT` cannot take, write-through writes,
//!   refused chains) waits until the queue is idle, then runs synchronously. A flush
//!   therefore covers every write its queue completed before it, exactly as in the
//!   synchronous path.
//! - **Memory lifetime.** iovecs point into the guest memory map the worker loaded for the
//!   current `handle_event` call, and the worker does not return from that call before
//!   the queue is idle: a SET_MEM_TABLE swaps the map for later calls while the old
//!   mapping stays alive, and GET_VRING_BASE waits for the queue lock, held for the whole
//!   call. No I/O is ever abandoned while the kernel may still access its buffers.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};
use tracing::warn;
use vm_memory::GuestAddress;

use super::request::{STATUS_IOERR, STATUS_OK};

/// Most iovecs one request may use (the kernel's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Most requests in flight per queue.
pub const MAX_DEPTH: usize = 1024;

/// A request that finished, in the order it was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
    /// `STATUS_OK` when all bytes were transferred, `STATUS_IOERR` otherwise.
    pub status: u8,
    /// A write (as opposed to a read).
    pub write: bool,
    /// Bytes requested.
    pub len: u64,
    /// Offset of the first byte.
    pub offset: u64,
    /// With `STATUS_IOERR`: the errno, 0 for an unexpected end of file.
    pub errno: i32,
}

/// One request's state. Slots are reused; their iovec buffers keep their capacity.
struct Slot {
    head: u16,
    status_addr: GuestAddress,
    write: bool,
    fd: RawFd,
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
    result: Option<u8>,
    /// The error of a failed request.
    errno: i32,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            head: 0,
            status_addr: GuestAddress(0),
            write: false,
            fd: -1,
            len: 0,
            done: 0,
            offset: 0,
            iov: Vec::new(),
            iov_pos: 0,
            result: None,
            errno: 0,
        }
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
}

/// A queue's io_uring and its requests in flight.
pub struct UringQueue {
    ring: IoUring,
    slots: Vec<Slot>,
    /// Indices of unused slots.
    free: Vec<u16>,
    /// Started requests, oldest first, until retired.
    order: VecDeque<u16>,
    /// Most requests started and not retired.
    depth: usize,
    /// Completions that asked for a resubmission (scratch, kept for its capacity).
    again: Vec<u16>,
    /// Unexpected `io_uring_enter` errors seen (logged once).
    enter_errors: u64,
}

// SAFETY: the raw pointers in the slots' iovecs point into guest memory mappings (and
// into nothing else), which any thread may access; the queue is only used through the
// `Mutex` of its `QueueState`, by one worker thread at a time.
unsafe impl Send for UringQueue {}

impl fmt::Debug for UringQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringQueue")
            .field("depth", &self.depth)
            .field("started", &self.order.len())
            .finish()
    }
}

/// Bounds what the ring can do, since its submissions bypass seccomp: only readv and
/// writev ([`UringQueue::ALLOWED_OPCODES`]) on the fds the daemon passes, no SQE flags
/// (no fixed files, links or buffer selection), and no `io_uring_register` operation
/// after this one; then enables the ring (created with `IORING_SETUP_R_DISABLED`).
fn restrict(ring: &IoUring) -> io::Result<()> {
    use io_uring::register::Restriction;
    let mut res: Vec<Restriction> = UringQueue::ALLOWED_OPCODES
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    res.push(Restriction::sqe_flags_allowed(0));
    let sub = ring.submitter();
    sub.register_restrictions(&mut res)?;
    sub.register_enable_rings()
}

impl UringQueue {
    /// A queue that keeps up to `depth` (1..=[`MAX_DEPTH`]) requests in flight.
    pub fn new(depth: usize) -> io::Result<UringQueue> {
        let depth = depth.clamp(1, MAX_DEPTH);
        // One submission entry per slot at most is outstanding, so neither ring can
        // overflow (the completion ring is twice the submission ring).
        let entries = u32::try_from(depth.next_power_of_two()).unwrap_or(1024);
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_r_disabled()
            .build(entries)?;
        restrict(&ring)?;
        Ok(UringQueue {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            depth,
            again: Vec::new(),
            enter_errors: 0,
        })
    }

    /// The submission opcodes the ring accepts ([`restrict`]).
    pub const ALLOWED_OPCODES: [u8; 2] = [opcode::Readv::CODE, opcode::Writev::CODE];

    /// Whether another request may be started.
    pub fn has_room(&self) -> bool {
        self.order.len() < self.depth
    }

    /// No request is started and not yet retired.
    pub fn is_idle(&self) -> bool {
        self.order.is_empty()
    }

    /// The (emptied) iovec list of the slot the next [`UringQueue::start`] uses, to fill
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

    /// Starts a request over the iovecs just put into [`UringQueue::next_iov`]: a
    /// readv (or writev with `write`) of `len` bytes at `offset` on `fd`.
    /// Requires [`UringQueue::has_room`].
    ///
    /// # Safety
    ///
    /// Until the request is retired ([`UringQueue::next_retired`] returned it) or the
    /// queue is dropped: `fd` stays open, and the memory the iovecs describe stays
    /// mapped and is not accessed through Rust references (the kernel reads or writes
    /// it at any time meanwhile). See the module documentation for how the device
    /// keeps this.
    pub unsafe fn start(
        &mut self,
        head: u16,
        status_addr: GuestAddress,
        write: bool,
        fd: RawFd,
        offset: u64,
        len: u64,
    ) {
        let idx = self.next_slot();
        self.free.pop();
        let s = &mut self.slots[idx];
        s.head = head;
        s.status_addr = status_addr;
        s.write = write;
        s.fd = fd;
        s.len = len;
        s.done = 0;
        s.offset = offset;
        s.iov_pos = 0;
        s.result = None;
        s.errno = 0;
        self.order.push_back(idx as u16);
        self.push(idx);
    }

    /// Queues the submission entry for the rest of slot `idx`'s transfer.
    fn push(&mut self, idx: usize) {
        let s = &self.slots[idx];
        let iov = &s.iov[s.iov_pos..];
        let fd = types::Fd(s.fd);
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
            // SAFETY: the entry points at `s.iov[iov_pos..]`, which is not touched again
            // until the entry's completion is reaped (a slot is reused only after it was
            // retired, and `advance` runs only after the completion), and at guest
            // buffers and an fd that `start`'s caller keeps valid until retirement.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            // Cannot happen (one entry per slot, ring >= depth); submit and retry.
            self.enter(0);
        }
    }

    /// Submits queued entries and waits for at least `want` completions, retrying on
    /// interruptions. Never gives up: requests in flight may still use guest memory.
    fn enter(&mut self, want: usize) {
        loop {
            match self.ring.submit_and_wait(want) {
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
    /// that [`UringQueue::next_retired`] has something to give), blocks until at least
    /// one more request finished. Requires that the queue is not idle.
    pub fn wait(&mut self) {
        if self.front_finished() || self.reap() > 0 {
            // Still submit what was queued since.
            self.submit();
            return;
        }
        self.enter(1);
        self.reap();
    }

    fn front_finished(&self) -> bool {
        self.order
            .front()
            .is_some_and(|&i| self.slots[usize::from(i)].result.is_some())
    }

    /// Submits what was started without waiting.
    pub fn submit(&mut self) {
        if !self.ring.submission().is_empty() {
            self.enter(0);
        }
    }

    /// Takes completions off the ring. Returns how many requests finished.
    fn reap(&mut self) -> usize {
        let mut finished = 0;
        for cqe in self.ring.completion() {
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
                    s.result = Some(STATUS_OK);
                    finished += 1;
                } else {
                    // A short transfer: go on with the rest.
                    self.again.push(cqe.user_data() as u16);
                }
            } else if res == -libc::EINTR || res == -libc::EAGAIN {
                self.again.push(cqe.user_data() as u16);
            } else {
                // 0 (end of file) or an error.
                s.result = Some(STATUS_IOERR);
                s.errno = -res;
                finished += 1;
            }
        }
        while let Some(i) = self.again.pop() {
            self.push(usize::from(i));
        }
        finished
    }

    /// The oldest started request, if it finished.
    pub fn next_retired(&mut self) -> Option<Retired> {
        let &idx = self.order.front()?;
        let s = &self.slots[usize::from(idx)];
        let status = s.result?;
        let r = Retired {
            head: s.head,
            status_addr: s.status_addr,
            status,
            write: s.write,
            len: s.len,
            offset: s.offset,
            errno: s.errno,
        };
        self.order.pop_front();
        self.free.push(idx);
        Some(r)
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // The device never drops a queue with requests in flight; if that ever happens,
        // wait for them rather than let the kernel write into memory that is reused.
        while self
            .order
            .iter()
            .any(|&i| self.slots[usize::from(i)].result.is_none())
        {
            self.enter(1);
            self.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    /// A queue, or `None` (the test is skipped, and says so) when this kernel refuses
    /// io_uring altogether: the daemon then runs its queues synchronously.
    fn queue(depth: usize) -> Option<UringQueue> {
        match UringQueue::new(depth) {
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
            // SAFETY: the path and buffers outlive the completion reaped below.
            unsafe { q.ring.submission().push(&e).unwrap() };
            q.ring.submit_and_wait(1).unwrap();
            let c = q.ring.completion().next().unwrap();
            assert_eq!((c.user_data(), c.result()), (id, -libc::EACCES));
        }
        let e = q
            .ring
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
        let fd = f.as_raw_fd();
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
            unsafe { q.start(i as u16 + 10, GuestAddress(i as u64), false, fd, off, 4096) };
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
        let heads: Vec<u16> = seen.iter().map(|r| r.head).collect();
        assert_eq!(heads, vec![10, 11, 12, 13, 14, 15]);
        for (i, r) in seen.iter().enumerate() {
            if i == 4 {
                assert_eq!(r.status, STATUS_IOERR);
            } else {
                assert_eq!(r.status, STATUS_OK);
                let off = i * 8192;
                assert_eq!(bufs[i][..], data[off..off + 4096]);
            }
        }
    }

    #[test]
    fn writes_land_and_slots_are_reused() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let fd = f.as_raw_fd();
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
                unsafe {
                    q.start(
                        next as u16,
                        GuestAddress(0),
                        true,
                        fd,
                        next as u64 * 512,
                        512,
                    )
                };
                next += 1;
            }
            q.wait();
            while let Some(r) = q.next_retired() {
                assert_eq!(r.status, STATUS_OK);
                assert_eq!(usize::from(r.head), done);
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
        let fd = f.as_raw_fd();
        let Some(mut q) = queue(4) else { return };
        let mut bufs = vec![vec![0u8; 512]; 2];
        for (i, b) in bufs.iter_mut().enumerate() {
            let v = iov(b);
            q.next_iov().push(v);
            // SAFETY: `f` and `bufs` outlive `q` (moved into the thread, dropped
            // before `bufs`) and are not touched meanwhile.
            unsafe { q.start(i as u16, GuestAddress(0), false, fd, 0, 512) };
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
