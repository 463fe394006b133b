/**
 * /v1/cache: named prompt-cache entries, one namespace per model. HTTP-free: server.ts routes
 * GET /v1/cache, GET|POST /v1/cache/{model}, GET|DELETE /v1/cache/{model}/{name} here.
 *
 * An entry's name is not its label: a cache entry's key is its tokens (two names for one prompt
 * are one entry) and its label is whoever saved it last, so the names live in a small index per
 * model, `names.json` in the model's cache directory beside the entries, replaced atomically
 * (fsynced) on every change. A model whose cache is RAM-only (no --cache-dir) keeps its names in
 * RAM too. Named entries live under the cache's disk budget like every other entry: one evicted
 * drops out of the listing and its name answers 404 until it is created again.
 *
 * An RKLLM model's named entries are system prompt caches, the only prompt caches its chat
 * requests load: creating one makes (or finds) the very entry RkllmModel.generate() loads for that
 * system prompt, in the model's cache directory.
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { ENTRY_EXTENSION } from '../cache/entry.js';
import { PromptCache, type CacheEntryInfo } from '../cache/prompt-cache.js';
import { preparePrompt, templatePrefix } from '../generate/generate.js';
import type { ChatMessage } from '../llama/model.js';
import type { RkllmModel } from '../rkllm/model.js';
import { removeTemporaryPayload } from '../rkllm/system-prompt-cache.js';
import { writeFileAtomic, writeFully } from '../util/atomic-file.js';
import { ApiError, invalidField } from './http.js';
import type { ModelPool, ServedModel } from './model-pool.js';

/** Letters, digits, dot, dash, underscore; starts with a letter or digit; at most 64. Never a path. */
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const INDEX_FILE = 'names.json';

interface NameIndex {
  version: 1;
  /** `tokens`: RKLLM entries only, whose headers hold no tokens (UTF-8 bytes of the rendered
   * system block, the RKLLM backend's unit). */
  names: Record<string, { key: string; created_at: number; tokens?: number }>;
}

export interface NamedCacheEntry {
  object: 'cache.entry';
  name: string;
  model: string;
  key: string;
  tokens: number;
  bytes: number;
  created_at: number;
  tiers: CacheEntryInfo['tiers'];
}

export interface NamedCacheServiceOptions {
  pool: ModelPool;
  /** The server's --cache-dir (models' caches are `<cacheDir>/<id>/`), so that GET /v1/cache lists
   * the names of models that are not loaded without loading them. Default: only loaded models. */
  cacheDir?: string | null;
}

export class NamedCacheService {
  private readonly pool: ModelPool;
  private readonly cacheDir: string | null;
  /** Indexes of RAM-only caches, and the write queue of each index (one change at a time). */
  private readonly ramIndexes = new Map<string, NameIndex>();
  private readonly writing = new Map<string, Promise<unknown>>();
  /** A listing view of each RKLLM model's cache directory. */
  private readonly rkllmCaches = new Map<string, PromptCache>();

  constructor(options: NamedCacheServiceOptions) {
    this.pool = options.pool;
    this.cacheDir = options.cacheDir ? path.resolve(options.cacheDir) : null;
  }

  /** Every model's named entries. */
  async list(): Promise<object> {
    const data: NamedCacheEntry[] = [];
    for (const listing of this.pool.list()) {
      if (listing.loaded) {
        data.push(...(await this.entries(await this.pool.get(listing.id))));
      } else if (this.cacheDir) {
        const dir = path.join(this.cacheDir, listing.id);
        data.push(...(await this.entriesIn(listing.id, dir, new PromptCache({ dir, maxRamBytes: 0 }))));
      }
    }
    return { object: 'list', data };
  }

  async listModel(modelId: string): Promise<object> {
    return { object: 'list', data: await this.entries(await this.pool.get(modelId)) };
  }

  async get(modelId: string, name: string): Promise<object> {
    const served = await this.pool.get(modelId);
    const found = (await this.entries(served)).find((e) => e.name === name);
    if (!found) throw notFound(modelId, name);
    return found;
  }

