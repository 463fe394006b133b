import fsp from 'node:fs/promises';
import type { DigestScheme, NativeContext, NativeContextInfo, NativeContextOptions } from '../binding.js';
import { KvstashError } from '../errors.js';
import { replaceFileAtomic } from '../util/atomic-file.js';
import { NotRegularFileError, openRegularFile, type OpenedFile } from '../util/regular-file.js';
import { openEntryFile } from '../cache/entry.js';
import { describe, INT32_MAX, INT32_MIN, requireInteger, requireString, toInt32Array } from '../util/validate.js';
import type { Model } from './model.js';
import { OperationQueue, abortError } from './queue.js';
import { stopAtExit } from '../util/stop-at-exit.js';

export type KvType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_0' | 'q4_1' | 'q5_0' | 'q5_1' | 'iq4_nl';

export interface ContextOptions {
  /** KV cells in the context, shared by all sequences when `unifiedKv` is on. Default
   * min(trained context, 4096). Unit: tokens. */
  contextSize?: number;
  /** Most tokens given to one llama_decode call; longer decodes are split. Default 512. Unit: tokens. */
  batchSize?: number;
  /** Physical micro-batch size inside llama.cpp. Default min(batchSize, 512). Unit: tokens. */
  ubatchSize?: number;
  /** Number of independent sequences (conversations) the context holds. Default 1. */
  sequences?: number;
  /** Compute threads. Default: every available core. */
  threads?: number;
  /** Storage type of the K and V cache. Default 'f16'. Quantized types need flash attention. */
  kvType?: KvType;
  /** Flash attention: 'auto' (llama.cpp decides), 'on' or 'off'; booleans mean on/off. Default 'auto'. */
  flashAttention?: 'auto' | 'on' | 'off' | boolean;
  /** One KV buffer for all sequences, so a prefix copied between sequences shares cells instead of
   * being duplicated, and every sequence can use the whole context. Default true. */
  unifiedKv?: boolean;
}

export type ContextInfo = NativeContextInfo;

/** Which tokens of a decode keep their logits: the last (default), all, none, or these indices. */
export type LogitsSelection = 'last' | 'all' | 'none' | readonly number[];

export interface DecodeOptions {
  /** Position of the first token. Default: right after what each sequence already holds. */
  start?: number;
  /** One position per token, instead of `start`. */
  positions?: Int32Array | readonly number[];
  /** The sequence of every token (a number), or one sequence per token. Default 0. */
  sequence?: number | Int32Array | readonly number[];
  /** Which outputs to keep for `logits()` and sampling. Default 'last'. */
  logits?: LogitsSelection;
  /** Called after each batch with (tokens evaluated, total tokens). */
  onProgress?: (done: number, total: number) => void;
  /** Aborts the decode between or inside batches; what it had added to the KV cache is removed. */
  signal?: AbortSignal;
}

export interface SequenceOptions {
  /** The sequence to act on. Default: the whole context (every sequence). */
  sequence?: number;
}

/** What a verified import needs to know about an entry file (lib/cache/entry.ts verifiedRanges()). */
export interface VerifiedRanges {
  checkedLength: number;
  chunkBytes: number;
  chunkDigests: Uint8Array;
  digestScheme: DigestScheme;
  payloadOffset: number;
  payloadBytes: number;
}

/**
 * A llama.cpp context: KV cache, compute buffers, and the logits of the last decode.
 *
 * Slow operations (decode, state save/load/export/import) run off the main thread, one at a time
 * in call order. Memory operations are immediate; they throw E_BUSY while a slow operation runs.
 */
export class Context {
  readonly info: ContextInfo;
  /** KV cache edits by sequence and position. */
  readonly memory: ContextMemory;
  private readonly queue = new OperationQueue();
  private disposing: Promise<void> | undefined;
  private readonly unregisterExitStop: () => void;

  /** @internal Use model.createContext(). */
  constructor(
    /** @internal */ readonly handle: NativeContext,
    readonly model: Model,
    private readonly onDispose: () => void,
  ) {
    this.info = handle.info();
    this.memory = new ContextMemory(this);
    this.unregisterExitStop = stopAtExit(handle, (live) => live.abortAndWait());
  }

