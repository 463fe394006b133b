/**
 * Shared test fixtures. The synthetic tiny model is written once per test run into a temporary
 * directory (writing it takes about half a second) and reused by every test file.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeSyntheticModel } from '../../lib/index.js';

/** Set by scripts/arm64.sh when the suite runs under qemu: tests whose subject is not the native code
 * (JS-only crash safety, timing) skip there, with this reason, to keep the emulated run short. */
export function skipUnderEmulation(reason: string): string | false {
  return process.env.KVSTASH_EMULATED === '1' ? `under emulation (scripts/arm64.sh): ${reason}` : false;
}

const fixtureDir = path.join(os.tmpdir(), `kvstash-test-fixtures-${process.getuid?.() ?? 0}`);

type Shape = 'tiny' | 'qwen2-0.5b' | 'tiny-embed';
type WeightType = 'f16' | 'f32' | 'q8_0' | 'q4_k';

export async function syntheticModel(shape: Shape, seed = 1, type: WeightType = 'f16'): Promise<string> {
  fs.mkdirSync(fixtureDir, { recursive: true });
  const file = path.join(fixtureDir, `${shape}-${type}-seed${seed}.gguf`);
  // writeSyntheticModel writes atomically, so a file that exists is complete.
  if (!fs.existsSync(file)) await writeSyntheticModel({ shape, path: file, seed, type });
  return file;
}

export function tinyModel(seed = 1, type: WeightType = 'f16'): Promise<string> {
  return syntheticModel('tiny', seed, type);
}

/** The embedding shape (lib/models/synthetic.ts): silent blocks, mean pooling, 128-dim bag-of-words vectors. */
export function embeddingModel(seed = 1): Promise<string> {
  return syntheticModel('tiny-embed', seed, 'f16');
}

/** A model of another shape than tiny (24 layers): big enough to load and decode visibly slowly. */
export function largerModel(): Promise<string> {
  return syntheticModel('qwen2-0.5b', 2, 'q8_0');
}

/** A deterministic English-ish text of roughly `words` words, for prompts of a chosen length. */
export function prose(words: number, salt = 0): string {
  const vocabulary = ['cache', 'model', 'token', 'prefix', 'restore', 'the', 'state', 'of', 'a', 'prompt', 'is', 'saved',
    'quickly', 'and', 'loaded', 'again', 'when', 'needed', 'by', 'every', 'session', 'on', 'this', 'machine'];
  const out: string[] = [];
  let x = 2463534242 ^ salt;
  for (let i = 0; i < words; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.push(vocabulary[(x >>> 0) % vocabulary.length]!);
  }
  return out.join(' ');
}

/** Tokens of `prose` cut to exactly n tokens. */
export function promptTokens(model: { tokenize(text: string): Int32Array }, n: number, salt = 0): Int32Array {
  const tokens = model.tokenize(prose(n * 2, salt));
  if (tokens.length < n) throw new Error('prose too short');
  return tokens.slice(0, n);
}

export function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]! - b[i]!));
  return max;
}

export function bitIdentical(a: Float32Array, b: Float32Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}
