//! The NATS JetStream bus of cluster mode.
//!
//! Every event is published with two headers (ADR 0003):
//! - `Nats-Msg-Id: <event id>`, so JetStream drops a re-publish inside its
//!   de-duplication window;
//! - `Nats-Expected-Last-Sequence: <position − 1>`, so JetStream stores the
//!   event only directly after its predecessor.
//!
//! Together they make the stream's sequence number equal the log position:
//! no event is stored twice (not even after the de-duplication window), none
//! out of order, and any number of publishers may race safely. The stream's
//! last sequence is therefore the exact, durable "published up to" mark.

use async_nats::jetstream::{self, consumer, context::PublishErrorKind, message::PublishMessage, stream};
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt as _, TryStreamExt as _};
use privcomm_domain::{BusError, EventBus, Position, RecordedEvent};
use privcomm_projections::worker::{ALL_MODELS_CONSUMER, CONSUMER_PREFIX};
use privcomm_relay::presence::Signal;
use privcomm_relay::push::{PushRequest, PushSink};
use std::time::Duration;

/// Where the log goes on NATS.
#[derive(Clone, Debug)]
pub struct NatsBusConfig {
    /// JetStream stream name (`NATS_STREAM`, default `PRIVCOMM_EVENTS`).
    pub stream_name: String,
    /// Subject prefix; events go to `<prefix>.<event type>` (`privcomm.<stream>` by default).
    pub subject_prefix: String,
}

impl NatsBusConfig {
    /// The stream `stream_name` on subjects `privcomm.<stream_name>.<EventType>`:
    /// distinct streams never share subjects, so several deployments (or
    /// test runs) can share one NATS server.
    pub fn for_stream(stream_name: &str) -> NatsBusConfig {
        NatsBusConfig { stream_name: stream_name.to_owned(), subject_prefix: format!("privcomm.{stream_name}") }
    }
}

impl Default for NatsBusConfig {
    fn default() -> Self {
        NatsBusConfig::for_stream("PRIVCOMM_EVENTS")
    }
}

/// JetStream-backed [`EventBus`].
pub struct NatsBus {
    jetstream: jetstream::Context,
    config: NatsBusConfig,
}

fn transport(error: impl std::error::Error + Send + Sync + 'static) -> BusError {
    BusError::Transport(Box::new(error))
}

impl NatsBus {
    /// Connects to `url` and creates the stream if it does not exist.
    pub async fn connect(url: &str, config: NatsBusConfig) -> Result<NatsBus, BusError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(transport)?;
        let jetstream = jetstream::new(client);
        jetstream
            .get_or_create_stream(stream::Config {
                name: config.stream_name.clone(),
                subjects: vec![format!("{}.>", config.subject_prefix)],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(120),
                ..Default::default()
            })
            .await
            .map_err(transport)?;
        Ok(NatsBus { jetstream, config })
    }

    /// The JetStream context, for consumers that need more than the trait.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Where this bus publishes.
    pub fn config(&self) -> &NatsBusConfig {
        &self.config
    }

    /// Deletes the stream (tests and `privcomm` operators resetting a bus).
    pub async fn delete_stream(&self) -> Result<(), BusError> {
        self.jetstream.delete_stream(&self.config.stream_name).await.map_err(transport)?;
        Ok(())
    }

    /// A connectivity check for `/health/`.
    pub async fn check_health(&self) -> Result<(), BusError> {
        self.last_published().await.map(|_| ())
    }
}

