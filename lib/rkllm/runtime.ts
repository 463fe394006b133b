import {
  native,
  type NativeRkllmInferMode,
  type NativeRkllmParams,
  type NativeRkllmPerf,
  type NativeRkllmRuntime,
  type NativeRkllmSampling,
  type NativeRkllmVersion,
} from '../binding.js';
import { KvstashError } from '../errors.js';
import { OperationQueue, abortError } from '../llama/queue.js';
import { requireInteger, requireNumber, requireString, toInt32Array } from '../util/validate.js';
import { stopAtExit } from '../util/stop-at-exit.js';

export type RkllmRuntimeVersion = NativeRkllmVersion;
export type RkllmInferMode = NativeRkllmInferMode;
export type RkllmSampling = NativeRkllmSampling;
export type RkllmPerf = NativeRkllmPerf;

/**
 * RKLLMParam and its extend_param, every field optional: what is left out keeps the value of the
 * runtime's rkllm_createDefaultParam(). Units: tokens for lengths, plain factors otherwise.
 */
export interface RkllmParams {
  /** KV cache length. Default: the runtime's (the fake's is 512). Unit: tokens. */
  maxContextLen?: number;
  /** Tokens generated per run at most; -1 = the runtime's limit. With runtime 1.2.x this is the only
   * limit (1.3.0 also takes one per run). Unit: tokens. */
  maxNewTokens?: number;
  topK?: number;
  /** Tokens kept at the start when the context window shifts; -1 = the runtime's choice. */
  nKeep?: number;
  topP?: number;
  temperature?: number;
  repeatPenalty?: number;
  frequencyPenalty?: number;
  presencePenalty?: number;
  /** 0 off, 1 or 2. */
  mirostat?: number;
  mirostatTau?: number;
  mirostatEta?: number;
  skipSpecialToken?: boolean;
  /** Runtime 1.3.0 only. */
  ignoreEosToken?: boolean;
  /** Must be false (the default): kvstash already runs every call off the main thread. */
  isAsync?: false;
  /** Runtime 1.2.x only: image tags of multimodal prompts. */
  imgStart?: string | null;
  imgEnd?: string | null;
  imgContent?: string | null;
  baseDomainId?: number;
  /** Read word embeddings from flash instead of RAM (saves memory, costs speed). */
  embedFlash?: boolean;
  /** CPU cores the runtime may use, and which (bit i = core i; RK3588's big cores are 0xF0). */
  enabledCpusNum?: number;
  enabledCpusMask?: number;
  /** Sequences processed together in one forward pass. Default 1. */
  nBatch?: number;
  useCrossAttn?: boolean;
}

export interface OpenRkllmRuntimeOptions extends RkllmParams {
  /** Path of librkllmrt.so. Default: $RKLLM_LIB_PATH, else the system library search path. */
  libraryPath?: string;
  /** The ABI the library speaks: '1.3.0', or '1.2.1' for every 1.2.x runtime from 1.2.1 on. Optional:
   * kvstash reads it from the library, and a declared version that contradicts the library is refused
   * (E_RKLLM_VERSION) instead of crashing. Needed only for a library whose layout is not conclusive. */
  runtimeVersion?: RkllmRuntimeVersion;
}

export interface RkllmRunOptions {
  /** Text input (the runtime applies its chat template). Exactly one of prompt, tokens, embedding. */
  prompt?: string;
  tokens?: Int32Array | readonly number[];
  /** Embedding rows of `embeddingTokens` tokens, row-major. */
  embedding?: Float32Array;
  embeddingTokens?: number;
  /** Message role: 'user' (default) or 'tool' (a function result). */
  role?: string;
  /** Thinking mode of models that have one (Qwen3). Default false. */
  enableThinking?: boolean;
  /** Keep this turn in the KV cache for the next run. Default false. */
  keepHistory?: boolean;
  /** 'generate' (default), 'lastHiddenLayer' or 'logits'. */
  mode?: RkllmInferMode;
  /** A LoRA adapter loaded with loadLora(). */
  loraName?: string;
  /** Save the prompt cache of this run's prompt to this path (prompt_cache_params). */
  savePromptCache?: string;
  /** Runtime 1.3.0 only: sampling for this run; fields left out keep the init values. */
  sampling?: Partial<RkllmSampling>;
  /** Runtime 1.3.0 only: most tokens to generate in this run. Default: the init maxNewTokens. */
  maxNewTokens?: number;
  /** Called once per generated token, in order, all before run() resolves, with the text that token
   * completes: whole characters only ('' for a token that ends inside a multi-byte character, whose
   * rest comes with the next one). */
  onToken?: (text: string, tokenId: number) => void;
  /** Aborts the run (rkllm_abort), or takes it out of the queue at once if it has not started; it
   * rejects with E_ABORTED. */
  signal?: AbortSignal;
}

