// SPDX-License-Identifier: Apache-2.0

//! The `daemon` test target: the built `vhost-clone` binary
//! (`env!("CARGO_BIN_EXE_vhost-clone")`) run as the operator, systemd, libvirt
//! or a signal would run it, and the files shipped with it (man pages,
//! completions, units, examples). Some need system tools (systemd-analyze,
//! zsh, fish, virt-xml-validate, qemu-nbd, nbdkit, setpriv) and say so when
//! they skip. See docs/TESTING.md.
//!
//! Run one module with a filter: `cargo test --test daemon kill_restart::`.

#[path = "../support/mod.rs"]
mod support;

mod cli_serve;
mod corruption;
mod exit_codes;
mod journal_logs;
mod kill_restart;
mod libvirt_example;
mod lifecycle;
mod metrics;
mod nbd_source;
mod ops_files;
mod sandbox;
mod security;
mod standby;
mod systemd;
mod uring;
