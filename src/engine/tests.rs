//! Unit tests of request mapping.

use super::*;
use crate::metadata::format::Layout;
use crate::metadata::RegionState;
use crate::storage::aio::{AsyncIo, IoTarget};
use crate::storage::SimDevice;

const RS: u64 = 4096;

struct Rig {
    src: Arc<SimDevice>,
    dst: Arc<SimDevice>,
    mdd: Arc<SimDevice>,
    eng: Arc<Engine>,
}

fn rig(regions: u64, tail: u64) -> Rig {
    let size = regions * RS + tail;
    let mut img = vec![0u8; size as usize];
    for (i, b) in img.iter_mut().enumerate() {
        *b = (i / 512) as u8 | 0x80;
    }
    let src = Arc::new(SimDevice::from_image(img));
    let dst = Arc::new(SimDevice::new(size));
    let geo = Geometry::new(size, RS).unwrap();
    let mdd = Arc::new(SimDevice::new(Layout::new(&geo).required_size()));
    let md = Arc::new(Metadata::format(mdd.clone(), geo).unwrap());
    let eng =
        Arc::new(Engine::new(Some(src.clone()), dst.clone(), md, EngineConfig::default()).unwrap());
    Rig { src, dst, mdd, eng }
}

fn src_byte(off: u64) -> u8 {
    (off / 512) as u8 | 0x80
}

#[test]
fn unhydrated_reads_come_from_the_source_without_copying() {
    let r = rig(4, 0);
    let mut b = vec![0u8; 3 * RS as usize];
    r.eng.read_at(&mut b, RS / 2).unwrap();
    for (i, x) in b.iter().enumerate() {
        assert_eq!(*x, src_byte(RS / 2 + i as u64));
    }
    assert_eq!(r.dst.write_count(), 0);
    assert_eq!(r.eng.metadata().hydrated_count(), 0);
}

#[test]
fn partial_write_hydrates_the_region_first() {
    let r = rig(4, 0);
    r.eng.write_at(&[1u8; 512], RS + 1024).unwrap();
    assert!(r.eng.metadata().is_hydrated(1));
    let mut b = vec![0u8; RS as usize];
    r.eng.read_at(&mut b, RS).unwrap();
    for (i, x) in b.iter().enumerate() {
        let want = if (1024..1536).contains(&i) {
            1
        } else {
            src_byte(RS + i as u64)
        };
        assert_eq!(*x, want, "byte {i}");
    }
    assert_eq!(r.eng.counters().guest_hydrations, 1);
}

#[test]
fn whole_region_write_marks_without_copy() {
    let r = rig(4, 0);
    let reads = r.src.read_count();
    // Straddles: part of region 0, all of 1 and 2, part of 3.
    let data = vec![5u8; (3 * RS) as usize];
    r.eng.write_at(&data, RS / 2).unwrap();
    let md = r.eng.metadata();
    assert!((0..4).all(|i| md.is_hydrated(i)));
    assert_eq!(r.eng.counters().overwrites, 2);
    assert_eq!(r.eng.counters().guest_hydrations, 2);
    // Only the two edge regions were read from the source.
    assert_eq!(r.src.read_count() - reads, 2);
    let mut b = vec![0u8; (4 * RS) as usize];
    r.eng.read_at(&mut b, 0).unwrap();
    for (i, x) in b.iter().enumerate() {
        let i = i as u64;
        let want = if (RS / 2..RS / 2 + 3 * RS).contains(&i) {
            5
        } else {
            src_byte(i)
        };
        assert_eq!(*x, want);
    }
}

#[test]
fn short_last_region_is_handled() {
    let r = rig(2, 1024);
    let size = r.eng.size();
    r.eng.write_at(&[3u8; 1024], size - 1024).unwrap();
    assert!(r.eng.metadata().is_hydrated(2));
    assert_eq!(r.eng.counters().overwrites, 1);
    let mut b = [0u8; 1024];
    r.eng.read_at(&mut b, size - 1024).unwrap();
    assert_eq!(b, [3u8; 1024]);
}

