/**
 * The benchmark of issue 3: every row measured side by side in one run, per weight type, on the
 * same model file for kvstash and node-llama-cpp, with the same threads and batch size.
 *
 * Two kvstash contexts per model, so each row runs in the KV layout it claims:
 * - `single` (1 sequence): the cold run, the RAM and disk tiers and the suffix prefill alone. Its
 *   sequence holds only the prompt, so every decode attends over the same cells.
 * - `shared` (1 + sessions sequences, unified KV): sequence 0 holds the template prefix; the resident
 *   tier and the concurrent sessions copy it into their sequences (cells shared, not duplicated).
 * Warm rows are taken in rounds (one of each per round, kvstash and node-llama-cpp interleaved) so
 * that a noisy neighbour on the machine slows all of them alike; each row reports its median. Each
 * warm run follows the suffix prefill alone in the same context; the overhead rows are medians of
 * those pairs' ratios (a 500 ms step on a shared machine varies by ±10 % from one minute to the
 * next, more than the 5 % the target allows, so unpaired medians could not tell).
 * Restore rows come from rounds of their own (cache.restore(), the call generate() makes, beside
 * node-llama-cpp's loadStateFromFile), more of them because a few milliseconds are easily disturbed;
 * the restore times inside the warm runs are kept in `samples` (`…RestoreMsInGenerate`).
 * Last, the prebuilt binary's prompt processing beside a source build's, in child processes
 * (prebuilt-vs-source.ts): this process has loaded one of them and cannot load the other.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { PromptCache, type CacheTier } from '../cache/prompt-cache.js';
import { generate, type GenerationResult } from '../generate/generate.js';
import type { Context } from '../llama/context.js';
import { loadModel, type Model } from '../llama/model.js';
import type { SyntheticShapeName } from '../models/synthetic.js';
import { systemInfo } from '../system.js';
import type { Ui } from '../tools/status.js';
import { syntheticModelPath } from '../tools/synthetic-model.js';
import { concat, sameTokens } from '../tools/tokens.js';
import { median, round3, Series, type Samples } from './measure.js';
import { NodeLlamaCppRunner, type NodeLlamaCppInfo } from './node-llama-cpp.js';
import { ensurePeer, type PeerInstall } from './peer.js';
import { measurePageCacheRead, readInto, startEvictor, type RemoteEvictor } from './page-cache.js';
import { BUILDS, measurePrebuiltVsSource, type PrebuiltVsSource } from './prebuilt-vs-source.js';
import { buildBenchPrompt } from './prompt.js';
import { evaluateTargets, type TargetResult } from './targets.js';

export const BENCH_TYPES = ['q8_0', 'q4_k'] as const;
export type BenchType = (typeof BENCH_TYPES)[number];

export interface BenchConfig {
  shape: SyntheticShapeName;
  seed: number;
  /** Tokens of the cached template prefix. */
  prefixTokens: number;
  /** Tokens of each new suffix (a user turn). */
  suffixTokens: number;
  threads: number;
  contextSize: number;
  batchSize: number;
  /** Rounds of warm measurements; rows report the median. */
  repetitions: number;
  /** Rounds of restores alone (milliseconds each, so more of them: their noise is relatively larger). */
  restoreRepetitions: number;
  /** Concurrent sessions sharing the template. */
  sessions: number;
  /** Tokens each session generates. */
  sessionTokens: number;
  /** Repetitions of the page-cache read. */
  readRepetitions: number;
  /** Tokens of the batch timed for the prebuilt binary and the source build. */
  promptSpeedTokens: number;
  /** Rounds of one child process per build (turns alternating); rows report the median of all decodes. */
  promptSpeedRounds: number;
  /** Timed decodes in each child. */
  promptSpeedRepetitions: number;
}

export const FULL_CONFIG: BenchConfig = {
  shape: 'qwen2-0.5b',
  seed: 1,
  prefixTokens: 2000,
  suffixTokens: 50,
  threads: 2,
  contextSize: 4096,
  batchSize: 512,
  repetitions: 9,
  restoreRepetitions: 15,
  sessions: 8,
  sessionTokens: 32,
  readRepetitions: 10,
  promptSpeedTokens: 512,
  // 2 rounds (6 decodes per build) let one slow child move the median: q4_k ratios of 1.005, 0.919
  // and 0.883 in three runs of the same builds, one child's decodes 25 % slower than the other's.
  promptSpeedRounds: 4,
  promptSpeedRepetitions: 3,
};

