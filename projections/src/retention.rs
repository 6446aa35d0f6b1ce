//! Retention: expiry and compaction, decided from the read models and
//! recorded as events so that a replay reproduces them.
//!
//! - **Expiry** (daily, 02:00): a message still undelivered more than 30
//!   days after it was accepted gets `MessageExpired` on its mailbox stream —
//!   with the same derived event id as a delivery, so a message is either
//!   delivered or expired, never both. The relay stops offering it.
//! - **Prekey compaction** (daily, 03:00): for a user whose one-time
//!   prekeys were first used (claimed, or voided by an identity change) more
//!   than 7 days ago since the pools were last restated, `PreKeysCompacted`
//!   restates the unused pools on the user stream, and the payloads of that
//!   user's uploads (and earlier restatements) recorded more than 7 days ago
//!   are dropped.
//! - **Ciphertext** (with either run): a settled message's ciphertext is
//!   dropped once the grace period (1 hour) after its delivery or expiry has
//!   passed.
//!
//! Dropping payloads: an `EventsCompacted` event listing the positions is
//! appended first (stream `retention`), then the payloads are set to NULL;
//! the hash chain covers payload hashes, so it still verifies. A run that
//! dies between the two is finished by the next one, which re-drops the
//! positions of the latest records.

use crate::store::{ProjectionError, ReadDb};
use futures::TryStreamExt as _;
use privcomm_domain::events::DomainEvent;
use privcomm_domain::mailbox::{self, MailboxCommand, MailboxDecision, MailboxState};
use privcomm_domain::user::{self, UserCommand, UserState};
use privcomm_domain::{
    AppendRequest, Clock, EventId, EventStore, ExpectedVersion, MessageId, Position, StoreError, StreamId,
    StreamVersion, Timestamp, UserId,
};
use sqlx::Row as _;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How long things are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Undelivered messages expire after this (30 days).
    pub undelivered: Duration,
    /// Used prekeys are compacted this long after first use, in uploads this old (7 days).
    pub used_prekeys: Duration,
    /// A settled message's ciphertext is dropped this long after (1 hour).
    pub ciphertext_grace: Duration,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            undelivered: Duration::from_secs(30 * 24 * 3600),
            used_prekeys: Duration::from_secs(7 * 24 * 3600),
            ciphertext_grace: Duration::from_secs(3600),
        }
    }
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Messages expired.
    pub messages_expired: u64,
    /// Users whose pools were restated.
    pub prekey_users_compacted: u64,
    /// Payloads dropped (ciphertexts and prekey uploads).
    pub payloads_dropped: u64,
}

/// Most rows one run looks at per job; the rest wait for the next run.
pub const MAX_PER_RUN: i64 = 50_000;

/// The stream of compaction records.
pub fn retention_stream() -> StreamId {
    StreamId::new("retention").unwrap_or_else(|_| unreachable!("a valid stream name"))
}

/// Errors of a retention run.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The log failed.
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    /// The read models failed.
    #[error("read models: {0}")]
    Read(#[from] ProjectionError),
    /// A stream could not be folded.
    #[error("cannot fold {stream}: {reason}")]
    Fold {
        /// The stream.
        stream: String,
        /// Why.
        reason: String,
    },
}

impl From<sqlx::Error> for RetentionError {
    fn from(error: sqlx::Error) -> Self {
        RetentionError::Read(ProjectionError::from(error))
    }
}

/// The retention jobs over one log and its read models.
pub struct Retention {
    log: Arc<dyn EventStore>,
    read: ReadDb,
    clock: Arc<dyn Clock>,
    policy: RetentionPolicy,
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

impl Retention {
    /// Jobs on `log`, choosing from the read models in `read`.
    pub fn new(log: Arc<dyn EventStore>, read: ReadDb, clock: Arc<dyn Clock>, policy: RetentionPolicy) -> Retention {
        Retention { log, read, clock, policy }
    }

