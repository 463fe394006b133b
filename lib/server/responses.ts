/**
 * OpenAI's Responses API over kvstash: POST /v1/responses (plain and streamed), GET and DELETE
 * /v1/responses/{id}. HTTP-free: server.ts parses the request and sends what this returns.
 *
 * A stored response is a durable point of a conversation. Its record (the Response object and the
 * conversation's messages up to and including its output) is written atomically and fsynced
 * before the reply is sent, and the KV state of that conversation, as its canonical tokens
 * (lib/server/conversation.ts), is saved as an entry of a per-model PromptCache in
 * `<dir>/kv/<model>/` and flushed to disk before the reply too. Continuing the chain with
 * `previous_response_id` renders parent conversation + new input; the cache restores the longest
 * entry that is a prefix of it (the parent's, in RAM in the same process, from disk after a
 * restart or a SIGKILL), so only the new input is evaluated. Restoring a saved state is exact, so
 * the continuation's tokens are those of a server that never stopped.
 *
 * Why not Session (lib/session/session.ts): a Session is one linear journal that holds its
 * directory's lock and one sequence for its whole life, while a Responses chain branches (two
 * continuations of one response are both valid, and each may be continued again), a response is
 * immutable once answered, and the server leases a sequence per request. The mechanism needed here
 * is smaller: immutable records (one atomic file each, so no journal and no lock: there is no
 * record that is ever appended to) and KV entries keyed by token prefix, which PromptCache already
 * finds, verifies, evicts (LRU within its disk budget) and shares between processes safely. An
 * evicted or damaged entry costs time, never correctness: the restore falls back to the longest
 * prefix left (an ancestor, the system prompt) and evaluates the rest.
 *
 * RKLLM models run the same chains through the conversation backend of RKLLM sessions, whose KV
 * state is a checkpoint entry per stored response (rkllmTurn below).
 */
import { randomBytes } from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { PromptCache, commonPrefix } from '../cache/prompt-cache.js';
import { Generation, generate, type GenerationResult } from '../generate/generate.js';
import type { Context } from '../llama/context.js';
import type { ChatMessage } from '../llama/model.js';
import type { RkllmModel } from '../rkllm/model.js';
import type { ConversationBackend } from '../session/backend.js';
import { conversationBackend } from '../session/backends.js';
import { writeFileAtomic, writeFully } from '../util/atomic-file.js';
import { rkllmReplyOptions } from './chat.js';
import { conversationTokens } from './conversation.js';
import { ApiError, invalidField, rejectedArguments, type SseEvent } from './http.js';
import type { ServedModel } from './model-pool.js';

/** A stored response on disk. */
interface ResponseRecord {
  version: 1;
  model: string;
  /** The conversation after this response: earlier inputs and outputs, this input and output
   * (no system message: `instructions` are per request, as in OpenAI's API). */
  messages: ChatMessage[];
  response: ResponseObject;
  /** RKLLM: the file name of the conversation's checkpoint in the model's `kv/` folder. (A
   * llama.cpp conversation's entry is found by its tokens: the record names none.) */
  checkpoint?: string;
}

/** What differs between the backends in running one response. */
interface ChainTurn {
  /** The leased sequence now belongs to this request. */
  claim(sequence: number): void;
  /** Generates the reply to the conversation (restoring what is saved of it). */
  start(sequence: number, signal: AbortSignal): Generation;
  /** Saves the KV state of `messages` (the conversation after the reply) until it is on disk;
   * resolves with the checkpoint's file name when the record must name it. */
  save(sequence: number, result: GenerationResult, messages: ChatMessage[], id: string): Promise<string | undefined>;
  /** The request is over (whatever happened). */
  release(sequence: number): void;
}

type ResponseObject = Record<string, unknown> & { id: string; output_text: string };

interface ParsedRequest {
  input: ChatMessage[];
  instructions: string | null;
  previousId: string | null;
  store: boolean;
  maxOutputTokens: number | null;
  temperature: number | null;
  topP: number | null;
  metadata: Record<string, string> | null;
}

