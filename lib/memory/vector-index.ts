/**
 * An in-memory exact nearest-neighbour index over unit vectors: cosine similarity, top-k.
 *
 * Rows live in one contiguous Float32Array (normalized on add) and, beside it, in ggml's Q8_0
 * format (blocks of 32 int8 with one f16 scale, about a quarter of the bytes). A search scans the
 * Q8_0 copy with ggml's SIMD dot product in the native addon, then re-scores in f32 only the rows
 * that the quantization error could still put in the top k, so the answer is the one an exact f32
 * scan gives (same ids, same scores, ties broken by the smaller id), at the cost of a quantized scan.
 * Without the native addon the same answer comes from a plain JS f32 scan.
 */
import { native, type NativeBinding } from '../binding.js';
import { describe, requireInteger } from '../util/validate.js';

export interface VectorHit {
  id: number;
  /** Cosine similarity with the query, in [-1, 1]. */
  score: number;
}

/** ggml's Q8_0 block: 32 elements, an f16 scale then 32 int8. */
const Q8_BLOCK = 32;
const Q8_BLOCK_BYTES = 34;
/** Below this many rows the exact scan is as fast as the quantized one plus its bookkeeping. */
const QUANTIZED_SCAN_MIN_ROWS = 512;
/** Headroom over float rounding of the quantized score (scores are O(1), f32 sums of 12-40 terms). */
const ROUNDING_SLACK = 1e-5;

type NativeScan = Pick<NativeBinding, 'vectorQuantizeQ8' | 'vectorScanQ8'>;

let scanner: NativeScan | null | undefined;

/** The addon's Q8_0 scan, or null when the addon (or an old build of it) cannot give one. */
function nativeScan(): NativeScan | null {
  if (scanner !== undefined) return scanner;
  try {
    const binding = native() as unknown as Partial<NativeScan>;
    scanner = typeof binding.vectorScanQ8 === 'function' && typeof binding.vectorQuantizeQ8 === 'function' ? (binding as NativeScan) : null;
  } catch {
    scanner = null;
  }
  return scanner;
}

export class VectorIndex {
  /** Dimension of every vector. */
  readonly dim: number;
  /** Row stride: dim rounded up to a whole Q8_0 block (the padding stays zero). */
  private readonly stride: number;
  private readonly rowBytes: number;
  private capacity = 0;
  private count = 0;
  private vectors = new Float32Array(0);
  private quantized = new Uint8Array(0);
  /** ‖x − dequant(q8(x))‖ per row: bounds how far the quantized score can be from the exact one. */
  private residuals = new Float32Array(0);
  private ids = new Float64Array(0);
  private readonly rowOf = new Map<number, number>();
  /** Per-search scratch (quantized scores, lower bounds), kept to spare a large allocation per query. */
  private scores = new Float32Array(0);
  private lower = new Float64Array(0);
  /** Rows [quantizedRows, count) have no Q8_0 copy yet (filled lazily by the first search). */
  private quantizedRows = 0;

  constructor(dim: number) {
    requireInteger(dim, 'dim', 1, 1 << 16);
    this.dim = dim;
    this.stride = Math.ceil(dim / Q8_BLOCK) * Q8_BLOCK;
    this.rowBytes = (this.stride / Q8_BLOCK) * Q8_BLOCK_BYTES;
  }

  /** Number of vectors held. */
  get size(): number {
    return this.count;
  }

  /** Adds (or replaces) the vector of `id`. The vector is normalized; it must be finite and non-zero. */
  add(id: number, vector: Float32Array): void {
    this.checkId(id, 'id');
    this.insert(id, this.unitVector(vector, 'vector'));
  }

  private insert(id: number, unit: Float32Array): void {
    let row = this.rowOf.get(id);
    if (row === undefined) {
      this.reserve(this.count + 1);
      row = this.count++;
      this.rowOf.set(id, row);
      this.ids[row] = id;
    } else if (row < this.quantizedRows) {
      this.moveToEnd(row);
      row = this.count - 1;
      this.quantizedRows--;
    }
    this.vectors.set(unit, row * this.stride);
  }

