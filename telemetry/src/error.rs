use crate::metrics::MetricKind;

/// Everything that can go wrong in this crate. Registration mistakes are errors rather
/// than panics because metric names are sometimes built from configuration.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid metric name {0:?}: must match [a-zA-Z_:][a-zA-Z0-9_:]*")]
    InvalidMetricName(String),

    #[error("invalid label name {label:?} on metric {metric:?}: {reason}")]
    InvalidLabelName {
        metric: String,
        label: String,
        reason: &'static str,
    },

    #[error(
        "metric {name:?} is already registered as a {existing}, cannot register it as a {requested}"
    )]
    KindConflict {
        name: String,
        existing: MetricKind,
        requested: MetricKind,
    },

    #[error(
        "histogram {name:?} is already registered with buckets {existing:?}, not {requested:?}"
    )]
    BucketsConflict {
        name: String,
        existing: Vec<f64>,
        requested: Vec<f64>,
    },

    #[error("invalid buckets for histogram {name:?}: {reason}")]
    InvalidBuckets { name: String, reason: &'static str },

    #[error("cannot listen for metrics on {addr:?}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid log filter {directives:?}: {reason}")]
    Filter { directives: String, reason: String },

    #[error("tracing is already initialized in this process")]
    AlreadyInitialized,

    #[error("OpenTelemetry OTLP: {0}")]
    Otlp(String),
}
