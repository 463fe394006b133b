// The server benchmark's harness (lib/bench/server.ts) measures what a streaming OpenAI client sees:
// checked here against a real HTTP server on 127.0.0.1 whose stream is known chunk by chunk, so
// every count is exact. No timing is asserted, only order: the first content cannot be seen before
// the server was allowed to send it.
import http from 'node:http';
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import t, { type Test } from 'tap';
import {
  evaluateServerTargets,
  loadRequest,
  percentile,
  quietCpu,
  runRound,
  ServerBenchError,
  ServerProcess,
  SERVER_FULL_CONFIG,
  streamChat,
  summarizeRounds,
  type ServerBenchReport,
  type ServerSideResult,
} from '../lib/bench/server.js';

interface Received {
  body: { messages: Array<{ role: string; content: string }>; stream: boolean; max_tokens: number; stream_options: { include_usage: boolean } };
}

/** A chat-completions server whose answer depends on the question: `pieces:a|b|c` streams those pieces. */
async function fakeServer(t: Test, options: { onFirstContent?: () => void } = {}) {
  const received: Received[] = [];
  const server = http.createServer((req, res) => {
    let raw = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => (raw += c));
    req.on('end', async () => {
      if (req.url === '/v1/completions') {
        received.push({ body: JSON.parse(raw) });
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"object":"text_completion","choices":[{"text":"x"}]}');
        return;
      }
      const body = JSON.parse(raw) as Received['body'];
      received.push({ body });
      const question = body.messages[1]!.content;
      if (question === 'status 500') {
        res.writeHead(500, { 'content-type': 'application/json' }).end('{"error":{"message":"boom","type":"server_error"}}');
        return;
      }
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const send = (data: unknown) => `data: ${JSON.stringify(data)}\n\n`;
      const chunk = (delta: object) => send({ object: 'chat.completion.chunk', choices: [{ index: 0, delta, finish_reason: null }] });
      // The role first, and an empty content: neither is the first token.
      res.write(chunk({ role: 'assistant', content: null }));
      res.write(chunk({ content: '' }));
      res.write(': keep-alive\n\n');
      if (question === 'error event') {
        res.end(send({ error: { message: 'died mid-stream' } }));
        return;
      }
      if (options.onFirstContent) {
        // Hold the content until the chunks before it are out (this process's event loop reads them
        // on the client's socket meanwhile), so a harness that took them for content would be early.
        await new Promise((resolve) => res.write(': flushed\n\n', resolve));
        await new Promise((resolve) => setTimeout(resolve, 50));
        options.onFirstContent();
      }
      const pieces = question.replace(/^pieces:/, '').split('|');
      // The whole rest in odd slices, so events and lines arrive cut anywhere, with \r\n endings.
      let rest = pieces.map((p) => chunk({ content: p })).join('').replace(/\n/g, '\r\n');
      if (question !== 'no usage') rest += send({ choices: [], usage: { prompt_tokens: 40 + pieces.length, completion_tokens: pieces.length, prompt_tokens_details: { cached_tokens: 40 } } });
      rest += 'data: [DONE]\n\n';
      for (let at = 0; at < rest.length; at += 7) {
        res.write(rest.slice(at, at + 7));
        await new Promise((r) => setImmediate(r));
      }
      res.end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => server.close(() => resolve())));
  server.unref();
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, received };
}

const request = (question: string) => ({ model: 'm', system: 'You are terse.', question, maxTokens: 32 });

t.test('streamChat: the content, its chunks and the usage, exactly; the first content no earlier than sent', async (t) => {
  let sentAt = 0;
  const { url, received } = await fakeServer(t, { onFirstContent: () => (sentAt = performance.now()) });
  const r = await streamChat(url, request('pieces:Hel|lo, |wor|ld|!'));
  t.equal(r.text, 'Hello, world!');
  t.equal(r.contentChunks, 5, 'five content chunks; the role chunk and the empty content are not counted');
  t.equal(r.completionTokens, 5);
  t.equal(r.promptTokens, 45);
  t.equal(r.cachedTokens, 40);
  t.equal(r.done, true, 'data: [DONE] seen');
  t.ok(sentAt > 0 && r.startedAt + r.ttftMs >= sentAt, 'the first content was seen after the server sent it');
  t.ok(r.headersMs <= r.ttftMs && r.ttftMs <= r.totalMs, 'headers, first content, end: in that order');
  t.same(received[0]!.body.messages, [
    { role: 'system', content: 'You are terse.' },
    { role: 'user', content: 'pieces:Hel|lo, |wor|ld|!' },
  ]);
  t.equal(received[0]!.body.stream, true);
  t.equal(received[0]!.body.max_tokens, 32);
  t.same(received[0]!.body.stream_options, { include_usage: true });
});

