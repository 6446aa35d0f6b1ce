//! `scripts/cluster-up` and `scripts/cluster-down` as an operator uses them:
//! one api, two relay and one projector process on loopback, each with only
//! its roles; two users registered through the api exchange messages through
//! the two relays; `cluster-down` leaves no process behind.

mod support;

use privcomm::keygen::KeyedUser;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::ws::WsClient;
use support::{TempDir, TestDatabase, TestResult};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

/// A cluster started by `cluster-up`; stopped by `cluster-down` even when the test fails.
struct Cluster {
    dir: TempDir,
    env: Vec<(&'static str, String)>,
    down: bool,
}

impl Cluster {
    fn command(&self, name: &str) -> Command {
        let mut command = Command::new(script(name));
        for setting in support::node::SETTINGS {
            command.env_remove(setting);
        }
        command.envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        command
    }

    fn run(&self, name: &str) -> Result<String, Error> {
        let output = self.command(name).output()?;
        let (stdout, stderr) = (String::from_utf8(output.stdout)?, String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            return Err(format!("{name} failed ({}):\n{stdout}\n{stderr}", output.status).into());
        }
        Ok(stdout)
    }

    /// `name → url` from `$CLUSTER_DIR/addresses`.
    fn addresses(&self) -> Result<HashMap<String, String>, Error> {
        let text = std::fs::read_to_string(self.dir.path.join("addresses"))?;
        Ok(text.lines().filter_map(|l| l.split_once(' ')).map(|(n, u)| (n.to_owned(), u.to_owned())).collect())
    }

    fn pids(&self) -> Result<Vec<(String, u32)>, Error> {
        let mut pids = Vec::new();
        for entry in std::fs::read_dir(&self.dir.path)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "pid") {
                let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                pids.push((name, std::fs::read_to_string(&path)?.trim().parse()?));
            }
        }
        pids.sort();
        Ok(pids)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.command("cluster-down").output();
        }
    }
}

/// Running, and not a zombie waiting to be reaped.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

