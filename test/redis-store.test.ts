// RedisStore against a real redis-server on 127.0.0.1: restores from the store equal a cold
// prefill (in other processes with their own disk tiers too), the documented layout, nothing
// damaged or incomplete is loaded, TTLs renew on a hit, and eviction leaves no wrong entry.
import { spawn } from 'node:child_process';
import path from 'node:path';
import t, { type Test } from 'tap';
import { createClient } from 'redis';
import { loadModel, PromptCache, KvstashError, type Model } from '../lib/index.js';
import { RedisStore } from '../lib/cache/redis-store.js';
import { bitIdentical, promptTokens, tinyModel } from './helpers/fixtures.js';
import { coldLogitsOf, problemsOf } from './helpers/cold-logits.js';
import { RedisServer } from './helpers/redis-server.js';

let model: Model;
let server: RedisServer;
let prefix: Int32Array;
let prompt: Int32Array;
let coldLogits: ReturnType<typeof coldLogitsOf>;

t.before(async () => {
  model = await loadModel(await tinyModel());
  coldLogits = coldLogitsOf(model);
  server = await RedisServer.start();
  prefix = promptTokens(model, 300, 51);
  prompt = new Int32Array([...prefix, ...promptTokens(model, 20, 52)]);
});
t.teardown(async () => {
  await server.stop();
  await model.dispose();
});


/** Restores what the cache has of `tokens`, evaluates the rest; the last token's logits. */
async function restoredLogits(cache: PromptCache, tokens: Int32Array) {
  const context = await model.createContext({ contextSize: 1024 });
  try {
    const restored = await cache.restore(context, tokens, { maxTokens: tokens.length - 1 });
    await context.decode(tokens.subarray(restored.cachedTokens), { start: restored.cachedTokens });
    return { restored, logits: context.logits() };
  } finally {
    await context.dispose();
  }
}

let prefixCounter = 0;
function storeFor(t: Test, options: Partial<ConstructorParameters<typeof RedisStore>[0]> = {}): RedisStore {
  const store = new RedisStore({ url: server.url, prefix: `t${prefixCounter++}`, partBytes: 65536, ...options });
  t.teardown(() => store.close());
  return store;
}


async function warmInto(cache: PromptCache, tokens: Int32Array): Promise<string> {
  const context = await model.createContext({ contextSize: 1024 });
  const saved = await cache.warm(context, tokens);
  await cache.flush();
  await context.dispose();
  return saved.key;
}

async function keysOf(pattern: string): Promise<string[]> {
  return ((await server.admin(['KEYS', pattern])) as string[]).sort();
}

