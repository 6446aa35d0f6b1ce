//! The read models: pure folds from events to row operations.
//!
//! Each model owns its tables (created by migration 0004) and a checkpoint
//! named `projection:<model>`. A model sees every event in log order with
//! its decoded payload, or `None` where retention dropped a payload it was
//! allowed to drop; models are written so that such an event changes nothing
//! that a later event does not settle (a dropped ciphertext belongs to a
//! settled message, a dropped upload to pools a later `PreKeysCompacted`
//! restates), which is why a replay of a compacted log rebuilds the same rows.

use crate::rows::{Column, Kind, KindTag, Op, Table, Value};
use privcomm_domain::events::{DomainEvent, KyberClaim};
use privcomm_domain::{Position, RecordedEvent};

/// A read model: a name, its tables, and the fold.
pub trait ReadModel: Send + Sync + 'static {
    /// Stable name (`key_directory`, …); its checkpoint is `projection:<name>`.
    fn name(&self) -> &'static str;
    /// The tables it owns.
    fn tables(&self) -> &'static [&'static Table];
    /// The row operations one event turns into.
    fn apply(&self, event: &RecordedEvent, decoded: Option<&DomainEvent>, ops: &mut Vec<Op>);
}

/// The checkpoint name of a model.
pub fn checkpoint_name(model: &dyn ReadModel) -> String {
    checkpoint_name_of(model.name())
}

/// [`checkpoint_name`] of the model called `model`.
pub fn checkpoint_name_of(model: &str) -> String {
    format!("projection:{model}")
}

/// Every read model privcomm serves, in a fixed order.
pub fn all() -> Vec<std::sync::Arc<dyn ReadModel>> {
    vec![
        std::sync::Arc::new(KeyDirectory),
        std::sync::Arc::new(Mailbox),
        std::sync::Arc::new(PushTokens),
        std::sync::Arc::new(IdentityHistory),
        std::sync::Arc::new(EventCounts),
    ]
}

fn user_of_stream(event: &RecordedEvent) -> Option<&str> {
    event.stream_id.as_str().strip_prefix("user-")
}

fn position(event: &RecordedEvent) -> Value {
    Value::uint(event.position.0)
}

fn int(value: u32) -> Value {
    Value::Int(i64::from(value))
}

/// Drops the rows of positions whose payloads retention drops.
fn forget_compacted(table: &'static Table, positions: &[Position], ops: &mut Vec<Op>) {
    ops.extend(positions.iter().map(|p| Op::DeleteWhere { table, column: "position", value: Value::uint(p.0) }));
}

// ---------------------------------------------------------------- key directory

/// `rm_directory_users`: who is registered, with which identity, and how
/// many one-time prekeys of each kind are left.
pub static DIRECTORY_USERS: Table = Table {
    name: "rm_directory_users",
    columns: &[
        Column::new("user_id", Kind::Text),
        Column::new("phone_hash", Kind::Text),
        Column::new("registration_id", Kind::Int),
        Column::new("identity_key", Kind::Bytes),
        Column::new("signed_prekey_id", Kind::Int),
        Column::new("kyber_last_resort_id", Kind::Int),
        Column::new("one_time_prekeys", Kind::Int),
        Column::new("kyber_prekeys", Kind::Int),
        Column::new("identity_position", Kind::Int),
        // When a one-time prekey was first claimed (or all were voided by an
        // identity change) since the pools were last compacted.
        Column::nullable("first_use_at_us", Kind::Int),
    ],
    key_len: 1,
};

/// `rm_prekey_uploads`: uploads (and `PreKeysCompacted` restatements) whose
/// payload is still stored — what the prekey compaction job looks at.
pub static PREKEY_UPLOADS: Table = Table {
    name: "rm_prekey_uploads",
    columns: &[
        Column::new("position", Kind::Int),
        Column::new("user_id", Kind::Text),
        Column::new("kind", Kind::Text),
        Column::new("prekeys", Kind::Int),
        Column::new("recorded_at_us", Kind::Int),
    ],
    key_len: 1,
};

static KEY_DIRECTORY_TABLES: [&Table; 2] = [&DIRECTORY_USERS, &PREKEY_UPLOADS];

/// Users, identity keys and prekey counts.
pub struct KeyDirectory;

