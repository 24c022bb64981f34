//! Background hydration: control, bounds, races with guest writes, sparse sources.

use std::io::IoSlice;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::support::poll_until;
use crate::support::sectors::*;
use vhost_clone::engine::hydrator::{HydrationControl, Hydrator, HydratorTiming};
use vhost_clone::engine::{Engine, EngineConfig, HydrateStep};
use vhost_clone::metadata::{Geometry, Metadata};
use vhost_clone::storage::{self, BlockDevice, FileDevice, OpenOptions, SimDevice};

/// A source that records the largest read and can be slowed down.
#[derive(Debug)]
struct Probe {
    inner: SimDevice,
    max_read: AtomicU64,
    delay: Duration,
}

impl BlockDevice for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> storage::Result<()> {
        self.max_read.fetch_max(buf.len() as u64, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> storage::Result<()> {
        Err(storage::StorageError::ReadOnly { op: "write" })
    }
    fn flush(&self) -> storage::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> storage::Result<()> {
        Err(storage::StorageError::ReadOnly { op: "discard" })
    }
    fn write_zeroes(&self, _: u64, _: u64) -> storage::Result<()> {
        Err(storage::StorageError::ReadOnly { op: "write-zeroes" })
    }
}

const RS: u64 = 4096;

fn probe_rig(regions: u64, delay: Duration) -> (Arc<Probe>, Arc<SimDevice>, Arc<Engine>) {
    let sectors = regions * RS / 512;
    let src = Arc::new(Probe {
        inner: SimDevice::from_image(image(SOURCE, sectors)),
        max_read: AtomicU64::new(0),
        delay,
    });
    let dst = Arc::new(SimDevice::new(regions * RS));
    let geo = Geometry::new(regions * RS, RS).unwrap();
    let md = Arc::new(SimDevice::from_image(formatted_metadata(&geo)));
    let eng = Arc::new(engine(src.clone(), dst.clone(), md, &geo).unwrap());
    (src, dst, eng)
}

fn fast() -> HydratorTiming {
    HydratorTiming {
        yield_delay: Duration::from_millis(1),
        retry_delay: Duration::from_millis(20),
        idle_delay: Duration::from_millis(10),
    }
}

#[test]
fn disable_stops_progress_and_enable_finishes() {
    let (_src, dst, eng) = probe_rig(256, Duration::from_micros(200));
    let ctl = HydrationControl::new(false, 8, 4, false);
    let _h = Hydrator::start(&eng, ctl.clone(), fast()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        eng.metadata().hydrated_count(),
        0,
        "hydrated while disabled"
    );
    ctl.set_enabled(true);
    assert!(poll_until(Duration::from_secs(1), || eng
        .metadata()
        .hydrated_count()
        > 0));
    ctl.set_enabled(false);
    std::thread::sleep(Duration::from_millis(50)); // copies in flight finish
    let frozen = eng.metadata().hydrated_count();
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        eng.metadata().hydrated_count(),
        frozen,
        "progress while disabled"
    );
    assert!(frozen < 256);
    ctl.set_enabled(true);
    assert!(poll_until(Duration::from_secs(20), || eng
        .metadata()
        .all_hydrated()));
    assert_eq!(dst.current_image(), image(SOURCE, 256 * RS / 512));
}

