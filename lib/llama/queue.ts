import { KvstashError } from '../errors.js';

/**
 * Runs a context's slow operations one after another, in call order. llama.cpp must never see two
 * operations on one context at once; queueing (rather than refusing) lets callers fire decodes
 * without coordinating. `drain()` resolves when everything queued so far has settled.
 */
export class OperationQueue {
  private tail: Promise<unknown> = Promise.resolve();
  private pending = 0;

  get size(): number {
    return this.pending;
  }

  run<T>(operation: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    this.pending++;
    const result = this.tail.then(() => {
      if (signal?.aborted) throw abortError(signal);
      return operation();
    });
    const settled = result.then(
      () => undefined,
      () => undefined,
    );
    this.tail = settled.then(() => {
      this.pending--;
    });
    return result;
  }

  drain(): Promise<void> {
    return this.tail.then(() => undefined);
  }
}

export function abortError(signal: AbortSignal): KvstashError {
  const reason: unknown = signal.reason;
  const detail = reason instanceof Error ? `: ${reason.message}` : '';
  return new KvstashError('E_ABORTED', `the operation was aborted${detail}`, { cause: reason });
}
