//! Prometheus metrics of the coordinator and the workers (served by `--metrics-listen`).
//!
//! Families (all prefixed `switchyard_`):
//! - coordinator: `placement_epoch`, `workers_alive`, `membership_changes_total`,
//!   `requests_in_flight` (queue depth), `requests_total{outcome}`, `tokens_total{rank}`,
//!   `layer_balancedness{layer}` and `balancedness` (mean/max rank load of the active placement
//!   under the windowed live load), `rank_load{rank}` (windowed routed assignments per rank),
//!   `migrations_total`, `migrated_experts_total`, `abandoned_epochs_total`, `generation`,
//!   `serving`, `missing_experts`, `world_size`;
//! - worker: `step_seconds` (histogram of busy engine steps), `alltoall_seconds` (histogram of
//!   dispatch/combine collectives), `alltoall_bytes_total`, `placement_epoch`,
//!   `active_requests`, `engine_steps_total`, `tokens_total`.

use telemetry::{Counter, Gauge, Histogram, Registry, TelemetryError};

const STEP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const A2A_BUCKETS: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0];

/// The coordinator's metrics.
pub struct CoordMetrics {
    pub registry: Registry,
    pub epoch: Gauge,
    pub workers_alive: Gauge,
    pub membership_changes: Counter,
    pub in_flight: Gauge,
    pub balancedness: Gauge,
    pub migrations: Counter,
    pub migrated_experts: Counter,
    pub abandoned_epochs: Counter,
    pub generation: Gauge,
    pub serving: Gauge,
    pub missing_experts: Gauge,
    pub world_size: Gauge,
}

impl CoordMetrics {
    pub fn new() -> Result<Self, TelemetryError> {
        let r = Registry::new();
        Ok(CoordMetrics {
            epoch: r.gauge("switchyard_placement_epoch", "Active placement epoch", &[])?,
            workers_alive: r.gauge("switchyard_workers_alive", "Workers taking requests", &[])?,
            membership_changes: r.counter("switchyard_membership_changes_total", "Workers lost (lease expired, health failed)", &[])?,
            in_flight: r.gauge("switchyard_requests_in_flight", "Requests accepted and not finished (queue depth)", &[])?,
            balancedness: r.gauge(
                "switchyard_balancedness",
                "Sum of mean over sum of max rank load of the active placement under the windowed live load",
                &[],
            )?,
            migrations: r.counter("switchyard_migrations_total", "Placement epochs the scheduler committed", &[])?,
            migrated_experts: r.counter("switchyard_migrated_experts_total", "Expert weights loaded by scheduler migrations", &[])?,
            abandoned_epochs: r.counter("switchyard_abandoned_epochs_total", "Placement epochs abandoned (a worker could not prepare)", &[])?,
            generation: r.gauge("switchyard_generation", "Generation of the expert-parallel group (one per membership change)", &[])?,
            serving: r.gauge("switchyard_serving", "1 while every expert of every layer has a slot on a live rank, else 0", &[])?,
            missing_experts: r.gauge("switchyard_missing_experts", "Experts (layer, expert) without a slot on any live rank", &[])?,
            world_size: r.gauge("switchyard_world_size", "Ranks of the active generation", &[])?,
            registry: r,
        })
    }

    /// `requests_total{outcome}`: completed, failed, invalid.
    pub fn request(&self, outcome: &str) {
        if let Ok(c) = self.registry.counter("switchyard_requests_total", "Requests by outcome", &[("outcome", outcome)]) {
            c.inc();
        }
    }

    /// `tokens_total{rank}`: the counter of tokens streamed from `rank`.
    pub fn tokens(&self, rank: usize) -> Option<Counter> {
        self.registry.counter("switchyard_tokens_total", "Tokens streamed to clients, by home rank", &[("rank", &rank.to_string())]).ok()
    }

    /// Per-layer balancedness and per-rank load of the active placement under the live window.
    pub fn set_balance(&self, per_layer: &[f64], total: f64, rank_load: &[f64]) {
        self.balancedness.set(total);
        for (l, b) in per_layer.iter().enumerate() {
            if let Ok(g) = self.registry.gauge(
                "switchyard_layer_balancedness",
                "Mean over max rank load of one MoE layer under the windowed live load",
                &[("layer", &l.to_string())],
            ) {
                g.set(*b);
            }
        }
        for (r, x) in rank_load.iter().enumerate() {
            if let Ok(g) = self.registry.gauge("switchyard_rank_load", "Windowed routed assignments per rank, all layers", &[("rank", &r.to_string())]) {
                g.set(*x);
            }
        }
    }
}

/// A worker's metrics.
pub struct WorkerMetrics {
    pub registry: Registry,
    pub step_seconds: Histogram,
    pub projected_step_seconds: Histogram,
    pub alltoall_seconds: Histogram,
    pub alltoall_bytes: Counter,
    pub epoch: Gauge,
    pub active: Gauge,
    pub steps: Gauge,
    pub tokens: Counter,
}

impl WorkerMetrics {
    pub fn new() -> Result<Self, TelemetryError> {
        let r = Registry::new();
        Ok(WorkerMetrics {
            step_seconds: r.histogram("switchyard_step_seconds", "Busy engine steps (forward over the batch)", &[], STEP_BUCKETS)?,
            projected_step_seconds: r.histogram(
                "switchyard_projected_step_seconds",
                "Busy steps of the expert-parallel group projected onto ranks with cores of their own (slowest rank per compute segment)",
                &[],
                STEP_BUCKETS,
            )?,
            alltoall_seconds: r.histogram("switchyard_alltoall_seconds", "Dispatch and combine all-to-all collectives", &[], A2A_BUCKETS)?,
            alltoall_bytes: r.counter("switchyard_alltoall_bytes_total", "Bytes sent to other ranks by dispatch and combine", &[])?,
            epoch: r.gauge("switchyard_placement_epoch", "Placement epoch this rank serves with", &[])?,
            active: r.gauge("switchyard_active_requests", "Running and waiting sequences on this rank", &[])?,
            steps: r.gauge("switchyard_engine_steps", "Engine steps since start (busy and idle)", &[])?,
            tokens: r.counter("switchyard_tokens_total", "Tokens generated on this rank", &[])?,
            registry: r,
        })
    }
}
