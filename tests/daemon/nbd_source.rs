//! An NBD source (issue 14) against real servers and hostile ones: our client
//! (`storage::nbd::NbdDevice`) reads what qemu-nbd and nbdkit serve over unix
//! sockets and TCP; `vhost-clone serve --source nbd...` hydrates a sparse
//! export to an identical, still sparse destination (and without block
//! status); slow servers time out within `--source-timeout`, failing ones get
//! retried, a server killed and restarted is reconnected to (a request in
//! flight either completes with the right bytes or fails after the timeout),
//! a restarted server with another export size is refused; bad exports and
//! size mismatches are refused before anything is written; and a scripted
//! server that breaks the protocol in each way gets a clear error, no panic
//! and no hang. Servers come from tests/nbd (the one place that spawns them).

use crate::support::daemon;
use crate::support::nbd;
use crate::support::sectors;
use crate::support::{wait_until, within};
use std::io::IoSliceMut;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::support::daemon::{run, status_json, text, Client, Daemon};
use crate::support::nbd::{Addr, Hello, Req, Scripted, Server};
use vhost_clone::engine::hydrator::{HydrationControl, Hydrator, HydratorTiming};
use vhost_clone::metadata::Geometry;
use vhost_clone::storage::nbd::{proto, NbdDevice};
use vhost_clone::storage::{BlockDevice, SimDevice, StorageError};

const MIB: u64 = 1 << 20;

/// The error and its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    vhost_clone::error_chain(e)
}

/// Reads `len` bytes at `off` from `dev`, in a thread, with a hang limit.
fn read(
    dev: &Arc<NbdDevice>,
    off: u64,
    len: usize,
    limit: Duration,
) -> (Result<Vec<u8>, String>, Duration) {
    let dev = dev.clone();
    within(limit, move || {
        let mut b = vec![0u8; len];
        dev.read_at(&mut b, off).map(|_| b).map_err(|e| chain(&e))
    })
}

/// A file of `size` bytes of data that differs everywhere; returns its content.
fn data_file(path: &Path, size: u64) -> Vec<u8> {
    nbd::sparse_file(path, size, &[(0, size)])
}

/// The extents of the sparse test export: a few MiB of data in 64 MiB.
const SPARSE: u64 = 64 * MIB;
const SPARSE_DATA: &[(u64, u64)] = &[
    (0, MIB),
    (10 * MIB, 2 * MIB),
    (45 * MIB + 65536, 196_608),
    (SPARSE - 131_072, 131_072),
];

/// Checks `dev`'s block status against `content`: what it calls holes is
/// zero, and it found them (well under half the export is called data).
fn check_extents(dev: &NbdDevice, content: &[u8], what: &str) {
    let size = content.len() as u64;
    let ext = dev
        .data_extents(0, size)
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: no block status"));
    let mut pos = 0;
    let mut data = 0;
    for &(a, b) in ext.iter().chain([(size, size)].iter()) {
        assert!(a >= pos && b >= a && b <= size, "{what}: extents {ext:?}");
        assert!(
            content[pos as usize..a as usize].iter().all(|&x| x == 0),
            "{what}: data in the hole {pos}..{a}"
        );
        data += b - a;
        pos = b;
    }
    assert!(data < size / 2, "{what}: {data} bytes of data in {ext:?}");
    // Part of the export, starting and ending inside data and holes.
    let part = dev.data_extents(10 * MIB + 4096, 8 * MIB).unwrap().unwrap();
    assert_eq!(
        part.first().map(|e| e.0),
        Some(10 * MIB + 4096),
        "{what}: {part:?}"
    );
    assert!(
        part.iter()
            .all(|&(a, b)| a >= 10 * MIB && b <= 18 * MIB + 4096),
        "{what}: {part:?}"
    );
}

