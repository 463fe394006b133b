// Bad input gets a coded error (or a TypeError/RangeError for a plainly wrong argument), the
// process stays alive, and the context stays usable. llama.cpp aborts the process on some of these
// inputs, so reaching the end of this file is itself part of the assertion.
import fs from 'node:fs';
import path from 'node:path';
import t, { type Test } from 'tap';
import { KvstashError, loadModel, type Context, type Model } from '../lib/index.js';
import { largerModel, promptTokens, tinyModel } from './helpers/fixtures.js';

let model: Model;
let context: Context;
let reference: Float32Array;
const prompt: number[] = [];

t.before(async () => {
  model = await loadModel(await tinyModel());
  context = await model.createContext({ contextSize: 256, sequences: 2 });
  prompt.push(...promptTokens(model, 10, 11));
  await context.decode(prompt);
  reference = context.logits();
});
t.teardown(() => model.dispose());

/** After every refusal the context must be exactly as before and still decode. */
async function stillUsable(t: Test): Promise<void> {
  t.same(context.memory.range(0), { min: 0, max: 9 }, 'sequence 0 unchanged');
  t.same(context.memory.range(1), { min: -1, max: -1 }, 'sequence 1 unchanged');
  t.same(context.logits(), reference, 'last logits unchanged');
}

const decodeCases: Array<[string, () => Promise<unknown>, string]> = [
  ['token = vocab size', () => context.decode([model.info.vocabSize]), 'E_TOKEN_INVALID'],
  ['negative token', () => context.decode([-1]), 'E_TOKEN_INVALID'],
  ['position = context size', () => context.decode([1], { sequence: 1, start: 256 }), 'E_POSITION_INVALID'],
  ['position far past the context', () => context.decode([1], { sequence: 1, start: 1e6 }), 'E_POSITION_INVALID'],
  ['sequence = sequences', () => context.decode([1], { sequence: 2 }), 'E_SEQUENCE_INVALID'],
  ['negative sequence', () => context.decode([1], { sequence: -1 }), 'E_SEQUENCE_INVALID'],
  ['per-token sequence out of range', () => context.decode([1, 2], { sequence: [1, 5] }), 'E_SEQUENCE_INVALID'],
  ['a gap after the cells of a sequence', () => context.decode([1], { start: 20 }), 'E_POSITION_INVALID'],
  ['more tokens than the context holds', () => context.decode(new Int32Array(300).fill(5), { sequence: 1 }), 'E_POSITION_INVALID'],
];
for (const [name, run, code] of decodeCases) {
  t.test(name, async (t) => {
    const err = await run().then(() => null, (e: unknown) => e);
    t.type(err, KvstashError);
    t.equal((err as KvstashError).code, code);
    t.ok((err as Error).message.length > 20, `says why: ${(err as Error).message}`);
    await stillUsable(t);
  });
}

t.test('plainly wrong arguments are TypeError/RangeError', async (t) => {
  await t.rejects(context.decode([]), RangeError, 'empty token array');
  await t.rejects(context.decode('hello' as never), TypeError, 'a string for tokens');
  await t.rejects(context.decode([1.5]), TypeError, 'a fractional token');
  await t.rejects(context.decode([1], { logits: [3] }), RangeError, 'an output index outside the batch');
  await t.rejects(context.decode([1], { start: 1, positions: [1] }), TypeError, 'start and positions together');
  t.throws(() => context.logits(1.5), TypeError);
  await t.rejects(model.createContext({ contextSize: -4 }), RangeError);
  await t.rejects(model.createContext({ kvType: 'q3' as never }), RangeError);
  await t.rejects(model.createContext({ kvType: 'q8_0', flashAttention: 'off' }), RangeError);
  t.throws(() => context.memory.copy(0, 9), { code: 'E_SEQUENCE_INVALID' });
  t.throws(() => context.memory.range(7), { code: 'E_SEQUENCE_INVALID' });
  await stillUsable(t);
});

