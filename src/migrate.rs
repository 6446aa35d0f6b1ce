//! The SQL migrations in `migrations/`, embedded at build time: applying
//! them, rolling them back, and reporting where a database stands.
//!
//! sqlx records each applied migration's version and the SHA-384 of its up
//! script in `_sqlx_migrations`. Before changing anything, every command here
//! compares that record with the migrations this build carries and refuses a
//! database whose applied migrations were edited, are unknown to this build
//! or failed half-way — so an operator learns it from one clear message
//! instead of from a broken schema.

use crate::eventstore::Backend;
use anyhow::Context as _;
use privcomm_projections::on_db;
use privcomm_projections::store::ReadDb;
use sqlx::migrate::{Migration, Migrator};
use std::fmt::Write as _;
use std::str::FromStr as _;

/// PostgreSQL migrations (`migrations/postgres`).
pub static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");
/// SQLite migrations (`migrations/sqlite`).
pub static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");

/// The version whose down script drops the event log itself.
const EVENT_LOG_VERSION: i64 = 1;

/// Where one migration stands in a database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationState {
    /// Applied, with the script this build carries.
    Applied {
        /// When, as the database recorded it.
        at: String,
    },
    /// Not applied yet.
    Pending,
    /// Applied, but from a script that differs from this build's.
    Changed {
        /// The checksum the database recorded (hex).
        applied_checksum: String,
    },
    /// Applied, but this build has no such migration (a newer privcomm ran it).
    Unknown,
    /// Started and not finished (`success = false`).
    Failed,
}

/// One row of `privcomm migrate status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationStatus {
    /// `NNNN` of the file name.
    pub version: i64,
    /// The rest of the file name, in words.
    pub description: String,
    /// SHA-384 of this build's up script (hex), or of the applied one for [`MigrationState::Unknown`].
    pub checksum: String,
    /// Where it stands.
    pub state: MigrationState,
}

impl MigrationStatus {
    /// Why no migration command may run on this database, if one can't.
    fn refusal(&self) -> Option<String> {
        let name = format!("migration {:04} ({})", self.version, self.description);
        match &self.state {
            MigrationState::Applied { .. } | MigrationState::Pending => None,
            MigrationState::Changed { applied_checksum } => Some(format!(
                "{name} was changed after it was applied: the database recorded checksum {} and this build carries {}. \
                 A released migration must never be edited — restore its original text and put the change in a new migration",
                short(applied_checksum),
                short(&self.checksum)
            )),
            MigrationState::Unknown => Some(format!(
                "{name} is applied but this build of privcomm does not know it: the database was migrated by a newer \
                 privcomm. Run the newer version, or roll back with its `privcomm migrate down` first"
            )),
            MigrationState::Failed => Some(format!(
                "{name} failed part-way and is marked unfinished in _sqlx_migrations; repair the schema by hand and \
                 delete that row before migrating again"
            )),
        }
    }

    fn applied(&self) -> bool {
        !matches!(self.state, MigrationState::Pending)
    }
}

fn short(checksum: &str) -> &str {
    &checksum[..checksum.len().min(16)]
}

/// Up or down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// Apply pending migrations.
    Up,
    /// Roll back applied ones.
    Down,
}

/// A database opened for migrating.
struct MigrationDb {
    /// `None`: an SQLite file that does not exist yet (nothing applied), opened only to read.
    db: Option<ReadDb>,
    migrator: &'static Migrator,
}