#[test]
fn reads_and_block_status_equal_the_file_through_qemu_nbd_and_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = Arc::new(nbd::sparse_file(&file, SPARSE, SPARSE_DATA));
    let f = file.to_str().unwrap();
    let servers = [
        (
            "qemu-nbd unix",
            Server::qemu_nbd(&file, Addr::Unix(dir.path().join("q.sock")), "golden"),
            1,
        ),
        (
            "qemu-nbd tcp",
            Server::qemu_nbd(&file, Addr::free_tcp(), "golden"),
            1,
        ),
        (
            "nbdkit unix",
            Server::nbdkit(Addr::Unix(dir.path().join("k.sock")), &["file", f]),
            4,
        ),
        (
            "nbdkit tcp",
            Server::nbdkit(Addr::free_tcp(), &["file", f]),
            4,
        ),
    ];
    let threads: Vec<_> = servers
        .iter()
        .map(|(what, s, conns)| {
            let (uri, content, what, conns) = (s.uri(), content.clone(), what.to_string(), *conns);
            std::thread::spawn(move || {
                let dev = nbd::connect(&uri, Duration::from_secs(5));
                assert_eq!(dev.size(), SPARSE, "{what}");
                let st = dev.status();
                assert_eq!(
                    (st.state.as_str(), st.block_status, st.max_connections),
                    ("connected", true, conns),
                    "{what}: {st:?}"
                );
                // All of it in one call: split into parts over the connections.
                let mut all = vec![0u8; SPARSE as usize];
                dev.read_at(&mut all, 0).unwrap();
                assert!(all == *content, "{what}: whole read differs");
                // Unaligned reads, some across a part boundary.
                let mut rng = ChaCha8Rng::seed_from_u64(14);
                for _ in 0..40 {
                    let len = rng.gen_range(1..3 * MIB as usize);
                    let off = rng.gen_range(0..SPARSE - len as u64);
                    let mut b = vec![0u8; len];
                    dev.read_at(&mut b, off).unwrap();
                    assert!(
                        b[..] == content[off as usize..off as usize + len],
                        "{what}: {len} at {off}"
                    );
                }
                // A vectored read straddling 2 MiB, into odd-sized buffers.
                let (mut x, mut y, mut z) = (
                    vec![0u8; 1000],
                    vec![0u8; 2 * MIB as usize + 7],
                    vec![0u8; 333],
                );
                let off = MIB - 999;
                dev.read_vectored_at(
                    &mut [
                        IoSliceMut::new(&mut x),
                        IoSliceMut::new(&mut y),
                        IoSliceMut::new(&mut z),
                    ],
                    off,
                )
                .unwrap();
                let got = [x, y, z].concat();
                assert!(
                    got[..] == content[off as usize..off as usize + got.len()],
                    "{what}: vectored"
                );
                // The end, and past it.
                let mut b = vec![0u8; 4096];
                dev.read_at(&mut b, SPARSE - 4096).unwrap();
                assert!(b[..] == content[content.len() - 4096..]);
                assert!(matches!(
                    dev.read_at(&mut b, SPARSE - 4095),
                    Err(StorageError::OutOfRange { .. })
                ));
                assert!(matches!(
                    dev.write_at(&b, 0),
                    Err(StorageError::ReadOnly { .. })
                ));
                check_extents(&dev, &content, &what);
                assert_eq!(dev.status().disconnects, 0, "{what}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A clone's files in a directory: destination, its sockets, a runtime dir.
struct CloneDir {
    _dir: tempfile::TempDir,
    dst: PathBuf,
    meta: PathBuf,
    sock: PathBuf,
    ctl: PathBuf,
    run: PathBuf,
}

fn clone_dir() -> CloneDir {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::DirBuilder::new().mode(0o700).create(&run).unwrap();
    CloneDir {
        dst: dir.path().join("clone.img"),
        meta: dir.path().join("clone.img.meta"),
        sock: dir.path().join("clone.img.sock"),
        ctl: dir.path().join("clone.img.sock.ctl"),
        run,
        _dir: dir,
    }
}

impl CloneDir {
    fn serve(&self, source: &str, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "--source",
            source,
            "--dest",
            self.dst.to_str().unwrap(),
            "--runtime-dir",
            self.run.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args, &self.sock)
    }

    /// `serve ARGS` run to its end (a refused start).
    fn serve_refused(&self, source: &str, extra: &[&str]) -> std::process::Output {
        let mut args = vec![
            "serve",
            "--source",
            source,
            "--dest",
            self.dst.to_str().unwrap(),
            "--runtime-dir",
            self.run.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut child = std::process::Command::new(daemon::BIN)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A start that is not refused serves forever: that is a failure, not a hang.
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let o = child.wait_with_output().unwrap();
                panic!("serve {args:?} was not refused: {}", text(&o));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }

    fn wait_complete(&self, limit: Duration) {
        let t = Instant::now();
        loop {
            let s = status_json(&self.ctl);
            if s["complete"] == true {
                return;
            }
            assert!(t.elapsed() < limit, "hydration did not complete: {s}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn serve_hydrates_each_server_to_an_identical_sparse_destination() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = Arc::new(nbd::sparse_file(&file, SPARSE, SPARSE_DATA));
    let data: u64 = SPARSE_DATA.iter().map(|e| e.1).sum();
    let f = file.to_str().unwrap();
    // (what, server, block status offered)
    let servers = [
        (
            "qemu-nbd unix",
            Server::qemu_nbd(&file, Addr::Unix(dir.path().join("q.sock")), "golden"),
            true,
        ),
        (
            "qemu-nbd tcp",
            Server::qemu_nbd(&file, Addr::free_tcp(), "golden"),
            true,
        ),
        (
            "nbdkit unix",
            Server::nbdkit(Addr::Unix(dir.path().join("k.sock")), &["file", f]),
            true,
        ),
        (
            "nbdkit without block status",
            Server::nbdkit(
                Addr::Unix(dir.path().join("n.sock")),
                &["--filter=noextents", "file", f],
            ),
            false,
        ),
    ];
    let threads: Vec<_> = servers
        .iter()
        .map(|(what, s, sparse)| {
            let (uri, content, what, sparse) =
                (s.uri(), content.clone(), what.to_string(), *sparse);
            std::thread::spawn(move || {
                let c = clone_dir();
                let d = c.serve(&uri, &["--source-timeout", "5"]);
                c.wait_complete(Duration::from_secs(30));
                let s = status_json(&c.ctl);
                assert_eq!(s["source"], uri.as_str(), "{what}");
                assert_eq!(s["mode"], "rw", "{what}");
                assert!(d.terminate().success(), "{what}");
                assert!(
                    std::fs::read(&c.dst).unwrap() == *content,
                    "{what}: destination differs"
                );
                let allocated = std::fs::metadata(&c.dst).unwrap().blocks() * 512;
                if sparse {
                    assert!(
                        allocated <= data + 2 * MIB,
                        "{what}: {allocated} bytes allocated for {data} of data"
                    );
                }
                // `check` agrees, against the export.
                let o = run(&["check", "--source", &uri, "--dest", c.dst.to_str().unwrap()]);
                assert!(o.status.success(), "{what}: {}", text(&o));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_slow_server_times_out_within_the_timeout_and_a_slower_one_within_it_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = nbd::sparse_file(&file, 16 * MIB, &[(0, 4 * MIB), (12 * MIB, 4 * MIB)]);
    let f = file.to_str().unwrap();
    let slow = Server::nbdkit(
        Addr::Unix(dir.path().join("slow.sock")),
        &[
            "--filter=delay",
            "file",
            f,
            "delay-read=4",
            "delay-extents=4",
        ],
    );
    let ok = Server::nbdkit(
        Addr::Unix(dir.path().join("ok.sock")),
        &["--filter=delay", "file", f, "delay-read=300ms"],
    );
    let second = Duration::from_secs(1);
    let ok_dev = Arc::new(nbd::connect(&ok.uri(), second));
    let slow_dev = Arc::new(nbd::connect(&slow.uri(), second));
    // The slower server: every read answers late but within the timeout.
    let ok_reads = {
        let (dev, content) = (ok_dev.clone(), content.clone());
        std::thread::spawn(move || {
            for off in [0, 13 * MIB + 5] {
                let (r, took) = read(&dev, off, 70_000, Duration::from_secs(5));
                assert_eq!(r.unwrap(), content[off as usize..off as usize + 70_000]);
                assert!(took >= Duration::from_millis(290), "{took:?}");
            }
            assert_eq!(dev.status().timeouts, 0);
        })
    };
    // The slow one: a read fails with TimedOut after about the timeout.
    let dev = slow_dev.clone();
    let (r, took) = within(Duration::from_secs(6), move || {
        let mut b = vec![0u8; 4096];
        dev.read_at(&mut b, 8192)
    });
    let e = r.unwrap_err();
    match &e {
        StorageError::Io { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{}", chain(&e))
        }
        _ => panic!("{}", chain(&e)),
    }
    assert!(
        chain(&e).contains("did not answer within 1s"),
        "{}",
        chain(&e)
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    // Block status too (it is not taken for "no block status": a hole would be copied as data).
    let dev = slow_dev.clone();
    let (r, took) = within(Duration::from_secs(6), move || {
        dev.data_extents(0, 16 * MIB)
    });
    assert!(r.is_err(), "{r:?}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
    let st = slow_dev.status();
    assert!(st.timeouts >= 2, "{st:?}");
    assert!(st.last_error.unwrap_or_default().contains("did not answer"));
    ok_reads.join().unwrap();
}

#[test]
fn server_errors_fail_reads_at_once_and_hydration_retries_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = data_file(&file, 4 * MIB);
    let f = file.to_str().unwrap();
    let trigger = dir.path().join("fail");
    std::fs::write(&trigger, b"").unwrap();
    let failing = Server::nbdkit(
        Addr::Unix(dir.path().join("e.sock")),
        &[
            "--filter=error",
            "file",
            f,
            "error-pread=EIO",
            "error-pread-rate=1",
            &format!("error-pread-file={}", trigger.display()),
        ],
    );
    let dev = Arc::new(nbd::connect(&failing.uri(), Duration::from_secs(2)));
    let (r, took) = read(&dev, 4096, 8192, Duration::from_secs(5));
    let e = r.unwrap_err();
    assert!(e.contains("Input/output error"), "{e}");
    assert!(
        took < Duration::from_millis(500),
        "a server error is not a timeout: {took:?}"
    );
    assert_eq!(
        dev.status().disconnects,
        0,
        "a server error is not a protocol error"
    );
    std::fs::remove_file(&trigger).unwrap();
    let (r, _) = read(&dev, 4096, 8192, Duration::from_secs(5));
    assert_eq!(r.unwrap(), content[4096..4096 + 8192]);

    // Hydration through a server that fails a quarter of all reads completes,
    // every region with the right bytes.
    let flaky = Server::nbdkit(
        Addr::Unix(dir.path().join("f.sock")),
        &[
            "--filter=error",
            "file",
            f,
            "error-pread=EIO",
            "error-pread-rate=25%",
        ],
    );
    let src = Arc::new(nbd::connect(&flaky.uri(), Duration::from_secs(2)));
    let geo = Geometry::new(4 * MIB, 65536).unwrap();
    let dst = Arc::new(SimDevice::new(4 * MIB));
    let md = Arc::new(SimDevice::from_image(sectors::formatted_metadata(&geo)));
    let eng = Arc::new(sectors::engine(src, dst.clone(), md, &geo).unwrap());
    let timing = HydratorTiming {
        yield_delay: Duration::from_millis(1),
        retry_delay: Duration::from_millis(10),
        idle_delay: Duration::from_millis(10),
    };
    let h = Hydrator::start(&eng, HydrationControl::new(true, 8, 4, false), timing).unwrap();
    wait_until(
        Duration::from_secs(20),
        "hydration through a flaky server",
        || eng.metadata().all_hydrated(),
    );
    drop(h);
    assert!(dst.current_image() == content, "destination differs");
    // It did meet errors (else the filter was not in the way).
    let mut errors = 0;
    for _ in 0..40 {
        let mut b = vec![0u8; 4096];
        errors += eng.read_at(&mut b, 0).is_err() as u32;
    }
    assert_eq!(errors, 0, "hydrated regions are read from the destination");
}

#[test]
fn a_request_in_flight_survives_a_server_restart_and_fails_cleanly_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = data_file(&file, 8 * MIB);
    let f = file.to_str().unwrap().to_string();
    let sock = dir.path().join("k.sock");
    let mut server = Server::nbdkit(
        Addr::Unix(sock.clone()),
        &["--filter=delay", "file", &f, "delay-read=1"],
    );
    let dev = Arc::new(nbd::connect(&server.uri(), Duration::from_secs(4)));
    let quick = Arc::new(nbd::connect(&server.uri(), Duration::from_secs(1)));
    // A read waits on the delayed server; the server dies under it and comes
    // back (without the delay) well within the timeout.
    let pending = {
        let dev = dev.clone();
        std::thread::spawn(move || read(&dev, 3 * MIB + 17, 300_000, Duration::from_secs(8)))
    };
    std::thread::sleep(Duration::from_millis(300));
    server.kill();
    server.set_args(|a| a.retain(|x| x != "--filter=delay" && x != "delay-read=1"));
    std::thread::sleep(Duration::from_millis(500));
    server.start();
    let (r, took) = pending.join().unwrap();
    assert_eq!(
        r.unwrap(),
        content[3 * MIB as usize + 17..3 * MIB as usize + 17 + 300_000]
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    let st = dev.status();
    assert!(st.disconnects >= 1 && st.state == "connected", "{st:?}");

    // Gone for longer than the timeout: the read fails after about the
    // timeout, with the reason; the device says it is reconnecting.
    wait_until(Duration::from_secs(6), "reconnected", || {
        quick.status().state == "connected"
    });
    server.kill();
    let (r, took) = read(&quick, 4096, 4096, Duration::from_secs(5));
    let e = r.unwrap_err();
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert!(
        e.contains("unreachable") || e.contains("did not answer"),
        "{e}"
    );
    let st = quick.status();
    assert_eq!(
        (st.state.as_str(), st.connections),
        ("reconnecting", 0),
        "{st:?}"
    );
    assert!(st.failed_attempts >= 1 && st.last_error.is_some(), "{st:?}");
    // Back: reconnected in the background; reads work again.
    server.start();
    wait_until(
        Duration::from_secs(8),
        "reconnected after the restart",
        || quick.status().state == "connected",
    );
    let (r, _) = read(&quick, 4096, 4096, Duration::from_secs(5));
    assert_eq!(r.unwrap(), content[4096..8192]);
}

#[test]
fn a_server_that_comes_back_with_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let content = data_file(&a, 4 * MIB);
    data_file(&b, 8 * MIB);
    let sock = dir.path().join("k.sock");
    let mut server = Server::nbdkit(Addr::Unix(sock), &["file", a.to_str().unwrap()]);
    let dev = Arc::new(nbd::connect(&server.uri(), Duration::from_secs(1)));
    assert_eq!(
        read(&dev, 0, 4096, Duration::from_secs(5)).0.unwrap(),
        content[..4096]
    );
    server.kill();
    let b = b.to_str().unwrap().to_string();
    server.set_args(|args| *args.last_mut().unwrap() = b);
    server.start();
    let (r, took) = read(&dev, 0, 4096, Duration::from_secs(5));
    let e = r.unwrap_err();
    assert!(e.contains("now has 8388608 bytes but had 4194304"), "{e}");
    assert!(took < Duration::from_millis(2500), "{took:?}");
    assert!(dev
        .status()
        .last_error
        .unwrap_or_default()
        .contains("another export"));
}

/// One way to break the protocol: what the scripted server answers to a
/// request, and what the error must say.
struct Misbehaviour {
    what: &'static str,
    block_status: bool,
    answer: fn(&Req) -> Vec<u8>,
    says: &'static str,
}

fn misbehaviours() -> Vec<Misbehaviour> {
    fn data(r: &Req) -> Vec<u8> {
        nbd::scripted_bytes(r.offset, r.len as u64)
    }
    vec![
        Misbehaviour {
            what: "a data chunk larger than the request",
            block_status: false,
            answer: |r| {
                nbd::data_chunk(
                    r.cookie,
                    true,
                    r.offset,
                    &nbd::scripted_bytes(r.offset, r.len as u64 + 4096),
                )
            },
            says: "outside the request",
        },
        Misbehaviour {
            what: "a chunk claiming 4 GiB",
            block_status: false,
            answer: |r| {
                nbd::chunk_with_len(
                    r.cookie,
                    true,
                    proto::REPLY_TYPE_OFFSET_DATA,
                    u32::MAX - 15,
                    &r.offset.to_be_bytes(),
                )
            },
            says: "outside the request",
        },
        Misbehaviour {
            what: "overlapping data chunks",
            block_status: false,
            answer: |r| {
                let d = data(r);
                let h = d.len() / 2;
                let mut v = nbd::data_chunk(r.cookie, false, r.offset, &d[..h + 512]);
                v.extend(nbd::data_chunk(
                    r.cookie,
                    true,
                    r.offset + h as u64,
                    &d[h..],
                ));
                v
            },
            says: "overlap",
        },
        Misbehaviour {
            what: "data before the request",
            block_status: false,
            answer: |r| {
                nbd::data_chunk(
                    r.cookie,
                    true,
                    r.offset - 512,
                    &nbd::scripted_bytes(r.offset - 512, r.len as u64),
                )
            },
            says: "outside the request",
        },
        Misbehaviour {
            what: "a reply that covers half the request",
            block_status: false,
            answer: |r| nbd::data_chunk(r.cookie, true, r.offset, &data(r)[..r.len as usize / 2]),
            says: "does not cover",
        },
        Misbehaviour {
            what: "an unknown chunk type",
            block_status: false,
            answer: |r| nbd::chunk(r.cookie, true, 42, &[0; 16]),
            says: "type 42",
        },
        Misbehaviour {
            what: "block status in reply to a read",
            block_status: false,
            answer: |r| nbd::status_chunk(r.cookie, true, nbd::CONTEXT, &[(r.len, 0)]),
            says: "does not fit",
        },
        Misbehaviour {
            what: "block status for another context",
            block_status: true,
            answer: |r| nbd::status_chunk(r.cookie, true, nbd::CONTEXT + 1, &[(r.len, 0)]),
            says: "context that was not negotiated",
        },
        Misbehaviour {
            what: "a simple reply to block status",
            block_status: true,
            answer: |r| nbd::simple(r.cookie, 0, &[]),
            says: "simple reply to block status",
        },
        Misbehaviour {
            what: "a reply with the wrong cookie",
            block_status: false,
            answer: |r| nbd::data_chunk(r.cookie ^ 0x5a5a_0000, true, r.offset, &data(r)),
            says: "cookie",
        },
        Misbehaviour {
            what: "a reply with a garbage magic",
            block_status: false,
            answer: |r| {
                let mut v = nbd::simple(r.cookie, 0, &data(r));
                v[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
                v
            },
            says: "bad magic",
        },
    ]
}

/// Reads 8 KiB at 64 KiB + 512 (or asks its block status) from `dev`.
fn ask(dev: &Arc<NbdDevice>, block_status: bool) -> (Result<(), String>, Duration) {
    let (off, len) = (65536 + 512, 8192u64);
    let dev = dev.clone();
    within(Duration::from_secs(6), move || {
        if block_status {
            match dev.data_extents(off, len) {
                Ok(Some(e)) if e == vec![(off, off + len)] => Ok(()),
                Ok(e) => Err(format!("wrong extents {e:?}")),
                Err(e) => Err(chain(&e)),
            }
        } else {
            let mut b = vec![0u8; len as usize];
            match dev.read_at(&mut b, off) {
                Ok(()) if b == nbd::scripted_bytes(off, len) => Ok(()),
                Ok(()) => Err("GARBAGE: a read returned wrong bytes".into()),
                Err(e) => Err(chain(&e)),
            }
        }
    })
}

#[test]
fn a_hostile_server_gets_a_clear_error_no_garbage_and_no_hang() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let mut threads = Vec::new();
    for (i, m) in misbehaviours().into_iter().enumerate() {
        let m = Arc::new(m);
        // Always: the request fails within the timeout (a little more), saying why.
        let always = Scripted::start(&dir.path().join(format!("a{i}")), size, Hello::Full, {
            let m = m.clone();
            move |_, r| Some((m.answer)(r))
        });
        // On the first connection only: the request is sent again on the next
        // and gets the right answer.
        let once = Scripted::start(&dir.path().join(format!("o{i}")), size, Hello::Full, {
            let m = m.clone();
            move |conn, r| {
                Some(if conn == 0 {
                    (m.answer)(r)
                } else {
                    nbd::good_answer(r, true)
                })
            }
        });
        threads.push(std::thread::spawn(move || {
            let dev = Arc::new(nbd::connect(&always.uri(), Duration::from_secs(1)));
            let (r, took) = ask(&dev, m.block_status);
            let e = r.expect_err(m.what);
            let last = dev.status().last_error.unwrap_or_default();
            assert!(
                e.contains(m.says) && last.contains(m.says),
                "{}: error {e:?}, last error {last:?}",
                m.what
            );
            assert!(took < Duration::from_millis(2500), "{}: {took:?}", m.what);

            let dev = Arc::new(nbd::connect(&once.uri(), Duration::from_secs(3)));
            let (r, took) = ask(&dev, m.block_status);
            r.unwrap_or_else(|e| panic!("{}: after a reconnect: {e}", m.what));
            assert!(took < Duration::from_secs(2), "{}: {took:?}", m.what);
            let st = dev.status();
            assert!(st.disconnects >= 1, "{}: {st:?}", m.what);
            assert!(
                st.last_error
                    .as_deref()
                    .unwrap_or_default()
                    .contains(m.says),
                "{}: {st:?}",
                m.what
            );
            drop(dev);
            drop((always, once));
        }));
    }

    // A violation on the first connection, then silence on the next: the
    // timeout names the violation, and status keeps it.
    let then_silent = Scripted::start(&dir.path().join("silent"), size, Hello::Full, |conn, r| {
        Some(if conn == 0 {
            nbd::data_chunk(
                r.cookie ^ 1,
                true,
                r.offset,
                &nbd::scripted_bytes(r.offset, r.len as u64),
            )
        } else {
            Vec::new()
        })
    });
    let dev = Arc::new(nbd::connect(&then_silent.uri(), Duration::from_secs(1)));
    let e = ask(&dev, false).0.unwrap_err();
    assert!(
        e.contains("did not answer within 1s") && e.contains("cookie"),
        "{e}"
    );
    wait_until(
        Duration::from_secs(2),
        "the silent connection ended",
        || dev.status().disconnects >= 2,
    );
    let st = dev.status();
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("cookie"),
        "{st:?}"
    );

    // Without structured replies: a read answered with more bytes than asked
    // returns the right bytes, and the surplus ends the connection.
    let extra = Scripted::start(&dir.path().join("extra"), size, Hello::Simple, |conn, r| {
        let mut v = nbd::good_answer(r, false);
        if conn == 0 {
            v.extend_from_slice(&[0xee; 4096]);
        }
        Some(v)
    });
    let dev = Arc::new(nbd::connect(&extra.uri(), Duration::from_secs(2)));
    assert_eq!(dev.negotiated().base_allocation, None);
    assert_eq!(
        dev.data_extents(0, size).unwrap(),
        None,
        "no block status without structured replies"
    );
    assert_eq!(ask(&dev, false).0, Ok(()));
    wait_until(Duration::from_secs(2), "the surplus noticed", || {
        dev.status().disconnects >= 1
    });
    assert!(dev
        .status()
        .last_error
        .unwrap_or_default()
        .contains("bad magic"));
    assert_eq!(ask(&dev, false).0, Ok(()));

    // An error chunk is the server's error, reported at once with its message,
    // and the connection stays.
    let failing = Scripted::start(&dir.path().join("err"), size, Hello::Full, |_, r| {
        let msg = b"disk on fire\n";
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg);
        Some(nbd::chunk(r.cookie, true, proto::REPLY_TYPE_ERROR, &p))
    });
    let dev = Arc::new(nbd::connect(&failing.uri(), Duration::from_secs(2)));
    let (r, took) = ask(&dev, false);
    let e = r.unwrap_err();
    assert!(
        e.contains("Input/output error") && e.contains("disk on fire?"),
        "{e}"
    );
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(dev.status().disconnects, 0);

    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_server_failing_negotiation_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let never = |_: usize, _: &Req| None;
    for (i, hello) in [
        Hello::CloseAfter(0),
        Hello::CloseAfter(8),
        Hello::CloseAfter(17),
    ]
    .into_iter()
    .enumerate()
    {
        let s = Scripted::start(&dir.path().join(format!("c{i}")), size, hello, never);
        let (r, took) = within(Duration::from_secs(5), {
            let uri = s.uri();
            move || nbd::try_connect(&uri, Duration::from_secs(1)).map(|_| ())
        });
        let e = chain(&r.unwrap_err());
        assert!(
            e.contains("negotiation")
                && e.contains(&s.uri())
                && e.contains("the server closed the connection"),
            "{hello:?}: {e}"
        );
        assert!(took < Duration::from_millis(500), "{hello:?}: {took:?}");
    }
    // A server that says nothing: refused after the timeout.
    let silent = Scripted::start(&dir.path().join("silent"), size, Hello::Silent, never);
    let (r, took) = within(Duration::from_secs(5), {
        let uri = silent.uri();
        move || nbd::try_connect(&uri, Duration::from_secs(1)).map(|_| ())
    });
    let e = chain(&r.unwrap_err());
    assert!(
        e.contains("negotiation") && e.contains("did not respond within 1s"),
        "{e}"
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    // A wrong export name is named.
    let good = Scripted::start(&dir.path().join("good"), size, Hello::Full, |_, r| {
        Some(nbd::good_answer(r, true))
    });
    let wrong = good.uri().replace("golden", "wrong");
    let e = chain(&nbd::try_connect(&wrong, Duration::from_secs(1)).unwrap_err());
    assert!(e.contains("no export named 'wrong'"), "{e}");

    // The daemon: exit 1 with the reason, nothing created.
    let c = clone_dir();
    let cut = Scripted::start(&dir.path().join("cut"), size, Hello::CloseAfter(17), never);
    let o = c.serve_refused(&cut.uri(), &["--source-timeout", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("negotiation"), "{}", text(&o));
    let t = Instant::now();
    let o = c.serve_refused(&silent.uri(), &["--source-timeout", "1"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("did not respond within 1s"),
        "{}",
        text(&o)
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        !c.dst.exists() && !c.meta.exists(),
        "files created by a refused start"
    );
}

#[test]
fn a_server_that_drops_every_connection_is_not_hammered() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scripted::start(
        &dir.path().join("drop"),
        4 * MIB,
        Hello::CloseAfterGo,
        |_, _| None,
    );
    let dev = Arc::new(nbd::connect(&s.uri(), Duration::from_secs(1)));
    std::thread::sleep(Duration::from_millis(1500));
    let n = s.connections.load(std::sync::atomic::Ordering::SeqCst);
    // Backing off from 100 ms: a handful of attempts in 1.5 s, not thousands.
    assert!(n <= 10, "{n} connections in 1.5 s");
    let (r, _) = read(&dev, 0, 4096, Duration::from_secs(5));
    let e = r.unwrap_err();
    assert!(e.contains("closed the connection"), "{e}");
}

#[test]
fn serve_rides_out_the_server_going_away_and_coming_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = Arc::new(data_file(&file, 8 * MIB));
    // The same over a unix socket and over TCP (a new connection through the
    // sandboxed connection threads, with connect's timeout).
    let threads: Vec<_> = [Addr::Unix(dir.path().join("k.sock")), Addr::free_tcp()]
        .into_iter()
        .map(|addr| {
            let (file, content) = (file.clone(), content.clone());
            std::thread::spawn(move || rides_out(addr, &file, &content))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn rides_out(addr: Addr, file: &Path, content: &[u8]) {
    let f = file.to_str().unwrap();
    let mut server = Server::nbdkit(
        addr.clone(),
        &["--filter=delay", "file", f, "delay-read=200ms"],
    );
    let c = clone_dir();
    let mut d = c.serve(
        &server.uri(),
        &["--source-timeout", "1", "--hydration-batch-size", "16"],
    );
    wait_until(Duration::from_secs(10), "first batch hydrated", || {
        status_json(&c.ctl)["hydrated_regions"].as_u64().unwrap() >= 16
    });
    server.kill();
    let frozen_at = status_json(&c.ctl)["hydrated_regions"].as_u64().unwrap();
    assert!(
        frozen_at < 128,
        "{addr:?}: hydrated before the server went away"
    );
    // Past the timeout of the copy in flight: the daemon is alive and answers
    // status at once, still rw.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        d.0.try_wait().unwrap().is_none(),
        "{addr:?}: the daemon exited"
    );
    let t = Instant::now();
    let s = status_json(&c.ctl);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "{addr:?}: status took {:?}",
        t.elapsed()
    );
    assert_eq!(s["mode"], "rw", "{addr:?}: {s}");
    assert_eq!(s["complete"], false, "{addr:?}: {s}");
    let remote = &s["source_remote"];
    assert_eq!(
        (&remote["state"], &remote["connections"]),
        (&"reconnecting".into(), &0.into()),
        "{addr:?}: {s}"
    );
    assert!(remote["last_error"].is_string(), "{addr:?}: {s}");
    // The guest: an unhydrated region fails (after the timeout), a hydrated one reads.
    let mut g = Client::connect(&c.sock);
    let t = Instant::now();
    let (ret, _) = g.read(8 * MIB - 65536, 4096);
    assert!(ret < 0, "{addr:?}: a read from a gone source succeeded");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "{addr:?}: {:?}",
        t.elapsed()
    );
    let (ret, got) = g.read(4096, 4096);
    assert_eq!(ret, 0);
    assert!(got[..] == content[4096..8192]);
    // The server comes back (fast now): hydration completes, the guest reads.
    server.set_args(|a| a.retain(|x| x != "--filter=delay" && x != "delay-read=200ms"));
    server.start();
    c.wait_complete(Duration::from_secs(15));
    let (ret, got) = g.read(8 * MIB - 65536, 4096);
    assert_eq!(ret, 0);
    assert!(got[..] == content[(8 * MIB - 65536) as usize..(8 * MIB - 61440) as usize]);
    let remote = status_json(&c.ctl)["source_remote"].clone();
    assert_eq!(remote["state"], "connected", "{addr:?}: {remote}");
    assert!(
        remote["disconnects"].as_u64().unwrap() >= 1,
        "{addr:?}: {remote}"
    );
    drop(g);
    assert!(d.terminate().success());
    assert!(
        std::fs::read(&c.dst).unwrap() == content,
        "{addr:?}: destination differs"
    );
}

#[test]
fn serve_starts_an_existing_clone_while_its_server_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = data_file(&file, 4 * MIB);
    let other = dir.path().join("other.img");
    data_file(&other, 8 * MIB);
    let f = file.to_str().unwrap().to_string();
    let mut server = Server::nbdkit(Addr::Unix(dir.path().join("k.sock")), &["file", &f]);
    // Two clones of the export, made while it is up.
    let (c, c2) = (clone_dir(), clone_dir());
    for c in [&c, &c2] {
        let d = c.serve(&server.uri(), &["--no-hydration"]);
        assert!(d.terminate().success());
    }
    server.kill();
    // The server is down: the clone starts anyway, and says so.
    let d = c.serve(&server.uri(), &["--source-timeout", "1"]);
    let s = status_json(&c.ctl);
    assert_eq!(s["source_remote"]["state"], "reconnecting", "{s}");
    let mut g = Client::connect(&c.sock);
    let t = Instant::now();
    assert!(
        g.read(MIB, 4096).0 < 0,
        "a read from a gone source succeeded"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // It comes back: the clone hydrates.
    server.start();
    c.wait_complete(Duration::from_secs(15));
    assert_eq!(
        g.read(MIB, 4096).1[..],
        content[MIB as usize..MIB as usize + 4096]
    );
    drop(g);
    assert_eq!(status_json(&c.ctl)["source_remote"]["state"], "connected");
    assert!(d.terminate().success());
    assert!(
        std::fs::read(&c.dst).unwrap() == content,
        "destination differs"
    );
    // The other clone starts while the server is down, and the server comes
    // back with an export of another size: refused; nothing hydrated; the
    // daemon keeps running.
    server.kill();
    let mut d2 = c2.serve(&server.uri(), &["--source-timeout", "1"]);
    let o = other.to_str().unwrap().to_string();
    server.set_args(|a| *a.last_mut().unwrap() = o);
    server.start();
    wait_until(Duration::from_secs(8), "the other export seen", || {
        let s = status_json(&c2.ctl);
        s["source_remote"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("another export")
    });
    let s = status_json(&c2.ctl);
    assert_eq!(
        (&s["hydrated_regions"], &s["source_remote"]["state"]),
        (&0.into(), &"reconnecting".into()),
        "{s}"
    );
    assert!(d2.0.try_wait().unwrap().is_none(), "the daemon exited");
    assert!(d2.terminate().success());
}

#[test]
fn serve_retries_what_the_server_fails_and_completes_once_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = data_file(&file, 4 * MIB);
    let trigger = dir.path().join("fail");
    std::fs::write(&trigger, b"").unwrap();
    let server = Server::nbdkit(
        Addr::Unix(dir.path().join("e.sock")),
        &[
            "--filter=error",
            "file",
            file.to_str().unwrap(),
            "error-pread=EIO",
            "error-pread-rate=1",
            &format!("error-pread-file={}", trigger.display()),
        ],
    );
    let c = clone_dir();
    let mut d = c.serve(&server.uri(), &["--source-timeout", "2"]);
    let mut g = Client::connect(&c.sock);
    let t = Instant::now();
    assert!(g.read(MIB, 4096).0 < 0, "a failed source read succeeded");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let s = status_json(&c.ctl);
    assert_eq!(
        (s["hydrated_regions"].as_u64(), &s["mode"]),
        (Some(0), &"rw".into()),
        "{s}"
    );
    assert!(d.0.try_wait().unwrap().is_none(), "the daemon exited");
    std::fs::remove_file(&trigger).unwrap();
    c.wait_complete(Duration::from_secs(10));
    assert_eq!(
        g.read(MIB, 4096).1[..],
        content[MIB as usize..MIB as usize + 4096]
    );
    drop(g);
    assert!(d.terminate().success());
    assert!(
        std::fs::read(&c.dst).unwrap() == content,
        "destination differs"
    );
}

#[test]
fn serve_refuses_a_wrong_export_and_an_export_of_another_size_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    data_file(&file, 4 * MIB);
    let bigger = dir.path().join("bigger.img");
    data_file(&bigger, 8 * MIB);
    let smaller = dir.path().join("smaller.img");
    data_file(&smaller, 2 * MIB);
    let server = Server::qemu_nbd(&file, Addr::Unix(dir.path().join("q.sock")), "golden");
    let c = clone_dir();
    // A wrong export: exit 1 naming it; nothing created.
    let wrong = server.addr.uri("wrong");
    let o = c.serve_refused(&wrong, &["--source-timeout", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no export named 'wrong'"), "{}", text(&o));
    assert!(
        !c.dst.exists() && !c.meta.exists(),
        "files created by a refused start"
    );
    // A clone of the right one, part hydrated (one guest write).
    let d = c.serve(&server.uri(), &["--no-hydration"]);
    let mut g = Client::connect(&c.sock);
    assert_eq!(g.write(MIB, &[7u8; 4096]), 0);
    assert_eq!(g.flush(), 0);
    drop(g);
    assert!(d.terminate().success());
    let before = (
        std::fs::read(&c.dst).unwrap(),
        std::fs::read(&c.meta).unwrap(),
    );
    // Then a wrong export, and exports of other sizes: refused, nothing changed.
    let o = c.serve_refused(&wrong, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    for (i, other) in [&bigger, &smaller].into_iter().enumerate() {
        let s = Server::qemu_nbd(
            other,
            Addr::Unix(dir.path().join(format!("o{i}.sock"))),
            "golden",
        );
        let o = c.serve_refused(&s.uri(), &[]);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains("device size"), "{}", text(&o));
    }
    let after = (
        std::fs::read(&c.dst).unwrap(),
        std::fs::read(&c.meta).unwrap(),
    );
    assert!(before == after, "a refused start changed the clone");
}

/// A sequential reader (background hydration) gets its next reads sent ahead:
/// against a server that takes 300 ms per read, the next read is already
/// answered when it is asked for, with the right bytes; a read elsewhere
/// waits the full 300 ms.
#[test]
fn sequential_reads_are_sent_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.img");
    let content = nbd::sparse_file(&file, 16 * MIB, &[(0, 16 * MIB)]);
    let f = file.to_str().unwrap();
    let slow = Server::nbdkit(
        Addr::Unix(dir.path().join("slow.sock")),
        &["--filter=delay", "file", f, "delay-read=300ms"],
    );
    let dev = Arc::new(nbd::connect(&slow.uri(), Duration::from_secs(5)));
    let at = |off: u64| content[off as usize..(off + MIB) as usize].to_vec();
    let (r, took) = read(&dev, 0, MIB as usize, Duration::from_secs(5));
    assert_eq!(r.unwrap(), at(0));
    assert!(took >= Duration::from_millis(290), "{took:?}");
    // The caller writes the first megabyte out meanwhile.
    std::thread::sleep(Duration::from_millis(400));
    for off in [MIB, 2 * MIB] {
        let (r, took) = read(&dev, off, MIB as usize, Duration::from_secs(5));
        assert_eq!(r.unwrap(), at(off));
        assert!(
            took < Duration::from_millis(200),
            "read at {off} took {took:?}"
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    let (r, took) = read(&dev, 9 * MIB, MIB as usize, Duration::from_secs(5));
    assert_eq!(r.unwrap(), at(9 * MIB));
    assert!(took >= Duration::from_millis(290), "{took:?}");
}
