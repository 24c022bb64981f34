//! Shared helpers of the tests that run the `vhost-clone` binary: running a
//! command, a served daemon (killed on drop), and a libblkio client.
//!
//! `VHOST_CLONE_DAEMON_LOG=1` sends the served daemons' stderr to the test's
//! (with `--nocapture`) instead of a file shown only if one exits early.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-clone");

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `vhost-clone ARGS...` to completion.
pub fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run vhost-clone")
}

/// Its stdout and stderr, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A clone's files in a temporary directory: a source of `size` bytes made
/// by `byte(offset)`, the default names of what `serve` creates beside the
/// destination, and a private (0700) runtime directory for the live map.
pub struct CloneFiles {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub dst: PathBuf,
    pub sock: PathBuf,
    pub ctl: PathBuf,
    pub run: PathBuf,
    pub src_data: Vec<u8>,
}

/// Makes a [`CloneFiles`].
pub fn clone_files(size: u64, byte: impl Fn(u64) -> u8) -> CloneFiles {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("golden.img");
    let src_data: Vec<u8> = (0..size).map(byte).collect();
    std::fs::write(&src, &src_data).unwrap();
    let run = dir.path().join("run");
    std::fs::DirBuilder::new().mode(0o700).create(&run).unwrap();
    CloneFiles {
        dst: dir.path().join("clone.img"),
        sock: dir.path().join("clone.img.sock"),
        ctl: dir.path().join("clone.img.sock.ctl"),
        src,
        run,
        src_data,
        dir,
    }
}

/// Runs `vhost-clone ARGS...`, which must be refused within 15 s (a `serve` that is
/// still running then was accepted: it is killed and the test fails). Returns its
/// exit code and its output.
pub fn run_refused(args: &[&str]) -> (i32, String) {
    let t = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "{args:?} was accepted (still running after 15 s): {}",
                text(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success(), "{args:?} was accepted");
    (o.status.code().unwrap_or(-1), text(&o))
}

