// SPDX-License-Identifier: Apache-2.0

//! The io_uring queue engine (`serve --io-engine uring`) under concurrency, with the real
//! binary and libblkio: 2 queues x 32 requests in flight over a clone that is partly
//! unhydrated, so requests that go to the io_uring (reads and writes of hydrated regions)
//! and barrier requests (flushes, writes and reads of unhydrated regions, which run
//! synchronously after the queue drained) are mixed in every queue.
//!
//! Every request slot owns a disjoint stripe of the disk, so no two requests in flight
//! touch the same sector and the expected content of every sector is known at all times.
//! Each slot reads back what it wrote while the others run; at the end the daemon is
//! stopped (SIGTERM: final commit), restarted with the synchronous engine, and the whole
//! disk must read back as the model says; `check` must pass.
//!
//! Run once with buffered files and, where the temporary directory supports it, once with
//! `--direct` (O_DIRECT: the latency-bound path the engine exists for).

use crate::support::daemon;
use std::mem::MaybeUninit;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::daemon::{run, status_json, text, Daemon};
use crate::support::sectors::{decode, image, write_data, GARBAGE, SOURCE};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u64 = 16 << 20;
const SECTORS: u64 = SIZE / 512;
const QUEUES: usize = 2;
const DEPTH: usize = 32;
const SLOTS: usize = QUEUES * DEPTH;
/// Sectors per slot stripe (256 KiB: 64 regions of 4 KiB).
const STRIPE: u64 = SECTORS / SLOTS as u64;
/// Largest request, in sectors.
const MAX_SECTORS: u64 = 16;

#[derive(Clone, Copy)]
enum Op {
    Write { first: u64, n: u64, tag: u64 },
    Read { first: u64, n: u64 },
    Flush,
}

