//! Background hydration: a thread that copies the remaining regions in
//! batches of adjacent regions, under the operator's control (dm-clone's
//! `enable_hydration`, `disable_hydration`, `hydration_threshold`,
//! `hydration_batch_size`).
//!
//! * At most `threshold` regions are locked (copying or being hydrated by guest
//!   requests) when a batch starts; a batch takes at most `batch_size` regions.
//! * It yields to guest I/O: while guest requests are in flight it pauses
//!   `yield_delay` between batches (dm-clone stops completely, which never
//!   finishes under a steady guest load; we slow down instead).
//! * It never copies a region the guest holds (try-lock) or has hydrated (the
//!   bit is re-checked under the lock), and the bits go through the same
//!   two-phase commit as everything else.
//! * A failed copy leaves the region unhydrated, is logged (once per run of
//!   failures, and again every 60: a source outage fails every batch), and is
//!   retried after `retry_delay`; the first success after failures is logged.
//! * With a rate limit (`hydration-rate`, bytes per second, 0 unlimited) it
//!   paces itself with a [`TokenBucket`]: a batch is capped to what the budget
//!   holds (at least one region) and waits until the budget allows it; only the
//!   bytes it read from the source are charged (holes are free). Guest requests,
//!   including the copies their partial writes need, never wait for it.
//! * The thread is stopped and joined on drop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::throttle::{Pace, TokenBucket};
use super::{Engine, HydrateStep};
use crate::metadata::Mode;

/// Default `hydration_threshold` (regions in flight).
pub const DEFAULT_THRESHOLD: u64 = 64;
/// Default `hydration_batch_size` (adjacent regions per copy).
pub const DEFAULT_BATCH_SIZE: u64 = 16;
/// Largest `hydration_threshold`: each region in flight holds a lock entry.
pub const MAX_THRESHOLD: u64 = 65_536;
/// Largest `hydration_batch_size`: a batch holds one lock guard per region (the
/// copy itself goes through a bounded buffer, see `storage::copy_range`).
pub const MAX_BATCH_SIZE: u64 = 4096;

/// Checks a `hydration_threshold` from an operator (command line or message).
pub fn check_threshold(n: u64) -> Result<u64, String> {
    if n > MAX_THRESHOLD {
        return Err(format!(
            "hydration threshold {n} is more than {MAX_THRESHOLD} regions"
        ));
    }
    Ok(n)
}

/// Checks a `hydration_batch_size` from an operator (command line or message).
pub fn check_batch_size(n: u64) -> Result<u64, String> {
    if n > MAX_BATCH_SIZE {
        return Err(format!(
            "hydration batch size {n} is more than {MAX_BATCH_SIZE} regions"
        ));
    }
    Ok(n)
}

/// Run-time settings of the hydrator, shared with the control socket.
#[derive(Debug)]
pub struct HydrationControl {
    enabled: AtomicBool,
    threshold: AtomicU64,
    batch_size: AtomicU64,
    detect_zeroes: AtomicBool,
    /// Bytes per second background hydration may read; 0 is unlimited.
    rate_limit: AtomicU64,
    wake: (Mutex<bool>, Condvar),
}

impl HydrationControl {
    /// New settings, with no rate limit ([`HydrationControl::set_rate_limit`]).
    pub fn new(enabled: bool, threshold: u64, batch_size: u64, detect_zeroes: bool) -> Arc<Self> {
        Arc::new(HydrationControl {
            enabled: AtomicBool::new(enabled),
            threshold: AtomicU64::new(threshold.min(MAX_THRESHOLD)),
            batch_size: AtomicU64::new(batch_size.min(MAX_BATCH_SIZE)),
            detect_zeroes: AtomicBool::new(detect_zeroes),
            rate_limit: AtomicU64::new(0),
            wake: (Mutex::new(false), Condvar::new()),
        })
    }

