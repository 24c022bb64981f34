//! One NBD connection in the transmission phase: requests are written by the
//! calling threads, replies are read by the connection's own thread and handed
//! to the request that waits for them.
//!
//! Invariants:
//! * A cookie is in `pending` from just before its request is written until its
//!   last reply chunk arrived or the connection died; every pending request is
//!   completed exactly once (answer, server error, or `Disconnected`).
//! * Any protocol violation (unknown cookie, bad chunk, chunk outside its
//!   request) ends the connection: the stream can no longer be trusted to be in
//!   step. The requests it held are completed with `Disconnected` and resent by
//!   their callers on another connection.
//! * The connection's sockets are closed by its own thread ([`Conn::close`],
//!   after [`Conn::fail_all`]), never by a thread that sent a request on it:
//!   those (the front, the hydrator) may hold the last reference to a dead
//!   connection, and their seccomp filters allow sending and `shutdown`, not
//!   what closing may take (std's debug builds check a descriptor with
//!   `fcntl(F_GETFD)` before closing it).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::handshake::Negotiated;
use super::lock;
use super::proto::{self, ChunkError, Coverage};

/// A connected socket.
#[derive(Debug)]
pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub(super) fn shutdown(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }

    pub(super) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(super) fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a part of a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PartKind {
    Read,
    Status,
}

/// One NBD request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Part {
    pub kind: PartKind,
    pub offset: u64,
    pub len: u32,
}

/// A successful answer.
#[derive(Debug)]
pub(super) enum PartReply {
    /// The bytes of a read (holes as zeroes).
    Data(Vec<u8>),
    /// Block status runs `(start, end, is_data)` covering a prefix of the request.
    Extents(Vec<(u64, u64, bool)>),
}

/// A failed answer.
#[derive(Debug)]
pub(super) enum PartError {
    /// The connection died first; the request may be sent again.
    Disconnected(String),
    /// The server answered with an error.
    Server(ChunkError),
}

impl PartError {
    pub(super) fn into_io(self) -> io::Error {
        match self {
            PartError::Disconnected(why) => io::Error::new(io::ErrorKind::ConnectionAborted, why),
            PartError::Server(e) => {
                let kind = io::Error::from_raw_os_error(e.errno).kind();
                io::Error::new(kind, e.to_string())
            }
        }
    }
}

/// Results of one caller's parts.
#[derive(Debug)]
pub(super) struct WaitState {
    pub results: Vec<Option<std::result::Result<PartReply, PartError>>>,
}

/// Where a caller waits for its parts.
#[derive(Debug)]
pub(super) struct Waiter {
    state: Mutex<WaitState>,
    cv: Condvar,
}

