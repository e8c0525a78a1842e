//! A small Prometheus registry: registration takes a mutex (rare, at startup), updates go
//! through atomics held by the returned handles (hot paths such as the all-to-all loop),
//! and rendering takes the mutex only long enough to walk the series.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::TelemetryError;

/// The Prometheus metric type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

impl MetricKind {
    fn as_str(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

impl fmt::Display for MetricKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A monotonically increasing integer. Cloning shares the series.
#[derive(Debug, Clone)]
pub struct Counter {
    value: Arc<AtomicU64>,
}

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, delta: u64) {
        // Relaxed: a scrape needs each value eventually, not an ordering between series.
        self.value.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down, stored as `f64` bits so updates need no lock.
#[derive(Debug, Clone)]
pub struct Gauge {
    bits: Arc<AtomicU64>,
}

impl Gauge {
    pub fn set(&self, value: f64) {
        self.bits.store(value.to_bits(), Ordering::Relaxed);
    }

    pub fn add(&self, delta: f64) {
        add_f64(&self.bits, delta);
    }

    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Relaxed))
    }
}

/// Observations counted into fixed buckets chosen at registration.
#[derive(Debug, Clone)]
pub struct Histogram {
    core: Arc<HistogramCore>,
}

#[derive(Debug)]
struct HistogramCore {
    /// Finite, strictly increasing upper bounds; `+Inf` is implicit.
    bounds: Box<[f64]>,
    /// Per-bucket (not cumulative) counts, one more than `bounds` for `+Inf`. Kept
    /// non-cumulative so an observation is a single atomic add; render accumulates.
    bucket_counts: Box<[AtomicU64]>,
    sum_bits: AtomicU64,
}

impl Histogram {
    /// Records one observation. NaN is ignored: it would land only in `+Inf` and turn
    /// `_sum` into NaN for the rest of the process's life.
    pub fn observe(&self, value: f64) {
        if value.is_nan() {
            return;
        }
        let core = &self.core;
        // First bucket whose upper bound is >= value (`le` is inclusive).
        let index = core.bounds.partition_point(|bound| *bound < value);
        core.bucket_counts[index].fetch_add(1, Ordering::Relaxed);
        add_f64(&core.sum_bits, value);
    }

    /// Number of observations recorded so far.
    pub fn count(&self) -> u64 {
        self.core
            .bucket_counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of the observations recorded so far.
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.core.sum_bits.load(Ordering::Relaxed))
    }
}

fn add_f64(bits: &AtomicU64, delta: f64) {
    // fetch_update retries the CAS until no other writer raced us.
    let _ = bits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
        Some((f64::from_bits(current) + delta).to_bits())
    });
}

/// Label pairs sorted by name: Prometheus treats a label set as unordered, so
/// `[("a","1"),("b","2")]` and `[("b","2"),("a","1")]` must be the same series.
type LabelSet = Vec<(String, String)>;

