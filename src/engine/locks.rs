//! Per-region FIFO locks, taken only by operations that change a region's
//! hydration state (copy, overwrite, discard, write-zeroes of an unhydrated region).
//!
//! Once a region is hydrated nothing locks it again: the data path checks the
//! bitmap (lock-free) and goes straight to the destination. Waiters are served in
//! arrival order (a ticket lock per region), so requests deferred behind a copy
//! are re-dispatched in the order they arrived. The table is sharded so that
//! queues working on different regions do not contend.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

const SHARDS: usize = 64;

#[derive(Debug, Default)]
struct Ticket {
    next: u64,
    serving: u64,
}

#[derive(Debug, Default)]
struct Shard {
    map: Mutex<HashMap<u64, Ticket>>,
    cv: Condvar,
}

/// The lock table.
#[derive(Debug)]
pub struct RegionLocks {
    shards: Box<[Shard]>,
    held: AtomicU64,
}

/// Holds a region locked; unlocks on drop.
#[derive(Debug)]
pub struct RegionGuard<'a> {
    locks: &'a RegionLocks,
    region: u64,
}

impl RegionLocks {
    /// An empty table.
    pub fn new() -> RegionLocks {
        RegionLocks {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            held: AtomicU64::new(0),
        }
    }

    fn shard(&self, region: u64) -> &Shard {
        &self.shards[(region % SHARDS as u64) as usize]
    }

    fn map(shard: &Shard) -> MutexGuard<'_, HashMap<u64, Ticket>> {
        shard.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks `region`, waiting behind earlier holders in arrival order.
    pub fn lock(&self, region: u64) -> RegionGuard<'_> {
        let shard = self.shard(region);
        let mut map = Self::map(shard);
        let t = map.entry(region).or_default();
        let mine = t.next;
        t.next += 1;
        while map.get(&region).map(|t| t.serving) != Some(mine) {
            map = shard.cv.wait(map).unwrap_or_else(|p| p.into_inner());
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        RegionGuard {
            locks: self,
            region,
        }
    }

    /// Locks `region` only if nobody holds or waits for it.
    pub fn try_lock(&self, region: u64) -> Option<RegionGuard<'_>> {
        let mut map = Self::map(self.shard(region));
        if map.contains_key(&region) {
            return None;
        }
        map.insert(
            region,
            Ticket {
                next: 1,
                serving: 0,
            },
        );
        self.held.fetch_add(1, Ordering::Relaxed);
        Some(RegionGuard {
            locks: self,
            region,
        })
    }

    /// Number of regions locked right now (regions being hydrated or marked).
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

impl Default for RegionLocks {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RegionGuard<'_> {
    fn drop(&mut self) {
        let shard = self.locks.shard(self.region);
        let mut map = RegionLocks::map(shard);
        if let Some(t) = map.get_mut(&self.region) {
            t.serving += 1;
            if t.serving == t.next {
                map.remove(&self.region);
            }
        }
        self.locks.held.fetch_sub(1, Ordering::Relaxed);
        shard.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn waiters_are_served_in_arrival_order() {
        let locks = Arc::new(RegionLocks::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let g = locks.lock(7);
        let mut threads = Vec::new();
        for i in 0..4 {
            let (l, o) = (locks.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                let _g = l.lock(7);
                o.lock().unwrap().push(i);
            }));
            // Let thread i take its ticket before thread i+1.
            std::thread::sleep(Duration::from_millis(30));
        }
        assert!(locks.try_lock(7).is_none());
        assert!(locks.try_lock(8).is_some());
        drop(g);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(locks.held(), 0);
        assert!(locks.try_lock(7).is_some());
    }
}
