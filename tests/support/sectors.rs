//! Shared helpers of the integration tests: self-describing sector contents and
//! rigs of simulated devices.
#![allow(dead_code)]

use std::sync::Arc;

use vhost_clone::engine::{Engine, EngineConfig};
use vhost_clone::metadata::format::{Layout, PartialSpec};
use vhost_clone::metadata::{Geometry, Metadata};
use vhost_clone::storage::{BlockDevice, SimDevice};

/// Sector size.
pub const SECTOR: usize = 512;
/// Tag of the source's content.
pub const SOURCE: u64 = 1;
/// Tag of an all-zero sector.
pub const ZERO: u64 = 0;
/// Tag of the destination's initial content: must never be read back.
pub const GARBAGE: u64 = 0xdead_beef;

/// The content of `sector` written with `tag`: the tag, the sector number and a
/// stream derived from both, so that a torn, misplaced or stale sector is told apart.
pub fn sector_data(tag: u64, sector: u64) -> [u8; SECTOR] {
    let mut b = [0u8; SECTOR];
    if tag == ZERO {
        return b;
    }
    b[..8].copy_from_slice(&tag.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut x =
        tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) | 1;
    for chunk in b[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    b
}

/// The tag of a sector's content, or `None` if it is not what any tag writes there.
pub fn decode(b: &[u8], sector: u64) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return Some(ZERO);
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[..8]);
    let tag = u64::from_le_bytes(t);
    (sector_data(tag, sector)[..] == b[..]).then_some(tag)
}

/// An image whose every sector holds `tag`'s content.
pub fn image(tag: u64, sectors: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(sectors as usize * SECTOR);
    for s in 0..sectors {
        v.extend_from_slice(&sector_data(tag, s));
    }
    v
}

/// Data for a write of `n` sectors at `first` with `tag`.
pub fn write_data(tag: u64, first: u64, n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n as usize * SECTOR);
    for s in first..first + n {
        v.extend_from_slice(&sector_data(tag, s));
    }
    v
}

/// A formatted metadata image for `geo`.
pub fn formatted_metadata(geo: &Geometry) -> Vec<u8> {
    formatted_metadata_with(geo, PartialSpec::default_for(geo))
}

/// A formatted metadata image for `geo` with the table of partly written regions `spec`.
pub fn formatted_metadata_with(geo: &Geometry, spec: PartialSpec) -> Vec<u8> {
    let dev = Arc::new(SimDevice::new(Layout::with(geo, &spec).required_size()));
    Metadata::format_with(dev.clone(), *geo, spec).expect("format");
    dev.durable_image()
}

/// Builds an engine over the given devices.
pub fn engine(
    src: Arc<dyn BlockDevice>,
    dst: Arc<dyn BlockDevice>,
    md_dev: Arc<dyn BlockDevice>,
    geo: &Geometry,
) -> Result<Engine, String> {
    let md = Metadata::open(md_dev, Some(geo)).map_err(|e| e.to_string())?;
    Engine::new(Some(src), dst, Arc::new(md), EngineConfig::default()).map_err(|e| e.to_string())
}
