//! The client crate (`android/`, `privcomm-client`) against a real
//! `privcomm serve` process, embedded (SQLite) and cluster (PostgreSQL +
//! NATS): real libsignal sessions (PQXDH), the encrypted local store, the
//! reconnecting connection and prekey maintenance.

#[macro_use]
mod support;

use privcomm_client::{ClientError, ConnectionState};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::api::Mode;
use support::client::{Error, Event, RecordedPauses, TestClient, TestServer, phone, store_key};
use support::{TempDir, TestResult};

in_both_modes!(
    two_clients_exchange_a_hundred_messages_both_ways_and_the_server_holds_only_ciphertext,
    a_reopened_client_continues_without_a_new_session,
    the_client_backs_off_gives_up_after_ten_attempts_and_sends_its_queue_when_back,
    prekeys_are_refilled_and_a_session_after_exhaustion_uses_the_last_resort_key,
    a_changed_identity_is_reported_and_its_messages_held_until_trusted,
    a_client_displaced_by_another_connection_of_its_account_stops_instead_of_fighting,
    a_registration_whose_answer_was_lost_is_finished_by_the_next_attempt,
    a_burst_whose_commit_fails_is_neither_shown_nor_acked_until_a_commit_succeeds,
);

async fn two_clients_exchange_a_hundred_messages_both_ways_and_the_server_holds_only_ciphertext(
    mode: Mode,
) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let mut alice = TestClient::open(&dir, "alice", store_key(1), &server.url()).await?;
    let mut bob = TestClient::open(&dir, "bob", store_key(2), &server.url()).await?;
    let alice_id = alice.register(&phone("1")).await?;
    let bob_id = bob.register(&phone("2")).await?;
    alice.connected().await?;
    bob.connected().await?;
    let text = |from: &str, n: usize| format!("plaintext {from} #{n:03} {}", uuid::Uuid::now_v7().simple());
    let (mut to_bob, mut to_alice) = (Vec::new(), Vec::new());
    for n in 0..100 {
        let (a, b) = (text("alice", n), text("bob", n));
        alice.send(&bob_id, &a).await?;
        bob.send(&alice_id, &b).await?;
        to_bob.push(a);
        to_alice.push(b);
    }
    let at_bob = bob.receive(100).await?;
    let at_alice = alice.receive(100).await?;
    assert_eq!(at_bob.iter().map(|m| m.text.clone()).collect::<Vec<_>>(), to_bob, "bob's messages");
    assert_eq!(at_alice.iter().map(|m| m.text.clone()).collect::<Vec<_>>(), to_alice, "alice's messages");
    assert!(at_bob.iter().all(|m| m.peer == alice_id && !m.outgoing));
    // Both logs hold the whole conversation.
    let log = alice.call(|c| c.messages()).await?;
    assert_eq!(log.len(), 200);
    assert_eq!(log.iter().filter(|m| m.outgoing).count(), 100);
    // The server never held a plaintext (the search does find what it stores: the sender's id).
    assert!(server.holds(alice_id.as_bytes()).await?, "the byte search finds nothing at all");
    for plain in to_bob.iter().chain(&to_alice).step_by(7) {
        assert!(!server.holds(plain.as_bytes()).await?, "the server stored a plaintext: {plain}");
    }
    assert!(server.events().await? > 400, "the messages were not stored as events at all");
    // The safety numbers agree on both sides.
    let (b, a) = (bob_id.clone(), alice_id.clone());
    let (at_a, at_b) = (alice.call(move |c| c.safety_number(b)).await?, bob.call(move |c| c.safety_number(a)).await?);
    assert_eq!(at_a, at_b);
    assert_eq!(at_a.len(), 60);
    alice.close().await;
    bob.close().await;
    server.cleanup().await;
    Ok(())
}