    /// Is background hydration enabled?
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Enables or disables it (copies in flight finish).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
        self.wake();
    }

    /// Regions allowed in flight; 0 stops background hydration.
    pub fn threshold(&self) -> u64 {
        self.threshold.load(Ordering::Acquire)
    }

    /// Sets the threshold (capped at [`MAX_THRESHOLD`]).
    pub fn set_threshold(&self, n: u64) {
        self.threshold
            .store(n.min(MAX_THRESHOLD), Ordering::Release);
        self.wake();
    }

    /// Adjacent regions per copy (0 and 1 both mean single regions).
    pub fn batch_size(&self) -> u64 {
        self.batch_size.load(Ordering::Acquire)
    }

    /// Sets the batch size (capped at [`MAX_BATCH_SIZE`]).
    pub fn set_batch_size(&self, n: u64) {
        self.batch_size
            .store(n.min(MAX_BATCH_SIZE), Ordering::Release);
        self.wake();
    }

    /// Write all-zero source data as holes.
    pub fn detect_zeroes(&self) -> bool {
        self.detect_zeroes.load(Ordering::Acquire)
    }

    /// Bytes per second background hydration may read from the source; 0 is
    /// unlimited.
    pub fn rate_limit(&self) -> u64 {
        self.rate_limit.load(Ordering::Acquire)
    }

    /// Sets the rate limit (0: unlimited); a hydrator waiting for budget
    /// wakes up and applies it.
    pub fn set_rate_limit(&self, bytes_per_second: u64) {
        self.rate_limit.store(bytes_per_second, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        let (m, cv) = &self.wake;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// Sleeps up to `d`, or until woken by a settings change or stop.
    fn sleep(&self, d: Duration) {
        let (m, cv) = &self.wake;
        let g = m.lock().unwrap_or_else(|p| p.into_inner());
        let (mut g, _) = cv
            .wait_timeout_while(g, d, |woken| !*woken)
            .unwrap_or_else(|p| p.into_inner());
        *g = false;
    }
}

/// Timing of the hydrator loop.
#[derive(Debug, Clone, Copy)]
pub struct HydratorTiming {
    /// Pause between batches while guest I/O is in flight.
    pub yield_delay: Duration,
    /// Pause after a failed copy.
    pub retry_delay: Duration,
    /// Pause when there is nothing to do (disabled, done, threshold reached).
    pub idle_delay: Duration,
}

impl Default for HydratorTiming {
    fn default() -> Self {
        HydratorTiming {
            yield_delay: Duration::from_millis(2),
            retry_delay: Duration::from_secs(1),
            idle_delay: Duration::from_millis(200),
        }
    }
}

/// The background hydration thread; stopped and joined on drop.
#[derive(Debug)]
pub struct Hydrator {
    ctl: Arc<HydrationControl>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Hydrator {
    /// Starts hydrating `engine` in the background.
    pub fn start(
        engine: &Arc<Engine>,
        ctl: Arc<HydrationControl>,
        timing: HydratorTiming,
    ) -> std::io::Result<Hydrator> {
        let stop = Arc::new(AtomicBool::new(false));
        let (weak, c, s) = (Arc::downgrade(engine), ctl.clone(), stop.clone());
        let thread = crate::sandbox::spawn(
            crate::sandbox::ThreadKind::Hydrator,
            "hydrator",
            move || run(weak, c, s, timing),
        )?;
        Ok(Hydrator {
            ctl,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (a copy in progress finishes first).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.ctl.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Hydrator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    weak: std::sync::Weak<Engine>,
    ctl: Arc<HydrationControl>,
    stop: Arc<AtomicBool>,
    t: HydratorTiming,
) {
    let mut announced_done = false;
    let mut failures: u64 = 0;
    let mut bucket: Option<TokenBucket> = None;
    while !stop.load(Ordering::Acquire) {
        let Some(engine) = weak.upgrade() else { return };
        let md = engine.metadata();
        if md.all_hydrated() {
            if !announced_done {
                tracing::info!("background hydration complete");
                announced_done = true;
            }
            drop(engine);
            ctl.sleep(t.idle_delay);
            continue;
        }
        if !ctl.enabled() || md.mode() != Mode::Rw {
            drop(engine);
            ctl.sleep(t.idle_delay);
            continue;
        }
        let room = ctl.threshold().saturating_sub(engine.regions_in_flight());
        if room == 0 {
            drop(engine);
            ctl.sleep(t.yield_delay);
            continue;
        }
        let batch = ctl.batch_size().max(1).min(room);
        let (rate, now) = (ctl.rate_limit(), Instant::now());
        let bucket = bucket
            .get_or_insert_with(|| TokenBucket::new(rate, engine.geometry().region_size(), now));
        bucket.set_rate(rate, now);
        let batch = match bucket.pace(batch, now) {
            Pace::Go(n) => n,
            Pace::Wait(d) => {
                drop(engine);
                // Not longer than idle: the loop re-checks completion and mode.
                ctl.sleep(d.min(t.idle_delay));
                continue;
            }
        };
        match engine.hydrate_batch(batch, ctl.detect_zeroes()) {
            Ok(HydrateStep::Hydrated { bytes_read, .. }) => {
                bucket.charge(bytes_read);
                if failures > 0 {
                    tracing::info!(failed_batches = failures, "background hydration resumed");
                    failures = 0;
                }
                if engine.ios_in_flight() > 0 {
                    drop(engine);
                    ctl.sleep(t.yield_delay);
                }
            }
            Ok(HydrateStep::Busy) => {
                drop(engine);
                ctl.sleep(t.yield_delay);
            }
            Ok(HydrateStep::Done) => {}
            Err(e) => {
                // A source outage fails every batch until it ends: say so once,
                // then again every 60 failures, and once more when it resumes.
                if failures % 60 == 0 {
                    tracing::warn!(error = %crate::error_chain(&e), failed_batches = failures + 1, "background hydration failed; retrying later");
                } else {
                    tracing::debug!(error = %crate::error_chain(&e), "background hydration failed again");
                }
                failures += 1;
                drop(engine);
                ctl.sleep(t.retry_delay);
            }
        }
    }
}
