/**
 * Memory: long-term memory on an embedded SQLite database file. Archived turns, one cumulative
 * summary per session and the records of KV checkpoints live in the file, which is the source of
 * truth; keyword search is SQLite's FTS5, vector search an in-memory index over the vectors the
 * rows carry as BLOBs, caught up with other processes' writes before each search. Retrieval
 * policy (which tiers, the fusion) lives in search(); storage in the statements below it.
 *
 * Every method is async and settles after its transaction committed: a resolved add() is on disk
 * (WAL, synchronous=FULL), and survives the process being killed the next instant.
 */
import { statSync } from 'node:fs';
import { KvstashError } from '../errors.js';
import { normalizeInPlace } from './brute-force.js';
import { blobBytes, databaseError, openDatabase, type SqlDatabase, type SqlStatement, type SqlValue } from './driver.js';
import { anyOfWords, queryWords, rankingWords } from './fts-query.js';
import { reciprocalRankFusion } from './fusion.js';
import { ensureSchema } from './schema.js';
import { VectorIndex, type VectorHit } from './vector-index.js';

/** Turns texts into vectors, one per text, all of one dimension (model.embed has this shape). */
export type EmbedFunction = (texts: string[]) => Promise<Float32Array[]>;

export interface MemoryOpenOptions {
  /** The database file; created with its schema when absent. */
  path: string;
  /** Without it, rows carry no vector: keyword search only ('hybrid' is then keyword ranking). */
  embed?: EmbedFunction;
  /** Rows, summaries and checkpoints of other namespaces in the same file are invisible. Default 'default'. */
  namespace?: string;
  /** How long a write waits for another process's transaction, in milliseconds. Default 10000. */
  busyTimeoutMs?: number;
}

export interface MemoryAddInput {
  sessionId: string;
  /** 'user', 'assistant', 'system', 'tool' or any other non-empty name. */
  role: string;
  content: string;
  /** The turn number in its session (0-based, as sessions count), when there is one. */
  turn?: number;
  /** When it was said: a Date or milliseconds since the epoch. Default now. */
  at?: Date | number;
  /** Any JSON-serializable object, returned with search results. */
  metadata?: Record<string, unknown>;
}

export type MemorySearchMode = 'hybrid' | 'keyword' | 'vector';

/**
 * Where a result comes from, relative to the session a search is made for: 'summary' is a
 * session's cumulative summary, 'session' an archived turn of that session (of any session when
 * the search names none), 'other' an archived turn of another session of the namespace.
 */
export type MemoryTier = 'summary' | 'session' | 'other';

export interface MemorySearchOptions {
  /** The session the search is made for: sets the tiers; other sessions' summaries are left out. */
  sessionId?: string;
  /** Results wanted, 1 to 1000. Default 10. */
  limit?: number;
  /** Default 'hybrid': keyword and vector rankings fused by reciprocal rank. */
  mode?: MemorySearchMode;
  /** 'session' searches only `sessionId`'s summary and turns; default 'namespace' (every session). */
  scope?: 'session' | 'namespace';
  /** Leaves out `sessionId`'s turns numbered this or higher (those still in the context window). */
  beforeTurn?: number;
  /** Only these tiers. Default all three. */
  tiers?: readonly MemoryTier[];
}

export interface MemoryHit {
  id: number;
  content: string;
  role: string;
  sessionId: string;
  turn: number | null;
  /** Hybrid: the fused reciprocal-rank score; keyword: -BM25 (higher is better); vector: cosine similarity. */
  score: number;
  tier: MemoryTier;
  /** Milliseconds since the epoch. */
  at: number;
  metadata?: Record<string, unknown>;
}

export interface MemorySummary {
  id: number;
  sessionId: string;
  content: string;
  turn: number | null;
  at: number;
}

export interface CheckpointInput {
  sessionId: string;
  turn: number;
  /** The key of the cache entry holding the KV snapshot (PromptCache or CacheStore key). */
  entryKey: string;
  /** The entry's size in bytes. */
  bytes: number;
  at?: Date | number;
}

export interface CheckpointRecord {
  id: number;
  sessionId: string;
  turn: number;
  entryKey: string;
  bytes: number;
  at: number;
}

/**
 * Where prune/forget delete the cache entries of the checkpoints they remove: a session's
 * checkpoint files (`Session.checkpointCache(dir)`), a PromptCache or a CacheStore. `delete` gets
 * each removed record's entry key and the record; resolving with 0 or false says nothing was there.
 */
export interface CheckpointCache {
  delete(key: string, checkpoint: CheckpointRecord): unknown;
}

export interface MemoryPruneOptions {
  /** Keep at most this many archived turns in the namespace (the oldest go first). */
  maxRows?: number;
  /** Remove turns and checkpoints older than this many days (fractions allowed). */
  maxAgeDays?: number;
  /** Keep the archived turns' bytes (content, metadata, vector) at or under this many bytes. */
  maxBytes?: number;
  /** Keep at most this many checkpoints per session (the newest). */
  maxCheckpointsPerSession?: number;
  /** The cache whose entries back the removed checkpoints: each removed checkpoint's entry is deleted there. */
  cache?: CheckpointCache;
}

export interface MemoryForgetOptions {
  /** Everything of this session: turns, summary, checkpoints. */
  sessionId?: string;
  /** These rows (ids from search results). */
  ids?: readonly number[];
  /** Turns and checkpoints older than this (Date or ms since the epoch), with sessionId only that session's. */
  before?: Date | number;
  cache?: CheckpointCache;
}

