/**
 * The memory benchmark (`kvstash bench --memory`): Memory.search p50/p95 at 1k, 10k and 100k
 * archived turns for keyword, vector (the native index, and a brute-force JavaScript scan of the
 * same vectors) and hybrid, plus the archive rate in batches, against the targets.
 *
 * Turns are synthetic sentences drawn (seeded) from a 5,000-word vocabulary with a Zipf-like skew,
 * as conversations repeat common words; vectors are seeded random unit vectors of 384 dimensions
 * (a small sentence-embedding model's size), produced by a deterministic embed function whose own
 * cost is a hash and a fill, so the numbers are Memory's: SQLite, FTS5, the index, row reads. A
 * real model's embedding time adds to add() and to vector/hybrid search by whatever that model
 * takes for one short text.
 *
 * Then a turn's time to first token with memory and without, on the same conversation and model
 * (the bench's synthetic qwen2-0.5b; the tiny model with --quick): one session without memory, one
 * with the filled memory (hybrid recall over its archived turns), both restoring the system prefix
 * from one prompt cache. A turn's TTFT is measured as its caller sees it, from send() to the first
 * text chunk; with memory, the retrieval step (Memory.search with the query's embedding, the budget,
 * the journaled recall record) is timed on its own, and what remains of the difference is the
 * prefill the injected message brings (it, and the window after it, evaluated again).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { PromptCache } from '../cache/prompt-cache.js';
import { loadModel } from '../llama/model.js';
import { BruteForceIndex, normalizeInPlace } from '../memory/brute-force.js';
import { Memory, type MemorySearchMode } from '../memory/memory.js';
import { VectorIndex } from '../memory/vector-index.js';
import { Session } from '../session/session.js';
import { percentile } from './server.js';

export interface MemoryBenchConfig {
  /** Archived-turn counts at which searches are measured, ascending. */
  sizes: number[];
  /** Searches per mode and size. */
  queries: number;
  /** Turns per addMany() call when filling. */
  batch: number;
  dim: number;
}

export const MEMORY_FULL_CONFIG: MemoryBenchConfig = { sizes: [1_000, 10_000, 100_000], queries: 200, batch: 200, dim: 384 };
export const MEMORY_QUICK_CONFIG: MemoryBenchConfig = { sizes: [1_000, 10_000], queries: 50, batch: 200, dim: 384 };

export const MEMORY_TARGETS = { hybridP95Ms: 15, hybridAtRows: 100_000, insertTurnsPerSecond: 2_000, retrievalShareOfTtft: 0.05 } as const;

/** The conversation whose turns' TTFT is measured with memory and without. */
export interface MemoryTtftConfig {
  /** Turns sent; the first is not measured (it only fills the window). */
  turns: number;
  contextSize: number;
  /** Compute threads. */
  threads: number;
  /** Words of the system prompt (restored from the prompt cache on every turn). */
  systemWords: number;
  maxTokens: number;
}

export const MEMORY_TTFT_CONFIG: MemoryTtftConfig = { turns: 9, contextSize: 2048, threads: 2, systemWords: 300, maxTokens: 2 };

export interface MemoryTtftReport {
  model: string;
  config: MemoryTtftConfig;
  /** Archived turns in the memory the session retrieves from. */
  archivedTurns: number;
  /** Medians over the measured turns. Unit: ms. */
  ttftWithoutMemoryMs: number;
  ttftWithMemoryMs: number;
  /** The retrieval step alone: Memory.search (embedding the query), the budget, the recall record. */
  retrievalMs: number;
  /** Of retrievalMs, the memory's reads: Memory.search and the summary lookup. The rest is sizing
   * the candidates against the budget and journaling the recall message (an fsync). */
  searchMs: number;
  /** What else the memory turn took: the prefill of the injected message and the window after it. */
  injectedPrefillMs: number;
  /** Tokens of the retrieved texts the injected message carries (median). */
  injectedTokens: number;
  /** ttftWithMemoryMs / ttftWithoutMemoryMs. */
  ratio: number;
  /** retrievalMs / ttftWithoutMemoryMs: what retrieval adds to a turn's TTFT, the target. */
  retrievalShare: number;
  /** Per measured turn: [without, with, retrieval, search] in ms. */
  perTurn: Array<[number, number, number, number]>;
}

