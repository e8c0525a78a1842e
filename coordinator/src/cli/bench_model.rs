//! `switchyard model bench`: prefill and decode tokens/s of the model runtime at several batch
//! sizes, the machine's read bandwidth and the batch-1 decode limit it sets, peak resident memory
//! against the checkpoint's size; beside PyTorch (`--compare-torch`) and llama.cpp
//! (`--compare-llamacpp`, [`super::bench_llamacpp`]) on the same checkpoint in the same run.
use super::bench_llamacpp::{LlamaCpp, LlamaCppRun};
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use worker::model::{LoadOptions, LogitsMode, Model, SeqInput};
use worker::synth::{SynthSpec, write_checkpoint, write_tokenizer_if_room};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Benchmark this checkpoint instead of a generated one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the generated checkpoint is written (kept and reused).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Use a tiny generated shape (smoke test).
    #[arg(long, conflicts_with = "large")]
    pub tiny: bool,
    /// Use the larger generated shape (hidden 2048, 128 experts; for GPUs).
    #[arg(long)]
    pub large: bool,
    /// Where the model computes: `cpu`, or `cuda:N` (a build with `--features cuda`); with
    /// --compare-torch, PyTorch runs on the same device.
    #[arg(long, default_value = "cpu", value_parser = worker::Device::parse)]
    pub device: worker::Device,
    /// Architecture of the generated checkpoint: qwen3_moe or mixtral.
    #[arg(long, default_value = "qwen3_moe")]
    pub arch: String,
    /// Batch sizes (sequences per step).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batches: Vec<usize>,
    /// Prompt length of every sequence.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Decode steps measured per batch size.
    #[arg(long, default_value_t = 16)]
    pub decode_steps: usize,
    /// Rounds, each ours then the comparison's (interleaved, so that both meet the machine's
    /// load alike); the medians are printed.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also run transformers (PyTorch eager, CPU) on the same checkpoint and print ratios.
    #[arg(long)]
    pub compare_torch: bool,
    /// The PyTorch benchmark script.
    #[arg(long)]
    pub torch_script: Option<PathBuf>,
    /// Python interpreter for --compare-torch and the GGUF conversion of --compare-llamacpp.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Also run llama.cpp's llama-bench and llama-batched-bench from this directory on a GGUF
    /// conversion of the same checkpoint, and print ratios.
    #[arg(long, value_name = "BIN_DIR")]
    pub compare_llamacpp: Option<PathBuf>,
    /// The GGUF for --compare-llamacpp (default: converted into the checkpoint directory).
    #[arg(long, requires = "compare_llamacpp")]
    pub llamacpp_gguf: Option<PathBuf>,
    /// llama.cpp source tree whose convert_hf_to_gguf.py converts (default: BIN_DIR/../..).
    #[arg(long, requires = "compare_llamacpp")]
    pub llamacpp_src: Option<PathBuf>,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Tokens/s of one batch size.
