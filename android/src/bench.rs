//! `privcomm-chat bench`: what the encrypted store costs per message.
//! Encrypt+persist and decrypt+persist through the client core (libsignal on
//! the encrypted SQLite store, the message log, the outbox and the
//! de-duplication record, one transaction each) against raw libsignal with
//! its in-memory stores, on the same messages in the same run
//! (docs/BENCHMARKS.md).

use crate::core::{Core, Incoming};
use crate::error::{ClientError, Result};
use crate::signal::now_ms;
use libsignal_protocol::{
    DeviceId, GenericSignedPreKey as _, IdentityKeyPair, InMemSignalProtocolStore, KeyPair, KyberPreKeyRecord,
    KyberPreKeyStore as _, PreKeyBundle, PreKeyRecord, PreKeyStore as _, ProtocolAddress, SignedPreKeyRecord,
    SignedPreKeyStore as _, Timestamp, kem, message_decrypt, message_encrypt, process_prekey_bundle,
};
use std::time::{Instant, SystemTime};

/// Per-operation times in microseconds.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Raw libsignal, in-memory stores: encrypt.
    pub raw_encrypt: Vec<f64>,
    /// Raw libsignal, in-memory stores: decrypt.
    pub raw_decrypt: Vec<f64>,
    /// The client core: encrypt + persist.
    pub store_encrypt: Vec<f64>,
    /// The client core: decrypt + persist.
    pub store_decrypt: Vec<f64>,
}

/// The `q` quantile (0..=1) of `values`, in their unit.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(((sorted.len().saturating_sub(1)) as f64 * q).round() as usize).copied().unwrap_or(0.0)
}

const TEXT: &str = "A message of about the length people type into a chat, sent many times over.";

/// Runs `messages` messages A → B both ways of measuring; stores live in `dir`.
pub async fn run(messages: usize, dir: &std::path::Path) -> Result<Figures> {
    let (raw_encrypt, raw_decrypt) = raw(messages).await?;
    let (store_encrypt, store_decrypt) = stored(messages, dir).await?;
    Ok(Figures { raw_encrypt, raw_decrypt, store_encrypt, store_decrypt })
}

async fn raw(messages: usize) -> Result<(Vec<f64>, Vec<f64>)> {
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
    let (mut encrypt, mut decrypt) = (Vec::with_capacity(messages), Vec::with_capacity(messages));
    for n in 0..messages {
        let content = content(n);
        let started = Instant::now();
        let ciphertext = message_encrypt(
            &content,
            &bob_address,
            &mut alice.session_store,
            &mut alice.identity_store,
            SystemTime::now(),
            rng,
        )
        .await?;
        encrypt.push(started.elapsed().as_secs_f64() * 1e6);
        let started = Instant::now();
        let plain = message_decrypt(
            &ciphertext,
            &alice_address,
            &mut bob.session_store,
            &mut bob.identity_store,
            &mut bob.pre_key_store,
            &bob.signed_pre_key_store,
            &mut bob.kyber_pre_key_store,
            rng,
        )
        .await?;
        decrypt.push(started.elapsed().as_secs_f64() * 1e6);
        if plain != content {
            return Err(ClientError::Protocol("raw libsignal decrypted something else".into()));
        }
    }
    Ok((encrypt, decrypt))
}

/// What the core encrypts for a text message (the same bytes for raw libsignal).
fn content(n: usize) -> Vec<u8> {
    serde_json::json!({ "v": 1, "type": "text", "text": format!("{TEXT} #{n}"), "sent_at_ms": now_ms() })
        .to_string()
        .into_bytes()
}

async fn stored(messages: usize, dir: &std::path::Path) -> Result<(Vec<f64>, Vec<f64>)> {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let (alice_id, bob_id) = (uuid::Uuid::now_v7().to_string(), uuid::Uuid::now_v7().to_string());
    let open = |name: &str| Core::open(&dir.join(format!("bench-{run}-{name}.db")), &[5u8; 32], "http://127.0.0.1:9");
    let (alice, bob) = (open("alice")?, open("bob")?);
    alice.create_offline(&alice_id)?;
    bob.create_offline(&bob_id)?;
    alice.start_session(&bob_id, &bob.own_bundle(1).await?).await?;
    let (mut encrypt, mut decrypt) = (Vec::with_capacity(messages), Vec::with_capacity(messages));
    for n in 0..messages {
        let text = format!("{TEXT} #{n}");
        let started = Instant::now();
        let (message, frame) = alice.encrypt_text(&bob_id, &text).await?;
        encrypt.push(started.elapsed().as_secs_f64() * 1e6);
        let started = Instant::now();
        let outcome = bob.receive(&message.id, &alice_id, &frame.kind, &frame.body).await?;
        decrypt.push(started.elapsed().as_secs_f64() * 1e6);
        match outcome {
            Incoming::Stored(received) if received.text == text => {}
            _ => return Err(ClientError::Protocol("the core did not decrypt what it encrypted".into())),
        }
        // What the connection does when the relay answers `sent`.
        alice.mark_sent(&message.id)?;
    }
    for name in ["alice", "bob"] {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(dir.join(format!("bench-{run}-{name}.db{suffix}")));
        }
    }
    Ok((encrypt, decrypt))
}
