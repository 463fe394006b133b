/**
 * A conversation on an RKLLM model (the NPU).
 *
 * The runtime takes text and keeps its own multi-turn state: with keep_history a run appends its
 * input and the generated tokens to the KV cache, and the next run continues from there. kvstash
 * cannot read that state back, but the runtime can save the cache of a run's prompt
 * (prompt_cache_params) and match a loaded cache against the start of a later prompt. So:
 *
 * - The conversation is rendered as text by this backend — the system block, each user input
 *   between the chat template's prefix and postfix, each reply followed by the template's turnEnd,
 *   tool results as a <tool_response> block in the next input — and the runtime's template is
 *   emptied, so the runtime sees exactly that text and nothing else.
 * - Every reply runs with keep_history. While the runtime holds the conversation so far (`held`),
 *   a turn's input is only what the transcript adds after it: the end of the previous reply and the
 *   new user input. That is the least any turn can prefill: the replies are already in the KV cache
 *   as the runtime generated them.
 * - Anything else (the first turn, a resume, a turn after an overflow dropped the oldest messages,
 *   after a summary, after another user of the model ran in between) clears the history and sends
 *   the whole window; the runtime then matches the loaded prompt cache against its start, so only
 *   what follows the cache is prefilled. The loaded cache is always one whose rendering is a prefix
 *   of the window: the newest checkpoint, else the system prompt's cache, else none.
 * - A checkpoint is the window rendered, run once without generating and saved through
 *   prompt_cache_params, as a kvstash entry of kind 'rkllm/prompt-cache' (atomic, verified). The
 *   runtime's kept history is not something it can save, so a checkpoint prefills what the window
 *   has past the loaded cache (the turns since the previous checkpoint, replies included) once,
 *   then loads the new checkpoint in place of the old one.
 *
 * Units: UTF-8 bytes of the rendered text (the runtime gives kvstash no tokenizer; a token is at
 * least one byte, so this never underestimates; the fake runtime has one token per byte).
 */
import { createHash } from 'node:crypto';
import path from 'node:path';
import { entryKey, readEntryFile, readVerifiedEntry, type EntryHeader } from '../cache/entry.js';
import { DirectoryStore } from '../cache/store.js';
import type { CacheTier } from '../cache/prompt-cache.js';
import { mismatchReason } from '../cache/identity.js';
import { KvstashError } from '../errors.js';
import type { GenerationResult } from '../generate/generate.js';
import type { ChatMessage } from '../llama/model.js';
import type { RkllmModel } from '../rkllm/model.js';
import { requireTokenLimit, type RkllmRuntime, type RkllmSampling } from '../rkllm/runtime.js';
import {
  captureRuntimePromptCache,
  extractRuntimePromptCache,
  removeTemporaryPayload,
  rkllmCacheIdentity,
  type RkllmCacheOwner,
} from '../rkllm/system-prompt-cache.js';
import { setupSystemMessages, type ConversationBackend, type ConversationSetup, type OverflowPolicy, type ReplyOptions, type WrittenCheckpoint } from './backend.js';
import { ioError } from './files.js';

/** The reply limit assumed for the overflow reserve when the runtime has none of its own. */
const UNLIMITED_REPLY_RESERVE = 256;

export class RkllmConversationBackend implements ConversationBackend {
  /** The rendered text the runtime's history holds; '' when it holds nothing known. */
  private held = '';
  /** The runtime's history may hold something other than `held`: clear it before a fresh run. */
  private dirty = true;
  /** The rendering of the prompt cache loaded in the runtime. */
  private loaded: string | undefined;
  /** The runtime may hold a prompt cache someone else loaded: release it before relying on none. */
  private foreignCache = false;

  constructor(
    readonly model: RkllmModel,
    private readonly setup: ConversationSetup,
    options: { sequence?: number },
  ) {
    if (setup.template !== undefined) {
      throw new TypeError("template applies to llama.cpp contexts; an RKLLM model's template is the chatTemplate given to loadRkllmModel");
    }
    if (options.sequence !== undefined && options.sequence !== 0) {
      throw new RangeError('sequence: an RKLLM model runs one conversation at a time (sequence 0)');
    }
  }

  get capacity(): number {
    return this.model.runtime.params.maxContextLen;
  }

  effectivePolicy(policy: OverflowPolicy): OverflowPolicy {
    if (policy === 'shift') {
      throw new KvstashError(
        'E_SHIFT_UNSUPPORTED',
        "overflow policy 'shift' cannot hold on an RKLLM model: the runtime cannot remove the oldest turns from its KV cache " +
          "and move the rest down (its clear_kv_cache ranges apply only to a paused run without history); use 'drop-oldest' or 'summarize'",
        { reason: 'the RKLLM runtime cannot shift KV positions' },
      );
    }
    return policy;
  }

