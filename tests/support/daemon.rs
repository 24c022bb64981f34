//! Shared helpers of the tests that run the `vhost-clone` binary: running a
//! command, a served daemon (killed on drop), and a libblkio client.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-clone");

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

    /// Spawns `cmd` (a `serve` command line) and waits for `sock`; panics with the
    /// daemon's stderr if it exits first. Its stderr goes to an anonymous file (a
    /// pipe nobody reads would fill up or break).
    pub fn spawn(mut cmd: Command, sock: &Path) -> Daemon {
        let mut log = tempfile::tempfile().unwrap();
        cmd.stdout(Stdio::null())
            .stderr(Stdio::from(log.try_clone().unwrap()));
        // Owned from here on, so that a failed wait below still kills it.
        let d = Daemon(cmd.spawn().unwrap());
        d.wait_for(sock, Some(&mut log))
    }

    /// Adopts a spawned `serve` (whose stderr the caller arranged) once `sock`
    /// exists; panics if it exits first or the socket takes over 20 s.
    pub fn adopt(child: Child, sock: &Path) -> Daemon {
        Daemon(child).wait_for(sock, None)
    }

    fn wait_for(mut self, sock: &Path, mut log: Option<&mut std::fs::File>) -> Daemon {
        let t = Instant::now();
        while !sock.exists() {
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

    /// SIGTERM, then waits (at most 20 s) for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: kill only sends a signal to our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "daemon ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
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
}

impl Client {
    /// Connects to a vhost-user-blk socket.
    pub fn connect(sock: &Path) -> Client {
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
        Client { _b: b, q, buf }
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is 1 MiB owned by the Blkio instance kept alive in self.
        unsafe { std::slice::from_raw_parts_mut(self.buf, 1 << 20) }
    }

    fn wait(&mut self) -> i32 {
        let mut c = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = Duration::from_secs(20);
        let n = self.q.do_io(&mut c, 1, Some(&mut timeout), None).unwrap();
        assert_eq!(n, 1, "request timed out");
        // SAFETY: do_io initialised the first completion.
        unsafe { c[0].assume_init_ref() }.ret
    }

    /// Writes `data` at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) -> i32 {
        self.mem()[..data.len()].copy_from_slice(data);
        self.q
            .write(off, self.buf, data.len(), 0, ReqFlags::empty());
        self.wait()
    }

    /// Reads `len` bytes at `off`.
    pub fn read(&mut self, off: u64, len: usize) -> (i32, Vec<u8>) {
        self.q.read(off, self.buf, len, 0, ReqFlags::empty());
        let r = self.wait();
        (r, self.mem()[..len].to_vec())
    }

    /// Flushes.
    pub fn flush(&mut self) -> i32 {
        self.q.flush(0, ReqFlags::empty());
        self.wait()
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
