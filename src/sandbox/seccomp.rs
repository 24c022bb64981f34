// SPDX-License-Identifier: Apache-2.0

//! The seccomp filters: one allow-list per [`ThreadKind`], compiled with seccompiler, and
//! the SIGSYS handler that names a refused system call before the process dies.
//!
//! Invariant: every filter's default action is `SECCOMP_RET_TRAP` tagged with the
//! thread kind (in `SECCOMP_RET_DATA`, which the kernel hands to the handler as
//! `si_errno`), and the handler always writes one line to stderr and exits with
//! [`REFUSED_EXIT`]. A refused system call is therefore never silent and never
//! returns a made-up result to the caller.
//!
//! To allow a system call for a thread, add it to that kind's table below
//! ([`kind_table`]); [`BASE`] is what every thread needs (allocator, std threads,
//! tracing to stderr).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use syscalls::Sysno;

use super::{SandboxError, ThreadKind};

/// Exit status of a process whose thread made a refused system call (128 + SIGSYS,
/// what a shell shows for a death by SIGSYS).
pub const REFUSED_EXIT: i32 = 128 + libc::SIGSYS;

/// One allow-list entry.
#[derive(Debug, Clone, Copy)]
pub enum Allow {
    /// The system call, whatever its arguments.
    Any(Sysno),
    /// The system call when its argument `arg` (low 32 bits) is one of `values`.
    Arg(Sysno, u8, &'static [u64]),
}

use Allow::{Any, Arg};

// ioctl requests: the storage layer's, and std's (asm-generic/ioctls.h).
use crate::storage::{BLKDISCARD, BLKZEROOUT};
const FIONBIO: u64 = libc::FIONBIO;
const FIOCLEX: u64 = libc::FIOCLEX;

/// What every thread needs: the allocator, std's thread start and exit, locks and
/// condition variables, clocks, logging to stderr, naming the thread, and stacking a
/// narrower filter on top of this one.
pub const BASE: &[Allow] = &[
    Any(Sysno::futex),
    Any(Sysno::brk),
    Any(Sysno::mmap),
    Any(Sysno::munmap),
    Any(Sysno::mremap),
    Any(Sysno::madvise),
    Any(Sysno::mprotect),
    Any(Sysno::rt_sigprocmask),
    Any(Sysno::rt_sigreturn),
    // The kernel restarts a call a stop signal or a ptrace attach (strace, gdb)
    // interrupted through restart_syscall.
    Any(Sysno::restart_syscall),
    Any(Sysno::sigaltstack),
    Any(Sysno::rseq),
    Any(Sysno::set_robust_list),
    Any(Sysno::exit),
    Any(Sysno::exit_group),
    Any(Sysno::getrandom),
    Any(Sysno::clock_gettime),
    Any(Sysno::clock_nanosleep),
    Any(Sysno::nanosleep),
    Any(Sysno::sched_yield),
    Any(Sysno::sched_getaffinity),
    Any(Sysno::gettid),
    Any(Sysno::getpid),
    Any(Sysno::write),
    Any(Sysno::writev),
    Any(Sysno::close),
    Arg(
        Sysno::prctl,
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_GET_NAME as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
        ],
    ),
    // Installing a further filter can only narrow what a thread may do.
    Arg(Sysno::seccomp, 0, &[libc::SECCOMP_SET_MODE_FILTER as u64]),
];

/// Starting threads (std::thread and the vhost-user-backend workers).
const SPAWN: &[Allow] = &[Any(Sysno::clone3), Any(Sysno::clone)];

/// Reads, writes, flushes and hole handling on the already open source,
/// destination and metadata (`crate::storage::file`).
const DISK_IO: &[Allow] = &[
    Any(Sysno::pread64),
    Any(Sysno::pwrite64),
    Any(Sysno::preadv),
    Any(Sysno::pwritev),
    Any(Sysno::preadv2),
    Any(Sysno::pwritev2),
    Any(Sysno::fsync),
    Any(Sysno::fdatasync),
    Any(Sysno::fallocate),
    Any(Sysno::lseek),
    Any(Sysno::copy_file_range),
    Arg(Sysno::ioctl, 1, &[BLKDISCARD, BLKZEROOUT]),
];

