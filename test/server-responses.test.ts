// Responses chains (issue 15): stored responses are durable, continuing one restores its KV instead
// of re-evaluating it (same process, new process, after SIGKILL), branching, GET/DELETE, errors;
// first on the service with a real context, then over HTTP with the official openai client.
import path from 'node:path';
import OpenAI from 'openai';
import t from 'tap';
import { generate, loadModel, type Model } from '../lib/index.js';
import { ModelPool, type ServedModel } from '../lib/server/model-pool.js';
import { ResponsesService } from '../lib/server/responses.js';
import { maxAbsDiff, prose, tinyModel } from './helpers/fixtures.js';
import { entryPayload, modelsFolder } from './helpers/server-models.js';
import { killHard, startServer } from './helpers/server-process.js';

const instructions = prose(60, 3);
type Reply = {
  id: string;
  object: string;
  status: string;
  output_text: string;
  output: Array<{ type: string; role: string; status: string; content: Array<{ type: string; text: string }> }>;
  previous_response_id: string | null;
  usage: { input_tokens: number; input_tokens_details: { cached_tokens: number }; output_tokens: number; total_tokens: number };
  kvstash: { tier: string | null; restored_tokens: number; evaluated_tokens: number };
};

async function servedPool(dir: string): Promise<{ pool: ModelPool; served: ServedModel }> {
  const pool = new ModelPool({ dir: await modelsFolder(dir), cacheDir: null, contextSize: 1024, parallel: 2, threads: 2, log: () => undefined });
  return { pool, served: await pool.get('tiny') };
}

/** Tokens of the conversation as one rendering (ChatML: the same tokens as message by message). */
function renderedTokens(model: Model, messages: Array<{ role: string; content: string }>): number {
  return model.tokenize(model.applyChatTemplate(messages, { addAssistant: false }), { special: true }).length;
}

