//! The daemon's process lifecycle through the binary: one daemon per clone,
//! operator mistakes refused before any byte changes, refused starts leave
//! nothing behind, kill -9 loses no acknowledged write, exit codes.

use crate::support::vu;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::support::daemon::*;

const SIZE: u64 = 8 << 20;

struct Clone {
    dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    md: PathBuf,
    sock: PathBuf,
    ctl: PathBuf,
}

fn clone() -> Clone {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("golden.img");
    let data: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&src, data).unwrap();
    let dst = dir.path().join("clone.img");
    Clone {
        md: dir.path().join("clone.img.meta"),
        sock: dir.path().join("clone.img.sock"),
        ctl: dir.path().join("clone.img.sock.ctl"),
        src,
        dst,
        dir,
    }
}

impl Clone {
    fn serve(&self, extra: &[&str]) -> Daemon {
        let mut args = vec!["--source", s(&self.src), "--dest", s(&self.dst)];
        args.extend_from_slice(extra);
        Daemon::start(&args, &self.sock)
    }

    /// `serve` that must be refused: returns its exit code and message, after
    /// checking it exited promptly.
    fn refused(&self, args: &[&str]) -> (i32, String) {
        run_refused(&[&["serve"], args].concat())
    }

    /// Serves the clone, writes `data` at `off`, flushes, and stops cleanly.
    fn write_and_stop(&self, off: u64, data: &[u8]) {
        let d = self.serve(&["--no-hydration"]);
        let mut cl = Client::connect(&self.sock);
        assert_eq!(cl.write(off, data), 0);
        assert_eq!(cl.flush(), 0);
        drop(cl);
        assert!(d.terminate().success());
    }

    /// `vhost-clone create` of this clone, with `--force` or not.
    fn create(&self, force: bool) -> std::process::Output {
        let mut args = vec!["create", "--source", s(&self.src), "--dest", s(&self.dst)];
        if force {
            args.push("--force");
        }
        run(&args)
    }

    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// A second daemon on the same clone (other sockets) is refused, naming the
/// first one's pid; it changes no byte of the metadata and removes nothing of
/// the first daemon's; the first keeps serving. `create --force` on the
/// running clone is refused too.
#[test]
fn a_second_daemon_on_one_clone_is_refused_and_changes_nothing() {
    let c = clone();
    let d = c.serve(&["--no-hydration"]);
    let mut cl = Client::connect(&c.sock);
    assert_eq!(cl.write(4096, &[7u8; 4096]), 0);
    assert_eq!(cl.flush(), 0);
    let md_before = bytes(&c.md);
    let pid = d.pid().to_string();

    // Other sockets, same stores.
    let other = c.dir.path().join("other.sock");
    let (code, msg) = c.refused(&[
        "--source",
        s(&c.src),
        "--dest",
        s(&c.dst),
        "--socket-path",
        s(&other),
        "--no-hydration",
    ]);
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("in use") && msg.contains(&pid), "{msg}");
    assert!(!other.exists(), "the refused daemon left its socket");
    // The same default paths: the first daemon's sockets survive.
    let (code, msg) = c.refused(&["--source", s(&c.src), "--dest", s(&c.dst)]);
    assert_eq!(code, 1, "{msg}");
    assert!(
        c.sock.exists() && c.ctl.exists(),
        "a refused start removed the live sockets"
    );
    // Only the metadata (another socket pair would not even get that far).
    let (code, msg) = c.refused(&[
        "--dest",
        s(&c.dir.path().join("elsewhere.img")),
        "--metadata",
        s(&c.md),
        "--socket-path",
        s(&other),
    ]);
    assert_eq!(code, 1, "{msg}");
    assert!(!c.dir.path().join("elsewhere.img").exists());
    // create --force must not reformat a running clone.
    let o = c.create(true);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains(&pid), "{}", text(&o));
    assert_eq!(
        bytes(&c.md),
        md_before,
        "a refused start changed the metadata"
    );
    // The first daemon still serves, and its data is intact.
    let (r, data) = cl.read(4096, 4096);
    assert_eq!((r, data), (0, vec![7u8; 4096]));
    assert_eq!(status_json(&c.ctl)["mode"], "rw");
    drop(cl);
    assert!(d.terminate().success());
}

