// Memory on a real SQLite file: exact keyword, vector and fused rankings; user text full of SQL and
// FTS5 syntax stored and found literally; summaries replaced; checkpoints pruned with their cache
// entries (a real DirectoryStore); reopening; two processes on one database; SIGKILL while
// archiving loses no acknowledged row; bad input gets coded errors.
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import t from 'tap';
import { DirectoryStore, KvstashError, loadModel, Memory, type MemoryHit } from '../lib/index.js';
import { embeddingModel } from './helpers/fixtures.js';
import { bagOfWords, hashEmbed } from './helpers/memory-embed.js';

const CHILD = path.join(__dirname, 'helpers', 'memory-child.ts');

function unit(v: Float32Array): Float32Array {
  const n = Math.hypot(...v);
  return v.map((x) => (n > 0 ? x / n : 0));
}
function cosine(a: string, b: string): number {
  const x = unit(bagOfWords(a));
  const y = unit(bagOfWords(b));
  return x.reduce((sum, value, i) => sum + value * y[i]!, 0);
}
const contents = (hits: MemoryHit[]): string[] => hits.map((h) => h.content);

const ROWS = [
  { sessionId: 's1', role: 'user', content: 'My cat is named Whiskers', turn: 0, at: 1_000 },
  { sessionId: 's1', role: 'assistant', content: 'Whiskers is a lovely name for a cat', turn: 0, at: 2_000 },
  { sessionId: 's1', role: 'user', content: 'I live in Lisbon', turn: 1, at: 3_000 },
  { sessionId: 's2', role: 'user', content: 'The weather in Lisbon is sunny today', turn: 0, at: 4_000, metadata: { source: 'chat' } },
];

t.test('keyword search: exact order, tiers, scope and the window cut', async (t) => {
  const memory = await Memory.open({ path: path.join(t.testdir(), 'm.db') });
  t.teardown(() => memory.close());
  const ids = await memory.addMany(ROWS);
  t.same(ids, [1, 2, 3, 4]);

  const whiskers = await memory.search('Whiskers', { mode: 'keyword' });
  t.same(contents(whiskers), ['My cat is named Whiskers', 'Whiskers is a lovely name for a cat']);
  t.same(whiskers.map((h) => [h.id, h.role, h.sessionId, h.turn, h.tier, h.at]), [
    [1, 'user', 's1', 0, 'session', 1_000],
    [2, 'assistant', 's1', 0, 'session', 2_000],
  ]);
  t.ok(whiskers[0]!.score > whiskers[1]!.score && whiskers[1]!.score > 0, 'keyword scores are -BM25, best first');

  const lisbon = await memory.search('lisbon', { mode: 'keyword', sessionId: 's1' });
  t.same(lisbon.map((h) => [h.content, h.tier]), [
    ['I live in Lisbon', 'session'],
    ['The weather in Lisbon is sunny today', 'other'],
  ]);
  t.same(lisbon[1]!.metadata, { source: 'chat' });
  t.same(contents(await memory.search('lisbon', { mode: 'keyword', sessionId: 's1', scope: 'session' })), ['I live in Lisbon']);
  t.same(contents(await memory.search('lisbon', { mode: 'keyword', sessionId: 's1', beforeTurn: 1 })), ['The weather in Lisbon is sunny today']);
  t.same(contents(await memory.search('lisbon', { mode: 'keyword', sessionId: 's1', tiers: ['other'] })), ['The weather in Lisbon is sunny today']);
  t.same(contents(await memory.search('cat lisbon', { mode: 'keyword', limit: 1 })).length, 1);
  t.same(await memory.search('elephant', { mode: 'keyword' }), []);

  // Without an embed function, hybrid is the keyword ranking under reciprocal-rank scores.
  const hybrid = await memory.search('Whiskers', {});
  t.same(contents(hybrid), contents(whiskers));
  t.same(hybrid.map((h) => h.score), [1 / 61, 1 / 62]);
  await t.rejects(memory.search('cat', { mode: 'vector' }), { code: 'E_MEMORY_EMBED' });
});

