//! The client API (`Inference`) and registration (`Control`) of the coordinator, and how one
//! request runs: routed to the least loaded rank, continued elsewhere from where it stopped when
//! its rank fails (`control::router`).
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::control_server::Control;
use switchyard_proto::v1::inference_server::Inference;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use worker::sampling::SamplingParams;

use super::{BoxStream, CoordSvc, RankRoute};
use crate::control::router::{self, AttemptFailure};
use crate::control::{ControlError, Serving, WorkerInfo};

/// `req` continued after `generated` tokens: prompt `prompt ++ generated`, the token budget
/// shrunk by as many, no prompt logits (they were sent, or the request moved before any token).
pub fn continuation(req: &pb::GenerateRequest, mut prompt: Vec<u32>, generated: &[u32]) -> pb::GenerateRequest {
    prompt.extend_from_slice(generated);
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt })),
        max_tokens: req.max_tokens.saturating_sub(generated.len() as u32),
        return_prompt_logits: false,
        ..req.clone()
    }
}

impl CoordSvc {
    /// The routable rank with the least outstanding tokens.
    pub(crate) fn pick_rank(&self) -> Option<RankRoute> {
        let routes = self.routes();
        let r = router::least_outstanding(routes.iter().map(|r| (r.rank, r.outstanding.load(Ordering::SeqCst))))?;
        routes.into_iter().find(|x| x.rank == r)
    }

    /// The ranks of the active generation that take requests, with their links.
    pub(crate) fn routes(&self) -> Vec<RankRoute> {
        let ranks: Vec<(usize, WorkerInfo)> = self.group(|g| g.routable().into_iter().map(|(r, w)| (r, w.clone())).collect());
        ranks
            .into_iter()
            .filter_map(|(rank, w)| {
                let l = self.link(&w.id, &w.grpc).ok()?;
                Some(RankRoute { rank, id: w.id, client: l.client, outstanding: l.outstanding })
            })
            .collect()
    }

    /// Waits until the cluster serves (at most `limit`); the reason it does not otherwise.
    pub(crate) async fn wait_serving(&self, limit: Duration) -> Result<(), Serving> {
        let mut rx = self.0.serving.subscribe();
        let r = tokio::time::timeout(limit, rx.wait_for(|s| s.is_serving())).await;
        match r {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.0.serving.borrow().clone()),
        }
    }

    /// Streams one accepted request from its home rank to `tx`. When the rank fails (it died, or
    /// its group is re-forming), the request continues on a live rank from where it stopped
    /// (prompt + tokens streamed so far), so the client sees one sequence; it ends with its tokens
    /// or a terminal status (`router::after_failure`), never in silence.
    pub(crate) async fn run_request(self, base: pb::GenerateRequest, tx: tokio::sync::mpsc::Sender<Result<pb::GenerateResponse, Status>>) {
        let m = &self.0.metrics;
        m.in_flight.add(1.0);
        let prompt = match &base.prompt {
            Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.clone(),
            _ => vec![],
        };
        let mut generated: Vec<u32> = Vec::new();
        let outcome;
        let mut attempt = 0usize;
        loop {
            let (failure, st) = match self.attempt(&base, &prompt, &mut generated, &tx).await {
                Ok(()) => {
                    outcome = "completed";
                    break;
                }
                Err(f) => f,
            };
            match router::after_failure(attempt, failure, generated.len(), base.return_prompt_logits) {
                router::Next::Retry(pause) => {
                    tracing::warn!(attempt, generated = generated.len(), "request moves to another rank: {}", st.message());
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                router::Next::Fail => {
                    outcome = if failure == AttemptFailure::Rejected { "invalid" } else { "failed" };
                    let _ = tx.send(Err(st)).await;
                    break;
                }
            }
        }
        m.in_flight.add(-1.0);
        m.request(outcome);
    }

    /// One attempt of a request on one rank: `Ok` once it finished (or the client went away).
    pub(crate) async fn attempt(
        &self,
        base: &pb::GenerateRequest,
        prompt: &[u32],
        generated: &mut Vec<u32>,
        tx: &tokio::sync::mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<(), (AttemptFailure, Status)> {
        if let Err(s) = self.wait_serving(router::WAIT_FOR_SERVING).await {
            return Err((AttemptFailure::NotServing, ControlError::NotServing(s.reason()).into()));
        }
        let Some(route) = self.pick_rank() else {
            return Err((AttemptFailure::NotServing, Status::unavailable("no live worker (retry)")));
        };
        let req = if generated.is_empty() { base.clone() } else { continuation(base, prompt.to_vec(), generated) };
        let mut left = req.max_tokens as u64;
        route.outstanding.fetch_add(left, Ordering::SeqCst);
        let tokens = self.0.metrics.tokens(route.rank);
        let streamed: Result<(), Status> = async {
            let mut stream = route.client().generate(req).await?.into_inner();
            loop {
                let Some(mut msg) = stream.message().await? else {
                    return Err(Status::unavailable("the worker's stream ended before the request finished"));
                };
                if msg.prompt_logits.is_empty() {
                    generated.push(msg.token_id);
                    msg.index = generated.len() as u32 - 1;
                    left = left.saturating_sub(1);
                    route.outstanding.fetch_sub(1, Ordering::SeqCst);
                    if let Some(t) = &tokens {
                        t.inc();
                    }
                    if let Some(t) = &self.0.tok {
                        msg.text = t.decode(&[msg.token_id]).unwrap_or_default();
                    }
                }
                let fin = msg.finish_reason != 0;
                // A client that went away ends the request (the worker aborts it).
                if tx.send(Ok(msg)).await.is_err() || fin {
                    return Ok(());
                }
            }
        }
        .await;
        route.outstanding.fetch_sub(left.min(route.outstanding.load(Ordering::SeqCst)), Ordering::SeqCst);
        streamed.map_err(|st| match st.code() {
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange => (AttemptFailure::Rejected, st),
            _ => (AttemptFailure::RankFailed, Status::unavailable(format!("worker rank {} failed: {} (retry)", route.rank, st.message()))),
        })
    }
}

#[tonic::async_trait]
impl Control for CoordSvc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        self.require_leader()?;
        let r = req.into_inner();
        let w = self.group(|g| g.register(r.grpc_address, r.transport_address, r.node));
        self.0.membership_changed.notify_one();
        println!("worker {} registered ({})", w.id, w.grpc);
        Ok(Response::new(pb::RegisterResponse { worker_id: w.id }))
    }
}

