// RedisStore when Redis fails: down at start, killed in the middle of a get or a put, restarted
// empty, slow, and filled past maxmemory. Generation never fails and never waits past the store's
// timeouts: the problem is reported, the prompt is evaluated, and the store is used again once
// Redis is back. Every restore that does happen equals a cold prefill.
import t, { type Test } from 'tap';
import { loadModel, PromptCache, type Model } from '../lib/index.js';
import { RedisStore } from '../lib/cache/redis-store.js';
import { bitIdentical, promptTokens, tinyModel } from './helpers/fixtures.js';
import { coldLogitsOf, problemsOf } from './helpers/cold-logits.js';
import { freePort, RedisServer } from './helpers/redis-server.js';

let model: Model;
let prefix: Int32Array;
let prompt: Int32Array;
let coldLogits: ReturnType<typeof coldLogitsOf>;

t.before(async () => {
  model = await loadModel(await tinyModel());
  coldLogits = coldLogitsOf(model);
  prefix = promptTokens(model, 300, 61);
  prompt = new Int32Array([...prefix, ...promptTokens(model, 20, 62)]);
});
t.teardown(() => model.dispose());


/** A restore then the rest of the prompt, as generation does it; the logits must be a cold prefill's. */
async function generateWith(t: Test, cache: PromptCache, tokens: Int32Array, what: string) {
  const context = await model.createContext({ contextSize: 1024 });
  try {
    const started = performance.now();
    const restored = await cache.restore(context, tokens, { maxTokens: tokens.length - 1 });
    const restoreMs = performance.now() - started;
    await context.decode(tokens.subarray(restored.cachedTokens), { start: restored.cachedTokens });
    t.ok(bitIdentical(context.logits(), await coldLogits(tokens, restored.cachedTokens)), `${what}: the logits of a cold prefill (${restored.tier ?? 'prefill'})`);
    return { restored, restoreMs };
  } finally {
    await context.dispose();
  }
}

/** Warms `tokens` into the cache and flushes its writes; the entry's key. */
async function warm(cache: PromptCache, tokens: Int32Array): Promise<string> {
  const context = await model.createContext({ contextSize: 1024 });
  const { key } = await cache.warm(context, tokens);
  await cache.flush();
  await context.dispose();
  return key;
}


/** Sets maxmemory to what the server uses now plus room for `entries` entries of ENTRY_TOKENS
 * tokens, each sized by MEMORY USAGE of its keys (a difference of used_memory also counts client
 * buffers, which Redis frees when it likes: once it gave half an entry). */
async function limitMemory(t: Test, server: RedisServer, store: RedisStore, entries: number): Promise<void> {
  const key = await warm(new PromptCache({ dir: null, store }), promptTokens(model, ENTRY_TOKENS, 999));
  const names = [store.manifestKey(key), ...((await server.admin(['KEYS', `${store.prefix}:p:${key}:*`])) as string[])];
  let entryBytes = 0;
  for (const name of names) entryBytes += (await server.admin(['MEMORY', 'USAGE', name])) as number;
  await server.admin(['FLUSHALL']);
  t.equal(names.length, 1 + ENTRY_PARTS, `an entry of ${ENTRY_TOKENS} tokens is a manifest and ${ENTRY_PARTS} parts`);
  t.ok(entryBytes > 2 * 65536, `it takes ${entryBytes} bytes of Redis memory`);
  const usedMemory = Number(/used_memory:(\d+)/.exec((await server.admin(['INFO', 'memory'])) as string)![1]);
  await server.admin(['CONFIG', 'SET', 'maxmemory', String(usedMemory + entries * entryBytes)]);
}

/** Entries of this many tokens are ENTRY_PARTS parts of 64 KiB with the tiny model. */
const ENTRY_TOKENS = 500;
const ENTRY_PARTS = 3;

const TIMEOUTS = { connectTimeoutMs: 300, operationTimeoutMs: 1000, partBytes: 65536 };