t.test('vector and hybrid search: cosine scores and reciprocal-rank fusion, exactly', async (t) => {
  const memory = await Memory.open({ path: path.join(t.testdir(), 'm.db'), embed: hashEmbed });
  t.teardown(() => memory.close());
  await memory.addMany(ROWS);
  const query = 'cat named Whiskers';
  const expected = ROWS.map((row, i) => ({ id: i + 1, score: cosine(query, row.content) }))
    .filter((r) => r.score > 0)
    .sort((a, b) => b.score - a.score || a.id - b.id);
  const vector = await memory.search(query, { mode: 'vector', limit: 10 });
  const positive = vector.filter((h) => h.score > 0);
  t.same(positive.map((h) => h.id), expected.map((r) => r.id));
  positive.forEach((h, i) => t.ok(Math.abs(h.score - expected[i]!.score) < 1e-6, `cosine of row ${h.id}`));
  t.equal(vector[0]!.content, 'My cat is named Whiskers');

  const keyword = await memory.search(query, { mode: 'keyword', limit: 40 });
  const all = await memory.search(query, { mode: 'vector', limit: 40 });
  const hybrid = await memory.search(query, { mode: 'hybrid', limit: 10 });
  const fused = new Map<number, number>();
  for (const list of [keyword, all]) list.forEach((h, rank) => fused.set(h.id, (fused.get(h.id) ?? 0) + 1 / (60 + rank + 1)));
  const order = [...fused].sort((a, b) => b[1] - a[1] || a[0] - b[0]);
  t.same(hybrid.map((h) => [h.id, h.score]), order.map(([id, score]) => [id, score]));
  t.equal(hybrid[0]!.score, 2 / 61, 'first in both lists');

  // Session scope on vectors: an exact scan of that session only.
  const s2 = await memory.search('sunny weather', { mode: 'vector', sessionId: 's2', scope: 'session' });
  t.same(s2.map((h) => h.sessionId), ['s2']);
  const stats = await memory.stats();
  t.match(stats, { turns: 4, summaries: 0, sessions: 2, vectors: 4, dimension: 64, checkpoints: 0 });
});

const NASTY = [
  `He said "hello" and left`,
  `SELECT * FROM entries; DROP TABLE entries; --`,
  `a NEAR(b c, 2) AND NOT d OR e`,
  `title:secret ^start col* "unbalanced`,
  `it's O'Brien's; 'quoted' \\ backslash`,
  `entries_fts MATCH '*' ) ( {curly}`,
];

t.test('user text full of SQL and FTS syntax is stored and searched literally', async (t) => {
  const memory = await Memory.open({ path: path.join(t.testdir(), 'm.db'), embed: hashEmbed });
  t.teardown(() => memory.close());
  await memory.add({ sessionId: 'x', role: 'user', content: 'an ordinary sentence about nothing' });
  for (const content of NASTY) await memory.add({ sessionId: 'x', role: 'user', content, metadata: { raw: content } });
  for (const content of NASTY) {
    for (const mode of ['keyword', 'hybrid', 'vector'] as const) {
      const hits = await memory.search(content, { mode, limit: 3 });
      t.equal(hits[0]?.content, content, `${mode}: ${content}`);
      t.same(hits[0]?.metadata, { raw: content });
    }
  }
  t.same(contents(await memory.search('NEAR', { mode: 'keyword' })), [NASTY[2]]);
  t.same(contents(await memory.search('AND', { mode: 'keyword' })).sort(), [NASTY[0], NASTY[2]], 'the word, whatever its case');
  t.same(contents(await memory.search('secret', { mode: 'keyword' })), [NASTY[3]]);
  for (const nothing of ['"', '*', ';', '""', "'", ')(', '   ', '']) t.same(await memory.search(nothing, { mode: 'keyword' }), [], `no words: ${JSON.stringify(nothing)}`);
  // No word at all: stored, its (zero) vector left out of the index, searches still answer.
  await memory.add({ sessionId: 'x', role: 'user', content: '*** ;;; --- "" \'\'' });
  t.same(await memory.search('*** ;;;', { mode: 'vector' }), []);
  t.equal((await memory.search('ordinary', { mode: 'vector' }))[0]?.content, 'an ordinary sentence about nothing');
  t.equal((await memory.stats()).turns, NASTY.length + 2, 'no statement was injected');
});

