// SPDX-License-Identifier: Apache-2.0

//! The frontends of one [`super::serve`] call, and which of them runs the queues.
//!
//! A same-host live migration attaches two QEMU processes to one socket: the incoming
//! QEMU connects and negotiates while the outgoing one still runs the guest, and starts
//! its rings only after the outgoing one stopped its own (GET_VRING_BASE) at switch-over.
//! So up to [`MAX_FRONTENDS`] connections are served at once, each with its own device,
//! guest memory map and queue workers.
//!
//! Invariant: **at most one connection processes requests at any time.** Two running
//! sets of queues would be two guests writing one disk. A queue worker takes the
//! ownership ([`Frontends::acquire`]) before it pops anything; a worker of another
//! connection waits (its requests stay in its ring) until the owner has stopped all the
//! queues it ran or its connection ended. That wait is the hand-over of a migration, and
//! it is logged and counted.
//!
//! This module also keeps what `status` reports about the frontends ([`FrontReport`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::info;

/// Most frontends served at once: a migration's source and target.
pub const MAX_FRONTENDS: usize = 2;

/// How often a waiting queue worker checks whether its own connection is stopping.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// The frontends of one serve call: the queue ownership and the counters status shows.
#[derive(Debug, Default)]
pub struct Frontends {
    owner: Mutex<Owner>,
    released: Condvar,
    /// Connections accepted so far (the next one's id is this + 1).
    accepted: AtomicU64,
    /// Connections attached now.
    connected: AtomicU64,
    /// Times the queues passed from one connection to another.
    handovers: AtomicU64,
    /// Connections whose frontend has dirty-page logging on (migrating).
    logging: AtomicU64,
}

#[derive(Debug, Default)]
struct Owner {
    /// The connection whose queues run, if any.
    conn: Option<u64>,
    /// Its queues that ran since they were last stopped (bit i = queue i).
    running: u64,
    /// The connection that ran queues last.
    last: Option<u64>,
    /// No queue may run yet (a standby before its takeover, [`Frontends::gated`]).
    gated: bool,
    /// A queue waited at the gate: a frontend started its device.
    wanted: bool,
}

/// What `status` shows about the frontends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontReport {
    /// Frontends attached now (two during a same-host migration).
    pub connected: u64,
    /// Connections accepted since the daemon started.
    pub connections: u64,
    /// The connection whose queues run (connections are numbered from 1), if any.
    pub queue_owner: Option<u64>,
    /// Times the queues passed from one connection to another (migrations).
    pub handovers: u64,
    /// A frontend is migrating its guest (dirty-page logging is on).
    pub migrating: bool,
}

impl Frontends {
    /// The frontends of a standby daemon (`serve --standby`): connections are served
    /// and negotiate, but no queue runs until [`Frontends::open_gate`]. Their requests
    /// stay unpopped in their rings, so a connection that ends meanwhile leaves them
    /// to its frontend to submit again, and none of them can reach the disk.
    pub fn gated() -> Frontends {
        let f = Frontends::default();
        f.owner.lock().unwrap_or_else(PoisonError::into_inner).gated = true;
        f
    }

    /// Lets queues run (a standby took the clone over).
    pub fn open_gate(&self) {
        let mut o = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
        o.gated = false;
        self.released.notify_all();
    }

    /// Whether a queue waited at the gate of [`Frontends::gated`]: a frontend started
    /// its device here (the target of a migration, after switch-over).
    pub fn wanted(&self) -> bool {
        self.owner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .wanted
    }

    /// Whether another connection may be attached. While [`MAX_FRONTENDS`] are, the
    /// next one waits in the socket's backlog until one of them ends.
    pub fn has_room(&self) -> bool {
        self.connected.load(Ordering::Acquire) < MAX_FRONTENDS as u64
    }

