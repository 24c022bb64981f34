// SPDX-License-Identifier: Apache-2.0

//! The vhost-user-blk front: everything between a VMM's vhost-user socket and a
//! [`BlockBackend`].
//!
//! This module owns the socket (binding, inherited fds, one connection after another), the
//! virtio feature and config-space negotiation, the virtqueues, and the translation of guest
//! descriptor chains into typed block requests. It knows nothing about regions, hydration or
//! metadata: it hands validated byte ranges and guest-memory slices to the backend and writes
//! the status byte the backend's answer maps to.
//!
//! Layout:
//! - [`config`]: feature bits, protocol features, [`config::DeviceSpec`] and the config
//!   space (the kernel's `virtio_blk_config`).
//! - [`dirty`]: the dirty-page log of live migration (`VHOST_F_LOG_ALL`): every guest page
//!   the daemon writes is marked before its request is retired.
//! - [`handover`]: the frontends attached at once (a same-host migration's source and
//!   target) and which of them runs its queues.
//! - [`inflight`]: the in-flight area of INFLIGHT_SHMFD, which lets a restarted daemon
//!   resubmit exactly the requests that were in flight.
//! - [`request`]: parsing and validation of one descriptor chain into a [`request::BlkRequest`]
//!   (framing, then one parser per request type), and the construction of `IoSlice`s and
//!   iovecs over guest memory. Everything a guest sends is hostile input here.
//! - [`device`]: the `VhostUserBackend` implementation, per-queue state and the queue loops
//!   (EVENT_IDX notification suppression, write-through handling; the io_uring engine keeps
//!   the requests the backend grants a [`DirectIo`] permit for in a
//!   [`crate::storage::queue::AsyncQueue`], and the copies of unhydrated regions it grants
//!   a [`RegionCopy`] for, as a read then a write in one of the queue's requests).
//! - [`vring`]: the vring type, vhost-user-backend's with a running ring's used index
//!   kept from SET_VRING_ADDR (sent to running rings when a migration starts).
//! - [`server`]: [`serve`], the listener loop that builds one `VhostUserDaemon` per
//!   connection, and [`print_capabilities`].
//!
//! Invariants:
//! - Nothing a guest puts in a virtqueue can panic a worker, hang a queue, or make the daemon
//!   touch memory outside the buffers the guest offered for that request.
//! - Every popped chain whose head index is inside the ring is retired (added to the used
//!   ring), with an error status when a status byte can be written and used length 0 otherwise.
//! - Offsets and lengths reach the backend only after they were checked: multiples of the
//!   logical block size (512, or the backend's [`BlockBackend::logical_block_size`]),
//!   inside the device, computed with overflow-checked arithmetic.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

pub mod config;
pub mod device;
pub mod dirty;
pub mod handover;
pub mod inflight;
pub mod moderation;
pub mod request;
pub mod server;
pub mod vring;

use crate::engine::RegionCopy;
use crate::storage::aio::DirectIo;

pub use server::{print_capabilities, serve, serve_on, ShutdownSignal};

