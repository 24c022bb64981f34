//! Signals and restarts (issue 7), with the real binary driven by libblkio:
//!
//! * `sigterm_during_writes_and_flushes_commits_everything`: SIGTERM while a
//!   write/flush workload runs. The daemon must finish the requests in flight,
//!   commit, and exit 0; `check` passes; after a restart every write the client saw
//!   completed reads back (the final commit covers even unflushed ones).
//! * `sigkill_at_random_moments_loses_no_acknowledged_write`: a loop of SIGKILLs
//!   at seeded random moments of a write+flush workload, each followed by a
//!   restart on the same files. A process death is not a power cut (design rule
//!   7): every sector must read back as the write acknowledged last, flushed or
//!   not, or as a write issued after it that was in flight at the kill; never as
//!   anything else (never the destination's initial garbage, never the source
//!   over an acknowledged write). Half of the daemons run with
//!   `--io-engine uring`, some without periodic commits. 20 iterations by
//!   default, `VHOST_CLONE_KILL_ITERS=N` for more.
//! * `power_cut_then_a_commit_elsewhere_then_restart`: a library-level restart
//!   sequence that exposed a recovery bug, fixed by rewriting journal-covered
//!   blocks in place when a store is opened (see its comment).

use crate::support::daemon::{run, text, BIN};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::sectors::{decode, image, write_data, GARBAGE, SOURCE};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vhost_clone::metadata::format::Layout;
use vhost_clone::metadata::{load, Geometry, Metadata};
use vhost_clone::storage::{BlockDevice, SimDevice};

const SIZE: u64 = 8 << 20;
const SECTORS: u64 = SIZE / 512;
const BUF: usize = 1 << 20;

struct Files {
    _dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    sock: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("golden.img");
    std::fs::write(&src, image(SOURCE, SECTORS)).unwrap();
    // The destination starts as recognisable garbage: it must never be read back.
    let dst = dir.path().join("clone.img");
    std::fs::write(&dst, image(GARBAGE, SECTORS)).unwrap();
    let sock = dir.path().join("clone.sock");
    Files {
        _dir: dir,
        src,
        dst,
        sock,
    }
}

struct Daemon(Child);

impl Daemon {
    fn start(f: &Files, extra: &[&str]) -> Daemon {
        use std::os::unix::fs::MetadataExt;
        // A killed daemon leaves its socket behind; the new one replaces it.
        let stale = std::fs::symlink_metadata(&f.sock)
            .ok()
            .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()));
        let child = Command::new(BIN)
            .arg("serve")
            .args([
                "--source",
                f.src.to_str().unwrap(),
                "--dest",
                f.dst.to_str().unwrap(),
            ])
            .args(["--socket-path", f.sock.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("VHOST_CLONE_DAEMON_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        // Owned from here on, so that a failed wait below still kills it.
        let d = Daemon(child);
        let t = Instant::now();
        while !f.sock.exists()
            || std::fs::symlink_metadata(&f.sock)
                .ok()
                .map(|m| (m.ino(), m.ctime(), m.ctime_nsec()))
                == stale
        {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        SIGNALLED.store(false, std::sync::atomic::Ordering::SeqCst);
        d
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn wait(&mut self) -> std::process::ExitStatus {
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

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Set when the daemon was sent a signal (reset at each start). The two tests
/// that use it run one at a time (see `SERIAL`).
static SIGNALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sends `sig` to `pid` after `after`, from another thread.
fn signal_later(pid: i32, sig: i32, after: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        SIGNALLED.store(true, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: kill only sends a signal to our own child's pid (still unreaped).
        unsafe { libc::kill(pid, sig) };
    })
}

struct Client {
    _b: Blkio,
    q: Blkioq,
    buf: *mut u8,
}

impl Client {
    fn connect(sock: &Path) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", sock.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", 1).unwrap();
        let mut started = b.start().unwrap();
        let q = started.queues.remove(0);
        let region = b.alloc_mem_region(BUF).unwrap();
        b.map_mem_region(&region).unwrap();
        let buf = region.addr as *mut u8;
        drop(started);
        Client { _b: b, q, buf }
    }

    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is BUF bytes owned by the Blkio instance kept alive in self.
        unsafe { std::slice::from_raw_parts_mut(self.buf, BUF) }
    }

    /// Waits for the one request in flight: `Some(ret)`, or `None` once the daemon
    /// was signalled and no completion came (or do_io failed).
    fn wait(&mut self) -> Option<i32> {
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
                    if SIGNALLED.load(std::sync::atomic::Ordering::SeqCst) {
                        return None;
                    }
                    if e.errno().raw_os_error() != libc::ETIME {
                        eprintln!("do_io failed with no signal sent: {e}");
                        return None;
                    }
                }
            }
            if SIGNALLED.load(std::sync::atomic::Ordering::SeqCst) {
                let at = *signalled_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_millis(500) {
                    return None;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "request hung");
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Option<i32> {
        self.mem()[..data.len()].copy_from_slice(data);
        self.q
            .write(off, self.buf, data.len(), 0, ReqFlags::empty());
        self.wait()
    }

    fn flush(&mut self) -> Option<i32> {
        self.q.flush(0, ReqFlags::empty());
        self.wait()
    }

    fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        self.q.read(off, self.buf, len, 0, ReqFlags::empty());
        assert_eq!(self.wait(), Some(0), "read at {off}");
        self.mem()[..len].to_vec()
    }
}

