/**
 * createServer(): kvstash's OpenAI-compatible HTTP server. Routing, auth, the request log, and
 * shutdown live here; each route parses its body and calls the layers below (chat.ts for the
 * OpenAI formats, model-pool.ts for models and sequences, http.ts for errors and SSE).
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { KvstashError } from '../errors.js';
import { userCacheDir } from '../util/paths.js';
import { chatChunks, chatCompletion, parseChatRequest, parseCompletionRequest, requireModel, requireObject, startRun, textChunks, textCompletion, type RunResult } from './chat.js';
import { ApiError, readJsonBody, sendError, sendJson, sendSse, type SseEvent } from './http.js';
import { Metrics } from './metrics.js';
import { ModelPool, type ServedModel } from './model-pool.js';
import { NamedCacheService } from './named-cache.js';
import { ResponsesService } from './responses.js';

export interface ServerOptions {
  /** The models folder: `<models>/<id>/<file>.gguf|.rkllm`, optionally with a model.json. */
  models: string;
  /** Bearer token every request but GET /health must carry. Default: none (open). */
  apiKey?: string;
  /** Prompt caches, one folder per model; null keeps them in RAM. Default `<user cache dir>/kvstash/server/cache`. */
  cacheDir?: string | null;
  /** Where Responses chains (durable sessions) are kept. Default `<user cache dir>/kvstash/server/sessions`. */
  sessionsDir?: string;
  /** Compute threads per model. Default: every core. */
  threads?: number;
  /** KV cells per model context, shared by its sequences. Default min(trained, 4096). Unit: tokens. */
  contextSize?: number;
  /** Sequences per model: requests generating together in one batch. Default 4. */
  parallel?: number;
  /** Warmed into each model's cache at load; the system prompt of requests that bring none. */
  systemPrompt?: string;
  /** Unload a model unused this long; 0 never. Default 0. Unit: seconds. */
  idleUnloadSeconds?: number;
  /** Budget of the loaded models' estimated memory; LRU idle models are unloaded past it. Default unbounded. Unit: bytes. */
  maxMemoryBytes?: number;
  /** Requests waiting for a sequence per model before 429. Default 64. */
  maxQueue?: number;
  /** Largest request body. Default 4 MiB. Unit: bytes. */
  maxBodyBytes?: number;
  /** How long shutdown waits for running requests before aborting them. Default 30000. Unit: ms. */
  shutdownTimeoutMs?: number;
  /** SSE keep-alive comment interval while nothing else is sent. Default 10000. Unit: ms. */
  keepAliveMs?: number;
  /** The request log and warnings, one line each. Default: stderr. */
  log?: (line: string) => void;
}

export interface KvstashServer {
  /** Starts listening; resolves with the URL (`http://127.0.0.1:<port>`). Port 0 picks a free port. */
  listen(options?: { host?: string; port?: number }): Promise<string>;
  /** The URL once listening. */
  readonly url: string;
  readonly pool: ModelPool;
  readonly metrics: Metrics;
  /** Stops accepting, lets running requests finish (bounded by shutdownTimeoutMs), flushes cache
   * writes, unloads the models. Idempotent. */
  close(): Promise<void>;
}

interface RequestState {
  id: string;
  route: string;
  model?: string;
  result?: RunResult;
  status?: number;
}

export function createServer(options: ServerOptions): KvstashServer {
  return new Server(options);
}

class Server implements KvstashServer {
  readonly pool: ModelPool;
  readonly metrics: Metrics;
  private readonly http: http.Server;
  private readonly log: (line: string) => void;
  private readonly apiKeyDigest: Buffer | undefined;
  private readonly responses: ResponsesService;
  private readonly namedCaches: NamedCacheService;
  private readonly inflight = new Set<{ done: Promise<void>; abort: () => void }>();
  private address: string | undefined;
  private closing: Promise<void> | undefined;

  constructor(private readonly options: ServerOptions) {
    this.log = options.log ?? ((line) => process.stderr.write(`${line}\n`));
    const cacheDir = options.cacheDir === undefined ? path.join(userCacheDir(), 'server', 'cache') : options.cacheDir;
    this.pool = new ModelPool({
      dir: options.models,
      cacheDir: cacheDir === null ? null : path.resolve(cacheDir),
      threads: options.threads,
      contextSize: options.contextSize,
      parallel: options.parallel,
      systemPrompt: options.systemPrompt,
      idleUnloadMs: (options.idleUnloadSeconds ?? 0) * 1000,
      maxMemoryBytes: options.maxMemoryBytes,
      maxQueue: options.maxQueue,
      log: this.log,
    });
    this.metrics = new Metrics(this.pool);
    this.responses = new ResponsesService({ dir: path.resolve(options.sessionsDir ?? path.join(userCacheDir(), 'server', 'sessions')) });
    this.namedCaches = new NamedCacheService({ pool: this.pool, cacheDir });
    this.apiKeyDigest = options.apiKey ? digest(options.apiKey) : undefined;
    this.http = http.createServer((req, res) => this.handle(req, res));
  }

