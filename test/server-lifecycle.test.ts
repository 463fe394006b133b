// The server's life: `kvstash serve` as a child process prints its URL line and takes its flags
// (--api-key from KVSTASH_API_KEY, --system-prompt-file warmed at load); a client that hangs up
// mid-stream stops its generation and frees the sequence; SIGTERM lets a running request finish and
// exits 0; /health answers 503 while a model loads; idle models unload, and a memory budget unloads
// the least recently used one.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { loadModel, type Model } from '../lib/index.js';
import { templatePrefix } from '../lib/generate/generate.js';
import { addTinyModel, slowFakeRkllmModels, client, metric, raw, startChild, startInProcess } from './helpers/serve.js';

const root = t.testdir();
const models = path.join(root, 'models');
const LONG = { model: 'tiny', prompt: 'cache model token prefix restore', temperature: 0 };

t.before(async () => {
  await addTinyModel(models, 'tiny');
});

t.test('kvstash serve: the URL line, flags, KVSTASH_API_KEY, the system prompt file warmed at load', async (t) => {
  const systemFile = path.join(root, 'system.txt');
  const system = 'You are the assistant of a board farm. Answer in one line, and name the board you mean.';
  fs.writeFileSync(systemFile, `${system}\n`);
  const cacheDir = path.join(root, 'child-cache');
  const child = await startChild(['--models', models, '--cache-dir', cacheDir, '--threads', '2', '--context-size', '512', '--parallel', '2', '--system-prompt-file', systemFile], {
    KVSTASH_API_KEY: 'sk-child',
  });
  t.teardown(() => child.child.kill('SIGKILL'));
  t.match(child.url, /^http:\/\/127\.0\.0\.1:\d+$/);
  t.equal(child.stdout(), `kvstash serve: listening on ${child.url}\n`, 'exactly one line on stdout');
  t.equal((await raw(child.url, 'GET', '/v1/models')).status, 401, 'KVSTASH_API_KEY is the key');
  const openai = client(child.url, 'sk-child');
  // No system message: the file's prompt is the system prompt, and was cached when the model loaded.
  const reply = await openai.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Which board is down?' }], max_tokens: 3, temperature: 0 });
  const model = await loadModel(path.join(models, 'tiny', 'model.gguf'));
  t.teardown(() => model.dispose());
  const prefix = templatePrefix(model, { system })!;
  t.ok(reply.usage!.prompt_tokens_details!.cached_tokens! >= prefix.length, 'the warmed system prompt was restored');
  t.ok(fs.readdirSync(path.join(cacheDir, 'tiny')).some((f) => f.endsWith('.kvstash')), 'its entry is in <cache-dir>/<model>/');
  child.child.kill('SIGTERM');
  t.same(await child.exited, { code: 0, signal: null });
  t.match(child.stderr(), /POST \/v1\/chat\/completions 200 [\d.]+ms model=tiny prompt=\d+ cached=\d+ completion=3 tier=\w+ ttft=/, 'one log line per request');
});

t.test('a client that hangs up mid-stream stops its generation and frees the sequence', async (t) => {
  const { server, client: openai, url, lines } = await startInProcess({ models, cacheDir: null, parallel: 1 });
  t.teardown(() => server.close());
  const controller = new AbortController();
  const stream = await openai.completions.create({ ...LONG, max_tokens: 400, stream: true }, { signal: controller.signal });
  let received = 0;
  for await (const chunk of stream) {
    received += chunk.choices[0]?.text ? 1 : 0;
    if (received === 3) break; // leaving the loop aborts the request: the socket closes
  }
  // The lease is released once the generation has stopped; by then the sequence holds the prompt
  // and the few tokens generated before the hang-up (each sent token but the last was evaluated;
  // the one being decoded at the abort is removed), not 400.
  let metrics = '';
  while (metric((metrics = (await raw(url, 'GET', '/metrics')).text), 'kvstash_sequences_active') !== 0) await new Promise((resolve) => setTimeout(resolve, 20));
  const served = await server.pool.get('tiny');
  const promptTokens = (served.model as Model).tokenize(LONG.prompt).length;
  const held = served.context!.memory.range(0).max + 1;
  t.ok(held >= promptTokens + 2 && held <= promptTokens + 3 + 8, `the sequence holds ${held} tokens: the ${promptTokens}-token prompt and a few generated ones`);
  // The only sequence is free again: the next request is served, not queued behind 400 tokens.
  const next = await openai.completions.create({ ...LONG, max_tokens: 2 });
  t.equal(next.usage!.completion_tokens, 2);
  metrics = (await raw(url, 'GET', '/metrics')).text;
  t.equal(metric(metrics, 'kvstash_generations_aborted_total{model="tiny"}'), 1);
  t.equal(metric(metrics, 'kvstash_sequences_active'), 0);
  t.equal(metric(metrics, 'kvstash_queue_depth'), 0);
  t.equal(metric(metrics, 'kvstash_requests_total{route="/v1/completions",status="499"}'), 1);
  t.equal(metric(metrics, 'kvstash_completion_tokens_total{model="tiny"}'), 2, 'the aborted one never finished');
  t.ok(lines.some((l) => / POST \/v1\/completions 499 /.test(l)));
  controller.abort();
});

