//! Configuration of `privcomm serve`: every setting is a flag and an
//! environment variable (the flag wins). With none set, the server runs
//! embedded: SQLite under `./data/`, the in-process bus, 127.0.0.1:8080.

use crate::eventstore::Backend;
use clap::{Args, ValueEnum};
use privcomm_api::limits::{RateLimit, RateLimits};
use std::net::SocketAddr;
use std::time::Duration;

/// The built-in development secret. Production refuses to start with it.
pub const DEVELOPMENT_SECRET_KEY: &str = "privcomm-development-secret-key-change-me!";

/// The built-in development TURN secret. Production refuses it when TURN is configured.
pub const DEVELOPMENT_TURN_SECRET: &str = "privcomm-development-turn-secret-change-me!";

/// The embedded default database.
pub const DEFAULT_DATABASE_URL: &str = "sqlite:data/privcomm.db";

/// Development or production rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Environment {
    /// Defaults allowed.
    Development,
    /// Default secrets refused.
    Production,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (default; for log shippers).
    Json,
    /// Human-readable lines.
    Text,
}

/// What a `privcomm serve` process does. Every process also serves
/// `/health/` and `/metrics`, and competes to be the cluster's outbox
/// publisher (ADR 0009).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Role {
    /// The HTTP API: accounts, keys, login tokens, push tokens, OpenAPI.
    Api,
    /// The WebSocket relay, its doorbells and its presence.
    Relay,
    /// Projection workers, retention jobs and signed checkpoints (one
    /// process at a time runs them; the others stand by).
    Projector,
}

impl Role {
    /// Every role: the default.
    pub const ALL: [Role; 3] = [Role::Api, Role::Relay, Role::Projector];

    /// The name used in `ROLES`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Relay => "relay",
            Role::Projector => "projector",
        }
    }
}

