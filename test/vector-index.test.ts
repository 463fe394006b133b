// VectorIndex: its top k equals a brute-force f32 scan's (same ids in the same order, same scores),
// on the quantized native path (≥ 512 rows) and the plain path, through add, replace and remove.
import t from 'tap';
import { native } from '../lib/binding.js';
import { VectorIndex, type VectorHit } from '../lib/memory/vector-index.js';

/** mulberry32: a seeded generator, so every run sees the same vectors. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), a | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

function gaussian(next: () => number): number {
  return Math.sqrt(-2 * Math.log(1 - next())) * Math.cos(2 * Math.PI * next());
}

function randomVector(next: () => number, dim: number): Float32Array {
  const v = new Float32Array(dim);
  for (let i = 0; i < dim; i++) v[i] = gaussian(next);
  return v;
}

/** Vectors close to a few centres: many near-equal scores, where quantization error matters. */
function clustered(next: () => number, dim: number, count: number, spread: number): Float32Array[] {
  const centres = [0, 1, 2, 3].map(() => randomVector(next, dim));
  return Array.from({ length: count }, (_, i) => {
    const centre = centres[i % centres.length]!;
    const v = new Float32Array(dim);
    for (let d = 0; d < dim; d++) v[d] = centre[d]! + spread * gaussian(next);
    return v;
  });
}

/** The reference: normalize (double sum of squares, f32 elements), exact dot, sort, cut. */
function unit(v: Float32Array): Float32Array {
  let squares = 0;
  for (let i = 0; i < v.length; i++) squares += v[i]! * v[i]!;
  const norm = Math.sqrt(squares);
  const out = new Float32Array(v.length);
  for (let i = 0; i < v.length; i++) out[i] = v[i]! / norm;
  return out;
}

function bruteForce(rows: Map<number, Float32Array>, query: Float32Array, k: number): VectorHit[] {
  const q = unit(query);
  const hits: VectorHit[] = [];
  for (const [id, vector] of rows) {
    const x = unit(vector);
    let dot = 0;
    for (let i = 0; i < q.length; i++) dot += q[i]! * x[i]!;
    hits.push({ id, score: dot });
  }
  hits.sort((a, b) => b.score - a.score || a.id - b.id);
  return hits.slice(0, k);
}

const nativeScan = typeof (native() as unknown as Record<string, unknown>).vectorScanQ8 === 'function';

t.test('the native Q8_0 scan is in this build of the addon', async (t) => {
  t.ok(nativeScan, 'vectorScanQ8 and vectorQuantizeQ8 are exported');
});

for (const [count, dim, spread] of [
  [200, 48, 1],
  [3000, 384, 0.15],
  [3000, 100, 0.05],
] as const) {
  t.test(`${count} × ${dim}-dim clustered (spread ${spread}): top k equals the brute-force scan`, async (t) => {
    const next = rng(count * 31 + dim);
    const vectors = clustered(next, dim, count, spread);
    const rows = new Map<number, Float32Array>();
    const index = new VectorIndex(dim);
    // ids are not row numbers: sparse and out of order, as database row ids may be.
    const ids = vectors.map((_, i) => 1000 + ((i * 7919) % 100003));
    index.addMany(ids.slice(0, count / 2), vectors.slice(0, count / 2));
    for (let i = count / 2; i < count; i++) index.add(ids[i]!, vectors[i]!);
    ids.forEach((id, i) => rows.set(id, vectors[i]!));
    t.equal(index.size, count);

    const queries = [...clustered(next, dim, 6, spread), randomVector(next, dim), vectors[17]!];
    for (const k of [1, 10, 50]) {
      for (const [qi, query] of queries.entries()) {
        t.strictSame(index.search(query, k), bruteForce(rows, query, k), `query ${qi}, k ${k}`);
      }
    }

    // Remove a third (quantized rows now), replace some, add new ones: still exact.
    for (let i = 0; i < count; i += 3) {
      index.remove(ids[i]!);
      rows.delete(ids[i]!);
    }
    for (let i = 1; i < count; i += 10) {
      const replacement = randomVector(next, dim);
      index.add(ids[i]!, replacement);
      rows.set(ids[i]!, replacement);
    }
    for (let i = 0; i < 50; i++) {
      const v = clustered(next, dim, 1, spread)[0]!;
      index.add(500000 + i, v);
      rows.set(500000 + i, v);
    }
    t.equal(index.size, rows.size);
    for (const [qi, query] of queries.entries()) {
      t.strictSame(index.search(query, 10), bruteForce(rows, query, 10), `after remove/replace: query ${qi}`);
    }
    // A replaced vector is found as itself (score 1), the removed one is gone.
    const replaced = rows.get(ids[11]!)!;
    const [best] = index.search(replaced, 1);
    t.equal(best!.id, ids[11]);
    t.ok(Math.abs(best!.score - 1) < 1e-6, `self-similarity ${best!.score}`);
    t.notOk(index.search(vectors[0]!, count).some((hit) => hit.id === ids[0]), 'a removed id is never returned');
  });
}

