//! Command-line front: argument parsing, opening the three stores, and the
//! offline tools (`create`, `check`, `dump`).
//!
//! Every failure is reported as one line naming what went wrong, with its cause
//! chain (`error: cannot open dest.img: No such file or directory`), and a
//! non-zero exit code: 1 for a failed operation or a failed check, 2 for bad
//! arguments (clap's convention).

mod offline;
mod serve;
mod status;
pub mod stores;
mod systemd;

pub use serve::ServeArgs;
pub use status::{MessageArgs, StatusArgs};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::metadata::MetadataError;
use crate::storage::{FileDevice, OpenOptions, StorageError};

/// Errors of the command-line tools.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A store could not be opened or used.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The metadata is bad or does not match.
    #[error("metadata {path}")]
    Metadata {
        /// The metadata path.
        path: String,
        /// What is wrong.
        #[source]
        source: MetadataError,
    },
    /// Something given on the command line does not fit (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The stores, sockets or devices refuse what was asked (exit 1).
    #[error("{0}")]
    Refused(String),
    /// The daemon failed to start or to stop cleanly (exit 1).
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    /// Writing output failed.
    #[error("cannot write output")]
    Output(#[source] std::io::Error),
    /// A check found problems (already reported).
    #[error("check failed")]
    CheckFailed,
}

/// Result type of the command-line tools.
pub type Result<T> = std::result::Result<T, CliError>;

/// vhost-clone: serve a disk to a VM over vhost-user-blk while it is copied
/// ("hydrated") from a read-only source, with Linux dm-clone's semantics.
#[derive(Debug, Parser)]
#[command(name = "vhost-clone", version = crate::LONG_VERSION, about, long_about = None)]
pub struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a clone of SOURCE over vhost-user-blk (the main job).
    Serve(Box<ServeArgs>),
    /// Show a running daemon's status (progress, mode, counters).
    Status(StatusArgs),
    /// Send a dm-clone message to a running daemon.
    Message(MessageArgs),
    /// Format metadata for a new clone of SOURCE onto DEST (DEST is created if missing).
    Create(CreateArgs),
    /// Validate a clone's metadata (and its agreement with source and destination).
    Check(CheckArgs),
    /// Show which regions are hydrated.
    Dump(DumpArgs),
}

/// Where the three stores are.
#[derive(Debug, Args, Clone)]
pub struct Stores {
    /// The source image (opened read-only, never written).
    #[arg(long, short = 's')]
    pub source: Option<PathBuf>,
    /// The destination (the clone).
    #[arg(long, short = 'd')]
    pub dest: Option<PathBuf>,
    /// The metadata file [default: DEST.meta].
    #[arg(long, short = 'm')]
    pub metadata: Option<PathBuf>,
}

impl Stores {
    /// The metadata path: given, or derived from the destination.
    pub fn metadata_path(&self) -> Result<PathBuf> {
        match (&self.metadata, &self.dest) {
            (Some(m), _) => Ok(m.clone()),
            (None, Some(d)) => Ok(with_suffix(d, ".meta")),
            (None, None) => Err(CliError::Usage(
                "give --metadata, or --dest to use DEST.meta".into(),
            )),
        }
    }
}

/// `create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Stores; --source and --dest are required.
    #[command(flatten)]
    pub stores: Stores,
    /// Region size (power of two, 4K..1G), e.g. 64K.
    #[arg(long, short = 'r', value_parser = parse_region_size, default_value = "64K")]
    pub region_size: u64,
    /// Overwrite metadata that is already formatted (the clone restarts from scratch).
    #[arg(long)]
    pub force: bool,
}

/// `check` arguments.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Stores; the metadata is required (directly or via --dest).
    #[command(flatten)]
    pub stores: Stores,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `dump` arguments.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Stores; only the metadata is read.
    #[command(flatten)]
    pub stores: Stores,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Appends `suffix` to a path's file name (`clone.img` -> `clone.img.meta`).
pub fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Parses a size: bytes, or with a K/M/G/T suffix (binary; `KiB` and `KB` accepted alike).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let lower = lower
        .trim_end_matches("ib")
        .trim_end_matches('b')
        .to_string();
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1u64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        Some('t') => (&lower[..lower.len() - 1], 1 << 40),
        _ => (lower.as_str(), 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 4096, 64K, 1M)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Parses a region size: a size that is a power of two in 4K..=1G.
pub fn parse_region_size(s: &str) -> std::result::Result<u64, String> {
    let n = parse_size(s)?;
    if !n.is_power_of_two()
        || !(crate::metadata::MIN_REGION_SIZE..=crate::metadata::MAX_REGION_SIZE).contains(&n)
    {
        return Err(format!(
            "region size {s} is not a power of two from 4K to 1G"
        ));
    }
    Ok(n)
}

/// Opens a file device, read-only or not.
pub fn open_device(path: &Path, read_only: bool) -> Result<Arc<FileDevice>> {
    Ok(Arc::new(FileDevice::open(
        path,
        &OpenOptions {
            read_only,
            ..Default::default()
        },
    )?))
}

pub use crate::error_chain;

/// Writes a line to stderr. A daemon must not die because its stderr went away
/// (a closed pipe or terminal): unlike `eprintln!`, errors are ignored.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let level = match cli.verbose {
        0 => cli.log_level.clone(),
        1 => "debug".into(),
        _ => "trace".into(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&level));
    match filter {
        Ok(f) => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(f)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                // Its report of a failed write is an eprintln!, which panics when
                // stderr is gone; a daemon must outlive its terminal or log pipe.
                .log_internal_errors(false)
                .try_init();
        }
        Err(e) => {
            say(&format!("error: bad log level '{level}': {e}"));
            return 2;
        }
    }
    let r = match cli.command {
        Command::Serve(a) => serve::serve(&a),
        Command::Status(a) => status::status(&a),
        Command::Message(a) => status::message(&a),
        Command::Create(a) => offline::create(&a),
        Command::Check(a) => offline::check(&a),
        Command::Dump(a) => offline::dump(&a),
    };
    match r {
        Ok(()) => 0,
        Err(CliError::CheckFailed) => 1,
        Err(e) => {
            say(&format!("error: {}", error_chain(&e)));
            if let CliError::Usage(_) = e {
                2
            } else {
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn metadata_path_defaults_beside_dest() {
        let s = Stores {
            source: None,
            dest: Some("/x/clone.img".into()),
            metadata: None,
        };
        assert_eq!(
            s.metadata_path().unwrap(),
            PathBuf::from("/x/clone.img.meta")
        );
        let none = Stores {
            source: None,
            dest: None,
            metadata: None,
        };
        assert!(none.metadata_path().is_err());
    }

    #[test]
    fn error_chain_names_causes_once() {
        let e = CliError::Storage(StorageError::Open {
            path: "a.img".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
        let s = error_chain(&e);
        assert!(s.starts_with("cannot open a.img: No such file"), "{s}");
    }
}
