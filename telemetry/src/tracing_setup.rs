//! Process-wide `tracing` setup: human-readable logs on stderr, plus optional span export
//! to an OpenTelemetry collector over OTLP/gRPC.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::TelemetryError;

/// The SDK reports every failed export as an ERROR through its own logging; with no
/// collector that is one line per batch forever, so these are silenced unless
/// `SWITCHYARD_LOG` asks for them by name.
const QUIET_TARGETS: &[&str] = &["opentelemetry_sdk", "opentelemetry_otlp", "opentelemetry"];

/// Upper bound on one export RPC. The exporter retries within it, so it is also how long
/// a span batch is kept trying against an absent collector.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// Upper bound on flushing at shutdown: a process that is exiting must not wait on a
/// collector that does not answer.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_millis(1500);

/// Set once the global subscriber is claimed, so a second call fails fast and before it
/// builds (and then has to tear down) an exporter.
static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// Keeps span export alive; dropping it (or [`TracingGuard::shutdown`]) flushes pending
/// spans, waiting at most about 1.5 s. Keep it alive until the process is about to exit.
#[must_use = "dropping the guard stops span export"]
pub struct TracingGuard {
    otlp: Option<OtlpPipeline>,
}

impl TracingGuard {
    /// Whether spans are being exported over OTLP.
    pub fn exports_spans(&self) -> bool {
        self.otlp.is_some()
    }

    /// Flushes and stops span export, reporting whether the final flush succeeded
    /// (it fails, within the bounded wait, when no collector answers).
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        match self.otlp.take() {
            Some(pipeline) => pipeline.shutdown(),
            None => Ok(()),
        }
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(pipeline) = self.otlp.take() {
            // Nothing to report to from a destructor; the error is only "collector absent".
            let _ = pipeline.shutdown();
        }
    }
}

/// The environment variable with the log filter directives (`RUST_LOG` syntax).
pub const LOG_ENV: &str = "SWITCHYARD_LOG";

/// Installs the global `tracing` subscriber: a fmt layer on stderr filtered by
/// `SWITCHYARD_LOG` (default `default_filter`), and, when `otlp_endpoint` is given (e.g.
/// `http://otel-collector:4317`; a bare `host:port` means plain http), an OTLP/gRPC span
/// exporter with `service.name = service`.
///
/// Works with or without a Tokio runtime: the exporter runs its gRPC channel on a
/// private one-thread runtime so a caller's runtime shutting down (or blocking in a
/// destructor) cannot stall exports. A second call returns
/// [`TelemetryError::AlreadyInitialized`].
pub fn init_tracing(
    service: &str,
    otlp_endpoint: Option<&str>,
    default_filter: &str,
) -> Result<TracingGuard, TelemetryError> {
    let from_env = std::env::var(LOG_ENV).ok();
    let directives = filter_directives(from_env.as_deref(), default_filter);
    let filter = EnvFilter::try_new(&directives).map_err(|error| TelemetryError::Filter {
        directives: directives.clone(),
        reason: error.to_string(),
    })?;

    if INITIALIZED.swap(true, Ordering::SeqCst) {
        return Err(TelemetryError::AlreadyInitialized);
    }

    let otlp = match otlp_endpoint.map(|endpoint| OtlpPipeline::start(service, endpoint)) {
        Some(Ok(pipeline)) => Some(pipeline),
        Some(Err(error)) => {
            // Nothing was installed, so let a corrected retry succeed.
            INITIALIZED.store(false, Ordering::SeqCst);
            return Err(error);
        }
        None => None,
    };
    let otel_layer = otlp
        .as_ref()
        .map(|pipeline| tracing_opentelemetry::layer().with_tracer(pipeline.tracer(service)));
    let fmt_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());

    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init();
    if installed.is_err() {
        // Another subscriber (or `log` logger) was installed by someone else.
        if let Some(pipeline) = otlp {
            let _ = pipeline.shutdown();
        }
        return Err(TelemetryError::AlreadyInitialized);
    }
    Ok(TracingGuard { otlp })
}

/// The directives from the environment (or `default_filter`), with the OpenTelemetry crates'
/// own logging switched off unless the directives mention them.
fn filter_directives(from_env: Option<&str>, default_filter: &str) -> String {
    let mut directives = match from_env.map(str::trim) {
        Some(from_env) if !from_env.is_empty() => from_env.to_owned(),
        _ => default_filter.to_owned(),
    };
    for target in QUIET_TARGETS {
        if !names_target(&directives, target) {
            directives.push_str(&format!(",{target}=off"));
        }
    }
    directives
}

/// Whether some directive (`target[span{field}]=level`) is about `target` or a module in it.
fn names_target(directives: &str, target: &str) -> bool {
    directives.split(',').any(|directive| {
        let named = directive
            .split(['[', '='])
            .next()
            .unwrap_or_default()
            .trim();
        named == target
            || named
                .strip_prefix(target)
                .is_some_and(|rest| rest.starts_with("::"))
    })
}

/// The OTLP exporter and the runtime its gRPC channel lives on.
pub(crate) struct OtlpPipeline {
    provider: SdkTracerProvider,
    /// Dropping this ends the private runtime's thread.
    _runtime_stop: tokio::sync::oneshot::Sender<()>,
}

