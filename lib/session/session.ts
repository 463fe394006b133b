/**
 * Durable conversations. The transcript (a checksummed, fsynced journal) is the source of truth;
 * KV checkpoints (kvstash cache entries) only make resuming fast. A session killed at any moment
 * resumes with every turn whose send() had completed.
 *
 * What the conversation runs on — a llama.cpp context sequence or an RKLLM model — is a
 * ConversationBackend (./backend.ts); this file never asks which one it has.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { ENTRY_EXTENSION } from '../cache/entry.js';
import type { PromptCache } from '../cache/prompt-cache.js';
import { KvstashError, type KvstashErrorCode } from '../errors.js';
import { Generation, type GenerationResult } from '../generate/generate.js';
import type { Context } from '../llama/context.js';
import type { ChatMessage } from '../llama/model.js';
import type { SamplingOptions } from '../llama/sampler.js';
import { OperationQueue } from '../llama/queue.js';
import type { RkllmModel } from '../rkllm/model.js';
import { requireInteger, requireString } from '../util/validate.js';
import { conversationBackend } from './backends.js';
import type { ConversationBackend, OverflowPolicy } from './backend.js';
import { Journal, type JournalDamage } from './journal.js';
import { ioError, ownFileExists, requireOwnDirectory } from './files.js';
import { acquireLock, type Lock } from './lock.js';
import { onProcessExit } from './exit-hooks.js';
import { SessionMemory, type RetrievedMemory, type SessionMemoryOptions } from './memory-hook.js';
import type { CheckpointCache, CheckpointRecord, Memory } from '../memory/memory.js';

export type { OverflowPolicy } from './backend.js';
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
  /** What the conversation runs on: a llama.cpp context (one of its sequences) or an RKLLM model. */
  context: Context | RkllmModel;
  /** llama.cpp: shares the system prefix with other sessions and generate() calls. Default: a
   * RAM-only cache. RKLLM keeps its system-prompt caches in the model's cacheDir instead. */
  cache?: PromptCache;
  /** llama.cpp: the context sequence this session uses. Default 0. */
  sequence?: number;
  checkpoint?: CheckpointOptions;
  overflow?: OverflowOptions;
  /** Long-term memory (./memory-hook.ts): every turn archived, what the window lost retrieved
   * before each turn, clear policies. A Memory, or {memory, recall?, clear?}. Default none. */
  memory?: Memory | SessionMemoryOptions;
}

/** A reply, with what long-term memory injected before it (empty without memory). */
export interface SessionReply extends GenerationResult {
  retrieved: RetrievedMemory[];
}

export interface OpenOptions extends SessionOptions {
  system?: string;
  tools?: unknown;
  /** Chat template (text or built-in name) instead of the model's. llama.cpp only. */
  template?: string;
}

export interface SendOptions {
  /** Default 256 (llama.cpp), the model's maxNewTokens (RKLLM). Unit: tokens. */
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
  /** Checkpoints that could not be used, newest first, and why (corrupt, stale, other model);
   * `code` when the failure had one (E_CACHE_CORRUPT, E_CACHE_MISMATCH, E_CACHE_NOT_FILE, ...). */
  skippedCheckpoints: Array<{ path: string; reason: string; code?: KvstashErrorCode }>;
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
  /** With memory: turns archived by this session object (also those repaired at resume), and
   * items injected before its turns. */
  archived: number;
  retrieved: number;
}

type JournalRecord =
  | { type: 'open'; version: 1; id: string; system?: string; tools?: unknown; template?: string; createdAt: string }
  | { type: 'exchange'; user: string; assistant: string; at: string }
  | { type: 'tool'; name: string; content: string; at: string }
  | { type: 'drop'; count: number; shifted: boolean; at: string }
  | { type: 'summary'; count: number; content: string; at: string }
  /** What memory injected after the system prefix from this turn on ('' for nothing). */
  | { type: 'recall'; content: string; at: string };

