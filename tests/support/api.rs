//! A real API server on port 0 over a real store, and clients that hold real
//! libsignal keys.
#![allow(dead_code)]

use libsignal_protocol::IdentityKeyPair;
use privcomm::bus::inprocess::InProcessPush;
use privcomm::bus::nats::NatsPush;
use privcomm::eventstore::LogStore;
use privcomm::keygen::KeyedUser;
use privcomm::serve::Links;
use privcomm_api::ApiConfig;
use privcomm_api::limits::{RateLimit, RateLimits};
use privcomm_domain::Timestamp;
use privcomm_domain::clock::ManualClock;
use privcomm_projections::store::ReadDb;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub const SECRET: &str = "test-secret-key-that-is-long-enough-0123456789";

/// Where a test API keeps its events.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// SQLite + in-process bus.
    Embedded,
    /// PostgreSQL + NATS JetStream.
    Cluster,
}

/// Limits high enough that only tests about limits meet them.
pub fn generous_limits() -> RateLimits {
    let many = RateLimit { requests: 100_000, per: Duration::from_secs(1) };
    RateLimits { registration: many, key_bundle: many, token_issue: many, turn: many }
}

/// The TURN secret of [`config`] (coturn's `static-auth-secret` in the TURN tests).
pub const TURN_SECRET: &str = "turn-test-secret-0123456789abcdef";

pub fn config(limits: RateLimits) -> ApiConfig {
    ApiConfig {
        secret_key: SECRET.as_bytes().to_vec(),
        previous_secret_key: None,
        tokens: Default::default(),
        rate_limits: limits,
        cors_origins: vec!["https://app.example.org".into()],
        user_cache_capacity: 1_000,
        node: Default::default(),
        turn: privcomm_api::calls::TurnConfig {
            urls: vec!["turn:127.0.0.1:3478?transport=udp".into(), "stun:127.0.0.1:3478".into()],
            secret: TURN_SECRET.as_bytes().to_vec(),
            ttl: Duration::from_secs(12 * 3600),
        },
    }
}

/// A running API with its store and clock.
pub struct TestApi {
    pub base: String,
    /// The event store's database (`sqlite:…` or `postgres://…`).
    pub database_url: String,
    pub store: Arc<dyn LogStore>,
    /// Committed events (the in-process bus, or JetStream fed by an outbox publisher).
    pub bus: Arc<dyn privcomm_domain::EventBus>,
    /// The projection workers' feed.
    pub feed: Arc<dyn privcomm_projections::worker::Feed>,
    /// Where read models live (as `privcomm serve` chooses it).
    pub read_db: privcomm_projections::store::ReadDb,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stop_connections: tokio::sync::watch::Sender<bool>,
    push: PushFeed,
    cleanup: Cleanup,
}

enum PushFeed {
    InProcess(Arc<InProcessPush>),
    /// The wildcard subject of every platform.
    Nats(String),
}

enum Cleanup {
    Dir(super::TempDir),
    Cluster(Option<super::TestDatabase>, Arc<privcomm::bus::nats::NatsBus>),
}

impl TestApi {
    pub async fn start(mode: Mode, limits: RateLimits) -> Result<TestApi, String> {
        TestApi::start_with(mode, config(limits)).await
    }

