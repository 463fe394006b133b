/**
 * `kvstash bench` (and `npm run bench`, which runs it): runs the benchmark (lib/bench), writes its
 * JSON, prints its table. It lives with the other commands so lib/bench imports nothing from lib/cli.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { BENCH_TYPES, FULL_CONFIG, QUICK_CONFIG, ROWS, runBench, type BenchReport, type BenchType } from '../bench/bench.js';
import { formatMemoryReport, MEMORY_FULL_CONFIG, MEMORY_QUICK_CONFIG, MEMORY_TTFT_CONFIG, runMemoryBench } from '../bench/memory.js';
import { runRedisBenchCommand } from './bench-redis.js';
import { runServerBench, SERVER_FULL_CONFIG, SERVER_QUICK_CONFIG, type ServerBenchReport, type ServerName } from '../bench/server.js';
import { syntheticModelPath } from '../tools/synthetic-model.js';
import { userCacheDir } from '../util/paths.js';
import { UsageError } from './errors.js';
import { fmt, ms, table, tildify } from './format.js';
import type { Command, FlagSpecs, Flags } from './main.js';
import { cliUi } from './progress.js';

const BENCH_FLAGS = {
  quick: { type: 'boolean', help: 'Smoke test on the tiny model: a 300-token prefix (with --server: the full requests); its numbers mean little' },
  types: { type: 'string', value: 'q8_0,q4_k', help: `Weight types to measure, comma-separated. Default ${BENCH_TYPES.join(',')}` },
  'json-only': { type: 'boolean', help: 'Print the JSON report instead of the table (it is written to --out either way)' },
  out: { type: 'string', value: 'dir', help: 'Where the JSON report is written, as <date>.json. Default ./bench-results' },
  'cache-dir': {
    type: 'string',
    value: 'dir',
    help: 'Where the synthetic models are kept (in <dir>/models). Default $XDG_CACHE_HOME/kvstash or ~/.cache/kvstash',
  },
  repetitions: { type: 'integer', help: `Rounds of warm measurements (rows show the median). Default ${FULL_CONFIG.repetitions}`, min: 1, max: 100 },
  threads: { type: 'integer', help: `Compute threads, for both libraries. Default ${FULL_CONFIG.threads}`, min: 1, max: 1024 },
  server: {
    type: 'boolean',
    help: "Instead: kvstash's OpenAI-compatible server beside llama.cpp's llama-server (built once from the pinned tree), over HTTP with streaming",
  },
  'servers': { type: 'string', value: 'list', help: 'With --server: which servers to run, comma-separated. Default llama-server,kvstash' },
  redis: { type: 'boolean', help: 'Instead: RedisStore over loopback (a redis-server started for it): restore from Redis vs the disk tier vs a cold prefill vs a plain GET, lookup at 10,000 entries' },
  'redis-url': { type: 'string', value: 'url', help: 'With --redis: measure this Redis instead of starting one' },
  memory: {
    type: 'boolean',
    help: "Instead: long-term memory (Memory on SQLite): search p50/p95 at 1k/10k/100k archived turns (keyword, vector, brute force, hybrid), the archive rate, and a turn's TTFT with memory vs without (retrieval timed apart from the injected text's prefill); --quick stops at 10k and uses the tiny model",
  },
} as const satisfies FlagSpecs;

export const benchCommand: Command<typeof BENCH_FLAGS> = {
  summary: 'Measure cold vs warm time to first token per cache tier, restore, entry size and shared sessions, beside node-llama-cpp; and the prebuilt binary vs a source build',
  flags: BENCH_FLAGS,
  run: runBenchCommand,
};

async function runBenchCommand(flags: Flags<typeof BENCH_FLAGS>, { signal }: { signal: AbortSignal }): Promise<number> {
  const quick = flags.quick === true;
  if (flags.server === true) return runServerBenchCommand(flags, signal);
  if (flags.memory === true) {
    const config = flags.quick === true ? MEMORY_QUICK_CONFIG : MEMORY_FULL_CONFIG;
    // The TTFT row runs a conversation on the benchmark's model (the tiny one with --quick).
    const modelRoot = flags['cache-dir'] === undefined ? userCacheDir() : path.resolve(flags['cache-dir']);
    const modelPath = await syntheticModelPath(modelRoot, signal, cliUi, { shape: quick ? 'tiny' : FULL_CONFIG.shape, type: 'q8_0', seed: FULL_CONFIG.seed });
    const ttft = { modelPath, config: { ...MEMORY_TTFT_CONFIG, threads: flags.threads ?? MEMORY_TTFT_CONFIG.threads } };
    return writeBenchReport(flags, 'memory-', await runMemoryBench(config, { signal, ttft, log: (line) => process.stderr.write(`${line}\n`) }), formatMemoryReport);
  }
  const types = parseTypes(flags.types);
  if (flags.redis === true) return runRedisBenchCommand(flags, signal, types[0]!);
  const base = quick ? QUICK_CONFIG : FULL_CONFIG;
  const config = { ...base, repetitions: flags.repetitions ?? base.repetitions, threads: flags.threads ?? base.threads };
  const report = await runBench({
    config,
    quick,
    types,
    modelRoot: flags['cache-dir'] === undefined ? userCacheDir() : path.resolve(flags['cache-dir']),
    signal,
    ui: cliUi,
  });
  return writeBenchReport(flags, '', report, renderReport);
}

/**
 * Writes a bench's JSON report to `--out` as <prefix><date>.json and prints it (`--json-only`) or
 * its table: the one ending of every `kvstash bench` variant.
 */
