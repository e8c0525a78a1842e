//! The request bodies of the HTTP API (OpenAI's field names), and how their shared parameters
//! become one [`pb::GenerateRequest`] for the coordinator's request path.
use serde::Deserialize;
use switchyard_proto::v1 as pb;

use super::error::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of a completion: text or token ids, alone or as a list of one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What completions and chat completions share.
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub model: String,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// An extension (vLLM's): keep the `top_k` most likely tokens.
    pub top_k: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// An extension (vLLM's): generate until the token budget even after an end-of-sequence token.
    #[serde(default)]
    pub ignore_eos: bool,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: Common,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    /// Log-probabilities of each token and of this many alternatives.
    pub logprobs: Option<u32>,
    #[serde(default)]
    pub echo: bool,
}

/// `content` of a message: text, or a list of parts of which the text parts count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: Common,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
}

/// Most choices (`n`) one request may ask for.
pub const MAX_N: u32 = 16;

impl Common {
    pub fn stops(&self) -> Vec<String> {
        match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    pub fn n(&self) -> Result<u32, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::bad("n must be at least 1", Some("n"))),
            n if n > MAX_N => Err(ApiError::bad(format!("n must be at most {MAX_N}"), Some("n"))),
            n => Ok(n),
        }
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }

    /// The request of choice 0 (the caller sets prompt, max_tokens and log-probabilities).
    pub fn generate_request(&self) -> Result<pb::GenerateRequest, ApiError> {
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if v.is_some_and(|p| p != 0.0) {
                return Err(ApiError::bad(format!("{name} is not supported (only 0)"), Some(name)));
            }
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(ApiError::bad("stream_options needs stream: true", Some("stream_options")));
        }
        if let Some(t) = self.temperature
            && !(t.is_finite() && (0.0..=2.0).contains(&t))
        {
            return Err(ApiError::bad(format!("temperature {t} must be in [0, 2]"), Some("temperature")));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::bad(format!("top_p {p} must be in (0, 1]"), Some("top_p")));
        }
        Ok(pb::GenerateRequest {
            sampling: Some(pb::SamplingParams {
                // OpenAI's default temperature is 1 (sampling), not greedy.
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(0),
                // A negative seed (allowed by OpenAI's schema) is used by its bits.
                seed: self.seed.map(|s| s as u64),
            }),
            stop: self.stops(),
            ignore_eos: self.ignore_eos,
            ..Default::default()
        })
    }
}

impl ChatMessage {
    pub fn text(&self) -> Result<String, ApiError> {
        Ok(match &self.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                    return Err(ApiError::bad(format!("content parts of type {:?} are not supported (text only)", p.kind), Some("messages")));
                }
                parts.iter().map(|p| p.text.as_str()).collect()
            }
        })
    }
}
