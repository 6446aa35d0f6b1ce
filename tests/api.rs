//! The key-directory and auth API against real servers: embedded (SQLite +
//! in-process bus) and cluster (PostgreSQL + NATS JetStream). Keys are real
//! libsignal keys; a fetched bundle must establish a real PQXDH session.

#[macro_use]
mod support;

use privcomm_domain::Clock as _;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use support::TestResult;
use support::api::{Client, Mode, TestApi, b64, generous_limits};

in_both_modes!(
    a_fetched_bundle_establishes_a_real_pqxdh_session,
    every_malformed_field_is_refused_by_name_and_changes_nothing,
    a_phone_hash_registers_once_unless_the_identity_is_proven,
    parallel_fetches_hand_out_each_one_time_key_exactly_once,
    tokens_are_refused_unless_issued_by_us_for_us_and_current,
    key_uploads_and_push_tokens_are_checked_and_stored,
    rate_limits_allow_exactly_the_limit_then_answer_429,
    turn_credentials_follow_coturns_scheme_for_the_caller_only,
);

async fn a_fetched_bundle_establishes_a_real_pqxdh_session(mode: Mode) -> TestResult {
    use libsignal_protocol::*;
    let api = TestApi::start(mode, generous_limits()).await?;
    let mut alice = Client::new("+15550000001");
    let mut bob = Client::new("+15550000002");
    let alice_id = alice.register(&api, 3, 3).await?;
    bob.register(&api, 1, 1).await?;
    let token = bob.login(&api).await?;
    let (status, bundle) = api.get_auth(&format!("/v1/keys/{alice_id}"), &token).await?;
    assert_eq!(status, 200, "{bundle}");
    assert_eq!(bundle["kyber_prekey"]["last_resort"], false);
    assert_eq!(bundle["one_time_prekey"]["id"], 1);

    let decode =
        |v: &Value| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, v.as_str().unwrap_or(""));
    let prekey = &bundle["one_time_prekey"];
    let bundle = PreKeyBundle::new(
        bundle["registration_id"].as_u64().ok_or("registration_id")? as u32,
        DeviceId::new(1).map_err(|e| format!("{e:?}"))?,
        Some((
            PreKeyId::from(prekey["id"].as_u64().ok_or("id")? as u32),
            PublicKey::deserialize(&decode(&prekey["public_key"])?)?,
        )),
        SignedPreKeyId::from(bundle["signed_prekey"]["id"].as_u64().ok_or("spk id")? as u32),
        PublicKey::deserialize(&decode(&bundle["signed_prekey"]["public_key"])?)?,
        decode(&bundle["signed_prekey"]["signature"])?,
        KyberPreKeyId::from(bundle["kyber_prekey"]["id"].as_u64().ok_or("kyber id")? as u32),
        kem::PublicKey::deserialize(&decode(&bundle["kyber_prekey"]["public_key"])?)?,
        decode(&bundle["kyber_prekey"]["signature"])?,
        IdentityKey::decode(&decode(&bundle["identity_key"])?)?,
    )?;
    let mut bob_store = InMemSignalProtocolStore::new(bob.identity, 7)?;
    let address = ProtocolAddress::new(alice_id.clone(), DeviceId::new(1).map_err(|e| format!("{e:?}"))?);
    process_prekey_bundle(
        &address,
        &mut bob_store.session_store,
        &mut bob_store.identity_store,
        &bundle,
        std::time::SystemTime::now(),
        &mut rand::rng(),
    )
    .await?;
    assert!(bob_store.session_store.load_session(&address).await?.is_some(), "no session established");
    api.shutdown().await;
    Ok(())
}

