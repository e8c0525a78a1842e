//! Leader election on the state store, one round at a time: a compare-and-swap of the leader key
//! (absent → this coordinator's address, under its lease). The tokio coordinator
//! (`server::ha::Seat::campaign`) repeats rounds every 200 ms; the simulator runs the same round
//! over the embedded store on its clock.
//!
//! Why this is safe: the key lives under the winner's lease, so it vanishes when the winner stops
//! keeping the lease alive, and a leader that sees its lease lost stops acting (fail-stop). Two
//! coordinators can both believe they lead only while the old one has not yet noticed its lapsed
//! lease — which its own keep-alive deadline bounds.

use crate::store::typed::LEADER;
use crate::store::{LeaseId, StateStore, StoreError};

/// The outcome of one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// This coordinator holds the leader key.
    Won,
    /// Another holds it (its address, if it could be read).
    Standby(Option<String>),
}

/// One round: take the leader key if it is free, or find who holds it. A key that already names
/// `advertise` is ours from before a store hiccup (our lease still holds it): that is a win too.
pub async fn campaign_round<S: StateStore>(store: &S, lease: LeaseId, advertise: &str) -> Result<Campaign, StoreError> {
    match store.compare_and_swap(LEADER, 0, advertise.as_bytes().to_vec(), Some(lease)).await {
        Ok(_) => Ok(Campaign::Won),
        Err(StoreError::Conflict { .. }) => {
            let leader = store.get(LEADER).await?.map(|kv| String::from_utf8_lossy(&kv.value).to_string());
            Ok(if leader.as_deref() == Some(advertise) { Campaign::Won } else { Campaign::Standby(leader) })
        }
        Err(e) => Err(e),
    }
}

/// Whether `advertise` holds the leader key now.
pub async fn holds_leader_key<S: StateStore>(store: &S, advertise: &str) -> Result<bool, StoreError> {
    Ok(store.get(LEADER).await?.is_some_and(|kv| kv.value == advertise.as_bytes()))
}