#[derive(Debug, Clone, Copy)]
struct BenchRow {
    batch: usize,
    prefill_tps: f64,
    decode_tps: f64,
}

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let dir = checkpoint_dir(&a)?;
    let t0 = Instant::now();
    let model = Arc::new(Model::load(&dir, &LoadOptions::default()).with_context(|| format!("loading {}", dir.display()))?);
    let backend = worker::backend::open(a.device, model.clone())?;
    let load_s = t0.elapsed().as_secs_f64();
    let c = &model.config;
    let threads = rayon::current_num_threads();
    let header = format!(
        "model {} ({}): hidden {}, {} layers, {} experts top-{}, expert ffn {}, vocab {}; {:.2} GiB of weights held, loaded in {:.1} s; {}",
        dir.display(),
        c.arch.name(),
        c.hidden_size,
        c.n_layers,
        c.router.n_experts,
        c.router.top_k,
        c.moe_intermediate_size,
        c.vocab_size,
        model.weight_bytes() as f64 / (1u64 << 30) as f64,
        load_s,
        match a.device {
            worker::Device::Cpu => format!("{threads} threads"),
            d => format!("on {d}"),
        },
    );
    // With --json, stdout holds the one JSON object only.
    if a.json { eprintln!("{header}") } else { println!("{header}") }
    let plen = a.prompt_len.min(c.max_position_embeddings.saturating_sub(a.decode_steps + 1)).max(1);
    let llama = a.compare_llamacpp.as_ref().map(|bin| LlamaCpp {
        bin_dir: bin.clone(),
        gguf: a.llamacpp_gguf.clone(),
        src: a.llamacpp_src.clone(),
        python: a.python.clone(),
    });
    let gguf = llama.as_ref().map(|l| l.gguf_for(&dir)).transpose()?;
    let load_before = loadavg();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..a.rounds {
        ours.push(measure(backend.as_ref(), &a.batches, plen, a.decode_steps)?);
        if let (Some(l), Some(g)) = (&llama, &gguf) {
            eprintln!("round {}: llama.cpp ...", round + 1);
            let r = l.run(g, &a.batches, plen, a.decode_steps, threads)?;
            for b in &a.batches {
                if let Some(x) = r.row(*b) {
                    eprintln!("llama.cpp batch {b}: prefill {:.1} tok/s, decode {:.1} tok/s", x.prefill_tps, x.decode_tps);
                }
            }
            theirs.push(r);
        }
    }
    let rows = median_rows(&ours);
    let load_after_ours = loadavg();
    let hwm_kib = vm_hwm_kib();
    // After the peak was read: the probe's buffer would raise it.
    // A GPU's peak from its memory clock and bus width; the host's measured read bandwidth.
    let (bandwidth, bandwidth_source) = match backend.peak_memory_bandwidth_gbs() {
        Some(b) => (b, format!("{} peak (memory clock x bus width)", a.device)),
        None => (worker::kernels::read_bandwidth_gbs(1 << 30, 5), format!("measured, {threads} threads, best of 5 over 1 GiB")),
    };
    let step_bytes = model.decode_step_bytes() as f64;
    let checkpoint_bytes = checkpoint_bytes(&dir);
    let torch = if a.compare_torch { Some(run_torch(&a, &dir, plen)?) } else { None };
    let limit = bandwidth * 1e9 / step_bytes.max(1.0);
    let llama_row = |b: usize| -> Option<(f64, f64)> {
        let each: Vec<(f64, f64)> = theirs.iter().filter_map(|r| r.row(b)).map(|r| (r.prefill_tps, r.decode_tps)).collect();
        (!each.is_empty()).then(|| (median(each.iter().map(|x| x.0).collect()), median(each.iter().map(|x| x.1).collect())))
    };
    let llama_rss = theirs.iter().filter_map(|r| r.peak_rss_kib).max();
    if a.json {
        let torch_row = |b: usize| torch.as_ref().and_then(|t| t.rows.iter().find(|x| x.0 == b)).map(|x| (x.1, x.2));
        let rows_json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "batch": r.batch, "prefill_tok_s": r.prefill_tps, "decode_tok_s": r.decode_tps,
                    "torch_prefill_tok_s": torch_row(r.batch).map(|t| t.0), "torch_decode_tok_s": torch_row(r.batch).map(|t| t.1),
                    "llamacpp_prefill_tok_s": llama_row(r.batch).map(|t| t.0), "llamacpp_decode_tok_s": llama_row(r.batch).map(|t| t.1),
                })
            })
            .collect();
        let v = serde_json::json!({
            "model": dir.display().to_string(), "threads": threads, "prompt_len": plen, "rounds": a.rounds,
            "decode_steps": a.decode_steps, "weight_bytes": model.weight_bytes(), "checkpoint_bytes": checkpoint_bytes,
            "device": a.device.name(), "peak_rss_kib": hwm_kib, "read_bandwidth_gb_s": bandwidth, "bandwidth_source": bandwidth_source, "decode_step_bytes": step_bytes,
            "batch1_decode_limit_tok_s": limit, "rows": rows_json,
            "torch": torch.as_ref().map(|t| serde_json::json!({"peak_rss": t.hwm, "version": t.version})),
            "llamacpp": theirs.first().map(|t: &LlamaCppRun| serde_json::json!({"peak_rss_kib": llama_rss, "version": t.version, "gguf": gguf.as_ref().map(|g| g.display().to_string())})),
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!();
    println!(
        "prompt length {plen}, {} decode steps per batch size, {} round(s){}; load average before/after our run: {} / {}{}",
        a.decode_steps,
        a.rounds,
        if a.rounds > 1 { " (medians)" } else { "" },
        load_before,
        load_after_ours,
        if torch.is_some() { format!(", after torch: {}", loadavg()) } else { String::new() }
    );
    let gib = |kib: u64| format!("{:.2} GiB", kib as f64 / (1 << 20) as f64);
    let hwm = hwm_kib.map(gib).unwrap_or_else(|| "n/a".into());
    if torch.is_none() && llama.is_none() {
        println!("{:>6} {:>18} {:>18}", "batch", "prefill tok/s", "decode tok/s");
        for r in &rows {
            println!("{:>6} {:>18.1} {:>18.1}", r.batch, r.prefill_tps, r.decode_tps);
        }
    }
    if let Some(t) = &torch {
        print_beside("torch", &rows, |b| t.rows.iter().find(|x| x.0 == b).map(|x| (x.1, x.2)));
        println!("torch: {}, peak resident memory {}", t.version, t.hwm);
    }
    if llama.is_some() {
        print_beside("llama.cpp", &rows, llama_row);
        let v = theirs.first().map(|t| t.version.clone()).unwrap_or_default();
        println!("llama.cpp: build {v}, peak resident memory {}", llama_rss.map(gib).unwrap_or_else(|| "n/a".into()));
    }
    let ck = checkpoint_bytes as f64;
    println!(
        "peak resident memory (VmHWM): ours {hwm}{}",
        match hwm_kib {
            Some(k) if ck > 0.0 => format!(", {:.2}x the checkpoint's {:.2} GiB", k as f64 * 1024.0 / ck, ck / (1u64 << 30) as f64),
            _ => String::new(),
        }
    );
    println!(
        "memory read bandwidth {bandwidth:.1} GB/s ({bandwidth_source}); a batch-1 decode step reads {:.0} MB of weights: limit {limit:.1} tok/s",
        step_bytes / 1e6
    );
    if let Some(r) = rows.iter().find(|r| r.batch == 1) {
        println!("batch-1 decode reaches {:.0} % of that limit", 100.0 * r.decode_tps / limit);
    }
    Ok(ExitCode::SUCCESS)
}

/// The checkpoint to benchmark: `--model`, or a generated one (written once, then reused; a
/// tokenizer added to one written before generated checkpoints had it).
fn checkpoint_dir(a: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &a.model {
        return Ok(d.clone());
    }
    let mut spec = if a.tiny {
        SynthSpec::tiny()
    } else if a.large {
        SynthSpec::bench_large()
    } else {
        SynthSpec::bench()
    };
    spec.arch = a.arch.clone();
    if spec.arch != "qwen3_moe" && spec.arch != "mixtral" {
        bail!("--arch must be qwen3_moe or mixtral");
    }
    let dir = a.out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("switchyard-bench-{}-{}", spec.arch, if a.tiny { "tiny" } else if a.large { "h2048" } else { "h1024" }))
    });
    if !dir.join("config.json").exists() {
        eprintln!("writing checkpoint to {} ...", dir.display());
        let t0 = Instant::now();
        write_checkpoint(&dir, &spec).with_context(|| format!("writing {}", dir.display()))?;
        eprintln!("written in {:.1} s", t0.elapsed().as_secs_f64());
    }
    write_tokenizer_if_room(&dir, &spec).with_context(|| format!("writing the tokenizer into {}", dir.display()))?;
    Ok(dir)
}

