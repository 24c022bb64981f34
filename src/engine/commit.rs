//! Commit scheduling: group commit for guest flushes and the periodic committer.
//!
//! Many flushes arriving together share one commit: a flush waits for the first
//! commit that *starts* after it arrived (that commit covers every write completed
//! before the flush was received), and whoever finds no commit running leads the
//! next one. The commit itself, and its order of writes and flushes, lives in
//! [`crate::metadata::Metadata::commit`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::metadata::{CommitOutcome, MetadataError};

#[derive(Debug, Default)]
struct GateState {
    running: bool,
    /// Commits started so far.
    started: u64,
    /// The last commit that finished, and its result.
    done: u64,
    last: Option<Result<CommitOutcome, Arc<MetadataError>>>,
    /// A waiter needs the next commit to flush the destination even if nothing changed.
    want_dest_flush: bool,
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
    /// does. `run(flush_dest_always)` performs one commit.
    pub fn commit<F>(&self, flush_dest: bool, run: F) -> Result<CommitOutcome, Arc<MetadataError>>
    where
        F: Fn(bool) -> Result<CommitOutcome, MetadataError>,
    {
        let mut s = self.lock();
        let target = s.started + 1;
        if flush_dest {
            s.want_dest_flush = true;
        }
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
                let force = std::mem::take(&mut s.want_dest_flush);
                drop(s);
                let r = run(force).map_err(Arc::new);
                s = self.lock();
                s.running = false;
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
}

/// A background thread that commits every `interval` when something changed.
/// Stopped and joined on drop (a timer must never outlive what it commits).
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
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread =
            crate::sandbox::spawn(crate::sandbox::ThreadKind::Committer, "commit", move || {
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
    fn concurrent_callers_share_commits() {
        let gate = Arc::new(CommitGate::default());
        let runs = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for _ in 0..16 {
            let (g, r) = (gate.clone(), runs.clone());
            threads.push(std::thread::spawn(move || {
                g.commit(true, |force| {
                    assert!(force);
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
            g2.commit(false, |force| {
                f2.lock().unwrap().push(force);
                std::thread::sleep(Duration::from_millis(100));
                Ok(CommitOutcome::Nothing)
            })
        });
        std::thread::sleep(Duration::from_millis(20));
        // ...a flush arriving now must get its own, forcing, commit.
        let f3 = forced.clone();
        gate.commit(true, |force| {
            f3.lock().unwrap().push(force);
            Ok(CommitOutcome::Nothing)
        })
        .unwrap();
        t.join().unwrap().unwrap();
        assert_eq!(*forced.lock().unwrap(), vec![false, true]);
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
