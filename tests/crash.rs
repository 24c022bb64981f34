//! The crash suite: seeded random workloads over simulated destination and
//! metadata devices with volatile caches; a crash at every write/flush boundary
//! (and random subsets of unflushed writes, torn and reordered, at each); a
//! restart from what survived; and a check of every sector:
//!
//! * a sector written before an acknowledged flush reads back exactly;
//! * any other sector reads as a value written there since (possibly lost), or
//!   the value it had at the last acknowledged flush (the source's if never
//!   written); never garbage, never source data over a flushed guest write.
//!
//! `VHOST_CLONE_CRASH_WORKLOADS=N` runs N workloads instead of the default.
//! The mutation test proves the suite can fail: with the destination flush
//! removed from the commit, it must find a violation.

mod common;

use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::*;
use vhost_clone::engine::Engine;
use vhost_clone::metadata::Geometry;
use vhost_clone::storage::{BlockDevice, CrashLog, Replayer, SimDevice};

const REGION: u64 = 4096;
const RSEC: u64 = REGION / SECTOR as u64;
const REGIONS: u64 = 32;
/// A short last region of 2 sectors.
const SECTORS: u64 = REGIONS * RSEC + 2;
const OPS: usize = 60;
const DEST: u8 = 0;
const META: u8 = 1;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64),
    Read(u64, u64),
    Discard(u64, u64),
    WriteZeroes(u64, u64),
    Flush,
    Commit,
    Hydrate,
}

/// A sector range: whole regions, inside one region, or straddling.
fn range(rng: &mut ChaCha8Rng) -> (u64, u64) {
    match rng.gen_range(0..3) {
        0 => {
            let r = rng.gen_range(0..REGIONS + 1);
            let n = rng.gen_range(1..3u64);
            let first = r * RSEC;
            (first, (n * RSEC).min(SECTORS - first))
        }
        1 => {
            let r = rng.gen_range(0..REGIONS);
            let a = rng.gen_range(0..RSEC);
            let b = rng.gen_range(a + 1..=RSEC);
            (r * RSEC + a, b - a)
        }
        _ => {
            let first = rng.gen_range(0..SECTORS);
            let n = rng.gen_range(1..=(3 * RSEC).min(SECTORS - first));
            (first, n)
        }
    }
}

fn gen_op(rng: &mut ChaCha8Rng) -> Op {
    match rng.gen_range(0..100) {
        0..=34 => {
            let (a, n) = range(rng);
            Op::Write(a, n)
        }
        35..=49 => {
            let (a, n) = range(rng);
            Op::Read(a, n)
        }
        50..=57 => {
            let (a, n) = range(rng);
            Op::Discard(a, n)
        }
        58..=64 => {
            let (a, n) = range(rng);
            Op::WriteZeroes(a, n)
        }
        65..=79 => Op::Flush,
        80..=86 => Op::Commit,
        _ => Op::Hydrate,
    }
}

/// What the model learns, in log order.
enum Hist {
    /// Sectors that may now hold these values (from this log index on).
    Issue(usize, Vec<(u64, u64)>),
    /// A flush was acknowledged once the log reached this index.
    FlushAck(usize),
}

#[derive(Default, Debug)]
struct Outcome {
    crash_points: u64,
    violations: Vec<String>,
}

struct World {
    log: Arc<CrashLog>,
    src: Arc<SimDevice>,
    dst_init: Vec<u8>,
    md_init: Vec<u8>,
    geo: Geometry,
    eng: Engine,
}

fn world(mutate: bool) -> World {
    let geo = Geometry::new(SECTORS * SECTOR as u64, REGION).unwrap();
    let log = CrashLog::new();
    let src = Arc::new(SimDevice::from_image(image(SOURCE, SECTORS)).into_read_only());
    let dst_init = image(GARBAGE, SECTORS);
    let md_init = formatted_metadata(&geo);
    let dst = Arc::new(SimDevice::from_image(dst_init.clone()).with_log(log.clone(), DEST));
    let mdd = Arc::new(SimDevice::from_image(md_init.clone()).with_log(log.clone(), META));
    let eng = engine(src.clone(), dst, mdd, &geo).unwrap();
    if mutate {
        eng.metadata().set_skip_dest_flush(true);
    }
    World {
        log,
        src,
        dst_init,
        md_init,
        geo,
        eng,
    }
}

fn read_tags(eng: &Engine, first: u64, n: u64) -> Result<Vec<Option<u64>>, String> {
    let mut buf = vec![0u8; (n as usize) * SECTOR];
    eng.read_at(&mut buf, first * SECTOR as u64)
        .map_err(|e| format!("read failed: {e}"))?;
    Ok(buf
        .chunks(SECTOR)
        .enumerate()
        .map(|(i, b)| decode(b, first + i as u64))
        .collect())
}

