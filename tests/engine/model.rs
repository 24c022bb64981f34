//! Model-based property test of the engine: random request sequences, run
//! against both the engine (over simulated devices) and a plain reference
//! model: a byte array for the disk and a set of hydrated regions. Every read
//! must match the model byte for byte, and the engine's bitmap must equal the
//! model's hydration set after every step. The source must never change.

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;

use crate::support::sectors::*;
use vhost_clone::metadata::Geometry;
use vhost_clone::storage::{BlockDevice, SimDevice};

const REGION: u64 = 4096;
const REGIONS: u64 = 12;
/// A short last region.
const SIZE: u64 = REGIONS * REGION + 1024;
const NR: u64 = REGIONS + 1;

#[derive(Debug, Clone)]
enum Op {
    Read { sector: u64, n: u64 },
    Write { sector: u64, n: u64, fill: u8 },
    Discard { sector: u64, n: u64 },
    WriteZeroes { sector: u64, n: u64 },
    Flush,
    Hydrate,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    let sectors = SIZE / 512;
    (0..sectors).prop_flat_map(move |s| (Just(s), 1..=(sectors - s).min(40)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => range().prop_map(|(sector, n)| Op::Read { sector, n }),
        4 => (range(), 1..=255u8).prop_map(|((sector, n), fill)| Op::Write { sector, n, fill }),
        1 => range().prop_map(|(sector, n)| Op::Discard { sector, n }),
        1 => range().prop_map(|(sector, n)| Op::WriteZeroes { sector, n }),
        1 => Just(Op::Flush),
        2 => Just(Op::Hydrate),
    ]
}

struct Model {
    disk: Vec<u8>,
    hydrated: BTreeSet<u64>,
}

impl Model {
    fn region_bounds(r: u64) -> (u64, u64) {
        (r * REGION, ((r + 1) * REGION).min(SIZE))
    }

    /// Regions touched by `[a, b)`, and whether each is wholly covered.
    fn regions(a: u64, b: u64) -> impl Iterator<Item = (u64, bool)> {
        (a / REGION..=(b - 1) / REGION).map(move |r| {
            let (rs, re) = Self::region_bounds(r);
            (r, a <= rs && re <= b)
        })
    }
}

fn source_image() -> Vec<u8> {
    (0..SIZE).map(|i| (i / 512) as u8 ^ 0x5a).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let geo = Geometry::new(SIZE, REGION).unwrap();
        let src = Arc::new(SimDevice::from_image(source_image()).into_read_only());
        let dst = Arc::new(SimDevice::from_image(vec![0xEE; SIZE as usize]));
        let md = Arc::new(SimDevice::from_image(formatted_metadata(&geo)));
        let eng = engine(src.clone(), dst, md, &geo).unwrap();
        let mut m = Model { disk: source_image(), hydrated: BTreeSet::new() };
        for op in ops {
            match op {
                Op::Read { sector, n } => {
                    let mut b = vec![0u8; (n * 512) as usize];
                    eng.read_at(&mut b, sector * 512).unwrap();
                    let a = (sector * 512) as usize;
                    prop_assert_eq!(&b[..], &m.disk[a..a + b.len()], "read {} +{}", sector, n);
                }
                Op::Write { sector, n, fill } => {
                    let (a, b) = (sector * 512, (sector + n) * 512);
                    eng.write_at(&vec![fill; (b - a) as usize], a).unwrap();
                    m.disk[a as usize..b as usize].fill(fill);
                    m.hydrated.extend(Model::regions(a, b).map(|(r, _)| r));
                }
                Op::WriteZeroes { sector, n } => {
                    let (a, b) = (sector * 512, (sector + n) * 512);
                    eng.write_zeroes(a, b - a).unwrap();
                    m.disk[a as usize..b as usize].fill(0);
                    m.hydrated.extend(Model::regions(a, b).map(|(r, _)| r));
                }
                Op::Discard { sector, n } => {
                    let (a, b) = (sector * 512, (sector + n) * 512);
                    // Hydrated ranges are passed down (zeroes); whole unhydrated
                    // regions are zeroed and marked; partial unhydrated ones untouched.
                    let mut marks = Vec::new();
                    for (r, whole) in Model::regions(a, b) {
                        let (rs, re) = Model::region_bounds(r);
                        let (x, y) = (rs.max(a), re.min(b));
                        if m.hydrated.contains(&r) || whole {
                            m.disk[x as usize..y as usize].fill(0);
                            marks.push(r);
                        }
                    }
                    m.hydrated.extend(marks);
                    eng.discard(a, b - a).unwrap();
                }
                Op::Flush => eng.flush().unwrap(),
                Op::Hydrate => {
                    if let Some(r) = eng.hydrate_next().unwrap() {
                        m.hydrated.insert(r);
                    } else {
                        prop_assert_eq!(m.hydrated.len() as u64, NR);
                    }
                }
            }
            let md = eng.metadata();
            for r in 0..NR {
                prop_assert_eq!(md.is_hydrated(r), m.hydrated.contains(&r), "region {}", r);
            }
        }
        // The whole disk, and the source untouched.
        let mut all = vec![0u8; SIZE as usize];
        eng.read_at(&mut all, 0).unwrap();
        prop_assert_eq!(&all, &m.disk);
        prop_assert_eq!(src.current_image(), source_image());
        prop_assert_eq!(src.write_count(), 0);
    }
}

#[test]
fn source_device_is_never_written() {
    let src = SimDevice::from_image(source_image()).into_read_only();
    assert!(src.write_at(&[0u8; 512], 0).is_err());
}