  measure(messages: readonly ChatMessage[], _addAssistant: boolean, withPrefix = true): number {
    const text = withPrefix ? this.render(messages) : this.renderMessages(messages);
    return Buffer.byteLength(text, 'utf8');
  }

  replyLimit(maxTokens: number | undefined): number {
    const { params, version } = this.model.runtime;
    if (maxTokens === undefined) return params.maxNewTokens > 0 ? params.maxNewTokens : UNLIMITED_REPLY_RESERVE;
    requireTokenLimit(maxTokens, 'maxTokens');
    if (version !== '1.3.0' && maxTokens !== params.maxNewTokens) {
      throw new RangeError(
        `maxTokens: runtime ${version} fixes the token limit when the model loads (maxNewTokens ${params.maxNewTokens}); pass maxNewTokens to loadRkllmModel instead`,
      );
    }
    return maxTokens;
  }

  systemMessages(): ChatMessage[] {
    return setupSystemMessages(this.setup);
  }

  /**
   * Checkpoints are named by their key: their age is the stamp in their header. A file whose header
   * cannot be read comes first, so that resume reports it (and rotation counts it) instead of
   * passing it over in silence.
   */
  async newestFirst<F extends { file: string; regular: boolean }>(files: F[]): Promise<F[]> {
    const UNREADABLE = '\uffff';
    const stamped = await Promise.all(
      files.map(async (f) => ({
        f,
        stamp: f.regular ? await readEntryFile(f.file).then((e) => String(e.header.layout.checkpointStamp ?? ''), () => UNREADABLE) : UNREADABLE,
      })),
    );
    return stamped.sort((a, b) => (a.stamp < b.stamp ? 1 : a.stamp > b.stamp ? -1 : 0)).map((d) => d.f);
  }

  forget(): void {
    this.held = '';
    this.dirty = true;
  }

  /** Makes sure the right prompt cache is loaded; the window itself is prefilled with the next
   * reply (one run), so `evaluated` is what that run will prefill for it. */
  async catchUp(messages: readonly ChatMessage[]): Promise<{ restored: number; evaluated: number }> {
    const target = this.render(messages);
    return this.model.exclusive(this, async (runtime, intact) => {
      if (!intact) this.lost();
      if (!this.dirty && this.held !== '' && target.startsWith(this.held)) {
        return { restored: 0, evaluated: bytes(target) - bytes(this.held) };
      }
      await this.startFresh(runtime, target, undefined);
      const restored = this.loaded === undefined ? 0 : bytes(this.loaded);
      return { restored, evaluated: bytes(target) - restored };
    });
  }

  async reply(messages: readonly ChatMessage[], options: ReplyOptions, emit: (chunk: string) => void): Promise<GenerationResult> {
    if (options.stop !== undefined) throw new RangeError('stop: RKLLM models end a reply at their end-of-sequence token or maxTokens; stop strings are not supported');
    const sampling = this.sampling(options.sampling);
    const maxTokens = this.replyLimit(options.maxTokens);
    const target = this.render(messages);
    const started = performance.now();
    return this.model.exclusive(
      this,
      async (runtime, intact) => {
        if (!intact) this.lost();
        let input: string;
        let tier: CacheTier | null;
        if (!this.dirty && this.held !== '' && target.startsWith(this.held)) {
          input = target.slice(this.held.length);
          tier = 'resident';
        } else {
          await this.startFresh(runtime, target, options.signal);
          input = target;
          tier = this.loaded === undefined ? null : 'disk';
        }
        this.dirty = true; // until the run has ended as expected
        const total = bytes(input);
        options.onProgress?.(0, total);
        let firstChunkAt: number | undefined;
        const run = await runtime.run({
          prompt: input,
          keepHistory: true,
          ...(runtime.version === '1.3.0' ? { maxNewTokens: maxTokens } : {}),
          ...(sampling ? { sampling } : {}),
          ...(options.signal ? { signal: options.signal } : {}),
          onToken: (text) => {
            if (text === '') return;
            firstChunkAt ??= performance.now();
            emit(text);
          },
        });
        options.onProgress?.(total, total);
        this.held = target + run.text;
        this.dirty = false;
        const kept = (await runtime.kvCacheSize())[0] ?? 0;
        const promptTokens = Math.max(run.perf.prefillTokens, kept - run.tokenIds.length);
        return {
          text: run.text,
          tokens: run.tokenIds,
          promptTokens,
          cachedTokens: promptTokens - run.perf.prefillTokens,
          evaluatedTokens: run.perf.prefillTokens,
          tier: promptTokens > run.perf.prefillTokens ? tier : null,
          restoreMs: 0,
          ttftMs: (firstChunkAt ?? performance.now()) - started,
          totalMs: performance.now() - started,
          finishReason: run.tokenIds.length >= maxTokens ? 'length' : 'eog',
        };
      },
      options.signal,
    );
  }

