/**
 * Durable conversations. The transcript (a checksummed, fsynced journal) is the source of truth;
 * KV checkpoints (kvstash cache entries) only make resuming fast. A session killed at any moment
 * resumes with every turn whose send() had completed.
 *
 * The tokens a session keeps in its sequence are always the canonical tokens of its transcript:
 * the system prefix and each message rendered with the chat template and tokenized on its own.
 * After a reply, whatever differs from that (the end-of-turn tokens that were never decoded, a
 * tokenization that differs from the sampled tokens) is re-evaluated. So a checkpoint's tokens are
 * a prefix of the tokens a resume computes from the transcript, and restoring it is exact.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { readEntryFile, writeEntry, entryKey, verifiedRanges, type EntryHeader } from '../cache/entry.js';
import { contextIdentity, mismatchReason } from '../cache/identity.js';
import { PromptCache, commonPrefix } from '../cache/prompt-cache.js';
import { KvstashError } from '../errors.js';
import { Generation, generate, templateLabel, type GenerationResult } from '../generate/generate.js';
import type { Context } from '../llama/context.js';
import type { ChatMessage } from '../llama/model.js';
import type { SamplingOptions } from '../llama/sampler.js';
import { OperationQueue } from '../llama/queue.js';
import { requireInteger, requireString } from '../util/validate.js';
import { Journal, type JournalDamage } from './journal.js';
import { ioError, ownFileExists, requireOwnDirectory } from './files.js';
import { acquireLock, type Lock } from './lock.js';
import { onProcessExit } from './exit-hooks.js';

export type OverflowPolicy = 'drop-oldest' | 'summarize' | 'shift';

export interface CheckpointOptions {
  /** Checkpoint after this many completed turns. Default 4; 0 disables. */
  everyTurns?: number;
  /** Checkpoint when a turn completes this long after the last checkpoint. Default 60. Unit: s; 0 disables. */
  everySeconds?: number;
  /** Also checkpoint on SIGTERM, SIGINT and beforeExit. Default false. */
  onExit?: boolean;
  /** Checkpoints kept on disk (older ones are deleted). Default 2. */
  keep?: number;
}

export interface OverflowOptions {
  /** What to do before a turn would not fit the context. Default 'drop-oldest'. */
  policy?: OverflowPolicy;
  /** For 'summarize': turns the dropped messages into a summary. Default: the session's model
   * summarises them itself. */
  summarize?: (messages: ChatMessage[]) => Promise<string>;
}

export interface SessionOptions {
  /** Directory holding sessions; this one lives in `<dir>/<id>/`. */
  dir: string;
  id: string;
  context: Context;
  /** Shares the system prefix with other sessions and generate() calls. Default: a RAM-only cache. */
  cache?: PromptCache;
  /** The context sequence this session uses. Default 0. */
  sequence?: number;
  checkpoint?: CheckpointOptions;
  overflow?: OverflowOptions;
}

export interface OpenOptions extends SessionOptions {
  system?: string;
  tools?: unknown;
  /** Chat template (text or built-in name) instead of the model's. */
  template?: string;
}

export interface SendOptions {
  /** Default 256. */
  maxTokens?: number;
  /** Default greedy. */
  sampling?: SamplingOptions;
  stop?: readonly string[];
  signal?: AbortSignal;
  onProgress?: (done: number, total: number) => void;
}

export type ResumePath = 'checkpoint' | 'cache' | 'prefill';

export interface ResumeReport {
  path: ResumePath;
  /** Tokens restored from the checkpoint or the prompt cache. */
  restoredTokens: number;
  /** Tokens evaluated to catch up with the transcript. */
  evaluatedTokens: number;
  ms: number;
  /** Checkpoints that could not be used, newest first, and why (corrupt, stale, other model). */
  skippedCheckpoints: Array<{ path: string; reason: string }>;
  /** Bytes of a torn last journal record that were dropped. */
  droppedJournalBytes: number;
  /**
   * Damage found before the journal's last intact record. Every intact record around it was
   * recovered; the damaged bytes stay in the file (they are reported again on every resume) and
   * the messages they held are missing from `history`. Empty `damaged` and 0 `lostBytes` when the
   * transcript is whole.
   */
  journal: { damaged: JournalDamage[]; lostBytes: number };
}

