//! Metrics and traces for the Switchyard coordinator and worker processes.
//!
//! - [`Registry`]: Prometheus counters, gauges and histograms, rendered in the text
//!   exposition format 0.0.4. Written here rather than taken from the `metrics` crates
//!   because those roughly double the build on the 2-core CI machines.
//! - [`serve_metrics`]: a deliberately tiny HTTP/1.1 endpoint for `GET /metrics`, so that
//!   no HTTP server framework has to be compiled for one route.
//! - [`init_tracing`]: the process-wide `tracing` subscriber (stderr, `SWITCHYARD_LOG` filter)
//!   and, optionally, span export over OTLP/gRPC.
#![forbid(unsafe_code)]

mod error;
mod http;
mod metrics;
mod tracing_setup;

pub use error::TelemetryError;
pub use http::serve_metrics;
pub use metrics::{Counter, Gauge, Histogram, MetricKind, Registry};
pub use tracing_setup::{TracingGuard, init_tracing};
