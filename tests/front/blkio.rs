// SPDX-License-Identifier: Apache-2.0

//! An independent frontend: libblkio's Rust crate (`blkio` 0.5, driver
//! `virtio-blk-vhost-user`, which uses virtio-driver 0.6) against `serve()`.

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::vu::*;
use blkio::{Blkio, Blkioq, Completion, ReqFlags};

fn complete(q: &mut Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut out = Vec::new();
    while out.len() < n {
        let mut c = [const { MaybeUninit::<Completion>::uninit() }; 8];
        let mut timeout = Duration::from_secs(10);
        let got = q.do_io(&mut c, 1, Some(&mut timeout), None).expect("do_io");
        assert!(got > 0, "blkio request timed out");
        for comp in &c[..got] {
            // SAFETY: do_io initialised the first `got` completions.
            let comp = unsafe { comp.assume_init_ref() };
            out.push((comp.user_data, comp.ret));
        }
    }
    out
}

#[test]
fn blkio_virtio_blk_vhost_user() {
    let size = 16usize << 20;
    let disk = MemDisk::new(size);
    let srv = Server::start(disk.clone(), opts(2));

    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", srv.path.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    assert_eq!(b.get_u64("capacity").unwrap(), size as u64);
    b.set_i32("num-queues", 2).unwrap();
    let mut started = b.start().unwrap();
    assert_eq!(started.queues.len(), 2);
    assert!(!b.get_bool("read-only").unwrap());

    let align = b.get_u64("mem-region-alignment").unwrap() as usize;
    let len = (1usize << 20).next_multiple_of(align);
    let region = b.alloc_mem_region(len).unwrap();
    b.map_mem_region(&region).unwrap();
    let buf = region.addr as *mut u8;
    // SAFETY: the region is `len` bytes of memory owned by `b` until it is dropped.
    let mem = unsafe { std::slice::from_raw_parts_mut(buf, len) };

    let p = pattern(65536, 11);
    mem[..65536].copy_from_slice(&p);
    let (q0, rest) = started.queues.split_first_mut().unwrap();
    let q1 = &mut rest[0];

    q0.write(1 << 20, buf, 65536, 1, ReqFlags::empty());
    assert_eq!(complete(q0, 1), vec![(1, 0)]);
    assert_eq!(disk.get(1 << 20, 65536), p);

    mem[65536..131072].fill(0);
    // SAFETY: pointer arithmetic inside the mapped region.
    let rbuf = unsafe { buf.add(65536) };
    q1.read(1 << 20, rbuf, 65536, 2, ReqFlags::empty());
    assert_eq!(complete(q1, 1), vec![(2, 0)]);
    assert_eq!(&mem[65536..131072], &p[..]);

    let f0 = disk.c.flushes.load(Ordering::SeqCst);
    q0.flush(3, ReqFlags::empty());
    assert_eq!(complete(q0, 1), vec![(3, 0)]);
    assert_eq!(disk.c.flushes.load(Ordering::SeqCst), f0 + 1);

    q0.discard(0, 65536, 4, ReqFlags::empty());
    assert_eq!(complete(q0, 1), vec![(4, 0)]);
    assert_eq!(disk.get(0, 65536), vec![0; 65536]);
    assert!(disk.c.discards.load(Ordering::SeqCst) >= 1);

    q1.write_zeroes(1 << 20, 4096, 5, ReqFlags::empty());
    assert_eq!(complete(q1, 1), vec![(5, 0)]);
    assert_eq!(disk.get(1 << 20, 4096), vec![0; 4096]);
    assert!(disk.c.write_zeroes.load(Ordering::SeqCst) >= 1);

    // Many requests in flight on one queue.
    for i in 0..16usize {
        // SAFETY: 16 * 4096 bytes past 128 KiB stay inside the 1 MiB region.
        let p = unsafe { buf.add(131072 + i * 4096) };
        q0.read((i * 4096) as u64, p, 4096, 100 + i, ReqFlags::empty());
    }
    let mut done = complete(q0, 16);
    done.sort();
    assert_eq!(done, (0..16).map(|i| (100 + i, 0)).collect::<Vec<_>>());

    // Out of range read fails cleanly.
    q0.read(size as u64, buf, 4096, 200, ReqFlags::empty());
    let r = complete(q0, 1);
    assert_eq!(r[0].0, 200);
    assert_ne!(r[0].1, 0);

    drop(started);
    drop(b);
    srv.stop();
}
