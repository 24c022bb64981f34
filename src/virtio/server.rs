// SPDX-License-Identifier: Apache-2.0

//! The listening socket and the connection loop.
//!
//! [`serve`] binds the unix socket (or adopts an inherited listening fd, `--fd N`) through
//! [`crate::socket::BoundSocket`], whose policy it follows (mode 0600, a live socket is
//! refused, a stale one replaced, only our own socket removed), and removes it when it
//! returns; [`serve_on`] serves on a socket the caller bound before starting any thread.
//!
//! vhost-user-backend 0.24 cannot serve a second connection with the same `VhostUserDaemon`
//! (the second SET_OWNER fails), so every connection gets a fresh daemon, a fresh guest
//! memory map and a fresh [`BlkDevice`]; only the [`BlockBackend`] is shared. Up to
//! [`super::handover::MAX_FRONTENDS`] connections are served at once, each on a thread of
//! its own (a same-host migration's source and target; which of them runs its queues is
//! [`super::handover`]'s decision); a further one waits in the backlog. After a
//! connection the daemon is dropped (its workers are joined thanks to `exit_event` always
//! returning `Some`) and the exit-event fds the crate leaks are closed here.
//!
//! Shutdown: [`ShutdownSignal::trigger`] (from a SIGTERM/SIGINT handler in the binary) makes
//! `serve` stop accepting, stop every queue from popping new chains, wait for each queue
//! worker to finish the requests it already popped ([`BlkDevice::quiesce`]), and only then
//! close the connections and return `Ok(())`. In that order because QEMU takes the
//! used index as final when the connection drops: a request popped or completed after that
//! would run again from descriptors the guest may have reused once QEMU reconnects to a
//! restarted daemon.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{DeviceSpec, MAX_BLOCK_SIZE, MAX_QUEUES, SERIAL_LEN};
use super::device::BlkDevice;
use super::{BlockBackend, Result, ServeOptions, VirtioError};
use crate::socket::{BoundSocket, SocketError};
use crate::storage::SECTOR_SIZE;

impl From<SocketError> for VirtioError {
    fn from(e: SocketError) -> VirtioError {
        match e {
            SocketError::NotASocket(p) => VirtioError::NotASocket(p),
            SocketError::InUse(p) => VirtioError::SocketInUse(p),
            SocketError::Bind { path, source } | SocketError::Group { path, source, .. } => {
                VirtioError::Bind { path, source }
            }
            SocketError::BadListenFd(fd) => VirtioError::BadListenFd(fd),
        }
    }
}

/// A level-triggered stop request for [`serve`]: once triggered it stays triggered.
///
/// A signal handler may write an 8-byte native-endian `1u64` to [`ShutdownSignal::as_raw_fd`]
/// (write(2) is async-signal-safe); other code calls [`ShutdownSignal::trigger`].
#[derive(Clone, Debug)]
pub struct ShutdownSignal {
    inner: Arc<ShutdownInner>,
}

#[derive(Debug)]
struct ShutdownInner {
    flag: AtomicBool,
    fd: EventFd,
}

