//! The clone engine: where every byte of a guest request lives, and when a
//! region becomes hydrated.
//!
//! This module owns request mapping (design.md's table), hydration of single
//! regions, and commit scheduling. It knows nothing of virtio: the vhost-user
//! front, the control socket and the tests drive it through the same methods.
//!
//! | request | region state | action |
//! |---|---|---|
//! | read | hydrated / not | destination / source (a mixed read is split) |
//! | write | hydrated | destination |
//! | write covering a whole region | not hydrated | destination, then mark, no copy |
//! | write covering part of a region | not hydrated | copy source region with the write applied, then mark |
//! | discard | whole unhydrated regions | zero them on the destination, then mark |
//! | discard | hydrated parts | pass down if enabled |
//! | write zeroes | as write | destination zeroing (fallocate) where possible |
//! | flush | - | group commit (pre-commit, destination flush, metadata commit) |
//!
//! Invariants:
//! * A region's bit is set (in core) only after its data write completed, and it
//!   reaches the metadata's durable state only through [`crate::metadata::Metadata::commit`],
//!   which flushes the destination first.
//! * Every operation that changes a region's state holds that region's lock
//!   ([`locks`]); hydrated regions are never locked, so the hot path is a
//!   lock-free bitmap check plus one vectored system call.
//! * Requests for a region under hydration wait for the copy and are re-dispatched
//!   in arrival order. Reads never wait: until the bit is set the source is right.

pub mod commit;
pub mod hydrator;
pub mod locks;
pub mod rate;
pub mod throttle;

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::metadata::{CommitOutcome, Geometry, Metadata, MetadataError, Mode};
use crate::storage::aio::{DirectIo, DirectIoAccount, IoTarget};
use crate::storage::{copy_range, iov_len, BlockDevice, StorageError, SECTOR_SIZE};
pub use commit::DestFlush;
use commit::{CommitGate, CommitLatency, Committer};
use locks::RegionLocks;
use rate::RateWindow;

/// Default interval of the periodic commit, as dm-clone's.
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the engine. Each maps to an I/O error for the guest.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request does not fit the device or is not sector aligned.
    #[error("request of {len} bytes at offset {offset} is invalid for a device of {size} bytes")]
    BadRequest {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A source read failed.
    #[error("source read failed")]
    Source(#[source] StorageError),
    /// A destination operation failed.
    #[error("destination I/O failed")]
    Dest(#[source] StorageError),
    /// Setting a bit or committing failed.
    #[error("metadata operation failed")]
    Metadata(#[source] MetadataError),
    /// A commit failed (shared by every flush that waited for it).
    #[error("commit failed")]
    Commit(#[source] Arc<MetadataError>),
    /// The region is not hydrated and there is no source to read it from.
    #[error("region {0} is not hydrated and no source is attached")]
    NoSource(u64),
    /// The devices do not fit together.
    #[error("{0}")]
    Setup(String),
}

impl EngineError {
    /// True for errors caused by the request itself rather than the devices.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, EngineError::BadRequest { .. })
    }
}

impl From<EngineError> for io::Error {
    fn from(e: EngineError) -> io::Error {
        let kind = match &e {
            EngineError::BadRequest { .. } => io::ErrorKind::InvalidInput,
            EngineError::Source(s) | EngineError::Dest(s) => s.kind(),
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Result type of the engine.
pub type Result<T> = std::result::Result<T, EngineError>;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Pass discards of hydrated ranges down to the destination.
    pub discard_passdown: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            discard_passdown: true,
        }
    }
}

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
}

/// Counter shards: each thread adds to its own (cache-line aligned) shard, so
/// that queue threads on different CPUs do not bounce a shared cache line on
/// every request; readers sum the shards.
const COUNTER_SHARDS: usize = 16;

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
struct AtomicCounters {
    /// Guest requests being served (incremented and decremented by the same thread).
    in_flight: AtomicU64,
    /// Completed destination writes (see `Engine::dest_flushed_at`).
    dest_writes: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    flushes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    guest_hydrations: AtomicU64,
    background_hydrations: AtomicU64,
    overwrites: AtomicU64,
    errors: AtomicU64,
    bytes_discarded: AtomicU64,
    bytes_zeroed: AtomicU64,
    read_errors: AtomicU64,
    write_errors: AtomicU64,
    flush_errors: AtomicU64,
    discard_errors: AtomicU64,
    write_zeroes_errors: AtomicU64,
}

/// Selects one counter of a shard (the per-kind error counters).
type CounterOf = fn(&AtomicCounters) -> &AtomicU64;

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Wraps a storage error with the device it came from.
type ErrWrap = fn(StorageError) -> EngineError;

/// What to write into a range.
#[derive(Clone, Copy)]
enum Payload<'a, 'b> {
    Data(&'a [IoSlice<'b>]),
    Zeroes,
}

/// The clone engine. Cheap to share (`Arc<Engine>`); every method may be called
/// from several threads at once.
#[derive(Debug)]
pub struct Engine {
    source: Option<Arc<dyn BlockDevice>>,
    dest: Arc<dyn BlockDevice>,
    md: Arc<Metadata>,
    geo: Geometry,
    cfg: EngineConfig,
    locks: RegionLocks,
    gate: CommitGate,
    shards: Box<[AtomicCounters]>,
    /// Where background hydration looks next.
    hydration_cursor: AtomicU64,
    /// Bytes read from the source by hydration (holes skipped are not read).
    hydration_bytes_read: AtomicU64,
    /// The sum of the shards' `dest_writes` (completed destination writes of
    /// any kind, counted after completion) as it was when the last successful
    /// destination flush started: a flush finding no writes since then need not
    /// flush again. [`DEST_NEVER_FLUSHED`] until this process flushed once.
    dest_flushed_at: AtomicU64,
    /// Durations of the commits that did I/O.
    commit_latency: CommitLatency,
    /// Hydrated regions sampled over the last seconds (see [`Engine::sample_hydration`]).
    rate: Mutex<RateWindow>,
    /// Mutation switch (see [`Engine::set_uncounted_direct_writes`]).
    #[cfg(feature = "test-hooks")]
    uncounted_direct_writes: std::sync::atomic::AtomicBool,
}

/// `dest_flushed_at` of an engine that has not flushed the destination yet. A
/// restarted process inherits, in the page cache or the disk's cache, writes the
/// previous one completed and never flushed: its first flush must reach the
/// destination although its own counters say nothing was written (design rule 7).
const DEST_NEVER_FLUSHED: u64 = u64::MAX;

/// Counts a guest request as in flight for its lifetime.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The result of one background hydration step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HydrateStep {
    /// Regions `first..first + count` were hydrated.
    Hydrated {
        /// First region.
        first: u64,
        /// Number of regions.
        count: u64,
        /// Of which this many were holes of the source (zeroed, not read).
        holes: u64,
        /// Bytes read from the source for them (what a rate limit charges).
        bytes_read: u64,
    },
    /// Every unhydrated region looked at is busy (a guest request holds it).
    Busy,
    /// Every region is hydrated.
    Done,
}

