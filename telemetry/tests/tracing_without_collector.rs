//! `init_tracing` installs process-global state, so this file holds exactly one test
//! (its own process).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use telemetry::{TelemetryError, init_tracing};

/// The common deployment mistake: a collector address where nothing listens. This runs
/// inside a single-threaded Tokio runtime, as a `#[tokio::main]` would, because blocking
/// there is the easiest way to hang.
#[tokio::test(flavor = "current_thread")]
async fn absent_collector_neither_hangs_nor_panics() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");

    let started = Instant::now();
    let guard = init_tracing("switchyard-test", Some(&endpoint), "info")
        .expect("init succeeds without a collector");
    assert!(guard.exports_spans());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "init took {:?}",
        started.elapsed()
    );

    tracing::info_span!("dispatch", rank = 0).in_scope(|| {
        tracing::info!("inside a span that cannot be delivered");
    });
    // Give the batch processor a chance to try (and fail) a real export before shutdown.
    tokio::time::sleep(Duration::from_millis(200)).await;

    assert!(matches!(
        init_tracing("switchyard-test", None, "info"),
        Err(TelemetryError::AlreadyInitialized)
    ));
    assert!(matches!(
        init_tracing("switchyard-test", Some(&endpoint), "info"),
        Err(TelemetryError::AlreadyInitialized)
    ));

    let started = Instant::now();
    // Err is expected (nothing received the spans); what matters is that it returns.
    let flushed = guard.shutdown();
    let elapsed = started.elapsed();
    eprintln!("shutdown without a collector: {flushed:?} after {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(3),
        "shutdown took {elapsed:?}"
    );

    // Logging after shutdown still works and does not panic.
    tracing::info!("after shutdown");
}