/// `vhost-clone status --json` of the daemon behind `ctl`.
pub fn status_json(ctl: &Path) -> serde_json::Value {
    let o = run(&[
        "status",
        "--json",
        "--control-socket",
        ctl.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A running `vhost-clone serve`; killed on drop.
pub struct Daemon(pub Child);

impl Daemon {
    /// `vhost-clone serve ARGS...`, once `sock` exists.
    pub fn start(args: &[&str], sock: &Path) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").args(args);
        Self::spawn(cmd, sock)
    }

    /// [`Daemon::start`] on the files of a daemon that was killed: waits until
    /// a new socket replaces the one it left behind at `sock`.
    pub fn restart(args: &[&str], sock: &Path) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").args(args);
        Self::spawn_over(cmd, sock, identity(sock))
    }

    /// Spawns `cmd` (a `serve` command line) and waits for `sock`; panics with the
    /// daemon's stderr if it exits first. Its stderr goes to an anonymous file (a
    /// pipe nobody reads would fill up or break), or to the test's with
    /// `VHOST_CLONE_DAEMON_LOG` set.
    pub fn spawn(cmd: Command, sock: &Path) -> Daemon {
        Self::spawn_over(cmd, sock, None)
    }

    /// [`Daemon::spawn`], waiting for a socket other than `stale`.
    fn spawn_over(mut cmd: Command, sock: &Path, stale: Option<Identity>) -> Daemon {
        let mut log = None;
        if std::env::var_os("VHOST_CLONE_DAEMON_LOG").is_some() {
            cmd.stderr(Stdio::inherit());
        } else {
            let f = tempfile::tempfile().unwrap();
            cmd.stderr(Stdio::from(f.try_clone().unwrap()));
            log = Some(f);
        }
        cmd.stdout(Stdio::null());
        // Owned from here on, so that a failed wait below still kills it.
        let d = Daemon(cmd.spawn().unwrap());
        d.wait_for(sock, stale, log.as_mut())
    }

    /// Adopts a spawned `serve` (whose stderr the caller arranged) once `sock`
    /// exists; panics if it exits first or the socket takes over 20 s.
    pub fn adopt(child: Child, sock: &Path) -> Daemon {
        Daemon(child).wait_for(sock, None, None)
    }

    fn wait_for(
        mut self,
        sock: &Path,
        stale: Option<Identity>,
        mut log: Option<&mut std::fs::File>,
    ) -> Daemon {
        let t = Instant::now();
        while !sock.exists() || (stale.is_some() && identity(sock) == stale) {
            if let Some(st) = self.0.try_wait().unwrap() {
                use std::io::{Read, Seek};
                let mut err = String::new();
                if let Some(log) = log.as_mut() {
                    log.rewind().unwrap();
                    log.read_to_string(&mut err).unwrap();
                }
                panic!("daemon exited {st:?}: {err}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then waits (at most 30 s) for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: kill only sends a signal to our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.wait()
    }

    /// Waits (at most 30 s) for the daemon to exit, e.g. after a signal sent
    /// some other way; its exit status.
    pub fn wait(&mut self) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "daemon did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// What tells one socket file from the next at the same path: inode and ctime.
type Identity = (u64, i64, i64);

fn identity(p: &Path) -> Option<Identity> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A libblkio connection with one queue and one 1 MiB buffer. Requests return
/// libblkio's result (0 or a negative errno).
pub struct Client {
    _b: Blkio,
    q: Blkioq,
    buf: *mut u8,
    signalled: Option<&'static AtomicBool>,
}

impl Client {
    /// Connects to a vhost-user-blk socket.
    pub fn connect(sock: &Path) -> Client {
        Self::open(sock, None)
    }

    /// Connects to a daemon that the test will signal, setting `signalled`
    /// when it does: from then on a request with no completion (within 0.5 s)
    /// is one the daemon never answered, and `try_write` and `try_flush`
    /// return `None` for it.
    pub fn connect_watching(sock: &Path, signalled: &'static AtomicBool) -> Client {
        Self::open(sock, Some(signalled))
    }

    fn open(sock: &Path, signalled: Option<&'static AtomicBool>) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", 1).unwrap();
        let mut started = b.start().unwrap();
        let q = started.queues.remove(0);
        let region = b.alloc_mem_region(1 << 20).unwrap();
        b.map_mem_region(&region).unwrap();
        let buf = region.addr as *mut u8;
        drop(started);
        Client {
            _b: b,
            q,
            buf,
            signalled,
        }
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is 1 MiB owned by the Blkio instance kept alive in self.
        unsafe { std::slice::from_raw_parts_mut(self.buf, 1 << 20) }
    }

    fn signalled(&self) -> bool {
        self.signalled.is_some_and(|s| s.load(Ordering::SeqCst))
    }

    /// Waits (at most 30 s) for the one request in flight: `Some(ret)`, or
    /// `None` once the daemon was signalled and no completion came.
    fn complete(&mut self) -> Option<i32> {
        let t0 = Instant::now();
        let mut signalled_at: Option<Instant> = None;
        loop {
            let mut c = [const { MaybeUninit::<Completion>::uninit() }; 1];
            let mut timeout = Duration::from_millis(100);
            match self.q.do_io(&mut c, 1, Some(&mut timeout), None) {
                // SAFETY: do_io initialised the first completion.
                Ok(1) => return Some(unsafe { c[0].assume_init_ref() }.ret),
                Ok(_) => {}
                // do_io reports its own timeout as an error: keep waiting,
                // unless the daemon was signalled (then it may be gone).
                Err(e) => {
                    if self.signalled() {
                        return None;
                    }
                    if e.errno().raw_os_error() != libc::ETIME {
                        assert!(self.signalled.is_some(), "do_io failed: {e}");
                        eprintln!("do_io failed with no signal sent: {e}");
                        return None;
                    }
                }
            }
            if self.signalled() {
                let at = *signalled_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_millis(500) {
                    return None;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "request hung");
        }
    }

    fn wait(&mut self) -> i32 {
        self.complete().expect("no completion")
    }

    /// Writes `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) -> i32 {
        self.try_write(off, data).expect("no completion")
    }

    /// Writes `data` at `off`; `None` if the daemon was signalled and did not
    /// complete it (see [`Client::connect_watching`]).
    pub fn try_write(&mut self, off: u64, data: &[u8]) -> Option<i32> {
        self.mem()[..data.len()].copy_from_slice(data);
        self.q
            .write(off, self.buf, data.len(), 0, ReqFlags::empty());
        self.complete()
    }

    /// Reads `len` bytes at `off`.
    pub fn read(&mut self, off: u64, len: usize) -> (i32, Vec<u8>) {
        self.q.read(off, self.buf, len, 0, ReqFlags::empty());
        let r = self.wait();
        (r, self.mem()[..len].to_vec())
    }

    /// Flushes.
    pub fn flush(&mut self) -> i32 {
        self.try_flush().expect("no completion")
    }

    /// Flushes; `None` as for [`Client::try_write`].
    pub fn try_flush(&mut self) -> Option<i32> {
        self.q.flush(0, ReqFlags::empty());
        self.complete()
    }

    /// Discards `len` bytes at `off`.
    pub fn discard(&mut self, off: u64, len: u64) -> i32 {
        self.q.discard(off, len, 0, ReqFlags::empty());
        self.wait()
    }

    /// Writes zeroes over `len` bytes at `off`.
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> i32 {
        self.q.write_zeroes(off, len, 0, ReqFlags::empty());
        self.wait()
    }
}

/// Each thread of process `pid`: its name and the `Seccomp` mode and
/// `Seccomp_filters` count of /proc/PID/task/TID/status. Threads that end while
/// being read are skipped.
pub fn seccomp_of_tasks(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(u32::MAX),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    out
}
