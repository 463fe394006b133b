// Decoding at explicit positions, in several sequences at once, split into batches, with progress
// and cancellation.
import t from 'tap';
import { loadModel, type Model } from '../lib/index.js';
import { bitIdentical, maxAbsDiff, promptTokens, tinyModel } from './helpers/fixtures.js';

let model: Model;
t.before(async () => {
  model = await loadModel(await tinyModel());
});
t.teardown(() => model.dispose());

t.test('positions are honoured', async (t) => {
  const tokens = promptTokens(model, 40, 3);
  const at0 = await model.createContext({ contextSize: 2048 });
  await at0.decode(tokens, { start: 0 });
  const at500 = await model.createContext({ contextSize: 2048 });
  await at500.decode(tokens, { start: 500 });
  t.same(at500.memory.range(0), { min: 500, max: 539 }, 'the cells sit at the positions given');
  // RoPE makes attention depend on relative positions only, so the difference is small, but the
  // rotations are computed at other angles: identical logits would mean the start was ignored.
  t.notOk(bitIdentical(at0.logits(), at500.logits()), 'another start gives other logits');

  const explicit = await model.createContext({ contextSize: 2048 });
  await explicit.decode(tokens, { positions: Array.from({ length: 40 }, (_, i) => 500 + i) });
  t.ok(bitIdentical(explicit.logits(), at500.logits()), 'a positions array equals the same start');

  // Continuing a sequence anywhere but right after its last cell is refused before llama.cpp.
  await t.rejects(at0.decode(tokens.subarray(0, 1), { start: 41 }), { code: 'E_POSITION_INVALID' });
  await t.rejects(at0.decode(tokens.subarray(0, 1), { start: 39 }), { code: 'E_POSITION_INVALID' });
  await t.rejects(at0.decode(tokens.subarray(0, 3), { positions: [40, 41, 43] }), { code: 'E_POSITION_INVALID' });
  t.same(at0.memory.range(0), { min: 0, max: 39 }, 'refused decodes leave the sequence as it was');
  await at0.decode(tokens.subarray(0, 1));
  t.same(at0.memory.range(0), { min: 0, max: 40 }, 'without start a decode continues the sequence');
  await Promise.all([at0.dispose(), at500.dispose(), explicit.dispose()]);
});

t.test('several sequences decode in one batch', async (t) => {
  const a = promptTokens(model, 30, 4);
  const b = promptTokens(model, 30, 5);
  const separate = await model.createContext({ contextSize: 1024, sequences: 2 });
  await separate.decode(a, { sequence: 0 });
  const la = separate.logits();
  await separate.decode(b, { sequence: 1 });
  const lb = separate.logits();

  const joint = await model.createContext({ contextSize: 1024, sequences: 2 });
  const tokens = new Int32Array([...a, ...b]);
  const sequences = [...Array(30).fill(0), ...Array(30).fill(1)];
  const outputs = await joint.decode(tokens, { sequence: sequences, logits: [29, 59] });
  t.equal(outputs, 2);
  t.same(joint.memory.range(0), { min: 0, max: 29 });
  t.same(joint.memory.range(1), { min: 0, max: 29 }, 'each sequence counts its own positions');
  // One batch of 60 rows may run other matrix kernels than two of 30 (see the f16 rounding note
  // in the batch-split test below): the same computation up to rounding.
  t.ok(maxAbsDiff(joint.logits(29), la) < 1e-2, 'sequence 0 matches its separate decode');
  t.ok(maxAbsDiff(joint.logits(59), lb) < 1e-2, 'sequence 1 matches its separate decode');
  t.ok(maxAbsDiff(la, lb) > 1e-1, 'and the two sequences differ from each other');
  await t.rejects(Promise.resolve().then(() => joint.logits(10)), { code: 'E_NO_LOGITS' });
  await Promise.all([separate.dispose(), joint.dispose()]);
});