/// What each sector may read back as after a crash.
struct Model {
    /// Tag acknowledged last before the last acknowledged flush (None: the source).
    floor: Vec<Option<u64>>,
    /// Tags of writes acknowledged since the last flush.
    acked: Vec<Option<u64>>,
    /// Tags written (or in flight) since the last acknowledged flush.
    later: Vec<Vec<u64>>,
    next_tag: u64,
}

impl Model {
    fn new() -> Model {
        Model {
            floor: vec![None; SECTORS as usize],
            acked: vec![None; SECTORS as usize],
            later: vec![Vec::new(); SECTORS as usize],
            next_tag: 1000,
        }
    }

    fn flushed(&mut self) {
        for s in 0..SECTORS as usize {
            if let Some(t) = self.acked[s].take() {
                self.floor[s] = Some(t);
            }
            self.later[s].clear();
        }
    }

    /// Reads the whole disk and checks every sector; the observed state becomes
    /// the new floor. `strict`: every acknowledged write must be there (after a
    /// clean SIGTERM stop). Returns the number of sectors checked.
    fn verify(&mut self, c: &mut Client, strict: bool, what: &str) -> u64 {
        let mut checked = 0;
        for chunk in 0..(SIZE / BUF as u64) {
            let data = c.read(chunk * BUF as u64, BUF);
            for (i, sec) in data.chunks(512).enumerate() {
                let s = chunk * (BUF as u64 / 512) + i as u64;
                let si = s as usize;
                let got = decode(sec, s);
                let want_floor = self.acked[si].or(self.floor[si]).unwrap_or(SOURCE);
                let ok = match got {
                    None => false,
                    Some(GARBAGE) => false,
                    Some(t) if strict => t == want_floor || self.later[si].contains(&t),
                    Some(t) => t == self.floor[si].unwrap_or(SOURCE) || self.later[si].contains(&t),
                };
                assert!(
                    ok,
                    "{what}: sector {s} reads {got:?}; flushed {:?}, acknowledged {:?}, written since {:?}",
                    self.floor[si], self.acked[si], self.later[si]
                );
                self.floor[si] = got.filter(|&t| t != SOURCE);
                self.acked[si] = None;
                self.later[si].clear();
                checked += 1;
            }
        }
        checked
    }
}

struct Stats {
    writes: u64,
    flushes: u64,
}

/// Random writes (1..64 sectors), a flush every few, until the daemon goes away or
/// `limit` passes. Returns when the connection breaks.
fn workload(c: &mut Client, m: &mut Model, rng: &mut ChaCha8Rng, limit: Duration) -> Stats {
    let t0 = Instant::now();
    let mut st = Stats {
        writes: 0,
        flushes: 0,
    };
    while t0.elapsed() < limit {
        if rng.gen_ratio(1, 5) {
            match c.flush() {
                Some(0) => {
                    m.flushed();
                    st.flushes += 1;
                }
                Some(r) => panic!("flush failed: {r}"),
                None => return st,
            }
            continue;
        }
        let n = rng.gen_range(1..=64u64);
        let first = rng.gen_range(0..SECTORS - n);
        let tag = m.next_tag;
        m.next_tag += 1;
        for s in first..first + n {
            m.later[s as usize].push(tag);
        }
        match c.write(first * 512, &write_data(tag, first, n)) {
            Some(0) => {
                for s in first..first + n {
                    m.acked[s as usize] = Some(tag);
                }
                st.writes += 1;
            }
            Some(r) => panic!("write failed: {r}"),
            None => return st,
        }
    }
    st
}