const RESPONSE_ID = /^resp_[0-9a-f]{48}$/;
/** A checkpoint's name as the record holds it: a cache entry's file name, never a path. */
const CHECKPOINT_FILE = /^[0-9a-f]{32}\.kvstash$/;
/** How far up a chain a continuation looks for an intact checkpoint before prefilling. */
const MAX_ANCESTORS = 8;
/** Default output budget when the request sets no max_output_tokens. Unit: tokens. */
const DEFAULT_MAX_OUTPUT_TOKENS = 256;

export interface ResponsesServiceOptions {
  /** Where stored responses (`responses/`) and their KV entries (`kv/<model>/`) live: the
   * server's --sessions-dir. */
  dir: string;
  /** Disk budget of each model's KV entries; least recently used go first. Default 4 GiB. Unit: bytes. */
  maxKvBytes?: number;
}

export class ResponsesService {
  readonly dir: string;
  private readonly recordsDir: string;
  private readonly maxKvBytes: number;
  private readonly caches = new Map<string, PromptCache>();
  private ready: Promise<void> | undefined;

  constructor(options: ResponsesServiceOptions) {
    if (typeof options?.dir !== 'string' || options.dir === '') throw new TypeError('ResponsesService: dir must be a directory path');
    this.dir = path.resolve(options.dir);
    this.recordsDir = path.join(this.dir, 'responses');
    this.maxKvBytes = options.maxKvBytes ?? 4 * 2 ** 30;
  }

  /** Runs a response to its end and resolves with OpenAI's Response object. */
  async create(served: ServedModel, body: unknown, opts: { signal: AbortSignal }): Promise<object> {
    let last: ResponseObject | undefined;
    for await (const event of this.run(served, body, opts.signal)) {
      const data = event.data as { type: string; response?: ResponseObject };
      if (data.type === 'response.completed' || data.type === 'response.incomplete') last = data.response;
    }
    return last!;
  }

  /** The same response as Server-Sent Events (`response.created` … `response.completed`). */
  stream(served: ServedModel, body: unknown, opts: { signal: AbortSignal }): AsyncIterable<SseEvent> {
    return this.run(served, body, opts.signal);
  }

  /** A stored response; ApiError 404 when there is none with that id. */
  async get(id: string): Promise<object> {
    return (await this.readRecord(id, 'id')).response;
  }

  /** Deletes a stored response and its KV entry. Its descendants stay valid: each record holds its
   * whole conversation. */
  async delete(id: string): Promise<object> {
    const record = await this.readRecord(id, 'id');
    await fsp.rm(this.recordPath(id), { force: true });
    if (record.checkpoint !== undefined && CHECKPOINT_FILE.test(record.checkpoint)) await fsp.rm(path.join(this.kvDir(record.model), record.checkpoint), { force: true });
    else await this.cacheFor(record.model).delete(kvLabel(id));
    return { id, object: 'response', deleted: true };
  }

  /** Waits for KV entries still being written. */
  async close(): Promise<void> {
    await Promise.all([...this.caches.values()].map((cache) => cache.flush()));
  }

  // -------------------------------------------------------------------------------------------

