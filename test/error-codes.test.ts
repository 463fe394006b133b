// The error codes that only a failure inside llama.cpp or the loader produces, each produced for
// real: the code, a message that says what to do, and a process that lives on. Codes that cannot
// happen through the public API are listed with the reason in the README ("Error codes").
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { PACKAGE_ROOT } from '../lib/binding.js';
import { KvstashError, loadModel, PromptCache, quantizeModel, type Model } from '../lib/index.js';
import { promptTokens, tinyModel } from './helpers/fixtures.js';

let model: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

async function codeOf(work: Promise<unknown>): Promise<KvstashError> {
  const err = await work.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof KvstashError)) throw new Error(`expected a KvstashError, got ${String(err)}`);
  return err;
}

t.test('E_CONTEXT_CREATE: options llama.cpp refuses (a quantized K cache whose block does not divide the head size)', async (t) => {
  // The tiny model's attention heads are 16 wide; q4_0 packs K in blocks of 32, so llama.cpp
  // cannot lay the K cache out and refuses the context.
  t.equal(model.info.embeddingSize / model.info.heads, 16, 'heads are 16 values wide');
  const err = await codeOf(model.createContext({ contextSize: 256, kvType: 'q4_0', flashAttention: 'on' }));
  t.equal(err.code, 'E_CONTEXT_CREATE');
  t.match(err.message, /could not create the context/);
  const ok = await model.createContext({ contextSize: 256, kvType: 'f16', flashAttention: 'on' });
  t.equal(ok.info.contextSize, 256, 'the same context with an f16 K cache is created');
  await ok.dispose();
});

t.test('E_STATE_SAVE: a state file that cannot be written, a save of tokens the sequence does not hold', async (t) => {
  const context = await model.createContext({ contextSize: 256 });
  const tokens = promptTokens(model, 10, 3);
  await context.decode(tokens);
  const missing = path.join(t.testdir(), 'no-such-directory', 'state.bin');
  const err = await codeOf(context.saveState(missing));
  t.equal(err.code, 'E_STATE_SAVE');
  t.match(err.message, /state\.bin/);
  const cache = new PromptCache({ dir: null });
  const mismatch = await codeOf(cache.save(context, promptTokens(model, 20, 3)));
  t.equal(mismatch.code, 'E_STATE_SAVE');
  t.same(context.memory.range(0), { min: 0, max: 9 }, 'the sequence is untouched');
  await context.dispose();
});

t.test('E_QUANTIZE: llama.cpp cannot write the quantized model', async (t) => {
  const missing = path.join(t.testdir(), 'no-such-directory', 'model-q8_0.gguf');
  const err = await codeOf(quantizeModel(await tinyModel(), missing, 'q8_0'));
  t.equal(err.code, 'E_QUANTIZE');
  t.match(err.message, /could not quantize/);
  t.notOk(fs.existsSync(path.dirname(missing)), 'nothing was created');
});

t.test('E_NATIVE_UNAVAILABLE: a package without a usable binary says what it tried', async (t) => {
  // A copy of the package's TypeScript with neither prebuilds/ nor build/: exactly what a user
  // gets when the install could not build or find a binary.
  const root = t.testdir();
  fs.cpSync(path.join(PACKAGE_ROOT, 'lib'), path.join(root, 'lib'), { recursive: true });
  fs.copyFileSync(path.join(PACKAGE_ROOT, 'package.json'), path.join(root, 'package.json'));
  fs.symlinkSync(path.join(PACKAGE_ROOT, 'node_modules'), path.join(root, 'node_modules'));
  const script = `
    const { native } = require(${JSON.stringify(path.join(root, 'lib', 'binding.ts'))});
    try { native(); process.stdout.write('loaded'); }
    catch (err) { process.stdout.write(JSON.stringify({ code: err.code, name: err.name, message: err.message })); }
  `;
  const child = spawnSync(process.execPath, [...process.execArgv, '-e', script], { encoding: 'utf8', timeout: 60_000 });
  t.equal(child.status, 0, `the child ran (stderr: ${child.stderr.slice(-300)})`);
  const result = JSON.parse(child.stdout) as { code: string; name: string; message: string };
  t.equal(result.code, 'E_NATIVE_UNAVAILABLE');
  t.equal(result.name, 'KvstashError');
  t.match(result.message, /no prebuilt binary for/);
  t.match(result.message, /npm run build:native/, 'says how to fix it');
});