impl ShutdownSignal {
    /// A new, untriggered signal.
    pub fn new() -> io::Result<Self> {
        Ok(ShutdownSignal {
            inner: Arc::new(ShutdownInner {
                flag: AtomicBool::new(false),
                fd: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Ask [`serve`] to stop.
    pub fn trigger(&self) {
        self.inner.flag.store(true, Ordering::Release);
        // The counter is never read, so the fd stays readable; an overflow error would mean
        // it is already readable.
        let _ = self.inner.fd.write(1);
    }

    /// Whether a stop was requested (by `trigger` or by a write to the fd).
    pub fn is_triggered(&self) -> bool {
        self.wait_timeout(std::time::Duration::ZERO)
    }

    /// Waits up to `timeout` for a stop request; true if there is one.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> bool {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        self.inner.flag.load(Ordering::Acquire)
            || matches!(poll_readable(&[self.as_raw_fd()], ms), Ok(Some(0)))
    }

    /// The eventfd that becomes readable on shutdown.
    pub fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

/// The block features of QEMU's vhost-user.json schema
/// (`VHostUserBackendBlockFeature`) that vhost-clone has: `read-only` (the
/// backend accepts `--read-only`). Not `blk-file`: a clone is named by
/// `--source`/`--dest`, and a lone `--blk-file` could not say what to clone.
pub const BLOCK_FEATURES: &[&str] = &["read-only"];

/// QEMU's vhost-user backend capabilities JSON (docs/interop/vhost-user.json,
/// `VHostUserBackendCapabilities` of type `block`) for `--print-capabilities`.
pub fn print_capabilities() -> String {
    serde_json::json!({ "type": "block", "features": BLOCK_FEATURES }).to_string()
}

/// Serve `backend` over vhost-user-blk until `shutdown` is triggered.
///
/// Up to two connections are served at once (a migration's source and target); a
/// frontend that disconnects (guest power-off, QEMU restart) ends its connection only. Errors caused by a
/// frontend end that connection only; setup errors are returned.
pub fn serve(
    backend: Arc<dyn BlockBackend>,
    opts: &ServeOptions,
    shutdown: &ShutdownSignal,
) -> Result<()> {
    validate(&*backend, opts)?;
    let socket = match (&opts.socket_path, opts.listen_fd) {
        (Some(path), None) => BoundSocket::bind(path)?,
        (None, Some(fd)) => BoundSocket::adopt_fd(fd)?,
        _ => {
            return Err(VirtioError::InvalidOptions(
                "exactly one of socket_path and listen_fd must be set".into(),
            ))
        }
    };
    serve_on(backend, opts, &socket, shutdown)
}

/// [`serve`] on a socket the caller bound already (`opts.socket_path` and
/// `opts.listen_fd` are ignored). The socket stays the caller's: it is removed
/// when the caller drops it.
pub fn serve_on(
    backend: Arc<dyn BlockBackend>,
    opts: &ServeOptions,
    socket: &BoundSocket,
    shutdown: &ShutdownSignal,
) -> Result<()> {
    let spec = validate(&*backend, opts)?;
    let unix_listener = socket.listener().try_clone().map_err(VirtioError::Setup)?;
    info!(
        size = spec.size,
        queues = spec.num_queues,
        read_only = spec.read_only,
        io_engine = ?opts.io_engine,
        "vhost-user-blk listening"
    );
    let mut listener = Listener::from(unix_listener);
    let front = Front {
        backend: &backend,
        opts,
        spec,
        shutdown,
    };
    front.accept_loop(&mut listener)
}

fn validate(backend: &dyn BlockBackend, opts: &ServeOptions) -> Result<DeviceSpec> {
    let size = backend.size();
    if size % SECTOR_SIZE != 0 {
        return Err(VirtioError::InvalidBackendSize(size));
    }
    if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
        return Err(VirtioError::InvalidOptions(format!(
            "num_queues must be 1..={MAX_QUEUES}, not {}",
            opts.num_queues
        )));
    }
    if opts.queue_size < 4 || !opts.queue_size.is_power_of_two() {
        return Err(VirtioError::InvalidOptions(format!(
            "queue_size must be a power of two >= 4, not {}",
            opts.queue_size
        )));
    }
    let block_size = backend.logical_block_size();
    if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(VirtioError::InvalidBlockSize(block_size));
    }
    if size % u64::from(block_size) != 0 {
        warn!(
            size,
            block_size,
            "the disk's last {} bytes are not a whole logical block: the guest cannot use them",
            size % u64::from(block_size)
        );
    }
    if opts.serial.len() > SERIAL_LEN {
        return Err(VirtioError::InvalidOptions(format!(
            "serial is {} bytes, at most {SERIAL_LEN} are allowed",
            opts.serial.len()
        )));
    }
    Ok(DeviceSpec {
        size,
        num_queues: opts.num_queues,
        queue_size: opts.queue_size,
        read_only: opts.read_only || backend.read_only(),
        discard: opts.discard,
        optimal_io_size: backend.optimal_io_size(),
        block_size,
    })
}

/// What every connection of one `serve` call is served with.
struct Front<'a> {
    backend: &'a Arc<dyn BlockBackend>,
    opts: &'a ServeOptions,
    spec: DeviceSpec,
    shutdown: &'a ShutdownSignal,
}

/// One connection being served: its daemon (message thread and queue workers) and device.
struct Connection {
    id: u64,
    daemon: VhostUserDaemon<Arc<BlkDevice>>,
    device: Arc<BlkDevice>,
}

impl Front<'_> {
    /// Accepts connections until shutdown, serving up to
    /// [`super::handover::MAX_FRONTENDS`] at once, each
    /// on a thread of its own. Returns once every connection ended.
    fn accept_loop(&self, listener: &mut Listener) -> Result<()> {
        let shutdown = self.shutdown;
        // A connection's thread sends its result, then writes `ended` to wake this loop.
        let ended = EventFd::new(EFD_NONBLOCK).map_err(VirtioError::Setup)?;
        let (done_tx, done) = std::sync::mpsc::channel::<Result<()>>();
        std::thread::scope(|s| {
            let mut live = Vec::new();
            let result = loop {
                // Threads that ended are joined (a panic is an error of the daemon);
                // the first error a connection ended with ends the serve call.
                if let Err(e) = reap(&mut live, false).and_then(|()| first_error(&done)) {
                    break Err(e);
                }
                // With two frontends attached, a third one waits in the backlog.
                let fds = [
                    shutdown.as_raw_fd(),
                    ended.as_raw_fd(),
                    listener.as_raw_fd(),
                ];
                let n = if self.opts.frontends.has_room() { 3 } else { 2 };
                match poll_readable(&fds[..n], -1) {
                    Err(e) => break Err(VirtioError::Poll(e)),
                    Ok(Some(0)) => {
                        info!("shutdown requested; no longer accepting connections");
                        break Ok(());
                    }
                    Ok(Some(1)) => {
                        let _ = ended.read();
                    }
                    Ok(Some(_)) => match self.start_connection(listener) {
                        Ok(Some(conn)) => {
                            let (ended, done_tx) = (&ended, done_tx.clone());
                            live.push(s.spawn(move || {
                                let _ = done_tx.send(self.finish_connection(conn));
                                let _ = ended.write(1);
                            }));
                        }
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    },
                    Ok(None) => {}
                }
                if shutdown.is_triggered() {
                    break Ok(());
                }
            };
            if result.is_err() {
                // The others must end too before this returns.
                shutdown.trigger();
            }
            result.and(reap(&mut live, true)).and(first_error(&done))
        })
    }

    /// Accepts one connection (the listener is readable) and starts serving it with a
    /// fresh daemon. `None` when it was refused or went away at once.
    fn start_connection(&self, listener: &mut Listener) -> Result<Option<Connection>> {
        let frontends = &self.opts.frontends;
        let Some(id) = frontends.attach() else {
            // Cannot happen: the listener is polled only while there is room.
            return Ok(None);
        };
        let (backend, opts, spec) = (self.backend, self.opts, self.spec);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = BlkDevice::new(
            backend.clone(),
            spec,
            &opts.serial,
            mem.clone(),
            opts.io_engine,
            (frontends.clone(), id),
        )
        .map(|d| {
            Arc::new(
                d.retiring_out_of_order(opts.retire_out_of_order)
                    .moderating(opts.interrupt_hold),
            )
        });
        let device = match device {
            Ok(d) => d,
            Err(e) => {
                frontends.detach(id);
                return Err(VirtioError::Setup(e));
            }
        };
        let mut daemon = match VhostUserDaemon::new(opts.name.clone(), device.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                device.detach();
                return Err(VirtioError::Daemon(e.to_string()));
            }
        };
        // The listener is readable, so this accept does not block.
        match daemon.start(listener) {
            Ok(()) => {
                info!(
                    connection = id,
                    frontends = frontends.report().connected,
                    "vhost-user frontend connected"
                );
                Ok(Some(Connection { id, daemon, device }))
            }
            Err(e) => {
                let conn = Connection { id, daemon, device };
                conn.close();
                connection_result(id, Err(e)).map(|()| None)
            }
        }
    }