  private async *run(served: ServedModel, body: unknown, signal: AbortSignal): AsyncGenerator<SseEvent> {
    const request = parseRequest(body);
    const parent = request.previousId === null ? undefined : await this.readRecord(request.previousId, 'previous_response_id');
    if (parent && parent.model !== served.id) {
      throw invalidField('previous_response_id', `response ${request.previousId} was made by model '${parent.model}', not '${served.id}'`);
    }
    const history = [...(parent?.messages ?? []), ...request.input];
    const system = request.instructions ?? served.defaultSystem ?? undefined;
    const turn = served.kind === 'rkllm' ? this.rkllmTurn(served, request, system, history, parent) : this.llamaTurn(served, request, system, history);

    const id = `resp_${randomBytes(24).toString('hex')}`;
    const itemId = `msg_${randomBytes(24).toString('hex')}`;
    const createdAt = Math.floor(Date.now() / 1000);
    let sequenceNumber = 0;
    const event = (type: string, fields: Record<string, unknown>): SseEvent => ({ event: type, data: { type, ...fields, sequence_number: sequenceNumber++ } });
    const shape = (status: string, text: string, extra: Record<string, unknown> = {}): ResponseObject =>
      responseObject({ id, itemId, createdAt, model: served.id, request, status, text, ...extra });

    const own = new AbortController();
    const abort = () => own.abort(signal.reason);
    if (signal.aborted) abort();
    signal.addEventListener('abort', abort, { once: true });
    const lease = await served.lease(own.signal);
    let generation: Generation | undefined;
    try {
      turn.claim(lease.sequence);
      yield event('response.created', { response: shape('in_progress', '') });
      yield event('response.in_progress', { response: shape('in_progress', '') });
      generation = turn.start(lease.sequence, own.signal);
      let started = false;
      for await (const delta of generation) {
        if (!started) {
          started = true;
          yield* openItem(event, itemId);
        }
        yield event('response.output_text.delta', { item_id: itemId, output_index: 0, content_index: 0, delta, logprobs: [] });
      }
      const result = await generation.result;
      if (!started) yield* openItem(event, itemId);
      const status = result.finishReason === 'length' ? 'incomplete' : 'completed';
      const final = shape(status, result.text, { usage: usage(result), kvstash: kvstashFields(result) });
      if (request.store) {
        const messages: ChatMessage[] = [...history, { role: 'assistant', content: result.text }];
        const checkpoint = await turn.save(lease.sequence, result, messages, id);
        await this.writeRecord({ version: 1, model: served.id, messages, response: final, ...(checkpoint !== undefined ? { checkpoint } : {}) });
      }
      const item = (final.output as unknown[])[0];
      yield event('response.output_text.done', { item_id: itemId, output_index: 0, content_index: 0, text: result.text, logprobs: [] });
      yield event('response.content_part.done', { item_id: itemId, output_index: 0, content_index: 0, part: outputText(result.text) });
      yield event('response.output_item.done', { output_index: 0, item });
      yield event(status === 'completed' ? 'response.completed' : 'response.incomplete', { response: final });
    } finally {
      signal.removeEventListener('abort', abort);
      // A consumer that stopped early (the client went away) ends the generation before the
      // sequence is given back.
      if (generation) {
        own.abort();
        await generation.result.catch(() => undefined);
      }
      turn.release(lease.sequence);
      lease.release();
    }
  }

  /**
   * A turn on a llama.cpp context: the conversation as canonical tokens, generated with the
   * per-model cache, which restores the longest saved prefix (the parent's entry) by itself.
   */
  private llamaTurn(served: ServedModel, request: ParsedRequest, system: string | undefined, history: ChatMessage[]): ChainTurn {
    const context = served.context!;
    const withSystem: ChatMessage[] = system !== undefined ? [{ role: 'system', content: system }, ...history] : history;
    const prompt = conversationTokens(context.model, withSystem, { addAssistant: true });
    const cache = this.cacheFor(served.id);
    return {
      // The sequence now belongs to this request: what the model's shared cache recorded about it
      // will be overwritten, and what this service's cache records stops being true on release.
      claim: (sequence) => served.cache?.setResident(context, sequence, new Int32Array(0)),
      start: (sequence, signal) =>
        generate(context, {
          prompt: prompt.tokens,
          prefixLength: prompt.prefixLength,
          cache,
          sequence,
          maxTokens: request.maxOutputTokens ?? DEFAULT_MAX_OUTPUT_TOKENS,
          sampling: { temperature: request.temperature ?? 0, ...(request.topP !== null ? { topP: request.topP } : {}) },
          signal,
        }),
      save: async (sequence, result, messages, id) => {
        await this.saveConversation(context, cache, sequence, prompt.tokens, result, [...withSystem.slice(0, withSystem.length - history.length), ...messages], id);
        return undefined;
      },
      release: (sequence) => cache.setResident(context, sequence, new Int32Array(0)),
    };
  }

