//! The call engine: each call's state machine, its signalling and its
//! timers. Offer, answer, ICE candidates (trickled) and hangup travel as
//! end-to-end-encrypted messages on the Signal session with the peer (a
//! [`Signaller`] sends them); the server relays them and cannot read them,
//! so the DTLS fingerprints in the offer and answer are authenticated by the
//! session. Media then flows peer to peer ([`MediaSession`]), or through a
//! TURN relay whose candidate is trickled once allocated (ADR 0020; relay
//! only offers nothing else).
//!
//! States: `Outgoing` (offer sent, ringing) or `Incoming` (offer received) →
//! `Connecting` (answer sent or received; ICE and DTLS under way) →
//! `Connected` → `Ended`, with a reason: `Hangup` (this side hung up),
//! `RemoteEnded` (the peer did), `Rejected`, `Busy` (the peer was in another
//! call), `NoAnswer` (the ring time passed, 60 s by default), `IceFailed`
//! (no connection within, or no packet for longer than, the configured time,
//! 10 s by default) or `Failed` (the call could not be set up or signalled).
//!
//! One call at a time: an offer while another call is not ended is answered
//! busy, except glare: when two people call each other at the same moment,
//! the call with the greater id goes on ringing and the other gives way
//! (`Glare`) on both sides, without either being busy. An offer older than
//! the ring time (delivered late, after the recipient was offline) is
//! dropped. Signals for a call from anyone but its peer are ignored.
//!
//! Every call has a task on the client's thread: it drives the media
//! session when a packet arrives or a timer is due, and ends the call on
//! time. The platform's audio threads hand PCM in and take it out directly
//! ([`Calls::push_audio`], [`Calls::pull_audio`]), without waiting for that thread.

use crate::call::media::{FRAME_SAMPLES, MediaSession};
use crate::call::turn::{TurnCredential, TurnState};
use crate::error::{ClientError, Result, invalid};
use futures::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a call rings before it ends unanswered, by default.
pub const DEFAULT_RING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a call may go without a connection before it ends, by default.
pub const DEFAULT_ICE_FAILED_AFTER: Duration = Duration::from_secs(10);

/// A call signal, the content of an end-to-end-encrypted message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CallSignal {
    /// The caller's SDP offer (with its DTLS fingerprint; no candidates).
    Offer {
        /// The call.
        call_id: String,
        /// SDP.
        sdp: String,
    },
    /// The callee's SDP answer.
    Answer {
        /// The call.
        call_id: String,
        /// SDP.
        sdp: String,
    },
    /// One ICE candidate (an SDP `candidate:` line).
    Candidate {
        /// The call.
        call_id: String,
        /// The candidate.
        candidate: String,
    },
    /// The sender ended the call.
    Hangup {
        /// The call.
        call_id: String,
        /// Why.
        reason: HangupReason,
    },
}

impl CallSignal {
    /// The call it is about.
    pub fn call_id(&self) -> &str {
        match self {
            CallSignal::Offer { call_id, .. }
            | CallSignal::Answer { call_id, .. }
            | CallSignal::Candidate { call_id, .. }
            | CallSignal::Hangup { call_id, .. } => call_id,
        }
    }
}

/// Why the sender of a hangup ended the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HangupReason {
    /// The user hung up.
    Hangup,
    /// The callee declined.
    Rejected,
    /// The callee is in another call.
    Busy,
    /// Nobody answered within the ring time.
    NoAnswer,
    /// The media connection failed.
    IceFailed,
}

impl HangupReason {
    /// The end reason on the side that receives it.
    fn received(self) -> CallEndReason {
        match self {
            HangupReason::Hangup => CallEndReason::RemoteEnded,
            HangupReason::Rejected => CallEndReason::Rejected,
            HangupReason::Busy => CallEndReason::Busy,
            HangupReason::NoAnswer => CallEndReason::NoAnswer,
            HangupReason::IceFailed => CallEndReason::IceFailed,
        }
    }
}

/// Where a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum CallState {
    /// Placed by this side; ringing at the peer.
    Outgoing,
    /// Placed by the peer; ringing here (`accept_call` or `reject_call`).
    Incoming,
    /// Answered; the media connection is being set up.
    Connecting,
    /// Media flows.
    Connected,
    /// Over (see the end reason).
    Ended,
}

/// Why a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum CallEndReason {
    /// This side hung up.
    Hangup,
    /// The peer hung up.
    RemoteEnded,
    /// The callee declined (on both sides).
    Rejected,
    /// The callee was in another call.
    Busy,
    /// Nobody answered within the ring time (on both sides).
    NoAnswer,
    /// The media connection could not be made or was lost.
    IceFailed,
    /// The call could not be set up or signalled (see the detail).
    Failed,
    /// The peer called at the same moment and this call gave way to theirs,
    /// which rings here as an incoming call (the call with the greater id wins).
    Glare,
}

