//! The daemon's side of systemd's protocols: socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`, sd_listen_fds(3)) and service
//! notification (`NOTIFY_SOCKET`, sd_notify(3): `READY=1`, `STATUS=`,
//! `STOPPING=1`, `WATCHDOG=1`).
//!
//! Invariants:
//! * the `LISTEN_*` variables are read and removed before the daemon starts
//!   any thread (so no child inherits them and no thread reads the
//!   environment meanwhile); they are obeyed only when `LISTEN_PID` is our pid;
//! * the sockets systemd passes belong to systemd: adopted like `--fd`, never
//!   removed from the file system by us;
//! * nothing here can stop the daemon once it runs: a failed notification is
//!   logged (once, until one succeeds again), never returned; without
//!   `NOTIFY_SOCKET` every notification is a no-op and no thread is started;
//! * `READY=1` is sent once, when the caller says so (after the recovery
//!   commit and the start of every service, just before serving; a standby's
//!   when it answers frontends, with a standby `STATUS=` and the watchdog
//!   pinged until the takeover gives it an engine to watch); `STOPPING=1`
//!   at most once, as soon as the shutdown signal fires;
//! * `WATCHDOG=1` is sent only while the daemon looks healthy: no commit has
//!   been running for longer than the watchdog timeout and, with the periodic
//!   committer on, regions waiting for a commit got one within that timeout
//!   (plus one commit interval). A daemon stuck in a commit (dead storage, a
//!   deadlock) stops pinging and systemd restarts it; the live region map
//!   keeps every acknowledged write across that restart.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{error_chain, CliError, ServeArgs};
use crate::engine::commit::CommitActivity;
use crate::engine::hydrator::HydrationControl;
use crate::engine::Engine;
use crate::metadata::Mode;
use crate::socket::{BoundSocket, SocketError};
use crate::virtio::ShutdownSignal;

/// The `LISTEN_FDNAMES` name (a socket unit's `FileDescriptorName=`) that
/// marks a passed socket as the control socket.
pub const CONTROL_FD_NAME: &str = "control";

/// What a standby (`serve --standby`) waits for, as `status` and `STATUS=`
/// (after `standby: `) say it until it takes the clone over.
pub const STANDBY_WAITING: &str =
    "answering frontends; takes the clone over once a frontend started its queues here and the clone's lock is free";

/// How often `STATUS=` is refreshed while serving.
const STATUS_PERIOD: Duration = Duration::from_secs(2);

