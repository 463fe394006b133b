// An RKLLM model served by the same endpoints, on the fake librkllmrt.so: discovered as
// models/<name>/<file>.rkllm with a model.json (runtime version, library), the same text as
// loadRkllmModel gives, streamed and plain, its system-prompt cache reused across requests, one
// generation at a time (concurrent requests queue), Responses chains that restore their
// checkpoints (after SIGKILL and a restart too, branching, a damaged checkpoint passed over), and
// what RKLLM cannot do refused with 400.
import fs from 'node:fs';
import path from 'node:path';
import OpenAI from 'openai';
import t from 'tap';
import { CHATML_TEMPLATE, loadRkllmModel } from '../lib/index.js';
import { fakeRuntimeLibrary } from './helpers/fake-rkllm.js';
import { addFakeRkllmModel, metric, raw, startInProcess } from './helpers/serve.js';
import { killHard, startServer } from './helpers/server-process.js';

const root = t.testdir();
const models = path.join(root, 'farm', 'models');
const SYSTEM = 'You are the assistant of an RK3588 board farm. Answer in one line.';
const QUESTION = 'Which board is the hottest?';

t.before(() => {
  fs.mkdirSync(models, { recursive: true });
  addFakeRkllmModel(models, 'qwen-fake', '1.3.0');
  addFakeRkllmModel(models, 'qwen-old', '1.2.1');
});

async function expectedText(system: string, prompt: string): Promise<string> {
  const model = await loadRkllmModel(path.join(models, 'qwen-fake', 'model-w8a8.rkllm'), {
    libraryPath: fakeRuntimeLibrary('1.3.0'),
    runtimeVersion: '1.3.0',
    maxNewTokens: 6,
    cacheDir: null,
  });
  try {
    return (await model.generate({ system, prompt }).result).text;
  } finally {
    await model.dispose();
  }
}

t.test('an .rkllm model answers chat completions, plain and streamed, with its system-prompt cache', async (t) => {
  const { server, client, url } = await startInProcess({ models, cacheDir: path.join(root, 'cache') });
  t.teardown(() => server.close());
  t.same(
    (await client.models.list()).data.map((m: any) => [m.id, m.kind]),
    [
      ['qwen-fake', 'rkllm'],
      ['qwen-old', 'rkllm'],
    ],
  );
  const messages = [
    { role: 'system' as const, content: SYSTEM },
    { role: 'user' as const, content: QUESTION },
  ];
  const expected = await expectedText(SYSTEM, QUESTION);
  t.ok(expected.length > 0);
  const first = await client.chat.completions.create({ model: 'qwen-fake', messages });
  t.equal(first.choices[0]!.message.content, expected, 'the text loadRkllmModel gives');
  t.equal(first.usage!.completion_tokens, 6, 'maxNewTokens of model.json');
  t.equal(first.choices[0]!.finish_reason, 'length');
  t.equal((first as any).kvstash.tier, null, 'the system prompt cache was created by this request');
  t.ok(fs.readdirSync(path.join(root, 'cache', 'qwen-fake')).some((f) => f.endsWith('.kvstash')), 'in <cache-dir>/<model>/');

  let streamed = '';
  let usage: any;
  for await (const chunk of await client.chat.completions.create({ model: 'qwen-fake', messages, stream: true, stream_options: { include_usage: true } })) {
    streamed += chunk.choices[0]?.delta.content ?? '';
    usage ??= chunk.usage ? chunk : undefined;
  }
  t.equal(streamed, expected, 'streamed: the same text');
  t.equal(usage.kvstash.tier, 'resident', 'the second request reuses the loaded system-prompt cache');
  // prompt_tokens is what the runtime prefilled: the user turn only (the fake's tokens are bytes),
  // never the system prompt, whose cache was made before the first request's run.
  const userTurn = Buffer.byteLength(CHATML_TEMPLATE.prefix + QUESTION + CHATML_TEMPLATE.postfix);
  t.equal(first.usage!.prompt_tokens, userTurn);
  t.equal(usage.usage.prompt_tokens, userTurn);

  // One generation at a time: concurrent requests queue on the single sequence and all finish.
  const together = await Promise.all([QUESTION, 'Is board two up?', 'Reboot board three.'].map((q) => client.chat.completions.create({ model: 'qwen-fake', messages: [messages[0]!, { role: 'user', content: q }] })));
  t.equal(together[0]!.choices[0]!.message.content, expected);
  t.same(
    together.map((r) => r.usage!.completion_tokens),
    [6, 6, 6],
  );
  const metrics = (await raw(url, 'GET', '/metrics')).text;
  t.equal(metric(metrics, 'kvstash_sequences{model="qwen-fake"}'), 1);
  t.equal(metric(metrics, 'kvstash_cache_hits_total{model="qwen-fake",tier="resident"}'), 4);
  t.equal(metric(metrics, 'kvstash_sequences_active'), 0);

  const completion = await client.completions.create({ model: 'qwen-fake', prompt: QUESTION, max_tokens: 3 });
  t.equal(completion.usage!.completion_tokens, 3, 'runtime 1.3.0 takes max_tokens per request');
});