/// A call as the app sees it.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct CallInfo {
    /// The call id (UUID), the same on both sides.
    pub call_id: String,
    /// The other party's user id.
    pub peer: String,
    /// Placed by this side.
    pub outgoing: bool,
    /// Where it is.
    pub state: CallState,
    /// Why it ended, once `Ended`.
    pub end_reason: Option<CallEndReason>,
    /// More about a failure (empty otherwise).
    pub detail: String,
}

/// What the app hears about calls (called on the client's thread).
#[uniffi::export(with_foreign)]
pub trait CallListener: Send + Sync {
    /// A call appeared (incoming) or changed state.
    fn on_call_changed(&self, call: CallInfo);
}

/// How calls behave.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct CallSettings {
    /// How long a call rings before it ends with `NoAnswer` (default 60 s).
    pub ring_timeout_ms: u64,
    /// How long a call may be without a media connection — never connected
    /// after the answer, or no packet from the peer — before it ends with
    /// `IceFailed` (default 10 s).
    pub ice_failed_after_ms: u64,
    /// The address to receive media on; by default the local address that
    /// reaches the server.
    pub media_ip: Option<String>,
    /// Offer only a TURN relay as this side's candidate, never the device's
    /// own addresses, so that the peer does not learn them (media then always
    /// goes through the server's relay). A call fails if no relay can be had.
    /// Off by default: a relay is still offered beside the device's address
    /// wherever the server has one.
    #[uniffi(default = false)]
    pub relay_only: bool,
}

impl Default for CallSettings {
    fn default() -> CallSettings {
        CallSettings {
            ring_timeout_ms: DEFAULT_RING_TIMEOUT.as_millis() as u64,
            ice_failed_after_ms: DEFAULT_ICE_FAILED_AFTER.as_millis() as u64,
            media_ip: None,
            relay_only: false,
        }
    }
}

impl CallSettings {
    /// Checks the settings: times from 100 ms to one hour, an IP address.
    pub fn checked(self) -> Result<CallSettings> {
        const RANGE: std::ops::RangeInclusive<u64> = 100..=3_600_000;
        if !RANGE.contains(&self.ring_timeout_ms) {
            return Err(invalid("ring_timeout_ms", "from 100 ms to one hour"));
        }
        if !RANGE.contains(&self.ice_failed_after_ms) {
            return Err(invalid("ice_failed_after_ms", "from 100 ms to one hour"));
        }
        if let Some(ip) = &self.media_ip {
            ip.parse::<IpAddr>().map_err(|_| invalid("media_ip", "not an IP address"))?;
        }
        Ok(self)
    }

    fn ring(&self) -> Duration {
        Duration::from_millis(self.ring_timeout_ms)
    }

    fn ice_failed_after(&self) -> Duration {
        Duration::from_millis(self.ice_failed_after_ms)
    }
}

/// Sends call signals to a peer, end-to-end encrypted (the client's connection).
pub trait Signaller {
    /// Encrypts `signal` for `to` and sends it through the relay.
    fn signal<'a>(&'a self, to: &'a str, signal: CallSignal) -> LocalBoxFuture<'a, Result<()>>;

    /// A credential for the server's TURN relays (`None` where it has none).
    fn turn_credential(&self) -> LocalBoxFuture<'_, Result<Option<TurnCredential>>>;
}

struct Status {
    state: CallState,
    reason: Option<CallEndReason>,
    detail: String,
    /// When the call entered its state.
    since: Instant,
}

