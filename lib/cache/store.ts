/**
 * Where cache entries live outside a process. `CacheStore` is what a shared store (a network file
 * system, Redis, an object store) implements; `DirectoryStore` is the local disk tier and the
 * reference implementation.
 *
 * Entries are immutable: a key always names the same bytes, so stores need no locking; writers
 * replace whole entries atomically and readers verify what they read.
 *
 * A directory store's naming contract: entry files are named `<key>.kvstash` after the key of
 * their own header. A file named otherwise is not an entry of the store (E_CACHE_CORRUPT: it is
 * never listed, restored or counted as removed; `verify({remove: true})` removes it). Names
 * starting with a dot are never looked at (temporary files of writers).
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { KvstashError } from '../errors.js';
import { ENTRY_EXTENSION, isSameEntry, openEntryFile, readEntryFrom, writeEntry, type EntryFile, type EntryHeader } from './entry.js';
import { writeFileAtomic, writeFully } from '../util/atomic-file.js';
import { readExactly, type FileIdentity, type OpenedFile } from '../util/regular-file.js';
import type { EntryIdentity } from './identity.js';

export interface StoredEntry {
  key: string;
  /** The entry's header: lookups match prompts against its tokens without fetching payloads. */
  header: EntryHeader;
  bytes: number;
  /** Last use, as the store knows it (ms since the epoch). */
  lastUsedMs: number;
}

export interface CacheStore {
  /** The entries the store holds now. */
  list(): Promise<StoredEntry[]>;
  /** The complete entry bytes (as written by encodeEntry), or undefined when absent. */
  get(key: string): Promise<Buffer | undefined>;
  put(key: string, bytes: Uint8Array): Promise<void>;
  delete(key: string): Promise<void>;
  /**
   * Optional: the entries made with `identity` whose tokens share the longest prefixes with
   * `tokens`, best first (a few, not all). A store with an index (RedisStore) answers a lookup
   * this way in a round trip or two whatever the number of entries; without it, list() is used.
   */
  match?(identity: EntryIdentity, tokens: Int32Array): Promise<StoredEntry[]>;
  /** Optional: get() for a store that verifies every chunk of what it fetches (decodeEntry): the
   * entry parsed, its payload, and the bytes, so the caller need not verify them again. */
  getVerified?(key: string): Promise<{ bytes: Buffer; entry: EntryFile; payload: Buffer } | undefined>;
}

export interface ScannedFile {
  name: string;
  size: number;
  mtimeMs: number;
  entry: EntryFile | Error;
}

let asideCounter = 0;

/** How long before a scan the directory's mtime must lie for an unchanged mtime to prove an
 * unchanged directory: far above any file system's timestamp granularity. */
const SETTLED_NS = 200_000_000n;

/** A directory of `<key>.kvstash` files. The index is the directory itself, re-read on demand. */
export class DirectoryStore implements CacheStore {
  /** Parsed headers by file name, kept while the file is the same inode of the same size (entries
   * are replaced by rename, never rewritten in place; touch() changes only the mtime). An inode
   * number can be reused by a later file of the same size: openEntry() notices and forgets it. */
  private readonly parsed = new Map<string, { dev: bigint; ino: bigint; size: number; entry: EntryFile | Error }>();
  /** The last scan, and the directory as it saw it (scan({reuse})). */
  private listing?: { ino: bigint; mtimeNs: bigint; settled: boolean; files: ScannedFile[] };

  constructor(readonly dir: string) {}

  pathOf(key: string): string {
    return path.join(this.dir, `${key}${ENTRY_EXTENSION}`);
  }

  async list(): Promise<StoredEntry[]> {
    return (await this.scan()).flatMap(({ name, size, mtimeMs, entry }) =>
      entry instanceof Error ? [] : [{ key: entry.key, header: entry.header, bytes: size, lastUsedMs: mtimeMs }],
    );
  }

