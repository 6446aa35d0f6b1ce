//! Replay: rebuilds read models from a log (the live store or an export),
//! verifying the hash chain and the compaction record on the way.
//!
//! What a replay checks, in log order, stopping at the first failure:
//! - the chain ([`ChainVerifier`]): positions gap-free, each previous hash
//!   the hash before it, each payload hashing to its payload hash, each
//!   hash covering its header;
//! - compaction: a payload may be missing only for a type retention may
//!   drop, and only if an `EventsCompacted` event (appended before the drop)
//!   lists its position;
//! - every payload decodes.
//!
//! Memory stays bounded by the page size, plus the positions of dropped
//! payloads whose `EventsCompacted` record is still ahead.

use crate::models::ReadModel;
use crate::store::{Decoded, PlannedModel, ProjectionError, ReadStore, plan_ahead};
use async_trait::async_trait;
use futures::StreamExt as _;
use privcomm_domain::envelope::{ChainBreak, ChainFault, ChainVerifier, check_contents};
use privcomm_domain::events::DomainEvent;
use privcomm_domain::{EventStore, Hash, Position, RecordedEvent};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// Where a replay reads events from, a page at a time, in position order.
#[async_trait]
pub trait EventSource: Send + 'static {
    /// The next page; empty at the end.
    async fn next_page(&mut self) -> Result<Vec<RecordedEvent>, SourceError>;
}

/// A source that cannot be read further.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Bytes that are not an event (an export line, or a stored row), just
    /// after `after`.
    #[error("unreadable event after position {after}: {reason}")]
    Unreadable {
        /// The last position read before it.
        after: Position,
        /// Why.
        reason: String,
    },
    /// The store or the file failed.
    #[error("reading the log failed: {0}")]
    Io(String),
}

/// The live store, paged with `read_all`.
pub struct StoreSource {
    store: Arc<dyn EventStore>,
    after: Position,
    page: usize,
    until: Option<Position>,
}

impl StoreSource {
    /// Every event of `store` (up to `until`, if given), `page` at a time.
    pub fn new(store: Arc<dyn EventStore>, page: usize, until: Option<Position>) -> StoreSource {
        StoreSource { store, after: Position::START, page: page.max(1), until }
    }
}

#[async_trait]
impl EventSource for StoreSource {
    async fn next_page(&mut self) -> Result<Vec<RecordedEvent>, SourceError> {
        if self.until.is_some_and(|until| self.after >= until) {
            return Ok(Vec::new());
        }
        let mut page = self.store.read_all(self.after, self.page).await.map_err(|error| match error {
            privcomm_domain::StoreError::Corrupt { position, reason } => {
                SourceError::Unreadable { after: Position(position.0.saturating_sub(1)), reason }
            }
            other => SourceError::Io(other.to_string()),
        })?;
        if let Some(until) = self.until {
            page.retain(|e| e.position <= until);
        }
        if let Some(last) = page.last() {
            self.after = last.position;
        }
        Ok(page)
    }
}

/// What went wrong first, at which position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The first bad position.
    pub position: Position,
    /// A sentence for people.
    pub reason: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "position {}: {}", self.position, self.reason)
    }
}

/// Names the first bad position of a chain break in words.
pub fn describe(chain_break: &ChainBreak) -> Fault {
    let at = chain_break.position;
    match &chain_break.fault {
        ChainFault::UnexpectedPosition { expected } if at > *expected => {
            Fault { position: *expected, reason: format!("event missing (the next one found is {at})") }
        }
        ChainFault::UnexpectedPosition { expected } => {
            Fault { position: *expected, reason: format!("out of order: found position {at} where {expected} belongs") }
        }
        ChainFault::PrevHashMismatch => {
            Fault { position: at, reason: "previous hash does not match the event before it".into() }
        }
        ChainFault::PayloadHashMismatch => {
            Fault { position: at, reason: "payload does not match its payload hash (payload altered)".into() }
        }
        ChainFault::HashMismatch => {
            Fault { position: at, reason: "hash does not cover the header and payload hash (event altered)".into() }
        }
    }
}

/// Checks a log in order: chain, compaction record, decodability.
pub struct LogAuditor {
    chain: ChainVerifier,
    /// Dropped payloads whose `EventsCompacted` has not been seen yet.
    unexplained: BTreeSet<u64>,
    events: u64,
    dropped: u64,
}