  /** @internal */
  static nativeOptions(options: ContextOptions, defaultThreads: number): NativeContextOptions {
    // The native layer checks these too; here a non-integer or huge value is a TypeError/RangeError
    // naming the option before anything is converted.
    if (options.contextSize !== undefined) requireInteger(options.contextSize, 'contextSize', 16, 1 << 24);
    if (options.batchSize !== undefined) requireInteger(options.batchSize, 'batchSize', 1, 1 << 20);
    if (options.ubatchSize !== undefined) requireInteger(options.ubatchSize, 'ubatchSize', 1, options.batchSize ?? 1 << 20);
    if (options.sequences !== undefined) requireInteger(options.sequences, 'sequences', 1, 256);
    if (options.threads !== undefined) requireInteger(options.threads, 'threads', 1, 1024);
    const flash = options.flashAttention;
    return {
      ...options,
      threads: options.threads ?? defaultThreads,
      flashAttention: flash === true ? 'on' : flash === false ? 'off' : flash,
    };
  }

  get isDisposed(): boolean {
    return this.disposing !== undefined;
  }

  /** Operations queued or running. */
  get pendingOperations(): number {
    return this.queue.size;
  }

  /**
   * Evaluates tokens at explicit positions in one or more sequences. Resolves with the number of
   * outputs kept. On failure or abort, whatever this call had added to the KV cache is removed, so
   * every sequence is as it was before the call.
   */
  decode(tokens: Int32Array | readonly number[], options: DecodeOptions = {}): Promise<number> {
    return this.enqueue(options.signal, async () => {
      const batch = this.prepareBatch(toInt32Array(tokens, 'tokens'), options);
      const abort = (): void => this.handle.abort();
      options.signal?.addEventListener('abort', abort, { once: true });
      // The native call checks the batch synchronously and throws before starting; only a decode
      // that started can have added cells that must be removed again.
      const progress = orderedProgress(options.onProgress);
      const running = this.handle.decode(batch.tokens, batch.positions, batch.sequences, batch.keep, progress?.report);
      try {
        const outputs = await running;
        progress?.finish(batch.tokens.length);
        return outputs;
      } catch (err) {
        progress?.cancel();
        for (const [sequence, first] of batch.firstPosition) this.handle.memoryRemove(sequence, first, -1);
        if (options.signal?.aborted && (err as KvstashError).code === 'E_ABORTED') throw abortError(options.signal);
        throw err;
      } finally {
        options.signal?.removeEventListener('abort', abort);
      }
    });
  }

  /** A copy of the logits of token `index` of the last decode (negative counts from the end). */
  logits(index = -1): Float32Array {
    this.requireLive();
    requireInteger(index, 'index', -2147483648, 2147483647);
    return this.handle.logits(index);
  }

  /** Bytes the state of `sequence` (or of the whole context) takes when saved. */
  stateSize(options: SequenceOptions = {}): number {
    this.requireLive();
    return this.handle.stateSize(this.sequenceOrAll(options.sequence));
  }

  /**
   * Saves the KV state of one sequence (or the whole context) with `tokens` to a llama.cpp state
   * file. The file appears atomically: a crash leaves the old file or none, never half of one.
   */
  saveState(file: string, options: SequenceOptions & { tokens?: Int32Array | readonly number[] } = {}): Promise<{ bytes: number }> {
    requireString(file, 'path');
    const tokens = toInt32Array(options.tokens ?? [], 'tokens');
    return this.enqueue(undefined, async () => {
      const sequence = this.sequenceOrAll(options.sequence);
      await replaceFileAtomic(file, (temporary) => this.handle.saveStateFile(temporary, sequence, tokens));
      return { bytes: (await fsp.stat(file)).size };
    });
  }

  /** Loads a llama.cpp state file into one sequence (or the whole context); resolves with its tokens.
   * On failure the target sequence is left empty, never half loaded. */
  loadState(file: string, options: SequenceOptions = {}): Promise<Int32Array> {
    requireString(file, 'path');
    return this.enqueue(undefined, async () => {
      const sequence = this.sequenceOrAll(options.sequence);
      await requireStateFile(file);
      try {
        return await this.handle.loadStateFile(file, sequence);
      } catch (err) {
        this.clearAfterFailedLoad(sequence);
        throw err;
      }
    });
  }

