//! Read models, replay, retention and audit, embedded (SQLite + in-process
//! bus) and on PostgreSQL + NATS: a mixed workload through the real server,
//! projection workers fed by the real feed, the `privcomm` binary's
//! `replay`, `export` and `audit verify` commands, and tampering with the
//! stored log.

#[macro_use]
mod support;

use base64::Engine as _;
use privcomm_domain::Position;
use privcomm_projections::models::{self, EVENT_COUNTS};
use privcomm_projections::on_db;
use privcomm_projections::retention::{Retention, RetentionPolicy};
use privcomm_projections::store::{ReadDb, ReadStore as _};
use serde_json::json;
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::TestResult;
use support::api::{Client, Mode, TestApi, generous_limits};
use support::ws::WsClient;

in_both_modes!(
    a_mixed_workload_replays_to_identical_read_models_and_compaction_leaves_no_ciphertext,
    a_worker_killed_mid_batch_applies_every_event_exactly_once,
    tampering_is_found_at_the_first_bad_position_by_replay_and_audit_verify,
    retention_boundaries_are_exact_on_both_sides,
    a_rewritten_history_between_two_signed_checkpoints_is_detected,
    the_documented_rebuild_of_read_models_in_place_rebuilds_them,
);

const DAY_US: i64 = 24 * 3600 * 1_000_000;
const SECOND_US: i64 = 1_000_000;

fn privcomm(args: &[&str]) -> Result<std::process::Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_privcomm")).args(args).env_remove("DATABASE_URL").output()
}

fn text(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn message_id(sender: usize, n: usize) -> String {
    format!("0190b6c4-0000-7000-8{sender:03}-{n:012}")
}

/// A message body no other message shares (48 bytes, so 64 Base64 characters).
fn body(sender: usize, n: usize) -> Vec<u8> {
    let mut body = uuid::Uuid::now_v7().as_bytes().to_vec();
    body.extend_from_slice(format!("sender{sender:04}message{n:010}").as_bytes());
    body.resize(48, b'.');
    body
}

struct User {
    client: Client,
    id: String,
}

async fn user(api: &TestApi, phone: &str, prekeys: u32) -> Result<User, String> {
    let mut client = Client::new(phone);
    let id = client.register(api, prekeys, prekeys).await?;
    Ok(User { client, id })
}

/// Sends `count` messages from `sender` to `to`, pipelined, and waits for every `sent`.
async fn send_many(
    api: &TestApi,
    sender: &User,
    index: usize,
    to: &str,
    count: usize,
) -> Result<Vec<Vec<u8>>, Box<dyn std::error::Error + Send + Sync>> {
    let token = sender.client.login(api).await?;
    let mut ws = WsClient::connect(&api.ws_url(""), Some(&token)).await?;
    assert_eq!(ws.frame().await?["type"], "queue_empty");
    let mut bodies = Vec::with_capacity(count);
    // In windows: a client that only writes would fill the socket with unread `sent` replies.
    for window in (0..count).collect::<Vec<_>>().chunks(100) {
        for &n in window {
            let body = body(index, n);
            ws.send_message(&message_id(index, n), to, &body).await?;
            bodies.push(body);
        }
        for _ in window {
            let frame = ws.frame().await?;
            assert_eq!(frame["type"], "sent", "{frame}");
        }
    }
    ws.close().await;
    Ok(bodies)
}

/// How many stored payloads contain `needle`.
async fn payloads_containing(api: &TestApi, needle: &[u8]) -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
    let db = privcomm::projector::open_read_db(&api.database_url).await?;
    // The one query here that differs by backend: a byte search in a blob.
    let sql = match db {
        ReadDb::Postgres(_) => "SELECT count(*) FROM events WHERE position($1::bytea IN payload) > 0",
        ReadDb::Sqlite(_) => "SELECT count(*) FROM events WHERE instr(payload, $1) > 0",
    };
    Ok(on_db!(&db, pool => sqlx::query_scalar(sql).bind(needle).fetch_one(pool).await?))
}

fn b64(bytes: &[u8]) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.encode(bytes).into_bytes()
}

