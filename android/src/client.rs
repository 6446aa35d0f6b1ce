//! [`Client`]: the object apps hold (exported with uniffi). Its methods are
//! blocking and thread-safe; the work runs on the client's own thread (a
//! single-threaded runtime), where the store and libsignal live. Events —
//! connection states, messages, identity changes — reach the app through its
//! [`ClientListener`], called from that thread.
//!
//! The connection: a login token (challenge signed with the identity key),
//! then the relay's WebSocket. A failed attempt is retried after an
//! exponential backoff with jitter (1 s base, ×2, capped at 60 s, each wait
//! drawn from the upper half of its step); after 10 failed attempts in a row
//! the state is `Error` until [`Client::connect`] is called again. A
//! connection that was up for 10 s or more and drops is retried at once,
//! from attempt 1; a shorter one counts as a failed attempt, and so does a
//! refused token (1008, after which the client logs in again). Displaced by
//! another connection of the same account (4409), the client goes
//! `Disconnected` and does not fight back. An incoming message is acked only
//! after it was decrypted and stored.
//!
//! Calls ([`crate::call::engine`]): signals received go to the call engine in
//! order; signals sent are tracked until the relay confirms them (a refusal
//! fails the call). Audio goes in and out on the platform's threads,
//! straight to the call, not through the client's thread.

use crate::call::engine::{self, CallInfo, CallListener, CallSettings, CallSignal, Calls, Signaller};
use crate::call::turn::TurnCredential;
use crate::core::{ChatMessage, Core, Incoming, OutgoingFrame, PrekeyReport};
use crate::error::{ClientError, Result};
use futures::future::LocalBoxFuture;
use futures::{FutureExt as _, SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// Failed attempts in a row before giving up.
pub const MAX_ATTEMPTS: u32 = 10;
/// The first wait.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest wait.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// How often a connected client pings the relay.
const PING_EVERY: Duration = Duration::from_secs(30);
/// At most this many incoming messages share one store commit.
const BURST: usize = 256;

/// The step of the wait after `failures` failed attempts: 1 s, 2 s, 4 s, … 60 s.
pub fn backoff_step(failures: u32) -> Duration {
    let doubled = BACKOFF_BASE.saturating_mul(1u32.checked_shl(failures.saturating_sub(1)).unwrap_or(u32::MAX));
    doubled.min(BACKOFF_CAP)
}

/// The wait after `failures` failed attempts, with `unit` ∈ [0, 1) as the
/// jitter: uniformly in the upper half of the step.
pub fn backoff_delay(failures: u32, unit: f64) -> Duration {
    let step = backoff_step(failures);
    step / 2 + step.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
}

/// Where the client is with the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum ConnectionState {
    /// Not connected, not trying.
    Disconnected,
    /// Trying (or waiting to try again).
    Connecting,
    /// Connected: messages flow.
    Connected,
    /// Gave up after 10 failed attempts; `connect()` starts again.
    Error,
}

/// What the app hears from the client (called on the client's thread).
#[uniffi::export(with_foreign)]
pub trait ClientListener: Send + Sync {
    /// The connection state changed; `detail` says why (empty if nothing to say).
    fn on_state_changed(&self, state: ConnectionState, detail: String);
    /// A message arrived, was decrypted and stored.
    fn on_message(&self, message: ChatMessage);
    /// The relay durably accepted a message this client sent.
    fn on_sent(&self, message_id: String);
    /// The relay refused a message this client sent (it will not be retried).
    fn on_send_failed(&self, message_id: String, reason: String);
    /// A contact's identity key changed. Their messages are held (not
    /// acknowledged, not shown) until `trust_identity` is called; compare
    /// `safety_number` with them first. Told once per change (and again
    /// after the client is reopened), however many messages are held.
    fn on_identity_changed(&self, contact: String, safety_number: String);
    /// A message that can never be decrypted was received and dropped.
    fn on_undecryptable(&self, from: String, reason: String);
}

/// Waits between reconnect attempts. The real one sleeps; tests inject one
/// that records the waits and returns at once.
pub trait Pause: Send + Sync + 'static {
    /// Waits `delay` before attempt `failures + 1`.
    fn pause(&self, failures: u32, delay: Duration) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// Sleeps.
pub struct Sleep;

impl Pause for Sleep {
    fn pause(&self, _failures: u32, delay: Duration) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(delay))
    }
}

