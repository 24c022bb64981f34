//! Randomized inputs on stable Rust (issue 7), with proptest:
//!
//! * `metadata_loader_*`: the metadata loader on mutated valid stores (byte flips,
//!   truncation, superblock fields rewritten with a valid checksum, blocks swapped)
//!   and on random bytes. It must never panic: either a load whose result is
//!   self-consistent, or an error. A store that loads must also open and commit.
//! * `request_parser_random_chains`: the virtio-blk request parser
//!   (`virtio::request::parse_chain`) on random descriptor tables (loops, indirect
//!   tables, out-of-memory addresses, gaps between memory regions, random headers and
//!   discard payloads). No panic; every accepted request lies inside the device and
//!   inside guest memory.
//! * `engine_random_offsets_and_lengths`: the engine on random (offset, len)
//!   including huge, overflowing and unaligned values. Bad requests fail without
//!   touching anything; good ones agree with a model.
//!
//! Fast by default (a few hundred cases each). Long mode:
//! `VHOST_CLONE_FUZZ_CASES=N cargo test --release --test engine fuzz_inputs:: -- --nocapture`
//! runs N cases per target; each test prints how many inputs it tried.

use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};
use vhost_clone::engine::{Engine, EngineConfig, EngineError};
use vhost_clone::metadata::format::{Layout, BLOCK_SIZE};
use vhost_clone::metadata::{load, Geometry, Metadata};
use vhost_clone::storage::{BlockDevice, SimDevice};
use vhost_clone::virtio::request::{
    guest_io_slices, guest_io_slices_mut, parse_chain, BlkRequest, GuestMemory, ParseLimits,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn cases(default: u32) -> u32 {
    std::env::var("VHOST_CLONE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default: u32) -> Config {
    Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Runs `body` on `cases` values of `strategy` (deterministic seed), counts the
/// inputs it reports trying and prints the figure.
fn fuzz<S>(
    name: &str,
    default: u32,
    strategy: S,
    body: impl Fn(S::Value) -> Result<u64, TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let inputs = AtomicU64::new(0);
    let start = Instant::now();
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        config(default),
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let r = runner.run(&strategy, |v| {
        inputs.fetch_add(body(v)?, Ordering::Relaxed);
        Ok(())
    });
    eprintln!(
        "{name}: {} inputs in {:.1} s",
        inputs.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    if let Err(e) = r {
        panic!("{name}: {e}");
    }
}

// ---------------------------------------------------------------------------------
// Metadata loader

const MD_REGION: u64 = 4096;
const MD_SIZE: u64 = 40_000 * MD_REGION; // 2 bitmap blocks, short of a full second one

fn md_geo() -> Geometry {
    Geometry::new(MD_SIZE, MD_REGION).unwrap()
}

/// A store after format and three commits (journal records in both slots).
fn base_store() -> Vec<u8> {
    let geo = md_geo();
    let dev = Arc::new(SimDevice::new(Layout::new(&geo).required_size()));
    let md = Metadata::format(dev.clone(), geo).unwrap();
    let dst = SimDevice::new(4096);
    for batch in [&[0u64, 1, 2, 39_999][..], &[33_000], &[5, 32_511, 32_512]] {
        for &r in batch {
            md.set_hydrated(r).unwrap();
        }
        md.commit(&dst, true).unwrap();
    }
    dev.flush().unwrap();
    dev.durable_image()
}

fn base() -> &'static [u8] {
    static B: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    B.get_or_init(base_store)
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte.
    Flip(usize, u8),
    /// Write a little-endian u64 (e.g. into a superblock or block header field).
    Put(usize, u64),
    /// Cut the image.
    Truncate(usize),
    /// Copy one 4 KiB block over another.
    CopyBlock(usize, usize),
    /// Recompute the superblock checksum of a slot.
    FixSuperblockCrc(usize),
    /// Recompute the checksum of a 4 KiB block.
    FixBlockCrc(usize),
}

fn mutation(len: usize) -> impl Strategy<Value = Mutation> {
    let blocks = len / BLOCK_SIZE as usize;
    // Offsets biased to the interesting places: superblock fields, block headers.
    let field = prop_oneof![
        (0usize..2, 0usize..64).prop_map(|(s, f)| s * 4096 + f * 8),
        (0..blocks, 0usize..4).prop_map(|(b, f)| b * 4096 + f * 8),
        0..len,
    ];
    let value = prop_oneof![
        any::<u64>(),
        0u64..8,
        Just(u64::MAX),
        Just(MD_SIZE),
        Just(MD_REGION),
        Just(40_000),
        (0u64..64).prop_map(|s| 1u64 << s),
    ];
    prop_oneof![
        4 => (field.clone(), 1u8..=255).prop_map(|(o, x)| Mutation::Flip(o, x)),
        3 => (field, value).prop_map(|(o, v)| Mutation::Put(o, v)),
        1 => (0..len).prop_map(Mutation::Truncate),
        1 => (0..blocks, 0..blocks).prop_map(|(a, b)| Mutation::CopyBlock(a, b)),
        3 => (0usize..2).prop_map(Mutation::FixSuperblockCrc),
        2 => (2..blocks).prop_map(Mutation::FixBlockCrc),
    ]
}

fn apply(img: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::Flip(o, x) => {
            if o < img.len() {
                img[o] ^= x
            }
        }
        Mutation::Put(o, v) => {
            if o + 8 <= img.len() {
                img[o..o + 8].copy_from_slice(&v.to_le_bytes())
            }
        }
        Mutation::Truncate(n) => img.truncate(n),
        Mutation::CopyBlock(a, b) => {
            let (a, b) = (a * 4096, b * 4096);
            if a + 4096 <= img.len() && b + 4096 <= img.len() {
                let blk = img[a..a + 4096].to_vec();
                img[b..b + 4096].copy_from_slice(&blk);
            }
        }
        Mutation::FixSuperblockCrc(s) => {
            let o = s * 4096;
            if o + 512 <= img.len() {
                let c = crc32c::crc32c(&img[o..o + 508]);
                img[o + 508..o + 512].copy_from_slice(&c.to_le_bytes());
            }
        }
        Mutation::FixBlockCrc(b) => {
            let o = b * 4096;
            if o + 4096 <= img.len() {
                let c = crc32c::crc32c(&img[o + 4..o + 4096]);
                img[o..o + 4].copy_from_slice(&c.to_le_bytes());
            }
        }
    }
}

/// Loads `img` every way the daemon does; panics only on an inconsistent success.
fn try_load(img: Vec<u8>) -> bool {
    let geo = md_geo();
    let dev = Arc::new(SimDevice::from_image(img));
    let free = load(dev.as_ref(), None);
    let given = load(dev.as_ref(), Some(&geo));
    if let Ok(l) = &free {
        let g = l.superblock.geometry;
        assert_eq!(l.bits.len() as u64, g.nr_regions());
        assert_eq!(l.bits.count_ones() as u64, l.superblock.hydrated);
        assert!(l.superblock.journal_count <= Layout::new(&g).bitmap_blocks);
        let runs: u64 = l.hydrated_runs().iter().map(|r| r.1).sum();
        assert_eq!(runs, l.superblock.hydrated);
        if g == geo {
            assert!(
                given.is_ok(),
                "loads without a geometry but not with its own"
            );
        }
        // It opens, serves bits and commits.
        let md = Metadata::open(dev.clone(), None).expect("open after a good load");
        let _ = md.next_unhydrated(0);
        if let Some(r) = md.next_unhydrated(g.nr_regions() / 2) {
            md.set_hydrated(r).unwrap();
            md.commit(&SimDevice::new(512), true).unwrap();
            // The store loads again after that commit, with the new bit (blocks the
            // old journal record covered were rewritten in place at open).
            assert!(load(dev.as_ref(), None).unwrap().bits[r as usize]);
        }
    }
    free.is_ok()
}

#[test]
fn metadata_loader_on_mutated_stores() {
    let len = base().len();
    let strategy = proptest::collection::vec(mutation(len), 1..6);
    fuzz("metadata loader (mutated stores)", 1024, strategy, |muts| {
        let mut img = base().to_vec();
        for m in &muts {
            apply(&mut img, m);
        }
        try_load(img);
        Ok(1)
    });
}

#[test]
fn metadata_loader_on_random_bytes() {
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..20_000),
        any::<bool>(),
    );
    fuzz(
        "metadata loader (random bytes)",
        128,
        strategy,
        |(mut img, magic)| {
            if magic && img.len() >= 8 {
                img[..8].copy_from_slice(b"vhclone\0");
            }
            try_load(img);
            Ok(1)
        },
    );
}

