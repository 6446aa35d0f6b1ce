//! The WebSocket relay on one node, embedded and on PostgreSQL + NATS:
//! authentication, delivery with acks, retries, backlog then live, takeover,
//! bad input, and offline push. Cross-node behaviour is in relay_cluster.rs.

#[macro_use]
mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::TestResult;
use support::api::{Client, Mode, TestApi, generous_limits};
use support::ws::{Received, WsClient};

in_both_modes!(
    a_connection_without_a_valid_token_is_closed_with_1008,
    messages_are_delivered_acked_and_redelivered_until_acked,
    a_retried_send_is_accepted_once_and_answered_alike,
    the_backlog_comes_first_in_order_then_queue_empty_then_live,
    a_second_connection_displaces_the_first_with_4409,
    bad_frames_get_error_frames_and_the_connection_stays,
    shutdown_closes_connections_with_1001_and_loses_nothing,
    ten_thousand_random_frames_over_a_live_socket_only_get_documented_answers,
    an_offline_recipient_with_a_push_token_is_told_it_has_mail_and_nothing_else,
);

struct Pair {
    api: TestApi,
    alice: (String, String),
    bob: (String, String),
}

async fn pair(mode: Mode) -> Result<Pair, Box<dyn std::error::Error + Send + Sync>> {
    let api = TestApi::start(mode, generous_limits()).await?;
    let mut alice = Client::new(&format!("+1555{}", rand_suffix()));
    let mut bob = Client::new(&format!("+1556{}", rand_suffix()));
    let alice_id = alice.register(&api, 0, 0).await?;
    let bob_id = bob.register(&api, 0, 0).await?;
    let alice_token = alice.login(&api).await?;
    let bob_token = bob.login(&api).await?;
    Ok(Pair { api, alice: (alice_id, alice_token), bob: (bob_id, bob_token) })
}

fn rand_suffix() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

fn message_id(n: usize) -> String {
    format!("0190b6c4-0000-7000-8000-{n:012}")
}

async fn connect(api: &TestApi, token: &str) -> Result<WsClient, Box<dyn std::error::Error + Send + Sync>> {
    WsClient::connect(&api.ws_url(""), Some(token)).await
}

async fn count_events(api: &TestApi, event_type: &str) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
    let events = api.store.read_all(privcomm_domain::Position(0), 100_000).await?;
    Ok(events.iter().filter(|e| e.event_type == event_type).count())
}

async fn a_connection_without_a_valid_token_is_closed_with_1008(mode: Mode) -> TestResult {
    let api = TestApi::start(mode, generous_limits()).await?;
    let mut none = WsClient::connect(&api.ws_url(""), None).await?;
    assert_eq!(none.next(Duration::from_secs(5)).await?, Received::Closed(1008));
    let mut forged = WsClient::connect(&api.ws_url("?token=not.a.token"), None).await?;
    assert_eq!(forged.next(Duration::from_secs(5)).await?, Received::Closed(1008));
    api.shutdown().await;
    Ok(())
}

async fn messages_are_delivered_acked_and_redelivered_until_acked(mode: Mode) -> TestResult {
    let Pair { api, alice, bob } = pair(mode).await?;
    let mut bob_ws = connect(&api, &bob.1).await?;
    assert_eq!(bob_ws.frame().await?["type"], "queue_empty");
    let mut alice_ws = WsClient::connect(&api.ws_url(&format!("?token={}", alice.1)), None).await?;
    assert_eq!(alice_ws.frame().await?["type"], "queue_empty");

    alice_ws.send_message(&message_id(1), &bob.0, b"ciphertext-1").await?;
    let sent = alice_ws.frame().await?;
    assert_eq!((sent["type"].as_str(), sent["id"].as_str()), (Some("sent"), Some(message_id(1).as_str())), "{sent}");
    let message = bob_ws.frame().await?;
    assert_eq!(message["type"], "message");
    assert_eq!(message["from"], json!(alice.0));
    assert_eq!(message["body"], json!(support::api::b64(b"ciphertext-1")));
    assert_eq!(message["server_ts"], sent["server_ts"]);

    // Not acked: the next connection gets it again, then queue_empty.
    drop(bob_ws);
    let mut bob_ws = connect(&api, &bob.1).await?;
    assert_eq!(bob_ws.frame().await?["id"], json!(message_id(1)));
    assert_eq!(bob_ws.frame().await?["type"], "queue_empty");
    bob_ws.ack(&message_id(1)).await?;
    bob_ws.ack(&message_id(1)).await?; // twice is harmless
    assert!(bob_ws.quiet(Duration::from_millis(300)).await, "an ack gets no reply");
    drop(bob_ws);
    let mut bob_ws = connect(&api, &bob.1).await?;
    assert_eq!(bob_ws.frame().await?["type"], "queue_empty", "an acked message is not delivered again");
    assert_eq!(count_events(&api, "MessageAccepted").await?, 1);
    assert_eq!(count_events(&api, "MessageDelivered").await?, 1);
    let ciphertext_in_log = api.store.read_all(privcomm_domain::Position(0), 1000).await?;
    assert!(
        ciphertext_in_log
            .iter()
            .all(|e| e.event_type != "MessageAccepted" || e.stream_id.as_str() == format!("mailbox-{}", bob.0))
    );
    api.shutdown().await;
    Ok(())
}

