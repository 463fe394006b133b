/**
 * RedisStore: prompt-cache entries shared by many processes and machines through one Redis.
 *
 * The layout (documented in the README, readable from any language). `P` is the prefix
 * (default `kvstash`), `K` an entry's key (lib/cache/entry.ts entryKey):
 *
 *   P:m:K          the manifest: a string, the entry's head and tail (see below)
 *   P:p:K:W:i      part i of the entry, i = 0..n-1: bytes [i*S, min((i+1)*S, F)) of the entry
 *                  file (encodeEntry's bytes), S the part size; W the write id the manifest names
 *   P:ix:I         the index of one identity I (model fingerprint, backend, KV layout): a hash
 *                  whose fields are token-prefix digests and whose values are entry keys, plus
 *                  the field `index` (value 1), so that an index with no entries still exists
 *
 * Manifest (integers little-endian):
 *
 *   0    8   magic "KVSTMAN\0"
 *   8    4   manifest version (u32, 1)
 *   12   4   part size S (u32, a multiple of the entry's checksum chunk size)
 *   16   8   entry size F (u64)
 *   24   4   head length H (u32): the entry's payload offset
 *   28   4   tail length T (u32): the entry's chunk digests, checksum and trailer
 *   32   16  write id W (ASCII hex)
 *   48   H   entry bytes [0, H): preamble and header (with the tokens: lookups need no payload)
 *   48+H T   entry bytes [F-T, F)
 *
 * Writers put every part first and the manifest last, so a reader that finds a manifest finds a
 * complete entry unless Redis evicted a part since; a fresh write id per write keeps a reader from
 * mixing parts of two writes of one key. Index fields: for n = 64, 128, ... up to the token count,
 * and for the token count itself, the field `hex(SHA-256(I ‖ tokens[0, n) as i32 LE))[0, 24)`
 * holds K. A lookup sends one HMGET of the prompt's own prefix digests, then one MGET of the
 * manifests of the longest keys found: two round trips whatever the number of entries.
 *
 * The index is derived from the manifests, which are the truth: Redis may evict it (any key under
 * an allkeys-* policy; under a volatile-* one when it has a TTL) or someone may delete it, which
 * would hide every entry of the model that is still whole. A lookup that finds no field at all,
 * not even `index`, knows the index is gone and rebuilds it from a SCAN of the manifests before
 * it answers (at most once per INDEX_REBUILD_INTERVAL_MS per identity and process). A write that
 * finds no `index` (HSETNX) rebuilds it too: otherwise its own fields would make an index exist
 * that lacks every entry written before it was lost.
 *
 * Nothing unverified is loaded: the parts are fetched together (over connections of their own,
 * lib/cache/redis-bulk-reader.ts) into one buffer of the entry's size and checked against the entry's chunk digests, and the head and tail against the manifest,
 * before the buffer is returned. A missing or damaged part makes the entry absent: it is deleted
 * (only if its manifest is still the one read) and get() rejects with E_CACHE_CORRUPT, which
 * PromptCache reports as a problem before falling back. What no caller sees as a rejection (a
 * damaged manifest met by a lookup, the connection lost) is emitted as a 'problem' event.
 */
