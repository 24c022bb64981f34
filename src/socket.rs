//! Private unix sockets: the one place that decides how a daemon socket is
//! created, replaced and removed (the vhost-user socket and the control socket
//! alike).
//!
//! Policy:
//! * a new socket is created with mode 0600 (or the [`SocketAccess`] the
//!   operator asked for: a group and a mode that never lets others connect):
//!   bound inside a private 0700 directory beside the final path, chown-ed and
//!   chmod-ed there, then moved into place with `renameat2(RENAME_NOREPLACE)`,
//!   so it is never reachable with other permissions than the final ones and
//!   never replaces anything that appeared meanwhile;
//! * a path that exists and is not a socket is refused;
//! * a socket somebody accepts connections on is live: refused, never removed;
//! * a socket nobody accepts on is stale (its daemon died): replaced;
//! * on drop, the socket is removed only if the path still names the inode
//!   this process created (a successor's socket is left alone).
//!
//! Sockets are bound before any thread of the daemon starts, so a refused start
//! has started nothing and changed nothing but what it created itself.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Errors of binding or adopting a socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another process is accepting connections on the path.
    #[error("{0} is a live socket of another process (is another daemon serving this clone?)")]
    InUse(PathBuf),
    /// Creating, binding or moving the socket failed.
    #[error("cannot create the socket {path}")]
    Bind {
        /// The requested path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An inherited fd is not a listening unix stream socket.
    #[error("inherited fd {0} is not a listening unix stream socket")]
    BadListenFd(RawFd),
    /// The socket could not be given to the requested group.
    #[error("cannot give the socket {path} to group {group} (the daemon must be root or a member of the group)")]
    Group {
        /// The requested path.
        path: PathBuf,
        /// The group, as the operator named it.
        group: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Who may connect to a socket this process creates: its mode and, if given,
/// its group (connecting to a unix socket needs write permission on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits (at most 0777, never write for others).
    pub mode: u32,
    /// The group to give the socket to; `None` keeps the process's.
    pub group: Option<SocketGroup>,
}

/// A group resolved from an operator's `--socket-group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    /// As the operator wrote it (for messages).
    pub name: String,
    /// The group id.
    pub gid: u32,
}

impl SocketAccess {
    /// Owner only (0600): the default for every socket.
    pub const PRIVATE: SocketAccess = SocketAccess {
        mode: 0o600,
        group: None,
    };

    /// The access `--socket-mode`/`--socket-group` ask for: `mode` if given,
    /// else 0660 with a group (a group is given to let it connect) and 0600
    /// without.
    pub fn new(mode: Option<u32>, group: Option<SocketGroup>) -> SocketAccess {
        let mode = mode.unwrap_or(if group.is_some() { 0o660 } else { 0o600 });
        SocketAccess { mode, group }
    }
}

/// Parses a socket mode: octal digits (`0660`, `660` or `0o660`), at most
/// 0777, and without write for others: whoever can connect to the vhost-user
/// socket can attach as the VM and read and write the whole disk, so "anyone
/// on the host" is never a sensible answer (give a group instead).
pub fn parse_socket_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(format!("{s:?} is not an octal mode such as 0660"));
    }
    let mode = u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s} is more than 0777 (only permission bits are allowed)"))?;
    if mode & 0o002 != 0 {
        return Err(format!(
            "{s} lets any user on the host connect, and so read and write the disk; use --socket-group"
        ));
    }
    Ok(mode)
}

/// Resolves a group name (or a numeric gid) from the system's group database.
pub fn parse_socket_group(s: &str) -> Result<SocketGroup, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(SocketGroup {
            name: s.to_string(),
            gid,
        });
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(SocketGroup {
            name: s.to_string(),
            gid: g.gid.as_raw(),
        }),
        Ok(None) => Err(format!("no group named {s:?}")),
        Err(e) => Err(format!("cannot look up group {s:?}: {e}")),
    }
}

