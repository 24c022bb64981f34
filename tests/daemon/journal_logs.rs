//! Log lines as systemd's journal and an operator see them: sd-daemon
//! priorities when `JOURNAL_STREAM` names our stderr (and only then), the
//! `--log-level` set (`warning` means warn), and a control message logged
//! with both its text and its arguments.

use crate::support::daemon;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::daemon::{run, text, Daemon};

struct Clone {
    _dir: tempfile::TempDir,
    src: String,
    dst: String,
    sock: std::path::PathBuf,
    ctl: String,
    log: std::path::PathBuf,
}

fn clone() -> Clone {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("golden.img");
    std::fs::write(&src, vec![1u8; 1 << 20]).unwrap();
    let dst = dir.path().join("clone.img");
    Clone {
        src: src.to_str().unwrap().into(),
        dst: dst.to_str().unwrap().into(),
        sock: dir.path().join("clone.img.sock"),
        ctl: dir
            .path()
            .join("clone.img.sock.ctl")
            .to_str()
            .unwrap()
            .into(),
        log: dir.path().join("stderr.log"),
        _dir: dir,
    }
}

/// `JOURNAL_STREAM` naming `log` (its device and inode), as systemd sets it.
fn journal_stream_of(log: &Path) -> String {
    let m = std::fs::metadata(log).unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

/// Serves `c` with stderr into `c.log` and `journal_stream` in the
/// environment; sends `enable-hydration`, then stops it. Returns the log.
fn serve_and_stop(c: &Clone, journal_stream: Option<&str>, extra: &[&str]) -> String {
    let log = std::fs::File::create(&c.log).unwrap();
    let mut cmd = Command::new(daemon::BIN);
    cmd.args(extra)
        .args([
            "serve",
            "--source",
            &c.src,
            "--dest",
            &c.dst,
            "--runtime-dir",
            "none",
            "--no-hydration",
        ])
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(j) = journal_stream {
        cmd.env("JOURNAL_STREAM", j);
    }
    let d = Daemon::adopt(cmd.spawn().unwrap(), &c.sock);
    let o = run(&["message", "-c", &c.ctl, "enable-hydration"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.terminate().success());
    std::fs::read_to_string(&c.log).unwrap()
}

fn has_timestamp(line: &str) -> bool {
    // tracing's default time: 2026-12-01T02:13:17.077092Z
    line.split_whitespace()
        .any(|w| w.len() > 20 && w.as_bytes()[4] == b'-' && w.contains('T') && w.ends_with('Z'))
}

#[test]
fn journal_lines_carry_priorities_and_no_timestamp() {
    let c = clone();
    std::fs::File::create(&c.log).unwrap();
    // The same file is truncated, not replaced: its inode stays.
    let j = journal_stream_of(&c.log);
    let log = serve_and_stop(&c, Some(&j), &[]);
    assert_eq!(journal_stream_of(&c.log), j, "the log file was replaced");
    for line in log.lines() {
        let p = line.get(..3).unwrap_or_default();
        assert!(
            matches!(p, "<3>" | "<4>" | "<6>" | "<7>"),
            "a line without its priority: {line:?}\n{log}"
        );
        assert!(!has_timestamp(line), "journald adds the time: {line:?}");
        assert!(!line.contains('\x1b'), "colour in the journal: {line:?}");
    }
    let find = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in\n{log}"))
    };
    assert!(find("--runtime-dir none").starts_with("<4>"), "{log}");
    assert!(find("stopped cleanly").starts_with("<6>"), "{log}");
    assert!(find("attach:").starts_with("<6>"), "banner lines: {log}");
    // The message is logged with its text and its arguments.
    let m = find("hydration enabled");
    assert!(m.contains(r#"args=["enable-hydration"]"#), "{m}");

    // A failure's error line is at error priority.
    let log_file = std::fs::File::create(&c.log).unwrap();
    let o = Command::new(daemon::BIN)
        .args([
            "serve",
            "--source",
            "/nonexistent/golden.img",
            "--dest",
            &c.dst,
        ])
        .env("JOURNAL_STREAM", &j)
        .stderr(log_file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.starts_with("<3>error: "), "{log}");

    // So is a usage error, every line of it.
    let log_file = std::fs::File::create(&c.log).unwrap();
    let o = Command::new(daemon::BIN)
        .args(["serve", "--dest", &c.dst, "--frobnicate"])
        .env("JOURNAL_STREAM", &j)
        .stderr(log_file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let log = std::fs::read_to_string(&c.log).unwrap();
    assert!(log.starts_with("<3>error: unexpected argument"), "{log}");
    assert!(log.lines().all(|l| l.starts_with("<3>")), "{log}");
}

#[test]
fn no_priorities_when_journal_stream_names_another_file() {
    let c = clone();
    // A stream the daemon inherited the variable for, but whose stderr was
    // redirected elsewhere (a shell started from a unit, say).
    let other = tempfile::NamedTempFile::new().unwrap();
    let log = serve_and_stop(&c, Some(&journal_stream_of(other.path())), &[]);
    assert!(!log.lines().any(|l| l.starts_with('<')), "{log}");
    assert!(log.lines().any(has_timestamp), "{log}");
}

#[test]
fn log_level_warning_shows_warnings_and_only_them() {
    let c = clone();
    let log = serve_and_stop(&c, None, &["--log-level", "warning"]);
    assert!(
        log.contains("--runtime-dir none"),
        "the warning is muted:\n{log}"
    );
    assert!(!log.contains("stopped cleanly"), "info lines shown:\n{log}");
}
