//! Private unix sockets: the one place that decides how a daemon socket is
//! created, replaced and removed (the vhost-user socket and the control socket
//! alike).
//!
//! Policy:
//! * a new socket is created with mode 0600: bound inside a private 0700
//!   directory beside the final path, chmod-ed, then moved into place with
//!   `renameat2(RENAME_NOREPLACE)`, so it is never reachable with looser
//!   permissions and never replaces anything that appeared meanwhile;
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
}

/// A listening unix socket this process owns.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    /// The path and inode of a socket this process created (removed on drop).
    created: Option<(PathBuf, u64)>,
}

impl BoundSocket {
    /// Creates a listening socket at `path` following the module's policy.
    pub fn bind(path: &Path) -> Result<BoundSocket, SocketError> {
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
            let l = UnixListener::bind(&tmpsock)?;
            fs::set_permissions(&tmpsock, fs::Permissions::from_mode(0o600))?;
            rename_noreplace(&tmpsock, path)?;
            let ino = fs::symlink_metadata(path)?.ino();
            Ok((l, ino))
        })();
        let _ = fs::remove_file(&tmpsock);
        let _ = fs::remove_dir(&tmpdir);
        let (listener, ino) = result.map_err(bind_err)?;
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
}
