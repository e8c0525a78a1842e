//! Coordinator high availability on the state store: leader election and store retries.
//!
//! Every coordinator holds a lease and campaigns by compare-and-swap of the leader key (absent →
//! its address, under its lease: `control::election`, the round the simulator runs too). The
//! winner leads; the others are standbys that answer clients
//! with `UNAVAILABLE` naming the leader, and poll the key: when the leader dies its lease expires,
//! the key vanishes and the next campaign wins. A leader that loses its lease exits (fail-stop),
//! so two leaders never act at once for longer than the lease TTL.
//!
//! The leader records the active generation (`coordinator::control::record`); a new leader adopts
//! its workers that still answer — they keep their KV caches and expert slots, nothing restarts.

use crate::control::election::{Campaign, campaign_round};
use crate::store::{AnyStore, KeepAlive, LeaseId, StateStore, StoreError};
use std::time::Duration;

/// Role of this coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Campaigning; the leader's address if known.
    Standby(Option<String>),
    Leader,
}

/// This coordinator's seat in the store.
pub struct Seat {
    pub store: AnyStore,
    pub lease: LeaseId,
    pub keep_alive: KeepAlive,
    /// The address written to the leader key (the client API).
    pub advertise: String,
}

impl Seat {
    /// Grants this coordinator's lease and keeps it alive from its own thread.
    pub async fn take(store: AnyStore, advertise: String, ttl: Duration) -> Result<Seat, StoreError> {
        let lease = store.grant_lease(ttl).await?;
        let keep_alive = store.keep_alive(lease, ttl / 3);
        Ok(Seat { store, lease, keep_alive, advertise })
    }

    /// Campaigns until this coordinator leads (one [`campaign_round`] every 200 ms); `on_standby`
    /// hears the current leader while waiting. Store outages are retried; only a lost lease ends
    /// the campaign with an error.
    pub async fn campaign(&self, mut on_standby: impl FnMut(Option<String>)) -> Result<(), StoreError> {
        let mut last_leader: Option<String> = None;
        loop {
            if self.keep_alive.is_lost() {
                return Err(StoreError::LeaseNotFound(self.lease.0));
            }
            match campaign_round(&self.store, self.lease, &self.advertise).await {
                Ok(Campaign::Won) => return Ok(()),
                Ok(Campaign::Standby(leader)) => {
                    if leader != last_leader {
                        on_standby(leader.clone());
                        last_leader = leader;
                    }
                }
                Err(e) if e.is_retryable() => tracing::warn!("campaign: {e}; retrying"),
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Retries a store write for a while (the store may be restarting); the last error otherwise.
pub async fn with_store_retries<T, F, Fut>(what: &str, mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    for _ in 0..20 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => {
                tracing::warn!("{what}: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
    f().await
}
