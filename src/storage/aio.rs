// SPDX-License-Identifier: Apache-2.0

//! Direct requests: a read or write a caller issues itself, asynchronously, on a
//! device's storage, instead of through the layer that owns the device.
//!
//! * [`IoTarget`] says where such a request goes: a file descriptor (the kernel
//!   transfers the bytes, through an io_uring [`super::queue::AsyncQueue`]) or, in
//!   tests, a simulated device (the queue transfers them itself, at a completion
//!   point it picks, so the crash suite can cut the power or kill the process
//!   while requests are in flight). A device says which it takes with
//!   [`super::BlockDevice::async_io`].
//! * [`DirectIo`] is the permission for one request, granted by the layer that
//!   owns the data (the engine: only ranges whose data lives on one device and
//!   that nothing else writes). It is one object because its accounting must
//!   not be forgotten: it counts as in flight from its grant, and its
//!   [`DirectIo::finish`] (or, if the caller never finished it, its drop)
//!   reports the outcome to the granter's [`DirectIoAccount`].
//!
//! Invariant kept here: a write permit that ends without a successful
//! `finish` still reports that the destination may have been written
//! ([`DirectIoAccount::finished`] with `maybe_written`), so the next flush never
//! skips a destination that holds a write nobody counted.

use std::fmt;
use std::sync::Arc;

use super::{BlockDevice, IoFd};

/// How a device takes direct requests ([`super::BlockDevice::async_io`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncIo {
    /// readv/writev on this file descriptor (io_uring).
    Fd(IoFd),
    /// The queue performs the transfer itself with the device's own calls
    /// (the simulated device).
    Emulated,
}

/// Where one direct request goes.
#[derive(Clone)]
pub enum IoTarget {
    /// readv/writev on a file descriptor, through the queue's io_uring.
    Fd(IoFd),
    /// The device's own vectored calls, run by the queue at a completion point it
    /// picks (see [`AsyncIo::Emulated`]).
    Emulated(Arc<dyn BlockDevice>),
}

impl IoTarget {
    /// The target of direct requests on `dev`, if it takes them.
    pub fn of(dev: &Arc<dyn BlockDevice>) -> Option<IoTarget> {
        match dev.async_io()? {
            AsyncIo::Fd(f) => Some(IoTarget::Fd(f)),
            AsyncIo::Emulated => Some(IoTarget::Emulated(dev.clone())),
        }
    }

    /// Alignment of buffer addresses, buffer lengths and offsets (1: none).
    pub fn align(&self) -> usize {
        match self {
            IoTarget::Fd(f) => f.align,
            IoTarget::Emulated(_) => 1,
        }
    }
}

impl fmt::Debug for IoTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoTarget::Fd(fd) => f.debug_tuple("Fd").field(fd).finish(),
            IoTarget::Emulated(d) => f.debug_tuple("Emulated").field(d).finish(),
        }
    }
}

impl PartialEq for IoTarget {
    fn eq(&self, other: &IoTarget) -> bool {
        match (self, other) {
            (IoTarget::Fd(a), IoTarget::Fd(b)) => a == b,
            (IoTarget::Emulated(a), IoTarget::Emulated(b)) => {
                std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
            }
            _ => false,
        }
    }
}

/// What the layer that grants direct requests counts.
pub trait DirectIoAccount: Sync {
    /// A permit was granted: the request counts as in flight until `finished`.
    fn started(&self);

    /// A permit ended. `outcome` is `Some(ok)` when the caller finished it (`ok`:
    /// every byte was transferred), `None` when it was dropped unfinished (never
    /// issued, or abandoned). `maybe_written` is true for a write that may have
    /// reached the destination: a successful one, a failed one (part of it may
    /// have landed) and an abandoned one.
    fn finished(&self, write: bool, len: u64, outcome: Option<bool>, maybe_written: bool);
}

/// The permission to issue one read or write directly (see the module docs).
#[must_use = "a direct request's outcome must be reported with `finish`"]
pub struct DirectIo<'a> {
    target: IoTarget,
    write: bool,
    len: u64,
    account: &'a dyn DirectIoAccount,
    ended: bool,
}

impl<'a> DirectIo<'a> {
    /// Grants a request of `len` bytes (a write with `write`) on `target`,
    /// counted by `account` from now on.
    pub fn grant(
        account: &'a dyn DirectIoAccount,
        target: IoTarget,
        write: bool,
        len: u64,
    ) -> DirectIo<'a> {
        account.started();
        DirectIo {
            target,
            write,
            len,
            account,
            ended: false,
        }
    }

    /// Where to issue the request.
    pub fn target(&self) -> &IoTarget {
        &self.target
    }

    /// Whether the permit is for a write.
    pub fn is_write(&self) -> bool {
        self.write
    }

    /// Reports the request's completion (`ok`: every byte transferred). Call it
    /// before the requester is told, so that a flush that follows covers a write.
    pub fn finish(mut self, ok: bool) {
        self.ended = true;
        self.account
            .finished(self.write, self.len, Some(ok), self.write);
    }

    /// Gives the permit back without issuing the request: nothing was
    /// transferred (the caller sends it another way).
    pub fn cancel(mut self) {
        self.ended = true;
        self.account.finished(self.write, self.len, None, false);
    }
}

impl Drop for DirectIo<'_> {
    fn drop(&mut self) {
        if !self.ended {
            // Dropped between issue and finish: the write may have landed.
            self.account
                .finished(self.write, self.len, None, self.write);
        }
    }
}

impl fmt::Debug for DirectIo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectIo")
            .field("target", &self.target)
            .field("write", &self.write)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl DirectIoAccount for Log {
        fn started(&self) {
            self.0.lock().unwrap().push("start".into());
        }
        fn finished(&self, write: bool, _len: u64, outcome: Option<bool>, maybe_written: bool) {
            self.0
                .lock()
                .unwrap()
                .push(format!("end w={write} {outcome:?} dirty={maybe_written}"));
        }
    }

    fn target() -> IoTarget {
        IoTarget::Fd(IoFd { fd: 0, align: 1 })
    }

    /// Each way a permit can end reports once, and a write that may have landed
    /// always says so: finished, failed or dropped between issue and finish.
    #[test]
    fn every_end_of_a_permit_is_counted_once() {
        let log = Log::default();
        DirectIo::grant(&log, target(), true, 512).finish(true);
        DirectIo::grant(&log, target(), true, 512).finish(false);
        DirectIo::grant(&log, target(), false, 512).finish(true);
        drop(DirectIo::grant(&log, target(), true, 512));
        DirectIo::grant(&log, target(), true, 512).cancel();
        assert_eq!(
            *log.0.lock().unwrap(),
            [
                "start",
                "end w=true Some(true) dirty=true",
                "start",
                "end w=true Some(false) dirty=true",
                "start",
                "end w=false Some(true) dirty=false",
                "start",
                "end w=true None dirty=true",
                "start",
                "end w=true None dirty=false",
            ]
        );
    }
}