  /** The KV state of one sequence (or the whole context) as bytes (llama_state_seq_get_data). */
  exportState(options: SequenceOptions = {}): Promise<Buffer> {
    return this.enqueue(undefined, () => this.handle.exportState(this.sequenceOrAll(options.sequence)));
  }

  /** Loads bytes from exportState() into one sequence (or the whole context). The buffer is read in
   * place; do not modify it until the promise settles. The state's structure is checked before
   * llama.cpp reads it (cell count within the context, positions inside it, sizes that add up to
   * the bytes given): bytes that fail are E_STATE_LOAD. With `tokens` (the count a cache entry's
   * header lists) the sequence must also hold exactly positions [0, tokens), before and after the
   * import, or it is E_CACHE_CORRUPT (E_CACHE_MISMATCH when the state is for a larger context). */
  importState(bytes: Uint8Array, options: SequenceOptions & { tokens?: number } = {}): Promise<void> {
    if (!(bytes instanceof Uint8Array)) throw new TypeError('bytes must be a Buffer or Uint8Array');
    const tokens = expectedTokens(options.tokens);
    return this.enqueue(undefined, async () => {
      const sequence = this.sequenceOrAll(options.sequence);
      try {
        await this.handle.importState(bytes, sequence, tokens);
      } catch (err) {
        this.clearAfterFailedLoad(sequence);
        throw err;
      }
    });
  }

  /**
   * Runs `work` when no other operation runs on this context (after everything queued before it).
   * Memory edits and reads that must not meet a running decode go here. `work` must not wait for
   * another operation of this context: that one would queue behind it.
   */
  exclusive<T>(work: () => T): Promise<T> {
    return this.enqueue(undefined, async () => work());
  }

  /**
   * @internal For lib/cache: reads bytes [0, checkedLength) of `file` (an entry file opened with
   * openEntryFile, whose header gave `ranges`, or the path of one), verifies each chunk of
   * `chunkBytes` against its digest in `chunkDigests` (the entry format's digest table), and imports
   * [payloadOffset, payloadOffset + payloadBytes) as state. llama.cpp reads no byte before it is
   * verified, and the import fails (the sequence emptied) when any chunk does. Resolves with how
   * many chunks there were and how many were copied straight from the file into the KV cache
   * (binding/llama/StateReadGate.h); `readAhead: false` (for tests) sends every bulk chunk that way.
   * `tokens`: the count the entry's header lists, checked as importState() checks it; a state that
   * contradicts it is E_CACHE_CORRUPT.
   */
  importVerifiedFile(
    file: string | OpenedFile,
    ranges: VerifiedRanges,
    options: SequenceOptions & { readAhead?: boolean; tokens?: number } = {},
  ): Promise<{ chunks: number; bouncedChunks: number }> {
    const tokens = expectedTokens(options.tokens);
    return this.enqueue(undefined, async () => {
      const sequence = this.sequenceOrAll(options.sequence);
      // The native import reads the descriptor it is given and opens nothing by path.
      const opened = typeof file === 'string' ? await openEntryFile(file) : file;
      if (!opened) throw new KvstashError('E_CACHE_CORRUPT', `cache entry ${file as string} is not there any more`);
      try {
        return await this.handle.importVerifiedStateFile(
          opened.path,
          sequence,
          ranges.checkedLength,
          ranges.chunkBytes,
          ranges.chunkDigests,
          ranges.digestScheme,
          ranges.payloadOffset,
          ranges.payloadBytes,
          options.readAhead ?? true,
          tokens,
          opened.handle.fd,
        );
      } catch (err) {
        this.clearAfterFailedLoad(sequence);
        throw err;
      } finally {
        if (opened !== file) await opened.handle.close();
      }
    });
  }

  /** Waits for queued and running operations, then frees the context. Idempotent. */
  dispose(): Promise<void> {
    if (!this.disposing) {
      this.disposing = this.queue.drain().then(() => {
        this.handle.dispose();
        this.unregisterExitStop();
        this.onDispose();
      });
    }
    return this.disposing;
  }

  /** @internal */
  requireLive(): void {
    if (this.disposing) throw new KvstashError('E_DISPOSED', 'the context was disposed; create a new one');
  }

  private enqueue<T>(signal: AbortSignal | undefined, operation: () => Promise<T>): Promise<T> {
    try {
      this.requireLive();
    } catch (err) {
      return Promise.reject(err);
    }
    // Operations accepted before dispose() still run: dispose() drains the queue before it frees.
    return this.queue.run(operation, signal);
  }

