//! Projection workers: one per read model, each fed by its own consumer of
//! the event feed (a durable JetStream consumer in cluster mode, the
//! in-process bus in embedded mode).
//!
//! A worker opens its feed just after the model's checkpoint, applies what
//! arrives in batches ([`ReadStore::apply_batch`]: ops and checkpoint in one
//! transaction), then acknowledges the batch to the feed. The checkpoint in
//! the read-model database is the truth: a feed that redelivers is skipped
//! over, a feed that skips is refused as a gap and reopened at the checkpoint.

use crate::models::ReadModel;
use crate::store::{Decoded, ProjectionError, ReadStore};
use async_trait::async_trait;
use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use privcomm_domain::{BusError, EventBus, EventStore, Position, RecordedEvent};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long a worker waits for more events after the first of a batch:
/// under load, a batch of hundreds costs about what a batch of one does
/// (one transaction, one commit), and a message delivered within the wait
/// is written once, as delivered, instead of inserted and then updated
/// (the update was the mailbox's costliest statement). In the 2,000 msg/s
/// load run 100 ms gave the lowest delay of 20, 100, 200 and 300 ms.
pub const LINGER: Duration = Duration::from_millis(100);

/// Name prefix of the feed consumers of projection workers.
pub const CONSUMER_PREFIX: &str = "privcomm-projection-";

/// The feed consumer of a worker that applies every read model (what
/// `privcomm serve` runs); a worker of one model names its consumer after it.
pub const ALL_MODELS_CONSUMER: &str = "privcomm-projection-all";

/// Most events applied in one transaction.
pub const MAX_BATCH: usize = 4_000;

/// Acknowledges everything delivered up to and including one event.
pub type Ack = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// One event from a feed, with the way to acknowledge it (if the feed keeps
/// track of acknowledgements).
pub struct Delivery {
    /// The event.
    pub event: RecordedEvent,
    /// Acknowledges this event and every one before it.
    pub ack: Option<Ack>,
}

/// A source of the log's events for one named consumer.
#[async_trait]
pub trait Feed: Send + Sync + 'static {
    /// Every event after `after`, in position order, then live ones.
    async fn open(
        &self,
        consumer: &str,
        after: Position,
    ) -> Result<BoxStream<'static, Result<Delivery, BusError>>, BusError>;
}

/// Any [`EventBus`] as a feed without acknowledgements (the in-process bus:
/// the checkpoint alone says where to resume).
pub struct BusFeed(pub Arc<dyn EventBus>);

#[async_trait]
impl Feed for BusFeed {
    async fn open(
        &self,
        _consumer: &str,
        after: Position,
    ) -> Result<BoxStream<'static, Result<Delivery, BusError>>, BusError> {
        let events = self.0.subscribe(after).await?;
        Ok(events.map(|event| event.map(|event| Delivery { event, ack: None })).boxed())
    }
}

/// What a worker reports: how far it is, how far behind, how long events wait.
pub struct ProjectionStatus {
    model: &'static str,
    applied: AtomicU64,
    head: AtomicU64,
    lag_us: AtomicI64,
    delays: Mutex<hdrhistogram::Histogram<u64>>,
}

impl ProjectionStatus {
    fn new(model: &'static str) -> ProjectionStatus {
        ProjectionStatus {
            model,
            applied: AtomicU64::new(0),
            head: AtomicU64::new(0),
            lag_us: AtomicI64::new(0),
            // Microseconds, 1 µs to 1 hour, 3 significant digits.
            delays: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| {
                hdrhistogram::Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
            })),
        }
    }

    /// The model.
    pub fn model(&self) -> &'static str {
        self.model
    }

    /// The last applied position.
    pub fn applied(&self) -> Position {
        Position(self.applied.load(Ordering::Relaxed))
    }

    /// Events committed but not yet applied, as of the last look at the head.
    pub fn lag_events(&self) -> u64 {
        self.head.load(Ordering::Relaxed).saturating_sub(self.applied.load(Ordering::Relaxed))
    }

    /// How long the oldest unapplied event has waited, as of the last look.
    pub fn lag_seconds(&self) -> f64 {
        self.lag_us.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// A quantile (0..=1) of commit-to-applied delay, in seconds, and the count.
    pub fn delay_quantile(&self, quantile: f64) -> (f64, u64) {
        let delays = self.delays.lock().unwrap_or_else(|p| p.into_inner());
        (delays.value_at_quantile(quantile) as f64 / 1e6, delays.len())
    }

    fn applied_batch(&self, batch: &[Decoded], now_us: i64) {
        if let Some(last) = batch.last() {
            self.applied.fetch_max(last.event.position.0, Ordering::Relaxed);
            self.head.fetch_max(last.event.position.0, Ordering::Relaxed);
        }
        let mut delays = self.delays.lock().unwrap_or_else(|p| p.into_inner());
        for decoded in batch {
            let _ = delays.record((now_us - decoded.event.recorded_at.0).max(1) as u64);
        }
    }
}

