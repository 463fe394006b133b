/**
 * `kvstash bench --redis`: the shared store over loopback, on the benchmark's prefix (2,000 tokens
 * of qwen2-0.5b in the full run): a restore from Redis beside one from the disk tier, a cold
 * prefill, and a plain one-value GET of the same entry bytes with the same client (node-redis)
 * in the same run; then the lookup with 10,000 entries in the store (issue 18, item 7).
 *
 * Redis is a redis-server this benchmark starts on 127.0.0.1 (a free port, no persistence, a
 * temporary directory) unless `url` names one.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fsp from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { encodeEntry, entryKey, type EntryHeader } from '../cache/entry.js';
import { contextIdentity } from '../cache/identity.js';
import { PromptCache } from '../cache/prompt-cache.js';
import { RedisStore } from '../cache/redis-store.js';
import { loadModel } from '../llama/model.js';
import type { Context } from '../llama/context.js';
import { syntheticModelPath } from '../tools/synthetic-model.js';
import type { Ui } from '../tools/status.js';
import type { BenchConfig, BenchType } from './bench.js';
import { round3, samples, Series, type Samples } from './measure.js';
import { buildBenchPrompt } from './prompt.js';

export interface RedisBenchOptions {
  config: BenchConfig;
  type: BenchType;
  modelRoot: string;
  signal: AbortSignal;
  ui: Ui;
  /** A Redis to measure instead of one started here. */
  url?: string;
  /** Entries in the store for the lookup row. Default 10,000. */
  lookupEntries?: number;
}

export interface RedisBenchReport {
  format: 'kvstash-bench-redis/1';
  startedAt: string;
  machine: { cpu: string; cores: number; loadAverage: { start: number[]; end: number[] }; node: string };
  config: BenchConfig & { type: BenchType; redis: string; partBytes: number; lookupEntries: number };
  entryBytes: number;
  /** Unit: ms. */
  rows: {
    coldPrefillMs: number;
    diskRestoreMs: Samples;
    redisRestoreMs: Samples;
    /** RedisStore.get alone: the parts fetched together and verified (no import). */
    redisFetchMs: Samples;
    /** One GET of the whole entry as one value, same client: the yardstick. */
    plainGetMs: Samples;
    lookupMs: Samples;
  };
  targets: Array<{ id: string; target: string; value: number; met: boolean }>;
}

export async function runRedisBench(options: RedisBenchOptions): Promise<RedisBenchReport> {
  const { config, signal, ui } = options;
  const startedAt = new Date().toISOString();
  const loadStart = os.loadavg();
  const lookupEntries = options.lookupEntries ?? 10_000;
  const server = options.url ? undefined : await startRedisServer();
  const url = options.url ?? server!.url;
  const workDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'kvstash-bench-redis-'));
  const prefix = `kvstash-bench-${process.pid}`;
  const store = new RedisStore({ url, prefix, operationTimeoutMs: 30_000 });
  try {
    const modelPath = await syntheticModelPath(options.modelRoot, signal, ui, { shape: config.shape, type: options.type, seed: config.seed });
    const model = await ui.status(`[redis] Loading the model`, () => loadModel(modelPath));
    const context = await model.createContext({ contextSize: config.contextSize, batchSize: config.batchSize, threads: config.threads });
    try {
      const tokens = buildBenchPrompt(model, config.prefixTokens, config.suffixTokens, 1);
      const P = tokens.prefix;
      const full = Int32Array.from([...P, ...tokens.suffixes[0]!]);
      await context.decode(P.subarray(0, 16), { logits: 'none' });
      await context.exclusive(() => context.memory.clear());
      const coldStarted = performance.now();
      await ui.status(`[redis] Cold prefill (${P.length} tokens)`, () => context.decode(P, { logits: 'none' }));
      const coldPrefillMs = performance.now() - coldStarted;

      const diskDir = path.join(workDir, 'disk');
      const writer = new PromptCache({ dir: diskDir, store, maxRamBytes: 0 });
      const saved = await writer.save(context, P);
      await writer.flush();
      const entry = await store.get(saved.key);
      if (!entry) throw new Error('the entry did not reach Redis');

      // The yardstick: the same bytes as one value, read by the same client library.
      const plainKey = `${prefix}:plain`;
      const { createClient, RESP_TYPES } = require('redis') as typeof import('redis');
      const plain = createClient({ url });
      await plain.connect();
      await plain.set(plainKey, entry);
      const asBuffer = { typeMapping: { [RESP_TYPES.BLOB_STRING]: Buffer } };

      const series = new Series();
      const restoreFrom = async (cache: PromptCache, tier: string): Promise<number> => {
        const result = await cache.restore(context, full, { maxTokens: P.length });
        if (result.tier !== tier || result.cachedTokens !== P.length) throw new Error(`expected a ${tier} hit of ${P.length} tokens, got ${JSON.stringify(result)}`);
        return result.restoreMs;
      };
      await ui.status(`[redis] Restores, Redis / disk / plain GET (${config.restoreRepetitions} rounds)`, async () => {
        for (let i = 0; i < config.restoreRepetitions + 1; i++) {
          signal.throwIfAborted();
          // Fresh caches: nothing resident, nothing in RAM, so each restore hits the tier it measures.
          const redisMs = await restoreFrom(new PromptCache({ dir: null, store, maxRamBytes: 0 }), 'store');
          const diskMs = await restoreFrom(new PromptCache({ dir: diskDir, maxRamBytes: 0 }), 'disk');
          const fetchStarted = performance.now();
          await store.get(saved.key);
          const fetchMs = performance.now() - fetchStarted;
          const getStarted = performance.now();
          const one = (await plain.sendCommand(['GET', plainKey], asBuffer)) as unknown as Buffer;
          const getMs = performance.now() - getStarted;
          if (one.length !== entry.length) throw new Error('the plain GET returned another value');
          if (i === 0) continue; // warm-up round
          series.add('redis', redisMs);
          series.add('disk', diskMs);
          series.add('fetch', fetchMs);
          series.add('plain', getMs);
        }
      });
      await plain.del(plainKey);
      plain.destroy();

      await ui.status(`[redis] Filling the store to ${lookupEntries} entries`, () => fillStore(store, context, P, lookupEntries));
      const identity = contextIdentity(context);
      const lookups: number[] = [];
      for (let i = 0; i < 50; i++) {
        const started = performance.now();
        const found = await store.match(identity, full);
        lookups.push(performance.now() - started);
        if (found[0]?.key !== saved.key) throw new Error('the lookup did not find the benchmark entry first');
      }

      const rows = {
        coldPrefillMs: round3(coldPrefillMs),
        diskRestoreMs: series.get('disk'),
        redisRestoreMs: series.get('redis'),
        redisFetchMs: series.get('fetch'),
        plainGetMs: series.get('plain'),
        lookupMs: samples(lookups.slice(5)),
      };
      const targets = [
        { id: 'redisRestoreVsPlainGet', target: '≤ 0.5 × a plain one-value GET', value: round3(rows.redisRestoreMs.median / rows.plainGetMs.median), limit: 0.5 },
        { id: 'redisRestoreVsCold', target: '≤ 0.01 × a cold prefill', value: round3(rows.redisRestoreMs.median / coldPrefillMs), limit: 0.01 },
        { id: 'lookupMs', target: `lookup ≤ 2 ms at ${lookupEntries} entries`, value: round3(rows.lookupMs.median), limit: 2 },
      ].map(({ limit, ...t }) => ({ ...t, met: t.value <= limit }));
      return {
        format: 'kvstash-bench-redis/1',
        startedAt,
        machine: { cpu: os.cpus()[0]?.model ?? 'unknown', cores: os.cpus().length, loadAverage: { start: loadStart.map(round3), end: os.loadavg().map(round3) }, node: process.version },
        config: { ...config, type: options.type, redis: options.url ? 'given' : 'redis-server on 127.0.0.1 (loopback)', partBytes: store.partBytes, lookupEntries },
        entryBytes: entry.length,
        rows,
        targets,
      };
    } finally {
      await context.dispose();
      await model.dispose();
    }
  } finally {
    await store.close();
    server?.stop();
    await fsp.rm(workDir, { recursive: true, force: true });
  }
}

