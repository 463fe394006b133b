/**
 * The one file that loads the SQLite driver. kvstash uses `libsql` (a better-sqlite3-compatible
 * API over SQLite 3.45 with FTS5), an optional dependency whose prebuilt binaries the npm registry
 * serves for linux-x64/arm64 (glibc and musl), macOS and Windows, so `npm install kvstash` never
 * needs a compiler. Where the prebuilt is absent, Memory.open fails with E_MEMORY_DRIVER_MISSING.
 *
 * Three things abort the process inside libsql 0.5 (a Rust panic, not an exception): binding a
 * BigInt, loading an extension, and a statement called with one Buffer as its only argument (taken
 * for named parameters). Nothing here does any: every bound value is a number, a string, a Buffer
 * or null, parameters always reach libsql as one array (the wrapper below), and vectors are
 * searched in kvstash's own index, not in SQL. BLOBs come back as ArrayBuffer from all() and as
 * Buffer from get(); blobBytes() takes either.
 */
import { KvstashError } from '../errors.js';

export type SqlValue = number | string | Buffer | null;

export interface SqlRunResult {
  changes: number;
  lastInsertRowid: number;
}

export interface SqlStatement {
  run(...params: SqlValue[]): SqlRunResult;
  get(...params: SqlValue[]): Record<string, unknown> | undefined;
  all(...params: SqlValue[]): Record<string, unknown>[];
}

export interface SqlDatabase {
  exec(sql: string): void;
  prepare(sql: string): SqlStatement;
  close(): void;
}

interface DriverStatement {
  run(params: SqlValue[]): SqlRunResult;
  get(params: SqlValue[]): Record<string, unknown> | undefined;
  all(params: SqlValue[]): Record<string, unknown>[];
}

interface DriverDatabase {
  exec(sql: string): void;
  prepare(sql: string): DriverStatement;
  close(): void;
}

interface DriverConstructor {
  new (path: string, options?: { timeout?: number }): DriverDatabase;
}

/** Passes parameters as one array, the only form that cannot be mistaken for named parameters. */
class ArrayParamStatement implements SqlStatement {
  constructor(private readonly inner: DriverStatement) {}
  run(...params: SqlValue[]): SqlRunResult {
    return this.inner.run(params);
  }
  get(...params: SqlValue[]): Record<string, unknown> | undefined {
    return this.inner.get(params);
  }
  all(...params: SqlValue[]): Record<string, unknown>[] {
    return this.inner.all(params);
  }
}

class Database implements SqlDatabase {
  constructor(private readonly inner: DriverDatabase) {}
  exec(sql: string): void {
    this.inner.exec(sql);
  }
  prepare(sql: string): SqlStatement {
    return new ArrayParamStatement(this.inner.prepare(sql));
  }
  close(): void {
    this.inner.close();
  }
}

/** A BLOB column's value as bytes, whichever form the driver returned it in. */
export function blobBytes(value: unknown): Uint8Array {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  throw new TypeError(`expected a BLOB, got ${value === null ? 'NULL' : typeof value}`);
}

let driver: DriverConstructor | undefined;

function loadDriver(): DriverConstructor {
  if (driver) return driver;
  try {
    driver = require('libsql') as DriverConstructor;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // libsql itself present but its platform package missing also ends here (its loader throws a
    // plain Error naming @libsql/<platform>), which is the same fix for the user.
    throw new KvstashError(
      'E_MEMORY_DRIVER_MISSING',
      `Memory needs the 'libsql' package (SQLite with FTS5), an optional dependency of kvstash that was not installed` +
        ` for ${process.platform}-${process.arch}: run \`npm install libsql\`` +
        (code === 'MODULE_NOT_FOUND' ? '' : ` (loading it failed: ${(err as Error).message})`),
      { cause: err },
    );
  }
  return driver;
}

/** Opens (creating it if absent) the database file. Driver errors become E_MEMORY_DB. */
export function openDatabase(path: string, busyTimeoutMs: number): SqlDatabase {
  const Driver = loadDriver();
  try {
    return new Database(new Driver(path, { timeout: busyTimeoutMs }));
  } catch (err) {
    throw databaseError(`cannot open the memory database ${path}`, err);
  }
}

/** A failure of SQLite (not a database, disk full, locked past the busy timeout) as a coded error. */
export function databaseError(what: string, err: unknown): KvstashError {
  if (err instanceof KvstashError) return err;
  const code = (err as { code?: string }).code;
  return new KvstashError('E_MEMORY_DB', `${what}: ${(err as Error).message ?? String(err)}${code ? ` (${code})` : ''}`, {
    cause: err,
    ...(code ? { reason: code } : {}),
  });
}
