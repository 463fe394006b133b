// An RKLLM model served by the same endpoints, on the fake librkllmrt.so: discovered as
// models/<name>/<file>.rkllm with a model.json (runtime version, library), the same text as
// loadRkllmModel gives, streamed and plain, its system-prompt cache reused across requests, one
// generation at a time (concurrent requests queue), and what RKLLM cannot do refused with 400.
import fs from 'node:fs';
import path from 'node:path';
import OpenAI from 'openai';
import t from 'tap';
import { CHATML_TEMPLATE, loadRkllmModel } from '../lib/index.js';
import { fakeRuntimeLibrary } from './helpers/fake-rkllm.js';
import { addFakeRkllmModel, metric, raw, startInProcess } from './helpers/serve.js';

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
    await status(client.chat.completions.create({ model: 'qwen-fake', messages: [user, { role: 'assistant', content: 'Board 1.' }, { role: 'user', content: 'Why?' }] })),
    '400',
    'earlier turns: RKLLM templates one input per run',
  );
  t.equal(await status(client.chat.completions.create({ model: 'qwen-old', messages: [user], max_tokens: 3 })), '400', 'runtime 1.2.1 fixes the token limit at load');
  t.equal(await status(client.chat.completions.create({ model: 'qwen-old', messages: [user] })), 200, 'without max_tokens it answers');
});
