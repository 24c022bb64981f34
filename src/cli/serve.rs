//! `vhost-clone serve`: opens the three stores, builds the engine, starts the
//! periodic committer, the background hydrator and the control socket, and
//! serves the clone over vhost-user-blk until SIGTERM/SIGINT.
//!
//! Shutdown order: stop accepting and let in-flight requests finish (the
//! vhost-user front returns), stop the hydrator (a copy in progress finishes),
//! stop the committer, then one final commit, so everything acknowledged is
//! durable and recorded before exit 0.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{open_metadata_for, parse_size, with_suffix, CliError, Result};
use crate::control::ControlServer;
use crate::disk::CloneDisk;
use crate::engine::hydrator::{
    HydrationControl, Hydrator, HydratorTiming, DEFAULT_BATCH_SIZE, DEFAULT_THRESHOLD,
};
use crate::engine::{Engine, EngineConfig};
use crate::metadata::{self, Geometry, Metadata, DEFAULT_REGION_SIZE};
use crate::storage::{BlockDevice, FileDevice, OpenOptions};
use crate::virtio::{self, BlockBackend, IoEngine, ServeOptions, ShutdownSignal};

/// `serve` arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The source image, opened read-only and never written. May be left out
    /// once hydration is complete.
    #[arg(long, short = 's')]
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
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u16,
    /// Region size for a new clone (power of two, 4K..1G); must match an existing one.
    #[arg(long, short = 'r', value_parser = parse_size)]
    pub region_size: Option<u64>,
    /// Offer a read-only disk to the guest.
    #[arg(long)]
    pub readonly: bool,
    /// The disk's serial number (GET_ID), at most 20 bytes.
    #[arg(long, default_value = "vhost-clone")]
    pub serial: String,
    /// Seconds between periodic metadata commits (0 disables them).
    #[arg(long, default_value_t = 1.0)]
    pub commit_interval: f64,
    /// Do not pass discards of hydrated ranges down to the destination.
    #[arg(long)]
    pub no_discard_passdown: bool,
    /// Start with background hydration disabled (`message enable-hydration` starts it).
    #[arg(long)]
    pub no_hydration: bool,
    /// Regions in flight at most for background hydration (0 pauses it).
    #[arg(long, default_value_t = DEFAULT_THRESHOLD)]
    pub hydration_threshold: u64,
    /// Adjacent regions copied together by background hydration.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub hydration_batch_size: u64,
    /// Write all-zero source data as holes on the destination.
    #[arg(long)]
    pub detect_zeroes: bool,
    /// Open source and destination with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// How queues execute reads and writes that need no region copy: `uring` keeps many
    /// in flight per queue through io_uring, `sync` does one blocking call at a time;
    /// `auto` picks `uring` with --direct and `sync` otherwise.
    #[arg(long, value_enum, default_value_t = IoEngineArg::Auto)]
    pub io_engine: IoEngineArg,
    /// Print QEMU's vhost-user capabilities JSON and exit.
    #[arg(long)]
    pub print_capabilities: bool,
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

fn open_file(
    path: &std::path::Path,
    read_only: bool,
    direct: bool,
    create: Option<u64>,
) -> Result<Arc<FileDevice>> {
    Ok(Arc::new(FileDevice::open(
        path,
        &OpenOptions {
            read_only,
            direct,
            create_size: create,
        },
    )?))
}

