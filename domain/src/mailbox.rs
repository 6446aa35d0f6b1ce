//! The mailbox aggregate: the messages waiting for one recipient, kept in the
//! stream `mailbox-<recipient>`.
//!
//! A message is identified by the sender's `(sender, message_id)`: a retried
//! send finds the message already accepted and gets the same answer, so the
//! sender may retry freely. Pending messages are ordered by the stream
//! version of their acceptance, which is log order for this recipient.
//! An ack settles a pending message once; acking it again is a no-op.
//!
//! Mailbox events carry deterministic event ids ([`event_id`]): accepting
//! `(sender, message_id)` or settling a message twice would reuse an id,
//! which the event store refuses. That makes these appends idempotent
//! without a stream-version check, so the sender's node (accepting) and the
//! recipient's node (acking) can write the same mailbox without conflicting
//! (ADR 0008).

use crate::events::{Bytes, DomainEvent};
use crate::ids::{EventId, MessageId, StreamVersion, Timestamp, UserId};
use std::collections::{BTreeMap, HashMap};
use uuid::Uuid;

/// Namespace of mailbox event ids (UUIDv5).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x7072_6976_636f_6d6d_2d6d_6169_6c62_0001);

/// The event id of a mailbox event, derived from what makes it unique: the
/// recipient, sender and message id of an acceptance; the recipient and
/// message id of a delivery or expiry (a message is settled once). `None`
/// for events of other aggregates.
pub fn event_id(event: &DomainEvent) -> Option<EventId> {
    let name = match event {
        DomainEvent::MessageAccepted { message_id, sender, recipient, .. } => {
            format!("accepted/{}/{}/{}", recipient.0, sender.0, message_id.0)
        }
        DomainEvent::MessageDelivered { message_id, recipient }
        | DomainEvent::MessageExpired { message_id, recipient } => {
            format!("settled/{}/{}", recipient.0, message_id.0)
        }
        _ => return None,
    };
    Some(EventId(Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())))
}

/// Largest message body (ciphertext) the relay accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 96 * 1024;

/// Errors a mailbox command can be refused with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    /// The body is larger than [`MAX_BODY_BYTES`].
    #[error("message body is {0} bytes; at most {MAX_BODY_BYTES} are accepted")]
    BodyTooLarge(usize),
    /// The `kind` label is empty or too long.
    #[error("message kind must be 1 to 32 ASCII letters, digits, '-' or '_'")]
    InvalidKind,
    /// An ack for a message this mailbox never held.
    #[error("no such message in this mailbox")]
    UnknownMessage,
}

/// A message waiting for delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingMessage {
    /// Sender-chosen id.
    pub message_id: MessageId,
    /// Sender.
    pub sender: UserId,
    /// Client label (`prekey`, `whisper`, …).
    pub kind: String,
    /// Ciphertext.
    pub body: Bytes,
    /// When the server accepted it.
    pub accepted_at: Timestamp,
}

/// Commands on one mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailboxCommand {
    /// Accept a message for this mailbox's recipient.
    Accept {
        /// Sender-chosen id.
        message_id: MessageId,
        /// Sender.
        sender: UserId,
        /// Client label.
        kind: String,
        /// Ciphertext.
        body: Bytes,
    },
    /// The recipient has the message.
    Acknowledge {
        /// The message.
        message_id: MessageId,
    },
    /// Retention gave up on the message: it was not delivered in time.
    Expire {
        /// The message.
        message_id: MessageId,
    },
}

/// Where an accepted message sits in its mailbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acceptance {
    /// The mailbox stream version of its `MessageAccepted`.
    pub version: StreamVersion,
    /// Settled (delivered or expired)?
    pub settled: bool,
    /// When the server accepted it.
    pub accepted_at: Timestamp,
}

/// The state folded from a mailbox stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailboxState {
    /// The recipient (known once the first message arrived).
    pub recipient: Option<UserId>,
    /// Waiting messages, in acceptance order.
    pub pending: BTreeMap<StreamVersion, PendingMessage>,
    /// Every message accepted (within retention), by `(sender, id)`.
    pub accepted: HashMap<(UserId, MessageId), Acceptance>,
    /// Where each message id sits, for acks (an ack names only the id).
    by_id: HashMap<MessageId, (UserId, StreamVersion)>,
    /// Acceptances whose payload retention dropped (settled messages), by event id.
    compacted: HashMap<EventId, Acceptance>,
    /// The stream version folded so far.
    pub version: StreamVersion,
}

