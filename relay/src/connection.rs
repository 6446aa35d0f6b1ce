//! One WebSocket connection: authenticate, deliver the backlog then live
//! messages within a window of unacknowledged ones, take `send` and `ack`.
//!
//! The connection keeps no copy of messages. It holds a cursor (the mailbox
//! version of the last message it pushed) and reads what is pending after it
//! from the mailbox aggregate whenever it is woken or an ack frees the
//! window. Live messages therefore queue behind the backlog by construction,
//! and whatever was not acknowledged is pending again for the next connection.

use crate::RelayState;
use crate::frames::{ClientFrame, FrameError, ServerFrame, close, codes};
use crate::presence::Signal;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt as _, StreamExt as _};
use privcomm_api::error::ApiError;
use privcomm_domain::UserId;
use privcomm_domain::events::Bytes;
use privcomm_domain::ids::{MessageId, StreamVersion, Timestamp};
use privcomm_domain::mailbox::{self, MailboxCommand, MailboxDecision, MailboxError, PendingMessage};
use std::collections::HashSet;
use tokio::time::Instant;

/// Error frames after which a connection counts as abusive and is closed.
pub const MAX_ERRORS: u32 = 100;

fn millis(at: Timestamp) -> i64 {
    at.0.div_euclid(1_000)
}

async fn close_with(socket: &mut futures::stream::SplitSink<WebSocket, Message>, code: u16, reason: &'static str) {
    let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))).await;
    let _ = socket.close().await;
}

/// Refuses an unauthenticated connection.
pub async fn refuse(socket: WebSocket, reason: &'static str) {
    let (mut sink, _) = socket.split();
    close_with(&mut sink, close::POLICY_VIOLATION, reason).await;
}

/// Serves an authenticated connection of `user` until it ends.
pub async fn serve(socket: WebSocket, state: RelayState, user: UserId) {
    let mut connected = state.hub.connect(user);
    let node = state.roster.node();
    if let Some(presence) = &state.presence {
        presence.publish(Signal::Connected { node, user, connection: connected.id }).await;
    }
    let (mut sink, mut stream) = socket.split();
    let result = run(&mut sink, &mut stream, &state, user, &mut connected).await;
    state.hub.disconnect(user, connected.id);
    if let Some(presence) = &state.presence {
        presence.publish(Signal::Disconnected { node, user, connection: connected.id }).await;
    }
    match result {
        Ok(Ending::ClientClosed) => {}
        Ok(Ending::Displaced) => close_with(&mut sink, close::CONNECTED_ELSEWHERE, "connected elsewhere").await,
        Ok(Ending::Abusive) => close_with(&mut sink, close::POLICY_VIOLATION, "too many invalid frames").await,
        Ok(Ending::TooBig) => close_with(&mut sink, close::MESSAGE_TOO_BIG, "frame too large").await,
        Ok(Ending::Idle) => close_with(&mut sink, close::GOING_AWAY, "idle timeout").await,
        Ok(Ending::ShuttingDown) => close_with(&mut sink, close::GOING_AWAY, "server shutting down").await,
        Err(error) => {
            tracing::warn!(error = %privcomm_api::error::chain(&error), "relay connection failed");
            close_with(&mut sink, 1011, "internal error").await;
        }
    }
}

enum Ending {
    ClientClosed,
    Displaced,
    Abusive,
    TooBig,
    Idle,
    ShuttingDown,
}

struct Delivery {
    cursor: StreamVersion,
    backlog_last: StreamVersion,
    queue_empty_sent: bool,
    unacked: HashSet<MessageId>,
}

