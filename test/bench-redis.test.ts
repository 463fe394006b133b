// `kvstash bench --redis` runs end to end on the tiny model (its own redis-server on loopback):
// every row is measured, each restore hit the tier it measures (the bench throws otherwise), the
// lookup found the bench's entry first among the filler entries, and the report renders. No
// timing is asserted: speed targets live in the benchmark's own report.
import t from 'tap';
import { QUICK_CONFIG } from '../lib/bench/bench.js';
import { runRedisBench } from '../lib/bench/redis.js';
import { renderRedisReport } from '../lib/cli/bench-redis.js';

t.test('the Redis benchmark measures every row and renders its targets', async (t) => {
  // The tiny synthetic model is written into the test's own directory (seconds).
  const modelRoot = t.testdir();
  const ui = { status: <T>(_label: string, work: (progress: (done: number, total: number) => void) => Promise<T>) => work(() => undefined), showPath: (file: string) => file };
  const report = await runRedisBench({ config: { ...QUICK_CONFIG, restoreRepetitions: 3 }, type: 'q8_0', modelRoot, signal: new AbortController().signal, ui, lookupEntries: 200 });
  t.equal(report.config.lookupEntries, 200);
  t.ok(report.entryBytes > 0);
  for (const row of ['diskRestoreMs', 'redisRestoreMs', 'redisFetchMs', 'plainGetMs', 'lookupMs'] as const) {
    t.equal(report.rows[row].values.length, row === 'lookupMs' ? 45 : 3, `${row}: every round measured`);
    t.ok(report.rows[row].median > 0, `${row} > 0`);
  }
  t.same(report.targets.map((x) => x.id), ['redisRestoreVsPlainGet', 'redisRestoreVsCold', 'lookupMs']);
  const text = renderRedisReport(report);
  t.match(text, /restore from Redis: lookup, parts, verify, import/);
  t.match(text, /lookup with 200 entries in the store/);
});
