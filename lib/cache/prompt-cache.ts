/**
 * PromptCache: finds the longest cached prefix of a prompt and puts it into a context sequence.
 *
 * Tiers, fastest first: a sequence of the same context that already holds the prefix (copied
 * with memory.copy: with a unified KV cache no bytes move) → RAM (state buffers, LRU) → disk
 * (entry files, LRU, shared safely between processes) → an optional shared CacheStore.
 * A cache problem is never fatal: it is counted, emitted as a 'problem' event, and the caller
 * falls back to evaluating the prompt.
 */
import { EventEmitter } from 'node:events';
import path from 'node:path';
import { KvstashError, type KvstashErrorCode } from '../errors.js';
import type { Context } from '../llama/context.js';
import { requireInteger, toInt32Array } from '../util/validate.js';
import { userCacheDir } from '../util/paths.js';
import { ENTRY_EXTENSION, decodeEntry, encodeEntry, entryKey, openEntryFile, readVerifiedEntryFrom, verifiedRanges, type EntryFile, type EntryHeader } from './entry.js';
import { contextIdentity, mismatchReason, type EntryIdentity } from './identity.js';
import { DirectoryStore, type CacheStore } from './store.js';

export type CacheTier = 'resident' | 'ram' | 'disk' | 'store';

export interface PromptCacheOptions {
  /** Directory of the disk tier; null disables it. Default `<user cache dir>/kvstash/prompt-cache`. */
  dir?: string | null;
  /** Disk tier budget; least recently used entries go first. Default 4 GiB. Unit: bytes. */
  maxDiskBytes?: number;
  /** RAM tier budget; least recently used state buffers go first. Default 512 MiB; 0 disables. Unit: bytes. */
  maxRamBytes?: number;
  /** A shared store consulted after the disk tier (and written to on save). Default none. */
  store?: CacheStore;
  /** Shorter prefixes are neither saved nor restored: evaluating them is as fast. Default 16. Unit: tokens. */
  minTokens?: number;
}

export interface CacheEntryInfo {
  key: string;
  label: string | null;
  tokenCount: number;
  /** Size of the entry file (or, RAM only, of the state). Unit: bytes. */
  bytes: number;
  createdAt: string;
  tiers: CacheTier[];
  model: EntryHeader['model'];
  layout: EntryHeader['layout'];
  /** The entry file, when it is on disk. */
  path?: string;
}

export interface RestoreResult {
  /** Tokens of the prompt now held by the sequence, restored rather than evaluated. */
  cachedTokens: number;
  /** Where they came from; null on a miss. */
  tier: CacheTier | null;
  /** The entry used, when the tier is not 'resident'. */
  key?: string;
  /** True when only part of the cached entry matched the prompt (it was trimmed). */
  partial: boolean;
  restoreMs: number;
}

export interface CacheProblem {
  code: Extract<KvstashErrorCode, 'E_CACHE_CORRUPT' | 'E_CACHE_MISMATCH' | 'E_CACHE_NOT_FILE' | 'E_STATE_LOAD' | 'E_STATE_SAVE'> | string;
  message: string;
  key?: string;
  path?: string;
}

export interface CacheStats {
  entries: { ram: number; disk: number };
  bytes: { ram: number; disk: number };
  /** Tokens held by distinct entries across RAM and disk. */
  tokensStored: number;
  hits: Record<CacheTier, number>;
  partialHits: number;
  misses: number;
  /** Hits / lookups. */
  hitRate: number;
  /** Prompt tokens that were restored instead of evaluated. */
  prefillTokensSaved: number;
  /** Total time spent restoring. Unit: ms. */
  restoreMs: number;
  problems: { corrupt: number; mismatch: number; other: number };
}

interface RamItem {
  header: EntryHeader;
  payload: Buffer;
  lastUsed: number;
}

