/**
 * The only module that loads the native addon. It declares the native interface as TypeScript
 * types; everything else in lib/ talks to `native()` and never to the .node file.
 */
import fs from 'node:fs';
import path from 'node:path';
import { KvstashError } from './errors.js';

/** Package root: this file is lib/binding.ts in a checkout and dist/binding.js when compiled. */
export const PACKAGE_ROOT = path.resolve(__dirname, '..');

export interface NativeModelInfo {
  architecture: string;
  name: string;
  description: string;
  trainedContextSize: number;
  embeddingSize: number;
  layers: number;
  heads: number;
  kvHeads: number;
  vocabSize: number;
  parameters: number;
  sizeBytes: number;
  canShift: boolean;
  specialTokens: {
    bos: number;
    eos: number;
    eot: number;
    sep: number;
    nl: number;
    pad: number;
    addBos: boolean;
    addEos: boolean;
  };
  chatTemplate: string | null;
}

export interface NativeContextOptions {
  contextSize?: number;
  batchSize?: number;
  ubatchSize?: number;
  sequences?: number;
  threads?: number;
  kvType?: string;
  flashAttention?: 'auto' | 'on' | 'off';
  unifiedKv?: boolean;
}

export interface NativeContextInfo {
  contextSize: number;
  sequenceContextSize: number;
  batchSize: number;
  ubatchSize: number;
  sequences: number;
  threads: number;
  kvType: string;
  flashAttention: 'auto' | 'on' | 'off';
  unifiedKv: boolean;
  vocabSize: number;
  canShift: boolean;
}

export interface NativeModel {
  info(): NativeModelInfo;
  metadata(): Record<string, string>;
  tokenize(text: string, addSpecial: boolean, parseSpecial: boolean): Int32Array;
  detokenize(tokens: Int32Array, removeSpecial: boolean, unparseSpecial: boolean): string;
  tokenPiece(token: number, special: boolean): Buffer;
  isEndOfGeneration(token: number): boolean;
  applyChatTemplate(template: string, messages: ReadonlyArray<{ role: string; content: string }>, addAssistant: boolean): string;
  createContext(options: NativeContextOptions): Promise<NativeContext>;
  /** Pooled embeddings, one per token list (each 1..batchTokens tokens); E_BUSY while another runs. */
  embed(
    tokenLists: readonly Int32Array[],
    options: { pooling: 'mean' | 'cls' | 'last'; normalize: boolean; batchTokens: number; threads: number },
  ): Promise<Float32Array[]>;
  dispose(): void;
}

export type ProgressCallback = (done: number, total: number) => void;

/** How a cache entry's digests are computed (lib/cache/entry.ts): by format version. */
export type DigestScheme = 'xxh64' | 'crc32c';

export interface NativeContext {
  info(): NativeContextInfo;
  decode(tokens: Int32Array, positions: Int32Array, sequences: Int32Array, keep: Uint8Array, onProgress?: ProgressCallback): Promise<number>;
  logits(index: number): Float32Array;
  abort(): void;
  /** Aborts the running operation and blocks until its thread has left it (used at exit only). */
  abortAndWait(): void;
  isBusy(): boolean;
  memoryClear(): void;
  memoryRemove(sequence: number, p0: number, p1: number): boolean;
  memoryCopy(source: number, destination: number, p0: number, p1: number): void;
  memoryKeep(sequence: number): void;
  memoryShift(sequence: number, p0: number, p1: number, delta: number): void;
  memoryRange(sequence: number): [number, number];
  stateSize(sequence: number): number;
  saveStateFile(path: string, sequence: number, tokens: Int32Array): Promise<void>;
  loadStateFile(path: string, sequence: number): Promise<Int32Array>;
  exportState(sequence: number): Promise<Buffer>;
  /** `tokens`: the count the state's header lists (checked before and after the import), or undefined. */
  importState(bytes: Uint8Array, sequence: number, tokens?: number): Promise<void>;
  /** Verifies bytes [0, checkedLength) chunk by chunk while it imports the payload range. */
  importVerifiedStateFile(
    path: string,
    sequence: number,
    checkedLength: number,
    chunkBytes: number,
    /** u64 LE digest per chunk of [0, checkedLength), as chunkChecksums() with `scheme`. */
    digests: Uint8Array,
    scheme: DigestScheme,
    payloadOffset: number,
    payloadLength: number,
    /** False: the helper thread does not read ahead, and every bulk chunk is read straight from the file. */
    readAhead: boolean,
    /** The token count the entry's header lists (the sequence must then hold exactly [0, tokens)). */
    tokens: number | undefined,
    /** The open entry file, read with pread and left open; `path` only names it in messages. */
    fd: number,
  ): Promise<{ chunks: number; bouncedChunks: number }>;
  dispose(): void;
}