/// The SQLite file (and its WAL) as raw bytes, for a search below SQL.
fn sqlite_file_bytes(url: &str) -> Vec<u8> {
    let path = url.trim_start_matches("sqlite:");
    let mut bytes = std::fs::read(path).unwrap_or_default();
    bytes.extend(std::fs::read(format!("{path}-wal")).unwrap_or_default());
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn a_mixed_workload_replays_to_identical_read_models_and_compaction_leaves_no_ciphertext(
    mode: Mode,
) -> TestResult {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 2_500;
    const LEFT_UNACKED: usize = 200;
    let api = TestApi::start(mode, generous_limits()).await?;
    let projection = api.start_projector().await?;
    let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let bob = user(&api, &format!("+1550{suffix}"), 20).await?;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(user(&api, &format!("+155{i}9{suffix}"), 5).await?);
    }
    let bob_token = bob.client.login(&api).await?;
    // Claims, and a push token.
    let claimer_token = senders[0].client.login(&api).await?;
    for _ in 0..3 {
        assert_eq!(api.get_auth(&format!("/v1/keys/{}", bob.id), &claimer_token).await?.0, 200);
    }
    let push_token = json!({ "platform": "fcm", "token": "bob-device" });
    assert_eq!(api.put_auth("/v1/push-token", &bob_token, &push_token).await?.0, 204);

    // 10,000 messages from four senders at once.
    let mut sending = Vec::new();
    let api = Arc::new(api);
    let senders = Arc::new(senders);
    for index in 0..SENDERS {
        let (api, senders, to) = (api.clone(), senders.clone(), bob.id.clone());
        sending.push(tokio::spawn(async move { send_many(&api, &senders[index], index, &to, PER_SENDER).await }));
    }
    let mut bodies = Vec::new();
    for task in sending {
        bodies.push(task.await??);
    }

    // Bob takes them all and acks all but sender 0's first LEFT_UNACKED.
    let mut ws = WsClient::connect(&api.ws_url(""), Some(&bob_token)).await?;
    let mut received = 0;
    loop {
        let frame = ws.frame().await?;
        match frame["type"].as_str() {
            Some("message") => {
                received += 1;
                let id = frame["id"].as_str().ok_or("id")?.to_owned();
                let unacked = (0..LEFT_UNACKED).any(|n| id == message_id(0, n));
                if !unacked {
                    ws.ack(&id).await?;
                }
            }
            Some("queue_empty") if received >= SENDERS * PER_SENDER => break,
            Some("queue_empty") => {}
            other => return Err(format!("unexpected frame {other:?}: {frame}").into()),
        }
    }
    assert_eq!(received, SENDERS * PER_SENDER);
    ws.close().await;
    projection.caught_up(api.store.as_ref()).await?;
    let delivered_sample = &bodies[1][..20];
    let unacked_sample = &bodies[0][..20];
    for body in delivered_sample.iter().chain(unacked_sample) {
        assert_eq!(payloads_containing(&api, &b64(body)).await?, 1, "before compaction the ciphertext is stored");
    }

    // A month later: the unacked messages expire, delivered ciphertext and used prekeys are compacted.
    let db = privcomm::projector::open_read_db(&api.database_url).await?;
    assert_read_models_match_the_reference(api.store.as_ref(), &db).await?;
    let retention = Retention::new(api.store.clone(), db.clone(), api.clock.clone(), RetentionPolicy::default());
    api.clock.advance(31 * DAY_US);
    let first = retention.run_all().await?;
    assert_eq!(first.messages_expired, LEFT_UNACKED as u64);
    assert_eq!(first.prekey_users_compacted, 1, "bob's claimed prekeys");
    assert!(first.payloads_dropped >= (SENDERS * PER_SENDER - LEFT_UNACKED) as u64, "{first:?}");
    projection.caught_up(api.store.as_ref()).await?;
    // The expired ones' ciphertext goes after the grace period.
    api.clock.advance(2 * 3600 * SECOND_US);
    let second = retention.run_all().await?;
    assert_eq!(second.payloads_dropped, LEFT_UNACKED as u64, "{second:?}");
    assert_eq!(second.messages_expired, 0);
    projection.caught_up(api.store.as_ref()).await?;

    for body in delivered_sample.iter().chain(unacked_sample) {
        assert_eq!(payloads_containing(&api, &b64(body)).await?, 0, "compaction leaves no ciphertext in the table");
    }
    if matches!(mode, Mode::Embedded) {
        let raw = sqlite_file_bytes(&api.database_url);
        for body in delivered_sample.iter().chain(unacked_sample) {
            assert!(!contains(&raw, &b64(body)), "the ciphertext is still in the database file");
        }
    }
    let report = api.store.verify(Position(1), None).await?;
    assert_eq!(report.first_break, None, "the chain verifies after compaction");

    // Expired messages are no longer delivered.
    let bob_token = bob.client.login(&api).await?;
    let mut ws = WsClient::connect(&api.ws_url(""), Some(&bob_token)).await?;
    assert_eq!(ws.frame().await?["type"], "queue_empty");
    assert!(ws.quiet(Duration::from_millis(500)).await, "an expired message was delivered");
    ws.close().await;
    projection.caught_up(api.store.as_ref()).await?;

    // The read models say so, hold exactly what the reference implementation
    // in memory builds from the same log, and a replay rebuilds them identically.
    let pending: i64 = on_db!(&db, pool => sqlx::query_scalar("SELECT count(*) FROM rm_mailbox WHERE settled IS NULL").fetch_one(pool).await?);
    assert_eq!(pending, 0);
    assert_read_models_match_the_reference(api.store.as_ref(), &db).await?;
    let replay = privcomm(&["replay", "--database-url", &api.database_url])?;
    let output = text(&replay);
    assert!(replay.status.success(), "replay failed:\n{output}");
    assert!(output.contains("replay OK"), "{output}");
    assert!(!output.contains("DIFFERENT"), "{output}");
    for model in models::all() {
        assert!(output.contains(model.name()), "model {} was not compared:\n{output}", model.name());
    }
    // A live read model that differs from the log is reported, and fails the replay.
    let forge = "UPDATE rm_push_tokens SET token = 'someone-else'";
    on_db!(&db, pool => sqlx::query(forge).execute(pool).await.map(|_| ())?);
    let differs = privcomm(&["replay", "--database-url", &api.database_url])?;
    assert!(!differs.status.success(), "a forged read model passed:\n{}", text(&differs));
    assert!(text(&differs).contains("DIFFERENT") && text(&differs).contains("rm_push_tokens"), "{}", text(&differs));

    // An export verifies offline, and replays on its own.
    let dir = support::TempDir::new();
    let file = dir.path.join("log.ndjson");
    let file = file.to_str().ok_or("path")?;
    let export = privcomm(&["export", "--database-url", &api.database_url, "--output", file])?;
    assert!(export.status.success(), "{}", text(&export));
    let verify = privcomm(&["audit", "verify", file])?;
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("payloads compacted"), "{}", text(&verify));
    let from_file = privcomm(&["replay", "--from", file])?;
    assert!(from_file.status.success(), "{}", text(&from_file));

    // The identity history names bob's registration.
    let identity = privcomm(&["audit", "identity", "--database-url", &api.database_url, &bob.id])?;
    assert!(identity.status.success(), "{}", text(&identity));
    assert!(text(&identity).contains("registered"), "{}", text(&identity));

    projection.stop().await;
    match Arc::try_unwrap(api) {
        Ok(api) => api.shutdown().await,
        Err(_) => return Err("api still shared".into()),
    }
    Ok(())
}

