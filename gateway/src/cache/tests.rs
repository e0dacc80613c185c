//! The cache policy against an in-memory shared tier and a counting fallback (no Redis). moka
//! keeps its own clock, so TTL tests use short real durations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::events::SessionStatus;

/// A shared tier in memory, with pub/sub to the caches that subscribed.
#[derive(Default)]
struct FakeRemote {
    data: Mutex<HashMap<String, SessionView>>,
    down: AtomicBool,
    reads: AtomicUsize,
    subscribers: Mutex<Vec<Weak<SessionCache>>>,
}

impl FakeRemote {
    fn subscribe(&self, cache: &Arc<SessionCache>) {
        self.subscribers.lock().unwrap().push(Arc::downgrade(cache));
    }

    fn get(&self, id: &str) -> Option<SessionView> {
        self.data.lock().unwrap().get(id).cloned()
    }
}

impl RemoteTier for FakeRemote {
    fn available(&self) -> bool {
        !self.down.load(Ordering::SeqCst)
    }

    fn read<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let found = self.get(session_id);
        Box::pin(async move { Ok(found) })
    }

    fn write<'a>(&'a self, writes: &'a [PendingWrite]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if !self.available() {
                return Err(crate::Error::Cache("fake remote is down".into()));
            }
            let mut changed = Vec::new();
            {
                let mut data = self.data.lock().unwrap();
                for w in writes {
                    let id = w.view.session_id.clone();
                    if w.mode == WriteMode::IfAbsent && data.contains_key(&id) {
                        continue;
                    }
                    data.insert(id.clone(), (*w.view).clone());
                    if w.mode == WriteMode::Change {
                        changed.push(id);
                    }
                }
            }
            let subscribers: Vec<_> = self
                .subscribers
                .lock()
                .unwrap()
                .iter()
                .filter_map(Weak::upgrade)
                .collect();
            for id in changed {
                for cache in &subscribers {
                    cache.invalidate(&id).await;
                }
            }
            Ok(())
        })
    }

    fn count_keys(&self) -> BoxFuture<'_, Result<[u64; 4]>> {
        let data = self.data.lock().unwrap();
        let n = data.len() as u64;
        let qr = data.values().filter(|v| v.qr.is_some()).count() as u64;
        Box::pin(async move { Ok([n, qr, n, n]) })
    }
}

/// A fallback that counts its calls, can be slowed down, and can be held at a gate.
#[derive(Default)]
struct CountingLookup {
    known: Mutex<HashMap<String, SessionView>>,
    calls: AtomicUsize,
    delay: Duration,
    gate: Option<Arc<Semaphore>>,
}

impl CountingLookup {
    fn knowing(ids: &[(&str, SessionStatus)]) -> Self {
        let known = ids
            .iter()
            .map(|(id, status)| (id.to_string(), SessionView::with_status(id, *status, None)))
            .collect();
        CountingLookup {
            known: Mutex::new(known),
            ..Default::default()
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl SessionLookup for CountingLookup {
    fn lookup<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<Option<SessionView>>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            // Read first, answer later: a slow fallback returns what was true when it was asked.
            let found = self.known.lock().unwrap().get(session_id).cloned();
            if let Some(gate) = &self.gate {
                let _permit = gate.acquire().await.unwrap();
            }
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            Ok(found)
        })
    }
}

fn settings() -> CacheSettings {
    CacheSettings {
        local_ttl: Duration::from_secs(30),
        negative_ttl: Duration::from_millis(150),
        ..CacheSettings::default()
    }
}

fn cache(
    settings: CacheSettings,
    remote: Option<Arc<FakeRemote>>,
    lookup: Arc<CountingLookup>,
) -> Arc<SessionCache> {
    let cache = SessionCache::new(
        settings,
        remote.clone().map(|r| r as Arc<dyn RemoteTier>),
        lookup,
        CacheMetrics::default(),
    );
    if let Some(remote) = remote {
        remote.subscribe(&cache);
    }
    cache
}