/// Settings of `privcomm serve`.
#[derive(Clone, Debug, Args)]
pub struct ServeConfig {
    /// Roles this process runs, comma-separated: any of api, relay, projector.
    #[arg(long, env = "ROLES", value_enum, value_delimiter = ',', default_value = "api,relay,projector")]
    pub roles: Vec<Role>,
    /// This process's name in logs, `/health/` and `/metrics` (default: host name and process id).
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Event store: `sqlite:PATH` (embedded) or `postgres://…` (cluster).
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// NATS server for the JetStream bus; without it the in-process bus is used.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// JetStream stream that carries the event log.
    #[arg(long, env = "NATS_STREAM", default_value = "PRIVCOMM_EVENTS")]
    pub nats_stream: String,
    /// Secret for signing login tokens (at least 32 bytes in production).
    #[arg(long, env = "SECRET_KEY", default_value = DEVELOPMENT_SECRET_KEY, hide_env_values = true, hide_default_value = true)]
    pub secret_key: String,
    /// The secret before a rotation: tokens and challenges signed with it are
    /// accepted for one token lifetime (5 minutes) after the start.
    #[arg(long, env = "SECRET_KEY_PREVIOUS", hide_env_values = true)]
    pub secret_key_previous: Option<String>,
    /// `development` or `production`.
    #[arg(long, env = "ENVIRONMENT", value_enum, default_value = "development")]
    pub environment: Environment,
    /// PostgreSQL connections kept open.
    #[arg(long, env = "DB_POOL_MIN_SIZE", default_value_t = 5)]
    pub db_pool_min_size: u32,
    /// PostgreSQL connections of the node's pool at most (the append writer,
    /// notifications, leader elections and the projection workers hold their own).
    #[arg(long, env = "DB_POOL_MAX_SIZE", default_value_t = 20)]
    pub db_pool_max_size: u32,
    /// Apply pending PostgreSQL migrations at start-up (embedded mode always does).
    #[arg(long, env = "AUTO_MIGRATE", default_value_t = false)]
    pub migrate: bool,
    /// `json` or `text`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Origins allowed by CORS, comma-separated.
    #[arg(long, env = "CORS_ORIGINS", value_delimiter = ',', default_value = "http://localhost:19006")]
    pub cors_origins: Vec<String>,
    /// Registrations per client IP, as `COUNT/WINDOW` (window: `500ms`, `30s`, `1m`, `1h`).
    #[arg(long, env = "RATE_LIMIT_REGISTRATION", default_value = "10/1h", value_parser = parse_rate_limit)]
    pub rate_limit_registration: RateLimit,
    /// Key-bundle fetches per requesting user.
    #[arg(long, env = "RATE_LIMIT_KEY_BUNDLE", default_value = "5/1m", value_parser = parse_rate_limit)]
    pub rate_limit_key_bundle: RateLimit,
    /// Login tokens issued per user.
    #[arg(long, env = "RATE_LIMIT_TOKEN", default_value = "10/1m", value_parser = parse_rate_limit)]
    pub rate_limit_token: RateLimit,
    /// TURN credentials issued per user.
    #[arg(long, env = "RATE_LIMIT_TURN", default_value = "10/1m", value_parser = parse_rate_limit)]
    pub rate_limit_turn: RateLimit,
    /// TURN and STUN servers for calls, comma-separated (`turn:`, `turns:`, `stun:` URLs); empty = no calls.
    #[arg(long, env = "TURN_URLS", value_delimiter = ',')]
    pub turn_urls: Vec<String>,
    /// coturn's `static-auth-secret` (`use-auth-secret`): signs TURN credentials.
    #[arg(long, env = "TURN_SECRET", default_value = DEVELOPMENT_TURN_SECRET, hide_env_values = true, hide_default_value = true)]
    pub turn_secret: String,
    /// How long a TURN credential is valid (1m to 48h).
    #[arg(long, env = "TURN_TTL", default_value = "12h", value_parser = parse_duration)]
    pub turn_ttl: Duration,
    /// User aggregates kept folded in memory by the API.
    #[arg(long, env = "USER_CACHE_SIZE", default_value_t = 2_000)]
    pub user_cache_size: usize,
    /// Daily time (UTC, HH:MM) of the job that expires messages undelivered for 30 days.
    #[arg(long, env = "RETENTION_EXPIRE_AT", default_value = "02:00")]
    pub retention_expire_at: privcomm_projections::retention::DailyAt,
    /// Daily time (UTC, HH:MM) of the job that compacts prekeys used more than 7 days ago.
    #[arg(long, env = "RETENTION_COMPACT_AT", default_value = "03:00")]
    pub retention_compact_at: privcomm_projections::retention::DailyAt,
    /// How long a delivered (or expired) message's ciphertext is kept before it is dropped.
    #[arg(long, env = "CIPHERTEXT_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub ciphertext_grace: Duration,
    /// Ed25519 seed (64 hex digits) for signing checkpoints of the log; unset = no checkpoints.
    #[arg(long, env = "CHECKPOINT_SIGNING_KEY", hide_env_values = true)]
    pub checkpoint_signing_key: Option<String>,
    /// Sign a checkpoint at least every this many events…
    #[arg(long, env = "CHECKPOINT_EVERY_EVENTS", default_value_t = 10_000)]
    pub checkpoint_every_events: u64,
    /// …and at least this often while events arrive.
    #[arg(long, env = "CHECKPOINT_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
}

/// A duration such as `500ms`, `30s`, `15m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let usage = || format!("{text:?}: expected a duration such as 500ms, 30s, 15m or 1h");
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let number: u64 = number.parse().map_err(|_| usage())?;
    Ok(match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        "h" => Duration::from_secs(number * 3600),
        _ => return Err(usage()),
    })
}

/// `COUNT/WINDOW`, e.g. `10/1h`, `5/1m`, `3/500ms`.
pub fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    let usage = || format!("{text:?}: expected COUNT/WINDOW such as 10/1h, 5/1m, 30/10s or 3/500ms");
    let (count, window) = text.split_once('/').ok_or_else(usage)?;
    let requests: u32 = count.trim().parse().map_err(|_| usage())?;
    let per = parse_duration(window).map_err(|_| usage())?;
    if requests == 0 || per.is_zero() {
        return Err(format!("{text:?}: count and window must be positive"));
    }
    Ok(RateLimit { requests, per })
}