t.test('streamChat: a failing server is a ServerBenchError that says why', async (t) => {
  const { url } = await fakeServer(t);
  await t.rejects(streamChat(url, request('status 500')), { name: 'ServerBenchError', message: /answered 500: .*boom/ });
  await t.rejects(streamChat(url, request('error event')), { name: 'ServerBenchError', message: /error event: died mid-stream/ });
  await t.rejects(streamChat(url, request('no usage')), { name: 'ServerBenchError', message: /without usage/ });
  t.ok(new ServerBenchError('x') instanceof Error);
});

t.test('loadRequest: one raw completion of one token', async (t) => {
  const { url, received } = await fakeServer(t);
  const took = await loadRequest(url, 'm');
  t.ok(took > 0);
  t.same(received, [{ body: { model: 'm', prompt: 'Hi', max_tokens: 1, temperature: 0 } }]);
});

t.test('runRound and summarizeRounds: every client counted, output tokens summed exactly', async (t) => {
  const { url, received } = await fakeServer(t);
  const rounds = [
    await runRound(url, [request('pieces:a'), request('pieces:a|b|c'), request('pieces:a|b')]),
    await runRound(url, [request('pieces:x|y|z|w'), request('pieces:x'), request('pieces:x|y')]),
  ];
  t.equal(received.length, 6, 'six requests reached the server');
  t.same(rounds.map((r) => r.outputTokens), [6, 7]);
  t.same(rounds[0]!.responses.map((r) => r.text), ['a', 'abc', 'ab'], 'each client its own answer, in order');
  const summary = summarizeRounds(rounds);
  t.equal(summary.requests, 6);
  t.equal(summary.outputTokens, 13);
  t.equal(summary.wallMs, rounds[0]!.wallMs + rounds[1]!.wallMs);
  t.equal(summary.outputTokensPerSecond, 13 / (summary.wallMs / 1000));
  const ttfts = rounds.flatMap((r) => r.responses.map((x) => x.ttftMs));
  t.equal(summary.ttftP50Ms, percentile(ttfts, 50));
  for (const round of rounds) {
    const first = Math.min(...round.responses.map((r) => r.startedAt));
    const last = Math.max(...round.responses.map((r) => r.endedAt));
    t.equal(round.wallMs, last - first, 'a round lasts from its first request to its last stream end');
  }
});

t.test('quietCpu: not quiet while every core spins; waits its whole limit for that', async (t) => {
  // One spinning worker per core keeps the machine's CPUs fully busy, far over the 10 % it waits for.
  const spinners = Array.from({ length: os.availableParallelism() }, () => new Worker('const end = Date.now() + 3000; while (Date.now() < end);', { eval: true }));
  t.teardown(() => Promise.all(spinners.map((w) => w.terminate())));
  await Promise.all(spinners.map((w) => new Promise((resolve) => w.once('online', resolve))));
  const started = performance.now();
  t.equal(await quietCpu(300), false);
  t.ok(performance.now() - started >= 300, 'it waited until its limit');
});

t.test('percentile: nearest rank', async (t) => {
  const values = [5, 1, 4, 2, 3, 8, 7, 6];
  t.equal(percentile(values, 50), 4);
  t.equal(percentile(values, 95), 8);
  t.equal(percentile([3], 95), 3);
  t.equal(percentile(Array.from({ length: 14 }, (_, i) => i + 1), 95), 14, 'rank ceil(0.95 × 14) = 14, not 13');
  t.equal(percentile(Array.from({ length: 20 }, (_, i) => i + 1), 95), 19);
});

t.test('ServerProcess: reads the URL the server prints, waits for /health 200, stops it with SIGTERM', async (t) => {
  // A server that answers 503 twice (as llama-server does while loading) before 200, and prints its URL.
  const script = `
    const http = require('node:http');
    let health = 0;
    const s = http.createServer((req, res) => {
      if (req.url === '/health') { health++; res.writeHead(health > 2 ? 200 : 503).end(String(health)); return; }
      res.writeHead(404).end();
    });
    s.listen(0, '127.0.0.1', () => console.log('kvstash listening on http://127.0.0.1:' + s.address().port));
    process.on('SIGTERM', () => { process.stderr.write('got SIGTERM'); s.close(() => process.exit(0)); });`;
  const server = new ServerProcess('kvstash', process.execPath, ['-e', script], true);
  await server.start(new AbortController().signal);
  t.match(server.url, /^http:\/\/127\.0\.0\.1:\d+$/);
  const health = await new Promise<string>((resolve) => http.get(`${server.url}/health`, (res) => res.setEncoding('utf8').on('data', resolve)));
  t.equal(health, '4', 'start() returned after the third /health (the first 200); this is the fourth');
  await server.stop();
  t.match(server.log, /got SIGTERM/);
  await t.rejects(
    new ServerProcess('llama-server', process.execPath, ['-e', 'process.exit(3)', '{port}'], false).start(new AbortController().signal),
    { name: 'ServerBenchError', message: /exited \(3\) while starting/ },
  );
});