export interface LatencyRow {
  p50: number;
  p95: number;
}

export interface MemoryBenchSize {
  rows: number;
  keyword: LatencyRow;
  /** Memory.search mode 'vector': embed the query, the native index, read the rows. */
  vector: LatencyRow;
  /** The index alone: VectorIndex.search over the same vectors (native Q8_0 scan + f32 re-score). */
  vectorIndexOnly: LatencyRow;
  /** The brute-force JavaScript f32 scan (BruteForceIndex) over the same vectors. */
  vectorBruteForce: LatencyRow;
  hybrid: LatencyRow;
  /** Archived turns per second while filling up to this size (addMany in batches). */
  insertTurnsPerSecond: number;
  databaseBytes: number;
}

export interface MemoryBenchReport {
  startedAt: string;
  config: MemoryBenchConfig;
  machine: { cpus: number; cpuModel: string; node: string };
  sizes: MemoryBenchSize[];
  /** A turn's TTFT with memory vs without (absent when no model was given). */
  ttft?: MemoryTtftReport;
  targets: Array<{ name: string; target: string; measured: string; met: boolean }>;
}

/** mulberry32: a small seeded generator, so every run archives the same turns. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const VOCABULARY = Array.from({ length: 5_000 }, (_, i) => `w${i.toString(36)}`);

function sentence(random: () => number, words: number): string {
  const out: string[] = [];
  // Squaring skews toward the first words of the vocabulary, as real text repeats common words.
  for (let i = 0; i < words; i++) out.push(VOCABULARY[Math.floor(random() ** 2 * VOCABULARY.length)]!);
  return out.join(' ');
}

function hashText(text: string): number {
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) hash = Math.imul(hash ^ text.charCodeAt(i), 0x01000193) >>> 0;
  return hash;
}

/** A deterministic stand-in for an embedding model: a seeded random unit vector per text. */
function syntheticEmbed(dim: number): (texts: string[]) => Promise<Float32Array[]> {
  return async (texts) =>
    texts.map((text) => {
      const random = rng(hashText(text));
      const vector = new Float32Array(dim);
      for (let i = 0; i < dim; i++) vector[i] = random() - 0.5;
      return normalizeInPlace(vector);
    });
}

function latency(values: number[]): LatencyRow {
  return { p50: round2(percentile(values, 50)), p95: round2(percentile(values, 95)) };
}

function round2(value: number): number {
  return Math.round(value * 100) / 100;
}

async function timeEach(queries: readonly string[], run: (query: string) => unknown): Promise<number[]> {
  const times: number[] = [];
  for (const query of queries) {
    const start = performance.now();
    await run(query);
    times.push(performance.now() - start);
  }
  return times;
}

