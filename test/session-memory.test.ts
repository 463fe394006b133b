// Sessions remember (issue 17, item 3), on a real memory database file: a turn the journal holds
// but the archive lacks is archived at resume; the clear policies (after N turns, above a share of
// the context, compact()) keep the system prompt and leave what they cleared retrievable; prune
// removes old checkpoint records together with their files, and the newest still resumes. The
// 150-turn conversation is test/session-memory-long.test.ts.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { readEntryFile } from '../lib/cache/entry.js';
import { loadModel, Memory, PromptCache, Session, type Model } from '../lib/index.js';
import { tinyModel } from './helpers/fixtures.js';
import { FACT, QUESTION, question, send, system, withContext } from './helpers/session-memory.js';

let model: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

t.test('a turn the journal holds and the archive lacks is archived at resume', async (t) => {
  const dir = t.testdir();
  const memory = await Memory.open({ path: path.join(dir, 'memory.db') });
  t.teardown(() => memory.close());
  await withContext(model, async (context) => {
    const session = await Session.open({ dir, id: 'r', context, system, memory });
    for (let turn = 0; turn < 3; turn++) await session.send(question(turn), send).result;
    await session.close();
  });
  // What a kill between the journal's write and the archive's leaves: the journal holds turn 3,
  // the archive does not (here the turn is sent by the session resumed without its memory).
  await withContext(model, async (context) => {
    const session = await Session.resume({ dir, id: 'r', context });
    await session.send(question(3), send).result;
    await session.close();
  });
  t.equal(await memory.lastTurn('r'), 2);
  t.same(await memory.search('wombat', { sessionId: 'r', mode: 'keyword' }), [], 'the fact is not archived');
  await withContext(model, async (context) => {
    const session = await Session.resume({ dir, id: 'r', context, memory });
    t.equal(session.stats().archived, 1, 'one turn repaired from the journal');
    t.equal(await memory.lastTurn('r'), 3);
    const found = await memory.search('wombat', { sessionId: 'r', mode: 'keyword' });
    t.same(found.map((h) => [h.turn, h.role, h.content]), [[3, 'user', FACT]]);
    await session.close();
  });
  t.equal((await memory.stats()).turns, 8, 'no turn archived twice');
});

t.test('clear policies keep the system prompt: after N turns, above a share of the context, compact()', async (t) => {
  const dir = t.testdir();
  const memory = await Memory.open({ path: path.join(dir, 'memory.db') });
  t.teardown(() => memory.close());
  await withContext(model, async (context) => {
    const every = await Session.open({ dir, id: 'every', context, system, memory: { memory, clear: { everyTurns: 3 } } });
    const sizes: number[] = [];
    for (let turn = 0; turn < 7; turn++) {
      await every.send(question(turn), send).result;
      sizes.push(every.messages.length);
    }
    t.same(sizes, [2, 4, 0, 2, 4, 0, 2], 'the window empties after every third turn');
    t.equal(every.stats().clears, 2);
    const reply = await every.send(QUESTION, send).result;
    t.ok(reply.retrieved.some((r) => r.content === FACT && r.tier === 'session'), 'what a clear removed is retrieved');
    await every.close();
  });
  await withContext(model, async (context) => {
    const share = await Session.open({ dir, id: 'share', context, system, memory: { memory, clear: { aboveShare: 0.3 } } });
    let cleared = -1;
    for (let turn = 0; turn < 12 && cleared < 0; turn++) {
      await share.send(question(turn), send).result;
      if (share.messages.length === 0) cleared = turn;
    }
    t.ok(cleared > 0, `cleared after turn ${cleared}, when the window passed 30% of 1,024 tokens`);
    t.equal(share.stats().clears, 1);
    await share.close();
  });
  await withContext(model, async (context) => {
    const cache = new PromptCache({ dir: null });
    const compacted = await Session.open({ dir, id: 'compact', context, system, cache, memory, overflow: { policy: 'summarize', summarize: async (m) => `they said ${m.length} things` } });
    for (let turn = 0; turn < 3; turn++) await compacted.send(question(turn), send).result;
    await compacted.compact();
    t.same(compacted.messages, [], 'compact() empties the window');
    t.equal(compacted.stats().clears, 1);
    t.equal((await memory.summary('compact'))?.content, 'they said 6 things', 'after writing the cumulative summary to memory');
    const checkpoint = await compacted.checkpoint();
    const held = model.detokenize(Int32Array.from((await readEntryFile(checkpoint.path)).header.tokens), { special: true });
    t.equal(held, model.applyChatTemplate([{ role: 'system', content: system }], { addAssistant: false }), 'the sequence holds the system prompt alone');
    const reply = await compacted.send('Go on.', send).result;
    t.same(reply.retrieved[0] && { tier: reply.retrieved[0].tier, content: reply.retrieved[0].content }, { tier: 'summary', content: 'they said 6 things' }, 'the summary is retrieved first once the window lacks it');
    await compacted.close();
  });
});

t.test('prune removes old checkpoint records with their files (Session.checkpointCache); the newest stays and resumes', async (t) => {
  const dir = t.testdir();
  const memory = await Memory.open({ path: path.join(dir, 'memory.db') });
  t.teardown(() => memory.close());
  const checkpoints = Session.checkpointCache(dir);
  const folder = (id: string): string => path.join(dir, id, 'checkpoints');
  await withContext(model, async (context) => {
    for (const [id, keep] of [['p', 10], ['rotated', 1]] as const) {
      const session = await Session.open({ dir, id, context, system, memory, checkpoint: { everyTurns: 1, everySeconds: 0, keep } });
      for (let turn = 0; turn < 3; turn++) await session.send(question(turn), send).result;
      await session.close();
    }
  });
  const records = await memory.snapshots('p');
  t.same(records.map((r) => r.turn), [1, 2, 3]);
  t.same(fs.readdirSync(folder('p')).sort(), records.map((r) => r.entryKey).sort(), "each record names one of the session's checkpoint files");

  t.same(await memory.prune({ maxCheckpointsPerSession: 1, cache: checkpoints }), { rows: 0, checkpoints: 4, cacheEntries: 2, cacheErrors: 0 }, "p's two older files deleted; 'rotated' had already removed its own");
  t.same(fs.readdirSync(folder('p')), [records[2]!.entryKey], 'the newest checkpoint file stays');
  t.same((await memory.snapshots('p')).map((r) => r.turn), [3]);
  t.same((await memory.snapshots('rotated')).map((r) => r.turn), [3]);
  t.equal(fs.readdirSync(folder('rotated')).length, 1, "the rotated session's newest file stays too");

  await withContext(model, async (context) => {
    const session = await Session.resume({ dir, id: 'p', context, memory });
    t.match(session.resumeReport, { path: 'checkpoint', evaluatedTokens: 0, skippedCheckpoints: [] }, 'the session resumes from the checkpoint prune kept');
    t.equal(session.history.length, 6);
    await session.send(question(3), send).result;
    await session.close();
  });

  await t.rejects(checkpoints.delete('../journal.kvj', { sessionId: 'p' }), RangeError, 'only checkpoint file names are deleted');
  t.same(await memory.forget({ sessionId: 'p', cache: checkpoints }), { rows: 8, checkpoints: 1, cacheEntries: 1, cacheErrors: 0 });
  t.same(fs.readdirSync(folder('p')), [], 'forget took the last checkpoint file with its record');
});
