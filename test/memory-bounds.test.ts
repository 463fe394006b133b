// Numbers given to memory operations and token-taking methods: a non-integer is a TypeError, a
// number outside int32 a RangeError (never wrapped to a small one), one outside the context or the
// vocabulary a coded KvstashError. A position shift never moves a position past the context.
import t, { type Test } from 'tap';
import { KvstashError, loadModel, type Context, type Model } from '../lib/index.js';
import { promptTokens, tinyModel } from './helpers/fixtures.js';

let model: Model;
let context: Context;
let tokens: Int32Array;
const CONTEXT = 256;

t.before(async () => {
  model = await loadModel(await tinyModel());
  context = await model.createContext({ contextSize: CONTEXT, sequences: 2, threads: 1 });
  tokens = promptTokens(model, 20, 5);
});
t.teardown(() => model.dispose());

async function fill(): Promise<void> {
  await context.exclusive(() => context.memory.clear());
  await context.decode(tokens, { start: 0, logits: 'none' });
}

/** What a call must do with a bad number: the error class, or the KvstashError code. */
type Expect = typeof TypeError | typeof RangeError | string;

function expectRejected(t: Test, call: () => unknown, expect: Expect, name: string): void {
  try {
    call();
    t.fail(`${name}: accepted`);
  } catch (err) {
    if (typeof expect === 'string') t.ok(err instanceof KvstashError && err.code === expect, `${name}: ${expect} (${String(err)})`);
    else t.ok(err instanceof expect && !(err instanceof KvstashError), `${name}: ${expect.name} (${String(err)})`);
  }
}

t.test('memory.shift never moves a position past the context, nor wraps past INT32_MAX', async (t) => {
  await fill();
  for (const delta of [2 ** 31 - 1, 2 ** 31 - 20, CONTEXT - 19, CONTEXT, 1000]) {
    expectRejected(t, () => context.memory.shift(0, delta), 'E_POSITION_INVALID', `shift by ${delta}`);
    t.same(context.memory.range(0), { min: 0, max: 19 }, `shift by ${delta}: nothing moved`);
  }
  // Through the native layer directly too (its own guard).
  expectRejected(t, () => context.handle.memoryShift(0, -1, -1, 2 ** 31 - 1), 'E_POSITION_INVALID', 'native shift by 2^31-1');
  expectRejected(t, () => context.handle.memoryShift(0, -1, -1, 2 ** 32 + 5), RangeError, 'native shift by 2^32+5');
  expectRejected(t, () => context.handle.memoryShift(0, -1, -1, 0.5), RangeError, 'native shift by 0.5');
  for (const [delta, expect] of [[2 ** 31, RangeError], [2 ** 32 + 5, RangeError], [-(2 ** 31) - 1, RangeError], [1.5, TypeError], [NaN, TypeError], [Infinity, TypeError], ['5', TypeError]] as const) {
    expectRejected(t, () => context.memory.shift(0, delta as number), expect, `shift by ${String(delta)}`);
  }
  t.same(context.memory.range(0), { min: 0, max: 19 }, 'nothing moved by any refused shift');

  // Shifts that stay inside the context still work, and the sequence still decodes after them.
  context.memory.shift(0, CONTEXT - 20);
  t.same(context.memory.range(0), { min: CONTEXT - 20, max: CONTEXT - 1 }, 'a shift to the very end');
  context.memory.shift(0, -(CONTEXT - 20));
  t.same(context.memory.range(0), { min: 0, max: 19 }, 'and back');
  context.memory.shift(0, 300, 25);
  t.same(context.memory.range(0), { min: 0, max: 19 }, 'a range past every position: nothing moves');
  context.memory.shift(0, CONTEXT - 20, 10, 15);
  t.same(context.memory.range(0), { min: 0, max: CONTEXT - 6 }, 'positions [10, 15) moved to the end');
  await fill();
  context.memory.shift(0, -5);
  t.same(context.memory.range(0), { min: 0, max: 14 }, 'a shift below 0 removes those positions (a context shift)');
  context.memory.shift(0, -(2 ** 31));
  t.same(context.memory.range(0), { min: -1, max: -1 }, 'a shift by -2^31 removes every position');
  await context.decode(tokens, { start: 0 });
  t.same(context.memory.range(0), { min: 0, max: 19 }, 'decode works afterwards');
});

