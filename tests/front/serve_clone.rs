//! The clone engine behind the real vhost-user-blk front, driven by a raw
//! frontend over a unix socket: reads of unhydrated and hydrated data, partial
//! and whole-region writes, flush ordering (destination flushed before the
//! metadata commit, observed through the simulated devices' log), discard,
//! write-zeroes, GET_ID, two queues at once, and reconnect.

use crate::support::sectors;
use std::sync::Arc;

use crate::support::vu::*;
use vhost_clone::disk::CloneDisk;
use vhost_clone::engine::{Engine, EngineConfig};
use vhost_clone::metadata::format::PartialSpec;
use vhost_clone::metadata::{Geometry, Metadata};
use vhost_clone::storage::{CrashLog, LogEvent, SimDevice};

const REGION: u64 = 64 << 10;
const SIZE: u64 = 64 * REGION + 4096; // 4 MiB and a short last region
const DEST: u8 = 0;
const META: u8 = 1;

struct Rig {
    log: Arc<CrashLog>,
    src_img: Vec<u8>,
    dst: Arc<SimDevice>,
    eng: Arc<Engine>,
    srv: Server,
}

/// The rigs below have version 1 stores (no table of partly written regions),
/// so that a partial write into an unhydrated region copies it, which is what
/// most tests here are about; `rig_with(.., true)` has the default table.
fn rig() -> Rig {
    rig_with(opts(2), SIZE, REGION, false)
}

fn uring_opts() -> vhost_clone::virtio::ServeOptions {
    vhost_clone::virtio::ServeOptions {
        io_engine: vhost_clone::virtio::IoEngine::Uring,
        ..opts(1)
    }
}

fn uring_rig(size: u64, region: u64) -> Rig {
    rig_with(uring_opts(), size, region, false)
}

fn rig_with(
    options: vhost_clone::virtio::ServeOptions,
    size: u64,
    region: u64,
    table: bool,
) -> Rig {
    let src_img = sectors::image(sectors::SOURCE, size / 512);
    let log = CrashLog::new();
    let src = Arc::new(SimDevice::from_image(src_img.clone()).into_read_only());
    let dst = Arc::new(SimDevice::new(size).with_log(log.clone(), DEST));
    let geo = Geometry::new(size, region).unwrap();
    let spec = if table {
        PartialSpec::default_for(&geo)
    } else {
        PartialSpec::none(&geo)
    };
    let mdd = Arc::new(
        SimDevice::from_image(sectors::formatted_metadata_with(&geo, spec))
            .with_log(log.clone(), META),
    );
    let md = Arc::new(Metadata::open(mdd, Some(&geo)).unwrap());
    let eng = Arc::new(Engine::new(Some(src), dst.clone(), md, EngineConfig::default()).unwrap());
    let srv = Server::start(Arc::new(CloneDisk::new(eng.clone(), false)), options);
    Rig {
        log,
        src_img,
        dst,
        eng,
        srv,
    }
}

fn src_range(r: &Rig, off: u64, len: usize) -> Vec<u8> {
    r.src_img[off as usize..off as usize + len].to_vec()
}

#[test]
fn reads_writes_and_hydration_through_the_front() {
    let r = rig();
    let mut g = Guest::start(&r.srv.path, 2);
    // Unhydrated read straddling two regions: the source's bytes, nothing copied.
    let (st, data) = g.read(0, (REGION - 4096) / 512, 8192);
    assert_eq!(st, S_OK);
    assert_eq!(data, src_range(&r, REGION - 4096, 8192));
    assert_eq!(r.dst.write_count(), 0);
    // Partial write into region 3: hydrates it; the rest of the region is the source's.
    let p = pattern(4096, 3);
    assert_eq!(g.write(0, (3 * REGION + 8192) / 512, &p), S_OK);
    assert!(r.eng.metadata().is_hydrated(3));
    let (_, data) = g.read(1, 3 * REGION / 512, REGION as u32);
    let mut want = src_range(&r, 3 * REGION, REGION as usize);
    want[8192..8192 + 4096].copy_from_slice(&p);
    assert_eq!(data, want);
    // Whole-region write to region 5: no copy.
    let before = r.eng.counters().guest_hydrations;
    let w = pattern(REGION as usize, 5);
    assert_eq!(g.write(1, 5 * REGION / 512, &w), S_OK);
    assert_eq!(r.eng.counters().guest_hydrations, before);
    assert_eq!(r.eng.counters().overwrites, 1);
    assert_eq!(g.read(0, 5 * REGION / 512, REGION as u32).1, w);
    // The short last region.
    let t = pattern(4096, 9);
    assert_eq!(g.write(0, (SIZE - 4096) / 512, &t), S_OK);
    assert_eq!(g.read(0, (SIZE - 4096) / 512, 4096).1, t);
    // Out of range: IOERR, and the queue keeps working.
    assert_eq!(g.read(0, SIZE / 512, 512).0, S_IOERR);
    assert_eq!(g.read(0, 0, 512).0, S_OK);
}

