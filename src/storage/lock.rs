//! Ownership of the files behind a clone: open file description (OFD) locks
//! over the whole file, as QEMU's image locking uses them.
//!
//! Invariant: a daemon holds an exclusive lock on its destination and metadata
//! and a shared lock on its source for as long as it has them open, and takes
//! them before it reads or writes a byte of them. A second daemon (or a
//! `create --force`, or QEMU opening the destination for writing) is refused,
//! and the error names the holder. OFD locks belong to the open file, not the
//! process: they are not dropped when some other descriptor of the same file
//! is closed (the trap of POSIX record locks), they conflict between two opens
//! in one process, and the kernel drops them when the process dies, so a
//! killed daemon never leaves a stale lock behind.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;

/// How a file is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// A read lock: others may read-lock too (the source, shared by clones).
    Shared,
    /// A write lock: nobody else may lock the file (destination, metadata).
    Exclusive,
}

/// Takes an OFD lock of `kind` over all of `file` without waiting. A conflict
/// is [`LockError::Held`], naming the holding process when it can be found.
pub fn lock(file: &File, kind: LockKind) -> Result<(), LockError> {
    // SAFETY: flock is plain data; zeroed is a valid value, filled in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however it grows
    fl.l_pid = 0; // must be 0 for OFD locks
                  // SAFETY: a valid descriptor and a pointer to an initialised flock that
                  // outlives the call; F_OFD_SETLK does not retain it.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(LockError::Held(holder(file))),
        _ => Err(LockError::Io(e)),
    }
}

/// How long [`lock_or_wait`] waits for a lock nobody visibly holds.
pub const ORPHAN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// [`lock`], waiting up to [`ORPHAN_WAIT`] while the lock is held by no process
/// that can be found. A killed process's files are released a moment after it
/// is reaped (the kernel may close them from a work queue, and io_uring
/// requests in flight hold them until they complete), so a restart right after
/// a kill -9 would otherwise be refused. A holder that is a live process is
/// refused at once.
pub fn lock_or_wait(file: &File, kind: LockKind) -> Result<(), LockError> {
    let start = std::time::Instant::now();
    loop {
        match lock(file, kind) {
            Err(LockError::Held(None)) if start.elapsed() < ORPHAN_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Why a lock was not taken.
#[derive(Debug)]
pub enum LockError {
    /// Another open file holds a conflicting lock; its holder, when found.
    Held(Option<String>),
    /// The lock call failed.
    Io(io::Error),
}

/// The device:inode a lock on `file` is listed under in /proc/*/fdinfo.
fn lock_key(file: &File) -> Option<String> {
    let m = file.metadata().ok()?;
    let dev = m.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    Some(format!(" {maj:02x}:{min:02x}:{} ", m.ino()))
}

/// Finds the process holding a lock on `file` by reading the `lock:` lines of
/// /proc/PID/fdinfo/FD (F_OFD_GETLK reports no pid for OFD locks). Best effort:
/// processes of other users may not be readable.
pub fn holder(file: &File) -> Option<String> {
    let key = lock_key(file)?;
    let me = std::process::id();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            if info
                .lines()
                .any(|l| l.starts_with("lock:") && format!("{l} ").contains(&key))
            {
                if pid == me {
                    return Some("this process (another open of the same file)".into());
                }
                let cmd = std::fs::read(p.path().join("cmdline"))
                    .map(|c| {
                        c.split(|&b| b == 0)
                            .filter(|a| !a.is_empty())
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default();
                return Some(if cmd.is_empty() {
                    format!("pid {pid}")
                } else {
                    format!("pid {pid} ({cmd})")
                });
            }
        }
    }
    None
}

/// What identifies the storage behind an open file: two paths name the same
/// file (or block device) exactly when their identities are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    /// Device of the file system (0 for block devices).
    pub dev: u64,
    /// Inode (the device number, for block devices: two nodes of one disk).
    pub ino: u64,
}

impl FileId {
    /// The identity of an open file or block device.
    pub fn of(m: &std::fs::Metadata) -> FileId {
        if m.file_type().is_block_device() {
            FileId {
                dev: 0,
                ino: m.rdev(),
            }
        } else {
            FileId {
                dev: m.dev(),
                ino: m.ino(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_conflicts_shared_does_not_and_the_holder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let a = File::options().read(true).write(true).open(&p).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        lock(&a, LockKind::Exclusive).unwrap();
        match lock(&b, LockKind::Shared) {
            Err(LockError::Held(Some(h))) => assert!(h.contains("this process"), "{h}"),
            other => panic!("expected a conflict naming the holder, got {other:?}"),
        }
        drop(a);
        // The kernel drops the lock with its open file.
        lock(&b, LockKind::Shared).unwrap();
        let c = File::open(&p).unwrap();
        lock(&c, LockKind::Shared).unwrap();
    }

    #[test]
    fn identity_follows_links() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        std::fs::hard_link(&p, dir.path().join("g")).unwrap();
        std::os::unix::fs::symlink(&p, dir.path().join("h")).unwrap();
        let id = |n: &str| FileId::of(&std::fs::metadata(dir.path().join(n)).unwrap());
        assert_eq!(id("f"), id("g"));
        assert_eq!(id("f"), id("h"));
    }
}