/// One registration field changed, and what the answer must name.
fn malformed_cases(client: &Client) -> Vec<(&'static str, Value, u16, &'static str)> {
    let valid = client.registration(2, 2);
    let with = |path: &[&str], value: Value| {
        let mut body = valid.clone();
        let mut target = &mut body;
        for key in &path[..path.len() - 1] {
            target = &mut target[*key];
        }
        target[path[path.len() - 1]] = value;
        body
    };
    let other = Client::new("+15559999999");
    let ec_public = valid["signed_prekey"]["public_key"].clone();
    let kyber_public = valid["kyber_last_resort"]["public_key"].clone();
    let mut unknown_field = valid.clone();
    unknown_field["nickname"] = json!("mallory");
    let mut too_many = valid.clone();
    too_many["one_time_prekeys"] = json!((1..=101).map(Client::one_time_prekey).collect::<Vec<_>>());
    let mut too_many_kyber = valid.clone();
    too_many_kyber["kyber_prekeys"] = json!((1..=101).map(|id| client.kyber_prekey(id)).collect::<Vec<_>>());
    let mut repeated_ids = valid.clone();
    repeated_ids["one_time_prekeys"] = json!([Client::one_time_prekey(5), Client::one_time_prekey(5)]);
    vec![
        ("uppercase hex phone hash", with(&["phone_hash"], json!("A".repeat(64))), 400, "phone_hash"),
        ("short phone hash", with(&["phone_hash"], json!("ab".repeat(31))), 400, "phone_hash"),
        ("non-hex phone hash", with(&["phone_hash"], json!("zz".repeat(32))), 400, "phone_hash"),
        ("registration id 0", with(&["registration_id"], json!(0)), 400, "registration_id"),
        ("registration id as text", with(&["registration_id"], json!("42")), 422, "registration_id"),
        ("identity key not Base64", with(&["identity_key"], json!("%%%")), 400, "identity_key"),
        ("identity key of the wrong type", with(&["identity_key"], kyber_public.clone()), 400, "identity_key"),
        (
            "signed prekey not a key",
            with(&["signed_prekey", "public_key"], json!(b64(b"nonsense"))),
            400,
            "signed_prekey.public_key",
        ),
        (
            "signed prekey is a Kyber key",
            with(&["signed_prekey", "public_key"], kyber_public.clone()),
            400,
            "signed_prekey.public_key",
        ),
        (
            "signed prekey signed by another identity",
            with(&["signed_prekey"], other.signed_prekey(1)),
            400,
            "signed_prekey.signature",
        ),
        ("signature not Base64", with(&["signed_prekey", "signature"], json!("!!")), 400, "signed_prekey.signature"),
        (
            "Kyber last resort is an EC key",
            with(&["kyber_last_resort", "public_key"], ec_public.clone()),
            400,
            "kyber_last_resort.public_key",
        ),
        (
            "Kyber last resort signed by another identity",
            with(&["kyber_last_resort"], other.kyber_prekey(9)),
            400,
            "kyber_last_resort.signature",
        ),
        (
            "one-time prekey not a key",
            with(&["one_time_prekeys"], json!([{ "id": 1, "public_key": b64(&[9; 33]) }])),
            400,
            "one_time_prekeys[0].public_key",
        ),
        (
            "Kyber one-time key with a bad signature",
            with(&["kyber_prekeys"], json!([other.kyber_prekey(3)])),
            400,
            "kyber_prekeys[0].signature",
        ),
        ("101 one-time prekeys", too_many, 400, "one_time_prekeys"),
        ("101 Kyber prekeys", too_many_kyber, 400, "kyber_prekeys"),
        ("repeated one-time prekey ids", repeated_ids, 400, "one_time_prekeys"),
        ("unknown field", unknown_field, 422, "nickname"),
        ("prekey id negative", with(&["signed_prekey", "id"], json!(-1)), 422, "signed_prekey.id"),
        (
            "missing identity key",
            {
                let mut b = valid.clone();
                b.as_object_mut().map(|o| o.remove("identity_key"));
                b
            },
            422,
            "identity_key",
        ),
    ]
}

async fn every_malformed_field_is_refused_by_name_and_changes_nothing(mode: Mode) -> TestResult {
    let api = TestApi::start(mode, generous_limits()).await?;
    let client = Client::new("+15550000003");
    let before = api.store.head().await?;
    for (case, body, status, field) in malformed_cases(&client) {
        let (got, answer) = api.post("/v1/accounts", &body).await?;
        assert_eq!(got, status, "{case}: {answer}");
        let named =
            answer["field"].as_str() == Some(field) || answer["message"].as_str().is_some_and(|m| m.contains(field));
        assert!(named, "{case}: the answer must name {field}: {answer}");
    }
    let not_json =
        api.http.post(api.url("/v1/accounts")).body("{").header("content-type", "application/json").send().await?;
    assert_eq!(not_json.status().as_u16(), 422);
    let no_content_type = api.http.post(api.url("/v1/accounts")).body("{}").send().await?;
    assert_eq!(no_content_type.status().as_u16(), 422);
    assert_eq!(api.store.head().await?, before, "a refused request must not append anything");
    // And the untouched body is fine.
    let (status, answer) = api.post("/v1/accounts", &client.registration(2, 2)).await?;
    assert_eq!(status, 201, "{answer}");
    api.shutdown().await;
    Ok(())
}