/// Every read-model table in `db` holds what the reference implementation
/// in memory builds from the whole log: the SQL a store writes (multi-row,
/// folded, `unnest`ed on PostgreSQL) does what the ops say.
async fn assert_read_models_match_the_reference(
    store: &dyn privcomm::eventstore::LogStore,
    db: &ReadDb,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let log = store.read_all(Position(0), 1_000_000).await?;
    let log = log.into_iter().map(privcomm_projections::store::Decoded::new).collect::<Result<Vec<_>, _>>()?;
    let reference = privcomm_projections::store::MemoryReadStore::default();
    let live = privcomm_projections::store::SqlReadStore::new(db.clone());
    let mut rows = 0;
    for model in models::all() {
        reference.apply_batch(model.as_ref(), &log).await?;
        for table in model.tables() {
            let (expected, found) = (reference.checksum(table).await?, live.checksum(table).await?);
            assert_eq!(found, expected, "{} differs from the reference in memory", table.name);
            rows += found.rows;
        }
    }
    assert!(rows > 0, "nothing was compared");
    Ok(())
}

async fn counts_in_model(db: &ReadDb) -> Result<HashMap<String, i64>, Box<dyn std::error::Error + Send + Sync>> {
    let sql = "SELECT event_type, events FROM rm_event_counts";
    let rows: Vec<(String, i64)> = on_db!(db, pool => sqlx::query_as(sql).fetch_all(pool).await?);
    Ok(rows.into_iter().collect())
}

/// A server process's read-model checkpoint, read from its database.
async fn counter_checkpoint(db: &ReadDb) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    let sql = "SELECT position FROM checkpoints WHERE name = 'projection:event_counts'";
    let found: Option<i64> = on_db!(db, pool => sqlx::query_scalar(sql).fetch_optional(pool).await?);
    Ok(found.unwrap_or(0) as u64)
}