  /** Evaluates `{name, system?, tools?, messages?, prompt?}` (restoring what is cached of it) and
   * saves it under `name`, replacing an entry of that name. Resolves once it is on disk. */
  async create(modelId: string, body: unknown, opts: { signal?: AbortSignal } = {}): Promise<object> {
    const served = await this.pool.get(modelId);
    const request = parseCreate(body);
    if (served.kind === 'rkllm') return this.createRkllm(served, request, opts.signal);
    const context = served.context!;
    const cache = served.cache!;
    const model = context.model;
    const chat = request.messages !== undefined || request.system !== undefined || request.tools !== undefined;
    // The tokens generate() computes for a request that starts like this one, so that its restore
    // finds the entry: the template prefix alone for a system prompt (the very entry generate()
    // saves), the rendered conversation otherwise (a later request restores the part it shares).
    const tokens =
      chat && request.messages === undefined && request.prompt === undefined
        ? templatePrefix(model, { system: request.system, tools: request.tools })
        : preparePrompt(model, { system: request.system, tools: request.tools, messages: request.messages, ...(request.prompt !== undefined ? { prompt: request.prompt } : {}) }).tokens;
    if (!tokens || tokens.length === 0) throw invalidField('system', 'the chat template renders nothing for this system prompt');
    if (tokens.length > context.info.sequenceContextSize) {
      throw new ApiError(400, `the entry has ${tokens.length} tokens; the model's context holds ${context.info.sequenceContextSize} per sequence`, {
        code: 'context_length_exceeded',
        retryable: false,
      });
    }
    const lease = await served.lease(opts.signal);
    let key: string;
    try {
      ({ key } = await cache.warm(context, tokens, { label: `cache:${request.name}`, sequence: lease.sequence, ...(opts.signal ? { signal: opts.signal } : {}) }));
      await cache.flush();
    } finally {
      lease.release();
    }
    await this.updateIndex(served, (index) => {
      index.names[request.name] = { key, created_at: Math.floor(Date.now() / 1000) };
    });
    return this.get(modelId, request.name);
  }

  /** Forgets the name; the entry itself goes too unless another name still points at it. */
  async delete(modelId: string, name: string): Promise<object> {
    const served = await this.pool.get(modelId);
    let key: string | undefined;
    let shared = false;
    await this.updateIndex(served, (index) => {
      key = NAME.test(name) ? index.names[name]?.key : undefined;
      if (key === undefined) return false;
      delete index.names[name];
      shared = Object.values(index.names).some((e) => e.key === key);
      return true;
    });
    if (key === undefined) throw notFound(modelId, name);
    if (!shared) await this.cacheOf(served)!.delete(key);
    return { object: 'cache.entry.deleted', name, model: modelId, deleted: true };
  }

  // -------------------------------------------------------------------------------------------

  /** An RKLLM model's named entry: the system prompt's cache, found or made (one run of the
   * system block) while the model's one sequence is leased. */
  private async createRkllm(served: ServedModel, request: CreateRequest, signal: AbortSignal | undefined): Promise<object> {
    const model = served.model as RkllmModel;
    const refuse = (param: string) =>
      new ApiError(400, `${param}: an RKLLM model's named entries are system prompt caches (the only prompt caches its requests load); give system alone`, {
        code: 'unsupported_parameter',
        param,
        retryable: false,
      });
    for (const param of ['tools', 'messages', 'prompt'] as const) if (request[param] !== undefined) throw refuse(param);
    if (request.system === undefined || request.system === '') throw invalidField('system', 'system must be a non-empty string');
    if (model.cacheDir === null) {
      throw new ApiError(400, `model '${served.id}' keeps no prompt caches: the server runs without --cache-dir`, { code: 'unsupported_model', retryable: false });
    }
    const rendered = model.chatTemplate.system.replace('{system}', () => request.system!);
    const lease = await served.lease(signal);
    let entryPath: string;
    try {
      const prepared = await model.exclusive(this, () => model.systemPromptCacheFor(rendered, signal), signal);
      // undefined: the runtime could not save it; the model's 'problem' event has the reason.
      if (prepared === undefined) throw new Error(`the RKLLM runtime could not save the prompt cache of '${request.name}'`);
      await removeTemporaryPayload(prepared.payloadPath);
      entryPath = prepared.entryPath;
    } finally {
      lease.release();
    }
    const key = path.basename(entryPath, ENTRY_EXTENSION);
    await this.updateIndex(served, (index) => {
      index.names[request.name] = { key, created_at: Math.floor(Date.now() / 1000), tokens: Buffer.byteLength(rendered, 'utf8') };
    });
    return this.get(served.id, request.name);
  }

  /** The cache that holds a model's named entries: its prompt cache (llama), a listing of its
   * cache directory (RKLLM), none for an RKLLM model without one. */
  private cacheOf(served: ServedModel): PromptCache | null {
    if (served.kind !== 'rkllm') return served.cache;
    const dir = (served.model as RkllmModel).cacheDir;
    if (dir === null) return null;
    let cache = this.rkllmCaches.get(served.id);
    if (!cache) this.rkllmCaches.set(served.id, (cache = new PromptCache({ dir, maxRamBytes: 0 })));
    return cache;
  }