fn run_workload(seed: u64, mutate: bool) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = world(mutate);
    let mut out = Outcome::default();
    let mut cur = vec![SOURCE; SECTORS as usize];
    let mut hist = Vec::new();
    let mut next_tag = 100u64;
    for i in 0..OPS {
        let op = gen_op(&mut rng);
        let at = w.log.len();
        let res = match op {
            Op::Write(a, n) => {
                let tag = next_tag;
                next_tag += 1;
                let vals: Vec<(u64, u64)> = (a..a + n).map(|s| (s, tag)).collect();
                hist.push(Hist::Issue(at, vals));
                (a..a + n).for_each(|s| cur[s as usize] = tag);
                w.eng
                    .write_at(&write_data(tag, a, n), a * SECTOR as u64)
                    .map_err(|e| e.to_string())
            }
            Op::WriteZeroes(a, n) => {
                hist.push(Hist::Issue(at, (a..a + n).map(|s| (s, ZERO)).collect()));
                (a..a + n).for_each(|s| cur[s as usize] = ZERO);
                w.eng
                    .write_zeroes(a * SECTOR as u64, n * SECTOR as u64)
                    .map_err(|e| e.to_string())
            }
            Op::Discard(a, n) => {
                // design.md: whole unhydrated regions and hydrated parts read zero
                // afterwards; partial unhydrated edges keep their content.
                let md = w.eng.metadata();
                let mut vals = Vec::new();
                for s in a..a + n {
                    let r = s / RSEC;
                    let (rs, re) = (r * RSEC, ((r + 1) * RSEC).min(SECTORS));
                    let whole = a <= rs && re <= a + n;
                    if md.is_hydrated(r) || whole {
                        vals.push((s, ZERO));
                        cur[s as usize] = ZERO;
                    }
                }
                hist.push(Hist::Issue(at, vals));
                w.eng
                    .discard(a * SECTOR as u64, n * SECTOR as u64)
                    .map_err(|e| e.to_string())
            }
            Op::Read(a, n) => match read_tags(&w.eng, a, n) {
                Ok(tags) => {
                    for (i, t) in tags.iter().enumerate() {
                        let s = a + i as u64;
                        if *t != Some(cur[s as usize]) {
                            out.violations.push(format!(
                                "seed {seed}: live read of sector {s} gave {t:?}, expected {}",
                                cur[s as usize]
                            ));
                        }
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Op::Flush => {
                let r = w.eng.flush().map_err(|e| e.to_string());
                if r.is_ok() {
                    hist.push(Hist::FlushAck(w.log.len()));
                }
                r
            }
            Op::Commit => w.eng.commit(false).map(|_| ()).map_err(|e| e.to_string()),
            Op::Hydrate => w
                .eng
                .hydrate_batch(rng.gen_range(1..5), rng.gen_bool(0.3))
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = res {
            out.violations
                .push(format!("seed {seed}: op {i} {op:?} failed: {e}"));
        }
    }
    check_crashes(seed, &w, &hist, &mut rng, &mut out);
    out
}

/// Crashes at every boundary of the run (plus extra draws at random ones) and checks.
fn check_crashes(seed: u64, w: &World, hist: &[Hist], rng: &mut ChaCha8Rng, out: &mut Outcome) {
    let mut points = w.log.boundaries();
    points.push(w.log.len());
    let mut dst = Replayer::new(&w.log, DEST, w.dst_init.clone());
    let mut md = Replayer::new(&w.log, META, w.md_init.clone());
    let mut floor = vec![SOURCE; SECTORS as usize];
    let mut latest = vec![SOURCE; SECTORS as usize];
    let mut since: Vec<Vec<u64>> = vec![Vec::new(); SECTORS as usize];
    let mut h = 0;
    for &p in &points {
        // Advance the model to crash point p.
        while h < hist.len() {
            match &hist[h] {
                Hist::Issue(at, vals) if *at < p => {
                    for &(s, t) in vals {
                        since[s as usize].push(t);
                        latest[s as usize] = t;
                    }
                }
                Hist::FlushAck(at) if *at <= p => {
                    floor.copy_from_slice(&latest);
                    since.iter_mut().for_each(|v| v.clear());
                }
                _ => break,
            }
            h += 1;
        }
        dst.advance_to(p);
        md.advance_to(p);
        let draws = if rng.gen_ratio(1, 8) { 4 } else { 1 };
        for d in 0..draws {
            out.crash_points += 1;
            let deep = d == 0 && rng.gen_ratio(1, 10);
            if let Err(v) = check_one(w, &dst, &md, &floor, &since, rng, deep) {
                out.violations
                    .push(format!("seed {seed}, crash before event {p}: {v}"));
                return;
            }
        }
    }
}

fn check_one(
    w: &World,
    dst: &Replayer,
    md: &Replayer,
    floor: &[u64],
    since: &[Vec<u64>],
    rng: &mut ChaCha8Rng,
    deep: bool,
) -> Result<(), String> {
    let d: Arc<dyn BlockDevice> = Arc::new(SimDevice::from_image(dst.crash_image(rng)));
    let md_dev: Arc<dyn BlockDevice> = Arc::new(SimDevice::from_image(md.crash_image(rng)));
    let eng = engine(w.src.clone(), d, md_dev.clone(), &w.geo)
        .map_err(|e| format!("restart failed: {e}"))?;
    let tags = read_tags(&eng, 0, SECTORS)?;
    for (s, t) in tags.iter().enumerate() {
        let ok = match t {
            Some(t) => *t == floor[s] || since[s].contains(t),
            None => false,
        };
        if !ok {
            let what = match t {
                None => "unrecognisable data".to_string(),
                Some(GARBAGE) => "garbage (never-written destination data)".to_string(),
                Some(SOURCE) => "the source's data".to_string(),
                Some(t) => format!("value {t}"),
            };
            return Err(format!(
                "sector {s} (region {}) reads {what}; allowed: {} at the last flush, or one of {:?}",
                s as u64 / RSEC,
                floor[s],
                since[s]
            ));
        }
    }
    if deep {
        // A commit that changes no bitmap block (only the write-cache flag), then
        // a restart: blocks that only the crashed commit's journal covered must
        // have been made whole when the store was opened.
        eng.metadata().set_write_cache(false);
        eng.commit(false).map_err(|e| e.to_string())?;
        let reopened = engine(w.src.clone(), eng.dest().clone(), md_dev.clone(), &w.geo)
            .map_err(|e| format!("restart after a flag-only commit failed: {e}"))?;
        drop(reopened);
        // Finish hydration on the recovered state: nothing visible may change,
        // and the store must open again after those new commits.
        while eng.hydrate_next().map_err(|e| e.to_string())?.is_some() {}
        eng.flush().map_err(|e| e.to_string())?;
        if read_tags(&eng, 0, SECTORS)? != tags {
            return Err("hydrating the recovered clone changed its content".into());
        }
        let again =
            engine(w.src.clone(), eng.dest().clone(), md_dev.clone(), &w.geo).map_err(|e| {
                format!("second restart (after commits on the recovered store) failed: {e}")
            })?;
        if read_tags(&again, 0, SECTORS)? != tags {
            return Err("the second restart reads other content".into());
        }
    }
    Ok(())
}

fn workloads() -> u64 {
    std::env::var("VHOST_CLONE_CRASH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

#[test]
fn crash_suite() {
    let start = Instant::now();
    let n = workloads();
    let (mut points, mut violations) = (0u64, Vec::new());
    // Two threads: the machine has two cores.
    let results: Vec<Outcome> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || {
                    (0..n)
                        .filter(|i| i % 2 == t)
                        .map(|i| run_workload(0xC1 ^ (i << 8), false))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    for o in results {
        points += o.crash_points;
        violations.extend(o.violations);
    }
    println!(
        "crash suite: {n} workloads, {points} crash points, {} violations, {:.1} s",
        violations.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    if n >= 256 {
        assert!(points >= 10_000, "only {points} crash points");
    }
}

#[test]
fn mutation_skipping_the_destination_flush_is_caught() {
    let start = Instant::now();
    let mut found = None;
    let mut points = 0;
    for i in 0..64u64 {
        let o = run_workload(0x5EED ^ (i << 8), true);
        points += o.crash_points;
        if let Some(v) = o.violations.first() {
            found = Some((i + 1, v.clone()));
            break;
        }
    }
    let (runs, v) =
        found.expect("the crash suite did not notice commits that skip the destination flush");
    println!(
        "mutation (no destination flush in commit): caught after {runs} workloads, {points} crash points, {:.1} s: {v}",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn sector_contents_are_self_describing() {
    let a = sector_data(7, 3);
    assert_eq!(decode(&a, 3), Some(7));
    assert_eq!(decode(&a, 4), None, "a misplaced sector is noticed");
    let mut torn = a;
    torn[300] ^= 1;
    assert_eq!(decode(&torn, 3), None);
    assert_eq!(decode(&[0u8; SECTOR], 9), Some(ZERO));
}
