// kvstash's OpenAI-compatible server driven by the official `openai` client: model discovery,
// chat and text completions plain and streamed (the same greedy text), the automatic prompt cache
// (cached_tokens of a repeated system prompt, in the process and after a restart), concurrent
// requests batched on one context giving each the text it gets alone, and Qwen tool calls.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { commonPrefix, loadModel } from '../lib/index.js';
import { preparePrompt, templatePrefix } from '../lib/generate/generate.js';
import { parseToolCalls } from '../lib/server/chat.js';
import { ModelPool } from '../lib/server/model-pool.js';
import { addTinyModel, raw, startInProcess, metric } from './helpers/serve.js';
import { prose } from './helpers/fixtures.js';

const root = t.testdir();
const models = path.join(root, 'models');
const SYSTEM = `You are the assistant of a board farm. ${prose(60, 7)}`;
type Message = { role: 'system' | 'user' | 'assistant'; content: string };
const ask = (question: string): Message[] => [
  { role: 'system', content: SYSTEM },
  { role: 'user', content: question },
];

t.before(async () => {
  await addTinyModel(models, 'tiny');
  // A second seed: other weights, so another model's text differs.
  await addTinyModel(models, 'tiny-b', 'model.gguf', 2);
});

t.test('models: folders are ids; several files warn and pick the first by name; model.json names one', async (t) => {
  const dir = path.join(root, 'discovery');
  await addTinyModel(dir, 'alpha', 'b.gguf');
  fs.copyFileSync(path.join(dir, 'alpha', 'b.gguf'), path.join(dir, 'alpha', 'a.gguf'));
  await addTinyModel(dir, 'beta', 'x.gguf');
  fs.copyFileSync(path.join(dir, 'beta', 'x.gguf'), path.join(dir, 'beta', 'y.gguf'));
  fs.writeFileSync(path.join(dir, 'beta', 'model.json'), JSON.stringify({ file: 'y.gguf' }));
  fs.mkdirSync(path.join(dir, 'empty'));
  fs.mkdirSync(path.join(dir, 'typo'));
  fs.writeFileSync(path.join(dir, 'typo', 'm.gguf'), 'x');
  fs.writeFileSync(path.join(dir, 'typo', 'model.json'), JSON.stringify({ fiel: 'm.gguf' }));
  fs.writeFileSync(path.join(dir, 'loose.gguf'), 'not in a folder');
  const lines: string[] = [];
  const pool = new ModelPool({ dir, cacheDir: null, log: (line) => lines.push(line) });
  t.same(
    pool.list().map((m) => [m.id, m.kind, m.loaded]),
    [
      ['alpha', 'llama', false],
      ['beta', 'llama', false],
    ],
  );
  pool.list();
  t.equal(lines.length, 2, 'each warning once, however often the folder is scanned');
  t.match(lines[0], /models\/alpha has 2 model files \(a\.gguf, b\.gguf\); using a\.gguf/);
  t.match(lines[1], /models\/typo\/model\.json is unusable \(unknown key\(s\) fiel/);
  const beta = await pool.get('beta');
  t.equal((beta.model as { path: string }).path, path.join(dir, 'beta', 'y.gguf'), 'model.json picked y.gguf');
  await t.rejects(pool.get('../models'), { status: 404, code: 'model_not_found' }, 'an id is a folder name, never a path');
  await pool.close();
});

t.test('chat and text completions: streamed and plain give the same greedy text', async (t) => {
  const { server, client, url } = await startInProcess({ models, cacheDir: path.join(root, 'cache-same') });
  t.teardown(() => server.close());
  const list = await client.models.list();
  t.same(
    list.data.map((m) => m.id),
    ['tiny', 'tiny-b'],
  );
  // Without a system prompt the tiny model's greedy reply has visible (multi-byte) text, not only newlines.
  const messages: Message[] = [{ role: 'user', content: 'Which board has the most memory?' }];
  const plain = await client.chat.completions.create({ model: 'tiny', messages, max_tokens: 12, temperature: 0 });
  t.equal(plain.object, 'chat.completion');
  t.equal(plain.choices[0]!.finish_reason, 'length');
  t.equal(plain.usage!.completion_tokens, 12);
  const stream = await client.chat.completions.create({ model: 'tiny', messages, max_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true } });
  let text = '';
  let usage: any;
  let finish: string | null = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    if (chunk.usage) usage = chunk;
    for (const choice of chunk.choices) {
      text += choice.delta.content ?? '';
      finish = choice.finish_reason ?? finish;
    }
  }
  t.equal(text, plain.choices[0]!.message.content, 'same text streamed');
  t.match(text, /\S/, 'visible text, not only newlines');
  t.equal(finish, 'length');
  t.ok(chunks >= 3, 'role chunk, content chunks, finish chunk, usage chunk');
  t.equal(usage.usage.prompt_tokens, plain.usage!.prompt_tokens);
  t.equal(usage.usage.completion_tokens, 12);
  t.equal(usage.choices.length, 0, 'the usage chunk has no choices');
  t.type(usage.kvstash.ttftMs, 'number');

  // Another model, other weights: another text (the model field selects).
  const other = await client.chat.completions.create({ model: 'tiny-b', messages, max_tokens: 12, temperature: 0 });
  t.not(other.choices[0]!.message.content, plain.choices[0]!.message.content, 'tiny-b is another model');

  const prompt = 'The cache of the prompt is';
  const completion = await client.completions.create({ model: 'tiny', prompt, max_tokens: 8, temperature: 0 });
  t.equal(completion.object, 'text_completion');
  t.equal(completion.usage!.completion_tokens, 8);
  let streamed = '';
  for await (const chunk of await client.completions.create({ model: 'tiny', prompt, max_tokens: 8, temperature: 0, stream: true })) streamed += chunk.choices[0]?.text ?? '';
  t.equal(streamed, completion.choices[0]!.text);

  // A stop string cuts the text before it, finish_reason 'stop'.
  const full = completion.choices[0]!.text;
  const cut = full.slice(0, Math.max(1, Math.floor(full.length / 2)));
  const stopAt = full.slice(cut.length, cut.length + 2);
  if (stopAt.length > 0 && !cut.includes(stopAt)) {
    const stopped = await client.completions.create({ model: 'tiny', prompt, max_tokens: 8, temperature: 0, stop: [stopAt] });
    t.equal(stopped.choices[0]!.text, full.slice(0, full.indexOf(stopAt)));
    t.equal(stopped.choices[0]!.finish_reason, 'stop');
  }

  // seed: the same seed at temperature 1 gives the same text twice.
  const a = await client.completions.create({ model: 'tiny', prompt, max_tokens: 8, temperature: 1, top_p: 0.9, seed: 42 });
  const b = await client.completions.create({ model: 'tiny', prompt, max_tokens: 8, temperature: 1, top_p: 0.9, seed: 42 });
  t.equal(a.choices[0]!.text, b.choices[0]!.text, 'same seed, same sample');

  const health = await raw(url, 'GET', '/health');
  t.equal(health.status, 200);
  t.same(health.json, { status: 'ok' });
});