async fn eventually(what: &str, mut check: impl FnMut() -> BoxFuture<'static, bool>) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen within 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_on_one_key_makes_one_fallback_call() {
    let lookup = Arc::new(CountingLookup {
        delay: Duration::from_millis(50),
        ..CountingLookup::knowing(&[("hot", SessionStatus::Active)])
    });
    let cache = cache(settings(), None, lookup.clone());
    let herd: Vec<_> = (0..500)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.is_active("hot").await.unwrap() })
        })
        .collect();
    for task in herd {
        assert!(task.await.unwrap());
    }
    assert_eq!(lookup.calls(), 1);
    assert_eq!(cache.metrics().fallback_calls(), 1);
}

#[tokio::test]
async fn unknown_sessions_are_cached_negatively_for_a_shorter_time() {
    let lookup = Arc::new(CountingLookup::knowing(&[("known", SessionStatus::Active)]));
    // A negative TTL long enough that a stalled test thread cannot outlast it between the two
    // lookups (moka keeps real time, not tokio's).
    let settings = CacheSettings {
        negative_ttl: Duration::from_secs(1),
        ..settings()
    };
    let cache = cache(settings, None, lookup.clone());
    assert!(cache.get("ghost").await.unwrap().is_none());
    assert!(cache.get("ghost").await.unwrap().is_none());
    assert!(cache.get("known").await.unwrap().is_some());
    assert_eq!(lookup.calls(), 2);
    assert_eq!(
        cache.metrics().requests(Tier::Local, Outcome::NegativeHit),
        1
    );

    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(cache.get("ghost").await.unwrap().is_none());
    assert!(cache.get("known").await.unwrap().is_some());
    assert_eq!(lookup.calls(), 3, "only the negative entry expired");
}

#[tokio::test]
async fn the_shared_tier_answers_before_the_fallback_and_is_filled_from_it() {
    let remote = Arc::new(FakeRemote::default());
    let lookup = Arc::new(CountingLookup::knowing(&[("s", SessionStatus::Inactive)]));
    let stop = CancellationToken::new();
    let a = cache(settings(), Some(remote.clone()), lookup.clone());
    let b = cache(settings(), Some(remote.clone()), lookup.clone());
    a.spawn_background(stop.clone());

    assert!(!a.is_active("s").await.unwrap());
    assert_eq!(lookup.calls(), 1);
    let filled = remote.clone();
    eventually("fallback answer written to the shared tier", move || {
        let filled = filled.clone();
        Box::pin(async move { filled.get("s").is_some() })
    })
    .await;
    assert!(!b.is_active("s").await.unwrap());
    assert_eq!(lookup.calls(), 1, "b found it in the shared tier");
    assert_eq!(b.metrics().requests(Tier::Redis, Outcome::Hit), 1);
    stop.cancel();
}

