//! One parser per request type: what each type requires of a chain's framing
//! (directions, data present, ranges inside the device, whole logical blocks,
//! discard and write-zeroes segments), and the typed [`BlkRequest`] it gives.
//!
//! Invariant: a request returned here is inside the device and in whole logical
//! blocks; its data buffers are inside guest memory (checked by the framing).

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP};

use super::memory::gather;
use super::{
    BlkRequest, ByteRange, Frame, GuestMemory, GuestSegment, ParseLimits, RequestError,
    DISCARD_SEGMENT_LEN,
};
use crate::storage::SECTOR_SIZE;
use crate::virtio::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS};

/// VIRTIO_BLK_T_IN: device-writable data only.
pub(super) fn read(f: Frame, limits: &ParseLimits) -> Result<BlkRequest, RequestError> {
    if f.out_len != 0 {
        return Err(RequestError::WrongDirection(f.req_type));
    }
    if f.in_len == 0 {
        return Err(RequestError::NoData(f.req_type));
    }
    let offset = check_range(f.sector, f.in_len, limits.size)?;
    check_blocks(offset, f.in_len, limits.block_size)?;
    Ok(BlkRequest::Read {
        offset,
        len: f.in_len,
        data: f.data_in,
    })
}

/// VIRTIO_BLK_T_OUT: device-readable data only, on a writable device.
pub(super) fn write(f: Frame, limits: &ParseLimits) -> Result<BlkRequest, RequestError> {
    if f.in_len != 0 {
        return Err(RequestError::WrongDirection(f.req_type));
    }
    if limits.read_only {
        return Err(RequestError::ReadOnly);
    }
    if f.out_len == 0 {
        return Err(RequestError::NoData(f.req_type));
    }
    let offset = check_range(f.sector, f.out_len, limits.size)?;
    check_blocks(offset, f.out_len, limits.block_size)?;
    Ok(BlkRequest::Write {
        offset,
        len: f.out_len,
        data: f.data_out,
    })
}

/// VIRTIO_BLK_T_GET_ID: a device-writable buffer for the serial.
pub(super) fn get_id(f: Frame) -> Result<BlkRequest, RequestError> {
    if f.out_len != 0 || f.in_len == 0 {
        return Err(RequestError::WrongDirection(f.req_type));
    }
    Ok(BlkRequest::GetId { data: f.data_in })
}

/// VIRTIO_BLK_T_DISCARD and VIRTIO_BLK_T_WRITE_ZEROES: device-readable segments,
/// when the device offers them and is writable.
pub(super) fn discard(
    mem: &GuestMemory,
    f: Frame,
    limits: &ParseLimits,
) -> Result<BlkRequest, RequestError> {
    if !limits.discard {
        return Err(RequestError::Unsupported(f.req_type));
    }
    if f.in_len != 0 {
        return Err(RequestError::WrongDirection(f.req_type));
    }
    if limits.read_only {
        return Err(RequestError::ReadOnly);
    }
    let wz = f.req_type == VIRTIO_BLK_T_WRITE_ZEROES;
    let ranges = parse_segments(mem, &f.data_out, f.out_len, wz, limits)?;
    Ok(if wz {
        BlkRequest::WriteZeroes(ranges)
    } else {
        BlkRequest::Discard(ranges)
    })
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