export interface MemoryRemoved {
  /** Archived turns and summaries removed. */
  rows: number;
  checkpoints: number;
  /** Cache entries deleted through `cache` (failures are counted in `cacheErrors`; entries the
   * cache reported absent, by resolving with 0 or false, in neither). */
  cacheEntries: number;
  cacheErrors: number;
}

export interface MemoryStats {
  namespace: string;
  path: string;
  turns: number;
  summaries: number;
  sessions: number;
  /** Bytes of the archived turns and summaries (content, metadata, vector). */
  bytes: number;
  checkpoints: number;
  checkpointBytes: number;
  /** Rows with a vector in the in-memory index. */
  vectors: number;
  dimension: number | null;
  /** The database file and its WAL, in bytes. */
  fileBytes: number;
}

interface EntryRow {
  id: number;
  kind: 'turn' | 'summary';
  session_id: string;
  role: string;
  content: string;
  turn: number | null;
  at: number;
  metadata: string | null;
}

const DAY_MS = 86_400_000;
/** How many documents a keyword search may have FTS5 score (see rankingWords), and how far it counts each word's documents: at 100k turns 4,000 cost 68 ms p50, mostly counting. */
const KEYWORD_DOCUMENT_BUDGET = 1_000;
const MAX_LIMIT = 1000;

export class Memory {
  readonly path: string;
  readonly namespace: string;
  private readonly db: SqlDatabase;
  private readonly embedFn: EmbedFunction | undefined;
  private readonly statements = new Map<string, SqlStatement>();
  private readonly inFlight = new Set<Promise<unknown>>();
  private closed = false;
  private closing: Promise<void> | undefined;
  private dimension: number | null;
  private index: VectorIndex | undefined;
  /** The highest entry id whose vector the index has seen (ids only grow: AUTOINCREMENT). */
  private indexedThrough = 0;
  /** The meta 'deletes' counter the index reflects; another value means rows vanished: rebuild. */
  private indexedDeletes = '';
  private dataVersion = -1;
  private ownWrites = true;

  private constructor(path: string, namespace: string, db: SqlDatabase, embed: EmbedFunction | undefined) {
    this.path = path;
    this.namespace = namespace;
    this.db = db;
    this.embedFn = embed;
    const dim = this.statement("SELECT value FROM meta WHERE key = 'embed_dim'").get();
    this.dimension = dim ? Number(dim.value) : null;
  }

  static async open(options: MemoryOpenOptions): Promise<Memory> {
    if (options === null || typeof options !== 'object') throw new TypeError('Memory.open needs an options object with a path');
    const { path, embed, namespace = 'default', busyTimeoutMs = 10_000 } = options;
    if (typeof path !== 'string' || path.length === 0) throw new TypeError('Memory.open: path must be a non-empty string');
    if (embed !== undefined && typeof embed !== 'function') throw new TypeError('Memory.open: embed must be a function texts => Promise<Float32Array[]>');
    if (typeof namespace !== 'string' || namespace.length === 0) throw new TypeError('Memory.open: namespace must be a non-empty string');
    if (!Number.isInteger(busyTimeoutMs) || busyTimeoutMs < 0) throw new RangeError('Memory.open: busyTimeoutMs must be an integer >= 0');
    const db = openDatabase(path, busyTimeoutMs);
    try {
      db.exec('PRAGMA journal_mode = WAL');
      db.exec('PRAGMA synchronous = FULL');
      db.exec(`PRAGMA busy_timeout = ${busyTimeoutMs}`);
      ensureSchema(db, path);
    } catch (err) {
      db.close();
      throw databaseError(`cannot use ${path} as a memory database`, err);
    }
    return new Memory(path, namespace, db, embed);
  }

  /** Archives one message; resolves with its id once committed. */
  async add(input: MemoryAddInput): Promise<number> {
    const ids = await this.addMany([input]);
    return ids[0]!;
  }

  /** Archives many messages in one transaction (and one embed call); resolves with their ids in order. */
  async addMany(inputs: readonly MemoryAddInput[]): Promise<number[]> {
    if (!Array.isArray(inputs)) throw new TypeError('Memory.addMany: inputs must be an array');
    const rows = inputs.map((input, i) => validateAddInput(input, `Memory.add${inputs.length > 1 ? `Many[${i}]` : ''}`));
    return this.operation(async () => {
      if (rows.length === 0) return [];
      const vectors = await this.embedTexts(rows.map((r) => r.content));
      return this.write(() => {
        return rows.map((row, i) => this.insertEntry('turn', row, vectors ? vectors[i]! : null));
      });
    });
  }

  /** The highest turn number archived for the session, or undefined when it has none. */
  async lastTurn(sessionId: string): Promise<number | undefined> {
    requireString(sessionId, 'Memory.lastTurn: sessionId');
    return this.operation(async () => {
      const row = this.read(() =>
        this.statement("SELECT MAX(turn) AS turn FROM entries WHERE namespace = ? AND session_id = ? AND kind = 'turn'").get(this.namespace, sessionId),
      );
      return row?.turn === null || row?.turn === undefined ? undefined : Number(row.turn);
    });
  }

