//! `privcomm-chat bench`: what the encrypted store costs per message.
//! Encrypt+persist and decrypt+persist through the client core (libsignal on
//! the encrypted SQLite store: the session, the message log, the outbox and
//! the de-duplication tag) against raw libsignal with its in-memory stores,
//! on the same messages in the same run (docs/BENCHMARKS.md).
//!
//! Both sides measure the steady state of a conversation (Bob has answered
//! once, so messages are Whisper messages) from wire bytes to wire bytes,
//! and take turns message by message (raw, then the core, on the same
//! text), so that the machine's ups and downs and the caches' fall on both. The core stages each message and commits a burst at once, as the
//! connection does (ADR 0017): a burst of `burst` messages is encrypted, made
//! durable in one commit, decrypted by the other side, made durable in one
//! commit, and its `sent` confirmations are staged (they go with the next
//! burst's commit). A message's figure is its own call (for a sent message
//! the encryption and the `sent` confirmation) plus its share of its burst's
//! commit; the commits are reported apart as well, and so is the work of
//! the stores' background checkpoints.

use crate::core::{Core, Incoming};
use crate::error::{ClientError, Result};
use crate::signal::now_ms;
use libsignal_protocol::{
    CiphertextMessage, CiphertextMessageType, DeviceId, GenericSignedPreKey as _, IdentityKeyPair,
    InMemSignalProtocolStore, KeyPair, KyberPreKeyRecord, KyberPreKeyStore as _, PreKeyBundle, PreKeyRecord,
    PreKeyStore as _, ProtocolAddress, SignedPreKeyRecord, SignedPreKeyStore as _, Timestamp, kem, message_decrypt,
    message_encrypt, process_prekey_bundle,
};
use std::time::{Instant, SystemTime};

/// Per-operation times in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Raw libsignal, in-memory stores: encrypt.
    pub raw_encrypt: Vec<f64>,
    /// Raw libsignal, in-memory stores: decrypt.
    pub raw_decrypt: Vec<f64>,
    /// The client core: encrypt + persist.
    pub store_encrypt: Vec<f64>,
    /// The client core: decrypt + persist.
    pub store_decrypt: Vec<f64>,
    /// Messages per commit.
    pub burst: usize,
    /// The sender's commits, one per burst.
    pub encrypt_commits: Vec<f64>,
    /// The recipient's commits, one per burst.
    pub decrypt_commits: Vec<f64>,
    /// Wire bytes per message (mean).
    pub wire_bytes: f64,
    /// Background checkpoints of both stores: how many, and their time in total (µs).
    pub checkpoints: (u64, f64),
}

/// The `q` quantile (0..=1) of `values`, in their unit.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(((sorted.len().saturating_sub(1)) as f64 * q).round() as usize).copied().unwrap_or(0.0)
}

const TEXT: &str = "A message of about the length people type into a chat, sent many times over.";

