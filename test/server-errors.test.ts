// Every error status of the server, in OpenAI's shape {error: {message, type, param, code}}, as the
// official client sees it: 400 (malformed JSON, invalid fields, context_length_exceeded), 401,
// 404 (model, route), 405, 413, 429 with Retry-After when the queue is full, 500 without internals;
// x-should-retry: false wherever a retry cannot help.
import fs from 'node:fs';
import path from 'node:path';
import OpenAI from 'openai';
import t from 'tap';
import { addTinyModel, client as openaiClient, raw, startInProcess } from './helpers/serve.js';

const root = t.testdir();
const models = path.join(root, 'models');

t.before(async () => {
  await addTinyModel(models, 'tiny');
  // A model file llama.cpp cannot load: its failure is the server's (500), and says nothing of paths.
  fs.mkdirSync(path.join(models, 'broken'));
  fs.writeFileSync(path.join(models, 'broken', 'model.gguf'), Buffer.alloc(4096, 7));
});

async function apiError(work: Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
  try {
    await work;
  } catch (err) {
    if (err instanceof OpenAI.APIError) return err;
    throw err;
  }
  throw new Error('the request succeeded');
}

t.test('400, 404, 405, 413, 500: shape, status, x-should-retry', async (t) => {
  const { server, client, url } = await startInProcess({ models, cacheDir: null, maxBodyBytes: 64 * 1024, contextSize: 256 });
  t.teardown(() => server.close());
  const messages = [{ role: 'user' as const, content: 'Hi' }];

  const malformed = await raw(url, 'POST', '/v1/chat/completions', '{"model": "tiny", ');
  t.equal(malformed.status, 400);
  t.equal(malformed.json.error.type, 'invalid_request_error');
  t.equal(malformed.json.error.code, 'invalid_json');
  t.same(Object.keys(malformed.json.error).sort(), ['code', 'message', 'param', 'type']);
  t.equal(malformed.headers.get('x-should-retry'), 'false');
  t.match(malformed.headers.get('x-request-id'), /^req_[0-9a-f]{16}$/);

  const badTemperature = await apiError(client.chat.completions.create({ model: 'tiny', messages, temperature: 5 }));
  t.equal(badTemperature.status, 400);
  t.equal(badTemperature.param, 'temperature');
  t.equal(badTemperature.code, 'invalid_value');
  const noMessages = await apiError(client.chat.completions.create({ model: 'tiny', messages: [] }));
  t.equal(noMessages.status, 400);
  t.equal(noMessages.param, 'messages');
  const badRole = await apiError(client.chat.completions.create({ model: 'tiny', messages: [{ role: 'robot', content: 'x' } as any] }));
  t.equal(badRole.param, 'messages[0].role');
  const usageWithoutStream = await apiError(client.chat.completions.create({ model: 'tiny', messages, stream_options: { include_usage: true } } as any));
  t.equal(usageWithoutStream.param, 'stream_options');
  t.equal((await apiError(client.chat.completions.create({ model: 'tiny', messages, n: 2 }))).param, 'n');
  t.equal((await apiError(client.chat.completions.create({ model: 'tiny', messages, logprobs: true }))).param, 'logprobs');
  t.equal((await apiError(client.chat.completions.create({ model: 'tiny', messages, response_format: { type: 'json_object' } }))).param, 'response_format');

  const tooLong = await apiError(client.chat.completions.create({ model: 'tiny', messages, max_tokens: 1000 }));
  t.equal(tooLong.status, 400);
  t.equal(tooLong.code, 'context_length_exceeded');
  t.match(tooLong.message, /maximum context length is 256 tokens/);
  t.equal(tooLong.headers?.get('x-should-retry'), 'false');
  const longPrompt = await apiError(client.completions.create({ model: 'tiny', prompt: 'board '.repeat(400), max_tokens: 4 }));
  t.equal(longPrompt.code, 'context_length_exceeded');

  const unknownModel = await apiError(client.chat.completions.create({ model: 'gpt-4o', messages }));
  t.equal(unknownModel.status, 404);
  t.equal(unknownModel.code, 'model_not_found');
  t.equal(unknownModel.param, 'model');
  t.equal(unknownModel.headers?.get('x-should-retry'), 'false');
  const unknownRoute = await raw(url, 'GET', '/v1/nothing');
  t.equal(unknownRoute.status, 404);
  t.equal(unknownRoute.json.error.code, 'not_found');
  const wrongMethod = await raw(url, 'GET', '/v1/chat/completions');
  t.equal(wrongMethod.status, 405);

  const big = await raw(url, 'POST', '/v1/chat/completions', JSON.stringify({ model: 'tiny', messages: [{ role: 'user', content: 'x'.repeat(70 * 1024) }] }));
  t.equal(big.status, 413);
  t.equal(big.json.error.code, 'request_too_large');
  t.equal(big.headers.get('x-should-retry'), 'false');

  const broken = await apiError(client.chat.completions.create({ model: 'broken', messages }));
  t.equal(broken.status, 500);
  t.equal(broken.type, 'server_error');
  t.notMatch(broken.message, /model\.gguf|\/|E_MODEL/, 'no paths or internal codes in the message');
  t.equal(broken.headers?.get('x-should-retry'), 'false');

  // After all that, the server still serves.
  const ok = await client.chat.completions.create({ model: 'tiny', messages, max_tokens: 2, temperature: 0 });
  t.equal(ok.usage!.completion_tokens, 2);
});

