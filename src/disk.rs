//! The clone engine as the virtio front sees it: [`CloneDisk`] implements
//! [`crate::virtio::BlockBackend`] over an [`Engine`], so that neither of the
//! two layers knows the other.
//!
//! [`Standby`] is the backend of `serve --standby` (the target daemon of a
//! migration over shared storage): it answers a frontend with the clone's shape
//! before the daemon may open the clone. Requests wait in their rings until the
//! takeover (the front's gate, [`crate::virtio::handover::Frontends::gated`]);
//! one that reaches the standby anyway waits until the [`CloneDisk`] is in
//! ([`Standby::take_over`]). Invariant: no request reaches anything but that
//! disk, and a disk of another shape is never taken in (the frontend already
//! told its guest the shape); a standby that stops first fails what it holds.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::engine::{Engine, RegionCopy};
use crate::storage::aio::{AsyncIo, DirectIo};
use crate::virtio::BlockBackend;

/// The logical block size the guest gets for a destination whose writes must be
/// aligned to `align` bytes (1 when any offset will do).
pub fn logical_block_size(align: usize) -> u32 {
    u32::try_from(align).map_or(512, |a| a.max(512))
}

/// The optimal I/O size the guest gets for a clone of `region_size`.
pub fn optimal_io_size(region_size: u64) -> u32 {
    u32::try_from(region_size).unwrap_or(u32::MAX)
}

/// A clone served to a guest.
#[derive(Debug)]
pub struct CloneDisk {
    engine: Arc<Engine>,
    read_only: bool,
}

impl CloneDisk {
    /// Wraps `engine`; with `read_only` the guest gets a read-only disk.
    pub fn new(engine: Arc<Engine>, read_only: bool) -> CloneDisk {
        CloneDisk { engine, read_only }
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only disk",
            ))
        } else {
            Ok(())
        }
    }
}

impl BlockBackend for CloneDisk {
    fn size(&self) -> u64 {
        self.engine.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn optimal_io_size(&self) -> u32 {
        optimal_io_size(self.engine.geometry().region_size())
    }

    /// The destination's I/O alignment: 4096 with `O_DIRECT` (`--direct`), where a write
    /// of less than a block would be a read-modify-write of the covering block that two
    /// queues could interleave and lose; 512 otherwise.
    fn logical_block_size(&self) -> u32 {
        let align = match self.engine.dest().async_io() {
            Some(AsyncIo::Fd(f)) => f.align,
            _ => 1,
        };
        logical_block_size(align)
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        Ok(self.engine.read(offset, bufs)?)
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.writable()?;
        Ok(self.engine.write(offset, bufs)?)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.engine.flush()?)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        Ok(self.engine.discard(offset, len)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.writable()?;
        Ok(self.engine.write_zeroes(offset, len)?)
    }

    fn write_cache(&self) -> bool {
        self.engine.metadata().write_cache().unwrap_or(true)
    }

    fn direct_io(&self, write: bool, offset: u64, len: u64) -> Option<DirectIo<'_>> {
        if write && self.read_only {
            return None;
        }
        self.engine.direct_io(write, offset, len)
    }

    fn region_copy(&self, offset: u64, len: u64) -> Option<RegionCopy<'_>> {
        if self.read_only {
            return None;
        }
        self.engine.region_copy(offset, len)
    }

    fn set_write_cache(&self, writeback: bool) {
        tracing::info!(writeback, "guest changed the write cache mode");
        if let Err(e) = self.engine.set_write_cache(writeback) {
            tracing::error!(
                error = %crate::error_chain(&e),
                "cannot commit the guest's write cache mode; it is kept in memory only"
            );
        }
    }
}

/// What a frontend learns of a disk when it connects: the answers of
/// [`BlockBackend`]'s shape methods, which a standby gives before it has the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// [`BlockBackend::size`].
    pub size: u64,
    /// [`BlockBackend::read_only`].
    pub read_only: bool,
    /// [`BlockBackend::optimal_io_size`].
    pub optimal_io_size: u32,
    /// [`BlockBackend::logical_block_size`].
    pub logical_block_size: u32,
}