#[test]
fn the_base_store_loads() {
    assert!(try_load(base().to_vec()));
}

// ---------------------------------------------------------------------------------
// Request parser

const MEM_A: u64 = 0x8_0000; // [0, 512 KiB)
const MEM_B: u64 = 0x10_0000; // [1 MiB, 1.5 MiB): a hole between the two
const DEV_SIZE: u64 = 1 << 20;

fn guest_mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_A as usize),
        (GuestAddress(MEM_B), MEM_A as usize),
    ])
    .unwrap()
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0x1_0000u64),                                // the header
        Just(0x2_0000u64),                                // discard / write-zeroes segments
        (0x3_0000u64..0x4_0000),                          // data
        (MEM_A - 0x1000..MEM_B + 0x1000),                 // across the hole
        (MEM_B + MEM_A - 0x1000..MEM_B + MEM_A + 0x1000), // past the end
        any::<u64>(),
    ]
}

fn desc_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(16u32),
        Just(1),
        Just(512),
        Just(0),
        0u32..0x3000,
        any::<u32>()
    ]
}

#[test]
fn request_parser_random_chains() {
    let strategy = (
        proptest::collection::vec((addr(), desc_len(), 0u16..8, 0u16..20), 1..20),
        prop_oneof![0u32..16, any::<u32>()],
        prop_oneof![
            Just(0u64),
            any::<u64>(),
            0u64..4096,
            (DEV_SIZE / 512 - 8)..(DEV_SIZE / 512 + 8)
        ],
        proptest::collection::vec((any::<u64>(), any::<u32>(), 0u32..4), 0..4),
        proptest::collection::vec(0u16..20, 1..4),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(512u64), Just(4096u64)],
    );
    fuzz(
        "request parser (chains)",
        1024,
        strategy,
        |(raw, head_type, sector, segs, heads, read_only, discard, block)| {
            let mut n = 0;
            let m = guest_mem();
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&head_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(0x1_0000)).unwrap();
            for (i, (sec, num, flags)) in segs.iter().enumerate() {
                let mut s = [0u8; 16];
                s[0..8].copy_from_slice(&(sec % (2 * DEV_SIZE / 512)).to_le_bytes());
                s[8..12].copy_from_slice(&(num % 4096).to_le_bytes());
                s[12..16].copy_from_slice(&flags.to_le_bytes());
                m.write_slice(&s, GuestAddress(0x2_0000 + 16 * i as u64))
                    .unwrap();
            }
            let vq = MockSplitQueue::new(&m, 16);
            let table = vq.desc_table();
            for (i, (a, len, flags, next)) in raw.iter().enumerate().take(16) {
                table
                    .store(
                        i as u16,
                        RawDescriptor::from(SplitDescriptor::new(*a, *len, *flags, *next)),
                    )
                    .unwrap();
            }
            for (i, hd) in heads.iter().enumerate() {
                vq.avail().ring().ref_at(i).unwrap().store(hd.to_le());
            }
            vq.avail().idx().store((heads.len() as u16).to_le());
            let mut q: Queue = vq.create_queue().unwrap();
            let limits = ParseLimits {
                size: DEV_SIZE,
                read_only,
                discard,
                max_descriptors: 1024,
                block_size: block,
            };
            while let Some(chain) = q.pop_descriptor_chain(&m) {
                let p = parse_chain(chain, &limits);
                n += 1;
                let Ok(req) = &p.request else { continue };
                prop_assert!(p.status.is_some());
                match req {
                    BlkRequest::Read { offset, len, data }
                    | BlkRequest::Write { offset, len, data } => {
                        prop_assert!(offset % block == 0 && len % block == 0);
                        prop_assert!(offset.checked_add(*len).is_some_and(|e| e <= DEV_SIZE));
                        prop_assert_eq!(data.iter().map(|s| u64::from(s.len)).sum::<u64>(), *len);
                        if matches!(req, BlkRequest::Write { .. }) {
                            prop_assert!(!read_only);
                            if let Ok(sl) = guest_io_slices(&m, data) {
                                prop_assert_eq!(
                                    sl.iter().map(|s| s.len() as u64).sum::<u64>(),
                                    *len
                                );
                            }
                        } else if let Ok(sl) = guest_io_slices_mut(&m, data) {
                            prop_assert_eq!(sl.iter().map(|s| s.len() as u64).sum::<u64>(), *len);
                        }
                    }
                    BlkRequest::GetId { data } => {
                        let _ = guest_io_slices_mut(&m, data);
                    }
                    BlkRequest::Discard(r) | BlkRequest::WriteZeroes(r) => {
                        prop_assert!(!read_only && discard);
                        for br in r {
                            prop_assert!(br.offset % block == 0 && br.len % block == 0);
                            prop_assert!(br
                                .offset
                                .checked_add(br.len)
                                .is_some_and(|e| e <= DEV_SIZE));
                        }
                    }
                    BlkRequest::Flush => {}
                }
            }
            Ok(n)
        },
    );
}