/// Database passwords that are as good as none.
const DEFAULT_DATABASE_PASSWORDS: [&str; 8] =
    ["", "postgres", "password", "privcomm", "changeme", "secret", "admin", "root"];

/// A configuration the server refuses to start with. Each names its variable.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Production with the built-in secret.
    #[error(
        "SECRET_KEY is the built-in development default; set SECRET_KEY to a random value of at least 32 bytes before running with ENVIRONMENT=production"
    )]
    DefaultSecretKey,
    /// Production with a short secret.
    #[error("SECRET_KEY is {0} bytes long; ENVIRONMENT=production needs at least 32")]
    ShortSecretKey(usize),
    /// Unknown database scheme.
    #[error("DATABASE_URL must start with sqlite:, postgres:// or postgresql://")]
    UnsupportedDatabaseUrl,
    /// An in-memory SQLite database would vanish with the process, and its
    /// reader and writer connections would each see a different one.
    #[error(
        "DATABASE_URL points at an in-memory SQLite database; use a file (sqlite:PATH) so events survive a restart"
    )]
    InMemorySqlite,
    /// Production with a guessable database password.
    #[error("DATABASE_URL carries a default password; set a strong one before running with ENVIRONMENT=production")]
    DefaultDatabasePassword,
    /// Production with CORS open to localhost.
    #[error(
        "CORS_ORIGINS allows {0}, a localhost origin; list only your production origins with ENVIRONMENT=production"
    )]
    LocalhostCorsOrigin(String),
    /// A checkpoint key that is not a 32-byte hex seed.
    #[error("CHECKPOINT_SIGNING_KEY must be 64 hex digits (an Ed25519 seed; `privcomm checkpoint-key` makes one)")]
    InvalidCheckpointKey,
    /// The previous secret is the current one.
    #[error(
        "SECRET_KEY_PREVIOUS is the same as SECRET_KEY; set it to the secret you are rotating away from, or unset it"
    )]
    PreviousSecretKeyIsCurrent,
    /// Production accepting tokens anyone can forge.
    #[error(
        "SECRET_KEY_PREVIOUS is the built-in development default: anyone could forge tokens with it; unset it with ENVIRONMENT=production"
    )]
    DefaultPreviousSecretKey,
    /// No role at all.
    #[error("ROLES must name at least one of api, relay, projector")]
    NoRole,
    /// A node id that would garble logs and metrics.
    #[error("NODE_ID {0:?} must be 1 to 64 letters, digits, '.', '_' or '-'")]
    InvalidNodeId(String),
    /// An origin that is not `scheme://host[:port]`.
    #[error("CORS_ORIGINS entry {0:?} is not an origin like https://app.example.org")]
    InvalidCorsOrigin(String),
    /// A TURN URL of another scheme.
    #[error("TURN_URLS entry {0:?} must start with turn:, turns: or stun:")]
    InvalidTurnUrl(String),
    /// A TURN credential lifetime out of bounds.
    #[error("TURN_TTL must be between 1m and 48h")]
    TurnTtl,
    /// Production with TURN credentials anyone could make.
    #[error(
        "TURN_SECRET is the built-in development default while TURN_URLS is set; set it to coturn's static-auth-secret (a random value of at least 32 bytes) before running with ENVIRONMENT=production"
    )]
    DefaultTurnSecret,
    /// An empty TURN secret.
    #[error("TURN_SECRET is empty; set it to coturn's static-auth-secret")]
    EmptyTurnSecret,
    /// Pool bounds the wrong way round.
    #[error("DB_POOL_MIN_SIZE ({min}) is larger than DB_POOL_MAX_SIZE ({max})")]
    PoolBounds {
        /// Minimum.
        min: u32,
        /// Maximum.
        max: u32,
    },
}