/// Where a client keeps its store and which server it talks to.
#[derive(Clone, Debug, uniffi::Record)]
pub struct ClientConfig {
    /// The store file (created if missing).
    pub store_path: String,
    /// 32 bytes from the platform (Android: a key wrapped by the Keystore).
    pub store_key: Vec<u8>,
    /// `https://chat.example.org` (or `http://127.0.0.1:8080`).
    pub server_url: String,
}

type Job = Box<dyn FnOnce(Rc<Runner>) -> LocalBoxFuture<'static, ()> + Send>;

/// The privcomm client.
#[derive(uniffi::Object)]
pub struct Client {
    /// `None` once closed; dropping the sender ends the client's thread.
    jobs: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    state: Arc<Mutex<ConnectionState>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Calls, shared with the client's thread (audio goes in and out here directly).
    calls: Arc<Calls>,
}

struct Runner {
    core: Core,
    listener: Arc<dyn ClientListener>,
    pause: Arc<dyn Pause>,
    state: Arc<Mutex<ConnectionState>>,
    /// The running connection: what to send, and its stop switch.
    link: RefCell<Option<(mpsc::UnboundedSender<Outgoing>, watch::Sender<bool>)>>,
    /// Which connection task may report states (an older one winding down may not).
    generation: std::cell::Cell<u64>,
    /// Incoming messages decrypted but not yet shown: their commit failed.
    /// They are shown (and acked) after the next commit that succeeds.
    unshown: RefCell<Vec<(String, Incoming)>>,
    calls: Arc<Calls>,
    /// Call signals received, handled in order by the calls task.
    call_inbox: mpsc::UnboundedSender<(String, CallSignal, u64)>,
    /// Call signals sent and not yet confirmed by the relay: message id → call id.
    signals_in_flight: RefCell<std::collections::HashMap<String, String>>,
    /// Contacts whose identity change the app was told of (once each, until trusted).
    told_identity_changed: RefCell<std::collections::HashSet<String>>,
}

/// What the connection task sends.
enum Outgoing {
    /// A message.
    Send(OutgoingFrame),
    /// An acknowledgement (of a held message decrypted after `trust_identity`).
    Ack(String),
}

#[uniffi::export]
impl Client {
    /// Opens the store (a wrong key fails here, changing nothing) and
    /// prepares the client; call [`Client::connect`] to go online.
    #[uniffi::constructor]
    pub fn new(config: ClientConfig, listener: Arc<dyn ClientListener>) -> Result<Arc<Client>> {
        Client::with_pause(config, listener, Arc::new(Sleep))
    }

    /// Registers a new account for `phone` (only its SHA-256 is sent); returns the user id.
    pub fn register(&self, phone: String) -> Result<String> {
        self.call(move |r| Box::pin(async move { r.core.register(&phone).await }))
    }

    /// Replaces this account's identity key (contacts are told it changed);
    /// every session starts again.
    pub fn reset_identity(&self) -> Result<()> {
        self.call(|r| Box::pin(async move { r.core.reset_identity().await }))
    }

    /// This account's user id, if registered.
    pub fn user_id(&self) -> Result<Option<String>> {
        self.call(|r| Box::pin(async move { r.core.user_id() }))
    }

    /// The safety number (60 digits) to compare with `contact`, out of band.
    pub fn safety_number(&self, contact: String) -> Result<String> {
        self.call(move |r| Box::pin(async move { r.core.safety_number(&contact) }))
    }

    /// Encrypts `text` for `to`, stores it and sends it (now if connected,
    /// else on the next connection); returns the message id once it is
    /// stored. A store error after the encryption (the commit failed) leaves
    /// the message queued: it goes out once a later commit succeeds.
    pub fn send_text(&self, to: String, text: String) -> Result<String> {
        self.call(move |r| {
            Box::pin(async move {
                let (message, frame) = r.core.prepare_text(&to, &text).await?;
                // Stored before it leaves (calls made meanwhile share the commit).
                r.core.durable().await?;
                if let Some((outgoing, _)) = r.link.borrow().as_ref() {
                    let _ = outgoing.send(Outgoing::Send(frame));
                }
                Ok(message.id)
            })
        })
    }

    /// The message log, oldest first.
    pub fn messages(&self) -> Result<Vec<ChatMessage>> {
        self.call(|r| Box::pin(async move { r.core.messages() }))
    }