export interface RkllmRunResult {
  text: string;
  /** The text each generated token completes, in order (concatenated: `text`); whole characters only. */
  chunks: string[];
  tokenIds: Int32Array;
  /** Prefill/generate time (ms) and tokens, peak memory (MB), as the runtime reports them. */
  perf: RkllmPerf;
  /** mode 'lastHiddenLayer': `tokens` rows of `embdSize` floats. */
  hiddenStates?: { data: Float32Array; embdSize: number; tokens: number };
  /** mode 'logits': `tokens` rows of `vocabSize` floats. */
  logits?: { data: Float32Array; vocabSize: number; tokens: number };
}

const INIT_KEYS: ReadonlySet<string> = new Set([
  'maxContextLen', 'maxNewTokens', 'topK', 'nKeep', 'topP', 'temperature', 'repeatPenalty', 'frequencyPenalty',
  'presencePenalty', 'mirostat', 'mirostatTau', 'mirostatEta', 'skipSpecialToken', 'ignoreEosToken', 'isAsync', 'imgStart', 'imgEnd',
  'imgContent', 'baseDomainId', 'embedFlash', 'enabledCpusNum', 'enabledCpusMask', 'nBatch', 'useCrossAttn',
]);

/** Picks the RKLLMParam fields out of an options object that may carry others (libraryPath, ...). */
export function pickRkllmParams(options: object): RkllmParams {
  const params: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(options)) if (INIT_KEYS.has(key) && value !== undefined) params[key] = value;
  return params as RkllmParams;
}

/**
 * One librkllmrt.so with one initialised RKLLM handle. Operations run one at a time in call order
 * (the runtime must never see two at once); abort() and isRunning() act at once. dispose() aborts a
 * running run (it rejects with E_DISPOSED), waits for it, then frees the handle and the library.
 */
export class RkllmRuntime {
  /** The parameters the handle was created with (the runtime's defaults filled in). */
  readonly params: NativeRkllmParams;
  readonly version: RkllmRuntimeVersion;
  /** The library that was loaded, and where that path came from. */
  readonly libraryPath: string;
  readonly librarySource: string;
  private readonly queue = new OperationQueue();
  private disposing: Promise<void> | undefined;
  private readonly unregisterExitStop: () => void;

  /**
   * Loads librkllmrt.so and creates a handle for the model (rkllm_init, off the main thread).
   * Rejects with E_RKLLM_UNAVAILABLE when the library or one of its functions is missing,
   * E_MODEL_LOAD when the model file is, E_RKLLM_CALL when rkllm_init fails.
   */
  static async open(modelPath: string, options: OpenRkllmRuntimeOptions = {}): Promise<RkllmRuntime> {
    requireString(modelPath, 'modelPath');
    const version = options.runtimeVersion;
    if (options.libraryPath !== undefined) requireString(options.libraryPath, 'libraryPath');
    const handle = new (native().RkllmRuntime)(options.libraryPath, version);
    try {
      const params = await handle.init({ ...pickRkllmParams(options), modelPath });
      return new RkllmRuntime(handle, params);
    } catch (err) {
      await handle.dispose(); // closes the library again: nothing is left behind
      throw err;
    }
  }

  /** @internal Use RkllmRuntime.open(). */
  constructor(
    /** @internal */ readonly handle: NativeRkllmRuntime,
    params: NativeRkllmParams,
  ) {
    const info = handle.info();
    this.params = params;
    this.version = info.version;
    this.libraryPath = info.libraryPath;
    this.librarySource = info.librarySource;
    // Runs are aborted on 'exit'; the native layer then destroys the handles (atexit).
    this.unregisterExitStop = stopAtExit(handle, (live) => live.abort());
  }