  /**
   * A turn on an RKLLM model, through the conversation backend Session uses on the NPU
   * (lib/session/rkllm-backend.ts): the runtime cannot hand its KV back, so each stored response
   * is a checkpoint entry (the conversation rendered, saved through the runtime's prompt cache) in
   * the model's `kv/<model>/` folder, named in the response's record. A continuation loads the
   * checkpoint of the nearest ancestor that is intact and a prefix of it (the parent's, normally)
   * and prefills only what follows; without one, the system prompt's cache, else everything.
   */
  private rkllmTurn(served: ServedModel, request: ParsedRequest, system: string | undefined, history: ChatMessage[], parent: ResponseRecord | undefined): ChainTurn {
    const model = served.model as RkllmModel;
    const backend = rejectedArguments(() => conversationBackend({ context: model }, system !== undefined ? { system } : {}));
    const reply = rkllmReplyOptions(
      model,
      backend,
      history,
      request.maxOutputTokens ?? undefined,
      { temperature: request.temperature ?? undefined, topP: request.topP ?? undefined },
      'input',
    );
    const dir = this.kvDir(served.id);
    return {
      claim: () => undefined,
      start: (_sequence, signal) =>
        new Generation(async (emit) => {
          const started = performance.now();
          const restored = await this.restoreAncestor(backend, dir, parent, history);
          const restoreMs = restored ? performance.now() - started : 0;
          const result = await backend.reply(history, { ...reply, signal }, emit);
          return { ...result, restoreMs };
        }),
      save: async (_sequence, _result, messages, id) => {
        await fsp.mkdir(dir, { recursive: true });
        const written = await backend.writeCheckpoint(dir, new Date().toISOString(), kvLabel(id), messages);
        return path.basename(written.path);
      },
      release: () => undefined,
    };
  }

  /** Loads the checkpoint of the nearest ancestor (from `record` up) that the backend accepts for
   * `messages`; true when one was loaded. A missing, damaged or foreign checkpoint is passed over. */
  private async restoreAncestor(backend: ConversationBackend, dir: string, record: ResponseRecord | undefined, messages: ChatMessage[]): Promise<boolean> {
    for (let depth = 0; record && depth < MAX_ANCESTORS; depth++) {
      if (record.checkpoint !== undefined && CHECKPOINT_FILE.test(record.checkpoint)) {
        try {
          await backend.restoreCheckpoint(path.join(dir, record.checkpoint), messages);
          return true;
        } catch {
          // Costs the prefill of what this checkpoint held, never the turn.
        }
      }
      const previous = record.response.previous_response_id;
      record = typeof previous === 'string' ? await this.readRecord(previous, 'id').catch(() => undefined) : undefined;
    }
    return false;
  }

  /**
   * Makes the sequence hold exactly the canonical tokens of the conversation after the reply
   * (re-evaluating what differs from the sampled tokens: the end-of-turn tokens never decoded, a
   * re-tokenization that differs), saves that state as the response's KV entry and waits until it
   * is on disk.
   */
  private async saveConversation(
    context: Context,
    cache: PromptCache,
    sequence: number,
    prompt: Int32Array,
    result: GenerationResult,
    conversation: ChatMessage[],
    id: string,
  ): Promise<void> {
    const target = conversationTokens(context.model, conversation, { addAssistant: false }).tokens;
    const evaluated = await context.exclusive(() => context.memory.range(sequence).max + 1);
    const all = new Int32Array(prompt.length + result.tokens.length);
    all.set(prompt);
    all.set(result.tokens, prompt.length);
    const keep = commonPrefix(all.subarray(0, Math.max(0, evaluated)), target);
    await context.exclusive(() => context.memory.remove(sequence, keep));
    if (keep < target.length) await context.decode(target.subarray(keep), { sequence, start: keep, logits: 'none' });
    await cache.save(context, target, { sequence, label: kvLabel(id) });
    await cache.flush();
  }

  private kvDir(modelId: string): string {
    // Model ids are folder names (ModelPool), so one path segment; encoded anyway, never a path.
    return path.join(this.dir, 'kv', encodeURIComponent(modelId));
  }

  private cacheFor(modelId: string): PromptCache {
    let cache = this.caches.get(modelId);
    if (!cache) {
      cache = new PromptCache({ dir: this.kvDir(modelId), maxDiskBytes: this.maxKvBytes });
      this.caches.set(modelId, cache);
    }
    return cache;
  }

