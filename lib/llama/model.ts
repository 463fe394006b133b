import os from 'node:os';
import { native, type NativeModel, type NativeModelInfo } from '../binding.js';
import { KvstashError } from '../errors.js';
import { fingerprintModel } from '../models/fingerprint.js';
import { readGgufHeader } from '../models/gguf.js';
import { validateModelMetadata } from '../models/gguf-validate.js';
import { describe, requireString, toInt32Array } from '../util/validate.js';
import { Context, type ContextOptions } from './context.js';
import { OperationQueue } from './queue.js';
import { Sampler, type SamplingOptions } from './sampler.js';

export type ModelInfo = NativeModelInfo;

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | 'tool' | (string & {});
  content: string;
}

export interface LoadModelOptions {
  /** Map the file instead of reading it into memory. Default true. */
  useMmap?: boolean;
  /** Called with the loaded fraction, 0..1, while the weights load. */
  onProgress?: (fraction: number) => void;
}

export interface TokenizeOptions {
  /** Parse control tokens written in the text (such as `<|im_start|>`) as special tokens. Default
   * false, so user text cannot inject control tokens; templated prompts need true. */
  special?: boolean;
  /** Prepend BOS (and append EOS) as the model's tokenizer asks. Default: the model's own setting. */
  addSpecial?: boolean;
}

/** How the token vectors of a text become one vector: their mean, the first token's, the last token's. */
export type EmbeddingPooling = 'mean' | 'cls' | 'last';

export interface EmbedOptions {
  /** Default: the pooling the model's GGUF declares (`<arch>.pooling_type`), else 'mean'. */
  pooling?: EmbeddingPooling;
  /** Scale every vector to length 1, so a dot product is the cosine similarity. Default true. */
  normalize?: boolean;
}

const POOLINGS: readonly EmbeddingPooling[] = ['mean', 'cls', 'last'];
/** llama.cpp's enum llama_pooling_type, as GGUF files store it. */
const GGUF_POOLING: Record<string, EmbeddingPooling> = { '1': 'mean', '2': 'cls', '3': 'last' };
/** Tokens one embedding decode holds at least (more when a text is longer). The context also
 * keeps a logits row per token (llama.cpp computes them alongside), so this stays modest. */
const EMBED_BATCH_TOKENS = 128;

/**
 * Loads a GGUF model. The file is checked first (GGUF header, tensor bounds, and every
 * hyper-parameter and vocabulary entry that llama.cpp would abort on: E_MODEL_FORMAT naming the
 * key) and fingerprinted.
 */
export async function loadModel(path: string, options: LoadModelOptions = {}): Promise<Model> {
  requireString(path, 'path');
  validateModelMetadata(await readGgufHeader(path), path);
  const fingerprint = await fingerprintModel(path);
  const onProgress = options.onProgress;
  const handle = await native().loadModel(
    path,
    { useMmap: options.useMmap ?? true },
    onProgress ? (done) => onProgress(done) : undefined,
  );
  return new Model(handle, path, fingerprint);
}

/**
 * A loaded model: weights, vocabulary, chat template. Synchronous methods are cheap (tokenizing a
 * 2,000-token prompt takes about a millisecond); loading and context creation are asynchronous.
 */
export class Model {
  /** The model's shape and special tokens. */
  readonly info: ModelInfo;
  private readonly contexts = new Set<Context>();
  private readonly embeddings = new OperationQueue();
  private disposed = false;

  /** @internal Use loadModel(). */
  constructor(
    private readonly handle: NativeModel,
    /** The GGUF file this model was loaded from. */
    readonly path: string,
    /** Hex SHA-256 over the GGUF header and sampled tensor data: equal for the same weights,
     * different for other weights of the same shape. Cache entries record it. */
    readonly fingerprint: string,
  ) {
    this.info = handle.info();
  }

  get isDisposed(): boolean {
    return this.disposed;
  }

  /** The GGUF metadata, every value rendered as a string by llama.cpp. */
  metadata(): Record<string, string> {
    this.requireLive();
    return this.handle.metadata();
  }

  tokenize(text: string, options: TokenizeOptions = {}): Int32Array {
    this.requireLive();
    requireString(text, 'text');
    return this.handle.tokenize(text, options.addSpecial ?? this.info.specialTokens.addBos, options.special ?? false);
  }

  /** Text of the tokens. `special: true` renders control tokens as their text. */
  detokenize(tokens: Int32Array | readonly number[], options: { special?: boolean } = {}): string {
    this.requireLive();
    return this.handle.detokenize(toInt32Array(tokens, 'tokens'), false, options.special ?? false);
  }

  /** The raw bytes of one token (a token may end inside a multi-byte character). */
  tokenBytes(token: number, options: { special?: boolean } = {}): Uint8Array {
    this.requireLive();
    return this.handle.tokenPiece(this.checkToken(token), options.special ?? false);
  }

