// RkllmRuntime against the fake librkllmrt.so, for both declared runtime versions: every RKLLM
// function kvstash calls receives exactly the structs it should (read back from the fake's call
// log), missing libraries/symbols and failing calls become coded errors, abort and dispose stop a
// running run without crashing, and no RKLLM handle outlives its runtime.
//
// Struct layouts: binding/rkllm/RkllmAbi.h pins every size and offset with static_asserts, so the
// addon does not compile with a wrong declaration (the arm64 cross build compiles them too); the
// fake declares the same ABI independently in C, so a disagreement shows up as wrong values below.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { KvstashError, RkllmRuntime } from '../lib/index.js';
import { FAKE_VERSIONS, FakeLog, failing, fakeModelFile, fakeRuntimeLibrary, ticksDuring, type FakeVersion } from './helpers/fake-rkllm.js';

const root = t.testdir();
const log = new FakeLog(path.join(root, 'fake-calls.jsonl'));
const modelPath = fakeModelFile(root);

function open(version: FakeVersion, params: Parameters<typeof RkllmRuntime.open>[1] = {}): Promise<RkllmRuntime> {
  return RkllmRuntime.open(modelPath, { libraryPath: fakeRuntimeLibrary(version), runtimeVersion: version, ...params });
}

/** Slows the fake down so a run is still going when the test acts on it. */
async function slowly<T>(work: () => Promise<T>): Promise<T> {
  process.env.FAKE_RKLLM_TOKEN_US = '20000';
  try {
    return await work();
  } finally {
    delete process.env.FAKE_RKLLM_TOKEN_US;
  }
}

