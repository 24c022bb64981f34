//! The on-disk layout: superblocks, bitmap blocks and journal blocks, their
//! encoding and their validation. See `docs/metadata-format.md`.
//!
//! Everything here is pure: bytes in, typed values (or a precise complaint) out.
//!
//! Version 1 stores have the bitmap only. Version 2 stores add the table of
//! partly written regions ([`PartialSpec`]): its blocks follow the bitmap in
//! place, and the journal covers both, as one sequence of logical blocks
//! (bitmap blocks first, then table blocks).

use super::{Geometry, MetadataError, Result};

/// Size of every metadata block.
pub const BLOCK_SIZE: u64 = 4096;
/// Bytes of a superblock that carry data (one sector, so that it is written atomically).
pub const SUPERBLOCK_BYTES: usize = 512;
/// Magic at the start of a superblock.
pub const MAGIC: [u8; 8] = *b"vhclone\0";
/// Format version of a store without a table of partly written regions.
pub const VERSION_BITMAP: u32 = 1;
/// Format version of a store with one (written when [`PartialSpec::slots`] > 0).
pub const VERSION: u32 = 2;
/// Most table slots a store may have.
pub const MAX_PARTIAL_SLOTS: u64 = 1 << 20;
/// Default number of table slots (at most one per region).
pub const DEFAULT_PARTIAL_SLOTS: u64 = 65536;
/// Most sub-blocks per region: a region's written mask is one 64-bit word.
pub const MAX_SUB_BLOCKS: u64 = 64;
/// Smallest sub-block (one sector).
pub const MIN_SUB_BLOCK: u64 = 512;
/// Default sub-block: the smallest a 4 KiB-sector guest writes whole.
pub const DEFAULT_SUB_BLOCK: u64 = 4096;
/// Table entries per block: (region + 1, written mask), two words each.
pub const ENTRIES_PER_BLOCK: u64 = WORDS_PER_BLOCK as u64 / 2;
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
/// Kind tag of a journal copy of a bitmap or table block.
pub const KIND_JOURNAL: u32 = 0x4a524e4c; // "JRNL"
/// Kind tag of a table block written in place.
pub const KIND_TABLE: u32 = 0x5041_5254; // "PART"

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
    /// Version 2: slots of the table of partly written regions (u64).
    pub const PARTIAL_SLOTS: usize = 112;
    /// Version 2: sub-block size in bytes (u64).
    pub const SUB_BLOCK: usize = 120;
    /// Start of the reserved, zero bytes (version 1: 112).
    pub const RESERVED: usize = 128;
    /// crc32c of bytes 0..508 (u32).
    pub const CRC: usize = 508;
}

/// The table of partly written regions: how many regions may be partly written
/// at once (`slots`), and the unit of the written mask (`sub_block`). A region is
/// partly written when the guest wrote whole sub-blocks of it and the rest still
/// reads from the source; each slot records one such region and its mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PartialSpec {
    /// Table slots; 0: no table (version 1: every partial write copies its region).
    pub slots: u64,
    /// Sub-block size in bytes (the region size when there is no table).
    pub sub_block: u64,
}

impl PartialSpec {
    /// No table: version 1.
    pub fn none(geo: &Geometry) -> PartialSpec {
        PartialSpec {
            slots: 0,
            sub_block: geo.region_size(),
        }
    }

    /// What `format` uses: 4 KiB sub-blocks (larger for regions over 256 KiB, at
    /// most 64 per region), [`DEFAULT_PARTIAL_SLOTS`] slots or one per region;
    /// no table for regions of one sub-block.
    pub fn default_for(geo: &Geometry) -> PartialSpec {
        let sub = DEFAULT_SUB_BLOCK.max(geo.region_size() / MAX_SUB_BLOCKS);
        if sub >= geo.region_size() {
            return PartialSpec::none(geo);
        }
        PartialSpec {
            slots: DEFAULT_PARTIAL_SLOTS.min(geo.nr_regions()),
            sub_block: sub,
        }
    }

