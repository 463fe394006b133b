/**
 * HTTP plumbing of the server: OpenAI's error shape, JSON bodies in and out, and the one SSE writer.
 *
 * Plain node:http, no framework: the server has a dozen routes, the bodies are validated by the
 * handlers against OpenAI's shapes (which a schema library would only restate), and on a 4 GB
 * Rockchip board every dependency is memory and install time. Nothing here needs more.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { isKvstashError, type KvstashErrorCode } from '../errors.js';

export interface ApiErrorOptions {
  /** OpenAI's error type. Default by status: invalid_request_error (4xx), server_error (5xx). */
  type?: string;
  code?: string | null;
  param?: string | null;
  /** Whether a retry can help: false sends `x-should-retry: false`. Default: true for 429 and 503. */
  retryable?: boolean;
  /** Extra response headers (e.g. Retry-After). */
  headers?: Record<string, string>;
  cause?: unknown;
}

/** A failure the client is told about: becomes `{error: {message, type, param, code}}` with `status`. */
export class ApiError extends Error {
  readonly status: number;
  readonly type: string;
  readonly code: string | null;
  readonly param: string | null;
  readonly retryable: boolean;
  readonly headers: Record<string, string>;

  constructor(status: number, message: string, options: ApiErrorOptions = {}) {
    super(message, { cause: options.cause });
    this.name = 'ApiError';
    this.status = status;
    this.type = options.type ?? defaultType(status);
    this.code = options.code ?? null;
    this.param = options.param ?? null;
    this.retryable = options.retryable ?? (status === 429 || status === 503);
    this.headers = options.headers ?? {};
  }

  toJSON(): { error: { message: string; type: string; param: string | null; code: string | null } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

function defaultType(status: number): string {
  if (status === 401) return 'authentication_error';
  if (status === 404) return 'not_found_error';
  if (status === 429) return 'rate_limit_error';
  return status >= 500 ? 'server_error' : 'invalid_request_error';
}

/** Shorthand for the commonest client error: a field that is missing or has the wrong value. */
export function invalidField(param: string, message: string): ApiError {
  return new ApiError(400, message, { param, code: 'invalid_value' });
}

/**
 * An argument check of the layer below (TypeError/RangeError thrown synchronously when a request's
 * values reach it) as a 400: the route validated the shape, the backend knows its own limits
 * (RKLLM's fixed token limit, one input per run). Anything else thrown stays a 500.
 */
export function rejectedArguments<T>(work: () => T): T {
  try {
    return work();
  } catch (err) {
    if (err instanceof RangeError || err instanceof TypeError) throw new ApiError(400, err.message, { code: 'invalid_value', retryable: false, cause: err });
    throw err;
  }
}

/** KvstashError codes a client caused (the rest are the server's problem: 500). */
const CLIENT_CODES: Partial<Record<KvstashErrorCode, { status: number; code: string }>> = {
  E_CONTEXT_FULL: { status: 400, code: 'context_length_exceeded' },
  E_TOKEN_INVALID: { status: 400, code: 'invalid_value' },
  E_TOKENIZE: { status: 400, code: 'invalid_value' },
  E_CHAT_TEMPLATE: { status: 400, code: 'invalid_value' },
  E_SESSION_NOT_FOUND: { status: 404, code: 'not_found' },
};

/**
 * The one mapping from any thrown value to what the client sees. Internals (stack, paths,
 * native messages of unexpected failures) stay in the log, never in the response.
 */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  if (isKvstashError(err)) {
    const known = CLIENT_CODES[err.code];
    if (known) return new ApiError(known.status, err.message, { code: known.code, retryable: false, cause: err });
    if (err.code === 'E_ABORTED') return new ApiError(499, 'the request was cancelled', { code: 'cancelled', cause: err });
  }
  return new ApiError(500, 'the server failed to process the request; its log has the details', { code: 'internal_error', cause: err });
}

function errorHeaders(err: ApiError): Record<string, string> {
  return err.retryable ? { ...err.headers } : { ...err.headers, 'x-should-retry': 'false' };
}

/** Writes a JSON response (no-op when the response has already started). */
export function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent || res.destroyed) return;
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

/** Writes an error in OpenAI's shape; returns the ApiError it became (for the log line). */
export function sendError(res: ServerResponse, err: unknown): ApiError {
  const api = toApiError(err);
  sendJson(res, api.status, api.toJSON(), errorHeaders(api));
  return api;
}

