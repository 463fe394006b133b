import { KvstashError } from '../errors.js';

/**
 * Runs a context's slow operations one after another, in call order. llama.cpp must never see two
 * operations on one context at once; queueing (rather than refusing) lets callers fire decodes
 * without coordinating. `drain()` resolves when everything queued so far has settled.
 *
 * An operation still waiting for its turn leaves the queue at once when its AbortSignal fires
 * (E_ABORTED) or when the owner closes (closeWaiting): a caller that gave up must not wait behind a
 * long generation to hear so. It never starts then. An operation that has started handles its
 * signal itself (the native abort).
 */
export class OperationQueue {
  private tail: Promise<unknown> = Promise.resolve();
  private pending = 0;
  private readonly waiting = new Set<(err: unknown) => void>();

  /** Operations queued or running (one that left early counts until its turn has passed). */
  get size(): number {
    return this.pending;
  }

  run<T>(operation: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    if (signal?.aborted) return Promise.reject(abortError(signal));
    this.pending++;
    return new Promise<T>((resolve, reject) => {
      let state: 'waiting' | 'started' | 'left' = 'waiting';
      const leave = (err: unknown): void => {
        if (state !== 'waiting') return;
        state = 'left';
        forget();
        reject(err);
      };
      const onAbort = (): void => leave(abortError(signal!));
      const forget = (): void => {
        signal?.removeEventListener('abort', onAbort);
        this.waiting.delete(leave);
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiting.add(leave);
      const turn = this.tail.then(async () => {
        if (state === 'left') return; // its turn came after it left: skip it
        state = 'started';
        forget();
        try {
          resolve(await operation());
        } catch (err) {
          reject(err);
        }
      });
      this.tail = turn.then(() => {
        this.pending--;
      });
    });
  }

  /** Rejects every operation that has not started with `error()`. */
  closeWaiting(error: () => unknown): void {
    for (const leave of [...this.waiting]) leave(error());
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
