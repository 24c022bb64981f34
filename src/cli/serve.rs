//! `vhost-clone serve`: the daemon's composition root.
//!
//! Start-up runs in this order, and a refused start stops before the step that
//! would change anything it must not: it leaves no file it created, changes no
//! byte of a file that existed, starts no thread and prints no banner.
//!
//! 1. Signals (SIGTERM, SIGINT, SIGHUP) are blocked in every thread, so that
//!    one arriving during start-up waits for the signal thread (a clean stop).
//! 2. The stores are opened and locked ([`super::stores`]): one daemon per clone,
//!    three different files, new metadata only when it is missing or zero.
//! 3. The vhost-user and control sockets are bound ([`crate::socket`]): a live
//!    socket is refused and left alone; then the metrics address, if any.
//! 4. The metadata is formatted (a new clone) and opened with its live region
//!    map ([`crate::metadata::live`]); bits a dead process of this boot left
//!    uncommitted are adopted.
//! 5. The recovery commit: the destination is flushed (it may hold writes the
//!    dead process completed) and adopted bits are committed.
//! 6. Services start: the signal thread, the periodic committer, the hydrator,
//!    the hydration-rate sampler, the control server, the metrics endpoint;
//!    then the vhost-user front serves, on its own thread, until a signal;
//!    the main thread confines itself, sends READY=1 and waits for it.
//!
//! A standby (`--standby`, the target daemon of a migration over shared
//! storage) reorders this: before step 2 it reads the clone's shape from the
//! superblock without the lock ([`metadata::peek_superblock`]) and refuses
//! what a takeover would refuse; it binds the sockets (3), starts the signal
//! thread, the control socket (answering `standby: ...`) and the front over a
//! [`Standby`] disk with gated queues ([`Frontends::gated`]: requests wait in
//! their rings), and sends READY=1. Once a frontend started its queues, it
//! retries step 2 every [`STANDBY_POLL`] until the locks are free, checks the
//! store is the clone it answered for, runs 4 to 6 as above, and hands the
//! disk to the front ([`Standby::take_over`]), which opens the gate. A stop
//! before that leaves the waiting requests unanswered and exits 0.
//!
//! Shutdown runs in reverse ([`Services`] drops in that order too): the front
//! stops popping requests, retires the ones in flight and closes the
//! connection; the metrics endpoint, the hydrator, the committer and the rate
//! sampler stop; the control server stops and removes its socket;
//! the final commit; the live map file is removed when everything is committed;
//! the vhost-user socket is removed; the locks go with the files.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::{SigSet, Signal};

use super::stores::{MetadataState, StoreOptions, StorePaths, Stores};
use super::systemd::{self, Notifier, Watched};
use super::{parse_region_size, with_suffix, CliError, Result};
use crate::control::{ControlServer, Identity, StatusReporter};
use crate::disk::{CloneDisk, Shape, Standby};
use crate::engine::commit::Committer;
use crate::engine::hydrator::{
    self, HydrationControl, Hydrator, HydratorTiming, DEFAULT_BATCH_SIZE, DEFAULT_THRESHOLD,
};
use crate::engine::{DestFlush, Engine, EngineConfig, EngineError};
use crate::metadata::format::Superblock;
use crate::metadata::live::{Found, LiveError, LiveIdentity, LiveMap, DEFAULT_RUNTIME_DIR};
use crate::metadata::{self, Metadata, MetadataError, Mode};
use crate::metrics::{MetricsError, MetricsServer};
use crate::sandbox::{RuntimePaths, Sandbox, SandboxError, SandboxMode, ThreadKind};
use crate::socket::{BoundSocket, SocketAccess, SocketError};
use crate::storage::{io_alignment, BlockDevice, FileDevice, OpenOptions, StorageError};
use crate::virtio::handover::Frontends;
use crate::virtio::{self, BlockBackend, IoEngine, ServeOptions, ShutdownSignal, VirtioError};