impl Engine {
    /// Builds an engine over opened devices and metadata. `source` may be `None`
    /// only when every region is hydrated.
    pub fn new(
        source: Option<Arc<dyn BlockDevice>>,
        dest: Arc<dyn BlockDevice>,
        md: Arc<Metadata>,
        cfg: EngineConfig,
    ) -> Result<Engine> {
        let geo = *md.geometry();
        if let Some(s) = &source {
            if s.size() < geo.device_size() {
                return Err(EngineError::Setup(format!(
                    "the source has {} bytes but the clone is {} bytes",
                    s.size(),
                    geo.device_size()
                )));
            }
        } else if !md.all_hydrated() {
            return Err(EngineError::Setup(format!(
                "no source given, but only {} of {} regions are hydrated; the source is needed until hydration completes",
                md.hydrated_count(),
                geo.nr_regions()
            )));
        }
        if dest.size() < geo.device_size() {
            return Err(EngineError::Setup(format!(
                "the destination has {} bytes but the clone is {} bytes",
                dest.size(),
                geo.device_size()
            )));
        }
        if dest.read_only() {
            return Err(EngineError::Setup("the destination is read-only".into()));
        }
        let hydrated = md.hydrated_count();
        Ok(Engine {
            source,
            dest,
            md,
            geo,
            cfg,
            locks: RegionLocks::new(),
            gate: CommitGate::default(),
            shards: (0..COUNTER_SHARDS)
                .map(|_| AtomicCounters::default())
                .collect(),
            hydration_cursor: AtomicU64::new(0),
            hydration_bytes_read: AtomicU64::new(0),
            dest_flushed_at: AtomicU64::new(DEST_NEVER_FLUSHED),
            commit_latency: CommitLatency::default(),
            rate: Mutex::new(RateWindow::new(
                rate::DEFAULT_WINDOW,
                Instant::now(),
                hydrated,
            )),
            #[cfg(feature = "test-hooks")]
            uncounted_direct_writes: Default::default(),
        })
    }