impl ServeConfig {
    /// Checks the rules that do not need a connection.
    pub fn validate(&self) -> Result<Backend, ConfigError> {
        let backend = Backend::of_url(&self.database_url).ok_or(ConfigError::UnsupportedDatabaseUrl)?;
        if backend == Backend::Sqlite && self.database_url.contains(":memory:") {
            return Err(ConfigError::InMemorySqlite);
        }
        if self.roles.is_empty() {
            return Err(ConfigError::NoRole);
        }
        if let Some(id) = &self.node_id {
            let valid = !id.is_empty()
                && id.len() <= 64
                && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                return Err(ConfigError::InvalidNodeId(id.clone()));
            }
        }
        if self.secret_key_previous.as_deref() == Some(self.secret_key.as_str()) {
            return Err(ConfigError::PreviousSecretKeyIsCurrent);
        }
        if self.db_pool_min_size > self.db_pool_max_size || self.db_pool_max_size == 0 {
            return Err(ConfigError::PoolBounds { min: self.db_pool_min_size, max: self.db_pool_max_size });
        }
        for origin in &self.cors_origins {
            let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.trim_start_matches("https://").trim_start_matches("http://").contains('/')
                && axum::http::HeaderValue::from_str(origin).is_ok();
            if !valid {
                return Err(ConfigError::InvalidCorsOrigin(origin.clone()));
            }
        }
        if let Some(url) =
            self.turn_urls.iter().find(|u| !["turn:", "turns:", "stun:"].iter().any(|s| u.starts_with(s)))
        {
            return Err(ConfigError::InvalidTurnUrl(url.clone()));
        }
        if self.turn_ttl < Duration::from_secs(60) || self.turn_ttl > Duration::from_secs(48 * 3600) {
            return Err(ConfigError::TurnTtl);
        }
        if self.turn_secret.is_empty() {
            return Err(ConfigError::EmptyTurnSecret);
        }
        if let Some(key) = &self.checkpoint_signing_key {
            privcomm_projections::checkpoints::CheckpointSigner::from_hex_seed(key)
                .map_err(|_| ConfigError::InvalidCheckpointKey)?;
        }
        if self.environment == Environment::Production {
            if self.secret_key == DEVELOPMENT_SECRET_KEY {
                return Err(ConfigError::DefaultSecretKey);
            }
            if self.secret_key.len() < 32 {
                return Err(ConfigError::ShortSecretKey(self.secret_key.len()));
            }
            if self.secret_key_previous.as_deref() == Some(DEVELOPMENT_SECRET_KEY) {
                return Err(ConfigError::DefaultPreviousSecretKey);
            }
            if backend == Backend::Postgres && has_default_password(&self.database_url) {
                return Err(ConfigError::DefaultDatabasePassword);
            }
            if let Some(origin) = self.cors_origins.iter().find(|o| is_localhost_origin(o)) {
                return Err(ConfigError::LocalhostCorsOrigin(origin.clone()));
            }
            if !self.turn_urls.is_empty() && self.turn_secret == DEVELOPMENT_TURN_SECRET {
                return Err(ConfigError::DefaultTurnSecret);
            }
        }
        Ok(backend)
    }

    /// Whether this process runs `role`.
    pub fn runs(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// `NODE_ID`, or the host name and process id.
    pub fn node_name(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let host = host.trim();
            format!("{}-{}", if host.is_empty() { "privcomm" } else { host }, std::process::id())
        })
    }

    /// The checkpoint signer, if a key is configured (validated by [`ServeConfig::validate`]).
    pub fn checkpoint_signer(&self) -> Option<privcomm_projections::checkpoints::CheckpointSigner> {
        self.checkpoint_signing_key
            .as_deref()
            .and_then(|key| privcomm_projections::checkpoints::CheckpointSigner::from_hex_seed(key).ok())
    }

    /// The API's settings.
    pub fn api_config(&self) -> privcomm_api::ApiConfig {
        privcomm_api::ApiConfig {
            secret_key: self.secret_key.as_bytes().to_vec(),
            previous_secret_key: self.secret_key_previous.as_ref().map(|k| k.as_bytes().to_vec()),
            tokens: privcomm_api::tokens::TokenSettings::default(),
            rate_limits: RateLimits {
                registration: self.rate_limit_registration,
                key_bundle: self.rate_limit_key_bundle,
                token_issue: self.rate_limit_token,
                turn: self.rate_limit_turn,
            },
            cors_origins: self.cors_origins.clone(),
            user_cache_capacity: self.user_cache_size,
            node: privcomm_api::health::NodeIdentity {
                node: self.node_name(),
                roles: self.roles.iter().map(|r| r.name().to_owned()).collect(),
            },
            turn: privcomm_api::calls::TurnConfig {
                urls: self.turn_urls.clone(),
                secret: self.turn_secret.as_bytes().to_vec(),
                ttl: self.turn_ttl,
            },
        }
    }
}