/** A smoke test of every row on the tiny model: seconds, not minutes; its numbers mean little. */
export const QUICK_CONFIG: BenchConfig = { ...FULL_CONFIG, shape: 'tiny', prefixTokens: 300, repetitions: 3, restoreRepetitions: 5, sessionTokens: 8, readRepetitions: 5 };

/** Every row of a type's results, in table order: [id, label, unit]. */
export const ROWS = [
  ['coldTtftMs', 'cold TTFT: prefill of prefix+suffix, first token', 'ms'],
  ['nlcColdTtftMs', 'cold TTFT, node-llama-cpp', 'ms'],
  ['coldPrefillTokensPerSecond', 'cold prefill rate (batch 512)', 'tok/s'],
  ['nlcColdPrefillTokensPerSecond', 'cold prefill rate, node-llama-cpp', 'tok/s'],
  ['suffixPrefillMs', 'suffix prefill alone + first sample', 'ms'],
  ['suffixPrefillTokensPerSecond', 'suffix prefill rate (one batch)', 'tok/s'],
  ['nlcSuffixPrefillMs', 'suffix prefill alone, node-llama-cpp', 'ms'],
  ['nlcSuffixPrefillTokensPerSecond', 'suffix prefill rate, node-llama-cpp', 'tok/s'],
  ['warmResidentTtftMs', 'warm TTFT, resident copy', 'ms'],
  ['warmRamTtftMs', 'warm TTFT, RAM', 'ms'],
  ['warmDiskTtftMs', 'warm TTFT, disk (page cache warm)', 'ms'],
  ['warmDiskEvictedTtftMs', 'warm TTFT, disk (evicted)', 'ms'],
  ['nlcWarmTtftMs', 'warm TTFT, node-llama-cpp in-sequence reuse', 'ms'],
  ['warmResidentOverheadRatio', 'warm TTFT / (restore + suffix alone), resident copy', '×'],
  ['warmRamOverheadRatio', 'warm TTFT / (restore + suffix alone), RAM', '×'],
  ['warmDiskOverheadRatio', 'warm TTFT / (restore + suffix alone), disk', '×'],
  ['warmDiskEvictedOverheadRatio', 'warm TTFT / (restore + suffix alone), disk evicted', '×'],
  ['residentRestoreMs', 'restore, resident copy', 'ms'],
  ['ramRestoreMs', 'restore, RAM', 'ms'],
  ['diskRestoreMs', 'restore, disk (page cache warm, verified)', 'ms'],
  ['diskEvictedRestoreMs', 'restore, disk (evicted, verified)', 'ms'],
  ['nlcLoadStateMs', 'loadStateFromFile, node-llama-cpp (page cache warm)', 'ms'],
  ['nlcLoadStateEvictedMs', 'loadStateFromFile, node-llama-cpp (evicted)', 'ms'],
  ['nlcSaveStateMs', 'saveStateToFile, node-llama-cpp', 'ms'],
  ['pageCacheReadMs', 'page-cache read of the entry (into one reused buffer)', 'ms'],
  ['pageCacheReadMBps', 'page-cache read bandwidth', 'MB/s'],
  ['entryBytes', 'kvstash entry file', 'bytes'],
  ['rawKvBytes', 'raw f16 KV of the prefix tokens', 'bytes'],
  ['stateBytes', 'ctx.stateSize() of the prefix sequence', 'bytes'],
  ['nlcStateFileBytes', 'node-llama-cpp state file', 'bytes'],
  ['sessionsConcurrentTokensPerSecond', 'sessions concurrent: generated tokens/s', 'tok/s'],
  ['sessionsSequentialTokensPerSecond', 'sessions one after another: generated tokens/s', 'tok/s'],
  ['sessionsConcurrentMs', 'sessions concurrent: wall time', 'ms'],
  ['sessionsSequentialMs', 'sessions one after another: wall time', 'ms'],
  ['sessionsGeneratedTokens', 'sessions: tokens generated (each run)', 'tokens'],
  ['sessionsOneTokenStepMs', 'decode step: one token of one session', 'ms'],
  ['sessionsAllTokensStepMs', 'decode step: one token of every session', 'ms'],
  ['sessionsStepSpeedup', 'batching gain of a decode step (sessions × one / all): the ceiling of generation', '×'],
  ['sessionsKvCells', 'sessions: KV cells in use', 'cells'],
  ['sessionsKvBytes', 'sessions: KV bytes held', 'bytes'],
  ['sessionsTemplatePlusOwnBytes', 'one template + every session\'s own tokens', 'bytes'],
  ['sessionsSeparateCopiesBytes', 'one copy of the template per session', 'bytes'],
  ['sourcePromptTokensPerSecond', 'prompt processing (512-token batch), source build', 'tok/s'],
  ['prebuiltPromptTokensPerSecond', 'prompt processing (512-token batch), prebuilt binary', 'tok/s'],
] as const;

