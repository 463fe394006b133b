/**
 * Cache-aware generation: tokenize → restore the longest cached prefix → evaluate the rest →
 * sample → stream text.
 */
import { createHash } from 'node:crypto';
import type { PromptCache, CacheTier } from '../cache/prompt-cache.js';
import { KvstashError } from '../errors.js';
import type { Context } from '../llama/context.js';
import type { ChatMessage, Model } from '../llama/model.js';
import type { SamplingOptions } from '../llama/sampler.js';
import { requireInteger } from '../util/validate.js';
import { BatchScheduler } from './scheduler.js';

export interface GenerateOptions {
  /** Raw prompt text (control tokens in it are parsed) or tokens; no chat template is applied.
   * With `system` or `tools` it is taken as the user's message instead. */
  prompt?: string | Int32Array | readonly number[];
  /** A conversation, rendered with the model's chat template, ending with an assistant turn. */
  messages?: readonly ChatMessage[];
  /** System prompt. Its rendered template prefix is cached automatically when `cache` is given. */
  system?: string;
  /** Tool definitions (JSON-serialisable, or text), appended to the system prompt. */
  tools?: unknown;
  /** Where to look for (and save) cached prefixes. Default: none (always a full prefill). */
  cache?: PromptCache;
  /** Sequence of the context to use. Default 0. */
  sequence?: number;
  /** Most tokens to generate. Default 256. */
  maxTokens?: number;
  /** Default greedy (`{temperature: 0}`). */
  sampling?: SamplingOptions;
  /** Generation stops before any of these strings; they are not part of the text. */
  stop?: readonly string[];
  /** Aborts prefill or generation; the sequence then holds what was evaluated before. */
  signal?: AbortSignal;
  /** Prompt evaluation progress: (tokens evaluated, tokens to evaluate). */
  onProgress?: (done: number, total: number) => void;
  /** Chat template (text or built-in name) instead of the model's. */
  template?: string;
  /** With a token `prompt`: its first `prefixLength` tokens are a reusable prefix, saved to the
   * cache when they were not restored from it (as a system prompt's template prefix is). */
  prefixLength?: number;
}

export type FinishReason = 'eog' | 'length' | 'stop';

export interface GenerationResult {
  text: string;
  /** The generated tokens. */
  tokens: Int32Array;
  promptTokens: number;
  /** Prompt tokens restored from the cache. */
  cachedTokens: number;
  /** Prompt tokens evaluated by this call. */
  evaluatedTokens: number;
  /** The cache tier of the restored prefix; null on a miss or without a cache. */
  tier: CacheTier | null;
  restoreMs: number;
  /** From the call to the first sampled token. Unit: ms. */
  ttftMs: number;
  totalMs: number;
  finishReason: FinishReason;
}

/**
 * A running generation. Iterate it for text chunks as they are produced; `result` resolves when it
 * ends (awaiting `result` without iterating runs it to the end).
 */
export class Generation implements AsyncIterable<string> {
  readonly result: Promise<GenerationResult>;
  private readonly chunks: string[] = [];
  private finished = false;
  private wake: (() => void) | undefined;
  private iterated = false;