#[tokio::test]
async fn a_change_written_by_one_instance_evicts_the_others_local_entry() {
    let remote = Arc::new(FakeRemote::default());
    let lookup = Arc::new(CountingLookup::default());
    let stop = CancellationToken::new();
    let owner = cache(settings(), Some(remote.clone()), lookup.clone());
    let reader = cache(settings(), Some(remote.clone()), lookup.clone());
    owner.spawn_background(stop.clone());

    owner.write(SessionView::with_status("s", SessionStatus::Active, None));
    assert!(
        owner.is_active("s").await.unwrap(),
        "the owner sees it at once"
    );
    let r = remote.clone();
    eventually("owner's write in the shared tier", move || {
        let r = r.clone();
        Box::pin(async move { r.get("s").is_some() })
    })
    .await;
    let r = reader.clone();
    eventually("reader sees active", move || {
        let r = r.clone();
        Box::pin(async move { r.is_active("s").await.unwrap() })
    })
    .await;
    // Now cached locally in the reader; a change must evict it.
    owner.write(SessionView::with_status(
        "s",
        SessionStatus::LoggedOut,
        None,
    ));
    let r = reader.clone();
    eventually("reader sees logged_out", move || {
        let r = r.clone();
        Box::pin(async move {
            r.get("s").await.unwrap().unwrap().status.status == SessionStatus::LoggedOut
        })
    })
    .await;
    assert_eq!(lookup.calls(), 0, "the owner's writes answered everything");
    assert!(reader.metrics().requests(Tier::Local, Outcome::Miss) >= 2);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_racing_an_invalidation_is_not_kept() {
    let gate = Arc::new(Semaphore::new(0));
    let lookup = Arc::new(CountingLookup {
        gate: Some(gate.clone()),
        ..CountingLookup::knowing(&[("s", SessionStatus::Connecting)])
    });
    let cache = cache(settings(), None, lookup.clone());
    let loading = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.get("s").await.unwrap() })
    };
    let l = lookup.clone();
    eventually("load started", move || {
        let l = l.clone();
        Box::pin(async move { l.calls() == 1 })
    })
    .await;
    // The session changes while the old state is being read.
    lookup.known.lock().unwrap().insert(
        "s".into(),
        SessionView::with_status("s", SessionStatus::Active, None),
    );
    cache.invalidate("s").await;
    gate.add_permits(10);
    let first = loading.await.unwrap().unwrap();
    assert_eq!(first.status.status, SessionStatus::Connecting);
    assert!(
        cache.is_active("s").await.unwrap(),
        "the racing load was dropped"
    );
    assert_eq!(lookup.calls(), 2);
}

#[tokio::test]
async fn a_shared_tier_outage_degrades_to_the_fallback_and_writes_resume() {
    let remote = Arc::new(FakeRemote::default());
    remote.down.store(true, Ordering::SeqCst);
    let lookup = Arc::new(CountingLookup::knowing(&[("other", SessionStatus::Active)]));
    let stop = CancellationToken::new();
    let owner = cache(settings(), Some(remote.clone()), lookup.clone());
    owner.spawn_background(stop.clone());

    owner.write(SessionView::with_status(
        "mine",
        SessionStatus::Active,
        None,
    ));
    assert!(owner.is_active("mine").await.unwrap());
    assert!(owner.is_active("other").await.unwrap());
    assert_eq!(owner.metrics().requests(Tier::Redis, Outcome::Skipped), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(remote.get("mine").is_none());
    assert!(owner.pending_writes() >= 1, "kept for later");

    remote.down.store(false, Ordering::SeqCst);
    let r = remote.clone();
    eventually("queued write lands after the outage", move || {
        let r = r.clone();
        Box::pin(async move { r.get("mine").is_some() && r.get("other").is_some() })
    })
    .await;
    stop.cancel();
}

#[tokio::test]
async fn a_newer_owner_write_is_not_replaced_by_a_fallback_answer() {
    let remote = Arc::new(FakeRemote::default());
    remote.down.store(true, Ordering::SeqCst);
    let lookup = Arc::new(CountingLookup::knowing(&[("s", SessionStatus::Inactive)]));
    let owner = cache(settings(), Some(remote.clone()), lookup.clone());
    owner.write(SessionView::with_status("s", SessionStatus::Active, None));
    owner.enqueue(PendingWrite {
        view: Arc::new(SessionView::with_status("s", SessionStatus::Inactive, None)),
        mode: WriteMode::IfAbsent,
    });
    let queued = owner.take_pending();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].mode, WriteMode::Change);
    assert_eq!(queued[0].view.status.status, SessionStatus::Active);
}

#[tokio::test]
async fn versions_grow_with_every_write() {
    let owner = cache(settings(), None, Arc::new(CountingLookup::default()));
    let mut last = 0;
    for _ in 0..1000 {
        owner.write(SessionView::with_status("s", SessionStatus::Active, None));
        let v = owner.get("s").await.unwrap().unwrap().version();
        assert!(v > last);
        last = v;
    }
}