export interface NativeSamplerOptions {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repeatPenalty: number;
  repeatLastN: number;
  frequencyPenalty: number;
  presencePenalty: number;
  seed: number;
  vocabSize: number;
}

export interface NativeSampler {
  sample(context: NativeContext, index: number): number;
  accept(tokens: Int32Array): void;
  reset(): void;
  dispose(): void;
}

/** The RKLLM runtime versions kvstash declares the ABI of ('1.2.1' covers every 1.2.x from 1.2.1). */
export type NativeRkllmVersion = '1.3.0' | '1.2.1';

/** Every RKLLMParam and RKLLMExtendParam field, camelCased. `init` takes any subset (plus
 * modelPath); what is left out keeps the runtime's rkllm_createDefaultParam() value. */
export interface NativeRkllmParams extends NativeRkllmSampling {
  modelPath: string;
  maxContextLen: number;
  maxNewTokens: number;
  nKeep: number;
  skipSpecialToken: boolean;
  /** Runtime 1.3.0 only. */
  ignoreEosToken?: boolean;
  /** Must stay false: kvstash runs rkllm_run on its own worker thread. */
  isAsync: boolean;
  /** Runtime 1.2.x only. */
  imgStart?: string | null;
  imgEnd?: string | null;
  imgContent?: string | null;
  baseDomainId: number;
  embedFlash: boolean;
  enabledCpusNum: number;
  enabledCpusMask: number;
  nBatch: number;
  useCrossAttn: boolean;
}

export interface NativeRkllmSampling {
  topK: number;
  topP: number;
  temperature: number;
  repeatPenalty: number;
  frequencyPenalty: number;
  presencePenalty: number;
  mirostat: number;
  mirostatTau: number;
  mirostatEta: number;
}

export type NativeRkllmInferMode = 'generate' | 'lastHiddenLayer' | 'logits';

/** One rkllm_run: exactly one of prompt, tokens, embedding (with embeddingTokens). */
export interface NativeRkllmRunOptions {
  prompt?: string;
  tokens?: Int32Array;
  embedding?: Float32Array;
  embeddingTokens?: number;
  role?: string;
  enableThinking?: boolean;
  keepHistory?: boolean;
  mode?: NativeRkllmInferMode;
  loraName?: string;
  /** prompt_cache_params = {1, path}: the runtime writes this prompt's cache to the path. */
  savePromptCache?: string;
  /** Runtime 1.3.0 only; fields left out keep the init values. */
  sampling?: Partial<NativeRkllmSampling>;
  /** Runtime 1.3.0 only; 0 = the init value. */
  maxNewTokens?: number;
}

export interface NativeRkllmPerf {
  prefillMs: number;
  prefillTokens: number;
  generateMs: number;
  generateTokens: number;
  memoryMb: number;
}

export interface NativeRkllmRunResult {
  /** The UTF-8 bytes of each token as the runtime gave them (a character may span two). */
  chunks: Uint8Array[];
  tokenIds: Int32Array;
  /** The runtime sent RKLLM_RUN_FINISH. */
  finished: boolean;
  perf: NativeRkllmPerf;
  hiddenStates?: { data: Float32Array; embdSize: number; tokens: number };
  logits?: { data: Float32Array; vocabSize: number; tokens: number };
}

export interface NativeRkllmRuntimeInfo {
  version: NativeRkllmVersion;
  libraryPath: string;
  librarySource: string;
  initialized: boolean;
  params: NativeRkllmParams | null;
}

/** Chunks may arrive after run() settled: `index` orders them and tells which the result already holds. */
export type NativeRkllmTokenCallback = (bytes: Uint8Array, tokenId: number, index: number) => void;

export interface NativeRkllmRuntime {
  info(): NativeRkllmRuntimeInfo;
  defaultParams(): NativeRkllmParams;
  init(params: Partial<NativeRkllmParams> & { modelPath: string }): Promise<NativeRkllmParams>;
  run(options: NativeRkllmRunOptions, onToken?: NativeRkllmTokenCallback): Promise<NativeRkllmRunResult>;
  abort(): void;
  isRunning(): boolean;
  isBusy(): boolean;
  clearKvCache(keepSystemPrompt: boolean, start?: Int32Array, end?: Int32Array): void;
  kvCacheSize(): number[];
  setChatTemplate(systemPrompt: string, promptPrefix: string, promptPostfix: string): void;
  setFunctionTools(systemPrompt: string, tools: string, toolResponseStr: string): void;
  loadLora(path: string, name: string, scale: number): Promise<void>;
  loadPromptCache(path: string): Promise<void>;
  releasePromptCache(): void;
  dispose(): Promise<void>;
}

