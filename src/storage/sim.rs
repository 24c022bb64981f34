//! [`SimDevice`]: an in-memory block device with a volatile write cache, for
//! crash simulation and fault injection.
//!
//! Model: the device holds a *durable* image and a list of *pending* writes
//! (everything written since the last flush). Reads see the pending writes
//! applied in order, like a disk's cache would serve them. `flush()` makes all
//! pending writes durable. A crash keeps an arbitrary subset of the pending
//! writes, applied in an arbitrary order, each possibly torn at sector (512 B)
//! granularity; a single sector is never torn.
//!
//! A [`CrashLog`] shared by several devices records every write and flush in
//! global order, so that a test can rebuild each device's state "as if the
//! machine crashed just before event N" for every N of one run, or "as if the
//! process died just before event N" ([`Replayer::survivor`]: nothing is lost,
//! the unflushed writes stay volatile).

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::seq::SliceRandom;
use rand::Rng;

use super::{check_range, iov_len, BlockDevice, Result, StorageError, SECTOR_SIZE};

/// Identifies a device in a [`CrashLog`].
pub type DeviceId = u8;

/// One recorded device operation.
#[derive(Debug, Clone)]
pub enum LogEvent {
    /// A write (or a discard/write-zeroes, recorded as a write of zeroes).
    Write {
        /// The device written.
        dev: DeviceId,
        /// Byte offset.
        offset: u64,
        /// The bytes written.
        data: Arc<[u8]>,
    },
    /// A completed flush.
    Flush {
        /// The device flushed.
        dev: DeviceId,
    },
    /// A marker the test put in the log (e.g. "guest flush acknowledged").
    Marker(u64),
}

/// A global, ordered record of the operations of several [`SimDevice`]s.
#[derive(Debug, Default)]
pub struct CrashLog {
    events: Mutex<Vec<LogEvent>>,
}

impl CrashLog {
    /// A new, empty log.
    pub fn new() -> Arc<CrashLog> {
        Arc::new(CrashLog::default())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<LogEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of events so far; also the index the next event will get.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Appends a marker and returns its index.
    pub fn marker(&self, value: u64) -> usize {
        let mut ev = self.lock();
        ev.push(LogEvent::Marker(value));
        ev.len() - 1
    }

    /// A copy of all events.
    pub fn events(&self) -> Vec<LogEvent> {
        self.lock().clone()
    }

    /// Indices of the events that are device operations (the crash boundaries).
    pub fn boundaries(&self) -> Vec<usize> {
        self.lock()
            .iter()
            .enumerate()
            .filter(|(_, e)| !matches!(e, LogEvent::Marker(_)))
            .map(|(i, _)| i)
            .collect()
    }

    /// The image device `dev` (which started as `initial`) would hold after a
    /// crash just before event `point`: all writes before its last flush, plus a
    /// random subset of the later ones, torn and reordered.
    pub fn crash_image<R: Rng>(
        &self,
        dev: DeviceId,
        initial: &[u8],
        point: usize,
        rng: &mut R,
    ) -> Vec<u8> {
        let mut r = Replayer::new(self, dev, initial.to_vec());
        r.advance_to(point);
        r.crash_image(rng)
    }
}

/// Rebuilds one device's state from a [`CrashLog`] incrementally, for tests
/// that crash at every point of a run in increasing order.
#[derive(Debug)]
pub struct Replayer {
    events: Vec<LogEvent>,
    dev: DeviceId,
    pos: usize,
    durable: Vec<u8>,
    pending: Vec<(u64, Arc<[u8]>)>,
}

impl Replayer {
    /// Starts at event 0 with the device holding `initial`.
    pub fn new(log: &CrashLog, dev: DeviceId, initial: Vec<u8>) -> Replayer {
        Replayer {
            events: log.events(),
            dev,
            pos: 0,
            durable: initial,
            pending: Vec::new(),
        }
    }

    /// Applies events up to (not including) `point`. Points must not decrease.
    pub fn advance_to(&mut self, point: usize) {
        while self.pos < point.min(self.events.len()) {
            match &self.events[self.pos] {
                LogEvent::Write { dev, offset, data } if *dev == self.dev => {
                    self.pending.push((*offset, data.clone()));
                }
                LogEvent::Flush { dev } if *dev == self.dev => {
                    for (off, data) in self.pending.drain(..) {
                        apply(&mut self.durable, off, &data);
                    }
                }
                _ => {}
            }
            self.pos += 1;
        }
    }

    /// The device as a process that died at the current point leaves it: the
    /// machine kept running, so every write is still there, the unflushed ones
    /// still volatile (a later [`SimDevice::crash`] may lose them).
    pub fn survivor(&self) -> SimDevice {
        let mut cache = self.durable.clone();
        for (off, data) in &self.pending {
            apply(&mut cache, *off, data);
        }
        let d = SimDevice::from_image(self.durable.clone());
        {
            let mut st = d.lock();
            st.cache = cache;
            st.pending = self.pending.clone();
        }
        d
    }

