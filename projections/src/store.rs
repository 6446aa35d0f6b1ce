//! Where read models live: [`ReadStore`], with a SQL implementation for
//! PostgreSQL and SQLite ([`SqlReadStore`]) and an in-memory one for fast
//! tests ([`MemoryReadStore`]).
//!
//! Every batch is applied in one transaction together with the model's
//! checkpoint, after re-reading that checkpoint inside the transaction:
//! events at or below it are skipped, and an event that does not follow it
//! is refused as a gap. So a batch delivered twice, or by two workers at
//! once, is applied once, and a worker killed mid-batch leaves either all of
//! the batch or none of it behind.

use crate::models::{ReadModel, checkpoint_name, checkpoint_name_of};
use crate::rows::{Kind, KindTag, Op, Table, TableChecksum, Value};
use async_trait::async_trait;
use futures::TryStreamExt as _;
use privcomm_domain::events::DomainEvent;
use privcomm_domain::{Position, RecordedEvent};
use sqlx::Row as _;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

/// An event with its payload decoded once for every model.
#[derive(Clone, Debug)]
pub struct Decoded {
    /// The stored event.
    pub event: RecordedEvent,
    /// Its payload, or `None` where retention dropped it (allowed types only).
    pub domain: Option<DomainEvent>,
}

impl Decoded {
    /// Decodes `event`; a missing payload that retention may not drop, or
    /// one this build cannot read, is an error naming the position.
    pub fn new(event: RecordedEvent) -> Result<Decoded, ProjectionError> {
        let domain = DomainEvent::for_fold(&event)
            .map_err(|error| ProjectionError::Undecodable { position: event.position, reason: error.to_string() })?;
        Ok(Decoded { event, domain })
    }
}

/// Errors of the read side.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The next event is not the one after the model's checkpoint.
    #[error("read model {model} is at position {checkpoint} but was handed position {next}")]
    Gap {
        /// The model.
        model: &'static str,
        /// Its checkpoint.
        checkpoint: Position,
        /// What it was handed.
        next: Position,
    },
    /// An event the models cannot read (an unknown type, or a payload
    /// missing where retention may not drop it).
    #[error("event at position {position} cannot be projected: {reason}")]
    Undecodable {
        /// Where.
        position: Position,
        /// Why.
        reason: String,
    },
    /// A batch planned ahead found the model's checkpoint elsewhere than
    /// planned: something else is writing the model.
    #[error("read model {model} was planned from position {planned} but is at {found}; is another writer applying it?")]
    Moved {
        /// The model.
        model: &'static str,
        /// The checkpoint the plan started from.
        planned: Position,
        /// The checkpoint found.
        found: Position,
    },
    /// The read-model database failed.
    #[error("read-model storage failed")]
    Storage(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<sqlx::Error> for ProjectionError {
    fn from(error: sqlx::Error) -> Self {
        ProjectionError::Storage(Box::new(error))
    }
}

/// The part of a batch a model still has to apply: the operations and the
/// checkpoint after them.
pub fn plan(
    model: &dyn ReadModel,
    checkpoint: Position,
    batch: &[Decoded],
) -> Result<Option<(Vec<Op>, Position)>, ProjectionError> {
    let mut ops = Vec::new();
    let mut at = checkpoint;
    for decoded in batch.iter().filter(|d| d.event.position > checkpoint) {
        if decoded.event.position != at.next() {
            return Err(ProjectionError::Gap { model: model.name(), checkpoint: at, next: decoded.event.position });
        }
        model.apply(&decoded.event, decoded.domain.as_ref(), &mut ops);
        at = decoded.event.position;
    }
    Ok((at != checkpoint).then_some((merge_tallies(ops), at)))
}

/// One model's share of a batch, planned before its transaction by a
/// writer that owns the target (a replay), so that planning the next batch
/// overlaps writing this one. [`ReadStore::apply_planned`] checks that the
/// model is still at the checkpoint the plan started from before writing
/// anything.
#[derive(Debug)]
pub struct PlannedModel {
    model: &'static str,
    from: Position,
    to: Position,
    writes: Writes,
}

/// What a planned batch writes: SQL for a SQL store, ops for the one in memory.
#[derive(Debug)]
enum Writes {
    Ops(Vec<Op>),
    Sql(Vec<Statement>),
}

impl PlannedModel {
    /// The checkpoint after it.
    pub fn to(&self) -> Position {
        self.to
    }
}

/// Plans `model`'s share of `batch` from checkpoint `from`, for a store
/// that writes `dialect` (`None`: ops, for [`MemoryReadStore`]). `None`
/// when no event of the batch is after `from`.
pub fn plan_ahead(
    model: &dyn ReadModel,
    from: Position,
    batch: &[Decoded],
    dialect: Option<Dialect>,
) -> Result<Option<PlannedModel>, ProjectionError> {
    Ok(plan(model, from, batch)?.map(|(ops, to)| PlannedModel {
        model: model.name(),
        from,
        to,
        writes: match dialect {
            Some(d) => Writes::Sql(statements(ops, d)),
            None => Writes::Ops(ops),
        },
    }))
}

/// Counters add up in any order: where every op on a table is a tally, one
/// tally per key and column does what all of them did — one statement where
/// a batch of 1,000 events would otherwise run 1,000.
fn merge_tallies(ops: Vec<Op>) -> Vec<Op> {
    let not_only_tallies: std::collections::HashSet<&'static str> =
        ops.iter().filter(|op| !matches!(op, Op::Tally { .. })).map(|op| op_table(op).name).collect();
    let mut merged: Vec<Op> = Vec::with_capacity(ops.len());
    let mut index: HashMap<(&'static str, Vec<Value>, &'static str), usize> = HashMap::new();
    for op in ops {
        match op {
            Op::Tally { table, key, column, by } if !not_only_tallies.contains(table.name) => {
                match index.get(&(table.name, key.clone(), column)) {
                    Some(&at) => {
                        if let Op::Tally { by: total, .. } = &mut merged[at] {
                            *total += by;
                        }
                    }
                    None => {
                        index.insert((table.name, key.clone(), column), merged.len());
                        merged.push(Op::Tally { table, key, column, by });
                    }
                }
            }
            other => merged.push(other),
        }
    }
    merged
}

fn op_table(op: &Op) -> &'static Table {
    match op {
        Op::Upsert { table, .. }
        | Op::Update { table, .. }
        | Op::SetIfNull { table, .. }
        | Op::Increment { table, .. }
        | Op::Tally { table, .. }
        | Op::Delete { table, .. }
        | Op::DeleteWhere { table, .. } => table,
    }
}

