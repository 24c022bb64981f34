//! `serve --standby`, the target daemon of a migration over shared storage: it
//! answers frontends while another daemon serves the clone, holds their
//! requests, and takes the clone over (everything the other daemon committed,
//! and on the same boot everything it acknowledged) once that daemon stops.
//! Two daemons never serve one clone at once; mistakes are refused before
//! anything is bound.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::daemon::*;

const SIZE: u64 = 8 << 20;

struct Pair {
    c: CloneFiles,
    /// The standby's sockets.
    sock_b: PathBuf,
    ctl_b: PathBuf,
}

fn pair() -> Pair {
    let c = clone_files(SIZE, |i| (i % 251) as u8 | 1);
    Pair {
        sock_b: c.dir.path().join("target.sock"),
        ctl_b: c.dir.path().join("target.sock.ctl"),
        c,
    }
}

impl Pair {
    fn args(&self) -> Vec<&str> {
        vec![
            "--source",
            s(&self.c.src),
            "--dest",
            s(&self.c.dst),
            "--runtime-dir",
            s(&self.c.run),
            "--no-hydration",
        ]
    }

    /// The daemon that serves the clone first.
    fn serve(&self) -> Daemon {
        Daemon::start(&self.args(), &self.c.sock)
    }

    /// A standby beside it on other sockets, with `extra` arguments.
    fn standby(&self, extra: &[&str]) -> Daemon {
        let mut args = self.args();
        args.extend_from_slice(&["--standby", "--socket-path", s(&self.sock_b)]);
        args.extend_from_slice(extra);
        Daemon::start(&args, &self.sock_b)
    }

    /// A `serve --standby` that must be refused: its exit code and message.
    fn refused(&self, extra: &[&str]) -> (i32, String) {
        let mut args = vec!["serve", "--standby", "--socket-path", s(&self.sock_b)];
        args.extend_from_slice(extra);
        let refused = run_refused(&args);
        assert!(
            !self.sock_b.exists() && !self.ctl_b.exists(),
            "{args:?} left a socket"
        );
        refused
    }
}

/// Reads `len` bytes at `off` through the standby's socket on a thread of its
/// own (the read waits for the takeover): libblkio negotiates, then reads.
fn read_through(
    sock: &std::path::Path,
    off: u64,
    len: usize,
) -> std::thread::JoinHandle<(i32, Vec<u8>)> {
    let sock = sock.to_path_buf();
    std::thread::spawn(move || Client::connect(&sock).read(off, len))
}

/// `status` of the standby before the takeover: refused, saying why.
fn standby_status(ctl: &std::path::Path) -> String {
    let o = run(&["status", "--control-socket", s(ctl)]);
    assert!(
        !o.status.success(),
        "a standby reported a status: {}",
        text(&o)
    );
    text(&o)
}

/// How the first daemon goes away.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Term,
    Kill,
}

fn takes_over_when_the_owner_stops(stop: Stop) {
    let p = pair();
    let a = p.serve();
    let mut cl = Client::connect(&p.c.sock);
    // Unhydrated regions, not flushed: after a SIGTERM the final commit has
    // them, after a kill -9 the live map of this boot.
    assert_eq!(cl.write(4096, &[0xa1; 4096]), 0);
    assert_eq!(cl.write(3 << 20, &[0xa2; 8192]), 0);
    let b = p.standby(&[]);
    let t0 = Instant::now();
    let msg = standby_status(&p.ctl_b);
    assert!(msg.contains("standby"), "{msg}");
    // The standby negotiates at once and holds the request.
    let held = read_through(&p.sock_b, 4096, 4096);
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        !held.is_finished(),
        "the standby served a request while the clone was in use"
    );
    // The first daemon keeps serving meanwhile.
    assert_eq!(cl.read(3 << 20, 8192), (0, vec![0xa2; 8192]));
    drop(cl);
    match stop {
        Stop::Term => assert!(a.terminate().success()),
        Stop::Kill => {
            // SAFETY: kill only sends a signal to our own child's pid.
            unsafe { libc::kill(a.pid() as i32, libc::SIGKILL) };
            drop(a);
        }
    }
    let (r, data) = held.join().unwrap();
    assert_eq!(r, 0);
    assert!(
        data == vec![0xa1; 4096],
        "{stop:?}: the held read missed the first daemon's write"
    );
    println!(
        "{stop:?}: the held read completed {:?} after the standby started",
        t0.elapsed()
    );
    let mut cl = Client::connect(&p.sock_b);
    assert_eq!(cl.read(3 << 20, 8192), (0, vec![0xa2; 8192]));
    assert_eq!(cl.write(0, &[0xb1; 4096]), 0);
    assert_eq!(cl.flush(), 0);
    let st = status_json(&p.ctl_b);
    assert_eq!(st["mode"], "rw");
    drop(cl);
    assert!(b.terminate().success());
    let o = run(&["check", "--source", s(&p.c.src), "--dest", s(&p.c.dst)]);
    assert!(o.status.success(), "{}", text(&o));
}

