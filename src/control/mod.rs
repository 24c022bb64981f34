//! The control socket: status and dm-clone's messages for a running daemon.
//!
//! A unix socket (mode 0600) beside the vhost-user socket. The protocol is
//! line-delimited JSON, one request per line, one response line each:
//!
//! ```text
//! {"cmd":"status"}                                  -> {"ok":true,"status":{...}}
//! {"cmd":"message","args":["hydration-threshold","8"]} -> {"ok":true}
//! anything wrong                                    -> {"ok":false,"error":"..."}
//! ```
//!
//! Messages (dm-clone's, with dashes or underscores, case-insensitive):
//! `enable-hydration`, `disable-hydration`, `hydration-threshold N`,
//! `hydration-batch-size N`; and ours, `hydration-rate RATE` (bytes per
//! second, 0 unlimited, in [`crate::engine::throttle::parse_rate`]'s grammar,
//! the same as `serve --hydration-rate`).

mod server;

pub use server::{ControlServer, Identity, Status, StatusReporter};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::hydrator::HydrationControl;
use crate::engine::throttle;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting or talking to the daemon failed.
    #[error("cannot talk to the daemon at {path}")]
    Connect {
        /// The control socket path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{0}")]
    Refused(String),
    /// The daemon's answer was not understood.
    #[error("bad response from the daemon: {0}")]
    BadResponse(String),
    /// Setting up the control socket failed.
    #[error("cannot set up the control socket {path}")]
    Listen {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Report status.
    Status,
    /// A dm-clone message.
    Message {
        /// The verb and its arguments.
        args: Vec<String>,
    },
}

/// One response.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// Success?
    pub ok: bool,
    /// The error, if not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The status, for a status request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// The verbs `apply_message` knows, as its errors list them.
const VERBS: &str = "enable-hydration, disable-hydration, hydration-threshold N, hydration-batch-size N, hydration-rate RATE";

/// Applies a dm-clone message to the hydration controls.
pub fn apply_message(ctl: &HydrationControl, args: &[String]) -> Result<String, String> {
    let verb = args
        .first()
        .ok_or_else(|| format!("empty message; verbs: {VERBS}"))?
        .to_ascii_lowercase()
        .replace('_', "-");
    let number = |what: &str| -> Result<u64, String> {
        match args {
            [_, v] => v.parse::<u32>().map(u64::from).map_err(|_| {
                format!(
                    "{what} needs a whole number from 0 to {}, not '{v}'",
                    u32::MAX
                )
            }),
            _ => Err(format!("{what} takes exactly one number")),
        }
    };
    let no_args = |v: &str| -> Result<(), String> {
        if args.len() == 1 {
            Ok(())
        } else {
            Err(format!("{v} takes no arguments"))
        }
    };
    match verb.as_str() {
        "enable-hydration" => {
            no_args(&verb)?;
            ctl.set_enabled(true);
            Ok("hydration enabled".into())
        }
        "disable-hydration" => {
            no_args(&verb)?;
            ctl.set_enabled(false);
            Ok("hydration disabled (copies in flight finish)".into())
        }
        "hydration-threshold" => {
            let n = crate::engine::hydrator::check_threshold(number(&verb)?)?;
            ctl.set_threshold(n);
            Ok(format!("hydration threshold {n} regions"))
        }
        "hydration-batch-size" => {
            let n = crate::engine::hydrator::check_batch_size(number(&verb)?)?;
            ctl.set_batch_size(n);
            Ok(format!("hydration batch size {n} regions"))
        }
        "hydration-rate" => {
            let n = match args {
                [_, v] => throttle::parse_rate(v)?,
                _ => return Err(format!("{verb} takes exactly one rate (0 for unlimited)")),
            };
            ctl.set_rate_limit(n);
            Ok(format!("hydration rate limit {}", throttle::format_rate(n)))
        }
        other => Err(format!("unknown message '{other}'; verbs: {VERBS}")),
    }
}

/// Sends one request to the daemon's control socket and returns its response.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let err = |source| ControlError::Connect {
        path: path.display().to_string(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let mut line =
        serde_json::to_string(req).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(err)?;
    let mut reader = BufReader::new(s);
    let mut resp = String::new();
    reader.read_line(&mut resp).map_err(err)?;
    let r: Response = serde_json::from_str(resp.trim())
        .map_err(|e| ControlError::BadResponse(format!("{e}: {resp}")))?;
    if r.ok {
        Ok(r)
    } else {
        Err(ControlError::Refused(r.error.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn messages_change_the_controls_and_bad_ones_are_refused() {
        let ctl = HydrationControl::new(true, 1, 1, false);
        apply_message(&ctl, &args(&["disable_hydration"])).unwrap();
        assert!(!ctl.enabled());
        apply_message(&ctl, &args(&["Enable-Hydration"])).unwrap();
        assert!(ctl.enabled());
        apply_message(&ctl, &args(&["hydration-threshold", "9"])).unwrap();
        assert_eq!(ctl.threshold(), 9);
        apply_message(&ctl, &args(&["hydration_batch_size", "4"])).unwrap();
        assert_eq!(ctl.batch_size(), 4);
        assert_eq!(ctl.rate_limit(), 0);
        let said = apply_message(&ctl, &args(&["Hydration_Rate", "100MiB/s"])).unwrap();
        assert_eq!(ctl.rate_limit(), 100 << 20);
        assert_eq!(said, "hydration rate limit 100 MiB/s");
        apply_message(&ctl, &args(&["hydration-rate", "0"])).unwrap();
        assert_eq!(ctl.rate_limit(), 0);
        apply_message(&ctl, &args(&["hydration-rate", "64k"])).unwrap();
        for bad in [
            &["frobnicate"][..],
            &[],
            &["hydration-threshold"],
            &["hydration-threshold", "-1"],
            &["hydration-threshold", "x"],
            &["hydration-batch-size", "1", "2"],
            &["enable-hydration", "now"],
            &["hydration-rate"],
            &["hydration-rate", "fast"],
            &["hydration-rate", "10MB"],
            &["hydration-rate", "-1"],
            &["hydration-rate", "1", "M"],
        ] {
            let e = apply_message(&ctl, &args(bad)).unwrap_err();
            assert!(!e.is_empty());
        }
        assert_eq!(ctl.threshold(), 9);
        assert_eq!(ctl.rate_limit(), 64 << 10);
    }
}