#[derive(Debug, Clone)]
enum Series {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

#[derive(Debug)]
struct Family {
    help: String,
    kind: MetricKind,
    /// Only for histograms: every series of a family shares one bucket layout, otherwise
    /// `histogram_quantile` over the family would be meaningless.
    bounds: Vec<f64>,
    series: BTreeMap<LabelSet, Series>,
}

/// The set of metric families of one process. Cheap to clone (an `Arc` inside); clones
/// share the same metrics.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    // BTreeMap: families render in name order, so successive scrapes are diffable.
    families: Arc<Mutex<BTreeMap<String, Family>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or finds) the counter series `name{labels}`.
    pub fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
    ) -> Result<Counter, TelemetryError> {
        let series = self.register(name, help, labels, MetricKind::Counter, &[], || {
            Series::Counter(Counter {
                value: Arc::new(AtomicU64::new(0)),
            })
        })?;
        match series {
            Series::Counter(counter) => Ok(counter),
            _ => unreachable!("register checks the family kind"),
        }
    }

    /// Registers (or finds) the gauge series `name{labels}`, starting at 0.
    pub fn gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
    ) -> Result<Gauge, TelemetryError> {
        let series = self.register(name, help, labels, MetricKind::Gauge, &[], || {
            Series::Gauge(Gauge {
                bits: Arc::new(AtomicU64::new(0f64.to_bits())),
            })
        })?;
        match series {
            Series::Gauge(gauge) => Ok(gauge),
            _ => unreachable!("register checks the family kind"),
        }
    }

    /// Registers (or finds) the histogram series `name{labels}` with the given finite,
    /// strictly increasing upper bounds (a trailing `+Inf` is accepted and dropped, since
    /// it is always rendered). Every series of a family must use the same bounds.
    pub fn histogram(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        buckets: &[f64],
    ) -> Result<Histogram, TelemetryError> {
        let bounds = validate_buckets(name, buckets)?;
        let series = self.register(name, help, labels, MetricKind::Histogram, &bounds, || {
            Series::Histogram(Histogram {
                core: Arc::new(HistogramCore {
                    bounds: bounds.clone().into_boxed_slice(),
                    bucket_counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                    sum_bits: AtomicU64::new(0f64.to_bits()),
                }),
            })
        })?;
        match series {
            Series::Histogram(histogram) => Ok(histogram),
            _ => unreachable!("register checks the family kind"),
        }
    }

    fn register(
        &self,
        name: &str,
        help: &str,
        labels: &[(&str, &str)],
        kind: MetricKind,
        bounds: &[f64],
        new_series: impl FnOnce() -> Series,
    ) -> Result<Series, TelemetryError> {
        validate_metric_name(name)?;
        let label_set = validate_labels(name, labels, kind)?;

        let mut families = self.lock();
        let family = families.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            bounds: bounds.to_vec(),
            series: BTreeMap::new(),
        });
        if family.kind != kind {
            return Err(TelemetryError::KindConflict {
                name: name.to_owned(),
                existing: family.kind,
                requested: kind,
            });
        }
        if family.bounds != bounds {
            return Err(TelemetryError::BucketsConflict {
                name: name.to_owned(),
                existing: family.bounds.clone(),
                requested: bounds.to_vec(),
            });
        }
        // The first registration's help text wins; a differing later one is not worth
        // failing a process over.
        Ok(family
            .series
            .entry(label_set)
            .or_insert_with(new_series)
            .clone())
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Family>> {
        // No code path panics while holding the lock, but if one ever did, the map is
        // still consistent (every mutation is a single insert), so keep serving metrics.
        self.families
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// All metrics in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let families = self.lock();
        let mut out = String::with_capacity(256 * families.len().max(1));
        for (name, family) in families.iter() {
            if family.series.is_empty() {
                continue;
            }
            // Writing to a String cannot fail.
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
            let _ = writeln!(out, "# TYPE {name} {}", family.kind);
            for (labels, series) in &family.series {
                match series {
                    Series::Counter(counter) => {
                        write_sample(&mut out, name, "", labels, None, &counter.get().to_string());
                    }
                    Series::Gauge(gauge) => {
                        write_sample(&mut out, name, "", labels, None, &format_f64(gauge.get()));
                    }
                    Series::Histogram(histogram) => {
                        write_histogram(&mut out, name, labels, histogram)
                    }
                }
            }
        }
        out
    }
}

fn write_histogram(out: &mut String, name: &str, labels: &LabelSet, histogram: &Histogram) {
    let core = &histogram.core;
    let mut cumulative = 0u64;
    for (index, count) in core.bucket_counts.iter().enumerate() {
        cumulative += count.load(Ordering::Relaxed);
        let le = match core.bounds.get(index) {
            Some(bound) => format_f64(*bound),
            None => "+Inf".to_owned(),
        };
        write_sample(
            out,
            name,
            "_bucket",
            labels,
            Some(&le),
            &cumulative.to_string(),
        );
    }
    write_sample(
        out,
        name,
        "_sum",
        labels,
        None,
        &format_f64(histogram.sum()),
    );
    // _count is the +Inf bucket by definition; using the same number keeps them equal
    // even when observations race with the scrape.
    write_sample(out, name, "_count", labels, None, &cumulative.to_string());
}

