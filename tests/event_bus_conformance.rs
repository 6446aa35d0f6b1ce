//! One conformance suite for every `EventBus`: in-process and NATS JetStream.

mod support;

use futures::StreamExt as _;
use privcomm::bus::inprocess::InProcessBus;
use privcomm::clock::SystemClock;
use privcomm_domain::memory::InMemoryEventStore;
use privcomm_domain::{BusError, EventBus, EventStore, ExpectedVersion, Position, RecordedEvent};
use std::sync::Arc;
use std::time::Duration;
use support::{TestResult, append, event};

async fn log_of(
    n: usize,
) -> Result<(Arc<InMemoryEventStore>, Vec<RecordedEvent>), Box<dyn std::error::Error + Send + Sync>> {
    let store = Arc::new(InMemoryEventStore::new(Arc::new(SystemClock)));
    for i in 0..n {
        store.append(append(&format!("s{}", i % 3), ExpectedVersion::Any, vec![event(&i.to_string(), 120)])).await?;
    }
    let events = store.read_all(Position::START, n).await?;
    Ok((store, events))
}

async fn bus_holds_the_log_in_order_each_event_once(bus: Arc<dyn EventBus>, events: &[RecordedEvent]) -> TestResult {
    assert_eq!(bus.last_published().await?, Position(0));
    assert_eq!(bus.publish(&events[0..5]).await?, Position(5));
    // Re-publishing what the bus holds is skipped, not duplicated.
    assert_eq!(bus.publish(&events[2..5]).await?, Position(5));
    // Overlapping batches publish only the new part.
    assert_eq!(bus.publish(&events[3..7]).await?, Position(7));
    // A gap is refused and names what the bus holds.
    match bus.publish(&events[8..10]).await {
        Err(BusError::OutOfSequence { bus_last, attempted }) => {
            assert_eq!((bus_last, attempted), (Position(7), Position(9)));
        }
        other => return Err(format!("expected OutOfSequence, got {other:?}").into()),
    }
    assert_eq!(bus.last_published().await?, Position(7));

    let mut from_three = bus.subscribe(Position(3)).await?;
    let mut seen = Vec::new();
    for _ in 0..4 {
        let next = tokio::time::timeout(Duration::from_secs(5), from_three.next()).await?.ok_or("stream ended")??;
        seen.push(next);
    }
    assert_eq!(seen.iter().map(|e| e.position.0).collect::<Vec<_>>(), vec![4, 5, 6, 7]);
    assert_eq!(seen[0], events[3], "the bus must carry the envelope unchanged");
    // Live: published after subscribing.
    bus.publish(&events[7..10]).await?;
    for expected in 8..=10 {
        let next = tokio::time::timeout(Duration::from_secs(5), from_three.next()).await?.ok_or("stream ended")??;
        assert_eq!(next.position, Position(expected));
    }
    Ok(())
}

#[tokio::test]
async fn in_process_bus_holds_the_log_in_order_each_event_once() -> TestResult {
    let (store, events) = log_of(10).await?;
    let bus = Arc::new(InProcessBus::new(store));
    bus_holds_the_log_in_order_each_event_once(bus, &events).await
}

#[tokio::test]
async fn nats_bus_holds_the_log_in_order_each_event_once() -> TestResult {
    let (_store, events) = log_of(10).await?;
    let bus = Arc::new(support::nats_bus().await?);
    let result = bus_holds_the_log_in_order_each_event_once(bus.clone(), &events).await;
    bus.delete_stream().await?;
    result
}

#[tokio::test]
async fn nats_refuses_a_republish_even_after_the_dedup_window() -> TestResult {
    // Expected-last-sequence, not only the Nats-Msg-Id window, keeps a stale
    // publisher from duplicating: a fresh event id at an old position is refused.
    let (_store, events) = log_of(3).await?;
    let bus = support::nats_bus().await?;
    bus.publish(&events).await?;
    let mut forged = events[1].clone();
    forged.event_id = privcomm_domain::EventId(uuid::Uuid::now_v7());
    let outcome = bus.publish(&[forged]).await;
    let last = bus.last_published().await?;
    bus.delete_stream().await?;
    assert_eq!(outcome?, Position(3));
    assert_eq!(last, Position(3));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_models_consumer_retires_the_per_model_consumers_of_earlier_versions() -> TestResult {
    use async_nats::jetstream::consumer;
    use futures::TryStreamExt as _;
    use privcomm_projections::worker::{ALL_MODELS_CONSUMER, Feed as _};
    let bus = Arc::new(support::nats_bus().await?);
    let stream = bus.jetstream().get_stream(&bus.config().stream_name).await?;
    // What a node of an earlier version left behind, and someone else's consumer.
    for name in ["privcomm-projection-mailbox", "privcomm-projection-key-directory", "audit-tool"] {
        let config = consumer::pull::Config { durable_name: Some(name.into()), ..Default::default() };
        stream.create_consumer(config).await?;
    }
    let feed = privcomm::bus::nats::NatsFeed::new(bus.clone());
    let result = async {
        let _events = feed.open(ALL_MODELS_CONSUMER, Position::START).await?;
        let mut names: Vec<String> = stream.consumer_names().try_collect().await?;
        names.sort();
        assert_eq!(names, ["audit-tool", "privcomm-projection-all"]);
        // A worker of one model keeps the others' consumers (it is not the one that replaced them).
        let _one = feed.open("privcomm-projection-mailbox", Position::START).await?;
        let names: Vec<String> = stream.consumer_names().try_collect().await?;
        assert_eq!(names.len(), 3, "{names:?}");
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    bus.delete_stream().await?;
    result
}