t.test('automatic prompt cache: a repeated system prompt is restored, in the process and after a restart', async (t) => {
  const cacheDir = path.join(root, 'cache-repeat');
  const model = await loadModel(path.join(models, 'tiny', 'model.gguf'));
  t.teardown(() => model.dispose());
  const prefix = templatePrefix(model, { system: SYSTEM })!;
  t.ok(prefix.length > 16, `the system prefix is ${prefix.length} tokens`);
  const first = ask('How much memory does the RK3588 have?');
  const second = ask('Which kernel runs on the farm?');
  const tokens = (messages: Message[]) => preparePrompt(model, { system: SYSTEM, messages: messages.slice(1) }).tokens;

  let running = await startInProcess({ models, cacheDir });
  const a = await running.client.chat.completions.create({ model: 'tiny', messages: first, max_tokens: 4, temperature: 0 });
  t.equal(a.usage!.prompt_tokens, tokens(first).length, 'prompt_tokens counts the rendered prompt');
  t.equal(a.usage!.prompt_tokens_details!.cached_tokens, 0, 'the first request evaluates everything');
  t.equal((a as any).kvstash.tier, null);
  const b = await running.client.chat.completions.create({ model: 'tiny', messages: second, max_tokens: 4, temperature: 0 });
  const shared = commonPrefix(tokens(first), tokens(second));
  t.ok(shared >= prefix.length);
  t.equal(b.usage!.prompt_tokens_details!.cached_tokens, shared, 'the longest common prefix is reused (resident in the sequence)');
  t.equal((b as any).kvstash.tier, 'resident');
  const metrics = (await raw(running.url, 'GET', '/metrics')).text;
  t.equal(metric(metrics, 'kvstash_cache_lookups_total{model="tiny"}'), 2);
  t.equal(metric(metrics, 'kvstash_cache_hits_total{model="tiny",tier="resident"}'), 1);
  t.equal(metric(metrics, 'kvstash_prefill_tokens_saved_total{model="tiny"}'), shared);
  await running.server.close();

  // A new server on the same cache folder: loading the model restored the system prefix (the one
  // the last run used) from disk into a sequence, so the first request copies it from there.
  running = await startInProcess({ models, cacheDir });
  t.teardown(() => running.server.close());
  const c = await running.client.chat.completions.create({ model: 'tiny', messages: ask('Who restarts the boards?'), max_tokens: 4, temperature: 0 });
  t.equal(c.usage!.prompt_tokens_details!.cached_tokens, prefix.length, 'cached_tokens = the system prefix');
  t.equal((c as any).kvstash.tier, 'resident');
  t.match(running.lines.join('\n'), new RegExp(`tiny: restored the system prompt used last \\(${prefix.length} tokens, disk, \\d+ ms\\) into sequence 3`), 'read from disk once, when the model loaded');
  const again = await running.client.chat.completions.create({ model: 'tiny', messages: first, max_tokens: 4, temperature: 0 });
  t.equal(again.choices[0]!.message.content, a.choices[0]!.message.content, 'restored prefix, same answer as evaluated');
});