t.test('service: a chain continues from its saved KV, branches, and survives a new process', async (t) => {
  const dir = t.testdir();
  const sessions = path.join(dir, 'sessions');
  const first = await servedPool(dir);
  t.teardown(() => first.pool.close());
  const service = new ResponsesService({ dir: sessions });
  const signal = new AbortController().signal;
  const opts = { signal };

  const r1 = (await service.create(first.served, { input: 'Tell me about caches.', instructions, max_output_tokens: 8 }, opts)) as Reply;
  t.match(r1.id, /^resp_[0-9a-f]{48}$/);
  t.equal(r1.object, 'response');
  t.equal(r1.status, 'incomplete', 'the tiny model talks until max_output_tokens');
  t.equal(r1.usage.output_tokens, 8);
  t.equal(r1.output[0]!.content[0]!.text, r1.output_text);
  t.equal(r1.usage.input_tokens_details.cached_tokens, 0, 'nothing cached yet');

  const model = first.served.context!.model;
  const conversation1 = [
    { role: 'system', content: instructions },
    { role: 'user', content: 'Tell me about caches.' },
    { role: 'assistant', content: r1.output_text },
  ];
  const r2 = (await service.create(first.served, { input: 'Go on.', instructions, previous_response_id: r1.id, max_output_tokens: 8 }, opts)) as Reply;
  t.equal(r2.previous_response_id, r1.id);
  t.equal(r2.usage.input_tokens_details.cached_tokens, renderedTokens(model, conversation1), 'the whole first exchange is restored, not evaluated');
  t.equal(r2.kvstash.tier, 'ram');
  t.equal(r2.kvstash.evaluated_tokens, r2.usage.input_tokens - renderedTokens(model, conversation1));

  // The same continuation computed from nothing gives the same text and the same next-token logits.
  const reference = await model.createContext({ contextSize: 1024 });
  t.teardown(() => reference.dispose());
  const fresh = await generate(reference, { system: instructions, messages: [...conversation1.slice(1), { role: 'user', content: 'Go on.' }], maxTokens: 8 }).result;
  t.equal(r2.output_text, fresh.text, 'the restored continuation says what a full prefill says');

  // A branch: another continuation of r1.
  const branch = (await service.create(first.served, { input: 'Something else entirely.', instructions, previous_response_id: r1.id, max_output_tokens: 8 }, opts)) as Reply;
  // At least r1's conversation; r2's entry also shares the next user header with it.
  t.ok(branch.usage.input_tokens_details.cached_tokens >= renderedTokens(model, conversation1), 'the branch restores r1 too');
  t.not(branch.output_text, undefined);
  const r3 = (await service.create(first.served, { input: 'And then?', instructions, previous_response_id: r2.id, max_output_tokens: 8 }, opts)) as Reply;
  const conversation2 = [...conversation1, { role: 'user', content: 'Go on.' }, { role: 'assistant', content: r2.output_text }];
  t.equal(r3.usage.input_tokens_details.cached_tokens, renderedTokens(model, conversation2), 'r3 restores the r1 → r2 conversation');

  const r2Payload = await entryPayload(path.join(sessions, 'kv', 'tiny'), `response:${r2.id}`);
  await service.close();

  // The same first exchange in another directory, then a new process (a new pool, context and
  // service over that directory) continues it: it must give what the uninterrupted one gave.
  const otherSessions = path.join(dir, 'other-sessions');
  const before = new ResponsesService({ dir: otherSessions });
  const o1 = (await before.create(first.served, { input: 'Tell me about caches.', instructions, max_output_tokens: 8 }, opts)) as Reply;
  await before.close();
  const second = await servedPool(path.join(dir, 'again'));
  t.teardown(() => second.pool.close());
  const restarted = new ResponsesService({ dir: otherSessions });
  t.same(await restarted.get(o1.id), o1, 'GET returns the stored response');
  const again = (await restarted.create(second.served, { input: 'Go on.', instructions, previous_response_id: o1.id, max_output_tokens: 8 }, opts)) as Reply;
  t.equal(again.kvstash.tier, 'disk', 'restored from the entry on disk');
  t.equal(again.usage.input_tokens_details.cached_tokens, r2.usage.input_tokens_details.cached_tokens, 'as many tokens restored as without the restart');
  t.equal(again.output_text, r2.output_text, 'same continuation as the uninterrupted process');
  // Stronger than the (degenerate) text: every KV cell of the continued conversation is the same.
  const againPayload = await entryPayload(path.join(otherSessions, 'kv', 'tiny'), `response:${again.id}`);
  t.ok(againPayload.equals(r2Payload), `the continued conversation's KV state is byte-identical (${againPayload.length} bytes)`);
  await restarted.close();

  // And it equals a prefill from nothing, to within decode noise: probe the next-token logits.
  const probe = async (context: NonNullable<ServedModel['context']>, payload: Buffer, tokens: number) => {
    await context.exclusive(() => context.memory.remove(0));
    await context.importState(payload, { sequence: 0, tokens });
    await context.decode(model.tokenize(' cache', { addSpecial: false }), { start: tokens });
    return context.logits();
  };
  const tokens2 = renderedTokens(model, conversation2);
  const restoredLogits = await probe(reference, againPayload, tokens2);
  await reference.exclusive(() => reference.memory.remove(0));
  const all = model.tokenize(model.applyChatTemplate(conversation2, { addAssistant: false }), { special: true });
  await reference.decode(all, { start: 0, logits: 'none' });
  await reference.decode(model.tokenize(' cache', { addSpecial: false }), { start: all.length });
  const recomputed = reference.logits();
  const diff = maxAbsDiff(restoredLogits, recomputed);
  t.ok(diff < 1e-2, `restored chain KV predicts what a full prefill predicts (max |diff| ${diff})`);
});