/// Storage for read models and their checkpoints.
#[async_trait]
pub trait ReadStore: Send + Sync + 'static {
    /// Applies, for each `(model, events)`, the events after that model's
    /// checkpoint and its new checkpoint — all of it in one transaction.
    /// Returns each model's checkpoint after it.
    async fn apply(&self, work: &[(&dyn ReadModel, &[Decoded])]) -> Result<Vec<Position>, ProjectionError>;

    /// [`ReadStore::apply`] for one model.
    async fn apply_batch(&self, model: &dyn ReadModel, batch: &[Decoded]) -> Result<Position, ProjectionError> {
        let after = self.apply(&[(model, batch)]).await?;
        Ok(after.first().copied().unwrap_or(Position::START))
    }

    /// What [`plan_ahead`] should produce for this store: SQL of a
    /// dialect, or (`None`) ops.
    fn dialect(&self) -> Option<Dialect> {
        None
    }

    /// Applies batches planned by [`plan_ahead`] (for [`ReadStore::dialect`]),
    /// with their checkpoints, in one transaction — or, if any model's
    /// checkpoint is not where its plan started, nothing
    /// ([`ProjectionError::Moved`]).
    async fn apply_planned(&self, planned: Vec<PlannedModel>) -> Result<(), ProjectionError>;

    /// The model's checkpoint ([`Position::START`] before its first batch).
    async fn checkpoint(&self, model: &dyn ReadModel) -> Result<Position, ProjectionError>;

    /// The checksum of every row of `table`.
    async fn checksum(&self, table: &'static Table) -> Result<TableChecksum, ProjectionError>;

    /// Checkpoints and checksums of a model's tables read in one snapshot,
    /// so the pair is consistent while the worker keeps applying.
    async fn snapshot(&self, model: &dyn ReadModel) -> Result<ModelSnapshot, ProjectionError>;
}

/// A model's checkpoint with the checksums of its tables at that checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSnapshot {
    /// Checkpoint.
    pub checkpoint: Position,
    /// `(table, checksum)` in the model's table order.
    pub tables: Vec<(&'static str, TableChecksum)>,
}

// ---------------------------------------------------------------- in memory

type Rows = BTreeMap<Vec<Value>, Vec<Value>>;

/// Read models in memory: the reference implementation for fast tests.
#[derive(Default)]
pub struct MemoryReadStore {
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    tables: HashMap<&'static str, Rows>,
    checkpoints: HashMap<String, Position>,
}

impl MemoryReadStore {
    /// The rows of a table, by key.
    pub fn rows(&self, table: &Table) -> Vec<Vec<Value>> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.tables.get(table.name).map(|rows| rows.values().cloned().collect()).unwrap_or_default()
    }
}

fn column_index(table: &Table, name: &str) -> usize {
    table.columns.iter().position(|c| c.name == name).unwrap_or_else(|| panic!("{} has no column {name}", table.name))
}

fn apply_in_memory(tables: &mut HashMap<&'static str, Rows>, op: &Op) {
    match op {
        Op::Upsert { table, row } => {
            tables.entry(table.name).or_default().insert(row[..table.key_len].to_vec(), row.clone());
        }
        Op::Update { table, key, set } => {
            if let Some(row) = tables.entry(table.name).or_default().get_mut(key) {
                for (column, value) in set {
                    row[column_index(table, column)] = value.clone();
                }
            }
        }
        Op::SetIfNull { table, key, column, value } => {
            if let Some(row) = tables.entry(table.name).or_default().get_mut(key) {
                let cell = &mut row[column_index(table, column)];
                if matches!(cell, Value::Null(_)) {
                    *cell = value.clone();
                }
            }
        }
        Op::Increment { table, key, column, by } => {
            if let Some(row) = tables.entry(table.name).or_default().get_mut(key)
                && let Value::Int(current) = &mut row[column_index(table, column)]
            {
                *current += by;
            }
        }
        Op::Tally { table, key, column, by } => {
            let index = column_index(table, column);
            let row = tables.entry(table.name).or_default().entry(key.clone()).or_insert_with(|| {
                let mut row = key.clone();
                row.extend(table.columns[table.key_len..].iter().map(|_| Value::Int(0)));
                row
            });
            if let Value::Int(current) = &mut row[index] {
                *current += by;
            }
        }
        Op::Delete { table, key } => {
            tables.entry(table.name).or_default().retain(|k, _| !k.starts_with(key));
        }
        Op::DeleteWhere { table, column, value } => {
            let index = column_index(table, column);
            tables.entry(table.name).or_default().retain(|_, row| &row[index] != value);
        }
    }
}

#[async_trait]
impl ReadStore for MemoryReadStore {
    async fn apply(&self, work: &[(&dyn ReadModel, &[Decoded])]) -> Result<Vec<Position>, ProjectionError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // All or nothing, like a transaction: plan everything before changing anything.
        let mut planned = Vec::new();
        for (model, batch) in work {
            let name = checkpoint_name(*model);
            let checkpoint = state.checkpoints.get(&name).copied().unwrap_or(Position::START);
            planned.push((name, checkpoint, plan(*model, checkpoint, batch)?));
        }
        let mut after = Vec::new();
        for (name, checkpoint, plan) in planned {
            match plan {
                Some((ops, at)) => {
                    for op in &ops {
                        apply_in_memory(&mut state.tables, op);
                    }
                    state.checkpoints.insert(name, at);
                    after.push(at);
                }
                None => after.push(checkpoint),
            }
        }
        Ok(after)
    }

    async fn apply_planned(&self, planned: Vec<PlannedModel>) -> Result<(), ProjectionError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for model in &planned {
            let found = state.checkpoints.get(&checkpoint_name_of(model.model)).copied().unwrap_or(Position::START);
            if found != model.from {
                return Err(ProjectionError::Moved { model: model.model, planned: model.from, found });
            }
            if !matches!(model.writes, Writes::Ops(_)) {
                return Err(ProjectionError::Storage("SQL planned for the in-memory store".into()));
            }
        }
        for model in planned {
            let Writes::Ops(ops) = model.writes else { continue };
            for op in &ops {
                apply_in_memory(&mut state.tables, op);
            }
            state.checkpoints.insert(checkpoint_name_of(model.model), model.to);
        }
        Ok(())
    }

    async fn checkpoint(&self, model: &dyn ReadModel) -> Result<Position, ProjectionError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(state.checkpoints.get(&checkpoint_name(model)).copied().unwrap_or(Position::START))
    }

    async fn checksum(&self, table: &'static Table) -> Result<TableChecksum, ProjectionError> {
        let mut checksum = TableChecksum::default();
        for row in self.rows(table) {
            checksum.add_row(&row);
        }
        Ok(checksum)
    }

    async fn snapshot(&self, model: &dyn ReadModel) -> Result<ModelSnapshot, ProjectionError> {
        let checkpoint = self.checkpoint(model).await?;
        let mut tables = Vec::new();
        for table in model.tables() {
            tables.push((table.name, self.checksum(table).await?));
        }
        Ok(ModelSnapshot { checkpoint, tables })
    }
}