#[async_trait]
impl EventBus for NatsBus {
    async fn publish(&self, events: &[RecordedEvent]) -> Result<Position, BusError> {
        let Some(last_event) = events.last() else { return self.last_published().await };
        // Send the whole batch, then collect the acks: one round trip, not one per event.
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let payload = serde_json::to_vec(event).map_err(transport)?;
            let message = PublishMessage::build()
                .payload(payload.into())
                .message_id(event.event_id.0.to_string())
                .expected_last_sequence(event.position.0.saturating_sub(1));
            let subject = format!("{}.{}", self.config.subject_prefix, event.event_type);
            pending.push((event.position, self.jetstream.send_publish(subject, message).await.map_err(transport)?));
        }
        let mut first_refused = None;
        for (position, ack) in pending {
            match ack.await {
                Ok(ack) if ack.duplicate || ack.sequence == position.0 => {}
                Ok(ack) => {
                    return Err(BusError::Decode(format!(
                        "stream {} stored position {position} at sequence {}: the stream is shared or was reset",
                        ack.stream, ack.sequence
                    )));
                }
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    first_refused.get_or_insert(position);
                }
                Err(error) => return Err(transport(error)),
            }
        }
        match first_refused {
            None => Ok(last_event.position),
            Some(attempted) => {
                // Refused because it is already there (fine), or because its
                // predecessor is missing (the caller must re-sync).
                let bus_last = self.last_published().await?;
                if bus_last >= attempted { Ok(bus_last) } else { Err(BusError::OutOfSequence { bus_last, attempted }) }
            }
        }
    }

    async fn last_published(&self) -> Result<Position, BusError> {
        let mut stream = self.jetstream.get_stream(&self.config.stream_name).await.map_err(transport)?;
        let info = stream.info().await.map_err(transport)?;
        Ok(Position(info.state.last_sequence))
    }

    async fn subscribe(
        &self,
        after: Position,
    ) -> Result<BoxStream<'static, Result<RecordedEvent, BusError>>, BusError> {
        let stream = self.jetstream.get_stream(&self.config.stream_name).await.map_err(transport)?;
        let deliver_policy = match after {
            Position::START => consumer::DeliverPolicy::All,
            after => consumer::DeliverPolicy::ByStartSequence { start_sequence: after.0 + 1 },
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig { deliver_policy, ..Default::default() })
            .await
            .map_err(transport)?;
        let messages = consumer.messages().await.map_err(transport)?;
        Ok(messages
            .map(|message| {
                let message = message.map_err(transport)?;
                serde_json::from_slice::<RecordedEvent>(&message.payload).map_err(|e| BusError::Decode(e.to_string()))
            })
            .boxed())
    }
}

/// Presence signals over core NATS (`privcomm.presence.<stream>`, JSON), so
/// every node knows who is connected where (takeover, offline push).
pub struct NatsPresence {
    client: async_nats::Client,
    subject: String,
}

impl NatsPresence {
    /// Presence on the same NATS connection and namespace as `bus`.
    pub fn new(bus: &NatsBus) -> NatsPresence {
        NatsPresence {
            client: bus.jetstream.client(),
            subject: format!("privcomm.presence.{}", bus.config.stream_name),
        }
    }
}

#[async_trait]
impl privcomm_relay::presence::Presence for NatsPresence {
    async fn publish(&self, signal: Signal) {
        let Ok(payload) = serde_json::to_vec(&signal) else { return };
        if let Err(error) = self.client.publish(self.subject.clone(), payload.into()).await {
            tracing::warn!(%error, "cannot publish a presence signal; takeover and push decisions may lag");
        }
    }

    async fn signals(&self) -> Result<BoxStream<'static, Signal>, String> {
        let subscriber = self.client.subscribe(self.subject.clone()).await.map_err(|e| e.to_string())?;
        // Subscribed once the server has seen the SUB: signals published after
        // this call returns are not missed.
        self.client.flush().await.map_err(|e| e.to_string())?;
        Ok(subscriber.filter_map(|message| async move { serde_json::from_slice(&message.payload).ok() }).boxed())
    }
}

/// Push requests over core NATS, one subject per platform:
/// `privcomm.push.<stream>.<platform>` (`fcm`, `apns`).
pub struct NatsPush {
    client: async_nats::Client,
    prefix: String,
}

impl NatsPush {
    /// Push requests on the same NATS connection and namespace as `bus`.
    pub fn new(bus: &NatsBus) -> NatsPush {
        NatsPush { client: bus.jetstream.client(), prefix: format!("privcomm.push.{}", bus.config.stream_name) }
    }

    /// The subject a platform's requests go to.
    pub fn subject(&self, platform: &str) -> String {
        format!("{}.{platform}", self.prefix)
    }
}

