// SPDX-License-Identifier: Apache-2.0

//! The vhost-user-blk device of one connection: the `VhostUserBackend` implementation.
//!
//! A [`BlkDevice`] lives exactly as long as one vhost-user connection (a fresh
//! `VhostUserDaemon` is built per connection, see [`super::server`]); the disk state lives in
//! the [`BlockBackend`] it shares with the next connection.
//!
//! Threads and locks: `queues_per_thread()` is `[1 << i]`, so worker thread `i` owns queue
//! `i` and is the only one to lock `queues[i]`. Queues therefore run in parallel; nothing is
//! shared between them but the backend and a few atomics. GET_VRING_BASE (`stop_vring`)
//! takes the queue's lock too, so it returns only after the requests that worker popped have
//! been completed (the worker runs them synchronously, or through the queue's io_uring,
//! which it drains before it lets go of the lock; see [`crate::storage::queue`]). Shutdown uses the
//! same barrier: [`BlkDevice::quiesce`] sets a flag every queue loop checks before each pop,
//! then takes each queue's lock, before the server closes the connection.
//!
//! Completion rules: every popped chain with a valid head index is added to the used ring,
//! with used length = bytes written into guest buffers including the status byte, or 0 when
//! no status byte could be written. `handle_event` never returns an error because of
//! what a guest did: an `Err` would end the queue's worker thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config::{self, DeviceSpec, SERIAL_LEN};
use super::dirty::{self, DirtyLog};
use super::handover::Frontends;
use super::inflight::{self, InflightArea, QueueLog};
use super::moderation::Moderation;
use super::request::{
    self, guest_io_slices, guest_io_slices_mut, BlkRequest, GuestMemory, ParseLimits, ParsedChain,
    Segments, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use super::vring::FrontVring;
use super::{BlockBackend, IoEngine};
use crate::engine::RegionCopy;
use crate::storage::aio::DirectIo;
use crate::storage::queue::{AsyncQueue, Retired, MAX_IOVECS};

/// Guest memory shared with the vhost-user message handler.
pub type AtomicGuestMemory = GuestMemoryAtomic<GuestMemory>;
/// The vring type used by the device.
pub type Vring = FrontVring<AtomicGuestMemory>;

/// Per-queue state, locked only by the queue's worker (and by `stop_vring`).
#[derive(Debug, Default)]
pub struct QueueState {
    /// The queue's index (for logs).
    index: usize,
    /// A ring that cannot be popped (bogus avail index) was logged since the queue
    /// started (`stop_vring` clears it), so that a broken guest cannot flood the log.
    ring_error_logged: bool,
    /// Requests completed with status OK.
    pub completed: u64,
    /// Requests completed with an error status or retired without one.
    pub failed: u64,
    /// The queue's io_uring, created on first use with [`IoEngine::Uring`].
    uring: Option<AsyncQueue>,
    /// Creating the io_uring failed: the queue runs synchronously.
    uring_unavailable: bool,
    /// The ring ran since it was (re)started: its in-flight area was read.
    started: bool,
    /// This queue's part of the frontend's in-flight area (INFLIGHT_SHMFD), if it keeps
    /// one: requests are recorded there, and may then be retired out of order.
    log: Option<QueueLog>,
    /// Requests a previous daemon left in flight, run before anything new is popped.
    resubmit: VecDeque<ParsedChain>,
    /// When to hold completions back for the driver's next request.
    moderation: Moderation,
}

/// One connection's vhost-user-blk device.
pub struct BlkDevice {
    backend: Arc<dyn BlockBackend>,
    io_engine: IoEngine,
    spec: DeviceSpec,
    limits: ParseLimits,
    serial: [u8; SERIAL_LEN],
    mem: AtomicGuestMemory,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    queues: Vec<Mutex<QueueState>>,
    /// Exit-event pairs created up front (one per worker), so `exit_event` can always return
    /// `Some`: with `None`, dropping the daemon would hang joining workers that never exit.
    exit_events: Mutex<Vec<(EventConsumer, EventNotifier)>>,
    /// Raw fds of the exit-event consumers handed to the daemon. vhost-user-backend 0.24
    /// registers them with `into_raw_fd()` and never closes them; the server closes them
    /// after the daemon (and its workers) are gone.
    exit_fds: Mutex<Vec<RawFd>>,
    /// Backend errors seen (for rate-limited logging).
    errors_logged: AtomicU64,
    /// Set by [`BlkDevice::quiesce`]: no queue pops another chain.
    stopping: AtomicBool,
    /// The frontends of this serve call, which decide which connection runs its queues.
    frontends: Arc<Frontends>,
    /// This connection's id among them.
    conn: u64,
    /// The frontend acked `LOG_ALL`: it is migrating the guest.
    logging: AtomicBool,
    /// The frontend's in-flight area (GET/SET_INFLIGHT_FD), read by each queue at its
    /// start.
    inflight: Mutex<Option<Arc<InflightArea>>>,
    /// io_uring queues retire requests as they finish when the frontend keeps an
    /// in-flight area (`--retire-out-of-order`).
    retire_out_of_order: bool,
}

impl BlkDevice {
    /// A device for connection `conn` of `frontends`.
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        spec: DeviceSpec,
        serial: &str,
        mem: AtomicGuestMemory,
        io_engine: IoEngine,
        (frontends, conn): (Arc<Frontends>, u64),
    ) -> io::Result<Self> {
        let mut s = [0u8; SERIAL_LEN];
        let b = serial.as_bytes();
        let n = b.len().min(SERIAL_LEN);
        s[..n].copy_from_slice(&b[..n]);
        let exit_events = (0..spec.num_queues)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkDevice {
            backend,
            io_engine,
            limits: ParseLimits::from(&spec),
            spec,
            serial: s,
            mem,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            queues: (0..usize::from(spec.num_queues))
                .map(|index| {
                    Mutex::new(QueueState {
                        index,
                        ..QueueState::default()
                    })
                })
                .collect(),
            exit_events: Mutex::new(exit_events),
            exit_fds: Mutex::new(Vec::new()),
            errors_logged: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            frontends,
            conn,
            logging: AtomicBool::new(false),
            inflight: Mutex::new(None),
            retire_out_of_order: false,
        })
    }

    /// Queues may hold completions back for up to `max_hold` while the driver keeps
    /// sending (see [`super::moderation`]); zero: every batch interrupts at once.
    pub fn moderating(self, max_hold: Duration) -> Self {
        for q in &self.queues {
            q.lock().unwrap_or_else(PoisonError::into_inner).moderation = Moderation::new(max_hold);
        }
        self
    }

    /// io_uring queues retire requests as they finish when the frontend keeps an
    /// in-flight area (`--retire-out-of-order`); in pop order otherwise.
    pub fn retiring_out_of_order(mut self, out_of_order: bool) -> Self {
        self.retire_out_of_order = out_of_order;
        self
    }

    /// The fds to close once the daemon that used this device has been dropped.
    pub fn take_exit_fds(&self) -> Vec<RawFd> {
        std::mem::take(&mut *self.exit_fds.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Stops the device before its connection is closed: from now on no queue pops a new
    /// chain (kicks still wake the workers, which find nothing to do), and this returns
    /// once every queue worker has retired the chains it had popped.
    ///
    /// The order matters for a restart: QEMU reads the used index when the connection
    /// drops and a restarted daemon resumes from it, so nothing may be popped or completed
    /// after that point. The barrier is the queue's lock, which a worker holds from its
    /// first pop until its last completion (as for GET_VRING_BASE, see `stop_vring`).
    pub fn quiesce(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for q in &self.queues {
            drop(q.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// Whether [`BlkDevice::quiesce`] was called.
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Makes the dirty-page log of `mem` follow the acked `LOG_ALL` bit (on while the
    /// frontend migrates the guest), and says so when that changes.
    fn apply_logging(&self, mem: &GuestMemory) {
        let acked = self.acked_features.load(Ordering::Acquire);
        let on = acked & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        dirty::set_logging(mem, on);
        if self.logging.swap(on, Ordering::AcqRel) != on {
            self.frontends.set_migrating(self.conn, on);
        }
    }

    /// The connection ended: it no longer counts as migrating, nor runs queues.
    pub fn detach(&self) {
        if self.logging.swap(false, Ordering::AcqRel) {
            self.frontends.set_migrating(self.conn, false);
        }
        self.frontends.detach(self.conn);
    }

    /// Completed / failed counts of queue `i`.
    pub fn queue_counts(&self, i: usize) -> Option<(u64, u64)> {
        let q = self.queues.get(i)?;
        let q = q.lock().unwrap_or_else(PoisonError::into_inner);
        Some((q.completed, q.failed))
    }

    /// Whether completed writes are already covered by the device's write cache semantics
    /// (write-back), or must be made durable before completion (write-through).
    ///
    /// Without FLUSH the driver cannot ask for durability, so the device is write-through.
    /// With FLUSH and CONFIG_WCE the guest's choice (kept by the backend) decides; with FLUSH
    /// only, the device is write-back (VIRTIO 1.2 §5.2.5).
    pub fn writeback(&self) -> bool {
        let acked = self.acked_features.load(Ordering::Acquire);
        if acked & (1 << VIRTIO_BLK_F_FLUSH) == 0 {
            return false;
        }
        if acked & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0 {
            return self.backend.write_cache();
        }
        true
    }

    /// Runs the queue until its avail ring is empty.
    ///
    /// With EVENT_IDX, re-enabling notifications may report more chains; another pass then
    /// pops them. The loop ends when a pass after such a report popped nothing: the ring
    /// claims chains that cannot be popped (the queue was stopped by GET_VRING_BASE, or
    /// the guest set a bogus avail index) and another pass would find the same. Looping
    /// on it would spin holding the queue's lock, so GET_VRING_BASE (which waits for the
    /// lock) and shutdown would never finish. Notifications are enabled by then: the
    /// guest's next kick brings the queue back here.
    fn process_queue(&self, vring: &Vring, q: &mut QueueState) {
        if !q.started && vring.get_ref().get_queue().ready() {
            if !self.start_queue(vring, q) {
                return;
            }
            self.signal_earlier_completions(vring);
        }
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut more_reported = false;
        let mut retired = false;
        let mut batch = 0;
        let mut held = Duration::ZERO;
        // A hold that ended with a kick, until the pass after it shows whether the kick
        // brought a request: one left pending by a request an earlier pass already popped
        // is not a catch, and must not teach the moderation that the driver is fast.
        let mut kicked_after: Option<Duration> = None;
        loop {
            // Calls after GET_VRING_BASE (the queue is not ready) and after `quiesce` find
            // nothing to do; a queue stopped while this loop runs ends it.
            if self.stopping() || !vring.get_ref().get_queue().ready() {
                break;
            }
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    warn!("disable_notification failed: {e}");
                    break;
                }
            }
            let popped = if self.use_uring(q) {
                self.drain_uring(vring, q)
            } else {
                let (popped, r) = self.drain(vring, q);
                retired |= r;
                popped
            };
            batch += popped;
            if let Some(waited) = kicked_after.take() {
                if popped > 0 {
                    q.moderation.caught(waited);
                }
            }
            // Once stopping, the chains left in the ring belong to the next daemon: no
            // second pass for them.
            if !event_idx || self.stopping() || (more_reported && popped == 0) {
                break;
            }
            match vring.enable_notification() {
                // More buffers arrived while notifications were off (or the ring
                // claims some it cannot give: then the next pass pops nothing and ends).
                Ok(true) => more_reported = true,
                Ok(false) => {
                    if !retired {
                        break;
                    }
                    match hold_for_more(vring, &mut q.moderation, &mut held) {
                        Some(waited) => {
                            kicked_after = Some(waited);
                            more_reported = false;
                        }
                        None => break,
                    }
                }
                Err(e) => {
                    warn!("enable_notification failed: {e}");
                    break;
                }
            }
        }
        if retired {
            notify(vring);
            q.moderation.interrupted(batch);
        }
    }

    /// At a ring's first run: interrupts the driver if the ring may hold completions it
    /// was not interrupted for. A daemon killed between a completion and its interrupt, or while it
    /// held completions back (`super::moderation`), left the driver waiting for an
    /// interrupt that never came; a driver with nothing else in flight would wait forever.
    /// A spurious interrupt costs the driver one look at the used ring, so it is sent at
    /// every first run: the used index cannot tell (it wraps to 0 every 65536 completions).
    fn signal_earlier_completions(&self, vring: &Vring) {
        if let Err(e) = vring.signal_used_queue() {
            warn!("signal_used_queue failed: {e}");
        }
    }

    /// A ring's first run since it was (re)started: with an in-flight area, the requests a
    /// previous daemon popped and did not complete are queued for resubmission, and the
    /// ring continues after them (its next avail index is the used index plus their
    /// number, whatever base the frontend set). Returns whether the queue may run now.
    fn start_queue(&self, vring: &Vring, q: &mut QueueState) -> bool {
        q.started = true;
        q.resubmit.clear();
        let area = self
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        q.log = area.and_then(|a| a.queue(u16::try_from(q.index).ok()?));
        let Some(log) = q.log.as_mut() else {
            return true;
        };
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        let used = match queue.used_idx(&*mem, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                warn!(
                    queue = q.index,
                    "the used index cannot be read ({e}); the in-flight area is not used"
                );
                q.log = None;
                return true;
            }
        };
        if queue.size() > log.capacity() {
            warn!(
                queue = q.index,
                "the ring has {} descriptors, the in-flight area room for {}; it is not used",
                queue.size(),
                log.capacity()
            );
            q.log = None;
            return true;
        }
        let rec = match log.recover(used) {
            Ok(rec) => rec,
            Err(e) => {
                // What a garbled area says cannot be trusted: the queue continues from
                // the frontend's base (the used index, exact after a daemon that
                // retired in order, the default) and the area starts afresh.
                warn!(
                    queue = q.index,
                    "{e}; continuing from the used index, with the area reset"
                );
                log.reset(used);
                return true;
            }
        };
        match inflight::resubmit_chains(&mem, queue, &rec.resubmit, &self.limits) {
            Ok(chains) => {
                // At most the ring's size: a u16.
                let n = chains.len() as u16;
                queue.set_next_avail(used.wrapping_add(n));
                if n > 0 {
                    info!(
                        queue = q.index,
                        requests = n,
                        "resubmitting the requests that were in flight when the last \
                         daemon stopped"
                    );
                }
                q.resubmit = chains.into();
                true
            }
            Err(e) => {
                // The area still records them: try again at the next kick rather than
                // pop past them or run completed ones again.
                warn!(queue = q.index, "{e}; the queue waits");
                q.started = false;
                false
            }
        }
    }

    /// Whether queue `q` runs with io_uring; creates its ring on first use.
    fn use_uring(&self, q: &mut QueueState) -> bool {
        if self.io_engine != IoEngine::Uring || q.uring_unavailable {
            return false;
        }
        if q.uring.is_none() {
            match AsyncQueue::new(usize::from(self.spec.queue_size)) {
                Ok(u) => q.uring = Some(u),
                Err(e) => {
                    warn!("cannot create an io_uring, the queue runs synchronously: {e}");
                    q.uring_unavailable = true;
                    return false;
                }
            }
        }
        true
    }

    /// The next available chain, parsed and validated. `None` when the ring has none it
    /// can give: empty, the queue not ready (stopped), or a bogus avail index.
    ///
    /// The checks are made here rather than left to `pop_descriptor_chain`, which logs an
    /// error on every call that finds the queue not ready or the index bogus.
    fn pop(
        &self,
        vring: &Vring,
        q: &mut QueueState,
        mem: &GuestMemoryLoadGuard<GuestMemory>,
    ) -> Option<ParsedChain> {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        if !queue.ready() {
            return None;
        }
        if let Some(chain) = q.resubmit.pop_front() {
            return Some(chain);
        }
        let next = queue.next_avail();
        let avail = match queue.avail_idx(&**mem, Ordering::Acquire) {
            Ok(idx) => idx.0,
            Err(e) => {
                self.ring_error(q, format_args!("the avail index cannot be read: {e}"));
                return None;
            }
        };
        let pending = avail.wrapping_sub(next);
        if pending == 0 {
            return None;
        }
        if pending > queue.size() {
            let size = queue.size();
            self.ring_error(
                q,
                format_args!(
                    "bogus avail index {avail}: {pending} chains after the next one \
                     ({next}) in a ring of {size}"
                ),
            );
            return None;
        }
        let chain = queue.pop_descriptor_chain(mem.clone())?;
        drop(state);
        if let Some(log) = q.log.as_mut() {
            log.popped(chain.head_index());
        }
        Some(request::parse_chain(chain, &self.limits))
    }

    /// A ring nothing can be popped from: logged once per queue start.
    fn ring_error(&self, q: &mut QueueState, what: std::fmt::Arguments<'_>) {
        if !q.ring_error_logged {
            q.ring_error_logged = true;
            warn!(
                queue = q.index,
                "{what}; nothing is popped from this queue while it lasts \
                 (logged once per queue start)"
            );
        }
    }

    /// Synchronous queue loop: each request runs to completion before the next is popped.
    /// Returns the number of chains popped.
    fn drain(&self, vring: &Vring, q: &mut QueueState) -> (usize, bool) {
        let mem = self.mem.memory();
        let mut retired = false;
        let mut popped = 0;
        while !self.stopping() {
            let Some(parsed) = self.pop(vring, q, &mem) else {
                break;
            };
            popped += 1;
            let (status, written) = self.run(&mem, &parsed);
            retired |= self.complete(vring, q, &mem, parsed.head, parsed.status, status, written);
        }
        (popped, retired)
    }

    /// io_uring queue loop (see [`crate::storage::queue`]): reads and writes the backend
    /// grants a permit for ([`BlockBackend::direct_io`]) are started as they are popped,
    /// up to the ring's depth, and retired in order; any other request waits for the
    /// queue to be idle and runs synchronously. Returns only when the queue is idle and
    /// the avail ring empty, with the number of chains popped.
    fn drain_uring(&self, vring: &Vring, q: &mut QueueState) -> usize {
        let mem = self.mem.memory();
        // The permits of the requests in flight, by tag; all are finished before
        // this function returns (the queue is idle then). Declared before the queue so
        // that, should a panic unwind from here, the queue (whose drop waits for the
        // kernel) goes first and the copies' buffers after it.
        let mut flight = Permits::default();
        // The destination write's iovecs of a region copy (scratch).
        let mut copy_iov = Vec::new();
        let Some(mut uq) = q.uring.take() else {
            return 0;
        };
        // Without an in-flight area a restart replays from the used index, so requests
        // must be retired in the order they were popped. With one, a restart resubmits
        // whatever is in flight and they may retire as they finish; that measured
        // slower for a TCG guest at QD32 (docs/benchmarks.md), so it is opt-in.
        uq.set_in_order(q.log.is_none() || !self.retire_out_of_order);
        // Region copies in flight at most: each holds a region-long buffer.
        let max_copies = COPY_BYTES_IN_FLIGHT / u64::from(self.backend.optimal_io_size()).max(1);
        let mut popped = 0;
        loop {
            let mut retired = false;
            // Once stopping, pop nothing more but retire what is in flight.
            while uq.has_room() && !self.stopping() {
                let Some(parsed) = self.pop(vring, q, &mem) else {
                    break;
                };
                popped += 1;
                let head = parsed.head;
                if let Some((status_addr, offset, len, permit)) =
                    self.direct_plan(&mem, &parsed, uq.next_iov())
                {
                    let write = permit.is_write();
                    let target = permit.target().clone();
                    let read_into = match parsed.request {
                        Ok(BlkRequest::Read { data, .. }) => data,
                        _ => Segments::new(),
                    };
                    let tag = flight.insert(Flight {
                        head,
                        status: status_addr,
                        read_into,
                        io: FlightIo::Direct(permit),
                    });
                    // SAFETY: the iovecs point into guest memory mapped by `mem`, which
                    // this function holds until it returns, and it returns only once the
                    // queue is idle (every request retired). This queue forms no Rust
                    // references to guest memory meanwhile: requests it runs itself wait
                    // until it is idle, and headers and status bytes are read and written
                    // with volatile accesses. Other queues, like the guest, may touch the
                    // same bytes concurrently, as `request::guest_io_slices` documents
                    // for guest memory in general. The target's fd is the backend's,
                    // open while `self.backend` lives.
                    unsafe { uq.start(tag, &target, write, offset, len) };
                    continue;
                }
                if max_copies > 0 {
                    // Room for one more copy first (harmless for a barrier, which
                    // waits for everything anyway).
                    while flight.copies as u64 >= max_copies && !uq.is_idle() {
                        uq.wait();
                        if self.retire_uring(vring, q, &mem, &mut uq, &mut flight) {
                            notify(vring);
                        }
                    }
                    if let Some((status_addr, copy)) = self.copy_plan(&mem, &parsed, &mut copy_iov)
                    {
                        self.start_copy(&mut uq, &mut flight, head, status_addr, copy, &copy_iov);
                        continue;
                    }
                }
                // A barrier: everything started before it completes first.
                while !uq.is_idle() {
                    uq.wait();
                    if self.retire_uring(vring, q, &mem, &mut uq, &mut flight) {
                        notify(vring);
                    }
                }
                let (status, written) = self.run(&mem, &parsed);
                retired |= self.complete(vring, q, &mem, head, parsed.status, status, written);
            }
            uq.submit();
            retired |= self.retire_uring(vring, q, &mem, &mut uq, &mut flight);
            if retired {
                notify(vring);
            }
            if uq.is_idle() {
                break;
            }
            uq.wait();
        }
        q.uring = Some(uq);
        popped
    }

    /// Whether `parsed` can go to the io_uring, and with what: fills `iov` and returns
    /// (status address, offset, length, permit).
    fn direct_plan(
        &self,
        mem: &GuestMemory,
        parsed: &ParsedChain,
        iov: &mut Vec<libc::iovec>,
    ) -> Option<(GuestAddress, u64, u64, DirectIo<'_>)> {
        let status_addr = parsed.status?;
        let (write, offset, len, data) = match parsed.request.as_ref().ok()? {
            BlkRequest::Read { offset, len, data } => (false, *offset, *len, data),
            // Write-through writes need a flush before completion: synchronous path.
            BlkRequest::Write { offset, len, data } if self.writeback() => {
                (true, *offset, *len, data)
            }
            _ => return None,
        };
        // The backend's check first: it is a bitmap lookup, and the chains it refuses
        // (copies, mixed ranges) would build their buffer lists twice otherwise.
        let permit = self.backend.direct_io(write, offset, len)?;
        let a = permit.target().align();
        let usable = request::guest_iovecs(mem, data, iov, MAX_IOVECS).is_ok()
            && offset % a.max(1) as u64 == 0
            && aligned(iov, a);
        if !usable {
            permit.cancel();
            return None;
        }
        Some((status_addr, offset, len, permit))
    }

    /// Whether `parsed` is a write the backend lets this queue copy into an unhydrated
    /// region itself ([`BlockBackend::region_copy`]), and with what: fills `iov` with the
    /// destination write's buffers (the region's head from the copy's buffer, the
    /// guest's data, its tail) and returns (status address, copy).
    fn copy_plan(
        &self,
        mem: &GuestMemory,
        parsed: &ParsedChain,
        iov: &mut Vec<libc::iovec>,
    ) -> Option<(GuestAddress, RegionCopy<'_>)> {
        let status_addr = parsed.status?;
        let (offset, len, data) = match parsed.request.as_ref().ok()? {
            // Write-through writes need a flush before completion: synchronous path.
            BlkRequest::Write { offset, len, data } if self.writeback() => (*offset, *len, data),
            _ => return None,
        };
        let mut copy = self.backend.region_copy(offset, len)?;
        let a = copy.source().align().max(copy.dest().align());
        let usable = copy.write_iovecs(iov, |iov| {
            let guest = iov.len();
            request::guest_iovecs(mem, data, iov, MAX_IOVECS - 2).is_ok()
                && aligned(&iov[guest..], a)
        });
        if !usable {
            copy.cancel();
            return None;
        }
        Some((status_addr, copy))
    }

    /// Starts a region copy planned by [`Self::copy_plan`] on the queue's io_uring: the
    /// region's read into the copy's buffer (unless the write covers the region), then
    /// the destination write of `write_iov`.
    fn start_copy<'a>(
        &self,
        uq: &mut AsyncQueue,
        flight: &mut Permits<'a>,
        head: u16,
        status: GuestAddress,
        mut copy: RegionCopy<'a>,
        write_iov: &[libc::iovec],
    ) {
        let start = copy.start();
        let write_len: u64 = write_iov.iter().map(|v| v.iov_len as u64).sum();
        let (source, dest) = (copy.source().clone(), copy.dest().clone());
        let read = copy.read_len().map(|len| (copy.buffer(), len));
        let tag = flight.insert(Flight {
            head,
            status,
            read_into: Segments::new(),
            io: FlightIo::Copy(copy),
        });
        let iov = uq.next_iov();
        match read {
            Some((buf, len)) => {
                iov.push(libc::iovec {
                    iov_base: buf.cast(),
                    iov_len: len as usize,
                });
                // SAFETY: the read goes into the copy's buffer, which lives in `flight`
                // until the request is retired, and no reference to it is formed
                // meanwhile; the write's iovecs are that buffer and guest memory, kept
                // mapped and unreferenced as for a direct request (see `drain_uring`).
                // Both fds are the backend's, open while `self.backend` lives.
                unsafe {
                    uq.start_read_then_write(
                        tag, &source, start, len, &dest, start, write_len, write_iov,
                    )
                };
            }
            None => {
                iov.extend_from_slice(write_iov);
                // SAFETY: as for a direct write (see `drain_uring`): guest memory held
                // mapped until the queue is idle, the backend's fd.
                unsafe { uq.start(tag, &dest, true, start, write_len) };
            }
        }
    }

    /// Retires the io_uring requests that finished, in order. Returns whether any was.
    fn retire_uring(
        &self,
        vring: &Vring,
        q: &mut QueueState,
        mem: &GuestMemory,
        uq: &mut AsyncQueue,
        flight: &mut Permits<'_>,
    ) -> bool {
        let mut retired = false;
        while let Some(r) = uq.next_retired() {
            let Some(Flight {
                head,
                status: status_addr,
                read_into,
                io,
            }) = flight.take(r.tag)
            else {
                // Cannot happen: every tag is a permit inserted just before its
                // start and taken once, here.
                error!(
                    tag = r.tag,
                    "io_uring retired a request this queue never started"
                );
                debug_assert!(false, "unknown io_uring tag {}", r.tag);
                continue;
            };
            // Before the guest is told: a flush that follows covers this write, and a
            // copied region is marked hydrated (so a restart reads the guest's data).
            let ok = r.result.is_ok();
            let copy = matches!(io, FlightIo::Copy(_));
            let marked = match io {
                FlightIo::Direct(permit) => {
                    permit.finish(ok);
                    Ok(())
                }
                FlightIo::Copy(copy) => copy.finish(ok),
            };
            let status = match (r.result, marked) {
                (Err(errno), _) => self.log_direct_failure(&r, errno, copy),
                (Ok(()), Err(e)) => self.error_status("write", r.offset, &io::Error::other(e)),
                (Ok(()), Ok(())) => {
                    // The kernel wrote the data: into the migration log before the guest
                    // is told.
                    dirty::mark_written(mem, &read_into);
                    STATUS_OK
                }
            };
            let written = if r.write || status != STATUS_OK {
                0
            } else {
                // len <= 4 GiB - 1: virtio-queue ends chains that exceed 2^32 bytes.
                u32::try_from(r.len).unwrap_or(u32::MAX)
            };
            retired |= self.complete(vring, q, mem, head, Some(status_addr), status, written);
        }
        retired
    }

    /// Logs a direct request (or a step of a region `copy`) that failed; returns the
    /// status for the guest.
    fn log_direct_failure(&self, r: &Retired, errno: i32, copy: bool) -> u8 {
        let op = match (copy, r.write) {
            (true, true) => "region copy's write",
            (true, false) => "region copy's read",
            (false, true) => "write",
            (false, false) => "read",
        };
        let cause = match errno {
            0 => "unexpected end of file".to_string(),
            n => io::Error::from_raw_os_error(n).to_string(),
        };
        let e = io::Error::other(format!(
            "io_uring {op} of {} bytes at offset {} failed: {cause}",
            r.len, r.offset
        ));
        self.error_status(op, r.offset, &e);
        STATUS_IOERR
    }

    /// Runs a parsed chain synchronously: the status byte and the data bytes written.
    fn run(&self, mem: &GuestMemory, parsed: &ParsedChain) -> (u8, u32) {
        match &parsed.request {
            Ok(req) => self.execute(mem, req),
            Err(e) => {
                debug!(head = parsed.head, "refused request: {e}");
                (e.status(), 0)
            }
        }
    }

    /// Writes the status byte and adds the chain to the used ring. Returns whether it
    /// was added.
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        vring: &Vring,
        q: &mut QueueState,
        mem: &GuestMemory,
        head: u16,
        status_addr: Option<GuestAddress>,
        status: u8,
        written: u32,
    ) -> bool {
        let used = match status_addr {
            Some(addr) => match mem.write_obj(status, addr) {
                Ok(()) => written.saturating_add(1),
                Err(_) => 0,
            },
            None => 0,
        };
        if status == STATUS_OK && used > 0 {
            q.completed += 1;
        } else {
            q.failed += 1;
        }
        let added = match &q.log {
            Some(log) => {
                log.completing(head);
                // One lock hold: the used entry, and the index it moved to.
                let mut v = vring.get_mut();
                v.add_used(head, used).map(|()| {
                    log.completed(head, v.get_queue().next_used());
                })
            }
            None => vring.add_used(head, used),
        };
        match added {
            Ok(()) => true,
            Err(e) => {
                warn!(head, "add_used failed: {e}");
                false
            }
        }
    }

    /// Run a validated request. Returns the status byte and the data bytes written into
    /// guest buffers.
    fn execute(&self, mem: &GuestMemory, req: &BlkRequest) -> (u8, u32) {
        let ok = STATUS_OK;
        match req {
            BlkRequest::Read { offset, len, data } => {
                let mut bufs = match guest_io_slices_mut(mem, data) {
                    Ok(b) => b,
                    Err(e) => return (e.status(), 0),
                };
                match self.backend.read(*offset, &mut bufs) {
                    Ok(()) => {
                        // Written behind vm-memory's back: into the migration log.
                        dirty::mark_written(mem, data);
                        // len <= 4 GiB - 1: virtio-queue ends chains that exceed 2^32 bytes.
                        (ok, u32::try_from(*len).unwrap_or(u32::MAX))
                    }
                    Err(e) => (self.error_status("read", *offset, &e), 0),
                }
            }
            BlkRequest::Write { offset, len, data } => {
                let bufs = match guest_io_slices(mem, data) {
                    Ok(b) => b,
                    Err(e) => return (e.status(), 0),
                };
                debug_assert_eq!(bufs.iter().map(|b| b.len() as u64).sum::<u64>(), *len);
                if let Err(e) = self.backend.write(*offset, &bufs) {
                    return (self.error_status("write", *offset, &e), 0);
                }
                (self.write_through(), 0)
            }
            BlkRequest::Flush => match self.backend.flush() {
                Ok(()) => (ok, 0),
                Err(e) => (self.error_status("flush", 0, &e), 0),
            },
            BlkRequest::GetId { data } => match request::scatter(mem, data, &self.serial) {
                Ok(n) => (ok, n),
                Err(e) => (e.status(), 0),
            },
            BlkRequest::Discard(ranges) => {
                for r in ranges {
                    if let Err(e) = self.backend.discard(r.offset, r.len) {
                        return (self.error_status("discard", r.offset, &e), 0);
                    }
                }
                (self.write_through(), 0)
            }
            BlkRequest::WriteZeroes(ranges) => {
                for r in ranges {
                    if let Err(e) = self.backend.write_zeroes(r.offset, r.len, r.unmap) {
                        return (self.error_status("write-zeroes", r.offset, &e), 0);
                    }
                }
                (self.write_through(), 0)
            }
        }
    }

    /// After a successful write-type request: flush first when the device is write-through.
    fn write_through(&self) -> u8 {
        if self.writeback() {
            return STATUS_OK;
        }
        match self.backend.flush() {
            Ok(()) => STATUS_OK,
            Err(e) => self.error_status("flush (write-through)", 0, &e),
        }
    }

    /// A backend error for a guest request: logged (the first 20, then every
    /// 1000th, so that a failing disk cannot flood the log) and turned into a status.
    fn error_status(&self, op: &'static str, offset: u64, e: &io::Error) -> u8 {
        let status = io_status(e);
        if status == STATUS_UNSUPP {
            debug!(op, offset, "unsupported: {e}");
            return status;
        }
        let n = self.errors_logged.fetch_add(1, Ordering::Relaxed);
        if n < 20 || n % 1000 == 0 {
            warn!(
                op,
                offset,
                errors = n + 1,
                "guest request failed: {}",
                crate::error_chain(e)
            );
        }
        status
    }
}

