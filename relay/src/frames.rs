//! The relay's wire protocol: versioned JSON text frames (docs/PROTOCOL.md).
//!
//! [`ClientFrame::parse`] is the only way client bytes become a frame. It
//! never panics; anything it refuses becomes an `error` frame with one of the
//! documented [`codes`], and the connection stays open.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use privcomm_domain::events::Bytes;
use privcomm_domain::ids::{MessageId, UserId};
use privcomm_domain::mailbox::{MAX_BODY_BYTES, valid_kind};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u64 = 1;

/// Largest text frame accepted by default; larger ones close the
/// connection with [`close::MESSAGE_TOO_BIG`].
pub const MAX_FRAME_BYTES: usize = 512 * 1024;

/// WebSocket close codes the relay uses.
pub mod close {
    /// Shutting down: reconnect (to another node).
    pub const GOING_AWAY: u16 = 1001;
    /// Missing, invalid or expired token, or repeated abuse.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame over the size limit.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The same user connected again, here or on another node.
    pub const CONNECTED_ELSEWHERE: u16 = 4409;
}

/// `error` frame codes.
pub mod codes {
    /// Not JSON, or not a JSON object.
    pub const MALFORMED_JSON: &str = "malformed_json";
    /// JSON, but not a frame this version knows (missing or unknown fields, wrong types).
    pub const INVALID_FRAME: &str = "invalid_frame";
    /// A `v` other than 1.
    pub const UNSUPPORTED_VERSION: &str = "unsupported_version";
    /// A body over 96 KiB after Base64 decoding.
    pub const BODY_TOO_LARGE: &str = "body_too_large";
    /// The recipient is not registered; nothing was stored.
    pub const UNKNOWN_RECIPIENT: &str = "unknown_recipient";
    /// An ack for a message not in this user's mailbox.
    pub const UNKNOWN_MESSAGE: &str = "unknown_message";
    /// Every code, for tests and documentation.
    pub const ALL: [&str; 6] =
        [MALFORMED_JSON, INVALID_FRAME, UNSUPPORTED_VERSION, BODY_TOO_LARGE, UNKNOWN_RECIPIENT, UNKNOWN_MESSAGE];
}

/// What a client may send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// Store and forward a message.
    Send {
        /// Sender-chosen id (a UUID); a retry reuses it.
        id: MessageId,
        /// Recipient.
        to: UserId,
        /// Client label.
        kind: String,
        /// Ciphertext, decoded.
        body: Bytes,
    },
    /// The client has stored message `id`.
    Ack {
        /// The message.
        id: MessageId,
    },
}

/// Why a frame was refused: becomes an `error` frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    /// One of [`codes`].
    pub code: &'static str,
    /// Human-readable detail.
    pub message: String,
    /// The frame's `id`, when it could be read.
    pub reference: Option<String>,
}

