//! The metrics endpoint: a minimal HTTP/1.x responder on one thread.
//!
//! It answers `GET /metrics` (a query string is ignored) with the exposition,
//! other paths with 404, other methods with 405, anything unparsable with 400,
//! and closes the connection after each answer (`Connection: close`), which
//! every scraper handles. The peer may be hostile, so every resource is
//! bounded, and no peer can hold up another:
//!
//! * one thread and one epoll set, non-blocking sockets: a slow or silent
//!   peer costs a table entry, never a blocked thread;
//! * at most [`MAX_CONNECTIONS`] connections; one more evicts the oldest, so a
//!   flood of idle connections cannot lock a real scraper out;
//! * a request (line and headers) of at most [`MAX_REQUEST`] bytes, else 431;
//! * [`IO_TIMEOUT`] for the whole request to arrive, and again for the answer
//!   to be taken, else the connection is dropped (slowloris).
//!
//! A crate server was considered: tiny_http runs a thread per connection from a
//! pool that grows with the connections and has no request deadline, so an
//! idle-connection flood costs a thread each; hyper needs an async runtime
//! this daemon does not otherwise have. What the endpoint needs is the few
//! lines of HTTP below; the epoll wrapper is vmm-sys-util's, already a
//! dependency.

use std::collections::BTreeMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{render, MetricsError, CONTENT_TYPE};

/// Largest request (request line and headers) read.
pub const MAX_REQUEST: usize = 8192;
/// Connections served at once; one more evicts the oldest.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a peer has to send its request, and then to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

const STOP: u64 = 0;
const LISTENER: u64 = 1;

/// The running endpoint; stopped and joined on drop.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `registry` on `listener` (bound by [`super::bind`]) from a new thread.
    pub fn start(listener: TcpListener, registry: Registry) -> Result<MetricsServer, MetricsError> {
        let addr = listener.local_addr().map_err(MetricsError::Setup)?;
        listener
            .set_nonblocking(true)
            .map_err(MetricsError::Setup)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(MetricsError::Setup)?;
        let epoll = Epoll::new().map_err(MetricsError::Setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP),
            )
            .map_err(MetricsError::Setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER),
            )
            .map_err(MetricsError::Setup)?;
        let mut lp = Loop {
            epoll,
            listener,
            registry,
            conns: BTreeMap::new(),
            next: LISTENER + 1,
            accept_error_logged: None,
        };
        tracing::info!(address = %addr, "serving metrics at http://{addr}/metrics");
        let thread =
            crate::sandbox::spawn(crate::sandbox::ThreadKind::Metrics, "metrics", move || {
                lp.run()
            })
            .map_err(MetricsError::Setup)?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on (the port chosen when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        // An eventfd write fails only when the counter would overflow: it is then
        // non-zero already, which is all the loop looks at.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection: reading its request, then writing the answer.
struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    /// The answer, once the request is complete.
    answer: Option<Vec<u8>>,
    written: usize,
    deadline: Instant,
}

/// What a connection needs next.
enum Next {
    Keep,
    WantWrite,
    Close,
}

struct Loop {
    epoll: Epoll,
    listener: TcpListener,
    registry: Registry,
    /// By token: the smallest is the oldest.
    conns: BTreeMap<u64, Conn>,
    next: u64,
    accept_error_logged: Option<Instant>,
}

impl Loop {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let now = Instant::now();
            let timeout = self
                .conns
                .values()
                .map(|c| c.deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            // Round up, so that an expired deadline is seen on the next pass.
            let ms = i32::try_from(timeout.as_millis() + 1).unwrap_or(1000);
            let n = match self.epoll.wait(ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "metrics event loop failed; metrics are no longer served");
                    return;
                }
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    STOP => return,
                    LISTENER => self.accept(),
                    token => self.ready(token),
                }
            }
            let now = Instant::now();
            let expired: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| c.deadline <= now)
                .map(|(t, _)| *t)
                .collect();
            for t in expired {
                tracing::debug!("metrics: dropping a connection that timed out");
                self.close(t);
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        if let Some(oldest) = self.conns.keys().next().copied() {
                            tracing::debug!("metrics: too many connections; dropping the oldest");
                            self.close(oldest);
                        }
                    }
                    if let Err(e) = self.add(stream) {
                        tracing::debug!(%peer, error = %e, "metrics: cannot take a connection");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of descriptors, most likely: free one, and do not spin.
                    if self
                        .accept_error_logged
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                    {
                        tracing::warn!(error = %e, "metrics: accept failed");
                        self.accept_error_logged = Some(Instant::now());
                    }
                    if let Some(oldest) = self.conns.keys().next().copied() {
                        self.close(oldest);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    return;
                }
            }
        }
    }

    fn add(&mut self, stream: TcpStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let token = self.next;
        self.next += 1;
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
        self.conns.insert(
            token,
            Conn {
                stream,
                request: Vec::new(),
                answer: None,
                written: 0,
                deadline: Instant::now() + IO_TIMEOUT,
            },
        );
        Ok(())
    }

    fn close(&mut self, token: u64) {
        if let Some(c) = self.conns.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            let _ = c.stream.shutdown(Shutdown::Both);
        }
    }

    fn ready(&mut self, token: u64) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let next = if c.answer.is_some() {
            write_some(c)
        } else {
            match read_some(c) {
                Ok(Some(req)) => {
                    let answer = respond(&self.registry, &req);
                    c.answer = Some(answer);
                    c.deadline = Instant::now() + IO_TIMEOUT;
                    match write_some(c) {
                        Next::Keep => Next::WantWrite,
                        n => n,
                    }
                }
                Ok(None) => Next::Keep,
                Err(()) => Next::Close,
            }
        };
        match next {
            Next::Keep => {}
            Next::WantWrite => {
                let fd = c.stream.as_raw_fd();
                let ev = EpollEvent::new(EventSet::OUT, token);
                if self.epoll.ctl(ControlOperation::Modify, fd, ev).is_err() {
                    self.close(token);
                }
            }
            Next::Close => self.close(token),
        }
    }
}