/// Errors of socket activation.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_PID`, `LISTEN_FDS` or `LISTEN_FDNAMES` cannot be parsed.
    #[error("bad socket activation environment (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES)")]
    Env(#[source] io::Error),
    /// An option names a socket that systemd already passed.
    #[error("{0} cannot be used with socket activation (LISTEN_FDS): systemd passes that socket")]
    Conflict(&'static str),
    /// The passed sockets are not one vhost-user socket and at most one control socket.
    #[error("socket activation passed {count} sockets named {names:?}; expected the vhost-user socket and at most one more named \"control\" (FileDescriptorName=control)")]
    Unexpected {
        /// `LISTEN_FDS`.
        count: usize,
        /// Their names (`LISTEN_FDNAMES`).
        names: Vec<String>,
    },
    /// A passed socket is not a listening unix stream socket.
    #[error("socket activation: the {which} socket")]
    Socket {
        /// Which socket.
        which: &'static str,
        /// The cause.
        #[source]
        source: SocketError,
    },
}

impl From<ActivationError> for CliError {
    /// Environment and option mismatches are usage errors (exit 2); an
    /// unusable socket is a refused start (exit 1), as with `--fd`.
    fn from(e: ActivationError) -> CliError {
        match e {
            ActivationError::Socket { .. } => CliError::Refused(error_chain(&e)),
            _ => CliError::Usage(error_chain(&e)),
        }
    }
}

/// The sockets systemd passed.
#[derive(Debug)]
pub struct Activated {
    /// The vhost-user socket.
    pub vhost_user: BoundSocket,
    /// The control socket, when one was passed with the name `control`.
    pub control: Option<BoundSocket>,
}

impl Activated {
    /// The control socket's path, when systemd passed one bound to a path.
    pub fn control_path(&self) -> Option<PathBuf> {
        let c = self.control.as_ref()?;
        let addr = c.listener().local_addr().ok()?;
        addr.as_pathname().map(|p| p.to_path_buf())
    }
}

/// Reads and removes the socket activation variables and adopts the sockets
/// passed to this process. `None`: no activation (no `LISTEN_FDS`, or
/// `LISTEN_PID` names another process).
///
/// Must be called before the daemon starts any thread.
pub fn take_activation(a: &ServeArgs) -> Result<Option<Activated>, ActivationError> {
    let listen_pid = std::env::var("LISTEN_PID").ok();
    if let Some(pid) = listen_pid
        .as_deref()
        .and_then(|p| p.trim().parse::<u32>().ok())
    {
        if pid != std::process::id() {
            // Meant for another process (a wrapper that started us): ignore
            // every variable, LISTEN_FDNAMES included, and pass none on.
            for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                // SAFETY: as below, no other thread exists yet.
                unsafe { std::env::remove_var(v) };
            }
            tracing::debug!(
                listen_pid = pid,
                "LISTEN_FDS is meant for another process; ignored"
            );
            return Ok(None);
        }
    }
    // SAFETY: serve() calls this before it starts any thread (the first is the
    // signal thread, start-up step 6), and the binary's main thread is the
    // only one: nothing reads or writes the environment concurrently.
    let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
        .map_err(ActivationError::Env)?
        .collect::<Vec<_>>();
    if fds.is_empty() {
        if let Some(pid) = listen_pid {
            tracing::debug!(listen_pid = %pid, "LISTEN_FDS is meant for another process; ignored");
        }
        return Ok(None);
    }
    if a.fd.is_some() {
        return Err(ActivationError::Conflict("--fd"));
    }
    if a.socket_path.is_some() {
        return Err(ActivationError::Conflict("--socket-path"));
    }
    // Whoever created the socket set its owner and mode (SocketGroup=, SocketMode=).
    if a.socket_group.is_some() {
        return Err(ActivationError::Conflict("--socket-group"));
    }
    if a.socket_mode.is_some() {
        return Err(ActivationError::Conflict("--socket-mode"));
    }
    let (vhost_fd, control_fd) = classify(&fds)?;
    if control_fd.is_some() && a.control_socket.is_some() {
        return Err(ActivationError::Conflict("--control-socket"));
    }
    let adopt = |which, fd| {
        BoundSocket::adopt_fd(fd).map_err(|source| ActivationError::Socket { which, source })
    };
    let vhost_user = adopt("vhost-user", vhost_fd)?;
    let control = control_fd.map(|fd| adopt("control", fd)).transpose()?;
    tracing::info!(
        fds = fds.len(),
        control = control.is_some(),
        "serving on sockets passed by systemd (socket activation)"
    );
    Ok(Some(Activated {
        vhost_user,
        control,
    }))
}

/// Picks the vhost-user socket and the control socket out of the passed ones:
/// one socket not named `control`, and at most one named `control`.
fn classify(fds: &[(RawFd, String)]) -> Result<(RawFd, Option<RawFd>), ActivationError> {
    let (control, vhost): (Vec<_>, Vec<_>) =
        fds.iter().partition(|(_, name)| name == CONTROL_FD_NAME);
    match (vhost.as_slice(), control.as_slice()) {
        ([(v, _)], []) => Ok((*v, None)),
        ([(v, _)], [(c, _)]) => Ok((*v, Some(*c))),
        _ => Err(ActivationError::Unexpected {
            count: fds.len(),
            names: fds.iter().map(|(_, n)| n.clone()).collect(),
        }),
    }
}

/// What the notifier reports on and checks.
pub struct Watched {
    /// The engine (hydration progress, metadata mode, commit activity).
    pub engine: Arc<Engine>,
    /// Background hydration settings (paused or running).
    pub hydration: Arc<HydrationControl>,
    /// The periodic commit interval, when the committer runs.
    pub commit_interval: Option<Duration>,
}