export async function runMemoryBench(
  config: MemoryBenchConfig,
  options: { log?: (line: string) => void; signal?: AbortSignal; ttft?: { modelPath: string; config: MemoryTtftConfig } } = {},
): Promise<MemoryBenchReport> {
  const log = options.log ?? (() => {});
  const startedAt = new Date().toISOString();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvstash-memory-bench-'));
  const file = path.join(dir, 'memory.db');
  const embed = syntheticEmbed(config.dim);
  const memory = await Memory.open({ path: file, embed });
  const random = rng(17);
  const queryRandom = rng(4711);
  const brute = new BruteForceIndex(config.dim);
  const index = new VectorIndex(config.dim);
  const sizes: MemoryBenchSize[] = [];
  let ttft: MemoryTtftReport | undefined;
  let rows = 0;
  try {
    for (const target of config.sizes) {
      let insertMs = 0;
      const added = target - rows;
      while (rows < target) {
        options.signal?.throwIfAborted();
        const count = Math.min(config.batch, target - rows);
        const turns = Array.from({ length: count }, (_, i) => ({
          sessionId: `s${Math.floor((rows + i) / 500)}`,
          role: (rows + i) % 2 === 0 ? 'user' : 'assistant',
          content: sentence(random, 8 + Math.floor(random() * 24)),
          turn: Math.floor(((rows + i) % 500) / 2),
        }));
        const start = performance.now();
        const ids = await memory.addMany(turns);
        insertMs += performance.now() - start;
        const vectors = await embed(turns.map((t) => t.content));
        brute.addMany(ids, vectors);
        index.addMany(ids, vectors);
        rows += count;
      }
      log(`memory bench: ${rows} turns archived (${Math.round((added / insertMs) * 1000)} turns/s)`);
      // Queries: 4 to 8 words of the same distribution, so keyword search has matches to rank.
      const queries = Array.from({ length: config.queries }, () => sentence(queryRandom, 4 + Math.floor(queryRandom() * 5)));
      const queryVectors = await embed(queries);
      const search = (mode: MemorySearchMode) => timeEach(queries, (q) => memory.search(q, { mode, limit: 10 }));
      await search('hybrid'); // warm: the index catches up, statements are prepared, pages are read
      const keyword = await search('keyword');
      const vector = await search('vector');
      const hybrid = await search('hybrid');
      let at = 0;
      const indexOnly = await timeEach(queries, () => index.search(queryVectors[at++ % queries.length]!, 40));
      at = 0;
      const bruteForce = await timeEach(queries.slice(0, Math.min(queries.length, 50)), () => brute.search(queryVectors[at++]!, 40));
      const databaseBytes = ['', '-wal'].reduce((sum, suffix) => sum + (fs.existsSync(file + suffix) ? fs.statSync(file + suffix).size : 0), 0);
      const row: MemoryBenchSize = {
        rows,
        keyword: latency(keyword),
        vector: latency(vector),
        vectorIndexOnly: latency(indexOnly),
        vectorBruteForce: latency(bruteForce),
        hybrid: latency(hybrid),
        insertTurnsPerSecond: Math.round((added / insertMs) * 1000),
        databaseBytes,
      };
      sizes.push(row);
      log(`memory bench: ${rows} turns: hybrid p50 ${row.hybrid.p50} ms p95 ${row.hybrid.p95} ms`);
    }
    if (options.ttft) {
      ttft = await measureMemoryTtft(memory, rows, options.ttft.modelPath, options.ttft.config, path.join(dir, 'sessions'), queryRandom, options.signal);
      log(`memory bench: TTFT ${ttft.ttftWithoutMemoryMs} ms without memory, ${ttft.ttftWithMemoryMs} ms with (retrieval ${ttft.retrievalMs} ms)`);
    }
  } finally {
    await memory.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const targets: MemoryBenchReport['targets'] = [];
  const atTarget = sizes.find((s) => s.rows === MEMORY_TARGETS.hybridAtRows);
  if (atTarget) {
    targets.push({
      name: `hybrid search p95 at ${MEMORY_TARGETS.hybridAtRows.toLocaleString('en-US')} turns`,
      target: `<= ${MEMORY_TARGETS.hybridP95Ms} ms`,
      measured: `${atTarget.hybrid.p95} ms`,
      met: atTarget.hybrid.p95 <= MEMORY_TARGETS.hybridP95Ms,
    });
  }
  const slowestInsert = Math.min(...sizes.map((s) => s.insertTurnsPerSecond));
  targets.push({
    name: `archive rate in batches of ${config.batch} (slowest fill step)`,
    target: `>= ${MEMORY_TARGETS.insertTurnsPerSecond.toLocaleString('en-US')} turns/s`,
    measured: `${slowestInsert.toLocaleString('en-US')} turns/s`,
    met: slowestInsert >= MEMORY_TARGETS.insertTurnsPerSecond,
  });
  if (ttft) {
    targets.push({
      name: "retrieval's share of a turn's TTFT (not counting the injected text's prefill)",
      target: `<= ${MEMORY_TARGETS.retrievalShareOfTtft * 100} %`,
      measured: `${round2(ttft.retrievalShare * 100)} % (${ttft.retrievalMs} of ${ttft.ttftWithoutMemoryMs} ms)`,
      met: ttft.retrievalShare <= MEMORY_TARGETS.retrievalShareOfTtft,
    });
  }
  return {
    startedAt,
    config,
    machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? 'unknown', node: process.version },
    sizes,
    ...(ttft ? { ttft } : {}),
    targets,
  };
}