    /// Accepts `contact`'s changed identity key and delivers their held messages.
    pub fn trust_identity(&self, contact: String) -> Result<()> {
        self.call(move |r| {
            Box::pin(async move {
                let held = r.core.trust_identity(&contact)?;
                // A later change is news again.
                r.told_identity_changed.borrow_mut().remove(&contact);
                let mut outcomes = Vec::with_capacity(held.len());
                for (id, kind, body) in held {
                    outcomes.push((r.core.receive_held(&id, &contact, &kind, &body).await?, id));
                }
                r.core.durable().await?;
                for (outcome, id) in outcomes {
                    // Acked now if connected (else the relay delivers it again, a duplicate, acked then).
                    if r.handled(&id, outcome)
                        && let Some((outgoing, _)) = r.link.borrow().as_ref()
                    {
                        let _ = outgoing.send(Outgoing::Ack(id));
                    }
                }
                Ok(())
            })
        })
    }

    /// Refills one-time prekeys below 20 with 100 (EC and Kyber apart) and
    /// rotates a signed prekey older than 7 days. Call every 24 h and after connecting.
    pub fn maintain_prekeys(&self) -> Result<PrekeyReport> {
        self.call(|r| Box::pin(async move { r.core.maintain_prekeys(crate::signal::now_ms()).await }))
    }

    /// Goes online (and keeps reconnecting); a no-op while already trying or connected.
    pub fn connect(&self) -> Result<()> {
        self.call(|r| {
            Box::pin(async move {
                if r.link.borrow().is_some() {
                    return Ok(());
                }
                r.core.user_id()?.ok_or(ClientError::NotRegistered)?;
                let (frames, outgoing) = mpsc::unbounded_channel();
                let (stop, stopped) = watch::channel(false);
                *r.link.borrow_mut() = Some((frames, stop));
                let generation = r.generation.get() + 1;
                r.generation.set(generation);
                tokio::task::spawn_local(Runner::connection(r.clone(), generation, outgoing, stopped));
                Ok(())
            })
        })
    }

    /// Goes offline.
    pub fn disconnect(&self) -> Result<()> {
        self.call(|r| {
            Box::pin(async move {
                if let Some((_, stop)) = r.link.borrow_mut().take() {
                    let _ = stop.send(true);
                }
                Ok(())
            })
        })
    }

    /// Sets who hears about calls. Until one is set, incoming calls are answered busy.
    pub fn set_call_listener(&self, listener: Arc<dyn CallListener>) {
        self.calls.set_listener(listener);
    }

    /// Ring time, ICE failure time and media address for calls from now on.
    pub fn configure_calls(&self, settings: CallSettings) -> Result<()> {
        self.calls.configure(settings)
    }

    /// Calls `to` (connected clients only); returns the call id. The call
    /// listener hears it progress: `Outgoing`, `Connecting`, `Connected`, `Ended`.
    pub fn start_call(&self, to: String) -> Result<String> {
        uuid::Uuid::parse_str(&to).map_err(|_| crate::error::invalid("to", "not a user id (UUID)"))?;
        self.call(move |r| {
            Box::pin(async move {
                if r.link.borrow().is_none() {
                    return Err(ClientError::NotConnected);
                }
                engine::start_call(&r.calls, r.clone(), &to).await
            })
        })
    }

    /// Answers the incoming call `call_id`.
    pub fn accept_call(&self, call_id: String) -> Result<()> {
        self.call(move |r| Box::pin(async move { engine::accept_call(&r.calls, &*r, &call_id).await }))
    }

    /// Declines the incoming call `call_id`.
    pub fn reject_call(&self, call_id: String) -> Result<()> {
        self.call(move |r| Box::pin(async move { engine::reject_call(&r.calls, &*r, &call_id).await }))
    }

    /// Ends the call `call_id`.
    pub fn hang_up(&self, call_id: String) -> Result<()> {
        self.call(move |r| Box::pin(async move { engine::hang_up(&r.calls, &*r, &call_id).await }))
    }

    /// Mutes (the peer hears silence) or unmutes the call `call_id`.
    pub fn set_muted(&self, call_id: String, muted: bool) -> Result<()> {
        self.calls.set_muted(&call_id, muted)
    }

    /// Hands 20 ms of captured audio (960 samples, 48 kHz mono) to the call
    /// `call_id`; call every 20 ms. Runs on the caller's thread.
    pub fn push_audio(&self, call_id: String, pcm: Vec<i16>) -> Result<()> {
        self.calls.push_audio(&call_id, &pcm)
    }

