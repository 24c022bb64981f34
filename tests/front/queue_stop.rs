// SPDX-License-Identifier: Apache-2.0

//! Stopping queues at the vhost-user level, with the raw frontend of `tests/vu`:
//! - shutdown (SIGTERM) stops every queue from popping new chains and lets each finish
//!   what it popped *before* the connection is closed, so the used index QEMU reads when
//!   the connection drops is final (a restarted daemon replays from it);
//! - a queue whose ring cannot make progress (a bogus avail index, or a queue stopped by
//!   GET_VRING_BASE while requests are pending) with EVENT_IDX negotiated does not spin
//!   holding its lock: GET_VRING_BASE answers and shutdown returns.
//!
//! Every wait has a timeout, so a regression fails instead of hanging the test run. When a
//! wait times out the server is leaked on purpose: dropping it would join a worker that
//! never returns.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::vu::*;
use crate::support::within_leaking;
use vhost::VhostBackend;
use vhost_clone::virtio::{BlockBackend, IoEngine, ServeOptions};

/// A backend whose reads and writes take `delay` each; counts the calls that started.
struct SlowDisk {
    inner: Arc<MemDisk>,
    delay: Duration,
    started: AtomicU64,
}

impl SlowDisk {
    fn new(size: usize, delay: Duration) -> Arc<SlowDisk> {
        Arc::new(SlowDisk {
            inner: MemDisk::new(size),
            delay,
            started: AtomicU64::new(0),
        })
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` calls started (10 s at most).
    fn wait_started(&self, n: u64) {
        let t0 = Instant::now();
        while self.started() < n {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the backend never saw request {n}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl BlockBackend for SlowDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn optimal_io_size(&self) -> u32 {
        self.inner.optimal_io_size()
    }
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.inner.read(offset, bufs)
    }
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.inner.write(offset, bufs)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn write_cache(&self) -> bool {
        self.inner.write_cache()
    }
    fn set_write_cache(&self, writeback: bool) {
        self.inner.set_write_cache(writeback)
    }
}

fn engine_opts(engine: IoEngine) -> ServeOptions {
    ServeOptions {
        io_engine: engine,
        ..opts(1)
    }
}

/// Waits until the serve thread of `srv` has returned; fails (leaking it) after `limit`.
fn wait_serve_returned(srv: &mut Server, limit: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    while !srv.thread.as_ref().unwrap().is_finished() {
        if t0.elapsed() > limit {
            // Leak the thread: joining it would hang (Server::drop joins).
            std::mem::forget(srv.thread.take());
            panic!("{what}: serve() did not return within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = srv.thread.take().unwrap().join().unwrap();
    r.expect("serve() failed");
    t0.elapsed()
}

/// Waits until the backend closed the vhost-user connection (POLLRDHUP/POLLHUP on the
/// frontend's socket), at most `limit`. Returns false on timeout.
fn wait_connection_closed(g: &Guest, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: g.fe.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, exclusively borrowed for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n == 1 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// Shutdown while a queue holds many slow requests: the requests popped before the
/// trigger complete before the connection closes, nothing else is popped, not even chains
/// published (and kicked) after the trigger.
fn shutdown_retires_popped_requests_first(engine: IoEngine) {
    const FIRST: u64 = 24;
    const LATER: u64 = 8;
    let disk = SlowDisk::new(4 << 20, Duration::from_millis(200));
    let mut srv = Server::start(disk.clone(), engine_opts(engine));
    let mut g = Guest::start(&srv.path, 1);
    assert!(g.has(F_EVENT_IDX));

    let mut heads = Vec::new();
    for i in 0..FIRST {
        let data = pattern(4096, i as u8);
        heads.push(g.prepare(0, i, VIRTIO_BLK_T_OUT, i * 8, &data, 0).0);
    }
    g.publish_many(0, &heads);
    disk.wait_started(1);
    let popped_at_trigger = disk.started();
    srv.shutdown.trigger();
    // Chains published and kicked after the trigger must not be popped either.
    let mut later = Vec::new();
    for i in FIRST..FIRST + LATER {
        let data = pattern(4096, i as u8);
        later.push(g.prepare(0, i, VIRTIO_BLK_T_OUT, i * 8, &data, 0).0);
    }
    g.publish_many(0, &later);

    assert!(
        wait_connection_closed(&g, Duration::from_secs(20)),
        "the connection was not closed within 20 s of the shutdown"
    );
    let used_at_close = u64::from(g.used_idx(0));
    // Every request popped has entered the backend (they run one at a time). The queue
    // learns of the trigger through the server's watcher thread, so one more may have
    // been popped in between (only if the first had finished: it takes 200 ms).
    let popped = disk.started();
    wait_serve_returned(&mut srv, Duration::from_secs(30), "shutdown");
    std::thread::sleep(Duration::from_millis(300));
    let used_after = u64::from(g.used_idx(0));
    assert_eq!(
        used_at_close, popped,
        "used index when the connection closed ({used_at_close}) is not the number of \
         requests popped ({popped}; {popped_at_trigger} before the shutdown was triggered)"
    );
    assert_eq!(
        used_after, popped,
        "requests were completed after the connection closed (used index {used_after}, \
         {popped} popped before the shutdown)"
    );
    assert_eq!(
        disk.started(),
        popped,
        "requests were popped and run after the connection closed"
    );
    assert!(
        popped <= popped_at_trigger + 1,
        "{popped} requests popped, {popped_at_trigger} before the shutdown was triggered"
    );
    // The completed ones carry an OK status and their data.
    for k in 0..popped {
        let (id, len) = g.wait_used(0);
        assert_eq!((id, len), (u32::from(heads[k as usize]), 1));
    }
}

#[test]
fn shutdown_stops_popping_before_closing_the_connection_sync() {
    shutdown_retires_popped_requests_first(IoEngine::Sync);
}

#[test]
fn shutdown_stops_popping_before_closing_the_connection_uring() {
    if let Err(e) = io_uring::IoUring::new(1) {
        eprintln!("io_uring is not available here ({e}): the queue falls back to sync");
    }
    shutdown_retires_popped_requests_first(IoEngine::Uring);
}

/// Makes the avail index of queue 0 claim more chains than the ring holds.
fn bogus_avail_index(g: &mut Guest) {
    let tq = &g.queues[0];
    let bogus = tq.avail_idx.wrapping_add(tq.size + 5);
    g.write_mem(tq.avail + 2, &bogus.to_le_bytes());
    std::sync::atomic::fence(Ordering::SeqCst);
    g.queues[0].kick.write(1).unwrap();
}

/// GET_VRING_BASE of queue 0, with a time limit. Returns the base and the guest back.
fn get_vring_base(g: Guest, srv: Server, limit: Duration) -> (u32, Guest, Server) {
    let fe = g.fe.clone();
    let (base, (g, srv), _) = within_leaking(limit, "GET_VRING_BASE", (g, srv), move || {
        fe.get_vring_base(0).expect("GET_VRING_BASE failed")
    });
    (base, g, srv)
}

#[test]
fn bogus_avail_index_does_not_block_get_vring_base() {
    let disk = MemDisk::new(4 << 20);
    let srv = Server::start(disk.clone(), opts(1));
    let mut g = Guest::start(&srv.path, 1);
    assert!(g.has(F_EVENT_IDX));
    assert_eq!(g.read(0, 0, 4096).0, S_OK);
    bogus_avail_index(&mut g);
    // Give a spinning worker the time to take its lock and spin.
    std::thread::sleep(Duration::from_millis(200));
    let (base, g, srv) = get_vring_base(g, srv, Duration::from_secs(5));
    assert_eq!(base, 1, "the queue popped nothing after the bogus index");
    drop(g);
    srv.stop();
}

#[test]
fn stopped_queue_with_pending_chains_does_not_block_get_vring_base() {
    let disk = SlowDisk::new(4 << 20, Duration::from_millis(1000));
    let srv = Server::start(disk.clone(), opts(1));
    let mut g = Guest::start(&srv.path, 1);
    assert!(g.has(F_EVENT_IDX));
    let (h0, s0, _) = g.prepare(0, 0, VIRTIO_BLK_T_IN, 0, &[], 4096);
    g.publish_many(0, &[h0]);
    disk.wait_started(1);
    // While the first request is in the backend: more chains, then GET_VRING_BASE, which
    // marks the queue not ready and waits for the worker's lock.
    let (h1, _, _) = g.prepare(0, 1, VIRTIO_BLK_T_IN, 8, &[], 4096);
    let (h2, _, _) = g.prepare(0, 2, VIRTIO_BLK_T_IN, 16, &[], 4096);
    g.publish_many(0, &[h1, h2]);
    let (base, mut g, srv) = get_vring_base(g, srv, Duration::from_secs(5));
    assert_eq!(base, 1, "GET_VRING_BASE must report the one chain popped");
    assert_eq!(g.wait_used(0), (u32::from(h0), 4097));
    assert_eq!(g.read_mem(s0, 1)[0], S_OK);
    g.assert_idle(0, 200);
    assert_eq!(disk.started(), 1);
    drop(g);
    srv.stop();
}

#[test]
fn shutdown_returns_with_a_bogus_ring_attached() {
    let disk = MemDisk::new(4 << 20);
    let mut srv = Server::start(disk.clone(), opts(1));
    let mut g = Guest::start(&srv.path, 1);
    assert!(g.has(F_EVENT_IDX));
    assert_eq!(g.read(0, 0, 4096).0, S_OK);
    bogus_avail_index(&mut g);
    std::thread::sleep(Duration::from_millis(200));
    srv.shutdown.trigger();
    let took = wait_serve_returned(&mut srv, Duration::from_secs(5), "bogus ring");
    assert!(took < Duration::from_secs(5));
    drop(g);
}
