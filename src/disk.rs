//! The clone engine as the virtio front sees it: [`CloneDisk`] implements
//! [`crate::virtio::BlockBackend`] over an [`Engine`], so that neither of the
//! two layers knows the other.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

use crate::engine::Engine;
use crate::storage::aio::{AsyncIo, DirectIo};
use crate::virtio::BlockBackend;

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
        u32::try_from(self.engine.geometry().region_size()).unwrap_or(u32::MAX)
    }

    /// The destination's I/O alignment: 4096 with `O_DIRECT` (`--direct`), where a write
    /// of less than a block would be a read-modify-write of the covering block that two
    /// queues could interleave and lose; 512 otherwise.
    fn logical_block_size(&self) -> u32 {
        let align = match self.engine.dest().async_io() {
            Some(AsyncIo::Fd(f)) => f.align,
            _ => 1,
        };
        u32::try_from(align).map_or(512, |a| a.max(512))
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
