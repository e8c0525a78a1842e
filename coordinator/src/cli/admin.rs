//! The operator API (`switchyard.v1.Admin`) of the coordinator and its CLI commands
//! (`switchyard place apply`, `switchyard status`).
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

use super::coordinator_cmd::{CoordSvc, check_placement};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::admin_client::AdminClient;
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
            coordinator::control::Serving::NoRoom { missing } => {
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
    /// The two-phase placement change (see the module docs); also what the scheduler calls.
    pub(super) async fn apply_epoch(&self, json: String) -> Result<pb::ApplyPlacementResponse, Status> {
        let started = Instant::now();
        // 1. Check everything before any worker changes.
        let p = placement::Placement::from_json(&json).map_err(|e| Status::invalid_argument(format!("placement: {e}")))?;
        // Generations and placement epochs change one at a time.
        let _one_at_a_time = self.apply_lock().lock().await;
        let Some((current, _)) = self.active_placement() else { return Err(Status::unavailable("no active generation yet")) };
        let (generation, clients) = self.rank_clients()?;
        check_placement(&p, self.model_config(), clients.len(), "the placement").map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        let json = serde_json::to_string(&p).map_err(|e| Status::internal(e.to_string()))?;
        if !self.is_ready() {
            return Err(Status::unavailable("the cluster is not serving; placement changes wait for a whole generation"));
        }
        self.migration_running(true);
        let r = self.apply_locked(&clients, current + 1, generation, json, p, started).await;
        self.migration_running(false);
        r
    }

    async fn apply_locked(
        &self,
        clients: &[WorkerClient<Channel>],
        epoch: u64,
        generation: u64,
        json: String,
        p: placement::Placement,
        started: Instant,
    ) -> Result<pb::ApplyPlacementResponse, Status> {
        // 2. Prepare everywhere.
        let prepared = on_all(clients, PREPARE_TIMEOUT, |mut c| {
            let placement_json = json.clone();
            async move { c.prepare(pb::PrepareRequest { epoch, placement_json }).await.map(Response::into_inner) }
        })
        .await;
        if let Some(why) = first_failure(&prepared) {
            let aborted = on_all(clients, Duration::from_secs(10), |mut c| async move {
                c.abort(pb::AbortRequest { epoch }).await.map(Response::into_inner)
            })
            .await;
            tracing::warn!(epoch, "placement epoch abandoned: {why}");
            self.note_abandoned_epoch();
            let unclean = first_failure(&aborted).map(|e| format!(" (abort failed: {e})")).unwrap_or_default();
            return Err(Status::failed_precondition(format!(
                "placement epoch {epoch} abandoned, epoch {} keeps serving: {why}{unclean}",
                epoch - 1
            )));
        }
        // 3. Commit everywhere; the group switches at the first step where every rank committed.
        let committed = on_all(clients, Duration::from_secs(10), |mut c| async move {
            c.commit(pb::CommitRequest { epoch }).await.map(Response::into_inner)
        })
        .await;
        if let Some(why) = first_failure(&committed) {
            let _ = on_all(clients, Duration::from_secs(10), |mut c| async move {
                c.abort(pb::AbortRequest { epoch }).await.map(Response::into_inner)
            })
            .await;
            return Err(Status::unavailable(format!("placement epoch {epoch} not committed everywhere: {why}")));
        }
        // 4. Wait for every worker to serve the new epoch (a regroup meanwhile ends the wait).
        let deadline = Instant::now() + SWITCH_TIMEOUT;
        loop {
            let health = on_all(clients, Duration::from_secs(5), |mut c| async move {
                c.health(pb::WorkerHealthRequest::default()).await.map(Response::into_inner)
            })
            .await;
            if let Some(why) = first_failure(&health) {
                return Err(Status::unavailable(format!("placement epoch {epoch}: lost a worker while switching: {why}")));
            }
            if health.iter().flatten().any(|h| h.generation != generation) {
                return Err(Status::aborted(format!("placement epoch {epoch}: the group re-formed while switching")));
            }
            if health.iter().flatten().all(|h| h.epoch >= epoch) {
                break;
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!("placement epoch {epoch} committed but not active within {SWITCH_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.epoch_committed(epoch, p)?;
        let switch_ms = started.elapsed().as_millis() as u64;
        tracing::info!(epoch, switch_ms, "placement epoch active");
        let (loaded_per_rank, kept_per_rank) = prepared.iter().flatten().map(|p| (p.loaded, p.kept)).unzip();
        Ok(pb::ApplyPlacementResponse { epoch, loaded_per_rank, kept_per_rank, switch_ms })
    }
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

/// Where and how to reach the admin API.
#[derive(clap::Args, Clone, Debug)]
pub struct AdminEndpoint {
    /// Coordinator address (host:port or http://host:port).
    #[arg(long, env = "SWITCHYARD_ENDPOINT", default_value = "127.0.0.1:50051")]
    pub endpoint: String,
    /// Admin bearer token (the coordinator's --admin-token).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: String,
}

impl AdminEndpoint {
    async fn client(&self) -> anyhow::Result<AdminClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>> {
        let ch = super::cluster::connect_channel(&self.endpoint)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the coordinator at {}: {}", self.endpoint, super::cluster::error_chain(&e)))?;
        let header = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| anyhow::anyhow!("the admin token must be printable ASCII"))?;
        Ok(AdminClient::with_interceptor(ch, BearerToken(header)).max_decoding_message_size(1 << 30))
    }
}

/// Adds the admin bearer token to every call.
#[derive(Clone)]
pub struct BearerToken(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn status_err(what: &str, s: Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {:?}: {}", s.code(), s.message())
}

/// `switchyard place apply P.json`: validates the file here, then drives the two-phase change.
pub fn apply(placement: PathBuf, ep: AdminEndpoint) -> anyhow::Result<ExitCode> {
    // Read and validate locally first: a malformed file never reaches the cluster.
    let p = placement::Placement::read(&placement)?;
    let json = serde_json::to_string(&p)?;
    rt()?.block_on(async move {
        let mut c = ep.client().await?;
        let r = c
            .apply_placement(pb::ApplyPlacementRequest { placement_json: json })
            .await
            .map_err(|s| status_err("apply placement", s))?
            .into_inner();
        println!(
            "placement epoch {} active after {} ms; experts loaded per rank {:?}, kept {:?}",
            r.epoch, r.switch_ms, r.loaded_per_rank, r.kept_per_rank
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `switchyard status`: the cluster as the leading coordinator sees it.
pub fn status(ep: AdminEndpoint, json: bool) -> anyhow::Result<ExitCode> {
    rt()?.block_on(async move {
        let mut c = ep.client().await?;
        let s = c.cluster_status(pb::ClusterStatusRequest {}).await.map_err(|s| status_err("cluster status", s))?.into_inner();
        if json {
            let workers: Vec<serde_json::Value> = s
                .workers
                .iter()
                .map(|w| {
                    serde_json::json!({"rank": w.rank, "address": w.grpc_address, "node": w.node, "alive": w.alive,
                        "epoch": w.epoch, "active_requests": w.active_requests, "steps": w.steps, "degraded": w.degraded})
                })
                .collect();
            let missing: Vec<String> = s.missing_experts.iter().map(|m| format!("{}/{}", m.layer, m.expert)).collect();
            let v = serde_json::json!({"epoch": s.epoch, "world_size": s.world_size, "ready": s.ready,
                "leader": s.leader, "workers": workers, "generation": s.generation, "serving": s.serving,
                "not_serving_reason": s.not_serving_reason, "missing_experts": missing, "spare_workers": s.spare_workers});
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("leader {}  generation {}  world {}  placement epoch {}  serving {}", s.leader, s.generation, s.world_size, s.epoch, s.serving);
            if !s.serving {
                println!("not serving: {}", s.not_serving_reason);
            }
            println!("{:>4} {:<22} {:<10} {:>5} {:>6} {:>7} {:>10} {:>8}", "rank", "address", "node", "alive", "epoch", "active", "steps", "degraded");
            for w in &s.workers {
                println!(
                    "{:>4} {:<22} {:<10} {:>5} {:>6} {:>7} {:>10} {:>8}",
                    w.rank, w.grpc_address, w.node, w.alive, w.epoch, w.active_requests, w.steps, w.degraded
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `switchyard drain`: drains a rank and prints the generation formed without it.
pub fn drain(ep: AdminEndpoint, rank: u32, deadline_s: f64) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(deadline_s.is_finite() && deadline_s >= 0.0, "--deadline must be a number of seconds");
    rt()?.block_on(async move {
        let mut c = ep.client().await?;
        let r = c.drain(pb::DrainRankRequest { rank, deadline_s }).await.map_err(|s| status_err("drain", s))?.into_inner();
        println!("rank {rank} drained: generation {} formed without it; {} requests finished there, {} moved", r.generation, r.finished, r.moved);
        Ok(ExitCode::SUCCESS)
    })
}

async fn fetch_stats(ep: &AdminEndpoint) -> anyhow::Result<pb::GetStatsResponse> {
    let mut c = ep.client().await?;
    Ok(c.get_stats(pb::GetStatsRequest {}).await.map_err(|s| status_err("stats", s))?.into_inner())
}

/// `switchyard stats`: balancedness of the active placement under the live load, the hottest
/// experts, per-rank load, migrations.
pub fn stats(ep: AdminEndpoint, top: usize, json: bool) -> anyhow::Result<ExitCode> {
    rt()?.block_on(async move {
        let s = fetch_stats(&ep).await?;
        let ne = s.num_experts as usize;
        let mut hot: Vec<(usize, usize, f64)> = s
            .window_load
            .iter()
            .enumerate()
            .map(|(i, &x)| (i / ne.max(1), i % ne.max(1), x))
            .collect();
        hot.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        hot.truncate(top);
        if json {
            let v = serde_json::json!({
                "epoch": s.epoch, "balancedness": s.balancedness, "layer_balancedness": s.layer_balancedness,
                "rank_load": s.rank_load, "migrations": s.migrations, "migrated_experts": s.migrated_experts,
                "longest_step_during_migration_us": s.longest_step_during_migration_us,
                "abandoned_epochs": s.abandoned_epochs, "workload_shift": s.workload_shift,
                "hottest": hot.iter().map(|(l, e, x)| serde_json::json!({"layer": l, "expert": e, "load": x})).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "placement epoch {}  balancedness {:.4} (windowed)  workload shift {:.3}  migrations {} ({} experts loaded; longest step during the last {} µs)",
            s.epoch, s.balancedness, s.workload_shift, s.migrations, s.migrated_experts, s.longest_step_during_migration_us
        );
        println!("per-layer balancedness:");
        for (l, b) in s.layer_balancedness.iter().enumerate() {
            println!("  layer {l:>3}  {b:.4}");
        }
        println!("per-rank load (windowed assignments, all layers):");
        for (r, x) in s.rank_load.iter().enumerate() {
            println!("  rank {r:>3}  {x:.1}");
        }
        println!("hottest experts:");
        for (l, e, x) in hot {
            println!("  layer {l:>3} expert {e:>4}  {x:.1}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `switchyard trace record`: the counts routed during `seconds`, as `logical_count` JSON.
pub fn record(ep: AdminEndpoint, seconds: f64, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(seconds > 0.0 && seconds.is_finite() && seconds <= 86_400.0, "--seconds must be in (0, 86400]");
    rt()?.block_on(async move {
        let a = fetch_stats(&ep).await?;
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let b = fetch_stats(&ep).await?;
        let (nl, ne) = (b.num_layers as usize, b.num_experts as usize);
        anyhow::ensure!(a.cumulative_counts.len() == nl * ne && b.cumulative_counts.len() == nl * ne, "the coordinator reported no expert counts yet");
        // A worker that restarted in between counts from zero: take its new total.
        let inc: Vec<u64> = b.cumulative_counts.iter().zip(&a.cumulative_counts).map(|(&y, &x)| y.checked_sub(x).unwrap_or(y)).collect();
        let total: u64 = inc.iter().sum();
        let counts: Vec<Vec<u64>> = inc.chunks(ne.max(1)).map(|c| c.to_vec()).collect();
        let v = serde_json::json!({"logical_count": counts, "source": "switchyard trace record", "seconds": seconds, "epoch": b.epoch});
        std::fs::write(out, serde_json::to_string(&v)?).map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
        println!("recorded {total} routed assignments over {seconds} s ({nl} MoE layers x {ne} experts) to {}", out.display());
        Ok(ExitCode::SUCCESS)
    })
}
