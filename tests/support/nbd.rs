//! NBD servers for the tests of an NBD source, all in one place: qemu-nbd and
//! nbdkit run as child processes (killed on drop, restartable on the same
//! socket or port), and [`Scripted`], a server in a thread of the test that
//! negotiates correctly and then answers each request as the test says (a
//! broken or hostile server), built on the crate's own protocol constants.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost_clone::storage::nbd::proto;
use vhost_clone::storage::nbd::{NbdConfig, NbdDevice, NbdUri};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A unix socket.
    Unix(PathBuf),
    /// 127.0.0.1 and a port.
    Tcp(u16),
}

impl Addr {
    /// A port on 127.0.0.1 that was free a moment ago.
    pub fn free_tcp() -> Addr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Addr::Tcp(l.local_addr().unwrap().port())
    }

    /// The NBD URI of `export` at this address.
    pub fn uri(&self, export: &str) -> String {
        match self {
            Addr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Addr::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
        }
    }

    /// True when something accepts connections there.
    fn accepts(&self) -> bool {
        match self {
            Addr::Unix(p) => UnixStream::connect(p).is_ok(),
            Addr::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }
}

/// A server process (qemu-nbd or nbdkit, in the foreground); killed on drop.
pub struct Server {
    program: &'static str,
    args: Vec<String>,
    /// Where it listens.
    pub addr: Addr,
    /// The export name its URI names.
    pub export: String,
    child: Option<Child>,
    log: Option<std::fs::File>,
}

impl Server {
    /// `qemu-nbd -r -t -x EXPORT -f raw FILE` at `addr`, started.
    pub fn qemu_nbd(file: &Path, addr: Addr, export: &str) -> Server {
        let mut args: Vec<String> = ["-r", "-t", "-x", export, "-f", "raw"]
            .map(String::from)
            .to_vec();
        match &addr {
            Addr::Unix(p) => args.extend(["-k".into(), p.display().to_string()]),
            Addr::Tcp(port) => {
                args.extend(["-b", "127.0.0.1", "-p"].map(String::from));
                args.push(port.to_string());
            }
        }
        args.push(file.display().to_string());
        Server::started("qemu-nbd", args, addr, export)
    }

    /// `nbdkit -f -r ARGS...` (filters, plugin, parameters) at `addr`, started.
    /// nbdkit serves its export under any name; the URI names none.
    pub fn nbdkit(addr: Addr, plugin_args: &[&str]) -> Server {
        let mut args: Vec<String> = ["-f", "-r"].map(String::from).to_vec();
        match &addr {
            Addr::Unix(p) => args.extend(["-U".into(), p.display().to_string()]),
            Addr::Tcp(port) => {
                args.extend(["-i", "127.0.0.1", "-p"].map(String::from));
                args.push(port.to_string());
            }
        }
        args.extend(plugin_args.iter().map(|s| s.to_string()));
        Server::started("nbdkit", args, addr, "")
    }

    fn started(program: &'static str, args: Vec<String>, addr: Addr, export: &str) -> Server {
        let mut s = Server {
            program,
            args,
            addr,
            export: export.into(),
            child: None,
            log: None,
        };
        s.start();
        s
    }

    /// The URI of its export.
    pub fn uri(&self) -> String {
        self.addr.uri(&self.export)
    }

