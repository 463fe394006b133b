#!/usr/bin/env node
// VectorIndex search latency (lib/memory/vector-index.ts) against a plain JS f32 scan of the same
// rows, at 1k, 10k and 100k rows of 384 dimensions: the vector half of Memory's hybrid search
// (issue 17's target: hybrid p95 <= 15 ms at 100k). Both answer the same exact top k; the script
// checks that on every query before it reports a number.
//
//   node scripts/vector-index-bench.js [rows ...]     default: 1000 10000 100000
//   env DIM (384), K (10), QUERIES (200), DATA (random | clustered, default both)
//
// Needs the TypeScript build (npm run build:ts) and the native addon.
'use strict';

const path = require('node:path');
const { performance } = require('node:perf_hooks');
const { VectorIndex } = require(path.join(__dirname, '..', 'dist', 'memory', 'vector-index.js'));

const DIM = Number(process.env.DIM ?? 384);
const K = Number(process.env.K ?? 10);
const QUERIES = Number(process.env.QUERIES ?? 200);
const sizes = process.argv.slice(2).map(Number);
const datasets = process.env.DATA ? [process.env.DATA] : ['random', 'clustered'];

function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), a | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}
const gaussian = (next) => Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next());

/** 'random': independent directions. 'clustered': 50 topics, rows spread around them, so a query's
 * neighbours have cosine 0.5-0.8 as with sentence embeddings, and many near-ties. */
function makeVector(next, kind, centres) {
  const v = new Float32Array(DIM);
  const centre = kind === 'clustered' ? centres[Math.floor(next() * centres.length)] : null;
  for (let i = 0; i < DIM; i++) v[i] = (centre ? centre[i] : 0) + (centre ? 0.8 : 1) * gaussian(next);
  return v;
}

function unit(v) {
  let s = 0;
  for (let i = 0; i < v.length; i++) s += v[i] * v[i];
  const n = Math.sqrt(s);
  const out = new Float32Array(v.length);
  for (let i = 0; i < v.length; i++) out[i] = v[i] / n;
  return out;
}

/** The plain JS scan: one contiguous Float32Array of unit rows, an exact dot per row, a sort of the k best. */
function plainScan(rows, count, query, k) {
  const q = unit(query);
  const best = [];
  let floor = -Infinity;
  for (let r = 0; r < count; r++) {
    let dot = 0;
    const base = r * DIM;
    for (let i = 0; i < DIM; i++) dot += q[i] * rows[base + i];
    if (best.length < k || dot > floor) {
      best.push({ id: r, score: dot });
      if (best.length > k) {
        best.sort((a, b) => b.score - a.score || a.id - b.id);
        best.length = k;
        floor = best[k - 1].score;
      }
    }
  }
  return best.sort((a, b) => b.score - a.score || a.id - b.id);
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

/** Wall time and this process's CPU time (user + system) of one call, ms. On a loaded machine the
 * wall time's tail is the scheduler's; the CPU time is the work itself. */
function time(fn) {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  const result = fn();
  const wall = performance.now() - t0;
  const cpu = process.cpuUsage(c0);
  return [wall, result, (cpu.user + cpu.system) / 1000];
}

console.log(`VectorIndex vs a plain JS scan: ${DIM} dims, k ${K}, ${QUERIES} queries per row (Node ${process.version}, ${process.arch})`);
console.log(`load average ${require('node:os').loadavg().map((x) => x.toFixed(1)).join(' ')} on ${require('node:os').availableParallelism()} cores`);
console.log('| rows | data | VectorIndex p50 | p95 | CPU p50 | CPU p95 | plain JS scan p50 | p95 | CPU p50 | CPU p95 | add, rows/s |');
console.log('|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
for (const kind of datasets) {
  for (const count of sizes.length ? sizes : [1000, 10000, 100000]) {
    const next = rng(count + DIM + (kind === 'clustered' ? 7 : 0));
    const centres = Array.from({ length: 50 }, () => makeVector(next, 'random'));
    // Rows are generated a batch at a time and not kept (as Memory adds them from the database):
    // a hundred thousand live little arrays would make the collector, not the scan, the measure.
    const index = new VectorIndex(DIM);
    const rows = new Float32Array(count * DIM);
    let addMs = 0;
    for (let start = 0; start < count; start += 1000) {
      const batch = Array.from({ length: Math.min(1000, count - start) }, () => makeVector(next, kind, centres));
      const [ms] = time(() => index.addMany(batch.map((_, i) => start + i), batch));
      addMs += ms;
      batch.forEach((v, i) => rows.set(unit(v), (start + i) * DIM));
    }
    const queries = Array.from({ length: QUERIES }, () => makeVector(next, kind, centres));
    index.search(queries[0], K); // quantizes the rows (once, on the first search)
    const indexMs = [];
    const plainMs = [];
    const indexCpu = [];
    const plainCpu = [];
    for (const query of queries) {
      const [a, got, aCpu] = time(() => index.search(query, K));
      const [b, want, bCpu] = time(() => plainScan(rows, count, query, K));
      indexMs.push(a);
      plainMs.push(b);
      indexCpu.push(aCpu);
      plainCpu.push(bCpu);
      if (got.length !== want.length || got.some((hit, i) => hit.id !== want[i].id || Math.abs(hit.score - want[i].score) > 1e-9)) {
        throw new Error(`VectorIndex and the plain scan disagree at ${count} rows: ${JSON.stringify(got)} vs ${JSON.stringify(want)}`);
      }
    }
    const f = (list, p) => `${percentile(list.sort((x, y) => x - y), p).toFixed(2)} ms`;
    console.log(
      `| ${count} | ${kind} | ${f(indexMs, 50)} | ${f(indexMs, 95)} | ${f(indexCpu, 50)} | ${f(indexCpu, 95)} | ` +
        `${f(plainMs, 50)} | ${f(plainMs, 95)} | ${f(plainCpu, 50)} | ${f(plainCpu, 95)} | ${Math.round(count / (addMs / 1000))} |`,
    );
  }
}
