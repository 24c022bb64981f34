//! [`NbdDevice`]: a read-only source served by an NBD server (qemu-nbd, nbdkit,
//! rbd-nbd, another host), spoken to by our own client.
//!
//! Layout: [`uri`] parses NBD URIs, [`proto`] is the wire format (pure
//! parsers, fuzzed), [`handshake`] the fixed-newstyle negotiation, `conn` one
//! connection and its reply reader. This file owns the pool of connections, the
//! reconnect loop, deadlines and the [`BlockDevice`] face.
//!
//! Invariants:
//! * Never a write: only `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS` and
//!   `NBD_CMD_DISC` are ever sent; every write-type call fails with `ReadOnly`.
//! * A read returns exactly the bytes the server sent for that range (or zeroes
//!   for a hole it reported), or an error; never a partial or stale buffer.
//!   Replies are matched by cookie and checked against their request
//!   (bounds, overlap, full coverage) before the caller sees them.
//! * No call waits longer than the configured timeout. A request not answered
//!   by then fails with `TimedOut`, and the connection it waited on is dropped
//!   (a server that answers nothing for that long is treated as gone).
//! * A lost connection is re-established in the background with backoff, for
//!   as long as the device lives (at once when it had lasted `STABLE`; a
//!   server that ends every connection soon after negotiating is retried with
//!   backoff, not in a loop). Requests it held are sent again on another
//!   connection while their deadline allows (reads are idempotent).
//! * Every reconnect must find the same export size, or it is refused.

mod conn;
pub mod handshake;
pub mod proto;
pub mod uri;

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use handshake::{HandshakeError, Negotiated};
pub use uri::{is_nbd_uri, NbdAddr, NbdUri, UriError};

use super::{check_range, io_err, BlockDevice, Result, StorageError};
use conn::{Conn, Part, PartError, PartKind, PartReply, Stream, Waiter};

/// Default of `--source-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of `--source-connections`.
pub const DEFAULT_CONNECTIONS: usize = 4;
/// Largest `--source-connections`.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest part of a read sent as one request; larger reads are split and sent
/// in parallel over the connections. A background hydration batch (16 regions
/// of 64 KiB by default) becomes four parts, one per connection, instead of
/// one request waited for on one connection.
const PART: u64 = 256 << 10;
/// Smallest sequential read that sends the next ones ahead.
const READ_AHEAD_MIN: u64 = 64 << 10;
/// Reads of a sequential reader sent ahead.
const READ_AHEAD_DEPTH: usize = 2;
/// Largest range of one block status request.
const STATUS_SPAN: u64 = 1 << 30;
/// First and largest pause between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lasted this long is replaced without a pause when it ends.
const STABLE: Duration = Duration::from_secs(1);

/// How to reach and use an NBD source.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// The server and export.
    pub uri: NbdUri,
    /// How long a request may wait for the server, including reconnecting.
    pub timeout: Duration,
    /// Connections to open when the server allows several (`CAN_MULTI_CONN`).
    pub connections: usize,
}

impl NbdConfig {
    /// A config with the default timeout and connection count.
    pub fn new(uri: NbdUri) -> NbdConfig {
        NbdConfig {
            uri,
            timeout: DEFAULT_TIMEOUT,
            connections: DEFAULT_CONNECTIONS,
        }
    }
}

