//! `privcomm serve` as a user meets it: the binary with no configuration, the
//! binary on PostgreSQL + NATS, production refusing default secrets, and the
//! health check turning 503 when the database goes away.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use support::node::{Server, privcomm, start_server};
use support::{TempDir, TestDatabase, TestResult};

/// Reads the server's log until the "request completed" line of the request
/// with `request_id` (10 s at most). Returns every line read, and that one parsed.
fn completion_line(
    server: &Server,
    request_id: &str,
) -> Result<(Vec<String>, serde_json::Value), Box<dyn std::error::Error + Send + Sync>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    while std::time::Instant::now() < deadline {
        let Ok(line) = server.logs.recv_timeout(Duration::from_millis(200)) else { continue };
        let found = line.contains(request_id) && line.contains("request completed");
        lines.push(line);
        if found {
            let parsed = serde_json::from_str(lines.last().map_or("", String::as_str))?;
            return Ok((lines, parsed));
        }
    }
    Err(format!("no completion line for request {request_id}: {lines:#?}").into())
}

async fn health(address: SocketAddr) -> Result<(u16, serde_json::Value), reqwest::Error> {
    let response = reqwest::get(format!("http://{address}/health/")).await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

#[cfg(unix)]
fn terminate(server: &mut Server) -> Result<std::process::ExitStatus, Box<dyn std::error::Error + Send + Sync>> {
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status()?;
    assert!(status.success());
    for _ in 0..100 {
        if let Some(exit) = server.child.try_wait()? {
            return Ok(exit);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("server did not stop within 10 s of SIGTERM".into())
}

#[tokio::test]
async fn with_no_configuration_it_serves_on_a_new_sqlite_file() -> TestResult {
    let dir = TempDir::new();
    let mut server = start_server(privcomm(&dir))?;
    let (status, body) = health(server.address).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["checks"]["database"], "ok");
    assert!(dir.path.join("data/privcomm.db").exists(), "the SQLite file was not created under ./data/");
    let started = server.logs.try_iter().collect::<Vec<_>>();
    assert!(started.iter().all(|l| !l.contains(privcomm::config::DEVELOPMENT_SECRET_KEY)), "secret in logs");
    #[cfg(unix)]
    assert!(terminate(&mut server)?.success(), "a SIGTERM'd server must exit cleanly");

    // A restart finds its data and migrations in place.
    let server = start_server(privcomm(&dir))?;
    assert_eq!(health(server.address).await?.0, 200);

    // A second process on the same file is refused, and says why.
    let output = privcomm(&dir).args(["serve", "--listen", "127.0.0.1:0"]).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("another privcomm process"), "{stderr}");
    assert_eq!(health(server.address).await?.0, 200, "the first server must be unaffected");
    Ok(())
}

#[tokio::test]
async fn with_postgres_and_nats_it_serves_against_them() -> TestResult {
    let dir = TempDir::new();
    let db = TestDatabase::create().await?;
    let stream = format!("PC_TEST_SERVE_{}", uuid::Uuid::now_v7().simple());
    let cluster = |command: &mut Command| {
        command.env("DATABASE_URL", &db.url).env("NATS_URL", support::nats_url()).env("NATS_STREAM", &stream);
    };

    // Not migrated yet: refused, with the way out in the message.
    let mut refused = privcomm(&dir);
    cluster(&mut refused);
    let output = refused.args(["serve", "--listen", "127.0.0.1:0"]).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("privcomm migrate"), "unhelpful refusal: {stderr}");

    let mut migrate = privcomm(&dir);
    cluster(&mut migrate);
    let output = migrate.arg("migrate").output()?;
    assert!(output.status.success(), "migrate failed: {}", String::from_utf8_lossy(&output.stderr));

    let mut serve = privcomm(&dir);
    cluster(&mut serve);
    let server = start_server(serve)?;
    let (status, body) = health(server.address).await?;
    assert_eq!((status, &body["checks"]["bus"]), (200, &serde_json::json!("ok")), "{body}");
    assert!(!dir.path.join("data").exists(), "cluster mode must not create a SQLite file");

    drop(server);
    let bus = async_nats::jetstream::new(async_nats::connect(support::nats_url()).await?);
    bus.delete_stream(&stream).await?; // exists: the server created it
    db.drop_database().await;
    Ok(())
}

#[test]
fn production_refuses_the_default_secret_and_names_the_variable() -> TestResult {
    let dir = TempDir::new();
    let output = privcomm(&dir).env("ENVIRONMENT", "production").arg("serve").output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("SECRET_KEY"), "the message must name SECRET_KEY: {stderr}");
    assert!(!dir.path.join("data").exists(), "a refused start must not create anything");

    let output =
        privcomm(&dir).env("ENVIRONMENT", "production").env("SECRET_KEY", "too-short").arg("serve").output()?;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("SECRET_KEY is 9 bytes"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_503_when_the_database_goes_away() -> TestResult {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        config: privcomm::config::ServeConfig,
    }
    let db = TestDatabase::migrated().await?;
    let config = Cli::try_parse_from(["privcomm", "--database-url", &db.url, "--db-pool-min-size", "0"])?.config;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(privcomm::serve::run(config, listener, async move {
        let _ = stopped.await;
    }));

    let (status, _) = health(address).await?;
    assert_eq!(status, 200);
    let name = db.name.clone();
    db.drop_database().await; // terminates the server's connections too
    let (status, body) = health(address).await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["checks"]["database"], "unavailable");
    assert!(!body.to_string().contains(&name), "internals must not be echoed: {body}");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server).await???;
    Ok(())
}