/// The workers of a set of models, and their status for `/metrics`.
pub struct Projector {
    statuses: Vec<Arc<ProjectionStatus>>,
}

impl Projector {
    /// Starts one worker per group of models; they stop when `stop` turns
    /// true. A group shares one feed and one transaction per batch
    /// (`privcomm serve` runs one group of all models, ADR 0010).
    pub fn spawn(
        groups: Vec<Vec<Arc<dyn ReadModel>>>,
        store: Arc<dyn ReadStore>,
        feed: Arc<dyn Feed>,
        log: Arc<dyn EventStore>,
        clock: Arc<dyn privcomm_domain::Clock>,
        stop: watch::Receiver<bool>,
    ) -> (Projector, Vec<tokio::task::JoinHandle<()>>) {
        let mut all_statuses = Vec::new();
        let mut handles = Vec::new();
        for models in groups.into_iter().filter(|g| !g.is_empty()) {
            let statuses: Vec<_> = models.iter().map(|m| Arc::new(ProjectionStatus::new(m.name()))).collect();
            all_statuses.extend(statuses.iter().cloned());
            let worker = Worker {
                models,
                store: store.clone(),
                feed: feed.clone(),
                log: log.clone(),
                clock: clock.clone(),
                statuses,
            };
            handles.push(tokio::spawn(worker.run(stop.clone())));
        }
        (Projector { statuses: all_statuses }, handles)
    }

    /// Per-model status.
    pub fn statuses(&self) -> &[Arc<ProjectionStatus>] {
        &self.statuses
    }

    /// The Prometheus exposition of projection lag and delay.
    pub fn render_metrics(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP privcomm_projection_position Last log position applied to the read model.");
        let _ = writeln!(out, "# TYPE privcomm_projection_position gauge");
        for s in &self.statuses {
            let _ = writeln!(out, "privcomm_projection_position{{model=\"{}\"}} {}", s.model, s.applied().0);
        }
        let _ =
            writeln!(out, "# HELP privcomm_projection_lag_events Committed events not yet applied to the read model.");
        let _ = writeln!(out, "# TYPE privcomm_projection_lag_events gauge");
        for s in &self.statuses {
            let _ = writeln!(out, "privcomm_projection_lag_events{{model=\"{}\"}} {}", s.model, s.lag_events());
        }
        let _ = writeln!(
            out,
            "# HELP privcomm_projection_lag_seconds Age of the oldest committed event not yet applied (0 when caught up)."
        );
        let _ = writeln!(out, "# TYPE privcomm_projection_lag_seconds gauge");
        for s in &self.statuses {
            let _ = writeln!(out, "privcomm_projection_lag_seconds{{model=\"{}\"}} {:.6}", s.model, s.lag_seconds());
        }
        let _ = writeln!(
            out,
            "# HELP privcomm_projection_delay_seconds Time from an event's commit to its read-model commit."
        );
        let _ = writeln!(out, "# TYPE privcomm_projection_delay_seconds summary");
        for s in &self.statuses {
            for quantile in [0.5, 0.99, 1.0] {
                let (value, _) = s.delay_quantile(quantile);
                let _ = writeln!(
                    out,
                    "privcomm_projection_delay_seconds{{model=\"{}\",quantile=\"{quantile}\"}} {value:.6}",
                    s.model
                );
            }
            let _ = writeln!(
                out,
                "privcomm_projection_delay_seconds_count{{model=\"{}\"}} {}",
                s.model,
                s.delay_quantile(1.0).1
            );
        }
    }
}

struct Worker {
    models: Vec<Arc<dyn ReadModel>>,
    store: Arc<dyn ReadStore>,
    feed: Arc<dyn Feed>,
    log: Arc<dyn EventStore>,
    clock: Arc<dyn privcomm_domain::Clock>,
    statuses: Vec<Arc<ProjectionStatus>>,
}

