//! etcd-backed state store (`etcd-client`). Every call has a deadline and maps transport failures to
//! [`StoreError::Unavailable`]; watches reconnect and resume after the last delivered revision;
//! lease keep-alives run on their own thread with their own runtime and connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    EventKind, KeepAlive, KeyValue, LeaseId, Result, Revision, StateStore, StoreError, Watch,
    WatchEvent, check_key, normalize_prefix,
};

/// Connection settings of [`EtcdStore`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Deadline of each call (connect included); past it the call fails with `Unavailable`.
    pub op_timeout: Duration,
    /// Deadline of establishing a connection.
    pub connect_timeout: Duration,
    /// Pause between reconnect attempts of a watch.
    pub watch_retry: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            op_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            watch_retry: Duration::from_millis(200),
        }
    }
}

/// The etcd store. Cloning shares the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Arc<Vec<String>>,
    prefix: Arc<str>,
    opts: EtcdOptions,
}

fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::TransportError(t) => StoreError::Unavailable(format!("transport: {t}")),
        E::IoError(io) => StoreError::Unavailable(format!("io: {io}")),
        E::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::Unknown => StoreError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
            tonic::Code::NotFound if s.message().contains("lease") => StoreError::LeaseNotFound(0),
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StoreError::InvalidArgument(s.message().into()),
            c => StoreError::Internal(format!("{c:?}: {}", s.message())),
        },
        E::InvalidArgs(m) => StoreError::InvalidArgument(m),
        E::InvalidUri(u) => StoreError::InvalidArgument(format!("uri: {u}")),
        E::LeaseKeepAliveError(m) if m.contains("not found") => StoreError::LeaseNotFound(0),
        E::WatchError(m) | E::LeaseKeepAliveError(m) => StoreError::Unavailable(m),
        other => StoreError::Internal(other.to_string()),
    }
}

async fn with_deadline<T>(
    d: Duration,
    what: &str,
    f: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r.map_err(map_err),
        Err(_) => Err(StoreError::Unavailable(format!("etcd {what} timed out after {d:?}"))),
    }
}

async fn connect(endpoints: &[String], opts: &EtcdOptions) -> Result<Client> {
    let co = ConnectOptions::new()
        .with_connect_timeout(opts.connect_timeout)
        .with_timeout(opts.op_timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    with_deadline(opts.connect_timeout + opts.op_timeout, "connect", Client::connect(endpoints, Some(co))).await
}

fn kv_of(kv: &etcd_client::KeyValue, strip: usize) -> KeyValue {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    KeyValue {
        key: key.get(strip..).unwrap_or("").to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    }
}

impl EtcdStore {
    /// Connects to the etcd endpoints (`http://host:port`). The connection is made lazily by the
    /// underlying channel, so this succeeds even if etcd is down; calls then fail with
    /// `Unavailable` until it is up.
    pub async fn connect(endpoints: Vec<String>, prefix: &str, opts: EtcdOptions) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidArgument("no etcd endpoints".into()));
        }
        let client = connect(&endpoints, &opts).await?;
        Ok(EtcdStore { client, endpoints: Arc::new(endpoints), prefix: normalize_prefix(prefix).into(), opts })
    }

    /// Another view of the same etcd under a different prefix, sharing the connection.
    pub fn with_prefix(&self, prefix: &str) -> Self {
        EtcdStore { prefix: normalize_prefix(prefix).into(), ..self.clone() }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn d(&self) -> Duration {
        self.opts.op_timeout
    }
}

