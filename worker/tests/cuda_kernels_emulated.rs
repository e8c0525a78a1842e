//! The generated CUDA kernels, executed on the CPU.
//!
//! `kernel_src::source()` is the CUDA C that NVRTC compiles when the CUDA backend starts. Its own
//! unit tests check the text (entry points, ABI, constants); this test runs it. The source is
//! rewritten minimally (see [`emulator_source`]) and compiled with the host C++ compiler on top of
//! `tests/kernel_emulator/stub.h`, which emulates the CUDA subset the kernels use with one
//! `std::thread` per CUDA thread and `std::barrier`s for `__syncthreads` and warp shuffles.
//! `tests/kernel_emulator/checks.cpp` then launches every kernel on randomized inputs and compares
//! the results with C++ ports of the Rust CPU code (moe.rs `Router::route_one`, attention.rs,
//! kernels.rs `Rope`/`rmsnorm`/`silu_mul_fused`): `route_topk` bit for bit, the rest to rounding.
//!
//! This checks the kernels' logic (indexing, grid-stride loops, barriers, reductions, selection
//! rules) on machines without a GPU. It does not check device math accuracy (the host libm stands
//! in for CUDA's), PTX, or performance.
//!
//! Needs a C++20 compiler (`$CXX`, else `c++`, `g++` or `clang++`); without one the test prints
//! that it is skipped and returns.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use worker::backend::cuda::kernel_src;

