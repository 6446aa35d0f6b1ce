//! `privcomm migrate` as an operator meets it, on both backends: up, down
//! all the way and up again gives the same schema; `down 1` + `up` keeps the
//! data; `sql` changes nothing; `status` tells the truth; an edited, unknown
//! or destructive step is refused with a clear message.

mod support;

use privcomm_domain::{ExpectedVersion, Position};
use std::process::{Command, Output};
use std::sync::Arc;
use support::{TempDir, TestDatabase, TestResult};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// A database of one backend, and how to look inside it.
enum Db {
    Postgres(Option<TestDatabase>),
    Sqlite(TempDir),
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Postgres,
    Sqlite,
}

impl Db {
    async fn new(backend: Backend) -> Result<Db, Error> {
        Ok(match backend {
            Backend::Postgres => Db::Postgres(Some(TestDatabase::create().await?)),
            Backend::Sqlite => Db::Sqlite(TempDir::new()),
        })
    }

    fn url(&self) -> String {
        match self {
            Db::Postgres(db) => db.as_ref().map(|db| db.url.clone()).unwrap_or_default(),
            Db::Sqlite(dir) => format!("sqlite:{}", dir.path.join("privcomm.db").display()),
        }
    }

    /// `privcomm migrate ARGS` on this database.
    fn migrate(&self, args: &[&str]) -> Result<Output, Error> {
        let dir = TempDir::new();
        let output =
            support::node::privcomm(&dir).arg("migrate").args(args).env("DATABASE_URL", self.url()).output()?;
        Ok(output)
    }

    /// `migrate ARGS`, which must succeed; its standard output.
    fn migrate_ok(&self, args: &[&str]) -> Result<String, Error> {
        let output = self.migrate(args)?;
        if !output.status.success() {
            return Err(format!("migrate {args:?} failed: {}", String::from_utf8_lossy(&output.stderr)).into());
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// `migrate ARGS`, which must fail; its standard error.
    fn migrate_refused(&self, args: &[&str]) -> Result<String, Error> {
        let output = self.migrate(args)?;
        if output.status.success() {
            return Err(format!("migrate {args:?} succeeded: {}", String::from_utf8_lossy(&output.stdout)).into());
        }
        Ok(String::from_utf8(output.stderr)?)
    }

    /// The schema as `pg_dump --schema-only` or SQLite's `.schema` (which
    /// prints `sqlite_master`) shows it.
    async fn schema(&self) -> Result<String, Error> {
        match self {
            Db::Postgres(_) => pg_dump(&self.url(), &["--schema-only"]),
            Db::Sqlite(dir) => {
                if !dir.path.join("privcomm.db").exists() {
                    return Ok(String::new());
                }
                let pool = self.sqlite().await?;
                let rows: Vec<(String, String, Option<String>)> =
                    sqlx::query_as("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
                        .fetch_all(&pool)
                        .await?;
                pool.close().await;
                Ok(rows.into_iter().map(|(t, n, sql)| format!("{t} {n}: {}\n", sql.unwrap_or_default())).collect())
            }
        }
    }

    /// Every row of every table but `_sqlx_migrations` (whose `installed_on` changes), as text.
    async fn data(&self) -> Result<String, Error> {
        match self {
            Db::Postgres(_) => pg_dump(&self.url(), &["--data-only", "--exclude-table-data=_sqlx_migrations"]),
            Db::Sqlite(_) => {
                let pool = self.sqlite().await?;
                let tables: Vec<String> = sqlx::query_scalar(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
                     AND name <> '_sqlx_migrations' ORDER BY name",
                )
                .fetch_all(&pool)
                .await?;
                let mut out = String::new();
                for table in tables {
                    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
                        .bind(&table)
                        .fetch_all(&pool)
                        .await?;
                    let row = columns.iter().map(|c| format!("quote({c})")).collect::<Vec<_>>().join(" || '|' || ");
                    let sql = format!("SELECT {row} FROM {table} ORDER BY rowid");
                    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(&pool).await?;
                    out.push_str(&format!("{table} ({} rows)\n{}\n", rows.len(), rows.join("\n")));
                }
                pool.close().await;
                Ok(out)
            }
        }
    }

    async fn sqlite(&self) -> Result<sqlx::SqlitePool, Error> {
        use std::str::FromStr as _;
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url())?.read_only(true);
        Ok(sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?)
    }

    /// Runs `sql` (a statement both dialects understand).
    async fn execute(&self, sql: &str) -> Result<(), Error> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Db::Postgres(_) => {
                let pool = sqlx::PgPool::connect(&self.url()).await?;
                sqlx::raw_sql(sql).execute(&pool).await?;
                pool.close().await;
            }
            Db::Sqlite(_) => {
                let pool = sqlx::SqlitePool::connect(&self.url()).await?;
                sqlx::raw_sql(sql).execute(&pool).await?;
                pool.close().await;
            }
        }
        Ok(())
    }