t.test('summaries: one per session, replaced, searchable as their own tier', async (t) => {
  const memory = await Memory.open({ path: path.join(t.testdir(), 'm.db') });
  t.teardown(() => memory.close());
  await memory.add({ sessionId: 'a', role: 'user', content: 'the garden gnome' });
  await memory.setSummary('a', 'user talked about a garden', { turn: 3, at: 10 });
  await memory.setSummary('a', 'user owns a garden gnome named Bob', { turn: 9, at: 20 });
  await memory.setSummary('b', 'another garden, other session');
  t.match(await memory.summary('a'), { sessionId: 'a', content: 'user owns a garden gnome named Bob', turn: 9, at: 20 });
  t.equal(await memory.summary('nobody'), undefined);
  t.match(await memory.stats(), { turns: 1, summaries: 2 });
  const hits = await memory.search('garden', { mode: 'keyword', sessionId: 'a' });
  t.same(hits.map((h) => [h.content, h.tier]).sort(), [
    ['the garden gnome', 'session'],
    ['user owns a garden gnome named Bob', 'summary'],
  ]);
  t.same(contents(await memory.search('garden', { mode: 'keyword', sessionId: 'a', tiers: ['summary'] })), ['user owns a garden gnome named Bob']);
  t.same(contents(await memory.search('talked', { mode: 'keyword' })), [], 'the replaced summary is gone from the index');
  t.equal(await memory.lastTurn('a'), undefined, 'a summary is not a turn');
});

t.test('checkpoints: recorded, listed, pruned together with their cache entries', async (t) => {
  const dir = t.testdir();
  const store = new DirectoryStore(path.join(dir, 'cache'));
  const memory = await Memory.open({ path: path.join(dir, 'm.db') });
  t.teardown(() => memory.close());
  for (const turn of [1, 2, 3]) {
    await store.put(`k${turn}`, Buffer.from(`state ${turn}`));
    await memory.recordCheckpoint({ sessionId: 's', turn, entryKey: `k${turn}`, bytes: 7, at: Date.now() });
  }
  await store.put('old', Buffer.from('old state'));
  await memory.recordCheckpoint({ sessionId: 'other', turn: 5, entryKey: 'old', bytes: 9, at: Date.now() - 40 * 86_400_000 });
  t.same((await memory.snapshots('s')).map((c) => [c.sessionId, c.turn, c.entryKey, c.bytes]), [
    ['s', 1, 'k1', 7],
    ['s', 2, 'k2', 7],
    ['s', 3, 'k3', 7],
  ]);
  t.match(await memory.stats(), { checkpoints: 4, checkpointBytes: 30 });

  t.same(await memory.prune({ maxAgeDays: 30, cache: store }), { rows: 0, checkpoints: 1, cacheEntries: 1, cacheErrors: 0 });
  t.equal(await store.get('old'), undefined);
  t.same(await memory.prune({ maxCheckpointsPerSession: 1, cache: store }), { rows: 0, checkpoints: 2, cacheEntries: 2, cacheErrors: 0 });
  t.same((await memory.snapshots('s')).map((c) => c.turn), [3]);
  t.equal(await store.get('k1'), undefined);
  t.equal(await store.get('k2'), undefined);
  t.same(await store.get('k3'), Buffer.from('state 3'));

  t.same(await memory.forget({ sessionId: 's', cache: store }), { rows: 0, checkpoints: 1, cacheEntries: 1, cacheErrors: 0 });
  t.equal(await store.get('k3'), undefined);
});