interface Candidate {
  tier: CacheTier;
  length: number;
  entryTokens: number;
  key?: string;
  sourceSequence?: number;
  /** The resident record the candidate was found in: what a restore into the source itself checks
   * (a copy from another sequence checks that sequence's current record instead). */
  record?: ResidentRecord;
  ram?: RamItem;
  file?: { name: string; path: string; entry: EntryFile };
}

/** A disk candidate whose file another process removed or replaced since the scan, or a resident
 * source sequence that was rewritten since: a miss. */
class EntryGone extends Error {}

/**
 * What a sequence of a context holds from position 0, for the resident tier. An `extending` record
 * belongs to a caller that only appends to the sequence until it records it again (generate()
 * between its restore and its end): the recorded positions stay valid while the sequence grows,
 * so concurrent requests copy the shared prefix from it (sharing its KV cells) instead of importing
 * another copy of it from RAM.
 */
interface ResidentRecord {
  tokens: Int32Array;
  extending: boolean;
}

/** A problem found by verify(). */
export interface VerifyProblem {
  path: string;
  /** E_CACHE_CORRUPT (removed with `remove: true`) or E_CACHE_NOT_FILE (never removed). */
  code: KvstashErrorCode;
  reason: string;
  message: string;
  /** Whether verify({remove: true}) removed it. */
  removed: boolean;
}

const TIER_ORDER: Record<CacheTier, number> = { resident: 0, ram: 1, disk: 2, store: 3 };

export class PromptCache extends EventEmitter {
  readonly dir: string | null;
  readonly maxDiskBytes: number;
  readonly maxRamBytes: number;
  readonly minTokens: number;
  private readonly disk: DirectoryStore | null;
  private readonly store: CacheStore | undefined;
  private readonly ram = new Map<string, RamItem>();
  /** What each sequence of a context holds, as far as the cache put it there. */
  private readonly resident = new WeakMap<Context, Map<number, ResidentRecord>>();
  private readonly reported = new Set<string>();
  private readonly pendingWrites = new Set<Promise<unknown>>();
  private diskSummary = { entries: 0, bytes: 0, tokens: 0 };
  private counters = {
    hits: { resident: 0, ram: 0, disk: 0, store: 0 } as Record<CacheTier, number>,
    partialHits: 0,
    misses: 0,
    prefillTokensSaved: 0,
    restoreMs: 0,
    problems: { corrupt: 0, mismatch: 0, other: 0 },
  };

  constructor(options: PromptCacheOptions = {}) {
    super();
    this.dir = options.dir === null ? null : path.resolve(options.dir ?? path.join(userCacheDir(), 'prompt-cache'));
    this.maxDiskBytes = requireInteger(options.maxDiskBytes ?? 4 * 2 ** 30, 'maxDiskBytes', 0);
    this.maxRamBytes = requireInteger(options.maxRamBytes ?? 512 * 2 ** 20, 'maxRamBytes', 0);
    this.minTokens = requireInteger(options.minTokens ?? 16, 'minTokens', 1);
    this.disk = this.dir === null ? null : new DirectoryStore(this.dir);
    this.store = options.store;
    // A store that reports problems no call returns (RedisStore: a lost connection, a damaged
    // manifest met in a lookup) reports them as this cache's own.
    if (this.store instanceof EventEmitter) this.store.on('problem', (problem: CacheProblem) => this.problem(problem));
  }

