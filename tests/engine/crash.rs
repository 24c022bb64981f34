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
//! The second crash kind is a **process death** (design rule 7): the process
//! dies just before an event, the machine keeps running (every write stays in
//! the volatile caches, none is lost), the in-core state is gone except the
//! live region map, and a new process starts on what is left. Then:
//!
//! * every sector written by a completed request reads back exactly (a request
//!   in progress at the death may have left its new value or the old one);
//! * after the new process's first flush and then a power cut, the same holds.
//!
//! Every workload runs with one of the two queue engines: requests one at a
//! time through the engine (`--io-engine sync`), or as the virtio front's
//! io_uring engine issues them (`--io-engine uring`): reads and writes the
//! engine grants a permit for go to an asynchronous queue (emulated over the
//! simulated devices: up to 8 in flight, completed in a seeded random order), and
//! so do writes into an unhydrated region it grants a region copy for (the
//! region's read, then its write with the guest's data, as two steps of one
//! request); anything else waits for the queue to drain. Crashes and deaths then also
//! fall while requests are in flight.
//!
//! `VHOST_CLONE_CRASH_WORKLOADS=N` runs N workloads instead of the default
//! (half with each queue engine).
//! The mutation tests prove the suite can fail, with either queue engine: with
//! the destination flush removed from the commit, with the live map lost at a
//! process death (the in-core bits die with the process), or with a restarted
//! process whose first flush skips the destination, it must find a violation;
//! and with the direct queue, also when direct writes are not counted as
//! destination writes (their permit's accounting), and when a region copied on the
//! queue ([`vhost_clone::engine::RegionCopy`]) is marked before its destination
//! write.
//!
//! Half the workloads (four in a row at a time) run on a version 2 store, whose
//! table of partly written regions has 1 KiB sub-blocks (four per region) and
//! room for [`SLOTS`] regions, so that writes of whole sub-blocks are recorded
//! without a region copy, edge sub-blocks are completed from the source, and a
//! full table falls back to copies. Its mutation: hydration that copies a partly
//! written region whole, over the guest's sub-blocks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::support::sectors::*;
use vhost_clone::engine::{DestFlush, Engine, EngineConfig, RegionCopy};
use vhost_clone::metadata::format::PartialSpec;
use vhost_clone::metadata::live::LiveMap;
use vhost_clone::metadata::{load, Geometry, Metadata};
use vhost_clone::storage::aio::DirectIo;
use vhost_clone::storage::queue::{AsyncQueue, Retired};
use vhost_clone::storage::{BlockDevice, CrashLog, Replayer, SimDevice};

const REGION: u64 = 4096;
const RSEC: u64 = REGION / SECTOR as u64;
const REGIONS: u64 = 32;
/// A short last region of 2 sectors.
const SECTORS: u64 = REGIONS * RSEC + 2;
const OPS: usize = 60;
const DEST: u8 = 0;
const META: u8 = 1;
/// Slots of the table of partly written regions, on version 2 workloads.
const SLOTS: u64 = 6;
/// Its sub-block: two sectors.
const SUB_BLOCK: u64 = 1024;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64),
    Read(u64, u64),
    Discard(u64, u64),
    WriteZeroes(u64, u64),
    Flush,
    Commit,
    Hydrate,
    /// Direct engine: let one request in flight complete, retire what finished.
    Reap,
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
        65..=76 => Op::Flush,
        77..=82 => Op::Commit,
        83..=89 => Op::Reap,
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

/// One request of a workload, for the process-death check.
struct OpRec {
    /// Log index when it started.
    start: usize,
    /// Log index when it completed (returned, or was retired from the queue).
    end: usize,
    /// The sector values it writes.
    vals: Vec<(u64, u64)>,
}

/// How the workload issues the guest's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueEngine {
    /// Each request through the engine's calls, one at a time (`--io-engine sync`).
    Sync,
    /// As the virtio front's io_uring engine does (`--io-engine uring`): reads and
    /// writes the engine grants a permit for go to an asynchronous queue, up to
    /// [`DEPTH`] in flight, completed in a seeded random order by the emulated
    /// queue; anything else first waits for the queue to drain (a barrier).
    Direct,
}

