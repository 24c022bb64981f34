//! The daemon under systemd's protocols, without systemd as PID 1: a fake
//! notify socket (a datagram socket this test binds, named by NOTIFY_SOCKET)
//! receives READY=1, STATUS=, STOPPING=1 and WATCHDOG=1; the real
//! `systemd-socket-activate` passes listening sockets (LISTEN_FDS); SIGHUP
//! stops like SIGTERM; the shipped units pass `systemd-analyze verify` and
//! their ExecStart, with the example configuration, serves a clone.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::daemon::*;

const SIZE: u64 = 8 << 20;
const REGION: usize = 64 << 10;

type Clone = CloneFiles;

fn clone() -> Clone {
    clone_files(SIZE, |i| (i % 251) as u8 | 1)
}

impl Clone {
    /// `serve --source --dest --runtime-dir` plus `extra`, with `env`.
    fn command(&self, extra: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(["--source", s(&self.src), "--dest", s(&self.dst)])
            .args(["--runtime-dir", s(&self.run)])
            .args(extra)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .envs(env.iter().copied());
        cmd
    }

    fn notify(&self) -> Notify {
        Notify::bind(&self.dir.path().join("notify"))
    }
}

/// A fake service manager's notify socket.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

/// One datagram and when it arrived.
struct Msg {
    at: Instant,
    text: String,
}

impl Notify {
    fn bind(path: &Path) -> Notify {
        let sock = UnixDatagram::bind(path).unwrap();
        Notify {
            sock,
            path: path.to_path_buf(),
        }
    }

    /// The next datagram within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Msg> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(Msg {
                at: Instant::now(),
                text: String::from_utf8_lossy(&buf[..n]).into_owned(),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Datagrams until one has a line `line`; panics with what came after 20 s.
    fn wait_line(&self, line: &str) -> (Msg, Vec<Msg>) {
        self.wait(|m| m.text.lines().any(|l| l == line), line)
    }

    fn wait(&self, pred: impl Fn(&Msg) -> bool, what: &str) -> (Msg, Vec<Msg>) {
        let t = Instant::now();
        let mut before = Vec::new();
        while t.elapsed() < Duration::from_secs(20) {
            if let Some(m) = self.recv(Duration::from_secs(20).saturating_sub(t.elapsed())) {
                if pred(&m) {
                    return (m, before);
                }
                before.push(m);
            }
        }
        let seen: Vec<&str> = before.iter().map(|m| m.text.as_str()).collect();
        panic!("no notification {what:?} in 20 s; got {seen:?}");
    }

    /// Everything that arrives within `d`.
    fn collect(&self, d: Duration) -> Vec<Msg> {
        let end = Instant::now() + d;
        let mut v = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if let Some(m) = self.recv(left) {
                v.push(m);
            }
        }
        v
    }
}

/// Spawns `cmd` with its stderr in an anonymous file (returned for messages).
fn spawn(mut cmd: Command) -> (std::process::Child, std::fs::File) {
    let log = tempfile::tempfile().unwrap();
    cmd.stdout(Stdio::null())
        .stderr(Stdio::from(log.try_clone().unwrap()));
    (cmd.spawn().unwrap(), log)
}

