// loadRkllmModel / generate() against the fake librkllmrt.so, for both declared runtime versions:
// the system prompt's prompt cache is created on first use and reused after (the fake's perf
// stats show only the new tokens prefilled) with the same answer as a full prefill; switching
// system prompts releases the previous cache first; cache problems cost only the speed-up;
// abort, dispose and runtime failures end a generation with coded errors and leave no handle.
// The caches are kvstash cache entries: PromptCache and the CLI list, verify and delete them, a
// corrupt one is never loaded, and restore() never puts one into a llama.cpp context.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { readEntryFile } from '../lib/cache/entry.js';
import { mismatchReason } from '../lib/cache/identity.js';
import { CHATML_TEMPLATE, KvstashError, loadRkllmModel, PromptCache, type LoadRkllmModelOptions, type RkllmCacheProblem, type RkllmModel } from '../lib/index.js';
import {
  defaultRkllmCacheDir,
  rkllmModelName,
  RKLLM_FINGERPRINT_SCHEME,
  systemPromptCacheLabel,
  systemPromptSha256,
} from '../lib/rkllm/system-prompt-cache.js';
import { CLI, runCli } from './helpers/cli.js';
import { FAKE_VERSIONS, FakeLog, failing, fakeModelFile, fakeRuntimeLibrary, type FakeVersion } from './helpers/fake-rkllm.js';

const root = t.testdir();
const log = new FakeLog(path.join(root, 'fake-calls.jsonl'));
const modelPath = fakeModelFile(root, 'qwen-fake');
process.env.XDG_CACHE_HOME = path.join(root, 'xdg');

const SYSTEM = 'You are a terse assistant for RK3588 boards. Answer in one line.';
const PROMPT = 'How do I reuse a prompt cache?';
const rendered = (system: string): string => CHATML_TEMPLATE.system.replace('{system}', system);
/** The fake's tokens are bytes. */
const bytes = (...parts: string[]): number => Buffer.byteLength(parts.join(''));
const userPart = (prompt: string): number => bytes(CHATML_TEMPLATE.prefix, prompt, CHATML_TEMPLATE.postfix);

function load(version: FakeVersion, options: LoadRkllmModelOptions = {}): Promise<RkllmModel> {
  return loadRkllmModel(modelPath, {
    libraryPath: fakeRuntimeLibrary(version),
    runtimeVersion: version,
    maxNewTokens: 6,
    cacheDir: path.join(root, `cache-${version}`),
    ...options,
  });
}

/** Every file in a cache folder, hidden ones (temporary files) included. */
function cacheFiles(dir: string): string[] {
  return fs.existsSync(dir) ? fs.readdirSync(dir).sort() : [];
}

function entryFile(dir: string): string {
  const entries = cacheFiles(dir).filter((f) => f.endsWith('.kvstash'));
  if (entries.length !== 1) throw new Error(`expected one entry in ${dir}: ${cacheFiles(dir).join(', ')}`);
  return path.join(dir, entries[0]!);
}

t.test('model name and default cache folder follow models/<name>/<file>.rkllm', async (t) => {
  t.equal(rkllmModelName(modelPath), 'qwen-fake');
  t.equal(rkllmModelName('/srv/llm/Qwen2.5-1.5B-w8a8.rkllm'), 'Qwen2.5-1.5B-w8a8', 'elsewhere: the file name');
  t.equal(defaultRkllmCacheDir(modelPath), path.join(root, 'xdg', 'kvstash', 'rkllm', 'qwen-fake'));
  const model = await loadRkllmModel(modelPath, { libraryPath: fakeRuntimeLibrary('1.3.0'), maxNewTokens: 2 });
  t.equal(model.name, 'qwen-fake');
  t.equal(model.cacheDir, path.join(root, 'xdg', 'kvstash', 'rkllm', 'qwen-fake'));
  const result = await model.generate({ system: 'short', prompt: 'hi' }).result;
  t.equal(result.systemPromptCache, 'created');
  t.match(cacheFiles(model.cacheDir!), [/^[0-9a-f]{32}\.kvstash$/], 'one cache entry, in the default folder');
  await model.dispose();
  const named = await loadRkllmModel(modelPath, { libraryPath: fakeRuntimeLibrary('1.3.0'), name: 'mine', cacheDir: null });
  t.equal(named.name, 'mine');
  t.equal(named.cacheDir, null);
  t.equal((await named.generate({ system: 'short', prompt: 'hi' }).result).systemPromptCache, 'none', 'cacheDir null: no caching');
  await named.dispose();
});

