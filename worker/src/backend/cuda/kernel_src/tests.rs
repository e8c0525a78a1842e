//! Checks of the generated text: entry points against the ABI table, constants, self-containment.

use super::*;

const ENTRY: &str = "extern \"C\" __global__ void ";

/// `(name, parameter types)` of every entry point, in source order.
fn entry_points(src: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find(ENTRY) {
        let after = &rest[at + ENTRY.len()..];
        let open = after.find('(').expect("entry point without a parameter list");
        // Parameter lists hold no parentheses, so the first ')' closes the list.
        let close = open + after[open..].find(')').expect("unclosed parameter list");
        let name = after[..open].trim().to_string();
        let params = after[open + 1..close].split(',').map(param_type).collect();
        found.push((name, params));
        rest = &after[close..];
    }
    found
}

/// The type of one C parameter declaration: everything but the trailing name, spaces normalised.
fn param_type(decl: &str) -> String {
    let decl = decl.split_whitespace().collect::<Vec<_>>().join(" ");
    decl.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || c == '_').trim_end().to_string()
}

/// The ABI table of the kernel spec, parameter types only.
fn expected() -> Vec<(String, Vec<&'static str>)> {
    const F: &str = "float";
    const I: &str = "int";
    const LL: &str = "long long";
    const CF: &str = "const float*";
    const CI: &str = "const int*";
    const PF: &str = "float*";
    let mut e: Vec<(String, Vec<&'static str>)> = Vec::new();
    for (suffix, table) in [("f32", "const float*"), ("bf16", "const unsigned short*"), ("f16", "const unsigned short*")] {
        e.push((format!("embed_rows_{suffix}"), vec![table, "const unsigned int*", PF, I, I]));
    }
    for suffix in ["bf16", "f16"] {
        e.push((format!("cast_f32_{suffix}"), vec![CF, "unsigned short*", LL]));
    }
    let fixed: Vec<(&str, Vec<&'static str>)> = vec![
        ("rmsnorm", vec![CF, CF, PF, I, I, F]),
        ("add_inplace", vec![PF, CF, LL]),
        ("add_bias", vec![PF, CF, I, I]),
        ("clamp_inplace", vec![PF, LL, F]),
        ("rope", vec![PF, CI, CF, I, I, I, I, I, F, I]),
        ("silu_mul", vec![CF, PF, I, I]),
        ("kv_write", vec![CF, PF, CI, I, I]),
        ("attention", vec![CF, CF, CF, CI, CI, CI, CI, PF, I, I, I, I, I, F, I]),
        (
            "route_topk",
            vec![CF, CF, PF, "unsigned int*", PF, I, I, I, I, I, I, I, I, F, I, F, F],
        ),
        ("gather_rows", vec![CF, CI, PF, I, I]),
        ("combine_rows", vec![CF, CI, CF, PF, I, I, I]),
        ("shared_gate", vec![CF, CF, PF, I, I]),
        ("split_cols", vec![CF, PF, PF, I, I, I]),
        ("mla_assemble", vec![CF, CF, PF, PF, I, I, I, I, I]),
        ("moe_align", vec!["const unsigned int*", I, I, I, "int*", "int*", "int*", "int*"]),
    ];
    e.extend(fixed.into_iter().map(|(n, p)| (n.to_string(), p)));
    for suffix in ["f32", "bf16", "f16"] {
        e.push((format!("expert_gemm_{suffix}"), vec![CF, CI, I, "const unsigned long long*", CI, PF, I, I, "int*"]));
    }
    e
}

#[test]
fn every_kernel_is_defined_exactly_once() {
    let src = source();
    for name in KERNELS {
        let decl = format!("{ENTRY}{name}(");
        assert_eq!(src.matches(&decl).count(), 1, "{name}: want exactly one `{decl}`");
    }
    // No entry point outside KERNELS, and no __global__ declared some other way.
    let mut names: Vec<String> = entry_points(&src).into_iter().map(|(n, _)| n).collect();
    let mut want: Vec<String> = KERNELS.iter().map(|s| s.to_string()).collect();
    names.sort_unstable();
    want.sort_unstable();
    assert_eq!(names, want);
    assert_eq!(src.matches("__global__").count(), KERNELS.len());
}

#[test]
fn kernel_names_are_unique() {
    let mut names = KERNELS.to_vec();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), KERNELS.len());
}

#[test]
fn parameter_lists_match_the_abi() {
    let found = entry_points(&source());
    let want = expected();
    assert_eq!(found.len(), want.len(), "entry points in the source vs the ABI table");
    for (name, want_params) in &want {
        let (_, params) = found.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(params, want_params, "{name}: parameter types differ from the ABI");
    }
}

