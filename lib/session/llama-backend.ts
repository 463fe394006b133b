/**
 * A conversation on one sequence of a llama.cpp context.
 *
 * The tokens it keeps in its sequence are always the canonical tokens of the window: the system
 * prefix and each message rendered with the chat template and tokenized on its own. After a reply,
 * whatever differs from that (the end-of-turn tokens that were never decoded, a tokenization that
 * differs from the sampled tokens) is re-evaluated. So a checkpoint's tokens are a prefix of the
 * tokens a resume computes from the transcript, and restoring it is exact.
 */
import path from 'node:path';
import { readEntryFile, writeEntry, entryKey, verifiedRanges, type EntryHeader } from '../cache/entry.js';
import { contextIdentity, mismatchReason } from '../cache/identity.js';
import { PromptCache, commonPrefix } from '../cache/prompt-cache.js';
import { generate, templateLabel, type GenerationResult } from '../generate/generate.js';
import type { Context } from '../llama/context.js';
import type { ChatMessage } from '../llama/model.js';
import { requireInteger } from '../util/validate.js';
import { checkpointFileName, setupSystemMessages, type ConversationBackend, type ConversationSetup, type OverflowPolicy, type ReplyOptions, type WrittenCheckpoint } from './backend.js';
import { ioError } from './files.js';

export class LlamaSequenceBackend implements ConversationBackend {
  /** Tokens the sequence holds, from position 0. */
  private held: Int32Array = new Int32Array(0);
  private readonly prefixTokens: Int32Array;

  constructor(
    readonly context: Context,
    private readonly setup: ConversationSetup,
    private readonly cache: PromptCache,
    private readonly sequence: number,
  ) {
    this.prefixTokens = this.systemMessages().length > 0 ? this.tokenize(this.render(this.systemMessages(), false)) : new Int32Array(0);
  }

  get capacity(): number {
    return this.context.info.sequenceContextSize;
  }

  effectivePolicy(policy: OverflowPolicy): OverflowPolicy {
    return policy === 'shift' && !this.context.info.canShift ? 'drop-oldest' : policy;
  }

  measure(messages: readonly ChatMessage[], addAssistant: boolean, withPrefix = true): number {
    return this.canonicalTokens(messages, addAssistant, withPrefix).length;
  }

  replyLimit(maxTokens: number | undefined): number {
    return requireInteger(maxTokens ?? 256, 'maxTokens', 1);
  }

  systemMessages(): ChatMessage[] {
    return setupSystemMessages(this.setup);
  }

  /** Checkpoint names start with the turn count and time: their order is their age. */
  async newestFirst<F extends { file: string; regular: boolean }>(files: F[]): Promise<F[]> {
    return files;
  }

  forget(): void {
    this.held = new Int32Array(0);
  }

  async reply(messages: readonly ChatMessage[], options: ReplyOptions, emit: (chunk: string) => void): Promise<GenerationResult> {
    const prompt = this.canonicalTokens(messages, true);
    const inner = generate(this.context, {
      prompt,
      prefixLength: this.prefixTokens.length,
      cache: this.cache,
      sequence: this.sequence,
      maxTokens: this.replyLimit(options.maxTokens),
      ...(options.sampling ? { sampling: options.sampling } : {}),
      ...(options.stop ? { stop: options.stop } : {}),
      ...(options.signal ? { signal: options.signal } : {}),
      ...(options.onProgress ? { onProgress: options.onProgress } : {}),
    });
    try {
      for await (const chunk of inner) emit(chunk);
    } finally {
      // Whatever happened, know what the sequence holds: the prompt and generated tokens, as far
      // as they were evaluated.
      const result = await inner.result.catch(() => undefined);
      const evaluated = await this.context.exclusive(() => this.context.memory.range(this.sequence).max + 1);
      const all = new Int32Array(prompt.length + (result?.tokens.length ?? 0));
      all.set(prompt);
      if (result) all.set(result.tokens, prompt.length);
      this.held = all.slice(0, Math.min(evaluated, all.length));
    }
    return inner.result;
  }

  /** Removes the oldest `count` messages' cells and moves the rest down (RoPE shift), instead of
   * re-evaluating them. The shifted cells keep what they attended to before: an approximation,
   * which is why it is an opt-in policy. */
  async shiftOut(messages: readonly ChatMessage[], count: number): Promise<void> {
    const start = this.prefixTokens.length;
    const removed = this.canonicalTokens(messages.slice(0, count), false, false).length;
    const kept = this.canonicalTokens(messages.slice(count), false, false);
    const heldAfterPrefix = this.held.length - start;
    if (heldAfterPrefix < removed) return; // nothing cached to shift: catchUp() evaluates instead
    await this.context.exclusive(() => {
      this.context.memory.remove(this.sequence, start, start + removed);
      this.context.memory.shift(this.sequence, -removed, start + removed);
    });
    const next = new Int32Array(start + Math.min(kept.length, heldAfterPrefix - removed));
    next.set(this.held.subarray(0, start));
    next.set(kept.subarray(0, next.length - start), start);
    this.held = next;
  }

  async summarize(messages: readonly ChatMessage[]): Promise<string> {
    const limit = this.context.info.sequenceContextSize;
    let transcript = messages.map((m) => `${m.role}: ${m.content}`).join('\n');
    // Keep the request well inside the context: the newest part of what is dropped matters most.
    const budget = Math.floor(limit / 2);
    while (this.context.model.tokenize(transcript).length > budget) transcript = transcript.slice(Math.floor(transcript.length / 4));
    const result = await generate(this.context, {
      messages: [
        { role: 'system', content: 'Summarise the conversation below in a few sentences, keeping names, facts and open questions.' },
        { role: 'user', content: transcript },
      ],
      sequence: this.sequence,
      maxTokens: Math.min(160, Math.floor(limit / 8)),
      ...(this.setup.template !== undefined ? { template: this.setup.template } : {}),
    }).result;
    // The summary request replaced the sequence's contents; catchUp() rebuilds them.
    this.held = new Int32Array(0);
    return result.text.trim();
  }

