// SPDX-License-Identifier: Apache-2.0

//! The Landlock file-system ruleset applied once start-up has opened every file.
//!
//! After start-up the daemon works on file descriptors it already holds (source,
//! destination, metadata, live map, sockets); Landlock checks access when a path is
//! resolved, so those stay usable. What it still does by path is remove files: its
//! sockets and the live map at exit. So the ruleset handles every file-system access
//! right the kernel knows (best effort: fewer on older kernels, none without Landlock)
//! and grants only `RemoveFile` beneath the directories holding those files.
//! Connecting to a unix socket by path (sd_notify) is not a file-system access right
//! below ABI 9 and is not handled here.

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, ABI,
};

use super::{RuntimePaths, SandboxError};

/// The newest ABI whose file-system rights we handle (this project's kernels have 7).
const ABI_HANDLED: ABI = ABI::V7;

/// The directories beneath which files may still be removed.
pub fn removable_dirs(paths: &RuntimePaths) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    let parents = [&paths.socket, &paths.control]
        .into_iter()
        .flatten()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        });
    for d in parents.chain(paths.runtime_dir.iter().cloned()) {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Applies the ruleset to the calling thread and the threads it starts later.
pub fn restrict(paths: &RuntimePaths) -> Result<(), SandboxError> {
    let dirs = removable_dirs(paths);
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI_HANDLED))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&dirs, AccessFs::RemoveFile)))
        .and_then(|r| r.restrict_self())
        .map_err(SandboxError::Landlock)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => {
            tracing::info!(removable = ?dirs, "landlock: file system limited to removing our sockets and live map")
        }
        RulesetStatus::PartiallyEnforced => tracing::info!(
            removable = ?dirs,
            "landlock: file system limited (partially: this kernel's Landlock ABI is older than {ABI_HANDLED:?})"
        ),
        RulesetStatus::NotEnforced => {
            tracing::warn!("landlock: not supported by this kernel; the file system is not limited")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn removable_dirs_are_the_parents_and_the_runtime_dir() {
        let p = RuntimePaths {
            socket: Some(PathBuf::from("/run/a/x.sock")),
            control: Some(PathBuf::from("/run/a/x.ctl")),
            runtime_dir: Some(PathBuf::from("/dev/shm")),
        };
        assert_eq!(
            removable_dirs(&p),
            [PathBuf::from("/run/a"), PathBuf::from("/dev/shm")]
        );
        let p = RuntimePaths {
            socket: None,
            control: Some(PathBuf::from("x.ctl")),
            runtime_dir: None,
        };
        assert_eq!(removable_dirs(&p), [PathBuf::from(".")]);
    }

    /// Landlock restricts the calling thread only (and its children), so the test runs
    /// in a thread of its own and leaves the test harness unrestricted.
    #[test]
    fn outside_paths_are_refused_and_removal_in_allowed_dirs_works() {
        // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only
        // returns the ABI version (or an error).
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                1u32,
            )
        };
        if abi < 1 {
            eprintln!("skipped: no Landlock in this kernel");
            return;
        }
        let allowed = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let sock = allowed.path().join("d.sock");
        let kept = other.path().join("kept");
        std::fs::write(&sock, b"").unwrap();
        std::fs::write(&kept, b"x").unwrap();
        let paths = RuntimePaths {
            socket: Some(sock.clone()),
            control: None,
            runtime_dir: None,
        };
        let (s, k) = (sock.clone(), kept.clone());
        std::thread::spawn(move || {
            restrict(&paths).unwrap();
            let e = std::fs::File::open("/etc/hostname").unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            let e = std::fs::File::open(&k).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            let e = std::fs::remove_file(&k).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            std::fs::remove_file(&s).unwrap();
        })
        .join()
        .unwrap();
        assert!(!sock.exists());
        assert!(kept.exists());
        // This thread is not restricted.
        std::fs::File::open(&kept).unwrap();
    }
}
