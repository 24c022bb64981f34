//! The hydration rate limit: the one grammar for a rate an operator gives
//! (`serve --hydration-rate` and the `hydration-rate` message), and the token
//! bucket the background hydrator paces itself with (like QEMU block-stream's
//! `speed`: a network source is shared with other tenants).
//!
//! Invariants of [`TokenBucket`]: it never holds more than its burst (the
//! larger of [`BURST_TIME`] of budget and one region), so that over any
//! interval of length `t` the hydrator is granted at most `burst + rate × t`
//! bytes; a grant is never more than the bucket holds, so it is never in debt
//! unless charged for more than it granted. Only bytes background hydration
//! actually read from the source are charged: holes of a sparse source cost
//! nothing, and guest requests never pass through the bucket (they are never
//! throttled). Time comes from the caller (`now`), so the bucket is
//! deterministic under test.

use std::time::{Duration, Instant};

/// How much budget the bucket holds at most, in time at the current rate
/// (but never less than one region, so a region can always be copied).
pub const BURST_TIME: Duration = Duration::from_millis(100);

/// Parses a rate in bytes per second: digits, then optionally a unit, `B`
/// or a binary `K`, `M`, `G`, `T` (`KiB`, `MiB`, ... alike), then optionally
/// `/s`; case-insensitive. `0` means unlimited. Examples: `0`, `1048576`,
/// `100M`, `100MiB/s`, `512k`, `1000000B/s` ([`format_rate`] without its
/// space). Anything else is refused, `MB` and `Mb` too (decimal megabytes or
/// megabits? — say `M` or `MiB`).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let refuse = || {
        format!(
            "'{s}' is not a rate in bytes per second (digits with an optional K, M, G or T, binary, \
             and an optional /s: 0 for unlimited, 1048576, 512K, 100M, 100MiB/s)"
        )
    };
    let lower = s.trim().to_ascii_lowercase();
    let t = lower.strip_suffix("/s").unwrap_or(&lower);
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let shift = match unit {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(refuse()),
    };
    if num.is_empty() {
        return Err(refuse());
    }
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A rate for people: `unlimited` for 0, else in the largest binary unit
/// that divides it (`100 MiB/s`, `1536 KiB/s`, `1000000 B/s`).
pub fn format_rate(n: u64) -> String {
    if n == 0 {
        return "unlimited".into();
    }
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n % (1u64 << shift) == 0 {
            return format!("{} {unit}/s", n >> shift);
        }
    }
    format!("{n} B/s")
}

/// What the hydrator may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Copy a batch of at most this many regions (at least 1).
    Go(u64),
    /// Wait this long, then ask again.
    Wait(Duration),
}