    /// Appends `count` events, records a checkpoint and a used nonce, through the real store.
    async fn populate(&self, count: usize) -> Result<(), Error> {
        let clock = Arc::new(privcomm::clock::SystemClock);
        let store: Arc<dyn privcomm::eventstore::LogStore> = match self {
            Db::Postgres(_) => {
                let pool = privcomm::eventstore::postgres::connect_pool(
                    &self.url(),
                    privcomm::eventstore::postgres::PoolSize { min: 1, max: 2 },
                )
                .await?;
                Arc::new(privcomm::eventstore::postgres::PostgresEventStore::open(pool, clock).await?)
            }
            Db::Sqlite(_) => {
                let (readers, writer) = privcomm::eventstore::sqlite::connect_pools(&self.url()).await?;
                Arc::new(privcomm::eventstore::sqlite::SqliteEventStore::open(readers, writer, clock).await?)
            }
        };
        for n in 0..count {
            let events = vec![support::event(&format!("e{n}"), 200)];
            store.append(support::append(&format!("user-{}", n % 7), ExpectedVersion::Any, events)).await?;
        }
        store.save_checkpoint("migration-test", Position(count as u64)).await?;
        let now = privcomm_domain::Timestamp(1_800_000_000_000_000);
        let expires = privcomm_domain::Timestamp(4_000_000_000_000_000);
        assert!(store.consume([7; 32], expires, now).await?, "the nonce was already used");
        Ok(())
    }

    async fn drop(self) {
        if let Db::Postgres(Some(db)) = self {
            db.drop_database().await;
        }
    }
}

