//! TURN credentials from `GET /v1/calls/turn` against a real coturn
//! (`use-auth-secret` with the API's secret, on loopback): issued credentials
//! allocate a relay and carry packets; forged and expired ones are refused.

#[macro_use]
mod support;

use privcomm_domain::Clock as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::TestResult;
use support::api::{Client, Mode, TURN_SECRET, TestApi, generous_limits};

/// A coturn process on loopback, killed on drop.
struct Coturn {
    child: Child,
    port: u16,
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn missing_coturn() -> String {
    "coturn is not installed (turnserver and turnutils_uclient); `scripts/test` installs it, or run `apt-get install coturn`"
        .into()
}

/// A port free for both UDP and TCP on loopback (coturn listens on both).
fn free_port() -> Result<u16, String> {
    for _ in 0..50 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = udp.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no port free for both UDP and TCP".into())
}

impl Coturn {
    fn start(secret: &str) -> Result<Coturn, String> {
        let port = free_port()?;
        // Relay ports: a window of 100 near the listening port's, for parallel runs.
        let min = 20_000 + (port % 400) * 100;
        let child = Command::new("turnserver")
            .args(["-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", "--no-tls", "--no-dtls", "--no-cli"])
            .args(["--use-auth-secret", "--realm=privcomm.test", "--allow-loopback-peers", "--log-file=stdout"])
            .arg(format!("--listening-port={port}"))
            .arg(format!("--static-auth-secret={secret}"))
            .arg(format!("--min-port={min}"))
            .arg(format!("--max-port={}", min + 99))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| if e.kind() == std::io::ErrorKind::NotFound { missing_coturn() } else { e.to_string() })?;
        Ok(Coturn { child, port })
    }

    /// Allocates a relay with `username`/`credential` and sends packets through it
    /// (`turnutils_uclient`); true if every packet came back.
    fn relays(&self, username: &str, credential: &str) -> Result<bool, String> {
        let output = Command::new("turnutils_uclient")
            .args(["-y", "-n", "3", "-m", "1", "-l", "100", "-u", username, "-w", credential])
            .args(["-p", &self.port.to_string(), "127.0.0.1"])
            .output()
            .map_err(|e| if e.kind() == std::io::ErrorKind::NotFound { missing_coturn() } else { e.to_string() })?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        Ok(output.status.success() && text.contains("Total lost packets 0") && !text.contains("ERROR"))
    }
}

#[tokio::test]
async fn issued_turn_credentials_allocate_a_relay_and_forged_or_expired_ones_do_not() -> TestResult {
    let coturn = Coturn::start(TURN_SECRET)?;
    let api = TestApi::start(Mode::Embedded, generous_limits()).await?;
    let mut alice = Client::new("+15550000041");
    alice.register(&api, 1, 1).await?;
    let credentials = |body: &serde_json::Value| -> Result<(String, String), String> {
        let field = |name: &str| body[name].as_str().map(str::to_owned).ok_or(format!("no {name} in {body}"));
        Ok((field("username")?, field("credential")?))
    };

    // Issued 13 hours ago (the TTL is 12 hours): expired now.
    let thirteen_hours = 13 * 3600 * 1_000_000;
    api.clock.advance(-thirteen_hours);
    let token = alice.login(&api).await?;
    let (status, body) = api.get_auth("/v1/calls/turn", &token).await?;
    assert_eq!(status, 200, "{body}");
    let (old_username, old_credential) = credentials(&body)?;
    api.clock.advance(thirteen_hours);

    let token = alice.login(&api).await?;
    let (status, body) = api.get_auth("/v1/calls/turn", &token).await?;
    assert_eq!(status, 200, "{body}");
    let (username, credential) = credentials(&body)?;

    // Issued now: coturn allocates a relay and packets go through (it may
    // take a moment to listen).
    let mut allocated = false;
    for _ in 0..50 {
        if coturn.relays(&username, &credential)? {
            allocated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(allocated, "coturn did not allocate a relay with credentials the API issued");

    // Forged: the username under another secret, or the credential with another expiry.
    let forged = privcomm_api::calls::credential(b"not the secret", &username);
    assert!(!coturn.relays(&username, &forged)?, "a forged credential was accepted");
    let (expiry, user) = username.split_once(':').ok_or("username")?;
    let later = format!("{}:{user}", expiry.parse::<i64>()? + 3600);
    assert!(!coturn.relays(&later, &credential)?, "a credential was accepted for another username");

    // Expired, though genuine.
    let old_expiry: i64 = old_username.split_once(':').ok_or("username")?.0.parse()?;
    assert!(old_expiry < api.clock.now().unix_seconds(), "{old_username} has not expired");
    assert_eq!(old_credential, privcomm_api::calls::credential(TURN_SECRET.as_bytes(), &old_username));
    assert!(!coturn.relays(&old_username, &old_credential)?, "an expired credential was accepted");
    // The fresh one still works.
    assert!(coturn.relays(&username, &credential)?);
    api.shutdown().await;
    Ok(())
}