async fn a_retried_send_is_accepted_once_and_answered_alike(mode: Mode) -> TestResult {
    let Pair { api, alice, bob } = pair(mode).await?;
    let mut alice_ws = connect(&api, &alice.1).await?;
    assert_eq!(alice_ws.frame().await?["type"], "queue_empty");
    let mut answers = Vec::new();
    for _ in 0..3 {
        alice_ws.send_message(&message_id(7), &bob.0, b"same").await?;
        answers.push(alice_ws.frame().await?);
    }
    assert_eq!(answers[0]["type"], "sent");
    assert!(answers.iter().all(|a| *a == answers[0]), "three identical sent replies: {answers:?}");
    assert_eq!(count_events(&api, "MessageAccepted").await?, 1);
    let mut bob_ws = connect(&api, &bob.1).await?;
    assert_eq!(bob_ws.frame().await?["id"], json!(message_id(7)));
    assert_eq!(bob_ws.frame().await?["type"], "queue_empty");
    assert!(bob_ws.quiet(Duration::from_millis(300)).await, "delivered once");
    api.shutdown().await;
    Ok(())
}

async fn the_backlog_comes_first_in_order_then_queue_empty_then_live(mode: Mode) -> TestResult {
    const HALF: usize = 500;
    let Pair { api, alice, bob } = pair(mode).await?;
    let mut alice_ws = connect(&api, &alice.1).await?;
    assert_eq!(alice_ws.frame().await?["type"], "queue_empty");
    for n in 0..HALF {
        alice_ws.send_message(&message_id(n), &bob.0, format!("m{n}").as_bytes()).await?;
    }
    for _ in 0..HALF {
        assert_eq!(alice_ws.frame().await?["type"], "sent");
    }
    let mut bob_ws = connect(&api, &bob.1).await?;
    let mut received: Vec<Value> = vec![bob_ws.frame().await?]; // the backlog has begun: live starts now
    let live = tokio::spawn(async move {
        for n in HALF..2 * HALF {
            alice_ws.send_message(&message_id(n), &bob.0, format!("m{n}").as_bytes()).await?;
        }
        for _ in HALF..2 * HALF {
            let answer = alice_ws.frame().await?;
            if answer["type"] != "sent" {
                return Err(format!("expected sent, got {answer}").into());
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    while received.iter().filter(|f| f["type"] == "message").count() < 2 * HALF {
        let last = received.last().cloned().unwrap_or(Value::Null);
        if last["type"] == "message" {
            bob_ws.ack(last["id"].as_str().ok_or("id")?).await?;
        }
        received.push(bob_ws.frame().await?);
    }
    live.await??;
    let order: Vec<String> = received
        .iter()
        .map(|f| {
            if f["type"] == "queue_empty" {
                "queue_empty".to_owned()
            } else {
                f["id"].as_str().unwrap_or("?").to_owned()
            }
        })
        .collect();
    let mut expected: Vec<String> = (0..HALF).map(message_id).collect();
    expected.push("queue_empty".into());
    expected.extend((HALF..2 * HALF).map(message_id));
    assert_eq!(order.len(), expected.len());
    assert!(order == expected, "not backlog, queue_empty, live in log order");
    api.shutdown().await;
    Ok(())
}

async fn a_second_connection_displaces_the_first_with_4409(mode: Mode) -> TestResult {
    let Pair { api, alice, bob } = pair(mode).await?;
    let mut first = connect(&api, &bob.1).await?;
    assert_eq!(first.frame().await?["type"], "queue_empty");
    let mut second = connect(&api, &bob.1).await?;
    assert_eq!(second.frame().await?["type"], "queue_empty");
    assert_eq!(first.next(Duration::from_secs(5)).await?, Received::Closed(4409));
    let mut alice_ws = connect(&api, &alice.1).await?;
    assert_eq!(alice_ws.frame().await?["type"], "queue_empty");
    alice_ws.send_message(&message_id(9), &bob.0, b"to the new one").await?;
    assert_eq!(second.frame().await?["id"], json!(message_id(9)));
    api.shutdown().await;
    Ok(())
}

async fn bad_frames_get_error_frames_and_the_connection_stays(mode: Mode) -> TestResult {
    let Pair { api, alice, bob } = pair(mode).await?;
    let mut bob_ws = connect(&api, &bob.1).await?;
    assert_eq!(bob_ws.frame().await?["type"], "queue_empty");
    let mut ws = connect(&api, &alice.1).await?;
    assert_eq!(ws.frame().await?["type"], "queue_empty");
    let head = api.store.head().await?;
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "malformed_json"),
        (r#"{"v":1,"type":"send","id":42}"#.into(), "invalid_frame"),
        (r#"{"v":9,"type":"ack","id":"x"}"#.into(), "unsupported_version"),
        (
            json!({"v":1,"type":"send","id":message_id(1),"to":uuid::Uuid::now_v7(),"kind":"whisper","body":"aGk="})
                .to_string(),
            "unknown_recipient",
        ),
        (json!({"v":1,"type":"ack","id":message_id(99)}).to_string(), "unknown_message"),
    ];
    for (text, code) in cases {
        ws.send_text(&text).await?;
        let answer = ws.frame().await?;
        assert_eq!(
            (answer["type"].as_str(), answer["code"].as_str()),
            (Some("error"), Some(code)),
            "{text} → {answer}"
        );
    }
    ws.send_binary(vec![0xff, 0x00, 0x13]).await?;
    assert_eq!(ws.frame().await?["code"], "invalid_frame");
    assert_eq!(api.store.head().await?, head, "refused frames store nothing");
    // Still serving: a valid send goes through.
    ws.send_message(&message_id(2), &bob.0, b"after the junk").await?;
    assert_eq!(ws.frame().await?["type"], "sent");
    assert_eq!(bob_ws.frame().await?["id"], json!(message_id(2)));
    // An oversize frame closes with 1009; the other connection is unaffected.
    // The relay refuses the frame from its header, before reading the body,
    // so the client may still be writing when the socket closes: the write
    // then fails with a reset instead of reading the close frame. When the
    // write completes, the close code must be 1009.
    if ws.send_text(&"x".repeat(600 * 1024)).await.is_ok() {
        assert_eq!(ws.next(Duration::from_secs(5)).await?, Received::Closed(1009));
    }
    bob_ws.ack(&message_id(2)).await?;
    let mut alice_again = connect(&api, &alice.1).await?;
    assert_eq!(alice_again.frame().await?["type"], "queue_empty");
    alice_again.send_message(&message_id(3), &bob.0, b"still here").await?;
    assert_eq!(bob_ws.frame().await?["id"], json!(message_id(3)));
    api.shutdown().await;
    Ok(())
}

async fn shutdown_closes_connections_with_1001_and_loses_nothing(mode: Mode) -> TestResult {
    let Pair { api, alice, bob } = pair(mode).await?;
    let mut bob_ws = connect(&api, &bob.1).await?;
    assert_eq!(bob_ws.frame().await?["type"], "queue_empty");
    let mut alice_ws = connect(&api, &alice.1).await?;
    assert_eq!(alice_ws.frame().await?["type"], "queue_empty");
    alice_ws.send_message(&message_id(1), &bob.0, b"before shutdown").await?;
    assert_eq!(alice_ws.frame().await?["type"], "sent");
    assert_eq!(bob_ws.frame().await?["id"], json!(message_id(1))); // received, not acked
    let store = api.store.clone();
    api.close_connections();
    assert_eq!(bob_ws.next(Duration::from_secs(5)).await?, Received::Closed(1001));
    assert_eq!(alice_ws.next(Duration::from_secs(5)).await?, Received::Closed(1001));
    // The unacked message is still pending for the next connection (any node).
    let events = store.read_all(privcomm_domain::Position(0), 1000).await?;
    assert_eq!(events.iter().filter(|e| e.event_type == "MessageDelivered").count(), 0);
    assert_eq!(events.iter().filter(|e| e.event_type == "MessageAccepted").count(), 1);
    api.shutdown().await;
    Ok(())
}

/// Random text frames: lossy bytes, shuffled JSON fragments, and valid frames
/// with random edits. Seeded, so a failure reproduces.
fn random_frames(count: usize, to: &str) -> Vec<String> {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(0xfa11_0ff4_a3e5);
    let valid = [
        json!({"v":1,"type":"send","id":message_id(5),"to":to,"kind":"whisper","body":"aGk="}).to_string(),
        json!({"v":1,"type":"ack","id":message_id(5)}).to_string(),
    ];
    let fragments = [
        "{",
        "}",
        "[",
        "]",
        "\"v\":1",
        "\"type\":",
        "\"send\"",
        "\"ack\"",
        ",",
        ":",
        "\"id\"",
        "null",
        "1e999",
        "\"\\u0000\"",
    ];
    (0..count)
        .map(|n| match n % 3 {
            0 => {
                String::from_utf8_lossy(&(0..rng.random_range(0..120)).map(|_| rng.random::<u8>()).collect::<Vec<_>>())
                    .into_owned()
            }
            1 => (0..rng.random_range(1..12)).map(|_| fragments[rng.random_range(0..fragments.len())]).collect(),
            _ => {
                let mut chars: Vec<char> = valid[n % 2].chars().collect();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..chars.len());
                    chars[at] = char::from(rng.random_range(b' '..=b'~'));
                }
                chars.into_iter().collect()
            }
        })
        .collect()
}

async fn ten_thousand_random_frames_over_a_live_socket_only_get_documented_answers(mode: Mode) -> TestResult {
    let Pair { api, alice, bob } = pair(mode).await?;
    let mut bob_ws = connect(&api, &bob.1).await?;
    assert_eq!(bob_ws.frame().await?["type"], "queue_empty");
    let codes = privcomm_relay::frames::codes::ALL;
    let (mut errors, mut sent, mut reconnects, mut errors_here) = (0, 0, 0, 0);
    let mut ws = connect(&api, &alice.1).await?;
    assert_eq!(ws.frame().await?["type"], "queue_empty");
    for text in random_frames(10_000, &bob.0) {
        ws.send_text(&text).await?;
        match ws.next(Duration::from_secs(10)).await? {
            Received::Frame(frame) if frame["type"] == "error" => {
                let code = frame["code"].as_str().unwrap_or("");
                assert!(codes.contains(&code), "undocumented code {code} for {text:?}");
                errors += 1;
                errors_here += 1;
            }
            Received::Frame(frame) if frame["type"] == "sent" => sent += 1,
            other => return Err(format!("unexpected answer {other:?} to {text:?}").into()),
        }
        if errors_here == privcomm_relay::connection::MAX_ERRORS {
            // Repeated abuse: the documented 1008. Come back and go on.
            assert_eq!(ws.next(Duration::from_secs(10)).await?, Received::Closed(1008));
            reconnects += 1;
            errors_here = 0;
            ws = connect(&api, &alice.1).await?;
            assert_eq!(ws.frame().await?["type"], "queue_empty");
        }
    }
    assert!(errors > 9_000 && reconnects > 0, "errors {errors}, sent {sent}, reconnects {reconnects}");
    // The node kept serving: bob still receives what alice sends.
    let mut alice_ws = connect(&api, &alice.1).await?;
    assert_eq!(alice_ws.frame().await?["type"], "queue_empty");
    alice_ws.send_message(&message_id(10_001), &bob.0, b"still serving").await?;
    loop {
        let frame = bob_ws.frame().await?;
        if frame["id"] == json!(message_id(10_001)) {
            break;
        }
        bob_ws.ack(frame["id"].as_str().ok_or("id")?).await?; // fuzzed frames that happened to be valid sends
    }
    api.shutdown().await;
    Ok(())
}

async fn an_offline_recipient_with_a_push_token_is_told_it_has_mail_and_nothing_else(mode: Mode) -> TestResult {
    let Pair { api, alice, bob } = pair(mode).await?;
    let mut pushes = api.push_requests().await?;
    let mut alice_ws = connect(&api, &alice.1).await?;
    assert_eq!(alice_ws.frame().await?["type"], "queue_empty");
    // Offline without a token: nothing to push to.
    alice_ws.send_message(&message_id(1), &bob.0, b"one").await?;
    assert_eq!(alice_ws.frame().await?["type"], "sent");
    let token = json!({ "platform": "fcm", "token": "bob-device-token" });
    assert_eq!(api.put_auth("/v1/push-token", &bob.1, &token).await?.0, 204);
    // Offline with a token: one request, with no sender, id or content in it.
    alice_ws.send_message(&message_id(2), &bob.0, b"two").await?;
    assert_eq!(alice_ws.frame().await?["type"], "sent");
    let push = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut pushes)).await?;
    assert_eq!(push, Some(json!({ "v": 1, "type": "mail", "platform": "fcm", "token": "bob-device-token" })));
    // A retry is not a new message: no second push.
    alice_ws.send_message(&message_id(2), &bob.0, b"two").await?;
    assert_eq!(alice_ws.frame().await?["type"], "sent");
    // Online: delivered over the socket, no push.
    let mut bob_ws = connect(&api, &bob.1).await?;
    for n in [1, 2] {
        assert_eq!(bob_ws.frame().await?["id"], json!(message_id(n)));
    }
    assert_eq!(bob_ws.frame().await?["type"], "queue_empty");
    alice_ws.send_message(&message_id(3), &bob.0, b"three").await?;
    assert_eq!(bob_ws.frame().await?["id"], json!(message_id(3)));
    let more = tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut pushes)).await;
    assert!(more.is_err(), "unexpected push: {more:?}");
    api.shutdown().await;
    Ok(())
}
