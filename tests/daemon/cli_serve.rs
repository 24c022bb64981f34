//! The `vhost-clone` binary end to end, as an operator runs it: `serve` on real
//! files driven by libblkio (a real vhost-user-blk frontend), `status` and
//! `message` against the running daemon, SIGTERM, `check`, restarts, serving a
//! completed clone without its source, and refusals with clear messages.

use crate::support::daemon;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use crate::support::daemon::{run, status_json, text, Client, Daemon};

const SIZE: usize = 8 << 20;

type Files = daemon::CloneFiles;

fn files() -> Files {
    daemon::clone_files(SIZE as u64, |i| (i / 4096) as u8 ^ (i % 251) as u8)
}

/// Waits (at most 30 s) until status says every region is hydrated.
fn wait_complete(f: &Files) {
    let t = Instant::now();
    while status_json(&f.ctl)["complete"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "hydration did not complete"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
    assert_eq!(c.read(12288, 8192).1, f.src_data[12288..20480]);
    let w: Vec<u8> = (0..4096).map(|i| (i * 7) as u8).collect();
    assert_eq!(c.write(100 * 1024, &w), 0);
    assert_eq!(c.flush(), 0);
    let s = status_json(&f.ctl);
    // 4 KiB of a 64 KiB region: one sub-block written, the region partly written.
    assert_eq!(s["hydrated_regions"], 0);
    assert_eq!(s["partly_written_regions"], 1);
    assert_eq!(s["io"]["partial_writes"], 1);
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
        text(&o).contains("hydrated 0 of 128 regions")
            && text(&o).contains("partly written: 1 regions"),
        "{}",
        text(&o)
    );
    // The source was never written.
    assert!(std::fs::read(&f.src).unwrap() == f.src_data);

    // Restart on the same files: the write is there.
    let d = Daemon::start(&["--source", src, "--dest", dst], &f.sock);
    let mut c = Client::connect(&f.sock);
    assert_eq!(c.read(100 * 1024, 4096).1, w);
    // Background hydration completes; status says so.
    wait_complete(&f);
    drop(c);
    assert!(d.terminate().success());
    // The destination is the source with the write applied.
    let mut want = f.src_data.clone();
    want[100 * 1024..100 * 1024 + 4096].copy_from_slice(&w);
    assert!(std::fs::read(&f.dst).unwrap() == want);

    // A complete clone runs without its source.
    let d = Daemon::start(&["--dest", dst], &f.sock);
    let mut c = Client::connect(&f.sock);
    assert_eq!(c.read(0, 4096).1, want[..4096]);
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

#[test]
fn survives_losing_its_stderr() {
    // A daemon started from a terminal or a log pipe that goes away must go on
    // serving (it used to panic on its next log line).
    let f = files();
    let (src, dst) = (f.src.to_str().unwrap(), f.dst.to_str().unwrap());
    let mut child = std::process::Command::new(daemon::BIN)
        .args([
            "serve",
            "--source",
            src,
            "--dest",
            dst,
            "--region-size",
            "4K",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take()); // the reader goes away
    let d = Daemon::adopt(child, &f.sock);
    let mut c = Client::connect(&f.sock);
    assert_eq!(c.write(4096, &[7u8; 4096]), 0);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.read(4096, 4096).1, vec![7u8; 4096]);
    drop(c);
    let st = d.terminate();
    assert!(st.success(), "exit status {st:?}");
}

/// A guest request that fails in the backend is answered with IOERR and logged with
/// its cause, for both queue engines. Here the source shrinks under the daemon, so
/// reads of unhydrated regions past its new end fail.
#[test]
fn failed_guest_requests_are_logged() {
    for engine in ["sync", "uring"] {
        let f = files();
        let log_path = f.dst.with_extension("log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = std::process::Command::new(daemon::BIN);
        cmd.args([
            "serve",
            "--source",
            f.src.to_str().unwrap(),
            "--dest",
            f.dst.to_str().unwrap(),
            "--no-hydration",
            "--io-engine",
            engine,
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log);
        // Not Daemon::spawn: it sends stderr to a file of its own.
        let d = Daemon::adopt(cmd.spawn().unwrap(), &f.sock);
        let mut c = Client::connect(&f.sock);
        let (r, _) = c.read(0, 4096);
        assert_eq!(r, 0);
        // Cut the source to 1 MiB: reads beyond that find its end.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f.src)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let (r, _) = c.read(4 << 20, 4096);
        assert_eq!(r, -libc::EIO, "{engine}: read past the source's end");
        let (r, data) = c.read(0, 4096);
        assert_eq!(
            (r, &data[..]),
            (0, &f.src_data[..4096]),
            "{engine}: still serving"
        );
        drop(c);
        assert!(d.terminate().success());
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(
            log.contains("guest request failed")
                && log.contains("op=\"read\"")
                && log.contains("offset=4194304"),
            "{engine}: no useful log line for the failed read:\n{log}"
        );
        let line = log.lines().find(|l| l.contains("guest request failed"));
        eprintln!("{engine}: {}", line.unwrap_or_default());
    }
}

/// `--partial-regions 0` makes a version 1 store, whose partial writes copy
/// their region; the default (version 2) writes sub-blocks, which `check` and
/// `dump` report, and a restart reads back.
#[test]
fn sub_block_writes_by_default_and_region_copies_without_a_table() {
    for table in [false, true] {
        let f = files();
        let (src, dst) = (f.src.to_str().unwrap(), f.dst.to_str().unwrap());
        let mut args = vec!["--source", src, "--dest", dst, "--no-hydration"];
        if !table {
            args.extend(["--partial-regions", "0"]);
        }
        let d = Daemon::start(&args, &f.sock);
        let mut c = Client::connect(&f.sock);
        // One sub-block of region 1, and 512 bytes inside sub-block 3 of region 2.
        let w: Vec<u8> = (0..4096).map(|i| (i * 3) as u8).collect();
        assert_eq!(c.write(65536 + 8192, &w), 0);
        assert_eq!(c.write(2 * 65536 + 3 * 4096 + 1024, &w[..512]), 0);
        assert_eq!(c.flush(), 0);
        let s = status_json(&f.ctl);
        let (hydrated, partial) = if table { (0, 2) } else { (2, 0) };
        assert_eq!(s["hydrated_regions"], hydrated, "{s}");
        assert_eq!(s["partly_written_regions"], partial, "{s}");
        assert_eq!(s["io"]["partial_writes"], partial, "{s}");
        drop(c);
        assert!(d.terminate().success());

        let o = run(&["check", "--source", src, "--dest", dst]);
        assert!(o.status.success(), "{}", text(&o));
        assert_eq!(
            text(&o).contains(
                "partly written: 2 regions (table of 128 slots, sub-blocks of 4096 bytes)"
            ),
            table,
            "{}",
            text(&o)
        );
        let o = run(&["dump", "--dest", dst, "--json"]);
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if table {
            assert_eq!(
                j["partial"]["regions"],
                serde_json::json!([
                    {"region": 1, "written_mask": 4},
                    {"region": 2, "written_mask": 8}
                ]),
                "{j}"
            );
        } else {
            assert!(j.get("partial").is_none(), "{j}");
        }

        // Restarted: the writes and the source's bytes around them read back.
        let d = Daemon::start(&["--source", src, "--dest", dst], &f.sock);
        let mut c = Client::connect(&f.sock);
        let mut want = f.src_data[65536..3 * 65536].to_vec();
        want[8192..8192 + 4096].copy_from_slice(&w);
        want[65536 + 3 * 4096 + 1024..65536 + 3 * 4096 + 1536].copy_from_slice(&w[..512]);
        assert!(c.read(65536, 2 * 65536).1 == want, "table {table}");
        // Background hydration completes around the written sub-blocks.
        wait_complete(&f);
        assert_eq!(status_json(&f.ctl)["partly_written_regions"], 0);
        assert!(
            c.read(65536, 2 * 65536).1 == want,
            "table {table}, hydrated"
        );
        drop(c);
        assert!(d.terminate().success());
    }
}
