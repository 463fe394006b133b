// /v1/cache (issue 15): named prompt-cache entries per model: create (evaluate and save), list,
// get, delete, names that survive a restart, validation; on the service, then over HTTP with the
// official openai client against a real server process.
import fs from 'node:fs';
import path from 'node:path';
import OpenAI from 'openai';
import t from 'tap';
import { generate } from '../lib/index.js';
import { preparePrompt, templatePrefix } from '../lib/generate/generate.js';
import { ModelPool } from '../lib/server/model-pool.js';
import { NamedCacheService, type NamedCacheEntry } from '../lib/server/named-cache.js';
import { prose, tinyModel } from './helpers/fixtures.js';
import { modelsFolder } from './helpers/server-models.js';
import { killHard, startServer } from './helpers/server-process.js';

const system = prose(80, 7);
const FIELDS = ['object', 'name', 'model', 'key', 'tokens', 'bytes', 'created_at', 'tiers'];

function newPool(models: string, cacheDir: string): ModelPool {
  return new ModelPool({ dir: models, cacheDir, contextSize: 1024, parallel: 2, threads: 2, log: () => undefined });
}

t.test('service: create, list, get, delete, and names that outlive the process', async (t) => {
  const dir = t.testdir();
  const models = await modelsFolder(dir);
  fs.mkdirSync(path.join(models, 'other'));
  fs.copyFileSync(await tinyModel(), path.join(models, 'other', 'model.gguf'));
  const cacheDir = path.join(dir, 'cache');
  const pool = newPool(models, cacheDir);
  t.teardown(() => pool.close());
  const service = new NamedCacheService({ pool, cacheDir });
  const served = await pool.get('tiny');
  const model = served.context!.model;

  const before = Math.floor(Date.now() / 1000);
  const sys = (await service.create('tiny', { name: 'support-bot', system })) as NamedCacheEntry;
  t.same(Object.keys(sys), FIELDS, 'exactly the documented fields');
  const prefix = templatePrefix(model, { system })!;
  const entryFile = path.join(cacheDir, 'tiny', `${sys.key}.kvstash`);
  t.match(sys, { object: 'cache.entry', name: 'support-bot', model: 'tiny', key: /^[0-9a-f]{32}$/, tokens: prefix.length, tiers: ['ram', 'disk'] });
  t.equal(sys.bytes, fs.statSync(entryFile).size, 'bytes: the entry file on disk (it is there before the reply)');
  t.ok(sys.created_at >= before && sys.created_at <= Math.floor(Date.now() / 1000), 'created_at: unix seconds');

  // The entry is what a later request restores: its whole system prefix, not evaluated again.
  const lease = await served.lease();
  try {
    const result = await generate(served.context!, { system, prompt: 'Hello.', cache: served.cache!, sequence: lease.sequence, maxTokens: 2 }).result;
    t.equal(result.cachedTokens, sys.tokens, 'a request with that system prompt restores the named entry');
  } finally {
    lease.release();
  }

  const messages = [
    { role: 'user', content: 'What is a prefix cache?' },
    { role: 'assistant', content: 'It keeps evaluated prompts.' },
  ];
  const conv = (await service.create('tiny', { name: 'conv.v1', system, messages })) as NamedCacheEntry;
  t.equal(conv.tokens, preparePrompt(model, { system, messages }).tokens.length, 'a conversation: the tokens generate() computes for it');
  const raw = (await service.create('tiny', { name: 'raw_prompt', prompt: prose(40, 9) })) as NamedCacheEntry;
  t.equal(raw.tokens, model.tokenize(prose(40, 9), { special: true }).length, 'a raw prompt: its tokens');

  t.same(await service.listModel('tiny'), { object: 'list', data: [conv, raw, sys] }, 'the list, by name');
  t.same(await service.get('tiny', 'support-bot'), sys);

  // A second name for the same tokens: one entry, two names; deleting one keeps the entry.
  const alias = (await service.create('tiny', { name: 'alias', system })) as NamedCacheEntry;
  t.equal(alias.key, sys.key, 'same tokens, same entry');
  t.same(await service.delete('tiny', 'alias'), { object: 'cache.entry.deleted', name: 'alias', model: 'tiny', deleted: true });
  t.ok(fs.existsSync(entryFile), 'the entry stays while another name points at it');
  await t.rejects(service.get('tiny', 'alias'), { status: 404, code: 'cache_entry_not_found' });

  // Errors.
  await t.rejects(service.get('tiny', 'nobody'), { status: 404 });
  await t.rejects(service.get('tiny', '../../etc/passwd'), { status: 404 }, 'a name is never a path');
  await t.rejects(service.delete('tiny', 'nobody'), { status: 404 });
  await t.rejects(service.listModel('nope'), { status: 404, code: 'model_not_found' });
  await t.rejects(service.create('tiny', { name: '../escape', system }), { status: 400, param: 'name' });
  await t.rejects(service.create('tiny', { name: '.hidden', system }), { status: 400, param: 'name' });
  await t.rejects(service.create('tiny', { name: 'x'.repeat(65), system }), { status: 400, param: 'name' });
  await t.rejects(service.create('tiny', { name: 'empty' }), { status: 400 }, 'nothing to evaluate');
  await t.rejects(service.create('tiny', { name: 'bad', messages: [{ role: 'robot', content: 'x' }] }), { status: 400, param: 'messages[0].role' });
  await t.rejects(service.create('tiny', { name: 'bad', tools: 'no' }), { status: 400, param: 'tools' });
  await t.rejects(service.create('tiny', { name: 'big', prompt: prose(1500) }), { status: 400, code: 'context_length_exceeded' });
  await t.rejects(service.create('tiny', []), { status: 400 });

  // Another model is another namespace; its names are listed even while it is not loaded.
  const elsewhere = (await service.create('other', { name: 'support-bot', prompt: prose(30, 2) })) as NamedCacheEntry;
  t.equal(elsewhere.model, 'other');
  t.same(await service.get('tiny', 'support-bot'), sys, 'the same name in another model is another entry');

  t.same(await service.delete('tiny', 'raw_prompt'), { object: 'cache.entry.deleted', name: 'raw_prompt', model: 'tiny', deleted: true });
  t.notOk(fs.existsSync(path.join(cacheDir, 'tiny', `${raw.key}.kvstash`)), 'its entry is deleted with its last name');
  await pool.close();

  // A new process: the names are on disk with the entries.
  const pool2 = newPool(models, cacheDir);
  t.teardown(() => pool2.close());
  const service2 = new NamedCacheService({ pool: pool2, cacheDir });
  const listed = (await service2.list()) as { object: string; data: NamedCacheEntry[] };
  t.same(
    listed.data.map((e) => [e.model, e.name, e.key, e.tokens, e.tiers]),
    [
      ['other', 'support-bot', elsewhere.key, elsewhere.tokens, ['disk']],
      ['tiny', 'conv.v1', conv.key, conv.tokens, ['disk']],
      ['tiny', 'support-bot', sys.key, sys.tokens, ['disk']],
    ],
    'every model\'s names, from disk, without loading a model',
  );
  t.same(pool2.list().map((m) => m.loaded), [false, false], 'listing loaded no model');
});