/// What deciding a command found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailboxDecision {
    /// New events to append.
    Append(Vec<DomainEvent>),
    /// Already done: a retried send (with where it sits) or a repeated ack.
    AlreadyDone(Option<Acceptance>),
}

/// A message kind label: 1 to 32 ASCII letters, digits, `-` or `_`.
pub fn valid_kind(kind: &str) -> bool {
    (1..=32).contains(&kind.len()) && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Decides a command for `recipient`'s mailbox.
pub fn decide(
    state: &MailboxState,
    recipient: UserId,
    command: &MailboxCommand,
) -> Result<MailboxDecision, MailboxError> {
    match command {
        MailboxCommand::Accept { message_id, sender, kind, body } => {
            if let Some(acceptance) = state.accepted.get(&(*sender, *message_id)) {
                return Ok(MailboxDecision::AlreadyDone(Some(*acceptance)));
            }
            if !state.compacted.is_empty() {
                let settled = DomainEvent::MessageAccepted {
                    message_id: *message_id,
                    sender: *sender,
                    recipient,
                    kind: String::new(),
                    body: Bytes::default(),
                };
                // A retry of a message delivered long ago, whose ciphertext is gone.
                if let Some(acceptance) = event_id(&settled).and_then(|id| state.compacted.get(&id)) {
                    return Ok(MailboxDecision::AlreadyDone(Some(*acceptance)));
                }
            }
            if body.0.len() > MAX_BODY_BYTES {
                return Err(MailboxError::BodyTooLarge(body.0.len()));
            }
            if !valid_kind(kind) {
                return Err(MailboxError::InvalidKind);
            }
            Ok(MailboxDecision::Append(vec![DomainEvent::MessageAccepted {
                message_id: *message_id,
                sender: *sender,
                recipient,
                kind: kind.clone(),
                body: body.clone(),
            }]))
        }
        MailboxCommand::Acknowledge { message_id } | MailboxCommand::Expire { message_id } => {
            let Some((sender, _)) = state.by_id.get(message_id) else { return Err(MailboxError::UnknownMessage) };
            let settle = match command {
                MailboxCommand::Expire { .. } => DomainEvent::MessageExpired { message_id: *message_id, recipient },
                _ => DomainEvent::MessageDelivered { message_id: *message_id, recipient },
            };
            match state.accepted.get(&(*sender, *message_id)) {
                Some(acceptance) if acceptance.settled => Ok(MailboxDecision::AlreadyDone(None)),
                Some(_) => Ok(MailboxDecision::Append(vec![settle])),
                None => Err(MailboxError::UnknownMessage),
            }
        }
    }
}

/// Applies one mailbox event recorded at `version` and time `recorded_at`.
/// Other events are ignored.
pub fn evolve(state: &mut MailboxState, version: StreamVersion, recorded_at: Timestamp, event: &DomainEvent) {
    state.version = state.version.max(version);
    match event {
        DomainEvent::MessageAccepted { message_id, sender, recipient, kind, body } => {
            state.recipient = Some(*recipient);
            state
                .accepted
                .insert((*sender, *message_id), Acceptance { version, settled: false, accepted_at: recorded_at });
            state.by_id.insert(*message_id, (*sender, version));
            state.pending.insert(
                version,
                PendingMessage {
                    message_id: *message_id,
                    sender: *sender,
                    kind: kind.clone(),
                    body: body.clone(),
                    accepted_at: recorded_at,
                },
            );
        }
        DomainEvent::MessageDelivered { message_id, .. } | DomainEvent::MessageExpired { message_id, .. } => {
            if let Some((sender, accepted_at)) = state.by_id.get(message_id).copied() {
                state.pending.remove(&accepted_at);
                if let Some(acceptance) = state.accepted.get_mut(&(sender, *message_id)) {
                    acceptance.settled = true;
                }
            }
        }
        _ => {}
    }
}

/// Applies a `MessageAccepted` whose payload retention dropped: only a
/// settled message's ciphertext is ever dropped, so all that remains to know
/// is that it was accepted (its derived event id) and when.
pub fn evolve_compacted(state: &mut MailboxState, version: StreamVersion, event_id: EventId, recorded_at: Timestamp) {
    state.version = state.version.max(version);
    state.compacted.insert(event_id, Acceptance { version, settled: true, accepted_at: recorded_at });
}

#[cfg(test)]
mod tests {
    //! Given events, when a command, then events or an error.
    use super::*;

    #[test]
    fn mailbox_event_ids_name_what_may_happen_only_once() {
        let accept = |sender: u128, message: u128, body: u8| DomainEvent::MessageAccepted {
            message_id: id(message),
            sender: user(sender),
            recipient: user(BOB),
            kind: "whisper".into(),
            body: Bytes(vec![body]),
        };
        // The same (sender, id) is one acceptance whatever the body; another sender or id is another.
        assert_eq!(event_id(&accept(1, 1, 0)), event_id(&accept(1, 1, 9)));
        assert_ne!(event_id(&accept(1, 1, 0)), event_id(&accept(2, 1, 0)));
        assert_ne!(event_id(&accept(1, 1, 0)), event_id(&accept(1, 2, 0)));
        // Delivered and expired settle the same message: only one of them can be stored.
        let delivered = DomainEvent::MessageDelivered { message_id: id(1), recipient: user(BOB) };
        let expired = DomainEvent::MessageExpired { message_id: id(1), recipient: user(BOB) };
        assert_eq!(event_id(&delivered), event_id(&expired));
        assert_ne!(event_id(&delivered), event_id(&accept(1, 1, 0)));
        assert_eq!(event_id(&DomainEvent::EventsCompacted { positions: vec![crate::ids::Position(1)] }), None);
    }

    fn user(n: u128) -> UserId {
        UserId(Uuid::from_u128(n))
    }
    fn id(n: u128) -> MessageId {
        MessageId(Uuid::from_u128(1000 + n))
    }
    const BOB: u128 = 2;

    fn accepted(n: u128, from: u128) -> DomainEvent {
        DomainEvent::MessageAccepted {
            message_id: id(n),
            sender: user(from),
            recipient: user(BOB),
            kind: "whisper".into(),
            body: Bytes(vec![n as u8; 10]),
        }
    }

    fn given(events: &[DomainEvent]) -> MailboxState {
        let mut state = MailboxState::default();
        for (i, event) in events.iter().enumerate() {
            evolve(&mut state, StreamVersion(i as u64 + 1), Timestamp(i as i64 * 10), event);
        }
        state
    }

    fn send(n: u128, from: u128, size: usize) -> MailboxCommand {
        MailboxCommand::Accept {
            message_id: id(n),
            sender: user(from),
            kind: "whisper".into(),
            body: Bytes(vec![n as u8; size]),
        }
    }

    #[test]
    fn a_new_message_is_accepted() {
        let decision = decide(&given(&[]), user(BOB), &send(1, 1, 10));
        assert_eq!(decision, Ok(MailboxDecision::Append(vec![accepted(1, 1)])));
    }

    #[test]
    fn a_retried_send_is_already_done_and_says_where() {
        let state = given(&[accepted(1, 1), accepted(2, 1)]);
        let decision = decide(&state, user(BOB), &send(2, 1, 10));
        assert_eq!(
            decision,
            Ok(MailboxDecision::AlreadyDone(Some(Acceptance {
                version: StreamVersion(2),
                settled: false,
                accepted_at: Timestamp(10)
            })))
        );
    }

    #[test]
    fn the_same_id_from_another_sender_is_another_message() {
        let state = given(&[accepted(1, 1)]);
        assert!(matches!(decide(&state, user(BOB), &send(1, 3, 10)), Ok(MailboxDecision::Append(_))));
    }

    #[test]
    fn a_retry_after_delivery_is_still_recognised() {
        let delivered = DomainEvent::MessageDelivered { message_id: id(1), recipient: user(BOB) };
        let state = given(&[accepted(1, 1), delivered]);
        assert_eq!(
            decide(&state, user(BOB), &send(1, 1, 10)),
            Ok(MailboxDecision::AlreadyDone(Some(Acceptance {
                version: StreamVersion(1),
                settled: true,
                accepted_at: Timestamp(0)
            })))
        );
    }

    #[test]
    fn oversize_bodies_and_bad_kinds_are_refused() {
        assert_eq!(
            decide(&given(&[]), user(BOB), &send(1, 1, MAX_BODY_BYTES + 1)),
            Err(MailboxError::BodyTooLarge(MAX_BODY_BYTES + 1))
        );
        let bad_kind = MailboxCommand::Accept {
            message_id: id(1),
            sender: user(1),
            kind: "no spaces".into(),
            body: Bytes(vec![]),
        };
        assert_eq!(decide(&given(&[]), user(BOB), &bad_kind), Err(MailboxError::InvalidKind));
    }

    #[test]
    fn an_ack_delivers_once_then_is_a_no_op() {
        let state = given(&[accepted(1, 1), accepted(2, 1)]);
        let ack = MailboxCommand::Acknowledge { message_id: id(1) };
        let delivered = DomainEvent::MessageDelivered { message_id: id(1), recipient: user(BOB) };
        assert_eq!(decide(&state, user(BOB), &ack), Ok(MailboxDecision::Append(vec![delivered.clone()])));
        let state = given(&[accepted(1, 1), accepted(2, 1), delivered]);
        assert_eq!(decide(&state, user(BOB), &ack), Ok(MailboxDecision::AlreadyDone(None)));
        assert_eq!(state.pending.values().map(|m| m.message_id).collect::<Vec<_>>(), vec![id(2)]);
    }

    #[test]
    fn acking_an_unknown_message_is_refused() {
        let decision = decide(&given(&[accepted(1, 1)]), user(BOB), &MailboxCommand::Acknowledge { message_id: id(9) });
        assert_eq!(decision, Err(MailboxError::UnknownMessage));
    }

    #[test]
    fn pending_messages_stay_in_log_order_and_expiry_settles() {
        let expired = DomainEvent::MessageExpired { message_id: id(2), recipient: user(BOB) };
        let state = given(&[accepted(3, 1), accepted(2, 4), accepted(1, 1), expired]);
        assert_eq!(state.pending.values().map(|m| m.message_id).collect::<Vec<_>>(), vec![id(3), id(1)]);
        assert_eq!(state.version, StreamVersion(4));
    }

    #[test]
    fn expiry_settles_a_pending_message_once_and_never_a_delivered_one() {
        let expire = MailboxCommand::Expire { message_id: id(1) };
        let expired = DomainEvent::MessageExpired { message_id: id(1), recipient: user(BOB) };
        assert_eq!(decide(&given(&[accepted(1, 1)]), user(BOB), &expire), Ok(MailboxDecision::Append(vec![expired])));
        let delivered = DomainEvent::MessageDelivered { message_id: id(1), recipient: user(BOB) };
        assert_eq!(
            decide(&given(&[accepted(1, 1), delivered]), user(BOB), &expire),
            Ok(MailboxDecision::AlreadyDone(None))
        );
        assert_eq!(decide(&given(&[]), user(BOB), &expire), Err(MailboxError::UnknownMessage));
    }

    #[test]
    fn a_retry_of_a_message_whose_ciphertext_was_dropped_is_still_recognised() {
        let mut state = MailboxState::default();
        let original = accepted(1, 1);
        let derived = event_id(&original).expect("mailbox event");
        evolve_compacted(&mut state, StreamVersion(1), derived, Timestamp(77));
        let delivered = DomainEvent::MessageDelivered { message_id: id(1), recipient: user(BOB) };
        evolve(&mut state, StreamVersion(2), Timestamp(80), &delivered);
        let settled = Acceptance { version: StreamVersion(1), settled: true, accepted_at: Timestamp(77) };
        assert_eq!(decide(&state, user(BOB), &send(1, 1, 10)), Ok(MailboxDecision::AlreadyDone(Some(settled))));
        // Another sender's message with the same id is still new.
        assert!(matches!(decide(&state, user(BOB), &send(1, 3, 10)), Ok(MailboxDecision::Append(_))));
        assert!(state.pending.is_empty());
    }
}
