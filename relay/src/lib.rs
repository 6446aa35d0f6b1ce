//! privcomm's WebSocket relay nodes.
//!
//! A relay authenticates a connection with a login token, drains the
//! recipient's backlog in log order, then pushes live messages; a client's
//! `send` is acknowledged (`sent`) only after `MessageAccepted` is committed,
//! and its `ack` appends `MessageDelivered`. Architecture invariant: the
//! relay never holds plaintext — bodies are Signal ciphertext it cannot read.
//!
//! Parts: [`frames`], the versioned wire protocol and its strict parser
//! (docs/PROTOCOL.md); [`hub`], this node's connections (one per user, newer
//! displaces older with 4409); [`connection`], one connection's loop. The
//! mailbox rules are the `privcomm_domain::mailbox` aggregate, decided and
//! appended through the API's aggregate directory.
//!
//! [`presence`] carries what crosses nodes: doorbells from the event bus and
//! presence signals (takeover, and who is online anywhere). [`push`] tells
//! offline recipients' devices that they have mail.

pub mod connection;
pub mod frames;
pub mod hub;
pub mod presence;
pub mod push;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use privcomm_api::tokens::Tokens;
use privcomm_api::users::{Aggregate, Directory, UserDirectory};
use privcomm_domain::events::DomainEvent;
use privcomm_domain::ids::{StreamVersion, Timestamp};
use privcomm_domain::mailbox::MailboxState;
use privcomm_domain::{Clock, StreamId, UserId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The mailbox aggregate (`mailbox-<recipient>`).
pub struct Mailboxes;

impl Aggregate for Mailboxes {
    type Id = UserId;
    type State = MailboxState;
    fn stream(id: UserId) -> StreamId {
        StreamId::for_mailbox(id)
    }
    fn evolve(state: &mut MailboxState, version: StreamVersion, recorded_at: Timestamp, event: &DomainEvent) {
        privcomm_domain::mailbox::evolve(state, version, recorded_at, event);
    }
    fn evolve_compacted(state: &mut MailboxState, recorded: &privcomm_domain::RecordedEvent) {
        privcomm_domain::mailbox::evolve_compacted(
            state,
            recorded.stream_version,
            recorded.event_id,
            recorded.recorded_at,
        );
    }
}

/// Relay settings.
#[derive(Clone, Copy, Debug)]
pub struct RelaySettings {
    /// Largest text frame (512 KiB); larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Unacknowledged messages in flight per connection (256).
    pub max_in_flight: usize,
    /// How often the relay pings (30 s).
    pub ping_interval: Duration,
    /// Silence after which a connection is closed (90 s).
    pub idle_timeout: Duration,
    /// At most one push request per offline user per this window (30 s).
    pub push_coalesce: Duration,
    /// Presence heartbeats and lease (cluster mode).
    pub presence: presence::PresenceTiming,
    /// Initial read buffer of a connection (4 KiB; it grows for larger frames).
    /// The WebSocket library's default of 128 KiB, allocated up front, would
    /// be most of an idle connection's memory.
    pub read_buffer_bytes: usize,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            max_frame_bytes: frames::MAX_FRAME_BYTES,
            max_in_flight: 256,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            push_coalesce: Duration::from_secs(30),
            presence: presence::PresenceTiming::default(),
            read_buffer_bytes: 4 * 1024,
        }
    }
}

/// State shared by the relay's connections.
#[derive(Clone)]
pub struct RelayState {
    /// Users (is the recipient registered?).
    pub users: Arc<UserDirectory>,
    /// Mailboxes.
    pub mailboxes: Arc<Directory<Mailboxes>>,
    /// Login-token checks.
    pub tokens: Arc<Tokens>,
    /// Now.
    pub clock: Arc<dyn Clock>,
    /// This node's connections.
    pub hub: Arc<hub::Hub>,
    /// Limits and timing.
    pub settings: RelaySettings,
    /// Turns true when the node shuts down (connections close with 1001).
    pub shutdown: watch::Receiver<bool>,
    /// Presence signals to and from other nodes (cluster mode).
    pub presence: Option<Arc<dyn presence::Presence>>,
    /// Who is connected on other nodes (empty in embedded mode).
    pub roster: Arc<presence::Roster>,
    /// "You have mail" for offline recipients.
    pub pusher: Arc<push::Pusher>,
}

/// The relay routes.
pub fn router(state: RelayState) -> Router {
    Router::new().route("/v1/websocket", get(upgrade)).with_state(state)
}

async fn upgrade(
    State(state): State<RelayState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    let token = bearer.or_else(|| query.get("token").cloned());
    let authenticated = match token {
        None => Err("missing token"),
        Some(token) => match state.tokens.verify(&token, state.clock.now()) {
            Err(_) => Err("invalid or expired token"),
            Ok(user) => match state.users.read(user, |u| u.registered.is_some()).await {
                Ok(true) => Ok(user),
                Ok(false) => Err("unknown user"),
                Err(_) => Err("cannot check the token now"),
            },
        },
    };
    // Every frame is flushed as it is sent, so there is no write buffering to keep.
    let ws = ws
        .max_message_size(state.settings.max_frame_bytes)
        .max_frame_size(state.settings.max_frame_bytes)
        .read_buffer_size(state.settings.read_buffer_bytes)
        .write_buffer_size(0);
    match authenticated {
        Ok(user) => ws.on_upgrade(move |socket| connection::serve(socket, state, user)),
        Err(reason) => ws.on_upgrade(move |socket| connection::refuse(socket, reason)),
    }
}
