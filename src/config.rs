//! Configuration of `privcomm serve`: every setting is a flag and an
//! environment variable (the flag wins). With none set, the server runs
//! embedded: SQLite under `./data/`, the in-process bus, 127.0.0.1:8080.

use crate::eventstore::Backend;
use clap::{Args, ValueEnum};
use std::net::SocketAddr;

/// The built-in development secret. Production refuses to start with it.
pub const DEVELOPMENT_SECRET_KEY: &str = "privcomm-development-secret-key-change-me!";

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

/// Settings of `privcomm serve`.
#[derive(Clone, Debug, Args)]
pub struct ServeConfig {
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
    /// `development` or `production`.
    #[arg(long, env = "ENVIRONMENT", value_enum, default_value = "development")]
    pub environment: Environment,
    /// PostgreSQL connections kept open.
    #[arg(long, env = "DB_POOL_MIN_SIZE", default_value_t = 5)]
    pub db_pool_min_size: u32,
    /// PostgreSQL connections at most.
    #[arg(long, env = "DB_POOL_MAX_SIZE", default_value_t = 20)]
    pub db_pool_max_size: u32,
    /// Apply pending PostgreSQL migrations at start-up (embedded mode always does).
    #[arg(long, env = "AUTO_MIGRATE", default_value_t = false)]
    pub migrate: bool,
    /// `json` or `text`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
}

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
        if self.db_pool_min_size > self.db_pool_max_size || self.db_pool_max_size == 0 {
            return Err(ConfigError::PoolBounds { min: self.db_pool_min_size, max: self.db_pool_max_size });
        }
        if self.environment == Environment::Production {
            if self.secret_key == DEVELOPMENT_SECRET_KEY {
                return Err(ConfigError::DefaultSecretKey);
            }
            if self.secret_key.len() < 32 {
                return Err(ConfigError::ShortSecretKey(self.secret_key.len()));
            }
        }
        Ok(backend)
    }
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
        let config = parse(&["--environment", "production", "--secret-key", &"k".repeat(32)]);
        assert_eq!(config.validate(), Ok(Backend::Sqlite));
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
