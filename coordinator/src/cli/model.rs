//! `switchyard model ...` and `switchyard generate`.
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use worker::engine::{Engine, EngineConfig, Request};
use worker::model::{LoadOptions, LogitsMode, Model, SeqInput};
use worker::reference::{check_case, read_expected};
use worker::sampling::SamplingParams;
use worker::synth::{SynthSpec, write_checkpoint};
use worker::tokenizer::Tokenizer;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Compare a checkpoint's logits and greedy generations with reference outputs.
    Check {
        #[arg(long)]
        model: PathBuf,
        /// Reference outputs: prompt_<i> (I64), logits_<i> (F32 [len, vocab]), greedy_<i> (I64).
        #[arg(long)]
        expected: PathBuf,
        /// Tolerance on max |Δ| / max |expected|.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f32,
        /// Run the check through a real cluster of this many worker processes.
        #[arg(long)]
        workers: Option<usize>,
        /// Placement JSON for --workers (default: contiguous).
        #[arg(long, requires = "workers")]
        placement: Option<PathBuf>,
        /// With --workers: run with the capacity option at this factor (to see what it does to
        /// outputs; the check then reports the changes).
        #[arg(long, requires = "workers")]
        capacity_factor: Option<f64>,
        /// With --workers: where MoE outputs are combined (`home`, `affinity`, `affinity:N`).
        #[arg(long, requires = "workers", default_value = "home", value_parser = worker::expert_parallel::DataPath::parse)]
        data_path: worker::expert_parallel::DataPath,
    },
    /// Print what a checkpoint holds.
    Info {
        #[arg(long)]
        model: PathBuf,
    },
    /// Benchmark prefill and decode throughput (generates a checkpoint of realistic proportions
    /// unless --model is given).
    Bench(BenchArgs),
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Benchmark this checkpoint instead of a generated one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the generated checkpoint is written (kept and reused).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Use a tiny generated shape (smoke test).
    #[arg(long)]
    pub tiny: bool,
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
    /// Also run transformers (PyTorch eager, CPU) on the same checkpoint and print ratios.
    #[arg(long)]
    pub compare_torch: bool,
    /// The PyTorch benchmark script.
    #[arg(long)]
    pub torch_script: Option<PathBuf>,
    /// Python interpreter for --compare-torch.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model directory (generate in this process).
    #[arg(long, required_unless_present = "endpoint", conflicts_with = "endpoint")]
    pub model: Option<PathBuf>,
    /// Cluster address (stream from `switchyard up` / a coordinator), e.g. http://127.0.0.1:50051;
    /// several, comma separated (coordinators of one cluster), are tried in turn on UNAVAILABLE.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// With --endpoint: how often a request that failed with a retryable status (UNAVAILABLE:
    /// coordinator failover, a dead worker) is sent again. A retry continues after the tokens
    /// already received (they are appended to the prompt), so nothing is printed twice.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Prompt text (needs tokenizer.json).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt token ids, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop token ids (default: the config's eos_token_id).
    #[arg(long, value_delimiter = ',')]
    pub stop_ids: Option<Vec<u32>>,
}

pub fn run(c: ModelCommand) -> anyhow::Result<ExitCode> {
    match c {
        ModelCommand::Check { model, expected, tolerance, workers: None, .. } => check(&model, &expected, tolerance),
        ModelCommand::Check { model, expected, tolerance, workers: Some(n), placement, capacity_factor, data_path } => {
            let mut args: Vec<String> = capacity_factor.map(|c| format!("--capacity-factor={c}")).into_iter().collect();
            args.push(format!("--data-path={}", data_path.name()));
            super::cluster::check_cluster(&model, &expected, tolerance, n, placement.as_deref(), &args)
        }
        ModelCommand::Info { model } => info(&model),
        ModelCommand::Bench(a) => bench(a),
    }
}

