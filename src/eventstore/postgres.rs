//! The event store on PostgreSQL (cluster mode).
//!
//! Ordering (ADR 0001): every append transaction first locks the single row of
//! `event_log_head` with `SELECT … FOR UPDATE` (inside `privcomm_lock_head`,
//! which also reads the streams' versions after the lock is held, in the same
//! round trip — migration 0003). Positions are assigned from
//! that row, so they are gap-free, and since the lock is held until commit,
//! transactions commit in position order: a reader that has seen position P
//! can never later find a position below P appear. Within one process the
//! group committer makes that lock cheap by writing many appends per
//! transaction; across processes the lock serialises the writers.
//!
//! New events are announced with `NOTIFY privcomm_events, '<head>'` inside the
//! transaction (delivered on commit), so waiting readers wake without polling.

use super::group_commit::{BatchWriter, GroupCommitter, advance};
use super::{StoredRow, sql_error};
use async_trait::async_trait;
use privcomm_domain::store::{BatchPlan, ChainHead, plan_batch};
use privcomm_domain::{
    AppendOutcome, AppendRequest, CheckpointStore, Clock, EventStore, Hash, Position, RecordedEvent, StoreError,
    StreamId, StreamVersion, Timestamp,
};
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::{Row, postgres::PgPoolOptions};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// The NOTIFY channel that announces new heads.
pub const NOTIFY_CHANNEL: &str = "privcomm_events";

/// Pool sizes (`DB_POOL_MIN_SIZE`, `DB_POOL_MAX_SIZE`).
#[derive(Clone, Copy, Debug)]
pub struct PoolSize {
    /// Connections kept open.
    pub min: u32,
    /// Connections at most.
    pub max: u32,
}

impl Default for PoolSize {
    fn default() -> Self {
        PoolSize { min: 5, max: 20 }
    }
}

/// PostgreSQL-backed [`EventStore`].
pub struct PostgresEventStore {
    pool: PgPool,
    committer: GroupCommitter,
    head: watch::Sender<Position>,
    clock: Arc<dyn Clock>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresEventStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Pool options for every PostgreSQL pool: each new connection gets
/// `TCP_NODELAY` (see [`crate::sockets`]).
pub fn pool_options() -> PgPoolOptions {
    PgPoolOptions::new().after_connect(|_connection, _metadata| {
        Box::pin(async {
            crate::sockets::disable_nagle();
            Ok(())
        })
    })
}

/// Connects a pool to `url`.
pub async fn connect_pool(url: &str, size: PoolSize) -> Result<PgPool, StoreError> {
    pool_options()
        .min_connections(size.min)
        .max_connections(size.max)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(sql_error)
}

impl PostgresEventStore {
    /// Opens the store on a migrated database.
    pub async fn open(pool: PgPool, clock: Arc<dyn Clock>) -> Result<PostgresEventStore, StoreError> {
        let initial = read_head(&pool).await?;
        let head = watch::channel(initial).0;
        // Subscribe before anyone can append, so no notification is missed.
        let mut listener = PgListener::connect_with(&pool).await.map_err(sql_error)?;
        listener.listen(NOTIFY_CHANNEL).await.map_err(sql_error)?;
        let listener = tokio::spawn(listen_for_heads(listener, pool.clone(), head.clone()));
        // The writer gets one connection of its own, made on its thread.
        let options = (*pool.connect_options()).clone();
        let make = move || PostgresBatchWriter {
            pool: pool_options().max_connections(1).acquire_timeout(Duration::from_secs(5)).connect_lazy_with(options),
        };
        let committer = GroupCommitter::spawn_on_own_thread(make, clock.clone(), head.clone());
        Ok(PostgresEventStore { pool, committer, head, clock, listener })
    }

    /// The pool, for components that keep their tables beside the log.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

async fn read_head(pool: &PgPool) -> Result<Position, StoreError> {
    let position: i64 =
        sqlx::query_scalar("SELECT position FROM event_log_head").fetch_one(pool).await.map_err(sql_error)?;
    Ok(Position(position as u64))
}

/// Keeps `head` current from NOTIFY; after a lost connection (when
/// notifications may have been missed) it re-reads the head from the table.
async fn listen_for_heads(mut listener: PgListener, pool: PgPool, head: watch::Sender<Position>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => match notification.payload().parse::<u64>() {
                Ok(position) => advance(&head, Position(position)),
                Err(_) => tracing::warn!(channel = NOTIFY_CHANNEL, "ignoring a notification that is not a position"),
            },
            Ok(None) => {
                tracing::warn!("event notification connection lost; re-reading the head");
                if let Ok(position) = read_head(&pool).await {
                    advance(&head, position);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "event notification listener failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(position) = read_head(&pool).await {
                    advance(&head, position);
                }
            }
        }
    }
}