/// A token bucket of bytes, refilled at `rate` bytes per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Bytes per second; 0 is unlimited.
    rate: u64,
    /// The size of one region, the unit of a grant.
    region: u64,
    /// Bytes available (negative: charged more than granted).
    level: f64,
    /// When `level` was last brought up to date.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket for `rate` bytes per second (0: unlimited) and regions
    /// of `region` bytes.
    pub fn new(rate: u64, region: u64, now: Instant) -> TokenBucket {
        let mut b = TokenBucket {
            rate,
            region: region.max(1),
            level: 0.0,
            last: now,
        };
        b.level = b.burst();
        b
    }

    /// The rate in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The most the bucket holds: [`BURST_TIME`] at the rate, at least one region.
    pub fn burst(&self) -> f64 {
        (self.rate as f64 * BURST_TIME.as_secs_f64()).max(self.region as f64)
    }

    /// Changes the rate from `now` on: the time before it is credited at the
    /// old rate. Leaving unlimited starts with a full bucket.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        if rate == self.rate {
            return;
        }
        self.refill(now);
        let was_unlimited = self.rate == 0;
        self.rate = rate;
        self.level = if was_unlimited {
            self.burst()
        } else {
            self.level.min(self.burst())
        };
    }

    fn refill(&mut self, now: Instant) {
        // A clock that went backwards (it should not) credits nothing.
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.level = (self.level + dt * self.rate as f64).min(self.burst());
    }

    /// Asks to copy up to `want` regions (at least 1) at `now`. Grants the
    /// batch once the bucket holds it, capped at what the burst can hold;
    /// until then says how long to wait.
    pub fn pace(&mut self, want: u64, now: Instant) -> Pace {
        let want = want.max(1);
        if self.rate == 0 {
            return Pace::Go(want);
        }
        self.refill(now);
        let region = self.region as f64;
        // Whole regions the burst can hold (>= 1, as the burst is >= a region).
        let fits = ((self.burst() / region).floor() as u64).max(1);
        let n = want.min(fits);
        let need = n as f64 * region;
        if self.level >= need {
            return Pace::Go(n);
        }
        let secs = (need - self.level) / self.rate as f64;
        // Rounded up to the microsecond, so that the wait is never short.
        let us = (secs * 1e6).ceil().min(u64::MAX as f64) as u64;
        Pace::Wait(Duration::from_micros(us.max(1)))
    }

    /// Charges `bytes` actually read from the source.
    pub fn charge(&mut self, bytes: u64) {
        if self.rate != 0 {
            self.level -= bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;

    #[test]
    fn rates_parse_in_one_small_grammar() {
        for (s, n) in [
            ("0", 0),
            ("0/s", 0),
            ("1048576", MIB),
            ("512K", 512 * KIB),
            ("512k", 512 * KIB),
            ("100M", 100 * MIB),
            ("100MiB", 100 * MIB),
            ("100mib/s", 100 * MIB),
            ("100M/s", 100 * MIB),
            (" 2G ", 2 << 30),
            ("1T", 1 << 40),
            ("5B", 5),
            ("5b/s", 5),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_rate(s), Ok(n), "{s}");
        }
        for bad in [
            "",
            "/s",
            "M",
            "-1",
            "+5",
            "1.5M",
            "100MB",
            "100Mb",
            "100KB",
            "B",
            "5B/S/s",
            "100 M",
            "100KiB/sec",
            "100/m",
            "fast",
            "1P",
            "1e6",
            "0x10",
            "18446744073709551616",
            "16777216T",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert!(parse_rate("100MB").unwrap_err().contains("100MiB/s"));
    }

    #[test]
    fn rates_format_in_the_largest_exact_unit() {
        assert_eq!(format_rate(0), "unlimited");
        assert_eq!(format_rate(100 * MIB), "100 MiB/s");
        assert_eq!(format_rate(1536 * KIB), "1536 KiB/s");
        assert_eq!(format_rate(1 << 40), "1 TiB/s");
        assert_eq!(format_rate(1_000_000), "1000000 B/s");
        for n in [0, 5, 64 * KIB, 3 * MIB, 7 << 30] {
            let shown = format_rate(n).replace(' ', "");
            let back = if n == 0 {
                0
            } else {
                parse_rate(&shown).unwrap()
            };
            assert_eq!(back, n, "{shown}");
        }
    }

    /// Runs a hydrator against the bucket on a simulated clock for `secs`:
    /// each batch takes `copy` and reads `read(regions)` bytes. Returns the
    /// bytes read and the largest batch.
    fn simulate(
        b: &mut TokenBucket,
        t0: Instant,
        secs: u64,
        want: u64,
        copy: Duration,
        read: impl Fn(u64) -> u64,
    ) -> (u64, u64) {
        let (mut now, end) = (t0, t0 + Duration::from_secs(secs));
        let (mut total, mut largest) = (0, 0);
        while now < end {
            match b.pace(want, now) {
                Pace::Go(n) => {
                    assert!(n >= 1 && n <= want);
                    largest = largest.max(n);
                    let bytes = read(n);
                    total += bytes;
                    b.charge(bytes);
                    now += copy;
                }
                Pace::Wait(d) => {
                    assert!(d > Duration::ZERO);
                    now += d;
                }
            }
        }
        (total, largest)
    }

    #[test]
    fn the_bucket_holds_the_rate_within_one_burst() {
        let t0 = Instant::now();
        let region = 64 * KIB;
        let rate = 8 * MIB;
        let mut b = TokenBucket::new(rate, region, t0);
        assert!((b.burst() - (8 * MIB) as f64 / 10.0).abs() < 1.0);
        let (total, largest) = simulate(&mut b, t0, 10, 16, Duration::from_micros(300), |n| {
            n * region
        });
        // At most rate × t + one burst, and not much less.
        assert!(total <= 10 * rate + rate / 10, "{total}");
        assert!(total >= 10 * rate - rate / 10, "{total}");
        // Batches are capped by the burst: 800 KiB holds 12 whole regions.
        assert_eq!(largest, 12);
    }

    #[test]
    fn a_slow_rate_still_copies_a_region_at_a_time() {
        let t0 = Instant::now();
        let region = 4 * MIB;
        let mut b = TokenBucket::new(MIB, region, t0);
        assert_eq!(b.pace(16, t0), Pace::Go(1));
        b.charge(region);
        // 4 MiB at 1 MiB/s: 4 s until the next region.
        assert_eq!(b.pace(16, t0), Pace::Wait(Duration::from_secs(4)));
        assert_eq!(
            b.pace(16, t0 + Duration::from_secs(3)),
            Pace::Wait(Duration::from_secs(1))
        );
        assert_eq!(b.pace(16, t0 + Duration::from_secs(4)), Pace::Go(1));
        let (total, _) = simulate(
            &mut b,
            t0 + Duration::from_secs(4),
            40,
            16,
            Duration::ZERO,
            |n| n * region,
        );
        assert!((36 * MIB..=44 * MIB).contains(&total), "{total}");
    }

    #[test]
    fn holes_cost_nothing_and_unlimited_never_waits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(MIB, 64 * KIB, t0);
        // A sparse source: batches read nothing, so they never wait.
        for _ in 0..1000 {
            assert!(matches!(b.pace(4, t0), Pace::Go(_)));
            b.charge(0);
        }
        b.set_rate(0, t0);
        for _ in 0..1000 {
            assert_eq!(b.pace(4096, t0), Pace::Go(4096));
            b.charge(1 << 30);
        }
    }

    #[test]
    fn a_new_rate_applies_from_now_on() {
        let t0 = Instant::now();
        let region = 64 * KIB;
        let mut b = TokenBucket::new(MIB, region, t0);
        // Drain it: at 1 MiB/s the burst is 102.4 KiB, one region.
        assert_eq!(b.pace(16, t0), Pace::Go(1));
        b.charge(region);
        let Pace::Wait(slow) = b.pace(1, t0) else {
            panic!("a drained bucket granted");
        };
        assert!(slow.abs_diff(Duration::from_millis(25)) <= Duration::from_micros(1));
        // Ten times the rate: a tenth of the wait, and a larger burst.
        b.set_rate(10 * MIB, t0);
        let Pace::Wait(fast) = b.pace(1, t0) else {
            panic!("a drained bucket granted");
        };
        assert!(
            fast.abs_diff(slow / 10) <= Duration::from_micros(1),
            "{fast:?}"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.pace(8, t1), Pace::Go(8));
        // Idle time never banks more than the burst (1 MiB: 16 regions at most).
        let t2 = t0 + Duration::from_secs(3600);
        assert!(matches!(b.pace(1000, t2), Pace::Go(n) if (15..=16).contains(&n)));
        // Lowering the rate drops the budget to the new burst.
        b.set_rate(MIB, t2);
        assert_eq!(b.pace(16, t2), Pace::Go(1));
        // From unlimited back to a limit: a full bucket, not a debt.
        b.set_rate(0, t2);
        b.charge(1 << 30);
        b.set_rate(MIB, t2);
        assert_eq!(b.pace(1, t2), Pace::Go(1));
    }

    #[test]
    fn a_clock_going_backwards_grants_nothing_extra() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let region = 64 * KIB;
        let mut b = TokenBucket::new(MIB, region, t0);
        b.charge(region);
        let Pace::Wait(d) = b.pace(1, t0) else {
            panic!("granted");
        };
        assert_eq!(b.pace(1, t0 - Duration::from_secs(5)), Pace::Wait(d));
        // Nor later: time is counted from the newest instant seen.
        assert!(matches!(b.pace(1, t0 + d / 2), Pace::Wait(_)));
        assert_eq!(b.pace(1, t0 + d), Pace::Go(1));
    }
}