fn write_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &LabelSet,
    le: Option<&str>,
    value: &str,
) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() || le.is_some() {
        out.push('{');
        let le_pair = le.map(|le| ("le", le));
        let pairs = labels
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .chain(le_pair);
        for (index, (key, value)) in pairs.enumerate() {
            if index > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            escape_label_value_into(out, value);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(value);
    out.push('\n');
}

/// Prometheus spells the special floats `+Inf`, `-Inf` and `NaN`; Rust's `Display`
/// would write `inf`, which scrapers reject.
fn format_f64(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        value.to_string()
    }
}

fn escape_label_value_into(out: &mut String, value: &str) {
    for character in value.chars() {
        match character {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            other => out.push(other),
        }
    }
}

/// HELP text escapes only backslash and newline (quotes are literal there).
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn validate_metric_name(name: &str) -> Result<(), TelemetryError> {
    let mut chars = name.chars();
    let valid = match chars.next() {
        Some(first) => {
            (first.is_ascii_alphabetic() || first == '_' || first == ':')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        }
        None => false,
    };
    if valid {
        Ok(())
    } else {
        Err(TelemetryError::InvalidMetricName(name.to_owned()))
    }
}

fn validate_labels(
    metric: &str,
    labels: &[(&str, &str)],
    kind: MetricKind,
) -> Result<LabelSet, TelemetryError> {
    let invalid = |label: &str, reason| TelemetryError::InvalidLabelName {
        metric: metric.to_owned(),
        label: label.to_owned(),
        reason,
    };
    let mut label_set: LabelSet = Vec::with_capacity(labels.len());
    for (key, value) in labels {
        let mut chars = key.chars();
        let well_formed = match chars.next() {
            Some(first) => {
                (first.is_ascii_alphabetic() || first == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            }
            None => false,
        };
        if !well_formed {
            return Err(invalid(key, "must match [a-zA-Z_][a-zA-Z0-9_]*"));
        }
        if key.starts_with("__") {
            return Err(invalid(key, "names starting with __ are reserved"));
        }
        if kind == MetricKind::Histogram && *key == "le" {
            return Err(invalid(key, "\"le\" is reserved for histogram buckets"));
        }
        label_set.push(((*key).to_owned(), (*value).to_owned()));
    }
    label_set.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(pair) = label_set.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(invalid(&pair[0].0, "label given more than once"));
    }
    Ok(label_set)
}

