//! Voice calls between two clients (`privcomm-client`) through a real
//! `privcomm serve` process, embedded and cluster: signalling as
//! end-to-end-encrypted messages through the relay, media peer to peer over
//! loopback UDP (str0m, Opus), tones detected with Goertzel.

#[macro_use]
mod support;

use privcomm_client::call::media::{FRAME_SAMPLES, SAMPLE_RATE};
use privcomm_client::call::tone::{Tone, dominant, rms};
use privcomm_client::call::turn::TurnState;
use privcomm_client::{CallEndReason, CallInfo, CallListener, CallSettings, CallState, Client, ClientError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::api::{Mode, TURN_SECRET};
use support::client::{Error, TestClient, TestServer, blocking, phone, store_key};
use support::turn::Coturn;
use support::{TempDir, TestResult};
use tokio::sync::mpsc;

in_both_modes!(
    a_call_carries_each_sides_tone_mute_silences_and_either_side_hangs_up,
    a_call_ends_rejected_busy_or_unanswered_on_both_sides,
    two_people_who_call_each_other_at_once_get_one_call,
    a_relay_only_call_goes_through_the_turn_relay_and_ends_when_it_goes,
    a_peer_that_vanishes_mid_call_ends_it_with_ice_failed,
);

struct CallRecorder(mpsc::UnboundedSender<CallInfo>);

impl CallListener for CallRecorder {
    fn on_call_changed(&self, call: CallInfo) {
        let _ = self.0.send(call);
    }
}

/// A registered, connected client with its call events.
struct Phone {
    user: String,
    client: TestClient,
    calls: mpsc::UnboundedReceiver<CallInfo>,
}

impl Phone {
    async fn open(
        dir: &TempDir,
        name: &str,
        seed: u8,
        server: &TestServer,
        settings: CallSettings,
    ) -> Result<Phone, Error> {
        let mut client = TestClient::open(dir, name, store_key(seed), &server.url()).await?;
        let user = client.register(&phone(&seed.to_string())).await?;
        let (calls_tx, calls) = mpsc::unbounded_channel();
        client.call(move |c| c.set_call_listener(Arc::new(CallRecorder(calls_tx)))).await;
        client.call(move |c| c.configure_calls(settings)).await?;
        client.connected().await?;
        Ok(Phone { user, client, calls })
    }

    /// The next call change (others skipped) matching `wanted`, within 20 s;
    /// an `Ended` that was not wanted fails at once.
    async fn next(&mut self, wanted: impl Fn(&CallInfo) -> bool) -> Result<CallInfo, Error> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, self.calls.recv()).await {
                Ok(Some(call)) if wanted(&call) => return Ok(call),
                Ok(Some(call)) if call.state == CallState::Ended => {
                    return Err(format!("the call ended unexpectedly: {call:?}").into());
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Err("the call listener is gone".into()),
                Err(_) => return Err("no such call change within 20 s".into()),
            }
        }
    }

    async fn state(&mut self, call_id: &str, state: CallState) -> Result<CallInfo, Error> {
        self.next(|c| c.call_id == call_id && c.state == state).await
    }

    async fn ended(&mut self, call_id: &str, reason: CallEndReason) -> Result<CallInfo, Error> {
        let call = self.next(|c| c.call_id == call_id && c.state == CallState::Ended).await?;
        assert_eq!(call.end_reason, Some(reason), "{call:?}");
        Ok(call)
    }

    async fn start_call(&self, to: &str) -> Result<String, ClientError> {
        let to = to.to_owned();
        self.client.call(move |c| c.start_call(to)).await
    }

    async fn on(
        &self,
        call_id: &str,
        action: fn(&Client, String) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        let call_id = call_id.to_owned();
        self.client.call(move |c| action(c, call_id)).await
    }

    fn handle(&self) -> Arc<Client> {
        self.client.client.clone()
    }
}

/// Alice calls bob and bob answers; both are connected. Returns the call id.
async fn connected_call(alice: &mut Phone, bob: &mut Phone) -> Result<String, Error> {
    let id = alice.start_call(&bob.user).await?;
    let outgoing = alice.state(&id, CallState::Outgoing).await?;
    assert!(outgoing.outgoing && outgoing.peer == bob.user);
    let incoming = bob.state(&id, CallState::Incoming).await?;
    assert!(!incoming.outgoing && incoming.peer == alice.user, "{incoming:?}");
    bob.on(&id, Client::accept_call).await?;
    bob.state(&id, CallState::Connecting).await?;
    alice.state(&id, CallState::Connected).await?;
    bob.state(&id, CallState::Connected).await?;
    Ok(id)
}