t.test('long decodes are split into batches and report progress', async (t) => {
  const tokens = promptTokens(model, 700, 6);
  const context = await model.createContext({ contextSize: 2048, batchSize: 128 });
  const progress: Array<[number, number]> = [];
  await context.decode(tokens, { onProgress: (done, total) => progress.push([done, total]), logits: [0, 699] });
  // Reports come per batch of 128, in order, and the last, (700, 700), arrives before the decode
  // resolves. (A report the worker thread sent that arrives after it would be dropped, so under
  // heavy load some intermediate ones may be missing; on an idle machine all six arrive.)
  t.same(progress.at(-1), [700, 700]);
  t.ok(progress.every(([done, total], i) => total === 700 && [128, 256, 384, 512, 640, 700].includes(done) && (i === 0 || done > progress[i - 1]![0])), JSON.stringify(progress));
  t.same(context.memory.range(0), { min: 0, max: 699 });
  t.equal(context.logits(0).length, model.info.vocabSize);
  t.ok(bitIdentical(context.logits(-1), context.logits(699)), 'negative indices count from the end');

  const once = await model.createContext({ contextSize: 2048, batchSize: 1024 });
  await once.decode(tokens, { logits: 'last' });
  // Another micro-batch size runs other matrix kernels, and ggml rounds activations to f16 before
  // multiplying them with f16 weights (and flash attention accumulates in f16): differences of a
  // few f16 ulps (2^-11 relative) per layer are expected. Logits here are O(1); a wrong prefix moves
  // them by > 0.1, so 1e-2 separates "same computation, other rounding" from "other computation".
  const diff = maxAbsDiff(once.logits(), context.logits());
  t.ok(diff < 1e-2, `the split changes nothing but rounding (max |diff| ${diff})`);
  await Promise.all([context.dispose(), once.dispose()]);
});

t.test('an aborted decode leaves the sequence as it was', async (t) => {
  const context = await model.createContext({ contextSize: 4096, batchSize: 64 });
  const head = promptTokens(model, 50, 7);
  await context.decode(head);
  const before = context.logits();
  const controller = new AbortController();
  const long = promptTokens(model, 3000, 8);
  const running = context.decode(long, {
    signal: controller.signal,
    onProgress: (done) => {
      if (done >= 256) controller.abort(new Error('enough'));
    },
  });
  await t.rejects(running, { code: 'E_ABORTED' });
  t.same(context.memory.range(0), { min: 0, max: 49 }, 'the aborted tokens were removed');
  // The 50 cells left are the ones decoded before: the next token sees exactly what a context
  // that never saw the aborted batches sees.
  await context.decode(head.subarray(0, 1), { start: 50 });
  const untouched = await model.createContext({ contextSize: 4096, batchSize: 64 });
  await untouched.decode(head);
  t.ok(bitIdentical(before, untouched.logits()), 'the logits before the abort are those of the head alone');
  await untouched.decode(head.subarray(0, 1), { start: 50 });
  t.ok(bitIdentical(context.logits(), untouched.logits()), 'after the abort the context decodes as if it never happened');
  await t.rejects(context.decode(head, { signal: AbortSignal.abort() }), { code: 'E_ABORTED' }, 'an aborted signal never starts');
  t.same(context.memory.range(0), { min: 0, max: 50 }, 'and leaves the sequence alone');
  await Promise.all([context.dispose(), untouched.dispose()]);
});

t.test('sampling', async (t) => {
  const context = await model.createContext({ contextSize: 512 });
  await context.decode(promptTokens(model, 20, 9));
  const logits = context.logits();
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[best]!) best = i;
  const greedy = model.createSampler();
  t.equal(greedy.sample(context), best, 'greedy picks the largest logit');

  const draw = (seed: number) => {
    const sampler = model.createSampler({ temperature: 1.5, topK: 0, topP: 1, minP: 0, seed });
    const picks = Array.from({ length: 8 }, () => sampler.sample(context));
    sampler.dispose();
    return picks;
  };
  t.same(draw(42), draw(42), 'the same seed gives the same tokens');
  t.notSame(draw(42), draw(43), 'another seed gives other tokens');

  const topK1 = model.createSampler({ temperature: 1, topK: 1, seed: 7 });
  t.equal(topK1.sample(context), best, 'top-k 1 is greedy whatever the temperature');

  const penalised = model.createSampler({ repeatPenalty: 100, repeatLastN: 64 });
  penalised.accept([best]);
  t.not(penalised.sample(context), best, 'a repeat penalty steers away from a recent token');
  t.throws(() => model.createSampler({ topP: 2 }), RangeError);
  t.throws(() => model.createSampler({ temperature: -1 }), RangeError);
  greedy.dispose();
  t.throws(() => greedy.sample(context), { code: 'E_DISPOSED' });
  await context.dispose();
});