/// `serve` arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The source image, opened read-only and never written: a file or block
    /// device, or an NBD export (nbd://HOST[:PORT]/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH). May be left out once hydration is complete.
    #[arg(long, short = 's', value_name = "PATH|URI")]
    pub source: Option<PathBuf>,
    /// The destination (created with the source's size if missing).
    #[arg(long, short = 'd', required_unless_present = "print_capabilities")]
    pub dest: Option<PathBuf>,
    /// The metadata file [default: DEST.meta]; formatted on first start.
    #[arg(long, short = 'm')]
    pub metadata: Option<PathBuf>,
    /// The vhost-user socket to create (mode 0600) [default: DEST.sock].
    #[arg(long, conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Group of the vhost-user socket, a name or a number (e.g. libvirt-qemu, the
    /// group libvirt runs QEMU in); makes the default --socket-mode 0660.
    #[arg(long, value_name = "GROUP", value_parser = crate::socket::parse_socket_group, conflicts_with = "fd")]
    pub socket_group: Option<crate::socket::SocketGroup>,
    /// Mode of the vhost-user socket, octal, never writable by others (connecting
    /// needs write) [default: 0600, or 0660 with --socket-group].
    #[arg(long, value_name = "MODE", value_parser = crate::socket::parse_socket_mode, conflicts_with = "fd")]
    pub socket_mode: Option<u32>,
    /// Serve on an inherited, listening unix socket instead of creating one.
    #[arg(long)]
    pub fd: Option<i32>,
    /// The control socket for `status` and `message` [default: SOCKET.ctl, or DEST.ctl with --fd].
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Number of request queues, one worker thread each [default: the number of
    /// CPUs, at most 16, which is what QEMU's vhost-user-blk-pci asks for by default].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: Option<u16>,
    /// Largest virtqueue size a frontend may choose (power of two).
    #[arg(long, default_value_t = 1024, value_parser = super::parse_queue_size)]
    pub queue_size: u16,
    /// Region size for a new clone (power of two, 4K..1G); must match an existing one.
    #[arg(long, short = 'r', value_parser = parse_region_size)]
    pub region_size: Option<u64>,
    /// For a new clone: regions that may be partly written at once (see `create
    /// --partial-regions`); 0: none (metadata version 1). Must match an existing one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub partial_regions: Option<u64>,
    /// Offer a read-only disk to the guest (no writes, no hydration; `--readonly` is an alias).
    #[arg(long, alias = "readonly")]
    pub read_only: bool,
    /// The disk's serial number (GET_ID), at most 20 bytes.
    #[arg(long, default_value = "vhost-clone", value_parser = super::parse_serial)]
    pub serial: String,
    /// Seconds between periodic metadata commits (0 disables them).
    #[arg(long, default_value_t = 1.0, value_parser = |s: &str| super::parse_seconds(s, 0.0))]
    pub commit_interval: f64,
    /// With an NBD source: seconds a source read may wait for the server,
    /// reconnecting included, before it fails with an I/O error.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0, value_parser = |s: &str| super::parse_seconds(s, 0.1))]
    pub source_timeout: f64,
    /// With an NBD source that allows several connections (NBD_FLAG_CAN_MULTI_CONN):
    /// how many to open, 1 to 16.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub source_connections: u16,
    /// Do not pass discards of hydrated ranges down to the destination.
    #[arg(long)]
    pub no_discard_passdown: bool,
    /// Start with background hydration disabled (`message enable-hydration` starts it).
    #[arg(long)]
    pub no_hydration: bool,
    /// Regions in flight at most for background hydration (0 pauses it; at most 65536).
    #[arg(long, default_value_t = DEFAULT_THRESHOLD, value_parser = parse_threshold)]
    pub hydration_threshold: u64,
    /// Adjacent regions copied together by background hydration (at most 4096).
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = parse_batch_size)]
    pub hydration_batch_size: u64,
    /// Bytes per second background hydration may read from the source, for a source
    /// shared with others (guest reads are never held back): digits with an optional
    /// binary K, M, G or T and an optional /s (100M = 100 MiB/s); 0 is unlimited.
    /// `message hydration-rate RATE` changes it at run time.
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = crate::engine::throttle::parse_rate)]
    pub hydration_rate: u64,
    /// Write all-zero source data as holes on the destination.
    #[arg(long)]
    pub detect_zeroes: bool,
    /// Open source and destination with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// How queues execute reads and writes (and the region copies of writes into
    /// unhydrated regions): `uring` keeps many in flight per queue through io_uring,
    /// `sync` does one blocking call at a time; `auto` picks `uring` with --direct and
    /// `sync` otherwise.
    #[arg(long, value_enum, default_value_t = IoEngineArg::Auto)]
    pub io_engine: IoEngineArg,
    /// With the io_uring engine and a frontend that keeps an in-flight area (QEMU's
    /// INFLIGHT_SHMFD), complete requests as they finish instead of in the order they
    /// were taken from the queue. Correct either way (a restart resubmits what was
    /// in flight); measured slower for a TCG guest at QD32, it may help on disks
    /// whose latency varies widely.
    #[arg(long)]
    pub retire_out_of_order: bool,
    /// Interrupt moderation: while a driver keeps two or more requests in flight
    /// on a queue and sends them one by one, wait up to this many microseconds
    /// for its next request before interrupting it, so that one interrupt
    /// covers more completions (an emulated guest pays dearly for each). The
    /// wait adapts to the driver and stops when it does not pay; a driver at
    /// queue depth 1 is never kept waiting. 0 (or anything below 10) turns it
    /// off.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 150, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub interrupt_hold: u32,
    /// Where the live region map is kept: a RAM file system that outlives this
    /// process but not a reboot, so that a restart after kill -9 keeps every
    /// acknowledged write; `none` keeps it in process memory only.
    #[arg(long, default_value = DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (an IP address and
    /// a port; port 0 picks a free one, which `status` shows).
    #[arg(long, value_name = "HOST:PORT", value_parser = crate::metrics::parse_address)]
    pub metrics_address: Option<SocketAddr>,
    /// Confinement: `auto` installs a seccomp filter per thread and, where the kernel
    /// has Landlock, limits the file system to removing our sockets and live map;
    /// `none` turns both off (a warning is logged).
    #[arg(long, value_enum, default_value_t = SandboxMode::Auto)]
    pub sandbox: SandboxMode,
    /// Stand by for a migration over shared storage: answer frontends at once with
    /// the clone's shape (read from its metadata), and once a frontend started its
    /// queues here and the daemon that serves the clone stopped, take the clone
    /// over, with everything that daemon committed, and serve it. The clone must exist.
    #[arg(long)]
    pub standby: bool,
    /// Print QEMU's vhost-user capabilities JSON and exit (as `vhost-clone --print-capabilities`).
    #[arg(long)]
    pub print_capabilities: bool,
}