  shiftOut(): Promise<void> {
    // effectivePolicy() refuses 'shift' before a session opens.
    return Promise.reject(new KvstashError('E_SHIFT_UNSUPPORTED', 'an RKLLM model cannot shift KV positions'));
  }

  async summarize(messages: readonly ChatMessage[]): Promise<string> {
    const template = this.model.chatTemplate;
    const transcript = messages.map((m) => `${m.role}: ${m.content}`).join('\n');
    // Keep the request well inside the context: the newest part of what is dropped matters most.
    const budget = Math.floor(this.capacity / 2);
    const trimmed = Buffer.from(transcript, 'utf8');
    const text = trimmed.length > budget ? trimmed.subarray(trimmed.length - budget).toString('utf8').replace(/^\uFFFD+/, '') : transcript;
    const prompt =
      template.system.replace('{system}', () => 'Summarise the conversation below in a few sentences, keeping names, facts and open questions.') +
      template.prefix +
      text +
      template.postfix;
    const limit = Math.min(160, Math.floor(this.capacity / 8));
    return this.model.exclusive(this, async (runtime, intact) => {
      if (!intact) this.lost();
      await this.clearHistory(runtime);
      await runtime.setChatTemplate('', '', '');
      this.dirty = true;
      const run = await runtime.run({ prompt, keepHistory: false, ...(runtime.version === '1.3.0' ? { maxNewTokens: Math.max(1, limit) } : {}) });
      this.held = '';
      return run.text.trim();
    });
  }

  async writeCheckpoint(dir: string, stamp: string, label: string, messages: readonly ChatMessage[]): Promise<WrittenCheckpoint> {
    const text = this.render(messages);
    // The stamp (turn count, time) orders checkpoints, whose names are their keys.
    const identity = rkllmCacheIdentity(this.owner(), { conversationSha256: sha256(text), conversationBytes: String(bytes(text)), checkpointStamp: stamp });
    const key = entryKey({ ...identity, tokens: [] });
    return this.model.exclusive(this, async (runtime, intact) => {
      if (!intact) this.lost();
      await this.startFresh(runtime, text, undefined);
      this.dirty = true;
      const { payload, payloadPath } = await captureRuntimePromptCache(dir, key, async (temporary) => {
        await runtime.run({ prompt: text, mode: 'lastHiddenLayer', keepHistory: false, savePromptCache: temporary });
      });
      try {
        const header: EntryHeader = {
          ...identity,
          tokenCount: 0,
          tokens: [],
          label,
          createdAt: new Date().toISOString(),
          payloadBytes: payload.length,
        };
        // Named by its key, as in any cache directory: PromptCache and `kvstash ls|verify|rm
        // --cache-dir <session>/checkpoints` see checkpoints like every other entry.
        const store = new DirectoryStore(dir);
        const file = store.pathOf(key);
        const written = await store.write(key, header, payload).catch((err: unknown) => {
          throw ioError(err, `write the checkpoint ${file}`);
        });
        // The next fresh run matches the whole window against the new checkpoint.
        await this.load(runtime, payloadPath, text);
        return { path: file, tokens: bytes(text), bytes: written };
      } finally {
        await removeTemporaryPayload(payloadPath);
      }
    });
  }

  async restoreCheckpoint(file: string, messages: readonly ChatMessage[]): Promise<number> {
    const { entry, payload } = await readVerifiedEntry(file);
    const reason =
      mismatchReason(entry.header, rkllmCacheIdentity(this.owner())) ??
      (entry.header.tokenCount !== 0 ? 'it holds tokens, not an RKLLM conversation' : null);
    if (reason) throw new KvstashError('E_CACHE_MISMATCH', `checkpoint ${file} was not loaded: ${reason}`, { reason });
    const length = Number(entry.header.layout.conversationBytes);
    const target = Buffer.from(this.render(messages), 'utf8');
    if (!Number.isSafeInteger(length) || length <= 0 || length > target.length || sha256(target.subarray(0, length)) !== entry.header.layout.conversationSha256) {
      throw new KvstashError('E_CACHE_MISMATCH', `checkpoint ${file} was not loaded: its conversation is not a prefix of the transcript`, {
        reason: 'its conversation is not a prefix of the transcript',
      });
    }
    const text = target.subarray(0, length).toString('utf8');
    const payloadPath = await extractRuntimePromptCache(path.dirname(file), entry.key, payload);
    try {
      await this.model.exclusive(this, async (runtime, intact) => {
        if (!intact) this.lost();
        await this.clearHistory(runtime);
        await this.load(runtime, payloadPath, text);
      });
    } finally {
      await removeTemporaryPayload(payloadPath);
    }
    return length;
  }

