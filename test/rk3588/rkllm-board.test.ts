// The system-prompt cache against the real RKLLM runtime, on a board. Needs an .rkllm model
// (KVSTASH_RKLLM_MODEL) and librkllmrt.so (RKLLM_LIB_PATH or the system library path);
// KVSTASH_RKLLM_VERSION is '1.3.0' (default) or '1.2.1'. Elsewhere the same behaviour is covered
// against the fake runtime by test/rkllm-model.test.ts.
import path from 'node:path';
import t from 'tap';
import { loadRkllmModel, type RkllmRuntimeVersion } from '../../lib/index.js';

const modelPath = process.env.KVSTASH_RKLLM_MODEL;

if (!modelPath) {
  t.plan(0, 'needs a board: set KVSTASH_RKLLM_MODEL to an .rkllm model (and RKLLM_LIB_PATH if librkllmrt.so is not installed)');
} else {
  t.test('the system prompt is prefilled once, then loaded from its cache', async (t) => {
    const options = {
      runtimeVersion: (process.env.KVSTASH_RKLLM_VERSION ?? '1.3.0') as RkllmRuntimeVersion,
      cacheDir: path.join(t.testdir(), 'cache'),
      maxContextLen: 2048,
      maxNewTokens: 16,
      topK: 1,
    };
    const system = 'You are a helpful assistant. '.repeat(20).trim();
    const prompt = 'Name one planet.';
    const model = await loadRkllmModel(modelPath, options);
    const cold = await model.generate({ system, prompt, cache: false }).result;
    const created = await model.generate({ system, prompt }).result;
    const resident = await model.generate({ system, prompt }).result;
    await model.dispose();
    const restarted = await loadRkllmModel(modelPath, options);
    const loaded = await restarted.generate({ system, prompt }).result;
    await restarted.dispose();

    t.equal(created.systemPromptCache, 'created');
    t.equal(resident.systemPromptCache, 'resident');
    t.equal(loaded.systemPromptCache, 'loaded');
    for (const [label, r] of Object.entries({ cold, created, resident, loaded })) {
      t.comment(`${label}: prefill ${r.prefillTokens} tokens in ${r.prefillMs.toFixed(0)} ms, ttft ${r.ttftMs?.toFixed(0)} ms: ${JSON.stringify(r.text)}`);
    }
    // topK 1 is greedy: an answer from a cached system prompt is the cold answer, word for word.
    t.equal(created.text, cold.text, 'the answer that created the cache is the cold one');
    t.equal(resident.text, cold.text, 'the answer from the resident cache is the cold one');
    t.equal(loaded.text, cold.text, 'the answer from the loaded cache is the cold one');
    t.ok(resident.prefillTokens < cold.prefillTokens, 'the resident cache saved prefill');
    t.ok(loaded.prefillTokens < cold.prefillTokens, 'the loaded cache saved prefill');
  });
}
