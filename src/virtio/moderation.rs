// SPDX-License-Identifier: Apache-2.0

//! Interrupt moderation of one queue: whether a queue that has completed requests waits
//! briefly for the driver's next request before it interrupts the driver, so that one
//! interrupt covers more completions.
//!
//! An interrupt costs an emulated (TCG) guest far more than the request itself costs us:
//! a guest that keeps many requests in flight but submits them slowly would otherwise get
//! an interrupt for every one or two (docs/benchmarks.md, issue 16, "Guest fio"). Holding is only
//! worth it while the driver is still sending; a driver that waits for our completions
//! before it sends more (libblkio, a guest at QD1) must be interrupted at once.
//!
//! Invariants kept here:
//! - **Never at queue depth 1.** A queue holds only once the driver has had two or more
//!   requests completed per interrupt on average: a lone request is answered at once.
//!   (A driver that drops from a deep queue to depth 1 may see a few waits while the
//!   average falls; they catch nothing, so the next rule ends them after three.)
//! - **Only while holds pay.** Every hold that ends without a new request lowers the
//!   queue's hit rate; below one in two, the queue stops holding and probes again after
//!   a number of interrupts that doubles with each failed probe (up to 1024).
//! - **Bounded.** One hold lasts at most twice the usual wait for the driver's next
//!   request (learned from the holds that caught one), at most `max_hold`; all holds
//!   before one interrupt add up to at most four times `max_hold`.
//!
//! This module decides; the queue loop (`super::device`) waits for the kick and signals.

use std::time::Duration;

/// The shortest hold worth a system call.
const MIN_HOLD: Duration = Duration::from_micros(10);
/// Fixed point: averages are kept in sixteenths.
const ONE: u32 = 16;
/// The longest a queue goes without probing once holds stopped paying, in interrupts.
const MAX_BACKOFF: u32 = 1024;

/// The moderation state of one queue.
#[derive(Debug, Clone)]
pub struct Moderation {
    /// The longest single hold; zero turns moderation off.
    max_hold: Duration,
    /// Requests completed per interrupt, a moving average in sixteenths.
    depth: u32,
    /// Holds that caught a request, a moving average in sixteenths (0..=16).
    hits: u32,
    /// How long the driver's next request took to come in the holds that caught one.
    gap: Duration,
    /// Interrupts to let pass before the next probing hold (holds not paying).
    skip: u32,
    /// What `skip` is set to after the next failed probe.
    backoff: u32,
}

impl Default for Moderation {
    fn default() -> Self {
        Moderation::new(Duration::ZERO)
    }
}

impl Moderation {
    /// Moderation with holds of at most `max_hold` (zero, or anything shorter than the
    /// shortest hold worth a system call: never hold).
    pub fn new(max_hold: Duration) -> Self {
        let max_hold = if max_hold < MIN_HOLD {
            Duration::ZERO
        } else {
            max_hold
        };
        Moderation {
            max_hold,
            depth: ONE,
            hits: ONE,
            gap: max_hold / 2,
            skip: 0,
            backoff: 1,
        }
    }

    /// How long to wait for another request now, having already held `held` since the
    /// last interrupt; `None`: interrupt the driver now.
    pub fn hold(&self, held: Duration) -> Option<Duration> {
        if self.max_hold.is_zero() || self.depth < 2 * ONE || self.skip > 0 {
            return None;
        }
        let window = (self.gap * 2).clamp(MIN_HOLD, self.max_hold);
        let left = (self.max_hold * 4).saturating_sub(held);
        let hold = window.min(left);
        (hold >= MIN_HOLD).then_some(hold)
    }

    /// A hold caught a request after `waited`.
    pub fn caught(&mut self, waited: Duration) {
        self.hits = (self.hits * 3 + ONE) / 4;
        self.gap = (self.gap * 3 + waited) / 4;
        self.backoff = 1;
    }

