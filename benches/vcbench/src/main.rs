// SPDX-License-Identifier: Apache-2.0

//! vcbench: host-side benchmark of vhost-clone against qemu-storage-daemon (issue 8).
//!
//! The tool is a vhost-user-blk frontend with no guest (libblkio's `blkio` crate,
//! driver `virtio-blk-vhost-user`): one thread per queue keeps `depth` requests in
//! flight. It creates the images itself, starts our daemon and QSD (aio=threads and
//! aio=io_uring) on the same files, and alternates them case by case, round by round,
//! so that the noise of a shared machine hits all of them alike. Ratios are ours
//! divided by the better QSD of the same round.
//!
//! With `--nbd-source unix|tcp` the clone cases read their source through an NBD
//! server the tool starts (qemu-nbd on the source image, issue 14): ours opens the
//! export with its own NBD client, QSD's qcow2 overlay has an `nbd` node as backing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use clap::Parser;
use serde::Serialize;

/// Host-side benchmark: vhost-clone vs qemu-storage-daemon over vhost-user-blk.
#[derive(Parser, Debug, Clone)]
#[command(name = "vcbench")]
struct Args {
    /// Directory for the images. Default: a fresh directory in /dev/shm (page-cache
    /// path). A directory on a real disk switches to O_DIRECT (ours --direct, QSD
    /// cache.direct=on) unless --no-direct.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Do not use O_DIRECT even with --dir.
    #[arg(long)]
    no_direct: bool,
    /// Image size in MiB [default: 1024, --quick: 256].
    #[arg(long)]
    size_mib: Option<u64>,
    /// Alternating rounds [default: 3, --quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per measurement [default: 3, --quick: 1].
    #[arg(long)]
    seconds: Option<f64>,
    /// Queues for the multi-queue cases (QD1 uses one queue).
    #[arg(long, default_value_t = 2)]
    queues: usize,
    /// Requests in flight per queue for the QD32 cases (128k sequential uses depth/4).
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// Region size of our clone = cluster size of QSD's qcow2 overlay.
    #[arg(long, default_value_t = 65536)]
    region_size: u64,
    /// The vhost-clone binary [default: target/release/vhost-clone of the main crate].
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// The qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// Only these cases (comma separated; see --list).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Only these backends (ours, qsd-threads, qsd-uring).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Smoke run: 256 MiB, 1 round, 1 s.
    #[arg(long)]
    quick: bool,
    /// List the cases and exit.
    #[arg(long)]
    list: bool,
    /// Write the JSON summary to this file (it is also printed after the tables).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG bar chart of the ratios to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Skip the 1 TiB memory / start-up measurement.
    #[arg(long)]
    no_memory: bool,
    /// Only the 1 TiB memory / start-up measurement.
    #[arg(long)]
    memory_only: bool,
    /// Keep the images afterwards.
    #[arg(long)]
    keep: bool,
    /// An earlier vhost-clone binary, run as backend `base` in the same rounds (a
    /// before/after of a change in one run; implies adding `base` to the backends).
    #[arg(long)]
    base_daemon: Option<PathBuf>,
    /// Extra arguments for our daemon (repeatable), e.g. --ours-arg=--commit-interval=0.
    #[arg(long, allow_hyphen_values = true)]
    ours_arg: Vec<String>,
    /// Extra arguments for the base daemon instead of --ours-arg (repeatable); with
    /// --base-daemon naming the same binary, an A/B of one option.
    #[arg(long, allow_hyphen_values = true)]
    base_arg: Vec<String>,
    /// Make the source a hole (all zeroes, no data) instead of random data. Reads then
    /// copy no page-cache data on tmpfs: shows how much of the cost is the copy itself.
    #[arg(long)]
    sparse_source: bool,
    /// Give our clone a destination whose blocks are all allocated (written with zeroes
    /// before each clone measurement) instead of a sparse file that serve extends: shows
    /// what allocating blocks on the file system (and journaling it at each commit's
    /// destination flush) costs first-touch writes. QSD's overlay is unchanged.
    #[arg(long)]
    allocated_clone: bool,
    /// Give QSD's qcow2 overlay subclusters (`extended_l2=on`: 32 per cluster, so
    /// a write of whole subclusters into an unallocated cluster copies nothing from
    /// the backing file), qcow2's own answer to first-touch partial writes, to
    /// compare with our written-blocks masks.
    #[arg(long)]
    qcow2_subclusters: bool,
    /// Serve the source through an NBD server instead of as a file (issue 14):
    /// the tool starts `qemu-nbd --read-only --shared=16` on the source image over a
    /// unix socket (`unix`) or TCP on 127.0.0.1 (`tcp`). The clone cases then read
    /// unhydrated regions over NBD: ours with `--source nbd+unix://...` (or `nbd://`),
    /// QSD with its qcow2 overlay's backing an `nbd` blockdev node on the same export.
    #[arg(long, value_name = "unix|tcp", value_parser = ["unix", "tcp"])]
    nbd_source: Option<String>,
    /// The qemu-nbd binary (with --nbd-source).
    #[arg(long, default_value = "qemu-nbd")]
    qemu_nbd: PathBuf,
}