t.test('a context too full for a batch reports E_CONTEXT_FULL and loses nothing', async (t) => {
  const small = await model.createContext({ contextSize: 256, sequences: 2 });
  const cells = small.info.contextSize; // llama.cpp may round the size up
  await small.decode(new Int32Array(cells - 20).fill(7), { sequence: 0 });
  await t.rejects(small.decode(new Int32Array(40).fill(7), { sequence: 1 }), { code: 'E_CONTEXT_FULL' });
  t.same(small.memory.range(0), { min: 0, max: cells - 21 });
  t.same(small.memory.range(1), { min: -1, max: -1 }, 'the failed batch left no cells behind');
  await small.decode(new Int32Array(20).fill(7), { sequence: 1 });
  t.pass('and the context still decodes into the cells that are left');
  await small.dispose();
});

t.test('bad model files', async (t) => {
  const dir = t.testdir({ 'not-a-model.gguf': 'hello, I am text', 'empty.gguf': '' });
  await t.rejects(loadModel(path.join(dir, 'missing.gguf')), { code: 'E_MODEL_LOAD' });
  await t.rejects(loadModel(path.join(dir, 'not-a-model.gguf')), { code: 'E_MODEL_FORMAT' });
  await t.rejects(loadModel(path.join(dir, 'empty.gguf')), { code: 'E_MODEL_FORMAT' });
  await t.rejects(loadModel(dir), { code: 'E_MODEL_LOAD' }, 'a directory');
  const whole = fs.readFileSync(await tinyModel());
  for (const fraction of [0.001, 0.3, 0.999]) {
    const file = path.join(dir, `truncated-${fraction}.gguf`);
    fs.writeFileSync(file, whole.subarray(0, Math.floor(whole.length * fraction)));
    await t.rejects(loadModel(file), { code: 'E_MODEL_FORMAT' }, `truncated at ${fraction * 100}%`);
  }
});

t.test('bad state files and buffers', async (t) => {
  const dir = t.testdir({ 'random.state': Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7919) % 251)) });
  await t.rejects(context.loadState(path.join(dir, 'random.state'), { sequence: 1 }), { code: 'E_STATE_LOAD' });
  await t.rejects(context.loadState(path.join(dir, 'nothing-here.state'), { sequence: 1 }), { code: 'E_STATE_LOAD' });

  // A state of another model shape: same vocabulary, a different layer count.
  const other = await loadModel(await largerModel());
  const otherContext = await other.createContext({ contextSize: 256 });
  await otherContext.decode(prompt);
  const otherState = path.join(dir, 'other.state');
  await otherContext.saveState(otherState, { sequence: 0, tokens: prompt });
  const otherBytes = await otherContext.exportState({ sequence: 0 });
  await other.dispose();
  await t.rejects(context.loadState(otherState, { sequence: 1 }), { code: 'E_STATE_LOAD' }, 'a file of another shape');
  await t.rejects(context.importState(otherBytes, { sequence: 1 }), { code: 'E_STATE_LOAD' }, 'bytes of another shape');
  await t.rejects(context.importState(Buffer.alloc(0), { sequence: 1 }), { code: 'E_STATE_LOAD' }, 'no bytes');
  const own = await context.exportState({ sequence: 0 });
  await t.rejects(context.importState(own.subarray(0, own.length >> 1), { sequence: 1 }), { code: 'E_STATE_LOAD' }, 'half of a state');
  await stillUsable(t);
});

t.test('a second operation waits its turn; immediate ones refuse while busy', async (t) => {
  const busy = await model.createContext({ contextSize: 2048 });
  const order: string[] = [];
  const first = busy.decode(promptTokens(model, 600, 12), { sequence: 0 }).then(() => order.push('first'));
  const second = busy.decode(promptTokens(model, 5, 13), { sequence: 0 }).then(() => order.push('second'));
  t.equal(busy.pendingOperations, 2);
  await new Promise((resolve) => setImmediate(resolve));
  t.throws(() => busy.memory.clear(), { code: 'E_BUSY' }, 'memory edits refuse while a decode runs');
  await Promise.all([first, second]);
  t.same(order, ['first', 'second']);
  t.same(busy.memory.range(0), { min: 0, max: 604 }, 'the second continued after the first');
  await busy.dispose();
});

t.test('the process is still alive and the context decodes', async (t) => {
  await context.decode(prompt.slice(0, 1));
  t.same(context.memory.range(0), { min: 0, max: 10 });
});