impl Shape {
    /// The shape of `disk`.
    pub fn of(disk: &dyn BlockBackend) -> Shape {
        Shape {
            size: disk.size(),
            read_only: disk.read_only(),
            optimal_io_size: disk.optimal_io_size(),
            logical_block_size: disk.logical_block_size(),
        }
    }
}

/// Why a standby has no disk yet, or will never have one.
#[derive(Debug)]
enum Waiting {
    /// Until [`Standby::take_over`].
    ForTakeover,
    /// The standby stopped, or took in no disk: requests fail with this.
    Never(String),
}

/// A disk whose requests wait until the daemon took the clone over; see the
/// module docs.
#[derive(Debug)]
pub struct Standby {
    shape: Shape,
    disk: OnceLock<CloneDisk>,
    waiting: Mutex<Waiting>,
    /// The guest's write-cache mode: the store's guess before the takeover, and a
    /// change the guest made meanwhile, applied at the takeover.
    write_cache: Mutex<(bool, Option<bool>)>,
    wake: Condvar,
}

impl Standby {
    /// A standby that tells frontends `shape` and a write-cache mode of `writeback`.
    pub fn new(shape: Shape, writeback: bool) -> Standby {
        Standby {
            shape,
            disk: OnceLock::new(),
            waiting: Mutex::new(Waiting::ForTakeover),
            write_cache: Mutex::new((writeback, None)),
            wake: Condvar::new(),
        }
    }

    /// Takes `disk` in and releases the requests held for it. Refused (and every
    /// held and later request fails) when its shape is not the one the frontends
    /// were told, or after [`Standby::abandon`].
    pub fn take_over(&self, disk: CloneDisk) -> Result<(), String> {
        let mut waiting = lock(&self.waiting);
        if let Waiting::Never(why) = &*waiting {
            return Err(why.clone());
        }
        let shape = Shape::of(&disk);
        if shape != self.shape {
            let why = format!(
                "the clone changed while this daemon stood by: frontends were told {:?}, the clone is {:?}",
                self.shape, shape
            );
            *waiting = Waiting::Never(why.clone());
            self.wake.notify_all();
            return Err(why);
        }
        // Held until the disk is in: a change the guest makes meanwhile is applied
        // here or goes to the disk, never lost in between.
        let write_cache = lock(&self.write_cache);
        if let Some(writeback) = write_cache.1 {
            disk.set_write_cache(writeback);
        }
        let _ = self.disk.set(disk);
        drop(write_cache);
        self.wake.notify_all();
        Ok(())
    }

    /// The daemon stops without a disk: held and later requests fail with `why`.
    pub fn abandon(&self, why: &str) {
        let mut waiting = lock(&self.waiting);
        if self.disk.get().is_none() {
            *waiting = Waiting::Never(why.to_string());
            self.wake.notify_all();
        }
    }

    /// The disk, once taken over; waits for it until then.
    fn disk(&self) -> io::Result<&CloneDisk> {
        if let Some(d) = self.disk.get() {
            return Ok(d);
        }
        let mut waiting = lock(&self.waiting);
        loop {
            if let Some(d) = self.disk.get() {
                return Ok(d);
            }
            if let Waiting::Never(why) = &*waiting {
                return Err(io::Error::other(why.clone()));
            }
            waiting = self.wake.wait(waiting).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlockBackend for Standby {
    fn size(&self) -> u64 {
        self.shape.size
    }

    fn read_only(&self) -> bool {
        self.shape.read_only
    }

    fn optimal_io_size(&self) -> u32 {
        self.shape.optimal_io_size
    }

    fn logical_block_size(&self) -> u32 {
        self.shape.logical_block_size
    }

    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.disk()?.read(offset, bufs)
    }

    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.disk()?.write(offset, bufs)
    }

    fn flush(&self) -> io::Result<()> {
        self.disk()?.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.disk()?.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.disk()?.write_zeroes(offset, len, unmap)
    }

    fn write_cache(&self) -> bool {
        // Under the lock take_over holds while it applies a change: none is lost.
        let wc = lock(&self.write_cache);
        match self.disk.get() {
            Some(d) => d.write_cache(),
            None => wc.1.unwrap_or(wc.0),
        }
    }

    fn set_write_cache(&self, writeback: bool) {
        let mut wc = lock(&self.write_cache);
        match self.disk.get() {
            Some(d) => d.set_write_cache(writeback),
            None => wc.1 = Some(writeback),
        }
    }

    /// None before the takeover: the request goes to [`Standby::read`] or
    /// [`Standby::write`], which wait.
    fn direct_io(&self, write: bool, offset: u64, len: u64) -> Option<DirectIo<'_>> {
        self.disk.get()?.direct_io(write, offset, len)
    }