fn micros(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

/// What the core encrypts for a text message (the same bytes for raw libsignal).
fn content(n: usize) -> Vec<u8> {
    serde_json::json!({ "v": 1, "type": "text", "text": format!("{TEXT} #{n}"), "sent_at_ms": now_ms() })
        .to_string()
        .into_bytes()
}

/// Runs `messages` messages A → B both ways of measuring, taking turns
/// message by message (the core commits once per `burst`); stores live in `dir`.
pub async fn run(messages: usize, burst: usize, dir: &std::path::Path) -> Result<Figures> {
    let burst = burst.max(1);
    let mut raw = Raw::new().await?;
    let mut stored = Stored::new(dir).await?;
    let mut figures = Figures { burst, ..Figures::default() };
    let (mut n, mut wire_bytes) = (0, 0usize);
    while n < messages {
        let size = burst.min(messages - n);
        wire_bytes += stored.burst(n, size, &mut raw, &mut figures).await?;
        n += size;
    }
    figures.wire_bytes = wire_bytes as f64 / messages.max(1) as f64;
    figures.checkpoints = stored.check_and_remove(messages)?;
    Ok(figures)
}

/// Alice and Bob on raw libsignal with its in-memory stores.
struct Raw {
    alice: InMemSignalProtocolStore,
    bob: InMemSignalProtocolStore,
    alice_address: ProtocolAddress,
    bob_address: ProtocolAddress,
}

impl Raw {
    async fn new() -> Result<Raw> {
        let rng = &mut rand::rng();
        let device = DeviceId::new(1).expect("device 1");
        let (alice_address, bob_address) =
            (ProtocolAddress::new("alice".into(), device), ProtocolAddress::new("bob".into(), device));
        let mut alice = InMemSignalProtocolStore::new(IdentityKeyPair::generate(rng), 1)?;
        let bob_identity = IdentityKeyPair::generate(rng);
        let mut bob = InMemSignalProtocolStore::new(bob_identity, 2)?;
        let now = Timestamp::from_epoch_millis(now_ms());
        let one_time = KeyPair::generate(rng);
        bob.save_pre_key(1.into(), &PreKeyRecord::new(1.into(), &one_time)).await?;
        let signed = KeyPair::generate(rng);
        let signature = bob_identity
            .private_key()
            .calculate_signature(&signed.public_key.serialize(), rng)
            .map_err(crate::error::protocol)?;
        bob.save_signed_pre_key(1.into(), &SignedPreKeyRecord::new(1.into(), now, &signed, &signature)).await?;
        let kyber = KyberPreKeyRecord::generate(kem::KeyType::Kyber1024, 1.into(), bob_identity.private_key())?;
        bob.save_kyber_pre_key(1.into(), &kyber).await?;
        let bundle = PreKeyBundle::new(
            2,
            device,
            Some((1.into(), one_time.public_key)),
            1.into(),
            signed.public_key,
            signature.to_vec(),
            1.into(),
            kyber.public_key()?,
            kyber.signature()?,
            *bob_identity.identity_key(),
        )?;
        process_prekey_bundle(
            &bob_address,
            &mut alice.session_store,
            &mut alice.identity_store,
            &bundle,
            SystemTime::now(),
            rng,
        )
        .await?;
        let mut raw = Raw { alice, bob, alice_address, bob_address };
        let hello = raw_encrypt(&mut raw.alice, &raw.bob_address, b"hello").await?;
        raw_decrypt(&mut raw.bob, &raw.alice_address, &hello).await?;
        let answer = raw_encrypt(&mut raw.bob, &raw.alice_address, b"hello back").await?;
        raw_decrypt(&mut raw.alice, &raw.bob_address, &answer).await?;
        Ok(raw)
    }

    /// Alice encrypts message `n`: its content and wire form; the time goes to `figures`.
    async fn encrypt(
        &mut self,
        n: usize,
        figures: &mut Figures,
    ) -> Result<(Vec<u8>, (CiphertextMessageType, Vec<u8>))> {
        let content = content(n);
        let started = Instant::now();
        let wire = raw_encrypt(&mut self.alice, &self.bob_address, &content).await?;
        figures.raw_encrypt.push(micros(started));
        Ok((content, wire))
    }

    /// Bob decrypts it; the time goes to `figures`.
    async fn decrypt(
        &mut self,
        (content, wire): &(Vec<u8>, (CiphertextMessageType, Vec<u8>)),
        figures: &mut Figures,
    ) -> Result<()> {
        let started = Instant::now();
        let plain = raw_decrypt(&mut self.bob, &self.alice_address, wire).await?;
        figures.raw_decrypt.push(micros(started));
        if plain != *content {
            return Err(ClientError::Protocol("raw libsignal decrypted something else".into()));
        }
        Ok(())
    }
}

/// libsignal's encryption, to the bytes that go on the wire (as the core hands them out).
async fn raw_encrypt(
    from: &mut InMemSignalProtocolStore,
    to: &ProtocolAddress,
    content: &[u8],
) -> Result<(CiphertextMessageType, Vec<u8>)> {
    let ciphertext = message_encrypt(
        content,
        to,
        &mut from.session_store,
        &mut from.identity_store,
        SystemTime::now(),
        &mut rand::rng(),
    )
    .await?;
    Ok((ciphertext.message_type(), ciphertext.serialize().to_vec()))
}

/// libsignal's decryption, from the bytes on the wire (parsed, as the core does).
async fn raw_decrypt(
    at: &mut InMemSignalProtocolStore,
    from: &ProtocolAddress,
    (kind, wire): &(CiphertextMessageType, Vec<u8>),
) -> Result<Vec<u8>> {
    let ciphertext = match kind {
        CiphertextMessageType::PreKey => CiphertextMessage::PreKeySignalMessage(wire.as_slice().try_into()?),
        _ => CiphertextMessage::SignalMessage(wire.as_slice().try_into()?),
    };
    Ok(message_decrypt(
        &ciphertext,
        from,
        &mut at.session_store,
        &mut at.identity_store,
        &mut at.pre_key_store,
        &at.signed_pre_key_store,
        &mut at.kyber_pre_key_store,
        &mut rand::rng(),
    )
    .await?)
}

/// Alice and Bob on the client core, each with a store file in `dir`.
struct Stored {
    alice: Core,
    bob: Core,
    alice_id: String,
    bob_id: String,
    files: Vec<std::path::PathBuf>,
}

impl Stored {
    async fn new(dir: &std::path::Path) -> Result<Stored> {
        let run = uuid::Uuid::now_v7().simple().to_string();
        let (alice_id, bob_id) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
        let files: Vec<_> = ["alice", "bob"].iter().map(|name| dir.join(format!("bench-{run}-{name}.db"))).collect();
        let (alice, bob) = (Stored::open(&files[0])?, Stored::open(&files[1])?);
        alice.create_offline(&alice_id)?;
        bob.create_offline(&bob_id)?;
        alice.start_session(&bob_id, &bob.own_bundle(1).await?).await?;
        let (hello, frame) = alice.encrypt_text(&bob_id, "hello").await?;
        bob.receive(&hello.id, &alice_id, &frame.kind, &frame.body).await?;
        let (answer, frame) = bob.encrypt_text(&alice_id, "hello back").await?;
        alice.receive(&answer.id, &bob_id, &frame.kind, &frame.body).await?;
        for (core, id) in [(&alice, &hello.id), (&bob, &answer.id)] {
            core.mark_sent(id).await?;
            core.durable().await?;
        }
        Ok(Stored { alice, bob, alice_id, bob_id, files })
    }

    fn open(path: &std::path::Path) -> Result<Core> {
        Core::open(path, &[5u8; 32], "http://127.0.0.1:9")
    }

    /// One burst, each message right after raw libsignal's; returns the wire bytes sent.
    async fn burst(&mut self, first: usize, size: usize, raw: &mut Raw, figures: &mut Figures) -> Result<usize> {
        let (alice, bob) = (&self.alice, &self.bob);
        let mut sent = Vec::with_capacity(size);
        let mut raw_sent = Vec::with_capacity(size);
        let mut encrypt = Vec::with_capacity(size);
        for n in first..first + size {
            raw_sent.push(raw.encrypt(n, figures).await?);
            let text = format!("{TEXT} #{n}");
            let started = Instant::now();
            let (message, frame) = alice.encrypt_text(&self.bob_id, &text).await?;
            encrypt.push(micros(started));
            sent.push((text, message, frame));
        }
        let started = Instant::now();
        alice.durable().await?;
        let encrypt_commit = micros(started);
        let mut decrypt = Vec::with_capacity(size);
        for ((text, message, frame), raw_message) in sent.iter().zip(&raw_sent) {
            raw.decrypt(raw_message, figures).await?;
            let started = Instant::now();
            let outcome = bob.receive(&message.id, &self.alice_id, &frame.kind, &frame.body).await?;
            decrypt.push(micros(started));
            match outcome {
                Incoming::Stored(received) if received.text == *text => {}
                _ => return Err(ClientError::Protocol("the core did not decrypt what it encrypted".into())),
            }
        }
        let started = Instant::now();
        bob.durable().await?;
        let decrypt_commit = micros(started);
        // What the connection does when the relay answers `sent` (staged,
        // committed with the next burst): part of the cost of sending.
        for (encrypted, (_, message, _)) in encrypt.iter_mut().zip(&sent) {
            let started = Instant::now();
            alice.mark_sent(&message.id).await?;
            *encrypted += micros(started);
        }
        figures.store_encrypt.extend(encrypt.iter().map(|e| e + encrypt_commit / size as f64));
        figures.store_decrypt.extend(decrypt.iter().map(|d| d + decrypt_commit / size as f64));
        figures.encrypt_commits.push(encrypt_commit);
        figures.decrypt_commits.push(decrypt_commit);
        Ok(sent.iter().map(|(_, _, frame)| frame.body.len()).sum())
    }

    /// Checks that what was measured is in the files (every message in both
    /// logs, Alice's outbox empty), then removes them; returns the
    /// background checkpoints' count and time (µs).
    fn check_and_remove(self, messages: usize) -> Result<(u64, f64)> {
        let files = self.files.clone();
        let checkpoints = [&self.alice, &self.bob]
            .iter()
            .map(|core| core.store.checkpoints())
            .fold((0, std::time::Duration::ZERO), |(count, time), (c, t)| (count + c, time + t));
        drop(self);
        let (alice, bob) = (Stored::open(&files[0])?, Stored::open(&files[1])?);
        let complete = bob.messages()?.len() == messages + 2
            && alice.messages()?.len() == messages + 2
            && alice.unsent_count()? == 0;
        drop((alice, bob));
        for file in &files {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
        }
        if !complete {
            return Err(ClientError::Store("the stores do not hold what the benchmark wrote".into()));
        }
        Ok((checkpoints.0, checkpoints.1.as_secs_f64() * 1e6))
    }
}