t.test('what RKLLM cannot do is a 400, not a 500', async (t) => {
  const { server, client } = await startInProcess({ models, cacheDir: null });
  t.teardown(() => server.close());
  const user = { role: 'user' as const, content: QUESTION };
  const status = async (work: Promise<unknown>) => {
    try {
      await work;
      return 200;
    } catch (err) {
      return err instanceof OpenAI.APIError ? `${err.status} ${err.param ?? ''}`.trim() : String(err);
    }
  };
  t.equal(await status(client.chat.completions.create({ model: 'qwen-fake', messages: [user], stop: ['.'] })), '400 stop');
  t.equal(await status(client.chat.completions.create({ model: 'qwen-fake', messages: [user], tools: [{ type: 'function', function: { name: 'f' } }] })), '400 tools');
  t.equal(
    await status(client.chat.completions.create({ model: 'qwen-fake', messages: [user, { role: 'assistant', content: 'Board 1.' }] })),
    '400 messages',
    'a conversation must end with the input',
  );
  const huge = 'board '.repeat(20_000);
  t.equal(
    await status(client.chat.completions.create({ model: 'qwen-fake', messages: [user, { role: 'assistant', content: 'Board 1.' }, { role: 'user', content: huge }] })),
    '400 messages',
    'a conversation that cannot fit the context',
  );
  t.equal(await status(client.responses.create({ model: 'qwen-fake', input: huge })), '400 input', 'a Responses input that cannot fit the context');
  t.equal(await status(client.chat.completions.create({ model: 'qwen-old', messages: [user], max_tokens: 3 })), '400', 'runtime 1.2.1 fixes the token limit at load');
  t.equal(await status(client.chat.completions.create({ model: 'qwen-old', messages: [user] })), 200, 'without max_tokens it answers');
});