/// One call.
pub struct Call {
    id: String,
    peer: String,
    outgoing: bool,
    media: Mutex<MediaSession>,
    status: Mutex<Status>,
    /// The peer's offer, until this side answers.
    offer: Mutex<Option<String>>,
    /// Wakes the call's task (a state change).
    wake: tokio::sync::Notify,
    /// This side's offer or answer and first candidates are out: from now
    /// on the relay may be asked for and its candidate trickled after them.
    signalled: std::sync::atomic::AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Call {
    fn info(&self) -> CallInfo {
        let status = lock(&self.status);
        CallInfo {
            call_id: self.id.clone(),
            peer: self.peer.clone(),
            outgoing: self.outgoing,
            state: status.state,
            end_reason: status.reason,
            detail: status.detail.clone(),
        }
    }

    fn state(&self) -> CallState {
        lock(&self.status).state
    }

    fn since(&self) -> Instant {
        lock(&self.status).since
    }

    fn signalled(&self) -> bool {
        self.signalled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// This side's SDP and candidates are out; wakes the task for the relay.
    fn set_signalled(&self) {
        self.signalled.store(true, std::sync::atomic::Ordering::Release);
        self.wake.notify_one();
    }
}

/// The calls of one client.
pub struct Calls {
    calls: Mutex<HashMap<String, Arc<Call>>>,
    settings: Mutex<CallSettings>,
    listener: Mutex<Option<Arc<dyn CallListener>>>,
    /// The server's address, to find the local address that reaches it.
    server: String,
    /// The last TURN credential and when it was fetched (reused for half its lifetime).
    turn: Mutex<Option<(TurnCredential, Instant)>>,
}

impl Calls {
    /// No calls; `server_url` is the server's (for the default media address).
    pub fn new(server_url: &str) -> Calls {
        Calls {
            calls: Mutex::default(),
            settings: Mutex::new(CallSettings::default()),
            listener: Mutex::default(),
            server: server_url.to_owned(),
            turn: Mutex::default(),
        }
    }

    /// Sets who hears about calls. Without a listener, offers are answered busy.
    pub fn set_listener(&self, listener: Arc<dyn CallListener>) {
        *lock(&self.listener) = Some(listener);
    }

    /// Replaces the settings (for calls started from now on).
    pub fn configure(&self, settings: CallSettings) -> Result<()> {
        *lock(&self.settings) = settings.checked()?;
        Ok(())
    }

    fn settings(&self) -> CallSettings {
        lock(&self.settings).clone()
    }

    fn get(&self, call_id: &str) -> Result<Arc<Call>> {
        lock(&self.calls).get(call_id).cloned().ok_or_else(|| invalid("call_id", "no such call (or it ended)"))
    }

    /// The calls not ended.
    pub fn active(&self) -> Vec<CallInfo> {
        lock(&self.calls).values().map(|call| call.info()).collect()
    }

    /// Hands one 20 ms frame (960 samples, 48 kHz mono) of captured audio to `call_id`.
    pub fn push_audio(&self, call_id: &str, pcm: &[i16]) -> Result<()> {
        let call = self.get(call_id)?;
        let now = Instant::now();
        let mut media = lock(&call.media);
        media.send_frame(pcm, now)?;
        // Out at once rather than at the task's next turn.
        media.drive(now)?;
        Ok(())
    }

    /// The next 20 ms of audio to play for `call_id` (silence until media flows).
    pub fn pull_audio(&self, call_id: &str) -> Result<Vec<i16>> {
        let call = self.get(call_id)?;
        if call.state() != CallState::Connected {
            return Ok(vec![0; FRAME_SAMPLES]);
        }
        lock(&call.media).pull_frame()
    }

    /// This side's DTLS fingerprint in `call_id` (diagnostics and tests).
    pub fn fingerprint(&self, call_id: &str) -> Result<String> {
        Ok(lock(&self.get(call_id)?.media).local_fingerprint())
    }

    /// Where `call_id`'s TURN relay is (`None` if it has none).
    pub fn relay(&self, call_id: &str) -> Result<Option<TurnState>> {
        Ok(lock(&self.get(call_id)?.media).relay_state())
    }

    /// What `call_id`'s playout has done so far.
    pub fn jitter_stats(&self, call_id: &str) -> Result<crate::call::jitter::JitterStats> {
        Ok(lock(&self.get(call_id)?.media).jitter_stats())
    }

    /// Mutes (sends silence) or unmutes `call_id`.
    pub fn set_muted(&self, call_id: &str, muted: bool) -> Result<()> {
        lock(&self.get(call_id)?.media).set_muted(muted);
        Ok(())
    }

    /// Moves `call` to `state` (not out of `Ended`); tells the listener.
    fn set(&self, call: &Call, state: CallState, reason: Option<CallEndReason>, detail: &str) -> bool {
        {
            let mut status = lock(&call.status);
            if status.state == CallState::Ended || status.state == state {
                return false;
            }
            *status = Status { state, reason, detail: detail.to_owned(), since: Instant::now() };
        }
        if state == CallState::Ended {
            lock(&self.calls).remove(&call.id);
            tracing::info!(call_id = %call.id, reason = ?reason, "call ended");
        }
        call.wake.notify_one();
        let listener = lock(&self.listener).clone();
        if let Some(listener) = listener {
            listener.on_call_changed(call.info());
        }
        true
    }

    fn end(&self, call: &Call, reason: CallEndReason, detail: &str) -> bool {
        self.set(call, CallState::Ended, Some(reason), detail)
    }

    /// The relay refused a signal of `call_id`: the call fails.
    pub fn signal_refused(&self, call_id: &str, reason: &str) {
        if let Ok(call) = self.get(call_id) {
            self.end(&call, CallEndReason::Failed, &format!("the relay refused a signal: {reason}"));
        }
    }

    /// The local address calls receive media on.
    fn media_ip(&self, settings: &CallSettings) -> Result<IpAddr> {
        if let Some(ip) = &settings.media_ip {
            return ip.parse().map_err(|_| invalid("media_ip", "not an IP address"));
        }
        let url = reqwest::Url::parse(&self.server).map_err(|e| ClientError::Call(format!("server URL: {e}")))?;
        let host = url.host_str().ok_or_else(|| ClientError::Call("the server URL has no host".into()))?;
        let port = url.port_or_known_default().unwrap_or(443);
        let server = std::net::ToSocketAddrs::to_socket_addrs(&(host.trim_matches(['[', ']']), port))
            .map_err(|e| ClientError::Network(format!("resolving {host}: {e}")))?
            .next()
            .ok_or_else(|| ClientError::Network(format!("{host} has no address")))?;
        // Connecting a UDP socket sends nothing; it picks the route's local address.
        let unspecified: IpAddr = if server.is_ipv4() { [0, 0, 0, 0].into() } else { [0u16; 8].into() };
        let probe = std::net::UdpSocket::bind((unspecified, 0)).map_err(|e| ClientError::Call(e.to_string()))?;
        probe.connect(server).map_err(|e| ClientError::Network(format!("no route to the server: {e}")))?;
        Ok(probe.local_addr().map_err(|e| ClientError::Call(e.to_string()))?.ip())
    }

    fn register(&self, call: Call) -> Result<Arc<Call>> {
        let mut calls = lock(&self.calls);
        if !calls.is_empty() {
            return Err(invalid("to", "another call is in progress"));
        }
        let call = Arc::new(call);
        calls.insert(call.id.clone(), call.clone());
        Ok(call)
    }

    fn new_call(&self, id: String, peer: &str, outgoing: bool, media: MediaSession) -> Call {
        let state = if outgoing { CallState::Outgoing } else { CallState::Incoming };
        Call {
            id,
            peer: peer.to_owned(),
            outgoing,
            media: Mutex::new(media),
            status: Mutex::new(Status { state, reason: None, detail: String::new(), since: Instant::now() }),
            offer: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            signalled: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// Sends `signal` about `call`; a failure ends the call as `Failed` (returned).
async fn send(calls: &Calls, signaller: &dyn Signaller, call: &Call, signal: CallSignal) -> Result<()> {
    if let Err(error) = signaller.signal(&call.peer, signal).await {
        calls.end(call, CallEndReason::Failed, &format!("signalling: {error}"));
        return Err(error);
    }
    Ok(())
}

/// Tells the peer the call is over (best effort: it also ends on its own timers).
async fn tell_hangup(signaller: &dyn Signaller, call: &Call, reason: HangupReason) {
    let signal = CallSignal::Hangup { call_id: call.id.clone(), reason };
    if let Err(error) = signaller.signal(&call.peer, signal).await {
        tracing::info!(call_id = %call.id, %error, "the hangup could not be sent");
    }
}

/// Calls `to`: sends the offer and its candidates; returns the call id.
pub async fn start_call(calls: &Arc<Calls>, signaller: Rc<dyn Signaller>, to: &str) -> Result<String> {
    let settings = calls.settings();
    let mut media = MediaSession::new(calls.media_ip(&settings)?, Instant::now())?;
    let offer = media.create_offer()?;
    let candidates = if settings.relay_only { Vec::new() } else { media.gather()? };
    let id = uuid::Uuid::now_v7().to_string();
    let call = calls.register(calls.new_call(id.clone(), to, true, media))?;
    // Heard before anything is sent, so that no answer can overtake it.
    if let Some(listener) = lock(&calls.listener).clone() {
        listener.on_call_changed(call.info());
    }
    tokio::task::spawn_local(run(calls.clone(), signaller.clone(), call.clone()));
    send(calls, &*signaller, &call, CallSignal::Offer { call_id: id.clone(), sdp: offer }).await?;
    for candidate in candidates {
        send(calls, &*signaller, &call, CallSignal::Candidate { call_id: id.clone(), candidate }).await?;
    }
    call.set_signalled();
    Ok(id)
}

/// Answers the incoming call `call_id`.
pub async fn accept_call(calls: &Calls, signaller: &dyn Signaller, call_id: &str) -> Result<()> {
    let call = calls.get(call_id)?;
    if call.state() != CallState::Incoming {
        return Err(invalid("call_id", "not an incoming call that rings"));
    }
    let offer = lock(&call.offer).take().ok_or_else(|| invalid("call_id", "already answered"))?;
    let relay_only = calls.settings().relay_only;
    let prepared = {
        let mut media = lock(&call.media);
        let candidates = |media: &mut MediaSession| if relay_only { Ok(Vec::new()) } else { media.gather() };
        media.accept_offer(&offer).and_then(|answer| Ok((answer, candidates(&mut media)?)))
    };
    let (answer, candidates) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            tell_hangup(signaller, &call, HangupReason::IceFailed).await;
            calls.end(&call, CallEndReason::Failed, &error.to_string());
            return Err(error);
        }
    };
    // Answered: the ring time no longer applies, the ICE time does.
    calls.set(&call, CallState::Connecting, None, "");
    send(calls, signaller, &call, CallSignal::Answer { call_id: call.id.clone(), sdp: answer }).await?;
    for candidate in candidates {
        send(calls, signaller, &call, CallSignal::Candidate { call_id: call.id.clone(), candidate }).await?;
    }
    call.set_signalled();
    Ok(())
}

/// Declines the incoming call `call_id`.
pub async fn reject_call(calls: &Calls, signaller: &dyn Signaller, call_id: &str) -> Result<()> {
    let call = calls.get(call_id)?;
    if call.state() != CallState::Incoming {
        return Err(invalid("call_id", "not an incoming call that rings"));
    }
    calls.end(&call, CallEndReason::Rejected, "");
    tell_hangup(signaller, &call, HangupReason::Rejected).await;
    Ok(())
}

/// Hangs up `call_id` (any state but ended).
pub async fn hang_up(calls: &Calls, signaller: &dyn Signaller, call_id: &str) -> Result<()> {
    let call = calls.get(call_id)?;
    calls.end(&call, CallEndReason::Hangup, "");
    tell_hangup(signaller, &call, HangupReason::Hangup).await;
    Ok(())
}

/// Hangs up every call (the client is closing).
pub async fn hang_up_all(calls: &Calls, signaller: &dyn Signaller) {
    let active: Vec<Arc<Call>> = lock(&calls.calls).values().cloned().collect();
    for call in active {
        if calls.end(&call, CallEndReason::Hangup, "the client closed") {
            tell_hangup(signaller, &call, HangupReason::Hangup).await;
        }
    }
}

/// Handles a signal from `from` (sent at `sent_at_ms` by their clock).
pub async fn on_signal(
    calls: &Arc<Calls>,
    signaller: Rc<dyn Signaller>,
    from: &str,
    signal: CallSignal,
    sent_at_ms: u64,
) {
    let ours = |call_id: &str| calls.get(call_id).ok().filter(|call| call.peer == from);
    match signal {
        CallSignal::Offer { call_id, sdp } => {
            let settings = calls.settings();
            let age = Duration::from_millis(crate::signal::now_ms().saturating_sub(sent_at_ms));
            if age > settings.ring() {
                tracing::info!(%call_id, ?age, "dropped an offer older than the ring time");
                return;
            }
            if uuid::Uuid::parse_str(&call_id).is_err() || calls.get(&call_id).is_ok() {
                tracing::info!(%call_id, "dropped an offer with a bad or known call id");
                return;
            }
            // Glare: both called at once. Both sides compare the same two ids.
            let crossing = lock(&calls.calls)
                .values()
                .find(|c| c.peer == from && c.outgoing && c.state() == CallState::Outgoing)
                .cloned();
            if let Some(ours) = crossing {
                if ours.id > call_id {
                    tracing::info!(%call_id, "glare: our call wins; theirs gives way when our offer arrives");
                    return;
                }
                if calls.end(
                    &ours,
                    CallEndReason::Glare,
                    "the peer called at the same moment; their call rings instead",
                ) {
                    // Should their call have ended meanwhile and ours rung there.
                    tell_hangup(&*signaller, &ours, HangupReason::Hangup).await;
                }
            }
            let busy = lock(&calls.listener).is_none() || !lock(&calls.calls).is_empty();
            let media = if busy {
                Err(ClientError::Call("busy".into()))
            } else {
                calls.media_ip(&settings).and_then(|ip| MediaSession::new(ip, Instant::now()))
            };
            let call = media.and_then(|media| calls.register(calls.new_call(call_id.clone(), from, false, media)));
            let call = match call {
                Ok(call) => call,
                Err(error) => {
                    tracing::info!(%call_id, %error, "an incoming call was answered busy");
                    let signal = CallSignal::Hangup { call_id, reason: HangupReason::Busy };
                    if let Err(error) = signaller.signal(from, signal).await {
                        tracing::info!(%error, "the busy answer could not be sent");
                    }
                    return;
                }
            };
            *lock(&call.offer) = Some(sdp);
            // It has rung since it was sent (as far as the clocks agree).
            if let Some(sent) = Instant::now().checked_sub(age) {
                lock(&call.status).since = sent;
            }
            tokio::task::spawn_local(run(calls.clone(), signaller, call.clone()));
            if let Some(listener) = lock(&calls.listener).clone() {
                listener.on_call_changed(call.info());
            }
        }
        CallSignal::Answer { call_id, sdp } => {
            let Some(call) = ours(&call_id).filter(|c| c.outgoing && c.state() == CallState::Outgoing) else {
                return;
            };
            let accepted = lock(&call.media).accept_answer(&sdp);
            match accepted {
                Ok(()) => {
                    calls.set(&call, CallState::Connecting, None, "");
                }
                Err(error) => {
                    calls.end(&call, CallEndReason::Failed, &error.to_string());
                    tell_hangup(&*signaller, &call, HangupReason::IceFailed).await;
                }
            }
        }
        CallSignal::Candidate { call_id, candidate } => {
            if let Some(call) = ours(&call_id)
                && let Err(error) = lock(&call.media).add_remote_candidate(&candidate)
            {
                tracing::info!(%call_id, %error, "ignored a candidate");
            }
        }
        CallSignal::Hangup { call_id, reason } => {
            if let Some(call) = ours(&call_id) {
                calls.end(&call, reason.received(), "");
            }
        }
    }
}

/// Starts allocating a TURN relay for `call` (credential fetched, or
/// reused for half its lifetime); its candidate is trickled once granted.
async fn attach_relay(calls: &Calls, signaller: &dyn Signaller, call: &Call) -> std::result::Result<(), String> {
    let cached =
        lock(&calls.turn).clone().filter(|(credential, at)| at.elapsed() < Duration::from_secs(credential.ttl / 2));
    let credential = match cached {
        Some((credential, _)) => credential,
        None => {
            let fetched = signaller.turn_credential().await.map_err(|e| format!("no TURN credential: {e}"))?;
            let credential = fetched.ok_or("the server has no TURN relay")?;
            *lock(&calls.turn) = Some((credential.clone(), Instant::now()));
            credential
        }
    };
    let server = credential.udp_server().await.ok_or("none of the TURN servers is reachable over UDP")?;
    if call.state() == CallState::Ended {
        return Ok(()); // over while the credential was on its way: nothing to allocate
    }
    lock(&call.media).start_relay(server, &credential.username, &credential.credential, Instant::now());
    Ok(())
}

/// A call's task: drives its media when a packet arrives or a timer is
/// due, moves it to `Connected`, ends it on time; returns once it ended.
async fn run(calls: Arc<Calls>, signaller: Rc<dyn Signaller>, call: Arc<Call>) {
    let settings = calls.settings();
    // The same socket, registered with the runtime to wake this task (`drive` reads it).
    let socket = lock(&call.media).socket().and_then(|socket| {
        tokio::net::UdpSocket::from_std(socket).map_err(|e| ClientError::Call(format!("media socket: {e}")))
    });
    let socket = match socket {
        Ok(socket) => socket,
        Err(error) => {
            calls.end(&call, CallEndReason::Failed, &error.to_string());
            return;
        }
    };
    // Since when the connection has been lost (ICE says disconnected).
    let mut lost_since: Option<Instant> = None;
    let mut relay_asked = false;
    // Why the relay could not be had, once the attempt ended without one.
    let relay_missing: Rc<std::cell::RefCell<Option<String>>> = Rc::default();
    loop {
        if !relay_asked && call.signalled() {
            relay_asked = true;
            // Beside the media, not in its way: a direct path need not wait for the relay.
            let (calls, signaller, call, missing) =
                (calls.clone(), signaller.clone(), call.clone(), relay_missing.clone());
            tokio::task::spawn_local(async move {
                if let Err(why) = attach_relay(&calls, &*signaller, &call).await {
                    *missing.borrow_mut() = Some(why);
                    call.wake.notify_one();
                }
            });
        }
        let missing = relay_missing.borrow_mut().take();
        if let Some(why) = missing {
            if settings.relay_only {
                if calls.end(&call, CallEndReason::Failed, &format!("relay only, but {why}")) {
                    tell_hangup(&*signaller, &call, HangupReason::IceFailed).await;
                }
                return;
            }
            tracing::debug!(call_id = %call.id, why, "the call goes without a TURN relay");
        }
        let now = Instant::now();
        let driven = {
            let mut media = lock(&call.media);
            media.drive(now).and_then(|deadline| {
                let disconnected = media.ice_state() == str0m::IceConnectionState::Disconnected;
                let relay = media.take_relay_candidate()?;
                let relay_failed = match media.relay_state() {
                    Some(TurnState::Failed(why)) => Some(why),
                    _ => None,
                };
                Ok((
                    deadline,
                    media.is_connected(),
                    disconnected,
                    media.quiet_for(call.since(), now),
                    relay,
                    relay_failed,
                ))
            })
        };
        let (deadline, connected, disconnected, quiet, relay, relay_failed) = match driven {
            Ok(driven) => driven,
            Err(error) => {
                calls.end(&call, CallEndReason::Failed, &error.to_string());
                tell_hangup(&*signaller, &call, HangupReason::IceFailed).await;
                return;
            }
        };
        if let Some(candidate) = relay {
            let signal = CallSignal::Candidate { call_id: call.id.clone(), candidate };
            if send(&calls, &*signaller, &call, signal).await.is_err() {
                return;
            }
        }
        if relay_failed.is_some() {
            // Perhaps refused: the next call asks for a fresh credential.
            lock(&calls.turn).take();
        }
        if let Some(why) = relay_failed.filter(|_| settings.relay_only && !connected) {
            if calls.end(&call, CallEndReason::Failed, &format!("relay only, but {why}")) {
                tell_hangup(&*signaller, &call, HangupReason::IceFailed).await;
            }
            return;
        }
        let state = call.state();
        let in_state = now.saturating_duration_since(call.since());
        let ending = match state {
            CallState::Ended => return,
            CallState::Outgoing | CallState::Incoming if in_state >= settings.ring() => {
                Some((CallEndReason::NoAnswer, HangupReason::NoAnswer))
            }
            CallState::Connecting if connected => {
                calls.set(&call, CallState::Connected, None, "");
                None
            }
            CallState::Connecting if in_state >= settings.ice_failed_after() => {
                Some((CallEndReason::IceFailed, HangupReason::IceFailed))
            }
            CallState::Connected => {
                lost_since = if disconnected { lost_since.or(Some(now)) } else { None };
                let lost = lost_since.is_some_and(|since| now - since >= settings.ice_failed_after());
                (lost || quiet >= settings.ice_failed_after())
                    .then_some((CallEndReason::IceFailed, HangupReason::IceFailed))
            }
            _ => None,
        };
        if let Some((reason, told)) = ending {
            if calls.end(&call, reason, "") {
                tell_hangup(&*signaller, &call, told).await;
            }
            return;
        }
        let wake_at = deadline.min(now + Duration::from_millis(20));
        tokio::select! {
            ready = socket.readable() => {
                // Cleared before `drive` reads: a packet arriving after that wakes the task again.
                if ready.is_ok() {
                    let _ = socket.try_io(tokio::io::Interest::READABLE, || {
                        Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                    });
                }
            }
            () = tokio::time::sleep_until(wake_at.into()) => {}
            () = call.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records the signals instead of sending them (the real one is the
    /// client's connection, exercised in `tests/calls.rs`).
    #[derive(Default)]
    struct Recorded(RefCell<Vec<(String, CallSignal)>>);

    impl Signaller for Recorded {
        fn signal<'a>(&'a self, to: &'a str, signal: CallSignal) -> LocalBoxFuture<'a, Result<()>> {
            self.0.borrow_mut().push((to.to_owned(), signal));
            Box::pin(async { Ok(()) })
        }

        fn turn_credential(&self) -> LocalBoxFuture<'_, Result<Option<TurnCredential>>> {
            Box::pin(async { Ok(None) })
        }
    }

    struct Heard(Mutex<Vec<CallInfo>>);

    impl CallListener for Heard {
        fn on_call_changed(&self, call: CallInfo) {
            lock(&self.0).push(call);
        }
    }

    fn offer(call_id: &str) -> CallSignal {
        CallSignal::Offer { call_id: call_id.into(), sdp: "v=0".into() }
    }

    /// Calls on loopback with a listener that records what it hears and a
    /// signaller that records what is sent.
    fn listening() -> (Arc<Calls>, Arc<Heard>, Rc<Recorded>) {
        let calls = Arc::new(Calls::new("http://127.0.0.1:1"));
        calls
            .configure(CallSettings { media_ip: Some("127.0.0.1".into()), ..CallSettings::default() })
            .expect("valid settings");
        let heard = Arc::new(Heard(Mutex::default()));
        calls.set_listener(heard.clone());
        (calls, heard, Rc::new(Recorded::default()))
    }

    fn local<F: std::future::Future>(work: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        tokio::task::LocalSet::new().block_on(&runtime, work)
    }

    #[test]
    fn stale_offers_are_dropped_strangers_ignored_and_a_second_caller_is_answered_busy() {
        local(async {
            let (calls, heard, signaller) = listening();
            let (first, second) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
            let now = crate::signal::now_ms();

            // Sent 61 s ago: it stopped ringing before it arrived.
            on_signal(&calls, signaller.clone(), "x", offer(&first), now - 61_000).await;
            assert!(calls.active().is_empty() && signaller.0.borrow().is_empty(), "a stale offer rang");

            on_signal(&calls, signaller.clone(), "x", offer(&first), now).await;
            let active = calls.active();
            assert_eq!(active.len(), 1);
            assert_eq!(
                (active[0].state, active[0].peer.as_str(), active[0].outgoing),
                (CallState::Incoming, "x", false)
            );
            assert_eq!(lock(&heard.0).len(), 1, "the app heard of the incoming call");

            // A second caller while the first rings: busy, and the first call is untouched.
            on_signal(&calls, signaller.clone(), "y", offer(&second), now).await;
            let busy = CallSignal::Hangup { call_id: second.clone(), reason: HangupReason::Busy };
            assert_eq!(signaller.0.borrow().as_slice(), [("y".to_owned(), busy)]);
            assert_eq!(calls.active().len(), 1);

            // Someone other than the caller cannot end or steer the call.
            let hangup = CallSignal::Hangup { call_id: first.clone(), reason: HangupReason::Hangup };
            on_signal(&calls, signaller.clone(), "y", hangup.clone(), now).await;
            on_signal(
                &calls,
                signaller.clone(),
                "y",
                CallSignal::Answer { call_id: first.clone(), sdp: "v=0".into() },
                now,
            )
            .await;
            assert_eq!(calls.active()[0].state, CallState::Incoming);

            // The caller hangs up.
            on_signal(&calls, signaller.clone(), "x", hangup, now).await;
            assert!(calls.active().is_empty());
            let last = lock(&heard.0).last().cloned().expect("heard");
            assert_eq!((last.state, last.end_reason), (CallState::Ended, Some(CallEndReason::RemoteEnded)));
            assert!(matches!(calls.pull_audio(&first), Err(ClientError::Invalid { .. })));
        });
    }

    #[test]
    fn when_two_call_each_other_at_once_the_greater_call_id_rings_and_nobody_is_busy() {
        local(async {
            let (calls, heard, signaller) = listening();
            let ours = start_call(&calls, signaller.clone(), "x").await.expect("the call starts");
            let sent = signaller.0.borrow().len();
            let now = crate::signal::now_ms();
            // UUIDv7 ids of now lie between these two.
            let (smaller, greater) =
                ("00000000-0000-7000-8000-000000000000".to_owned(), "ffffffff-ffff-7fff-bfff-ffffffffffff".to_owned());
            assert!(smaller < ours && ours < greater);

            // Their offer has the smaller id: ours wins; theirs is dropped without a busy.
            on_signal(&calls, signaller.clone(), "x", offer(&smaller), now).await;
            assert_eq!(signaller.0.borrow().len(), sent, "nothing was answered to the call that gives way");
            let active = calls.active();
            assert_eq!(
                (active.len(), active[0].call_id.as_str(), active[0].state),
                (1, ours.as_str(), CallState::Outgoing)
            );

            // Someone else calling at the same time is busy, glare or not.
            on_signal(&calls, signaller.clone(), "y", offer(&greater), now).await;
            let busy = CallSignal::Hangup { call_id: greater.clone(), reason: HangupReason::Busy };
            assert_eq!(signaller.0.borrow().last(), Some(&("y".to_owned(), busy)));
            assert_eq!(calls.active().len(), 1);

            // Their offer has the greater id: ours gives way, theirs rings.
            on_signal(&calls, signaller.clone(), "x", offer(&greater), now).await;
            let withdrawn = CallSignal::Hangup { call_id: ours.clone(), reason: HangupReason::Hangup };
            assert_eq!(signaller.0.borrow().last(), Some(&("x".to_owned(), withdrawn)));
            let active = calls.active();
            assert_eq!(
                (active.len(), active[0].call_id.as_str(), active[0].state, active[0].outgoing),
                (1, greater.as_str(), CallState::Incoming, false)
            );
            let heard = lock(&heard.0).clone();
            let ended = heard.iter().find(|c| c.call_id == ours && c.state == CallState::Ended).expect("ours ended");
            assert_eq!(ended.end_reason, Some(CallEndReason::Glare));
            assert_eq!(heard.last().map(|c| (c.call_id.clone(), c.state)), Some((greater, CallState::Incoming)));
        });
    }

    #[test]
    fn without_a_listener_every_offer_is_answered_busy() {
        local(async {
            let calls = Arc::new(Calls::new("http://127.0.0.1:1"));
            let signaller = Rc::new(Recorded::default());
            let id = uuid::Uuid::now_v7().to_string();
            on_signal(&calls, signaller.clone(), "x", offer(&id), crate::signal::now_ms()).await;
            assert!(calls.active().is_empty());
            let busy = CallSignal::Hangup { call_id: id, reason: HangupReason::Busy };
            assert_eq!(signaller.0.borrow().as_slice(), [("x".to_owned(), busy)]);
        });
    }

    #[test]
    fn signals_are_tagged_json_and_round_trip() {
        let signal = CallSignal::Hangup { call_id: "c".into(), reason: HangupReason::NoAnswer };
        let json = serde_json::to_string(&signal).expect("serialises");
        assert_eq!(json, r#"{"kind":"hangup","call_id":"c","reason":"no_answer"}"#);
        assert_eq!(serde_json::from_str::<CallSignal>(&json).expect("parses"), signal);
        assert!(serde_json::from_str::<CallSignal>(r#"{"kind":"dial","call_id":"c"}"#).is_err());
    }

    #[test]
    fn a_hangups_reason_becomes_the_receivers_end_reason() {
        assert_eq!(HangupReason::Hangup.received(), CallEndReason::RemoteEnded);
        assert_eq!(HangupReason::Rejected.received(), CallEndReason::Rejected);
        assert_eq!(HangupReason::Busy.received(), CallEndReason::Busy);
        assert_eq!(HangupReason::NoAnswer.received(), CallEndReason::NoAnswer);
        assert_eq!(HangupReason::IceFailed.received(), CallEndReason::IceFailed);
    }

    #[test]
    fn settings_are_checked() {
        assert!(CallSettings::default().checked().is_ok());
        let short = CallSettings { ring_timeout_ms: 50, ..CallSettings::default() };
        assert!(matches!(short.checked(), Err(ClientError::Invalid { field, .. }) if field == "ring_timeout_ms"));
        let ip = CallSettings { media_ip: Some("localhost".into()), ..CallSettings::default() };
        assert!(matches!(ip.checked(), Err(ClientError::Invalid { field, .. }) if field == "media_ip"));
    }
}