// ---------------------------------------------------------------------------------
// Engine

const E_REGION: u64 = 4096;
const E_SIZE: u64 = 6 * E_REGION + 1024; // a short last region

#[derive(Debug, Clone)]
enum Op {
    Read(u64, usize),
    Write(u64, usize, u8),
    Zeroes(u64, u64),
    Discard(u64, u64),
    Hydrate(u64),
    Flush,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..E_SIZE / 512).prop_map(|s| s * 512),
        0u64..E_SIZE + 4096,
        (E_SIZE - 2048)..(E_SIZE + 2048),
        any::<u64>(),
        (u64::MAX - 8192)..=u64::MAX,
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0u64..24).prop_map(|s| s * 512),
        0u64..E_SIZE + 4096,
        any::<u64>(),
        (u64::MAX - 8192)..=u64::MAX,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let buf = prop_oneof![(0usize..24).prop_map(|s| s * 512), 0usize..16384];
    prop_oneof![
        3 => (offset(), buf.clone()).prop_map(|(o, l)| Op::Read(o, l)),
        3 => (offset(), buf, any::<u8>()).prop_map(|(o, l, t)| Op::Write(o, l, t)),
        1 => (offset(), length()).prop_map(|(o, l)| Op::Zeroes(o, l)),
        1 => (offset(), length()).prop_map(|(o, l)| Op::Discard(o, l)),
        1 => prop_oneof![0u64..8, any::<u64>()].prop_map(Op::Hydrate),
        1 => Just(Op::Flush),
    ]
}