#[test]
fn bad_requests_are_refused() {
    let r = rig(2, 0);
    let size = r.eng.size();
    assert!(r
        .eng
        .read_at(&mut [0u8; 512], size)
        .unwrap_err()
        .is_bad_request());
    assert!(r.eng.write_at(&[0u8; 100], 0).unwrap_err().is_bad_request());
    assert!(r.eng.write_at(&[0u8; 512], 3).unwrap_err().is_bad_request());
    assert!(r
        .eng
        .discard(u64::MAX - 511, 1024)
        .unwrap_err()
        .is_bad_request());
    assert!(r
        .eng
        .write_zeroes(0, size + 512)
        .unwrap_err()
        .is_bad_request());
    assert_eq!(r.eng.counters().errors, 5);
}

#[test]
fn discard_marks_whole_unhydrated_regions_zeroed_and_ignores_partial_ones() {
    let r = rig(4, 0);
    // Inside one region: touches nothing.
    r.eng.discard(512, 1024).unwrap();
    assert_eq!(r.eng.metadata().hydrated_count(), 0);
    assert_eq!(r.dst.write_count(), 0);
    // Covers region 1 and 2 fully, parts of 0 and 3.
    r.eng.discard(RS / 2, 3 * RS).unwrap();
    let md = r.eng.metadata();
    assert!(!md.is_hydrated(0) && md.is_hydrated(1) && md.is_hydrated(2) && !md.is_hydrated(3));
    let mut b = vec![0u8; RS as usize];
    r.eng.read_at(&mut b, RS).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    r.eng.read_at(&mut b, 0).unwrap();
    assert_eq!(b[RS as usize - 1], src_byte(RS - 1));
}

#[test]
fn discard_of_hydrated_partial_range_is_passed_down() {
    let r = rig(2, 0);
    r.eng.write_at(&vec![9u8; RS as usize], 0).unwrap();
    r.eng.discard(512, 512).unwrap();
    let mut b = vec![0u8; 1024];
    r.eng.read_at(&mut b, 0).unwrap();
    assert_eq!(b[..512], [9u8; 512]);
    assert_eq!(b[512..], [0u8; 512]);
}

#[test]
fn write_zeroes_follows_write_rules() {
    let r = rig(3, 0);
    r.eng.write_zeroes(RS / 2, 2 * RS).unwrap();
    let md = r.eng.metadata();
    assert!(md.is_hydrated(0) && md.is_hydrated(1) && md.is_hydrated(2));
    let mut b = vec![0u8; (3 * RS) as usize];
    r.eng.read_at(&mut b, 0).unwrap();
    for (i, x) in b.iter().enumerate() {
        let i = i as u64;
        let want = if (RS / 2..RS / 2 + 2 * RS).contains(&i) {
            0
        } else {
            src_byte(i)
        };
        assert_eq!(*x, want);
    }
}

#[test]
fn flush_commits_after_flushing_the_destination() {
    let r = rig(2, 0);
    r.eng.write_at(&[1u8; 512], 0).unwrap();
    let f = r.dst.flush_count();
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f + 1);
    assert_eq!(r.dst.pending_writes(), 0);
    assert_eq!(r.eng.metadata().stats().commits, 1);
    // Nothing written since: nothing to flush, no metadata commit.
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f + 1);
    assert_eq!(r.eng.metadata().stats().commits, 1);
    // A write to a hydrated region: the destination is flushed, no metadata commit.
    r.eng.write_at(&[2u8; 512], 512).unwrap();
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f + 2);
    assert_eq!(r.dst.pending_writes(), 0);
    assert_eq!(r.eng.metadata().stats().commits, 1);
    // Discards and write-zeroes count as writes too.
    r.eng.discard(0, 512).unwrap();
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f + 3);
    assert_eq!(r.dst.pending_writes(), 0);
}

