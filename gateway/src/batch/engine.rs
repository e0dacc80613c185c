//! The batcher's event loop: reads input, decides flushes per policy, tracks in-flight requests.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::{self, JoinSet};
use tokio::time::{Instant, sleep_until};

use super::queue::{PendingQueue, Supersede};
use super::stats::BatchStats;
use super::{
    Batch, BatchConfig, BatchError, BatchPolicy, BatchSink, BatcherHandle, FlushReason, Lane,
};
use crate::events::{GatewayEvent, Priority};

/// Most events taken from the input per wake-up, so timers and completions are not starved.
const MAX_READ_PER_WAKE: usize = 256;

/// One stream of backend requests: a queue and its in-flight requests.
struct Stream {
    /// Label of its batches; adaptive's status stream relabels batches that carry high items.
    lane: Lane,
    queue: PendingQueue,
    in_flight: usize,
    max_in_flight: usize,
    batch_limit: usize,
    /// Seed's fixed timer.
    tick: Option<Tick>,
    /// Something arrived while a request was in flight: the next flush is a coalesced one.
    arrived_while_busy: bool,
    /// When the last request of this stream started (adaptive status spacing).
    last_flush: Option<Instant>,
}

struct Tick {
    period: Duration,
    next: Instant,
    due: bool,
}

/// Groups events into batches for a [`BatchSink`]. Build with [`Batcher::new`], drive with
/// [`Batcher::run`], or use [`super::spawn_batcher`].
pub struct Batcher<S> {
    config: BatchConfig,
    sink: Arc<S>,
    rx: mpsc::Receiver<GatewayEvent>,
    stats: Arc<BatchStats>,
    streams: Vec<Stream>,
    deliveries: JoinSet<()>,
    delivery_stream: HashMap<task::Id, usize>,
    shutting_down: bool,
}

impl<S: BatchSink> Batcher<S> {
    pub fn new(config: BatchConfig, sink: Arc<S>) -> Result<(Self, BatcherHandle), BatchError> {
        config.validate()?;
        let (tx, rx) = mpsc::channel(config.input_capacity);
        let streams = build_streams(&config, Instant::now());
        let batcher = Batcher {
            config,
            sink,
            rx,
            stats: Arc::default(),
            streams,
            deliveries: JoinSet::new(),
            delivery_stream: HashMap::new(),
            shutting_down: false,
        };
        Ok((batcher, BatcherHandle { tx }))
    }

    pub fn stats(&self) -> &Arc<BatchStats> {
        &self.stats
    }