  /** Replaces the session's cumulative summary (one per session); resolves with its id. */
  async setSummary(sessionId: string, content: string, options: { turn?: number; at?: Date | number } = {}): Promise<number> {
    const row = validateAddInput({ sessionId, role: 'summary', content, ...options }, 'Memory.setSummary');
    return this.operation(async () => {
      const vectors = await this.embedTexts([row.content]);
      return this.write(() => {
        this.deleteRows(this.read(() => this.statement("SELECT id, content FROM entries WHERE namespace = ? AND session_id = ? AND kind = 'summary'").all(this.namespace, sessionId)));
        return this.insertEntry('summary', row, vectors ? vectors[0]! : null);
      });
    });
  }

  /** The session's summary, or undefined. */
  async summary(sessionId: string): Promise<MemorySummary | undefined> {
    requireString(sessionId, 'Memory.summary: sessionId');
    return this.operation(async () => {
      const row = this.read(() =>
        this.statement("SELECT id, session_id, content, turn, at FROM entries WHERE namespace = ? AND session_id = ? AND kind = 'summary'").get(this.namespace, sessionId),
      );
      if (!row) return undefined;
      return { id: Number(row.id), sessionId: String(row.session_id), content: String(row.content), turn: row.turn === null ? null : Number(row.turn), at: Number(row.at) };
    });
  }

  /** Records a KV checkpoint a session saved; resolves with the record's id. */
  async recordCheckpoint(input: CheckpointInput): Promise<number> {
    if (input === null || typeof input !== 'object') throw new TypeError('Memory.recordCheckpoint needs {sessionId, turn, entryKey, bytes}');
    requireString(input.sessionId, 'Memory.recordCheckpoint: sessionId');
    requireString(input.entryKey, 'Memory.recordCheckpoint: entryKey');
    requireCount(input.turn, 'Memory.recordCheckpoint: turn');
    requireCount(input.bytes, 'Memory.recordCheckpoint: bytes');
    const at = toMillis(input.at, 'Memory.recordCheckpoint: at');
    return this.operation(async () =>
      this.write(
        () =>
          this.statement('INSERT INTO checkpoints (namespace, session_id, turn, entry_key, bytes, at) VALUES (?, ?, ?, ?, ?, ?)').run(
            this.namespace,
            input.sessionId,
            input.turn,
            input.entryKey,
            input.bytes,
            at,
          ).lastInsertRowid,
      ),
    );
  }

  /** The session's recorded checkpoints, oldest turn first. */
  async snapshots(sessionId: string): Promise<CheckpointRecord[]> {
    requireString(sessionId, 'Memory.snapshots: sessionId');
    return this.operation(async () =>
      this.read(() =>
        this.statement('SELECT id, session_id, turn, entry_key, bytes, at FROM checkpoints WHERE namespace = ? AND session_id = ? ORDER BY turn, id')
          .all(this.namespace, sessionId)
          .map(checkpointRecord),
      ),
    );
  }

  /**
   * Finds what was said. The query is plain text: words are matched literally (no FTS or SQL
   * syntax is interpreted), and in 'vector'/'hybrid' mode the text is embedded.
   */
  async search(query: string, options: MemorySearchOptions = {}): Promise<MemoryHit[]> {
    if (typeof query !== 'string') throw new TypeError('Memory.search: query must be a string');
    if (options === null || typeof options !== 'object') throw new TypeError('Memory.search: options must be an object');
    const { sessionId, limit = 10, mode = 'hybrid', scope = 'namespace', beforeTurn, tiers } = options;
    if (sessionId !== undefined) requireString(sessionId, 'Memory.search: sessionId');
    if (!Number.isInteger(limit) || limit < 1 || limit > MAX_LIMIT) throw new RangeError(`Memory.search: limit must be an integer from 1 to ${MAX_LIMIT}`);
    if (mode !== 'hybrid' && mode !== 'keyword' && mode !== 'vector') throw new RangeError("Memory.search: mode must be 'hybrid', 'keyword' or 'vector'");
    if (scope !== 'session' && scope !== 'namespace') throw new RangeError("Memory.search: scope must be 'session' or 'namespace'");
    if (scope === 'session' && sessionId === undefined) throw new TypeError("Memory.search: scope 'session' needs a sessionId");
    if (beforeTurn !== undefined) {
      requireCount(beforeTurn, 'Memory.search: beforeTurn');
      if (sessionId === undefined) throw new TypeError('Memory.search: beforeTurn needs a sessionId');
    }
    if (tiers !== undefined && (!Array.isArray(tiers) || tiers.some((t) => t !== 'summary' && t !== 'session' && t !== 'other'))) {
      throw new RangeError("Memory.search: tiers must be an array of 'summary', 'session', 'other'");
    }
    if (mode === 'vector' && !this.embedFn) {
      throw new KvstashError('E_MEMORY_EMBED', "Memory.search: mode 'vector' needs an embed function: pass embed to Memory.open (for example texts => model.embed(texts))");
    }
    const filter = new SearchFilter(sessionId, scope, beforeTurn, tiers);
    return this.operation(async () => {
      const candidates = mode === 'keyword' ? limit : Math.max(limit * 4, 40);
      const keyword = mode === 'vector' ? [] : this.keywordSearch(query, filter, candidates);
      let vector: VectorHit[] = [];
      if (mode !== 'keyword' && this.embedFn && /\S/.test(query)) {
        const [queryVector] = (await this.embedTexts([query]))!;
        if (this.closed) throw closedError();
        if (queryVector!.every((x) => x === 0)) return this.finishSearch(mode === 'vector' ? [] : keyword, mode, limit, filter);
        // A vector that shares nothing with the query (cosine <= 0) is no evidence of relevance.
        vector = this.vectorSearch(normalizeInPlace(queryVector!), filter, candidates).filter((hit) => hit.score > 0);
      }
      return this.finishSearch(mode === 'keyword' ? keyword : vector, mode, limit, filter, keyword);
    });
  }