impl OtlpPipeline {
    pub(crate) fn start(service: &str, endpoint: &str) -> Result<Self, TelemetryError> {
        let endpoint = if endpoint.contains("://") {
            endpoint.to_owned()
        } else {
            format!("http://{endpoint}")
        };

        // tonic's lazily connecting channel spawns its connection task onto the
        // current runtime, so it needs one at build time. A private runtime avoids
        // requiring a caller's, and keeps exporting while a caller's runtime is busy or
        // gone. The SDK's batch thread polls exports with a plain executor, which works
        // because the channel's I/O is driven here.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("otlp-export")
            .build()
            .map_err(|error| {
                TelemetryError::Otlp(format!("cannot start export runtime: {error}"))
            })?;
        let exporter = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|error| {
                    TelemetryError::Otlp(format!(
                        "cannot build span exporter for {endpoint:?}: {error}"
                    ))
                })?
        };
        let (runtime_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("otlp-export".to_owned())
            .spawn(move || {
                // Resolves when the sender is dropped, i.e. when the pipeline is.
                let _ = runtime.block_on(stopped);
                // Bounded: a DNS lookup stuck in a blocking thread must not keep this
                // thread (or the process exit) waiting.
                runtime.shutdown_timeout(Duration::from_millis(500));
            })
            .map_err(|error| {
                TelemetryError::Otlp(format!("cannot start export thread: {error}"))
            })?;

        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_resource(
                Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build();
        Ok(Self {
            provider,
            _runtime_stop: runtime_stop,
        })
    }

    pub(crate) fn tracer(&self, service: &str) -> SdkTracer {
        self.provider.tracer(service.to_owned())
    }

    /// Flushes pending spans within [`SHUTDOWN_TIMEOUT`], then stops the export runtime.
    pub(crate) fn shutdown(self) -> Result<(), TelemetryError> {
        let flushed = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        // `self` (and with it the runtime's stop sender) drops here.
        flushed
            .map_err(|error| TelemetryError::Otlp(format!("flushing spans at shutdown: {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_filter_is_info_with_otel_silenced() {
        assert_eq!(
            filter_directives(None, "info"),
            "info,opentelemetry_sdk=off,opentelemetry_otlp=off,opentelemetry=off"
        );
        assert_eq!(filter_directives(Some("  "), "info"), filter_directives(None, "info"));
    }

    #[test]
    fn rust_log_is_kept_and_named_otel_targets_are_not_overridden() {
        assert_eq!(
            filter_directives(Some("debug,opentelemetry_sdk=debug"), "info"),
            "debug,opentelemetry_sdk=debug,opentelemetry_otlp=off,opentelemetry=off"
        );
        assert_eq!(
            filter_directives(Some("opentelemetry_otlp::exporter=trace"), "info"),
            "opentelemetry_otlp::exporter=trace,opentelemetry_sdk=off,opentelemetry=off"
        );
        for directives in [
            filter_directives(Some("warn,worker=trace"), "info"),
            filter_directives(None, "info"),
        ] {
            assert!(EnvFilter::try_new(&directives).is_ok(), "{directives}");
        }
    }

    mod fake_collector {
        use std::sync::{Arc, Mutex};

        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };

        #[derive(Clone, Default)]
        pub struct Collector {
            pub received: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
        }

        #[tonic::async_trait]
        impl TraceService for Collector {
            async fn export(
                &self,
                request: tonic::Request<ExportTraceServiceRequest>,
            ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
                self.received.lock().unwrap().push(request.into_inner());
                Ok(tonic::Response::new(ExportTraceServiceResponse {
                    partial_success: None,
                }))
            }
        }
    }

    #[test]
    fn spans_reach_a_collector_with_the_service_name() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        use opentelemetry_proto::tonic::common::v1::any_value::Value;

        let server_runtime = tokio::runtime::Runtime::new().unwrap();
        let collector = fake_collector::Collector::default();
        let port = server_runtime.block_on(async {
            let incoming =
                tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
                    .unwrap();
            let port = incoming.local_addr().unwrap().port();
            let server = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(incoming);
            tokio::spawn(server);
            port
        });

        // A bare host:port must be accepted and mean plain-text gRPC.
        let pipeline = OtlpPipeline::start("unit-test-svc", &format!("127.0.0.1:{port}")).unwrap();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(pipeline.tracer("unit-test-svc")));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info_span!("expert_dispatch", rank = 3).in_scope(|| {});
        });
        let started = std::time::Instant::now();
        pipeline
            .shutdown()
            .expect("flush to a live collector succeeds");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );

        let received = collector.received.lock().unwrap();
        let resource_spans: Vec<_> = received
            .iter()
            .flat_map(|request| &request.resource_spans)
            .collect();
        let service_names: Vec<_> = resource_spans
            .iter()
            .filter_map(|spans| spans.resource.as_ref())
            .flat_map(|resource| &resource.attributes)
            .filter(|attribute| attribute.key == "service.name")
            .filter_map(|attribute| attribute.value.as_ref()?.value.as_ref())
            .collect();
        assert_eq!(
            service_names,
            [&Value::StringValue("unit-test-svc".to_owned())]
        );
        let span_names: Vec<_> = resource_spans
            .iter()
            .flat_map(|spans| &spans.scope_spans)
            .flat_map(|scope| &scope.spans)
            .map(|span| span.name.as_str())
            .collect();
        assert_eq!(span_names, ["expert_dispatch"]);
    }
}