    /// The daily expiry job (02:00): finishes interrupted drops, expires.
    pub async fn daily_expiry(&self) -> Result<RetentionReport, RetentionError> {
        let payloads_dropped = self.finish_interrupted_drops().await?;
        let messages_expired = self.expire_undelivered().await?;
        Ok(RetentionReport { messages_expired, payloads_dropped, ..Default::default() })
    }

    /// The daily prekey job (03:00).
    pub async fn daily_prekeys(&self) -> Result<RetentionReport, RetentionError> {
        let (prekey_users_compacted, payloads_dropped) = self.compact_prekeys().await?;
        Ok(RetentionReport { prekey_users_compacted, payloads_dropped, ..Default::default() })
    }

    /// Every job once: expiry, prekey compaction, ciphertext.
    pub async fn run_all(&self) -> Result<RetentionReport, RetentionError> {
        let mut report = RetentionReport::default();
        report.payloads_dropped += self.finish_interrupted_drops().await?;
        report.messages_expired = self.expire_undelivered().await?;
        let (users, dropped) = self.compact_prekeys().await?;
        report.prekey_users_compacted = users;
        report.payloads_dropped += dropped;
        report.payloads_dropped += self.drop_settled_ciphertext().await?;
        Ok(report)
    }

    /// Expires messages accepted more than the policy's age ago and still
    /// undelivered. Returns how many it expired.
    pub async fn expire_undelivered(&self) -> Result<u64, RetentionError> {
        let cutoff = self.clock.now().0 - micros(self.policy.undelivered);
        let sql = "SELECT recipient, message_id FROM rm_mailbox WHERE settled IS NULL AND accepted_at_us < $1 \
                   ORDER BY position LIMIT $2";
        let rows: Vec<(String, String)> = on_db!(&self.read, pool => {
            sqlx::query(sql).bind(cutoff).bind(MAX_PER_RUN).fetch(pool)
                .map_ok(|row| (row.get::<String, _>(0), row.get::<String, _>(1)))
                .try_collect().await?
        });
        let mut by_recipient: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (recipient, message) in rows {
            by_recipient.entry(recipient).or_default().push(message);
        }
        let mut expired = 0;
        for (recipient, messages) in by_recipient {
            let Some(recipient) = parse_uuid(&recipient).map(UserId) else { continue };
            let state = self.fold_mailbox(recipient).await?;
            for message in messages {
                let Some(message_id) = parse_uuid(&message).map(MessageId) else { continue };
                let command = MailboxCommand::Expire { message_id };
                let Ok(MailboxDecision::Append(events)) = mailbox::decide(&state, recipient, &command) else {
                    continue; // delivered meanwhile, or never there: nothing to expire
                };
                for event in events {
                    let Some(event_id) = mailbox::event_id(&event) else { continue };
                    match self.append(StreamId::for_mailbox(recipient), ExpectedVersion::Any, &event, event_id).await {
                        Ok(()) => expired += 1,
                        // Settled by a delivery that raced us: the same derived id.
                        Err(StoreError::DuplicateEventId) => {}
                        Err(error) => return Err(error.into()),
                    }
                }
            }
        }
        if expired > 0 {
            tracing::info!(expired, "expired undelivered messages");
        }
        Ok(expired)
    }

    /// Restates the pools of users whose prekeys were first used more than
    /// the policy's age ago, and drops their old uploads' payloads.
    /// Returns `(users, payloads dropped)`.
    pub async fn compact_prekeys(&self) -> Result<(u64, u64), RetentionError> {
        let cutoff = self.clock.now().0 - micros(self.policy.used_prekeys);
        let sql = "SELECT user_id FROM rm_directory_users WHERE first_use_at_us < $1 ORDER BY user_id LIMIT $2";
        let users: Vec<String> = on_db!(&self.read, pool => {
            sqlx::query_scalar(sql).bind(cutoff).bind(MAX_PER_RUN).fetch_all(pool).await?
        });
        let (mut compacted, mut dropped) = (0, 0);
        for user in users {
            let Some(user_id) = parse_uuid(&user).map(UserId) else { continue };
            let Some(restated_at) = self.restate_pools(user_id).await? else { continue };
            let sql = "SELECT position FROM rm_prekey_uploads WHERE user_id = $1 AND recorded_at_us < $2 \
                       AND position < $3 ORDER BY position";
            let positions: Vec<i64> = on_db!(&self.read, pool => {
                sqlx::query_scalar(sql).bind(&user).bind(cutoff).bind(restated_at.0 as i64).fetch_all(pool).await?
            });
            compacted += 1;
            dropped += self.drop_payloads(positions.into_iter().map(|p| Position(p as u64)).collect()).await?;
        }
        if compacted > 0 {
            tracing::info!(users = compacted, dropped, "compacted used prekeys");
        }
        Ok((compacted, dropped))
    }

