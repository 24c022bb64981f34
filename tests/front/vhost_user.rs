// SPDX-License-Identifier: Apache-2.0

//! Protocol and data-path tests: `serve()` on a real unix socket, driven by a vhost-user
//! frontend written in the test (see `common`).

use std::os::fd::IntoRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::vu::*;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost_clone::virtio::{print_capabilities, serve, ServeOptions, ShutdownSignal, VirtioError};

#[test]
fn feature_and_config_negotiation() {
    let disk = MemDisk::new(8 << 20);
    let srv = Server::start(disk.clone(), opts(2));
    let mut g = Guest::connect(&srv.path, 2);
    let (features, proto) = g.negotiate(0);
    for bit in [
        F_VERSION_1,
        F_EVENT_IDX,
        F_INDIRECT_DESC,
        F_SEG_MAX,
        F_FLUSH,
        F_CONFIG_WCE,
        F_TOPOLOGY,
        F_MQ,
        F_DISCARD,
        F_WRITE_ZEROES,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit} missing");
    }
    assert_eq!(features & (1 << F_RO), 0);
    // 512-byte logical blocks: BLK_SIZE is only offered for larger ones
    // (tests/front/direct_blocks.rs).
    assert_eq!(features & (1 << F_BLK_SIZE), 0);
    assert_ne!(features & PROTOCOL_FEATURES_BIT, 0);
    assert!(proto.contains(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    ));
    assert!(!proto.contains(VhostUserProtocolFeatures::STATUS));
    assert_eq!(g.fe.get_queue_num().unwrap(), 2);

    // QEMU asks for 57 bytes, libblkio for 60, the bindings' struct is 96.
    for size in [36u32, 57, 60, 96] {
        assert_eq!(g.get_config(0, size).len(), size as usize);
    }
    let c = g.get_config(0, 96);
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        (8 << 20) / 512
    );
    assert_eq!(le32(&c, 12), 256 - 2, "seg_max");
    assert_eq!(le32(&c, 20), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([c[26], c[27]]), 1, "min_io_size");
    assert_eq!(le32(&c, 28), 65536 / 512, "opt_io_size");
    assert_eq!(c[32], 1, "writeback");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
    assert_eq!(le32(&c, 36), 1 << 22, "max_discard_sectors");
    assert_eq!(le32(&c, 40), 32, "max_discard_seg");
    assert_eq!(le32(&c, 44), 128, "discard_sector_alignment");
    assert_eq!(le32(&c, 48), 1 << 22, "max_write_zeroes_sectors");
    assert_eq!(le32(&c, 52), 32, "max_write_zeroes_seg");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    assert!(c[57..].iter().all(|b| *b == 0));
    // A sub-range read.
    assert_eq!(g.get_config(32, 4), c[32..36].to_vec());
    assert_eq!(g.get_max_mem_slots(), 509);
    drop(g);
    srv.stop();
}

trait Slots {
    fn get_max_mem_slots(&mut self) -> u64;
}
impl Slots for Guest {
    fn get_max_mem_slots(&mut self) -> u64 {
        self.fe.get_max_mem_slots().unwrap()
    }
}

#[test]
fn readonly_device() {
    let disk = MemDisk::new(1 << 20);
    let mut o = opts(1);
    o.read_only = true;
    let srv = Server::start(disk.clone(), o);
    let mut g = Guest::start(&srv.path, 1);
    assert!(g.has(F_RO));
    assert!(!g.has(F_DISCARD) && !g.has(F_WRITE_ZEROES));
    let c = g.get_config(0, 60);
    assert_eq!(le32(&c, 36), 0);
    let before = disk.get(0, 512);
    assert_eq!(g.write(0, 0, &[1u8; 512]), S_IOERR);
    assert_eq!(disk.get(0, 512), before);
    assert_eq!(disk.c.writes.load(Ordering::SeqCst), 0);
    // Discard is not offered: UNSUPP.
    g.write_mem(g.queues[0].data + 0x1000, &segment(0, 8, 0));
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_DISCARD, 0, &segment(0, 8, 0), 0);
    assert_eq!(st, S_UNSUPP);
    let (st, data) = g.read(0, 0, 512);
    assert_eq!(st, S_OK);
    assert_eq!(data, before);
}

