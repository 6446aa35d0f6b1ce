//! A real coturn on loopback for the TURN tests (`use-auth-secret`, the
//! secret the API signs credentials with).

use std::process::{Child, Command, Stdio};

/// A coturn process on loopback, killed on drop.
pub struct Coturn {
    child: Child,
    pub port: u16,
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
    pub fn start(secret: &str) -> Result<Coturn, String> {
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

    /// The URL the API hands out for it.
    pub fn url(&self) -> String {
        format!("turn:127.0.0.1:{}?transport=udp", self.port)
    }

    /// Whether it answers (it takes a moment to listen after starting).
    pub async fn ready(&self, username: &str, credential: &str) -> Result<(), String> {
        for _ in 0..50 {
            if self.relays(username, credential)? {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err("coturn did not allocate a relay within 5 s".into())
    }

    /// Stops it (as a relay that goes away mid-call).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Allocates a relay with `username`/`credential` and sends packets through it
    /// (`turnutils_uclient`); true if every packet came back.
    pub fn relays(&self, username: &str, credential: &str) -> Result<bool, String> {
        let output = Command::new("turnutils_uclient")
            .args(["-y", "-n", "3", "-m", "1", "-l", "100", "-u", username, "-w", credential])
            .args(["-p", &self.port.to_string(), "127.0.0.1"])
            .output()
            .map_err(|e| if e.kind() == std::io::ErrorKind::NotFound { missing_coturn() } else { e.to_string() })?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
        Ok(output.status.success() && text.contains("Total lost packets 0") && !text.contains("ERROR"))
    }
}