/// Interrupts the driver if the ring's notification rules ask for it.
fn notify(vring: &Vring) {
    match vring.needs_notification() {
        Ok(true) => {
            if let Err(e) = vring.signal_used_queue() {
                warn!("signal_used_queue failed: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => warn!("needs_notification failed: {e}"),
    }
}

/// Holds the completions of a queue back for the driver's next request if its
/// moderation says so; `held` is the time held since the last interrupt. Returns how long
/// it waited if a kick came (then the queue runs again before the driver is interrupted,
/// and the caller tells the moderation whether the kick brought a request); `None`: no
/// hold, or one that ended without a kick (counted here).
fn hold_for_more(vring: &Vring, m: &mut Moderation, held: &mut Duration) -> Option<Duration> {
    let hold = m.hold(*held)?;
    let t0 = Instant::now();
    let kicked = wait_kick(vring, hold);
    let waited = t0.elapsed();
    *held += waited;
    if kicked {
        Some(waited)
    } else {
        m.timed_out();
        None
    }
}

/// Waits up to `timeout` for a kick of `vring`, and consumes it. Returns whether one came.
fn wait_kick(vring: &Vring, timeout: Duration) -> bool {
    // The read lock keeps the kick fd open (SET_VRING_KICK replaces it under the write lock).
    let state = vring.get_ref();
    let Some(kick) = state.get_kick() else {
        return false;
    };
    let mut pfd = libc::pollfd {
        fd: kick.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: timeout.as_nanos().min(999_999_999) as libc::c_long,
    };
    // SAFETY: one valid pollfd for an fd kept open by the ring's read lock, a valid
    // timespec, no signal mask.
    let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if n == 1 && pfd.revents & libc::POLLIN != 0 {
        let _ = kick.consume();
        return true;
    }
    false
}

/// Whether every buffer of `iov` starts and ends on a multiple of `a` (0 or 1: none
/// needed), as O_DIRECT asks of addresses and lengths.
fn aligned(iov: &[libc::iovec], a: usize) -> bool {
    a <= 1
        || iov
            .iter()
            .all(|v| (v.iov_base as usize) % a == 0 && v.iov_len % a == 0)
}

/// Backend error to status byte: `Unsupported` means UNSUPP, anything else IOERR.
fn io_status(e: &io::Error) -> u8 {
    if e.kind() == ErrorKind::Unsupported {
        STATUS_UNSUPP
    } else {
        STATUS_IOERR
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.spec.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.spec.queue_size)
    }

    fn features(&self) -> u64 {
        self.spec.features()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
        self.apply_logging(&self.mem.memory());
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        config::protocol_features()
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (num_queues, queue_size) = (msg.num_queues, msg.queue_size);
        let limits = (self.spec.num_queues, self.spec.queue_size);
        let (area, file) = InflightArea::create((num_queues, queue_size), limits)
            .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        let len = area.byte_len();
        *self.inflight.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(area));
        debug!(num_queues, queue_size, "created an in-flight area");
        Ok((VhostUserInflight::new(len, 0, num_queues, queue_size), file))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let area = InflightArea::open(
            file,
            (msg.mmap_offset, msg.mmap_size),
            (msg.num_queues, msg.queue_size),
            (self.spec.num_queues, self.spec.queue_size),
        )
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
        *self.inflight.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(area));
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.spec
            .read_config(offset, size, self.backend.write_cache())
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        match config::parse_set_config(offset, buf) {
            Some(wb) => {
                debug!(writeback = wb, "guest set the write cache mode");
                self.backend.set_write_cache(wb);
                Ok(())
            }
            None => Err(io::Error::new(
                ErrorKind::InvalidInput,
                "only the writeback field of the config space is writable",
            )),
        }
    }

    fn update_memory(&self, _mem: AtomicGuestMemory) -> io::Result<()> {
        // The daemon swapped the contents of the GuestMemoryAtomic it was created with,
        // which is the one this device holds; the new regions start with logging off.
        self.apply_logging(&self.mem.memory());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.spec.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // The daemon calls this once per worker thread, at construction.
        let pair = self
            .exit_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let pair = match pair {
            Some(p) => Some(p),
            None => new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                .map_err(|e| warn!("cannot create exit eventfd: {e}"))
                .ok(),
        };
        if let Some((consumer, _)) = &pair {
            self.exit_fds
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(consumer.as_raw_fd());
        }
        pair
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Wait for the worker to finish what it popped: it holds this lock while it works.
        if let Some(q) = self.queues.get(queue_index as usize) {
            let mut q = q.lock().unwrap_or_else(PoisonError::into_inner);
            // The next start of the queue may log a broken ring again, and reads the
            // in-flight area again (requests left to resubmit stay recorded there).
            q.ring_error_logged = false;
            q.started = false;
            q.resubmit.clear();
        }
        // A migration's switch-over (the queue stops while the frontend logs dirty
        // pages): what it completed is made durable and committed now, before QEMU gets
        // the base. The target may be a daemon on another host that takes the clone over
        // when this one stops; if this one dies instead, the takeover still has it.
        if self.logging.load(Ordering::Acquire) {
            match self.backend.flush() {
                Ok(()) => info!(
                    queue = queue_index,
                    "migration: queue stopped at switch-over; what it completed is committed"
                ),
                Err(e) => warn!(
                    queue = queue_index,
                    error = %e,
                    "migration: the commit at switch-over failed; the final commit retries it"
                ),
            }
        }
        // Nothing of this queue is in flight any more: at a migration's switch-over, once
        // every queue of the source stopped, the target's queues may run.
        self.frontends
            .release_queue(self.conn, queue_index as usize);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(vring), Some(q)) = (
            vrings.get(usize::from(device_event)),
            self.queues.get(thread_id),
        ) else {
            return Ok(());
        };
        // One connection runs queues at a time (see `handover`): outside the queue's lock,
        // so that GET_VRING_BASE and `quiesce` are not held up by the wait.
        // Worker `thread_id` runs queue `thread_id` (`queues_per_thread`); `device_event`
        // is the queue's index among the worker's own.
        let queue = thread_id;
        if !self.frontends.acquire(self.conn, queue, || self.stopping()) {
            return Ok(());
        }
        let mut q = q.lock().unwrap_or_else(PoisonError::into_inner);
        self.process_queue(vring, &mut q);
        drop(q);
        if !vring.get_ref().get_queue().ready() {
            // Stopped (maybe before this kick was handled): it does not hold the
            // ownership.
            self.frontends.release_queue(self.conn, queue);
        }
        Ok(())
    }
}