#[test]
fn read_write_round_trip() {
    let disk = MemDisk::new(4 << 20);
    let srv = Server::start(disk.clone(), opts(1));
    let mut g = Guest::start(&srv.path, 1);

    // Unwritten data reads as the backend's content.
    let (st, data) = g.read(0, 3, 4096);
    assert_eq!(st, S_OK);
    assert_eq!(data, disk.get(3 * 512, 4096));

    let p = pattern(8192, 7);
    assert_eq!(g.write(0, 16, &p), S_OK);
    assert_eq!(disk.get(16 * 512, 8192), p);
    let (st, data) = g.read(0, 16, 8192);
    assert_eq!(st, S_OK);
    assert_eq!(data, p);

    // Last sector of the disk.
    let last = (4 << 20) / 512 - 1;
    assert_eq!(g.write(0, last, &[9u8; 512]), S_OK);
    assert_eq!(g.read(0, last, 512), (S_OK, vec![9u8; 512]));

    // Scattered read: three data descriptors, header in two pieces, status sharing the
    // last data descriptor.
    let base = g.queues[0].data;
    g.write_mem(base, &header(VIRTIO_BLK_T_IN, 16));
    let (_, len) = g.submit(
        0,
        &[
            rd(base, 8),
            rd(base + 8, 8),
            wr(base + 0x10000, 1024),
            wr(base + 0x20000, 512),
            wr(base + 0x30000, 4096 - 1536 + 1),
        ],
    );
    assert_eq!(len, 4097);
    let mut got = g.read_mem(base + 0x10000, 1024);
    got.extend(g.read_mem(base + 0x20000, 512));
    got.extend(g.read_mem(base + 0x30000, 4096 - 1536));
    assert_eq!(got, p[..4096]);
    assert_eq!(g.read_mem(base + 0x30000 + 4096 - 1536, 1), vec![S_OK]);

    // Indirect chain write.
    let table = base + 0x50000;
    g.write_mem(base + 0x60000, &header(VIRTIO_BLK_T_OUT, 100));
    g.write_mem(base + 0x61000, &[0x5a; 1024]);
    g.put_indirect(
        table,
        &[
            rd(base + 0x60000, 16),
            rd(base + 0x61000, 1024),
            wr(base + 0x62000, 1),
        ],
    );
    let (_, len) = g.submit(
        0,
        &[D {
            addr: table,
            len: 48,
            flags: F_INDIRECT,
        }],
    );
    assert_eq!(len, 1);
    assert_eq!(g.read_mem(base + 0x62000, 1), vec![S_OK]);
    assert_eq!(disk.get(100 * 512, 1024), vec![0x5a; 1024]);

    // Backend errors map to status bytes.
    disk.fail.store(true, Ordering::SeqCst);
    assert_eq!(g.read(0, 0, 512).0, S_IOERR);
    disk.fail.store(false, Ordering::SeqCst);
    disk.unsupported.store(true, Ordering::SeqCst);
    assert_eq!(g.write(0, 0, &[0; 512]), S_UNSUPP);
    disk.unsupported.store(false, Ordering::SeqCst);
    assert_eq!(g.read(0, 0, 512).0, S_OK);
    drop(g);
    srv.stop();
}

