//! The engine's I/O counters: sharded per thread, so that queue threads on
//! different CPUs do not bounce one cache line on every request, and summed
//! when read ([`Counters`]).
//!
//! Invariant: every guest request is counted once, by kind, with its bytes and
//! whether it failed; `in_flight` is raised and lowered by the same thread for
//! requests through the engine ([`InFlight`]) and by a permit's grant and end
//! for direct ones.
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::Engine;

/// I/O counters, for status.
#[derive(Debug, Default, Serialize, serde::Deserialize, Clone, Copy)]
pub struct Counters {
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Discard requests.
    pub discards: u64,
    /// Write-zeroes requests.
    pub write_zeroes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Regions copied because a guest wrote part of them.
    pub guest_hydrations: u64,
    /// Regions copied by background hydration.
    pub background_hydrations: u64,
    /// Regions marked without copy (overwritten, discarded or zeroed whole).
    pub overwrites: u64,
    /// Requests that failed (all kinds; the `*_errors` fields split it).
    pub errors: u64,
    /// Bytes discarded (the requests' lengths).
    #[serde(default)]
    pub bytes_discarded: u64,
    /// Bytes zeroed by write-zeroes requests.
    #[serde(default)]
    pub bytes_zeroed: u64,
    /// Read requests that failed.
    #[serde(default)]
    pub read_errors: u64,
    /// Write requests that failed.
    #[serde(default)]
    pub write_errors: u64,
    /// Flush requests that failed.
    #[serde(default)]
    pub flush_errors: u64,
    /// Discard requests that failed.
    #[serde(default)]
    pub discard_errors: u64,
    /// Write-zeroes requests that failed.
    #[serde(default)]
    pub write_zeroes_errors: u64,
    /// Writes into unhydrated regions that wrote only their sub-blocks (no
    /// region copy; the regions are partly written until hydrated).
    #[serde(default)]
    pub partial_writes: u64,
}

/// Counter shards: each thread adds to its own (cache-line aligned) shard, so
/// that queue threads on different CPUs do not bounce a shared cache line on
/// every request; readers sum the shards.
pub(super) const COUNTER_SHARDS: usize = 16;

/// The shard of the calling thread.
fn shard_index() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static INDEX: usize = (NEXT.fetch_add(1, Ordering::Relaxed) as usize) % COUNTER_SHARDS;
    }
    INDEX.with(|i| *i)
}

#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct AtomicCounters {
    /// Guest requests being served (incremented and decremented by the same thread).
    pub(super) in_flight: AtomicU64,
    /// Completed destination writes (see `Engine::dest_flushed_at`).
    pub(super) dest_writes: AtomicU64,
    pub(super) reads: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) discards: AtomicU64,
    pub(super) write_zeroes: AtomicU64,
    pub(super) flushes: AtomicU64,
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    pub(super) guest_hydrations: AtomicU64,
    pub(super) background_hydrations: AtomicU64,
    pub(super) overwrites: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) bytes_discarded: AtomicU64,
    pub(super) bytes_zeroed: AtomicU64,
    pub(super) read_errors: AtomicU64,
    pub(super) write_errors: AtomicU64,
    pub(super) flush_errors: AtomicU64,
    pub(super) discard_errors: AtomicU64,
    pub(super) write_zeroes_errors: AtomicU64,
    pub(super) partial_writes: AtomicU64,
}

/// Selects one counter of a shard (the per-kind error counters).
pub(super) type CounterOf = fn(&AtomicCounters) -> &AtomicU64;

pub(super) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Counts a guest request as in flight for its lifetime.
pub(super) struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    pub(super) fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Engine {
    /// This thread's counter shard.
    pub(super) fn stats(&self) -> &AtomicCounters {
        &self.shards[shard_index()]
    }

    /// The sum of one counter over the shards.
    pub(super) fn sum(&self, f: impl Fn(&AtomicCounters) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |t, c| t.wrapping_add(f(c).load(Ordering::Acquire)))
    }

    /// A snapshot of the I/O counters.
    pub fn counters(&self) -> Counters {
        Counters {
            reads: self.sum(|c| &c.reads),
            writes: self.sum(|c| &c.writes),
            discards: self.sum(|c| &c.discards),
            write_zeroes: self.sum(|c| &c.write_zeroes),
            flushes: self.sum(|c| &c.flushes),
            bytes_read: self.sum(|c| &c.bytes_read),
            bytes_written: self.sum(|c| &c.bytes_written),
            guest_hydrations: self.sum(|c| &c.guest_hydrations),
            background_hydrations: self.sum(|c| &c.background_hydrations),
            overwrites: self.sum(|c| &c.overwrites),
            errors: self.sum(|c| &c.errors),
            bytes_discarded: self.sum(|c| &c.bytes_discarded),
            bytes_zeroed: self.sum(|c| &c.bytes_zeroed),
            read_errors: self.sum(|c| &c.read_errors),
            write_errors: self.sum(|c| &c.write_errors),
            flush_errors: self.sum(|c| &c.flush_errors),
            discard_errors: self.sum(|c| &c.discard_errors),
            write_zeroes_errors: self.sum(|c| &c.write_zeroes_errors),
            partial_writes: self.sum(|c| &c.partial_writes),
        }
    }
}