/// Sends systemd the daemon's state; stopped on drop.
pub struct Notifier {
    shared: Option<Arc<Shared>>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    /// Set once the daemon has its engine (at once, or at a standby's takeover).
    watched: OnceLock<Watched>,
    /// `NOTIFY_SOCKET`, and a datagram socket made at start: a notification
    /// is a `sendto`, which every thread's seccomp filter allows, while making
    /// a socket is the notification thread's alone (the main thread sends the
    /// last `STATUS=` under the front's filter).
    path: std::path::PathBuf,
    sock: std::os::unix::net::UnixDatagram,
    /// Written on drop to stop the thread.
    stop: EventFd,
    stopping: AtomicBool,
    failing: AtomicBool,
    /// The last `STATUS=` text sent (not sent again while it holds).
    status: Mutex<String>,
}

impl Notifier {
    /// Starts the thread that keeps `STATUS=` current, sends `STOPPING=1`
    /// when `shutdown` fires and pings the watchdog; [`Notifier::ready`] then
    /// sends `READY=1`. Without `NOTIFY_SOCKET`: does nothing. With no
    /// `watched` (a standby), the status says so and the daemon counts as
    /// healthy until [`Notifier::watch`].
    pub fn start(watched: Option<Watched>, shutdown: &ShutdownSignal) -> Notifier {
        let none = Notifier {
            shared: None,
            thread: None,
        };
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return none;
        };
        let sock = match std::os::unix::net::UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start systemd notification");
                return none;
            }
        };
        let stop = match EventFd::new(EFD_NONBLOCK) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start systemd notification");
                return none;
            }
        };
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        let shared = Arc::new(Shared {
            watched: watched.map(OnceLock::from).unwrap_or_default(),
            path: path.into(),
            sock,
            stop,
            stopping: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            status: Mutex::new(String::new()),
        });
        *shared.lock_status() = shared.status_text();
        if let Some(w) = watchdog {
            tracing::info!(timeout = ?w, "systemd watchdog on: pinging every {:?} while healthy", w / 2);
        }
        let s = shared.clone();
        let shutdown_fd = shutdown.as_raw_fd();
        // The shutdown signal outlives the thread: serve() drops the notifier first.
        let shutdown = shutdown.clone();
        let thread =
            crate::sandbox::spawn(crate::sandbox::ThreadKind::Notify, "systemd", move || {
                let _keep = shutdown;
                s.run(shutdown_fd, watchdog)
            });
        match thread {
            Ok(t) => Notifier {
                shared: Some(shared),
                thread: Some(t),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the systemd notification thread; no STATUS= updates or watchdog pings");
                Notifier {
                    shared: Some(shared),
                    thread: None,
                }
            }
        }
    }

    /// Tells systemd the daemon is stopping (`STOPPING=1` the first time) and
    /// what it is doing (`STATUS=stopping: WHAT`).
    /// `READY=1` with the current `STATUS=`: sent once the last start-up
    /// step that can fail (confining the main thread) is done.
    pub fn ready(&self) {
        if let Some(s) = &self.shared {
            let status = s.status_text();
            *s.lock_status() = status.clone();
            s.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        }
    }

    /// `STOPPING=1` (the first time) and `STATUS=stopping: WHAT`.
    pub fn stopping(&self, what: &str) {
        if let Some(s) = &self.shared {
            s.stopping(what, false);
        }
    }

    /// Reports on and checks `watched` from now on (a standby that took over;
    /// once, a second call changes nothing).
    pub fn watch(&self, watched: Watched) {
        if let Some(s) = &self.shared {
            let _ = s.watched.set(watched);
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let (Some(s), Some(t)) = (&self.shared, self.thread.take()) {
            // An eventfd write fails only on counter overflow, i.e. when already readable.
            let _ = s.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock_status(&self) -> std::sync::MutexGuard<'_, String> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, states: &[NotifyState]) {
        let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
        let sent = self.sock.send_to(msg.as_bytes(), &self.path).and_then(|n| {
            if n == msg.len() {
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "incomplete notification",
                ))
            }
        });
        match sent {
            Ok(()) => self.failing.store(false, Ordering::Relaxed),
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); serving on");
                }
            }
        }
    }

    /// `STOPPING=1` (the first time) and `STATUS=stopping: WHAT`. With
    /// `first_only`, nothing once stopping was announced: the shutdown signal
    /// seen late must not overwrite a later phase ("final commit").
    fn stopping(&self, what: &str, first_only: bool) {
        let status = format!("stopping: {what}");
        let mut last = self.lock_status();
        if self.stopping.swap(true, Ordering::AcqRel) {
            if !first_only {
                *last = status.clone();
                self.send(&[NotifyState::Status(&status)]);
            }
        } else {
            *last = status.clone();
            self.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
        }
    }

    fn status_text(&self) -> String {
        let Some(watched) = self.watched.get() else {
            return format!("standby: {STANDBY_WAITING}");
        };
        let e = &watched.engine;
        let md = e.metadata();
        let (done, total) = (md.hydrated_count(), e.geometry().nr_regions());
        let progress = format!(
            "{done}/{total} regions ({:.1}%)",
            done as f64 * 100.0 / total.max(1) as f64
        );
        let h = &watched.hydration;
        match md.mode() {
            Mode::Fail => {
                "failed: the metadata could not be reloaded, every request fails (see the log)"
                    .into()
            }
            Mode::Ro => format!(
                "degraded: read-only metadata after a failed commit (see the log); {progress} hydrated"
            ),
            Mode::Rw if md.all_hydrated() => "hydrated: the source is no longer needed".into(),
            Mode::Rw if e.source_status().is_some_and(|n| !n.is_connected()) => {
                format!("source unreachable, reconnecting: {progress} hydrated")
            }
            Mode::Rw if h.enabled() && h.threshold() > 0 => format!(
                "hydrating: {progress}, {:.1} MiB/s",
                e.hydration_rate() / (1u64 << 20) as f64
            ),
            Mode::Rw => format!("hydration paused: {progress}"),
        }
    }

    fn run(&self, shutdown_fd: RawFd, watchdog: Option<Duration>) {
        let ping_every = watchdog.map(|w| w / 2);
        let now = Instant::now();
        let mut next_status = now + STATUS_PERIOD;
        let mut next_ping = watchdog.map(|_| now);
        let mut watch_shutdown = true;
        let mut unhealthy = false;
        loop {
            let now = Instant::now();
            let next = next_ping.map_or(next_status, |p| p.min(next_status));
            let timeout = next.saturating_duration_since(now);
            let mut fds = vec![self.stop.as_raw_fd()];
            if watch_shutdown {
                fds.push(shutdown_fd);
            }
            let ready = match poll(&fds, timeout) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "systemd notification thread: poll failed; stopping it");
                    return;
                }
            };
            if ready == Some(0) {
                return;
            }
            if ready == Some(1) {
                watch_shutdown = false;
                self.stopping("no new requests, finishing those in flight", true);
            }
            let now = Instant::now();
            if let (Some(at), Some(every), Some(limit)) = (next_ping, ping_every, watchdog) {
                if now >= at {
                    match self.health(limit) {
                        Ok(()) => {
                            if unhealthy {
                                tracing::info!("healthy again: watchdog pings resume");
                            }
                            unhealthy = false;
                            self.send(&[NotifyState::Watchdog]);
                        }
                        Err(why) => {
                            if !unhealthy {
                                tracing::error!(
                                    "{why}: watchdog pings stop, systemd will restart the daemon"
                                );
                            }
                            unhealthy = true;
                        }
                    }
                    next_ping = Some(now + every);
                }
            }
            if now >= next_status {
                next_status = now + STATUS_PERIOD;
                let text = self.status_text();
                let mut last = self.lock_status();
                // Checked under the lock that stopping() takes: no progress
                // line overwrites a stopping one.
                if !self.stopping.load(Ordering::Acquire) && *last != text {
                    *last = text.clone();
                    self.send(&[NotifyState::Status(&text)]);
                }
            }
        }
    }

    /// Blocks while the commit gate's lock is held (a deadlock stops the pings too).
    fn health(&self, limit: Duration) -> Result<(), String> {
        let Some(watched) = self.watched.get() else {
            return Ok(()); // a standby: nothing can hang before the takeover
        };
        let e = &watched.engine;
        let md = e.metadata();
        let waiting = md.changed() && md.mode() == Mode::Rw;
        health(e.commit_activity(), limit, watched.commit_interval, waiting)
    }
}