  /** Fuses (hybrid) or takes the one ranking, then reads the rows of the best `limit`. */
  private finishSearch(list: VectorHit[], mode: MemorySearchMode, limit: number, filter: SearchFilter, keyword: VectorHit[] = []): MemoryHit[] {
    let ranked = list;
    if (mode === 'hybrid') {
      const fused = reciprocalRankFusion([keyword.map((h) => h.id), list === keyword ? [] : list.map((h) => h.id)]);
      ranked = [...fused].map(([id, score]) => ({ id, score })).sort((a, b) => b.score - a.score || a.id - b.id);
    }
    ranked = ranked.slice(0, limit);
    const rows = this.rowsById(ranked.map((h) => h.id));
    const hits: MemoryHit[] = [];
    for (const { id, score } of ranked) {
      const row = rows.get(id);
      if (!row) continue; // forgotten by another process between the ranking and this read
      hits.push(toHit(row, score, filter.tierOf(row)));
    }
    return hits;
  }

  /** Removes a session's memory, chosen rows, or what is older than a time. */
  async forget(options: MemoryForgetOptions): Promise<MemoryRemoved> {
    if (options === null || typeof options !== 'object') throw new TypeError('Memory.forget needs {sessionId?, ids?, before?}');
    const { sessionId, ids, before, cache } = options;
    if (sessionId === undefined && ids === undefined && before === undefined) throw new TypeError('Memory.forget: give sessionId, ids or before');
    if (sessionId !== undefined) requireString(sessionId, 'Memory.forget: sessionId');
    if (ids !== undefined && (!Array.isArray(ids) || ids.some((id) => !Number.isSafeInteger(id)))) throw new TypeError('Memory.forget: ids must be an array of integers');
    const beforeMs = before === undefined ? undefined : toMillis(before, 'Memory.forget: before');
    return this.operation(async () => {
      const removed = this.write(() => {
        let rows = 0;
        let checkpoints: CheckpointRecord[] = [];
        if (ids !== undefined && ids.length > 0) {
          for (let i = 0; i < ids.length; i += 500) {
            const chunk = ids.slice(i, i + 500);
            rows += this.deleteRows(this.statement(`SELECT id, content FROM entries WHERE namespace = ? AND id IN (${chunk.map(() => '?').join(',')})`).all(this.namespace, ...chunk));
          }
        }
        if (sessionId !== undefined && beforeMs === undefined) {
          rows += this.deleteRows(this.statement('SELECT id, content FROM entries WHERE namespace = ? AND session_id = ?').all(this.namespace, sessionId));
          checkpoints = this.deleteCheckpoints('session_id = ?', [sessionId]);
        } else if (beforeMs !== undefined) {
          const session = sessionId === undefined ? '' : ' AND session_id = ?';
          const params: SqlValue[] = sessionId === undefined ? [beforeMs] : [beforeMs, sessionId];
          rows += this.deleteRows(this.statement(`SELECT id, content FROM entries WHERE namespace = ? AND kind = 'turn' AND at < ?${session}`).all(this.namespace, ...params));
          checkpoints = this.deleteCheckpoints(`at < ?${session}`, params);
        }
        return { rows, checkpoints };
      });
      return this.finishRemoval(removed.rows, removed.checkpoints, cache);
    });
  }

  /** Bounds the memory: oldest turns and checkpoints go first; summaries stay. */
  async prune(options: MemoryPruneOptions): Promise<MemoryRemoved> {
    if (options === null || typeof options !== 'object') throw new TypeError('Memory.prune needs {maxRows?, maxAgeDays?, maxBytes?, maxCheckpointsPerSession?}');
    const { maxRows, maxAgeDays, maxBytes, maxCheckpointsPerSession, cache } = options;
    if (maxRows !== undefined) requireCount(maxRows, 'Memory.prune: maxRows');
    if (maxBytes !== undefined) requireCount(maxBytes, 'Memory.prune: maxBytes');
    if (maxCheckpointsPerSession !== undefined) requireCount(maxCheckpointsPerSession, 'Memory.prune: maxCheckpointsPerSession');
    if (maxAgeDays !== undefined && !(typeof maxAgeDays === 'number' && Number.isFinite(maxAgeDays) && maxAgeDays >= 0)) {
      throw new RangeError('Memory.prune: maxAgeDays must be a number >= 0');
    }
    if (cache !== undefined && (cache === null || typeof cache.delete !== 'function')) throw new TypeError('Memory.prune: cache must have a delete(key) method');
    return this.operation(async () => {
      const removed = this.write(() => {
        const ns = this.namespace;
        let rows = 0;
        const checkpoints: CheckpointRecord[] = [];
        if (maxAgeDays !== undefined) {
          const cutoff = Date.now() - maxAgeDays * DAY_MS;
          rows += this.deleteRows(this.statement("SELECT id, content FROM entries WHERE namespace = ? AND kind = 'turn' AND at < ?").all(ns, cutoff));
          checkpoints.push(...this.deleteCheckpoints('at < ?', [cutoff]));
        }
        if (maxRows !== undefined) {
          const count = Number(this.statement("SELECT COUNT(*) AS n FROM entries WHERE namespace = ? AND kind = 'turn'").get(ns)!.n);
          if (count > maxRows) {
            rows += this.deleteRows(this.statement("SELECT id, content FROM entries WHERE namespace = ? AND kind = 'turn' ORDER BY at, id LIMIT ?").all(ns, count - maxRows));
          }
        }
        if (maxBytes !== undefined) {
          let total = Number(this.statement("SELECT COALESCE(SUM(bytes), 0) AS b FROM entries WHERE namespace = ? AND kind = 'turn'").get(ns)!.b);
          if (total > maxBytes) {
            const victims: Record<string, unknown>[] = [];
            for (const row of this.statement("SELECT id, content, bytes FROM entries WHERE namespace = ? AND kind = 'turn' ORDER BY at, id").all(ns)) {
              if (total <= maxBytes) break;
              victims.push(row);
              total -= Number(row.bytes);
            }
            rows += this.deleteRows(victims);
          }
        }
        if (maxCheckpointsPerSession !== undefined) {
          checkpoints.push(
            ...this.deleteCheckpoints(
              'id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY session_id ORDER BY turn DESC, id DESC) AS r FROM checkpoints WHERE namespace = ?) WHERE r > ?)',
              [ns, maxCheckpointsPerSession],
            ),
          );
        }
        return { rows, checkpoints };
      });
      return this.finishRemoval(removed.rows, removed.checkpoints, cache);
    });
  }