async fn a_phone_hash_registers_once_unless_the_identity_is_proven(mode: Mode) -> TestResult {
    let api = TestApi::start(mode, generous_limits()).await?;
    let mut alice = Client::new("+15550000004");
    let alice_id = alice.register(&api, 1, 1).await?;

    // The same phone hash with a new identity and no proof: 409, nothing stored.
    let mut thief = Client::new("+15550000004");
    let head = api.store.head().await?;
    let (status, body) = api.post("/v1/accounts", &thief.registration(1, 1)).await?;
    assert_eq!((status, body["error"].as_str()), (409, Some("conflict")), "{body}");

    // A proof signed by the wrong (new) key: 401.
    let (_, challenge) = api.post("/v1/auth/challenge", &json!({ "user_id": alice_id })).await?;
    let nonce = challenge["nonce"].as_str().ok_or("nonce")?;
    let mut forged = thief.registration(1, 1);
    forged["identity_proof"] = json!({ "nonce": nonce, "signature": thief.sign(nonce.as_bytes()) });
    assert_eq!(api.post("/v1/accounts", &forged).await?.0, 401);
    assert_eq!(api.store.head().await?, head);

    // Alice moves to a new device: the new keys, proven with the old identity.
    let mut new_device = Client::new("+15550000004");
    let (_, challenge) = api.post("/v1/auth/challenge", &json!({ "user_id": alice_id })).await?;
    let nonce = challenge["nonce"].as_str().ok_or("nonce")?;
    let mut change = new_device.registration(2, 2);
    change["identity_proof"] = json!({ "nonce": nonce, "signature": alice.sign(nonce.as_bytes()) });
    let (status, body) = api.post("/v1/accounts", &change).await?;
    assert_eq!((status, &body["identity_changed"]), (200, &json!(true)), "{body}");
    let events = api.store.read_all(head, 100).await?;
    assert!(events.iter().any(|e| e.event_type == "IdentityKeyChanged"), "the change must be its own event");
    // The proof is single-use.
    let (status, _) = api.post("/v1/accounts", &change).await?;
    assert_eq!(status, 401);
    // The new identity logs in; the old one no longer can.
    new_device.user_id = Some(alice_id.clone());
    new_device.login(&api).await?;
    assert!(alice.login(&api).await.is_err());
    thief.user_id = None;
    api.shutdown().await;
    Ok(())
}

async fn parallel_fetches_hand_out_each_one_time_key_exactly_once(mode: Mode) -> TestResult {
    let api = Arc::new(TestApi::start(mode, generous_limits()).await?);
    let mut alice = Client::new("+15550000005");
    let alice_id = alice.register(&api, 100, 100).await?;
    let mut bob = Client::new("+15550000006");
    bob.register(&api, 0, 0).await?;
    let token = Arc::new(bob.login(&api).await?);
    let mut fetches = Vec::new();
    for _ in 0..200 {
        let (api, token, path) = (api.clone(), token.clone(), format!("/v1/keys/{alice_id}"));
        fetches.push(tokio::spawn(async move { api.get_auth(&path, &token).await }));
    }
    let (mut one_time, mut kyber, mut none, mut last_resort) = (HashSet::new(), HashSet::new(), 0, 0);
    for fetch in fetches {
        let (status, bundle) = fetch.await??;
        assert_eq!(status, 200, "{bundle}");
        match bundle["one_time_prekey"]["id"].as_u64() {
            Some(id) => assert!(one_time.insert(id), "one-time prekey {id} handed out twice"),
            None => none += 1,
        }
        if bundle["kyber_prekey"]["last_resort"] == json!(true) {
            last_resort += 1;
            assert_eq!(bundle["kyber_prekey"]["id"], 1_000_000);
        } else {
            let id = bundle["kyber_prekey"]["id"].as_u64().ok_or("kyber id")?;
            assert!(kyber.insert(id), "Kyber prekey {id} handed out twice");
        }
    }
    assert_eq!((one_time.len(), none), (100, 100));
    assert_eq!((kyber.len(), last_resort), (100, 100));
    let alice_token = alice.login(&api).await?;
    let (status, counts) = api.get_auth("/v1/keys/count", &alice_token).await?;
    assert_eq!((status, counts), (200, json!({ "one_time": 0, "kyber": 0 })));
    match Arc::try_unwrap(api) {
        Ok(api) => api.shutdown().await,
        Err(_) => return Err("api still shared".into()),
    }
    Ok(())
}