/// The vhost-user front on its own thread, inherited by the threads it starts
/// (vhost-user-backend's vring workers, one set per connection, and the shutdown
/// watcher): the protocol socket with its fds, guest memory maps, eventfds and epoll,
/// queue I/O (blocking and io_uring), the in-flight area (a memfd). No unlink: these threads parse guest input,
/// and Landlock lets the process remove files in the socket directories (often the
/// destination's); removing ours at exit is [`MAIN`]'s.
const FRONT: &[Allow] = &[
    Any(Sysno::accept4),
    Any(Sysno::accept),
    Any(Sysno::read),
    Any(Sysno::readv),
    Any(Sysno::recvmsg),
    Any(Sysno::recvfrom),
    Any(Sysno::sendmsg),
    Any(Sysno::sendto),
    Any(Sysno::shutdown),
    Any(Sysno::getsockopt),
    Any(Sysno::epoll_create1),
    Any(Sysno::epoll_ctl),
    Any(Sysno::epoll_wait),
    Any(Sysno::epoll_pwait),
    Any(Sysno::epoll_pwait2),
    Any(Sysno::eventfd2),
    Any(Sysno::poll),
    Any(Sysno::ppoll),
    Any(Sysno::fcntl),
    Any(Sysno::fstat),
    Any(Sysno::newfstatat),
    Any(Sysno::statx),
    Any(Sysno::io_uring_setup),
    Any(Sysno::io_uring_enter),
    Any(Sysno::io_uring_register),
    Arg(Sysno::ioctl, 1, &[FIONBIO, FIOCLEX]),
    // GET_INFLIGHT_FD: the in-flight area is a memfd of ours (`virtio::inflight`).
    Arg(
        Sysno::memfd_create,
        1,
        &[crate::virtio::inflight::MEMFD_FLAGS as u64],
    ),
    Any(Sysno::ftruncate),
];

/// The main thread after start-up: it waits for the front thread, sends the last
/// `STATUS=` (`sendto` on the socket `cli::systemd` made before any filter), stops
/// the services, runs the final commit and removes our sockets (checking they are
/// still ours) and the live map. Removing files is this thread's alone: the
/// threads that parse guest input cannot.
const MAIN: &[Allow] = &[
    Any(Sysno::sendto),
    Any(Sysno::fcntl),
    Any(Sysno::unlink),
    Any(Sysno::unlinkat),
    Any(Sysno::fstat),
    Any(Sysno::newfstatat),
    Any(Sysno::statx),
];

/// Sending requests to an NBD source's server on a connection its thread made
/// (`write` for unix sockets is in [`BASE`], `sendto` is TCP's), and ending a
/// connection that stopped answering (`shutdown`): the threads that read the
/// source (front, hydrator), and every thread that may drop the last reference
/// to the engine, which closes the source (`NBD_CMD_DISC`, `shutdown`): main,
/// committer, notify (control and metrics have both calls already).
const NBD_REQUESTS: &[Allow] = &[Any(Sysno::sendto), Any(Sysno::shutdown)];

/// An NBD source's connection threads (`crate::storage::nbd`): connecting to the
/// address resolved at start-up (TCP with a timeout, or a unix socket), setting
/// socket options, negotiating, then reading replies until the connection ends.
const SOURCE: &[Allow] = &[
    Any(Sysno::socket),
    Any(Sysno::connect),
    Any(Sysno::read),
    Any(Sysno::recvfrom),
    Any(Sysno::sendto),
    Any(Sysno::poll),
    Any(Sysno::ppoll),
    Any(Sysno::fcntl),
    Any(Sysno::setsockopt),
    Any(Sysno::getsockopt),
    Any(Sysno::shutdown),
    Arg(Sysno::ioctl, 1, &[FIONBIO, FIOCLEX]),
];

/// The periodic committer: metadata writes and flushes of both files.
const COMMITTER: &[Allow] = &[];

/// The hydrator: source reads, destination writes, holes.
const HYDRATOR: &[Allow] = &[];

/// The control server and its per-connection threads: a unix socket.
const CONTROL: &[Allow] = &[
    Any(Sysno::accept4),
    Any(Sysno::accept),
    Any(Sysno::read),
    Any(Sysno::recvfrom),
    Any(Sysno::sendto),
    Any(Sysno::poll),
    Any(Sysno::fcntl),
    Any(Sysno::setsockopt),
    Any(Sysno::getsockopt),
    Any(Sysno::shutdown),
    Arg(Sysno::ioctl, 1, &[FIONBIO, FIOCLEX]),
];