impl ReadModel for KeyDirectory {
    fn name(&self) -> &'static str {
        "key_directory"
    }

    fn tables(&self) -> &'static [&'static Table] {
        &KEY_DIRECTORY_TABLES
    }

    fn apply(&self, event: &RecordedEvent, decoded: Option<&DomainEvent>, ops: &mut Vec<Op>) {
        let Some(user) = user_of_stream(event) else {
            if let Some(DomainEvent::EventsCompacted { positions }) = decoded {
                forget_compacted(&PREKEY_UPLOADS, positions, ops);
            }
            return;
        };
        let key = vec![Value::text(user)];
        let table = &DIRECTORY_USERS;
        let upload = |kind: &str, count: usize, column: &'static str, ops: &mut Vec<Op>| {
            ops.push(Op::Upsert {
                table: &PREKEY_UPLOADS,
                row: vec![
                    position(event),
                    Value::text(user),
                    Value::text(kind),
                    Value::uint(count as u64),
                    Value::Int(event.recorded_at.0),
                ],
            });
            ops.push(Op::Increment { table, key: key.clone(), column, by: count as i64 });
        };
        match decoded {
            Some(DomainEvent::UserRegistered { phone_hash, keys, .. }) => ops.push(Op::Upsert {
                table,
                row: vec![
                    Value::text(user),
                    Value::text(phone_hash.as_str()),
                    int(keys.registration_id.0),
                    Value::Bytes(keys.identity_key.0.clone()),
                    int(keys.signed_prekey.id.0),
                    int(keys.kyber_last_resort.id.0),
                    Value::Int(0),
                    Value::Int(0),
                    position(event),
                    Value::Null(KindTag::Int),
                ],
            }),
            Some(DomainEvent::IdentityKeyChanged { keys, .. }) => {
                ops.push(Op::Update {
                    table,
                    key: key.clone(),
                    set: vec![
                        ("registration_id", int(keys.registration_id.0)),
                        ("identity_key", Value::Bytes(keys.identity_key.0.clone())),
                        ("signed_prekey_id", int(keys.signed_prekey.id.0)),
                        ("kyber_last_resort_id", int(keys.kyber_last_resort.id.0)),
                        ("one_time_prekeys", Value::Int(0)),
                        ("kyber_prekeys", Value::Int(0)),
                        ("identity_position", position(event)),
                    ],
                });
                // The old pools are void: the uploads holding them may be compacted.
                ops.push(first_use(event, key));
            }
            Some(DomainEvent::SignedPreKeyRotated { signed_prekey, kyber_last_resort }) => {
                let mut set = vec![("signed_prekey_id", int(signed_prekey.id.0))];
                if let Some(last_resort) = kyber_last_resort {
                    set.push(("kyber_last_resort_id", int(last_resort.id.0)));
                }
                ops.push(Op::Update { table, key, set });
            }
            Some(DomainEvent::OneTimePreKeysUploaded { prekeys }) => {
                upload("one_time", prekeys.len(), "one_time_prekeys", ops)
            }
            Some(DomainEvent::KyberPreKeysUploaded { prekeys }) => upload("kyber", prekeys.len(), "kyber_prekeys", ops),
            Some(DomainEvent::PreKeyClaimed { one_time_prekey, kyber, .. }) => {
                let one_time_used = one_time_prekey.is_some();
                let kyber_used = matches!(kyber, KyberClaim::OneTime(_));
                if one_time_used {
                    ops.push(Op::Increment { table, key: key.clone(), column: "one_time_prekeys", by: -1 });
                }
                if kyber_used {
                    ops.push(Op::Increment { table, key: key.clone(), column: "kyber_prekeys", by: -1 });
                }
                if one_time_used || kyber_used {
                    ops.push(first_use(event, key));
                }
            }
            Some(DomainEvent::PreKeysCompacted { one_time_prekeys, kyber_prekeys }) => {
                ops.push(Op::Update {
                    table,
                    key,
                    set: vec![
                        ("one_time_prekeys", Value::uint(one_time_prekeys.len() as u64)),
                        ("kyber_prekeys", Value::uint(kyber_prekeys.len() as u64)),
                        ("first_use_at_us", Value::Null(KindTag::Int)),
                    ],
                });
                // The restatement is itself superseded by the next one.
                ops.push(Op::Upsert {
                    table: &PREKEY_UPLOADS,
                    row: vec![
                        position(event),
                        Value::text(user),
                        Value::text("restatement"),
                        Value::uint((one_time_prekeys.len() + kyber_prekeys.len()) as u64),
                        Value::Int(event.recorded_at.0),
                    ],
                });
            }
            // A dropped upload: the counts it added were restated by the PreKeysCompacted that allowed the drop.
            None => {}
            Some(_) => {}
        }
    }
}