  /**
   * Puts the longest cached prefix of `tokens` (at most `maxTokens` of them) into `sequence`,
   * replacing what the sequence held. On a miss the sequence is emptied. Never throws for a cache
   * problem: it reports it and restores less (or nothing).
   */
  async restore(context: Context, tokens: Int32Array | readonly number[], options: { sequence?: number; maxTokens?: number } = {}): Promise<RestoreResult> {
    const prompt = toInt32Array(tokens, 'tokens');
    const sequence = options.sequence ?? 0;
    const limit = Math.min(options.maxTokens ?? prompt.length, prompt.length);
    const started = performance.now();
    const identity = contextIdentity(context);
    const candidates = (await this.candidates(context, identity, prompt, sequence, limit)).filter((c) => c.length >= this.minTokens);
    candidates.sort((a, b) => b.length - a.length || TIER_ORDER[a.tier] - TIER_ORDER[b.tier]);
    // At most 3 candidates that fail for real (each may have cost a read); one that is simply gone
    // (a resident source rewritten meanwhile, a file another process evicted) costs nothing, and
    // with many sequences lending one prefix, several can be gone at once.
    let failures = 0;
    for (const candidate of candidates) {
      if (failures === 3) break;
      // The sequence is about to be rewritten: from here on its old record must not be copied from
      // by a concurrent restore. A hit on its own record only trims what runs past the prefix, so
      // the prefix stays valid (and lendable) throughout.
      if (candidate.tier === 'resident' && candidate.sourceSequence === sequence) this.setResident(context, sequence, prompt.subarray(0, candidate.length), { extending: true });
      else this.setResident(context, sequence, new Int32Array(0));
      try {
        await this.apply(context, candidate, sequence, prompt);
      } catch (err) {
        this.reportFailure(err, candidate);
        if (!(err instanceof EntryGone)) failures++;
        continue;
      }
      this.setResident(context, sequence, prompt.subarray(0, candidate.length));
      const restoreMs = performance.now() - started;
      const partial = candidate.length < candidate.entryTokens;
      this.counters.hits[candidate.tier]++;
      if (partial) this.counters.partialHits++;
      this.counters.prefillTokensSaved += candidate.length;
      this.counters.restoreMs += restoreMs;
      const result: RestoreResult = { cachedTokens: candidate.length, tier: candidate.tier, partial, restoreMs, ...(candidate.key ? { key: candidate.key } : {}) };
      this.emit('hit', result);
      return result;
    }
    await context.exclusive(() => context.memory.remove(sequence));
    this.setResident(context, sequence, new Int32Array(0));
    this.counters.misses++;
    const result: RestoreResult = { cachedTokens: 0, tier: null, partial: false, restoreMs: performance.now() - started };
    this.emit('miss', result);
    return result;
  }

  /**
   * Saves the state of `sequence`, which must hold exactly `tokens` from position 0, as an entry
   * in RAM and on disk (and in the shared store). Resolves once the entry is in RAM; the disk and
   * store writes finish in the background (`flush()` waits for them).
   */
  async save(context: Context, tokens: Int32Array | readonly number[], options: { sequence?: number; label?: string } = {}): Promise<CacheEntryInfo> {
    const prompt = toInt32Array(tokens, 'tokens');
    const sequence = options.sequence ?? 0;
    const range = await context.exclusive(() => context.memory.range(sequence));
    if (range.min !== 0 || range.max !== prompt.length - 1) {
      throw new KvstashError('E_STATE_SAVE', `sequence ${sequence} holds positions ${range.min}..${range.max}, not the ${prompt.length} tokens to save`);
    }
    const payload = await context.exportState({ sequence });
    const header: EntryHeader = {
      ...contextIdentity(context),
      tokenCount: prompt.length,
      tokens: Array.from(prompt),
      label: options.label ?? null,
      createdAt: new Date().toISOString(),
      payloadBytes: payload.length,
    };
    const key = entryKey(header);
    this.putRam(key, header, payload);
    this.setResident(context, sequence, prompt);
    this.track(this.persist(key, header, payload));
    this.emit('save', { key, label: header.label, tokenCount: prompt.length, bytes: payload.length });
    return this.info(key, header, payload.length, ['ram']);
  }

  /** Evaluates a prompt (restoring what is cached of it) into `sequence` and saves it. */
  async warm(
    context: Context,
    promptOrTokens: string | Int32Array | readonly number[],
    options: { label?: string; sequence?: number; onProgress?: (done: number, total: number) => void; signal?: AbortSignal } = {},
  ): Promise<CacheEntryInfo & { evaluatedTokens: number; restore: RestoreResult }> {
    const tokens = typeof promptOrTokens === 'string' ? context.model.tokenize(promptOrTokens, { special: true }) : toInt32Array(promptOrTokens, 'tokens');
    if (tokens.length === 0) throw new RangeError('warm: the prompt is empty');
    const sequence = options.sequence ?? 0;
    const restore = await this.restore(context, tokens, { sequence });
    const rest = tokens.subarray(restore.cachedTokens);
    if (rest.length > 0) {
      await context.decode(rest, { sequence, start: restore.cachedTokens, logits: 'none', onProgress: options.onProgress, signal: options.signal });
    }
    const saved = await this.save(context, tokens, { sequence, label: options.label });
    return { ...saved, evaluatedTokens: rest.length, restore };
  }