impl Waiter {
    pub(super) fn new(n: usize) -> Waiter {
        Waiter {
            state: Mutex::new(WaitState {
                results: (0..n).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, WaitState> {
        lock(&self.state)
    }

    pub(super) fn wait<'a>(
        &self,
        g: MutexGuard<'a, WaitState>,
        d: Duration,
    ) -> MutexGuard<'a, WaitState> {
        self.cv
            .wait_timeout(g, d)
            .unwrap_or_else(|p| p.into_inner())
            .0
    }

    fn complete(&self, i: usize, r: std::result::Result<PartReply, PartError>) {
        let mut st = lock(&self.state);
        if let Some(slot) = st.results.get_mut(i) {
            *slot = Some(r);
        }
        self.cv.notify_all();
    }
}

/// A request waiting for its reply, and what arrived of it so far.
#[derive(Debug)]
struct Pending {
    part: Part,
    waiter: Arc<Waiter>,
    index: usize,
    buf: Option<Vec<u8>>,
    coverage: Coverage,
    extents: Option<Vec<(u64, u64, bool)>>,
    error: Option<ChunkError>,
}

impl Pending {
    fn finish(self, r: std::result::Result<PartReply, PartError>) {
        self.waiter.complete(self.index, r);
    }
}

#[derive(Debug, Default)]
struct Pendings {
    /// Set when the connection died: why.
    dead: Option<String>,
    map: HashMap<u64, Pending>,
}

/// One connection.
#[derive(Debug)]
pub(super) struct Conn {
    slot: usize,
    /// The socket requests are written to; `None` once closed.
    writer: Mutex<Option<Stream>>,
    /// A second handle to shut the socket down without the writer's lock;
    /// `None` once closed.
    control: Mutex<Option<Stream>>,
    pending: Mutex<Pendings>,
    neg: Negotiated,
    /// Why the connection was ended on purpose (reported instead of the EOF).
    killed: Mutex<Option<String>>,
}

type Step = std::result::Result<(), String>;

/// Why a connection is ended when a request on it got no answer in time.
pub(super) const NO_ANSWER: &str = "a request got no answer within the timeout";

fn proto_err(e: proto::ProtocolError) -> String {
    format!("protocol error from the server: {e}")
}

impl Conn {
    /// Wraps a negotiated stream; returns the connection and the stream its
    /// reply reader reads.
    pub(super) fn new(slot: usize, stream: Stream, neg: Negotiated) -> io::Result<(Conn, Stream)> {
        let reader = stream.try_clone()?;
        let control = stream.try_clone()?;
        Ok((
            Conn {
                slot,
                writer: Mutex::new(Some(stream)),
                control: Mutex::new(Some(control)),
                pending: Mutex::new(Pendings::default()),
                neg,
                killed: Mutex::new(None),
            },
            reader,
        ))
    }

    /// True when this connection negotiated `base:allocation`.
    pub(super) fn has_block_status(&self) -> bool {
        self.neg.base_allocation.is_some()
    }

    /// Sends `part` under `cookie`; its answer goes to `waiter`'s slot `index`.
    /// Never fails: a dead connection completes the slot with `Disconnected`.
    pub(super) fn send(&self, cookie: u64, part: &Part, waiter: &Arc<Waiter>, index: usize) {
        if part.kind == PartKind::Status && self.neg.base_allocation.is_none() {
            // Negotiated per connection: this one has no block status.
            waiter.complete(
                index,
                Err(PartError::Server(ChunkError {
                    errno: libc::EOPNOTSUPP,
                    message: "no base:allocation on this connection".into(),
                })),
            );
            return;
        }
        {
            let mut p = lock(&self.pending);
            if let Some(why) = &p.dead {
                waiter.complete(index, Err(PartError::Disconnected(why.clone())));
                return;
            }
            p.map.insert(
                cookie,
                Pending {
                    part: *part,
                    waiter: waiter.clone(),
                    index,
                    buf: None,
                    coverage: Coverage::default(),
                    extents: None,
                    error: None,
                },
            );
        }
        let cmd = match part.kind {
            PartKind::Read => proto::CMD_READ,
            PartKind::Status => proto::CMD_BLOCK_STATUS,
        };
        let req = proto::encode_request(cmd, cookie, part.offset, part.len);
        // Closed: `fail_all` ran before, and completed this request (it was
        // pending then) or `dead` sent it back above.
        let r = match lock(&self.writer).as_mut() {
            Some(w) => w.write_all(&req),
            None => Ok(()),
        };
        if let Err(e) = r {
            // The reader sees the shutdown and fails everything pending, ours too.
            // A broken pipe is the server having closed the connection: say
            // that, as the reader would a moment later.
            match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    self.kill("the server closed the connection")
                }
                _ => self.kill(&format!("sending a request failed: {e}")),
            }
        }
    }

    /// Ends the connection; its reader stops and its requests are resent.
    pub(super) fn kill(&self, why: &str) {
        lock(&self.killed).get_or_insert_with(|| why.to_string());
        self.shutdown();
    }

    fn shutdown(&self) {
        if let Some(c) = lock(&self.control).as_ref() {
            let _ = c.shutdown();
        }
    }

    /// True when the connection was ended because a request on it timed out.
    pub(super) fn timed_out(&self) -> bool {
        lock(&self.killed).as_deref() == Some(NO_ANSWER)
    }