impl Default for LogAuditor {
    fn default() -> Self {
        LogAuditor {
            chain: ChainVerifier::new(Position(1), Hash::GENESIS),
            unexplained: BTreeSet::new(),
            events: 0,
            dropped: 0,
        }
    }
}

/// An event with the checks that need no other event done: the contents of
/// its chain link ([`check_contents`]) and its decoding. Made on any thread
/// and in any order; [`LogAuditor::accept`] takes them in log order.
pub struct Prechecked {
    event: RecordedEvent,
    contents: Result<(), ChainFault>,
    domain: Result<Option<DomainEvent>, String>,
}

impl Prechecked {
    /// Hashes and decodes `event`.
    pub fn new(event: RecordedEvent) -> Prechecked {
        let contents = check_contents(&event);
        let domain = DomainEvent::for_fold(&event).map_err(|error| error.to_string());
        Prechecked { event, contents, domain }
    }
}

impl LogAuditor {
    /// Checks the next event and decodes it for the models.
    pub fn check(&mut self, event: RecordedEvent) -> Result<Decoded, Fault> {
        self.accept(Prechecked::new(event))
    }

    /// Checks the next event, hashed and decoded ahead; faults come in the
    /// order [`LogAuditor::check`] finds them: chain, then decoding, then
    /// the compaction record.
    pub fn accept(&mut self, prechecked: Prechecked) -> Result<Decoded, Fault> {
        let Prechecked { event, contents, domain } = prechecked;
        self.chain.link(&event, contents).map_err(|b| describe(&b))?;
        let position = event.position;
        if event.payload.is_none() {
            self.dropped += 1;
            self.unexplained.insert(position.0);
        }
        let decoded = Decoded { domain: domain.map_err(|reason| Fault { position, reason })?, event };
        if let Some(DomainEvent::EventsCompacted { positions }) = &decoded.domain {
            for listed in positions {
                if listed.0 >= position.0 {
                    return Err(Fault {
                        position,
                        reason: format!("compaction record names position {listed}, not before it"),
                    });
                }
                // Recorded before the drop: a listed payload may still be there (drop pending).
                self.unexplained.remove(&listed.0);
            }
        }
        self.events += 1;
        Ok(decoded)
    }

    /// After the last event: any payload dropped without a record is a fault.
    pub fn finish(&self) -> Result<(), Fault> {
        match self.unexplained.first() {
            Some(position) => Err(Fault {
                position: Position(*position),
                reason: "payload dropped with no EventsCompacted record of it".into(),
            }),
            None => Ok(()),
        }
    }

    /// Events checked.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Events whose payload was dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Hash of the last event checked (the head's hash after a full run).
    pub fn head_hash(&self) -> Hash {
        self.chain.head_hash()
    }
}

/// The result of a replay.
#[derive(Debug)]
pub struct ReplayReport {
    /// Events read and verified.
    pub events: u64,
    /// Of which payload-less (compacted).
    pub dropped_payloads: u64,
    /// Last position read.
    pub head: Position,
    /// Its hash.
    pub head_hash: Hash,
    /// The first fault; models are left as far as they got.
    pub fault: Option<Fault>,
}

/// What [`audited_pages`] found, once its channel has closed.
pub struct AuditOutcome {
    /// The auditor, after the last event it accepted.
    pub auditor: LogAuditor,
    /// The first fault, if the log has one; nothing after it was sent.
    pub fault: Option<Fault>,
    /// Why the source could not be read to the end, if it could not.
    pub io_error: Option<String>,
}