// ---------------------------------------------------------------- SQL

/// A read-model database: the event store's own database in `privcomm
/// serve`, or a fresh one for `privcomm replay`.
#[derive(Clone, Debug)]
pub enum ReadDb {
    /// PostgreSQL (cluster mode).
    Postgres(sqlx::PgPool),
    /// SQLite (embedded mode, replays).
    Sqlite(sqlx::SqlitePool),
}

/// Read models in SQL. The statements are the same text on both backends
/// (`$n` parameters, `ON CONFLICT … DO UPDATE`); only row locking differs.
pub struct SqlReadStore {
    db: ReadDb,
}

impl SqlReadStore {
    /// Read models in `db` (migrated: migration 0004 creates the tables).
    pub fn new(db: ReadDb) -> SqlReadStore {
        SqlReadStore { db }
    }

    /// The database.
    pub fn db(&self) -> &ReadDb {
        &self.db
    }
}

/// How a backend spells parameter `n` (1-based). PostgreSQL numbers them
/// (`$n`); SQLite gets anonymous `?` in order, because sqlx looks up every
/// named or numbered SQLite parameter by name, which costs quadratic time in
/// a multi-row statement (measured: 14 % of a replay's CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `$1, $2, …`
    Postgres,
    /// `?, ?, …` (parameters are bound in order)
    Sqlite,
}

impl Dialect {
    fn param(self, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("${n}"),
            Dialect::Sqlite => "?".to_owned(),
        }
    }

    /// Locks the selected row until the transaction ends. SQLite has one
    /// writer at a time, and the transaction's first write takes the lock.
    fn lock_row(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        }
    }

    fn type_of(self, kind: Kind) -> &'static str {
        match (self, kind) {
            (Dialect::Postgres, Kind::Int) => "bigint",
            (Dialect::Postgres, Kind::Text) => "text",
            (Dialect::Postgres, Kind::Bytes) => "bytea",
            (Dialect::Sqlite, Kind::Int) => "INTEGER",
            (Dialect::Sqlite, Kind::Text) => "TEXT",
            (Dialect::Sqlite, Kind::Bytes) => "BLOB",
        }
    }
}