struct PostgresBatchWriter {
    pool: PgPool,
}

#[async_trait]
impl BatchWriter for PostgresBatchWriter {
    async fn write_batch(
        &mut self,
        requests: &[AppendRequest],
        recorded_at: Timestamp,
    ) -> Result<BatchPlan, StoreError> {
        let mut tx = self.pool.begin().await.map_err(sql_error)?;
        let mut streams: Vec<&str> = requests.iter().map(|r| r.stream_id.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        // The head lock and the streams' versions in one round trip (migration 0003).
        let rows: Vec<(i64, Vec<u8>, Option<String>, Option<i64>)> =
            sqlx::query_as("SELECT head_position, head_hash, stream_id, stream_version FROM privcomm_lock_head($1)")
                .bind(&streams)
                .fetch_all(&mut *tx)
                .await
                .map_err(sql_error)?;
        let (position, hash) = rows
            .first()
            .map(|(position, hash, _, _)| (*position, hash.clone()))
            .ok_or_else(|| StoreError::Storage("privcomm_lock_head returned no row".into()))?;
        let head = ChainHead {
            position: Position(position as u64),
            hash: Hash::from_slice(&hash).ok_or_else(|| StoreError::Corrupt {
                position: Position(position as u64),
                reason: "head hash".into(),
            })?,
        };
        let mut versions = HashMap::with_capacity(rows.len());
        for (_, _, stream, version) in rows {
            if let (Some(Ok(stream)), Some(version)) = (stream.map(StreamId::new), version) {
                versions.insert(stream, StreamVersion(version as u64));
            }
        }

        let plan = plan_batch(head, &versions, requests, recorded_at);
        if plan.records.is_empty() {
            tx.rollback().await.map_err(sql_error)?;
            return Ok(plan);
        }
        let columns = Columns::of(&plan.records);
        // One round trip for the rows, the new head and the notification: the
        // head lock is held from the SELECT … FOR UPDATE to the commit, so
        // every round trip here is time no other node can append.
        sqlx::query(
            "WITH inserted AS (
                 INSERT INTO events (position, stream_id, stream_version, event_id, event_type, schema_version,
                                     recorded_at_us, payload, payload_hash, prev_hash, hash)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::text[], $6::int[],
                                      $7::bigint[], $8::bytea[], $9::bytea[], $10::bytea[], $11::bytea[])
             ), head AS (
                 UPDATE event_log_head SET position = $12, hash = $13 WHERE singleton
             )
             SELECT pg_notify($14, $15)",
        )
        .bind(&columns.position)
        .bind(&columns.stream_id)
        .bind(&columns.stream_version)
        .bind(&columns.event_id)
        .bind(&columns.event_type)
        .bind(&columns.schema_version)
        .bind(&columns.recorded_at)
        .bind(&columns.payload)
        .bind(&columns.payload_hash)
        .bind(&columns.prev_hash)
        .bind(&columns.hash)
        .bind(plan.head.position.0 as i64)
        .bind(plan.head.hash.0.as_slice())
        .bind(NOTIFY_CHANNEL)
        .bind(plan.head.position.0.to_string())
        .execute(&mut *tx)
        .await
        .map_err(sql_error)?;
        tx.commit().await.map_err(sql_error)?;
        Ok(plan)
    }
}

/// A batch of records as column arrays, for one `INSERT … SELECT unnest(…)`.
struct Columns<'a> {
    position: Vec<i64>,
    stream_id: Vec<&'a str>,
    stream_version: Vec<i64>,
    event_id: Vec<Uuid>,
    event_type: Vec<&'a str>,
    schema_version: Vec<i32>,
    recorded_at: Vec<i64>,
    payload: Vec<Option<&'a [u8]>>,
    payload_hash: Vec<&'a [u8]>,
    prev_hash: Vec<&'a [u8]>,
    hash: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn of(records: &'a [RecordedEvent]) -> Columns<'a> {
        Columns {
            position: records.iter().map(|r| r.position.0 as i64).collect(),
            stream_id: records.iter().map(|r| r.stream_id.as_str()).collect(),
            stream_version: records.iter().map(|r| r.stream_version.0 as i64).collect(),
            event_id: records.iter().map(|r| r.event_id.0).collect(),
            event_type: records.iter().map(|r| r.event_type.as_str()).collect(),
            schema_version: records.iter().map(|r| i32::from(r.schema_version)).collect(),
            recorded_at: records.iter().map(|r| r.recorded_at.0).collect(),
            payload: records.iter().map(|r| r.payload.as_deref()).collect(),
            payload_hash: records.iter().map(|r| r.payload_hash.0.as_slice()).collect(),
            prev_hash: records.iter().map(|r| r.prev_hash.0.as_slice()).collect(),
            hash: records.iter().map(|r| r.hash.0.as_slice()).collect(),
        }
    }
}

