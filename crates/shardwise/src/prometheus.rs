//! A Prometheus endpoint for the library's metrics (feature `prometheus`), through the
//! `metrics-exporter-prometheus` crate: `GET /metrics` on the address given.
//!
//! The metrics, their labels and meanings are listed in `kcl_core::metrics` (consumer)
//! and the `kcl-producer` crate docs (producer). Per-shard series (`shard_id` label)
//! are touched at every read of the shard while this worker holds it; a series not
//! touched for `idle_timeout` (a shard that left the worker) is removed from the
//! endpoint.
//!
//! OpenTelemetry: the library emits through the `metrics` facade, so any recorder
//! works in place of this one; `metrics-exporter-opentelemetry` (or an OTLP collector
//! scraping this endpoint) brings the same series to an OpenTelemetry pipeline. Traces:
//! the `tracing` spans (one per shard consumer, with the shard id) go to OpenTelemetry
//! through `tracing-opentelemetry`.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;

/// Why the endpoint could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the Prometheus endpoint")]
pub struct PrometheusError(#[source] metrics_exporter_prometheus::BuildError);

/// Installs the Prometheus recorder as the process's `metrics` recorder and serves
/// `GET /metrics` on `address` (use a loopback address unless the endpoint must be
/// reachable from elsewhere). Call once, inside a tokio runtime, before starting
/// schedulers.
///
/// # Errors
/// When the address cannot be bound or a recorder is already installed.
pub fn install_prometheus(address: SocketAddr, idle_timeout: Duration) -> Result<(), PrometheusError> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .idle_timeout(MetricKindMask::ALL, Some(idle_timeout))
        .install()
        .map_err(PrometheusError)
}
