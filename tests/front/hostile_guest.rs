// SPDX-License-Identifier: Apache-2.0

//! Hostile-guest tests: malformed descriptor chains sent through a real vhost-user
//! connection. Each must be answered with an error status (IOERR/UNSUPP) or retired with
//! used length 0, must not touch the disk, and the same queue must serve a normal request
//! right after.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::support::vu::*;

struct Bench {
    srv: Option<Server>,
    disk: Arc<MemDisk>,
    g: Guest,
    /// Scratch area for hand-made chains (queue 0's data area).
    base: u64,
}

impl Bench {
    fn new() -> Bench {
        let disk = MemDisk::new(4 << 20);
        let srv = Server::start(disk.clone(), opts(1));
        let g = Guest::start(&srv.path, 1);
        let base = g.queues[0].data;
        Bench {
            srv: Some(srv),
            disk,
            g,
            base,
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.disk.data.lock().unwrap().clone()
    }

    /// Submit `descs` (linked in order) and check the answer: used len 0, or used len 1 with
    /// the status byte at `status` (if given) set to one of `allowed`.
    fn expect_refused(&mut self, descs: &[D], status: Option<u64>, allowed: &[u8]) -> u32 {
        if let Some(s) = status {
            self.g.write_mem(s, &[0xee]);
        }
        let (_, len) = self.g.submit(0, descs);
        self.check(len, status, allowed);
        len
    }

    fn check(&mut self, len: u32, status: Option<u64>, allowed: &[u8]) {
        assert!(len <= 1, "used len {len} for a refused request");
        if let (1, Some(s)) = (len, status) {
            let st = self.g.read_mem(s, 1)[0];
            assert!(allowed.contains(&st), "status {st} not in {allowed:?}");
        }
    }

    /// A normal request on the same queue still works.
    fn still_serves(&mut self) {
        let want = self.disk.get(0, 1024);
        assert_eq!(self.g.read(0, 0, 1024), (S_OK, want));
    }

    fn hdr(&self, at: u64, t: u32, sector: u64) {
        self.g.write_mem(at, &header(t, sector));
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // The server survived everything and shuts down cleanly.
            self.srv.take().unwrap().stop();
        }
    }
}

const ERR: &[u8] = &[S_IOERR];
const ERR_OR_UNSUPP: &[u8] = &[S_IOERR, S_UNSUPP];

#[test]
fn descriptor_loops() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, d) = (b.base, b.base + 0x1000);
    b.hdr(h, VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 0 -> ...
    b.g.put_desc(0, 0, h, 16, F_NEXT, 1);
    b.g.put_desc(0, 1, d, 512, F_NEXT | F_WRITE, 0);
    b.g.publish(0, 0);
    let (id, len) = b.g.wait_used(0);
    assert_eq!(id, 0);
    b.check(len, Some(d + 511), ERR);
    // Self loop.
    b.hdr(h, VIRTIO_BLK_T_OUT, 0);
    b.g.put_desc(0, 2, h, 16, F_NEXT, 2);
    b.g.publish(0, 2);
    let (id, len) = b.g.wait_used(0);
    assert_eq!((id, len), (2, 0));
    // Loop inside an indirect table.
    let t = b.base + 0x8000;
    b.hdr(h, VIRTIO_BLK_T_IN, 0);
    b.g.put_indirect(t, &[rd(h, 16), wr(d, 512)]);
    // entry 1 -> entry 0
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&d.to_le_bytes());
    raw[8..12].copy_from_slice(&512u32.to_le_bytes());
    raw[12..14].copy_from_slice(&(F_NEXT | F_WRITE).to_le_bytes());
    raw[14..16].copy_from_slice(&0u16.to_le_bytes());
    b.g.write_mem(t + 16, &raw);
    b.g.put_desc(0, 3, t, 32, F_INDIRECT, 0);
    b.g.publish(0, 3);
    let (id, len) = b.g.wait_used(0);
    assert_eq!(id, 3);
    b.check(len, Some(d + 511), ERR);
    b.g.queues[0].next_desc = 4;
    assert_eq!(b.snapshot(), before);
    b.still_serves();
}