  /** True for tokens that end a generation (EOS, EOT, and the like). */
  isEndOfGeneration(token: number): boolean {
    this.requireLive();
    return this.handle.isEndOfGeneration(this.checkToken(token));
  }

  /**
   * Renders messages with the model's chat template (or `template`, a template text or a built-in
   * name such as 'chatml'). Models without a template use 'chatml'.
   */
  applyChatTemplate(messages: readonly ChatMessage[], options: { addAssistant?: boolean; template?: string } = {}): string {
    this.requireLive();
    if (!Array.isArray(messages)) throw new TypeError('messages must be an array of {role, content}');
    const template = options.template ?? this.info.chatTemplate ?? 'chatml';
    return this.handle.applyChatTemplate(template, messages, options.addAssistant ?? true);
  }

  async createContext(options: ContextOptions = {}): Promise<Context> {
    this.requireLive();
    const handle = await this.handle.createContext(Context.nativeOptions(options, defaultThreads()));
    const context = new Context(handle, this, () => this.contexts.delete(context));
    this.contexts.add(context);
    return context;
  }

  /**
   * One vector per text, from llama.cpp's embeddings: the texts are tokenized, packed into as few
   * decodes as fit (each text its own sequence, pooled by llama.cpp) on a worker thread, in an
   * embeddings context that the model keeps for the next call. Calls run one after another.
   * An empty text (no tokens) is a RangeError; a text longer than the model's training context
   * is E_CONTEXT_FULL. The vector length is `info.embeddingSize` for models without a projection.
   */
  async embed(texts: readonly string[], options: EmbedOptions = {}): Promise<Float32Array[]> {
    this.requireLive();
    if (!Array.isArray(texts)) throw new TypeError(`texts must be an array of strings, got ${describe(texts)}`);
    if (typeof options !== 'object' || options === null) throw new TypeError(`options must be an object, got ${describe(options)}`);
    const pooling = options.pooling ?? this.declaredPooling();
    if (!POOLINGS.includes(pooling)) throw new RangeError(`pooling must be one of ${POOLINGS.join(', ')}, got ${describe(pooling)}`);
    const normalize = options.normalize ?? true;
    if (typeof normalize !== 'boolean') throw new TypeError(`normalize must be a boolean, got ${describe(normalize)}`);
    const tokenLists = texts.map((text, i) => {
      requireString(text, `texts[${i}]`);
      const tokens = this.tokenize(text);
      if (tokens.length === 0) throw new RangeError(`texts[${i}] is empty: it has no token to embed`);
      if (tokens.length > this.info.trainedContextSize) {
        throw new KvstashError(
          'E_CONTEXT_FULL',
          `texts[${i}] has ${tokens.length} tokens, more than this model's context of ${this.info.trainedContextSize}: split it before embedding`,
        );
      }
      return tokens;
    });
    if (tokenLists.length === 0) return [];
    const longest = Math.max(...tokenLists.map((tokens) => tokens.length));
    const total = tokenLists.reduce((sum, tokens) => sum + tokens.length, 0);
    const batchTokens = Math.min(this.info.trainedContextSize, roundUp(Math.max(longest, Math.min(total, EMBED_BATCH_TOKENS)), 64));
    return this.embeddings.run(async () => {
      this.requireLive();
      return this.handle.embed(tokenLists, { pooling, normalize, batchTokens, threads: defaultThreads() });
    });
  }

  createSampler(options: SamplingOptions = {}): Sampler {
    this.requireLive();
    return new Sampler(options, this.info.vocabSize);
  }

  /** Disposes every context of this model (each waits for its running work), then the weights. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    this.embeddings.closeWaiting(() => new KvstashError('E_DISPOSED', 'the model was disposed; load it again to use it'));
    await Promise.all([...this.contexts].map((context) => context.dispose()));
    await this.embeddings.drain();
    this.handle.dispose();
  }

  private declaredPooling(): EmbeddingPooling {
    return GGUF_POOLING[this.handle.metadata()[`${this.info.architecture}.pooling_type`] ?? ''] ?? 'mean';
  }

  private requireLive(): void {
    if (this.disposed) throw new KvstashError('E_DISPOSED', 'the model was disposed; load it again to use it');
  }

  /** A token id of this model: a non-integer is a TypeError, anything outside the vocabulary
   * (2^32 + 5 included: it must not wrap to 5) E_TOKEN_INVALID. */
  private checkToken(token: unknown): number {
    if (typeof token !== 'number' || !Number.isInteger(token)) throw new TypeError(`token must be an integer, got ${describe(token)}`);
    if (token < 0 || token >= this.info.vocabSize) {
      throw new KvstashError('E_TOKEN_INVALID', `token ${token} is not a token of this model (vocabulary size ${this.info.vocabSize})`);
    }
    return token;
  }
}

function roundUp(value: number, step: number): number {
  return Math.ceil(value / step) * step;
}

/** Every core the process may use: llama.cpp's compute is the only heavy work in a kvstash process. */
export function defaultThreads(): number {
  const logical = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  return Math.max(1, logical);
}