/// Why a worker's feed session ended.
enum Ended {
    Stopped,
    Failed(String),
}

impl Worker {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.session(&mut stop).await {
                Ended::Stopped => return,
                Ended::Failed(error) => {
                    tracing::warn!(models = self.names(), %error, retry_in_ms = backoff.as_millis() as u64, "projection worker failed; resuming from its checkpoint");
                }
            }
            tokio::select! {
                () = stopped(&mut stop) => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    fn names(&self) -> String {
        self.models.iter().map(|m| m.name()).collect::<Vec<_>>().join(",")
    }

    /// Opens the feed at the lowest checkpoint and applies batches until stopped or failed.
    async fn session(&self, stop: &mut watch::Receiver<bool>) -> Ended {
        let failed = |error: &dyn std::fmt::Display| Ended::Failed(error.to_string());
        let mut lowest = None;
        for (model, status) in self.models.iter().zip(&self.statuses) {
            match self.store.checkpoint(model.as_ref()).await {
                Ok(checkpoint) => {
                    status.applied.store(checkpoint.0, Ordering::Relaxed);
                    lowest = Some(lowest.map_or(checkpoint, |l: Position| l.min(checkpoint)));
                }
                Err(error) => return failed(&error),
            }
        }
        let Some(checkpoint) = lowest else { return Ended::Stopped };
        let consumer = match self.models.as_slice() {
            [model] => format!("{CONSUMER_PREFIX}{}", model.name().replace('_', "-")),
            _ => ALL_MODELS_CONSUMER.to_owned(),
        };
        let mut feed = match self.feed.open(&consumer, checkpoint).await {
            Ok(feed) => feed,
            Err(error) => return failed(&error),
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let first = tokio::select! {
                () = stopped(stop) => return Ended::Stopped,
                _ = tick.tick() => {
                    self.look_at_head().await;
                    continue;
                }
                next = feed.next() => next,
            };
            let mut deliveries = match first {
                Some(Ok(delivery)) => vec![delivery],
                Some(Err(error)) => return failed(&error),
                None => return Ended::Failed("the feed ended".into()),
            };
            let linger = tokio::time::Instant::now() + LINGER;
            while deliveries.len() < MAX_BATCH {
                match tokio::time::timeout_at(linger, feed.next()).await {
                    Ok(Some(Ok(delivery))) => deliveries.push(delivery),
                    Ok(Some(Err(error))) => return failed(&error),
                    Ok(None) | Err(_) => break,
                }
            }
            let ack = deliveries.last_mut().and_then(|d| d.ack.take());
            let batch: Result<Vec<Decoded>, ProjectionError> =
                deliveries.into_iter().map(|d| Decoded::new(d.event)).collect();
            let batch = match batch {
                Ok(batch) => batch,
                Err(error) => return failed(&error),
            };
            let work: Vec<(&dyn ReadModel, &[Decoded])> =
                self.models.iter().map(|m| (m.as_ref(), batch.as_slice())).collect();
            if let Err(error) = self.store.apply(&work).await {
                return failed(&error);
            }
            let now = self.clock.now().0;
            for status in &self.statuses {
                status.applied_batch(&batch, now);
            }
            if let Some(ack) = ack {
                ack().await;
            }
        }
    }

    /// Refreshes the lag figures: the head, and the age of the first event not applied.
    async fn look_at_head(&self) {
        let Ok(head) = self.log.head().await else { return };
        // Models of one worker are usually at the same position: read each next event once.
        let mut ages: std::collections::HashMap<Position, i64> = std::collections::HashMap::new();
        for status in &self.statuses {
            status.head.fetch_max(head.0, Ordering::Relaxed);
            let applied = status.applied();
            let lag_us = if head <= applied {
                0
            } else if let Some(age) = ages.get(&applied) {
                *age
            } else {
                let Ok(next) = self.log.read_all(applied, 1).await else { return };
                let age = next.first().map_or(0, |e| (self.clock.now().0 - e.recorded_at.0).max(0));
                ages.insert(applied, age);
                age
            };
            status.lag_us.store(lag_us, Ordering::Relaxed);
        }
    }
}

/// Resolves once `stop` is true (never, if its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}
