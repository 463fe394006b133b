/**
 * `npm run bench -- --server` (issue 15, item 7): kvstash's OpenAI-compatible server beside
 * llama.cpp's stock `llama-server` (scripts/llama-server.js builds it from the pinned tree without
 * kvstash's edits), both over HTTP with streaming, on the same synthetic model file, with the same
 * threads, parallel slots and context size.
 *
 * Every client sends the shared system prompt (about `prefixTokens` tokens once rendered) and a
 * question of its own (about `questionTokens`), and asks for `maxTokens` tokens, greedy. TTFT is the
 * time from sending the request to the first SSE chunk whose `delta.content` is a non-empty string;
 * output tokens are the server's `usage.completion_tokens`.
 *
 * Both servers run at once and take turns phase by phase (first one, then the other), so a noisy
 * neighbour on the machine slows both alike:
 * 1. restart: a cold request, the server stopped (SIGTERM) and started again, its first request, then
 *    warm single requests;
 * 2. per concurrency level: a first round of clients the server has not served yet (the first
 *    request of new clients sharing the system prompt), then rounds of the same clients, each with a
 *    new question;
 * 3. kvstash only: HTTP overhead, pairs of one request to the server and the same request through
 *    generate() in this process (its own context, the system prompt resident as the server's is);
 * 4. llama.cpp's batching ceiling (llama-batched-bench, as scripts/batched-ceiling.js runs it).
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { setMaxListeners } from 'node:events';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { PromptCache } from '../cache/prompt-cache.js';
import { generate, type GenerationResult } from '../generate/generate.js';
import { loadModel, type Model } from '../llama/model.js';
import type { SyntheticShapeName, SyntheticWeightType } from '../models/synthetic.js';
import { systemInfo } from '../system.js';
import { buildDemoPrompt, DEMO_QUESTIONS } from '../tools/demo-prompt.js';
import type { Ui } from '../tools/status.js';
import { syntheticModelPath } from '../tools/synthetic-model.js';
import { median, round3, samples, type Samples } from './measure.js';

// lib/bench/ under tap and dist/bench/ when compiled: both sit two levels below the package root.
const packageRoot = path.resolve(__dirname, '..', '..');

export interface ServerBenchConfig {
  shape: SyntheticShapeName;
  type: SyntheticWeightType;
  seed: number;
  /** Tokens of the rendered system turn shared by every client (approximate: cut at a word). */
  prefixTokens: number;
  /** Tokens of each client's question (approximate). */
  questionTokens: number;
  /** Tokens each request asks for (`max_tokens`). */
  maxTokens: number;
  /** Compute threads of both servers and of the library. */
  threads: number;
  /** Parallel slots of both servers (`-np`, `--parallel`). */
  parallel: number;
  /** Context size of both servers, in tokens, for all slots together (`-c`, `--context-size`). */
  contextSize: number;
  /** Concurrent clients, one level after another. */
  concurrency: number[];
  /** Rounds per level after its first round. */
  rounds: number;
  /** Warm single requests after the restart's first request. */
  warmRequests: number;
  /** Pairs (server request, the same request through generate()) for the HTTP overhead. */
  overheadPairs: number;
  /** Tokens the llama-batched-bench ceiling uses as its shared prompt. */
  ceilingPromptTokens: number;
  /** Batch size llama-batched-bench runs with (-ub), as the library bench's. */
  ceilingBatchSize: number;
}

export const SERVER_FULL_CONFIG: ServerBenchConfig = {
  shape: 'qwen2-0.5b',
  type: 'q8_0',
  seed: 1,
  prefixTokens: 2000,
  questionTokens: 50,
  maxTokens: 32,
  threads: 2,
  parallel: 8,
  // 2,304 tokens per slot: llama-server with -np 8 splits its context between the slots.
  contextSize: 8 * 2304,
  concurrency: [1, 4, 8],
  rounds: 3,
  warmRequests: 3,
  overheadPairs: 7,
  ceilingPromptTokens: 2000,
  ceilingBatchSize: 512,
};

/**
 * The same requests, slots and levels on the tiny model (2 layers): minutes instead of most of an
 * hour on a busy 2-core machine, where stock llama-server prefills the system prompt again in every
 * new slot. Its prefill is cheap, so its ratios understate what the cache saves on a real model.
 */
export const SERVER_QUICK_CONFIG: ServerBenchConfig = {
  ...SERVER_FULL_CONFIG,
  shape: 'tiny',
  rounds: 2,
  warmRequests: 2,
  overheadPairs: 4,
};

// ---------------------------------------------------------------------------------------------
// One streamed request

export interface ChatRequest {
  model: string;
  system: string;
  question: string;
  maxTokens: number;
}

export interface StreamedResponse {
  /** From sending the request to the response headers. Unit: ms. */
  headersMs: number;
  /** From sending the request to the first chunk with non-empty `delta.content`. Unit: ms. */
  ttftMs: number;
  /** From sending the request to the end of the stream. Unit: ms. */
  totalMs: number;
  /** performance.now() when the request was sent and when its stream ended. */
  startedAt: number;
  endedAt: number;
  text: string;
  /** Chunks carrying non-empty content. */
  contentChunks: number;
  /** The server's usage object: prompt, completion and cached tokens. */
  promptTokens: number;
  completionTokens: number;
  /** `usage.prompt_tokens_details.cached_tokens`, or llama-server's `timings.cache_n`; null when neither is sent. */
  cachedTokens: number | null;
  /** The stream ended with `data: [DONE]`. */
  done: boolean;
  /** kvstash's extra object from the last chunk that had one (tier, restore and TTFT times). */
  kvstash: Record<string, unknown> | null;
}

