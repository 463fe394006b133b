// `kvstash memory search|stats|prune --db <path>` on a database Memory wrote: the compiled CLI in a
// child process, as a user runs it; prune --sessions deletes the pruned checkpoints' files.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { Memory } from '../lib/index.js';
import { requireBuiltCli, runCli } from './helpers/cli.js';

t.before(requireBuiltCli);

t.test('search, stats and prune from the command line', async (t) => {
  const dir = t.testdir();
  const db = path.join(dir, 'm.db');
  const memory = await Memory.open({ path: db });
  const now = Date.now();
  await memory.addMany([
    { sessionId: 'alice', role: 'user', content: 'my locker code is 4711', turn: 3, at: now - 10 * 86_400_000 },
    { sessionId: 'alice', role: 'assistant', content: 'noted: "4711" * NEAR; DROP TABLE entries', turn: 3, at: now - 9 * 86_400_000 },
    { sessionId: 'bob', role: 'user', content: 'I like tea', turn: 0, at: now },
  ]);
  await memory.recordCheckpoint({ sessionId: 'alice', turn: 3, entryKey: 'abc', bytes: 1000 });
  await memory.close();

  const search = await runCli(['memory', 'search', '4711 "NEAR"', '--db', db, '--json']);
  t.equal(search.code, 0, search.stderr);
  const hits = JSON.parse(search.stdout) as Array<{ content: string; sessionId: string; turn: number; tier: string }>;
  t.same(hits.map((h) => h.content).sort(), ['my locker code is 4711', 'noted: "4711" * NEAR; DROP TABLE entries']);
  const text = await runCli(['memory', 'search', 'tea', '--db', db, '--session', 'alice']);
  t.equal(text.code, 0, text.stderr);
  t.match(text.stdout, /^\s*score\s+tier\s+session\s+turn\s+role\s+at\s+content\n\d\.\d{4}\s+other\s+bob\s+0\s+user\s+.*I like tea\n$/);
  t.equal((await runCli(['memory', 'search', 'zebra', '--db', db])).stdout, 'No match\n');

  const stats = await runCli(['memory', 'stats', '--db', db, '--json']);
  t.equal(stats.code, 0, stats.stderr);
  t.match(JSON.parse(stats.stdout), { turns: 3, sessions: 2, summaries: 0, checkpoints: 1, checkpointBytes: 1000, dimension: null });
  t.match((await runCli(['memory', 'stats', '--db', db])).stdout, /turns\s+3\n/);

  const prune = await runCli(['memory', 'prune', '--db', db, '--max-age-days', '5']);
  t.equal(prune.code, 0, prune.stderr);
  t.equal(prune.stdout, 'Removed 2 turns and 0 checkpoint records\n');
  t.match(JSON.parse((await runCli(['memory', 'stats', '--db', db, '--json'])).stdout), { turns: 1, sessions: 1, checkpoints: 1 });

  for (const [args, code, message] of [
    [['memory', 'stats'], 2, /--db <path> is required/],
    [['memory', 'forget', '--db', db], 2, /unknown memory action/],
    [['memory', 'search', '--db', db], 2, /needs the text/],
    [['memory', 'prune', '--db', db], 2, /needs --max-rows/],
    [['memory', 'search', 'x', '--db', db, '--mode', 'vector'], 2, /embedding model/],
    [['memory', 'stats', '--db', path.join(dir, 'typo.db')], 1, /no memory database at/],
  ] as const) {
    const run = await runCli(args);
    t.equal(run.code, code, args.join(' '));
    t.match(run.stderr, message);
  }
});

t.test("prune --sessions deletes the removed checkpoint records' files", async (t) => {
  const dir = t.testdir();
  const db = path.join(dir, 'm.db');
  const sessions = path.join(dir, 'sessions');
  const folder = path.join(sessions, 'alice', 'checkpoints');
  fs.mkdirSync(folder, { recursive: true });
  const memory = await Memory.open({ path: db });
  const names = [1, 2, 3].map((turn) => `0000000${turn}-1700000000000-abcdef0${turn}.kvstash`);
  for (const [i, name] of names.entries()) {
    fs.writeFileSync(path.join(folder, name), `checkpoint ${i + 1}`);
    await memory.recordCheckpoint({ sessionId: 'alice', turn: i + 1, entryKey: name, bytes: 12 });
  }
  await memory.close();
  const prune = await runCli(['memory', 'prune', '--db', db, '--max-checkpoints', '1', '--sessions', sessions]);
  t.equal(prune.code, 0, prune.stderr);
  t.equal(prune.stdout, 'Removed 0 turns and 2 checkpoint records (2 checkpoint files deleted)\n');
  t.same(fs.readdirSync(folder), [names[2]], 'the newest checkpoint file stays');
  const again = await runCli(['memory', 'prune', '--db', db, '--max-checkpoints', '0', '--sessions', sessions, '--json']);
  t.same(JSON.parse(again.stdout), { rows: 0, checkpoints: 1, cacheEntries: 1, cacheErrors: 0 });
  t.same(fs.readdirSync(folder), []);
});