#[test]
fn flush_flushes_the_destination_before_committing_metadata() {
    let r = rig();
    let mut g = Guest::start(&r.srv.path, 1);
    assert_eq!(g.write(0, 7 * REGION / 512 + 1, &pattern(512, 1)), S_OK);
    let start = r.log.len();
    assert_eq!(g.flush(0), S_OK);
    let ev = r.log.events();
    let dest_flush = ev[start..]
        .iter()
        .position(|e| matches!(e, LogEvent::Flush { dev: DEST }))
        .expect("no destination flush");
    let first_md_write = ev[start..]
        .iter()
        .position(|e| matches!(e, LogEvent::Write { dev: META, .. }))
        .expect("no metadata commit");
    assert!(
        dest_flush < first_md_write,
        "metadata written before the destination was flushed"
    );
    assert!(ev[start..]
        .iter()
        .any(|e| matches!(e, LogEvent::Flush { dev: META })));
    assert_eq!(r.eng.metadata().stats().commits, 1);
    assert_eq!(r.dst.pending_writes(), 0);
    // A flush with nothing written since needs no destination flush; one after a
    // write to a hydrated region flushes the destination, without a commit.
    let f = r.dst.flush_count();
    assert_eq!(g.flush(0), S_OK);
    assert_eq!(r.dst.flush_count(), f);
    assert_eq!(g.write(0, 7 * REGION / 512 + 2, &pattern(512, 2)), S_OK);
    assert_eq!(g.flush(0), S_OK);
    assert_eq!(r.dst.flush_count(), f + 1);
    assert_eq!(r.dst.pending_writes(), 0);
    assert_eq!(r.eng.metadata().stats().commits, 1);
}

