//! TURN against a real coturn (`use-auth-secret` with the API's secret, on
//! loopback): credentials from `GET /v1/calls/turn` allocate a relay and
//! carry packets, forged and expired ones are refused; the client's own TURN
//! client (`privcomm_client::call::turn`) allocates, carries data to a
//! permitted peer, and reports a refused credential. A whole call through
//! the relay is in `tests/calls.rs`.

#[macro_use]
mod support;

use privcomm_client::call::turn::{TurnClient, TurnState};
use privcomm_domain::Clock as _;
use support::TestResult;
use support::api::{Client, Mode, TURN_SECRET, TestApi, generous_limits};
use support::turn::Coturn;

#[tokio::test]
async fn issued_turn_credentials_allocate_a_relay_and_forged_or_expired_ones_do_not() -> TestResult {
    let coturn = Coturn::start(TURN_SECRET)?;
    let api = TestApi::start(Mode::Embedded, generous_limits()).await?;
    let mut alice = Client::new("+15550000041");
    alice.register(&api, 1, 1).await?;
    let credentials = |body: &serde_json::Value| -> Result<(String, String), String> {
        let field = |name: &str| body[name].as_str().map(str::to_owned).ok_or(format!("no {name} in {body}"));
        Ok((field("username")?, field("credential")?))
    };

    // Issued 13 hours ago (the TTL is 12 hours): expired now.
    let thirteen_hours = 13 * 3600 * 1_000_000;
    api.clock.advance(-thirteen_hours);
    let token = alice.login(&api).await?;
    let (status, body) = api.get_auth("/v1/calls/turn", &token).await?;
    assert_eq!(status, 200, "{body}");
    let (old_username, old_credential) = credentials(&body)?;
    api.clock.advance(thirteen_hours);

    let token = alice.login(&api).await?;
    let (status, body) = api.get_auth("/v1/calls/turn", &token).await?;
    assert_eq!(status, 200, "{body}");
    let (username, credential) = credentials(&body)?;

    // Issued now: coturn allocates a relay and packets go through (it may
    // take a moment to listen).
    coturn.ready(&username, &credential).await.map_err(|e| format!("credentials the API issued: {e}"))?;

    // Forged: the username under another secret, or the credential with another expiry.
    let forged = privcomm_api::calls::credential(b"not the secret", &username);
    assert!(!coturn.relays(&username, &forged)?, "a forged credential was accepted");
    let (expiry, user) = username.split_once(':').ok_or("username")?;
    let later = format!("{}:{user}", expiry.parse::<i64>()? + 3600);
    assert!(!coturn.relays(&later, &credential)?, "a credential was accepted for another username");

    // Expired, though genuine.
    let old_expiry: i64 = old_username.split_once(':').ok_or("username")?.0.parse()?;
    assert!(old_expiry < api.clock.now().unix_seconds(), "{old_username} has not expired");
    assert_eq!(old_credential, privcomm_api::calls::credential(TURN_SECRET.as_bytes(), &old_username));
    assert!(!coturn.relays(&old_username, &old_credential)?, "an expired credential was accepted");
    // The fresh one still works.
    assert!(coturn.relays(&username, &credential)?);
    api.shutdown().await;
    Ok(())
}

/// Drives `turn` on `socket` until `done` holds or 5 s pass; returns what
/// came through the relay meanwhile.
fn drive(
    socket: &std::net::UdpSocket,
    turn: &mut TurnClient,
    done: impl Fn(&TurnClient, &[(std::net::SocketAddr, Vec<u8>)]) -> bool,
) -> Result<Vec<(std::net::SocketAddr, Vec<u8>)>, String> {
    let started = std::time::Instant::now();
    let mut received = Vec::new();
    let mut buffer = [0u8; 2000];
    while !done(turn, &received) {
        if started.elapsed() > std::time::Duration::from_secs(5) {
            return Err(format!("not done within 5 s: {:?}", turn.state()));
        }
        for datagram in turn.take_outgoing() {
            socket.send_to(&datagram, turn.server()).map_err(|e| e.to_string())?;
        }
        match socket.recv_from(&mut buffer) {
            Ok((size, from)) if from == turn.server() => {
                received.extend(turn.handle(&buffer[..size], std::time::Instant::now()));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.to_string()),
        }
        turn.handle_timeout(std::time::Instant::now());
    }
    Ok(received)
}

#[test]
fn the_clients_turn_allocation_carries_data_to_a_permitted_peer_and_a_forged_credential_is_refused() -> TestResult {
    let coturn = Coturn::start(TURN_SECRET)?;
    let server: std::net::SocketAddr = format!("127.0.0.1:{}", coturn.port).parse()?;
    let expiry = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 600;
    let issue = |user: &str| {
        let username = format!("{expiry}:{user}");
        let credential = privcomm_api::calls::credential(TURN_SECRET.as_bytes(), &username);
        (username, credential)
    };
    let socket = || -> Result<std::net::UdpSocket, std::io::Error> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(std::time::Duration::from_millis(50)))?;
        Ok(socket)
    };
    let allocated = |t: &TurnClient, _: &[_]| t.state() != &TurnState::Allocating;
    // coturn takes a moment to listen: the client's own retries cover it.
    let (a_socket, b_socket) = (socket()?, socket()?);
    let ((a_user, a_credential), (b_user, b_credential)) = (issue("alice"), issue("bob"));
    let now = std::time::Instant::now();
    let mut alice = TurnClient::new(server, &a_user, &a_credential, now);
    let mut bob = TurnClient::new(server, &b_user, &b_credential, now);
    drive(&a_socket, &mut alice, allocated)?;
    drive(&b_socket, &mut bob, allocated)?;
    let (a_relay, b_relay) = (alice.relayed().ok_or("alice has no relay")?, bob.relayed().ok_or("bob has no relay")?);

    // Bob lets alice's relay in; alice's first packet to bob's relay is held
    // until her own permission for it is granted, then sent.
    bob.permit(a_relay.ip(), std::time::Instant::now());
    drive(&b_socket, &mut bob, |t, _| t.permitted(a_relay.ip()))?;
    assert!(alice.wrap(b_relay, b"hello", std::time::Instant::now()).is_none(), "sent before it was permitted");
    drive(&a_socket, &mut alice, |t, _| t.permitted(b_relay.ip()))?;
    for datagram in alice.take_outgoing() {
        a_socket.send_to(&datagram, server)?;
    }
    let got = drive(&b_socket, &mut bob, |_, r| !r.is_empty())?;
    let (from, data) = got.first().ok_or("nothing came through alice's relay to bob's")?;
    assert_eq!(*from, a_relay, "bob sees alice's relayed address, not her own");
    assert_eq!(data, b"hello");
    let again = alice.wrap(b_relay, b"again", std::time::Instant::now()).ok_or("not sent once permitted")?;
    a_socket.send_to(&again, server)?;
    let got = drive(&b_socket, &mut bob, |_, r| !r.is_empty())?;
    assert_eq!(got.first().map(|(_, d)| d.as_slice()), Some(&b"again"[..]));

    // A credential signed with another secret: refused, and said so.
    let forged = privcomm_api::calls::credential(b"not the secret", &a_user);
    let mut mallory = TurnClient::new(server, &a_user, &forged, std::time::Instant::now());
    drive(&socket()?, &mut mallory, allocated)?;
    assert!(matches!(mallory.state(), TurnState::Failed(why) if why.contains("401")), "{:?}", mallory.state());
    Ok(())
}
