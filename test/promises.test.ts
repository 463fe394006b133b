// "Nothing aborts the process": bad positions to the KV cache edits, bad batch/ubatch/thread counts,
// bad tokens to a sampler and to tokenBytes each get a coded error (KvstashError) or a RangeError/
// TypeError naming the argument, and the context is left exactly as it was. llama.cpp asserts on
// several of these (a GGML_ASSERT ends the process), so reaching the end of this file is part of
// the assertion too.
import t, { type Test } from 'tap';
import { KvstashError, loadModel, type Context, type Model } from '../lib/index.js';
import { bitIdentical, promptTokens, tinyModel } from './helpers/fixtures.js';

let model: Model;
let context: Context;
let reference: Float32Array;
const prompt: number[] = [];
const CONTEXT_SIZE = 256;

t.before(async () => {
  model = await loadModel(await tinyModel());
  context = await model.createContext({ contextSize: CONTEXT_SIZE, sequences: 2 });
  prompt.push(...promptTokens(model, 12, 21));
  await context.decode(prompt);
  reference = context.logits();
});
t.teardown(async () => {
  await context.dispose();
  await model.dispose();
});

/** The refusal left both sequences and the last logits as they were. */
function unchanged(t: Test, what: string): void {
  t.same(context.memory.range(0), { min: 0, max: prompt.length - 1 }, `${what}: sequence 0 unchanged`);
  t.same(context.memory.range(1), { min: -1, max: -1 }, `${what}: sequence 1 unchanged`);
  t.ok(bitIdentical(context.logits(), reference), `${what}: last logits unchanged`);
}

type Expected = { code: string } | typeof RangeError | typeof TypeError;

function refuses(t: Test, what: string, run: () => unknown, expected: Expected): void {
  let thrown: unknown;
  try {
    run();
  } catch (err) {
    thrown = err;
  }
  if (typeof expected === 'function') {
    t.type(thrown, expected, `${what}: ${expected.name}`);
  } else {
    t.type(thrown, KvstashError, `${what}: a KvstashError`);
    t.equal((thrown as KvstashError | undefined)?.code, expected.code, `${what}: ${expected.code}`);
  }
  t.ok(thrown instanceof Error && thrown.message.length > 15, `${what}: says why (${(thrown as Error | undefined)?.message})`);
  unchanged(t, what);
}

const POSITION = { code: 'E_POSITION_INVALID' };
const SEQUENCE = { code: 'E_SEQUENCE_INVALID' };
const TOKEN = { code: 'E_TOKEN_INVALID' };

t.test('bad positions to memory.remove/keep/shift/copy', async (t) => {
  const edits: Array<[string, () => unknown, Expected]> = [
    ['remove p0 = -2', () => context.memory.remove(0, -2), POSITION],
    ['remove p0 past the context', () => context.memory.remove(0, CONTEXT_SIZE + 1), POSITION],
    ['remove p1 = 2^31', () => context.memory.remove(0, 0, 2 ** 31), POSITION],
    ['remove p0 = NaN', () => context.memory.remove(0, NaN), TypeError],
    ['remove p0 = 1.5', () => context.memory.remove(0, 1.5), TypeError],
    ['remove p0 = -Infinity', () => context.memory.remove(0, -Infinity), TypeError],
    ['remove sequence 2 of 2', () => context.memory.remove(2, 0), SEQUENCE],
    ['keep sequence -2', () => context.memory.keep(-2), SEQUENCE],
    ['keep sequence 9', () => context.memory.keep(9), SEQUENCE],
    ['keep sequence 0.5', () => context.memory.keep(0.5), TypeError],
    ['shift p0 = -5', () => context.memory.shift(0, 1, -5), POSITION],
    ['shift p1 far past the context', () => context.memory.shift(0, 1, 0, 1e9), POSITION],
    ['shift by 2^31', () => context.memory.shift(0, 2 ** 31), RangeError],
    ['shift by 1.5', () => context.memory.shift(0, 1.5), TypeError],
    ['shift positions to the context end', () => context.memory.shift(0, CONTEXT_SIZE), POSITION],
    ['shift sequence -3', () => context.memory.shift(-3, 1), SEQUENCE],
    ['copy p0 = -7', () => context.memory.copy(0, 1, -7), POSITION],
    ['copy p1 past the context', () => context.memory.copy(0, 1, 0, CONTEXT_SIZE + 5), POSITION],
    ['copy to sequence 2 of 2', () => context.memory.copy(0, 2), SEQUENCE],
    ['copy from sequence -4', () => context.memory.copy(-4, 1), SEQUENCE],
    ['copy p0 = "3"', () => context.memory.copy(0, 1, '3' as unknown as number), TypeError],
  ];
  for (const [what, run, expected] of edits) refuses(t, what, run, expected);
});

