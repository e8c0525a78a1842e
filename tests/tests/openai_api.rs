//! The client APIs as outside programs use them, against a real `switchyard up`: the `openai`
//! Python package and curl over the OpenAI-compatible HTTP API, and Python's grpcio with a client
//! built from v1alpha reflection alone (tests/python/, run with the pinned tools that
//! scripts/install-deps.sh puts in target/py). The model is the qwen3_moe fixture (byte-level
//! tokenizer) with a ChatML chat template added, as a chat checkpoint ships one.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "openai-test-token";
const MODEL: &str = "tiny-chat";

/// ChatML, as Qwen's checkpoints write it.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The fixture copied into `dir` with a tokenizer_config.json holding a chat template.
fn chat_model(dir: &Path) -> PathBuf {
    let m = dir.join("tiny-chat");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(fixture("qwen3_moe")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    let cfg = serde_json::json!({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": null});
    std::fs::write(m.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    m
}

fn python() -> PathBuf {
    let p = switchyard_tests::repo_root().join("target/py/bin/python");
    assert!(p.exists(), "{} missing: run scripts/install-deps.sh (the venv with openai and grpcio)", p.display());
    p
}

/// Runs tests/python/SCRIPT with `args`; its output, failing the test unless every check passed.
fn run_script(script: &str, args: &[&str]) -> String {
    let dir = switchyard_tests::repo_root().join("tests/python");
    let child = Command::new(python())
        .arg(dir.join(script))
        .args(args)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("PYTHONUNBUFFERED", "1")
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let o = wait_bounded(child, script, Duration::from_secs(300));
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success() && out.contains("checks passed"), "{script} {args:?}:\n{out}");
    out
}

fn up(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Cluster {
    let mut args: Vec<std::ffi::OsString> = vec!["--served-model-name".into(), MODEL.into()];
    args.extend(extra.iter().map(Into::into));
    let mut env = env.to_vec();
    env.push(("SWITCHYARD_ADMIN_TOKEN", TOKEN));
    let cl = Cluster::up_with_env(model, 2, &args, &env);
    assert!(!cl.http_addr.is_empty(), "switchyard up printed no `http listening on`");
    cl
}

#[test]
fn openai_api_and_grpc_reflection_clients_against_a_running_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cl = up(&chat_model(dir.path()), &[], &[]);
    let bin = switchyard_tests::switchyard_bin();
    let bin = bin.to_str().unwrap();
    let out = run_script("openai_api.py", &["--http", &cl.http_addr, "--grpc", &cl.addr, "--switchyard", bin, "--model", MODEL, "--part", "basic"]);
    eprintln!("{out}");
    let out = run_script("grpc_client.py", &["--grpc", &cl.addr, "--switchyard", bin, "--part", "basic"]);
    eprintln!("{out}");
}

#[test]
fn openai_api_disconnects_cancels_deadlines_and_the_queue_bound_free_sequences() {
    let dir = tempfile::tempdir().unwrap();
    // Slowed steps (a 400-token stream takes seconds), small prefill chunks, two places in the queue.
    let cl = up(
        &chat_model(dir.path()),
        &["--max-queued-requests", "2", "--max-batch-tokens", "4"],
        &[("SWITCHYARD_FAILPOINTS", "worker.step=sleep(10)")],
    );
    let bin = switchyard_tests::switchyard_bin();
    let bin = bin.to_str().unwrap();
    let out = run_script("openai_api.py", &["--http", &cl.http_addr, "--grpc", &cl.addr, "--switchyard", bin, "--model", MODEL, "--part", "limits"]);
    eprintln!("{out}");
    let out = run_script("grpc_client.py", &["--grpc", &cl.addr, "--switchyard", bin, "--part", "limits"]);
    eprintln!("{out}");
}

#[test]
fn a_model_without_a_chat_template_answers_chat_with_a_clear_400() {
    let cl = up(&fixture("qwen3_moe"), &[], &[]);
    let body = r#"{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}"#;
    let o = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "-H", "Content-Type: application/json", "-d", body])
        .arg(format!("http://{}/v1/chat/completions", cl.http_addr))
        .output()
        .expect("curl");
    let out = String::from_utf8_lossy(&o.stdout);
    let (json, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "400", "{out}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("no chat template"), "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // Completions still work.
    let body = r#"{"model": "tiny-chat", "prompt": "hi", "max_tokens": 3}"#;
    let o = Command::new("curl")
        .args(["-sS", "-H", "Content-Type: application/json", "-d", body])
        .arg(format!("http://{}/v1/completions", cl.http_addr))
        .output()
        .expect("curl");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
}

#[test]
fn bench_http_reports_ttft_and_itl_of_both_apis() {
    let child = Command::new(switchyard_tests::switchyard_bin())
        .args(["bench", "http", "--clients", "2", "--max-tokens", "8", "--rounds", "1", "--json", "--model"])
        .arg(fixture("mixtral"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bench http");
    let o = wait_bounded(child, "bench http", Duration::from_secs(300));
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    for api in ["grpc", "http"] {
        assert_eq!(v[api]["tokens"], 16, "{v}");
        assert!(v[api]["ttft_ms"]["p50"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v[api]["itl_ms"]["p99"].as_f64().is_some(), "{v}");
    }
    assert!(v["http_itl_overhead_pct"]["mean"].is_number(), "{v}");
}