fn key_condition(table: &Table, key_len: usize, first: usize, d: Dialect) -> String {
    table.columns[..key_len]
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{} = {}", c.name, d.param(first + i)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Most values bound to one statement: far below the backends' limits, because
/// binding cost grows faster than linearly with the count (measured).
const MAX_PARAMETERS: usize = 2_000;

/// The statements for a batch of ops, in order. A run of consecutive upserts
/// into one table becomes multi-row `INSERT … ON CONFLICT` statements — one
/// round trip for hundreds of rows. Within a run the last row for a key
/// wins, as it would one statement at a time (and PostgreSQL refuses one
/// statement that touches a row twice). The ops' values move into the
/// statements' parameters; nothing is copied.
pub fn statements(ops: Vec<Op>, d: Dialect) -> Vec<Statement> {
    let ops = fold_into_upserts(ops);
    // Ops that each address one whole key, all keys distinct, commute: a
    // segment of them is written grouped by kind and table. First find the
    // segments (borrowing the keys), then move the ops into statements.
    let mut pieces: Vec<(usize, bool)> = Vec::new(); // (end, is a segment)
    {
        let mut seen: HashSet<(&'static str, &[Value])> = HashSet::new();
        let mut start = 0;
        for (index, op) in ops.iter().enumerate() {
            match exact_key(op) {
                Some(key) if seen.insert(key) => {}
                Some(key) => {
                    pieces.push((index, true));
                    seen.clear();
                    seen.insert(key);
                    start = index;
                }
                None => {
                    if index > start {
                        pieces.push((index, true));
                    }
                    pieces.push((index + 1, false));
                    seen.clear();
                    start = index + 1;
                }
            }
        }
        if ops.len() > start {
            pieces.push((ops.len(), true));
        }
    }
    let mut out = Vec::new();
    let mut ops = ops.into_iter();
    let mut at = 0;
    for (end, segment) in pieces {
        let taken: Vec<Op> = ops.by_ref().take(end - at).collect();
        at = end;
        if segment {
            write_segment(taken, &mut out, d);
        } else {
            out.extend(taken.into_iter().map(|op| one_by_one(statement(op, d))));
        }
    }
    out
}

/// The table and full key an op addresses, if it addresses exactly one key.
fn exact_key(op: &Op) -> Option<(&'static str, &[Value])> {
    match op {
        Op::Upsert { table, row } => Some((table.name, &row[..table.key_len])),
        Op::Update { table, key, .. }
        | Op::SetIfNull { table, key, .. }
        | Op::Increment { table, key, .. }
        | Op::Tally { table, key, .. }
        | Op::Delete { table, key }
            if key.len() == table.key_len =>
        {
            Some((table.name, key.as_slice()))
        }
        _ => None,
    }
}

fn key_hash(table: &'static str, key: &[Value]) -> u64 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    static SEED: std::sync::LazyLock<std::collections::hash_map::RandomState> =
        std::sync::LazyLock::new(Default::default);
    let mut hasher = SEED.build_hasher();
    table.hash(&mut hasher);
    key.hash(&mut hasher);
    hasher.finish()
}

/// Applies updates, increments and set-if-null to a row upserted earlier in
/// the same batch, so the pair is one row written once (an accepted message
/// acked before its batch was applied is never written as pending).
fn fold_into_upserts(ops: Vec<Op>) -> Vec<Op> {
    let folds = |op: &Op| matches!(op, Op::Update { .. } | Op::Increment { .. } | Op::SetIfNull { .. });
    if !ops.iter().any(folds) {
        return ops;
    }
    let mut out: Vec<Op> = Vec::with_capacity(ops.len());
    // Upserted keys by hash (collisions are told apart by comparing keys).
    let mut upserted: HashMap<u64, Vec<usize>> = HashMap::new();
    for op in ops {
        let found = match &op {
            Op::Update { table, key, .. } | Op::Increment { table, key, .. } | Op::SetIfNull { table, key, .. } => {
                // The latest upsert of the key, as one statement at a time would see it.
                upserted.get(&key_hash(table.name, key)).and_then(|candidates| {
                    candidates.iter().rev().copied().find(|&at| {
                        matches!(&out[at], Op::Upsert { table: t, row } if t.name == table.name && row[..t.key_len] == key[..])
                    })
                })
            }
            _ => None,
        };
        if let Some(at) = found
            && let Op::Upsert { table, row } = &mut out[at]
        {
            match op {
                Op::Update { set, .. } => {
                    for (column, value) in set {
                        row[column_index(table, column)] = value;
                    }
                }
                Op::Increment { column, by, .. } => {
                    if let Value::Int(current) = &mut row[column_index(table, column)] {
                        *current += by;
                    }
                }
                Op::SetIfNull { column, value, .. } => {
                    let cell = &mut row[column_index(table, column)];
                    if matches!(cell, Value::Null(_)) {
                        *cell = value;
                    }
                }
                _ => {}
            }
            continue;
        }
        match &op {
            Op::Upsert { table, row } => {
                upserted.entry(key_hash(table.name, &row[..table.key_len])).or_default().push(out.len());
            }
            // Anything else that may touch upserted rows ends folding into them.
            Op::Delete { table, .. } | Op::DeleteWhere { table, .. } | Op::Tally { table, .. } => {
                let name = table.name;
                upserted.retain(|_, candidates| {
                    candidates.retain(|&at| !matches!(&out[at], Op::Upsert { table, .. } if table.name == name));
                    !candidates.is_empty()
                });
            }
            _ => {}
        }
        out.push(op);
    }
    out
}

/// Writes a segment of single-key ops on distinct keys: upserts as
/// multi-row inserts, updates of the same columns as multi-row updates,
/// the rest one by one.
fn write_segment(segment: Vec<Op>, out: &mut Vec<Statement>, d: Dialect) {
    let mut upserts: Vec<(&'static Table, Vec<Vec<Value>>)> = Vec::new();
    let mut updates: Vec<(&'static Table, Vec<&'static str>, Vec<UpdateRow>)> = Vec::new();
    let mut rest = Vec::new();
    for op in segment {
        match op {
            Op::Upsert { table, row } => match upserts.iter_mut().find(|(t, _)| t.name == table.name) {
                Some((_, rows)) => rows.push(row),
                None => upserts.push((table, vec![row])),
            },
            Op::Update { table, key, set } => {
                let (columns, values): (Vec<&'static str>, Vec<Value>) = set.into_iter().unzip();
                match updates.iter_mut().find(|(t, c, _)| t.name == table.name && *c == columns) {
                    Some((_, _, rows)) => rows.push((key, values)),
                    None => updates.push((table, columns, vec![(key, values)])),
                }
            }
            other => rest.push(other),
        }
    }
    for (table, rows) in upserts {
        if d == Dialect::Postgres && rows.len() > 1 {
            out.push(unnest_upsert(table, rows));
            continue;
        }
        let per_statement = (MAX_PARAMETERS / table.columns.len()).max(1);
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            out.push(one_by_one(multi_row_upsert(table, rows.by_ref().take(per_statement).collect(), d)));
        }
    }
    for (table, columns, rows) in updates {
        if d == Dialect::Postgres && rows.len() > 1 {
            out.push(unnest_update(table, &columns, rows));
            continue;
        }
        let per_statement = (MAX_PARAMETERS / (table.key_len + columns.len())).max(1);
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            out.push(one_by_one(multi_row_update(table, &columns, rows.by_ref().take(per_statement).collect(), d)));
        }
    }
    out.extend(rest.into_iter().map(|op| one_by_one(statement(op, d))));
}

/// A statement's SQL and what it binds, in order.
pub type Statement = (String, Vec<Param>);

/// What a statement binds to one placeholder.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    /// One value.
    One(Value),
    /// A column of a multi-row statement, bound as one PostgreSQL array of
    /// this kind.
    Column(Kind, Vec<Value>),
}

fn one_by_one((sql, values): (String, Vec<Value>)) -> Statement {
    (sql, values.into_iter().map(Param::One).collect())
}

/// Rows as columns: the `i`th vector holds every row's `i`th value.
fn transpose(rows: Vec<Vec<Value>>, width: usize) -> Vec<Vec<Value>> {
    let mut columns: Vec<Vec<Value>> = (0..width).map(|_| Vec::with_capacity(rows.len())).collect();
    for row in rows {
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value);
        }
    }
    columns
}

/// `CAST($1 AS text[]), CAST($2 AS bigint[]), …` for these kinds.
fn array_params(kinds: &[Kind]) -> String {
    let d = Dialect::Postgres;
    let casts: Vec<String> = kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| format!("CAST({} AS {}[])", d.param(i + 1), d.type_of(*kind)))
        .collect();
    casts.join(", ")
}

/// PostgreSQL: a multi-row upsert with each column bound as one array and
/// `unnest`ed, so that its text (one per table) is prepared once per
/// connection and planned generically, whatever the row count, where a
/// `VALUES` list of N rows is a new statement to parse and plan for every N.
fn unnest_upsert(table: &'static Table, rows: Vec<Vec<Value>>) -> Statement {
    let sql = cached_sql((table.name, Vec::new(), 0, Dialect::Postgres), || {
        let columns: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
        let kinds: Vec<Kind> = table.columns.iter().map(|c| c.kind).collect();
        format!(
            "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT ({}) {}",
            table.name,
            columns.join(", "),
            array_params(&kinds),
            table.key().iter().map(|c| c.name).collect::<Vec<_>>().join(", "),
            on_conflict(table)
        )
    });
    let columns = transpose(rows, table.columns.len());
    (sql, table.columns.iter().zip(columns).map(|(c, values)| Param::Column(c.kind, values)).collect())
}

/// PostgreSQL: a multi-row update of the same columns, as [`unnest_upsert`].
fn unnest_update(table: &'static Table, columns: &[&'static str], rows: Vec<UpdateRow>) -> Statement {
    let shape = UpdateShape::of(table, columns);
    let kinds = shape.kinds.clone();
    let sql = cached_sql((table.name, columns.to_vec(), 0, Dialect::Postgres), || {
        format!(
            "UPDATE {} SET {} FROM unnest({}) AS v ({}) WHERE {}",
            table.name,
            shape.assignments,
            array_params(&shape.kinds),
            shape.names,
            shape.matches
        )
    });
    let rows = rows.into_iter().map(|(key, set)| key.into_iter().chain(set).collect()).collect();
    (sql, kinds.iter().zip(transpose(rows, kinds.len())).map(|(kind, values)| Param::Column(*kind, values)).collect())
}

