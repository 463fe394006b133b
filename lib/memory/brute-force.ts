/**
 * The exact vector scan in plain JavaScript: rows packed in one growing Float32Array, scored by dot
 * product (vectors are unit length, so this is cosine similarity), the best k kept in a small
 * sorted buffer. It is the reference the native index is measured against (the benchmark's
 * "brute force" rows) and the index Memory falls back to when the native one is unavailable.
 */
export interface VectorHit {
  id: number;
  score: number;
}

/** What Memory needs of a vector index; VectorIndex (native SIMD scan) and BruteForceIndex have it. */
export interface VectorSearcher {
  readonly size: number;
  add(id: number, vector: Float32Array): void;
  addMany(ids: readonly number[], vectors: readonly Float32Array[]): void;
  remove(id: number): boolean | void;
  search(query: Float32Array, k: number): VectorHit[];
}

export class BruteForceIndex implements VectorSearcher {
  readonly dim: number;
  private data: Float32Array;
  private ids: number[] = [];
  private slots = new Map<number, number>();

  constructor(dim: number) {
    this.dim = dim;
    this.data = new Float32Array(dim * 1024);
  }

  get size(): number {
    return this.ids.length;
  }

  add(id: number, vector: Float32Array): void {
    if (vector.length !== this.dim) throw new RangeError(`vector has ${vector.length} dimensions, the index ${this.dim}`);
    const existing = this.slots.get(id);
    const slot = existing ?? this.ids.length;
    if (existing === undefined) {
      if ((slot + 1) * this.dim > this.data.length) {
        const grown = new Float32Array(Math.max(this.data.length * 2, (slot + 1) * this.dim));
        grown.set(this.data);
        this.data = grown;
      }
      this.ids.push(id);
      this.slots.set(id, slot);
    }
    this.data.set(vector, slot * this.dim);
  }

  addMany(ids: readonly number[], vectors: readonly Float32Array[]): void {
    for (let i = 0; i < ids.length; i++) this.add(ids[i]!, vectors[i]!);
  }

  remove(id: number): boolean {
    const slot = this.slots.get(id);
    if (slot === undefined) return false;
    const last = this.ids.length - 1;
    if (slot !== last) {
      // Move the last row into the hole so the rows stay packed.
      this.data.copyWithin(slot * this.dim, last * this.dim, (last + 1) * this.dim);
      const movedId = this.ids[last]!;
      this.ids[slot] = movedId;
      this.slots.set(movedId, slot);
    }
    this.ids.pop();
    this.slots.delete(id);
    return true;
  }

  search(query: Float32Array, k: number): VectorHit[] {
    if (query.length !== this.dim) throw new RangeError(`query has ${query.length} dimensions, the index ${this.dim}`);
    const n = this.ids.length;
    const keep = Math.min(k, n);
    if (keep <= 0) return [];
    const topScores = new Float64Array(keep).fill(-Infinity);
    const topSlots = new Int32Array(keep).fill(-1);
    const dim = this.dim;
    const data = this.data;
    for (let slot = 0; slot < n; slot++) {
      let dot = 0;
      const base = slot * dim;
      for (let j = 0; j < dim; j++) dot += data[base + j]! * query[j]!;
      if (dot <= topScores[keep - 1]!) continue;
      let at = keep - 1;
      while (at > 0 && topScores[at - 1]! < dot) {
        topScores[at] = topScores[at - 1]!;
        topSlots[at] = topSlots[at - 1]!;
        at--;
      }
      topScores[at] = dot;
      topSlots[at] = slot;
    }
    const hits: VectorHit[] = [];
    for (let i = 0; i < keep; i++) if (topSlots[i]! >= 0) hits.push({ id: this.ids[topSlots[i]!]!, score: topScores[i]! });
    return hits;
  }
}

/** Scales a vector to unit length in place (a zero vector stays zero) and returns it. */
export function normalizeInPlace(vector: Float32Array): Float32Array {
  let sum = 0;
  for (let i = 0; i < vector.length; i++) sum += vector[i]! * vector[i]!;
  if (sum > 0) {
    const scale = 1 / Math.sqrt(sum);
    for (let i = 0; i < vector.length; i++) vector[i] = vector[i]! * scale;
  }
  return vector;
}