export type RowId = (typeof ROWS)[number][0];
export type Rows = Record<RowId, number | null>;

export interface TypeResult {
  type: BenchType;
  model: { path: string; bytes: number; name: string };
  context: { flashAttention: string; kvType: string; ubatchSize: number; unifiedKv: boolean };
  prompt: { prefixTokens: number; suffixTokens: number };
  rows: Rows;
  /** Every repeated measurement behind a median row. */
  samples: Record<string, Samples>;
  sessions: {
    /** Tier each concurrent session restored its template from. */
    tiers: Array<CacheTier | null>;
    /** Prompt tokens each concurrent session evaluated. */
    evaluatedTokens: number[];
    /** Concurrent and sequential sessions generated the same tokens (greedy). They need not: the
     * batches differ (shared steps, and a later sequential session may copy a longer prefix from an
     * earlier one), and random weights give near-tied logits that rounding can flip. */
    sameTokensAsSequential: boolean;
    /** How many sessions generated the same tokens both ways. */
    sessionsMatchingSequential: number;
    /** KV bytes per cell found from the state sizes, and from the model shape. */
    kvBytesPerCellMeasured: number;
    kvBytesPerCellFromShape: number;
  };
  /** The addon each build's child processes loaded (the prebuilt binary's CPU variant), or why a
   * build could not be measured; its row is then null. */
  prebuiltVsSource: PrebuiltVsSource;
}

export interface BenchReport {
  format: 'kvstash-bench/1';
  startedAt: string;
  finishedAt: string;
  durationSeconds: number;
  quick: boolean;
  machine: {
    cpu: string;
    cores: number;
    memoryBytes: number;
    loadAverage: { start: number[]; end: number[] };
    node: string;
    note: string;
  };
  /** The addon this process loaded, which measured every row but the prebuilt-vs-source ones. */
  kvstash: { llamaCommit: string; cpuFeatures: string; cpuVariant: string };
  nodeLlamaCpp: NodeLlamaCppInfo | { unavailable: string };
  config: BenchConfig & { types: BenchType[]; eviction: { method: string; note: string } };
  results: TypeResult[];
  targets: TargetResult[];
}

export interface BenchOptions {
  config: BenchConfig;
  quick: boolean;
  types: readonly BenchType[];
  /** Root of the cached synthetic models (<root>/models), as for the demo. */
  modelRoot: string;
  signal: AbortSignal;
  /** How slow work and paths are shown (the CLI's status line). */
  ui: Ui;
}