    /// The next 20 ms of audio to play for the call `call_id` (960 samples,
    /// 48 kHz mono; silence until media flows); call every 20 ms. Runs on the caller's thread.
    pub fn pull_audio(&self, call_id: String) -> Result<Vec<i16>> {
        self.calls.pull_audio(&call_id)
    }

    /// The calls not ended.
    pub fn active_calls(&self) -> Vec<CallInfo> {
        self.calls.active()
    }

    /// The connection state now.
    pub fn state(&self) -> ConnectionState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the client's thread (the store is closed; the object is unusable after). Kotlin's `close()` does it too.
    pub fn shutdown(&self) {
        // Calls are hung up while the connection can still say so.
        let _ = self.call(|r| {
            Box::pin(async move {
                engine::hang_up_all(&r.calls, &*r).await;
                Ok(())
            })
        });
        let _ = self.disconnect();
        // The thread ends when its queue has no sender left and it is empty.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Client {
    /// [`Client::maintain_prekeys`] as if the time were `now_ms` (tests: a
    /// signed prekey seven days old without waiting seven days).
    pub fn maintain_prekeys_at(&self, now_ms: u64) -> Result<PrekeyReport> {
        self.call(move |r| Box::pin(async move { r.core.maintain_prekeys(now_ms).await }))
    }

    /// This side's DTLS fingerprint in the call `call_id`, as its offer or
    /// answer carries it (diagnostics; tests search the server for it).
    pub fn call_fingerprint(&self, call_id: &str) -> Result<String> {
        self.calls.fingerprint(call_id)
    }

    /// Where the call `call_id`'s TURN relay is (`None` if it has none;
    /// diagnostics).
    pub fn call_relay(&self, call_id: &str) -> Result<Option<crate::call::turn::TurnState>> {
        self.calls.relay(call_id)
    }

    /// What the playout of the call `call_id` has done so far (frames played,
    /// concealed, late, skipped; diagnostics and the benchmark).
    pub fn call_jitter_stats(&self, call_id: &str) -> Result<crate::call::jitter::JitterStats> {
        self.calls.jitter_stats(call_id)
    }

    /// [`Client::new`] with the waits between reconnect attempts injected.
    pub fn with_pause(
        config: ClientConfig,
        listener: Arc<dyn ClientListener>,
        pause: Arc<dyn Pause>,
    ) -> Result<Arc<Client>> {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let state = Arc::new(Mutex::new(ConnectionState::Disconnected));
        let calls = Arc::new(Calls::new(&config.server_url));
        let thread_calls = calls.clone();
        let (opened_tx, opened) = std::sync::mpsc::channel::<Result<()>>();
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("privcomm-client".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = opened_tx
                            .send(Err(ClientError::Store(format!("cannot start the client's runtime: {error}"))));
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let core = match Core::open(
                        std::path::Path::new(&config.store_path),
                        &config.store_key,
                        &config.server_url,
                    ) {
                        Ok(core) => core,
                        Err(error) => {
                            let _ = opened_tx.send(Err(error));
                            return;
                        }
                    };
                    let _ = opened_tx.send(Ok(()));
                    let (call_inbox, signals) = mpsc::unbounded_channel();
                    let runner = Rc::new(Runner {
                        core,
                        listener,
                        pause,
                        state: thread_state,
                        link: RefCell::new(None),
                        generation: std::cell::Cell::new(0),
                        unshown: RefCell::new(Vec::new()),
                        calls: thread_calls,
                        call_inbox,
                        signals_in_flight: RefCell::default(),
                        told_identity_changed: RefCell::default(),
                    });
                    tokio::task::spawn_local(Runner::call_signals(runner.clone(), signals));
                    while let Some(job) = queue.recv().await {
                        tokio::task::spawn_local(job(runner.clone()));
                    }
                    // Closed: stop the connection, let it say goodbye.
                    if let Some((_, stop)) = runner.link.borrow_mut().take() {
                        let _ = stop.send(true);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                });
            })
            .map_err(|e| ClientError::Store(format!("cannot start the client's thread: {e}")))?;
        match opened.recv() {
            Ok(Ok(())) => {
                Ok(Arc::new(Client { jobs: Mutex::new(Some(jobs)), state, thread: Mutex::new(Some(thread)), calls }))
            }
            Ok(Err(error)) => {
                let _ = thread.join();
                Err(error)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ClientError::Closed)
            }
        }
    }

    /// Runs `work` on the client's thread and waits for its result.
    fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(Rc<Runner>) -> LocalBoxFuture<'static, Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = std::sync::mpsc::channel();
        let job: Job = Box::new(move |runner| {
            Box::pin(async move {
                let _ = reply.send(work(runner).await);
            })
        });
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(ClientError::Closed)?;
        jobs.send(job).map_err(|_| ClientError::Closed)?;
        answer.recv().map_err(|_| ClientError::Closed)?
    }
}

