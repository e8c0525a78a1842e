//! The operator CLI commands of the admin API (`switchyard place apply`, `switchyard status`,
//! `switchyard stats`, `switchyard drain`, `switchyard trace record`).
//!
//! Every call carries `authorization: Bearer <token>` (the coordinator's `--admin-token`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;
use tonic::{Request, Status};

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
