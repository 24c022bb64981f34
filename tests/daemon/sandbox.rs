//! `serve --sandbox`: every thread of a serving daemon runs under a seccomp filter
//! (and the daemon still serves, hydrates, commits, stops and restarts cleanly),
//! `--sandbox none` runs unfiltered, and a refused system call is named on stderr
//! before the process exits with 159.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::daemon::*;

const SIZE: u64 = 16 << 20;

type Clone = CloneFiles;

fn clone() -> Clone {
    clone_files(SIZE, |i| (i % 251) as u8 | 1)
}

fn serve_cmd(c: &Clone, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--source",
        c.src.to_str().unwrap(),
        "--dest",
        c.dst.to_str().unwrap(),
        "--runtime-dir",
        c.run.to_str().unwrap(),
        "--num-queues",
        "2",
    ])
    .args(extra);
    cmd
}

/// Asserts every thread of `d` runs under a filter; returns the thread names.
fn assert_all_filtered(d: &Daemon) -> Vec<String> {
    // The sockets exist from start-up on; the main thread installs its filter once
    // the services run, before it accepts a connection.
    let t = Instant::now();
    let mut tasks = seccomp_of_tasks(d.pid());
    while tasks.iter().any(|t| t.1 != 2) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
        tasks = seccomp_of_tasks(d.pid());
    }
    for (name, mode, filters) in &tasks {
        assert!(
            *mode == 2 && *filters >= 1,
            "thread {name}: Seccomp {mode}, Seccomp_filters {filters}: {tasks:?}"
        );
    }
    tasks.into_iter().map(|t| t.0).collect()
}