#[test]
fn flush_discard_write_zeroes_get_id() {
    let disk = MemDisk::new(4 << 20);
    let srv = Server::start(disk.clone(), opts(1));
    let mut g = Guest::start(&srv.path, 1);

    let f0 = disk.c.flushes.load(Ordering::SeqCst);
    assert_eq!(g.flush(0), S_OK);
    assert_eq!(g.flush(0), S_OK);
    assert_eq!(disk.c.flushes.load(Ordering::SeqCst), f0 + 2);
    // write-back (default): a write does not flush.
    assert_eq!(g.write(0, 0, &[1; 512]), S_OK);
    assert_eq!(disk.c.flushes.load(Ordering::SeqCst), f0 + 2);

    // DISCARD of two segments.
    assert_ne!(disk.get(4096, 512), vec![0; 512]);
    let mut segs = segment(8, 8, 0).to_vec();
    segs.extend(segment(64, 16, 0));
    let (st, used, _) = g.request(0, VIRTIO_BLK_T_DISCARD, 0, &segs, 0);
    assert_eq!((st, used), (S_OK, 1));
    assert_eq!(disk.c.discards.load(Ordering::SeqCst), 2);
    assert_eq!(disk.get(8 * 512, 4096), vec![0; 4096]);
    assert_eq!(disk.get(64 * 512, 8192), vec![0; 8192]);
    // The unmap flag is not allowed on DISCARD.
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_DISCARD, 0, &segment(8, 8, 1), 0);
    assert_eq!(st, S_UNSUPP);

    // WRITE_ZEROES with and without unmap.
    assert_ne!(disk.get(200 * 512, 512), vec![0; 512]);
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(200, 4, 0), 0);
    assert_eq!(st, S_OK);
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(300, 4, 1), 0);
    assert_eq!(st, S_OK);
    assert_eq!(disk.c.write_zeroes.load(Ordering::SeqCst), 2);
    assert_eq!(disk.c.unmaps.load(Ordering::SeqCst), 1);
    assert_eq!(disk.get(200 * 512, 2048), vec![0; 2048]);
    // Unknown flag on WRITE_ZEROES.
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(300, 4, 2), 0);
    assert_eq!(st, S_UNSUPP);
    // Out of range segment.
    let (st, _, _) = g.request(
        0,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &segment((4 << 20) / 512 - 2, 4, 0),
        0,
    );
    assert_eq!(st, S_IOERR);

    // GET_ID: 20 bytes, zero padded.
    let (st, used, id) = g.request(0, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!((st, used), (S_OK, 21));
    let mut want = b"vc-test-serial".to_vec();
    want.resize(20, 0);
    assert_eq!(id, want);
    drop(g);
    srv.stop();
}

#[test]
fn two_queues_run_concurrently() {
    let disk = MemDisk::new(8 << 20);
    let srv = Server::start(disk.clone(), opts(2));
    let mut g = Guest::start(&srv.path, 2);

    // Each queue's read blocks in the backend until a read from the other queue is in the
    // backend too: this only completes if the queues are served in parallel.
    disk.rv.lock().unwrap().0 = true;
    let (h0, s0, d0) = g.prepare(0, 0, VIRTIO_BLK_T_IN, 0, &[], 4096);
    let (h1, s1, d1) = g.prepare(1, 0, VIRTIO_BLK_T_IN, 8, &[], 4096);
    g.publish_many(0, &[h0]);
    g.publish_many(1, &[h1]);
    assert_eq!(g.wait_used(0), (u32::from(h0), 4097));
    assert_eq!(g.wait_used(1), (u32::from(h1), 4097));
    assert!(disk.met.load(Ordering::SeqCst), "queues were serialised");
    assert_eq!(g.read_mem(s0, 1)[0], S_OK);
    assert_eq!(g.read_mem(s1, 1)[0], S_OK);
    assert_eq!(g.read_mem(d0, 4096), disk.get(0, 4096));
    assert_eq!(g.read_mem(d1, 4096), disk.get(8 * 512, 4096));
    disk.rv.lock().unwrap().0 = false;

    // Many requests in flight on both queues, batched.
    for round in 0..4u64 {
        let mut expect = Vec::new();
        for q in 0..2usize {
            let mut heads = Vec::new();
            for slot in 0..16u64 {
                let sector = (q as u64 * 1000) + slot * 8 + round * 200;
                let p = pattern(4096, (slot + round) as u8 + q as u8 * 50);
                let (h, s, _) = g.prepare(q, slot, VIRTIO_BLK_T_OUT, sector, &p, 0);
                heads.push(h);
                expect.push((q, s, sector, p));
            }
            g.publish_many(q, &heads);
        }
        for q in 0..2usize {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..16 {
                let (id, len) = g.wait_used(q);
                assert_eq!(len, 1);
                assert!(seen.insert(id));
            }
        }
        for (q, s, sector, p) in expect {
            assert_eq!(g.read_mem(s, 1)[0], S_OK, "queue {q}");
            assert_eq!(disk.get(sector as usize * 512, 4096), p);
        }
    }
    drop(g);
    srv.stop();
}