    /// Starts it (again) and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.program);
        if let Addr::Unix(p) = &self.addr {
            // A killed nbdkit leaves its socket behind and will not bind over it.
            let _ = std::fs::remove_file(p);
        }
        let log = tempfile::tempfile().unwrap();
        let child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log.try_clone().unwrap()))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.program));
        self.child = Some(child);
        self.log = Some(log);
        let t = Instant::now();
        while !self.addr.accepts() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let log = self.log_text();
                panic!("{} {:?} exited {st}: {log}", self.program, self.args);
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{} never listened",
                self.program
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills it (SIGKILL: no goodbye to its clients) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Replaces its arguments (for the next [`Server::start`]).
    pub fn set_args(&mut self, f: impl FnOnce(&mut Vec<String>)) {
        f(&mut self.args);
    }

    /// What it wrote to stderr.
    pub fn log_text(&mut self) -> String {
        use std::io::Seek;
        let mut s = String::new();
        if let Some(l) = self.log.as_mut() {
            l.rewind().unwrap();
            let _ = l.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Opens an NBD source with `timeout` (and the default connection count).
pub fn connect(uri: &str, timeout: Duration) -> NbdDevice {
    try_connect(uri, timeout).unwrap_or_else(|e| panic!("connect {uri}: {e:?}"))
}

/// Opens an NBD source, or its error.
pub fn try_connect(
    uri: &str,
    timeout: Duration,
) -> Result<NbdDevice, vhost_clone::storage::nbd::NbdError> {
    let mut cfg = NbdConfig::new(NbdUri::parse(uri).unwrap());
    cfg.timeout = timeout;
    NbdDevice::connect(cfg)
}

/// A sparse file of `size` bytes whose data is `extents` (`(offset, len)`,
/// filled with a pattern that differs at every 512-byte sector); returns its
/// content.
pub fn sparse_file(path: &Path, size: u64, extents: &[(u64, u64)]) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    for &(off, len) in extents {
        let d: Vec<u8> = (off..off + len)
            .map(|i| ((i / 512) as u8).wrapping_mul(31) ^ (i % 253) as u8 | 1)
            .collect();
        f.write_all_at(&d, off).unwrap();
        content[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    f.sync_all().unwrap();
    content
}

/// A transmission request as the scripted server received it.
#[derive(Debug, Clone, Copy)]
pub struct Req {
    /// Command (`proto::CMD_*`).
    pub cmd: u16,
    /// Cookie.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
}

/// What the scripted server does with a request on connection number `conn`
/// (0 for the first connection made): bytes to send, or `None` to close.
pub type Answer = dyn Fn(usize, &Req) -> Option<Vec<u8>> + Send + Sync;

/// How the scripted server negotiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// Structured replies, `base:allocation` as context [`CONTEXT`], the export.
    Full,
    /// No structured replies (hence no block status): simple replies only.
    Simple,
    /// Sends the first `n` bytes of its greeting, then closes.
    CloseAfter(usize),
    /// Accepts and says nothing until the client goes away.
    Silent,
    /// Full negotiation, then closes the connection at once.
    CloseAfterGo,
}

/// The metadata context id the scripted server gives `base:allocation`.
pub const CONTEXT: u32 = 7;

/// A scripted NBD server on a unix socket, serving `content` as export
/// `golden`; stopped on drop.
pub struct Scripted {
    /// Its socket.
    pub path: PathBuf,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Scripted {
    /// Listens at `path`, negotiating as `hello` says and answering requests
    /// with `answer`.
    pub fn start(
        path: &Path,
        size: u64,
        hello: Hello,
        answer: impl Fn(usize, &Req) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> Scripted {
        let l = UnixListener::bind(path).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let answer: Arc<Answer> = Arc::new(answer);
        let thread = {
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::spawn(move || {
                let mut workers = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let n = connections.fetch_add(1, Ordering::SeqCst);
                            let (stop, answer) = (stop.clone(), answer.clone());
                            workers.push(std::thread::spawn(move || {
                                serve_one(s, n, size, hello, &*answer, &stop)
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                for w in workers {
                    let _ = w.join();
                }
            })
        };
        Scripted {
            path: path.to_path_buf(),
            connections,
            stop,
            thread: Some(thread),
        }
    }

    /// The URI of its export.
    pub fn uri(&self) -> String {
        Addr::Unix(self.path.clone()).uri("golden")
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn option_reply(opt: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// One connection of the scripted server; returns when either side closes.
fn serve_one(
    mut s: UnixStream,
    conn: usize,
    size: u64,
    hello: Hello,
    answer: &Answer,
    stop: &AtomicBool,
) {
    s.set_nonblocking(false).unwrap();
    // Short reads so that a stop is seen; the loops below retry on timeout.
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut greeting = proto::NBD_MAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    match hello {
        Hello::CloseAfter(n) => {
            let _ = s.write_all(&greeting[..n.min(greeting.len())]);
            return;
        }
        Hello::Silent => {
            let mut b = [0u8; 64];
            while !stop.load(Ordering::SeqCst) {
                match s.read(&mut b) {
                    Ok(0) => return,
                    _ => continue,
                }
            }
            return;
        }
        _ => {}
    }
    if s.write_all(&greeting).is_err() {
        return;
    }
    let Some(_client_flags) = read_n(&mut s, 4, stop) else {
        return;
    };
    // Options until NBD_OPT_GO succeeds.
    loop {
        let Some(h) = read_n(&mut s, 16, stop) else {
            return;
        };
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let Some(data) = read_n(&mut s, len as usize, stop) else {
            return;
        };
        let reply = match opt {
            proto::OPT_STRUCTURED_REPLY if hello != Hello::Simple => {
                option_reply(opt, proto::REP_ACK, &[])
            }
            proto::OPT_SET_META_CONTEXT if hello != Hello::Simple => {
                let mut ctx = CONTEXT.to_be_bytes().to_vec();
                ctx.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                let mut r = option_reply(opt, proto::REP_META_CONTEXT, &ctx);
                r.extend(option_reply(opt, proto::REP_ACK, &[]));
                r
            }
            proto::OPT_GO => {
                let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                let name = &data[4..4 + n];
                if name != b"golden" {
                    option_reply(opt, proto::REP_ERR_UNKNOWN, b"unknown export")
                } else {
                    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&size.to_be_bytes());
                    // HAS_FLAGS | READ_ONLY.
                    info.extend_from_slice(&(proto::TFLAG_HAS_FLAGS | 2).to_be_bytes());
                    let mut r = option_reply(opt, proto::REP_INFO, &info);
                    r.extend(option_reply(opt, proto::REP_ACK, &[]));
                    if s.write_all(&r).is_err() {
                        return;
                    }
                    break;
                }
            }
            _ => option_reply(opt, proto::REP_ERR_UNSUP, &[]),
        };
        if s.write_all(&reply).is_err() {
            return;
        }
    }
    if hello == Hello::CloseAfterGo {
        return;
    }
    // Transmission.
    loop {
        let Some(r) = read_n(&mut s, proto::REQUEST_LEN, stop) else {
            return;
        };
        let req = Req {
            cmd: u16::from_be_bytes(r[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(r[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(r[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(r[24..28].try_into().unwrap()),
        };
        if req.cmd == proto::CMD_DISC {
            return;
        }
        match answer(conn, &req) {
            Some(bytes) => {
                if s.write_all(&bytes).is_err() {
                    return;
                }
            }
            None => return,
        }
    }
}

/// Reads exactly `n` bytes, or `None` when the peer closed or the server stops.
fn read_n(s: &mut UnixStream, n: usize, stop: &AtomicBool) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    let mut got = 0;
    while got < n {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match s.read(&mut b[got..]) {
            Ok(0) => return None,
            Ok(k) => got += k,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    Some(b)
}

/// A simple reply: header, then `data` (a successful read's bytes).
pub fn simple(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut v = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// A structured reply chunk.
pub fn chunk(cookie: u64, done: bool, kind: u16, payload: &[u8]) -> Vec<u8> {
    chunk_with_len(cookie, done, kind, payload.len() as u32, payload)
}

/// A structured reply chunk whose length field says `len` (whatever follows).
pub fn chunk_with_len(cookie: u64, done: bool, kind: u16, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    let flags = if done { proto::REPLY_FLAG_DONE } else { 0 };
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An `OFFSET_DATA` chunk of `data` at `offset`.
pub fn data_chunk(cookie: u64, done: bool, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(cookie, done, proto::REPLY_TYPE_OFFSET_DATA, &p)
}

/// A `BLOCK_STATUS` chunk for `context`: `(length, flags)` extents.
pub fn status_chunk(cookie: u64, done: bool, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = context.to_be_bytes().to_vec();
    for (l, f) in extents {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    chunk(cookie, done, proto::REPLY_TYPE_BLOCK_STATUS, &p)
}

/// The export the scripted servers serve: byte `i` is this.
pub fn scripted_byte(i: u64) -> u8 {
    (i / 4096) as u8 ^ (i % 251) as u8
}

/// `len` bytes of the scripted export at `offset`.
pub fn scripted_bytes(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(scripted_byte).collect()
}

/// A correct answer to `req`: with structured replies (`structured`), one
/// data chunk for a read and one all-data extent for block status.
pub fn good_answer(req: &Req, structured: bool) -> Vec<u8> {
    let data = scripted_bytes(req.offset, req.len as u64);
    match (req.cmd, structured) {
        (proto::CMD_READ, false) => simple(req.cookie, 0, &data),
        (proto::CMD_READ, true) => data_chunk(req.cookie, true, req.offset, &data),
        (_, _) => status_chunk(req.cookie, true, CONTEXT, &[(req.len, 0)]),
    }
}
