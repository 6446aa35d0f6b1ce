//! Clients against a real `privcomm serve` process, for the client and
//! call tests: [`TestServer`] (a server that can be stopped and restarted
//! on the same address and data), [`TestClient`] (a `Client` whose listener
//! records [`Event`]s) and helpers.

use super::api::Mode;
use super::node::{Server, privcomm, start_server_at};
use super::{TempDir, TestDatabase};
use privcomm_client::{ChatMessage, Client, ClientConfig, ClientError, ClientListener, ConnectionState, Pause};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A `privcomm serve` process that can be stopped and started again on the same address and data.
pub struct TestServer {
    pub mode: Mode,
    pub dir: TempDir,
    pub db: Option<TestDatabase>,
    pub stream: String,
    pub process: Option<Server>,
    pub address: SocketAddr,
    /// More settings of the server (name, value).
    pub env: Vec<(String, String)>,
}

impl TestServer {
    pub async fn start(mode: Mode) -> Result<TestServer, Error> {
        TestServer::start_with(mode, &[]).await
    }

    /// A server with more settings (`env`: name, value).
    pub async fn start_with(mode: Mode, env: &[(&str, &str)]) -> Result<TestServer, Error> {
        let db = match mode {
            Mode::Embedded => None,
            Mode::Cluster => Some(TestDatabase::migrated().await?),
        };
        let stream = format!("PC_TEST_CLIENT_{}", uuid::Uuid::now_v7().simple());
        let env = env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
        let address = "127.0.0.1:0".parse()?;
        let mut server = TestServer { mode, dir: TempDir::new(), db, stream, process: None, address, env };
        server.run("127.0.0.1:0")?;
        Ok(server)
    }

    pub fn run(&mut self, listen: &str) -> Result<(), Error> {
        let mut command: Command = privcomm(&self.dir);
        command
            .env("SECRET_KEY", "client-test-secret-key-0123456789abcdef")
            .env("RATE_LIMIT_REGISTRATION", "100000/1s")
            .env("RATE_LIMIT_TOKEN", "100000/1s")
            .env("RATE_LIMIT_KEY_BUNDLE", "100000/1s")
            .envs(self.env.iter().map(|(name, value)| (name, value)));
        if let (Mode::Cluster, Some(db)) = (self.mode, &self.db) {
            command.env("DATABASE_URL", &db.url).env("NATS_URL", super::nats_url()).env("NATS_STREAM", &self.stream);
        }
        let process = start_server_at(command, listen)?;
        self.address = process.address;
        self.process = Some(process);
        Ok(())
    }

    pub fn stop(&mut self) {
        self.process.take(); // killed on drop
    }

    pub fn restart(&mut self) -> Result<(), Error> {
        let listen = self.address.to_string();
        self.run(&listen)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn database_url(&self) -> String {
        match &self.db {
            Some(db) => db.url.clone(),
            None => format!("sqlite:{}", self.dir.path.join("data/privcomm.db").display()),
        }
    }

    /// How many stored events hold `needle` in their payload; for SQLite also
    /// whether the database files hold it anywhere.
    pub async fn holds(&self, needle: &[u8]) -> Result<bool, Error> {
        let url = self.database_url();
        let db = privcomm::projector::open_read_db(&url).await?;
        let sql = match db {
            privcomm_projections::store::ReadDb::Postgres(_) => {
                "SELECT count(*) FROM events WHERE position($1::bytea IN payload) > 0"
            }
            privcomm_projections::store::ReadDb::Sqlite(_) => {
                "SELECT count(*) FROM events WHERE instr(payload, $1) > 0"
            }
        };
        let count: i64 =
            privcomm_projections::on_db!(&db, pool => sqlx::query_scalar(sql).bind(needle).fetch_one(pool).await?);
        let mut found = count > 0;
        if matches!(self.mode, Mode::Embedded) {
            for suffix in ["", "-wal"] {
                let bytes = std::fs::read(format!("{}{suffix}", url.trim_start_matches("sqlite:"))).unwrap_or_default();
                found |= bytes.windows(needle.len()).any(|w| w == needle);
            }
        }
        Ok(found)
    }

    /// Whether any message in the server's NATS stream holds `needle`
    /// (cluster mode; embedded mode has no stream: `false`).
    pub async fn stream_holds(&self, needle: &[u8]) -> Result<bool, Error> {
        if !matches!(self.mode, Mode::Cluster) {
            return Ok(false);
        }
        let jetstream = async_nats::jetstream::new(async_nats::connect(super::nats_url()).await?);
        let stream = jetstream.get_stream(&self.stream).await?;
        let state = stream.get_info().await?.state;
        for sequence in state.first_sequence..=state.last_sequence {
            let message = stream.get_raw_message(sequence).await?;
            if message.payload.windows(needle.len()).any(|w| w == needle) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Events stored so far.
    pub async fn events(&self) -> Result<i64, Error> {
        let db = privcomm::projector::open_read_db(&self.database_url()).await?;
        Ok(
            privcomm_projections::on_db!(&db, pool => sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?),
        )
    }

    pub async fn cleanup(mut self) {
        self.stop();
        if let Ok(client) = async_nats::connect(super::nats_url()).await {
            let _ = async_nats::jetstream::new(client).delete_stream(&self.stream).await;
        }
        if let Some(db) = self.db.take() {
            db.drop_database().await;
        }
    }
}

/// What a listener heard.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    State(ConnectionState, String),
    Message(ChatMessage),
    Sent(String),
    SendFailed(String, String),
    IdentityChanged(String, String),
    Undecryptable(String, String),
}

pub struct Recorder(pub mpsc::UnboundedSender<Event>);

impl ClientListener for Recorder {
    fn on_state_changed(&self, state: ConnectionState, detail: String) {
        let _ = self.0.send(Event::State(state, detail));
    }
    fn on_message(&self, message: ChatMessage) {
        let _ = self.0.send(Event::Message(message));
    }
    fn on_sent(&self, message_id: String) {
        let _ = self.0.send(Event::Sent(message_id));
    }
    fn on_send_failed(&self, message_id: String, reason: String) {
        let _ = self.0.send(Event::SendFailed(message_id, reason));
    }
    fn on_identity_changed(&self, contact: String, safety_number: String) {
        let _ = self.0.send(Event::IdentityChanged(contact, safety_number));
    }
    fn on_undecryptable(&self, from: String, reason: String) {
        let _ = self.0.send(Event::Undecryptable(from, reason));
    }
}

/// Records each wait instead of waiting.
#[derive(Default)]
pub struct RecordedPauses(pub Mutex<Vec<(u32, Duration)>>);

impl Pause for RecordedPauses {
    fn pause(&self, failures: u32, delay: Duration) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        self.0.lock().expect("pauses").push((failures, delay));
        Box::pin(async {})
    }
}

/// A client with its store in `dir`, its events, and its blocking calls run off the runtime.
pub struct TestClient {
    pub client: Arc<Client>,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub config: ClientConfig,
}

pub fn store_key(seed: u8) -> Vec<u8> {
    vec![seed; 32]
}

pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.expect("blocking call panicked")
}

