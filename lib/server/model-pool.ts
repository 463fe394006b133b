/**
 * The models a server offers: discovered in `models/<name>/`, loaded on first use, shared by every
 * request through sequence leases, unloaded when idle or when a memory budget needs the room
 * (least recently used first).
 *
 * A llama.cpp model gets one context with `parallel` sequences: concurrent requests lease
 * different sequences and generate() batches their decode steps together. An RKLLM model runs one
 * generation at a time, so its single "sequence" 0 is leased by one request at a time.
 */
import fs from 'node:fs';
import path from 'node:path';
import { PromptCache } from '../cache/prompt-cache.js';
import type { Context } from '../llama/context.js';
import { defaultThreads, loadModel, type Model } from '../llama/model.js';
import { rememberPrefixTokens, templateLabel, templatePrefix, TEMPLATE_LABEL_PREFIX } from '../generate/generate.js';
import { loadRkllmModel, type RkllmChatTemplate, type RkllmModel } from '../rkllm/model.js';
import type { RkllmRuntimeVersion } from '../rkllm/runtime.js';
import { ApiError } from './http.js';

export type ModelKind = 'llama' | 'rkllm';

export interface SequenceLease {
  sequence: number;
  /** Gives the sequence back (idempotent). */
  release(): void;
}

export interface ServedModel {
  id: string;
  kind: ModelKind;
  model: Model | RkllmModel;
  /** The shared context (llama); null for RKLLM. */
  context: Context | null;
  /** The model's prompt cache (llama); null for RKLLM (its system-prompt caches live in the model). */
  cache: PromptCache | null;
  /** The system prompt of --system-prompt-file, used by requests that bring none. */
  defaultSystem: string | undefined;
  /**
   * A sequence for one generation. Waits while all are leased; rejects with ApiError 429 when the
   * model's queue is full, with the signal's reason when aborted while waiting.
   */
  lease(signal?: AbortSignal): Promise<SequenceLease>;
}

/** One entry of GET /v1/models (OpenAI's fields, then kvstash's). */
export interface ModelListing {
  id: string;
  object: 'model';
  created: number;
  owned_by: 'kvstash';
  kind: ModelKind;
  loaded: boolean;
}

/** Settings a `models/<name>/model.json` may give. Unknown keys are refused (typos). */
export interface ModelSettings {
  /** The model file in the folder. Default: the only one, or the first by name (with a warning). */
  file?: string;
  contextSize?: number;
  parallel?: number;
  /** RKLLM: the runtime's ABI, library, limits and template. */
  runtimeVersion?: RkllmRuntimeVersion;
  libraryPath?: string;
  maxContextLen?: number;
  maxNewTokens?: number;
  chatTemplate?: RkllmChatTemplate;
}

const SETTINGS_KEYS = new Set(['file', 'contextSize', 'parallel', 'runtimeVersion', 'libraryPath', 'maxContextLen', 'maxNewTokens', 'chatTemplate']);
const MODEL_FILE = /\.(gguf|rkllm)$/i;

export interface ModelPoolOptions {
  /** The models folder: `<dir>/<id>/<file>.gguf|.rkllm`. */
  dir: string;
  /** Prompt caches go to `<cacheDir>/<id>/`; null keeps them in RAM only. */
  cacheDir: string | null;
  /** Compute threads per context. Default: every core. */
  threads?: number;
  /** KV cells of each model's context, shared by its sequences. Default min(trained, 4096). Unit: tokens. */
  contextSize?: number;
  /** Sequences per model, i.e. requests generating at once. Default 4. */
  parallel?: number;
  /** Warmed into each model's cache when it loads, and the system prompt of requests without one. */
  systemPrompt?: string;
  /** Unload a model unused this long; 0 never. Default 0. Unit: ms. */
  idleUnloadMs?: number;
  /** Loaded models' estimated memory (weights + KV) above which the least recently used idle ones
   * are unloaded. Default: unbounded. Unit: bytes. */
  maxMemoryBytes?: number;
  /** Requests waiting for a sequence, per model, before 429. Default 64. */
  maxQueue?: number;
  /** Seconds a 429 tells the client to wait (Retry-After). Default 1. */
  retryAfterSeconds?: number;
  /** Warnings and load/unload notes. Default: stderr. */
  log?: (line: string) => void;
}

