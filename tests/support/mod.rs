//! Shared helpers for the integration tests: real PostgreSQL, real NATS,
//! fresh databases and streams per test. A missing service fails the test
//! with a message that says how to start it.
#![allow(dead_code, unused_macros)]

/// Runs each named `async fn(Mode) -> TestResult` twice: embedded (SQLite +
/// in-process bus) and cluster (PostgreSQL + NATS). The calling file must
/// have `Mode` and `TestResult` in scope.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod embedded { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() -> super::TestResult { super::$name(super::Mode::Embedded).await }
        )* }
        mod cluster { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() -> super::TestResult { super::$name(super::Mode::Cluster).await }
        )* }
    };
}

use privcomm::eventstore::postgres::{PoolSize, PostgresEventStore};
use privcomm::eventstore::sqlite::SqliteEventStore;
use privcomm_domain::{AppendRequest, Clock, EventId, ExpectedVersion, NewEvent, StreamId, StreamVersion};
use std::sync::Arc;
use uuid::Uuid;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The server the tests create their databases on (`PRIVCOMM_TEST_POSTGRES_URL`).
pub fn postgres_admin_url() -> String {
    std::env::var("PRIVCOMM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://privcomm:privcomm@127.0.0.1:5432/postgres".to_owned())
}

/// The NATS server with JetStream (`PRIVCOMM_TEST_NATS_URL`).
pub fn nats_url() -> String {
    std::env::var("PRIVCOMM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

const HOW_TO_START: &str = "run `scripts/test` (it installs and starts PostgreSQL and NATS on loopback), or start them yourself: \
`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` and \
`nats-server -a 127.0.0.1 -p 4222 -js &`; point PRIVCOMM_TEST_POSTGRES_URL / PRIVCOMM_TEST_NATS_URL elsewhere if needed";

/// A database created for one test, dropped by [`TestDatabase::drop_database`]
/// (leftovers from failed runs are dropped by `scripts/test`).
pub struct TestDatabase {
    pub url: String,
    pub name: String,
}

impl TestDatabase {
    /// Creates an empty database `pc_test_<random>`.
    pub async fn create() -> Result<TestDatabase, String> {
        let admin = postgres_admin_url();
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .map_err(|e| format!("PostgreSQL is not reachable at {admin}: {e}. To start it, {HOW_TO_START}"))?;
        let name = format!("pc_test_{}", Uuid::now_v7().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .map_err(|e| format!("cannot create a test database on {admin} (the role needs CREATEDB): {e}"))?;
        pool.close().await;
        let base = admin.rsplit_once('/').map(|(base, _)| base).unwrap_or(&admin);
        Ok(TestDatabase { url: format!("{base}/{name}"), name })
    }

    /// Creates and migrates a database.
    pub async fn migrated() -> Result<TestDatabase, String> {
        let db = TestDatabase::create().await?;
        privcomm::migrate::migrate_up(&db.url).await.map_err(|e| format!("{e:#}"))?;
        Ok(db)
    }

    /// Drops the database, closing any connection still open to it.
    pub async fn drop_database(self) {
        if let Ok(pool) = sqlx::PgPool::connect(&postgres_admin_url()).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
                .execute(&pool)
                .await;
        }
    }
}

/// A store on a fresh migrated PostgreSQL database.
pub async fn postgres_store(clock: Arc<dyn Clock>) -> Result<(PostgresEventStore, TestDatabase), String> {
    let db = TestDatabase::migrated().await?;
    let pool = privcomm::eventstore::postgres::connect_pool(&db.url, PoolSize { min: 1, max: 10 })
        .await
        .map_err(|e| e.to_string())?;
    let store = PostgresEventStore::open(pool, clock).await.map_err(|e| e.to_string())?;
    Ok((store, db))
}

/// A store on a fresh migrated SQLite file in a temporary directory (kept
/// alive by the returned guard).
pub async fn sqlite_store(clock: Arc<dyn Clock>) -> Result<(SqliteEventStore, TempDir), String> {
    let dir = TempDir::new();
    let url = format!("sqlite:{}", dir.path.join("events.db").display());
    privcomm::migrate::migrate_up(&url).await.map_err(|e| format!("{e:#}"))?;
    let (readers, writer) = privcomm::eventstore::sqlite::connect_pools(&url).await.map_err(|e| e.to_string())?;
    let store = SqliteEventStore::open(readers, writer, clock).await.map_err(|e| e.to_string())?;
    Ok((store, dir))
}

/// A directory removed when dropped.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!("privcomm-test-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A test event of about `size` payload bytes.
pub fn event(label: &str, size: usize) -> NewEvent {
    let mut payload = format!("{{\"label\":\"{label}\",\"pad\":\"").into_bytes();
    payload.resize(size.saturating_sub(2).max(payload.len()), b'x');
    payload.extend_from_slice(b"\"}");
    NewEvent { event_id: EventId(Uuid::now_v7()), event_type: "TestEventHappened".into(), schema_version: 1, payload }
}

/// An append of `events` to `stream` at `expected`.
pub fn append(stream: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest { stream_id: StreamId::new(stream).expect("valid stream id"), expected, events }
}

/// `ExpectedVersion` for a stream that holds `n` events.
pub fn at(n: u64) -> ExpectedVersion {
    if n == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(StreamVersion(n)) }
}

/// A JetStream bus on a stream of its own (`PC_TEST_<random>`), so tests
/// sharing one NATS server never see each other's events.
pub async fn nats_bus() -> Result<privcomm::bus::nats::NatsBus, String> {
    let id = Uuid::now_v7().simple().to_string();
    let config = privcomm::bus::nats::NatsBusConfig {
        stream_name: format!("PC_TEST_{id}"),
        subject_prefix: format!("pctest.{id}"),
    };
    let url = nats_url();
    privcomm::bus::nats::NatsBus::connect(&url, config)
        .await
        .map_err(|e| format!("NATS JetStream is not reachable at {url}: {e:?}. To start it, {HOW_TO_START}"))
}
pub mod api;
pub mod client;
pub mod node;
pub mod turn;
pub mod ws;
