//! In-process state store for one machine (`switchyard up`): the same semantics as etcd —
//! revisions, CAS, leases that expire after a heartbeat timeout, watch from a revision — kept in
//! memory. History for watches is bounded ([`HISTORY_LIMIT`] events); older starts get
//! [`StoreError::Compacted`].
//!
//! Leases expire on a [`StoreClock`]: the wall clock in production, or a clock the deterministic
//! simulator (`control::sim`) sets, so the simulator runs this very store.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{
    EventKind, KeepAlive, KeyValue, LeaseId, Result, Revision, StateStore, StoreError, Watch,
    WatchEvent, check_key, normalize_prefix,
};

/// Events kept for watches that start in the past.
pub const HISTORY_LIMIT: usize = 100_000;
/// How often the reaper thread checks for expired leases.
const REAP_INTERVAL: Duration = Duration::from_millis(50);

struct Entry {
    value: Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    version: i64,
    lease: Option<LeaseId>,
}

struct Lease {
    ttl: Duration,
    /// On the store's clock.
    deadline: Duration,
    keys: HashSet<String>,
}

struct Watcher {
    prefix: String,
    /// Length of the store prefix to strip from keys sent to this watcher.
    strip: usize,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
}

#[derive(Default)]
struct Inner {
    revision: Revision,
    kv: BTreeMap<String, Entry>,
    leases: HashMap<i64, Lease>,
    next_lease: i64,
    history: VecDeque<WatchEvent>,
    watchers: Vec<Watcher>,
}

impl Inner {
    fn kv_of(key: &str, e: &Entry) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: e.value.clone(),
            create_revision: e.create_revision,
            mod_revision: e.mod_revision,
            version: e.version,
            lease: e.lease,
        }
    }

    fn emit(&mut self, ev: WatchEvent) {
        self.watchers.retain(|w| {
            if ev.kv.key.starts_with(&w.prefix) {
                w.tx.send(Ok(stripped(&ev, w.strip))).is_ok()
            } else {
                !w.tx.is_closed()
            }
        });
        if self.history.len() == HISTORY_LIMIT {
            self.history.pop_front();
        }
        self.history.push_back(ev);
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        if let Some(l) = lease
            && !self.leases.contains_key(&l.0)
        {
            return Err(StoreError::LeaseNotFound(l.0));
        }
        self.revision += 1;
        let rev = self.revision;
        let (create, version, old_lease) = match self.kv.get(key) {
            Some(e) => (e.create_revision, e.version + 1, e.lease),
            None => (rev, 1, None),
        };
        if let Some(old) = old_lease
            && let Some(l) = self.leases.get_mut(&old.0)
        {
            l.keys.remove(key);
        }
        if let Some(l) = lease {
            self.leases.get_mut(&l.0).expect("checked").keys.insert(key.to_string());
        }
        let e = Entry { value, create_revision: create, mod_revision: rev, version, lease };
        let kv = Self::kv_of(key, &e);
        self.kv.insert(key.to_string(), e);
        self.emit(WatchEvent { kind: EventKind::Put, kv });
        Ok(rev)
    }

    fn delete(&mut self, key: &str) -> bool {
        let Some(e) = self.kv.remove(key) else { return false };
        if let Some(l) = e.lease
            && let Some(l) = self.leases.get_mut(&l.0)
        {
            l.keys.remove(key);
        }
        self.revision += 1;
        let kv = KeyValue {
            key: key.to_string(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: self.revision,
            version: 0,
            lease: None,
        };
        self.emit(WatchEvent { kind: EventKind::Delete, kv });
        true
    }

    fn drop_lease(&mut self, id: i64) -> bool {
        let Some(l) = self.leases.remove(&id) else { return false };
        let mut keys: Vec<String> = l.keys.into_iter().collect();
        keys.sort();
        for k in keys {
            self.delete(&k);
        }
        true
    }

    fn reap(&mut self, now: Duration) {
        let mut expired: Vec<i64> = self.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        expired.sort();
        for id in expired {
            self.drop_lease(id);
        }
    }
}

/// The time lease deadlines are kept in.
#[derive(Clone, Debug)]
pub enum StoreClock {
    /// Time since the store was made.
    Wall(Instant),
    /// A simulated clock: whatever its owner set last.
    Simulated(SimClock),
}

impl StoreClock {
    fn now(&self) -> Duration {
        match self {
            StoreClock::Wall(origin) => origin.elapsed(),
            StoreClock::Simulated(c) => Duration::from_millis(c.now_ms()),
        }
    }
}

/// A clock in milliseconds that only moves when its owner sets it (shared by clones).
#[derive(Clone, Debug, Default)]
pub struct SimClock(Arc<AtomicU64>);

impl SimClock {
    pub fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Moves the clock to `ms` (never back).
    pub fn set_ms(&self, ms: u64) {
        self.0.fetch_max(ms, Ordering::SeqCst);
    }
}

/// The embedded store. Cloning shares the same state.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Mutex<Inner>>,
    prefix: Arc<str>,
    clock: StoreClock,
}