  // -------------------------------------------------------------------------------------------

  /** Someone else used the runtime since this backend did: nothing it knew holds. */
  private lost(): void {
    this.held = '';
    this.dirty = true;
    this.loaded = undefined;
    this.foreignCache = true;
  }

  /** Empties the runtime's history and template, and loads a prompt cache that is a prefix of
   * `target` (the one loaded when it is, else the system prompt's). */
  private async startFresh(runtime: RkllmRuntime, target: string, signal: AbortSignal | undefined): Promise<void> {
    await this.clearHistory(runtime);
    if (this.loaded !== undefined && target.startsWith(this.loaded)) {
      await runtime.setChatTemplate('', '', '');
      return;
    }
    await this.release(runtime);
    const system = this.render([]);
    // Finds or makes the system prompt's cache (making it runs the runtime, with its template empty).
    const prepared = target.startsWith(system) ? await this.model.systemPromptCacheFor(system, signal) : undefined;
    await runtime.setChatTemplate('', '', '');
    if (prepared === undefined) return;
    try {
      await this.load(runtime, prepared.payloadPath, system);
    } catch {
      // A cache the runtime refuses costs its prefill, never the turn.
    } finally {
      await removeTemporaryPayload(prepared.payloadPath);
    }
  }

  private async clearHistory(runtime: RkllmRuntime): Promise<void> {
    if (this.dirty || this.held !== '') await runtime.clearKvCache();
    this.held = '';
    this.dirty = false;
  }

  private async load(runtime: RkllmRuntime, payloadPath: string, text: string): Promise<void> {
    await this.release(runtime);
    await runtime.loadPromptCache(payloadPath);
    this.loaded = text;
  }

  private async release(runtime: RkllmRuntime): Promise<void> {
    if (this.loaded === undefined && !this.foreignCache) return;
    this.loaded = undefined;
    this.foreignCache = false;
    await runtime.releasePromptCache();
  }

  private owner(): RkllmCacheOwner {
    const { runtime } = this.model;
    return {
      runtimeVersion: runtime.version,
      modelIdentity: this.model.identity,
      modelName: this.model.name,
      maxContextLen: runtime.params.maxContextLen,
      nBatch: runtime.params.nBatch,
    };
  }

  private sampling(options: ReplyOptions['sampling']): Partial<RkllmSampling> | undefined {
    if (options === undefined) return undefined;
    if (this.model.runtime.version !== '1.3.0') {
      throw new RangeError(`sampling: per-reply sampling needs runtime 1.3.0; with ${this.model.runtime.version} pass it to loadRkllmModel`);
    }
    const out: Record<string, number> = {};
    for (const key of ['temperature', 'topK', 'topP', 'repeatPenalty', 'frequencyPenalty', 'presencePenalty'] as const) {
      if (options[key] !== undefined) out[key] = options[key]!;
    }
    return out as Partial<RkllmSampling>;
  }

  /** The system block and `messages`, as the runtime sees them. */
  private render(messages: readonly ChatMessage[]): string {
    const template = this.model.chatTemplate;
    const system = this.systemMessages().map((m) => template.system.replace('{system}', () => m.content)).join('');
    return system + this.renderMessages(messages);
  }

  /**
   * Each message's text depends only on the messages before it, so the rendering of a window is a
   * prefix of the rendering of any longer one: checkpoints and the kept history stay prefixes.
   * Tool results open a user input (ChatML's <tool_response> blocks), which the next user message
   * continues.
   */
  private renderMessages(messages: readonly ChatMessage[]): string {
    const template = this.model.chatTemplate;
    let out = '';
    let inputOpen = false;
    for (const message of messages) {
      if (message.role === 'tool') {
        out += `${inputOpen ? '\n' : template.prefix}<tool_response>\n${message.content}\n</tool_response>`;
        inputOpen = true;
      } else if (message.role === 'user') {
        out += `${inputOpen ? '\n' : template.prefix}${message.content}${template.postfix}`;
        inputOpen = false;
      } else if (message.role === 'assistant') {
        out += `${message.content}${template.turnEnd ?? ''}`;
      } else {
        out += `${inputOpen ? template.postfix : ''}${template.system.replace('{system}', () => message.content)}`;
        inputOpen = false;
      }
    }
    return out;
  }
}

function bytes(text: string): number {
  return Buffer.byteLength(text, 'utf8');
}

function sha256(data: string | Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}