t.test('service: GET, DELETE, store:false, streaming events and errors', async (t) => {
  const dir = t.testdir();
  const { pool, served } = await servedPool(dir);
  t.teardown(() => pool.close());
  const service = new ResponsesService({ dir: path.join(dir, 'sessions') });
  const opts = { signal: new AbortController().signal };

  const events: Array<{ event?: string; data: Record<string, unknown> }> = [];
  for await (const e of service.stream(served, { input: [{ role: 'user', content: [{ type: 'input_text', text: 'Hi there.' }] }], max_output_tokens: 6 }, opts)) {
    events.push(e as { event?: string; data: Record<string, unknown> });
  }
  const types = events.map((e) => e.data.type);
  t.same(
    [...new Set(types)],
    [
      'response.created',
      'response.in_progress',
      'response.output_item.added',
      'response.content_part.added',
      'response.output_text.delta',
      'response.output_text.done',
      'response.content_part.done',
      'response.output_item.done',
      'response.incomplete',
    ],
    'the event sequence of the Responses API',
  );
  t.same(events.map((e) => e.event), types, 'each SSE event is named after its type');
  t.same(events.map((e) => e.data.sequence_number), events.map((_, i) => i), 'sequence numbers count from 0');
  const final = events.at(-1)!.data.response as Reply;
  const deltas = events.filter((e) => e.data.type === 'response.output_text.delta').map((e) => e.data.delta).join('');
  t.equal(deltas, final.output_text, 'the deltas add up to the text');
  t.same(await service.get(final.id), final, 'a streamed response is stored like any other');

  const plain = (await service.create(served, { input: 'Hi there.', max_output_tokens: 6 }, opts)) as Reply;
  t.equal(plain.output_text, final.output_text, 'streamed and plain give the same greedy text');

  const unstored = (await service.create(served, { input: 'Hi.', store: false, max_output_tokens: 4 }, opts)) as Reply;
  await t.rejects(service.get(unstored.id), { status: 404, code: 'not_found' }, 'store:false is not kept');
  await t.rejects(service.create(served, { input: 'More.', previous_response_id: unstored.id }, opts), { status: 404, code: 'previous_response_not_found', param: 'previous_response_id' });

  t.same(await service.delete(plain.id), { id: plain.id, object: 'response', deleted: true });
  await t.rejects(service.get(plain.id), { status: 404 });
  await t.rejects(service.delete(plain.id), { status: 404 });
  await t.rejects(service.create(served, { input: 'More.', previous_response_id: plain.id }, opts), { status: 404, code: 'previous_response_not_found' });
  await t.rejects(service.get('../../etc/passwd'), { status: 404 }, 'an id is never a path');

  await t.rejects(service.create(served, {}, opts), { status: 400, param: 'input' });
  await t.rejects(service.create(served, { input: '' }, opts), { status: 400, param: 'input' });
  await t.rejects(service.create(served, { input: [{ role: 'robot', content: 'x' }] }, opts), { status: 400, param: 'input[0].role' });
  await t.rejects(service.create(served, { input: [{ type: 'function_call_output', output: 'x' }] }, opts), { status: 400, code: 'unsupported_parameter' });
  await t.rejects(service.create(served, { input: 'x', max_output_tokens: 0 }, opts), { status: 400, param: 'max_output_tokens' });
  await t.rejects(service.create(served, { input: 'x', temperature: 3 }, opts), { status: 400, param: 'temperature' });
  await t.rejects(service.create(served, { input: 'x', store: 'yes' }, opts), { status: 400, param: 'store' });
  await t.rejects(service.create(served, { input: prose(900), max_output_tokens: 200 }, opts), { code: 'E_CONTEXT_FULL' }, 'a prompt that cannot fit');

  const aborted = new AbortController();
  aborted.abort();
  await t.rejects(service.create(served, { input: 'x' }, { signal: aborted.signal }), 'an aborted request does not run');
  await service.close();
});

// --- over HTTP, with the official client and a real server process ---------------------------

function serveArgs(models: string, sessions: string, cache: string): string[] {
  return ['--models', models, '--sessions-dir', sessions, '--cache-dir', cache, '--threads', '2', '--context-size', '1024', '--parallel', '2'];
}

