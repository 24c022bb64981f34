//! Prometheus metrics: `serve --metrics-address HOST:PORT` serves the daemon's
//! status in the Prometheus text exposition format (0.0.4) at `/metrics`.
//!
//! This module owns the mapping from the daemon's own counters to series
//! (every series is prefixed `vhost_clone_`) and the HTTP endpoint
//! ([`http`]). It keeps no counter of its own: each scrape reads the same
//! [`StatusReporter`] the control socket answers from, plus the engine's
//! commit-latency histogram and in-flight count, so `status` and a scrape
//! taken at the same moment agree.
//!
//! The series and their meaning are listed in docs/usage.md ("Metrics").

pub mod http;

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::control::StatusReporter;

pub use http::MetricsServer;

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Setting up the server (event loop, thread) failed.
    #[error("cannot start the metrics server")]
    Setup(#[source] std::io::Error),
}

/// Parses `--metrics-address`: an IP address and a port (`127.0.0.1:9850`,
/// `[::1]:9850`, port 0 for any free port). Host names are refused: the
/// daemon binds one address and says which.
pub fn parse_address(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!("'{s}' is not IP:PORT (examples: 127.0.0.1:9850, [::1]:9850, 0.0.0.0:0)")
    })
}

/// Binds the metrics listener (before any thread starts, so that a bad
/// address is a start-up error); returns it with the address it got (the
/// port chosen when 0 was asked for).
pub fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), MetricsError> {
    let l = TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = l.local_addr().map_err(MetricsError::Setup)?;
    Ok((l, bound))
}

/// The registry of one daemon: a single collector reading `reporter`.
pub fn registry(reporter: Arc<StatusReporter>) -> Registry {
    let mut r = Registry::with_prefix("vhost_clone");
    r.register_collector(Box::new(Exporter(reporter)));
    r
}

/// Encodes `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// Reads the daemon's state at each scrape.
#[derive(Debug)]
struct Exporter(Arc<StatusReporter>);

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> fmt::Result {
    let m = ConstCounter::new(v);
    m.encode(enc.encode_descriptor(name, help, unit, MetricType::Counter)?)
}