    /// Device size in bytes.
    pub fn size(&self) -> u64 {
        self.geo.device_size()
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The metadata store.
    pub fn metadata(&self) -> &Arc<Metadata> {
        &self.md
    }

    /// The destination device.
    pub fn dest(&self) -> &Arc<dyn BlockDevice> {
        &self.dest
    }

    /// Regions being hydrated or marked right now.
    pub fn regions_in_flight(&self) -> u64 {
        self.locks.held()
    }

    /// Guest requests being served right now.
    pub fn ios_in_flight(&self) -> u64 {
        // Each request adds and removes 1 on its own thread's shard.
        self.sum(|c| &c.in_flight)
    }

    /// This thread's counter shard.
    fn stats(&self) -> &AtomicCounters {
        &self.shards[shard_index()]
    }

    /// The sum of one counter over the shards.
    fn sum(&self, f: impl Fn(&AtomicCounters) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |t, c| t.wrapping_add(f(c).load(Ordering::Acquire)))
    }

    /// The state of a network source (`None` for a file source or none).
    pub fn source_status(&self) -> Option<crate::storage::nbd::RemoteStatus> {
        self.source.as_ref()?.remote_status()
    }

    /// Bytes hydration has read from the source.
    pub fn hydration_bytes_read(&self) -> u64 {
        self.hydration_bytes_read.load(Ordering::Relaxed)
    }

    /// Commits actually run by the commit gate (shared flushes count once).
    pub fn commits_run(&self) -> u64 {
        self.gate.commits_run()
    }