  async stats(): Promise<MemoryStats> {
    return this.operation(async () => {
      this.syncIndex();
      const ns = this.namespace;
      const entries = this.read(() =>
        this.statement(
          "SELECT COALESCE(SUM(kind = 'turn'), 0) AS turns, COALESCE(SUM(kind = 'summary'), 0) AS summaries, COUNT(DISTINCT session_id) AS sessions, COALESCE(SUM(bytes), 0) AS bytes FROM entries WHERE namespace = ?",
        ).get(ns)!,
      );
      const checkpoints = this.read(() => this.statement('SELECT COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS b FROM checkpoints WHERE namespace = ?').get(ns)!);
      let fileBytes = 0;
      for (const suffix of ['', '-wal']) {
        try {
          fileBytes += statSync(this.path + suffix).size;
        } catch {
          // no WAL right after a checkpoint
        }
      }
      return {
        namespace: ns,
        path: this.path,
        turns: Number(entries.turns),
        summaries: Number(entries.summaries),
        sessions: Number(entries.sessions),
        bytes: Number(entries.bytes),
        checkpoints: Number(checkpoints.n),
        checkpointBytes: Number(checkpoints.b),
        vectors: this.index?.size ?? 0,
        dimension: this.dimension,
        fileBytes,
      };
    });
  }

  /** Waits for the operations in flight, then closes the database. Idempotent. */
  async close(): Promise<void> {
    if (!this.closing) {
      this.closed = true;
      this.closing = (async () => {
        while (this.inFlight.size > 0) await Promise.allSettled([...this.inFlight]);
        this.statements.clear();
        this.db.close();
        this.index = undefined;
      })();
    }
    return this.closing;
  }

  // --- storage ---------------------------------------------------------------------------------

  private async operation<T>(body: () => Promise<T>): Promise<T> {
    if (this.closed) throw closedError();
    const running = body();
    this.inFlight.add(running);
    try {
      return await running;
    } finally {
      this.inFlight.delete(running);
    }
  }

  private statement(sql: string): SqlStatement {
    let statement = this.statements.get(sql);
    if (!statement) {
      statement = this.db.prepare(sql);
      this.statements.set(sql, statement);
    }
    return statement;
  }

  private read<T>(body: () => T): T {
    try {
      return body();
    } catch (err) {
      throw databaseError(`memory database ${this.path}`, err);
    }
  }

  /** Runs body in one IMMEDIATE transaction (so a busy database waits up front, not mid-way). */
  private write<T>(body: () => T): T {
    if (this.closed && this.inFlight.size === 0) throw closedError();
    try {
      this.db.exec('BEGIN IMMEDIATE');
    } catch (err) {
      throw databaseError(`memory database ${this.path}: cannot start a write`, err);
    }
    try {
      const result = body();
      this.db.exec('COMMIT');
      this.ownWrites = true;
      return result;
    } catch (err) {
      try {
        this.db.exec('ROLLBACK');
      } catch {
        // SQLite already rolled back (for example after SQLITE_FULL)
      }
      throw databaseError(`memory database ${this.path}: write failed`, err);
    }
  }

  /** Inserts one entry, its FTS row and its vector. Inside write(). */
  private insertEntry(kind: 'turn' | 'summary', row: ValidRow, vector: Float32Array | null): number {
    const blob = vector ? vectorBytes(vector) : null;
    const metadata = row.metadata === undefined ? null : JSON.stringify(row.metadata);
    const bytes = Buffer.byteLength(row.content) + (metadata ? Buffer.byteLength(metadata) : 0) + (blob ? blob.length : 0);
    const id = this.statement('INSERT INTO entries (namespace, kind, session_id, role, content, turn, at, metadata, bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)').run(
      this.namespace,
      kind,
      row.sessionId,
      row.role,
      row.content,
      row.turn,
      row.at,
      metadata,
      bytes,
    ).lastInsertRowid;
    this.statement('INSERT INTO entries_fts (rowid, content) VALUES (?, ?)').run(id, row.content);
    if (blob) this.statement('INSERT INTO entry_vectors (id, namespace, vector) VALUES (?, ?, ?)').run(id, this.namespace, blob);
    return id;
  }

