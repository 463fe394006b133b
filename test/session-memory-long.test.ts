// Sessions remember (issue 17, item 3): a 150-turn conversation in a 1,024-token context, on a real
// memory database file, retrieves at turn 150 a fact told at turn 3 long after it left the window
// (keyword path: no embedding model); so does a second session of the same memory, and the first
// session after the database and the session were closed and reopened. The injected message sits
// after the system prefix, which still restores from the prompt cache; every turn is archived and
// checkpoints are recorded in the database.
import path from 'node:path';
import t from 'tap';
import { readEntryFile } from '../lib/cache/entry.js';
import { loadModel, Memory, PromptCache, Session, type Model } from '../lib/index.js';
import { tinyModel } from './helpers/fixtures.js';
import { FACT, QUESTION, question, send, system, withContext } from './helpers/session-memory.js';

// 150 turns that each re-evaluate most of a full 1,024-token window: about a minute on an idle
// machine, ten on a shared, loaded one; tap's 600 s default is not this file's budget.
t.setTimeout(1_800_000);
let model: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

t.test('a fact told at turn 3 is retrieved at turn 150, by a second session, and after reopening', async (t) => {
  const dir = t.testdir();
  const dbPath = path.join(dir, 'memory.db');
  const cache = new PromptCache({ dir: path.join(dir, 'cache') });
  let memory = await Memory.open({ path: dbPath });

  await withContext(model, async (context) => {
    const session = await Session.open({ dir, id: 'a', context, system, cache, memory, checkpoint: { everyTurns: 25, everySeconds: 0 } });
    for (let turn = 0; turn < 149; turn++) {
      const reply = await session.send(question(turn), send).result;
      t.ok(reply.retrieved.every((r) => r.sessionId === 'a' && r.tier === 'session' && r.turn! < turn), `turn ${turn}: only this session's earlier turns can be retrieved`);
    }
    t.ok(!session.messages.some((m) => m.content === FACT), 'the fact left the window long ago');
    t.ok(session.stats().clears > 100, `the window overflowed (${session.stats().clears} drops)`);
    const reply = await session.send(QUESTION, send).result;
    const fact = reply.retrieved.find((r) => r.content === FACT);
    t.ok(fact, `turn 150 retrieved the fact (${reply.retrieved.length} items: ${JSON.stringify(reply.retrieved.map((r) => [r.turn, r.content.slice(0, 30)]))})`);
    t.same({ ...fact, score: 0 }, { content: FACT, role: 'user', score: 0, tier: 'session', sessionId: 'a', turn: 3 });
    t.equal(reply.retrieved[0]!.content, FACT, 'ranked first: its rare words match the question');
    const stats = session.stats();
    t.equal(stats.turns, 150);
    t.equal(stats.archived, 150, 'every turn archived');
    t.ok(stats.retrieved >= 149, `items retrieved over the conversation: ${stats.retrieved}`);
    t.equal((await memory.stats()).turns, 300, 'user and assistant message of each turn in the database');

    // What the model held for turn 150: the system prefix, then the recall message, then the window.
    const snapshots = await memory.snapshots('a');
    t.same(snapshots.map((c) => c.turn), [25, 50, 75, 100, 125, 150], 'checkpoints recorded in the database');
    const held = model.detokenize(Int32Array.from((await readEntryFile(path.join(dir, 'a', 'checkpoints', snapshots.at(-1)!.entryKey))).header.tokens), { special: true });
    const prefix = model.applyChatTemplate([{ role: 'system', content: system }], { addAssistant: false });
    t.ok(held.startsWith(prefix), 'the sequence starts with the system prefix');
    t.ok(held.slice(prefix.length).startsWith('<|im_start|>system\nRelevant memory from earlier conversations:\n- user: Please remember this: my locker combination is wombat.'), 'and the recall message follows it, the fact first');
    t.ok(held.endsWith(`${QUESTION}<|im_end|>\n<|im_start|>assistant\n${reply.text}<|im_end|>\n`), 'then the window up to this turn');
    await session.close();
  });

  // A second session of the same memory: its system prefix comes from the prompt cache, and it
  // finds the fact in the other session's archive.
  await withContext(model, async (context) => {
    const before = cache.stats();
    const session = await Session.open({ dir, id: 'b', context, system, cache, memory });
    t.ok(cache.stats().prefillTokensSaved > before.prefillTokensSaved, `the second session's system prefix restored from the prompt cache (${cache.stats().prefillTokensSaved - before.prefillTokensSaved} tokens)`);
    const reply = await session.send(`Hello. ${QUESTION}`, send).result;
    const fact = reply.retrieved.find((r) => r.content === FACT);
    t.same(fact && { ...fact, score: 0 }, { content: FACT, role: 'user', score: 0, tier: 'other', sessionId: 'a', turn: 3 }, 'the second session retrieved the fact from session a');
    await session.close();
  });
  await memory.close();

  // Reopened: the database, and session a from its journal; the recall message is journaled, so
  // the newest checkpoint (which holds it) is still a prefix of what the session holds.
  memory = await Memory.open({ path: dbPath });
  await withContext(model, async (context) => {
    const session = await Session.resume({ dir, id: 'a', context, cache, memory });
    t.equal(session.resumeReport!.path, 'checkpoint', `resumed from the checkpoint that holds the recall message (${session.resumeReport!.restoredTokens} tokens)`);
    t.equal(session.resumeReport!.evaluatedTokens, 0, 'nothing to evaluate after it');
    const reply = await session.send(`Again: ${QUESTION}`, send).result;
    t.ok(reply.retrieved.some((r) => r.content === FACT && r.turn === 3), 'after reopening, the fact is retrieved again');
    t.equal(session.stats().archived, 1, 'this session object archived its one turn');
    await session.close();
  });
  t.equal(await memory.lastTurn('a'), 150);
  await memory.close();
});

