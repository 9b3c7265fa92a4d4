//! Forwarding cursors in SQLite (WAL): per stream, how far from its start the core has
//! acknowledged, so the edge can release data at start before it reconnects, and an operator
//! can see it. The core's WELCOME stays the authority on what is sent. All SQL of the agent is
//! here; migrations by `PRAGMA user_version`.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

/// The schema version this code writes.
const SCHEMA_VERSION: i64 = 1;

/// The cursor store.
#[derive(Debug)]
pub struct Cursors {
    db: Connection,
}

/// One stream's cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Producer epoch the cursor belongs to.
    pub epoch: u64,
    /// Every seq below this is acknowledged durable by a core.
    pub acked_through: u64,
    /// When it was written, ms since the epoch.
    pub updated_ms: i64,
}

impl Cursors {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> rusqlite::Result<Cursors> {
        let db = Connection::open(path)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version < 1 {
            db.execute_batch(
                "CREATE TABLE IF NOT EXISTS cursors (
                    stream TEXT PRIMARY KEY,
                    epoch INTEGER NOT NULL,
                    acked_through INTEGER NOT NULL,
                    updated_ms INTEGER NOT NULL
                );",
            )?;
            db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        Ok(Cursors { db })
    }

    /// The cursor of `stream`, if any.
    pub fn get(&self, stream: &str) -> rusqlite::Result<Option<Cursor>> {
        self.db
            .query_row("SELECT epoch, acked_through, updated_ms FROM cursors WHERE stream = ?1", params![stream], |r| {
                Ok(Cursor {
                    epoch: r.get::<_, i64>(0)? as u64,
                    acked_through: r.get::<_, i64>(1)? as u64,
                    updated_ms: r.get(2)?,
                })
            })
            .optional()
    }

    /// Records `cursor` for `stream`.
    pub fn set(&self, stream: &str, cursor: &Cursor) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO cursors (stream, epoch, acked_through, updated_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(stream) DO UPDATE SET epoch = ?2, acked_through = ?3, updated_ms = ?4",
            params![stream, cursor.epoch as i64, cursor.acked_through as i64, cursor.updated_ms],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_persist_across_opens() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("forward.sqlite");
        let c = Cursors::open(&path).unwrap();
        assert_eq!(c.get("cdr").unwrap(), None);
        let cur = Cursor { epoch: u64::MAX - 1, acked_through: 42, updated_ms: 7 };
        c.set("cdr", &cur).unwrap();
        c.set("cdr", &Cursor { acked_through: 43, ..cur.clone() }).unwrap();
        drop(c);
        let c = Cursors::open(&path).unwrap();
        assert_eq!(c.get("cdr").unwrap(), Some(Cursor { acked_through: 43, ..cur }));
    }
}
