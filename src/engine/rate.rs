//! The hydration rate, measured by the daemon itself over a sliding window.
//!
//! A sampler thread ([`super::Engine::start_rate_sampler`]) records the
//! hydrated region count every [`SAMPLE_INTERVAL`]; the rate is the progress
//! between the oldest and the newest sample of the last [`DEFAULT_WINDOW`].
//! Readers (status, metrics, the service manager's status line) only read it,
//! so asking often or never does not change the answer, and the first `status`
//! after start-up already sees a measured rate.
//!
//! Invariant: the samples are ordered by time, the window keeps at least one,
//! and their number is bounded by `window / SAMPLE_INTERVAL` plus one (older
//! samples are dropped as new ones arrive; samples closer together than half
//! an interval replace the newest instead of adding one).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often the sampler records progress.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How far back the rate looks.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

/// Samples of a monotonic count over a sliding window of time.
#[derive(Debug)]
pub struct RateWindow {
    window: Duration,
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    /// A window of length `window` starting with one sample.
    pub fn new(window: Duration, now: Instant, count: u64) -> RateWindow {
        let mut samples = VecDeque::new();
        samples.push_back((now, count));
        RateWindow { window, samples }
    }

    /// Records `count` at `now`. Samples from the past (`now` before the newest
    /// sample) are ignored; one less than half an interval after the newest
    /// replaces it (the bound on the sample count).
    pub fn record(&mut self, now: Instant, count: u64) {
        let several = self.samples.len() > 1;
        match self.samples.back_mut() {
            Some((t, _)) if now < *t => return,
            Some((t, c)) if now.duration_since(*t) < SAMPLE_INTERVAL / 2 && several => {
                *t = now;
                *c = count;
            }
            _ => self.samples.push_back((now, count)),
        }
        // Keep the newest sample at least `window` old as the start, so that
        // the rate covers the whole window and not less.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= self.window)
        {
            self.samples.pop_front();
        }
    }

    /// Units per second between the oldest and the newest sample; 0 with fewer
    /// than two samples or when they are too close to tell (under 0.5 s).
    pub fn rate(&self) -> f64 {
        let (Some(&(t0, c0)), Some(&(t1, c1))) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        let dt = t1.duration_since(t0).as_secs_f64();
        if dt < 0.5 {
            return 0.0;
        }
        c1.saturating_sub(c0) as f64 / dt
    }

    /// Samples held (for tests of the bound).
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Never true: the window always holds a sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn steady_progress_gives_its_rate() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(DEFAULT_WINDOW, t0, 100);
        assert_eq!(w.rate(), 0.0, "one sample: no rate yet");
        for i in 1..=30u64 {
            w.record(t0 + secs(i as f64), 100 + 50 * i);
        }
        assert!((w.rate() - 50.0).abs() < 1e-9, "{}", w.rate());
        // Bounded: about window / interval samples.
        assert!(w.len() <= 12, "{} samples", w.len());
    }

    #[test]
    fn the_rate_forgets_what_left_the_window() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(DEFAULT_WINDOW, t0, 0);
        // A burst: 1000 regions in the first 5 s...
        for i in 1..=5u64 {
            w.record(t0 + secs(i as f64), 200 * i);
        }
        assert!((w.rate() - 200.0).abs() < 1e-9);
        // ...then nothing: the rate falls, and is 0 once the burst left the window.
        w.record(t0 + secs(10.0), 1000);
        assert!((w.rate() - 100.0).abs() < 1e-9, "{}", w.rate());
        for i in 11..=16u64 {
            w.record(t0 + secs(i as f64), 1000);
        }
        assert_eq!(w.rate(), 0.0);
    }

    #[test]
    fn the_first_second_already_has_a_rate() {
        // The bug this replaces: a rate sampled only when asked was 0 at the first ask.
        let t0 = Instant::now();
        let mut w = RateWindow::new(DEFAULT_WINDOW, t0, 0);
        w.record(t0 + secs(1.0), 64);
        assert!((w.rate() - 64.0).abs() < 1e-9);
    }

    #[test]
    fn close_or_backward_samples_do_not_distort_it() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(DEFAULT_WINDOW, t0, 0);
        w.record(t0 + secs(0.1), 1_000_000);
        assert_eq!(w.rate(), 0.0, "0.1 s is too short to tell");
        w.record(t0 + secs(2.0), 20);
        w.record(t0 + secs(2.1), 21);
        w.record(t0 + secs(1.0), 5000); // from the past: ignored
        assert_eq!(w.len(), 3);
        assert!((w.rate() - 10.0).abs() < 1e-9, "{}", w.rate());
        // A count that goes down (cannot happen for hydration) gives 0, not a negative rate.
        w.record(t0 + secs(3.0), 0);
        assert_eq!(w.rate(), 0.0);
    }
}
