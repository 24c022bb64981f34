// SPDX-License-Identifier: Apache-2.0

//! Feature negotiation and the virtio-blk configuration space.
//!
//! This module owns the numbers the guest sees before its first request: the virtio feature
//! bits offered, the vhost-user protocol features, and the byte layout of
//! `struct virtio_blk_config` (VIRTIO 1.2 §5.2.4). The layout is written field by field in
//! little-endian at fixed offsets rather than through a packed struct, so it is obvious what
//! every byte is and no unaligned references exist.
//!
//! Writeback (`wce`) is not stored here: it is read from the backend on every GET_CONFIG,
//! because the backend keeps the guest's choice across reconnects and restarts (QEMU does not
//! resend SET_CONFIG after a reconnect).

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use vm_memory::ByteValued;

use crate::storage::SECTOR_SIZE;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// log2 of [`SECTOR_SIZE`], the storage layer's sector, which is also the unit of
/// the virtio-blk protocol (independent of `blk_size`).
pub const SECTOR_SHIFT: u32 = SECTOR_SIZE.trailing_zeros();
/// Most queues [`crate::virtio::serve`] accepts.
pub const MAX_QUEUES: u16 = 64;
/// Most discard / write-zeroes segments one request may carry (`max_discard_seg`,
/// `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Most sectors one discard / write-zeroes segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Largest logical block size a backend may ask for (Linux accepts up to 64 KiB; kernels
/// before 6.15 only up to the page size, i.e. 4 KiB on x86).
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// Length of the serial returned by GET_ID.
pub const SERIAL_LEN: usize = 20;

/// Offset of `wce` (writeback) in `virtio_blk_config`.
pub const CONFIG_WCE_OFFSET: u32 = 32;
/// Bytes of `virtio_blk_config` this device fills (up to `write_zeroes_may_unmap` and its
/// padding; the secure-erase and zoned fields that follow stay zero).
pub const CONFIG_LEN: usize = 60;
/// Cloud-hypervisor before v51 asked for the config at this offset (the virtio-pci device
/// config offset) instead of 0; such reads are served as if the offset were 0.
pub const LEGACY_CONFIG_OFFSET: u32 = 0x100;

/// `virtio_blk_config` as plain bytes: vm-memory's [`ByteValued`] cannot be
/// implemented for virtio-bindings' type directly (both are foreign here).
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BlkConfig(virtio_blk_config);

// SAFETY: `virtio_blk_config` is `repr(C, packed)` of integers and byte arrays only:
// no padding, and every bit pattern is a valid value.
unsafe impl ByteValued for BlkConfig {}

// The fields this device fills end where CONFIG_LEN says, and `wce` sits at
// CONFIG_WCE_OFFSET (SET_CONFIG parses it by offset).
const _: () = {
    assert!(std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors) == CONFIG_LEN);
    assert!(std::mem::offset_of!(virtio_blk_config, wce) == CONFIG_WCE_OFFSET as usize);
};

/// What the device looks like to the guest, fixed for the life of one `serve` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Device size in bytes (multiple of 512).
    pub size: u64,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// Writes are refused.
    pub read_only: bool,
    /// Discard and write-zeroes are offered.
    pub discard: bool,
    /// Optimal I/O size in bytes.
    pub optimal_io_size: u32,
    /// Logical block size in bytes (a power of two, 512..=[`MAX_BLOCK_SIZE`]); above 512 it
    /// is advertised with VIRTIO_BLK_F_BLK_SIZE.
    pub block_size: u32,
}