/// `count` messages accepted for `recipients` mailboxes, appended straight to the log.
async fn append_messages(
    store: &dyn privcomm::eventstore::LogStore,
    round: usize,
    count: usize,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    const PER_APPEND: usize = 10;
    for chunk in 0..count / PER_APPEND {
        let recipient = privcomm_domain::UserId(uuid::Uuid::from_u128((round * 1_000 + chunk % 50) as u128 + 1));
        let mut events = Vec::new();
        for n in 0..PER_APPEND {
            let event = privcomm_domain::events::DomainEvent::MessageAccepted {
                message_id: privcomm_domain::MessageId(uuid::Uuid::now_v7()),
                sender: privcomm_domain::UserId(uuid::Uuid::from_u128(7)),
                recipient,
                kind: "whisper".into(),
                body: privcomm_domain::events::Bytes(body(round, chunk * PER_APPEND + n)),
            };
            let id = privcomm_domain::mailbox::event_id(&event).ok_or("mailbox event")?;
            events.push(event.to_new_event(id)?);
        }
        store
            .append(privcomm_domain::AppendRequest {
                stream_id: privcomm_domain::StreamId::for_mailbox(recipient),
                expected: privcomm_domain::ExpectedVersion::Any,
                events,
            })
            .await?;
    }
    Ok(())
}