  get isDisposed(): boolean {
    return this.disposing !== undefined;
  }

  /** Operations queued or running. */
  get pendingOperations(): number {
    return this.queue.size;
  }

  /**
   * One rkllm_run. Text streams through `onToken` as the runtime delivers it; the promise resolves
   * with the whole text, the token ids and the runtime's perf stats (or the hidden states/logits).
   */
  run(options: RkllmRunOptions): Promise<RkllmRunResult> {
    if (typeof options !== 'object' || options === null) return Promise.reject(new TypeError('run: options must be an object'));
    const { onToken, signal, tokens, ...rest } = options;
    if (onToken !== undefined && typeof onToken !== 'function') return Promise.reject(new TypeError('run: onToken must be a function'));
    let nativeTokens: Int32Array | undefined;
    try {
      if (tokens !== undefined) nativeTokens = toInt32Array(tokens, 'tokens');
    } catch (err) {
      return Promise.reject(err);
    }
    return this.enqueue(signal, async () => {
      // Chunks reach JS through a queue that may deliver the last ones after the run resolved:
      // decode them in index order, and from the result whatever had not arrived yet. They are the
      // runtime's bytes: one streaming decoder (as the llama.cpp side's TextStream) holds back a
      // character split across two tokens until it is complete.
      const decoder = new TextDecoder('utf-8');
      const chunks: string[] = [];
      let settled = false;
      const take = (bytes: Uint8Array, tokenId: number, index: number): void => {
        if (settled || index !== chunks.length) return;
        const text = decoder.decode(bytes, { stream: true });
        chunks.push(text);
        onToken?.(text, tokenId);
      };
      // A failing rkllm_abort must not throw out of the listener (Node would rethrow it as an
      // uncaught exception): the native side has already asked the run to stop from its callback,
      // and the run rejects with E_ABORTED, the failure as its cause.
      let abortFailure: unknown;
      const abort = (): void => {
        try {
          this.handle.abort();
        } catch (err) {
          abortFailure = err;
        }
      };
      signal?.addEventListener('abort', abort, { once: true });
      try {
        const result = await this.handle.run({ ...rest, ...(nativeTokens ? { tokens: nativeTokens } : {}) }, take);
        for (let i = chunks.length; i < result.chunks.length; i++) take(result.chunks[i]!, result.tokenIds[i]!, i);
        settled = true;
        // A character still incomplete at the end is invalid: it ends the text as U+FFFD.
        const tail = decoder.decode();
        if (tail !== '') {
          if (chunks.length === 0) chunks.push(tail);
          else chunks[chunks.length - 1] += tail;
        }
        if ((rest.mode ?? 'generate') === 'generate' && !result.finished) {
          throw new KvstashError(
            'E_RKLLM_CALL',
            `rkllm_run returned without reporting RKLLM_RUN_FINISH after ${chunks.length} tokens: the runtime stopped ` +
              'the generation early (its log on stderr may say why); the text is incomplete',
          );
        }
        const { finished: _finished, chunks: _bytes, ...out } = result;
        return { ...out, text: chunks.join(''), chunks };
      } catch (err) {
        if (signal?.aborted && (err as KvstashError).code === 'E_ABORTED') {
          const aborted = abortError(signal);
          if (abortFailure !== undefined) {
            aborted.message += ` (rkllm_abort failed: ${(abortFailure as Error).message}; the run was stopped from its callback)`;
          }
          throw aborted;
        }
        throw err;
      } finally {
        settled = true;
        signal?.removeEventListener('abort', abort);
      }
    });
  }

  /** Stops the running run, if any (it rejects with E_ABORTED). */
  abort(): void {
    if (!this.disposing) this.handle.abort();
  }

  /** What rkllm_is_running answers (normalised: true while a task runs). */
  isRunning(): boolean {
    return this.handle.isRunning();
  }

