//! `privcomm` processes for tests: started on port 0 with no inherited
//! settings, their JSON logs read from stderr.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Every setting of `privcomm serve` (docs/OPERATING.md), and the log filter.
pub const SETTINGS: &[&str] = &[
    "ROLES",
    "NODE_ID",
    "LISTEN_ADDR",
    "DATABASE_URL",
    "NATS_URL",
    "NATS_STREAM",
    "SECRET_KEY",
    "SECRET_KEY_PREVIOUS",
    "ENVIRONMENT",
    "DB_POOL_MIN_SIZE",
    "DB_POOL_MAX_SIZE",
    "AUTO_MIGRATE",
    "LOG_FORMAT",
    "CORS_ORIGINS",
    "RATE_LIMIT_REGISTRATION",
    "RATE_LIMIT_KEY_BUNDLE",
    "RATE_LIMIT_TOKEN",
    "USER_CACHE_SIZE",
    "RETENTION_EXPIRE_AT",
    "RETENTION_COMPACT_AT",
    "CIPHERTEXT_GRACE",
    "CHECKPOINT_SIGNING_KEY",
    "CHECKPOINT_EVERY_EVENTS",
    "CHECKPOINT_INTERVAL",
    "RUST_LOG",
];

/// The `privcomm` binary in `dir` with none of its settings inherited.
pub fn privcomm(dir: &super::TempDir) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_privcomm"));
    command.current_dir(&dir.path);
    for setting in SETTINGS {
        command.env_remove(setting);
    }
    command
}

/// A running server; killed if the test ends early.
pub struct Server {
    pub child: Child,
    pub address: SocketAddr,
    /// Log lines after the start-up line.
    pub logs: mpsc::Receiver<String>,
    /// Log lines before it.
    pub early: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shown only when the test fails (cargo captures a passing test's output).
        for line in self.logs.try_iter() {
            if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                eprintln!("server {}: {line}", self.address);
            }
        }
    }
}

/// Starts `command serve --listen 127.0.0.1:0` and reads the bound address
/// from its JSON start-up log line.
pub fn start_server(command: Command) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
    start_server_at(command, "127.0.0.1:0")
}

/// [`start_server`] on `listen` (a restart on the address of a stopped server).
pub fn start_server_at(mut command: Command, listen: &str) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
    let mut child = command.args(["serve", "--listen", listen]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (lines_tx, logs) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        let line =
            logs.recv_timeout(Duration::from_secs(60)).map_err(|_| format!("no start-up line; logs: {seen:?}"))?;
        let parsed: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("log line is not JSON ({e}): {line}"))?;
        for field in ["timestamp", "level", "target"] {
            if parsed.get(field).is_none() {
                return Err(format!("log line lacks {field}: {line}").into());
            }
        }
        if parsed["message"] == "privcomm serving" {
            let address = parsed["address"].as_str().ok_or("no address field")?.parse()?;
            return Ok(Server { child, address, logs, early: seen });
        }
        seen.push(line);
    }
}
