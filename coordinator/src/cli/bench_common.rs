//! Pieces every cluster benchmark uses: the load generator's runtime and percentiles.

/// The runtime the benchmark's clients run on. With pinned ranks its threads yield the cores to
/// them (only its own threads: workers of later runs are started from this process): the clients
/// stand for load from elsewhere.
pub fn load_generator_runtime(pinned: bool) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            if pinned {
                let _ = worker::affinity::lower_priority(super::local_cluster::COORDINATOR_NICE);
            }
        })
        .build()
}

/// The `q` quantile (0–1, nearest rank) of `v`, sorted in place; 0 for no values.
pub fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}