/**
 * The same conversation twice on one model, without memory and with `memory` (already holding
 * `archivedTurns` turns of other sessions), each turn's TTFT taken from send() to its first chunk.
 * The user messages are drawn from the archive's vocabulary, so hybrid retrieval finds turns to
 * inject. With memory, the session's retrieval step is timed by wrapping it: the benchmark's view
 * into the session, not an API.
 */
async function measureMemoryTtft(
  memory: Memory,
  archivedTurns: number,
  modelPath: string,
  config: MemoryTtftConfig,
  sessionsDir: string,
  random: () => number,
  signal: AbortSignal | undefined,
): Promise<MemoryTtftReport> {
  const model = await loadModel(modelPath);
  try {
    const system = `You are a helpful assistant that remembers. ${sentence(random, config.systemWords)}`;
    const messages = Array.from({ length: config.turns }, () => sentence(random, 12 + Math.floor(random() * 12)));
    const cache = new PromptCache({ dir: null });
    // The memory's reads during a turn, timed on this instance (own properties shadowing the
    // prototype's methods, removed again below).
    let search = 0;
    const timedMemory = memory as unknown as Record<'search' | 'summary', (...args: unknown[]) => Promise<unknown>>;
    for (const name of ['search', 'summary'] as const) {
      const original = Memory.prototype[name] as (...args: unknown[]) => Promise<unknown>;
      timedMemory[name] = async (...args) => {
        const started = performance.now();
        try {
          return await original.apply(memory, args);
        } finally {
          search += performance.now() - started;
        }
      };
    }
    const run = async (id: string, withMemory: boolean): Promise<Array<{ ttft: number; retrieval: number; search: number; injected: number }>> => {
      const context = await model.createContext({ contextSize: config.contextSize, threads: config.threads });
      try {
        const session = await Session.open({
          dir: sessionsDir,
          id,
          context,
          system,
          cache,
          checkpoint: { everyTurns: 0, everySeconds: 0 },
          ...(withMemory ? { memory: { memory, recall: { mode: 'hybrid' } } } : {}),
        });
        let retrieval = 0;
        const timed = session as unknown as { recall(text: string): Promise<unknown> };
        const recall = timed.recall.bind(session);
        timed.recall = async (text) => {
          const started = performance.now();
          try {
            return await recall(text);
          } finally {
            retrieval = performance.now() - started;
          }
        };
        const turns: Array<{ ttft: number; retrieval: number; search: number; injected: number }> = [];
        for (const text of messages) {
          signal?.throwIfAborted();
          retrieval = 0;
          search = 0;
          const started = performance.now();
          const reply = session.send(text, { maxTokens: config.maxTokens });
          let ttft = 0;
          for await (const chunk of reply) if (!ttft && chunk) ttft = performance.now() - started;
          const result = await reply.result;
          const searched = search;
          // A reply whose first token decodes to no text: the backend's own TTFT plus the retrieval.
          if (!ttft) ttft = result.ttftMs + retrieval;
          const injected = result.retrieved.length === 0 ? 0 : model.tokenize(result.retrieved.map((r) => r.content).join('\n'), { addSpecial: false }).length;
          turns.push({ ttft, retrieval, search: searched, injected });
        }
        await session.close();
        return turns.slice(1);
      } finally {
        await context.dispose();
      }
    };
    await run('ttft-warm', false); // the system prefix enters the prompt cache; pages and threads warm up
    const without = await run('ttft-without', false);
    const withMemory = await run('ttft-with', true).finally(() => {
      delete (timedMemory as Partial<typeof timedMemory>).search;
      delete (timedMemory as Partial<typeof timedMemory>).summary;
    });
    const median = (values: number[]): number => round2(percentile(values, 50));
    const ttftWithoutMemoryMs = median(without.map((t) => t.ttft));
    const ttftWithMemoryMs = median(withMemory.map((t) => t.ttft));
    const retrievalMs = median(withMemory.map((t) => t.retrieval));
    return {
      model: path.basename(modelPath),
      config,
      archivedTurns,
      ttftWithoutMemoryMs,
      ttftWithMemoryMs,
      retrievalMs,
      searchMs: median(withMemory.map((t) => t.search)),
      injectedPrefillMs: round2(ttftWithMemoryMs - retrievalMs - ttftWithoutMemoryMs),
      injectedTokens: median(withMemory.map((t) => t.injected)),
      ratio: round2(ttftWithMemoryMs / ttftWithoutMemoryMs),
      retrievalShare: retrievalMs / ttftWithoutMemoryMs,
      perTurn: without.map((t, i) => [round2(t.ttft), round2(withMemory[i]!.ttft), round2(withMemory[i]!.retrieval), round2(withMemory[i]!.search)]),
    };
  } finally {
    await model.dispose();
  }
}