async fn a_reopened_client_continues_without_a_new_session(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let mut alice = TestClient::open(&dir, "alice", store_key(3), &server.url()).await?;
    let mut bob = TestClient::open(&dir, "bob", store_key(4), &server.url()).await?;
    let alice_id = alice.register(&phone("3")).await?;
    let bob_id = bob.register(&phone("4")).await?;
    alice.connected().await?;
    bob.connected().await?;
    alice.send(&bob_id, "before the restart").await?;
    assert_eq!(bob.receive(1).await?[0].text, "before the restart");
    bob.send(&alice_id, "reply before").await?;
    assert_eq!(alice.receive(1).await?[0].text, "reply before");
    let bob_keys = bundles_claimed(&server, &bob_id).await?;

    // Close A mid-conversation: B writes while A is away.
    let config = alice.config.clone();
    alice.close().await;
    bob.send(&alice_id, "while you were away").await?;
    let mut alice = TestClient::open(&dir, "alice", config.store_key.clone(), &config.server_url).await?;
    assert_eq!(alice.call(|c| c.user_id()).await?, Some(alice_id.clone()));
    alice.connected().await?;
    assert_eq!(alice.receive(1).await?[0].text, "while you were away");
    alice.send(&bob_id, "after the restart").await?;
    assert_eq!(bob.receive(1).await?[0].text, "after the restart");
    // No new session: no bundle of bob was fetched (his one-time keys are untouched).
    assert_eq!(bundles_claimed(&server, &bob_id).await?, bob_keys, "a new session was set up");
    let log = alice.call(|c| c.messages()).await?;
    let texts: Vec<&str> = log.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["before the restart", "reply before", "while you were away", "after the restart"]);

    // A wrong store key: a clear error; the store is intact and opens with the right key.
    alice.close().await;
    let before = std::fs::read(&config.store_path)?;
    let wrong = TestClient::open(&dir, "alice", store_key(99), &config.server_url).await;
    assert!(matches!(wrong, Err(ClientError::WrongStoreKey(_))), "{:?}", wrong.err());
    assert_eq!(std::fs::read(&config.store_path)?, before, "a wrong key changed the store");
    let alice = TestClient::open(&dir, "alice", config.store_key.clone(), &config.server_url).await?;
    assert_eq!(alice.call(|c| c.messages()).await?.len(), 4);
    alice.close().await;
    bob.close().await;
    server.cleanup().await;
    Ok(())
}

/// How many bundles of `user` were handed out (from the server's log).
async fn bundles_claimed(server: &TestServer, user: &str) -> Result<i64, Error> {
    let db = privcomm::projector::open_read_db(&server.database_url()).await?;
    let uploads = "SELECT count(*) FROM events WHERE stream_id = $1 AND event_type = 'PreKeyClaimed'";
    let stream = format!("user-{user}");
    let claimed: i64 =
        privcomm_projections::on_db!(&db, pool => sqlx::query_scalar(uploads).bind(&stream).fetch_one(pool).await?);
    Ok(claimed)
}

async fn the_client_backs_off_gives_up_after_ten_attempts_and_sends_its_queue_when_back(mode: Mode) -> TestResult {
    let mut server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let pauses = Arc::new(RecordedPauses::default());
    let mut alice = TestClient::open_with(&dir, "alice", store_key(5), &server.url(), Some(pauses.clone())).await?;
    let mut bob = TestClient::open(&dir, "bob", store_key(6), &server.url()).await?;
    let _alice_id = alice.register(&phone("5")).await?;
    let bob_id = bob.register(&phone("6")).await?;
    alice.connected().await?;
    alice.send(&bob_id, "a session first").await?;
    alice.next(|e| matches!(e, Event::Sent(_))).await?;

    // The server goes away: A walks the schedule and gives up.
    server.stop();
    let gave_up = alice.next(|e| matches!(e, Event::State(ConnectionState::Error, _))).await?;
    assert!(matches!(&gave_up, Event::State(_, detail) if detail.contains("10 attempts")), "{gave_up:?}");
    assert_eq!(alice.call(|c| c.state()).await, ConnectionState::Error);
    let waits = pauses.0.lock().map_err(|_| "pauses")?.clone();
    assert_eq!(waits.iter().map(|(n, _)| *n).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>(), "{waits:?}");
    for (failures, delay) in &waits {
        let step = Duration::from_secs([1, 2, 4, 8, 16, 32, 60, 60, 60][(*failures - 1) as usize]);
        assert!(*delay >= step / 2 && *delay <= step, "wait {failures}: {delay:?} outside [{:?}, {step:?}]", step / 2);
    }
    // Sent while offline: queued.
    let queued = [alice.send(&bob_id, "queued 1").await?, alice.send(&bob_id, "queued 2").await?];

    // The server is back; connect() again delivers the queue.
    server.restart()?;
    alice.connected().await?;
    for id in &queued {
        let sent = alice.next(|e| matches!(e, Event::Sent(_))).await?;
        assert!(matches!(&sent, Event::Sent(s) if queued.contains(s)), "{sent:?} {id}");
    }
    bob.connected().await?;
    let texts: Vec<String> = bob.receive(3).await?.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["a session first", "queued 1", "queued 2"]);
    alice.close().await;
    bob.close().await;
    server.cleanup().await;
    Ok(())
}

