//! Where log lines go and how they look: the `--log-level` set, `RUST_LOG`,
//! and systemd's journal.
//!
//! Logs go to stderr. When systemd connected our stderr to the journal (it
//! sets `JOURNAL_STREAM=DEV:INODE` naming that stream, systemd.exec(5)), each
//! line starts with its sd-daemon(3) priority (`<3>` error, `<4>` warn, `<6>`
//! info, `<7>` debug and trace) and carries no timestamp and no colour: the
//! journal adds its own time and keeps the priority, so `journalctl -p
//! warning` finds our warnings. Invariant: the prefix is written only when
//! stderr is the very stream `JOURNAL_STREAM` names (same device and inode),
//! never to a terminal, file or pipe that inherited the variable from a parent
//! whose stderr was the journal.
//!
//! Why a prefix and not the journal's native protocol (tracing-journald): the
//! stream systemd gives us already understands the prefix, it needs no new
//! dependency, no extra socket to open past a sandbox, and a daemon whose
//! journal goes away keeps the stderr behaviour it has always had.

use std::fmt::Write as _;
use std::sync::OnceLock;

use tracing::Level;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// `--log-level` values: a closed set (anything else is a usage error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings (`warning` is accepted too, as syslog spells it).
    #[value(alias = "warning")]
    Warn,
    /// Also state changes: start, stop, commits adopted, hydration complete.
    Info,
    /// Also details useful when debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `EnvFilter` directive for this level.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Whether stderr is the journal's stream, found out once.
static JOURNAL: OnceLock<bool> = OnceLock::new();

/// The sd-daemon(3) priority of a tracing level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether `journal_stream` (the value of `JOURNAL_STREAM`, `DEV:INODE` in
/// decimal) names the file whose device and inode are `dev` and `ino`.
pub fn names_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    matches!((d.parse::<u64>(), i.parse::<u64>()), (Ok(d), Ok(i)) if d == dev && i == ino)
}

/// Whether our stderr is the stream `JOURNAL_STREAM` names.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(var) = var.to_str() else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => names_stream(var, m.dev(), m.ino()),
        Err(_) => false,
    }
}

/// Whether lines for stderr carry journal priorities.
pub fn to_journal() -> bool {
    *JOURNAL.get_or_init(stderr_is_journal)
}

/// `text` as it goes to stderr at `priority`: each line led by `<priority>`
/// under the journal, unchanged elsewhere.
pub fn at_priority(priority: u8, text: &str) -> String {
    if to_journal() {
        prefix_lines(priority, text)
    } else {
        text.to_string()
    }
}

/// Puts `<priority>` in front of every line of `text` (a line break inside
/// an event would otherwise start a journal entry with the default priority).
fn prefix_lines(priority: u8, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for line in text.trim_end_matches('\n').split('\n') {
        let _ = writeln!(out, "<{priority}>{line}");
    }
    out.pop(); // the last newline: the caller decides
    out
}

/// The journal's event format: the default one without time, level and
/// colour, each line led by the event's priority.
struct JournalFormat {
    inner: format::Format<format::Full, ()>,
}

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut buf = String::new();
        self.inner.format_event(ctx, Writer::new(&mut buf), event)?;
        let p = priority(event.metadata().level());
        writeln!(writer, "{}", prefix_lines(p, &buf))
    }
}

/// Installs the global subscriber: `RUST_LOG` when it is set and valid, else
/// `level` (raised by `-v` to debug, `-vv` to trace).
pub fn init(level: LogLevel, verbose: u8) {
    let level = match verbose {
        0 => level,
        1 => LogLevel::Debug,
        _ => LogLevel::Trace,
    };
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let (filter, bad_env) = match from_env
        .as_deref()
        .map(tracing_subscriber::EnvFilter::try_new)
    {
        Some(Ok(f)) => (f, None),
        Some(Err(e)) => (
            tracing_subscriber::EnvFilter::new(level.directive()),
            Some(e),
        ),
        None => (tracing_subscriber::EnvFilter::new(level.directive()), None),
    };
    let journal = to_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Its report of a failed write is an eprintln!, which panics when
        // stderr is gone; a daemon must outlive its terminal or log pipe.
        .log_internal_errors(false);
    if journal {
        let _ = builder
            .with_ansi(false)
            .event_format(JournalFormat {
                inner: format::Format::default()
                    .without_time()
                    .with_level(false)
                    .with_ansi(false),
            })
            .try_init();
    } else {
        let _ = builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init();
    }
    if let Some(e) = bad_env {
        tracing::warn!(error = %e, "ignoring RUST_LOG, using --log-level {}", level.directive());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(names_stream("65025:1234", 65025, 1234));
        assert!(names_stream("8:17\n", 8, 17));
        assert!(!names_stream("65025:1234", 65025, 1235));
        assert!(!names_stream("65026:1234", 65025, 1234));
        for bad in ["", ":", "65025", "65025:", "x:1234", "1:2:3", "-1:5"] {
            assert!(!names_stream(bad, 1, 2), "{bad:?}");
        }
    }

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }

    #[test]
    fn every_line_gets_the_prefix() {
        assert_eq!(prefix_lines(4, "one\n"), "<4>one");
        assert_eq!(prefix_lines(3, "a\nb"), "<3>a\n<3>b");
    }

    #[test]
    fn levels_are_a_closed_set_with_warning_for_warn() {
        use clap::ValueEnum;
        assert_eq!(LogLevel::from_str("warning", false), Ok(LogLevel::Warn));
        assert_eq!(LogLevel::from_str("warn", false), Ok(LogLevel::Warn));
        assert!(LogLevel::from_str("bogus", false).is_err());
        for l in LogLevel::value_variants() {
            let d = l.directive();
            assert_eq!(LogLevel::from_str(d, false), Ok(*l));
        }
    }
}