async fn run(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    stream: &mut futures::stream::SplitStream<WebSocket>,
    state: &RelayState,
    user: UserId,
    connected: &mut crate::hub::Connected,
) -> Result<Ending, ApiError> {
    // The backlog is what is pending at connect time; later messages are live.
    let backlog_last =
        state.mailboxes.read(user, |m| m.pending.keys().next_back().copied().unwrap_or_default()).await?;
    let mut delivery =
        Delivery { cursor: StreamVersion(0), backlog_last, queue_empty_sent: false, unacked: HashSet::new() };
    let mut shutdown = state.shutdown.clone();
    let mut errors = 0u32;
    let mut last_heard = Instant::now();
    let mut ping = tokio::time::interval(state.settings.ping_interval);
    ping.tick().await;
    // Read the mailbox only when it may hold something to push: at the start,
    // when woken, and when an ack reopens a full window.
    let mut look = true;
    loop {
        if look {
            look = false;
            push_pending(sink, state, user, &mut delivery).await?;
        }
        tokio::select! {
            () = connected.wake.notified() => look = true,
            _ = &mut connected.displaced => return Ok(Ending::Displaced),
            () = crate::presence::stopped(&mut shutdown) => return Ok(Ending::ShuttingDown),
            _ = ping.tick() => {
                if last_heard.elapsed() > state.settings.idle_timeout {
                    return Ok(Ending::Idle);
                }
                let _ = sink.send(Message::Ping(Default::default())).await;
            }
            incoming = stream.next() => {
                last_heard = Instant::now();
                let reply = match incoming {
                    None | Some(Ok(Message::Close(_))) => return Ok(Ending::ClientClosed),
                    Some(Err(error)) => {
                        let text = error.to_string();
                        if text.contains("too long") || text.contains("Space limit") {
                            return Ok(Ending::TooBig);
                        }
                        return Ok(Ending::ClientClosed);
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Binary(_))) => Err(FrameError {
                        code: codes::INVALID_FRAME,
                        message: "frames are JSON text".into(),
                        reference: None,
                    }),
                    Some(Ok(Message::Text(text))) => {
                        let window_was_full = delivery.unacked.len() >= state.settings.max_in_flight;
                        let reply = handle_text(state, user, text.as_str(), &mut delivery).await?;
                        look |= window_was_full && delivery.unacked.len() < state.settings.max_in_flight;
                        reply
                    }
                };
                match reply {
                    Ok(Some(frame)) => send_frame(sink, &frame).await,
                    Ok(None) => {}
                    Err(error) => {
                        errors += 1;
                        send_frame(sink, &ServerFrame::from(error)).await;
                        if errors >= MAX_ERRORS {
                            return Ok(Ending::Abusive);
                        }
                    }
                }
            }
        }
    }
}

async fn send_frame(sink: &mut futures::stream::SplitSink<WebSocket, Message>, frame: &ServerFrame) {
    let _ = sink.send(Message::Text(frame.to_text().into())).await;
}

/// Pushes pending messages after the cursor while the window allows, then
/// `queue_empty` once the backlog is through.
async fn push_pending(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    state: &RelayState,
    user: UserId,
    delivery: &mut Delivery,
) -> Result<(), ApiError> {
    let room = state.settings.max_in_flight.saturating_sub(delivery.unacked.len());
    if room > 0 {
        let after = delivery.cursor;
        let batch: Vec<(StreamVersion, PendingMessage)> = state
            .mailboxes
            .read(user, |m| {
                m.pending
                    .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                    .take(room)
                    .map(|(v, p)| (*v, p.clone()))
                    .collect()
            })
            .await?;
        for (version, message) in batch {
            let frame = ServerFrame::message(
                message.message_id,
                message.sender,
                message.kind,
                &message.body,
                millis(message.accepted_at),
            );
            send_frame(sink, &frame).await;
            delivery.unacked.insert(message.message_id);
            delivery.cursor = version;
        }
    }
    if !delivery.queue_empty_sent && delivery.cursor >= delivery.backlog_last {
        delivery.queue_empty_sent = true;
        send_frame(sink, &ServerFrame::QueueEmpty).await;
    }
    Ok(())
}

fn mailbox_error(error: MailboxError, reference: MessageId) -> FrameError {
    let code = match error {
        MailboxError::BodyTooLarge(_) => codes::BODY_TOO_LARGE,
        MailboxError::InvalidKind => codes::INVALID_FRAME,
        MailboxError::UnknownMessage => codes::UNKNOWN_MESSAGE,
    };
    FrameError { code, message: error.to_string(), reference: Some(reference.0.to_string()) }
}