#[test]
fn write_cache_toggle_and_write_through() {
    let disk = MemDisk::new(4 << 20);
    let srv = Server::start(disk.clone(), opts(1));
    let mut g = Guest::start(&srv.path, 1);
    assert_eq!(g.get_config(32, 1), vec![1]);

    // Write-back: writes complete without a flush.
    let f = || disk.c.flushes.load(Ordering::SeqCst);
    let f0 = f();
    assert_eq!(g.write(0, 0, &[1; 512]), S_OK);
    assert_eq!(f(), f0);
    assert_eq!(disk.dirty.load(Ordering::SeqCst), 1);

    // Guest switches to write-through.
    g.set_wce(false);
    assert!(!disk.wce.load(Ordering::SeqCst));
    assert_eq!(g.get_config(32, 1), vec![0]);
    assert_eq!(g.write(0, 0, &[2; 512]), S_OK);
    assert_eq!(f(), f0 + 1);
    assert_eq!(
        disk.dirty.load(Ordering::SeqCst),
        0,
        "completed before durable"
    );
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &segment(8, 8, 0), 0);
    assert_eq!(st, S_OK);
    let (st, _, _) = g.request(0, VIRTIO_BLK_T_DISCARD, 0, &segment(16, 8, 0), 0);
    assert_eq!(st, S_OK);
    assert_eq!(f(), f0 + 3);
    // A failing flush fails the write.
    disk.fail.store(true, Ordering::SeqCst);
    assert_eq!(g.write(0, 0, &[3; 512]), S_IOERR);
    disk.fail.store(false, Ordering::SeqCst);

    // Back to write-back.
    g.set_wce(true);
    let f1 = f();
    assert_eq!(g.write(0, 0, &[4; 512]), S_OK);
    assert_eq!(f(), f1);
    // Writes to config fields other than wce are refused.
    assert!(g
        .fe
        .set_config(
            0,
            vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
            &[0; 8]
        )
        .is_err());
    drop(g);

    // A driver that does not negotiate FLUSH gets write-through.
    let mut g = Guest::connect(&srv.path, 1);
    g.negotiate(1 << F_FLUSH);
    g.setup_memory();
    g.setup_queues(1, QUEUE_SIZE);
    let f2 = f();
    assert_eq!(g.write(0, 0, &[5; 512]), S_OK);
    assert_eq!(f(), f2 + 1);
    drop(g);
    srv.stop();
}

#[test]
fn event_idx_off_and_notifications() {
    let disk = MemDisk::new(1 << 20);
    let srv = Server::start(disk.clone(), opts(1));
    // Without EVENT_IDX and INDIRECT_DESC.
    let mut g = Guest::connect(&srv.path, 1);
    g.negotiate((1 << F_EVENT_IDX) | (1 << F_INDIRECT_DESC));
    g.setup_memory();
    g.setup_queues(1, 64);
    for i in 0..200u64 {
        assert_eq!(g.write(0, i % 64, &[i as u8; 512]), S_OK);
    }
    // Counted at the end: a request completed before `wait_used` looked leaves
    // its notification in the eventfd (this used to fail now and then).
    assert!(g.calls(0, 1000) > 0, "no call notifications");
    drop(g);
    // With EVENT_IDX: notifications still arrive (the test sets used_event each time).
    let mut g = Guest::start(&srv.path, 1);
    for i in 0..200u64 {
        assert_eq!(g.read(0, i % 64, 512).0, S_OK);
    }
    assert!(g.calls(0, 1000) > 0, "no call notifications with EVENT_IDX");
    drop(g);
    srv.stop();
}

#[test]
fn shutdown_with_connected_frontend() {
    let disk = MemDisk::new(1 << 20);
    let srv = Server::start(disk.clone(), opts(2));
    let mut g = Guest::start(&srv.path, 2);
    assert_eq!(g.write(0, 0, &[1; 512]), S_OK);
    let path = srv.path.clone();
    let t0 = Instant::now();
    srv.stop(); // returns Ok, removes the socket
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(!path.exists());
    // The frontend sees the connection closed.
    assert!(g.fe.get_features().is_err());
}

