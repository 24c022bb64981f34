//! Block devices: the bottom layer of vhost-clone.
//!
//! This module owns byte-addressed access to the three backing stores (source,
//! destination, metadata). It knows nothing of regions, bitmaps or requests.
//!
//! * [`BlockDevice`] is the one interface every layer above uses.
//! * [`FileDevice`] serves regular files and block devices with `pread`/`pwrite`,
//!   `fdatasync` for flush, `fallocate`/`BLKDISCARD`/`BLKZEROOUT` for discard and
//!   write-zeroes, and optionally `O_DIRECT` with aligned bounce buffers.
//! * [`nbd::NbdDevice`] is a read-only source behind an NBD server (our own
//!   client: negotiation, structured replies, block status, several
//!   connections, reconnect and timeouts).
//! * [`aio`] and [`queue`]: direct requests, issued asynchronously by a caller
//!   on a device's file descriptor (io_uring) or, in tests, on the simulated
//!   device, with a permit ([`aio::DirectIo`]) that counts them for the layer that
//!   granted them.
//! * [`lock`]: whole-file OFD locks (one daemon per clone) and file identity.
//! * [`SimDevice`] is an in-memory device with a **volatile write cache**: writes
//!   become durable only at [`BlockDevice::flush`]; [`SimDevice::crash`] keeps a
//!   random (seeded) subset of the unflushed writes, in any order, possibly torn
//!   at sector granularity. It is what the crash suite runs on, and it can inject
//!   faults. Test machinery: built only for tests and with the `test-utils`
//!   feature.
//!
//! Durability contract: after `flush()` returns `Ok`, every write that completed
//! before `flush()` was called is durable. Nothing else is promised.

pub mod aio;
mod file;
pub mod lock;
pub mod nbd;
pub mod queue;
#[cfg(any(test, feature = "test-utils"))]
mod sim;

pub use file::{io_alignment, AlignedBuf, FileDevice, OpenOptions, BLKDISCARD, BLKZEROOUT};
pub use lock::{FileId, LockKind};
#[cfg(any(test, feature = "test-utils"))]
pub use sim::{CrashLog, DeviceId, Fault, LogEvent, Replayer, SimDevice};

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};

/// Size of a sector: the unit of atomicity the simulated device honours and the
/// granularity of every guest request.
pub const SECTOR_SIZE: u64 = 512;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O system call failed.
    #[error("{op} of {len} bytes at offset {offset} failed")]
    Io {
        /// The operation (read, write, flush, discard, write-zeroes, open).
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The request reaches past the end of the device.
    #[error("{op} of {len} bytes at offset {offset} is outside the device ({size} bytes)")]
    OutOfRange {
        /// The operation.
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Device size in bytes.
        size: u64,
    },
    /// A write-type operation on a device opened read-only.
    #[error("{op} refused: the device is read-only")]
    ReadOnly {
        /// The operation.
        op: &'static str,
    },
    /// The device cannot do this operation.
    #[error("{op} is not supported by this device")]
    Unsupported {
        /// The operation.
        op: &'static str,
    },
    /// Opening a file failed.
    #[error("cannot open {path}")]
    Open {
        /// The path given.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The device's parameters are unusable (e.g. O_DIRECT alignment).
    #[error("invalid device: {0}")]
    Invalid(String),
    /// Another process (or another open in this one) holds a conflicting lock.
    #[error("{path} is in use{}: another vhost-clone, QEMU or tool has it open; stop it first", holder.as_ref().map(|h| format!(" by {h}")).unwrap_or_default())]
    Locked {
        /// The path given.
        path: String,
        /// Who holds the lock, when it could be found.
        holder: Option<String>,
    },
}

impl StorageError {
    /// The `io::ErrorKind` closest to this error, for callers that speak `io::Error`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            StorageError::Io { source, .. } | StorageError::Open { source, .. } => source.kind(),
            StorageError::OutOfRange { .. } | StorageError::Invalid(_) => {
                io::ErrorKind::InvalidInput
            }
            StorageError::Locked { .. } => io::ErrorKind::WouldBlock,
            StorageError::ReadOnly { .. } => io::ErrorKind::PermissionDenied,
            StorageError::Unsupported { .. } => io::ErrorKind::Unsupported,
        }
    }

    /// The raw OS error number, where there is one (e.g. `ENOSPC`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StorageError::Io { source, .. } | StorageError::Open { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// An I/O error of `op` on `[offset, offset + len)`.
pub(crate) fn io_err(op: &'static str, offset: u64, len: u64, source: io::Error) -> StorageError {
    StorageError::Io {
        op,
        offset,
        len,
        source,
    }
}

/// Result type of the storage layer.
pub type Result<T> = std::result::Result<T, StorageError>;