interface Discovered {
  id: string;
  kind: ModelKind;
  file: string;
  settings: ModelSettings;
  created: number;
}

interface Waiter {
  resolve: (lease: SequenceLease) => void;
  reject: (err: unknown) => void;
  signal: AbortSignal | undefined;
  onAbort: () => void;
}

class LoadedModel implements ServedModel {
  readonly kind: ModelKind;
  active = 0;
  lastUsed = Date.now();
  unloaded = false;
  private readonly free: number[];
  private readonly waiting: Waiter[] = [];
  private idleTimer: NodeJS.Timeout | undefined;
  private idleWaiters: Array<() => void> = [];

  constructor(
    readonly id: string,
    readonly model: Model | RkllmModel,
    readonly context: Context | null,
    readonly cache: PromptCache | null,
    readonly defaultSystem: string | undefined,
    /** Estimated resident memory. Unit: bytes. */
    readonly bytes: number,
    private readonly pool: ModelPool,
  ) {
    this.kind = context ? 'llama' : 'rkllm';
    const sequences = context ? context.info.sequences : 1;
    // pop() hands out sequence 0 first: one request at a time always uses the same sequence.
    this.free = Array.from({ length: sequences }, (_, i) => sequences - 1 - i);
  }

  get sequences(): number {
    return this.context ? this.context.info.sequences : 1;
  }

  get queued(): number {
    return this.waiting.length;
  }