  /** Records that `sequence` of `context` now holds `tokens` from position 0 (for the resident tier).
   * Callers that decode into a sequence themselves (generate, sessions) keep this up to date.
   * `extending`: the caller only appends to the sequence until it records it again, so the record
   * stays valid while the sequence grows past it. */
  setResident(context: Context, sequence: number, tokens: Int32Array, options: { extending?: boolean } = {}): void {
    let sequences = this.resident.get(context);
    if (!sequences) this.resident.set(context, (sequences = new Map()));
    if (tokens.length === 0) sequences.delete(sequence);
    else sequences.set(sequence, { tokens: tokens.slice(), extending: options.extending === true });
  }

  /** Every entry in RAM, on disk and in the store. */
  async list(): Promise<CacheEntryInfo[]> {
    const byKey = new Map<string, CacheEntryInfo>();
    for (const [key, item] of this.ram) byKey.set(key, this.info(key, item.header, item.payload.length, ['ram']));
    if (this.disk) {
      for (const { name, size, entry } of await this.scanDisk()) {
        if (entry instanceof Error) continue;
        const known = byKey.get(entry.key);
        if (known) {
          known.tiers.push('disk');
          known.bytes = size;
          known.path = path.join(this.disk.dir, name);
        } else {
          byKey.set(entry.key, { ...this.info(entry.key, entry.header, size, ['disk']), path: path.join(this.disk.dir, name) });
        }
      }
    }
    return [...byKey.values()].sort((a, b) => b.createdAt.localeCompare(a.createdAt));
  }

  /**
   * Disk entries that `context` can load (same model and layout), most recently used first, with
   * their tokens: what a restarted process may restore before its first request asks for it
   * (`kvstash serve` restores the newest system prompt this way). `labelPrefix` keeps only entries
   * whose label starts with it.
   */
  async recent(context: Context, options: { labelPrefix?: string; limit?: number } = {}): Promise<Array<{ key: string; label: string | null; tokens: Int32Array; lastUsedMs: number }>> {
    if (!this.disk) return [];
    const identity = contextIdentity(context);
    const { labelPrefix } = options;
    return (await this.disk.list())
      .filter((e) => !mismatchReason(e.header, identity) && (labelPrefix === undefined || e.header.label?.startsWith(labelPrefix) === true))
      .sort((a, b) => b.lastUsedMs - a.lastUsedMs)
      .slice(0, options.limit ?? Infinity)
      .map((e) => ({ key: e.key, label: e.header.label, tokens: Int32Array.from(e.header.tokens), lastUsedMs: e.lastUsedMs }));
  }

  /**
   * The entries `labelOrKey` names: every entry with that label (newest first); else the entry
   * with that key; else every entry whose key starts with it (4+ hex digits, as `kvstash ls`
   * shows keys). More than one key match means the start was ambiguous.
   */
  async find(labelOrKey: string): Promise<CacheEntryInfo[]> {
    const entries = await this.list();
    // Labels match exactly (case too); keys are hex, and match in either case.
    const labelled = entries.filter((e) => e.label === labelOrKey);
    if (labelled.length > 0) return labelled;
    const key = labelOrKey.toLowerCase();
    const exact = entries.filter((e) => e.key === key);
    if (exact.length > 0 || !/^[0-9a-f]{4,}$/.test(key)) return exact;
    return entries.filter((e) => e.key.startsWith(key));
  }

