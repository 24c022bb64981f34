//! [`FileDevice`]: regular files and block devices through positioned system calls.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::lock::{self, FileId, LockError, LockKind};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use super::{check_range, io_err, iov_len, BlockDevice, IoFd, Result, StorageError};

/// `BLKDISCARD` from `<linux/fs.h>`: `_IO(0x12, 119)`, with a `u64[2]` range.
pub const BLKDISCARD: u64 = nix::request_code_none!(0x12, 119);
/// `BLKZEROOUT` from `<linux/fs.h>`: `_IO(0x12, 127)`, with a `u64[2]` range.
pub const BLKZEROOUT: u64 = nix::request_code_none!(0x12, 127);

nix::ioctl_write_ptr_bad!(
    /// BLKDISCARD on `fd` over `[range[0], range[0] + range[1])`.
    ///
    /// # Safety
    ///
    /// `data` points to a live `[u64; 2]`.
    blk_discard,
    BLKDISCARD,
    [u64; 2]
);
nix::ioctl_write_ptr_bad!(
    /// BLKZEROOUT on `fd` over `[range[0], range[0] + range[1])`.
    ///
    /// # Safety
    ///
    /// `data` points to a live `[u64; 2]`.
    blk_zeroout,
    BLKZEROOUT,
    [u64; 2]
);
/// Alignment used for `O_DIRECT` bounce buffers and checks.
const DIRECT_ALIGN: usize = 4096;
/// Chunk size of zero-filled writes when the device cannot zero a range itself.
const ZERO_CHUNK: usize = 1 << 20;

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open with `O_RDONLY`; every write-type call then fails.
    pub read_only: bool,
    /// Open with `O_DIRECT` (bypass the page cache). Unaligned buffers are bounced.
    pub direct: bool,
    /// Create the file if it is missing (mode 0600), with this size in bytes.
    pub create_size: Option<u64>,
    /// Lock the file before anything else touches it (see [`super::lock`]).
    pub lock: Option<LockKind>,
}

/// A regular file or block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    direct: bool,
    block_device: bool,
    /// The file was created by this open.
    created: bool,
    id: FileId,
    /// Cleared once `fallocate`/`BLKDISCARD` reported that discard is unsupported.
    discard_ok: AtomicBool,
}