impl MigrationDb {
    /// Opens `url`. `write = false` changes nothing, not even by creating an
    /// SQLite file that does not exist.
    async fn open(url: &str, write: bool) -> anyhow::Result<MigrationDb> {
        match Backend::of_url(url) {
            Some(Backend::Postgres) => {
                let pool = crate::eventstore::postgres::pool_options()
                    .max_connections(1)
                    .connect(url)
                    .await
                    .context("connecting to PostgreSQL (DATABASE_URL)")?;
                Ok(MigrationDb { db: Some(ReadDb::Postgres(pool)), migrator: &POSTGRES })
            }
            Some(Backend::Sqlite) => {
                let path = crate::serve::sqlite_path(url);
                let db = if write {
                    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                    }
                    let options = crate::eventstore::sqlite::connect_options(url)?;
                    Some(sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?)
                } else if path.exists() {
                    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?.read_only(true);
                    Some(sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?)
                } else {
                    None
                };
                let db = db.map(ReadDb::Sqlite);
                Ok(MigrationDb { db, migrator: &SQLITE })
            }
            None => anyhow::bail!("DATABASE_URL must start with postgres://, postgresql:// or sqlite:"),
        }
    }

    async fn close(self) {
        if let Some(db) = self.db {
            on_db!(db, pool => pool.close().await);
        }
    }

    fn ups(&self) -> impl DoubleEndedIterator<Item = &'static Migration> {
        self.migrator.iter().filter(|m| m.migration_type.is_up_migration())
    }

    fn down_script(&self, version: i64) -> Option<&'static Migration> {
        self.migrator.iter().find(|m| m.version == version && m.migration_type.is_down_migration())
    }

    /// Every migration this build knows or the database applied, in version order.
    async fn status(&self) -> anyhow::Result<Vec<MigrationStatus>> {
        let applied = self.applied_rows().await?;
        let mut rows: Vec<MigrationStatus> = self
            .ups()
            .map(|m| {
                let checksum = hex::encode(&m.checksum);
                let state = match applied.iter().find(|a| a.version == m.version) {
                    None => MigrationState::Pending,
                    Some(a) if !a.success => MigrationState::Failed,
                    Some(a) if a.checksum != checksum => {
                        MigrationState::Changed { applied_checksum: a.checksum.clone() }
                    }
                    Some(a) => MigrationState::Applied { at: a.installed_on.clone() },
                };
                MigrationStatus { version: m.version, description: m.description.to_string(), checksum, state }
            })
            .collect();
        for a in applied.iter().filter(|a| !self.migrator.version_exists(a.version)) {
            rows.push(MigrationStatus {
                version: a.version,
                description: a.description.clone(),
                checksum: a.checksum.clone(),
                state: if a.success { MigrationState::Unknown } else { MigrationState::Failed },
            });
        }
        rows.sort_by_key(|r| r.version);
        Ok(rows)
    }

    /// The status, or the first reason no migration may run.
    async fn checked_status(&self) -> anyhow::Result<Vec<MigrationStatus>> {
        let rows = self.status().await?;
        if let Some(refusal) = rows.iter().find_map(MigrationStatus::refusal) {
            anyhow::bail!(refusal);
        }
        Ok(rows)
    }

    async fn applied_rows(&self) -> anyhow::Result<Vec<AppliedRow>> {
        let Some(db) = &self.db else { return Ok(Vec::new()) };
        let exists: bool = match db {
            ReadDb::Postgres(pool) => {
                sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(pool).await?
            }
            ReadDb::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
                )
                .fetch_one(pool)
                .await?
            }
        };
        if !exists {
            return Ok(Vec::new());
        }
        let sql = "SELECT version, description, checksum, success, CAST(installed_on AS TEXT) \
                   FROM _sqlx_migrations ORDER BY version";
        let rows: Vec<(i64, String, Vec<u8>, bool, String)> =
            on_db!(db, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        Ok(rows
            .into_iter()
            .map(|(version, description, checksum, success, installed_on)| AppliedRow {
                version,
                description,
                checksum: hex::encode(checksum),
                success,
                installed_on,
            })
            .collect())
    }

    /// Whether the event log holds any event. Asked only while 0001 is
    /// applied, so a failing query is an error, never "empty": the answer
    /// guards the log against being dropped.
    async fn holds_events(&self) -> anyhow::Result<bool> {
        let Some(db) = &self.db else { return Ok(false) };
        let sql = "SELECT EXISTS (SELECT 1 FROM events)";
        let holds: bool = on_db!(db, pool => sqlx::query_scalar(sql).fetch_one(pool).await)
            .context("checking whether the event log holds events")?;
        Ok(holds)
    }

    fn pool(&self) -> anyhow::Result<&ReadDb> {
        self.db.as_ref().context("the database was opened read-only")
    }
}

struct AppliedRow {
    version: i64,
    description: String,
    checksum: String,
    success: bool,
    installed_on: String,
}

/// Where every migration stands in the database at `url`. Changes nothing.
pub async fn status(url: &str) -> anyhow::Result<Vec<MigrationStatus>> {
    let db = MigrationDb::open(url, false).await?;
    let rows = db.status().await;
    db.close().await;
    rows
}

/// Why no migration command may run on a database with these rows, if one can't.
pub fn refusal(rows: &[MigrationStatus]) -> Option<String> {
    rows.iter().find_map(MigrationStatus::refusal)
}

/// `privcomm migrate status` as text: one line per migration.
pub fn status_table(rows: &[MigrationStatus]) -> String {
    let mut out = String::from("version  state     checksum (SHA-384)  description / applied at\n");
    for row in rows {
        let (state, detail) = match &row.state {
            MigrationState::Applied { at } => ("applied", format!("{} — {at}", row.description)),
            MigrationState::Pending => ("pending", row.description.clone()),
            MigrationState::Changed { applied_checksum } => {
                ("CHANGED", format!("{} — applied as {}", row.description, short(applied_checksum)))
            }
            MigrationState::Unknown => ("UNKNOWN", format!("{} — not in this build", row.description)),
            MigrationState::Failed => ("FAILED", row.description.clone()),
        };
        let _ = writeln!(out, "{:04}     {state:<9} {:<19} {detail}", row.version, short(&row.checksum));
    }
    let pending = rows.iter().filter(|r| r.state == MigrationState::Pending).count();
    let applied = rows.len() - pending;
    let _ = writeln!(out, "{applied} applied, {pending} pending");
    out
}

