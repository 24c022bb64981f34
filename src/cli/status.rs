//! `vhost-clone status` and `vhost-clone message`: clients of a running
//! daemon's control socket.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{with_suffix, CliError, Result};
use crate::control::{self, Request, Status};

/// Where the daemon's control socket is.
#[derive(Debug, Args, Clone)]
pub struct ControlAddr {
    /// The control socket [default: SOCKET.ctl, or DEST.sock.ctl].
    #[arg(long, short = 'c')]
    pub control_socket: Option<PathBuf>,
    /// The daemon's vhost-user socket (its control socket is SOCKET.ctl).
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// The clone's destination (its control socket is DEST.sock.ctl by default, DEST.ctl
    /// for a daemon started with --fd or by socket activation).
    #[arg(long, short = 'd')]
    pub dest: Option<PathBuf>,
}

impl ControlAddr {
    fn path(&self) -> Result<PathBuf> {
        match (&self.control_socket, &self.socket_path, &self.dest) {
            (Some(c), _, _) => Ok(c.clone()),
            (None, Some(s), _) => Ok(with_suffix(s, ".ctl")),
            (None, None, Some(d)) => Ok(control_beside(d)),
            _ => Err(CliError::Usage(
                "give --control-socket, --socket-path or --dest to find the daemon".into(),
            )),
        }
    }
}

/// The control socket of a daemon serving `dest` with default paths:
/// `DEST.sock.ctl`, or `DEST.ctl` when it was started with `--fd` or by
/// socket activation (see `serve`'s plan); the first that exists.
fn control_beside(dest: &std::path::Path) -> PathBuf {
    let usual = with_suffix(&with_suffix(dest, ".sock"), ".ctl");
    let passed_fd = with_suffix(dest, ".ctl");
    if !usual.exists() && passed_fd.exists() {
        passed_fd
    } else {
        usual
    }
}

/// `status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Which daemon.
    #[command(flatten)]
    pub addr: ControlAddr,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print one line in the form `dmsetup status` gives a dm-clone target.
    #[arg(long, conflicts_with = "json")]
    pub dmsetup: bool,
    /// Keep printing (a progress bar in a terminal) until hydration completes.
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// Seconds between updates with --watch.
    #[arg(long, default_value_t = 1.0, value_parser = |s: &str| super::parse_seconds(s, 0.0))]
    pub interval: f64,
}

/// `message` arguments.
#[derive(Debug, Args)]
pub struct MessageArgs {
    /// Which daemon.
    #[command(flatten)]
    pub addr: ControlAddr,
    /// enable-hydration | disable-hydration | hydration-threshold N | hydration-batch-size N |
    /// hydration-rate RATE (bytes per second, as serve --hydration-rate; 0 for unlimited)
    #[arg(required = true, num_args = 1..)]
    pub message: Vec<String>,
}

