//! `switchyard trace ...`: synthesise, convert and summarise routing traces.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use placement::synth::{SynthConfig, synthesize};
use placement::synth_latent::{LatentConfig, synthesize_latent};
use placement::{RoutingStats, RoutingTrace};

use placement::RoutingFile;

#[derive(clap::Subcommand)]
pub enum TraceCommand {
    /// Record the live routing of a running cluster for some seconds as per-layer expert counts
    /// (`{"logical_count": [[...]]}` JSON, which every `place` command reads as `--trace`).
    Record {
        #[command(flatten)]
        endpoint: super::admin::AdminEndpoint,
        /// How long to record.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Capture a model's real routing on text files (every token's top-k experts at every MoE
    /// layer, in this process) as a safetensors trace: `--input` files are tokenized with the
    /// model's tokenizer and cut into sequences of `--seq-len` tokens.
    Capture {
        #[arg(long)]
        model: PathBuf,
        /// Text files (prose, code, ...); read in order.
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<PathBuf>,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Stop after this many tokens.
        #[arg(long, default_value_t = 20_000)]
        max_tokens: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a synthetic routing trace: Zipf-skewed popularity per layer, sparse cross-layer
    /// transitions, several domains, sequences.
    Synth(SynthArgs),
    /// Convert a per-token JSONL routing log to a safetensors trace.
    Convert {
        #[arg(long)]
        input: PathBuf,
        /// Experts per layer (default: largest id + 1).
        #[arg(long)]
        num_experts: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Summarise a trace (or SGLang logical_count): load skew, transition concentration, co-activation.
    Stats {
        #[arg(long)]
        trace: PathBuf,
        #[arg(long)]
        num_experts: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Start from a model shape: `deepseek-v3` (58 layers, 256 experts, top-8) or `mixtral` (32, 8, top-2).
    #[arg(long, default_value = "mixtral")]
    preset: String,
    /// Routing model: `table` (popularity and successor tables, `placement::synth`) or `latent`
    /// (a router reading a residual-stream state, `placement::synth_latent`).
    #[arg(long, default_value = "table")]
    generator: String,
    /// Latent generator: probability of each domain per sequence, comma-separated (default uniform).
    #[arg(long, value_delimiter = ',')]
    domain_weights: Vec<f64>,
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long)]
    experts: Option<usize>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    sequences: Option<usize>,
    #[arg(long)]
    tokens_per_sequence: Option<usize>,
    /// Popularity skew (0.3-1.5 spans real models).
    #[arg(long)]
    zipf: Option<f64>,
    /// 0: next layer's expert independent of this one; 1: fully determined by sparse transitions.
    #[arg(long)]
    transition_strength: Option<f64>,
    #[arg(long)]
    domains: Option<usize>,
    /// Seed of the routing model (popularity, transitions, domains).
    #[arg(long)]
    model_seed: Option<u64>,
    /// Seed of the sampled sequences: same model seed + another seed = a held-out sample.
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    out: PathBuf,
}

/// Applies the `trace synth` flags both generators share to config `$c` (fields of one name).
macro_rules! shared_synth_flags {
    ($c:ident, $a:ident) => {
        let shape = [
            (&mut $c.num_layers, $a.layers),
            (&mut $c.num_experts, $a.experts),
            (&mut $c.top_k, $a.top_k),
            (&mut $c.num_sequences, $a.sequences),
            (&mut $c.tokens_per_sequence, $a.tokens_per_sequence),
            (&mut $c.domains, $a.domains),
        ];
        for (field, value) in shape {
            if let Some(v) = value {
                *field = v;
            }
        }
        for (field, value) in [(&mut $c.model_seed, $a.model_seed), (&mut $c.seed, $a.seed)] {
            if let Some(v) = value {
                *field = v;
            }
        }
    };
}

/// `trace synth --generator table`.
fn synth_table(a: SynthArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.domain_weights.is_empty(), "--domain-weights is for --generator latent");
    let mut c = match a.preset.as_str() {
        "deepseek-v3" => SynthConfig::deepseek_v3(),
        "mixtral" => SynthConfig::mixtral(),
        other => anyhow::bail!("unknown preset {other:?} (deepseek-v3 or mixtral)"),
    };
    shared_synth_flags!(c, a);
    if let Some(z) = a.zipf {
        c.zipf_exponent = z;
    }
    if let Some(t) = a.transition_strength {
        c.transition_strength = t;
    }
    wrote(&synthesize(&c)?, &a.out, "")
}

/// `trace synth --generator latent`.
fn synth_latent(a: SynthArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(a.zipf.is_none() && a.transition_strength.is_none(), "--zipf and --transition-strength are for --generator table");
    let mut c = match a.preset.as_str() {
        "deepseek-v3" => LatentConfig::deepseek_v3(),
        "mixtral" => LatentConfig::mixtral(),
        other => anyhow::bail!("unknown preset {other:?} (deepseek-v3 or mixtral)"),
    };
    shared_synth_flags!(c, a);
    c.domain_weights = a.domain_weights;
    wrote(&synthesize_latent(&c)?, &a.out, " (latent generator)")
}

fn wrote(t: &RoutingTrace, out: &std::path::Path, what: &str) -> anyhow::Result<ExitCode> {
    t.write(out)?;
    println!("wrote {}: {} tokens, {} layers, {} experts, top-{}{what}", out.display(), t.num_tokens(), t.num_layers, t.num_experts, t.top_k);
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: TraceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TraceCommand::Record { endpoint, seconds, out } => super::admin::record(endpoint, seconds, &out),
        TraceCommand::Synth(a) => match a.generator.as_str() {
            "table" => synth_table(a),
            "latent" => synth_latent(a),
            other => anyhow::bail!("unknown generator {other:?} (table or latent)"),
        },
        TraceCommand::Capture { model, input, seq_len, max_tokens, out } => {
            anyhow::ensure!(seq_len >= 1 && max_tokens >= 1, "--seq-len and --max-tokens must be at least 1");
            let m = worker::model::Model::load(&model, &worker::model::LoadOptions::default()).with_context(|| format!("loading {}", model.display()))?;
            let tok = worker::tokenizer::Tokenizer::from_dir(&model)?.with_context(|| format!("{} has no tokenizer.json", model.display()))?;
            let seq_len = seq_len.min(m.config.max_position_embeddings);
            let mut sequences: Vec<Vec<u32>> = Vec::new();
            let mut total = 0usize;
            for f in &input {
                let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
                for chunk in tok.encode(&text)?.chunks(seq_len) {
                    let take = chunk.len().min(max_tokens - total);
                    sequences.push(chunk[..take].to_vec());
                    total += take;
                    if total == max_tokens {
                        break;
                    }
                }
                if total == max_tokens {
                    break;
                }
            }
            let t = worker::routing_capture::capture(&m, &sequences)?;
            t.write(&out)?;
            println!("wrote {}: {} tokens in {} sequences, {} layers, {} experts, top-{}", out.display(), t.num_tokens(), sequences.len(), t.num_layers, t.num_experts, t.top_k);
            Ok(ExitCode::SUCCESS)
        }
        TraceCommand::Convert { input, num_experts, out } => {
            let t = RoutingTrace::import_jsonl(&input, num_experts)
                .with_context(|| format!("reading {}", input.display()))?;
            t.write(&out)?;
            println!("wrote {}: {} tokens, {} layers, {} experts, top-{}", out.display(), t.num_tokens(), t.num_layers, t.num_experts, t.top_k);
            Ok(ExitCode::SUCCESS)
        }
        TraceCommand::Stats { trace, num_experts, json } => {
            let routing = super::routing::read_routing(&trace, num_experts)?;
            let stats = routing.stats(1)?;
            let summary = summarise(&stats, match &routing {
                RoutingFile::Trace(t) => Some(t),
                RoutingFile::Counts(_) => None,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print_summary(&summary);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(serde::Serialize)]
struct LayerSummary {
    layer: usize,
    tokens: f64,
    /// Load of the hottest expert / mean expert load.
    hottest_over_mean: f64,
    hottest_expert: usize,
    /// Share of the load on the hottest eighth of the experts.
    top_eighth_share: f64,
    /// Share of primary-expert transitions to this layer that go to the most likely successor.
    top_successor_share: Option<f64>,
    /// Share of all co-activations carried by the most frequent pair.
    top_pair_share: Option<f64>,
}

#[derive(serde::Serialize)]
struct TraceSummary {
    tokens: Option<usize>,
    sequences: Option<usize>,
    layers: usize,
    experts: usize,
    top_k: Option<usize>,
    per_layer: Vec<LayerSummary>,
}

fn summarise(stats: &RoutingStats, trace: Option<&RoutingTrace>) -> TraceSummary {
    let ne = stats.num_experts;
    let per_layer = (0..stats.num_layers)
        .map(|l| {
            let load = &stats.load[l];
            let total: f64 = load.iter().sum();
            let mean = total / ne as f64;
            let (hottest, max) = load.iter().copied().enumerate().fold((0, f64::MIN), |b, (e, v)| if v > b.1 { (e, v) } else { b });
            let mut sorted = load.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let eighth: f64 = sorted[..ne.div_ceil(8)].iter().sum();
            let top_successor_share = (l > 0).then(|| {
                let t = &stats.transitions[l - 1];
                let all: f64 = t.iter().sum();
                let best: f64 = (0..ne).map(|e| (0..ne).map(|e2| t[e * ne + e2]).fold(0.0, f64::max)).sum();
                if all > 0.0 { best / all } else { 0.0 }
            });
            let c = &stats.coactivation[l];
            let c_all: f64 = c.iter().sum::<f64>() / 2.0;
            let top_pair_share = (c_all > 0.0).then(|| c.iter().copied().fold(0.0, f64::max) / c_all);
            LayerSummary {
                layer: l,
                tokens: total,
                hottest_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
                hottest_expert: hottest,
                top_eighth_share: if total > 0.0 { eighth / total } else { 0.0 },
                top_successor_share,
                top_pair_share,
            }
        })
        .collect();
    TraceSummary {
        tokens: trace.map(RoutingTrace::num_tokens),
        sequences: trace.map(|t| t.sequences().len()),
        layers: stats.num_layers,
        experts: ne,
        top_k: trace.map(|t| t.top_k),
        per_layer,
    }
}

fn print_summary(s: &TraceSummary) {
    let opt = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "tokens {}  sequences {}  layers {}  experts {}  top-k {}",
        opt(s.tokens),
        opt(s.sequences),
        s.layers,
        s.experts,
        opt(s.top_k)
    );
    println!("{:>5} {:>10} {:>8} {:>9} {:>11} {:>14} {:>10}", "layer", "routed", "hot/mean", "hot exp", "top 1/8 %", "top-succ %", "top-pair %");
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}", 100.0 * v));
    for l in &s.per_layer {
        println!(
            "{:>5} {:>10.0} {:>8.2} {:>9} {:>11.1} {:>14} {:>10}",
            l.layer,
            l.tokens,
            l.hottest_over_mean,
            l.hottest_expert,
            100.0 * l.top_eighth_share,
            pct(l.top_successor_share),
            pct(l.top_pair_share)
        );
    }
}