// ---------------------------------------------------------------- cases

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
enum Op {
    Read,
    Write,
    /// Each slot alternates a 4k write and a flush.
    WriteFlush,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
enum Pat {
    Rand,
    Seq,
    /// One write into each region, regions in a seeded random order (each write
    /// lands in an unhydrated region / unallocated cluster).
    FirstTouch,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
enum Target {
    /// Ours: a fully hydrated clone served with only --dest; QSD: the same raw file.
    Hydrated,
    /// Ours: a fresh clone with --no-hydration; QSD: a fresh qcow2 overlay over the source.
    Clone,
}

#[derive(Clone, Debug, Serialize)]
struct Case {
    name: &'static str,
    op: Op,
    bs: usize,
    queues: usize,
    depth: usize,
    pat: Pat,
    target: Target,
    /// Target ratio ours / best QSD from issue 16 (issue 8 before it; None: no target).
    goal: Option<f64>,
}

fn cases(a: &Args, direct: bool) -> Vec<Case> {
    let (q, d) = (a.queues, a.depth);
    let g = |shm: f64, dio: f64| Some(if direct { dio } else { shm });
    let c = |name, op, bs, queues, depth, pat, target, goal| Case {
        name,
        op,
        bs,
        queues,
        depth,
        pat,
        target,
        goal,
    };
    use Op::*;
    use Pat::*;
    use Target::*;
    vec![
        c(
            "randread-4k-qd1",
            Read,
            4096,
            1,
            1,
            Rand,
            Hydrated,
            g(1.3, 1.0),
        ),
        c(
            "randread-4k-qd32",
            Read,
            4096,
            q,
            d,
            Rand,
            Hydrated,
            g(10.0, 1.0),
        ),
        c(
            "randwrite-4k-qd32",
            Write,
            4096,
            q,
            d,
            Rand,
            Hydrated,
            g(8.0, 1.0),
        ),
        c(
            "seqread-128k",
            Read,
            131072,
            q,
            (d / 4).max(1),
            Seq,
            Hydrated,
            g(3.0, 1.0),
        ),
        c(
            "seqwrite-128k",
            Write,
            131072,
            q,
            (d / 4).max(1),
            Seq,
            Hydrated,
            g(1.0, 1.0),
        ),
        c(
            "flush-4k",
            WriteFlush,
            4096,
            q,
            d,
            Rand,
            Hydrated,
            Some(1.0),
        ),
        c(
            "clone-randwrite-4k",
            Write,
            4096,
            q,
            d,
            FirstTouch,
            Clone,
            g(3.0, 1.5),
        ),
        c("clone-randread-4k", Read, 4096, q, d, Rand, Clone, None),
        c("clone-randread-4k-qd1", Read, 4096, 1, 1, Rand, Clone, None),
        c(
            "clone-flush-4k",
            WriteFlush,
            4096,
            q,
            d,
            FirstTouch,
            Clone,
            Some(1.0),
        ),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Backend {
    #[serde(rename = "ours")]
    Ours,
    #[serde(rename = "qsd-threads")]
    QsdThreads,
    #[serde(rename = "qsd-uring")]
    QsdUring,
    /// Another vhost-clone binary (`--base-daemon`), e.g. the commit before a change:
    /// alternated with the others, for a before/after in one run.
    #[serde(rename = "base")]
    Base,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Ours => "ours",
            Backend::QsdThreads => "qsd-threads",
            Backend::QsdUring => "qsd-uring",
            Backend::Base => "base",
        }
    }
}

// ---------------------------------------------------------------- context

struct Ctx {
    a: Args,
    dir: PathBuf,
    own_dir: bool,
    direct: bool,
    size: u64,
    seconds: f64,
    daemon: PathBuf,
    /// A private copy of --base-daemon.
    base_daemon: Option<PathBuf>,
    src: PathBuf,
    dest: PathBuf,
    dest_meta: PathBuf,
    clone: PathBuf,
    clone_meta: PathBuf,
    ovl: PathBuf,
    sock: PathBuf,
    /// With --nbd-source: the server exporting `src`.
    nbd: Option<NbdServer>,
}

impl Ctx {
    /// The clone's source as our daemon and `qemu-img create -b` name it.
    fn source_arg(&self) -> std::ffi::OsString {
        match &self.nbd {
            Some(n) => n.uri.clone().into(),
            None => self.src.clone().into(),
        }
    }
}

/// The NBD server of --nbd-source: qemu-nbd exporting the source image read-only.
struct NbdServer {
    child: Child,
    /// How it was reached: "unix" or "tcp".
    kind: String,
    /// The URI our daemon and qemu-img use.
    uri: String,
    /// QSD's `--blockdev` options for the same export (without node-name).
    qsd_opts: String,
}

impl NbdServer {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(format!("no free TCP port: {e}")))
}

/// Starts qemu-nbd on the source image (which must exist): read-only, persistent
/// (one client after another), 16 clients at once (so it offers multi-conn), export
/// "src", qemu-nbd's default cache (the page cache). Returns once it accepts.
fn start_nbd(c: &Ctx, kind: &str) -> NbdServer {
    let mut cmd = Command::new(&c.a.qemu_nbd);
    cmd.args([
        "--read-only",
        "--persistent",
        "--shared=16",
        "--format=raw",
        "--export-name=src",
    ]);
    let sock = c.dir.join("nbd.sock");
    let port = if kind == "tcp" { free_port() } else { 0 };
    let (uri, qsd_opts) = if kind == "tcp" {
        cmd.arg("--bind=127.0.0.1").arg(format!("--port={port}"));
        (
            format!("nbd://127.0.0.1:{port}/src"),
            format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=src,read-only=on"),
        )
    } else {
        rm(&sock);
        cmd.arg(format!("--socket={}", sock.display()));
        (
            format!("nbd+unix:///src?socket={}", sock.display()),
            format!(
                "driver=nbd,server.type=unix,server.path={},export=src,read-only=on",
                sock.display()
            ),
        )
    };
    cmd.arg(&c.src);
    let log = c.dir.join("qemu-nbd.log");
    let logf = File::create(&log).unwrap_or_else(|e| die(format!("{}: {e}", log.display())));
    let mut child = spawn_logged(&mut cmd, logf);
    let t0 = Instant::now();
    loop {
        let up = if kind == "tcp" {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        } else {
            UnixStream::connect(&sock).is_ok()
        };
        if up {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            die(format!("qemu-nbd exited with {st}; see {}", log.display()));
        }
        if t0.elapsed() > Duration::from_secs(10) {
            die("qemu-nbd did not accept within 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    NbdServer {
        child,
        kind: kind.to_string(),
        uri,
        qsd_opts,
    }
}

fn stop_nbd(mut n: NbdServer) {
    if let Ok(mut v) = CHILDREN.lock() {
        v.retain(|p| *p != n.child.id());
    }
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(n.child.id() as i32, libc::SIGTERM) };
    let _ = n.child.wait();
}

/// Daemons started and not yet stopped: `die` ends them, so an error leaves none behind.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("vcbench: error: {msg}");
    for pid in CHILDREN.lock().map(|v| v.clone()).unwrap_or_default() {
        // SAFETY: kill only signals a child this process spawned and has not reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    std::process::exit(1)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// utime + stime of a process (all its threads), in seconds.
fn proc_cpu(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after "(comm)": state is index 0, utime is field 14 overall = index 11.
    let ut: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ut + st) / hz
}

fn proc_status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn run_cmd(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| die(format!("running {cmd:?}: {e}")));
    if !out.status.success() {
        die(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

fn rm(p: &Path) {
    let _ = std::fs::remove_file(p);
}

/// The source image: random data, or one hole with --sparse-source.
fn make_source(c: &Ctx) {
    if c.a.sparse_source {
        let f = File::create(&c.src).unwrap_or_else(|e| die(format!("{}: {e}", c.src.display())));
        f.set_len(c.size)
            .unwrap_or_else(|e| die(format!("{}: {e}", c.src.display())));
    } else {
        fill_file(&c.src, c.size, 0x5eed);
    }
}

/// Deterministic non-zero, incompressible-looking data.
fn fill_file(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).unwrap_or_else(|e| die(format!("{}: {e}", path.display())));
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for ch in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ch.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

// ---------------------------------------------------------------- daemons

struct Daemon {
    child: Child,
    sock: PathBuf,
    ctl: Option<PathBuf>,
    /// Spawn until the socket accepted a connection.
    startup: Duration,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        if let Ok(mut v) = CHILDREN.lock() {
            v.retain(|p| *p != self.child.id());
        }
        // SAFETY: kill sends a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "vcbench: daemon {} ignored SIGTERM; killing",
                    self.child.id()
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        rm(&self.sock);
    }
}

/// Starts `cmd` with stdout and stderr into `logf`, remembered for the
/// clean-up of children on exit.
fn spawn_logged(cmd: &mut Command, logf: File) -> std::process::Child {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .unwrap_or_else(|e| die(format!("spawn {cmd:?}: {e}")));
    if let Ok(mut v) = CHILDREN.lock() {
        v.push(child.id());
    }
    child
}

fn spawn(cmd: &mut Command, sock: &Path, log: &Path) -> Daemon {
    rm(sock);
    let logf = File::options().create(true).append(true).open(log).unwrap();
    let t0 = Instant::now();
    let mut child = spawn_logged(cmd, logf);
    loop {
        if UnixStream::connect(sock).is_ok() {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            die(format!(
                "{cmd:?} exited with {st} before accepting; see {}",
                log.display()
            ));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            die(format!("{cmd:?}: socket never accepted"));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let startup = t0.elapsed();
    Daemon {
        child,
        sock: sock.to_path_buf(),
        ctl: None,
        startup,
    }
}

fn start_ours(c: &Ctx, daemon: &Path, extra: &[String], target: Target, nq: usize) -> Daemon {
    let mut cmd = Command::new(daemon);
    cmd.arg("serve");
    match target {
        Target::Hydrated => {
            cmd.arg("--dest")
                .arg(&c.dest)
                .arg("--metadata")
                .arg(&c.dest_meta);
        }
        Target::Clone => {
            rm(&c.clone);
            rm(&c.clone_meta);
            if c.a.allocated_clone {
                let f = File::create(&c.clone)
                    .unwrap_or_else(|e| die(format!("{}: {e}", c.clone.display())));
                let zero = vec![0u8; 1 << 20];
                let mut w = std::io::BufWriter::new(&f);
                for _ in 0..c.size.div_ceil(1 << 20) {
                    std::io::Write::write_all(&mut w, &zero)
                        .unwrap_or_else(|e| die(format!("{}: {e}", c.clone.display())));
                }
                drop(w);
                f.set_len(c.size)
                    .and_then(|()| f.sync_all())
                    .unwrap_or_else(|e| die(format!("{}: {e}", c.clone.display())));
            }
            cmd.arg("--source")
                .arg(c.source_arg())
                .arg("--dest")
                .arg(&c.clone)
                .arg("--metadata")
                .arg(&c.clone_meta)
                .arg("--region-size")
                .arg(c.a.region_size.to_string())
                .arg("--no-hydration");
        }
    }
    cmd.arg("--socket-path")
        .arg(&c.sock)
        .arg("--num-queues")
        .arg(nq.to_string());
    if c.direct {
        cmd.arg("--direct");
    }
    cmd.args(extra);
    let mut d = spawn(&mut cmd, &c.sock, &c.dir.join("ours.log"));
    d.ctl = Some(PathBuf::from(format!("{}.ctl", c.sock.display())));
    d
}

fn start_qsd(c: &Ctx, b: Backend, target: Target, nq: usize) -> Daemon {
    let aio = if b == Backend::QsdUring {
        "io_uring"
    } else {
        "threads"
    };
    let cd = if c.direct { "on" } else { "off" };
    let mut cmd = Command::new(&c.a.qsd);
    let node = match target {
        Target::Hydrated => {
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=file,filename={},cache.direct={cd},aio={aio}",
                c.dest.display()
            ));
            "file"
        }
        Target::Clone => {
            rm(&c.ovl);
            run_cmd(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(c.source_arg())
                    .arg("-o")
                    .arg(format!(
                        "cluster_size={}{}",
                        c.a.region_size,
                        if c.a.qcow2_subclusters {
                            ",extended_l2=on"
                        } else {
                            ""
                        }
                    ))
                    .arg(&c.ovl)
                    .arg(c.size.to_string()),
            );
            cmd.arg("--blockdev").arg(match &c.nbd {
                // The backing is the NBD export itself (QEMU's NBD client: one
                // connection; it has no multi-conn).
                Some(n) => format!("{},node-name=bf", n.qsd_opts),
                None => format!(
                    "driver=file,node-name=bf,filename={},read-only=on,cache.direct={cd},aio={aio}",
                    c.src.display()
                ),
            });
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=of,filename={},cache.direct={cd},aio={aio}",
                c.ovl.display()
            ));
            cmd.arg("--blockdev")
                .arg("driver=qcow2,node-name=q,file=of,backing=bf");
            "q"
        }
    };
    cmd.arg("--export").arg(format!(
        "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues={nq}",
        c.sock.display()
    ));
    spawn(&mut cmd, &c.sock, &c.dir.join("qsd.log"))
}

fn ours_status(c: &Ctx, ctl: &Path) -> Option<serde_json::Value> {
    let out = Command::new(&c.daemon)
        .args(["status", "--json", "--control-socket"])
        .arg(ctl)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Source image, and a fully hydrated clone of it (dest + metadata) made by our
/// daemon's background hydration.
fn prepare(c: &Ctx) {
    let t = Instant::now();
    make_source(c);
    rm(&c.dest);
    rm(&c.dest_meta);
    run_cmd(
        Command::new(&c.daemon)
            .arg("create")
            .arg("--source")
            .arg(&c.src)
            .arg("--dest")
            .arg(&c.dest)
            .arg("--metadata")
            .arg(&c.dest_meta)
            .arg("--region-size")
            .arg(c.a.region_size.to_string()),
    );
    let mut cmd = Command::new(&c.daemon);
    cmd.arg("serve")
        .arg("--source")
        .arg(&c.src)
        .arg("--dest")
        .arg(&c.dest)
        .arg("--metadata")
        .arg(&c.dest_meta)
        .arg("--socket-path")
        .arg(&c.sock)
        .args([
            "--hydration-threshold",
            "256",
            "--hydration-batch-size",
            "64",
        ]);
    if c.direct {
        cmd.arg("--direct");
    }
    let d = spawn(&mut cmd, &c.sock, &c.dir.join("ours.log"));
    let ctl = PathBuf::from(format!("{}.ctl", c.sock.display()));
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(s) = ours_status(c, &ctl) {
            let h = s["hydrated_regions"].as_u64().unwrap_or(0);
            let n = s["regions"].as_u64().unwrap_or(u64::MAX);
            if h >= n {
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(1200) {
            die("hydration of the benchmark clone did not finish");
        }
    }
    d.stop();
    eprintln!(
        "vcbench: prepared {} MiB source and hydrated clone in {:.1} s",
        c.size >> 20,
        t.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------- workload

#[derive(Default)]
struct QueueResult {
    ops: u64,
    bytes: u64,
    errors: u64,
    /// Completion time of the last counted request, from the common start.
    end: Duration,
    lat_ns: Vec<u32>,
    err: Option<String>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

struct Driver<'a> {
    case: &'a Case,
    nq: usize,
    buf: usize,
    dev_size: u64,
    region: u64,
    rng: Rng,
    seq: u64,
    seq_lo: u64,
    seq_hi: u64,
    perm: Option<&'a [u64]>,
    perm_idx: usize,
    /// Per slot: a flush (true) or a write (false) is outstanding (WriteFlush).
    flushing: Vec<bool>,
}

impl Driver<'_> {
    /// Queues the next request for `slot`; false when the workload is exhausted.
    fn submit(&mut self, q: &mut Blkioq, slot: usize) -> bool {
        let bs = self.case.bs;
        // SAFETY (for the pointer): slot * bs stays inside this queue's share of the
        // mapped region (depth * bs bytes starting at self.buf).
        let p = (self.buf + slot * bs) as *mut u8;
        if self.case.op == Op::WriteFlush && !self.flushing[slot] {
            self.flushing[slot] = true;
            q.flush(slot, ReqFlags::empty());
            return true;
        }
        let off = match self.case.pat {
            Pat::Rand => (self.rng.next() % (self.dev_size / bs as u64)) * bs as u64,
            Pat::Seq => {
                if self.seq + bs as u64 > self.seq_hi {
                    self.seq = self.seq_lo;
                }
                let o = self.seq;
                self.seq += bs as u64;
                o
            }
            Pat::FirstTouch => {
                let perm = self.perm.unwrap();
                if self.perm_idx >= perm.len() {
                    return false;
                }
                let r = perm[self.perm_idx];
                self.perm_idx += self.nq;
                let per = self.region / bs as u64;
                r * self.region + (self.rng.next() % per) * bs as u64
            }
        };
        match self.case.op {
            Op::Read => q.read(off, p, bs, slot, ReqFlags::empty()),
            Op::Write => q.write(off, p, bs, slot, ReqFlags::empty()),
            Op::WriteFlush => {
                self.flushing[slot] = false;
                q.write(off, p, bs, slot, ReqFlags::empty());
            }
        }
        true
    }
}

#[allow(clippy::too_many_arguments)]
fn run_queue(
    mut q: Blkioq,
    case: &Case,
    qi: usize,
    nq: usize,
    buf: usize,
    dev_size: u64,
    region: u64,
    seed: u64,
    perm: Option<&[u64]>,
    start: Instant,
    deadline: Instant,
) -> QueueResult {
    let depth = case.depth;
    let share = dev_size / nq as u64 / case.bs as u64 * case.bs as u64;
    let mut d = Driver {
        case,
        nq,
        buf,
        dev_size,
        region,
        rng: Rng(seed ^ ((qi as u64 + 1) * 0x1234_5678_9abc)),
        seq: share * qi as u64,
        seq_lo: share * qi as u64,
        seq_hi: share * (qi as u64 + 1),
        perm,
        perm_idx: qi,
        // WriteFlush starts with a write: "flushing" = true means the next is a write.
        flushing: vec![true; depth],
    };
    let mut r = QueueResult {
        lat_ns: Vec::with_capacity(1 << 20),
        ..Default::default()
    };
    let mut sub_t = vec![start; depth];
    let mut inflight = 0usize;
    for (slot, t) in sub_t.iter_mut().enumerate() {
        *t = Instant::now();
        if d.submit(&mut q, slot) {
            inflight += 1;
        }
    }
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut stopped = false;
    while inflight > 0 {
        let mut timeout = Duration::from_secs(30);
        let n = match q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) => {
                r.err = Some(format!("do_io: {e:?}"));
                break;
            }
        };
        if n == 0 {
            r.err = Some("a request took more than 30 s".into());
            break;
        }
        let now = Instant::now();
        if !stopped && now >= deadline {
            stopped = true;
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            inflight -= 1;
            if !stopped {
                let l = now.duration_since(sub_t[slot]).as_nanos();
                r.lat_ns.push(l.min(u32::MAX as u128) as u32);
                r.ops += 1;
                if !(case.op == Op::WriteFlush && d.flushing[slot]) {
                    r.bytes += case.bs as u64;
                }
                if c.ret != 0 {
                    r.errors += 1;
                }
                r.end = now.duration_since(start);
                sub_t[slot] = Instant::now();
                if d.submit(&mut q, slot) {
                    inflight += 1;
                }
            }
        }
    }
    r
}

#[derive(Clone, Debug, Serialize)]
struct RunResult {
    round: usize,
    case: String,
    backend: Backend,
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    ops: u64,
    errors: u64,
    seconds: f64,
    cpu_s: f64,
    cpu_s_per_mreq: f64,
    /// CPU of this frontend process (all threads) per million requests.
    frontend_cpu_s_per_mreq: f64,
    load1: f64,
    startup_ms: f64,
    /// Ours only: metadata commits and flushes during the run.
    commits: Option<u64>,
    flushes: Option<u64>,
    /// Ours only: regions hydrated at the end of the run (clone cases).
    hydrated: Option<u64>,
    /// With --nbd-source: CPU seconds qemu-nbd used during the run.
    nbd_server_cpu_s: Option<f64>,
}

fn measure(c: &Ctx, d: &Daemon, case: &Case, b: Backend, round: usize) -> RunResult {
    let mut blk = Blkio::new("virtio-blk-vhost-user").unwrap_or_else(|e| die(format!("{e:?}")));
    blk.set_str("path", d.sock.to_str().unwrap()).unwrap();
    blk.connect()
        .unwrap_or_else(|e| die(format!("{}: connect: {e:?}", b.name())));
    let cap = blk.get_u64("capacity").unwrap();
    blk.set_i32("num-queues", case.queues as i32).unwrap();
    let started = blk
        .start()
        .unwrap_or_else(|e| die(format!("{}: start: {e:?}", b.name())));
    let align = blk.get_u64("mem-region-alignment").unwrap() as usize;
    let per_q = case.depth * case.bs;
    let len = (case.queues * per_q).next_multiple_of(align);
    let region = blk.alloc_mem_region(len).unwrap();
    blk.map_mem_region(&region).unwrap();
    let base = region.addr;
    // SAFETY: the region is `len` bytes owned by `blk`, alive until the end of this function.
    unsafe { std::ptr::write_bytes(base as *mut u8, 0xa5, len) };
    let seed = 0xbe7c_0000 + round as u64 * 7919 + case.name.len() as u64;
    let perm: Option<Vec<u64>> = (case.pat == Pat::FirstTouch).then(|| {
        let n = cap / c.a.region_size;
        let mut v: Vec<u64> = (0..n).collect();
        let mut r = Rng(seed);
        for i in (1..v.len()).rev() {
            v.swap(i, (r.next() % (i as u64 + 1)) as usize);
        }
        v
    });
    let s0 = d.ctl.as_deref().and_then(|p| ours_status(c, p));
    let load = load1();
    let srv0 = c.nbd.as_ref().map(|n| proc_cpu(n.pid()));
    let cpu0 = proc_cpu(d.pid());
    let fe0 = proc_cpu(std::process::id());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(c.seconds);
    let results: Vec<QueueResult> = std::thread::scope(|s| {
        let hs: Vec<_> = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(qi, q)| {
                let perm = perm.as_deref();
                let nq = case.queues;
                let region_size = c.a.region_size;
                s.spawn(move || {
                    run_queue(
                        q,
                        case,
                        qi,
                        nq,
                        base + qi * per_q,
                        cap,
                        region_size,
                        seed,
                        perm,
                        start,
                        deadline,
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cpu1 = proc_cpu(d.pid());
    let fe1 = proc_cpu(std::process::id());
    let srv1 = c.nbd.as_ref().map(|n| proc_cpu(n.pid()));
    let s1 = d.ctl.as_deref().and_then(|p| ours_status(c, p));
    drop(blk);
    let mut lat: Vec<u32> = Vec::new();
    let (mut ops, mut bytes, mut errors) = (0, 0, 0);
    let mut end = Duration::ZERO;
    for r in results {
        if let Some(e) = &r.err {
            eprintln!("vcbench: {} {} queue error: {e}", case.name, b.name());
        }
        ops += r.ops;
        bytes += r.bytes;
        errors += r.errors;
        end = end.max(r.end);
        lat.extend_from_slice(&r.lat_ns);
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i] as f64 / 1000.0
    };
    let secs = end.as_secs_f64().max(1e-9);
    let cpu = cpu1 - cpu0;
    let get = |s: &Option<serde_json::Value>, f: &dyn Fn(&serde_json::Value) -> Option<u64>| {
        s.as_ref().and_then(f)
    };
    let delta = |f: &dyn Fn(&serde_json::Value) -> Option<u64>| match (get(&s0, f), get(&s1, f)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    RunResult {
        round,
        case: case.name.into(),
        backend: b,
        iops: ops as f64 / secs,
        mib_s: bytes as f64 / secs / 1048576.0,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        ops,
        errors,
        seconds: secs,
        cpu_s: cpu,
        cpu_s_per_mreq: if ops > 0 {
            cpu / (ops as f64 / 1e6)
        } else {
            0.0
        },
        frontend_cpu_s_per_mreq: if ops > 0 {
            (fe1 - fe0) / (ops as f64 / 1e6)
        } else {
            0.0
        },
        load1: load,
        startup_ms: d.startup.as_secs_f64() * 1000.0,
        commits: delta(&|v| v["commits"].as_u64()),
        flushes: delta(&|v| v["io"]["flushes"].as_u64()),
        hydrated: get(&s1, &|v| v["hydrated_regions"].as_u64()),
        nbd_server_cpu_s: srv0.zip(srv1).map(|(a, b)| b - a),
    }
}

// ---------------------------------------------------------------- memory / start-up

#[derive(Clone, Debug, Serialize)]
struct MemResult {
    who: String,
    device_gib: u64,
    region_size: u64,
    first_start: bool,
    startup_ms: f64,
    vm_rss_kib: u64,
    rss_anon_kib: u64,
    rss_file_kib: u64,
    rss_shmem_kib: u64,
    vm_hwm_kib: u64,
    bitmap_kib: u64,
}

fn memory_test(c: &Ctx, backends: &[Backend]) -> Vec<MemResult> {
    let tib: u64 = 1 << 40;
    let src = c.dir.join("tib-src.img");
    let dst = c.dir.join("tib-clone.img");
    let meta = c.dir.join("tib-clone.meta");
    let ovl = c.dir.join("tib-ovl.qcow2");
    let sock = c.dir.join("tib.sock");
    for p in [&src, &dst, &meta, &ovl] {
        rm(p);
    }
    File::create(&src).unwrap().set_len(tib).unwrap();
    let bitmap_kib = tib / c.a.region_size / 8 / 1024;
    let mut out = Vec::new();
    let probe = |d: &Daemon, who: &str, first: bool| -> MemResult {
        // Connect like a frontend, start 2 queues, map 1 MiB and read a little.
        let mut blk = Blkio::new("virtio-blk-vhost-user").unwrap();
        blk.set_str("path", d.sock.to_str().unwrap()).unwrap();
        blk.connect().unwrap();
        blk.set_i32("num-queues", 2).unwrap();
        let mut st = blk.start().unwrap();
        let region = blk.alloc_mem_region(1 << 20).unwrap();
        blk.map_mem_region(&region).unwrap();
        let q = &mut st.queues[0];
        let mut rng = Rng(1);
        for i in 0..256usize {
            let off = (rng.next() % (tib / 4096)) * 4096;
            q.read(off, region.addr as *mut u8, 4096, i, ReqFlags::empty());
            let mut cm = [MaybeUninit::<Completion>::uninit(); 1];
            let mut t = Duration::from_secs(10);
            let n = q.do_io(&mut cm, 1, Some(&mut t), None).unwrap();
            assert_eq!(n, 1);
        }
        std::thread::sleep(Duration::from_millis(100));
        let pid = d.pid();
        let r = MemResult {
            who: who.into(),
            device_gib: tib >> 30,
            region_size: c.a.region_size,
            first_start: first,
            startup_ms: d.startup.as_secs_f64() * 1000.0,
            vm_rss_kib: proc_status_kib(pid, "VmRSS:"),
            rss_anon_kib: proc_status_kib(pid, "RssAnon:"),
            rss_file_kib: proc_status_kib(pid, "RssFile:"),
            rss_shmem_kib: proc_status_kib(pid, "RssShmem:"),
            vm_hwm_kib: proc_status_kib(pid, "VmHWM:"),
            bitmap_kib,
        };
        drop(st);
        drop(blk);
        r
    };
    if backends.contains(&Backend::Ours) {
        for first in [true, false] {
            let mut cmd = Command::new(&c.daemon);
            cmd.arg("serve")
                .arg("--source")
                .arg(&src)
                .arg("--dest")
                .arg(&dst)
                .arg("--metadata")
                .arg(&meta)
                .arg("--region-size")
                .arg(c.a.region_size.to_string())
                .arg("--socket-path")
                .arg(&sock)
                .args(["--num-queues", "2", "--no-hydration"]);
            if c.direct {
                cmd.arg("--direct");
            }
            let d = spawn(&mut cmd, &sock, &c.dir.join("ours.log"));
            out.push(probe(&d, "ours", first));
            d.stop();
        }
    }
    if backends.contains(&Backend::QsdThreads) || backends.contains(&Backend::QsdUring) {
        run_cmd(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&src)
                .arg("-o")
                .arg(format!("cluster_size={}", c.a.region_size))
                .arg(&ovl)
                .arg(tib.to_string()),
        );
        let cd = if c.direct { "on" } else { "off" };
        let mut cmd = Command::new(&c.a.qsd);
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=bf,filename={},read-only=on,cache.direct={cd},aio=threads",
                src.display()
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=of,filename={},cache.direct={cd},aio=threads",
                ovl.display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=q,file=of,backing=bf")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={},writable=on,num-queues=2",
                sock.display()
            ));
        let d = spawn(&mut cmd, &sock, &c.dir.join("qsd.log"));
        out.push(probe(&d, "qsd-threads (qcow2 over backing)", false));
        d.stop();
    }
    for p in [&src, &dst, &meta, &ovl] {
        rm(p);
    }
    out
}

// ---------------------------------------------------------------- summary

#[derive(Clone, Debug, Serialize)]
struct CaseSummary {
    case: String,
    /// Per backend, medians over rounds.
    iops: BTreeMap<String, f64>,
    mib_s: BTreeMap<String, f64>,
    p50_us: BTreeMap<String, f64>,
    p99_us: BTreeMap<String, f64>,
    cpu_s_per_mreq: BTreeMap<String, f64>,
    /// ours / max(qsd-threads, qsd-uring), per round.
    ratios: Vec<f64>,
    /// base / max(qsd-threads, qsd-uring), per round (with --base-daemon).
    base_ratios: Vec<f64>,
    ratio_median: Option<f64>,
    ratio_min: Option<f64>,
    ratio_max: Option<f64>,
    goal: Option<f64>,
    met: Option<bool>,
    /// clone-randread only: ours unhydrated / ours hydrated (randread-4k-qd32), per round.
    unhydrated_vs_hydrated: Vec<f64>,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn summarize(all: &[RunResult], cs: &[Case], rounds: usize) -> Vec<CaseSummary> {
    let find = |case: &str, b: Backend, r: usize| {
        all.iter()
            .find(|x| x.case == case && x.backend == b && x.round == r)
    };
    let mut out = Vec::new();
    for case in cs {
        let of = |b: Backend, f: &dyn Fn(&RunResult) -> f64| {
            let v: Vec<f64> = all
                .iter()
                .filter(|x| x.case == case.name && x.backend == b)
                .map(f)
                .collect();
            median(&v)
        };
        let mut s = CaseSummary {
            case: case.name.into(),
            iops: BTreeMap::new(),
            mib_s: BTreeMap::new(),
            p50_us: BTreeMap::new(),
            p99_us: BTreeMap::new(),
            cpu_s_per_mreq: BTreeMap::new(),
            ratios: vec![],
            base_ratios: vec![],
            ratio_median: None,
            ratio_min: None,
            ratio_max: None,
            goal: case.goal,
            met: None,
            unhydrated_vs_hydrated: vec![],
        };
        for b in [
            Backend::Ours,
            Backend::QsdThreads,
            Backend::QsdUring,
            Backend::Base,
        ] {
            if let Some(v) = of(b, &|x| x.iops) {
                s.iops.insert(b.name().into(), v);
                s.mib_s
                    .insert(b.name().into(), of(b, &|x| x.mib_s).unwrap());
                s.p50_us
                    .insert(b.name().into(), of(b, &|x| x.p50_us).unwrap());
                s.p99_us
                    .insert(b.name().into(), of(b, &|x| x.p99_us).unwrap());
                s.cpu_s_per_mreq
                    .insert(b.name().into(), of(b, &|x| x.cpu_s_per_mreq).unwrap());
            }
        }
        for r in 0..rounds {
            let ours = find(case.name, Backend::Ours, r).map(|x| x.iops);
            let q = [Backend::QsdThreads, Backend::QsdUring]
                .iter()
                .filter_map(|b| find(case.name, *b, r).map(|x| x.iops))
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            if let (Some(o), Some(q)) = (ours, q) {
                s.ratios.push(o / q);
            }
            if let (Some(o), Some(q)) = (find(case.name, Backend::Base, r).map(|x| x.iops), q) {
                s.base_ratios.push(o / q);
            }
            if case.name == "clone-randread-4k" {
                if let (Some(o), Some(h)) = (ours, find("randread-4k-qd32", Backend::Ours, r)) {
                    s.unhydrated_vs_hydrated.push(o / h.iops);
                }
            }
        }
        s.ratio_median = median(&s.ratios);
        s.ratio_min = s.ratios.iter().cloned().reduce(f64::min);
        s.ratio_max = s.ratios.iter().cloned().reduce(f64::max);
        if case.name == "clone-randread-4k" {
            s.goal = None;
            s.met = median(&s.unhydrated_vs_hydrated).map(|m| m >= 0.9);
        } else {
            s.met = match (s.ratio_median, s.goal) {
                (Some(r), Some(g)) => Some(r >= g),
                _ => None,
            };
        }
        out.push(s);
    }
    out
}

fn fmt_num(v: Option<&f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if *v >= 100.0 => format!("{:.0}", v),
        Some(v) => format!("{:.2}", v),
    }
}

fn print_tables(sum: &[CaseSummary]) {
    let bs = ["ours", "qsd-threads", "qsd-uring", "base"];
    println!("\n### IOPS (median over rounds)\n");
    println!(
        "| case | ours | qsd-threads | qsd-uring | ratio us/QSD median (min-max) | target | met | base | base/QSD median (min-max) |"
    );
    println!("|---|---:|---:|---:|---|---|---|---:|---|");
    for s in sum {
        let r = match (s.ratio_median, s.ratio_min, s.ratio_max) {
            (Some(m), Some(a), Some(b)) => format!("{m:.2} ({a:.2}-{b:.2})"),
            _ => "-".into(),
        };
        let goal = if s.case == "clone-randread-4k" {
            let u = median(&s.unhydrated_vs_hydrated)
                .map(|m| format!("unhydrated/hydrated {m:.2} (>= 0.90)"))
                .unwrap_or("-".into());
            u
        } else {
            s.goal.map(|g| format!(">= {g}x")).unwrap_or("-".into())
        };
        let met = match s.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let br = match median(&s.base_ratios) {
            Some(m) => format!(
                "{m:.2} ({:.2}-{:.2})",
                s.base_ratios.iter().cloned().fold(f64::INFINITY, f64::min),
                s.base_ratios.iter().cloned().fold(0.0, f64::max)
            ),
            None => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {r} | {goal} | {met} | {} | {br} |",
            s.case,
            fmt_num(s.iops.get(bs[0])),
            fmt_num(s.iops.get(bs[1])),
            fmt_num(s.iops.get(bs[2])),
            fmt_num(s.iops.get(bs[3]))
        );
    }
    println!("\n### MiB/s, latency p50/p99 (us), daemon CPU s per million requests (medians)\n");
    println!("| case | backend | MiB/s | p50 us | p99 us | CPU s / Mreq |");
    println!("|---|---|---:|---:|---:|---:|");
    for s in sum {
        for b in bs {
            if s.iops.contains_key(b) {
                println!(
                    "| {} | {b} | {} | {} | {} | {} |",
                    s.case,
                    fmt_num(s.mib_s.get(b)),
                    fmt_num(s.p50_us.get(b)),
                    fmt_num(s.p99_us.get(b)),
                    fmt_num(s.cpu_s_per_mreq.get(b))
                );
            }
        }
    }
}

fn svg_chart(path: &Path, sum: &[CaseSummary], title: &str) {
    let rows: Vec<&CaseSummary> = sum.iter().filter(|s| s.ratio_median.is_some()).collect();
    let maxv = rows
        .iter()
        .map(|s| s.ratio_max.unwrap().max(s.goal.unwrap_or(0.0)))
        .fold(1.0f64, f64::max)
        * 1.1;
    let (w, row_h, left, top) = (760.0, 34.0, 170.0, 50.0);
    let plot_w = w - left - 60.0;
    let h = top + row_h * rows.len() as f64 + 50.0;
    let x = |v: f64| left + v / maxv * plot_w;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        10,
        title
    );
    // grid
    let step = if maxv > 20.0 {
        5.0
    } else if maxv > 6.0 {
        2.0
    } else {
        0.5
    };
    let mut g = 0.0;
    while g <= maxv {
        s += &format!(
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{3}\" text-anchor=\"middle\" fill=\"#555\">{4}</text>\n",
            x(g),
            top - 5.0,
            top + row_h * rows.len() as f64,
            top + row_h * rows.len() as f64 + 15.0,
            g
        );
        g += step;
    }
    s += &format!(
        "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{2}\" stroke=\"black\" stroke-dasharray=\"4,3\"/>\n",
        x(1.0),
        top - 5.0,
        top + row_h * rows.len() as f64
    );
    for (i, r) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let m = r.ratio_median.unwrap();
        let ok = r.met.unwrap_or(m >= 1.0);
        let col = if ok { "#3a7d44" } else { "#c0392b" };
        s += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n<rect x=\"{left}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{col}\"/>\n",
            left - 8.0,
            y + row_h * 0.6,
            r.case,
            y + 6.0,
            x(m) - left,
            row_h - 12.0
        );
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{m:.2}x</text>\n",
            x(r.ratio_min.unwrap()),
            y + row_h / 2.0,
            x(r.ratio_max.unwrap()),
            y + row_h / 2.0,
            x(r.ratio_max.unwrap().max(m)) + 4.0,
            y + row_h * 0.6
        );
        if let Some(gl) = r.goal {
            s += &format!(
                "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#1f4e9c\" stroke-width=\"3\"/>\n",
                x(gl),
                y + 2.0,
                y + row_h - 2.0
            );
        }
    }
    s += &format!(
        "<text x=\"{left}\" y=\"{:.1}\" fill=\"#555\">bar: median ratio ours / best QSD; whisker: min-max over rounds; blue tick: issue-8 target; dashed: 1.0</text>\n</svg>\n",
        h - 12.0
    );
    std::fs::write(path, s).unwrap_or_else(|e| die(format!("{}: {e}", path.display())));
}

// ---------------------------------------------------------------- main

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let a = Args::parse();
    let direct = a.dir.is_some() && !a.no_direct;
    let all_cases = cases(&a, direct);
    if a.list {
        for c in &all_cases {
            println!(
                "{:20} {:?} bs={} {}q x QD{} {:?} {:?} target={:?}",
                c.name, c.op, c.bs, c.queues, c.depth, c.pat, c.target, c.goal
            );
        }
        return;
    }
    let cs: Vec<Case> = all_cases
        .into_iter()
        .filter(|c| a.cases.is_empty() || a.cases.iter().any(|n| n == c.name))
        .collect();
    let mut backends: Vec<Backend> = [Backend::Ours, Backend::QsdThreads, Backend::QsdUring]
        .into_iter()
        .filter(|b| a.backends.is_empty() || a.backends.iter().any(|n| n == b.name()))
        .collect();
    if a.base_daemon.is_some() {
        backends.push(Backend::Base);
    }
    let size = a.size_mib.unwrap_or(if a.quick { 256 } else { 1024 }) << 20;
    let rounds = a.rounds.unwrap_or(if a.quick { 1 } else { 3 });
    let seconds = a.seconds.unwrap_or(if a.quick { 1.0 } else { 3.0 });
    let (dir, own_dir) = match &a.dir {
        Some(d) => (d.join(format!("vcbench-{}", std::process::id())), true),
        None => (
            PathBuf::from(format!("/dev/shm/vcbench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| die(format!("{}: {e}", dir.display())));
    let daemon = a.daemon.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/vhost-clone")
    });
    if !daemon.exists() {
        die(format!(
            "{} not found: run `cargo build --release` in the main crate or pass --daemon",
            daemon.display()
        ));
    }
    // Run a private copy: the main crate's target/ may be rebuilt by others mid-run.
    let private = dir.join("vhost-clone");
    std::fs::copy(&daemon, &private)
        .unwrap_or_else(|e| die(format!("copy {}: {e}", daemon.display())));
    let daemon_sum = sh(&format!("sha256sum {} | cut -c1-16", private.display()));
    let daemon_orig = daemon.clone();
    let daemon = private;
    let base_daemon = a.base_daemon.as_ref().map(|b| {
        let p = dir.join("vhost-clone-base");
        std::fs::copy(b, &p).unwrap_or_else(|e| die(format!("copy {}: {e}", b.display())));
        p
    });
    let mut c = Ctx {
        src: dir.join("src.img"),
        dest: dir.join("dest.img"),
        dest_meta: dir.join("dest.meta"),
        clone: dir.join("clone.img"),
        clone_meta: dir.join("clone.meta"),
        ovl: dir.join("ovl.qcow2"),
        sock: dir.join("vc.sock"),
        nbd: None,
        a: a.clone(),
        dir: dir.clone(),
        own_dir,
        direct,
        size,
        seconds,
        daemon,
        base_daemon,
    };
    let date = sh("date -u '+%Y-%m-%d %H:%M:%S UTC'");
    let machine = serde_json::json!({
        "nproc": sh("nproc"),
        "kernel": sh("uname -r"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "mem": sh("grep MemTotal /proc/meminfo"),
        "qsd": sh(&format!("{} --version | head -1", a.qsd.display())),
        "daemon": daemon_orig.display().to_string(),
        "daemon_sha256_16": daemon_sum,
        "daemon_built": sh(&format!("date -u -r {} '+%Y-%m-%d %H:%M:%S UTC'", daemon_orig.display())),
        "main_head": sh(&format!("git -C {}/../.. rev-parse --short HEAD", env!("CARGO_MANIFEST_DIR"))),
        "dir": dir.display().to_string(),
        "fs": sh(&format!("df -T {} | tail -1 | awk '{{print $2}}'", dir.display())),
        "direct": direct,
        "nbd_source": a.nbd_source,
        "qcow2_subclusters": a.qcow2_subclusters,
        "allocated_clone": a.allocated_clone,
    });
    println!(
        "# vcbench {date}\ndaemon {} (built {}, main HEAD {})\nmachine: {} cores, kernel {}, cpu {}; dir {} ({}), O_DIRECT {}\nsize {} MiB, {} rounds x {} s, {} queues x QD{}, region {} B\nload average at start: {}",
        machine["daemon"].as_str().unwrap(),
        machine["daemon_built"].as_str().unwrap(),
        machine["main_head"].as_str().unwrap(),
        machine["nproc"].as_str().unwrap(),
        machine["kernel"].as_str().unwrap(),
        machine["cpu"].as_str().unwrap(),
        dir.display(),
        machine["fs"].as_str().unwrap(),
        direct,
        size >> 20,
        rounds,
        seconds,
        a.queues,
        a.depth,
        a.region_size,
        loadavg()
    );
    if a.qcow2_subclusters {
        println!("QSD's qcow2 overlay: extended_l2=on (subclusters)");
    }
    let load_start = loadavg();

    let mut mem = Vec::new();
    if !a.no_memory {
        mem = memory_test(&c, &backends);
        println!(
            "\n### Memory and start-up, 1 TiB sparse clone, {} B regions\n",
            a.region_size
        );
        println!("| daemon | start | start-up ms | VmRSS MiB | RssAnon MiB | RssFile MiB | RssShmem MiB | VmHWM MiB | bitmap MiB |");
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for m in &mem {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                m.who,
                if m.first_start {
                    "first (formats metadata)"
                } else {
                    "again"
                },
                m.startup_ms,
                m.vm_rss_kib as f64 / 1024.0,
                m.rss_anon_kib as f64 / 1024.0,
                m.rss_file_kib as f64 / 1024.0,
                m.rss_shmem_kib as f64 / 1024.0,
                m.vm_hwm_kib as f64 / 1024.0,
                m.bitmap_kib as f64 / 1024.0
            );
        }
    }

    let mut all: Vec<RunResult> = Vec::new();
    if !a.memory_only && !cs.is_empty() {
        if cs.iter().any(|k| k.target == Target::Hydrated) {
            prepare(&c);
        } else {
            make_source(&c);
        }
        if let Some(kind) = &a.nbd_source {
            let n = start_nbd(&c, kind);
            println!(
                "\nsource of the clone cases: NBD, qemu-nbd (pid {}) over {} at {}; ours: --source {}, QSD: qcow2 overlay with backing {}",
                n.pid(),
                n.kind,
                n.uri,
                n.uri,
                n.qsd_opts
            );
            c.nbd = Some(n);
        }
        println!("\n### Runs (in the order run)\n");
        println!("| round | case | backend | IOPS | MiB/s | p50 us | p99 us | CPU s | CPU s/Mreq | load1 | note |");
        println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
        for r in 0..rounds {
            for case in &cs {
                let mut order = backends.clone();
                let n = order.len();
                order.rotate_left(r % n.max(1));
                for b in order {
                    let d = match b {
                        Backend::Ours => start_ours(
                            &c,
                            &c.daemon,
                            &c.a.ours_arg,
                            case.target,
                            a.queues.max(case.queues),
                        ),
                        Backend::Base => start_ours(
                            &c,
                            c.base_daemon.as_deref().expect("--base-daemon"),
                            &c.a.base_arg,
                            case.target,
                            a.queues.max(case.queues),
                        ),
                        _ => start_qsd(&c, b, case.target, a.queues.max(case.queues)),
                    };
                    let res = measure(&c, &d, case, b, r);
                    d.stop();
                    let mut note = String::new();
                    if res.errors > 0 {
                        note += &format!("{} ERRORS ", res.errors);
                    }
                    note += &format!("frontend CPU {:.2} s/Mreq ", res.frontend_cpu_s_per_mreq);
                    if let (Some(cm), Some(fl)) = (res.commits, res.flushes) {
                        note += &format!("commits {cm} flushes {fl} ");
                    }
                    if case.target == Target::Clone {
                        if let Some(h) = res.hydrated {
                            note += &format!("hydrated {h} ");
                        }
                        if let Some(s) = res.nbd_server_cpu_s {
                            note += &format!("qemu-nbd CPU {s:.2} s ");
                        }
                    }
                    println!(
                        "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {} |",
                        r,
                        case.name,
                        b.name(),
                        res.iops,
                        res.mib_s,
                        res.p50_us,
                        res.p99_us,
                        res.cpu_s,
                        res.cpu_s_per_mreq,
                        res.load1,
                        note.trim()
                    );
                    all.push(res);
                }
            }
        }
    }
    if let Some(n) = c.nbd.take() {
        stop_nbd(n);
    }
    let sum = summarize(&all, &cs, rounds);
    if !all.is_empty() {
        print_tables(&sum);
    }
    let load_end = loadavg();
    println!("\nload average: start {load_start}, end {load_end}");
    let json = serde_json::json!({
        "date": date,
        "machine": machine,
        "load_start": load_start,
        "load_end": load_end,
        "size_mib": size >> 20,
        "rounds": rounds,
        "seconds": seconds,
        "queues": a.queues,
        "depth": a.depth,
        "region_size": a.region_size,
        "cases": cs,
        "memory": mem,
        "summary": sum,
        "runs": all,
    });
    let text = serde_json::to_string_pretty(&json).unwrap();
    if let Some(p) = &a.json {
        std::fs::write(p, &text).unwrap_or_else(|e| die(format!("{}: {e}", p.display())));
    }
    println!(
        "\n```json\n{}\n```",
        serde_json::to_string(&serde_json::json!({
            "date": json["date"], "machine": json["machine"], "load_start": json["load_start"],
            "load_end": json["load_end"], "memory": json["memory"], "summary": json["summary"],
        }))
        .unwrap()
    );
    if let Some(p) = &a.svg {
        if !sum.is_empty() {
            let title = format!(
                "vhost-clone / qemu-storage-daemon, {} ({}), {date}",
                if direct {
                    "O_DIRECT on disk"
                } else {
                    "/dev/shm"
                },
                format_args!("{}q x QD{}", a.queues, a.depth)
            );
            svg_chart(p, &sum, &title);
        }
    }
    if c.own_dir && !a.keep {
        let _ = std::fs::remove_dir_all(&c.dir);
    }
}