fn valid(o: u64, l: u64) -> bool {
    o % 512 == 0 && l % 512 == 0 && o.checked_add(l).is_some_and(|e| e <= E_SIZE)
}

/// Aborts the test binary when no engine operation completes for 30 s: a request
/// of a huge length that is not refused up front walks its regions "forever".
struct Watchdog {
    ops: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    fn start() -> Watchdog {
        let ops = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (o, st) = (ops.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut last, mut since) = (u64::MAX, Instant::now());
            while !st.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let now = o.load(Ordering::SeqCst);
                if now != last {
                    (last, since) = (now, Instant::now());
                } else if since.elapsed().as_secs() >= 30 {
                    eprintln!("engine operation {now} has run for 30 s: a range check is missing");
                    std::process::abort();
                }
            }
        });
        Watchdog { ops, stop }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn engine_random_offsets_and_lengths() {
    let dog = Watchdog::start();
    fuzz(
        "engine requests",
        256,
        proptest::collection::vec(op(), 1..16),
        |ops| {
            let geo = Geometry::new(E_SIZE, E_REGION).unwrap();
            let src_img: Vec<u8> = (0..E_SIZE).map(|i| (i / 512) as u8 ^ 0x5a).collect();
            let src = Arc::new(SimDevice::from_image(src_img.clone()).into_read_only());
            let dst = Arc::new(SimDevice::from_image(vec![0xee; E_SIZE as usize]));
            let mdd = Arc::new(SimDevice::new(Layout::new(&geo).required_size()));
            let md = Metadata::format(mdd, geo).unwrap();
            let e = Engine::new(
                Some(src),
                dst.clone(),
                Arc::new(md),
                EngineConfig::default(),
            )
            .unwrap();
            // The model: the guest-visible bytes; None where a discard made it unspecified.
            let mut model: Vec<Option<u8>> = src_img.iter().map(|&b| Some(b)).collect();
            for op in &ops {
                dog.ops.fetch_add(1, Ordering::SeqCst);
                let before = dst.current_image();
                let bits = e.metadata().hydrated_count();
                let (o, l, r) = match *op {
                    Op::Read(o, l) => {
                        let mut b = vec![0u8; l];
                        let r = e.read(o, &mut [IoSliceMut::new(&mut b)]);
                        if r.is_ok() {
                            for (i, &x) in b.iter().enumerate() {
                                if let Some(m) = model[o as usize + i] {
                                    prop_assert_eq!(
                                        x,
                                        m,
                                        "byte {} read back wrong",
                                        o as usize + i
                                    );
                                }
                            }
                        }
                        (o, l as u64, r)
                    }
                    Op::Write(o, l, tag) => {
                        let b = vec![tag; l];
                        let r = e.write(o, &[IoSlice::new(&b)]);
                        if r.is_ok() {
                            model[o as usize..o as usize + l].fill(Some(tag));
                        }
                        (o, l as u64, r)
                    }
                    Op::Zeroes(o, l) => {
                        let r = e.write_zeroes(o, l);
                        if r.is_ok() {
                            model[o as usize..(o + l) as usize].fill(Some(0));
                        }
                        (o, l, r)
                    }
                    Op::Discard(o, l) => {
                        let r = e.discard(o, l);
                        if r.is_ok() {
                            model[o as usize..(o + l) as usize].fill(None);
                        }
                        (o, l, r)
                    }
                    Op::Hydrate(reg) => {
                        let r = e.hydrate_region(reg).map(|_| ());
                        prop_assert_eq!(r.is_ok(), reg < geo.nr_regions());
                        continue;
                    }
                    Op::Flush => {
                        prop_assert!(e.flush().is_ok());
                        continue;
                    }
                };
                if valid(o, l) {
                    prop_assert!(r.is_ok(), "valid request {:?} failed: {:?}", op, r);
                } else {
                    prop_assert!(
                        matches!(r, Err(EngineError::BadRequest { .. })),
                        "{:?}: {:?}",
                        op,
                        r
                    );
                    prop_assert!(
                        dst.current_image() == before,
                        "a refused request changed the destination"
                    );
                    prop_assert_eq!(e.metadata().hydrated_count(), bits);
                }
            }
            prop_assert_eq!(e.regions_in_flight(), 0);
            prop_assert_eq!(e.ios_in_flight(), 0);
            prop_assert!(e.flush().is_ok());
            Ok(ops.len() as u64)
        },
    );
}