t.test('the kvstash CLI lists, inspects, verifies and removes RKLLM caches', { skip: fs.existsSync(CLI) ? false : `${CLI} is not built` }, async (t) => {
  const cacheDir = path.join(root, 'cli-cache');
  const model = await load('1.3.0', { cacheDir });
  await model.generate({ system: SYSTEM, prompt: PROMPT }).result;
  await model.dispose();
  const label = systemPromptCacheLabel(rendered(SYSTEM));
  const file = entryFile(cacheDir);
  const inDir = ['--cache-dir', cacheDir];

  const ls = await runCli(['ls', ...inDir, '--json']);
  t.equal(ls.code, 0, ls.stderr);
  t.match(JSON.parse(ls.stdout), [{ label, tokenCount: 0, path: file, model: { name: 'qwen-fake', architecture: 'rkllm' } }]);
  const inspect = await runCli(['inspect', label, ...inDir, '--json']);
  t.equal(inspect.code, 0, inspect.stderr);
  t.match(JSON.parse(inspect.stdout), { path: file, header: { kind: 'rkllm/prompt-cache', backend: { name: 'rkllm', version: '1.3.0' } }, check: { ok: true } });
  const verify = await runCli(['verify', ...inDir, '--json']);
  t.equal(verify.code, 0, verify.stderr);
  t.match(JSON.parse(verify.stdout), { ok: 1, corrupt: [] });
  const rm = await runCli(['rm', label, ...inDir]);
  t.equal(rm.code, 0, rm.stderr);
  t.same(cacheFiles(cacheDir), [], 'removed');
});