#[test]
fn socket_path_rules_and_listen_fd() {
    let dir = tempfile::tempdir().unwrap();
    let disk = MemDisk::new(1 << 20);

    // A regular file is refused and left alone.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep").unwrap();
    let sd = ShutdownSignal::new().unwrap();
    let o = ServeOptions {
        socket_path: Some(file.clone()),
        ..opts(1)
    };
    let r = serve(disk.clone(), &o, &sd);
    assert!(matches!(r, Err(VirtioError::NotASocket(_))), "{r:?}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    // A stale socket is replaced; the new one has mode 0600.
    let sock = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    let srv = {
        let o = ServeOptions {
            socket_path: Some(sock.clone()),
            ..opts(1)
        };
        let sd = ShutdownSignal::new().unwrap();
        let sd2 = sd.clone();
        let d: std::sync::Arc<dyn vhost_clone::virtio::BlockBackend> = disk.clone();
        let t = std::thread::spawn(move || serve(d, &o, &sd2));
        (sd, t)
    };
    let t0 = Instant::now();
    loop {
        if let Ok(m) = std::fs::symlink_metadata(&sock) {
            if m.file_type().is_socket() && std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                assert_eq!(m.permissions().mode() & 0o777, 0o600);
                break;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    // A live socket is not stolen by a second serve.
    let o2 = ServeOptions {
        socket_path: Some(sock.clone()),
        ..opts(1)
    };
    let r = serve(disk.clone(), &o2, &ShutdownSignal::new().unwrap());
    assert!(matches!(r, Err(VirtioError::SocketInUse(_))), "{r:?}");
    // (the probe connection above was served as an empty connection)
    let mut g = Guest::start(&sock, 1);
    assert_eq!(g.read(0, 0, 512).0, S_OK);
    drop(g);
    srv.0.trigger();
    srv.1.join().unwrap().unwrap();
    assert!(!sock.exists());

    // Inherited listening fd.
    let lsock = dir.path().join("inherited.sock");
    let l = std::os::unix::net::UnixListener::bind(&lsock).unwrap();
    let fd = l.into_raw_fd();
    let o = ServeOptions {
        listen_fd: Some(fd),
        ..opts(1)
    };
    let sd = ShutdownSignal::new().unwrap();
    let sd2 = sd.clone();
    let d: std::sync::Arc<dyn vhost_clone::virtio::BlockBackend> = disk.clone();
    let t = std::thread::spawn(move || serve(d, &o, &sd2));
    let mut g = Guest::start(&lsock, 1);
    assert_eq!(g.write(0, 1, &[7; 512]), S_OK);
    drop(g);
    sd.trigger();
    t.join().unwrap().unwrap();
    assert_eq!(disk.get(512, 512), vec![7; 512]);

    // Not a socket fd.
    let f = std::fs::File::open(&file).unwrap();
    let o = ServeOptions {
        listen_fd: Some(f.into_raw_fd()),
        ..opts(1)
    };
    let r = serve(disk.clone(), &o, &ShutdownSignal::new().unwrap());
    assert!(matches!(r, Err(VirtioError::BadListenFd(_))), "{r:?}");

    // Option validation.
    for bad in [
        ServeOptions {
            serial: "x".repeat(21),
            socket_path: Some(dir.path().join("a")),
            ..opts(1)
        },
        ServeOptions {
            num_queues: 0,
            socket_path: Some(dir.path().join("a")),
            ..opts(1)
        },
        ServeOptions {
            queue_size: 100,
            socket_path: Some(dir.path().join("a")),
            ..opts(1)
        },
        opts(1),
    ] {
        let r = serve(disk.clone(), &bad, &ShutdownSignal::new().unwrap());
        assert!(matches!(r, Err(VirtioError::InvalidOptions(_))), "{r:?}");
    }
}

#[test]
fn capabilities_json() {
    let v: serde_json::Value = serde_json::from_str(&print_capabilities()).unwrap();
    assert_eq!(v["type"], "block");
    assert!(v["features"].is_array());
}

#[test]
fn shutdown_lets_in_flight_request_finish() {
    let disk = MemDisk::new(1 << 20);
    let srv = Server::start(disk.clone(), opts(1));
    let mut g = Guest::start(&srv.path, 1);
    // The read blocks in the backend (about 5 s: it waits for a partner that never comes).
    disk.rv.lock().unwrap().0 = true;
    let (h, s, d) = g.prepare(0, 0, VIRTIO_BLK_T_IN, 0, &[], 4096);
    g.publish_many(0, &[h]);
    let t0 = Instant::now();
    while disk.rv.lock().unwrap().1 == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    // Shutdown while the request is inside the backend: serve() returns Ok after it is done.
    srv.stop();
    assert_eq!(
        g.used_idx(0),
        1,
        "in-flight request not completed before serve returned"
    );
    assert_eq!(g.wait_used(0), (u32::from(h), 4097));
    assert_eq!(g.read_mem(s, 1)[0], S_OK);
    assert_eq!(g.read_mem(d, 4096), disk.get(0, 4096));
}
