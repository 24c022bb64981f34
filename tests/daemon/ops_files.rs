//! The files shipped for operators stay true to the binary:
//! * the man pages (`docs/man/`) and shell completions
//!   (`packaging/completions/`) are what clap_mangen and clap_complete make of
//!   the clap definitions today; after changing an option, regenerate them
//!   with `UPDATE_GENERATED=1 cargo test --test daemon ops_files::`;
//! * the vhost-user descriptor (`packaging/vhost-user/50-vhost-clone.json`)
//!   has exactly the fields of QEMU's vhost-user.json schema
//!   (`VhostUserBackend`) and agrees with `--print-capabilities`, whose
//!   features are all of the schema's block features.
//! * the release build links no test-only crate (`cargo tree -e normal`).

use crate::support::daemon;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

const UPDATE: &str = "UPDATE_GENERATED=1 cargo test --test daemon ops_files::";

/// The command as the generated files describe it. The version is the
/// package's, whatever `--version` prints (a build may add a git commit to
/// it), so that a commit does not change every page.
fn command() -> clap::Command {
    vhost_clone::cli::Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_subcommand(true)
}

/// Renders a long help text (see src/cli/help.rs) as man sections: a block
/// whose first line ends with ':' becomes a section with that heading; a line
/// `TERM  text` (two spaces) a tagged paragraph, any other line a line of its
/// own.
fn extra_sections(text: &str, roff: &mut Roff) {
    for block in text.split("\n\n") {
        let mut lines = block.lines().peekable();
        match lines.peek().and_then(|l| l.strip_suffix(':')) {
            Some(h) => {
                roff.control("SH", [h]);
                lines.next();
            }
            None => {
                roff.control("PP", []);
            }
        }
        for l in lines {
            match l.split_once("  ") {
                Some((term, text)) => {
                    roff.control("TP", []);
                    roff.text([bold(term)]);
                    roff.text([roman(text.trim())]);
                }
                None => {
                    roff.text([roman(l)]);
                    roff.control("br", []);
                }
            }
        }
    }
}