/// Reads `source` on a task of its own, hashes and decodes its pages on up
/// to `parallelism` threads at once (the expensive, per-event part of an
/// audit), and sends them through a [`LogAuditor`], in log order, on the
/// returned channel — up to the first fault. Memory stays bounded by the
/// few pages in flight.
pub fn audited_pages(
    mut source: Box<dyn EventSource>,
    parallelism: usize,
) -> (tokio::sync::mpsc::Receiver<Vec<Decoded>>, tokio::task::JoinHandle<AuditOutcome>) {
    let parallelism = parallelism.max(1);
    let (raw, mut raw_pages) = tokio::sync::mpsc::channel::<Result<Vec<RecordedEvent>, SourceError>>(parallelism);
    tokio::spawn(async move {
        loop {
            match source.next_page().await {
                Ok(page) if page.is_empty() => break,
                Ok(page) => {
                    if raw.send(Ok(page)).await.is_err() {
                        break; // the auditor stopped
                    }
                }
                Err(error) => {
                    let _ = raw.send(Err(error)).await;
                    break;
                }
            }
        }
    });
    let (pages, received) = tokio::sync::mpsc::channel::<Vec<Decoded>>(2);
    let auditing = tokio::spawn(async move {
        let prechecked = futures::stream::poll_fn(move |cx| raw_pages.poll_recv(cx))
            .map(|page| async move {
                let events = page?;
                tokio::task::spawn_blocking(move || events.into_iter().map(Prechecked::new).collect::<Vec<_>>())
                    .await
                    .map_err(|error| SourceError::Io(error.to_string()))
            })
            .buffered(parallelism);
        tokio::pin!(prechecked);
        let mut outcome = AuditOutcome { auditor: LogAuditor::default(), fault: None, io_error: None };
        'pages: while let Some(page) = prechecked.next().await {
            let page = match page {
                Ok(page) => page,
                Err(SourceError::Unreadable { after, reason }) => {
                    outcome.fault = Some(Fault { position: after.next(), reason: format!("unreadable: {reason}") });
                    break;
                }
                Err(SourceError::Io(reason)) => {
                    outcome.io_error = Some(reason);
                    break;
                }
            };
            let mut batch = Vec::with_capacity(page.len());
            for event in page {
                match outcome.auditor.accept(event) {
                    Ok(decoded) => batch.push(decoded),
                    Err(found) => {
                        outcome.fault = Some(found);
                        let _ = pages.send(batch).await;
                        break 'pages;
                    }
                }
            }
            if pages.send(batch).await.is_err() {
                break; // the consumer stopped; its error is what gets reported
            }
        }
        outcome
    });
    (received, auditing)
}

/// Threads for hashing and decoding: every core.
pub fn default_parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// Rebuilds `models` into `target` from `source`. A model with an entry in
/// `limits` is applied only up to that position (to compare it with a live
/// model that is there); the chain is verified to the end regardless.
/// `progress` is called after every page with the events done so far and
/// the last position.
///
/// Three stages run at once, a page or two apart: reading, checking and
/// decoding ([`audited_pages`]); planning each model's writes
/// ([`plan_ahead`]) from the checkpoint the previous page leaves; and
/// writing, one transaction per page ([`ReadStore::apply_planned`], which
/// refuses a page if anything else moved a model meanwhile).
pub async fn replay(
    source: Box<dyn EventSource>,
    target: &dyn ReadStore,
    models: &[Arc<dyn ReadModel>],
    limits: &HashMap<&'static str, Position>,
    mut progress: impl FnMut(u64, Position) + Send,
) -> Result<ReplayReport, ProjectionError> {
    let mut from = Vec::with_capacity(models.len());
    for model in models {
        from.push(target.checkpoint(model.as_ref()).await?);
    }
    let (mut audited, auditing) = audited_pages(source, default_parallelism());
    let (planned_pages, mut planned) = tokio::sync::mpsc::channel::<Result<PlannedPage, ProjectionError>>(1);
    let (models_owned, limits_owned, dialect) = (models.to_vec(), limits.clone(), target.dialect());
    let planning = tokio::spawn(async move {
        while let Some(batch) = audited.recv().await {
            let page = plan_page(&models_owned, &limits_owned, &mut from, &batch, dialect);
            let failed = page.is_err();
            if planned_pages.send(page).await.is_err() || failed {
                break;
            }
        }
    });
    let mut head = Position::START;
    let mut done = 0u64;
    let written: Result<(), ProjectionError> = async {
        while let Some(page) = planned.recv().await {
            let page = page?;
            if !page.models.is_empty() {
                target.apply_planned(page.models).await?;
            }
            head = page.last.unwrap_or(head);
            done += page.events;
            progress(done, head);
        }
        Ok(())
    }
    .await;
    // On a write error the planner and auditor stop at their next send.
    drop(planned);
    let _ = planning.await;
    written?;
    let AuditOutcome { auditor, mut fault, io_error } =
        auditing.await.map_err(|e| ProjectionError::Storage(Box::new(e)))?;
    if let Some(reason) = io_error {
        return Err(ProjectionError::Storage(reason.into()));
    }
    if fault.is_none() {
        fault = auditor.finish().err();
    }
    Ok(ReplayReport {
        events: auditor.events(),
        dropped_payloads: auditor.dropped(),
        head,
        head_hash: auditor.head_hash(),
        fault,
    })
}

/// A page of the log, planned for every model.
struct PlannedPage {
    models: Vec<PlannedModel>,
    events: u64,
    last: Option<Position>,
}