impl StateStore for EtcdStore {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let mut kv = self.client.kv_client();
        let r = with_deadline(self.d(), "get", kv.get(self.full(key), None)).await?;
        Ok(r.kvs().first().map(|k| kv_of(k, self.prefix.len())))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        check_key(key)?;
        let mut kv = self.client.kv_client();
        let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
        let r = with_deadline(self.d(), "put", kv.put(self.full(key), value, opts)).await.map_err(|e| lease_err(e, lease))?;
        Ok(r.header().map(|h| h.revision()).unwrap_or(0))
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision> {
        check_key(key)?;
        let full = self.full(key);
        let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(full.clone(), CompareOp::Equal, expected)])
            .and_then(vec![TxnOp::put(full.clone(), value, opts)])
            .or_else(vec![TxnOp::get(full, None)]);
        let mut kv = self.client.kv_client();
        let r = with_deadline(self.d(), "txn", kv.txn(txn)).await.map_err(|e| lease_err(e, lease))?;
        if r.succeeded() {
            return Ok(r.header().map(|h| h.revision()).unwrap_or(0));
        }
        let actual = r
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(|k| k.mod_revision()).unwrap_or(0)),
                _ => None,
            })
            .unwrap_or(0);
        Err(StoreError::Conflict { key: key.to_string(), expected, actual })
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        let mut kv = self.client.kv_client();
        let r = with_deadline(self.d(), "delete", kv.delete(self.full(key), None)).await?;
        Ok(r.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let mut kv = self.client.kv_client();
        let r = with_deadline(self.d(), "list", kv.get(self.full(prefix), Some(GetOptions::new().with_prefix()))).await?;
        let strip = self.prefix.len();
        Ok((r.kvs().iter().map(|k| kv_of(k, strip)).collect(), r.header().map(|h| h.revision()).unwrap_or(0)))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument("lease TTL must be positive".into()));
        }
        let secs = ttl.as_secs() as i64 + i64::from(ttl.subsec_nanos() > 0);
        let mut lc = self.client.lease_client();
        let r = with_deadline(self.d(), "lease grant", lc.grant(secs, None)).await?;
        Ok(LeaseId(r.id()))
    }

    async fn keep_alive_once(&self, lease: LeaseId) -> Result<()> {
        let mut lc = self.client.lease_client();
        keep_alive_round(&mut lc, lease, self.d()).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut lc = self.client.lease_client();
        with_deadline(self.d(), "lease revoke", lc.revoke(lease.0)).await.map_err(|e| lease_err(e, Some(lease)))?;
        Ok(())
    }

    fn keep_alive(&self, lease: LeaseId, interval: Duration) -> KeepAlive {
        let endpoints = self.endpoints.clone();
        let opts = self.opts.clone();
        KeepAlive::spawn(lease, "etcd-keepalive", move |stop, lost| {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(_) => return,
            };
            rt.block_on(async move {
                let mut client: Option<Client> = None;
                loop {
                    if client.is_none() {
                        client = connect(&endpoints, &opts).await.ok();
                    }
                    if let Some(c) = &client {
                        let mut lc = c.lease_client();
                        match keep_alive_round(&mut lc, lease, opts.op_timeout).await {
                            Ok(()) => {}
                            Err(StoreError::LeaseNotFound(_)) => {
                                lost.store(true, Ordering::SeqCst);
                                return;
                            }
                            Err(e) => tracing::debug!(lease = lease.0, error = %e, "lease keep-alive failed; retrying"),
                        }
                    }
                    // Wait for the interval or a stop (sender dropped).
                    let deadline = std::time::Instant::now() + interval;
                    loop {
                        match stop.try_recv() {
                            Err(std::sync::mpsc::TryRecvError::Empty) => {}
                            _ => return,
                        }
                        let now = std::time::Instant::now();
                        if now >= deadline {
                            break;
                        }
                        tokio::time::sleep((deadline - now).min(Duration::from_millis(20))).await;
                    }
                }
            });
        })
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watch> {
        let full = self.full(prefix);
        let strip = self.prefix.len();
        let start = match from {
            Some(r) => r.max(1),
            None => self.list_revision().await? + 1,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let client = self.client.clone();
        let retry = self.opts.watch_retry;
        tokio::spawn(watch_loop(client, full, strip, start, retry, tx));
        Ok(Watch::new(rx, start))
    }
}

impl EtcdStore {
    async fn list_revision(&self) -> Result<Revision> {
        let mut kv = self.client.kv_client();
        let r = with_deadline(
            self.d(),
            "revision",
            kv.get(self.full("\u{0}"), Some(GetOptions::new().with_count_only())),
        )
        .await?;
        Ok(r.header().map(|h| h.revision()).unwrap_or(0))
    }
}

fn lease_err(e: StoreError, lease: Option<LeaseId>) -> StoreError {
    match (e, lease) {
        (StoreError::LeaseNotFound(_), Some(l)) => StoreError::LeaseNotFound(l.0),
        (StoreError::Internal(m), Some(l)) if m.contains("lease not found") => StoreError::LeaseNotFound(l.0),
        (e, _) => e,
    }
}

async fn keep_alive_round(lc: &mut etcd_client::LeaseClient, lease: LeaseId, d: Duration) -> Result<()> {
    let round = async {
        let (mut keeper, mut stream) = lc.keep_alive(lease.0).await?;
        keeper.keep_alive().await?;
        stream.message().await
    };
    match with_deadline(d, "lease keep-alive", round).await.map_err(|e| lease_err(e, Some(lease)))? {
        Some(r) if r.ttl() > 0 => Ok(()),
        Some(_) => Err(StoreError::LeaseNotFound(lease.0)),
        None => Err(StoreError::Unavailable("lease keep-alive stream closed".into())),
    }
}

/// Runs one logical watch: (re)connects, delivers events in order, and after a disconnect resumes
/// at the revision after the last one delivered. Ends when the receiver is dropped or on a
/// terminal error (compaction).
async fn watch_loop(
    client: Client,
    full: String,
    strip: usize,
    mut next: Revision,
    retry: Duration,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
) {
    loop {
        if tx.is_closed() {
            return;
        }
        let mut wc = client.watch_client();
        let opts = WatchOptions::new().with_prefix().with_start_revision(next).with_progress_notify();
        let stream = tokio::select! {
            _ = tx.closed() => return,
            s = tokio::time::timeout(Duration::from_secs(5), wc.watch(full.clone(), Some(opts))) => s,
        };
        let mut stream = match stream {
            Ok(Ok(s)) => s,
            _ => {
                tokio::select! { _ = tx.closed() => return, _ = tokio::time::sleep(retry) => {} }
                continue;
            }
        };
        let floor = next;
        loop {
            let msg = tokio::select! {
                _ = tx.closed() => return,
                m = stream.message() => m,
            };
            let resp = match msg {
                Ok(Some(r)) => r,
                Ok(None) | Err(_) => break, // disconnected: reconnect from `next`
            };
            if resp.compact_revision() > 0 {
                let _ = tx.send(Err(StoreError::Compacted { requested: next, compacted: resp.compact_revision() }));
                return;
            }
            if resp.canceled() {
                break;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let mut kv = kv_of(kv, strip);
                let kind = match ev.event_type() {
                    EventType::Put => EventKind::Put,
                    EventType::Delete => {
                        kv.value.clear();
                        EventKind::Delete
                    }
                };
                if kv.mod_revision < floor {
                    continue; // already delivered before a reconnect
                }
                next = kv.mod_revision + 1;
                if tx.send(Ok(WatchEvent { kind, kv })).is_err() {
                    return;
                }
            }
        }
        tokio::select! { _ = tx.closed() => return, _ = tokio::time::sleep(retry) => {} }
    }
}