/// Both sides hand in their tone and take out what they hear, every 20 ms
/// for `time`, as a phone's audio threads do; returns (heard by a, heard by b).
async fn talk(
    a: Arc<Client>,
    b: Arc<Client>,
    call: &str,
    tones: (f64, f64),
    time: Duration,
) -> Result<(Vec<i16>, Vec<i16>), Error> {
    let call = call.to_owned();
    blocking(move || -> Result<(Vec<i16>, Vec<i16>), Error> {
        let (mut tone_a, mut tone_b) = (Tone::new(tones.0, SAMPLE_RATE), Tone::new(tones.1, SAMPLE_RATE));
        let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
        let started = Instant::now();
        let mut next = started;
        while started.elapsed() < time {
            a.push_audio(call.clone(), tone_a.next_frame(FRAME_SAMPLES))?;
            b.push_audio(call.clone(), tone_b.next_frame(FRAME_SAMPLES))?;
            at_a.extend(a.pull_audio(call.clone())?);
            at_b.extend(b.pull_audio(call.clone())?);
            next += Duration::from_millis(20);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        Ok((at_a, at_b))
    })
    .await
}

/// 440 Hz from `a` is heard at `b` and 660 Hz from `b` at `a` (1.5 s of
/// talk at the 20 ms pace, the last 500 ms judged).
async fn each_hears_the_others_tone(a: &Phone, b: &Phone, call: &str) -> Result<(), Error> {
    let (at_a, at_b) = talk(a.handle(), b.handle(), call, (440.0, 660.0), Duration::from_millis(1500)).await?;
    let heard_at_b = dominant(last(&at_b, 500), 300, 800, SAMPLE_RATE);
    let heard_at_a = dominant(last(&at_a, 500), 300, 800, SAMPLE_RATE);
    assert!(heard_at_b.abs_diff(440) <= 5, "the callee heard {heard_at_b} Hz, not 440");
    assert!(heard_at_a.abs_diff(660) <= 5, "the caller heard {heard_at_a} Hz, not 660");
    assert!(rms(last(&at_b, 500)) > 3_000.0, "the callee's audio is too quiet to be the tone");
    Ok(())
}

/// The last `ms` milliseconds of `pcm`.
fn last(pcm: &[i16], ms: usize) -> &[i16] {
    &pcm[pcm.len().saturating_sub(SAMPLE_RATE as usize * ms / 1000)..]
}

fn settings() -> CallSettings {
    CallSettings { media_ip: Some("127.0.0.1".into()), ..CallSettings::default() }
}

async fn a_call_carries_each_sides_tone_mute_silences_and_either_side_hangs_up(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let mut alice = Phone::open(&dir, "alice", 41, &server, settings()).await?;
    let mut bob = Phone::open(&dir, "bob", 42, &server, settings()).await?;
    let id = connected_call(&mut alice, &mut bob).await?;
    let fingerprints = {
        let id = id.clone();
        let (a, b) = (alice.handle(), bob.handle());
        (a.call_fingerprint(&id)?, b.call_fingerprint(&id)?)
    };

    // 440 Hz from alice is heard at bob, 660 Hz from bob at alice.
    each_hears_the_others_tone(&alice, &bob, &id).await?;

    // Muted, alice sends silence; the call stays connected; unmuted, the tone is back.
    let (a, i) = (alice.handle(), id.clone());
    blocking(move || a.set_muted(i, true)).await?;
    let (at_alice, at_bob) =
        talk(alice.handle(), bob.handle(), &id, (440.0, 660.0), Duration::from_millis(800)).await?;
    assert!(
        rms(last(&at_bob, 300)) < 50.0,
        "bob still hears alice while she is muted: RMS {}",
        rms(last(&at_bob, 300))
    );
    assert!(dominant(last(&at_alice, 300), 300, 800, SAMPLE_RATE).abs_diff(660) <= 5, "muting alice silenced bob too");
    let active = alice.handle().active_calls();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].state, CallState::Connected, "muting ended the call");
    let (a, i) = (alice.handle(), id.clone());
    blocking(move || a.set_muted(i, false)).await?;
    let (_, at_bob) = talk(alice.handle(), bob.handle(), &id, (440.0, 660.0), Duration::from_millis(800)).await?;
    assert!(
        dominant(last(&at_bob, 300), 300, 800, SAMPLE_RATE).abs_diff(440) <= 5,
        "unmuting did not bring the tone back"
    );

    // Bob hangs up: his side ended by hangup, alice's by the remote end.
    bob.on(&id, Client::hang_up).await?;
    bob.ended(&id, CallEndReason::Hangup).await?;
    alice.ended(&id, CallEndReason::RemoteEnded).await?;
    let (a, i) = (alice.handle(), id.clone());
    assert!(
        matches!(blocking(move || a.pull_audio(i)).await, Err(ClientError::Invalid { .. })),
        "an ended call still plays"
    );

    // A second call, hung up by alice this time.
    let second = connected_call(&mut alice, &mut bob).await?;
    assert_ne!(second, id);
    alice.on(&second, Client::hang_up).await?;
    alice.ended(&second, CallEndReason::Hangup).await?;
    bob.ended(&second, CallEndReason::RemoteEnded).await?;

    // The server only ever held ciphertext: neither DTLS fingerprint nor any
    // SDP is in its events (or, embedded, its files; in cluster mode, the
    // NATS stream the relays read); the search finds what the server does
    // store (alice's user id).
    assert!(server.holds(alice.user.as_bytes()).await?, "the byte search finds nothing at all");
    if matches!(mode, Mode::Cluster) {
        assert!(server.stream_holds(alice.user.as_bytes()).await?, "the stream search finds nothing at all");
    }
    for needle in
        [fingerprints.0.as_str(), fingerprints.1.as_str(), "a=fingerprint", "a=ice-ufrag", "candidate:", id.as_str()]
    {
        assert!(!server.holds(needle.as_bytes()).await?, "the server holds {needle:?} in plaintext");
        assert!(!server.stream_holds(needle.as_bytes()).await?, "the NATS stream holds {needle:?} in plaintext");
    }
    alice.client.close().await;
    bob.client.close().await;
    server.cleanup().await;
    Ok(())
}

