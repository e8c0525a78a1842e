//! The OpenAI-compatible HTTP API of the coordinator (`--http-listen`): `POST /v1/completions`,
//! `POST /v1/chat/completions` (whole, or SSE with `stream: true`), `GET /v1/models`,
//! `GET /health`. It is a thin layer: every choice of a request runs through the coordinator's
//! one request path ([`crate::server::CoordSvc`]'s `start_generate`, as gRPC `Generate` does), so
//! routing, failover, stop strings, log-probabilities, the bounded queue and cancellation are
//! the same on both APIs. Axum on the hyper 1 / http 1 that tonic uses.
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::server::CoordSvc;
use choices::{Kind, Prepared};
use error::ApiError;
use template::{ChatTemplate, TemplateError, TemplateMessage};
use types::{ChatRequest, CompletionRequest, Prompt};

mod choices;
pub mod error;
mod stream;
pub mod template;
pub mod types;

/// Settings of the HTTP API.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The `model` clients name (and `/v1/models` lists).
    pub served_model_name: String,
}

struct Api {
    svc: CoordSvc,
    model: String,
    /// The checkpoint's chat template, or why there is none (chat requests get it as a 400).
    template: Result<ChatTemplate, TemplateError>,
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, svc: CoordSvc, cfg: HttpConfig) {
    let template = ChatTemplate::load(svc.model_dir());
    if let Err(e) = &template {
        tracing::info!("/v1/chat/completions refuses requests: {e}");
    }
    let api = Arc::new(Api { svc, model: cfg.served_model_name, template });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async { ApiError::bad("unknown path (the API has /v1/completions, /v1/chat/completions, /v1/models, /health)", None) })
        .with_state(api);
    // TCP_NODELAY: every SSE event is a small write; Nagle would hold it for the previous ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("the HTTP API stopped: {e}");
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A response id unique in this process and across restarts (time + counter).
fn new_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    format!("{prefix}-{t:x}{n:04x}")
}

fn json_response(v: serde_json::Value) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn health(State(api): State<Arc<Api>>) -> Response {
    match api.svc.takes_requests() {
        Ok(()) => json_response(json!({"status": "ok"})),
        Err(s) => ApiError::from(s).into_response(),
    }
}

async fn models(State(api): State<Arc<Api>>) -> Response {
    json_response(json!({
        "object": "list",
        "data": [{"id": api.model, "object": "model", "created": 0, "owned_by": "switchyard", "root": api.svc.model_dir().display().to_string()}],
    }))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}"), None))
}

impl Api {
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model { Ok(()) } else { Err(ApiError::UnknownModel(model.to_string())) }
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let tok = self.svc.tokenizer().ok_or_else(|| ApiError::bad("the model has no tokenizer.json: send the prompt as token ids", Some("prompt")))?;
        tok.encode(text).map_err(|e| ApiError::bad(format!("the prompt could not be tokenized: {e}"), Some("prompt")))
    }

    /// The token budget: as asked, or (chat) what the context leaves.
    fn budget(&self, asked: Option<u32>, default: Option<u32>, prompt_len: usize) -> Result<u32, ApiError> {
        let room = self.svc.model_config().max_position_embeddings.saturating_sub(prompt_len) as u32;
        match asked.or(default) {
            Some(0) => Err(ApiError::bad("max_tokens must be at least 1", Some("max_tokens"))),
            Some(n) => Ok(n),
            None if room == 0 => Err(ApiError::bad(format!("the prompt ({prompt_len} tokens) fills the context"), Some("messages"))),
            None => Ok(room),
        }
    }

    /// Starts the choices and answers whole or as a stream.
    async fn run(&self, p: Prepared) -> Result<Response, ApiError> {
        let streams = choices::start(&self.svc, &p).await?;
        if p.stream {
            return Ok(stream::sse(self.svc.clone(), p, streams).into_response());
        }
        Ok(json_response(choices::collect(&self.svc, &p, streams).await?))
    }

    fn prepared(&self, req: switchyard_proto::v1::GenerateRequest, common: &types::Common, kind: Kind) -> Result<Prepared, ApiError> {
        Ok(Prepared {
            req,
            n: common.n()?,
            kind,
            stream: common.stream,
            include_usage: common.include_usage(),
            id: new_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
            created: unix_now(),
            model: self.model.clone(),
        })
    }
}

async fn completions(State(api): State<Arc<Api>>, body: Bytes) -> Response {
    let r = async {
        let c: CompletionRequest = parse(&body)?;
        api.check_model(&c.common.model)?;
        if c.echo {
            return Err(ApiError::bad("echo is not supported", Some("echo")));
        }
        let ids = match c.prompt {
            Prompt::Text(t) => api.encode(&t)?,
            Prompt::Ids(ids) => ids,
            Prompt::Texts(mut v) if v.len() == 1 => api.encode(&v.remove(0))?,
            Prompt::IdLists(mut v) if v.len() == 1 => v.remove(0),
            _ => return Err(ApiError::bad("one prompt per request (use n for several choices)", Some("prompt"))),
        };
        let mut req = c.common.generate_request()?;
        // OpenAI's default for completions.
        req.max_tokens = api.budget(c.max_tokens, Some(16), ids.len())?;
        req.prompt = Some(switchyard_proto::v1::generate_request::Prompt::TokenIds(switchyard_proto::v1::TokenIds { ids }));
        if let Some(k) = c.logprobs {
            req.logprobs = true;
            req.top_logprobs = k;
        }
        let p = api.prepared(req, &c.common, Kind::Completion)?;
        api.run(p).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(api): State<Arc<Api>>, body: Bytes) -> Response {
    let r = async {
        let c: ChatRequest = parse(&body)?;
        api.check_model(&c.common.model)?;
        if c.messages.is_empty() {
            return Err(ApiError::bad("messages must not be empty", Some("messages")));
        }
        let template = api.template.as_ref().map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
        let messages = c.messages.iter().map(|m| Ok(TemplateMessage { role: m.role.clone(), content: m.text()? })).collect::<Result<Vec<_>, ApiError>>()?;
        let prompt = template.render(&messages).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
        let ids = api.encode(&prompt)?;
        let mut req = c.common.generate_request()?;
        req.max_tokens = api.budget(c.max_completion_tokens.or(c.max_tokens), None, ids.len())?;
        req.prompt = Some(switchyard_proto::v1::generate_request::Prompt::TokenIds(switchyard_proto::v1::TokenIds { ids }));
        if c.top_logprobs.is_some_and(|k| k > 0) && !c.logprobs {
            return Err(ApiError::bad("top_logprobs needs logprobs: true", Some("top_logprobs")));
        }
        req.logprobs = c.logprobs;
        req.top_logprobs = c.top_logprobs.unwrap_or(0);
        let p = api.prepared(req, &c.common, Kind::Chat)?;
        api.run(p).await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}