  /** The newest entry with this label, or the entry with this key (or unique key start). */
  async get(labelOrKey: string): Promise<CacheEntryInfo | undefined> {
    const found = await this.find(labelOrKey);
    return found.length === 1 || found[0]?.label === labelOrKey ? found[0] : undefined;
  }

  /** Deletes every entry with this label, or the entry with this key (or unique key start), from
   * every tier; resolves with how many were deleted (from at least one tier: one that another
   * process removed meanwhile is not counted). */
  async delete(labelOrKey: string): Promise<number> {
    await this.flush();
    const found = await this.find(labelOrKey);
    const doomed = found.length === 1 || found[0]?.label === labelOrKey ? found : [];
    let deleted = 0;
    for (const entry of doomed) {
      let removed = this.ram.delete(entry.key);
      if (this.disk && (await this.disk.unlink(`${entry.key}${ENTRY_EXTENSION}`))) removed = true;
      if (this.store) {
        await this.store.delete(entry.key);
        removed ||= entry.tiers.includes('store');
      }
      if (removed) deleted++;
    }
    return deleted;
  }

  async clear(): Promise<void> {
    await this.flush();
    for (const entry of await this.list()) {
      await this.disk?.delete(entry.key);
      await this.store?.delete(entry.key);
    }
    this.ram.clear();
  }

  /**
   * Reads every byte of every disk entry and checks it; problems are reported: corrupt entries
   * (removed with `remove: true`, and only the very file found corrupt) and paths that are not
   * regular files (E_CACHE_NOT_FILE, never removed). An entry that another process removes while
   * this runs is not a problem.
   */
  async verify(options: { remove?: boolean } = {}): Promise<{ ok: number; corrupt: VerifyProblem[] }> {
    await this.flush();
    const corrupt: VerifyProblem[] = [];
    let ok = 0;
    if (!this.disk) return { ok, corrupt };
    for (const { name } of await this.disk.scan()) {
      const file = path.join(this.disk.dir, name);
      let opened;
      try {
        opened = await openEntryFile(file);
        if (!opened) continue;
        const { entry } = await readVerifiedEntryFrom(opened);
        const misnamed = this.disk.namingProblem(name, entry);
        if (misnamed) throw misnamed;
        ok++;
      } catch (err) {
        const code = err instanceof KvstashError ? err.code : 'E_CACHE_CORRUPT';
        // Only what was read and proven corrupt, identified by the descriptor it was read from.
        const removed = options.remove === true && code === 'E_CACHE_CORRUPT' && opened !== undefined && (await this.disk.removeIfSame(name, opened));
        corrupt.push({ path: file, code, reason: (err as KvstashError).reason ?? (err as Error).message, message: (err as Error).message, removed });
      } finally {
        await opened?.handle.close();
      }
    }
    return { ok, corrupt };
  }

  /** Waits for background work: disk and store writes, promotions of disk hits to RAM. */
  async flush(): Promise<void> {
    while (this.pendingWrites.size > 0) await Promise.all([...this.pendingWrites]);
  }

  stats(): CacheStats {
    const lookups = Object.values(this.counters.hits).reduce((a, b) => a + b, 0) + this.counters.misses;
    const hits = lookups - this.counters.misses;
    let ramBytes = 0;
    let tokens = 0;
    for (const item of this.ram.values()) {
      ramBytes += item.payload.length;
      tokens += item.header.tokenCount;
    }
    return {
      entries: { ram: this.ram.size, disk: this.diskSummary.entries },
      bytes: { ram: ramBytes, disk: this.diskSummary.bytes },
      tokensStored: Math.max(tokens, this.diskSummary.tokens),
      hits: { ...this.counters.hits },
      partialHits: this.counters.partialHits,
      misses: this.counters.misses,
      hitRate: lookups === 0 ? 0 : hits / lookups,
      prefillTokensSaved: this.counters.prefillTokensSaved,
      restoreMs: this.counters.restoreMs,
      problems: { ...this.counters.problems },
    };
  }

  // -------------------------------------------------------------------------------------------