/// Blocks SIGTERM and SIGINT in every thread (call before spawning any) and
/// turns them into `shutdown.trigger()` on a dedicated thread.
fn install_signal_thread(shutdown: ShutdownSignal) -> io::Result<()> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; the old mask is not needed (null).
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and blocked in every thread; `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                tracing::info!(
                    signal = sig,
                    "stopping: finishing in-flight requests, then a final commit"
                );
                shutdown.trigger();
            }
        })?;
    Ok(())
}

/// Runs `serve`.
pub fn serve(a: &ServeArgs) -> Result<()> {
    if a.print_capabilities {
        println!("{}", virtio::print_capabilities());
        return Ok(());
    }
    let Some(dest_path) = &a.dest else {
        return Err(CliError::Usage("serve needs --dest".into()));
    };
    let md_path = a
        .metadata
        .clone()
        .unwrap_or_else(|| with_suffix(dest_path, ".meta"));
    let socket_path = match (&a.socket_path, a.fd) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(_)) => None,
        (None, None) => Some(with_suffix(dest_path, ".sock")),
    };
    let control_path = a
        .control_socket
        .clone()
        .unwrap_or_else(|| match &socket_path {
            Some(s) => with_suffix(s, ".ctl"),
            None => with_suffix(dest_path, ".ctl"),
        });
    let md_err = |source| CliError::Metadata {
        path: md_path.display().to_string(),
        source,
    };

    let source: Option<Arc<FileDevice>> = match &a.source {
        Some(p) => Some(open_file(p, true, a.direct, None)?),
        None => None,
    };
    // The metadata: format on first start, validate afterwards.
    let md_blank = match std::fs::metadata(&md_path) {
        Err(_) => true,
        Ok(_) => {
            let dev = open_file(&md_path, true, false, None)?;
            metadata::is_blank(dev.as_ref()).map_err(md_err)?
        }
    };
    let md = if md_blank {
        let Some(src) = &source else {
            return Err(CliError::Usage(format!(
                "{} is a new clone: --source is needed to create it",
                md_path.display()
            )));
        };
        let geo = Geometry::new(src.size(), a.region_size.unwrap_or(DEFAULT_REGION_SIZE))
            .map_err(md_err)?;
        let dev = open_metadata_for(&md_path, &geo)?;
        let md = Metadata::format(dev, geo).map_err(md_err)?;
        tracing::info!(uuid = %md.uuid(), geometry = %geo, "formatted new clone metadata");
        md
    } else {
        let dev = open_file(&md_path, false, false, None)?;
        let stored = metadata::load(dev.as_ref(), None)
            .map_err(md_err)?
            .superblock
            .geometry;
        let expected = match &source {
            Some(s) => Geometry::new(
                s.size() - s.size() % 512,
                a.region_size.unwrap_or(stored.region_size()),
            )
            .map_err(md_err)?,
            None => Geometry::new(
                stored.device_size(),
                a.region_size.unwrap_or(stored.region_size()),
            )
            .map_err(md_err)?,
        };
        Metadata::open(dev, Some(&expected)).map_err(md_err)?
    };
    let geo = *md.geometry();
    let dest = open_file(dest_path, false, a.direct, Some(geo.device_size()))?;
    let md = Arc::new(md);
    let engine = Arc::new(
        Engine::new(
            source.clone().map(|s| s as Arc<dyn BlockDevice>),
            dest,
            md.clone(),
            EngineConfig {
                discard_passdown: !a.no_discard_passdown,
            },
        )
        .map_err(|e| CliError::Usage(crate::error_chain(&e)))?,
    );
    if md.all_hydrated() {
        tracing::info!("the clone is complete; the source is not needed");
    }

    let shutdown = ShutdownSignal::new().map_err(|e| CliError::Usage(format!("eventfd: {e}")))?;
    install_signal_thread(shutdown.clone())
        .map_err(|e| CliError::Usage(format!("signals: {e}")))?;

    let mut committer = if a.commit_interval > 0.0 {
        Some(
            engine
                .start_committer(Duration::from_secs_f64(a.commit_interval))
                .map_err(|e| CliError::Usage(format!("commit thread: {e}")))?,
        )
    } else {
        None
    };
    let ctl = HydrationControl::new(
        !a.no_hydration && !a.readonly,
        a.hydration_threshold,
        a.hydration_batch_size,
        a.detect_zeroes,
    );
    let mut hydrator = Some(
        Hydrator::start(&engine, ctl.clone(), HydratorTiming::default())
            .map_err(|e| CliError::Usage(format!("hydrator thread: {e}")))?,
    );
    let control = ControlServer::start(
        &control_path,
        engine.clone(),
        ctl,
        source.is_some(),
        !a.no_discard_passdown,
    )
    .map_err(|e| CliError::Usage(crate::error_chain(&e)))?;

    let num_queues = a.num_queues.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().min(16) as u16)
            .unwrap_or(1)
    });
    let opts = ServeOptions {
        socket_path: socket_path.clone(),
        listen_fd: a.fd,
        num_queues,
        queue_size: a.queue_size,
        serial: a.serial.clone(),
        readonly: a.readonly,
        discard: true,
        name: "vhost-clone".into(),
        io_engine: a.io_engine.resolve(a.direct),
    };
    tracing::info!(
        dest = %dest_path.display(),
        geometry = %geo,
        hydrated = md.hydrated_count(),
        queues = num_queues,
        control = %control.path().display(),
        "serving"
    );
    if let Some(p) = &socket_path {
        super::say(&format!(
            "vhost-clone: serving {} ({geo}, {}/{} regions hydrated) on {}\n  control: {}\n  attach: -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem -chardev socket,id=vc0,path={},reconnect-ms=1000 -device vhost-user-blk-pci,chardev=vc0,num-queues={}",
            dest_path.display(),
            md.hydrated_count(),
            geo.nr_regions(),
            p.display(),
            control.path().display(),
            p.display(),
            num_queues
        ));
    }
    let backend: Arc<dyn BlockBackend> = Arc::new(CloneDisk::new(engine.clone(), a.readonly));
    let served = virtio::serve(backend, &opts, &shutdown);
    // Teardown: nothing may outlive the engine's last commit.
    drop(hydrator.take());
    drop(committer.take());
    drop(control);
    let last = engine.commit(true);
    match (&served, &last) {
        (Ok(()), Ok(_)) => {
            tracing::info!(
                hydrated = md.hydrated_count(),
                regions = geo.nr_regions(),
                "stopped cleanly"
            );
            Ok(())
        }
        (Err(e), _) => Err(CliError::Usage(crate::error_chain(e))),
        (_, Err(e)) => Err(CliError::Usage(format!(
            "final commit failed: {}",
            crate::error_chain(e)
        ))),
    }
}