enum Outcome {
    /// `disconnect()` was called.
    Stopped,
    /// Another connection of this account took over (4409): do not fight it.
    Displaced,
    /// A connection was up for `up`, then ended.
    Dropped(String, std::time::Duration),
    /// No connection was made (or the relay refused the token).
    Failed(String),
}

/// A connection that lasted less than this and dropped counts as a failed
/// attempt, so a relay that accepts and drops at once is not hammered.
const STABLE_AFTER: Duration = Duration::from_secs(10);

impl Runner {
    fn set_state_of(&self, generation: u64, state: ConnectionState, detail: &str) {
        if generation == self.generation.get() {
            self.set_state(state, detail);
        }
    }

    fn set_state(&self, state: ConnectionState, detail: &str) {
        let changed = {
            let mut current = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let changed = *current != state;
            *current = state;
            changed
        };
        if changed || !detail.is_empty() {
            self.listener.on_state_changed(state, detail.to_owned());
        }
    }

    /// Tells the listener what became of an incoming message.
    fn handled(&self, id: &str, outcome: Incoming) -> bool {
        match outcome {
            Incoming::Stored(message) => {
                self.listener.on_message(message);
                true
            }
            Incoming::Duplicate => true,
            Incoming::Call { from, signal, sent_at_ms } => {
                let _ = self.call_inbox.send((from, signal, sent_at_ms));
                true
            }
            Incoming::Held { from } => {
                // Once per contact (and again after a restart), not once per held message.
                if self.told_identity_changed.borrow_mut().insert(from.clone()) {
                    let number = self.core.safety_number(&from).unwrap_or_default();
                    self.listener.on_identity_changed(from, number);
                }
                false
            }
            Incoming::Undecryptable { from, reason } => {
                tracing::warn!(message_id = id, %reason, "dropped an undecryptable message");
                self.listener.on_undecryptable(from, reason);
                true
            }
        }
    }

    /// Hands received call signals to the call engine, in order.
    async fn call_signals(self: Rc<Self>, mut signals: mpsc::UnboundedReceiver<(String, CallSignal, u64)>) {
        while let Some((from, signal, sent_at_ms)) = signals.recv().await {
            engine::on_signal(&self.calls, self.clone(), &from, signal, sent_at_ms).await;
        }
    }

    async fn connection(
        self: Rc<Self>,
        generation: u64,
        mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut failures = 0u32;
        let mut detail = String::new();
        loop {
            self.set_state_of(generation, ConnectionState::Connecting, "");
            let reason = match self.connect_once(generation, &mut outgoing, &mut stopped).await {
                Outcome::Stopped => break,
                Outcome::Displaced => {
                    detail = "this account connected elsewhere (4409); call connect() to take over".into();
                    break;
                }
                Outcome::Dropped(reason, up) if up >= STABLE_AFTER => {
                    tracing::info!(%reason, "connection ended; reconnecting");
                    failures = 0;
                    continue;
                }
                Outcome::Dropped(reason, _) | Outcome::Failed(reason) => reason,
            };
            failures += 1;
            if failures >= MAX_ATTEMPTS {
                if generation == self.generation.get() {
                    self.link.borrow_mut().take();
                }
                self.set_state_of(
                    generation,
                    ConnectionState::Error,
                    &format!("gave up after {failures} attempts: {reason}"),
                );
                return;
            }
            let delay = backoff_delay(failures, rand::random::<f64>());
            self.set_state_of(
                generation,
                ConnectionState::Connecting,
                &format!("attempt {failures} failed ({reason}); next in {delay:?}"),
            );
            tokio::select! {
                () = self.pause.pause(failures, delay) => {}
                _ = stopped.wait_for(|s| *s) => break,
            }
        }
        if generation == self.generation.get() {
            self.link.borrow_mut().take();
        }
        self.set_state_of(generation, ConnectionState::Disconnected, &detail);
    }