  private async candidates(context: Context, identity: EntryIdentity, prompt: Int32Array, sequence: number, limit: number): Promise<Candidate[]> {
    const out: Candidate[] = [];
    const sequences = this.resident.get(context);
    if (sequences) {
      // Whether each source still holds its record is checked where it is copied, in the same
      // exclusive turn as the copy: one turn behind the running decodes instead of two.
      for (const [source, record] of sequences) {
        const held = record.tokens;
        out.push({ tier: 'resident', length: Math.min(limit, commonPrefix(held, prompt)), entryTokens: held.length, sourceSequence: source, record });
      }
    }
    for (const [key, item] of this.ram) {
      if (mismatchReason(item.header, identity)) continue;
      out.push({ tier: 'ram', key, ram: item, length: Math.min(limit, commonPrefix(item.header.tokens, prompt)), entryTokens: item.header.tokenCount });
    }
    if (this.disk) {
      for (const { name, entry } of await this.scanDisk({ reuse: true })) {
        if (entry instanceof Error) {
          this.reportOnce(name, { code: (entry as KvstashError).code ?? 'E_CACHE_CORRUPT', message: entry.message, path: path.join(this.disk.dir, name) });
          continue;
        }
        if (this.ram.has(entry.key)) continue;
        const length = Math.min(limit, commonPrefix(entry.header.tokens, prompt));
        const reason = mismatchReason(entry.header, identity);
        if (reason) {
          // Other models' entries may share the directory; report only one that would have been used.
          if (length >= this.minTokens) {
            this.reportOnce(`${entry.key}:mismatch`, { code: 'E_CACHE_MISMATCH', message: `cache entry ${entry.key} was not loaded: ${reason}`, key: entry.key });
          }
          continue;
        }
        out.push({ tier: 'disk', key: entry.key, length, entryTokens: entry.header.tokenCount, file: { name, path: path.join(this.disk.dir, name), entry } });
      }
    }
    if (this.store && out.every((c) => c.length < limit)) {
      const local = new Set(out.map((c) => c.key));
      const store = this.store;
      const found = await (store.match ? store.match(identity, prompt) : store.list()).catch((err: unknown) => {
        // The store is down or slow: a problem to report, never a failed restore.
        this.problem({ code: err instanceof KvstashError ? err.code : 'E_STORE_UNAVAILABLE', message: `the shared store could not be searched: ${(err as Error).message}` });
        return [];
      });
      for (const stored of found) {
        if (local.has(stored.key) || mismatchReason(stored.header, identity)) continue;
        out.push({ tier: 'store', key: stored.key, length: Math.min(limit, commonPrefix(stored.header.tokens, prompt)), entryTokens: stored.header.tokenCount });
      }
    }
    void sequence;
    return out;
  }