/// One man page: clap_mangen's sections, with the after-help as sections of
/// their own (FILES, SIGNALS, EXIT STATUS, ...).
fn man_page(cmd: clap::Command) -> (String, Vec<u8>) {
    let after = cmd.get_after_long_help().map(|s| s.to_string());
    let man = Man::new(cmd)
        .manual("vhost-clone manual")
        .source(concat!("vhost-clone ", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    man.render_title(&mut out).unwrap();
    man.render_name_section(&mut out).unwrap();
    man.render_synopsis_section(&mut out).unwrap();
    man.render_description_section(&mut out).unwrap();
    man.render_options_section(&mut out).unwrap();
    let name = man.get_filename();
    if name == "vhost-clone.1" {
        man.render_subcommands_section(&mut out).unwrap();
    }
    if let Some(a) = after {
        let mut roff = Roff::new();
        extra_sections(&a, &mut roff);
        roff.to_writer(&mut out).unwrap();
    }
    man.render_version_section(&mut out).unwrap();
    (name, out)
}

/// clap_complete's bash script spells the states of a hyphenated binary's
/// subcommands two ways (`vhost__clone__subcmd__serve` where it dispatches,
/// `vhost__subcmd__clone__subcmd__serve` in the case arms), so nothing after
/// a subcommand completes (clap-rs/clap#6421, open). Spell the arms as the
/// dispatch does; once clap_complete is fixed this changes nothing.
fn fix_bash_hyphen(script: Vec<u8>) -> Vec<u8> {
    String::from_utf8(script)
        .unwrap()
        .replace("vhost__subcmd__clone__subcmd__", "vhost__clone__subcmd__")
        .into_bytes()
}

/// Every generated file: (path relative to the repository, contents).
fn generated() -> Vec<(PathBuf, Vec<u8>)> {
    let mut cmd = command();
    cmd.build();
    let mut files = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let (name, page) = man_page(sub.clone().version(env!("CARGO_PKG_VERSION")));
        files.push((Path::new("docs/man").join(name), page));
    }
    let (name, page) = man_page(cmd.clone());
    files.push((Path::new("docs/man").join(name), page));
    for (shell, file) in [
        (Shell::Bash, "vhost-clone.bash"),
        (Shell::Zsh, "_vhost-clone"),
        (Shell::Fish, "vhost-clone.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command(), "vhost-clone", &mut out);
        if shell == Shell::Bash {
            out = fix_bash_hyphen(out);
        }
        files.push((Path::new("packaging/completions").join(file), out));
    }
    files
}

#[test]
fn man_pages_and_completions_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("UPDATE_GENERATED").is_some_and(|v| v == "1");
    let files = generated();
    let names: Vec<_> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    for want in [
        "docs/man/vhost-clone.1",
        "docs/man/vhost-clone-serve.1",
        "docs/man/vhost-clone-status.1",
        "docs/man/vhost-clone-message.1",
        "docs/man/vhost-clone-create.1",
        "docs/man/vhost-clone-check.1",
        "docs/man/vhost-clone-dump.1",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not generated: {names:?}"
        );
    }
    let mut stale = Vec::new();
    for (rel, contents) in &files {
        let path = root.join(rel);
        if update {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, contents).unwrap();
        } else if std::fs::read(&path).ok().as_ref() != Some(contents) {
            stale.push(rel.display().to_string());
        }
    }
    // A page of a subcommand that no longer exists.
    if let Ok(dir) = std::fs::read_dir(root.join("docs/man")) {
        for e in dir {
            let rel = Path::new("docs/man").join(e.unwrap().file_name());
            if !files.iter().any(|(p, _)| *p == rel) {
                stale.push(format!("{} (no such command)", rel.display()));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated files differ from the clap definitions: {stale:?}\nregenerate them with: {UPDATE}"
    );
}

#[test]
fn man_page_of_serve_says_more_than_its_options() {
    let page = generated()
        .into_iter()
        .find(|(p, _)| p.ends_with("vhost-clone-serve.1"))
        .map(|(_, c)| String::from_utf8(c).unwrap())
        .unwrap();
    for want in [
        ".SH FILES",
        ".SH SIGNALS",
        ".SH \"EXIT STATUS\"",
        "SIGTERM",
        "\\-\\-read\\-only",
    ] {
        assert!(
            page.contains(want),
            "no {want:?} in the serve page:\n{page}"
        );
    }
}

/// QEMU's docs/interop/vhost-user.json: `VhostUserBackend` members (name,
/// required), `VHostUserBackendType` and `VHostUserBackendBlockFeature`.
const BACKEND_MEMBERS: &[(&str, bool)] = &[
    ("description", true),
    ("type", true),
    ("binary", true),
    ("tags", false),
];
const BACKEND_TYPES: &[&str] = &[
    "9p",
    "balloon",
    "block",
    "caif",
    "console",
    "crypto",
    "gpu",
    "input",
    "net",
    "rng",
    "rpmsg",
    "rproc-serial",
    "scsi",
    "vsock",
    "fs",
];
const BLOCK_FEATURES: &[&str] = &["read-only", "blk-file"];

#[test]
fn vhost_user_descriptor_matches_the_schema_and_the_binary() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/vhost-user/50-vhost-clone.json");
    let d: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let obj = d.as_object().expect("a JSON object");
    for k in obj.keys() {
        assert!(
            BACKEND_MEMBERS.iter().any(|(m, _)| m == k),
            "{k:?} is not a member of VhostUserBackend"
        );
    }
    for (m, required) in BACKEND_MEMBERS {
        assert!(!required || obj.contains_key(*m), "{m:?} is missing");
    }
    assert!(d["description"].is_string());
    assert!(BACKEND_TYPES.contains(&d["type"].as_str().unwrap()));
    assert_eq!(d["binary"], "/usr/bin/vhost-clone");

    // What the binary says of itself, at top level and under serve.
    let caps: Vec<serde_json::Value> = [
        &["--print-capabilities"][..],
        &["serve", "--print-capabilities"],
    ]
    .iter()
    .map(|args| {
        let o = daemon::run(args);
        assert!(o.status.success(), "{args:?}: {}", daemon::text(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    })
    .collect();
    assert_eq!(caps[0], caps[1], "the two --print-capabilities differ");
    let caps = &caps[0];
    assert_eq!(
        caps["type"], d["type"],
        "descriptor and capabilities disagree"
    );
    assert_eq!(caps.as_object().unwrap().len(), 2, "{caps}");
    let features: Vec<&str> = caps["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in &features {
        assert!(BLOCK_FEATURES.contains(f), "{f:?} is not a block feature");
    }
    // Claimed only when true: read-only is an option of serve.
    assert_eq!(features, ["read-only"]);
    let o = daemon::run(&["serve", "--help"]);
    assert!(daemon::text(&o).contains("--read-only"));
}

/// What bash completes for the words `line` (the last one being completed).
fn bash_complete(script: &Path, line: &[&str]) -> String {
    let words: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; _vhost__clone vhost-clone '{}' '{}'; echo \"${{COMPREPLY[*]}}\"",
        script.display(),
        words.join(" "),
        line.len() - 1,
        line[line.len() - 1],
        line[line.len() - 2],
    );
    let o = std::process::Command::new("bash")
        .args(["-c", &prog])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn bash_completes_subcommand_options_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("vhost-clone.bash");
    let (_, bash) = generated()
        .into_iter()
        .find(|(p, _)| p.ends_with("vhost-clone.bash"))
        .unwrap();
    std::fs::write(&script, bash).unwrap();
    let c = bash_complete(&script, &["vhost-clone", "se"]);
    assert_eq!(c.trim(), "serve", "{c}");
    let c = bash_complete(&script, &["vhost-clone", "serve", "--read"]);
    assert_eq!(c.trim(), "--read-only", "{c}");
    let c = bash_complete(&script, &["vhost-clone", "serve", "--io-engine", ""]);
    assert_eq!(c.trim(), "auto uring sync", "{c}");
    let c = bash_complete(&script, &["vhost-clone", "--log-level", "w"]);
    assert_eq!(c.trim(), "warn", "{c}");
}

/// Whether `shell` runs here (zsh and fish are optional: CI installs them).
fn have(shell: &str) -> bool {
    std::process::Command::new(shell)
        .args(["-c", "exit 0"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn zsh_and_fish_accept_their_completions() {
    let dir = tempfile::tempdir().unwrap();
    let files = generated();
    let write = |name: &str| {
        let (_, c) = files.iter().find(|(p, _)| p.ends_with(name)).unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, c).unwrap();
        path
    };
    let zsh = write("_vhost-clone");
    let fish = write("vhost-clone.fish");
    let sh = |shell: &str, args: &[&str]| {
        let o = std::process::Command::new(shell)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{shell} {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    if have("zsh") {
        sh("zsh", &["-n", zsh.to_str().unwrap()]);
    } else {
        eprintln!("zsh not installed: its completion is not checked");
    }
    if have("fish") {
        sh("fish", &["--no-execute", fish.to_str().unwrap()]);
        let prog = format!(
            "source '{}'; complete -C 'vhost-clone serve --read'",
            fish.display()
        );
        let out = sh("fish", &["-c", &prog]);
        assert!(out.starts_with("--read-only\t"), "{out}");
    } else {
        eprintln!("fish not installed: its completion is not checked");
    }
}

/// What ships in the release binary has no test machinery: the simulated
/// device's random generators come only with the `test-utils` feature.
#[test]
fn the_release_build_links_no_test_only_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "-e", "normal", "--prefix", "none", "--offline"])
        .args([
            "--manifest-path",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("vhost-clone v"), "{tree}");
    for name in ["rand_chacha ", "rand v0.8", "proptest ", "tempfile "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(name)),
            "{name} is a normal dependency:\n{tree}"
        );
    }
}