    /// Whether a commit is running and for how long, and when the last one
    /// finished (the systemd watchdog's health check).
    pub fn commit_activity(&self) -> commit::CommitActivity {
        self.gate.activity()
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
        }
    }

    /// Durations of the commits this process ran that did I/O (wrote a new
    /// state, flushed the destination, or failed trying).
    pub fn commit_latency(&self) -> &CommitLatency {
        &self.commit_latency
    }

    /// Hydrated bytes: hydrated regions times the region size, the short last
    /// region counted at its real length.
    pub fn hydrated_bytes(&self) -> u64 {
        let g = &self.geo;
        let nr = g.nr_regions();
        let hydrated = self.md.hydrated_count();
        if hydrated == nr {
            return g.device_size();
        }
        let last = nr - 1;
        let short = g.region_size() - g.region_len(last);
        let full = hydrated.saturating_mul(g.region_size());
        if short > 0 && self.md.is_hydrated(last) {
            full - short
        } else {
            full
        }
    }

    /// Records the hydrated region count now, for [`Engine::hydration_rate`].
    /// Called once a second by the thread [`Engine::start_rate_sampler`] starts.
    pub fn sample_hydration(&self) {
        let h = self.md.hydrated_count();
        self.rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(Instant::now(), h);
    }

    /// Hydration rate in bytes per second (regions hydrated per second, by any
    /// means, times the region size) over the last samples' window; 0 until two
    /// samples a second apart exist.
    pub fn hydration_rate(&self) -> f64 {
        let per_region = self.rate.lock().unwrap_or_else(|p| p.into_inner()).rate();
        per_region * self.geo.region_size() as f64
    }

    /// Starts the thread that samples hydration progress every
    /// [`rate::SAMPLE_INTERVAL`]; stopped and joined when dropped.
    pub fn start_rate_sampler(self: &Arc<Self>) -> io::Result<Committer> {
        let weak = Arc::downgrade(self);
        Committer::start_named("hydration-rate", rate::SAMPLE_INTERVAL, move || {
            if let Some(e) = weak.upgrade() {
                e.sample_hydration();
            }
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let ok = offset % SECTOR_SIZE == 0
            && len % SECTOR_SIZE == 0
            && offset.checked_add(len).is_some_and(|e| e <= self.size());
        if ok {
            Ok(())
        } else {
            Err(EngineError::BadRequest {
                offset,
                len,
                size: self.size(),
            })
        }
    }

    fn check_mode(&self) -> Result<()> {
        match self.md.mode() {
            Mode::Fail => Err(EngineError::Metadata(MetadataError::Failed)),
            _ => Ok(()),
        }
    }

    /// Counts a failed request, in the total and in its kind's counter.
    fn count_err<T>(&self, kind: CounterOf, r: Result<T>) -> Result<T> {
        if r.is_err() {
            let st = self.stats();
            bump(&st.errors, 1);
            bump(kind(st), 1);
        }
        r
    }

    fn source_dev(&self, region: u64) -> Result<&Arc<dyn BlockDevice>> {
        self.source.as_ref().ok_or(EngineError::NoSource(region))
    }

    /// Reads `iov_len(bufs)` bytes at `offset`.
    pub fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let _io = InFlight::new(&self.stats().in_flight);
        let r = self.do_read(offset, bufs);
        self.count_err(|c| &c.read_errors, r)
    }

    fn do_read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iov_len(bufs);
        self.check(offset, len)?;
        self.check_mode()?;
        bump(&self.stats().reads, 1);
        bump(&self.stats().bytes_read, len);
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        // Split into runs of regions with the same state.
        let mut pos = offset;
        while pos < end {
            let r = self.geo.region_of(pos);
            let hydrated = self.md.is_hydrated(r);
            let mut run_end = self.geo.region_end(r).min(end);
            while run_end < end && self.md.is_hydrated(self.geo.region_of(run_end)) == hydrated {
                run_end = self.geo.region_end(self.geo.region_of(run_end)).min(end);
            }
            let (dev, wrap): (&Arc<dyn BlockDevice>, ErrWrap) = if hydrated {
                (&self.dest, EngineError::Dest)
            } else {
                (self.source_dev(r)?, EngineError::Source)
            };
            if pos == offset && run_end == end {
                return dev.read_vectored_at(bufs, offset).map_err(wrap);
            }
            let mut sub = sub_iov_mut(bufs, (pos - offset) as usize, (run_end - pos) as usize);
            dev.read_vectored_at(&mut sub, pos).map_err(wrap)?;
            pos = run_end;
        }
        Ok(())
    }

    /// Convenience: reads into one buffer.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read(offset, &mut [IoSliceMut::new(buf)])
    }

    /// Writes `bufs` at `offset`.
    pub fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        let _io = InFlight::new(&self.stats().in_flight);
        let len = iov_len(bufs);
        bump(&self.stats().writes, 1);
        bump(&self.stats().bytes_written, len);
        let r = self.do_write(offset, len, Payload::Data(bufs));
        self.count_err(|c| &c.write_errors, r)
    }

    /// Convenience: writes one buffer.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write(offset, &[IoSlice::new(buf)])
    }

    /// A permit to read or write `[offset, offset + len)` directly (the io_uring
    /// path of the virtio front), instead of calling [`Engine::read`] /
    /// [`Engine::write`], on the permit's target at the same offset.
    ///
    /// - A write whose regions are all hydrated goes to the destination: such a
    ///   region's data lives there, it is never locked, and nothing but the guest
    ///   writes it again (a set bit is never cleared).
    /// - A read whose regions are all hydrated reads the destination; a read whose
    ///   regions are all unhydrated reads the source, as [`Engine::read`] does
    ///   (reads never copy or wait, and the source never changes: a region that
    ///   becomes hydrated meanwhile holds the same data on both).
    ///
    /// Everything else returns `None` and goes through the engine: writes to
    /// unhydrated regions (which copy, lock and mark), reads over both kinds,
    /// invalid ranges, fail mode, devices that take no direct requests.
    ///
    /// The permit counts the request as in flight until it ends; its
    /// [`DirectIo::finish`] counts it, and a write (finished, failed or dropped)
    /// counts as a destination write, so the next flush flushes the destination.
    pub fn direct_io(&self, write: bool, offset: u64, len: u64) -> Option<DirectIo<'_>> {
        if len == 0 || self.check(offset, len).is_err() || self.check_mode().is_err() {
            return None;
        }
        let dev = if self.md.all_hydrated() {
            &self.dest
        } else {
            let (first, last) = (
                self.geo.region_of(offset),
                self.geo.region_of(offset + len - 1),
            );
            let hydrated = self.md.is_hydrated(first);
            if !(first + 1..=last).all(|r| self.md.is_hydrated(r) == hydrated) {
                return None;
            }
            match (hydrated, write) {
                (true, _) => &self.dest,
                (false, false) => self.source.as_ref()?,
                (false, true) => return None,
            }
        };
        let target = IoTarget::of(dev)?;
        Some(DirectIo::grant(self, target, write, len))
    }

    /// Test-only mutation: direct writes are not counted as destination writes,
    /// so a flush after them may skip the destination. Exists so the crash
    /// suite's direct-I/O workloads can fail.
    #[cfg(feature = "test-hooks")]
    pub fn set_uncounted_direct_writes(&self, on: bool) {
        self.uncounted_direct_writes.store(on, Ordering::SeqCst);
    }

    /// Writes zeroes over `[offset, offset + len)`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _io = InFlight::new(&self.stats().in_flight);
        bump(&self.stats().write_zeroes, 1);
        bump(&self.stats().bytes_zeroed, len);
        let r = self.do_write(offset, len, Payload::Zeroes);
        self.count_err(|c| &c.write_zeroes_errors, r)
    }

    fn dest_write(&self, pos: u64, len: u64, offset: u64, payload: Payload<'_, '_>) -> Result<()> {
        match payload {
            Payload::Data(bufs) => {
                if pos == offset && len == iov_len(bufs) {
                    self.dest.write_vectored_at(bufs, pos)
                } else {
                    let sub = sub_iov(bufs, (pos - offset) as usize, len as usize);
                    self.dest.write_vectored_at(&sub, pos)
                }
            }
            Payload::Zeroes => self.dest.write_zeroes(pos, len),
        }
        .map_err(EngineError::Dest)?;
        self.dest_written();
        Ok(())
    }

    /// Notes a completed destination write (see `dest_flushed_at`).
    fn dest_written(&self) {
        self.stats().dest_writes.fetch_add(1, Ordering::AcqRel);
    }

    fn do_write(&self, offset: u64, len: u64, payload: Payload<'_, '_>) -> Result<()> {
        self.check(offset, len)?;
        self.check_mode()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        if self.md.all_hydrated() {
            return self.dest_write(offset, len, offset, payload);
        }
        let mut pos = offset;
        // Start of a pending run of hydrated regions, written in one call.
        let mut run: Option<u64> = None;
        while pos < end {
            let r = self.geo.region_of(pos);
            let piece_end = self.geo.region_end(r).min(end);
            if self.md.is_hydrated(r) {
                run.get_or_insert(pos);
            } else {
                if let Some(s) = run.take() {
                    self.dest_write(s, pos - s, offset, payload)?;
                }
                self.write_unhydrated(r, pos, piece_end, offset, payload)?;
            }
            pos = piece_end;
        }
        if let Some(s) = run {
            self.dest_write(s, end - s, offset, payload)?;
        }
        Ok(())
    }

    /// Writes `[pos, piece_end)` of region `r`, which was unhydrated when looked at.
    fn write_unhydrated(
        &self,
        r: u64,
        pos: u64,
        piece_end: u64,
        offset: u64,
        payload: Payload<'_, '_>,
    ) -> Result<()> {
        let _guard = self.locks.lock(r);
        if self.md.is_hydrated(r) {
            // Hydrated while we waited: an ordinary write now.
            return self.dest_write(pos, piece_end - pos, offset, payload);
        }
        if self.md.mode() != Mode::Rw {
            return Err(EngineError::Metadata(MetadataError::ReadOnly));
        }
        let (rs, re) = (self.geo.region_start(r), self.geo.region_end(r));
        if pos == rs && piece_end == re {
            // Overwrite of the whole region: no copy.
            self.dest_write(pos, re - rs, offset, payload)?;
            bump(&self.stats().overwrites, 1);
        } else {
            // Partial: copy the region with the new data applied, in one write.
            let src = self.source_dev(r)?;
            with_scratch((re - rs) as usize, |buf| {
                src.read_at(buf, rs).map_err(EngineError::Source)?;
                let a = (pos - rs) as usize;
                let b = (piece_end - rs) as usize;
                match payload {
                    Payload::Data(bufs) => {
                        copy_from_iov(bufs, (pos - offset) as usize, &mut buf[a..b])
                    }
                    Payload::Zeroes => buf[a..b].fill(0),
                }
                self.dest.write_at(buf, rs).map_err(EngineError::Dest)
            })?;
            self.dest_written();
            bump(&self.stats().guest_hydrations, 1);
        }
        self.md.set_hydrated(r).map_err(EngineError::Metadata)?;
        Ok(())
    }

    /// Discards `[offset, offset + len)`. Whole unhydrated regions are zeroed on the
    /// destination and marked hydrated without copy; hydrated ranges (including
    /// partial edge regions) are passed down when passdown is on; partial
    /// unhydrated edges are left alone.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _io = InFlight::new(&self.stats().in_flight);
        bump(&self.stats().discards, 1);
        bump(&self.stats().bytes_discarded, len);
        let r = self.do_discard(offset, len);
        self.count_err(|c| &c.discard_errors, r)
    }

    fn passdown(&self, pos: u64, len: u64) -> Result<()> {
        if !self.cfg.discard_passdown || len == 0 || !self.dest.supports_discard() {
            return Ok(());
        }
        match self.dest.discard(pos, len) {
            Ok(()) => {
                self.dest_written();
                Ok(())
            }
            Err(StorageError::Unsupported { .. }) => Ok(()),
            Err(e) => Err(EngineError::Dest(e)),
        }
    }

    fn do_discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.check_mode()?;
        let end = offset + len;
        let mut pos = offset;
        let mut run: Option<u64> = None;
        while pos < end {
            let r = self.geo.region_of(pos);
            let (rs, re) = (self.geo.region_start(r), self.geo.region_end(r));
            let piece_end = re.min(end);
            let whole = pos == rs && piece_end == re;
            if self.md.is_hydrated(r) {
                run.get_or_insert(pos);
            } else {
                if let Some(s) = run.take() {
                    self.passdown(s, pos - s)?;
                }
                if whole && self.md.mode() == Mode::Rw {
                    let _guard = self.locks.lock(r);
                    if self.md.is_hydrated(r) {
                        self.passdown(rs, re - rs)?;
                    } else {
                        // Zero, then mark: the bit never claims stale destination data.
                        self.zero_dest(rs, re - rs)?;
                        self.md.set_hydrated(r).map_err(EngineError::Metadata)?;
                        bump(&self.stats().overwrites, 1);
                    }
                }
            }
            pos = piece_end;
        }
        if let Some(s) = run {
            self.passdown(s, end - s)?;
        }
        Ok(())
    }

    /// Zeroes a destination range as cheaply as the device allows: a punched
    /// hole where a discard reads back zeroes (keeps a sparse file sparse), else
    /// write-zeroes.
    fn zero_dest(&self, pos: u64, len: u64) -> Result<()> {
        if self.dest.supports_discard() && self.dest.discard_zeroes() {
            match self.dest.discard(pos, len) {
                Ok(()) => {
                    self.dest_written();
                    return Ok(());
                }
                Err(StorageError::Unsupported { .. }) => {}
                Err(e) => return Err(EngineError::Dest(e)),
            }
        }
        self.dest
            .write_zeroes(pos, len)
            .map_err(EngineError::Dest)?;
        self.dest_written();
        Ok(())
    }

    /// Completes when every write completed before the call is durable on the
    /// destination and every region it hydrated is committed.
    pub fn flush(&self) -> Result<()> {
        bump(&self.stats().flushes, 1);
        let r = self.commit(DestFlush::Completed).map(|_| ());
        self.count_err(|c| &c.flush_errors, r)
    }

    /// Commits what changed; `need` says what the caller needs of the
    /// destination beyond that ([`DestFlush`]).
    ///
    /// The one place that decides whether the destination is flushed when
    /// there is nothing to record: when the callers need completed writes
    /// durable ([`DestFlush::Completed`]) and something was written since the
    /// last destination flush (or this process never flushed it: design rule
    /// 7). A commit that records bits always flushes it first (rule 1,
    /// [`Metadata::commit`]).
    pub fn commit(&self, need: DestFlush) -> Result<CommitOutcome> {
        self.check_mode()?;
        self.gate
            .commit(need, |need| {
                // Writes completed before this point are covered by the flush below.
                let writes = self.sum(|c| &c.dest_writes);
                let dirty = writes != self.dest_flushed_at.load(Ordering::Acquire);
                let flush_dest = need == DestFlush::Completed && dirty;
                let started = Instant::now();
                let out = self.md.commit(self.dest.as_ref(), flush_dest);
                // Only commits that did I/O: a no-op or a refusal (ro, fail)
                // would pile up near zero and hide the real durations.
                let did_io = match &out {
                    Ok(CommitOutcome::Committed { .. }) => true,
                    Ok(CommitOutcome::Nothing) => flush_dest,
                    Err(MetadataError::ReadOnly | MetadataError::Failed) => false,
                    Err(_) => true,
                };
                if did_io {
                    self.commit_latency.observe(started.elapsed());
                }
                let out = out?;
                if flush_dest || matches!(out, CommitOutcome::Committed { .. }) {
                    // Commits are serialised by the gate: a plain store.
                    self.dest_flushed_at.store(writes, Ordering::Release);
                }
                Ok(out)
            })
            .map_err(EngineError::Commit)
    }

    /// Records the guest's write-cache choice and commits it at once: QEMU does
    /// not send it again after a reconnect, so it must survive a restart.
    pub fn set_write_cache(&self, writeback: bool) -> Result<()> {
        self.md.set_write_cache(writeback);
        self.commit(DestFlush::IfRecording).map(|_| ())
    }

    /// Test-only mutation: pretend this process already flushed the
    /// destination, so that its first flush may skip it (the bug design rule 7
    /// forbids). Exists so the crash suite's process-death check can fail.
    #[cfg(feature = "test-hooks")]
    pub fn assume_dest_flushed(&self) {
        self.dest_flushed_at
            .store(self.sum(|c| &c.dest_writes), Ordering::Release);
    }

    /// Starts the periodic commit thread (dm-clone commits every second).
    pub fn start_committer(self: &Arc<Self>, interval: Duration) -> io::Result<Committer> {
        let weak = Arc::downgrade(self);
        Committer::start(interval, move || {
            if let Some(e) = weak.upgrade() {
                // After a failure (ro/fail) commits are refused: do not retry every tick.
                if e.md.changed() && e.md.mode() == Mode::Rw {
                    if let Err(err) = e.commit(DestFlush::IfRecording) {
                        tracing::warn!(error = %err, "periodic commit failed");
                    }
                }
            }
        })
    }

    /// Hydrates region `r` if it is not hydrated yet. Returns true when it copied.
    pub fn hydrate_region(&self, r: u64) -> Result<bool> {
        if r >= self.geo.nr_regions() {
            return Err(EngineError::Metadata(MetadataError::OutOfRange {
                region: r,
                nr: self.geo.nr_regions(),
            }));
        }
        let _guard = self.locks.lock(r);
        if self.md.is_hydrated(r) {
            return Ok(false);
        }
        self.copy_run(r, 1, false)?;
        Ok(true)
    }

    /// Copies regions `first..first + n` (all locked by the caller, all
    /// unhydrated) from the source, then marks them. Holes of a sparse source
    /// are zeroed on the destination instead of read; with `detect_zeroes`,
    /// all-zero data read is written as zeroes (a hole) too. Returns the
    /// number of hole regions and the bytes read from the source.
    fn copy_run(&self, first: u64, n: u64, detect_zeroes: bool) -> Result<(u64, u64)> {
        if self.md.mode() != Mode::Rw {
            return Err(EngineError::Metadata(MetadataError::ReadOnly));
        }
        let src = self.source_dev(first)?;
        let start = self.geo.region_start(first);
        let end = self.geo.region_end(first + n - 1);
        let extents = src
            .data_extents(start, end - start)
            .map_err(EngineError::Source)?;
        let has_data = |a: u64, b: u64| match &extents {
            None => true,
            Some(ext) => ext.iter().any(|&(x, y)| x < b && a < y),
        };
        let (mut holes, mut read) = (0, 0);
        let mut buf = Vec::new();
        let mut r = first;
        while r < first + n {
            // A run of regions of one kind (data or hole).
            let data = has_data(self.geo.region_start(r), self.geo.region_end(r));
            let mut e = r + 1;
            while e < first + n
                && has_data(self.geo.region_start(e), self.geo.region_end(e)) == data
            {
                e += 1;
            }
            let (a, b) = (self.geo.region_start(r), self.geo.region_end(e - 1));
            if data && !detect_zeroes {
                copy_range(src.as_ref(), self.dest.as_ref(), a, b - a, &mut buf).map_err(
                    |(from_source, e)| {
                        if from_source {
                            EngineError::Source(e)
                        } else {
                            EngineError::Dest(e)
                        }
                    },
                )?;
                self.dest_written();
                bump(&self.hydration_bytes_read, b - a);
                read += b - a;
            } else if data {
                // In bounded chunks, whatever the batch size.
                let mut pos = a;
                while pos < b {
                    let n = (b - pos).min(crate::storage::COPY_CHUNK);
                    buf.resize(n as usize, 0);
                    src.read_at(&mut buf, pos).map_err(EngineError::Source)?;
                    bump(&self.hydration_bytes_read, n);
                    read += n;
                    if buf.iter().all(|&x| x == 0) {
                        self.zero_dest(pos, n)?;
                    } else {
                        self.dest.write_at(&buf, pos).map_err(EngineError::Dest)?;
                        self.dest_written();
                    }
                    pos += n;
                }
            } else {
                self.zero_dest(a, b - a)?;
                holes += e - r;
            }
            r = e;
        }
        for r in first..first + n {
            self.md.set_hydrated(r).map_err(EngineError::Metadata)?;
        }
        Ok((holes, read))
    }

    /// One background hydration step: copies up to `max` adjacent unhydrated
    /// regions that no guest request is working on, starting at the cursor.
    pub fn hydrate_batch(&self, max: u64, detect_zeroes: bool) -> Result<HydrateStep> {
        let nr = self.geo.nr_regions();
        let mut from = self.hydration_cursor.load(Ordering::Relaxed) % nr;
        for _ in 0..64 {
            let Some(first) = self.md.next_unhydrated(from) else {
                return Ok(HydrateStep::Done);
            };
            let mut guards = Vec::new();
            let mut r = first;
            while r < nr && (r - first) < max.max(1) && !self.md.is_hydrated(r) {
                match self.locks.try_lock(r) {
                    // Re-check under the lock: it may have been hydrated meanwhile.
                    Some(g) if !self.md.is_hydrated(r) => guards.push(g),
                    _ => break,
                }
                r += 1;
            }
            if guards.is_empty() {
                from = (first + 1) % nr;
                continue;
            }
            let count = guards.len() as u64;
            let (holes, bytes_read) = self.copy_run(first, count, detect_zeroes)?;
            drop(guards);
            self.hydration_cursor
                .store((first + count) % nr, Ordering::Relaxed);
            bump(&self.stats().background_hydrations, count);
            return Ok(HydrateStep::Hydrated {
                first,
                count,
                holes,
                bytes_read,
            });
        }
        Ok(HydrateStep::Busy)
    }

    /// One background hydration step of a single region; returns it, or `None`
    /// when nothing is left (or everything left is busy).
    pub fn hydrate_next(&self) -> Result<Option<u64>> {
        match self.hydrate_batch(1, false)? {
            HydrateStep::Hydrated { first, .. } => Ok(Some(first)),
            _ => Ok(None),
        }
    }
}

