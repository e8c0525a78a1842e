//! Just enough HTTP/1.1 for a Prometheus scrape. Every response closes the connection,
//! so there is no keep-alive, pipelining or body handling to get wrong.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::{Registry, TelemetryError};

/// A request head beyond this is not a scraper; drop it instead of buffering more.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Slow-loris guard: the whole request head must arrive within this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that stops reading the response must not pin a task forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapers open one connection at a time; this bounds memory if something floods us.
const MAX_CONNECTIONS: usize = 64;

/// Listens on `addr` (port 0 picks a free port) and serves `GET /metrics` from
/// `registry`. Returns the bound address and the accept loop's task; aborting the task
/// stops accepting new connections.
pub async fn serve_metrics(
    addr: &str,
    registry: Registry,
) -> Result<(SocketAddr, JoinHandle<()>), TelemetryError> {
    let bind_error = |source| TelemetryError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    let handle = tokio::spawn(accept_loop(listener, registry));
    Ok((local_addr, handle))
}

async fn accept_loop(listener: TcpListener, registry: Registry) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Typically EMFILE; back off instead of spinning on the error.
                tracing::warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "metrics endpoint: too many connections, dropping one");
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            handle_connection(stream, &registry).await;
            drop(permit);
        });
    }
}

async fn handle_connection(mut stream: TcpStream, registry: &Registry) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        // Too large, too slow, or the peer went away: close without a word.
        Ok(None) | Err(_) => return,
    };
    let response = respond(&head, registry);
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    // The peer may have vanished; there is no one left to tell.
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

/// Reads up to the blank line ending the request head. `None` when the head exceeds
/// [`MAX_HEAD_BYTES`] or the connection ends first.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        // Re-scan a few bytes before the new chunk in case the terminator straddles reads.
        let scan_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..read]);
        if let Some(end) = find_head_end(&head[scan_from..]) {
            let head_len = scan_from + end;
            if head_len > MAX_HEAD_BYTES {
                return None;
            }
            head.truncate(head_len);
            return Some(head);
        }
        if head.len() > MAX_HEAD_BYTES {
            return None;
        }
    }
}

/// Position just past the `\r\n\r\n` (or bare `\n\n`, which some tools send) ending a head.
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|at| at + 4);
    let lf = bytes
        .windows(2)
        .position(|window| window == b"\n\n")
        .map(|at| at + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (found, None) | (None, found) => found,
    }
}

fn respond(head: &[u8], registry: &Registry) -> Vec<u8> {
    let Some((method, target)) = parse_request_line(head) else {
        return simple_response("400 Bad Request", &[], "bad request\n");
    };
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    if path != "/metrics" {
        return simple_response("404 Not Found", &[], "not found; try /metrics\n");
    }
    if method != "GET" {
        return simple_response(
            "405 Method Not Allowed",
            &[("Allow", "GET")],
            "method not allowed\n",
        );
    }
    let body = registry.render();
    simple_response_with_type(
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        &[],
        &body,
    )
}

/// `METHOD SP request-target SP HTTP/1.x`; anything else is garbage.
fn parse_request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line_end = head.iter().position(|byte| *byte == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let well_formed = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(|byte| byte.is_ascii_uppercase())
        && target.starts_with('/')
        && version.starts_with("HTTP/1.");
    well_formed.then_some((method, target))
}

fn simple_response(status: &str, extra_headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    simple_response_with_type(status, "text/plain; charset=utf-8", extra_headers, body)
}

fn simple_response_with_type(
    status: &str,
    content_type: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        response.push_str(name);
        response.push_str(": ");
        response.push_str(value);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    response.push_str(body);
    response.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_parsing() {
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line(b"POST /x?y HTTP/1.0\n\n"),
            Some(("POST", "/x?y"))
        );
        for garbage in [
            &b"\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(parse_request_line(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn head_end_detection() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"),
            Some(24)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn content_type_is_prometheus_text() {
        let registry = Registry::new();
        registry.counter("x_total", "x", &[]).unwrap().inc();
        let response =
            String::from_utf8(respond(b"GET /metrics?a=b HTTP/1.1\r\n\r\n", &registry)).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response.contains("\r\nContent-Type: text/plain; version=0.0.4"),
            "{response}"
        );
        assert!(
            response.ends_with("\r\n\r\n# HELP x_total x\n# TYPE x_total counter\nx_total 1\n"),
            "{response}"
        );
    }
}
