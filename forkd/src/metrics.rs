//! Prometheus metrics (OpenMetrics text), rendered on demand for the opt-in
//! endpoint in [`crate::metrics_http`].
//!
//! Every label value is bounded: a configured zygote name, an outcome, a
//! `killed_by` or error code from the protocol's enums, `true`/`false`. Nothing
//! a request says verbatim (an unknown zygote name, paths, code) becomes a
//! label, so a client cannot grow the series count.
//!
//! Request metrics are recorded as requests complete; pool, zygote and load
//! figures are read from the daemon's own counters at scrape time.

use forkd_ipc::{ErrorCode, KilledBy, SpawnResult};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// Histogram buckets for request latencies, seconds: a warm spawn takes
/// about a millisecond, timeouts run to minutes.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    120.0,
];

/// Label value for "no zygote could be attributed" (the request named one
/// that is not configured, or was refused before resolution).
pub const NO_ZYGOTE: &str = "-";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpawnLabels {
    zygote: String,
    outcome: &'static str,
    killed_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    zygote: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    zygote: String,
    warm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressLabels {
    /// `out`/`in` (bytes), `allowed`/`denied` (connections),
    /// `answered`/`refused` (DNS).
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The daemon's request metrics.
pub struct Metrics {
    registry: Registry,
    spawns: Family<SpawnLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    start: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    connections: Family<ConnectionLabels, Counter>,
    audit_errors: Counter,
    egress_bytes: Family<EgressLabels, Counter>,
    egress_connections: Family<EgressLabels, Counter>,
    egress_dns: Family<EgressLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How a request ended, as the `outcome` label says it.
pub fn outcome(result: &SpawnResult) -> &'static str {
    if result.killed_by.is_some() {
        "killed"
    } else if result.exit_code == Some(0) {
        "ok"
    } else {
        "exit_nonzero"
    }
}

pub fn killed_by_label(k: Option<KilledBy>) -> &'static str {
    match k {
        None => "none",
        Some(KilledBy::Timeout) => "timeout",
        Some(KilledBy::Oom) => "oom",
        Some(KilledBy::Pids) => "pids",
        Some(KilledBy::OutputLimit) => "output_limit",
        Some(KilledBy::Signal) => "signal",
        Some(KilledBy::Shutdown) => "shutdown",
    }
}

/// The protocol's name of an error code (its wire spelling).
pub fn error_code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::MalformedFrame => "malformed_frame",
        ErrorCode::FrameTooLarge => "frame_too_large",
        ErrorCode::UnsupportedVersion => "unsupported_version",
        ErrorCode::PermissionDenied => "permission_denied",
        ErrorCode::InvalidRequest => "invalid_request",
        ErrorCode::UnknownZygote => "unknown_zygote",
        ErrorCode::UnknownPolicy => "unknown_policy",
        ErrorCode::LimitExceedsPolicy => "limit_exceeds_policy",
        ErrorCode::ZygoteUnavailable => "zygote_unavailable",
        ErrorCode::SpawnFailed => "spawn_failed",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Internal => "internal",
        ErrorCode::UnknownSession => "unknown_session",
        ErrorCode::SessionEnded => "session_ended",
        ErrorCode::SessionPaused => "session_paused",
        ErrorCode::NotFound => "not_found",
        ErrorCode::FileError => "file_error",
        ErrorCode::Cancelled => "cancelled",
        ErrorCode::Busy => "busy",
        ErrorCode::UnknownCheckpoint => "unknown_checkpoint",
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let spawns = Family::<SpawnLabels, Counter>::default();
        registry.register(
            "forkd_spawns",
            "Spawn requests completed, by zygote, outcome (ok, exit_nonzero, killed, error) and killed_by",
            spawns.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "forkd_spawn_errors",
            "Spawn requests answered with an error instead of a result, by protocol error code",
            errors.clone(),
        );
        let duration = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register_with_unit(
            "forkd_spawn_duration",
            "Request received to result ready (including any wait for a free slot), by zygote and whether a warm child served it",
            Unit::Seconds,
            duration.clone(),
        );
        let start = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register_with_unit(
            "forkd_spawn_start",
            "Request received to the program starting in its isolated child",
            Unit::Seconds,
            start.clone(),
        );
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "forkd_connections",
            "Client connections, by result (accepted, refused: peer not on the allow-list)",
            connections.clone(),
        );
        let audit_errors = Counter::default();
        registry.register(
            "forkd_audit_write_errors",
            "Audit log writes that failed (see the daemon's log)",
            audit_errors.clone(),
        );
        let egress_bytes = Family::<EgressLabels, Counter>::default();
        registry.register(
            "forkd_egress_bytes",
            "Bytes through sandboxes' allowed connections (allow_net), by direction (out, in)",
            egress_bytes.clone(),
        );
        let egress_connections = Family::<EgressLabels, Counter>::default();
        registry.register(
            "forkd_egress_connections",
            "Sandbox connections through the egress proxy, by verdict (allowed, denied)",
            egress_connections.clone(),
        );
        let egress_dns = Family::<EgressLabels, Counter>::default();
        registry.register(
            "forkd_egress_dns_queries",
            "Queries to sandboxes' resolvers, by answer (answered, refused)",
            egress_dns.clone(),
        );
        Metrics {
            registry,
            egress_bytes,
            egress_connections,
            egress_dns,
            spawns,
            errors,
            duration,
            start,
            connections,
            audit_errors,
        }
    }

    /// Records a request that produced a result.
    pub fn record_result(&self, result: &SpawnResult, elapsed: std::time::Duration) {
        let zygote = result.zygote.clone();
        self.spawns
            .get_or_create(&SpawnLabels {
                zygote: zygote.clone(),
                outcome: outcome(result),
                killed_by: killed_by_label(result.killed_by),
            })
            .inc();
        let latency = LatencyLabels {
            zygote,
            warm: if result.warm { "true" } else { "false" },
        };
        self.duration
            .get_or_create(&latency)
            .observe(elapsed.as_secs_f64());
        self.start
            .get_or_create(&latency)
            .observe(result.timings.isolated_us as f64 / 1e6);
        if let Some(n) = &result.network {
            self.record_network(n);
        }
    }

    /// Adds a sandbox's or session's egress counters.
    pub fn record_network(&self, n: &forkd_ipc::NetworkReport) {
        {
            let add = |f: &Family<EgressLabels, Counter>, kind, v: u64| {
                f.get_or_create(&EgressLabels { kind }).inc_by(v);
            };
            add(&self.egress_bytes, "out", n.bytes_out);
            add(&self.egress_bytes, "in", n.bytes_in);
            add(&self.egress_connections, "allowed", n.connections_allowed);
            add(&self.egress_connections, "denied", n.connections_denied);
            add(
                &self.egress_dns,
                "answered",
                n.dns_queries.saturating_sub(n.dns_refused),
            );
            add(&self.egress_dns, "refused", n.dns_refused);
        }
    }

    /// Records a request answered with an error; `zygote` must be a
    /// configured name or [`NO_ZYGOTE`].
    pub fn record_error(&self, zygote: &str, code: ErrorCode) {
        self.spawns
            .get_or_create(&SpawnLabels {
                zygote: zygote.to_string(),
                outcome: "error",
                killed_by: "none",
            })
            .inc();
        self.errors
            .get_or_create(&ErrorLabels {
                zygote: zygote.to_string(),
                code: error_code_label(code),
            })
            .inc();
    }

    pub fn record_connection(&self, accepted: bool) {
        self.connections
            .get_or_create(&ConnectionLabels {
                result: if accepted { "accepted" } else { "refused" },
            })
            .inc();
    }

    pub fn record_audit_error(&self) {
        self.audit_errors.inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self, snapshot: Snapshot) -> String {
        let mut out = String::new();
        let mut live = Registry::default();
        live.register_collector(Box::new(snapshot));
        // Writing into a String cannot fail; an encoder error would be a bug
        // in a metric name, and the partial text is still served.
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &live);
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// Pool, zygote and load figures copied from the daemon at scrape time.
#[derive(Debug)]
pub struct Snapshot {
    pub running: u64,
    pub max_concurrent: u64,
    pub zygotes: Vec<ZygoteSnapshot>,
    pub sessions: SessionSnapshot,
}