#[async_trait]
impl PushSink for NatsPush {
    async fn publish(&self, request: &PushRequest) -> Result<(), String> {
        let payload = serde_json::to_vec(request).map_err(|e| e.to_string())?;
        self.client.publish(self.subject(&request.platform), payload.into()).await.map_err(|e| e.to_string())
    }
}

/// Deletes the durable consumers that versions before 2026-11-29 ran, one
/// per read model (`privcomm-projection-<model>`): once one worker applies
/// every model nobody pulls from them, and `nats consumer ls` would show
/// them ever further behind. A failure is logged and retried at the next
/// start; it changes nothing for the workers.
async fn retire_per_model_consumers(stream: &jetstream::stream::Stream) {
    let names: Vec<String> = match stream.consumer_names().try_collect().await {
        Ok(names) => names,
        Err(error) => {
            tracing::warn!(%error, "cannot list the stream's consumers to retire per-model ones");
            return;
        }
    };
    for name in names {
        if name.starts_with(CONSUMER_PREFIX) && name != ALL_MODELS_CONSUMER {
            match stream.delete_consumer(&name).await {
                Ok(_) => {
                    tracing::info!(consumer = %name, "deleted a per-model projection consumer of an earlier version")
                }
                Err(error) => tracing::warn!(consumer = %name, %error, "cannot delete a per-model projection consumer"),
            }
        }
    }
}

/// Durable JetStream consumers for the projection workers.
///
/// Each worker has its own durable pull consumer (`privcomm serve` runs one,
/// `privcomm-projection-all`, acknowledge-all). Opening it positions it just
/// after the lowest of its models' checkpoints — the checkpoint, kept with
/// the read model, is the truth — and the worker acknowledges each batch
/// after committing it, so the consumer's pending count (`nats consumer
/// info`) is the lag as NATS sees it.
pub struct NatsFeed {
    bus: std::sync::Arc<NatsBus>,
}

impl NatsFeed {
    /// Feeds from `bus`'s stream.
    pub fn new(bus: std::sync::Arc<NatsBus>) -> NatsFeed {
        NatsFeed { bus }
    }
}

#[async_trait]
impl privcomm_projections::worker::Feed for NatsFeed {
    async fn open(
        &self,
        consumer: &str,
        after: Position,
    ) -> Result<BoxStream<'static, Result<privcomm_projections::worker::Delivery, BusError>>, BusError> {
        let stream = self.bus.jetstream.get_stream(&self.bus.config.stream_name).await.map_err(transport)?;
        // Re-position the durable at the checkpoint (it may be ahead after a
        // read model was rebuilt, or behind after a crash before an ack).
        let _ = stream.delete_consumer(consumer).await;
        let deliver_policy = match after {
            Position::START => consumer::DeliverPolicy::All,
            after => consumer::DeliverPolicy::ByStartSequence { start_sequence: after.0 + 1 },
        };
        let durable = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(consumer.to_owned()),
                deliver_policy,
                ack_policy: consumer::AckPolicy::All,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 4 * privcomm_projections::worker::MAX_BATCH as i64,
                ..Default::default()
            })
            .await
            .map_err(transport)?;
        if consumer == ALL_MODELS_CONSUMER {
            retire_per_model_consumers(&stream).await;
        }
        // Pull as many as a worker batch takes, so a worker that fell behind catches up in big batches.
        let messages = durable
            .stream()
            .max_messages_per_batch(privcomm_projections::worker::MAX_BATCH)
            .heartbeat(Duration::from_secs(15))
            .messages()
            .await
            .map_err(transport)?;
        Ok(messages
            .map(|message| {
                let message = message.map_err(transport)?;
                let event = serde_json::from_slice::<RecordedEvent>(&message.payload)
                    .map_err(|e| BusError::Decode(e.to_string()))?;
                let ack: privcomm_projections::worker::Ack = Box::new(move || {
                    Box::pin(async move {
                        if let Err(error) = message.ack().await {
                            // The checkpoint already holds the batch; a lost ack only means a redelivery to skip.
                            tracing::debug!(%error, "cannot acknowledge a projection batch");
                        }
                    })
                });
                Ok(privcomm_projections::worker::Delivery { event, ack: Some(ack) })
            })
            .boxed())
    }
}
