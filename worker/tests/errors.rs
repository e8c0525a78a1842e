//! Bad input: each a typed error naming the cause, never a panic.
use std::path::{Path, PathBuf};
use worker::engine::{Engine, EngineConfig, Request};
use worker::model::{LoadOptions, Model};
use worker::ModelError;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// Copy a checkpoint dir, keeping tensors for which `keep` is true and editing config.json.
fn rewrite(src: &Path, keep: impl Fn(&str) -> bool, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dst = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse");
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(n, _)| keep(n)).collect();
    safetensors::serialize_to_file(kept, None, &dst.path().join("model.safetensors")).expect("write");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("cfg")).expect("json");
    edit(&mut cfg);
    std::fs::write(dst.path().join("config.json"), cfg.to_string()).expect("write cfg");
    dst
}

#[test]
fn missing_tensor() {
    let d = rewrite(&fixture("mixtral"), |n| n != "model.layers.1.self_attn.k_proj.weight", |_| {});
    match Model::load(d.path(), &LoadOptions::default()) {
        Err(ModelError::MissingTensor { name }) => assert_eq!(name, "model.layers.1.self_attn.k_proj.weight"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn shape_disagrees_with_config() {
    let d = rewrite(&fixture("mixtral"), |_| true, |c| c["intermediate_size"] = 80.into());
    match Model::load(d.path(), &LoadOptions::default()) {
        Err(e @ ModelError::ShapeMismatch { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("[80, 64]") && msg.contains("[96, 64]"), "{msg}");
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn unknown_architecture() {
    let d = rewrite(&fixture("mixtral"), |_| true, |c| {
        c["model_type"] = "llama".into();
        c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    });
    match Model::load(d.path(), &LoadOptions::default()) {
        Err(ModelError::UnknownArchitecture(a)) => assert_eq!(a, "llama"),
        other => panic!("expected UnknownArchitecture, got {other:?}"),
    }
}

#[test]
fn unknown_rope_type_rejected() {
    let d = rewrite(&fixture("qwen3_moe_bf16"), |_| true, |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0});
    });
    match Model::load(d.path(), &LoadOptions::default()) {
        Err(ModelError::UnsupportedRope(t)) => assert_eq!(t, "dynamic"),
        other => panic!("expected UnsupportedRope, got {other:?}"),
    }
}

#[test]
fn missing_dir_and_bad_config() {
    assert!(matches!(Model::load(Path::new("/nonexistent/model"), &LoadOptions::default()), Err(ModelError::Io { .. })));
    let d = rewrite(&fixture("mixtral"), |_| true, |c| {
        c.as_object_mut().map(|o| o.remove("hidden_size"));
    });
    let e = Model::load(d.path(), &LoadOptions::default()).expect_err("no hidden_size");
    assert!(matches!(e, ModelError::Config { .. }) && e.to_string().contains("hidden_size"), "{e}");
}

fn engine() -> Engine {
    let m = Model::load(&fixture("mixtral"), &LoadOptions::default()).expect("load");
    Engine::new(std::sync::Arc::new(m), EngineConfig::default())
}

#[test]
fn token_out_of_vocab() {
    let mut e = engine();
    match e.add_request(Request::new(vec![1, 2, 256], 4)) {
        Err(ModelError::TokenOutOfRange { token, position, vocab_size }) => {
            assert_eq!((token, position, vocab_size), (256, 2, 256))
        }
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
}

#[test]
fn prompt_too_long() {
    let mut e = engine();
    match e.add_request(Request::new(vec![1; 513], 4)) {
        Err(ModelError::PromptTooLong { len, max }) => assert_eq!((len, max), (513, 512)),
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
}

#[test]
fn empty_prompt() {
    let mut e = engine();
    assert!(matches!(e.add_request(Request::new(vec![], 4)), Err(ModelError::EmptyPrompt)));
    let m = e.model().clone();
    let mut cache = m.new_cache();
    let r = m.forward(&mut [worker::SeqInput { tokens: &[], cache: &mut cache }], worker::LogitsMode::Last);
    assert!(matches!(r, Err(ModelError::EmptyPrompt)));
}

#[test]
fn bad_sampling_params() {
    let mut e = engine();
    let mut r = Request::new(vec![1, 2], 4);
    r.sampling.top_p = 0.0;
    assert!(matches!(e.add_request(r), Err(ModelError::InvalidSampling(_))));
}

#[test]
fn bad_expert_subset() {
    let dir = fixture("mixtral");
    let e = Model::load(&dir, &LoadOptions { experts: Some(vec![vec![0]]) }).expect_err("wrong layer count");
    assert!(matches!(e, ModelError::ExpertSubset(_)), "{e}");
    let e = Model::load(&dir, &LoadOptions { experts: Some(vec![vec![0], vec![8], vec![1]]) }).expect_err("range");
    assert!(matches!(e, ModelError::ExpertSubset(_)), "{e}");
}