/// Requests in flight at most with [`QueueEngine::Direct`].
const DEPTH: usize = 8;

/// What the engine granted a request in flight.
enum ReqIo<'e> {
    /// A read or write of the request's buffer.
    Direct(DirectIo<'e>),
    /// A write into an unhydrated region: the region's copy (read, then written with
    /// the request's data over it).
    Copy(RegionCopy<'e>),
}

/// A direct request in flight.
struct Req<'e> {
    io: ReqIo<'e>,
    /// Its index in the workload's requests.
    op: usize,
    first: u64,
    n: u64,
    /// The data to write, or the buffer read into (it must not move meanwhile: the
    /// queue holds a pointer into it).
    buf: Vec<u8>,
    /// For a read: the value every sector must read as.
    expect: Option<Vec<u64>>,
}

/// The asynchronous queue and what is in flight on it.
struct Flight<'e> {
    q: AsyncQueue,
    reqs: HashMap<u64, Req<'e>>,
    eng: &'e Engine,
    /// The live region map after each region copy's mark, with the log index then
    /// (moved into the workload's record before its next snapshot).
    marks: Vec<(usize, Vec<u64>)>,
}

impl<'e> Flight<'e> {
    fn overlaps(&self, first: u64, n: u64) -> bool {
        self.reqs
            .values()
            .any(|r| r.first < first + n && first < r.first + r.n)
    }

    /// Starts a direct request over `req.buf`, or the region copy that writes it.
    fn start(&mut self, tag: u64, mut req: Req<'e>) {
        let (off, len) = (req.first * SECTOR as u64, req.n * SECTOR as u64);
        let data = libc::iovec {
            iov_base: req.buf.as_mut_ptr().cast(),
            iov_len: req.buf.len(),
        };
        match &mut req.io {
            ReqIo::Direct(permit) => {
                let (write, target) = (permit.is_write(), permit.target().clone());
                self.q.next_iov().push(data);
                // SAFETY: the buffer is owned by the request kept in `self.reqs` until
                // it is retired (a Vec's heap buffer does not move with the Vec), and
                // nothing reads or writes it meanwhile; the target is a simulated
                // device the queue holds.
                unsafe { self.q.start(tag, &target, write, off, len) };
            }
            ReqIo::Copy(copy) => {
                let (source, dest, start) =
                    (copy.source().clone(), copy.dest().clone(), copy.start());
                let read = copy.read_len();
                let buf = copy.buffer();
                let mut then = Vec::new();
                copy.write_iovecs(&mut then, |v| {
                    v.push(data);
                    true
                });
                let total: u64 = then.iter().map(|v| v.iov_len as u64).sum();
                match read {
                    Some(rlen) => {
                        self.q.next_iov().push(libc::iovec {
                            iov_base: buf.cast(),
                            iov_len: rlen as usize,
                        });
                        // SAFETY: as above, for the request's buffer and the copy's,
                        // which the copy owns and the request keeps until retired.
                        unsafe {
                            self.q.start_read_then_write(
                                tag, &source, start, rlen, &dest, start, total, &then,
                            )
                        };
                    }
                    None => {
                        self.q.next_iov().extend_from_slice(&then);
                        // SAFETY: as above.
                        unsafe { self.q.start(tag, &dest, true, start, total) };
                    }
                }
            }
        }
        self.reqs.insert(tag, req);
    }