/// Plans `batch` for each model from its checkpoint in `from` (each up to
/// its limit, if it has one), and moves the checkpoints past it.
fn plan_page(
    models: &[Arc<dyn ReadModel>],
    limits: &HashMap<&'static str, Position>,
    from: &mut [Position],
    batch: &[Decoded],
    dialect: Option<crate::store::Dialect>,
) -> Result<PlannedPage, ProjectionError> {
    let mut planned = Vec::with_capacity(models.len());
    for (model, from) in models.iter().zip(from.iter_mut()) {
        let limit = limits.get(model.name()).copied();
        let end = limit.map_or(batch.len(), |limit| batch.partition_point(|d| d.event.position <= limit));
        if let Some(model_plan) = plan_ahead(model.as_ref(), *from, &batch[..end], dialect)? {
            *from = model_plan.to();
            planned.push(model_plan);
        }
    }
    Ok(PlannedPage { models: planned, events: batch.len() as u64, last: batch.last().map(|d| d.event.position) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models;
    use crate::store::MemoryReadStore;
    use crate::store::tests::{applied_at_once, log_with_messages};
    use std::collections::VecDeque;

    /// A log in memory, handed out `page` events at a time.
    struct VecSource {
        events: VecDeque<RecordedEvent>,
        page: usize,
    }

    #[async_trait]
    impl EventSource for VecSource {
        async fn next_page(&mut self) -> Result<Vec<RecordedEvent>, SourceError> {
            let take = self.page.min(self.events.len());
            Ok(self.events.drain(..take).collect())
        }
    }

    fn source(log: &[Decoded], page: usize) -> Box<dyn EventSource> {
        Box::new(VecSource { events: log.iter().map(|d| d.event.clone()).collect(), page })
    }

    async fn checksums(store: &MemoryReadStore) -> Vec<(&'static str, crate::rows::TableChecksum)> {
        let mut sums = Vec::new();
        for model in models::all() {
            sums.extend(store.snapshot(model.as_ref()).await.expect("snapshot").tables);
        }
        sums
    }

    #[tokio::test]
    async fn a_replay_in_small_pages_builds_what_one_batch_builds() {
        let log = log_with_messages(60).await;
        let whole = applied_at_once(&log).await;
        let replayed = MemoryReadStore::default();
        let mut calls = 0;
        let report = replay(source(&log, 7), &replayed, &models::all(), &HashMap::new(), |_, _| calls += 1)
            .await
            .expect("replays");
        assert_eq!(report.fault, None);
        assert_eq!(report.events, log.len() as u64);
        assert_eq!(report.head, log.last().expect("events").event.position);
        assert_eq!(calls, log.len().div_ceil(7));
        assert_eq!(checksums(&replayed).await, checksums(&whole).await);
    }

    #[tokio::test]
    async fn a_tampered_payload_stops_the_replay_at_its_position_with_everything_before_it_applied() {
        let log = log_with_messages(40).await;
        let mut events: Vec<Decoded> = log.clone();
        let bad = 23;
        if let Some(payload) = events[bad].event.payload.as_mut() {
            payload[5] ^= 1;
        }
        let replayed = MemoryReadStore::default();
        let report =
            replay(source(&events, 5), &replayed, &models::all(), &HashMap::new(), |_, _| {}).await.expect("replays");
        let position = events[bad].event.position;
        let fault = report.fault.expect("a fault");
        assert_eq!(fault.position, position, "{fault}");
        assert!(fault.reason.contains("payload altered"), "{fault}");
        for model in models::all() {
            assert_eq!(replayed.checkpoint(model.as_ref()).await.expect("checkpoint").next(), position);
        }
    }

    #[tokio::test]
    async fn a_plan_whose_checkpoint_moved_is_refused_and_changes_nothing() {
        let log = log_with_messages(10).await;
        let store = MemoryReadStore::default();
        let model = models::EventCounts;
        let planned = plan_ahead(&model, Position::START, &log[..4], None).expect("plans").expect("something");
        // Someone else applies the same events first.
        store.apply_batch(&model, &log[..2]).await.expect("applies");
        let before = checksums(&store).await;
        let error = store.apply_planned(vec![planned]).await.expect_err("refused");
        assert!(
            matches!(error, ProjectionError::Moved { planned: Position::START, found: Position(2), .. }),
            "{error}"
        );
        assert_eq!(checksums(&store).await, before);
        assert_eq!(store.checkpoint(&model).await.expect("checkpoint"), Position(2));
    }
}