async fn a_call_ends_rejected_busy_or_unanswered_on_both_sides(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let ring = Duration::from_millis(1500);
    let short_ring = CallSettings { ring_timeout_ms: ring.as_millis() as u64, ..settings() };
    let mut alice = Phone::open(&dir, "alice", 43, &server, short_ring.clone()).await?;
    let mut bob = Phone::open(&dir, "bob", 44, &server, short_ring).await?;
    let mut carol = Phone::open(&dir, "carol", 45, &server, settings()).await?;

    // Bad input is refused and changes nothing.
    assert!(matches!(alice.start_call("not-a-user").await, Err(ClientError::Invalid { .. })));
    assert!(matches!(alice.on("no-such-call", Client::accept_call).await, Err(ClientError::Invalid { .. })));
    let bad = CallSettings { ice_failed_after_ms: 0, ..settings() };
    assert!(matches!(alice.handle().configure_calls(bad), Err(ClientError::Invalid { .. })));

    // Bob declines.
    let id = alice.start_call(&bob.user).await?;
    bob.state(&id, CallState::Incoming).await?;
    bob.on(&id, Client::reject_call).await?;
    bob.ended(&id, CallEndReason::Rejected).await?;
    alice.ended(&id, CallEndReason::Rejected).await?;

    // Alice gives up while it rings: bob's ringing call ends.
    let id = alice.start_call(&bob.user).await?;
    bob.state(&id, CallState::Incoming).await?;
    alice.on(&id, Client::hang_up).await?;
    alice.ended(&id, CallEndReason::Hangup).await?;
    bob.ended(&id, CallEndReason::RemoteEnded).await?;

    // Bob is in a call with alice: carol's call is answered busy, and bob hears nothing of it.
    let with_alice = connected_call(&mut alice, &mut bob).await?;
    let id = carol.start_call(&bob.user).await?;
    carol.ended(&id, CallEndReason::Busy).await?;
    let (a, b) = (alice.handle().active_calls(), bob.handle().active_calls());
    assert_eq!((a.len(), b.len()), (1, 1), "the busy call disturbed the one in progress");
    assert_eq!(b[0].call_id, with_alice);
    alice.on(&with_alice, Client::hang_up).await?;
    alice.ended(&with_alice, CallEndReason::Hangup).await?;
    bob.ended(&with_alice, CallEndReason::RemoteEnded).await?;
    while let Ok(call) = bob.calls.try_recv() {
        assert_ne!(call.call_id, id, "bob heard carol's call: {call:?}");
    }

    // Nobody answers: both sides end with no_answer once the ring time passed.
    let started = Instant::now();
    let id = alice.start_call(&bob.user).await?;
    bob.state(&id, CallState::Incoming).await?;
    alice.ended(&id, CallEndReason::NoAnswer).await?;
    let waited = started.elapsed();
    bob.ended(&id, CallEndReason::NoAnswer).await?;
    assert!(
        waited >= ring && waited < ring + Duration::from_secs(5),
        "no_answer after {waited:?} for a ring time of {ring:?}"
    );

    for phone in [alice, bob, carol] {
        phone.client.close().await;
    }
    server.cleanup().await;
    Ok(())
}