async fn get(url: &str) -> Result<(u16, String), Error> {
    let response = reqwest::get(url).await?;
    Ok((response.status().as_u16(), response.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_up_runs_each_role_in_its_own_process_and_cluster_down_leaves_none() -> TestResult {
    let db = TestDatabase::create().await?;
    let stream = format!("PC_TEST_SCRIPTS_{}", uuid::Uuid::now_v7().simple());
    let dir = TempDir::new();
    let env = vec![
        ("DATABASE_URL", db.url.clone()),
        ("NATS_URL", support::nats_url()),
        ("NATS_STREAM", stream.clone()),
        ("CLUSTER_DIR", dir.path.display().to_string()),
        ("CLUSTER_PORT", "0".to_owned()),
        ("PRIVCOMM_BIN", env!("CARGO_BIN_EXE_privcomm").to_owned()),
    ];
    let mut cluster = Cluster { dir, env, down: false };
    let result = exercise(&mut cluster).await;
    if result.is_err() {
        for (name, _) in cluster.pids().unwrap_or_default() {
            let log = std::fs::read_to_string(cluster.dir.path.join(format!("{name}.log"))).unwrap_or_default();
            eprintln!("--- {name}.log (last lines)\n{}", log.lines().rev().take(15).collect::<Vec<_>>().join("\n"));
        }
    }
    drop(cluster);
    if let Ok(client) = async_nats::connect(support::nats_url()).await {
        let _ = async_nats::jetstream::new(client).delete_stream(&stream).await;
    }
    db.drop_database().await;
    result
}

async fn exercise(cluster: &mut Cluster) -> TestResult {
    let printed = cluster.run("cluster-up")?;
    let addresses = cluster.addresses()?;
    for name in ["api-1", "relay-1", "relay-2", "projector-1"] {
        let url =
            addresses.get(name).ok_or_else(|| format!("cluster-up wrote no address for {name}: {addresses:?}"))?;
        assert!(printed.contains(url.as_str()), "cluster-up did not print {name} {url}: {printed}");
    }
    let pids = cluster.pids()?;
    assert_eq!(pids.len(), 4, "{pids:?}");
    assert!(pids.iter().all(|(_, pid)| alive(*pid)));

    // Every process answers /health/ with its node id and its roles.
    let http_base = |name: &str| -> Result<String, Error> {
        let url = addresses.get(name).ok_or("no address")?;
        Ok(url.replace("ws://", "http://").trim_end_matches("/v1/websocket").to_owned())
    };
    for (name, roles) in [("api-1", "api"), ("relay-1", "relay"), ("relay-2", "relay"), ("projector-1", "projector")] {
        let (status, body) = get(&format!("{}/health/", http_base(name)?)).await?;
        assert_eq!(status, 200, "{name}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(body["node"], name, "{body}");
        assert_eq!(body["roles"], serde_json::json!([roles]), "{body}");
        assert_eq!(body["checks"]["database"], "ok");
        assert_eq!(body["checks"]["bus"], "ok");
    }
    // Each serves only its roles.
    let api = http_base("api-1")?;
    assert_eq!(get(&format!("{api}/v1/websocket")).await?.0, 404, "the api process serves the relay");
    let http = reqwest::Client::new();
    let relay_accounts =
        http.post(format!("{}/v1/accounts", http_base("relay-1")?)).json(&serde_json::json!({})).send().await?;
    assert_eq!(relay_accounts.status().as_u16(), 404, "a relay process serves the API");

    // Two users through the api process, one on each relay.
    let (alice, bob) = (KeyedUser::new("+15553000001"), KeyedUser::new("+15553000002"));
    alice.register(&http, &api, 11).await?;
    bob.register(&http, &api, 12).await?;
    let (alice_token, bob_token) = (alice.login(&http, &api).await?, bob.login(&http, &api).await?);
    let mut alice_ws = connected(&addresses["relay-1"], &alice_token).await?;
    let mut bob_ws = connected(&addresses["relay-2"], &bob_token).await?;
    const EACH_WAY: usize = 20;
    for n in 0..EACH_WAY {
        alice_ws.send_message(&message_id(1, n), &bob.user_id(), format!("a→b {n}").as_bytes()).await?;
        bob_ws.send_message(&message_id(2, n), &alice.user_id(), format!("b→a {n}").as_bytes()).await?;
    }
    let (to_bob, to_alice) =
        tokio::try_join!(receive(&mut bob_ws, 1, "a→b", EACH_WAY), receive(&mut alice_ws, 2, "b→a", EACH_WAY))?;
    assert_eq!((to_bob, to_alice), (EACH_WAY, EACH_WAY));

    // The projector process runs the projection workers: its lag figures are on /metrics.
    let projector = http_base("projector-1")?;
    let metrics = wait_for_projection(&projector).await?;
    assert!(metrics.contains("privcomm_projection"), "{metrics}");
    let (_, relay_metrics) = get(&format!("{}/metrics", http_base("relay-1")?)).await?;
    assert!(!relay_metrics.contains("privcomm_projection_lag"), "a relay process reports projection lag");
    assert!(relay_metrics.contains("\nprivcomm_relay_connections 1\n"), "{relay_metrics}");
    let (_, api_metrics) = get(&format!("{api}/metrics")).await?;
    assert!(!api_metrics.contains("privcomm_relay_connections"), "the api process reports relay connections");

    // cluster-down: every process gone.
    let down = cluster.run("cluster-down")?;
    cluster.down = true;
    assert!(down.contains("privcomm cluster down"), "{down}");
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} (pid {pid}) is still running after cluster-down");
    }
    assert!(cluster.pids()?.is_empty(), "pid files left behind");
    assert!(cluster.run("cluster-down")?.contains("no cluster running"));
    Ok(())
}

fn message_id(from: usize, n: usize) -> String {
    format!("0190b6c4-0000-7000-800{from}-{n:012}")
}

async fn connected(url: &str, token: &str) -> Result<WsClient, Error> {
    let mut ws = WsClient::connect(url, Some(token)).await?;
    let first = ws.frame().await?;
    if first["type"] != "queue_empty" {
        return Err(format!("expected queue_empty first, got {first}").into());
    }
    Ok(ws)
}

/// Reads `count` messages (acking each) and as many `sent`s; checks each body and order.
async fn receive(ws: &mut WsClient, from: usize, text: &str, count: usize) -> Result<usize, Error> {
    let (mut received, mut sent) = (0, 0);
    while received < count || sent < count {
        let frame = ws.frame().await?;
        match frame["type"].as_str() {
            Some("sent") => sent += 1,
            Some("message") => {
                let id = frame["id"].as_str().ok_or("no id")?.to_owned();
                assert_eq!(id, message_id(from, received), "out of order");
                let body = base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    frame["body"].as_str().ok_or("no body")?,
                )?;
                assert_eq!(String::from_utf8(body)?, format!("{text} {received}"));
                ws.ack(&id).await?;
                received += 1;
            }
            _ => return Err(format!("unexpected frame {frame}").into()),
        }
    }
    Ok(received)
}

async fn wait_for_projection(base: &str) -> Result<String, Error> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, metrics) = get(&format!("{base}/metrics")).await?;
        if status == 200 && metrics.contains("privcomm_projection") {
            return Ok(metrics);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("no projection figures on the projector's /metrics: {metrics}").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