async fn prekeys_are_refilled_and_a_session_after_exhaustion_uses_the_last_resort_key(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let alice = TestClient::open(&dir, "alice", store_key(7), &server.url()).await?;
    let alice_id = alice.register(&phone("7")).await?;
    // 85 bundle fetches by somebody else.
    let http = reqwest::Client::new();
    let other = privcomm::keygen::KeyedUser::new(&phone("8"));
    other.register(&http, &server.url(), 8).await?;
    let token = other.login(&http, &server.url()).await?;
    let fetch = |n: usize| {
        let (http, token, url) = (http.clone(), token.clone(), format!("{}/v1/keys/{alice_id}", server.url()));
        async move {
            for _ in 0..n {
                let response = http.get(&url).bearer_auth(&token).send().await?;
                if response.status() != 200 {
                    return Err::<(), Error>(format!("bundle fetch answered {}", response.status()).into());
                }
            }
            Ok(())
        }
    };
    fetch(85).await?;
    let report = alice.call(|c| c.maintain_prekeys()).await?;
    assert_eq!((report.one_time_before, report.kyber_before), (15, 15), "{report:?}");
    assert_eq!((report.one_time_uploaded, report.kyber_uploaded), (100, 100), "{report:?}");
    assert!(!report.signed_prekey_rotated, "a fresh signed prekey was rotated");
    let again = alice.call(|c| c.maintain_prekeys()).await?;
    assert_eq!((again.one_time_before, again.kyber_before), (115, 115), "{again:?}");
    assert_eq!((again.one_time_uploaded, again.kyber_uploaded), (0, 0), "nothing to do the second time");

    // Dave sets up a session now and sends while offline; alice's signed
    // prekey then turns 8 days old and is rotated; dave's late first message
    // still decrypts (the previous signed prekey is kept).
    let mut dave = TestClient::open(&dir, "dave", store_key(12), &server.url()).await?;
    dave.register(&phone("12")).await?;
    dave.send(&alice_id, "sealed to the old signed prekey").await?;
    let eight_days_on = privcomm_client::signal::now_ms() + 8 * 24 * 3600 * 1000;
    let rotated = alice.call(move |c| c.maintain_prekeys_at(eight_days_on)).await?;
    assert!(rotated.signed_prekey_rotated, "{rotated:?}");
    let bundle: serde_json::Value =
        http.get(format!("{}/v1/keys/{alice_id}", server.url())).bearer_auth(&token).send().await?.json().await?;
    assert_eq!(bundle["signed_prekey"]["id"], 2, "the server hands out the new signed prekey: {bundle}");
    let mut alice = alice;
    alice.connected().await?;
    dave.connected().await?;
    assert_eq!(alice.receive(1).await?[0].text, "sealed to the old signed prekey");
    dave.close().await;

    // Exhaust every one-time key; a session set up now uses the last-resort Kyber key and no EC one-time key.
    fetch(113).await?; // 115 each, less the two bundles fetched above
    let last = http.get(format!("{}/v1/keys/{alice_id}", server.url())).bearer_auth(&token).send().await?;
    let bundle: serde_json::Value = last.json().await?;
    assert!(bundle["one_time_prekey"].is_null() && bundle["kyber_prekey"]["last_resort"] == true, "{bundle}");
    let mut carol = TestClient::open(&dir, "carol", store_key(9), &server.url()).await?;
    carol.register(&phone("9")).await?;
    carol.connected().await?;
    carol.send(&alice_id, "after exhaustion").await?;
    assert_eq!(alice.receive(1).await?[0].text, "after exhaustion");
    alice.close().await;
    carol.close().await;
    server.cleanup().await;
    Ok(())
}

