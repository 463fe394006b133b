// Synthetic qwen2 models: deterministic from their seed, shaped exactly as llama.cpp's qwen2
// loader asks, with the real Qwen2 tokenizer and weights of the intended spread.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { f16BitsToF32 } from '../lib/models/f16.js';
import { fingerprintModel } from '../lib/models/fingerprint.js';
import { GgmlType, GgufType, readGgufHeader, writeGguf, type GgufHeader } from '../lib/models/gguf.js';
import { SYNTHETIC_SHAPES, syntheticTensors, writeSyntheticModel } from '../lib/models/synthetic.js';
import { qwen2VocabPath } from '../lib/models/vocab.js';

const sha256 = (file: string): string => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

function tensorBytes(file: string, header: GgufHeader, name: string, maxBytes = Infinity): Buffer {
  const info = header.tensors.find((x) => x.name === name);
  if (info === undefined) throw new Error(`no tensor ${name}`);
  const length = Math.min(info.byteLength, maxBytes);
  const fd = fs.openSync(file, 'r');
  try {
    const out = Buffer.alloc(length);
    fs.readSync(fd, out, 0, length, header.dataOffset + info.offset);
    return out;
  } finally {
    fs.closeSync(fd);
  }
}

function stats(values: ArrayLike<number>): { mean: number; std: number; maxAbs: number } {
  let sum = 0;
  let sumSq = 0;
  let maxAbs = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i]!;
    sum += v;
    sumSq += v * v;
    maxAbs = Math.max(maxAbs, Math.abs(v));
  }
  const mean = sum / values.length;
  return { mean, std: Math.sqrt(sumSq / values.length - mean * mean), maxAbs };
}

function sameValue(a: unknown, b: unknown): boolean {
  if (typeof a !== 'object' || typeof b !== 'object') return Object.is(a, b);
  const [x, y] = [a as ArrayLike<unknown>, b as ArrayLike<unknown>];
  if (a?.constructor !== b?.constructor || x.length !== y.length) return false;
  for (let i = 0; i < x.length; i++) if (!Object.is(x[i], y[i])) return false;
  return true;
}

t.test('shape table', async (t) => {
  t.match(SYNTHETIC_SHAPES.tiny, { layers: 2, embeddingLength: 64, heads: 4, kvHeads: 2, feedForwardLength: 128, contextLength: 4096 });
  t.match(SYNTHETIC_SHAPES['qwen2-0.5b'], {
    architecture: 'qwen2',
    layers: 24,
    embeddingLength: 896,
    heads: 14,
    kvHeads: 2,
    feedForwardLength: 4864,
    contextLength: 32768,
    ropeFreqBase: 1000000,
    rmsEpsilon: 1e-6,
    tiedEmbeddings: true,
  });
  const tensors = syntheticTensors(SYNTHETIC_SHAPES['qwen2-0.5b'], 151936);
  t.equal(tensors.length, 2 + 24 * 12);
  t.equal(tensors.reduce((n, x) => n + x.dims.reduce((a, b) => a * b, 1), 0), 494032768, "Qwen2.5-0.5B's parameter count");
  t.notOk(tensors.some((x) => x.name === 'output.weight'), 'tied embeddings: no output.weight');
});

t.test('tiny f16: deterministic from the seed', async (t) => {
  const dir = t.testdir();
  const a = path.join(dir, 'a.gguf');
  const b = path.join(dir, 'b.gguf');
  const c = path.join(dir, 'c.gguf');
  const info = await writeSyntheticModel({ shape: 'tiny', path: a });
  t.same(info, { path: a, shape: 'tiny', type: 'f16', seed: 1, bytes: fs.statSync(a).size }, 'defaults: f16, seed 1');
  await writeSyntheticModel({ shape: 'tiny', path: b, seed: 1, type: 'f16' });
  await writeSyntheticModel({ shape: 'tiny', path: c, seed: 2 });
  t.equal(sha256(b), sha256(a), 'same seed, byte-identical file');
  t.not(sha256(c), sha256(a), 'another seed, other bytes');
  t.equal(fs.statSync(c).size, fs.statSync(a).size, 'same shape, same size');

  const fingerprint = await fingerprintModel(a);
  t.equal(await fingerprintModel(a), fingerprint, 'same file, same fingerprint');
  t.equal(await fingerprintModel(b), fingerprint, 'same seed, same fingerprint');
  t.not(await fingerprintModel(c), fingerprint, 'another seed, another fingerprint');

  // Weights differ, not only the seed recorded in the header.
  const [ha, hc] = [await readGgufHeader(a), await readGgufHeader(c)];
  t.notOk(tensorBytes(a, ha, 'blk.0.attn_q.weight').equals(tensorBytes(c, hc, 'blk.0.attn_q.weight')), 'another seed, other weights');
  t.same(fs.readdirSync(dir).sort(), ['a.gguf', 'b.gguf', 'c.gguf'], 'no temporary files left');
});

