//! The operator API (`switchyard.v1.Admin`) of the coordinator.
//!
//! Every call must carry `authorization: Bearer <token>` matching the coordinator's
//! `--admin-token`; a coordinator started without one refuses every admin call.
//!
//! `ApplyPlacement` is the two-phase placement change: the placement is checked against the model
//! and the cluster before any worker hears of it; then every worker prepares epoch N+1 (loads the
//! slots it gains beside the active ones, serving meanwhile), and only when all acked does the
//! coordinator commit it everywhere. The workers switch at the first engine step where every rank
//! reports the commit (see `worker::expert_parallel`). A failed prepare abandons the epoch: the
//! prepared slots are dropped everywhere and the old epoch keeps serving.

use super::{CoordSvc, check_placement};
use crate::control::epoch_change::{EpochChange, EpochFailure, Step, SwitchReport};
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::admin_server::Admin;
use switchyard_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// How long every worker gets to load the slots of a new epoch.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the group gets to switch after the commit (it switches within a step or an idle poll).
const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Checks the bearer token of an admin call. `None`: the admin API is off.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<String>,
}

impl AdminAuth {
    pub fn new(token: Option<String>) -> Self {
        AdminAuth { token: token.filter(|t| !t.is_empty()) }
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else {
            return Err(Status::unauthenticated("the admin API is off: start the coordinator with --admin-token"));
        };
        let got = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match got {
            None => Err(Status::unauthenticated("missing `authorization: Bearer <token>`")),
            Some(t) if constant_time_eq(t.as_bytes(), want.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong admin token")),
        }
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs `call` on every worker concurrently; the per-rank results in rank order.
async fn on_all<T, F, Fut>(clients: &[WorkerClient<Channel>], timeout: Duration, call: F) -> Vec<Result<T, Status>>
where
    T: Send + 'static,
    F: Fn(WorkerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for (rank, c) in clients.iter().enumerate() {
        let fut = call(c.clone());
        set.spawn(async move {
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer within {timeout:?}"))),
            };
            (rank, r)
        });
    }
    let mut out: Vec<Option<Result<T, Status>>> = (0..clients.len()).map(|_| None).collect();
    while let Some(j) = set.join_next().await {
        if let Ok((rank, r)) = j {
            out[rank] = Some(r);
        }
    }
    out.into_iter().map(|r| r.unwrap_or_else(|| Err(Status::internal("task failed")))).collect()
}

/// The RPC results as `control::epoch_change` takes them (errors named by rank).
fn outcomes<T>(results: &[Result<T, Status>]) -> Vec<Result<(), String>> {
    results.iter().enumerate().map(|(r, x)| x.as_ref().map(|_| ()).map_err(|s| format!("rank {r}: {}", s.message()))).collect()
}

fn first_failure<T>(results: &[Result<T, Status>]) -> Option<String> {
    let msgs: Vec<String> = results
        .iter()
        .enumerate()
        .filter_map(|(r, x)| x.as_ref().err().map(|s| format!("rank {r}: {}", s.message())))
        .collect();
    (!msgs.is_empty()).then(|| msgs.join("; "))
}

#[tonic::async_trait]
impl Admin for CoordSvc {
    async fn cluster_status(&self, _req: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.require_leader()?;
        let g = self.group_status();
        let mut workers = Vec::new();
        if let Some(a) = &g.active {
            let routes = self.routes();
            for (rank, w) in a.ranks.iter().enumerate() {
                let slots = a.placement.layers.first().and_then(|l| l.ranks.get(rank)).map_or(0, Vec::len) as u32;
                let mut st = pb::WorkerStatus {
                    rank: rank as u32,
                    grpc_address: w.grpc.clone(),
                    node: w.node.clone(),
                    worker_id: w.id.clone(),
                    slots,
                    draining: g.draining.get(rank).copied().unwrap_or(false),
                    ..Default::default()
                };
                let client = routes.iter().find(|r| r.id == w.id).map(|r| r.client()).or_else(|| self.client_of(&w.id, &w.grpc));
                if let Some(mut c) = client
                    && let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(2), c.health(pb::WorkerHealthRequest::default())).await
                {
                    let h = h.into_inner();
                    st.alive = true;
                    st.epoch = h.epoch;
                    st.active_requests = h.active_requests;
                    st.steps = h.steps;
                    st.degraded = h.degraded;
                    st.generation = h.generation;
                    st.loaded_expert_bytes = h.loaded_expert_bytes;
                }
                workers.push(st);
            }
        }
        let missing = match &g.serving {
            crate::control::Serving::NoRoom { missing } => {
                missing.iter().map(|&(l, e)| pb::ExpertRef { layer: l as u32, expert: e as u32 }).collect()
            }
            _ => Vec::new(),
        };
        Ok(Response::new(pb::ClusterStatusResponse {
            epoch: g.active.as_ref().map_or(0, |a| a.epoch),
            world_size: g.active.as_ref().map_or(0, |a| a.world() as u32),
            workers,
            leader: self.listen_addr(),
            ready: g.serving.is_serving(),
            generation: g.active.as_ref().map_or(0, |a| a.number),
            serving: g.serving.is_serving(),
            not_serving_reason: g.serving.reason(),
            missing_experts: missing,
            spare_workers: g.spare as u32,
            max_slots_per_rank: g.max_slots.unwrap_or(0) as u32,
            min_replicas: g.min_replicas as u32,
            generations_formed: g.formed,
        }))
    }

    async fn drain(&self, req: Request<pb::DrainRankRequest>) -> Result<Response<pb::DrainRankResponse>, Status> {
        self.require_leader()?;
        let r = req.into_inner();
        let deadline = if r.deadline_s > 0.0 && r.deadline_s.is_finite() { Duration::from_secs_f64(r.deadline_s) } else { Duration::from_secs(30) };
        Ok(Response::new(self.drain_rank(r.rank as usize, deadline).await?))
    }

    async fn get_placement(&self, _req: Request<pb::GetPlacementRequest>) -> Result<Response<pb::GetPlacementResponse>, Status> {
        self.require_leader()?;
        let Some((epoch, p)) = self.active_placement() else { return Err(Status::unavailable("no active generation yet")) };
        let placement_json = serde_json::to_string(&p).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::GetPlacementResponse { epoch, placement_json }))
    }

    async fn apply_placement(&self, req: Request<pb::ApplyPlacementRequest>) -> Result<Response<pb::ApplyPlacementResponse>, Status> {
        self.require_leader()?;
        Ok(Response::new(self.apply_epoch(req.into_inner().placement_json).await?))
    }

    async fn get_stats(&self, _req: Request<pb::GetStatsRequest>) -> Result<Response<pb::GetStatsResponse>, Status> {
        self.require_leader()?;
        Ok(Response::new(self.stats_snapshot()))
    }
}