/** Reads and parses a JSON request body of at most `maxBytes` (413 beyond, 400 when not JSON). */
export async function readJsonBody(req: IncomingMessage, maxBytes: number): Promise<unknown> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > maxBytes) throw bodyTooLarge(maxBytes);
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > maxBytes) throw bodyTooLarge(maxBytes);
    chunks.push(chunk);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if (text.trim() === '') throw new ApiError(400, 'the request needs a JSON body', { code: 'invalid_json', retryable: false });
  try {
    return JSON.parse(text) as unknown;
  } catch (err) {
    throw new ApiError(400, `the body is not valid JSON: ${(err as Error).message}`, { code: 'invalid_json', retryable: false });
  }
}

function bodyTooLarge(maxBytes: number): ApiError {
  return new ApiError(413, `the request body exceeds ${maxBytes} bytes`, { code: 'request_too_large', retryable: false });
}

export interface SseEvent {
  /** The SSE `event:` field (the Responses API names its events); none for chat completions. */
  event?: string;
  /** JSON-serialised into the `data:` field. */
  data: unknown;
}

export interface SseOptions {
  /** Send `data: [DONE]` after the last event (chat and text completions; not Responses). Default false. */
  done?: boolean;
  /** A comment line is written after this long without an event, so proxies and clients keep the
   * connection through a long prefill. Default 10000. Unit: ms. */
  keepAliveMs?: number;
  /** Headers added to the 200 response. */
  headers?: Record<string, string>;
}

/**
 * Streams `events` as Server-Sent Events. A write the socket cannot take waits for 'drain', so a
 * slow reader slows the producer instead of filling memory. A failure after the first byte is sent
 * as `data: {"error": ...}` (the openai client raises it as an APIError); before it, as a normal
 * error response. When the client goes away the iterator is returned (its producer sees the
 * signal, which the caller aborts on 'close').
 * Resolves once the response has ended; rejects never.
 */
export async function sendSse(res: ServerResponse, events: AsyncIterable<SseEvent>, signal: AbortSignal, options: SseOptions = {}): Promise<{ error?: ApiError }> {
  const keepAliveMs = options.keepAliveMs ?? 10_000;
  const iterator = events[Symbol.asyncIterator]();
  let started = false;
  const start = () => {
    if (started) return;
    started = true;
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no', ...options.headers });
    res.flushHeaders();
  };
  const write = async (text: string): Promise<void> => {
    if (res.destroyed || signal.aborted) return;
    if (!res.write(text)) await drained(res, signal);
  };
  let pending: Promise<IteratorResult<SseEvent>> | undefined;
  try {
    for (;;) {
      pending ??= iterator.next();
      const next = await within(pending, keepAliveMs, signal);
      if (signal.aborted) break;
      if (next === TIMEOUT) {
        // Headers go out with the first keep-alive: a client sees the stream open during prefill.
        start();
        await write(': keep-alive\n\n');
        continue;
      }
      pending = undefined;
      if (next.done) break;
      start();
      const { event, data } = next.value;
      await write(`${event ? `event: ${event}\n` : ''}data: ${JSON.stringify(data)}\n\n`);
    }
    if (!signal.aborted && !res.destroyed) {
      start();
      if (options.done) await write('data: [DONE]\n\n');
      res.end();
    }
    return {};
  } catch (err) {
    const api = toApiError(err);
    if (!started) sendJson(res, api.status, api.toJSON(), errorHeaders(api));
    else if (!res.destroyed) {
      res.write(`data: ${JSON.stringify(api.toJSON())}\n\n`);
      res.end();
    }
    return { error: api };
  } finally {
    if (signal.aborted) {
      // Let the producer finish its cleanup (it was aborted through the same signal).
      await iterator.return?.().catch(() => undefined);
      if (pending) await pending.catch(() => undefined);
    }
  }
}

const TIMEOUT = Symbol('timeout');

/** `promise`'s value, or TIMEOUT after `ms` or on abort, whichever comes first; no timer left behind. */
function within<T>(promise: Promise<T>, ms: number, signal: AbortSignal): Promise<T | typeof TIMEOUT> {
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const timeout = new Promise<typeof TIMEOUT>((resolve) => {
    timer = setTimeout(resolve, ms, TIMEOUT);
    onAbort = () => resolve(TIMEOUT);
    signal.addEventListener('abort', onAbort, { once: true });
  });
  return Promise.race([promise, timeout]).finally(() => {
    clearTimeout(timer);
    signal.removeEventListener('abort', onAbort!);
  });
}

function drained(res: ServerResponse, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      res.off('drain', done);
      res.off('close', done);
      signal.removeEventListener('abort', done);
      resolve();
    };
    res.on('drain', done);
    res.on('close', done);
    signal.addEventListener('abort', done, { once: true });
  });
}
