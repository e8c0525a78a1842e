//! The leader's generation driver: adopting a recorded generation, forming every generation the
//! group plans on its workers, membership (lease watch, health polls), and the rebalance loop.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use tonic::Response;

use super::ha::{Role, Seat};
use super::{CoordSvc, HEALTH_FAILURES, HEALTH_PERIOD, MigrationWatch, REGROUP_TIMEOUT, RecordQueue, WorkerLink, link_to, transport_setup};
use crate::control::record;
use crate::control::{Generation, WorkerId, WorkerInfo};
use crate::store::typed;
use crate::store::{EventKind, StateStore};

impl CoordSvc {
    /// This coordinator won the election: adopt the generation a previous leader recorded (the
    /// workers keep their KV caches and experts), or wait for registrations.
    pub(crate) async fn lead(self, seat: Arc<Seat>) {
        let _ = self.0.records.set(RecordQueue::spawn(seat.store.clone()));
        if let Some(policy) = self.0.policy.lock().ok().and_then(|mut p| p.take()) {
            tokio::spawn(self.clone().rebalance_loop(policy));
        }
        match record::recorded_generation(&seat.store).await {
            Ok(Some(rec)) => match rec.generation() {
                Ok(g) if g.placement.num_layers == self.0.cfg.moe_layers().len() && g.placement.num_experts == self.0.cfg.router.n_experts => {
                    self.adopt(g).await
                }
                Ok(_) => tracing::warn!("ignoring the recorded generation: it is for another model"),
                Err(e) => tracing::warn!("ignoring the recorded generation: {e}"),
            },
            Ok(None) => {}
            Err(e) => tracing::warn!("cannot read the recorded generation [{}]: {e}; waiting for workers to register", e.code()),
        }
        self.take_over_members(&seat).await;
        self.0.role.send_replace(Role::Leader);
        match self.group(|g| g.active().map(|a| (a.number, a.world()))) {
            Some((n, w)) => println!("leading; adopted generation {n} of {w} ranks"),
            None => println!("leading; waiting for {} workers", self.group(|g| g.settings().min_workers)),
        }
        tokio::spawn(self.clone().drive_generations());
        tokio::spawn(self.clone().watch_membership(seat));
    }

    /// Workers that registered with a previous leader but are not ranks of the recorded
    /// generation (a join it did not finish): their membership leases in the store name them.
    async fn take_over_members(&self, seat: &Seat) {
        let members = match typed::list_members(&seat.store).await {
            Ok((m, _)) => m,
            Err(e) => return tracing::warn!("cannot list the members [{}]: {e}", e.code()),
        };
        let ranks: Vec<WorkerId> = self.group(|g| g.active().map(|a| a.ranks.iter().map(|w| w.id.clone()).collect()).unwrap_or_default());
        // Ranks of the recorded generation were probed by `adopt`: one that did not answer
        // stays out even while its lease still runs.
        for m in members.into_iter().filter(|m| !ranks.contains(&m.id)) {
            let info = WorkerInfo { id: m.id.clone(), grpc: m.addr, transport: m.transport_addr, node: m.node };
            if self.group(|g| g.take_over(info)) {
                println!("took over worker {} registered with the previous leader", m.id);
            }
        }
    }

