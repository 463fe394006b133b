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

async function warm(cache: PromptCache, tokens: Int32Array): Promise<void> {
  const context = await model.createContext({ contextSize: 1024 });
  await cache.warm(context, tokens);
  await cache.flush();
  await context.dispose();
}


/** Sets maxmemory to what the server uses now plus room for `entries` entries of ENTRY_TOKENS
 * tokens (measured: the second of two written, then removed). */
async function limitMemory(t: Test, server: RedisServer, store: RedisStore, entries: number): Promise<void> {
  const usedMemory = async () => Number(/used_memory:(\d+)/.exec((await server.admin(['INFO', 'memory'])) as string)![1]);
  await warm(new PromptCache({ dir: null, store }), promptTokens(model, ENTRY_TOKENS, 998));
  const before = await usedMemory();
  await warm(new PromptCache({ dir: null, store }), promptTokens(model, ENTRY_TOKENS, 999));
  const entryBytes = (await usedMemory()) - before;
  await server.admin(['FLUSHALL']);
  t.ok(entryBytes > 2 * 65536, `an entry of ${ENTRY_TOKENS} tokens (3 parts) takes ${entryBytes} bytes of Redis memory`);
  await server.admin(['CONFIG', 'SET', 'maxmemory', String((await usedMemory()) + entries * entryBytes)]);
}

/** Entries of this many tokens are 3 parts of 64 KiB with the tiny model. */
const ENTRY_TOKENS = 500;

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

t.test('filled past maxmemory under allkeys-lru: parts evicted one by one never load; the rest restore exactly', async (t) => {
  const server = await RedisServer.start(['--maxmemory-policy', 'allkeys-lru']);
  t.teardown(() => server.stop());
  const store = new RedisStore({ url: server.url, ...TIMEOUTS });
  t.teardown(() => store.close());
  await limitMemory(t, server, store, 6);
  const writer = new PromptCache({ dir: null, store, maxRamBytes: 0 });
  const prompts: Int32Array[] = [];
  for (let i = 0; i < 14; i++) {
    const tokens = promptTokens(model, ENTRY_TOKENS, 700 + i);
    prompts.push(tokens);
    await warm(writer, tokens);
  }
  const evicted = Number(/evicted_keys:(\d+)/.exec((await server.admin(['INFO', 'stats'])) as string)![1]);
  t.ok(evicted > 0, `${evicted} keys evicted`);
  let hits = 0;
  let corrupt = 0;
  for (const [i, tokens] of prompts.entries()) {
    const cache = new PromptCache({ dir: null, store });
    const problems = problemsOf(cache);
    const full = new Int32Array([...tokens, ...promptTokens(model, 5, 900 + i)]);
    const { restored } = await generateWith(t, cache, full, `entry ${i}`);
    if (restored.tier === 'store') hits++;
    corrupt += problems.filter((p) => p.code === 'E_CACHE_CORRUPT').length;
    t.ok(problems.every((p) => p.code === 'E_CACHE_CORRUPT'), `entry ${i}: only evicted parts are problems`);
  }
  t.ok(hits > 0, `${hits} of ${prompts.length} entries restored`);
  t.ok(hits < prompts.length, `${prompts.length - hits} were evicted (${corrupt} of them with their manifest left, reported)`);
});

t.test('volatile-lru: without a TTL nothing can be evicted and writes are refused (reported); with one, entries are evicted', async (t) => {
  const server = await RedisServer.start(['--maxmemory-policy', 'volatile-lru']);
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
  await server.admin(['FLUSHALL']);

  const expiring = new RedisStore({ url: server.url, ...TIMEOUTS, prefix: 'ttl', ttlSeconds: 3600 });
  t.teardown(() => expiring.close());
  const ttlWriter = new PromptCache({ dir: null, store: expiring, maxRamBytes: 0 });
  const ttlProblems = problemsOf(ttlWriter);
  for (let i = 0; i < 14; i++) await warm(ttlWriter, promptTokens(model, ENTRY_TOKENS, 800 + i));
  const evicted = Number(/evicted_keys:(\d+)/.exec((await server.admin(['INFO', 'stats'])) as string)![1]);
  t.ok(evicted > 0, `${evicted} keys evicted`);
  t.same(ttlProblems.filter((p) => p.code === 'E_STATE_SAVE'), [], 'with a TTL every write is accepted');
  // Redis's LRU clock ticks once a second and eviction picks among sampled keys, so which keys of
  // 14 entries written within a second survive is chance: even the newest entry can lose a part,
  // or the model's index (it has the TTL too) can go, which hides every entry from lookups (both
  // seen). And while memory stays over the limit, any command (a read, a new connection) evicts
  // more. So the limit is lifted first; what restoring the newest entry must give then follows
  // from what is left.
  await server.admin(['CONFIG', 'SET', 'maxmemory', '0']);
  const newestPrompt = promptTokens(model, ENTRY_TOKENS, 813);
  const stored = (await expiring.list()).find((e) => e.header.tokens.length > 0 && e.header.tokens.every((token, i) => token === newestPrompt[i]));
  const indexed = stored !== undefined && (await server.admin(['EXISTS', expiring.indexKey(stored.header)])) === 1;
  const whole = indexed && (await expiring.getVerified(stored!.key).catch(() => undefined)) !== undefined;
  const reader = new PromptCache({ dir: null, store: expiring });
  const readerProblems = problemsOf(reader);
  const last = await generateWith(t, reader, new Int32Array([...newestPrompt, 1, 2]), 'volatile, ttl');
  t.equal(last.restored.tier, whole ? 'store' : null, (whole ? 'the newest entry is whole and indexed, and restores' : `the newest entry lost ${indexed ? 'a part' : 'its manifest or index'} to eviction and is a miss`) + ` (problems: ${JSON.stringify(readerProblems)})`);
});