async function until(what: string, check: () => Promise<boolean>): Promise<void> {
  for (let waited = 0; !(await check()); waited += 100) {
    if (waited > 15_000) throw new Error(`${what} never happened`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

t.test('Redis down at start: prefill and a problem, within the connect timeout; used once it starts', async (t) => {
  const port = await freePort();
  const store = new RedisStore({ url: `redis://127.0.0.1:${port}`, ...TIMEOUTS });
  t.teardown(() => store.close());
  const cache = new PromptCache({ dir: null, store });
  const problems = problemsOf(cache);
  const { restored, restoreMs } = await generateWith(t, cache, prompt, 'down');
  t.match(restored, { tier: null, cachedTokens: 0 });
  t.ok(restoreMs < TIMEOUTS.connectTimeoutMs + 2000, `the restore gave up after ${restoreMs.toFixed(0)} ms (connect timeout ${TIMEOUTS.connectTimeoutMs} ms)`);
  t.ok(problems.some((p) => p.code === 'E_STORE_UNAVAILABLE'), 'reported as E_STORE_UNAVAILABLE');
  const second = await generateWith(t, cache, prompt, 'still down');
  t.ok(second.restoreMs < TIMEOUTS.connectTimeoutMs, `the next restore does not wait for the connection again (${second.restoreMs.toFixed(0)} ms)`);
  // Saving while it is down: the warm succeeds, the store write is a reported problem.
  await warm(cache, prefix);
  t.ok(problems.some((p) => p.code === 'E_STATE_SAVE'), 'the failed store write is reported');

  // It starts on that port: the store reconnects by itself.
  const server = await RedisServer.startOn(port);
  t.teardown(() => server.stop());
  await until('a write to the started Redis', async () => {
    await warm(new PromptCache({ dir: null, store }), prefix);
    return ((await server.admin(['DBSIZE'])) as number) > 0;
  });
  const after = await generateWith(t, new PromptCache({ dir: null, store }), prompt, 'after start');
  t.match(after.restored, { tier: 'store', cachedTokens: prefix.length });
});

t.test('Redis killed in the middle of a get, then of a put; restarted empty; used again', async (t) => {
  const server = await RedisServer.start();
  t.teardown(() => server.stop());
  const store = new RedisStore({ url: server.url, ...TIMEOUTS, operationTimeoutMs: 20_000 });
  t.teardown(() => store.close());
  await warm(new PromptCache({ dir: null, store }), prefix);

  // CLIENT PAUSE holds every command the store sends; the kill then lands while they are in flight.
  const cache = new PromptCache({ dir: null, store });
  const problems = problemsOf(cache);
  await server.admin(['CLIENT', 'PAUSE', '20000', 'ALL']);
  const pending = generateWith(t, cache, prompt, 'killed mid-get');
  await new Promise((resolve) => setTimeout(resolve, 300));
  await server.kill();
  const { restored, restoreMs } = await pending;
  t.match(restored, { tier: null, cachedTokens: 0 }, 'the kill is a miss, not a failure');
  t.ok(restoreMs < 5000, `not stalled: ${restoreMs.toFixed(0)} ms, the operation timeout was 20 s`);
  t.ok(problems.some((p) => p.code === 'E_STORE_UNAVAILABLE'), 'reported');

  await server.restart();
  await until('reconnection', async () => ((await store.list().catch(() => undefined)) !== undefined));
  const empty = await generateWith(t, new PromptCache({ dir: null, store }), prompt, 'restarted empty');
  t.match(empty.restored, { tier: null }, 'restarted empty: a plain miss');

  // Killed in the middle of a put.
  const writer = new PromptCache({ dir: null, store });
  const writeProblems = problemsOf(writer);
  await server.admin(['CLIENT', 'PAUSE', '20000', 'WRITE']);
  const context = await model.createContext({ contextSize: 1024 });
  await writer.warm(context, prefix);
  const flushed = writer.flush();
  await new Promise((resolve) => setTimeout(resolve, 300));
  await server.kill();
  await flushed;
  await context.dispose();
  t.ok(writeProblems.some((p) => p.code === 'E_STATE_SAVE'), 'the lost write is reported');
  await server.restart();
  await until('reconnection', async () => ((await store.list().catch(() => undefined)) !== undefined));
  await warm(new PromptCache({ dir: null, store }), prefix);
  const again = await generateWith(t, new PromptCache({ dir: null, store }), prompt, 'after restart');
  t.match(again.restored, { tier: 'store', cachedTokens: prefix.length }, 'used again after the restart');
});

t.test('a slow Redis: the operation timeout bounds the wait, then the prompt is evaluated', async (t) => {
  const server = await RedisServer.start(['--enable-debug-command', 'local']);
  t.teardown(() => server.stop());
  const store = new RedisStore({ url: server.url, ...TIMEOUTS, operationTimeoutMs: 300 });
  t.teardown(() => store.close());
  await warm(new PromptCache({ dir: null, store }), prefix);
  const cache = new PromptCache({ dir: null, store });
  const problems = problemsOf(cache);
  const sleeping = server.admin(['DEBUG', 'SLEEP', '3']);
  await new Promise((resolve) => setTimeout(resolve, 100));
  const { restored, restoreMs } = await generateWith(t, cache, prompt, 'slow');
  t.match(restored, { tier: null });
  t.ok(restoreMs < 2500, `gave up after ${restoreMs.toFixed(0)} ms, Redis slept 3 s`);
  t.match(problems, [{ code: 'E_STORE_UNAVAILABLE' }]);
  t.match(problems[0]!.message, /no answer within 300 ms/);
  await sleeping;
  const later = await generateWith(t, new PromptCache({ dir: null, store }), prompt, 'awake');
  t.match(later.restored, { tier: 'store' }, 'used again when it answers');
});

/**
 * Writes 14 entries past a limit of 6: 10, then (after Redis's LRU clock, which ticks once a
 * second, has moved on) 4 more, so that the 4 newest are the most recently used keys when the
 * limit makes Redis evict. Then lifts the limit: past it, every command (a read, a new
 * connection) evicts more, and what a restore finds would be chance. Returns the entries' keys.
 */
async function fillPastLimit(t: Test, server: RedisServer, store: RedisStore, seed: number): Promise<{ keys: string[]; prompts: Int32Array[] }> {
  await limitMemory(t, server, store, 6);
  const writer = new PromptCache({ dir: null, store, maxRamBytes: 0 });
  const problems = problemsOf(writer);
  const keys: string[] = [];
  const prompts: Int32Array[] = [];
  for (let i = 0; i < 14; i++) {
    if (i === 10) await new Promise((resolve) => setTimeout(resolve, 2100));
    const tokens = promptTokens(model, ENTRY_TOKENS, seed + i);
    prompts.push(tokens);
    keys.push(await warm(writer, tokens));
  }
  t.same(problems.filter((p) => p.code === 'E_STATE_SAVE'), [], 'every write is accepted (Redis evicts to make room)');
  const evicted = Number(/evicted_keys:(\d+)/.exec((await server.admin(['INFO', 'stats'])) as string)![1]);
  t.ok(evicted > 0, `${evicted} keys evicted`);
  await server.admin(['CONFIG', 'SET', 'maxmemory', '0']);
  return { keys, prompts };
}

/** What eviction left of an entry: all of it, its manifest without every part, or no manifest. */
async function leftOf(server: RedisServer, store: RedisStore, key: string): Promise<'whole' | 'partial' | 'gone'> {
  if ((await server.admin(['EXISTS', store.manifestKey(key)])) !== 1) return 'gone';
  const parts = (await server.admin(['KEYS', `${store.prefix}:p:${key}:*`])) as string[];
  return parts.length === ENTRY_PARTS ? 'whole' : 'partial';
}

/** Restores each entry through a store of its own (another process: the writer's index rebuild
 * of this period is spent). Whole entries restore exactly; one that lost a part is a reported
 * miss (and deleted); one that lost its manifest is a plain miss. The 4 newest are whole. */
async function restoresFollowWhatIsLeft(t: Test, server: RedisServer, writer: RedisStore, filled: { keys: string[]; prompts: Int32Array[] }, options: { ttlSeconds?: number }): Promise<void> {
  const left = await Promise.all(filled.keys.map((key) => leftOf(server, writer, key)));
  t.same(left.slice(10), ['whole', 'whole', 'whole', 'whole'], `the 4 newest entries are whole (left: ${left.join(' ')})`);
  t.ok(left.some((state) => state !== 'whole'), `older entries lost keys: ${left.filter((s) => s !== 'whole').length} of 10`);
  const reader = new RedisStore({ url: server.url, ...TIMEOUTS, prefix: writer.prefix, ...options });
  t.teardown(() => reader.close());
  for (const [i, tokens] of filled.prompts.entries()) {
    const cache = new PromptCache({ dir: null, store: reader });
    const problems = problemsOf(cache);
    const full = new Int32Array([...tokens, ...promptTokens(model, 5, 900 + i)]);
    const { restored } = await generateWith(t, cache, full, `entry ${i} (${left[i]})`);
    t.equal(restored.tier, left[i] === 'whole' ? 'store' : null, `entry ${i}, ${left[i]}: ${left[i] === 'whole' ? 'restores' : 'a miss'}`);
    t.same(problems.map((p) => p.code), left[i] === 'partial' ? ['E_CACHE_CORRUPT'] : [], `entry ${i}, ${left[i]}: ${left[i] === 'partial' ? 'the missing part is reported' : 'nothing to report'}`);
  }
}

t.test('filled past maxmemory under allkeys-lru: entries that lost a part never load; the rest restore exactly', async (t) => {
  const server = await RedisServer.start(['--maxmemory-policy', 'allkeys-lru', '--maxmemory-samples', '10']);
  t.teardown(() => server.stop());
  const store = new RedisStore({ url: server.url, ...TIMEOUTS });
  t.teardown(() => store.close());
  const filled = await fillPastLimit(t, server, store, 700);
  await restoresFollowWhatIsLeft(t, server, store, filled, {});
});

t.test('volatile-lru: without a TTL nothing can be evicted and writes are refused (reported); with one, entries are evicted', async (t) => {
  const server = await RedisServer.start(['--maxmemory-policy', 'volatile-lru', '--maxmemory-samples', '10']);
  t.teardown(() => server.stop());
  const forever = new RedisStore({ url: server.url, ...TIMEOUTS, prefix: 'forever' });
  t.teardown(() => forever.close());
  await limitMemory(t, server, forever, 6);
  const writer = new PromptCache({ dir: null, store: forever, maxRamBytes: 0 });
  const problems = problemsOf(writer);
  for (let i = 0; i < 12; i++) await warm(writer, promptTokens(model, ENTRY_TOKENS, 800 + i));
  t.ok(problems.some((p) => p.code === 'E_STATE_SAVE' && /OOM/.test(p.message)), 'writes past maxmemory are refused and reported');
  // Whatever was written completely restores exactly; the rest is a miss.
  const first = await generateWith(t, new PromptCache({ dir: null, store: forever }), new Int32Array([...promptTokens(model, ENTRY_TOKENS, 800), 1, 2]), 'volatile, no ttl');
  t.match(first.restored, { tier: 'store' }, 'the first entry, written before memory ran out, restores');
  await server.admin(['CONFIG', 'SET', 'maxmemory', '0']);
  await server.admin(['FLUSHALL']);

  // With a TTL every key of an entry, and the model's index, can be evicted: an evicted index is
  // rebuilt by the next lookup, so what restores is what is whole.
  const expiring = new RedisStore({ url: server.url, ...TIMEOUTS, prefix: 'ttl', ttlSeconds: 3600 });
  t.teardown(() => expiring.close());
  const filled = await fillPastLimit(t, server, expiring, 800);
  await restoresFollowWhatIsLeft(t, server, expiring, filled, { ttlSeconds: 3600 });
});
