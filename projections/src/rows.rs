//! Read-model changes as data: the tables a model owns and the row
//! operations an event turns into.
//!
//! Models are pure ([`crate::models`]): they describe their writes as
//! [`Op`]s, and a [`crate::store::ReadStore`] carries them out — in SQL on
//! PostgreSQL or SQLite, or in memory for fast tests. The same rows therefore
//! come out of every backend, and [`TableChecksum`] can compare a model
//! rebuilt on one backend with the live one on another.

use sha2::{Digest, Sha256};

/// What a column holds. Every backend stores these three kinds alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 64-bit signed integer (`bigint` / `INTEGER`).
    Int,
    /// UTF-8 text.
    Text,
    /// Raw bytes (`bytea` / `BLOB`).
    Bytes,
}

/// One column of a read-model table.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    /// Column name.
    pub name: &'static str,
    /// What it holds.
    pub kind: Kind,
    /// May it be NULL?
    pub nullable: bool,
}

impl Column {
    /// A NOT NULL column.
    pub const fn new(name: &'static str, kind: Kind) -> Column {
        Column { name, kind, nullable: false }
    }
    /// A nullable column.
    pub const fn nullable(name: &'static str, kind: Kind) -> Column {
        Column { name, kind, nullable: true }
    }
}

/// A read-model table: its primary key is the first `key_len` columns.
#[derive(Debug)]
pub struct Table {
    /// Table name (created by a migration, never at start-up).
    pub name: &'static str,
    /// Every column, key columns first.
    pub columns: &'static [Column],
    /// How many leading columns form the primary key.
    pub key_len: usize,
}

/// Tables are statics: one name, one table.
impl PartialEq for Table {
    fn eq(&self, other: &Table) -> bool {
        self.name == other.name
    }
}
impl Eq for Table {}

impl Table {
    /// The key columns.
    pub fn key(&self) -> &'static [Column] {
        &self.columns[..self.key_len]
    }

    /// The column called `name`; models only name their own columns.
    pub fn column(&self, name: &str) -> Option<&'static Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A value in a row.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// SQL NULL of a column of this kind.
    Null(KindTag),
}

/// [`Kind`] as an orderable tag for [`Value::Null`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KindTag {
    /// Integer.
    Int,
    /// Text.
    Text,
    /// Bytes.
    Bytes,
}

impl Value {
    /// Text from anything displayable (ids).
    pub fn text(value: impl ToString) -> Value {
        Value::Text(value.to_string())
    }

    /// An integer from an unsigned count or position (saturating: read
    /// models never hold values near `i64::MAX`).
    pub fn uint(value: u64) -> Value {
        Value::Int(i64::try_from(value).unwrap_or(i64::MAX))
    }

    /// `Some(v)` or a typed NULL.
    pub fn or_null(value: Option<Value>, kind: KindTag) -> Value {
        value.unwrap_or(Value::Null(kind))
    }

    /// Adds this value to a checksum in a form no other value shares.
    fn hash_into(&self, hasher: &mut Sha256) {
        match self {
            Value::Int(v) => {
                hasher.update([1]);
                hasher.update(v.to_be_bytes());
            }
            Value::Text(v) => {
                hasher.update([2]);
                hasher.update((v.len() as u64).to_be_bytes());
                hasher.update(v.as_bytes());
            }
            Value::Bytes(v) => {
                hasher.update([3]);
                hasher.update((v.len() as u64).to_be_bytes());
                hasher.update(v);
            }
            // A NULL is a NULL whatever the column's kind.
            Value::Null(_) => hasher.update([0]),
        }
    }
}

/// One change to a read model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Insert the row, or replace every non-key column of the row with its key.
    Upsert {
        /// Table.
        table: &'static Table,
        /// Every column, in the table's order.
        row: Vec<Value>,
    },
    /// Set some columns of the row with this key (no row: nothing happens).
    Update {
        /// Table.
        table: &'static Table,
        /// The full key.
        key: Vec<Value>,
        /// Columns and their new values.
        set: Vec<(&'static str, Value)>,
    },
    /// Set a column of the row with this key unless it already has a value.
    SetIfNull {
        /// Table.
        table: &'static Table,
        /// The full key.
        key: Vec<Value>,
        /// The nullable column.
        column: &'static str,
        /// Its value, if it had none.
        value: Value,
    },
    /// Add `by` to an integer column of the row with this key (no row: nothing happens).
    Increment {
        /// Table.
        table: &'static Table,
        /// The full key.
        key: Vec<Value>,
        /// The integer column.
        column: &'static str,
        /// Amount (may be negative).
        by: i64,
    },
    /// Add `by` to an integer column, creating the row (key and that
    /// column only) if it does not exist: a counter.
    Tally {
        /// Table.
        table: &'static Table,
        /// The full key.
        key: Vec<Value>,
        /// The integer column.
        column: &'static str,
        /// Amount (may be negative).
        by: i64,
    },
    /// Delete every row whose key starts with these values.
    Delete {
        /// Table.
        table: &'static Table,
        /// The key, or a prefix of it.
        key: Vec<Value>,
    },
    /// Delete every row whose `column` equals `value`.
    DeleteWhere {
        /// Table.
        table: &'static Table,
        /// Column (indexed by the table's migration).
        column: &'static str,
        /// Value.
        value: Value,
    },
}

/// An order-independent checksum of a table's rows: the sum (mod 2^256) of
/// every row's SHA-256, so rows can be streamed in any order from any
/// backend, with no sorting and no memory held per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TableChecksum {
    /// Rows seen.
    pub rows: u64,
    sum: [u64; 4],
}

impl TableChecksum {
    /// Adds one row (its values in the table's column order).
    pub fn add_row(&mut self, row: &[Value]) {
        let mut hasher = Sha256::new();
        hasher.update((row.len() as u64).to_be_bytes());
        for value in row {
            value.hash_into(&mut hasher);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let mut carry = 0u128;
        for (lane, chunk) in self.sum.iter_mut().zip(digest.chunks_exact(8)).rev() {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let total = *lane as u128 + u64::from_be_bytes(word) as u128 + carry;
            *lane = total as u64;
            carry = total >> 64;
        }
        self.rows += 1;
    }

    /// Lowercase hex of the sum.
    pub fn to_hex(&self) -> String {
        self.sum.iter().map(|lane| format!("{lane:016x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_ignores_row_order_and_sees_every_value() {
        let a = vec![Value::Int(1), Value::text("x"), Value::Null(KindTag::Bytes)];
        let b = vec![Value::Int(2), Value::text("y"), Value::Bytes(vec![0xff; 40])];
        let mut ab = TableChecksum::default();
        ab.add_row(&a);
        ab.add_row(&b);
        let mut ba = TableChecksum::default();
        ba.add_row(&b);
        ba.add_row(&a);
        assert_eq!(ab, ba);
        let mut changed = TableChecksum::default();
        changed.add_row(&a);
        changed.add_row(&[Value::Int(2), Value::text("y"), Value::Bytes(vec![0xfe; 40])]);
        assert_ne!(ab.to_hex(), changed.to_hex());
        // Text and bytes with the same content differ; so do "" and NULL.
        let mut text = TableChecksum::default();
        text.add_row(&[Value::text("ab")]);
        let mut bytes = TableChecksum::default();
        bytes.add_row(&[Value::Bytes(b"ab".to_vec())]);
        assert_ne!(text, bytes);
        let mut empty = TableChecksum::default();
        empty.add_row(&[Value::text("")]);
        let mut null = TableChecksum::default();
        null.add_row(&[Value::Null(KindTag::Text)]);
        assert_ne!(empty, null);
    }
}
