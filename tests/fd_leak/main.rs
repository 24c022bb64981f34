// SPDX-License-Identifier: Apache-2.0

//! Disconnect/reconnect cycles served by one `serve()` call, and no fd growth across them
//! (vhost-user-backend 0.24 leaks the exit eventfds; the server closes them). Alone in its
//! own test binary so that no other test opens fds in the same process meanwhile: a
//! separate target (docs/TESTING.md), not a module of `front`.

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use crate::support::vu::*;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn disconnect_and_reconnect() {
    let disk = MemDisk::new(4 << 20);
    let srv = Server::start(disk.clone(), opts(2));

    let mut g = Guest::start(&srv.path, 2);
    let p = pattern(4096, 3);
    assert_eq!(g.write(1, 40, &p), S_OK);
    g.set_wce(false);
    drop(g);

    let mut baseline = 0;
    for round in 0..6 {
        let mut g = Guest::start(&srv.path, 2);
        assert_eq!(g.read(0, 40, 4096), (S_OK, p.clone()));
        // The write-cache choice survives the reconnect (it is the backend's).
        assert_eq!(g.get_config(32, 1), vec![0]);
        // Stop the rings like QEMU does before closing.
        g.fe.set_vring_enable(0, false).unwrap();
        g.fe.set_vring_enable(1, false).unwrap();
        let b0 = g.fe.get_vring_base(0).unwrap();
        assert_eq!(b0, 1);
        drop(g);
        // Let the server notice the disconnect, drop the daemon and close its fds.
        std::thread::sleep(Duration::from_millis(150));
        if round == 1 {
            baseline = open_fds();
        } else if round > 1 {
            let t0 = Instant::now();
            while open_fds() > baseline && t0.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(open_fds() <= baseline, "fd leak across connections");
        }
    }
    srv.stop();
}