import { createHash, randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { KvstashError } from '../errors.js';
import { RedisBulkReader } from './redis-bulk-reader.js';
import { decodeEntry, readEntryEnds, CHECKSUM_CHUNK_BYTES, type EntryFile } from './entry.js';
import type { EntryIdentity } from './identity.js';
import type { CacheStore, StoredEntry } from './store.js';

export interface RedisStoreOptions {
  /** `redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS; passed to node-redis as is. */
  url: string;
  /** Namespace of every key this store writes. Default `kvstash`. */
  prefix?: string;
  /** Lifetime of an entry, renewed by every hit. Default none: entries stay until deleted or
   * evicted by Redis's maxmemory policy. Unit: seconds. */
  ttlSeconds?: number;
  /** Size of the parts an entry is split into, a multiple of 64 KiB. Default 1 MiB. Unit: bytes. */
  partBytes?: number;
  /** How long the first connection may take before operations fail over to prefill. Default 2000. Unit: ms. */
  connectTimeoutMs?: number;
  /** Bound on each operation (a lookup, a fetch, a write): past it, E_STORE_UNAVAILABLE. Default 5000. Unit: ms. */
  operationTimeoutMs?: number;
  /** Connections of the store's own that the parts of a fetch are read over together, beside the
   * node-redis one that lookups and writes use (so a lookup never waits behind a fetch). Default 2.
   * With `rediss://` the parts go through node-redis instead. Unit: connections. */
  readConnections?: number;
}

/** What a store reports through its 'problem' event: what no caller sees as a rejection (a damaged
 * manifest met in a lookup, the connection lost). PromptCache re-emits them as its own problems. */
export interface StoreProblem {
  code: string;
  message: string;
  key?: string;
}

const MANIFEST_MAGIC = Buffer.from('KVSTMAN\0', 'latin1');
const MANIFEST_VERSION = 1;
const MANIFEST_FIXED_BYTES = 48;
/** Index granularity: prefixes are found at multiples of this many tokens (and at whole entries). */
export const INDEX_BLOCK_TOKENS = 64;
/** Manifests fetched per lookup: the longest distinct matches. */
const LOOKUP_CANDIDATES = 3;
const KNOWN_MANIFESTS = 64;
/** The index field every index has (fields of entries are 24 hex digits, so it cannot collide). */
const INDEX_MARK = 'index';
/** A lost index is rebuilt at most this often per identity by one process: a rebuild SCANs every
 * manifest of the prefix, and an index evicted again and again must not turn lookups into scans. */
const INDEX_REBUILD_INTERVAL_MS = 30_000;

type Reply = Buffer | null | number | string | Reply[];
interface RedisClient {
  isReady: boolean;
  connect(): Promise<unknown>;
  destroy(): void;
  close(): Promise<void>;
  on(event: string, listener: (...args: unknown[]) => void): unknown;
  sendCommand(args: Array<string | Buffer>, options?: unknown): Promise<Reply>;
}

interface Manifest {
  bytes: Buffer;
  entry: EntryFile;
  head: Buffer;
  tail: Buffer;
  partBytes: number;
  writeId: string;
}

interface RedisModule {
  createClient(options: unknown): RedisClient;
  RESP_TYPES: { BLOB_STRING: number };
}

let redisModule: RedisModule | undefined;
/** node-redis, loaded on first use: an optional peer dependency, absent from lean installs. */
function loadRedis(): RedisModule {
  if (redisModule) return redisModule;
  try {
    redisModule = require('redis') as RedisModule;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'MODULE_NOT_FOUND') throw err;
    throw new KvstashError('E_STORE_CLIENT_MISSING', "RedisStore needs the 'redis' package (node-redis), an optional peer dependency: run `npm install redis`", {
      cause: err,
    });
  }
  return redisModule;
}

export class RedisStore extends EventEmitter implements CacheStore {
  readonly url: string;
  readonly prefix: string;
  readonly ttlSeconds: number | undefined;
  readonly partBytes: number;
  readonly connectTimeoutMs: number;
  readonly operationTimeoutMs: number;
  readonly readConnections: number;
  private client?: RedisClient;
  /** Part reads (plain TCP only); undefined with TLS, where node-redis reads them. */
  private readonly partReader: RedisBulkReader | undefined;
  private firstConnection?: Promise<unknown>;
  private connectedOnce = false;
  private down = false;
  private closed = false;
  private readonly binary: unknown;
  /** Manifests of recent lookups, so a fetch right after costs one round trip. */
  private readonly manifests = new Map<string, Manifest>();
  /** Index rebuilds in flight, and when each index was last rebuilt (performance.now()). */
  private readonly indexRebuilds = new Map<string, Promise<boolean>>();
  private readonly indexRebuiltAt = new Map<string, number>();