  async restoreCheckpoint(file: string, messages: readonly ChatMessage[]): Promise<number> {
    const entry = await readEntryFile(file);
    const reason = mismatchReason(entry.header, contextIdentity(this.context));
    if (reason) throw new Error(reason);
    if (commonPrefix(entry.header.tokens, this.canonicalTokens(messages, false)) !== entry.header.tokenCount) {
      throw new Error('its tokens are not a prefix of the transcript');
    }
    await this.context.importVerifiedFile(file, verifiedRanges(entry), { sequence: this.sequence });
    this.held = Int32Array.from(entry.header.tokens);
    this.cache.setResident(this.context, this.sequence, this.held);
    return entry.header.tokenCount;
  }

  async writeCheckpoint(dir: string, stamp: string, label: string): Promise<WrittenCheckpoint> {
    const payload = await this.context.exportState({ sequence: this.sequence });
    const tokens = Array.from(this.held);
    const header: EntryHeader = {
      ...contextIdentity(this.context),
      tokenCount: tokens.length,
      tokens,
      label,
      createdAt: new Date().toISOString(),
      payloadBytes: payload.length,
    };
    const file = path.join(dir, checkpointFileName(stamp, entryKey(header)));
    const bytes = await writeEntry(file, header, payload).catch((err: unknown) => {
      throw ioError(err, `write the checkpoint ${file}`);
    });
    return { path: file, tokens: tokens.length, bytes };
  }

  /**
   * Makes the sequence hold exactly the canonical tokens of the window, evaluating what it lacks.
   * A system prefix it lacks is first looked up in the prompt cache (another session or process
   * may have it) and, when evaluated here, saved there.
   */
  async catchUp(messages: readonly ChatMessage[]): Promise<{ restored: number; evaluated: number }> {
    const target = this.canonicalTokens(messages, false);
    const prefix = this.prefixTokens.length;
    const sharePrefix = prefix >= this.cache.minTokens;
    let keep = commonPrefix(this.held, target);
    let restored = 0;
    if (sharePrefix && keep < prefix) {
      restored = (await this.cache.restore(this.context, target, { sequence: this.sequence })).cachedTokens;
      keep = restored;
    } else {
      await this.context.exclusive(() => this.context.memory.remove(this.sequence, keep));
    }
    this.held = target.slice(0, keep);
    const evaluated = target.length - keep;
    if (sharePrefix && keep < prefix) {
      await this.context.decode(target.subarray(keep, prefix), { sequence: this.sequence, start: keep, logits: 'none' });
      this.held = target.slice(0, prefix);
      await this.cache.save(this.context, this.held, { sequence: this.sequence, label: templateLabel(this.prefixTokens) });
      keep = prefix;
    }
    if (keep < target.length) {
      await this.context.decode(target.subarray(keep), { sequence: this.sequence, start: keep, logits: 'none' });
      this.held = target;
    }
    this.cache.setResident(this.context, this.sequence, this.held);
    return { restored, evaluated };
  }

  private render(messages: readonly ChatMessage[], addAssistant: boolean): string {
    return this.context.model.applyChatTemplate([...messages], { addAssistant, ...(this.setup.template !== undefined ? { template: this.setup.template } : {}) });
  }

  private tokenize(text: string): Int32Array {
    return this.context.model.tokenize(text, { special: true });
  }

  /**
   * The canonical tokens of the system prefix (unless `withPrefix` is false) and `messages`: each
   * message rendered as the template's increment over the ones before it and tokenized on its own,
   * so a message has the same tokens whatever follows it.
   */
  private canonicalTokens(messages: readonly ChatMessage[], addAssistant: boolean, withPrefix = true): Int32Array {
    const system = this.systemMessages();
    const parts: Int32Array[] = withPrefix ? [this.prefixTokens] : [];
    let rendered = system.length > 0 ? this.render(system, false) : '';
    const all = [...system];
    for (const message of messages) {
      all.push(message);
      const next = this.render(all, false);
      // A template that rewrites earlier messages in context cannot be split: fall back to one piece.
      if (!next.startsWith(rendered)) return this.wholeTokens(messages, addAssistant, withPrefix);
      parts.push(this.tokenize(next.slice(rendered.length)));
      rendered = next;
    }
    if (addAssistant) {
      const withHeader = this.render(all, true);
      if (!withHeader.startsWith(rendered)) return this.wholeTokens(messages, addAssistant, withPrefix);
      parts.push(this.tokenize(withHeader.slice(rendered.length)));
    }
    return concat(parts);
  }

  private wholeTokens(messages: readonly ChatMessage[], addAssistant: boolean, withPrefix: boolean): Int32Array {
    const system = this.systemMessages();
    const prefixText = system.length > 0 ? this.render(system, false) : '';
    const text = this.render([...system, ...messages], addAssistant);
    const rest = this.tokenize(text.startsWith(prefixText) ? text.slice(prefixText.length) : text);
    return withPrefix ? concat([this.prefixTokens, rest]) : rest;
  }
}

function concat(parts: Int32Array[]): Int32Array {
  const out = new Int32Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.length;
  }
  return out;
}
