//! Admitting one client request: the checks every request passes, whichever API it came by
//! (gRPC `Inference.Generate` and the OpenAI-compatible HTTP API both start requests here), then
//! its task (`requests`).
use std::time::Duration;

use switchyard_proto::v1 as pb;
use tonic::Status;
use worker::sampling::SamplingParams;

use super::CoordSvc;
use super::output::{MAX_STOP_BYTES, MAX_STOPS};
use super::requests::{Job, ResponseRx};
use crate::control::{ControlError, Serving};

impl CoordSvc {
    /// Validates `r` and starts it: the stream of its responses. `deadline` (from now) ends it
    /// with DEADLINE_EXCEEDED; a cluster that does not serve yet is waited for at most `wait`
    /// (not at all when it lacks room for an expert). Refused with RESOURCE_EXHAUSTED when
    /// `--max-queued-requests` requests are held already.
    pub(crate) async fn start_generate(&self, r: pb::GenerateRequest, deadline: Option<Duration>, wait: Duration) -> Result<ResponseRx, Status> {
        let deadline = deadline.map(|d| tokio::time::Instant::now() + d);
        self.require_leader()?;
        let permit = self.0.admission.try_admit().ok_or_else(|| {
            Status::resource_exhausted(format!("the coordinator holds {} requests already (--max-queued-requests); retry later", self.0.admission.limit()))
        })?;
        let prompt = self.prompt_ids(&r)?;
        let cfg = &self.0.cfg;
        if r.max_tokens == 0 {
            return Err(Status::invalid_argument("max_tokens must be at least 1"));
        }
        let max_pos = cfg.max_position_embeddings;
        if prompt.len() + r.max_tokens as usize > max_pos {
            return Err(Status::invalid_argument(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context of {max_pos} tokens",
                prompt.len(),
                r.max_tokens
            )));
        }
        self.check_output_options(&r)?;
        let s = r.sampling.unwrap_or_default();
        let sp = SamplingParams { temperature: s.temperature, top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p }, top_k: s.top_k as usize, seed: s.seed };
        sp.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut stop = r.stop_token_ids.clone();
        if stop.is_empty() && !r.ignore_eos {
            stop = cfg.eos_token_ids.clone();
        }
        // No room for every expert: refuse at once, naming what is missing. Otherwise wait
        // for the cluster to come up (start, or a generation being formed).
        let now = self.0.serving.borrow().clone();
        let limit = if matches!(now, Serving::NoRoom { .. }) { Duration::ZERO } else { wait };
        let serving = self.wait_serving(limit);
        let waited = match deadline {
            Some(d) => tokio::time::timeout_at(d, serving).await.map_err(|_| Status::deadline_exceeded("the request's deadline passed while the cluster was not serving"))?,
            None => serving.await,
        };
        if let Err(s) = waited {
            return Err(ControlError::NotServing(s.reason()).into());
        }
        let base = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt })),
            sampling: Some(pb::SamplingParams { temperature: sp.temperature, top_p: sp.top_p, top_k: sp.top_k as u32, seed: sp.seed }),
            stop_token_ids: stop,
            max_tokens: r.max_tokens,
            ignore_eos: r.ignore_eos,
            return_prompt_logits: r.return_prompt_logits,
            stop: vec![],
            logprobs: r.logprobs,
            top_logprobs: r.top_logprobs,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let job = Job { base, stops: r.stop, deadline, _permit: permit };
        tokio::spawn(self.clone().run_request(job, tx));
        Ok(rx)
    }

    /// The prompt as token ids, checked against the vocabulary.
    fn prompt_ids(&self, r: &pb::GenerateRequest) -> Result<Vec<u32>, Status> {
        let prompt = match &r.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => match &self.0.tok {
                Some(tok) => tok.encode(t).map_err(|e| Status::invalid_argument(e.to_string()))?,
                None => return Err(Status::invalid_argument("the model has no tokenizer.json: send token_ids")),
            },
            Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.clone(),
            None => return Err(Status::invalid_argument("no prompt: set text or token_ids")),
        };
        if prompt.is_empty() {
            return Err(Status::invalid_argument("empty prompt"));
        }
        let vocab = self.0.cfg.vocab_size;
        if let Some((i, t)) = prompt.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(Status::invalid_argument(format!("token id {t} at position {i} is out of range (vocab size {vocab})")));
        }
        Ok(prompt)
    }

    /// Stop strings and log-probability options.
    fn check_output_options(&self, r: &pb::GenerateRequest) -> Result<(), Status> {
        if r.stop.len() > MAX_STOPS {
            return Err(Status::invalid_argument(format!("at most {MAX_STOPS} stop strings (got {})", r.stop.len())));
        }
        if let Some(s) = r.stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(Status::invalid_argument(format!("a stop string must have 1 to {MAX_STOP_BYTES} bytes (got {})", s.len())));
        }
        if !r.stop.is_empty() && self.0.tok.is_none() {
            return Err(Status::invalid_argument("stop strings need the model's tokenizer.json"));
        }
        if r.top_logprobs > worker::service::MAX_TOP_LOGPROBS {
            return Err(Status::invalid_argument(format!("top_logprobs must be at most {} (got {})", worker::service::MAX_TOP_LOGPROBS, r.top_logprobs)));
        }
        if r.top_logprobs > 0 && !r.logprobs {
            return Err(Status::invalid_argument("top_logprobs needs logprobs"));
        }
        Ok(())
    }
}