  private async apply(context: Context, candidate: Candidate, sequence: number, prompt: Int32Array): Promise<void> {
    const memory = context.memory;
    switch (candidate.tier) {
      case 'resident': {
        const source = candidate.sourceSequence!;
        const record = candidate.record!;
        await context.exclusive(() => {
          if (source !== sequence) {
            // Copy only what the source's current record still vouches for (a concurrent restore
            // may have rewritten it since the lookup, often keeping the same prefix) and only
            // while the source holds it (a caller may have edited the KV cache behind the cache's
            // back: then the record is dropped).
            const current = this.resident.get(context)?.get(source);
            if (!current) throw new EntryGone();
            if (!residentHolds(current, memory.range(source))) {
              this.resident.get(context)!.delete(source);
              throw new EntryGone();
            }
            if (commonPrefix(current.tokens, prompt) < candidate.length) throw new EntryGone();
            memory.remove(sequence);
            memory.copy(source, sequence, 0, candidate.length);
          } else if (!residentHolds(record, memory.range(sequence))) {
            // Its own record (already replaced by restore()): edited, or cleared by an earlier candidate.
            throw new EntryGone();
          }
          // An entry longer than the common prefix is trimmed back to it, in the same turn.
          if (memory.range(sequence).max !== candidate.length - 1) memory.remove(sequence, candidate.length);
        });
        return;
      }
      case 'ram': {
        const item = candidate.ram!;
        item.lastUsed = performance.now();
        await context.exclusive(() => memory.remove(sequence));
        await context.importState(item.payload, { sequence, tokens: item.header.tokenCount });
        break;
      }
      case 'disk': {
        const { name, path: file, entry } = candidate.file!;
        // Header and payload come from this one descriptor: a file renamed over the path or removed
        // by another process after the scan is a miss, never checked against the old digests.
        const opened = await this.disk!.openEntry(name, entry);
        if (!opened) throw new EntryGone();
        try {
          await context.exclusive(() => memory.remove(sequence));
          await context.importVerifiedFile(opened, verifiedRanges(entry), { sequence, tokens: entry.header.tokenCount });
        } catch (err) {
          // A corrupt entry file can never become valid: remove it so nobody pays for it again,
          // unless another process has put a new file in its place since.
          if (err instanceof KvstashError && err.code === 'E_CACHE_CORRUPT') await this.disk!.removeIfSame(name, opened);
          throw err;
        } finally {
          await opened.handle.close();
        }
        void this.disk!.touch(entry.key);
        // Promoted to RAM in the background, so the next restore of this prefix skips the disk. Not
        // inside the restore: llama.cpp imports straight from the mapped file, and a copy of the
        // payload would cost as much again.
        if (entry.header.payloadBytes <= this.maxRamBytes) this.track(this.promote(file, entry.key));
        break;
      }
      case 'store': {
        const store = this.store!;
        // A store that verifies what it fetches (RedisStore, part by part against the entry's
        // checksums) hands over its verdict; other stores' bytes are verified here.
        const fetched = store.getVerified ? await store.getVerified(candidate.key!) : await store.get(candidate.key!);
        if (!fetched) throw new KvstashError('E_CACHE_CORRUPT', `the store no longer holds entry ${candidate.key}`);
        const { bytes, entry, payload } = Buffer.isBuffer(fetched) ? { bytes: fetched, ...(await decodeEntry(`store:${candidate.key}`, fetched)) } : fetched;
        const reason = mismatchReason(entry.header, contextIdentity(context));
        if (reason) throw new KvstashError('E_CACHE_MISMATCH', `store entry ${entry.key} was not loaded: ${reason}`);
        await context.exclusive(() => memory.remove(sequence));
        await context.importState(payload, { sequence, tokens: entry.header.tokenCount });
        // A copy: the store's Buffer is not ours to keep (a store may reuse it), and bytes in RAM
        // are never checked again.
        if (payload.length <= this.maxRamBytes) this.putRam(entry.key, entry.header, Buffer.from(payload));
        if (this.disk) this.track(this.disk.put(entry.key, bytes));
        break;
      }
    }
    // An entry longer than the common prefix is trimmed back to it.
    await context.exclusive(() => {
      if (memory.range(sequence).max !== candidate.length - 1) memory.remove(sequence, candidate.length);
    });
  }

  /** Reads a disk entry into the RAM tier (verified again: its bytes come from the file anew). */
  private async promote(file: string, key: string): Promise<void> {
    try {
      const opened = await openEntryFile(file);
      if (!opened) return; // evicted by another process meanwhile
      try {
        const { entry, payload } = await readVerifiedEntryFrom(opened);
        if (entry.key === key && !this.ram.has(key)) this.putRam(key, entry.header, payload);
      } finally {
        await opened.handle.close();
      }
    } catch (err) {
      this.problem({ code: (err as KvstashError).code ?? 'E_CACHE_CORRUPT', message: `could not promote cache entry ${key} to RAM: ${(err as Error).message}`, key });
    }
  }

  private async persist(key: string, header: EntryHeader, payload: Buffer): Promise<void> {
    try {
      if (this.disk) {
        await this.disk.write(key, header, payload);
        await this.evictDisk(key);
      }
      if (this.store) await this.store.put(key, await encodeEntry(header, payload));
    } catch (err) {
      this.problem({ code: 'E_STATE_SAVE', message: `could not persist cache entry ${key}: ${(err as Error).message}`, key });
    }
  }