impl FrameError {
    fn new(code: &'static str, message: impl Into<String>, reference: Option<String>) -> FrameError {
        FrameError { code, message: message.into(), reference }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendFields {
    id: Uuid,
    to: Uuid,
    kind: String,
    body: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckFields {
    id: Uuid,
}

impl ClientFrame {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| FrameError::new(codes::MALFORMED_JSON, format!("not JSON: {e}"), None))?;
        let Value::Object(mut object) = value else {
            return Err(FrameError::new(codes::MALFORMED_JSON, "a frame is a JSON object", None));
        };
        let reference = object.get("id").and_then(Value::as_str).map(|s| s.chars().take(64).collect());
        match object.remove("v") {
            Some(Value::Number(v)) if v.as_u64() == Some(PROTOCOL_VERSION) => {}
            Some(_) => {
                return Err(FrameError::new(codes::UNSUPPORTED_VERSION, "this relay speaks \"v\": 1", reference));
            }
            None => return Err(FrameError::new(codes::INVALID_FRAME, "missing \"v\"", reference)),
        }
        let kind = match object.remove("type") {
            Some(Value::String(kind)) => kind,
            _ => return Err(FrameError::new(codes::INVALID_FRAME, "missing or non-text \"type\"", reference)),
        };
        let fields = |object: Map<String, Value>| Value::Object(object);
        match kind.as_str() {
            "send" => {
                let send: SendFields = serde_json::from_value(fields(object))
                    .map_err(|e| FrameError::new(codes::INVALID_FRAME, format!("send: {e}"), reference.clone()))?;
                if !valid_kind(&send.kind) {
                    return Err(FrameError::new(
                        codes::INVALID_FRAME,
                        "send: kind must be 1 to 32 ASCII letters, digits, '-' or '_'",
                        reference,
                    ));
                }
                // Base64 is 4/3 of the bytes: refuse hopeless bodies before decoding them.
                if send.body.len() > MAX_BODY_BYTES.div_ceil(3) * 4 {
                    return Err(FrameError::new(codes::BODY_TOO_LARGE, "body over 96 KiB", reference));
                }
                let body = STANDARD.decode(&send.body).map_err(|_| {
                    FrameError::new(codes::INVALID_FRAME, "send: body is not standard Base64", reference.clone())
                })?;
                if body.len() > MAX_BODY_BYTES {
                    return Err(FrameError::new(codes::BODY_TOO_LARGE, "body over 96 KiB", reference));
                }
                Ok(ClientFrame::Send {
                    id: MessageId(send.id),
                    to: UserId(send.to),
                    kind: send.kind,
                    body: Bytes(body),
                })
            }
            "ack" => {
                let ack: AckFields = serde_json::from_value(fields(object))
                    .map_err(|e| FrameError::new(codes::INVALID_FRAME, format!("ack: {e}"), reference.clone()))?;
                Ok(ClientFrame::Ack { id: MessageId(ack.id) })
            }
            other => Err(FrameError::new(
                codes::INVALID_FRAME,
                format!("unknown type {:?}", other.chars().take(32).collect::<String>()),
                reference,
            )),
        }
    }
}

/// What the relay sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The message is durably accepted (sent only after its commit).
    Sent {
        /// The sender's id.
        id: MessageId,
        /// When the server accepted it (ms since the Unix epoch).
        server_ts: i64,
    },
    /// A message for this client.
    Message {
        /// Sender-chosen id; ack it.
        id: MessageId,
        /// Sender.
        from: UserId,
        /// Client label.
        kind: String,
        /// Ciphertext, standard Base64.
        body: String,
        /// When the server accepted it (ms since the Unix epoch).
        server_ts: i64,
    },
    /// The backlog has been delivered; what follows is live.
    QueueEmpty,
    /// A refused frame; the connection stays open.
    Error {
        /// One of [`codes`].
        code: &'static str,
        /// Detail.
        message: String,
        /// The refused frame's `id`, if any.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
}

#[derive(Serialize)]
struct Versioned<'a> {
    v: u64,
    #[serde(flatten)]
    frame: &'a ServerFrame,
}

impl ServerFrame {
    /// A `message` frame for a body.
    pub fn message(id: MessageId, from: UserId, kind: String, body: &Bytes, server_ts: i64) -> ServerFrame {
        ServerFrame::Message { id, from, kind, body: STANDARD.encode(&body.0), server_ts }
    }

    /// The JSON text, with `"v": 1`.
    pub fn to_text(&self) -> String {
        // Serializing a plain enum of strings and numbers cannot fail.
        serde_json::to_string(&Versioned { v: PROTOCOL_VERSION, frame: self }).unwrap_or_default()
    }
}

