/**
 * Synthetic models: GGUF files with the exact architecture and shape of a real model, a real
 * tokenizer, and seeded random weights. Their text is gibberish but their compute, KV sizes and
 * state files are real, which is what kvstash's tests and benchmarks need (no weights can be
 * downloaded on the build machines).
 */
import fsp from 'node:fs/promises';
import { KvstashError } from '../errors.js';
import { f32ToF16Bits } from './f16.js';
import {
  GgmlType,
  GgufType,
  readGgufHeader,
  typedMetadata,
  writeGguf,
  type GgufTensorSource,
  type GgufTypedValue,
} from './gguf.js';
import { describe, requireInteger, requireString } from '../util/validate.js';
import { qwen2VocabPath } from './vocab.js';
// The addon loads lazily (lib/binding.ts), so f32/f16 models are written without it.
import { quantizeModel } from '../llama/quantize.js';

export type SyntheticShapeName = 'tiny' | 'qwen2-0.5b' | 'tiny-embed';
export type SyntheticWeightType = 'f32' | 'f16' | 'q8_0' | 'q4_k';

export interface SyntheticShape {
  /** llama.cpp architecture name; also the prefix of the hyperparameter keys. */
  readonly architecture: 'qwen2';
  readonly layers: number;
  readonly embeddingLength: number;
  readonly heads: number;
  readonly kvHeads: number;
  readonly feedForwardLength: number;
  /** Training context, tokens. */
  readonly contextLength: number;
  readonly ropeFreqBase: number;
  readonly rmsEpsilon: number;
  /** The output projection reuses token_embd (no output.weight tensor), as in Qwen2.5-0.5B. */
  readonly tiedEmbeddings: boolean;
  /**
   * Every block's attn_output and ffn_down weights are zero, so no block writes to the residual
   * stream: a token's final hidden state is its own (RMS-normalized) embedding row, whatever
   * surrounds it. Mean pooling then gives a bag-of-words vector: texts that share words are near.
   */
  readonly silentBlocks?: boolean;
  /** Written as `<arch>.pooling_type` (llama.cpp's default pooling for embeddings). */
  readonly pooling?: 'mean';
}

export const SYNTHETIC_SHAPES: Readonly<Record<SyntheticShapeName, SyntheticShape>> = Object.freeze({
  tiny: Object.freeze({
    architecture: 'qwen2',
    layers: 2,
    embeddingLength: 64,
    heads: 4,
    kvHeads: 2,
    feedForwardLength: 128,
    contextLength: 4096,
    ropeFreqBase: 1000000,
    rmsEpsilon: 1e-6,
    tiedEmbeddings: true,
  }),
  // Qwen2.5-0.5B (its config.json): with the 151936-token vocab, 494,032,768 parameters.
  'qwen2-0.5b': Object.freeze({
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
  }),
  // An embedding model for tests: `tiny` with one silent block, 64-dim mean-pooled vectors. (llama.cpp
  // computes qwen2's logits beside the embeddings, so a wider shape mostly makes tests slower.)
  'tiny-embed': Object.freeze({
    architecture: 'qwen2',
    layers: 1,
    embeddingLength: 64,
    heads: 2,
    kvHeads: 1,
    feedForwardLength: 128,
    contextLength: 4096,
    ropeFreqBase: 1000000,
    rmsEpsilon: 1e-6,
    tiedEmbeddings: true,
    silentBlocks: true,
    pooling: 'mean',
  }),
});

const WEIGHT_TYPES: readonly SyntheticWeightType[] = ['f32', 'f16', 'q8_0', 'q4_k'];

export interface SyntheticModelOptions {
  shape: SyntheticShapeName;
  /** Where to write the .gguf; replaced atomically if it exists. */
  path: string;
  /** Integer in [0, 2^32); default 1. The same seed gives a byte-identical file. */
  seed?: number;
  /**
   * Type of the 2-D weight tensors; default 'f16'. Norms and biases stay f32, as llama.cpp
   * expects. q8_0 and q4_k are written as f16 and then quantized by llama.cpp (native addon).
   */
  type?: SyntheticWeightType;
  /** GGUF whose `tokenizer.*` keys give the vocabulary; default the Qwen2 vocab from llama.cpp. */
  vocabPath?: string;
}

export interface SyntheticModelInfo {
  path: string;
  /** File size, bytes. */
  bytes: number;
  shape: SyntheticShapeName;
  type: SyntheticWeightType;
  seed: number;
}