async function waitUntil(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

t.test('missing library, missing symbol: E_RKLLM_UNAVAILABLE that says what and how to fix it', async (t) => {
  const missing = path.join(root, 'nowhere', 'librkllmrt.so');
  const err = await RkllmRuntime.open(modelPath, { libraryPath: missing }).catch((e: unknown) => e);
  t.type(err, KvstashError);
  t.equal((err as KvstashError).code, 'E_RKLLM_UNAVAILABLE');
  t.match((err as Error).message, missing, 'names the path tried');
  t.match((err as Error).message, /libraryPath.*RKLLM_LIB_PATH/s, 'says how to fix it');

  const saved = process.env.RKLLM_LIB_PATH;
  try {
    process.env.RKLLM_LIB_PATH = path.join(root, 'from-env', 'librkllmrt.so');
    const fromEnv = await RkllmRuntime.open(modelPath).catch((e: unknown) => e as Error);
    t.match(fromEnv.message, /from-env.*RKLLM_LIB_PATH environment variable/s, 'RKLLM_LIB_PATH is used when no option is given');
    delete process.env.RKLLM_LIB_PATH;
    const fromSystem = await RkllmRuntime.open(modelPath).catch((e: unknown) => e as KvstashError);
    t.equal(fromSystem.code, 'E_RKLLM_UNAVAILABLE');
    t.match(fromSystem.message, /'librkllmrt\.so' \(the system library search path/, 'else the system search path');
  } finally {
    if (saved === undefined) delete process.env.RKLLM_LIB_PATH;
    else process.env.RKLLM_LIB_PATH = saved;
  }

  for (const version of FAKE_VERSIONS) {
    for (const symbol of ['rkllm_abort', 'rkllm_get_kv_cache_size', 'rkllm_init']) {
      const library = fakeRuntimeLibrary(version, { omit: symbol });
      const e = await RkllmRuntime.open(modelPath, { libraryPath: library, runtimeVersion: version }).catch((x: unknown) => x as KvstashError);
      t.equal(e.code, 'E_RKLLM_UNAVAILABLE', `${version} without ${symbol}`);
      t.match(e.message, new RegExp(`has no symbol ${symbol}\\b.*runtimeVersion`, 's'), 'names the symbol and the version option');
    }
  }
  t.equal(log.live(), 0, 'no handle was created');
  await t.rejects(RkllmRuntime.open(modelPath, { runtimeVersion: '1.1.0' as never }), RangeError, 'an undeclared version');
});

for (const version of FAKE_VERSIONS) {
  const v130 = version === '1.3.0';

  t.test(`runtime ${version}`, async (t) => {
    t.beforeEach(() => log.clear());

    t.test('init passes every RKLLMParam field; the rest keep rkllm_createDefaultParam values', async (t) => {
      const params = {
        maxContextLen: 1024,
        maxNewTokens: 7,
        topK: 3,
        nKeep: 16,
        topP: 0.5,
        temperature: 0.25,
        repeatPenalty: 1.5,
        frequencyPenalty: 0.125,
        presencePenalty: -0.25,
        mirostat: 2,
        mirostatTau: 4.5,
        mirostatEta: 0.75,
        skipSpecialToken: false,
        ...(v130 ? { ignoreEosToken: true } : { imgStart: '<img>', imgEnd: '</img>', imgContent: '<image_pad>' }),
        baseDomainId: 2,
        embedFlash: true,
        enabledCpusNum: 3,
        enabledCpusMask: 0x70,
        nBatch: 2,
        useCrossAttn: true,
      };
      const runtime = await open(version, params);
      t.equal(runtime.version, version);
      t.same(runtime.params, { ...params, modelPath, isAsync: false }, 'params() reports what the handle was made with');
      const init = log.last('rkllm_init');
      t.equal(init.status, 0);
      t.same(init.param, {
        model_path: modelPath,
        max_context_len: 1024,
        max_new_tokens: 7,
        top_k: 3,
        n_keep: 16,
        top_p: 0.5,
        temperature: 0.25,
        repeat_penalty: 1.5,
        frequency_penalty: 0.125,
        presence_penalty: -0.25,
        mirostat: 2,
        mirostat_tau: 4.5,
        mirostat_eta: 0.75,
        skip_special_token: false,
        ...(v130 ? { ignore_eos_token: true } : { img_start: '<img>', img_end: '</img>', img_content: '<image_pad>' }),
        is_async: false,
        extend: { base_domain_id: 2, embed_flash: 1, enabled_cpus_num: 3, enabled_cpus_mask: 0x70, n_batch: 2, use_cross_attn: 1, reserved_zero: true },
      });
      t.same(init.callbacks, v130 ? { result: true, result_userdata: true, tokenizer: false, embed: false } : { result: true });
      t.equal(log.live(), 1);
      await runtime.dispose();

      log.clear();
      const defaults = await open(version);
      const param = log.last('rkllm_init').param as Record<string, unknown>;
      t.match(param, { max_context_len: 512, max_new_tokens: -1, top_k: 1, skip_special_token: true, is_async: false }, 'the fake defaults');
      t.match(param.extend, { enabled_cpus_num: 4, enabled_cpus_mask: 0xf0, n_batch: 1 });
      if (!v130) t.match(param, { img_start: null, img_end: null, img_content: null }, 'NULL pointers stay NULL');
      await defaults.dispose();
      t.equal(log.live(), 0, 'dispose destroyed the handle');
      t.same(log.sequence(), ['rkllm_init', 'rkllm_destroy']);
    });

    t.test('run: every RKLLMInput/RKLLMInferParam field as given, text streamed in order, perf stats', async (t) => {
      const runtime = await open(version, { maxNewTokens: 9 });
      const lora = path.join(root, 'adapter.rkllm');
      fs.writeFileSync(lora, 'lora');
      await runtime.loadLora({ path: lora, name: 'style', scale: 0.5 });
      t.match(log.last('rkllm_load_lora'), { path: lora, name: 'style', scale: 0.5, status: 0 });

      const cacheFile = path.join(root, `saved-${version}.prompt-cache`);
      const streamed: Array<[string, number]> = [];
      const result = await runtime.run({
        prompt: 'Why is the sky blue?',
        role: 'tool',
        enableThinking: true,
        keepHistory: true,
        loraName: 'style',
        savePromptCache: cacheFile,
        ...(v130 ? { maxNewTokens: 5, sampling: { topK: 40, temperature: 0.5 } } : {}),
        onToken: (text, id) => streamed.push([text, id]),
      });
      const run = log.last('rkllm_run');
      t.same(run.input, { role: 'tool', enable_thinking: true, input_type: 0, prompt: 'Why is the sky blue?' });
      t.same(run.infer, {
        mode: 0,
        lora: 'style',
        prompt_cache: { save: 1, path: cacheFile },
        ...(v130
          ? {
              // Fields left out of `sampling` keep the init values.
              sampling: { top_k: 40, top_p: 0.899999976, temperature: 0.5, repeat_penalty: 1.10000002, frequency_penalty: 0, presence_penalty: 0, mirostat: 0, mirostat_tau: 5, mirostat_eta: 0.100000001 },
              max_new_tokens: 5,
            }
          : {}),
        keep_history: 1,
      });
      t.equal(run.userdata, true, 'the run passes its userdata');
      const generated = v130 ? 5 : 9;
      t.equal(result.tokenIds.length, generated, 'max_new_tokens bounds the run');
      t.same(streamed.map(([text]) => text), result.chunks, 'every chunk streamed, in order, before run() resolved');
      t.same(streamed.map(([, id]) => id), [...result.tokenIds]);
      t.equal(result.text, result.chunks.join(''));
      const end = log.last('rkllm_run:end');
      t.match(result.perf, { prefillTokens: end.prefill_tokens, generateTokens: generated });
      t.ok(result.perf.prefillMs > 0 && result.perf.generateMs > 0 && result.perf.memoryMb > 0, 'times and memory reach JS');
      t.ok(fs.statSync(cacheFile).size > 12, 'prompt_cache_params made the runtime write the cache');
      t.same(await runtime.kvCacheSize(), [(end.prompt_tokens as number) + generated], 'keep_history kept the turn');

      // Defaults: role user, no thinking, no history, generate mode, no lora, no cache, no sampling.
      await runtime.run({ prompt: 'again' });
      t.same(log.last('rkllm_run').infer, { mode: 0, lora: null, prompt_cache: null, ...(v130 ? { sampling: null, max_new_tokens: 0 } : {}), keep_history: 0 });
      t.match(log.last('rkllm_run').input, { role: 'user', enable_thinking: false });
      t.equal(log.last('rkllm_run:end').history_tokens, end.prompt_tokens as number + generated, 'the kept history was used');
      t.same(await runtime.kvCacheSize(), [0], 'keep_history 0 leaves nothing');
      await runtime.dispose();
    });

    t.test('token and embedding input; last-hidden-layer and logits modes', async (t) => {
      const runtime = await open(version, { maxNewTokens: 4 });
      const result = await runtime.run({ tokens: [5, 6, 7, 300] });
      t.same(log.last('rkllm_run').input, { role: 'user', enable_thinking: false, input_type: 1, n_tokens: 4, input_ids: [5, 6, 7, 300] });
      t.equal(result.perf.prefillTokens, 4);

      const embedding = new Float32Array(3 * 8).map((_, i) => i / 10);
      await runtime.run({ embedding, embeddingTokens: 3 });
      t.same(log.last('rkllm_run').input, { role: 'user', enable_thinking: false, input_type: 2, n_tokens: 3, embed_first: 0 });

      const hidden = await runtime.run({ prompt: 'hi', mode: 'lastHiddenLayer' });
      t.equal(log.last('rkllm_run').infer && (log.last('rkllm_run').infer as { mode: number }).mode, 1);
      t.equal(hidden.tokenIds.length, 0, 'nothing generated');
      t.match(hidden.hiddenStates, { embdSize: 8, tokens: 1 });
      t.equal(hidden.hiddenStates!.data.length, 8);

      const logits = await runtime.run({ prompt: 'hi', mode: 'logits' });
      t.equal((log.last('rkllm_run').infer as { mode: number }).mode, 2);
      t.match(logits.logits, { vocabSize: 256, tokens: 1 });
      const data = logits.logits!.data;
      t.equal(data.indexOf(Math.max(...data)), ('</user><assistant>'.charCodeAt(17) + 1) % 256, 'the fake logits, copied out of the callback');
      await runtime.dispose();
    });

    t.test('chat template, function tools, KV cache clearing and size, prompt caches', async (t) => {
      const runtime = await open(version, { maxNewTokens: 3 });
      await runtime.setChatTemplate('<sys>be brief</sys>', '<u>', '</u><a>');
      t.match(log.last('rkllm_set_chat_template'), { system_prompt: '<sys>be brief</sys>', prompt_prefix: '<u>', prompt_postfix: '</u><a>', status: 0 });
      const tools = [{ name: 'weather', parameters: { city: 'string' } }];
      await runtime.setFunctionTools('you may call tools', tools, '<tool_response>');
      t.match(log.last('rkllm_set_function_tools'), { system_prompt: 'you may call tools', tools: JSON.stringify(tools), tool_response_str: '<tool_response>' });
      await t.rejects(runtime.setFunctionTools('s', '{not json', 'r'), SyntaxError, 'tools text must be JSON');

      await runtime.run({ prompt: 'abc', keepHistory: true });
      const held = (await runtime.kvCacheSize())[0]!;
      t.equal(held, '<sys>be brief</sys><u>abc</u><a>'.length + 3);
      await runtime.clearKvCache({ start: [2], end: [5] });
      t.match(log.last('rkllm_clear_kv_cache'), { keep_system_prompt: 0, start_pos: [2], end_pos: [5], status: 0 });
      t.same(await runtime.kvCacheSize(), [held - 3]);
      await runtime.clearKvCache({ keepSystemPrompt: true });
      t.match(log.last('rkllm_clear_kv_cache'), { keep_system_prompt: 1, start_pos: null, end_pos: null });
      t.same(await runtime.kvCacheSize(), ['<sys>be brief</sys>'.length], 'the system prompt was kept');
      await runtime.clearKvCache();
      t.same(await runtime.kvCacheSize(), [0]);
      await t.rejects(runtime.clearKvCache({ start: [1] }), TypeError, 'start without end');
      await t.rejects(runtime.clearKvCache({ start: [1, 2], end: [3, 4] }), RangeError, 'one range per batch (nBatch 1)');
      await t.rejects(runtime.clearKvCache({ start: [4], end: [2] }), { code: 'E_POSITION_INVALID' }, 'end before start');

      // A saved prompt cache, loaded again: only the uncached suffix is prefilled.
      const file = path.join(root, `chat-${version}.prompt-cache`);
      const cold = await runtime.run({ prompt: 'question one', savePromptCache: file });
      const coldPrefill = log.last('rkllm_run:end').prefill_tokens as number;
      await runtime.loadPromptCache(file);
      t.match(log.last('rkllm_load_prompt_cache'), { path: file, tokens: coldPrefill, status: 0 });
      const warm = await runtime.run({ prompt: 'question one' });
      t.equal(warm.perf.prefillTokens, 1, 'the whole prompt was cached (the last token is always evaluated)');
      t.equal(warm.text, cold.text, 'restoring gives what recomputing gave');
      const other = await runtime.run({ prompt: 'question two' });
      t.equal(other.perf.prefillTokens, coldPrefill - '<sys>be brief</sys><u>question '.length, 'the common prefix is reused');
      await runtime.releasePromptCache();
      t.match(log.last('rkllm_release_prompt_cache'), { status: 0 });
      const released = await runtime.run({ prompt: 'question one' });
      t.equal(released.perf.prefillTokens, coldPrefill, 'after release: a full prefill');
      await runtime.dispose();
    });

    t.test('abort() during a run: E_ABORTED, the runtime stays usable', async (t) => {
      const runtime = await open(version, { maxNewTokens: 200 });
      const chunks: string[] = [];
      const running = slowly(() => runtime.run({ prompt: 'long answer please', onToken: (c) => chunks.push(c) }));
      await waitUntil(() => chunks.length >= 2, 'two chunks');
      t.equal(runtime.isRunning(), true, 'rkllm_is_running says running (normalised for this version)');
      runtime.abort();
      const err = await running.catch((e: unknown) => e as KvstashError);
      t.equal(err.code, 'E_ABORTED');
      t.match(log.last('rkllm_abort'), { was_running: true, status: 0 });
      const end = log.last('rkllm_run:end');
      t.ok(end.aborted || end.paused, 'the fake saw rkllm_abort, or the callback asked it to stop');
      t.ok((log.last('rkllm_run:end').generated as number) < 200, 'the run stopped early');
      t.equal(runtime.isRunning(), false);
      runtime.abort();
      t.pass('abort() with nothing running is a no-op');
      const after = await runtime.run({ prompt: 'short' });
      t.ok(after.text.length > 0, 'the next run works');

      const controller = new AbortController();
      const bySignal = slowly(() => runtime.run({ prompt: 'long answer please', signal: controller.signal, onToken: () => controller.abort(new Error('enough')) }));
      const e2 = await bySignal.catch((e: unknown) => e as KvstashError);
      t.equal(e2.code, 'E_ABORTED');
      t.match(e2.message, /enough/, 'the signal reason is in the message');
      await t.rejects(runtime.run({ prompt: 'x', signal: controller.signal }), { code: 'E_ABORTED' }, 'an aborted signal never starts a run');
      await runtime.dispose();
      t.equal(log.live(), 0);
    });

    t.test('dispose() during a run: the run rejects E_DISPOSED, dispose waits for it, no handle is left', async (t) => {
      const runtime = await open(version, { maxNewTokens: 500 });
      let chunks = 0;
      const running = slowly(() => runtime.run({ prompt: 'long answer please', onToken: () => chunks++ }));
      const queued = runtime.run({ prompt: 'queued' });
      // It rejects as soon as dispose() is called: the handler must be there before.
      const queuedRejects = t.rejects(queued, { code: 'E_DISPOSED' }, 'a queued run never starts');
      await waitUntil(() => chunks >= 1, 'the first chunk');
      const disposed = runtime.dispose();
      t.equal(runtime.isDisposed, true);
      await t.rejects(running, { code: 'E_DISPOSED' });
      await queuedRejects;
      await disposed;
      const destroy = log.last('rkllm_destroy');
      t.equal(destroy.status, 0);
      t.notOk(destroy.while_running, 'rkllm_destroy came after the run returned');
      t.equal(log.live(), 0, 'no leaked handle');
      const seq = log.sequence();
      t.ok(seq.indexOf('rkllm_run:end') < seq.indexOf('rkllm_destroy'), 'the run ended before the handle was destroyed');
      t.equal(log.calls('rkllm_run').length, 1, 'the queued run never reached the runtime');

      for (const [name, call] of [
        ['run', () => runtime.run({ prompt: 'x' })],
        ['clearKvCache', () => runtime.clearKvCache()],
        ['kvCacheSize', () => runtime.kvCacheSize()],
        ['setChatTemplate', () => runtime.setChatTemplate('a', 'b', 'c')],
        ['setFunctionTools', () => runtime.setFunctionTools('a', '[]', 'c')],
        ['loadLora', () => runtime.loadLora({ path: modelPath, name: 'x' })],
        ['loadPromptCache', () => runtime.loadPromptCache(modelPath)],
        ['releasePromptCache', () => runtime.releasePromptCache()],
      ] as const) {
        await t.rejects(Promise.resolve().then(call), { code: 'E_DISPOSED' }, `${name} after dispose`);
      }
      t.equal(runtime.isRunning(), false);
      runtime.abort();
      await runtime.dispose();
      t.pass('a second dispose is a no-op');
      t.equal(log.calls('rkllm_destroy').length, 1, 'destroyed once');
    });

    t.test('failing calls: E_RKLLM_CALL naming the function and status, no leaked handle', async (t) => {
      const initErr = await failing('init', () => open(version)).catch((e: unknown) => e as KvstashError);
      t.equal(initErr.code, 'E_RKLLM_CALL');
      t.match(initErr.message, /rkllm_init returned status -7/);
      t.equal(log.live(), 0, 'a failed init leaves no handle');
      await t.rejects(RkllmRuntime.open(undefined as never), TypeError, 'no model path');
      const noModel = await RkllmRuntime.open(path.join(root, 'missing.rkllm'), { libraryPath: fakeRuntimeLibrary(version), runtimeVersion: version }).catch((e: unknown) => e as KvstashError);
      t.equal(noModel.code, 'E_MODEL_LOAD', 'a missing model file never reaches rkllm_init');
      t.equal(log.calls('rkllm_init').length, 1);

      const runtime = await open(version, { maxNewTokens: 4 });
      const runErr = await failing('run', () => runtime.run({ prompt: 'x' })).catch((e: unknown) => e as KvstashError);
      t.equal(runErr.code, 'E_RKLLM_CALL');
      t.match(runErr.message, /rkllm_run returned status -7/);
      const stateErr = await failing('run_state', () => runtime.run({ prompt: 'x' })).catch((e: unknown) => e as KvstashError);
      t.equal(stateErr.code, 'E_RKLLM_CALL');
      t.match(stateErr.message, /RKLLM_RUN_ERROR/, 'an error reported only through the callback is caught too');
      for (const [what, fn, call] of [
        ['load_prompt_cache', 'rkllm_load_prompt_cache', () => runtime.loadPromptCache(modelPath)],
        ['release_prompt_cache', 'rkllm_release_prompt_cache', () => runtime.releasePromptCache()],
        ['clear_kv_cache', 'rkllm_clear_kv_cache', () => runtime.clearKvCache()],
        ['get_kv_cache_size', 'rkllm_get_kv_cache_size', () => runtime.kvCacheSize()],
        ['set_chat_template', 'rkllm_set_chat_template', () => runtime.setChatTemplate('a', 'b', 'c')],
        ['set_function_tools', 'rkllm_set_function_tools', () => runtime.setFunctionTools('a', '[]', 'c')],
        ['load_lora', 'rkllm_load_lora', () => runtime.loadLora({ path: modelPath, name: 'n' })],
      ] as const) {
        const e = await failing(what, call).catch((x: unknown) => x as KvstashError);
        t.equal(e.code, 'E_RKLLM_CALL', fn);
        t.match(e.message, new RegExp(`${fn} returned status -7`));
      }
      await t.rejects(runtime.loadPromptCache(path.join(root, 'no-such.cache')), { code: 'E_STATE_LOAD' }, 'a missing cache file never reaches the runtime');
      await t.rejects(runtime.loadPromptCache(modelPath), { code: 'E_RKLLM_CALL' }, 'a file that is not a prompt cache');
      const ok = await runtime.run({ prompt: 'still fine' });
      t.equal(ok.tokenIds.length, 4, 'the runtime is usable after every failure');
      await runtime.dispose();
      t.equal(log.live(), 0);
    });

    t.test('bad arguments are refused before they reach the runtime', async (t) => {
      const runtime = await open(version);
      log.clear();
      const cases: Array<[string, () => Promise<unknown>, unknown]> = [
        ['no input', () => runtime.run({}), TypeError],
        ['two inputs', () => runtime.run({ prompt: 'a', tokens: [1] }), TypeError],
        ['empty prompt', () => runtime.run({ prompt: '' }), RangeError],
        ['NUL in prompt', () => runtime.run({ prompt: 'a\0b' }), RangeError],
        ['negative token', () => runtime.run({ tokens: [1, -2] }), { code: 'E_TOKEN_INVALID' }],
        ['fractional token', () => runtime.run({ tokens: [1.5] }), TypeError],
        ['empty tokens', () => runtime.run({ tokens: [] }), RangeError],
        ['embedding without a count', () => runtime.run({ embedding: new Float32Array(4) }), TypeError],
        ['embedding of the wrong length', () => runtime.run({ embedding: new Float32Array(5), embeddingTokens: 2 }), RangeError],
        ['NaN in an embedding', () => runtime.run({ embedding: new Float32Array([0, NaN]), embeddingTokens: 1 }), RangeError],
        ['unknown mode', () => runtime.run({ prompt: 'a', mode: 'embed' as never }), RangeError],
        ['unknown option', () => runtime.run({ prompt: 'a', keep_history: 1 } as never), TypeError],
        ['empty role', () => runtime.run({ prompt: 'a', role: '' }), RangeError],
        ['onToken not a function', () => runtime.run({ prompt: 'a', onToken: 3 as never }), TypeError],
        ...(v130
          ? ([
              ['topP above 1', () => runtime.run({ prompt: 'a', sampling: { topP: 1.5 } }), RangeError],
              ['unknown sampling field', () => runtime.run({ prompt: 'a', sampling: { top_p: 1 } as never }), TypeError],
              ['negative maxNewTokens', () => runtime.run({ prompt: 'a', maxNewTokens: -1 }), RangeError],
            ] as Array<[string, () => Promise<unknown>, unknown]>)
          : ([
              ['sampling per run', () => runtime.run({ prompt: 'a', sampling: { topK: 1 } }), RangeError],
              ['maxNewTokens per run', () => runtime.run({ prompt: 'a', maxNewTokens: 3 }), RangeError],
            ] as Array<[string, () => Promise<unknown>, unknown]>)),
      ];
      for (const [name, call, expected] of cases) await t.rejects(call(), expected as never, name);
      t.same(log.sequence(), [], 'none of them reached the runtime');
      await runtime.dispose();

      const initCases: Array<[string, object, unknown]> = [
        ['isAsync', { isAsync: true }, RangeError],
        ['topP', { topP: 2 }, RangeError],
        ['maxContextLen 0', { maxContextLen: 0 }, RangeError],
        ['nBatch 256', { nBatch: 256 }, RangeError],
        ['mirostat 3', { mirostat: 3 }, RangeError],
        ['temperature as text', { temperature: '0.5' }, TypeError],
        [v130 ? 'imgStart on 1.3.0' : 'ignoreEosToken on 1.2.x', v130 ? { imgStart: '<img>' } : { ignoreEosToken: true }, RangeError],
      ];
      for (const [name, params, expected] of initCases) {
        log.clear();
        await t.rejects(open(version, params as never), expected as never, `init: ${name}`);
        t.same(log.calls('rkllm_init'), [], `init: ${name} never reached rkllm_init`);
      }
      t.equal(log.live(), 0);
    });

    t.test('the event loop keeps ticking during a run; queued runs never overlap', async (t) => {
      const runtime = await open(version, { maxNewTokens: 40 });
      const ticks = await ticksDuring(slowly(() => runtime.run({ prompt: 'tick tock' })));
      t.ok(ticks >= 20, `${ticks} event-loop turns during a ~800 ms run`);
      const runs = await Promise.all([1, 2, 3].map((i) => runtime.run({ prompt: `question ${i}` })));
      t.equal(runs.length, 3);
      t.notOk(log.calls('rkllm_run').some((call) => call.concurrent), 'the fake never saw two runs at once');
      await runtime.dispose();
    });
  });
}

t.test('a process that exits in the middle of a run exits at once, cleanly, and destroys the handle', async (t) => {
  const childLog = new FakeLog(path.join(root, 'child-calls.jsonl'));
  const script = `
    const { RkllmRuntime } = require(${JSON.stringify(path.resolve(__dirname, '../lib/index.ts'))});
    (async () => {
      const runtime = await RkllmRuntime.open(${JSON.stringify(modelPath)}, { libraryPath: ${JSON.stringify(fakeRuntimeLibrary('1.3.0'))}, maxNewTokens: 2000, ignoreEosToken: true });
      let exiting = false;
      void runtime.run({ prompt: 'a long one', onToken: () => { if (!exiting) { exiting = true; setTimeout(() => process.exit(7), 10); } } });
    })();
  `;
  const result = spawnSync(process.execPath, [...process.execArgv, '-e', script], {
    encoding: 'utf8',
    timeout: 60_000,
    env: { ...process.env, FAKE_RKLLM_LOG: childLog.file, FAKE_RKLLM_TOKEN_US: '5000' },
  });
  t.equal(result.signal, null, `no crash signal (stderr: ${result.stderr.slice(-300)})`);
  t.equal(result.status, 7, 'the exit code the process chose');
  const end = childLog.last('rkllm_run:end');
  t.ok(end.aborted || end.paused, 'the run was stopped, not left to generate its 2000 tokens');
  t.ok((end.generated as number) < 500, `exit did not wait for the run: ${end.generated as number} of 2000 tokens`);
  t.equal(childLog.last('rkllm_destroy').status, 0);
  t.equal(childLog.live(), 0, 'the handle was destroyed before the process ended');
  process.env.FAKE_RKLLM_LOG = log.file;
});