impl From<FrameError> for ServerFrame {
    fn from(error: FrameError) -> Self {
        ServerFrame::Error { code: error.code, message: error.message, reference: error.reference }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const ID: &str = "0190b6c4-52d4-7c3e-9d3c-1a2b3c4d5e6f";
    const TO: &str = "0190b6c4-52d4-7c3e-9d3c-000000000002";

    fn send_text(body: &str) -> String {
        format!(r#"{{"v":1,"type":"send","id":"{ID}","to":"{TO}","kind":"whisper","body":"{body}"}}"#)
    }

    #[test]
    fn valid_frames_parse() {
        let frame = ClientFrame::parse(&send_text("aGVsbG8=")).expect("valid send");
        assert_eq!(
            frame,
            ClientFrame::Send {
                id: MessageId(Uuid::parse_str(ID).expect("uuid")),
                to: UserId(Uuid::parse_str(TO).expect("uuid")),
                kind: "whisper".into(),
                body: Bytes(b"hello".to_vec()),
            }
        );
        let ack = ClientFrame::parse(&format!(r#"{{"v":1,"type":"ack","id":"{ID}"}}"#)).expect("valid ack");
        assert_eq!(ack, ClientFrame::Ack { id: MessageId(Uuid::parse_str(ID).expect("uuid")) });
    }

    #[test]
    fn each_kind_of_bad_frame_gets_its_code_and_the_reference() {
        let big = STANDARD.encode(vec![0u8; MAX_BODY_BYTES + 1]);
        let cases = [
            ("{", codes::MALFORMED_JSON),
            ("[1,2]", codes::MALFORMED_JSON),
            (r#"{"type":"ack","id":"x"}"#, codes::INVALID_FRAME),
            (r#"{"v":2,"type":"ack","id":"x"}"#, codes::UNSUPPORTED_VERSION),
            (r#"{"v":"1","type":"ack","id":"x"}"#, codes::UNSUPPORTED_VERSION),
            (r#"{"v":1,"type":"dance","id":"x"}"#, codes::INVALID_FRAME),
            (r#"{"v":1,"type":"ack","id":"not-a-uuid"}"#, codes::INVALID_FRAME),
            (r#"{"v":1,"type":"ack","id":42}"#, codes::INVALID_FRAME),
            (&format!(r#"{{"v":1,"type":"ack","id":"{ID}","extra":true}}"#), codes::INVALID_FRAME),
            (&send_text("%%%"), codes::INVALID_FRAME),
            (&send_text(&big), codes::BODY_TOO_LARGE),
            (&send_text("aGVsbG8=").replace("whisper", "bad kind"), codes::INVALID_FRAME),
        ];
        for (text, code) in cases {
            let error = ClientFrame::parse(text).expect_err(text);
            assert_eq!(error.code, code, "{text}");
        }
        let error = ClientFrame::parse(&send_text("%%%")).expect_err("bad base64");
        assert_eq!(error.reference.as_deref(), Some(ID));
    }

    #[test]
    fn server_frames_carry_the_version() {
        let text = ServerFrame::QueueEmpty.to_text();
        assert_eq!(text, r#"{"v":1,"type":"queue_empty"}"#);
        let error: ServerFrame = FrameError::new(codes::INVALID_FRAME, "x", Some("r".into())).into();
        assert_eq!(error.to_text(), r#"{"v":1,"type":"error","code":"invalid_frame","message":"x","ref":"r"}"#);
    }

    /// 10,000 random frames: random bytes, random JSON, and valid frames with
    /// random mutations. Every one is parsed or refused with a documented
    /// code; none panics. Seeded, so a failure reproduces.
    #[test]
    fn ten_thousand_random_frames_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x005e_edf4_a3e5);
        let valid = [send_text("aGVsbG8="), format!(r#"{{"v":1,"type":"ack","id":"{ID}"}}"#)];
        let alphabet: Vec<char> = r#"{}[]":,0123456789abcdefvtype-_ \u{0}é😀\"#.chars().collect();
        let (mut accepted, mut refused) = (0, 0);
        for n in 0..10_000 {
            let text = match n % 4 {
                0 => String::from_utf8_lossy(
                    &(0..rng.random_range(0..200)).map(|_| rng.random::<u8>()).collect::<Vec<_>>(),
                )
                .into_owned(),
                1 => random_json(&mut rng, 3).to_string(),
                _ => {
                    let mut chars: Vec<char> = valid[n % 2].chars().collect();
                    for _ in 0..rng.random_range(1..6) {
                        let at = rng.random_range(0..chars.len());
                        match rng.random_range(0..3) {
                            0 => chars[at] = alphabet[rng.random_range(0..alphabet.len())],
                            1 => {
                                chars.remove(at);
                            }
                            _ => chars.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                        }
                        if chars.is_empty() {
                            break;
                        }
                    }
                    chars.into_iter().collect()
                }
            };
            match ClientFrame::parse(&text) {
                Ok(_) => accepted += 1,
                Err(error) => {
                    assert!(codes::ALL.contains(&error.code), "undocumented code {} for {text:?}", error.code);
                    assert!(ServerFrame::from(error).to_text().starts_with(r#"{"v":1,"type":"error""#));
                    refused += 1;
                }
            }
        }
        assert_eq!(accepted + refused, 10_000);
        assert!(refused > 9_000, "the mutations should mostly break frames ({accepted} accepted)");
    }

    fn random_json(rng: &mut StdRng, depth: u32) -> Value {
        match rng.random_range(0..if depth == 0 { 4 } else { 6 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.random()),
            2 => Value::from(rng.random::<i64>()),
            3 => Value::String(["v", "type", "send", "ack", "id", ID, ""][rng.random_range(0..7)].to_owned()),
            4 => Value::Array((0..rng.random_range(0..4)).map(|_| random_json(rng, depth - 1)).collect()),
            _ => {
                let keys = ["v", "type", "id", "to", "kind", "body", "x"];
                Value::Object(
                    (0..rng.random_range(0..6))
                        .map(|_| (keys[rng.random_range(0..keys.len())].to_owned(), random_json(rng, depth - 1)))
                        .collect(),
                )
            }
        }
    }
}
