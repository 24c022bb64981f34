//! Commit scheduling: group commit for guest flushes and the periodic committer.
//!
//! Many flushes arriving together share one commit: a flush waits for the first
//! commit that *starts* after it arrived (that commit covers every write completed
//! before the flush was received), and whoever finds no commit running leads the
//! next one. The commit itself, and its order of writes and flushes, lives in
//! [`crate::metadata::Metadata::commit`].
//!
//! [`CommitLatency`] keeps the durations of the commits the engine runs (a
//! fixed-bucket histogram of atomics, read by status and metrics); the
//! periodic thread type [`Committer`] also drives the hydration-rate sampler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metadata::{CommitOutcome, MetadataError};

/// What a commit owes the destination besides rule 1 (a commit that records
/// bits always flushes the destination first, see
/// [`crate::metadata::Metadata::commit`]). Callers say what they need; whether
/// the destination is then flushed is decided in one place,
/// [`crate::engine::Engine::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum DestFlush {
    /// Nothing more: the periodic commit, a change of the write-cache mode.
    #[default]
    IfRecording,
    /// Every destination write completed before the commit started must be
    /// durable when it returns, even if there is nothing to record: a guest
    /// flush, a shutdown.
    Completed,
}

#[derive(Debug, Default)]
struct GateState {
    running: bool,
    /// Commits started so far.
    started: u64,
    /// The last commit that finished, and its result.
    done: u64,
    last: Option<Result<CommitOutcome, Arc<MetadataError>>>,
    /// What the waiters of the next commit need of the destination (the most any asked).
    want: DestFlush,
    /// When the running commit started, and when the last one finished (for
    /// the service manager's watchdog: a commit that never ends is a hang).
    running_since: Option<Instant>,
    last_done_at: Option<Instant>,
}

/// What the commit gate is doing, for health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitActivity {
    /// How long the commit in progress has been running (None: none runs).
    pub running_for: Option<Duration>,
    /// How long ago the last commit finished, successfully or not (None: none did yet).
    pub since_last: Option<Duration>,
}

/// Serialises commits and lets concurrent callers share them.
#[derive(Debug, Default)]
pub struct CommitGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

