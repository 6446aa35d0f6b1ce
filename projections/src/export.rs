//! The log as NDJSON, for auditors: one event per line, every header field,
//! the payload hash, and the payload (Base64) where retention has not
//! dropped it. `privcomm export` writes it; `privcomm audit verify` and
//! `privcomm replay --from` read it back with [`NdjsonSource`].

use crate::replay::{EventSource, SourceError};
use async_trait::async_trait;
use privcomm_domain::{EventStore, Position, RecordedEvent};
use std::io::{BufRead, Write};

/// Writes every event of `store` (up to `until`) to `out`, one JSON object
/// per line, `page` events per read. Returns how many were written.
pub async fn export(
    store: &dyn EventStore,
    out: &mut dyn Write,
    page: usize,
    until: Option<Position>,
) -> Result<u64, ExportError> {
    let mut after = Position::START;
    let mut written = 0;
    loop {
        let events = store.read_all(after, page.max(1)).await.map_err(|e| ExportError::Store(e.to_string()))?;
        let Some(last) = events.last() else { break };
        after = last.position;
        for event in events.iter().filter(|e| until.is_none_or(|until| e.position <= until)) {
            serde_json::to_writer(&mut *out, event).map_err(|e| ExportError::Io(e.to_string()))?;
            out.write_all(b"\n").map_err(|e| ExportError::Io(e.to_string()))?;
            written += 1;
        }
        if until.is_some_and(|until| after >= until) {
            break;
        }
    }
    out.flush().map_err(|e| ExportError::Io(e.to_string()))?;
    Ok(written)
}

/// An export that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the log failed.
    #[error("reading the log failed: {0}")]
    Store(String),
    /// Writing failed.
    #[error("writing the export failed: {0}")]
    Io(String),
}

/// Reads an export back, a page at a time.
pub struct NdjsonSource<R> {
    lines: std::io::Lines<R>,
    line: u64,
    last: Position,
    page: usize,
}

impl<R: BufRead> NdjsonSource<R> {
    /// Events from `reader`, `page` per call.
    pub fn new(reader: R, page: usize) -> NdjsonSource<R> {
        NdjsonSource { lines: reader.lines(), line: 0, last: Position::START, page: page.max(1) }
    }
}

#[async_trait]
impl<R: BufRead + Send + 'static> EventSource for NdjsonSource<R> {
    async fn next_page(&mut self) -> Result<Vec<RecordedEvent>, SourceError> {
        let mut page = Vec::with_capacity(self.page);
        while page.len() < self.page {
            let Some(line) = self.lines.next() else { break };
            self.line += 1;
            let line = line.map_err(|e| SourceError::Io(e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let event: RecordedEvent = serde_json::from_str(&line).map_err(|error| SourceError::Unreadable {
                after: self.last,
                reason: format!("line {}: {error}", self.line),
            })?;
            self.last = event.position;
            page.push(event);
        }
        Ok(page)
    }
}
