//! Exit codes of the binary, walked as a table: 2 only when the command line
//! must change (an unknown, missing or conflicting option, a bad value, an
//! option the clone contradicts), and then no file is created or changed; 1
//! when the system refused or failed (missing or unusable files, a missing
//! directory, a live socket, a clone in use, an unreachable daemon, a failed
//! check); 0 for success. Every failure says why in an `error:` line
//! (`check` in its report).

use crate::support::daemon;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::daemon::{text, Daemon};

/// Runs `vhost-clone ARGS...`; a command that should have exited but serves
/// on is killed after 20 s and reported as exit `None`.
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(daemon::BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vhost-clone");
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().unwrap()
}

/// One row: arguments, expected exit code, a substring of the output.
struct Case<'a> {
    args: Vec<&'a str>,
    code: i32,
    says: &'a str,
}

fn case<'a>(args: &[&'a str], code: i32, says: &'a str) -> Case<'a> {
    Case {
        args: args.to_vec(),
        code,
        says,
    }
}

/// Every file under `dir` with its length and contents' checksum.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, u32)> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        let sum = if md.is_file() {
            crc32c::crc32c(&std::fs::read(e.path()).unwrap())
        } else {
            0
        };
        m.insert(e.file_name().to_string_lossy().into(), (md.len(), sum));
    }
    m
}