t.test('http: a chain continued after SIGKILL and a restart gives the uninterrupted tokens, restored', async (t) => {
  const dir = t.testdir();
  const models = await modelsFolder(dir);
  const ask = { model: 'tiny', instructions, max_output_tokens: 8 } as const;

  // A: the uninterrupted server.
  const a = await startServer(serveArgs(models, path.join(dir, 'sessions-a'), path.join(dir, 'cache-a')));
  t.teardown(() => killHard(a));
  const clientA = new OpenAI({ baseURL: `${a.url}/v1`, apiKey: 'none', maxRetries: 0 });
  const a1 = await clientA.responses.create({ ...ask, input: 'Tell me about caches.' });
  const a2 = (await clientA.responses.create({ ...ask, input: 'Go on.', previous_response_id: a1.id })) as unknown as Reply;
  t.ok(a2.usage.input_tokens_details.cached_tokens > a1.usage!.input_tokens, 'the uninterrupted continuation restores the first exchange');

  // B: the same first request, then SIGKILL right after the reply, a restart, and the continuation.
  const sessionsB = path.join(dir, 'sessions-b');
  const b = await startServer(serveArgs(models, sessionsB, path.join(dir, 'cache-b')));
  const clientB = new OpenAI({ baseURL: `${b.url}/v1`, apiKey: 'none', maxRetries: 0 });
  const b1 = await clientB.responses.create({ ...ask, input: 'Tell me about caches.' });
  t.equal(b1.output_text, a1.output_text);
  await killHard(b);
  t.equal(await b.exited, 'SIGKILL');

  const b2server = await startServer(serveArgs(models, sessionsB, path.join(dir, 'cache-b')));
  t.teardown(() => killHard(b2server));
  const clientB2 = new OpenAI({ baseURL: `${b2server.url}/v1`, apiKey: 'none', maxRetries: 0 });
  t.same(await clientB2.responses.retrieve(b1.id), JSON.parse(JSON.stringify(b1)), 'the killed server\'s response is there after the restart');
  const b2 = (await clientB2.responses.create({ ...ask, input: 'Go on.', previous_response_id: b1.id })) as unknown as Reply;
  t.equal(b2.output_text, a2.output_text, 'the same text as the uninterrupted server');
  t.equal(b2.usage.output_tokens, a2.usage.output_tokens);
  t.equal(b2.usage.input_tokens, a2.usage.input_tokens);
  t.equal(b2.usage.input_tokens_details.cached_tokens, a2.usage.input_tokens_details.cached_tokens, 'as many tokens restored as without the kill');
  t.ok(b2.usage.input_tokens_details.cached_tokens > 0);
  t.equal(b2.kvstash.tier, 'disk', 'restored from the chain\'s entry on disk, not re-evaluated');
  t.equal(b2.kvstash.evaluated_tokens, b2.usage.input_tokens - b2.usage.input_tokens_details.cached_tokens);
  const payloadA = await entryPayload(path.join(dir, 'sessions-a', 'kv', 'tiny'), `response:${a2.id}`);
  const payloadB = await entryPayload(path.join(sessionsB, 'kv', 'tiny'), `response:${b2.id}`);
  t.ok(payloadB.equals(payloadA), `every KV cell of the continued conversation is the same in both servers (${payloadA.length} bytes)`);

  // Branching after the restart: another continuation of b1, then each branch continues.
  const other = (await clientB2.responses.create({ ...ask, input: 'Something else entirely.', previous_response_id: b1.id })) as unknown as Reply;
  t.ok(other.usage.input_tokens_details.cached_tokens >= b2.usage.input_tokens_details.cached_tokens - 8, 'the branch restores b1\'s conversation too');
  const deeper = (await clientB2.responses.create({ ...ask, input: 'And then?', previous_response_id: b2.id })) as unknown as Reply;
  const deeperOther = (await clientB2.responses.create({ ...ask, input: 'And then?', previous_response_id: other.id })) as unknown as Reply;
  const model = await loadModel(await tinyModel());
  t.teardown(() => model.dispose());
  const start = [
    { role: 'system', content: instructions },
    { role: 'user', content: 'Tell me about caches.' },
    { role: 'assistant', content: b1.output_text },
  ];
  const branch1 = [...start, { role: 'user', content: 'Go on.' }, { role: 'assistant', content: b2.output_text }];
  const branch2 = [...start, { role: 'user', content: 'Something else entirely.' }, { role: 'assistant', content: other.output_text }];
  t.equal(deeper.usage.input_tokens_details.cached_tokens, renderedTokens(model, branch1), 'branch 1 continues from its own whole conversation');
  t.equal(deeperOther.usage.input_tokens_details.cached_tokens, renderedTokens(model, branch2), 'branch 2 continues from its own whole conversation');

  // Streaming through the client: its events end with the stored response.
  const stream = await clientB2.responses.create({ ...ask, input: 'Go on.', previous_response_id: b1.id, stream: true });
  const types: string[] = [];
  let text = '';
  let last: Reply | undefined;
  for await (const event of stream) {
    types.push(event.type);
    if (event.type === 'response.output_text.delta') text += event.delta;
    if (event.type === 'response.incomplete' || event.type === 'response.completed') last = event.response as unknown as Reply;
  }
  t.equal(types[0], 'response.created');
  t.equal(text, a2.output_text, 'streamed continuation: the same text');
  t.ok(last!.usage.input_tokens_details.cached_tokens >= a2.usage.input_tokens_details.cached_tokens, 'restored (b2 shares even more of it)');
  t.same(await clientB2.responses.retrieve(last!.id), JSON.parse(JSON.stringify(last)));

  // DELETE, then 404s.
  await clientB2.responses.delete(deeper.id);
  await t.rejects(clientB2.responses.retrieve(deeper.id), { status: 404 });
  await t.rejects(clientB2.responses.delete(deeper.id), { status: 404 });
  await t.rejects(clientB2.responses.create({ ...ask, input: 'x', previous_response_id: deeper.id }), { status: 404, code: 'previous_response_not_found' });
  await t.rejects(clientB2.responses.retrieve('resp_nope'), { status: 404 });
  await t.rejects(clientB2.responses.create({ ...ask, model: 'nope', input: 'x' }), { status: 404 });
  await t.rejects(clientB2.responses.create({ ...ask, input: '' }), { status: 400 });
});