/// The parts of a request the answer depends on.
#[derive(Debug, PartialEq, Eq)]
enum Req {
    Get(String),
    OtherMethod,
    TooLarge,
    Bad,
}

/// Reads what the peer sent; `Some` once the request is complete (or cannot
/// become valid), `Err` when the connection should just be closed.
fn read_some(c: &mut Conn) -> Result<Option<Req>, ()> {
    let mut buf = [0u8; 2048];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => return Err(()),
            Ok(n) => {
                let Some(got) = buf.get(..n) else {
                    return Err(());
                };
                // Only the new bytes (and the 3 before them, where a terminator
                // may start) are searched: a peer sending a byte at a time costs
                // linear, not quadratic, work.
                let from = c.request.len().saturating_sub(3);
                c.request.extend_from_slice(got);
                let tail = c.request.get(from..).unwrap_or_default();
                if find(tail, b"\r\n\r\n")
                    .or_else(|| find(tail, b"\n\n"))
                    .is_some()
                {
                    if let Some(r) = parse(&c.request) {
                        return Ok(Some(r));
                    }
                }
                if c.request.len() > MAX_REQUEST {
                    return Ok(Some(Req::TooLarge));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
}

/// Parses a complete request head; `None` while the head is incomplete.
fn parse(buf: &[u8]) -> Option<Req> {
    let end = find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n"))?;
    let head = buf.get(..end)?;
    let line_end = find(head, b"\n").unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(head.get(..line_end)?) else {
        return Some(Req::Bad);
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Req::Bad);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') || method.is_empty() {
        return Some(Req::Bad);
    }
    if method != "GET" {
        return Some(Req::OtherMethod);
    }
    let path = target.split('?').next().unwrap_or(target);
    Some(Req::Get(path.to_string()))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The whole answer (head and body) to `req`.
fn respond(registry: &Registry, req: &Req) -> Vec<u8> {
    let plain = "text/plain; charset=utf-8";
    let (status, ctype, body, extra) = match req {
        Req::Get(p) if p == "/metrics" => match render(registry) {
            Ok(body) => ("200 OK", CONTENT_TYPE, body, ""),
            Err(_) => (
                "500 Internal Server Error",
                plain,
                "cannot encode the metrics\n".to_string(),
                "",
            ),
        },
        Req::Get(_) => (
            "404 Not Found",
            plain,
            "not found; metrics are at /metrics\n".to_string(),
            "",
        ),
        Req::OtherMethod => (
            "405 Method Not Allowed",
            plain,
            "only GET is allowed\n".to_string(),
            "Allow: GET\r\n",
        ),
        Req::TooLarge => (
            "431 Request Header Fields Too Large",
            plain,
            "request too large\n".to_string(),
            "",
        ),
        Req::Bad => ("400 Bad Request", plain, "bad request\n".to_string(), ""),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Writes what the socket takes of the answer.
fn write_some(c: &mut Conn) -> Next {
    let Some(answer) = &c.answer else {
        return Next::Close;
    };
    loop {
        let Some(rest) = answer.get(c.written..) else {
            return Next::Close;
        };
        if rest.is_empty() {
            return Next::Close;
        }
        match c.stream.write(rest) {
            Ok(0) => return Next::Close,
            Ok(n) => c.written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            parse(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Req::Get("/metrics".into()))
        );
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            Some(Req::Get("/metrics".into()))
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Req::OtherMethod)
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"\xff\xfe /x HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse(bad), Some(Req::Bad), "{bad:?}");
        }
    }

    #[test]
    fn answers_name_their_length() {
        let r = Registry::default();
        let a = String::from_utf8(respond(&r, &Req::Get("/nope".into()))).unwrap();
        assert!(a.starts_with("HTTP/1.1 404 "), "{a}");
        let (head, body) = a.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let a = String::from_utf8(respond(&r, &Req::OtherMethod)).unwrap();
        assert!(
            a.starts_with("HTTP/1.1 405 ") && a.contains("Allow: GET"),
            "{a}"
        );
    }
}
