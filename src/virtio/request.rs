// SPDX-License-Identifier: Apache-2.0

//! Turning one descriptor chain into a typed, validated block request.
//!
//! Everything here treats the chain as hostile input. The parser
//! - walks the chain once, bounding the number of descriptors, and detects the chains that
//!   virtio-queue silently truncates (loops, out-of-table `next`, unreadable or nested
//!   indirect tables, chains over 4 GiB): the last descriptor it yields still has `NEXT` set;
//! - requires device-readable descriptors before device-writable ones, and every descriptor
//!   inside guest memory;
//! - takes the status byte from the **last byte of the last device-writable descriptor**
//!   (the framing QEMU's own device uses; it accepts both a separate 1-byte status
//!   descriptor and a status byte sharing the data buffer);
//! - takes the 16-byte `virtio_blk_outhdr` from the first readable bytes (it may span
//!   descriptors);
//! - checks directions, 512-byte multiples, sector ranges (overflow-checked), whole
//!   logical blocks when the device's block size is larger than 512 (`ParseLimits::
//!   block_size`), discard and write-zeroes segments (count, size, flags) against the
//!   device.
//!
//! The result is a [`ParsedChain`]: the head, where the status byte goes (if anywhere), and
//! either a [`BlkRequest`] or a [`RequestError`] that maps to `VIRTIO_BLK_S_IOERR` or
//! `VIRTIO_BLK_S_UNSUPP`. Data buffers stay as guest addresses until execution, when
//! [`guest_io_slices`] / [`guest_io_slices_mut`] turn them into `IoSlice`s over guest memory
//! with no copy.

use std::io::{IoSlice, IoSliceMut};
use std::ops::Deref;

use smallvec::SmallVec;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::{DeviceSpec, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};
use crate::storage::SECTOR_SIZE;

/// Status byte: success.
pub const STATUS_OK: u8 = 0;
/// Status byte: I/O error (also used for malformed requests).
pub const STATUS_IOERR: u8 = 1;
/// Status byte: request type or flags not supported.
pub const STATUS_UNSUPP: u8 = 2;
const _: () = assert!(
    STATUS_OK as u32 == VIRTIO_BLK_S_OK
        && STATUS_IOERR as u32 == VIRTIO_BLK_S_IOERR
        && STATUS_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP
);

/// Guest memory as the front sees it (no dirty-page bitmap).
pub type GuestMemory = GuestMemoryMmap<()>;

/// Size of `virtio_blk_outhdr`.
pub const HEADER_LEN: usize = 16;
/// Size of one `virtio_blk_discard_write_zeroes` segment.
pub const DISCARD_SEGMENT_LEN: usize = 16;
/// Most descriptors a chain may have when the queue is small; larger queues allow
/// `queue_size` descriptors. Bounds the work and memory one (indirect) chain can cost.
pub const MIN_DESCRIPTOR_LIMIT: usize = 1024;

/// A piece of guest memory named by one descriptor (or part of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSegment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// The guest buffers of one request. Inline for up to 4 (the common case: Linux sends one
/// data descriptor per page run), so that parsing a request does not allocate.
pub type Segments = SmallVec<[GuestSegment; 4]>;

/// A validated byte range for discard or write-zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// Offset in bytes, a multiple of 512.
    pub offset: u64,
    /// Length in bytes, a multiple of 512, `offset + len <= size`.
    pub len: u64,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP was set (write-zeroes only).
    pub unmap: bool,
}

/// A validated block request. Offsets and lengths are in bytes, multiples of 512, inside the
/// device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlkRequest {
    /// VIRTIO_BLK_T_IN: read `len` bytes at `offset` into `data` (device-writable).
    Read {
        /// Byte offset.
        offset: u64,
        /// Total length of `data`.
        len: u64,
        /// Destination buffers in guest memory.
        data: Segments,
    },
    /// VIRTIO_BLK_T_OUT: write `data` (device-readable) at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Total length of `data`.
        len: u64,
        /// Source buffers in guest memory.
        data: Segments,
    },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the serial goes into `data` (device-writable, non-empty).
    GetId {
        /// Destination buffers in guest memory.
        data: Segments,
    },
    /// VIRTIO_BLK_T_DISCARD.
    Discard(Vec<ByteRange>),
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes(Vec<ByteRange>),
}