/// Session figures for a scrape (filled in by the composition root).
#[derive(Debug, Default, Clone)]
pub struct SessionSnapshot {
    pub live: u64,
    pub created: u64,
    pub cells: u64,
    /// Ended sessions by why (`killed`, `ttl`, `idle`, `died`, `shutdown`).
    pub ended: Vec<(&'static str, u64)>,
    /// Session requests answered: (operation, outcome, count); the outcome
    /// is `ok` or the error code (`cancelled` for cancels).
    pub requests: Vec<(&'static str, &'static str, u64)>,
}

#[derive(Debug)]
pub struct ZygoteSnapshot {
    pub name: String,
    pub up: bool,
    pub starts: u64,
    pub start_failures: u64,
    pub deaths: u64,
    pub recycles: u64,
    /// When it has a warm pool.
    pub pool: Option<WarmSnapshot>,
}

#[derive(Debug, Clone, Copy)]
pub struct WarmSnapshot {
    pub ready: u64,
    pub target: u64,
    pub hits: u64,
    pub misses: u64,
    pub refills: u64,
    pub discarded: u64,
    pub shrunk: u64,
}

/// Encodes one metric with a value per zygote (`None`: no series for it).
fn per_zygote<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    values: impl Iterator<Item = (String, Option<M>)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (zygote, value) in values {
        if let Some(value) = value {
            let labels = [("zygote", zygote.as_str())];
            value.encode(metric.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let running = ConstGauge::new(self.running as i64);
        running.encode(encoder.encode_descriptor(
            "forkd_sandboxes_running",
            "Sandboxes running right now.",
            None,
            MetricType::Gauge,
        )?)?;
        let max = ConstGauge::new(self.max_concurrent as i64);
        max.encode(encoder.encode_descriptor(
            "forkd_sandboxes_max",
            "Sandboxes allowed at once (max_concurrent); further requests wait.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.sessions.live as i64).encode(encoder.encode_descriptor(
            "forkd_sessions_live",
            "Sessions alive right now (running or paused).",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(self.sessions.created).encode(encoder.encode_descriptor(
            "forkd_sessions_created",
            "Sessions created.",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(self.sessions.cells).encode(encoder.encode_descriptor(
            "forkd_session_cells",
            "Cells run in sessions.",
            None,
            MetricType::Counter,
        )?)?;
        {
            let mut family = encoder.encode_descriptor(
                "forkd_sessions_ended",
                "Sessions ended, by why (killed, ttl, idle, died, shutdown).",
                None,
                MetricType::Counter,
            )?;
            for (why, n) in &self.sessions.ended {
                let labels = [("ended_by", *why)];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "forkd_session_requests",
                "Session requests answered, by operation and outcome (ok, or the error code; cancels count as cancelled).",
                None,
                MetricType::Counter,
            )?;
            for (op, outcome, n) in &self.sessions.requests {
                let labels = [("op", *op), ("outcome", *outcome)];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        let z = &self.zygotes;
        let gauge = |f: fn(&ZygoteSnapshot) -> Option<u64>| {
            z.iter()
                .map(move |s| (s.name.clone(), f(s).map(|v| ConstGauge::new(v as i64))))
        };
        let counter = |f: fn(&ZygoteSnapshot) -> Option<u64>| {
            z.iter()
                .map(move |s| (s.name.clone(), f(s).map(ConstCounter::new)))
        };
        per_zygote(
            &mut encoder,
            "forkd_zygote_up",
            "1 while the zygote is running and serving, 0 while it (re)starts or after a failed start.",
            MetricType::Gauge,
            gauge(|s| Some(u64::from(s.up))),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_zygote_starts",
            "Zygote processes started successfully (first start, restarts and recycling).",
            MetricType::Counter,
            counter(|s| Some(s.starts)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_zygote_start_failures",
            "Zygote starts that failed (interpreter, preload import, timeout).",
            MetricType::Counter,
            counter(|s| Some(s.start_failures)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_zygote_restarts",
            "Zygotes that died unexpectedly and were restarted.",
            MetricType::Counter,
            counter(|s| Some(s.deaths)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_zygote_recycles",
            "Zygotes replaced after max_forks or max_age_secs.",
            MetricType::Counter,
            counter(|s| Some(s.recycles)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_warm_pool_ready",
            "Warm children parked and ready now.",
            MetricType::Gauge,
            gauge(|s| s.pool.map(|p| p.ready)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_warm_pool_target",
            "Warm children the pool aims to keep ready now (adapts between warm_pool_min and warm_pool_max).",
            MetricType::Gauge,
            gauge(|s| s.pool.map(|p| p.target)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_warm_pool_hits",
            "Requests served by a warm child.",
            MetricType::Counter,
            counter(|s| s.pool.map(|p| p.hits)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_warm_pool_misses",
            "Requests that found the warm pool empty and were forked on demand.",
            MetricType::Counter,
            counter(|s| s.pool.map(|p| p.misses)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_warm_pool_refills",
            "Warm children prepared by the refill task.",
            MetricType::Counter,
            counter(|s| s.pool.map(|p| p.refills)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_warm_pool_discarded",
            "Warm children thrown away unused (their zygote died or was recycled, or they idled too long).",
            MetricType::Counter,
            counter(|s| s.pool.map(|p| p.discarded)),
        )?;
        per_zygote(
            &mut encoder,
            "forkd_warm_pool_shrunk",
            "Parked warm children killed because the pool shrank.",
            MetricType::Counter,
            counter(|s| s.pool.map(|p| p.shrunk)),
        )?;
        let info =
            prometheus_client::metrics::info::Info::new([("version", env!("CARGO_PKG_VERSION"))]);
        info.encode(encoder.encode_descriptor(
            "forkd_build",
            "forkd's version.",
            None,
            MetricType::Info,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_labels_match_the_wire_names() {
        for code in [
            ErrorCode::MalformedFrame,
            ErrorCode::LimitExceedsPolicy,
            ErrorCode::ZygoteUnavailable,
            ErrorCode::Internal,
        ] {
            let wire = serde_json::to_value(code).unwrap();
            assert_eq!(wire.as_str(), Some(error_code_label(code)));
        }
        for k in [KilledBy::Timeout, KilledBy::OutputLimit, KilledBy::Oom] {
            let wire = serde_json::to_value(k).unwrap();
            assert_eq!(wire.as_str(), Some(killed_by_label(Some(k))));
        }
    }

    #[test]
    fn request_metrics_render_with_units_and_bounded_labels() {
        let m = Metrics::new();
        m.record_error(NO_ZYGOTE, ErrorCode::UnknownZygote);
        m.record_connection(false);
        m.duration
            .get_or_create(&LatencyLabels {
                zygote: "default".into(),
                warm: "true",
            })
            .observe(0.002);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains(r#"forkd_spawns_total{zygote="-",outcome="error",killed_by="none"} 1"#),
            "{out}"
        );
        assert!(out.contains(r#"forkd_spawn_errors_total{zygote="-",code="unknown_zygote"} 1"#));
        assert!(out.contains(r#"forkd_connections_total{result="refused"} 1"#));
        assert!(
            out.contains("# TYPE forkd_spawn_duration_seconds histogram"),
            "{out}"
        );
        assert!(out.contains("# UNIT forkd_spawn_duration_seconds seconds"));
        for line in [
            r#"forkd_spawn_duration_seconds_bucket{le="0.001",zygote="default",warm="true"} 0"#,
            r#"forkd_spawn_duration_seconds_bucket{le="0.0025",zygote="default",warm="true"} 1"#,
        ] {
            assert!(out.contains(line), "{line} missing:\n{out}");
        }
    }
}