t.test('after a restart, the system prompt used last is restored when the model loads, into the sequence handed out last', async (t) => {
  const cacheDir = path.join(root, 'cache-recent');
  const other = `You answer questions about the build machines. ${prose(50, 11)}`;
  const model = await loadModel(path.join(models, 'tiny', 'model.gguf'));
  t.teardown(() => model.dispose());
  const prefix = templatePrefix(model, { system: SYSTEM })!;
  const otherPrefix = templatePrefix(model, { system: other })!;
  t.ok(commonPrefix(prefix, otherPrefix) < 16, 'the two system prefixes share less than the cache minimum');

  let running = await startInProcess({ models, cacheDir, parallel: 2 });
  await running.client.chat.completions.create({ model: 'tiny', messages: ask('How much memory does the RK3588 have?'), max_tokens: 2, temperature: 0 });
  await running.client.chat.completions.create({ model: 'tiny', messages: [{ role: 'system', content: other }, { role: 'user', content: 'Which compiler?' }], max_tokens: 2, temperature: 0 });
  await running.server.close();

  running = await startInProcess({ models, cacheDir, parallel: 2 });
  t.teardown(() => running.server.close());
  // A raw prompt loads the model; it runs in sequence 0, so the restored prefix in sequence 1 stays.
  await running.client.completions.create({ model: 'tiny', prompt: 'Hi', max_tokens: 1, temperature: 0 });
  const served = await running.server.pool.get('tiny');
  t.equal(served.context!.memory.range(1).max, otherPrefix.length - 1, 'sequence 1 holds the newest system prefix');
  const newest = await running.client.chat.completions.create({ model: 'tiny', messages: [{ role: 'system', content: other }, { role: 'user', content: 'Which linker?' }], max_tokens: 2, temperature: 0 });
  t.equal(newest.usage!.prompt_tokens_details!.cached_tokens, otherPrefix.length);
  t.equal((newest as any).kvstash.tier, 'resident', 'the newest system prompt was waiting in a sequence');
  const older = await running.client.chat.completions.create({ model: 'tiny', messages: ask('Who restarts the boards?'), max_tokens: 2, temperature: 0 });
  t.equal(older.usage!.prompt_tokens_details!.cached_tokens, prefix.length, 'the older one is still restored');
  t.not((older as any).kvstash.tier, 'resident', 'from RAM or disk, not from a sequence');
});

