//! The on-disk layout: superblocks, bitmap blocks and journal blocks, their
//! encoding and their validation. See `docs/metadata-format.md`.
//!
//! Everything here is pure: bytes in, typed values (or a precise complaint) out.

use super::{Geometry, MetadataError, Result};

/// Size of every metadata block.
pub const BLOCK_SIZE: u64 = 4096;
/// Bytes of a superblock that carry data (one sector, so that it is written atomically).
pub const SUPERBLOCK_BYTES: usize = 512;
/// Magic at the start of a superblock.
pub const MAGIC: [u8; 8] = *b"vhclone\0";
/// Format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Header bytes of a bitmap or journal block.
pub const BLOCK_HEADER: usize = 32;
/// 64-bit words of bitmap payload per block.
pub const WORDS_PER_BLOCK: usize = (BLOCK_SIZE as usize - BLOCK_HEADER) / 8;
/// Regions covered by one bitmap block.
pub const BITS_PER_BLOCK: u64 = WORDS_PER_BLOCK as u64 * 64;
/// Block number of the first bitmap block.
pub const BITMAP_START: u64 = 2;

/// Superblock flag: every region is hydrated.
pub const FLAG_HYDRATED: u32 = 1 << 0;
/// Superblock flag: the guest chose a write-cache mode (stored in [`FLAG_WRITEBACK`]).
pub const FLAG_WCE_SET: u32 = 1 << 1;
/// Superblock flag: the guest's write-cache choice is write-back.
pub const FLAG_WRITEBACK: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = FLAG_HYDRATED | FLAG_WCE_SET | FLAG_WRITEBACK;

/// Kind tag of a bitmap block written in place.
pub const KIND_BITMAP: u32 = 0x424d_4150; // "BMAP"
/// Kind tag of a journal copy of a bitmap block.
pub const KIND_JOURNAL: u32 = 0x4a524e4c; // "JRNL"

/// Byte offsets of the superblock's fields inside its sector
/// (docs/metadata-format.md); public so that tests can damage single fields.
pub mod sb {
    /// `vhclone\0`.
    pub const MAGIC: usize = 0;
    /// Format version (u32).
    pub const VERSION: usize = 8;
    /// Flags (u32).
    pub const FLAGS: usize = 12;
    /// Clone uuid (16 bytes).
    pub const UUID: usize = 16;
    /// Commit sequence number (u64).
    pub const SEQ: usize = 32;
    /// Region size in bytes (u64).
    pub const REGION_SIZE: usize = 40;
    /// Device size in bytes (u64).
    pub const DEVICE_SIZE: usize = 48;
    /// Number of regions (u64).
    pub const NR_REGIONS: usize = 56;
    /// First bitmap block (u64).
    pub const BITMAP_START: usize = 64;
    /// Number of bitmap blocks (u64).
    pub const BITMAP_BLOCKS: usize = 72;
    /// First journal block (u64).
    pub const JOURNAL_START: usize = 80;
    /// Blocks in the current journal record (u64).
    pub const JOURNAL_COUNT: usize = 88;
    /// Hydrated regions (u64).
    pub const HYDRATED: usize = 96;
    /// Creation time (u64).
    pub const CREATED: usize = 104;
    /// Start of the reserved, zero bytes.
    pub const RESERVED: usize = 112;
    /// crc32c of bytes 0..508 (u32).
    pub const CRC: usize = 508;
}

/// Where things are in a metadata store of a given geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of bitmap blocks (also the size of each journal slot).
    pub bitmap_blocks: u64,
}

impl Layout {
    /// The layout for `geo`.
    pub fn new(geo: &Geometry) -> Layout {
        Layout {
            bitmap_blocks: geo.nr_regions().div_ceil(BITS_PER_BLOCK).max(1),
        }
    }

    /// First block of the journal area (two slots of `bitmap_blocks` each).
    pub fn journal_start(&self) -> u64 {
        BITMAP_START + self.bitmap_blocks
    }

    /// Byte offset of bitmap block `index` in place.
    pub fn bitmap_offset(&self, index: u64) -> u64 {
        (BITMAP_START + index) * BLOCK_SIZE
    }

    /// Byte offset of the `n`-th block of journal slot `slot`.
    pub fn journal_offset(&self, slot: u64, n: u64) -> u64 {
        (self.journal_start() + slot * self.bitmap_blocks + n) * BLOCK_SIZE
    }

    /// Bytes the metadata store needs.
    pub fn required_size(&self) -> u64 {
        (BITMAP_START + 3 * self.bitmap_blocks) * BLOCK_SIZE
    }
}

