//! The control socket server: a thread accepting connections, one short-lived
//! thread per connection, stopped on drop.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{apply_message, ControlError, Request, Response};
use crate::engine::hydrator::HydrationControl;
use crate::engine::{Counters, Engine};
use crate::metadata::format::BLOCK_SIZE;
use crate::socket::BoundSocket;
use crate::virtio::handover::{FrontReport, Frontends};

/// The daemon's status, as `vhost-clone status --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Status {
    /// Clone uuid.
    pub uuid: String,
    /// Device size in bytes.
    pub device_size: u64,
    /// Region size in bytes.
    pub region_size: u64,
    /// Number of regions.
    pub regions: u64,
    /// Hydrated regions.
    pub hydrated_regions: u64,
    /// Regions partly written (some sub-blocks the guest's, the rest still the
    /// source's; version 2 stores).
    #[serde(default)]
    pub partly_written_regions: u64,
    /// Hydrated bytes.
    pub hydrated_bytes: u64,
    /// True when every region is hydrated (the source is no longer needed).
    pub complete: bool,
    /// Regions being hydrated or marked right now.
    pub hydrating_regions: u64,
    /// Hydration rate over the last 10 s as the daemon measures it (sampled
    /// every second), bytes per second.
    pub hydration_rate: f64,
    /// Estimated seconds to completion at that rate (None when unknown).
    pub eta_seconds: Option<f64>,
    /// Metadata mode: rw, ro or fail.
    pub mode: String,
    /// Metadata commits that wrote a new state.
    pub commits: u64,
    /// Failed commits.
    pub commit_failures: u64,
    /// Duration of the last commit, microseconds.
    pub last_commit_us: u64,
    /// Metadata sequence number.
    pub sequence: u64,
    /// Background hydration enabled.
    pub hydration_enabled: bool,
    /// `hydration_threshold` in regions.
    pub hydration_threshold: u64,
    /// `hydration_batch_size` in regions.
    pub hydration_batch_size: u64,
    /// Bytes per second background hydration may read from the source; 0 is
    /// unlimited (`hydration-rate`).
    #[serde(default)]
    pub hydration_rate_limit: u64,
    /// Discards of hydrated ranges are passed down.
    pub discard_passdown: bool,
    /// Serving without a source.
    pub source_attached: bool,
    /// I/O counters.
    pub io: Counters,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
    /// The daemon's version.
    #[serde(default)]
    pub version: String,
    /// The git commit it was built from (`unknown` outside a checkout).
    #[serde(default)]
    pub commit: String,
    /// The daemon's process id.
    #[serde(default)]
    pub pid: u32,
    /// When it started, RFC 3339 UTC.
    #[serde(default)]
    pub started_at: String,
    /// The source image (None when serving without one).
    #[serde(default)]
    pub source: Option<String>,
    /// The destination.
    #[serde(default)]
    pub dest: String,
    /// The metadata file.
    #[serde(default)]
    pub metadata: String,
    /// The vhost-user socket (None when serving on an inherited descriptor).
    #[serde(default)]
    pub socket: Option<String>,
    /// The control socket.
    #[serde(default)]
    pub control_socket: String,
    /// The metrics endpoint's address (HOST:PORT as bound), if serving metrics.
    #[serde(default)]
    pub metrics_address: Option<String>,
    /// Metadata block size in bytes.
    #[serde(default)]
    pub metadata_block_size: u64,
    /// Metadata blocks the format uses.
    #[serde(default)]
    pub metadata_blocks_used: u64,
    /// Metadata blocks the metadata store holds.
    #[serde(default)]
    pub metadata_blocks_total: u64,
    /// A network (NBD) source's connection state; None for a file source.
    #[serde(default)]
    pub source_remote: Option<crate::storage::nbd::RemoteStatus>,
    /// The vhost-user frontends: how many are attached, which runs the queues, whether
    /// one is migrating its guest, hand-overs so far.
    #[serde(default)]
    pub frontends: FrontReport,
}

impl Status {
    /// The status in the form `dmsetup status` prints for a dm-clone target,
    /// on one line (sizes in 512-byte sectors):
    ///
    /// ```text
    /// 0 <sectors> clone <md block size> <used>/<total md blocks> <region size>
    ///   <hydrated>/<total regions> <hydrating> <#features> [no_hydration]
    ///   [no_discard_passdown] 4 hydration_threshold <t> hydration_batch_size <b> <rw|ro>
    /// ```
    ///
    /// In fail mode, as dm-clone: `0 <sectors> clone Fail`.
    pub fn dm_line(&self) -> String {
        let sectors = self.device_size.div_ceil(512);
        if self.mode == "fail" {
            return format!("0 {sectors} clone Fail");
        }
        let mut features = Vec::new();
        if !self.hydration_enabled {
            features.push(" no_hydration");
        }
        if !self.discard_passdown {
            features.push(" no_discard_passdown");
        }
        format!(
            "0 {sectors} clone {} {}/{} {} {}/{} {} {}{} 4 hydration_threshold {} hydration_batch_size {} {}",
            self.metadata_block_size / 512,
            self.metadata_blocks_used,
            self.metadata_blocks_total,
            self.region_size / 512,
            self.hydrated_regions,
            self.regions,
            self.hydrating_regions,
            features.len(),
            features.concat(),
            self.hydration_threshold,
            self.hydration_batch_size,
            self.mode
        )
    }
}