export async function runBench(options: BenchOptions): Promise<BenchReport> {
  const started = new Date();
  const loadStart = os.loadavg();
  const { config } = options;
  // Entries live on the same file system as the models (not a tmpfs), so "disk" means a disk.
  await fsp.mkdir(options.modelRoot, { recursive: true });
  const workDir = await fsp.mkdtemp(path.join(options.modelRoot, 'bench-'));
  let nodeLlamaCpp: BenchReport['nodeLlamaCpp'] = { unavailable: 'not loaded' };
  let evictor: RemoteEvictor | undefined;
  try {
    const probe = path.join(workDir, 'eviction-probe');
    fs.writeFileSync(probe, Buffer.alloc(1 << 20, 1));
    evictor = await startEvictor(probe);
    const peer = await installPeer(options);
    const results: TypeResult[] = [];
    for (const type of options.types) {
      options.signal.throwIfAborted();
      const { result, nlcInfo } = await benchType(type, options, peer, evictor, path.join(workDir, type));
      results.push(result);
      nodeLlamaCpp = nlcInfo;
    }
    const finished = new Date();
    const { llamaCommit, cpuFeatures, cpuVariant } = systemInfo();
    return {
      format: 'kvstash-bench/1',
      startedAt: started.toISOString(),
      finishedAt: finished.toISOString(),
      durationSeconds: round3((finished.getTime() - started.getTime()) / 1000),
      quick: options.quick,
      machine: {
        cpu: os.cpus()[0]?.model ?? 'unknown',
        cores: os.cpus().length,
        memoryBytes: os.totalmem(),
        loadAverage: { start: loadStart.map(round3), end: os.loadavg().map(round3) },
        node: process.version,
        note: 'Timings are medians of interleaved rounds; a load average above the thread count means other work shared the CPU.',
      },
      kvstash: { llamaCommit, cpuFeatures, cpuVariant },
      nodeLlamaCpp,
      config: { ...config, types: [...options.types], eviction: { method: evictor.method, note: evictor.note } },
      results,
      targets: results.flatMap((r) => evaluateTargets(r)),
    };
  } finally {
    evictor?.close();
    await fsp.rm(workDir, { recursive: true, force: true });
  }
}

