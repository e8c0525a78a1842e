//! `switchyard bench transport`, `bench decode` and `bench kernels`: all-to-all throughput beside a
//! plain TCP stream, end-to-end decode tokens/s of 1/2/4-worker clusters, and the expert-FFN
//! products (OpenBLAS beside load-time packed weights).
use anyhow::Context;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;
use worker::transport::Transport;
use worker::transport::tcp::TcpTransport;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// TCP all-to-all-v throughput and latency (1 KiB … 16 MiB per peer, 2 and 4 ranks) beside a
    /// plain TCP stream on loopback.
    Transport {
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        ranks: Vec<usize>,
        /// Largest message per peer, MiB.
        #[arg(long, default_value_t = 16)]
        max_mib: usize,
    },
    /// End-to-end decode tokens/s through 1/2/4-worker clusters, with dispatch / expert / combine
    /// time per step.
    Decode {
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        workers: Vec<usize>,
        /// Concurrent requests.
        #[arg(long, default_value_t = 8)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        /// Every worker's device (`cpu`, `cuda:N`).
        #[arg(long, default_value = "cpu", value_parser = worker::Device::parse)]
        device: worker::Device,
    },
    /// Straggler benchmark: skewed routing with a mid-run shift; static contiguous, static EPLB,
    /// the online rebalancer, and the rebalancer with load-aware replicas side by side.
    Straggler(super::bench_straggler::StragglerArgs),
    /// The home and the affinity data path side by side: bytes per token and layer, rows kept
    /// local, step times and tokens/s on 2 and 4 workers, contiguous and ILP-affinity placements.
    Datapath(super::bench_datapath::DatapathArgs),
    /// Elastic expert parallelism: a worker killed and one joining under load, without and with --min-replicas 2.
    Elastic(super::bench_elastic::ElasticArgs),
    /// The OpenAI-compatible HTTP layer's cost: TTFT and inter-token latency p50/p99 of N
    /// concurrent streaming clients over HTTP (SSE) beside the same load over gRPC.
    Http(super::bench_http::HttpBenchArgs),
    /// Expert-FFN products `x[m×k]·Wᵀ` as a MoE layer runs them (one call per expert, the
    /// experts in parallel over the compute pool): the row-major path the experts used before
    /// (`kernels::matmul_bt`: the AVX2 small-m kernel for 2–16 rows, else OpenBLAS sgemm, which
    /// packs W on every call) beside the load-time packed weights they use now, interleaved.
    Kernels {
        /// Rows (tokens routed to one expert).
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16,32,64,128,256,512")]
        rows: Vec<usize>,
        /// Weight shapes as OUTxIN (default: the benchmark model's gate_up and down).
        #[arg(long, value_delimiter = ',', default_value = "1024x1024,1024x512")]
        shapes: Vec<String>,
    },
}

