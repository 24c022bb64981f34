//! Security (issue 7):
//!
//! * the vhost-user and control sockets are created 0600 whatever the umask, and
//!   an existing path that is not a socket (file, symlink, directory) is refused
//!   and left untouched; a live socket of another process is refused;
//! * another (unprivileged) user cannot use the control socket;
//! * the source is opened read-only (checked in /proc/PID/fdinfo) and never written
//!   (a 0444 source owned by another user, checksummed before and after a
//!   write + full hydration workload);
//! * the daemon runs as an unprivileged user (setpriv to nobody) on files it can
//!   open, and the source need not be writable by it;
//! * guest requests outside the device, through the real vhost-user front and the
//!   clone engine, get IOERR and touch nothing (destination, metadata).

use crate::support::daemon;
use crate::support::sectors;
use crate::support::vu;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::daemon::{s, status_json, text, Client, BIN};
use vhost_clone::disk::CloneDisk;
use vhost_clone::engine::{Engine, EngineConfig};
use vhost_clone::metadata::{Geometry, Metadata};
use vhost_clone::storage::SimDevice;

const SIZE: usize = 4 << 20;
const NOBODY: u32 = 65534;

fn source_bytes() -> Vec<u8> {
    (0..SIZE)
        .map(|i| (i / 512) as u8 ^ (i % 253) as u8)
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have_setpriv() -> bool {
    Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `setpriv` arguments that drop to nobody:nogroup with no supplementary groups,
/// no capabilities and no_new_privs.
fn as_nobody() -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--inh-caps=-all".into(),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

/// Starts `prefix... vhost-clone serve args...` with umask 0 and waits for `sock`.
fn start_daemon(prefix: &[String], args: &[&str], sock: &Path) -> daemon::Daemon {
    let mut cmd = if prefix.is_empty() {
        Command::new(BIN)
    } else {
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..]).arg(BIN);
        c
    };
    cmd.arg("serve").args(args);
    // SAFETY: umask is async-signal-safe and touches only the child's mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    daemon::Daemon::spawn(cmd, sock)
}

fn open_modes(pid: u32, path: &Path) -> Vec<i32> {
    let want = std::fs::canonicalize(path).unwrap();
    let mut modes = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| i32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        modes.push(flags & libc::O_ACCMODE);
    }
    modes
}

fn digest(p: &Path) -> (u32, u64, i64) {
    let m = std::fs::metadata(p).unwrap();
    (
        crc32c::crc32c(&std::fs::read(p).unwrap()),
        m.len(),
        m.mtime(),
    )
}

/// A directory tree usable by nobody: `root` (0755) holds the source (0444, owned
/// by root), `work` (owned by nobody, 0700) the destination, metadata and sockets.
struct Tree {
    _dir: tempfile::TempDir,
    src: PathBuf,
    work: PathBuf,
}

fn tree(work_owner: Option<u32>) -> Tree {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = dir.path().join("golden.img");
    std::fs::write(&src, source_bytes()).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o444)).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700)).unwrap();
    if let Some(uid) = work_owner {
        std::os::unix::fs::chown(&work, Some(uid), Some(uid)).unwrap();
    }
    Tree {
        _dir: dir,
        src,
        work,
    }
}

