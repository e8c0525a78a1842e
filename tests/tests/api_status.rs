//! Statuses of the client APIs at their edges, against real processes: a gRPC deadline
//! (`grpc-timeout`) is enforced by the coordinator itself, which ends the stream with
//! DEADLINE_EXCEEDED and frees the sequence; a coordinator that does not serve yet answers HTTP
//! requests 503 with an OpenAI error body.
mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;

#[test]
fn a_grpc_deadline_is_enforced_by_the_coordinator_and_frees_the_sequence() {
    // 10 ms steps: 400 tokens take seconds, the deadline is half a second.
    let cl = Cluster::up_with_env(&fixture("qwen3_moe"), 2, &[], &[("SWITCHYARD_FAILPOINTS", "worker.step=sleep(10)"), ("SWITCHYARD_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (code, took) = rt.block_on(async {
        // No client-side timeout: only the grpc-timeout header, so the server must act.
        let ch = tonic::transport::Endpoint::from_shared(cl.endpoint()).unwrap().connect().await.unwrap();
        let mut c = pb::inference_client::InferenceClient::new(ch);
        let req = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2, 3] })),
            max_tokens: 400,
            ignore_eos: true,
            ..Default::default()
        };
        let mut req = tonic::Request::new(req);
        req.set_timeout(Duration::from_millis(500));
        let t0 = Instant::now();
        let mut s = c.generate(req).await.expect("started").into_inner();
        let mut tokens = 0;
        let code = loop {
            match s.message().await {
                Ok(Some(_)) => tokens += 1,
                Ok(None) => panic!("the stream ended without a status after {tokens} tokens"),
                Err(st) => break st.code(),
            }
        };
        (code, t0.elapsed())
    });
    assert_eq!(code, tonic::Code::DeadlineExceeded);
    assert!(took < Duration::from_secs(2), "the deadline ended the stream after {took:?}");
    let st = wait_status(&cl.addr, Duration::from_secs(3), "0 active requests", |s| s.workers.iter().all(|w| w.active_requests == 0));
    assert!(st.workers.iter().all(|w| w.active_requests == 0));
}

#[test]
fn a_coordinator_without_workers_answers_http_503_with_an_openai_body() {
    let mut child = Command::new(switchyard_tests::switchyard_bin())
        .args(["coordinator", "--workers", "1", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--model"])
        .arg(fixture("qwen3_moe"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("coordinator");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let http = loop {
        let line = lines.next().expect("coordinator output").unwrap();
        if let Some(a) = line.strip_prefix("http listening on ") {
            break a.trim().to_string();
        }
    };
    let curl = |path: &str, body: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-sS", "-w", "\n%{http_code}"]);
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "-d", b]);
        }
        let o = c.arg(format!("http://{http}{path}")).output().expect("curl");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let (json, code) = out.rsplit_once('\n').map(|(j, c)| (j.to_string(), c.to_string())).unwrap();
        (code, serde_json::from_str::<serde_json::Value>(&json).unwrap_or_else(|e| panic!("{e}: {out}")))
    };
    let (code, v) = curl("/health", None);
    assert_eq!(code, "503", "{v}");
    assert_eq!(v["error"]["code"], "service_unavailable", "{v}");
    let (code, v) = curl("/v1/completions", Some(r#"{"model": "qwen3_moe", "prompt": "hi", "max_tokens": 2}"#));
    assert_eq!(code, "503", "{v}");
    // Not the leader yet or waiting for its worker, depending on how soon curl ran: 503 both.
    assert_eq!(v["error"]["code"], "service_unavailable", "{v}");
    // Models are listed all the same (what clients check first).
    let (code, v) = curl("/v1/models", None);
    assert_eq!(code, "200");
    assert_eq!(v["data"][0]["id"], "qwen3_moe");
    let _ = child.kill();
    let _ = child.wait();
}