t.test('a Responses chain on an RKLLM model restores its checkpoints: after SIGKILL and a restart, branching, past a damaged one', async (t) => {
  const dir = t.testdir();
  const farm = path.join(dir, 'models');
  fs.mkdirSync(farm, { recursive: true });
  addFakeRkllmModel(farm, 'qwen-fake', '1.3.0');
  const args = (name: string) => ['--models', farm, '--sessions-dir', path.join(dir, `sessions-${name}`), '--cache-dir', path.join(dir, `cache-${name}`)];
  const ask = { model: 'qwen-fake', instructions: SYSTEM, max_output_tokens: 6 } as const;
  const T = CHATML_TEMPLATE;
  const bytes = (text: string) => Buffer.byteLength(text, 'utf8');
  // What the backend renders (the fake's tokens are bytes): the system block, each input between
  // prefix and postfix, each reply followed by turnEnd.
  const system = T.system.replace('{system}', SYSTEM);
  const exchange = (input: string, reply: string) => `${T.prefix}${input}${T.postfix}${reply}${T.turnEnd}`;
  const open = (c: OpenAI) => c.responses.create({ ...ask, input: QUESTION }) as Promise<any>;
  const next = (c: OpenAI, previous: string, input: string) => c.responses.create({ ...ask, input, previous_response_id: previous }) as Promise<any>;

  // A: the uninterrupted server.
  const a = await startServer(args('a'));
  t.teardown(() => killHard(a));
  const clientA = new OpenAI({ baseURL: `${a.url}/v1`, apiKey: 'none', maxRetries: 0 });
  const a1 = await open(clientA);
  // The backend makes the system prompt's cache on the way (in --cache-dir, shared with chat
  // completions), then loads it and prefills the rest.
  t.equal(a1.usage.input_tokens_details.cached_tokens, bytes(system), "the first response starts from the system prompt's cache");
  t.equal(a1.kvstash.evaluated_tokens, bytes(`${T.prefix}${QUESTION}${T.postfix}`));
  const a2 = await next(clientA, a1.id, 'Go on.');
  const a1Conversation = system + exchange(QUESTION, a1.output_text);
  t.equal(a2.kvstash.tier, 'disk', "the continuation loads the parent's checkpoint");
  t.equal(a2.usage.input_tokens_details.cached_tokens, bytes(a1Conversation), 'everything the first exchange left is restored');
  t.equal(a2.kvstash.evaluated_tokens, bytes(`${T.prefix}Go on.${T.postfix}`), 'only the new input is prefilled');

  // B: the same first request, SIGKILL right after the reply, a restart, the continuation.
  const b = await startServer(args('b'));
  const clientB = new OpenAI({ baseURL: `${b.url}/v1`, apiKey: 'none', maxRetries: 0 });
  const b1 = await open(clientB);
  t.equal(b1.output_text, a1.output_text);
  await killHard(b);
  t.equal(await b.exited, 'SIGKILL');
  const b2server = await startServer(args('b'));
  t.teardown(() => killHard(b2server));
  const clientB2 = new OpenAI({ baseURL: `${b2server.url}/v1`, apiKey: 'none', maxRetries: 0 });
  const b2 = await next(clientB2, b1.id, 'Go on.');
  t.equal(b2.output_text, a2.output_text, 'the same text as the uninterrupted server');
  t.same(b2.usage, a2.usage, 'the same counts: restored, not re-evaluated');
  t.equal(b2.kvstash.tier, 'disk');

  // Branching: a second continuation of b1, then one of each branch.
  const other = await next(clientB2, b1.id, 'Something else.');
  t.equal(other.usage.input_tokens_details.cached_tokens, bytes(a1Conversation), "the branch restores b1's checkpoint too");
  t.equal(other.kvstash.evaluated_tokens, bytes(`${T.prefix}Something else.${T.postfix}`));
  const b2Conversation = a1Conversation + exchange('Go on.', b2.output_text);
  const deeper = await next(clientB2, b2.id, 'And then?');
  t.equal(deeper.usage.input_tokens_details.cached_tokens, bytes(b2Conversation), "b2's continuation restores b2's checkpoint");
  const deeperOther = await next(clientB2, other.id, 'And then?');
  t.equal(deeperOther.usage.input_tokens_details.cached_tokens, bytes(a1Conversation + exchange('Something else.', other.output_text)));

  // A damaged checkpoint is never loaded: the continuation falls back to the grandparent's.
  const kv = path.join(dir, 'sessions-b', 'kv', 'qwen-fake');
  const record = JSON.parse(fs.readFileSync(path.join(dir, 'sessions-b', 'responses', `${b2.id}.json`), 'utf8'));
  t.match(record.checkpoint, /^[0-9a-f]{32}\.kvstash$/, 'the record names its checkpoint');
  const file = path.join(kv, record.checkpoint);
  const damaged = fs.readFileSync(file);
  damaged[damaged.length - 3] ^= 0x40;
  fs.writeFileSync(file, damaged);
  const again = await next(clientB2, b2.id, 'And then?');
  t.equal(again.output_text, deeper.output_text, 'the same text as from the intact checkpoint');
  t.equal(again.usage.input_tokens_details.cached_tokens, bytes(a1Conversation), "restored from b1's checkpoint, the nearest intact ancestor");
  t.equal(again.kvstash.evaluated_tokens, bytes(exchange('Go on.', b2.output_text) + `${T.prefix}And then?${T.postfix}`));

  // DELETE removes the record and its checkpoint; the rest of the chain still continues.
  const deeperFile = path.join(kv, JSON.parse(fs.readFileSync(path.join(dir, 'sessions-b', 'responses', `${deeper.id}.json`), 'utf8')).checkpoint);
  t.ok(fs.existsSync(deeperFile));
  t.same(await clientB2.responses.delete(deeper.id), { id: deeper.id, object: 'response', deleted: true });
  t.notOk(fs.existsSync(deeperFile), 'the checkpoint went with the response');
  await t.rejects(clientB2.responses.retrieve(deeper.id), { status: 404 });
  t.equal((await next(clientB2, other.id, 'Last one.')).kvstash.tier, 'disk');
});

