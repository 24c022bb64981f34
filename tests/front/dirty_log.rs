// SPDX-License-Identifier: Apache-2.0

//! Dirty-page logging for live migration, driven like QEMU does it: the frontend shares a
//! log (SET_LOG_BASE with LOG_SHMFD), sets `LOG_ALL` with SET_FEATURES, and expects every
//! guest page the daemon writes (read data, status byte, used ring) to be marked in it,
//! on the synchronous and on the io_uring path, until it clears `LOG_ALL` again.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::support::vu::*;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vhost_clone::virtio::{BlockBackend, IoEngine, ServeOptions};

const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
/// One bit per 4 KiB page of the guest's memory.
const LOG_LEN: u64 = MEM_SIZE / 4096 / 8;

/// The frontend's side of the log: a memfd it shares with SET_LOG_BASE.
struct Log(File);

impl Log {
    fn share(g: &mut Guest) -> Log {
        let name = c"dirty-log";
        // SAFETY: `name` is NUL-terminated; memfd_create returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(LOG_LEN).unwrap();
        g.fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: LOG_LEN,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }),
        )
        .unwrap();
        Log(file)
    }

    /// The marked pages, and the log cleared (as a migration pass does).
    fn take(&self) -> BTreeSet<u64> {
        let mut bits = vec![0u8; LOG_LEN as usize];
        self.0.read_exact_at(&mut bits, 0).unwrap();
        self.0
            .write_all_at(&vec![0u8; LOG_LEN as usize], 0)
            .unwrap();
        let mut pages = BTreeSet::new();
        for (i, b) in bits.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.insert(i as u64 * 8 + bit);
                }
            }
        }
        pages
    }
}

/// SET_FEATURES, and a GET_FEATURES after it as a barrier: SET_FEATURES has no reply
/// (no REPLY_ACK), and the daemon handles the messages of a connection in order, so
/// once GET_FEATURES answered the new features are in effect (a request kicked before
/// that could run under the old ones, which QEMU tolerates: it only marks more).
fn set_features(g: &mut Guest, features: u64) {
    g.fe.set_features(features).unwrap();
    g.fe.get_features().unwrap();
}

fn pages(addrs: &[u64]) -> BTreeSet<u64> {
    addrs.iter().map(|a| a / 4096).collect()
}

fn logs_what_the_daemon_writes(disk: Arc<dyn BlockBackend>, opts: ServeOptions) {
    let server = Server::start(disk, opts);
    let mut g = Guest::connect(&server.path, 1);
    // Acked without LOG_ALL at first, as QEMU does before a migration.
    let (offered, proto) = g.negotiate(LOG_ALL);
    assert_ne!(offered & LOG_ALL, 0, "LOG_ALL is not offered");
    assert!(proto.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    g.setup_memory();
    g.setup_queues(1, QUEUE_SIZE);
    let log = Log::share(&mut g);
    let data = pattern(16384, 9);
    assert_eq!(g.write(0, 0, &data), S_OK);
    assert_eq!(g.read(0, 0, 8192), (S_OK, data[..8192].to_vec()));
    assert_eq!(log.take(), BTreeSet::new(), "marked before LOG_ALL");

    // The layout of `Guest::request` on queue 0: data at 0x101000, status at 0x4ff000,
    // used ring (with avail_event) at 0x18000.
    let (data_at, status_at, used_at) = (0x10_1000, 0x4f_f000, 0x1_8000);
    let (plain, logging) = (g.features, g.features | LOG_ALL);
    set_features(&mut g, logging);
    assert_eq!(g.read(0, 8, 8192), (S_OK, data[4096..12288].to_vec()));
    assert_eq!(
        log.take(),
        pages(&[used_at, data_at, data_at + 4096, status_at]),
        "a read"
    );
    assert_eq!(g.write(0, 40, &data[..4096]), S_OK);
    assert_eq!(log.take(), pages(&[used_at, status_at]), "a write");
    let (st, _, id) = g.request(0, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!((st, &id[..14]), (S_OK, &b"vc-test-serial"[..]));
    assert_eq!(log.take(), pages(&[used_at, data_at, status_at]), "GET_ID");

    // Migration over (or failed): LOG_ALL cleared, nothing is marked any more.
    set_features(&mut g, plain);
    assert_eq!(g.read(0, 0, 8192).0, S_OK);
    assert_eq!(
        log.take(),
        BTreeSet::new(),
        "marked after LOG_ALL was cleared"
    );
    drop(g);
    server.stop();
}

#[test]
fn synchronous_queues_log_every_page_they_write() {
    logs_what_the_daemon_writes(MemDisk::new(1 << 20), opts(1));
}

#[test]
fn io_uring_queues_log_the_pages_the_kernel_wrote() {
    if !uring_available() {
        return;
    }
    let disk = FileDisk::new(1 << 20);
    let opts = ServeOptions {
        io_engine: IoEngine::Uring,
        ..opts(1)
    };
    logs_what_the_daemon_writes(disk.clone(), opts);
    assert!(
        disk.direct_done.load(std::sync::atomic::Ordering::SeqCst) >= 4,
        "the reads did not go through io_uring"
    );
}

/// QEMU sends SET_VRING_ADDR to running rings when it turns logging on or off.
/// vhost-user-backend then reloads the next used index from guest memory; if a queue
/// worker completed a request between that read and the store (a race this test fixes
/// in place by making the read stale), the next completion would overwrite the previous
/// one's used entry and the guest would wait for it forever.
#[test]
fn set_vring_addr_on_a_running_ring_keeps_its_used_index() {
    let server = Server::start(MemDisk::new(1 << 20), opts(1));
    let mut g = Guest::start(&server.path, 1);
    for i in 0..3 {
        assert_eq!(g.read(0, i * 8, 4096).0, S_OK);
    }
    let used_idx_at = g.queues[0].used + 2;
    // The stale read: the used index as it was three completions ago.
    g.write_mem(used_idx_at, &0u16.to_le_bytes());
    let config = g.vring_config(&g.queues[0], 1 << VHOST_VRING_F_LOG);
    g.fe.set_vring_addr(0, &config).unwrap();
    g.write_mem(used_idx_at, &3u16.to_le_bytes());
    // The next completion goes after the third one.
    assert_eq!(g.read(0, 0, 4096).0, S_OK);
    assert_eq!(g.used_idx(0), 4);
    drop(g);
    server.stop();
}

/// Bit of `VHOST_VRING_F_LOG` in SET_VRING_ADDR's flags.
const VHOST_VRING_F_LOG: u32 = 0;