fn validate_buckets(name: &str, buckets: &[f64]) -> Result<Vec<f64>, TelemetryError> {
    let invalid = |reason| TelemetryError::InvalidBuckets {
        name: name.to_owned(),
        reason,
    };
    let bounds = match buckets.split_last() {
        Some((last, rest)) if *last == f64::INFINITY => rest,
        _ => buckets,
    };
    if bounds.iter().any(|bound| !bound.is_finite()) {
        return Err(invalid("bounds must be finite (+Inf is implicit)"));
    }
    if bounds.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(invalid("bounds must be strictly increasing"));
    }
    Ok(bounds.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECONDS: &[f64] = &[0.001, 0.01, 0.1, 1.0, 10.0];

    #[test]
    fn counter_renders_help_type_and_labels() {
        let registry = Registry::new();
        let bytes = registry
            .counter(
                "switchyard_alltoall_bytes_total",
                "Bytes sent.",
                &[("rank", "0")],
            )
            .unwrap();
        bytes.inc_by(4096);
        bytes.inc();
        assert_eq!(
            registry.render(),
            "# HELP switchyard_alltoall_bytes_total Bytes sent.\n\
             # TYPE switchyard_alltoall_bytes_total counter\n\
             switchyard_alltoall_bytes_total{rank=\"0\"} 4097\n"
        );
    }

    #[test]
    fn help_and_type_appear_once_per_family_and_families_sort_by_name() {
        let registry = Registry::new();
        registry
            .gauge("zeta", "z", &[("rank", "1")])
            .unwrap()
            .set(1.5);
        registry
            .gauge("zeta", "z", &[("rank", "0")])
            .unwrap()
            .set(-2.0);
        registry.counter("alpha", "a", &[]).unwrap().inc();
        let text = registry.render();
        assert_eq!(
            text,
            "# HELP alpha a\n# TYPE alpha counter\nalpha 1\n\
             # HELP zeta z\n# TYPE zeta gauge\nzeta{rank=\"0\"} -2\nzeta{rank=\"1\"} 1.5\n"
        );
        assert_eq!(text.matches("# TYPE zeta").count(), 1);
    }

    #[test]
    fn label_values_are_escaped_and_help_is_escaped() {
        let registry = Registry::new();
        registry
            .counter(
                "escapes_total",
                "line one\nback\\slash \"quoted\"",
                &[("path", "C:\\x \"y\"\nz")],
            )
            .unwrap()
            .inc();
        let text = registry.render();
        assert!(
            text.contains("# HELP escapes_total line one\\nback\\\\slash \"quoted\"\n"),
            "{text}"
        );
        assert!(
            text.contains("escapes_total{path=\"C:\\\\x \\\"y\\\"\\nz\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_sum_and_count() {
        let registry = Registry::new();
        let latency = registry
            .histogram("step_seconds", "Step latency.", &[("rank", "0")], SECONDS)
            .unwrap();
        for value in [0.0005, 0.001, 0.05, 0.05, 2.0, 100.0, f64::NAN] {
            latency.observe(value);
        }
        let text = registry.render();
        let expected = "# HELP step_seconds Step latency.\n\
             # TYPE step_seconds histogram\n\
             step_seconds_bucket{rank=\"0\",le=\"0.001\"} 2\n\
             step_seconds_bucket{rank=\"0\",le=\"0.01\"} 2\n\
             step_seconds_bucket{rank=\"0\",le=\"0.1\"} 4\n\
             step_seconds_bucket{rank=\"0\",le=\"1\"} 4\n\
             step_seconds_bucket{rank=\"0\",le=\"10\"} 5\n\
             step_seconds_bucket{rank=\"0\",le=\"+Inf\"} 6\n";
        assert!(text.starts_with(expected), "{text}");
        let sum_line = text
            .lines()
            .find(|line| line.starts_with("step_seconds_sum"))
            .unwrap();
        let sum: f64 = sum_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((sum - 102.1015).abs() < 1e-9, "{sum_line}");
        assert!(
            text.ends_with("step_seconds_count{rank=\"0\"} 6\n"),
            "{text}"
        );
        assert_eq!(latency.count(), 6);
    }

    #[test]
    fn histogram_without_labels_has_only_le() {
        let registry = Registry::new();
        registry
            .histogram("h", "h", &[], &[1.0, f64::INFINITY])
            .unwrap()
            .observe(3.0);
        let text = registry.render();
        assert!(
            text.contains("h_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 1\nh_sum 3\nh_count 1\n"),
            "{text}"
        );
    }

    #[test]
    fn same_name_and_labels_return_the_same_series_in_any_label_order() {
        let registry = Registry::new();
        let first = registry
            .counter("c_total", "c", &[("a", "1"), ("b", "2")])
            .unwrap();
        let second = registry
            .counter("c_total", "other help", &[("b", "2"), ("a", "1")])
            .unwrap();
        first.inc_by(3);
        second.inc_by(4);
        assert_eq!(first.get(), 7);
        let other = registry.counter("c_total", "c", &[("a", "9")]).unwrap();
        assert_eq!(other.get(), 0);
        let text = registry.render();
        assert!(text.contains("c_total{a=\"1\",b=\"2\"} 7\n"), "{text}");
        assert!(text.contains("# HELP c_total c\n"), "{text}");

        let gauge = registry.gauge("g", "g", &[]).unwrap();
        gauge.set(2.5);
        registry.gauge("g", "g", &[]).unwrap().add(1.0);
        assert_eq!(gauge.get(), 3.5);
    }

    #[test]
    fn registering_one_name_as_two_kinds_is_an_error() {
        let registry = Registry::new();
        registry.counter("requests", "r", &[]).unwrap();
        let error = registry.gauge("requests", "r", &[("x", "1")]).unwrap_err();
        assert!(
            matches!(
                error,
                TelemetryError::KindConflict {
                    existing: MetricKind::Counter,
                    requested: MetricKind::Gauge,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .contains("already registered as a counter"),
            "{error}"
        );
        assert!(matches!(
            registry.histogram("requests", "r", &[], SECONDS),
            Err(TelemetryError::KindConflict { .. })
        ));
    }

    #[test]
    fn histogram_bucket_mismatch_is_an_error() {
        let registry = Registry::new();
        registry
            .histogram("h", "h", &[("a", "1")], SECONDS)
            .unwrap();
        assert!(matches!(
            registry.histogram("h", "h", &[("a", "2")], &[1.0]),
            Err(TelemetryError::BucketsConflict { .. })
        ));
        assert!(registry.histogram("h", "h", &[("a", "2")], SECONDS).is_ok());
    }

    #[test]
    fn invalid_names_and_buckets_are_rejected() {
        let registry = Registry::new();
        for bad in ["", "1abc", "a-b", "a b", "é"] {
            assert!(
                matches!(
                    registry.counter(bad, "h", &[]),
                    Err(TelemetryError::InvalidMetricName(_))
                ),
                "{bad:?} accepted"
            );
        }
        for good in ["a", "_a", ":a", "a:b_c9"] {
            assert!(
                registry.counter(good, "h", &[]).is_ok(),
                "{good:?} rejected"
            );
        }
        for bad_label in ["", "a:b", "9a", "__reserved", "a-b"] {
            assert!(
                matches!(
                    registry.counter("ok_total", "h", &[(bad_label, "v")]),
                    Err(TelemetryError::InvalidLabelName { .. })
                ),
                "{bad_label:?} accepted"
            );
        }
        assert!(matches!(
            registry.counter("ok_total", "h", &[("a", "1"), ("a", "2")]),
            Err(TelemetryError::InvalidLabelName { .. })
        ));
        assert!(matches!(
            registry.histogram("hh", "h", &[("le", "1")], SECONDS),
            Err(TelemetryError::InvalidLabelName { .. })
        ));
        for bad_buckets in [
            &[1.0, 1.0][..],
            &[2.0, 1.0],
            &[f64::NAN],
            &[f64::NEG_INFINITY, 1.0],
        ] {
            assert!(
                matches!(
                    registry.histogram("hh", "h", &[], bad_buckets),
                    Err(TelemetryError::InvalidBuckets { .. })
                ),
                "{bad_buckets:?} accepted"
            );
        }
        // Failed registrations leave nothing behind to render.
        assert!(!registry.render().contains("hh"));
    }

    #[test]
    fn special_float_values_use_prometheus_spelling() {
        let registry = Registry::new();
        registry.gauge("inf", "i", &[]).unwrap().set(f64::INFINITY);
        registry.gauge("nan", "n", &[]).unwrap().set(f64::NAN);
        registry
            .gauge("neg", "n", &[])
            .unwrap()
            .set(f64::NEG_INFINITY);
        let text = registry.render();
        assert!(
            text.contains("inf +Inf\n")
                && text.contains("nan NaN\n")
                && text.contains("neg -Inf\n"),
            "{text}"
        );
    }

    #[test]
    fn updates_from_many_threads_are_not_lost() {
        let registry = Registry::new();
        let counter = registry.counter("t_total", "t", &[]).unwrap();
        let histogram = registry.histogram("t_seconds", "t", &[], &[0.5]).unwrap();
        let gauge = registry.gauge("t_gauge", "t", &[]).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        counter.inc();
                        histogram.observe(1.0);
                        gauge.add(1.0);
                    }
                });
            }
        });
        assert_eq!(counter.get(), 40_000);
        assert_eq!(histogram.count(), 40_000);
        assert_eq!(histogram.sum(), 40_000.0);
        assert_eq!(gauge.get(), 40_000.0);
    }

    #[test]
    fn registry_is_send_sync_and_clones_share_state() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Registry>();
        assert_send_sync::<Counter>();
        assert_send_sync::<Gauge>();
        assert_send_sync::<Histogram>();
        let registry = Registry::new();
        registry
            .clone()
            .counter("shared_total", "s", &[])
            .unwrap()
            .inc();
        assert!(registry.render().contains("shared_total 1\n"));
    }
}