/// The signal thread: waits in sigwait, then writes the shutdown eventfd.
const SIGNALS: &[Allow] = &[Any(Sysno::rt_sigtimedwait)];

/// The Prometheus metrics HTTP server (TCP) on the listener `serve` bound at
/// start-up: accepting, reading requests, writing answers, one epoll set.
const METRICS: &[Allow] = &[
    Any(Sysno::accept4),
    Any(Sysno::accept),
    Any(Sysno::read),
    Any(Sysno::readv),
    Any(Sysno::recvfrom),
    Any(Sysno::recvmsg),
    Any(Sysno::sendto),
    Any(Sysno::sendmsg),
    Any(Sysno::poll),
    Any(Sysno::ppoll),
    Any(Sysno::epoll_create1),
    Any(Sysno::epoll_ctl),
    Any(Sysno::epoll_wait),
    Any(Sysno::epoll_pwait),
    Any(Sysno::eventfd2),
    Any(Sysno::fcntl),
    Any(Sysno::setsockopt),
    Any(Sysno::getsockopt),
    Any(Sysno::getsockname),
    Any(Sysno::getpeername),
    Any(Sysno::shutdown),
    Arg(Sysno::ioctl, 1, &[FIONBIO, FIOCLEX]),
];

/// The sd_notify / watchdog thread: datagrams to `NOTIFY_SOCKET` on a socket
/// made before any filter (`cli::systemd`), waiting in poll on its stop and
/// shutdown eventfds. The main thread sends the last `STATUS=` through the same
/// socket, with the front's `sendto`.
const NOTIFY: &[Allow] = &[
    Any(Sysno::sendto),
    Any(Sysno::poll),
    Any(Sysno::ppoll),
    Any(Sysno::read),
];

/// The tables a thread of `kind` is allowed, besides [`BASE`].
pub fn kind_table(kind: ThreadKind) -> &'static [&'static [Allow]] {
    match kind {
        ThreadKind::Front => &[FRONT, DISK_IO, NBD_REQUESTS, SPAWN],
        ThreadKind::Committer => &[COMMITTER, DISK_IO, NBD_REQUESTS],
        ThreadKind::Hydrator => &[HYDRATOR, DISK_IO, NBD_REQUESTS],
        ThreadKind::Control => &[CONTROL, SPAWN],
        ThreadKind::Signals => &[SIGNALS],
        ThreadKind::Metrics => &[METRICS],
        ThreadKind::Notify => &[NOTIFY, NBD_REQUESTS],
        ThreadKind::Main => &[MAIN, DISK_IO, NBD_REQUESTS],
        ThreadKind::Source => &[SOURCE],
    }
}

fn target_arch() -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SandboxError::Compile {
        kind: "any",
        source: seccompiler::Error::Backend(e),
    })
}

/// The compiled filter of `kind`.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SandboxError> {
    let err = |source: seccompiler::BackendError| SandboxError::Compile {
        kind: kind.name(),
        source: seccompiler::Error::Backend(source),
    };
    // None: allowed whatever the arguments.
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for table in std::iter::once(BASE).chain(kind_table(kind).iter().copied()) {
        for entry in table {
            match *entry {
                Any(nr) => {
                    rules.insert(i64::from(nr.id()), None);
                }
                Arg(nr, arg, values) => {
                    let slot = rules.entry(i64::from(nr.id())).or_insert(Some(Vec::new()));
                    if let Some(list) = slot {
                        for &v in values {
                            let c = SeccompCondition::new(
                                arg,
                                SeccompCmpArgLen::Dword,
                                SeccompCmpOp::Eq,
                                v,
                            )
                            .map_err(err)?;
                            list.push(SeccompRule::new(vec![c]).map_err(err)?);
                        }
                    }
                }
            }
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        target_arch()?,
    )
    .map_err(err)?;
    let mut prog: BpfProgram = filter.try_into().map_err(err)?;
    // Tag every trap with the thread kind: the kernel passes SECCOMP_RET_DATA to the
    // SIGSYS handler as si_errno, which names the filter even in threads that
    // inherited it (vring workers).
    const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    for insn in &mut prog {
        if insn.code == BPF_RET_K && insn.k == libc::SECCOMP_RET_TRAP {
            insn.k |= u32::from(kind as u16);
        }
    }
    Ok(prog)
}