export interface SessionStats {
  turns: number;
  toolResults: number;
  /** Overflow events by policy. */
  clears: number;
  summaries: number;
  shifts: number;
  tokensDropped: number;
  checkpoints: number;
  checkpointFailures: number;
  resumes: Record<ResumePath, number>;
}

type JournalRecord =
  | { type: 'open'; version: 1; id: string; system?: string; tools?: unknown; template?: string; createdAt: string }
  | { type: 'exchange'; user: string; assistant: string; at: string }
  | { type: 'tool'; name: string; content: string; at: string }
  | { type: 'drop'; count: number; shifted: boolean; at: string }
  | { type: 'summary'; count: number; content: string; at: string };

const SUMMARY_PREFIX = 'Summary of the earlier conversation:\n';

export class Session {
  /** Every message of the conversation, oldest first (also those dropped from the context). */
  readonly history: ChatMessage[] = [];
  /** How the last resume went (undefined for a session opened new). */
  readonly resumeReport: ResumeReport | undefined;
  private readonly view: ChatMessage[] = [];
  private readonly queue = new OperationQueue();
  private readonly sequence: number;
  private readonly cache: PromptCache;
  private readonly checkpointDir: string;
  private readonly checkpointOptions: Required<Omit<CheckpointOptions, 'onExit'>>;
  private readonly overflow: Required<Pick<OverflowOptions, 'policy'>> & OverflowOptions;
  /** Tokens the sequence holds, from position 0. */
  private held: Int32Array = new Int32Array(0);
  private prefixTokens: Int32Array = new Int32Array(0);
  private turnsSinceCheckpoint = 0;
  private lastCheckpointAt = Date.now();
  private closed = false;
  private removeExitHook: (() => void) | undefined;
  private counters: SessionStats = {
    turns: 0,
    toolResults: 0,
    clears: 0,
    summaries: 0,
    shifts: 0,
    tokensDropped: 0,
    checkpoints: 0,
    checkpointFailures: 0,
    resumes: { checkpoint: 0, cache: 0, prefill: 0 },
  };

  private constructor(
    readonly id: string,
    readonly dir: string,
    readonly context: Context,
    private readonly meta: Extract<JournalRecord, { type: 'open' }>,
    private readonly journal: Journal<JournalRecord>,
    private readonly lock: Lock,
    options: SessionOptions,
    report?: ResumeReport,
  ) {
    this.sequence = options.sequence ?? 0;
    this.cache = options.cache ?? new PromptCache({ dir: null });
    this.checkpointDir = path.join(dir, 'checkpoints');
    this.checkpointOptions = {
      everyTurns: requireInteger(options.checkpoint?.everyTurns ?? 4, 'checkpoint.everyTurns', 0),
      everySeconds: requireInteger(options.checkpoint?.everySeconds ?? 60, 'checkpoint.everySeconds', 0),
      keep: requireInteger(options.checkpoint?.keep ?? 2, 'checkpoint.keep', 1),
    };
    this.overflow = { ...options.overflow, policy: options.overflow?.policy ?? 'drop-oldest' };
    this.resumeReport = report;
    if (options.checkpoint?.onExit) this.removeExitHook = onProcessExit(() => this.checkpoint().then(() => undefined));
    this.prefixTokens = this.systemMessages().length > 0 ? this.tokenize(this.render(this.systemMessages(), false)) : new Int32Array(0);
  }