    async fn connect_once(
        &self,
        generation: u64,
        outgoing: &mut mpsc::UnboundedReceiver<Outgoing>,
        stopped: &mut watch::Receiver<bool>,
    ) -> Outcome {
        if *stopped.borrow() {
            return Outcome::Stopped;
        }
        let token = match self.core.token().await {
            Ok(token) => token,
            Err(error) => return Outcome::Failed(format!("login: {error}")),
        };
        let mut request = match self.core.api.websocket_url().into_client_request() {
            Ok(request) => request,
            Err(error) => return Outcome::Failed(error.to_string()),
        };
        match format!("Bearer {token}").parse() {
            Ok(value) => request.headers_mut().insert("authorization", value),
            Err(_) => return Outcome::Failed("token is not a header value".into()),
        };
        let socket = tokio::select! {
            connected = tokio_tungstenite::connect_async(request) => match connected {
                Ok((socket, _)) => socket,
                Err(error) => return Outcome::Failed(format!("relay: {error}")),
            },
            _ = stopped.wait_for(|s| *s) => return Outcome::Stopped,
        };
        let (mut sink, stream) = socket.split();
        let mut stream = stream.peekable();
        let since = std::time::Instant::now();
        self.set_state_of(generation, ConnectionState::Connected, "");
        // What was queued while offline (the relay de-duplicates by id).
        let queued = match self.core.outbox().await {
            Ok(frames) => frames,
            Err(error) => {
                tracing::warn!(%error, "cannot read the outbox");
                Vec::new()
            }
        };
        for frame in queued {
            if sink.send(Message::Text(send_frame(&frame).into())).await.is_err() {
                return Outcome::Dropped("send failed".into(), since.elapsed());
            }
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => {
                    // What was handed over before `disconnect()` (a hangup at shutdown) still goes.
                    while let Ok(next) = outgoing.try_recv() {
                        if sink.send(Message::Text(outgoing_text(next).into())).await.is_err() {
                            break;
                        }
                    }
                    let _ = sink.send(Message::Close(None)).await;
                    return Outcome::Stopped;
                }
                Some(next) = outgoing.recv() => {
                    if sink.send(Message::Text(outgoing_text(next).into())).await.is_err() {
                        return Outcome::Dropped("send failed".into(), since.elapsed());
                    }
                }
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                        return Outcome::Dropped("ping failed".into(), since.elapsed());
                    }
                }
                message = stream.next() => match message {
                    Some(Ok(Message::Text(text))) => {
                        // The frames already here form a burst: decrypted and
                        // staged one by one, made durable in one commit, then
                        // shown and acked.
                        let mut received = Vec::new();
                        let mut next = Some(text);
                        while let Some(text) = next.take() {
                            if let Ok(frame) = serde_json::from_str::<Value>(text.as_str())
                                && let Some(outcome) = self.on_frame(&frame).await
                            {
                                received.push(outcome);
                            }
                            let text_waits = matches!(
                                Pin::new(&mut stream).peek().now_or_never(),
                                Some(Some(Ok(Message::Text(_))))
                            );
                            if text_waits
                                && received.len() < BURST
                                && let Some(Some(Ok(Message::Text(text)))) = stream.next().now_or_never()
                            {
                                next = Some(text);
                            }
                        }
                        if received.is_empty() {
                            continue;
                        }
                        if let Err(error) = self.core.durable().await {
                            // Not stored, so neither shown nor acked: the relay delivers
                            // them again (as duplicates of what is staged), and they are
                            // shown once a commit succeeds.
                            tracing::warn!(%error, "cannot store incoming messages");
                            self.unshown.borrow_mut().extend(received);
                            return Outcome::Dropped(format!("cannot store incoming messages: {error}"), since.elapsed());
                        }
                        let earlier = std::mem::take(&mut *self.unshown.borrow_mut());
                        for (id, outcome) in earlier.into_iter().chain(received) {
                            if self.handled(&id, outcome)
                                && sink.send(Message::Text(ack_frame(&id).into())).await.is_err()
                            {
                                return Outcome::Dropped("ack failed".into(), since.elapsed());
                            }
                        }
                    }
                    Some(Ok(Message::Close(close))) => {
                        let code = close.as_ref().map_or(1005, |c| u16::from(c.code));
                        match code {
                            4409 => return Outcome::Displaced,
                            1008 => {
                                // The token was refused: log in again on the next attempt.
                                self.core.forget_token();
                                return Outcome::Failed("the relay refused the login token (1008)".into());
                            }
                            _ => return Outcome::Dropped(format!("closed by the relay ({code})"), since.elapsed()),
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Outcome::Dropped(error.to_string(), since.elapsed()),
                    None => return Outcome::Dropped("the relay went away".into(), since.elapsed()),
                },
            }
        }
    }

    /// Handles a relay frame; returns an incoming message's id and what
    /// became of it (staged: to show and ack once durable).
    async fn on_frame(&self, frame: &Value) -> Option<(String, Incoming)> {
        let text = |field: &str| frame[field].as_str().unwrap_or_default().to_owned();
        match frame["type"].as_str() {
            Some("message") => {
                let id = text("id");
                let Ok(body) = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text("body")) else {
                    let reason = "the body is not Base64".to_owned();
                    return Some((id, Incoming::Undecryptable { from: text("from"), reason }));
                };
                match self.core.receive(&id, &text("from"), &text("kind"), &body).await {
                    Ok(outcome) => Some((id, outcome)),
                    Err(error) => {
                        // A store failure: not stored, so not acked; it comes again.
                        tracing::warn!(%error, "cannot store an incoming message");
                        None
                    }
                }
            }
            Some("sent") => {
                let id = text("id");
                if self.signals_in_flight.borrow_mut().remove(&id).is_none()
                    && let Ok(true) = self.core.mark_sent(&id).await
                {
                    self.listener.on_sent(id);
                }
                None
            }
            Some("error") => {
                let (reference, message) = (text("ref"), text("message"));
                let reason = format!("{}: {message}", text("code"));
                let call = self.signals_in_flight.borrow_mut().remove(&reference);
                if let Some(call_id) = call {
                    self.calls.signal_refused(&call_id, &reason);
                } else if !reference.is_empty()
                    && let Ok(true) = self.core.mark_sent(&reference).await
                {
                    self.listener.on_send_failed(reference, reason);
                }
                None
            }
            _ => None,
        }
    }
}