/// Errors of opening an NBD source.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}")]
    Resolve {
        /// The host.
        host: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to {uri}")]
    Connect {
        /// The URI.
        uri: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Negotiation failed.
    #[error("NBD negotiation with {uri} failed")]
    Handshake {
        /// The URI.
        uri: String,
        /// The cause.
        #[source]
        source: HandshakeError,
    },
    /// A reconnect found another export.
    #[error("{uri} now has {now} bytes but had {was}: it is another export; refusing it")]
    SizeChanged {
        /// The URI.
        uri: String,
        /// The size at first connect.
        was: u64,
        /// The size now.
        now: u64,
    },
    /// A thread could not be started.
    #[error("cannot start the NBD connection thread")]
    Thread(#[source] io::Error),
}

/// The state of an NBD source, for status and metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RemoteStatus {
    /// The URI.
    pub uri: String,
    /// `connected` (at least one connection up) or `reconnecting`.
    pub state: String,
    /// Connections up now.
    pub connections: usize,
    /// Connections wanted: `--source-connections` when the server allows
    /// several, less those it did not take.
    pub max_connections: usize,
    /// Connections lost since start.
    pub disconnects: u64,
    /// Failed connection attempts since start.
    pub failed_attempts: u64,
    /// Requests that timed out.
    pub timeouts: u64,
    /// The last error seen (connection, protocol, server or timeout).
    pub last_error: Option<String>,
    /// The request timeout in seconds.
    pub timeout_secs: f64,
    /// A connection has block status (holes are skipped).
    pub block_status: bool,
}

impl RemoteStatus {
    /// True while at least one connection is up (`state` is `connected`).
    pub fn is_connected(&self) -> bool {
        self.connections > 0
    }
}

#[derive(Debug, Default)]
struct Health {
    last_error: Option<String>,
    disconnects: u64,
    failed_attempts: u64,
    timeouts: u64,
}

/// What every connection thread and request shares.
#[derive(Debug)]
struct Shared {
    cfg: NbdConfig,
    addrs: Vec<SocketAddr>,
    neg: Negotiated,
    /// Live connections; `changed` is notified whenever this changes or on stop.
    live: Mutex<Vec<Arc<Conn>>>,
    changed: Condvar,
    next: AtomicUsize,
    cookie: AtomicU64,
    stop: AtomicBool,
    health: Mutex<Health>,
    /// Connection slots given up because the server took fewer clients.
    retired: AtomicUsize,
}

/// A read-only device served by an NBD server.
#[derive(Debug)]
pub struct NbdDevice {
    shared: Arc<Shared>,
    /// The last block status reply, kept for the ranges after it.
    extents: Mutex<ExtentCache>,
    /// Sequential read detection and the read sent ahead.
    ahead: Mutex<ReadAhead>,
}

/// Block status runs `(start, end, is_data)` the server gave for `[start, end)`.
#[derive(Debug, Default)]
struct ExtentCache {
    start: u64,
    end: u64,
    runs: Vec<(u64, u64, bool)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn uri(&self) -> String {
        self.cfg.uri.to_string()
    }

    fn note_error(&self, e: &str) {
        lock(&self.health).last_error = Some(e.to_string());
    }

    /// Connects and negotiates one connection.
    fn open_stream(&self) -> std::result::Result<(Stream, Negotiated), NbdError> {
        let t = self.cfg.timeout.max(Duration::from_millis(100));
        let connect_err = |source| NbdError::Connect {
            uri: self.uri(),
            source,
        };
        let stream = match &self.cfg.uri.addr {
            NbdAddr::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(connect_err)?),
            NbdAddr::Tcp { .. } => {
                let mut last = None;
                let mut s = None;
                for a in &self.addrs {
                    match TcpStream::connect_timeout(a, t) {
                        Ok(x) => {
                            s = Some(x);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = s.ok_or_else(|| {
                    connect_err(last.unwrap_or_else(|| io::Error::other("no address")))
                })?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
        };
        stream.set_timeouts(Some(t)).map_err(connect_err)?;
        let mut s = stream;
        let neg = handshake::negotiate(&mut s, &self.cfg.uri.export).map_err(|e| {
            NbdError::Handshake {
                uri: self.uri(),
                source: explain(e, t),
            }
        })?;
        // Replies are waited for without a socket timeout (deadlines are the
        // callers'); a send still may not block longer than the timeout.
        s.set_read_timeout(None).map_err(connect_err)?;
        Ok((s, neg))
    }

    /// Connection slot `slot`'s thread: connect, serve replies until the
    /// connection dies, then again with backoff, until the device is dropped.
    fn run_slot(self: &Arc<Self>, slot: usize, mut first: Option<(Stream, Negotiated)>) {
        let mut backoff = BACKOFF_MIN;
        let mut ever_connected = false;
        while !self.stop.load(Ordering::Acquire) {
            let opened = match first.take() {
                Some(x) => Ok(x),
                None => self.open_stream().and_then(|(s, n)| {
                    if n.info.size != self.neg.info.size {
                        let _ = s.shutdown();
                        return Err(NbdError::SizeChanged {
                            uri: self.uri(),
                            was: self.neg.info.size,
                            now: n.info.size,
                        });
                    }
                    Ok((s, n))
                }),
            };
            match opened {
                Ok((stream, neg)) => {
                    ever_connected = true;
                    match Conn::new(slot, stream, neg) {
                        Ok((conn, reader)) => {
                            let up = Instant::now();
                            let conn = Arc::new(conn);
                            {
                                let mut live = lock(&self.live);
                                live.push(conn.clone());
                                self.changed.notify_all();
                            }
                            if slot == 0 || lock(&self.health).disconnects > 0 {
                                tracing::info!(uri = %self.uri(), connection = slot, "NBD source connected");
                            }
                            let why = conn.read_replies(reader);
                            {
                                let mut live = lock(&self.live);
                                live.retain(|c| !Arc::ptr_eq(c, &conn));
                                self.changed.notify_all();
                            }
                            conn.fail_all(&why);
                            conn.close();
                            if self.stop.load(Ordering::Acquire) {
                                return;
                            }
                            tracing::warn!(uri = %self.uri(), connection = slot, error = %why, "NBD source connection lost; reconnecting");
                            {
                                let mut h = lock(&self.health);
                                h.disconnects += 1;
                                // Ended for a request's timeout: that request
                                // recorded the error, with its cause.
                                if !(conn.timed_out() && h.last_error.is_some()) {
                                    h.last_error = Some(why);
                                }
                            }
                            // A connection that served a while is replaced at
                            // once; one the server ended soon after negotiating
                            // (it drops us, or breaks the protocol at once)
                            // waits like a failed attempt, so that such a
                            // server is not hammered with reconnects.
                            if up.elapsed() >= STABLE {
                                backoff = BACKOFF_MIN;
                                continue;
                            }
                        }
                        Err(e) => self.note_error(&format!("cannot set up a connection: {e}")),
                    }
                }
                Err(e) => {
                    let text = crate::error_chain(&e);
                    if slot > 0 && !ever_connected {
                        // The first connection worked a moment ago: the server
                        // takes fewer clients than asked (qemu-nbd's --shared
                        // is 1 unless set). Do with the connections it took.
                        tracing::info!(uri = %self.uri(), connection = slot, error = %text, "the NBD server did not take another connection; using fewer (qemu-nbd: raise --shared)");
                        self.retired.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    {
                        let mut h = lock(&self.health);
                        h.failed_attempts += 1;
                        if h.failed_attempts == 1 || h.failed_attempts % 20 == 0 {
                            tracing::warn!(uri = %self.uri(), connection = slot, error = %text, attempts = h.failed_attempts, "NBD source unreachable; retrying");
                        }
                        h.last_error = Some(text);
                    }
                }
            }
            // Back off, waking early on stop.
            let live = lock(&self.live);
            let _ = self
                .changed
                .wait_timeout_while(live, backoff, |_| !self.stop.load(Ordering::Acquire))
                .unwrap_or_else(|p| p.into_inner());
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// A live connection, waiting for one until `deadline`.
    fn pick(&self, deadline: Instant) -> io::Result<Arc<Conn>> {
        let mut live = lock(&self.live);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Err(io::Error::other("the NBD source is closing"));
            }
            if !live.is_empty() {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
                return Ok(live[i].clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let last = lock(&self.health).last_error.clone();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the NBD source has been unreachable for {:?}{}",
                        self.cfg.timeout,
                        last.map(|l| format!(" (last error: {l})"))
                            .unwrap_or_default()
                    ),
                ));
            }
            live = self
                .changed
                .wait_timeout(live, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Sends `parts` and waits for all of them, resending those whose connection
    /// died, until the deadline.
    fn run(&self, parts: Vec<Part>) -> io::Result<Vec<PartReply>> {
        let deadline = Instant::now() + self.cfg.timeout;
        let mut f = InFlight::new(parts);
        self.send(&mut f, deadline)?;
        self.finish(f, deadline)
    }

    /// Sends the parts of `f` not sent yet, waiting for a connection until
    /// `deadline` (pass `Instant::now()` not to wait).
    fn send(&self, f: &mut InFlight, deadline: Instant) -> io::Result<()> {
        while let Some(&i) = f.to_send.last() {
            let conn = self.pick(deadline)?;
            let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
            conn.send(cookie, &f.parts[i], &f.waiter, i);
            f.on[i] = Some(conn);
            f.to_send.pop();
        }
        Ok(())
    }

    /// Waits for every part of `f`, resending those whose connection died,
    /// until `deadline`.
    fn finish(&self, mut f: InFlight, deadline: Instant) -> io::Result<Vec<PartReply>> {
        let n = f.parts.len();
        let waiter = f.waiter.clone();
        // Why a connection this request was on died last: the reason given
        // when it times out (a server that breaks the protocol every time).
        let mut last_why: Option<String> = None;
        loop {
            self.send(&mut f, deadline)?;
            let on = &f.on;
            let to_send = &mut f.to_send;
            let mut st = waiter.lock();
            loop {
                for (i, slot) in st.results.iter_mut().enumerate() {
                    if let Some(Err(PartError::Disconnected(why))) = slot {
                        self.note_error(why);
                        last_why = Some(std::mem::take(why));
                        *slot = None;
                        to_send.push(i);
                    }
                }
                if !to_send.is_empty() {
                    break;
                }
                if st.results.iter().all(|r| r.is_some()) {
                    let results = std::mem::take(&mut st.results);
                    let mut out = Vec::with_capacity(n);
                    for r in results.into_iter().flatten() {
                        match r {
                            Ok(x) => out.push(x),
                            Err(e) => return Err(e.into_io()),
                        }
                    }
                    return Ok(out);
                }
                let now = Instant::now();
                if now >= deadline {
                    drop(st);
                    // Whatever connection still owes an answer is considered hung.
                    let w = waiter.lock();
                    for (i, r) in w.results.iter().enumerate() {
                        if r.is_none() {
                            if let Some(c) = &on[i] {
                                c.kill(conn::NO_ANSWER);
                            }
                        }
                    }
                    drop(w);
                    let mut h = lock(&self.health);
                    h.timeouts += 1;
                    let msg = format!(
                        "the NBD source did not answer within {:?}{}",
                        self.cfg.timeout,
                        last_why
                            .as_ref()
                            .map(|w| format!(" (last error: {w})"))
                            .unwrap_or_default()
                    );
                    h.last_error = Some(msg.clone());
                    return Err(io::Error::new(io::ErrorKind::TimedOut, msg));
                }
                st = waiter.wait(st, deadline - now);
            }
        }
    }
}

/// Parts of one request: sent (or waiting to be sent) and not yet waited for.
#[derive(Debug)]
struct InFlight {
    parts: Vec<Part>,
    waiter: Arc<Waiter>,
    /// The connection each part was last sent on.
    on: Vec<Option<Arc<Conn>>>,
    /// Parts to send (again).
    to_send: Vec<usize>,
}

impl InFlight {
    fn new(parts: Vec<Part>) -> InFlight {
        let n = parts.len();
        InFlight {
            waiter: Arc::new(Waiter::new(n)),
            on: vec![None; n],
            to_send: (0..n).rev().collect(),
            parts,
        }
    }
}

/// Sequential reads: where the last read ended, and the read sent ahead of
/// the next one.
#[derive(Debug, Default)]
struct ReadAhead {
    next: u64,
    /// Reads sent ahead, in order: `(start, end, parts)`.
    windows: std::collections::VecDeque<(u64, u64, InFlight)>,
}

/// True for failures that say nothing about the export: nobody answered.
fn unreachable(e: &NbdError) -> bool {
    matches!(
        e,
        NbdError::Connect { .. }
            | NbdError::Handshake {
                source: HandshakeError::Io(_),
                ..
            }
    )
}

/// A negotiation I/O error in the operator's words: a socket timeout reads as
/// EAGAIN ("Resource temporarily unavailable"), an early EOF as "failed to
/// fill whole buffer".
fn explain(e: HandshakeError, t: Duration) -> HandshakeError {
    match e {
        HandshakeError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            HandshakeError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the server did not respond within {t:?}"),
            ))
        }
        HandshakeError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => HandshakeError::Io(
            io::Error::new(io.kind(), "the server closed the connection"),
        ),
        e => e,
    }
}

impl NbdDevice {
    /// Connects to the server, negotiates, and starts the connection threads
    /// (several when the server allows it). Fails when the first connection
    /// cannot be made: the export's size must be known.
    pub fn connect(cfg: NbdConfig) -> std::result::Result<NbdDevice, NbdError> {
        Self::open(cfg, None)
    }

    /// As [`NbdDevice::connect`], but when the server cannot be reached at all
    /// (connection refused, no socket, a timeout, a connection closed during
    /// negotiation) and the size is known (an existing clone's), the device
    /// starts without a connection and one connection thread keeps trying:
    /// reads wait for it up to the timeout, as during any outage. A server
    /// that answers and refuses (no such export, TLS required, bad protocol)
    /// is still an error.
    pub fn connect_or_defer(cfg: NbdConfig, size: u64) -> std::result::Result<NbdDevice, NbdError> {
        Self::open(cfg, Some(size))
    }

    fn open(cfg: NbdConfig, known_size: Option<u64>) -> std::result::Result<NbdDevice, NbdError> {
        let addrs = match &cfg.uri.addr {
            NbdAddr::Tcp { host, port } => {
                // Resolved once: after start-up the sandbox cannot read
                // /etc/hosts or resolv.conf, and a source should not move.
                let a: Vec<SocketAddr> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|source| NbdError::Resolve {
                        host: host.clone(),
                        source,
                    })?
                    .collect();
                if a.is_empty() {
                    return Err(NbdError::Resolve {
                        host: host.clone(),
                        source: io::Error::other("no address"),
                    });
                }
                a
            }
            NbdAddr::Unix(_) => Vec::new(),
        };
        let probe = Shared {
            cfg: cfg.clone(),
            addrs: addrs.clone(),
            neg: Negotiated {
                info: Default::default(),
                structured: false,
                base_allocation: None,
            },
            live: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            next: AtomicUsize::new(0),
            cookie: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            health: Mutex::new(Health::default()),
            retired: AtomicUsize::new(0),
        };
        let (stream, neg) = match (probe.open_stream(), known_size) {
            (Ok(x), _) => x,
            (Err(e), Some(size)) if unreachable(&e) => {
                let text = crate::error_chain(&e);
                tracing::warn!(uri = %probe.uri(), error = %text, "NBD source unreachable at start; serving hydrated regions and reconnecting in the background");
                let neg = Negotiated {
                    info: proto::ExportInfo {
                        size,
                        flags: 0,
                        min_block: 1,
                        pref_block: 4096,
                        max_block: proto::MAX_READ,
                    },
                    structured: false,
                    base_allocation: None,
                };
                {
                    let mut h = lock(&probe.health);
                    h.failed_attempts = 1;
                    h.last_error = Some(text);
                }
                let shared = Arc::new(Shared { neg, ..probe });
                let s = shared.clone();
                crate::sandbox::spawn(crate::sandbox::ThreadKind::Source, "nbd-0", move || {
                    s.run_slot(0, None)
                })
                .map_err(NbdError::Thread)?;
                return Ok(NbdDevice {
                    shared,
                    extents: Mutex::default(),
                    ahead: Mutex::default(),
                });
            }
            (Err(e), _) => return Err(e),
        };
        let want = if neg.info.multi_conn() {
            cfg.connections.clamp(1, MAX_CONNECTIONS)
        } else {
            1
        };
        let shared = Arc::new(Shared { neg, ..probe });
        let mut first = Some((stream, neg));
        for slot in 0..want {
            let s = shared.clone();
            let f = first.take();
            crate::sandbox::spawn(
                crate::sandbox::ThreadKind::Source,
                &format!("nbd-{slot}"),
                move || s.run_slot(slot, f),
            )
            .map_err(NbdError::Thread)?;
        }
        let dev = NbdDevice {
            shared,
            extents: Mutex::default(),
            ahead: Mutex::default(),
        };
        // Wait briefly for the first connection to be published.
        let _ = dev.shared.pick(Instant::now() + Duration::from_secs(5));
        tracing::info!(
            uri = %dev.shared.uri(),
            size = neg.info.size,
            connections = want,
            structured = neg.structured,
            block_status = neg.base_allocation.is_some(),
            "NBD source opened"
        );
        Ok(dev)
    }

    /// What negotiation agreed on.
    pub fn negotiated(&self) -> Negotiated {
        self.shared.neg
    }

    /// The state of the source.
    pub fn status(&self) -> RemoteStatus {
        let s = &self.shared;
        let (connections, conn_status) = {
            let live = lock(&s.live);
            (live.len(), live.iter().any(|c| c.has_block_status()))
        };
        let h = lock(&s.health);
        RemoteStatus {
            uri: s.uri(),
            state: if connections > 0 {
                "connected"
            } else {
                "reconnecting"
            }
            .into(),
            connections,
            max_connections: if s.neg.info.multi_conn() {
                s.cfg.connections.clamp(1, MAX_CONNECTIONS) - s.retired.load(Ordering::Relaxed)
            } else {
                1
            },
            disconnects: h.disconnects,
            failed_attempts: h.failed_attempts,
            timeouts: h.timeouts,
            last_error: h.last_error.clone(),
            timeout_secs: s.cfg.timeout.as_secs_f64(),
            block_status: conn_status || s.neg.base_allocation.is_some(),
        }
    }

    /// Reads `[offset, offset + buf.len())` (already range-checked) into `buf`,
    /// honouring the server's minimum block size.
    /// Reads the blocks around `[offset, offset + len)` (widened to the
    /// server's minimum block size): the start of the first and the data of
    /// each part, in order.
    fn fetch(&self, offset: u64, len: u64) -> io::Result<(u64, Vec<Vec<u8>>)> {
        let info = &self.shared.neg.info;
        let min = info.min_block.max(1) as u64;
        let start = offset / min * min;
        let end = (offset + len).div_ceil(min) * min;
        let end = end.min(info.size.max(offset + len));
        let part = (info.max_block as u64 / min * min).clamp(min, PART.max(min));
        let split = |mut pos: u64, end: u64| {
            let mut parts = Vec::new();
            while pos < end {
                let n = (end - pos).min(part);
                parts.push(Part {
                    kind: PartKind::Read,
                    offset: pos,
                    len: n as u32,
                });
                pos += n;
            }
            parts
        };
        let deadline = Instant::now() + self.shared.cfg.timeout;
        let mut ra = lock(&self.ahead);
        // The read sent ahead, if it is this one; otherwise ours goes out now
        // (and what was sent ahead is dropped: the reader went elsewhere).
        let hit = matches!(ra.windows.front(), Some((s, e, _)) if (*s, *e) == (start, end));
        let mine = match ra.windows.pop_front() {
            Some((_, _, f)) if hit => f,
            _ => {
                ra.windows.clear();
                let mut f = InFlight::new(split(start, end));
                self.shared.send(&mut f, deadline)?;
                f
            }
        };
        // A sequential reader (background hydration walks the disk in order)
        // gets its next reads sent now, so the server works on them while the
        // caller writes this one out. The export never changes, so data read
        // early is still right; only a live connection is used, never waited for.
        if hit || (ra.next == start && end - start >= READ_AHEAD_MIN) {
            let len = end - start;
            while ra.windows.len() < READ_AHEAD_DEPTH {
                let from = ra.windows.back().map_or(end, |w| w.1);
                if from >= info.size {
                    break;
                }
                let to = (from + len).min(info.size);
                let mut f = InFlight::new(split(from, to));
                if self.shared.send(&mut f, Instant::now()).is_err() {
                    break;
                }
                ra.windows.push_back((from, to, f));
            }
        }
        ra.next = end;
        drop(ra);
        let replies = self.shared.finish(mine, deadline)?;
        let mut out = Vec::with_capacity(replies.len());
        for r in replies {
            let PartReply::Data(data) = r else {
                return Err(io::Error::other("internal: a read got a status reply"));
            };
            out.push(data);
        }
        Ok((start, out))
    }

    /// Reads `[offset, offset + len)` (already range-checked) into `bufs`.
    fn read_into(&self, bufs: &mut [IoSliceMut<'_>], offset: u64, len: u64) -> io::Result<()> {
        let (start, parts) = self.fetch(offset, len)?;
        // Scatter: skip (offset - start) bytes, copy len bytes into the iovecs.
        let mut skip = (offset - start) as usize;
        let mut bi = 0;
        let mut bo = 0;
        let mut left = len as usize;
        for data in parts {
            let mut d = &data[..];
            if skip >= d.len() {
                skip -= d.len();
                continue;
            }
            d = &d[skip..];
            skip = 0;
            while !d.is_empty() && left > 0 {
                let Some(b) = bufs.get_mut(bi) else { break };
                let n = (b.len() - bo).min(d.len()).min(left);
                b[bo..bo + n].copy_from_slice(&d[..n]);
                d = &d[n..];
                left -= n;
                bo += n;
                if bo == b.len() {
                    bi += 1;
                    bo = 0;
                }
            }
        }
        if left != 0 {
            return Err(io::Error::other("internal: a read came back short"));
        }
        Ok(())
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::Release);
        let live = std::mem::take(&mut *lock(&s.live));
        for c in live {
            c.disconnect();
        }
        s.changed.notify_all();
    }
}

impl BlockDevice for NbdDevice {
    fn size(&self) -> u64 {
        self.shared.neg.info.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        check_range("read", offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        self.read_into(&mut [IoSliceMut::new(buf)], offset, len)
            .map_err(|e| io_err("read", offset, len, e))
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let len = super::iov_len(bufs);
        check_range("read", offset, len, self.size())?;
        if len == 0 {
            return Ok(());
        }
        self.read_into(bufs, offset, len)
            .map_err(|e| io_err("read", offset, len, e))
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(StorageError::ReadOnly { op: "write" })
    }

    fn flush(&self) -> Result<()> {
        // Nothing is ever written.
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(StorageError::ReadOnly { op: "discard" })
    }

    fn supports_discard(&self) -> bool {
        false
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(StorageError::ReadOnly { op: "write-zeroes" })
    }

    fn data_extents(&self, offset: u64, len: u64) -> Result<Option<Vec<(u64, u64)>>> {
        check_range("block-status", offset, len, self.size())?;
        let end = offset + len;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |a: u64, b: u64| match out.last_mut() {
            Some(l) if l.1 == a => l.1 = b,
            _ => out.push((a, b)),
        };
        let mut pos = offset;
        while pos < end {
            // The export never changes under a clone, so what the server said
            // of a range stays true: answer from the last reply while it covers
            // `pos`, and ask ahead otherwise (hydration walks the disk in order).
            let hit = {
                let c = lock(&self.extents);
                (c.start <= pos && pos < c.end).then(|| {
                    let stop = c.end.min(end);
                    for &(a, b, data) in &c.runs {
                        let (a, b) = (a.max(pos), b.min(stop));
                        if data && a < b {
                            push(a, b);
                        }
                    }
                    stop
                })
            };
            if let Some(stop) = hit {
                pos = stop;
                continue;
            }
            let n = (self.size() - pos).min(STATUS_SPAN);
            // Whether a connection has block status is its own: one without it
            // answers at once, with no network round trip (see Conn::send).
            let r = self.shared.run(vec![Part {
                kind: PartKind::Status,
                offset: pos,
                len: n as u32,
            }]);
            let runs = match r {
                Ok(mut v) => match v.pop() {
                    Some(PartReply::Extents(runs)) if !runs.is_empty() => runs,
                    _ => return Ok(None),
                },
                // A server error on block status: every byte may be data (a
                // read will tell whether the source works at all).
                Err(e) if e.kind() != io::ErrorKind::TimedOut => return Ok(None),
                Err(e) => return Err(io_err("block-status", pos, n, e)),
            };
            let covered = runs.last().map_or(pos, |l| l.1);
            *lock(&self.extents) = ExtentCache {
                start: pos,
                end: covered,
                runs,
            };
        }
        Ok(Some(out))
    }

    fn remote_status(&self) -> Option<RemoteStatus> {
        Some(self.status())
    }
}
