//! The leader's generation driver: adopting a recorded generation, forming every generation the
//! group plans on its workers, membership (lease watch, health polls), and the rebalance loop.
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1 as pb;
use tonic::Response;

use super::ha::{Role, Seat, with_store_retries};
use super::{CoordSvc, HEALTH_PERIOD, MigrationWatch, REGROUP_TIMEOUT, RecordQueue, WorkerLink, link_to, transport_setup};
use crate::control::formation::{Formation, Formed, RegroupReply};
use crate::control::health::{HealthReport, HealthWatch, Verdict};
use crate::control::record::{self, Recorded};
use crate::control::succession::{self, RankProbe};
use crate::control::{Generation, WorkerId, WorkerInfo};
use crate::store::typed;
use crate::store::{EventKind, StateStore};

impl CoordSvc {
    /// This coordinator won the election: take over from the predecessor (see
    /// `control::succession`): its recorded generation with the ranks that still answer (they
    /// keep their KV caches and experts), the workers registered with it, its reservation floor.
    pub(crate) async fn lead(self, seat: Arc<Seat>) {
        let _ = self.0.records.set(RecordQueue::spawn(seat.store.clone()));
        if let Some(policy) = self.0.policy.lock().ok().and_then(|mut p| p.take()) {
            tokio::spawn(self.clone().rebalance_loop(policy));
        }
        let (layers, experts) = (self.0.cfg.moe_layers().len(), self.0.cfg.router.n_experts);
        let recorded = match record::recorded_generation(&seat.store).await {
            Ok(Some(rec)) => succession::usable_record(&rec, layers, experts).inspect_err(|e| tracing::warn!("ignoring it: {e}")).ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("cannot read the recorded generation [{}]: {e}; waiting for workers to register", e.code());
                None
            }
        };
        let probes = match &recorded {
            Some(g) => self.probe_ranks(g).await,
            None => Vec::new(),
        };
        let members = match typed::list_members(&seat.store).await {
            Ok((m, _)) => m.into_iter().map(|m| WorkerInfo { id: m.id, grpc: m.addr, transport: m.transport_addr, node: m.node, gpus: m.gpus }).collect(),
            Err(e) => {
                tracing::warn!("cannot list the members [{}]: {e}", e.code());
                Vec::new()
            }
        };
        let reserved = match with_store_retries("generation reservation", || record::reserved_generation(&seat.store)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot read the generation reservation [{}]: {e}; planning above what the workers report", e.code());
                None
            }
        };
        let s = self.group(|g| succession::succeed(g, recorded, &probes, members, reserved));
        if let Some((n, adopted, world)) = s.adopted {
            println!("adopted {adopted} of {world} running workers of generation {n}");
        }
        for id in &s.taken_over {
            println!("took over worker {id} registered with the previous leader");
        }
        self.0.role.send_replace(Role::Leader);
        match self.group(|g| g.active().map(|a| (a.number, a.world()))) {
            Some((n, w)) => println!("leading; adopted generation {n} of {w} ranks"),
            None => println!("leading; waiting for {} workers", self.group(|g| g.settings().min_workers)),
        }
        tokio::spawn(self.clone().drive_generations());
        tokio::spawn(self.clone().watch_membership(seat));
    }

    /// Asks every rank of a recorded generation for its health, at once: which answer, and the
    /// newest generation each was asked to join.
    async fn probe_ranks(&self, g: &Generation) -> Vec<RankProbe> {
        let mut set = tokio::task::JoinSet::new();
        for w in &g.ranks {
            let Ok(link) = link_to(&w.grpc) else { continue };
            let id = w.id.clone();
            set.spawn(async move {
                let mut c = link.client.clone();
                let h = tokio::time::timeout(Duration::from_secs(3), c.health(pb::WorkerHealthRequest::default())).await;
                (id, link, h.ok().and_then(Result::ok).map(Response::into_inner))
            });
        }
        let mut probes: Vec<RankProbe> = g.ranks.iter().map(|w| RankProbe { id: w.id.clone(), answered: None }).collect();
        while let Some(Ok((id, link, h))) = set.join_next().await {
            let Some(h) = h else { continue };
            if let Some(p) = probes.iter_mut().find(|p| p.id == id) {
                p.answered = Some((h.generation.max(h.newest_generation), h.epoch));
            }
            if let Ok(mut l) = self.0.links.lock() {
                l.insert(id, link);
            }
        }
        probes
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

    /// Reserves generation `g`'s number in the store (`record::reserve_generation`); `false`
    /// (and the generation dropped) when the store holds a later one or cannot be written.
    async fn reserve(&self, g: &Generation) -> bool {
        let Some(seat) = self.0.seat.get() else { return true };
        let outcome = with_store_retries("generation reservation", || record::reserve_generation(&seat.store, g.number, g.epoch)).await;
        let floor = match outcome {
            Ok(Recorded::Written) => return true,
            Ok(Recorded::Superseded { number, epoch }) => {
                eprintln!("generation {} not carried out: a leader reserved generation {number} already", g.number);
                Some((number, epoch))
            }
            Err(e) => {
                tracing::error!("generation {}: cannot reserve its number [{}]: {e}", g.number, e.code());
                None
            }
        };
        self.group(|grp| {
            if let Some((n, e)) = floor {
                grp.observe_generation(n, e);
            }
            let _ = grp.regroup_abandoned(g.number, &[]);
        });
        self.0.membership_changed.notify_one();
        false
    }

    /// Carries generation `g` out on its workers: every rank keeps what it holds, loads what it
    /// gains, and joins the new mesh; the group switches when all have (`control::formation`).
    pub(crate) async fn form(&self, g: Generation) {
        let t0 = std::time::Instant::now();
        if !self.reserve(&g).await {
            return;
        }
        let mut formation = Formation::new(&g);
        let mut set = self.send_regroups(&g);
        while let Some(j) = set.join_next().await {
            let (id, r) = match j {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!("regroup task: {e}");
                    continue;
                }
            };
            let reply = match r {
                Ok(r) => RegroupReply::Joined { loaded_experts: r.loaded_experts as u64, kept_sequences: r.kept_sequences as u64 },
                Err((code, e)) => {
                    eprintln!("worker {id} did not join generation {}: {e}", g.number);
                    if code == tonic::Code::Aborted { RegroupReply::Superseded } else { RegroupReply::Failed(e) }
                }
            };
            if formation.reply(&id, reply) {
                break;
            }
        }
        // Decided: a failed rank abandons the generation at once (see `Formation`).
        set.abort_all();
        match self.group(|grp| formation.finish(grp)) {
            Err(e) => tracing::warn!("generation {}: {e}", g.number),
            Ok(Formed::Serving { loaded_experts, kept_sequences }) => {
                self.0.metrics.membership_changes.inc();
                self.record_active();
                println!(
                    "generation {} serving: {} ranks, epoch {}, {loaded_experts} experts loaded, {kept_sequences} sequences kept, {} ms",
                    g.number,
                    g.world(),
                    g.epoch,
                    t0.elapsed().as_millis()
                );
            }
            Ok(Formed::Abandoned { lost }) => {
                if let Ok(mut l) = self.0.links.lock() {
                    for id in &lost {
                        l.remove(id);
                    }
                }
                self.0.membership_changed.notify_one();
            }
        }
    }

    /// Sends `Regroup` for generation `g` to each of its ranks; each task ends with the rank's
    /// answer or why there is none.
    fn send_regroups(&self, g: &Generation) -> tokio::task::JoinSet<(WorkerId, Result<pb::RegroupResponse, (tonic::Code, String)>)> {
        let mut set = tokio::task::JoinSet::new();
        // Every generation is a new communicator: NCCL needs a unique id of its own for it.
        let setup = serde_json::to_string(&g.placement)
            .map_err(|e| format!("placement of generation {}: {e}", g.number))
            .and_then(|json| transport_setup(&self.0.transport).map(|t| (json, t)).map_err(|e| format!("transport setup: {e:#}")));
        let (json, (transport, nccl_unique_id)) = match setup {
            Ok(s) => s,
            Err(why) => {
                // Nothing can be sent: every rank's answer is this error.
                for w in &g.ranks {
                    let (id, why) = (w.id.clone(), why.clone());
                    set.spawn(async move { (id, Err((tonic::Code::Internal, why))) });
                }
                return set;
            }
        };
        let peers: Vec<String> = g.ranks.iter().map(|w| w.transport.clone()).collect();
        let nodes = g.node_indices();
        for (rank, w) in g.ranks.iter().enumerate() {
            let id = w.id.clone();
            let link = match self.link(&w.id, &w.grpc) {
                Ok(l) => l,
                Err(e) => {
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
                    data_path: self.0.data_path.name(),
                }),
            };
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
        set
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

    /// Leader only: members are lost, or the group re-formed, as `control::health` decides from
    /// the membership leases (a watch for fast notice, and a listing every poll in case the watch
    /// broke) and from health polls every `HEALTH_PERIOD`, which also bring the expert load.
    pub(crate) async fn watch_membership(self, seat: Arc<Seat>) {
        let me = self.clone();
        let watch_store = seat.store.clone();
        tokio::spawn(async move {
            let mut watch = match watch_store.watch(typed::MEMBERS, None).await {
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
        let mut health = HealthWatch::default();
        let mut last = std::time::Instant::now();
        loop {
            tokio::time::sleep(HEALTH_PERIOD).await;
            if let Ok((listed, _)) = typed::list_members(&seat.store).await {
                let listed: Vec<WorkerId> = listed.into_iter().map(|m| m.id).collect();
                for id in self.group(|g| health.lapsed(g, &listed)) {
                    self.lose_worker(&id, "its lease expired");
                }
            }
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
            let mut reform = false;
            while let Some(Ok((id, h))) = polls.join_next().await {
                let report = h.as_ref().map(|h| HealthReport { generation: h.generation, newest_generation: h.newest_generation, epoch: h.epoch, paused: h.paused });
                match self.group(|g| health.observe(g, &id, report)) {
                    Verdict::Lost(why) => {
                        self.lose_worker(&id, &why);
                        health.forget(&id);
                        continue;
                    }
                    Verdict::Reform => reform = true,
                    Verdict::Healthy | Verdict::Silent => {}
                }
                let (Some(h), Some(rank)) = (h, ranks.iter().position(|r| *r == id)) else { continue };
                self.note_steps_during_migration(&h.recent_step_us);
                if rank == 0 {
                    self.0.recent_steps.extend(h.recent_step_us.iter().copied());
                    self.0.recent_projected_steps.extend(h.recent_projected_step_us.iter().copied());
                }
                reports.push((rank, h.expert_load));
            }
            if reform && self.group(|g| g.reform()) {
                eprintln!("a rank's collectives broke or it left the active generation; re-forming the group");
                self.0.membership_changed.notify_one();
            }
            self.observe_load(&reports, last.elapsed().as_secs_f64());
            self.0.load_observed.notify_one();
            self.migration_poll_done();
            last = std::time::Instant::now();
        }
    }
}