t.test('tiny f16: exactly the qwen2 layout llama.cpp loads', async (t) => {
  const file = path.join(t.testdir(), 'tiny.gguf');
  await writeSyntheticModel({ shape: 'tiny', path: file, seed: 7 });
  const header = await readGgufHeader(file);
  const vocab = await readGgufHeader(qwen2VocabPath());

  const expect: Array<[string, number, unknown]> = [
    ['general.architecture', GgufType.STRING, 'qwen2'],
    ['general.name', GgufType.STRING, 'kvstash synthetic tiny seed 7'],
    ['general.file_type', GgufType.UINT32, 1],
    ['kvstash.synthetic.shape', GgufType.STRING, 'tiny'],
    ['kvstash.synthetic.seed', GgufType.UINT32, 7],
    ['qwen2.context_length', GgufType.UINT32, 4096],
    ['qwen2.embedding_length', GgufType.UINT32, 64],
    ['qwen2.block_count', GgufType.UINT32, 2],
    ['qwen2.feed_forward_length', GgufType.UINT32, 128],
    ['qwen2.attention.head_count', GgufType.UINT32, 4],
    ['qwen2.attention.head_count_kv', GgufType.UINT32, 2],
    ['qwen2.rope.freq_base', GgufType.FLOAT32, 1000000],
    ['qwen2.attention.layer_norm_rms_epsilon', GgufType.FLOAT32, Math.fround(1e-6)],
  ];
  for (const [key, type, value] of expect) {
    t.strictSame(header.metadataTypes.get(key), { type }, `${key} type`);
    t.equal(header.metadata.get(key), value, key);
  }
  const tokenizerKeys = [...vocab.metadata.keys()].filter((k) => k.startsWith('tokenizer.'));
  t.same([...header.metadata.keys()].filter((k) => k.startsWith('tokenizer.')), tokenizerKeys, 'every tokenizer key of the vocab file');
  for (const key of tokenizerKeys) {
    t.strictSame(header.metadataTypes.get(key), vocab.metadataTypes.get(key), `${key} type`);
    // Element by element: tap's deep compare takes seconds on 150k-entry arrays.
    t.ok(sameValue(header.metadata.get(key), vocab.metadata.get(key)), `${key} value`);
  }
  t.equal(header.metadata.size, expect.length + tokenizerKeys.length, 'no other keys');

  const names = header.tensors.map((x) => x.name);
  t.same(names.slice(0, 2), ['token_embd.weight', 'output_norm.weight']);
  t.same(names.slice(2, 14), [
    'blk.0.attn_norm.weight',
    'blk.0.attn_q.weight',
    'blk.0.attn_q.bias',
    'blk.0.attn_k.weight',
    'blk.0.attn_k.bias',
    'blk.0.attn_v.weight',
    'blk.0.attn_v.bias',
    'blk.0.attn_output.weight',
    'blk.0.ffn_norm.weight',
    'blk.0.ffn_gate.weight',
    'blk.0.ffn_up.weight',
    'blk.0.ffn_down.weight',
  ]);
  t.equal(header.tensors.length, 2 + 2 * 12);
  const dims = Object.fromEntries(header.tensors.map((x) => [x.name, x.dims]));
  t.same(dims['token_embd.weight'], [64, 151936], 'ne1 = the vocab file token count');
  t.same(dims['blk.1.attn_q.weight'], [64, 64]);
  t.same(dims['blk.1.attn_k.weight'], [64, 32], 'n_embd_gqa = 64 / 4 heads × 2 KV heads');
  t.same(dims['blk.1.attn_v.bias'], [32]);
  t.same(dims['blk.1.ffn_gate.weight'], [64, 128]);
  t.same(dims['blk.1.ffn_down.weight'], [128, 64]);
  for (const x of header.tensors) {
    t.equal(x.type, x.dims.length === 1 ? GgmlType.F32 : GgmlType.F16, `${x.name}: ${x.dims.length === 1 ? '1-D f32' : '2-D f16'}`);
  }
});