export class ServerBenchError extends Error {
  override name = 'ServerBenchError';
}

// A connection per request: llama-server closes idle keep-alive connections in a way a reused
// socket meets as "socket hang up", and a fresh local connection costs both servers the same.
const agent = false;

/**
 * POSTs a streaming chat completion and reads its SSE stream to the end: what an OpenAI client sees,
 * timed. A status other than 200, a stream without usage or an error event is a ServerBenchError.
 */
export function streamChat(baseUrl: string, request: ChatRequest, signal?: AbortSignal): Promise<StreamedResponse> {
  const body = JSON.stringify({
    model: request.model,
    messages: [
      { role: 'system', content: request.system },
      { role: 'user', content: request.question },
    ],
    max_tokens: request.maxTokens,
    temperature: 0,
    seed: 1,
    stream: true,
    stream_options: { include_usage: true },
  });
  const url = new URL('/v1/chat/completions', baseUrl);
  return new Promise((resolve, reject) => {
    const startedAt = performance.now();
    let headersMs = -1;
    let ttftMs = -1;
    let text = '';
    let contentChunks = 0;
    let usage: { prompt_tokens?: number; completion_tokens?: number; prompt_tokens_details?: { cached_tokens?: number } } | null = null;
    let timingsCached: number | null = null;
    let kvstash: Record<string, unknown> | null = null;
    let done = false;
    let buffered = '';
    const fail = (message: string) => {
      req.destroy();
      reject(new ServerBenchError(`${url.href}: ${message}`));
    };
    const onEvent = (data: string) => {
      if (data === '[DONE]') {
        done = true;
        return;
      }
      let chunk: {
        error?: { message?: string };
        choices?: Array<{ delta?: { content?: unknown } }>;
        usage?: typeof usage;
        timings?: { cache_n?: number };
        kvstash?: Record<string, unknown>;
      };
      try {
        chunk = JSON.parse(data);
      } catch {
        fail(`an SSE event that is not JSON: ${data.slice(0, 200)}`);
        return;
      }
      if (chunk.error) {
        fail(`an error event: ${chunk.error.message ?? JSON.stringify(chunk.error)}`);
        return;
      }
      const content = chunk.choices?.[0]?.delta?.content;
      if (typeof content === 'string' && content.length > 0) {
        if (ttftMs < 0) ttftMs = performance.now() - startedAt;
        text += content;
        contentChunks++;
      }
      if (chunk.usage) usage = chunk.usage;
      if (typeof chunk.timings?.cache_n === 'number') timingsCached = chunk.timings.cache_n;
      if (chunk.kvstash) kvstash = chunk.kvstash;
    };
    const req = http.request(
      url,
      { method: 'POST', agent, signal, headers: { 'content-type': 'application/json', accept: 'text/event-stream', 'content-length': Buffer.byteLength(body) } },
      (res) => {
        headersMs = performance.now() - startedAt;
        res.setEncoding('utf8');
        if (res.statusCode !== 200) {
          let errorBody = '';
          res.on('data', (c: string) => (errorBody += c));
          res.on('end', () => reject(new ServerBenchError(`${url.href} answered ${res.statusCode}: ${errorBody.slice(0, 500)}`)));
          return;
        }
        res.on('data', (piece: string) => {
          buffered += piece;
          // SSE events end with a blank line; a line may end with \r\n.
          for (let end = buffered.search(/\r?\n\r?\n/); end >= 0; end = buffered.search(/\r?\n\r?\n/)) {
            const event = buffered.slice(0, end);
            buffered = buffered.slice(end).replace(/^\r?\n\r?\n/, '');
            const data = event
              .split(/\r?\n/)
              .filter((line) => line.startsWith('data:'))
              .map((line) => line.slice(5).replace(/^ /, ''))
              .join('\n');
            if (data !== '') onEvent(data);
          }
        });
        res.on('end', () => {
          const endedAt = performance.now();
          if (usage === null || typeof usage.completion_tokens !== 'number' || typeof usage.prompt_tokens !== 'number') {
            reject(new ServerBenchError(`${url.href}: the stream ended without usage (stream_options.include_usage)`));
            return;
          }
          if (ttftMs < 0) {
            reject(new ServerBenchError(`${url.href}: the stream ended without any content (${usage.completion_tokens} completion tokens)`));
            return;
          }
          resolve({
            headersMs,
            ttftMs,
            totalMs: endedAt - startedAt,
            startedAt,
            endedAt,
            text,
            contentChunks,
            promptTokens: usage.prompt_tokens,
            completionTokens: usage.completion_tokens,
            cachedTokens: usage.prompt_tokens_details?.cached_tokens ?? timingsCached,
            done,
            kvstash,
          });
        });
        res.on('error', (err) => reject(new ServerBenchError(`${url.href}: ${err.message}`)));
      },
    );
    req.on('error', (err) => reject(signal?.aborted ? signal.reason : new ServerBenchError(`${url.href}: ${err.message}`)));
    req.end(body);
  });
}

/** A non-streamed one-token raw completion (loads the model on a server that loads on first use): its duration. Unit: ms. */
export function loadRequest(baseUrl: string, model: string, signal?: AbortSignal): Promise<number> {
  const body = JSON.stringify({ model, prompt: 'Hi', max_tokens: 1, temperature: 0 });
  const url = new URL('/v1/completions', baseUrl);
  const startedAt = performance.now();
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: 'POST', agent, signal, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (c: string) => (text += c));
      res.on('end', () => (res.statusCode === 200 ? resolve(performance.now() - startedAt) : reject(new ServerBenchError(`${url.href} answered ${res.statusCode}: ${text.slice(0, 500)}`))));
    });
    req.on('error', (err) => reject(signal?.aborted ? signal.reason : new ServerBenchError(`${url.href}: ${err.message}`)));
    req.end(body);
  });
}