    /// Checks a spec against its geometry; the reason when it does not fit.
    pub fn validate(&self, geo: &Geometry) -> std::result::Result<(), String> {
        if self.slots == 0 {
            return if self.sub_block == geo.region_size() {
                Ok(())
            } else {
                Err(format!(
                    "sub-block size {} without a table (expected the region size)",
                    self.sub_block
                ))
            };
        }
        if self.slots > MAX_PARTIAL_SLOTS {
            return Err(format!(
                "{} table slots is more than {MAX_PARTIAL_SLOTS}",
                self.slots
            ));
        }
        let sub = self.sub_block;
        if !sub.is_power_of_two() || sub < MIN_SUB_BLOCK || sub >= geo.region_size() {
            return Err(format!(
                "sub-block size {sub} is not a power of two from {MIN_SUB_BLOCK} to half the region size"
            ));
        }
        if geo.region_size() / sub > MAX_SUB_BLOCKS {
            return Err(format!(
                "{} sub-blocks per region is more than {MAX_SUB_BLOCKS}",
                geo.region_size() / sub
            ));
        }
        Ok(())
    }

    /// Table blocks.
    pub fn table_blocks(&self) -> u64 {
        self.slots.div_ceil(ENTRIES_PER_BLOCK)
    }
}

/// Where things are in a metadata store of a given geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of bitmap blocks.
    pub bitmap_blocks: u64,
    /// Number of table blocks (0 in version 1); they follow the bitmap.
    pub table_blocks: u64,
}

impl Layout {
    /// The layout for `geo` with the default table ([`PartialSpec::default_for`]):
    /// what [`crate::metadata::Metadata::format`] writes.
    pub fn new(geo: &Geometry) -> Layout {
        Self::with(geo, &PartialSpec::default_for(geo))
    }

    /// The layout for `geo` and `spec`.
    pub fn with(geo: &Geometry, spec: &PartialSpec) -> Layout {
        Layout {
            bitmap_blocks: geo.nr_regions().div_ceil(BITS_PER_BLOCK).max(1),
            table_blocks: spec.table_blocks(),
        }
    }

    /// Logical blocks: the bitmap's, then the table's (also the size of each
    /// journal slot).
    pub fn logical_blocks(&self) -> u64 {
        self.bitmap_blocks + self.table_blocks
    }

    /// First block of the journal area (two slots of `logical_blocks` each).
    pub fn journal_start(&self) -> u64 {
        BITMAP_START + self.logical_blocks()
    }

    /// Byte offset of logical block `index` (bitmap, then table) in place.
    pub fn bitmap_offset(&self, index: u64) -> u64 {
        (BITMAP_START + index) * BLOCK_SIZE
    }

    /// Byte offset of the `n`-th block of journal slot `slot`.
    pub fn journal_offset(&self, slot: u64, n: u64) -> u64 {
        (self.journal_start() + slot * self.logical_blocks() + n) * BLOCK_SIZE
    }