#[test]
fn param_type_strips_only_the_name() {
    assert_eq!(param_type(" const unsigned  short* table"), "const unsigned short*");
    assert_eq!(param_type("long long n"), "long long");
    assert_eq!(param_type("int rows"), "int");
}

#[test]
fn source_is_self_contained() {
    let src = source();
    assert!(!src.contains("#include"), "NVRTC source must not include headers");
    assert!(!src.contains("half.h") && !src.contains("cuda_bf16"));
}

#[test]
fn no_fast_math_intrinsics() {
    let src = source();
    for banned in ["__expf", "__sinf", "__cosf", "rsqrtf", "__fdividef", "__logf", "__powf", "__fsqrt"] {
        assert!(!src.contains(banned), "source uses {banned}; the CPU reference uses IEEE functions");
    }
    assert!(src.contains("1.0f / sqrtf(ss + eps)"));
}

/// `src` without `//` comments and string-literal contents: what the compiler parses.
fn code_only(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let mut in_string = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' => in_string = !in_string,
                '/' if !in_string && chars.peek() == Some(&'/') => break,
                _ if in_string => {}
                _ => out.push(c),
            }
        }
        out.push('\n');
    }
    out
}

#[test]
fn brackets_balance() {
    let code = code_only(&source());
    for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
        let mut depth = 0i64;
        for (line_no, line) in code.lines().enumerate() {
            for c in line.chars() {
                if c == open {
                    depth += 1;
                } else if c == close {
                    depth -= 1;
                }
                assert!(depth >= 0, "unmatched {close} at source line {}", line_no + 1);
            }
        }
        assert_eq!(depth, 0, "unbalanced {open}{close}");
    }
}

#[test]
fn code_only_drops_comments_and_strings() {
    assert_eq!(code_only("a(b); // v[0..n)\nasm(\"{ x }\" : \"=f\"(f));\n"), "a(b); \nasm( : (f));\n");
}

#[test]
fn constants_are_substituted() {
    let src = source();
    assert!(src.contains(&format!("float acc[{ATTENTION_ACC}];")));
    assert_eq!(ATTENTION_ACC, 4);
    assert!(src.contains(&format!("blockDim.x != {ATTENTION_BLOCK}")));
    assert!(src.contains(&format!("vd > {MAX_ATTENTION_VD}")));
    assert!(src.contains(&format!("__shared__ float buf[{}];", 2 * MAX_ROPE_HALF)));
    assert!(src.contains(&format!("half > {MAX_ROPE_HALF}")));
    // No format! placeholder survived unsubstituted.
    assert!(!src.contains("{b}") && !src.contains("{n_acc}") && !src.contains('$'));
}

#[test]
fn dtype_variants_load_through_their_converter() {
    let src = source();
    let body = |name: &str| {
        let at = src.find(&format!("{ENTRY}{name}(")).unwrap();
        let end = src[at..].find("\n}\n").unwrap();
        src[at..at + end].to_string()
    };
    assert!(body("embed_rows_f32").contains("dst[i] = src[i];"));
    assert!(body("embed_rows_bf16").contains("dst[i] = bf16_to_f32(src[i]);"));
    assert!(body("embed_rows_f16").contains("dst[i] = f16_to_f32(src[i]);"));
    assert!(body("cast_f32_bf16").contains("f32_to_bf16(x[i])"));
    assert!(body("cast_f32_f16").contains("f32_to_f16(x[i])"));
}

#[test]
fn reductions_use_full_warp_shuffles() {
    let src = source();
    assert!(src.contains("__shfl_xor_sync(0xffffffff, v, o)"));
    // Every kernel that reduces over the block declares the 33-slot scratch block_sum expects.
    let uses = src.matches("block_sum(").count() - 1; // minus the definition
    assert_eq!(uses, src.matches("__shared__ float red[33];").count());
}

/// Compiles the source with `nvcc` when one is on PATH; says so when it is skipped.
#[test]
fn compiles_with_nvcc_when_available() {
    let Some(nvcc) = find_on_path("nvcc") else {
        println!("skipped: no nvcc on PATH");
        return;
    };
    let dir = std::env::temp_dir().join(format!("switchyard-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cu = dir.join("kernels.cu");
    std::fs::write(&cu, source()).unwrap();
    let out = std::process::Command::new(nvcc)
        .arg("-ptx")
        .arg(&cu)
        .arg("-o")
        .arg(dir.join("kernels.ptx"))
        .output()
        .expect("run nvcc");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "nvcc failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn find_on_path(exe: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(exe)).find(|p| p.is_file())
}