export async function writeBenchReport<R extends { startedAt: string }>(
  flags: { out?: string; 'json-only'?: boolean },
  prefix: string,
  report: R,
  render: (report: R) => string,
): Promise<number> {
  const outDir = path.resolve(flags.out ?? 'bench-results');
  await fsp.mkdir(outDir, { recursive: true });
  const file = path.join(outDir, `${prefix}${report.startedAt.replace(/:/g, '-').replace(/\.\d+Z$/, 'Z')}.json`);
  await fsp.writeFile(file, `${JSON.stringify(report, null, 2)}\n`);
  if (flags['json-only'] === true) process.stdout.write(`${JSON.stringify(report)}\n`);
  else process.stdout.write(`${render(report)}\nReport written to ${tildify(file)}\n`);
  return 0;
}

async function runServerBenchCommand(flags: Flags<typeof BENCH_FLAGS>, signal: AbortSignal): Promise<number> {
  const quick = flags.quick === true;
  const base = quick ? SERVER_QUICK_CONFIG : SERVER_FULL_CONFIG;
  const servers = (flags.servers ?? 'llama-server,kvstash').split(',').map((s) => s.trim());
  for (const name of servers) if (name !== 'kvstash' && name !== 'llama-server') throw new UsageError(`--servers takes kvstash, llama-server, got '${name}'`, 'bench');
  const report = await runServerBench({
    config: { ...base, threads: flags.threads ?? base.threads },
    quick,
    modelRoot: flags['cache-dir'] === undefined ? userCacheDir() : path.resolve(flags['cache-dir']),
    signal,
    ui: cliUi,
    servers: [...new Set(servers)] as ServerName[],
  });
  return writeBenchReport(flags, 'server-', report, renderServerReport);
}