    /// The device image after a crash at the current point.
    pub fn crash_image<R: Rng>(&self, rng: &mut R) -> Vec<u8> {
        let mut img = self.durable.clone();
        apply_crash(&mut img, &self.pending, rng);
        img
    }
}

fn apply(image: &mut [u8], offset: u64, data: &[u8]) {
    let start = offset as usize;
    image[start..start + data.len()].copy_from_slice(data);
}

/// Applies a random subset of `pending` to `image` in a random order, tearing
/// multi-sector writes at sector granularity.
fn apply_crash<R: Rng>(image: &mut [u8], pending: &[(u64, Arc<[u8]>)], rng: &mut R) {
    let mut order: Vec<usize> = (0..pending.len()).collect();
    order.shuffle(rng);
    for i in order {
        let (off, data) = &pending[i];
        match rng.gen_range(0..3u8) {
            0 => {} // lost
            1 => apply(image, *off, data),
            _ => {
                // Torn: each sector independently survives or not.
                let sectors = data.len().div_ceil(SECTOR_SIZE as usize);
                for s in 0..sectors {
                    if rng.gen_bool(0.5) {
                        let a = s * SECTOR_SIZE as usize;
                        let b = (a + SECTOR_SIZE as usize).min(data.len());
                        apply(image, off + a as u64, &data[a..b]);
                    }
                }
            }
        }
    }
}

/// Operations a [`SimDevice`] can be told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Reads fail.
    Read = 0,
    /// Writes (and discard/write-zeroes) fail.
    Write = 1,
    /// Flushes fail.
    Flush = 2,
}

#[derive(Debug)]
struct SimState {
    durable: Vec<u8>,
    /// `durable` with every pending write applied: what reads see.
    cache: Vec<u8>,
    pending: Vec<(u64, Arc<[u8]>)>,
}

/// An in-memory block device with a volatile write cache. See the module docs.
#[derive(Debug)]
pub struct SimDevice {
    state: Mutex<SimState>,
    size: u64,
    read_only: bool,
    log: Option<(Arc<CrashLog>, DeviceId)>,
    /// errno per [`Fault`], 0 = no fault.
    faults: [AtomicU64; 3],
    writes: AtomicU64,
    flushes: AtomicU64,
    reads: AtomicU64,
}

