//! Two `privcomm serve` processes sharing PostgreSQL and NATS JetStream:
//! cross-node delivery, cluster-wide takeover, and the loss of a node.

mod support;

use futures::StreamExt as _;
use privcomm::keygen::KeyedUser;
use serde_json::json;
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;
use support::node::{Server, privcomm, start_server};
use support::ws::{Received, WsClient};
use support::{TempDir, TestDatabase, TestResult};

struct Cluster {
    a: Server,
    b: Server,
    db: Option<TestDatabase>,
    stream: String,
    _dir: TempDir,
}

impl Cluster {
    async fn start() -> Result<Cluster, Box<dyn std::error::Error + Send + Sync>> {
        let dir = TempDir::new();
        let db = TestDatabase::migrated().await?;
        let stream = format!("PC_TEST_CLUSTER_{}", uuid::Uuid::now_v7().simple());
        let node = |url: &str| {
            let mut command: Command = privcomm(&dir);
            command
                .env("DATABASE_URL", url)
                .env("NATS_URL", support::nats_url())
                .env("NATS_STREAM", &stream)
                .env("SECRET_KEY", "cluster-test-secret-key-0123456789abcdef")
                .env("RATE_LIMIT_REGISTRATION", "100000/1s")
                .env("RATE_LIMIT_TOKEN", "100000/1s")
                .env("RATE_LIMIT_KEY_BUNDLE", "100000/1s");
            command
        };
        let a = start_server(node(&db.url))?;
        let b = start_server(node(&db.url))?;
        Ok(Cluster { a, b, db: Some(db), stream, _dir: dir })
    }

    fn ws(server: &Server) -> String {
        format!("ws://{}/v1/websocket", server.address)
    }

    async fn stop(mut self) {
        let _ = self.a.child.kill();
        let _ = self.b.child.kill();
        if let Ok(client) = async_nats::connect(support::nats_url()).await {
            let _ = async_nats::jetstream::new(client).delete_stream(&self.stream).await;
        }
        if let Some(db) = self.db.take() {
            db.drop_database().await;
        }
    }
}

/// Registers a user through `server` and logs in; returns (user id, token).
async fn user(server: &Server, phone: &str) -> Result<(String, String), Box<dyn std::error::Error + Send + Sync>> {
    let (base, http, keys) = (format!("http://{}", server.address), reqwest::Client::new(), KeyedUser::new(phone));
    keys.register(&http, &base, 5).await?;
    Ok((keys.user_id(), keys.login(&http, &base).await?))
}

fn message_id(n: usize) -> String {
    format!("0190b6c4-0000-7000-8000-{n:012}")
}