  private recordPath(id: string): string {
    return path.join(this.recordsDir, `${id}.json`);
  }

  private async writeRecord(record: ResponseRecord): Promise<void> {
    this.ready ??= fsp.mkdir(this.recordsDir, { recursive: true }).then(() => undefined);
    await this.ready;
    const bytes = Buffer.from(JSON.stringify(record), 'utf8');
    await writeFileAtomic(this.recordPath(record.response.id), (handle) => writeFully(handle, bytes, 0));
  }

  private async readRecord(id: unknown, param: string): Promise<ResponseRecord> {
    const notFound = () =>
      new ApiError(404, param === 'id' ? `No response found with id '${String(id)}'.` : `Previous response with id '${String(id)}' not found.`, {
        code: param === 'id' ? 'not_found' : 'previous_response_not_found',
        param,
        retryable: false,
      });
    if (typeof id !== 'string' || !RESPONSE_ID.test(id)) throw notFound();
    let text: string;
    try {
      text = await fsp.readFile(this.recordPath(id), 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw notFound();
      throw err;
    }
    // Records are written atomically: one that does not parse was damaged outside kvstash.
    const record = JSON.parse(text) as ResponseRecord;
    if (record.version !== 1 || record.response?.id !== id) throw new Error(`stored response ${id} is damaged`);
    return record;
  }
}

function kvLabel(id: string): string {
  return `response:${id}`;
}

function* openItem(event: (type: string, fields: Record<string, unknown>) => SseEvent, itemId: string): Generator<SseEvent> {
  yield event('response.output_item.added', { output_index: 0, item: { id: itemId, type: 'message', status: 'in_progress', role: 'assistant', content: [] } });
  yield event('response.content_part.added', { item_id: itemId, output_index: 0, content_index: 0, part: outputText('') });
}

function outputText(text: string): Record<string, unknown> {
  return { type: 'output_text', text, annotations: [], logprobs: [] };
}

function usage(result: GenerationResult): Record<string, unknown> {
  return {
    input_tokens: result.promptTokens,
    input_tokens_details: { cached_tokens: result.cachedTokens },
    output_tokens: result.tokens.length,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: result.promptTokens + result.tokens.length,
  };
}

/** kvstash's own figures, beside OpenAI's fields (clients ignore unknown fields). */
function kvstashFields(result: GenerationResult): Record<string, unknown> {
  return {
    tier: result.tier,
    restored_tokens: result.cachedTokens,
    evaluated_tokens: result.evaluatedTokens,
    restore_ms: round(result.restoreMs),
    ttft_ms: round(result.ttftMs),
    total_ms: round(result.totalMs),
  };
}

function round(ms: number): number {
  return Math.round(ms * 100) / 100;
}

function responseObject(o: {
  id: string;
  itemId: string;
  createdAt: number;
  model: string;
  request: ParsedRequest;
  status: string;
  text: string;
  usage?: Record<string, unknown>;
  kvstash?: Record<string, unknown>;
}): ResponseObject {
  const done = o.status !== 'in_progress';
  return {
    id: o.id,
    object: 'response',
    created_at: o.createdAt,
    status: o.status,
    ...(done ? { completed_at: Math.floor(Date.now() / 1000) } : {}),
    error: null,
    incomplete_details: o.status === 'incomplete' ? { reason: 'max_output_tokens' } : null,
    instructions: o.request.instructions,
    max_output_tokens: o.request.maxOutputTokens,
    model: o.model,
    output: done ? [{ id: o.itemId, type: 'message', status: o.status, role: 'assistant', content: [outputText(o.text)] }] : [],
    output_text: o.text,
    parallel_tool_calls: true,
    previous_response_id: o.request.previousId,
    store: o.request.store,
    temperature: o.request.temperature ?? 0,
    top_p: o.request.topP ?? 1,
    text: { format: { type: 'text' } },
    tool_choice: 'auto',
    tools: [],
    truncation: 'disabled',
    metadata: o.request.metadata ?? {},
    ...(o.usage ? { usage: o.usage } : {}),
    ...(o.kvstash ? { kvstash: o.kvstash } : {}),
  };
}

// --- request validation ------------------------------------------------------------------------

const ROLES: Record<string, ChatMessage['role']> = { user: 'user', assistant: 'assistant', system: 'system', developer: 'system' };

function parseRequest(body: unknown): ParsedRequest {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) throw new ApiError(400, 'the body must be a JSON object', { code: 'invalid_value', retryable: false });
  const b = body as Record<string, unknown>;
  const instructions = optional(b.instructions, 'instructions', (v) => typeof v === 'string', 'a string');
  const previousId = optional(b.previous_response_id, 'previous_response_id', (v) => typeof v === 'string', 'a string');
  const store = optional(b.store, 'store', (v) => typeof v === 'boolean', 'a boolean') ?? true;
  const maxOutputTokens = optional(b.max_output_tokens, 'max_output_tokens', (v) => Number.isInteger(v) && (v as number) >= 1, 'an integer ≥ 1');
  const temperature = optional(b.temperature, 'temperature', (v) => typeof v === 'number' && v >= 0 && v <= 2, 'a number from 0 to 2');
  const topP = optional(b.top_p, 'top_p', (v) => typeof v === 'number' && v > 0 && v <= 1, 'a number above 0, at most 1');
  const metadata = optional(
    b.metadata,
    'metadata',
    (v) => typeof v === 'object' && !Array.isArray(v) && Object.values(v as object).every((x) => typeof x === 'string'),
    'an object of strings',
  );
  if (Array.isArray(b.tools) && b.tools.length > 0) {
    throw new ApiError(400, '/v1/responses does not run tools yet; use /v1/chat/completions with tools', { code: 'unsupported_parameter', param: 'tools', retryable: false });
  }
  return {
    input: parseInput(b.input),
    instructions: instructions as string | null,
    previousId: previousId as string | null,
    store: store as boolean,
    maxOutputTokens: maxOutputTokens as number | null,
    temperature: temperature as number | null,
    topP: topP as number | null,
    metadata: metadata as Record<string, string> | null,
  };
}