  get url(): string {
    if (!this.address) throw new KvstashError('E_DISPOSED', 'the server is not listening: call listen() first');
    return this.address;
  }

  listen(options: { host?: string; port?: number } = {}): Promise<string> {
    const host = options.host ?? '127.0.0.1';
    return new Promise((resolve, reject) => {
      this.http.once('error', reject);
      this.http.listen(options.port ?? 8080, host, () => {
        this.http.off('error', reject);
        const { port } = this.http.address() as AddressInfo;
        this.address = `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
        resolve(this.address);
      });
    });
  }

  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    const stopped = new Promise<void>((resolve) => this.http.close(() => resolve()));
    this.http.closeIdleConnections();
    const timeoutMs = this.options.shutdownTimeoutMs ?? 30_000;
    let timer: NodeJS.Timeout | undefined;
    const running = [...this.inflight];
    const finished = await Promise.race([
      Promise.all(running.map((r) => r.done)).then(() => true),
      new Promise<boolean>((resolve) => (timer = setTimeout(resolve, timeoutMs, false))),
    ]);
    clearTimeout(timer);
    if (!finished) {
      this.log(`kvstash serve: ${this.inflight.size} request(s) still running after ${timeoutMs} ms; aborting them`);
      for (const request of this.inflight) request.abort();
      await Promise.all([...this.inflight].map((r) => r.done));
    }
    // Models unload after their caches (and the Responses chains' KV entries) have flushed their writes.
    await this.responses.close().catch((err: unknown) => this.log(`kvstash serve: flushing responses failed: ${(err as Error).message}`));
    await this.pool.close(timeoutMs);
    this.http.closeAllConnections();
    await stopped;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const state: RequestState = { id: requestIdOf(req), route: 'unknown' };
    res.setHeader('x-request-id', state.id);
    const started = performance.now();
    const controller = new AbortController();
    // 'close' before the response finished: the client went away. Generation stops at its next step.
    res.on('close', () => {
      if (!res.writableFinished) controller.abort(new KvstashError('E_ABORTED', 'the client closed the connection'));
    });
    const request = {
      abort: () => controller.abort(new KvstashError('E_ABORTED', 'the server is shutting down')),
      done: undefined as unknown as Promise<void>,
    };
    request.done = this.route(req, res, state, controller.signal)
      .catch((err: unknown) => {
        const api = controller.signal.aborted && !res.writableEnded ? new ApiError(499, 'client closed request') : sendError(res, err);
        state.status = api.status;
        if (api.status >= 500 && api.status !== 503) this.log(`kvstash serve: ${state.id} failed: ${(err as Error)?.stack ?? String(err)}`);
      })
      .finally(() => {
        this.inflight.delete(request);
        const status = state.status ?? res.statusCode;
        if (status === 499) this.metrics.aborted.inc({ model: state.model ?? '' });
        this.metrics.requests.inc({ route: state.route, status: String(status) });
        this.log(requestLine(req, state, status, performance.now() - started));
      });
    this.inflight.add(request);
  }

  private async route(req: IncomingMessage, res: ServerResponse, state: RequestState, signal: AbortSignal): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const method = req.method ?? 'GET';
    const pathname = url.pathname.replace(/\/+$/, '') || '/';
    if (pathname === '/health') {
      state.route = '/health';
      requireMethod(method, 'GET');
      if (this.closing) return sendJson(res, 503, { status: 'shutting down' });
      if (this.pool.loadingCount > 0) return sendJson(res, 503, { status: 'loading model' });
      return sendJson(res, 200, { status: 'ok' });
    }
    if (this.closing) throw new ApiError(503, 'the server is shutting down', { code: 'shutting_down', headers: { connection: 'close' } });
    this.authorize(req);
    if (pathname === '/metrics') {
      state.route = '/metrics';
      requireMethod(method, 'GET');
      const text = this.metrics.render();
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8', 'content-length': Buffer.byteLength(text) });
      res.end(text);
      return;
    }
    if (pathname === '/v1/models') {
      state.route = '/v1/models';
      requireMethod(method, 'GET');
      return sendJson(res, 200, { object: 'list', data: this.pool.list() });
    }
    const modelMatch = /^\/v1\/models\/([^/]+)$/.exec(pathname);
    if (modelMatch) {
      state.route = '/v1/models/{id}';
      requireMethod(method, 'GET');
      const id = decodeURIComponent(modelMatch[1]!);
      const model = this.pool.list().find((m) => m.id === id);
      if (!model) throw new ApiError(404, `The model '${id}' does not exist`, { code: 'model_not_found', param: 'model', retryable: false });
      return sendJson(res, 200, model);
    }
    if (pathname === '/v1/chat/completions') {
      state.route = pathname;
      requireMethod(method, 'POST');
      return this.chat(req, res, state, signal);
    }
    if (pathname === '/v1/completions') {
      state.route = pathname;
      requireMethod(method, 'POST');
      return this.completions(req, res, state, signal);
    }
    if (pathname === '/v1/responses' || pathname.startsWith('/v1/responses/')) {
      state.route = pathname === '/v1/responses' ? pathname : '/v1/responses/{id}';
      return this.responsesRoute(req, res, state, signal, method, pathname);
    }
    if (pathname === '/v1/cache' || pathname.startsWith('/v1/cache/')) return this.cacheRoute(req, res, state, signal, method, pathname);
    throw new ApiError(404, `no route ${method} ${url.pathname}`, { code: 'not_found', retryable: false });
  }

  private async responsesRoute(req: IncomingMessage, res: ServerResponse, state: RequestState, signal: AbortSignal, method: string, pathname: string): Promise<void> {
    if (pathname === '/v1/responses') {
      requireMethod(method, 'POST');
      const body = await readJsonBody(req, this.maxBodyBytes);
      const served = await this.served(body, state);
      if ((body as { stream?: unknown }).stream === true) {
        await this.stream(res, this.responses.stream(served, body, { signal }), signal, false);
        if (signal.aborted) throw signal.reason;
        return;
      }
      return sendJson(res, 200, await this.responses.create(served, body, { signal }));
    }
    const id = segments(pathname, 3)?.[0];
    if (id === undefined) throw notFound(method, pathname);
    if (method === 'GET') return sendJson(res, 200, await this.responses.get(id));
    if (method === 'DELETE') return sendJson(res, 200, await this.responses.delete(id));
    throw new ApiError(405, 'use GET or DELETE for this route', { code: 'method_not_allowed', retryable: false });
  }

  private async cacheRoute(req: IncomingMessage, res: ServerResponse, state: RequestState, signal: AbortSignal, method: string, pathname: string): Promise<void> {
    const parts = pathname === '/v1/cache' ? [] : segments(pathname, 3);
    if (parts === undefined || parts.length > 2) throw notFound(method, pathname);
    state.route = ['/v1/cache', '/v1/cache/{model}', '/v1/cache/{model}/{name}'][parts.length]!;
    const [model, name] = parts;
    if (model !== undefined) state.model = model;
    if (model === undefined) {
      requireMethod(method, 'GET');
      return sendJson(res, 200, await this.namedCaches.list());
    }
    if (name === undefined) {
      if (method === 'GET') return sendJson(res, 200, await this.namedCaches.listModel(model));
      if (method === 'POST') return sendJson(res, 201, await this.namedCaches.create(model, await readJsonBody(req, this.maxBodyBytes), { signal }));
      throw new ApiError(405, 'use GET or POST for this route', { code: 'method_not_allowed', retryable: false });
    }
    if (method === 'GET') return sendJson(res, 200, await this.namedCaches.get(model, name));
    if (method === 'DELETE') return sendJson(res, 200, await this.namedCaches.delete(model, name));
    throw new ApiError(405, 'use GET or DELETE for this route', { code: 'method_not_allowed', retryable: false });
  }

  private get maxBodyBytes(): number {
    return this.options.maxBodyBytes ?? 4 << 20;
  }

  private authorize(req: IncomingMessage): void {
    if (!this.apiKeyDigest) return;
    const header = req.headers.authorization ?? '';
    const token = /^Bearer\s+(.+)$/i.exec(header)?.[1]?.trim() ?? '';
    // Digests of equal length make the comparison constant-time whatever the token's length.
    if (!timingSafeEqual(digest(token), this.apiKeyDigest)) {
      throw new ApiError(401, token ? 'Incorrect API key provided.' : 'Missing API key: send it as "Authorization: Bearer <key>".', { type: 'invalid_request_error', code: 'invalid_api_key', retryable: false });
    }
  }

  private async served(body: unknown, state: RequestState): Promise<ServedModel> {
    state.model = requireModel(requireObject(body));
    return this.pool.get(state.model);
  }

  private async chat(req: IncomingMessage, res: ServerResponse, state: RequestState, signal: AbortSignal): Promise<void> {
    const body = await readJsonBody(req, this.maxBodyBytes);
    const served = await this.served(body, state);
    const request = parseChatRequest(body, served.defaultSystem);
    await this.generateOn(served, state, signal, async (sequence) => {
      const run = startRun(served, sequence, request.spec, signal);
      if (request.stream) {
        await this.stream(res, chatChunks(run, state.model!, request.hasTools, request.includeUsage, (r) => this.finished(state, r)), signal);
        await run.result.catch(() => undefined);
      } else {
        const { body: reply, result } = await chatCompletion(run, state.model!, request.hasTools);
        this.finished(state, result);
        sendJson(res, 200, reply);
      }
    });
  }

  private async completions(req: IncomingMessage, res: ServerResponse, state: RequestState, signal: AbortSignal): Promise<void> {
    const body = await readJsonBody(req, this.maxBodyBytes);
    const served = await this.served(body, state);
    const request = parseCompletionRequest(body);
    await this.generateOn(served, state, signal, async (sequence) => {
      const run = startRun(served, sequence, request.spec, signal);
      if (request.stream) {
        await this.stream(res, textChunks(run, state.model!, request.includeUsage, (r) => this.finished(state, r)), signal);
        await run.result.catch(() => undefined);
      } else {
        const { body: reply, result } = await textCompletion(run, state.model!);
        this.finished(state, result);
        sendJson(res, 200, reply);
      }
    });
  }

  /** Runs `work` on a leased sequence, released when the generation has ended (also on abort). */
  private async generateOn(served: ServedModel, state: RequestState, signal: AbortSignal, work: (sequence: number) => Promise<void>): Promise<void> {
    const lease = await served.lease(signal);
    try {
      await work(lease.sequence);
    } finally {
      lease.release();
    }
    if (signal.aborted) throw signal.reason;
  }

  private async stream(res: ServerResponse, events: AsyncIterable<SseEvent>, signal: AbortSignal, done = true): Promise<void> {
    const { error } = await sendSse(res, events, signal, { done, keepAliveMs: this.options.keepAliveMs });
    if (error && error.status >= 500) this.log(`kvstash serve: stream failed: ${(error.cause as Error | undefined)?.stack ?? error.message}`);
  }

  private finished(state: RequestState, result: RunResult): void {
    state.result = result;
    this.metrics.generation({ model: state.model!, ...result });
  }
}

function requireMethod(method: string, allowed: string): void {
  if (method !== allowed) throw new ApiError(405, `use ${allowed} for this route`, { code: 'method_not_allowed', retryable: false });
}

/** The decoded path segments after the first `skip` ('' / 'v1' / 'cache'); undefined when one is empty or undecodable. */
function segments(pathname: string, skip: number): string[] | undefined {
  try {
    const parts = pathname.split('/').slice(skip).map(decodeURIComponent);
    return parts.some((p) => p === '') ? undefined : parts;
  } catch {
    return undefined;
  }
}

function notFound(method: string, pathname: string): ApiError {
  return new ApiError(404, `no route ${method} ${pathname}`, { code: 'not_found', retryable: false });
}

function digest(text: string): Buffer {
  return createHash('sha256').update(text).digest();
}

/** The client's X-Request-Id when it is a sane token, else a new one. */
function requestIdOf(req: IncomingMessage): string {
  const given = req.headers['x-request-id'];
  if (typeof given === 'string' && /^[\w.:-]{1,128}$/.test(given)) return given;
  return `req_${randomBytes(8).toString('hex')}`;
}

/** One line per request: id, route, status, time, and for generations tokens, cache and TTFT. */
function requestLine(req: IncomingMessage, state: RequestState, status: number, ms: number): string {
  const parts = [new Date().toISOString(), state.id, req.method ?? '-', (req.url ?? '-').split('?')[0], String(status), `${ms.toFixed(1)}ms`];
  if (state.model !== undefined) parts.push(`model=${state.model}`);
  const r = state.result;
  if (r) {
    parts.push(`prompt=${r.promptTokens}`, `cached=${r.cachedTokens}`, `completion=${r.completionTokens}`, `tier=${r.tier ?? 'miss'}`);
    if (r.ttftMs !== null) parts.push(`ttft=${r.ttftMs.toFixed(1)}ms`);
  }
  return parts.join(' ');
}