#[test]
fn zero_length_and_huge_descriptors() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, d, s) = (b.base, b.base + 0x1000, b.base + 0x3000);
    // Zero-length header only.
    b.hdr(h, VIRTIO_BLK_T_IN, 0);
    b.expect_refused(&[rd(h, 0), wr(s, 1)], Some(s), ERR);
    // Zero-length data: a read without data.
    b.expect_refused(&[rd(h, 16), wr(d, 0), wr(s, 1)], Some(s), ERR);
    // Zero-length status descriptor: the status lands on the data's last byte, leaving 511
    // bytes of data, which is not a multiple of 512.
    b.expect_refused(&[rd(h, 16), wr(d, 512), wr(s, 0)], Some(d + 511), ERR);
    // Only zero-length descriptors.
    b.expect_refused(&[rd(h, 0), wr(s, 0)], None, &[]);
    // Huge descriptors (beyond guest memory).
    b.expect_refused(&[rd(h, 16), wr(d, u32::MAX), wr(s, 1)], Some(s), ERR);
    b.hdr(h, VIRTIO_BLK_T_OUT, 0);
    b.expect_refused(&[rd(h, 16), rd(d, u32::MAX - 15), wr(s, 1)], Some(s), ERR);
    // Huge but inside guest memory: longer than the disk.
    b.hdr(h, VIRTIO_BLK_T_IN, 0);
    b.expect_refused(&[rd(h, 16), wr(0x10_0000, 8 << 20), wr(s, 1)], Some(s), ERR);
    // Two descriptors whose lengths add up to more than 4 GiB.
    b.expect_refused(
        &[rd(h, 16), wr(d, u32::MAX), wr(d, u32::MAX), wr(s, 1)],
        Some(s),
        ERR,
    );
    assert_eq!(b.snapshot(), before);
    b.still_serves();
}

#[test]
fn wrong_directions() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, d, s) = (b.base, b.base + 0x1000, b.base + 0x3000);
    // IN with device-readable data.
    b.hdr(h, VIRTIO_BLK_T_IN, 0);
    b.expect_refused(&[rd(h, 16), rd(d, 512), wr(s, 1)], Some(s), ERR);
    // OUT with device-writable data.
    b.hdr(h, VIRTIO_BLK_T_OUT, 0);
    b.expect_refused(&[rd(h, 16), wr(d, 512), wr(s, 1)], Some(s), ERR);
    // Device-writable header.
    b.expect_refused(&[wr(h, 16), rd(d, 512), wr(s, 1)], Some(s), ERR);
    b.expect_refused(&[wr(h, 16), wr(s, 1)], Some(s), ERR);
    // Readable after writable.
    b.expect_refused(&[rd(h, 16), wr(s, 1), rd(d, 512)], Some(s), ERR);
    // GET_ID with readable data, and without any buffer.
    b.hdr(h, VIRTIO_BLK_T_GET_ID, 0);
    b.expect_refused(&[rd(h, 16), rd(d, 20), wr(s, 1)], Some(s), ERR);
    b.expect_refused(&[rd(h, 16), wr(s, 1)], Some(s), ERR);
    // DISCARD with writable segments.
    b.hdr(h, VIRTIO_BLK_T_DISCARD, 0);
    b.g.write_mem(d, &segment(0, 8, 0));
    b.expect_refused(&[rd(h, 16), wr(d, 16), wr(s, 1)], Some(s), ERR);
    assert_eq!(b.snapshot(), before);
    assert_eq!(b.disk.c.discards.load(Ordering::SeqCst), 0);
    b.still_serves();
}

#[test]
fn status_byte_missing_or_read_only() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, d, s) = (b.base, b.base + 0x1000, b.base + 0x3000);
    // OUT without any writable descriptor: not executed, retired with len 0.
    b.hdr(h, VIRTIO_BLK_T_OUT, 0);
    b.g.write_mem(d, &[0xab; 512]);
    assert_eq!(b.expect_refused(&[rd(h, 16), rd(d, 512)], None, &[]), 0);
    // FLUSH with a read-only status byte.
    b.hdr(h, VIRTIO_BLK_T_FLUSH, 0);
    let f0 = b.disk.c.flushes.load(Ordering::SeqCst);
    assert_eq!(b.expect_refused(&[rd(h, 16), rd(s, 1)], None, &[]), 0);
    assert_eq!(b.disk.c.flushes.load(Ordering::SeqCst), f0);
    // Status descriptor outside guest memory.
    b.hdr(h, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        b.expect_refused(&[rd(h, 16), rd(d, 512), wr(MEM_SIZE, 1)], None, &[]),
        0
    );
    assert_eq!(b.snapshot(), before);
    b.still_serves();
}