#[test]
fn threshold_bounds_the_regions_in_flight() {
    let (src, _dst, eng) = probe_rig(64, Duration::ZERO);
    let ctl = HydrationControl::new(true, 2, 16, false);
    let h = Hydrator::start(&eng, ctl.clone(), fast()).unwrap();
    assert!(poll_until(Duration::from_secs(10), || eng
        .metadata()
        .all_hydrated()));
    drop(h);
    assert_eq!(
        src.max_read.load(Ordering::SeqCst),
        2 * RS,
        "a copy larger than the threshold"
    );
    // Threshold 0 stops background hydration.
    let (_s2, _d2, eng2) = probe_rig(64, Duration::ZERO);
    let ctl2 = HydrationControl::new(true, 0, 16, false);
    let _h2 = Hydrator::start(&eng2, ctl2.clone(), fast()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(eng2.metadata().hydrated_count(), 0);
    ctl2.set_threshold(16);
    assert!(poll_until(Duration::from_secs(10), || eng2
        .metadata()
        .all_hydrated()));
}

#[test]
fn batches_copy_adjacent_regions_in_one_read() {
    let (src, _dst, eng) = probe_rig(64, Duration::ZERO);
    match eng.hydrate_batch(8, false).unwrap() {
        HydrateStep::Hydrated {
            first: 0,
            count: 8,
            holes: 0,
            bytes_read,
        } if bytes_read == 8 * RS => {}
        s => panic!("{s:?}"),
    }
    assert_eq!(src.max_read.load(Ordering::SeqCst), 8 * RS);
    // A guest-hydrated region splits the next batch.
    eng.write_at(&[1u8; 512], 10 * RS).unwrap();
    match eng.hydrate_batch(8, false).unwrap() {
        HydrateStep::Hydrated {
            first: 8, count: 2, ..
        } => {}
        s => panic!("{s:?}"),
    }
}

#[test]
fn hydration_racing_guest_writes_never_loses_a_write() {
    for seed in 0..4u64 {
        let regions = 128;
        let (_src, dst, eng) = probe_rig(regions, Duration::from_micros(50));
        let ctl = HydrationControl::new(true, 8, 3, false);
        let h = Hydrator::start(&eng, ctl, fast()).unwrap();
        let sectors = regions * RS / 512;
        let expect = Arc::new(Mutex::new(image(SOURCE, sectors)));
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let (eng, expect) = (eng.clone(), expect.clone());
                std::thread::spawn(move || {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed * 10 + t);
                    for i in 0..200u64 {
                        // Each thread owns every other sector range, so the
                        // expected image does not depend on thread timing.
                        let first = rng.gen_range(0..sectors / 16) * 16 + t * 8;
                        let n = rng.gen_range(1..=8u64);
                        let tag = 1000 + t * 10_000 + i;
                        let data = write_data(tag, first, n);
                        eng.write(first * 512, &[IoSlice::new(&data)]).unwrap();
                        let a = (first * 512) as usize;
                        expect.lock().unwrap()[a..a + data.len()].copy_from_slice(&data);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(poll_until(Duration::from_secs(20), || eng
            .metadata()
            .all_hydrated()));
        drop(h);
        eng.flush().unwrap();
        assert!(
            dst.current_image() == *expect.lock().unwrap(),
            "seed {seed}: destination differs"
        );
    }
}

#[test]
fn sparse_source_hydrates_reading_only_its_data() {
    const SIZE: u64 = 4 << 30;
    const REGION: u64 = 64 << 10;
    let dir =
        tempfile::tempdir_in(std::env::var("CARGO_TARGET_TMPDIR").unwrap_or("/var/tmp".into()))
            .unwrap();
    let sp = dir.path().join("sparse-source.img");
    let f = std::fs::File::create(&sp).unwrap();
    f.set_len(SIZE).unwrap();
    drop(f);
    let w = FileDevice::open(&sp, &OpenOptions::default()).unwrap();
    if w.data_extents(0, SIZE).unwrap().is_none() {
        eprintln!("file system without SEEK_DATA: skipping");
        return;
    }
    let chunks: Vec<(u64, Vec<u8>)> = [(0u64, 0x11u8), (1 << 30, 0x22), (SIZE - (1 << 20), 0x33)]
        .iter()
        .map(|&(off, b)| (off, vec![b; 1 << 20]))
        .collect();
    for (off, d) in &chunks {
        w.write_at(d, *off).unwrap();
    }
    w.flush().unwrap();
    drop(w);
    let src = Arc::new(
        FileDevice::open(
            &sp,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let dp = dir.path().join("dest.img");
    let dst = Arc::new(
        FileDevice::open(
            &dp,
            &OpenOptions {
                create_size: Some(SIZE),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let geo = Geometry::new(SIZE, REGION).unwrap();
    let md = Arc::new(
        Metadata::format(
            Arc::new(SimDevice::new(
                vhost_clone::metadata::format::Layout::new(&geo).required_size(),
            )),
            geo,
        )
        .unwrap(),
    );
    let eng = Engine::new(Some(src), dst.clone(), md, EngineConfig::default()).unwrap();
    let t = Instant::now();
    let mut holes = 0;
    loop {
        match eng.hydrate_batch(256, false).unwrap() {
            HydrateStep::Hydrated { holes: h, .. } => holes += h,
            HydrateStep::Done => break,
            HydrateStep::Busy => unreachable!(),
        }
    }
    eng.flush().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let read = eng.hydration_bytes_read();
    println!(
        "sparse 4 GiB source with 3 MiB of data: hydrated in {secs:.2} s, read {read} bytes from the source, {holes} hole regions"
    );
    assert!(eng.metadata().all_hydrated());
    assert!(
        read <= 3 << 20,
        "read {read} bytes of a source with 3 MiB of data"
    );
    assert_eq!(holes, geo.nr_regions() - 48);
    for (off, d) in &chunks {
        let mut b = vec![0u8; d.len()];
        eng.read_at(&mut b, *off).unwrap();
        assert!(b == *d);
    }
    let mut z = vec![1u8; 1 << 20];
    eng.read_at(&mut z, 2 << 30).unwrap();
    assert!(z.iter().all(|&x| x == 0));
    // The destination stayed sparse.
    let blocks = std::fs::metadata(&dp).unwrap().blocks() * 512;
    assert!(blocks < 64 << 20, "destination allocated {blocks} bytes");
}

#[test]
fn a_rate_limit_paces_background_hydration_and_a_message_lifts_it() {
    const REGION: u64 = 64 << 10;
    const SIZE: u64 = 24 << 20;
    const LIMIT: u64 = 8 << 20;
    let src = Arc::new(SimDevice::from_image(image(SOURCE, SIZE / 512)));
    let dst = Arc::new(SimDevice::new(SIZE));
    let geo = Geometry::new(SIZE, REGION).unwrap();
    let md = Arc::new(SimDevice::from_image(formatted_metadata(&geo)));
    let eng = Arc::new(engine(src, dst.clone(), md, &geo).unwrap());
    let ctl = HydrationControl::new(true, 64, 16, false);
    let msg = |v: &str| {
        vhost_clone::control::apply_message(&ctl, &["hydration-rate".into(), v.into()]).unwrap()
    };
    msg("8M");
    assert_eq!(ctl.rate_limit(), LIMIT);
    let t0 = Instant::now();
    let h = Hydrator::start(&eng, ctl.clone(), HydratorTiming::default()).unwrap();

    // Limited: over a second, at most the limit plus one 100 ms burst (a
    // tolerant 1.3x), and not absurdly less.
    std::thread::sleep(Duration::from_secs(1));
    let read = eng.hydration_bytes_read();
    let rate = read as f64 / t0.elapsed().as_secs_f64();
    println!(
        "hydration at a limit of 8 MiB/s: {:.2} MiB/s",
        rate / (1 << 20) as f64
    );
    assert!(rate <= 1.3 * LIMIT as f64, "{rate} bytes/s over the limit");
    assert!(
        rate >= 0.5 * LIMIT as f64,
        "{rate} bytes/s, far below the limit"
    );

    // Lowered to one region a second: background hydration nearly stops, the
    // guest's reads of unhydrated data and partial writes are not held back.
    msg("64KiB/s");
    let before = eng.hydration_bytes_read();
    let t = Instant::now();
    let mut buf = vec![0u8; 2 << 20];
    eng.read_at(&mut buf, SIZE - (2 << 20)).unwrap();
    assert!(buf == image(SOURCE, SIZE / 512)[(SIZE - (2 << 20)) as usize..]);
    eng.write_at(&write_data(7, SIZE / 512 - 1, 1), SIZE - 512)
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "guest I/O took {:?} under a 64 KiB/s limit",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    let crept = eng.hydration_bytes_read() - before;
    // What was granted before the message, plus a region or two after it.
    assert!(
        crept <= 16 * REGION,
        "read {crept} bytes at 64 KiB/s in 0.3 s"
    );

    // Lifted at run time: the rest (more than 13 MiB, over 1.6 s at the old
    // limit) goes at full speed.
    msg("0");
    let t = Instant::now();
    assert!(poll_until(Duration::from_secs(5), || eng
        .metadata()
        .all_hydrated()));
    let took = t.elapsed();
    println!("the rest, unlimited: {took:?}");
    assert!(
        took < Duration::from_millis(800),
        "lifting the limit left {took:?}"
    );
    drop(h);
    let mut want = image(SOURCE, SIZE / 512);
    want[(SIZE - 512) as usize..].copy_from_slice(&write_data(7, SIZE / 512 - 1, 1));
    assert!(dst.current_image() == want);
}