/**
 * Puts `count - 1` more entries of this context's identity into the store, each of the prefix's
 * length, sharing its first half and differing after (as templates of one deployment do). Their
 * payloads are small: a lookup reads indexes and manifests, never payloads.
 */
async function fillStore(store: RedisStore, context: Context, prefix: Int32Array, count: number): Promise<void> {
  const identity = contextIdentity(context);
  const shared = Array.from(prefix.subarray(0, prefix.length >> 1));
  const payload = Buffer.alloc(4096, 1);
  const batch = 64;
  for (let start = 1; start < count; start += batch) {
    const writes: Array<Promise<void>> = [];
    for (let i = start; i < Math.min(count, start + batch); i++) {
      const tokens = [...shared, ...Array.from({ length: prefix.length - shared.length }, (_, j) => (i * 7919 + j * 104729) % 150000)];
      const header: EntryHeader = { ...identity, tokenCount: tokens.length, tokens, label: null, createdAt: new Date().toISOString(), payloadBytes: payload.length };
      writes.push(encodeEntry(header, payload).then((bytes) => store.put(entryKey(header), bytes)));
    }
    await Promise.all(writes);
  }
}

interface StartedRedis {
  url: string;
  stop(): void;
}

/** A redis-server on 127.0.0.1 and a free port, without persistence; when it cannot start, an
 * Error that says how to get one. */
async function startRedisServer(): Promise<StartedRedis> {
  const probe = net.createServer();
  await new Promise<void>((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const port = (probe.address() as net.AddressInfo).port;
  await new Promise((resolve) => probe.close(resolve));
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'kvstash-bench-redis-server-'));
  const child: ChildProcess = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout!.setEncoding('utf8').on('data', (text: string) => (output += text));
  let failed: Error | undefined;
  child.once('error', (err) => (failed = err));
  for (let waited = 0; !/Ready to accept connections/.test(output); waited += 20) {
    if (failed || child.exitCode !== null || waited > 10_000) {
      child.kill('SIGKILL');
      throw new Error(`kvstash bench --redis: could not start redis-server (${failed?.message ?? output.slice(-300)}); install it (apt install redis-server) or pass --redis-url`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  return {
    url: `redis://127.0.0.1:${port}`,
    stop() {
      child.kill('SIGKILL');
      void fsp.rm(dir, { recursive: true, force: true });
    },
  };
}