t.test('prune and forget of turns: oldest first, by rows, bytes and age', async (t) => {
  const memory = await Memory.open({ path: path.join(t.testdir(), 'm.db') });
  t.teardown(() => memory.close());
  const now = Date.now();
  const day = 86_400_000;
  await memory.addMany(Array.from({ length: 10 }, (_, i) => ({ sessionId: i % 2 ? 'odd' : 'even', role: 'user', content: `row${i} 1234567`, turn: i, at: now - (10 - i) * day })));
  await memory.setSummary('even', 'kept through every prune', { at: now - 100 * day });
  t.same(await memory.prune({ maxAgeDays: 8.5 }), { rows: 2, checkpoints: 0, cacheEntries: 0, cacheErrors: 0 });
  t.same(await memory.prune({ maxRows: 6 }), { rows: 2, checkpoints: 0, cacheEntries: 0, cacheErrors: 0 });
  const perRow = Buffer.byteLength('row0 1234567');
  t.same(await memory.prune({ maxBytes: 3 * perRow + 1 }), { rows: 3, checkpoints: 0, cacheEntries: 0, cacheErrors: 0 });
  t.same(contents(await memory.search('1234567', { mode: 'keyword', sessionId: 'even', tiers: ['session', 'other'] })).sort(), ['row7 1234567', 'row8 1234567', 'row9 1234567']);
  t.match(await memory.stats(), { turns: 3, summaries: 1, bytes: 3 * perRow + Buffer.byteLength('kept through every prune') });
  t.equal(await memory.lastTurn('odd'), 9);
  const [row9] = await memory.search('row9', { mode: 'keyword' });
  t.same(await memory.forget({ ids: [row9!.id] }), { rows: 1, checkpoints: 0, cacheEntries: 0, cacheErrors: 0 });
  t.equal(await memory.lastTurn('odd'), 7);
  t.same(await memory.forget({ before: now - 2.5 * day }), { rows: 1, checkpoints: 0, cacheEntries: 0, cacheErrors: 0 });
  t.same(await memory.forget({ sessionId: 'even' }), { rows: 2, checkpoints: 0, cacheEntries: 0, cacheErrors: 0 }, 'its last turn and its summary');
  t.match(await memory.stats(), { turns: 0, summaries: 0, bytes: 0 });
});

t.test('reopen: the same results from the file; close waits for what is in flight; closed rejects', async (t) => {
  const file = path.join(t.testdir(), 'm.db');
  let memory = await Memory.open({ path: file, embed: hashEmbed });
  await memory.addMany(ROWS);
  await memory.setSummary('s1', 'the cat Whiskers lives in Lisbon');
  const before = await memory.search('Whiskers in Lisbon', { sessionId: 's1' });
  let release!: () => void;
  const gate = new Promise<void>((resolve) => (release = resolve));
  const slow = await Memory.open({ path: file, embed: async (texts) => (await gate, hashEmbed(texts)) });
  const pending = slow.add({ sessionId: 's3', role: 'user', content: 'added while closing', turn: 0 });
  const closing = slow.close();
  let closed = false;
  void closing.then(() => (closed = true));
  await new Promise((resolve) => setTimeout(resolve, 50));
  t.equal(closed, false, 'close waits for the add in flight');
  release();
  t.equal(await pending, 6, 'after the four turns and the summary');
  await closing;
  await t.rejects(slow.search('x'), { code: 'E_DISPOSED' });
  await t.rejects(slow.add({ sessionId: 'a', role: 'user', content: 'x' }), { code: 'E_DISPOSED' });
  await slow.close();
  await memory.close();
  await memory.close();

  memory = await Memory.open({ path: file, embed: hashEmbed });
  t.teardown(() => memory.close());
  t.same(await memory.search('Whiskers in Lisbon', { sessionId: 's1' }), before);
  t.same(contents(await memory.search('closing', { mode: 'vector', limit: 1 })), ['added while closing']);
  t.match(await memory.stats(), { turns: 5, summaries: 1, sessions: 3 });
  const other = await Memory.open({ path: file, namespace: 'elsewhere' });
  t.teardown(() => other.close());
  t.same(await other.search('Whiskers', { mode: 'keyword' }), [], 'another namespace sees nothing');
  t.match(await other.stats(), { turns: 0, sessions: 0 });
});