/// `bench kernels`: GFLOP/s of both products per (shape, rows), best of a few interleaved rounds.
pub fn kernels(rows: &[usize], shapes: &[String]) -> anyhow::Result<ExitCode> {
    use rayon::prelude::*;
    worker::kernels::init();
    println!("{:>10} {:>6} {:>18} {:>16} {:>7} {:>13} {:>9}", "W (n×k)", "m", "row-major GFLOP/s", "packed GFLOP/s", "ratio", "packed bf16", "bf16/f32");
    for sh in shapes {
        let (n, k) = sh
            .split_once('x')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .filter(|(n, k)| *n > 0 && *k > 0)
            .with_context(|| format!("shape {sh:?}: expected OUTxIN, e.g. 1024x512"))?;
        // As in a MoE layer, every call reads another expert's weight, and together they do not
        // fit in cache (256 MiB of weights): a single reused weight would sit in cache and hide
        // what packing on every call costs.
        let copies = ((256usize << 20) / (n * k * 4)).clamp(2, 256);
        let w: Vec<Vec<f32>> = (0..copies)
            .map(|c| (0..n * k).map(|i| ((i * 7919 + c * 31) % 2003) as f32 / 1001.0 - 1.0).collect())
            .collect();
        let packed: Vec<_> = w.iter().map(|w| worker::kernels::PackedWeight::from_rows(w, n, k)).collect();
        // The same weights rounded to bf16 values (as a bf16 checkpoint's are): packed as bf16.
        let packed_bf16: Vec<_> = w
            .iter()
            .map(|w| {
                let r: Vec<f32> = w.iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000)).collect();
                worker::kernels::PackedWeight::from_rows(&r, n, k)
            })
            .collect();
        // On huge pages, as a loaded model's weights are (worker::kernels::collapse_resident_memory).
        worker::kernels::collapse_resident_memory();
        for &m in rows {
            anyhow::ensure!(m > 0, "--rows must be positive");
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 104_729) % 1999) as f32 / 999.0 - 1.0).collect();
            // Enough calls for ~50 ms of work each round at ~50 GFLOP/s.
            let flops = 2.0 * (m * n * k) as f64;
            let calls = ((2.5e9 / flops) as usize).clamp(3, 20_000);
            let (mut blas, mut pack, mut pack_bf16) = (0.0f64, 0.0f64, 0.0f64);
            for _ in 0..REPEATS {
                let t = Instant::now();
                (0..calls).into_par_iter().for_each_init(
                    || vec![0.0f32; m * n],
                    |out, c| worker::kernels::matmul_bt(&x, m, k, &w[c % copies], n, out),
                );
                blas = blas.max(flops * calls as f64 / t.elapsed().as_secs_f64() / 1e9);
                let t = Instant::now();
                (0..calls).into_par_iter().for_each_init(|| vec![0.0f32; m * n], |out, c| packed[c % copies].matmul(&x, m, out, true));
                pack = pack.max(flops * calls as f64 / t.elapsed().as_secs_f64() / 1e9);
                let t = Instant::now();
                (0..calls).into_par_iter().for_each_init(|| vec![0.0f32; m * n], |out, c| packed_bf16[c % copies].matmul(&x, m, out, true));
                pack_bf16 = pack_bf16.max(flops * calls as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
            println!(
                "{:>10} {:>6} {:>18.1} {:>16.1} {:>6.2}x {:>13.1} {:>8.2}x",
                format!("{n}x{k}"),
                m,
                blas,
                pack,
                pack / blas,
                pack_bf16,
                pack_bf16 / pack
            );
        }
    }
    println!(
        "{} threads, calls in parallel as the experts of a layer; best of {REPEATS} interleaved rounds; m = tokens routed to one expert;",
        rayon::current_num_threads()
    );
    println!("row-major = kernels::matmul_bt; every call takes the next of 256 MiB of distinct weights (from memory, as in a MoE layer), on huge pages as a loaded model's are");
    println!("packed bf16 = the same weights rounded to bf16, stored as bf16 (half the bytes streamed)");
    Ok(ExitCode::SUCCESS)
}

fn sizes(max_mib: usize) -> Vec<usize> {
    let mut v = vec![];
    let mut s = 1024;
    while s <= max_mib << 20 {
        v.push(s);
        s *= 4;
    }
    v
}

fn iters(size: usize) -> usize {
    ((64usize << 20) / size.max(1)).clamp(5, 2000)
}

/// Best of this many runs of every measurement (the machine is shared: take the least disturbed).
const REPEATS: usize = 3;

fn best(f: impl Fn() -> anyhow::Result<(f64, f64)>) -> anyhow::Result<(f64, f64)> {
    let mut b = f()?;
    for _ in 1..REPEATS {
        let r = f()?;
        if r.0 > b.0 {
            b = r;
        }
    }
    Ok(b)
}