async fn a_changed_identity_is_reported_and_its_messages_held_until_trusted(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let mut alice = TestClient::open(&dir, "alice", store_key(10), &server.url()).await?;
    let mut bob = TestClient::open(&dir, "bob", store_key(11), &server.url()).await?;
    let alice_id = alice.register(&phone("10")).await?;
    let bob_id = bob.register(&phone("11")).await?;
    alice.connected().await?;
    bob.connected().await?;
    bob.send(&alice_id, "hello with my first identity").await?;
    assert_eq!(alice.receive(1).await?[0].text, "hello with my first identity");
    let b = bob_id.clone();
    let first_number = alice.call(move |c| c.safety_number(b)).await?;

    // Bob's identity key changes; his next messages are held, and alice is told once.
    bob.call(|c| c.reset_identity()).await?;
    bob.send(&alice_id, "hello with my new identity").await?;
    bob.send(&alice_id, "still me").await?;
    bob.send(&alice_id, "really").await?;
    let changed = alice.next(|e| matches!(e, Event::IdentityChanged(..) | Event::Message(_))).await?;
    let Event::IdentityChanged(contact, number) = changed else {
        return Err(format!("a message from a changed identity was accepted: {changed:?}").into());
    };
    // The other two held messages arrive meanwhile; they are not news.
    tokio::time::sleep(Duration::from_secs(1)).await;
    while let Ok(event) = alice.events.try_recv() {
        assert!(!matches!(event, Event::IdentityChanged(..) | Event::Message(_)), "after being held: {event:?}");
    }
    assert_eq!(contact, bob_id);
    assert_ne!(number, first_number, "the safety number did not change");
    let b = bob_id.clone();
    assert_eq!(alice.call(move |c| c.safety_number(b)).await?, number);
    assert!(!alice.call(|c| c.messages()).await?.iter().any(|m| m.text == "hello with my new identity"));
    // Alice cannot write to the unverified identity either.
    let refused = alice.send(&bob_id, "to whom?").await;
    assert!(matches!(refused, Err(ClientError::UntrustedIdentity(_))), "{refused:?}");

    // Alice compares the numbers and trusts: the held message arrives, and both ways work again.
    let b = bob_id.clone();
    alice.call(move |c| c.trust_identity(b)).await?;
    let texts: Vec<String> = alice.receive(3).await?.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["hello with my new identity", "still me", "really"]);
    alice.send(&bob_id, "welcome back").await?;
    assert_eq!(bob.receive(1).await?[0].text, "welcome back");
    let b = bob_id.clone();
    let a = alice_id.clone();
    assert_eq!(alice.call(move |c| c.safety_number(b)).await?, bob.call(move |c| c.safety_number(a)).await?);
    alice.close().await;
    bob.close().await;
    server.cleanup().await;
    Ok(())
}

async fn a_client_displaced_by_another_connection_of_its_account_stops_instead_of_fighting(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let mut first = TestClient::open(&dir, "alice", store_key(13), &server.url()).await?;
    first.register(&phone("13")).await?;
    first.connected().await?;
    // The same account elsewhere: a copy of the store (same keys), connecting too.
    for suffix in ["", "-wal"] {
        let from = dir.path.join(format!("alice.db{suffix}"));
        if from.exists() {
            std::fs::copy(&from, dir.path.join(format!("elsewhere.db{suffix}")))?;
        }
    }
    let mut second = TestClient::open(&dir, "elsewhere", store_key(13), &server.url()).await?;
    second.connected().await?;
    let stopped = first.next(|e| matches!(e, Event::State(ConnectionState::Disconnected, _))).await?;
    assert!(matches!(&stopped, Event::State(_, detail) if detail.contains("4409")), "{stopped:?}");
    // It does not reconnect and displace the other in turn.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(first.call(|c| c.state()).await, ConnectionState::Disconnected);
    assert_eq!(second.call(|c| c.state()).await, ConnectionState::Connected);
    while let Ok(event) = first.events.try_recv() {
        assert!(
            !matches!(event, Event::State(ConnectionState::Connecting | ConnectionState::Connected, _)),
            "{event:?}"
        );
    }
    first.close().await;
    second.close().await;
    server.cleanup().await;
    Ok(())
}