    /// Bytes the metadata store needs.
    pub fn required_size(&self) -> u64 {
        (BITMAP_START + 3 * self.logical_blocks()) * BLOCK_SIZE
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
    /// The table of partly written regions (none in version 1).
    pub partial: PartialSpec,
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
    /// Where this store's blocks are.
    pub fn layout(&self) -> Layout {
        Layout::with(&self.geometry, &self.partial)
    }

    /// The guest's write-cache choice this superblock records (`None`: it never chose).
    pub fn write_cache(&self) -> Option<bool> {
        (self.flags & FLAG_WCE_SET != 0).then_some(self.flags & FLAG_WRITEBACK != 0)
    }

    /// Encodes into one sector.
    pub fn encode(&self) -> [u8; SUPERBLOCK_BYTES] {
        let mut b = [0u8; SUPERBLOCK_BYTES];
        let layout = self.layout();
        b[sb::MAGIC..sb::MAGIC + 8].copy_from_slice(&MAGIC);
        let v2 = self.partial.slots > 0;
        put_u32(
            &mut b,
            sb::VERSION,
            if v2 { VERSION } else { VERSION_BITMAP },
        );
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
        if v2 {
            put_u64(&mut b, sb::PARTIAL_SLOTS, self.partial.slots);
            put_u64(&mut b, sb::SUB_BLOCK, self.partial.sub_block);
        }
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
        if version != VERSION && version != VERSION_BITMAP {
            return Err(bad(format!(
                "unsupported format version {version} (this build reads versions {VERSION_BITMAP} and {VERSION})"
            )));
        }
        let v2 = version == VERSION;
        let flags = get_u32(b, sb::FLAGS);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(format!("unknown flags {:#x}", flags & !KNOWN_FLAGS)));
        }
        let reserved = if v2 { sb::RESERVED } else { sb::PARTIAL_SLOTS };
        if b[reserved..sb::CRC].iter().any(|&x| x != 0) {
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
        let partial = if v2 {
            let p = PartialSpec {
                slots: get_u64(b, sb::PARTIAL_SLOTS),
                sub_block: get_u64(b, sb::SUB_BLOCK),
            };
            if p.slots == 0 {
                return Err(bad("version 2 with no table slots".into()));
            }
            p.validate(&geometry)
                .map_err(|e| bad(format!("invalid table of partly written regions: {e}")))?;
            p
        } else {
            PartialSpec::none(&geometry)
        };
        let layout = Layout::with(&geometry, &partial);
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
        if journal_count > layout.logical_blocks() {
            return Err(bad(format!(
                "journal count {journal_count} exceeds the {} bitmap and table blocks",
                layout.logical_blocks()
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
            partial,
        }))
    }
}

/// A decoded bitmap, table or journal block.
#[derive(Debug, Clone)]
pub struct BitmapBlock {
    /// [`KIND_BITMAP`], [`KIND_TABLE`] or [`KIND_JOURNAL`].
    pub kind: u32,
    /// Logical block index (bitmap blocks, then table blocks).
    pub index: u64,
    /// Sequence number of the commit that wrote it.
    pub seq: u64,
    /// The payload words (region bits, LSB first; or table entries).
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
            partial: PartialSpec {
                slots: 300,
                sub_block: 4096,
            },
        }
    }

    #[test]
    fn superblock_roundtrip() {
        let s = sb();
        let enc = s.encode();
        assert_eq!(Superblock::decode(1, &enc).unwrap(), Some(s));
        assert_eq!(Superblock::decode(0, &[0u8; 512]).unwrap(), None);
        // Version 1: no table, and the table's fields are reserved.
        let mut v1 = sb();
        v1.partial = PartialSpec::none(&v1.geometry);
        let enc = v1.encode();
        assert_eq!(get_u32(&enc, sb::VERSION), VERSION_BITMAP);
        assert_eq!(Superblock::decode(1, &enc).unwrap(), Some(v1));
    }

    #[test]
    fn tables_that_do_not_fit_the_regions_are_refused() {
        let g = Geometry::new(1 << 30, 65536).unwrap();
        for (slots, sub) in [
            (1, 65536),
            (1, 1000),
            (1, 256),
            (MAX_PARTIAL_SLOTS + 1, 4096),
        ] {
            let mut s = sb();
            s.partial = PartialSpec {
                slots,
                sub_block: sub,
            };
            let e = Superblock::decode(1, &s.encode()).unwrap_err();
            assert!(e.to_string().contains("partly written"), "{e}");
        }
        let big = Geometry::new(1 << 30, 1 << 20).unwrap();
        assert_eq!(
            PartialSpec::default_for(&big),
            PartialSpec {
                slots: 1024,
                sub_block: 16384
            }
        );
        assert_eq!(PartialSpec::default_for(&g).slots, 16384);
        let small = Geometry::new(1 << 30, 4096).unwrap();
        assert_eq!(PartialSpec::default_for(&small), PartialSpec::none(&small));
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
        assert_eq!(l.table_blocks, DEFAULT_PARTIAL_SLOTS.div_ceil(254));
        assert_eq!(
            l.required_size(),
            (2 + 3 * (l.bitmap_blocks + l.table_blocks)) * 4096
        );
        let v1 = Layout::with(&g, &PartialSpec::none(&g));
        assert_eq!(v1.required_size(), (2 + 3 * v1.bitmap_blocks) * 4096);
    }
}