    /// Retires what finished, in order: finishes each permit, records the request's
    /// end, and checks what a read returned.
    fn retire(&mut self, log: &CrashLog, ops: &mut [OpRec], bad: &mut Vec<String>) {
        while let Some(Retired { tag, result, .. }) = self.q.next_retired() {
            let Some(r) = self.reqs.remove(&tag) else {
                bad.push(format!("the queue retired an unknown request {tag}"));
                continue;
            };
            let marked = match r.io {
                ReqIo::Direct(permit) => {
                    permit.finish(result.is_ok());
                    Ok(())
                }
                ReqIo::Copy(copy) => {
                    let marked = copy.finish(result.is_ok());
                    let live = self.eng.metadata().live_map().snapshot();
                    self.marks.push((log.len(), live));
                    marked
                }
            };
            ops[r.op].end = log.len();
            if let Err(e) = marked {
                bad.push(format!("region copy {tag} could not mark its region: {e}"));
            }
            if let Err(e) = result {
                bad.push(format!("direct request {tag} failed: errno {e}"));
                continue;
            }
            if let Some(want) = &r.expect {
                for (i, b) in r.buf.chunks(SECTOR).enumerate() {
                    let s = r.first + i as u64;
                    let got = decode(b, s);
                    if got != Some(want[i]) {
                        bad.push(format!(
                            "direct read of sector {s} gave {got:?}, expected {}",
                            want[i]
                        ));
                    }
                }
            }
        }
    }

    /// Lets one request complete, then retires what finished.
    fn reap(&mut self, log: &CrashLog, ops: &mut [OpRec], bad: &mut Vec<String>) {
        if !self.q.is_idle() {
            self.q.wait();
            self.retire(log, ops, bad);
        }
    }

    /// Waits until nothing is in flight (a barrier).
    fn drain(&mut self, log: &CrashLog, ops: &mut [OpRec], bad: &mut Vec<String>) {
        while !self.q.is_idle() {
            self.reap(log, ops, bad);
        }
    }
}

/// Which crash kinds to check, and which mutation of the restart to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kinds {
    /// Power cuts and process deaths, nothing mutated.
    Both,
    /// Power cuts only (the commit mutation).
    PowerCut,
    /// Process deaths whose restart loses the live map.
    DeathLosingLiveMap,
    /// Process deaths whose restarted process believes the destination flushed.
    DeathAssumingFlushed,
}

#[derive(Default, Debug)]
struct Outcome {
    crash_points: u64,
    death_points: u64,
    /// Requests that went to the asynchronous queue.
    direct: u64,
    /// Of them, writes into unhydrated regions copied on the queue.
    copies: u64,
    /// Most requests in flight on it at once.
    max_in_flight: usize,
    /// Writes recorded as sub-blocks of partly written regions.
    partial_writes: u64,
    violations: Vec<String>,
}

/// A deliberate break of the code under test, to show that the suite fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    None,
    /// The commit does not flush the destination before the metadata.
    NoDestFlushInCommit,
    /// Direct writes are not counted as destination writes, so a flush after
    /// them may skip the destination.
    UncountedDirectWrites,
    /// A region copy on the queue marks its region when it is granted, before its
    /// destination write.
    EarlyCopyBits,
    /// Hydration copies partly written regions whole, over the guest's sub-blocks.
    WholeCopies,
}

struct World {
    log: Arc<CrashLog>,
    src: Arc<SimDevice>,
    dst_init: Vec<u8>,
    md_init: Vec<u8>,
    geo: Geometry,
    eng: Engine,
}

/// Whether workload `seed` runs on a version 2 store (a table of partly written
/// regions): four workloads in a row with, four without.
fn with_table(seed: u64) -> bool {
    (seed >> 10) & 1 == 0
}