export interface SyntheticTensor {
  name: string;
  /** ne0 first. */
  dims: number[];
  /** weight: random with std 0.02; zero: all 0 (a silent block's outputs); norm: all 1.0; bias:
   * small random. Norms and biases are f32. */
  role: 'weight' | 'zero' | 'norm' | 'bias';
}

/** The tensor table of a qwen2 model, as llama.cpp's qwen2 loader (src/models/qwen2.cpp) asks for it. */
export function syntheticTensors(shape: SyntheticShape, vocabSize: number): SyntheticTensor[] {
  const embd = shape.embeddingLength;
  const kv = (embd / shape.heads) * shape.kvHeads; // n_embd_gqa
  const ff = shape.feedForwardLength;
  const residualWrite = shape.silentBlocks ? 'zero' : 'weight';
  const tensors: SyntheticTensor[] = [
    { name: 'token_embd.weight', dims: [embd, vocabSize], role: 'weight' },
    { name: 'output_norm.weight', dims: [embd], role: 'norm' },
  ];
  if (!shape.tiedEmbeddings) tensors.push({ name: 'output.weight', dims: [embd, vocabSize], role: 'weight' });
  for (let i = 0; i < shape.layers; i++) {
    const blk = `blk.${i}`;
    tensors.push(
      { name: `${blk}.attn_norm.weight`, dims: [embd], role: 'norm' },
      { name: `${blk}.attn_q.weight`, dims: [embd, embd], role: 'weight' },
      { name: `${blk}.attn_q.bias`, dims: [embd], role: 'bias' },
      { name: `${blk}.attn_k.weight`, dims: [embd, kv], role: 'weight' },
      { name: `${blk}.attn_k.bias`, dims: [kv], role: 'bias' },
      { name: `${blk}.attn_v.weight`, dims: [embd, kv], role: 'weight' },
      { name: `${blk}.attn_v.bias`, dims: [kv], role: 'bias' },
      { name: `${blk}.attn_output.weight`, dims: [embd, embd], role: residualWrite },
      { name: `${blk}.ffn_norm.weight`, dims: [embd], role: 'norm' },
      { name: `${blk}.ffn_gate.weight`, dims: [embd, ff], role: 'weight' },
      { name: `${blk}.ffn_up.weight`, dims: [embd, ff], role: 'weight' },
      { name: `${blk}.ffn_down.weight`, dims: [ff, embd], role: residualWrite },
    );
  }
  return tensors;
}

/**
 * Writes a synthetic qwen2 GGUF: the given shape, the vocab file's tokenizer, and weights drawn
 * from a seeded generator. Same options → byte-identical file. Resolves once the file is
 * complete and durable (written atomically).
 */
export async function writeSyntheticModel(opts: SyntheticModelOptions): Promise<SyntheticModelInfo> {
  if (typeof opts !== 'object' || opts === null) throw new TypeError(`options must be an object, got ${describe(opts)}`);
  const { shape: shapeName, path: target, seed = 1, type = 'f16' } = opts;
  if (!Object.prototype.hasOwnProperty.call(SYNTHETIC_SHAPES, shapeName)) {
    throw new RangeError(`shape must be one of ${Object.keys(SYNTHETIC_SHAPES).join(', ')}, got ${describe(shapeName)}`);
  }
  requireString(target, 'path');
  if (target.length === 0) throw new RangeError('path must not be empty');
  requireInteger(seed, 'seed', 0, 0xffffffff);
  if (!WEIGHT_TYPES.includes(type)) throw new RangeError(`type must be one of ${WEIGHT_TYPES.join(', ')}, got ${describe(type)}`);
  if (opts.vocabPath !== undefined) requireString(opts.vocabPath, 'vocabPath');
  const shape = SYNTHETIC_SHAPES[shapeName];
  const vocabPath = opts.vocabPath ?? qwen2VocabPath();
  const tokenizer = await readTokenizer(vocabPath);

  const info = { path: target, shape: shapeName, type, seed };
  if (type === 'f32' || type === 'f16') {
    const { bytes } = await writeGguf(target, buildModel(shapeName, shape, seed, type, tokenizer));
    return { ...info, bytes };
  }

  // llama.cpp quantizes (it owns the k-quant encoders); give it an f16 file to start from.
  const tmp = `${target}.f16-${process.pid}.tmp`;
  try {
    await writeGguf(tmp, buildModel(shapeName, shape, seed, 'f16', tokenizer));
    await quantizeModel(tmp, target, type);
  } finally {
    await fsp.rm(tmp, { force: true });
  }
  return { ...info, bytes: (await fsp.stat(target)).size };
}

