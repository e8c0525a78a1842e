//! llama.cpp beside `switchyard model bench` (`--compare-llamacpp BIN_DIR`): its own benchmarks,
//! `llama-bench` and `llama-batched-bench`, on a GGUF conversion of the same checkpoint, with the
//! same prompt length, decode steps, batch sizes and threads, and their peak resident memory.
//!
//! The GGUF comes from llama.cpp's own converter (`deploy/convert_llamacpp.py` around
//! `convert_hf_to_gguf.py` of a llama.cpp source tree), in the checkpoint's dtype, so both engines
//! read the same weights in the same precision. How to build llama.cpp from a registry package:
//! the README's *Model runtime* section.
use anyhow::{Context, bail};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where llama.cpp is and how to get the GGUF.
#[derive(Debug, Clone)]
pub struct LlamaCpp {
    /// Directory holding `llama-bench` and `llama-batched-bench`.
    pub bin_dir: PathBuf,
    /// An existing GGUF of the checkpoint; else `<checkpoint>/llamacpp-bf16.gguf`, converted on
    /// first use.
    pub gguf: Option<PathBuf>,
    /// llama.cpp source tree with `convert_hf_to_gguf.py` (default: `BIN_DIR/../..`, where a
    /// CMake build directory `build/bin` sits).
    pub src: Option<PathBuf>,
    /// Python with the converter's requirements (torch, transformers, sentencepiece, numpy).
    pub python: String,
}

/// One batch size as llama.cpp ran it (tokens/s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaCppRow {
    pub batch: usize,
    pub prefill_tps: f64,
    pub decode_tps: f64,
}

/// Everything one llama.cpp pass measured.
#[derive(Debug, Clone)]
pub struct LlamaCppRun {
    /// `llama-batched-bench` at every batch size.
    pub batched: Vec<LlamaCppRow>,
    /// `llama-bench` (one sequence): prompt processing and generation.
    pub single: LlamaCppRow,
    /// Highest VmHWM of the two processes, KiB.
    pub peak_rss_kib: Option<u64>,
    /// `build_commit (build_number)` as llama-bench reports it.
    pub version: String,
}

impl LlamaCppRun {
    /// llama.cpp's figure for `batch`: at batch 1 the better of its two benchmarks (the ratio is
    /// then taken against llama.cpp at its best).
    pub fn row(&self, batch: usize) -> Option<LlamaCppRow> {
        let b = self.batched.iter().find(|r| r.batch == batch).copied();
        if batch != 1 {
            return b;
        }
        let s = self.single;
        Some(match b {
            Some(b) => LlamaCppRow { batch: 1, prefill_tps: b.prefill_tps.max(s.prefill_tps), decode_tps: b.decode_tps.max(s.decode_tps) },
            None => s,
        })
    }
}

impl LlamaCpp {
    fn tool(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.bin_dir.join(name);
        if !p.is_file() {
            bail!("{}: not found (build llama.cpp's {name} target; see the README's Model runtime section)", p.display());
        }
        Ok(p)
    }

    /// The GGUF to benchmark: the one given, or the checkpoint's conversion (made now if missing).
    pub fn gguf_for(&self, checkpoint: &Path) -> anyhow::Result<PathBuf> {
        if let Some(g) = &self.gguf {
            if !g.is_file() {
                bail!("--llamacpp-gguf {}: not found", g.display());
            }
            return Ok(g.clone());
        }
        let out = checkpoint.join("llamacpp-bf16.gguf");
        if out.is_file() {
            return Ok(out);
        }
        let src = self.src.clone().unwrap_or_else(|| self.bin_dir.join("../.."));
        let script = driver_script();
        let partial = checkpoint.join("llamacpp-bf16.gguf.partial");
        eprintln!("converting {} to GGUF with llama.cpp's converter from {} ...", checkpoint.display(), src.display());
        let status = Command::new(&self.python)
            .arg(&script)
            .arg(&src)
            .arg(checkpoint)
            .arg(&partial)
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {} {}", self.python, script.display()))?;
        if !status.success() {
            let _ = std::fs::remove_file(&partial);
            bail!("GGUF conversion failed ({status}); the converter needs torch, transformers, sentencepiece and numpy in {}", self.python);
        }
        std::fs::rename(&partial, &out).with_context(|| format!("moving {} into place", partial.display()))?;
        Ok(out)
    }

    /// One pass of both llama.cpp benchmarks at `batches` with `threads` threads.
    pub fn run(&self, gguf: &Path, batches: &[usize], prompt_len: usize, decode_steps: usize, threads: usize) -> anyhow::Result<LlamaCppRun> {
        let bench = self.tool("llama-bench")?;
        let batched = self.tool("llama-batched-bench")?;
        let t = threads.to_string();
        let (single_out, single_rss) = run_sampling_rss(
            Command::new(&bench).arg("-m").arg(gguf).args(["-t", &t, "-p", &prompt_len.to_string(), "-n", &decode_steps.to_string(), "-r", "1", "-o", "json"]),
        )?;
        let (single, version) = parse_llama_bench(&single_out)?;
        let max_b = batches.iter().copied().max().unwrap_or(1);
        let npl = batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
        let ctx = (max_b * (prompt_len + decode_steps)).max(512);
        let (batched_out, batched_rss) = run_sampling_rss(Command::new(&batched).arg("-m").arg(gguf).args([
            "-t",
            &t,
            "-tb",
            &t,
            "-c",
            &ctx.to_string(),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            &prompt_len.to_string(),
            "-ntg",
            &decode_steps.to_string(),
            "-npl",
            &npl,
            "-no-kvu",
            "--output-format",
            "jsonl",
        ]))?;
        let batched = parse_batched_bench(&batched_out)?;
        for b in batches {
            if !batched.iter().any(|r| r.batch == *b) {
                bail!("llama-batched-bench printed no row for batch {b}");
            }
        }
        Ok(LlamaCppRun { batched, single, peak_rss_kib: single_rss.max(batched_rss), version })
    }
}

