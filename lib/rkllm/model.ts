import { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { KvstashError, type KvstashErrorCode } from '../errors.js';
import type { FinishReason } from '../generate/generate.js';
import type { ChatMessage } from '../llama/model.js';
import { requireString } from '../util/validate.js';
import { RkllmQueue, RkllmRuntime, requireTokenLimit, type OpenRkllmRuntimeOptions, type RkllmPerf, type RkllmSampling } from './runtime.js';
import {
  createSystemPromptCache,
  defaultRkllmCacheDir,
  prepareSystemPromptCache,
  removeSystemPromptCache,
  removeTemporaryPayload,
  rkllmModelIdentity,
  rkllmModelName,
  systemPromptCachePath,
  type PreparedSystemPromptCache,
  type SystemPromptCacheKey,
} from './system-prompt-cache.js';

/**
 * How the runtime wraps a conversation: `system` is the system block with `{system}` where the
 * system prompt goes; `prefix` and `postfix` go around every user input (rkllm_set_chat_template).
 */
export interface RkllmChatTemplate {
  system: string;
  prefix: string;
  postfix: string;
  /** What ends an assistant's reply in the conversation, before the next input (Sessions render
   * earlier turns with it). Default '' (CHATML_TEMPLATE: '<|im_end|>\n'). */
  turnEnd?: string;
}

/** ChatML, the template of the Qwen family that most RKLLM models are converted from. */
export const CHATML_TEMPLATE: Readonly<RkllmChatTemplate> = Object.freeze({
  system: '<|im_start|>system\n{system}<|im_end|>\n',
  prefix: '<|im_start|>user\n',
  postfix: '<|im_end|>\n<|im_start|>assistant\n',
  turnEnd: '<|im_end|>\n',
});

export interface LoadRkllmModelOptions extends OpenRkllmRuntimeOptions {
  /** Where system-prompt caches are kept; null turns them off. Default
   * `<user cache dir>/kvstash/rkllm/<model name>` ($XDG_CACHE_HOME or ~/.cache). */
  cacheDir?: string | null;
  /** The model's chat template, used once a system prompt is given. Default CHATML_TEMPLATE:
   * models of another family need theirs. */
  chatTemplate?: RkllmChatTemplate;
  /** The model's name (cache folder). Default: `<name>` of `models/<name>/<file>.rkllm`, else the
   * file name without `.rkllm`. */
  name?: string;
}

export interface RkllmGenerateOptions {
  /** The user's input. Give either prompt or messages. */
  prompt?: string;
  /** system messages become the system prompt; the last message (user or tool) is the input.
   * Earlier user/assistant turns are not supported yet (RKLLM templates one input per run). */
  messages?: readonly ChatMessage[];
  /** The system prompt. Its KV cache is made once per model and system prompt, then reused. */
  system?: string;
  /** Use (and create) the cache of the system prompt. Default true. */
  cache?: boolean;
  /** Most tokens to generate. Default: the model's maxNewTokens. Runtime 1.2.x accepts only that
   * value (its limit is fixed at load). Unit: tokens. */
  maxTokens?: number;
  /** Runtime 1.3.0 only: sampling for this generation; fields left out keep the load values. */
  sampling?: Partial<RkllmSampling>;
  /** Thinking mode of models that have one (Qwen3). Default false. */
  enableThinking?: boolean;
  /** Stops the generation: `result` rejects with E_ABORTED, the stream ends with that error. */
  signal?: AbortSignal;
  /** Called with each chunk of text as it is generated. */
  onToken?: (text: string) => void;
}

/** How the system prompt's KV cache was obtained for a generation. */
export type SystemPromptCacheUse =
  | 'none' // no system prompt, caching off, or no cache directory
  | 'resident' // already loaded by an earlier generation of this model object
  | 'loaded' // loaded from its cache entry (made by an earlier process or model object)
  | 'created' // made now, then loaded
  | 'failed'; // could not be made or loaded (a 'problem' event says why): full prefill

/** The llama.cpp GenerationResult's names where the two backends measure the same thing, plus the
 * RKLLM runtime's own perf stats (prefill/generate time and tokens, memory). */
export interface RkllmGenerationResult extends RkllmPerf {
  text: string;
  /** The generated token ids. */
  tokens: Int32Array;
  /** 'length' when maxTokens (or the model's maxNewTokens) was reached, else 'eog'. */
  finishReason: Extract<FinishReason, 'eog' | 'length'>;
  /** From the start of the generation (after waiting in the queue) to the first chunk; null when
   * nothing was generated. Includes loading or making the system prompt cache. Unit: ms. */
  ttftMs: number | null;
  /** The whole generation, from the same start. Unit: ms. */
  totalMs: number;
  systemPromptCache: SystemPromptCacheUse;
}

/**
 * A running generation: iterate it for text chunks as they come (each iterator starts from the
 * first chunk), or await `result`, which runs it to the end whether or not anyone iterates.
 * Leaving a for-await loop early does not stop the generation; abort with the signal.
 */
export interface RkllmGeneration extends AsyncIterable<string> {
  readonly result: Promise<RkllmGenerationResult>;
}

export interface RkllmCacheProblem {
  code: KvstashErrorCode | string;
  message: string;
  path?: string;
}

/**
 * Loads an .rkllm model with Rockchip's RKLLM runtime (librkllmrt.so, loaded at run time).
 * Rejects with E_RKLLM_UNAVAILABLE (no library, or a symbol missing), E_MODEL_LOAD (no model file)
 * or E_RKLLM_CALL (rkllm_init refused the model).
 */
export async function loadRkllmModel(path: string, options: LoadRkllmModelOptions = {}): Promise<RkllmModel> {
  requireString(path, 'path');
  const template = options.chatTemplate ?? CHATML_TEMPLATE;
  for (const part of ['system', 'prefix', 'postfix'] as const) requireString(template[part], `chatTemplate.${part}`);
  if (template.turnEnd !== undefined) requireString(template.turnEnd, 'chatTemplate.turnEnd');
  if (!template.system.includes('{system}')) throw new TypeError("chatTemplate.system must contain '{system}'");
  const name = options.name ?? rkllmModelName(path);
  requireString(name, 'name');
  const cacheDir = options.cacheDir === undefined ? defaultRkllmCacheDir(path) : options.cacheDir;
  if (cacheDir !== null) requireString(cacheDir, 'cacheDir');
  let identity: string;
  try {
    identity = await rkllmModelIdentity(path);
  } catch (err) {
    throw new KvstashError('E_MODEL_LOAD', `cannot read the RKLLM model '${path}': ${(err as Error).message}`, { cause: err });
  }
  const runtime = await RkllmRuntime.open(path, options);
  return new RkllmModel(runtime, path, name, cacheDir, { ...template }, identity);
}

/**
 * An .rkllm model on the NPU: one RKLLM handle, generations one at a time in call order. A system
 * prompt is applied through the runtime's chat template, and its prompt cache is created on first
 * use and loaded on every later start, so only the user's tokens are prefilled.
 *
 * Events: 'problem' (RkllmCacheProblem) when a cache could not be made or loaded; generation then
 * continues with a full prefill.
 */
export class RkllmModel extends EventEmitter {
  private readonly queue = new RkllmQueue();
  private disposing: Promise<void> | undefined;
  /** [rendered system prompt, caching] the runtime's template and loaded cache correspond to. */
  private templateState: string | undefined;
  /** How the cache of that system prompt was obtained: a failure is reported again, not retried,
   * until the system prompt changes (making it costs a run, and a model that refused once refuses
   * again). */
  private templateUse: SystemPromptCacheUse = 'none';
  /** The entry file of the loaded prompt cache. */
  private loadedCache: string | undefined;
  /** Who last changed the runtime's state (template, history, loaded cache) through exclusive(). */
  private stateOwner: object | undefined;

  /** @internal Use loadRkllmModel(). */
  constructor(
    /** The runtime, for lower-level calls (clearKvCache, setFunctionTools, loadLora, ...). Calls
     * made on it directly bypass the system-prompt bookkeeping of generate(). */
    readonly runtime: RkllmRuntime,
    /** The .rkllm file. */
    readonly path: string,
    readonly name: string,
    /** Where system-prompt caches are kept; null when caching is off. */
    readonly cacheDir: string | null,
    readonly chatTemplate: Readonly<RkllmChatTemplate>,
    /** Hash of the model file's size and sampled contents; caches record it. */
    readonly identity: string,
  ) {
    super();
  }

  get isDisposed(): boolean {
    return this.disposing !== undefined;
  }

  /** Generations queued or running. */
  get pendingGenerations(): number {
    return this.queue.size;
  }

  /**
   * Generates an answer. Bad arguments throw at once (TypeError/RangeError); everything else
   * rejects `result`: E_DISPOSED, E_ABORTED, E_RKLLM_CALL.
   */
  generate(options: RkllmGenerateOptions): RkllmGeneration {
    const request = this.prepare(options);
    const stream = new ChunkStream();
    // After dispose() nothing starts, and nothing waits: not even behind a run that never returns.
    const result = this.disposing
      ? Promise.reject(disposedModelError())
      : this.queue.run(() => this.runGeneration(request, stream), options.signal);
    result.then(
      () => stream.end(),
      (err: unknown) => stream.fail(err),
    );
    // Iterating alone must not leave an unhandled rejection behind; `result` still rejects for
    // whoever awaits it.
    result.catch(() => undefined);
    return { result, [Symbol.asyncIterator]: () => stream.iterator() };
  }

  /** Aborts a running generation (it rejects with E_DISPOSED), rejects queued ones, frees the
   * runtime. Idempotent. */
  dispose(): Promise<void> {
    if (!this.disposing) {
      this.queue.closeWaiting(disposedModelError);
      this.disposing = Promise.all([this.runtime.dispose(), this.queue.drain()]).then(() => undefined);
    }
    return this.disposing;
  }

  /**
   * @internal For sessions (lib/session/rkllm-backend.ts): runs `work` alone on the runtime, in this
   * model's queue (after the generations before it, before those after it). `intact` tells whether
   * the runtime's state is still as `owner`'s last exclusive() left it: false when another owner or
   * a generate() ran in between. The model's own bookkeeping is reset, since `work` changes the
   * template, the history and the loaded prompt cache.
   */
  exclusive<T>(owner: object, work: (runtime: RkllmRuntime, intact: boolean) => Promise<T>, signal?: AbortSignal): Promise<T> {
    if (this.disposing) return Promise.reject(disposedModelError());
    return this.queue.run(async () => {
      if (this.disposing) throw disposedModelError();
      const intact = this.stateOwner === owner;
      this.stateOwner = owner;
      this.templateState = undefined;
      // Whatever `work` loads is released before the next generate() loads the system prompt's.
      this.loadedCache = SESSION_CACHE;
      return work(this.runtime, intact);
    }, signal);
  }

  /**
   * @internal For sessions, inside exclusive(): the system prompt cache of `rendered` (the system
   * block, template applied), found or made as generate() does, ready to load; undefined when
   * caching is off or it could not be made (a 'problem' event says why).
   */
  async systemPromptCacheFor(rendered: string, signal?: AbortSignal): Promise<PreparedSystemPromptCache | undefined> {
    if (rendered === '' || this.cacheDir === null) return undefined;
    return (await this.findOrCreateCache(rendered, signal)).prepared;
  }

  private prepare(options: RkllmGenerateOptions): PreparedGeneration {
    if (typeof options !== 'object' || options === null) throw new TypeError('generate: options must be an object');
    let system = options.system;
    let prompt = options.prompt;
    let role = 'user';
    if (options.messages !== undefined) {
      if (prompt !== undefined) throw new TypeError('generate: give either prompt or messages, not both');
      if (!Array.isArray(options.messages) || options.messages.length === 0) {
        throw new TypeError('generate: messages must be a non-empty array of {role, content}');
      }
      const systemParts: string[] = [];
      options.messages.forEach((message: ChatMessage, i: number) => {
        requireString(message?.content, `messages[${i}].content`);
        requireString(message.role, `messages[${i}].role`);
        const last = i === options.messages!.length - 1;
        if (message.role === 'system') {
          if (last) throw new RangeError('generate: the last message must be the user (or tool) input, not system');
          systemParts.push(message.content);
        } else if (last) {
          if (message.role !== 'user' && message.role !== 'tool') {
            throw new RangeError(`generate: the last message must have role 'user' or 'tool', not '${message.role}'`);
          }
          prompt = message.content;
          role = message.role;
        } else {
          throw new RangeError(
            'generate: only system messages may come before the input: RKLLM templates one input per run (earlier ' +
              'turns are not supported yet)',
          );
        }
      });
      if (systemParts.length > 0) {
        if (system !== undefined) throw new TypeError('generate: give the system prompt as `system` or as a system message, not both');
        system = systemParts.join('\n\n');
      }
    }
    requireString(prompt, 'prompt');
    if (prompt === '') throw new RangeError('generate: prompt must not be empty');
    if (system !== undefined) requireString(system, 'system');
    const cache = options.cache ?? true;
    if (typeof cache !== 'boolean') throw new TypeError('generate: cache must be a boolean');
    const enableThinking = options.enableThinking ?? false;
    if (typeof enableThinking !== 'boolean') throw new TypeError('generate: enableThinking must be a boolean');
    if (options.onToken !== undefined && typeof options.onToken !== 'function') throw new TypeError('generate: onToken must be a function');
    let maxNewTokens: number | undefined;
    if (options.maxTokens !== undefined) {
      requireTokenLimit(options.maxTokens, 'maxTokens');
      if (this.runtime.version === '1.3.0') maxNewTokens = options.maxTokens;
      else if (options.maxTokens !== this.runtime.params.maxNewTokens) {
        throw new RangeError(
          `generate: runtime ${this.runtime.version} fixes the token limit when the model loads ` +
            `(maxNewTokens ${this.runtime.params.maxNewTokens}); pass maxNewTokens to loadRkllmModel instead`,
        );
      }
    }
    if (options.sampling !== undefined && this.runtime.version !== '1.3.0') {
      throw new RangeError(`generate: per-generation sampling needs runtime 1.3.0; with ${this.runtime.version} pass it to loadRkllmModel`);
    }
    return {
      prompt: prompt as string,
      role,
      system: system ?? '',
      cache,
      enableThinking,
      maxNewTokens,
      sampling: options.sampling,
      signal: options.signal,
      onToken: options.onToken,
    };
  }

  private async runGeneration(request: PreparedGeneration, stream: ChunkStream): Promise<RkllmGenerationResult> {
    if (this.disposing) throw disposedModelError();
    if (this.stateOwner !== undefined) {
      // A session keeps its conversation in the runtime's history: this generation starts clean.
      this.stateOwner = undefined;
      await this.runtime.clearKvCache();
    }
    const started = performance.now();
    const systemPromptCache = await this.useSystemPrompt(request.system, request.cache, request.signal);
    let firstChunkAt: number | undefined;
    const run = await this.runtime.run({
      prompt: request.prompt,
      role: request.role,
      enableThinking: request.enableThinking,
      keepHistory: false,
      ...(request.maxNewTokens !== undefined ? { maxNewTokens: request.maxNewTokens } : {}),
      ...(request.sampling !== undefined ? { sampling: request.sampling } : {}),
      signal: request.signal,
      onToken: (text) => {
        if (text === '') return; // a token that ends inside a character: its text comes with the next
        firstChunkAt ??= performance.now();
        stream.push(text);
        request.onToken?.(text);
      },
    });
    const limit = request.maxNewTokens ?? this.runtime.params.maxNewTokens;
    return {
      text: run.text,
      tokens: run.tokenIds,
      finishReason: limit > 0 && run.tokenIds.length >= limit ? 'length' : 'eog',
      ...run.perf,
      ttftMs: firstChunkAt === undefined ? null : firstChunkAt - started,
      totalMs: performance.now() - started,
      systemPromptCache,
    };
  }

  /**
   * Puts the system prompt into the runtime's chat template, with its prompt cache loaded. A
   * change of system prompt releases the previous cache first.
   */
  private async useSystemPrompt(system: string, cache: boolean, signal: AbortSignal | undefined): Promise<SystemPromptCacheUse> {
    const rendered = system === '' ? '' : this.chatTemplate.system.replace('{system}', () => system);
    const caching = cache && rendered !== '' && this.cacheDir !== null;
    const state = JSON.stringify([rendered, caching]);
    if (state === this.templateState) return this.loadedCache ? 'resident' : this.templateUse === 'failed' ? 'failed' : 'none';

    this.templateState = undefined; // until the runtime is known to match again
    if (this.loadedCache !== undefined) {
      await this.runtime.releasePromptCache();
      this.loadedCache = undefined;
    }
    let use: SystemPromptCacheUse = 'none';
    let prepared: PreparedSystemPromptCache | undefined;
    if (caching) ({ use, prepared } = await this.findOrCreateCache(rendered, signal));
    try {
      await this.runtime.setChatTemplate(rendered, this.chatTemplate.prefix, this.chatTemplate.postfix);
      if (prepared !== undefined) {
        try {
          await this.runtime.loadPromptCache(prepared.payloadPath);
          this.loadedCache = prepared.entryPath;
        } catch (err) {
          if (!isCacheProblem(err)) throw err;
          this.report(err, prepared.entryPath);
          // An entry the runtime refuses would be refused on every start: make it again next time.
          await removeSystemPromptCache(prepared.entryPath).catch(() => undefined);
          use = 'failed';
        }
      }
    } finally {
      // The runtime has read the extracted file; the entry is what stays.
      if (prepared !== undefined) await removeTemporaryPayload(prepared.payloadPath);
    }
    this.templateState = state;
    this.templateUse = use;
    return use;
  }

  private cacheKey(rendered: string): SystemPromptCacheKey {
    return {
      runtimeVersion: this.runtime.version,
      modelIdentity: this.identity,
      modelName: this.name,
      systemPrompt: rendered,
      maxContextLen: this.runtime.params.maxContextLen,
      nBatch: this.runtime.params.nBatch,
    };
  }

  private async findOrCreateCache(
    rendered: string,
    signal: AbortSignal | undefined,
  ): Promise<{ use: SystemPromptCacheUse; prepared?: PreparedSystemPromptCache }> {
    const cacheDir = this.cacheDir!;
    const key = this.cacheKey(rendered);
    try {
      const existing = await prepareSystemPromptCache(cacheDir, key);
      if (existing !== undefined) return { use: 'loaded', prepared: existing };
    } catch (err) {
      // Corrupt or mismatched: never loaded. Reported, then made again (replacing the entry).
      if (!isCacheProblem(err)) throw err;
      const entryPath = systemPromptCachePath(cacheDir, key);
      this.report(err, entryPath);
      await removeSystemPromptCache(entryPath).catch(() => undefined);
    }
    try {
      // The cache must hold exactly the fixed prefix, since the runtime matches later prompts
      // against it from the start: evaluate the system block alone, as raw text (empty template),
      // without generating.
      await this.runtime.setChatTemplate('', '', '');
      const prepared = await createSystemPromptCache(cacheDir, key, async (temporary) => {
        await this.runtime.run({ prompt: rendered, mode: 'lastHiddenLayer', keepHistory: false, savePromptCache: temporary, signal });
      });
      return { use: 'created', prepared };
    } catch (err) {
      if (!isCacheProblem(err)) throw err;
      this.report(err, undefined);
      return { use: 'failed' };
    }
  }

  private report(err: unknown, path: string | undefined): void {
    const problem: RkllmCacheProblem = {
      code: (err as KvstashError).code ?? 'E_STATE_SAVE',
      message: (err as Error).message ?? String(err),
      ...(path !== undefined ? { path } : {}),
    };
    this.emit('problem', problem);
  }
}

/** Stands for a prompt cache a session loaded (not an entry of this model's cacheDir). */
const SESSION_CACHE = '(a session checkpoint)';

function disposedModelError(): KvstashError {
  return new KvstashError('E_DISPOSED', 'the RKLLM model was disposed; load it again');
}

/** Failures that only cost the cache; disposal and aborts end the generation instead. */
function isCacheProblem(err: unknown): boolean {
  const code = (err as KvstashError | undefined)?.code;
  return code !== 'E_DISPOSED' && code !== 'E_ABORTED';
}

interface PreparedGeneration {
  prompt: string;
  role: string;
  system: string;
  cache: boolean;
  enableThinking: boolean;
  maxNewTokens: number | undefined;
  sampling: Partial<RkllmSampling> | undefined;
  signal: AbortSignal | undefined;
  onToken: ((text: string) => void) | undefined;
}

/** The chunks of one generation, kept so that every iterator sees all of them from the start. */
class ChunkStream {
  private readonly chunks: string[] = [];
  private finished = false;
  private error: unknown;
  private failed = false;
  private wake: Array<() => void> = [];

  push(chunk: string): void {
    this.chunks.push(chunk);
    this.notify();
  }

  end(): void {
    this.finished = true;
    this.notify();
  }

  fail(err: unknown): void {
    this.failed = true;
    this.error = err;
    this.notify();
  }

  iterator(): AsyncIterator<string> {
    let next = 0;
    let closed = false;
    return {
      next: async (): Promise<IteratorResult<string>> => {
        for (;;) {
          if (closed) return { value: undefined, done: true };
          if (next < this.chunks.length) return { value: this.chunks[next++]!, done: false };
          if (this.failed) throw this.error;
          if (this.finished) return { value: undefined, done: true };
          await new Promise<void>((resolve) => this.wake.push(resolve));
        }
      },
      return: async (): Promise<IteratorResult<string>> => {
        closed = true;
        return { value: undefined, done: true };
      },
    };
  }

  private notify(): void {
    const waiting = this.wake;
    this.wake = [];
    for (const resolve of waiting) resolve();
  }
}