  private putRam(key: string, header: EntryHeader, payload: Buffer): void {
    if (payload.length > this.maxRamBytes) return;
    this.ram.set(key, { header, payload, lastUsed: performance.now() });
    let total = 0;
    for (const item of this.ram.values()) total += item.payload.length;
    const byAge = [...this.ram.entries()].sort((a, b) => a[1].lastUsed - b[1].lastUsed);
    for (const [oldKey, item] of byAge) {
      if (total <= this.maxRamBytes) break;
      if (oldKey === key) continue;
      this.ram.delete(oldKey);
      total -= item.payload.length;
      this.emit('evict', { tier: 'ram', key: oldKey });
    }
  }

  private async evictDisk(keep: string): Promise<void> {
    const files = (await this.scanDisk()).sort((a, b) => a.mtimeMs - b.mtimeMs);
    let total = files.reduce((sum, f) => sum + f.size, 0);
    for (const file of files) {
      if (total <= this.maxDiskBytes) break;
      const key = file.name.slice(0, -ENTRY_EXTENSION.length);
      // Not a file (a directory, a FIFO): not the cache's to delete; a file another process
      // removed first: evicted all the same.
      if (key === keep || isNotFile(file.entry)) continue;
      await this.disk!.unlink(file.name);
      total -= file.size;
      this.emit('evict', { tier: 'disk', key });
    }
    await this.scanDisk();
  }

  private async scanDisk(options: { reuse?: boolean } = {}) {
    const files = await this.disk!.scan(options);
    let bytes = 0;
    let tokens = 0;
    let entries = 0;
    for (const f of files) {
      bytes += f.size;
      if (!(f.entry instanceof Error)) {
        entries++;
        tokens += f.entry.header.tokenCount;
      }
    }
    this.diskSummary = { entries, bytes, tokens };
    return files;
  }

  private info(key: string, header: EntryHeader, bytes: number, tiers: CacheTier[]): CacheEntryInfo {
    return { key, label: header.label, tokenCount: header.tokenCount, bytes, createdAt: header.createdAt, tiers, model: header.model, layout: header.layout };
  }

  private track(work: Promise<unknown>): void {
    const tracked = work.finally(() => this.pendingWrites.delete(tracked));
    this.pendingWrites.add(tracked);
  }

  private reportFailure(err: unknown, candidate: Candidate): void {
    if (err instanceof EntryGone) return;
    const code = err instanceof KvstashError ? err.code : 'E_STATE_LOAD';
    this.problem({ code, message: (err as Error).message, ...(candidate.key ? { key: candidate.key } : {}), ...(candidate.file ? { path: candidate.file.path } : {}) });
  }

  private reportOnce(id: string, problem: CacheProblem): void {
    if (this.reported.has(id)) return;
    this.reported.add(id);
    this.problem(problem);
  }

  private problem(problem: CacheProblem): void {
    if (problem.code === 'E_CACHE_CORRUPT') this.counters.problems.corrupt++;
    else if (problem.code === 'E_CACHE_MISMATCH') this.counters.problems.mismatch++;
    else this.counters.problems.other++;
    this.emit('problem', problem);
  }
}

function isNotFile(entry: EntryFile | Error): boolean {
  return entry instanceof KvstashError && entry.code === 'E_CACHE_NOT_FILE';
}

/** Length of the common prefix of two token lists. */
export function commonPrefix(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** Whether a sequence holding positions `range` can still hold what `record` says: exactly those
 * positions, or (while its owner only appends) at least them. A caller may have edited the KV cache
 * behind the cache's back, so the record is trusted only this far. */
function residentHolds(record: ResidentRecord, range: { min: number; max: number }): boolean {
  const last = record.tokens.length - 1;
  return range.min === 0 && (record.extending ? range.max >= last : range.max === last);
}