/// What a running daemon is: fixed at start-up, shown by `status`.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The source image, if attached.
    pub source: Option<PathBuf>,
    /// The destination.
    pub dest: PathBuf,
    /// The metadata file.
    pub metadata: PathBuf,
    /// The vhost-user socket (None when serving on an inherited descriptor).
    pub socket: Option<PathBuf>,
    /// The control socket.
    pub control_socket: PathBuf,
    /// Where metrics are served, as bound (a port 0 resolved).
    pub metrics_address: Option<SocketAddr>,
}

/// Builds [`Status`] reports of a running daemon: the one source of truth for
/// the control socket, the metrics endpoint and the service manager.
#[derive(Debug)]
pub struct StatusReporter {
    engine: Arc<Engine>,
    ctl: Arc<HydrationControl>,
    identity: Identity,
    source_attached: bool,
    discard_passdown: bool,
    started: Instant,
    started_at: SystemTime,
    frontends: Arc<Frontends>,
}

impl StatusReporter {
    /// A reporter for a daemon that starts now.
    pub fn new(
        engine: Arc<Engine>,
        ctl: Arc<HydrationControl>,
        identity: Identity,
        source_attached: bool,
        discard_passdown: bool,
    ) -> StatusReporter {
        StatusReporter {
            engine,
            ctl,
            identity,
            source_attached,
            discard_passdown,
            started: Instant::now(),
            started_at: SystemTime::now(),
            frontends: Arc::default(),
        }
    }

    /// Reports on the vhost-user frontends of `frontends` (the serve call's, see
    /// [`crate::virtio::ServeOptions::frontends`]) instead of none.
    pub fn with_frontends(mut self, frontends: Arc<Frontends>) -> StatusReporter {
        self.frontends = frontends;
        self
    }

