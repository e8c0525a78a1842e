//! The control plane's state store: versioned keys under a configurable prefix, compare-and-swap,
//! leases and watches that resume from a revision.
//!
//! Two implementations share the [`StateStore`] trait and one test suite:
//! - [`EtcdStore`] (`etcd://host:port[,host:port...]/prefix`) for clusters;
//! - [`EmbeddedStore`] (`embedded:///prefix`) in-process, the default of `switchyard up`: same
//!   semantics, lease expiry by heartbeat timeout, watch from a revision.
//!
//! Keys passed to the trait are relative to the store's prefix; keys returned are relative too.
//! Revisions are store-wide and strictly increasing; every put/delete gets a new one.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

pub mod embedded;
pub mod etcd;
pub mod typed;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdOptions, EtcdStore};

/// A store revision (etcd's cluster-wide revision; the embedded store keeps its own counter).
pub type Revision = i64;

/// Errors of the state store. Each has a stable [`code`](StoreError::code); only
/// [`Unavailable`](StoreError::Unavailable) is worth retrying unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (down, restarting, partitioned, timed out). Retryable.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// A compare-and-swap found a different revision than expected (`actual` 0: key absent).
    #[error("conflict on key {key:?}: expected mod revision {expected}, found {actual}")]
    Conflict { key: String, expected: Revision, actual: Revision },
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(i64),
    /// A watch asked for history that the store has compacted away; re-list and watch again.
    #[error("revision {requested} is compacted (oldest available {compacted})")]
    Compacted { requested: Revision, compacted: Revision },
    /// The key or argument is not acceptable (empty key, zero TTL, bad URL).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A stored value could not be decoded into the typed record.
    #[error("cannot decode value of {key:?}: {reason}")]
    Decode { key: String, reason: String },
    /// Anything else the store reported.
    #[error("state store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// A stable machine-readable code, for logs, metrics and gRPC status mapping.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "STORE_UNAVAILABLE",
            StoreError::Conflict { .. } => "STORE_CONFLICT",
            StoreError::LeaseNotFound(_) => "STORE_LEASE_NOT_FOUND",
            StoreError::Compacted { .. } => "STORE_COMPACTED",
            StoreError::InvalidArgument(_) => "STORE_INVALID_ARGUMENT",
            StoreError::Decode { .. } => "STORE_DECODE",
            StoreError::Internal(_) => "STORE_INTERNAL",
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A lease id. Keys put with a lease are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

/// One key with its versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Key relative to the store prefix.
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the put that created the key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last put (for a delete event: the revision of the delete).
    pub mod_revision: Revision,
    /// Number of puts since creation (0 for a delete event).
    pub version: i64,
    pub lease: Option<LeaseId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For deletes, `value` is empty and `mod_revision` is the delete's revision.
    pub kv: KeyValue,
}

impl WatchEvent {
    /// The revision of this change; watch again from `revision() + 1` to resume after it.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// A stream of changes under a prefix, in revision order. Dropping it cancels the watch.
/// An `Err` item is terminal (e.g. [`StoreError::Compacted`]); transient disconnects of etcd are
/// handled inside (the watch reconnects and resumes after the last revision it delivered).
pub struct Watch {
    rx: mpsc::UnboundedReceiver<Result<WatchEvent>>,
    last: Revision,
}

impl Watch {
    pub(crate) fn new(rx: mpsc::UnboundedReceiver<Result<WatchEvent>>, start: Revision) -> Self {
        Watch { rx, last: start - 1 }
    }

    /// The next event; `None` when the watch ended (store dropped).
    pub async fn next(&mut self) -> Option<Result<WatchEvent>> {
        let item = self.rx.recv().await;
        if let Some(Ok(ev)) = &item {
            self.last = ev.revision();
        }
        item
    }

    /// The revision of the last event returned by [`next`](Watch::next) (or start − 1).
    pub fn last_revision(&self) -> Revision {
        self.last
    }
}

/// Keeps a lease alive from a dedicated OS thread (so a busy async runtime cannot starve it) until
/// dropped or stopped. Dropping it stops refreshing; the lease then expires after its TTL.
pub struct KeepAlive {
    lost: Arc<AtomicBool>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    lease: LeaseId,
}

impl KeepAlive {
    pub(crate) fn spawn<F>(lease: LeaseId, name: &str, body: F) -> Self
    where
        F: FnOnce(std::sync::mpsc::Receiver<()>, Arc<AtomicBool>) + Send + 'static,
    {
        let lost = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = lost.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(rx, l))
            .expect("spawn keep-alive thread");
        KeepAlive { lost, stop: Some(tx), lease }
    }

    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// True once the store said the lease no longer exists (expired or revoked).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Stops refreshing (the lease expires after its TTL unless revoked).
    pub fn stop(mut self) {
        self.stop.take();
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.take();
    }
}