/// Why a chain was refused. [`RequestError::status`] gives the status byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain yielded no usable descriptor.
    #[error("Empty descriptor chain")]
    EmptyChain,
    /// virtio-queue stopped the walk early: a loop, a bad `next`, a bad indirect table, or a
    /// chain longer than 4 GiB.
    #[error("Malformed descriptor chain (truncated walk)")]
    Truncated,
    /// More descriptors than the device accepts in one chain.
    #[error("Descriptor chain longer than {0} descriptors")]
    TooManyDescriptors(usize),
    /// A device-readable descriptor follows a device-writable one.
    #[error("Device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// No device-writable byte for the status.
    #[error("No writable status byte")]
    NoStatus,
    /// A descriptor points outside guest memory.
    #[error("Descriptor {addr:#x}+{len} lies outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Fewer than 16 readable bytes for the request header.
    #[error("BlkRequest header too short ({0} readable bytes)")]
    ShortHeader(u64),
    /// BlkRequest type not implemented (or not offered).
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
    /// Data descriptors with the wrong direction for the request type.
    #[error("Data descriptors with the wrong direction for request type {0}")]
    WrongDirection(u32),
    /// A read or write without data.
    #[error("BlkRequest type {0} without data")]
    NoData(u32),
    /// Data length not a multiple of 512.
    #[error("Data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// Offset or length not a multiple of the device's logical block size.
    #[error("{len} bytes at offset {offset} are not whole {block}-byte logical blocks")]
    Misaligned {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The logical block size.
        block: u64,
    },
    /// Sector range outside the device or overflowing.
    #[error("Sector range {sector}+{bytes} bytes outside the device")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        bytes: u64,
    },
    /// A write-type request on a read-only device.
    #[error("Write request on a read-only device")]
    ReadOnly,
    /// Discard / write-zeroes payload malformed (length not a multiple of 16, zero or too
    /// many segments).
    #[error("Bad discard/write-zeroes payload of {0} bytes")]
    BadSegments(u64),
    /// A discard / write-zeroes segment larger than advertised.
    #[error("Discard/write-zeroes segment of {0} sectors exceeds the advertised maximum")]
    SegmentTooLarge(u32),
    /// Flags not allowed for this request type.
    #[error("Unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// Device-writable data buffers overlap in host memory.
    #[error("Overlapping device-writable buffers")]
    OverlappingBuffers,
    /// Reading the header or segments from guest memory failed.
    #[error("Guest memory access failed")]
    MemoryAccess,
}

impl RequestError {
    /// The status byte this error is reported with.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// The outcome of parsing one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedChain {
    /// Head descriptor index (what goes into the used ring).
    pub head: u16,
    /// Guest address of the status byte, when the chain has a valid writable byte for it.
    pub status: Option<GuestAddress>,
    /// The request, or why it is refused.
    pub request: Result<BlkRequest, RequestError>,
}

/// What the parser needs to know about the device.
#[derive(Debug, Clone, Copy)]
pub struct ParseLimits {
    /// Device size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// DISCARD and WRITE_ZEROES are offered.
    pub discard: bool,
    /// Most descriptors in one chain.
    pub max_descriptors: usize,
    /// Logical block size in bytes (a power of two >= 512): offsets and lengths of reads,
    /// writes, discards and write-zeroes must be multiples of it.
    pub block_size: u64,
}