const SUMMARY_PREFIX = 'Summary of the earlier conversation:\n';

export class Session {
  /** Every message of the conversation, oldest first (also those dropped from the context). */
  readonly history: ChatMessage[] = [];
  /** How the last resume went (undefined for a session opened new). */
  readonly resumeReport: ResumeReport | undefined;
  private readonly view: ChatMessage[] = [];
  private readonly queue = new OperationQueue();
  private readonly checkpointDir: string;
  private readonly checkpointOptions: Required<Omit<CheckpointOptions, 'onExit'>>;
  private readonly overflow: Required<Pick<OverflowOptions, 'policy'>> & OverflowOptions;
  /** The overflow policy as this backend applies it. */
  private policy: OverflowPolicy;
  private turnsSinceCheckpoint = 0;
  private lastCheckpointAt = Date.now();
  private closed = false;
  private removeExitHook: (() => void) | undefined;
  private readonly memory: SessionMemory | undefined;
  /** The recall message memory injected (kept, like the transcript, in the journal). */
  private recalled: ChatMessage[] = [];
  private turnsSinceClear = 0;
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
    archived: 0,
    retrieved: 0,
  };

  private constructor(
    readonly id: string,
    readonly dir: string,
    readonly context: Context | RkllmModel,
    /** What the conversation runs on. */
    readonly backend: ConversationBackend,
    private readonly journal: Journal<JournalRecord>,
    private readonly lock: Lock,
    options: SessionOptions,
    report?: ResumeReport,
  ) {
    this.checkpointDir = path.join(dir, 'checkpoints');
    this.checkpointOptions = {
      everyTurns: requireInteger(options.checkpoint?.everyTurns ?? 4, 'checkpoint.everyTurns', 0),
      everySeconds: requireInteger(options.checkpoint?.everySeconds ?? 60, 'checkpoint.everySeconds', 0),
      keep: requireInteger(options.checkpoint?.keep ?? 2, 'checkpoint.keep', 1),
    };
    this.overflow = { ...options.overflow, policy: options.overflow?.policy ?? 'drop-oldest' };
    this.policy = backend.effectivePolicy(this.overflow.policy);
    this.resumeReport = report;
    this.memory = SessionMemory.attach(options.memory, id);
    // The recall message sits between the prefix and the window: shifting cells under it is not supported.
    if (this.memory && this.policy === 'shift') this.policy = 'drop-oldest';
    if (options.checkpoint?.onExit) this.removeExitHook = onProcessExit(() => this.checkpoint().then(() => undefined));
  }

  /** Starts a new session. Rejects with E_SESSION_EXISTS when `<dir>/<id>` holds one. */
  static async open(options: OpenOptions): Promise<Session> {
    const dir = sessionDir(options);
    const setup = {
      ...(options.system !== undefined ? { system: options.system } : {}),
      ...(options.tools !== undefined ? { tools: options.tools } : {}),
      ...(options.template !== undefined ? { template: options.template } : {}),
    };
    // Before anything is written: a backend that cannot hold the options refuses them here.
    const backend = conversationBackend(options, setup);
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
        ...setup,
        createdAt: new Date().toISOString(),
      };
      await journal.append(meta);
      const session = new Session(options.id, dir, options.context, backend, journal, lock, options);
      await session.queue.run(() => session.backend.catchUp(session.view));
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
    // The options alone decide what the backend refuses; the setup comes from the journal below.
    conversationBackend(options, {});
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
      const backend = conversationBackend(options, meta);
      const session = new Session(options.id, dir, options.context, backend, journal, lock, options, report);
      for (const record of records.slice(1)) session.replay(record);
      // A turn the journal holds and the archive lacks (killed between the two writes).
      if (session.memory) session.counters.archived += await session.memory.repair(session.archivedTurns());
      await session.queue.run(() => session.restoreFromDisk(report));
      report.ms = performance.now() - started;
      session.counters.resumes[report.path]++;
      return session;
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  /**
   * The checkpoint files of the sessions in `dir`, as the cache Memory.prune and Memory.forget
   * delete the entries of removed checkpoint records through: `memory.prune({maxCheckpointsPerSession:
   * 2, cache: Session.checkpointCache(dir)})`. A session's checkpoints are entries of its own
   * `<dir>/<id>/checkpoints/`, not of the PromptCache it shares its system prefix through, so that
   * cache cannot find them. delete() resolves with 1 when it removed the record's file, 0 when the
   * file was already gone (the session's rotation keeps `checkpoint.keep` files); it never follows
   * a symlink, and rejects with E_SESSION_CORRUPT when the file or the folder is not one the session
   * wrote.
   */
  static checkpointCache(dir: string): CheckpointCache & { delete(entryKey: string, checkpoint: Pick<CheckpointRecord, 'sessionId'>): Promise<number> } {
    requireString(dir, 'dir');
    return {
      async delete(entryKey, checkpoint) {
        requireString(entryKey, 'entryKey');
        if (entryKey !== path.basename(entryKey) || entryKey.startsWith('.') || !entryKey.endsWith(ENTRY_EXTENSION)) {
          throw new RangeError(`entryKey ${JSON.stringify(entryKey)} is not the name of a checkpoint file (a session records <name>${ENTRY_EXTENSION})`);
        }
        const checkpointDir = path.join(sessionDir({ dir, id: checkpoint?.sessionId }), 'checkpoints');
        await requireOwnDirectory(checkpointDir, 'checkpoints directory');
        const file = path.join(checkpointDir, entryKey);
        if (!(await ownFileExists(file, 'checkpoint'))) return 0;
        await fsp.rm(file, { force: true }).catch((err: unknown) => {
          throw ioError(err, `remove the checkpoint ${file}`);
        });
        return 1;
      },
    };
  }

  /** The messages the model currently sees after the system prompt (older ones may have been
   * dropped or summarised). */
  get messages(): readonly ChatMessage[] {
    return this.view;
  }

  /** Sends a user message; the reply streams from the Generation. The turn is on disk before
   * `result` resolves. */
  send(text: string, options: SendOptions = {}): Generation & { result: Promise<SessionReply> } {
    requireString(text, 'text');
    return new Generation((emit) => this.queue.run(() => this.exchange(text, options, emit))) as Generation & { result: Promise<SessionReply> };
  }

  /** Clears the window now (the system prompt stays), after storing the cumulative summary when
   * the overflow policy is 'summarize'; with memory, what was in it stays retrievable. */
  compact(): Promise<void> {
    return this.queue.run(async () => {
      this.requireOpen();
      await this.clearWindow();
      await this.backend.catchUp(this.window());
    });
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
      await this.backend.catchUp(this.window());
    });
  }

  /** Saves the sequence's KV state now (atomic, verified entry); older checkpoints beyond `keep` go. */
  checkpoint(): Promise<{ path: string; tokens: number; bytes: number }> {
    return this.queue.run(() => this.writeCheckpoint());
  }

  stats(): SessionStats {
    return { ...this.counters, resumes: { ...this.counters.resumes }, archived: this.counters.archived + (this.memory?.archived ?? 0), retrieved: this.memory?.retrieved ?? 0 };
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

  private async exchange(text: string, options: SendOptions, emit: (chunk: string) => void): Promise<SessionReply> {
    this.requireOpen();
    const maxTokens = this.backend.replyLimit(options.maxTokens);
    const user: ChatMessage = { role: 'user', content: text };
    const retrieved = await this.recall(text);
    // End-of-turn tokens and the canonical re-tokenization may add a few tokens past maxTokens.
    await this.makeRoom([user], maxTokens + 8);
    const result = await this.backend.reply([...this.window(), user], { ...options, maxTokens }, emit);
    const assistant: ChatMessage = { role: 'assistant', content: result.text };
    await this.journal.append({ type: 'exchange', user: text, assistant: result.text, at: new Date().toISOString() });
    this.history.push(user, assistant);
    this.view.push(user, assistant);
    this.counters.turns++;
    this.turnsSinceCheckpoint++;
    this.turnsSinceClear++;
    await this.memory?.archive({ turn: this.counters.turns - 1, messages: [user, assistant] });
    if (this.memory?.shouldClear(this.turnsSinceClear, this.backend.measure(this.window(), false), this.backend.capacity)) await this.clearWindow();
    await this.backend.catchUp(this.window());
    const { everyTurns, everySeconds } = this.checkpointOptions;
    if ((everyTurns > 0 && this.turnsSinceCheckpoint >= everyTurns) || (everySeconds > 0 && Date.now() - this.lastCheckpointAt >= everySeconds * 1000)) {
      // A failed checkpoint costs speed on resume, never the turn: it is counted and the turn stands.
      await this.writeCheckpoint().catch(() => this.counters.checkpointFailures++);
    }
    return { ...result, retrieved };
  }

  /** The messages the backend holds after the system prefix: the recall message, then the window. */
  private window(): ChatMessage[] {
    return [...this.recalled, ...this.view];
  }

  /** Asks memory what to inject before the turn `text` starts; journals it when it changed. */
  private async recall(text: string): Promise<RetrievedMemory[]> {
    if (!this.memory) return [];
    const turnsInWindow = this.view.filter((m) => m.role === 'user').length;
    const { message, retrieved } = await this.memory.recall(
      text,
      { firstTurnInWindow: this.counters.turns - turnsInWindow, summaryInWindow: this.isSummary(this.view[0]), capacity: this.backend.capacity },
      (m) => this.backend.measure([m], false, false),
    );
    const content = message?.content ?? '';
    if (content !== (this.recalled[0]?.content ?? '')) {
      await this.journal.append({ type: 'recall', content, at: new Date().toISOString() });
      this.replay({ type: 'recall', content, at: '' });
    }
    return retrieved;
  }

  /** Empties the window (the system prompt stays), after writing the cumulative summary with the
   * 'summarize' policy. */
  private async clearWindow(): Promise<void> {
    const count = this.view.length;
    this.turnsSinceClear = 0;
    if (count === 0 && this.recalled.length === 0) return;
    if (this.policy === 'summarize') {
      const content = await (this.overflow.summarize ?? ((m) => this.backend.summarize(m)))(this.view.slice());
      await this.memory?.storeSummary(content, this.counters.turns);
      this.counters.summaries++;
    }
    await this.journal.append({ type: 'drop', count, shifted: false, at: new Date().toISOString() });
    this.replay({ type: 'drop', count, shifted: false, at: '' });
    if (this.recalled.length > 0) {
      await this.journal.append({ type: 'recall', content: '', at: new Date().toISOString() });
      this.replay({ type: 'recall', content: '', at: '' });
    }
    this.counters.clears++;
  }

  /** The completed turns of the transcript, numbered from 0 (tool results belong to the turn after them). */
  private archivedTurns(): Array<{ turn: number; messages: ChatMessage[] }> {
    const turns: Array<{ turn: number; messages: ChatMessage[] }> = [];
    for (let i = 0; i + 1 < this.history.length; i++) {
      if (this.history[i]!.role === 'user' && this.history[i + 1]!.role === 'assistant') {
        turns.push({ turn: turns.length, messages: [this.history[i]!, this.history[i + 1]!] });
        i++;
      }
    }
    return turns;
  }

  /** Applies the overflow policy until `extra` messages and `reserve` tokens fit after the view. */
  private async makeRoom(extra: ChatMessage[], reserve: number): Promise<void> {
    const limit = this.backend.capacity;
    const needed = () => this.backend.measure([...this.window(), ...extra], true) + reserve;
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
      const before = this.backend.measure(this.window(), false);
      const policy = this.policy;
      if (policy === 'summarize' && (foldSummary || !this.isSummary(this.view[0]))) {
        const content = await (this.overflow.summarize ?? ((m) => this.backend.summarize(m)))(dropped);
        await this.journal.append({ type: 'summary', count, content, at: new Date().toISOString() });
        this.replay({ type: 'summary', count, content, at: '' });
        this.counters.summaries++;
        await this.memory?.storeSummary(content, this.counters.turns);
      } else {
        await this.journal.append({ type: 'drop', count, shifted: policy === 'shift', at: new Date().toISOString() });
        if (policy === 'shift') await this.backend.shiftOut(this.view, count);
        this.replay({ type: 'drop', count, shifted: policy === 'shift', at: '' });
        if (policy === 'shift') this.counters.shifts++;
        else this.counters.clears++;
      }
      this.counters.tokensDropped += Math.max(0, before - this.backend.measure(this.window(), false));
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
      case 'recall':
        this.recalled = record.content ? [{ role: 'system', content: record.content }] : [];
        break;
      case 'open':
        break;
    }
  }

  private async restoreFromDisk(report: ResumeReport): Promise<void> {
    // Checkpoints only make resuming fast: checkpoints/ that is not the session's own directory
    // is reported and passed over, and the transcript is evaluated instead.
    const checkpoints = await this.listCheckpoints().catch((err: Error) => {
      report.skippedCheckpoints.push({ path: this.checkpointDir, reason: err.message });
      return [];
    });
    for (const { file, regular } of checkpoints) {
      try {
        if (!regular) throw new Error('it is not a regular file');
        report.restoredTokens = await this.backend.restoreCheckpoint(file, this.window());
        report.path = 'checkpoint';
        break;
      } catch (err) {
        const code = (err as Partial<KvstashError>).code;
        report.skippedCheckpoints.push({ path: file, reason: (err as Error).message, ...(code ? { code } : {}) });
      }
    }
    if (report.path !== 'checkpoint') this.backend.forget();
    const { restored, evaluated } = await this.backend.catchUp(this.window());
    if (report.path !== 'checkpoint') {
      report.path = restored > 0 ? 'cache' : 'prefill';
      report.restoredTokens = restored;
    }
    report.evaluatedTokens = evaluated;
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
    const stamp = `${String(this.counters.turns).padStart(8, '0')}-${Date.now()}`;
    const written = await this.backend.writeCheckpoint(this.checkpointDir, stamp, `session:${this.id}`, this.window());
    const all = (await this.listCheckpoints()).filter((c) => c.regular);
    for (const old of all.slice(this.checkpointOptions.keep)) await fsp.rm(old.file, { force: true });
    this.counters.checkpoints++;
    await this.memory?.memory.recordCheckpoint({ sessionId: this.id, turn: this.counters.turns, entryKey: path.basename(written.path), bytes: written.bytes });
    this.turnsSinceCheckpoint = 0;
    this.lastCheckpointAt = Date.now();
    return written;
  }

  /** Checkpoint files, newest first (in the backend's order); `regular` is false for anything
   * else named like one (a symlink, a FIFO, a directory), which is never opened or deleted. Rejects
   * with E_SESSION_CORRUPT when checkpoints/ is not the session's own directory. */
  private async listCheckpoints(): Promise<Array<{ file: string; regular: boolean }>> {
    await requireOwnDirectory(this.checkpointDir, 'checkpoints directory');
    const entries = await fsp.readdir(this.checkpointDir, { withFileTypes: true }).catch(() => [] as fs.Dirent[]);
    const byName = entries
      .filter((e) => e.name.endsWith('.kvstash') && !e.name.startsWith('.'))
      .sort((a, b) => (a.name < b.name ? 1 : a.name > b.name ? -1 : 0))
      .map((e) => ({ file: path.join(this.checkpointDir, e.name), regular: e.isFile() }));
    return this.backend.newestFirst(byName);
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