/// How long the compiled checks may run before they count as hung: a barrier that some thread of
/// a block never reaches (a broken kernel) deadlocks the emulator. They take a few seconds.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn generated_cuda_kernels_match_the_cpu_reference_when_emulated() {
    let Some(cxx) = find_cxx() else {
        println!("skipped: no C++ compiler (c++ / $CXX) to emulate the CUDA kernels");
        return;
    };
    let emulator = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernel_emulator");
    let dir = tempfile::tempdir().expect("tempdir");
    for file in ["stub.h", "checks.cpp"] {
        std::fs::copy(emulator.join(file), dir.path().join(file)).unwrap_or_else(|e| panic!("copy {file}: {e}"));
    }
    std::fs::write(dir.path().join("kernels_emulated.h"), emulator_source(&kernel_src::source())).expect("write kernels");

    // -ffp-contract=off: no fused multiply-adds, so kernel and reference round the same way
    // whatever the host architecture's default.
    let exe = dir.path().join(format!("checks{}", std::env::consts::EXE_SUFFIX));
    let started = Instant::now();
    let compiled = Command::new(&cxx[0])
        .args(&cxx[1..])
        .args(["-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "checks.cpp", "-o"])
        .arg(&exe)
        .current_dir(dir.path())
        .output()
        .expect("run the C++ compiler");
    let compile_time = started.elapsed();
    if !compiled.status.success() {
        let kept = dir.keep();
        panic!(
            "{} failed to compile the emulated kernels (sources kept in {}):\n{}",
            cxx.join(" "),
            kept.display(),
            tail(&String::from_utf8_lossy(&compiled.stderr), 8000)
        );
    }

    // Output to files, not pipes, so a hung run cannot also block on a full pipe.
    let stdout_path = dir.path().join("checks.out");
    let started = Instant::now();
    let mut child = Command::new(&exe)
        .current_dir(dir.path())
        .stdout(std::fs::File::create(&stdout_path).expect("create output file"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the emulated checks");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the emulated checks") {
            break Some(status);
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let run_time = started.elapsed();
    let output = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    print!("{output}");
    println!(
        "emulated kernels: compiled with {} in {:.1} s, ran in {:.1} s",
        cxx.join(" "),
        compile_time.as_secs_f64(),
        run_time.as_secs_f64()
    );
    match status {
        None => panic!("the emulated checks hung for {RUN_TIMEOUT:?} (a barrier not reached by every thread?)"),
        Some(s) => assert!(s.success(), "the emulated kernels disagree with the CPU reference ({s}); see the FAIL lines above"),
    }
}

/// The C++ compiler command: `$CXX` (split on whitespace, e.g. `ccache g++`) if set and runnable,
/// else the first of `c++`, `g++`, `clang++` that runs.
fn find_cxx() -> Option<Vec<String>> {
    let runs = |cmd: &[String]| {
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Ok(cxx) = std::env::var("CXX") {
        let cmd: Vec<String> = cxx.split_whitespace().map(str::to_string).collect();
        if !cmd.is_empty() && runs(&cmd) {
            return Some(cmd);
        }
        println!("$CXX ({cxx}) does not run; trying c++, g++, clang++");
    }
    ["c++", "g++", "clang++"].into_iter().map(|c| vec![c.to_string()]).find(|cmd| runs(cmd))
}

/// The generated CUDA C rewritten into C++ that compiles after `kernel_emulator/stub.h`.
///
/// stub.h maps the CUDA keywords and built-ins by macros and functions (`__global__`, `__device__`,
/// `__forceinline__`, `__shared__` as `static`, `threadIdx`, `__syncthreads`, `__shfl_xor_sync`,
/// ...). Only two constructs need a textual rewrite, and nothing else is touched:
///
/// * Inline PTX, `asm("MNEMONIC %0, %1;" : "=c"(out) : "c"(in));`, becomes
///   `out = ptx_MNEMONIC(in);` with `.` as `_` in the mnemonic (stub.h defines `ptx_cvt_f32_f16`
///   and `ptx_cvt_rn_f16_f32`, the f16 conversions). A host compiler cannot assemble PTX, and a
///   macro cannot take the `:` operand lists apart. Any other `asm` shape panics here, and an
///   instruction stub.h lacks fails the compile by name: neither passes unnoticed.
/// * Dynamic shared memory, `extern __shared__ T name[];`, becomes
///   `T* name = (T*)emu_dynamic_shared;`, the buffer stub.h's `launch` allocates with the launch's
///   byte count (`__shared__` as `static` would make it `extern static`).
///
/// `extern "C"` on the entry points stays: C++ accepts it on definitions too.
fn emulator_source(cuda: &str) -> String {
    let mut out = String::with_capacity(cuda.len() + 256);
    out.push_str("// kernel_src::source(), rewritten by tests/cuda_kernels_emulated.rs for stub.h.\n");
    let mut rest = cuda;
    loop {
        let asm = rest.find("asm(");
        let shared = rest.find("extern __shared__ ");
        let (at, is_asm) = match (asm, shared) {
            (None, None) => break,
            (Some(a), Some(s)) if s < a => (s, false),
            (Some(a), _) => (a, true),
            (None, Some(s)) => (s, false),
        };
        out.push_str(&rest[..at]);
        let stmt_end = if is_asm { rest[at..].find(");").map(|e| e + 2) } else { rest[at..].find(';').map(|e| e + 1) };
        let stmt_end = at + stmt_end.unwrap_or_else(|| panic!("unterminated statement: {}", &rest[at..]));
        let stmt = &rest[at..stmt_end];
        out.push_str(&if is_asm { rewrite_asm(stmt) } else { rewrite_dynamic_shared(stmt) });
        rest = &rest[stmt_end..];
    }
    out.push_str(rest);
    // Every asm went through rewrite_asm (which accepts one shape only): none is left in any spelling.
    for spelling in ["asm(", "asm (", "asm volatile", "__asm__"] {
        assert!(!out.contains(spelling), "kernel source has `{spelling}`, which emulator_source does not rewrite");
    }
    out
}

/// `asm("MNEMONIC %0, %1;" : "=c"(out) : "c"(in));` -> `out = ptx_MNEMONIC(in);`.
fn rewrite_asm(stmt: &str) -> String {
    let unsupported = || -> ! {
        panic!("unsupported inline PTX (want `asm(\"op %0, %1;\" : \"=c\"(out) : \"c\"(in));`): {stmt}")
    };
    let inner = stmt.strip_prefix("asm(").and_then(|s| s.strip_suffix(");")).unwrap_or_else(|| unsupported());
    let parts: Vec<&str> = inner.split(':').map(str::trim).collect();
    let &[template, output, input] = parts.as_slice() else { unsupported() };
    let mnemonic = template
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix(" %0, %1;\""))
        .filter(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'))
        .unwrap_or_else(|| unsupported());
    // `"constraint"(expression)`: the expression, and whether the constraint marks an output.
    let operand = |op: &str| -> (bool, String) {
        let (constraint, expr) = op.split_once('(').unwrap_or_else(|| unsupported());
        let expr = expr.strip_suffix(')').unwrap_or_else(|| unsupported());
        let constraint = constraint.trim().trim_matches('"');
        (constraint.starts_with('='), expr.trim().to_string())
    };
    let (out_is_output, out) = operand(output);
    let (in_is_output, input) = operand(input);
    if !out_is_output || in_is_output {
        unsupported();
    }
    format!("{out} = ptx_{}({input});", mnemonic.replace('.', "_"))
}

/// `extern __shared__ T name[];` -> `T* name = (T*)emu_dynamic_shared;`.
fn rewrite_dynamic_shared(stmt: &str) -> String {
    let decl = stmt.strip_prefix("extern __shared__ ").and_then(|s| s.strip_suffix("[];")).map(str::trim);
    let (ty, name) = decl
        .and_then(|d| d.rsplit_once(' '))
        .filter(|(_, name)| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or_else(|| panic!("unsupported dynamic shared memory (want `extern __shared__ T name[];`): {stmt}"));
    format!("{ty}* {name} = ({ty}*)emu_dynamic_shared;")
}

/// The last `max` bytes of `s` (compiler errors can be long), on a char boundary.
fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
