//! The event store on SQLite (embedded mode).
//!
//! One writer connection, driven by the group committer, takes every append
//! in a `BEGIN IMMEDIATE` transaction: SQLite's write lock plays the part of
//! PostgreSQL's head-row lock (ADR 0001), so positions are gap-free and in
//! commit order. Readers use a separate pool; in WAL mode they never block
//! the writer. New events are announced in-process through a watch channel —
//! the file is owned by one `privcomm` process.

use super::group_commit::{BatchWriter, GroupCommitter};
use super::{StoredRow, sql_error};
use async_trait::async_trait;
use privcomm_domain::store::{BatchPlan, ChainHead, plan_batch};
use privcomm_domain::{
    AppendOutcome, AppendRequest, CheckpointStore, Clock, EventStore, Hash, Position, RecordedEvent, StoreError,
    StreamId, StreamVersion, Timestamp,
};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// SQLite-backed [`EventStore`].
pub struct SqliteEventStore {
    readers: SqlitePool,
    writer: SqlitePool,
    committer: GroupCommitter,
    head: watch::Sender<Position>,
    clock: Arc<dyn Clock>,
}

/// Connection options for `url` (`sqlite:path`): creates the file, WAL,
/// `synchronous = FULL` (an acknowledged append survives power loss),
/// `secure_delete` (dropped payloads are overwritten, not left in free
/// pages), and a busy timeout instead of immediate `SQLITE_BUSY`.
pub fn connect_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    Ok(SqliteConnectOptions::from_str(url)
        .map_err(sql_error)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        // Retention drops ciphertext: zero the freed bytes instead of leaving them in free pages.
        .pragma("secure_delete", "ON")
        // Rows a connection's worker thread may run ahead of the reader:
        // sqlx's 50 woke the reader every few rows of a page (a replay
        // spent a fifth of its CPU switching threads).
        .row_buffer_size(1_024)
        .busy_timeout(Duration::from_secs(5)))
}

/// The pools for one file: `(readers, writer)`. The writer pool has exactly
/// one connection.
pub async fn connect_pools(url: &str) -> Result<(SqlitePool, SqlitePool), StoreError> {
    let options = connect_options(url)?;
    let writer = SqlitePoolOptions::new()
        .min_connections(1)
        .max_connections(1)
        .connect_with(options.clone())
        .await
        .map_err(sql_error)?;
    let readers = SqlitePoolOptions::new().max_connections(4).connect_with(options).await.map_err(sql_error)?;
    Ok((readers, writer))
}

impl SqliteEventStore {
    /// Opens the store on a migrated database.
    pub async fn open(
        readers: SqlitePool,
        writer: SqlitePool,
        clock: Arc<dyn Clock>,
    ) -> Result<SqliteEventStore, StoreError> {
        let head = watch::channel(read_head(&readers).await?).0;
        let committer = GroupCommitter::spawn(SqliteBatchWriter { pool: writer.clone() }, clock.clone(), head.clone());
        Ok(SqliteEventStore { readers, writer, committer, head, clock })
    }

    /// The reader pool, for components that keep tables beside the log.
    pub fn pool(&self) -> &SqlitePool {
        &self.readers
    }

    /// The single writer connection. Components that write tables beside
    /// the log (the read models) queue for it, rather than contend for
    /// SQLite's write lock from a connection of their own — contention that
    /// SQLite resolves by sleeping.
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }
}

async fn read_head(pool: &SqlitePool) -> Result<Position, StoreError> {
    let position: i64 =
        sqlx::query_scalar("SELECT position FROM event_log_head").fetch_one(pool).await.map_err(sql_error)?;
    Ok(Position(position as u64))
}

struct SqliteBatchWriter {
    pool: SqlitePool,
}