async fn two_people_who_call_each_other_at_once_get_one_call(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let mut alice = Phone::open(&dir, "alice", 46, &server, settings()).await?;
    let mut bob = Phone::open(&dir, "bob", 47, &server, settings()).await?;

    // Both dial at once. Should one offer arrive before the other side
    // dialled, that side's call is refused (no glare): hang up and try again.
    let mut crossed = None;
    for _ in 0..10 {
        let (a, b) = tokio::join!(alice.start_call(&bob.user), bob.start_call(&alice.user));
        match (a, b) {
            (Ok(a), Ok(b)) => {
                crossed = Some((a, b));
                break;
            }
            (Ok(id), Err(ClientError::Invalid { .. })) => {
                alice.on(&id, Client::hang_up).await?;
                alice.ended(&id, CallEndReason::Hangup).await?;
                bob.ended(&id, CallEndReason::RemoteEnded).await?;
            }
            (Err(ClientError::Invalid { .. }), Ok(id)) => {
                bob.on(&id, Client::hang_up).await?;
                bob.ended(&id, CallEndReason::Hangup).await?;
                alice.ended(&id, CallEndReason::RemoteEnded).await?;
            }
            other => return Err(format!("dialling at once: {other:?}").into()),
        }
    }
    let (a, b) = crossed.ok_or("in 10 tries the calls never crossed")?;

    // The greater id rings at the other side; the smaller gives way there, and nobody is busy.
    let (winner, loser, id, yielded) = if a > b { (&mut alice, &mut bob, a, b) } else { (&mut bob, &mut alice, b, a) };
    loser.ended(&yielded, CallEndReason::Glare).await?;
    let ringing = loser.state(&id, CallState::Incoming).await?;
    assert_eq!(ringing.peer, winner.user);
    loser.on(&id, Client::accept_call).await?;
    winner.state(&id, CallState::Connected).await?;
    loser.state(&id, CallState::Connected).await?;
    let (w, l) = (winner.handle().active_calls(), loser.handle().active_calls());
    assert_eq!((w.len(), l.len(), w[0].call_id == id), (1, 1, true), "{w:?} {l:?}");
    winner.on(&id, Client::hang_up).await?;
    winner.ended(&id, CallEndReason::Hangup).await?;
    loser.ended(&id, CallEndReason::RemoteEnded).await?;
    for phone in [&mut alice, &mut bob] {
        while let Ok(call) = phone.calls.try_recv() {
            assert_ne!(call.end_reason, Some(CallEndReason::Busy), "{call:?}");
        }
    }

    for phone in [alice, bob] {
        phone.client.close().await;
    }
    server.cleanup().await;
    Ok(())
}