    /// Drops the ciphertext of messages settled more than the grace period ago.
    pub async fn drop_settled_ciphertext(&self) -> Result<u64, RetentionError> {
        let cutoff = self.clock.now().0 - micros(self.policy.ciphertext_grace);
        let sql = "SELECT position FROM rm_mailbox WHERE settled IS NOT NULL AND settled_at_us < $1 \
                   ORDER BY position LIMIT $2";
        let positions: Vec<i64> = on_db!(&self.read, pool => {
            sqlx::query_scalar(sql).bind(cutoff).bind(MAX_PER_RUN).fetch_all(pool).await?
        });
        let dropped = self.drop_payloads(positions.into_iter().map(|p| Position(p as u64)).collect()).await?;
        if dropped > 0 {
            tracing::info!(dropped, "dropped the ciphertext of settled messages");
        }
        Ok(dropped)
    }

    /// Records then drops payloads, in chunks. Returns how many positions it covered.
    async fn drop_payloads(&self, positions: Vec<Position>) -> Result<u64, RetentionError> {
        let mut dropped = 0;
        for chunk in positions.chunks(1_000) {
            let record = DomainEvent::EventsCompacted { positions: chunk.to_vec() };
            self.append(retention_stream(), ExpectedVersion::Any, &record, EventId(uuid::Uuid::now_v7())).await?;
            self.log.drop_payloads(chunk).await?;
            dropped += chunk.len() as u64;
        }
        if dropped > 0 {
            self.reclaim_space().await;
        }
        Ok(dropped)
    }

