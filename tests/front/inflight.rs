// SPDX-License-Identifier: Apache-2.0

//! In-flight tracking (INFLIGHT_SHMFD) across a backend restart, driven like QEMU does
//! it: the frontend keeps the area the backend created, gives it to the next backend,
//! and sets every ring's base to the used index (GET_VRING_BASE failed on the dead
//! one). The new backend must run exactly the requests the dead one popped and did not
//! complete, in the order they were popped, and none it completed, even out of order.
//! The dead backend's state is written into the area by hand, in the layout of the
//! vhost-user specification, so these tests also pin that layout.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::support::vu::*;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::VhostUserFrontend;

/// Where entry `head` of queue 0 starts in the area.
fn entry(head: u16) -> u64 {
    16 + 16 * u64::from(head)
}

#[test]
fn a_new_backend_runs_exactly_the_requests_a_dead_one_left_in_flight() {
    let disk = MemDisk::new(1 << 20);
    let first = Server::start(disk.clone(), opts(1));
    let mut g = Guest::connect(&first.path, 1);
    g.negotiate(0);
    g.setup_memory();
    g.share_inflight(1);
    g.setup_queues(1, QUEUE_SIZE);
    // Requests completed normally leave nothing in flight.
    for i in 0..3u8 {
        assert_eq!(g.write(0, u64::from(i) * 8, &pattern(4096, i)), S_OK);
    }
    first.stop();

    // What a daemon killed with three writes popped leaves: X and Z in flight, Y
    // completed out of order (its used entry published and recorded).
    let data = [pattern(4096, 100), pattern(4096, 101), pattern(4096, 102)];
    let sectors = [64u64, 72, 80];
    let heads: Vec<(u16, u64)> = (0..3)
        .map(|i| {
            let (head, status, _) = g.prepare(
                0,
                i,
                VIRTIO_BLK_T_OUT,
                sectors[i as usize],
                &data[i as usize],
                0,
            );
            (head, status)
        })
        .collect();
    let (x, y, z) = (heads[0].0, heads[1].0, heads[2].0);
    g.publish_many(0, &[x, y, z]);
    let used = g.queues[0].used;
    g.write_mem(heads[1].1, &[S_OK]);
    g.write_mem(
        used + 4 + 3 * 8,
        &[&u32::from(y).to_le_bytes()[..], &1u32.to_le_bytes()].concat(),
    );
    g.write_mem(used + 2, &4u16.to_le_bytes());
    let area = g.inflight.as_ref().unwrap().1.try_clone().unwrap();
    for (head, counter, inflight) in [(x, 10u64, 1u8), (y, 11, 0), (z, 12, 1)] {
        area.write_all_at(&[inflight], entry(head)).unwrap();
        area.write_all_at(&counter.to_le_bytes(), entry(head) + 8)
            .unwrap();
    }
    area.write_all_at(&y.to_le_bytes(), 12).unwrap(); // last_batch_head
    area.write_all_at(&4u16.to_le_bytes(), 14).unwrap(); // used_idx

    let second = Server::start(disk.clone(), opts(1));
    g.reconnect(&second.path);
    // The guest sees Y (completed by the dead daemon), then X and Z, in pop order.
    let ids: Vec<u32> = (0..3).map(|_| g.wait_used(0).0).collect();
    assert_eq!(ids, [u32::from(y), u32::from(x), u32::from(z)]);
    g.assert_idle(0, 200);
    assert_eq!(disk.get(64 * 512, 4096), data[0]);
    assert_eq!(disk.get(80 * 512, 4096), data[2]);
    assert_ne!(disk.get(72 * 512, 4096), data[1], "Y ran again");
    // Nothing is left in flight in the area, and the ring goes on.
    let mut raw = [0u8; 1];
    for h in [x, z] {
        area.read_exact_at(&mut raw, entry(h)).unwrap();
        assert_eq!(raw[0], 0, "head {h} still in flight");
    }
    assert_eq!(g.write(0, 96, &data[1]), S_OK);
    assert_eq!(g.read(0, 96, 4096), (S_OK, data[1].clone()));
    second.stop();
}

#[test]
fn a_bad_area_is_refused_and_a_garbled_one_falls_back_to_in_order() {
    let server = Server::start(MemDisk::new(1 << 20), opts(1));
    let start = || {
        let mut g = Guest::connect(&server.path, 1);
        g.negotiate(0);
        g.setup_memory();
        g.share_inflight(1);
        let (info, file) = g.inflight.take().unwrap();
        (g, info, file)
    };
    // Too small for its rings, more rings than the device, and rings it cannot have:
    // refused (which ends that frontend's connection).
    for (what, shape) in [
        ("too small", (64, 1, QUEUE_SIZE)),
        ("9 rings", (0, 9, QUEUE_SIZE)),
        ("rings of 100", (0, 1, 100)),
    ] {
        let (mut g, info, file) = start();
        let size = if shape.0 == 0 {
            info.mmap_size
        } else {
            shape.0
        };
        let bad = VhostUserInflight::new(size, 0, shape.1, shape.2);
        assert!(
            g.fe.set_inflight_fd(&bad, file.as_raw_fd()).is_err(),
            "{what}"
        );
    }
    // An area whose version this daemon does not know: the queue continues from the
    // used index and the area starts afresh (version 1, the head recorded and cleared).
    let (mut g, info, file) = start();
    file.write_all_at(&7u16.to_le_bytes(), 8).unwrap();
    file.write_all_at(&[1], entry(0)).unwrap();
    g.fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    g.setup_queues(1, QUEUE_SIZE);
    assert_eq!(g.write(0, 0, &pattern(4096, 3)), S_OK);
    assert_eq!(g.read(0, 0, 4096), (S_OK, pattern(4096, 3)));
    let mut raw = [0u8; 2];
    file.read_exact_at(&mut raw, 8).unwrap();
    assert_eq!(u16::from_le_bytes(raw), 1, "the area was not reset");
    file.read_exact_at(&mut raw[..1], entry(0)).unwrap();
    assert_eq!(raw[0], 0, "a stale entry survived the reset");
    drop(g);
    server.stop();
}