/** The report as a Markdown table, one row per size and mode, then the targets. */
export function formatMemoryReport(report: MemoryBenchReport): string {
  const lines = [
    `kvstash bench --memory: ${report.config.dim}-dim vectors, ${report.config.queries} queries per mode, limit 10, ${report.machine.cpus} x ${report.machine.cpuModel}, Node ${report.machine.node}`,
    '',
    '| turns | keyword p50 / p95 | vector (Memory.search) p50 / p95 | vector index only | vector brute force (JS) | hybrid p50 / p95 | archive rate | file |',
    '|---:|---:|---:|---:|---:|---:|---:|---:|',
  ];
  const pair = (l: LatencyRow): string => `${l.p50} / ${l.p95} ms`;
  for (const s of report.sizes) {
    lines.push(
      `| ${s.rows.toLocaleString('en-US')} | ${pair(s.keyword)} | ${pair(s.vector)} | ${pair(s.vectorIndexOnly)} | ${pair(s.vectorBruteForce)} | ${pair(s.hybrid)} | ${s.insertTurnsPerSecond.toLocaleString('en-US')} turns/s | ${(s.databaseBytes / 1048576).toFixed(1)} MiB |`,
    );
  }
  const t = report.ttft;
  if (t) {
    lines.push(
      '',
      `A turn's TTFT with memory vs without (${t.model}, ${t.config.contextSize}-token context, ${t.config.systemWords}-word system prompt from the prompt cache, median of ${t.perTurn.length} turns, hybrid recall over ${t.archivedTurns.toLocaleString('en-US')} archived turns):`,
      '',
      '| without memory | with memory | ratio | retrieval (of it: search) | injected message prefill | retrieved tokens | retrieval / TTFT without |',
      '|---:|---:|---:|---:|---:|---:|---:|',
      `| ${t.ttftWithoutMemoryMs} ms | ${t.ttftWithMemoryMs} ms | ${t.ratio} x | ${t.retrievalMs} ms (${t.searchMs} ms) | ${t.injectedPrefillMs} ms | ${t.injectedTokens} | ${round2(t.retrievalShare * 100)} % |`,
    );
  }
  lines.push('');
  for (const t of report.targets) lines.push(`${t.met ? 'met' : 'MISSED'}: ${t.name}: ${t.measured} (target ${t.target})`);
  return lines.join('\n');
}