fn pg_dump(url: &str, args: &[&str]) -> Result<String, Error> {
    let output =
        Command::new("pg_dump").args(args).args(["--no-owner", "--no-privileges", url]).output().map_err(|e| {
            format!("cannot run pg_dump ({e}); install postgresql-client (scripts/test does when it is missing)")
        })?;
    if !output.status.success() {
        return Err(format!("pg_dump failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    // Drop the dump's own header lines, which carry versions and nothing of the schema.
    let text = String::from_utf8(output.stdout)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with("-- Dumped") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Versions in `status` output with `state`.
fn versions_in(status: &str, state: &str) -> Vec<String> {
    status
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let version = words.next()?;
            (words.next()? == state).then(|| version.to_owned())
        })
        .collect()
}

const ALL: [&str; 5] = ["0001", "0002", "0003", "0004", "0005"];

async fn up_down_all_the_way_and_up_again_gives_the_same_schema(backend: Backend) -> TestResult {
    let db = Db::new(backend).await?;
    let status = db.migrate_ok(&["status"])?;
    assert_eq!(versions_in(&status, "pending"), ALL, "{status}");
    assert!(status.contains("0 applied, 5 pending"), "{status}");

    assert!(db.migrate_ok(&[])?.contains("applied 5 migration(s)"), "plain `migrate` applies everything");
    let first = db.schema().await?;
    assert!(first.contains("events") && first.contains("signed_checkpoints"), "{first}");
    let status = db.migrate_ok(&["status"])?;
    assert_eq!(versions_in(&status, "applied"), ALL, "{status}");
    assert!(status.contains("5 applied, 0 pending"), "{status}");
    // Checksums: the SHA-384 of each up script, as sqlx recorded it.
    let checksum = hex::encode(&privcomm::migrate::POSTGRES.iter().next().ok_or("no migration")?.checksum);
    if matches!(backend, Backend::Postgres) {
        assert!(status.contains(&checksum[..16]), "status shows no checksum: {status}");
    }

    assert!(db.migrate_ok(&["down"])?.contains("rolled back 1 migration(s) [5]"), "down defaults to 1");
    assert_eq!(versions_in(&db.migrate_ok(&["status"])?, "pending"), ["0005"]);
    assert!(db.migrate_ok(&["down", "10"])?.contains("rolled back 4 migration(s) [4, 3, 2, 1]"));
    let status = db.migrate_ok(&["status"])?;
    assert_eq!(versions_in(&status, "pending"), ALL, "{status}");
    let bare = db.schema().await?;
    for table in ["events", "rm_mailbox", "signed_checkpoints", "used_auth_nonces", "checkpoints"] {
        assert!(
            !bare.contains(&format!("TABLE {table}")) && !bare.contains(&format!("table {table}:")),
            "{table} survived down: {bare}"
        );
    }
    assert!(db.migrate_ok(&["down"])?.contains("nothing to roll back"));

    db.migrate_ok(&["up"])?;
    assert_eq!(db.schema().await?, first, "the schema after up, down all the way and up differs from the first");
    db.drop().await;
    Ok(())
}

async fn data_survives_down_one_and_up(backend: Backend) -> TestResult {
    let db = Db::new(backend).await?;
    db.migrate_ok(&["up"])?;
    db.populate(300).await?;
    let before = db.data().await?;
    assert!(before.contains("migration-test"), "the populated data is not in the dump: {before}");
    db.migrate_ok(&["down", "1"])?;
    db.migrate_ok(&["up"])?;
    assert_eq!(db.data().await?, before, "data changed across down 1 + up");
    db.drop().await;
    Ok(())
}

async fn sql_prints_and_changes_nothing(backend: Backend) -> TestResult {
    let db = Db::new(backend).await?;
    let empty = db.schema().await?;
    let sql = db.migrate_ok(&["sql"])?;
    assert!(sql.contains("-- 0001 event store (up)") && sql.contains("CREATE TABLE events"), "{sql}");
    assert!(sql.contains("-- 0005 signed checkpoints (up)"), "{sql}");
    assert_eq!(db.schema().await?, empty, "`migrate sql` changed the database");
    if let Db::Sqlite(dir) = &db {
        assert!(!dir.path.join("privcomm.db").exists(), "`migrate sql` created the SQLite file");
    }
    assert_eq!(versions_in(&db.migrate_ok(&["status"])?, "pending"), ALL);

    db.migrate_ok(&["up"])?;
    let migrated = db.schema().await?;
    assert!(db.migrate_ok(&["sql", "up"])?.contains("nothing to run: no migration is pending"));
    let down = db.migrate_ok(&["sql", "down", "2"])?;
    assert!(
        down.contains("-- 0005 signed checkpoints (down)") && down.contains("DROP TABLE signed_checkpoints"),
        "{down}"
    );
    assert!(down.contains("-- 0004 read models (down)") && down.contains("DROP TABLE rm_mailbox"), "{down}");
    assert!(!down.contains("0003"), "sql down 2 printed a third migration: {down}");
    assert!(down.find("0005").ok_or("no 0005")? < down.find("0004").ok_or("no 0004")?, "down runs newest first");
    assert_eq!(db.schema().await?, migrated, "`migrate sql down` changed the database");
    assert_eq!(versions_in(&db.migrate_ok(&["status"])?, "applied"), ALL);
    db.drop().await;
    Ok(())
}

async fn a_changed_or_unknown_migration_is_refused(backend: Backend) -> TestResult {
    let db = Db::new(backend).await?;
    db.migrate_ok(&["up"])?;
    let migrated = db.schema().await?;
    // What an edited 0003 looks like to the database: another checksum.
    let forged = match backend {
        Backend::Postgres => "UPDATE _sqlx_migrations SET checksum = '\\x00ff' WHERE version = 3",
        Backend::Sqlite => "UPDATE _sqlx_migrations SET checksum = x'00ff' WHERE version = 3",
    };
    db.execute(forged).await?;
    for args in [&["up"][..], &["down"], &["sql"], &["status"]] {
        let error = db.migrate_refused(args)?;
        assert!(
            error.contains("migration 0003 (append lock function) was changed after it was applied")
                && error.contains("00ff"),
            "migrate {args:?}: {error}"
        );
    }
    assert!(db.migrate(&["status"])?.stdout.starts_with(b"version"), "status still prints the table");
    assert!(String::from_utf8(db.migrate(&["status"])?.stdout)?.contains("CHANGED"));
    assert_eq!(
        db.schema().await?.replace("00ff", ""),
        migrated.replace("00ff", ""),
        "a refused command changed the schema"
    );
    // serve refuses it too, migrating itself or not.
    for auto_migrate in ["false", "true"] {
        let dir = TempDir::new();
        let serve = support::node::privcomm(&dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", db.url())
            .env("AUTO_MIGRATE", auto_migrate)
            .output()?;
        let stderr = String::from_utf8_lossy(&serve.stderr);
        assert!(!serve.status.success(), "serve started (AUTO_MIGRATE={auto_migrate})");
        assert!(stderr.contains("was changed after it was applied"), "AUTO_MIGRATE={auto_migrate}: {stderr}");
    }

    let restore = format!(
        "UPDATE _sqlx_migrations SET checksum = {} WHERE version = 3",
        match backend {
            Backend::Postgres => format!(
                "'\\x{}'",
                hex::encode(&privcomm::migrate::POSTGRES.iter().find(|m| m.version == 3).ok_or("0003")?.checksum)
            ),
            Backend::Sqlite => format!(
                "x'{}'",
                hex::encode(&privcomm::migrate::SQLITE.iter().find(|m| m.version == 3).ok_or("0003")?.checksum)
            ),
        }
    );
    db.execute(&restore).await?;
    db.migrate_ok(&["status"])?;
    // A migration from a newer privcomm.
    db.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', TRUE, x'0102', 1)"
            .replace(
                "x'0102'",
                match backend {
                    Backend::Postgres => "'\\x0102'",
                    Backend::Sqlite => "x'0102'",
                },
            )
            .as_str(),
    )
    .await?;
    let error = db.migrate_refused(&["up"])?;
    assert!(
        error.contains("migration 9999 (from the future) is applied but this build of privcomm does not know it"),
        "{error}"
    );
    assert!(db.migrate_refused(&["down"])?.contains("newer privcomm"));
    db.drop().await;
    Ok(())
}

async fn down_keeps_an_event_log_that_holds_events_unless_told(backend: Backend) -> TestResult {
    let db = Db::new(backend).await?;
    db.migrate_ok(&["up"])?;
    db.populate(3).await?;
    let before = db.schema().await?;
    let error = db.migrate_refused(&["down", "5"])?;
    assert!(
        error.contains("drops the event log, and it holds events") && error.contains("--allow-data-loss"),
        "{error}"
    );
    assert_eq!(db.schema().await?, before, "the refused down changed the schema");
    // Rolling back what is above the log is allowed.
    db.migrate_ok(&["down", "4"])?;
    assert!(db.migrate_refused(&["down"])?.contains("--allow-data-loss"));
    assert!(db.migrate_ok(&["down", "--allow-data-loss"])?.contains("rolled back 1 migration(s) [1]"));
    db.drop().await;
    Ok(())
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres { $(
            #[tokio::test]
            async fn $name() -> super::TestResult { super::$name(super::Backend::Postgres).await }
        )* }
        mod sqlite { $(
            #[tokio::test]
            async fn $name() -> super::TestResult { super::$name(super::Backend::Sqlite).await }
        )* }
    };
}

on_both_backends!(
    up_down_all_the_way_and_up_again_gives_the_same_schema,
    data_survives_down_one_and_up,
    sql_prints_and_changes_nothing,
    a_changed_or_unknown_migration_is_refused,
    down_keeps_an_event_log_that_holds_events_unless_told,
);