#[test]
fn every_thread_is_filtered_through_io_hydration_commit_stop_and_restart() {
    let c = clone();
    let d = Daemon::spawn(
        serve_cmd(
            &c,
            &["--hydration-threshold", "1", "--commit-interval", "0.1"],
        ),
        &c.sock,
    );
    let names = assert_all_filtered(&d);
    for t in ["vhost-clone", "signals", "commit", "hydrator", "control"] {
        assert!(names.iter().any(|n| n == t), "no {t} thread: {names:?}");
    }
    {
        let mut cl = Client::connect(&c.sock);
        // The vring workers exist now: they inherited the front's filter.
        let names = assert_all_filtered(&d);
        assert!(names.len() > 5, "{names:?}");
        let data = vec![0x5au8; 65536];
        assert_eq!(cl.write(1 << 20, &data), 0);
        assert_eq!(cl.flush(), 0);
        assert_eq!(cl.read(1 << 20, 65536), (0, data));
        let (r, got) = cl.read(8 << 20, 4096);
        assert_eq!(r, 0);
        assert!(got.iter().all(|&b| b != 0));
        assert_all_filtered(&d);
    }
    // Hydration completes and is committed under the filters; status is served.
    let t = Instant::now();
    loop {
        let s = status_json(&c.ctl);
        if s["complete"] == true {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_all_filtered(&d);
    // A stop and continue (job control, a debugger attaching) restarts the calls it
    // interrupted through restart_syscall.
    // SAFETY: kill only sends signals to our own child's pid.
    unsafe { libc::kill(d.pid() as i32, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    unsafe { libc::kill(d.pid() as i32, libc::SIGCONT) };
    std::thread::sleep(Duration::from_millis(500));
    assert_all_filtered(&d);
    let st = d.terminate();
    assert!(st.success(), "stop under the sandbox: {st:?}");
    assert!(!c.sock.exists() && !c.ctl.exists(), "sockets left behind");
    assert_eq!(
        std::fs::read_dir(&c.run).unwrap().count(),
        0,
        "live map left behind"
    );

    // Restart: again filtered, the write is there.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = serve_cmd(&c, &[]);
    cmd.stderr(log.reopen().unwrap());
    let d = Daemon::adopt(cmd.spawn().unwrap(), &c.sock);
    assert_all_filtered(&d);
    let mut cl = Client::connect(&c.sock);
    assert_eq!(
        cl.read(1 << 20, 512),
        (0, vec![0x5a; 512]),
        "{}",
        std::fs::read_to_string(log.path()).unwrap()
    );
    drop(cl);
    let st = d.terminate();
    assert!(st.success(), "{st:?}");
}

#[test]
fn sandbox_none_runs_unfiltered_and_says_so() {
    let c = clone();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = serve_cmd(&c, &["--sandbox", "none"]);
    cmd.stderr(log.reopen().unwrap());
    let d = Daemon::adopt(cmd.spawn().unwrap(), &c.sock);
    let tasks = seccomp_of_tasks(d.pid());
    assert!(tasks.iter().all(|t| t.1 == 0), "{tasks:?}");
    assert!(d.terminate().success());
    let err = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        err.contains("WARN") && err.contains("--sandbox none"),
        "{err}"
    );
}

/// Runs a daemon whose `kind` thread makes a refused system call; returns its exit
/// code and stderr.
fn refused(c: &Clone, kind: &str) -> (Option<i32>, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = serve_cmd(c, &[])
        .env("VHOST_CLONE_TEST_REFUSE", kind)
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), std::fs::read_to_string(log.path()).unwrap())
}

#[test]
fn a_refused_syscall_is_named_before_the_process_exits() {
    let c = clone();
    let getppid = libc::SYS_getppid;
    for (kind, thread) in [
        ("front", "vhost-user"),
        ("main", "vhost-clone"),
        ("committer", "commit"),
        ("hydrator", "hydrator"),
        ("control", "control"),
        ("signals", "signals"),
    ] {
        let (code, err) = refused(&c, kind);
        let want = format!(
            "vhost-clone: seccomp refused syscall getppid ({getppid}) in thread {thread} (filter {kind})"
        );
        assert!(err.contains(&want), "{kind}: want {want:?} in:\n{err}");
        assert_eq!(code, Some(159), "{kind}: {err}");
        cleanup(&c.sock);
        cleanup(&c.ctl);
    }
}

/// A refused daemon dies without removing its sockets.
fn cleanup(p: &Path) {
    let _ = std::fs::remove_file(p);
}

/// What QEMU sends beyond what libblkio does passes the filter: the in-flight area
/// (GET/SET_INFLIGHT_FD: a memfd the daemon creates), the dirty log of a migration
/// (SET_LOG_BASE, LOG_ALL) and a second frontend attached at once (a same-host
/// migration's target). The daemon must still serve, and stop with status 0.
#[test]
fn qemu_messages_for_restarts_and_migration_pass_the_filter() {
    use crate::support::vu::{pattern, Guest, S_OK};
    use std::os::fd::{AsRawFd, FromRawFd};
    use vhost::vhost_user::message::VhostUserVirtioFeatures;
    use vhost::{VhostBackend, VhostUserDirtyLogRegion};

    let c = clone();
    let d = Daemon::spawn(serve_cmd(&c, &["--io-engine", "uring"]), &c.sock);
    let mut g = Guest::connect(&c.sock, 2);
    g.negotiate(VhostUserVirtioFeatures::LOG_ALL.bits());
    g.setup_memory();
    g.share_inflight(2);
    g.setup_queues(2, 128);
    let data = pattern(65536, 9);
    assert_eq!(g.write(0, 2048, &data), S_OK);
    // A migration starts: the log, then LOG_ALL.
    // SAFETY: a NUL-terminated name; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"log".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just created and nothing else owns it.
    let log = unsafe { std::fs::File::from_raw_fd(fd) };
    log.set_len(4096).unwrap();
    let region = VhostUserDirtyLogRegion {
        mmap_size: 4096,
        mmap_offset: 0,
        mmap_handle: log.as_raw_fd(),
    };
    g.fe.set_log_base(0, Some(region)).unwrap();
    g.fe.set_features(g.features | VhostUserVirtioFeatures::LOG_ALL.bits())
        .unwrap();
    assert_eq!(g.read(1, 2048, 65536), (S_OK, data.clone()));
    // The target attaches, the source stops its rings, the target takes over.
    let mut t = Guest::connect(&c.sock, 2);
    t.negotiate(0);
    t.setup_memory();
    t.share_inflight(2);
    t.setup_queues(2, 128);
    g.fe.get_vring_base(0).unwrap();
    g.fe.get_vring_base(1).unwrap();
    assert_eq!(t.read(0, 2048, 65536), (S_OK, data));
    drop(g);
    drop(t);
    assert_all_filtered(&d);
    assert!(d.terminate().success(), "the daemon did not stop cleanly");
}
