// SPDX-License-Identifier: Apache-2.0

//! The `engine` test target: the clone engine, metadata and storage in
//! process, over simulated devices (`storage::SimDevice`), with no socket and
//! no binary, except where a fault must also be seen through the front
//! (faults). See docs/TESTING.md.
//!
//! Run one module with a filter: `cargo test --test engine crash::`.

#[path = "../support/mod.rs"]
mod support;

mod crash;
mod faults;
mod fuzz_inputs;
mod hydration;
mod model;
