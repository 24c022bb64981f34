// SPDX-License-Identifier: Apache-2.0

//! Helpers shared by the integration test targets (docs/TESTING.md), each
//! under one name: every target includes this directory as `mod support` and
//! uses what it needs as `crate::support::NAME`.
//!
//! * [`sectors`]: self-describing sector contents (a tag and the sector number,
//!   so a torn, misplaced or stale sector is told apart) and engines over
//!   simulated devices;
//! * [`vu`]: an in-memory backend, `serve()` in a thread on a real unix socket,
//!   and a raw vhost-user frontend with guest memory that plays the guest;
//! * [`daemon`]: running the built `vhost-clone` binary (one-shot commands, a
//!   served daemon killed on drop) and a libblkio client for it;
//! * [`nbd`]: NBD servers (qemu-nbd, nbdkit, and a scripted hostile one).
//!
//! Not every target uses every helper.
#![allow(dead_code)]

pub mod daemon;
pub mod nbd;
pub mod sectors;
pub mod vu;

use std::time::{Duration, Instant};

/// Calls `f` every 10 ms until it returns true or `limit` passes; returns its
/// last answer.
pub fn poll_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Fails the test unless `f` returns true within `limit` (polled every 10 ms).
pub fn wait_until(limit: Duration, what: &str, f: impl FnMut() -> bool) {
    assert!(poll_until(limit, f), "{what}: not within {limit:?}");
}

/// Runs `f` in a thread; fails the test if it takes longer than `limit` (a
/// hang), else returns its result and how long it took.
pub fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, Duration) {
    let (v, (), took) = within_leaking(limit, "the call", (), f);
    (v, took)
}

/// [`within`] for a call that may hang while `leak` is alive: on a timeout the
/// thread and `leak` are leaked (never joined or dropped, which could hang too)
/// before the test fails with `what`; else `leak` is handed back.
pub fn within_leaking<T: Send + 'static, L>(
    limit: Duration,
    what: &str,
    leak: L,
    f: impl FnOnce() -> T + Send + 'static,
) -> (T, L, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => (v, leak, t.elapsed()),
        Err(_) => {
            std::mem::forget(leak);
            panic!("{what} did not finish within {limit:?} (hung)");
        }
    }
}