for (const version of FAKE_VERSIONS) {
  t.test(`runtime ${version}`, async (t) => {
    t.beforeEach(() => log.clear());

    t.test('a system prompt cache is made on first use, reused after, and answers like a full prefill', async (t) => {
      const cacheDir = path.join(root, `first-use-${version}`);
      const model = await load(version, { cacheDir });
      log.clear();
      const first = model.generate({ system: SYSTEM, prompt: PROMPT });
      const streamed: string[] = [];
      for await (const chunk of first) streamed.push(chunk);
      const r1 = await first.result;
      t.equal(r1.systemPromptCache, 'created');
      t.equal(streamed.join(''), r1.text, 'the stream is the text');
      t.equal(r1.tokens.length, 6);
      t.equal(r1.prefillTokens, userPart(PROMPT), 'only the user part was prefilled');
      t.ok(r1.ttftMs !== null && r1.ttftMs > 0 && r1.totalMs >= r1.ttftMs);

      // What kvstash asked of the runtime, in order.
      t.same(log.sequence(), [
        'rkllm_set_chat_template', // empty: the system block is evaluated as raw text
        'rkllm_run', // prefill only, saving the cache
        'rkllm_run:end',
        'rkllm_set_chat_template', // the real template
        'rkllm_load_prompt_cache',
        'rkllm_run', // the user's generation
        'rkllm_run:end',
      ]);
      const [empty, real] = log.calls('rkllm_set_chat_template');
      t.match(empty, { system_prompt: '', prompt_prefix: '', prompt_postfix: '' });
      t.match(real, { system_prompt: rendered(SYSTEM), prompt_prefix: CHATML_TEMPLATE.prefix, prompt_postfix: CHATML_TEMPLATE.postfix });
      const [warm, answer] = log.calls('rkllm_run');
      t.match(warm, { input: { prompt: rendered(SYSTEM), role: 'user' }, infer: { mode: 1, keep_history: 0 } });
      const saved = (warm!.infer as { prompt_cache: { save: number; path: string } }).prompt_cache;
      t.equal(saved.save, 1, 'prompt_cache_params asks the runtime to save');
      t.equal(path.dirname(saved.path), cacheDir, 'into a temporary file beside the cache');
      t.match(answer, { input: { prompt: PROMPT, role: 'user', enable_thinking: false }, infer: { mode: 0, prompt_cache: null, keep_history: 0 } });
      const files = cacheFiles(cacheDir);
      t.match(files, [/^[0-9a-f]{32}\.kvstash$/], 'one kvstash entry, no temporary file left');
      const cacheFile = path.join(cacheDir, files[0]!);
      const loadedFrom = log.last('rkllm_load_prompt_cache').path as string;
      t.equal(path.dirname(loadedFrom), cacheDir, 'the payload was extracted beside the entry');
      t.equal(loadedFrom, saved.path, 'a new cache is loaded from the file the runtime wrote');
      t.equal(log.last('rkllm_load_prompt_cache').tokens, bytes(rendered(SYSTEM)), 'the cache holds exactly the system block');

      // The entry: the runtime's file, wrapped in the verified kvstash header.
      const entry = await readEntryFile(cacheFile);
      t.equal(path.basename(cacheFile), `${entry.key}.kvstash`);
      const runtimeFileBytes = 8 + 4 + 4 * bytes(rendered(SYSTEM)); // the fake's magic, count, tokens
      t.same(
        { ...entry.header, createdAt: 'x' },
        {
          kind: 'rkllm/prompt-cache',
          backend: { name: 'rkllm', version },
          model: { fingerprint: model.identity, fingerprintScheme: RKLLM_FINGERPRINT_SCHEME, name: 'qwen-fake', architecture: 'rkllm' },
          layout: { systemPromptSha256: systemPromptSha256(rendered(SYSTEM)), maxContextLen: '512', nBatch: '1' },
          tokenCount: 0,
          tokens: [],
          label: systemPromptCacheLabel(rendered(SYSTEM)),
          createdAt: 'x',
          payloadBytes: runtimeFileBytes,
          checksumChunkBytes: 1 << 16,
        },
        'header fields exact',
      );
      t.equal(RKLLM_FINGERPRINT_SCHEME, 'kvstash-rkllm-fp-v1');
      t.ok(Date.parse(entry.header.createdAt) > 0);
      const payload = fs.readFileSync(cacheFile).subarray(entry.payloadOffset, entry.checkedLength);
      t.equal(payload.subarray(0, 8).toString('latin1'), 'FAKERKPC', "the payload is the runtime's file: its magic");
      t.equal(payload.readUInt32LE(8), bytes(rendered(SYSTEM)), 'its token count');
      t.same([...payload.subarray(12).values()].filter((_, i) => i % 4 === 0), [...Buffer.from(rendered(SYSTEM))], 'its tokens (bytes)');

      // PromptCache sees an ordinary entry; restore() would never use it for llama.cpp.
      const cache = new PromptCache({ dir: cacheDir });
      t.same(await cache.verify(), { ok: 1, corrupt: [] });
      const listed = await cache.list();
      t.equal(listed.length, 1);
      t.match(listed[0], { key: entry.key, label: systemPromptCacheLabel(rendered(SYSTEM)), tokenCount: 0, tiers: ['disk'], path: cacheFile, model: { name: 'qwen-fake' } });
      t.equal((await cache.get(systemPromptCacheLabel(rendered(SYSTEM))))?.key, entry.key);
      const llama = {
        kind: 'llama.cpp/sequence-state' as const,
        backend: { name: 'llama.cpp', version: 'b0000' },
        model: { fingerprint: model.identity, fingerprintScheme: RKLLM_FINGERPRINT_SCHEME, name: 'qwen-fake', architecture: 'qwen2' },
        layout: { kvType: 'f16', flashAttention: 'off' },
      };
      t.match(mismatchReason(entry.header, llama), /holds rkllm\/prompt-cache, not llama\.cpp\/sequence-state/, 'the kind is compared first');

      log.clear();
      const r2 = await model.generate({ system: SYSTEM, prompt: PROMPT }).result;
      t.equal(r2.systemPromptCache, 'resident');
      t.equal(r2.text, r1.text, 'the second generate answers as the first');
      t.equal(r2.prefillTokens, userPart(PROMPT), 'only the new tokens were prefilled');
      t.same(log.sequence(), ['rkllm_run', 'rkllm_run:end'], 'nothing to set up the second time');

      log.clear();
      const cold = await model.generate({ system: SYSTEM, prompt: PROMPT, cache: false }).result;
      t.equal(cold.systemPromptCache, 'none');
      t.equal(cold.prefillTokens, bytes(rendered(SYSTEM)) + userPart(PROMPT), 'without the cache: a full prefill');
      t.equal(cold.text, r1.text, 'restoring the cache gives what recomputing gives');
      t.same(log.sequence().slice(0, 2), ['rkllm_release_prompt_cache', 'rkllm_set_chat_template']);
      await model.dispose();
      t.equal(log.live(), 0);

      // A later start (a new model object, as after a restart): the file is loaded, not made.
      log.clear();
      const again = await load(version, { cacheDir });
      const r3 = await again.generate({ system: SYSTEM, prompt: PROMPT }).result;
      t.equal(r3.systemPromptCache, 'loaded');
      t.equal(r3.text, r1.text);
      t.equal(r3.prefillTokens, userPart(PROMPT));
      t.same(log.sequence(), ['rkllm_init', 'rkllm_set_chat_template', 'rkllm_load_prompt_cache', 'rkllm_run', 'rkllm_run:end']);
      const other = await again.generate({ system: SYSTEM, prompt: 'Another question' }).result;
      t.equal(other.prefillTokens, userPart('Another question'), 'any question after the same system prompt benefits');
      await again.dispose();
      t.equal(log.live(), 0);
    });

    t.test('switching system prompts releases the previous cache first', async (t) => {
      const cacheDir = path.join(root, `switch-${version}`);
      const model = await load(version, { cacheDir });
      const a = await model.generate({ system: 'System A', prompt: PROMPT }).result;
      log.clear();
      const b = await model.generate({ system: 'System B', prompt: PROMPT }).result;
      t.equal(b.systemPromptCache, 'created');
      t.notSame(b.text, a.text, 'another system prompt, another answer');
      t.same(log.sequence().slice(0, 2), ['rkllm_release_prompt_cache', 'rkllm_set_chat_template'], 'released before anything else');
      log.clear();
      const back = await model.generate({ system: 'System A', prompt: PROMPT }).result;
      t.equal(back.systemPromptCache, 'loaded', 'the first cache is still on disk');
      t.equal(back.text, a.text);
      t.same(log.sequence(), ['rkllm_release_prompt_cache', 'rkllm_set_chat_template', 'rkllm_load_prompt_cache', 'rkllm_run', 'rkllm_run:end']);
      log.clear();
      const none = await model.generate({ prompt: PROMPT }).result;
      t.equal(none.systemPromptCache, 'none');
      t.match(log.calls('rkllm_set_chat_template')[0], { system_prompt: '', prompt_prefix: CHATML_TEMPLATE.prefix });
      t.equal(cacheFiles(cacheDir).length, 2, 'two cache entries, nothing else');
      t.same((await new PromptCache({ dir: cacheDir }).list()).map((e) => e.label).sort(), [systemPromptCacheLabel(rendered('System A')), systemPromptCacheLabel(rendered('System B'))].sort());
      await model.dispose();
    });

    t.test('streaming, messages, roles', async (t) => {
      const model = await load(version);
      const seen: string[] = [];
      const generation = model.generate({ system: SYSTEM, prompt: PROMPT, onToken: (c) => seen.push(c) });
      const result = await generation.result;
      t.equal(seen.join(''), result.text, 'onToken saw every chunk');
      const again: string[] = [];
      for await (const chunk of generation) again.push(chunk);
      t.same(again, seen, 'iterating after the end replays every chunk');

      const viaMessages = await model.generate({ messages: [{ role: 'system', content: SYSTEM }, { role: 'user', content: PROMPT }] }).result;
      t.equal(viaMessages.text, result.text, 'a system message is the system prompt');
      t.equal(viaMessages.systemPromptCache, 'resident');
      log.clear();
      await model.generate({ system: SYSTEM, messages: [{ role: 'tool', content: '{"temp": 21}' }] }).result;
      t.match(log.last('rkllm_run').input, { role: 'tool', prompt: '{"temp": 21}' });
      await model.generate({ prompt: 'think', enableThinking: true }).result;
      t.match(log.last('rkllm_run').input, { enable_thinking: true });

      t.throws(() => model.generate({ prompt: 'a', messages: [{ role: 'user', content: 'b' }] }), TypeError);
      t.throws(() => model.generate({ messages: [{ role: 'user', content: 'a' }, { role: 'assistant', content: 'b' }, { role: 'user', content: 'c' }] }), RangeError);
      t.throws(() => model.generate({ messages: [{ role: 'user', content: 'a' }, { role: 'system', content: 'b' }] }), RangeError);
      t.throws(() => model.generate({ messages: [] }), TypeError);
      t.throws(() => model.generate({ prompt: '' }), RangeError);
      t.throws(() => model.generate({ prompt: 3 as never }), TypeError);
      t.throws(() => model.generate({ prompt: 'a', system: 'x', messages: undefined, cache: 'yes' as never }), TypeError);
      await model.dispose();
    });

    t.test('maxTokens and sampling per generation', async (t) => {
      const model = await load(version);
      const byDefault = await model.generate({ prompt: PROMPT }).result;
      t.equal(byDefault.tokens.length, 6, 'the load maxNewTokens');
      t.equal(byDefault.finishReason, 'length');
      if (version === '1.3.0') {
        const three = await model.generate({ prompt: PROMPT, maxTokens: 3, sampling: { temperature: 0.125, topK: 5 } }).result;
        t.equal(three.tokens.length, 3);
        t.match(log.last('rkllm_run').infer, { max_new_tokens: 3, sampling: { temperature: 0.125, top_k: 5 } });
        const natural = await model.generate({ prompt: PROMPT, maxTokens: 100 }).result;
        t.equal(natural.tokens.length, 24, 'the fake ends its answer after 24 tokens');
        t.equal(natural.finishReason, 'eog');
      } else {
        t.throws(() => model.generate({ prompt: PROMPT, maxTokens: 3 }), RangeError, '1.2.x fixes the limit at load');
        t.equal((await model.generate({ prompt: PROMPT, maxTokens: 6 }).result).tokens.length, 6, 'the load value is accepted');
        t.throws(() => model.generate({ prompt: PROMPT, sampling: { topK: 2 } }), RangeError);
      }
      t.throws(() => model.generate({ prompt: PROMPT, maxTokens: 0 }), RangeError);
      await model.dispose();
    });

    t.test('abort through the signal: E_ABORTED in result and stream; the model stays usable', async (t) => {
      const model = await load(version, { maxNewTokens: 400, ignoreEosToken: version === '1.3.0' ? true : undefined });
      process.env.FAKE_RKLLM_TOKEN_US = '10000';
      const controller = new AbortController();
      let count = 0;
      const generation = model.generate({ system: SYSTEM, prompt: PROMPT, signal: controller.signal, onToken: () => ++count === 3 && controller.abort() });
      const streamed: string[] = [];
      const streamErr = await (async () => {
        for await (const chunk of generation) streamed.push(chunk);
      })().catch((e: unknown) => e as KvstashError);
      delete process.env.FAKE_RKLLM_TOKEN_US;
      t.equal(streamErr.code, 'E_ABORTED', 'the stream ends with the error');
      t.ok(streamed.length >= 3 && streamed.length < 24, `${streamed.length} chunks came before it`);
      await t.rejects(generation.result, { code: 'E_ABORTED' });
      const controller2 = new AbortController();
      controller2.abort();
      await t.rejects(model.generate({ prompt: PROMPT, signal: controller2.signal }).result, { code: 'E_ABORTED' }, 'an aborted signal never starts');
      const next = await model.generate({ system: SYSTEM, prompt: PROMPT }).result;
      t.equal(next.systemPromptCache, 'resident');
      t.ok(next.text.length > 0);
      await model.dispose();
      t.equal(log.live(), 0);
    });

    t.test('dispose during a generation: E_DISPOSED, queued ones too, no handle left', async (t) => {
      const model = await load(version, { maxNewTokens: 400 });
      process.env.FAKE_RKLLM_TOKEN_US = '10000';
      let chunks = 0;
      const running = model.generate({ prompt: PROMPT, onToken: () => chunks++ });
      const queued = model.generate({ prompt: 'queued' });
      while (chunks < 2) await new Promise((resolve) => setTimeout(resolve, 2));
      const disposed = model.dispose();
      t.equal(model.isDisposed, true);
      await t.rejects(running.result, { code: 'E_DISPOSED' });
      await t.rejects(queued.result, { code: 'E_DISPOSED' });
      await disposed;
      delete process.env.FAKE_RKLLM_TOKEN_US;
      t.equal(log.live(), 0, 'the handle was destroyed');
      t.equal(log.calls('rkllm_run').length, 1, 'the queued generation never reached the runtime');
      const late = model.generate({ prompt: PROMPT });
      await t.rejects(late.result, { code: 'E_DISPOSED' });
      await t.rejects((async () => {
        for await (const _ of late) void _;
      })(), { code: 'E_DISPOSED' });
      await model.dispose();
    });

    t.test('cache problems cost only the speed-up: reported, then a full prefill', async (t) => {
      const cacheDir = path.join(root, `problems-${version}`);
      const problems: RkllmCacheProblem[] = [];
      const model = await load(version, { cacheDir });
      model.on('problem', (p: RkllmCacheProblem) => problems.push(p));
      const refused = await failing('save_prompt_cache', () => model.generate({ system: SYSTEM, prompt: PROMPT }).result);
      t.equal(refused.systemPromptCache, 'failed');
      t.equal(problems.length, 1);
      t.match(problems[0]!.message, /wrote no prompt cache/);
      t.equal(refused.prefillTokens, bytes(rendered(SYSTEM)) + userPart(PROMPT), 'full prefill');
      t.same(cacheFiles(cacheDir), [], 'no temporary file left behind');
      await model.dispose();

      // A cache the runtime refuses to load is removed, so the next start makes it again.
      const maker = await load(version, { cacheDir });
      const made = await maker.generate({ system: SYSTEM, prompt: PROMPT }).result;
      t.equal(made.systemPromptCache, 'created');
      await maker.dispose();
      const loader = await load(version, { cacheDir });
      loader.on('problem', (p: RkllmCacheProblem) => problems.push(p));
      const loadFailed = await failing('load_prompt_cache', () => loader.generate({ system: SYSTEM, prompt: PROMPT }).result);
      t.equal(loadFailed.systemPromptCache, 'failed');
      t.match(problems[1], { code: 'E_RKLLM_CALL', message: /rkllm_load_prompt_cache returned status -7/ });
      t.equal(loadFailed.text, made.text, 'the answer is the same');
      t.equal(loadFailed.prefillTokens, bytes(rendered(SYSTEM)) + userPart(PROMPT));
      t.same(cacheFiles(cacheDir), [], 'the refused cache was removed');
      await loader.dispose();

      // One flipped payload byte: the entry fails its checksum, is reported, never reaches the
      // runtime, and is made again from a full prefill of the system block; same answer.
      const first = await load(version, { cacheDir });
      const original = await first.generate({ system: SYSTEM, prompt: PROMPT }).result;
      await first.dispose();
      const file = entryFile(cacheDir);
      const { payloadOffset } = await readEntryFile(file);
      const damaged = fs.readFileSync(file);
      damaged[payloadOffset + 12] ^= 0x01; // the first token of the fake's cache file
      fs.writeFileSync(file, damaged);
      t.same(await new PromptCache({ dir: cacheDir }).verify().then((r) => r.corrupt.map((c) => c.path)), [file], 'verify() finds it');
      const second = await load(version, { cacheDir });
      second.on('problem', (p: RkllmCacheProblem) => problems.push(p));
      log.clear();
      const remade = await second.generate({ system: SYSTEM, prompt: PROMPT }).result;
      t.equal(remade.systemPromptCache, 'created', 'made again');
      t.match(problems[2], { code: 'E_CACHE_CORRUPT', message: /checksum/, path: file });
      t.equal(problems.length, 3, 'one problem reported');
      t.same(log.sequence(), [
        'rkllm_set_chat_template',
        'rkllm_run', // the system block, from scratch
        'rkllm_run:end',
        'rkllm_set_chat_template',
        'rkllm_load_prompt_cache', // the new cache only
        'rkllm_run',
        'rkllm_run:end',
      ]);
      t.match(log.calls('rkllm_run:end')[0], { prefill_tokens: bytes(rendered(SYSTEM)), cached_tokens: 0 }, 'a full prefill of the system block');
      t.equal(remade.text, original.text, 'the output is unchanged');
      t.equal(remade.prefillTokens, userPart(PROMPT));
      await second.dispose();
      t.same(await new PromptCache({ dir: cacheDir }).verify(), { ok: 1, corrupt: [] }, 'the new entry is sound');

      // PromptCache.delete(label) removes it; the next start makes it again.
      const label = systemPromptCacheLabel(rendered(SYSTEM));
      t.equal(await new PromptCache({ dir: cacheDir }).delete(label), 1);
      t.same(cacheFiles(cacheDir), [], 'deleted');
      const third = await load(version, { cacheDir });
      t.equal((await third.generate({ system: SYSTEM, prompt: PROMPT }).result).systemPromptCache, 'created');
      await third.dispose();
      // Another model file (same folder name): another identity, so the cache is not used.
      const otherModel = fakeModelFile(path.join(root, 'elsewhere'), 'qwen-fake');
      fs.appendFileSync(otherModel, 'different weights');
      const stranger = await loadRkllmModel(otherModel, { libraryPath: fakeRuntimeLibrary(version), runtimeVersion: version, maxNewTokens: 6, cacheDir });
      t.equal((await stranger.generate({ system: SYSTEM, prompt: PROMPT }).result).systemPromptCache, 'created', 'never another model’s cache');
      await stranger.dispose();
      t.equal(log.live(), 0);
    });

    t.test('load and run failures: coded errors, no handle left', async (t) => {
      const missing = await loadRkllmModel(modelPath, { libraryPath: path.join(root, 'none', 'librkllmrt.so'), runtimeVersion: version }).catch((e: unknown) => e as KvstashError);
      t.equal(missing.code, 'E_RKLLM_UNAVAILABLE');
      const noSymbol = await loadRkllmModel(modelPath, { libraryPath: fakeRuntimeLibrary(version, { omit: 'rkllm_set_chat_template' }), runtimeVersion: version }).catch((e: unknown) => e as KvstashError);
      t.equal(noSymbol.code, 'E_RKLLM_UNAVAILABLE');
      t.match(noSymbol.message, /rkllm_set_chat_template/);
      const initFailed = await failing('init', () => load(version)).catch((e: unknown) => e as KvstashError);
      t.equal(initFailed.code, 'E_RKLLM_CALL');
      t.match(initFailed.message, /rkllm_init returned status -7/);
      t.equal(log.live(), 0, 'a failed load leaves no handle');
      await t.rejects(loadRkllmModel(path.join(root, 'no-model.rkllm'), { libraryPath: fakeRuntimeLibrary(version), runtimeVersion: version }), { code: 'E_MODEL_LOAD' });
      await t.rejects(load(version, { chatTemplate: { system: 'no placeholder', prefix: '', postfix: '' } }), TypeError);

      const model = await load(version);
      await t.rejects(failing('run', () => model.generate({ prompt: PROMPT }).result), { code: 'E_RKLLM_CALL', message: /rkllm_run returned status -7/ });
      const ok = await model.generate({ prompt: PROMPT }).result;
      t.equal(ok.tokens.length, 6, 'usable after a failed run');
      await model.dispose();
      t.equal(log.live(), 0);
    });
  });
}