/// A byte-addressed block device.
///
/// Implementations must be safe to call from several threads at once; requests to
/// disjoint ranges must not interfere.
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// True when the device was opened read-only; write-type calls then fail.
    fn read_only(&self) -> bool;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes all of `buf` at `offset`. Not durable until [`BlockDevice::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Reads into a scatter list, filling each buffer in turn.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let mut off = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    /// Writes a gather list, each buffer in turn.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }

    /// Makes every write completed before this call durable.
    fn flush(&self) -> Result<()>;

    /// Tells the device the range is unused. Afterwards the range reads as zeroes
    /// on devices where [`BlockDevice::discard_zeroes`] is true, and as unspecified
    /// (but old or zero) data otherwise.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// True when the device can discard at all.
    fn supports_discard(&self) -> bool {
        true
    }

    /// True when a discarded range reads back as zeroes.
    fn discard_zeroes(&self) -> bool {
        false
    }

    /// Writes zeroes over the range, cheaply where the device can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// The file descriptor behind the device, for in-kernel copies
    /// (`copy_file_range`); `None` for devices without one.
    fn raw_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }

    /// How callers may issue their own asynchronous reads and writes on the
    /// device ([`aio`]: the io_uring path of the virtio front): on its file
    /// descriptor, or emulated by the queue (the simulated device). `None` for
    /// devices that take only these calls (the network source).
    fn async_io(&self) -> Option<aio::AsyncIo> {
        None
    }

    /// The ranges of `[offset, offset + len)` that may hold data, as `(start, end)`
    /// pairs in order; everything else reads as zeroes (holes of a sparse file).
    /// `None` when the device cannot tell, i.e. every byte may be data.
    fn data_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let _ = (offset, len);
        Ok(None)
    }

    /// The connection state of a device behind a network server, for status;
    /// `None` for local devices.
    fn remote_status(&self) -> Option<nbd::RemoteStatus> {
        None
    }
}

/// A file descriptor to issue I/O on directly (see [`BlockDevice::async_io`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoFd {
    /// The open file; it lives as long as the device.
    pub fd: std::os::unix::io::RawFd,
    /// Alignment of buffer addresses, buffer lengths and offsets (1: none): with
    /// `O_DIRECT` every buffer address, buffer length and offset must be a
    /// multiple of it.
    pub align: usize,
}

/// Copies `[offset, offset + len)` from `src` to the same place on `dst`:
/// in the kernel (`copy_file_range`) when both are files, else through `buf`.
pub fn copy_range(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> std::result::Result<(), (bool, StorageError)> {
    if let (Some(sfd), Some(dfd)) = (src.raw_fd(), dst.raw_fd()) {
        check_range("read", offset, len, src.size()).map_err(|e| (true, e))?;
        check_range("write", offset, len, dst.size()).map_err(|e| (false, e))?;
        if dst.read_only() {
            return Err((false, StorageError::ReadOnly { op: "write" }));
        }
        if file::copy_file_range_all(sfd, dfd, offset, len).is_ok() {
            return Ok(());
        }
        // Not supported between these two (or failed): copy through memory, which
        // also tells a source error from a destination error.
    }
    // Through a buffer of at most COPY_CHUNK bytes, whatever the range's size.
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(COPY_CHUNK);
        buf.resize(n as usize, 0);
        src.read_at(buf, pos).map_err(|e| (true, e))?;
        dst.write_at(buf, pos).map_err(|e| (false, e))?;
        pos += n;
    }
    Ok(())
}

/// Largest buffer [`copy_range`] copies through (a multiple of every O_DIRECT alignment).
pub const COPY_CHUNK: u64 = 8 << 20;

/// True when every byte of the device is zero (holes are skipped, data is read
/// in bounded chunks): a never-used metadata file or volume.
pub fn is_all_zero(dev: &dyn BlockDevice) -> Result<bool> {
    let size = dev.size();
    let extents = dev
        .data_extents(0, size)?
        .unwrap_or_else(|| vec![(0, size)]);
    let mut buf = Vec::new();
    for (a, b) in extents {
        let mut pos = a;
        while pos < b {
            let n = (b - pos).min(COPY_CHUNK);
            buf.resize(n as usize, 0);
            dev.read_at(&mut buf, pos)?;
            if buf.iter().any(|&x| x != 0) {
                return Ok(false);
            }
            pos += n;
        }
    }
    Ok(true)
}

/// Checks that `[offset, offset + len)` lies within a device of `size` bytes.
pub fn check_range(op: &'static str, offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StorageError::OutOfRange {
            op,
            offset,
            len,
            size,
        }),
    }
}

/// Total length of a list of buffers.
pub fn iov_len<T: std::ops::Deref<Target = [u8]>>(bufs: &[T]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}