fn world(mutation: Mutation, table: bool) -> World {
    let geo = Geometry::new(SECTORS * SECTOR as u64, REGION).unwrap();
    let log = CrashLog::new();
    let src = Arc::new(SimDevice::from_image(image(SOURCE, SECTORS)).into_read_only());
    let dst_init = image(GARBAGE, SECTORS);
    let spec = if table {
        PartialSpec {
            slots: SLOTS,
            sub_block: SUB_BLOCK,
        }
    } else {
        PartialSpec::none(&geo)
    };
    let md_init = formatted_metadata_with(&geo, spec);
    let dst = Arc::new(SimDevice::from_image(dst_init.clone()).with_log(log.clone(), DEST));
    let mdd = Arc::new(SimDevice::from_image(md_init.clone()).with_log(log.clone(), META));
    let eng = engine(src.clone(), dst, mdd, &geo).unwrap();
    match mutation {
        Mutation::None => {}
        Mutation::NoDestFlushInCommit => eng.metadata().set_skip_dest_flush(true),
        Mutation::UncountedDirectWrites => eng.set_uncounted_direct_writes(true),
        Mutation::EarlyCopyBits => eng.set_early_copy_bits(true),
        Mutation::WholeCopies => eng.set_whole_copies(true),
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

/// What a workload recorded, for the crash checks.
#[derive(Default)]
struct Record {
    /// What the power-cut model learns, in log order.
    hist: Vec<Hist>,
    /// Every request, in issue order.
    ops: Vec<OpRec>,
    /// The live region map after each step, with the log index then.
    lives: Vec<(usize, Vec<u64>)>,
}

fn run_workload(seed: u64, mutation: Mutation, kinds: Kinds, qe: QueueEngine) -> Outcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let table = with_table(seed) || mutation == Mutation::WholeCopies;
    let w = world(mutation, table);
    let mut out = Outcome::default();
    let mut cur = vec![SOURCE; SECTORS as usize];
    let mut rec = Record::default();
    let mut flight = (qe == QueueEngine::Direct).then(|| Flight {
        q: AsyncQueue::emulated(DEPTH, seed),
        reqs: HashMap::new(),
        eng: &w.eng,
        marks: Vec::new(),
    });
    let mut bad = Vec::new();
    let mut next_tag = 100u64;
    let live = |w: &World| w.eng.metadata().live_map().snapshot();
    for i in 0..OPS {
        let op = gen_op(&mut rng);
        if let Some(f) = flight.as_mut() {
            // Marks made while the last step retired requests, before any later
            // snapshot.
            rec.lives.append(&mut f.marks);
            // A read or write the engine grants goes to the queue; not one that
            // overlaps a request in flight (the guest orders those itself).
            if let Op::Write(a, n) | Op::Read(a, n) = op {
                if f.overlaps(a, n) {
                    f.drain(&w.log, &mut rec.ops, &mut bad);
                }
                while !f.q.has_room() {
                    f.reap(&w.log, &mut rec.ops, &mut bad);
                }
                let write = matches!(op, Op::Write(..));
                let (off, len) = (a * SECTOR as u64, n * SECTOR as u64);
                let io = match w.eng.direct_io(write, off, len) {
                    Some(permit) => Some(ReqIo::Direct(permit)),
                    None if write => w.eng.region_copy(off, len).map(ReqIo::Copy),
                    None => None,
                };
                if let Some(io) = io {
                    out.copies += u64::from(matches!(io, ReqIo::Copy(_)));
                    let at = w.log.len();
                    let tag = next_tag;
                    next_tag += 1;
                    let (buf, expect, vals) = if write {
                        let vals: Vec<(u64, u64)> = (a..a + n).map(|s| (s, tag)).collect();
                        rec.hist.push(Hist::Issue(at, vals.clone()));
                        (a..a + n).for_each(|s| cur[s as usize] = tag);
                        (write_data(tag, a, n), None, vals)
                    } else {
                        let want = cur[a as usize..(a + n) as usize].to_vec();
                        (vec![0u8; len as usize], Some(want), Vec::new())
                    };
                    rec.ops.push(OpRec {
                        start: at,
                        end: usize::MAX,
                        vals,
                    });
                    let req = Req {
                        io,
                        op: rec.ops.len() - 1,
                        first: a,
                        n,
                        buf,
                        expect,
                    };
                    f.start(tag, req);
                    // The live map as the grant left it (a copy must not have marked
                    // its region yet: the early-mark mutation shows here), after the
                    // marks of the copies retired while making room for it.
                    rec.lives.append(&mut f.marks);
                    rec.lives.push((w.log.len(), live(&w)));
                    out.direct += 1;
                    out.max_in_flight = out.max_in_flight.max(f.reqs.len());
                    continue;
                }
            }
            match op {
                Op::Reap => {
                    f.reap(&w.log, &mut rec.ops, &mut bad);
                    rec.lives.append(&mut f.marks);
                    rec.lives.push((w.log.len(), live(&w)));
                    continue;
                }
                // Background work, not a guest request: no barrier.
                Op::Commit | Op::Hydrate => {}
                // Anything else runs once the queue is idle.
                _ => f.drain(&w.log, &mut rec.ops, &mut bad),
            }
            rec.lives.append(&mut f.marks);
        }
        let at = w.log.len();
        let issued = rec.hist.len();
        let res = match op {
            Op::Write(a, n) => {
                let tag = next_tag;
                next_tag += 1;
                let vals: Vec<(u64, u64)> = (a..a + n).map(|s| (s, tag)).collect();
                rec.hist.push(Hist::Issue(at, vals));
                (a..a + n).for_each(|s| cur[s as usize] = tag);
                w.eng
                    .write_at(&write_data(tag, a, n), a * SECTOR as u64)
                    .map_err(|e| e.to_string())
            }
            Op::WriteZeroes(a, n) => {
                rec.hist
                    .push(Hist::Issue(at, (a..a + n).map(|s| (s, ZERO)).collect()));
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
                rec.hist.push(Hist::Issue(at, vals));
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
                    rec.hist.push(Hist::FlushAck(w.log.len()));
                }
                r
            }
            Op::Commit => w
                .eng
                .commit(DestFlush::IfRecording)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Op::Hydrate => w
                .eng
                .hydrate_batch(rng.gen_range(1..5), rng.gen_bool(0.3))
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Op::Reap => Ok(()),
        };
        if let Err(e) = res {
            out.violations
                .push(format!("seed {seed}: op {i} {op:?} failed: {e}"));
        }
        let vals = match rec.hist.get(issued) {
            Some(Hist::Issue(_, v)) => v.clone(),
            _ => Vec::new(),
        };
        rec.ops.push(OpRec {
            start: at,
            end: w.log.len(),
            vals,
        });
        rec.lives.push((w.log.len(), live(&w)));
    }
    if let Some(f) = flight.as_mut() {
        f.drain(&w.log, &mut rec.ops, &mut bad);
        rec.lives.append(&mut f.marks);
        rec.lives.push((w.log.len(), live(&w)));
    }
    drop(flight);
    out.partial_writes = w.eng.counters().partial_writes;
    out.violations.extend(
        bad.into_iter()
            .map(|v| format!("seed {seed} ({qe:?}): {v}")),
    );
    if kinds == Kinds::Both || kinds == Kinds::PowerCut {
        check_crashes(seed, &w, &rec.hist, &mut rng, &mut out);
    }
    if kinds != Kinds::PowerCut && out.violations.is_empty() {
        check_deaths(seed, &w, &rec, kinds, &mut rng, &mut out);
    }
    out
}