#[test]
fn out_of_range_and_unaligned() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, d, s) = (b.base, b.base + 0x1000, b.base + 0x3000);
    let cap = (4u64 << 20) / 512;
    for (t, sector, len) in [
        (VIRTIO_BLK_T_IN, cap, 512u32),
        (VIRTIO_BLK_T_IN, cap - 1, 1024),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512, 1024),
        (VIRTIO_BLK_T_IN, 1 << 55, 512),
        (VIRTIO_BLK_T_OUT, cap, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX / 256, 512),
        (VIRTIO_BLK_T_IN, 0, 100),
        (VIRTIO_BLK_T_OUT, 0, 513),
        (VIRTIO_BLK_T_IN, 0, 511),
    ] {
        b.hdr(h, t, sector);
        let data = if t == VIRTIO_BLK_T_IN {
            wr(d, len)
        } else {
            rd(d, len)
        };
        b.expect_refused(&[rd(h, 16), data, wr(s, 1)], Some(s), ERR);
    }
    // Discard / write-zeroes ranges.
    b.hdr(h, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    for seg in [
        segment(cap, 1, 0),
        segment(cap - 1, 2, 0),
        segment(u64::MAX, 1, 0),
        segment(u64::MAX / 512, 8, 0),
        segment(0, (1 << 22) + 1, 0), // more than max_write_zeroes_sectors
    ] {
        b.g.write_mem(d, &seg);
        b.expect_refused(&[rd(h, 16), rd(d, 16), wr(s, 1)], Some(s), ERR);
    }
    assert_eq!(b.disk.c.write_zeroes.load(Ordering::SeqCst), 0);
    assert_eq!(b.snapshot(), before);
    b.still_serves();
}

#[test]
fn addresses_outside_guest_memory() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, s) = (b.base, b.base + 0x3000);
    b.hdr(h, VIRTIO_BLK_T_IN, 0);
    for addr in [MEM_SIZE, MEM_SIZE - 256, u64::MAX - 100, 1 << 63] {
        b.expect_refused(&[rd(h, 16), wr(addr, 512), wr(s, 1)], Some(s), ERR);
    }
    b.hdr(h, VIRTIO_BLK_T_OUT, 0);
    for addr in [MEM_SIZE, MEM_SIZE - 256, u64::MAX - 100] {
        b.expect_refused(&[rd(h, 16), rd(addr, 512), wr(s, 1)], Some(s), ERR);
    }
    // Header outside memory.
    b.expect_refused(&[rd(MEM_SIZE + 4096, 16), wr(s, 1)], Some(s), ERR);
    // Header straddling the end of memory.
    b.expect_refused(&[rd(MEM_SIZE - 8, 16), wr(s, 1)], Some(s), ERR);
    assert_eq!(b.snapshot(), before);
    b.still_serves();
}

#[test]
fn unknown_request_types() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, d, s) = (b.base, b.base + 0x1000, b.base + 0x3000);
    for t in [
        2u32,
        3,
        5,
        7,
        9,
        10,
        12,
        14,
        15,
        16,
        24,
        0x8000_0000,
        u32::MAX,
    ] {
        b.hdr(h, t, 0);
        b.expect_refused(&[rd(h, 16), wr(s, 1)], Some(s), &[S_UNSUPP]);
        b.expect_refused(&[rd(h, 16), wr(d, 512), wr(s, 1)], Some(s), &[S_UNSUPP]);
    }
    assert_eq!(b.snapshot(), before);
    b.still_serves();
}

#[test]
fn bad_indirect_tables() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, d, s) = (b.base, b.base + 0x1000, b.base + 0x3000);
    b.hdr(h, VIRTIO_BLK_T_IN, 0);
    let ind = |addr: u64, len: u32| D {
        addr,
        len,
        flags: F_INDIRECT,
    };
    // Table outside memory, straddling the end, absurdly long, length not a multiple of 16.
    for (addr, len) in [
        (MEM_SIZE, 48),
        (MEM_SIZE - 16, 48),
        (u64::MAX - 47, 48),
        (b.base + 0x8000, 0xffff_fff0),
        (b.base + 0x8000, 47),
    ] {
        b.g.put_indirect(b.base + 0x8000, &[rd(h, 16), wr(d, 512), wr(s, 1)]);
        b.expect_refused(&[ind(addr, len)], Some(s), ERR);
    }
    // Table entries pointing outside memory.
    let t = b.base + 0x8000;
    b.g.put_indirect(t, &[rd(h, 16), wr(MEM_SIZE + 0x1000, 512), wr(s, 1)]);
    b.expect_refused(&[ind(t, 48)], Some(s), ERR);
    // Nested indirect.
    b.g.put_indirect(t, &[rd(h, 16), ind(b.base + 0x9000, 48)]);
    b.g.put_indirect(b.base + 0x9000, &[wr(d, 512), wr(s, 1)]);
    b.expect_refused(&[ind(t, 32)], Some(s), ERR);
    // `next` beyond the table: the walk stops after the data descriptor, whose last byte
    // is the last writable byte seen.
    b.g.put_indirect(t, &[rd(h, 16), wr(d, 512), wr(s, 1)]);
    b.expect_refused(&[ind(t, 32)], Some(d + 511), ERR);
    // Indirect descriptor after a direct one (allowed by virtio-queue): still validated.
    b.g.put_indirect(t, &[wr(MEM_SIZE, 512), wr(s, 1)]);
    b.expect_refused(&[rd(h, 16), ind(t, 32)], Some(s), ERR);
    // An indirect table with more descriptors than the device accepts.
    let big = b.base + 0x10_0000;
    let mut descs = vec![rd(h, 16)];
    descs.extend((0..1100).map(|i| wr(b.base + 0x20_0000 + i * 512, 512)));
    descs.push(wr(s, 1));
    b.g.put_indirect(big, &descs);
    let (_, len) = b.g.submit(0, &[ind(big, descs.len() as u32 * 16)]);
    assert!(len <= 1);
    assert_eq!(b.disk.c.reads.load(Ordering::SeqCst), 0);
    assert_eq!(b.snapshot(), before);
    b.still_serves();
}