async function benchType(
  type: BenchType,
  options: BenchOptions,
  peer: PeerInstall | { unavailable: string },
  evictor: RemoteEvictor,
  dir: string,
): Promise<{ result: TypeResult; nlcInfo: BenchReport['nodeLlamaCpp'] }> {
  const { config, signal } = options;
  const withStatus = options.ui.status;
  await fsp.mkdir(dir, { recursive: true });
  const modelPath = await syntheticModelPath(options.modelRoot, signal, options.ui, { shape: config.shape, type, seed: config.seed });
  const model = await withStatus(`[${type}] Loading the model`, (progress) => loadModel(modelPath, { onProgress: (f) => progress(f, 1) }));
  let nlc: NodeLlamaCppRunner | undefined;
  try {
    const contextOptions = { contextSize: config.contextSize, batchSize: config.batchSize, threads: config.threads };
    const single = await model.createContext({ ...contextOptions, sequences: 1 });
    const shared = await model.createContext({ ...contextOptions, sequences: 1 + config.sessions });
    const prompt = buildBenchPrompt(model, config.prefixTokens, config.suffixTokens, 1 + config.sessions);
    const { prefix } = prompt;
    const P = prefix.length;
    const suffix = prompt.suffixes[0]!;
    const full = concat(prefix, suffix);
    const rows = Object.fromEntries(ROWS.map(([id]) => [id, null])) as Rows;
    const series = new Series();

    const opened =
      'unavailable' in peer
        ? peer
        : await withStatus(`[${type}] Loading it in node-llama-cpp`, () =>
            NodeLlamaCppRunner.open(peer, modelPath, { threads: config.threads, contextSize: config.contextSize, batchSize: config.batchSize }),
          );
    const nlcInfo = opened instanceof NodeLlamaCppRunner ? opened.info : opened;
    if (opened instanceof NodeLlamaCppRunner) nlc = opened;
    else process.stderr.write(`kvstash bench: node-llama-cpp rows left out: ${opened.unavailable}\n`);

    // Warm-up: the first decode of a fresh process pays for faulting in the weights.
    for (const context of [single, shared]) {
      await context.decode(prefix.subarray(0, 16), { sequence: 0, start: 0, logits: 'none' });
      await context.exclusive(() => context.memory.clear());
    }
    await nlc?.cold(prefix.subarray(0, 16));

    // Cold: one full prefill each (the slowest rows by far).
    const cold = await withStatus(`[${type}] Cold prefill, kvstash (${P + suffix.length} tokens)`, (progress) =>
      generate(single, { prompt: full, maxTokens: 1, onProgress: progress }).result,
    );
    rows.coldTtftMs = cold.ttftMs;
    rows.coldPrefillTokensPerSecond = full.length / (cold.ttftMs / 1000);
    if (nlc) {
      const runner = nlc;
      rows.nlcColdTtftMs = await withStatus(`[${type}] Cold prefill, node-llama-cpp`, () => runner.cold(full));
      rows.nlcColdPrefillTokensPerSecond = full.length / (rows.nlcColdTtftMs / 1000);
    }

    // The prefix as an entry: one cache per tier, so each lookup can only hit the tier it measures.
    await single.exclusive(() => single.memory.remove(0, P));
    const residentCache = new PromptCache({ dir: null, maxRamBytes: 0 });
    const ramCache = new PromptCache({ dir: null, maxRamBytes: 2 ** 31 });
    const diskCache = new PromptCache({ dir: path.join(dir, 'entries'), maxRamBytes: 0 });
    for (const cache of [residentCache, ramCache, diskCache]) {
      cache.on('problem', (problem: { code: string; message: string }) => process.stderr.write(`kvstash bench: cache problem ${problem.code}: ${problem.message}\n`));
    }
    for (const cache of [ramCache, diskCache]) {
      await cache.save(single, prefix, { sequence: 0, label: 'bench-template' });
      cache.setResident(single, 0, new Int32Array(0));
    }
    await diskCache.flush();
    const entry = (await diskCache.list()).find((e) => e.path !== undefined);
    if (!entry?.path) throw new Error('the disk tier did not write the entry');
    const payload = await single.exportState({ sequence: 0 });
    await shared.importState(payload, { sequence: 0 });
    residentCache.setResident(shared, 0, prefix);
    rows.entryBytes = entry.bytes;
    rows.stateBytes = single.stateSize({ sequence: 0 });
    const kvBytesPerToken = rawKvBytesPerToken(model);
    rows.rawKvBytes = kvBytesPerToken * P;
    const nlcStateFile = path.join(dir, 'node-llama-cpp.state');
    if (nlc) {
      const saved = await nlc.save(P, nlcStateFile);
      rows.nlcSaveStateMs = saved.ms;
      rows.nlcStateFileBytes = saved.bytes;
    }

    // Warm rounds.
    const sampler = model.createSampler();
    // The page-cache warm-up reads into one buffer: a fresh 25 MB Buffer per round would be garbage
    // whose collection lands in the restore timed next.
    const warmUp = Buffer.allocUnsafeSlow(entry.bytes);
    const tiers: Array<{ name: string; restoreRow: RowId; tier: CacheTier; context: Context; sequence: number; cache: PromptCache; before?: () => unknown }> = [
      { name: 'Resident', restoreRow: 'residentRestoreMs', tier: 'resident', context: shared, sequence: 1, cache: residentCache },
      { name: 'Ram', restoreRow: 'ramRestoreMs', tier: 'ram', context: single, sequence: 0, cache: ramCache },
      { name: 'Disk', restoreRow: 'diskRestoreMs', tier: 'disk', context: single, sequence: 0, cache: diskCache, before: () => readInto(entry.path!, warmUp) },
      { name: 'DiskEvicted', restoreRow: 'diskEvictedRestoreMs', tier: 'disk', context: single, sequence: 0, cache: diskCache, before: () => checkEvicted(evictor, entry.path!) },
    ];
    // The suffix alone, in a tier's own context and sequence: the prefix in place (the previous
    // run's, or a copy of the template), nothing after it; then the suffix and the first sample.
    const suffixAlone = async (context: Context, sequence: number): Promise<number> => {
      await context.exclusive(() => {
        if (context === single) context.memory.remove(sequence, P);
        else {
          context.memory.remove(sequence);
          context.memory.copy(0, sequence, 0, P);
        }
      });
      const start = performance.now();
      await context.decode(suffix, { sequence, start: P });
      sampler.sample(context);
      return performance.now() - start;
    };
    await withStatus(`[${type}] Warm rounds (${config.repetitions})`, async () => {
      for (let round = 0; round < config.repetitions; round++) {
        signal.throwIfAborted();
        for (const t of tiers) {
          // Each warm run is paired with the suffix alone timed just before it in the same context:
          // their ratio is the overhead of the warm path, and a pair shares the machine's mood.
          const alone = await suffixAlone(t.context, t.sequence);
          if (t.context === single) series.add('suffixPrefillMs', alone);
          await t.context.exclusive(() => t.context.memory.remove(t.sequence));
          await t.before?.();
          const result = await generate(t.context, { prompt: full, sequence: t.sequence, cache: t.cache, maxTokens: 1 }).result;
          checkHit(result, t.tier, P);
          series.add(`warm${t.name}TtftMs`, result.ttftMs);
          series.add(`${t.restoreRow}InGenerate`, result.restoreMs);
          series.add(`warm${t.name}OverheadRatio`, result.ttftMs / (result.restoreMs + alone));
        }
        await shared.exclusive(() => shared.memory.remove(1));

        if (nlc) {
          series.add('nlcSuffixPrefillMs', await nlc.suffixPrefill(P, suffix));
          series.add('nlcWarmTtftMs', await nlc.warmTtft(prefix, suffix));
        }
      }
    });
    sampler.dispose();

    // Restore rounds: the same cache.restore() that generate() calls, and node-llama-cpp's load.
    await withStatus(`[${type}] Restore rounds (${config.restoreRepetitions})`, async () => {
      for (let round = 0; round < config.restoreRepetitions; round++) {
        signal.throwIfAborted();
        for (const t of tiers) {
          await t.context.exclusive(() => t.context.memory.remove(t.sequence));
          await t.before?.();
          const restored = await t.cache.restore(t.context, full, { sequence: t.sequence, maxTokens: full.length - 1 });
          if (restored.tier !== t.tier || restored.cachedTokens !== P) throw new Error(`expected a ${t.tier} restore of ${P} tokens, got ${restored.tier ?? 'a miss'}`);
          series.add(t.restoreRow, restored.restoreMs);
        }
        if (nlc) {
          await checkEvicted(evictor, nlcStateFile);
          series.add('nlcLoadStateEvictedMs', await nlc.load(nlcStateFile));
          // The disk tier's warm-up, so both warm loads start from the same state of the CPU caches.
          readInto(nlcStateFile, warmUp);
          series.add('nlcLoadStateMs', await nlc.load(nlcStateFile));
        }
      }
      await shared.exclusive(() => shared.memory.remove(1));
    });
    const sampled: Record<string, Samples> = {};
    const medians = [
      'suffixPrefillMs',
      'warmResidentOverheadRatio',
      'warmRamOverheadRatio',
      'warmDiskOverheadRatio',
      'warmDiskEvictedOverheadRatio',
      'warmResidentTtftMs',
      'warmRamTtftMs',
      'warmDiskTtftMs',
      'warmDiskEvictedTtftMs',
      'residentRestoreMs',
      'ramRestoreMs',
      'diskRestoreMs',
      'diskEvictedRestoreMs',
      ...(nlc ? (['nlcLoadStateEvictedMs', 'nlcLoadStateMs', 'nlcSuffixPrefillMs', 'nlcWarmTtftMs'] as const) : []),
    ] as const;
    for (const id of medians) {
      sampled[id] = series.get(id);
      rows[id] = sampled[id].median;
    }
    // The restore times inside the warm runs' generate() calls, for reference.
    for (const t of tiers) sampled[`${t.restoreRow}InGenerate`] = series.get(`${t.restoreRow}InGenerate`);
    rows.suffixPrefillTokensPerSecond = suffix.length / (rows.suffixPrefillMs! / 1000);
    if (nlc) rows.nlcSuffixPrefillTokensPerSecond = suffix.length / (rows.nlcSuffixPrefillMs! / 1000);

    const read = measurePageCacheRead(entry.path, config.readRepetitions);
    rows.pageCacheReadMs = read.readMs;
    rows.pageCacheReadMBps = read.megabytesPerSecond;

    // Free node-llama-cpp's compute buffers and threads before the sessions.
    await nlc?.dispose();
    nlc = undefined;

    const sessions = await withStatus(`[${type}] ${config.sessions} sessions, concurrent then one after another`, () =>
      measureSessions(shared, prefix, prompt.suffixes.slice(1), residentCache, config.sessionTokens, kvBytesPerToken),
    );
    Object.assign(rows, sessions.rows);

    const request = { modelPath, threads: config.threads, tokens: config.promptSpeedTokens, repetitions: config.promptSpeedRepetitions };
    const builds = await withStatus(`[${type}] Prompt processing, prebuilt binary vs source build (${config.promptSpeedRounds} rounds)`, () =>
      measurePrebuiltVsSource(request, config.promptSpeedRounds, signal),
    );
    rows.prebuiltPromptTokensPerSecond = builds.tokensPerSecond.prebuilt;
    rows.sourcePromptTokensPerSecond = builds.tokensPerSecond.source;
    for (const build of BUILDS) {
      const outcome = builds.details[build];
      if ('unavailable' in outcome) process.stderr.write(`kvstash bench: [${type}] ${build} prompt-processing row left out: ${outcome.unavailable}\n`);
      const measured = builds.samples[build];
      if (measured) sampled[`${build}PromptMs`] = measured;
    }

    const info = single.info;
    const result: TypeResult = {
      type,
      model: { path: modelPath, bytes: fs.statSync(modelPath).size, name: model.info.name },
      context: { flashAttention: info.flashAttention, kvType: info.kvType, ubatchSize: info.ubatchSize, unifiedKv: shared.info.unifiedKv },
      prompt: { prefixTokens: P, suffixTokens: suffix.length },
      rows: roundRows(rows),
      samples: sampled,
      sessions: sessions.details,
      prebuiltVsSource: builds.details,
    };
    return { result, nlcInfo };
  } finally {
    await nlc?.dispose();
    await model.dispose();
  }
}