impl From<&DeviceSpec> for ParseLimits {
    fn from(g: &DeviceSpec) -> Self {
        ParseLimits {
            size: g.size,
            read_only: g.read_only,
            discard: g.discard && !g.read_only,
            max_descriptors: usize::from(g.queue_size).max(MIN_DESCRIPTOR_LIMIT),
            block_size: u64::from(g.block_size),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write: bool,
}

/// Parse and validate one chain. Never panics; every failure is a [`RequestError`].
pub fn parse_chain<M>(chain: DescriptorChain<M>, limits: &ParseLimits) -> ParsedChain
where
    M: Deref<Target = GuestMemory> + Clone,
{
    let head = chain.head_index();
    let mem: &GuestMemory = chain.memory();

    let mut descs: SmallVec<[Desc; 8]> = SmallVec::new();
    let mut seen = 0usize;
    let mut last_has_next = false;
    let mut too_many = false;
    for d in chain.clone() {
        if seen >= limits.max_descriptors {
            too_many = true;
            break;
        }
        seen += 1;
        last_has_next = d.has_next();
        // Zero-length descriptors carry nothing; skip them.
        if d.len() > 0 {
            descs.push(Desc {
                addr: d.addr(),
                len: d.len(),
                write: d.is_write_only(),
            });
        }
    }

    // The status byte: last byte of the last device-writable descriptor, if it is memory.
    let status = descs.iter().rev().find(|d| d.write).and_then(|d| {
        let a = d.addr.checked_add(u64::from(d.len) - 1)?;
        GuestMemoryBackend::check_range(mem, a, 1).then_some(a)
    });

    let request = if seen == 0 {
        Err(RequestError::EmptyChain)
    } else if too_many {
        Err(RequestError::TooManyDescriptors(limits.max_descriptors))
    } else if last_has_next {
        Err(RequestError::Truncated)
    } else if status.is_none() {
        Err(RequestError::NoStatus)
    } else {
        parse_descriptors(mem, &descs, limits)
    };
    ParsedChain {
        head,
        status,
        request,
    }
}

fn parse_descriptors(
    mem: &GuestMemory,
    descs: &[Desc],
    limits: &ParseLimits,
) -> Result<BlkRequest, RequestError> {
    // Readable before writable.
    if let Some(first_w) = descs.iter().position(|d| d.write) {
        if descs[first_w..].iter().any(|d| !d.write) {
            return Err(RequestError::ReadableAfterWritable);
        }
    }
    for d in descs {
        if !GuestMemoryBackend::check_range(mem, d.addr, d.len as usize) {
            return Err(RequestError::OutsideMemory {
                addr: d.addr.raw_value(),
                len: d.len,
            });
        }
    }

    let readable: Segments = descs
        .iter()
        .filter(|d| !d.write)
        .map(|d| GuestSegment {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    // Writable data: every writable byte but the status byte (the very last one).
    let mut writable: Segments = descs
        .iter()
        .filter(|d| d.write)
        .map(|d| GuestSegment {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    if let Some(last) = writable.last_mut() {
        last.len -= 1; // len > 0: zero-length descriptors were dropped.
        if last.len == 0 {
            writable.pop();
        }
    }

    let mut header = [0u8; HEADER_LEN];
    let readable_len = total_len(&readable);
    if readable_len < HEADER_LEN as u64 {
        return Err(RequestError::ShortHeader(readable_len));
    }
    gather(mem, &readable, &mut header)?;
    let data_out = skip(&readable, HEADER_LEN as u64);
    let out_len = readable_len - HEADER_LEN as u64;
    let in_len = total_len(&writable);

    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    match req_type {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection(req_type));
            }
            if in_len == 0 {
                return Err(RequestError::NoData(req_type));
            }
            let offset = check_range(sector, in_len, limits.size)?;
            check_blocks(offset, in_len, limits.block_size)?;
            Ok(BlkRequest::Read {
                offset,
                len: in_len,
                data: writable,
            })
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::WrongDirection(req_type));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            if out_len == 0 {
                return Err(RequestError::NoData(req_type));
            }
            let offset = check_range(sector, out_len, limits.size)?;
            check_blocks(offset, out_len, limits.block_size)?;
            Ok(BlkRequest::Write {
                offset,
                len: out_len,
                data: data_out,
            })
        }
        // Data buffers of a flush are ignored (Linux sends none), as is its sector field.
        VIRTIO_BLK_T_FLUSH => Ok(BlkRequest::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 || in_len == 0 {
                return Err(RequestError::WrongDirection(req_type));
            }
            Ok(BlkRequest::GetId { data: writable })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if !limits.discard {
                return Err(RequestError::Unsupported(req_type));
            }
            if in_len != 0 {
                return Err(RequestError::WrongDirection(req_type));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let wz = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
            let ranges = parse_segments(mem, &data_out, out_len, wz, limits)?;
            Ok(if wz {
                BlkRequest::WriteZeroes(ranges)
            } else {
                BlkRequest::Discard(ranges)
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

fn parse_segments(
    mem: &GuestMemory,
    data: &[GuestSegment],
    len: u64,
    write_zeroes: bool,
    limits: &ParseLimits,
) -> Result<Vec<ByteRange>, RequestError> {
    let max = u64::from(MAX_DISCARD_SEGMENTS) * DISCARD_SEGMENT_LEN as u64;
    if len == 0 || len > max || len % DISCARD_SEGMENT_LEN as u64 != 0 {
        return Err(RequestError::BadSegments(len));
    }
    // len <= 512 here, so the buffer is small.
    let mut raw = vec![0u8; usize::try_from(len).map_err(|_| RequestError::BadSegments(len))?];
    gather(mem, data, &mut raw)?;
    let mut ranges = Vec::with_capacity(raw.len() / DISCARD_SEGMENT_LEN);
    for seg in raw.chunks_exact(DISCARD_SEGMENT_LEN) {
        let mut s = [0u8; 8];
        s.copy_from_slice(&seg[0..8]);
        let sector = u64::from_le_bytes(s);
        let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        let allowed = if write_zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        if num_sectors > MAX_DISCARD_SECTORS {
            return Err(RequestError::SegmentTooLarge(num_sectors));
        }
        let bytes = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = check_range(sector, bytes, limits.size)?;
        if bytes == 0 {
            continue;
        }
        check_blocks(offset, bytes, limits.block_size)?;
        ranges.push(ByteRange {
            offset,
            len: bytes,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(ranges)
}

/// Check `sector` and `bytes` against the device and return the byte offset.
pub fn check_range(sector: u64, bytes: u64, size: u64) -> Result<u64, RequestError> {
    if bytes % SECTOR_SIZE != 0 {
        return Err(RequestError::Unaligned(bytes));
    }
    let out = RequestError::OutOfRange { sector, bytes };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(out.clone())?;
    let end = offset.checked_add(bytes).ok_or(out.clone())?;
    if end > size {
        return Err(out);
    }
    Ok(offset)
}

/// Check that `[offset, offset + len)` is made of whole logical blocks of `block` bytes
/// (512 always passes after [`check_range`]; 0 and 1 check nothing).
pub fn check_blocks(offset: u64, len: u64, block: u64) -> Result<(), RequestError> {
    if block > 1 && (offset % block != 0 || len % block != 0) {
        return Err(RequestError::Misaligned { offset, len, block });
    }
    Ok(())
}

fn total_len(segs: &[GuestSegment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// The segments after the first `n` bytes.
fn skip(segs: &[GuestSegment], mut n: u64) -> Segments {
    let mut out = Segments::new();
    for s in segs {
        let len = u64::from(s.len);
        if n >= len {
            n -= len;
            continue;
        }
        // n < len <= u32::MAX; the address was checked to be in memory with its length.
        let cut = u32::try_from(n).unwrap_or(s.len);
        out.push(GuestSegment {
            addr: s.addr.unchecked_add(u64::from(cut)),
            len: s.len - cut,
        });
        n = 0;
    }
    out
}

/// Copy the first `out.len()` bytes of `segs` out of guest memory (small metadata only).
fn gather(mem: &GuestMemory, segs: &[GuestSegment], out: &mut [u8]) -> Result<(), RequestError> {
    let mut pos = 0usize;
    for s in segs {
        if pos == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - pos);
        mem.read_slice(&mut out[pos..pos + n], s.addr)
            .map_err(|_| RequestError::MemoryAccess)?;
        pos += n;
    }
    if pos == out.len() {
        Ok(())
    } else {
        Err(RequestError::MemoryAccess)
    }
}

/// Copy `src` into the device-writable `segs` (GET_ID). Returns the bytes written.
pub fn scatter(mem: &GuestMemory, segs: &[GuestSegment], src: &[u8]) -> Result<u32, RequestError> {
    let mut pos = 0usize;
    for s in segs {
        if pos == src.len() {
            break;
        }
        let n = (s.len as usize).min(src.len() - pos);
        mem.write_slice(&src[pos..pos + n], s.addr)
            .map_err(|_| RequestError::MemoryAccess)?;
        pos += n;
    }
    u32::try_from(pos).map_err(|_| RequestError::MemoryAccess)
}

/// `IoSlice`s over the guest buffers of a write, without copying.
pub fn guest_io_slices<'m>(
    mem: &'m GuestMemory,
    segs: &[GuestSegment],
) -> Result<SmallVec<[IoSlice<'m>; 4]>, RequestError> {
    let mut out = SmallVec::new();
    for seg in segs {
        let mut covered = 0usize;
        for vs in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let vs = vs.map_err(|_| outside(seg))?;
            let guard = vs.ptr_guard();
            // SAFETY: `guard` points at `guard.len()` bytes of a guest memory region that
            // vm-memory mapped and checked to lie inside the region (get_slices). The
            // mapping lives as long as the `GuestMemoryMmap` borrowed for 'm (the caller
            // holds a load guard of the atomic memory for the whole request), and with the
            // mmap backend (no xen feature) the guard holds no mapping of its own, so
            // dropping it does not unmap anything. The bytes may be changed by the guest
            // at any time; they are only handed to the backend as raw data to copy or
            // write, never interpreted by Rust code.
            let s = unsafe { std::slice::from_raw_parts(guard.as_ptr(), guard.len()) };
            covered += s.len();
            out.push(IoSlice::new(s));
        }
        if covered != seg.len as usize {
            return Err(outside(seg));
        }
    }
    Ok(out)
}

/// `IoSliceMut`s over the guest buffers of a read, without copying. Refuses buffers that
/// overlap each other, so no two mutable slices alias.
pub fn guest_io_slices_mut<'m>(
    mem: &'m GuestMemory,
    segs: &[GuestSegment],
) -> Result<SmallVec<[IoSliceMut<'m>; 4]>, RequestError> {
    let mut out = SmallVec::new();
    let mut spans: SmallVec<[(usize, usize); 4]> = SmallVec::new();
    for seg in segs {
        let mut covered = 0usize;
        for vs in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let vs = vs.map_err(|_| outside(seg))?;
            let guard = vs.ptr_guard_mut();
            spans.push((guard.as_ptr() as usize, guard.len()));
            // SAFETY: as in `guest_io_slices`: the pointer and length come from vm-memory's
            // bounds-checked slice of a mapping that outlives 'm. The mapping is writable
            // (guest RAM is mapped read-write). Overlaps between the slices of this request
            // are refused below before any slice is used, so the mutable slices handed out
            // do not alias each other. The guest may access the same bytes concurrently;
            // the backend only stores raw bytes into them.
            let s = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), guard.len()) };
            covered += s.len();
            out.push(IoSliceMut::new(s));
        }
        if covered != seg.len as usize {
            return Err(outside(seg));
        }
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        // start + len cannot overflow: it is the end of a live mapping.
        if w[0].0 + w[0].1 > w[1].0 {
            return Err(RequestError::OverlappingBuffers);
        }
    }
    Ok(out)
}

/// Appends `iovec`s over the guest buffers `segs` to `out` (for the io_uring path, which
/// hands raw addresses to the kernel). Fails like [`guest_io_slices`], and with
/// [`RequestError::TooManyDescriptors`] when more than `max` iovecs would be needed.
///
/// No Rust reference to guest memory is formed, so buffers that overlap each other are
/// harmless here: the kernel stores the data in the order of the list.
pub fn guest_iovecs(
    mem: &GuestMemory,
    segs: &[GuestSegment],
    out: &mut Vec<libc::iovec>,
    max: usize,
) -> Result<(), RequestError> {
    for seg in segs {
        let mut covered = 0usize;
        for vs in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            let vs = vs.map_err(|_| outside(seg))?;
            if out.len() >= max {
                return Err(RequestError::TooManyDescriptors(max));
            }
            // The pointer is only passed on, never dereferenced here: see the caller's
            // SAFETY comment on how long the mapping lives.
            let guard = vs.ptr_guard_mut();
            covered += guard.len();
            out.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: guard.len(),
            });
        }
        if covered != seg.len as usize {
            return Err(outside(seg));
        }
    }
    Ok(())
}

fn outside(seg: &GuestSegment) -> RequestError {
    RequestError::OutsideMemory {
        addr: seg.addr.raw_value(),
        len: seg.len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};

    const MEM: u64 = 0x100_0000;
    const SIZE: u64 = 1 << 20;

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn limits() -> ParseLimits {
        ParseLimits {
            size: SIZE,
            read_only: false,
            discard: true,
            max_descriptors: MIN_DESCRIPTOR_LIMIT,
            block_size: 512,
        }
    }

    fn hdr(m: &GuestMemory, addr: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    fn d(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Parse a single chain made of `descs` (linked in order by the mock).
    fn parse(m: &GuestMemory, descs: &[RawDescriptor], l: &ParseLimits) -> ParsedChain {
        let vq = MockSplitQueue::new(m, 256);
        vq.build_desc_chain(descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(m).unwrap().next().unwrap();
        parse_chain(chain, l)
    }

    #[test]
    fn read_ok() {
        let m = mem();
        hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 2);
        let p = parse(
            &m,
            &[
                d(0x10000, 16, false),
                d(0x20000, 1024, true),
                d(0x30000, 1, true),
            ],
            &limits(),
        );
        assert_eq!(p.status, Some(GuestAddress(0x30000)));
        assert_eq!(
            p.request,
            Ok(BlkRequest::Read {
                offset: 1024,
                len: 1024,
                data: smallvec::smallvec![GuestSegment {
                    addr: GuestAddress(0x20000),
                    len: 1024
                }]
            })
        );
    }

    #[test]
    fn status_shares_data_descriptor_and_header_spans_two() {
        let m = mem();
        hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let p = parse(
            &m,
            &[
                d(0x10000, 8, false),
                d(0x10008, 8, false),
                d(0x20000, 513, true),
            ],
            &limits(),
        );
        assert_eq!(p.status, Some(GuestAddress(0x20200)));
        assert!(matches!(p.request, Ok(BlkRequest::Read { len: 512, .. })));
    }

    #[test]
    fn write_on_readonly_and_wrong_direction() {
        let m = mem();
        hdr(&m, 0x10000, VIRTIO_BLK_T_OUT, 0);
        let mut l = limits();
        l.read_only = true;
        let c = [
            d(0x10000, 16, false),
            d(0x20000, 512, false),
            d(0x30000, 1, true),
        ];
        assert_eq!(parse(&m, &c, &l).request, Err(RequestError::ReadOnly));
        let c = [
            d(0x10000, 16, false),
            d(0x20000, 512, true),
            d(0x30000, 1, true),
        ];
        assert_eq!(
            parse(&m, &c, &limits()).request,
            Err(RequestError::WrongDirection(VIRTIO_BLK_T_OUT))
        );
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(check_range(0, 512, 512), Ok(0));
        assert!(check_range(1, 512, 512).is_err());
        assert!(check_range(u64::MAX / 512, 1024, u64::MAX).is_err());
        assert!(check_range(u64::MAX, 0, u64::MAX).is_err());
        assert_eq!(check_range(0, 100, 512), Err(RequestError::Unaligned(100)));
    }

    #[test]
    fn no_status_and_readonly_status() {
        let m = mem();
        hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let p = parse(
            &m,
            &[d(0x10000, 16, false), d(0x20000, 512, false)],
            &limits(),
        );
        assert_eq!(p.status, None);
        assert_eq!(p.request, Err(RequestError::NoStatus));
    }

    #[test]
    fn status_outside_memory() {
        let m = mem();
        hdr(&m, 0x10000, VIRTIO_BLK_T_FLUSH, 0);
        let p = parse(&m, &[d(0x10000, 16, false), d(MEM, 1, true)], &limits());
        assert_eq!(p.status, None);
        let p = parse(
            &m,
            &[
                d(0x10000, 16, false),
                d(MEM - 512, 1024, true),
                d(0x30000, 1, true),
            ],
            &limits(),
        );
        assert_eq!(p.status, Some(GuestAddress(0x30000)));
        assert!(matches!(p.request, Err(RequestError::OutsideMemory { .. })));
    }

    #[test]
    fn discard_segments() {
        let m = mem();
        hdr(&m, 0x10000, VIRTIO_BLK_T_DISCARD, 0);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(0x20000)).unwrap();
        let c = [
            d(0x10000, 16, false),
            d(0x20000, 16, false),
            d(0x30000, 1, true),
        ];
        assert_eq!(
            parse(&m, &c, &limits()).request,
            Ok(BlkRequest::Discard(vec![ByteRange {
                offset: 4096,
                len: 4096,
                unmap: false
            }]))
        );
        // unmap flag on discard: UNSUPP
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(0x20000)).unwrap();
        let p = parse(&m, &c, &limits());
        assert_eq!(p.request, Err(RequestError::UnsupportedFlags(1)));
        assert_eq!(p.request.unwrap_err().status(), STATUS_UNSUPP);
        // too many segments
        let c = [
            d(0x10000, 16, false),
            d(0x20000, 16 * (MAX_DISCARD_SEGMENTS + 1), false),
            d(0x30000, 1, true),
        ];
        assert!(matches!(
            parse(&m, &c, &limits()).request,
            Err(RequestError::BadSegments(_))
        ));
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let m = mem();
        hdr(&m, 0x10000, 0x77, 0);
        let p = parse(&m, &[d(0x10000, 16, false), d(0x30000, 1, true)], &limits());
        assert_eq!(p.request.unwrap_err().status(), STATUS_UNSUPP);
    }

    #[test]
    fn loop_is_truncated() {
        let m = mem();
        hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&m, 16);
        // Two descriptors pointing at each other.
        let t = vq.desc_table();
        let next = VRING_DESC_F_NEXT as u16;
        t.store(
            0,
            RawDescriptor::from(SplitDescriptor::new(0x10000, 16, next, 1)),
        )
        .unwrap();
        t.store(
            1,
            RawDescriptor::from(SplitDescriptor::new(
                0x20000,
                512,
                next | VRING_DESC_F_WRITE as u16,
                0,
            )),
        )
        .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        vq.avail().idx().store(1u16.to_le());
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&m).unwrap().next().unwrap();
        let p = parse_chain(chain, &limits());
        assert_eq!(p.request, Err(RequestError::Truncated));
        // The status still has somewhere to go: the guest gets IOERR.
        assert!(p.status.is_some());
    }