t.test('bad input gets coded errors, never a crash', async (t) => {
  const dir = t.testdir({ 'not-a-db': 'hello, I am not a database\n'.repeat(200) });
  await t.rejects(Memory.open({ path: path.join(dir, 'not-a-db') }), { code: 'E_MEMORY_DB' });
  await t.rejects(Memory.open({ path: dir }), { code: 'E_MEMORY_DB' }, 'a directory');
  await t.rejects(Memory.open({ path: path.join(dir, 'missing', 'dir', 'm.db') }), { code: 'E_MEMORY_DB' });
  await t.rejects(Memory.open({ path: '' }), TypeError);
  const file = path.join(dir, 'm.db');
  const memory = await Memory.open({ path: file, embed: hashEmbed });
  t.teardown(() => memory.close());
  await t.rejects(memory.add({ sessionId: 's', role: 'user', content: 42 as never }), TypeError);
  await t.rejects(memory.add({ sessionId: '', role: 'user', content: 'x' }), TypeError);
  await t.rejects(memory.add({ sessionId: 's', role: 'user', content: 'x', turn: -1 }), RangeError);
  await t.rejects(memory.add({ sessionId: 's', role: 'user', content: 'x', at: Number.NaN }), RangeError);
  await t.rejects(memory.search('x', { limit: 0 }), RangeError);
  await t.rejects(memory.search('x', { mode: 'fuzzy' as never }), RangeError);
  await t.rejects(memory.search('x', { scope: 'session' }), TypeError);
  await t.rejects(memory.prune({ maxRows: -3 }), RangeError);
  await t.rejects(memory.forget({}), TypeError);
  await memory.add({ sessionId: 's', role: 'user', content: 'sixty-four dimensions' });

  const wrongDim = await Memory.open({ path: file, embed: async (texts) => texts.map(() => new Float32Array(32).fill(1)) });
  t.teardown(() => wrongDim.close());
  await t.rejects(wrongDim.add({ sessionId: 's', role: 'user', content: 'x' }), { code: 'E_MEMORY_EMBED' });
  await t.rejects(wrongDim.search('x', { mode: 'vector' }), { code: 'E_MEMORY_EMBED' });
  const failing = await Memory.open({ path: file, embed: async () => { throw new Error('model unloaded'); } });
  t.teardown(() => failing.close());
  const err = await failing.add({ sessionId: 's', role: 'user', content: 'x' }).catch((e: unknown) => e);
  t.ok(err instanceof KvstashError && err.code === 'E_MEMORY_EMBED' && /model unloaded/.test(err.message), String(err));
  const short = await Memory.open({ path: file, embed: async () => [] });
  t.teardown(() => short.close());
  await t.rejects(short.add({ sessionId: 's', role: 'user', content: 'x' }), { code: 'E_MEMORY_EMBED' });
  t.equal((await memory.stats()).turns, 1, 'nothing half-written');
});