    /// Counts a new connection; returns its id, or `None` when [`MAX_FRONTENDS`] are
    /// attached already.
    pub fn attach(&self) -> Option<u64> {
        let max = MAX_FRONTENDS as u64;
        self.connected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(self.accepted.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// A connection ended: its queues no longer run.
    pub fn detach(&self, conn: u64) {
        self.release(conn, u64::MAX);
        self.connected.fetch_sub(1, Ordering::AcqRel);
    }

    /// Lets `conn`'s queue `queue` run: returns at once if no other connection runs
    /// queues (and the gate is open), otherwise waits until it stopped them. Returns
    /// `false` (without the ownership) if `stopping()` turns true while waiting.
    pub fn acquire(&self, conn: u64, queue: usize, stopping: impl Fn() -> bool) -> bool {
        let mut o = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut warned = false;
        loop {
            if o.gated {
                if stopping() {
                    return false;
                }
                if !o.wanted {
                    o.wanted = true;
                    info!(
                        conn,
                        "connection {conn} started its queues; their requests wait for the \
                         takeover of the clone"
                    );
                }
                o = self
                    .released
                    .wait_timeout(o, WAIT_SLICE)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                continue;
            }
            match o.conn {
                Some(c) if c == conn => break,
                None => {
                    if o.last.is_some_and(|last| last != conn) {
                        self.handovers.fetch_add(1, Ordering::Relaxed);
                        info!(
                            from = o.last,
                            to = conn,
                            "migration: the queues passed to connection {conn}"
                        );
                    }
                    o.conn = Some(conn);
                    o.last = Some(conn);
                    break;
                }
                Some(other) => {
                    if stopping() {
                        return false;
                    }
                    if !warned {
                        warned = true;
                        info!(
                            conn,
                            owner = other,
                            "connection {conn} waits to run its queues: connection {other} \
                             still runs its own (a migration hands over when the source \
                             stops them)"
                        );
                    }
                    o = self
                        .released
                        .wait_timeout(o, WAIT_SLICE)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        o.running |= queue_bit(queue);
        true
    }

    /// `conn`'s queue `queue` stopped (GET_VRING_BASE, or it found its ring stopped):
    /// once none of its queues runs, another connection may run its own.
    pub fn release_queue(&self, conn: u64, queue: usize) {
        self.release(conn, queue_bit(queue));
    }

    fn release(&self, conn: u64, queues: u64) {
        let mut o = self.owner.lock().unwrap_or_else(PoisonError::into_inner);
        if o.conn != Some(conn) {
            return;
        }
        o.running &= !queues;
        if o.running == 0 {
            o.conn = None;
            self.released.notify_all();
        }
    }

    /// The frontend of `conn` turned dirty-page logging on (`true`) or off.
    pub fn set_migrating(&self, conn: u64, on: bool) {
        if on {
            self.logging.fetch_add(1, Ordering::AcqRel);
            info!(
                conn,
                "migration: connection {conn} is migrating its guest (dirty-page logging on)"
            );
        } else {
            let _ = self
                .logging
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            info!(
                conn,
                "migration: connection {conn} turned dirty-page logging off"
            );
        }
    }

    /// What `status` shows.
    pub fn report(&self) -> FrontReport {
        let owner = self
            .owner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .conn;
        FrontReport {
            connected: self.connected.load(Ordering::Acquire),
            connections: self.accepted.load(Ordering::Acquire),
            queue_owner: owner,
            handovers: self.handovers.load(Ordering::Relaxed),
            migrating: self.logging.load(Ordering::Acquire) > 0,
        }
    }
}

/// The bit of queue `i` (queues above 63 share the last bit; at most 64 exist).
fn queue_bit(i: usize) -> u64 {
    1u64 << i.min(63)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_second_connection_runs_only_after_the_first_stopped_its_queues() {
        let f = Arc::new(Frontends::default());
        let (a, b) = (f.attach().unwrap(), f.attach().unwrap());
        assert!(!f.has_room());
        assert_eq!(f.attach(), None, "a third frontend was attached");
        assert!(f.acquire(a, 0, || false));
        assert!(f.acquire(a, 1, || false));
        let got = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (f, got) = (f.clone(), got.clone());
            std::thread::spawn(move || {
                assert!(f.acquire(b, 0, || false));
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(120));
        f.release_queue(a, 0);
        std::thread::sleep(Duration::from_millis(120));
        assert!(
            !got.load(Ordering::SeqCst),
            "ran while queue 1 of a still ran"
        );
        assert_eq!(f.report().queue_owner, Some(a));
        f.release_queue(a, 1);
        waiter.join().unwrap();
        let r = f.report();
        assert_eq!((r.queue_owner, r.handovers, r.connected), (Some(b), 1, 2));
        // The source goes away after the migration; the target keeps the queues.
        f.detach(a);
        assert_eq!(f.report().queue_owner, Some(b));
        assert!(f.acquire(b, 1, || false));
    }

    #[test]
    fn a_waiting_connection_gives_up_when_it_stops_and_a_detach_releases() {
        let f = Frontends::default();
        let (a, b) = (f.attach().unwrap(), f.attach().unwrap());
        assert!(f.acquire(a, 0, || false));
        let t0 = Instant::now();
        assert!(!f.acquire(b, 0, || t0.elapsed() > Duration::from_millis(100)));
        // The owner's connection dies with its queues running: the other takes over.
        f.detach(a);
        assert!(f.acquire(b, 0, || true));
        assert_eq!(f.report().handovers, 1);
        // A release by a connection that does not own the queues changes nothing.
        f.release_queue(a, 0);
        assert_eq!(f.report().queue_owner, Some(b));
        f.detach(b);
        assert_eq!(
            f.report(),
            FrontReport {
                connected: 0,
                connections: 2,
                queue_owner: None,
                handovers: 1,
                migrating: false,
            }
        );
    }

    /// A standby's gate: no queue runs before it opens, a waiting queue marks the
    /// frontends as wanted, and one whose connection stops gives up unpopped.
    #[test]
    fn a_gated_queue_waits_for_the_gate_and_a_stop_ends_the_wait() {
        let f = Arc::new(Frontends::gated());
        let (a, b) = (f.attach().unwrap(), f.attach().unwrap());
        assert!(!f.wanted());
        let t0 = Instant::now();
        assert!(!f.acquire(a, 0, || t0.elapsed() > Duration::from_millis(100)));
        assert!(f.wanted());
        assert_eq!(f.report().queue_owner, None);
        let waiter = {
            let f = f.clone();
            std::thread::spawn(move || f.acquire(b, 0, || false))
        };
        std::thread::sleep(Duration::from_millis(120));
        assert!(!waiter.is_finished(), "a queue ran before the gate opened");
        f.open_gate();
        assert!(waiter.join().unwrap());
        assert_eq!(f.report().queue_owner, Some(b));
    }
}