  /**
   * rkllm_clear_kv_cache. Without ranges: clears everything (but the system prompt when
   * `keepSystemPrompt`). Ranges [start[i], end[i]) per batch apply only to a paused run with
   * keepHistory off, as the runtime documents.
   */
  clearKvCache(options: { keepSystemPrompt?: boolean; start?: Int32Array | readonly number[]; end?: Int32Array | readonly number[] } = {}): Promise<void> {
    return this.enqueue(undefined, async () => {
      const keep = options.keepSystemPrompt ?? false;
      if (typeof keep !== 'boolean') throw new TypeError('clearKvCache: keepSystemPrompt must be a boolean');
      const start = options.start === undefined ? undefined : toInt32Array(options.start, 'start');
      const end = options.end === undefined ? undefined : toInt32Array(options.end, 'end');
      this.handle.clearKvCache(keep, start, end);
    });
  }

  /** Positions held in the KV cache, one number per batch (rkllm_get_kv_cache_size). */
  kvCacheSize(): Promise<number[]> {
    return this.enqueue(undefined, async () => this.handle.kvCacheSize());
  }

  /** rkllm_set_chat_template: the system prompt and what goes around every user input. */
  setChatTemplate(systemPrompt: string, promptPrefix: string, promptPostfix: string): Promise<void> {
    return this.enqueue(undefined, async () => this.handle.setChatTemplate(systemPrompt, promptPrefix, promptPostfix));
  }

  /** rkllm_set_function_tools. `tools`: the JSON text of the tool definitions, or the definitions. */
  setFunctionTools(systemPrompt: string, tools: string | readonly object[], toolResponseStr: string): Promise<void> {
    return this.enqueue(undefined, async () => {
      const json = typeof tools === 'string' ? tools : JSON.stringify(tools);
      if (typeof tools === 'string') JSON.parse(tools); // a SyntaxError here beats a silent runtime refusal
      this.handle.setFunctionTools(systemPrompt, json, toolResponseStr);
    });
  }

  /** rkllm_load_lora. `scale` defaults to 1. Use the name as `loraName` in run(). */
  loadLora(adapter: { path: string; name: string; scale?: number }): Promise<void> {
    return this.enqueue(undefined, async () => {
      requireString(adapter?.path, 'path');
      requireString(adapter.name, 'name');
      const scale = adapter.scale === undefined ? 1 : requireNumber(adapter.scale, 'scale', -1e6, 1e6);
      await this.handle.loadLora(adapter.path, adapter.name, scale);
    });
  }

  /** rkllm_load_prompt_cache: later runs whose prompt starts like the cached one skip that prefill. */
  loadPromptCache(path: string): Promise<void> {
    return this.enqueue(undefined, () => this.handle.loadPromptCache(path));
  }

  /** rkllm_release_prompt_cache. */
  releasePromptCache(): Promise<void> {
    return this.enqueue(undefined, async () => this.handle.releasePromptCache());
  }

  /** Aborts a running run, rejects what is queued with E_DISPOSED, frees the handle (rkllm_destroy),
   * closes the library. Idempotent. */
  dispose(): Promise<void> {
    if (!this.disposing) {
      // The native dispose aborts the running run at once; queued operations see `disposing` and
      // reject without touching the runtime.
      this.unregisterExitStop();
      // Operations still waiting reject at once, even when the running one never returns.
      this.queue.closeWaiting(disposedError);
      this.disposing = Promise.all([this.handle.dispose(), this.queue.drain()]).then(() => undefined);
    }
    return this.disposing;
  }

  private enqueue<T>(signal: AbortSignal | undefined, operation: () => Promise<T>): Promise<T> {
    if (this.disposing) return Promise.reject(disposedError());
    return this.queue.run(async () => {
      if (this.disposing) throw disposedError();
      return operation();
    }, signal);
  }
}

/** The runtime's and the model's queue: OperationQueue, whose waiting operations leave at once on
 * abort or closeWaiting (the same idea serves llama contexts). */
export { OperationQueue as RkllmQueue };

function disposedError(): KvstashError {
  return new KvstashError('E_DISPOSED', 'the RKLLM runtime was disposed; load the model again');
}

/** Checks a token limit the same way everywhere it is accepted. */
export function requireTokenLimit(value: unknown, name: string): number {
  return requireInteger(value, name, 1, 2147483647);
}