t.test('http: /v1/cache CRUD with the openai client, across a restart', async (t) => {
  const dir = t.testdir();
  const models = await modelsFolder(dir);
  const args = ['--models', models, '--cache-dir', path.join(dir, 'cache'), '--sessions-dir', path.join(dir, 'sessions'), '--threads', '2', '--context-size', '1024', '--parallel', '2'];
  const server = await startServer(args);
  t.teardown(() => killHard(server));
  const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'none', maxRetries: 0 });

  const { data: created, response } = await client.post<unknown, NamedCacheEntry>('/cache/tiny', { body: { name: 'support-bot', system } }).withResponse();
  t.equal(response.status, 201);
  t.same(Object.keys(created), FIELDS);
  t.match(created, { object: 'cache.entry', name: 'support-bot', model: 'tiny', tiers: ['ram', 'disk'] });
  t.same(await client.get('/cache/tiny/support-bot'), created);
  t.same(await client.get('/cache/tiny'), { object: 'list', data: [created] });
  t.same(await client.get('/cache'), { object: 'list', data: [created] });
  await t.rejects(client.get('/cache/tiny/nobody'), { status: 404 });
  await t.rejects(client.get('/cache/nope'), { status: 404 });
  await t.rejects(client.post('/cache/tiny', { body: { name: '../x', system } }), { status: 400 });
  await killHard(server);

  // After a kill and a restart the name is there, and a chat request with that system prompt
  // restores its entry.
  const again = await startServer(args);
  t.teardown(() => killHard(again));
  const client2 = new OpenAI({ baseURL: `${again.url}/v1`, apiKey: 'none', maxRetries: 0 });
  t.same(await client2.get('/cache/tiny'), { object: 'list', data: [{ ...created, tiers: ['disk'] }] }, 'the name survived the kill');
  const chat = await client2.chat.completions.create({ model: 'tiny', max_tokens: 2, messages: [{ role: 'system', content: system }, { role: 'user', content: 'Hello.' }] });
  t.equal(chat.usage?.prompt_tokens_details?.cached_tokens, created.tokens, 'chat restores the named entry');
  t.same(await client2.delete('/cache/tiny/support-bot'), { object: 'cache.entry.deleted', name: 'support-bot', model: 'tiny', deleted: true });
  await t.rejects(client2.get('/cache/tiny/support-bot'), { status: 404 });
  await t.rejects(client2.delete('/cache/tiny/support-bot'), { status: 404 });
  t.same(await client2.get('/cache'), { object: 'list', data: [] });
});