    #[test]
    fn indirect_outside_memory() {
        let m = mem();
        let c = [RawDescriptor::from(SplitDescriptor::new(
            MEM + 0x1000,
            64,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))];
        let p = parse(&m, &c, &limits());
        assert_eq!(p.status, None);
        assert_eq!(p.request, Err(RequestError::EmptyChain));
    }

    #[test]
    fn requests_not_in_whole_logical_blocks_are_refused() {
        let m = mem();
        let l4k = ParseLimits {
            block_size: 4096,
            ..limits()
        };
        let (h, buf, s) = (0x10000u64, 0x20000u64, 0x30000u64);
        let rw = |t: u32, sector: u64, len: u32| {
            hdr(&m, h, t, sector);
            let data = d(buf, len, t == VIRTIO_BLK_T_IN);
            parse(&m, &[d(h, 16, false), data, d(s, 1, true)], &l4k)
        };
        for t in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            // Whole blocks pass.
            assert!(rw(t, 8, 8192).request.is_ok(), "type {t}");
            // Sector-aligned but not block-aligned offset or length: IOERR.
            for (sector, len) in [(1, 4096), (8, 512), (4, 4096), (8, 4096 + 512)] {
                let p = rw(t, sector, len);
                assert_eq!(
                    p.request,
                    Err(RequestError::Misaligned {
                        offset: sector * 512,
                        len: u64::from(len),
                        block: 4096
                    }),
                    "type {t}, sector {sector}, {len} bytes"
                );
                assert_eq!(p.request.unwrap_err().status(), STATUS_IOERR);
            }
            // With 512-byte blocks the same requests are fine.
            hdr(&m, h, t, 1);
            let data = d(buf, 512, t == VIRTIO_BLK_T_IN);
            let p = parse(&m, &[d(h, 16, false), data, d(s, 1, true)], &limits());
            assert!(p.request.is_ok());
        }
        // Discard and write-zeroes segments.
        for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            hdr(&m, h, t, 0);
            let c = [d(h, 16, false), d(buf, 32, false), d(s, 1, true)];
            let seg = |i: u64, sector: u64, n: u32| {
                let mut b = [0u8; 16];
                b[0..8].copy_from_slice(&sector.to_le_bytes());
                b[8..12].copy_from_slice(&n.to_le_bytes());
                m.write_slice(&b, GuestAddress(buf + 16 * i)).unwrap();
            };
            seg(0, 8, 16);
            seg(1, 64, 8);
            assert!(parse(&m, &c, &l4k).request.is_ok(), "type {t}");
            seg(1, 65, 8);
            assert_eq!(
                parse(&m, &c, &l4k).request,
                Err(RequestError::Misaligned {
                    offset: 65 * 512,
                    len: 4096,
                    block: 4096
                })
            );
            seg(1, 64, 1);
            assert!(matches!(
                parse(&m, &c, &l4k).request,
                Err(RequestError::Misaligned { .. })
            ));
            assert!(parse(&m, &c, &limits()).request.is_ok());
        }
    }

    #[test]
    fn overlapping_read_buffers_refused() {
        let m = mem();
        hdr(&m, 0x10000, VIRTIO_BLK_T_IN, 0);
        let p = parse(
            &m,
            &[
                d(0x10000, 16, false),
                d(0x20000, 1024, true),
                d(0x20200, 512, true),
                d(0x30000, 1, true),
            ],
            &limits(),
        );
        let Ok(BlkRequest::Read { data, .. }) = p.request else {
            panic!("{:?}", p.request)
        };
        assert_eq!(
            guest_io_slices_mut(&m, &data).err(),
            Some(RequestError::OverlappingBuffers)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_chains_never_panic(
            raw in proptest::collection::vec(
                (0u64..(MEM + 0x2000), 0u32..0x3000, 0u16..8, 0u16..20), 1..24),
            head_type in 0u32..16,
            sector in prop_oneof![Just(0u64), any::<u64>(), 0u64..4096],
            avail_heads in proptest::collection::vec(0u16..20, 1..4),
        ) {
            let m = mem();
            hdr(&m, 0x10000, head_type, sector);
            let vq = MockSplitQueue::new(&m, 16);
            let t = vq.desc_table();
            for (i, (addr, len, flags, next)) in raw.iter().enumerate().take(16) {
                t.store(i as u16, RawDescriptor::from(SplitDescriptor::new(*addr, *len, *flags, *next)))
                    .unwrap();
            }
            for (i, h) in avail_heads.iter().enumerate() {
                vq.avail().ring().ref_at(i).unwrap().store(h.to_le());
            }
            vq.avail().idx().store((avail_heads.len() as u16).to_le());
            let mut q: Queue = vq.create_queue().unwrap();
            while let Some(chain) = q.pop_descriptor_chain(&m) {
                let p = parse_chain(chain, &limits());
                if let Ok(req) = &p.request {
                    match req {
                        BlkRequest::Read { data, .. } | BlkRequest::GetId { data } => {
                            let _ = guest_io_slices_mut(&m, data);
                        }
                        BlkRequest::Write { data, .. } => {
                            let _ = guest_io_slices(&m, data);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