    /// Serves a started connection until it ends (or shutdown closes it), then lets go
    /// of it. Errors caused by the frontend end that connection only.
    fn finish_connection(&self, mut conn: Connection) -> Result<()> {
        let result = wait_connection(&mut conn.daemon, &conn.device, self.shutdown);
        let id = conn.id;
        conn.close();
        connection_result(id, result)
    }
}

impl Connection {
    /// Ends the connection's service. The frontend took the used index as it was when the
    /// connection went (or never came) up, so no queue may pop another chain: the queues
    /// are quiesced first. Dropping the daemon then sends the exit events and joins the
    /// queue workers; each finishes the requests it popped first (after a shutdown there
    /// are none left: see `wait_connection`).
    fn close(self) {
        let Connection { daemon, device, .. } = self;
        device.quiesce();
        drop(daemon);
        for fd in device.take_exit_fds() {
            // SAFETY: `fd` is the consumer end of an exit eventfd this device created and handed
            // to vhost-user-backend, which registered it with `into_raw_fd()` and never closes
            // it. The daemon and its workers (and the epoll set it was in) are gone, so nothing
            // else owns or uses this fd number.
            unsafe { libc::close(fd) };
        }
        // Only now, with its workers gone: another connection may run its queues.
        device.detach();
    }
}