    /// Closes the sockets; for the connection's own thread, once its reader
    /// ended and [`Conn::fail_all`] ran.
    pub(super) fn close(&self) {
        drop(lock(&self.writer).take());
        drop(lock(&self.control).take());
    }

    /// Says goodbye (`NBD_CMD_DISC`, best effort) and ends the connection.
    pub(super) fn disconnect(&self) {
        if let Ok(mut w) = self.writer.try_lock() {
            if let Some(w) = w.as_mut() {
                let _ = w.write_all(&proto::encode_request(proto::CMD_DISC, 0, 0, 0));
            }
        }
        self.kill("the source was closed");
    }

    /// Completes every pending request with `Disconnected(why)`; later sends
    /// complete at once.
    pub(super) fn fail_all(&self, why: &str) {
        let drained: Vec<Pending> = {
            let mut p = lock(&self.pending);
            p.dead = Some(why.to_string());
            p.map.drain().map(|(_, v)| v).collect()
        };
        for pend in drained {
            pend.finish(Err(PartError::Disconnected(why.to_string())));
        }
    }

    /// Reads replies until the connection fails; returns why it ended.
    pub(super) fn read_replies(&self, mut r: Stream) -> String {
        loop {
            if let Err(why) = self.read_one(&mut r) {
                // The first reason stands: a kill before this error caused it
                // (the socket was shut down), one after it is its consequence
                // (a request sent on the dying connection could not be written).
                let why = lock(&self.killed).get_or_insert(why).clone();
                self.shutdown();
                return why;
            }
        }
    }

    fn take(&self, cookie: u64) -> std::result::Result<Pending, String> {
        lock(&self.pending).map.remove(&cookie).ok_or_else(|| {
            proto_err(proto::ProtocolError(format!(
                "a reply for cookie {cookie}, which no request of connection {} has",
                self.slot
            )))
        })
    }

