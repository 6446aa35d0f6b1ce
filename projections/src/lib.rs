//! privcomm's read side: read models folded from the log, the workers that
//! keep them current, replay for auditors, and retention.
//!
//! - [`rows`]: read-model changes as data ([`rows::Op`]) and table checksums.
//! - [`models`]: the read models (key directory, mailbox, push tokens,
//!   identity-key history, event counts) as pure folds from events to ops.
//! - [`store`]: where the rows live — SQL on PostgreSQL or SQLite, or memory —
//!   each batch applied in one transaction with the model's checkpoint.
//!
//! Architecture invariant: every read model rebuilds from the log. Nothing
//! but a worker applying events writes a read-model table.

/// Runs the same body against whichever backend a [`store::ReadDb`] is:
/// `on_db!(db, pool => body)` binds `pool` to the PostgreSQL or SQLite pool.
/// The statements privcomm writes for read models are the same text on both.
#[macro_export]
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::store::ReadDb::Postgres($pool) => $body,
            $crate::store::ReadDb::Sqlite($pool) => $body,
        }
    };
}

pub mod checkpoints;
pub mod export;
pub mod models;
pub mod replay;
pub mod retention;
pub mod rows;
pub mod store;
pub mod worker;