    /// The engine reported on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// When the daemon started (wall clock).
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// The daemon's status now.
    pub fn status(&self) -> Status {
        let e = &self.engine;
        let md = e.metadata();
        let g = e.geometry();
        let hydrated = md.hydrated_count();
        let hydrated_bytes = e.hydrated_bytes();
        let rate = e.hydration_rate();
        let remaining = g.device_size().saturating_sub(hydrated_bytes);
        let stats = md.stats();
        let (blocks_used, blocks_total) = md.blocks();
        let id = &self.identity;
        let path = |p: &PathBuf| p.display().to_string();
        Status {
            uuid: md.uuid().to_string(),
            device_size: g.device_size(),
            region_size: g.region_size(),
            regions: g.nr_regions(),
            hydrated_regions: hydrated,
            partly_written_regions: md.partial_count(),
            hydrated_bytes,
            complete: hydrated == g.nr_regions(),
            hydrating_regions: e.regions_in_flight(),
            hydration_rate: rate,
            eta_seconds: (rate > 0.0 && remaining > 0).then(|| remaining as f64 / rate),
            mode: md.mode().to_string(),
            commits: stats.commits,
            commit_failures: stats.failures,
            last_commit_us: stats.last_commit_us,
            sequence: stats.seq,
            hydration_enabled: self.ctl.enabled(),
            hydration_threshold: self.ctl.threshold(),
            hydration_batch_size: self.ctl.batch_size(),
            hydration_rate_limit: self.ctl.rate_limit(),
            discard_passdown: self.discard_passdown,
            source_attached: self.source_attached,
            io: e.counters(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            version: crate::VERSION.into(),
            commit: crate::GIT_COMMIT.into(),
            pid: std::process::id(),
            started_at: humantime::format_rfc3339_seconds(self.started_at).to_string(),
            source: id.source.as_ref().map(path),
            dest: path(&id.dest),
            metadata: path(&id.metadata),
            socket: id.socket.as_ref().map(path),
            control_socket: path(&id.control_socket),
            metrics_address: id.metrics_address.map(|a| a.to_string()),
            metadata_block_size: BLOCK_SIZE,
            metadata_blocks_used: blocks_used,
            metadata_blocks_total: blocks_total,
            source_remote: e.source_status(),
            frontends: self.frontends.report(),
        }
    }

    /// Answers one request line.
    fn handle(&self, line: &str) -> Response {
        match serde_json::from_str::<Request>(line) {
            Err(e) => Response {
                ok: false,
                error: Some(format!("bad request ({e}); send {{\"cmd\":\"status\"}} or {{\"cmd\":\"message\",\"args\":[...]}}")),
                status: None,
            },
            Ok(Request::Status) => Response {
                ok: true,
                error: None,
                status: Some(self.status()),
            },
            Ok(Request::Message { args }) => match apply_message(&self.ctl, &args) {
                Ok(msg) => {
                    tracing::info!(args = ?args, "{msg}");
                    Response {
                        ok: true,
                        error: None,
                        status: None,
                    }
                }
                Err(e) => Response {
                    ok: false,
                    error: Some(e),
                    status: None,
                },
            },
        }
    }
}

/// The running control socket; removed and stopped on drop.
pub struct ControlServer {
    path: PathBuf,
    /// Removes the socket (if still ours) when dropped, after the thread stopped.
    socket: BoundSocket,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    responder: Arc<Responder>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ControlServer {
    /// Starts serving status and messages for `engine` on `socket` (bound by
    /// [`BoundSocket::bind`], before any thread started); the socket is removed
    /// when the server is dropped, if it is still ours. Status reports carry
    /// no identity (paths); [`ControlServer::start_with`] gives them one.
    pub fn start(
        socket: BoundSocket,
        engine: Arc<Engine>,
        ctl: Arc<HydrationControl>,
        source_attached: bool,
        discard_passdown: bool,
    ) -> Result<ControlServer, ControlError> {
        let reporter = StatusReporter::new(
            engine,
            ctl,
            Identity::default(),
            source_attached,
            discard_passdown,
        );
        Self::start_with(socket, Arc::new(reporter))
    }

    /// Starts serving the reports of `reporter` (and messages to its
    /// hydration controls) on `socket`.
    pub fn start_with(
        socket: BoundSocket,
        reporter: Arc<StatusReporter>,
    ) -> Result<ControlServer, ControlError> {
        Self::start_responder(
            socket,
            Responder {
                reporter: OnceLock::from(reporter),
                waiting: String::new(),
            },
        )
    }

    /// Starts a control socket for a daemon that has no engine yet (`serve
    /// --standby`): every request is answered with an error that says
    /// `waiting`, until [`ControlServer::serve`] gives it a reporter.
    pub fn start_standby(
        socket: BoundSocket,
        waiting: String,
    ) -> Result<ControlServer, ControlError> {
        Self::start_responder(
            socket,
            Responder {
                reporter: OnceLock::new(),
                waiting,
            },
        )
    }

    fn start_responder(
        socket: BoundSocket,
        responder: Responder,
    ) -> Result<ControlServer, ControlError> {
        let path = socket.path().map(Path::to_path_buf).unwrap_or_default();
        let listen_err = |source| ControlError::Listen {
            path: path.display().to_string(),
            source,
        };
        let listener = socket.listener().try_clone().map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let responder = Arc::new(responder);
        let r = responder.clone();
        let thread =
            crate::sandbox::spawn(crate::sandbox::ThreadKind::Control, "control", move || {
                accept_loop(listener, r, s)
            })
            .map_err(listen_err)?;
        Ok(ControlServer {
            path,
            socket,
            stop,
            thread: Some(thread),
            responder,
        })
    }

    /// Answers from now on with the reports of `reporter` (once; a second call
    /// changes nothing).
    pub fn serve(&self, reporter: Arc<StatusReporter>) {
        let _ = self.responder.reporter.set(reporter);
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What answers the requests: the reporter, or before there is one, an error.
struct Responder {
    reporter: OnceLock<Arc<StatusReporter>>,
    /// What a standby waits for.
    waiting: String,
}

impl Responder {
    fn handle(&self, line: &str) -> Response {
        match self.reporter.get() {
            Some(r) => r.handle(line),
            None => Response {
                ok: false,
                error: Some(format!("standby: {}", self.waiting)),
                status: None,
            },
        }
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Responder>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let sh = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_conn(stream, &sh));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn serve_conn(stream: UnixStream, shared: &Responder) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let resp = shared.handle(line.trim());
        let Ok(mut out) = serde_json::to_string(&resp) else {
            return;
        };
        out.push('\n');
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // `socket` is dropped next: it removes the path only if it is still ours.
        let _ = &self.socket;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_line_has_dm_clone_fields() {
        let mut s = Status {
            device_size: 1 << 30,
            region_size: 64 << 10,
            regions: 16384,
            hydrated_regions: 1000,
            hydrating_regions: 3,
            mode: "rw".into(),
            hydration_enabled: true,
            hydration_threshold: 64,
            hydration_batch_size: 16,
            discard_passdown: true,
            metadata_block_size: 4096,
            metadata_blocks_used: 5,
            metadata_blocks_total: 256,
            ..Status::default()
        };
        assert_eq!(
            s.dm_line(),
            "0 2097152 clone 8 5/256 128 1000/16384 3 0 4 hydration_threshold 64 hydration_batch_size 16 rw"
        );
        s.hydration_enabled = false;
        s.discard_passdown = false;
        s.mode = "ro".into();
        assert_eq!(
            s.dm_line(),
            "0 2097152 clone 8 5/256 128 1000/16384 3 2 no_hydration no_discard_passdown 4 hydration_threshold 64 hydration_batch_size 16 ro"
        );
        s.mode = "fail".into();
        assert_eq!(s.dm_line(), "0 2097152 clone Fail");
    }
}