t.test("/v1/cache on an RKLLM model: a named entry is the system prompt's cache its chat requests load", async (t) => {
  const dir = t.testdir();
  const farm = path.join(dir, 'models');
  fs.mkdirSync(farm, { recursive: true });
  addFakeRkllmModel(farm, 'qwen-fake', '1.3.0');
  const cacheDir = path.join(dir, 'cache');
  const { server, client, url } = await startInProcess({ models: farm, cacheDir });
  t.teardown(() => server.close());
  const rendered = CHATML_TEMPLATE.system.replace('{system}', SYSTEM);

  const created = await raw(url, 'POST', '/v1/cache/qwen-fake', JSON.stringify({ name: 'farm', system: SYSTEM }));
  t.equal(created.status, 201, created.text);
  t.match(created.json, { object: 'cache.entry', name: 'farm', model: 'qwen-fake', key: /^[0-9a-f]{32}$/, tokens: Buffer.byteLength(rendered), tiers: ['disk'] });
  const file = path.join(cacheDir, 'qwen-fake', `${created.json.key}.kvstash`);
  t.equal(created.json.bytes, fs.statSync(file).size, 'the entry file in <cache-dir>/<model>/');
  t.same((await raw(url, 'GET', '/v1/cache/qwen-fake/farm')).json, created.json);
  t.same((await raw(url, 'GET', '/v1/cache')).json, { object: 'list', data: [created.json] });

  // The first chat request with that system prompt loads the named entry instead of making one.
  const reply = await client.chat.completions.create({ model: 'qwen-fake', messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: QUESTION }] });
  t.equal((reply as any).kvstash.tier, 'loaded', 'the named entry is the cache the chat request loaded');
  t.equal(reply.usage!.prompt_tokens, Buffer.byteLength(CHATML_TEMPLATE.prefix + QUESTION + CHATML_TEMPLATE.postfix), 'only the user turn was prefilled');
  t.same(fs.readdirSync(path.join(cacheDir, 'qwen-fake')).filter((f) => f.endsWith('.kvstash')), [`${created.json.key}.kvstash`], 'no second entry was made');

  const refused = await raw(url, 'POST', '/v1/cache/qwen-fake', JSON.stringify({ name: 'chat', system: SYSTEM, messages: [{ role: 'user', content: 'hi' }] }));
  t.match(refused, { status: 400, json: { error: { code: 'unsupported_parameter', param: 'messages' } } });
  t.equal((await raw(url, 'GET', '/v1/cache/qwen-fake/chat')).status, 404);

  t.match((await raw(url, 'DELETE', '/v1/cache/qwen-fake/farm')).json, { name: 'farm', deleted: true });
  t.notOk(fs.existsSync(file), 'the entry is gone with its name');
  t.equal((await raw(url, 'GET', '/v1/cache/qwen-fake/farm')).status, 404);

  const bare = await startInProcess({ models: farm, cacheDir: null });
  t.teardown(() => bare.server.close());
  t.match(await raw(bare.url, 'POST', '/v1/cache/qwen-fake', JSON.stringify({ name: 'farm', system: SYSTEM })), { status: 400, json: { error: { code: 'unsupported_model' } } });
});