t.test('a restore from the store gives the logits of a cold prefill, in this process and in others with their own disk tiers', async (t) => {
  const store = storeFor(t);
  const writer = new PromptCache({ dir: t.testdir(), store });
  t.same(problemsOf(writer), []);
  const key = await warmInto(writer, prefix);

  const reader = new PromptCache({ dir: null, store });
  const problems = problemsOf(reader);
  const hit = await restoredLogits(reader, prompt);
  t.match(hit.restored, { tier: 'store', cachedTokens: prefix.length, key });
  t.ok(bitIdentical(hit.logits, await coldLogits(prompt, prefix.length)), 'store: bit-identical to a cold prefill');
  t.same(problems, []);

  // Two other processes, each with its own disk tier, restore it; the first also writes an entry
  // of its own, which this process then restores from the store.
  const other = new Int32Array([...promptTokens(model, 200, 53)]);
  const otherPrompt = new Int32Array([...other, ...promptTokens(model, 10, 54)]);
  const childResults: Array<{ tier: string | null; cachedTokens: number; logits: number[]; problems: unknown[] }> = [];
  for (let i = 0; i < 2; i++) {
    const script = `
      const { loadModel, PromptCache } = require(${JSON.stringify(path.resolve(__dirname, '../lib/index.ts'))});
      const { RedisStore } = require(${JSON.stringify(path.resolve(__dirname, '../lib/cache/redis-store.ts'))});
      (async () => {
        const model = await loadModel(${JSON.stringify(await tinyModel())});
        const store = new RedisStore({ url: ${JSON.stringify(server.url)}, prefix: ${JSON.stringify(store.prefix)}, partBytes: 65536 });
        const cache = new PromptCache({ dir: ${JSON.stringify(t.testdir() + `/child-${i}`)}, store });
        const problems = [];
        cache.on('problem', (p) => problems.push(p));
        const tokens = Int32Array.from(${JSON.stringify(Array.from(prompt))});
        const context = await model.createContext({ contextSize: 1024 });
        const restored = await cache.restore(context, tokens, { maxTokens: tokens.length - 1 });
        await context.decode(tokens.subarray(restored.cachedTokens), { start: restored.cachedTokens });
        const logits = Array.from(context.logits());
        if (${i} === 0) await cache.warm(context, Int32Array.from(${JSON.stringify(Array.from(other))}), {});
        await cache.flush();
        process.stdout.write(JSON.stringify({ tier: restored.tier, cachedTokens: restored.cachedTokens, logits, problems }));
        await store.close();
        await context.dispose();
        await model.dispose();
      })().catch((err) => { console.error(err); process.exit(3); });
    `;
    const child = spawn(process.execPath, [...process.execArgv, '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (err += s));
    const code = await new Promise((resolve) => child.once('exit', resolve));
    t.equal(code, 0, `child ${i} exited cleanly ${err.slice(-400)}`);
    childResults.push(JSON.parse(out));
  }
  const expected = await coldLogits(prompt, prefix.length);
  for (const [i, result] of childResults.entries()) {
    t.match(result, { tier: 'store', cachedTokens: prefix.length, problems: [] }, `child ${i} restored from the store`);
    t.ok(bitIdentical(Float32Array.from(result.logits), expected), `child ${i}: bit-identical to a cold prefill`);
  }
  const fresh = new PromptCache({ dir: t.testdir() + '/fresh', store });
  const fromChild = await restoredLogits(fresh, otherPrompt);
  t.match(fromChild.restored, { tier: 'store', cachedTokens: other.length });
  t.ok(bitIdentical(fromChild.logits, await coldLogits(otherPrompt, other.length)), "the other process's entry: bit-identical");
});

t.test('layout: parts first, the manifest last, one index per identity; a lookup is an HMGET and an MGET', async (t) => {
  const store = storeFor(t);
  // MONITOR shows every command the server runs, in order.
  const monitor = createClient({ url: server.url });
  monitor.on('error', () => undefined);
  await monitor.connect();
  const seen: string[] = [];
  await monitor.monitor((line: string) => seen.push(line));
  const cache = new PromptCache({ dir: null, store });
  const key = await warmInto(cache, prefix);
  const reader = new PromptCache({ dir: null, store });
  await reader.restore(await model.createContext({ contextSize: 1024 }), prompt);
  await new Promise((resolve) => setTimeout(resolve, 200));
  monitor.destroy();

  const parts = await keysOf(`${store.prefix}:p:${key}:*`);
  t.ok(parts.length >= 2, `${parts.length} parts`);
  t.same(await keysOf(`${store.prefix}:m:*`), [`${store.prefix}:m:${key}`]);
  t.equal((await keysOf(`${store.prefix}:ix:*`)).length, 1, 'one index');
  const sets = seen.filter((l) => /"SET"/.test(l));
  const manifestAt = sets.findIndex((l) => l.includes(`"${store.prefix}:m:${key}"`));
  t.equal(manifestAt, sets.length - 1, 'the manifest is the last SET');
  t.equal(sets.filter((l) => l.includes(`"${store.prefix}:p:${key}:`)).length, parts.length, 'every part was SET before it');
  // The reader's lookup: one HMGET of its prefix digests, one MGET of manifests, then the parts.
  const afterWrite = seen.slice(seen.findIndex((l) => /"HSET"/.test(l)) + 1);
  const lookup = afterWrite.filter((l) => /"(HMGET|MGET|SCAN|KEYS)"/.test(l)).map((l) => /"([A-Z]+)"/.exec(l)![1]);
  t.same(lookup, ['HMGET', 'MGET'], 'the lookup is two commands, no SCAN');
});

t.test('a missing, evicted or damaged part makes the entry absent: deleted, reported, and the prompt prefilled', async (t) => {
  for (const damage of ['missing', 'flipped'] as const) {
    const store = storeFor(t);
    const key = await warmInto(new PromptCache({ dir: null, store }), prefix);
    const parts = await keysOf(`${store.prefix}:p:${key}:*`);
    if (damage === 'missing') await server.admin(['DEL', parts[1]!]);
    else await server.admin(['SETRANGE', parts[1]!, '100', 'X']);
    const cache = new PromptCache({ dir: null, store });
    const problems = problemsOf(cache);
    const result = await restoredLogits(cache, prompt);
    t.match(result.restored, { tier: null, cachedTokens: 0 }, `${damage}: falls back to prefill`);
    t.ok(bitIdentical(result.logits, await coldLogits(prompt)), `${damage}: the prefill is exact`);
    t.match(problems, [{ code: 'E_CACHE_CORRUPT', key }], `${damage}: reported`);
    t.match(problems[0]!.message, damage === 'missing' ? /part 1 is missing/ : /checksum/);
    t.equal(problems.length, 1, `${damage}: reported once`);
    t.same(await keysOf(`${store.prefix}:[mp]:*`), [], `${damage}: manifest and parts deleted`);
    const again = await restoredLogits(new PromptCache({ dir: null, store }), prompt);
    t.match(again.restored, { tier: null }, `${damage}: absent afterwards`);
  }
});

t.test('parts are read together over connections of their own; a damaged part among them is still rejected', async (t) => {
  const own = await RedisServer.start();
  t.teardown(() => own.stop());
  const store = new RedisStore({ url: own.url, partBytes: 65536, readConnections: 3 });
  t.teardown(() => store.close());
  // A prefix long enough for several parts of 64 KiB.
  const long = promptTokens(model, 900, 61);
  const longPrompt = new Int32Array([...long, ...promptTokens(model, 20, 62)]);
  const key = await warmInto(new PromptCache({ dir: null, store }), long);
  const parts = ((await own.admin(['KEYS', `kvstash:p:${key}:*`])) as string[]).sort((a, b) => Number(a.split(':').pop()) - Number(b.split(':').pop()));
  t.ok(parts.length >= 4, `${parts.length} parts`);
  const clients = async () => ((await own.admin(['CLIENT', 'LIST'])) as string).trim().split('\n').length;
  const before = await clients();
  t.match((await restoredLogits(new PromptCache({ dir: null, store }), longPrompt)).restored, { tier: 'store' });
  t.equal((await clients()) - before, 3, 'three connections of its own beside the one of lookups and writes');

  // A flipped byte in a part in the middle of the ones in flight.
  await own.admin(['SETRANGE', parts[Math.floor(parts.length / 2)]!, '4000', 'X']);
  const cache = new PromptCache({ dir: null, store });
  const problems = problemsOf(cache);
  const result = await restoredLogits(cache, longPrompt);
  t.match(result.restored, { tier: null, cachedTokens: 0 }, 'falls back to prefill');
  t.ok(bitIdentical(result.logits, await coldLogits(longPrompt)), 'the prefill is exact');
  t.match(problems, [{ code: 'E_CACHE_CORRUPT', key, message: /checksum/ }]);
  t.same(await own.admin(['KEYS', 'kvstash:[mp]:*']), [], 'manifest and parts deleted');
  t.match((await restoredLogits(new PromptCache({ dir: null, store }), longPrompt)).restored, { tier: null }, 'absent afterwards');
});

t.test('a damaged manifest is absent and deleted; an evicted manifest drops its index fields', async (t) => {
  const store = storeFor(t);
  const key = await warmInto(new PromptCache({ dir: null, store }), prefix);
  await server.admin(['SETRANGE', `${store.prefix}:m:${key}`, '0', 'XXXX']);
  const cache = new PromptCache({ dir: null, store });
  const problems = problemsOf(cache);
  t.match((await restoredLogits(cache, prompt)).restored, { tier: null });
  t.match(problems, [{ code: 'E_CACHE_CORRUPT', key }]);
  t.same(await keysOf(`${store.prefix}:m:*`), [], 'deleted');

  const second = await warmInto(new PromptCache({ dir: null, store }), prefix);
  await server.admin(['DEL', `${store.prefix}:m:${second}`]);
  const index = (await keysOf(`${store.prefix}:ix:*`))[0]!;
  const fieldsBefore = (await server.admin(['HLEN', index])) as number;
  const quiet = new PromptCache({ dir: null, store });
  const quietProblems = problemsOf(quiet);
  t.match((await restoredLogits(quiet, prompt)).restored, { tier: null }, 'a manifest gone is a plain miss');
  t.same(quietProblems, []);
  await new Promise((resolve) => setTimeout(resolve, 100));
  t.ok(((await server.admin(['HLEN', index])) as number) < fieldsBefore, 'its index fields were removed');
});

t.test('a lost index (evicted, expired or deleted) is rebuilt from the manifests by the next lookup, at most once per 30 s', async (t) => {
  const writer = storeFor(t, { ttlSeconds: 1000 });
  const other = promptTokens(model, 200, 53);
  const keys = [await warmInto(new PromptCache({ dir: null, store: writer }), prefix), await warmInto(new PromptCache({ dir: null, store: writer }), other)];
  const index = (await keysOf(`${writer.prefix}:ix:*`))[0]!;
  const fields = (await server.admin(['HLEN', index])) as number;
  t.equal(await server.admin(['HGET', index, 'index']), '1', 'an index carries its mark');
  const scans = async () => Number(/cmdstat_scan:calls=(\d+)/.exec((await server.admin(['INFO', 'commandstats'])) as string)?.[1] ?? 0);

  // A miss while the index exists costs no SCAN.
  let before = await scans();
  t.match((await restoredLogits(new PromptCache({ dir: null, store: writer }), promptTokens(model, 100, 54))).restored, { tier: null });
  t.equal(await scans(), before, 'a plain miss does not scan');

  // Gone: two lookups at once (of another process: the writer's first lookup, on an empty Redis,
  // was its rebuild of this period) share one rebuild, and both restore exactly.
  await server.admin(['DEL', index]);
  const reader = storeFor(t, { prefix: writer.prefix, ttlSeconds: 1000 });
  before = await scans();
  const cache = new PromptCache({ dir: null, store: reader });
  const problems = problemsOf(cache);
  const otherPrompt = new Int32Array([...other, ...promptTokens(model, 10, 55)]);
  const [a, b] = await Promise.all([restoredLogits(cache, prompt), restoredLogits(new PromptCache({ dir: null, store: reader }), otherPrompt)]);
  t.match(a.restored, { tier: 'store', cachedTokens: prefix.length }, 'the first entry restores from the rebuilt index');
  t.match(b.restored, { tier: 'store', cachedTokens: other.length }, 'the second too');
  t.ok(bitIdentical(a.logits, await coldLogits(prompt, prefix.length)), 'the logits of a cold prefill');
  t.ok(bitIdentical(b.logits, await coldLogits(otherPrompt, other.length)), 'the logits of a cold prefill (second)');
  t.same(problems, [], 'nothing to report');
  t.equal((await scans()) - before, 1, 'one SCAN for both lookups');
  t.equal(await server.admin(['HLEN', index]), fields, 'the index has every field again');
  t.same(new Set(((await server.admin(['HVALS', index])) as string[]).filter((v) => v !== '1')), new Set(keys), 'its fields name the two entries');
  const ttl = (await server.admin(['TTL', index])) as number;
  t.ok(ttl > 900 && ttl <= 1000, `its TTL is back (${ttl} s)`);

  // Lost again within 30 s: the reader does not scan again (a miss); a third process does.
  await server.admin(['DEL', index]);
  before = await scans();
  t.match((await restoredLogits(new PromptCache({ dir: null, store: reader }), prompt)).restored, { tier: null }, 'not rebuilt twice within 30 s');
  t.equal(await scans(), before, 'no second SCAN');
  const third = storeFor(t, { prefix: writer.prefix });
  t.match((await restoredLogits(new PromptCache({ dir: null, store: third }), prompt)).restored, { tier: 'store', cachedTokens: prefix.length }, 'another store rebuilds it');

  // Lost, then made to exist again by a write: that write rebuilds it, within 30 s or not, or it
  // would hide every entry written before.
  await server.admin(['DEL', index]);
  const newer = promptTokens(model, 150, 56);
  await warmInto(new PromptCache({ dir: null, store: third }), newer);
  t.equal(await server.admin(['HGET', index, 'index']), '1', 'the write put the mark back');
  t.match((await restoredLogits(new PromptCache({ dir: null, store: third }), prompt)).restored, { tier: 'store', cachedTokens: prefix.length }, 'the entries written before the loss are found again');
  t.match((await restoredLogits(new PromptCache({ dir: null, store: third }), otherPrompt)).restored, { tier: 'store', cachedTokens: other.length }, 'both of them');
});

t.test('a rebuild that fails (a user without SCAN) is reported; the write it followed stands', async (t) => {
  await server.admin(['ACL', 'SETUSER', 'noscan', 'on', '>pw', '~*', '&*', '+@all', '-scan']);
  t.teardown(() => server.admin(['ACL', 'DELUSER', 'noscan']));
  const url = new URL(server.url);
  url.username = 'noscan';
  url.password = 'pw';
  const store = storeFor(t, { url: url.toString() });
  const cache = new PromptCache({ dir: null, store });
  const problems = problemsOf(cache);
  const key = await warmInto(cache, prefix);
  t.ok(problems.some((p) => p.code === 'E_STORE_UNAVAILABLE' && /lost index could not be rebuilt: .*NOPERM/i.test(p.message)), `the failed repair is reported (${JSON.stringify(problems.map((p) => p.message))})`);
  t.notOk(problems.some((p) => p.code === 'E_STATE_SAVE'), 'the save itself did not fail');
  t.equal(await server.admin(['EXISTS', `${store.prefix}:m:${key}`]), 1, 'the entry is stored');
  const reader = storeFor(t, { prefix: store.prefix });
  t.match((await restoredLogits(new PromptCache({ dir: null, store: reader }), prompt)).restored, { tier: 'store', cachedTokens: prefix.length }, 'and found through its own index fields');
});

t.test('a TTL per entry, renewed by a hit', async (t) => {
  const store = storeFor(t, { ttlSeconds: 1000 });
  const key = await warmInto(new PromptCache({ dir: null, store }), prefix);
  const names = [...(await keysOf(`${store.prefix}:[mp]:${key}*`)), ...(await keysOf(`${store.prefix}:ix:*`))];
  for (const name of names) {
    const ttl = (await server.admin(['TTL', name])) as number;
    t.ok(ttl > 900 && ttl <= 1000, `${name.split(':')[1]} expires in ${ttl} s`);
    await server.admin(['EXPIRE', name, '50']);
  }
  t.match((await restoredLogits(new PromptCache({ dir: null, store }), prompt)).restored, { tier: 'store' });
  await new Promise((resolve) => setTimeout(resolve, 100));
  for (const name of names) t.ok(((await server.admin(['TTL', name])) as number) > 900, `${name.split(':')[1]} renewed by the hit`);
});

t.test('bad options are TypeError/RangeError; a store that cannot be reached is E_STORE_UNAVAILABLE', async (t) => {
  t.throws(() => new RedisStore({ url: 'http://127.0.0.1' }), TypeError);
  t.throws(() => new RedisStore({ url: server.url, partBytes: 1000 }), RangeError);
  t.throws(() => new RedisStore({ url: server.url, ttlSeconds: 0 }), RangeError);
  t.throws(() => new RedisStore({ url: server.url, operationTimeoutMs: -1 }), RangeError);
  t.throws(() => new RedisStore({ url: server.url, readConnections: 0 }), RangeError);
  const store = new RedisStore({ url: server.url });
  await store.close();
  const err = await store.get('00').catch((e: unknown) => e);
  t.ok(err instanceof KvstashError && err.code === 'E_STORE_UNAVAILABLE', 'closed: E_STORE_UNAVAILABLE');
});

t.test('credentials in the URL pass through', async (t) => {
  const secured = await RedisServer.start(['--requirepass', 's3cret']);
  t.teardown(() => secured.stop());
  const url = `redis://:s3cret@127.0.0.1:${secured.port}`;
  const store = new RedisStore({ url, partBytes: 65536 });
  t.teardown(() => store.close());
  await warmInto(new PromptCache({ dir: null, store }), prefix);
  t.match((await restoredLogits(new PromptCache({ dir: null, store }), prompt)).restored, { tier: 'store' });
  const wrong = new RedisStore({ url: `redis://:nope@127.0.0.1:${secured.port}`, connectTimeoutMs: 300 });
  t.teardown(() => wrong.close());
  const cache = new PromptCache({ dir: null, store: wrong });
  const problems = problemsOf(cache);
  const result = await restoredLogits(cache, prompt);
  t.match(result.restored, { tier: null });
  t.match(problems, [{ code: 'E_STORE_UNAVAILABLE' }]);
  t.notMatch(problems[0]!.message, /nope/, 'the password is not in the message');
});

t.test('without the redis package: E_STORE_CLIENT_MISSING', async (t) => {
  // A child in which `require('redis')` fails as it does where the package is not installed.
  const script = `
    const Module = require('module');
    const resolve = Module._resolveFilename;
    Module._resolveFilename = function (request, ...rest) {
      if (request === 'redis') { const e = new Error("Cannot find module 'redis'"); e.code = 'MODULE_NOT_FOUND'; throw e; }
      return resolve.call(this, request, ...rest);
    };
    const { RedisStore } = require(${JSON.stringify(path.resolve(__dirname, '../lib/cache/redis-store.ts'))});
    try { new RedisStore({ url: 'redis://127.0.0.1:1' }); } catch (err) { process.stdout.write(err.code + ' ' + err.message); }
  `;
  const child = spawn(process.execPath, [...process.execArgv, '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
  await new Promise((resolve) => child.once('exit', resolve));
  t.match(out, /^E_STORE_CLIENT_MISSING .*npm install redis/);
});

