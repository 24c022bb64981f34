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
//! Layout: this file walks the chain and frames it (directions, memory, status
//! byte, header); `kinds.rs` has one parser per request type; `memory.rs` moves
//! bytes between guest memory and the parsers, and maps data buffers.
//!
//! The result is a [`ParsedChain`]: the head, where the status byte goes (if anywhere), and
//! either a [`BlkRequest`] or a [`RequestError`] that maps to `VIRTIO_BLK_S_IOERR` or
//! `VIRTIO_BLK_S_UNSUPP`. Data buffers stay as guest addresses until execution, when
//! [`guest_io_slices`] / [`guest_io_slices_mut`] turn them into `IoSlice`s over guest memory
//! with no copy.

use std::ops::Deref;

use smallvec::SmallVec;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::DeviceSpec;

mod kinds;
mod memory;

pub use kinds::{check_blocks, check_range};
use memory::{gather, skip, total_len};
pub use memory::{guest_io_slices, guest_io_slices_mut, guest_iovecs, scatter};

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

/// Guest memory as the front sees it, with the dirty-page log of live migration
/// ([`super::dirty`]) as its bitmap.
pub type GuestMemory = GuestMemoryMmap<super::dirty::DirtyLog>;

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
    #[error("Request header too short ({0} readable bytes)")]
    ShortHeader(u64),
    /// Request type not implemented (or not offered).
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
    /// Data descriptors with the wrong direction for the request type.
    #[error("Data descriptors with the wrong direction for request type {0}")]
    WrongDirection(u32),
    /// A read or write without data.
    #[error("Request type {0} without data")]
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

    let frame = Frame {
        req_type,
        sector,
        data_out,
        out_len,
        data_in: writable,
        in_len,
    };
    match req_type {
        VIRTIO_BLK_T_IN => kinds::read(frame, limits),
        VIRTIO_BLK_T_OUT => kinds::write(frame, limits),
        // Data buffers of a flush are ignored (Linux sends none), as is its sector field.
        VIRTIO_BLK_T_FLUSH => Ok(BlkRequest::Flush),
        VIRTIO_BLK_T_GET_ID => kinds::get_id(frame),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => kinds::discard(mem, frame, limits),
        other => Err(RequestError::Unsupported(other)),
    }
}

/// A chain's framing, once the header is read: what each request type's parser
/// ([`kinds`]) validates.
struct Frame {
    req_type: u32,
    sector: u64,
    /// Device-readable data after the header.
    data_out: Segments,
    out_len: u64,
    /// Device-writable data before the status byte.
    data_in: Segments,
    in_len: u64,
}

#[cfg(test)]
mod tests;