#[test]
fn hydration_never_overwrites_guest_data_and_completes() {
    let r = rig(6, 512);
    r.eng.write_at(&vec![7u8; RS as usize], 2 * RS).unwrap();
    let mut n = 0;
    while r.eng.hydrate_next().unwrap().is_some() {
        n += 1;
        assert!(n < 100);
    }
    assert!(r.eng.metadata().all_hydrated());
    assert_eq!(r.eng.counters().background_hydrations, 6);
    let mut b = vec![0u8; r.eng.size() as usize];
    r.eng.read_at(&mut b, 0).unwrap();
    for (i, x) in b.iter().enumerate() {
        let i = i as u64;
        let want = if (2 * RS..3 * RS).contains(&i) {
            7
        } else {
            src_byte(i)
        };
        assert_eq!(*x, want);
    }
    // And the destination holds the same bytes.
    assert_eq!(r.dst.current_image(), b);
}

#[test]
fn no_source_is_refused_until_hydrated() {
    let r = rig(2, 0);
    let md = r.eng.metadata().clone();
    let e = Engine::new(None, r.dst.clone(), md.clone(), EngineConfig::default()).unwrap_err();
    assert!(e.to_string().contains("no source given"), "{e}");
    r.eng.hydrate_region(0).unwrap();
    r.eng.hydrate_region(1).unwrap();
    let e2 = Engine::new(None, r.dst.clone(), md, EngineConfig::default()).unwrap();
    let mut b = [0u8; 512];
    e2.read_at(&mut b, 0).unwrap();
    assert_eq!(b[0], src_byte(0));
}