fn decode(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let stored = StoredRow {
        position: row.try_get(0).map_err(sql_error)?,
        stream_id: row.try_get(1).map_err(sql_error)?,
        stream_version: row.try_get(2).map_err(sql_error)?,
        event_id: row.try_get(3).map_err(sql_error)?,
        event_type: row.try_get(4).map_err(sql_error)?,
        schema_version: row.try_get(5).map_err(sql_error)?,
        recorded_at_us: row.try_get(6).map_err(sql_error)?,
        payload: row.try_get(7).map_err(sql_error)?,
        payload_hash: row.try_get(8).map_err(sql_error)?,
        prev_hash: row.try_get(9).map_err(sql_error)?,
        hash: row.try_get(10).map_err(sql_error)?,
    };
    stored.into_recorded()
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.committer.append(request).await
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        after: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        const SQL: &str =
            select_events!("WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version LIMIT $3");
        let rows = sqlx::query(SQL)
            .bind(stream_id.as_str())
            .bind(after.0 as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(sql_error)?;
        rows.iter().map(decode).collect()
    }

    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        const SQL: &str = select_events!("WHERE position > $1 ORDER BY position LIMIT $2");
        let rows =
            sqlx::query(SQL).bind(after.0 as i64).bind(limit as i64).fetch_all(&self.pool).await.map_err(sql_error)?;
        rows.iter().map(decode).collect()
    }

    async fn head(&self) -> Result<Position, StoreError> {
        read_head(&self.pool).await
    }

    async fn wait_for_events_after(&self, after: Position) -> Result<Position, StoreError> {
        let mut watcher = self.head.subscribe();
        if *watcher.borrow() <= after {
            // The watch may lag a notification lost with a connection; one
            // read settles it before we sleep.
            let stored = read_head(&self.pool).await?;
            advance(&self.head, stored);
        }
        let seen = watcher.wait_for(|head| *head > after).await.map_err(|_| StoreError::Closed)?;
        Ok(*seen)
    }

    async fn drop_payload(&self, position: Position) -> Result<(), StoreError> {
        let updated = sqlx::query("UPDATE events SET payload = NULL WHERE position = $1")
            .bind(position.0 as i64)
            .execute(&self.pool)
            .await
            .map_err(sql_error)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NotFound(position));
        }
        Ok(())
    }

    async fn drop_payloads(&self, positions: &[Position]) -> Result<u64, StoreError> {
        let positions: Vec<i64> = positions.iter().map(|p| p.0 as i64).collect();
        let updated = sqlx::query("UPDATE events SET payload = NULL WHERE position = ANY($1) AND payload IS NOT NULL")
            .bind(&positions)
            .execute(&self.pool)
            .await
            .map_err(sql_error)?;
        Ok(updated.rows_affected())
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(sql_error)?;
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for PostgresEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError> {
        let position: Option<i64> = sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(sql_error)?;
        Ok(Position(position.unwrap_or(0) as u64))
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkpoints (name, position, updated_at_us) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at_us = excluded.updated_at_us",
        )
        .bind(name)
        .bind(position.0 as i64)
        .bind(self.clock.now().0)
        .execute(&self.pool)
        .await
        .map_err(sql_error)?;
        Ok(())
    }
}

#[async_trait]
impl privcomm_domain::nonces::NonceLedger for PostgresEventStore {
    async fn consume(&self, nonce_id: [u8; 32], expires_at: Timestamp, now: Timestamp) -> Result<bool, StoreError> {
        // Expired rows go in the same round trip as the insert.
        sqlx::query("DELETE FROM used_auth_nonces WHERE expires_at_us < $1")
            .bind(now.0)
            .execute(&self.pool)
            .await
            .map_err(sql_error)?;
        let inserted = sqlx::query(
            "INSERT INTO used_auth_nonces (nonce_hash, expires_at_us) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(nonce_id.as_slice())
        .bind(expires_at.0)
        .execute(&self.pool)
        .await
        .map_err(sql_error)?;
        Ok(inserted.rows_affected() == 1)
    }
}