/// Signs arbitrary claims with the server's token key, derived as documented
/// in `privcomm_api::tokens` (HMAC-SHA256(SECRET_KEY, "privcomm/jwt/v1")).
fn forge(claims: &Value, secret: &str) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret.as_bytes())?;
    mac.update(b"privcomm/jwt/v1");
    let key = mac.finalize().into_bytes();
    let key = jsonwebtoken::EncodingKey::from_secret(&key)?;
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), claims, &key)?)
}

async fn tokens_are_refused_unless_issued_by_us_for_us_and_current(mode: Mode) -> TestResult {
    let api = TestApi::start(mode, generous_limits()).await?;
    let mut alice = Client::new("+15550000007");
    let alice_id = alice.register(&api, 1, 1).await?;
    let mut bob = Client::new("+15550000008");
    let bob_id = bob.register(&api, 1, 1).await?;
    let good = alice.login(&api).await?;
    assert_eq!(api.get_auth("/v1/keys/count", &good).await?.0, 200);

    let now = api.clock.now().unix_seconds();
    let claims = |sub: &str, aud: &str, exp: i64| json!({ "sub": sub, "aud": aud, "iat": now, "exp": exp, "jti": "t" });
    let forged_right = forge(&claims(&alice_id, "privcomm", now + 300), support::api::SECRET)?;
    assert_eq!(api.get_auth("/v1/keys/count", &forged_right).await?.0, 200, "the forge helper must match the server");

    let parts: Vec<&str> = good.split('.').collect();
    let tampered_payload = {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut payload: Value = serde_json::from_slice(&engine.decode(parts[1])?)?;
        payload["sub"] = json!(bob_id);
        format!("{}.{}.{}", parts[0], engine.encode(serde_json::to_vec(&payload)?), parts[2])
    };
    let alg_none = {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.", engine.encode(br#"{"alg":"none","typ":"JWT"}"#), parts[1])
    };
    let cases = [
        ("expired", forge(&claims(&alice_id, "privcomm", now - 1), support::api::SECRET)?),
        ("wrong key", forge(&claims(&alice_id, "privcomm", now + 300), "another-secret-of-sufficient-length-000000")?),
        ("wrong audience", forge(&claims(&alice_id, "someone-else", now + 300), support::api::SECRET)?),
        (
            "unknown user",
            forge(&claims(&uuid::Uuid::now_v7().to_string(), "privcomm", now + 300), support::api::SECRET)?,
        ),
        ("alg none", alg_none),
        ("tampered payload", tampered_payload),
        ("garbage", "not.a.token".to_owned()),
    ];
    for (case, token) in cases {
        let (status, body) = api.get_auth("/v1/keys/count", &token).await?;
        assert_eq!(status, 401, "{case}: {body}");
    }
    let missing = api.http.get(api.url("/v1/keys/count")).send().await?;
    assert_eq!(missing.status().as_u16(), 401);

    // A token expires after 5 minutes.
    api.clock.advance(301 * 1_000_000);
    assert_eq!(api.get_auth("/v1/keys/count", &good).await?.0, 401, "a 301-second-old token must be refused");

    // Nonces: reuse, expiry, another user's, a bad signature.
    let challenge = |user: &str| json!({ "user_id": user });
    let (_, c) = api.post("/v1/auth/challenge", &challenge(&alice_id)).await?;
    let nonce = c["nonce"].as_str().ok_or("nonce")?.to_owned();
    assert_eq!(c["expires_in"], 60);
    let redeem =
        |user: &str, nonce: &str, signature: String| json!({ "user_id": user, "nonce": nonce, "signature": signature });
    assert_eq!(
        api.post("/v1/auth/token", &redeem(&alice_id, &nonce, bob.sign(nonce.as_bytes()))).await?.0,
        401,
        "bad signature"
    );
    assert_eq!(api.post("/v1/auth/token", &redeem(&alice_id, &nonce, alice.sign(nonce.as_bytes()))).await?.0, 200);
    assert_eq!(
        api.post("/v1/auth/token", &redeem(&alice_id, &nonce, alice.sign(nonce.as_bytes()))).await?.0,
        401,
        "reuse"
    );
    let (_, c) = api.post("/v1/auth/challenge", &challenge(&bob_id)).await?;
    let bobs = c["nonce"].as_str().ok_or("nonce")?.to_owned();
    assert_eq!(
        api.post("/v1/auth/token", &redeem(&alice_id, &bobs, alice.sign(bobs.as_bytes()))).await?.0,
        401,
        "foreign"
    );
    let (_, c) = api.post("/v1/auth/challenge", &challenge(&alice_id)).await?;
    let late = c["nonce"].as_str().ok_or("nonce")?.to_owned();
    api.clock.advance(61 * 1_000_000);
    assert_eq!(
        api.post("/v1/auth/token", &redeem(&alice_id, &late, alice.sign(late.as_bytes()))).await?.0,
        401,
        "expired"
    );
    let made_up = b64(&[0u8; 72]);
    assert_eq!(api.post("/v1/auth/token", &redeem(&alice_id, &made_up, alice.sign(made_up.as_bytes()))).await?.0, 401);
    bob.user_id = None;
    api.shutdown().await;
    Ok(())
}