/// What the end of connection `id` means for `serve`: frontend trouble ends that
/// connection only (`Ok`), anything else is an error of the daemon.
fn connection_result(id: u64, result: std::result::Result<(), DaemonError>) -> Result<()> {
    match result {
        Ok(()) => {
            info!(connection = id, "vhost-user connection closed");
            Ok(())
        }
        Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected
            | VhostUserError::PartialMessage
            | VhostUserError::SocketBroken(_),
        )) => {
            info!(connection = id, "vhost-user frontend disconnected");
            Ok(())
        }
        Err(DaemonError::HandleRequest(e)) => {
            // A frontend error ends that connection only.
            warn!(
                connection = id,
                "vhost-user connection ended with an error: {e}"
            );
            Ok(())
        }
        Err(DaemonError::CreateBackendListener(VhostUserError::SocketError(e)))
            if e.kind() == io::ErrorKind::ConnectionAborted =>
        {
            Ok(())
        }
        Err(e) => Err(VirtioError::Daemon(e.to_string())),
    }
}

/// The first error among the results the connection threads sent so far.
fn first_error(done: &std::sync::mpsc::Receiver<Result<()>>) -> Result<()> {
    done.try_iter().find(Result::is_err).unwrap_or(Ok(()))
}

/// Joins the connection threads that ended (all of them, waiting, with `all`), so that
/// a long-running daemon keeps no finished threads. Their results come through the
/// channel; a thread that panicked sent none, and is an error here.
fn reap(live: &mut Vec<std::thread::ScopedJoinHandle<'_, ()>>, all: bool) -> Result<()> {
    let mut result = Ok(());
    let mut i = 0;
    while i < live.len() {
        if !all && !live[i].is_finished() {
            i += 1;
            continue;
        }
        if live.swap_remove(i).join().is_err() {
            result = Err(VirtioError::Daemon("a connection thread panicked".into()));
        }
    }
    result
}

/// Wait for the connection to end, closing it early if `shutdown` is triggered: then the
/// queues are quiesced first (nothing popped any more, everything popped retired), and the
/// connection is closed after.
fn wait_connection(
    daemon: &mut VhostUserDaemon<Arc<BlkDevice>>,
    device: &BlkDevice,
    shutdown: &ShutdownSignal,
) -> std::result::Result<(), DaemonError> {
    let handle = daemon.shutdown_handle();
    let done = EventFd::new(EFD_NONBLOCK).map_err(DaemonError::StartDaemon)?;
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            if let Ok(Some(0)) = poll_readable(&[shutdown.as_raw_fd(), done.as_raw_fd()], -1) {
                info!("shutdown requested; stopping the queues");
                device.quiesce();
                if let Some(h) = &handle {
                    info!("queues stopped; closing the vhost-user connection");
                    h.shutdown();
                }
            }
        });
        let r = daemon.wait();
        let _ = done.write(1);
        let _ = watcher.join();
        r
    })
}

/// poll(2) for readability. Returns the index of the first readable fd, `None` on timeout
/// or EINTR. `timeout_ms` -1 waits without a limit.
pub(crate) fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Option<usize>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()` pollfd structs
    // that outlives the call; poll only writes their `revents` fields.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(pfds.iter().position(|p| p.revents != 0))
}