#[tonic::async_trait]
impl Inference for CoordSvc {
    type GenerateStream = BoxStream<pb::GenerateResponse>;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        self.require_leader()?;
        let r = req.into_inner();
        let cfg = &self.0.cfg;
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
        if let Some((i, t)) = prompt.iter().enumerate().find(|(_, t)| **t as usize >= cfg.vocab_size) {
            return Err(Status::invalid_argument(format!(
                "token id {t} at position {i} is out of range (vocab size {})",
                cfg.vocab_size
            )));
        }
        let max_pos = cfg.max_position_embeddings;
        if r.max_tokens == 0 {
            return Err(Status::invalid_argument("max_tokens must be at least 1"));
        }
        if prompt.len() + r.max_tokens as usize > max_pos {
            return Err(Status::invalid_argument(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context of {max_pos} tokens",
                prompt.len(),
                r.max_tokens
            )));
        }
        let s = r.sampling.unwrap_or_default();
        let sp = SamplingParams {
            temperature: s.temperature,
            top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
            top_k: s.top_k as usize,
            seed: s.seed,
        };
        sp.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut stop = r.stop_token_ids.clone();
        if stop.is_empty() && !r.ignore_eos {
            stop = cfg.eos_token_ids.clone();
        }
        // No room for every expert: refuse at once, naming what is missing. Otherwise wait
        // for the cluster to come up (start, or a generation being formed).
        let now = self.0.serving.borrow().clone();
        let limit = if matches!(now, Serving::NoRoom { .. }) { Duration::ZERO } else { START_WAIT };
        if let Err(s) = self.wait_serving(limit).await {
            return Err(ControlError::NotServing(s.reason()).into());
        }
        let base = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids: prompt })),
            sampling: Some(pb::SamplingParams { temperature: sp.temperature, top_p: sp.top_p, top_k: sp.top_k as u32, seed: sp.seed }),
            stop_token_ids: stop,
            max_tokens: r.max_tokens,
            ignore_eos: r.ignore_eos,
            return_prompt_logits: r.return_prompt_logits,
            ..Default::default()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(self.clone().run_request(base, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let Some(tok) = &self.0.tok else { return Err(Status::failed_precondition("the model has no tokenizer.json")) };
        let ids = tok.encode(&req.into_inner().text).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn model_info(&self, _req: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let c = &self.0.cfg;
        let active = self.active_placement();
        Ok(Response::new(pb::ModelInfoResponse {
            architecture: format!("{:?}", c.arch),
            vocab_size: c.vocab_size as u32,
            hidden_size: c.hidden_size as u32,
            num_layers: c.n_layers as u32,
            num_moe_layers: c.moe_layers().len() as u32,
            num_experts: c.router.n_experts as u32,
            top_k: c.router.top_k as u32,
            max_position_embeddings: c.max_position_embeddings as u32,
            world_size: active.as_ref().map_or(0, |a| a.1.num_ranks() as u32),
            placement_json: active.and_then(|a| serde_json::to_string(&a.1).ok()).unwrap_or_default(),
            eos_token_ids: c.eos_token_ids.clone(),
            model_path: self.0.model_dir.display().to_string(),
            ready: self.is_ready() && self.require_leader().is_ok(),
        }))
    }
}

/// How long a request waits for a cluster that is starting or re-forming before it is refused.
const START_WAIT: Duration = Duration::from_secs(120);