/// One pass over `batches`: a prefill of `plen` random tokens per sequence, then `steps` greedy
/// decode steps.
fn measure(backend: &dyn worker::Backend, batches: &[usize], plen: usize, steps: usize) -> anyhow::Result<Vec<BenchRow>> {
    let model = backend.host_model();
    let local = worker::moe::LocalExperts;
    let forward = |seqs: &mut [SeqInput]| backend.forward_step(seqs, LogitsMode::Last, &local);
    let vocab = model.config.vocab_size as u64;
    // One untimed prefill and decode step first, as llama-bench warms up: the first forward after
    // a load pays one-time costs (first touch of activation and KV buffers, the compute pool's
    // threads starting), which otherwise land on whichever batch size is measured first
    // (batch-1 prefill measured 182-277 tok/s across rounds without it).
    {
        let warm: Vec<u32> = (0..plen.max(1) as u64).map(|i| (i * 7919 % vocab) as u32).collect();
        let mut cache = backend.new_cache();
        let out = forward(&mut [SeqInput { tokens: &warm, cache: &mut cache }])?;
        let next = [worker::sampling::argmax(&out.logits[0]) as u32];
        forward(&mut [SeqInput { tokens: &next, cache: &mut cache }])?;
        backend.release_sequence(cache.id());
    }
    let mut seed = 12345u64;
    let mut rows = Vec::new();
    for &b in batches {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..plen)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 33) % vocab) as u32
                    })
                    .collect()
            })
            .collect();
        let mut caches: Vec<_> = (0..b).map(|_| backend.new_cache()).collect();
        let t0 = Instant::now();
        let out = {
            let mut seqs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, cache)| SeqInput { tokens: p, cache }).collect();
            forward(&mut seqs)?
        };
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut next: Vec<Vec<u32>> = out.logits.iter().map(|l| vec![worker::sampling::argmax(l) as u32]).collect();
        let t0 = Instant::now();
        for _ in 0..steps {
            let out = {
                let mut seqs: Vec<SeqInput> = next.iter().zip(caches.iter_mut()).map(|(p, cache)| SeqInput { tokens: p, cache }).collect();
                forward(&mut seqs)?
            };
            next = out.logits.iter().map(|l| vec![worker::sampling::argmax(l) as u32]).collect();
        }
        let decode_s = t0.elapsed().as_secs_f64();
        for c in &caches {
            backend.release_sequence(c.id());
        }
        let row = BenchRow { batch: b, prefill_tps: (b * plen) as f64 / prefill_s, decode_tps: (b * steps) as f64 / decode_s.max(1e-9) };
        eprintln!("batch {b}: prefill {:.1} tok/s, decode {:.1} tok/s", row.prefill_tps, row.decode_tps);
        rows.push(row);
    }
    Ok(rows)
}

