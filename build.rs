//! Records the git commit the binary is built from, for `--version`, `status`
//! and the `vhost_clone_build_info` metric: `git rev-parse --short HEAD`, with
//! `-dirty` when tracked files differ from it, or `unknown` outside a git
//! checkout of this crate (a source tarball). A packager may set
//! `VHOST_CLONE_GIT_COMMIT` to name the commit itself.
use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=VHOST_CLONE_GIT_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = match std::env::var("VHOST_CLONE_GIT_COMMIT") {
        Ok(c) if !c.is_empty() => c,
        _ => detect(),
    };
    println!("cargo:rustc-env=VHOST_CLONE_GIT_COMMIT={commit}");
}

fn detect() -> String {
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else {
        return "unknown".into();
    };
    let dir = Path::new(&dir);
    // Only this crate's own checkout: not a repository it happens to sit in.
    let top = git(dir, &["rev-parse", "--show-toplevel"]);
    let same = match (
        top.map(|t| Path::new(&t).canonicalize()),
        dir.canonicalize(),
    ) {
        (Some(Ok(t)), Ok(d)) => t == d,
        _ => false,
    };
    if !same {
        return "unknown".into();
    }
    // Rebuild when HEAD moves, the branch advances, the index or a source changes.
    for p in ["HEAD", "index", "packed-refs"] {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", p]) {
            println!("cargo:rerun-if-changed={}", dir.join(path).display());
        }
    }
    if let Some(r) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(dir, &["rev-parse", "--git-path", &r]) {
            println!("cargo:rerun-if-changed={}", dir.join(path).display());
        }
    }
    println!("cargo:rerun-if-changed=src");
    let Some(hash) = git(dir, &["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty =
        git(dir, &["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{hash}-dirty")
    } else {
        hash
    }
}