function optional(value: unknown, param: string, valid: (v: unknown) => boolean, what: string): unknown {
  if (value === undefined || value === null) return null;
  if (!valid(value)) throw invalidField(param, `${param} must be ${what}`);
  return value;
}

/** `input`: a string (one user message) or a list of message items. */
function parseInput(input: unknown): ChatMessage[] {
  if (typeof input === 'string') {
    if (input === '') throw invalidField('input', 'input must not be empty');
    return [{ role: 'user', content: input }];
  }
  if (!Array.isArray(input) || input.length === 0) throw invalidField('input', 'input must be a string or a non-empty list of messages');
  return input.map((item: unknown, i): ChatMessage => {
    const param = `input[${i}]`;
    if (typeof item !== 'object' || item === null) throw invalidField(param, `${param} must be a message object`);
    const { type, role, content } = item as Record<string, unknown>;
    if (type !== undefined && type !== 'message') {
      throw new ApiError(400, `${param} has type '${String(type)}'; only message items are supported`, { code: 'unsupported_parameter', param, retryable: false });
    }
    const mapped = typeof role === 'string' ? ROLES[role] : undefined;
    if (!mapped) throw invalidField(`${param}.role`, `${param}.role must be user, assistant, system or developer`);
    return { role: mapped, content: contentText(content, `${param}.content`) };
  });
}

function contentText(content: unknown, param: string): string {
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) throw invalidField(param, `${param} must be a string or a list of text parts`);
  return content
    .map((part: unknown, i) => {
      const p = part as Record<string, unknown> | null;
      if (!p || (p.type !== 'input_text' && p.type !== 'output_text') || typeof p.text !== 'string') {
        throw new ApiError(400, `${param}[${i}] must be {type: 'input_text' | 'output_text', text}; other parts are not supported`, {
          code: 'unsupported_parameter',
          param: `${param}[${i}]`,
          retryable: false,
        });
      }
      return p.text;
    })
    .join('');
}