    /// Re-drops the positions of the latest compaction records, in case a
    /// run stopped between recording and dropping. Returns how many payloads
    /// were still there.
    async fn finish_interrupted_drops(&self) -> Result<u64, RetentionError> {
        const LATEST_RECORDS: usize = 20;
        let mut records = std::collections::VecDeque::with_capacity(LATEST_RECORDS);
        let mut after = StreamVersion(0);
        loop {
            let page = self.log.read_stream(&retention_stream(), after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.stream_version;
            for event in page {
                if records.len() == LATEST_RECORDS {
                    records.pop_front();
                }
                records.push_back(event);
            }
        }
        let mut pending = Vec::new();
        for record in &records {
            if let Ok(DomainEvent::EventsCompacted { positions }) = DomainEvent::from_recorded(record) {
                pending.extend(positions);
            }
        }
        let finished = self.log.drop_payloads(&pending).await?;
        if finished > 0 {
            tracing::warn!(finished, "finished payload drops an earlier retention run had recorded");
        }
        Ok(finished)
    }

    /// Dropped payloads leave their bytes in free pages until reused:
    /// SQLite's `secure_delete` zeroes them (set on the store's
    /// connections), and a WAL checkpoint moves the change into the file;
    /// PostgreSQL's VACUUM makes the old row versions unreadable by any query.
    async fn reclaim_space(&self) {
        let result = match &self.read {
            // The simple protocol: VACUUM cannot run inside a (even implicit) transaction block.
            ReadDb::Postgres(pool) => sqlx::raw_sql("VACUUM events").execute(pool).await.map(|_| ()),
            ReadDb::Sqlite(pool) => sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(pool).await.map(|_| ()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "cannot reclaim the space of dropped payloads yet");
        }
    }

    /// Appends `PreKeysCompacted` at the user's current version; returns its position.
    async fn restate_pools(&self, user: UserId) -> Result<Option<Position>, RetentionError> {
        for _ in 0..8 {
            let (state, version) = self.fold_user(user).await?;
            let Ok(events) = user::decide(&state, &UserCommand::CompactPreKeys) else { return Ok(None) };
            let Some(event) = events.first() else { return Ok(None) };
            let expected = ExpectedVersion::Exact(version);
            match self.append_at(StreamId::for_user(user), expected, event, EventId(uuid::Uuid::now_v7())).await {
                Ok(position) => return Ok(Some(position)),
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Ok(None)
    }

    async fn append(
        &self,
        stream: StreamId,
        expected: ExpectedVersion,
        event: &DomainEvent,
        event_id: EventId,
    ) -> Result<(), StoreError> {
        self.append_at(stream, expected, event, event_id).await.map(|_| ())
    }

    async fn append_at(
        &self,
        stream: StreamId,
        expected: ExpectedVersion,
        event: &DomainEvent,
        event_id: EventId,
    ) -> Result<Position, StoreError> {
        let new = event.to_new_event(event_id).map_err(|e| StoreError::Storage(Box::new(e)))?;
        let outcome = self.log.append(AppendRequest { stream_id: stream, expected, events: vec![new] }).await?;
        Ok(outcome.last_position)
    }

    async fn fold_user(&self, user: UserId) -> Result<(UserState, StreamVersion), RetentionError> {
        let mut state = UserState::default();
        let version = self
            .fold(&StreamId::for_user(user), |_, event| {
                // A dropped upload: the PreKeysCompacted after it restates the pools.
                if let Some(event) = event {
                    user::evolve(&mut state, event);
                }
            })
            .await?;
        Ok((state, version))
    }

    async fn fold_mailbox(&self, recipient: UserId) -> Result<MailboxState, RetentionError> {
        let mut state = MailboxState::default();
        self.fold(&StreamId::for_mailbox(recipient), |recorded, event| match event {
            Some(event) => mailbox::evolve(&mut state, recorded.stream_version, recorded.recorded_at, event),
            None => {
                mailbox::evolve_compacted(&mut state, recorded.stream_version, recorded.event_id, recorded.recorded_at)
            }
        })
        .await?;
        Ok(state)
    }

    async fn fold(
        &self,
        stream: &StreamId,
        mut apply: impl FnMut(&privcomm_domain::RecordedEvent, Option<&DomainEvent>),
    ) -> Result<StreamVersion, RetentionError> {
        let mut after = StreamVersion(0);
        loop {
            let page = self.log.read_stream(stream, after, 500).await?;
            let Some(last) = page.last() else { return Ok(after) };
            after = last.stream_version;
            for recorded in &page {
                let event = DomainEvent::for_fold(recorded)
                    .map_err(|e| RetentionError::Fold { stream: stream.to_string(), reason: e.to_string() })?;
                apply(recorded, event.as_ref());
            }
        }
    }
}

fn parse_uuid(text: &str) -> Option<uuid::Uuid> {
    uuid::Uuid::parse_str(text).ok()
}

/// When the daily jobs run, in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DailyAt {
    /// Hour 0–23.
    pub hour: u32,
    /// Minute 0–59.
    pub minute: u32,
}

impl DailyAt {
    /// The first time at or after `now` that is this time of day.
    pub fn next_after(self, now: Timestamp) -> Timestamp {
        const DAY_US: i64 = 24 * 3600 * 1_000_000;
        let offset = (i64::from(self.hour) * 3600 + i64::from(self.minute) * 60) * 1_000_000;
        let day_start = now.0.div_euclid(DAY_US) * DAY_US;
        let today = day_start + offset;
        Timestamp(if today > now.0 { today } else { today + DAY_US })
    }
}

impl std::str::FromStr for DailyAt {
    type Err = String;
    fn from_str(text: &str) -> Result<DailyAt, String> {
        let bad = || format!("expected a time of day as HH:MM (UTC), got {text:?}");
        let (hour, minute) = text.split_once(':').ok_or_else(bad)?;
        let hour: u32 = hour.parse().map_err(|_| bad())?;
        let minute: u32 = minute.parse().map_err(|_| bad())?;
        if hour > 23 || minute > 59 {
            return Err(bad());
        }
        Ok(DailyAt { hour, minute })
    }
}

/// When the retention jobs run in `privcomm serve`.
#[derive(Clone, Copy, Debug)]
pub struct RetentionSchedule {
    /// Expiry (02:00 UTC).
    pub expire_at: DailyAt,
    /// Prekey compaction (03:00 UTC).
    pub compact_at: DailyAt,
    /// How often settled ciphertext is looked for (a sixth of the grace period, at least a minute).
    pub ciphertext_every: Duration,
}

impl RetentionSchedule {
    /// The schedule for these job times and grace period.
    pub fn new(expire_at: DailyAt, compact_at: DailyAt, ciphertext_grace: Duration) -> RetentionSchedule {
        RetentionSchedule {
            expire_at,
            compact_at,
            ciphertext_every: (ciphertext_grace / 6).max(Duration::from_secs(60)),
        }
    }
}

/// Runs the jobs on their schedule until `stop` turns true. A failed run is
/// logged and tried again at its next time.
pub async fn run_on_schedule(
    retention: Arc<Retention>,
    schedule: RetentionSchedule,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let until = |at: DailyAt| {
        let now = retention.clock.now();
        Duration::from_micros((at.next_after(now).0 - now.0).max(0) as u64)
    };
    let expiry = tokio::time::sleep(until(schedule.expire_at));
    let compaction = tokio::time::sleep(until(schedule.compact_at));
    let mut ciphertext = tokio::time::interval(schedule.ciphertext_every);
    tokio::pin!(expiry, compaction);
    loop {
        let (job, result) = tokio::select! {
            () = crate::worker::stopped(&mut stop) => return,
            () = &mut expiry => {
                expiry.as_mut().reset(tokio::time::Instant::now() + until(schedule.expire_at).max(Duration::from_secs(60)));
                ("expiry", retention.daily_expiry().await)
            }
            () = &mut compaction => {
                compaction.as_mut().reset(tokio::time::Instant::now() + until(schedule.compact_at).max(Duration::from_secs(60)));
                ("prekey compaction", retention.daily_prekeys().await)
            }
            _ = ciphertext.tick() => ("ciphertext", retention.drop_settled_ciphertext().await.map(|payloads_dropped| RetentionReport { payloads_dropped, ..Default::default() })),
        };
        match result {
            Ok(report) => tracing::debug!(job, ?report, "retention job done"),
            Err(error) => tracing::warn!(job, %error, "retention job failed; it runs again at its next time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daily_times_fall_on_the_next_occurrence() {
        const HOUR: i64 = 3_600_000_000;
        let at = DailyAt { hour: 2, minute: 0 };
        // 01:00 on day 10 → 02:00 the same day; 02:00 exactly → the next day; 03:00 → the next day.
        assert_eq!(at.next_after(Timestamp(10 * 24 * HOUR + HOUR)), Timestamp(10 * 24 * HOUR + 2 * HOUR));
        assert_eq!(at.next_after(Timestamp(10 * 24 * HOUR + 2 * HOUR)), Timestamp(11 * 24 * HOUR + 2 * HOUR));
        assert_eq!(at.next_after(Timestamp(10 * 24 * HOUR + 3 * HOUR)), Timestamp(11 * 24 * HOUR + 2 * HOUR));
        assert_eq!("03:30".parse::<DailyAt>(), Ok(DailyAt { hour: 3, minute: 30 }));
        assert!("24:00".parse::<DailyAt>().is_err());
        assert!("3".parse::<DailyAt>().is_err());
    }
}