/// Installs the SIGSYS handler (process-wide).
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; every field we rely on is set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigfillset(&mut sa.sa_mask) };
    // SAFETY: `sa` is fully initialised and its handler is an `extern "C"` function with
    // the SA_SIGINFO signature that only calls async-signal-safe functions.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Offset of `si_syscall` in `siginfo_t`, in `c_int`s (linux/signal.h: three ints,
/// padding to 8 bytes on 64-bit targets, `void *_call_addr`, then `int _syscall`).
#[cfg(target_pointer_width = "64")]
const SI_SYSCALL_INT: usize = 6;
#[cfg(target_pointer_width = "32")]
const SI_SYSCALL_INT: usize = 4;

/// A fixed buffer the handler formats its line into (no allocation in a handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Whether stderr is the journal's stream: the handler then leads its line with
/// sd-daemon's `<2>` (critical), so `journalctl -p warning` shows it. An atomic
/// load is async-signal-safe.
pub static JOURNAL_PREFIX: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Formats the handler's message (separate for unit tests).
fn format_refusal(nr: i32, kind: u16, comm: &[u8], journal: bool) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    if journal {
        line.push(b"<2>");
    }
    line.push(b"vhost-clone: seccomp refused syscall ");
    let name = usize::try_from(nr)
        .ok()
        .and_then(Sysno::new)
        .map_or("unknown", |s| s.name());
    line.push(name.as_bytes());
    line.push(b" (");
    if nr < 0 {
        line.push(b"-");
    }
    line.push_num(u64::from(nr.unsigned_abs()));
    line.push(b") in thread ");
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    line.push(&comm[..end]);
    line.push(b" (filter ");
    line.push(
        ThreadKind::from_u16(kind)
            .map_or("unknown", |k| k.name())
            .as_bytes(),
    );
    line.push(b"); exiting (--sandbox none turns the sandbox off)\n");
    line
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; for a
    // SIGSYS from SECCOMP_RET_TRAP si_errno holds SECCOMP_RET_DATA and the int at
    // SI_SYSCALL_INT is si_syscall.
    let (nr, data) = unsafe {
        (
            *(info as *const libc::c_int).add(SI_SYSCALL_INT),
            (*info).si_errno,
        )
    };
    let mut comm = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the 17-byte buffer; every filter
    // allows it.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    let journal = JOURNAL_PREFIX.load(std::sync::atomic::Ordering::Relaxed);
    let line = format_refusal(nr, data as u16, &comm, journal);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer outlives the call.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(REFUSED_EXIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for k in ThreadKind::ALL {
            let p = compile(k).unwrap();
            assert!(!p.is_empty());
            assert!(p.len() < 4096, "{k:?}: {} instructions", p.len());
        }
    }

    /// The threads that parse guest input (the front and the vring workers it
    /// starts) cannot remove or rename files, even where Landlock allows it (the
    /// socket directory is often the destination's).
    #[test]
    fn guest_facing_threads_cannot_remove_files() {
        let removing = [
            Sysno::unlink,
            Sysno::unlinkat,
            Sysno::rmdir,
            Sysno::rename,
            Sysno::renameat,
            Sysno::renameat2,
            Sysno::truncate,
            Sysno::open,
            Sysno::openat,
        ];
        for table in std::iter::once(BASE).chain(kind_table(ThreadKind::Front).iter().copied()) {
            for entry in table {
                let (Any(nr) | Arg(nr, _, _)) = *entry;
                assert!(!removing.contains(&nr), "the front may call {nr:?}");
            }
        }
    }

    #[test]
    fn refusal_line_names_the_call_thread_and_filter() {
        let l = format_refusal(
            Sysno::getppid.id(),
            ThreadKind::Hydrator as u16,
            b"hydrator\0junk",
            false,
        );
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "vhost-clone: seccomp refused syscall getppid (110) in thread hydrator (filter hydrator); exiting (--sandbox none turns the sandbox off)\n"
        );
        let l = format_refusal(99999, 0, b"", true);
        let text = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(
            text.starts_with("<2>vhost-clone: seccomp refused"),
            "{text}"
        );
        assert!(text.contains("unknown (99999) in thread  (filter unknown)"));
    }
}