/// A decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Flags (`FLAG_*`).
    pub flags: u32,
    /// Identity of this clone; bitmap and journal blocks carry part of it.
    pub uuid: [u8; 16],
    /// Commit sequence number; the slot is `seq % 2`.
    pub seq: u64,
    /// Geometry of the device.
    pub geometry: Geometry,
    /// Number of journal blocks that belong to this commit.
    pub journal_count: u64,
    /// Number of hydrated regions in this state (checked against the bitmap).
    pub hydrated: u64,
    /// Creation time, seconds since the epoch (informational).
    pub created: u64,
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The first 8 bytes of a uuid, as stamped into every bitmap/journal block.
pub fn uuid_tag(uuid: &[u8; 16]) -> u64 {
    get_u64(uuid, 0)
}

impl Superblock {
    /// The guest's write-cache choice this superblock records (`None`: it never chose).
    pub fn write_cache(&self) -> Option<bool> {
        (self.flags & FLAG_WCE_SET != 0).then_some(self.flags & FLAG_WRITEBACK != 0)
    }

    /// Encodes into one sector.
    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        let layout = Layout::new(&self.geometry);
        b[sb::MAGIC..sb::MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut b, sb::VERSION, VERSION);
        put_u32(&mut b, sb::FLAGS, self.flags);
        b[sb::UUID..sb::UUID + 16].copy_from_slice(&self.uuid);
        put_u64(&mut b, sb::SEQ, self.seq);
        put_u64(&mut b, sb::REGION_SIZE, self.geometry.region_size());
        put_u64(&mut b, sb::DEVICE_SIZE, self.geometry.device_size());
        put_u64(&mut b, sb::NR_REGIONS, self.geometry.nr_regions());
        put_u64(&mut b, sb::BITMAP_START, BITMAP_START);
        put_u64(&mut b, sb::BITMAP_BLOCKS, layout.bitmap_blocks);
        put_u64(&mut b, sb::JOURNAL_START, layout.journal_start());
        put_u64(&mut b, sb::JOURNAL_COUNT, self.journal_count);
        put_u64(&mut b, sb::HYDRATED, self.hydrated);
        put_u64(&mut b, sb::CREATED, self.created);
        let crc = crc32c::crc32c(&b[..sb::CRC]);
        put_u32(&mut b, sb::CRC, crc);
        b
    }

    /// Decodes and validates one superblock slot. `Ok(None)` means the slot is
    /// all zeroes (never written).
    pub fn decode(slot: u64, b: &[u8]) -> Result<Option<Superblock>> {
        let bad = |reason: String| MetadataError::BadSuperblock { slot, reason };
        if b.len() < SUPERBLOCK_BYTES {
            return Err(bad("short read".into()));
        }
        let b = &b[..SUPERBLOCK_BYTES];
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if b[sb::MAGIC..sb::MAGIC + 8] != MAGIC {
            return Err(bad(format!(
                "bad magic {:02x?} (not a vhost-clone metadata store)",
                &b[sb::MAGIC..sb::MAGIC + 8]
            )));
        }
        let crc = get_u32(b, sb::CRC);
        let want = crc32c::crc32c(&b[..sb::CRC]);
        if crc != want {
            return Err(bad(format!(
                "checksum mismatch (stored {crc:#010x}, computed {want:#010x})"
            )));
        }
        let version = get_u32(b, sb::VERSION);
        if version != VERSION {
            return Err(bad(format!(
                "unsupported format version {version} (this build reads version {VERSION})"
            )));
        }
        let flags = get_u32(b, sb::FLAGS);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("unknown flags {:#x}", flags & !KNOWN_FLAGS)));
        }
        if b[sb::RESERVED..sb::CRC].iter().any(|&x| x != 0) {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let seq = get_u64(b, sb::SEQ);
        if seq % 2 != slot {
            return Err(bad(format!(
                "sequence number {seq} does not belong in slot {slot}"
            )));
        }
        let region_size = get_u64(b, sb::REGION_SIZE);
        let device_size = get_u64(b, sb::DEVICE_SIZE);
        let geometry = Geometry::new(device_size, region_size)
            .map_err(|e| bad(format!("invalid geometry: {e}")))?;
        let nr = get_u64(b, sb::NR_REGIONS);
        if nr != geometry.nr_regions() {
            return Err(bad(format!(
                "region count {nr} does not match device size {device_size} / region size {region_size} (expected {})",
                geometry.nr_regions()
            )));
        }
        let layout = Layout::new(&geometry);
        let checks = [
            ("bitmap start", get_u64(b, sb::BITMAP_START), BITMAP_START),
            (
                "bitmap block count",
                get_u64(b, sb::BITMAP_BLOCKS),
                layout.bitmap_blocks,
            ),
            (
                "journal start",
                get_u64(b, sb::JOURNAL_START),
                layout.journal_start(),
            ),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(bad(format!("{what} is {got}, expected {want}")));
            }
        }
        let journal_count = get_u64(b, sb::JOURNAL_COUNT);
        if journal_count > layout.bitmap_blocks {
            return Err(bad(format!(
                "journal count {journal_count} exceeds the {} bitmap blocks",
                layout.bitmap_blocks
            )));
        }
        let hydrated = get_u64(b, sb::HYDRATED);
        if hydrated > nr {
            return Err(bad(format!(
                "hydrated count {hydrated} exceeds region count {nr}"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[sb::UUID..sb::UUID + 16]);
        Ok(Some(Superblock {
            flags,
            uuid,
            seq,
            geometry,
            journal_count,
            hydrated,
            created: get_u64(b, sb::CREATED),
        }))
    }
}

/// A decoded bitmap or journal block.
#[derive(Debug, Clone)]
pub struct BitmapBlock {
    /// [`KIND_BITMAP`] or [`KIND_JOURNAL`].
    pub kind: u32,
    /// Logical bitmap block index.
    pub index: u64,
    /// Sequence number of the commit that wrote it.
    pub seq: u64,
    /// The payload words (region bits, LSB first).
    pub words: Vec<u64>,
}

/// Encodes a bitmap or journal block.
pub fn encode_block(kind: u32, index: u64, seq: u64, uuid: &[u8; 16], words: &[u64]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    put_u32(&mut b, 4, kind);
    put_u64(&mut b, 8, index);
    put_u64(&mut b, 16, seq);
    put_u64(&mut b, 24, uuid_tag(uuid));
    for (i, w) in words.iter().take(WORDS_PER_BLOCK).enumerate() {
        put_u64(&mut b, BLOCK_HEADER + i * 8, *w);
    }
    let crc = crc32c::crc32c(&b[4..]);
    put_u32(&mut b, 0, crc);
    b
}

/// Decodes a bitmap or journal block and checks its checksum, kind and uuid tag.
/// `what` names it in errors (e.g. "bitmap block 3").
pub fn decode_block(what: &str, b: &[u8], kind: u32, uuid: &[u8; 16]) -> Result<BitmapBlock> {
    let bad = |reason: String| MetadataError::BadBlock {
        what: what.to_string(),
        reason,
    };
    if b.len() != BLOCK_SIZE as usize {
        return Err(bad("short read".into()));
    }
    let crc = get_u32(b, 0);
    let want = crc32c::crc32c(&b[4..]);
    if crc != want {
        return Err(bad(format!(
            "checksum mismatch (stored {crc:#010x}, computed {want:#010x})"
        )));
    }
    let k = get_u32(b, 4);
    if k != kind {
        return Err(bad(format!(
            "wrong block kind {k:#010x} (expected {kind:#010x})"
        )));
    }
    if get_u64(b, 24) != uuid_tag(uuid) {
        return Err(bad("belongs to another clone (uuid tag mismatch)".into()));
    }
    let words = (0..WORDS_PER_BLOCK)
        .map(|i| get_u64(b, BLOCK_HEADER + i * 8))
        .collect();
    Ok(BitmapBlock {
        kind: k,
        index: get_u64(b, 8),
        seq: get_u64(b, 16),
        words,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            flags: FLAG_WCE_SET,
            uuid: [7; 16],
            seq: 5,
            geometry: Geometry::new(1 << 30, 65536).unwrap(),
            journal_count: 1,
            hydrated: 10,
            created: 1234,
        }
    }

    #[test]
    fn superblock_roundtrip() {
        let s = sb();
        let enc = s.encode();
        assert_eq!(Superblock::decode(1, &enc).unwrap(), Some(s));
        assert_eq!(Superblock::decode(0, &[0u8; 512]).unwrap(), None);
    }

    #[test]
    fn every_superblock_byte_is_protected() {
        let enc = sb().encode();
        for i in 0..SUPERBLOCK_BYTES {
            let mut b = enc;
            b[i] ^= 0x10;
            assert!(
                Superblock::decode(1, &b).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn wrong_slot_is_refused() {
        assert!(Superblock::decode(0, &sb().encode()).is_err());
    }

    #[test]
    fn block_roundtrip_and_corruption() {
        let uuid = [3u8; 16];
        let mut words = vec![0u64; WORDS_PER_BLOCK];
        words[0] = 0xdead_beef;
        words[WORDS_PER_BLOCK - 1] = 1;
        let enc = encode_block(KIND_BITMAP, 9, 4, &uuid, &words);
        let d = decode_block("b", &enc, KIND_BITMAP, &uuid).unwrap();
        assert_eq!((d.index, d.seq), (9, 4));
        assert_eq!(d.words, words);
        assert!(decode_block("b", &enc, KIND_JOURNAL, &uuid).is_err());
        assert!(decode_block("b", &enc, KIND_BITMAP, &[4u8; 16]).is_err());
        for i in [0usize, 5, 100, 4095] {
            let mut b = enc.clone();
            b[i] ^= 1;
            assert!(decode_block("b", &b, KIND_BITMAP, &uuid).is_err());
        }
    }

    #[test]
    fn layout_sizes() {
        let g = Geometry::new(1 << 40, 65536).unwrap();
        let l = Layout::new(&g);
        assert_eq!(l.bitmap_blocks, (16u64 << 20).div_ceil(BITS_PER_BLOCK));
        assert_eq!(l.required_size(), (2 + 3 * l.bitmap_blocks) * 4096);
    }
}