t.test('bad batchSize, ubatchSize and threads', async (t) => {
  const options: Array<[string, Parameters<Model['createContext']>[0], typeof RangeError | typeof TypeError]> = [
    ['batchSize 0', { batchSize: 0 }, RangeError],
    ['batchSize -1', { batchSize: -1 }, RangeError],
    ['batchSize 2^40', { batchSize: 2 ** 40 }, RangeError],
    ['batchSize 1.5', { batchSize: 1.5 }, TypeError],
    ['batchSize NaN', { batchSize: NaN }, TypeError],
    ['ubatchSize 0', { ubatchSize: 0 }, RangeError],
    ['ubatchSize larger than batchSize', { batchSize: 64, ubatchSize: 128 }, RangeError],
    ['ubatchSize 2^31', { ubatchSize: 2 ** 31 }, RangeError],
    ['threads 0', { threads: 0 }, RangeError],
    ['threads -2', { threads: -2 }, RangeError],
    ['threads 1e6', { threads: 1e6 }, RangeError],
    ['threads "4"', { threads: '4' as unknown as number }, TypeError],
  ];
  for (const [what, option, expected] of options) {
    await t.rejects(model.createContext({ contextSize: 64, ...option }), expected, what);
  }
  unchanged(t, 'after the refused contexts');
  // The edges are accepted: the check is not stricter than its promise.
  const edge = await model.createContext({ contextSize: 64, batchSize: 1, ubatchSize: 1, threads: 1 });
  await edge.decode(prompt.slice(0, 3));
  t.same(edge.memory.range(0), { min: 0, max: 2 }, 'batchSize 1, ubatchSize 1, threads 1 decode');
  await edge.dispose();
});

t.test('bad tokens to sampler.accept and tokenBytes', async (t) => {
  const vocab = model.info.vocabSize;
  const sampler = model.createSampler({ repeatPenalty: 1.3, repeatLastN: 16 });
  const before = sampler.sample(context);
  const cases: Array<[string, () => unknown, Expected]> = [
    ['accept [-1]', () => sampler.accept([-1]), TOKEN],
    ['accept [vocab size]', () => sampler.accept([vocab]), TOKEN],
    ['accept [1, 2^31 - 1]', () => sampler.accept([1, 2 ** 31 - 1]), TOKEN],
    ['accept Int32Array [-5]', () => sampler.accept(Int32Array.of(-5)), TOKEN],
    ['accept [1.5]', () => sampler.accept([1.5]), TypeError],
    ['accept ["7"]', () => sampler.accept(['7'] as unknown as number[]), TypeError],
    ['accept 7', () => sampler.accept(7 as unknown as number[]), TypeError],
    ['tokenBytes(-1)', () => model.tokenBytes(-1), TOKEN],
    ['tokenBytes(vocab size)', () => model.tokenBytes(vocab), TOKEN],
    ['tokenBytes(2^31)', () => model.tokenBytes(2 ** 31), TOKEN],
    ['tokenBytes(0.5)', () => model.tokenBytes(0.5), TypeError],
    ['tokenBytes(NaN)', () => model.tokenBytes(NaN), TypeError],
  ];
  for (const [what, run, expected] of cases) refuses(t, what, run, expected);
  // A refused accept() added nothing to the penalty window: the sampler picks as before.
  t.equal(sampler.sample(context), before, 'the sampler was not changed by the refused tokens');
  t.ok(model.tokenBytes(vocab - 1).length >= 0, 'the last token of the vocabulary has bytes');
  sampler.dispose();
});

t.test('the process is alive and the context still decodes', async (t) => {
  await context.decode([prompt[0]!], { start: prompt.length });
  t.same(context.memory.range(0), { min: 0, max: prompt.length });
});