/// Two of --source, --dest and --metadata naming one file (directly, through
/// a symlink or a hard link) is a usage error that writes nothing.
#[test]
fn paths_naming_one_file_are_refused() {
    let c = clone();
    let src_before = bytes(&c.src);
    let link = c.dir.path().join("link.img");
    std::os::unix::fs::symlink(&c.src, &link).unwrap();
    let hard = c.dir.path().join("hard.img");
    std::fs::hard_link(&c.src, &hard).unwrap();
    let before = c.files();
    for args in [
        vec!["--source", s(&c.src), "--dest", s(&c.src)],
        vec!["--source", s(&c.src), "--dest", s(&link)],
        vec!["--source", s(&c.src), "--dest", s(&hard)],
        vec![
            "--source",
            s(&c.src),
            "--dest",
            s(&c.dst),
            "--metadata",
            s(&c.src),
        ],
        // Destination and metadata the same, neither existing yet.
        vec![
            "--source",
            s(&c.src),
            "--dest",
            s(&c.dst),
            "--metadata",
            s(&c.dst),
        ],
    ] {
        let (code, msg) = c.refused(&args);
        assert_eq!(code, 2, "{args:?}: {msg}");
        assert!(msg.contains("same file"), "{args:?}: {msg}");
        assert_eq!(c.files(), before, "{args:?} left files behind");
    }
    assert_eq!(bytes(&c.src), src_before, "the source changed");
}

/// Metadata whose superblocks were destroyed is not silently reformatted; an
/// all-zero file is new; `create --force` reformats.
#[test]
fn damaged_metadata_is_refused_and_only_create_force_reformats_it() {
    let c = clone();
    c.write_and_stop(0, &[9u8; 4096]);
    // Zero both superblock slots (the first 8 KiB).
    let mut md = bytes(&c.md);
    md[..8192].fill(0);
    std::fs::write(&c.md, &md).unwrap();
    let (code, msg) = c.refused(&["--source", s(&c.src), "--dest", s(&c.dst)]);
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("metadata"), "{msg}");
    assert_eq!(bytes(&c.md), md, "a refused start changed the metadata");
    let o = c.create(false);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert_eq!(bytes(&c.md), md);
    let o = c.create(true);
    assert!(o.status.success(), "{}", text(&o));
    // An all-zero metadata file is a new clone.
    let len = std::fs::metadata(&c.md).unwrap().len();
    std::fs::write(&c.md, vec![0u8; len as usize]).unwrap();
    let d = c.serve(&["--no-hydration"]);
    assert_eq!(status_json(&c.ctl)["hydrated_regions"], 0);
    assert!(d.terminate().success());
}

/// A refused start leaves no file it created: a live socket in the way, or
/// metadata recording hydrated regions over a missing destination.
#[test]
fn a_refused_start_leaves_no_new_file() {
    let c = clone();
    // Somebody else's live socket at the control path.
    let _foreign = std::os::unix::net::UnixListener::bind(&c.ctl).unwrap();
    let before = c.files();
    let (code, msg) = c.refused(&["--source", s(&c.src), "--dest", s(&c.dst)]);
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("live socket"), "{msg}");
    assert_eq!(c.files(), before, "files left behind: {msg}");
    assert!(c.ctl.exists(), "the live socket was removed");
    drop(_foreign);
    std::fs::remove_file(&c.ctl).unwrap();

    // Metadata records hydrated regions, the destination is gone.
    c.write_and_stop(0, &[1u8; 65536]);
    std::fs::remove_file(&c.dst).unwrap();
    let md = bytes(&c.md);
    let (code, msg) = c.refused(&["--source", s(&c.src), "--dest", s(&c.dst)]);
    assert_eq!(code, 1, "{msg}");
    assert!(msg.contains("missing"), "{msg}");
    assert!(!c.dst.exists(), "the refused start created the destination");
    assert_eq!(bytes(&c.md), md);
    assert!(!c.sock.exists() && !c.ctl.exists());
}

/// A clone whose only guest data is in partly written regions (a 4 KiB write
/// into a 64 KiB region: no region hydrated) is refused over a missing
/// destination too, rather than served from a new, empty one.
#[test]
fn partly_written_regions_over_a_missing_destination_are_refused() {
    let c = clone();
    c.write_and_stop(8192, &[1u8; 4096]);
    std::fs::remove_file(&c.dst).unwrap();
    let md = bytes(&c.md);
    let (code, msg) = c.refused(&["--source", s(&c.src), "--dest", s(&c.dst)]);
    assert_eq!(code, 1, "{msg}");
    assert!(
        msg.contains("0 hydrated and 1 partly written regions") && msg.contains("missing"),
        "{msg}"
    );
    assert!(!c.dst.exists(), "the refused start created the destination");
    assert_eq!(bytes(&c.md), md);
}

/// The destination and metadata a daemon creates are private (0600).
#[test]
fn created_files_are_private() {
    let c = clone();
    let d = c.serve(&["--no-hydration"]);
    for p in [&c.dst, &c.md] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    assert!(d.terminate().success());
}