async fn key_uploads_and_push_tokens_are_checked_and_stored(mode: Mode) -> TestResult {
    let api = TestApi::start(mode, generous_limits()).await?;
    let mut alice = Client::new("+15550000009");
    alice.register(&api, 2, 1).await?;
    let token = alice.login(&api).await?;
    let other = Client::new("+15550000010");

    let upload = json!({ "one_time_prekeys": (10..20).map(Client::one_time_prekey).collect::<Vec<_>>(),
                         "kyber_prekeys": [alice.kyber_prekey(50), alice.kyber_prekey(51)] });
    assert_eq!(api.put_auth("/v1/keys", &token, &upload).await?.0, 204);
    assert_eq!(api.get_auth("/v1/keys/count", &token).await?.1, json!({ "one_time": 12, "kyber": 3 }));

    let head = api.store.head().await?;
    let refused = [
        json!({ "kyber_prekeys": [other.kyber_prekey(60)] }),
        json!({ "one_time_prekeys": [Client::one_time_prekey(10)] }),
        json!({ "signed_prekey": other.signed_prekey(2) }),
        json!({ "kyber_last_resort": alice.kyber_prekey(70) }),
        json!({}),
    ];
    for body in refused {
        let (status, answer) = api.put_auth("/v1/keys", &token, &body).await?;
        assert_eq!(status, 400, "{body} → {answer}");
    }
    assert_eq!(api.store.head().await?, head, "refused uploads change nothing");
    let rotation =
        json!({ "signed_prekey": alice.signed_prekey(2), "kyber_last_resort": alice.kyber_prekey(2_000_000) });
    assert_eq!(api.put_auth("/v1/keys", &token, &rotation).await?.0, 204);

    assert_eq!(
        api.put_auth("/v1/push-token", &token, &json!({ "platform": "fcm", "token": "device-token-1" })).await?.0,
        204
    );
    assert_eq!(api.put_auth("/v1/push-token", &token, &json!({ "platform": "sms", "token": "x" })).await?.0, 400);
    assert_eq!(api.put_auth("/v1/push-token", &token, &json!({ "platform": "apns", "token": "" })).await?.0, 400);
    let events = api.store.read_all(head, 100).await?;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["SignedPreKeyRotated", "PushTokenRegistered"]);

    // Bundles of users that do not exist: 404; of ids that are not ids: 400. Nothing appended.
    let head = api.store.head().await?;
    let (status, body) = api.get_auth(&format!("/v1/keys/{}", uuid::Uuid::now_v7()), &token).await?;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")), "{body}");
    let (status, body) = api.get_auth("/v1/keys/not-a-uuid", &token).await?;
    assert_eq!((status, body["field"].as_str()), (400, Some("user_id")), "{body}");
    assert_eq!(api.store.head().await?, head);
    api.shutdown().await;
    Ok(())
}