/// Runs `f` on a per-thread scratch buffer of `len` bytes whose contents are
/// unspecified. Buffers up to 1 MiB are kept and reused, so that a partial write
/// to an unhydrated region does not allocate (and zero) a region buffer each time.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    const KEEP: usize = 1 << 20;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    if len > KEEP {
        return f(&mut vec![0u8; len]);
    }
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            f(&mut v[..len])
        }
        // Not re-entered today; stay correct if it ever is.
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// The byte range `[start, start + len)` of a scatter list, as a new list.
fn sub_iov_mut<'b>(
    bufs: &'b mut [IoSliceMut<'_>],
    mut start: usize,
    mut len: usize,
) -> Vec<IoSliceMut<'b>> {
    let mut out = Vec::new();
    for b in bufs.iter_mut() {
        if len == 0 {
            break;
        }
        let bl = b.len();
        if start >= bl {
            start -= bl;
            continue;
        }
        let take = (bl - start).min(len);
        out.push(IoSliceMut::new(&mut b[start..start + take]));
        start = 0;
        len -= take;
    }
    out
}

/// The byte range `[start, start + len)` of a gather list, as a new list.
fn sub_iov<'b>(bufs: &'b [IoSlice<'_>], mut start: usize, mut len: usize) -> Vec<IoSlice<'b>> {
    let mut out = Vec::new();
    for b in bufs {
        if len == 0 {
            break;
        }
        let bl = b.len();
        if start >= bl {
            start -= bl;
            continue;
        }
        let take = (bl - start).min(len);
        out.push(IoSlice::new(&b[start..start + take]));
        start = 0;
        len -= take;
    }
    out
}

/// Copies `dst.len()` bytes starting at byte `start` of a gather list into `dst`.
fn copy_from_iov(bufs: &[IoSlice<'_>], start: usize, dst: &mut [u8]) {
    let mut done = 0;
    for s in sub_iov(bufs, start, dst.len()) {
        dst[done..done + s.len()].copy_from_slice(&s);
        done += s.len();
    }
}

#[cfg(test)]
mod tests;

/// The accounting of [`Engine::direct_io`]'s permits: what [`Engine::read`] and
/// [`Engine::write`] count for themselves.
impl DirectIoAccount for Engine {
    fn started(&self) {
        self.stats().in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn finished(&self, write: bool, len: u64, outcome: Option<bool>, maybe_written: bool) {
        let st = self.stats();
        #[cfg(feature = "test-hooks")]
        let maybe_written = maybe_written && !self.uncounted_direct_writes.load(Ordering::SeqCst);
        if maybe_written {
            // Before the requester is told: the next flush covers this write.
            self.dest_written();
        }
        if let Some(ok) = outcome {
            if write {
                bump(&st.writes, 1);
                bump(&st.bytes_written, len);
            } else {
                bump(&st.reads, 1);
                bump(&st.bytes_read, len);
            }
            if !ok {
                bump(&st.errors, 1);
                bump(
                    if write {
                        &st.write_errors
                    } else {
                        &st.read_errors
                    },
                    1,
                );
            }
        }
        st.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
