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

pub mod checkpoints;
pub mod export;
pub mod models;
pub mod replay;
pub mod retention;
pub mod rows;
pub mod store;
pub mod worker;