async fn a_worker_killed_mid_batch_applies_every_event_exactly_once(mode: Mode) -> TestResult {
    const ROUNDS: usize = 4;
    // Twice the largest batch: a process killed once its first batch is
    // committed always leaves work behind.
    const PER_ROUND: usize = 2 * privcomm_projections::worker::MAX_BATCH;
    let dir = support::TempDir::new();
    let stream = format!("PC_TEST_KILL_{}", uuid::Uuid::now_v7().simple());
    let (url, test_db) = match mode {
        Mode::Embedded => (format!("sqlite:{}", dir.path.join("events.db").display()), None),
        Mode::Cluster => {
            let db = support::TestDatabase::migrated().await?;
            (db.url.clone(), Some(db))
        }
    };
    privcomm::migrate::migrate_up(&url).await?;
    let store = privcomm::audit::open_log(&url).await?;
    let db = privcomm::projector::open_read_db(&url).await?;
    let node = || {
        let mut command = support::node::privcomm(&dir);
        command
            .env("DATABASE_URL", &url)
            .env("CHECKPOINT_SIGNING_KEY", "2f".repeat(32))
            .env("CHECKPOINT_EVERY_EVENTS", "5000");
        if matches!(mode, Mode::Cluster) {
            command.env("NATS_URL", support::nats_url()).env("NATS_STREAM", &stream);
        }
        command
    };
    let mut killed_behind = 0;
    for round in 0..ROUNDS {
        // A backlog for the next process to work through…
        append_messages(store.as_ref(), round, PER_ROUND).await?;
        let head = store.head().await?.0;
        let before = counter_checkpoint(&db).await?;
        let mut server = support::node::start_server(node())?;
        // …killed (SIGKILL) as soon as it has committed one batch: in the middle of the next.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while counter_checkpoint(&db).await? == before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server.child.kill()?;
        server.child.wait()?;
        let at = counter_checkpoint(&db).await?;
        assert!(at > before, "round {round}: the worker made no progress in 30 s");
        if at < head {
            killed_behind += 1;
        }
    }
    assert!(killed_behind > 0, "no process was killed with work left ({killed_behind} of {ROUNDS})");
    // One last process finishes the work, with no new event to wake it. A
    // killed process's outbox may well have published everything before the
    // kill (the projector lags it); that state is set here, not left to timing.
    let head = store.head().await?.0;
    store.save_checkpoint(privcomm::outbox::CHECKPOINT, Position(head)).await?;
    let server = support::node::start_server(node())?;
    let (mut at, mut moved) = (counter_checkpoint(&db).await?, std::time::Instant::now());
    while at < head {
        assert!(moved.elapsed() < Duration::from_secs(30), "the read model stopped at {at} of {head} for 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = counter_checkpoint(&db).await?;
        if now > at {
            (at, moved) = (now, std::time::Instant::now());
        }
    }
    // The serving process reports the workers' lag, and has signed checkpoints of the log.
    let metrics = reqwest::get(format!("http://{}/metrics", server.address)).await?.text().await?;
    for model in models::all() {
        let line = format!("privcomm_projection_lag_events{{model=\"{}\"}}", model.name());
        assert!(metrics.contains(&line), "{line} missing from /metrics:\n{metrics}");
    }
    assert!(metrics.contains("privcomm_projection_delay_seconds{model=\"event_counts\",quantile=\"0.99\"}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let signed = loop {
        let signed = privcomm_projections::checkpoints::all(&db).await?;
        if signed.last().is_some_and(|c| c.position.0 == head) || std::time::Instant::now() > deadline {
            break signed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(signed.len() >= 2, "a checkpoint every 5,000 events: {signed:?}");
    drop(server);
    let (log, checkpoints) = (dir.path.join("log.ndjson"), dir.path.join("checkpoints.ndjson"));
    let (log, checkpoints) = (log.to_str().ok_or("path")?, checkpoints.to_str().ok_or("path")?);
    assert!(privcomm(&["export", "--database-url", &url, "--output", log])?.status.success());
    assert!(privcomm(&["audit", "checkpoints", "--database-url", &url, "--output", checkpoints])?.status.success());
    let public_key =
        privcomm_projections::checkpoints::CheckpointSigner::from_hex_seed(&"2f".repeat(32))?.public_key_hex();
    let verified = privcomm(&["audit", "verify", log, "--checkpoints", checkpoints, "--public-key", &public_key])?;
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(text(&verified).contains(&format!("{} signed checkpoints matched", signed.len())), "{}", text(&verified));
    let mut in_log = HashMap::new();
    let mut after = Position(0);
    loop {
        let page = store.read_all(after, 5_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        for event in page {
            *in_log.entry(event.event_type).or_insert(0i64) += 1;
        }
    }
    assert_eq!(in_log.get("MessageAccepted"), Some(&((ROUNDS * PER_ROUND) as i64)));
    assert_eq!(counts_in_model(&db).await?, in_log, "every event counted exactly once");
    // A batch delivered again is skipped.
    let again = privcomm_projections::store::SqlReadStore::new(db.clone());
    let all = store.read_all(Position(0), 100).await?;
    let decoded: Vec<_> = all.into_iter().map(privcomm_projections::store::Decoded::new).collect::<Result<_, _>>()?;
    again.apply_batch(&models::EventCounts, &decoded).await?;
    assert_eq!(counts_in_model(&db).await?, in_log, "a redelivered batch is skipped");
    assert_eq!(again.checksum(&EVENT_COUNTS).await?.rows, in_log.len() as u64);
    if let Some(test_db) = test_db {
        if let Ok(client) = async_nats::connect(support::nats_url()).await {
            let _ = async_nats::jetstream::new(client).delete_stream(&stream).await;
        }
        test_db.drop_database().await;
    }
    Ok(())
}

/// One way to tamper with the stored log.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    PayloadByte,
    EventType,
    StoredHash,
    RecordedAt,
    Delete,
    Swap,
}

async fn tamper(db: &ReadDb, how: Tamper, at: i64) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let statements: Vec<String> = match how {
        // Flip the last byte of the payload (a closing brace becomes '|').
        Tamper::PayloadByte => match db {
            ReadDb::Postgres(_) => vec![format!(
                "UPDATE events SET payload = set_byte(payload, length(payload) - 1, get_byte(payload, length(payload) - 1) # 2) WHERE position = {at}"
            )],
            ReadDb::Sqlite(_) => vec![format!(
                "UPDATE events SET payload = substr(payload, 1, length(payload) - 1) || X'7F' WHERE position = {at}"
            )],
        },
        Tamper::EventType => vec![format!("UPDATE events SET event_type = event_type || 'x' WHERE position = {at}")],
        Tamper::StoredHash => match db {
            ReadDb::Postgres(_) => {
                vec![format!("UPDATE events SET hash = set_byte(hash, 0, get_byte(hash, 0) # 1) WHERE position = {at}")]
            }
            ReadDb::Sqlite(_) => {
                vec![format!("UPDATE events SET hash = X'00' || substr(hash, 2) WHERE position = {at}")]
            }
        },
        Tamper::RecordedAt => {
            vec![format!("UPDATE events SET recorded_at_us = recorded_at_us + 1 WHERE position = {at}")]
        }
        Tamper::Delete => vec![format!("DELETE FROM events WHERE position = {at}")],
        Tamper::Swap => vec![
            format!("UPDATE events SET position = -1 WHERE position = {at}"),
            format!("UPDATE events SET position = {at} WHERE position = {}", at + 1),
            format!("UPDATE events SET position = {} WHERE position = -1", at + 1),
        ],
    };
    match db {
        ReadDb::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            // The position CHECK (> 0) would refuse the swap's parking place.
            sqlx::raw_sql("ALTER TABLE events DROP CONSTRAINT IF EXISTS events_position_check")
                .execute(&mut *tx)
                .await?;
            for sql in statements {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        ReadDb::Sqlite(pool) => {
            let mut connection = pool.acquire().await?;
            sqlx::raw_sql("PRAGMA ignore_check_constraints = ON").execute(&mut *connection).await?;
            for sql in statements {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *connection).await?;
            }
        }
    }
    Ok(())
}

async fn tampering_is_found_at_the_first_bad_position_by_replay_and_audit_verify(mode: Mode) -> TestResult {
    let cases = [
        (Tamper::PayloadByte, "payload altered"),
        (Tamper::EventType, "event altered"),
        (Tamper::StoredHash, ""),
        (Tamper::RecordedAt, "event altered"),
        (Tamper::Delete, "event missing"),
        (Tamper::Swap, ""),
    ];
    for (how, says) in cases {
        let api = TestApi::start(mode, generous_limits()).await?;
        let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
        for i in 0..3 {
            user(&api, &format!("+157{i}{suffix}"), 2).await?;
        }
        let head = api.store.head().await?;
        assert!(head.0 >= 8, "enough events to tamper in the middle");
        let at = (head.0 / 2) as i64;
        let dir = support::TempDir::new();
        let clean = dir.path.join("clean.ndjson");
        let clean = clean.to_str().ok_or("path")?;
        assert!(privcomm(&["export", "--database-url", &api.database_url, "--output", clean])?.status.success());
        assert!(privcomm(&["replay", "--database-url", &api.database_url])?.status.success(), "untouched log replays");

        let db = privcomm::projector::open_read_db(&api.database_url).await?;
        tamper(&db, how, at).await?;
        let named = format!("position {at}");
        let replay = privcomm(&["replay", "--database-url", &api.database_url])?;
        assert!(!replay.status.success(), "{how:?}: replay accepted a tampered log:\n{}", text(&replay));
        assert!(text(&replay).contains(&named), "{how:?}: replay must name {named}:\n{}", text(&replay));
        assert!(text(&replay).contains(says), "{how:?}: {}", text(&replay));
        // The same tampering in an export is found offline.
        let tampered = dir.path.join("tampered.ndjson");
        let tampered = tampered.to_str().ok_or("path")?;
        let export = privcomm(&["export", "--database-url", &api.database_url, "--output", tampered])?;
        assert!(export.status.success(), "{}", text(&export));
        let verify = privcomm(&["audit", "verify", tampered])?;
        assert!(!verify.status.success(), "{how:?}: audit verify accepted a tampered export");
        assert!(text(&verify).contains(&named), "{how:?}: audit verify must name {named}:\n{}", text(&verify));
        assert!(privcomm(&["audit", "verify", clean])?.status.success(), "the clean export still verifies");
        api.shutdown().await;
    }
    // Reordering two lines of an export.
    let api = TestApi::start(mode, generous_limits()).await?;
    let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    user(&api, &format!("+1580{suffix}"), 2).await?;
    let dir = support::TempDir::new();
    let file = dir.path.join("log.ndjson");
    let file = file.to_str().ok_or("path")?;
    assert!(privcomm(&["export", "--database-url", &api.database_url, "--output", file])?.status.success());
    let mut lines: Vec<String> = std::fs::read_to_string(file)?.lines().map(str::to_owned).collect();
    lines.swap(1, 2);
    std::fs::write(file, lines.join("\n") + "\n")?;
    let verify = privcomm(&["audit", "verify", file])?;
    assert!(!verify.status.success());
    assert!(text(&verify).contains("position 2"), "{}", text(&verify));
    api.shutdown().await;
    Ok(())
}

async fn retention_boundaries_are_exact_on_both_sides(mode: Mode) -> TestResult {
    let api = TestApi::start(mode, generous_limits()).await?;
    let projection = api.start_projector().await?;
    let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let bob = user(&api, &format!("+1590{suffix}"), 3).await?;
    let alice = user(&api, &format!("+1591{suffix}"), 0).await?;
    let alice_token = alice.client.login(&api).await?;
    assert_eq!(api.get_auth(&format!("/v1/keys/{}", bob.id), &alice_token).await?.0, 200);
    let mut ws = WsClient::connect(&api.ws_url(""), Some(&alice_token)).await?;
    assert_eq!(ws.frame().await?["type"], "queue_empty");
    ws.send_message(&message_id(9, 1), &bob.id, b"undelivered").await?;
    assert_eq!(ws.frame().await?["type"], "sent");
    ws.close().await;
    projection.caught_up(api.store.as_ref()).await?;

    let db = privcomm::projector::open_read_db(&api.database_url).await?;
    let retention = Retention::new(api.store.clone(), db, api.clock.clone(), RetentionPolicy::default());
    // One second short of 7 days: nothing to compact; one second past: compacted.
    api.clock.advance(7 * DAY_US - SECOND_US);
    assert_eq!(retention.compact_prekeys().await?, (0, 0), "7 days minus 1 s is kept");
    api.clock.advance(2 * SECOND_US);
    let (users, dropped) = retention.compact_prekeys().await?;
    assert_eq!((users, dropped), (1, 2), "7 days plus 1 s: bob's two uploads (one-time and Kyber) are dropped");
    projection.caught_up(api.store.as_ref()).await?;
    // Bob's bundle still has the unused keys: they were restated before the drop.
    let alice_token = alice.client.login(&api).await?;
    let (status, bundle) = api.get_auth(&format!("/v1/keys/{}", bob.id), &alice_token).await?;
    assert_eq!(status, 200, "{bundle}");
    assert!(bundle["one_time_prekey"].is_object(), "an unused one-time key survives compaction: {bundle}");

    // Accepted at t0: at 30 days minus 1 s it stays, at 30 days plus 1 s it expires.
    api.clock.advance(30 * DAY_US - 7 * DAY_US - 2 * SECOND_US);
    assert_eq!(retention.expire_undelivered().await?, 0, "30 days minus 1 s is kept");
    api.clock.advance(2 * SECOND_US);
    assert_eq!(retention.expire_undelivered().await?, 1, "30 days plus 1 s expires");
    assert_eq!(retention.expire_undelivered().await?, 0, "expired once");
    projection.caught_up(api.store.as_ref()).await?;
    // Ciphertext: kept for the grace period after expiry, then dropped.
    api.clock.advance(3600 * SECOND_US - SECOND_US);
    assert_eq!(retention.drop_settled_ciphertext().await?, 0, "grace minus 1 s keeps the ciphertext");
    api.clock.advance(2 * SECOND_US);
    assert_eq!(retention.drop_settled_ciphertext().await?, 1, "grace plus 1 s drops it");
    projection.caught_up(api.store.as_ref()).await?;
    assert_eq!(payloads_containing(&api, &b64(b"undelivered")).await?, 0);
    let run_now = privcomm(&["retention", "run-now", "--database-url", &api.database_url])?;
    assert!(run_now.status.success(), "{}", text(&run_now));
    assert!(text(&run_now).contains("0 messages expired"), "{}", text(&run_now));
    projection.stop().await;
    api.shutdown().await;
    Ok(())
}

async fn a_rewritten_history_between_two_signed_checkpoints_is_detected(mode: Mode) -> TestResult {
    use privcomm_domain::envelope::event_hash;
    use privcomm_projections::checkpoints::{CheckpointSigner, sign_head};
    let api = TestApi::start(mode, generous_limits()).await?;
    let signer = CheckpointSigner::from_hex_seed(&"5a".repeat(32))?;
    let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    user(&api, &format!("+1600{suffix}"), 1).await?;
    let first = sign_head(api.store.as_ref(), &api.read_db, &signer, api.clock.as_ref()).await?.ok_or("first")?;
    user(&api, &format!("+1601{suffix}"), 1).await?;
    user(&api, &format!("+1602{suffix}"), 1).await?;
    let second = sign_head(api.store.as_ref(), &api.read_db, &signer, api.clock.as_ref()).await?.ok_or("second")?;
    assert!(
        sign_head(api.store.as_ref(), &api.read_db, &signer, api.clock.as_ref()).await?.is_none(),
        "head already signed"
    );

    let dir = support::TempDir::new();
    let path = |name: &str| dir.path.join(name).display().to_string();
    let (log, checkpoints, key) = (path("log.ndjson"), path("checkpoints.ndjson"), signer.public_key_hex());
    let export = |out: &str| privcomm(&["export", "--database-url", &api.database_url, "--output", out]);
    assert!(export(&log)?.status.success());
    let fetched = privcomm(&["audit", "checkpoints", "--database-url", &api.database_url, "--output", &checkpoints])?;
    assert!(fetched.status.success(), "{}", text(&fetched));
    let verify = |file: &str, checkpoints: &str| {
        privcomm(&["audit", "verify", file, "--checkpoints", checkpoints, "--public-key", &key])
    };
    let clean = verify(&log, &checkpoints)?;
    assert!(clean.status.success(), "{}", text(&clean));
    assert!(text(&clean).contains("2 signed checkpoints matched"), "{}", text(&clean));

    // Rewrite a registration between the checkpoints, and re-chain everything after it so that
    // the log verifies on its own.
    let mut events = api.store.read_all(Position(0), 10_000).await?;
    let target = events
        .iter()
        .position(|e| e.position > first.position && e.event_type == "UserRegistered")
        .ok_or("a registration between the checkpoints")?;
    let payload = events[target].payload.clone().ok_or("payload")?;
    let text_payload = String::from_utf8(payload)?;
    let at = text_payload.find("\"phone_hash\":\"").ok_or("phone hash")? + "\"phone_hash\":\"".len();
    let flipped = if &text_payload[at..at + 1] == "0" { "1" } else { "0" };
    let forged = format!("{}{flipped}{}", &text_payload[..at], &text_payload[at + 1..]);
    events[target].payload = Some(forged.into_bytes());
    events[target].payload_hash = privcomm_domain::Hash::of(events[target].payload.as_deref().unwrap_or_default());
    let mut prev = if target == 0 { privcomm_domain::Hash::GENESIS } else { events[target - 1].hash };
    for event in &mut events[target..] {
        event.prev_hash = prev;
        event.hash = event_hash(&prev, &event.header(), &event.payload_hash);
        prev = event.hash;
    }
    let db = privcomm::projector::open_read_db(&api.database_url).await?;
    for event in &events[target..] {
        let sql = "UPDATE events SET payload = $1, payload_hash = $2, prev_hash = $3, hash = $4 WHERE position = $5";
        on_db!(&db, pool => {
            sqlx::query(sql)
                .bind(event.payload.as_deref())
                .bind(event.payload_hash.0.as_slice())
                .bind(event.prev_hash.0.as_slice())
                .bind(event.hash.0.as_slice())
                .bind(event.position.0 as i64)
                .execute(pool)
                .await
                .map(|_| ())?
        });
    }
    let rewritten = path("rewritten.ndjson");
    assert!(export(&rewritten)?.status.success());
    let alone = privcomm(&["audit", "verify", &rewritten])?;
    assert!(alone.status.success(), "the rewrite is self-consistent, so the chain alone cannot tell: {}", text(&alone));
    let caught = verify(&rewritten, &checkpoints)?;
    assert!(!caught.status.success(), "a rewritten history passed the signed checkpoints");
    let named = format!("position {}", second.position);
    assert!(text(&caught).contains(&named) && text(&caught).contains("rewritten"), "{}", text(&caught));

    // A checkpoint the server did not sign is refused, as is one signed by another key.
    let forged_checkpoints = path("forged.ndjson");
    let mut forged = second.clone();
    forged.hash = events.last().ok_or("events")?.hash;
    std::fs::write(&forged_checkpoints, serde_json::to_string(&forged)? + "\n")?;
    let refused = verify(&rewritten, &forged_checkpoints)?;
    assert!(!refused.status.success() && text(&refused).contains("signature"), "{}", text(&refused));
    let other = CheckpointSigner::from_hex_seed(&"6b".repeat(32))?;
    std::fs::write(
        &forged_checkpoints,
        serde_json::to_string(&other.sign(second.position, forged.hash, second.signed_at))? + "\n",
    )?;
    let refused = verify(&rewritten, &forged_checkpoints)?;
    assert!(!refused.status.success() && text(&refused).contains("not the pinned key"), "{}", text(&refused));
    api.shutdown().await;
    Ok(())
}

/// The SQL docs/OPERATING.md gives for rebuilding the read models in place.
fn documented_rebuild_sql() -> Result<String, String> {
    const OPERATING: &str = include_str!("../docs/OPERATING.md");
    let after = OPERATING.split("**Rebuilding the read models**").nth(1).ok_or("no rebuild section")?;
    let block = after.split("```sql\n").nth(1).ok_or("no sql block")?;
    Ok(block.split("```").next().ok_or("unterminated sql block")?.to_owned())
}

async fn the_documented_rebuild_of_read_models_in_place_rebuilds_them(mode: Mode) -> TestResult {
    let sql = documented_rebuild_sql()?;
    for model in models::all() {
        for table in model.tables() {
            assert!(sql.contains(&format!("DELETE FROM {};", table.name)), "the documented SQL misses {}", table.name);
        }
    }
    let api = TestApi::start(mode, generous_limits()).await?;
    let projection = api.start_projector().await?;
    let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let bob = user(&api, &format!("+1551{suffix}"), 10).await?;
    let alice = user(&api, &format!("+1552{suffix}"), 10).await?;
    let alice_token = alice.client.login(&api).await?;
    assert_eq!(api.get_auth(&format!("/v1/keys/{}", bob.id), &alice_token).await?.0, 200);
    send_many(&api, &alice, 0, &bob.id, 50).await?;
    projection.caught_up(api.store.as_ref()).await?;
    let db = privcomm::projector::open_read_db(&api.database_url).await?;
    assert_read_models_match_the_reference(api.store.as_ref(), &db).await?;
    projection.stop().await;

    // Stop the projector, run the documented SQL, start it again.
    on_db!(&db, pool => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone())).execute(pool).await.map(|_| ())?);
    for model in models::all() {
        for table in model.tables() {
            let count = format!("SELECT count(*) FROM {}", table.name);
            let rows: i64 = on_db!(&db, pool => sqlx::query_scalar(sqlx::AssertSqlSafe(count)).fetch_one(pool).await?);
            assert_eq!(rows, 0, "{} still holds rows", table.name);
        }
    }
    let projection = api.start_projector().await?;
    projection.caught_up(api.store.as_ref()).await?;
    assert_read_models_match_the_reference(api.store.as_ref(), &db).await?;
    let replay = privcomm(&["replay", "--database-url", &api.database_url])?;
    assert!(replay.status.success(), "replay after the rebuild failed:\n{}", text(&replay));
    projection.stop().await;
    api.shutdown().await;
    Ok(())
}
