// SPDX-License-Identifier: Apache-2.0

//! Shared test harness: an in-memory `BlockBackend`, a `serve()` running in a thread on a
//! real unix socket, and a small vhost-user frontend (vhost crate `Frontend`, memfd guest
//! memory, split virtqueues laid out by hand) that plays the guest.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_clone::storage::aio::{DirectIo, DirectIoAccount, IoTarget};
use vhost_clone::storage::IoFd;
use vhost_clone::virtio::{serve, BlockBackend, ServeOptions, ShutdownSignal};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// virtio-blk and virtio feature bits (VIRTIO_BLK_F_*, VIRTIO_RING_F_*,
/// VIRTIO_F_VERSION_1), for [`Guest::has`].
pub const F_SEG_MAX: u32 = 2;
pub const F_RO: u32 = 5;
pub const F_BLK_SIZE: u32 = 6;
pub const F_FLUSH: u32 = 9;
pub const F_TOPOLOGY: u32 = 10;
pub const F_CONFIG_WCE: u32 = 11;
pub const F_MQ: u32 = 12;
pub const F_DISCARD: u32 = 13;
pub const F_WRITE_ZEROES: u32 = 14;
pub const F_INDIRECT_DESC: u32 = 28;
pub const F_EVENT_IDX: u32 = 29;
pub const F_VERSION_1: u32 = 32;

/// The little-endian u32 at `off` of `b` (a field of the device config space).
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Descriptor flags (VIRTQ_DESC_F_*).
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Guest memory size of the test frontend.
pub const MEM_SIZE: u64 = 32 << 20;
pub const QUEUE_SIZE: u16 = 128;

// ---------------------------------------------------------------------------------------
// In-memory backend

#[derive(Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub unmaps: AtomicU64,
}

pub struct MemDisk {
    pub data: Mutex<Vec<u8>>,
    pub read_only: bool,
    pub opt_io: u32,
    pub wce: AtomicBool,
    pub c: Counters,
    /// Writes not yet flushed (for write-through checks).
    pub dirty: AtomicU64,
    /// Make data operations fail with EIO.
    pub fail: AtomicBool,
    /// Make data operations fail with `Unsupported`.
    pub unsupported: AtomicBool,
    /// When enabled, each read waits (up to 5 s) until `RENDEZVOUS` reads are inside
    /// `read` at the same time; `met` records that they were.
    pub rv: Mutex<(bool, u32)>,
    pub rv_cv: std::sync::Condvar,
    pub met: AtomicBool,
}

pub const RENDEZVOUS: u32 = 2;

impl MemDisk {
    pub fn new(size: usize) -> Arc<Self> {
        Self::with(size, false)
    }