  private async entries(served: ServedModel): Promise<NamedCacheEntry[]> {
    const cache = this.cacheOf(served);
    if (!cache) return [];
    return this.entriesIn(served.id, cache.dir, cache);
  }

  private async entriesIn(modelId: string, dir: string | null, cache: PromptCache): Promise<NamedCacheEntry[]> {
    const index = await this.readIndex(modelId, dir);
    const names = Object.entries(index.names);
    if (names.length === 0) return [];
    const byKey = new Map((await cache.list()).map((info) => [info.key, info]));
    const out: NamedCacheEntry[] = [];
    for (const [name, { key, created_at, tokens }] of names.sort(([a], [b]) => a.localeCompare(b))) {
      const info = byKey.get(key);
      if (!info) continue; // evicted, or deleted by hand
      out.push({ object: 'cache.entry', name, model: modelId, key, tokens: tokens ?? info.tokenCount, bytes: info.bytes, created_at, tiers: info.tiers });
    }
    return out;
  }

  private async readIndex(modelId: string, dir: string | null): Promise<NameIndex> {
    if (dir === null) return this.ramIndexes.get(modelId) ?? { version: 1, names: {} };
    let text: string;
    try {
      text = await fsp.readFile(path.join(dir, INDEX_FILE), 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { version: 1, names: {} };
      throw err;
    }
    const index = JSON.parse(text) as NameIndex;
    if (index.version !== 1 || typeof index.names !== 'object' || index.names === null) throw new Error(`${path.join(dir, INDEX_FILE)} is not a kvstash name index`);
    return index;
  }

  /** Read, change, write the model's index, one change at a time; `change` returning false skips the write. */
  private async updateIndex(served: ServedModel, change: (index: NameIndex) => boolean | void): Promise<void> {
    const dir = this.cacheOf(served)?.dir ?? null;
    const previous = this.writing.get(served.id) ?? Promise.resolve();
    const next = previous
      .catch(() => undefined)
      .then(async () => {
        const index = await this.readIndex(served.id, dir);
        if (change(index) === false) return;
        if (dir === null) {
          this.ramIndexes.set(served.id, index);
          return;
        }
        await fsp.mkdir(dir, { recursive: true });
        const bytes = Buffer.from(JSON.stringify(index, null, 1), 'utf8');
        await writeFileAtomic(path.join(dir, INDEX_FILE), (handle) => writeFully(handle, bytes, 0));
      });
    this.writing.set(served.id, next);
    await next;
  }
}

function notFound(modelId: string, name: string): ApiError {
  return new ApiError(404, `model '${modelId}' has no cache entry named '${name}'`, { code: 'cache_entry_not_found', param: 'name', retryable: false });
}

interface CreateRequest {
  name: string;
  system?: string;
  tools?: unknown;
  messages?: ChatMessage[];
  prompt?: string;
}

function parseCreate(body: unknown): CreateRequest {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ApiError(400, 'the body must be a JSON object', { code: 'invalid_value', retryable: false });
  const b = body as Record<string, unknown>;
  if (typeof b.name !== 'string' || !NAME.test(b.name)) {
    throw invalidField('name', 'name must be 1-64 letters, digits, dots, dashes or underscores, starting with a letter or digit');
  }
  const out: CreateRequest = { name: b.name };
  if (b.system !== undefined) {
    if (typeof b.system !== 'string') throw invalidField('system', 'system must be a string');
    out.system = b.system;
  }
  if (b.tools !== undefined) {
    if (!Array.isArray(b.tools)) throw invalidField('tools', 'tools must be a list of tool definitions');
    out.tools = b.tools;
  }
  if (b.messages !== undefined) {
    if (!Array.isArray(b.messages)) throw invalidField('messages', 'messages must be a list');
    out.messages = b.messages.map((m: unknown, i) => {
      const { role, content } = (m ?? {}) as Record<string, unknown>;
      if (typeof role !== 'string' || !['system', 'user', 'assistant', 'tool'].includes(role)) throw invalidField(`messages[${i}].role`, `messages[${i}].role must be system, user, assistant or tool`);
      if (typeof content !== 'string') throw invalidField(`messages[${i}].content`, `messages[${i}].content must be a string`);
      return { role, content };
    });
  }
  if (b.prompt !== undefined) {
    if (typeof b.prompt !== 'string' || b.prompt === '') throw invalidField('prompt', 'prompt must be a non-empty string');
    out.prompt = b.prompt;
  }
  if (out.system === undefined && out.tools === undefined && out.messages === undefined && out.prompt === undefined) {
    throw invalidField('prompt', 'give at least one of system, tools, messages, prompt');
  }
  return out;
}