#[async_trait]
impl BatchWriter for SqliteBatchWriter {
    async fn write_batch(
        &mut self,
        requests: &[AppendRequest],
        recorded_at: Timestamp,
    ) -> Result<BatchPlan, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(sql_error)?;
        let (position, hash): (i64, Vec<u8>) =
            sqlx::query_as("SELECT position, hash FROM event_log_head").fetch_one(&mut *tx).await.map_err(sql_error)?;
        let head = ChainHead {
            position: Position(position as u64),
            hash: Hash::from_slice(&hash).ok_or_else(|| StoreError::Corrupt {
                position: Position(position as u64),
                reason: "head hash".into(),
            })?,
        };
        let mut versions = HashMap::new();
        for request in requests {
            if versions.contains_key(&request.stream_id) {
                continue;
            }
            let version: Option<i64> = sqlx::query_scalar("SELECT max(stream_version) FROM events WHERE stream_id = ?")
                .bind(request.stream_id.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(sql_error)?;
            versions.insert(request.stream_id.clone(), StreamVersion(version.unwrap_or(0) as u64));
        }

        let plan = plan_batch(head, &versions, requests, recorded_at);
        if plan.records.is_empty() {
            tx.rollback().await.map_err(sql_error)?;
            return Ok(plan);
        }
        for record in &plan.records {
            sqlx::query(
                "INSERT INTO events (position, stream_id, stream_version, event_id, event_type, schema_version,
                                     recorded_at_us, payload, payload_hash, prev_hash, hash)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(record.position.0 as i64)
            .bind(record.stream_id.as_str())
            .bind(record.stream_version.0 as i64)
            .bind(record.event_id.0.as_bytes().as_slice())
            .bind(record.event_type.as_str())
            .bind(i32::from(record.schema_version))
            .bind(record.recorded_at.0)
            .bind(record.payload.as_deref())
            .bind(record.payload_hash.0.as_slice())
            .bind(record.prev_hash.0.as_slice())
            .bind(record.hash.0.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(sql_error)?;
        }
        sqlx::query("UPDATE event_log_head SET position = ?, hash = ? WHERE singleton = 1")
            .bind(plan.head.position.0 as i64)
            .bind(plan.head.hash.0.as_slice())
            .execute(&mut *tx)
            .await
            .map_err(sql_error)?;
        tx.commit().await.map_err(sql_error)?;
        Ok(plan)
    }
}

fn decode(row: &SqliteRow) -> Result<RecordedEvent, StoreError> {
    let position: i64 = row.try_get(0).map_err(sql_error)?;
    let event_id: Vec<u8> = row.try_get(3).map_err(sql_error)?;
    let stored = StoredRow {
        position,
        stream_id: row.try_get(1).map_err(sql_error)?,
        stream_version: row.try_get(2).map_err(sql_error)?,
        event_id: Uuid::from_slice(&event_id).map_err(|_| StoreError::Corrupt {
            position: Position(position as u64),
            reason: "event id length".into(),
        })?,
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
impl EventStore for SqliteEventStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, StoreError> {
        self.committer.append(request).await
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        after: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        const SQL: &str = select_events!("WHERE stream_id = ? AND stream_version > ? ORDER BY stream_version LIMIT ?");
        let rows = sqlx::query(SQL)
            .bind(stream_id.as_str())
            .bind(after.0 as i64)
            .bind(limit as i64)
            .fetch_all(&self.readers)
            .await
            .map_err(sql_error)?;
        rows.iter().map(decode).collect()
    }

    async fn read_all(&self, after: Position, limit: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        const SQL: &str = select_events!("WHERE position > ? ORDER BY position LIMIT ?");
        let rows = sqlx::query(SQL)
            .bind(after.0 as i64)
            .bind(limit as i64)
            .fetch_all(&self.readers)
            .await
            .map_err(sql_error)?;
        rows.iter().map(decode).collect()
    }

    async fn head(&self) -> Result<Position, StoreError> {
        read_head(&self.readers).await
    }

    async fn wait_for_events_after(&self, after: Position) -> Result<Position, StoreError> {
        let mut watcher = self.head.subscribe();
        let seen = watcher.wait_for(|head| *head > after).await.map_err(|_| StoreError::Closed)?;
        Ok(*seen)
    }

    async fn drop_payload(&self, position: Position) -> Result<(), StoreError> {
        let updated = sqlx::query("UPDATE events SET payload = NULL WHERE position = ?")
            .bind(position.0 as i64)
            .execute(&self.writer)
            .await
            .map_err(sql_error)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NotFound(position));
        }
        Ok(())
    }

    async fn drop_payloads(&self, positions: &[Position]) -> Result<u64, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await.map_err(sql_error)?;
        let mut dropped = 0;
        for position in positions {
            let updated = sqlx::query("UPDATE events SET payload = NULL WHERE position = ? AND payload IS NOT NULL")
                .bind(position.0 as i64)
                .execute(&mut *tx)
                .await
                .map_err(sql_error)?;
            dropped += updated.rows_affected();
        }
        tx.commit().await.map_err(sql_error)?;
        Ok(dropped)
    }

    async fn check_health(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await.map_err(sql_error)?;
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for SqliteEventStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Position, StoreError> {
        let position: Option<i64> = sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.readers)
            .await
            .map_err(sql_error)?;
        Ok(Position(position.unwrap_or(0) as u64))
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO checkpoints (name, position, updated_at_us) VALUES (?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at_us = excluded.updated_at_us",
        )
        .bind(name)
        .bind(position.0 as i64)
        .bind(self.clock.now().0)
        .execute(&self.writer)
        .await
        .map_err(sql_error)?;
        Ok(())
    }
}

#[async_trait]
impl privcomm_domain::nonces::NonceLedger for SqliteEventStore {
    async fn consume(&self, nonce_id: [u8; 32], expires_at: Timestamp, now: Timestamp) -> Result<bool, StoreError> {
        sqlx::query("DELETE FROM used_auth_nonces WHERE expires_at_us < ?")
            .bind(now.0)
            .execute(&self.writer)
            .await
            .map_err(sql_error)?;
        let inserted = sqlx::query(
            "INSERT INTO used_auth_nonces (nonce_hash, expires_at_us) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(nonce_id.as_slice())
        .bind(expires_at.0)
        .execute(&self.writer)
        .await
        .map_err(sql_error)?;
        Ok(inserted.rows_affected() == 1)
    }
}
