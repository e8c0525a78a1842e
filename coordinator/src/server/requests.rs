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

use super::admission::Permit;
use super::output::OutputText;
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

/// Where a running request's responses go.
pub(crate) type ResponseTx = tokio::sync::mpsc::Sender<Result<pb::GenerateResponse, Status>>;
/// The responses of a started request, in order; it ends after the one with a finish_reason,
/// or with an error. Dropping it cancels the request.
pub(crate) type ResponseRx = tokio::sync::mpsc::Receiver<Result<pb::GenerateResponse, Status>>;

/// A validated request, ready to run.
pub(crate) struct Job {
    /// What the workers get: token ids, the stop token ids, the sampling parameters.
    pub base: pb::GenerateRequest,
    /// Stop strings (matched here, on the decoded text).
    pub stops: Vec<String>,
    pub deadline: Option<tokio::time::Instant>,
    /// Its place in the bounded queue, held until the request ends.
    pub _permit: Permit,
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
    /// or a terminal status (`router::after_failure`), never in silence. Past its deadline it
    /// ends with DEADLINE_EXCEEDED, and dropping the worker's stream frees the sequence there.
    pub(crate) async fn run_request(self, job: Job, tx: ResponseTx) {
        let m = &self.0.metrics;
        m.in_flight.add(1.0);
        let outcome = match job.deadline {
            Some(d) => match tokio::time::timeout_at(d, self.drive(&job, &tx)).await {
                Ok(o) => o,
                Err(_) => {
                    let _ = tx.send(Err(Status::deadline_exceeded("the request's deadline passed"))).await;
                    "deadline_exceeded"
                }
            },
            None => self.drive(&job, &tx).await,
        };
        m.in_flight.add(-1.0);
        m.request(outcome);
    }

    /// The attempts of one request until it ends; its outcome (metrics label).
    async fn drive(&self, job: &Job, tx: &ResponseTx) -> &'static str {
        let base = &job.base;
        let prompt = match &base.prompt {
            Some(pb::generate_request::Prompt::TokenIds(t)) => t.ids.clone(),
            _ => vec![],
        };
        let mut generated: Vec<u32> = Vec::new();
        let mut out = OutputText::new(job.stops.clone());
        let mut attempt = 0usize;
        loop {
            let (failure, st) = match self.attempt(base, &prompt, &mut generated, &mut out, tx).await {
                Ok(()) => return "completed",
                Err(f) => f,
            };
            match router::after_failure(attempt, failure, generated.len(), base.return_prompt_logits) {
                router::Next::Retry(pause) => {
                    tracing::warn!(attempt, generated = generated.len(), "request moves to another rank: {}", st.message());
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                router::Next::Fail => {
                    let _ = tx.send(Err(st)).await;
                    return if failure == AttemptFailure::Rejected { "invalid" } else { "failed" };
                }
            }
        }
    }

    /// One attempt of a request on one rank: `Ok` once it finished (or the client went away).
    pub(crate) async fn attempt(
        &self,
        base: &pb::GenerateRequest,
        prompt: &[u32],
        generated: &mut Vec<u32>,
        out: &mut OutputText,
        tx: &ResponseTx,
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
                // A client that went away ends the request at once, also during a long prefill:
                // dropping the worker's stream makes the worker abort the sequence and free its KV.
                let next = tokio::select! {
                    m = stream.message() => m?,
                    _ = tx.closed() => return Ok(()),
                };
                let Some(mut msg) = next else {
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
                    self.annotate(&mut msg, out, prompt.len(), generated.len());
                }
                let fin = msg.finish_reason != 0;
                // A stop string ends the request here: returning drops the worker's stream.
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

    /// Fills in what the worker does not know: the text (incremental, cut at a stop string,
    /// which then finishes the request), the text of the top log-probabilities, and the usage
    /// counts in the last message.
    fn annotate(&self, msg: &mut pb::GenerateResponse, out: &mut OutputText, prompt_tokens: usize, completion_tokens: usize) {
        if let Some(t) = &self.0.tok {
            let mut piece = out.push(t, msg.token_id);
            if !piece.stopped && msg.finish_reason != 0 {
                let rest = out.finish(t);
                piece.text.push_str(&rest.text);
                piece.stopped = rest.stopped;
            }
            msg.text = piece.text;
            if piece.stopped {
                msg.finish_reason = pb::FinishReason::Stop as i32;
            }
            for top in &mut msg.top_logprobs {
                top.text = t.decode(&[top.token_id]).unwrap_or_default();
            }
        }
        if msg.finish_reason != 0 {
            msg.usage = Some(pb::Usage { prompt_tokens: prompt_tokens as u32, completion_tokens: completion_tokens as u32 });
        }
    }
}

#[tonic::async_trait]
impl Control for CoordSvc {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        self.require_leader()?;
        let r = req.into_inner();
        let previous = Some(r.worker_id.as_str()).filter(|id| !id.is_empty());
        let w = self.group(|g| {
            g.admits(r.gpus, previous)?;
            Ok::<_, crate::control::ControlError>(g.register(r.grpc_address, r.transport_address, r.node, r.gpus, previous))
        })?;
        self.0.membership_changed.notify_one();
        println!("worker {} registered ({})", w.id, w.grpc);
        Ok(Response::new(pb::RegisterResponse { worker_id: w.id }))
    }
}

#[tonic::async_trait]
impl Inference for CoordSvc {
    type GenerateStream = BoxStream<pb::GenerateResponse>;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = grpc_timeout(req.metadata());
        let rx = self.start_generate(req.into_inner(), deadline, START_WAIT).await?;
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

/// How long a gRPC request waits for a cluster that is starting or re-forming before it is refused.
pub(crate) const START_WAIT: Duration = Duration::from_secs(120);

/// The deadline a gRPC client sent (`grpc-timeout`: up to 8 digits and a unit, H M S m u n).
/// Tonic applies it only until the response headers, not to a server stream, so requests apply
/// it themselves.
pub(crate) fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}