/// Whether `dir` can take O_DIRECT files (tmpfs on older kernels cannot).
fn direct_ok(dir: &Path) -> bool {
    let p = dir.join("direct-probe");
    std::fs::write(&p, vec![0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

fn run_workload(direct: bool, seed: u64, ops_per_slot: usize) {
    let dir = tempfile::tempdir().unwrap();
    if direct && !direct_ok(dir.path()) {
        eprintln!(
            "skipped: {} does not support O_DIRECT",
            dir.path().display()
        );
        return;
    }
    let src = dir.path().join("golden.img");
    std::fs::write(&src, image(SOURCE, SECTORS)).unwrap();
    let dst = dir.path().join("clone.img");
    std::fs::write(&dst, image(GARBAGE, SECTORS)).unwrap();
    let sock = dir.path().join("clone.sock");
    let (s, d, k) = (
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        sock.to_str().unwrap(),
    );
    let mut args = vec![
        "--source",
        s,
        "--dest",
        d,
        "--socket-path",
        k,
        "--num-queues",
        "2",
        "--no-hydration",
        "--io-engine",
        "uring",
        "--commit-interval",
        "0.05",
        "--region-size",
        "4K",
    ];
    if direct {
        args.push("--direct");
    }
    let daemon = Daemon::start(&args, &sock);

    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", k).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", QUEUES as i32).unwrap();
    let mut started = b.start().unwrap();
    let buf_len = MAX_SECTORS as usize * 512;
    let region = b.alloc_mem_region(SLOTS * buf_len).unwrap();
    b.map_mem_region(&region).unwrap();
    let base = region.addr as *mut u8;
    let slot_buf = |slot: usize| {
        // SAFETY: slot < SLOTS; each slot's buffer is its own buf_len bytes of the
        // mapped region, which `b` keeps alive until the end of this function.
        unsafe { std::slice::from_raw_parts_mut(base.add(slot * buf_len), buf_len) }
    };

    // Expected tag per sector (SOURCE until written).
    let mut model = vec![SOURCE; SECTORS as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut next_tag = 10_000u64;
    let mut pending: Vec<Option<Op>> = vec![None; SLOTS];
    let mut left = vec![ops_per_slot; SLOTS];
    let (mut writes, mut reads, mut flushes) = (0u64, 0u64, 0u64);

    let issue = |slot: usize, q: &mut Blkioq, rng: &mut ChaCha8Rng, next_tag: &mut u64| {
        let stripe = slot as u64 * STRIPE;
        // With --direct the disk has 4 KiB logical blocks (smaller requests are refused):
        // whole blocks only. Otherwise mostly 4 KiB-aligned requests (what O_DIRECT can
        // take straight), some not.
        let n = if direct {
            rng.gen_range(1..=MAX_SECTORS / 8) * 8
        } else {
            rng.gen_range(1..=MAX_SECTORS)
        };
        let first = if direct || rng.gen_bool(0.8) {
            stripe + rng.gen_range(0..(STRIPE - MAX_SECTORS) / 8) * 8
        } else {
            stripe + rng.gen_range(0..STRIPE - n)
        };
        let op = match rng.gen_range(0..10) {
            0 => Op::Flush,
            1..=5 => {
                *next_tag += 1;
                Op::Write {
                    first,
                    n,
                    tag: *next_tag,
                }
            }
            _ => Op::Read { first, n },
        };
        let ptr = slot_buf(slot).as_mut_ptr();
        match op {
            Op::Write { first, n, tag } => {
                slot_buf(slot)[..n as usize * 512].copy_from_slice(&write_data(tag, first, n));
                q.write(first * 512, ptr, n as usize * 512, slot, ReqFlags::empty());
            }
            Op::Read { first, n } => {
                q.read(first * 512, ptr, n as usize * 512, slot, ReqFlags::empty());
            }
            Op::Flush => q.flush(slot, ReqFlags::empty()),
        }
        Some(op)
    };

    for slot in 0..SLOTS {
        let q = &mut started.queues[slot % QUEUES];
        pending[slot] = issue(slot, q, &mut rng, &mut next_tag);
        left[slot] -= 1;
    }
    let t0 = Instant::now();
    while pending.iter().any(Option::is_some) {
        assert!(t0.elapsed() < Duration::from_secs(60), "requests hung");
        for qi in 0..QUEUES {
            let q = &mut started.queues[qi];
            let mut c = [const { MaybeUninit::<Completion>::uninit() }; DEPTH];
            let mut timeout = Duration::from_millis(20);
            let got = match q.do_io(&mut c, 0, Some(&mut timeout), None) {
                Ok(n) => n,
                Err(e) if e.errno().raw_os_error() == libc::ETIME => 0,
                Err(e) => panic!("do_io: {e}"),
            };
            for comp in &c[..got] {
                // SAFETY: do_io initialised the first `got` completions.
                let comp = unsafe { comp.assume_init_ref() };
                let slot = comp.user_data;
                assert_eq!(comp.ret, 0, "slot {slot}: request failed");
                match pending[slot].take().expect("completion of an idle slot") {
                    Op::Write { first, n, tag } => {
                        model[first as usize..(first + n) as usize].fill(tag);
                        writes += 1;
                    }
                    Op::Read { first, n } => {
                        let data = &slot_buf(slot)[..n as usize * 512];
                        for (i, sec) in data.chunks(512).enumerate() {
                            let s = first + i as u64;
                            assert_eq!(
                                decode(sec, s),
                                Some(model[s as usize]),
                                "slot {slot}: sector {s} read back wrong"
                            );
                        }
                        reads += 1;
                    }
                    Op::Flush => flushes += 1,
                }
                if left[slot] > 0 {
                    left[slot] -= 1;
                    pending[slot] = issue(slot, q, &mut rng, &mut next_tag);
                }
            }
        }
    }
    let ctl = dir.path().join("clone.sock.ctl");
    let st = status_json(&ctl);
    drop(started);
    drop(b);
    assert!(daemon.terminate().success(), "daemon did not stop cleanly");

    // Restart with the synchronous engine and read everything back.
    let sock2 = dir.path().join("again.sock");
    let d2 = Daemon::start(
        &[
            "--source",
            s,
            "--dest",
            d,
            "--socket-path",
            sock2.to_str().unwrap(),
            "--no-hydration",
            "--io-engine",
            "sync",
        ],
        &sock2,
    );
    let mut c = daemon::Client::connect(&sock2);
    let chunk = 1 << 20;
    for off in (0..SIZE).step_by(chunk) {
        let (r, data) = c.read(off, chunk);
        assert_eq!(r, 0);
        for (i, sec) in data.chunks(512).enumerate() {
            let s = off / 512 + i as u64;
            assert_eq!(
                decode(sec, s),
                Some(model[s as usize]),
                "after restart: sector {s} wrong"
            );
        }
    }
    drop(c);
    assert!(d2.terminate().success());
    let o = run(&["check", "--source", s, "--dest", d]);
    assert!(o.status.success(), "{}", text(&o));
    eprintln!(
        "io_uring engine (direct={direct}): {writes} writes, {reads} reads verified, {flushes} flushes \
         at {QUEUES}x{DEPTH} in flight; {} regions hydrated by guest writes; whole disk verified after restart",
        st["hydrated_regions"]
    );
}

#[test]
fn uring_engine_concurrent_mixed_workload_buffered() {
    run_workload(false, 0xc0ffee, 60);
}

#[test]
fn uring_engine_concurrent_mixed_workload_direct() {
    run_workload(true, 0xdecade, 60);
}