/** The server report for a person: one column per server, then the targets. */
export function renderServerReport(report: ServerBenchReport): string {
  const { config } = report;
  const names = ['kvstash', 'llama-server'] as const;
  const sides = names.map((name) => report.servers[name]);
  const lines: string[] = [
    `kvstash bench --server: synthetic ${config.shape} ${config.type}, ${fmt(config.systemTokens)}-token system prompt + ~${config.questionTokens}-token question, ` +
      `${config.maxTokens} tokens out, ${config.threads} threads, ${config.parallel} slots, context ${fmt(config.contextSize)}, streaming over HTTP`,
    `llama.cpp ${report.llamaCommit}; ${report.machine.cpu}, ${report.machine.cores} cores; load average ${report.machine.loadAverage.start[0]} → ${report.machine.loadAverage.end[0]}`,
    '',
  ];
  for (const [i, side] of sides.entries()) if (side && 'unavailable' in side) lines.push(`${names[i]} not measured: ${side.unavailable.split('\n')[0]}`);
  const get = (f: (s: Exclude<(typeof sides)[number], undefined | { unavailable: string }>) => number | undefined, unit: 'ms' | 'tok/s' | 'tokens') =>
    sides.map((s) => {
      const v = s === undefined || 'unavailable' in s ? undefined : f(s);
      return v === undefined ? '-' : unit === 'ms' ? ms(v) : unit === 'tok/s' ? v.toFixed(1) : fmt(v);
    });
  const rows: string[][] = [
    ['cold request TTFT', ...get((s) => s.coldTtftMs, 'ms')],
    ['after a restart: 1-token completion that loads the model', ...get((s) => s.loadRequestMs, 'ms')],
    ['first chat request after a restart, TTFT', ...get((s) => s.restartTtftMs, 'ms')],
    ['warm single request, TTFT (median)', ...get((s) => s.warmTtftMs, 'ms')],
  ];
  for (const clients of config.concurrency) {
    const level = (s: { levels: Array<{ clients: number; firstRound: { ttftP50Ms: number; ttftP95Ms: number }; steady: { ttftP50Ms: number; ttftP95Ms: number; outputTokensPerSecond: number } }> }) => s.levels.find((l) => l.clients === clients);
    rows.push(
      [`${clients} clients, first round: p50 TTFT`, ...get((s) => level(s)?.firstRound.ttftP50Ms, 'ms')],
      [`${clients} clients, first round: p95 TTFT`, ...get((s) => level(s)?.firstRound.ttftP95Ms, 'ms')],
      [`${clients} clients, served before: p50 TTFT`, ...get((s) => level(s)?.steady.ttftP50Ms, 'ms')],
      [`${clients} clients, served before: p95 TTFT`, ...get((s) => level(s)?.steady.ttftP95Ms, 'ms')],
      [`${clients} clients: output tokens/s (aggregate)`, ...get((s) => level(s)?.steady.outputTokensPerSecond, 'tok/s')],
    );
  }
  rows.push(['prompt tokens per request (server count)', ...get((s) => s.promptTokens, 'tokens')]);
  lines.push(table(['', ...names], rows, ['left', 'right', 'right']), '');
  if (!('unavailable' in report.overhead)) {
    const o = report.overhead;
    lines.push(`HTTP overhead (kvstash): TTFT at the client − generate()'s TTFT inside the server, median ${o.overheadMs.toFixed(2)} ms of ${o.inServerDifferences.length} requests`);
    lines.push(`  the same requests through generate() in this process, own context: server ${ms(o.serverTtft.median)} vs library ${ms(o.libraryTtft.median)}, median difference ${o.pairedDifferenceMs.toFixed(2)} ms`);
  } else lines.push(`HTTP overhead not measured: ${report.overhead.unavailable.split('\n')[0]}`);
  if (!('unavailable' in report.ceiling)) lines.push(`llama.cpp's own batching gain (llama-batched-bench): ${report.ceiling.gain.toFixed(2)}× (${report.ceiling.command})`);
  else lines.push(`llama.cpp's batching gain not measured: ${report.ceiling.unavailable.split('\n')[0]}`);
  if (!('unavailable' in report.prefillFloor)) {
    const f = report.prefillFloor;
    lines.push(`llama.cpp's own prefill of one question (llama-bench): ${f.promptTokens} tokens at depth ${f.depth} in ${ms(f.ms)} ms (${f.command})`);
  } else lines.push(`llama.cpp's prefill of one question not measured: ${report.prefillFloor.unavailable.split('\n')[0]}`);
  lines.push('', 'Targets');
  const targetRows = report.targets.map((t) => [
    t.met === null ? 'not measured' : t.met ? 'met' : 'NOT MET',
    t.value === null ? '-' : t.unit === 'ms' ? `${t.value.toFixed(2)} ms` : `${t.value.toFixed(3)}×`,
    `${t.op} ${t.limit}${t.unit === 'ms' ? ' ms' : '×'}`,
    t.formula,
    t.description,
  ]);
  lines.push(table(['', 'measured', 'target', 'from', ''], targetRows, ['left', 'right', 'left', 'left', 'left']));
  return `${lines.join('\n')}\n`;
}