t.test('sequences and range bounds of every memory operation', async (t) => {
  await fill();
  const sequences: Array<[unknown, Expect]> = [
    [1.5, TypeError], [NaN, TypeError], ['0', TypeError], [null, TypeError], [-2, 'E_SEQUENCE_INVALID'], [2, 'E_SEQUENCE_INVALID'],
    [2 ** 32, 'E_SEQUENCE_INVALID'], [2 ** 32 + 1, 'E_SEQUENCE_INVALID'], [-(2 ** 31), 'E_SEQUENCE_INVALID'],
  ];
  const bounds: Array<[unknown, Expect]> = [
    [1.5, TypeError], [NaN, TypeError], ['3', TypeError], [-2, 'E_POSITION_INVALID'], [CONTEXT + 1, 'E_POSITION_INVALID'],
    [2 ** 31, 'E_POSITION_INVALID'], [2 ** 32 + 3, 'E_POSITION_INVALID'], [-(2 ** 31), 'E_POSITION_INVALID'],
  ];
  const memory = context.memory;
  for (const [value, expect] of sequences) {
    const v = value as number;
    expectRejected(t, () => memory.remove(v), expect, `remove(${String(value)})`);
    expectRejected(t, () => memory.copy(v, 1), expect, `copy(${String(value)}, 1)`);
    expectRejected(t, () => memory.copy(0, v), expect, `copy(0, ${String(value)})`);
    expectRejected(t, () => memory.keep(v), expect, `keep(${String(value)})`);
    expectRejected(t, () => memory.shift(v, 1), expect, `shift(${String(value)}, 1)`);
    expectRejected(t, () => memory.range(v), expect, `range(${String(value)})`);
  }
  for (const [value, expect] of bounds) {
    const v = value as number;
    expectRejected(t, () => memory.remove(0, v), expect, `remove(0, ${String(value)})`);
    expectRejected(t, () => memory.remove(0, 0, v), expect, `remove(0, 0, ${String(value)})`);
    expectRejected(t, () => memory.copy(0, 1, v), expect, `copy(0, 1, ${String(value)})`);
    expectRejected(t, () => memory.copy(0, 1, 0, v), expect, `copy(0, 1, 0, ${String(value)})`);
    expectRejected(t, () => memory.shift(0, 1, v), expect, `shift(0, 1, ${String(value)})`);
  }
  t.same(memory.range(0), { min: 0, max: 19 }, 'sequence 0 untouched by every refused call');
  t.same(memory.range(1), { min: -1, max: -1 }, 'sequence 1 untouched by every refused call');
  // Open bounds: undefined, -1 and Infinity.
  memory.copy(0, 1, 0, Infinity);
  t.same(memory.range(1), { min: 0, max: 19 }, 'copy with an Infinity bound');
  t.equal(memory.remove(1, 10, -1), true, 'remove with a -1 bound');
  t.same(memory.range(1), { min: 0, max: 9 }, 'removed [10, end)');
  t.equal(memory.remove(-1), true, 'remove(-1) removes every sequence');
  t.same([memory.range(0), memory.range(1)], [{ min: -1, max: -1 }, { min: -1, max: -1 }]);
});

t.test('token ids: never wrapped to another token', async (t) => {
  const vocab = model.info.vocabSize;
  const eos = model.info.specialTokens.eos ?? 0;
  const ids: Array<[unknown, Expect]> = [
    [2 ** 32 + 5, 'E_TOKEN_INVALID'], [2 ** 32 + eos, 'E_TOKEN_INVALID'], [vocab, 'E_TOKEN_INVALID'], [-1, 'E_TOKEN_INVALID'],
    [2 ** 31, 'E_TOKEN_INVALID'], [1.5, TypeError], [NaN, TypeError], ['5', TypeError],
  ];
  for (const [value, expect] of ids) {
    expectRejected(t, () => model.tokenBytes(value as number), expect, `tokenBytes(${String(value)})`);
    expectRejected(t, () => model.isEndOfGeneration(value as number), expect, `isEndOfGeneration(${String(value)})`);
  }
  const native = (model as unknown as { handle: { tokenPiece(token: number, special: boolean): Uint8Array } }).handle;
  expectRejected(t, () => native.tokenPiece(2 ** 32 + 5, false), 'E_TOKEN_INVALID', 'native tokenPiece(2^32+5)');
  expectRejected(t, () => native.tokenPiece(5.5, false), 'E_TOKEN_INVALID', 'native tokenPiece(5.5)');
  t.same(Array.from(model.tokenBytes(5)), Array.from(native.tokenPiece(5, false)), 'token 5 itself still works');

  expectRejected(t, () => model.detokenize([2 ** 32 + 5]), TypeError, 'detokenize([2^32+5])');
  expectRejected(t, () => model.detokenize([vocab]), 'E_TOKEN_INVALID', 'detokenize([vocab])');
  expectRejected(t, () => model.detokenize(new Int32Array([-1])), 'E_TOKEN_INVALID', 'detokenize([-1])');

  const sampler = model.createSampler({ repeatPenalty: 1.1 });
  expectRejected(t, () => sampler.accept([vocab]), 'E_TOKEN_INVALID', 'sampler.accept([vocab])');
  expectRejected(t, () => sampler.accept([-1]), 'E_TOKEN_INVALID', 'sampler.accept([-1])');
  expectRejected(t, () => sampler.accept([2 ** 32 + 5]), TypeError, 'sampler.accept([2^32+5])');
  const nativeSampler = (sampler as unknown as { handle: { accept(tokens: unknown): void } }).handle;
  expectRejected(t, () => nativeSampler.accept(new Float64Array([1.5])), TypeError, 'native accept(Float64Array)');
  expectRejected(t, () => nativeSampler.accept(new Int32Array([vocab])), 'E_TOKEN_INVALID', 'native accept([vocab])');
  sampler.accept([1, 2, 3]);
  await fill();
  await context.decode(tokens.subarray(0, 1), { start: 20 });
  expectRejected(t, () => sampler.sample(context, 2 ** 32 - 1), RangeError, 'sample(context, 2^32-1)');
  expectRejected(t, () => sampler.sample(context, 0.5), TypeError, 'sample(context, 0.5)');
  expectRejected(t, () => context.logits(2 ** 32 - 1), RangeError, 'logits(2^32-1)');
  expectRejected(t, () => context.handle.logits(2 ** 32 - 1), RangeError, 'native logits(2^32-1)');
  t.type(sampler.sample(context), 'number', 'sampling still works');
  sampler.dispose();
});

