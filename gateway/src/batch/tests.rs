use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{Instant, sleep};

use super::*;
use crate::events::{QrEvent, SessionStatus, StatusEvent};

/// Records every batch with the virtual time it left the batcher; can be made slow per lane to
/// keep a request in flight.
struct RecordingSink {
    batches: Mutex<Vec<(Duration, Batch)>>,
    delay_ms: [AtomicU64; 3],
    start: Instant,
}

impl RecordingSink {
    fn new() -> Arc<Self> {
        Arc::new(RecordingSink {
            batches: Mutex::default(),
            delay_ms: Default::default(),
            start: Instant::now(),
        })
    }

    fn set_delay(&self, lane: Lane, delay: Duration) {
        self.delay_ms[lane.index()].store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    fn set_all_delays(&self, delay: Duration) {
        for lane in Lane::ALL {
            self.set_delay(lane, delay);
        }
    }

    fn batches(&self) -> Vec<(Duration, Batch)> {
        self.batches.lock().unwrap().clone()
    }

    fn item_count(&self) -> usize {
        self.batches()
            .iter()
            .map(|(_, batch)| batch.items.len())
            .sum()
    }
}

impl BatchSink for RecordingSink {
    async fn deliver(&self, batch: Batch) {
        let delay = Duration::from_millis(self.delay_ms[batch.lane.index()].load(Ordering::SeqCst));
        self.batches
            .lock()
            .unwrap()
            .push((self.start.elapsed(), batch));
        sleep(delay).await;
    }
}

fn high(session: &str, status: SessionStatus) -> GatewayEvent {
    StatusEvent::new(session, status, Priority::High, None).into()
}

fn normal(session: &str, status: SessionStatus) -> GatewayEvent {
    StatusEvent::new(session, status, Priority::Normal, None).into()
}

fn qr(session: &str, seq: u32, validity: Duration) -> GatewayEvent {
    QrEvent::new(session, format!("code-{session}-{seq}"), seq, validity).into()
}

fn qr_seq(event: &GatewayEvent) -> u32 {
    match event {
        GatewayEvent::Qr(qr) => qr.seq,
        GatewayEvent::Status(_) => panic!("not a QR"),
    }
}

fn start(config: BatchConfig) -> (Arc<RecordingSink>, BatcherHandle, BatcherTask) {
    let sink = RecordingSink::new();
    let (handle, task) = spawn_batcher(config, sink.clone()).unwrap();
    (sink, handle, task)
}

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn seed_flushes_qr_at_batch_size_then_at_interval() {
    let (sink, handle, task) = start(BatchConfig::seed());
    for i in 0..50 {
        handle
            .submit(qr(&format!("s{i}"), 1, Duration::from_secs(60)))
            .await
            .unwrap();
    }
    sleep(MS).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, Duration::ZERO);
    assert_eq!(batches[0].1.items.len(), 50);
    assert_eq!(batches[0].1.reason, FlushReason::Size);

