// Sessions remember on an RKLLM model (issue 17: "works for RKLLM sessions too"), against the fake
// librkllmrt.so (one token per byte): every turn is archived in the Memory; a fact told at turn 0
// leaves the small context and is retrieved later; the recall message reaches the runtime as a
// system block right after the system prompt's, whose prompt cache the runtime still matches (only
// what follows it is prefilled); after the database and the session are reopened it is found again.
import path from 'node:path';
import t from 'tap';
import { CHATML_TEMPLATE, loadRkllmModel, Memory, Session } from '../lib/index.js';
import { FakeLog, fakeModelFile, fakeRuntimeLibrary, type FakeCall } from './helpers/fake-rkllm.js';

const root = t.testdir();
const log = new FakeLog(path.join(root, 'fake-calls.jsonl'));
const modelPath = fakeModelFile(root, 'qwen-fake');
process.env.XDG_CACHE_HOME = path.join(root, 'xdg');

const T = CHATML_TEMPLATE;
const SYSTEM = 'You are a terse assistant for RK3588 boards. Answer in one line.';
const FACT = 'Please remember this: my locker combination is wombat.';
const QUESTION = 'What is my locker combination?';
const filler = (i: number): string => `Question ${i}: what does step ${i * 7} of the board setup do?`;
const sys = T.system.replace('{system}', SYSTEM);
const user = (q: string): string => `${T.prefix}${q}${T.postfix}`;
const bytes = (...parts: string[]): number => Buffer.byteLength(parts.join(''));
/** The recall message's text for the retrieved items (this session's turns: no "another conversation" mark). */
const recallBlock = (items: Array<{ role: string; content: string }>): string =>
  T.system.replace('{system}', `Relevant memory from earlier conversations:\n${items.map((r) => `- ${r.role}: ${r.content}`).join('\n')}`);

function lastRun(): { prompt: string; end: FakeCall } {
  const started = log.calls('rkllm_run');
  const ended = log.calls('rkllm_run:end');
  return { prompt: (started.at(-1)!.input as { prompt: string }).prompt, end: ended.at(-1)! };
}

t.test('a memory session on the RKLLM backend: turns archived, the dropped fact retrieved after the system prefix', async (t) => {
  const dir = t.testdir();
  const maxContextLen = 900;
  const model = await loadRkllmModel(modelPath, { libraryPath: fakeRuntimeLibrary('1.3.0'), runtimeVersion: '1.3.0', maxNewTokens: 6, maxContextLen, cacheDir: path.join(dir, 'cache') });
  t.teardown(() => model.dispose());
  const dbPath = path.join(dir, 'memory.db');
  let memory = await Memory.open({ path: dbPath });
  const options = { dir, id: 'r', context: model, memory: { memory, recall: { maxTokens: 300 } }, checkpoint: { everyTurns: 0, everySeconds: 0 } };
  const session = await Session.open({ ...options, system: SYSTEM });

  await session.send(FACT).result;
  let turns = 1;
  while (session.messages.some((m) => m.content === FACT)) {
    const reply = await session.send(filler(turns)).result;
    t.ok(reply.retrieved.every((r) => r.sessionId === 'r' && r.tier === 'session' && r.turn! < turns), `turn ${turns}: only this session's earlier turns can be retrieved`);
    turns++;
    if (turns > 40) throw new Error(`the fact never left a ${maxContextLen}-byte context`);
  }
  t.ok(session.stats().clears > 0, `the fact left the window after ${turns} turns (${session.stats().clears} drops)`);

  log.clear();
  const reply = await session.send(QUESTION).result;
  turns++;
  t.same({ ...reply.retrieved[0], score: 0 }, { content: FACT, role: 'user', score: 0, tier: 'session', sessionId: 'r', turn: 0 }, 'the fact of turn 0 is retrieved first');
  const { prompt, end } = lastRun();
  const recall = recallBlock(reply.retrieved);
  t.ok(prompt.startsWith(sys + recall), `the runtime got the system block, then the recall message (${JSON.stringify(prompt.slice(0, 240))})`);
  t.ok(prompt.endsWith(user(QUESTION)), 'then the window and the question');
  t.ok(bytes(prompt) <= maxContextLen, `the run fits the context (${bytes(prompt)} of ${maxContextLen} bytes)`);
  t.match(end, { cached_tokens: bytes(sys), prefill_tokens: bytes(prompt) - bytes(sys), history_tokens: 0 }, "the system prompt's cache was matched: only the recall message and the window were prefilled");
  t.match(session.stats(), { turns, archived: turns });
  t.equal((await memory.stats()).turns, 2 * turns, 'user and assistant message of each turn in the database');
  t.equal(await memory.lastTurn('r'), turns - 1);
  t.same(
    (await memory.search('wombat', { sessionId: 'r', mode: 'keyword' })).map((h) => [h.turn, h.role, h.content]),
    [[0, 'user', FACT]],
    'the archive holds the fact as the turn-0 user message',
  );
  await session.close();
  await memory.close();

  // Reopened: the database and the session (from its journal); the fact is retrieved again.
  memory = await Memory.open({ path: dbPath });
  const resumed = await Session.resume({ ...options, memory: { memory, recall: { maxTokens: 300 } } });
  t.equal(resumed.stats().archived, 0, 'nothing to repair: every turn was archived before send() resolved');
  const again = await resumed.send(`Again: ${QUESTION}`).result;
  t.ok(again.retrieved.some((r) => r.content === FACT && r.turn === 0 && r.tier === 'session'), 'after reopening, the fact is retrieved again');
  t.equal(await memory.lastTurn('r'), turns);
  await resumed.close();
  await memory.close();
});