  /** Starts a new session. Rejects with E_SESSION_EXISTS when `<dir>/<id>` holds one. */
  static async open(options: OpenOptions): Promise<Session> {
    const dir = sessionDir(options);
    await fsp.mkdir(dir, { recursive: true });
    const lock = await acquireLock(dir);
    try {
      const file = path.join(dir, 'journal.kvj');
      if (((await ownFileExists(file, 'journal'))?.size ?? 0) > 0) {
        throw new KvstashError('E_SESSION_EXISTS', `session ${options.id} already exists in ${options.dir}; use Session.resume()`);
      }
      const { journal } = (await Journal.open<JournalRecord>(file, { create: true }))!;
      const meta: Extract<JournalRecord, { type: 'open' }> = {
        type: 'open',
        version: 1,
        id: options.id,
        ...(options.system !== undefined ? { system: options.system } : {}),
        ...(options.tools !== undefined ? { tools: options.tools } : {}),
        ...(options.template !== undefined ? { template: options.template } : {}),
        createdAt: new Date().toISOString(),
      };
      await journal.append(meta);
      const session = new Session(options.id, dir, options.context, meta, journal, lock, options);
      await session.queue.run(() => session.catchUp());
      return session;
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  /**
   * Resumes a session from its transcript: restores the newest valid checkpoint whose tokens are a
   * prefix of the transcript's and evaluates the rest; without one, restores what the prompt cache
   * has of it (the system prefix) and evaluates the rest. `resumeReport` says which path it took.
   */
  static async resume(options: SessionOptions): Promise<Session> {
    const started = performance.now();
    const dir = sessionDir(options);
    const file = path.join(dir, 'journal.kvj');
    const notFound = () => new KvstashError('E_SESSION_NOT_FOUND', `no session ${options.id} in ${options.dir}`);
    if (!(await ownFileExists(file, 'journal'))) throw notFound();
    const lock = await acquireLock(dir);
    try {
      const opened = await Journal.open<JournalRecord>(file, { create: false });
      if (!opened) throw notFound();
      const { journal, records, droppedBytes, damaged, unreadableBytes } = opened;
      const meta = records[0];
      if (!meta || meta.type !== 'open') {
        await journal.close();
        // Empty, or only a torn first record (cut): Session.open() never completed, so there is
        // no session, and open() may start one. Anything else is a session whose first record
        // (its system prompt and template) is damaged: never "not found", which would invite the
        // caller to start over in its place.
        if (records.length === 0 && unreadableBytes === 0) throw notFound();
        const intact = records.length === 0 ? 'no record is intact' : `${records.length} later records are intact`;
        throw new KvstashError(
          'E_SESSION_CORRUPT',
          `session ${options.id} in ${options.dir} cannot be resumed: the first record of its journal ${file} (its system prompt and template) is damaged and ${intact}; the file is left unchanged: copy it aside, or remove the session directory to start the session anew`,
          { reason: 'the journal\'s first record is damaged' },
        );
      }
      const lostBytes = damaged.reduce((n, d) => n + d.bytes, 0);
      const report: ResumeReport = {
        path: 'prefill',
        restoredTokens: 0,
        evaluatedTokens: 0,
        ms: 0,
        skippedCheckpoints: [],
        droppedJournalBytes: droppedBytes,
        journal: { damaged, lostBytes },
      };
      const session = new Session(options.id, dir, options.context, meta, journal, lock, options, report);
      for (const record of records.slice(1)) session.replay(record);
      await session.queue.run(() => session.restoreFromDisk(report));
      report.ms = performance.now() - started;
      session.counters.resumes[report.path]++;
      return session;
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  /** The messages the model currently sees after the system prompt (older ones may have been
   * dropped or summarised). */
  get messages(): readonly ChatMessage[] {
    return this.view;
  }

  /** Sends a user message; the reply streams from the Generation. The turn is on disk before
   * `result` resolves. */
  send(text: string, options: SendOptions = {}): Generation {
    requireString(text, 'text');
    return new Generation((emit) => this.queue.run(() => this.exchange(text, options, emit)));
  }

  /** Adds a tool's result to the conversation (an agent loop: call a tool, feed its result,
   * continue with send()). Resolves once it is on disk. */
  addToolResult(name: string, result: unknown): Promise<void> {
    requireString(name, 'name');
    const content = typeof result === 'string' ? result : JSON.stringify(result);
    return this.queue.run(async () => {
      this.requireOpen();
      await this.journal.append({ type: 'tool', name, content, at: new Date().toISOString() });
      this.replay({ type: 'tool', name, content, at: '' });
      await this.catchUp();
    });
  }

  /** Saves the sequence's KV state now (atomic, verified entry); older checkpoints beyond `keep` go. */
  checkpoint(): Promise<{ path: string; tokens: number; bytes: number }> {
    return this.queue.run(() => this.writeCheckpoint());
  }

  stats(): SessionStats {
    return { ...this.counters, resumes: { ...this.counters.resumes } };
  }

  /** Waits for running work, then releases the session (its lock, journal, exit hooks). */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.queue.drain();
    this.closed = true;
    this.removeExitHook?.();
    await this.journal.close();
    await this.lock.release();
  }

  // -------------------------------------------------------------------------------------------

  private async exchange(text: string, options: SendOptions, emit: (chunk: string) => void): Promise<GenerationResult> {
    this.requireOpen();
    const maxTokens = requireInteger(options.maxTokens ?? 256, 'maxTokens', 1);
    const user: ChatMessage = { role: 'user', content: text };
    // End-of-turn tokens and the canonical re-tokenization may add a few tokens past maxTokens.
    await this.makeRoom([user], maxTokens + 8);
    const prompt = this.canonicalTokens([...this.view, user], true);
    const inner = generate(this.context, {
      prompt,
      prefixLength: this.prefixTokens.length,
      cache: this.cache,
      sequence: this.sequence,
      maxTokens,
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
    const result = await inner.result;
    const assistant: ChatMessage = { role: 'assistant', content: result.text };
    await this.journal.append({ type: 'exchange', user: text, assistant: result.text, at: new Date().toISOString() });
    this.history.push(user, assistant);
    this.view.push(user, assistant);
    this.counters.turns++;
    this.turnsSinceCheckpoint++;
    await this.catchUp();
    const { everyTurns, everySeconds } = this.checkpointOptions;
    if ((everyTurns > 0 && this.turnsSinceCheckpoint >= everyTurns) || (everySeconds > 0 && Date.now() - this.lastCheckpointAt >= everySeconds * 1000)) {
      // A failed checkpoint costs speed on resume, never the turn: it is counted and the turn stands.
      await this.writeCheckpoint().catch(() => this.counters.checkpointFailures++);
    }
    return result;
  }

  /** Applies the overflow policy until `extra` messages and `reserve` tokens fit after the view. */
  private async makeRoom(extra: ChatMessage[], reserve: number): Promise<void> {
    const limit = this.context.info.sequenceContextSize;
    const needed = () => this.canonicalTokens([...this.view, ...extra], true).length + reserve;
    while (needed() > limit) {
      let count = this.turnLength();
      // A summary is folded into the next summary together with the turn after it, so every
      // round makes progress; a summary with nothing after it is dropped.
      const foldSummary = this.overflow.policy === 'summarize' && this.isSummary(this.view[0]) && this.turnLength(1) > 0;
      if (foldSummary) count = 1 + this.turnLength(1);
      if (count === 0) {
        throw new KvstashError('E_CONTEXT_FULL', `the message and maxTokens need ${needed()} tokens; the context holds ${limit} per sequence`);
      }
      const dropped = this.view.slice(0, count);
      const before = this.canonicalTokens(this.view, false).length;
      let policy = this.overflow.policy;
      if (policy === 'shift' && !this.context.info.canShift) policy = 'drop-oldest';
      if (policy === 'summarize' && (foldSummary || !this.isSummary(this.view[0]))) {
        const content = await (this.overflow.summarize ?? ((m) => this.summarizeWithModel(m)))(dropped);
        await this.journal.append({ type: 'summary', count, content, at: new Date().toISOString() });
        this.replay({ type: 'summary', count, content, at: '' });
        this.counters.summaries++;
      } else {
        await this.journal.append({ type: 'drop', count, shifted: policy === 'shift', at: new Date().toISOString() });
        if (policy === 'shift') await this.shiftOut(count);
        this.replay({ type: 'drop', count, shifted: policy === 'shift', at: '' });
        if (policy === 'shift') this.counters.shifts++;
        else this.counters.clears++;
      }
      this.counters.tokensDropped += Math.max(0, before - this.canonicalTokens(this.view, false).length);
    }
  }

  /** Messages of the oldest turn in the view from `start`: a tool result, a summary, or a user
   * message with the assistant reply that follows it. */
  private turnLength(start = 0): number {
    if (start >= this.view.length) return 0;
    if (this.view[start]!.role === 'user' && this.view[start + 1]?.role === 'assistant') return 2;
    return 1;
  }

  private isSummary(message: ChatMessage | undefined): boolean {
    return message?.role === 'system' && message.content.startsWith(SUMMARY_PREFIX);
  }

  /** Removes the oldest `count` messages' cells and moves the rest down (RoPE shift), instead of
   * re-evaluating them. The shifted cells keep what they attended to before: an approximation,
   * which is why it is an opt-in policy. */
  private async shiftOut(count: number): Promise<void> {
    const start = this.prefixTokens.length;
    const removed = this.canonicalTokens(this.view.slice(0, count), false, false).length;
    const kept = this.canonicalTokens(this.view.slice(count), false, false);
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

  private async summarizeWithModel(messages: ChatMessage[]): Promise<string> {
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
      ...(this.meta.template !== undefined ? { template: this.meta.template } : {}),
    }).result;
    // The summary request replaced the sequence's contents; catchUp() rebuilds them.
    this.held = new Int32Array(0);
    return result.text.trim();
  }

  /** Applies a journal record to the in-memory transcript. */
  private replay(record: JournalRecord): void {
    switch (record.type) {
      case 'exchange': {
        const user: ChatMessage = { role: 'user', content: record.user };
        const assistant: ChatMessage = { role: 'assistant', content: record.assistant };
        this.history.push(user, assistant);
        this.view.push(user, assistant);
        this.counters.turns++;
        break;
      }
      case 'tool': {
        const message: ChatMessage = { role: 'tool', content: `${record.name}: ${record.content}` };
        this.history.push(message);
        this.view.push(message);
        this.counters.toolResults++;
        break;
      }
      case 'drop':
        this.view.splice(0, record.count);
        break;
      case 'summary':
        this.view.splice(0, record.count, { role: 'system', content: `${SUMMARY_PREFIX}${record.content}` });
        break;
      case 'open':
        break;
    }
  }

  private async restoreFromDisk(report: ResumeReport): Promise<void> {
    const target = this.canonicalTokens(this.view, false);
    const here = contextIdentity(this.context);
    // Checkpoints only make resuming fast: checkpoints/ that is not the session's own directory
    // is reported and passed over, and the transcript is evaluated instead.
    const checkpoints = await this.listCheckpoints().catch((err: Error) => {
      report.skippedCheckpoints.push({ path: this.checkpointDir, reason: err.message });
      return [];
    });
    for (const { file, regular } of checkpoints) {
      try {
        if (!regular) throw new Error('it is not a regular file');
        const entry = await readEntryFile(file);
        const reason = mismatchReason(entry.header, here);
        if (reason) throw new Error(reason);
        if (commonPrefix(entry.header.tokens, target) !== entry.header.tokenCount) throw new Error('its tokens are not a prefix of the transcript');
        await this.context.importVerifiedFile(
          file,
          verifiedRanges(entry),
          { sequence: this.sequence },
        );
        this.held = Int32Array.from(entry.header.tokens);
        this.cache.setResident(this.context, this.sequence, this.held);
        report.path = 'checkpoint';
        report.restoredTokens = entry.header.tokenCount;
        break;
      } catch (err) {
        report.skippedCheckpoints.push({ path: file, reason: (err as Error).message });
      }
    }
    if (report.path !== 'checkpoint') this.held = new Int32Array(0);
    const { restored, evaluated } = await this.catchUp();
    if (report.path !== 'checkpoint') {
      report.path = restored > 0 ? 'cache' : 'prefill';
      report.restoredTokens = restored;
    }
    report.evaluatedTokens = evaluated;
  }

  /**
   * Makes the sequence hold exactly the canonical tokens of the view, evaluating what it lacks.
   * A system prefix it lacks is first looked up in the prompt cache (another session or process
   * may have it) and, when evaluated here, saved there. Resolves with the tokens restored from the
   * cache and the tokens evaluated.
   */
  private async catchUp(): Promise<{ restored: number; evaluated: number }> {
    const target = this.canonicalTokens(this.view, false);
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

  private async writeCheckpoint(): Promise<{ path: string; tokens: number; bytes: number }> {
    this.requireOpen();
    // Checked before and after: mkdir succeeds on a symlink to a directory, and rotation below
    // must never delete entries of a directory that is not the session's own.
    await requireOwnDirectory(this.checkpointDir, 'checkpoints directory');
    await fsp.mkdir(this.checkpointDir, { recursive: true }).catch((err: unknown) => {
      throw ioError(err, `create ${this.checkpointDir}`);
    });
    await requireOwnDirectory(this.checkpointDir, 'checkpoints directory');
    const payload = await this.context.exportState({ sequence: this.sequence });
    const tokens = Array.from(this.held);
    const header: EntryHeader = {
      ...contextIdentity(this.context),
      tokenCount: tokens.length,
      tokens,
      label: `session:${this.id}`,
      createdAt: new Date().toISOString(),
      payloadBytes: payload.length,
    };
    const stamp = `${String(this.counters.turns).padStart(8, '0')}-${Date.now()}`;
    const file = path.join(this.checkpointDir, `${stamp}-${entryKey(header).slice(0, 8)}.kvstash`);
    const bytes = await writeEntry(file, header, payload).catch((err: unknown) => {
      throw ioError(err, `write the checkpoint ${file}`);
    });
    const all = (await this.listCheckpoints()).filter((c) => c.regular);
    for (const old of all.slice(this.checkpointOptions.keep)) await fsp.rm(old.file, { force: true });
    this.counters.checkpoints++;
    this.turnsSinceCheckpoint = 0;
    this.lastCheckpointAt = Date.now();
    return { path: file, tokens: tokens.length, bytes };
  }

  /** Checkpoint files, newest first; `regular` is false for anything else named like one (a
   * symlink, a FIFO, a directory), which is never opened or deleted. Rejects with
   * E_SESSION_CORRUPT when checkpoints/ is not the session's own directory. */
  private async listCheckpoints(): Promise<Array<{ file: string; regular: boolean }>> {
    await requireOwnDirectory(this.checkpointDir, 'checkpoints directory');
    const entries = await fsp.readdir(this.checkpointDir, { withFileTypes: true }).catch(() => [] as fs.Dirent[]);
    return entries
      .filter((e) => e.name.endsWith('.kvstash') && !e.name.startsWith('.'))
      .sort((a, b) => (a.name < b.name ? 1 : a.name > b.name ? -1 : 0))
      .map((e) => ({ file: path.join(this.checkpointDir, e.name), regular: e.isFile() }));
  }

  private systemMessages(): ChatMessage[] {
    const { system, tools } = this.meta;
    if (system === undefined && tools === undefined) return [];
    const toolText = tools === undefined ? '' : `${system ? '\n\n' : ''}# Tools\n\n${typeof tools === 'string' ? tools : JSON.stringify(tools, null, 2)}`;
    return [{ role: 'system', content: `${system ?? ''}${toolText}` }];
  }

  private render(messages: ChatMessage[], addAssistant: boolean): string {
    return this.context.model.applyChatTemplate(messages, { addAssistant, ...(this.meta.template !== undefined ? { template: this.meta.template } : {}) });
  }

  private tokenize(text: string): Int32Array {
    return this.context.model.tokenize(text, { special: true });
  }

  /**
   * The canonical tokens of the system prefix (unless `withPrefix` is false) and `messages`: each
   * message rendered as the template's increment over the ones before it and tokenized on its own,
   * so a message has the same tokens whatever follows it.
   */
  private canonicalTokens(messages: ChatMessage[], addAssistant: boolean, withPrefix = true): Int32Array {
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

  private wholeTokens(messages: ChatMessage[], addAssistant: boolean, withPrefix: boolean): Int32Array {
    const system = this.systemMessages();
    const prefixText = system.length > 0 ? this.render(system, false) : '';
    const text = this.render([...system, ...messages], addAssistant);
    const rest = this.tokenize(text.startsWith(prefixText) ? text.slice(prefixText.length) : text);
    return withPrefix ? concat([this.prefixTokens, rest]) : rest;
  }

  private requireOpen(): void {
    if (this.closed) throw new KvstashError('E_DISPOSED', `session ${this.id} was closed`);
  }
}

function sessionDir(options: { dir: string; id: string }): string {
  requireString(options.dir, 'dir');
  requireString(options.id, 'id');
  if (!/^[A-Za-z0-9._-]{1,128}$/.test(options.id) || options.id.startsWith('.')) {
    throw new RangeError('id must be 1-128 letters, digits, dots, dashes or underscores, not starting with a dot');
  }
  return path.join(path.resolve(options.dir), options.id);
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