  /** Deletes entry rows (id, content) and their FTS rows; bumps the deletes counter. Inside write(). */
  private deleteRows(rows: readonly Record<string, unknown>[]): number {
    if (rows.length === 0) return 0;
    const deleteFts = this.statement("INSERT INTO entries_fts (entries_fts, rowid, content) VALUES ('delete', ?, ?)");
    const deleteEntry = this.statement('DELETE FROM entries WHERE id = ?');
    const deleteVector = this.statement('DELETE FROM entry_vectors WHERE id = ?');
    for (const row of rows) {
      deleteFts.run(Number(row.id), String(row.content));
      deleteEntry.run(Number(row.id));
      deleteVector.run(Number(row.id));
      this.index?.remove(Number(row.id));
    }
    const counter = this.statement("SELECT value FROM meta WHERE key = 'deletes'");
    const seen = String(counter.get()!.value) === this.indexedDeletes;
    this.statement("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'deletes'").run();
    // This process's index already lost the rows: unless another process deleted too since the
    // index was built, it stays valid under the new counter.
    if (seen) this.indexedDeletes = String(counter.get()!.value);
    return rows.length;
  }

  private deleteCheckpoints(where: string, params: SqlValue[]): CheckpointRecord[] {
    const records = this.statement(`SELECT id, session_id, turn, entry_key, bytes, at FROM checkpoints WHERE namespace = ? AND ${where}`)
      .all(this.namespace, ...params)
      .map(checkpointRecord);
    const remove = this.statement('DELETE FROM checkpoints WHERE id = ?');
    for (const record of records) remove.run(record.id);
    return records;
  }

  private async finishRemoval(rows: number, checkpoints: CheckpointRecord[], cache: CheckpointCache | undefined): Promise<MemoryRemoved> {
    let cacheEntries = 0;
    let cacheErrors = 0;
    if (cache) {
      // The records are gone first: an entry whose deletion fails is an orphan the cache's own
      // bound evicts, never a record pointing at nothing.
      // One call per session and key: two sessions that held the same window can have checkpoint
      // entries of the same key, each in its own session's directory.
      const unique = new Map(checkpoints.map((c) => [`${c.sessionId}\0${c.entryKey}`, c]));
      for (const checkpoint of unique.values()) {
        try {
          const deleted = await cache.delete(checkpoint.entryKey, checkpoint);
          if (deleted !== 0 && deleted !== false) cacheEntries++;
        } catch {
          cacheErrors++;
        }
      }
    }
    return { rows, checkpoints: checkpoints.length, cacheEntries, cacheErrors };
  }

  private rowsById(ids: readonly number[]): Map<number, EntryRow> {
    const rows = new Map<number, EntryRow>();
    if (ids.length === 0) return rows;
    const found = this.read(() =>
      this.statement(`SELECT id, kind, session_id, role, content, turn, at, metadata FROM entries WHERE id IN (${ids.map(() => '?').join(',')})`).all(...ids),
    );
    for (const row of found) rows.set(Number(row.id), row as unknown as EntryRow);
    return rows;
  }

  private keywordSearch(query: string, filter: SearchFilter, limit: number): VectorHit[] {
    const words = queryWords(query);
    if (words.length === 0) return [];
    // Documents per word, counted only up to the budget: FTS5 stops reading a doclist at the LIMIT,
    // where fts5vocab would read the whole doclist of a common word to count it.
    const count = this.statement('SELECT COUNT(*) AS n FROM (SELECT 1 FROM entries_fts WHERE entries_fts MATCH ? LIMIT ?)');
    const documents = this.read(() => words.map((word) => Number(count.get(`"${word}"`, KEYWORD_DOCUMENT_BUDGET + 1)!.n)));
    const match = anyOfWords(rankingWords(words, documents, KEYWORD_DOCUMENT_BUDGET))!;
    const { sql, params } = filter.sql();
    // CROSS JOIN keeps FTS5 the outer loop: the planner would otherwise walk the namespace's rows and
    // test each against the match.
    const found = this.read(() =>
      this.statement(
        `SELECT e.id AS id, bm25(entries_fts) AS rank FROM entries_fts CROSS JOIN entries e ON e.id = entries_fts.rowid WHERE entries_fts MATCH ? AND e.namespace = ?${sql} ORDER BY rank, e.id LIMIT ?`,
      ).all(match, this.namespace, ...params, limit),
    );
    return found.map((row) => ({ id: Number(row.id), score: -Number(row.rank) }));
  }