impl Signaller for Runner {
    fn signal<'a>(&'a self, to: &'a str, signal: CallSignal) -> LocalBoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let link = self.link.borrow().as_ref().map(|(outgoing, _)| outgoing.clone());
            let link = link.ok_or(ClientError::NotConnected)?;
            let frame = self.core.prepare_signal(to, &signal).await?;
            // Like a message: nothing leaves before the session state is stored.
            self.core.durable().await?;
            let mut in_flight = self.signals_in_flight.borrow_mut();
            // Confirmations lost with a connection are never coming: forget them now and then.
            if in_flight.len() >= 1024 {
                in_flight.clear();
            }
            in_flight.insert(frame.id.clone(), signal.call_id().to_owned());
            link.send(Outgoing::Send(frame)).map_err(|_| ClientError::NotConnected)
        })
    }

    fn turn_credential(&self) -> LocalBoxFuture<'_, Result<Option<TurnCredential>>> {
        Box::pin(async move {
            let token = self.core.token().await?;
            self.core.api.turn(&token).await
        })
    }
}

fn outgoing_text(next: Outgoing) -> String {
    match next {
        Outgoing::Send(frame) => send_frame(&frame),
        Outgoing::Ack(id) => ack_frame(&id),
    }
}

fn send_frame(frame: &OutgoingFrame) -> String {
    let body = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &frame.body);
    json!({ "v": 1, "type": "send", "id": frame.id, "to": frame.to, "kind": frame.kind, "body": body }).to_string()
}

fn ack_frame(id: &str) -> String {
    json!({ "v": 1, "type": "ack", "id": id }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_one_second_to_a_sixty_second_cap() {
        let steps: Vec<u64> = (1..=10).map(|n| backoff_step(n).as_secs()).collect();
        assert_eq!(steps, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(backoff_step(40), BACKOFF_CAP);
        for n in 1..=12 {
            let step = backoff_step(n);
            assert_eq!(backoff_delay(n, 0.0), step / 2);
            assert_eq!(backoff_delay(n, 1.0), step);
            let middle = backoff_delay(n, 0.5);
            assert!(middle > step / 2 && middle < step);
        }
    }
}
