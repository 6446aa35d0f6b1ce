//! The in-process bus of embedded mode.
//!
//! In a single process the committed log is already at hand, so the bus keeps
//! no copy of it: it records how far the log has been published and serves
//! subscribers from the store, up to that mark. Subscribers therefore see
//! exactly what a JetStream subscriber would — every published event, in
//! order, once — and nothing can be lost to a full buffer.

use async_trait::async_trait;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use privcomm_domain::{BusError, EventBus, EventStore, Position, RecordedEvent};
use std::sync::Arc;
use tokio::sync::watch;

/// Events fetched from the store per read while a subscriber catches up.
const PAGE: usize = 500;

/// In-process [`EventBus`] over an [`EventStore`].
pub struct InProcessBus {
    store: Arc<dyn EventStore>,
    published: watch::Sender<Position>,
}

impl InProcessBus {
    /// A bus over `store`, with nothing published yet.
    pub fn new(store: Arc<dyn EventStore>) -> InProcessBus {
        InProcessBus::published_up_to(store, Position::START)
    }

    /// A bus over `store` that serves the committed events up to `published`
    /// already: a restarted process resumes at its outbox checkpoint instead
    /// of republishing the whole log before subscribers see new events.
    pub fn published_up_to(store: Arc<dyn EventStore>, published: Position) -> InProcessBus {
        InProcessBus { store, published: watch::channel(published).0 }
    }
}

#[async_trait]
impl EventBus for InProcessBus {
    async fn publish(&self, events: &[RecordedEvent]) -> Result<Position, BusError> {
        let mut outcome = Ok(Position::START);
        self.published.send_if_modified(|last| {
            for event in events {
                if event.position <= *last {
                    continue; // already published: skipped, as JetStream de-duplicates
                }
                if event.position != last.next() {
                    outcome = Err(BusError::OutOfSequence { bus_last: *last, attempted: event.position });
                    return true;
                }
                *last = event.position;
            }
            outcome = Ok(*last);
            true
        });
        outcome
    }

    async fn last_published(&self) -> Result<Position, BusError> {
        Ok(*self.published.borrow())
    }

    async fn subscribe(
        &self,
        after: Position,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, BusError>>, BusError> {
        let store = self.store.clone();
        let published = self.published.subscribe();
        let state = (store, published, after, Vec::<RecordedEvent>::new().into_iter());
        let stream = futures::stream::unfold(state, |(store, mut published, mut after, mut buffered)| async move {
            loop {
                if let Some(event) = buffered.next() {
                    after = event.position;
                    return Some((Ok(event), (store, published, after, buffered)));
                }
                let limit = match published.wait_for(|last| *last > after).await {
                    Ok(last) => *last,
                    Err(_) => return None, // the bus was dropped
                };
                match store.read_all(after, PAGE).await {
                    Ok(page) => {
                        buffered = page.into_iter().take_while(|e| e.position <= limit).collect::<Vec<_>>().into_iter()
                    }
                    Err(error) => {
                        let error = BusError::Transport(Box::new(error));
                        return Some((Err(error), (store, published, after, buffered)));
                    }
                }
            }
        });
        Ok(stream.boxed())
    }
}

/// Push requests of embedded mode: an in-process feed that a push gateway
/// running in the same process (or a test) subscribes to. Requests published
/// while no one listens are dropped, as on a NATS subject.
pub struct InProcessPush {
    feed: tokio::sync::broadcast::Sender<privcomm_relay::push::PushRequest>,
}

impl Default for InProcessPush {
    fn default() -> Self {
        InProcessPush { feed: tokio::sync::broadcast::channel(1_024).0 }
    }
}

impl InProcessPush {
    /// Requests from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<privcomm_relay::push::PushRequest> {
        self.feed.subscribe()
    }
}

#[async_trait]
impl privcomm_relay::push::PushSink for InProcessPush {
    async fn publish(&self, request: &privcomm_relay::push::PushRequest) -> Result<(), String> {
        let _ = self.feed.send(request.clone());
        Ok(())
    }
}