#[test]
fn concurrent_writers_to_one_region_lose_nothing() {
    let r = rig(2, 0);
    let mut threads = Vec::new();
    for t in 0..8u64 {
        let e = r.eng.clone();
        threads.push(std::thread::spawn(move || {
            e.write_at(&[t as u8 + 1; 512], t * 512).unwrap();
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let mut b = vec![0u8; RS as usize];
    r.eng.read_at(&mut b, 0).unwrap();
    for t in 0..8usize {
        assert!(
            b[t * 512..(t + 1) * 512].iter().all(|&x| x == t as u8 + 1),
            "sector {t}"
        );
    }
    assert_eq!(r.eng.counters().guest_hydrations, 1);
}

#[test]
fn read_only_metadata_fails_writes_that_need_hydration_only() {
    let r = rig(3, 0);
    r.eng.write_at(&vec![1u8; RS as usize], 0).unwrap();
    r.eng.flush().unwrap();
    r.eng.write_at(&[2u8; 512], RS).unwrap();
    r.dst
        .set_fault(crate::storage::Fault::Flush, Some(libc::EIO));
    assert!(r.eng.flush().is_err());
    r.dst.set_fault(crate::storage::Fault::Flush, None);
    assert_eq!(r.eng.metadata().mode(), Mode::Ro);
    // Region 0 is committed and hydrated: reads and writes work.
    r.eng.write_at(&[3u8; 512], 0).unwrap();
    let mut b = [0u8; 512];
    r.eng.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [3u8; 512]);
    // Region 2 needs hydration: refused. Flushes fail.
    assert!(r.eng.write_at(&[4u8; 512], 2 * RS).is_err());
    assert!(r.eng.flush().is_err());
    // Reads of unhydrated regions still work.
    r.eng.read_at(&mut b, 2 * RS).unwrap();
    assert_eq!(b[0], src_byte(2 * RS));
}

#[test]
fn direct_io_maps_single_kind_ranges_to_the_right_file() {
    let size = 4 * RS;
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        Arc::new(
            crate::storage::FileDevice::open(
                &dir.path().join(name),
                &crate::storage::OpenOptions {
                    create_size: Some(size),
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    };
    let (src, dst) = (open("s.img"), open("d.img"));
    let geo = Geometry::new(size, RS).unwrap();
    let mdd = Arc::new(SimDevice::new(Layout::new(&geo).required_size()));
    let md = Arc::new(Metadata::format(mdd, geo).unwrap());
    let eng = Engine::new(Some(src.clone()), dst.clone(), md, EngineConfig::default()).unwrap();
    let fd = |d: &dyn crate::storage::BlockDevice| match d.async_io() {
        Some(AsyncIo::Fd(f)) => Some(IoTarget::Fd(f)),
        _ => None,
    };
    let (s, d) = (fd(src.as_ref()), fd(dst.as_ref()));
    assert_ne!(s, d);
    let target = |write, offset, len| {
        eng.direct_io(write, offset, len)
            .map(|p| p.target().clone())
    };

    // Unhydrated: reads go to the source, writes through the engine.
    assert_eq!(target(false, 0, 2 * RS), s.clone());
    assert_eq!(target(true, 0, RS), None);
    eng.write_at(&vec![7u8; RS as usize], 0).unwrap();
    // Hydrated: both go to the destination.
    assert_eq!(target(false, 0, RS), d.clone());
    assert_eq!(target(true, 512, 1024), d.clone());
    // Mixed ranges, bad ranges: the engine.
    assert_eq!(target(false, 0, 2 * RS), None, "hydrated and not");
    assert_eq!(
        target(true, 0, 2 * RS),
        None,
        "reaches an unhydrated region"
    );
    assert_eq!(target(false, 0, 0), None, "empty");
    assert_eq!(target(false, 1, 512), None, "unaligned");
    assert_eq!(target(false, 3 * RS, 2 * RS), None, "past the end");
    // Complete: everything to the destination.
    for r in 1..4 {
        eng.write_at(&vec![7u8; RS as usize], r * RS).unwrap();
    }
    assert_eq!(target(false, 0, size), d.clone());
}

/// The io_uring path's writes bypass `Engine::write`; their permit must make the
/// next flush flush the destination, like any completed destination write, and
/// must count the request however it ends.
#[test]
fn direct_write_permits_make_the_next_flush_flush_the_destination() {
    let r = rig(4, 0);
    r.eng.write_at(&[1u8; 512], 0).unwrap();
    r.eng.flush().unwrap();
    let f0 = r.dst.flush_count();
    r.eng.flush().unwrap();
    assert_eq!(
        r.dst.flush_count(),
        f0,
        "nothing written: no destination flush"
    );

    let p = r.eng.direct_io(false, 0, 512).unwrap();
    assert_eq!(r.eng.ios_in_flight(), 1);
    // A read completing changes nothing.
    p.finish(true);
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f0);

    let p = r.eng.direct_io(true, 0, 512).unwrap();
    p.finish(true);
    assert_eq!(r.eng.ios_in_flight(), 0);
    r.eng.flush().unwrap();
    assert_eq!(
        r.dst.flush_count(),
        f0 + 1,
        "a completed direct write must be flushed"
    );
    let c = r.eng.counters();
    assert_eq!((c.reads, c.writes), (1, 2));

    // A failed write counts as an error, and may have landed in part: flushed.
    r.eng.direct_io(true, 0, 512).unwrap().finish(false);
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f0 + 2);
    assert_eq!(r.eng.counters().errors, 1);

    // A cancelled permit was never issued: nothing to flush, nothing counted.
    r.eng.direct_io(true, 0, 512).unwrap().cancel();
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f0 + 2);
    // A permit dropped unfinished may have been issued: flushed.
    drop(r.eng.direct_io(true, 0, 512).unwrap());
    assert_eq!(r.eng.ios_in_flight(), 0);
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f0 + 3);
    assert_eq!(r.eng.counters().writes, 3);
}

/// `region_copy` grants a copy only for a write inside one unhydrated region that no
/// one else holds, keeps the region locked while it lives, and marks the region only
/// when it finishes successfully.
#[test]
fn region_copies_are_granted_for_one_free_unhydrated_region_and_mark_at_the_end() {
    let r = rig(4, 0);
    let e = &r.eng;
    // Refused: two regions, empty, unaligned, past the end.
    assert!(e.region_copy(RS - 512, 1024).is_none(), "two regions");
    assert!(e.region_copy(0, 0).is_none(), "empty");
    assert!(e.region_copy(1, 512).is_none(), "unaligned");
    assert!(e.region_copy(4 * RS, 512).is_none(), "past the end");

    // Granted: the source and destination of the region, the guest's part of it.
    let mut c = e.region_copy(RS + 1024, 512).expect("a partial write");
    assert_eq!(c.start(), RS);
    assert_eq!(c.covered(), (1024, 1536));
    assert_eq!(c.read_len(), Some(RS));
    assert!(!c.buffer().is_null());
    assert_eq!(e.ios_in_flight(), 1);
    // While it lives the region is locked: no second copy, and hydration skips it.
    assert!(e.region_copy(RS, 512).is_none(), "region held");
    assert_eq!(e.locks.held(), 1);
    assert!(!e.metadata().is_hydrated(1), "marked before the copy ended");
    // A failed copy marks nothing and unlocks.
    c.finish(false).unwrap();
    assert!(!e.metadata().is_hydrated(1));
    assert_eq!((e.locks.held(), e.ios_in_flight()), (0, 0));
    // A cancelled or dropped one neither.
    e.region_copy(RS, 512).unwrap().cancel();
    drop(e.region_copy(RS, 512).unwrap());
    assert!(!e.metadata().is_hydrated(1));
    assert_eq!(e.locks.held(), 0);

    // A successful one marks, after which the region is no longer copied.
    let f0 = r.dst.flush_count();
    e.region_copy(RS, 512).unwrap().finish(true).unwrap();
    assert!(e.metadata().is_hydrated(1));
    assert!(e.region_copy(RS, 512).is_none(), "hydrated");
    assert_eq!(e.counters().guest_hydrations, 1);
    // Its destination write is flushed before the commit that makes the bit durable.
    e.flush().unwrap();
    assert!(r.dst.flush_count() > f0);

    // A write covering the whole region reads nothing.
    let c = e.region_copy(2 * RS, RS).unwrap();
    assert_eq!(c.read_len(), None);
    c.finish(true).unwrap();
    assert_eq!(e.counters().overwrites, 1);

    // Read-only metadata (a failed destination flush): no copies.
    e.write_at(&[2u8; 512], RS).unwrap();
    r.dst
        .set_fault(crate::storage::Fault::Flush, Some(libc::EIO));
    assert!(e.flush().is_err());
    assert_eq!(e.metadata().mode(), Mode::Ro);
    assert!(e.region_copy(3 * RS, 512).is_none(), "read-only");
}

/// The engine of a restarted process on the devices of `r` (whose caches, like
/// the page cache, survived) with the live map `live` the dead one left.
fn restart(r: &Rig, live: crate::metadata::live::LiveMap) -> Engine {
    let mdd: Arc<dyn crate::storage::BlockDevice> = r.mdd.clone();
    let loaded = crate::metadata::load(mdd.as_ref(), None).unwrap();
    let md = Metadata::from_loaded(mdd, loaded, live).unwrap();
    Engine::new(
        Some(r.src.clone()),
        r.dst.clone(),
        Arc::new(md),
        EngineConfig::default(),
    )
    .unwrap()
}

/// Design rule 7: a process death loses no completed write, and the restarted
/// process's first flush makes them durable (then a power cut keeps them).
#[test]
fn a_restart_after_a_process_death_keeps_every_completed_write() {
    let r = rig(4, 0);
    r.eng.write_at(&vec![1u8; RS as usize], 0).unwrap();
    r.eng.flush().unwrap();
    // Not flushed: a write to hydrated region 0, and one that hydrates region 1.
    r.eng.write_at(&[2u8; 512], 512).unwrap();
    r.eng.write_at(&[3u8; 512], RS + 1024).unwrap();
    assert!(r.dst.pending_writes() > 0);
    let live = r.eng.metadata().live_map().survivor().unwrap();
    let eng = restart(&r, live);
    assert_eq!(eng.metadata().adopted(), 1, "region 1's bit is adopted");
    let mut b = vec![0u8; 2 * RS as usize];
    eng.read_at(&mut b, 0).unwrap();
    assert_eq!(&b[512..1024], &[2u8; 512][..]);
    assert_eq!(&b[RS as usize + 1024..RS as usize + 1536], &[3u8; 512][..]);
    assert_eq!(
        b[RS as usize],
        src_byte(RS),
        "the rest of region 1 is the source's"
    );
    // The first flush of the new process reaches the destination.
    let f = r.dst.flush_count();
    eng.flush().unwrap();
    assert!(
        r.dst.flush_count() > f,
        "the first flush after a restart skipped the destination"
    );
    // A power cut now keeps everything.
    let dst = Arc::new(SimDevice::from_image(r.dst.durable_image()));
    let mdd = Arc::new(SimDevice::from_image(r.mdd.durable_image()));
    let md = Arc::new(Metadata::open(mdd, None).unwrap());
    assert!(md.is_hydrated(1));
    let eng = Engine::new(Some(r.src.clone()), dst, md, EngineConfig::default()).unwrap();
    eng.read_at(&mut b, 0).unwrap();
    assert_eq!(&b[512..1024], &[2u8; 512][..]);
    assert_eq!(&b[RS as usize + 1024..RS as usize + 1536], &[3u8; 512][..]);
}

/// The first flush of a process flushes the destination even when the process
/// itself wrote nothing (the previous one may have).
#[test]
fn the_first_flush_of_a_process_flushes_the_destination() {
    let r = rig(2, 0);
    let f = r.dst.flush_count();
    r.eng.flush().unwrap();
    assert_eq!(r.dst.flush_count(), f + 1);
    r.eng.flush().unwrap();
    assert_eq!(
        r.dst.flush_count(),
        f + 1,
        "nothing written since: no flush"
    );
}

/// The guest's write-cache choice is committed when it is made.
#[test]
fn the_write_cache_choice_is_committed_at_once() {
    let r = rig(2, 0);
    r.eng.set_write_cache(false).unwrap();
    let md = Metadata::open(Arc::new(SimDevice::from_image(r.mdd.durable_image())), None).unwrap();
    assert_eq!(md.write_cache(), Some(false));
}

#[test]
fn counters_split_bytes_and_errors_by_request_kind() {
    let r = rig(4, 0);
    let e = &r.eng;
    e.discard(0, RS).unwrap();
    e.write_zeroes(RS, 1024).unwrap();
    assert!(e.read_at(&mut [0u8; 512], 4 * RS).is_err(), "past the end");
    assert!(e.write_at(&[0u8; 100], 0).is_err(), "not sector aligned");
    r.dst
        .set_fault(crate::storage::Fault::Flush, Some(libc::EIO));
    assert!(e.flush().is_err());
    r.dst.set_fault(crate::storage::Fault::Flush, None);
    let c = e.counters();
    assert_eq!((c.bytes_discarded, c.bytes_zeroed), (RS, 1024));
    assert_eq!(
        (c.read_errors, c.write_errors, c.flush_errors),
        (1, 1, 1),
        "{c:?}"
    );
    assert_eq!((c.discard_errors, c.write_zeroes_errors), (0, 0));
    assert_eq!(c.errors, 3, "the total is the sum of the kinds");
}

#[test]
fn commits_that_do_io_are_timed_and_no_ops_are_not() {
    let r = rig(4, 0);
    let e = &r.eng;
    e.flush().unwrap(); // first flush of the process: flushes the destination
    let n = e.commit_latency().snapshot().count;
    assert_eq!(n, 1);
    e.commit(DestFlush::IfRecording).unwrap(); // nothing changed, nothing flushed
    e.flush().unwrap(); // nothing written since the last flush
    assert_eq!(e.commit_latency().snapshot().count, n);
    e.write_at(&[1u8; 512], 0).unwrap();
    e.commit(DestFlush::IfRecording).unwrap(); // a new state
    assert_eq!(e.commit_latency().snapshot().count, n + 1);
}

#[test]
fn the_hydration_rate_is_sampled_not_asked() {
    let r = rig(8, 0);
    let e = &r.eng;
    assert_eq!(e.hydration_rate(), 0.0);
    std::thread::sleep(Duration::from_millis(600));
    for reg in 0..4 {
        e.hydrate_region(reg).unwrap();
    }
    // Asking does not sample: still no second sample.
    assert_eq!(e.hydration_rate(), 0.0);
    e.sample_hydration();
    let rate = e.hydration_rate();
    // 4 regions of RS bytes in a bit over 0.6 s.
    assert!(rate > 0.0 && rate <= 4.0 * RS as f64 / 0.6, "{rate}");
}

/// Sub-block rigs: 16 KiB regions of four 4 KiB sub-blocks, a table of `slots`.
const PRS: u64 = 16384;
const SUB: u64 = 4096;

fn partial_rig(regions: u64, slots: u64) -> Rig {
    let size = regions * PRS;
    let mut img = vec![0u8; size as usize];
    for (i, b) in img.iter_mut().enumerate() {
        *b = (i / 512) as u8 | 0x80;
    }
    let src = Arc::new(SimDevice::from_image(img));
    let dst = Arc::new(SimDevice::new(size));
    let geo = Geometry::new(size, PRS).unwrap();
    let spec = crate::metadata::format::PartialSpec {
        slots,
        sub_block: SUB,
    };
    let mdd = Arc::new(SimDevice::new(Layout::with(&geo, &spec).required_size()));
    let md = Arc::new(Metadata::format_with(mdd.clone(), geo, spec).unwrap());
    let eng =
        Arc::new(Engine::new(Some(src.clone()), dst.clone(), md, EngineConfig::default()).unwrap());
    Rig { src, dst, mdd, eng }
}

/// Reads region `r` and checks each byte against `want(offset in region)`:
/// `Some(v)` the guest's byte, `None` the source's.
fn check_region(r: &Rig, region: u64, want: impl Fn(u64) -> Option<u8>) {
    let mut b = vec![0u8; PRS as usize];
    r.eng.read_at(&mut b, region * PRS).unwrap();
    for (i, x) in b.iter().enumerate() {
        let i = i as u64;
        let w = want(i).unwrap_or(src_byte(region * PRS + i));
        assert_eq!(*x, w, "byte {i} of region {region}");
    }
}

#[test]
fn writes_of_whole_sub_blocks_copy_nothing_and_reads_merge_both_devices() {
    let r = partial_rig(4, 8);
    let md = r.eng.metadata();
    let reads = r.src.read_count();
    r.eng.write_at(&[1u8; 4096], PRS + SUB).unwrap();
    assert_eq!(
        r.src.read_count(),
        reads,
        "a whole sub-block needs no source read"
    );
    assert_eq!(r.dst.write_count(), 1);
    assert!(!md.is_hydrated(1));
    assert_eq!(md.written_mask(1), Some(0b0010));
    assert_eq!(md.region_state(1), RegionState::Partial(0b0010));
    check_region(&r, 1, |i| (SUB..2 * SUB).contains(&i).then_some(1));
    // A read inside the written sub-block alone, and one across both devices.
    let mut b = vec![0u8; 1024];
    r.eng.read_at(&mut b, PRS + SUB + 512).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    let mut b = vec![0u8; 2 * SUB as usize];
    r.eng.read_at(&mut b, PRS + SUB / 2).unwrap();
    assert_eq!(b[0], src_byte(PRS + SUB / 2));
    assert_eq!(b[SUB as usize], 1);
    assert_eq!(b[2 * SUB as usize - 1], src_byte(PRS + 5 * SUB / 2 - 1));
    assert_eq!(r.eng.counters().partial_writes, 1);
    assert_eq!(r.eng.counters().guest_hydrations, 0);
}

#[test]
fn an_edge_sub_block_is_completed_from_the_source_unless_the_guest_wrote_it() {
    let r = partial_rig(4, 8);
    let md = r.eng.metadata();
    r.eng.write_at(&[1u8; 4096], PRS + SUB).unwrap();
    // Part of unwritten sub-block 2: its other bytes come from the source.
    r.eng.write_at(&[2u8; 512], PRS + 2 * SUB + 1024).unwrap();
    assert_eq!(md.written_mask(1), Some(0b0110));
    // Part of written sub-block 1: only the guest's bytes are written.
    let writes = r.dst.write_count();
    let reads = r.src.read_count();
    r.eng.write_at(&[3u8; 512], PRS + SUB + 512).unwrap();
    assert_eq!(r.src.read_count(), reads);
    assert_eq!(r.dst.write_count(), writes + 1);
    check_region(&r, 1, |i| match i {
        _ if (SUB + 512..SUB + 1024).contains(&i) => Some(3),
        _ if (SUB..2 * SUB).contains(&i) => Some(1),
        _ if (2 * SUB + 1024..2 * SUB + 1536).contains(&i) => Some(2),
        _ => None,
    });
    // The last two sub-blocks: the region is hydrated and leaves the table.
    r.eng.write_at(&[4u8; 4096], PRS).unwrap();
    r.eng.write_at(&[5u8; 4096], PRS + 3 * SUB).unwrap();
    assert!(md.is_hydrated(1));
    assert_eq!(md.written_mask(1), None);
    assert_eq!(md.partial_count(), 0);
    check_region(&r, 1, |i| match i {
        _ if i < SUB => Some(4),
        _ if (SUB + 512..SUB + 1024).contains(&i) => Some(3),
        _ if (SUB..2 * SUB).contains(&i) => Some(1),
        _ if (2 * SUB + 1024..2 * SUB + 1536).contains(&i) => Some(2),
        _ if i >= 3 * SUB => Some(5),
        _ => None,
    });
}

#[test]
fn hydration_copies_only_what_a_partly_written_region_lacks() {
    let r = partial_rig(4, 8);
    r.eng.write_at(&[1u8; 4096], PRS + SUB).unwrap();
    r.eng.write_zeroes(3 * PRS + 2 * SUB, SUB).unwrap();
    assert_eq!(r.eng.metadata().partial_count(), 2);
    while r.eng.hydrate_next().unwrap().is_some() {}
    assert!(r.eng.metadata().all_hydrated());
    assert_eq!(r.eng.metadata().partial_count(), 0);
    check_region(&r, 1, |i| (SUB..2 * SUB).contains(&i).then_some(1));
    check_region(&r, 3, |i| (2 * SUB..3 * SUB).contains(&i).then_some(0));
    check_region(&r, 0, |_| None);
}

#[test]
fn a_full_table_falls_back_to_region_copies() {
    let r = partial_rig(4, 2);
    let md = r.eng.metadata();
    r.eng.write_at(&[1u8; 4096], 0).unwrap();
    r.eng.write_at(&[2u8; 4096], PRS).unwrap();
    assert_eq!(md.partial_count(), 2);
    // No slot left: region 2 is copied whole and hydrated.
    r.eng.write_at(&[3u8; 4096], 2 * PRS + SUB).unwrap();
    assert!(md.is_hydrated(2));
    assert_eq!(r.eng.counters().guest_hydrations, 1);
    check_region(&r, 2, |i| (SUB..2 * SUB).contains(&i).then_some(3));
    // A region with a slot still takes more sub-blocks.
    r.eng.write_at(&[4u8; 4096], 3 * SUB).unwrap();
    assert_eq!(md.written_mask(0), Some(0b1001));
    // Hydrating one frees its slot for the next.
    r.eng.hydrate_region(1).unwrap();
    r.eng.write_at(&[5u8; 4096], 3 * PRS).unwrap();
    assert_eq!(md.written_mask(3), Some(0b0001));
}

#[test]
fn masks_survive_a_commit_and_a_process_death() {
    let r = partial_rig(4, 8);
    r.eng.write_at(&[1u8; 4096], PRS + SUB).unwrap();
    r.eng.flush().unwrap();
    // After the commit: another sub-block, then the process dies.
    r.eng.write_at(&[2u8; 4096], 2 * PRS).unwrap();
    let live = r.eng.metadata().live_map().survivor().unwrap();
    let dev: Arc<dyn crate::storage::BlockDevice> = r.mdd.clone();
    let loaded = crate::metadata::load(dev.as_ref(), None).unwrap();
    assert_eq!(loaded.partial_regions(), vec![(1, 0b0010)]);
    let md = Arc::new(Metadata::from_loaded(dev.clone(), loaded, live).unwrap());
    assert_eq!(md.written_mask(1), Some(0b0010));
    assert_eq!(md.written_mask(2), Some(0b0001));
    assert!(md.changed(), "the adopted mask is the first commit's");
    let eng = Engine::new(
        Some(r.src.clone()),
        r.dst.clone(),
        md,
        EngineConfig::default(),
    )
    .unwrap();
    eng.flush().unwrap();
    let loaded = crate::metadata::load(dev.as_ref(), None).unwrap();
    assert_eq!(loaded.partial_regions().len(), 2);
    // Lost live map (another boot): the committed masks alone.
    let md = Metadata::open(dev, None).unwrap();
    assert_eq!(md.written_mask(2), Some(0b0001));
}
