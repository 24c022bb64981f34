//! The `vhost-clone` binary end to end, as an operator runs it: `serve` on real
//! files driven by libblkio (a real vhost-user-blk frontend), `status` and
//! `message` against the running daemon, SIGTERM, `check`, restarts, serving a
//! completed clone without its source, and refusals with clear messages.

use std::mem::MaybeUninit;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

const BIN: &str = env!("CARGO_BIN_EXE_vhost-clone");
const SIZE: usize = 8 << 20;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run vhost-clone")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Files {
    _dir: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    sock: PathBuf,
    ctl: PathBuf,
    src_data: Vec<u8>,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("golden.img");
    let src_data: Vec<u8> = (0..SIZE)
        .map(|i| (i / 4096) as u8 ^ (i % 251) as u8)
        .collect();
    std::fs::write(&src, &src_data).unwrap();
    let dst = dir.path().join("clone.img");
    let sock = dir.path().join("clone.img.sock");
    let ctl = dir.path().join("clone.img.sock.ctl");
    Files {
        _dir: dir,
        src,
        dst,
        sock,
        ctl,
        src_data,
    }
}

struct Daemon(Child);

impl Daemon {
    fn start(args: &[&str], sock: &Path) -> Daemon {
        let child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !sock.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon(child)
    }

    fn terminate(mut self) -> std::process::ExitStatus {
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
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A libblkio connection with one 1 MiB buffer.
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

    fn write(&mut self, off: u64, data: &[u8]) {
        self.mem()[..data.len()].copy_from_slice(data);
        self.q
            .write(off, self.buf, data.len(), 0, ReqFlags::empty());
        assert_eq!(self.wait(), 0, "write at {off}");
    }

    fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        self.q.read(off, self.buf, len, 0, ReqFlags::empty());
        assert_eq!(self.wait(), 0, "read at {off}");
        self.mem()[..len].to_vec()
    }

    fn flush(&mut self) {
        self.q.flush(0, ReqFlags::empty());
        assert_eq!(self.wait(), 0, "flush");
    }
}

fn status_json(ctl: &Path) -> serde_json::Value {
    let o = run(&[
        "status",
        "--json",
        "--control-socket",
        ctl.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn serve_write_flush_sigterm_check_and_restart() {
    let f = files();
    let (src, dst) = (f.src.to_str().unwrap(), f.dst.to_str().unwrap());
    let d = Daemon::start(&["--source", src, "--dest", dst, "--no-hydration"], &f.sock);
    // The socket is private.
    let meta = std::fs::metadata(&f.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&f.ctl).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let mut c = Client::connect(&f.sock);
    assert_eq!(c.read(12288, 8192), f.src_data[12288..20480]);
    let w: Vec<u8> = (0..4096).map(|i| (i * 7) as u8).collect();
    c.write(100 * 1024, &w);
    c.flush();
    let s = status_json(&f.ctl);
    assert_eq!(s["hydrated_regions"], 1);
    assert_eq!(s["mode"], "rw");
    assert_eq!(s["hydration_enabled"], false);
    assert!(s["commits"].as_u64().unwrap() >= 1);
    assert!(s["io"]["flushes"].as_u64().unwrap() >= 1);
    drop(c);

    let status = d.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert!(!f.sock.exists() && !f.ctl.exists(), "sockets left behind");
    let o = run(&["check", "--source", src, "--dest", dst]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("hydrated 1 of 128 regions"),
        "{}",
        text(&o)
    );
    // The source was never written.
    assert!(std::fs::read(&f.src).unwrap() == f.src_data);

    // Restart on the same files: the write is there.
    let d = Daemon::start(&["--source", src, "--dest", dst], &f.sock);
    let mut c = Client::connect(&f.sock);
    assert_eq!(c.read(100 * 1024, 4096), w);
    // Background hydration completes; status says so.
    let t = Instant::now();
    while status_json(&f.ctl)["complete"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "hydration did not complete"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(c);
    assert!(d.terminate().success());
    // The destination is the source with the write applied.
    let mut want = f.src_data.clone();
    want[100 * 1024..100 * 1024 + 4096].copy_from_slice(&w);
    assert!(std::fs::read(&f.dst).unwrap() == want);

    // A complete clone runs without its source.
    let d = Daemon::start(&["--dest", dst], &f.sock);
    let mut c = Client::connect(&f.sock);
    assert_eq!(c.read(0, 4096), want[..4096]);
    assert_eq!(status_json(&f.ctl)["source_attached"], false);
    drop(c);
    assert!(d.terminate().success());
}

#[test]
fn messages_change_hydration_and_bad_ones_fail() {
    let f = files();
    let (src, dst) = (f.src.to_str().unwrap(), f.dst.to_str().unwrap());
    let d = Daemon::start(
        &[
            "--source",
            src,
            "--dest",
            dst,
            "--no-hydration",
            "--region-size",
            "4K",
        ],
        &f.sock,
    );
    let ctl = f.ctl.to_str().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status_json(&f.ctl)["hydrated_regions"], 0);
    let o = run(&["message", "-c", ctl, "hydration-batch-size", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["message", "-c", ctl, "enable-hydration"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = Instant::now();
    while status_json(&f.ctl)["hydrated_regions"] == 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = status_json(&f.ctl);
    assert_eq!(s["hydration_batch_size"], 1);
    for bad in [&["frobnicate"][..], &["hydration-threshold", "lots"]] {
        let mut args = vec!["message", "-c", ctl];
        args.extend_from_slice(bad);
        let o = run(&args);
        assert!(!o.status.success());
        assert!(text(&o).contains("error:"), "{}", text(&o));
    }
    let o = run(&["status", "--watch", "-c", ctl, "--interval", "0.1"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("hydrated 2048/2048"),
        "{}",
        text(&o)
    );
    assert!(d.terminate().success());
}

#[test]
fn refusals_are_clear() {
    let f = files();
    let (src, dst) = (f.src.to_str().unwrap(), f.dst.to_str().unwrap());
    // A new clone without a source.
    let o = run(&["serve", "--dest", dst]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--source is needed"), "{}", text(&o));
    // An incomplete clone without its source.
    let o = run(&["create", "--source", src, "--dest", dst]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["serve", "--dest", dst]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("the source is needed until hydration completes"),
        "{}",
        text(&o)
    );
    // A region size that does not match the metadata.
    let o = run(&[
        "serve",
        "--source",
        src,
        "--dest",
        dst,
        "--region-size",
        "128K",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("region size mismatch"), "{}", text(&o));
    // An existing file where the socket should go.
    std::fs::write(&f.sock, b"not a socket").unwrap();
    let o = run(&["serve", "--source", src, "--dest", dst]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not a socket"), "{}", text(&o));
    assert_eq!(std::fs::read(&f.sock).unwrap(), b"not a socket");
    // Capabilities for QEMU.
    let o = run(&["serve", "--print-capabilities"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["type"], "block");
}
