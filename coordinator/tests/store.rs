//! One suite for both state stores: the embedded one and a real etcd started by the harness
//! (Debian `etcd-server`) on free 127.0.0.1 ports with a temp data dir, killed on drop.

use std::time::{Duration, Instant};

use coordinator::store::typed::{self, EpochState, Member, ModelMeta};
use coordinator::store::{
    EmbeddedStore, EtcdOptions, EtcdStore, EventKind, StateStore, StoreError, Watch, WatchEvent,
};

const WAIT: Duration = Duration::from_secs(30);

use switchyard_tests::etcd::{Etcd, free_port};

fn test_opts() -> EtcdOptions {
    EtcdOptions {
        op_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        watch_retry: Duration::from_millis(100),
    }
}

async fn etcd_store(etcd: &Etcd, prefix: &str) -> EtcdStore {
    EtcdStore::connect(vec![etcd.endpoint()], prefix, test_opts()).await.unwrap()
}

// ---------------------------------------------------------------- helpers

async fn next_event(w: &mut Watch) -> WatchEvent {
    match tokio::time::timeout(WAIT, w.next()).await {
        Ok(Some(Ok(ev))) => ev,
        other => panic!("expected a watch event, got {other:?}"),
    }
}

fn ev(e: &WatchEvent) -> (EventKind, String, Vec<u8>) {
    (e.kind, e.kv.key.clone(), e.kv.value.clone())
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- the shared cases

async fn case_crud_and_cas<S: StateStore>(s: &S) {
    assert_eq!(s.get("a").await.unwrap(), None);
    assert!(matches!(s.get("").await, Err(StoreError::InvalidArgument(_))));
    let r1 = s.put("a", b"1".to_vec(), None).await.unwrap();
    let kv = s.get("a").await.unwrap().unwrap();
    assert_eq!((kv.key.as_str(), kv.value.as_slice(), kv.mod_revision, kv.version), ("a", &b"1"[..], r1, 1));
    // CAS with the right revision wins, the stale one conflicts and reports the actual revision.
    let r2 = s.compare_and_swap("a", r1, b"2".to_vec(), None).await.unwrap();
    assert!(r2 > r1);
    match s.compare_and_swap("a", r1, b"3".to_vec(), None).await {
        Err(e @ StoreError::Conflict { .. }) => {
            assert_eq!(e.code(), "STORE_CONFLICT");
            assert!(!e.is_retryable());
            assert_eq!(e, StoreError::Conflict { key: "a".into(), expected: r1, actual: r2 });
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(s.get("a").await.unwrap().unwrap().value, b"2");
    // Create-if-absent: expected 0.
    assert!(matches!(s.compare_and_swap("a", 0, b"x".to_vec(), None).await, Err(StoreError::Conflict { actual, .. }) if actual == r2));
    s.compare_and_swap("fresh", 0, b"x".to_vec(), None).await.unwrap();
    assert!(s.delete("a").await.unwrap());
    assert!(!s.delete("a").await.unwrap());
    assert_eq!(s.get("a").await.unwrap(), None);
}

async fn case_prefix_isolation<S: StateStore>(a: &S, b: &S) {
    a.put("members/w1", b"a".to_vec(), None).await.unwrap();
    a.put("members/w2", b"a".to_vec(), None).await.unwrap();
    a.put("other", b"a".to_vec(), None).await.unwrap();
    b.put("members/w1", b"b".to_vec(), None).await.unwrap();
    let (la, rev) = a.list("members/").await.unwrap();
    assert!(rev > 0);
    assert_eq!(la.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["members/w1", "members/w2"]);
    let (lb, _) = b.list("").await.unwrap();
    assert_eq!(lb.len(), 1);
    assert_eq!((lb[0].key.as_str(), lb[0].value.as_slice()), ("members/w1", &b"b"[..]));
    assert!(b.delete("other").await.is_ok_and(|d| !d));
    assert_eq!(a.get("other").await.unwrap().unwrap().value, b"a");
}

async fn case_lease_expiry<S: StateStore>(s: &S) {
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    let mut w = s.watch("members/", None).await.unwrap();
    let m = Member { id: "w1".into(), rank: 0, node: "n0".into(), addr: "127.0.0.1:1".into(), transport_addr: String::new(), gpus: 1 };
    typed::put_member(s, &m, Some(lease)).await.unwrap();
    assert_eq!(s.get("members/w1").await.unwrap().unwrap().lease, Some(lease));
    let put = next_event(&mut w).await;
    assert_eq!(put.kind, EventKind::Put);
    // A kept-alive lease survives well past its TTL.
    let ka = s.keep_alive(lease, Duration::from_millis(300));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!ka.is_lost());
    assert_eq!(typed::list_members(s).await.unwrap().0, vec![m]);
    // Stop refreshing: the lease expires and its key is deleted (seen by the watch).
    drop(ka);
    let del = next_event(&mut w).await;
    assert_eq!(ev(&del), (EventKind::Delete, "members/w1".into(), vec![]));
    assert!(del.revision() > put.revision());
    assert_eq!(s.get("members/w1").await.unwrap(), None);
    let r = s.keep_alive_once(lease).await;
    assert!(matches!(r, Err(StoreError::LeaseNotFound(_))), "{r:?}");
    // Revoke deletes at once.
    let l2 = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    s.put("members/w2", b"{}".to_vec(), Some(l2)).await.unwrap();
    s.keep_alive_once(l2).await.unwrap();
    s.revoke_lease(l2).await.unwrap();
    assert_eq!(s.get("members/w2").await.unwrap(), None);
    assert!(matches!(s.put("x", b"y".to_vec(), Some(l2)).await, Err(StoreError::LeaseNotFound(_))));
}

async fn case_watch_order_and_resume<S: StateStore>(s: &S) {
    let (_, rev0) = s.list("w/").await.unwrap();
    let mut w = s.watch("w/", Some(rev0 + 1)).await.unwrap();
    s.put("w/a", b"1".to_vec(), None).await.unwrap();
    s.put("outside", b"1".to_vec(), None).await.unwrap();
    s.put("w/b", b"2".to_vec(), None).await.unwrap();
    s.delete("w/a").await.unwrap();
    s.put("w/b", b"3".to_vec(), None).await.unwrap();
    let want = [
        (EventKind::Put, "w/a".to_string(), b"1".to_vec()),
        (EventKind::Put, "w/b".to_string(), b"2".to_vec()),
        (EventKind::Delete, "w/a".to_string(), vec![]),
        (EventKind::Put, "w/b".to_string(), b"3".to_vec()),
    ];
    let mut last = 0;
    for (i, want) in want.iter().enumerate().take(2) {
        let e = next_event(&mut w).await;
        assert_eq!(&ev(&e), want, "event {i}");
        assert!(e.revision() > last);
        last = e.revision();
    }
    assert_eq!(w.last_revision(), last);
    // The watcher goes away after two events; more changes happen meanwhile.
    drop(w);
    s.put("w/c", b"4".to_vec(), None).await.unwrap();
    // A new watch from the last seen revision + 1 gets exactly the rest, in order.
    let mut w = s.watch("w/", Some(last + 1)).await.unwrap();
    for want in want[2..].iter().chain([(EventKind::Put, "w/c".to_string(), b"4".to_vec())].iter()) {
        let e = next_event(&mut w).await;
        assert_eq!(&ev(&e), want);
        assert!(e.revision() > last);
        last = e.revision();
    }
    // Replaying from the start gives the same history.
    let mut w = s.watch("w/", Some(rev0 + 1)).await.unwrap();
    assert_eq!(ev(&next_event(&mut w).await), want[0]);
}

async fn case_typed<S: StateStore>(s: &S) {
    let m = ModelMeta {
        name: "tiny-mixtral".into(),
        path: "/models/tiny".into(),
        architecture: "mixtral".into(),
        num_layers: 2,
        num_experts: 8,
        top_k: 2,
        dtype: "f32".into(),
    };
    typed::put_model(s, &m).await.unwrap();
    assert_eq!(typed::get_model(s, "tiny-mixtral").await.unwrap(), Some(m));
    assert_eq!(typed::current_epoch(s).await.unwrap(), (None, 0));
    let e1 = typed::propose_epoch(s, serde_json::json!({"ranks": 2})).await.unwrap();
    assert_eq!(e1, 1);
    let rec = typed::update_epoch(s, 1, |e| {
        e.acks.push("w1".into());
        e.state = EpochState::Committed;
        e.switch_step = Some(10);
    })
    .await
    .unwrap();
    assert_eq!(rec.state, EpochState::Committed);
    let rev = typed::activate_epoch(s, 1, 0).await.unwrap();
    // A second activation racing on the old pointer revision loses.
    assert!(matches!(typed::activate_epoch(s, 1, 0).await, Err(StoreError::Conflict { .. })));
    assert_eq!(typed::current_epoch(s).await.unwrap(), (Some(1), rev));
    assert_eq!(typed::propose_epoch(s, serde_json::json!({})).await.unwrap(), 2);
    s.put("models/bad", b"not json".to_vec(), None).await.unwrap();
    assert!(matches!(typed::get_model(s, "bad").await, Err(StoreError::Decode { .. })));
}

/// Run on a current-thread runtime: the test blocks that only thread for twice the TTL, as a
/// saturated runtime would; the keep-alive thread must keep the lease anyway.
async fn case_keepalive_busy_runtime<S: StateStore>(s: &S) {
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.put("members/busy", b"1".to_vec(), Some(lease)).await.unwrap();
    let ka = s.keep_alive(lease, Duration::from_millis(300));
    std::thread::sleep(Duration::from_secs(4));
    assert!(!ka.is_lost());
    assert!(s.get("members/busy").await.unwrap().is_some(), "lease expired while the runtime was busy");
    drop(ka);
    s.revoke_lease(lease).await.unwrap();
}

// ---------------------------------------------------------------- embedded

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_crud_and_cas() {
    case_crud_and_cas(&EmbeddedStore::new("/t")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_prefix_isolation() {
    let a = EmbeddedStore::new("/clusters/a");
    let b = a.with_prefix("clusters/b/");
    case_prefix_isolation(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_lease_expiry() {
    case_lease_expiry(&EmbeddedStore::new("/t")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_watch_order_and_resume() {
    case_watch_order_and_resume(&EmbeddedStore::new("/t")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_typed_records() {
    case_typed(&EmbeddedStore::new("/t")).await;
}

#[tokio::test(flavor = "current_thread")]
async fn embedded_keepalive_survives_busy_runtime() {
    case_keepalive_busy_runtime(&EmbeddedStore::new("/t")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_urls() {
    use coordinator::store::AnyStore;
    let s = AnyStore::open("embedded:///sy").await.unwrap();
    assert_eq!(s.prefix(), "/sy/");
    case_crud_and_cas(&s).await;
    assert!(matches!(AnyStore::open("zk://x").await, Err(StoreError::InvalidArgument(_))));
    assert!(matches!(AnyStore::open("etcd:///p").await, Err(StoreError::InvalidArgument(_))));
}

// ---------------------------------------------------------------- etcd

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_crud_and_cas() {
    let etcd = Etcd::start();
    case_crud_and_cas(&etcd_store(&etcd, "/t").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_prefix_isolation() {
    let etcd = Etcd::start();
    let a = etcd_store(&etcd, "/clusters/a").await;
    let b = a.with_prefix("clusters/b/");
    case_prefix_isolation(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lease_expiry() {
    let etcd = Etcd::start();
    case_lease_expiry(&etcd_store(&etcd, "/t").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_order_and_resume() {
    let etcd = Etcd::start();
    case_watch_order_and_resume(&etcd_store(&etcd, "/t").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_typed_records() {
    let etcd = Etcd::start();
    case_typed(&etcd_store(&etcd, "/t").await).await;
}

#[tokio::test(flavor = "current_thread")]
async fn etcd_keepalive_survives_busy_runtime() {
    let etcd = Etcd::start();
    case_keepalive_busy_runtime(&etcd_store(&etcd, "/t").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_gives_unavailable() {
    // Nothing listens on this port: every call fails with a clear, retryable error, no panic.
    let url = format!("etcd://127.0.0.1:{}/t", free_port());
    match coordinator::store::AnyStore::open(&url).await {
        Err(e) => assert!(e.is_retryable(), "{e:?}"),
        Ok(s) => {
            let e = s.get("k").await.expect_err("no etcd");
            assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
            assert!(matches!(s.put("k", vec![], None).await, Err(StoreError::Unavailable(_))));
            assert!(matches!(s.grant_lease(Duration::from_secs(5)).await, Err(StoreError::Unavailable(_))));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_under_live_store() {
    let mut etcd = Etcd::start();
    let s = etcd_store(&etcd, "/t").await;
    let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    let ka = s.keep_alive(lease, Duration::from_millis(300));
    s.put("members/w1", b"1".to_vec(), Some(lease)).await.unwrap();
    let r1 = s.put("k", b"1".to_vec(), None).await.unwrap();
    let mut w = s.watch("", Some(r1 + 1)).await.unwrap();

    etcd.kill();
    // While etcd is down: clear, retryable errors, no panic.
    for res in [s.put("k", b"2".to_vec(), None).await.map(|_| ()), s.get("k").await.map(|_| ())] {
        let e = res.expect_err("etcd is down");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(e.is_retryable());
        assert_eq!(e.code(), "STORE_UNAVAILABLE");
    }
    assert!(matches!(s.watch("", None).await, Err(StoreError::Unavailable(_))));

    etcd.restart();
    eventually("store works again after etcd restart", || async { s.put("k", b"3".to_vec(), None).await.is_ok() }).await;
    assert_eq!(s.get("k").await.unwrap().unwrap().value, b"3");
    // The watch made before the restart resumed and sees the new write.
    let e = next_event(&mut w).await;
    assert_eq!(ev(&e), (EventKind::Put, "k".into(), b"3".to_vec()));
    // The lease kept alive across the restart (data dir kept), so the member is still there.
    assert!(!ka.is_lost());
    assert!(s.get("members/w1").await.unwrap().is_some());
    drop(ka);
    s.revoke_lease(lease).await.unwrap();
}