  /** add() for each pair; checks every argument before it changes anything. */
  addMany(ids: ArrayLike<number>, vectors: ArrayLike<Float32Array>): void {
    if (ids === null || typeof ids !== 'object' || typeof ids.length !== 'number') throw new TypeError(`ids must be an array of integers, got ${describe(ids)}`);
    if (vectors === null || typeof vectors !== 'object' || typeof vectors.length !== 'number') throw new TypeError(`vectors must be an array of Float32Array, got ${describe(vectors)}`);
    if (ids.length !== vectors.length) throw new RangeError(`ids (${ids.length}) and vectors (${vectors.length}) must have the same length`);
    const units: Float32Array[] = [];
    for (let i = 0; i < ids.length; i++) {
      this.checkId(ids[i], `ids[${i}]`);
      units.push(this.unitVector(vectors[i], `vectors[${i}]`));
    }
    this.reserve(this.count + ids.length);
    for (let i = 0; i < ids.length; i++) this.insert(ids[i]!, units[i]!);
  }

  /** Removes the vector of `id`; an id that is not held is ignored. */
  remove(id: number): void {
    this.checkId(id, 'id');
    const row = this.rowOf.get(id);
    if (row === undefined) return;
    if (row < this.quantizedRows) {
      // Keep [0, quantizedRows) quantized: the last quantized row fills the hole, the last row fills its place.
      const lastQuantized = this.quantizedRows - 1;
      this.copyRow(lastQuantized, row, true);
      this.copyRow(this.count - 1, lastQuantized, false);
      this.quantizedRows--;
    } else {
      this.copyRow(this.count - 1, row, false);
    }
    this.rowOf.delete(id);
    this.count--;
    this.vectors.fill(0, this.count * this.stride, (this.count + 1) * this.stride);
  }

  /**
   * The k vectors most similar to `query` (normalized first), best first; equal scores by
   * ascending id. Fewer than k when the index holds fewer.
   */
  search(query: Float32Array, k: number): VectorHit[] {
    const unit = this.unitVector(query, 'query');
    requireInteger(k, 'k', 0);
    const want = Math.min(k, this.count);
    if (want === 0) return [];
    const scan = this.count >= QUANTIZED_SCAN_MIN_ROWS ? nativeScan() : null;
    const hits = scan ? this.quantizedCandidates(scan, unit, want).map((row) => this.hit(unit, row)) : this.exactTop(unit, want);
    hits.sort(byScoreThenId);
    hits.length = want;
    return hits;
  }

  /** The rows scoring at least the k-th best exact score (ties included), by a full f32 scan. */
  private exactTop(unit: Float32Array, k: number): VectorHit[] {
    const scores = new Float64Array(this.count);
    for (let row = 0; row < this.count; row++) scores[row] = this.exactScore(unit, row);
    const floor = kthLargest(scores, k);
    const hits: VectorHit[] = [];
    for (let row = 0; row < this.count; row++) if (scores[row]! >= floor) hits.push({ id: this.ids[row]!, score: scores[row]! });
    return hits;
  }

  private hit(unit: Float32Array, row: number): VectorHit {
    return { id: this.ids[row]!, score: this.exactScore(unit, row) };
  }

  /**
   * Rows whose exact score can reach the k-th best: the quantized score s_i is within
   * b_i = ‖r_i‖ + ‖r_q‖·(1 + ‖r_i‖) of the exact one (Cauchy–Schwarz on q·x − q̂·x̂ with ‖q‖ = ‖x‖ = 1),
   * so every row of the exact top k has s_i + b_i ≥ the k-th largest s_j − b_j.
   */
  private quantizedCandidates(scan: NativeScan, unit: Float32Array, k: number): number[] {
    this.quantizePending(scan);
    const n = this.count;
    if (this.scores.length < n) {
      this.scores = new Float32Array(this.capacity);
      this.lower = new Float64Array(this.capacity);
    }
    const scores = this.scores;
    const lower = this.lower.subarray(0, n);
    const query = new Float32Array(this.stride);
    query.set(unit);
    const queryResidual = scan.vectorScanQ8(this.quantized, n, this.stride, query, scores);
    // b_i = r_i·(1 + r_q) + r_q + slack; tight loops over typed arrays (no closure per row).
    const residuals = this.residuals;
    const growth = 1 + queryResidual;
    const offset = queryResidual + ROUNDING_SLACK;
    for (let row = 0; row < n; row++) lower[row] = scores[row]! - (residuals[row]! * growth + offset);
    const floor = kthLargest(lower, k);
    const rows: number[] = [];
    for (let row = 0; row < n; row++) if (scores[row]! + residuals[row]! * growth + offset >= floor) rows.push(row);
    return rows;
  }

  private quantizePending(scan: NativeScan): void {
    const from = this.quantizedRows;
    if (from === this.count) return;
    const rows = this.count - from;
    scan.vectorQuantizeQ8(
      this.vectors.subarray(from * this.stride, this.count * this.stride),
      rows,
      this.stride,
      this.quantized.subarray(from * this.rowBytes, this.count * this.rowBytes),
      this.residuals.subarray(from, this.count),
    );
    this.quantizedRows = this.count;
  }