fn gauge<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: N,
) -> fmt::Result {
    let m = ConstGauge::new(v);
    m.encode(enc.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

/// A counter with one label: one sample per `(label value, count)`.
fn counters_by(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    key: &str,
    items: &[(&str, u64)],
) -> fmt::Result {
    let mut me = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (value, n) in items {
        let labels = [(key, *value)];
        ConstCounter::new(*n).encode(me.encode_family(&labels)?)?;
    }
    Ok(())
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

impl Collector for Exporter {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let s = self.0.status();
        let engine = self.0.engine();
        let e = &mut enc;
        let bytes = Some(&Unit::Bytes);

        // Identity.
        {
            let labels = [
                ("version", s.version.as_str()),
                ("commit", s.commit.as_str()),
            ];
            let mut me = e.encode_descriptor(
                "build_info",
                "Version and git commit of the running daemon (always 1).",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(1i64).encode(me.encode_family(&labels)?)?;
        }
        let start = self
            .0
            .started_at()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        gauge(
            e,
            "start_time",
            "When the daemon started, seconds since the Unix epoch.",
            Some(&Unit::Seconds),
            start,
        )?;

        // Regions and hydration.
        gauge(e, "regions", "Regions of the clone.", None, s.regions)?;
        gauge(
            e,
            "hydrated_regions",
            "Regions hydrated (copied, overwritten or discarded whole).",
            None,
            s.hydrated_regions,
        )?;
        gauge(
            e,
            "partly_written_regions",
            "Regions partly written: sub-blocks the guest wrote read from the destination, the rest still from the source.",
            None,
            s.partly_written_regions,
        )?;
        gauge(
            e,
            "hydrating_regions",
            "Regions being hydrated or marked right now.",
            None,
            s.hydrating_regions,
        )?;
        gauge(e, "region_size", "Region size.", bytes, s.region_size)?;
        gauge(
            e,
            "device_size",
            "Size of the virtual disk.",
            bytes,
            s.device_size,
        )?;
        gauge(
            e,
            "hydrated",
            "Bytes of the disk that are hydrated.",
            bytes,
            s.hydrated_bytes,
        )?;
        gauge(
            e,
            "hydration_rate",
            "Hydration rate over the last 10 s, measured by the daemon every second.",
            Some(&Unit::Other("bytes_per_second".into())),
            s.hydration_rate,
        )?;
        gauge(
            e,
            "hydration_rate_limit",
            "Bytes per second background hydration may read from the source; 0 is unlimited.",
            Some(&Unit::Other("bytes_per_second".into())),
            s.hydration_rate_limit,
        )?;
        gauge(
            e,
            "hydration_enabled",
            "Background hydration is enabled (1) or disabled (0).",
            None,
            flag(s.hydration_enabled),
        )?;
        gauge(
            e,
            "source_attached",
            "The source is attached (1); 0 once served without one.",
            None,
            flag(s.source_attached),
        )?;
        if let Some(n) = &s.source_remote {
            gauge(
                e,
                "source_connections",
                "Connections to the NBD source that are up (0: reconnecting).",
                None,
                n.connections as u64,
            )?;
            counter(
                e,
                "source_disconnects",
                "Connections to the NBD source lost since start.",
                None,
                n.disconnects,
            )?;
            counter(
                e,
                "source_timeouts",
                "NBD source requests that got no answer within --source-timeout.",
                None,
                n.timeouts,
            )?;
        }
        let f = &s.frontends;
        gauge(
            e,
            "frontends",
            "vhost-user frontends attached (2 during a same-host migration).",
            None,
            f.connected,
        )?;
        gauge(
            e,
            "migrating",
            "A frontend is migrating its guest: dirty-page logging is on (1).",
            None,
            flag(f.migrating),
        )?;
        counter(
            e,
            "queue_handovers",
            "Times the queues passed from one frontend connection to another (migrations).",
            None,
            f.handovers,
        )?;
        counter(
            e,
            "hydration_source_read",
            "Bytes background hydration read from the source since start (holes are not read).",
            bytes,
            engine.hydration_bytes_read(),
        )?;
        let io = &s.io;
        counters_by(
            e,
            "region_hydrations",
            "Regions this process hydrated, by how: copied by background hydration, copied for a partial guest write, or marked without copy (overwritten, discarded or zeroed whole).",
            None,
            "how",
            &[
                ("background", io.background_hydrations),
                ("guest_write", io.guest_hydrations),
                ("no_copy", io.overwrites),
            ],
        )?;
        counter(
            e,
            "sub_block_writes",
            "Writes into unhydrated regions that wrote only the sub-blocks they touch, without a region copy (version 2 stores).",
            None,
            io.partial_writes,
        )?;

        // Guest requests.
        counters_by(
            e,
            "requests",
            "Guest requests by operation.",
            None,
            "op",
            &[
                ("read", io.reads),
                ("write", io.writes),
                ("flush", io.flushes),
                ("discard", io.discards),
                ("write_zeroes", io.write_zeroes),
            ],
        )?;
        counters_by(
            e,
            "request",
            "Bytes of guest requests by operation (lengths asked for; discard and write_zeroes move no data).",
            bytes,
            "op",
            &[
                ("read", io.bytes_read),
                ("write", io.bytes_written),
                ("discard", io.bytes_discarded),
                ("write_zeroes", io.bytes_zeroed),
            ],
        )?;
        counters_by(
            e,
            "request_errors",
            "Guest requests that failed (completed with an I/O error), by operation.",
            None,
            "op",
            &[
                ("read", io.read_errors),
                ("write", io.write_errors),
                ("flush", io.flush_errors),
                ("discard", io.discard_errors),
                ("write_zeroes", io.write_zeroes_errors),
            ],
        )?;
        gauge(
            e,
            "requests_in_flight",
            "Guest requests being served right now.",
            None,
            engine.ios_in_flight(),
        )?;

        // Metadata and commits.
        counter(
            e,
            "commits",
            "Metadata commits that wrote a new state.",
            None,
            s.commits,
        )?;
        counter(
            e,
            "commit_failures",
            "Metadata commits that failed (each switches the metadata to read-only or fail mode).",
            None,
            s.commit_failures,
        )?;
        {
            let h = engine.commit_latency().snapshot();
            let mut me = e.encode_descriptor(
                "commit_duration",
                "Duration of the commits that did I/O (destination flush, metadata writes and flushes).",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            me.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
        }
        gauge(
            e,
            "metadata_sequence",
            "Sequence number of the last committed metadata state.",
            None,
            s.sequence,
        )?;
        {
            let mut me = e.encode_descriptor(
                "metadata_mode",
                "Metadata mode: 1 for the current one of rw, ro (a commit failed), fail (the reload failed too).",
                None,
                MetricType::Gauge,
            )?;
            for mode in ["rw", "ro", "fail"] {
                let labels = [("mode", mode)];
                ConstGauge::new(flag(s.mode == mode)).encode(me.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_are_refused() {
        assert_eq!(
            parse_address("127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert!(parse_address("[::1]:9850").is_ok());
        for bad in [
            "",
            "localhost:9850",
            "127.0.0.1",
            "127.0.0.1:99999",
            ":80",
            "1.2.3.4:x",
        ] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }
}
