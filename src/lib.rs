//! vhost-clone: a vhost-user-blk daemon with the semantics of Linux dm-clone.
//!
//! Layers, each depending only on the ones below it:
//!
//! * [`cli`]: command-line front (create, check, dump, serve, status, message).
//! * [`control`]: the control socket (status, dm-clone's messages).
//! * [`virtio`]: the vhost-user-blk front: sockets, virtqueues, request validation.
//! * [`engine`]: region state, request mapping, hydration, commit scheduling.
//! * [`metadata`]: the on-disk bitmap format and the crash-safe two-phase commit.
//! * [`storage`]: block devices (files, block devices, a simulated volatile cache).
//! * [`socket`]: the daemon's private unix sockets (one binder, one policy).
//! * [`metrics`]: Prometheus exposition of the status over HTTP.

#![deny(missing_docs)]

pub mod cli;
pub mod control;
pub mod disk;
pub mod engine;
pub mod metadata;
pub mod metrics;
pub mod sandbox;
pub mod socket;
pub mod storage;
pub mod virtio;

/// The crate version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit the binary was built from (`git rev-parse --short HEAD`,
/// `-dirty` when tracked files differed), or `unknown` (see `build.rs`).
pub const GIT_COMMIT: &str = env!("VHOST_CLONE_GIT_COMMIT");

/// `VERSION (commit GIT_COMMIT)`, as `--version` and `status` print it.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VHOST_CLONE_GIT_COMMIT"),
    ")"
);

/// Formats an error with its chain of causes on one line
/// (`cannot open a.img: No such file or directory (os error 2)`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}