async fn connected(url: &str, token: &str) -> Result<WsClient, Box<dyn std::error::Error + Send + Sync>> {
    let mut ws = WsClient::connect(url, Some(token)).await?;
    let first = ws.frame().await?;
    if first["type"] != "queue_empty" {
        return Err(format!("expected queue_empty first, got {first}").into());
    }
    Ok(ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_messages_cross_nodes_once_and_in_order() -> TestResult {
    let cluster = Cluster::start().await?;
    let (_, alice_token) = user(&cluster.a, "+15552000001").await?;
    let (bob, bob_token) = user(&cluster.a, "+15552000002").await?;
    let mut alice_ws = connected(&Cluster::ws(&cluster.a), &alice_token).await?;
    let mut bob_ws = connected(&Cluster::ws(&cluster.b), &bob_token).await?;
    let sender = tokio::spawn(async move {
        for n in 0..1000 {
            alice_ws.send_message(&message_id(n), &bob, format!("m{n}").as_bytes()).await?;
        }
        for _ in 0..1000 {
            let answer = alice_ws.frame().await?;
            if answer["type"] != "sent" {
                return Err(format!("expected sent, got {answer}").into());
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    let mut received = Vec::new();
    while received.len() < 1000 {
        let frame = bob_ws.frame().await?;
        let id = frame["id"].as_str().ok_or_else(|| format!("expected a message, got {frame}"))?.to_owned();
        bob_ws.ack(&id).await?;
        received.push(id);
    }
    sender.await??;
    assert!(bob_ws.quiet(Duration::from_millis(500)).await, "more than 1,000 messages arrived");
    let expected: Vec<String> = (0..1000).map(message_id).collect();
    assert!(received == expected, "messages arrived out of order or not once each");
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_on_another_node_displaces_the_first_with_4409() -> TestResult {
    let cluster = Cluster::start().await?;
    let (_, alice_token) = user(&cluster.a, "+15552000003").await?;
    let (bob, bob_token) = user(&cluster.a, "+15552000004").await?;
    let mut on_a = connected(&Cluster::ws(&cluster.a), &bob_token).await?;
    let mut on_b = connected(&Cluster::ws(&cluster.b), &bob_token).await?;
    assert_eq!(on_a.next(Duration::from_secs(5)).await?, Received::Closed(4409));
    let mut alice_ws = connected(&Cluster::ws(&cluster.a), &alice_token).await?;
    alice_ws.send_message(&message_id(1), &bob, b"to B only").await?;
    assert_eq!(on_b.frame().await?["id"], json!(message_id(1)));
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_node_dies_every_message_still_arrives_exactly_once_at_the_app() -> TestResult {
    const TOTAL: usize = 200;
    let mut cluster = Cluster::start().await?;
    let (_, alice_token) = user(&cluster.a, "+15552000005").await?;
    let (bob, bob_token) = user(&cluster.a, "+15552000006").await?;
    let mut alice_ws = connected(&Cluster::ws(&cluster.a), &alice_token).await?;
    let mut bob_ws = connected(&Cluster::ws(&cluster.b), &bob_token).await?;
    for n in 0..TOTAL {
        alice_ws.send_message(&message_id(n), &bob, b"in flight").await?;
    }
    // The app layer: de-duplicate by id, ack what it stored.
    let mut stored = HashSet::new();
    while stored.len() < 50 {
        let frame = bob_ws.frame().await?;
        let id = frame["id"].as_str().ok_or("id")?.to_owned();
        bob_ws.ack(&id).await?;
        stored.insert(id);
    }
    cluster.b.child.kill()?; // SIGKILL: no goodbye, acks in flight may be lost
    cluster.b.child.wait()?;
    for _ in 0..TOTAL {
        assert_eq!(alice_ws.frame().await?["type"], "sent");
    }
    let mut bob_ws = WsClient::connect(&Cluster::ws(&cluster.a), Some(&bob_token)).await?;
    let mut deliveries = 0;
    while stored.len() < TOTAL {
        let frame = bob_ws.frame().await?;
        if frame["type"] == "queue_empty" {
            continue;
        }
        let id = frame["id"].as_str().ok_or_else(|| format!("expected a message, got {frame}"))?.to_owned();
        deliveries += 1;
        bob_ws.ack(&id).await?;
        stored.insert(id);
    }
    // What still arrives is the end of the backlog (queue_empty) or a
    // redelivery of something already stored, which the app drops by id.
    while let Ok(Received::Frame(frame)) = bob_ws.next(Duration::from_millis(500)).await {
        let redelivered = frame["id"].as_str().is_some_and(|id| stored.contains(id));
        assert!(frame["type"] == "queue_empty" || redelivered, "unexpected frame after all {TOTAL}: {frame}");
    }
    let expected: HashSet<String> = (0..TOTAL).map(message_id).collect();
    assert_eq!(stored, expected, "every message exactly once at the app layer");
    assert!(deliveries >= TOTAL - 50, "node A must deliver what B did not get acked");
    cluster.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recipient_online_on_another_node_gets_no_push_and_one_once_it_leaves() -> TestResult {
    let cluster = Cluster::start().await?;
    let (_, alice_token) = user(&cluster.a, "+15552000007").await?;
    let (bob, bob_token) = user(&cluster.a, "+15552000008").await?;
    let http = reqwest::Client::new();
    let status = http
        .put(format!("http://{}/v1/push-token", cluster.b.address))
        .bearer_auth(&bob_token)
        .json(&json!({ "platform": "apns", "token": "bob-phone" }))
        .send()
        .await?
        .status();
    assert_eq!(status, 204);
    let nats = async_nats::connect(support::nats_url()).await?;
    let mut pushes = nats.subscribe(format!("privcomm.push.{}.apns", cluster.stream)).await?;
    nats.flush().await?;
    let mut alice_ws = connected(&Cluster::ws(&cluster.a), &alice_token).await?;
    let mut bob_ws = connected(&Cluster::ws(&cluster.b), &bob_token).await?;
    // Node A hears from B's presence signal that Bob is online there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice_ws.send_message(&message_id(100), &bob, b"while online on B").await?;
    assert_eq!(alice_ws.frame().await?["type"], "sent");
    assert_eq!(bob_ws.frame().await?["id"], json!(message_id(100)));
    let early = tokio::time::timeout(Duration::from_millis(700), pushes.next()).await;
    assert!(early.is_err(), "a push for a recipient online on another node: {early:?}");
    bob_ws.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice_ws.send_message(&message_id(101), &bob, b"while away").await?;
    assert_eq!(alice_ws.frame().await?["type"], "sent");
    let push = tokio::time::timeout(Duration::from_secs(5), pushes.next()).await?.ok_or("subscription ended")?;
    let push: serde_json::Value = serde_json::from_slice(&push.payload)?;
    assert_eq!(push, json!({ "v": 1, "type": "mail", "platform": "apns", "token": "bob-phone" }));
    cluster.stop().await;
    Ok(())
}

/// Waits up to `within` for a log line of `server` containing `text`.
fn logged(server: &Server, text: &str, within: Duration) -> bool {
    if server.early.iter().any(|line| line.contains(text)) {
        return true;
    }
    let deadline = std::time::Instant::now() + within;
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match server.logs.recv_timeout(left) {
            Ok(line) if line.contains(text) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_publishes_the_outbox_and_another_takes_over_when_it_dies() -> TestResult {
    const LEADS: &str = "this node runs the outbox";
    let mut cluster = Cluster::start().await?;
    let (a_leads, b_leads) =
        (logged(&cluster.a, LEADS, Duration::from_secs(10)), logged(&cluster.b, LEADS, Duration::from_secs(1)));
    assert!(a_leads != b_leads, "exactly one node must publish (a: {a_leads}, b: {b_leads})");
    let (leader, survivor) = if a_leads { (&mut cluster.a, &cluster.b) } else { (&mut cluster.b, &cluster.a) };
    leader.child.kill()?;
    leader.child.wait()?;
    assert!(logged(survivor, LEADS, Duration::from_secs(10)), "the surviving node never took over the outbox");
    // New events reach the bus through the survivor.
    let (_, _) = user(survivor, "+15552000009").await?;
    let db = cluster.db.as_ref().ok_or("database")?;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let head: i64 = sqlx::query_scalar("SELECT position FROM event_log_head").fetch_one(&pool).await?;
    let jetstream = async_nats::jetstream::new(async_nats::connect(support::nats_url()).await?);
    let mut published = 0;
    for _ in 0..100 {
        published = jetstream.get_stream(&cluster.stream).await?.info().await?.state.last_sequence;
        if published >= head as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(published, head as u64, "the bus must hold the whole log");
    pool.close().await;
    cluster.stop().await;
    Ok(())
}
