//! The outbox publisher against real stores and buses: every event reaches
//! the bus exactly once, in position order, across stops, restarts, crashes
//! between publish and checkpoint, and racing publishers.

mod support;

use futures::StreamExt as _;
use privcomm::clock::SystemClock;
use privcomm::eventstore::LogStore;
use privcomm::outbox::{CHECKPOINT, OutboxPublisher, Step};
use privcomm_domain::{EventBus, Position};
use std::sync::Arc;
use std::time::Duration;
use support::{TestResult, append, at, event};

const TOTAL: u64 = 10_000;
const WRITERS: u64 = 4;
const PER_APPEND: u64 = 25;
/// Events the test appends itself just before the simulated crash, so that
/// the crashed step always has something to publish; the writers add the rest.
const CRASH_EVENTS: u64 = 100;

/// Appends TOTAL − CRASH_EVENTS events from WRITERS concurrent writers, PER_APPEND per append.
fn spawn_writers(store: Arc<dyn LogStore>) -> tokio::task::JoinHandle<TestResult> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let stream = format!("writer-{writer}");
                let appends = (TOTAL - CRASH_EVENTS) / WRITERS / PER_APPEND;
                for n in 0..appends {
                    let events = (0..PER_APPEND).map(|i| event(&format!("{writer}-{n}-{i}"), 300)).collect();
                    store.append(append(&stream, at(n * PER_APPEND), events)).await?;
                    if n % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                Ok::<_, privcomm_domain::StoreError>(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(())
    })
}