/// Per batch size, the medians over rounds.
fn median_rows(rounds: &[Vec<BenchRow>]) -> Vec<BenchRow> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .enumerate()
        .map(|(i, r)| BenchRow {
            batch: r.batch,
            prefill_tps: median(rounds.iter().map(|x| x[i].prefill_tps).collect()),
            decode_tps: median(rounds.iter().map(|x| x[i].decode_tps).collect()),
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Our rows beside `name`'s (prefill, decode) per batch size, with ratios.
fn print_beside(name: &str, rows: &[BenchRow], other: impl Fn(usize) -> Option<(f64, f64)>) {
    let (p, d) = (format!("prefill {name}"), format!("decode {name}"));
    println!("{:>6} {:>14} {:>17} {:>8} {:>14} {:>17} {:>8}", "batch", "prefill ours", p, "ratio", "decode ours", d, "ratio");
    for r in rows {
        let (tp, td) = other(r.batch).unwrap_or((f64::NAN, f64::NAN));
        println!(
            "{:>6} {:>14.1} {:>17.1} {:>7.2}x {:>14.1} {:>17.1} {:>7.2}x",
            r.batch,
            r.prefill_tps,
            tp,
            r.prefill_tps / tp,
            r.decode_tps,
            td,
            r.decode_tps / td
        );
    }
}

/// Bytes of the checkpoint's weight files (`*.safetensors`).
fn checkpoint_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Peak resident memory (VmHWM) of this process in KiB.
fn vm_hwm_kib() -> Option<u64> {
    super::bench_llamacpp::vm_hwm_kib_of(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// 1-minute load average (other processes skew timings on a shared machine).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().map(str::to_string)).unwrap_or_else(|| "n/a".into())
}

struct TorchResult {
    rows: Vec<(usize, f64, f64)>,
    hwm: String,
    version: String,
}

fn run_torch(a: &BenchArgs, dir: &Path, plen: usize) -> anyhow::Result<TorchResult> {
    let script = a.torch_script.clone().unwrap_or_else(|| {
        let local = PathBuf::from("deploy/bench_torch.py");
        if local.exists() { local } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bench_torch.py") }
    });
    let batches = a.batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
    eprintln!("running {} {} ...", a.python, script.display());
    // On a GPU PyTorch runs in bf16 (the bench checkpoints' dtype; f32 accumulation in both).
    let device_args: Vec<String> = match a.device {
        worker::Device::Cpu => vec![],
        d => vec!["--device".into(), d.name(), "--dtype".into(), "bfloat16".into()],
    };
    let out = std::process::Command::new(&a.python)
        .arg(&script)
        .arg("--model")
        .arg(dir)
        .args(["--batches", &batches, "--prompt-len", &plen.to_string(), "--decode-steps", &a.decode_steps.to_string(), "--json"])
        .args(&device_args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", a.python, script.display()))?;
    if !out.status.success() {
        bail!("{} exited with {} (is torch + transformers installed? see deploy/bench_torch.py)", script.display(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON line from the torch benchmark")?;
    let v: serde_json::Value = serde_json::from_str(line).context("parsing the torch benchmark's JSON")?;
    let mut rows = Vec::new();
    for r in v["rows"].as_array().context("rows")? {
        rows.push((
            r["batch"].as_u64().unwrap_or(0) as usize,
            r["prefill_tps"].as_f64().unwrap_or(f64::NAN),
            r["decode_tps"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    Ok(TorchResult {
        rows,
        hwm: v["vm_hwm"].as_str().unwrap_or("n/a").to_string(),
        version: v["version"].as_str().unwrap_or("?").to_string(),
    })
}