impl DeviceSpec {
    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.size >> SECTOR_SHIFT
    }

    /// Most data segments per request: queue_size - 2 (header and status descriptors).
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// Optimal I/O size in sectors, 0 when unknown.
    pub fn opt_io_sectors(&self) -> u32 {
        self.optimal_io_size >> SECTOR_SHIFT
    }

    /// Logical block size in bytes, at least 512.
    pub fn logical_block_size(&self) -> u32 {
        self.block_size.max(SECTOR_SIZE as u32)
    }

    /// Logical block size in 512-byte sectors.
    pub fn block_sectors(&self) -> u32 {
        self.logical_block_size() >> SECTOR_SHIFT
    }

    /// Optimal I/O size in logical blocks (the unit of `opt_io_size`; Linux multiplies it
    /// by `blk_size`), 0 when unknown.
    pub fn opt_io_blocks(&self) -> u32 {
        self.optimal_io_size / self.logical_block_size()
    }

    /// Discard alignment in sectors: the optimal I/O size (the clone's region size) when it is
    /// a whole number of sectors, so guests send discards the engine can act on, else one
    /// logical block; never less than a logical block (smaller discards are refused).
    pub fn discard_alignment_sectors(&self) -> u32 {
        let s = self.opt_io_sectors();
        let align = if s == 0 || u64::from(self.optimal_io_size) % SECTOR_SIZE != 0 {
            1
        } else {
            s.min(MAX_DISCARD_SECTORS)
        };
        align.max(self.block_sectors())
    }

    /// Virtio feature bits offered to the frontend.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1u64 << VIRTIO_BLK_F_TOPOLOGY)
            | (1u64 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // Without BLK_SIZE, guests use 512-byte logical blocks.
        if self.logical_block_size() > SECTOR_SIZE as u32 {
            f |= 1u64 << VIRTIO_BLK_F_BLK_SIZE;
        }
        if self.read_only {
            f |= 1u64 << VIRTIO_BLK_F_RO;
        } else if self.discard {
            f |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The config space with the given writeback value: the `virtio_blk_config` of the
    /// kernel's headers (virtio-bindings), little-endian, up to [`CONFIG_LEN`].
    pub fn config_bytes(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let discard = !self.read_only && self.discard;
        let le32 = |on: bool, v: u32| if on { v.to_le() } else { 0 };
        let c = BlkConfig(virtio_blk_config {
            capacity: self.capacity_sectors().to_le(),
            // size_max (SIZE_MAX not offered), geometry (not offered),
            // physical_block_exp (physical block = blk_size) and alignment_offset
            // stay zero.
            seg_max: self.seg_max().to_le(),
            blk_size: self.logical_block_size().to_le(),
            min_io_size: 1u16.to_le(),
            opt_io_size: self.opt_io_blocks().to_le(),
            wce: u8::from(writeback),
            num_queues: self.num_queues.to_le(),
            max_discard_sectors: le32(discard, MAX_DISCARD_SECTORS),
            max_discard_seg: le32(discard, MAX_DISCARD_SEGMENTS),
            discard_sector_alignment: le32(discard, self.discard_alignment_sectors()),
            max_write_zeroes_sectors: le32(discard, MAX_DISCARD_SECTORS),
            max_write_zeroes_seg: le32(discard, MAX_DISCARD_SEGMENTS),
            write_zeroes_may_unmap: u8::from(discard),
            ..Default::default()
        });
        let mut out = [0u8; CONFIG_LEN];
        out.copy_from_slice(&c.as_slice()[..CONFIG_LEN]);
        out
    }

    /// GET_CONFIG: exactly `size` bytes of the config space starting at `offset`, zero padded.
    /// vhost 0.18 treats a reply of any other length as an error.
    pub fn read_config(&self, offset: u32, size: u32, writeback: bool) -> Vec<u8> {
        let offset = if offset >= LEGACY_CONFIG_OFFSET {
            offset - LEGACY_CONFIG_OFFSET
        } else {
            offset
        };
        let mut out = vec![0u8; size as usize];
        let cfg = self.config_bytes(writeback);
        let start = (offset as usize).min(CONFIG_LEN);
        let n = (CONFIG_LEN - start).min(out.len());
        out[..n].copy_from_slice(&cfg[start..start + n]);
        out
    }
}

/// SET_CONFIG: the only writable field is `wce`. Returns the guest's new writeback choice, or
/// `None` when the write does not cover `wce` (and is refused).
pub fn parse_set_config(offset: u32, buf: &[u8]) -> Option<bool> {
    let offset = if offset >= LEGACY_CONFIG_OFFSET {
        offset - LEGACY_CONFIG_OFFSET
    } else {
        offset
    };
    let idx = CONFIG_WCE_OFFSET.checked_sub(offset)? as usize;
    buf.get(idx).map(|b| *b != 0)
}

/// Protocol features offered: CONFIG, MQ, CONFIGURE_MEM_SLOTS (libblkio requires it),
/// LOG_SHMFD (with the `LOG_ALL` feature bit, live migration: see [`super::dirty`]) and
/// INFLIGHT_SHMFD (in-flight tracking across restarts: see [`super::inflight`]).
/// Not STATUS: vhost-user-backend 0.24 cannot serve it. REPLY_ACK is
/// added by the vhost crate.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DeviceSpec {
        DeviceSpec {
            size: 1 << 30,
            num_queues: 2,
            queue_size: 128,
            read_only: false,
            discard: true,
            optimal_io_size: 65536,
            block_size: 512,
        }
    }

    #[test]
    fn layout_matches_virtio_bindings() {
        use std::mem::offset_of;
        use virtio_bindings::virtio_blk::virtio_blk_config as C;
        assert_eq!(offset_of!(C, capacity), 0);
        assert_eq!(offset_of!(C, seg_max), 12);
        assert_eq!(offset_of!(C, blk_size), 20);
        assert_eq!(offset_of!(C, min_io_size), 26);
        assert_eq!(offset_of!(C, opt_io_size), 28);
        assert_eq!(offset_of!(C, wce), CONFIG_WCE_OFFSET as usize);
        assert_eq!(offset_of!(C, num_queues), 34);
        assert_eq!(offset_of!(C, max_discard_sectors), 36);
        assert_eq!(offset_of!(C, max_discard_seg), 40);
        assert_eq!(offset_of!(C, discard_sector_alignment), 44);
        assert_eq!(offset_of!(C, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(C, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(C, write_zeroes_may_unmap), 56);
        assert_eq!(offset_of!(C, max_secure_erase_sectors), CONFIG_LEN);
    }

    #[test]
    fn config_values() {
        let c = spec().config_bytes(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2097152);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 128);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 128);
    }

    /// The struct lays the fields out at the offsets of the virtio spec (5.2.4), as
    /// this device filled them byte by byte before, read-only and writable.
    #[test]
    fn config_space_matches_the_spec_offsets() {
        for g in [
            spec(),
            DeviceSpec {
                read_only: true,
                ..spec()
            },
        ] {
            let mut want = [0u8; CONFIG_LEN];
            let mut put = |off: usize, b: &[u8]| want[off..off + b.len()].copy_from_slice(b);
            put(0, &g.capacity_sectors().to_le_bytes());
            put(12, &g.seg_max().to_le_bytes());
            put(20, &g.logical_block_size().to_le_bytes());
            put(26, &1u16.to_le_bytes());
            put(28, &g.opt_io_blocks().to_le_bytes());
            put(32, &[0]);
            put(34, &g.num_queues.to_le_bytes());
            if !g.read_only {
                put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
                put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
                put(44, &g.discard_alignment_sectors().to_le_bytes());
                put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
                put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
                put(56, &[1]);
            }
            assert_eq!(g.config_bytes(false), want, "{g:?}");
        }
    }

    #[test]
    fn get_config_is_exactly_size() {
        let g = spec();
        assert_eq!(g.read_config(0, 57, true).len(), 57);
        assert_eq!(g.read_config(0, 96, true).len(), 96);
        assert_eq!(g.read_config(200, 4, true), vec![0; 4]);
        assert_eq!(g.read_config(0x100, 8, true), g.read_config(0, 8, true));
        assert_eq!(g.read_config(u32::MAX, 8, true).len(), 8);
    }

    #[test]
    fn set_config_only_wce() {
        assert_eq!(parse_set_config(32, &[0]), Some(false));
        assert_eq!(parse_set_config(32, &[1]), Some(true));
        assert_eq!(parse_set_config(0, &[0; 33]), Some(false));
        assert_eq!(parse_set_config(33, &[1]), None);
        assert_eq!(parse_set_config(0, &[1; 8]), None);
    }

    #[test]
    fn block_size_is_advertised_above_512() {
        let g = spec();
        assert_eq!(g.features() & (1 << VIRTIO_BLK_F_BLK_SIZE), 0);
        let c = g.config_bytes(true);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        let g = DeviceSpec {
            block_size: 4096,
            ..spec()
        };
        assert_ne!(g.features() & (1 << VIRTIO_BLK_F_BLK_SIZE), 0);
        let c = g.config_bytes(true);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        // opt_io_size in blocks, discard alignment in sectors.
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 16);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 128);
        let g = DeviceSpec {
            block_size: 4096,
            optimal_io_size: 0,
            ..spec()
        };
        assert_eq!(g.discard_alignment_sectors(), 8);
    }

    #[test]
    fn readonly_features() {
        let mut g = spec();
        g.read_only = true;
        let f = g.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }
}