/// `DO UPDATE SET` every non-key column (`DO NOTHING` if there is none).
fn on_conflict(table: &Table) -> String {
    let updates: Vec<String> =
        table.columns[table.key_len..].iter().map(|c| format!("{0} = excluded.{0}", c.name)).collect();
    if updates.is_empty() { "DO NOTHING".to_owned() } else { format!("DO UPDATE SET {}", updates.join(", ")) }
}

/// One row of a multi-row update: its key, and the new values of the updated columns.
type UpdateRow = (Vec<Value>, Vec<Value>);

/// The parts of a multi-row update of `columns` of a table, joined with
/// its rows as `v`: the key's and the columns' kinds and names, `c = v.c`
/// for each column, `table.k = v.k` for each key column.
struct UpdateShape {
    kinds: Vec<Kind>,
    names: String,
    assignments: String,
    matches: String,
}

impl UpdateShape {
    fn of(table: &Table, columns: &[&'static str]) -> UpdateShape {
        let kinds = table
            .key()
            .iter()
            .map(|c| c.kind)
            .chain(columns.iter().map(|c| table.column(c).map_or(Kind::Text, |c| c.kind)))
            .collect();
        let names: Vec<&str> = table.key().iter().map(|c| c.name).chain(columns.iter().copied()).collect();
        let assignments: Vec<String> = columns.iter().map(|c| format!("{c} = v.{c}")).collect();
        let matches: Vec<String> = table.key().iter().map(|c| format!("{0}.{1} = v.{1}", table.name, c.name)).collect();
        UpdateShape {
            kinds,
            names: names.join(", "),
            assignments: assignments.join(", "),
            matches: matches.join(" AND "),
        }
    }
}

/// SQL text of multi-row statements by shape: a replay writes thousands of
/// statements of a few shapes, and formatting hundreds of placeholders
/// each time cost more than executing them. Bounded: a shape is a table,
/// its updated columns and a row count up to [`MAX_PARAMETERS`] (0 for
/// PostgreSQL's array statements, whose text fits any count).
fn cached_sql(shape: (&'static str, Vec<&'static str>, usize, Dialect), build: impl FnOnce() -> String) -> String {
    type Shapes = HashMap<(&'static str, Vec<&'static str>, usize, Dialect), String>;
    static SQL: std::sync::LazyLock<Mutex<Shapes>> = std::sync::LazyLock::new(Default::default);
    let mut cache = SQL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    cache.entry(shape).or_insert_with(build).clone()
}

fn multi_row_update(
    table: &'static Table,
    columns: &[&'static str],
    rows: Vec<UpdateRow>,
    d: Dialect,
) -> (String, Vec<Value>) {
    if rows.len() == 1 {
        let (key, values) = rows.into_iter().next().unwrap_or_default();
        let set = columns.iter().copied().zip(values).collect();
        return statement(Op::Update { table, key, set }, d);
    }
    let sql = cached_sql((table.name, columns.to_vec(), rows.len(), d), || {
        let shape = UpdateShape::of(table, columns);
        let width = shape.kinds.len();
        let tuples: Vec<String> = (0..rows.len())
            .map(|r| {
                let cells: Vec<String> = shape
                    .kinds
                    .iter()
                    .enumerate()
                    .map(|(c, kind)| format!("CAST({} AS {})", d.param(r * width + c + 1), d.type_of(*kind)))
                    .collect();
                format!("({})", cells.join(", "))
            })
            .collect();
        format!(
            "WITH v ({}) AS (VALUES {}) UPDATE {} SET {} FROM v WHERE {}",
            shape.names,
            tuples.join(", "),
            table.name,
            shape.assignments,
            shape.matches
        )
    });
    let values = rows.into_iter().flat_map(|(key, set)| key.into_iter().chain(set)).collect();
    (sql, values)
}

fn multi_row_upsert(table: &'static Table, rows: Vec<Vec<Value>>, d: Dialect) -> (String, Vec<Value>) {
    let sql = cached_sql((table.name, Vec::new(), rows.len(), d), || {
        let width = table.columns.len();
        let columns: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
        let tuples: Vec<String> = (0..rows.len())
            .map(|r| format!("({})", (1..=width).map(|c| d.param(r * width + c)).collect::<Vec<_>>().join(", ")))
            .collect();
        let keys: Vec<&str> = table.key().iter().map(|c| c.name).collect();
        format!(
            "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) {}",
            table.name,
            columns.join(", "),
            tuples.join(", "),
            keys.join(", "),
            on_conflict(table)
        )
    });
    (sql, rows.into_iter().flatten().collect())
}

/// The statement for an op and the values to bind, in order.
pub fn statement(op: Op, d: Dialect) -> (String, Vec<Value>) {
    match op {
        Op::Upsert { table, row } => multi_row_upsert(table, vec![row], d),
        Op::Update { table, key, set } => {
            let assignments: Vec<String> =
                set.iter().enumerate().map(|(i, (column, _))| format!("{column} = {}", d.param(i + 1))).collect();
            let sql = format!(
                "UPDATE {} SET {} WHERE {}",
                table.name,
                assignments.join(", "),
                key_condition(table, key.len(), set.len() + 1, d)
            );
            let mut values: Vec<Value> = set.into_iter().map(|(_, v)| v).collect();
            values.extend(key);
            (sql, values)
        }
        Op::SetIfNull { table, key, column, value } => {
            let sql = format!(
                "UPDATE {0} SET {column} = COALESCE({column}, {2}) WHERE {1}",
                table.name,
                key_condition(table, key.len(), 2, d),
                d.param(1)
            );
            let mut values = vec![value];
            values.extend(key);
            (sql, values)
        }
        Op::Increment { table, key, column, by } => {
            let sql = format!(
                "UPDATE {0} SET {column} = {column} + {2} WHERE {1}",
                table.name,
                key_condition(table, key.len(), 2, d),
                d.param(1)
            );
            let mut values = vec![Value::Int(by)];
            values.extend(key);
            (sql, values)
        }
        Op::Tally { table, key, column, by } => {
            let keys: Vec<&str> = table.key().iter().map(|c| c.name).collect();
            let params: Vec<String> = (1..=keys.len() + 1).map(|i| d.param(i)).collect();
            let sql = format!(
                "INSERT INTO {0} ({1}, {column}) VALUES ({2}) ON CONFLICT ({1}) DO UPDATE SET {column} = {0}.{column} + excluded.{column}",
                table.name,
                keys.join(", "),
                params.join(", ")
            );
            let mut values = key;
            values.push(Value::Int(by));
            (sql, values)
        }
        Op::Delete { table, key } => {
            (format!("DELETE FROM {} WHERE {}", table.name, key_condition(table, key.len(), 1, d)), key)
        }
        Op::DeleteWhere { table, column, value } => {
            (format!("DELETE FROM {} WHERE {column} = {}", table.name, d.param(1)), vec![value])
        }
    }
}

/// Binds one value to a query of either backend.
macro_rules! bind_value {
    ($query:expr, $value:expr) => {
        match $value {
            Value::Int(v) => $query.bind(*v),
            Value::Text(v) => $query.bind(v.as_str()),
            Value::Bytes(v) => $query.bind(v.as_slice()),
            Value::Null(KindTag::Int) => $query.bind(None::<i64>),
            Value::Null(KindTag::Text) => $query.bind(None::<&str>),
            Value::Null(KindTag::Bytes) => $query.bind(None::<&[u8]>),
        }
    };
}

/// A column's values as an array's elements (NULL as `None`); a value of
/// another kind is refused, as a mistyped single parameter would be.
fn array_of<'q, T>(
    values: &'q [Value],
    cell: impl Fn(&'q Value) -> Option<T>,
) -> Result<Vec<Option<T>>, ProjectionError> {
    values
        .iter()
        .map(|value| match value {
            Value::Null(_) => Ok(None),
            other => cell(other)
                .map(Some)
                .ok_or_else(|| ProjectionError::Storage(format!("{other:?} in an array of another kind").into())),
        })
        .collect()
}

/// A statement's parameters bound to a query of one backend.
trait BindParams<'q>: Sized {
    fn bind_params(self, params: &'q [Param]) -> Result<Self, ProjectionError>;
}

impl<'q> BindParams<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind_params(mut self, params: &'q [Param]) -> Result<Self, ProjectionError> {
        for param in params {
            self = match param {
                Param::One(value) => bind_value!(self, value),
                Param::Column(Kind::Int, values) => {
                    self.bind(array_of(values, |v| if let Value::Int(v) = v { Some(*v) } else { None })?)
                }
                Param::Column(Kind::Text, values) => {
                    self.bind(array_of(values, |v| if let Value::Text(v) = v { Some(v.as_str()) } else { None })?)
                }
                Param::Column(Kind::Bytes, values) => {
                    self.bind(array_of(values, |v| if let Value::Bytes(v) = v { Some(v.as_slice()) } else { None })?)
                }
            };
        }
        Ok(self)
    }
}

