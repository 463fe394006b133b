/**
 * Continuous batching: decode steps submitted by concurrent generations on one context, within
 * the same turn of the event loop, are merged into one llama_decode batch. Eight generations then
 * cost about one forward pass per token instead of eight.
 */
import type { Context } from '../llama/context.js';
import { abortError } from '../llama/queue.js';

interface Submission {
  sequence: number;
  tokens: Int32Array;
  start: number;
  /** Tokens of this submission already decoded (a long prompt goes in several batches). */
  done: number;
  signal: AbortSignal | undefined;
  onProgress: ((done: number, total: number) => void) | undefined;
  /** Runs synchronously right after the batch that decoded the last token, with that token's
   * output index, so it can sample before any other decode replaces the logits. */
  onOutput: ((index: number) => void) | undefined;
  resolve: () => void;
  reject: (err: unknown) => void;
}

const schedulers = new WeakMap<Context, BatchScheduler>();

/** Tokens of a submission not decoded yet: 1 for a generation step, more for a prompt. */
function left(submission: Submission): number {
  return submission.tokens.length - submission.done;
}

/**
 * Prompts that wait together are prefilled in halves: a batch takes no further prompt once it holds
 * half of the prompt tokens waiting, or PROMPT_GROUP_MIN_TOKENS if that is more (a prompt already
 * in it still fills it up to the batch size). The median of clients that arrive together then gets
 * its first token after about half of their prefill instead of all of it, for one batch more per
 * halving. Measured on qwen2-0.5b q8_0, 2 threads, after a shared 2,000-token prefix: a batch costs
 * about 130 ms plus 6.6 ms per token; 8 questions of 71 tokens took 3.8 s in one batch, 4 of them
 * 2.1 s, 2 of them 1.15 s, one 0.64 s. Below 64 tokens the fixed part would be most of a batch.
 */
export const PROMPT_GROUP_MIN_TOKENS = 64;

/** Prompt tokens after which a batch takes no further prompt, with `waiting` prompt tokens waiting. */
export function promptGroupTokens(waiting: number): number {
  return Math.max(PROMPT_GROUP_MIN_TOKENS, Math.ceil(waiting / 2));
}

export class BatchScheduler {
  private waiting: Submission[] = [];
  private running = false;

  private constructor(private readonly context: Context) {}

  static of(context: Context): BatchScheduler {
    let scheduler = schedulers.get(context);
    if (!scheduler) schedulers.set(context, (scheduler = new BatchScheduler(context)));
    return scheduler;
  }

  /**
   * Decodes `tokens` into `sequence` from position `start`. When `onOutput` is given, the last
   * token keeps its output and `onOutput(index)` runs synchronously after its batch.
   */
  submit(
    sequence: number,
    tokens: Int32Array,
    start: number,
    options: { onOutput?: (index: number) => void; signal?: AbortSignal; onProgress?: (done: number, total: number) => void } = {},
  ): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      if (options.signal?.aborted) return reject(abortError(options.signal));
      this.waiting.push({ sequence, tokens, start, done: 0, signal: options.signal, onProgress: options.onProgress, onOutput: options.onOutput, resolve, reject });
      if (!this.running) {
        this.running = true;
        // One macrotask of patience lets every generation that is ready submit its step.
        setImmediate(() => void this.drain());
      }
    });
  }

  private async drain(): Promise<void> {
    try {
      while (this.waiting.length > 0) {
        await this.letQueuedRestoresIn();
        await this.runBatch();
        // A macrotask before the next batch: what the last one's outputs set off in microtasks
        // (streamed chunks written to their sockets, the next steps submitted) runs before the
        // next decode occupies the compute threads. Started right away, the decode's threads
        // took the cores from the main thread: on 2 cores a streamed token reached its socket
        // 2-3 ms after it was sampled.
        await new Promise<void>((resolve) => setImmediate(resolve));
      }
    } finally {
      this.running = false;
    }
  }

  /**
   * Before a batch with a prompt in it, the operations already queued on the context run first:
   * they are, typically, the cache restores of requests that arrived with this one, and their
   * prompts then join this batch instead of waiting a whole prompt batch for the next (4 clients
   * arriving together: the 3 others' first tokens came one prefill later than the first's).
   * Single-token steps never wait for this.
   */
  private async letQueuedRestoresIn(): Promise<void> {
    if (this.context.pendingOperations === 0 || !this.waiting.some((s) => left(s) > 1)) return;
    await this.context.exclusive(() => undefined);
    // Their continuations submit within microtasks of that turn; one macrotask lets them all.
    await new Promise<void>((resolve) => setImmediate(resolve));
  }

  private async runBatch(): Promise<void> {
    const budget = this.context.info.batchSize;
    for (const submission of [...this.waiting]) {
      if (!submission.signal?.aborted) continue;
      this.remove(submission);
      submission.reject(abortError(submission.signal));
    }
    const live = [...this.waiting];
    // Single-token steps first (they are the latency-critical generations), then prompt chunks.
    live.sort((a, b) => left(a) - left(b));
    const parts: Array<{ submission: Submission; from: number; to: number }> = [];
    let used = 0;
    let promptTokens = 0;
    const group = promptGroupTokens(live.reduce((sum, s) => (left(s) > 1 ? sum + left(s) : sum), 0));
    for (const submission of live) {
      if (used >= budget) break;
      const remaining = left(submission);
      // Sorted by what is left: from the first prompt on, everything after is a prompt too.
      if (remaining > 1 && promptTokens >= group) break;
      const take = Math.min(remaining, budget - used);
      parts.push({ submission, from: submission.done, to: submission.done + take });
      used += take;
      if (remaining > 1) promptTokens += take;
    }
    if (parts.length === 0) return;

    const tokens = new Int32Array(used);
    const sequences = new Int32Array(used);
    const positions = new Int32Array(used);
    const outputs: number[] = [];
    let offset = 0;
    for (const { submission, from, to } of parts) {
      tokens.set(submission.tokens.subarray(from, to), offset);
      sequences.fill(submission.sequence, offset, offset + to - from);
      for (let i = from; i < to; i++) positions[offset + i - from] = submission.start + i;
      offset += to - from;
      if (to === submission.tokens.length && submission.onOutput) outputs.push(offset - 1);
    }
    // With one submission in the batch its signal can stop llama.cpp mid-batch; a shared batch
    // is never aborted for one member (the others would lose their step), which then stops
    // between batches.
    const signal = parts.length === 1 ? parts[0]!.submission.signal : undefined;
    try {
      await this.context.decode(tokens, { sequence: sequences, positions, logits: outputs.length > 0 ? outputs : 'none', signal });
    } catch (err) {
      for (const { submission } of parts) {
        this.remove(submission);
        submission.reject(err);
      }
      return;
    }
    offset = 0;
    for (const { submission, from, to } of parts) {
      offset += to - from;
      submission.done = to;
      submission.onProgress?.(to, submission.tokens.length);
      if (to < submission.tokens.length) continue;
      this.remove(submission);
      try {
        submission.onOutput?.(offset - 1);
        submission.resolve();
      } catch (err) {
        submission.reject(err);
      }
    }
  }

  private remove(submission: Submission): void {
    const index = this.waiting.indexOf(submission);
    if (index >= 0) this.waiting.splice(index, 1);
  }
}
