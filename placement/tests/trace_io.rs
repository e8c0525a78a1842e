use std::collections::HashMap;
use std::path::{Path, PathBuf};

use placement::trace::read_logical_count;
use placement::{RoutingTrace, TraceError};
use safetensors::tensor::{Dtype, TensorView};

fn tiny() -> RoutingTrace {
    // 3 tokens, 2 layers, k = 2, 4 experts
    RoutingTrace {
        num_experts: 4,
        num_layers: 2,
        top_k: 2,
        topk_ids: vec![0, 1, 2, 3, 1, 2, 3, 0, 3, 2, 0, 1],
        topk_weights: Some(vec![0.6, 0.4, 0.7, 0.3, 0.5, 0.5, 0.9, 0.1, 0.8, 0.2, 0.55, 0.45]),
        seq_ids: Some(vec![7, 7, -3]),
    }
}

enum T<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// Writes a safetensors file with arbitrary tensors (to build malformed traces).
fn write_raw(dir: &Path, name: &str, tensors: &[(&str, Vec<usize>, T<'_>)], num_experts: Option<&str>) -> PathBuf {
    let bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, shape, t)| {
            let (d, b): (Dtype, Vec<u8>) = match t {
                T::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                T::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                T::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                T::F64(v) => (Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            };
            (n.to_string(), d, shape.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = num_experts.map(|n| HashMap::from([("num_experts".to_string(), n.to_string())]));
    let bytes = safetensors::serialize(views, meta).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    let t = tiny();
    t.write(&p).unwrap();
    assert_eq!(RoutingTrace::read(&p).unwrap(), t);
    // without optional tensors
    let bare = RoutingTrace { topk_weights: None, seq_ids: None, ..tiny() };
    bare.write(&p).unwrap();
    let back = RoutingTrace::read(&p).unwrap();
    assert_eq!(back, bare);
    assert_eq!(back.seq_id(2), 2);
}

#[test]
fn i64_ids_and_inferred_num_experts() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<i64> = vec![0, 1, 2, 5];
    let p = write_raw(dir.path(), "a.st", &[("topk_ids", vec![2, 1, 2], T::I64(&ids))], None);
    let t = RoutingTrace::read(&p).unwrap();
    assert_eq!(t.num_experts, 6); // max id + 1
    assert_eq!(t.topk_ids, vec![0, 1, 2, 5]);
    let p = write_raw(dir.path(), "b.st", &[("topk_ids", vec![2, 1, 2], T::I64(&ids))], Some("64"));
    assert_eq!(RoutingTrace::read(&p).unwrap().num_experts, 64);
}

fn expect_bad_tensor(r: Result<RoutingTrace, TraceError>, tensor: &str, needle: &str) {
    match r {
        Err(TraceError::BadTensor { name, reason }) => {
            assert_eq!(name, tensor);
            assert!(reason.contains(needle), "reason {reason:?} lacks {needle:?}");
        }
        other => panic!("expected BadTensor({tensor}) containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn malformed_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ids = [0i32, 1, 2, 3];
    // wrong rank
    let p = write_raw(d, "rank.st", &[("topk_ids", vec![2, 2], T::I32(&ids))], Some("4"));
    expect_bad_tensor(RoutingTrace::read(&p), "topk_ids", "rank 3");
    // wrong dtype
    let f = [0.0f32; 4];
    let p = write_raw(d, "dtype.st", &[("topk_ids", vec![2, 1, 2], T::F32(&f))], Some("4"));
    expect_bad_tensor(RoutingTrace::read(&p), "topk_ids", "not I32 or I64");
    // mismatched weights shape
    let w = [0.5f32; 4];
    let p = write_raw(
        d,
        "wshape.st",
        &[("topk_ids", vec![2, 1, 2], T::I32(&ids)), ("topk_weights", vec![1, 2, 2], T::F32(&w))],
        Some("4"),
    );
    expect_bad_tensor(RoutingTrace::read(&p), "topk_weights", "does not match");
    // weights wrong dtype
    let w64 = [0.5f64; 4];
    let p = write_raw(
        d,
        "wdtype.st",
        &[("topk_ids", vec![2, 1, 2], T::I32(&ids)), ("topk_weights", vec![2, 1, 2], T::F64(&w64))],
        Some("4"),
    );
    expect_bad_tensor(RoutingTrace::read(&p), "topk_weights", "not F32");
    // id out of range
    let p = write_raw(d, "range.st", &[("topk_ids", vec![2, 1, 2], T::I32(&[0, 1, 2, 4]))], Some("4"));
    expect_bad_tensor(RoutingTrace::read(&p), "topk_ids", "topk_ids[1, 0, 1] = 4 is out of range");
    // negative id
    let p = write_raw(d, "neg.st", &[("topk_ids", vec![2, 1, 2], T::I32(&[0, -1, 2, 3]))], Some("4"));
    expect_bad_tensor(RoutingTrace::read(&p), "topk_ids", "negative");
    // NaN, infinite, negative weights
    for (name, bad) in [("nan", f32::NAN), ("inf", f32::INFINITY), ("negw", -0.1)] {
        let w = [0.5f32, bad, 0.5, 0.5];
        let p = write_raw(
            d,
            &format!("{name}.st"),
            &[("topk_ids", vec![2, 1, 2], T::I32(&ids)), ("topk_weights", vec![2, 1, 2], T::F32(&w))],
            Some("4"),
        );
        expect_bad_tensor(RoutingTrace::read(&p), "topk_weights", "topk_weights[0, 0, 1]");
    }
    // seq_ids wrong length
    let p = write_raw(
        d,
        "seq.st",
        &[("topk_ids", vec![2, 1, 2], T::I32(&ids)), ("seq_ids", vec![3], T::I64(&[0, 1, 2]))],
        Some("4"),
    );
    expect_bad_tensor(RoutingTrace::read(&p), "seq_ids", "one per token");
}

#[test]
fn missing_topk_ids_zero_tokens_bad_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = write_raw(d, "missing.st", &[("something_else", vec![2], T::I32(&[1, 2]))], Some("4"));
    match RoutingTrace::read(&p) {
        Err(TraceError::MissingTensor { name, .. }) => assert_eq!(name, "topk_ids"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    let p = write_raw(d, "zero.st", &[("topk_ids", vec![0, 2, 2], T::I32(&[]))], Some("4"));
    match RoutingTrace::read(&p) {
        Err(TraceError::Invalid(m)) => assert!(m.contains("zero tokens"), "{m}"),
        other => panic!("expected Invalid(zero tokens), got {other:?}"),
    }
    let p = write_raw(d, "meta.st", &[("topk_ids", vec![1, 1, 1], T::I32(&[0]))], Some("many"));
    match RoutingTrace::read(&p) {
        Err(TraceError::Invalid(m)) => assert!(m.contains("num_experts"), "{m}"),
        other => panic!("expected Invalid(num_experts), got {other:?}"),
    }
}

#[test]
fn truncated_and_garbage_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    tiny().write(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    for cut in [0, 3, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        match RoutingTrace::read(&p) {
            Err(TraceError::Safetensors { path, .. }) => assert_eq!(path, p),
            other => panic!("truncated at {cut}: expected Safetensors error, got {other:?}"),
        }
    }
    let garbage: Vec<u8> = (0..500u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&p, &garbage).unwrap();
    assert!(matches!(RoutingTrace::read(&p), Err(TraceError::Safetensors { .. })));
    std::fs::write(&p, b"{\"not\": \"safetensors\"}").unwrap();
    assert!(matches!(RoutingTrace::read(&p), Err(TraceError::Safetensors { .. })));
    assert!(matches!(RoutingTrace::read(&dir.path().join("nope")), Err(TraceError::Io { .. })));
}

#[test]
fn validate_in_memory() {
    tiny().validate().unwrap();
    let cases: Vec<(RoutingTrace, &str)> = vec![
        (RoutingTrace { topk_ids: vec![], topk_weights: None, seq_ids: None, ..tiny() }, "no tokens"),
        (RoutingTrace { topk_ids: vec![0; 5], topk_weights: None, seq_ids: None, ..tiny() }, "multiple"),
        (RoutingTrace { num_experts: 3, ..tiny() }, "out of range"),
        (RoutingTrace { topk_weights: Some(vec![0.5; 11]), ..tiny() }, "topk_weights has 11"),
        (RoutingTrace { seq_ids: Some(vec![0]), ..tiny() }, "seq_ids has 1"),
        (RoutingTrace { num_layers: 0, ..tiny() }, "num_layers"),
        (RoutingTrace { top_k: 0, ..tiny() }, "top_k"),
    ];
    for (t, needle) in cases {
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    }
    let mut t = tiny();
    t.topk_weights.as_mut().unwrap()[3] = f32::NAN;
    assert!(t.validate().unwrap_err().to_string().contains("topk_weights[0, 1, 1]"));
    // write refuses invalid traces instead of producing an unreadable file
    let dir = tempfile::tempdir().unwrap();
    assert!(t.write(&dir.path().join("x")).is_err());
}

fn write_text(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn jsonl_import() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"{"problem_id": "a", "layer": 0, "experts": [3, 1], "token_idx": 0}
{"problem_id": "a", "layer": 1, "experts": [2, 0], "token_idx": 0}

{"problem_id": 5, "layer": 1, "experts": [1, 2], "token_idx": 0}
{"problem_id": "a", "layer": 0, "experts": [0, 2], "token_idx": 1}
{"problem_id": 5, "layer": 0, "experts": [0, 3], "token_idx": 0}
{"problem_id": "a", "layer": 1, "experts": [1, 3], "token_idx": 1}
"#;
    let p = write_text(dir.path(), "good.jsonl", text);
    let t = RoutingTrace::import_jsonl(&p, None).unwrap();
    assert_eq!((t.num_layers, t.top_k, t.num_experts, t.num_tokens()), (2, 2, 4, 3));
    // tokens in order of first appearance: (a,0), (5,0), (a,1)
    assert_eq!(t.topk_ids, vec![3, 1, 2, 0, 0, 3, 1, 2, 0, 2, 1, 3]);
    assert_eq!(t.seq_ids, Some(vec![0, 1, 0]));
    assert_eq!(RoutingTrace::import_jsonl(&p, Some(16)).unwrap().num_experts, 16);
    match RoutingTrace::import_jsonl(&p, Some(3)) {
        Err(TraceError::BadLine { line, reason, .. }) => {
            assert_eq!(line, 1);
            assert!(reason.contains("out of range"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // "5" (string) and 5 (int) are different problems
    let p = write_text(
        dir.path(),
        "ids.jsonl",
        "{\"problem_id\": \"5\", \"layer\": 0, \"experts\": [0], \"token_idx\": 0}\n{\"problem_id\": 5, \"layer\": 0, \"experts\": [1], \"token_idx\": 0}\n",
    );
    assert_eq!(RoutingTrace::import_jsonl(&p, None).unwrap().seq_ids, Some(vec![0, 1]));
}

#[test]
fn jsonl_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // missing layer
    let p = write_text(
        d,
        "missing.jsonl",
        r#"{"problem_id": "a", "layer": 0, "experts": [3, 1], "token_idx": 0}
{"problem_id": "a", "layer": 1, "experts": [2, 0], "token_idx": 0}
{"problem_id": "q7", "layer": 0, "experts": [0, 2], "token_idx": 4}
"#,
    );
    match RoutingTrace::import_jsonl(&p, None) {
        Err(TraceError::Invalid(m)) => {
            assert!(m.contains("problem \"q7\" token 4") && m.contains("layer 1"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // bad JSON on line 3 (line 2 blank)
    let p = write_text(
        d,
        "badjson.jsonl",
        "{\"problem_id\": 1, \"layer\": 0, \"experts\": [0], \"token_idx\": 0}\n\n{\"problem_id\": 1, \"layer\": \n",
    );
    match RoutingTrace::import_jsonl(&p, None) {
        Err(TraceError::BadLine { line, reason, .. }) => {
            assert_eq!(line, 3);
            assert!(reason.contains("invalid JSON"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // inconsistent k
    let p = write_text(
        d,
        "k.jsonl",
        "{\"problem_id\": 1, \"layer\": 0, \"experts\": [0, 1], \"token_idx\": 0}\n{\"problem_id\": 1, \"layer\": 1, \"experts\": [0, 1, 2], \"token_idx\": 0}\n",
    );
    match RoutingTrace::import_jsonl(&p, None) {
        Err(TraceError::BadLine { line, reason, .. }) => {
            assert_eq!(line, 2);
            assert!(reason.contains("line 1 has 2"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // duplicate layer, missing field, negative expert, bad problem_id, empty file
    let cases = [
        ("{\"problem_id\": 1, \"layer\": 0, \"experts\": [0], \"token_idx\": 0}\n{\"problem_id\": 1, \"layer\": 0, \"experts\": [1], \"token_idx\": 0}\n", 2, "appears twice"),
        ("{\"problem_id\": 1, \"layer\": 0, \"token_idx\": 0}\n", 1, "missing field `experts`"),
        ("{\"problem_id\": 1, \"layer\": 0, \"experts\": [-1], \"token_idx\": 0}\n", 1, "non-negative"),
        ("{\"problem_id\": [1], \"layer\": 0, \"experts\": [1], \"token_idx\": 0}\n", 1, "problem_id"),
        ("{\"problem_id\": 1, \"layer\": -2, \"experts\": [1], \"token_idx\": 0}\n", 1, "layer"),
        ("[1, 2]\n", 1, "object"),
    ];
    for (i, (text, want_line, needle)) in cases.iter().enumerate() {
        let p = write_text(d, &format!("c{i}.jsonl"), text);
        match RoutingTrace::import_jsonl(&p, None) {
            Err(TraceError::BadLine { line, reason, .. }) => {
                assert_eq!(line, *want_line, "case {i}");
                assert!(reason.contains(needle), "case {i}: {reason}");
            }
            other => panic!("case {i}: {other:?}"),
        }
    }
    let p = write_text(d, "empty.jsonl", "\n\n");
    assert!(matches!(RoutingTrace::import_jsonl(&p, None), Err(TraceError::Invalid(_))));
}

#[test]
fn logical_count_variants() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = write_text(d, "a.json", "[[1, 2, 3], [4, 5, 6]]");
    assert_eq!(read_logical_count(&p).unwrap(), vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]);
    let p = write_text(d, "b.json", r#"{"logical_count": [[1, 2], [3, 4]], "other": 1}"#);
    assert_eq!(read_logical_count(&p).unwrap(), vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
    let p = write_text(d, "c.json", r#"{"logical_count": [[[1, 2], [3, 4]], [[10, 20], [30, 40.5]]]}"#);
    assert_eq!(read_logical_count(&p).unwrap(), vec![vec![11.0, 22.0], vec![33.0, 44.5]]);
    let bad = [
        ("[[1, \"x\"], [3, 4]]", "not a number"),
        ("[[1, 2], [3]]", "ragged"),
        ("[[1, 2], 3]", "not an array"),
        ("[[1, -2], [3, 4]]", "negative"),
        (r#"{"counts": [[1]]}"#, "logical_count"),
        (r#"{"logical_count": [[[1, 2]], [[1, 2], [3, 4]]]}"#, "ragged"),
        ("[]", "empty"),
        ("[[]]", "no experts"),
        ("42", "expected"),
        ("[[1, 2]", "invalid JSON"),
    ];
    for (i, (text, needle)) in bad.iter().enumerate() {
        let p = write_text(d, &format!("bad{i}.json"), text);
        let e = read_logical_count(&p).unwrap_err().to_string();
        assert!(e.contains(needle), "case {i} {text}: {e:?} lacks {needle:?}");
    }
}

#[test]
fn split_by_sequence_keeps_sequences_whole() {
    let t = RoutingTrace {
        num_experts: 4,
        num_layers: 1,
        top_k: 1,
        topk_ids: (0..40).map(|i| i % 4).collect(),
        topk_weights: Some(vec![1.0; 40]),
        seq_ids: Some((0..40).map(|i| i / 4).collect()), // 10 sequences of 4 tokens
    };
    let (keep, held) = t.split_by_sequence(0.3, 42);
    assert_eq!(keep.num_tokens() + held.num_tokens(), 40);
    assert_eq!(held.num_tokens(), 12); // 3 whole sequences
    keep.validate().unwrap();
    held.validate().unwrap();
    let ks: std::collections::HashSet<i64> = keep.sequences().into_iter().collect();
    let hs: std::collections::HashSet<i64> = held.sequences().into_iter().collect();
    assert!(ks.is_disjoint(&hs));
    assert_eq!(hs.len(), 3);
    // token contents follow their sequence
    for tt in 0..held.num_tokens() {
        let s = held.seq_id(tt);
        assert_eq!(held.experts(tt, 0)[0] as i64, (s * 4 + (tt as i64 % 4)) % 4);
    }
    assert_eq!(t.split_by_sequence(0.3, 42), (keep, held));
    assert_ne!(t.split_by_sequence(0.3, 42).1.sequences(), t.split_by_sequence(0.3, 7).1.sequences());
    // tiny fractions still hold out one sequence, large ones keep one
    assert_eq!(t.split_by_sequence(0.01, 1).1.sequences().len(), 1);
    assert_eq!(t.split_by_sequence(0.99, 1).0.sequences().len(), 1);
    assert_eq!(t.split_by_sequence(0.0, 1).1.num_tokens(), 0);
}

#[test]
fn mutated_bytes_never_panic() {
    let bytes = tiny().to_bytes().unwrap();
    let path = Path::new("mutated.safetensors");
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..5000 {
        let mut b = bytes.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        if next() % 5 == 0 {
            b.truncate((next() % b.len() as u64) as usize);
        }
        // any outcome but a panic is fine; an accepted trace must be valid
        if let Ok(t) = RoutingTrace::from_bytes(&b, path) {
            t.validate().unwrap();
        }
    }
}