/// What the virtio front needs from the disk it serves. Implemented by the clone engine elsewhere.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size in bytes, a multiple of 512.
    fn size(&self) -> u64;
    /// The disk refuses writes (VIRTIO_BLK_F_RO is offered).
    fn read_only(&self) -> bool;
    /// Optimal I/O size in bytes (the clone's region size), for VIRTIO_BLK_F_TOPOLOGY.
    fn optimal_io_size(&self) -> u32;
    /// Logical block size in bytes: a power of two, 512 (the default) to 65536. Above 512
    /// it is advertised to the guest (VIRTIO_BLK_F_BLK_SIZE; Linux uses it as the disk's
    /// logical block size) and every read, write, discard and write-zeroes whose offset
    /// or length is not a multiple of it is refused with `VIRTIO_BLK_S_IOERR` before it
    /// reaches the backend. A backend that cannot write less than a block atomically
    /// (an `O_DIRECT` file, which would need a read-modify-write) says so here.
    fn logical_block_size(&self) -> u32 {
        512
    }
    /// Reads `bufs`' total length at `offset` into guest memory.
    fn read(&self, offset: u64, bufs: &mut [std::io::IoSliceMut<'_>]) -> std::io::Result<()>;
    /// Writes `bufs` (guest memory) at `offset`.
    fn write(&self, offset: u64, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<()>;
    /// Completes only when everything written before it is durable.
    fn flush(&self) -> std::io::Result<()>;
    /// Discards a range (its content becomes unspecified but never foreign).
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Writes zeroes over a range; `unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()>;
    /// The guest's write-cache choice (true = write-back), kept by the backend across reconnects/restarts.
    fn write_cache(&self) -> bool;
    /// Records the guest's write-cache choice.
    fn set_write_cache(&self, writeback: bool);

    /// A permit to issue a read or write of `[offset, offset + len)` itself, on
    /// the permit's target, at the same offset, with the guest's buffers (the
    /// io_uring path, see [`IoEngine::Uring`]). The front finishes the permit
    /// before it tells the guest (or cancels it and sends the request through
    /// [`BlockBackend::read`] / [`BlockBackend::write`]). `None` (the default)
    /// always sends it there.
    fn direct_io(&self, write: bool, offset: u64, len: u64) -> Option<DirectIo<'_>> {
        let _ = (write, offset, len);
        None
    }
    /// A copy of the unhydrated region a write of `[offset, offset + len)` falls in,
    /// for the front to perform on its io_uring with the guest's buffers
    /// ([`crate::engine::Engine::region_copy`]); the front finishes it before it tells
    /// the guest. `None` (the default) sends the write to [`BlockBackend::write`].
    fn region_copy(&self, offset: u64, len: u64) -> Option<RegionCopy<'_>> {
        let _ = (offset, len);
        None
    }
}

/// How a queue executes reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// One blocking system call at a time per queue, in the queue's thread.
    #[default]
    Sync,
    /// Reads and writes the backend allows ([`BlockBackend::direct_io`]) are
    /// submitted through a per-queue io_uring, many in flight, and retired in
    /// order; everything else runs synchronously after the queue drained.
    Uring,
}

/// How [`serve`] exposes the backend.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Unix socket to create and listen on (mode 0600). Exactly one of `socket_path` and
    /// `listen_fd` must be set.
    pub socket_path: Option<PathBuf>,
    /// An inherited, already listening unix socket (`--fd N`). `serve` takes ownership of it
    /// and closes it when it returns.
    pub listen_fd: Option<std::os::unix::io::RawFd>,
    /// Number of request queues (1..=[`config::MAX_QUEUES`]).
    pub num_queues: u16,
    /// Maximum ring size a frontend may choose, a power of two in 4..=32768.
    pub queue_size: u16,
    /// Answer to VIRTIO_BLK_T_GET_ID, at most 20 bytes.
    pub serial: String,
    /// Offer VIRTIO_BLK_F_RO and refuse writes (also forced on when the backend is read-only).
    pub read_only: bool,
    /// Offer VIRTIO_BLK_F_DISCARD and VIRTIO_BLK_F_WRITE_ZEROES (ignored when read-only).
    pub discard: bool,
    /// Name of the vhost-user daemon threads (diagnostics only).
    pub name: String,
    /// How queues execute reads and writes.
    pub io_engine: IoEngine,
    /// io_uring queues retire requests as they finish when the frontend keeps an
    /// in-flight area (otherwise, and by default, in pop order).
    pub retire_out_of_order: bool,
    /// The longest a queue holds completions back for the driver's next request while
    /// the driver keeps two or more in flight (see [`moderation`]); zero: never.
    pub interrupt_hold: std::time::Duration,
    /// The frontends' state, shared with whoever reports status.
    pub frontends: Arc<handover::Frontends>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            socket_path: None,
            listen_fd: None,
            num_queues: 1,
            queue_size: 128,
            serial: String::from("vhost-clone"),
            read_only: false,
            discard: true,
            name: String::from("vhost-clone"),
            io_engine: IoEngine::Sync,
            retire_out_of_order: false,
            interrupt_hold: std::time::Duration::ZERO,
            frontends: Arc::default(),
        }
    }
}

/// Errors of the virtio front. Guest mistakes are never errors at this level: they become
/// status bytes.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The options passed to [`serve`] are inconsistent.
    #[error("Invalid serve options: {0}")]
    InvalidOptions(String),
    /// The backend reports a size that is not a multiple of 512.
    #[error("Backend size {0} is not a multiple of 512")]
    InvalidBackendSize(u64),
    /// The backend's logical block size is not a power of two in 512..=65536.
    #[error("Backend logical block size {0} is not a power of two between 512 and 65536")]
    InvalidBlockSize(u32),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another process is accepting connections on the socket path.
    #[error("{0} is a live socket of another process")]
    SocketInUse(PathBuf),
    /// Creating, binding or renaming the listening socket failed.
    #[error("Failed to create the vhost-user socket {path}")]
    Bind {
        /// The requested socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The inherited fd is not a listening unix socket.
    #[error("Inherited fd {0} is not a listening unix socket")]
    BadListenFd(std::os::unix::io::RawFd),
    /// Creating an eventfd or a thread failed.
    #[error("Failed to set up the daemon's event plumbing")]
    Setup(#[source] io::Error),
    /// Waiting for connections or the shutdown signal failed.
    #[error("Failed to wait for a connection")]
    Poll(#[source] io::Error),
    /// The vhost-user daemon framework failed outside a normal disconnect.
    /// (vhost-user-backend's error type does not implement `std::error::Error`, so its text
    /// is kept.)
    #[error("vhost-user daemon error: {0}")]
    Daemon(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, VirtioError>;