export interface NativeBinding {
  LlamaSampler: new (options: NativeSamplerOptions) => NativeSampler;
  /** Opens librkllmrt.so (path, else RKLLM_LIB_PATH, else the system search path); throws E_RKLLM_UNAVAILABLE. */
  RkllmRuntime: new (libraryPath: string | undefined, version: NativeRkllmVersion | undefined) => NativeRkllmRuntime;
  loadModel(path: string, options: { useMmap?: boolean }, onProgress?: ProgressCallback): Promise<NativeModel>;
  /** XXH64 (seed 0) or CRC-32C of the parts, concatenated: an entry's table checksum. */
  checksum(parts: readonly Uint8Array[], scheme: DigestScheme): Promise<bigint>;
  /**
   * The digest of each chunkBytes-long chunk of the parts concatenated, u64 LE each: chunk i's XXH64
   * with seed i, or the CRC-32C of i (u64 LE) followed by the chunk.
   */
  chunkChecksums(parts: readonly Uint8Array[], chunkBytes: number, scheme: DigestScheme): Promise<Buffer>;
  /** How CRC-32C is computed on this CPU: by instruction, or by table (portable, slower). */
  crc32cImplementation(): 'sse4.2' | 'armv8-crc' | 'table';
  /** Takes an exclusive advisory lock (F_OFD_SETLK, else flock) on the open file `fd` without
   * waiting: false when another open file description holds it. The kernel drops it on close or
   * when the process dies. Throws a Node-style system error (code ENOLCK, ...) otherwise. */
  tryLockFile(fd: number): boolean;
  /** Drops `fd`'s lock taken by tryLockFile. */
  unlockFile(fd: number): void;
  quantize(source: string, destination: string, type: string, threads: number): Promise<void>;
  /** Q8_0-quantizes `count` rows of `stride` floats (stride a multiple of 32) into `out`, and
   * writes each row's residual norm ‖x − dequant(q8(x))‖ (lib/memory/vector-index.ts). */
  vectorQuantizeQ8(rows: Float32Array, count: number, stride: number, out: Uint8Array, residuals: Float32Array): void;
  /** scores[i] = q8(query) · rows[i] by ggml's SIMD kernel; returns ‖query − dequant(q8(query))‖. */
  vectorScanQ8(rows: Uint8Array, count: number, stride: number, query: Float32Array, scores: Float32Array): number;
  setErrorClass(errorClass: typeof KvstashError): void;
  setLogLevel(level: number): void;
  systemInfo(): string;
  llamaCommit: string;
  /** Set by the prebuilt CPU-variant loader (scripts/cpu-variant-loader.c); absent in a source build. */
  cpuVariant?: string;
}

const LOG_LEVELS: Record<string, number> = { silent: 0, error: 1, warn: 2, info: 3, debug: 4 };

let loaded: NativeBinding | undefined;

/** The native addon, loaded on first use (so importing kvstash for its types never fails). */
export function native(): NativeBinding {
  if (loaded) return loaded;
  const attempts: string[] = [];
  let binding: NativeBinding | undefined;
  try {
    // node-gyp-build picks a matching prebuild from prebuilds/<platform>-<arch>/, else build/Release.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const load = require('node-gyp-build') as (dir: string) => NativeBinding;
    binding = load(PACKAGE_ROOT);
  } catch (err) {
    attempts.push(`- loading the addon failed: ${(err as Error).message.split('\n')[0]}`);
  }
  if (!binding) {
    const prebuildDir = path.join(PACKAGE_ROOT, 'prebuilds', `${process.platform}-${process.arch}`);
    attempts.push(
      fs.existsSync(prebuildDir)
        ? `- a prebuilt binary exists in ${prebuildDir} but did not load (wrong libc or CPU?)`
        : `- no prebuilt binary for ${process.platform}-${process.arch}`,
    );
    attempts.push(`- no usable local build in ${path.join(PACKAGE_ROOT, 'build', 'Release')}: run \`npm run build:native\` (needs cmake, a C++17 compiler and git)`);
    throw new KvstashError('E_NATIVE_UNAVAILABLE', `the kvstash native addon could not be loaded:\n${attempts.join('\n')}`);
  }
  binding.setErrorClass(KvstashError);
  const level = process.env.KVSTASH_LOG?.toLowerCase();
  binding.setLogLevel(level !== undefined && level in LOG_LEVELS ? LOG_LEVELS[level]! : 0);
  loaded = binding;
  return binding;
}