  private exactScore(unit: Float32Array, row: number): number {
    const v = this.vectors;
    const base = row * this.stride;
    let dot = 0;
    for (let i = 0; i < this.dim; i++) dot += unit[i]! * v[base + i]!;
    return dot;
  }

  private reserve(rows: number): void {
    if (rows <= this.capacity) return;
    const capacity = Math.max(rows, this.capacity * 2, 64);
    const vectors = new Float32Array(capacity * this.stride);
    vectors.set(this.vectors.subarray(0, this.count * this.stride));
    const quantized = new Uint8Array(capacity * this.rowBytes);
    quantized.set(this.quantized.subarray(0, this.quantizedRows * this.rowBytes));
    const residuals = new Float32Array(capacity);
    residuals.set(this.residuals.subarray(0, this.quantizedRows));
    const ids = new Float64Array(capacity);
    ids.set(this.ids.subarray(0, this.count));
    this.vectors = vectors;
    this.quantized = quantized;
    this.residuals = residuals;
    this.ids = ids;
    this.capacity = capacity;
  }

  /** Row `from` → row `to` (vector and id; its Q8_0 copy too when `quantized`). */
  private copyRow(from: number, to: number, quantized: boolean): void {
    if (from === to) return;
    this.vectors.copyWithin(to * this.stride, from * this.stride, (from + 1) * this.stride);
    if (quantized) {
      this.quantized.copyWithin(to * this.rowBytes, from * this.rowBytes, (from + 1) * this.rowBytes);
      this.residuals[to] = this.residuals[from]!;
    }
    const id = this.ids[from]!;
    this.ids[to] = id;
    this.rowOf.set(id, to);
  }

  /** Moves the id of a quantized row to the last row (its vector is about to be replaced),
   * keeping [0, quantizedRows - 1) packed with quantized rows. */
  private moveToEnd(row: number): void {
    const id = this.ids[row]!;
    const lastQuantized = this.quantizedRows - 1;
    const last = this.count - 1;
    this.copyRow(lastQuantized, row, true);
    this.copyRow(last, lastQuantized, false);
    this.ids[last] = id;
    this.rowOf.set(id, last);
  }

  private checkId(id: unknown, name: string): void {
    if (typeof id !== 'number' || !Number.isSafeInteger(id)) throw new TypeError(`${name} must be a safe integer, got ${describe(id)}`);
  }

  /** The vector scaled to length 1 (sum of squares in double, each element rounded to f32 once). */
  private unitVector(vector: unknown, name: string): Float32Array {
    if (!(vector instanceof Float32Array)) throw new TypeError(`${name} must be a Float32Array, got ${describe(vector)}`);
    if (vector.length !== this.dim) throw new RangeError(`${name} has ${vector.length} elements; this index holds ${this.dim}-dimensional vectors`);
    let squares = 0;
    for (let i = 0; i < vector.length; i++) {
      if (!Number.isFinite(vector[i])) throw new RangeError(`${name}[${i}] is ${vector[i]}: every element must be finite`);
      squares += vector[i]! * vector[i]!;
    }
    if (squares === 0) throw new RangeError(`${name} is all zeros: it has no direction to compare`);
    const norm = Math.sqrt(squares);
    const unit = new Float32Array(vector.length);
    for (let i = 0; i < vector.length; i++) unit[i] = vector[i]! / norm;
    return unit;
  }
}

function byScoreThenId(a: VectorHit, b: VectorHit): number {
  return b.score - a.score || a.id - b.id;
}

/** The k-th largest of `values` (k ≤ its length), through a size-k min-heap. */
function kthLargest(values: Float64Array, k: number): number {
  const heap = new Float64Array(k);
  let size = 0;
  const n = values.length;
  for (let i = 0; i < n; i++) {
    const v = values[i]!;
    if (size < k) {
      let at = size++;
      while (at > 0) {
        const parent = (at - 1) >> 1;
        if (heap[parent]! <= v) break;
        heap[at] = heap[parent]!;
        at = parent;
      }
      heap[at] = v;
    } else if (v > heap[0]!) {
      let at = 0;
      for (;;) {
        const left = 2 * at + 1;
        if (left >= k) break;
        const child = left + 1 < k && heap[left + 1]! < heap[left]! ? left + 1 : left;
        if (heap[child]! >= v) break;
        heap[at] = heap[child]!;
        at = child;
      }
      heap[at] = v;
    }
  }
  return heap[0]!;
}
