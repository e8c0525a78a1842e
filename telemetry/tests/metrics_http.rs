//! The metrics endpoint seen from a plain TCP client, as a scraper (or an attacker) sees it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use telemetry::{Registry, TelemetryError, serve_metrics};

/// The server runs on its own runtime's threads so this test's blocking client calls
/// cannot starve it.
fn start(registry: Registry) -> (tokio::runtime::Runtime, SocketAddr) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (addr, _accept_loop) = runtime
        .block_on(serve_metrics("127.0.0.1:0", registry))
        .unwrap();
    assert_ne!(
        addr.port(),
        0,
        "the bound port is returned, not the requested 0"
    );
    (runtime, addr)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    // A hang shows up as a read error, failing the test, instead of blocking forever.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Sends `request` and reads until the server closes the connection.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect(addr);
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("server closes the connection after responding");
    String::from_utf8(response).unwrap()
}

fn split_response(response: &str) -> (&str, Vec<(String, String)>, &str) {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(": ").unwrap();
            (name.to_ascii_lowercase(), value.to_owned())
        })
        .collect();
    (status, headers, body)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Reads until the peer closes; a reset counts as closed. Fails on timeout.
fn assert_closed_by_server(stream: &mut TcpStream) {
    let mut sink = Vec::new();
    match stream.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ) => {}
        Err(error) => panic!("connection was not closed by the server: {error}"),
    }
}

fn assert_serves_metrics(addr: SocketAddr) {
    let response = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
}

#[test]
fn get_metrics_returns_the_rendered_registry() {
    let registry = Registry::new();
    registry
        .counter(
            "switchyard_alltoall_bytes_total",
            "Bytes sent in all-to-all.",
            &[("rank", "0")],
        )
        .unwrap()
        .inc_by(1234);
    let (_runtime, addr) = start(registry.clone());

    let response = exchange(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
    );
    let (status, headers, body) = split_response(&response);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        header(&headers, "content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4"),
        "{headers:?}"
    );
    assert_eq!(header(&headers, "connection"), Some("close"));
    assert_eq!(
        header(&headers, "content-length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(body, registry.render());
    assert!(
        body.contains("switchyard_alltoall_bytes_total{rank=\"0\"} 1234\n"),
        "{body}"
    );

    // Updates after the server started are visible in the next scrape.
    registry
        .counter("switchyard_alltoall_bytes_total", "", &[("rank", "0")])
        .unwrap()
        .inc();
    let response = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
    assert!(
        response.contains("switchyard_alltoall_bytes_total{rank=\"0\"} 1235\n"),
        "{response}"
    );
}

#[test]
fn unknown_path_is_404_and_other_methods_are_405() {
    let (_runtime, addr) = start(Registry::new());
    let response = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n");
    assert!(
        response.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{response}"
    );
    let response = exchange(addr, b"GET / HTTP/1.1\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 404 "), "{response}");

    let response = exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    let (status, headers, _body) = split_response(&response);
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(header(&headers, "allow"), Some("GET"));
    assert!(exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
}

#[test]
fn garbage_and_oversized_heads_are_closed_and_the_server_keeps_serving() {
    let (_runtime, addr) = start(Registry::new());

    for garbage in [
        &b"\x00\x01\x02\xff\xfe garbage\r\n\r\n"[..],
        b"\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics HTTP/9.9 more words\r\n\r\n",
    ] {
        let response = exchange(addr, garbage);
        assert!(
            response.is_empty() || response.starts_with("HTTP/1.1 400 "),
            "{garbage:?} -> {response}"
        );
    }

    // Half a request, then the client hangs up.
    drop({
        let mut stream = connect(addr);
        stream.write_all(b"GET /met").unwrap();
        stream
    });

    // More than 8 KiB without the end of the head: no response, connection closed.
    let mut stream = connect(addr);
    let oversized = format!(
        "GET /metrics HTTP/1.1\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    // The server may close before reading everything, so the write itself may fail.
    let _ = stream.write_all(oversized.as_bytes());
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => assert!(
            response.is_empty(),
            "{}",
            String::from_utf8_lossy(&response)
        ),
        Err(error) => assert!(
            matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ),
            "{error}"
        ),
    }

    assert_serves_metrics(addr);
}

#[test]
fn a_slow_request_head_is_cut_off_after_five_seconds() {
    let (_runtime, addr) = start(Registry::new());
    let mut slow = connect(addr);
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    let started = Instant::now();

    // A stalled client must not block others meanwhile.
    assert_serves_metrics(addr);

    assert_closed_by_server(&mut slow);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(9),
        "closed after {waited:?}"
    );
    assert_serves_metrics(addr);
}

#[test]
fn binding_an_address_in_use_is_a_typed_error() {
    let (runtime, addr) = start(Registry::new());
    let error = runtime
        .block_on(serve_metrics(&addr.to_string(), Registry::new()))
        .unwrap_err();
    assert!(matches!(error, TelemetryError::Bind { .. }), "{error:?}");
    let error = runtime
        .block_on(serve_metrics("not an address", Registry::new()))
        .unwrap_err();
    assert!(matches!(error, TelemetryError::Bind { .. }), "{error:?}");
}