impl CommitGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a commit that starts after this call, leading it if nobody else
    /// does. `run(need)` performs one commit, for the most any of the callers it
    /// serves needs.
    pub fn commit<F>(&self, need: DestFlush, run: F) -> Result<CommitOutcome, Arc<MetadataError>>
    where
        F: Fn(DestFlush) -> Result<CommitOutcome, MetadataError>,
    {
        let mut s = self.lock();
        let target = s.started + 1;
        s.want = s.want.max(need);
        loop {
            if s.done >= target {
                if let Some(r) = &s.last {
                    return r.clone();
                }
            }
            if !s.running {
                s.running = true;
                s.started += 1;
                let me = s.started;
                let need = std::mem::take(&mut s.want);
                s.running_since = Some(Instant::now());
                drop(s);
                let r = run(need).map_err(Arc::new);
                s = self.lock();
                s.running = false;
                s.running_since = None;
                s.last_done_at = Some(Instant::now());
                s.done = me;
                s.last = Some(r.clone());
                self.cv.notify_all();
                if me >= target {
                    return r;
                }
            } else {
                s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Number of commits run so far (shared ones count once).
    pub fn commits_run(&self) -> u64 {
        self.lock().done
    }

    /// What the gate is doing now. Blocks while the gate's lock is held, which
    /// is never for long unless the daemon is deadlocked (and then a caller
    /// that stops too is the right answer for a watchdog).
    pub fn activity(&self) -> CommitActivity {
        let s = self.lock();
        CommitActivity {
            running_for: s.running_since.map(|t| t.elapsed()),
            since_last: s.last_done_at.map(|t| t.elapsed()),
        }
    }
}

/// Upper bounds (seconds) of the commit-latency buckets: a commit is two or
/// three flushes, from tens of microseconds (page cache) to seconds (a slow disk).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A histogram of commit durations: one counter per bucket of
/// [`LATENCY_BUCKETS`] plus one for longer commits, a count and a sum.
/// Observations and snapshots are lock-free; a snapshot taken during an
/// observation may see its bucket without its sum (off by one commit).
#[derive(Debug, Default)]
pub struct CommitLatency {
    /// `buckets[i]` counts durations in `(LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]]`;
    /// the last counts those above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// A point-in-time copy of a [`CommitLatency`].
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// `(upper bound in seconds, observations in that bucket alone)`; the last
    /// bound is `f64::INFINITY`. Not cumulative.
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observed durations, seconds.
    pub sum_seconds: f64,
}

impl CommitLatency {
    /// Records one commit's duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        LatencySnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A background thread that commits every `interval` when something changed.
/// Stopped and joined on drop (a timer must never outlive what it commits).
/// Any periodic job can use it ([`Committer::start_named`]).
#[derive(Debug)]
pub struct Committer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts the thread; `tick` is called every `interval`.
    pub fn start<F>(interval: Duration, tick: F) -> std::io::Result<Committer>
    where
        F: Fn() + Send + 'static,
    {
        Self::start_named("commit", interval, tick)
    }

    /// Starts a thread named `name` that calls `tick` every `interval`.
    pub fn start_named<F>(name: &str, interval: Duration, tick: F) -> std::io::Result<Committer>
    where
        F: Fn() + Send + 'static,
    {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread =
            crate::sandbox::spawn(crate::sandbox::ThreadKind::Committer, name, move || {
                let (m, cv) = &*s;
                let mut stopped = m.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let (g, _) = cv
                        .wait_timeout(stopped, interval)
                        .unwrap_or_else(|p| p.into_inner());
                    stopped = g;
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    tick();
                    stopped = m.lock().unwrap_or_else(|p| p.into_inner());
                }
            })?;
        Ok(Committer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let (m, cv) = &*self.stop;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    #[test]
    fn activity_shows_a_running_commit_and_the_last_finished_one() {
        let gate = Arc::new(CommitGate::default());
        let idle = gate.activity();
        assert_eq!((idle.running_for, idle.since_last), (None, None));
        let g2 = gate.clone();
        let t = std::thread::spawn(move || {
            g2.commit(DestFlush::IfRecording, |_| {
                std::thread::sleep(Duration::from_millis(200));
                Ok(CommitOutcome::Nothing)
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        let running = gate.activity();
        assert!(
            running
                .running_for
                .is_some_and(|d| d >= Duration::from_millis(50)),
            "{running:?}"
        );
        t.join().unwrap().unwrap();
        let done = gate.activity();
        assert_eq!(done.running_for, None);
        assert!(done.since_last.is_some_and(|d| d < Duration::from_secs(5)));
    }

    #[test]
    fn concurrent_callers_share_commits() {
        let gate = Arc::new(CommitGate::default());
        let runs = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..16 {
            let (g, r) = (gate.clone(), runs.clone());
            threads.push(std::thread::spawn(move || {
                g.commit(DestFlush::Completed, |need| {
                    assert_eq!(need, DestFlush::Completed);
                    r.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    Ok(CommitOutcome::Nothing)
                })
                .unwrap();
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let n = runs.load(Ordering::SeqCst);
        assert!((1..16).contains(&n), "16 flushes took {n} commits");
    }

    #[test]
    fn a_flush_waits_for_a_commit_that_starts_after_it() {
        let gate = Arc::new(CommitGate::default());
        let g2 = gate.clone();
        let forced = Arc::new(Mutex::new(Vec::new()));
        let f2 = forced.clone();
        // A slow, non-forcing (periodic) commit is running...
        let t = std::thread::spawn(move || {
            g2.commit(DestFlush::IfRecording, |need| {
                f2.lock().unwrap().push(need);
                std::thread::sleep(Duration::from_millis(100));
                Ok(CommitOutcome::Nothing)
            })
        });
        std::thread::sleep(Duration::from_millis(20));
        // ...a flush arriving now must get its own, forcing, commit.
        let f3 = forced.clone();
        gate.commit(DestFlush::Completed, |need| {
            f3.lock().unwrap().push(need);
            Ok(CommitOutcome::Nothing)
        })
        .unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(
            *forced.lock().unwrap(),
            vec![DestFlush::IfRecording, DestFlush::Completed]
        );
    }

    #[test]
    fn latency_lands_in_the_right_buckets() {
        let l = CommitLatency::default();
        l.observe(Duration::from_micros(50)); // <= 0.0001
        l.observe(Duration::from_micros(100)); // <= 0.0001 (bounds are inclusive)
        l.observe(Duration::from_millis(3)); // <= 0.005
        l.observe(Duration::from_secs(10)); // > 2.5
        let s = l.snapshot();
        assert_eq!(s.count, 4);
        assert!((s.sum_seconds - 10.00315).abs() < 1e-9, "{}", s.sum_seconds);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS.len() + 1);
        let at = |bound: f64| s.buckets.iter().find(|b| b.0 == bound).unwrap().1;
        assert_eq!(at(0.0001), 2);
        assert_eq!(at(0.0025), 0);
        assert_eq!(at(0.005), 1);
        assert_eq!(at(f64::INFINITY), 1);
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), s.count);
    }

    #[test]
    fn committer_ticks_and_stops_promptly() {
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        let mut c = Committer::start(Duration::from_millis(10), move || {
            n2.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        c.stop();
        assert!(t.elapsed() < Duration::from_millis(100));
        let seen = n.load(Ordering::SeqCst);
        assert!(seen >= 2);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(n.load(Ordering::SeqCst), seen, "ticked after stop");
    }
}