/// Plain TCP: one stream, `size` bytes one way then a 1-byte ack; GB/s and µs per message.
fn plain_tcp(size: usize) -> anyhow::Result<(f64, f64)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let n = iters(size);
    let h = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        for _ in 0..n {
            s.read_exact(&mut buf)?;
            s.write_all(&[1])?;
        }
        Ok(())
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![7u8; size];
    let mut ack = [0u8; 1];
    let t0 = Instant::now();
    for _ in 0..n {
        s.write_all(&buf)?;
        s.read_exact(&mut ack)?;
    }
    let dt = t0.elapsed().as_secs_f64();
    h.join().map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(((size * n) as f64 / dt / 1e9, dt / n as f64 * 1e6))
}

/// Plain TCP both ways: the bytes a 2-rank all-to-all moves. Two endpoints of one connection each
/// send `size` bytes (a writer thread) while reading the other's `size` bytes, `n` rounds, in
/// lock-step like collectives; GB/s one endpoint sends and µs per round.
fn plain_tcp_both(size: usize) -> anyhow::Result<(f64, f64)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let n = iters(size);
    let end = move |s: std::net::TcpStream| -> std::io::Result<f64> {
        s.set_nodelay(true)?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (dtx, drx) = std::sync::mpsc::channel::<()>();
        let mut w = s.try_clone()?;
        let wt = std::thread::spawn(move || -> std::io::Result<()> {
            let buf = vec![7u8; size];
            while rx.recv().is_ok() {
                w.write_all(&buf)?;
                let _ = dtx.send(());
            }
            Ok(())
        });
        let mut r = s;
        let mut buf = vec![0u8; size];
        let t0 = Instant::now();
        for _ in 0..n {
            let _ = tx.send(());
            r.read_exact(&mut buf)?;
            let _ = drx.recv();
        }
        let dt = t0.elapsed().as_secs_f64();
        drop(tx);
        wt.join().map_err(|_| std::io::Error::other("writer panicked"))??;
        Ok(dt)
    };
    let h = std::thread::spawn(move || -> std::io::Result<f64> { end(l.accept()?.0) });
    let dt0 = end(std::net::TcpStream::connect(addr)?)?;
    let dt = dt0.max(h.join().map_err(|_| anyhow::anyhow!("peer panicked"))??);
    Ok(((size * n) as f64 / dt / 1e9, dt / n as f64 * 1e6))
}

/// All-to-all-v with `size` bytes to every peer; per-rank GB/s sent and µs per collective.
/// Like the plain stream, buffers are reused: what a collective returns is sent by the next.
fn a2a(world: usize, size: usize) -> anyhow::Result<(f64, f64)> {
    let mesh = TcpTransport::local_mesh(world, Duration::from_secs(60))?;
    let n = iters(size * (world - 1)).max(5);
    let hs: Vec<_> = mesh
        .into_iter()
        .map(|mut t| {
            std::thread::spawn(move || -> anyhow::Result<f64> {
                let w = t.world();
                let mut bufs = t.all_to_all_v(vec![vec![1u8; size]; w])?; // warm-up
                let t0 = Instant::now();
                for _ in 0..n {
                    bufs = t.all_to_all_v(bufs)?;
                }
                Ok(t0.elapsed().as_secs_f64())
            })
        })
        .collect();
    let mut dt: f64 = 0.0;
    for h in hs {
        dt = dt.max(h.join().map_err(|_| anyhow::anyhow!("rank panicked"))??);
    }
    Ok(((size * (world - 1) * n) as f64 / dt / 1e9, dt / n as f64 * 1e6))
}

fn fmt_size(s: usize) -> String {
    if s >= 1 << 20 { format!("{} MiB", s >> 20) } else { format!("{} KiB", s >> 10) }
}