fn walk(dir: &Path, cases: &[Case<'_>]) {
    let mut wrong = Vec::new();
    for c in cases {
        let before = snapshot(dir);
        let o = run(&c.args);
        let out = text(&o);
        let code = o.status.code();
        if code != Some(c.code) || !out.contains(c.says) {
            wrong.push(format!(
                "{:?}: exit {code:?}, want {} and {:?}; said:\n{out}",
                c.args, c.code, c.says
            ));
            continue;
        }
        if c.code != 0 && c.args.first() != Some(&"check") {
            let err = String::from_utf8_lossy(&o.stderr);
            if !err.lines().any(|l| l.starts_with("error:")) {
                wrong.push(format!("{:?}: no error: line:\n{err}", c.args));
            }
        }
        if c.code == 2 && snapshot(dir) != before {
            wrong.push(format!("{:?}: a usage error changed files", c.args));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn exit_codes_follow_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (src, dst, meta, sock) = (
        p("golden.img"),
        p("clone.img"),
        p("clone.img.meta"),
        p("clone.img.sock"),
    );
    let ctl = p("clone.img.sock.ctl");
    let (new, new2, subdir) = (p("new.img"), p("new2.img"), p("a-directory"));
    std::fs::write(&src, vec![5u8; 1 << 20]).unwrap();
    std::fs::create_dir(&subdir).unwrap();
    let o = run(&["create", "-s", &src, "-d", &dst, "--region-size", "8K"]);
    assert!(o.status.success(), "{}", text(&o));
    let long_serial = "123456789012345678901";

    walk(
        dir.path(),
        &[
            // Usage errors: the command line must change.
            case(&[], 2, "a command is required"),
            case(&["frobnicate"], 2, "unrecognized subcommand"),
            case(
                &["--log-level", "bogus", "dump", "-d", &dst],
                2,
                "invalid value 'bogus'",
            ),
            case(
                &["--log-level", "WARNING", "dump", "-d", &dst],
                2,
                "possible values",
            ),
            case(
                &["create", "-s", &src, "-d", &new, "--region-size", "3K"],
                2,
                "not a power of two",
            ),
            case(
                &["create", "-s", &src, "-d", &new, "--region-size", "2G"],
                2,
                "not a power of two",
            ),
            case(
                &["create", "-d", &new],
                2,
                "create needs --source and --dest",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--serial", long_serial],
                2,
                "at most 20",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--queue-size", "1000"],
                2,
                "power of two",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--num-queues", "0"],
                2,
                "--num-queues",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--commit-interval=nan"],
                2,
                "seconds",
            ),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--hydration-batch-size",
                    "99999999",
                ],
                2,
                "4096",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--hydration-rate", "100MB"],
                2,
                "not a rate in bytes per second",
            ),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--hydration-rate",
                    "99999999T",
                ],
                2,
                "too large",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--io-engine", "fast"],
                2,
                "invalid value",
            ),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--socket-path",
                    &sock,
                    "--fd",
                    "3",
                ],
                2,
                "cannot be used with",
            ),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--socket-path",
                    &sock,
                    "--control-socket",
                    &sock,
                ],
                2,
                "must differ",
            ),
            case(&["serve", "-s", &src], 2, "--dest"),
            case(
                &["serve", "-s", &src, "-d", &dst, "-m", &dst],
                2,
                "name the same file",
            ),
            case(&["serve", "-d", &new], 2, "--source is needed"),
            case(
                &["serve", "-d", &dst],
                2,
                "the source is needed until hydration completes",
            ),
            case(
                &["serve", "-s", &src, "-d", &dst, "--region-size", "4K"],
                2,
                "region size mismatch",
            ),
            // The clone (8K regions, 1 MiB) has a table of 128 slots.
            case(
                &["serve", "-s", &src, "-d", &dst, "--partial-regions", "0"],
                2,
                "its table of partly written regions has 128 slots",
            ),
            case(
                &[
                    "create",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--region-size",
                    "4K",
                    "--partial-regions",
                    "8",
                ],
                2,
                "one sub-block and no table",
            ),
            case(
                &[
                    "create",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--partial-regions",
                    "2000000",
                ],
                2,
                "--partial-regions",
            ),
            case(&["status"], 2, "give --control-socket"),
            case(&["status", "-c", &ctl, "--interval=inf"], 2, "seconds"),
            case(&["message", "-c", &ctl], 2, "required"),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--hydration-threshold",
                    "18446744073709551615",
                ],
                2,
                "65536",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--commit-interval", "-1"],
                2,
                "unexpected argument",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--socket-mode", "0666"],
                2,
                "any user",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--socket-mode", "0602"],
                2,
                "any user",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--socket-mode", "1660"],
                2,
                "0777",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--socket-mode", "0680"],
                2,
                "octal",
            ),
            case(
                &["serve", "-s", &src, "-d", &new, "--socket-mode", "u=rw"],
                2,
                "octal",
            ),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--socket-group",
                    "no-such-group-vhost-clone",
                ],
                2,
                "no-such-group-vhost-clone",
            ),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--fd",
                    "0",
                    "--socket-group",
                    "0",
                ],
                2,
                "cannot be used with",
            ),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--fd",
                    "0",
                    "--socket-mode",
                    "0660",
                ],
                2,
                "cannot be used with",
            ),
            // Runtime failures: the command line is fine, the system is not.
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--socket-path",
                    "/nonexistent-dir/x.sock",
                ],
                1,
                "No such file or directory",
            ),
            case(
                &["serve", "-s", "/nonexistent/golden.img", "-d", &new],
                1,
                "cannot open /nonexistent/golden.img",
            ),
            case(&["serve", "-s", &subdir, "-d", &new2], 1, "a-directory"),
            case(
                &["serve", "-s", &src, "-d", &new, "--fd", "1"],
                1,
                "is not a listening unix",
            ),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--runtime-dir",
                    "/nonexistent-dir",
                ],
                1,
                "--runtime-dir",
            ),
            case(
                &["create", "-s", &src, "-d", &dst],
                1,
                "already holds clone metadata",
            ),
            case(&["dump", "-d", &new], 1, "cannot open"),
            case(&["check", "-d", &new], 1, "check: FAILED"),
            case(&["status", "-c", &ctl], 1, "cannot talk to the daemon"),
            case(
                &["message", "-c", &ctl, "enable-hydration"],
                1,
                "cannot talk to the daemon",
            ),
            // Success.
            case(&["--print-capabilities"], 0, "\"type\":\"block\""),
            case(&["serve", "--print-capabilities"], 0, "\"type\":\"block\""),
            case(
                &["--log-level", "warning", "check", "-d", &dst],
                0,
                "check: OK",
            ),
            case(&["dump", "-m", &meta], 0, "hydrated: 0/128"),
        ],
    );
    for f in [&new, &new2] {
        assert!(!Path::new(f).exists(), "{f} left behind by a refused start");
    }

    // With a daemon running on the clone.
    let d = Daemon::start(
        &["-s", &src, "-d", &dst, "--no-hydration"],
        Path::new(&sock),
    );
    walk(
        dir.path(),
        &[
            case(&["serve", "-s", &src, "-d", &dst], 1, "in use by pid"),
            case(
                &[
                    "serve",
                    "-s",
                    &src,
                    "-d",
                    &new,
                    "--socket-path",
                    &sock,
                    "--control-socket",
                    &p("other.ctl"),
                ],
                1,
                "vhost-user socket",
            ),
            case(
                &["create", "-s", &src, "-d", &dst, "--force"],
                1,
                "in use by pid",
            ),
            case(&["message", "-c", &ctl, "frobnicate"], 2, "unknown message"),
            case(
                &["message", "-c", &ctl, "hydration-threshold", "lots"],
                2,
                "whole number",
            ),
            case(
                &["message", "-c", &ctl, "hydration-rate", "fast"],
                2,
                "not a rate in bytes per second",
            ),
            case(&["message", "-c", &ctl, "hydration-rate", "50M"], 0, ""),
            case(&["message", "-c", &ctl, "disable-hydration"], 0, ""),
            case(&["status", "-c", &ctl], 0, "hydrated: 0/128"),
        ],
    );
    assert!(!Path::new(&new).exists());
    assert!(d.terminate().success());
}