/// A listening unix socket this process owns.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    /// The path and inode of a socket this process created (removed on drop).
    created: Option<(PathBuf, u64)>,
}

impl BoundSocket {
    /// Creates a private (0600) listening socket at `path` following the
    /// module's policy.
    pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
        Self::bind_with(path, &SocketAccess::PRIVATE)
    }

    /// [`BoundSocket::bind`] with the group and mode of `access`, set before
    /// the socket appears at `path`.
    pub fn bind_with(path: &Path, access: &SocketAccess) -> Result<BoundSocket, SocketError> {
        let bind_err = |source| SocketError::Bind {
            path: path.to_path_buf(),
            source,
        };
        match fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => {
                // Stale only when nobody listens (ECONNREFUSED); any other
                // answer (accepted, EACCES, a full backlog) may be a live daemon.
                match UnixStream::connect(path) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    _ => return Err(SocketError::InUse(path.to_path_buf())),
                }
                tracing::info!(path = %path.display(), "removing stale socket");
                fs::remove_file(path).map_err(bind_err)?;
            }
            Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // A private directory next to the final path (same file system, so
        // rename works), named short: the temporary socket path must fit the
        // 108 bytes of a unix socket address wherever the final one does.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmpdir = parent.join(format!(".vc{}.{n}", std::process::id()));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmpdir)
            .map_err(bind_err)?;
        let tmpsock = tmpdir.join("s");
        let result = (|| {
            let l = UnixListener::bind(&tmpsock).map_err(bind_err)?;
            // Group first, then mode: both while only this process can reach it.
            if let Some(g) = &access.group {
                std::os::unix::fs::chown(&tmpsock, None, Some(g.gid)).map_err(|source| {
                    SocketError::Group {
                        path: path.to_path_buf(),
                        group: g.name.clone(),
                        source,
                    }
                })?;
            }
            fs::set_permissions(&tmpsock, fs::Permissions::from_mode(access.mode))
                .map_err(bind_err)?;
            rename_noreplace(&tmpsock, path).map_err(bind_err)?;
            let ino = fs::symlink_metadata(path).map_err(bind_err)?.ino();
            Ok((l, ino))
        })();
        let _ = fs::remove_file(&tmpsock);
        let _ = fs::remove_dir(&tmpdir);
        let (listener, ino) = result?;
        Ok(BoundSocket {
            listener,
            created: Some((path.to_path_buf(), ino)),
        })
    }

    /// Takes ownership of an inherited listening unix stream socket (`--fd N`,
    /// socket activation); the socket file, if any, stays its creator's.
    pub fn adopt_fd(fd: RawFd) -> Result<BoundSocket, SocketError> {
        let get = |opt: libc::c_int| -> Option<libc::c_int> {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: `v` and `len` are valid for writes of the sizes passed; getsockopt
            // on an fd that is not a socket fails with ENOTSOCK/EBADF and writes nothing.
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            (r == 0).then_some(v)
        };
        if fd < 0
            || get(libc::SO_DOMAIN) != Some(libc::AF_UNIX)
            || get(libc::SO_TYPE) != Some(libc::SOCK_STREAM)
            || get(libc::SO_ACCEPTCONN) != Some(1)
        {
            return Err(SocketError::BadListenFd(fd));
        }
        // SAFETY: the caller hands over `fd` (it is not used elsewhere afterwards);
        // it was just checked to be an open, listening AF_UNIX socket.
        let listener = unsafe { UnixListener::from_raw_fd(fd) };
        listener
            .set_nonblocking(false)
            .map_err(|source| SocketError::Bind {
                path: PathBuf::from(format!("fd {fd}")),
                source,
            })?;
        Ok(BoundSocket {
            listener,
            created: None,
        })
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The path of a socket this process created.
    pub fn path(&self) -> Option<&Path> {
        self.created.as_ref().map(|(p, _)| p.as_path())
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some((path, ino)) = &self.created {
            if fs::symlink_metadata(path).map(|m| m.ino()).ok() == Some(*ino) {
                let _ = fs::remove_file(path);
            }
        }
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call;
    // renameat2 does not retain them.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_sockets_are_refused_and_kept_stale_ones_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let a = BoundSocket::bind(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(BoundSocket::bind(&p), Err(SocketError::InUse(_))));
        assert!(p.exists(), "a refused bind removed the live socket");
        drop(a);
        assert!(!p.exists(), "the owner removes its socket");
        // A stale socket (nobody accepts) is replaced.
        let stale = UnixListener::bind(&p).unwrap();
        drop(stale);
        let b = BoundSocket::bind(&p).unwrap();
        // A successor's socket is not removed by the previous owner.
        fs::remove_file(&p).unwrap();
        let c = BoundSocket::bind(&p).unwrap();
        drop(b);
        assert!(
            p.exists(),
            "dropping an old owner removed its successor's socket"
        );
        drop(c);
        fs::write(&p, b"x").unwrap();
        assert!(matches!(
            BoundSocket::bind(&p),
            Err(SocketError::NotASocket(_))
        ));
    }

    #[test]
    fn socket_modes_are_octal_permission_bits_never_writable_by_others() {
        for (text, want) in [
            ("0600", Some(0o600)),
            ("0660", Some(0o660)),
            ("660", Some(0o660)),
            ("0o640", Some(0o640)),
            ("0775", Some(0o775)),
            ("0", Some(0)),
            ("0666", None),
            ("0602", None),
            ("0777", None),
            ("1770", None),
            ("01000", None),
            ("0680", None),
            ("rw", None),
            ("", None),
            ("0o", None),
            ("-660", None),
            ("99999999999999999999", None),
        ] {
            assert_eq!(parse_socket_mode(text).ok(), want, "{text:?}");
        }
    }

    #[test]
    fn socket_groups_are_names_or_numbers() {
        // The group database of any Linux system has root (gid 0).
        assert_eq!(parse_socket_group("root").unwrap().gid, 0);
        assert_eq!(parse_socket_group("4242").unwrap().gid, 4242);
        let e = parse_socket_group("no-such-group-vhost-clone").unwrap_err();
        assert!(e.contains("no group named"), "{e}");
    }

    /// The group this process may give a socket to other than its own: any
    /// as root (nogroup), else a supplementary group if it has one.
    fn another_group() -> Option<u32> {
        // SAFETY: getegid and geteuid cannot fail and take no pointers.
        let (egid, euid) = unsafe { (libc::getegid(), libc::geteuid()) };
        if euid == 0 {
            return Some(65534);
        }
        let mut groups = vec![0 as libc::gid_t; 256];
        // SAFETY: `groups` has room for the 256 entries passed as its size.
        let n = unsafe { libc::getgroups(256, groups.as_mut_ptr()) };
        groups.truncate(n.max(0) as usize);
        groups.into_iter().find(|g| *g != egid)
    }

    #[test]
    fn bind_with_sets_group_and_mode_and_bind_stays_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let private = BoundSocket::bind(&p).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        drop(private);

        // SAFETY: getegid cannot fail and takes no pointers.
        let egid = unsafe { libc::getegid() };
        let gid = another_group().unwrap_or(egid);
        let access = SocketAccess::new(
            Some(0o640),
            Some(SocketGroup {
                name: gid.to_string(),
                gid,
            }),
        );
        let a = BoundSocket::bind_with(&p, &access).unwrap();
        let md = fs::metadata(&p).unwrap();
        assert_eq!((md.mode() & 0o7777, md.gid()), (0o640, gid));
        drop(a);

        // A group alone makes the socket group-writable.
        assert_eq!(SocketAccess::new(None, access.group.clone()).mode, 0o660);
        assert_eq!(SocketAccess::new(None, None), SocketAccess::PRIVATE);
        // Nothing is left behind: no socket, no temporary directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
