// SPDX-License-Identifier: Apache-2.0

//! Confinement of the daemon (`serve --sandbox`): a seccomp filter per thread kind and a
//! Landlock file-system ruleset, the way virtiofsd and cloud-hypervisor confine the code
//! that parses guest input.
//!
//! This module owns which system calls each thread may make ([`seccomp`]'s tables, one
//! per [`ThreadKind`]), which paths the process may still reach after start-up
//! ([`landlock`]), and the process-wide [`Sandbox`] policy that [`spawn`] applies to every
//! service thread it starts. Invariants:
//! - with [`SandboxMode::Auto`], every thread of the daemon runs under a seccomp filter
//!   from its first instruction of service code: service threads install their own
//!   filter before running their body ([`spawn`] returns only once it is installed), and
//!   the main thread installs the front's filter before it serves guests, so the threads
//!   vhost-user-backend starts inherit it;
//! - a refused system call is never silent: the SIGSYS handler names it, the thread and
//!   its filter on stderr, then exits with [`seccomp::REFUSED_EXIT`];
//! - the Landlock ruleset is applied on the main thread before any other thread exists,
//!   so every thread is under it.

pub mod landlock;
pub mod seccomp;

use std::io;
use std::path::PathBuf;
use std::sync::OnceLock;

use seccompiler::BpfProgram;

/// `serve --sandbox` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// seccomp filters (required) and Landlock where the kernel has it.
    Auto,
    /// No confinement (a warning is logged).
    None,
}

/// The kinds of threads, each with its own seccomp allow-list
/// ([`seccomp::kind_table`]). The value tags the filter's traps (`SECCOMP_RET_DATA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ThreadKind {
    /// The thread serving vhost-user, and what it starts: vring workers, the
    /// shutdown watcher. It parses guest input, so it may not remove files.
    Front = 1,
    /// The periodic metadata committer.
    Committer = 2,
    /// The background hydrator.
    Hydrator = 3,
    /// The control server and its connections.
    Control = 4,
    /// The signal thread (sigwait).
    Signals = 5,
    /// The Prometheus metrics HTTP server.
    Metrics = 6,
    /// The sd_notify / watchdog thread.
    Notify = 7,
    /// The main thread once start-up is done: it waits for the front, then shuts
    /// down (the final commit, removing our sockets and the live map).
    Main = 8,
    /// An NBD source's connection threads: (re)connecting to the server and
    /// reading its replies.
    Source = 9,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Front,
        ThreadKind::Committer,
        ThreadKind::Hydrator,
        ThreadKind::Control,
        ThreadKind::Signals,
        ThreadKind::Metrics,
        ThreadKind::Notify,
        ThreadKind::Main,
        ThreadKind::Source,
    ];

    /// Its name in messages and in `VHOST_CLONE_TEST_REFUSE`.
    pub const fn name(self) -> &'static str {
        match self {
            ThreadKind::Front => "front",
            ThreadKind::Committer => "committer",
            ThreadKind::Hydrator => "hydrator",
            ThreadKind::Control => "control",
            ThreadKind::Signals => "signals",
            ThreadKind::Metrics => "metrics",
            ThreadKind::Notify => "notify",
            ThreadKind::Main => "main",
            ThreadKind::Source => "source",
        }
    }

    /// The kind tagged `v`.
    pub const fn from_u16(v: u16) -> Option<ThreadKind> {
        Some(match v {
            1 => ThreadKind::Front,
            2 => ThreadKind::Committer,
            3 => ThreadKind::Hydrator,
            4 => ThreadKind::Control,
            5 => ThreadKind::Signals,
            6 => ThreadKind::Metrics,
            7 => ThreadKind::Notify,
            8 => ThreadKind::Main,
            9 => ThreadKind::Source,
            _ => return None,
        })
    }
}