  private vectorSearch(query: Float32Array, filter: SearchFilter, limit: number): VectorHit[] {
    if (this.dimension !== null && query.length !== this.dimension) {
      throw new KvstashError('E_MEMORY_EMBED', `the query's vector has ${query.length} dimensions, the memory's ${this.dimension}: use the embedding model the memory was filled with`);
    }
    if (filter.scope === 'session') {
      // One session's rows: an exact scan of them beats filtering the namespace's ranking.
      const { sql, params } = filter.sql();
      const rows = this.read(() =>
        this.statement(`SELECT e.id AS id, v.vector AS vector FROM entries e JOIN entry_vectors v ON v.id = e.id WHERE e.namespace = ?${sql}`).all(this.namespace, ...params),
      );
      return rows
        .map((row) => ({ id: Number(row.id), score: dot(query, bytesVector(row.vector)) }))
        .sort((a, b) => b.score - a.score || a.id - b.id)
        .slice(0, limit);
    }
    this.syncIndex();
    const index = this.index;
    if (!index || index.size === 0) return [];
    if (!filter.filters) return index.search(query, limit);
    // Filtered: take more of the ranking until enough pass the filter or the index is exhausted.
    for (let k = limit * 2; ; k *= 4) {
      const hits = index.search(query, Math.min(k, index.size));
      const rows = this.rowsById(hits.map((h) => h.id));
      const kept = hits.filter((h) => {
        const row = rows.get(h.id);
        return row !== undefined && filter.accepts(row);
      });
      if (kept.length >= limit || k >= index.size) return kept.slice(0, limit);
    }
  }

  /** Brings the in-memory index up to the database: new rows (any process's), or a rebuild after deletes. */
  private syncIndex(): void {
    if (this.dimension === null) {
      const dim = this.read(() => this.statement("SELECT value FROM meta WHERE key = 'embed_dim'").get());
      if (!dim) return;
      this.dimension = Number(dim.value);
    }
    const dataVersion = Number(this.read(() => this.statement('PRAGMA data_version').get()!.data_version));
    if (this.index && !this.ownWrites && dataVersion === this.dataVersion) return;
    this.dataVersion = dataVersion;
    this.ownWrites = false;
    const deletes = String(this.read(() => this.statement("SELECT value FROM meta WHERE key = 'deletes'").get()!.value));
    if (!this.index || deletes !== this.indexedDeletes) {
      this.index = new VectorIndex(this.dimension);
      this.indexedThrough = 0;
      this.indexedDeletes = deletes;
    }
    const statement = this.statement('SELECT id, vector FROM entry_vectors WHERE namespace = ? AND id > ? ORDER BY id LIMIT 4096');
    for (;;) {
      const rows = this.read(() => statement.all(this.namespace, this.indexedThrough));
      if (rows.length === 0) break;
      const ids: number[] = [];
      const vectors: Float32Array[] = [];
      for (const row of rows) {
        const vector = bytesVector(row.vector);
        // A text with nothing to embed can get a zero vector: it is like nothing, so not indexed.
        if (vector.some((x) => x !== 0)) {
          ids.push(Number(row.id));
          vectors.push(vector);
        }
      }
      this.index.addMany(ids, vectors);
      this.indexedThrough = Number(rows[rows.length - 1]!.id);
    }
  }

  /**
   * Embeds texts when the memory has an embed function; checks count, type and dimension. A blank
   * text gets no vector (null) and is not sent: an embedding model has no token to pool for it
   * (model.embed refuses it), and it would mean nothing to a vector search anyway.
   */
  private async embedTexts(allTexts: string[]): Promise<Array<Float32Array | null> | undefined> {
    if (!this.embedFn) return undefined;
    const slots = allTexts.map((text, i) => (/\S/.test(text) ? i : -1)).filter((i) => i >= 0);
    if (slots.length === 0) return allTexts.map(() => null);
    const texts = slots.map((i) => allTexts[i]!);
    let vectors: Float32Array[];
    try {
      vectors = await this.embedFn(texts);
    } catch (err) {
      throw new KvstashError('E_MEMORY_EMBED', `the embed function failed: ${(err as Error)?.message ?? String(err)}`, { cause: err });
    }
    if (!Array.isArray(vectors) || vectors.length !== texts.length || vectors.some((v) => !(v instanceof Float32Array) || v.length === 0)) {
      throw new KvstashError('E_MEMORY_EMBED', `the embed function must resolve with one non-empty Float32Array per text (${texts.length} asked)`);
    }
    if (vectors.some((v) => v.some((x) => !Number.isFinite(x)))) {
      throw new KvstashError('E_MEMORY_EMBED', 'the embed function returned a vector with NaN or infinite elements: the model is broken or its output overflowed');
    }
    const dim = vectors[0]!.length;
    if (vectors.some((v) => v.length !== dim) || (this.dimension !== null && dim !== this.dimension)) {
      throw new KvstashError(
        'E_MEMORY_EMBED',
        `the embed function returned ${dim}-dimensional vectors, the memory holds ${this.dimension ?? 'other'}-dimensional ones: one memory needs one embedding model`,
      );
    }
    if (this.dimension === null) {
      this.write(() => {
        const stored = this.statement("SELECT value FROM meta WHERE key = 'embed_dim'").get();
        if (stored && Number(stored.value) !== dim) {
          throw new KvstashError('E_MEMORY_EMBED', `the embed function returned ${dim}-dimensional vectors, the memory holds ${stored.value}-dimensional ones`);
        }
        this.statement("INSERT OR IGNORE INTO meta (key, value) VALUES ('embed_dim', ?)").run(String(dim));
      });
      this.dimension = dim;
    }
    const result: Array<Float32Array | null> = allTexts.map(() => null);
    slots.forEach((slot, i) => (result[slot] = normalizeInPlace(Float32Array.from(vectors[i]!))));
    return result;
  }
}

/** Which rows a search may return and in which tier, as SQL for FTS and as a predicate for vectors. */
class SearchFilter {
  readonly filters: boolean;
  constructor(
    readonly sessionId: string | undefined,
    readonly scope: 'session' | 'namespace',
    readonly beforeTurn: number | undefined,
    readonly tiers: readonly MemoryTier[] | undefined,
  ) {
    this.filters = sessionId !== undefined || tiers !== undefined;
  }

