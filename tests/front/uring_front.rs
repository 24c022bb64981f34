// SPDX-License-Identifier: Apache-2.0

//! The io_uring queue engine at the virtio level, with the raw vhost-user frontend of
//! `tests/vu`: requests published in one batch are retired in the order they were
//! published (the used ring never gets ahead of an unfinished request), barrier requests
//! wait for the batch before them, and hostile buffers on the io_uring path get an error
//! status, never a crash or a hang.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use crate::support::vu::*;
use vhost_clone::virtio::IoEngine;

fn uring_opts() -> vhost_clone::virtio::ServeOptions {
    vhost_clone::virtio::ServeOptions {
        io_engine: IoEngine::Uring,
        ..opts(1)
    }
}

/// Offsets scattered over the disk so the kernel has a chance to finish them out of order;
/// distinct for i < 997.
fn scattered(i: u64) -> u64 {
    (i * 7919 % 997) * 8
}

#[test]
fn batches_retire_in_publish_order_and_flush_waits_for_them() {
    if !uring_available() {
        return;
    }
    let disk = FileDisk::new(8 << 20);
    for i in 0..997u64 {
        disk.file
            .write_all_at(&pattern(4096, (i % 251) as u8), i * 4096)
            .unwrap();
    }
    let srv = Server::start(disk.clone(), uring_opts());
    let mut g = Guest::start(&srv.path, 1);

    for round in 0..20u64 {
        // 24 reads and 6 writes, a flush, one kick.
        let mut heads = Vec::new();
        for i in 0..30u64 {
            let sector = scattered(round * 30 + i);
            let (head, status, data) = if i % 5 == 4 {
                let p = pattern(4096, (round * 30 + i) as u8 ^ 0x5a);
                g.prepare(0, i, VIRTIO_BLK_T_OUT, sector, &p, 0)
            } else {
                g.prepare(0, i, VIRTIO_BLK_T_IN, sector, &[], 4096)
            };
            heads.push((head, status, data, i % 5 == 4, sector));
        }
        let (fhead, fstatus, _) = g.prepare(0, 30, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
        let done_before = disk.direct_done.load(Ordering::SeqCst);
        let mut all: Vec<u16> = heads.iter().map(|h| h.0).collect();
        all.push(fhead);
        g.publish_many(0, &all);
        for (k, &(head, status, data, write, sector)) in heads.iter().enumerate() {
            let (id, len) = g.wait_used(0);
            assert_eq!(
                id,
                u32::from(head),
                "round {round}: used entry {k} is not the {k}th published request"
            );
            assert_eq!(g.read_mem(status, 1)[0], S_OK);
            if write {
                assert_eq!(len, 1);
            } else {
                assert_eq!(len, 4097);
                // Offsets are distinct over the whole test, so no write touched it.
                let want = pattern(4096, (sector / 8 % 251) as u8);
                assert_eq!(g.read_mem(data, 4096), want, "round {round}: read {k}");
            }
        }
        let (id, _) = g.wait_used(0);
        assert_eq!(id, u32::from(fhead));
        assert_eq!(g.read_mem(fstatus, 1)[0], S_OK);
        // The flush ran after all 30 requests of its batch had completed.
        let saw = *disk.flushes_saw.lock().unwrap().last().unwrap();
        assert!(
            saw >= done_before + 30,
            "flush ran before its batch completed"
        );
    }
    assert_eq!(
        disk.direct_started.load(Ordering::SeqCst),
        disk.direct_ended.load(Ordering::SeqCst)
    );
    assert_eq!(disk.direct_done.load(Ordering::SeqCst), 20 * 30);
    assert_eq!(disk.direct_writes_done.load(Ordering::SeqCst), 20 * 6);
    drop(g);
    srv.stop();
}

#[test]
fn hostile_buffers_on_the_uring_path() {
    if !uring_available() {
        return;
    }
    let disk = FileDisk::new(4 << 20);
    disk.file.write_all_at(&pattern(8192, 3), 0).unwrap();
    let srv = Server::start(disk.clone(), uring_opts());
    let mut g = Guest::start(&srv.path, 1);
    let base = g.queues[0].data;
    let (hdr, status) = (base, base + 0x3f_f000);

    // A read into a buffer that runs past the end of guest memory: IOERR, nothing issued.
    g.write_mem(hdr, &header(VIRTIO_BLK_T_IN, 0));
    g.write_mem(status, &[0xee]);
    let issued = disk.direct_done.load(Ordering::SeqCst);
    let (_, len) = g.submit(0, &[rd(hdr, 16), wr(MEM_SIZE - 2048, 4096), wr(status, 1)]);
    assert!(len <= 1);
    if len == 1 {
        assert_eq!(g.read_mem(status, 1)[0], S_IOERR);
    }
    assert_eq!(disk.direct_done.load(Ordering::SeqCst), issued);
    // Its permit was given back, not leaked.
    assert_eq!(
        disk.direct_started.load(Ordering::SeqCst),
        disk.direct_ended.load(Ordering::SeqCst)
    );

    // Overlapping read buffers are harmless here (no Rust references are formed): the
    // request completes and the overlapped bytes hold the later part of the data.
    g.write_mem(hdr, &header(VIRTIO_BLK_T_IN, 0));
    let a = base + 0x1000;
    let (_, len) = g.submit(
        0,
        &[rd(hdr, 16), wr(a, 4096), wr(a + 2048, 4096), wr(status, 1)],
    );
    assert_eq!(len, 8193);
    assert_eq!(g.read_mem(status, 1)[0], S_OK);
    assert_eq!(
        g.read_mem(a + 2048, 4096),
        pattern(8192, 3)[4096..].to_vec()
    );

    // The status byte inside the data buffer of a read: the data lands, then the status.
    g.write_mem(hdr, &header(VIRTIO_BLK_T_IN, 0));
    let (_, len) = g.submit(0, &[rd(hdr, 16), wr(a, 513)]);
    assert_eq!(len, 513);
    assert_eq!(g.read_mem(a, 512), pattern(8192, 3)[..512].to_vec());
    assert_eq!(g.read_mem(a + 512, 1)[0], S_OK);

    // Still serving.
    assert_eq!(
        g.read(0, 0, 4096),
        (S_OK, pattern(8192, 3)[..4096].to_vec())
    );
    drop(g);
    srv.stop();
}