#[test]
fn sigterm_during_writes_and_flushes_commits_everything() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let f = files();
    let mut m = Model::new();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for round in 0..3u64 {
        let extra: &[&str] = if round == 1 { &["--no-hydration"] } else { &[] };
        let mut d = Daemon::start(&f, extra);
        let mut c = Client::connect(&f.sock);
        if round > 0 {
            m.verify(&mut c, true, &format!("after SIGTERM round {}", round - 1));
        }
        let killer = signal_later(
            d.pid(),
            libc::SIGTERM,
            Duration::from_millis(150 + 100 * round),
        );
        let st = workload(&mut c, &mut m, &mut rng, Duration::from_secs(20));
        killer.join().unwrap();
        drop(c);
        let status = d.wait();
        assert!(status.success(), "SIGTERM exit status {status:?}");
        assert!(st.writes > 0, "no write completed before SIGTERM");
        eprintln!(
            "SIGTERM round {round}: {} writes, {} flushes before the signal",
            st.writes, st.flushes
        );
        let o = run(&[
            "check",
            "--source",
            f.src.to_str().unwrap(),
            "--dest",
            f.dst.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "check after SIGTERM: {}", text(&o));
    }
    let d = Daemon::start(&f, &[]);
    let mut c = Client::connect(&f.sock);
    m.verify(&mut c, true, "after the last SIGTERM");
    drop(c);
    drop(d);
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let iters: u64 = std::env::var("VHOST_CLONE_KILL_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let f = files();
    let mut m = Model::new();
    let (mut writes, mut flushes, mut sectors_checked) = (0, 0, 0);
    let t0 = Instant::now();
    for i in 0..iters {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0000 + i);
        let mut extra = vec![];
        if rng.gen_bool(0.5) {
            extra.push("--no-hydration");
        }
        match rng.gen_range(0..3) {
            0 => extra.extend_from_slice(&["--commit-interval", "0.02"]),
            1 => extra.extend_from_slice(&["--commit-interval", "0"]),
            _ => {}
        }
        if rng.gen_bool(0.5) {
            extra.extend_from_slice(&["--io-engine", "uring"]);
        }
        let d = Daemon::start(&f, &extra);
        let mut c = Client::connect(&f.sock);
        if i > 0 {
            sectors_checked += m.verify(
                &mut c,
                true,
                &format!("iteration {i}, after SIGKILL {}", i - 1),
            );
        }
        let delay = Duration::from_millis(rng.gen_range(10..400));
        let killer = signal_later(d.pid(), libc::SIGKILL, delay);
        let st = workload(&mut c, &mut m, &mut rng, Duration::from_secs(20));
        killer.join().unwrap();
        drop(c);
        drop(d);
        writes += st.writes;
        flushes += st.flushes;
    }
    // The last one: restart, verify, then a clean stop and check.
    let mut d = Daemon::start(&f, &[]);
    let mut c = Client::connect(&f.sock);
    sectors_checked += m.verify(&mut c, false, "after the last SIGKILL");
    drop(c);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid(), libc::SIGTERM) };
    assert!(d.wait().success());
    let o = run(&[
        "check",
        "--source",
        f.src.to_str().unwrap(),
        "--dest",
        f.dst.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    eprintln!(
        "SIGKILL loop: {iters} kills, {writes} acknowledged writes, {flushes} acknowledged flushes, \
         {sectors_checked} sectors verified after restarts, 0 lost, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Regression test. Bitmap blocks covered by the current journal record were
/// never rewritten after a restart: after a power cut that loses (or tears) the
/// in-place writes of commit S (step 7), the store loads through commit S's
/// journal record, but the next commit S+1 journals only the blocks *it*
/// changes; once superblock S+1 is durable, the blocks only commit S's record
/// covered were read from their stale or torn in-place copies and the store was
/// refused at the next start. `Metadata::open` now rewrites them first.
#[test]
fn power_cut_then_a_commit_elsewhere_then_restart() {
    let geo = Geometry::new(40_000 * 4096, 4096).unwrap(); // 2 bitmap blocks
    let need = Layout::new(&geo).required_size();
    let dst = SimDevice::new(4096);
    let dev = Arc::new(SimDevice::new(need));
    let md = Metadata::format(dev.clone(), geo).unwrap();
    md.set_hydrated(1).unwrap(); // block 0
    md.set_hydrated(33_000).unwrap(); // block 1
    md.commit(&dst, true).unwrap();
    // Power cut right after the commit: the in-place writes (step 7) are lost.
    let img = dev.durable_image();
    let dev = Arc::new(SimDevice::from_image(img));
    let md = Metadata::open(dev.clone(), Some(&geo)).expect("first restart");
    assert!(md.is_hydrated(33_000));
    // One commit that touches only block 0, then a clean stop.
    md.set_hydrated(2).unwrap();
    md.commit(&dst, true).unwrap();
    dev.flush().unwrap();
    let l = load(dev.as_ref(), Some(&geo)).expect("second restart refused the store");
    assert!(
        l.bits[1] && l.bits[2] && l.bits[33_000],
        "a committed bit was lost"
    );
}
