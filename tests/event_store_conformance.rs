//! One conformance suite, run against every `EventStore`: in-memory, SQLite
//! and PostgreSQL. Each test gets a fresh store.

mod support;

use privcomm::clock::SystemClock;
use privcomm::eventstore::LogStore;
use privcomm_domain::memory::InMemoryEventStore;
use privcomm_domain::{ChainFault, ExpectedVersion, Position, StoreError, StreamId, StreamVersion};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use support::{TempDir, TestDatabase, TestResult, append, at, event};

/// A change made behind the store's back, the way an attacker with
/// database access would make it.
enum Tamper {
    /// Flip the first byte of the payload.
    PayloadByte,
    /// Rename the event type (a header field).
    EventType(&'static str),
    /// Move the recorded time (a header field).
    RecordedAt(i64),
}

enum Backdoor {
    Memory(Arc<InMemoryEventStore>),
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

struct Fixture {
    store: Arc<dyn LogStore>,
    backdoor: Backdoor,
    postgres: Option<TestDatabase>,
    _dir: Option<TempDir>,
}

#[derive(Clone, Copy)]
enum Kind {
    Memory,
    Sqlite,
    Postgres,
}

async fn fixture(kind: Kind) -> Result<Fixture, String> {
    let clock = Arc::new(SystemClock);
    Ok(match kind {
        Kind::Memory => {
            let store = Arc::new(InMemoryEventStore::new(clock));
            Fixture { store: store.clone(), backdoor: Backdoor::Memory(store), postgres: None, _dir: None }
        }
        Kind::Sqlite => {
            let (store, dir) = support::sqlite_store(clock).await?;
            let pool = store.pool().clone();
            Fixture { store: Arc::new(store), backdoor: Backdoor::Sqlite(pool), postgres: None, _dir: Some(dir) }
        }
        Kind::Postgres => {
            let (store, db) = support::postgres_store(clock).await?;
            let pool = store.pool().clone();
            Fixture { store: Arc::new(store), backdoor: Backdoor::Postgres(pool), postgres: Some(db), _dir: None }
        }
    })
}

impl Fixture {
    async fn tamper(&self, position: Position, tamper: Tamper) -> TestResult {
        let at = position.0 as i64;
        match (&self.backdoor, tamper) {
            (Backdoor::Memory(store), tamper) => store.tamper(position, |event| match tamper {
                Tamper::PayloadByte => {
                    if let Some(byte) = event.payload.as_mut().and_then(|p| p.first_mut()) {
                        *byte ^= 1;
                    }
                }
                Tamper::EventType(name) => event.event_type = name.to_owned(),
                Tamper::RecordedAt(us) => event.recorded_at = privcomm_domain::Timestamp(us),
            }),
            (Backdoor::Sqlite(pool), Tamper::PayloadByte) => {
                let payload: Vec<u8> = sqlx::query_scalar("SELECT payload FROM events WHERE position = ?")
                    .bind(at)
                    .fetch_one(pool)
                    .await?;
                let flipped: Vec<u8> =
                    payload.iter().enumerate().map(|(i, b)| if i == 0 { b ^ 1 } else { *b }).collect();
                sqlx::query("UPDATE events SET payload = ? WHERE position = ?")
                    .bind(flipped)
                    .bind(at)
                    .execute(pool)
                    .await?;
            }
            (Backdoor::Sqlite(pool), Tamper::EventType(name)) => {
                sqlx::query("UPDATE events SET event_type = ? WHERE position = ?")
                    .bind(name)
                    .bind(at)
                    .execute(pool)
                    .await?;
            }
            (Backdoor::Sqlite(pool), Tamper::RecordedAt(us)) => {
                sqlx::query("UPDATE events SET recorded_at_us = ? WHERE position = ?")
                    .bind(us)
                    .bind(at)
                    .execute(pool)
                    .await?;
            }
            (Backdoor::Postgres(pool), Tamper::PayloadByte) => {
                sqlx::query(
                    "UPDATE events SET payload = set_byte(payload, 0, get_byte(payload, 0) # 1) WHERE position = $1",
                )
                .bind(at)
                .execute(pool)
                .await?;
            }
            (Backdoor::Postgres(pool), Tamper::EventType(name)) => {
                sqlx::query("UPDATE events SET event_type = $1 WHERE position = $2")
                    .bind(name)
                    .bind(at)
                    .execute(pool)
                    .await?;
            }
            (Backdoor::Postgres(pool), Tamper::RecordedAt(us)) => {
                sqlx::query("UPDATE events SET recorded_at_us = $1 WHERE position = $2")
                    .bind(us)
                    .bind(at)
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Distinct commit timestamps in the log: one per transaction on the SQL
    /// stores, whose group committer stamps a whole batch at once.
    async fn distinct_commit_times(&self) -> Result<Option<i64>, sqlx::Error> {
        Ok(match &self.backdoor {
            Backdoor::Memory(_) => None,
            Backdoor::Sqlite(pool) => {
                Some(sqlx::query_scalar("SELECT count(DISTINCT recorded_at_us) FROM events").fetch_one(pool).await?)
            }
            Backdoor::Postgres(pool) => {
                Some(sqlx::query_scalar("SELECT count(DISTINCT recorded_at_us) FROM events").fetch_one(pool).await?)
            }
        })
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() -> super::TestResult { super::run(super::Kind::Memory, super::$name).await }
        )* }
        mod sqlite { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() -> super::TestResult { super::run(super::Kind::Sqlite, super::$name).await }
        )* }
        mod postgres { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() -> super::TestResult { super::run(super::Kind::Postgres, super::$name).await }
        )* }
    };
}

async fn run<F, Fut>(kind: Kind, test: F) -> TestResult
where
    F: FnOnce(Arc<Fixture>) -> Fut,
    Fut: std::future::Future<Output = TestResult>,
{
    let fixture = Arc::new(fixture(kind).await?);
    let result = test(fixture.clone()).await;
    if let Ok(mut fixture) = Arc::try_unwrap(fixture)
        && let Some(db) = fixture.postgres.take()
    {
        drop(fixture);
        db.drop_database().await;
    }
    result
}

conformance!(
    appends_and_reads_back_streams_and_the_log,
    a_stale_expected_version_conflicts_and_writes_nothing,
    concurrent_writers_at_one_version_exactly_one_wins,
    a_tailing_reader_sees_every_position_once_in_order,
    a_tampered_header_or_payload_is_reported_at_its_position,
    compaction_drops_payloads_and_the_chain_still_verifies,
    a_waiting_reader_wakes_on_append,
    a_reused_event_id_is_refused_without_harming_others,
    checkpoints_persist,
    a_nonce_is_consumed_once_and_forgotten_after_expiry,
);

async fn appends_and_reads_back_streams_and_the_log(f: Arc<Fixture>) -> TestResult {
    let store = &f.store;
    let first =
        store.append(append("user-a", ExpectedVersion::NoStream, vec![event("a1", 300), event("a2", 300)])).await?;
    assert_eq!(
        (first.first_position, first.last_position, first.stream_version),
        (Position(1), Position(2), StreamVersion(2))
    );
    let second = store.append(append("user-b", ExpectedVersion::Any, vec![event("b1", 300)])).await?;
    assert_eq!(second.first_position, Position(3));
    store.append(append("user-a", at(2), vec![event("a3", 300)])).await?;

    let a = store.read_stream(&StreamId::new("user-a")?, StreamVersion(0), 100).await?;
    assert_eq!(a.iter().map(|e| (e.stream_version.0, e.position.0)).collect::<Vec<_>>(), vec![(1, 1), (2, 2), (3, 4)]);
    let a_tail = store.read_stream(&StreamId::new("user-a")?, StreamVersion(1), 1).await?;
    assert_eq!(a_tail.iter().map(|e| e.stream_version.0).collect::<Vec<_>>(), vec![2]);

    let page = store.read_all(Position(1), 2).await?;
    assert_eq!(page.iter().map(|e| e.position.0).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(store.head().await?, Position(4));
    assert!(store.read_all(Position(4), 10).await?.is_empty());
    assert_eq!(page[0].payload.as_deref(), Some(event_payload_of(&a[1]).as_slice()));
    let report = store.verify(Position(1), None).await?;
    assert_eq!((report.checked, report.first_break), (4, None));
    Ok(())
}

fn event_payload_of(e: &privcomm_domain::RecordedEvent) -> Vec<u8> {
    e.payload.clone().unwrap_or_default()
}

async fn a_stale_expected_version_conflicts_and_writes_nothing(f: Arc<Fixture>) -> TestResult {
    let store = &f.store;
    store.append(append("s", ExpectedVersion::NoStream, vec![event("1", 100)])).await?;
    let stale = store.append(append("s", ExpectedVersion::NoStream, vec![event("x", 100), event("y", 100)])).await;
    assert!(
        matches!(&stale, Err(StoreError::Conflict { actual: StreamVersion(1), .. })),
        "expected a conflict at version 1, got {stale:?}"
    );
    let wrong = store.append(append("s", at(5), vec![event("z", 100)])).await;
    assert!(matches!(wrong, Err(StoreError::Conflict { .. })));
    assert_eq!(store.head().await?, Position(1), "a refused append must write nothing");
    assert_eq!(store.read_all(Position(0), 10).await?.len(), 1);
    let empty = store.append(append("s", at(1), vec![])).await;
    assert!(matches!(empty, Err(StoreError::InvalidAppend(_))));
    Ok(())
}

async fn concurrent_writers_at_one_version_exactly_one_wins(f: Arc<Fixture>) -> TestResult {
    const WRITERS: usize = 8;
    const VERSIONS: u64 = 25;
    for version in 0..VERSIONS {
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let store = f.store.clone();
            tasks.push(tokio::spawn(async move {
                store.append(append("contended", at(version), vec![event(&format!("w{writer}"), 200)])).await
            }));
        }
        let mut won = 0;
        for task in tasks {
            match task.await? {
                Ok(outcome) => {
                    won += 1;
                    assert_eq!(outcome.stream_version, StreamVersion(version + 1));
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(other) => return Err(format!("unexpected error {other:?}").into()),
            }
        }
        assert_eq!(won, 1, "exactly one writer must win version {version}");
    }
    assert_eq!(f.store.head().await?, Position(VERSIONS));
    let stream = f.store.read_stream(&StreamId::new("contended")?, StreamVersion(0), 1000).await?;
    assert_eq!(stream.len() as u64, VERSIONS);
    Ok(())
}

async fn a_tailing_reader_sees_every_position_once_in_order(f: Arc<Fixture>) -> TestResult {
    const APPENDERS: u64 = 8;
    const EACH: u64 = 500;
    const TOTAL: u64 = APPENDERS * EACH;
    let reader = {
        let store = f.store.clone();
        tokio::spawn(async move {
            let mut seen = Vec::with_capacity(TOTAL as usize);
            let mut after = Position::START;
            while after.0 < TOTAL {
                let page = store.read_all(after, 97).await?;
                match page.last() {
                    Some(last) => {
                        after = last.position;
                        seen.extend(page.iter().map(|e| e.position.0));
                    }
                    None => {
                        tokio::time::timeout(Duration::from_secs(30), store.wait_for_events_after(after)).await??;
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(seen)
        })
    };
    let mut writers = Vec::new();
    for appender in 0..APPENDERS {
        let store = f.store.clone();
        writers.push(tokio::spawn(async move {
            let stream = format!("appender-{appender}");
            for n in 0..EACH {
                store.append(append(&stream, at(n), vec![event(&format!("{appender}-{n}"), 300)])).await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for writer in writers {
        writer.await??;
    }
    let seen = reader.await?.map_err(|e| e.to_string())?;
    let expected: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(seen.len(), expected.len(), "the reader saw {} positions, not {TOTAL}", seen.len());
    assert!(seen == expected, "positions were not 1..={TOTAL} in order, each once");
    assert_eq!(f.store.verify(Position(1), None).await?.first_break, None);
    if let Some(commits) = f.distinct_commit_times().await? {
        // 4,000 appends from 8 concurrent writers: the group committer must
        // have written several per transaction.
        assert!(commits < TOTAL as i64, "expected group commits, got {commits} transactions for {TOTAL} appends");
        eprintln!("group commit: {TOTAL} appends in {commits} transactions");
    }
    Ok(())
}

async fn a_tampered_header_or_payload_is_reported_at_its_position(f: Arc<Fixture>) -> TestResult {
    for n in 0..12 {
        f.store.append(append("t", at(n), vec![event(&n.to_string(), 300)])).await?;
    }
    assert_eq!(f.store.verify(Position(1), None).await?.first_break, None);

    f.tamper(Position(9), Tamper::RecordedAt(42)).await?;
    let report = f.store.verify(Position(1), None).await?;
    let broken = report.first_break.ok_or("a changed recorded_at went unnoticed")?;
    assert_eq!((broken.position, broken.fault, report.checked), (Position(9), ChainFault::HashMismatch, 8));

    f.tamper(Position(6), Tamper::EventType("TestEventHapPened")).await?;
    let broken = f.store.verify(Position(1), None).await?.first_break.ok_or("a changed event type went unnoticed")?;
    assert_eq!((broken.position, broken.fault), (Position(6), ChainFault::HashMismatch));

    f.tamper(Position(3), Tamper::PayloadByte).await?;
    let broken = f.store.verify(Position(1), None).await?.first_break.ok_or("a flipped payload bit went unnoticed")?;
    assert_eq!((broken.position, broken.fault), (Position(3), ChainFault::PayloadHashMismatch));

    // A range that starts after the damage still anchors on the stored hash
    // before it, and finds the later fault.
    let broken = f.store.verify(Position(7), None).await?.first_break.ok_or("range verify missed position 9")?;
    assert_eq!(broken.position, Position(9));
    let clean = f.store.verify(Position(10), Some(Position(12))).await?;
    assert_eq!((clean.checked, clean.first_break), (3, None));
    Ok(())
}

async fn compaction_drops_payloads_and_the_chain_still_verifies(f: Arc<Fixture>) -> TestResult {
    for n in 0..5 {
        f.store.append(append("c", at(n), vec![event(&n.to_string(), 300)])).await?;
    }
    let before = f.store.read_all(Position(0), 10).await?;
    f.store.drop_payload(Position(2)).await?;
    f.store.drop_payload(Position(4)).await?;
    f.store.drop_payload(Position(4)).await?; // again: a no-op
    let after = f.store.read_all(Position(0), 10).await?;
    assert_eq!(after[1].payload, None);
    assert_eq!(after[3].payload, None);
    assert_eq!(after[1].payload_hash, before[1].payload_hash);
    assert_eq!(after[0].payload, before[0].payload);
    let report = f.store.verify(Position(1), None).await?;
    assert_eq!((report.checked, report.first_break), (5, None));
    assert!(matches!(f.store.drop_payload(Position(99)).await, Err(StoreError::NotFound(Position(99)))));
    // Many at once: only payloads still there count; unknown positions are skipped.
    let dropped = f.store.drop_payloads(&[Position(1), Position(2), Position(5), Position(99)]).await?;
    assert_eq!(dropped, 2, "positions 1 and 5 still had payloads");
    let after = f.store.read_all(Position(0), 10).await?;
    assert_eq!(after.iter().filter(|e| e.payload.is_none()).count(), 4);
    assert_eq!(after[2].payload, before[2].payload, "position 3 is untouched");
    let report = f.store.verify(Position(1), None).await?;
    assert_eq!((report.checked, report.first_break), (5, None));
    Ok(())
}

async fn a_waiting_reader_wakes_on_append(f: Arc<Fixture>) -> TestResult {
    f.store.append(append("w", at(0), vec![event("0", 100)])).await?;
    // Already past: returns at once.
    assert_eq!(f.store.wait_for_events_after(Position(0)).await?, Position(1));
    let waiter = {
        let store = f.store.clone();
        tokio::spawn(async move { store.wait_for_events_after(Position(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "nothing new was appended, yet the waiter returned");
    f.store.append(append("w", at(1), vec![event("1", 100)])).await?;
    let head = tokio::time::timeout(Duration::from_secs(5), waiter).await???;
    assert_eq!(head, Position(2));
    Ok(())
}

async fn a_reused_event_id_is_refused_without_harming_others(f: Arc<Fixture>) -> TestResult {
    let original = event("original", 100);
    f.store.append(append("d", at(0), vec![original.clone()])).await?;
    let mut tasks = Vec::new();
    for n in 0..20u64 {
        let store = f.store.clone();
        let reused = original.clone();
        tasks.push(tokio::spawn(async move {
            if n == 7 {
                store.append(append("dup", ExpectedVersion::Any, vec![reused])).await
            } else {
                store.append(append(&format!("ok-{n}"), at(0), vec![event("fresh", 100)])).await
            }
        }));
    }
    let mut ok = HashSet::new();
    for (n, task) in tasks.into_iter().enumerate() {
        match task.await? {
            Ok(outcome) => assert!(ok.insert(outcome.first_position), "position handed out twice"),
            Err(StoreError::DuplicateEventId) if n == 7 => {}
            Err(other) => return Err(format!("append {n} failed: {other:?}").into()),
        }
    }
    assert_eq!(ok.len(), 19);
    assert_eq!(f.store.head().await?, Position(20));
    assert!(f.store.read_stream(&StreamId::new("dup")?, StreamVersion(0), 10).await?.is_empty());
    assert_eq!(f.store.verify(Position(1), None).await?.first_break, None);
    Ok(())
}

async fn checkpoints_persist(f: Arc<Fixture>) -> TestResult {
    assert_eq!(f.store.load_checkpoint("outbox").await?, Position(0));
    f.store.save_checkpoint("outbox", Position(17)).await?;
    f.store.save_checkpoint("other", Position(3)).await?;
    f.store.save_checkpoint("outbox", Position(18)).await?;
    assert_eq!(f.store.load_checkpoint("outbox").await?, Position(18));
    assert_eq!(f.store.load_checkpoint("other").await?, Position(3));
    Ok(())
}

async fn a_nonce_is_consumed_once_and_forgotten_after_expiry(f: Arc<Fixture>) -> TestResult {
    use privcomm_domain::Timestamp;
    let (nonce, other) = ([7u8; 32], [8u8; 32]);
    assert!(f.store.consume(nonce, Timestamp(1_060), Timestamp(1_000)).await?, "first use");
    assert!(!f.store.consume(nonce, Timestamp(1_060), Timestamp(1_001)).await?, "second use must be refused");
    assert!(f.store.consume(other, Timestamp(1_060), Timestamp(1_002)).await?, "another nonce is independent");
    // Once expired, the entry may be dropped; the nonce itself is refused by
    // its own expiry check before the ledger is asked.
    assert!(f.store.consume(nonce, Timestamp(2_060), Timestamp(2_000)).await?);
    Ok(())
}