fn log_text(mut log: &std::fs::File) -> String {
    use std::io::{Read, Seek};
    let mut s = String::new();
    log.rewind().unwrap();
    log.read_to_string(&mut s).unwrap();
    s
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill only sends a signal to our own child's pid.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits at most 20 s for `child` to exit.
fn wait_exit(child: &mut std::process::Child) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "daemon did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// READY=1 comes only once the vhost-user socket accepts connections and the
/// control socket answers; STATUS= follows hydration; SIGTERM sends
/// STOPPING=1 at once and "stopping: final commit" before the exit.
#[test]
fn ready_status_and_stopping_reach_the_notify_socket() {
    let c = clone();
    let n = c.notify();
    let mut cmd = c.command(&["--no-hydration"], &[("NOTIFY_SOCKET", s(&n.path))]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut d = Daemon(cmd.spawn().unwrap());
    let (ready, before) = n.wait_line("READY=1");
    assert!(
        before.is_empty(),
        "sent before READY=1: {:?}",
        before[0].text
    );
    // The moment READY=1 arrives the daemon accepts and answers.
    UnixStream::connect(&c.sock).expect("READY=1 before the vhost-user socket listens");
    let st = status_json(&c.ctl);
    assert_eq!(st["hydrated_regions"], 0, "{st}");
    assert!(
        ready
            .text
            .lines()
            .any(|l| l == "STATUS=hydration paused: 0/128 regions (0.0%)"),
        "{}",
        ready.text
    );
    assert!(
        !ready.text.contains("WATCHDOG=1"),
        "no WATCHDOG_USEC, no pings"
    );

    // A whole-region write hydrates one region: the status follows.
    let mut cl = Client::connect(&c.sock);
    assert_eq!(cl.write(0, &vec![0x5a; REGION]), 0);
    n.wait_line("STATUS=hydration paused: 1/128 regions (0.8%)");
    drop(cl);
    let o = run(&["message", "--control-socket", s(&c.ctl), "enable-hydration"]);
    assert!(o.status.success(), "{}", text(&o));
    let (_, during) = n.wait_line("STATUS=hydrated: the source is no longer needed");
    assert!(
        during.iter().all(|m| !m.text.contains("WATCHDOG=1")),
        "watchdog pings without WATCHDOG_USEC"
    );

    let t = Instant::now();
    signal(d.pid(), libc::SIGTERM);
    let (stopping, _) = n.wait_line("STOPPING=1");
    assert!(
        stopping.at.duration_since(t) < Duration::from_secs(2),
        "STOPPING=1 came {:?} after SIGTERM",
        stopping.at.duration_since(t)
    );
    if !stopping.text.contains("STATUS=stopping: final commit") {
        n.wait_line("STATUS=stopping: final commit");
    }
    assert!(wait_exit(&mut d.0).success());
}

/// A standby (`serve --standby`) is READY=1 once it answers frontends, says
/// it stands by in STATUS=, and pings the watchdog while it waits; after the
/// takeover STATUS= follows the clone.
#[test]
fn a_standby_is_ready_once_it_answers_and_reports_its_takeover() {
    let c = clone();
    let a = Daemon::spawn(c.command(&["--no-hydration"], &[]), &c.sock);
    status_json(&c.ctl); // formatted
    let n = c.notify();
    let sock_b = c.dir.path().join("b.sock");
    let cmd = c.command(
        &["--no-hydration", "--standby", "--socket-path", s(&sock_b)],
        &[("NOTIFY_SOCKET", s(&n.path)), ("WATCHDOG_USEC", "400000")],
    );
    let mut b = Daemon::spawn(cmd, &sock_b);
    let (ready, _) = n.wait_line("READY=1");
    assert!(
        ready
            .text
            .lines()
            .any(|l| l.starts_with("STATUS=standby: answering frontends")),
        "{}",
        ready.text
    );
    UnixStream::connect(&sock_b).expect("READY=1 before the standby's socket listens");
    let pings = n.collect(Duration::from_millis(1000));
    assert!(
        pings
            .iter()
            .filter(|m| m.text.contains("WATCHDOG=1"))
            .count()
            >= 2,
        "a standby stopped pinging the watchdog"
    );
    let held = {
        let sock_b = sock_b.clone();
        std::thread::spawn(move || Client::connect(&sock_b).read(0, 4096))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(a.terminate().success());
    assert_eq!(held.join().unwrap().0, 0);
    n.wait_line("STATUS=hydration paused: 0/128 regions (0.0%)");
    signal(b.pid(), libc::SIGTERM);
    n.wait_line("STOPPING=1");
    assert!(wait_exit(&mut b.0).success());
}

/// With WATCHDOG_USEC the daemon pings every WATCHDOG_USEC/2; with a
/// WATCHDOG_PID that is not its own it does not ping. STATUS= says
/// "hydrating: N/M regions (P%), R MiB/s" while background hydration runs.
#[test]
fn watchdog_pings_at_half_the_timeout_and_only_for_its_own_pid() {
    let c = clone();
    // A slow hydration (4K regions, one at a time, over a big sparse source).
    let f = std::fs::File::create(&c.src).unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    let n = c.notify();
    let args = [
        "--region-size",
        "4K",
        "--hydration-threshold",
        "1",
        "--hydration-batch-size",
        "1",
    ];
    let mut cmd = c.command(
        &args,
        &[("NOTIFY_SOCKET", s(&n.path)), ("WATCHDOG_USEC", "400000")],
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let d = Daemon::adopt(cmd.spawn().unwrap(), &c.sock);
    let (ready, _) = n.wait_line("READY=1");
    let status = ready
        .text
        .lines()
        .find(|l| l.starts_with("STATUS="))
        .unwrap();
    assert!(
        status.starts_with("STATUS=hydrating: ")
            && status.contains("/65536 regions (")
            && status.ends_with(" MiB/s"),
        "{status}"
    );
    let pings: Vec<Instant> = n
        .collect(Duration::from_secs(3))
        .into_iter()
        .filter(|m| m.text.lines().any(|l| l == "WATCHDOG=1"))
        .map(|m| m.at)
        .collect();
    // 3 s at one ping per 200 ms: about 15 (pinging every 400 ms gives 7 or 8).
    assert!(
        (10..=20).contains(&pings.len()),
        "{} pings in 3 s, want about 15",
        pings.len()
    );
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(
        (Duration::from_millis(150)..Duration::from_millis(300)).contains(&mean),
        "mean gap {mean:?}, want 200 ms"
    );
    assert!(d.terminate().success());

    // WATCHDOG_PID names another process: no pings.
    let c = clone();
    let n = c.notify();
    let mut cmd = c.command(
        &[],
        &[
            ("NOTIFY_SOCKET", s(&n.path)),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let d = Daemon::adopt(cmd.spawn().unwrap(), &c.sock);
    n.wait_line("READY=1");
    let msgs = n.collect(Duration::from_millis(1200));
    assert!(
        msgs.iter().all(|m| !m.text.contains("WATCHDOG=1")),
        "pinged for another pid's watchdog"
    );
    assert!(d.terminate().success());
}

/// `systemd-socket-activate` passes the vhost-user socket (and, named
/// `control`, the control socket): the daemon serves a vhost-user client on
/// it, never removes it, and stops cleanly.
#[test]
fn socket_activation_serves_on_the_passed_sockets() {
    for with_control in [false, true] {
        let c = clone();
        let n = c.notify();
        let ctl = if with_control {
            c.dir.path().join("passed.ctl")
        } else {
            // With activation and no --socket-path, the control socket is DEST.ctl.
            c.dir.path().join("clone.img.ctl")
        };
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args(["-l", s(&c.sock)]);
        if with_control {
            cmd.args(["-l", s(&ctl), "--fdname=vhost-user:control"]);
        }
        cmd.arg(format!("--setenv=NOTIFY_SOCKET={}", s(&n.path)))
            .args(["--", BIN, "serve", "--no-hydration"])
            .args(["--source", s(&c.src), "--dest", s(&c.dst)])
            .args(["--runtime-dir", s(&c.run)]);
        let (child, log) = spawn(cmd);
        let d = Daemon::adopt(child, &c.sock);
        // The first connection starts the daemon (systemd-socket-activate execs it).
        let mut cl = Client::connect(&c.sock);
        let (ready, _) = n.wait_line("READY=1");
        assert!(
            ready.text.contains("STATUS=hydration paused"),
            "{}",
            ready.text
        );
        let data: Vec<u8> = (0..REGION).map(|i| (i % 7) as u8).collect();
        assert_eq!(cl.write(REGION as u64, &data), 0);
        assert_eq!(cl.flush(), 0);
        assert_eq!(cl.read(REGION as u64, REGION), (0, data));
        drop(cl);
        let st = status_json(&ctl);
        assert_eq!(st["hydrated_regions"], 1, "{st}");
        let log_msg = log_text(&log);
        assert!(log_msg.contains("socket activation"), "{log_msg}");
        assert!(d.terminate().success(), "{}", log_text(&log));
        assert!(c.sock.exists(), "the daemon removed systemd's socket");
        if with_control {
            assert!(
                !c.dir.path().join("clone.img.ctl").exists(),
                "bound a control socket besides the passed one"
            );
        }
    }
}

/// LISTEN_PID naming another process: the variables are ignored (the daemon
/// binds its own socket); with our pid, `--fd`/`--socket-path`/`--socket-group`/`--socket-mode` conflict (exit
/// 2), more sockets than it uses are refused (exit 2) and so is a passed fd
/// that is no listening unix stream socket (exit 1).
#[test]
fn listen_fds_are_checked_and_obeyed_only_for_our_pid() {
    let c = clone();
    // Names that do not fit the count: still ignored, the pid is not ours.
    let mut cmd = c.command(
        &[],
        &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_PID", "1"),
            ("LISTEN_FDNAMES", "vhost-user:control"),
        ],
    );
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let d = Daemon::adopt(cmd.spawn().unwrap(), &c.sock);
    let mut cl = Client::connect(&c.sock);
    assert_eq!(cl.flush(), 0);
    drop(cl);
    assert!(d.terminate().success());

    // `sh -c 'exec env LISTEN_PID=$$ ...'` keeps the pid, so LISTEN_PID is ours.
    let base = format!(
        "{BIN} serve --source {} --dest {} --runtime-dir {}",
        s(&c.src),
        s(&c.dst),
        s(&c.run)
    );
    let sock_fd = c.dir.path().join("fd3.sock");
    let seq = c.dir.path().join("seq.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock_fd).unwrap();
    for (fds, env, extra, want, msg) in [
        (
            "3<>/dev/null",
            "LISTEN_FDS=1",
            "--fd 3",
            2,
            "--fd cannot be used with socket activation",
        ),
        (
            "3<>/dev/null",
            "LISTEN_FDS=1",
            "--socket-path x.sock",
            2,
            "--socket-path cannot be used",
        ),
        (
            "3<>/dev/null",
            "LISTEN_FDS=1",
            "--socket-group 0",
            2,
            "--socket-group cannot be used",
        ),
        (
            "3<>/dev/null",
            "LISTEN_FDS=1",
            "--socket-mode 0660",
            2,
            "--socket-mode cannot be used",
        ),
        (
            "3<>/dev/null 4<>/dev/null 5<>/dev/null",
            "LISTEN_FDS=3",
            "",
            2,
            "passed 3 sockets",
        ),
        (
            "3<>/dev/null 4<>/dev/null",
            "LISTEN_FDS=2 LISTEN_FDNAMES=a:b",
            "",
            2,
            "FileDescriptorName=control",
        ),
        (
            "",
            "LISTEN_FDS=x",
            "",
            2,
            "bad socket activation environment",
        ),
        (
            "3<>/dev/null",
            "LISTEN_FDS=1",
            "",
            1,
            "not a listening unix stream socket",
        ),
    ] {
        let script = format!("exec {fds} env LISTEN_PID=$$ {env} {base} {extra}");
        let o = Command::new("sh")
            .args(["-c", &script])
            .current_dir(c.dir.path())
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap();
        let m = text(&o);
        assert_eq!(o.status.code(), Some(want), "{env} {extra}: {m}");
        assert!(m.contains(msg), "{env} {extra}: {m}");
    }
    // A listening SOCK_SEQPACKET socket passed by systemd-socket-activate: exit 1.
    let (child, log) = spawn({
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args(["--seqpacket", "-l", s(&seq), "--", BIN, "serve"])
            .args(["--source", s(&c.src), "--dest", s(&c.dst)])
            .args(["--runtime-dir", s(&c.run)]);
        cmd
    });
    let mut d = Daemon(child);
    let t = Instant::now();
    while !seq.exists() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(10));
    }
    let fd = {
        // SAFETY: plain socket(2)/connect(2) on a sockaddr_un filled below.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
            let mut a: libc::sockaddr_un = std::mem::zeroed();
            a.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (i, b) in s(&seq).bytes().enumerate() {
                a.sun_path[i] = b as libc::c_char;
            }
            let r = libc::connect(
                fd,
                (&a as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
            fd
        }
    };
    let st = wait_exit(&mut d.0);
    // SAFETY: `fd` is the socket opened above, closed once.
    unsafe { libc::close(fd) };
    let m = log_text(&log);
    assert_eq!(st.code(), Some(1), "{m}");
    assert!(m.contains("not a listening unix stream socket"), "{m}");
    drop(_listener);
}

/// SIGHUP (the terminal of a foreground daemon closing) stops it like
/// SIGTERM: exit 0 after a final commit of what was never committed.
#[test]
fn sighup_stops_gracefully_with_a_final_commit() {
    let c = clone();
    let mut cmd = c.command(&["--no-hydration", "--commit-interval", "0"], &[]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut d = Daemon::adopt(cmd.spawn().unwrap(), &c.sock);
    let mut cl = Client::connect(&c.sock);
    // Whole regions, no flush, no periodic commit: only the final commit records them.
    assert_eq!(cl.write(0, &vec![1; 2 * REGION]), 0);
    drop(cl);
    let o = run(&["dump", "--dest", s(&c.dst)]);
    assert!(text(&o).contains("hydrated: 0/128"), "{}", text(&o));
    signal(d.pid(), libc::SIGHUP);
    let st = wait_exit(&mut d.0);
    assert!(st.success(), "SIGHUP: {st:?}");
    let o = run(&["dump", "--dest", s(&c.dst)]);
    assert!(text(&o).contains("hydrated: 2/128"), "{}", text(&o));
    let left: Vec<_> = std::fs::read_dir(&c.run).unwrap().collect();
    assert!(left.is_empty(), "the live map outlived a clean stop");
}

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/systemd");

/// `KEY=value` lines of `section` of a unit file (comments skipped), in order.
fn unit_keys(unit: &str, section: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(UNITS).join(unit)).unwrap();
    let mut cur = String::new();
    let mut v = Vec::new();
    for l in text.lines().map(str::trim) {
        if l.starts_with('[') {
            cur = l.to_string();
        } else if cur == format!("[{section}]") && !l.starts_with('#') {
            if let Some((k, val)) = l.split_once('=') {
                v.push((k.to_string(), val.to_string()));
            }
        }
    }
    v
}

fn unit_key(unit: &str, section: &str, key: &str) -> Option<String> {
    unit_keys(unit, section)
        .into_iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Copies the template pair into `dir` as instance `t`, with ExecStart's
/// binary replaced by the one under test (verify checks it is executable) and
/// `edit` applied to the service; runs `systemd-analyze verify` on both.
/// Returns its success and everything it said (it warns about unknown keys
/// and bad values but still exits 0, so any output counts as a failure).
fn verify_units(dir: &Path, edit: impl Fn(String) -> String) -> (bool, String) {
    let service = std::fs::read_to_string(Path::new(UNITS).join("vhost-clone@.service")).unwrap();
    let service = edit(service.replace("/usr/bin/vhost-clone", BIN));
    std::fs::write(dir.join("vhost-clone@t.service"), service).unwrap();
    std::fs::copy(
        Path::new(UNITS).join("vhost-clone@.socket"),
        dir.join("vhost-clone@t.socket"),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(["./vhost-clone@t.service", "./vhost-clone@t.socket"])
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let said = text(&o);
    (o.status.success() && said.trim().is_empty(), said)
}

/// The shipped units pass `systemd-analyze verify` without a word, and the
/// check is real: a misspelt key, a bad value or a missing binary fails it.
#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, said) = verify_units(dir.path(), |s| s);
    assert!(ok, "systemd-analyze verify: {said}");
    for (what, from, to) in [
        (
            "a misspelt key",
            "ProtectSystem=strict",
            "ProtectSystm=strict",
        ),
        ("a bad value", "Type=notify", "Type=notifyy"),
        ("a missing binary", BIN, "/nonexistent/vhost-clone"),
    ] {
        let (ok, _) = verify_units(dir.path(), |s| s.replace(from, to));
        assert!(!ok, "verify accepted {what}");
    }
}

/// The restart rule: the live region map must outlive every stop and restart
/// of the unit (same boot), or a crash loses acknowledged writes. So
/// --runtime-dir is the unit's RuntimeDirectory, preserved; no private /dev
/// (a fresh /dev/shm) or /tmp holds it; no DynamicUser/RemoveIPC wipes it.
#[test]
fn the_service_keeps_the_live_map_across_restarts() {
    let svc = "vhost-clone@.service";
    let get = |k| unit_key(svc, "Service", k);
    let exec = get("ExecStart").unwrap();
    let words: Vec<&str> = exec.split_whitespace().collect();
    let rt = words
        .iter()
        .position(|w| *w == "--runtime-dir")
        .map(|i| words[i + 1])
        .expect("ExecStart sets --runtime-dir");
    let dirs = get("RuntimeDirectory").expect("RuntimeDirectory=");
    assert!(
        dirs.split_whitespace().any(|d| format!("/run/{d}") == rt),
        "--runtime-dir {rt} is not the unit's RuntimeDirectory={dirs}"
    );
    assert_eq!(get("RuntimeDirectoryPreserve").as_deref(), Some("yes"));
    for (k, bad) in [
        ("PrivateDevices", "yes"),
        ("DynamicUser", "yes"),
        ("RemoveIPC", "yes"),
    ] {
        assert_ne!(get(k).as_deref(), Some(bad), "{k}={bad}");
    }
    for k in [
        "Type",
        "NotifyAccess",
        "WatchdogSec",
        "Restart",
        "TimeoutStopSec",
    ] {
        assert!(get(k).is_some(), "{k}= missing");
    }
    assert_eq!(get("Type").as_deref(), Some("notify"));
    assert_eq!(get("NotifyAccess").as_deref(), Some("main"));
}

/// systemd's ExecStart expansion, as far as the shipped unit uses it:
/// `${VAR}` is one word, a word `$VAR` splits the value on white space, `%i`
/// is the instance.
fn expand_exec_start(line: &str, env: &[(String, String)], instance: &str) -> Vec<String> {
    let var = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("${k} is not set by the example configuration"))
    };
    let mut out = Vec::new();
    for w in line.replace("%i", instance).split_whitespace() {
        if let Some(k) = w.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
            out.push(var(k));
        } else if let Some(k) = w.strip_prefix('$') {
            out.extend(var(k).split_whitespace().map(String::from));
        } else {
            assert!(!w.contains('$') && !w.contains('%'), "unhandled: {w}");
            out.push(w.to_string());
        }
    }
    out
}

/// The documented unit, run: the service's ExecStart with the example
/// configuration (its paths moved under a temporary root), on the socket of
/// the socket unit passed by systemd-socket-activate, with a fake notify
/// socket; a vhost-user client writes and reads, `status` answers on the
/// unit's control socket, SIGTERM stops it cleanly.
#[test]
fn the_units_exec_start_serves_with_the_example_configuration() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let moved = |p: &str| {
        p.replace("/var/lib/vhost-clone", &format!("{}/state", r.display()))
            .replace("/run/vhost-clone", &format!("{}/run", r.display()))
            .replace("/usr/bin/vhost-clone", BIN)
    };
    let instance = "vm1";
    let conf = std::fs::read_to_string(Path::new(UNITS).join("example.conf")).unwrap();
    let env: Vec<(String, String)> = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), moved(&v.replace("NAME", instance))))
        .collect();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
    let (src, dst) = (PathBuf::from(get("SOURCE")), PathBuf::from(get("DEST")));
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 241) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    // What systemd does for the units: the RuntimeDirectory, the socket.
    let rt = unit_key("vhost-clone@.service", "Service", "RuntimeDirectory").unwrap();
    let rt = PathBuf::from(moved(&format!("/run/{}", rt.replace("%i", instance))));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&rt)
        .unwrap();
    let listen = unit_key("vhost-clone@.socket", "Socket", "ListenStream").unwrap();
    let sock = PathBuf::from(moved(&listen.replace("%i", instance)));
    let fdname = unit_key("vhost-clone@.socket", "Socket", "FileDescriptorName").unwrap();
    let exec = unit_key("vhost-clone@.service", "Service", "ExecStart").unwrap();
    let argv: Vec<String> = expand_exec_start(&exec, &env, instance)
        .iter()
        .map(|w| moved(w))
        .collect();
    let ctl = argv
        .iter()
        .position(|w| w == "--control-socket")
        .map(|i| PathBuf::from(&argv[i + 1]))
        .expect("the unit names the control socket");

    let n = Notify::bind(&r.join("notify"));
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", s(&sock), &format!("--fdname={fdname}")])
        .arg(format!("--setenv=NOTIFY_SOCKET={}", s(&n.path)))
        .arg("--")
        .args(&argv);
    let (child, log) = spawn(cmd);
    let d = Daemon::adopt(child, &sock);
    let mut cl = Client::connect(&sock);
    n.wait_line("READY=1");
    let w: Vec<u8> = vec![0xc3; REGION];
    assert_eq!(cl.write(3 * REGION as u64, &w), 0);
    assert_eq!(cl.flush(), 0);
    assert_eq!(cl.read(0, REGION), (0, data[..REGION].to_vec()));
    assert_eq!(cl.read(3 * REGION as u64, REGION), (0, w));
    drop(cl);
    let st = status_json(&ctl);
    assert_eq!(st["regions"], 128, "{st}");
    assert!(d.terminate().success(), "{}", log_text(&log));
    let left: Vec<_> = std::fs::read_dir(&rt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left in the runtime directory: {left:?}");
}