    fn read_one(&self, r: &mut Stream) -> Step {
        let closed = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                "the server closed the connection".to_string()
            } else {
                format!("reading from the server failed: {e}")
            }
        };
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic).map_err(closed)?;
        let magic = u32::from_be_bytes(magic);
        let n = proto::rest_len(magic).ok_or_else(|| {
            proto_err(proto::ProtocolError(format!(
                "reply with a bad magic {magic:#010x}"
            )))
        })?;
        let mut rest = [0u8; proto::STRUCTURED_REST_LEN];
        r.read_exact(&mut rest[..n]).map_err(closed)?;
        let h =
            proto::parse_reply_header(magic, &rest[..n], self.neg.structured).map_err(proto_err)?;
        let mut pend = self.take(h.cookie())?;
        match self.apply(r, h, &mut pend) {
            Ok(Some(result)) => {
                pend.finish(result);
                Ok(())
            }
            Ok(None) => {
                let mut p = lock(&self.pending);
                if let Some(why) = p.dead.clone() {
                    drop(p);
                    pend.finish(Err(PartError::Disconnected(why)));
                } else {
                    p.map.insert(h.cookie(), pend);
                }
                Ok(())
            }
            Err(why) => {
                // Recorded before the request is woken: it may be sent again
                // on this connection before the reader ends it, and fail.
                lock(&self.killed).get_or_insert_with(|| why.clone());
                pend.finish(Err(PartError::Disconnected(why.clone())));
                Err(why)
            }
        }
    }

    /// Applies one reply (or chunk) to its request: `Some` when the request is
    /// complete, `None` when more chunks follow.
    #[allow(clippy::type_complexity)]
    fn apply(
        &self,
        r: &mut Stream,
        h: proto::ReplyHeader,
        pend: &mut Pending,
    ) -> std::result::Result<Option<std::result::Result<PartReply, PartError>>, String> {
        let io = |e: io::Error| format!("reading from the server failed: {e}");
        let bad = |m: &str| proto_err(proto::ProtocolError(m.to_string()));
        let part = pend.part;
        match h {
            proto::ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    return Ok(Some(Err(PartError::Server(ChunkError {
                        errno: proto::errno_of(error),
                        message: String::new(),
                    }))));
                }
                if part.kind != PartKind::Read {
                    return Err(bad("a simple reply to block status"));
                }
                let mut buf = vec![0u8; part.len as usize];
                r.read_exact(&mut buf).map_err(io)?;
                Ok(Some(Ok(PartReply::Data(buf))))
            }
            proto::ReplyHeader::Chunk {
                flags, kind, len, ..
            } => {
                match kind {
                    proto::REPLY_TYPE_NONE => {
                        if len != 0 || flags & proto::REPLY_FLAG_DONE == 0 {
                            return Err(bad("a NONE chunk with a payload or without DONE"));
                        }
                    }
                    proto::REPLY_TYPE_OFFSET_DATA if part.kind == PartKind::Read => {
                        if len < 9 {
                            return Err(bad("a data chunk without data"));
                        }
                        let mut off = [0u8; 8];
                        r.read_exact(&mut off).map_err(io)?;
                        let dlen = (len - 8) as u64;
                        let start = pend
                            .coverage
                            .add(part.offset, part.len, u64::from_be_bytes(off), dlen)
                            .map_err(proto_err)?;
                        let buf = pend.buf.get_or_insert_with(|| vec![0u8; part.len as usize]);
                        r.read_exact(&mut buf[start..start + dlen as usize])
                            .map_err(io)?;
                    }
                    proto::REPLY_TYPE_OFFSET_HOLE if part.kind == PartKind::Read => {
                        if len != 12 {
                            return Err(bad("a hole chunk of the wrong length"));
                        }
                        let mut p = [0u8; 12];
                        r.read_exact(&mut p).map_err(io)?;
                        let (off, hlen) = proto::parse_hole(&p).map_err(proto_err)?;
                        pend.coverage
                            .add(part.offset, part.len, off, hlen)
                            .map_err(proto_err)?;
                        // The buffer starts zeroed and chunks never overlap.
                        pend.buf.get_or_insert_with(|| vec![0u8; part.len as usize]);
                    }
                    proto::REPLY_TYPE_BLOCK_STATUS if part.kind == PartKind::Status => {
                        let Some(ctx) = self.neg.base_allocation else {
                            return Err(bad("block status without a negotiated context"));
                        };
                        if len > proto::MAX_STATUS_PAYLOAD {
                            return Err(bad("a block status chunk that is too long"));
                        }
                        if pend.extents.is_some() {
                            return Err(bad("two block status chunks for one context"));
                        }
                        let mut p = vec![0u8; len as usize];
                        r.read_exact(&mut p).map_err(io)?;
                        pend.extents = Some(
                            proto::parse_block_status(&p, ctx, part.offset, part.len)
                                .map_err(proto_err)?,
                        );
                    }
                    k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                        if len as usize > 6 + proto::MAX_MESSAGE + 8 {
                            return Err(bad("an error chunk that is too long"));
                        }
                        let mut p = vec![0u8; len as usize];
                        r.read_exact(&mut p).map_err(io)?;
                        let e = proto::parse_error_chunk(k, &p, part.offset, part.len)
                            .map_err(proto_err)?;
                        pend.error.get_or_insert(e);
                    }
                    k => {
                        return Err(bad(&format!(
                            "a chunk of type {k} that does not fit a {:?} request",
                            part.kind
                        )))
                    }
                }
                if flags & proto::REPLY_FLAG_DONE == 0 {
                    return Ok(None);
                }
                if let Some(e) = pend.error.take() {
                    return Ok(Some(Err(PartError::Server(e))));
                }
                match part.kind {
                    PartKind::Read => {
                        if !pend.coverage.complete(part.len) {
                            return Err(bad("a read reply that does not cover its request"));
                        }
                        let buf = pend
                            .buf
                            .take()
                            .unwrap_or_else(|| vec![0u8; part.len as usize]);
                        Ok(Some(Ok(PartReply::Data(buf))))
                    }
                    PartKind::Status => match pend.extents.take() {
                        Some(x) if !x.is_empty() => Ok(Some(Ok(PartReply::Extents(x)))),
                        _ => Err(bad("a block status reply without extents")),
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CTX: u32 = 5;
    const OFF: u64 = 1 << 20;
    const LEN: u32 = 4096;
    const COOKIE: u64 = 77;

    fn negotiated() -> Negotiated {
        Negotiated {
            info: proto::ExportInfo {
                size: 1 << 30,
                flags: 0,
                min_block: 1,
                pref_block: 4096,
                max_block: 1 << 20,
            },
            structured: true,
            base_allocation: Some(CTX),
        }
    }

    /// One chunk a hostile server may send.
    #[derive(Debug, Clone)]
    struct Chunk {
        magic: u32,
        flags: u16,
        kind: u16,
        cookie: u64,
        /// Length field as sent (may disagree with the payload).
        len: u32,
        payload: Vec<u8>,
    }

    fn encode(c: &Chunk) -> Vec<u8> {
        let mut v = c.magic.to_be_bytes().to_vec();
        if c.magic == proto::SIMPLE_REPLY_MAGIC {
            v.extend_from_slice(&(c.len % 3).to_be_bytes());
            v.extend_from_slice(&c.cookie.to_be_bytes());
        } else {
            v.extend_from_slice(&c.flags.to_be_bytes());
            v.extend_from_slice(&c.kind.to_be_bytes());
            v.extend_from_slice(&c.cookie.to_be_bytes());
            v.extend_from_slice(&c.len.to_be_bytes());
        }
        v.extend_from_slice(&c.payload);
        v
    }

    fn chunk() -> impl Strategy<Value = Chunk> {
        let magic = prop_oneof![
            8 => Just(proto::STRUCTURED_REPLY_MAGIC),
            1 => Just(proto::SIMPLE_REPLY_MAGIC),
            1 => any::<u32>(),
        ];
        let kind = prop_oneof![
            Just(proto::REPLY_TYPE_NONE),
            Just(proto::REPLY_TYPE_OFFSET_DATA),
            Just(proto::REPLY_TYPE_OFFSET_HOLE),
            Just(proto::REPLY_TYPE_BLOCK_STATUS),
            Just(proto::REPLY_TYPE_ERROR),
            Just(proto::REPLY_TYPE_ERROR_OFFSET),
            any::<u16>(),
        ];
        let cookie = prop_oneof![9 => Just(COOKIE), 1 => any::<u64>()];
        let offset = prop_oneof![
            Just(OFF),
            (0u64..LEN as u64).prop_map(|d| OFF + d),
            any::<u64>()
        ];
        (
            magic,
            0u16..4,
            kind,
            cookie,
            offset,
            0usize..LEN as usize + 64,
            any::<u8>(),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(magic, flags, kind, cookie, off, n, fill, lie)| {
                let mut payload = Vec::new();
                match kind {
                    proto::REPLY_TYPE_OFFSET_DATA => {
                        payload.extend_from_slice(&off.to_be_bytes());
                        payload.resize(8 + n, fill);
                    }
                    proto::REPLY_TYPE_OFFSET_HOLE => {
                        payload.extend_from_slice(&off.to_be_bytes());
                        payload.extend_from_slice(&(n as u32).to_be_bytes());
                    }
                    proto::REPLY_TYPE_BLOCK_STATUS => {
                        payload.extend_from_slice(&CTX.to_be_bytes());
                        for i in 0..(n % 5) {
                            payload.extend_from_slice(&(n as u32 * i as u32).to_be_bytes());
                            payload.extend_from_slice(&(fill as u32 & 3).to_be_bytes());
                        }
                    }
                    _ => payload.resize(n % 40, fill),
                }
                let len = if lie {
                    u32::MAX - n as u32
                } else {
                    payload.len() as u32
                };
                Chunk {
                    magic,
                    flags,
                    kind,
                    cookie,
                    len,
                    payload,
                }
            })
    }

    /// Runs one request against `server` bytes; returns its result.
    fn against(kind: PartKind, server: &[u8]) -> std::result::Result<PartReply, PartError> {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (conn, reader) = Conn::new(0, Stream::Unix(ours), negotiated()).unwrap();
        let waiter = Arc::new(Waiter::new(1));
        let part = Part {
            kind,
            offset: OFF,
            len: LEN,
        };
        conn.send(COOKIE, &part, &waiter, 0);
        let mut theirs = theirs;
        let mut req = [0u8; proto::REQUEST_LEN];
        theirs.read_exact(&mut req).unwrap();
        // The server's bytes, then EOF. A writer thread: the bytes may exceed
        // the socket buffer.
        let bytes = server.to_vec();
        let w = std::thread::spawn(move || {
            let _ = theirs.write_all(&bytes);
        });
        let why = conn.read_replies(reader);
        conn.fail_all(&why);
        w.join().unwrap();
        let mut st = waiter.lock();
        st.results[0].take().expect("every request is completed")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1500, .. ProptestConfig::default() })]
        /// A hostile server's chunks never panic the reader, never leave a
        /// request without an answer, and a successful read always has
        /// exactly the requested length.
        #[test]
        fn hostile_replies_are_answered_or_refused(chunks in proptest::collection::vec(chunk(), 1..6), status in any::<bool>()) {
            let bytes: Vec<u8> = chunks.iter().flat_map(encode).collect();
            let kind = if status { PartKind::Status } else { PartKind::Read };
            match against(kind, &bytes) {
                Ok(PartReply::Data(d)) => {
                    prop_assert!(!status);
                    prop_assert_eq!(d.len(), LEN as usize);
                }
                Ok(PartReply::Extents(x)) => {
                    prop_assert!(status);
                    let mut pos = OFF;
                    for (a, b, _) in x {
                        prop_assert_eq!(a, pos);
                        prop_assert!(b > a && b <= OFF + LEN as u64);
                        pos = b;
                    }
                }
                Err(_) => {}
            }
        }
    }

    fn data(off: u64, bytes: &[u8], done: bool) -> Vec<u8> {
        let mut payload = off.to_be_bytes().to_vec();
        payload.extend_from_slice(bytes);
        encode(&Chunk {
            magic: proto::STRUCTURED_REPLY_MAGIC,
            flags: if done { proto::REPLY_FLAG_DONE } else { 0 },
            kind: proto::REPLY_TYPE_OFFSET_DATA,
            cookie: COOKIE,
            len: payload.len() as u32,
            payload,
        })
    }

    #[test]
    fn chunks_in_any_order_make_the_read_and_bad_ones_end_the_connection() {
        let half = LEN as usize / 2;
        let mut v = data(OFF + half as u64, &vec![2u8; half], false);
        v.extend(data(OFF, &vec![1u8; half], true));
        match against(PartKind::Read, &v) {
            Ok(PartReply::Data(d)) => {
                assert!(d[..half].iter().all(|&b| b == 1) && d[half..].iter().all(|&b| b == 2))
            }
            other => panic!("{other:?}"),
        }
        // Overlap, a gap at DONE, data outside, a foreign cookie.
        let mut overlap = data(OFF, &vec![1u8; half + 1], false);
        overlap.extend(data(OFF + half as u64, &vec![2u8; half], true));
        let gap = data(OFF, &vec![1u8; half], true);
        let outside = data(OFF + LEN as u64, &[1u8; 16], true);
        let mut foreign = data(OFF, &vec![1u8; LEN as usize], true);
        foreign[8..16].copy_from_slice(&(COOKIE + 1).to_be_bytes());
        for (name, bytes) in [
            ("overlap", overlap),
            ("gap", gap),
            ("outside", outside),
            ("foreign", foreign),
        ] {
            match against(PartKind::Read, &bytes) {
                Err(PartError::Disconnected(why)) => {
                    assert!(why.contains("protocol error"), "{name}: {why}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