impl CoordSvc {
    /// The two-phase placement change (`control::epoch_change`); also what the scheduler calls.
    pub(super) async fn apply_epoch(&self, json: String) -> Result<pb::ApplyPlacementResponse, Status> {
        let started = Instant::now();
        // 1. Check everything before any worker changes.
        let p = placement::Placement::from_json(&json).map_err(|e| Status::invalid_argument(format!("placement: {e}")))?;
        // Generations and placement epochs change one at a time.
        let _one_at_a_time = self.apply_lock().lock().await;
        let Some(change) = self.group(|g| EpochChange::start(g)) else { return Err(Status::unavailable("no active generation yet")) };
        let (generation, clients) = self.rank_clients()?;
        if generation != change.generation() {
            return Err(Status::unavailable("the group is re-forming; try again"));
        }
        check_placement(&p, self.model_config(), clients.len(), "the placement").map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let json = serde_json::to_string(&p).map_err(|e| Status::internal(e.to_string()))?;
        if !self.is_ready() {
            return Err(Status::unavailable("the cluster is not serving; placement changes wait for a whole generation"));
        }
        self.migration_running(true);
        let r = self.apply_locked(&clients, change, json, p, started).await;
        self.migration_running(false);
        r
    }

    async fn apply_locked(
        &self,
        clients: &[WorkerClient<Channel>],
        mut change: EpochChange,
        json: String,
        p: placement::Placement,
        started: Instant,
    ) -> Result<pb::ApplyPlacementResponse, Status> {
        let epoch = change.epoch();
        // 2. Prepare everywhere.
        let prepared = on_all(clients, PREPARE_TIMEOUT, |mut c| {
            let placement_json = json.clone();
            async move { c.prepare(pb::PrepareRequest { epoch, placement_json }).await.map(Response::into_inner) }
        })
        .await;
        let mut step = change.prepared(&outcomes(&prepared));
        // 3. Commit everywhere; the group switches at the first step where every rank committed.
        if step == Step::Commit {
            let committed = on_all(clients, Duration::from_secs(10), |mut c| async move {
                c.commit(pb::CommitRequest { epoch }).await.map(Response::into_inner)
            })
            .await;
            step = change.committed(&outcomes(&committed));
        }
        // 4. Wait for every worker to serve the new epoch (a regroup meanwhile ends the wait).
        let deadline = Instant::now() + SWITCH_TIMEOUT;
        while step == Step::Poll {
            let health = on_all(clients, Duration::from_secs(5), |mut c| async move {
                c.health(pb::WorkerHealthRequest::default()).await.map(Response::into_inner)
            })
            .await;
            let reports: Vec<SwitchReport> = health.iter().enumerate().map(|(r, h)| h.as_ref().map(|h| (h.generation, h.epoch)).map_err(|s| format!("rank {r}: {}", s.message()))).collect();
            step = change.switched(&reports);
            if step == Step::Poll {
                if Instant::now() > deadline {
                    return Err(Status::deadline_exceeded(format!("placement epoch {epoch} committed but not active within {SWITCH_TIMEOUT:?}")));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Step::Abort(why) = step {
            // Before the switch the ranks hold a prepared epoch to drop; after it (a lost rank, a
            // regroup) the next generation replaces whatever they serve.
            let unclean = if matches!(why, EpochFailure::Prepare(_) | EpochFailure::Commit(_)) {
                let aborted = on_all(clients, Duration::from_secs(10), |mut c| async move {
                    c.abort(pb::AbortRequest { epoch }).await.map(Response::into_inner)
                })
                .await;
                first_failure(&aborted).map(|e| format!(" (abort failed: {e})")).unwrap_or_default()
            } else {
                String::new()
            };
            tracing::warn!(epoch, "placement epoch abandoned: {why}");
            self.note_abandoned_epoch();
            let msg = format!("placement epoch {epoch} abandoned, the active epoch keeps serving: {why}{unclean}");
            return Err(match why {
                EpochFailure::Prepare(_) => Status::failed_precondition(msg),
                EpochFailure::Regrouped => Status::aborted(msg),
                EpochFailure::Commit(_) | EpochFailure::LostWorker(_) => Status::unavailable(msg),
            });
        }
        self.epoch_committed(epoch, p)?;
        let switch_ms = started.elapsed().as_millis() as u64;
        tracing::info!(epoch, switch_ms, "placement epoch active");
        let (loaded_per_rank, kept_per_rank) = prepared.iter().flatten().map(|p| (p.loaded, p.kept)).unzip();
        Ok(pb::ApplyPlacementResponse { epoch, loaded_per_rank, kept_per_rank, switch_ms })
    }
}
