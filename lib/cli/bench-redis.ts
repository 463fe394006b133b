/** `kvstash bench --redis`: runs lib/bench/redis.ts, writes its JSON, prints its rows and targets. */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { FULL_CONFIG, QUICK_CONFIG, type BenchType } from '../bench/bench.js';
import { runRedisBench, type RedisBenchReport } from '../bench/redis.js';
import type { Samples } from '../bench/measure.js';
import { userCacheDir } from '../util/paths.js';
import { fmt, ms, table, tildify } from './format.js';
import { cliUi } from './progress.js';

export interface RedisBenchFlags {
  quick?: boolean;
  types?: string;
  threads?: number;
  repetitions?: number;
  out?: string;
  'cache-dir'?: string;
  'json-only'?: boolean;
  'redis-url'?: string;
}

export async function runRedisBenchCommand(flags: RedisBenchFlags, signal: AbortSignal, type: BenchType): Promise<number> {
  const quick = flags.quick === true;
  const base = quick ? QUICK_CONFIG : FULL_CONFIG;
  const report = await runRedisBench({
    config: { ...base, threads: flags.threads ?? base.threads, restoreRepetitions: flags.repetitions ?? base.restoreRepetitions },
    type,
    modelRoot: flags['cache-dir'] === undefined ? userCacheDir() : path.resolve(flags['cache-dir']),
    signal,
    ui: cliUi,
    ...(flags['redis-url'] ? { url: flags['redis-url'] } : {}),
    ...(quick ? { lookupEntries: 500 } : {}),
  });
  const outDir = path.resolve(flags.out ?? 'bench-results');
  await fsp.mkdir(outDir, { recursive: true });
  const file = path.join(outDir, `redis-${report.startedAt.replace(/:/g, '-').replace(/\.\d+Z$/, 'Z')}.json`);
  await fsp.writeFile(file, `${JSON.stringify(report, null, 2)}\n`);
  if (flags['json-only'] === true) process.stdout.write(`${JSON.stringify(report)}\n`);
  else process.stdout.write(`${renderRedisReport(report)}\nReport written to ${tildify(file)}\n`);
  return 0;
}

export function renderRedisReport(report: RedisBenchReport): string {
  const { config, rows } = report;
  const spread = (s: Samples) => [ms(s.median), `${ms(s.min)} – ${ms(s.max)}`];
  const lines = [
    `kvstash bench --redis: synthetic ${config.shape} ${config.type}, ${fmt(config.prefixTokens)}-token prefix, entry ${fmt(report.entryBytes)} bytes in ${fmt(config.partBytes)}-byte parts, ` +
      `${config.redis}; medians of ${config.restoreRepetitions} interleaved rounds`,
    `${report.machine.cpu}, ${report.machine.cores} cores; load average ${report.machine.loadAverage.start[0]} → ${report.machine.loadAverage.end[0]}`,
    '',
    table(
      ['', 'median', 'range'],
      [
        ['cold prefill of the prefix (ms)', ms(rows.coldPrefillMs), ''],
        ['restore from the disk tier (ms)', ...spread(rows.diskRestoreMs)],
        ['restore from Redis: lookup, parts, verify, import (ms)', ...spread(rows.redisRestoreMs)],
        ['RedisStore.get alone: parts fetched together and verified (ms)', ...spread(rows.redisFetchMs)],
        ['plain GET of the same bytes as one value, same client (ms)', ...spread(rows.plainGetMs)],
        [`lookup with ${fmt(config.lookupEntries)} entries in the store (ms)`, ...spread(rows.lookupMs)],
      ],
      ['left', 'right', 'right'],
    ),
    '',
    'Targets',
    table(
      ['', 'measured', 'target'],
      report.targets.map((t) => [t.met ? 'met' : 'NOT MET', t.id === 'lookupMs' ? `${t.value.toFixed(2)} ms` : `${t.value.toFixed(3)}×`, t.target]),
      ['left', 'right', 'left'],
    ),
  ];
  return `${lines.join('\n')}\n`;
}