t.test('concurrent requests share the context (one sequence each) and get the text each gets alone', async (t) => {
  const { server, client, url } = await startInProcess({ models, cacheDir: null, parallel: 4 });
  t.teardown(() => server.close());
  // Raw prompts: the tiny model's greedy continuations of these differ from one another.
  const prompts = ['cache model token prefix restore', 'Which board has the most memory?', 'Hello', 'the state of a prompt is saved'];
  const alone: string[] = [];
  for (const prompt of prompts) alone.push((await client.completions.create({ model: 'tiny', prompt, max_tokens: 6, temperature: 0 })).choices[0]!.text);
  t.equal(new Set(alone).size, prompts.length, 'four different texts');
  const together = await Promise.all(prompts.map((prompt) => client.completions.create({ model: 'tiny', prompt, max_tokens: 6, temperature: 0 })));
  t.same(
    together.map((r) => r.choices[0]!.text),
    alone,
  );
  const metrics = (await raw(url, 'GET', '/metrics')).text;
  t.equal(metric(metrics, 'kvstash_sequences{model="tiny"}'), 4);
  t.equal(metric(metrics, 'kvstash_sequences_active'), 0, 'every lease released');
  t.equal(metric(metrics, 'kvstash_requests_total{route="/v1/completions",status="200"}'), 8);
});

t.test('tools: rendered into the cached prefix; assistant tool_calls and tool results are accepted', async (t) => {
  const { server, client } = await startInProcess({ models, cacheDir: null });
  t.teardown(() => server.close());
  const tools = [{ type: 'function' as const, function: { name: 'board_status', description: 'Status of one board', parameters: { type: 'object', properties: { id: { type: 'integer' } } } } }];
  const messages: any[] = [
    { role: 'system', content: 'You manage boards.' },
    { role: 'user', content: 'Is board 3 up?' },
    { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'board_status', arguments: '{"id":3}' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: '{"up": true}' },
  ];
  const a = await client.chat.completions.create({ model: 'tiny', messages, tools, max_tokens: 4, temperature: 0 });
  t.equal(a.choices[0]!.message.role, 'assistant');
  const b = await client.chat.completions.create({ model: 'tiny', messages: [messages[0], { role: 'user', content: 'And board 4?' }], tools, max_tokens: 4, temperature: 0 });
  const model = await loadModel(path.join(models, 'tiny', 'model.gguf'));
  t.teardown(() => model.dispose());
  const prefix = templatePrefix(model, { system: 'You manage boards.', tools })!;
  t.ok(b.usage!.prompt_tokens_details!.cached_tokens >= prefix.length, 'the system + tools prefix is reused');
});

t.test('Qwen tool calls in the output become tool_calls', async (t) => {
  const text = 'Let me check.\n<tool_call>\n{"name": "board_status", "arguments": {"id": 3}}\n</tool_call>';
  const parsed = parseToolCalls(text);
  t.equal(parsed.content, 'Let me check.');
  t.equal(parsed.toolCalls.length, 1);
  t.equal(parsed.toolCalls[0]!.function.name, 'board_status');
  t.equal(parsed.toolCalls[0]!.function.arguments, '{"id":3}');
  t.match(parsed.toolCalls[0]!.id, /^call_[0-9a-f]{24}$/);
  const only = parseToolCalls('<tool_call>{"name":"a","arguments":{}}</tool_call><tool_call>{"name":"b","arguments":"{\\"x\\":1}"}</tool_call>');
  t.equal(only.content, null);
  t.same(
    only.toolCalls.map((c) => [c.function.name, c.function.arguments]),
    [
      ['a', '{}'],
      ['b', '{"x":1}'],
    ],
  );
  const broken = '<tool_call>{not json}</tool_call>';
  t.same(parseToolCalls(broken), { content: broken, toolCalls: [] }, 'a block that is not a call stays text');
});