pub fn run(c: BenchCommand) -> anyhow::Result<ExitCode> {
    match c {
        BenchCommand::Transport { ranks, max_mib } => {
            println!(
                "{:>8} {:>9} {:>9} {:>10} {:>9} | {}",
                "size",
                "tcp GB/s",
                "tcp µs",
                "tcp2 GB/s",
                "tcp2 µs",
                ranks
                    .iter()
                    .map(|r| {
                        format!(
                            "{:>10} {:>10} {:>7} {:>7} {:>10} {:>9}",
                            format!("a2a{r} GB/s"),
                            format!("a2a{r} µs"),
                            "vs tcp",
                            "vs tcp2",
                            format!("a2a{r} agg"),
                            "agg/plain"
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            for s in sizes(max_mib) {
                let (g, us) = best(|| plain_tcp(s))?;
                let (g2, us2) = best(|| plain_tcp_both(s))?;
                let mut row = format!("{:>8} {:>9.3} {:>9.1} {:>10.3} {:>9.1} |", fmt_size(s), g, us, g2, us2);
                for &r in &ranks {
                    let (ag, aus) = best(|| a2a(r, s))?;
                    // Machine-wide bytes per second, against the most the plain streams moved.
                    let (agg, plain) = (ag * r as f64, g.max(2.0 * g2));
                    row.push_str(&format!(
                        " {:>10.3} {:>10.1} {:>6.0}% {:>6.0}% {:>10.3} {:>8.0}%",
                        ag,
                        aus,
                        ag / g * 100.0,
                        ag / g2 * 100.0,
                        agg,
                        agg / plain * 100.0
                    ));
                }
                println!("{row}");
            }
            println!("a2a GB/s = bytes one rank sends to its peers per second (per-peer message = size); tcp = one stream, same size, one way, acked; tcp2 = one connection, size bytes each way per round (what a 2-rank a2a moves), GB/s per direction; agg = bytes all ranks send per second, agg/plain = that against the larger of tcp and 2 x tcp2 (what the loopback moved for plain streams); best of {REPEATS} runs each");
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Straggler(a) => super::bench_straggler::run(a),
        BenchCommand::Elastic(a) => super::bench_elastic::run(a),
        BenchCommand::Datapath(a) => super::bench_datapath::run(a),
        BenchCommand::Http(a) => super::bench_http::run(a),
        BenchCommand::Kernels { rows, shapes } => kernels(&rows, &shapes),
        BenchCommand::Decode { model, workers, requests, max_tokens, device } => {
            let model = model.unwrap_or_else(|| PathBuf::from("tests/fixtures/mixtral"));
            println!("{:>7} {:>10} {:>12} {:>14} {:>12} {:>12} {:>12}", "workers", "tokens", "tokens/s", "busy steps", "dispatch µs", "expert µs", "combine µs");
            for &n in &workers {
                let cl = super::local_cluster::start_local_cluster(&model, n, None, "127.0.0.1:0", None, &[], &super::local_cluster::device_args(device, n), None)?;
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                let (tokens, dt) = rt.block_on(async {
                    let t0 = Instant::now();
                    let mut hs = Vec::new();
                    for i in 0..requests {
                        let req = pb::GenerateRequest {
                            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: vec![1 + i as u32, 2, 3, 4] })),
                            max_tokens,
                            ignore_eos: true,
                            ..Default::default()
                        };
                        let addr = cl.addr.clone();
                        hs.push(tokio::spawn(async move { super::cluster::generate_remote(&addr, req, false).await }));
                    }
                    let mut tokens = 0usize;
                    for h in hs {
                        if let Ok(Ok(r)) = h.await {
                            tokens += r.ids.len();
                        }
                    }
                    (tokens, t0.elapsed().as_secs_f64())
                });
                let w = rt.block_on(super::cluster::worker_totals(&cl.worker_addrs));
                let (busy, d, e, c) = (w.busy_steps, w.dispatch_us, w.expert_us, w.combine_us);
                let per = |x: u64| if busy == 0 { 0.0 } else { x as f64 / busy as f64 };
                println!(
                    "{:>7} {:>10} {:>12.1} {:>14} {:>12.1} {:>12.1} {:>12.1}",
                    n, tokens, tokens as f64 / dt, busy, per(d), per(e), per(c)
                );
            }
            println!("per-step times: summed over MoE layers, averaged over ranks' busy steps");
            Ok(ExitCode::SUCCESS)
        }
    }
}