  tierOf(row: { kind: string; session_id: string }): MemoryTier {
    if (row.kind === 'summary') return 'summary';
    return this.sessionId === undefined || row.session_id === this.sessionId ? 'session' : 'other';
  }

  accepts(row: EntryRow): boolean {
    if (this.sessionId !== undefined) {
      if (this.scope === 'session' && row.session_id !== this.sessionId) return false;
      if (row.kind === 'summary' && row.session_id !== this.sessionId) return false;
      if (this.beforeTurn !== undefined && row.kind === 'turn' && row.session_id === this.sessionId && row.turn !== null && row.turn >= this.beforeTurn) return false;
    }
    return this.tiers === undefined || this.tiers.includes(this.tierOf(row));
  }

  /** The same conditions as accepts(), on the alias `e`, each starting with AND. */
  sql(): { sql: string; params: SqlValue[] } {
    let sql = '';
    const params: SqlValue[] = [];
    const s = this.sessionId;
    if (s !== undefined) {
      if (this.scope === 'session') {
        sql += ' AND e.session_id = ?';
        params.push(s);
      }
      sql += " AND (e.kind = 'turn' OR e.session_id = ?)";
      params.push(s);
      if (this.beforeTurn !== undefined) {
        sql += " AND NOT (e.kind = 'turn' AND e.session_id = ? AND e.turn IS NOT NULL AND e.turn >= ?)";
        params.push(s, this.beforeTurn);
      }
    }
    if (this.tiers !== undefined) {
      const kinds: string[] = [];
      if (this.tiers.includes('summary')) kinds.push("e.kind = 'summary'");
      if (s === undefined) {
        if (this.tiers.includes('session')) kinds.push("e.kind = 'turn'");
      } else {
        if (this.tiers.includes('session')) kinds.push("(e.kind = 'turn' AND e.session_id = ?)") && params.push(s);
        if (this.tiers.includes('other')) kinds.push("(e.kind = 'turn' AND e.session_id <> ?)") && params.push(s);
      }
      sql += kinds.length === 0 ? ' AND 0' : ` AND (${kinds.join(' OR ')})`;
    }
    return { sql, params };
  }
}

interface ValidRow {
  sessionId: string;
  role: string;
  content: string;
  turn: number | null;
  at: number;
  metadata: Record<string, unknown> | undefined;
}

function validateAddInput(input: MemoryAddInput, where: string): ValidRow {
  if (input === null || typeof input !== 'object') throw new TypeError(`${where}: needs {sessionId, role, content}`);
  requireString(input.sessionId, `${where}: sessionId`);
  requireString(input.role, `${where}: role`);
  if (typeof input.content !== 'string') throw new TypeError(`${where}: content must be a string`);
  if (input.turn !== undefined) requireCount(input.turn, `${where}: turn`);
  if (input.metadata !== undefined && (input.metadata === null || typeof input.metadata !== 'object' || Array.isArray(input.metadata))) {
    throw new TypeError(`${where}: metadata must be a plain object`);
  }
  return { sessionId: input.sessionId, role: input.role, content: input.content, turn: input.turn ?? null, at: toMillis(input.at, `${where}: at`), metadata: input.metadata };
}

function requireString(value: unknown, what: string): void {
  if (typeof value !== 'string' || value.length === 0) throw new TypeError(`${what} must be a non-empty string`);
}

function requireCount(value: unknown, what: string): void {
  if (!Number.isSafeInteger(value) || (value as number) < 0) throw new RangeError(`${what} must be an integer >= 0`);
}

function toMillis(value: Date | number | undefined, what: string): number {
  if (value === undefined) return Date.now();
  const ms = value instanceof Date ? value.getTime() : value;
  if (typeof ms !== 'number' || !Number.isFinite(ms)) throw new RangeError(`${what} must be a valid Date or milliseconds since the epoch`);
  return Math.round(ms);
}

function closedError(): KvstashError {
  return new KvstashError('E_DISPOSED', 'the Memory is closed: open it again with Memory.open');
}

function vectorBytes(vector: Float32Array): Buffer {
  return Buffer.from(vector.buffer, vector.byteOffset, vector.byteLength);
}

function bytesVector(blob: unknown): Float32Array {
  // Copy: the driver's bytes may not be 4-byte aligned.
  const bytes = blobBytes(blob);
  const vector = new Float32Array(bytes.length / 4);
  new Uint8Array(vector.buffer).set(bytes);
  return vector;
}

function dot(a: Float32Array, b: Float32Array): number {
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i]! * b[i]!;
  return sum;
}

function checkpointRecord(row: Record<string, unknown>): CheckpointRecord {
  return { id: Number(row.id), sessionId: String(row.session_id), turn: Number(row.turn), entryKey: String(row.entry_key), bytes: Number(row.bytes), at: Number(row.at) };
}

function toHit(row: EntryRow, score: number, tier: MemoryTier): MemoryHit {
  const hit: MemoryHit = {
    id: Number(row.id),
    content: row.content,
    role: row.role,
    sessionId: row.session_id,
    turn: row.turn === null ? null : Number(row.turn),
    score,
    tier,
    at: Number(row.at),
  };
  if (row.metadata !== null) hit.metadata = JSON.parse(row.metadata) as Record<string, unknown>;
  return hit;
}
