//! The control socket server: a thread accepting connections, one short-lived
//! thread per connection, stopped on drop.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{apply_message, ControlError, Request, Response};
use crate::engine::hydrator::HydrationControl;
use crate::engine::{Counters, Engine};
use crate::socket::BoundSocket;

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
    /// Hydrated bytes.
    pub hydrated_bytes: u64,
    /// True when every region is hydrated (the source is no longer needed).
    pub complete: bool,
    /// Regions being hydrated or marked right now.
    pub hydrating_regions: u64,
    /// Hydration rate over the last seconds, bytes per second.
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
    /// Discards of hydrated ranges are passed down.
    pub discard_passdown: bool,
    /// Serving without a source.
    pub source_attached: bool,
    /// I/O counters.
    pub io: Counters,
    /// Seconds since the daemon started.
    pub uptime_seconds: f64,
}

struct Rate {
    samples: VecDeque<(Instant, u64)>,
}

impl Rate {
    /// Records a sample and returns the rate in regions/s over the last ~10 s.
    fn sample(&mut self, now: Instant, hydrated: u64) -> f64 {
        if self
            .samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(250))
        {
            self.samples.push_back((now, hydrated));
        }
        while self.samples.len() > 2
            && now.duration_since(self.samples[0].0) > Duration::from_secs(10)
        {
            self.samples.pop_front();
        }
        let (t0, h0) = self.samples[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 0.2 {
            return 0.0;
        }
        hydrated.saturating_sub(h0) as f64 / dt
    }
}

struct Shared {
    engine: Arc<Engine>,
    ctl: Arc<HydrationControl>,
    source_attached: bool,
    discard_passdown: bool,
    started: Instant,
    rate: Mutex<Rate>,
}

impl Shared {
    fn status(&self) -> Status {
        let e = &self.engine;
        let md = e.metadata();
        let g = e.geometry();
        let hydrated = md.hydrated_count();
        let now = Instant::now();
        let rate = self
            .rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sample(now, hydrated);
        let remaining = g.nr_regions() - hydrated;
        let stats = md.stats();
        let hydrated_bytes = if hydrated == g.nr_regions() {
            g.device_size()
        } else {
            // The short last region counts in full only when hydrated.
            let last_short = md.is_hydrated(g.nr_regions() - 1)
                && g.region_len(g.nr_regions() - 1) < g.region_size();
            hydrated * g.region_size()
                - if last_short {
                    g.region_size() - g.region_len(g.nr_regions() - 1)
                } else {
                    0
                }
        };
        Status {
            uuid: md.uuid().to_string(),
            device_size: g.device_size(),
            region_size: g.region_size(),
            regions: g.nr_regions(),
            hydrated_regions: hydrated,
            hydrated_bytes,
            complete: remaining == 0,
            hydrating_regions: e.regions_in_flight(),
            hydration_rate: rate * g.region_size() as f64,
            eta_seconds: (rate > 0.0 && remaining > 0).then(|| remaining as f64 / rate),
            mode: md.mode().to_string(),
            commits: stats.commits,
            commit_failures: stats.failures,
            last_commit_us: stats.last_commit_us,
            sequence: stats.seq,
            hydration_enabled: self.ctl.enabled(),
            hydration_threshold: self.ctl.threshold(),
            hydration_batch_size: self.ctl.batch_size(),
            discard_passdown: self.discard_passdown,
            source_attached: self.source_attached,
            io: e.counters(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
        }
    }

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
                    tracing::info!(message = %args.join(" "), "{msg}");
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
    /// when the server is dropped, if it is still ours.
    pub fn start(
        socket: BoundSocket,
        engine: Arc<Engine>,
        ctl: Arc<HydrationControl>,
        source_attached: bool,
        discard_passdown: bool,
    ) -> Result<ControlServer, ControlError> {
        let path = socket.path().map(Path::to_path_buf).unwrap_or_default();
        let listen_err = |source| ControlError::Listen {
            path: path.display().to_string(),
            source,
        };
        let listener = socket.listener().try_clone().map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let shared = Arc::new(Shared {
            engine,
            ctl,
            source_attached,
            discard_passdown,
            started: Instant::now(),
            rate: Mutex::new(Rate {
                samples: VecDeque::new(),
            }),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread =
            crate::sandbox::spawn(crate::sandbox::ThreadKind::Control, "control", move || {
                accept_loop(listener, shared, s)
            })
            .map_err(listen_err)?;
        Ok(ControlServer {
            path,
            socket,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
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

fn serve_conn(stream: UnixStream, shared: &Shared) {
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