/// `postgres://user:PASSWORD@host/db` with a password from the default list
/// (or none at all).
fn has_default_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else { return false };
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let Some((credentials, _host)) = authority.rsplit_once('@') else { return true };
    let password = credentials.split_once(':').map_or("", |(_, p)| p);
    DEFAULT_DATABASE_PASSWORDS.contains(&password)
}

fn is_localhost_origin(origin: &str) -> bool {
    let host = origin.trim_start_matches("https://").trim_start_matches("http://");
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or(host).trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or(host)
    };
    host == "localhost" || host.ends_with(".localhost") || host == "::1" || host.starts_with("127.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: ServeConfig,
    }

    fn parse(args: &[&str]) -> ServeConfig {
        Cli::try_parse_from(std::iter::once("privcomm").chain(args.iter().copied())).expect("parses").config
    }

    #[test]
    fn production_refuses_the_default_secret_and_short_ones() {
        let config = parse(&["--environment", "production"]);
        assert_eq!(config.validate(), Err(ConfigError::DefaultSecretKey));
        let config = parse(&["--environment", "production", "--secret-key", "short"]);
        assert_eq!(config.validate(), Err(ConfigError::ShortSecretKey(5)));
        let strong = "k".repeat(32);
        let config = parse(&[
            "--environment",
            "production",
            "--secret-key",
            &strong,
            "--cors-origins",
            "https://app.example.org",
        ]);
        assert_eq!(config.validate(), Ok(Backend::Sqlite));
    }

    #[test]
    fn production_refuses_default_database_passwords() {
        let strong = "k".repeat(32);
        let base =
            ["--environment", "production", "--secret-key", &strong, "--cors-origins", "https://app.example.org"];
        let with_db = |url: &str| {
            let mut args = base.to_vec();
            args.extend(["--database-url", url]);
            parse(&args).validate()
        };
        for weak in [
            "postgres://privcomm:privcomm@db/p",
            "postgres://postgres:postgres@db/p",
            "postgres://app@db/p",
            "postgresql://u:password@db:5432/p",
        ] {
            assert_eq!(with_db(weak), Err(ConfigError::DefaultDatabasePassword), "{weak}");
        }
        assert_eq!(with_db("postgres://app:Xq9-long-random@db/p"), Ok(Backend::Postgres));
    }

    #[test]
    fn production_refuses_localhost_cors_origins() {
        let strong = "k".repeat(32);
        for origin in ["http://localhost:19006", "http://127.0.0.1:3000", "http://[::1]:8080", "https://app.localhost"]
        {
            let config = parse(&["--environment", "production", "--secret-key", &strong, "--cors-origins", origin]);
            assert_eq!(config.validate(), Err(ConfigError::LocalhostCorsOrigin(origin.into())), "{origin}");
        }
        // The default (http://localhost:19006) is refused too.
        let config = parse(&["--environment", "production", "--secret-key", &strong]);
        assert!(matches!(config.validate(), Err(ConfigError::LocalhostCorsOrigin(_))));
        let config = parse(&["--cors-origins", "not an origin"]);
        assert!(matches!(config.validate(), Err(ConfigError::InvalidCorsOrigin(_))));
    }

    #[test]
    fn roles_node_ids_and_previous_secrets_are_checked() {
        let config = parse(&[]);
        assert_eq!(config.roles, Role::ALL);
        let config = parse(&["--roles", "relay,projector"]);
        assert!(!config.runs(Role::Api) && config.runs(Role::Relay) && config.runs(Role::Projector));
        let cli = |args: &[&str]| Cli::try_parse_from(std::iter::once("privcomm").chain(args.iter().copied()));
        assert!(cli(&["--roles", "api,mailman"]).is_err());
        assert_eq!(parse(&["--node-id", "relay-1.eu"]).validate(), Ok(Backend::Sqlite));
        assert_eq!(parse(&["--node-id", "relay-1.eu"]).node_name(), "relay-1.eu");
        assert!(parse(&[]).node_name().ends_with(&format!("-{}", std::process::id())));
        assert_eq!(parse(&["--node-id", "a b"]).validate(), Err(ConfigError::InvalidNodeId("a b".into())));
        let strong = "k".repeat(32);
        let config = parse(&["--secret-key", &strong, "--secret-key-previous", &strong]);
        assert_eq!(config.validate(), Err(ConfigError::PreviousSecretKeyIsCurrent));
        let config = parse(&[
            "--environment",
            "production",
            "--secret-key",
            &strong,
            "--secret-key-previous",
            DEVELOPMENT_SECRET_KEY,
            "--cors-origins",
            "https://app.example.org",
        ]);
        assert_eq!(config.validate(), Err(ConfigError::DefaultPreviousSecretKey));
        let config = parse(&["--secret-key", &strong, "--secret-key-previous", "the-old-one"]);
        assert_eq!(config.api_config().previous_secret_key.as_deref(), Some(&b"the-old-one"[..]));
    }

    #[test]
    fn turn_settings_are_checked_and_production_refuses_the_default_secret() {
        let strong = "k".repeat(32);
        let production =
            ["--environment", "production", "--secret-key", &strong, "--cors-origins", "https://a.example.org"];
        let config = parse(&[]);
        assert!(config.turn_urls.is_empty());
        assert_eq!(config.turn_ttl, Duration::from_secs(12 * 3600));
        assert_eq!(config.api_config().turn.secret, DEVELOPMENT_TURN_SECRET.as_bytes());
        // Without TURN_URLS, production does not care about the TURN secret.
        assert_eq!(parse(&production).validate(), Ok(Backend::Sqlite));
        let with_turn =
            [&production[..], &["--turn-urls", "turn:turn.example.org:3478,stun:turn.example.org:3478"]].concat();
        assert_eq!(parse(&with_turn).validate(), Err(ConfigError::DefaultTurnSecret));
        let with_secret = [&with_turn[..], &["--turn-secret", "a-real-static-auth-secret-0123456789"]].concat();
        let config = parse(&with_secret);
        assert_eq!(config.validate(), Ok(Backend::Sqlite));
        assert_eq!(config.api_config().turn.urls, ["turn:turn.example.org:3478", "stun:turn.example.org:3478"]);
        assert_eq!(
            parse(&["--turn-urls", "https://turn.example.org"]).validate(),
            Err(ConfigError::InvalidTurnUrl("https://turn.example.org".into()))
        );
        assert_eq!(parse(&["--turn-ttl", "30s"]).validate(), Err(ConfigError::TurnTtl));
        assert_eq!(parse(&["--turn-ttl", "49h"]).validate(), Err(ConfigError::TurnTtl));
        assert_eq!(parse(&["--turn-secret", ""]).validate(), Err(ConfigError::EmptyTurnSecret));
    }

    #[test]
    fn rate_limits_parse_and_refuse_nonsense() {
        assert_eq!(parse_rate_limit("10/1h"), Ok(RateLimit { requests: 10, per: Duration::from_secs(3600) }));
        assert_eq!(parse_rate_limit("3/500ms"), Ok(RateLimit { requests: 3, per: Duration::from_millis(500) }));
        for bad in ["10", "0/1m", "5/0s", "x/1m", "5/1d", "5/m"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn development_accepts_defaults_and_rejects_unknown_databases() {
        assert_eq!(parse(&[]).validate(), Ok(Backend::Sqlite));
        assert_eq!(parse(&["--database-url", "mysql://x"]).validate(), Err(ConfigError::UnsupportedDatabaseUrl));
        assert_eq!(parse(&["--database-url", "sqlite::memory:"]).validate(), Err(ConfigError::InMemorySqlite));
        assert_eq!(
            parse(&["--db-pool-min-size", "9", "--db-pool-max-size", "3"]).validate(),
            Err(ConfigError::PoolBounds { min: 9, max: 3 })
        );
    }
}