impl<'q> BindParams<'q> for sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    fn bind_params(mut self, params: &'q [Param]) -> Result<Self, ProjectionError> {
        for param in params {
            self = match param {
                Param::One(value) => bind_value!(self, value),
                Param::Column(..) => return Err(ProjectionError::Storage("SQLite has no array parameters".into())),
            };
        }
        Ok(self)
    }
}

/// Reads one column of a row of either backend as a [`Value`].
macro_rules! read_value {
    ($row:expr, $index:expr, $column:expr) => {{
        let column = $column;
        match column.kind {
            Kind::Int => $row.try_get::<Option<i64>, _>($index)?.map_or(Value::Null(KindTag::Int), Value::Int),
            Kind::Text => $row.try_get::<Option<String>, _>($index)?.map_or(Value::Null(KindTag::Text), Value::Text),
            Kind::Bytes => {
                $row.try_get::<Option<Vec<u8>>, _>($index)?.map_or(Value::Null(KindTag::Bytes), Value::Bytes)
            }
        }
    }};
}

/// Streams every row of a table through a checksum, on one connection.
macro_rules! checksum_on {
    ($connection:expr, $table:expr) => {{
        let table: &'static Table = $table;
        let columns: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
        let sql = format!("SELECT {} FROM {}", columns.join(", "), table.name);
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch($connection);
        let mut checksum = TableChecksum::default();
        let mut values = Vec::with_capacity(table.columns.len());
        let result: Result<TableChecksum, ProjectionError> = async {
            while let Some(row) = rows.try_next().await? {
                values.clear();
                for (index, column) in table.columns.iter().enumerate() {
                    values.push(read_value!(row, index, column));
                }
                checksum.add_row(&values);
            }
            Ok(checksum)
        }
        .await;
        result
    }};
}

const ENSURE_CHECKPOINT: &str =
    "INSERT INTO checkpoints (name, position, updated_at_us) VALUES ($1, 0, 0) ON CONFLICT (name) DO NOTHING";
const SAVE_CHECKPOINT: &str = "UPDATE checkpoints SET position = $1, updated_at_us = $2 WHERE name = $3";

fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or_default()
}

/// Begins a read-model transaction. On PostgreSQL it turns off hash and
/// merge joins for the transaction: PostgreSQL plans a multi-row `UPDATE …
/// FROM` of a few hundred keys as a hash join over a sequential
/// scan of the whole table (measured: 24 ms for 400 keys in a 100,000-row
/// mailbox, and growing with it; under the relay load run the mailbox
/// model fell seconds behind), where each key has an index and a nested
/// loop over it takes 6 ms whatever the table's size.
macro_rules! begin_read_model_tx {
    ($pool:expr, $dialect:expr) => {{
        let mut tx = $pool.begin().await?;
        if $dialect == Dialect::Postgres {
            sqlx::query(KEYED_JOINS).execute(&mut *tx).await?;
        }
        tx
    }};
}

const KEYED_JOINS: &str =
    "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)";

/// Creates the model's checkpoint row if missing and reads it, locked
/// until the transaction ends.
macro_rules! lock_checkpoint {
    ($tx:expr, $model:expr, $dialect:expr) => {{
        let name = checkpoint_name_of($model);
        sqlx::query(ENSURE_CHECKPOINT).bind(&name).execute(&mut *$tx).await?;
        let select = format!("SELECT position FROM checkpoints WHERE name = $1{}", $dialect.lock_row());
        let stored: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(select)).bind(&name).fetch_one(&mut *$tx).await?;
        Position(stored as u64)
    }};
}

