//! A worker process's registration with the coordinators and its membership lease, by the rules
//! of [`control::membership`](crate::control::membership): register until a leader accepts, put
//! the membership key under a lease, and register again (with the id it was given) after a
//! silence of health polls or a lapsed lease. `switchyard worker` runs it; the simulator runs the
//! same rules on its clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::control_client::ControlClient;

use crate::control::membership::Membership;
use crate::store::typed::{self, Member};
use crate::store::{AnyStore, KeepAlive, LeaseId, StateStore, StoreError};

/// Health-poll silence after which a member registers again (the leader polls every 250 ms).
pub const SILENCE: Duration = Duration::from_secs(5);
/// Pause between registration attempts.
const RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error("no coordinator address given")]
    NoCoordinator,
    #[error("register at {addr}: {code:?}: {message}")]
    Refused { addr: String, code: tonic::Code, message: String },
    #[error("no coordinator accepted the registration within {within:?} (last: {last})")]
    NotAccepted { within: Duration, last: String },
    #[error("the coordinator gave this worker no id (a coordinator older than generations?)")]
    NoId,
    #[error("membership key or lease [{code}]: {source}", code = .source.code())]
    Store {
        #[from]
        source: StoreError,
    },
}

/// Who this worker is and where to register.
#[derive(Clone)]
pub struct RegistrationConfig {
    pub coordinators: Vec<String>,
    pub grpc_address: String,
    pub transport_address: String,
    pub node: String,
    /// GPUs the worker computes on (0: CPU).
    pub gpus: u32,
    /// Where the membership key goes (etcd); `None`: no key (the embedded store lives in the
    /// coordinator, which then relies on health polls alone).
    pub store: Option<AnyStore>,
    pub lease_ttl: Duration,
}

/// A registered worker: its id and membership lease, kept by [`Registration::keep`].
pub struct Registration {
    cfg: RegistrationConfig,
    membership: Membership,
    lease: Option<(LeaseId, KeepAlive)>,
    origin: Instant,
}

impl Registration {
    /// Registers until a leader accepts (within `within`; coordinators may still be starting or
    /// electing) and writes the membership key.
    pub async fn start(cfg: RegistrationConfig, within: Duration) -> Result<Registration, RegistrationError> {
        if cfg.coordinators.is_empty() {
            return Err(RegistrationError::NoCoordinator);
        }
        let mut r = Registration { membership: Membership::new(ms(SILENCE), ms(RETRY)), lease: None, origin: Instant::now(), cfg };
        if let Some(store) = r.cfg.store.clone() {
            r.lease = Some(grant(&store, r.cfg.lease_ttl).await?);
        }
        let deadline = Instant::now() + within;
        loop {
            let last = match r.attempt().await {
                Ok(()) => return Ok(r),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::NotYet(why)) => why,
            };
            if Instant::now() >= deadline {
                return Err(RegistrationError::NotAccepted { within, last });
            }
            tracing::debug!("registration not accepted yet: {last}");
            tokio::time::sleep(RETRY).await;
        }
    }

    /// The id the leader gave this worker.
    pub fn worker_id(&self) -> &str {
        self.membership.id().unwrap_or_default()
    }

    /// Keeps the membership: `health_polls` counts the polls this worker answered. Runs until
    /// the process ends.
    pub async fn keep(mut self, health_polls: Arc<dyn Fn() -> u64 + Send + Sync>) {
        let mut seen = health_polls();
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = self.now();
            let polls = health_polls();
            if polls != seen {
                seen = polls;
                self.membership.heard(now);
            }
            if let (Some(store), Some((_, keep))) = (&self.cfg.store, &self.lease)
                && keep.is_lost()
            {
                match grant(store, self.cfg.lease_ttl).await {
                    Ok(l) => {
                        tracing::warn!("membership lease lapsed; registering again under a new one");
                        self.lease = Some(l);
                        self.membership.lease_lapsed();
                    }
                    Err(e) => tracing::warn!("membership lease lapsed and none can be granted [{}]: {e}", e.code()),
                }
            }
            if self.membership.due(now).is_none() {
                continue;
            }
            match self.attempt().await {
                Ok(()) => println!("worker {} registered again", self.worker_id()),
                Err(Attempt::NotYet(why)) => tracing::debug!("registering again: {why}"),
                Err(Attempt::Fatal(e)) => tracing::warn!("registering again: {e}"),
            }
        }
    }

    fn now(&self) -> u64 {
        ms(self.origin.elapsed())
    }

    /// One registration round over the coordinators; on acceptance the membership key is written.
    async fn attempt(&mut self) -> Result<(), Attempt> {
        let now = self.now();
        self.membership.attempted(now);
        let request = pb::RegisterRequest {
            grpc_address: self.cfg.grpc_address.clone(),
            transport_address: self.cfg.transport_address.clone(),
            rank_hint: -1,
            node: self.cfg.node.clone(),
            worker_id: self.membership.id().unwrap_or_default().to_string(),
            gpus: self.cfg.gpus,
        };
        let mut last = String::new();
        for addr in &self.cfg.coordinators {
            let reply = match crate::tls::endpoint(addr) {
                Ok(e) => match e.connect_timeout(Duration::from_secs(10)).connect().await {
                    Ok(ch) => ControlClient::new(ch).register(request.clone()).await,
                    Err(e) => {
                        last = format!("{addr}: {e}");
                        continue;
                    }
                },
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            let id = match reply {
                Ok(r) => r.into_inner().worker_id,
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    last = format!("{addr}: {}", s.message());
                    continue;
                }
                Err(s) => return Err(Attempt::Fatal(RegistrationError::Refused { addr: addr.clone(), code: s.code(), message: s.message().to_string() })),
            };
            if id.is_empty() {
                return Err(Attempt::Fatal(RegistrationError::NoId));
            }
            let old = self.membership.registered(id.clone(), self.now());
            if let (Some(store), Some((lease, _))) = (&self.cfg.store, &self.lease) {
                if let Some(old) = old {
                    typed::remove_member(store, &old).await.map_err(|e| Attempt::Fatal(e.into()))?;
                }
                let m = Member { id, rank: 0, node: self.cfg.node.clone(), addr: self.cfg.grpc_address.clone(), transport_addr: self.cfg.transport_address.clone(), gpus: self.cfg.gpus };
                typed::put_member(store, &m, Some(*lease)).await.map_err(|e| Attempt::Fatal(e.into()))?;
            }
            return Ok(());
        }
        Err(Attempt::NotYet(last))
    }
}

/// Why a round did not register: not yet (no leader answered: why), or never.
enum Attempt {
    NotYet(String),
    Fatal(RegistrationError),
}

async fn grant(store: &AnyStore, ttl: Duration) -> Result<(LeaseId, KeepAlive), StoreError> {
    let lease = store.grant_lease(ttl).await?;
    Ok((lease, store.keep_alive(lease, ttl / 3)))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}