fn parse_threshold(s: &str) -> std::result::Result<u64, String> {
    hydrator::check_threshold(s.parse().map_err(|e| format!("{e}"))?)
}

fn parse_batch_size(s: &str) -> std::result::Result<u64, String> {
    hydrator::check_batch_size(s.parse().map_err(|e| format!("{e}"))?)
}

/// `--io-engine` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngineArg {
    /// `uring` with --direct, `sync` otherwise.
    Auto,
    /// io_uring, many requests in flight per queue.
    Uring,
    /// One blocking system call at a time per queue.
    Sync,
}

impl IoEngineArg {
    fn resolve(self, direct: bool) -> IoEngine {
        match self {
            IoEngineArg::Uring => IoEngine::Uring,
            IoEngineArg::Sync => IoEngine::Sync,
            IoEngineArg::Auto if direct => IoEngine::Uring,
            IoEngineArg::Auto => IoEngine::Sync,
        }
    }
}

/// Errors of the daemon once its arguments and stores were accepted. All
/// exit with status 1.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding or adopting a socket failed.
    #[error("{which} socket")]
    Socket {
        /// Which socket.
        which: &'static str,
        /// The cause.
        #[source]
        source: SocketError,
    },
    /// The live region map could not be set up.
    #[error("cannot set up the live region map (--runtime-dir)")]
    Live(#[source] LiveError),
    /// The metadata could not be opened.
    #[error("metadata {path}")]
    Metadata {
        /// The metadata path.
        path: String,
        /// The cause.
        #[source]
        source: MetadataError,
    },
    /// The devices do not fit together.
    #[error("cannot serve this clone")]
    Engine(#[source] EngineError),
    /// The start-up flush and commit failed.
    #[error("the start-up commit (destination flush, then metadata) failed")]
    Recovery(#[source] EngineError),
    /// Blocking signals or starting a thread failed.
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] io::Error),
    /// The control server failed to start.
    #[error("control socket")]
    Control(#[source] crate::control::ControlError),
    /// The metrics endpoint could not be bound or started.
    #[error("metrics endpoint (--metrics-address)")]
    Metrics(#[source] MetricsError),
    /// The vhost-user front failed.
    #[error("vhost-user front")]
    Virtio(#[source] VirtioError),
    /// The sandbox could not be set up.
    #[error("sandbox (--sandbox)")]
    Sandbox(#[source] SandboxError),
    /// A standby could not hand the clone to its front.
    #[error("cannot take the clone over: {0}")]
    Takeover(String),
    /// The final commit failed: what was acknowledged is in the live map, and
    /// the next start on this boot commits it.
    #[error("the final commit failed")]
    FinalCommit(#[source] EngineError),
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread, and so in every
/// thread it starts afterwards. Returns the set.
fn block_signals() -> io::Result<SigSet> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()?;
    Ok(set)
}

/// Turns the blocked signals of `set` into `shutdown.trigger()` on a thread.
fn start_signal_thread(set: SigSet, shutdown: ShutdownSignal) -> io::Result<()> {
    crate::sandbox::spawn(ThreadKind::Signals, "signals", move || loop {
        // `set` is blocked in every thread, so its signals wait here. sigwait
        // fails only for an invalid set (glibc retries EINTR itself), and this
        // one holds three valid signals: nix's `wait`, which would misread a
        // failure, never sees one.
        if let Ok(sig) = set.wait() {
            tracing::info!(
                signal = %sig,
                "stopping: no new requests, finishing those in flight, then a final commit"
            );
            shutdown.trigger();
        }
    })?;
    Ok(())
}

/// The daemon's running services, declared in shutdown order (fields drop
/// from the first to the last).
struct Services {
    metrics: Option<MetricsServer>,
    hydrator: Option<Hydrator>,
    committer: Option<Committer>,
    rate_sampler: Committer,
    control: ControlServer,
}

impl Services {
    /// Stops the services, in order.
    fn stop(self) {
        let Services {
            metrics,
            hydrator,
            committer,
            rate_sampler,
            control,
        } = self;
        drop(metrics);
        drop(hydrator);
        drop(committer);
        drop(rate_sampler);
        drop(control);
    }
}

/// Resolved paths and settings.
struct Plan {
    stores: StorePaths,
    socket_path: Option<PathBuf>,
    control_path: PathBuf,
    runtime_dir: Option<PathBuf>,
    num_queues: u16,
    /// `--commit-interval`, `None` for 0 (no periodic commits).
    commit_interval: Option<Duration>,
}

impl Plan {
    fn new(a: &ServeArgs, activated: Option<&systemd::Activated>) -> Result<Plan> {
        let Some(dest) = &a.dest else {
            return Err(CliError::Usage("serve needs --dest".into()));
        };
        let metadata = a
            .metadata
            .clone()
            .unwrap_or_else(|| with_suffix(dest, ".meta"));
        let socket_path = match (&a.socket_path, a.fd.is_some() || activated.is_some()) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => None,
            (None, false) => Some(with_suffix(dest, ".sock")),
        };
        let control_path = activated
            .and_then(systemd::Activated::control_path)
            .or_else(|| a.control_socket.clone())
            .unwrap_or_else(|| match &socket_path {
                Some(s) => with_suffix(s, ".ctl"),
                None => with_suffix(dest, ".ctl"),
            });
        if socket_path.as_ref() == Some(&control_path) {
            return Err(CliError::Usage(
                "the vhost-user socket and the control socket must differ".into(),
            ));
        }
        let runtime_dir = match a.runtime_dir.as_os_str().to_str() {
            Some("none") => None,
            _ => Some(a.runtime_dir.clone()),
        };
        Ok(Plan {
            // parse_seconds bounded it to 0..=86400 s.
            commit_interval: (a.commit_interval > 0.0)
                .then(|| Duration::from_secs_f64(a.commit_interval)),
            stores: StorePaths {
                source: a.source.clone(),
                dest: dest.clone(),
                metadata,
            },
            socket_path,
            control_path,
            runtime_dir,
            num_queues: a.num_queues.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get().min(16) as u16)
                    .unwrap_or(1)
            }),
        })
    }
}

/// How often a standby tries the clone's locks.
const STANDBY_POLL: Duration = Duration::from_millis(100);

/// The shape a standby tells frontends, read from the clone's superblock
/// without its lock (the owner may be committing): refuses, before anything is
/// bound, what a takeover would refuse later (a missing or new clone, a missing
/// destination, paths naming one file, a file source of another size, another
/// region size, no source for a clone that is not complete).
fn standby_disk(plan: &Plan, a: &ServeArgs) -> Result<(Standby, Superblock)> {
    let md_path = &plan.stores.metadata;
    let gone = |what: &str, p: &std::path::Path| {
        CliError::Usage(format!(
            "--standby takes over an existing clone, but its {what} {} does not exist; the clone's files must be reachable here (shared storage)",
            p.display()
        ))
    };
    if !md_path.exists() {
        return Err(gone("metadata", md_path));
    }
    if !plan.stores.dest.exists() {
        return Err(gone("destination", &plan.stores.dest));
    }
    let md = FileDevice::open(
        md_path,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )?;
    let sb = match metadata::peek_superblock(&md) {
        Err(MetadataError::Blank) => {
            return Err(CliError::Usage(format!(
                "--standby takes over an existing clone, but {} is blank: serve the new clone without --standby first",
                md_path.display()
            )))
        }
        r => r.map_err(|source| CliError::Metadata {
            path: md_path.display().to_string(),
            source,
        })?,
    };
    let geo = sb.geometry;
    if let Some(given) = a.region_size.filter(|r| *r != geo.region_size()) {
        return Err(CliError::RegionSizeMismatch {
            path: md_path.display().to_string(),
            stored: geo.region_size(),
            given,
        });
    }
    if plan.stores.source.is_none() && sb.hydrated < geo.nr_regions() {
        return Err(CliError::Usage(format!(
            "no --source given, but only {} of {} regions are hydrated; the source is needed until hydration completes",
            sb.hydrated,
            geo.nr_regions()
        )));
    }
    Stores::check_standby(&plan.stores, &geo, a.direct)?;
    let shape = Shape {
        size: geo.device_size(),
        read_only: a.read_only,
        optimal_io_size: crate::disk::optimal_io_size(geo.region_size()),
        logical_block_size: crate::disk::logical_block_size(io_alignment(a.direct)),
    };
    tracing::info!(geometry = %geo, "standby: the clone's shape, from its superblock");
    Ok((Standby::new(shape, sb.write_cache().unwrap_or(true)), sb))
}

/// A standby's wait for the clone: opens and locks the stores once a frontend
/// started its queues here (a migration's target after switch-over: before
/// that, a lock released by a restart of the serving daemon is not the
/// standby's to take) and nobody holds the locks. Refuses a clone that is not
/// the one the frontends were told about. `None` when the daemon is told to
/// stop first, or its front ended.
fn open_when_free(
    plan: &Plan,
    opts: StoreOptions,
    told: &Superblock,
    shutdown: &ShutdownSignal,
    front: &StandbyFront,
) -> Result<Option<Stores>> {
    let mut said = false;
    loop {
        if front.frontends.wanted() {
            match Stores::open(&plan.stores, opts) {
                Ok(stores) => {
                    let found = match &stores.state {
                        MetadataState::Existing(l) => {
                            Some((l.superblock.uuid, l.superblock.geometry))
                        }
                        MetadataState::New => None,
                    };
                    if found != Some((told.uuid, told.geometry)) {
                        return Err(CliError::Refused(format!(
                            "{} is no longer the clone this standby answered for (clone {}, {}): it was removed or formatted again meanwhile",
                            plan.stores.metadata.display(),
                            uuid::Uuid::from_bytes(told.uuid),
                            told.geometry
                        )));
                    }
                    tracing::info!("standby: the clone's lock is free; taking the clone over");
                    return Ok(Some(stores));
                }
                Err(CliError::Storage(StorageError::Locked { path, holder })) => {
                    if !said {
                        said = true;
                        tracing::info!(
                            holder = holder.as_deref().unwrap_or("unknown"),
                            "standby: a frontend started its queues; {path} is in use, taking the clone over once it is released"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if shutdown.wait_timeout(STANDBY_POLL) || front.ended() {
            return Ok(None);
        }
    }
}

/// The vhost-user front, serving on its own thread under the front's filter
/// (inherited by the vring workers it starts): the threads that parse guest
/// input cannot remove files. The socket is removed when the main thread
/// drops the last reference, under the main filter, which can (also if the
/// front panics).
struct Front {
    thread: std::thread::JoinHandle<()>,
    done: std::sync::mpsc::Receiver<std::result::Result<(), VirtioError>>,
    socket: Arc<BoundSocket>,
}

impl Front {
    fn start(
        backend: Arc<dyn BlockBackend>,
        opts: ServeOptions,
        socket: BoundSocket,
        shutdown: &ShutdownSignal,
    ) -> std::result::Result<Front, ServeError> {
        let socket = Arc::new(socket);
        let (tx, done) = std::sync::mpsc::sync_channel(1);
        let (front_socket, front_shutdown) = (socket.clone(), shutdown.clone());
        let thread = crate::sandbox::spawn(ThreadKind::Front, "vhost-user", move || {
            let _ = tx.send(virtio::serve_on(
                backend,
                &opts,
                &front_socket,
                &front_shutdown,
            ));
        })
        .map_err(|e| ServeError::Thread("vhost-user", e))?;
        Ok(Front {
            thread,
            done,
            socket,
        })
    }

    /// The front stopped serving (a stop request, an error, a panic).
    fn ended(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the front to stop. A panic stops the daemon like a signal
    /// would (with the final commit). Returns the socket, which the caller
    /// removes by dropping it (the daemon after its final commit).
    fn wait(
        self,
        shutdown: &ShutdownSignal,
    ) -> (std::result::Result<(), ServeError>, Arc<BoundSocket>) {
        let served = self.done.recv().map_err(|_| {
            shutdown.trigger();
            ServeError::Thread("vhost-user", io::Error::other("the front thread panicked"))
        });
        let _ = self.thread.join();
        (
            served.and_then(|r| r.map_err(ServeError::Virtio)),
            self.socket,
        )
    }
}

/// A standby's front, started before the clone was opened. Until the takeover
/// ([`StandbyFront::take_over`]), an early return (a failed start) stops it
/// before the error is reported; its requests stay unanswered in their rings.
struct StandbyFront {
    standby: Arc<Standby>,
    /// Gated until the takeover ([`Frontends::gated`]).
    frontends: Arc<Frontends>,
    front: Option<Front>,
    shutdown: ShutdownSignal,
}

impl StandbyFront {
    /// Hands the clone to the front and lets its queues run.
    fn take_over(mut self, disk: CloneDisk) -> std::result::Result<Front, ServeError> {
        self.standby.take_over(disk).map_err(ServeError::Takeover)?;
        self.frontends.open_gate();
        Ok(self.front.take().expect("taken over once"))
    }

    /// The front stopped serving while standing by.
    fn ended(&self) -> bool {
        self.front.as_ref().is_none_or(Front::ended)
    }

    /// Stops the front: its requests stay unanswered in their rings (any that
    /// reached the standby fail with `why`).
    fn stop(mut self, why: &str) -> std::result::Result<(), ServeError> {
        self.halt(why)
    }

    fn halt(&mut self, why: &str) -> std::result::Result<(), ServeError> {
        let Some(front) = self.front.take() else {
            return Ok(());
        };
        self.standby.abandon(why);
        self.shutdown.trigger();
        front.wait(&self.shutdown).0
    }
}

impl Drop for StandbyFront {
    fn drop(&mut self) {
        let _ = self.halt("the daemon failed to take the clone over (see its log)");
    }
}

/// Runs `serve`.
pub fn serve(a: &ServeArgs) -> Result<()> {
    if a.print_capabilities {
        println!("{}", virtio::print_capabilities());
        return Ok(());
    }
    // Socket activation: read (and removed from the environment) before any thread starts.
    let mut activated = systemd::take_activation(a)?;
    let plan = Plan::new(a, activated.as_ref())?;
    let signals = block_signals().map_err(|e| ServeError::Thread("signals", e))?;
    let sandbox = Sandbox::prepare(a.sandbox).map_err(ServeError::Sandbox)?;
    crate::sandbox::seccomp::JOURNAL_PREFIX.store(
        super::logging::to_journal(),
        std::sync::atomic::Ordering::Relaxed,
    );

    // 2. The stores, locked. A standby knows the clone by its superblock until
    // it can lock them (below).
    let store_opts = StoreOptions {
        region_size: a.region_size,
        partial_slots: a.partial_regions,
        direct: a.direct,
        reformat: false,
        network: super::stores::NetworkOptions {
            timeout: Duration::from_secs_f64(a.source_timeout),
            connections: a.source_connections.into(),
        },
    };
    let (stores, standby) = if a.standby {
        let (disk, told) = standby_disk(&plan, a)?;
        (None, Some((Arc::new(disk), told)))
    } else {
        (Some(Stores::open(&plan.stores, store_opts)?), None)
    };
    // 3. The sockets: the control socket first, so that it exists once the
    // vhost-user socket (what QEMU and scripts wait for) appears.
    let control_socket = match activated.as_mut().and_then(|s| s.control.take()) {
        Some(s) => s,
        None => BoundSocket::bind(&plan.control_path).map_err(|source| ServeError::Socket {
            which: "control",
            source,
        })?,
    };
    // The control socket stays private: only the vhost-user socket is shared.
    let access = SocketAccess::new(a.socket_mode, a.socket_group.clone());
    let vhost_socket = match (activated, &plan.socket_path, a.fd) {
        (Some(s), _, _) => Ok(s.vhost_user),
        (None, Some(p), _) => BoundSocket::bind_with(p, &access),
        (None, None, Some(fd)) => BoundSocket::adopt_fd(fd),
        (None, None, None) => unreachable!("Plan::new sets one of them"),
    }
    .map_err(|source| ServeError::Socket {
        which: "vhost-user",
        source,
    })?;
    let metrics_listener = a
        .metrics_address
        .map(crate::metrics::bind)
        .transpose()
        .map_err(ServeError::Metrics)?;
    let shutdown = ShutdownSignal::new().map_err(|e| ServeError::Thread("signals", e))?;
    let frontends = Arc::new(match a.standby {
        true => Frontends::gated(),
        false => Frontends::default(),
    });
    let opts = ServeOptions {
        socket_path: plan.socket_path.clone(),
        listen_fd: a.fd,
        num_queues: plan.num_queues,
        queue_size: a.queue_size,
        serial: a.serial.clone(),
        read_only: a.read_only,
        discard: true,
        name: "vhost-clone".into(),
        io_engine: a.io_engine.resolve(a.direct),
        retire_out_of_order: a.retire_out_of_order,
        interrupt_hold: Duration::from_micros(u64::from(a.interrupt_hold)),
        frontends: frontends.clone(),
    };

    // A standby serves frontends now and waits for the clone. The threads it
    // starts for that (and those the front starts later) run under their seccomp
    // filters only, none of which may open or remove a file: Landlock must come
    // after the last open, and covers the main thread and the later services.
    let mut signals = Some(signals);
    let mut control_socket = Some(control_socket);
    let mut vhost_socket = Some(vhost_socket);
    let mut early = None;
    let mut stores = match (stores, standby) {
        (Some(stores), _) => stores,
        (None, Some((standby, told))) => {
            if let Some(set) = signals.take() {
                start_signal_thread(set, shutdown.clone())
                    .map_err(|e| ServeError::Thread("signals", e))?;
            }
            let control = ControlServer::start_standby(
                control_socket.take().expect("bound above"),
                systemd::STANDBY_WAITING.into(),
            )
            .map_err(ServeError::Control)?;
            let notifier = Notifier::start(None, &shutdown);
            let front = Front::start(
                standby.clone(),
                opts.clone(),
                vhost_socket.take().expect("bound above"),
                &shutdown,
            )?;
            let front = StandbyFront {
                standby,
                frontends: frontends.clone(),
                front: Some(front),
                shutdown: shutdown.clone(),
            };
            if let Some(p) = &plan.socket_path {
                super::say(&format!(
                    "vhost-clone: standing by for {} on {}: {}",
                    plan.stores.dest.display(),
                    p.display(),
                    systemd::STANDBY_WAITING
                ));
            }
            // READY=1 for a standby: frontends get their answers.
            notifier.ready();
            let waited = open_when_free(&plan, store_opts, &told, &shutdown, &front);
            match waited {
                Ok(Some(stores)) => {
                    early = Some((front, control, notifier));
                    stores
                }
                Ok(None) => {
                    notifier.stopping("the standby stops without taking the clone over");
                    front.stop("the standby daemon stopped before it took the clone over")?;
                    drop(control);
                    tracing::info!("stopped without taking the clone over");
                    return Ok(());
                }
                Err(e) => {
                    front.stop("the standby daemon could not take the clone over (see its log)")?;
                    return Err(e);
                }
            }
        }
        (None, None) => unreachable!("one of the two is set above"),
    };

    // 4. The metadata and its live map.
    let md_path = plan.stores.metadata.display().to_string();
    let md_err = |source| ServeError::Metadata {
        path: md_path.clone(),
        source,
    };
    if stores.format_if_new()? {
        tracing::info!(geometry = %stores.geometry, "formatted new clone metadata");
    }
    let MetadataState::Existing(loaded) = std::mem::replace(&mut stores.state, MetadataState::New)
    else {
        unreachable!("format_if_new leaves an existing store");
    };
    let geo = stores.geometry;
    let slots = loaded.superblock.partial.slots;
    let live = match &plan.runtime_dir {
        Some(dir) => {
            let dest_id = stores.dest.id();
            let id = LiveIdentity::current(
                loaded.superblock.uuid,
                &geo,
                slots,
                (dest_id.dev, dest_id.ino),
            )
            .map_err(|source| {
                ServeError::Live(LiveError::Io {
                    path: "/proc/sys/kernel/random/boot_id".into(),
                    source,
                })
            })?;
            let (live, found) = LiveMap::open(dir, &id).map_err(ServeError::Live)?;
            if let Found::Replaced(why) = &found {
                tracing::info!(path = ?live.path(), "replacing a live region map: {why}");
            }
            live
        }
        None => {
            tracing::warn!(
                "--runtime-dir none: bits set since the last commit die with the process; a restart after kill -9 may lose acknowledged writes"
            );
            LiveMap::anonymous(geo.nr_regions(), slots)
        }
    };
    let md_dev: Arc<dyn BlockDevice> = stores.metadata.clone();
    let md = Arc::new(Metadata::from_loaded(md_dev, *loaded, live).map_err(md_err)?);
    if stores.source.is_none() && !md.all_hydrated() {
        return Err(CliError::Usage(format!(
            "no --source given, but only {} of {} regions are hydrated; the source is needed until hydration completes",
            md.hydrated_count(),
            geo.nr_regions()
        )));
    }
    let engine = Arc::new(
        Engine::new(
            stores.source.clone(),
            stores.dest.clone(),
            md.clone(),
            EngineConfig {
                discard_passdown: !a.no_discard_passdown,
            },
        )
        .map_err(ServeError::Engine)?,
    );
    // 5. Recovery: the destination flushed, adopted bits committed.
    engine
        .commit(DestFlush::Completed)
        .map_err(ServeError::Recovery)?;
    if md.adopted() > 0 {
        tracing::info!(
            regions = md.adopted(),
            "committed the regions a previous process hydrated"
        );
    }
    if md.all_hydrated() {
        tracing::info!("the clone is complete; the source is not needed");
    }
    stores.keep();
    // Every file is open: from here on the daemon only removes its sockets and live map.
    sandbox
        .restrict_fs(&RuntimePaths {
            socket: plan.socket_path.clone(),
            control: Some(plan.control_path.clone()),
            runtime_dir: plan.runtime_dir.clone(),
        })
        .map_err(ServeError::Sandbox)?;

    // 6. Services.
    if let Some(set) = signals.take() {
        start_signal_thread(set, shutdown.clone()).map_err(|e| ServeError::Thread("signals", e))?;
    }
    let committer = plan
        .commit_interval
        .map(|every| engine.start_committer(every))
        .transpose()
        .map_err(|e| ServeError::Thread("commit", e))?;
    let ctl = HydrationControl::new(
        !a.no_hydration && !a.read_only,
        a.hydration_threshold,
        a.hydration_batch_size,
        a.detect_zeroes,
    );
    ctl.set_rate_limit(a.hydration_rate);
    let hydrator = Some(
        Hydrator::start(&engine, ctl.clone(), HydratorTiming::default())
            .map_err(|e| ServeError::Thread("hydrator", e))?,
    );
    let rate_sampler = engine
        .start_rate_sampler()
        .map_err(|e| ServeError::Thread("hydration-rate", e))?;
    let identity = Identity {
        source: plan.stores.source.clone(),
        dest: plan.stores.dest.clone(),
        metadata: plan.stores.metadata.clone(),
        socket: plan.socket_path.clone(),
        control_socket: plan.control_path.clone(),
        metrics_address: metrics_listener.as_ref().map(|(_, addr)| *addr),
    };
    let reporter = Arc::new(
        StatusReporter::new(
            engine.clone(),
            ctl.clone(),
            identity,
            stores.source.is_some(),
            !a.no_discard_passdown,
        )
        .with_frontends(frontends.clone()),
    );
    let watched = Watched {
        engine: engine.clone(),
        hydration: ctl,
        commit_interval: plan.commit_interval,
    };
    let (early_front, control, notifier) = match early {
        Some((front, control, notifier)) => {
            control.serve(reporter.clone());
            notifier.watch(watched);
            (Some(front), control, notifier)
        }
        None => {
            let socket = control_socket.take().expect("bound above");
            let control =
                ControlServer::start_with(socket, reporter.clone()).map_err(ServeError::Control)?;
            (None, control, Notifier::start(Some(watched), &shutdown))
        }
    };
    let metrics = match metrics_listener {
        Some((l, _)) => Some(
            MetricsServer::start(l, crate::metrics::registry(reporter))
                .map_err(ServeError::Metrics)?,
        ),
        None => None,
    };
    let services = Services {
        metrics,
        hydrator,
        committer,
        rate_sampler,
        control,
    };
    tracing::info!(
        dest = %plan.stores.dest.display(),
        geometry = %geo,
        hydrated = md.hydrated_count(),
        queues = plan.num_queues,
        control = %plan.control_path.display(),
        "serving"
    );
    if let (Some(p), None) = (&plan.socket_path, &early_front) {
        super::say(&format!(
            "vhost-clone: serving {} ({geo}, {}/{} regions hydrated) on {}\n  watch:  vhost-clone status --control-socket {} --watch\n  attach: -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem -chardev socket,id=vc0,path={},reconnect-ms=1000 -device vhost-user-blk-pci,chardev=vc0,num-queues={}\n          (<RAM> is the guest's memory size, QEMU's -m: vhost-user needs all guest memory shared with this daemon)",
            plan.stores.dest.display(),
            md.hydrated_count(),
            geo.nr_regions(),
            p.display(),
            plan.control_path.display(),
            p.display(),
            plan.num_queues
        ));
    }
    let disk = CloneDisk::new(engine.clone(), a.read_only);
    let front = match early_front {
        Some(standby) => standby.take_over(disk)?,
        None => Front::start(
            Arc::new(disk),
            opts,
            vhost_socket.take().expect("bound above"),
            &shutdown,
        )?,
    };
    let confined = sandbox
        .confine_current_thread(ThreadKind::Main)
        .map_err(ServeError::Sandbox);
    if confined.is_ok() {
        if !a.standby {
            // READY=1: the socket listens, the metadata is recovered, the services
            // run (a standby sent it when it started to answer frontends).
            notifier.ready();
        }
    } else {
        // Stop as a signal would: everything acknowledged gets the final commit.
        shutdown.trigger();
    }
    let (served, vhost_socket) = front.wait(&shutdown);
    notifier.stopping("final commit");

    // Shutdown, in reverse.
    services.stop();
    let last = engine.commit(DestFlush::Completed);
    if last.is_ok() && md.mode() == Mode::Rw && !md.changed() {
        // Everything the live map holds is committed: nothing to adopt next time.
        if let Err(e) = md.live_map().remove_file() {
            tracing::warn!(error = %e, "cannot remove the live region map");
        }
    }
    drop(vhost_socket);
    confined?;
    served?;
    last.map_err(ServeError::FinalCommit)?;
    tracing::info!(
        hydrated = md.hydrated_count(),
        regions = geo.nr_regions(),
        "stopped cleanly"
    );
    Ok(())
}