  private sequenceOrAll(sequence: number | undefined): number {
    if (sequence === undefined) return -1;
    return this.checkSequence(sequence, 'sequence');
  }

  /** @internal */
  checkSequence(sequence: unknown, name: string): number {
    if (typeof sequence !== 'number' || !Number.isInteger(sequence)) throw new TypeError(`${name} must be an integer`);
    if (sequence < 0 || sequence >= this.info.sequences) {
      throw new KvstashError('E_SEQUENCE_INVALID', `${name} ${sequence} is outside this context's sequences [0, ${this.info.sequences})`);
    }
    return sequence;
  }

  private clearAfterFailedLoad(sequence: number): void {
    if (sequence < 0) this.handle.memoryClear();
    else this.handle.memoryRemove(sequence, -1, -1);
  }

  /** Resolves the decode options into one position, sequence and keep flag per token. */
  private prepareBatch(tokens: Int32Array, options: DecodeOptions) {
    const n = tokens.length;
    if (n === 0) throw new RangeError('decode: tokens must not be empty');
    const sequences = new Int32Array(n);
    const seqOption = options.sequence ?? 0;
    if (typeof seqOption === 'number') {
      sequences.fill(this.checkSequence(seqOption, 'sequence'));
    } else {
      const given = toInt32Array(seqOption, 'sequence');
      if (given.length !== n) throw new RangeError(`decode: sequence has ${given.length} entries for ${n} tokens`);
      for (let i = 0; i < n; i++) sequences[i] = this.checkSequence(given[i], `sequence[${i}]`);
    }

    let positions: Int32Array;
    if (options.positions !== undefined) {
      if (options.start !== undefined) throw new TypeError('decode: give either start or positions, not both');
      positions = toInt32Array(options.positions, 'positions');
      if (positions.length !== n) throw new RangeError(`decode: positions has ${positions.length} entries for ${n} tokens`);
    } else {
      positions = new Int32Array(n);
      const next = new Map<number, number>();
      if (options.start !== undefined) {
        // Within int32: a larger start would wrap to a small position in the Int32Array below.
        requireInteger(options.start, 'start', 0, INT32_MAX);
        // One start for all tokens of a sequence; with several sequences each counts from start.
        for (let i = 0; i < n; i++) {
          const s = sequences[i]!;
          const p = next.get(s) ?? options.start;
          positions[i] = p;
          next.set(s, p + 1);
        }
      } else {
        for (let i = 0; i < n; i++) {
          const s = sequences[i]!;
          const p = next.get(s) ?? this.handle.memoryRange(s)[1] + 1;
          positions[i] = p;
          next.set(s, p + 1);
        }
      }
    }

    const keep = new Uint8Array(n);
    const selection = options.logits ?? 'last';
    if (selection === 'last') keep[n - 1] = 1;
    else if (selection === 'all') keep.fill(1);
    else if (selection !== 'none') {
      if (!Array.isArray(selection)) throw new TypeError("decode: logits must be 'last', 'all', 'none' or an array of indices");
      for (const index of selection) {
        requireInteger(index, 'logits index', -n, n - 1);
        keep[index < 0 ? n + index : index] = 1;
      }
    }

    const firstPosition = new Map<number, number>();
    for (let i = 0; i < n; i++) if (!firstPosition.has(sequences[i]!)) firstPosition.set(sequences[i]!, positions[i]!);
    return { tokens, positions, sequences, keep, firstPosition };
  }
}

/** KV cache edits. Positions are token positions; `p1` is exclusive; omit a bound (or pass -1 or
 * Infinity) for an open range. Every argument is checked before llama.cpp sees it: a sequence
 * outside the context is E_SEQUENCE_INVALID, a bound outside [0, sequenceContextSize] is
 * E_POSITION_INVALID, a non-integer a TypeError. */
export class ContextMemory {
  constructor(private readonly context: Context) {}

  /** Copies positions [p0, p1) of `source` into `destination`. With a unified KV cache the cells are
   * shared, not duplicated: no bytes move. */
  copy(source: number, destination: number, p0?: number, p1?: number): void {
    this.context.requireLive();
    const from = this.context.checkSequence(source, 'source');
    const to = this.context.checkSequence(destination, 'destination');
    this.context.handle.memoryCopy(from, to, this.bound(p0, 'p0'), this.bound(p1, 'p1'));
  }