fn first_use(event: &RecordedEvent, key: Vec<Value>) -> Op {
    Op::SetIfNull { table: &DIRECTORY_USERS, key, column: "first_use_at_us", value: Value::Int(event.recorded_at.0) }
}

// ---------------------------------------------------------------- mailbox

/// `rm_mailbox`: every message whose ciphertext is still stored, pending
/// (not yet settled) ones in log order by `position`. The ciphertext itself
/// stays in the log only, so dropping it there leaves no copy behind.
pub static MAILBOX: Table = Table {
    name: "rm_mailbox",
    columns: &[
        Column::new("recipient", Kind::Text),
        Column::new("message_id", Kind::Text),
        Column::new("position", Kind::Int),
        Column::new("sender", Kind::Text),
        Column::new("kind", Kind::Text),
        Column::new("body_bytes", Kind::Int),
        Column::new("accepted_at_us", Kind::Int),
        Column::nullable("settled", Kind::Text),
        Column::nullable("settled_at_us", Kind::Int),
    ],
    key_len: 2,
};

static MAILBOX_TABLES: [&Table; 1] = [&MAILBOX];

/// Pending messages per recipient, and settled ones until retention drops their ciphertext.
pub struct Mailbox;

impl ReadModel for Mailbox {
    fn name(&self) -> &'static str {
        "mailbox"
    }

    fn tables(&self) -> &'static [&'static Table] {
        &MAILBOX_TABLES
    }

    fn apply(&self, event: &RecordedEvent, decoded: Option<&DomainEvent>, ops: &mut Vec<Op>) {
        let settle =
            |recipient: &privcomm_domain::UserId, message_id: &privcomm_domain::MessageId, how: &str| Op::Update {
                table: &MAILBOX,
                key: vec![Value::text(recipient.0), Value::text(message_id.0)],
                set: vec![("settled", Value::text(how)), ("settled_at_us", Value::Int(event.recorded_at.0))],
            };
        match decoded {
            Some(DomainEvent::MessageAccepted { message_id, sender, recipient, kind, body }) => ops.push(Op::Upsert {
                table: &MAILBOX,
                row: vec![
                    Value::text(recipient.0),
                    Value::text(message_id.0),
                    position(event),
                    Value::text(sender.0),
                    Value::text(kind),
                    Value::uint(body.0.len() as u64),
                    Value::Int(event.recorded_at.0),
                    Value::Null(KindTag::Text),
                    Value::Null(KindTag::Int),
                ],
            }),
            Some(DomainEvent::MessageDelivered { message_id, recipient }) => {
                ops.push(settle(recipient, message_id, "delivered"))
            }
            Some(DomainEvent::MessageExpired { message_id, recipient }) => {
                ops.push(settle(recipient, message_id, "expired"))
            }
            Some(DomainEvent::EventsCompacted { positions }) => forget_compacted(&MAILBOX, positions, ops),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------- push tokens

/// `rm_push_tokens`: the current push token of each user.
pub static PUSH_TOKENS: Table = Table {
    name: "rm_push_tokens",
    columns: &[
        Column::new("user_id", Kind::Text),
        Column::new("platform", Kind::Text),
        Column::new("token", Kind::Text),
        Column::new("position", Kind::Int),
    ],
    key_len: 1,
};

static PUSH_TOKEN_TABLES: [&Table; 1] = [&PUSH_TOKENS];

/// Push tokens; an identity change (a new device) forgets the old one.
pub struct PushTokens;

impl ReadModel for PushTokens {
    fn name(&self) -> &'static str {
        "push_tokens"
    }

    fn tables(&self) -> &'static [&'static Table] {
        &PUSH_TOKEN_TABLES
    }

    fn apply(&self, event: &RecordedEvent, decoded: Option<&DomainEvent>, ops: &mut Vec<Op>) {
        match decoded {
            Some(DomainEvent::PushTokenRegistered { user_id, platform, token }) => ops.push(Op::Upsert {
                table: &PUSH_TOKENS,
                row: vec![Value::text(user_id.0), Value::text(platform), Value::text(token), position(event)],
            }),
            Some(DomainEvent::IdentityKeyChanged { user_id, .. }) => {
                ops.push(Op::Delete { table: &PUSH_TOKENS, key: vec![Value::text(user_id.0)] })
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------- identity history

/// `rm_identity_history`: every identity key and signed prekey a user has
/// published, with the position and time — what an auditor asks about first.
pub static IDENTITY_HISTORY: Table = Table {
    name: "rm_identity_history",
    columns: &[
        Column::new("user_id", Kind::Text),
        Column::new("position", Kind::Int),
        Column::new("change", Kind::Text),
        Column::nullable("registration_id", Kind::Int),
        Column::nullable("identity_key", Kind::Bytes),
        Column::new("signed_prekey_id", Kind::Int),
        Column::new("signed_prekey", Kind::Bytes),
        Column::nullable("kyber_last_resort_id", Kind::Int),
        Column::new("recorded_at_us", Kind::Int),
    ],
    key_len: 2,
};

static IDENTITY_HISTORY_TABLES: [&Table; 1] = [&IDENTITY_HISTORY];

/// Identity-key and signed-prekey history per user.
pub struct IdentityHistory;

impl ReadModel for IdentityHistory {
    fn name(&self) -> &'static str {
        "identity_history"
    }

    fn tables(&self) -> &'static [&'static Table] {
        &IDENTITY_HISTORY_TABLES
    }

    fn apply(&self, event: &RecordedEvent, decoded: Option<&DomainEvent>, ops: &mut Vec<Op>) {
        let Some(user) = user_of_stream(event) else { return };
        let (change, keys, signed, last_resort) = match decoded {
            Some(DomainEvent::UserRegistered { keys, .. }) => {
                ("registered", Some(keys), &keys.signed_prekey, Some(&keys.kyber_last_resort))
            }
            Some(DomainEvent::IdentityKeyChanged { keys, .. }) => {
                ("identity_changed", Some(keys), &keys.signed_prekey, Some(&keys.kyber_last_resort))
            }
            Some(DomainEvent::SignedPreKeyRotated { signed_prekey, kyber_last_resort }) => {
                ("signed_prekey_rotated", None, signed_prekey, kyber_last_resort.as_ref())
            }
            _ => return,
        };
        ops.push(Op::Upsert {
            table: &IDENTITY_HISTORY,
            row: vec![
                Value::text(user),
                position(event),
                Value::text(change),
                Value::or_null(keys.map(|k| int(k.registration_id.0)), KindTag::Int),
                Value::or_null(keys.map(|k| Value::Bytes(k.identity_key.0.clone())), KindTag::Bytes),
                int(signed.id.0),
                Value::Bytes(signed.public_key.0.clone()),
                Value::or_null(last_resort.map(|k| int(k.id.0)), KindTag::Int),
                Value::Int(event.recorded_at.0),
            ],
        });
    }
}

// ---------------------------------------------------------------- event counts

/// `rm_event_counts`: how many events of each type the log holds. Cheap,
/// and exact only if every event is applied exactly once — which is what
/// the crash tests check with it.
pub static EVENT_COUNTS: Table = Table {
    name: "rm_event_counts",
    columns: &[Column::new("event_type", Kind::Text), Column::new("events", Kind::Int)],
    key_len: 1,
};

static EVENT_COUNT_TABLES: [&Table; 1] = [&EVENT_COUNTS];

/// Events per type.
pub struct EventCounts;

impl ReadModel for EventCounts {
    fn name(&self) -> &'static str {
        "event_counts"
    }

    fn tables(&self) -> &'static [&'static Table] {
        &EVENT_COUNT_TABLES
    }

    fn apply(&self, event: &RecordedEvent, _decoded: Option<&DomainEvent>, ops: &mut Vec<Op>) {
        ops.push(Op::Tally {
            table: &EVENT_COUNTS,
            key: vec![Value::text(&event.event_type)],
            column: "events",
            by: 1,
        });
    }
}