/// Starts a publisher; returns a stop switch and its task.
fn start(
    store: &Arc<dyn LogStore>,
    bus: &Arc<dyn EventBus>,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let publisher = OutboxPublisher::new(store.clone(), bus.clone()).with_batch(250);
    let task = tokio::spawn(publisher.run(async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

async fn wait_until_published(bus: &Arc<dyn EventBus>, at_least: u64) -> TestResult {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while bus.last_published().await?.0 < at_least {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the bus did not reach {at_least} events in 120 s").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn every_event_reaches_the_bus_once_in_order(store: Arc<dyn LogStore>, bus: Arc<dyn EventBus>) -> TestResult {
    let writers = spawn_writers(store.clone());

    // Run 1, then a graceful stop.
    let (stop, task) = start(&store, &bus);
    wait_until_published(&bus, 1_500).await?;
    let _ = stop.send(());
    task.await?;

    // A crash between publish and checkpoint: the page is on the bus, the
    // checkpoint still points before it.
    for n in 0..CRASH_EVENTS / PER_APPEND {
        let events = (0..PER_APPEND).map(|i| event(&format!("crash-{n}-{i}"), 300)).collect();
        store.append(append("crash-probe", at(n * PER_APPEND), events)).await?;
    }
    let checkpoint = store.load_checkpoint(CHECKPOINT).await?;
    let crashed = OutboxPublisher::new(store.clone(), bus.clone()).with_batch(300);
    match crashed.step(checkpoint).await? {
        Step::Published(last) => assert!(last > checkpoint),
        other => return Err(format!("expected a publish after the checkpoint, got {other:?}").into()),
    }
    assert!(store.load_checkpoint(CHECKPOINT).await? < bus.last_published().await?);

    // Run 2 with a rival publisher racing it (two nodes), then a hard kill.
    let (stop, task) = start(&store, &bus);
    let (rival_stop, rival) = start(&store, &bus);
    wait_until_published(&bus, 5_000).await?;
    task.abort();
    let _ = task.await;
    let _ = stop;
    let _ = rival_stop.send(());
    rival.await?;

    // Run 3 until everything is out.
    let (stop, task) = start(&store, &bus);
    writers.await?.map_err(|e| e.to_string())?;
    wait_until_published(&bus, TOTAL).await?;
    tokio::time::sleep(Duration::from_millis(200)).await; // anything extra would show up now
    let _ = stop.send(());
    task.await?;

    assert_eq!(bus.last_published().await?, Position(TOTAL));
    let log = store.read_all(Position::START, TOTAL as usize + 1).await?;
    let mut subscription = bus.subscribe(Position::START).await?;
    for expected in &log {
        let published = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await?
            .ok_or("the bus stream ended early")??;
        assert_eq!(published.position, expected.position, "bus order must be position order");
        assert_eq!(published.event_id, expected.event_id);
        assert_eq!(published.hash, expected.hash);
    }
    let extra = tokio::time::timeout(Duration::from_millis(300), subscription.next()).await;
    assert!(extra.is_err(), "the bus holds more than {TOTAL} events");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_to_nats_jetstream_exactly_once_in_order() -> TestResult {
    let (store, db) = support::postgres_store(Arc::new(SystemClock)).await?;
    let bus = Arc::new(support::nats_bus().await?);
    let result = every_event_reaches_the_bus_once_in_order(Arc::new(store), bus.clone()).await;
    if result.is_ok() {
        // Count what JetStream itself stored, independent of our client code.
        let mut stream = bus.jetstream().get_stream(&bus.config().stream_name).await?;
        let info = stream.info().await?;
        assert_eq!((info.state.messages, info.state.last_sequence), (TOTAL, TOTAL));
    }
    bus.delete_stream().await?;
    db.drop_database().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_to_in_process_bus_exactly_once_in_order() -> TestResult {
    let (store, _dir) = support::sqlite_store(Arc::new(SystemClock)).await?;
    let store: Arc<dyn LogStore> = Arc::new(store);
    let bus = Arc::new(privcomm::bus::inprocess::InProcessBus::new(store.clone()));
    every_event_reaches_the_bus_once_in_order(store, bus).await
}

/// Publishes `events` events, then swaps the bus for `emptied()` (one that
/// lost them all) and restarts the publisher with no new commit: the bus
/// must be refilled anyway, or every subscriber waits for the next commit.
async fn a_bus_that_lost_its_events_is_refilled_without_a_new_commit<F, Fut>(
    store: Arc<dyn LogStore>,
    bus: Arc<dyn EventBus>,
    emptied: F,
) -> TestResult
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Arc<dyn EventBus>, Box<dyn std::error::Error + Send + Sync>>>,
{
    const EVENTS: u64 = 1_000;
    for n in 0..EVENTS / PER_APPEND {
        let events = (0..PER_APPEND).map(|i| event(&format!("lost-{n}-{i}"), 100)).collect();
        store.append(append("lost", at(n * PER_APPEND), events)).await?;
    }
    let (stop, task) = start(&store, &bus);
    wait_until_published(&bus, EVENTS).await?;
    // The checkpoint is saved just after the publish: wait for it too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.load_checkpoint(CHECKPOINT).await? < Position(EVENTS) {
        assert!(tokio::time::Instant::now() < deadline, "the outbox checkpoint never reached {EVENTS}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop.send(());
    task.await?;

    let bus = emptied().await?;
    assert_eq!(bus.last_published().await?, Position::START);
    let (stop, task) = start(&store, &bus);
    wait_until_published(&bus, EVENTS).await?;
    let _ = stop.send(());
    task.await?;
    assert_eq!(bus.last_published().await?, Position(EVENTS));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_in_process_bus_is_refilled_without_a_new_commit() -> TestResult {
    let (store, _dir) = support::sqlite_store(Arc::new(SystemClock)).await?;
    let store: Arc<dyn LogStore> = Arc::new(store);
    let bus = Arc::new(privcomm::bus::inprocess::InProcessBus::new(store.clone()));
    // A process restart: the new in-process bus starts with nothing published.
    let restarted = store.clone();
    a_bus_that_lost_its_events_is_refilled_without_a_new_commit(store, bus, || async move {
        Ok(Arc::new(privcomm::bus::inprocess::InProcessBus::new(restarted)) as Arc<dyn EventBus>)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_jetstream_stream_is_refilled_without_a_new_commit() -> TestResult {
    let (store, db) = support::postgres_store(Arc::new(SystemClock)).await?;
    let bus = Arc::new(support::nats_bus().await?);
    let config = bus.config().clone();
    let cleanup = config.clone();
    let first = bus.clone();
    // An operator deleted the stream; the node reconnects and recreates it empty.
    let result = a_bus_that_lost_its_events_is_refilled_without_a_new_commit(Arc::new(store), bus, || async move {
        first.delete_stream().await?;
        let recreated = privcomm::bus::nats::NatsBus::connect(&support::nats_url(), config).await?;
        Ok(Arc::new(recreated) as Arc<dyn EventBus>)
    })
    .await;
    if let Ok(bus) = privcomm::bus::nats::NatsBus::connect(&support::nats_url(), cleanup).await {
        let _ = bus.delete_stream().await;
    }
    db.drop_database().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_embedded_node_serves_what_its_outbox_published_before() -> TestResult {
    let (store, _dir) = support::sqlite_store(Arc::new(SystemClock)).await?;
    let store: Arc<dyn LogStore> = Arc::new(store);
    let events = (0..PER_APPEND).map(|i| event(&format!("before-{i}"), 100)).collect();
    store.append(append("before", at(0), events)).await?;
    store.save_checkpoint(CHECKPOINT, Position(PER_APPEND)).await?;
    // What `privcomm serve` opens on restart: nothing to republish.
    let links = privcomm::serve::Links::embedded(store.clone(), Default::default()).await?;
    assert_eq!(links.bus.last_published().await?, Position(PER_APPEND));
    let mut subscription = links.bus.subscribe(Position::START).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), subscription.next()).await?.ok_or("ended")??;
    assert_eq!(first.position, Position(1));
    Ok(())
}