/// The state store interface. All keys are relative to [`prefix`](StateStore::prefix).
pub trait StateStore: Send + Sync + 'static {
    /// The absolute key prefix this store works under (ends with `/`).
    fn prefix(&self) -> &str;

    /// The key, or `None` if absent.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>>> + Send;

    /// Writes the key unconditionally; returns the new revision.
    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>)
    -> impl Future<Output = Result<Revision>> + Send;

    /// Writes the key only if its mod revision equals `expected` (0: only if absent). Returns the
    /// new revision, or [`StoreError::Conflict`] with the actual revision.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision>> + Send;

    /// Deletes the key; returns whether it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;

    /// All keys under `prefix` (relative), sorted, and the store revision they were read at.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<(Vec<KeyValue>, Revision)>> + Send;

    /// Grants a lease with the given TTL (rounded up to whole seconds for etcd).
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId>> + Send;

    /// Refreshes the lease once; [`StoreError::LeaseNotFound`] if it has expired.
    fn keep_alive_once(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;

    /// Revokes the lease, deleting its keys.
    fn revoke_lease(&self, lease: LeaseId) -> impl Future<Output = Result<()>> + Send;

    /// Keeps the lease alive every `interval` from a dedicated thread until the handle is dropped.
    fn keep_alive(&self, lease: LeaseId, interval: Duration) -> KeepAlive;

    /// Watches changes under `prefix` (relative) starting at `from` (inclusive; `None`: from now).
    fn watch(&self, prefix: &str, from: Option<Revision>) -> impl Future<Output = Result<Watch>> + Send;
}

/// Normalises a configured prefix: leading `/`, trailing `/`, no empty segments.
pub fn normalize_prefix(prefix: &str) -> String {
    let parts: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
    if parts.is_empty() { "/".into() } else { format!("/{}/", parts.join("/")) }
}

pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::InvalidArgument("empty key".into()));
    }
    Ok(())
}

/// A store chosen at run time from a URL; implements [`StateStore`] by delegation.
#[derive(Clone)]
pub enum AnyStore {
    Etcd(Box<EtcdStore>),
    Embedded(EmbeddedStore),
}

impl AnyStore {
    /// Opens `etcd://h1:2379,h2:2379/prefix` or `embedded:///prefix` (also `embedded://`).
    pub async fn open(url: &str) -> Result<AnyStore> {
        if let Some(rest) = url.strip_prefix("etcd://") {
            let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, "switchyard"));
            let endpoints: Vec<String> = hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| if h.contains("://") { h.to_string() } else { format!("http://{h}") })
                .collect();
            if endpoints.is_empty() {
                return Err(StoreError::InvalidArgument(format!("no etcd endpoint in {url:?}")));
            }
            let prefix = if prefix.is_empty() { "switchyard" } else { prefix };
            Ok(AnyStore::Etcd(Box::new(EtcdStore::connect(endpoints, prefix, EtcdOptions::default()).await?)))
        } else if let Some(rest) = url.strip_prefix("embedded://") {
            let prefix = if rest.trim_matches('/').is_empty() { "switchyard" } else { rest };
            Ok(AnyStore::Embedded(EmbeddedStore::new(prefix)))
        } else {
            Err(StoreError::InvalidArgument(format!(
                "store URL {url:?}: expected etcd://HOST:PORT[,HOST:PORT]/PREFIX or embedded:///PREFIX"
            )))
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Etcd($s) => $e,
            AnyStore::Embedded($s) => $e,
        }
    };
}

impl StateStore for AnyStore {
    fn prefix(&self) -> &str {
        delegate!(self, s => s.prefix())
    }
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        delegate!(self, s => s.get(key).await)
    }
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        delegate!(self, s => s.put(key, value, lease).await)
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision> {
        delegate!(self, s => s.compare_and_swap(key, expected, value, lease).await)
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        delegate!(self, s => s.delete(key).await)
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        delegate!(self, s => s.list(prefix).await)
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        delegate!(self, s => s.grant_lease(ttl).await)
    }
    async fn keep_alive_once(&self, lease: LeaseId) -> Result<()> {
        delegate!(self, s => s.keep_alive_once(lease).await)
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        delegate!(self, s => s.revoke_lease(lease).await)
    }
    fn keep_alive(&self, lease: LeaseId, interval: Duration) -> KeepAlive {
        delegate!(self, s => s.keep_alive(lease, interval))
    }
    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watch> {
        delegate!(self, s => s.watch(prefix, from).await)
    }
}