/// A proxy to `upstream` that forwards the first request it receives and
/// then closes the client's connection without the answer; later
/// connections pass through whole.
async fn answer_losing_proxy(upstream: SocketAddr) -> Result<SocketAddr, Error> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { continue };
            if std::mem::take(&mut first) {
                tokio::spawn(async move {
                    // Read the request, pass it on, wait for the answer to start, then hang up on the client.
                    let mut buffer = vec![0u8; 1 << 20];
                    let mut request = Vec::new();
                    while let Ok(n) = client.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        request.extend_from_slice(&buffer[..n]);
                        if let Some(head) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            let text = String::from_utf8_lossy(&request[..head]).to_lowercase();
                            let length = text
                                .lines()
                                .find_map(|l| {
                                    l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if request.len() >= head + 4 + length {
                                break;
                            }
                        }
                    }
                    let _ = server.write_all(&request).await;
                    let _ = server.read(&mut buffer).await;
                    drop(client);
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    Ok(address)
}

async fn a_registration_whose_answer_was_lost_is_finished_by_the_next_attempt(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let proxy = answer_losing_proxy(server.address).await?;
    let number = phone("14");
    let alice = TestClient::open(&dir, "alice", store_key(14), &format!("http://{proxy}")).await?;
    let lost = alice.register(&number).await;
    assert!(matches!(lost, Err(ClientError::Network(_))), "{lost:?}");
    assert_eq!(alice.call(|c| c.user_id()).await?, None);
    // The server did register it; the next attempt (same keys) finishes it.
    let user = alice.register(&number).await?;
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(number.as_bytes()));
    assert_eq!(user, privcomm_client::core::user_id_of(&hash));
    let derived = privcomm_domain::ids::PhoneHash::new(hash).map_err(|e| format!("{e:?}"))?;
    assert_eq!(
        user,
        privcomm_api::users::user_id_for(&derived).0.to_string(),
        "the client derives ids as the server does"
    );
    // The account works: a message from bob reaches it.
    let mut alice = alice;
    alice.connected().await?;
    let mut bob = TestClient::open(&dir, "bob", store_key(15), &server.url()).await?;
    bob.register(&phone("15")).await?;
    bob.connected().await?;
    bob.send(&user, "registered after all").await?;
    assert_eq!(alice.receive(1).await?[0].text, "registered after all");
    // Someone else's number: the conflict is reported, not taken over.
    let carol = TestClient::open(&dir, "carol", store_key(16), &server.url()).await?;
    let taken = carol.register(&number).await;
    assert!(matches!(taken, Err(ClientError::Server { status: 409, .. })), "{taken:?}");
    alice.close().await;
    bob.close().await;
    carol.close().await;
    server.cleanup().await;
    Ok(())
}

async fn a_burst_whose_commit_fails_is_neither_shown_nor_acked_until_a_commit_succeeds(mode: Mode) -> TestResult {
    use sqlx::Connection as _;
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let mut alice = TestClient::open(&dir, "alice", store_key(21), &server.url()).await?;
    let mut bob = TestClient::open(&dir, "bob", store_key(22), &server.url()).await?;
    alice.register(&phone("21")).await?;
    let bob_id = bob.register(&phone("22")).await?;
    alice.connected().await?;
    bob.connected().await?;
    alice.send(&bob_id, "before the lock").await?;
    assert_eq!(bob.receive(1).await?[0].text, "before the lock");

    // Another connection holds bob's store file: his commits fail (after SQLite's 5 s wait).
    let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", bob.config.store_path)).await?;
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut lock).await?;
    alice.send(&bob_id, "while the store is locked").await?;
    let failed = bob
        .next(|e| {
            matches!(e, Event::Message(_))
                || matches!(e, Event::State(_, detail) if detail.contains("cannot store incoming messages"))
        })
        .await?;
    assert!(matches!(failed, Event::State(..)), "shown before it was stored: {failed:?}");

    // The store works again: the relay delivers it again (it was not acked), the
    // commit succeeds, and it is shown once.
    sqlx::query("ROLLBACK").execute(&mut lock).await?;
    lock.close().await?;
    assert_eq!(bob.receive(1).await?[0].text, "while the store is locked");
    alice.send(&bob_id, "after the lock").await?;
    assert_eq!(bob.receive(1).await?[0].text, "after the lock");
    let texts: Vec<String> = bob.call(|c| c.messages()).await?.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["before the lock", "while the store is locked", "after the lock"]);
    let config = bob.config.clone();
    bob.close().await;
    let bob = TestClient::open(&dir, "bob", config.store_key.clone(), &config.server_url).await?;
    assert_eq!(bob.call(|c| c.messages()).await?.len(), 3, "not in the file after all");
    alice.close().await;
    bob.close().await;
    server.cleanup().await;
    Ok(())
}
