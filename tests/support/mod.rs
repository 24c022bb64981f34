// SPDX-License-Identifier: Apache-2.0

//! Helpers shared by the integration test targets (docs/TESTING.md), each
//! under one name: every target includes this directory as `mod support` and
//! uses what it needs as `crate::support::NAME`.
//!
//! * [`sectors`]: self-describing sector contents (a tag and the sector number,
//!   so a torn, misplaced or stale sector is told apart) and engines over
//!   simulated devices;
//! * [`vu`]: an in-memory backend, `serve()` in a thread on a real unix socket,
//!   and a raw vhost-user frontend with guest memory that plays the guest;
//! * [`daemon`]: running the built `vhost-clone` binary (one-shot commands, a
//!   served daemon killed on drop) and a libblkio client for it;
//! * [`nbd`]: NBD servers (qemu-nbd, nbdkit, and a scripted hostile one).
//!
//! Not every target uses every helper.
#![allow(dead_code)]

pub mod daemon;
pub mod nbd;
pub mod sectors;
pub mod vu;