impl EmbeddedStore {
    /// A fresh empty store; keys live under `prefix`. Starts a small reaper thread that expires
    /// leases (it exits when the last clone of the store is dropped).
    pub fn new(prefix: &str) -> Self {
        let inner = Arc::new(Mutex::new(Inner { next_lease: 1, ..Default::default() }));
        let clock = StoreClock::Wall(Instant::now());
        let weak: Weak<Mutex<Inner>> = Arc::downgrade(&inner);
        let reaper_clock = clock.clone();
        std::thread::Builder::new()
            .name("store-reaper".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(REAP_INTERVAL);
                    let Some(inner) = weak.upgrade() else { return };
                    lock(&inner).reap(reaper_clock.now());
                }
            })
            .expect("spawn reaper thread");
        EmbeddedStore { inner, prefix: normalize_prefix(prefix).into(), clock }
    }

    /// A store whose leases expire on `clock`, with no threads: every call reaps what expired
    /// (so its futures complete at once, and watches see deletions when the store is next used).
    pub fn simulated(prefix: &str, clock: SimClock) -> Self {
        let inner = Arc::new(Mutex::new(Inner { next_lease: 1, ..Default::default() }));
        EmbeddedStore { inner, prefix: normalize_prefix(prefix).into(), clock: StoreClock::Simulated(clock) }
    }

    /// Another view of the same data under a different prefix (like a second etcd client).
    pub fn with_prefix(&self, prefix: &str) -> Self {
        EmbeddedStore { inner: self.inner.clone(), prefix: normalize_prefix(prefix).into(), clock: self.clock.clone() }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn rel(&self, kv: KeyValue) -> KeyValue {
        KeyValue { key: kv.key[self.prefix.len()..].to_string(), ..kv }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut g = lock(&self.inner);
        g.reap(self.clock.now());
        g
    }
}

fn stripped(ev: &WatchEvent, strip: usize) -> WatchEvent {
    let mut ev = ev.clone();
    ev.kv.key = ev.kv.key[strip..].to_string();
    ev
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave the maps half-updated in a way that matters more
    // than losing the store; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn refresh(inner: &Mutex<Inner>, clock: &StoreClock, lease: LeaseId) -> Result<()> {
    let mut g = lock(inner);
    let now = clock.now();
    g.reap(now);
    match g.leases.get_mut(&lease.0) {
        Some(l) => {
            l.deadline = now + l.ttl;
            Ok(())
        }
        None => Err(StoreError::LeaseNotFound(lease.0)),
    }
}

impl StateStore for EmbeddedStore {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let full = self.full(key);
        let g = self.state();
        Ok(g.kv.get(&full).map(|e| self.rel(Inner::kv_of(&full, e))))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        check_key(key)?;
        self.state().put(&self.full(key), value, lease)
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
        let mut g = self.state();
        let actual = g.kv.get(&full).map(|e| e.mod_revision).unwrap_or(0);
        if actual != expected {
            return Err(StoreError::Conflict { key: key.to_string(), expected, actual });
        }
        g.put(&full, value, lease)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        Ok(self.state().delete(&self.full(key)))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let full = self.full(prefix);
        let g = self.state();
        let kvs = g
            .kv
            .range(full.clone()..)
            .take_while(|(k, _)| k.starts_with(&full))
            .map(|(k, e)| self.rel(Inner::kv_of(k, e)))
            .collect();
        Ok((kvs, g.revision))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument("lease TTL must be positive".into()));
        }
        let deadline = self.clock.now() + ttl;
        let mut g = self.state();
        let id = g.next_lease;
        g.next_lease += 1;
        g.leases.insert(id, Lease { ttl, deadline, keys: HashSet::new() });
        Ok(LeaseId(id))
    }

    async fn keep_alive_once(&self, lease: LeaseId) -> Result<()> {
        refresh(&self.inner, &self.clock, lease)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        if self.state().drop_lease(lease.0) { Ok(()) } else { Err(StoreError::LeaseNotFound(lease.0)) }
    }

    fn keep_alive(&self, lease: LeaseId, interval: Duration) -> KeepAlive {
        let weak = Arc::downgrade(&self.inner);
        let clock = self.clock.clone();
        KeepAlive::spawn(lease, "store-keepalive", move |stop, lost| {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                if refresh(&inner, &clock, lease).is_err() {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
                drop(inner);
                match stop.recv_timeout(interval) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        })
    }

    async fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watch> {
        let full = self.full(prefix);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut g = self.state();
        let start = from.unwrap_or(g.revision + 1).max(1);
        let oldest = g.history.front().map(|e| e.revision()).unwrap_or(g.revision + 1);
        if start < oldest && g.history.len() == HISTORY_LIMIT {
            return Err(StoreError::Compacted { requested: start, compacted: oldest - 1 });
        }
        let strip = self.prefix.len();
        for ev in g.history.iter().filter(|e| e.revision() >= start && e.kv.key.starts_with(&full)) {
            let _ = tx.send(Ok(stripped(ev, strip)));
        }
        g.watchers.push(Watcher { prefix: full, strip, tx });
        Ok(Watch::new(rx, start))
    }
}
