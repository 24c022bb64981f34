//! vhost-clone: a vhost-user-blk daemon with the semantics of Linux dm-clone.
//!
//! Layers, each depending only on the ones below it:
//!
//! * [`cli`]: command-line front (create, check, dump, serve).
//! * [`engine`]: region state, request mapping, hydration, commit scheduling.
//! * [`metadata`]: the on-disk bitmap format and the crash-safe two-phase commit.
//! * [`storage`]: block devices (files, block devices, a simulated volatile cache).

#![deny(missing_docs)]

pub mod cli;
pub mod engine;
pub mod metadata;
pub mod storage;
