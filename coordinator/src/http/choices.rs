//! Running the `n` choices of one HTTP request through the coordinator's request path
//! ([`CoordSvc::start_generate`], the one gRPC `Generate` uses) and shaping what they produce
//! as OpenAI's completion or chat completion objects: whole (`collect`) or as chunks (`chunk`).
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_proto::v1 as pb;

use super::error::ApiError;
use crate::server::CoordSvc;

/// Which of OpenAI's two shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// A parsed request, ready to start.
pub struct Prepared {
    pub req: pb::GenerateRequest,
    pub n: u32,
    pub kind: Kind,
    pub stream: bool,
    pub include_usage: bool,
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// Starts every choice (choice `i` with seed `seed + i`, so that `n` choices differ but a
/// seeded request is reproducible). A refused choice cancels those already started (dropped).
pub async fn start(svc: &CoordSvc, p: &Prepared) -> Result<Vec<tokio_stream::wrappers::ReceiverStream<Result<pb::GenerateResponse, tonic::Status>>>, ApiError> {
    let mut out = Vec::with_capacity(p.n as usize);
    for i in 0..p.n {
        let mut r = p.req.clone();
        if let Some(s) = r.sampling.as_mut() {
            s.seed = s.seed.map(|x| x.wrapping_add(i as u64));
        }
        // No waiting for a cluster that does not serve: 503 at once, clients retry.
        let rx = svc.start_generate(r, None, Duration::ZERO).await?;
        out.push(tokio_stream::wrappers::ReceiverStream::new(rx));
    }
    Ok(out)
}

pub fn finish_reason(code: i32) -> Option<&'static str> {
    match pb::FinishReason::try_from(code).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Unspecified => None,
        pb::FinishReason::Stop => Some("stop"),
        pb::FinishReason::Length | pb::FinishReason::ContextFull => Some("length"),
    }
}

/// One generated token's log-probabilities.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

impl TokenLogprob {
    pub fn of(svc: &CoordSvc, m: &pb::GenerateResponse) -> TokenLogprob {
        let text = svc.tokenizer().and_then(|t| t.decode(&[m.token_id]).ok()).unwrap_or_default();
        TokenLogprob { text, logprob: m.logprob, top: m.top_logprobs.iter().map(|t| (t.text.clone(), t.logprob)).collect() }
    }
}

/// `logprobs` of a choice in the given shape; `offset` is where the first token's text starts.
pub fn logprobs_json(kind: Kind, toks: &[TokenLogprob], mut offset: usize) -> Value {
    match kind {
        Kind::Completion => {
            let mut text_offset = Vec::with_capacity(toks.len());
            for t in toks {
                text_offset.push(offset);
                offset += t.text.len();
            }
            json!({
                "tokens": toks.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
                "token_logprobs": toks.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": toks.iter().map(|t| t.top.iter().map(|(s, l)| (s.clone(), json!(l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                "text_offset": text_offset,
            })
        }
        Kind::Chat => {
            let entry = |s: &str, l: f32| json!({"token": s, "logprob": l, "bytes": s.as_bytes()});
            let content: Vec<Value> = toks
                .iter()
                .map(|t| {
                    let mut e = entry(&t.text, t.logprob);
                    e["top_logprobs"] = Value::Array(t.top.iter().map(|(s, l)| entry(s, *l)).collect());
                    e
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
    }
}

pub fn usage_json(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// What one choice produced, whole.
#[derive(Default)]
struct Whole {
    text: String,
    toks: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    usage: (u32, u32),
}

/// Reads every choice to its end; the response object. The choices run at the same time (each
/// has its own task); reading them one after the other only orders the reading.
pub async fn collect(
    svc: &CoordSvc,
    p: &Prepared,
    streams: Vec<tokio_stream::wrappers::ReceiverStream<Result<pb::GenerateResponse, tonic::Status>>>,
) -> Result<Value, ApiError> {
    use tokio_stream::StreamExt;
    let mut choices = Vec::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut w = Whole::default();
        while let Some(m) = s.next().await {
            let m = m?;
            if p.req.logprobs {
                w.toks.push(TokenLogprob::of(svc, &m));
            }
            w.text.push_str(&m.text);
            if let Some(u) = m.usage {
                w.usage = (u.prompt_tokens, u.completion_tokens);
            }
            if let Some(f) = finish_reason(m.finish_reason) {
                w.finish = Some(f);
                break;
            }
        }
        prompt_tokens = w.usage.0;
        completion_tokens += w.usage.1;
        let logprobs = if p.req.logprobs { logprobs_json(p.kind, &w.toks, 0) } else { Value::Null };
        choices.push(match p.kind {
            Kind::Completion => json!({"index": i, "text": w.text, "logprobs": logprobs, "finish_reason": w.finish}),
            Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": w.text}, "logprobs": logprobs, "finish_reason": w.finish}),
        });
    }
    let object = if p.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Ok(json!({
        "id": p.id, "object": object, "created": p.created, "model": p.model,
        "choices": choices, "usage": usage_json(prompt_tokens, completion_tokens),
    }))
}

/// One streamed chunk with these choices (each with its index, text or delta, logprobs and
/// finish_reason); `usage` only in the last chunk, and only with `include_usage`.
pub fn chunk(p: &Prepared, choices: Vec<Value>, usage: Option<Value>) -> Value {
    let object = if p.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let mut c = json!({"id": p.id, "object": object, "created": p.created, "model": p.model, "choices": choices});
    if p.include_usage {
        c["usage"] = usage.unwrap_or(Value::Null);
    }
    c
}