// ---------------------------------------------------------------------------------------------
// Rounds of concurrent clients

export interface RoundResult {
  clients: number;
  /** From the first request sent to the last stream's end. Unit: ms. */
  wallMs: number;
  responses: StreamedResponse[];
  outputTokens: number;
}

/** Sends every request at once and waits for every stream to end. */
export async function runRound(baseUrl: string, requests: readonly ChatRequest[], signal?: AbortSignal): Promise<RoundResult> {
  const responses = await Promise.all(requests.map((request) => streamChat(baseUrl, request, signal)));
  const wallMs = Math.max(...responses.map((r) => r.endedAt)) - Math.min(...responses.map((r) => r.startedAt));
  return { clients: requests.length, wallMs, responses, outputTokens: responses.reduce((a, r) => a + r.completionTokens, 0) };
}

export interface LevelSummary {
  /** TTFT of every request of the rounds summarised. Unit: ms. */
  ttftP50Ms: number;
  ttftP95Ms: number;
  /** Completion tokens of those rounds over their summed wall time. */
  outputTokensPerSecond: number;
  requests: number;
  outputTokens: number;
  wallMs: number;
}

/** p50/p95 TTFT and aggregate output tokens/s of some rounds. */
export function summarizeRounds(rounds: readonly RoundResult[]): LevelSummary {
  const ttfts = rounds.flatMap((r) => r.responses.map((x) => x.ttftMs));
  if (ttfts.length === 0) throw new ServerBenchError('no requests to summarise');
  const outputTokens = rounds.reduce((a, r) => a + r.outputTokens, 0);
  const wallMs = rounds.reduce((a, r) => a + r.wallMs, 0);
  return {
    ttftP50Ms: percentile(ttfts, 50),
    ttftP95Ms: percentile(ttfts, 95),
    outputTokensPerSecond: outputTokens / (wallMs / 1000),
    requests: ttfts.length,
    outputTokens,
    wallMs,
  };
}

/** Nearest-rank percentile (p95 of 8 values is the largest, of 24 the 23rd). */
export function percentile(values: readonly number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1]!;
}

// ---------------------------------------------------------------------------------------------
// The servers

export type ServerName = 'kvstash' | 'llama-server';

/** A server running in a child process, and how to start it again. */
export class ServerProcess {
  private child: ChildProcess | null = null;
  private output = '';
  url = '';

  constructor(
    readonly name: ServerName,
    private readonly command: string,
    /** Arguments; `{port}` is replaced by a free port when the server cannot pick one itself. */
    private readonly args: readonly string[],
    /** The server prints its URL on a line of stdout (kvstash serve); otherwise it is http://127.0.0.1:{port}. */
    private readonly printsUrl: boolean,
  ) {}

  /** Starts it and waits until GET /health answers 200. Unit of the result: ms until then. */
  async start(signal: AbortSignal): Promise<number> {
    if (this.child) throw new ServerBenchError(`${this.name} is already running`);
    const started = performance.now();
    const port = this.args.includes('{port}') ? await freePort() : 0;
    const args = this.args.map((a) => (a === '{port}' ? String(port) : a));
    this.output = '';
    const child = spawn(this.command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.child = child;
    child.stderr!.setEncoding('utf8').on('data', (c: string) => (this.output = (this.output + c).slice(-20000)));
    const exited = new Promise<never>((_, reject) =>
      child.once('exit', (code, sig) => reject(new ServerBenchError(`${this.name} exited (${sig ?? code}) while starting: ${this.output.slice(-3000)}`))),
    );
    exited.catch(() => undefined);
    const url = this.printsUrl
      ? await Promise.race([firstUrlLine(child), exited, timeout(120_000, `${this.name} printed no URL`)])
      : `http://127.0.0.1:${port}`;
    if (!this.printsUrl) child.stdout!.resume();
    this.url = url;
    // The poll stops when the race is decided either way (a server that exited is not polled on).
    const polling = { stopped: false };
    try {
      await Promise.race([waitHealthy(url, signal, polling), exited, timeout(300_000, `${this.name} never answered /health with 200`)]);
    } finally {
      polling.stopped = true;
    }
    return performance.now() - started;
  }

  /** SIGTERM, and SIGKILL after 30 s. */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.child = null;
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
    await exited;
    clearTimeout(timer);
  }

  /** The last of its stderr, for error messages. */
  get log(): string {
    return this.output;
  }

  /** Its command line, as the report shows it. */
  get commandLine(): string {
    return [path.basename(this.command), ...this.args].join(' ');
  }
}

/**
 * Waits, at most `maxMs`, until the machine's CPUs are nearly idle over a 25 ms window; resolves
 * with whether they were. After its last decode, ggml's worker threads keep polling for new work
 * for about 100 ms: measured here, 90-110 ms of CPU time in the 100 ms after each response, for
 * llama-server and kvstash alike. A request sent to one server then ran on one core of two while
 * the other server's threads spun on the other, so every measured request, round and pair waits
 * for the machine to settle first. /proc/stat missing (not Linux): no wait.
 */