/// 429, a positive `Retry-After`, and the same number in the JSON body.
async fn assert_limited(response: reqwest::Response, what: &str) -> TestResult {
    assert_eq!(response.status().as_u16(), 429, "{what} must be limited");
    let retry_after: u64 = response.headers().get("retry-after").ok_or("no Retry-After")?.to_str()?.parse()?;
    let body: Value = response.json().await?;
    assert_eq!(body["error"], "rate_limited", "{what}: {body}");
    assert_eq!(body["retry_after"].as_u64(), Some(retry_after), "{what}: {body}");
    assert!(retry_after > 0, "{what}: Retry-After must be positive");
    Ok(())
}

async fn rate_limits_allow_exactly_the_limit_then_answer_429(mode: Mode) -> TestResult {
    use privcomm_api::limits::{RateLimit, RateLimits};
    use std::time::Duration;
    let hour = Duration::from_secs(3600);
    let limits = RateLimits {
        registration: RateLimit { requests: 3, per: hour },
        key_bundle: RateLimit { requests: 5, per: hour },
        token_issue: RateLimit { requests: 2, per: hour },
        turn: RateLimit { requests: 2, per: hour },
    };
    let api = TestApi::start(mode, limits).await?;
    let mut clients: Vec<Client> = (0..4).map(|i| Client::new(&format!("+1555100000{i}"))).collect();
    for client in clients.iter_mut().take(3) {
        client.register(&api, 5, 0).await?;
    }
    let fourth = api.http.post(api.url("/v1/accounts")).json(&clients[3].registration(0, 0)).send().await?;
    assert_limited(fourth, "the 4th registration from one IP").await?;

    // Token issue: 2 per user.
    let token = clients[0].login(&api).await?;
    clients[0].login(&api).await?;
    let user_id = clients[0].user_id.clone().ok_or("id")?;
    let (_, challenge) = api.post("/v1/auth/challenge", &json!({ "user_id": user_id })).await?;
    let nonce = challenge["nonce"].as_str().ok_or("nonce")?.to_owned();
    let third = api
        .http
        .post(api.url("/v1/auth/token"))
        .json(&json!({ "user_id": user_id, "nonce": nonce, "signature": clients[0].sign(nonce.as_bytes()) }))
        .send()
        .await?;
    assert_limited(third, "the 3rd token for one user").await?;
    clients[1].login(&api).await?; // another user is not affected

    // Bundle fetches: 5 per requester, then 429 with Retry-After.
    let target = clients[1].user_id.clone().ok_or("id")?;
    for n in 0..5 {
        let (status, body) = api.get_auth(&format!("/v1/keys/{target}"), &token).await?;
        assert_eq!(status, 200, "fetch {n}: {body}");
    }
    let sixth = api.http.get(api.url(&format!("/v1/keys/{target}"))).bearer_auth(&token).send().await?;
    assert_limited(sixth, "the 6th bundle fetch by one user").await?;

    // TURN credentials: 2 per requester.
    for n in 0..2 {
        let (status, body) = api.get_auth("/v1/calls/turn", &token).await?;
        assert_eq!(status, 200, "TURN credential {n}: {body}");
    }
    let third = api.http.get(api.url("/v1/calls/turn")).bearer_auth(&token).send().await?;
    assert_limited(third, "the 3rd TURN credential for one user").await?;
    let metrics = api.http.get(api.url("/metrics")).send().await?.text().await?;
    assert!(metrics.contains("privcomm_rate_limited_total{limit=\"registration\"} 1"), "{metrics}");
    assert!(metrics.contains("privcomm_rate_limited_total{limit=\"key_bundle\"} 1"));
    assert!(metrics.contains("privcomm_rate_limited_total{limit=\"token_issue\"} 1"));
    assert!(metrics.contains("privcomm_rate_limited_total{limit=\"turn\"} 1"));
    api.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn cors_preflight_passes_only_for_allowed_origins() -> TestResult {
    let api = TestApi::start(Mode::Embedded, generous_limits()).await?;
    let preflight = |origin: &'static str| {
        api.http
            .request(reqwest::Method::OPTIONS, api.url("/v1/accounts"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let allowed = preflight("https://app.example.org").await?;
    assert_eq!(
        allowed.headers().get("access-control-allow-origin").map(|v| v.as_bytes()),
        Some(&b"https://app.example.org"[..])
    );
    let methods = allowed.headers().get("access-control-allow-methods").ok_or("no allow-methods")?.to_str()?.to_owned();
    for method in ["GET", "POST", "OPTIONS", "PUT", "DELETE"] {
        assert!(methods.contains(method), "{methods}");
    }
    assert!(!methods.contains("PATCH"));
    let refused = preflight("https://evil.example.com").await?;
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    api.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_the_router_serves() -> TestResult {
    let api = TestApi::start(Mode::Embedded, generous_limits()).await?;
    let document: Value = api.http.get(api.url("/openapi.json")).send().await?.json().await?;
    assert_eq!(document["openapi"], "3.1.0");
    let mut documented = HashSet::new();
    for (path, item) in document["paths"].as_object().ok_or("no paths")? {
        for method in item.as_object().ok_or("bad path item")?.keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let served: HashSet<(String, String)> =
        privcomm_api::openapi::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, served, "the document and the route table differ");
    // Every listed route is really served: not 404/405 for its method.
    for (method, path) in &served {
        let url = api.url(&path.replace("{user_id}", "00000000-0000-0000-0000-000000000000"));
        let response = api.http.request(method.to_uppercase().parse()?, url).send().await?;
        let status = response.status().as_u16();
        let body = response.text().await?;
        let routing_miss = status == 405 || (status == 404 && !body.contains("not_found"));
        assert!(!routing_miss, "{method} {path} is documented but not served ({status})");
    }
    // And an undocumented path is not.
    assert_eq!(api.http.get(api.url("/v1/nope")).send().await?.status().as_u16(), 404);
    // Every $ref resolves.
    let text = document.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().ok_or("ref")?;
        assert!(document["components"]["schemas"].get(name).is_some(), "dangling $ref {name}");
    }
    api.shutdown().await;
    Ok(())
}

async fn turn_credentials_follow_coturns_scheme_for_the_caller_only(mode: Mode) -> TestResult {
    use support::api::{TURN_SECRET, config};
    let api = TestApi::start(mode, generous_limits()).await?;
    let mut alice = Client::new("+15550000031");
    let alice_id = alice.register(&api, 1, 1).await?;
    let token = alice.login(&api).await?;
    let unauthenticated = api.http.get(api.url("/v1/calls/turn")).send().await?;
    assert_eq!(unauthenticated.status().as_u16(), 401);
    let (status, body) = api.get_auth("/v1/calls/turn", "not-a-token").await?;
    assert_eq!(status, 401, "{body}");

    let (status, body) = api.get_auth("/v1/calls/turn", &token).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["urls"], json!(["turn:127.0.0.1:3478?transport=udp", "stun:127.0.0.1:3478"]));
    assert_eq!(body["ttl"], 12 * 3600);
    let username = body["username"].as_str().ok_or("username")?;
    let (expiry, user) = username.split_once(':').ok_or("username is not expiry:user")?;
    assert_eq!(user, alice_id);
    assert_eq!(expiry.parse::<i64>()?, api.clock.now().unix_seconds() + 12 * 3600);
    assert_eq!(body["credential"], privcomm_api::calls::credential(TURN_SECRET.as_bytes(), username));
    // Not the same credential for another secret (the HMAC is keyed).
    assert_ne!(body["credential"], privcomm_api::calls::credential(b"another secret", username));
    api.shutdown().await;

    // A server without TURN_URLS says so.
    let mut unconfigured = config(generous_limits());
    unconfigured.turn.urls.clear();
    let api = TestApi::start_with(mode, unconfigured).await?;
    let mut bob = Client::new("+15550000032");
    bob.register(&api, 1, 1).await?;
    let token = bob.login(&api).await?;
    let (status, body) = api.get_auth("/v1/calls/turn", &token).await?;
    assert_eq!((status, body["error"].as_str()), (503, Some("not_configured")), "{body}");
    api.shutdown().await;
    Ok(())
}
