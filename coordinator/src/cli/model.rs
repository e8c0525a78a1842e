//! `switchyard model ...` and `switchyard generate`.
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use worker::engine::{Engine, EngineConfig, Request};
use worker::model::{LoadOptions, Model};
use worker::reference::{check_case, read_expected};
use worker::sampling::SamplingParams;
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
        /// With --workers: the all-to-all transport (`tcp`, or `nccl` in a build with `--features cuda`).
        #[arg(long, requires = "workers", default_value = "tcp")]
        transport: String,
        /// Where the model computes (with --workers: every worker's device).
        #[arg(long, default_value = "cpu", value_parser = worker::Device::parse)]
        device: worker::Device,
    },
    /// Print what a checkpoint holds.
    Info {
        #[arg(long)]
        model: PathBuf,
    },
    /// Benchmark prefill and decode throughput (generates a checkpoint of realistic proportions
    /// unless --model is given).
    Bench(super::bench_model::BenchArgs),
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
    /// With --model: where the model computes (`cpu`, `cuda:N`).
    #[arg(long, default_value = "cpu", value_parser = worker::Device::parse)]
    pub device: worker::Device,
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
        ModelCommand::Check { model, expected, tolerance, workers: None, device, .. } => check(&model, &expected, tolerance, device),
        ModelCommand::Check { model, expected, tolerance, workers: Some(n), placement, capacity_factor, data_path, device, transport } => {
            let mut args: Vec<String> = capacity_factor.map(|c| format!("--capacity-factor={c}")).into_iter().collect();
            args.push(format!("--data-path={}", data_path.name()));
            args.push(format!("--transport={transport}"));
            let worker_args = super::local_cluster::device_args(device, n);
            super::cluster::check_cluster(&model, &expected, tolerance, n, placement.as_deref(), &args, &worker_args)
        }
        ModelCommand::Info { model } => info(&model),
        ModelCommand::Bench(a) => super::bench_model::run(a),
    }
}

fn check(dir: &Path, expected: &Path, tol: f32, device: worker::Device) -> anyhow::Result<ExitCode> {
    let model = Model::load(dir, &LoadOptions::default()).with_context(|| format!("loading {}", dir.display()))?;
    let model = worker::backend::open(device, Arc::new(model))?;
    let cases = read_expected(expected)?;
    if cases.is_empty() {
        bail!("{} holds no prompt_0", expected.display());
    }
    let mut ok_all = true;
    for c in &cases {
        let r = check_case(model.as_ref(), c)?;
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
    println!("{} on {device}: {} prompts, {}", dir.display(), cases.len(), if ok_all { "all match" } else { "MISMATCH" });
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
    let backend = worker::backend::open(a.device, model)?;
    let mut engine = Engine::new(backend, EngineConfig::default());
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