impl SimDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> SimDevice {
        Self::from_image(vec![0; size as usize])
    }

    /// A device whose durable content is `image`.
    pub fn from_image(image: Vec<u8>) -> SimDevice {
        SimDevice {
            size: image.len() as u64,
            state: Mutex::new(SimState {
                cache: image.clone(),
                durable: image,
                pending: Vec::new(),
            }),
            read_only: false,
            log: None,
            faults: Default::default(),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    /// Makes the device read-only.
    pub fn into_read_only(mut self) -> SimDevice {
        self.read_only = true;
        self
    }

    /// Records every write and flush of this device in `log` under `id`.
    pub fn with_log(mut self, log: Arc<CrashLog>, id: DeviceId) -> SimDevice {
        self.log = Some((log, id));
        self
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes operations of kind `op` fail with `errno` (`None` clears the fault).
    pub fn set_fault(&self, op: Fault, errno: Option<i32>) {
        self.faults[op as usize].store(errno.map_or(0, |e| e as u64), Ordering::SeqCst);
    }

    fn fault(&self, op: Fault, name: &'static str, offset: u64, len: u64) -> Result<()> {
        match self.faults[op as usize].load(Ordering::SeqCst) {
            0 => Ok(()),
            errno => Err(StorageError::Io {
                op: name,
                offset,
                len,
                source: io::Error::from_raw_os_error(errno as i32),
            }),
        }
    }

    /// What the device would hold after a power cut now (the device itself is unchanged).
    pub fn crash<R: Rng>(&self, rng: &mut R) -> Vec<u8> {
        let st = self.lock();
        let mut img = st.durable.clone();
        apply_crash(&mut img, &st.pending, rng);
        img
    }

    /// The durable image (what survives a crash that loses every unflushed write).
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The image as reads see it now.
    pub fn current_image(&self) -> Vec<u8> {
        self.lock().cache.clone()
    }

    /// Number of unflushed writes.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// Number of completed writes (including discard/write-zeroes).
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Number of completed flushes.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Number of completed reads.
    pub fn read_count(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    fn do_write(&self, name: &'static str, offset: u64, data: Arc<[u8]>) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly { op: name });
        }
        check_range(name, offset, data.len() as u64, self.size)?;
        self.fault(Fault::Write, name, offset, data.len() as u64)?;
        let mut st = self.lock();
        apply(&mut st.cache, offset, &data);
        // Record in the global log while holding the device lock, so that the
        // log order equals the order the device applied the writes in.
        if let Some((log, id)) = &self.log {
            log.lock().push(LogEvent::Write {
                dev: *id,
                offset,
                data: data.clone(),
            });
        }
        st.pending.push((offset, data));
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl BlockDevice for SimDevice {
    fn size(&self) -> u64 {
        self.size
    }

    /// Direct requests are emulated: the queue performs them with the calls
    /// below, so they reach the crash log like any other write.
    fn async_io(&self) -> Option<super::aio::AsyncIo> {
        Some(super::aio::AsyncIo::Emulated)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range("read", offset, buf.len() as u64, self.size)?;
        self.fault(Fault::Read, "read", offset, buf.len() as u64)?;
        let st = self.lock();
        let s = offset as usize;
        buf.copy_from_slice(&st.cache[s..s + buf.len()]);
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.do_write("write", offset, Arc::from(buf))
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        // One device write, so that a crash can tear it like a real multi-sector write.
        let mut data = Vec::with_capacity(iov_len(bufs) as usize);
        for b in bufs {
            data.extend_from_slice(b);
        }
        self.do_write("write", offset, Arc::from(data))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.fault(Fault::Flush, "flush", 0, 0)?;
        let mut st = self.lock();
        let pending = std::mem::take(&mut st.pending);
        for (off, data) in pending {
            apply(&mut st.durable, off, &data);
        }
        if let Some((log, id)) = &self.log {
            log.lock().push(LogEvent::Flush { dev: *id });
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range("discard", offset, len, self.size)?;
        self.do_write("discard", offset, Arc::from(vec![0u8; len as usize]))
    }

    fn discard_zeroes(&self) -> bool {
        true
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range("write-zeroes", offset, len, self.size)?;
        self.do_write("write-zeroes", offset, Arc::from(vec![0u8; len as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn unflushed_writes_are_visible_but_volatile() {
        let d = SimDevice::new(4096);
        d.write_at(&[1u8; 512], 0).unwrap();
        let mut b = [0u8; 512];
        d.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1u8; 512]);
        assert_eq!(d.durable_image()[..512], [0u8; 512]);
        d.flush().unwrap();
        assert_eq!(d.durable_image()[..512], [1u8; 512]);
        assert_eq!(d.pending_writes(), 0);
    }

    #[test]
    fn crash_keeps_flushed_data_and_tears_at_sector_granularity() {
        let d = SimDevice::new(8 * 512);
        d.write_at(&[1u8; 4096], 0).unwrap();
        d.flush().unwrap();
        d.write_at(&[2u8; 4096], 0).unwrap();
        let mut seen_torn = false;
        let mut seen_lost = false;
        let mut seen_whole = false;
        for seed in 0..200 {
            let img = d.crash(&mut ChaCha8Rng::seed_from_u64(seed));
            for s in img.chunks(512) {
                // A sector is never mixed.
                assert!(s.iter().all(|&x| x == s[0]));
                assert!(s[0] == 1 || s[0] == 2);
            }
            let twos = img.chunks(512).filter(|s| s[0] == 2).count();
            match twos {
                0 => seen_lost = true,
                8 => seen_whole = true,
                _ => seen_torn = true,
            }
        }
        assert!(seen_torn && seen_lost && seen_whole);
    }

    #[test]
    fn crash_log_rebuilds_state_at_every_point() {
        let log = CrashLog::new();
        let d = SimDevice::new(1024).with_log(log.clone(), 3);
        d.write_at(&[1u8; 512], 0).unwrap(); // event 0
        d.flush().unwrap(); // event 1
        d.write_at(&[2u8; 512], 512).unwrap(); // event 2
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let init = vec![0u8; 1024];
        // Before the flush completes, the first write may or may not be there.
        let img = log.crash_image(3, &init, 1, &mut rng);
        assert!(img[0] == 0 || img[0] == 1);
        // After the flush it must be.
        for _ in 0..20 {
            let img = log.crash_image(3, &init, 3, &mut rng);
            assert_eq!(img[0], 1);
            assert!(img[512] == 0 || img[512] == 2);
        }
        assert_eq!(log.boundaries(), vec![0, 1, 2]);
    }

    #[test]
    fn faults_fail_the_operation_and_clear() {
        let d = SimDevice::new(4096);
        d.set_fault(Fault::Flush, Some(libc::EIO));
        assert!(d.flush().is_err());
        d.set_fault(Fault::Flush, None);
        d.flush().unwrap();
        d.set_fault(Fault::Write, Some(libc::ENOSPC));
        let e = d.write_at(&[0u8; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    }
}