/// One io_uring request of a queue, from its start to its retirement.
struct Flight<'a> {
    /// The chain's head (what goes into the used ring).
    head: u16,
    /// Where its status byte goes.
    status: GuestAddress,
    /// A read's guest buffers, marked in the migration log once the data is there.
    read_into: Segments,
    io: FlightIo<'a>,
}

/// Bytes of region copies one io_uring queue keeps in flight at most (each copy holds a
/// region-long buffer): 128 copies of 64 KiB regions, 8 of 1 MiB; regions larger than
/// this are copied synchronously.
const COPY_BYTES_IN_FLIGHT: u64 = 8 << 20;

/// What a request in flight on the io_uring was granted.
enum FlightIo<'a> {
    /// A read or write of the guest's buffers.
    Direct(DirectIo<'a>),
    /// A write into an unhydrated region: the region's copy with the guest's data.
    Copy(RegionCopy<'a>),
}

/// The requests of one queue in flight, by the tag their queue knows them by (a slot
/// index here, reused once retired).
#[derive(Default)]
struct Permits<'a> {
    slots: Vec<Option<Flight<'a>>>,
    free: Vec<usize>,
    /// How many of them are region copies.
    copies: usize,
}

impl<'a> Permits<'a> {
    fn insert(&mut self, flight: Flight<'a>) -> u64 {
        self.copies += usize::from(matches!(flight.io, FlightIo::Copy(_)));
        let entry = Some(flight);
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = entry;
                i as u64
            }
            None => {
                self.slots.push(entry);
                (self.slots.len() - 1) as u64
            }
        }
    }

    fn take(&mut self, tag: u64) -> Option<Flight<'a>> {
        let i = usize::try_from(tag).ok()?;
        let e = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        self.copies -= usize::from(matches!(e.io, FlightIo::Copy(_)));
        Some(e)
    }
}