    fn region_copy(&self, offset: u64, len: u64) -> Option<RegionCopy<'_>> {
        self.disk.get()?.region_copy(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineConfig;
    use crate::metadata::format::Layout;
    use crate::metadata::{Geometry, Metadata};
    use crate::storage::{BlockDevice, SimDevice};
    use std::time::Duration;

    const SIZE: u64 = 16 * 4096;

    fn disk() -> CloneDisk {
        let geo = Geometry::new(SIZE, 4096).unwrap();
        let src = Arc::new(SimDevice::from_image(vec![0x5a; SIZE as usize]));
        let dst = Arc::new(SimDevice::new(SIZE));
        let mdd = Arc::new(SimDevice::new(Layout::new(&geo).required_size()));
        let md = Arc::new(Metadata::format(mdd, geo).unwrap());
        let engine = Engine::new(
            Some(src as Arc<dyn BlockDevice>),
            dst,
            md,
            EngineConfig::default(),
        )
        .unwrap();
        CloneDisk::new(Arc::new(engine), false)
    }

    fn read(b: &dyn BlockBackend) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 512];
        b.read(4096, &mut [IoSliceMut::new(&mut buf)])?;
        Ok(buf)
    }

    /// A request waits for the takeover and then reaches the disk; the shape
    /// is the one given, not the disk's, until then.
    #[test]
    fn requests_wait_for_the_takeover() {
        let d = disk();
        let sb = Arc::new(Standby::new(Shape::of(&d), false));
        assert_eq!(sb.size(), SIZE);
        assert!(!sb.write_cache());
        let s2 = sb.clone();
        let reader = std::thread::spawn(move || read(s2.as_ref()));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !reader.is_finished(),
            "a request passed before the takeover"
        );
        assert!(sb.direct_io(false, 0, 512).is_none());
        sb.take_over(d).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), vec![0x5a; 512]);
        assert!(sb.write_cache(), "the disk's mode, once it is in");
    }

    /// A disk of another shape is refused, and so are the requests held for it.
    #[test]
    fn a_disk_of_another_shape_is_refused() {
        let d = disk();
        let mut shape = Shape::of(&d);
        shape.logical_block_size = 4096;
        let sb = Arc::new(Standby::new(shape, true));
        let s2 = sb.clone();
        let reader = std::thread::spawn(move || read(s2.as_ref()));
        let e = sb.take_over(d).unwrap_err();
        assert!(e.contains("changed while this daemon stood by"), "{e}");
        assert!(reader.join().unwrap().is_err());
        assert!(read(sb.as_ref()).is_err());
    }

    /// A standby that stops fails what it held, and takes no disk after.
    #[test]
    fn an_abandoned_standby_fails_its_requests() {
        let sb = Arc::new(Standby::new(Shape::of(&disk()), true));
        let s2 = sb.clone();
        let flusher = std::thread::spawn(move || s2.flush());
        std::thread::sleep(Duration::from_millis(50));
        sb.abandon("stopped");
        assert_eq!(flusher.join().unwrap().unwrap_err().to_string(), "stopped");
        assert!(sb.take_over(disk()).is_err());
    }

    /// The guest's write-cache change made while standing by reaches the disk.
    #[test]
    fn a_write_cache_change_waits_for_the_disk() {
        let sb = Standby::new(Shape::of(&disk()), true);
        sb.set_write_cache(false);
        assert!(!sb.write_cache());
        let d = disk();
        sb.take_over(d).unwrap();
        assert!(!sb.write_cache());
        assert_eq!(
            sb.disk.get().unwrap().engine.metadata().write_cache(),
            Some(false)
        );
    }
}
