// SPDX-License-Identifier: Apache-2.0

//! Two frontends on one socket, as a same-host live migration attaches them: the
//! incoming one connects and sets up its rings while the outgoing one still runs the
//! guest. Only one of them may run requests at a time; the other's wait in its ring
//! until the first stopped its queues (GET_VRING_BASE at switch-over) or went away.

use std::sync::Arc;

use crate::support::vu::*;
use vhost::VhostBackend;
use vhost_clone::virtio::handover::Frontends;
use vhost_clone::virtio::ServeOptions;

fn served() -> (Server, Arc<Frontends>) {
    let frontends = Arc::new(Frontends::default());
    let opts = ServeOptions {
        frontends: frontends.clone(),
        ..opts(2)
    };
    (Server::start(MemDisk::new(1 << 20), opts), frontends)
}

/// Publishes a 4 KiB read of sector `sector` on queue 0 of `g`; returns (head, data addr).
fn publish_read(g: &mut Guest, slot: u64, sector: u64) -> (u16, u64) {
    let (head, _, data) = g.prepare(0, slot, VIRTIO_BLK_T_IN, sector, &[], 4096);
    g.publish(0, head);
    (head, data)
}

#[test]
fn the_target_runs_only_after_the_source_stopped_its_queues() {
    let (server, frontends) = served();
    let mut source = Guest::start(&server.path, 2);
    let data = pattern(8192, 5);
    assert_eq!(source.write(0, 0, &data), S_OK);
    assert_eq!(source.write(1, 8, &data), S_OK);

    // The target attaches while the source runs; its request waits.
    let mut target = Guest::start(&server.path, 2);
    assert_eq!(frontends.report().connected, 2);
    let (head, at) = publish_read(&mut target, 0, 8);
    target.assert_idle(0, 300);
    // The source keeps running meanwhile.
    assert_eq!(source.read(1, 0, 4096), (S_OK, data[..4096].to_vec()));

    // Switch-over: the source stops its queues; only after the last one the target runs.
    source.fe.get_vring_base(0).unwrap();
    target.assert_idle(0, 200);
    source.fe.get_vring_base(1).unwrap();
    assert_eq!(target.wait_used(0).0, u32::from(head));
    assert_eq!(target.read_mem(at, 4096), data[4096..]);
    let r = frontends.report();
    assert_eq!((r.handovers, r.queue_owner), (1, Some(2)));

    // The source goes away after the migration; the target keeps the disk.
    drop(source);
    assert_eq!(target.write(1, 64, &data), S_OK);
    assert_eq!(target.read(0, 64, 8192), (S_OK, data.clone()));
    drop(target);
    server.stop();
}

#[test]
fn a_source_that_dies_mid_migration_hands_over_and_a_target_that_dies_changes_nothing() {
    let (server, frontends) = served();
    let mut source = Guest::start(&server.path, 2);
    let data = pattern(4096, 7);
    assert_eq!(source.write(0, 0, &data), S_OK);

    // A target that fails half-way leaves the source running.
    let mut target = Guest::start(&server.path, 2);
    let _ = publish_read(&mut target, 0, 0);
    target.assert_idle(0, 200);
    drop(target);
    assert_eq!(source.read(0, 0, 4096), (S_OK, data.clone()));
    assert_eq!(source.write(1, 16, &data), S_OK);
    assert_eq!(frontends.report().handovers, 0);

    // A source that dies with its queues running (QEMU killed): the target takes over.
    let mut target = Guest::start(&server.path, 2);
    let (head, at) = publish_read(&mut target, 0, 16);
    target.assert_idle(0, 200);
    drop(source);
    assert_eq!(target.wait_used(0).0, u32::from(head));
    assert_eq!(target.read_mem(at, 4096), data);
    assert_eq!(frontends.report().handovers, 1);
    drop(target);
    server.stop();
}

/// At a migration's switch-over (a queue stopped while `LOG_ALL` is on) the daemon
/// commits what the queue completed, so that a daemon on another host that takes the
/// clone over has it even if this one dies; a queue stopped with logging off (a
/// reconnect, a guest reset) does not add a flush.
#[test]
fn the_switch_over_commits_what_the_source_completed() {
    const LOG_ALL: u64 = vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits();
    for logging in [false, true] {
        let disk = MemDisk::new(1 << 20);
        let server = Server::start(disk.clone(), opts(1));
        let mut g = Guest::connect(&server.path, 1);
        g.negotiate(LOG_ALL);
        g.setup_memory();
        g.setup_queues(1, QUEUE_SIZE);
        if logging {
            g.fe.set_features(g.features | LOG_ALL).unwrap();
        }
        assert_eq!(g.write(0, 0, &pattern(4096, 3)), S_OK);
        let before = disk.c.flushes.load(std::sync::atomic::Ordering::SeqCst);
        g.fe.get_vring_base(0).unwrap();
        let after = disk.c.flushes.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(after - before, u64::from(logging), "logging {logging}");
        drop(g);
        server.stop();
    }
}