#[test]
fn discard_write_zeroes_and_get_id() {
    let r = rig();
    let mut g = Guest::start(&r.srv.path, 1);
    // Discard regions 10..12 whole plus half of 12: 10 and 11 are marked and read zero.
    let seg = segment(10 * REGION / 512, (2 * REGION + REGION / 2) as u32 / 512, 0);
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_DISCARD, 0, &seg, 0);
    assert_eq!(st, S_OK);
    let md = r.eng.metadata();
    assert!(md.is_hydrated(10) && md.is_hydrated(11) && !md.is_hydrated(12));
    assert!(g
        .read(0, 10 * REGION / 512, REGION as u32)
        .1
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        g.read(0, 12 * REGION / 512, 4096).1,
        src_range(&r, 12 * REGION, 4096)
    );
    // Write-zeroes over part of region 20.
    let seg = segment((20 * REGION + 4096) / 512, 8, 0);
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg, 0);
    assert_eq!(st, S_OK);
    let (_, d) = g.read(0, 20 * REGION / 512, 3 * 4096);
    assert_eq!(d[..4096], src_range(&r, 20 * REGION, 4096)[..]);
    assert!(d[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(d[8192..], src_range(&r, 20 * REGION + 8192, 4096)[..]);
    // GET_ID.
    let (st, _, id) = g.request(0, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!(st, S_OK);
    assert!(id.starts_with(b"vc-test-serial"));
}

#[test]
fn two_queues_at_once_and_reconnect() {
    let r = rig();
    let p0 = pattern(REGION as usize, 40);
    let p1 = pattern(4096, 41);
    {
        let mut g = Guest::start(&r.srv.path, 2);
        let path = r.srv.path.clone();
        drop(path);
        for i in 0..16u64 {
            assert_eq!(g.write(0, (30 + i) * REGION / 512, &p0), S_OK);
            assert_eq!(
                g.write(1, ((50 + i % 8) * REGION + i * 4096) / 512, &p1),
                S_OK
            );
        }
        assert_eq!(g.flush(1), S_OK);
    } // disconnect
    let mut g = Guest::start(&r.srv.path, 2);
    for i in 0..16u64 {
        assert_eq!(g.read(1, (30 + i) * REGION / 512, REGION as u32).1, p0);
        assert_eq!(
            g.read(0, ((50 + i % 8) * REGION + i * 4096) / 512, 4096).1,
            p1
        );
    }
    assert!(r.eng.metadata().hydrated_count() >= 24);
    r.srv.stop();
}

#[test]
fn background_hydration_racing_guest_writes_through_the_front() {
    use rand::{Rng, SeedableRng};
    use vhost_clone::engine::hydrator::{HydrationControl, Hydrator, HydratorTiming};
    for seed in 0..3u64 {
        let r = rig();
        let ctl = HydrationControl::new(true, 4, 2, false);
        let timing = HydratorTiming {
            yield_delay: std::time::Duration::from_micros(200),
            ..HydratorTiming::default()
        };
        let h = Hydrator::start(&r.eng, ctl, timing).unwrap();
        let mut g = Guest::start(&r.srv.path, 2);
        let mut want = r.src_img.clone();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for i in 0..300u32 {
            let len = 512 * rng.gen_range(1..=16u64);
            let off = rng.gen_range(0..(SIZE - len) / 512) * 512;
            let data = pattern(len as usize, (i % 251) as u8);
            assert_eq!(g.write((i % 2) as usize, off / 512, &data), S_OK);
            want[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        let t = std::time::Instant::now();
        while !r.eng.metadata().all_hydrated() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(30),
                "hydration stalled"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(h);
        assert_eq!(g.flush(0), S_OK);
        assert!(
            r.dst.current_image() == want,
            "seed {seed}: destination differs"
        );
        assert!(
            r.dst.durable_image() == want,
            "seed {seed}: not durable after flush"
        );
    }
}

/// With the io_uring engine, partial writes into unhydrated regions are copied on the
/// queue (`engine::RegionCopy`), many at once: 16 writes into 16 regions published in
/// one kick reach the destination in another order than they were published (the
/// emulated queue performs its requests in a seeded random order; the synchronous path
/// would copy them one after the other), complete in publish order, and each region is
/// marked, with the source's bytes around the guest's.
#[test]
fn partial_writes_into_unhydrated_regions_are_copied_together_on_the_uring_engine() {
    if !uring_available() {
        return;
    }
    let r = uring_rig(SIZE, REGION);
    let mut g = Guest::start(&r.srv.path, 1);
    g.set_wce(true);
    let start = r.log.len();
    let regions: Vec<u64> = (0..16).map(|i| 2 + i * 3).collect();
    let mut heads = Vec::new();
    for (i, &reg) in regions.iter().enumerate() {
        let off = reg * REGION + 8192 + 4096 * (i as u64 % 4);
        let (head, status, _) = g.prepare(
            0,
            i as u64,
            VIRTIO_BLK_T_OUT,
            off / 512,
            &pattern(4096, reg as u8),
            0,
        );
        heads.push((head, status, off));
    }
    let all: Vec<u16> = heads.iter().map(|h| h.0).collect();
    g.publish_many(0, &all);
    for (k, &(head, status, _)) in heads.iter().enumerate() {
        let (id, _) = g.wait_used(0);
        assert_eq!(id, u32::from(head), "used entry {k} out of publish order");
        assert_eq!(g.read_mem(status, 1)[0], S_OK);
    }
    let written: Vec<u64> = r.log.events()[start..]
        .iter()
        .filter_map(|e| match e {
            LogEvent::Write {
                dev: DEST, offset, ..
            } => Some(offset / REGION),
            _ => None,
        })
        .collect();
    let mut sorted = written.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, regions, "one whole-region write per copy");
    assert_ne!(written, regions, "the copies ran one after the other");
    for (&reg, &(_, _, off)) in regions.iter().zip(&heads) {
        assert!(r.eng.metadata().is_hydrated(reg), "region {reg} not marked");
        let (st, data) = g.read(0, reg * REGION / 512, REGION as u32);
        assert_eq!(st, S_OK);
        let mut want = src_range(&r, reg * REGION, REGION as usize);
        let at = (off - reg * REGION) as usize;
        want[at..at + 4096].copy_from_slice(&pattern(4096, reg as u8));
        assert!(data == want, "region {reg} reads other bytes");
    }
    assert_eq!(r.eng.counters().guest_hydrations, 16);
}

/// Region copies in flight hold a region-long buffer each, so a queue keeps at most
/// 8 MiB of them: with 4 MiB regions, two. 8 partial writes into 8 regions published
/// together then reach the destination in windows of two: the write of region k + 2
/// comes after that of region k, which must have retired (in order) to make room.
#[test]
fn region_copies_in_flight_are_bounded_by_their_buffers() {
    if !uring_available() {
        return;
    }
    const BIG: u64 = 4 << 20;
    let r = uring_rig(8 * BIG, BIG);
    let mut g = Guest::start(&r.srv.path, 1);
    g.set_wce(true);
    let start = r.log.len();
    let heads: Vec<u16> = (0..8u64)
        .map(|reg| {
            let off = reg * BIG + 4096;
            let p = pattern(4096, reg as u8);
            g.prepare(0, reg, VIRTIO_BLK_T_OUT, off / 512, &p, 0).0
        })
        .collect();
    g.publish_many(0, &heads);
    for _ in 0..8 {
        g.wait_used(0);
    }
    let order: Vec<u64> = r.log.events()[start..]
        .iter()
        .filter_map(|e| match e {
            LogEvent::Write {
                dev: DEST, offset, ..
            } => Some(offset / BIG),
            _ => None,
        })
        .collect();
    assert_eq!(order.len(), 8, "{order:?}");
    let at = |reg: u64| order.iter().position(|&x| x == reg).unwrap();
    for k in 0..6 {
        assert!(
            at(k) < at(k + 2),
            "region {} written before region {k}: more than two copies in flight ({order:?})",
            k + 2
        );
    }
    for reg in 0..8 {
        assert!(r.eng.metadata().is_hydrated(reg));
    }
}

/// A version 2 store behind the front, on both queue engines: 16 writes of
/// whole 4 KiB sub-blocks into 16 unhydrated regions write 4 KiB each (no
/// region copy, no source read), 4 writes of 512 bytes read and write one
/// sub-block each; the regions stay partly written, reads merge both devices,
/// and hydration completes them around the guest's bytes.
#[test]
fn sub_block_writes_through_the_front_on_both_engines() {
    for uring in [false, true] {
        if uring && !uring_available() {
            continue;
        }
        let options = if uring { uring_opts() } else { opts(1) };
        let r = rig_with(options, SIZE, REGION, true);
        let mut g = Guest::start(&r.srv.path, 1);
        g.set_wce(true);
        let start = r.log.len();
        let mut writes: Vec<(u64, Vec<u8>)> = (0..16u64)
            .map(|i| {
                (
                    ((2 + i * 3) * REGION + 4096 * (i % 16)),
                    pattern(4096, i as u8),
                )
            })
            .collect();
        writes.extend((0..4u64).map(|i| ((50 + i) * REGION + 8192 + 1024, pattern(512, 99))));
        let prepared: Vec<(u16, u64)> = writes
            .iter()
            .enumerate()
            .map(|(i, (off, p))| {
                let (head, status, _) = g.prepare(0, i as u64, VIRTIO_BLK_T_OUT, off / 512, p, 0);
                (head, status)
            })
            .collect();
        let heads: Vec<u16> = prepared.iter().map(|h| h.0).collect();
        g.publish_many(0, &heads);
        for _ in 0..heads.len() {
            g.wait_used(0);
        }
        for &(_, status) in &prepared {
            assert_eq!(g.read_mem(status, 1)[0], S_OK, "uring {uring}");
        }
        let mut dest: Vec<(u64, usize)> = r.log.events()[start..]
            .iter()
            .filter_map(|e| match e {
                LogEvent::Write {
                    dev: DEST,
                    offset,
                    data,
                } => Some((*offset, data.len())),
                _ => None,
            })
            .collect();
        dest.sort_unstable();
        let mut want: Vec<(u64, usize)> = writes
            .iter()
            .map(|(off, p)| (off / 4096 * 4096, p.len().max(4096)))
            .collect();
        want.sort_unstable();
        assert_eq!(
            dest, want,
            "uring {uring}: one sub-block written per request"
        );
        let md = r.eng.metadata();
        assert_eq!(md.hydrated_count(), 0, "uring {uring}");
        assert_eq!(md.partial_count(), 20, "uring {uring}");
        assert_eq!(r.eng.counters().partial_writes, 20, "uring {uring}");
        assert_eq!(r.eng.counters().guest_hydrations, 0, "uring {uring}");
        let check = |g: &mut Guest, what: &str| {
            for (off, p) in &writes {
                let reg = off / REGION;
                let (st, data) = g.read(0, reg * REGION / 512, REGION as u32);
                assert_eq!(st, S_OK);
                let mut want = src_range(&r, reg * REGION, REGION as usize);
                let at = (off - reg * REGION) as usize;
                want[at..at + p.len()].copy_from_slice(p);
                assert!(
                    data == want,
                    "uring {uring}, {what}: region {reg} reads other bytes"
                );
            }
        };
        check(&mut g, "partly written");
        while r.eng.hydrate_next().unwrap().is_some() {}
        assert_eq!(md.partial_count(), 0);
        check(&mut g, "hydrated");
    }
}