t.test('ServerProcess: a child that never prints its URL', async (t) => {
  await t.rejects(new ServerProcess('kvstash', process.execPath, ['-e', 'console.log("no url here")'], true).start(new AbortController().signal), {
    name: 'ServerBenchError',
    message: /exited \(0\) while starting/,
  });
});

t.test('targets: ratios of the two servers, met or not, and not measured without one', async (t) => {
  const level = (clients: number, first: number, steady: number, tps: number) => ({
    clients,
    firstRound: { ttftP50Ms: first, ttftP95Ms: first, outputTokensPerSecond: tps, requests: clients, outputTokens: 0, wallMs: 1, ttfts: [], cachedTokens: [] },
    steady: { ttftP50Ms: steady, ttftP95Ms: steady, outputTokensPerSecond: tps, requests: clients, outputTokens: 0, wallMs: 1 },
  });
  const side = (name: 'kvstash' | 'llama-server', levels: ReturnType<typeof level>[], restart: number, warm: number): ServerSideResult => ({
    name,
    command: name,
    startMs: 1,
    coldTtftMs: 1,
    restartTtftMs: restart,
    warmTtftMs: warm,
    warmTtft: { median: warm, min: warm, max: warm, values: [warm] },
    restartCachedTokens: null,
    loadRequestMs: 1,
    levels,
    promptTokens: 2050,
    completionTokensPerRequest: [],
  });
  const report: Pick<ServerBenchReport, 'servers' | 'overhead' | 'ceiling' | 'prefillFloor' | 'config'> = {
    config: { ...SERVER_FULL_CONFIG, model: 'm', systemTokens: 2000 },
    servers: {
      kvstash: side('kvstash', [level(1, 100, 100, 20), level(4, 200, 300, 50), level(8, 300, 500, 80)], 110, 100),
      'llama-server': side('llama-server', [level(1, 400, 200, 25), level(4, 10000, 300, 50), level(8, 20000, 400, 70)], 9000, 300),
    },
    overhead: { overheadMs: 3, inServerDifferences: [3], pairedDifferenceMs: 40, serverTtft: { median: 103, min: 0, max: 0, values: [] }, libraryTtft: { median: 100, min: 0, max: 0, values: [] }, differences: [3], libraryTier: [], serverKvstash: [] },
    ceiling: { gain: 4.5, tokensPerSecond: { 1: 20, 8: 90 }, command: 'x' },
    prefillFloor: { ms: 180, promptTokens: 50, depth: 2000, command: 'llama-bench' },
  };
  const targets = Object.fromEntries(evaluateServerTargets(report).map((x) => [x.id, x]));
  t.same(
    Object.keys(targets),
    ['steadyTtftP50x1', 'steadyTtftP50x4', 'steadyTtftP50x8', 'firstRoundTtftP50', 'outputTokensPerSecondx1', 'outputTokensPerSecondx4', 'outputTokensPerSecondx8', 'restartTtft', 'httpOverhead', 'concurrencyGain'],
  );
  t.match(targets.steadyTtftP50x1, { value: 0.5, met: true, description: /llama-bench prefills the 50-token question at depth 2000 in 180\.0 ms: 0\.90× llama-server's/ });
  t.notMatch(targets.steadyTtftP50x4.description, /llama-bench/);
  t.match(targets.steadyTtftP50x4, { value: 1, met: false });
  t.match(targets.steadyTtftP50x8, { value: 1.25, met: false });
  t.match(targets.firstRoundTtftP50, { value: 0.02, met: true, description: /4 new clients/ });
  t.match(targets.outputTokensPerSecondx1, { value: 0.8, met: false });
  t.match(targets.outputTokensPerSecondx4, { value: 1, met: true });
  t.match(targets.outputTokensPerSecondx8, { value: 1.143, met: true });
  t.match(targets.restartTtft, { value: 1.1, met: true, description: /llama-server: 30\.00×/ });
  t.match(targets.httpOverhead, { value: 3, unit: 'ms', met: true, formula: /paired with generate\(\) here: 40\.0 ms/ });
  t.match(targets.concurrencyGain, { value: round3(80 / 20 / 4.5), met: false, description: /llama-server's gain 2\.80×/ });

  const alone = evaluateServerTargets({ ...report, servers: { kvstash: report.servers.kvstash }, ceiling: { unavailable: 'no build' } });
  t.same(
    alone.filter((x) => x.met !== null).map((x) => x.id),
    ['restartTtft', 'httpOverhead'],
    'without llama-server only the targets of kvstash alone are judged',
  );
});

function round3(v: number): number {
  return Math.round(v * 1000) / 1000;
}