fn check(dir: &Path, expected: &Path, tol: f32) -> anyhow::Result<ExitCode> {
    let model = Model::load(dir, &LoadOptions::default()).with_context(|| format!("loading {}", dir.display()))?;
    let cases = read_expected(expected)?;
    if cases.is_empty() {
        bail!("{} holds no prompt_0", expected.display());
    }
    let mut ok_all = true;
    for c in &cases {
        let r = check_case(&model, c)?;
        let ok = r.logits_rel_diff < tol && r.greedy_ok;
        ok_all &= ok;
        println!(
            "prompt {} (len {}): logits max|Δ|/max|expected| = {:.3e} {}, greedy {} {:?}{}",
            c.index,
            r.prompt_len,
            r.logits_rel_diff,
            if r.logits_rel_diff < tol { "ok" } else { "MISMATCH" },
            if r.greedy_ok { "ok" } else { "MISMATCH" },
            r.greedy,
            if r.greedy_ok { String::new() } else { format!(" expected {:?}", c.greedy) },
        );
    }
    println!("{}: {} prompts, {}", dir.display(), cases.len(), if ok_all { "all match" } else { "MISMATCH" });
    Ok(if ok_all { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn info(dir: &Path) -> anyhow::Result<ExitCode> {
    let cfg = worker::ModelConfig::from_dir(dir)?;
    let ck = worker::checkpoint::Checkpoint::open(dir)?;
    let r = &cfg.router;
    println!("architecture      {}", cfg.arch.name());
    println!("hidden / layers   {} / {}", cfg.hidden_size, cfg.n_layers);
    println!("vocab             {}", cfg.vocab_size);
    println!("attention         {:?}", cfg.attn);
    println!("rope              {:?}", cfg.rope);
    println!("max positions     {}", cfg.max_position_embeddings);
    println!("experts           {} routed, top-{}, scoring {:?}, norm_topk_prob {}", r.n_experts, r.top_k, r.scoring, r.norm_topk_prob);
    if let Some(g) = &r.group_limit {
        println!("group limit       {} groups, top {} ({:?})", g.n_group, g.topk_group, g.score);
    }
    println!("routed scaling    {}", r.routed_scaling_factor);
    println!("expert ffn        {}", cfg.moe_intermediate_size);
    if let Some(s) = &cfg.shared_expert {
        println!("shared expert     {} (sigmoid gate: {})", s.intermediate, s.sigmoid_gate);
    }
    println!("moe layers        {:?}", cfg.moe_layers());
    println!("tensors           {} ({:.1} MiB, dtypes {:?})", ck.names().len(), ck.total_bytes() as f64 / (1 << 20) as f64, ck.dtypes());
    match Tokenizer::from_dir(dir)? {
        Some(t) => println!("tokenizer         {} tokens", t.vocab_size()),
        None => println!("tokenizer         none"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn generate(a: GenerateArgs) -> anyhow::Result<ExitCode> {
    let Some(model_dir) = a.model.clone() else {
        let endpoint = a.endpoint.clone().context("give --model DIR or --endpoint URL")?;
        return super::cluster::generate_endpoint(&endpoint, &a);
    };
    let a = GenerateArgs { model: Some(model_dir.clone()), ..a };
    let a_model = model_dir;
    let model = Arc::new(Model::load(&a_model, &LoadOptions::default()).with_context(|| format!("loading {}", a_model.display()))?);
    let tok = Tokenizer::from_dir(&a_model)?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), None) => match &tok {
            Some(t) => t.encode(text)?,
            None => bail!("--prompt needs {}/tokenizer.json; use --prompt-ids", a_model.display()),
        },
        (None, Some(ids)) => ids.clone(),
        _ => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let stop = a.stop_ids.clone().unwrap_or_else(|| model.config.eos_token_ids.clone());
    let mut engine = Engine::new(model, EngineConfig::default());
    let req = Request {
        prompt: prompt.clone(),
        max_tokens: a.max_tokens,
        sampling: SamplingParams { temperature: a.temperature, top_p: a.top_p, top_k: a.top_k, seed: a.seed },
        stop_tokens: stop,
        logprobs: None,
    };
    let id = engine.add_request(req)?;
    let t0 = Instant::now();
    let res = engine.run_to_completion()?;
    let dt = t0.elapsed().as_secs_f64();
    let (ids, reason) = res.get(&id).cloned().context("request vanished")?;
    if let Some(t) = &tok {
        println!("{}", t.decode(&ids)?);
    }
    println!("ids: {}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    eprintln!("{} prompt tokens, {} generated, finish {:?}, {:.2} s", prompt.len(), ids.len(), reason, dt);
    Ok(ExitCode::SUCCESS)
}

/// Peak resident memory (VmHWM) in KiB.
fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// 1-minute load average (other processes skew timings on a shared machine).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next().map(str::to_string)).unwrap_or_else(|| "n/a".into())
}

struct BenchRow {
    batch: usize,
    prefill_tps: f64,
    decode_tps: f64,
}

fn bench(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => {
            let mut spec = if a.tiny { SynthSpec::tiny() } else { SynthSpec::bench() };
            spec.arch = a.arch.clone();
            if spec.arch != "qwen3_moe" && spec.arch != "mixtral" {
                bail!("--arch must be qwen3_moe or mixtral");
            }
            let dir = a.out.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!("switchyard-bench-{}-{}", spec.arch, if a.tiny { "tiny" } else { "h1024" }))
            });
            if !dir.join("config.json").exists() {
                eprintln!("writing checkpoint to {} ...", dir.display());
                let t0 = Instant::now();
                write_checkpoint(&dir, &spec).with_context(|| format!("writing {}", dir.display()))?;
                eprintln!("written in {:.1} s", t0.elapsed().as_secs_f64());
            }
            dir
        }
    };
    let t0 = Instant::now();
    let model = Model::load(&dir, &LoadOptions::default()).with_context(|| format!("loading {}", dir.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let c = &model.config;
    let header = format!(
        "model {} ({}): hidden {}, {} layers, {} experts top-{}, expert ffn {}, vocab {}; {:.2} GiB of weights held, loaded in {:.1} s; {} threads",
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
        rayon::current_num_threads(),
    );
    // With --json, stdout holds the one JSON object only.
    if a.json { eprintln!("{header}") } else { println!("{header}") }
    let load_before = loadavg();
    let plen = a.prompt_len.min(c.max_position_embeddings.saturating_sub(a.decode_steps + 1)).max(1);
    let mut rows = Vec::new();
    let mut seed = 12345u64;
    for &b in &a.batches {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|_| {
                (0..plen)
                    .map(|_| {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((seed >> 33) % c.vocab_size as u64) as u32
                    })
                    .collect()
            })
            .collect();
        let mut caches: Vec<_> = (0..b).map(|_| model.new_cache()).collect();
        let t0 = Instant::now();
        let out = {
            let mut seqs: Vec<SeqInput> = prompts.iter().zip(caches.iter_mut()).map(|(p, cache)| SeqInput { tokens: p, cache }).collect();
            model.forward(&mut seqs, LogitsMode::Last)?
        };
        let prefill_s = t0.elapsed().as_secs_f64();
        let mut next: Vec<Vec<u32>> = out.logits.iter().map(|l| vec![worker::sampling::argmax(l) as u32]).collect();
        let t0 = Instant::now();
        for _ in 0..a.decode_steps {
            let out = {
                let mut seqs: Vec<SeqInput> = next.iter().zip(caches.iter_mut()).map(|(p, cache)| SeqInput { tokens: p, cache }).collect();
                model.forward(&mut seqs, LogitsMode::Last)?
            };
            next = out.logits.iter().map(|l| vec![worker::sampling::argmax(l) as u32]).collect();
        }
        let decode_s = t0.elapsed().as_secs_f64();
        let row = BenchRow {
            batch: b,
            prefill_tps: (b * plen) as f64 / prefill_s,
            decode_tps: (b * a.decode_steps) as f64 / decode_s.max(1e-9),
        };
        eprintln!("batch {b}: prefill {:.1} tok/s, decode {:.1} tok/s", row.prefill_tps, row.decode_tps);
        rows.push(row);
    }
    let load_after_ours = loadavg();
    let hwm_kib = vm_hwm_kib();
    let hwm = hwm_kib.map(|k| format!("{:.2} GiB", k as f64 / (1 << 20) as f64)).unwrap_or_else(|| "n/a".into());
    // After the peak was read: the probe's buffer would raise it.
    let bandwidth = worker::kernels::read_bandwidth_gbs(1 << 30, 5);
    let step_bytes = model.decode_step_bytes() as f64;
    let torch = if a.compare_torch { Some(run_torch(&a, &dir, plen)?) } else { None };
    let limit = bandwidth * 1e9 / step_bytes.max(1.0);
    if a.json {
        let torch_row = |b: usize| torch.as_ref().and_then(|t| t.rows.iter().find(|x| x.0 == b)).map(|x| (x.1, x.2));
        let rows_json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "batch": r.batch, "prefill_tok_s": r.prefill_tps, "decode_tok_s": r.decode_tps,
                    "torch_prefill_tok_s": torch_row(r.batch).map(|t| t.0), "torch_decode_tok_s": torch_row(r.batch).map(|t| t.1),
                })
            })
            .collect();
        let v = serde_json::json!({
            "model": dir.display().to_string(), "threads": rayon::current_num_threads(), "prompt_len": plen,
            "decode_steps": a.decode_steps, "weight_bytes": model.weight_bytes(), "peak_rss_kib": hwm_kib,
            "read_bandwidth_gb_s": bandwidth, "decode_step_bytes": step_bytes, "batch1_decode_limit_tok_s": limit,
            "rows": rows_json, "torch": torch.as_ref().map(|t| serde_json::json!({"peak_rss": t.hwm, "version": t.version})),
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!();
    println!(
        "prompt length {plen}, {} decode steps per batch size; load average before/after our run: {} / {}{}",
        a.decode_steps,
        load_before,
        load_after_ours,
        if torch.is_some() { format!(", after torch: {}", loadavg()) } else { String::new() }
    );
    match &torch {
        None => {
            println!("{:>6} {:>18} {:>18}", "batch", "prefill tok/s", "decode tok/s");
            for r in &rows {
                println!("{:>6} {:>18.1} {:>18.1}", r.batch, r.prefill_tps, r.decode_tps);
            }
            println!("peak resident memory (VmHWM): {hwm}");
        }
        Some(t) => {
            println!(
                "{:>6} {:>14} {:>14} {:>8} {:>14} {:>14} {:>8}",
                "batch", "prefill ours", "prefill torch", "ratio", "decode ours", "decode torch", "ratio"
            );
            for r in &rows {
                let tr = t.rows.iter().find(|x| x.0 == r.batch);
                let (tp, td) = tr.map(|x| (x.1, x.2)).unwrap_or((f64::NAN, f64::NAN));
                println!(
                    "{:>6} {:>14.1} {:>14.1} {:>7.2}x {:>14.1} {:>14.1} {:>7.2}x",
                    r.batch,
                    r.prefill_tps,
                    tp,
                    r.prefill_tps / tp,
                    r.decode_tps,
                    td,
                    r.decode_tps / td
                );
            }
            println!("peak resident memory (VmHWM): ours {hwm}, torch {}", t.hwm);
            println!("torch: {}", t.version);
        }
    }
    println!(
        "memory read bandwidth {bandwidth:.1} GB/s ({} threads, best of 5 over 1 GiB); a batch-1 decode step reads {:.0} MB of weights: limit {limit:.1} tok/s",
        rayon::current_num_threads(),
        step_bytes / 1e6
    );
    if let Some(r) = rows.iter().find(|r| r.batch == 1) {
        println!("batch-1 decode reaches {:.0} % of that limit", 100.0 * r.decode_tps / limit);
    }
    Ok(ExitCode::SUCCESS)
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
    let out = std::process::Command::new(&a.python)
        .arg(&script)
        .arg("--model")
        .arg(dir)
        .args(["--batches", &batches, "--prompt-len", &plen.to_string(), "--decode-steps", &a.decode_steps.to_string(), "--json"])
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
