//! privcomm's read side: projection workers, replay for auditors, retention.
//!
//! Read models (key directory, mailbox, push tokens, identity-key history)
//! are folded from the event log. Each worker consumes the feed (a durable
//! JetStream consumer in cluster mode, the in-process bus in embedded mode),
//! applies events idempotently and stores its checkpoint in the same
//! transaction as its read-model change, so any model can be dropped and
//! rebuilt from the log. `privcomm replay` rebuilds them for auditors while
//! verifying the hash chain; the retention jobs (expiry, compaction) append
//! their decisions as events so a replay reproduces them.
//!
//! Status: the crate is in place with the domain dependency; the workers,
//! replay and retention land with the "Projections, auditor replay and
//! retention" issue. Nothing here is wired into `privcomm serve` yet.