t.test('equal scores come back by ascending id, on both paths', async (t) => {
  for (const filler of [0, 1000]) {
    const next = rng(5 + filler);
    const dim = 64;
    const index = new VectorIndex(dim);
    for (let i = 0; i < filler; i++) index.add(10000 + i, randomVector(next, dim));
    const shared = randomVector(next, dim);
    // The same direction at lengths 2^j apart (exact in f32): identical unit vectors and scores.
    for (const [j, id] of [42, 7, 99, 3].entries()) index.add(id, shared.map((x) => x * 2 ** j));
    const hits = index.search(shared, 4);
    t.strictSame(hits.map((h) => h.id), [3, 7, 42, 99], `with ${filler} other rows`);
    t.equal(new Set(hits.map((h) => h.score)).size, 1, 'one score for all four');
  }
});

t.test('k beyond the size, k = 0, an empty index, and remove of an absent id', async (t) => {
  const index = new VectorIndex(3);
  t.strictSame(index.search(new Float32Array([1, 0, 0]), 5), []);
  index.add(1, new Float32Array([1, 0, 0]));
  index.add(2, new Float32Array([0, 1, 0]));
  index.add(3, new Float32Array([-1, 0, 0]));
  t.strictSame(index.search(new Float32Array([2, 0, 0]), 10), [
    { id: 1, score: 1 },
    { id: 2, score: 0 },
    { id: 3, score: -1 },
  ]);
  t.strictSame(index.search(new Float32Array([1, 0, 0]), 0), []);
  index.remove(77);
  index.remove(2);
  t.equal(index.size, 2);
  t.strictSame(index.search(new Float32Array([0, 1, 0]), 10).map((h) => h.id), [1, 3]);
});

t.test('bad input is refused before anything changes', async (t) => {
  t.throws(() => new VectorIndex(0), RangeError);
  t.throws(() => new VectorIndex(1.5), TypeError);
  const index = new VectorIndex(4);
  const ok = new Float32Array([1, 2, 3, 4]);
  t.throws(() => index.add(1, new Float32Array(3)), { name: 'RangeError', message: /3 elements; this index holds 4-dimensional/ });
  t.throws(() => index.add(1, new Float32Array(4)), { name: 'RangeError', message: /all zeros/ });
  t.throws(() => index.add(1, new Float32Array([1, NaN, 0, 0])), { name: 'RangeError', message: /vector\[1\] is NaN/ });
  t.throws(() => index.add(1, new Float32Array([1, Infinity, 0, 0])), RangeError);
  t.throws(() => index.add(1, [1, 2, 3, 4] as unknown as Float32Array), TypeError);
  t.throws(() => index.add(1.5, ok), TypeError);
  t.throws(() => index.add(2 ** 53, ok), TypeError);
  t.throws(() => index.addMany([1, 2], [ok]), RangeError);
  t.throws(() => index.addMany([1, 2], [ok, new Float32Array(4)]), { message: /vectors\[1\] is all zeros/ });
  t.equal(index.size, 0, 'a refused addMany added nothing');
  index.add(1, ok);
  t.throws(() => index.search(ok, -1), RangeError);
  t.throws(() => index.search(ok, 1.5), TypeError);
  t.throws(() => index.search(new Float32Array(5), 1), RangeError);
  t.throws(() => index.remove('1' as unknown as number), TypeError);
  t.equal(index.size, 1);
});