#[tokio::test]
async fn a_client_request_id_is_echoed_and_logged_and_secrets_are_not() -> TestResult {
    let dir = TempDir::new();
    let server = start_server(privcomm(&dir))?;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{}/v1/auth/challenge", server.address))
        .header("x-request-id", "req-7f3a-test")
        .json(&serde_json::json!({ "user_id": "0190b6c4-52d4-7c3e-9d3c-1a2b3c4d5e6f" }))
        .send()
        .await?;
    assert_eq!(response.headers().get("x-request-id").map(|v| v.as_bytes()), Some(&b"req-7f3a-test"[..]));
    let body: serde_json::Value = response.json().await?;
    let nonce = body["nonce"].as_str().ok_or("no nonce")?.to_owned();

    // Without one, the server makes one up and returns it.
    let response = client.get(format!("http://{}/health/", server.address)).send().await?;
    let generated = response.headers().get("x-request-id").ok_or("no generated request id")?.to_str()?.to_owned();
    assert_eq!(generated.len(), 36, "expected a UUID, got {generated}");

    let (lines, parsed) = completion_line(&server, "req-7f3a-test")?;
    assert_eq!(parsed["span"]["request_id"], "req-7f3a-test", "{parsed}");
    assert_eq!(parsed["status"], 200);
    assert!(lines.iter().all(|l| !l.contains(&nonce)), "a nonce reached the logs");
    Ok(())
}

#[tokio::test]
async fn an_authenticated_request_logs_its_user_id() -> TestResult {
    let dir = TempDir::new();
    let server = start_server(privcomm(&dir))?;
    let base = format!("http://{}", server.address);
    let http = reqwest::Client::new();
    let user = privcomm::keygen::KeyedUser::new("+15557654321");
    user.register(&http, &base, 7).await?;
    let user_id = user.user_id();
    let token = user.login(&http, &base).await?;
    let response = http
        .get(format!("{base}/v1/keys/count"))
        .bearer_auth(&token)
        .header("x-request-id", "req-user-log")
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);

    let (lines, parsed) = completion_line(&server, "req-user-log")?;
    let line = parsed.to_string();
    assert_eq!(parsed["span"]["user_id"].as_str(), Some(user_id.as_str()), "{line}");
    assert!(lines.iter().all(|l| !l.contains(&token)), "a token reached the logs");
    Ok(())
}

/// `GET /v1/keys/count` with `token`: its status.
async fn authenticated_status(base: &str, token: &str) -> Result<u16, reqwest::Error> {
    let response = reqwest::Client::new().get(format!("{base}/v1/keys/count")).bearer_auth(token).send().await?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn after_a_secret_key_rotation_tokens_of_the_previous_key_still_work_and_foreign_ones_do_not() -> TestResult {
    const OLD: &str = "the-secret-before-the-rotation-0123456789";
    const NEW: &str = "the-secret-after-the-rotation-01234567890";
    let dir = TempDir::new();
    let (http, user) = (reqwest::Client::new(), privcomm::keygen::KeyedUser::new("+15557650001"));
    let old_token = {
        let server = start_server({
            let mut command = privcomm(&dir);
            command.env("SECRET_KEY", OLD);
            command
        })?;
        let base = format!("http://{}", server.address);
        user.register(&http, &base, 9).await?;
        user.login(&http, &base).await?
    };
    // Restarted with the new secret, and the old one as SECRET_KEY_PREVIOUS.
    let server = start_server({
        let mut command = privcomm(&dir);
        command.env("SECRET_KEY", NEW).env("SECRET_KEY_PREVIOUS", OLD);
        command
    })?;
    let base = format!("http://{}", server.address);
    assert_eq!(authenticated_status(&base, &old_token).await?, 200, "a token of the previous key was refused");
    let mut ws =
        support::ws::WsClient::connect(&format!("ws://{}/v1/websocket", server.address), Some(&old_token)).await?;
    assert_eq!(ws.frame().await?["type"], "queue_empty", "the relay refused a token of the previous key");
    // A token signed with neither key.
    let user_id = privcomm_domain::UserId(uuid::Uuid::parse_str(&user.user_id())?);
    let now = privcomm_domain::Timestamp(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as i64,
    );
    let foreign = privcomm_api::tokens::Tokens::new(b"a-secret-this-server-never-had-0123456789", Default::default())
        .issue(user_id, now)?;
    assert_eq!(authenticated_status(&base, &foreign).await?, 401);
    assert!(relay_refuses(&server, &foreign).await?, "the relay accepted a foreign token");
    // New tokens carry the new key only.
    let new_token = user.login(&http, &base).await?;
    assert_eq!(authenticated_status(&base, &new_token).await?, 200);
    let old_only = privcomm_api::tokens::Tokens::new(OLD.as_bytes(), Default::default());
    assert!(old_only.verify(&new_token, now).is_err(), "a new token was signed with the previous key");
    drop(server);
    // Without SECRET_KEY_PREVIOUS the old token is refused: the setting is what kept it working.
    let server = start_server({
        let mut command = privcomm(&dir);
        command.env("SECRET_KEY", NEW);
        command
    })?;
    assert_eq!(authenticated_status(&format!("http://{}", server.address), &old_token).await?, 401);
    Ok(())
}

/// The relay closes a connection made with `token` with 1008 (docs/PROTOCOL.md).
async fn relay_refuses(server: &Server, token: &str) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let mut ws = support::ws::WsClient::connect(&format!("ws://{}/v1/websocket", server.address), Some(token)).await?;
    Ok(ws.next(Duration::from_secs(5)).await? == support::ws::Received::Closed(1008))
}
