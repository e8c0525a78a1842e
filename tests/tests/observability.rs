//! Prometheus `/metrics` of a real coordinator and its workers after serving requests, and
//! OTLP export pointed at a collector that does not answer (no hang, serving unaffected).
mod common;
use common::*;
use std::io::{Read, Write};
use std::time::Duration;
use switchyard_tests::etcd::free_port;

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the first sample line starting with `series` (name and labels).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' ')).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn metrics_addr(p: &Proc) -> String {
    p.wait_line("metrics on http://", Duration::from_secs(30))
        .trim()
        .trim_start_matches("metrics on http://")
        .trim_end_matches("/metrics")
        .to_string()
}

#[test]
fn coordinator_and_workers_expose_prometheus_metrics_and_dead_otlp_does_not_hang() {
    let model = fixture("qwen3_moe");
    let m = model.to_str().expect("path");
    let dead_collector = format!("http://127.0.0.1:{}", free_port());
    let c = Proc::spawn(&[
        "coordinator", "--model", m, "--workers", "2", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        "--otlp-endpoint", &dead_collector,
    ]);
    let addr = c.wait_line("listening on ", Duration::from_secs(60)).trim().trim_start_matches("listening on ").to_string();
    let cm = metrics_addr(&c);
    let workers: Vec<Proc> = (0..2)
        .map(|_| Proc::spawn(&["worker", "--coordinator", &addr, "--metrics-listen", "127.0.0.1:0", "--otlp-endpoint", &dead_collector]))
        .collect();
    let wm: Vec<String> = workers.iter().map(metrics_addr).collect();
    c.wait_line("generation 1 serving", Duration::from_secs(60));
    let prompts = ["1,2,3", "4,5,6,7", "8,9", "10,11,12"];
    let mut generated = 0.0;
    for p in prompts {
        let o = generate_at(&addr, &["--prompt-ids", p, "--max-tokens", "8"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        generated += ids_line(&o).expect("ids").trim_start_matches("ids: ").split(',').count() as f64;
    }
    // The live window is fed by health polls every 500 ms.
    std::thread::sleep(Duration::from_millis(1500));
    let body = scrape(&cm);
    for family in [
        "# TYPE switchyard_placement_epoch gauge",
        "# TYPE switchyard_requests_in_flight gauge",
        "# TYPE switchyard_membership_changes_total counter",
        "# TYPE switchyard_layer_balancedness gauge",
    ] {
        assert!(body.contains(family), "missing {family:?} in\n{body}");
    }
    assert_eq!(sample(&body, "switchyard_requests_total{outcome=\"completed\"}"), Some(prompts.len() as f64), "{body}");
    let tokens: f64 = (0..2).filter_map(|r| sample(&body, &format!("switchyard_tokens_total{{rank=\"{r}\"}}"))).sum();
    assert_eq!(tokens, generated, "{body}");
    assert_eq!(sample(&body, "switchyard_placement_epoch"), Some(1.0));
    assert_eq!(sample(&body, "switchyard_workers_alive"), Some(2.0));
    assert_eq!(sample(&body, "switchyard_requests_in_flight"), Some(0.0));
    let b = sample(&body, "switchyard_balancedness").expect("balancedness");
    assert!(b > 0.0 && b <= 1.0, "balancedness {b}");
    let l0 = sample(&body, "switchyard_layer_balancedness{layer=\"0\"}").expect("layer 0");
    assert!(l0 > 0.0 && l0 <= 1.0, "{l0}");
    let mut worker_tokens = 0.0;
    for w in &wm {
        let body = scrape(w);
        worker_tokens += sample(&body, "switchyard_tokens_total").expect("worker tokens");
        let steps = sample(&body, "switchyard_step_seconds_count").expect("step histogram");
        assert!(steps >= 4.0, "every rank steps with the group: {steps}\n{body}");
        assert!(sample(&body, "switchyard_alltoall_bytes_total").expect("bytes") > 0.0);
        assert!(body.contains("switchyard_alltoall_seconds_bucket{le=\"+Inf\"}"), "{body}");
        let projected = sample(&body, "switchyard_projected_step_seconds_count").expect("projected step histogram");
        assert!(projected >= 1.0, "busy group steps get a projection: {projected}\n{body}");
    }
    assert_eq!(worker_tokens, tokens);
    // Anything else is 404; the server survives garbage.
    let mut s = std::net::TcpStream::connect(&cm).expect("connect");
    s.write_all(b"\x00\x01garbage\r\n\r\n").expect("write");
    let mut junk = String::new();
    let _ = s.read_to_string(&mut junk);
    assert!(scrape(&cm).contains("switchyard_placement_epoch"));
}
