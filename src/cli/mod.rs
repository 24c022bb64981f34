//! Command-line front: argument parsing, opening the three stores, and the
//! offline tools (`create`, `check`, `dump`).
//!
//! Every failure is reported as one line naming what went wrong, with its cause
//! chain (`error: cannot open dest.img: No such file or directory`), and a
//! non-zero exit code. The rule for the code: 2 ([`EXIT_USAGE`], clap's
//! convention) when the fix is to change the command line: an unknown,
//! missing or conflicting option, a malformed or out-of-range value, or an
//! option that contradicts the clone it names (a new clone without
//! `--source`, a `--region-size` other than the clone's, two paths naming one
//! file); bad values are refused before any file is touched. 1
//! ([`EXIT_FAILURE`]) when the command line is fine and the system refused or
//! failed: a missing file or directory, a lock, a live socket, damaged
//! metadata, an I/O error, an unreachable daemon, a failed check.

mod help;
pub mod logging;
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

pub use logging::LogLevel;

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
    /// `--region-size` contradicts the clone's (exit 2).
    #[error("metadata {path}: region size mismatch: the metadata says {stored}, but {given} was given (leave out --region-size to use the clone's)")]
    RegionSizeMismatch {
        /// The metadata path.
        path: String,
        /// The clone's region size.
        stored: u64,
        /// The one asked for.
        given: u64,
    },
    /// The stores, sockets or devices refuse what was asked (exit 1).
    #[error("{0}")]
    Refused(String),
    /// The daemon's control socket could not be reached or answered badly (exit 1).
    #[error(transparent)]
    Control(crate::control::ControlError),
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

/// Exit code of a runtime failure or a failed check.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code of a usage error (clap's own errors exit with it too).
pub const EXIT_USAGE: i32 = 2;

/// vhost-clone: serve a disk to a VM over vhost-user-blk while it is copied
/// ("hydrated") from a read-only source, with Linux dm-clone's semantics.
#[derive(Debug, Parser)]
#[command(name = "vhost-clone", version = crate::LONG_VERSION, about, long_about = help::LONG_ABOUT,
    after_long_help = help::AFTER_HELP)]
pub struct Cli {
    /// Log level; RUST_LOG overrides it (tracing's EnvFilter syntax).
    #[arg(long, global = true, value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print the vhost-user backend capabilities (JSON, QEMU's vhost-user.json
    /// schema) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a clone of SOURCE over vhost-user-blk (the main job).
    #[command(long_about = help::SERVE_LONG_ABOUT, after_long_help = help::SERVE_AFTER_HELP)]
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
    /// The source image (opened read-only, never written): a file or block
    /// device, or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH).
    #[arg(long, short = 's', value_name = "PATH|URI")]
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
    /// Regions that may be partly written at once: a write of whole 4 KiB
    /// sub-blocks into an unhydrated region writes only them, recorded in a table
    /// of this many slots (16 bytes each) [default: 65536, or one per region for a
    /// smaller clone]; 0: no table, every such write copies its region (metadata
    /// format version 1, which daemons before version 2 can open).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    pub partial_regions: Option<u64>,
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

/// Parses a disk serial number (GET_ID): at most 20 bytes.
pub fn parse_serial(s: &str) -> std::result::Result<String, String> {
    if s.len() > crate::virtio::config::SERIAL_LEN {
        return Err(format!(
            "the serial is {} bytes, at most {} are allowed",
            s.len(),
            crate::virtio::config::SERIAL_LEN
        ));
    }
    Ok(s.to_string())
}

/// Parses a virtqueue size: a power of two from 4 to 32768.
pub fn parse_queue_size(s: &str) -> std::result::Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(n) if n >= 4 && n.is_power_of_two() => Ok(n),
        _ => Err(format!("'{s}' is not a power of two from 4 to 32768")),
    }
}

/// Parses a number of seconds in `min..=86400` (finite, so that it makes a `Duration`).
pub fn parse_seconds(s: &str, min: f64) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && (min..=86_400.0).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{s}' is not a number of seconds from {min} to 86400"
        )),
    }
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

/// Writes a line to stderr (at info priority under the journal). A daemon
/// must not die because its stderr went away (a closed pipe or terminal):
/// unlike `eprintln!`, errors are ignored.
pub fn say(line: &str) {
    say_at(6, line);
}

fn say_at(priority: u8, line: &str) {
    use std::io::Write;
    let line = logging::at_priority(priority, line);
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    logging::init(cli.log_level, cli.verbose);
    if cli.print_capabilities {
        println!("{}", crate::virtio::print_capabilities());
        return 0;
    }
    let Some(command) = cli.command else {
        use clap::CommandFactory;
        return parse_error(&Cli::command().error(
            clap::error::ErrorKind::MissingSubcommand,
            "a command is required (or --print-capabilities)",
        ));
    };
    let r = match command {
        Command::Serve(a) => serve::serve(&a),
        Command::Status(a) => status::status(&a),
        Command::Message(a) => status::message(&a),
        Command::Create(a) => offline::create(&a),
        Command::Check(a) => offline::check(&a),
        Command::Dump(a) => offline::dump(&a),
    };
    match r {
        Ok(()) => 0,
        Err(CliError::CheckFailed) => EXIT_FAILURE,
        Err(e) => {
            say_at(3, &format!("error: {}", error_chain(&e)));
            exit_code(&e)
        }
    }
}

/// Reports a command line clap refused (at error priority under the
/// journal) and returns its exit code: 2, or 0 for `--help` and `--version`.
pub fn parse_error(e: &clap::Error) -> i32 {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return 0;
    }
    if logging::to_journal() {
        say_at(3, e.render().to_string().trim_end());
    } else {
        let _ = e.print(); // with clap's colours in a terminal
    }
    e.exit_code()
}

/// The exit code of an error (see the module docs for the rule).
pub fn exit_code(e: &CliError) -> i32 {
    match e {
        CliError::Usage(_) | CliError::RegionSizeMismatch { .. } => EXIT_USAGE,
        _ => EXIT_FAILURE,
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