  /** @internal */
  constructor(run: (emit: (chunk: string) => void) => Promise<GenerationResult>) {
    this.result = run((chunk) => {
      this.chunks.push(chunk);
      this.wake?.();
    }).finally(() => {
      this.finished = true;
      this.wake?.();
    });
    // A caller that only iterates still sees the error there; avoid an unhandled rejection.
    this.result.catch(() => undefined);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<string> {
    if (this.iterated) throw new TypeError('a Generation can be iterated once');
    this.iterated = true;
    for (;;) {
      while (this.chunks.length > 0) yield this.chunks.shift()!;
      if (this.finished) break;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
    await this.result; // rethrows a failure
  }
}

/** The prompt split where its cacheable template prefix ends. */
export interface PreparedPrompt {
  tokens: Int32Array;
  /** Tokens of the system/tools prefix (0 when there is none). */
  prefixLength: number;
}

/**
 * Tokens of recently rendered system prefixes, per model. A server renders the same system prompt
 * for request after request, and tokenizing 2,000 tokens takes 10-30 ms of the event loop, during
 * which no generation of the context can submit its next step. Least recently used go first.
 */
const prefixMemo = new WeakMap<Model, Map<string, Int32Array>>();
const PREFIX_MEMO_ENTRIES = 32;

function prefixTokens(model: Model, prefix: string, known?: Int32Array): Int32Array {
  let memo = prefixMemo.get(model);
  if (!memo) prefixMemo.set(model, (memo = new Map()));
  let tokens = known ?? memo.get(prefix);
  memo.delete(prefix);
  tokens ??= model.tokenize(prefix, { special: true });
  memo.set(prefix, tokens);
  if (memo.size > PREFIX_MEMO_ENTRIES) memo.delete(memo.keys().next().value!);
  return tokens;
}

/**
 * Remembers `tokens` as a rendered system prefix when they read back as text that tokenizes to
 * them again (a server restoring a cached system prompt at load: its first request then skips
 * tokenizing it). Returns whether they were remembered.
 */
export function rememberPrefixTokens(model: Model, tokens: Int32Array): boolean {
  const text = model.detokenize(tokens, { special: true });
  const again = model.tokenize(text, { special: true });
  if (again.length !== tokens.length || again.some((token, i) => token !== tokens[i])) return false;
  prefixTokens(model, text, again);
  return true;
}

export function preparePrompt(model: Model, options: GenerateOptions): PreparedPrompt {
  const chat = options.messages !== undefined || options.system !== undefined || options.tools !== undefined;
  if (!chat) {
    if (options.prompt === undefined) throw new TypeError('generate: give a prompt or messages');
    const tokens = typeof options.prompt === 'string' ? model.tokenize(options.prompt, { special: true }) : options.prompt instanceof Int32Array ? options.prompt.slice() : Int32Array.from(options.prompt);
    const prefixLength = options.prefixLength === undefined ? 0 : requireInteger(options.prefixLength, 'prefixLength', 0, tokens.length);
    return { tokens, prefixLength };
  }
  const messages: ChatMessage[] = [];
  const system = systemText(options.system, options.tools);
  if (system !== undefined) messages.push({ role: 'system', content: system });
  if (options.messages) messages.push(...options.messages);
  if (options.prompt !== undefined) {
    if (typeof options.prompt !== 'string') throw new TypeError('generate: with system/tools/messages, prompt must be text');
    messages.push({ role: 'user', content: options.prompt });
  }
  const template = options.template;
  const full = model.applyChatTemplate(messages, { addAssistant: true, template });
  if (system === undefined) return { tokens: model.tokenize(full, { special: true }), prefixLength: 0 };
  const prefix = model.applyChatTemplate(messages.slice(0, 1), { addAssistant: false, template });
  if (!full.startsWith(prefix)) {
    // A template that renders the system message differently in context: no separable prefix.
    return { tokens: model.tokenize(full, { special: true }), prefixLength: 0 };
  }
  // Prefix and rest are tokenized apart, so the prefix has the same tokens in every conversation.
  const head = prefixTokens(model, prefix);
  const tail = model.tokenize(full.slice(prefix.length), { special: true, addSpecial: false });
  const tokens = new Int32Array(head.length + tail.length);
  tokens.set(head);
  tokens.set(tail, head.length);
  return { tokens, prefixLength: head.length };
}

/**
 * The tokens generate() caches for this system prompt and tools (its template prefix), or null
 * when there is none or the chat template renders no separable system turn.
 */
export function templatePrefix(model: Model, options: { system?: string; tools?: unknown; template?: string }): Int32Array | null {
  if (options.system === undefined && options.tools === undefined) return null;
  const { tokens, prefixLength } = preparePrompt(model, { ...options, prompt: 'Hello.' });
  return prefixLength > 0 ? tokens.slice(0, prefixLength) : null;
}

function systemText(system: string | undefined, tools: unknown): string | undefined {
  if (tools === undefined) return system;
  const rendered = typeof tools === 'string' ? tools : JSON.stringify(tools, null, 2);
  return `${system ?? ''}${system ? '\n\n' : ''}# Tools\n\n${rendered}`;
}

/** How the labels of automatically cached template prefixes begin. */
export const TEMPLATE_LABEL_PREFIX = 'template:';

/** Label of an automatically cached template prefix: stable for the same rendered tokens. */
export function templateLabel(prefix: Int32Array): string {
  return `${TEMPLATE_LABEL_PREFIX}${createHash('sha256').update(Buffer.from(prefix.buffer, prefix.byteOffset, prefix.byteLength)).digest('hex').slice(0, 16)}`;
}

/** Generates a reply in one sequence of `context`, reusing cached prefixes. */
export function generate(context: Context, options: GenerateOptions): Generation {
  return new Generation((emit) => runGeneration(context, options, emit));
}

async function runGeneration(context: Context, options: GenerateOptions, emit: (chunk: string) => void): Promise<GenerationResult> {
  const started = performance.now();
  const model = context.model;
  const sequence = options.sequence ?? 0;
  const maxTokens = requireInteger(options.maxTokens ?? 256, 'maxTokens', 1);
  const { tokens: prompt, prefixLength } = preparePrompt(model, options);
  if (prompt.length === 0) throw new RangeError('generate: the prompt is empty');
  if (prompt.length + maxTokens > context.info.sequenceContextSize) {
    throw new KvstashError('E_CONTEXT_FULL', `the prompt (${prompt.length} tokens) and maxTokens (${maxTokens}) exceed the context (${context.info.sequenceContextSize} tokens)`);
  }
  const cache = options.cache;
  const scheduler = BatchScheduler.of(context);
  const sampler = model.createSampler(options.sampling ?? {});
  /** Tokens the sequence holds from position 0, kept in step with every decode. */
  let held = 0;
  const generated: number[] = [];
  try {
    // 1. Restore: at most prompt.length - 1 tokens, so the last one is evaluated and yields logits.
    let cachedTokens = 0;
    let tier: CacheTier | null = null;
    let restoreMs = 0;
    if (cache) {
      const restored = await cache.restore(context, prompt, { sequence, maxTokens: prompt.length - 1 });
      ({ cachedTokens, tier, restoreMs } = restored);
      // From here this call only appends to the sequence (its finally records it exactly), so
      // concurrent generations may copy the restored prefix from it.
      cache.setResident(context, sequence, prompt.subarray(0, cachedTokens), { extending: true });
    } else {
      await context.exclusive(() => context.memory.remove(sequence));
    }
    held = cachedTokens;

    // 2. Evaluate the rest. A template prefix that was not cached is evaluated first and saved.
    const progressTotal = prompt.length - cachedTokens;
    const progress = (base: number) => options.onProgress && ((done: number) => options.onProgress!(base + done, progressTotal));
    if (cache && prefixLength >= cache.minTokens && cachedTokens < prefixLength) {
      await scheduler.submit(sequence, prompt.subarray(cachedTokens, prefixLength), cachedTokens, { signal: options.signal, onProgress: progress(0) });
      held = prefixLength;
      await cache.save(context, prompt.subarray(0, prefixLength), { sequence, label: templateLabel(prompt.subarray(0, prefixLength)) });
      cache.setResident(context, sequence, prompt.subarray(0, prefixLength), { extending: true });
    }
    let next = -1;
    const sample = (index: number) => {
      next = sampler.sample(context, index);
    };
    await scheduler.submit(sequence, prompt.subarray(held), held, { signal: options.signal, onProgress: progress(held - cachedTokens), onOutput: sample });
    held = prompt.length;
    const ttftMs = performance.now() - started;

    // 3. Sample, stream, stop.
    const text = new TextStream(options.stop ?? []);
    let finishReason: FinishReason = 'length';
    for (;;) {
      if (model.isEndOfGeneration(next)) {
        finishReason = 'eog';
        break;
      }
      generated.push(next);
      const chunk = text.push(model.tokenBytes(next));
      if (chunk) emit(chunk);
      if (text.stopped) {
        finishReason = 'stop';
        break;
      }
      if (generated.length >= maxTokens) break;
      await scheduler.submit(sequence, Int32Array.of(next), held, { signal: options.signal, onOutput: sample });
      held++;
    }
    const tail = text.end();
    if (tail) emit(tail);
    return {
      text: text.text,
      tokens: Int32Array.from(generated),
      promptTokens: prompt.length,
      cachedTokens,
      evaluatedTokens: prompt.length - cachedTokens,
      tier,
      restoreMs,
      ttftMs,
      totalMs: performance.now() - started,
      finishReason,
    };
  } catch (err) {
    // Leave the sequence holding exactly what this call knows it evaluated (an aborted prompt may
    // have left earlier batches of itself behind).
    if (!context.isDisposed) await context.exclusive(() => context.memory.remove(sequence, held)).catch(() => undefined);
    throw err;
  } finally {
    sampler.dispose();
    // The sequence holds the prompt and every generated token but the last (never evaluated).
    if (cache && !context.isDisposed) {
      const all = new Int32Array(prompt.length + generated.length);
      all.set(prompt);
      all.set(generated, prompt.length);
      cache.setResident(context, sequence, all.subarray(0, held));
    }
  }
}

/**
 * Turns token bytes into text chunks: multi-byte characters split across tokens are held until
 * complete, and text that could be the start of a stop string is held until it is known not to be.
 */
class TextStream {
  text = '';
  stopped = false;
  private readonly decoder = new TextDecoder('utf-8');
  private pending = '';

  constructor(private readonly stops: readonly string[]) {}

  push(bytes: Uint8Array): string {
    return this.accept(this.decoder.decode(bytes, { stream: true }));
  }

  end(): string {
    if (this.stopped) return '';
    const rest = this.pending + this.decoder.decode();
    this.pending = '';
    this.text += rest;
    return rest;
  }

  private accept(piece: string): string {
    if (this.stopped) return '';
    let buffer = this.pending + piece;
    for (const stop of this.stops) {
      const at = stop.length > 0 ? buffer.indexOf(stop) : -1;
      if (at >= 0) {
        buffer = buffer.slice(0, at);
        this.stopped = true;
      }
    }
    let keep = 0;
    if (!this.stopped) {
      for (const stop of this.stops) {
        for (let n = Math.min(stop.length - 1, buffer.length); n > keep; n--) {
          if (buffer.endsWith(stop.slice(0, n))) {
            keep = n;
            break;
          }
        }
      }
    }
    const ready = buffer.slice(0, buffer.length - keep);
    this.pending = buffer.slice(buffer.length - keep);
    this.text += ready;
    return ready;
  }
}