    pub fn with(size: usize, read_only: bool) -> Arc<Self> {
        let mut data = vec![0u8; size];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 512) as u8 ^ (i as u8).wrapping_mul(7);
        }
        Arc::new(MemDisk {
            data: Mutex::new(data),
            read_only,
            opt_io: 65536,
            wce: AtomicBool::new(true),
            c: Counters::default(),
            dirty: AtomicU64::new(0),
            fail: AtomicBool::new(false),
            unsupported: AtomicBool::new(false),
            rv: Mutex::new((false, 0)),
            rv_cv: std::sync::Condvar::new(),
            met: AtomicBool::new(false),
        })
    }

    pub fn get(&self, off: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[off..off + len].to_vec()
    }

    fn check(&self) -> io::Result<()> {
        if self.unsupported.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        if self.fail.load(Ordering::SeqCst) {
            Err(io::Error::other("injected failure"))
        } else {
            Ok(())
        }
    }

    fn rendezvous(&self) {
        let mut g = self.rv.lock().unwrap();
        if !g.0 {
            return;
        }
        g.1 += 1;
        self.rv_cv.notify_all();
        let (g, _) = self
            .rv_cv
            .wait_timeout_while(g, Duration::from_secs(5), |g| g.1 < RENDEZVOUS)
            .unwrap();
        if g.1 >= RENDEZVOUS {
            self.met.store(true, Ordering::SeqCst);
        }
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn optimal_io_size(&self) -> u32 {
        self.opt_io
    }
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.check()?;
        self.rendezvous();
        self.c.reads.fetch_add(1, Ordering::SeqCst);
        let d = self.data.lock().unwrap();
        let mut off = offset as usize;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&d[off..off + n]);
            off += n;
        }
        Ok(())
    }
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.check()?;
        self.c.writes.fetch_add(1, Ordering::SeqCst);
        let mut d = self.data.lock().unwrap();
        let mut off = offset as usize;
        for b in bufs {
            d[off..off + b.len()].copy_from_slice(b);
            off += b.len();
        }
        self.dirty.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.check()?;
        self.c.flushes.fetch_add(1, Ordering::SeqCst);
        self.dirty.store(0, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        self.c.discards.fetch_add(1, Ordering::SeqCst);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        self.dirty.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check()?;
        self.c.write_zeroes.fetch_add(1, Ordering::SeqCst);
        if unmap {
            self.c.unmaps.fetch_add(1, Ordering::SeqCst);
        }
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        self.dirty.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn write_cache(&self) -> bool {
        self.wce.load(Ordering::SeqCst)
    }
    fn set_write_cache(&self, writeback: bool) {
        self.wce.store(writeback, Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// A file that grants io_uring permits

/// A file-backed disk that lets the front issue reads and writes itself, and counts.
pub struct FileDisk {
    pub file: std::fs::File,
    pub size: u64,
    /// Permits granted.
    pub direct_started: AtomicU64,
    /// Permits ended, however.
    pub direct_ended: AtomicU64,
    /// Permits finished after their request was issued.
    pub direct_done: AtomicU64,
    pub direct_writes_done: AtomicU64,
    /// Value of `direct_done` at each flush.
    pub flushes_saw: std::sync::Mutex<Vec<u64>>,
}

impl FileDisk {
    pub fn new(size: u64) -> Arc<FileDisk> {
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        Arc::new(FileDisk {
            file,
            size,
            direct_started: AtomicU64::new(0),
            direct_ended: AtomicU64::new(0),
            direct_done: AtomicU64::new(0),
            direct_writes_done: AtomicU64::new(0),
            flushes_saw: std::sync::Mutex::new(Vec::new()),
        })
    }
}

impl BlockBackend for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn optimal_io_size(&self) -> u32 {
        4096
    }
    fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.file.read_exact_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    fn write(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.file.write_all_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes_saw
            .lock()
            .unwrap()
            .push(self.direct_done.load(Ordering::SeqCst));
        self.file.sync_data()
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.file.write_all_at(&vec![0u8; len as usize], offset)
    }
    fn write_cache(&self) -> bool {
        true
    }
    fn set_write_cache(&self, _writeback: bool) {}
    fn direct_io(&self, write: bool, _offset: u64, len: u64) -> Option<DirectIo<'_>> {
        let target = IoTarget::Fd(IoFd {
            fd: self.file.as_raw_fd(),
            align: 1,
        });
        Some(DirectIo::grant(self, target, write, len))
    }
}

impl DirectIoAccount for FileDisk {
    fn started(&self) {
        self.direct_started.fetch_add(1, Ordering::SeqCst);
    }
    fn finished(&self, write: bool, _len: u64, outcome: Option<bool>, _maybe_written: bool) {
        if let Some(ok) = outcome {
            if write && ok {
                self.direct_writes_done.fetch_add(1, Ordering::SeqCst);
            }
            self.direct_done.fetch_add(1, Ordering::SeqCst);
        }
        self.direct_ended.fetch_add(1, Ordering::SeqCst);
    }
}

/// Whether this kernel offers io_uring (the daemon falls back to synchronous queues
/// where it does not; these tests are about the io_uring path and are then skipped).
pub fn uring_available() -> bool {
    match io_uring::IoUring::new(1) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: io_uring is not available here ({e})");
            false
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server in a thread

pub struct Server {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub shutdown: ShutdownSignal,
    pub thread: Option<JoinHandle<Result<(), vhost_clone::virtio::VirtioError>>>,
}

impl Server {
    pub fn start(disk: Arc<dyn BlockBackend>, opts: ServeOptions) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vub.sock");
        let mut opts = opts;
        opts.socket_path = Some(path.clone());
        let shutdown = ShutdownSignal::new().unwrap();
        let sd = shutdown.clone();
        let backend = disk;
        let thread = std::thread::spawn(move || serve(backend, &opts, &sd));
        let t0 = Instant::now();
        while !path.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Server {
            dir,
            path,
            shutdown,
            thread: Some(thread),
        }
    }

    pub fn stop(mut self) {
        self.shutdown.trigger();
        let r = self.thread.take().unwrap().join().unwrap();
        r.unwrap();
        assert!(!self.path.exists(), "socket left behind");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn opts(num_queues: u16) -> ServeOptions {
    ServeOptions {
        num_queues,
        queue_size: 256,
        serial: "vc-test-serial".into(),
        ..ServeOptions::default()
    }
}

// ---------------------------------------------------------------------------------------
// Guest side

pub fn memfd_memory(size: u64) -> GuestMemoryMmap<()> {
    let name = std::ffi::CString::new("vfront-guest").unwrap();
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// One split virtqueue driven by the test.
pub struct TestQueue {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
    /// Data area for this queue's buffers.
    pub data: u64,
    pub calls: u64,
}

/// One descriptor as the test wants it.
#[derive(Clone, Copy, Debug)]
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

pub fn rd(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: 0,
    }
}
pub fn wr(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        flags: F_WRITE,
    }
}

pub struct Guest {
    pub fe: Frontend,
    pub mem: GuestMemoryMmap<()>,
    pub queues: Vec<TestQueue>,
    pub features: u64,
    /// The in-flight area the backend gave (GET_INFLIGHT_FD), kept like QEMU keeps it
    /// for the backend's restarts.
    pub inflight: Option<(VhostUserInflight, File)>,
}

pub fn header(t: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

pub fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

impl Guest {
    /// Connect and negotiate, without setting up rings.
    pub fn connect(path: &Path, max_queues: u64) -> Guest {
        let mem = memfd_memory(MEM_SIZE);
        Guest {
            fe: frontend(path, max_queues),
            mem,
            queues: Vec::new(),
            features: 0,
            inflight: None,
        }
    }

    /// The QEMU-like start sequence. `mask` removes feature bits from what is acked.
    pub fn negotiate(&mut self, mask: u64) -> (u64, VhostUserProtocolFeatures) {
        let features = self.fe.get_features().unwrap();
        let proto = self.fe.get_protocol_features().unwrap();
        self.fe.set_protocol_features(proto).unwrap();
        self.fe.set_owner().unwrap();
        self.features = features & !mask;
        self.fe.set_features(self.features).unwrap();
        (features, proto)
    }

    pub fn setup_memory(&mut self) {
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        self.fe.set_mem_table(&[info]).unwrap();
    }

    pub fn setup_queues(&mut self, n: usize, size: u16) {
        for i in 0..n {
            let base = 0x10000 + i as u64 * 0x10000;
            let q = TestQueue {
                index: i,
                size,
                desc: base,
                avail: base + 0x4000,
                used: base + 0x8000,
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                call: EventFd::new(EFD_NONBLOCK).unwrap(),
                next_desc: 0,
                avail_idx: 0,
                used_seen: 0,
                data: 0x100000 + i as u64 * 0x400000,
                calls: 0,
            };
            self.queues.push(q);
            self.start_ring(i, 0);
        }
    }

    /// Sets up and enables ring `i` with `base` as its next avail index.
    fn start_ring(&mut self, i: usize, base: u16) {
        let config = self.vring_config(&self.queues[i], 0);
        let (q, fe) = (&self.queues[i], &mut self.fe);
        fe.set_vring_num(i, q.size).unwrap();
        fe.set_vring_base(i, base).unwrap();
        fe.set_vring_addr(i, &config).unwrap();
        fe.set_vring_call(i, &q.call).unwrap();
        fe.set_vring_kick(i, &q.kick).unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }

    /// SET_VRING_ADDR's data for `q` (QEMU sets `flags` to VHOST_VRING_F_LOG while it
    /// migrates the guest).
    pub fn vring_config(&self, q: &TestQueue, flags: u32) -> VringConfigData {
        let host = |a: u64| self.mem.get_host_address(GuestAddress(a)).unwrap() as u64;
        VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags,
            desc_table_addr: host(q.desc),
            used_ring_addr: host(q.used),
            avail_ring_addr: host(q.avail),
            log_addr: (flags != 0).then_some(q.used),
        }
    }

    /// QEMU's vhost-user-blk start with INFLIGHT_SHMFD: GET_INFLIGHT_FD for `n` rings of
    /// QUEUE_SIZE, then SET_INFLIGHT_FD with what it returned (before the rings are set
    /// up). The area is kept in `self.inflight`.
    pub fn share_inflight(&mut self, n: u16) {
        let ask = VhostUserInflight::new(0, 0, n, QUEUE_SIZE);
        let (info, file) = self.fe.get_inflight_fd(&ask).unwrap();
        self.fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
        self.inflight = Some((info, file));
    }

    /// What QEMU does when its backend died and a new one listens on `path`: a new
    /// connection, the same negotiation and memory, the kept in-flight area, and every
    /// ring set up again at the same addresses with the used index in guest memory as
    /// its base (GET_VRING_BASE failed on the dead backend).
    pub fn reconnect(&mut self, path: &Path) {
        let n = self.queues.len();
        self.fe = frontend(path, n as u64);
        // The same features as before: mask everything else.
        self.negotiate(!self.features);
        self.setup_memory();
        if let Some((info, file)) = &self.inflight {
            self.fe.set_inflight_fd(info, file.as_raw_fd()).unwrap();
        }
        for i in 0..n {
            let base = self.used_idx(i);
            self.queues[i].kick = EventFd::new(EFD_NONBLOCK).unwrap();
            self.queues[i].call = EventFd::new(EFD_NONBLOCK).unwrap();
            self.start_ring(i, base);
            // The guest's driver kicks again when it sees nothing complete.
            self.queues[i].kick.write(1).unwrap();
        }
    }

    /// Everything a test usually needs: all features, memory, `n` queues.
    pub fn start(path: &Path, n: usize) -> Guest {
        let mut g = Guest::connect(path, n as u64);
        g.negotiate(0);
        g.setup_memory();
        g.setup_queues(n, QUEUE_SIZE);
        g
    }

    pub fn get_config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .fe
            .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)
            .unwrap();
        data
    }

    pub fn set_wce(&mut self, wb: bool) {
        self.fe
            .set_config(32, VhostUserConfigFlags::WRITABLE, &[u8::from(wb)])
            .unwrap();
    }

    pub fn write_mem(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn write_desc(&self, table: u64, idx: u16, d: D, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.write_mem(table + u64::from(idx) * 16, &raw);
    }

    /// Put a chain of descriptors, linked in order with NEXT, at the next free table slots;
    /// returns the head.
    pub fn add_chain(&mut self, q: usize, descs: &[D]) -> u16 {
        let (table, size) = (self.queues[q].desc, self.queues[q].size);
        let head = self.queues[q].next_desc;
        let mut idx = head;
        for (i, d) in descs.iter().enumerate() {
            let next = (idx + 1) % size;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= F_NEXT;
            }
            self.write_desc(table, idx, d, if i + 1 < descs.len() { next } else { 0 });
            idx = next;
        }
        self.queues[q].next_desc = idx;
        head
    }

    /// Write raw descriptors at explicit indices (hostile chains).
    pub fn put_desc(&self, q: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc(self.queues[q].desc, idx, D { addr, len, flags }, next);
    }

    /// Write an indirect table at `at` with the given descriptors linked in order.
    pub fn put_indirect(&self, at: u64, descs: &[D]) {
        for (i, d) in descs.iter().enumerate() {
            let mut d = *d;
            let next = if i + 1 < descs.len() {
                d.flags |= F_NEXT;
                i as u16 + 1
            } else {
                0
            };
            self.write_desc(at, i as u16, d, next);
        }
    }

    /// Publish `head` in the avail ring and kick.
    pub fn publish(&mut self, q: usize, head: u16) {
        let tq = &self.queues[q];
        let slot = u64::from(tq.avail_idx % tq.size);
        self.write_mem(tq.avail + 4 + slot * 2, &head.to_le_bytes());
        // used_event: ask to be notified for the next completion.
        let ue_addr = tq.avail + 4 + u64::from(tq.size) * 2;
        self.write_mem(ue_addr, &tq.used_seen.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        let new_idx = tq.avail_idx.wrapping_add(1);
        self.write_mem(tq.avail + 2, &new_idx.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        self.queues[q].avail_idx = new_idx;
        self.queues[q].kick.write(1).unwrap();
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        let b = self.read_mem(self.queues[q].used + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Wait for the next used element on queue `q`: (id, len). Panics after 10 s.
    pub fn wait_used(&mut self, q: usize) -> (u32, u32) {
        let t0 = Instant::now();
        loop {
            std::sync::atomic::fence(Ordering::SeqCst);
            if self.used_idx(q) != self.queues[q].used_seen {
                let tq = &self.queues[q];
                let slot = u64::from(tq.used_seen % tq.size);
                let e = self.read_mem(tq.used + 4 + slot * 8, 8);
                self.queues[q].used_seen = tq.used_seen.wrapping_add(1);
                let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                return (id, len);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "queue {q}: no completion (hang)"
            );
            self.count_calls(q, 20);
        }
    }

    /// Waits up to `ms` for queue `q`'s call eventfd, then adds the notifications
    /// it holds (the eventfd sums them) to the queue's count.
    fn count_calls(&mut self, q: usize, ms: i32) {
        let mut pfd = libc::pollfd {
            fd: self.queues[q].call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, borrowed for the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        if let Ok(n) = self.queues[q].call.read() {
            self.queues[q].calls += n;
        }
    }

    /// The call notifications of queue `q` so far: those `wait_used` saw, plus
    /// those it never waited for (a completion already in the used ring when it
    /// looked; the eventfd adds them up), waiting up to `ms` for one to arrive.
    pub fn calls(&mut self, q: usize, ms: i32) -> u64 {
        // Wait only when none was seen yet.
        let wait = if self.queues[q].calls == 0 { ms } else { 0 };
        self.count_calls(q, wait);
        self.queues[q].calls
    }

    /// Waits for queue `q`'s next call notification (an interrupt), as a driver that
    /// sleeps until interrupted does. Panics after 10 s.
    pub fn wait_interrupt(&mut self, q: usize) {
        let (t0, before) = (Instant::now(), self.queues[q].calls);
        while self.queues[q].calls == before {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "queue {q}: no interrupt (hang)"
            );
            self.count_calls(q, 20);
        }
    }

    /// Assert nothing completes on `q` within `ms`.
    pub fn assert_idle(&mut self, q: usize, ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
        assert_eq!(
            self.used_idx(q),
            self.queues[q].used_seen,
            "unexpected completion"
        );
    }

    /// Lay out a standard request in buffer slot `slot` of queue `q` (each slot has 64 KiB)
    /// and add its chain, without publishing. Returns (head, status addr, data addr).
    pub fn prepare(
        &mut self,
        q: usize,
        slot: u64,
        t: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> (u16, u64, u64) {
        let base = self.queues[q].data + 0x20_0000 + slot * 0x10000;
        let (hdr, status, data) = (base, base + 16, base + 0x200);
        assert!(out.len() as u64 <= 0xfe00 && u64::from(in_len) <= 0xfe00);
        let head = self.standard_chain(q, [hdr, status, data], t, sector, out, in_len);
        (head, status, data)
    }

    /// Writes a standard request's header, status placeholder and out data at
    /// `[hdr, status, data]` and adds its chain (header, data, 1-byte status).
    #[allow(clippy::too_many_arguments)]
    fn standard_chain(
        &mut self,
        q: usize,
        [hdr, status, data]: [u64; 3],
        t: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> u16 {
        self.write_mem(hdr, &header(t, sector));
        self.write_mem(status, &[0xff]);
        let mut descs = vec![rd(hdr, 16)];
        if !out.is_empty() {
            self.write_mem(data, out);
            descs.push(rd(data, out.len() as u32));
        }
        if in_len > 0 {
            descs.push(wr(data, in_len));
        }
        descs.push(wr(status, 1));
        self.add_chain(q, &descs)
    }

    /// Publish several heads at once with one kick.
    pub fn publish_many(&mut self, q: usize, heads: &[u16]) {
        let tq = &self.queues[q];
        let mut idx = tq.avail_idx;
        for h in heads {
            let slot = u64::from(idx % tq.size);
            self.write_mem(tq.avail + 4 + slot * 2, &h.to_le_bytes());
            idx = idx.wrapping_add(1);
        }
        let ue_addr = tq.avail + 4 + u64::from(tq.size) * 2;
        self.write_mem(ue_addr, &tq.used_seen.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        self.write_mem(tq.avail + 2, &idx.to_le_bytes());
        std::sync::atomic::fence(Ordering::SeqCst);
        self.queues[q].avail_idx = idx;
        self.queues[q].kick.write(1).unwrap();
    }

    /// Submit a standard request: header, data descriptors, 1-byte status descriptor.
    /// Returns (status, used len). `data` are (len, device_writable) at the queue's data
    /// area; out data is taken from `payload`.
    pub fn request(
        &mut self,
        q: usize,
        t: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> (u8, u32, Vec<u8>) {
        let base = self.queues[q].data;
        let hdr = base;
        let data = base + 0x1000;
        let status = base + 0x3f_f000;
        let head = self.standard_chain(q, [hdr, status, data], t, sector, out, in_len);
        self.publish(q, head);
        let (id, len) = self.wait_used(q);
        assert_eq!(id, u32::from(head));
        let st = self.read_mem(status, 1)[0];
        let got = if in_len > 0 {
            self.read_mem(data, in_len as usize)
        } else {
            Vec::new()
        };
        (st, len, got)
    }

    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let (st, used, data) = self.request(q, VIRTIO_BLK_T_IN, sector, &[], len);
        if st == S_OK {
            assert_eq!(used, len + 1);
        }
        (st, data)
    }

    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        let (st, used, _) = self.request(q, VIRTIO_BLK_T_OUT, sector, data, 0);
        assert_eq!(used, 1);
        st
    }

    pub fn flush(&mut self, q: usize) -> u8 {
        self.request(q, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0
    }

    /// Submit a chain given by descriptors (header etc. already in memory) and return
    /// (id, used len).
    pub fn submit(&mut self, q: usize, descs: &[D]) -> (u16, u32) {
        let head = self.add_chain(q, descs);
        self.publish(q, head);
        let (id, len) = self.wait_used(q);
        assert_eq!(id, u32::from(head), "wrong head retired");
        (head, len)
    }

    pub fn has(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }
}

/// A frontend connected to `path` that, like QEMU with REPLY_ACK, waits for the
/// backend to ack each message.
fn frontend(path: &Path, max_queues: u64) -> Frontend {
    let fe = Frontend::connect(path, max_queues).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