interface Tokenizer {
  entries: Array<[string, GgufTypedValue]>;
  vocabSize: number;
}

async function readTokenizer(vocabPath: string): Promise<Tokenizer> {
  const header = await readGgufHeader(vocabPath);
  const tokens = header.metadata.get('tokenizer.ggml.tokens');
  if (!Array.isArray(tokens) || header.metadataTypes.get('tokenizer.ggml.tokens')?.itemType !== GgufType.STRING) {
    throw new KvstashError(
      'E_MODEL_FORMAT',
      `${vocabPath} has no tokenizer.ggml.tokens string array, so it cannot give a synthetic model its ` +
        `vocabulary: pass a vocab GGUF such as deps/llama.cpp/models/ggml-vocab-qwen2.gguf`,
    );
  }
  // Qwen2's vocab file has 151936 tokens, Qwen2.5's embedding row count. The embedding takes the
  // file's count whatever it is, because llama.cpp requires token_embd's ne1 to equal it.
  return {
    entries: typedMetadata(header).filter(([key]) => key.startsWith('tokenizer.')),
    vocabSize: tokens.length,
  };
}

function buildModel(
  shapeName: SyntheticShapeName,
  shape: SyntheticShape,
  seed: number,
  type: 'f32' | 'f16',
  tokenizer: Tokenizer,
): { metadata: Array<[string, GgufTypedValue]>; tensors: GgufTensorSource[] } {
  const arch = shape.architecture;
  const u32 = (value: number): GgufTypedValue => ({ type: GgufType.UINT32, value });
  const f32 = (value: number): GgufTypedValue => ({ type: GgufType.FLOAT32, value });
  const str = (value: string): GgufTypedValue => ({ type: GgufType.STRING, value });
  // The key types are the ones llama.cpp's loader insists on (it rejects e.g. a u64 block count).
  const metadata: Array<[string, GgufTypedValue]> = [
    ['general.architecture', str(arch)],
    ['general.name', str(`kvstash synthetic ${shapeName} seed ${seed}`)],
    ['general.file_type', u32(type === 'f32' ? 0 : 1)], // LLAMA_FTYPE_ALL_F32 / LLAMA_FTYPE_MOSTLY_F16
    ['kvstash.synthetic.shape', str(shapeName)],
    ['kvstash.synthetic.seed', u32(seed)],
    [`${arch}.context_length`, u32(shape.contextLength)],
    [`${arch}.embedding_length`, u32(shape.embeddingLength)],
    [`${arch}.block_count`, u32(shape.layers)],
    [`${arch}.feed_forward_length`, u32(shape.feedForwardLength)],
    [`${arch}.attention.head_count`, u32(shape.heads)],
    [`${arch}.attention.head_count_kv`, u32(shape.kvHeads)],
    [`${arch}.rope.freq_base`, f32(shape.ropeFreqBase)],
    [`${arch}.attention.layer_norm_rms_epsilon`, f32(shape.rmsEpsilon)],
    ...(shape.pooling === 'mean' ? [[`${arch}.pooling_type`, u32(1)] as [string, GgufTypedValue]] : []), // LLAMA_POOLING_TYPE_MEAN
    ...tokenizer.entries,
  ];
  // One scratch buffer for every chunk: writeGguf has written a chunk before it asks for the next.
  const scratch = new ArrayBuffer(CHUNK_BYTES);
  const weightType = type === 'f16' ? GgmlType.F16 : GgmlType.F32;
  const matrix = (t: SyntheticTensor): boolean => t.role === 'weight' || t.role === 'zero';
  const tensors = syntheticTensors(shape, tokenizer.vocabSize).map(
    (t): GgufTensorSource => ({
      name: t.name,
      dims: t.dims,
      type: matrix(t) ? weightType : GgmlType.F32,
      data: () => tensorData(t, matrix(t) ? weightType : GgmlType.F32, seed, scratch),
    }),
  );
  return { metadata, tensors };
}

// ---------------------------------------------------------------------------------------------
// Weights

