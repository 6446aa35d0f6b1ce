//! Applying the SQL migrations in `migrations/`, embedded at build time.

use crate::eventstore::Backend;
use anyhow::Context as _;
use sqlx::migrate::Migrator;

/// PostgreSQL migrations (`migrations/postgres`).
pub static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");
/// SQLite migrations (`migrations/sqlite`).
pub static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Applies every pending migration to the database at `url`. Returns how
/// many were applied.
pub async fn migrate_up(url: &str) -> anyhow::Result<usize> {
    match Backend::of_url(url) {
        Some(Backend::Postgres) => {
            let pool = sqlx::PgPool::connect(url).await.context("connecting to PostgreSQL")?;
            let before = applied_postgres(&pool).await?;
            POSTGRES.run(&pool).await.context("applying PostgreSQL migrations")?;
            let after = applied_postgres(&pool).await?;
            pool.close().await;
            Ok(after - before)
        }
        Some(Backend::Sqlite) => {
            let (readers, writer) = crate::eventstore::sqlite::connect_pools(url).await.context("opening SQLite")?;
            let before = applied_sqlite(&writer).await?;
            SQLITE.run(&writer).await.context("applying SQLite migrations")?;
            let after = applied_sqlite(&writer).await?;
            readers.close().await;
            writer.close().await;
            Ok(after - before)
        }
        None => anyhow::bail!("DATABASE_URL must start with postgres://, postgresql:// or sqlite:"),
    }
}

/// Migrations this build knows that the database has not applied yet.
pub async fn pending_postgres(pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    Ok(POSTGRES.iter().filter(|m| m.migration_type.is_up_migration()).count() - applied_postgres(pool).await?)
}

async fn applied_postgres(pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(pool).await?;
    if !exists {
        return Ok(0);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success").fetch_one(pool).await?;
    Ok(count as usize)
}

async fn applied_sqlite(pool: &sqlx::SqlitePool) -> anyhow::Result<usize> {
    let exists: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'")
            .fetch_one(pool)
            .await?;
    if exists == 0 {
        return Ok(0);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success").fetch_one(pool).await?;
    Ok(count as usize)
}