async fn a_relay_only_call_goes_through_the_turn_relay_and_ends_when_it_goes(mode: Mode) -> TestResult {
    let mut coturn = Coturn::start(TURN_SECRET)?;
    let probe =
        format!("{}:probe", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 600);
    coturn.ready(&probe, &privcomm_api::calls::credential(TURN_SECRET.as_bytes(), &probe)).await?;
    let server = TestServer::start_with(mode, &[("TURN_URLS", &coturn.url()), ("TURN_SECRET", TURN_SECRET)]).await?;
    let dir = TempDir::new();
    let after = Duration::from_secs(2);
    let relay_only = CallSettings { relay_only: true, ice_failed_after_ms: after.as_millis() as u64, ..settings() };
    let mut alice = Phone::open(&dir, "alice", 48, &server, relay_only.clone()).await?;
    let mut bob = Phone::open(&dir, "bob", 49, &server, relay_only).await?;

    // Neither side offers its own address: the call connects through the
    // relays coturn granted with credentials from the API, tones both ways.
    let id = connected_call(&mut alice, &mut bob).await?;
    for phone in [&alice, &bob] {
        let relay = phone.handle().call_relay(&id)?;
        assert!(matches!(relay, Some(TurnState::Allocated(_))), "{relay:?}");
    }
    each_hears_the_others_tone(&alice, &bob, &id).await?;

    // The relay goes away: with no other path, both sides lose the call.
    coturn.kill();
    let (a, b, i) = (alice.handle(), bob.handle(), id.clone());
    // Both keep talking (a silent call ends as IceFailed too; this one must end for want of a path).
    let frames = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let (mut a_on, mut b_on) = (true, true);
        while (a_on || b_on) && started.elapsed() < Duration::from_secs(30) {
            a_on = a_on && a.push_audio(i.clone(), vec![0; FRAME_SAMPLES]).is_ok();
            b_on = b_on && b.push_audio(i.clone(), vec![0; FRAME_SAMPLES]).is_ok();
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    alice.ended(&id, CallEndReason::IceFailed).await?;
    bob.ended(&id, CallEndReason::IceFailed).await?;
    frames.await?;

    for phone in [alice, bob] {
        phone.client.close().await;
    }
    server.cleanup().await;

    // Relay only where the server has no relay: the call fails and says why.
    let server = TestServer::start(mode).await?;
    let relay_only = CallSettings { relay_only: true, ..settings() };
    let mut carol = Phone::open(&dir, "carol", 50, &server, relay_only).await?;
    let mut dave = Phone::open(&dir, "dave", 51, &server, settings()).await?;
    let id = carol.start_call(&dave.user).await?;
    let failed = carol.ended(&id, CallEndReason::Failed).await?;
    assert!(failed.detail.contains("relay only") && failed.detail.contains("no TURN relay"), "{failed:?}");
    dave.ended(&id, CallEndReason::IceFailed).await?;
    for phone in [carol, dave] {
        phone.client.close().await;
    }
    server.cleanup().await;
    Ok(())
}

async fn a_peer_that_vanishes_mid_call_ends_it_with_ice_failed(mode: Mode) -> TestResult {
    let server = TestServer::start(mode).await?;
    let dir = TempDir::new();
    let after = Duration::from_secs(2);
    let quick = CallSettings { ice_failed_after_ms: after.as_millis() as u64, ..settings() };
    let mut alice = Phone::open(&dir, "alice", 46, &server, quick).await?;
    let mut bob = Phone::open(&dir, "bob", 47, &server, settings()).await?;
    let id = connected_call(&mut alice, &mut bob).await?;
    let (_, at_bob) = talk(alice.handle(), bob.handle(), &id, (440.0, 660.0), Duration::from_millis(600)).await?;
    // Bob's last packet reached alice about now: her silence is counted from it.
    let last_packet = Instant::now();
    assert!(rms(last(&at_bob, 200)) > 1_000.0, "no audio before bob vanished");

    // Bob's network goes, then his app: no hangup can reach alice, his media stops.
    let b = bob.handle();
    blocking(move || {
        b.disconnect()?;
        b.shutdown();
        Ok::<(), ClientError>(())
    })
    .await?;
    alice.ended(&id, CallEndReason::IceFailed).await?;
    let waited = last_packet.elapsed();
    let early = Duration::from_millis(100);
    assert!(
        waited + early >= after && waited < after + Duration::from_secs(5),
        "ice_failed after {waited:?} for {after:?}"
    );
    alice.client.close().await;
    server.cleanup().await;
    Ok(())
}