t.test('SIGTERM: the running request finishes, new connections are refused, exit 0', async (t) => {
  const child = await startChild(['--models', models, '--cache-dir', path.join(root, 'term-cache'), '--threads', '2', '--context-size', '512']);
  t.teardown(() => child.child.kill('SIGKILL'));
  const openai = client(child.url);
  // Few tokens: shutdown waits at most 30 s, and 2 shared cores can be slow.
  const stream = await openai.completions.create({ ...LONG, max_tokens: 16, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let finish: string | null = null;
  let completionTokens = 0;
  let signalled = false;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.text ?? '';
    finish = chunk.choices[0]?.finish_reason ?? finish;
    completionTokens = chunk.usage?.completion_tokens ?? completionTokens;
    if (!signalled && text.length > 0) {
      signalled = true;
      child.child.kill('SIGTERM');
      await new Promise((resolve) => setTimeout(resolve, 100));
      await t.rejects(fetch(`${child.url}/health`), 'the listener is closed');
    }
  }
  t.equal(finish, 'length', 'the in-flight request ran to its end');
  t.equal(completionTokens, 16, 'all 16 tokens of it');
  t.same(await child.exited, { code: 0, signal: null });
  t.match(child.stderr(), /SIGTERM: finishing running requests/);
});

t.test('/health is 503 while a model loads (warming its system prompt), then 200', async (t) => {
  // The fake prefills 4 ms per token: warming a ~200-byte system prompt takes most of a second.
  const fakeModels = slowFakeRkllmModels(t, path.join(root, 'rk'), 4000);
  const { server, client: openai, url } = await startInProcess({ models: fakeModels, cacheDir: path.join(root, 'rk-cache'), systemPrompt: 'You are the assistant of a board farm. '.repeat(5) });
  t.teardown(() => server.close());
  t.equal((await raw(url, 'GET', '/health')).status, 200, 'nothing loading yet');
  const request = openai.chat.completions.create({ model: 'qwen-fake', messages: [{ role: 'user', content: 'Status?' }] });
  const seen: number[] = [];
  let loadingBody: unknown;
  let done = false;
  void request.finally(() => (done = true));
  while (!done) {
    const health = await raw(url, 'GET', '/health');
    seen.push(health.status);
    if (health.status === 503) loadingBody ??= health.json;
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  t.ok(seen.includes(503), `503 while loading (saw ${[...new Set(seen)].join(', ')})`);
  t.same(loadingBody, { status: 'loading model' });
  await request;
  t.equal((await raw(url, 'GET', '/health')).status, 200);
});

t.test('idle models unload; a memory budget unloads the least recently used', async (t) => {
  const dir = path.join(root, 'two-models');
  await addTinyModel(dir, 'one');
  await addTinyModel(dir, 'two');
  const idle = await startInProcess({ models: dir, cacheDir: null, idleUnloadSeconds: 1 });
  t.teardown(() => idle.server.close());
  await idle.client.completions.create({ model: 'one', prompt: 'Hello', max_tokens: 1 });
  t.equal(idle.server.pool.list().find((m) => m.id === 'one')!.loaded, true);
  await new Promise((resolve) => setTimeout(resolve, 1500));
  t.equal(idle.server.pool.list().find((m) => m.id === 'one')!.loaded, false, 'unloaded after 1 s idle');
  t.ok(idle.lines.some((l) => /unloading model one \(idle\)/.test(l)));
  const reloaded = await idle.client.completions.create({ model: 'one', prompt: 'Hello', max_tokens: 1 });
  t.equal(reloaded.usage!.completion_tokens, 1, 'loaded again on use');

  // The budget holds one tiny model (weights + KV) but not two.
  const one = idle.server.pool.stats().bytes;
  const budget = await startInProcess({ models: dir, cacheDir: null, maxMemoryBytes: Math.floor(one * 1.5) });
  t.teardown(() => budget.server.close());
  await budget.client.completions.create({ model: 'one', prompt: 'Hello', max_tokens: 1 });
  await budget.client.completions.create({ model: 'two', prompt: 'Hello', max_tokens: 1 });
  t.same(
    budget.server.pool.list().map((m) => [m.id, m.loaded]),
    [
      ['one', false],
      ['two', true],
    ],
  );
  t.ok(budget.lines.some((l) => /unloading model one \(memory budget\)/.test(l)));
  const metrics = (await raw(budget.url, 'GET', '/metrics')).text;
  t.equal(metric(metrics, 'kvstash_models_loaded'), 1);
});