/// A process death just before every event of the run (see the module docs).
fn check_deaths(
    seed: u64,
    w: &World,
    rec: &Record,
    kinds: Kinds,
    rng: &mut ChaCha8Rng,
    out: &mut Outcome,
) {
    let mut points = w.log.boundaries();
    points.push(w.log.len());
    let mut dst = Replayer::new(&w.log, DEST, w.dst_init.clone());
    let mut md = Replayer::new(&w.log, META, w.md_init.clone());
    // Requests in the order they completed; requests that touch the same sectors
    // never overlap in time, so this order is theirs.
    let mut by_end: Vec<&OpRec> = rec.ops.iter().collect();
    by_end.sort_by_key(|o| o.end);
    // Sector values once the requests completed before the death.
    let mut done_vals = vec![SOURCE; SECTORS as usize];
    let (mut done, mut l) = (0, 0);
    let empty = vec![0u64; w.eng.metadata().live_map().snapshot().len()];
    let mut live_bits = &empty;
    for &p in &points {
        while done < by_end.len() && by_end[done].end <= p {
            for &(s, t) in &by_end[done].vals {
                done_vals[s as usize] = t;
            }
            done += 1;
        }
        while l < rec.lives.len() && rec.lives[l].0 <= p {
            live_bits = &rec.lives[l].1;
            l += 1;
        }
        // Requests in progress at the death: started, not completed (with the
        // direct engine, up to DEPTH of them, on distinct sectors).
        let in_progress: Vec<(u64, u64)> = rec
            .ops
            .iter()
            .filter(|o| o.start <= p && p < o.end)
            .flat_map(|o| o.vals.iter().copied())
            .collect();
        dst.advance_to(p);
        md.advance_to(p);
        out.death_points += 1;
        if let Err(v) = check_death(
            w,
            &dst,
            &md,
            live_bits,
            &done_vals,
            &in_progress,
            kinds,
            rng,
        ) {
            out.violations
                .push(format!("seed {seed}, process death before event {p}: {v}"));
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn check_death(
    w: &World,
    dst: &Replayer,
    md: &Replayer,
    live_bits: &[u64],
    done_vals: &[u64],
    in_progress: &[(u64, u64)],
    kinds: Kinds,
    rng: &mut ChaCha8Rng,
) -> Result<(), String> {
    let d = Arc::new(dst.survivor());
    let m = Arc::new(md.survivor());
    let live = if kinds == Kinds::DeathLosingLiveMap {
        LiveMap::anonymous(w.geo.nr_regions(), w.eng.metadata().partial_spec().slots)
    } else {
        LiveMap::from_snapshot(live_bits, w.geo.nr_regions())
    };
    let md_dev: Arc<dyn BlockDevice> = m.clone();
    let loaded = load(md_dev.as_ref(), Some(&w.geo)).map_err(|e| format!("restart failed: {e}"))?;
    let meta =
        Metadata::from_loaded(md_dev, loaded, live).map_err(|e| format!("restart failed: {e}"))?;
    let eng = Engine::new(
        Some(w.src.clone()),
        d.clone(),
        Arc::new(meta),
        EngineConfig::default(),
    )
    .map_err(|e| format!("restart failed: {e}"))?;
    if kinds == Kinds::DeathAssumingFlushed {
        eng.assume_dest_flushed();
    }
    let allowed = |s: usize, t: Option<u64>| {
        t == Some(done_vals[s])
            || in_progress
                .iter()
                .any(|&(x, v)| x as usize == s && Some(v) == t)
    };
    let check = |eng: &Engine, when: &str| -> Result<(), String> {
        let tags = read_tags(eng, 0, SECTORS)?;
        match (0..SECTORS as usize).find(|&s| !allowed(s, tags[s])) {
            Some(s) => Err(format!(
                "{when}, sector {s} (region {}) reads {:?}; the completed writes left {}",
                s as u64 / RSEC,
                tags[s],
                done_vals[s]
            )),
            None => Ok(()),
        }
    };
    check(&eng, "after the restart")?;
    // The guest's first flush after the restart, then a power cut.
    eng.flush()
        .map_err(|e| format!("first flush after the restart failed: {e}"))?;
    drop(eng);
    let d2: Arc<dyn BlockDevice> = Arc::new(SimDevice::from_image(d.crash(rng)));
    let m2: Arc<dyn BlockDevice> = Arc::new(SimDevice::from_image(m.crash(rng)));
    let eng = engine(w.src.clone(), d2, m2, &w.geo)
        .map_err(|e| format!("restart after the first flush and a power cut failed: {e}"))?;
    check(&eng, "after the restart, its first flush and a power cut")
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
        eng.commit(DestFlush::IfRecording)
            .map_err(|e| e.to_string())?;
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

/// The queue engine of workload `i`: alternating, so that each thread runs both.
fn queue_engine(i: u64) -> QueueEngine {
    if (i / 2) % 2 == 0 {
        QueueEngine::Sync
    } else {
        QueueEngine::Direct
    }
}

#[test]
fn crash_suite() {
    let start = Instant::now();
    let n = workloads();
    let (mut points, mut deaths, mut violations) = (0u64, 0u64, Vec::new());
    // Two threads: the machine has two cores.
    let results: Vec<(QueueEngine, Outcome)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2u64)
            .map(|t| {
                s.spawn(move || {
                    (0..n)
                        .filter(|i| i % 2 == t)
                        .map(|i| {
                            let qe = queue_engine(i);
                            (
                                qe,
                                run_workload(0xC1 ^ (i << 8), Mutation::None, Kinds::Both, qe),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let direct = results
        .iter()
        .filter(|(qe, _)| *qe == QueueEngine::Direct)
        .count();
    let (mut requests, mut copies, mut depth, mut partial) = (0, 0, 0, 0);
    for (_, o) in results {
        partial += o.partial_writes;
        requests += o.direct;
        copies += o.copies;
        depth = depth.max(o.max_in_flight);
        points += o.crash_points;
        deaths += o.death_points;
        violations.extend(o.violations);
    }
    println!(
        "crash suite: {n} workloads ({} sync, {direct} direct: {requests} requests through the queue, {copies} of them region copies, up to {depth} in flight; {partial} writes of sub-blocks), {points} power-cut points, {deaths} process-death points, {} violations, {:.1} s",
        n as usize - direct,
        violations.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    if n >= 256 {
        assert!(requests >= 1000, "only {requests} direct requests");
        assert!(copies >= 200, "only {copies} region copies on the queue");
        assert!(partial >= 500, "only {partial} writes of sub-blocks");
        assert!(depth >= 4, "never more than {depth} requests in flight");
        assert!(points >= 10_000, "only {points} crash points");
        assert!(deaths >= 10_000, "only {deaths} process-death points");
    }
}

/// Runs mutated workloads until one finds a violation, and prints it.
fn mutation(what: &str, seed: u64, m: Mutation, kinds: Kinds, qe: QueueEngine) {
    let start = Instant::now();
    let mut found = None;
    let mut points = 0;
    for i in 0..64u64 {
        let o = run_workload(seed ^ (i << 8), m, kinds, qe);
        points += o.crash_points + o.death_points;
        if let Some(v) = o.violations.first() {
            found = Some((i + 1, v.clone()));
            break;
        }
    }
    let (runs, v) =
        found.unwrap_or_else(|| panic!("the crash suite did not notice {what} ({qe:?})"));
    println!(
        "mutation ({what}, {qe:?} queue): caught after {runs} workloads, {points} crash points, {:.1} s: {v}",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn mutation_skipping_the_destination_flush_is_caught() {
    for qe in [QueueEngine::Sync, QueueEngine::Direct] {
        mutation(
            "no destination flush in commit",
            0x5EED,
            Mutation::NoDestFlushInCommit,
            Kinds::PowerCut,
            qe,
        );
    }
}

/// The direct engine's writes bypass the engine's write path; if their permits
/// did not count them, a flush after only direct writes would skip the
/// destination and a power cut would lose them.
#[test]
fn mutation_uncounted_direct_writes_is_caught() {
    mutation(
        "direct writes not counted as destination writes",
        0xD1EC,
        Mutation::UncountedDirectWrites,
        Kinds::PowerCut,
        QueueEngine::Direct,
    );
}

/// A region copied on the queue must be marked only once its destination write
/// is done: marked at the grant, a process death while the copy is in flight (or a
/// read meanwhile) finds the region's bit set over data that never arrived.
#[test]
fn mutation_marking_a_copied_region_early_is_caught() {
    mutation(
        "region copy marked before its destination write",
        0xEA21,
        Mutation::EarlyCopyBits,
        Kinds::Both,
        QueueEngine::Direct,
    );
}

/// Hydration must copy only what a partly written region's mask lacks: copied
/// whole, the guest's sub-blocks read as the source's afterwards.
#[test]
fn mutation_hydration_over_written_sub_blocks_is_caught() {
    for qe in [QueueEngine::Sync, QueueEngine::Direct] {
        mutation(
            "hydration copies partly written regions whole",
            0x5B5B,
            Mutation::WholeCopies,
            Kinds::Both,
            qe,
        );
    }
}

#[test]
fn mutation_losing_uncommitted_bits_at_a_process_death_is_caught() {
    for qe in [QueueEngine::Sync, QueueEngine::Direct] {
        mutation(
            "in-core bits lost at a process death",
            0xDEAD,
            Mutation::None,
            Kinds::DeathLosingLiveMap,
            qe,
        );
    }
}

#[test]
fn mutation_skipping_the_first_flush_after_a_restart_is_caught() {
    for qe in [QueueEngine::Sync, QueueEngine::Direct] {
        mutation(
            "first flush after a restart skips the destination",
            0xF1F1,
            Mutation::None,
            Kinds::DeathAssumingFlushed,
            qe,
        );
    }
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