fn fetch(path: &std::path::Path) -> Result<Status> {
    control::request(path, &Request::Status)
        .map_err(CliError::Control)?
        .status
        .ok_or_else(|| CliError::Refused("the daemon sent no status".into()))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn eta(s: &Status) -> String {
    match s.eta_seconds {
        Some(e) if e < 3600.0 => format!("{}m{:02}s", (e / 60.0) as u64, (e % 60.0) as u64),
        Some(e) => format!("{:.1}h", e / 3600.0),
        None if s.complete => "done".into(),
        None => "-".into(),
    }
}

/// One line of status.
fn line(s: &Status) -> String {
    format!(
        "hydrated {}/{} regions ({:.1}%, {:.0}/{:.0} MiB), {} hydrating, {:.1} MiB/s, eta {}, mode {}, commits {} (last {} us), hydration {}, errors {}",
        s.hydrated_regions,
        s.regions,
        100.0 * s.hydrated_regions as f64 / s.regions.max(1) as f64,
        mib(s.hydrated_bytes),
        mib(s.device_size),
        s.hydrating_regions,
        s.hydration_rate / (1 << 20) as f64,
        eta(s),
        s.mode,
        s.commits,
        s.last_commit_us,
        if s.hydration_enabled { "on" } else { "off" },
        s.io.errors
    ) + match &s.source_remote {
        Some(n) if !n.is_connected() => ", source reconnecting",
        _ => "",
    }
}

fn full_report(s: &Status) -> String {
    let mut r = String::new();
    // A daemon older than these fields sends them empty.
    if !s.version.is_empty() {
        r += &format!(
            "vhost-clone {} (commit {}), pid {}, started {} (up {:.0} s)\n",
            s.version, s.commit, s.pid, s.started_at, s.uptime_seconds
        );
        r += &format!(
            "source: {}\ndestination: {}\nmetadata: {}\n",
            s.source.as_deref().unwrap_or("none"),
            s.dest,
            s.metadata
        );
        r += &format!(
            "sockets: vhost-user {}, control {}\n",
            s.socket.as_deref().unwrap_or("(inherited descriptor)"),
            s.control_socket
        );
        if let Some(m) = &s.metrics_address {
            r += &format!("metrics: http://{m}/metrics\n");
        }
    }
    r += &format!(
        "clone {}: {} bytes, {} regions of {} bytes\n",
        s.uuid, s.device_size, s.regions, s.region_size
    );
    r += &format!(
        "hydrated: {}/{} regions, {} bytes{}\n",
        s.hydrated_regions,
        s.regions,
        s.hydrated_bytes,
        if s.complete {
            " (complete: the source is no longer needed)"
        } else {
            ""
        }
    );
    r += &format!(
        "hydrating: {} regions, {:.1} MiB/s, eta {}\n",
        s.hydrating_regions,
        s.hydration_rate / (1 << 20) as f64,
        eta(s)
    );
    r += &format!(
        "metadata: mode {}, {} commits, {} failed, last commit {} us, sequence {}\n",
        s.mode, s.commits, s.commit_failures, s.last_commit_us, s.sequence
    );
    r += &format!(
        "hydration: {}, threshold {}, batch size {}, rate limit {}; discard passdown {}; source {}\n",
        if s.hydration_enabled {
            "enabled"
        } else {
            "disabled"
        },
        s.hydration_threshold,
        s.hydration_batch_size,
        crate::engine::throttle::format_rate(s.hydration_rate_limit),
        if s.discard_passdown { "on" } else { "off" },
        if s.source_attached {
            "attached"
        } else {
            "not attached"
        }
    );
    if let Some(n) = &s.source_remote {
        r += &format!(
            "source connection: {} ({}/{} connections), {} lost, {} failed attempts, {} timeouts, block status {}, timeout {} s{}\n",
            n.state,
            n.connections,
            n.max_connections,
            n.disconnects,
            n.failed_attempts,
            n.timeouts,
            if n.block_status { "on" } else { "off" },
            n.timeout_secs,
            n.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    let f = &s.frontends;
    r += &format!(
        "frontends: {} attached, {} connections, queues run by {}, {} hand-overs{}\n",
        f.connected,
        f.connections,
        f.queue_owner
            .map(|c| format!("connection {c}"))
            .unwrap_or_else(|| "none".into()),
        f.handovers,
        if f.migrating {
            "; migrating (dirty-page logging on)"
        } else {
            ""
        }
    );
    let io = &s.io;
    r += &format!(
        "io: {} reads ({} bytes), {} writes ({} bytes), {} flushes, {} discards, {} write-zeroes, {} errors\n",
        io.reads, io.bytes_read, io.writes, io.bytes_written, io.flushes, io.discards, io.write_zeroes, io.errors
    );
    r += &format!(
        "regions: {} copied for guest writes, {} by background hydration, {} marked without copy\n",
        io.guest_hydrations, io.background_hydrations, io.overwrites
    );
    r
}

/// Runs `status`.
pub fn status(a: &StatusArgs) -> Result<()> {
    let path = a.addr.path()?;
    let mut out = std::io::stdout().lock();
    let w =
        |o: &mut std::io::StdoutLock<'_>, s: String| writeln!(o, "{s}").map_err(CliError::Output);
    if !a.watch {
        let s = fetch(&path)?;
        let text = if a.json {
            serde_json::to_string_pretty(&s).map_err(|e| CliError::Output(e.into()))?
        } else if a.dmsetup {
            s.dm_line()
        } else {
            full_report(&s).trim_end().to_string()
        };
        return w(&mut out, text);
    }
    let interval = Duration::from_secs_f64(a.interval.max(0.05));
    if std::io::stderr().is_terminal() && !a.json && !a.dmsetup {
        let first = fetch(&path)?;
        let bar = indicatif::ProgressBar::new(first.device_size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40.cyan/blue} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        loop {
            let s = fetch(&path)?;
            bar.set_position(s.hydrated_bytes);
            bar.set_message(format!(
                "{:.1} MiB/s eta {} mode {}",
                s.hydration_rate / (1 << 20) as f64,
                eta(&s),
                s.mode
            ));
            if s.complete {
                bar.finish_with_message("hydration complete");
                return Ok(());
            }
            std::thread::sleep(interval);
        }
    }
    loop {
        let s = fetch(&path)?;
        let text = if a.json {
            serde_json::to_string(&s).map_err(|e| CliError::Output(e.into()))?
        } else if a.dmsetup {
            s.dm_line()
        } else {
            line(&s)
        };
        w(&mut out, text)?;
        out.flush().map_err(CliError::Output)?;
        if s.complete {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

/// Runs `message`.
pub fn message(a: &MessageArgs) -> Result<()> {
    let path = a.addr.path()?;
    control::request(
        &path,
        &Request::Message {
            args: a.message.clone(),
        },
    )
    .map_err(|e| match e {
        // The daemon refuses only malformed messages: a bad verb or number.
        control::ControlError::Refused(m) => CliError::Usage(m),
        e => CliError::Control(e),
    })?;
    Ok(())
}

#[cfg(test)]
mod control_path_tests {
    use super::*;

    #[test]
    fn dest_finds_the_control_socket_of_a_passed_fd_too() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("clone.img");
        let addr = ControlAddr {
            control_socket: None,
            socket_path: None,
            dest: Some(dest.clone()),
        };
        let usual = dir.path().join("clone.img.sock.ctl");
        assert_eq!(addr.path().unwrap(), usual);
        let passed = dir.path().join("clone.img.ctl");
        std::fs::write(&passed, b"").unwrap();
        assert_eq!(addr.path().unwrap(), passed);
        std::fs::write(&usual, b"").unwrap();
        assert_eq!(addr.path().unwrap(), usual);
    }
}