/// The watchdog's health rule (see the module docs): `Err` says why the
/// daemon looks hung.
fn health(
    act: CommitActivity,
    limit: Duration,
    commit_interval: Option<Duration>,
    waiting: bool,
) -> Result<(), String> {
    if let Some(d) = act.running_for.filter(|d| *d > limit) {
        return Err(format!(
            "a metadata commit has been running for {:.0} s (watchdog timeout {:.0} s)",
            d.as_secs_f64(),
            limit.as_secs_f64()
        ));
    }
    if let (Some(interval), true, None) = (commit_interval, waiting, act.running_for) {
        let since = act.since_last.unwrap_or(Duration::ZERO);
        if since > limit + interval {
            return Err(format!(
                "regions wait for a commit, but none has run for {:.0} s (commit interval {:.1} s)",
                since.as_secs_f64(),
                interval.as_secs_f64()
            ));
        }
    }
    Ok(())
}

/// Waits up to `timeout` (rounded up to a millisecond, so that a short wait
/// does not spin) for one of `fds` to become readable; the first readable one.
fn poll(fds: &[RawFd], timeout: Duration) -> io::Result<Option<usize>> {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    crate::virtio::server::poll_readable(fds, ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::DestFlush;

    fn named(names: &[&str]) -> Vec<(RawFd, String)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (3 + i as RawFd, n.to_string()))
            .collect()
    }

    #[test]
    fn passed_sockets_are_one_vhost_user_and_at_most_one_control() {
        assert_eq!(classify(&named(&["unknown"])).unwrap(), (3, None));
        assert_eq!(
            classify(&named(&["control", "vhost-clone@a.socket"])).unwrap(),
            (4, Some(3))
        );
        assert_eq!(classify(&named(&["x", "control"])).unwrap(), (3, Some(4)));
        for bad in [
            &["control"][..],
            &["a", "b"],
            &["control", "control"],
            &["a", "control", "b"],
        ] {
            let e = classify(&named(bad)).unwrap_err();
            assert!(matches!(e, ActivationError::Unexpected { .. }), "{bad:?}");
            assert!(e.to_string().contains("FileDescriptorName=control"), "{e}");
        }
    }

    #[test]
    fn activation_errors_map_to_exit_codes() {
        let usage = CliError::from(ActivationError::Conflict("--fd"));
        assert!(matches!(usage, CliError::Usage(_)));
        let refused = CliError::from(ActivationError::Socket {
            which: "vhost-user",
            source: SocketError::BadListenFd(3),
        });
        assert!(matches!(refused, CliError::Refused(_)));
    }

    #[test]
    fn a_commit_stuck_longer_than_the_watchdog_is_unhealthy() {
        let limit = Duration::from_secs(10);
        let s = Duration::from_secs;
        let act = |running: Option<u64>, last: Option<u64>| CommitActivity {
            running_for: running.map(s),
            since_last: last.map(s),
        };
        // Idle, or a commit shorter than the limit: healthy.
        assert!(health(act(None, Some(1)), limit, Some(s(1)), true).is_ok());
        assert!(health(act(Some(9), Some(1)), limit, Some(s(1)), true).is_ok());
        // A commit longer than the limit: hung.
        let e = health(act(Some(11), Some(12)), limit, Some(s(1)), false).unwrap_err();
        assert!(e.contains("running for 11 s"), "{e}");
        // Regions waiting and no commit for limit + interval: the committer is stuck.
        assert!(health(act(None, Some(12)), limit, Some(s(1)), true).is_err());
        assert!(health(act(None, Some(10)), limit, Some(s(1)), true).is_ok());
        // Nothing waiting, or no periodic committer: a long quiet spell is fine.
        assert!(health(act(None, Some(100)), limit, Some(s(1)), false).is_ok());
        assert!(health(act(None, Some(100)), limit, None, true).is_ok());
    }

    /// A destination whose flush blocks until released: a commit stuck on
    /// dead storage.
    #[derive(Debug)]
    struct StuckFlush {
        dev: crate::storage::SimDevice,
        stuck: Mutex<bool>,
        cv: std::sync::Condvar,
    }

    impl crate::storage::BlockDevice for StuckFlush {
        fn size(&self) -> u64 {
            self.dev.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::storage::Result<()> {
            self.dev.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> crate::storage::Result<()> {
            self.dev.write_at(buf, offset)
        }
        fn flush(&self) -> crate::storage::Result<()> {
            let mut g = self.stuck.lock().unwrap();
            while *g {
                g = self.cv.wait(g).unwrap();
            }
            self.dev.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> crate::storage::Result<()> {
            self.dev.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> crate::storage::Result<()> {
            self.dev.write_zeroes(offset, len)
        }
    }

    #[test]
    fn the_watchdog_check_sees_a_real_commit_stuck_in_a_flush() {
        use crate::engine::EngineConfig;
        use crate::metadata::format::Layout;
        use crate::metadata::{Geometry, Metadata};
        use crate::storage::{BlockDevice, SimDevice};

        let size = 16 * 4096;
        let geo = Geometry::new(size, 4096).unwrap();
        let src = Arc::new(SimDevice::new(size));
        let dst = Arc::new(StuckFlush {
            dev: SimDevice::new(size),
            stuck: Mutex::new(true),
            cv: std::sync::Condvar::new(),
        });
        let mdd = Arc::new(SimDevice::new(Layout::new(&geo).required_size()));
        let md = Arc::new(Metadata::format(mdd, geo).unwrap());
        let engine = Arc::new(
            Engine::new(
                Some(src as Arc<dyn BlockDevice>),
                dst.clone(),
                md,
                EngineConfig::default(),
            )
            .unwrap(),
        );
        let shared = Shared {
            watched: OnceLock::from(Watched {
                engine: engine.clone(),
                hydration: HydrationControl::new(false, 1, 1, false),
                commit_interval: Some(Duration::from_secs(1)),
            }),
            path: "/nonexistent/notify".into(),
            sock: std::os::unix::net::UnixDatagram::unbound().unwrap(),
            stop: EventFd::new(EFD_NONBLOCK).unwrap(),
            stopping: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            status: Mutex::new(String::new()),
        };
        let limit = Duration::from_millis(100);
        assert!(shared.health(limit).is_ok());
        assert_eq!(
            shared.status_text(),
            "hydration paused: 0/16 regions (0.0%)"
        );
        // A whole-region write hydrates region 0; its commit hangs in the flush.
        engine.write_at(&[7u8; 4096], 0).unwrap();
        let e2 = engine.clone();
        let t = std::thread::spawn(move || e2.commit(DestFlush::Completed).map(|_| ()));
        std::thread::sleep(Duration::from_millis(300));
        let why = shared.health(limit).unwrap_err();
        assert!(why.contains("commit has been running"), "{why}");
        *dst.stuck.lock().unwrap() = false;
        dst.cv.notify_all();
        t.join().unwrap().unwrap();
        assert!(shared.health(limit).is_ok());
        assert_eq!(
            shared.status_text(),
            "hydration paused: 1/16 regions (6.2%)"
        );
    }

    #[test]
    fn poll_reports_readable_fds_and_times_out() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        let t = Instant::now();
        assert_eq!(poll(&fds, Duration::from_millis(50)).unwrap(), None);
        assert!(t.elapsed() >= Duration::from_millis(40));
        b.write(1).unwrap();
        assert_eq!(poll(&fds, Duration::from_secs(5)).unwrap(), Some(1));
    }
}