    /// A hold ended without a request.
    pub fn timed_out(&mut self) {
        self.hits = self.hits * 3 / 4;
        if self.hits < ONE / 2 {
            self.skip = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The driver was interrupted for `completed` requests.
    pub fn interrupted(&mut self, completed: usize) {
        let c = u32::try_from(completed).unwrap_or(u32::MAX).min(1 << 12);
        self.depth = (self.depth * 3 + c * ONE) / 4;
        if self.skip > 0 {
            self.skip -= 1;
            if self.skip == 0 {
                // The probe: one hold at the rate that lets a single catch restart holding.
                self.hits = ONE / 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(150);

    fn at_depth(d: usize) -> Moderation {
        let mut m = Moderation::new(MAX);
        for _ in 0..8 {
            m.interrupted(d);
        }
        m
    }

    #[test]
    fn never_holds_at_depth_one() {
        let m = at_depth(1);
        assert_eq!(m.hold(Duration::ZERO), None);
        // Not even after a history of deep batches once they stop.
        let mut m = at_depth(16);
        assert!(m.hold(Duration::ZERO).is_some());
        for _ in 0..12 {
            m.interrupted(1);
        }
        assert_eq!(m.hold(Duration::ZERO), None);
    }

    #[test]
    fn off_when_max_hold_is_zero() {
        let mut m = Moderation::new(Duration::ZERO);
        for _ in 0..8 {
            m.interrupted(32);
        }
        assert_eq!(m.hold(Duration::ZERO), None);
    }

    #[test]
    fn off_when_max_hold_is_below_the_shortest_hold() {
        for us in [1, 5, 9] {
            let mut m = Moderation::new(Duration::from_micros(us));
            for _ in 0..8 {
                m.interrupted(32);
            }
            assert_eq!(m.hold(Duration::ZERO), None, "{us} us");
            m.caught(Duration::from_micros(1));
            assert_eq!(m.hold(Duration::ZERO), None, "{us} us");
        }
        let mut m = Moderation::new(MIN_HOLD);
        for _ in 0..8 {
            m.interrupted(32);
        }
        assert_eq!(m.hold(Duration::ZERO), Some(MIN_HOLD));
    }

    #[test]
    fn holds_are_bounded_per_interrupt() {
        let m = at_depth(16);
        let first = m.hold(Duration::ZERO).unwrap();
        assert!(first <= MAX && first >= MIN_HOLD);
        assert!(m.hold(MAX * 4 - Duration::from_micros(5)).is_none());
        assert!(m.hold(MAX * 4).is_none());
    }

    #[test]
    fn window_follows_the_driver_s_gap() {
        let mut m = at_depth(16);
        for _ in 0..16 {
            m.caught(Duration::from_micros(20));
        }
        let w = m.hold(Duration::ZERO).unwrap();
        assert!(
            w >= Duration::from_micros(38) && w <= Duration::from_micros(60),
            "{w:?}"
        );
    }

    #[test]
    fn stops_when_holds_do_not_pay_and_probes_with_backoff() {
        let mut m = at_depth(32);
        let mut timeouts = 0;
        while m.hold(Duration::ZERO).is_some() {
            m.timed_out();
            timeouts += 1;
            assert!(timeouts < 10, "still holding after {timeouts} empty holds");
        }
        // Probes come back after 1, 2, 4, ... interrupts, each failing again.
        let mut gaps = Vec::new();
        for _ in 0..6 {
            let mut n = 0;
            loop {
                m.interrupted(32);
                n += 1;
                if m.hold(Duration::ZERO).is_some() {
                    break;
                }
            }
            gaps.push(n);
            m.timed_out();
        }
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32]);
        // A probe that catches a request restarts holding, and the backoff.
        for _ in 0..64 {
            m.interrupted(32);
            if m.hold(Duration::ZERO).is_some() {
                break;
            }
        }
        m.caught(Duration::from_micros(30));
        m.interrupted(32);
        assert!(m.hold(Duration::ZERO).is_some());
        m.timed_out();
        m.interrupted(32);
        assert!(m.hold(Duration::ZERO).is_some(), "one miss after a catch");
    }
}
