// SPDX-License-Identifier: Apache-2.0

//! The `front` test target: the vhost-user-blk front (`virtio::serve`) in
//! process, on a real unix socket, driven by the raw frontend of
//! `support::vu` or by libblkio, over an in-memory disk, a file, or the clone
//! engine. See docs/TESTING.md.
//!
//! Run one module with a filter: `cargo test --test front hostile_guest::`.

#[path = "../support/mod.rs"]
mod support;

mod blkio;
mod direct_blocks;
mod dirty_log;
mod hostile_guest;
mod inflight;
mod moderation;
mod queue_stop;
mod serve_clone;
mod two_frontends;
mod uring_front;
mod vhost_user;