impl FileDevice {
    /// Opens `path` as a device.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<FileDevice> {
        let open_err = |source: io::Error| StorageError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(!opts.read_only).mode(0o600);
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let creating = opts.create_size.is_some() && !opts.read_only;
        let (mut file, created) = if creating {
            match oo.clone().create_new(true).open(path) {
                Ok(f) => (f, true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    (oo.open(path).map_err(open_err)?, false)
                }
                Err(e) => return Err(open_err(e)),
            }
        } else {
            (oo.open(path).map_err(open_err)?, false)
        };
        if let Some(kind) = opts.lock {
            if let Err(e) = lock::lock_or_wait(&file, kind) {
                // Never unlinked here, even if this open created it: the process
                // holding the lock may be serving that very file.
                return Err(match e {
                    LockError::Held(holder) => StorageError::Locked {
                        path: path.display().to_string(),
                        holder,
                    },
                    LockError::Io(e) => open_err(e),
                });
            }
        }
        let meta = file.metadata().map_err(open_err)?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.file_type().is_file() {
            return Err(StorageError::Invalid(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        if let Some(want) = opts.create_size {
            if !block_device && meta.len() == 0 && want > 0 {
                file.set_len(want).map_err(open_err)?;
            }
        }
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            read_only: opts.read_only,
            direct: opts.direct,
            block_device,
            created,
            id: FileId::of(&meta),
            discard_ok: AtomicBool::new(true),
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grows a regular file to `len` bytes (the new bytes read as zeroes).
    pub fn grow(&mut self, len: u64) -> Result<()> {
        if self.block_device || self.read_only || len <= self.size {
            return Ok(());
        }
        self.file
            .set_len(len)
            .map_err(|e| io_err("grow", 0, len, e))?;
        self.size = len;
        Ok(())
    }

    /// True when this open created the file.
    pub fn created(&self) -> bool {
        self.created
    }

    /// What identifies the file (two paths, one file: equal identities).
    pub fn id(&self) -> FileId {
        self.id
    }

    /// True for a block device (as opposed to a regular file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check_write(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly { op });
        }
        check_range(op, offset, len, self.size)
    }

    /// True when `O_DIRECT` would reject this buffer/offset combination as is.
    fn needs_bounce(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        self.direct
            && ((ptr as usize) % DIRECT_ALIGN != 0
                || len % DIRECT_ALIGN != 0
                || offset % DIRECT_ALIGN as u64 != 0)
    }

    fn check_direct_offset(&self, offset: u64, len: usize) -> Result<()> {
        if self.direct && (offset % 512 != 0 || len % 512 != 0) {
            return Err(StorageError::Invalid(format!(
                "O_DIRECT needs 512-byte aligned offset and length (offset {offset}, length {len})"
            )));
        }
        Ok(())
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        loop {
            match fallocate(&self.file, mode, off, l) {
                Err(Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// BLKDISCARD (`zero`: BLKZEROOUT) over `[offset, offset + len)`.
    fn blk_ioctl(&self, zero: bool, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: both ioctls read a `u64[2]` from the pointer, which points to a
        // live array for the duration of the call; the fd is owned by self.
        let r = unsafe {
            if zero {
                blk_zeroout(self.fd(), &range)
            } else {
                blk_discard(self.fd(), &range)
            }
        };
        r.map(drop).map_err(io::Error::from)
    }

    fn lseek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek only takes integer arguments; the fd is owned by self. It moves the
        // file position, which no other code of this type uses (all I/O is positioned).
        let r = unsafe { libc::lseek(self.fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = AlignedBuf::zeroed(ZERO_CHUNK.min(len as usize).max(DIRECT_ALIGN));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.write_at(&chunk.as_slice()[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// The alignment in bytes of the I/O a file opened with `direct` (`O_DIRECT`) or
/// without takes from the io_uring path (`IoFd::align`); known
/// before the file is opened.
pub fn io_alignment(direct: bool) -> usize {
    if direct {
        DIRECT_ALIGN
    } else {
        1
    }
}

/// A heap buffer aligned for `O_DIRECT` (4096 bytes), zeroed when allocated.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least 1).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.max(1);
        Self::try_zeroed(len).unwrap_or_else(|| {
            alloc::handle_alloc_error(
                Layout::from_size_align(len, DIRECT_ALIGN).expect("aligned layout"),
            )
        })
    }

    /// A zeroed buffer of `len` bytes (at least 1), or `None` if the allocator has
    /// no memory for it (or `len` is absurd).
    pub fn try_zeroed(len: usize) -> Option<AlignedBuf> {
        let len = len.max(1);
        let layout = Layout::from_size_align(len, DIRECT_ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(AlignedBuf { ptr, len })
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no byte (never: it has at least one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its first byte, for I/O that fills or reads it without a Rust reference.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, DIRECT_ALIGN).expect("aligned layout");
        // SAFETY: ptr was allocated in `zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr, layout) }
    }
}

/// Rounds `len` up to the O_DIRECT alignment.
fn round_up_direct(len: usize) -> usize {
    len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_range("read", offset, len, self.size)?;
        self.check_direct_offset(offset, buf.len())?;
        if self.needs_bounce(buf.as_ptr(), buf.len(), offset) {
            // O_DIRECT with a misaligned buffer: read whole aligned blocks and copy.
            let start = offset - offset % DIRECT_ALIGN as u64;
            let head = (offset - start) as usize;
            let mut bounce = AlignedBuf::zeroed(round_up_direct(head + buf.len()));
            let avail = (self.size - start).min(bounce.len() as u64) as usize;
            let got = read_full(
                &self.file,
                &mut bounce.as_mut_slice()[..round_up_direct(avail)],
                start,
            )
            .map_err(|e| io_err("read", offset, len, e))?;
            if got < head + buf.len() {
                return Err(io_err(
                    "read",
                    offset,
                    len,
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            buf.copy_from_slice(&bounce.as_slice()[head..head + buf.len()]);
            return Ok(());
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| io_err("read", offset, len, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        self.check_write("write", offset, len)?;
        self.check_direct_offset(offset, buf.len())?;
        if self.needs_bounce(buf.as_ptr(), buf.len(), offset) {
            if offset % DIRECT_ALIGN as u64 != 0 || buf.len() % DIRECT_ALIGN != 0 {
                // Sub-block O_DIRECT write: read-modify-write the covering blocks.
                let start = offset - offset % DIRECT_ALIGN as u64;
                let head = (offset - start) as usize;
                let mut bounce = AlignedBuf::zeroed(round_up_direct(head + buf.len()));
                let blen = bounce.len();
                read_full(&self.file, bounce.as_mut_slice(), start)
                    .map_err(|e| io_err("write", offset, len, e))?;
                bounce.as_mut_slice()[head..head + buf.len()].copy_from_slice(buf);
                let end = (start + blen as u64).min(self.size.next_multiple_of(512));
                let wlen = (end - start) as usize;
                return self
                    .file
                    .write_all_at(&bounce.as_slice()[..wlen], start)
                    .map_err(|e| io_err("write", offset, len, e));
            }
            let mut bounce = AlignedBuf::zeroed(buf.len());
            bounce.as_mut_slice().copy_from_slice(buf);
            return self
                .file
                .write_all_at(bounce.as_slice(), offset)
                .map_err(|e| io_err("write", offset, len, e));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| io_err("write", offset, len, e))
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let len = iov_len(bufs);
        check_range("read", offset, len, self.size)?;
        if self.direct || bufs.len() > 1024 {
            let mut off = offset;
            for b in bufs.iter_mut() {
                self.read_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        let mut bufs = bufs;
        let mut off = offset;
        while !bufs.is_empty() {
            let n = preadv(self.fd(), bufs, off).map_err(|e| io_err("read", offset, len, e))?;
            if n == 0 {
                return Err(io_err(
                    "read",
                    offset,
                    len,
                    io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            off += n as u64;
            IoSliceMut::advance_slices(&mut bufs, n);
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let len = iov_len(bufs);
        self.check_write("write", offset, len)?;
        if self.direct || bufs.len() > 1024 {
            let mut off = offset;
            for b in bufs {
                self.write_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        // advance_slices needs a mutable list of slices: copy the (small) descriptor list.
        let mut owned: smallvec::SmallVec<[IoSlice<'_>; 8]> = bufs.iter().copied().collect();
        let mut rest: &mut [IoSlice<'_>] = &mut owned;
        let mut off = offset;
        while !rest.is_empty() {
            let n = pwritev(self.fd(), rest, off).map_err(|e| io_err("write", offset, len, e))?;
            if n == 0 {
                return Err(io_err(
                    "write",
                    offset,
                    len,
                    io::ErrorKind::WriteZero.into(),
                ));
            }
            off += n as u64;
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| io_err("flush", 0, 0, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.discard_ok.load(Ordering::Relaxed) {
            return Err(StorageError::Unsupported { op: "discard" });
        }
        let r = if self.block_device {
            self.blk_ioctl(false, offset, len)
        } else {
            self.fallocate(
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => {
                self.discard_ok.store(false, Ordering::Relaxed);
                Err(StorageError::Unsupported { op: "discard" })
            }
            Err(e) => Err(io_err("discard", offset, len, e)),
        }
    }

    fn supports_discard(&self) -> bool {
        !self.read_only && self.discard_ok.load(Ordering::Relaxed)
    }

    fn discard_zeroes(&self) -> bool {
        // A punched hole in a regular file reads back as zeroes.
        !self.block_device
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write("write-zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let r = if self.block_device {
            self.blk_ioctl(true, offset, len)
        } else {
            self.fallocate(
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .or_else(|e| {
                if is_unsupported(&e) {
                    self.fallocate(
                        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    )
                } else {
                    Err(e)
                }
            })
        };
        match r {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => self.write_zero_buffers(offset, len),
            Err(e) => Err(io_err("write-zeroes", offset, len, e)),
        }
    }

    fn raw_fd(&self) -> Option<RawFd> {
        // O_DIRECT files keep to their aligned paths.
        (!self.direct).then_some(self.fd())
    }

    fn async_io(&self) -> Option<super::aio::AsyncIo> {
        Some(super::aio::AsyncIo::Fd(IoFd {
            fd: self.fd(),
            align: io_alignment(self.direct),
        }))
    }

    fn data_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        check_range("seek", offset, len, self.size)?;
        self.data_extents_impl(offset, len)
            .map_err(|e| io_err("seek", offset, len, e))
    }
}

impl FileDevice {
    fn data_extents_impl(&self, offset: u64, len: u64) -> io::Result<Option<Vec<(u64, u64)>>> {
        if self.block_device {
            return Ok(None);
        }
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = match self.lseek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                Ok(None) => break, // no data after pos
                Err(e) if is_unsupported(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            if data >= end {
                break;
            }
            let hole = match self.lseek(data, libc::SEEK_HOLE) {
                Ok(Some(h)) => h,
                Ok(None) => end,
                Err(e) if is_unsupported(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            out.push((data.max(offset), hole.min(end)));
            pos = hole;
        }
        Ok(Some(out))
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Reads as much as the file has into `buf` at `offset`; returns the count.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Copies `len` bytes at `offset` from one file to the same offset of another,
/// in the kernel.
pub(crate) fn copy_file_range_all(src: RawFd, dst: RawFd, offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut so = libc::loff_t::try_from(offset + done)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut d_o = so;
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both fds are open for the duration of the call; the offset pointers
        // point to live locals; copy_file_range does not touch our memory otherwise.
        let n = unsafe { libc::copy_file_range(src, &mut so, dst, &mut d_o, want, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        done += n as u64;
    }
    Ok(())
}

fn preadv(fd: RawFd, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let cnt = bufs.len().min(1024) as libc::c_int;
    loop {
        // SAFETY: IoSliceMut is ABI-compatible with `struct iovec` on unix; every entry
        // points to a live, writable buffer borrowed mutably for this call.
        let n = unsafe { libc::preadv(fd, bufs.as_mut_ptr() as *const libc::iovec, cnt, off) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn pwritev(fd: RawFd, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let cnt = bufs.len().min(1024) as libc::c_int;
    loop {
        // SAFETY: IoSlice is ABI-compatible with `struct iovec` on unix; every entry
        // points to a live buffer borrowed for this call; pwritev only reads them.
        let n = unsafe { libc::pwritev(fd, bufs.as_ptr() as *const libc::iovec, cnt, off) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(size: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev.img");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        (dir, p)
    }

    #[test]
    fn read_write_roundtrip_and_vectored() {
        let (_d, p) = tmpfile(1 << 20);
        let dev = FileDevice::open(&p, &OpenOptions::default()).unwrap();
        assert_eq!(dev.size(), 1 << 20);
        dev.write_at(&[7u8; 4096], 8192).unwrap();
        let mut a = [0u8; 1000];
        let mut b = [0u8; 3096];
        dev.read_vectored_at(
            &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)],
            8192,
        )
        .unwrap();
        assert!(a.iter().chain(b.iter()).all(|&x| x == 7));
        let x = [1u8; 512];
        let y = [2u8; 512];
        dev.write_vectored_at(&[IoSlice::new(&x), IoSlice::new(&y)], 0)
            .unwrap();
        let mut r = [0u8; 1024];
        dev.read_at(&mut r, 0).unwrap();
        assert_eq!(&r[..512], &x[..]);
        assert_eq!(&r[512..], &y[..]);
        dev.flush().unwrap();
    }

    #[test]
    fn out_of_range_and_read_only_are_refused() {
        let (_d, p) = tmpfile(4096);
        let dev = FileDevice::open(&p, &OpenOptions::default()).unwrap();
        assert!(matches!(
            dev.write_at(&[0u8; 512], 4096),
            Err(StorageError::OutOfRange { .. })
        ));
        assert!(matches!(
            dev.read_at(&mut [0u8; 512], u64::MAX - 10),
            Err(StorageError::OutOfRange { .. })
        ));
        let ro = FileDevice::open(
            &p,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(
            ro.write_at(&[0u8; 512], 0),
            Err(StorageError::ReadOnly { .. })
        ));
        assert!(matches!(
            ro.discard(0, 512),
            Err(StorageError::ReadOnly { .. })
        ));
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zero() {
        let (_d, p) = tmpfile(1 << 20);
        let dev = FileDevice::open(&p, &OpenOptions::default()).unwrap();
        dev.write_at(&[9u8; 65536], 0).unwrap();
        dev.discard(0, 4096).unwrap();
        dev.write_zeroes(8192, 8192).unwrap();
        let mut r = vec![0u8; 65536];
        dev.read_at(&mut r, 0).unwrap();
        assert!(r[..4096].iter().all(|&b| b == 0));
        assert!(r[4096..8192].iter().all(|&b| b == 9));
        assert!(r[8192..16384].iter().all(|&b| b == 0));
        assert!(r[16384..].iter().all(|&b| b == 9));
    }

    #[test]
    fn direct_io_bounces_unaligned_buffers() {
        // /dev/shm (tmpfs) refuses O_DIRECT; use the temp dir (a real file system in CI).
        let (_d, p) = tmpfile(1 << 20);
        let dev = match FileDevice::open(
            &p,
            &OpenOptions {
                direct: true,
                ..Default::default()
            },
        ) {
            Ok(d) => d,
            Err(_) => return, // file system without O_DIRECT support: nothing to test here
        };
        let mut data = vec![0u8; 4096 + 1];
        for (i, b) in data.iter_mut().enumerate() {
            *b = i as u8;
        }
        // Deliberately misaligned source buffer and a sub-block offset.
        dev.write_at(&data[1..513], 512).unwrap();
        let mut back = vec![0u8; 513];
        dev.read_at(&mut back[1..], 512).unwrap();
        assert_eq!(&back[1..], &data[1..513]);
        let mut whole = vec![0u8; 4096];
        dev.read_at(&mut whole, 0).unwrap();
        assert!(whole[..512].iter().all(|&b| b == 0));
        assert!(
            dev.read_at(&mut [0u8; 100], 0).is_err(),
            "O_DIRECT rejects partial sectors"
        );
    }

    #[test]
    fn data_extents_find_the_data_of_a_sparse_file() {
        let (_d, p) = tmpfile(16 << 20);
        let dev = FileDevice::open(&p, &OpenOptions::default()).unwrap();
        dev.write_at(&[1u8; 4096], 4 << 20).unwrap();
        dev.flush().unwrap();
        let Some(ext) = dev.data_extents(0, 16 << 20).unwrap() else {
            return; // file system without SEEK_DATA
        };
        assert_eq!(ext.len(), 1, "{ext:?}");
        let (a, b) = ext[0];
        assert!(a <= 4 << 20 && b >= (4 << 20) + 4096, "{ext:?}");
        assert_eq!(dev.data_extents(8 << 20, 1 << 20).unwrap(), Some(vec![]));
    }

    #[test]
    fn create_size_makes_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new.img");
        let dev = FileDevice::open(
            &p,
            &OpenOptions {
                create_size: Some(65536),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(dev.size(), 65536);
    }
}
