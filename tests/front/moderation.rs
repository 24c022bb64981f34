// SPDX-License-Identifier: Apache-2.0

//! Interrupt moderation (`--interrupt-hold`, `virtio::moderation`), with the raw frontend
//! of `tests/vu` (EVENT_IDX negotiated, synchronous queues):
//! - a driver that sends one request at a time is answered at once, never held;
//! - a driver that keeps sending while requests complete gets fewer interrupts than
//!   requests, also when kicks come that bring no request;
//! - a driver that sends nothing until it is interrupted (libblkio, fio's submit-and-wait
//!   loops) is not kept waiting for long: holds that catch nothing stop.
//!
//! The holds are made long (tens of milliseconds) so that a hold that should not happen
//! shows in wall-clock time whatever the machine's load.

use std::time::{Duration, Instant};

use crate::support::vu::*;
use vhost_clone::virtio::ServeOptions;

/// Queues that may hold completions for `hold`.
fn held(hold: Duration) -> ServeOptions {
    ServeOptions {
        interrupt_hold: hold,
        ..opts(1)
    }
}

/// `n` 4 KiB reads in buffer slots `0..n`, published with one kick; then, as a driver
/// that sleeps until interrupted, waits for the interrupt before it reaps them.
fn batch(g: &mut Guest, n: u64) {
    let heads: Vec<u16> = (0..n)
        .map(|i| g.prepare(0, i, VIRTIO_BLK_T_IN, i * 8, &[], 4096).0)
        .collect();
    g.publish_many(0, &heads);
    reap(g, n);
}

/// Waits for interrupts until `n` completions were reaped.
fn reap(g: &mut Guest, n: u64) {
    let mut left = n;
    while left > 0 {
        g.wait_interrupt(0);
        while left > 0 && g.used_idx(0) != g.queues[0].used_seen {
            g.wait_used(0);
            left -= 1;
        }
    }
}

#[test]
fn a_driver_at_queue_depth_one_is_never_held() {
    let hold = Duration::from_millis(50);
    let srv = Server::start(MemDisk::new(1 << 20), held(hold));
    let mut g = Guest::start(&srv.path, 1);
    let t0 = Instant::now();
    for _ in 0..20 {
        batch(&mut g, 1);
    }
    // Twenty holds would take a second; a lone request is answered in microseconds.
    let took = t0.elapsed();
    assert!(
        took < hold * 4,
        "20 requests at queue depth 1 took {took:?}: held"
    );
    srv.stop();
}

/// One request at a time, `gap` apart, without waiting for their interrupts, reaping
/// what completed before each (which asks for an interrupt at the next completion, as a
/// driver re-arms after it looked): each request arrives while the queue holds the last
/// one back. `between` runs after each request is published. Returns the interrupts.
fn trickle(g: &mut Guest, n: u64, gap: Duration, mut between: impl FnMut(&mut Guest)) -> u64 {
    let before = g.calls(0, 0);
    let mut reaped = 0;
    for i in 0..n {
        let t = Instant::now();
        let (head, _, _) = g.prepare(0, i, VIRTIO_BLK_T_IN, i * 8, &[], 4096);
        g.publish(0, head);
        between(g);
        std::thread::sleep(gap.saturating_sub(t.elapsed()));
        while g.used_idx(0) != g.queues[0].used_seen {
            g.wait_used(0);
            reaped += 1;
        }
    }
    reap(g, n - reaped);
    g.calls(0, 0) - before
}

#[test]
fn a_driver_that_keeps_sending_gets_fewer_interrupts() {
    let srv = Server::start(MemDisk::new(1 << 20), held(Duration::from_millis(40)));
    let mut g = Guest::start(&srv.path, 1);
    // Two or more requests per interrupt first: the queue learns the driver's depth.
    for _ in 0..4 {
        batch(&mut g, 8);
    }
    // 10 ms apart: the learned window (twice the gap) leaves room for a slow sleep.
    let n = 16;
    let interrupts = trickle(&mut g, n, Duration::from_millis(10), |_| {});
    assert!(
        interrupts <= n * 3 / 4,
        "{interrupts} interrupts for {n} requests sent 10 ms apart"
    );
    srv.stop();
}

#[test]
fn kicks_that_bring_no_request_do_not_shorten_the_holds() {
    // A kick left pending by a request an earlier pass already popped ends the next hold
    // at once with nothing to pop. Counted as a catch, it would teach the queue that the
    // driver answers within microseconds, and the shrunken holds would miss the driver's
    // real requests. Here the driver sends such kicks itself, 1 ms apart after each
    // request, and its next request 5 ms after the last of them.
    let srv = Server::start(MemDisk::new(1 << 20), held(Duration::from_millis(40)));
    let mut g = Guest::start(&srv.path, 1);
    for _ in 0..4 {
        batch(&mut g, 8);
    }
    let n = 16;
    let interrupts = trickle(&mut g, n, Duration::from_millis(9), |g| {
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(1));
            g.queues[0].kick.write(1).unwrap();
        }
    });
    assert!(
        interrupts <= n * 3 / 4,
        "{interrupts} interrupts for {n} requests, each followed by kicks of nothing"
    );
    srv.stop();
}

#[test]
fn holds_stop_when_the_driver_waits_for_its_interrupt() {
    let hold = Duration::from_millis(100);
    let srv = Server::start(MemDisk::new(1 << 20), held(hold));
    let mut g = Guest::start(&srv.path, 1);
    // Batches of 8, each sent only once the last completed: every hold catches nothing.
    // Holding each time would cost 40 batches x 100 ms (4 s); the queue stops after a
    // few empty holds and probes again after 1, 2, 4, 8, 16 interrupts (about 8 holds).
    let t0 = Instant::now();
    for _ in 0..40 {
        batch(&mut g, 8);
    }
    let took = t0.elapsed();
    assert!(
        took < hold * 20,
        "40 batches took {took:?}: the queue kept holding"
    );
    srv.stop();
}

#[test]
fn a_restarted_queue_interrupts_for_completions_before_it() {
    // A daemon killed while it held completions back (or between a completion and its
    // interrupt) leaves them in the used ring, unsignalled; a driver with nothing else
    // in flight sleeps until an interrupt. The next daemon gives one at the ring's start.
    let disk = MemDisk::new(1 << 20);
    let first = Server::start(disk.clone(), opts(1));
    let mut g = Guest::start(&first.path, 1);
    batch(&mut g, 2);
    first.stop();
    let second = Server::start(disk, opts(1));
    g.reconnect(&second.path);
    g.wait_interrupt(0);
    second.stop();
}