    /// [`TestApi::start`] with a whole configuration.
    pub async fn start_with(mode: Mode, config: ApiConfig) -> Result<TestApi, String> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?;
        let clock = Arc::new(ManualClock::new(Timestamp(now.as_micros() as i64)));
        type Opened = (Arc<dyn LogStore>, Links, PushFeed, Cleanup, String, ReadDb);
        let (store, links, push, cleanup, database_url, read_db): Opened = match mode {
            Mode::Embedded => {
                let (store, dir) = super::sqlite_store(clock.clone()).await?;
                let url = format!("sqlite:{}", dir.path.join("events.db").display());
                let read_db = ReadDb::Sqlite(store.writer().clone());
                let store: Arc<dyn LogStore> = Arc::new(store);
                let push = Arc::new(InProcessPush::default());
                let links = Links::embedded(store.clone(), push.clone()).await.map_err(|e| e.to_string())?;
                (store, links, PushFeed::InProcess(push), Cleanup::Dir(dir), url, read_db)
            }
            Mode::Cluster => {
                let (store, db) = super::postgres_store(clock.clone()).await?;
                let bus = Arc::new(super::nats_bus().await?);
                let subjects = NatsPush::new(&bus).subject("*");
                let url = db.url.clone();
                let read_db = privcomm::projector::open_read_db(&url).await.map_err(|e| format!("{e:#}"))?;
                let links = Links::nats(bus.clone());
                (Arc::new(store), links, PushFeed::Nats(subjects), Cleanup::Cluster(Some(db), bus), url, read_db)
            }
        };
        let (bus, feed) = (links.bus.clone(), links.feed.clone());
        let (stop_connections, connections_stop) = tokio::sync::watch::channel(false);
        let app = privcomm::serve::build_app(
            store.clone(),
            links,
            clock.clone(),
            &config,
            // No coalescing, so that each push decision shows (coalescing has unit tests).
            privcomm_relay::RelaySettings { push_coalesce: Duration::ZERO, ..Default::default() },
            connections_stop,
            &[],
            &privcomm::config::Role::ALL,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let address = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(TestApi {
            base: format!("http://{address}"),
            database_url,
            store,
            bus,
            feed,
            read_db,
            clock,
            http: reqwest::Client::new(),
            stop: Some(stop),
            stop_connections,
            push,
            cleanup,
        })
    }

    /// Starts the projection workers and the outbox publisher that feeds
    /// their bus, on this API's clock.
    pub async fn start_projector(&self) -> Result<Projection, String> {
        let db = self.read_db.clone();
        let setup = privcomm::projector::ProjectorSetup::new(
            db.clone(),
            self.feed.clone(),
            self.store.clone(),
            self.clock.clone(),
        );
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut tasks = vec![tokio::spawn(setup.clone().run(stopped.clone()))];
        // The bus carries only what the outbox publisher has published (in-process: marked).
        let publisher = privcomm::outbox::OutboxPublisher::new(self.store.clone(), self.bus.clone());
        let mut publisher_stopped = stopped.clone();
        tasks.push(tokio::spawn(publisher.run(async move {
            let _ = publisher_stopped.wait_for(|s| *s).await;
        })));
        Ok(Projection { db, setup, stop, tasks })
    }