/// The owner stops cleanly: the standby takes over with its final commit.
#[test]
fn a_standby_takes_the_clone_over_when_its_daemon_stops() {
    takes_over_when_the_owner_stops(Stop::Term);
}

/// The owner is killed: on the same boot the standby adopts what it
/// acknowledged and never committed, as a restarted daemon would.
#[test]
fn a_standby_takes_the_clone_over_when_its_daemon_is_killed() {
    takes_over_when_the_owner_stops(Stop::Kill);
}

/// A standby stopped before the takeover exits 0 and leaves the request its
/// frontend started unpopped and unanswered (for the frontend to submit again
/// to the next daemon); it changes nothing of the clone, whose daemon keeps
/// serving.
#[test]
fn a_standby_stopped_first_leaves_requests_unanswered_and_changes_nothing() {
    use crate::support::vu;
    let p = pair();
    let a = p.serve();
    let mut cl = Client::connect(&p.c.sock);
    assert_eq!(cl.write(4096, &[0xc1; 4096]), 0);
    assert_eq!(cl.flush(), 0);
    let md = p.c.dst.with_extension("img.meta");
    let md_before = std::fs::read(&md).unwrap();
    let b = p.standby(&[]);
    let mut g = vu::Guest::start(&p.sock_b, 1);
    let (head, _, _) = g.prepare(0, 0, vu::VIRTIO_BLK_T_OUT, 8, &[0xee; 4096], 0);
    g.publish(0, head);
    g.assert_idle(0, 300);
    assert!(b.terminate().success());
    assert_eq!(g.used_idx(0), 0, "the standby answered a request it held");
    assert!(
        !p.sock_b.exists() && !p.ctl_b.exists(),
        "the standby left its sockets"
    );
    assert_eq!(
        std::fs::read(&md).unwrap(),
        md_before,
        "the standby changed the metadata"
    );
    assert_eq!(cl.read(4096, 4096), (0, vec![0xc1; 4096]));
    drop(cl);
    assert!(a.terminate().success());
}

/// A lock released by a restart of the serving daemon is not the standby's to
/// take while no frontend started its queues on the standby (a migration not
/// yet at switch-over): the restart gets the clone back. Once a frontend does,
/// the standby takes the clone over at the next release.
#[test]
fn a_standby_takes_nothing_before_its_frontend_starts() {
    use crate::support::vu;
    let p = pair();
    let a = p.serve();
    status_json(&p.c.ctl); // formatted
    let b = p.standby(&[]);
    // A frontend negotiates with the standby but starts no queue yet.
    let mut g = vu::Guest::connect(&p.sock_b, 1);
    g.negotiate(0);
    assert!(a.terminate().success());
    std::thread::sleep(Duration::from_millis(400));
    let a = p.serve();
    let mut cl = Client::connect(&p.c.sock);
    assert_eq!(cl.write(0, &[0xd1; 4096]), 0);
    drop(cl);
    drop(g);
    // Now a frontend starts its queues on the standby: its request waits for the
    // next release.
    let held = read_through(&p.sock_b, 0, 4096);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!held.is_finished());
    assert!(a.terminate().success());
    assert_eq!(held.join().unwrap(), (0, vec![0xd1; 4096]));
    assert!(b.terminate().success());
}

