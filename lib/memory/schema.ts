/**
 * The memory database's schema, in one place with its version. A database written by a newer
 * kvstash (a higher version) is refused rather than misread; an older one is migrated forward in
 * one transaction.
 *
 * entries: archived turns (kind 'turn') and per-session summaries (kind 'summary', at most one per
 *   namespace and session, replaced in one transaction). AUTOINCREMENT keeps ids growing, so a
 *   process catches up with another's writes by reading the ids above the last it saw.
 * entry_vectors: an entry's embedding as little-endian float32 bytes, when an embed function was
 *   given. Apart from entries so that a keyword search, which reads thousands of entries, reads
 *   small rows, not a kilobyte or more of vector each.
 * entries_fts: FTS5 over entries.content (external content, kept in step by the code that writes).
 * checkpoints: the KV snapshots sessions recorded (entry key in the prompt cache, bytes, time).
 * meta: schema_version, the embedding dimension once known, and a counter bumped by every delete so
 *   another process knows to rebuild its in-memory vector index.
 */
import { KvstashError } from '../errors.js';
import type { SqlDatabase } from './driver.js';

export const SCHEMA_VERSION = 1;

const VERSION_1 = `
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  namespace TEXT NOT NULL,
  kind TEXT NOT NULL CHECK (kind IN ('turn', 'summary')),
  session_id TEXT NOT NULL,
  role TEXT NOT NULL,
  content TEXT NOT NULL,
  turn INTEGER,
  at INTEGER NOT NULL,
  metadata TEXT,
  bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS entry_vectors (id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS entry_vectors_namespace ON entry_vectors (namespace, id);
CREATE INDEX IF NOT EXISTS entries_session ON entries (namespace, session_id, kind, turn);
CREATE INDEX IF NOT EXISTS entries_at ON entries (namespace, kind, at);
CREATE VIRTUAL TABLE IF NOT EXISTS entries_fts USING fts5 (content, content = 'entries', content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 2');
CREATE TABLE IF NOT EXISTS checkpoints (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  namespace TEXT NOT NULL,
  session_id TEXT NOT NULL,
  turn INTEGER NOT NULL,
  entry_key TEXT NOT NULL,
  bytes INTEGER NOT NULL,
  at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_session ON checkpoints (namespace, session_id, turn);
`;

/** Creates or migrates the schema; throws E_MEMORY_DB for a database of a newer kvstash. */
export function ensureSchema(db: SqlDatabase, path: string): void {
  db.exec('BEGIN IMMEDIATE');
  try {
    db.exec('CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)');
    const row = db.prepare("SELECT value FROM meta WHERE key = 'schema_version'").get();
    const version = row ? Number(row.value) : 0;
    if (version > SCHEMA_VERSION) {
      throw new KvstashError(
        'E_MEMORY_DB',
        `the memory database ${path} has schema version ${version}, newer than this kvstash's ${SCHEMA_VERSION}: upgrade kvstash to open it`,
        { reason: 'newer schema' },
      );
    }
    if (version < 1) {
      db.exec(VERSION_1);
      db.prepare("INSERT OR IGNORE INTO meta (key, value) VALUES ('deletes', '0')").run();
    }
    if (version < SCHEMA_VERSION) db.prepare("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)").run(String(SCHEMA_VERSION));
    db.exec('COMMIT');
  } catch (err) {
    db.exec('ROLLBACK');
    throw err;
  }
}