/// Writes, reads, flushes and waits for full hydration; returns what the guest wrote.
fn write_and_hydrate(sock: &Path, ctl: &Path) -> Vec<u8> {
    let mut c = Client::connect(sock);
    let w: Vec<u8> = (0..8192).map(|i| (i * 13 % 256) as u8).collect();
    assert_eq!(c.write(65536 + 4096, &w), 0); // partial: a copy from the source
    assert_eq!(c.write(3 * 65536, &vec![0x77; 65536]), 0); // whole region
    assert_eq!(c.flush(), 0);
    let t = Instant::now();
    while status_json(ctl)["complete"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "hydration did not complete"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (r, got) = c.read(65536, 65536);
    assert_eq!(r, 0);
    assert_eq!(&got[4096..4096 + 8192], &w[..]);
    assert_eq!(&got[..4096], &source_bytes()[65536..65536 + 4096]);
    w
}

#[test]
fn source_is_opened_read_only_and_never_written() {
    let t = tree(None);
    if is_root() {
        // Owned by another user and 0444: only root's override could write it.
        std::os::unix::fs::chown(&t.src, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let before = digest(&t.src);
    let (dst, sock) = (t.work.join("clone.img"), t.work.join("clone.sock"));
    let ctl = t.work.join("clone.sock.ctl");
    let d = start_daemon(
        &[],
        &[
            "--source",
            s(&t.src),
            "--dest",
            s(&dst),
            "--socket-path",
            s(&sock),
        ],
        &sock,
    );
    let modes = open_modes(d.pid(), &t.src);
    assert!(!modes.is_empty(), "the source is not open");
    assert!(
        modes.iter().all(|&m| m == libc::O_RDONLY),
        "source open modes {modes:?}"
    );
    write_and_hydrate(&sock, &ctl);
    assert!(d.terminate().success());
    assert_eq!(digest(&t.src), before, "the source changed");
    assert_eq!(
        std::fs::metadata(&t.src).unwrap().permissions().mode() & 0o777,
        0o444
    );
}

#[test]
fn sockets_are_private_whatever_the_umask() {
    let t = tree(None);
    let (dst, sock) = (t.work.join("clone.img"), t.work.join("clone.sock"));
    let ctl = t.work.join("clone.sock.ctl");
    let d = start_daemon(
        &[],
        &[
            "--source",
            s(&t.src),
            "--dest",
            s(&dst),
            "--socket-path",
            s(&sock),
        ],
        &sock,
    );
    for p in [&sock, &ctl] {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", p.display());
    }
    // No temporary directory left beside the socket.
    let names: Vec<_> = std::fs::read_dir(&t.work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".vhost-clone")),
        "{names:?}"
    );
    // Another user cannot talk to the control socket.
    if is_root() && have_setpriv() {
        // The work directory must be traversable for the test to mean anything.
        std::fs::set_permissions(&t.work, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut args = as_nobody();
        args.extend([
            BIN.into(),
            "status".into(),
            "--control-socket".into(),
            s(&ctl).into(),
        ]);
        let o = Command::new(&args[0]).args(&args[1..]).output().unwrap();
        assert!(!o.status.success(), "nobody read the status: {}", text(&o));
        assert!(text(&o).contains("ermission denied"), "{}", text(&o));
    }
    // A second daemon on the same socket path refuses (the first is alive).
    let dst2 = t.work.join("other.img");
    let o = Command::new(BIN)
        .args([
            "serve",
            "--source",
            s(&t.src),
            "--dest",
            s(&dst2),
            "--socket-path",
            s(&sock),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("live socket"), "{}", text(&o));
    assert!(d.terminate().success());
}

#[test]
fn existing_non_socket_paths_are_refused_and_untouched() {
    let t = tree(None);
    let dst = t.work.join("clone.img");
    let victim = t.work.join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let link = t.work.join("link.sock");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let file = t.work.join("file.sock");
    std::fs::write(&file, b"not a socket").unwrap();
    let dir = t.work.join("dir.sock");
    std::fs::create_dir(&dir).unwrap();
    let good = t.work.join("good.sock");
    let cases: Vec<(&str, Vec<&str>, &Path)> = vec![
        (
            "regular file as socket",
            vec!["--socket-path", s(&file)],
            &file,
        ),
        ("symlink as socket", vec!["--socket-path", s(&link)], &link),
        ("directory as socket", vec!["--socket-path", s(&dir)], &dir),
        (
            "regular file as control socket",
            vec!["--socket-path", s(&good), "--control-socket", s(&file)],
            &file,
        ),
        (
            "symlink as control socket",
            vec!["--socket-path", s(&good), "--control-socket", s(&link)],
            &link,
        ),
    ];
    for (name, extra, path) in cases {
        let before = std::fs::symlink_metadata(path).unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--source", s(&t.src), "--dest", s(&dst)])
            .args(&extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{name}: serve did not refuse");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let o = child.wait_with_output().unwrap();
        assert!(!o.status.success(), "{name}");
        let msg = text(&o);
        assert!(msg.contains("not a socket"), "{name}: {msg}");
        let after = std::fs::symlink_metadata(path).unwrap();
        assert_eq!(
            (before.ino(), before.mode(), before.mtime()),
            (after.ino(), after.mode(), after.mtime()),
            "{name}"
        );
        assert!(!good.exists(), "{name}: a socket was left behind");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

#[test]
fn runs_as_an_unprivileged_user() {
    if !is_root() || !have_setpriv() {
        eprintln!("SKIPPED: needs root and setpriv to drop to nobody");
        return;
    }
    let t = tree(Some(NOBODY));
    let before = digest(&t.src);
    let (dst, sock) = (t.work.join("clone.img"), t.work.join("clone.sock"));
    let ctl = t.work.join("clone.sock.ctl");
    let d = start_daemon(
        &as_nobody(),
        &[
            "--source",
            s(&t.src),
            "--dest",
            s(&dst),
            "--socket-path",
            s(&sock),
        ],
        &sock,
    );
    // The process really is nobody, with no capabilities.
    let st = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let field = |k: &str| st.lines().find(|l| l.starts_with(k)).unwrap().to_string();
    assert!(
        field("Uid:")
            .split_whitespace()
            .skip(1)
            .all(|u| u == NOBODY.to_string()),
        "{}",
        field("Uid:")
    );
    assert!(
        field("CapEff:").ends_with("0000000000000000"),
        "{}",
        field("CapEff:")
    );
    assert!(field("NoNewPrivs:").ends_with('1'));
    // Everything it created belongs to nobody and is private where it matters.
    for p in [&dst, &t.work.join("clone.img.meta"), &sock, &ctl] {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert_eq!(m.uid(), NOBODY, "{}", p.display());
    }
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    write_and_hydrate(&sock, &ctl);
    assert!(d.terminate().success());
    assert_eq!(digest(&t.src), before);
    let o = Command::new(BIN)
        .args(["check", "--source", s(&t.src), "--dest", s(&dst)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // A source nobody cannot read is refused with a clear message.
    std::fs::set_permissions(&t.src, std::fs::Permissions::from_mode(0o400)).unwrap();
    let mut args = as_nobody();
    args.extend([
        BIN.into(),
        "serve".into(),
        "--source".into(),
        s(&t.src).into(),
        "--dest".into(),
        s(&dst).into(),
    ]);
    let o = Command::new(&args[0]).args(&args[1..]).output().unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("Permission denied") && text(&o).contains("golden.img"),
        "{}",
        text(&o)
    );
}

#[test]
fn guest_requests_outside_the_device_touch_nothing() {
    const REGION: u64 = 64 << 10;
    const DSIZE: u64 = 16 * REGION + 4096; // a short last region
    let src_img = sectors::image(sectors::SOURCE, DSIZE / 512);
    let src = Arc::new(SimDevice::from_image(src_img).into_read_only());
    let dst = Arc::new(SimDevice::from_image(sectors::image(
        sectors::GARBAGE,
        DSIZE / 512,
    )));
    let geo = Geometry::new(DSIZE, REGION).unwrap();
    let mdd = Arc::new(SimDevice::from_image(sectors::formatted_metadata(&geo)));
    let md = Arc::new(Metadata::open(mdd.clone(), Some(&geo)).unwrap());
    let eng =
        Arc::new(Engine::new(Some(src.clone()), dst.clone(), md, EngineConfig::default()).unwrap());
    let srv = vu::Server::start(Arc::new(CloneDisk::new(eng.clone(), false)), vu::opts(1));
    let mut g = vu::Guest::start(&srv.path, 1);
    // Hydrate the last region so both kinds of region border the end.
    assert_eq!(g.write(0, (DSIZE - 4096) / 512, &[5u8; 4096]), vu::S_OK);
    assert_eq!(g.flush(0), vu::S_OK);
    let (dimg, mimg, reads) = (dst.current_image(), mdd.current_image(), src.read_count());
    let cap = DSIZE / 512;
    let base = g.queues[0].data;
    let (h, d, st) = (base, base + 0x1000, base + 0x3f_f000);
    let mut refused = 0;
    let mut check = |g: &mut vu::Guest, t: u32, sector: u64, data: vu::D| {
        g.write_mem(h, &vu::header(t, sector));
        g.write_mem(st, &[0xff]);
        g.submit(0, &[vu::rd(h, 16), data, vu::wr(st, 1)]);
        let status = g.read_mem(st, 1)[0];
        assert!(
            status == vu::S_IOERR || status == vu::S_UNSUPP,
            "type {t} sector {sector} {data:?}: status {status}"
        );
        refused += 1;
    };
    for (sector, len) in [
        (cap, 512u32),
        (cap - 1, 1024),
        (cap - 8, 8192),
        (u64::MAX, 512),
        (u64::MAX / 512, 1024),
        (u64::MAX / 512 + 1, 512),
        (1 << 55, 512),
    ] {
        check(&mut g, vu::VIRTIO_BLK_T_IN, sector, vu::wr(d, len));
        g.write_mem(d, &vec![0xab; len as usize]);
        check(&mut g, vu::VIRTIO_BLK_T_OUT, sector, vu::rd(d, len));
    }
    for seg in [
        vu::segment(cap, 1, 0),
        vu::segment(cap - 1, 2, 0),
        vu::segment(cap - 128, 256, 0),
        vu::segment(u64::MAX, 1, 0),
        vu::segment(u64::MAX / 512, 8, 0),
        vu::segment(0, u32::MAX, 0),
    ] {
        g.write_mem(d, &seg);
        check(&mut g, vu::VIRTIO_BLK_T_DISCARD, 0, vu::rd(d, 16));
        check(&mut g, vu::VIRTIO_BLK_T_WRITE_ZEROES, 0, vu::rd(d, 16));
    }
    // Data buffers outside guest memory, inside the device.
    check(
        &mut g,
        vu::VIRTIO_BLK_T_OUT,
        0,
        vu::rd(vu::MEM_SIZE - 256, 512),
    );
    check(
        &mut g,
        vu::VIRTIO_BLK_T_IN,
        0,
        vu::wr(vu::MEM_SIZE + 4096, 512),
    );
    assert!(dst.current_image() == dimg, "the destination changed");
    assert!(mdd.current_image() == mimg, "the metadata changed");
    assert_eq!(eng.metadata().hydrated_count(), 1);
    // Nothing read beyond: the only source reads allowed are none at all.
    assert_eq!(src.read_count(), reads);
    // Still serving: the last sector reads back.
    let (stt, data) = g.read(0, cap - 8, 4096);
    assert_eq!((stt, data), (vu::S_OK, vec![5u8; 4096]));
    eprintln!("requests outside the device refused: {refused}");
    drop(g);
    srv.stop();
}