/// A clone formatted again while the standby waited is not the one its
/// frontends were told about: the takeover is refused (exit 1) and the
/// request it held is never answered.
#[test]
fn a_clone_replaced_while_standing_by_is_refused() {
    use crate::support::vu;
    let p = pair();
    let a = p.serve();
    status_json(&p.c.ctl); // formatted
    let mut b = p.standby(&[]);
    assert!(a.terminate().success());
    let o = run(&[
        "create",
        "--force",
        "--source",
        s(&p.c.src),
        "--dest",
        s(&p.c.dst),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let mut g = vu::Guest::start(&p.sock_b, 1);
    let (head, _, _) = g.prepare(0, 0, vu::VIRTIO_BLK_T_IN, 8, &[], 4096);
    g.publish(0, head);
    let st = b.wait();
    assert_eq!(st.code(), Some(1), "the standby took a replaced clone over");
    assert_eq!(g.used_idx(0), 0);
    assert!(!p.sock_b.exists());
}

/// What a takeover would refuse is refused before anything is bound: a clone
/// that does not exist (or is not reachable here), a blank one, another
/// region size, no source for a clone that is not complete.
#[test]
fn a_standby_refuses_what_a_takeover_would_refuse() {
    let p = pair();
    let src = s(&p.c.src);
    let dst = s(&p.c.dst);
    let (code, msg) = p.refused(&["--source", src, "--dest", dst]);
    assert_eq!(code, 2, "{msg}");
    assert!(
        msg.contains("existing clone") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(
        !p.c.dst.exists(),
        "a refused standby created the destination"
    );
    // A clone the first daemon made.
    let a = p.serve();
    assert!(a.terminate().success());
    let (code, msg) = p.refused(&["--source", src, "--dest", dst, "--region-size", "4K"]);
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("region size"), "{msg}");
    let (code, msg) = p.refused(&["--dest", dst]);
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("no --source"), "{msg}");
    let other = p.c.dir.path().join("elsewhere.img");
    let (code, msg) = p.refused(&[
        "--source",
        src,
        "--dest",
        s(&other),
        "--metadata",
        s(&p.c.dst.with_extension("img.meta")),
    ]);
    assert_eq!(code, 2, "{msg}");
    assert!(
        msg.contains("destination") && msg.contains("does not exist"),
        "{msg}"
    );
    let blank = p.c.dir.path().join("blank.meta");
    std::fs::write(&blank, vec![0u8; 8192]).unwrap();
    let (code, msg) = p.refused(&["--source", src, "--dest", dst, "--metadata", s(&blank)]);
    assert_eq!(code, 2, "{msg}");
    assert!(msg.contains("blank"), "{msg}");
    // A file source of another size (exit 1, as for a normal start).
    let small = p.c.dir.path().join("small.img");
    std::fs::write(&small, vec![1u8; (SIZE / 2) as usize]).unwrap();
    let (code, msg) = p.refused(&["--source", s(&small), "--dest", dst]);
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("device size"), "{msg}");
}

/// Another host's standby cannot adopt the source daemon's live map. So at the
/// switch-over of a migration (QEMU stops the queues while it logs dirty pages)
/// the source daemon commits: a source daemon killed after it still leaves
/// the standby every write its guest saw completed. Simulated with the live
/// map in process memory and no periodic commits.
#[test]
fn a_source_killed_after_the_switch_over_loses_nothing() {
    use crate::support::vu;
    use vhost::VhostBackend;
    const LOG_ALL: u64 = vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits();
    let p = pair();
    // Another host's runtime directory: none the standby could read.
    let mut args = p.args();
    args[5] = "none";
    args.extend_from_slice(&["--commit-interval", "0"]);
    let a = Daemon::start(&args, &p.c.sock);
    let mut g = vu::Guest::connect(&p.c.sock, 1);
    g.negotiate(LOG_ALL);
    g.setup_memory();
    g.setup_queues(1, vu::QUEUE_SIZE);
    g.fe.set_features(g.features | LOG_ALL).unwrap();
    // Unhydrated regions, never flushed by the guest.
    let data = vu::pattern(8192, 7);
    assert_eq!(g.write(0, 2048, &data), vu::S_OK);
    g.fe.get_vring_base(0).unwrap();
    args.extend_from_slice(&["--standby", "--socket-path", s(&p.sock_b)]);
    let b = Daemon::start(&args, &p.sock_b);
    // SAFETY: kill only sends a signal to our own child's pid.
    unsafe { libc::kill(a.pid() as i32, libc::SIGKILL) };
    drop(a);
    drop(g);
    let mut cl = Client::connect(&p.sock_b);
    assert!(
        cl.read(2048 * 512, 8192) == (0, data),
        "the write completed before the switch-over is lost"
    );
    drop(cl);
    assert!(b.terminate().success());
}