  lease(signal?: AbortSignal): Promise<SequenceLease> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.unloaded) return Promise.reject(new ApiError(503, `model '${this.id}' was just unloaded; retry`, { code: 'model_unloaded' }));
    this.lastUsed = Date.now();
    clearTimeout(this.idleTimer);
    const sequence = this.free.pop();
    if (sequence !== undefined) return Promise.resolve(this.grant(sequence));
    if (this.waiting.length >= this.pool.maxQueue) {
      const seconds = this.pool.retryAfterSeconds;
      return Promise.reject(
        new ApiError(429, `model '${this.id}' has ${this.sequences} busy sequence(s) and ${this.waiting.length} queued request(s); retry after ${seconds} s`, {
          code: 'queue_full',
          headers: { 'retry-after': String(seconds) },
        }),
      );
    }
    return new Promise<SequenceLease>((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        signal,
        onAbort: () => {
          const at = this.waiting.indexOf(waiter);
          if (at >= 0) this.waiting.splice(at, 1);
          reject(signal!.reason);
        },
      };
      signal?.addEventListener('abort', waiter.onAbort, { once: true });
      this.waiting.push(waiter);
    });
  }

  private grant(sequence: number): SequenceLease {
    this.active++;
    let released = false;
    return {
      sequence,
      release: () => {
        if (released) return;
        released = true;
        this.active--;
        this.lastUsed = Date.now();
        const next = this.waiting.shift();
        if (next) {
          next.signal?.removeEventListener('abort', next.onAbort);
          next.resolve(this.grant(sequence));
          return;
        }
        this.free.push(sequence);
        if (this.active === 0) this.becameIdle();
      },
    };
  }

  private becameIdle(): void {
    for (const wake of this.idleWaiters.splice(0)) wake();
    const idleMs = this.pool.idleUnloadMs;
    if (idleMs > 0) {
      this.idleTimer = setTimeout(() => void this.pool.unload(this.id, 'idle'), idleMs);
      this.idleTimer.unref();
    }
  }

  /** Resolves when no sequence is leased. */
  whenIdle(): Promise<void> {
    if (this.active === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  async dispose(): Promise<void> {
    this.unloaded = true;
    clearTimeout(this.idleTimer);
    for (const waiter of this.waiting.splice(0)) {
      waiter.signal?.removeEventListener('abort', waiter.onAbort);
      waiter.reject(new ApiError(503, `model '${this.id}' is shutting down`, { code: 'model_unloaded' }));
    }
    await this.cache?.flush().catch(() => undefined);
    await this.context?.dispose();
    await this.model.dispose();
  }
}

export class ModelPool {
  readonly dir: string;
  readonly maxQueue: number;
  readonly retryAfterSeconds: number;
  readonly idleUnloadMs: number;
  private readonly options: ModelPoolOptions;
  private readonly log: (line: string) => void;
  private readonly loaded = new Map<string, LoadedModel>();
  private readonly loading = new Map<string, Promise<LoadedModel>>();
  private readonly warned = new Set<string>();
  private closed = false;

  constructor(options: ModelPoolOptions) {
    this.options = options;
    this.dir = path.resolve(options.dir);
    this.maxQueue = options.maxQueue ?? 64;
    this.retryAfterSeconds = options.retryAfterSeconds ?? 1;
    this.idleUnloadMs = options.idleUnloadMs ?? 0;
    this.log = options.log ?? ((line) => process.stderr.write(`${line}\n`));
    if (!fs.statSync(this.dir, { throwIfNoEntry: false })?.isDirectory()) throw new TypeError(`the models folder ${this.dir} does not exist`);
  }

  /** Every model in the folder (scanned now: models added while the server runs appear). */
  list(): ModelListing[] {
    return this.discover().map((found) => ({ id: found.id, object: 'model', created: found.created, owned_by: 'kvstash', kind: found.kind, loaded: this.loaded.has(found.id) }));
  }

  /** The model `id`, loading it on first use. ApiError 404 model_not_found for an unknown id. */
  async get(id: string): Promise<ServedModel> {
    if (this.closed) throw new ApiError(503, 'the server is shutting down', { code: 'shutting_down' });
    const ready = this.loaded.get(id);
    if (ready) {
      ready.lastUsed = Date.now();
      return ready;
    }
    let pending = this.loading.get(id);
    if (!pending) {
      const found = typeof id === 'string' ? this.discover().find((model) => model.id === id) : undefined;
      if (!found) throw new ApiError(404, `The model '${String(id)}' does not exist`, { code: 'model_not_found', param: 'model', retryable: false });
      pending = this.load(found).finally(() => this.loading.delete(id));
      this.loading.set(id, pending);
    }
    return pending;
  }

  /** Models loading now (GET /health answers 503 meanwhile). */
  get loadingCount(): number {
    return this.loading.size;
  }

  /** Figures for /metrics. */
  stats(): { loaded: number; queued: number; active: number; bytes: number; models: Array<{ id: string; kind: ModelKind; active: number; queued: number; sequences: number; cache: PromptCache | null }> } {
    const models = [...this.loaded.values()].map((m) => ({ id: m.id, kind: m.kind, active: m.active, queued: m.queued, sequences: m.sequences, cache: m.cache }));
    return {
      loaded: models.length,
      queued: models.reduce((sum, m) => sum + m.queued, 0),
      active: models.reduce((sum, m) => sum + m.active, 0),
      bytes: [...this.loaded.values()].reduce((sum, m) => sum + m.bytes, 0),
      models,
    };
  }

  /** Unloads a model once its running requests are done (idle timeout, memory budget, shutdown). */
  async unload(id: string, why: string): Promise<void> {
    const model = this.loaded.get(id);
    if (!model || model.active > 0 || model.queued > 0) return;
    this.loaded.delete(id);
    this.log(`kvstash serve: unloading model ${id} (${why})`);
    await model.dispose();
  }

  /** Waits for leased sequences to be released (at most `timeoutMs`), then unloads every model. */
  async close(timeoutMs = 30_000): Promise<void> {
    this.closed = true;
    await Promise.allSettled([...this.loading.values()]);
    const models = [...this.loaded.values()];
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all(models.map((m) => m.whenIdle())), new Promise((resolve) => (timer = setTimeout(resolve, timeoutMs)))]);
    clearTimeout(timer);
    this.loaded.clear();
    await Promise.allSettled(models.map((m) => m.dispose()));
  }

  private discover(): Discovered[] {
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(this.dir, { withFileTypes: true });
    } catch {
      return [];
    }
    const found: Discovered[] = [];
    for (const entry of entries.filter((e) => e.isDirectory()).sort((a, b) => a.name.localeCompare(b.name))) {
      const folder = path.join(this.dir, entry.name);
      const settings = this.readSettings(entry.name, folder);
      if (!settings) continue;
      const files = fs
        .readdirSync(folder)
        .filter((name) => MODEL_FILE.test(name))
        .sort();
      let file = settings.file;
      if (file !== undefined) {
        if (path.basename(file) !== file || !files.includes(file)) {
          this.warnOnce(`${entry.name}:file`, `kvstash serve: models/${entry.name}/model.json names "${file}", which is not a .gguf/.rkllm file in that folder; model skipped`);
          continue;
        }
      } else {
        if (files.length === 0) continue;
        file = files[0]!;
        if (files.length > 1) {
          this.warnOnce(`${entry.name}:several`, `kvstash serve: models/${entry.name} has ${files.length} model files (${files.join(', ')}); using ${file} (name one in model.json: {"file": "..."})`);
        }
      }
      const full = path.join(folder, file);
      const stat = fs.statSync(full, { throwIfNoEntry: false });
      if (!stat?.isFile()) continue;
      found.push({ id: entry.name, kind: /\.rkllm$/i.test(file) ? 'rkllm' : 'llama', file: full, settings, created: Math.floor(stat.mtimeMs / 1000) });
    }
    return found;
  }

  private readSettings(id: string, folder: string): ModelSettings | undefined {
    const file = path.join(folder, 'model.json');
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch {
      return {};
    }
    try {
      const settings = JSON.parse(text) as unknown;
      if (typeof settings !== 'object' || settings === null || Array.isArray(settings)) throw new Error('it is not a JSON object');
      const unknown = Object.keys(settings).filter((key) => !SETTINGS_KEYS.has(key));
      if (unknown.length > 0) throw new Error(`unknown key(s) ${unknown.join(', ')}; known: ${[...SETTINGS_KEYS].join(', ')}`);
      return settings as ModelSettings;
    } catch (err) {
      this.warnOnce(`${id}:json`, `kvstash serve: models/${id}/model.json is unusable (${(err as Error).message}); model skipped`);
      return undefined;
    }
  }

  private warnOnce(key: string, line: string): void {
    if (this.warned.has(key)) return;
    this.warned.add(key);
    this.log(line);
  }

  private async load(found: Discovered): Promise<LoadedModel> {
    const started = performance.now();
    const { settings } = found;
    const cacheDir = this.options.cacheDir === null ? null : path.join(this.options.cacheDir, found.id);
    const system = this.options.systemPrompt;
    let loaded: LoadedModel;
    if (found.kind === 'rkllm') {
      const model = await loadRkllmModel(found.file, {
        name: found.id,
        cacheDir,
        libraryPath: settings.libraryPath,
        runtimeVersion: settings.runtimeVersion,
        maxContextLen: settings.maxContextLen,
        maxNewTokens: settings.maxNewTokens,
        chatTemplate: settings.chatTemplate,
      });
      const bytes = fs.statSync(found.file).size;
      await this.makeRoom(bytes);
      loaded = new LoadedModel(found.id, model, null, null, system, bytes, this);
      if (system !== undefined) {
        // Making the system prompt's cache costs one run; a failure is the model's 'problem' event,
        // and requests then prefill it in full.
        await model.generate({ system, prompt: ' ' }).result.catch((err: unknown) => this.log(`kvstash serve: warming ${found.id} failed: ${(err as Error).message}`));
      }
    } else {
      const model = await loadModel(found.file);
      const info = model.info;
      const contextSize = settings.contextSize ?? this.options.contextSize ?? Math.min(info.trainedContextSize, 4096);
      const sequences = settings.parallel ?? this.options.parallel ?? 4;
      // f16 K and V per layer and cell: weights + this is what the budget counts.
      const kvBytes = contextSize * info.layers * 2 * info.kvHeads * Math.floor(info.embeddingSize / info.heads) * 2;
      const bytes = info.sizeBytes + kvBytes;
      await this.makeRoom(bytes);
      let context: Context;
      try {
        context = await model.createContext({ contextSize, sequences, threads: this.options.threads ?? defaultThreads() });
      } catch (err) {
        await model.dispose();
        throw err;
      }
      const cache = new PromptCache({ dir: cacheDir });
      loaded = new LoadedModel(found.id, model, context, cache, system, bytes, this);
      if (system !== undefined) {
        const prefix = templatePrefix(model, { system });
        if (prefix && prefix.length >= cache.minTokens) await cache.warm(context, prefix, { label: templateLabel(prefix) });
      } else {
        await this.restoreRecentPrefix(found.id, context, cache);
      }
    }
    if (this.closed) {
      await loaded.dispose();
      throw new ApiError(503, 'the server is shutting down', { code: 'shutting_down' });
    }
    this.loaded.set(found.id, loaded);
    this.log(`kvstash serve: loaded model ${found.id} (${found.kind}, ${path.basename(found.file)}) in ${Math.round(performance.now() - started)} ms`);
    return loaded;
  }

  /**
   * Without --system-prompt-file, the system prompt this model's cache used last (the previous
   * run's, after a restart) is restored at load into the sequence handed out last, and its tokens
   * are remembered: the first request that sends it then copies it from there instead of reading
   * the disk entry and tokenizing 2,000 tokens (measured on the tiny model: 2.5 × a warm request's
   * TTFT before). A guess that the next requests do not share costs one restore at load.
   */
  private async restoreRecentPrefix(id: string, context: Context, cache: PromptCache): Promise<void> {
    try {
      const [newest] = await cache.recent(context, { labelPrefix: TEMPLATE_LABEL_PREFIX, limit: 1 });
      if (!newest || newest.tokens.length + 1 > context.info.sequenceContextSize) return;
      const sequence = context.info.sequences - 1;
      const restored = await cache.restore(context, newest.tokens, { sequence });
      if (restored.cachedTokens !== newest.tokens.length) return;
      rememberPrefixTokens(context.model, newest.tokens);
      this.log(`kvstash serve: ${id}: restored the system prompt used last (${restored.cachedTokens} tokens, ${restored.tier}, ${Math.round(restored.restoreMs)} ms) into sequence ${sequence}`);
    } catch (err) {
      this.log(`kvstash serve: restoring ${id}'s recent system prompt failed: ${(err as Error).message}`);
    }
  }

  /** Unloads idle models, least recently used first, until `bytes` more fit the budget. */
  private async makeRoom(bytes: number): Promise<void> {
    const budget = this.options.maxMemoryBytes;
    if (budget === undefined) return;
    const byAge = [...this.loaded.values()].sort((a, b) => a.lastUsed - b.lastUsed);
    let used = byAge.reduce((sum, m) => sum + m.bytes, 0);
    for (const model of byAge) {
      if (used + bytes <= budget) break;
      if (model.active > 0 || model.queued > 0) continue;
      used -= model.bytes;
      await this.unload(model.id, 'memory budget');
    }
    if (used + bytes > budget) this.log(`kvstash serve: loaded models need ${used + bytes} bytes, over the ${budget}-byte budget (the others are busy)`);
  }
}