/// `--socket-group`/`--socket-mode` apply to the vhost-user socket (the one
/// QEMU connects to) and never to the control socket, which stays 0600.
#[test]
fn socket_group_and_mode_apply_to_the_vhost_user_socket_only() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid and getegid cannot fail and take no pointers.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // As root any group will do (nogroup); otherwise the process's own.
    let gid = if euid == 0 { 65534 } else { egid };
    let c = clone();
    let g = gid.to_string();
    for (extra, want_mode) in [
        (vec![], 0o600),
        (vec!["--socket-group", g.as_str()], 0o660),
        (
            vec!["--socket-group", g.as_str(), "--socket-mode", "0640"],
            0o640,
        ),
        (vec!["--socket-mode", "0620"], 0o620),
    ] {
        let mut args = vec!["--no-hydration"];
        args.extend_from_slice(&extra);
        let d = c.serve(&args);
        let sock = std::fs::metadata(&c.sock).unwrap();
        assert_eq!(sock.mode() & 0o7777, want_mode, "{extra:?}");
        let want_gid = if extra.contains(&"--socket-group") {
            gid
        } else {
            egid
        };
        assert_eq!(sock.gid(), want_gid, "{extra:?}");
        let ctl = std::fs::metadata(&c.ctl).unwrap();
        assert_eq!((ctl.mode() & 0o7777, ctl.gid()), (0o600, egid), "{extra:?}");
        assert!(d.terminate().success());
    }
    // By name too: root's group exists everywhere (as root: any group may be given).
    if euid == 0 {
        let d = c.serve(&["--no-hydration", "--socket-group", "root"]);
        assert_eq!(std::fs::metadata(&c.sock).unwrap().gid(), 0);
        assert!(d.terminate().success());
    }
}

/// kill -9 at random moments, then a restart on the same files: every write
/// the client saw completed reads back, flushed or not, with periodic commits
/// off or on and hydration off or on (design rule 7).
#[test]
fn kill_9_and_restart_loses_no_acknowledged_write() {
    let c = clone();
    let iters: u64 = std::env::var("VHOST_CLONE_KILL_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    // (offset, data) of every acknowledged write; reads must see the last one.
    let mut model: Vec<Option<u8>> = vec![None; (SIZE / 4096) as usize];
    let mut checked = 0u64;
    let mut writes = 0u64;
    for i in 0..iters {
        let interval = ["0", "1", "30"][(i % 3) as usize];
        let mut extra = vec!["--commit-interval", interval];
        if i % 2 == 0 {
            extra.push("--no-hydration");
        }
        let d = c.serve(&extra);
        let mut cl = Client::connect(&c.sock);
        for (b, v) in model.iter().enumerate() {
            if let Some(v) = v {
                let (r, data) = cl.read(b as u64 * 4096, 4096);
                assert_eq!(r, 0);
                assert!(
                    data.iter().all(|x| x == v),
                    "iteration {i}: block {b} lost its acknowledged write {v} after kill -9"
                );
                checked += 1;
            }
        }
        // 4 KiB writes into (mostly) unhydrated regions, no flush.
        for k in 0..24u64 {
            let b = (i * 37 + k * 11) % (SIZE / 4096);
            let v = (i * 24 + k) as u8 | 0x80;
            assert_eq!(cl.write(b * 4096, &[v; 4096]), 0);
            model[b as usize] = Some(v);
            writes += 1;
        }
        // SAFETY: kill only sends a signal to our own child's pid.
        unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
        drop(cl);
        drop(d);
        // The dead daemon's sockets stay behind (the next one replaces them); remove
        // them here so that `serve` below waits for the new daemon's socket.
        let _ = std::fs::remove_file(&c.sock);
    }
    let d = c.serve(&[]);
    let mut cl = Client::connect(&c.sock);
    for (b, v) in model.iter().enumerate() {
        if let Some(v) = v {
            let (_, data) = cl.read(b as u64 * 4096, 4096);
            assert!(
                data.iter().all(|x| x == v),
                "block {b} lost after the last kill"
            );
            checked += 1;
        }
    }
    drop(cl);
    assert!(d.terminate().success());
    let o = run(&["check", "--source", s(&c.src), "--dest", s(&c.dst)]);
    assert!(o.status.success(), "{}", text(&o));
    println!("kill -9 and restart: {iters} kills, {writes} acknowledged writes, {checked} block reads verified, 0 lost");
}

/// The guest's write-cache choice survives a kill -9 right after it is made
/// (QEMU does not send it again after reconnecting).
#[test]
fn the_write_cache_choice_survives_kill_9() {
    let c = clone();
    let d = c.serve(&["--commit-interval", "0", "--no-hydration"]);
    let mut g = vu::Guest::start(&c.sock, 1);
    let wce = |g: &mut vu::Guest| g.get_config(32, 1)[0];
    assert_eq!(wce(&mut g), 1, "write-back by default");
    g.set_wce(false);
    assert_eq!(wce(&mut g), 0);
    // SAFETY: kill only sends a signal to our own child's pid.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    drop(g);
    drop(d);
    std::fs::remove_file(&c.sock).unwrap();
    let d = c.serve(&["--no-hydration"]);
    let mut g = vu::Guest::start(&c.sock, 1);
    assert_eq!(wce(&mut g), 0, "the write-through choice was lost");
    drop(g);
    assert!(d.terminate().success());
}