  constructor(options: RedisStoreOptions) {
    super();
    if (typeof options?.url !== 'string' || !/^rediss?:\/\//.test(options.url)) throw new TypeError('RedisStore: url must be a redis:// or rediss:// URL');
    this.url = options.url;
    this.prefix = options.prefix ?? 'kvstash';
    if (typeof this.prefix !== 'string' || this.prefix.length === 0) throw new TypeError('RedisStore: prefix must be a non-empty string');
    this.ttlSeconds = options.ttlSeconds;
    if (this.ttlSeconds !== undefined && !(Number.isSafeInteger(this.ttlSeconds) && this.ttlSeconds > 0)) throw new RangeError('RedisStore: ttlSeconds must be a positive integer');
    this.partBytes = options.partBytes ?? 1 << 20;
    if (!Number.isSafeInteger(this.partBytes) || this.partBytes <= 0 || this.partBytes % CHECKSUM_CHUNK_BYTES !== 0 || this.partBytes > 512 << 20) {
      throw new RangeError('RedisStore: partBytes must be a multiple of 65536 up to 512 MiB');
    }
    this.connectTimeoutMs = positive(options.connectTimeoutMs ?? 2000, 'connectTimeoutMs');
    this.operationTimeoutMs = positive(options.operationTimeoutMs ?? 5000, 'operationTimeoutMs');
    this.readConnections = options.readConnections ?? 2;
    if (!Number.isSafeInteger(this.readConnections) || this.readConnections < 1 || this.readConnections > 64) throw new RangeError('RedisStore: readConnections must be an integer from 1 to 64');
    this.partReader = this.url.startsWith('redis://') ? new RedisBulkReader(this.url, this.readConnections, this.connectTimeoutMs) : undefined;
    // Every PromptCache using this store listens for its problems.
    this.setMaxListeners(0);
    this.binary = { typeMapping: { [loadRedis().RESP_TYPES.BLOB_STRING]: Buffer } };
  }

  // --- keys ----------------------------------------------------------------------------------

  manifestKey(key: string): string {
    return `${this.prefix}:m:${key}`;
  }

  partKey(key: string, writeId: string, index: number): string {
    return `${this.prefix}:p:${key}:${writeId}:${index}`;
  }

  indexKey(identity: EntryIdentity): string {
    return `${this.prefix}:ix:${identityDigest(identity)}`;
  }

  // --- CacheStore ----------------------------------------------------------------------------

  async match(identity: EntryIdentity, tokens: Int32Array): Promise<StoredEntry[]> {
    const fields = prefixFields(identity, tokens);
    if (fields.length === 0) return [];
    const index = this.indexKey(identity);
    let keys = await this.lookupIndex(index, fields);
    if (keys === null) {
      if (!(await this.rebuildIndex(identity))) return [];
      keys = (await this.lookupIndex(index, fields)) ?? [];
    }
    const chosen: string[] = [];
    for (let i = fields.length - 1; i >= 0 && chosen.length < LOOKUP_CANDIDATES; i--) {
      const key = keys[i]?.toString('latin1');
      if (key && !chosen.includes(key)) chosen.push(key);
    }
    if (chosen.length === 0) return [];
    const manifests = (await this.command(['MGET', ...chosen.map((k) => this.manifestKey(k))], 'lookup')) as Array<Buffer | null>;
    const out: StoredEntry[] = [];
    const stale: string[] = [];
    for (let i = 0; i < chosen.length; i++) {
      const key = chosen[i]!;
      const bytes = manifests[i];
      if (!bytes) {
        // Expired or evicted: its index fields go, now that a lookup paid for them.
        fields.forEach((f, j) => keys[j]?.toString('latin1') === key && stale.push(f.field));
        continue;
      }
      try {
        const manifest = await this.remember(key, bytes);
        out.push({ key, header: manifest.entry.header, bytes: manifest.entry.fileSize, lastUsedMs: Date.parse(manifest.entry.header.createdAt) });
      } catch (err) {
        this.problem({ code: (err as KvstashError).code ?? 'E_CACHE_CORRUPT', message: (err as Error).message, key });
        await this.deleteIfSame(key, bytes).catch(() => undefined);
      }
    }
    if (stale.length > 0) void this.command(['HDEL', index, ...stale], 'index cleanup').catch(() => undefined);
    return out;
  }

  async get(key: string): Promise<Buffer | undefined> {
    return (await this.getVerified(key))?.bytes;
  }

  /** The entry, fetched and verified: every chunk against its digest, head and tail against the
   * manifest. Undefined when absent; E_CACHE_CORRUPT (after deleting it) when a part is missing
   * or damaged; E_STORE_UNAVAILABLE when Redis cannot answer in time. */
  async getVerified(key: string): Promise<{ bytes: Buffer; entry: EntryFile; payload: Buffer } | undefined> {
    let manifest = this.manifests.get(key);
    if (!manifest) {
      const bytes = (await this.command(['GET', this.manifestKey(key)], 'fetch')) as Buffer | null;
      if (!bytes) return undefined;
      manifest = await this.rememberOrDrop(key, bytes);
    }
    for (let attempt = 0; ; attempt++) {
      const fetched = await this.fetchParts(key, manifest);
      if (fetched.manifest === null) {
        this.manifests.delete(key);
        return undefined;
      }
      if (!fetched.manifest.equals(manifest.bytes)) {
        // Re-written by another process since the lookup: the parts named by the new manifest.
        if (attempt > 0) throw this.unavailable('fetch', 'the entry keeps being rewritten');
        manifest = await this.rememberOrDrop(key, fetched.manifest);
        continue;
      }
      let verified;
      try {
        if (fetched.missing >= 0) throw corruptPart(key, `part ${fetched.missing} is missing (evicted or expired)`);
        verified = await decodeEntry(`redis:${key}`, fetched.bytes);
        const { payloadOffset, checkedLength } = verified.entry;
        if (!fetched.bytes.subarray(0, payloadOffset).equals(manifest.head) || !fetched.bytes.subarray(checkedLength).equals(manifest.tail)) {
          throw corruptPart(key, 'its parts do not belong to its manifest');
        }
      } catch (err) {
        this.manifests.delete(key);
        await this.deleteIfSame(key, manifest.bytes).catch(() => undefined);
        throw err;
      }
      void this.refresh(key, manifest).catch(() => undefined);
      return { bytes: fetched.bytes, ...verified };
    }
  }

  async put(key: string, bytes: Uint8Array): Promise<void> {
    const buffer = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    // Only a verified entry is stored: what other machines load must be what this one checked.
    const { entry } = await decodeEntry(`redis:${key}`, buffer);
    if (entry.key !== key) throw new RangeError(`RedisStore.put: the bytes are entry ${entry.key}, not ${key}`);
    const ttl = this.ttlArgs();
    // Entries are immutable: the same key names interchangeable bytes, so one already there stays
    // (its lifetime renewed, as a hit would).
    const existing = (await this.command(['GET', this.manifestKey(key)], 'write')) as Buffer | null;
    if (existing) {
      const known = await this.remember(key, existing).catch(() => undefined);
      if (known) return this.refresh(key, known);
    }
    const writeId = randomBytes(8).toString('hex');
    const parts = Math.ceil(buffer.length / this.partBytes);
    const writes: Array<Promise<Reply>> = [];
    for (let i = 0; i < parts; i++) {
      writes.push(this.command(['SET', this.partKey(key, writeId, i), buffer.subarray(i * this.partBytes, Math.min(buffer.length, (i + 1) * this.partBytes)), ...ttl], 'write'));
    }
    await Promise.all(writes);
    const head = buffer.subarray(0, entry.payloadOffset);
    const tail = buffer.subarray(entry.checkedLength);
    await this.command(['SET', this.manifestKey(key), encodeManifest(head, tail, buffer.length, this.partBytes, writeId), ...ttl], 'write');
    const identity = entry.header;
    const index = this.indexKey(identity);
    // Sent together, run in this order: one round trip.
    const [mark] = await Promise.all([this.command(['HSETNX', index, INDEX_MARK, '1'], 'write'), this.writeIndex(index, indexFieldArgs(key, identity), 'write')]);
    const created = mark === 1;
    // No index before this write: the model's first entry, or its index was evicted and the
    // fields of every entry written before went with it (this write would hide them by making
    // the index exist again): they come back from the manifests, whenever it was last rebuilt.
    // The entry itself is stored and indexed by now: a repair that fails is a problem to report,
    // not a failed write.
    if (created) {
      await this.rebuildIndex(identity, { again: true }).catch((err: unknown) =>
        this.problem({ code: (err as KvstashError).code ?? 'E_STORE_UNAVAILABLE', message: `the lost index could not be rebuilt: ${(err as Error).message}`, key }),
      );
    }
  }

  async delete(key: string): Promise<void> {
    const bytes = (await this.command(['GET', this.manifestKey(key)], 'delete')) as Buffer | null;
    this.manifests.delete(key);
    if (!bytes) return;
    await this.deleteIfSame(key, bytes);
  }

  /** Every entry (a SCAN of the manifests: for listing, never on a restore's path). */
  async list(): Promise<StoredEntry[]> {
    const out: StoredEntry[] = [];
    let cursor = '0';
    do {
      const [next, names] = (await this.command(['SCAN', cursor, 'MATCH', `${this.prefix}:m:*`, 'COUNT', '1000'], 'list')) as [Buffer, Buffer[]];
      cursor = next.toString();
      if (names.length === 0) continue;
      const manifests = (await this.command(['MGET', ...names.map((n) => n.toString('latin1'))], 'list')) as Array<Buffer | null>;
      for (let i = 0; i < names.length; i++) {
        const bytes = manifests[i];
        const key = names[i]!.toString('latin1').slice(this.prefix.length + 3);
        if (!bytes) continue;
        try {
          const { entry } = await parseManifest(key, bytes);
          out.push({ key, header: entry.header, bytes: entry.fileSize, lastUsedMs: Date.parse(entry.header.createdAt) });
        } catch (err) {
          this.problem({ code: (err as KvstashError).code ?? 'E_CACHE_CORRUPT', message: (err as Error).message, key });
        }
      }
    } while (cursor !== '0');
    return out;
  }

  /** Closes the connection; later operations reject with E_STORE_UNAVAILABLE. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.partReader?.reset(this.unavailable('fetch', 'the store is closed'));
    const client = this.client;
    if (!client) return;
    if (client.isReady) await client.close().catch(() => client.destroy());
    else client.destroy();
  }

  // --- internals -----------------------------------------------------------------------------

  /** The entry keys the index holds under `fields` (null where none), or null when the index does
   * not exist: then not even its INDEX_MARK answers. One round trip. */
  private async lookupIndex(index: string, fields: ReadonlyArray<{ field: string }>): Promise<Array<Buffer | null> | null> {
    const replies = (await this.command(['HMGET', index, ...fields.map((f) => f.field), INDEX_MARK], 'lookup')) as Array<Buffer | null>;
    return replies.every((reply) => reply === null) ? null : replies.slice(0, fields.length);
  }

  /** HSET of `fieldArgs` (field, value, ...) into `index`, and its TTL renewed, sent together. */
  private async writeIndex(index: string, fieldArgs: string[], what: string): Promise<void> {
    const writes = [this.command(['HSET', index, ...fieldArgs], what)];
    if (this.ttlSeconds !== undefined) writes.push(this.command(['EXPIRE', index, String(this.ttlSeconds)], what));
    await Promise.all(writes);
  }

  /** Writes the lost index of `identity` again from the manifests of its entries. Resolves whether
   * it found any; concurrent callers share one rebuild. For a lookup, a rebuild within the last
   * INDEX_REBUILD_INTERVAL_MS is not repeated (resolves false); a write (`again`) always rebuilds,
   * as writes are few and each is worth more than a SCAN. */
  private rebuildIndex(identity: EntryIdentity, { again = false } = {}): Promise<boolean> {
    const index = this.indexKey(identity);
    const running = this.indexRebuilds.get(index);
    if (running) return running;
    const last = this.indexRebuiltAt.get(index);
    if (!again && last !== undefined && performance.now() - last < INDEX_REBUILD_INTERVAL_MS) return Promise.resolve(false);
    const rebuild = (async () => {
      const digest = identityDigest(identity);
      const entries = (await this.list()).filter((e) => identityDigest(e.header) === digest);
      await this.writeIndex(index, [INDEX_MARK, '1', ...entries.flatMap((e) => indexFieldArgs(e.key, e.header))], 'index rebuild');
      return entries.length > 0;
    })().finally(() => {
      this.indexRebuilds.delete(index);
      this.indexRebuiltAt.set(index, performance.now());
    });
    this.indexRebuilds.set(index, rebuild);
    return rebuild;
  }

  /** Every part of `manifest`'s write, with the manifest as it is now, in one round trip: the
   * parts land in one buffer of the entry's size (the buffer the caller imports from). */
  private async fetchParts(key: string, manifest: Manifest): Promise<{ manifest: Buffer | null; bytes: Buffer; missing: number }> {
    const size = manifest.entry.fileSize;
    const count = Math.ceil(size / manifest.partBytes);
    const bytes = Buffer.allocUnsafe(size);
    let missing = -1;
    const current = this.command(['GET', this.manifestKey(key)], 'fetch') as Promise<Buffer | null>;
    // One GET per part, all sent at once: each part lands in place as it arrives instead of after
    // the last one, as one MGET reply would.
    const parts = Array.from({ length: count }, (_, i) => {
      const start = i * manifest.partBytes;
      const expected = Math.min(manifest.partBytes, size - start);
      return this.readPart(this.partKey(key, manifest.writeId, i), bytes, start, expected).then((length) => {
        if (length !== expected && (missing < 0 || i < missing)) missing = i;
      });
    });
    const [now] = await Promise.all([current, ...parts]);
    return { manifest: now as Buffer | null, bytes, missing };
  }

  /** GET of one part into `target` at `offset`: the value's length (its bytes copied when it is
   * `expected` long), null when the part is gone. */
  private async readPart(partKey: string, target: Buffer, offset: number, expected: number): Promise<number | null> {
    const reader = this.partReader;
    if (!reader) {
      const part = (await this.command(['GET', partKey], 'fetch')) as Buffer | null;
      if (part?.length === expected) part.copy(target, offset);
      return part ? part.length : null;
    }
    // Fails at once while the main connection knows Redis is away, as every other operation does.
    await this.connected('fetch');
    try {
      return await withTimeout(reader.get(partKey, target, offset, expected), this.operationTimeoutMs);
    } catch (err) {
      if (err instanceof TimedOut) {
        // Replies still on their way would only arrive late for nobody: the connections start over.
        const timedOut = this.unavailable('fetch', `no answer within ${this.operationTimeoutMs} ms`);
        reader.reset(timedOut);
        throw timedOut;
      }
      if (err instanceof KvstashError) throw err;
      throw this.unavailable('fetch', (err as Error).message ?? String(err), err);
    }
  }

  private async rememberOrDrop(key: string, bytes: Buffer): Promise<Manifest> {
    try {
      return await this.remember(key, bytes);
    } catch (err) {
      await this.deleteIfSame(key, bytes).catch(() => undefined);
      throw err;
    }
  }

  private async remember(key: string, bytes: Buffer): Promise<Manifest> {
    const known = this.manifests.get(key);
    if (known?.bytes.equals(bytes)) return known;
    const manifest = await parseManifest(key, bytes);
    if (manifest.entry.key !== key) throw corruptPart(key, `its manifest describes entry ${manifest.entry.key}`);
    this.manifests.delete(key);
    this.manifests.set(key, manifest);
    if (this.manifests.size > KNOWN_MANIFESTS) this.manifests.delete(this.manifests.keys().next().value!);
    return manifest;
  }

  /** A hit renews the entry's lifetime: its manifest, its parts and its identity's index. */
  private async refresh(key: string, manifest: Manifest): Promise<void> {
    if (this.ttlSeconds === undefined) return;
    const ttl = String(this.ttlSeconds);
    const count = Math.ceil(manifest.entry.fileSize / manifest.partBytes);
    const renewals = [this.command(['EXPIRE', this.manifestKey(key), ttl], 'refresh'), this.command(['EXPIRE', this.indexKey(manifest.entry.header), ttl], 'refresh')];
    for (let i = 0; i < count; i++) renewals.push(this.command(['EXPIRE', this.partKey(key, manifest.writeId, i), ttl], 'refresh'));
    await Promise.all(renewals);
  }

  /** Deletes the manifest and parts of an entry, only while its manifest is still `bytes` (another
   * process may have written a healthy entry of the same key since). */
  private async deleteIfSame(key: string, bytes: Buffer): Promise<void> {
    let writeId: string;
    let count: number;
    try {
      ({ writeId, count } = manifestLayout(bytes));
    } catch {
      writeId = '';
      count = 0;
    }
    const keys = [this.manifestKey(key), ...Array.from({ length: count }, (_, i) => this.partKey(key, writeId, i))];
    await this.command(['EVAL', DELETE_IF_SAME, String(keys.length), ...keys, bytes], 'delete');
  }

  private ttlArgs(): string[] {
    return this.ttlSeconds === undefined ? [] : ['EX', String(this.ttlSeconds)];
  }

  private async connected(what: string): Promise<RedisClient> {
    if (this.closed) throw this.unavailable(what, 'the store is closed');
    if (!this.client) {
      const { createClient } = loadRedis();
      const client = createClient({
        url: this.url,
        disableOfflineQueue: true,
        socket: { connectTimeout: this.connectTimeoutMs, reconnectStrategy: (retries: number) => Math.min(50 * 2 ** Math.min(retries, 6), 2000) },
      });
      client.on('error', (err) => {
        if (this.down) return;
        this.down = true;
        this.problem({ code: 'E_STORE_UNAVAILABLE', message: `Redis at ${redactUrl(this.url)} is unreachable (${(err as Error).message}); restores fall back to prefill until it returns` });
      });
      client.on('ready', () => {
        this.down = false;
        this.connectedOnce = true;
      });
      this.client = client;
      this.firstConnection = client.connect().catch(() => undefined);
    }
    const client = this.client;
    if (client.isReady) return client;
    if (!this.connectedOnce && this.firstConnection) {
      // Only the first operations wait (at most connectTimeoutMs): while Redis stays away, later
      // ones fail at once instead of each paying the timeout again.
      const first = this.firstConnection;
      await withTimeout(first, this.connectTimeoutMs).catch(() => undefined);
      if (this.firstConnection === first) this.firstConnection = undefined;
      if (client.isReady) return client;
    }
    throw this.unavailable(what, 'not connected (reconnecting in the background)');
  }

  private async command(args: Array<string | Buffer>, what: string): Promise<Reply> {
    const client = await this.connected(what);
    try {
      return await withTimeout(client.sendCommand(args, this.binary), this.operationTimeoutMs);
    } catch (err) {
      if (err instanceof TimedOut) throw this.unavailable(what, `no answer within ${this.operationTimeoutMs} ms`);
      const message = (err as Error).message ?? String(err);
      // Replies Redis sends as errors (OOM under a maxmemory policy that evicts nothing, READONLY)
      // and a connection lost mid-command: either way the store cannot serve now.
      throw this.unavailable(what, message, err);
    }
  }

  private unavailable(what: string, reason: string, cause?: unknown): KvstashError {
    return new KvstashError('E_STORE_UNAVAILABLE', `Redis ${what} at ${redactUrl(this.url)} failed: ${reason}; the prompt is evaluated instead`, { reason, cause });
  }

  private problem(problem: StoreProblem): void {
    this.emit('problem', problem);
  }
}

/** Deletes KEYS when KEYS[1] still holds ARGV[1]. */
const DELETE_IF_SAME = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', unpack(KEYS)) end return 0";

class TimedOut extends Error {}

function withTimeout<T>(work: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    work,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new TimedOut()), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

function positive(value: number, name: string): number {
  if (!Number.isFinite(value) || value <= 0) throw new RangeError(`RedisStore: ${name} must be a positive number of milliseconds`);
  return value;
}

function corruptPart(key: string, reason: string): KvstashError {
  return new KvstashError('E_CACHE_CORRUPT', `cache entry redis:${key} is corrupt: ${reason}; it was deleted and will not be loaded`, { reason });
}

function redactUrl(url: string): string {
  return url.replace(/\/\/[^@/]*@/, '//***@');
}

/** What identifies the entries that may load into one context: everything but the tokens. */
function identityDigest(identity: EntryIdentity): string {
  const layout = Object.keys(identity.layout)
    .sort()
    .map((k) => [k, identity.layout[k]]);
  const text = JSON.stringify([identity.kind, identity.backend.name, identity.backend.version, identity.model.fingerprint, identity.model.fingerprintScheme, layout]);
  return createHash('sha256').update(text).digest('hex').slice(0, 32);
}

/**
 * The index fields of a token list: the digest of each prefix of a multiple of INDEX_BLOCK_TOKENS
 * tokens, and of the whole list. A writer indexes every one; a lookup asks for its prompt's.
 */
function prefixFields(identity: EntryIdentity, tokens: Int32Array): Array<{ length: number; field: string }> {
  const hash = createHash('sha256').update(identityDigest(identity));
  const bytes = Buffer.from(tokens.buffer, tokens.byteOffset, tokens.byteLength);
  const out: Array<{ length: number; field: string }> = [];
  for (let n = INDEX_BLOCK_TOKENS; n <= tokens.length; n += INDEX_BLOCK_TOKENS) {
    hash.update(bytes.subarray((n - INDEX_BLOCK_TOKENS) * 4, n * 4));
    out.push({ length: n, field: hash.copy().digest('hex').slice(0, 24) });
  }
  const whole = tokens.length - (tokens.length % INDEX_BLOCK_TOKENS);
  if (whole !== tokens.length) {
    hash.update(bytes.subarray(whole * 4));
    out.push({ length: tokens.length, field: hash.digest('hex').slice(0, 24) });
  }
  return out;
}

/** The index fields of one entry, as HSET arguments: each prefix digest of its tokens → its key. */
function indexFieldArgs(key: string, header: EntryIdentity & { tokens: ArrayLike<number> }): string[] {
  return prefixFields(header, Int32Array.from(header.tokens)).flatMap((f) => [f.field, key]);
}

function encodeManifest(head: Buffer, tail: Buffer, entryBytes: number, partBytes: number, writeId: string): Buffer {
  const out = Buffer.alloc(MANIFEST_FIXED_BYTES + head.length + tail.length);
  MANIFEST_MAGIC.copy(out, 0);
  out.writeUInt32LE(MANIFEST_VERSION, 8);
  out.writeUInt32LE(partBytes, 12);
  out.writeBigUInt64LE(BigInt(entryBytes), 16);
  out.writeUInt32LE(head.length, 24);
  out.writeUInt32LE(tail.length, 28);
  out.write(writeId, 32, 16, 'latin1');
  head.copy(out, MANIFEST_FIXED_BYTES);
  tail.copy(out, MANIFEST_FIXED_BYTES + head.length);
  return out;
}

/** The fixed fields of a manifest; throws a plain Error when they do not parse. */
function manifestLayout(bytes: Buffer): { partBytes: number; entryBytes: number; headBytes: number; tailBytes: number; writeId: string; count: number } {
  if (bytes.length < MANIFEST_FIXED_BYTES || !bytes.subarray(0, 8).equals(MANIFEST_MAGIC)) throw new Error('it does not start with the manifest magic');
  if (bytes.readUInt32LE(8) !== MANIFEST_VERSION) throw new Error(`manifest version ${bytes.readUInt32LE(8)}, this kvstash reads version ${MANIFEST_VERSION}`);
  const partBytes = bytes.readUInt32LE(12);
  const entryBytes = Number(bytes.readBigUInt64LE(16));
  const headBytes = bytes.readUInt32LE(24);
  const tailBytes = bytes.readUInt32LE(28);
  const writeId = bytes.toString('latin1', 32, 48);
  if (partBytes === 0 || partBytes % CHECKSUM_CHUNK_BYTES !== 0) throw new Error(`its part size ${partBytes} is not a multiple of 64 KiB`);
  if (!/^[0-9a-f]{16}$/.test(writeId)) throw new Error('its write id is not 16 hex digits');
  if (MANIFEST_FIXED_BYTES + headBytes + tailBytes !== bytes.length || !Number.isSafeInteger(entryBytes) || headBytes + tailBytes > entryBytes) {
    throw new Error('its lengths disagree with its size');
  }
  return { partBytes, entryBytes, headBytes, tailBytes, writeId, count: Math.ceil(entryBytes / partBytes) };
}

async function parseManifest(key: string, bytes: Buffer): Promise<Manifest> {
  let layout;
  try {
    layout = manifestLayout(bytes);
  } catch (err) {
    throw corruptPart(key, `its manifest is damaged: ${(err as Error).message}`);
  }
  const head = bytes.subarray(MANIFEST_FIXED_BYTES, MANIFEST_FIXED_BYTES + layout.headBytes);
  const tail = bytes.subarray(MANIFEST_FIXED_BYTES + layout.headBytes);
  const entry = await readEntryEnds(`redis:${key}`, head, tail, layout.entryBytes);
  if (entry.chunkBytes > layout.partBytes || layout.partBytes % entry.chunkBytes !== 0) throw corruptPart(key, 'its parts do not hold whole checksum chunks');
  return { bytes, entry, head, tail, partBytes: layout.partBytes, writeId: layout.writeId };
}