#[test]
fn bad_discard_payloads() {
    let mut b = Bench::new();
    let before = b.snapshot();
    let (h, d, s) = (b.base, b.base + 0x1000, b.base + 0x3000);
    b.hdr(h, VIRTIO_BLK_T_DISCARD, 0);
    // 33 segments (max_discard_seg is 32).
    let segs: Vec<u8> = (0..33).flat_map(|i| segment(i * 8, 8, 0)).collect();
    b.g.write_mem(d, &segs);
    b.expect_refused(
        &[rd(h, 16), rd(d, segs.len() as u32), wr(s, 1)],
        Some(s),
        ERR,
    );
    // Thousands of segments.
    b.expect_refused(&[rd(h, 16), rd(d, 16 * 4096), wr(s, 1)], Some(s), ERR);
    // No segment, and a partial segment.
    b.expect_refused(&[rd(h, 16), wr(s, 1)], Some(s), ERR);
    b.expect_refused(&[rd(h, 16), rd(d, 24), wr(s, 1)], Some(s), ERR);
    // Segment split over descriptors is fine; a bad flag in the second one is not.
    let mut two = segment(0, 8, 0).to_vec();
    two.extend(segment(8, 8, 4));
    b.g.write_mem(d, &two);
    b.expect_refused(
        &[rd(h, 16), rd(d, 20), rd(d + 20, 12), wr(s, 1)],
        Some(s),
        ERR_OR_UNSUPP,
    );
    assert_eq!(b.disk.c.discards.load(Ordering::SeqCst), 0);
    assert_eq!(b.snapshot(), before);
    b.still_serves();
}

#[test]
fn bad_heads_overlaps_and_spurious_kicks() {
    let mut b = Bench::new();
    let (h, d, s) = (b.base, b.base + 0x1000, b.base + 0x3000);
    // A head index outside the ring cannot be retired; the queue goes on.
    b.g.publish(0, 500);
    b.g.assert_idle(0, 100);
    b.still_serves();
    // Spurious kicks.
    for _ in 0..10 {
        b.g.queues[0].kick.write(1).unwrap();
    }
    b.g.assert_idle(0, 50);
    // Overlapping device-writable buffers.
    b.hdr(h, VIRTIO_BLK_T_IN, 0);
    b.expect_refused(
        &[rd(h, 16), wr(d, 1024), wr(d + 512, 512), wr(s, 1)],
        Some(s),
        ERR,
    );
    // A batch of garbage chains published together: every one is retired.
    let mut heads = Vec::new();
    for i in 0..40u16 {
        let head = b.g.queues[0].next_desc;
        let flags = [0, F_WRITE, F_NEXT, F_INDIRECT, F_NEXT | F_WRITE][usize::from(i % 5)];
        let addr = [h, MEM_SIZE, u64::MAX, d][usize::from(i % 4)];
        b.g.put_desc(
            0,
            head,
            addr,
            u32::from(i) * 97,
            flags,
            (head + i) % QUEUE_SIZE,
        );
        b.g.queues[0].next_desc = (head + 1) % QUEUE_SIZE;
        heads.push(head);
    }
    b.g.publish_many(0, &heads);
    for _ in 0..40 {
        let (_, len) = b.g.wait_used(0);
        assert!(len <= 1);
    }
    b.still_serves();
}
