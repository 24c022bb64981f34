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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::daemon::{clone_files, run, s, text, Client, CloneFiles, Daemon};
use crate::support::sectors::{decode, image, write_data, GARBAGE, SOURCE};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vhost_clone::metadata::format::Layout;
use vhost_clone::metadata::{load, Geometry, Metadata};
use vhost_clone::storage::{BlockDevice, SimDevice};

const SIZE: u64 = 8 << 20;
const SECTORS: u64 = SIZE / 512;
const BUF: usize = 1 << 20;

/// A clone whose destination starts as recognisable garbage: it must never be
/// read back.
fn files() -> CloneFiles {
    let src = image(SOURCE, SECTORS);
    let f = clone_files(SIZE, |i| src[i as usize]);
    std::fs::write(&f.dst, image(GARBAGE, SECTORS)).unwrap();
    f
}

/// `serve` of `f` with `extra`, replacing the socket a killed daemon left.
fn serve(f: &CloneFiles, extra: &[&str]) -> Daemon {
    let mut args = vec!["--source", s(&f.src), "--dest", s(&f.dst)];
    args.extend_from_slice(&["--socket-path", s(&f.sock)]);
    args.extend_from_slice(extra);
    let d = Daemon::restart(&args, &f.sock);
    SIGNALLED.store(false, Ordering::SeqCst);
    d
}

/// Set when the daemon was sent a signal (reset at each start). The two tests
/// that use it run one at a time (see `SERIAL`).
static SIGNALLED: AtomicBool = AtomicBool::new(false);
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sends `sig` to `pid` after `after`, from another thread.
fn signal_later(pid: u32, sig: i32, after: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        SIGNALLED.store(true, Ordering::SeqCst);
        // SAFETY: kill only sends a signal to our own child's pid (still unreaped).
        unsafe { libc::kill(pid as i32, sig) };
    })
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
            let off = chunk * BUF as u64;
            let (r, data) = c.read(off, BUF);
            assert_eq!(r, 0, "{what}: read at {off}");
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
            match c.try_flush() {
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
        match c.try_write(first * 512, &write_data(tag, first, n)) {
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
        let mut d = serve(&f, extra);
        let mut c = Client::connect_watching(&f.sock, &SIGNALLED);
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
    let d = serve(&f, &[]);
    let mut c = Client::connect_watching(&f.sock, &SIGNALLED);
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
        let d = serve(&f, &extra);
        let mut c = Client::connect_watching(&f.sock, &SIGNALLED);
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
    let mut d = serve(&f, &[]);
    let mut c = Client::connect_watching(&f.sock, &SIGNALLED);
    sectors_checked += m.verify(&mut c, false, "after the last SIGKILL");
    drop(c);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
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
