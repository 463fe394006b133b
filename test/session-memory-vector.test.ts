// Sessions remember (issue 17, tests), the vector path of test/session-memory-long.test.ts: the same
// 150-turn conversation in a 1,024-token context, on a memory whose embed function is the synthetic
// embedding model (tiny-embed: a text's vector is the mean of its tokens' rows, a bag of words), with
// retrieval in mode 'vector' only. At turn 150 the fact told at turn 3 is retrieved, ranked first;
// so it is by a second session of the same memory, and by the first session after the database was
// closed and reopened (its vector index rebuilt from the file). Every retrieved item's score is the
// cosine of its vector and the query's, recomputed here with the embedding model: the ranking came
// from the vectors, not from FTS5's BM25.
import path from 'node:path';
import t from 'tap';
import { loadModel, Memory, PromptCache, Session, type Model, type RetrievedMemory } from '../lib/index.js';
import { embeddingModel, tinyModel } from './helpers/fixtures.js';
import { FACT, QUESTION, question, send, system, withContext } from './helpers/session-memory.js';

// About a minute on an idle machine (as the keyword path); far more beside other jobs.
t.setTimeout(1_800_000);
let model: Model;
let embedder: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
  embedder = await loadModel(await embeddingModel());
});
t.teardown(async () => {
  await model.dispose();
  await embedder.dispose();
});

t.test("mode 'vector': a fact told at turn 3 is retrieved at turn 150, by a second session, and after reopening", async (t) => {
  const dir = t.testdir();
  const dbPath = path.join(dir, 'memory.db');
  const cache = new PromptCache({ dir: path.join(dir, 'cache') });
  const embedded: string[] = [];
  const embed = (texts: string[]): Promise<Float32Array[]> => {
    embedded.push(...texts);
    return embedder.embed(texts);
  };
  const cosine = async (a: string, b: string): Promise<number> => {
    const [x, y] = await embedder.embed([a, b]);
    return x!.reduce((sum, v, i) => sum + v * y![i]!, 0);
  };
  /** Each retrieved item's score is the cosine of its vector and the query's, best first. */
  const scoredByCosine = async (query: string, retrieved: RetrievedMemory[], where: string): Promise<void> => {
    const cosines = await Promise.all(retrieved.map((r) => cosine(query, r.content)));
    t.ok(
      retrieved.every((r, i) => Math.abs(r.score - cosines[i]!) < 1e-4 && (i === 0 || r.score <= retrieved[i - 1]!.score)),
      `${where}: every score is the cosine with the query, best first (${JSON.stringify(retrieved.map((r, i) => [r.turn, r.score.toFixed(4), cosines[i]!.toFixed(4)]))})`,
    );
  };
  const recall = { mode: 'vector' as const };
  let memory = await Memory.open({ path: dbPath, embed });

  await withContext(model, async (context) => {
    const session = await Session.open({ dir, id: 'a', context, system, cache, memory: { memory, recall }, checkpoint: { everyTurns: 50, everySeconds: 0 } });
    for (let turn = 0; turn < 149; turn++) {
      const reply = await session.send(question(turn), send).result;
      t.ok(reply.retrieved.every((r) => r.sessionId === 'a' && r.tier === 'session' && r.turn! < turn), `turn ${turn}: only this session's earlier turns can be retrieved`);
    }
    t.ok(!session.messages.some((m) => m.content === FACT), 'the fact left the window long ago');
    t.ok(session.stats().clears > 100, `the window overflowed (${session.stats().clears} drops)`);
    embedded.length = 0;
    const reply = await session.send(QUESTION, send).result;
    t.equal(embedded[0], QUESTION, 'the question was embedded to search with');
    t.ok(reply.retrieved.length >= 1, `turn 150 retrieved ${JSON.stringify(reply.retrieved.map((r) => [r.turn, r.score.toFixed(3), r.content.slice(0, 30)]))}`);
    t.same({ ...reply.retrieved[0], score: 0 }, { content: FACT, role: 'user', score: 0, tier: 'session', sessionId: 'a', turn: 3 }, 'ranked first: the fact of turn 3');
    await scoredByCosine(QUESTION, reply.retrieved, 'turn 150');
    const stats = session.stats();
    t.equal(stats.turns, 150);
    t.equal(stats.archived, 150, 'every turn archived');
    const memoryStats = await memory.stats();
    t.equal(memoryStats.turns, 300, 'user and assistant message of each turn in the database');
    t.equal(memoryStats.dimension, 64, "the archive carries the embedding model's 64-dimensional vectors");
    t.ok(memoryStats.vectors >= 150, `at least every user message has a vector (${memoryStats.vectors}; blank replies have none)`);
    await session.close();
  });

  // A second session of the same memory finds the fact in session a's archive, by vector.
  await withContext(model, async (context) => {
    const session = await Session.open({ dir, id: 'b', context, system, cache, memory: { memory, recall } });
    const query = `Hello. ${QUESTION}`;
    const reply = await session.send(query, send).result;
    // Session a's last question was archived too and shares more words with this one: the fact need
    // not be first.
    const fact = reply.retrieved.find((r) => r.content === FACT);
    t.same(fact && { ...fact, score: 0 }, { content: FACT, role: 'user', score: 0, tier: 'other', sessionId: 'a', turn: 3 }, 'the second session retrieved the fact from session a');
    await scoredByCosine(query, reply.retrieved, 'second session');
    await session.close();
  });
  await memory.close();

  // Reopened: the vector index is rebuilt from the vectors the file holds.
  memory = await Memory.open({ path: dbPath, embed });
  await withContext(model, async (context) => {
    const session = await Session.resume({ dir, id: 'a', context, cache, memory: { memory, recall } });
    t.equal(session.resumeReport!.path, 'checkpoint', 'resumed from the checkpoint that holds the recall message');
    const query = `Again: ${QUESTION}`;
    const reply = await session.send(query, send).result;
    const fact = reply.retrieved.find((r) => r.content === FACT);
    t.same(fact && { ...fact, score: 0 }, { content: FACT, role: 'user', score: 0, tier: 'session', sessionId: 'a', turn: 3 }, 'after reopening, the fact is retrieved again');
    await scoredByCosine(query, reply.retrieved, 'after reopening');
    await session.close();
  });
  t.equal(await memory.lastTurn('a'), 150);
  await memory.close();
});