    /// Runs until every handle is dropped or `shutdown` resolves, then flushes everything with
    /// reason `Shutdown` and waits for all deliveries.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut input_open = true;
        let mut received = Vec::with_capacity(MAX_READ_PER_WAKE);
        loop {
            let now = Instant::now();
            self.advance_ticks(now);
            self.dispatch(now);
            if !input_open && self.deliveries.is_empty() && self.is_empty() {
                break;
            }
            let read_limit = self.free_capacity().min(MAX_READ_PER_WAKE);
            let wake = self.next_wake();
            tokio::select! {
                biased;
                () = &mut shutdown, if !self.shutting_down => {
                    self.shutting_down = true;
                    // Buffered events are still read; new submissions fail.
                    self.rx.close();
                }
                Some(done) = self.deliveries.join_next_with_id() => self.on_delivered(done),
                count = self.rx.recv_many(&mut received, read_limit), if input_open && read_limit > 0 => {
                    if count == 0 {
                        input_open = false;
                        self.shutting_down = true;
                    }
                    let now = Instant::now();
                    for event in received.drain(..) {
                        self.accept(event, now);
                    }
                }
                () = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
                else => break,
            }
        }
        self.flush_remaining().await;
    }

    fn accept(&mut self, event: GatewayEvent, now: Instant) {
        let lane = Lane::of(&event);
        self.stats.on_received(lane);
        if let GatewayEvent::Qr(qr) = &event
            && qr.is_expired_at(now)
        {
            self.stats.on_expired();
            return;
        }
        let (deadline, supersede) = self.placement(&event, now);
        let stream = &mut self.streams[stream_of(self.config.policy, lane)];
        if stream.in_flight > 0 {
            stream.arrived_while_busy = true;
        }
        stream.queue.push(event, deadline, supersede, &self.stats);
    }

    /// When an event must be sent at the latest, and whether it may replace an older one.
    fn placement(&self, event: &GatewayEvent, now: Instant) -> (Option<Instant>, Supersede) {
        if self.config.policy != BatchPolicy::Adaptive {
            return (None, Supersede::Never);
        }
        match event {
            GatewayEvent::Qr(qr) => {
                let remaining = qr.valid_until.saturating_duration_since(now);
                let hold = self
                    .config
                    .qr_max_delay
                    .min(remaining.mul_f64(self.config.qr_validity_fraction));
                (Some(now + hold), Supersede::InPlace)
            }
            // High priority keeps every transition in order (a disconnect then a reconnect are
            // both news), so nothing supersedes it.
            GatewayEvent::Status(status) if status.priority == Priority::High => {
                (Some(now + self.config.high_linger), Supersede::Never)
            }
            GatewayEvent::Status(_) => {
                (Some(now + self.config.normal_max_delay), Supersede::Requeue)
            }
        }
    }

    fn advance_ticks(&mut self, now: Instant) {
        for stream in &mut self.streams {
            if let Some(tick) = &mut stream.tick
                && tick.next <= now
            {
                // Like a JS setInterval: a tick on an empty lane does nothing.
                tick.due = stream.queue.live() > 0;
                while tick.next <= now {
                    tick.next += tick.period;
                }
            }
        }
    }

    /// Starts every flush that is due now.
    fn dispatch(&mut self, now: Instant) {
        for index in 0..self.streams.len() {
            while let Some(reason) = self.due(index, now) {
                let stream = &mut self.streams[index];
                let items = stream.queue.take(stream.batch_limit, now, &self.stats);
                if let Some(tick) = &mut stream.tick {
                    tick.due = false;
                }
                stream.arrived_while_busy = false;
                stream.last_flush = Some(now);
                if items.is_empty() {
                    // Everything taken had expired.
                    continue;
                }
                let lane = if stream.lane == Lane::Qr {
                    Lane::Qr
                } else if items
                    .iter()
                    .any(|event| Lane::of(event) == Lane::StatusHigh)
                {
                    Lane::StatusHigh
                } else {
                    Lane::StatusNormal
                };
                stream.in_flight += 1;
                self.stats.on_flush(lane, reason);
                let sink = self.sink.clone();
                let batch = Batch {
                    lane,
                    items,
                    reason,
                };
                let handle = self
                    .deliveries
                    .spawn(async move { sink.deliver(batch).await });
                self.delivery_stream.insert(handle.id(), index);
            }
        }
    }

    fn due(&self, index: usize, now: Instant) -> Option<FlushReason> {
        let stream = &self.streams[index];
        if stream.queue.live() == 0 || stream.in_flight >= stream.max_in_flight {
            return None;
        }
        if self.shutting_down {
            return Some(FlushReason::Shutdown);
        }
        match self.config.policy {
            BatchPolicy::Naive => Some(FlushReason::Immediate),
            BatchPolicy::Seed => {
                if stream.queue.live() >= stream.batch_limit {
                    Some(FlushReason::Size)
                } else if stream.tick.as_ref().is_some_and(|tick| tick.due) {
                    Some(FlushReason::Interval)
                } else {
                    None
                }
            }
            BatchPolicy::Adaptive => {
                if stream.queue.live() >= stream.batch_limit {
                    return Some(FlushReason::Size);
                }
                if stream.queue.earliest_deadline().is_none_or(|at| at > now) {
                    return None;
                }
                if self.spacing_until(stream).is_some_and(|at| at > now) {
                    return None;
                }
                Some(if stream.lane == Lane::Qr {
                    FlushReason::Deadline
                } else if !stream.queue.has_high() {
                    FlushReason::Interval
                } else if stream.arrived_while_busy {
                    FlushReason::Coalesced
                } else {
                    FlushReason::Immediate
                })
            }
        }
    }

    fn on_delivered(&mut self, done: Result<(task::Id, ()), task::JoinError>) {
        let id = match done {
            Ok((id, ())) => id,
            Err(err) => {
                // The sink owns retries and spilling; a panic there means its batch is gone.
                tracing::error!(error = %err, "batch sink panicked while delivering a batch");
                err.id()
            }
        };
        if let Some(index) = self.delivery_stream.remove(&id) {
            self.streams[index].in_flight -= 1;
        }
    }

    /// Events the input may hand over before some queue is full. Reading stops at zero, which
    /// makes submitters wait: backpressure instead of growing memory.
    fn free_capacity(&self) -> usize {
        self.streams
            .iter()
            .map(|stream| {
                self.config
                    .max_pending_per_lane
                    .saturating_sub(stream.queue.len())
            })
            .min()
            .unwrap_or(0)
    }

    fn next_wake(&self) -> Option<Instant> {
        self.streams
            .iter()
            .filter_map(|stream| {
                let tick = stream.tick.as_ref().map(|tick| tick.next);
                // A busy stream is woken by its delivery completing, not by the clock.
                let deadline = (stream.in_flight < stream.max_in_flight && stream.queue.live() > 0)
                    .then(|| stream.queue.earliest_deadline())
                    .flatten()
                    .map(|at| {
                        self.spacing_until(stream)
                            .map_or(at, |spaced| at.max(spaced))
                    });
                match (tick, deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min()
    }

    /// Adaptive status streams wait this long after their last request started.
    fn spacing_until(&self, stream: &Stream) -> Option<Instant> {
        if self.config.policy != BatchPolicy::Adaptive
            || stream.lane == Lane::Qr
            || self.shutting_down
        {
            return None;
        }
        stream
            .last_flush
            .map(|at| at + self.config.high_min_spacing)
    }

    fn is_empty(&self) -> bool {
        self.streams.iter().all(|stream| stream.queue.live() == 0)
    }

    /// Waits for in-flight deliveries, then sends what is left, one request at a time per stream.
    /// The loop normally leaves nothing behind; this is the backstop that keeps shutdown lossless.
    async fn flush_remaining(&mut self) {
        while let Some(done) = self.deliveries.join_next_with_id().await {
            self.on_delivered(done);
        }
        self.shutting_down = true;
        for index in 0..self.streams.len() {
            while self.streams[index].queue.live() > 0 {
                self.dispatch(Instant::now());
                while let Some(done) = self.deliveries.join_next_with_id().await {
                    self.on_delivered(done);
                }
            }
        }
    }
}

fn stream_of(policy: BatchPolicy, lane: Lane) -> usize {
    match (policy, lane) {
        // Both status lanes share one queue and one request at a time, so a session's statuses
        // reach the backend in the order they happened.
        (BatchPolicy::Adaptive, Lane::StatusNormal) => Lane::StatusHigh.index(),
        (_, lane) => lane.index(),
    }
}

fn build_streams(config: &BatchConfig, now: Instant) -> Vec<Stream> {
    let stream =
        |lane: Lane, max_in_flight: usize, batch_limit: usize, period: Option<Duration>| Stream {
            lane,
            queue: PendingQueue::default(),
            in_flight: 0,
            max_in_flight,
            batch_limit,
            tick: period.map(|period| Tick {
                period,
                next: now + period,
                due: false,
            }),
            arrived_while_busy: false,
            last_flush: None,
        };
    match config.policy {
        BatchPolicy::Seed => vec![
            stream(Lane::Qr, 1, config.batch_size, Some(config.batch_interval)),
            stream(
                Lane::StatusHigh,
                1,
                config.batch_size,
                Some(config.priority_interval),
            ),
            stream(
                Lane::StatusNormal,
                1,
                config.batch_size,
                Some(config.batch_interval),
            ),
        ],
        BatchPolicy::Naive => Lane::ALL
            .iter()
            .map(|&lane| stream(lane, config.naive_max_in_flight, 1, None))
            .collect(),
        BatchPolicy::Adaptive => vec![
            stream(Lane::Qr, 1, config.max_batch_items, None),
            stream(Lane::StatusHigh, 1, config.max_batch_items, None),
        ],
    }
}
