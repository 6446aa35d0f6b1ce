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
use crate::store::{Decoded, ReadStore};
use async_trait::async_trait;
use privcomm_domain::envelope::{ChainBreak, ChainFault, ChainVerifier};
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

impl LogAuditor {
    /// Checks the next event and decodes it for the models.
    pub fn check(&mut self, event: RecordedEvent) -> Result<Decoded, Fault> {
        self.chain.check(&event).map_err(|b| describe(&b))?;
        let position = event.position;
        if event.payload.is_none() {
            self.dropped += 1;
            self.unexplained.insert(position.0);
        }
        let decoded = Decoded::new(event).map_err(|error| Fault {
            position,
            reason: match error {
                crate::store::ProjectionError::Undecodable { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
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

/// Rebuilds `models` into `target` from `source`. A model with an entry in
/// `limits` is applied only up to that position (to compare it with a live
/// model that is there); the chain is verified to the end regardless.
/// `progress` is called after every page with the events done so far and
/// the last position.
///
/// Reading, checking and decoding run on a task of their own, a page or two
/// ahead of the writes: the two halves take about the same time, and a
/// replay has a core for each.
pub async fn replay(
    mut source: Box<dyn EventSource>,
    target: &dyn ReadStore,
    models: &[Arc<dyn ReadModel>],
    limits: &HashMap<&'static str, Position>,
    mut progress: impl FnMut(u64, Position) + Send,
) -> Result<ReplayReport, crate::store::ProjectionError> {
    let (pages, mut received) = tokio::sync::mpsc::channel::<Vec<Decoded>>(2);
    let reader = tokio::spawn(async move {
        let mut auditor = LogAuditor::default();
        let mut fault = None;
        let mut io_error = None;
        'pages: loop {
            let page = match source.next_page().await {
                Ok(page) => page,
                Err(SourceError::Unreadable { after, reason }) => {
                    fault = Some(Fault { position: after.next(), reason: format!("unreadable: {reason}") });
                    break;
                }
                Err(SourceError::Io(reason)) => {
                    io_error = Some(reason);
                    break;
                }
            };
            if page.is_empty() {
                break;
            }
            let mut batch = Vec::with_capacity(page.len());
            for event in page {
                match auditor.check(event) {
                    Ok(decoded) => batch.push(decoded),
                    Err(found) => {
                        fault = Some(found);
                        let _ = pages.send(batch).await;
                        break 'pages;
                    }
                }
            }
            if pages.send(batch).await.is_err() {
                break; // the writer failed; its error is what gets reported
            }
        }
        (auditor, fault, io_error)
    });
    let mut head = Position::START;
    let mut done = 0u64;
    while let Some(batch) = received.recv().await {
        apply(target, models, limits, &batch).await?;
        if let Some(last) = batch.last() {
            head = last.event.position;
        }
        done += batch.len() as u64;
        progress(done, head);
    }
    let (auditor, mut fault, io_error) =
        reader.await.map_err(|e| crate::store::ProjectionError::Storage(Box::new(e)))?;
    if let Some(reason) = io_error {
        return Err(crate::store::ProjectionError::Storage(reason.into()));
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

async fn apply(
    target: &dyn ReadStore,
    models: &[Arc<dyn ReadModel>],
    limits: &HashMap<&'static str, Position>,
    batch: &[Decoded],
) -> Result<(), crate::store::ProjectionError> {
    let mut work: Vec<(&dyn ReadModel, &[Decoded])> = Vec::with_capacity(models.len());
    for model in models {
        let limit = limits.get(model.name()).copied();
        let end = limit.map_or(batch.len(), |limit| batch.partition_point(|d| d.event.position <= limit));
        if end > 0 {
            work.push((model.as_ref(), &batch[..end]));
        }
    }
    if !work.is_empty() {
        target.apply(&work).await?;
    }
    Ok(())
}