/// Errors of setting up the sandbox. All stop the start-up (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A filter did not compile (a bug in the tables).
    #[error("cannot build the seccomp filter of the {kind} threads")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// The cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of the {kind} thread (a kernel without seccomp filters needs --sandbox none)")]
    Apply {
        /// The thread kind.
        kind: &'static str,
        /// The cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The Landlock ruleset could not be built or applied.
    #[error("cannot apply the Landlock file-system ruleset")]
    Landlock(#[source] ::landlock::RulesetError),
}

/// The compiled filters, set once by [`Sandbox::prepare`] with [`SandboxMode::Auto`].
static FILTERS: OnceLock<Vec<(ThreadKind, BpfProgram)>> = OnceLock::new();

/// The sandbox policy of this process.
#[derive(Debug)]
pub struct Sandbox {
    mode: SandboxMode,
}

/// Directories the daemon still removes files from after start-up.
#[derive(Debug, Default)]
pub struct RuntimePaths {
    /// The vhost-user socket (absent with `--fd`).
    pub socket: Option<PathBuf>,
    /// The control socket.
    pub control: Option<PathBuf>,
    /// The live-map directory (`--runtime-dir`, absent with `none`).
    pub runtime_dir: Option<PathBuf>,
}

impl Sandbox {
    /// Compiles every thread kind's filter and installs the SIGSYS handler, before
    /// any thread is started; with [`SandboxMode::None`] only warns. Later calls in
    /// the same process keep the first policy's filters.
    pub fn prepare(mode: SandboxMode) -> Result<Sandbox, SandboxError> {
        if mode == SandboxMode::None {
            tracing::warn!(
                "--sandbox none: no seccomp filter and no Landlock ruleset; a compromised daemon can use every system call and reach every file the user can"
            );
            return Ok(Sandbox { mode });
        }
        if FILTERS.get().is_none() {
            prime_malloc();
            let mut filters = Vec::new();
            for kind in ThreadKind::ALL {
                filters.push((kind, seccomp::compile(kind)?));
            }
            seccomp::install_sigsys_handler().map_err(SandboxError::Handler)?;
            let _ = FILTERS.set(filters);
        }
        Ok(Sandbox { mode })
    }

    /// The mode.
    pub fn mode(&self) -> SandboxMode {
        self.mode
    }

    /// Limits the file system with Landlock (where the kernel has it) to removing our
    /// sockets and the live map. Call on the main thread once start-up has opened
    /// every file, before any other thread is started.
    pub fn restrict_fs(&self, paths: &RuntimePaths) -> Result<(), SandboxError> {
        if self.mode == SandboxMode::None {
            return Ok(());
        }
        landlock::restrict(paths)
    }

    /// Installs `kind`'s filter on the calling thread (the main thread, with
    /// [`ThreadKind::Main`], once the services and the front are started). Does nothing unless a
    /// policy was prepared.
    pub fn confine_current_thread(&self, kind: ThreadKind) -> Result<(), SandboxError> {
        if self.mode == SandboxMode::None {
            return Ok(());
        }
        enter(kind)
    }
}

/// Makes glibc's malloc read, before any filter, the two files it otherwise reads
/// lazily from whichever thread first needs them (an `openat` no filter allows, which
/// killed the daemon in a vring worker and in a control connection):
/// - the CPU count (/sys/devices/system/cpu/online), read the first time a thread
///   needs an arena of its own: fixed here to glibc's default limit (8 arenas per CPU
///   on 64-bit targets, 2 on 32-bit ones) with `M_ARENA_MAX`, so it is never read;
/// - /proc/sys/vm/overcommit_memory, read (then cached) the first time a thread's heap
///   shrinks: a thread here fills and frees 4 MiB of its own heap to shrink one now.
fn prime_malloc() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_cpu = if cfg!(target_pointer_width = "64") {
            8
        } else {
            2
        };
        let max = libc::c_int::try_from(cpus * per_cpu).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a malloc tunable; called before any filter and with
        // a positive value.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, max) };
        // Chunks below the mmap threshold, in the thread's own arena (no other thread
        // exists yet, so it gets a new one); freeing them coalesces into a top chunk
        // well above the trim threshold, which shrinks the heap.
        let _ = std::thread::spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..256).map(|_| vec![1u8; 16 << 10]).collect();
            drop(std::hint::black_box(blocks));
        })
        .join();
    }
}

/// Installs `kind`'s filter on the calling thread if a policy was prepared.
fn enter(kind: ThreadKind) -> Result<(), SandboxError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let Some((_, prog)) = filters.iter().find(|(k, _)| *k == kind) else {
        return Ok(());
    };
    seccompiler::apply_filter(prog).map_err(|source| SandboxError::Apply {
        kind: kind.name(),
        source,
    })?;
    #[cfg(feature = "test-hooks")]
    test_refuse(kind);
    Ok(())
}

/// Test-only: with `VHOST_CLONE_TEST_REFUSE=KIND`, a thread of that kind makes a system
/// call outside its allow-list (getppid) right after installing its filter.
#[cfg(feature = "test-hooks")]
fn test_refuse(kind: ThreadKind) {
    if std::env::var("VHOST_CLONE_TEST_REFUSE").as_deref() == Ok(kind.name()) {
        // SAFETY: getppid has no arguments and no side effect.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

/// Starts a service thread named `name` that installs `kind`'s filter (when a policy
/// was prepared) before running `f`; returns once the filter is installed, or the
/// error that kept it from being installed (then `f` never runs).
pub fn spawn<F>(kind: ThreadKind, name: &str, f: F) -> io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = enter(kind);
            let ok = r.is_ok();
            let _ = tx.send(r);
            if ok {
                f();
            }
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(io::Error::other(e))
        }
        Err(_) => {
            let _ = handle.join();
            Err(io::Error::other(format!(
                "the {name} thread ended before installing its seccomp filter"
            )))
        }
    }
}
