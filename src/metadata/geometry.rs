//! Region geometry: device size, region size and the arithmetic between them
//! (u64, checked at construction), within dm-clone's limits.
//!
//! Invariant: a [`Geometry`] that exists is valid: the device size is a positive
//! multiple of the sector size, the region size a power of two within
//! [`MIN_REGION_SIZE`]..=[`MAX_REGION_SIZE`], and there are at most
//! [`MAX_REGIONS`] regions; every region number below `nr_regions` maps to a
//! non-empty byte range inside the device.

use std::fmt;

use serde::Serialize;

use super::{MetadataError, Result};
use crate::storage::SECTOR_SIZE;

/// Smallest region size (8 sectors), as dm-clone.
pub const MIN_REGION_SIZE: u64 = 4096;
/// Largest region size (1 GiB), as dm-clone.
pub const MAX_REGION_SIZE: u64 = 1 << 30;
/// Largest number of regions, as dm-clone.
pub const MAX_REGIONS: u64 = 1 << 31;
/// Default region size.
pub const DEFAULT_REGION_SIZE: u64 = 64 * 1024;

/// Device and region sizes, and the arithmetic between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    device_size: u64,
    region_size: u64,
    nr_regions: u64,
}

impl Geometry {
    /// Validates and builds a geometry: `device_size` a positive multiple of 512,
    /// `region_size` a power of two in 4 KiB..=1 GiB, at most 2^31 regions.
    pub fn new(device_size: u64, region_size: u64) -> Result<Geometry> {
        if !region_size.is_power_of_two() {
            return Err(MetadataError::InvalidGeometry(format!(
                "region size {region_size} is not a power of two"
            )));
        }
        if !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size) {
            return Err(MetadataError::InvalidGeometry(format!(
                "region size {region_size} is outside {MIN_REGION_SIZE}..={MAX_REGION_SIZE} bytes"
            )));
        }
        if device_size == 0 || device_size % SECTOR_SIZE != 0 {
            return Err(MetadataError::InvalidGeometry(format!(
                "device size {device_size} is not a positive multiple of {SECTOR_SIZE} bytes"
            )));
        }
        let nr_regions = device_size.div_ceil(region_size);
        if nr_regions > MAX_REGIONS {
            return Err(MetadataError::InvalidGeometry(format!(
                "{nr_regions} regions is more than {MAX_REGIONS}; use a larger region size"
            )));
        }
        Ok(Geometry {
            device_size,
            region_size,
            nr_regions,
        })
    }

    /// Device size in bytes.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// Region size in bytes.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Number of regions (the last one may be short).
    pub fn nr_regions(&self) -> u64 {
        self.nr_regions
    }

    /// The region holding byte `offset` (`offset` < device size).
    pub fn region_of(&self, offset: u64) -> u64 {
        offset / self.region_size
    }

    /// First byte of region `r`.
    pub fn region_start(&self, r: u64) -> u64 {
        r * self.region_size
    }

    /// One past the last byte of region `r` (short for the last region).
    pub fn region_end(&self, r: u64) -> u64 {
        (r.saturating_add(1))
            .saturating_mul(self.region_size)
            .min(self.device_size)
    }

    /// Length of region `r` in bytes.
    pub fn region_len(&self, r: u64) -> u64 {
        self.region_end(r) - self.region_start(r)
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes in {} regions of {} bytes",
            self.device_size, self.nr_regions, self.region_size
        )
    }
}
