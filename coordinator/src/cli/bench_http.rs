//! `switchyard bench http`: what the OpenAI-compatible HTTP layer costs. One local cluster, N
//! concurrent streaming clients over HTTP (SSE, `/v1/completions`) and the same load over gRPC
//! (`Inference.Generate`), rounds alternating between the two; time to first token and
//! inter-token latency p50/p99 of each. Both ask for log-probabilities (top 0): then every token
//! is one SSE event (without them a token that ends inside a character sends no event), and
//! both paths do the same work.
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use http_body_util::BodyExt;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::inference_client::InferenceClient;

use super::cluster::{connect_channel, runtime};
use super::local_cluster::start_local_cluster;

#[derive(clap::Args, Clone, Debug)]
pub struct HttpBenchArgs {
    /// Model directory (default: tests/fixtures/mixtral).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Rounds per API (alternating: grpc, http, grpc, ...).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Latencies of one API, milliseconds.
#[derive(Default)]
struct Samples {
    ttft: Vec<f64>,
    itl: Vec<f64>,
    tokens: usize,
    secs: f64,
}

impl Samples {
    /// One request's token arrival times (from when it was sent).
    fn add(&mut self, arrivals: &[f64]) {
        if let Some(first) = arrivals.first() {
            self.ttft.push(*first);
        }
        self.itl.extend(arrivals.windows(2).map(|w| w[1] - w[0]));
        self.tokens += arrivals.len();
    }
}

fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

fn prompt(i: usize) -> Vec<u32> {
    vec![1 + i as u32 % 50, 2, 3, 4, 5, 6, 7, 8]
}

/// One gRPC stream: the arrival time (ms) of each token.
async fn grpc_one(addr: String, i: usize, max_tokens: u32) -> anyhow::Result<Vec<f64>> {
    let mut c = InferenceClient::new(connect_channel(&addr).await?);
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt(i) })),
        max_tokens,
        ignore_eos: true,
        logprobs: true,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut s = c.generate(req).await?.into_inner();
    let mut at = Vec::with_capacity(max_tokens as usize);
    while let Some(m) = s.message().await? {
        at.push(t0.elapsed().as_secs_f64() * 1e3);
        if m.finish_reason != 0 {
            break;
        }
    }
    Ok(at)
}

/// One SSE stream over HTTP/1.1 (hyper's client): the arrival time (ms) of each token event.
async fn http_one(addr: String, model: String, i: usize, max_tokens: u32) -> anyhow::Result<Vec<f64>> {
    let tcp = tokio::net::TcpStream::connect(&addr).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let body = serde_json::json!({"model": model, "prompt": prompt(i), "max_tokens": max_tokens, "ignore_eos": true,
        "temperature": 0, "logprobs": 0, "stream": true});
    let req = hyper::Request::post("/v1/completions")
        .header(hyper::header::HOST, &addr)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body.to_string())))?;
    let t0 = Instant::now();
    let resp = sender.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let mut body = resp.into_body();
    let mut at = Vec::with_capacity(max_tokens as usize);
    // Events are `data: ...\n\n`; one may arrive split over frames, so count complete ones.
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            if event.starts_with(b"data: {") {
                at.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    Ok(at)
}

pub fn run(a: HttpBenchArgs) -> anyhow::Result<ExitCode> {
    let model = a.model.clone().unwrap_or_else(|| std::path::PathBuf::from("tests/fixtures/mixtral"));
    if a.json {
        super::local_cluster::relay_child_output_to_stderr();
    }
    let name = "bench";
    let args = ["--http-listen=127.0.0.1:0".to_string(), format!("--served-model-name={name}"), format!("--max-queued-requests={}", a.clients.max(1) * 2)];
    let cl = start_local_cluster(&model, a.workers, None, "127.0.0.1:0", None, &args, &[], None)?;
    let http = cl.http_addr.clone().context("the coordinator reported no HTTP address")?;
    let rt = runtime()?;
    let (mut grpc, mut web) = (Samples::default(), Samples::default());
    rt.block_on(async {
        // One unmeasured round each: connections, caches, the first steps.
        for round in 0..=a.rounds {
            for api in ["grpc", "http"] {
                let t0 = Instant::now();
                let hs: Vec<_> = (0..a.clients)
                    .map(|i| {
                        let (g, h, n) = (cl.addr.clone(), http.clone(), a.max_tokens);
                        tokio::spawn(async move { if api == "grpc" { grpc_one(g, i, n).await } else { http_one(h, name.to_string(), i, n).await } })
                    })
                    .collect();
                let mut runs = Vec::new();
                for h in hs {
                    runs.push(h.await??);
                }
                if round == 0 {
                    continue;
                }
                let s = if api == "grpc" { &mut grpc } else { &mut web };
                s.secs += t0.elapsed().as_secs_f64();
                runs.iter().for_each(|r| s.add(r));
            }
        }
        anyhow::Ok(())
    })?;
    report(&a, &grpc, &web)
}

fn report(a: &HttpBenchArgs, grpc: &Samples, web: &Samples) -> anyhow::Result<ExitCode> {
    let row = |s: &Samples| {
        serde_json::json!({"tokens": s.tokens, "tokens_per_s": s.tokens as f64 / s.secs.max(1e-9),
            "ttft_ms": {"p50": percentile(&s.ttft, 0.5), "p99": percentile(&s.ttft, 0.99)},
            "itl_ms": {"mean": mean(&s.itl), "p50": percentile(&s.itl, 0.5), "p99": percentile(&s.itl, 0.99)}})
    };
    // Tokens of one step often arrive together (p50 near 0): the mean and p99 carry the cost.
    let pct = |h: f64, g: f64| (h / g.max(1e-9) - 1.0) * 100.0;
    let over_mean = pct(mean(&web.itl), mean(&grpc.itl));
    let over_p99 = pct(percentile(&web.itl, 0.99), percentile(&grpc.itl, 0.99));
    if a.json {
        let v = serde_json::json!({"clients": a.clients, "max_tokens": a.max_tokens, "rounds": a.rounds, "workers": a.workers,
            "grpc": row(grpc), "http": row(web),
            "http_itl_overhead_pct": {"mean": over_mean, "p99": over_p99}});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} clients x {} tokens, {} rounds each, {} workers", a.clients, a.max_tokens, a.rounds, a.workers);
    println!(
        "{:<5} {:>8} {:>9} {:>13} {:>13} {:>13} {:>12} {:>12}",
        "api", "tokens", "tok/s", "ttft p50 ms", "ttft p99 ms", "itl mean ms", "itl p50 ms", "itl p99 ms"
    );
    for (name, s) in [("grpc", grpc), ("http", web)] {
        println!(
            "{:<5} {:>8} {:>9.1} {:>13.2} {:>13.2} {:>13.3} {:>12.3} {:>12.3}",
            name,
            s.tokens,
            s.tokens as f64 / s.secs.max(1e-9),
            percentile(&s.ttft, 0.5),
            percentile(&s.ttft, 0.99),
            mean(&s.itl),
            percentile(&s.itl, 0.5),
            percentile(&s.itl, 0.99)
        );
    }
    println!("HTTP inter-token latency against gRPC: mean {over_mean:+.1}%, p99 {over_p99:+.1}%");
    Ok(ExitCode::SUCCESS)
}