    /// Takes over the workers of a recorded generation that still answer.
    pub(crate) async fn adopt(&self, g: Generation) {
        let mut alive = Vec::new();
        let mut seen = (0u64, 0u64);
        for w in &g.ranks {
            let Ok(link) = link_to(&w.grpc) else { continue };
            let mut c = link.client.clone();
            if let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(3), c.health(pb::WorkerHealthRequest::default())).await {
                let h = h.into_inner();
                seen = seen.max((h.generation.max(h.newest_generation), h.epoch));
                alive.push(w.id.clone());
                if let Ok(mut l) = self.0.links.lock() {
                    l.insert(w.id.clone(), link);
                }
            }
        }
        let (n, world) = (g.number, g.world());
        let adopted = alive.len();
        self.group(|grp| {
            grp.adopt(g, &alive);
            // A leader that died mid-change may have handed out a later generation.
            grp.observe_generation(seen.0, seen.1);
        });
        println!("adopted {adopted} of {world} running workers of generation {n}");
    }

    /// Leader only: forms every generation the group plans, one at a time.
    pub(crate) async fn drive_generations(self) {
        loop {
            let _ = tokio::time::timeout(Duration::from_millis(250), self.0.membership_changed.notified()).await;
            let _one_at_a_time = self.0.apply_lock.lock().await;
            let load = self.0.window.lock().ok().filter(|w| !w.is_empty()).map(|w| w.load().to_vec());
            let Some(next) = self.group(|g| g.next_generation(load.as_deref())) else { continue };
            self.form(next).await;
        }
    }

    /// Carries generation `g` out on its workers: every rank keeps what it holds, loads what it
    /// gains, and joins the new mesh; the group switches when all have.
    pub(crate) async fn form(&self, g: Generation) {
        let t0 = std::time::Instant::now();
        let json = match serde_json::to_string(&g.placement) {
            Ok(j) => j,
            Err(e) => return tracing::error!("placement of generation {}: {e}", g.number),
        };
        // Every generation is a new communicator: NCCL needs a unique id of its own for it.
        let (transport, nccl_unique_id) = match transport_setup(&self.0.transport) {
            Ok(t) => t,
            Err(e) => return tracing::error!("generation {}: transport setup: {e:#}", g.number),
        };
        let peers: Vec<String> = g.ranks.iter().map(|w| w.transport.clone()).collect();
        let nodes = g.node_indices();
        let mut set = tokio::task::JoinSet::new();
        for (rank, w) in g.ranks.iter().enumerate() {
            let link = match self.link(&w.id, &w.grpc) {
                Ok(l) => l,
                Err(e) => {
                    let id = w.id.clone();
                    set.spawn(async move { (id, Err((tonic::Code::Unavailable, e))) });
                    continue;
                }
            };
            let req = pb::RegroupRequest {
                generation: g.number,
                assignment: Some(pb::Assignment {
                    rank: rank as u32,
                    world_size: g.world() as u32,
                    peer_addresses: peers.clone(),
                    peer_nodes: nodes.clone(),
                    placement_json: json.clone(),
                    model_path: self.0.model_dir.display().to_string(),
                    epoch: g.epoch,
                    transport: transport.clone(),
                    nccl_unique_id: nccl_unique_id.clone(),
                    load_aware_replicas: self.0.load_aware_replicas,
                    capacity_factor: self.0.capacity_factor.unwrap_or(0.0),
                    max_batch_tokens: self.0.max_batch_tokens.unwrap_or(0),
                }),
            };
            let id = w.id.clone();
            let mut c = link.client;
            set.spawn(async move {
                let r = match tokio::time::timeout(REGROUP_TIMEOUT, c.regroup(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(s)) => Err((s.code(), format!("{:?}: {}", s.code(), s.message()))),
                    Err(_) => Err((tonic::Code::DeadlineExceeded, format!("no answer within {REGROUP_TIMEOUT:?}"))),
                };
                (id, r)
            });
        }
        let mut failed = Vec::new();
        let mut abandoned = false;
        let (mut loaded, mut kept_seqs) = (0u64, 0u64);
        while let Some(j) = set.join_next().await {
            match j {
                Ok((_, Ok(r))) => {
                    loaded += r.loaded_experts as u64;
                    kept_seqs += r.kept_sequences as u64;
                }
                Ok((id, Err((code, e)))) => {
                    eprintln!("worker {id} did not join generation {}: {e}", g.number);
                    // A worker superseded by a newer generation is fine; any other failure
                    // loses it. Either way this generation cannot form: stop waiting for the
                    // others (they would wait for the failed peer until their connect timeout;
                    // the next generation's Regroup supersedes their builds at once).
                    if code != tonic::Code::Aborted {
                        failed.push(id);
                    }
                    abandoned = true;
                    set.abort_all();
                    break;
                }
                Err(e) => tracing::error!("regroup task: {e}"),
            }
        }
        let done = if abandoned {
            self.group(|grp| grp.regroup_abandoned(g.number, &failed))
        } else {
            self.group(|grp| grp.regroup_finished(g.number))
        };
        if let Err(e) = done {
            return tracing::warn!("generation {}: {e}", g.number);
        }
        if !abandoned {
            self.0.metrics.membership_changes.inc();
            self.record_active();
            println!(
                "generation {} serving: {} ranks, epoch {}, {loaded} experts loaded, {kept_seqs} sequences kept, {} ms",
                g.number,
                g.world(),
                g.epoch,
                t0.elapsed().as_millis()
            );
        } else {
            self.0.membership_changed.notify_one();
        }
    }

    /// The connection to worker `id` (made once).
    pub(crate) fn link(&self, id: &str, grpc: &str) -> Result<WorkerLink, String> {
        let mut links = self.0.links.lock().map_err(|e| e.to_string())?;
        if let Some(l) = links.get(id) {
            return Ok(l.clone());
        }
        let l = link_to(grpc)?;
        links.insert(id.to_string(), l.clone());
        Ok(l)
    }

    /// Adds the workers' cumulative expert counts to the live window and updates the gauges.
    pub(crate) fn observe_load(&self, reports: &[(usize, Vec<u64>)], dt_s: f64) {
        let Some(p) = self.active_placement() else { return };
        let Ok(mut w) = self.0.window.lock() else { return };
        w.decay(dt_s);
        for (rank, counts) in reports {
            w.observe_cumulative(*rank, counts);
        }
        let (per_layer, total) = w.balancedness(&p.1);
        self.0.metrics.set_balance(&per_layer, total, &w.rank_load(&p.1));
    }

    /// The live statistics (admin `GetStats`).
    pub(crate) fn stats_snapshot(&self) -> pb::GetStatsResponse {
        let (nl, ne) = (self.0.cfg.moe_layers().len(), self.0.cfg.router.n_experts);
        let m = &self.0.metrics;
        let active = self.active_placement();
        let mut r = pb::GetStatsResponse {
            epoch: active.as_ref().map_or(0, |a| a.0),
            num_layers: nl as u32,
            num_experts: ne as u32,
            migrations: m.migrations.get(),
            migrated_experts: m.migrated_experts.get(),
            abandoned_epochs: m.abandoned_epochs.get(),
            longest_step_during_migration_us: self.0.migration_steps.lock().map(|m| m.1).unwrap_or(0),
            step_us: self.0.recent_steps.take(),
            projected_step_us: self.0.recent_projected_steps.take(),
            ..Default::default()
        };
        if let Ok(w) = self.0.window.lock() {
            r.window_load = w.load().iter().flatten().copied().collect();
            r.cumulative_counts = w.cumulative();
            r.workload_shift = w.shift_distance();
            if let Some((_, p)) = &active {
                (r.layer_balancedness, r.balancedness) = w.balancedness(p);
                r.rank_load = w.rank_load(p);
            }
        }
        r.placement_json = active.and_then(|a| serde_json::to_string(&a.1).ok()).unwrap_or_default();
        r
    }

    pub(crate) fn note_abandoned_epoch(&self) {
        self.0.metrics.abandoned_epochs.inc();
    }

    /// Marks a placement change running or done. The steps the workers report at the first poll
    /// after it ends still count: they ran (partly) during it.
    pub(crate) fn migration_running(&self, running: bool) {
        if let Ok(mut m) = self.0.migration_steps.lock() {
            m.0 = if running { MigrationWatch::Running } else { MigrationWatch::Ending };
            if running {
                m.1 = 0;
            }
        }
    }

    /// Step durations a worker reported: the longest counts while a placement change runs.
    pub(crate) fn note_steps_during_migration(&self, steps_us: &[u32]) {
        if let Ok(mut m) = self.0.migration_steps.lock()
            && m.0 != MigrationWatch::Idle
        {
            m.1 = m.1.max(steps_us.iter().copied().max().unwrap_or(0) as u64);
        }
    }

    /// Called after every membership poll: an ending migration has had its last poll.
    pub(crate) fn migration_poll_done(&self) {
        if let Ok(mut m) = self.0.migration_steps.lock()
            && m.0 == MigrationWatch::Ending
        {
            m.0 = MigrationWatch::Idle;
        }
    }

    /// The scheduler (leader only): after every load report, asks the rebalance policy whether the
    /// windowed load makes a new placement worth its migration, and applies it as a placement epoch.
    pub(crate) async fn rebalance_loop(self, mut policy: placement::rebalance::Rebalancer) {
        let t0 = std::time::Instant::now();
        loop {
            // Decide on every fresh load report (the membership loop observes one per 500 ms).
            self.0.load_observed.notified().await;
            if !self.is_ready() || self.require_leader().is_err() {
                continue;
            }
            let Some((_, current)) = self.active_placement() else { continue };
            let window = match self.0.window.lock() {
                Ok(w) if !w.is_empty() => w.clone(),
                _ => continue,
            };
            // The solve is CPU work (about a millisecond per move): keep it off the async workers.
            let now = t0.elapsed().as_secs_f64();
            let proposal = match tokio::task::block_in_place(|| policy.poll_window(now, &current, &window)) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!("rebalance policy: {e}");
                    continue;
                }
            };
            let Ok(next) = serde_json::to_string(&proposal.placement) else { continue };
            tracing::info!(before = proposal.before, after = proposal.after, moves = proposal.moves, during_shift = proposal.during_shift, "rebalancing");
            match self.apply_epoch(next).await {
                Ok(r) => {
                    let loaded: u64 = r.loaded_per_rank.iter().map(|&x| x as u64).sum();
                    self.0.metrics.migrations.inc();
                    self.0.metrics.migrated_experts.inc_by(loaded);
                    println!(
                        "rebalanced: epoch {} balancedness {:.3} -> {:.3} (predicted{}), {} experts loaded, {} ms",
                        r.epoch,
                        proposal.before,
                        proposal.after,
                        if proposal.during_shift { ", on the trend: shifting" } else { "" },
                        loaded,
                        r.switch_ms
                    );
                }
                Err(st) => tracing::warn!("rebalance not applied: {}", st.message()),
            }
        }
    }

    /// A worker is gone: out of routing, and the next generation forms without it.
    pub(crate) fn lose_worker(&self, id: &str, why: &str) {
        if self.group(|g| g.lose(id)) {
            tracing::warn!(worker = id, "worker lost: {why}");
            eprintln!("worker {id} lost: {why}");
            if let Ok(mut l) = self.0.links.lock() {
                l.remove(id);
            }
            self.0.membership_changed.notify_one();
        }
    }

    /// Leader only: a worker whose lease expired (its `members/` key vanished) or whose health
    /// checks fail three times in a row is lost; a rank whose collectives broke with every peer
    /// alive makes the group re-form as it is.
    pub(crate) async fn watch_membership(self, seat: Arc<Seat>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut watch = match seat.store.watch(typed::MEMBERS, None).await {
                Ok(w) => w,
                Err(e) => return tracing::warn!("cannot watch members [{}]: {e}", e.code()),
            };
            while let Some(Ok(ev)) = watch.next().await {
                if ev.kind == EventKind::Delete
                    && let Some(id) = ev.kv.key.strip_prefix(typed::MEMBERS)
                {
                    me.lose_worker(id, "its lease expired");
                }
            }
        });
        let mut failures: HashMap<WorkerId, u32> = HashMap::new();
        let mut last = std::time::Instant::now();
        loop {
            tokio::time::sleep(HEALTH_PERIOD).await;
            let (ranks, members) = self.group(|g| {
                let ranks: Vec<WorkerId> = g.active().map(|a| a.ranks.iter().map(|w| w.id.clone()).collect()).unwrap_or_default();
                (ranks, g.members())
            });
            let mut polls = tokio::task::JoinSet::new();
            for w in members {
                let Ok(link) = self.link(&w.id, &w.grpc) else { continue };
                let mut c = link.client;
                polls.spawn(async move {
                    let h = tokio::time::timeout(Duration::from_secs(1), c.health(pb::WorkerHealthRequest { take_steps: true })).await;
                    (w.id, h.ok().and_then(Result::ok).map(Response::into_inner))
                });
            }
            let mut reports = Vec::new();
            let mut broken = false;
            while let Some(Ok((id, h))) = polls.join_next().await {
                let f = failures.entry(id.clone()).or_default();
                *f = if h.is_some() { 0 } else { *f + 1 };
                if *f >= HEALTH_FAILURES {
                    self.lose_worker(&id, &format!("{HEALTH_FAILURES} health checks failed"));
                    continue;
                }
                let Some(h) = h else { continue };
                self.group(|g| g.observe_generation(h.generation.max(h.newest_generation), h.epoch));
                let Some(rank) = ranks.iter().position(|r| *r == id) else { continue };
                // A rank whose collectives failed waits for a new generation (see the worker's
                // rank loop); when no member is lost, re-form the group as it is.
                broken |= h.paused && h.generation == self.group(|g| g.active().map_or(0, |a| a.number));
                self.note_steps_during_migration(&h.recent_step_us);
                if rank == 0 {
                    self.0.recent_steps.extend(h.recent_step_us.iter().copied());
                    self.0.recent_projected_steps.extend(h.recent_projected_step_us.iter().copied());
                }
                reports.push((rank, h.expert_load));
            }
            if broken && self.group(|g| g.reform()) {
                eprintln!("a rank's collectives broke; re-forming the group");
                self.0.membership_changed.notify_one();
            }
            self.observe_load(&reports, last.elapsed().as_secs_f64());
            self.0.load_observed.notify_one();
            self.migration_poll_done();
            last = std::time::Instant::now();
        }
    }
}