/// `deploy/convert_llamacpp.py`, from the working directory or the source tree of this binary.
fn driver_script() -> PathBuf {
    let local = PathBuf::from("deploy/convert_llamacpp.py");
    if local.exists() { local } else { Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/convert_llamacpp.py") }
}

/// Run `cmd` to completion, returning its stdout and the last VmHWM (KiB) read from `/proc`
/// while it ran (sampled every 20 ms; the high-water mark only grows, so the last reading is the
/// peak up to 20 ms before exit). Its stderr goes to ours.
fn run_sampling_rss(cmd: &mut Command) -> anyhow::Result<(String, Option<u64>)> {
    let name = format!("{:?}", cmd.get_program());
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().with_context(|| format!("starting {name}"))?;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let status_path = format!("/proc/{}/status", child.id());
    let mut hwm = None;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if let Some(k) = std::fs::read_to_string(&status_path).ok().as_deref().and_then(vm_hwm_kib_of) {
            hwm = Some(k);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().map_err(|_| anyhow::anyhow!("reading {name}'s output"))??;
    if !status.success() {
        bail!("{name} exited with {status}");
    }
    Ok((out, hwm))
}

/// The `VmHWM:` line of a `/proc/PID/status` text, KiB.
pub fn vm_hwm_kib_of(status: &str) -> Option<u64> {
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// `llama-bench -o json`: an array with one object per test (`n_prompt`/`n_gen`, `avg_ts`).
fn parse_llama_bench(out: &str) -> anyhow::Result<(LlamaCppRow, String)> {
    let start = out.find('[').context("no JSON array in llama-bench's output")?;
    let v: serde_json::Value = serde_json::from_str(out[start..].trim()).context("parsing llama-bench's JSON")?;
    let tests = v.as_array().context("llama-bench JSON: not an array")?;
    let mut row = LlamaCppRow { batch: 1, prefill_tps: f64::NAN, decode_tps: f64::NAN };
    let mut version = String::from("?");
    for t in tests {
        let ts = t["avg_ts"].as_f64().context("llama-bench JSON: a test without avg_ts")?;
        let (p, g) = (t["n_prompt"].as_u64().unwrap_or(0), t["n_gen"].as_u64().unwrap_or(0));
        match (p, g) {
            (p, 0) if p > 0 => row.prefill_tps = ts,
            (0, g) if g > 0 => row.decode_tps = ts,
            _ => {}
        }
        version = format!("{} ({})", t["build_commit"].as_str().unwrap_or("?"), t["build_number"].as_u64().unwrap_or(0));
    }
    if row.prefill_tps.is_nan() || row.decode_tps.is_nan() {
        bail!("llama-bench's JSON lacks the prompt or the generation test");
    }
    Ok((row, version))
}

/// `llama-batched-bench --output-format jsonl`: one object per batch size (`pl`, `speed_pp`,
/// `speed_tg`).
fn parse_batched_bench(out: &str) -> anyhow::Result<Vec<LlamaCppRow>> {
    let mut rows = Vec::new();
    for line in out.lines().map(str::trim).filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("parsing llama-batched-bench line {line}"))?;
        let field = |k: &str| v[k].as_f64().with_context(|| format!("llama-batched-bench line without {k}: {line}"));
        rows.push(LlamaCppRow { batch: field("pl")? as usize, prefill_tps: field("speed_pp")?, decode_tps: field("speed_tg")? });
    }
    if rows.is_empty() {
        bail!("llama-batched-bench printed no JSON lines");
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_benchmarks_and_takes_llamacpp_at_its_best_at_batch_1() {
        let single = "load info\n[\n {\"build_commit\": \"abc\", \"build_number\": 7, \"n_prompt\": 64, \"n_gen\": 0, \"avg_ts\": 60.5},\n {\"build_commit\": \"abc\", \"build_number\": 7, \"n_prompt\": 0, \"n_gen\": 16, \"avg_ts\": 21.0}\n]\n";
        let (row, version) = parse_llama_bench(single).unwrap();
        assert_eq!((row.prefill_tps, row.decode_tps, version.as_str()), (60.5, 21.0, "abc (7)"));
        let batched = "{\"pp\": 64, \"tg\": 16, \"pl\": 1, \"speed_pp\": 64.0, \"speed_tg\": 19.0}\n{\"pp\": 64, \"tg\": 16, \"pl\": 16, \"speed_pp\": 74.0, \"speed_tg\": 38.0}\n";
        let rows = parse_batched_bench(batched).unwrap();
        let run = LlamaCppRun { batched: rows, single: row, peak_rss_kib: None, version };
        assert_eq!(run.row(1).unwrap().prefill_tps, 64.0);
        assert_eq!(run.row(1).unwrap().decode_tps, 21.0);
        assert_eq!(run.row(16).unwrap().decode_tps, 38.0);
        assert!(run.row(64).is_none());
        assert!(parse_llama_bench("[]").is_err(), "no tests is an error, not NaN ratios");
        assert!(parse_batched_bench("nothing").is_err());
        assert!(parse_batched_bench("{\"pl\": 1}").is_err(), "a row without speeds is refused");
        assert_eq!(vm_hwm_kib_of("Name: x\nVmHWM:\t  1234 kB\n"), Some(1234));
    }
}