t.test('decode: tokens, positions, starts and sequences outside their range', async (t) => {
  await context.exclusive(() => context.memory.clear());
  const one = tokens.subarray(0, 1);
  const cases: Array<[string, () => Promise<unknown>, Expect]> = [
    ['start 2^32+5', () => context.decode(one, { start: 2 ** 32 + 5 }), RangeError],
    ['start 2^31', () => context.decode(one, { start: 2 ** 31 }), RangeError],
    ['start 1.5', () => context.decode(one, { start: 1.5 }), TypeError],
    ['start -1', () => context.decode(one, { start: -1 }), RangeError],
    ['start at the context end', () => context.decode(one, { start: CONTEXT }), 'E_POSITION_INVALID'],
    ['start 2^31-1 with two tokens', () => context.decode(tokens.subarray(0, 2), { start: 2 ** 31 - 1 }), 'E_POSITION_INVALID'],
    ['positions [2^32]', () => context.decode(one, { positions: [2 ** 32] }), TypeError],
    ['positions [-1]', () => context.decode(one, { positions: [-1] }), 'E_POSITION_INVALID'],
    ['tokens [vocab]', () => context.decode([model.info.vocabSize]), 'E_TOKEN_INVALID'],
    ['tokens [2^32+5]', () => context.decode([2 ** 32 + 5]), TypeError],
    ['sequence 2^32', () => context.decode(one, { sequence: 2 ** 32 }), 'E_SEQUENCE_INVALID'],
    ['sequence [1.5]', () => context.decode(one, { sequence: [1.5] }), TypeError],
  ];
  for (const [name, call, expect] of cases) {
    const err = await call().then(() => undefined, (e: unknown) => e);
    if (typeof expect === 'string') t.ok(err instanceof KvstashError && err.code === expect, `${name}: ${expect} (${String(err)})`);
    else t.ok(err instanceof expect && !(err instanceof KvstashError), `${name}: ${expect.name} (${String(err)})`);
  }
  t.same(context.memory.range(0), { min: -1, max: -1 }, 'nothing decoded by any refused call');
});

t.test('context options: batch, ubatch, threads, sizes', async (t) => {
  const cases: Array<[Record<string, unknown>, Expect]> = [
    [{ batchSize: 1.5 }, TypeError], [{ batchSize: 2 ** 32 + 8 }, RangeError], [{ batchSize: 0 }, RangeError],
    [{ ubatchSize: 2 ** 32 + 8 }, RangeError], [{ batchSize: 64, ubatchSize: 128 }, RangeError], [{ ubatchSize: -1 }, RangeError],
    [{ threads: 2 ** 32 + 1 }, RangeError], [{ threads: NaN }, TypeError], [{ threads: 0 }, RangeError],
    [{ contextSize: 2 ** 32 + 256 }, RangeError], [{ contextSize: '256' }, TypeError], [{ sequences: 257 }, RangeError], [{ sequences: 0.5 }, TypeError],
  ];
  for (const [options, expect] of cases) {
    const err = await model.createContext(options as never).then((c) => (void c.dispose(), undefined), (e: unknown) => e);
    t.ok(err instanceof (expect as typeof TypeError) && !(err instanceof KvstashError), `${JSON.stringify(options)}: ${(expect as typeof TypeError).name} (${String(err)})`);
  }
});