t.test('a multi-turn chat on an RKLLM model: each turn sent again with the history prefills only the new turn', async (t) => {
  const dir = t.testdir();
  const farm = path.join(dir, 'models');
  fs.mkdirSync(farm, { recursive: true });
  addFakeRkllmModel(farm, 'qwen-fake', '1.3.0');
  const T = CHATML_TEMPLATE;
  const bytes = (text: string) => Buffer.byteLength(text, 'utf8');
  const { server, client } = await startInProcess({ models: farm, cacheDir: path.join(dir, 'cache') });
  t.teardown(() => server.close());
  const ask = (messages: any[]) => client.chat.completions.create({ model: 'qwen-fake', messages }) as Promise<any>;

  const conversation: any[] = [
    { role: 'system', content: SYSTEM },
    { role: 'user', content: QUESTION },
  ];
  const first = await ask(conversation);
  conversation.push({ role: 'assistant', content: first.choices[0].message.content }, { role: 'user', content: 'Why?' });
  const second = await ask(conversation);
  // The earlier turns are rendered by kvstash (system block, inputs between prefix and postfix,
  // replies followed by turnEnd) and run on the system prompt's cache made by the first request.
  const system = T.system.replace('{system}', SYSTEM);
  const window2 = `${T.prefix}${QUESTION}${T.postfix}${first.choices[0].message.content}${T.turnEnd}${T.prefix}Why?${T.postfix}`;
  t.equal(second.kvstash.tier, 'disk', "from the system prompt's cache");
  t.equal(second.usage.prompt_tokens_details.cached_tokens, bytes(system));
  t.equal(second.usage.prompt_tokens - second.usage.prompt_tokens_details.cached_tokens, bytes(window2), 'the rest of the conversation is prefilled');
  conversation.push({ role: 'assistant', content: second.choices[0].message.content }, { role: 'user', content: 'And board two?' });
  const third = await ask(conversation);
  t.equal(third.kvstash.tier, 'resident', "the runtime's history still holds the conversation");
  t.equal(
    third.usage.prompt_tokens - third.usage.prompt_tokens_details.cached_tokens,
    bytes(`${T.turnEnd}${T.prefix}And board two?${T.postfix}`),
    'only the new turn is prefilled (and the end of the previous reply)',
  );

  // Another conversation runs on the model in between: what the backend knew of the runtime's
  // history no longer holds, and the same request is prefilled in full (from the system prompt's
  // cache), with the reply a fresh server gives. (The held path's reply may differ from a full
  // prefill's: the runtime's history holds the previous reply as generated, a full prefill holds it
  // tokenized from its text; on the fake runtime, whose prompt tokens are bytes, they always differ.)
  await ask([{ role: 'system', content: SYSTEM }, { role: 'user', content: 'Something else.' }]);
  const again = await ask(conversation);
  t.equal(again.kvstash.tier, 'disk', 'not resident: another conversation ran in between');
  t.equal(again.usage.prompt_tokens_details.cached_tokens, bytes(system));
  const fresh = await startInProcess({ models: farm, cacheDir: path.join(dir, 'cache-fresh') });
  t.teardown(() => fresh.server.close());
  const cold = (await fresh.client.chat.completions.create({ model: 'qwen-fake', messages: conversation })) as any;
  t.equal(again.choices[0].message.content, cold.choices[0].message.content, 'the reply of a fresh server');
  t.same(again.usage, cold.usage);
  let streamed = '';
  for await (const chunk of await fresh.client.chat.completions.create({ model: 'qwen-fake', messages: conversation, stream: true })) streamed += chunk.choices[0]?.delta.content ?? '';
  t.equal(streamed, cold.choices[0].message.content, 'streamed: the same text');
});