  /** Removes positions [p0, p1) of `sequence` (every sequence when it is undefined or -1). Returns
   * false when llama.cpp cannot remove a partial range (recurrent models). */
  remove(sequence?: number, p0?: number, p1?: number): boolean {
    this.context.requireLive();
    const which = sequence === undefined || sequence === -1 ? -1 : this.context.checkSequence(sequence, 'sequence');
    return this.context.handle.memoryRemove(which, this.bound(p0, 'p0'), this.bound(p1, 'p1'));
  }

  /** Removes every sequence but `sequence`. */
  keep(sequence: number): void {
    this.context.requireLive();
    this.context.handle.memoryKeep(this.context.checkSequence(sequence, 'sequence'));
  }

  /** Empties the whole KV cache. */
  clear(): void {
    this.context.requireLive();
    this.context.handle.memoryClear();
  }

  /** Adds `delta` to the positions [p0, p1) of `sequence` (needs a model whose memory can shift).
   * Positions moved below 0 are removed, as in llama.cpp; a shift that would move a position to
   * or past the context's end is E_POSITION_INVALID, and nothing moves. */
  shift(sequence: number, delta: number, p0?: number, p1?: number): void {
    this.context.requireLive();
    const which = this.context.checkSequence(sequence, 'sequence');
    requireInteger(delta, 'delta', INT32_MIN, INT32_MAX);
    this.context.handle.memoryShift(which, this.bound(p0, 'p0'), this.bound(p1, 'p1'), delta);
  }

  /** Smallest and largest position held by `sequence`; both -1 when it is empty. */
  range(sequence: number): { min: number; max: number } {
    this.context.requireLive();
    const [min, max] = this.context.handle.memoryRange(this.context.checkSequence(sequence, 'sequence'));
    return { min, max };
  }

  /** A range bound as llama.cpp takes it: -1 for open. */
  private bound(position: unknown, name: string): number {
    if (position === undefined || position === -1 || position === Infinity) return -1;
    if (typeof position !== 'number' || !Number.isInteger(position)) {
      throw new TypeError(`${name} must be an integer position, got ${describe(position)}`);
    }
    const size = this.context.info.sequenceContextSize;
    if (position < 0 || position > size) {
      throw new KvstashError('E_POSITION_INVALID', `${name} ${position} is outside the context's positions [0, ${size}]`);
    }
    return position;
  }
}

/** The `tokens` option of the imports: a header's token count, or undefined. */
function expectedTokens(tokens: unknown): number | undefined {
  return tokens === undefined ? undefined : requireInteger(tokens, 'tokens', 0, INT32_MAX);
}

/**
 * Progress reports travel from the worker thread on their own queue and can arrive after the
 * decode's promise settled. This wrapper delivers them in increasing order, always ends with
 * (total, total) before the promise resolves, and drops whatever arrives later.
 */
function orderedProgress(onProgress: ((done: number, total: number) => void) | undefined) {
  if (!onProgress) return undefined;
  let last = 0;
  let open = true;
  return {
    report(done: number, total: number): void {
      if (!open || done <= last) return;
      last = done;
      onProgress(done, total);
    },
    finish(total: number): void {
      if (open && last < total) onProgress(total, total);
      open = false;
    },
    cancel(): void {
      open = false;
    },
  };
}

/**
 * Refuses anything but a regular file before the native load opens `file`: its state-structure
 * check and llama.cpp's own open do not pass O_NONBLOCK, so a FIFO under the name would block a
 * worker thread for good (and process.exit() with it). A symlink is followed, as users name files.
 */
async function requireStateFile(file: string): Promise<void> {
  let opened: OpenedFile;
  try {
    opened = await openRegularFile(file, { followSymlinks: true });
  } catch (err) {
    if (err instanceof NotRegularFileError) {
      throw new KvstashError('E_STATE_LOAD', `cannot load state from ${file}: ${err.message}; give a file saveState() wrote`, { cause: err });
    }
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new KvstashError('E_STATE_LOAD', `no state file at ${file}`, { cause: err });
    throw new KvstashError('E_STATE_LOAD', `cannot open state file ${file}: ${(err as Error).message}`, { cause: err });
  }
  await opened.handle.close();
}