function parseTypes(text: string | undefined): BenchType[] {
  if (text === undefined) return [...BENCH_TYPES];
  const types = text.split(',').map((t) => t.trim());
  for (const type of types) {
    if (!(BENCH_TYPES as readonly string[]).includes(type)) throw new UsageError(`--types takes ${BENCH_TYPES.join(', ')}, got '${type}'`, 'bench');
  }
  return [...new Set(types)] as BenchType[];
}

/** The report for a person: one column per weight type, then the targets. */
export function renderReport(report: BenchReport): string {
  const { config, results } = report;
  const lines: string[] = [];
  const nlc = 'version' in report.nodeLlamaCpp ? `node-llama-cpp ${report.nodeLlamaCpp.version} (${report.nodeLlamaCpp.buildType})` : `node-llama-cpp: ${report.nodeLlamaCpp.unavailable}`;
  lines.push(
    `kvstash bench: synthetic ${config.shape}, ${fmt(config.prefixTokens)}-token prefix + ${config.suffixTokens}-token suffix, ` +
      `${config.threads} threads, batch ${config.batchSize}, medians of ${config.repetitions} rounds`,
    `llama.cpp ${report.kvstash.llamaCommit} (${buildName(report.kvstash.cpuVariant)}); ${nlc}; ${report.machine.cpu}, ${report.machine.cores} cores; ` +
      `load average ${report.machine.loadAverage.start[0]} → ${report.machine.loadAverage.end[0]}`,
    `Page-cache eviction: ${config.eviction.method} (${config.eviction.note})`,
    '',
  );
  const header = ['', ...results.map((r) => r.type)];
  const rows = ROWS.map(([id, label, unit]) => [`${label}${unit === 'bytes' || unit === 'cells' || unit === 'tokens' ? '' : ` (${unit})`}`, ...results.map((r) => cell(r.rows[id], unit))]);
  lines.push(table(header, rows, ['left', ...results.map(() => 'right' as const)]), '');
  lines.push('Targets');
  const targetRows = report.targets.map((t) => [
    t.met === null ? 'not measured' : t.met ? 'met' : 'NOT MET',
    t.type,
    t.value === null ? '-' : t.unit === 'ms' ? `${t.value.toFixed(2)} ms` : `${t.value.toFixed(3)}×`,
    `${t.op} ${t.limit}${t.unit === 'ms' ? ' ms' : '×'}`,
    t.description,
  ]);
  lines.push(table(['', 'type', 'measured', 'target', ''], targetRows, ['left', 'left', 'right', 'left', 'left']));
  for (const r of results.filter((r) => !r.sessions.sameTokensAsSequential)) {
    lines.push('', `Note (${r.type}): ${r.sessions.sessionsMatchingSequential} of ${config.sessions} concurrent sessions generated the tokens of the same session run alone (other batch splits; random weights give near-tied logits).`);
  }
  for (const r of results) {
    const { tokens, prebuilt, source } = r.prebuiltVsSource;
    const side = (outcome: typeof prebuilt, name: string) => ('unavailable' in outcome ? `${name} not measured (${outcome.unavailable.split('\n')[0]})` : buildName(outcome.cpuVariant));
    lines.push('', `Prompt processing (${r.type}, ${fmt(tokens)}-token batch, child processes): ${side(prebuilt, 'prebuilt binary')} vs ${side(source, 'source build')}`);
  }
  return `${lines.join('\n')}\n`;
}

function buildName(cpuVariant: string): string {
  return cpuVariant === 'source' ? 'source build' : `prebuilt binary ${cpuVariant}`;
}

function cell(value: number | null, unit: string): string {
  if (value === null) return '-';
  if (unit === 'ms') return ms(value);
  if (unit === 'tok/s' || unit === 'MB/s') return value >= 100 ? fmt(Math.round(value)) : value.toFixed(1);
  if (unit === '×') return `${value.toFixed(3)}×`;
  return fmt(value);
}