  /**
   * Every entry file with its parsed header (or the reason it is corrupt). Files that appeared,
   * changed or vanished since the last scan are noticed: another process may share the directory.
   *
   * With `reuse` (a restore's lookup), the previous scan is returned when one stat of the directory
   * proves that no file was added, removed or renamed since: every such change sets the
   * directory's mtime, and entries are only ever replaced by rename. The proof needs the previous
   * scan to have begun well after the mtime it saw (file timestamps tick coarsely, a jiffy or so, so
   * a change in the same tick would leave the mtime equal). This saves a restore the thread-pool
   * round trips of readdir and a stat per entry (0.3-1.5 ms measured here). The files' own mtimes
   * (last use, for eviction) may then be stale: eviction and listing scan fresh.
   */
  async scan(options: { reuse?: boolean } = {}): Promise<ScannedFile[]> {
    // Synchronous on purpose: this one stat is all a restore pays when nothing changed, and a
    // thread-pool round trip costs ≈ 0.15 ms here, more when the pool is busy with decodes.
    let directory: fs.BigIntStats | null;
    try {
      directory = fs.statSync(this.dir, { bigint: true });
    } catch {
      directory = null;
    }
    const previous = this.listing;
    if (options.reuse && previous?.settled && directory && directory.ino === previous.ino && directory.mtimeNs === previous.mtimeNs) {
      return previous.files;
    }
    const scannedAtNs = BigInt(Date.now()) * 1_000_000n;
    let names: string[];
    try {
      names = (await fsp.readdir(this.dir)).filter((n) => n.endsWith(ENTRY_EXTENSION) && !n.startsWith('.'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    // Concurrently: a restore scans first, and one stat after another would cost a thread-pool
    // round trip per entry.
    const scanned = await Promise.all(
      names.map(async (name) => {
        let stat: fs.BigIntStats;
        try {
          // lstat: the name itself, not where a symlink points (openEntryFile refuses symlinks).
          stat = await fsp.lstat(path.join(this.dir, name), { bigint: true });
        } catch {
          return null; // deleted meanwhile
        }
        const size = Number(stat.size);
        let known = this.parsed.get(name);
        if (!known || known.size !== size || known.ino !== stat.ino || known.dev !== stat.dev) {
          const read = await this.readNamed(name);
          if (read === undefined) return null; // evicted by another process since readdir: a miss
          // Keyed by the file that was read, which may be newer than the one lstat saw.
          known = read instanceof Error ? { dev: stat.dev, ino: stat.ino, size, entry: read } : { ...read.identity!, size: read.fileSize, entry: read };
          this.parsed.set(name, known);
        }
        return { name, size, mtimeMs: Number(stat.mtimeMs), entry: known.entry };
      }),
    );
    const out = scanned.filter((file) => file !== null);
    const present = new Set(names);
    for (const name of this.parsed.keys()) if (!present.has(name)) this.parsed.delete(name);
    this.listing = directory
      ? { ino: directory.ino, mtimeNs: directory.mtimeNs, settled: scannedAtNs - directory.mtimeNs > SETTLED_NS, files: out }
      : undefined;
    return out;
  }

  /** The parsed header of one file, an Error saying why it is not an entry of this store, or
   * undefined when nothing is there any more. */
  private async readNamed(name: string): Promise<EntryFile | Error | undefined> {
    try {
      const opened = await openEntryFile(path.join(this.dir, name));
      if (!opened) return undefined;
      try {
        const entry = await readEntryFrom(opened);
        return this.namingProblem(name, entry) ?? entry;
      } finally {
        await opened.handle.close();
      }
    } catch (err) {
      return err as Error;
    }
  }

  /** Why a parsed entry under this file name breaks the naming contract, or undefined. */
  namingProblem(name: string, entry: EntryFile): KvstashError | undefined {
    if (name === `${entry.key}${ENTRY_EXTENSION}`) return undefined;
    const reason = `its file name is not its key (${entry.key}${ENTRY_EXTENSION})`;
    return new KvstashError('E_CACHE_CORRUPT', `cache entry ${path.join(this.dir, name)} is corrupt: ${reason}; it will not be loaded`, { reason });
  }

  /**
   * Opens the file of a scanned entry for a restore: undefined when it is gone or is no longer the
   * file that was scanned (another process evicted it, or re-saved the key by renaming a new file
   * over it). Either is a miss; the next scan reads the new file. The caller closes the file.
   */
  async openEntry(name: string, entry: EntryFile): Promise<OpenedFile | undefined> {
    const opened = await openEntryFile(path.join(this.dir, name));
    if (!opened) return this.forget(name);
    if (await isSameEntry(opened, entry).catch(() => false)) return opened;
    await opened.handle.close();
    return this.forget(name);
  }

  private forget(name: string): undefined {
    this.parsed.delete(name);
    this.listing = undefined;
    return undefined;
  }

  async get(key: string): Promise<Buffer | undefined> {
    const opened = await openEntryFile(this.pathOf(key));
    if (!opened) return undefined;
    try {
      const bytes = Buffer.allocUnsafe(opened.size);
      return bytes.subarray(0, await readExactly(opened, bytes, 0));
    } finally {
      await opened.handle.close();
    }
  }

  async put(key: string, bytes: Uint8Array): Promise<void> {
    await fsp.mkdir(this.dir, { recursive: true });
    await writeFileAtomic(this.pathOf(key), (handle) => writeFully(handle, bytes, 0));
  }

  /** Writes an entry from its parts (no intermediate copy of a large payload). */
  async write(key: string, header: EntryHeader, payload: Uint8Array): Promise<number> {
    await fsp.mkdir(this.dir, { recursive: true });
    return writeEntry(this.pathOf(key), header, payload);
  }

  async delete(key: string): Promise<void> {
    await this.unlink(`${key}${ENTRY_EXTENSION}`);
  }

  /** Removes a file of the directory; true when it was there. Only files: a directory or other
   * non-file in its place is E_CACHE_NOT_FILE and stays. */
  async unlink(name: string): Promise<boolean> {
    const file = path.join(this.dir, name);
    this.forget(name);
    try {
      await fsp.unlink(file);
      return true;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return false;
      if (code === 'EISDIR' || code === 'EPERM') {
        const reason = 'it is a directory, not a regular file';
        throw new KvstashError('E_CACHE_NOT_FILE', `cache entry ${file} was not removed: ${reason}; remove it yourself`, { reason, cause: err });
      }
      throw new KvstashError('E_STATE_SAVE', `cache entry ${file} could not be removed (${code ?? 'error'}): check the directory's permissions`, { cause: err });
    }
  }

  /**
   * Removes the file `name` only if it is still the file proven corrupt (same device and inode):
   * another process may have renamed a healthy entry over it since. The name is first renamed
   * aside (atomic), so no rename over it can slip between the check and the removal; a file that
   * proves to be another one is renamed back. True when the corrupt file was removed.
   */
  async removeIfSame(name: string, proven: FileIdentity): Promise<boolean> {
    const file = path.join(this.dir, name);
    // Hidden: scans never look at it, even if this process dies before it is gone.
    const aside = path.join(this.dir, `.${name}.corrupt-${process.pid}-${asideCounter++}`);
    this.forget(name);
    try {
      await fsp.rename(file, aside);
    } catch {
      return false; // gone, or not ours to move
    }
    const now = await fsp.lstat(aside, { bigint: true }).catch(() => undefined);
    if (now && now.dev === proven.dev && now.ino === proven.ino) {
      await fsp.unlink(aside).catch(() => undefined);
      return true;
    }
    // Another file of the same key (a key always names the same bytes): either copy is good.
    await fsp.rename(aside, file).catch(() => undefined);
    return false;
  }

  /** Marks an entry as just used (its mtime), so least-recently-used eviction works across processes. */
  async touch(key: string): Promise<void> {
    const now = new Date();
    await fsp.utimes(this.pathOf(key), now, now).catch(() => undefined);
  }
}