/// A mailbox decision as the events to append (none when already done); a
/// refusal is a field error named `field`, which the caller turns into an
/// error frame.
fn mailbox_events(
    mailbox: &mailbox::MailboxState,
    recipient: UserId,
    command: &MailboxCommand,
    field: &'static str,
) -> Result<Vec<privcomm_domain::events::DomainEvent>, ApiError> {
    match mailbox::decide(mailbox, recipient, command) {
        Ok(MailboxDecision::Append(events)) => Ok(events),
        Ok(MailboxDecision::AlreadyDone(_)) => Ok(Vec::new()),
        Err(error) => Err(ApiError::field(field, error.to_string())),
    }
}

/// Handles one text frame; `Ok(Err(_))` is an error frame for the client,
/// `Err(_)` a failure of ours.
async fn handle_text(
    state: &RelayState,
    user: UserId,
    text: &str,
    delivery: &mut Delivery,
) -> Result<Result<Option<ServerFrame>, FrameError>, ApiError> {
    let frame = match ClientFrame::parse(text) {
        Ok(frame) => frame,
        Err(error) => return Ok(Err(error)),
    };
    match frame {
        ClientFrame::Send { id, to, kind, body } => send(state, user, id, to, kind, body).await,
        ClientFrame::Ack { id } => {
            let command = MailboxCommand::Acknowledge { message_id: id };
            let outcome = state
                .mailboxes
                .append_idempotent(user, |m| mailbox_events(m, user, &command, "ack"), mailbox::event_id, |_, _, _| ())
                .await;
            match outcome {
                Ok(()) => {
                    delivery.unacked.remove(&id);
                    Ok(Ok(None))
                }
                Err(ApiError::InvalidField { .. }) => Ok(Err(mailbox_error(MailboxError::UnknownMessage, id))),
                Err(other) => Err(other),
            }
        }
    }
}

async fn send(
    state: &RelayState,
    sender: UserId,
    id: MessageId,
    to: UserId,
    kind: String,
    body: Bytes,
) -> Result<Result<Option<ServerFrame>, FrameError>, ApiError> {
    // Registration is forever: a cached "registered" needs no trip to the store.
    let registered = state.users.read_cached(to, |u| u.registered.as_ref().map(|_| ())).await?;
    if registered.is_none() {
        return Ok(Err(FrameError {
            code: codes::UNKNOWN_RECIPIENT,
            message: "no such recipient; nothing was stored".into(),
            reference: Some(id.0.to_string()),
        }));
    }
    let command = MailboxCommand::Accept { message_id: id, sender, kind, body };
    // Idempotent by event id, so accepting here never conflicts with acks
    // appended to the same mailbox by the recipient's node (ADR 0008).
    let decided = state
        .mailboxes
        .append_idempotent(
            to,
            |m| mailbox_events(m, to, &command, "send"),
            mailbox::event_id,
            // Durable once appended: answer with the acceptance time, which a
            // retry finds in the state it was decided on.
            |mailbox, _, recorded_at| match recorded_at {
                Some(at) => (true, at),
                None => (false, mailbox.accepted.get(&(sender, id)).map(|a| a.accepted_at).unwrap_or_default()),
            },
        )
        .await;
    let (appended, accepted_at) = match decided {
        Ok(decided) => decided,
        Err(ApiError::InvalidField { message, .. }) => {
            return Ok(Err(FrameError { code: codes::INVALID_FRAME, message, reference: Some(id.0.to_string()) }));
        }
        Err(other) => return Err(other),
    };
    if appended {
        state.hub.wake(to);
        if !state.hub.contains(to) && !state.roster.online_elsewhere(to) && !state.pusher.recently_pushed(to) {
            // The token as of this acceptance (read now, not later, so that a
            // message accepted before a token existed never rings it).
            match state.users.read(to, |u| u.registered.as_ref().and_then(|r| r.push.clone())).await {
                Ok(Some(target)) => {
                    let pusher = state.pusher.clone();
                    tokio::spawn(async move { pusher.mail(to, &target).await });
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(error = %privcomm_api::error::chain(&error), "cannot read a push token"),
            }
        }
    }
    Ok(Ok(Some(ServerFrame::Sent { id, server_ts: millis(accepted_at) })))
}