/// Runs a planned model's statements and saves its new checkpoint.
macro_rules! write_planned {
    ($tx:expr, $planned:expr) => {{
        let planned: PlannedModel = $planned;
        let Writes::Sql(statements) = planned.writes else {
            return Err(ProjectionError::Storage("ops planned for a SQL store".into()));
        };
        for (sql, values) in statements {
            sqlx::query(sqlx::AssertSqlSafe(sql)).bind_params(&values)?.execute(&mut *$tx).await?;
        }
        sqlx::query(SAVE_CHECKPOINT)
            .bind(planned.to.0 as i64)
            .bind(now_us())
            .bind(checkpoint_name_of(planned.model))
            .execute(&mut *$tx)
            .await?;
    }};
}

impl SqlReadStore {
    fn sql_dialect(&self) -> Dialect {
        match self.db {
            ReadDb::Postgres(_) => Dialect::Postgres,
            ReadDb::Sqlite(_) => Dialect::Sqlite,
        }
    }
}

#[async_trait]
impl ReadStore for SqlReadStore {
    async fn apply(&self, work: &[(&dyn ReadModel, &[Decoded])]) -> Result<Vec<Position>, ProjectionError> {
        let dialect = self.sql_dialect();
        on_db!(&self.db, pool => {
            let mut tx = begin_read_model_tx!(pool, dialect);
            let mut after = Vec::with_capacity(work.len());
            let mut changed = false;
            for (model, batch) in work {
                let checkpoint = lock_checkpoint!(tx, model.name(), dialect);
                match plan_ahead(*model, checkpoint, batch, Some(dialect))? {
                    Some(planned) => {
                        after.push(planned.to);
                        write_planned!(tx, planned);
                        changed = true;
                    }
                    None => after.push(checkpoint),
                }
            }
            if changed {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            Ok(after)
        })
    }

    fn dialect(&self) -> Option<Dialect> {
        Some(self.sql_dialect())
    }

    async fn apply_planned(&self, planned: Vec<PlannedModel>) -> Result<(), ProjectionError> {
        let dialect = self.sql_dialect();
        on_db!(&self.db, pool => {
            let mut tx = begin_read_model_tx!(pool, dialect);
            for model in planned {
                let found = lock_checkpoint!(tx, model.model, dialect);
                if found != model.from {
                    // Dropping the transaction rolls it back: nothing written.
                    return Err(ProjectionError::Moved { model: model.model, planned: model.from, found });
                }
                write_planned!(tx, model);
            }
            tx.commit().await?;
            Ok(())
        })
    }

    async fn checkpoint(&self, model: &dyn ReadModel) -> Result<Position, ProjectionError> {
        let name = checkpoint_name(model);
        let sql = "SELECT position FROM checkpoints WHERE name = $1";
        let stored: Option<i64> = on_db!(&self.db, pool => {
            sqlx::query_scalar(sql).bind(&name).fetch_optional(pool).await?
        });
        Ok(Position(stored.unwrap_or(0) as u64))
    }

    async fn checksum(&self, table: &'static Table) -> Result<TableChecksum, ProjectionError> {
        on_db!(&self.db, pool => {
            let mut connection = pool.acquire().await?;
            checksum_on!(&mut *connection, table)
        })
    }

    async fn snapshot(&self, model: &dyn ReadModel) -> Result<ModelSnapshot, ProjectionError> {
        let name = checkpoint_name(model);
        on_db!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            if matches!(self.db, ReadDb::Postgres(_)) {
                // One snapshot for the checkpoint and every table read after it.
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
            }
            let stored: Option<i64> = sqlx::query_scalar("SELECT position FROM checkpoints WHERE name = $1")
                .bind(&name)
                .fetch_optional(&mut *tx)
                .await?;
            let mut tables = Vec::new();
            for table in model.tables() {
                tables.push((table.name, checksum_on!(&mut *tx, table)?));
            }
            tx.commit().await?;
            Ok(ModelSnapshot { checkpoint: Position(stored.unwrap_or(0) as u64), tables })
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::{self, EVENT_COUNTS, MAILBOX};
    use privcomm_domain::events::Bytes;
    use privcomm_domain::memory::InMemoryEventStore;
    use privcomm_domain::{AppendRequest, EventStore as _, ExpectedVersion, MessageId, StreamId, UserId};

    pub(crate) async fn log_with_messages(n: u128) -> Vec<Decoded> {
        let clock = std::sync::Arc::new(privcomm_domain::clock::ManualClock::new(privcomm_domain::Timestamp(1_000)));
        let store = InMemoryEventStore::new(clock);
        for i in 0..n {
            let recipient = UserId(uuid::Uuid::from_u128(i % 3 + 1));
            let accepted = DomainEvent::MessageAccepted {
                message_id: MessageId(uuid::Uuid::from_u128(100 + i)),
                sender: UserId(uuid::Uuid::from_u128(9)),
                recipient,
                kind: "whisper".into(),
                body: Bytes(vec![i as u8; 10]),
            };
            let mut events = vec![accepted];
            if i % 2 == 0 {
                events.push(DomainEvent::MessageDelivered {
                    message_id: MessageId(uuid::Uuid::from_u128(100 + i)),
                    recipient,
                });
            }
            let events = events
                .iter()
                .map(|e| {
                    e.to_new_event(privcomm_domain::mailbox::event_id(e).expect("mailbox event")).expect("encodes")
                })
                .collect();
            let request =
                AppendRequest { stream_id: StreamId::for_mailbox(recipient), expected: ExpectedVersion::Any, events };
            store.append(request).await.expect("appends");
        }
        let events = store.read_all(Position::START, 10_000).await.expect("reads");
        events.into_iter().map(|e| Decoded::new(e).expect("decodes")).collect()
    }

    /// Every model with all of `log` applied in one batch: the reference result.
    pub(crate) async fn applied_at_once(log: &[Decoded]) -> MemoryReadStore {
        let whole = MemoryReadStore::default();
        for model in models::all() {
            whole.apply_batch(model.as_ref(), log).await.expect("applies");
        }
        whole
    }

    #[tokio::test]
    async fn batches_of_any_size_and_redeliveries_give_the_same_rows() {
        let log = log_with_messages(30).await;
        let whole = applied_at_once(&log).await;
        let piecewise = MemoryReadStore::default();
        for model in models::all() {
            // Overlapping chunks: each event after the first chunk is delivered twice.
            for start in (0..log.len()).step_by(7) {
                let end = (start + 10).min(log.len());
                piecewise.apply_batch(model.as_ref(), &log[..end][start..]).await.expect("applies");
            }
        }
        for table in [&MAILBOX, &EVENT_COUNTS] {
            assert_eq!(whole.checksum(table).await.expect("sum"), piecewise.checksum(table).await.expect("sum"));
        }
        assert_eq!(whole.rows(&MAILBOX).iter().filter(|r| r[7] == Value::Null(KindTag::Text)).count(), 15);
        assert_eq!(
            whole.rows(&EVENT_COUNTS),
            vec![
                vec![Value::text("MessageAccepted"), Value::Int(30)],
                vec![Value::text("MessageDelivered"), Value::Int(15)],
            ]
        );
        // A batch that skips an event is refused.
        let gap = MemoryReadStore::default();
        let error = gap.apply_batch(&models::EventCounts, &log[1..]).await.expect_err("gap");
        assert!(matches!(error, ProjectionError::Gap { next: Position(2), .. }), "{error}");
    }

    #[test]
    fn single_key_ops_on_distinct_keys_are_grouped_and_a_repeated_key_keeps_its_order() {
        let row =
            |key: &str, value: i64| Op::Upsert { table: &EVENT_COUNTS, row: vec![Value::text(key), Value::Int(value)] };
        let delete = Op::Delete { table: &EVENT_COUNTS, key: vec![Value::text("b")] };
        let ops = vec![row("a", 1), row("b", 2), row("a", 3), delete, row("c", 4)];
        let written = statements(ops.clone(), Dialect::Postgres);
        assert_eq!(written.len(), 3, "{written:?}");
        assert_eq!(
            written[0].0,
            "INSERT INTO rm_event_counts (event_type, events) SELECT * FROM unnest(CAST($1 AS text[]), \
             CAST($2 AS bigint[])) ON CONFLICT (event_type) DO UPDATE SET events = excluded.events"
        );
        let columns = |keys: [&str; 2], counts: [i64; 2]| {
            vec![
                Param::Column(Kind::Text, keys.into_iter().map(Value::text).collect()),
                Param::Column(Kind::Int, counts.into_iter().map(Value::Int).collect()),
            ]
        };
        assert_eq!(written[0].1, columns(["a", "b"], [1, 2]));
        assert_eq!(written[1].0, written[0].0, "one statement text whatever the row count");
        assert_eq!(written[1].1, columns(["a", "c"], [3, 4]));
        assert!(written[2].0.starts_with("DELETE FROM rm_event_counts"));
        let sqlite = statements(ops, Dialect::Sqlite);
        assert!(sqlite[0].0.contains("VALUES (?, ?), (?, ?)"), "{}", sqlite[0].0);
        let one = |value| Param::One(value);
        assert_eq!(
            sqlite[0].1,
            vec![one(Value::text("a")), one(Value::Int(1)), one(Value::text("b")), one(Value::Int(2))]
        );
    }

    #[test]
    fn an_update_of_a_row_upserted_in_the_same_batch_is_folded_into_it() {
        let key = vec![Value::text("r"), Value::text("m")];
        let mut row = key.clone();
        row.extend([Value::Int(5), Value::text("s"), Value::text("k"), Value::Int(9), Value::Int(1)]);
        row.extend([Value::Null(KindTag::Text), Value::Null(KindTag::Int)]);
        let settle = vec![("settled", Value::text("delivered")), ("settled_at_us", Value::Int(2))];
        let other = vec![Value::text("r"), Value::text("n")];
        let ops = vec![
            Op::Upsert { table: &MAILBOX, row: row.clone() },
            Op::Update { table: &MAILBOX, key: other.clone(), set: settle.clone() },
            Op::Update { table: &MAILBOX, key: key.clone(), set: settle.clone() },
        ];
        let folded = fold_into_upserts(ops.clone());
        let mut settled = row.clone();
        settled[7] = Value::text("delivered");
        settled[8] = Value::Int(2);
        assert_eq!(folded, vec![Op::Upsert { table: &MAILBOX, row: settled }, ops[1].clone()]);
        // Upserted twice: the update lands on the later row, which is the one that stays.
        let mut again = row.clone();
        again[5] = Value::Int(10);
        let twice = vec![
            Op::Upsert { table: &MAILBOX, row: row.clone() },
            Op::Upsert { table: &MAILBOX, row: again.clone() },
            Op::Update { table: &MAILBOX, key: key.clone(), set: settle.clone() },
        ];
        again[7] = Value::text("delivered");
        again[8] = Value::Int(2);
        assert_eq!(
            fold_into_upserts(twice),
            vec![Op::Upsert { table: &MAILBOX, row }, Op::Upsert { table: &MAILBOX, row: again }]
        );
        let two_ops = vec![ops[1].clone(), Op::Update { table: &MAILBOX, key, set: settle }];
        let two = statements(two_ops.clone(), Dialect::Postgres);
        assert_eq!(two.len(), 1);
        assert_eq!(
            two[0].0,
            "UPDATE rm_mailbox SET settled = v.settled, settled_at_us = v.settled_at_us FROM unnest(CAST($1 AS text[]), \
             CAST($2 AS text[]), CAST($3 AS text[]), CAST($4 AS bigint[])) AS v (recipient, message_id, settled, \
             settled_at_us) WHERE rm_mailbox.recipient = v.recipient AND rm_mailbox.message_id = v.message_id"
        );
        let sqlite = statements(two_ops, Dialect::Sqlite);
        assert!(
            sqlite[0]
                .0
                .starts_with("WITH v (recipient, message_id, settled, settled_at_us) AS (VALUES (CAST(? AS TEXT)"),
            "{}",
            sqlite[0].0
        );
    }

    #[test]
    fn a_value_of_another_kind_in_an_array_is_refused_not_written_as_null() {
        let fine = [Param::Column(Kind::Int, vec![Value::Int(1), Value::Null(KindTag::Int)])];
        assert!(sqlx::query::<sqlx::Postgres>("SELECT $1").bind_params(&fine).is_ok());
        let mixed = [Param::Column(Kind::Int, vec![Value::Int(1), Value::text("1")])];
        assert!(sqlx::query::<sqlx::Postgres>("SELECT $1").bind_params(&mixed).is_err());
        assert!(sqlx::query::<sqlx::Sqlite>("SELECT ?").bind_params(&fine).is_err(), "SQLite has no arrays");
    }

    #[test]
    fn tallies_merge_only_where_nothing_else_touches_their_table() {
        let tally = |by| Op::Tally { table: &EVENT_COUNTS, key: vec![Value::text("x")], column: "events", by };
        assert_eq!(merge_tallies(vec![tally(1), tally(2), tally(3)]), vec![tally(6)]);
        let delete = Op::Delete { table: &EVENT_COUNTS, key: vec![Value::text("x")] };
        let mixed = vec![tally(1), delete.clone(), tally(2)];
        assert_eq!(merge_tallies(mixed.clone()), mixed, "order matters when the table sees other ops");
    }
}
