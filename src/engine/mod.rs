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
//! | write covering part of a region | not hydrated, version 2 store | write the sub-blocks it touches (an edge sub-block it covers in part completed from the source), then mark them written (`subblock.rs`); the region is partly written until every sub-block is |
//! | write covering part of a region | not hydrated, no table or no room in it | copy source region with the write applied, then mark (on an io_uring queue: [`RegionCopy`], the same steps without blocking the queue) |
//! | read | partly written | written sub-blocks from the destination, the rest from the source |
//! | discard | whole unhydrated regions | zero them on the destination, then mark |
//! | discard | hydrated parts | pass down if enabled |
//! | write zeroes | as write | destination zeroing (fallocate) where possible |
//! | flush | - | group commit (pre-commit, destination flush, metadata commit) |
//!
//! Layout: request mapping (read, write, discard, write zeroes, flush) is here;
//! [`commit`] schedules and gates commits ([`DestFlush`]: whether a commit
//! flushes the destination); `hydrate.rs` copies regions; `direct.rs` grants
//! direct-I/O permits and counts them; `counters.rs` keeps the sharded I/O
//! counters; `iov.rs` holds the scatter-gather helpers; [`locks`], [`rate`],
//! [`throttle`] and [`hydrator`] are what their names say.
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
mod counters;
mod direct;
mod hydrate;
pub mod hydrator;
pub use direct::RegionCopy;
mod iov;
pub mod locks;
pub mod rate;
mod subblock;
pub mod throttle;

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metadata::{CommitOutcome, Geometry, Metadata, MetadataError, Mode};
use crate::storage::{iov_len, BlockDevice, StorageError, SECTOR_SIZE};
pub use commit::DestFlush;
use commit::{CommitGate, CommitLatency, Committer};
pub use counters::Counters;
use counters::{bump, AtomicCounters, CounterOf, InFlight, COUNTER_SHARDS};
pub use hydrate::HydrateStep;
use iov::{copy_from_iov, sub_iov, sub_iov_mut, with_scratch};
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
    /// Mutation switch (see [`Engine::set_early_copy_bits`]).
    #[cfg(feature = "test-hooks")]
    early_copy_bits: std::sync::atomic::AtomicBool,
    /// Mutation switch (see [`Engine::set_whole_copies`]).
    #[cfg(feature = "test-hooks")]
    whole_copies: std::sync::atomic::AtomicBool,
}

/// `dest_flushed_at` of an engine that has not flushed the destination yet. A
/// restarted process inherits, in the page cache or the disk's cache, writes the
/// previous one completed and never flushed: its first flush must reach the
/// destination although its own counters say nothing was written (design rule 7).
const DEST_NEVER_FLUSHED: u64 = u64::MAX;

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
            #[cfg(feature = "test-hooks")]
            early_copy_bits: Default::default(),
            #[cfg(feature = "test-hooks")]
            whole_copies: Default::default(),
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
        if self.md.all_hydrated() {
            return self
                .dest
                .read_vectored_at(bufs, offset)
                .map_err(EngineError::Dest);
        }
        // Split into runs that live on one device.
        self.runs(offset, end, |pos, run_end, hydrated| {
            let (dev, wrap): (&Arc<dyn BlockDevice>, ErrWrap) = if hydrated {
                (&self.dest, EngineError::Dest)
            } else {
                (
                    self.source_dev(self.geo.region_of(pos))?,
                    EngineError::Source,
                )
            };
            if pos == offset && run_end == end {
                return dev.read_vectored_at(bufs, offset).map_err(wrap);
            }
            let mut sub = sub_iov_mut(bufs, (pos - offset) as usize, (run_end - pos) as usize);
            dev.read_vectored_at(&mut sub, pos).map_err(wrap)
        })
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

    /// Notes a completed destination write (see `dest_flushed_at`). A failed
    /// write the engine issued promised nothing and is not noted; a direct
    /// write's permit notes failed and abandoned ones too (it cannot tell how
    /// much landed), which only costs a flush.
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
        } else if let Some(plan) = self.sub_block_plan(r, pos, piece_end) {
            // Its sub-blocks only; the region stays partly written.
            return self.write_sub_blocks(r, plan, pos, piece_end, offset, payload);
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
}

#[cfg(test)]
mod tests;