t.test('401: a wrong or missing key; /health stays open', async (t) => {
  const { server, url } = await startInProcess({ models, cacheDir: null, apiKey: 'sk-board-farm' });
  t.teardown(() => server.close());
  const wrong = await apiError(openaiClient(url, 'sk-board-farX').models.list());
  t.equal(wrong.status, 401);
  t.equal(wrong.code, 'invalid_api_key');
  t.equal(wrong.headers?.get('x-should-retry'), 'false');
  const missing = await raw(url, 'GET', '/v1/models');
  t.equal(missing.status, 401);
  t.match(missing.json.error.message, /Missing API key/);
  t.equal((await raw(url, 'GET', '/metrics', undefined, { authorization: 'Bearer nope' })).status, 401);
  t.equal((await raw(url, 'GET', '/health')).status, 200);
  const right = await openaiClient(url, 'sk-board-farm').models.list();
  t.same(
    right.data.map((m) => m.id),
    ['broken', 'tiny'],
  );
});

t.test('429 with Retry-After when the queue is full, and the client honours it', async (t) => {
  const { server, client, url } = await startInProcess({ models, cacheDir: null, parallel: 1, maxQueue: 1 });
  t.teardown(() => server.close());
  const long = { model: 'tiny', prompt: 'cache model token prefix restore', max_tokens: 200, temperature: 0 };
  // One generating (holding the only sequence), one queued: the third is refused.
  const controller = new AbortController();
  const first = await client.completions.create({ ...long, stream: true }, { signal: controller.signal });
  const reader = first[Symbol.asyncIterator]();
  await reader.next();
  const second = client.completions.create({ ...long, max_tokens: 2 });
  await new Promise((resolve) => setTimeout(resolve, 50));
  const refused = await raw(url, 'POST', '/v1/completions', JSON.stringify(long));
  t.equal(refused.status, 429);
  t.equal(refused.json.error.type, 'rate_limit_error');
  t.equal(refused.json.error.code, 'queue_full');
  t.equal(refused.headers.get('retry-after'), '1');
  t.equal(refused.headers.get('x-should-retry'), null, 'a retry can help: no x-should-retry: false');
  // The client (retries on) waits Retry-After and gets through once the sequence is free.
  const retrying = openaiClient(url).withOptions({ maxRetries: 3 });
  const third = retrying.completions.create({ ...long, max_tokens: 2 });
  controller.abort();
  t.equal((await second).usage!.completion_tokens, 2);
  t.equal((await third).usage!.completion_tokens, 2);
});