const CHUNK_BYTES = 8 * 1024 * 1024;
/** Uniform on [-a, a] has standard deviation a/√3: weights get std 0.02, like a fresh init. */
const WEIGHT_HALF_RANGE = 0.02 * Math.sqrt(3);
const BIAS_HALF_RANGE = 0.01;

let f16WeightTable: Uint16Array | undefined;

/**
 * f16 weights come from a table of 65536 evenly spaced values in [-a, a], indexed by 16 random
 * bits: two weights per random word, and no float conversion in the hot loop.
 */
function weightTableF16(): Uint16Array {
  if (f16WeightTable === undefined) {
    f16WeightTable = new Uint16Array(65536);
    for (let k = 0; k < 65536; k++) f16WeightTable[k] = f32ToF16Bits(((k + 0.5) / 32768 - 1) * WEIGHT_HALF_RANGE);
  }
  return f16WeightTable;
}

function* tensorData(t: SyntheticTensor, type: number, seed: number, scratch: ArrayBuffer): Generator<Uint8Array> {
  const rng = tensorRng(seed, t.name);
  const elementBytes = type === GgmlType.F16 ? 2 : 4;
  const perChunk = scratch.byteLength / elementBytes;
  let left = t.dims.reduce((a, b) => a * b, 1);
  while (left > 0) {
    const n = Math.min(left, perChunk);
    if (t.role === 'norm') new Float32Array(scratch, 0, n).fill(1);
    else if (t.role === 'zero') new Uint8Array(scratch, 0, n * elementBytes).fill(0);
    else if (type === GgmlType.F16) fillUniformF16(rng, new Uint16Array(scratch, 0, n), weightTableF16());
    else fillUniformF32(rng, new Float32Array(scratch, 0, n), t.role === 'bias' ? BIAS_HALF_RANGE : WEIGHT_HALF_RANGE);
    left -= n;
    yield new Uint8Array(scratch, 0, n * elementBytes);
  }
}

/** murmur3's 32-bit finalizer: a bijection that scatters nearby inputs. */
function mix32(x: number): number {
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/**
 * xoshiro128** state for one tensor, derived from the seed and the tensor's name, so a tensor's
 * values depend on neither the tensor order nor the chunk size.
 */
function tensorRng(seed: number, name: string): Int32Array {
  let h = 0x811c9dc5; // FNV-1a over the name
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  const base = mix32(mix32(seed) ^ h);
  const state = new Int32Array(4);
  for (let i = 0; i < 4; i++) state[i] = mix32(base + Math.imul(i + 1, 0x9e3779b9));
  if ((state[0]! | state[1]! | state[2]! | state[3]!) === 0) state[0] = 1; // the one forbidden state
  return state;
}

// The two fill loops inline xoshiro128** (Blackman & Vigna) on local int32 variables: a function
// call per random number would dominate writing half a billion weights.

function fillUniformF16(rng: Int32Array, out: Uint16Array, table: Uint16Array): void {
  let s0 = rng[0]!, s1 = rng[1]!, s2 = rng[2]!, s3 = rng[3]!;
  const n = out.length;
  for (let i = 0; i < n; i += 2) {
    let m = Math.imul(s1, 5);
    m = (m << 7) | (m >>> 25);
    const r = Math.imul(m, 9);
    const t = s1 << 9;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    s3 = (s3 << 11) | (s3 >>> 21);
    out[i] = table[r & 0xffff]!;
    if (i + 1 < n) out[i + 1] = table[r >>> 16]!;
  }
  rng[0] = s0; rng[1] = s1; rng[2] = s2; rng[3] = s3;
}

function fillUniformF32(rng: Int32Array, out: Float32Array, halfRange: number): void {
  let s0 = rng[0]!, s1 = rng[1]!, s2 = rng[2]!, s3 = rng[3]!;
  const scale = (2 * halfRange) / 16777216;
  const n = out.length;
  for (let i = 0; i < n; i++) {
    let m = Math.imul(s1, 5);
    m = (m << 7) | (m >>> 25);
    const r = Math.imul(m, 9);
    const t = s1 << 9;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    s3 = (s3 << 11) | (s3 >>> 21);
    // The top 24 bits, centred: uniform on (-a, a), symmetric about zero.
    out[i] = ((r >>> 8) + 0.5) * scale - halfRange;
  }
  rng[0] = s0; rng[1] = s1; rng[2] = s2; rng[3] = s3;
}