impl TestClient {
    pub async fn open(dir: &TempDir, name: &str, key: Vec<u8>, server: &str) -> Result<TestClient, ClientError> {
        TestClient::open_with(dir, name, key, server, None).await
    }

    pub async fn open_with(
        dir: &TempDir,
        name: &str,
        key: Vec<u8>,
        server: &str,
        pauses: Option<Arc<RecordedPauses>>,
    ) -> Result<TestClient, ClientError> {
        let config = ClientConfig {
            store_path: dir.path.join(format!("{name}.db")).display().to_string(),
            store_key: key,
            server_url: server.to_owned(),
        };
        let (events_tx, events) = mpsc::unbounded_channel();
        let listener: Arc<dyn ClientListener> = Arc::new(Recorder(events_tx));
        let opening = config.clone();
        let client = blocking(move || match pauses {
            Some(pauses) => Client::with_pause(opening, listener, pauses),
            None => Client::new(opening, listener),
        })
        .await?;
        Ok(TestClient { client, events, config })
    }

    pub async fn call<T: Send + 'static>(&self, work: impl FnOnce(&Client) -> T + Send + 'static) -> T {
        let client = self.client.clone();
        blocking(move || work(&client)).await
    }

    pub async fn register(&self, phone: &str) -> Result<String, ClientError> {
        let phone = phone.to_owned();
        self.call(move |c| c.register(phone)).await
    }

    pub async fn send(&self, to: &str, text: &str) -> Result<String, ClientError> {
        let (to, text) = (to.to_owned(), text.to_owned());
        self.call(move |c| c.send_text(to, text)).await
    }

    pub async fn connected(&mut self) -> Result<(), Error> {
        self.call(|c| c.connect()).await?;
        self.next(|e| matches!(e, Event::State(ConnectionState::Connected, _))).await?;
        Ok(())
    }

    /// The next event matching `wanted` (others are skipped), within 20 s.
    pub async fn next(&mut self, wanted: impl Fn(&Event) -> bool) -> Result<Event, Error> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if wanted(&event) => return Ok(event),
                Ok(Some(_)) => continue,
                Ok(None) => return Err("the client's listener is gone".into()),
                Err(_) => return Err("no such event within 20 s".into()),
            }
        }
    }

    /// The texts of the next `count` messages, in arrival order.
    pub async fn receive(&mut self, count: usize) -> Result<Vec<ChatMessage>, Error> {
        let mut out = Vec::new();
        while out.len() < count {
            if let Event::Message(message) = self.next(|e| matches!(e, Event::Message(_))).await? {
                out.push(message);
            }
        }
        Ok(out)
    }

    pub async fn close(self) {
        let client = self.client;
        blocking(move || client.shutdown()).await;
    }
}

pub fn phone(tag: &str) -> String {
    format!("+1555{}{tag}", &uuid::Uuid::now_v7().simple().to_string()[24..])
}