t.test('service: a client that goes away ends the generation and gives the sequence back', async (t) => {
  const dir = t.testdir();
  const { pool, served } = await servedPool(dir);
  t.teardown(() => pool.close());
  const service = new ResponsesService({ dir: path.join(dir, 'sessions') });
  const everySequence = async () => {
    const leases = await Promise.all([served.lease(), served.lease()]);
    for (const lease of leases) lease.release();
    return leases.map((l) => l.sequence).sort();
  };

  // The signal fires (server.ts aborts it when the socket closes).
  const hangUp = new AbortController();
  let id = '';
  let deltas = 0;
  await t.rejects(
    (async () => {
      for await (const e of service.stream(served, { input: 'Hi.', max_output_tokens: 500 }, { signal: hangUp.signal })) {
        const data = e.data as { type: string; response?: { id: string } };
        if (data.type === 'response.created') id = data.response!.id;
        if (data.type === 'response.output_text.delta' && ++deltas === 2) hangUp.abort();
      }
    })(),
    { code: 'E_ABORTED' },
  );
  t.ok(deltas >= 2 && deltas < 10, `stopped within a decode step or so (${deltas} deltas of up to 500)`);
  t.same(await everySequence(), [0, 1], 'both sequences are free again');
  await t.rejects(service.get(id), { status: 404 }, 'an aborted response is not stored');

  // The consumer stops iterating without a signal (SSE writer returning the iterator).
  let seen = 0;
  for await (const e of service.stream(served, { input: 'Hi.', max_output_tokens: 500 }, { signal: new AbortController().signal })) {
    if ((e.data as { type: string }).type === 'response.output_text.delta' && ++seen === 1) break;
  }
  t.same(await everySequence(), [0, 1], 'the generation ended and its sequence is free');
  await service.close();
});