t.test('weights: spread, norms and biases', async (t) => {
  const dir = t.testdir();
  const f16 = path.join(dir, 'tiny-f16.gguf');
  const f32 = path.join(dir, 'tiny-f32.gguf');
  await writeSyntheticModel({ shape: 'tiny', path: f16, seed: 3 });
  const f32Info = await writeSyntheticModel({ shape: 'tiny', path: f32, seed: 3, type: 'f32' });
  const halfRange = 0.02 * Math.sqrt(3);

  const h16 = await readGgufHeader(f16);
  const raw = tensorBytes(f16, h16, 'token_embd.weight', 4 * 1024 * 1024);
  const halves = new Uint16Array(raw.buffer, raw.byteOffset, raw.length / 2);
  const s16 = stats(Array.from(halves, f16BitsToF32));
  t.ok(Math.abs(s16.mean) < 2e-4, `f16 mean ${s16.mean}`);
  t.ok(Math.abs(s16.std - 0.02) < 2e-4, `f16 std ${s16.std}`);
  t.ok(s16.maxAbs <= halfRange * 1.001, `f16 max |w| ${s16.maxAbs}`);

  const h32 = await readGgufHeader(f32);
  t.equal(f32Info.bytes, fs.statSync(f32).size);
  t.equal(h32.metadata.get('general.file_type'), 0);
  t.ok(h32.tensors.every((x) => x.type === GgmlType.F32), 'every tensor f32');
  const w = tensorBytes(f32, h32, 'blk.0.ffn_up.weight');
  const s32 = stats(new Float32Array(w.buffer, w.byteOffset, w.length / 4));
  t.ok(Math.abs(s32.mean) < 1e-3, `f32 mean ${s32.mean}`);
  t.ok(Math.abs(s32.std - 0.02) < 1e-3, `f32 std ${s32.std}`);
  t.ok(s32.maxAbs <= halfRange, `f32 max |w| ${s32.maxAbs}`);

  for (const [file, header] of [[f16, h16], [f32, h32]] as const) {
    const norm = tensorBytes(file, header, 'blk.1.ffn_norm.weight');
    t.ok(new Float32Array(norm.buffer, norm.byteOffset, 64).every((v) => v === 1), 'norm weights are exactly 1');
    const bias = tensorBytes(file, header, 'blk.1.attn_q.bias');
    const sb = stats(new Float32Array(bias.buffer, bias.byteOffset, 64));
    t.ok(sb.maxAbs > 0 && sb.maxAbs <= 0.01, `biases small and non-zero: max ${sb.maxAbs}`);
  }
});

t.test('golden: tiny f16 seed 1 is the same file on every machine', async (t) => {
  // Pins the generator, the f16 rounding and the layout across platforms (x64, arm64) and
  // releases. If this changes on purpose, cache entries keyed by synthetic-model fingerprints
  // change too; update both values then. (It also depends on the pinned llama.cpp vocab file.)
  const file = path.join(t.testdir(), 'tiny.gguf');
  await writeSyntheticModel({ shape: 'tiny', path: file, seed: 1 });
  t.equal(sha256(file), 'a44e21d0c01cf08c0aeed919e0edf0ff57eadcdeb6edbfd1ea7168c650f1666d', 'file sha256');
  t.equal(await fingerprintModel(file), '22d93d407fc3b2f1f3ae0be2c2dc25966e1c7b6797e5ed67bf0be807afb37651', 'fingerprint');
});

t.test('bad options: TypeError/RangeError, nothing written', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'm.gguf');
  const cases: Array<[string, unknown, ErrorConstructor]> = [
    ['no options', undefined, TypeError],
    ['unknown shape', { shape: 'huge', path: file }, RangeError],
    ['inherited key as shape', { shape: 'toString', path: file }, RangeError],
    ['no path', { shape: 'tiny' }, TypeError],
    ['empty path', { shape: 'tiny', path: '' }, RangeError],
    ['negative seed', { shape: 'tiny', path: file, seed: -1 }, RangeError],
    ['fractional seed', { shape: 'tiny', path: file, seed: 1.5 }, TypeError],
    ['seed 2^32', { shape: 'tiny', path: file, seed: 2 ** 32 }, RangeError],
    ['unknown type', { shape: 'tiny', path: file, type: 'q3_k' }, RangeError],
    ['vocabPath not a string', { shape: 'tiny', path: file, vocabPath: 5 }, TypeError],
  ];
  for (const [name, opts, type] of cases) {
    await t.rejects(writeSyntheticModel(opts as never), type, name);
  }
  t.same(fs.readdirSync(dir), []);
});

t.test('a vocab file without a tokenizer: E_MODEL_FORMAT', async (t) => {
  const dir = t.testdir();
  const notVocab = path.join(dir, 'not-vocab.gguf');
  await writeGguf(notVocab, { metadata: [['general.name', { type: GgufType.STRING, value: 'x' }]], tensors: [] });
  await t.rejects(writeSyntheticModel({ shape: 'tiny', path: path.join(dir, 'm.gguf'), vocabPath: notVocab }), {
    code: 'E_MODEL_FORMAT',
    message: /not-vocab\.gguf has no tokenizer\.ggml\.tokens/,
  });
  await t.rejects(writeSyntheticModel({ shape: 'tiny', path: path.join(dir, 'm.gguf'), vocabPath: path.join(dir, 'absent.gguf') }), {
    code: 'E_MODEL_LOAD',
  });
  t.same(fs.readdirSync(dir), ['not-vocab.gguf']);
});
