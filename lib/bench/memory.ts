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
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { BruteForceIndex, normalizeInPlace } from '../memory/brute-force.js';
import { Memory, type MemorySearchMode } from '../memory/memory.js';
import { VectorIndex } from '../memory/vector-index.js';
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

export const MEMORY_TARGETS = { hybridP95Ms: 15, hybridAtRows: 100_000, insertTurnsPerSecond: 2_000 } as const;

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

export async function runMemoryBench(config: MemoryBenchConfig, options: { log?: (line: string) => void; signal?: AbortSignal } = {}): Promise<MemoryBenchReport> {
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
  return {
    startedAt,
    config,
    machine: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model ?? 'unknown', node: process.version },
    sizes,
    targets,
  };
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
  lines.push('');
  for (const t of report.targets) lines.push(`${t.met ? 'met' : 'MISSED'}: ${t.name}: ${t.measured} (target ${t.target})`);
  return lines.join('\n');
}