/** A child process holding the same database, answering JSON commands line by line. */
function startServer(file: string): { child: ChildProcessWithoutNullStreams; ask: (request: object) => Promise<unknown> } {
  const child = spawn(process.execPath, [...process.execArgv, CHILD, 'serve', file], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
  const lines = readline.createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  const ready = lines.next();
  const ask = async (request: object): Promise<unknown> => {
    await ready;
    child.stdin.write(`${JSON.stringify(request)}\n`);
    const line = await lines.next();
    if (line.done) throw new Error(`the memory child ended: ${stderr}`);
    return JSON.parse(line.value as string);
  };
  return { child, ask };
}

t.test('two processes on one database: each sees the other\'s writes and deletes', async (t) => {
  const file = path.join(t.testdir(), 'm.db');
  const memory = await Memory.open({ path: file, embed: hashEmbed });
  t.teardown(() => memory.close());
  await memory.add({ sessionId: 'p1', role: 'user', content: 'the parent wrote about alpha centauri' });
  const { child, ask } = startServer(file);
  t.teardown(() => child.kill());
  t.same(contents((await ask({ op: 'search', query: 'alpha centauri', mode: 'vector' })) as MemoryHit[]).slice(0, 1), ['the parent wrote about alpha centauri']);
  t.same(await memory.search('alpha centauri', { mode: 'vector' }).then((h) => h.length), 1, 'the parent built its index');
  t.equal(await ask({ op: 'add', sessionId: 'p2', role: 'user', content: 'the child wrote about beta pictoris', turn: 0 }), 2);
  t.same(contents(await memory.search('beta pictoris', { mode: 'vector', limit: 1 })), ['the child wrote about beta pictoris'], 'the parent caught up');
  t.same(contents(await memory.search('beta pictoris', { mode: 'keyword' })), ['the child wrote about beta pictoris']);
  t.match(await ask({ op: 'stats' }), { turns: 2, vectors: 2 });
  await memory.forget({ ids: [1] });
  const after = (await ask({ op: 'search', query: 'wrote about', mode: 'vector' })) as MemoryHit[];
  t.same(contents(after), ['the child wrote about beta pictoris']);
  t.match(await ask({ op: 'stats' }), { turns: 1, vectors: 1 }, 'the child rebuilt its index after the delete');
  child.stdin.end();
  await new Promise((resolve) => child.on('exit', resolve));

  // Two writers at once: every row of both lands, none twice.
  const writers = ['w1', 'w2'].map((session) => runWriter(file, session, 400, 20));
  const results = await Promise.all(writers.map((w) => w.done));
  t.same(results.map((r) => r.code), [0, 0]);
  t.equal(await memory.lastTurn('w1'), 399);
  t.equal(await memory.lastTurn('w2'), 399);
  t.equal((await memory.stats()).turns, 2 + 800 - 1);
  t.equal((await memory.search('word123', { mode: 'keyword', limit: 10 })).length, 2);
});

function runWriter(file: string, session: string, count: number, batch: number, killAfterAcks?: number) {
  const child = spawn(process.execPath, [...process.execArgv, CHILD, 'write', file, session, String(count), String(batch)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let acked = -1;
  let acks = 0;
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (text: string) => (stderr += text));
  child.stdout.setEncoding('utf8').on('data', (text: string) => {
    for (const match of text.matchAll(/acked (\d+)/g)) {
      acked = Number(match[1]);
      acks++;
      if (killAfterAcks !== undefined && acks >= killAfterAcks) child.kill('SIGKILL');
    }
  });
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; acked: number; stderr: string }>((resolve) =>
    child.on('exit', (code, signal) => resolve({ code, signal, acked, stderr })),
  );
  return { child, done };
}

t.test('SIGKILL while archiving loses no acknowledged row and leaves no half batch', async (t) => {
  const file = path.join(t.testdir(), 'm.db');
  for (const killAfterAcks of [1, 9]) {
    const session = `killed${killAfterAcks}`;
    const { done } = runWriter(file, session, 100_000, 25, killAfterAcks);
    const result = await done;
    t.equal(result.signal, 'SIGKILL', `killed mid-archive (${result.stderr})`);
    t.ok(result.acked >= killAfterAcks * 25 - 1, `acked through turn ${result.acked}`);
    const memory = await Memory.open({ path: file, embed: hashEmbed });
    const last = await memory.lastTurn(session);
    t.ok(last !== undefined && last >= result.acked, `archive holds turn ${last}, acked ${result.acked}`);
    const stats = await memory.stats();
    t.equal((last! + 1) % 25, 0, 'whole batches only');
    const hits = await memory.search(`word${result.acked}`, { mode: 'keyword', sessionId: session, scope: 'session' });
    t.same(contents(hits), [`turn ${result.acked} of ${session}: word${result.acked} archived`]);
    t.ok(stats.vectors >= result.acked + 1, 'vectors too');
    await memory.add({ sessionId: session, role: 'user', content: 'written after the crash' });
    await memory.close();
  }
  t.ok(fs.existsSync(file));
});

t.test('with model.embed (the synthetic embedding model): blank texts get no vector, texts sharing words are found', async (t) => {
  const model = await loadModel(await embeddingModel());
  t.teardown(() => model.dispose());
  const memory = await Memory.open({ path: path.join(t.testdir(), 'm.db'), embed: (texts) => model.embed(texts) });
  t.teardown(() => memory.close());
  await memory.addMany([
    { sessionId: 'a', role: 'user', content: 'my favourite colour is green', turn: 3 },
    { sessionId: 'a', role: 'assistant', content: '', turn: 3 },
    { sessionId: 'a', role: 'user', content: '   ', turn: 4 },
    { sessionId: 'b', role: 'user', content: 'the train leaves at nine tomorrow morning', turn: 0 },
  ]);
  t.match(await memory.stats(), { turns: 4, vectors: 2, dimension: model.info.embeddingSize });
  t.same(contents(await memory.search('favourite colour green', { mode: 'vector', limit: 1 })), ['my favourite colour is green']);
  t.same(contents(await memory.search('when does the train leave', { mode: 'vector', limit: 1 })), ['the train leaves at nine tomorrow morning']);
  t.same(contents(await memory.search('what colour do I like', { sessionId: 'b', limit: 1 })), ['my favourite colour is green']);
  t.same(await memory.search('   ', { mode: 'vector' }), []);
});