    /// Push requests published from now on, as JSON.
    pub async fn push_requests(&self) -> Result<futures::stream::BoxStream<'static, Value>, String> {
        use futures::StreamExt as _;
        match &self.push {
            PushFeed::InProcess(push) => {
                let feed = push.subscribe();
                Ok(futures::stream::unfold(feed, |mut feed| async move {
                    let request = feed.recv().await.ok()?;
                    Some((serde_json::to_value(&request).ok()?, feed))
                })
                .boxed())
            }
            PushFeed::Nats(subjects) => {
                let client = async_nats::connect(super::nats_url()).await.map_err(|e| e.to_string())?;
                let subscriber = client.subscribe(subjects.clone()).await.map_err(|e| e.to_string())?;
                client.flush().await.map_err(|e| e.to_string())?;
                Ok(subscriber
                    .filter_map(|message| async move { serde_json::from_slice::<Value>(&message.payload).ok() })
                    .boxed())
            }
        }
    }

    /// What a node does first when shutting down: relay connections close with 1001.
    pub fn close_connections(&self) {
        let _ = self.stop_connections.send(true);
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop_connections.send(true);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Cleanup::Cluster(db, bus) = &mut self.cleanup {
            let _ = bus.delete_stream().await;
            if let Some(db) = db.take() {
                db.drop_database().await;
            }
        }
    }

    /// The WebSocket URL of the relay.
    pub fn ws_url(&self, query: &str) -> String {
        format!("{}/v1/websocket{query}", self.base.replacen("http://", "ws://", 1))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), reqwest::Error> {
        let response = self.http.post(self.url(path)).json(body).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    pub async fn get_auth(&self, path: &str, token: &str) -> Result<(u16, Value), reqwest::Error> {
        let response = self.http.get(self.url(path)).bearer_auth(token).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    pub async fn put_auth(&self, path: &str, token: &str, body: &Value) -> Result<(u16, Value), reqwest::Error> {
        let response = self.http.put(self.url(path)).bearer_auth(token).json(body).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }
}

/// A would-be user with real libsignal keys (see `privcomm::keygen`).
pub struct Client {
    pub keys: KeyedUser,
    pub identity: IdentityKeyPair,
    pub registration_id: u32,
    pub user_id: Option<String>,
}

pub fn b64(bytes: &[u8]) -> String {
    privcomm::keygen::b64(bytes)
}

impl Client {
    pub fn new(phone: &str) -> Client {
        let keys = KeyedUser::new(phone);
        Client { identity: keys.identity, keys, registration_id: 4242, user_id: None }
    }

    pub fn sign(&self, message: &[u8]) -> String {
        self.keys.sign(message)
    }

    pub fn signed_prekey(&self, id: u32) -> Value {
        self.keys.signed_prekey(id)
    }

    pub fn kyber_prekey(&self, id: u32) -> Value {
        self.keys.kyber_prekey(id)
    }

    pub fn one_time_prekey(id: u32) -> Value {
        KeyedUser::one_time_prekey(id)
    }

    /// A complete, valid registration body.
    pub fn registration(&self, one_time: u32, kyber: u32) -> Value {
        self.keys.registration(self.registration_id, one_time, kyber)
    }

    pub async fn register(&mut self, api: &TestApi, one_time: u32, kyber: u32) -> Result<String, String> {
        let (status, body) =
            api.post("/v1/accounts", &self.registration(one_time, kyber)).await.map_err(|e| e.to_string())?;
        if status != 201 {
            return Err(format!("registration answered {status}: {body}"));
        }
        let user_id = body["user_id"].as_str().ok_or("no user_id")?.to_owned();
        self.user_id = Some(user_id.clone());
        Ok(user_id)
    }

    pub async fn login(&self, api: &TestApi) -> Result<String, String> {
        let user_id = self.user_id.clone().ok_or("not registered")?;
        let (status, body) =
            api.post("/v1/auth/challenge", &json!({ "user_id": user_id })).await.map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("challenge answered {status}: {body}"));
        }
        let nonce = body["nonce"].as_str().ok_or("no nonce")?.to_owned();
        let (status, body) = api
            .post(
                "/v1/auth/token",
                &json!({ "user_id": user_id, "nonce": nonce, "signature": self.sign(nonce.as_bytes()) }),
            )
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("token answered {status}: {body}"));
        }
        Ok(body["token"].as_str().ok_or("no token")?.to_owned())
    }
}

/// Running projection workers.
pub struct Projection {
    pub db: privcomm_projections::store::ReadDb,
    pub setup: privcomm::projector::ProjectorSetup,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Projection {
    /// Waits until every read model has applied the whole log.
    pub async fn caught_up(
        &self,
        store: &dyn privcomm_domain::EventStore,
    ) -> Result<privcomm_domain::Position, String> {
        let head = store.head().await.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut behind = Vec::new();
            for model in privcomm_projections::models::all() {
                let at = self.setup.read_store.checkpoint(model.as_ref()).await.map_err(|e| e.to_string())?;
                if at < head {
                    behind.push(format!("{} at {at}", model.name()));
                }
            }
            if behind.is_empty() {
                return Ok(head);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("read models did not reach position {head} within 60 s: {}", behind.join(", ")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the workers and waits for them.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