    for i in 0..10 {
        handle
            .submit(qr(&format!("t{i}"), 1, Duration::from_secs(60)))
            .await
            .unwrap();
    }
    sleep(Duration::from_secs(6)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[1].0, Duration::from_secs(5));
    assert_eq!(batches[1].1.items.len(), 10);
    assert_eq!(batches[1].1.reason, FlushReason::Interval);
    assert_eq!(task.stats().flushes(Lane::Qr, FlushReason::Interval), 1);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn seed_sends_high_status_on_priority_tick() {
    let (sink, handle, task) = start(BatchConfig::seed());
    sleep(100 * MS).await;
    handle
        .submit(high("s1", SessionStatus::Active))
        .await
        .unwrap();
    sleep(Duration::from_secs(1)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, 500 * MS);
    assert_eq!(batches[0].1.lane, Lane::StatusHigh);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn naive_sends_one_request_per_event() {
    let (sink, handle, task) = start(BatchConfig::naive());
    sink.set_all_delays(50 * MS);
    for i in 0..10 {
        handle
            .submit(high(&format!("s{i}"), SessionStatus::Active))
            .await
            .unwrap();
    }
    sleep(MS).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 10);
    assert!(batches.iter().all(|(at, batch)| *at == Duration::ZERO
        && batch.items.len() == 1
        && batch.reason == FlushReason::Immediate));
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_sends_lone_high_status_immediately() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    handle
        .submit(high("s1", SessionStatus::Active))
        .await
        .unwrap();
    sleep(MS).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, Duration::ZERO);
    assert_eq!(batches[0].1.reason, FlushReason::Immediate);
    assert_eq!(batches[0].1.lane, Lane::StatusHigh);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_spaces_status_requests_on_a_busy_lane() {
    let config = BatchConfig::adaptive();
    let spacing = config.high_min_spacing;
    let (sink, handle, task) = start(config);
    // A quick backend: nothing stays in flight, only the spacing holds requests back.
    for i in 0..10 {
        handle
            .submit(high(&format!("s{i}"), SessionStatus::Inactive))
            .await
            .unwrap();
        sleep(10 * MS).await;
    }
    sleep(Duration::from_secs(1)).await;
    let batches = sink.batches();
    assert_eq!(batches[0].0, Duration::ZERO, "a quiet lane sends at once");
    assert_eq!(batches[0].1.items.len(), 1);
    for pair in batches.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= spacing,
            "requests at least {spacing:?} apart: {batches:?}"
        );
    }
    assert_eq!(
        batches.iter().map(|b| b.1.items.len()).sum::<usize>(),
        10,
        "nothing lost"
    );
    assert!(
        batches.len() <= 3,
        "10 events in 100 ms take at most 3 requests: {}",
        batches.len()
    );
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_coalesces_high_status_while_in_flight() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    sink.set_delay(Lane::StatusHigh, 100 * MS);
    handle
        .submit(high("s0", SessionStatus::Inactive))
        .await
        .unwrap();
    for i in 1..=4 {
        sleep(10 * MS).await;
        handle
            .submit(high(&format!("s{i}"), SessionStatus::Inactive))
            .await
            .unwrap();
    }
    sleep(Duration::from_secs(1)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[0].1.items.len(), 1);
    assert_eq!(batches[1].0, 100 * MS);
    assert_eq!(batches[1].1.items.len(), 4);
    assert_eq!(batches[1].1.reason, FlushReason::Coalesced);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_linger_gathers_high_status() {
    let config = BatchConfig {
        high_linger: 20 * MS,
        ..BatchConfig::adaptive()
    };
    let (sink, handle, task) = start(config);
    handle
        .submit(high("a", SessionStatus::Active))
        .await
        .unwrap();
    sleep(10 * MS).await;
    handle
        .submit(high("b", SessionStatus::Active))
        .await
        .unwrap();
    sleep(Duration::from_secs(1)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, 20 * MS);
    assert_eq!(batches[0].1.items.len(), 2);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_normal_status_rides_with_high_in_order() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    sink.set_delay(Lane::StatusHigh, 100 * MS);
    handle
        .submit(high("busy", SessionStatus::Active))
        .await
        .unwrap();
    sleep(10 * MS).await;
    handle
        .submit(normal("s1", SessionStatus::Connecting))
        .await
        .unwrap();
    handle
        .submit(high("s1", SessionStatus::Active))
        .await
        .unwrap();
    sleep(Duration::from_secs(2)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 2);
    let (at, batch) = &batches[1];
    assert_eq!(*at, 100 * MS);
    assert_eq!(batch.lane, Lane::StatusHigh);
    let statuses: Vec<_> = batch
        .items
        .iter()
        .map(|event| match event {
            GatewayEvent::Status(status) => status.status,
            GatewayEvent::Qr(_) => panic!("QR in status batch"),
        })
        .collect();
    assert_eq!(statuses, [SessionStatus::Connecting, SessionStatus::Active]);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_normal_status_alone_waits_normal_max_delay() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    handle
        .submit(normal("s1", SessionStatus::Connecting))
        .await
        .unwrap();
    sleep(Duration::from_secs(2)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, Duration::from_secs(1));
    assert_eq!(batches[0].1.lane, Lane::StatusNormal);
    assert_eq!(batches[0].1.reason, FlushReason::Interval);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_normal_status_supersedes_but_never_drops_logged_out() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    handle
        .submit(normal("a", SessionStatus::QrPending))
        .await
        .unwrap();
    handle
        .submit(normal("a", SessionStatus::Connecting))
        .await
        .unwrap();
    handle
        .submit(normal("b", SessionStatus::LoggedOut))
        .await
        .unwrap();
    handle
        .submit(normal("b", SessionStatus::QrPending))
        .await
        .unwrap();
    sleep(Duration::from_secs(2)).await;
    let items: Vec<_> = sink
        .batches()
        .into_iter()
        .flat_map(|(_, batch)| batch.items)
        .map(|event| match event {
            GatewayEvent::Status(status) => (status.session_id, status.status),
            GatewayEvent::Qr(_) => panic!("QR in status batch"),
        })
        .collect();
    assert_eq!(
        items,
        [
            ("a".to_owned(), SessionStatus::Connecting),
            ("b".to_owned(), SessionStatus::LoggedOut),
            ("b".to_owned(), SessionStatus::QrPending),
        ]
    );
    assert_eq!(task.stats().superseded(Lane::StatusNormal), 1);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_qr_flushes_at_deadline() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    handle
        .submit(qr("a", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    sleep(300 * MS).await;
    handle
        .submit(qr("b", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    sleep(Duration::from_secs(2)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, BatchConfig::adaptive().qr_max_delay);
    assert_eq!(batches[0].1.items.len(), 2);
    assert_eq!(batches[0].1.reason, FlushReason::Deadline);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_qr_is_not_held_past_share_of_validity() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    // 25% of 400 ms is 100 ms, sooner than the maximum delay.
    handle.submit(qr("a", 1, 400 * MS)).await.unwrap();
    sleep(Duration::from_secs(1)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, 100 * MS);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn adaptive_qr_flushes_at_max_batch_items() {
    let config = BatchConfig {
        max_batch_items: 10,
        ..BatchConfig::adaptive()
    };
    let (sink, handle, task) = start(config);
    for i in 0..10 {
        handle
            .submit(qr(&format!("s{i}"), 1, Duration::from_secs(60)))
            .await
            .unwrap();
    }
    sleep(MS).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, Duration::ZERO);
    assert_eq!(batches[0].1.reason, FlushReason::Size);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn newer_qr_replaces_unsent_older_and_keeps_its_deadline() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    handle
        .submit(qr("a", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    sleep(500 * MS).await;
    handle
        .submit(qr("a", 2, Duration::from_secs(20)))
        .await
        .unwrap();
    sleep(Duration::from_secs(2)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].0, BatchConfig::adaptive().qr_max_delay);
    assert_eq!(batches[0].1.items.len(), 1);
    assert_eq!(qr_seq(&batches[0].1.items[0]), 2);
    assert_eq!(task.stats().superseded(Lane::Qr), 1);
    task.shutdown().await;
}

/// Re-sync snapshots a session's status and submits it later; a newer status routed in between
/// must not be replaced by that older repeat.
#[tokio::test(start_paused = true)]
async fn older_status_repeat_does_not_replace_newer_unsent_status() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    let GatewayEvent::Status(mut repeat) = normal("a", SessionStatus::Connecting) else {
        unreachable!()
    };
    let newer = normal("a", SessionStatus::QrPending);
    let GatewayEvent::Status(newer_status) = &newer else {
        unreachable!()
    };
    repeat.at = newer_status.at - chrono::Duration::seconds(1);
    handle.submit(newer).await.unwrap();
    handle.submit(repeat.into()).await.unwrap();
    sleep(Duration::from_secs(2)).await;
    let statuses: Vec<_> = sink
        .batches()
        .into_iter()
        .flat_map(|(_, batch)| batch.items)
        .map(|event| match event {
            GatewayEvent::Status(status) => status.status,
            GatewayEvent::Qr(_) => panic!("QR in status batch"),
        })
        .collect();
    assert_eq!(statuses, [SessionStatus::QrPending]);
    assert_eq!(task.stats().superseded(Lane::StatusNormal), 1);
    assert_eq!(task.stats().pending(Lane::StatusNormal), 0);
    task.shutdown().await;
}

/// A repeat of an older QR (lower seq, no later expiry) does not take a newer unsent one's place.
#[tokio::test(start_paused = true)]
async fn older_qr_repeat_does_not_replace_newer_unsent_qr() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    let older = qr("a", 2, Duration::from_secs(20));
    sleep(Duration::from_secs(5)).await;
    handle
        .submit(qr("a", 3, Duration::from_secs(20)))
        .await
        .unwrap();
    handle.submit(older).await.unwrap();
    sleep(Duration::from_secs(2)).await;
    let seqs: Vec<_> = sink
        .batches()
        .iter()
        .flat_map(|(_, batch)| batch.items.iter().map(qr_seq))
        .collect();
    assert_eq!(seqs, [3]);
    assert_eq!(task.stats().superseded(Lane::Qr), 1);
    assert_eq!(task.stats().pending(Lane::Qr), 0);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn expired_qr_is_dropped_and_counted() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    // Already expired on arrival.
    handle.submit(qr("late", 1, Duration::ZERO)).await.unwrap();
    // Expires while the QR lane is busy with a slow request.
    sink.set_delay(Lane::Qr, Duration::from_secs(2));
    handle
        .submit(qr("a", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    sleep(Duration::from_secs(1)).await;
    handle
        .submit(qr("b", 1, Duration::from_secs(1)))
        .await
        .unwrap();
    sleep(Duration::from_secs(5)).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0].1.items[0].session_id(), "a");
    let stats = task.stats().clone();
    assert_eq!(stats.expired(), 2);
    assert_eq!(stats.pending(Lane::Qr), 0);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn lanes_do_not_block_each_other() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    sink.set_delay(Lane::Qr, Duration::from_secs(10));
    handle
        .submit(qr("a", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    sleep(Duration::from_secs(1)).await;
    handle
        .submit(high("b", SessionStatus::Active))
        .await
        .unwrap();
    sleep(MS).await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[1].0, Duration::from_secs(1));
    assert_eq!(batches[1].1.lane, Lane::StatusHigh);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn full_lane_applies_backpressure() {
    let config = BatchConfig {
        input_capacity: 4,
        max_pending_per_lane: 8,
        ..BatchConfig::adaptive()
    };
    let (sink, handle, task) = start(config);
    sink.set_all_delays(Duration::from_secs(10));
    let mut accepted = 0;
    let rejected = loop {
        match handle.try_submit(high(&format!("s{accepted}"), SessionStatus::Active)) {
            Ok(()) => accepted += 1,
            Err(err) => break err,
        }
        assert!(accepted <= 13, "input never filled up");
        // Let the batcher read what it has room for.
        sleep(MS).await;
    };
    assert!(matches!(rejected, BatchError::Full(_)), "{rejected:?}");
    // One in flight, eight queued, four waiting in the channel.
    assert_eq!(accepted, 13);
    assert_eq!(task.stats().pending(Lane::StatusHigh), 8);
    let blocked = tokio::time::timeout(
        Duration::from_secs(1),
        handle.submit(high("x", SessionStatus::Active)),
    );
    assert!(blocked.await.is_err(), "submit should wait while full");

    // Once the slow request completes, everything drains.
    sleep(Duration::from_secs(30)).await;
    assert_eq!(sink.item_count(), 13);
    task.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_everything() {
    let (sink, handle, task) = start(BatchConfig::seed());
    handle
        .submit(qr("a", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    handle
        .submit(high("b", SessionStatus::Active))
        .await
        .unwrap();
    handle
        .submit(normal("c", SessionStatus::Connecting))
        .await
        .unwrap();
    task.shutdown().await;
    let batches = sink.batches();
    assert_eq!(batches.len(), 3);
    assert!(
        batches
            .iter()
            .all(|(at, batch)| *at == Duration::ZERO && batch.reason == FlushReason::Shutdown)
    );
    assert!(matches!(
        handle.try_submit(high("d", SessionStatus::Active)),
        Err(BatchError::Closed(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_flushes_and_waits_for_in_flight() {
    let (sink, handle, task) = start(BatchConfig::adaptive());
    sink.set_all_delays(Duration::from_secs(3));
    let started = Instant::now();
    handle
        .submit(high("a", SessionStatus::Active))
        .await
        .unwrap();
    sleep(MS).await;
    handle
        .submit(high("b", SessionStatus::Active))
        .await
        .unwrap();
    handle
        .submit(qr("c", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    drop(handle);
    task.join().await;
    // "b" waits for "a" (one status request at a time), then its own 3 s request completes.
    assert_eq!(started.elapsed(), Duration::from_secs(6));
    let batches = sink.batches();
    assert_eq!(sink.item_count(), 3);
    assert!(
        batches
            .iter()
            .any(|(_, batch)| batch.reason == FlushReason::Shutdown)
    );
}

/// Many sessions, random events and random sink latency: every event is delivered, superseded
/// or expired, and each session's last delivered status is its last submitted one.
#[tokio::test(start_paused = true)]
async fn randomized_run_loses_nothing() {
    for policy in [BatchPolicy::Adaptive, BatchPolicy::Seed, BatchPolicy::Naive] {
        let config = BatchConfig {
            input_capacity: 64,
            max_pending_per_lane: 300,
            max_batch_items: 40,
            ..BatchConfig::for_policy(policy)
        };
        let (sink, handle, task) = start(config);
        let mut rng = StdRng::seed_from_u64(7);
        let mut last_status = HashMap::new();
        let mut submitted = 0u64;
        for _ in 0..5_000 {
            let session = format!("s{}", rng.random_range(0..100));
            let event = match rng.random_range(0..10) {
                0..=3 => {
                    let validity = Duration::from_millis(rng.random_range(0..30_000));
                    qr(&session, rng.random_range(1..=6), validity)
                }
                4..=6 => high(&session, SessionStatus::ALL[rng.random_range(0..6)]),
                _ => normal(&session, SessionStatus::ALL[rng.random_range(0..6)]),
            };
            if let GatewayEvent::Status(status) = &event {
                last_status.insert(session.clone(), status.status);
            }
            if rng.random_bool(0.05) {
                sink.set_all_delays(Duration::from_millis(rng.random_range(0..3_000)));
            }
            handle.submit(event).await.unwrap();
            submitted += 1;
            sleep(Duration::from_millis(rng.random_range(0..20))).await;
        }
        drop(handle);
        let stats = task.stats().clone();
        task.join().await;

        assert_eq!(stats.total_received(), submitted, "{policy:?}");
        assert_eq!(
            stats.total_received(),
            stats.total_sent() + stats.total_superseded() + stats.expired(),
            "{policy:?}"
        );
        assert_eq!(sink.item_count() as u64, stats.total_sent(), "{policy:?}");
        assert!(Lane::ALL.iter().all(|&lane| stats.pending(lane) == 0));
        assert_eq!(
            sink.batches().len() as u64,
            stats.total_flushes(),
            "{policy:?}"
        );

        if policy == BatchPolicy::Adaptive {
            let mut delivered_last = HashMap::new();
            for (_, batch) in sink.batches() {
                for event in batch.items {
                    if let GatewayEvent::Status(status) = event {
                        delivered_last.insert(status.session_id, status.status);
                    }
                }
            }
            assert_eq!(delivered_last, last_status);
        }
    }
}

#[test]
fn config_validation_names_the_field() {
    let config = BatchConfig {
        max_batch_items: 0,
        ..BatchConfig::default()
    };
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("max_batch_items"), "{err}");
    assert_eq!("seed".parse::<BatchPolicy>().unwrap(), BatchPolicy::Seed);
    assert!("fast".parse::<BatchPolicy>().is_err());
    assert_eq!(BatchConfig::default().policy, BatchPolicy::Adaptive);
}