export async function quietCpu(maxMs = 1000): Promise<boolean> {
  const read = (): { busy: number; total: number } | null => {
    let line: string;
    try {
      line = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
    } catch {
      return null;
    }
    // cpu  user nice system idle iowait irq softirq steal ...
    const fields = line.trim().split(/\s+/).slice(1, 9).map(Number);
    const total = fields.reduce((sum, v) => sum + v, 0);
    return { busy: total - fields[3]! - fields[4]!, total };
  };
  const deadline = performance.now() + maxMs;
  let before = read();
  if (!before) return true;
  while (performance.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 25));
    const after = read()!;
    const window = after.total - before.total;
    if (window > 0 && (after.busy - before.busy) / window < 0.1) return true;
    before = after;
  }
  return false;
}

function firstUrlLine(child: ChildProcess): Promise<string> {
  return new Promise((resolve) => {
    let text = '';
    const onData = (c: string) => {
      text += c;
      const match = /(https?:\/\/[^\s]+)/.exec(text);
      if (match && text.includes('\n')) {
        child.stdout!.off('data', onData);
        child.stdout!.resume();
        resolve(match[1]!.replace(/\/$/, ''));
      }
    };
    child.stdout!.setEncoding('utf8').on('data', onData);
  });
}

function timeout(ms: number, message: string): Promise<never> {
  return new Promise((_, reject) => setTimeout(() => reject(new ServerBenchError(message)), ms).unref());
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Polls GET /health until it answers 200; returns quietly once `polling.stopped` is set. */
async function waitHealthy(url: string, signal: AbortSignal, polling: { stopped: boolean }): Promise<void> {
  for (;;) {
    if (polling.stopped) return;
    signal.throwIfAborted();
    const status = await new Promise<number>((resolve) => {
      const req = http.get(new URL('/health', url), (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.on('error', () => resolve(0));
    });
    if (status === 200) return;
    await new Promise((r) => setTimeout(r, 100));
  }
}

// ---------------------------------------------------------------------------------------------
// The prompts

export interface ServerBenchPrompts {
  system: string;
  /** Tokens of the rendered system turn. */
  systemTokens: number;
  /** A new question each call, never the same twice: `question(client, round)`. */
  question: (client: string, round: number) => string;
}

/** The demo's system prompt cut to about `prefixTokens`, and questions of about `questionTokens`. */
export function buildServerPrompts(model: Model, prefixTokens: number, questionTokens: number): ServerBenchPrompts {
  const demo = buildDemoPrompt(model, prefixTokens);
  const question = (client: string, round: number): string => {
    // Each question opens with its own ticket line, so no two share more than the turn's header.
    let body = `Ticket ${client}-${round}.`;
    for (let q = 0; model.tokenize(body, { addSpecial: false }).length < questionTokens; q++) body += ` ${DEMO_QUESTIONS[(round + q) % DEMO_QUESTIONS.length]}`;
    return body;
  };
  return { system: demo.system, systemTokens: demo.prefix.length, question };
}

// ---------------------------------------------------------------------------------------------
// The run

export interface ServerSideResult {
  name: ServerName;
  command: string;
  /** Start until /health answered 200 (the first start). Unit: ms. */
  startMs: number;
  coldTtftMs: number;
  /** The first request after a restart, and the median of the warm single requests after it. */
  restartTtftMs: number;
  warmTtftMs: number;
  warmTtft: Samples;
  restartCachedTokens: number | null;
  /** The one-token completion sent after the restart to load the model, before the first chat request. Unit: ms. */
  loadRequestMs: number;
  levels: Array<{
    clients: number;
    firstRound: LevelSummary & { ttfts: number[]; cachedTokens: Array<number | null> };
    steady: LevelSummary;
  }>;
  /** Prompt tokens the server counted for a request (the same rendering on both servers). */
  promptTokens: number;
  completionTokensPerRequest: number[];
}

export interface OverheadResult {
  /**
   * Median over the server's requests of (TTFT at the client − the TTFT generate() measured for
   * that request inside the server): what HTTP and the request's handling add to the library on
   * the very same request, context and KV state. Unit: ms.
   */
  overheadMs: number;
  inServerDifferences: number[];
  /**
   * Median over pairs of (server TTFT − TTFT of the same request through generate() in the bench
   * process, on a context of its own). Besides the overhead it holds the two prefills' own noise
   * and the difference between the two contexts: the server's holds its other sequences' turns,
   * which its attention spans. Unit: ms.
   */
  pairedDifferenceMs: number;
  serverTtft: Samples;
  libraryTtft: Samples;
  /** Per pair, server − bench-process library. */
  differences: number[];
  libraryTier: Array<string | null>;
  serverKvstash: Array<Record<string, unknown> | null>;
}

export interface ServerTarget {
  id: string;
  description: string;
  value: number | null;
  unit: '×' | 'ms';
  op: '<=' | '>=';
  limit: number;
  /** The figures it was formed from. */
  formula: string;
  met: boolean | null;
}

export interface ServerBenchReport {
  format: 'kvstash-server-bench/1';
  startedAt: string;
  finishedAt: string;
  durationSeconds: number;
  quick: boolean;
  machine: { cpu: string; cores: number; loadAverage: { start: number[]; end: number[] }; node: string };
  llamaCommit: string;
  config: ServerBenchConfig & { model: string; systemTokens: number };
  servers: Partial<Record<ServerName, ServerSideResult | { unavailable: string }>>;
  overhead: OverheadResult | { unavailable: string };
  ceiling: { gain: number; tokensPerSecond: Record<string, number>; command: string } | { unavailable: string };
  /**
   * llama.cpp's own time to prefill one client's question (the prompt tokens after the system
   * prompt) at the system prompt's depth, with llama-bench on the same file and threads: no server
   * answers one client faster than this.
   */
  prefillFloor: PrefillFloor | { unavailable: string };
  targets: ServerTarget[];
}

export interface PrefillFloor {
  /** Mean over llama-bench's repetitions. Unit: ms. */
  ms: number;
  promptTokens: number;
  depth: number;
  command: string;
}

export interface ServerBenchOptions {
  config: ServerBenchConfig;
  quick: boolean;
  modelRoot: string;
  signal: AbortSignal;
  ui: Ui;
  /** Which servers to run (default both). */
  servers?: readonly ServerName[];
}

interface Side {
  server: ServerProcess;
  result: Partial<ServerSideResult> & { name: ServerName; levels: ServerSideResult['levels']; completionTokensPerRequest: number[] };
  failed: string | null;
}

export async function runServerBench(options: ServerBenchOptions): Promise<ServerBenchReport> {
  const started = new Date();
  const loadStart = os.loadavg();
  const { config, signal, ui } = options;
  // Every request of a round listens for the abort: 8 clients pass Node's default warning at 10.
  setMaxListeners(4 * Math.max(...config.concurrency) + 16, signal);
  const wanted = options.servers ?? ['llama-server', 'kvstash'];
  const modelPath = await syntheticModelPath(options.modelRoot, signal, ui, { shape: config.shape, type: config.type, seed: config.seed });
  const work = await fsp.mkdtemp(path.join(os.tmpdir(), 'kvstash-server-bench-'));
  const modelId = `${config.shape}-${config.type}`;
  const model = await loadModel(modelPath);
  const sides: Side[] = [];
  const report: Partial<ServerBenchReport> = { servers: {} };
  try {
    const prompts = buildServerPrompts(model, config.prefixTokens, config.questionTokens);
    const request = (client: string, round: number): ChatRequest => ({ model: modelId, system: prompts.system, question: prompts.question(client, round), maxTokens: config.maxTokens });

    let binaries: LlamaBinaries | { unavailable: string } = { unavailable: 'not wanted' };
    if (wanted.includes('llama-server')) {
      binaries = await ui.status('Building llama-server from the pinned llama.cpp tree (once)', () => buildLlamaBinaries());
      if ('unavailable' in binaries) report.servers!['llama-server'] = binaries;
      else {
        const args = ['-m', modelPath, '--host', '127.0.0.1', '--port', '{port}', '-t', String(config.threads), '-np', String(config.parallel), '-c', String(config.contextSize)];
        sides.push(newSide(new ServerProcess('llama-server', binaries.server, args, false)));
      }
    }
    if (wanted.includes('kvstash')) {
      const models = path.join(work, 'models');
      await fsp.mkdir(path.join(models, modelId), { recursive: true });
      await fsp.symlink(modelPath, path.join(models, modelId, 'model.gguf'));
      const cli = path.join(packageRoot, 'dist', 'cli', 'main.js');
      const args = [cli, 'serve', '--models', models, '--port', '0', '--parallel', String(config.parallel), '--threads', String(config.threads),
        '--context-size', String(config.contextSize), '--cache-dir', path.join(work, 'cache'), '--sessions-dir', path.join(work, 'sessions')];
      sides.push(newSide(new ServerProcess('kvstash', process.execPath, args, true)));
    }

    // 1. Restart: cold request, stop, start, first request, warm requests.
    for (const side of sides) {
      await guard(side, signal, async () => {
        side.result.startMs = await ui.status(`[${side.result.name}] Starting`, () => side.server.start(signal));
        await quietCpu();
        const cold = await ui.status(`[${side.result.name}] Cold request (the system prompt prefilled)`, () => streamChat(side.server.url, request('cold', 0), signal));
        side.result.coldTtftMs = cold.ttftMs;
        side.result.promptTokens = cold.promptTokens;
        side.result.completionTokensPerRequest.push(cold.completionTokens);
        await side.server.stop();
        await ui.status(`[${side.result.name}] Restarting`, () => side.server.start(signal));
        // kvstash loads a model on its first request, llama-server before /health says 200: a one-token
        // raw completion loads it, so the chat request after it measures the prompt cache, not the load.
        await quietCpu();
        side.result.loadRequestMs = await loadRequest(side.server.url, modelId, signal);
        await quietCpu();
        const first = await ui.status(`[${side.result.name}] First request after the restart`, () => streamChat(side.server.url, request('restart', 0), signal));
        side.result.restartTtftMs = first.ttftMs;
        side.result.restartCachedTokens = first.cachedTokens;
        const warm: number[] = [];
        for (let i = 0; i < config.warmRequests; i++) {
          await quietCpu();
          const r = await streamChat(side.server.url, request('restart', i + 1), signal);
          warm.push(r.ttftMs);
          side.result.completionTokensPerRequest.push(r.completionTokens);
        }
        side.result.warmTtft = samples(warm);
        side.result.warmTtftMs = median(warm);
      });
    }

    // 2. Concurrency levels, the servers taking turns each round.
    for (const clients of config.concurrency) {
      const ids = Array.from({ length: clients }, (_, i) => `c${clients}.${i}`);
      const steady = new Map<Side, RoundResult[]>();
      for (let round = 0; round <= config.rounds; round++) {
        signal.throwIfAborted();
        for (const side of sides) {
          await guard(side, signal, async () => {
            const label = round === 0 ? `first round of ${clients} new clients` : `round ${round} of ${config.rounds}`;
            await quietCpu();
            const result = await ui.status(`[${side.result.name}] ${clients} concurrent clients, ${label}`, () =>
              runRound(side.server.url, ids.map((id) => request(id, round)), signal),
            );
            side.result.completionTokensPerRequest.push(...result.responses.map((r) => r.completionTokens));
            if (round === 0) {
              side.result.levels.push({
                clients,
                firstRound: { ...summarizeRounds([result]), ttfts: result.responses.map((r) => round3(r.ttftMs)), cachedTokens: result.responses.map((r) => r.cachedTokens) },
                steady: null as unknown as LevelSummary,
              });
            } else steady.set(side, [...(steady.get(side) ?? []), result]);
          });
        }
      }
      for (const side of sides) {
        const level = side.result.levels.find((l) => l.clients === clients);
        const rounds = steady.get(side);
        if (level && rounds) level.steady = summarizeRounds(rounds);
      }
    }

    // 3. HTTP overhead of kvstash's server against generate() on the same request.
    const kvstash = sides.find((s) => s.result.name === 'kvstash' && s.failed === null);
    report.overhead = kvstash
      ? await ui.status(`[kvstash] HTTP overhead (${config.overheadPairs} pairs)`, () => measureOverhead(kvstash.server.url, model, config, request, signal)).catch((err: Error) => ({ unavailable: err.message }))
      : { unavailable: 'kvstash server not measured' };
    for (const side of sides) await side.server.stop();

    // 4. llama.cpp's own batching ceiling.
    report.ceiling =
      'unavailable' in binaries
        ? { unavailable: binaries.unavailable }
        : await ui.status('llama.cpp batching ceiling (llama-batched-bench)', () => measureCeiling(binaries.batchedBench, modelPath, config)).catch((err: Error) => ({ unavailable: err.message }));

    // 5. llama.cpp's own prefill of one client's question, after the system prompt.
    const promptTokens = sides.find((s) => s.result.promptTokens !== undefined)?.result.promptTokens;
    report.prefillFloor =
      'unavailable' in binaries
        ? { unavailable: binaries.unavailable }
        : promptTokens === undefined
          ? { unavailable: 'no request was measured' }
          : await ui.status("llama.cpp's own prefill of one question (llama-bench)", () =>
              measurePrefillFloor(binaries.llamaBench, modelPath, promptTokens - prompts.systemTokens, prompts.systemTokens, config.threads),
            ).catch((err: Error) => ({ unavailable: err.message }));

    for (const side of sides) {
      report.servers![side.result.name] = side.failed !== null ? { unavailable: side.failed } : (roundDeep({ ...side.result, command: side.server.commandLine }) as ServerSideResult);
    }
    const finished = new Date();
    const full: ServerBenchReport = {
      format: 'kvstash-server-bench/1',
      startedAt: started.toISOString(),
      finishedAt: finished.toISOString(),
      durationSeconds: round3((finished.getTime() - started.getTime()) / 1000),
      quick: options.quick,
      machine: { cpu: os.cpus()[0]?.model ?? 'unknown', cores: os.cpus().length, loadAverage: { start: loadStart.map(round3), end: os.loadavg().map(round3) }, node: process.version },
      llamaCommit: systemInfo().llamaCommit,
      config: { ...config, model: modelPath, systemTokens: prompts.systemTokens },
      servers: report.servers!,
      overhead: roundDeep(report.overhead) as ServerBenchReport['overhead'],
      ceiling: report.ceiling,
      prefillFloor: roundDeep(report.prefillFloor) as ServerBenchReport['prefillFloor'],
      targets: [],
    };
    full.targets = evaluateServerTargets(full);
    return full;
  } finally {
    for (const side of sides) await side.server.stop();
    await model.dispose();
    await fsp.rm(work, { recursive: true, force: true });
  }
}

function newSide(server: ServerProcess): Side {
  return { server, result: { name: server.name, levels: [], completionTokensPerRequest: [] }, failed: null };
}

/** Runs a phase of one server; a failure marks that server unavailable (with its log) instead of ending the run. */
async function guard(side: Side, signal: AbortSignal, phase: () => Promise<void>): Promise<void> {
  if (side.failed !== null) return;
  try {
    await phase();
  } catch (err) {
    if ((err as Error).name === 'AbortError' || signal.aborted) throw err;
    // The server logs why (with the stack) as it ends the stream, which reaches this process's pipe
    // after the client has seen the error: give it a moment, then keep enough to hold the stack.
    await new Promise((resolve) => setTimeout(resolve, 500));
    side.failed = `${(err as Error).message}${side.server.log ? `\n${side.server.name} log:\n${side.server.log.slice(-6000)}` : ''}`;
    process.stderr.write(`kvstash bench: ${side.server.name} left out: ${side.failed}\n`);
    await side.server.stop();
  }
}

/** scripts/llama-server.js in a child process (it prints the binaries' paths), or why not. */
interface LlamaBinaries {
  server: string;
  batchedBench: string;
  llamaBench: string;
}

async function buildLlamaBinaries(): Promise<LlamaBinaries | { unavailable: string }> {
  const script = path.join(packageRoot, 'scripts', 'llama-server.js');
  if (!fs.existsSync(script)) return { unavailable: `${script} is missing (it is not part of the installed package)` };
  return new Promise((resolve) => {
    execFile(process.execPath, [script], { maxBuffer: 1 << 24 }, (err, stdout, stderr) => {
      if (err) resolve({ unavailable: `building llama-server failed: ${stderr.trim().split('\n').slice(-5).join('\n')}` });
      else resolve(JSON.parse(stdout.trim().split('\n').pop()!) as LlamaBinaries);
    });
  });
}

async function measureOverhead(
  url: string,
  model: Model,
  config: ServerBenchConfig,
  request: (client: string, round: number) => ChatRequest,
  signal: AbortSignal,
): Promise<OverheadResult> {
  // The library's side as the server holds it: one context with the server's slots, the system
  // prompt evaluated once and kept resident, each request in a sequence of its own.
  const context = await model.createContext({ contextSize: config.contextSize, threads: config.threads, sequences: config.parallel });
  const cache = new PromptCache({ dir: null, maxRamBytes: 0 });
  try {
    const warm = request('overhead', 0);
    await generate(context, { system: warm.system, messages: [{ role: 'user', content: warm.question }], cache, sequence: 0, maxTokens: 1 }).result;
    const server: number[] = [];
    const library: number[] = [];
    const libraryTier: Array<string | null> = [];
    const serverKvstash: Array<Record<string, unknown> | null> = [];
    for (let pair = 1; pair <= config.overheadPairs; pair++) {
      signal.throwIfAborted();
      const same = request('overhead', pair);
      const overHttp = async () => {
        await quietCpu();
        return streamChat(url, same, signal);
      };
      const inProcess = async () => {
        await context.exclusive(() => context.memory.remove(1));
        await quietCpu();
        return generate(context, { system: same.system, messages: [{ role: 'user', content: same.question }], cache, sequence: 1, maxTokens: config.maxTokens }).result;
      };
      // Alternate which goes first, so a drift of the machine's load favours neither.
      let viaHttp: StreamedResponse;
      let viaLibrary: GenerationResult;
      if (pair % 2 === 1) {
        viaHttp = await overHttp();
        viaLibrary = await inProcess();
      } else {
        viaLibrary = await inProcess();
        viaHttp = await overHttp();
      }
      server.push(viaHttp.ttftMs);
      serverKvstash.push(viaHttp.kvstash);
      if (viaLibrary.promptTokens !== viaHttp.promptTokens) {
        throw new ServerBenchError(`not the same request: the server counted ${viaHttp.promptTokens} prompt tokens, generate() ${viaLibrary.promptTokens}`);
      }
      library.push(viaLibrary.ttftMs);
      libraryTier.push(viaLibrary.tier);
    }
    const differences = server.map((s, i) => s - library[i]!);
    const inServer = server.map((s, i) => {
      const measured = serverKvstash[i]?.ttftMs;
      if (typeof measured !== 'number') throw new ServerBenchError('the server reported no kvstash.ttftMs in its usage chunk');
      return s - measured;
    });
    return {
      overheadMs: median(inServer),
      inServerDifferences: inServer.map(round3),
      pairedDifferenceMs: median(differences),
      serverTtft: samples(server),
      libraryTtft: samples(library),
      differences: differences.map(round3),
      libraryTier,
      serverKvstash,
    };
  } finally {
    await context.dispose();
  }
}

/** One of llama.cpp's tools, to its end: its standard output. */
function runTool(binary: string, args: readonly string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(binary, args, { maxBuffer: 1 << 24 }, (err, stdout) => (err ? reject(new ServerBenchError(`${path.basename(binary)} failed: ${err.message}`)) : resolve(stdout))),
  );
}

async function measurePrefillFloor(binary: string, modelPath: string, promptTokens: number, depth: number, threads: number): Promise<PrefillFloor> {
  const args = ['-m', modelPath, '-p', String(promptTokens), '-n', '0', '-d', String(depth), '-t', String(threads), '-r', '3', '-o', 'json'];
  const stdout = await runTool(binary, args);
  const rows = JSON.parse(stdout) as Array<{ n_prompt?: number; n_gen?: number; n_depth?: number; avg_ns?: number }>;
  const row = rows.find((r) => r.n_prompt === promptTokens && r.n_gen === 0);
  if (!row || typeof row.avg_ns !== 'number') throw new ServerBenchError(`llama-bench reported no ${promptTokens}-token prefill: ${stdout.slice(0, 300)}`);
  return { ms: row.avg_ns / 1e6, promptTokens, depth: row.n_depth ?? depth, command: [path.basename(binary), ...args].join(' ') };
}

async function measureCeiling(binary: string, modelPath: string, config: ServerBenchConfig): Promise<ServerBenchReport['ceiling']> {
  const script = path.join(packageRoot, 'scripts', 'batched-ceiling.js');
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { ceilingArgs, generationSpeeds } = require(script) as {
    ceilingArgs: (model: string, config: object) => string[];
    generationSpeeds: (table: string) => Map<number, number>;
  };
  const sessions = Math.max(...config.concurrency);
  const args = ceilingArgs(modelPath, {
    contextSize: Math.max(4096, config.ceilingPromptTokens + sessions * config.maxTokens + 64),
    batchSize: config.ceilingBatchSize,
    prefixTokens: config.ceilingPromptTokens,
    sessionTokens: config.maxTokens,
    sessions,
    threads: config.threads,
  });
  const table = await runTool(binary, args);
  const speeds = generationSpeeds(table);
  const one = speeds.get(1);
  const all = speeds.get(sessions);
  if (one === undefined || all === undefined) throw new ServerBenchError(`no S_TG rows for 1 and ${sessions} sequences in llama-batched-bench's output`);
  return { gain: round3(all / one), tokensPerSecond: Object.fromEntries([...speeds].map(([k, v]) => [String(k), v])), command: `${path.basename(binary)} ${args.join(' ')}` };
}

// ---------------------------------------------------------------------------------------------
// Targets (issue 15, item 7): ratios from this one run

export function evaluateServerTargets(report: Pick<ServerBenchReport, 'servers' | 'overhead' | 'ceiling' | 'prefillFloor' | 'config'>): ServerTarget[] {
  const ours = available(report.servers.kvstash);
  const theirs = available(report.servers['llama-server']);
  const targets: ServerTarget[] = [];
  const add = (id: string, description: string, unit: '×' | 'ms', op: '<=' | '>=', limit: number, value: number | null, formula: string) => {
    const met = value === null ? null : op === '<=' ? value <= limit : value >= limit;
    targets.push({ id, description, unit, op, limit, value: value === null ? null : round3(value), formula, met });
  };
  const ratio = (a: number | undefined, b: number | undefined) => (a === undefined || b === undefined || b === 0 ? null : a / b);
  const floor = 'unavailable' in report.prefillFloor ? null : report.prefillFloor;
  for (const clients of report.config.concurrency) {
    const a = ours?.levels.find((l) => l.clients === clients);
    const b = theirs?.levels.find((l) => l.clients === clients);
    // One client's TTFT cannot go below llama.cpp's own prefill of its question: say where that lies.
    const floorNote =
      clients === 1 && floor && b ? ` (llama-bench prefills the ${floor.promptTokens}-token question at depth ${floor.depth} in ${fmtMs(floor.ms)}: ${(floor.ms / b.steady.ttftP50Ms).toFixed(2)}× llama-server's)` : '';
    add(`steadyTtftP50x${clients}`, `p50 TTFT with ${clients} concurrent clients, every client served before ≤ 0.8 × llama-server's${floorNote}`, '×', '<=', 0.8,
      ratio(a?.steady.ttftP50Ms, b?.steady.ttftP50Ms), `${fmtMs(a?.steady.ttftP50Ms)} / ${fmtMs(b?.steady.ttftP50Ms)}`);
  }
  const firstLevel = report.config.concurrency.find((c) => c > 1) ?? report.config.concurrency[0]!;
  const fa = ours?.levels.find((l) => l.clients === firstLevel)?.firstRound;
  const fb = theirs?.levels.find((l) => l.clients === firstLevel)?.firstRound;
  add('firstRoundTtftP50', `first request of ${firstLevel} new clients sharing the system prompt: p50 TTFT ≤ 0.1 × llama-server's`, '×', '<=', 0.1,
    ratio(fa?.ttftP50Ms, fb?.ttftP50Ms), `${fmtMs(fa?.ttftP50Ms)} / ${fmtMs(fb?.ttftP50Ms)}`);
  for (const clients of report.config.concurrency) {
    const a = ours?.levels.find((l) => l.clients === clients);
    const b = theirs?.levels.find((l) => l.clients === clients);
    add(`outputTokensPerSecondx${clients}`, `aggregate output tokens/s with ${clients} concurrent clients ≥ 1.0 × llama-server's`, '×', '>=', 1,
      ratio(a?.steady.outputTokensPerSecond, b?.steady.outputTokensPerSecond), `${fmtRate(a?.steady.outputTokensPerSecond)} / ${fmtRate(b?.steady.outputTokensPerSecond)} tok/s`);
  }
  add('restartTtft', `first request after a restart ≤ 1.2 × a warm request's TTFT (llama-server: ${theirs ? `${(theirs.restartTtftMs / theirs.warmTtftMs).toFixed(2)}×, ${fmtMs(theirs.restartTtftMs)} / ${fmtMs(theirs.warmTtftMs)}` : 'not measured'})`,
    '×', '<=', 1.2, ratio(ours?.restartTtftMs, ours?.warmTtftMs), `${fmtMs(ours?.restartTtftMs)} / ${fmtMs(ours?.warmTtftMs)}`);
  const overhead = 'unavailable' in report.overhead ? null : report.overhead;
  add('httpOverhead', "HTTP overhead: server TTFT − generate() TTFT on the same request ≤ 5 ms (median; generate()'s TTFT as the server measured it for that request)", 'ms', '<=', 5,
    overhead?.overheadMs ?? null, overhead ? `median(client − server's generate()); paired with generate() here: ${overhead.pairedDifferenceMs.toFixed(1)} ms` : 'not measured');
  const top = Math.max(...report.config.concurrency);
  const bottom = Math.min(...report.config.concurrency);
  const gain = (side: ServerSideResult | null) => {
    const hi = side?.levels.find((l) => l.clients === top)?.steady.outputTokensPerSecond;
    const lo = side?.levels.find((l) => l.clients === bottom)?.steady.outputTokensPerSecond;
    return hi === undefined || lo === undefined ? undefined : hi / lo;
  };
  const ceiling = 'unavailable' in report.ceiling ? undefined : report.ceiling.gain;
  const theirGain = gain(theirs);
  add('concurrencyGain', `concurrency gain (output tokens/s, ${top} clients / ${bottom}) ≥ 0.95 × llama.cpp's own batching gain (llama-batched-bench${theirGain === undefined ? '' : `; llama-server's gain ${theirGain.toFixed(2)}×`})`,
    '×', '>=', 0.95, ratio(gain(ours), ceiling), `${gain(ours)?.toFixed(2) ?? '-'}× / ${ceiling?.toFixed(2) ?? '-'}×`);
  return targets;
}

function available(side: ServerSideResult | { unavailable: string } | undefined): ServerSideResult | null {
  return side === undefined || 'unavailable' in side ? null : side;
}

function fmtMs(value: number | undefined): string {
  return value === undefined ? '-' : `${value.toFixed(1)} ms`;
}

function fmtRate(value: number | undefined): string {
  return value === undefined ? '-' : value.toFixed(1);
}

/** Numbers rounded to 3 decimals, deeply (the JSON report). */
function roundDeep(value: unknown): unknown {
  if (typeof value === 'number') return round3(value);
  if (Array.isArray(value)) return value.map(roundDeep);
  if (value !== null && typeof value === 'object') return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, roundDeep(v)]));
  return value;
}