/** The peer, installed on the first run; unavailable (and why) when npm cannot install it (offline, say). */
async function installPeer(options: BenchOptions): Promise<PeerInstall | { unavailable: string }> {
  try {
    return await ensurePeer({ signal: options.signal, ui: options.ui });
  } catch (err) {
    options.signal.throwIfAborted();
    return { unavailable: `node-llama-cpp could not be installed: ${(err as Error).message}` };
  }
}

/**
 * `sessions` generations, each in its own sequence of `context` with its own suffix after the
 * template held by sequence 0: all at once (continuous batching), then one after another.
 *
 * KV memory is measured, not assumed: llama.cpp writes each used cell once in a whole-context state
 * and once per sequence holding it in a sequence state (llama-kv-cache.cpp, state_write_meta:
 * position and seq-id count, 8 bytes, then 4 bytes per seq id, then the K and V rows). From the
 * sizes before and after, the cells in use follow, whether the template cells are shared or not.
 */
async function measureSessions(
  context: Context,
  prefix: Int32Array,
  suffixes: Int32Array[],
  cache: PromptCache,
  maxTokens: number,
  kvBytesPerToken: number,
): Promise<{ rows: Partial<Rows>; details: TypeResult['sessions'] }> {
  const P = prefix.length;
  const sequences = suffixes.map((_, i) => i + 1);
  const clearSessions = () => context.exclusive(() => sequences.forEach((s) => context.memory.remove(s)));
  const run = (i: number) => generate(context, { prompt: concat(prefix, suffixes[i]!), sequence: sequences[i]!, cache, maxTokens }).result;

  await clearSessions();
  const templateState = context.stateSize();
  const templateSequenceState = context.stateSize({ sequence: 0 });
  let start = performance.now();
  const concurrent = await Promise.all(suffixes.map((_, i) => run(i)));
  const concurrentMs = performance.now() - start;

  const held = await context.exclusive(() => [0, ...sequences].map((s) => context.memory.range(s).max + 1));
  const seqIdEntries = held.reduce((a, b) => a + b, 0);
  const firstSession = context.stateSize({ sequence: 1 });
  const bytesPerCellInSequenceState = (firstSession - templateSequenceState) / (held[1]! - P);
  const kvBytesPerCell = bytesPerCellInSequenceState - 12; // minus position, seq-id count, one seq id
  const cells = P + (context.stateSize() - templateState - 4 * (seqIdEntries - P)) / (kvBytesPerCell + 8);
  const ownTokens = held.slice(1).reduce((a, n) => a + (n - P), 0);

  // The most batching can gain while generating, on this machine: one decode step of a token for
  // every session (each at the end of its sequence) against a step of one token for one session.
  // A step of one token streams all the weights for little arithmetic; with more tokens per step
  // the arithmetic grows until the cores, not memory, set the pace.
  const token = suffixes[0]![0]!;
  const stepMs = async (count: number): Promise<number> => {
    const times: number[] = [];
    for (let repetition = 0; repetition < 5; repetition++) {
      const start = performance.now();
      await context.decode(new Int32Array(count).fill(token), { sequence: sequences.slice(0, count), positions: held.slice(1, 1 + count), logits: 'all' });
      times.push(performance.now() - start);
      await context.exclusive(() => sequences.slice(0, count).forEach((s, i) => context.memory.remove(s, held[1 + i]!)));
    }
    return median(times);
  };
  const oneTokenStepMs = await stepMs(1);
  const allSessionsStepMs = await stepMs(sequences.length);

  await clearSessions();
  const sequential: GenerationResult[] = [];
  start = performance.now();
  for (let i = 0; i < suffixes.length; i++) sequential.push(await run(i));
  const sequentialMs = performance.now() - start;
  await clearSessions();

  const generated = (results: GenerationResult[]) => results.reduce((a, r) => a + r.tokens.length, 0);
  return {
    rows: {
      sessionsConcurrentTokensPerSecond: generated(concurrent) / (concurrentMs / 1000),
      sessionsSequentialTokensPerSecond: generated(sequential) / (sequentialMs / 1000),
      sessionsConcurrentMs: concurrentMs,
      sessionsOneTokenStepMs: oneTokenStepMs,
      sessionsAllTokensStepMs: allSessionsStepMs,
      sessionsStepSpeedup: (sequences.length * oneTokenStepMs) / allSessionsStepMs,
      sessionsSequentialMs: sequentialMs,
      sessionsGeneratedTokens: generated(concurrent),
      sessionsKvCells: Math.round(cells),
      sessionsKvBytes: Math.round(cells) * kvBytesPerToken,
      sessionsTemplatePlusOwnBytes: (P + ownTokens) * kvBytesPerToken,
      sessionsSeparateCopiesBytes: (held.slice(1).reduce((a, b) => a + b, 0)) * kvBytesPerToken,
    },
    details: {
      tiers: concurrent.map((r) => r.tier),
      evaluatedTokens: concurrent.map((r) => r.evaluatedTokens),
      sameTokensAsSequential: concurrent.every((r, i) => sameTokens(r.tokens, sequential[i]!.tokens)),
      sessionsMatchingSequential: concurrent.filter((r, i) => sameTokens(r.tokens, sequential[i]!.tokens)).length,
      kvBytesPerCellMeasured: kvBytesPerCell,
      kvBytesPerCellFromShape: kvBytesPerToken,
    },
  };
}

/** K and V of one token in every layer, f16: 2 × layers × kvHeads × headDim × 2 bytes. */
export function rawKvBytesPerToken(model: Model): number {
  const { layers, kvHeads, heads, embeddingSize } = model.info;
  return 2 * layers * kvHeads * (embeddingSize / heads) * 2;
}

function checkHit(result: GenerationResult, tier: CacheTier, prefixLength: number): void {
  if (result.tier !== tier || result.cachedTokens !== prefixLength) {
    throw new Error(`expected a ${tier} hit of ${prefixLength} tokens, got ${result.tier ?? 'a miss'} with ${result.cachedTokens} tokens`);
  }
}

async function checkEvicted(evictor: RemoteEvictor, file: string): Promise<void> {
  const left = await evictor.evict(file);
  if (left !== null && left > 0) process.stderr.write(`kvstash bench: ${left} bytes of ${file} stayed in the page cache\n`);
}

function roundRows(rows: Rows): Rows {
  return Object.fromEntries(Object.entries(rows).map(([k, v]) => [k, v === null ? null : round3(v)])) as Rows;
}