/// Applies every pending migration. Returns the versions applied.
pub async fn up(url: &str) -> anyhow::Result<Vec<i64>> {
    let db = MigrationDb::open(url, true).await?;
    let result = async {
        let before = db.checked_status().await?;
        let pending: Vec<i64> = before.iter().filter(|r| !r.applied()).map(|r| r.version).collect();
        on_db!(db.pool()?, pool => db.migrator.run(pool).await)
            .with_context(|| format!("applying migrations {pending:?}"))?;
        Ok(pending)
    }
    .await;
    db.close().await;
    result
}

/// Applies every pending migration. Returns how many were applied.
pub async fn migrate_up(url: &str) -> anyhow::Result<usize> {
    Ok(up(url).await?.len())
}

/// Rolls back the last `count` applied migrations, newest first. Returns
/// the versions rolled back. Rolling back the event log itself while it holds
/// events needs `allow_data_loss`.
pub async fn down(url: &str, count: usize, allow_data_loss: bool) -> anyhow::Result<Vec<i64>> {
    let db = MigrationDb::open(url, true).await?;
    let result = async {
        let rows = db.checked_status().await?;
        let reverted = last_applied(&rows, count);
        for version in &reverted {
            anyhow::ensure!(
                db.down_script(*version).is_some(),
                "migration {version:04} has no down script; it cannot be rolled back"
            );
        }
        if reverted.contains(&EVENT_LOG_VERSION) && !allow_data_loss && db.holds_events().await? {
            anyhow::bail!(
                "rolling back migration {EVENT_LOG_VERSION:04} drops the event log, and it holds events: every \
                 registration and message would be lost. Back it up first (`privcomm export`, or pg_dump / a copy of \
                 the SQLite file), then pass --allow-data-loss"
            );
        }
        // sqlx rolls back everything above the target, newest first.
        let target = rows.iter().filter(|r| r.applied() && !reverted.contains(&r.version)).map(|r| r.version).max();
        if let Some(&lowest) = reverted.last() {
            on_db!(db.pool()?, pool => db.migrator.undo(pool, target.unwrap_or(0)).await)
                .with_context(|| format!("rolling back migrations {reverted:?} (down to {lowest:04})"))?;
        }
        Ok(reverted)
    }
    .await;
    db.close().await;
    result
}

/// The versions of the last `count` applied migrations, newest first.
fn last_applied(rows: &[MigrationStatus], count: usize) -> Vec<i64> {
    rows.iter().rev().filter(|r| r.applied()).take(count).map(|r| r.version).collect()
}

/// The SQL that `migrate up` (every pending migration) or `migrate down
/// count` would run, in order, each script headed by a comment. Executes
/// nothing; fails where `up` or `down` would refuse.
pub async fn sql(url: &str, direction: Direction, count: usize) -> anyhow::Result<String> {
    let db = MigrationDb::open(url, false).await?;
    let result = async {
        let rows = db.checked_status().await?;
        let scripts: Vec<&'static Migration> = match direction {
            Direction::Up => db.ups().filter(|m| rows.iter().any(|r| r.version == m.version && !r.applied())).collect(),
            Direction::Down => last_applied(&rows, count)
                .into_iter()
                .map(|v| db.down_script(v).with_context(|| format!("migration {v:04} has no down script")))
                .collect::<anyhow::Result<_>>()?,
        };
        let mut out = String::new();
        if scripts.is_empty() {
            let _ = writeln!(
                out,
                "-- nothing to run: {}",
                match direction {
                    Direction::Up => "no migration is pending",
                    Direction::Down => "no migration is applied",
                }
            );
        }
        for m in scripts {
            let way = if m.migration_type.is_up_migration() { "up" } else { "down" };
            let _ = writeln!(out, "-- {:04} {} ({way})", m.version, m.description);
            let _ = writeln!(out, "{}", m.sql.as_str().trim_end());
            let _ = writeln!(out);
        }
        Ok(out)
    }
    .await;
    db.close().await;
    result
}

/// How many migrations this build knows that `pool`'s database has not
/// applied yet; an error if an applied one was edited, is unknown, or failed.
pub async fn pending_postgres(pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    let db = MigrationDb { db: Some(ReadDb::Postgres(pool.clone())), migrator: &POSTGRES };
    let rows = db.checked_status().await?;
    Ok(rows.iter().filter(|r| !r.applied()).count())
}
